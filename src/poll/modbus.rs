//! The Modbus poller: one task per Modbus bus (TCP or RTU) decides which device is asked for
//! what, and when.
//!
//! The task owns its bus's [`Link`], so requests on one bus never overlap (on RS-485, strictly
//! one at a time, with the silence between frames kept by the link). Each device's points are
//! grouped by interval (`config::PollGroup`); every group has its own schedule.
//!
//! Failure handling, by kind:
//! - a device that keeps failing (timeouts, CRC errors, a broken link: two polls in a row) is
//!   backed off exponentially (1 s up to 60 s), so the other devices on the bus keep their rate; after `offline_after`
//!   consecutive failed polls it is announced `offline` on its retained availability topic, and
//!   `online` again at its first success;
//! - a port or connection that cannot be opened backs off the whole bus the same way;
//! - a Modbus exception, by what it says ([`Refusal`]): illegal function, address or value is a
//!   mapping problem — logged once naming the points of that request, those points skipped,
//!   and the request retried at a slowly growing interval (never hot, at most 5 min); a device
//!   failure (0x04, 0x08) is counted and retried after at most 30 s; busy (0x05, 0x06) is asked
//!   again at the next cycle; a gateway that cannot reach the device (0x0A, 0x0B) is a failure
//!   of the device's health, as a timeout is (backed off, then `offline`).
//!
//! Values read are turned into messages and handed to the store, which never makes the poller
//! wait for the uplink. Device health and figures go through the core in [`super`].

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use super::{DeviceHealth, Reporter};
use crate::backoff::{Backoff, Retry};
use crate::bus::{Bus, BusError, Data, Link, Refusal};
use crate::config::Device;
use crate::mapping::Value;
use crate::message::now_ms;
use crate::state::{Command, Shared};

/// Longest pause for a request the device refuses with an exception that says the mapping is
/// wrong (illegal function, address or value).
const REFUSED_MAX: Duration = Duration::from_secs(300);
/// Longest pause for a request the device answers with a device failure (0x04, 0x08).
const DEVICE_FAILURE_MAX: Duration = Duration::from_secs(30);

struct DeviceState {
    device: Device,
    health: DeviceHealth,
    /// Requests (group, request index) refused with an exception: how often, and when to retry.
    refused: HashMap<(usize, usize), (u32, Instant)>,
}

struct Slot {
    device: usize,
    group: usize,
    due: Instant,
}

/// Commands served in a row while a poll is overdue, before the poll goes first.
const COMMANDS_PER_OVERDUE_POLL: u32 = 4;

