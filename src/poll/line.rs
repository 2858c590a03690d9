//! The serial line poller: text sensors (ASCII, NMEA), one task per port.
//!
//! A bus with one device and no `request:` streams: every line is parsed as it comes; with the
//! device's `every`, at most one message per point per interval goes out (the latest value wins,
//! with the time it was read), without `every` every line is published. A bus whose devices have
//! a `request:` asks each in turn, one at a time: the request is sent (the input flushed first)
//! and the next line within the bus timeout is the answer.
//!
//! Lines that do not parse, overlong lines, invalid UTF-8, NMEA sentences with a bad checksum,
//! fields that do not read as their point's type: counted by kind, logged (the first at once,
//! then at most a summary a minute), never published. A port that cannot be opened or goes
//! away is reopened with backoff (by `bus::serial_line`); device health is the Modbus poller's
//! (for a streaming device, `offline_after` × `every` (10 s without `every`) with no valid line
//! is a failure).

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::{Instant, sleep_until, timeout_at};
use tokio_util::sync::CancellationToken;

use super::{DeviceHealth, Reporter};
use crate::bus::serial_line::{Framed, LinePort};
use crate::bus::{Bus, Transport};
use crate::config::Device;
use crate::mapping::Value;
use crate::message::now_ms;
use crate::parse::ParseError;
use crate::state::Shared;

/// The longest a loop may wait for a port to reopen.
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// Counts line errors of one device and keeps their logging quiet.
#[derive(Default)]
struct ErrorLog {
    unlogged: BTreeMap<&'static str, u64>,
    last: Option<std::time::Instant>,
}

impl ErrorLog {
    fn record(&mut self, device: &str, kind: &'static str, detail: &str) {
        let quiet = self
            .last
            .is_some_and(|t| t.elapsed() < Duration::from_secs(60));
        if quiet {
            *self.unlogged.entry(kind).or_default() += 1;
            return;
        }
        let earlier = std::mem::take(&mut self.unlogged);
        tracing::warn!(device, kind, line = %detail, since_last_report = ?earlier,
            "line not published (logged at most once a minute; counts in the status message)");
        self.last = Some(std::time::Instant::now());
    }
}

struct State {
    device: Device,
    health: DeviceHealth,
    errors: ErrorLog,
    /// Streaming with `every`: the latest value of each point and when it was read.
    latest: BTreeMap<usize, (Value, i64)>,
    last_good: Instant,
}

/// A printable, bounded rendering of a bad line for the log.
fn shown(line: &str) -> String {
    let mut s: String = line
        .chars()
        .take(80)
        .flat_map(char::escape_default)
        .collect();
    if line.chars().count() > 80 {
        s.push('…');
    }
    s
}

pub async fn run(bus: Bus, devices: Vec<Device>, shared: Shared, cancel: CancellationToken) {
    let Transport::SerialLine {
        settings,
        terminator,
        max_line,
        timeout,
    } = bus.transport.clone()
    else {
        tracing::error!(bus = %bus.name, "not a serial line bus");
        return;
    };
    let streaming = devices.len() == 1
        && devices[0]
            .line
            .as_ref()
            .is_some_and(|l| l.request.is_none());
    let mut states: Vec<State> = devices
        .into_iter()
        .map(|device| State {
            device,
            health: DeviceHealth::default(),
            errors: ErrorLog::default(),
            latest: BTreeMap::new(),
            last_good: Instant::now(),
        })
        .collect();
    let mut port = LinePort::new(&bus.name, settings, &terminator, max_line, streaming);
    tracing::info!(bus = %bus.name, devices = states.len(), streaming, "serial line polling started");
    let report = Reporter::new(&bus, shared);
    if streaming {
        stream(&mut port, &mut states[0], &report, &cancel).await;
    } else {
        ask(&mut port, &mut states, timeout, &report, &cancel).await;
    }
    report.stopped();
    tracing::debug!(bus = %bus.name, "serial line polling stopped");
}

/// Opens the port if needed; when it cannot be opened, counts it and says how long to wait.
fn open(port: &mut LinePort, report: &Reporter) -> Result<(), Duration> {
    port.try_open()
        .inspect_err(|_| report.count_error("connect"))
}

/// Handles one framed line for `st`; returns the values if it parsed.
fn take_line(report: &Reporter, st: &mut State, framed: Framed) -> Option<Vec<(usize, Value)>> {
    let line = match framed {
        Framed::Line(l) => l,
        Framed::TooLong => {
            report.count_error("too_long");
            st.errors
                .record(&st.device.name, "too_long", "(longer than max_line)");
            return None;
        }
        Framed::InvalidUtf8 => {
            report.count_error("invalid_utf8");
            st.errors
                .record(&st.device.name, "invalid_utf8", "(not UTF-8)");
            return None;
        }
    };
    report.bus_stats(|b| b.lines += 1);
    let spec = st.device.line.as_ref().expect("a line device");
    let fields = match spec.parser.parse(&line) {
        Ok(Some(f)) => f,
        Ok(None) => return Some(Vec::new()), // a valid line we do not decode (another NMEA sentence)
        Err(e) => {
            let kind = e.kind();
            report.count_error(kind);
            let detail = match &e {
                ParseError::NoMatch => shown(&line),
                other => format!("{other}: {}", shown(&line)),
            };
            report.note_error(Some(&st.device.name), format!("{kind}: {detail}"));
            st.errors.record(&st.device.name, kind, &detail);
            return None;
        }
    };
    let mut values = Vec::new();
    for (i, p) in st.device.points.iter().enumerate() {
        let Some(text) = p.field.as_ref().and_then(|f| fields.get(f)) else {
            continue;
        };
        match p.decode_text(text) {
            Some(v) => values.push((i, v)),
            None => {
                report.count_error("bad_value");
                let detail = format!("point {}: `{}` is not a {:?}", p.name, shown(text), p.dtype);
                report.note_error(Some(&st.device.name), format!("bad_value: {detail}"));
                st.errors.record(&st.device.name, "bad_value", &detail);
            }
        }
    }
    Some(values)
}

