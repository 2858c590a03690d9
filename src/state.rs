//! What the running tasks share, and nothing else: the queue's handle, the figures of every bus
//! and device, device availability, liveness for the watchdog ([`Shared`]); and the command a
//! poller carries out for the uplink ([`Command`]).
//!
//! The pollers write here; the uplink, the status file and the metrics endpoint read. It sits
//! below all of them, so none of them imports another to reach it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::mapping::Value;
use crate::modbus::WriteData;
use crate::store::StoreHandle;
use crate::systemd::Health;

/// What every pipeline task shares: the queue, the figures, device availability, liveness.
#[derive(Clone)]
pub struct Shared {
    pub store: StoreHandle,
    pub stats: SharedStats,
    pub availability: Arc<Availability>,
    pub health: Arc<Health>,
    /// The gateway's id (for the status views).
    pub gateway_id: Arc<str>,
    /// The broker link, as the uplink last saw it.
    pub broker: Arc<Mutex<BrokerState>>,
    /// Keep each point's latest reading in the device figures (for the status page; off
    /// otherwise, so a reading costs nothing more when nobody looks).
    pub keep_values: bool,
}

impl Shared {
    /// What every task shares, around the queue's handle.
    pub fn new(store: StoreHandle, gateway_id: &str, keep_values: bool) -> Shared {
        Shared {
            store,
            stats: SharedStats::default(),
            availability: Arc::new(Availability::default()),
            health: Arc::new(Health::default()),
            gateway_id: gateway_id.into(),
            broker: Arc::default(),
            keep_values,
        }
    }
}

impl Shared {
    /// The latest value of each point of `device` and its poll time (kept only while
    /// `keep_values`).
    pub fn device_values(&self, device: &str) -> BTreeMap<String, (Value, i64)> {
        let stats = self.stats.lock().expect("not poisoned");
        stats
            .values()
            .find_map(|b| b.devices.get(device))
            .map(|d| {
                d.values
                    .iter()
                    .map(|(k, r)| (k.clone(), (r.value.clone(), r.ts_ms)))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The broker link as the status views show it.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BrokerState {
    pub connected: bool,
    /// Since when it is connected, or down (ms since the Unix epoch); None before the first try.
    /// Taken from [`since`](BrokerState::since) at each snapshot, so it follows a wall clock
    /// that stepped meanwhile (it kept a 1970 value after NTP's step).
    pub since_ms: Option<i64>,
    /// The same by the monotonic clock.
    #[serde(skip)]
    pub since: Option<std::time::Instant>,
    /// Why the last session ended or the last connect failed.
    pub last_error: Option<ErrorNote>,
    /// Packets from the broker larger than the gateway takes, read past and dropped.
    pub discarded_incoming: u64,
}

/// The last error of a bus, a device or the broker link: what, and when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorNote {
    pub message: String,
    pub at_ms: i64,
}

/// A point's latest reading, as the status page shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    pub value: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// Poll time, ms since the Unix epoch.
    pub ts_ms: i64,
    /// The point's poll interval: a reading older than a few of these is stale.
    pub every_ms: u64,
}

/// Figures of one device.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeviceStats {
    pub polls: u64,
    pub failed_polls: u64,
    pub timeouts: u64,
    pub exceptions: u64,
    /// Values that read as NaN or infinite (published as null).
    pub not_finite: u64,
    /// Values read but not published: unchanged within their deadband (`on_change`).
    pub unchanged: u64,
    /// None until the first poll decided it.
    pub online: Option<bool>,
    pub last_success_ms: Option<i64>,
    pub last_error: Option<ErrorNote>,
    /// Each point's latest reading, published or not (only with the status page on).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub values: BTreeMap<String, Reading>,
}

/// Figures of one bus, as the status message reports them.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BusStats {
    pub requests: u64,
    /// Lines read (serial line buses).
    pub lines: u64,
    /// Failed requests by kind: timeout, crc, exception, io, connect, protocol.
    pub errors: BTreeMap<Cow<'static, str>, u64>,
    /// Share of wall time with a transaction on the wire (RTU buses).
    pub utilisation: f64,
    /// CRC errors, noise, late replies and retries on the line (RTU).
    pub line: crate::bus::LineFaults,
    pub last_error: Option<ErrorNote>,
    pub devices: BTreeMap<String, DeviceStats>,
}

/// Every bus's figures, shared between the pollers and the uplink's status message.
pub type SharedStats = Arc<Mutex<BTreeMap<String, BusStats>>>;

/// Device availability: the pollers set it, the uplink publishes it (retained) when it changes
/// and again on every connect. It is state, not a reading: it does not go through the queue, so
/// it takes no `seq` and a stale `offline` is never replayed hours later.
#[derive(Debug)]
pub struct Availability {
    /// Topic → (online, version); the version grows with every change.
    states: Mutex<BTreeMap<String, (bool, u64)>>,
    /// Counts changes; every watcher (the uplink, the status file) sees each one.
    changes: tokio::sync::watch::Sender<u64>,
}

impl Default for Availability {
    fn default() -> Self {
        Availability {
            states: Mutex::default(),
            changes: tokio::sync::watch::channel(0).0,
        }
    }
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
        self.changes.send_modify(|n| *n += 1);
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

    /// A watch that wakes at every change (`changed().await`).
    pub fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

/// A command for a point: write it, read it back. The reply carries the value read back or
/// why it failed. Commands are never stored: they are carried out now or refused.
pub struct Command {
    pub device: String,
    pub point: usize,
    pub data: WriteData,
    pub reply: tokio::sync::oneshot::Sender<Result<Value, String>>,
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
}
