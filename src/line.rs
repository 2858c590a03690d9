//! Serial line buses: the poller of text sensors (ASCII, NMEA), one task per port.
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
//! away is reopened with backoff; availability works as for Modbus devices (for a streaming
//! device, `offline_after` × `every` (10 s without `every`) with no valid line is a failure).

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{Instant, sleep_until, timeout_at};
use tokio_serial::{SerialPort, SerialStream};
use tokio_util::sync::CancellationToken;

use crate::bus::serial::SerialSettings;
use crate::bus::serial_line::{Framed, LineFramer};
use crate::config::{Bus, Device, Transport};
use crate::gateway::Shared;
use crate::mapping::Value;
use crate::message::{self, now_ms};
use crate::parse::ParseError;
use crate::poller::{Availability, SharedStats};
use crate::store::StoreHandle;
use crate::systemd::Health;

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
    failures: u32,
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
    let Shared {
        store,
        stats,
        availability,
        health,
    } = shared;
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
            failures: 0,
            errors: ErrorLog::default(),
            latest: BTreeMap::new(),
            last_good: Instant::now(),
        })
        .collect();
    let mut link = Port {
        bus: bus.name.clone(),
        settings,
        port: None,
        framer: LineFramer::new(&terminator, max_line),
        streaming,
        open_failures: 0,
        stats: stats.clone(),
    };
    tracing::info!(bus = %bus.name, devices = states.len(), streaming, "serial line polling started");
    let task = format!("bus {}", bus.name);
    let ctx = Ctx {
        bus: &bus.name,
        store: &store,
        stats: &stats,
        availability: &availability,
        health: &health,
        task: &task,
        worst: bus.transport.worst_request_time(),
    };
    if streaming {
        stream(&mut link, &mut states[0], &ctx, &cancel).await;
    } else {
        ask(&mut link, &mut states, timeout, &ctx, &cancel).await;
    }
    health.forget(&task);
    tracing::debug!(bus = %bus.name, "serial line polling stopped");
}

struct Ctx<'a> {
    bus: &'a str,
    store: &'a StoreHandle,
    stats: &'a SharedStats,
    availability: &'a Availability,
    health: &'a Health,
    task: &'a str,
    worst: Duration,
}

impl Ctx<'_> {
    /// Promises to be back in the loop by `until` (plus the time a request may take).
    fn beat(&self, until: Instant) {
        self.health.beat(
            self.task,
            until.max(Instant::now()).into_std() + self.worst + crate::systemd::SLACK,
        );
    }

    fn count(&self, kind: &'static str) {
        let mut all = self.stats.lock().expect("not poisoned");
        *all.entry(self.bus.to_string())
            .or_default()
            .errors
            .entry(kind)
            .or_default() += 1;
    }

    fn device<R>(&self, name: &str, f: impl FnOnce(&mut crate::poller::DeviceStats) -> R) -> R {
        let mut all = self.stats.lock().expect("not poisoned");
        f(all
            .entry(self.bus.to_string())
            .or_default()
            .devices
            .entry(name.to_string())
            .or_default())
    }

    fn set_online(&self, st: &State, online: bool) {
        self.device(&st.device.name, |d| {
            d.online = Some(online);
            if online {
                d.last_success_ms = Some(now_ms());
            }
        });
        if self.availability.set(&st.device.availability_topic, online) && !online {
            tracing::warn!(bus = self.bus, device = %st.device.name, "device is offline");
        }
    }

    fn fail(&self, st: &mut State) {
        st.failures += 1;
        self.device(&st.device.name, |d| d.failed_polls += 1);
        if st.failures >= st.device.offline_after {
            self.set_online(st, false);
        }
    }

    fn enqueue(&self, dev: &Device, ts: i64, values: Vec<(usize, Value)>) {
        if let Err(e) = self.store.enqueue(message::from_values(dev, ts, values)) {
            tracing::error!(error = %e, device = %dev.name, "cannot hand readings to the store");
        }
    }
}

/// The serial port of the bus, opened on demand.
struct Port {
    bus: String,
    settings: SerialSettings,
    port: Option<SerialStream>,
    framer: LineFramer,
    /// One streaming device owns the port: after opening it, the bytes up to the first line
    /// ending are discarded (the sensor may be mid-line). A request/response answer is whole.
    streaming: bool,
    open_failures: u32,
    stats: SharedStats,
}

