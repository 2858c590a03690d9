//! The one exponential backoff every retry loop uses: a device that keeps failing, a port or
//! bus that cannot be opened, a queue that cannot be opened, a broker that cannot be reached,
//! a read the device refuses. Pure arithmetic; the caller decides when to sleep.

use std::time::Duration;

/// Waits that double from `first` up to `max`: after `n` failures in a row the wait is
/// `first × 2^(n-1)`, capped; no failure, no wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

impl Backoff {
    /// 1 s, 2 s, 4 s … at most 60 s: devices, buses, the queue.
    pub const DEVICE: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));

    pub const fn new(first: Duration, max: Duration) -> Backoff {
        Backoff { first, max }
    }

    /// The wait after `failures` failures in a row.
    pub fn after(&self, failures: u32) -> Duration {
        if failures == 0 {
            return Duration::ZERO;
        }
        let factor = 1u32.checked_shl((failures - 1).min(20)).unwrap_or(u32::MAX);
        self.first
            .saturating_mul(factor)
            .min(self.max.max(self.first))
    }
}

/// A backoff with its count of failures in a row, for a loop that retries one thing.
#[derive(Debug, Clone)]
pub struct Retry {
    backoff: Backoff,
    failures: u32,
}

impl Retry {
    pub fn new(backoff: Backoff) -> Retry {
        Retry {
            backoff,
            failures: 0,
        }
    }

    /// Counts a failure; returns how long to wait before the next attempt.
    pub fn failed(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.backoff.after(self.failures)
    }

    /// Failures in a row so far (0 after a success).
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Forgets the failures; returns how many there were.
    pub fn succeeded(&mut self) -> u32 {
        std::mem::take(&mut self.failures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_from_the_first_and_stop_at_the_cap() {
        let b = Backoff::DEVICE;
        assert_eq!(b.after(0), Duration::ZERO);
        assert_eq!(b.after(1), Duration::from_secs(1));
        assert_eq!(b.after(2), Duration::from_secs(2));
        assert_eq!(b.after(4), Duration::from_secs(8));
        assert_eq!(b.after(7), Duration::from_secs(60));
        assert_eq!(b.after(u32::MAX), Duration::from_secs(60));
    }

    #[test]
    fn a_first_wait_above_the_cap_is_kept() {
        // A refused read polled every 10 min is not retried more often than it is polled.
        let b = Backoff::new(Duration::from_secs(600), Duration::from_secs(300));
        assert_eq!(b.after(3), Duration::from_secs(600));
    }

    #[test]
    fn a_retry_counts_failures_until_a_success() {
        let mut r = Retry::new(Backoff::DEVICE);
        assert_eq!(r.failed(), Duration::from_secs(1));
        assert_eq!(r.failed(), Duration::from_secs(2));
        assert_eq!(r.failures(), 2);
        assert_eq!(r.succeeded(), 2);
        assert_eq!(r.failed(), Duration::from_secs(1));
    }
}
