//! Polling: one task per bus decides which device is asked for what, and when.
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
//! - a Modbus exception is a mapping problem: logged once naming the points of that request,
//!   those points skipped, and the request retried at a slowly growing interval (never hot).
//!
//! Values read are turned into messages and handed to the store, which never makes the poller
//! wait for the uplink. Per-bus figures go to a shared [`BusStats`] for the status message.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use crate::bus::{BusError, Data, Link, WriteData};
use crate::config::{Bus, Device};
use crate::gateway::Shared;
use crate::mapping::Value;
use crate::message::{self, now_ms};
use crate::store::StoreHandle;

const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Longest pause for a request the device refuses with an exception.
const REFUSED_MAX: Duration = Duration::from_secs(300);

/// Figures of one device.
#[derive(Debug, Default, Clone, Serialize)]
pub struct DeviceStats {
    pub polls: u64,
    pub failed_polls: u64,
    pub timeouts: u64,
    pub exceptions: u64,
    /// Values that read as NaN or infinite (published as null).
    pub not_finite: u64,
    /// None until the first poll decided it.
    pub online: Option<bool>,
    pub last_success_ms: Option<i64>,
}

/// Figures of one bus, as the status message reports them.
#[derive(Debug, Default, Clone, Serialize)]
pub struct BusStats {
    pub requests: u64,
    /// Lines read (serial line buses).
    pub lines: u64,
    /// Failed requests by kind: timeout, crc, exception, io, connect, protocol.
    pub errors: BTreeMap<&'static str, u64>,
    /// Share of wall time with a transaction on the wire (RTU buses).
    pub utilisation: f64,
    /// CRC errors, noise, late replies and retries on the line (RTU).
    pub line: crate::bus::LineFaults,
    pub devices: BTreeMap<String, DeviceStats>,
}

/// Every bus's figures, shared between the pollers and the uplink's status message.
pub type SharedStats = Arc<Mutex<BTreeMap<String, BusStats>>>;

/// Device availability: the pollers set it, the uplink publishes it (retained) when it changes
/// and again on every connect. It is state, not a reading: it does not go through the queue, so
/// it takes no `seq` and a stale `offline` is never replayed hours later.
#[derive(Debug, Default)]
pub struct Availability {
    /// Topic → (online, version); the version grows with every change.
    states: Mutex<BTreeMap<String, (bool, u64)>>,
    changed: tokio::sync::Notify,
}

impl Availability {
    /// Records `online` for `topic`; returns whether it changed.
    pub fn set(&self, topic: &str, online: bool) -> bool {
        let mut states = self.states.lock().expect("not poisoned");
        let entry = states.entry(topic.to_string()).or_insert((!online, 0));
        if entry.0 == online && entry.1 > 0 {
            return false;
        }
        *entry = (online, entry.1 + 1);
        drop(states);
        self.changed.notify_one();
        true
    }

    /// Every topic with its state and version.
    pub fn snapshot(&self) -> Vec<(String, bool, u64)> {
        self.states
            .lock()
            .expect("not poisoned")
            .iter()
            .map(|(t, (o, v))| (t.clone(), *o, *v))
            .collect()
    }

    /// Resolves when something changed since the last call.
    pub async fn changed(&self) {
        self.changed.notified().await
    }
}

struct DeviceState {
    device: Device,
    /// Consecutive failed polls; 0 while healthy.
    failures: u32,
    /// Requests (group, request index) refused with an exception: how often, and when to retry.
    refused: HashMap<(usize, usize), (u32, Instant)>,
}

struct Slot {
    device: usize,
    group: usize,
    due: Instant,
}

/// Polls every device of `bus` until `cancel` fires.
/// A command for a point: write it, read it back. The reply carries the value read back or
/// why it failed. Commands are never stored: they are carried out now or refused.
/// Commands served in a row while a poll is overdue, before the poll goes first.
const COMMANDS_PER_OVERDUE_POLL: u32 = 4;

pub struct Command {
    pub device: String,
    pub point: usize,
    pub data: WriteData,
    pub reply: tokio::sync::oneshot::Sender<Result<Value, String>>,
}

