//! The gateway's figures in one typed [`Snapshot`]: uptime, the queue, and every bus and device.
//! The same snapshot is the retained `fieldgate/{gateway}/status/stats` message, the file
//! `{state_dir}/status.json` (read back by `fieldgate status`), and the source of the
//! Prometheus endpoint: one shape, written once, read with the same type everywhere.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::message::{format_ts, now_ms};
use crate::state::{BusStats, Shared};
use crate::store::{Stats, StoreError};

/// Everything the status views show, at one moment.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Snapshot {
    /// When it was taken (RFC 3339, UTC).
    pub ts: String,
    pub uptime_s: u64,
    pub gateway: GatewayFigures,
    pub queue: QueueFigures,
    pub buses: BTreeMap<String, BusStats>,
}

/// The gateway itself: which one, which version, and its broker link.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GatewayFigures {
    pub id: String,
    pub version: String,
    pub broker: crate::state::BrokerState,
}

/// The queue's figures as the status views show them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct QueueFigures {
    pub depth: u64,
    /// Age of the oldest queued reading; None when the queue is empty.
    pub oldest_age_s: Option<i64>,
    pub bytes: u64,
    pub file_bytes: u64,
    pub last_seq: u64,
    pub dropped: Dropped,
    pub acked_total: u64,
    pub acked_since_start: u64,
    /// Durable commits (fsyncs) of the queue since the gateway started.
    pub commits: u64,
    /// Readings held in memory because the disk refuses them (they have no seq yet).
    pub held: u64,
    /// Why the disk refuses writes, while it does; None while writes work.
    pub write_error: Option<String>,
}

/// Readings that left the queue without being delivered, by reason.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Dropped {
    pub oldest: u64,
    pub newest: u64,
    pub expired: u64,
    /// Held in memory while the disk refused them and still unsaved at a stop.
    pub unsaved: u64,
    /// In pages of a corrupt queue file that did not read (the rest was copied over).
    pub corrupt: u64,
    /// Not dropped: kept in the `aside` table because they can never be published (or the
    /// broker refused them).
    pub set_aside: u64,
    /// What the `aside` table holds now, by reason.
    pub aside_by_reason: std::collections::BTreeMap<String, u64>,
    /// Not readings: times the wall clock stepped while readings were queued.
    pub clock_steps: u64,
    /// oldest + newest + expired + unsaved + corrupt.
    pub total: u64,
}

impl QueueFigures {
    pub fn new(q: &Stats, now_ms: i64) -> QueueFigures {
        QueueFigures {
            depth: q.depth,
            // By the monotonic clock where the queue knows it: after NTP stepped the clock from
            // 1970 the wall-clock age of a reading polled before read 1 796 643 702 s.
            oldest_age_s: q
                .oldest_queued_s
                .map(|s| s as i64)
                .or_else(|| q.oldest_ts_ms.map(|t| (now_ms - t).max(0) / 1000)),
            bytes: q.bytes,
            file_bytes: q.file_bytes,
            last_seq: q.last_seq,
            dropped: Dropped {
                oldest: q.dropped_oldest,
                newest: q.dropped_newest,
                expired: q.dropped_expired,
                unsaved: q.dropped_unsaved,
                corrupt: q.dropped_corrupt,
                set_aside: q.set_aside,
                aside_by_reason: q.aside_by_reason.clone(),
                clock_steps: q.clock_steps,
                total: q.dropped(),
            },
            acked_total: q.acked_total,
            acked_since_start: q.acked_since_start,
            commits: q.commits,
            held: q.held,
            write_error: q.write_error.clone(),
        }
    }
}

impl Snapshot {
    /// Takes the snapshot of a running gateway.
    pub async fn take(shared: &Shared, started: Instant) -> Result<Snapshot, StoreError> {
        let q = shared.store.stats().await?;
        let now = now_ms();
        Ok(Snapshot {
            ts: format_ts(now),
            uptime_s: started.elapsed().as_secs(),
            gateway: GatewayFigures {
                id: shared.gateway_id.to_string(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                broker: {
                    let mut b = shared.broker.lock().expect("not poisoned").clone();
                    if let Some(at) = b.since {
                        b.since_ms = Some(now - at.elapsed().as_millis() as i64);
                    }
                    b
                },
            },
            queue: QueueFigures::new(&q, now),
            buses: shared.stats.lock().expect("not poisoned").clone(),
        })
    }

    /// The snapshot as JSON bytes (`status.json`, the status page's API).
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("plain data serializes")
    }

