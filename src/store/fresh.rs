//! Rows just committed, handed to the uplink in memory.
//!
//! An uplink that is caught up has read every row before the ones the store thread has just
//! committed; reading those back from the file would cost a round trip to the store thread, a
//! query and a JSON parse per row, for rows the store thread had in its hands a moment ago. So
//! after each commit the store thread puts the committed rows (with their `seq`) here, and the
//! uplink takes them from here when it has read everything before them. Otherwise (a new
//! session, a backlog, a replaced file, rows queued again) it reads the file, as always.
//!
//! A row taken from here is in the file exactly like one read by `peek`: it leaves the queue
//! only when the broker acknowledges it. What is kept here is bounded by [`FRESH_MAX`]: rows
//! nobody takes (the uplink is away or behind) are let go at that bound, and kept no more until
//! the uplink asks again.

use std::collections::VecDeque;
use std::sync::Mutex;

use crate::message::{Message, Stored};

/// Most rows kept for the uplink (about 200 bytes each).
pub const FRESH_MAX: usize = 2048;

/// See the module docs. Shared by the store thread (adds) and the uplink (takes).
#[derive(Debug)]
pub struct Fresh {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Every row of the queue with `from < seq <= to` is in `rows` or was taken.
    from: u64,
    to: u64,
    rows: VecDeque<Stored>,
    /// Someone took rows since the last time they were let go: worth keeping new ones.
    wanted: bool,
}

/// What one read of the queue gave: rows, and how far the reader has now read.
#[derive(Debug, Default)]
pub struct Batch {
    pub rows: Vec<Stored>,
    /// Every row with `seq <= upto` has been read: the reader's next `after`.
    pub upto: u64,
}

impl Fresh {
    /// Nothing kept; `last_seq` is the highest seq in the file.
    pub fn new(last_seq: u64) -> Fresh {
        Fresh {
            inner: Mutex::new(Inner {
                from: last_seq,
                to: last_seq,
                rows: VecDeque::new(),
                wanted: false,
            }),
        }
    }

    /// The store thread committed `messages`, which got the seqs up to `last_seq` (consecutive,
    /// oldest first). Kept if the uplink is taking from here and there is room; otherwise
    /// everything kept is let go and the uplink reads the file until it has caught up.
    pub fn committed(&self, messages: impl ExactSizeIterator<Item = Message>, last_seq: u64) {
        let mut i = self.lock();
        let first = last_seq + 1 - messages.len() as u64;
        if i.wanted && first == i.to + 1 && i.rows.len() + messages.len() <= FRESH_MAX {
            let now = std::time::Instant::now();
            let rows = messages.zip(first..).map(|(message, seq)| Stored {
                seq,
                message,
                queued: Some(now),
            });
            i.rows.extend(rows);
            i.to = last_seq;
        } else {
            i.let_go(last_seq);
        }
    }

    /// Rows entered the file some other way (queued again, a new file): read it.
    pub fn reset(&self, last_seq: u64) {
        self.lock().let_go(last_seq);
    }

    /// A reader starts over (a new uplink session): the rows the last one took and left
    /// unacknowledged are in the file, not here, so it reads the file until it has caught up.
    pub fn restart(&self) {
        let mut i = self.lock();
        let to = i.to;
        i.let_go(to);
    }