pub async fn run(
    bus: Bus,
    devices: Vec<Device>,
    shared: Shared,
    mut commands: tokio::sync::mpsc::Receiver<Command>,
    cancel: CancellationToken,
) {
    let Shared {
        store,
        stats,
        availability,
        health,
    } = shared;
    let task = format!("bus {}", bus.name);
    let per_request = bus.transport.worst_request_time();
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
            failures: 0,
            refused: HashMap::new(),
        })
        .collect();
    if slots.is_empty() {
        cancel.cancelled().await;
        return;
    }
    tracing::info!(bus = %bus.name, devices = states.len(), "polling started");
    let mut bus_failures = 0u32;
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
        health.beat(
            &task,
            due.max(Instant::now()).into_std()
                + per_request * requests.max(1)
                + crate::systemd::SLACK,
        );
        // A command waits its turn on the bus like any request and goes before polls, but only
        // a few while a poll is overdue: a flood of commands must not starve polling.
        let may_command = commands_since_poll < COMMANDS_PER_OVERDUE_POLL || Instant::now() < due;
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            Some(cmd) = commands.recv(), if may_command => {
                execute(&mut link, &mut states, cmd, &store).await;
                commands_since_poll += 1;
                continue;
            }
            _ = sleep_until(due) => {}
        }
        commands_since_poll = 0;
        let (d, g) = (slots[next].device, slots[next].group);
        let st = &mut states[d];
        let every = st.device.groups[g].every;
        let outcome = poll_group(&mut link, st, g, &store, &bus.name, &stats).await;
        let now = Instant::now();
        // Keep the cadence; when behind (a saturated bus, a stall), poll again as soon as the
        // bus is free instead of catching up on every missed cycle.
        slots[next].due = (due + every).max(now);

        match outcome {
            Ok(()) => {
                bus_failures = 0;
                if st.failures > 0 {
                    tracing::info!(bus = %bus.name, device = %st.device.name, failed_polls = st.failures, "device answers again");
                }
                st.failures = 0;
                set_online(st, true, &availability, &bus.name, &stats);
            }
            Err(BusError::Connect(e)) => {
                // The port or connection itself: back off the whole bus, not one device.
                bus_failures += 1;
                let backoff = backoff(bus_failures);
                if bus_failures == 1 {
                    tracing::warn!(bus = %bus.name, error = %e, "cannot open the bus; retrying with backoff (up to 60s)");
                } else {
                    tracing::debug!(bus = %bus.name, error = %e, ?backoff, "bus still unavailable");
                }
                for st in states.iter_mut() {
                    fail(st, &availability, &bus.name, &stats);
                }
                let until = now + backoff;
                for s in slots.iter_mut() {
                    s.due = s.due.max(until);
                }
            }
            Err(e) => {
                bus_failures = 0;
                let failures = fail(st, &availability, &bus.name, &stats);
                // One failed poll (a CRC error, one lost reply) is retried at the next cycle;
                // a device that keeps failing is backed off.
                let backoff = if failures >= 2 {
                    backoff(failures - 1)
                } else {
                    Duration::ZERO
                };
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
        if let Some(b) = stats.lock().expect("not poisoned").get_mut(&bus.name) {
            b.utilisation = (link.busy().as_secs_f64() / elapsed).min(1.0);
            b.line = link.line_faults();
        }
        if last_report.elapsed() >= Duration::from_secs(600) {
            last_report = Instant::now();
            if let Some(b) = stats.lock().expect("not poisoned").get(&bus.name) {
                tracing::info!(bus = %bus.name, requests = b.requests, errors = ?b.errors, utilisation = format!("{:.1}%", b.utilisation * 100.0), "bus figures");
            }
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
    health.forget(&task);
    tracing::debug!(bus = %bus.name, "polling stopped");
}

/// Writes a command's value, reads the point back, publishes the value read and replies.
async fn execute(link: &mut Link, states: &mut [DeviceState], cmd: Command, store: &StoreHandle) {
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
            if let Err(e) = store.enqueue(message::from_values(
                dev,
                now_ms(),
                vec![(cmd.point, v.clone())],
            )) {
                tracing::error!(error = %e, "cannot hand the read-back to the store");
            }
        }
        Err(e) => tracing::warn!(device = %dev.name, point = %p.name, error = %e, "command failed"),
    }
    let _ = cmd.reply.send(result);
}