/// Polls every device of `bus` until `cancel` fires.
pub async fn run(
    bus: Bus,
    devices: Vec<Device>,
    shared: Shared,
    mut commands: tokio::sync::mpsc::Receiver<Command>,
    cancel: CancellationToken,
) {
    let report = Reporter::new(&bus, shared);
    let Some(mut link) = Link::new(&bus) else {
        tracing::error!(bus = %bus.name, "not a Modbus bus; the Modbus poller does not serve it");
        return;
    };
    let start = Instant::now();
    let mut slots: Vec<Slot> = devices
        .iter()
        .enumerate()
        .flat_map(|(d, dev)| (0..dev.groups.len()).map(move |g| (d, g)))
        .map(|(device, group)| Slot {
            device,
            group,
            due: start,
        })
        .collect();
    let mut states: Vec<DeviceState> = devices
        .into_iter()
        .map(|device| DeviceState {
            device,
            health: DeviceHealth::default(),
            refused: HashMap::new(),
        })
        .collect();
    if slots.is_empty() {
        cancel.cancelled().await;
        return;
    }
    tracing::info!(bus = %bus.name, devices = states.len(), "polling started");
    let mut bus_retry = Retry::new(Backoff::DEVICE);
    let mut last_report = Instant::now();
    let mut commands_since_poll = 0u32;

    loop {
        let next = (0..slots.len())
            .min_by_key(|&i| slots[i].due)
            .expect("not empty");
        let due = slots[next].due;
        let requests = states[slots[next].device].device.groups[slots[next].group]
            .requests
            .len() as u32;
        report.beat(due, requests);
        // A command waits its turn on the bus like any request and goes before polls, but only
        // a few while a poll is overdue: a flood of commands must not starve polling.
        let may_command = commands_since_poll < COMMANDS_PER_OVERDUE_POLL || Instant::now() < due;
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            Some(cmd) = commands.recv(), if may_command => {
                execute(&mut link, &mut states, cmd, &report).await;
                commands_since_poll += 1;
                continue;
            }
            _ = sleep_until(due) => {}
        }
        commands_since_poll = 0;
        let (d, g) = (slots[next].device, slots[next].group);
        let st = &mut states[d];
        let every = st.device.groups[g].every;
        let outcome = poll_group(&mut link, st, g, &report).await;
        let now = Instant::now();
        // Keep the cadence; when behind (a saturated bus, a stall), poll again as soon as the
        // bus is free instead of catching up on every missed cycle.
        slots[next].due = (due + every).max(now);

        match outcome {
            Ok(()) => {
                bus_retry.succeeded();
                st.health.succeeded(&report, &st.device);
            }
            Err(BusError::Connect(e)) => {
                // The port or connection itself: back off the whole bus, not one device.
                let backoff = bus_retry.failed();
                report.note_error(None, format!("cannot open the bus: {e}"));
                if bus_retry.failures() == 1 {
                    tracing::warn!(bus = %bus.name, error = %e, "cannot open the bus; retrying with backoff (up to 60s)");
                } else {
                    tracing::debug!(bus = %bus.name, error = %e, ?backoff, "bus still unavailable");
                }
                for st in states.iter_mut() {
                    st.health.failed(&report, &st.device);
                }
                let until = now + backoff;
                for s in slots.iter_mut() {
                    s.due = s.due.max(until);
                }
            }
            Err(e) => {
                bus_retry.succeeded();
                let failures = st.health.failed(&report, &st.device);
                // One failed poll (a CRC error, one lost reply) is retried at the next cycle;
                // a device that keeps failing is backed off.
                let backoff = st.health.backoff();
                report.note_error(Some(&st.device.name), format!("{}: {e}", st.device.name));
                if failures == 1 {
                    tracing::warn!(bus = %bus.name, device = %st.device.name, unit = st.device.unit, error = %e, kind = e.kind(),
                        "device poll failed; backing off, the other devices keep their schedule");
                } else {
                    tracing::debug!(bus = %bus.name, device = %st.device.name, error = %e, failures, ?backoff, "device still failing");
                }
                let until = now + backoff;
                for s in slots.iter_mut().filter(|s| s.device == d) {
                    s.due = s.due.max(until);
                }
            }
        }
        let elapsed = start.elapsed().as_secs_f64().max(1e-3);
        report.bus_stats(|b| {
            b.utilisation = (link.busy().as_secs_f64() / elapsed).min(1.0);
            b.line = link.line_faults();
        });
        if last_report.elapsed() >= Duration::from_secs(600) {
            last_report = Instant::now();
            report.bus_stats(|b| {
                tracing::info!(bus = %bus.name, requests = b.requests, errors = ?b.errors, utilisation = format!("{:.1}%", b.utilisation * 100.0), "bus figures");
            });
        }
    }
    // Commands still waiting are answered, not dropped: the one who sent them learns they
    // were not carried out (a reload or a shutdown came first).
    commands.close();
    while let Ok(cmd) = commands.try_recv() {
        let _ = cmd.reply.send(Err(
            "not carried out: the gateway is stopping or reloading; send it again".into(),
        ));
    }
    report.stopped();
    tracing::debug!(bus = %bus.name, "polling stopped");
}

/// Writes a command's value, reads the point back, publishes the value read and replies.
async fn execute(link: &mut Link, states: &mut [DeviceState], cmd: Command, report: &Reporter) {
    let Some(st) = states.iter_mut().find(|s| s.device.name == cmd.device) else {
        let _ = cmd.reply.send(Err(format!("no device {}", cmd.device)));
        return;
    };
    let dev = &st.device;
    let p = &dev.points[cmd.point];
    let result = async {
        link.write(dev.unit, p.source.address, &cmd.data)
            .await
            .map_err(|e| format!("write failed: {e}"))?;
        let req = dev
            .groups
            .iter()
            .flat_map(|g| &g.requests)
            .find(|r| r.points.contains(&cmd.point))
            .ok_or("the point is not polled")?;
        let data = link
            .read(dev.unit, req)
            .await
            .map_err(|e| format!("written, but the read-back failed: {e}"))?;
        let off = (p.source.address - req.start) as usize;
        let value = match &data {
            Data::Words(w) => p.decode_words(&w[off..off + p.width() as usize]),
            Data::Bits(b) => p.decode_bit(b[off]),
        };
        Ok::<Value, String>(value)
    }
    .await;
    match &result {
        Ok(v) => {
            tracing::info!(device = %dev.name, point = %p.name, value = %v, "command written and read back");
            st.health.publish_command(report, dev, cmd.point, v.clone());
        }
        Err(e) => tracing::warn!(device = %dev.name, point = %p.name, error = %e, "command failed"),
    }
    let _ = cmd.reply.send(result);
}

