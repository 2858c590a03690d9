//! Re-queueing the rows set aside, while the gateway runs or not.
//!
//! The running gateway's store thread owns the queue file and keeps its depth and last seq in
//! memory, so `fieldgate queue requeue` does not write the file behind its back: it leaves a
//! request (`requeue.request` in the state directory, holding the reason to match), and the
//! store thread, which looks once a second, carries it out and answers in `requeue.result`.
//! When no gateway takes the request within a few seconds, the command withdraws it and does
//! the work on the file itself.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{Store, StoreError};

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
