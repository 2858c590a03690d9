//! The queue's figures ([`Stats`]): what `fieldgate queue stats`, the status message, the page
//! and `/metrics` show of it, read from the file and the writer's own counts.

use rusqlite::OptionalExtension;
use serde::Serialize;

use super::sql::{meta_get, used_bytes};
use super::{Store, StoreError};

/// The queue's figures, for `fieldgate queue stats` and the status message.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    pub depth: u64,
    pub oldest_ts_ms: Option<i64>,
    /// How long the oldest row has been queued, by the monotonic clock (the writer's figure:
    /// immune to the wall clock stepping; None from a reader in another process).
    pub oldest_queued_s: Option<u64>,
    pub last_seq: u64,
    /// Bytes of the file in use (pages not on the freelist).
    pub bytes: u64,
    pub file_bytes: u64,
    pub dropped_oldest: u64,
    pub dropped_newest: u64,
    pub dropped_expired: u64,
    /// Readings held in memory while the disk refused them and still unsaved when the gateway
    /// stopped: they never had a seq, so no consumer sees a gap; counted here instead.
    pub dropped_unsaved: u64,
    /// Readings in pages of a corrupt file that did not read when it was replaced (at most
    /// that many: the keys passed over).
    pub dropped_corrupt: u64,
    /// Readings held in memory now, the disk refusing them (the store thread's figure; 0 from
    /// another process).
    pub held: u64,
    /// Why the disk refuses writes, while it does (the store thread's figure).
    pub write_error: Option<String>,
    /// Rows that could never be published, kept in the `aside` table.
    pub set_aside: u64,
    /// Rows in the `aside` table now, by reason (re-queued ones have left it).
    pub aside_by_reason: std::collections::BTreeMap<String, u64>,
    /// Times the wall clock was seen to step while readings were queued.
    pub clock_steps: u64,
    pub acked_total: u64,
    /// Acknowledged since the gateway that writes this file started.
    pub acked_since_start: u64,
    /// Durable commits (each one an fsync of the WAL) since this file was opened here.
    pub commits: u64,
}

impl Stats {
    pub fn dropped(&self) -> u64 {
        self.dropped_oldest
            + self.dropped_newest
            + self.dropped_expired
            + self.dropped_unsaved
            + self.dropped_corrupt
    }
}

impl Store {
    pub fn stats(&self) -> Result<Stats, StoreError> {
        let c = &self.conn;
        // The oldest by seq (what is published next), found on the primary key; the depth is
        // kept in memory by the writer. Only a reader in another process counts rows.
        let oldest: Option<(u64, i64)> = c
            .query_row(
                "SELECT seq, ts_ms FROM queue ORDER BY seq LIMIT 1",
                [],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
            )
            .optional()?;
        // The writer knows when each row entered, by the monotonic clock.
        let oldest_queued_s = oldest
            .filter(|_| !self.read_only)
            .and_then(|(seq, _)| self.ages.age_of(seq, std::time::Instant::now()))
            .map(|d| d.as_secs());
        let oldest = oldest.map(|(_, ts)| ts);
        let depth = if self.read_only {
            c.query_row("SELECT count(*) FROM queue", [], |r| r.get::<_, i64>(0))? as u64
        } else {
            self.depth
        };
        let pages: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0))?;
        // Acknowledged is acknowledged, whether its delete is committed yet or not.
        let acked = meta_get(c, "acked_total")? as u64 + self.pending_acks.len() as u64;
        Ok(Stats {
            depth,
            oldest_ts_ms: oldest,
            oldest_queued_s,
            last_seq: self.read_last_seq()?,
            bytes: used_bytes(c, self.page_size)?,
            file_bytes: pages as u64 * self.page_size,
            dropped_oldest: meta_get(c, "dropped_oldest")? as u64,
            dropped_newest: meta_get(c, "dropped_newest")? as u64,
            dropped_expired: meta_get(c, "dropped_expired")? as u64,
            dropped_unsaved: meta_get(c, "dropped_unsaved")? as u64,
            dropped_corrupt: meta_get(c, "dropped_corrupt")? as u64,
            held: 0,
            write_error: None,
            set_aside: meta_get(c, "set_aside")? as u64,
            aside_by_reason: {
                let mut q = c.prepare_cached(
                    "SELECT reason, count(*) FROM aside GROUP BY reason ORDER BY reason",
                )?;
                q.query_map([], |r| {
                    let reason: String = r.get(0)?;
                    let reason = if reason.is_empty() {
                        "unpublishable".to_string()
                    } else {
                        reason
                    };
                    Ok((reason, r.get::<_, i64>(1)? as u64))
                })?
                .collect::<Result<_, _>>()?
            },
            clock_steps: meta_get(c, "clock_steps")? as u64,
            acked_total: acked,
            acked_since_start: acked.saturating_sub(meta_get(c, "acked_at_start")? as u64),
            commits: self.commits,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::msg;
    use crate::message::{Message, now_ms};
    use crate::store::Store;

    /// #28 (10), found from outside: after NTP stepped the clock from 1970, `oldest_age_s` said
    /// 1 796 643 702 s. The writer's figure is the time queued, by the monotonic clock.
    #[test]
    fn the_oldest_rows_age_is_the_time_it_has_been_queued() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        let polled_in_1970 = Message {
            ts_ms: 1_000,
            ..msg(1)
        };
        s.append(&[polled_in_1970]).unwrap();
        let st = s.stats().unwrap();
        assert_eq!(st.oldest_queued_s, Some(0), "{st:?}");
        let figures = crate::status::QueueFigures::new(&st, now_ms());
        assert_eq!(figures.oldest_age_s, Some(0));
        // A reader in another process has only the wall clock.
        let other = Store::open_read_only(dir.path()).unwrap().stats().unwrap();
        assert_eq!(other.oldest_queued_s, None);
    }
}