/// Reads every request of one group, decodes the values and enqueues their messages. Values
/// read before a failure are still enqueued.
async fn poll_group(
    link: &mut Link,
    st: &mut DeviceState,
    g: usize,
    report: &Reporter,
) -> Result<(), BusError> {
    let ts = now_ms();
    let dev = &st.device;
    let mut values: Vec<(usize, Value)> = Vec::new();
    let mut failure = None;
    report.device(&dev.name, |d| d.polls += 1);
    for (r, req) in dev.groups[g].requests.iter().enumerate() {
        if st
            .refused
            .get(&(g, r))
            .is_some_and(|(_, until)| Instant::now() < *until)
        {
            continue;
        }
        report.bus_stats(|b| b.requests += 1);
        match link.read(dev.unit, req).await {
            Ok(data) => {
                if st.refused.remove(&(g, r)).is_some() {
                    tracing::info!(device = %dev.name, start = req.start, "device accepts the read again");
                }
                for &i in &req.points {
                    let p = &dev.points[i];
                    let off = (p.source.address - req.start) as usize;
                    let v = match &data {
                        Data::Words(w) => p.decode_words(&w[off..off + p.width() as usize]),
                        Data::Bits(b) => p.decode_bit(b[off]),
                    };
                    if v == Value::Null {
                        report.device(&dev.name, |d| d.not_finite += 1);
                    }
                    values.push((i, v));
                }
            }
            Err(BusError::Exception(code)) => {
                report.count_error("exception");
                report.device(&dev.name, |d| d.exceptions += 1);
                let class = Refusal::of(code);
                match class {
                    // A gateway in front cannot reach the device: the device's health, like a
                    // timeout (backed off, offline after `offline_after`).
                    Refusal::Unreachable => {
                        failure = Some(BusError::Exception(code));
                        break;
                    }
                    // Busy: asked again at the next cycle, nothing skipped for longer.
                    Refusal::Busy => {
                        report.note_error(
                            Some(&dev.name),
                            format!("{}: busy ({code:?}); asked again next cycle", dev.name),
                        );
                        tracing::debug!(device = %dev.name, exception = ?code, start = req.start, "device busy; asked again next cycle");
                        continue;
                    }
                    Refusal::Mapping | Refusal::DeviceFailure => {}
                }
                let every = dev.groups[g].every;
                let entry = st.refused.entry((g, r)).or_insert((0, Instant::now()));
                entry.0 += 1;
                // Retry refused requests less and less often: 2, 4, 8 … intervals, at most 5 min
                // for a mapping problem, at most DEVICE_FAILURE_MAX for a device failure.
                let max = match class {
                    Refusal::DeviceFailure => DEVICE_FAILURE_MAX,
                    _ => REFUSED_MAX,
                };
                let pause = Backoff::new(every, max.max(every)).after(entry.0 + 1);
                entry.1 = Instant::now() + pause;
                report.note_error(
                    Some(&dev.name),
                    format!(
                        "{}: exception {code:?} reading {} {}..{}",
                        dev.name,
                        req.table.name(),
                        req.start,
                        req.end()
                    ),
                );
                if entry.0 == 1 && class == Refusal::DeviceFailure {
                    tracing::warn!(device = %dev.name, unit = dev.unit, exception = ?code,
                        table = req.table.name(), start = req.start, count = req.count,
                        "the device reports a failure for this read; retried after a pause (at most {DEVICE_FAILURE_MAX:?})");
                } else if entry.0 == 1 {
                    let names: Vec<&str> = req
                        .points
                        .iter()
                        .map(|&i| dev.points[i].name.as_str())
                        .collect();
                    tracing::warn!(device = %dev.name, unit = dev.unit, exception = ?code,
                        table = req.table.name(), start = req.start, count = req.count, points = %names.join(","),
                        "device refused a read (check the mapping); these points are skipped and retried rarely");
                }
            }
            Err(e) => {
                report.count_error(e.kind());
                if matches!(e, BusError::Timeout(_)) {
                    report.device(&dev.name, |d| d.timeouts += 1);
                }
                failure = Some(e);
                break;
            }
        }
    }
    st.health.publish(report, dev, ts, values);
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
