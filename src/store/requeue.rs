//! The rows set aside (never publishable, or refused by the broker): listing them, and
//! putting them back in the queue, while the gateway runs or not.
//!
//! The running gateway's store thread owns the queue file and keeps its depth and last seq in
//! memory, so `fieldgate queue requeue` does not write the file behind its back: it leaves a
//! request (`requeue.request` in the state directory, holding the reason to match), and the
//! store thread, which looks once a second, carries it out and answers in `requeue.result`.
//! When no gateway takes the request within a few seconds, the command withdraws it and does
//! the work on the file itself.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::params;
use serde::Serialize;

use super::sql::{delete_pending, read_last_seq};
use super::{Store, StoreError};

/// A row in the `aside` table, for `fieldgate queue aside`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AsideRow {
    pub seq: u64,
    pub ts_ms: i64,
    pub topic: String,
    pub reason: String,
}

impl Store {
    /// The rows set aside, oldest first, at most `limit`; only those whose reason starts with
    /// `reason` when given.
    pub fn aside(&self, reason: Option<&str>, limit: usize) -> Result<Vec<AsideRow>, StoreError> {
        let mut q = self.conn.prepare(
            "SELECT seq, ts_ms, topic, reason FROM aside WHERE reason LIKE ?1 || '%' ORDER BY seq LIMIT ?2",
        )?;
        let rows = q
            .query_map(params![reason.unwrap_or(""), limit as i64], |r| {
                Ok(AsideRow {
                    seq: r.get::<_, i64>(0)? as u64,
                    ts_ms: r.get(1)?,
                    topic: r.get(2)?,
                    reason: r.get(3)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Puts the rows set aside (those whose reason starts with `reason`, or all) back in the
    /// queue, oldest first, under new seqs (after everything queued: nobody has received them,
    /// so no consumer holds the old seq) and with their original `ts`. Returns how many.
    pub fn requeue(&mut self, reason: Option<&str>) -> Result<u64, StoreError> {
        let tx = self.conn.transaction()?;
        let pattern = reason.unwrap_or("");
        let n = tx.execute(
            "INSERT INTO queue (ts_ms, topic, qos, retain, body) SELECT ts_ms, topic, qos, retain, body FROM aside WHERE reason LIKE ?1 || '%' ORDER BY seq",
            params![pattern],
        )? as u64;
        tx.execute(
            "DELETE FROM aside WHERE reason LIKE ?1 || '%'",
            params![pattern],
        )?;
        delete_pending(&tx, &self.pending_acks)?;
        let last_seq = read_last_seq(&tx)?;
        tx.commit()?;
        self.durable();
        self.depth += n;
        self.last_seq = last_seq;
        self.ages.committed(last_seq, std::time::Instant::now());
        Ok(n)
    }
}

const REQUEST: &str = "requeue.request";
const TAKEN: &str = "requeue.taken";
const RESULT: &str = "requeue.result";

/// How a re-queue was carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requeued {
    /// By the running gateway: `n` rows.
    ByGateway(u64),
    /// On the file, no gateway running: `n` rows.
    OnFile(u64),
}

/// Asks for the rows set aside whose reason starts with `reason` (all without one) to go back
/// in the queue of `dir`; waits up to `wait` for a running gateway to do it.
pub fn request(dir: &Path, reason: Option<&str>, wait: Duration) -> Result<Requeued, StoreError> {
    let io = |e: std::io::Error| StoreError::Requeue(e.to_string());
    let _ = std::fs::remove_file(dir.join(RESULT));
    let tmp = dir.join(format!("{REQUEST}.{}", std::process::id()));
    std::fs::write(&tmp, reason.unwrap_or("")).map_err(io)?;
    std::fs::rename(&tmp, dir.join(REQUEST)).map_err(io)?;
    let deadline = Instant::now() + wait;
    loop {
        if let Some(n) = result(dir) {
            return n.map(Requeued::ByGateway);
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Withdrawn before anyone took it: nobody will, do it here.
    match std::fs::remove_file(dir.join(REQUEST)) {
        Ok(()) => {
            let mut store = Store::open(dir)?;
            let n = store.requeue(reason)?;
            Ok(Requeued::OnFile(n))
        }
        // Taken meanwhile: the gateway is at it.
        Err(_) => {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Some(n) = result(dir) {
                    return n.map(Requeued::ByGateway);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(StoreError::Requeue(
                "the gateway took the request but did not answer within 10 s".into(),
            ))
        }
    }
}

/// The gateway's answer: the count, or its error.
fn result(dir: &Path) -> Option<Result<u64, StoreError>> {
    let text = std::fs::read_to_string(dir.join(RESULT)).ok()?;
    let _ = std::fs::remove_file(dir.join(RESULT));
    Some(
        text.trim()
            .parse()
            .map_err(|_| StoreError::Requeue(format!("the gateway: {}", text.trim()))),
    )
}

/// The store thread's side: carries out a pending request, if there is one, and answers it.
/// Returns how many rows went back in the queue.
pub(super) fn serve(store: &mut Store) -> Option<Result<u64, StoreError>> {
    let dir: PathBuf = store.path().parent()?.to_path_buf();
    let taken = dir.join(TAKEN);
    std::fs::rename(dir.join(REQUEST), &taken).ok()?;
    let reason = std::fs::read_to_string(&taken).unwrap_or_default();
    let _ = std::fs::remove_file(&taken);
    let reason = reason.trim();
    let done = store.requeue((!reason.is_empty()).then_some(reason));
    let answer = match &done {
        Ok(n) => n.to_string(),
        Err(e) => e.to_string(),
    };
    let tmp = dir.join(format!("{RESULT}.tmp"));
    if std::fs::write(&tmp, answer).is_ok() {
        let _ = std::fs::rename(&tmp, dir.join(RESULT));
    }
    Some(done)
}
