//! The queue's own clock for `max_age`: when rows entered the queue, by the monotonic clock.
//! Pure bookkeeping, no I/O; the store feeds it every commit and asks it at each expiry pass.

use std::time::{Duration, Instant};

/// When rows entered the queue, by the monotonic clock: `(highest seq, instant)` pairs, oldest
/// first, at most one per minute. All rows up to `seq` entered no later than `instant` (rows of
/// the last minute are dated its end, so a row expires up to a minute late, never early). Rows
/// found at open are dated the open. So `max_age` is time spent in this queue while a gateway
/// ran, immune to wall-clock steps (a Pi without a real-time clock starts with a wrong time,
/// then NTP steps it): no reading is dropped because the clock jumped.
#[derive(Debug, Default)]
pub(super) struct Ages {
    /// `(highest seq, entered by, minute began, highest seq of the minute's first commit)`.
    pub(super) marks: std::collections::VecDeque<(u64, Instant, Instant, u64)>,
}

impl Ages {
    const GRAIN: Duration = Duration::from_secs(60);

    pub(super) fn committed(&mut self, last_seq: u64, now: Instant) {
        match self.marks.back_mut() {
            // Within the same minute: its rows are all dated the latest commit.
            Some((seq, at, began, _)) if now.saturating_duration_since(*began) < Ages::GRAIN => {
                *seq = last_seq;
                *at = now;
            }
            _ => self.marks.push_back((last_seq, now, now, last_seq)),
        }
    }

    /// When row `seq` entered the queue, about: within its minute, between the minute's first
    /// and last commit in proportion to its seq (rows arrive at the pace of the polls); None:
    /// not known here (a row older than every mark). For figures and MQTT 5 expiry; `max_age`
    /// goes by [`expired`](Ages::expired), which dates rows late, never early.
    pub(super) fn entered(&self, seq: u64) -> Option<Instant> {
        let i = self.marks.partition_point(|(upto, ..)| *upto < seq);
        let &(upto, at, began, first) = self.marks.get(i)?;
        if seq <= first || upto <= first {
            return Some(began);
        }
        let share = (seq - first) as f64 / (upto - first) as f64;
        Some(began + at.saturating_duration_since(began).mul_f64(share))
    }

    /// When the oldest of the rows from `seq` on had entered the queue by.
    pub(super) fn age_of(&self, seq: u64, now: Instant) -> Option<Duration> {
        self.entered(seq)
            .map(|at| now.saturating_duration_since(at))
    }

    /// The highest seq that has been queued for longer than `max_age`, if any.
    pub(super) fn expired(&mut self, max_age: Duration, now: Instant) -> Option<u64> {
        let mut upto = None;
        while let Some((seq, at, ..)) = self.marks.front() {
            if now.saturating_duration_since(*at) <= max_age {
                break;
            }
            upto = Some(*seq);
            self.marks.pop_front();
        }
        upto
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_ages_are_kept_per_minute_and_date_rows_late_not_early() {
        let mut a = Ages::default();
        let t0 = Instant::now();
        a.committed(10, t0);
        a.committed(20, t0 + Duration::from_secs(30));
        a.committed(30, t0 + Duration::from_secs(61));
        assert_eq!(a.marks.len(), 2, "{:?}", a.marks);
        let max_age = Duration::from_secs(100);
        // Rows 1..=10 entered at t0, but share the minute with 11..=20 (t0+30 s): dated t0+30.
        assert_eq!(a.expired(max_age, t0 + Duration::from_secs(101)), None);
        assert_eq!(a.expired(max_age, t0 + Duration::from_secs(131)), Some(20));
        assert_eq!(a.expired(max_age, t0 + Duration::from_secs(162)), Some(30));
        assert!(a.marks.is_empty());
    }

    #[test]
    fn a_rows_entry_is_placed_within_its_minute_by_its_seq() {
        let mut a = Ages::default();
        let t0 = Instant::now();
        a.committed(10, t0);
        a.committed(20, t0 + Duration::from_secs(10));
        a.committed(30, t0 + Duration::from_secs(20));
        assert_eq!(a.entered(5), Some(t0));
        assert_eq!(a.entered(20), Some(t0 + Duration::from_secs(10)));
        assert_eq!(a.entered(30), Some(t0 + Duration::from_secs(20)));
        assert_eq!(a.entered(31), None);
    }
}