    /// Up to `limit` rows with `seq > after`, if this holds all of them; `None`: read the file.
    pub fn take(&self, after: u64, limit: usize) -> Option<Batch> {
        let mut i = self.lock();
        if after < i.from || after > i.to {
            return None;
        }
        while i.rows.front().is_some_and(|r| r.seq <= after) {
            i.rows.pop_front();
        }
        let n = limit.min(i.rows.len());
        let rows: Vec<Stored> = i.rows.drain(..n).collect();
        i.wanted = true;
        let upto = match i.rows.front() {
            Some(_) => rows.last().map_or(after, |r| r.seq),
            None => i.to,
        };
        Some(Batch { rows, upto })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Plain data, consistent after every statement: a panic elsewhere leaves it usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Inner {
    fn let_go(&mut self, last_seq: u64) {
        self.from = last_seq;
        self.to = last_seq;
        // A new deque: the memory of a full one is given back, not kept for later.
        self.rows = VecDeque::new();
        self.wanted = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Body;

    /// Messages for the rows `seqs` (each names its seq in its topic).
    fn rows(seqs: std::ops::RangeInclusive<u64>) -> Vec<Message> {
        seqs.map(|seq| Message {
            topic: format!("t/{seq}"),
            qos: 1,
            retain: false,
            ts_ms: seq as i64,
            body: Body::Bare {
                value: crate::mapping::Value::Int(seq as i64),
            },
        })
        .collect()
    }

    fn seqs(b: &Batch) -> Vec<u64> {
        for r in &b.rows {
            assert_eq!(
                r.message.topic,
                format!("t/{}", r.seq),
                "each message has its seq"
            );
        }
        b.rows.iter().map(|r| r.seq).collect()
    }

    #[test]
    fn a_reader_behind_the_rows_kept_reads_the_file() {
        let f = Fresh::new(10);
        assert!(f.take(5, 100).is_none(), "rows 6..=10 are only in the file");
        let b = f.take(10, 100).expect("caught up");
        assert!(b.rows.is_empty());
        assert_eq!(b.upto, 10);
    }

    #[test]
    fn rows_are_kept_only_once_a_caught_up_reader_takes_from_here() {
        let f = Fresh::new(10);
        f.committed(rows(11..=12).into_iter(), 12);
        assert!(
            f.take(10, 100).is_none(),
            "nobody was taking: let go, read the file"
        );
        assert_eq!(f.take(12, 100).unwrap().upto, 12);
        f.committed(rows(13..=15).into_iter(), 15);
        let b = f.take(12, 2).unwrap();
        assert_eq!(seqs(&b), [13, 14]);
        assert_eq!(b.upto, 14);
        let b = f.take(14, 2).unwrap();
        assert_eq!(seqs(&b), [15]);
        assert_eq!(b.upto, 15);
        let b = f.take(15, 2).unwrap();
        assert!(b.rows.is_empty());
        assert_eq!(b.upto, 15);
    }

    #[test]
    fn rows_already_read_from_the_file_are_not_handed_out_twice() {
        let f = Fresh::new(0);
        f.take(0, 10).unwrap();
        f.committed(rows(1..=5).into_iter(), 5);
        // A new session read 1..=3 from the file meanwhile.
        let b = f.take(3, 10).unwrap();
        assert_eq!(seqs(&b), [4, 5]);
    }

    #[test]
    fn a_gap_in_seq_or_a_reset_sends_the_reader_to_the_file() {
        let f = Fresh::new(0);
        f.take(0, 10).unwrap();
        f.committed(rows(1..=2).into_iter(), 2);
        // Rows 3..=4 entered the file another way (queued again); 5 is the next commit.
        f.committed(rows(5..=5).into_iter(), 5);
        assert!(f.take(0, 10).is_none());
        assert!(f.take(2, 10).is_none());
        f.take(5, 10).unwrap();
        f.committed(rows(6..=6).into_iter(), 6);
        f.reset(9);
        assert!(f.take(6, 10).is_none(), "7..=9 are in the file only");
        assert!(f.take(9, 10).unwrap().rows.is_empty());
    }

    #[test]
    fn a_reader_starting_over_reads_the_file_for_what_the_last_one_took() {
        let f = Fresh::new(0);
        f.take(0, 10).unwrap();
        f.committed(rows(1..=3).into_iter(), 3);
        assert_eq!(seqs(&f.take(0, 2).unwrap()), [1, 2]);
        // The session ends with 1 and 2 unacknowledged; the next one starts from 0.
        f.restart();
        assert!(f.take(0, 10).is_none(), "1..=3 are read from the file");
        assert!(f.take(3, 10).unwrap().rows.is_empty());
    }

    #[test]
    fn what_nobody_takes_is_let_go_at_the_bound() {
        let f = Fresh::new(0);
        f.take(0, 10).unwrap();
        let n = FRESH_MAX as u64;
        f.committed(rows(1..=n).into_iter(), n);
        f.committed(rows(n + 1..=n + 1).into_iter(), n + 1);
        assert!(
            f.take(0, 10).is_none(),
            "let go: the reader must read the file"
        );
        assert!(f.lock().rows.is_empty());
        f.committed(rows(n + 2..=n + 2).into_iter(), n + 2);
        assert!(
            f.lock().rows.is_empty(),
            "not wanted until someone takes again"
        );
    }
}