impl Port {
    /// Opens the port if it is closed; on failure returns how long to wait before trying again.
    fn try_open(&mut self) -> Result<(), Duration> {
        if self.port.is_some() {
            return Ok(());
        }
        match self.settings.open() {
            Ok(p) => {
                if self.open_failures > 0 {
                    tracing::info!(bus = %self.bus, port = %self.settings.port, "serial port open again");
                }
                self.open_failures = 0;
                if self.streaming {
                    self.framer.resync();
                } else {
                    self.framer.clear();
                }
                self.port = Some(p);
                Ok(())
            }
            Err(e) => {
                self.open_failures += 1;
                if self.open_failures == 1 {
                    tracing::warn!(bus = %self.bus, port = %self.settings.port, error = %e,
                        "cannot open the serial port; retrying with backoff (up to 60s)");
                }
                *self
                    .stats
                    .lock()
                    .expect("not poisoned")
                    .entry(self.bus.clone())
                    .or_default()
                    .errors
                    .entry("connect")
                    .or_default() += 1;
                Err(Duration::from_secs(1)
                    .saturating_mul(1 << self.open_failures.saturating_sub(1).min(6))
                    .min(BACKOFF_MAX))
            }
        }
    }

    fn close(&mut self, why: &str) {
        if self.port.take().is_some() {
            tracing::warn!(bus = %self.bus, port = %self.settings.port, why, "serial port lost; reopening");
        }
    }
}

/// Handles one framed line for `st`; returns the values if it parsed.
fn take_line(ctx: &Ctx, st: &mut State, framed: Framed) -> Option<Vec<(usize, Value)>> {
    let line = match framed {
        Framed::Line(l) => l,
        Framed::TooLong => {
            ctx.count("too_long");
            st.errors
                .record(&st.device.name, "too_long", "(longer than max_line)");
            return None;
        }
        Framed::InvalidUtf8 => {
            ctx.count("invalid_utf8");
            st.errors
                .record(&st.device.name, "invalid_utf8", "(not UTF-8)");
            return None;
        }
    };
    {
        let mut all = ctx.stats.lock().expect("not poisoned");
        all.entry(ctx.bus.to_string()).or_default().lines += 1;
    }
    let spec = st.device.line.as_ref().expect("a line device");
    let fields = match spec.parser.parse(&line) {
        Ok(Some(f)) => f,
        Ok(None) => return Some(Vec::new()), // a valid line we do not decode (another NMEA sentence)
        Err(e) => {
            let kind = e.kind();
            ctx.count(kind);
            let detail = match &e {
                ParseError::NoMatch => shown(&line),
                other => format!("{other}: {}", shown(&line)),
            };
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
                ctx.count("bad_value");
                let detail = format!("point {}: `{}` is not a {:?}", p.name, shown(text), p.dtype);
                st.errors.record(&st.device.name, "bad_value", &detail);
            }
        }
    }
    Some(values)
}

/// One streaming device owns the port.
async fn stream(link: &mut Port, st: &mut State, ctx: &Ctx<'_>, cancel: &CancellationToken) {
    let every = st.device.line.as_ref().and_then(|l| l.every);
    let silence = every.unwrap_or(Duration::from_secs(10)) * st.device.offline_after;
    let mut flush = tokio::time::interval(every.unwrap_or(Duration::from_secs(3600)));
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    flush.tick().await; // the first tick is immediate
    let mut watchdog = tokio::time::interval(Duration::from_secs(1));
    let mut buf = [0u8; 1024];
    let mut out = Vec::new();
    st.last_good = Instant::now();
    loop {
        ctx.beat(Instant::now() + BACKOFF_MAX);
        if let Err(wait) = link.try_open() {
            ctx.fail(st);
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(wait) => continue,
            }
        }
        let port = link.port.as_mut().expect("open");
        tokio::select! {
            _ = cancel.cancelled() => break,
            r = port.read(&mut buf) => match r {
                Ok(0) => link.close("end of file"),
                Err(e) => link.close(&e.to_string()),
                Ok(n) => {
                    link.framer.push(&buf[..n], &mut out);
                    let ts = now_ms();
                    for framed in out.drain(..) {
                        let Some(values) = take_line(ctx, st, framed) else { continue };
                        st.last_good = Instant::now();
                        st.failures = 0;
                        ctx.set_online(st, true);
                        if values.is_empty() {
                            continue;
                        }
                        ctx.device(&st.device.name, |d| d.polls += 1);
                        match every {
                            None => ctx.enqueue(&st.device, ts, values),
                            Some(_) => {
                                for (i, v) in values {
                                    st.latest.insert(i, (v, ts));
                                }
                            }
                        }
                    }
                }
            },
            _ = flush.tick(), if every.is_some() => flush_latest(ctx, st),
            _ = watchdog.tick() => {
                if st.last_good.elapsed() >= silence {
                    st.last_good = Instant::now();
                    tracing::debug!(device = %st.device.name, ?silence, "no valid line");
                    ctx.count("silent");
                    ctx.fail(st);
                }
            }
        }
    }
    flush_latest(ctx, st);
}