/// One streaming device owns the port.
async fn stream(
    port: &mut LinePort,
    st: &mut State,
    report: &Reporter,
    cancel: &CancellationToken,
) {
    let every = st.device.line.as_ref().and_then(|l| l.every);
    let silence = every.unwrap_or(Duration::from_secs(10)) * st.device.offline_after;
    let mut flush = tokio::time::interval(every.unwrap_or(Duration::from_secs(3600)));
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    flush.tick().await; // the first tick is immediate
    let mut watchdog = tokio::time::interval(Duration::from_secs(1));
    let mut out = Vec::new();
    st.last_good = Instant::now();
    loop {
        report.beat(Instant::now() + BACKOFF_MAX, 1);
        if let Err(wait) = open(port, report) {
            st.health.failed(report, &st.device);
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(wait) => continue,
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            r = port.read_lines(&mut out) => if r.is_ok() {
                let ts = now_ms();
                for framed in out.drain(..) {
                    let Some(values) = take_line(report, st, framed) else { continue };
                    st.last_good = Instant::now();
                    st.health.succeeded(report, &st.device);
                    if values.is_empty() {
                        continue;
                    }
                    report.device(&st.device.name, |d| d.polls += 1);
                    match every {
                        None => st.health.publish(report, &st.device, ts, values),
                        Some(_) => {
                            let mut values = values;
                            super::compute(&st.device, &mut values);
                            for (i, v) in values {
                                st.latest.insert(i, (v, ts));
                            }
                        }
                    }
                }
            },
            _ = flush.tick(), if every.is_some() => flush_latest(report, st),
            _ = watchdog.tick() => {
                if st.last_good.elapsed() >= silence {
                    st.last_good = Instant::now();
                    tracing::debug!(device = %st.device.name, ?silence, "no valid line");
                    report.count_error("silent");
                    st.health.failed(report, &st.device);
                }
            }
        }
    }
    flush_latest(report, st);
}

/// Publishes the latest value of each point, each with the time it was read.
fn flush_latest(report: &Reporter, st: &mut State) {
    let mut by_ts: BTreeMap<i64, Vec<(usize, Value)>> = BTreeMap::new();
    for (i, (v, ts)) in std::mem::take(&mut st.latest) {
        by_ts.entry(ts).or_default().push((i, v));
    }
    for (ts, values) in by_ts {
        st.health.publish_computed(report, &st.device, ts, values);
    }
}

/// Request/response: each device asked in turn, one at a time.
async fn ask(
    port: &mut LinePort,
    states: &mut [State],
    timeout: Duration,
    report: &Reporter,
    cancel: &CancellationToken,
) {
    let start = Instant::now();
    let mut due: Vec<Instant> = vec![start; states.len()];
    let mut out = Vec::new();
    loop {
        let i = (0..states.len())
            .min_by_key(|&i| due[i])
            .expect("at least one device");
        report.beat(due[i] + BACKOFF_MAX, 1);
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = sleep_until(due[i]) => {}
        }
        let spec = states[i].device.line.clone().expect("a line device");
        let every = spec.every.unwrap_or(Duration::from_secs(1));
        if let Err(wait) = open(port, report) {
            for st in states.iter_mut() {
                st.health.failed(report, &st.device);
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(wait) => continue,
            }
        }
        let st = &mut states[i];
        report.bus_stats(|b| b.requests += 1);
        report.device(&st.device.name, |d| d.polls += 1);
        let mut outcome: Result<(), &'static str> = Err("timeout");
        if port
            .send(spec.request.as_deref().unwrap_or_default())
            .await
            .is_err()
        {
            outcome = Err("io");
        } else {
            let deadline = Instant::now() + timeout;
            let ts = now_ms();
            out.clear();
            loop {
                match timeout_at(deadline, port.read_lines(&mut out)).await {
                    Err(_) => break,
                    Ok(Err(())) => {
                        outcome = Err("io");
                        break;
                    }
                    Ok(Ok(())) if out.is_empty() => {}
                    Ok(Ok(())) => {
                        let first = out.remove(0);
                        out.clear();
                        outcome = match take_line(report, st, first) {
                            Some(values) => {
                                st.health.publish(report, &st.device, ts, values);
                                Ok(())
                            }
                            None => Err("bad_line"),
                        };
                        break;
                    }
                }
            }
        }
        let now = Instant::now();
        due[i] = (due[i] + every).max(now);
        match outcome {
            Ok(()) => st.health.succeeded(report, &st.device),
            Err(kind) => {
                if kind == "timeout" {
                    report.count_error("timeout");
                    report.device(&st.device.name, |d| d.timeouts += 1);
                    // An answer may still come, late (up to twice the timeout): it is dropped.
                    let late = port.drop_late_answer(Instant::now() + timeout).await;
                    if late > 0 {
                        report.count_error("late_answer");
                        tracing::debug!(device = %st.device.name, bytes = late, "an answer came after the timeout and was dropped");
                    }
                }
                let failures = st.health.failed(report, &st.device);
                report.note_error(Some(&st.device.name), format!("{}: {kind}", st.device.name));
                if failures == 1 && kind == "timeout" {
                    tracing::warn!(bus = report.bus(), device = %st.device.name, ?timeout, "no answer line; backing off if it goes on");
                }
                due[i] = due[i].max(now + st.health.backoff());
            }
        }
    }
}