/// Counts a failed poll; announces `offline` when the device reaches its threshold.
fn fail(st: &mut DeviceState, availability: &Availability, bus: &str, stats: &SharedStats) -> u32 {
    st.failures += 1;
    with_device(stats, bus, &st.device.name, |d| d.failed_polls += 1);
    if st.failures >= st.device.offline_after {
        set_online(st, false, availability, bus, stats);
    }
    st.failures
}

/// Records the device's availability; the uplink publishes it when it changes.
fn set_online(
    st: &DeviceState,
    online: bool,
    availability: &Availability,
    bus: &str,
    stats: &SharedStats,
) {
    with_device(stats, bus, &st.device.name, |d| {
        d.online = Some(online);
        if online {
            d.last_success_ms = Some(now_ms());
        }
    });
    if availability.set(&st.device.availability_topic, online) && !online {
        tracing::warn!(bus, device = %st.device.name, failed_polls = st.failures, "device is offline");
    }
}

fn with_device<R>(
    stats: &SharedStats,
    bus: &str,
    device: &str,
    f: impl FnOnce(&mut DeviceStats) -> R,
) -> R {
    let mut all = stats.lock().expect("not poisoned");
    let b = all.entry(bus.to_string()).or_default();
    f(b.devices.entry(device.to_string()).or_default())
}

fn count_error(stats: &SharedStats, bus: &str, kind: &'static str) {
    let mut all = stats.lock().expect("not poisoned");
    *all.entry(bus.to_string())
        .or_default()
        .errors
        .entry(kind)
        .or_default() += 1;
}

/// Exponential backoff: 1s, 2s, 4s … capped at 60s.
fn backoff(failures: u32) -> Duration {
    BACKOFF_MIN
        .saturating_mul(
            1u32.checked_shl(failures.saturating_sub(1).min(16))
                .unwrap_or(u32::MAX),
        )
        .min(BACKOFF_MAX)
}

/// Reads every request of one group, decodes the values and enqueues their messages. Values
/// read before a failure are still enqueued.
async fn poll_group(
    link: &mut Link,
    st: &mut DeviceState,
    g: usize,
    store: &StoreHandle,
    bus: &str,
    stats: &SharedStats,
) -> Result<(), BusError> {
    let ts = now_ms();
    let dev = &st.device;
    let mut values: Vec<(usize, Value)> = Vec::new();
    let mut failure = None;
    with_device(stats, bus, &dev.name, |d| d.polls += 1);
    for (r, req) in dev.groups[g].requests.iter().enumerate() {
        if st
            .refused
            .get(&(g, r))
            .is_some_and(|(_, until)| Instant::now() < *until)
        {
            continue;
        }
        stats
            .lock()
            .expect("not poisoned")
            .entry(bus.to_string())
            .or_default()
            .requests += 1;
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
                        with_device(stats, bus, &dev.name, |d| d.not_finite += 1);
                    }
                    values.push((i, v));
                }
            }
            Err(BusError::Exception(code)) => {
                count_error(stats, bus, "exception");
                with_device(stats, bus, &dev.name, |d| d.exceptions += 1);
                let every = dev.groups[g].every;
                let entry = st.refused.entry((g, r)).or_insert((0, Instant::now()));
                entry.0 += 1;
                // Retry refused requests less and less often: 2, 4, 8 … intervals, at most 5 min.
                let pause = every
                    .saturating_mul(1 << entry.0.min(16))
                    .min(REFUSED_MAX.max(every));
                entry.1 = Instant::now() + pause;
                if entry.0 == 1 {
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
                count_error(stats, bus, e.kind());
                if matches!(e, BusError::Timeout(_)) {
                    with_device(stats, bus, &dev.name, |d| d.timeouts += 1);
                }
                failure = Some(e);
                break;
            }
        }
    }
    let msgs = message::from_values(dev, ts, values);
    if let Err(e) = store.enqueue(msgs) {
        tracing::error!(error = %e, device = %dev.name, "cannot hand readings to the store");
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn availability_changes_are_versioned_and_repeats_ignored() {
        let a = Availability::default();
        assert!(a.set("t", true));
        assert!(!a.set("t", true));
        assert!(a.set("t", false));
        assert_eq!(a.snapshot(), vec![("t".to_string(), false, 2)]);
    }

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(4), Duration::from_secs(8));
        assert_eq!(backoff(7), Duration::from_secs(60));
        assert_eq!(backoff(1000), Duration::from_secs(60));
    }
}
