//! The gateway's figures in one place: uptime, the queue, and every bus and device. The same
//! snapshot goes to the retained `fieldgate/{gateway}/status/stats` message, to
//! `{state_dir}/status.json` (read by `fieldgate status`), and to the Prometheus endpoint.

use std::path::Path;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::message::{format_ts, now_ms};
use crate::state::Shared;
use crate::store::StoreError;

/// The retained statistics message: uptime and the queue's figures.
pub async fn snapshot(shared: &Shared, started: Instant) -> Result<serde_json::Value, StoreError> {
    let q = shared.store.stats().await?;
    let now = now_ms();
    let body = serde_json::json!({
        "ts": format_ts(now),
        "uptime_s": started.elapsed().as_secs(),
        "queue": {
            "depth": q.depth,
            "oldest_age_s": q.oldest_ts_ms.map(|t| (now - t).max(0) / 1000),
            "bytes": q.bytes,
            "file_bytes": q.file_bytes,
            "last_seq": q.last_seq,
            "dropped": {
                "oldest": q.dropped_oldest,
                "newest": q.dropped_newest,
                "expired": q.dropped_expired,
                "set_aside": q.set_aside,
                "clock_steps": q.clock_steps,
                "total": q.dropped(),
            },
            "acked_total": q.acked_total,
            "acked_since_start": q.acked_since_start,
        },
        "buses": *shared.stats.lock().expect("not poisoned"),
    });
    Ok(body)
}

/// The snapshot as bytes, for publishing.
pub async fn snapshot_json(shared: &Shared, started: Instant) -> Result<Vec<u8>, StoreError> {
    Ok(serde_json::to_vec(&snapshot(shared, started).await?).expect("json values serialize"))
}

/// Writes `{state_dir}/status.json` every `every` (write to a temporary file, then rename, so a
/// reader never sees half a file).
pub async fn write_periodically(
    shared: Shared,
    started: Instant,
    dir: std::path::PathBuf,
    every: Duration,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Ok(body) = snapshot_json(&shared, started).await else {
            continue;
        };
        if let Err(e) = write_atomically(&dir.join("status.json"), &body) {
            tracing::debug!(error = %e, "cannot write status.json");
        }
    }
}

fn write_atomically(path: &Path, body: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, body)?;
    std::fs::rename(&tmp, path)
}