    /// The retained status message: the snapshot without the points' latest readings (they
    /// are published as readings already; this message goes over the uplink every interval).
    pub fn for_broker(mut self) -> Vec<u8> {
        for b in self.buses.values_mut() {
            for d in b.devices.values_mut() {
                d.values.clear();
            }
        }
        self.to_json()
    }

    /// Reads `status.json` back.
    pub fn from_json(bytes: &[u8]) -> serde_json::Result<Snapshot> {
        serde_json::from_slice(bytes)
    }
}

/// Writes `{state_dir}/status.json` at start, every `every`, whenever a device's availability
/// changes, and once more at the stop (the last figures, for `fieldgate status` after it); to
/// a temporary file, then renamed, so a reader never sees half a file.
pub async fn write_periodically(
    shared: Shared,
    started: Instant,
    dir: PathBuf,
    every: Duration,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    let mut availability = shared.availability.watch();
    loop {
        // At start, every `every`, and at once when a device goes online or offline: the first
        // poll's result shows within moments, not after a whole interval.
        let last = tokio::select! {
            _ = cancel.cancelled() => true,
            _ = tick.tick() => false,
            _ = availability.changed() => false,
        };
        // At the stop the store may be closing: the last snapshot is best effort, bounded.
        let taken = tokio::time::timeout(Duration::from_secs(1), Snapshot::take(&shared, started));
        if let Ok(Ok(snapshot)) = taken.await
            && let Err(e) = write_atomically(&dir.join("status.json"), &snapshot.to_json())
        {
            tracing::debug!(error = %e, "cannot write status.json");
        }
        if last {
            return;
        }
    }
}

fn write_atomically(path: &Path, body: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, body)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// #28 (10): `broker.since_ms` kept its 1970 value after NTP stepped the clock, so the page
    /// said "connected for 56 years". It follows the monotonic clock.
    #[tokio::test]
    async fn the_brokers_since_follows_the_monotonic_clock() {
        let dir = tempfile::tempdir().unwrap();
        let (store, join) =
            crate::store::spawn(crate::store::Store::open(dir.path()).unwrap()).unwrap();
        let shared = Shared::new(store, "gw", false);
        {
            let mut b = shared.broker.lock().unwrap();
            b.connected = true;
            b.since_ms = Some(1_000); // stamped before the step
            b.since = Instant::now().checked_sub(Duration::from_secs(5));
        }
        let s = Snapshot::take(&shared, Instant::now()).await.unwrap();
        let since = s.gateway.broker.since_ms.unwrap();
        let ago = now_ms() - since;
        assert!((5_000..6_000).contains(&ago), "{ago} ms");
        drop((s, shared));
        tokio::task::spawn_blocking(move || join.join().unwrap())
            .await
            .unwrap();
    }

    #[test]
    fn a_snapshot_reads_back_as_written() {
        let mut s = Snapshot {
            ts: "2026-11-26T04:00:00.000Z".into(),
            uptime_s: 42,
            ..Snapshot::default()
        };
        s.queue.depth = 3;
        s.queue.oldest_age_s = Some(7);
        let mut bus = BusStats::default();
        bus.errors.insert("timeout".into(), 2);
        bus.devices.entry("meter".into()).or_default().online = Some(true);
        s.buses.insert("rs485".into(), bus);
        assert_eq!(Snapshot::from_json(&s.to_json()).unwrap(), s);
    }

    #[test]
    fn the_status_message_keeps_its_field_names() {
        let s = Snapshot::default();
        let v: serde_json::Value = serde_json::from_slice(&s.to_json()).unwrap();
        for path in [
            "/ts",
            "/uptime_s",
            "/queue/depth",
            "/queue/oldest_age_s",
            "/queue/bytes",
            "/queue/file_bytes",
            "/queue/last_seq",
            "/queue/dropped/oldest",
            "/queue/dropped/newest",
            "/queue/dropped/expired",
            "/queue/dropped/set_aside",
            "/queue/dropped/clock_steps",
            "/queue/dropped/total",
            "/queue/acked_total",
            "/queue/acked_since_start",
            "/buses",
        ] {
            assert!(v.pointer(path).is_some(), "{path} missing from {v}");
        }
    }
}