/// Publishes the latest value of each point, each with the time it was read.
fn flush_latest(ctx: &Ctx, st: &mut State) {
    let mut by_ts: BTreeMap<i64, Vec<(usize, Value)>> = BTreeMap::new();
    for (i, (v, ts)) in std::mem::take(&mut st.latest) {
        by_ts.entry(ts).or_default().push((i, v));
    }
    for (ts, values) in by_ts {
        ctx.enqueue(&st.device, ts, values);
    }
}

/// Request/response: each device asked in turn, one at a time.
async fn ask(
    link: &mut Port,
    states: &mut [State],
    timeout: Duration,
    ctx: &Ctx<'_>,
    cancel: &CancellationToken,
) {
    let start = Instant::now();
    let mut due: Vec<Instant> = vec![start; states.len()];
    let mut buf = [0u8; 1024];
    let mut out = Vec::new();
    loop {
        let i = (0..states.len())
            .min_by_key(|&i| due[i])
            .expect("at least one device");
        ctx.beat(due[i] + BACKOFF_MAX);
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = sleep_until(due[i]) => {}
        }
        let spec = states[i].device.line.clone().expect("a line device");
        let every = spec.every.unwrap_or(Duration::from_secs(1));
        if let Err(wait) = link.try_open() {
            for st in states.iter_mut() {
                ctx.fail(st);
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(wait) => continue,
            }
        }
        let st = &mut states[i];
        // Whatever is waiting is not the answer to the request about to go out.
        link.framer.clear();
        let port = link.port.as_mut().expect("open");
        let _ = port.clear(tokio_serial::ClearBuffer::Input);
        let request = spec.request.as_deref().unwrap_or_default();
        {
            let mut all = ctx.stats.lock().expect("not poisoned");
            all.entry(ctx.bus.to_string()).or_default().requests += 1;
        }
        ctx.device(&st.device.name, |d| d.polls += 1);
        let port = link.port.as_mut().expect("open");
        let sent = async {
            port.write_all(request).await?;
            port.flush().await
        }
        .await;
        let mut outcome: Result<(), &'static str> = Err("timeout");
        if let Err(e) = sent {
            link.close(&e.to_string());
            outcome = Err("io");
        } else {
            let deadline = Instant::now() + timeout;
            let ts = now_ms();
            'read: loop {
                let port = link.port.as_mut().expect("open");
                match timeout_at(deadline, port.read(&mut buf)).await {
                    Err(_) => break 'read,
                    Ok(Ok(0)) => {
                        link.close("end of file");
                        outcome = Err("io");
                        break 'read;
                    }
                    Ok(Err(e)) => {
                        link.close(&e.to_string());
                        outcome = Err("io");
                        break 'read;
                    }
                    Ok(Ok(n)) => {
                        link.framer.push(&buf[..n], &mut out);
                        if let Some(first) = (!out.is_empty()).then(|| out.remove(0)) {
                            out.clear();
                            outcome = match take_line(ctx, st, first) {
                                Some(values) => {
                                    ctx.enqueue(&st.device, ts, values);
                                    Ok(())
                                }
                                None => Err("bad_line"),
                            };
                            break 'read;
                        }
                    }
                }
            }
        }
        let now = Instant::now();
        due[i] = (due[i] + every).max(now);
        match outcome {
            Ok(()) => {
                if st.failures > 0 {
                    tracing::info!(bus = ctx.bus, device = %st.device.name, failed_polls = st.failures, "device answers again");
                }
                st.failures = 0;
                ctx.set_online(st, true);
            }
            Err(kind) => {
                if kind == "timeout" {
                    ctx.count("timeout");
                    ctx.device(&st.device.name, |d| d.timeouts += 1);
                    // An answer may still come, late: let it arrive and drop it, so it is never
                    // taken for the next device's answer (up to twice the timeout late).
                    if let Some(port) = link.port.as_mut() {
                        let until = Instant::now() + timeout;
                        let mut late = 0;
                        while let Ok(Ok(n)) = timeout_at(until, port.read(&mut buf)).await {
                            if n == 0 {
                                break;
                            }
                            late += n;
                        }
                        let _ = port.clear(tokio_serial::ClearBuffer::Input);
                        if late > 0 {
                            ctx.count("late_answer");
                            tracing::debug!(device = %st.device.name, bytes = late, "an answer came after the timeout and was dropped");
                        }
                    }
                }
                ctx.fail(st);
                if st.failures == 1 && kind == "timeout" {
                    tracing::warn!(bus = ctx.bus, device = %st.device.name, ?timeout, "no answer line; backing off if it goes on");
                }
                if st.failures >= 2 {
                    let backoff = Duration::from_secs(1)
                        .saturating_mul(1 << (st.failures - 2).min(6))
                        .min(BACKOFF_MAX);
                    due[i] = due[i].max(now + backoff);
                }
            }
        }
    }
}
