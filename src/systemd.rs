//! systemd integration: readiness, the watchdog fed only while the pipeline is alive, and
//! reload/stop notifications. Without systemd (no `NOTIFY_SOCKET`) every call is a no-op.
//!
//! Liveness: every long-running task (each bus poller, the uplink, the store thread) promises
//! in [`Health`] the time by which it will be back in its loop. The watchdog task pings systemd
//! only while every promise holds, so a wedged poller or uplink stops the pings and systemd
//! restarts the service (`WatchdogSec=`, `Restart=on-failure`).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

/// Each task's promise: the instant by which it will report again.
#[derive(Debug, Default)]
pub struct Health {
    tasks: Mutex<BTreeMap<String, Instant>>,
}

impl Health {
    /// `task` is alive and will report again before `until`.
    pub fn beat(&self, task: &str, until: Instant) {
        let mut tasks = self.tasks.lock().expect("not poisoned");
        // Called in hot loops: no allocation once the task is known.
        match tasks.get_mut(task) {
            Some(t) => *t = until,
            None => {
                tasks.insert(task.to_string(), until);
            }
        }
    }

    /// `task` ended on purpose (a reload or a shutdown): stop watching it.
    pub fn forget(&self, task: &str) {
        self.tasks.lock().expect("not poisoned").remove(task);
    }

    /// Tasks that missed their promise.
    pub fn stalled(&self, now: Instant) -> Vec<String> {
        self.tasks
            .lock()
            .expect("not poisoned")
            .iter()
            .filter(|(_, until)| **until < now)
            .map(|(t, _)| t.clone())
            .collect()
    }
}

fn notify(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::debug!(error = %e, "cannot notify systemd");
    }
}

/// The queue is open and every task runs.
pub fn ready() {
    notify(&[
        NotifyState::Ready,
        NotifyState::Status("polling and publishing"),
    ]);
}

/// Asks systemd for `more` time to start (a long check of the queue file is running).
pub fn extend_start(more: std::time::Duration) {
    let usec = u32::try_from(more.as_micros()).unwrap_or(u32::MAX);
    notify(&[
        NotifyState::ExtendTimeoutUsec(usec),
        NotifyState::Status("opening and checking the queue"),
    ]);
}

pub fn reloading() {
    notify(&[NotifyState::Reloading]);
}

pub fn stopping() {
    notify(&[NotifyState::Stopping]);
}

/// Feeds systemd's watchdog (at half its interval) while every task keeps its promise.
pub async fn watchdog(health: std::sync::Arc<Health>, cancel: CancellationToken) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let mut tick = tokio::time::interval(interval / 2);
    let mut reported = false;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let stalled = health.stalled(Instant::now());
        if stalled.is_empty() {
            notify(&[NotifyState::Watchdog]);
            reported = false;
        } else if !reported {
            tracing::error!(tasks = ?stalled, "pipeline stalled; no longer feeding the systemd watchdog");
            reported = true;
        }
    }
}

/// Slack added to every promise: scheduling jitter and slow disks are not a stall.
pub const SLACK: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_that_misses_its_promise_is_stalled_until_it_beats_again() {
        let h = Health::default();
        let t0 = Instant::now();
        h.beat("poller rs485", t0 + Duration::from_secs(5));
        h.beat("uplink", t0 + Duration::from_secs(60));
        assert!(h.stalled(t0).is_empty());
        assert_eq!(h.stalled(t0 + Duration::from_secs(6)), vec!["poller rs485"]);
        h.beat("poller rs485", t0 + Duration::from_secs(20));
        assert!(h.stalled(t0 + Duration::from_secs(6)).is_empty());
        h.forget("uplink");
        assert_eq!(
            h.stalled(t0 + Duration::from_secs(100)),
            vec!["poller rs485"],
            "a forgotten task is never stalled; the poller is, once past its promise"
        );
    }
}
