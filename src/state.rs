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
