//! Polling: one task per bus decides which device is asked for what, and when.
//!
//! The task owns its bus's [`Link`], so requests on one bus never overlap. Each device's points
//! are grouped by interval (`config::PollGroup`); every group has its own schedule. A device
//! that fails (timeout, connection refused, broken link) is backed off exponentially, so the
//! other devices on the bus keep their schedule; a Modbus exception skips only the points of that
//! request. Errors are logged once per change of state and counted, never fatal. Values read are
//! turned into messages and handed to the store, which never makes the poller wait for the uplink.

use std::collections::HashSet;
use std::time::Duration;

use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use crate::bus::{BusError, Data, Link};
use crate::config::{Bus, Device};
use crate::mapping::Value;
use crate::message::{self, now_ms};
use crate::store::StoreHandle;

const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// Error counts of one device, by kind.
#[derive(Debug, Default, Clone)]
pub struct Counters {
    pub polls: u64,
    pub failed_polls: u64,
    pub exceptions: u64,
    pub timeouts: u64,
    pub transport_errors: u64,
}

struct DeviceState {
    device: Device,
    /// Consecutive failed polls; 0 while healthy.
    failures: u32,
    /// Requests (group, request index) whose exception has been logged already.
    refused: HashSet<(usize, usize)>,
    counters: Counters,
}

struct Slot {
    device: usize,
    group: usize,
    due: Instant,
}

/// Polls every device of `bus` until `cancel` fires.
pub async fn run(bus: Bus, devices: Vec<Device>, store: StoreHandle, cancel: CancellationToken) {
    let mut link = Link::new(&bus);
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
            refused: HashSet::new(),
            counters: Counters::default(),
        })
        .collect();
    if slots.is_empty() {
        cancel.cancelled().await;
        return;
    }
    tracing::info!(bus = %bus.name, devices = states.len(), "polling started");

    loop {
        let next = (0..slots.len())
            .min_by_key(|&i| slots[i].due)
            .expect("not empty");
        let due = slots[next].due;
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            _ = sleep_until(due) => {}
        }
        let (d, g) = (slots[next].device, slots[next].group);
        let st = &mut states[d];
        let every = st.device.groups[g].every;
        let result = poll_group(&mut link, st, g, &store).await;
        let now = Instant::now();
        // Keep the cadence; after a stall, skip the missed cycles rather than bursting.
        let mut due_next = due + every;
        if due_next <= now {
            due_next = now + every;
        }
        slots[next].due = due_next;

        match result {
            Ok(()) => {
                if st.failures > 0 {
                    tracing::info!(bus = %bus.name, device = %st.device.name, failed_polls = st.failures, "device answers again");
                    st.failures = 0;
                }
            }
            Err(e) => {
                st.failures += 1;
                st.counters.failed_polls += 1;
                match e {
                    BusError::Timeout(_) => st.counters.timeouts += 1,
                    _ => st.counters.transport_errors += 1,
                }
                let backoff = backoff(st.failures);
                if st.failures == 1 {
                    tracing::warn!(bus = %bus.name, device = %st.device.name, unit = st.device.unit, error = %e, kind = e.kind(),
                        "device poll failed; backing off, the other devices keep their schedule");
                } else {
                    tracing::debug!(bus = %bus.name, device = %st.device.name, error = %e, failures = st.failures, ?backoff, "device still failing");
                }
                let until = now + backoff;
                for s in slots.iter_mut().filter(|s| s.device == d) {
                    s.due = s.due.max(until);
                }
            }
        }
    }
    for st in &states {
        tracing::debug!(bus = %bus.name, device = %st.device.name, counters = ?st.counters, "polling stopped");
    }
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
/// read before a transport failure are still enqueued.
async fn poll_group(
    link: &mut Link,
    st: &mut DeviceState,
    g: usize,
    store: &StoreHandle,
) -> Result<(), BusError> {
    let ts = now_ms();
    let dev = &st.device;
    let mut values: Vec<(usize, Value)> = Vec::new();
    let mut failure = None;
    st.counters.polls += 1;
    for (r, req) in dev.groups[g].requests.iter().enumerate() {
        match link.read(dev.unit, req).await {
            Ok(data) => {
                st.refused.remove(&(g, r));
                for &i in &req.points {
                    let p = &dev.points[i];
                    let off = (p.source.address - req.start) as usize;
                    let v = match &data {
                        Data::Words(w) => p.decode_words(&w[off..off + p.width() as usize]),
                        Data::Bits(b) => p.decode_bit(b[off]),
                    };
                    values.push((i, v));
                }
            }
            Err(BusError::Exception(code)) => {
                st.counters.exceptions += 1;
                if st.refused.insert((g, r)) {
                    let names: Vec<&str> = req
                        .points
                        .iter()
                        .map(|&i| dev.points[i].name.as_str())
                        .collect();
                    tracing::warn!(device = %dev.name, unit = dev.unit, exception = ?code,
                        table = req.table.name(), start = req.start, count = req.count, points = %names.join(","),
                        "device refused a read (check the mapping); these points are skipped");
                }
            }
            Err(e) => {
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
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(4), Duration::from_secs(8));
        assert_eq!(backoff(7), Duration::from_secs(60));
        assert_eq!(backoff(1000), Duration::from_secs(60));
    }
}
