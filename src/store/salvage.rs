//! What can be saved from a corrupt queue file: every row that still reads, found by key
//! range around the pages that do not, copied into the new file with its seq and timestamp;
//! and a seq floor that survives the file ([`SeqFloor`], `queue.seq`), so a new file never
//! issues a seq a consumer has already seen.
//!
//! One bad page out of 735 used to abandon the whole backlog although 99.8 % of the rows
//! were readable (#28). A scan from a key descends to that key's leaf and reads on from there:
//! it fails only where it meets a bad page. So the copy scans forward and, where a scan fails,
//! looks for the next key a scan can start from (doubling the step, then halving back), and
//! counts the keys it had to pass as lost.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, params};

use super::sql::{meta_add, meta_get, meta_set, move_aside, read_last_seq};
use super::{Ages, Store, StoreError};
use crate::message::now_ms;

/// Rows read per scan.
const CHUNK: i64 = 512;

/// What [`salvage`] copied, and what it could not read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Salvaged {
    /// Rows copied, queue and `aside` table together.
    pub rows: u64,
    /// Queue keys passed over because the pages holding them do not read: at most that many
    /// readings lost (the queue's keys are nearly contiguous: acknowledgements take the
    /// oldest).
    pub lost: u64,
    /// The same for the `aside` table, whose keys are sparse: an upper bound only, logged.
    pub aside_lost: u64,
    /// The highest seq the old file shows (0: none readable).
    pub last_seq: u64,
}

/// Copies every readable row of the queue and the `aside` table of the file at `from` into
/// `into` (a new, empty queue file), keeping each row's seq.
pub fn salvage(from: &Path, into: &mut Connection) -> Salvaged {
    let Ok(old) = Connection::open_with_flags(from, OpenFlags::SQLITE_OPEN_READ_ONLY) else {
        return Salvaged::default();
    };
    let mut out = Salvaged {
        last_seq: read_last_seq(&old).unwrap_or(0),
        ..Salvaged::default()
    };
    for table in [Table::Queue, Table::Aside] {
        let (rows, lost, highest) = copy_table(&old, into, table);
        out.rows += rows;
        match table {
            Table::Queue => out.lost = lost,
            Table::Aside => out.aside_lost = lost,
        }
        out.last_seq = out.last_seq.max(highest);
    }
    copy_counters(&old, into);
    out
}

/// The old file's counters (acknowledged, dropped, set aside, clock steps), where they read:
/// the figures go on from where they were.
fn copy_counters(old: &Connection, into: &mut Connection) {
    let Ok(mut q) = old.prepare("SELECT key, value FROM meta") else {
        return;
    };
    let Ok(rows) = q.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))) else {
        return;
    };
    for (key, value) in rows.flatten() {
        if key == "clean_shutdown" || key == "acked_at_start" {
            continue;
        }
        let _ = into.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = value + excluded.value",
            params![key, value],
        );
    }
}

#[derive(Debug, Clone, Copy)]
enum Table {
    Queue,
    Aside,
}

impl Table {
    fn read(self) -> &'static str {
        match self {
            Table::Queue => {
                "SELECT seq, ts_ms, topic, qos, retain, body, '' FROM queue WHERE seq >= ?1 ORDER BY seq LIMIT ?2"
            }
            Table::Aside => {
                "SELECT seq, ts_ms, topic, qos, retain, body, reason FROM aside WHERE seq >= ?1 ORDER BY seq LIMIT ?2"
            }
        }
    }
    fn write(self) -> &'static str {
        match self {
            Table::Queue => {
                "INSERT OR IGNORE INTO queue (seq, ts_ms, topic, qos, retain, body) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
            }
            Table::Aside => {
                "INSERT OR IGNORE INTO aside (seq, ts_ms, topic, qos, retain, body, reason) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
            }
        }
    }
}

type Row = (i64, i64, String, i64, i64, String, String);

/// One scan from `from`: the rows it read, and whether it ended on a page that does not read.
fn scan(old: &Connection, table: Table, from: i64) -> (Vec<Row>, bool) {
    let Ok(mut stmt) = old.prepare_cached(table.read()) else {
        return (Vec::new(), true);
    };
    let Ok(rows) = stmt.query_map(params![from, CHUNK], |r| {
        Ok((
            r.get(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
            r.get(6)?,
        ))
    }) else {
        return (Vec::new(), true);
    };
    let mut got = Vec::new();
    for r in rows {
        match r {
            Ok(row) => got.push(row),
            Err(_) => return (got, true),
        }
    }
    (got, false)
}

/// Copies one table: (rows copied, keys passed over, highest seq seen).
fn copy_table(old: &Connection, into: &mut Connection, table: Table) -> (u64, u64, u64) {
    // The highest key issued; unknown (sqlite_sequence unreadable): search far ahead.
    let end = read_last_seq(old).unwrap_or(0) as i64;
    let bound = if end > 0 { end } else { i64::MAX / 4 };
    let (mut copied, mut lost, mut highest) = (0u64, 0u64, 0i64);
    let mut at = 1i64;
    loop {
        let (rows, failed) = scan(old, table, at);
        if let Some(last) = rows.last() {
            highest = highest.max(last.0);
            copied += insert(into, table, &rows);
            at = last.0 + 1;
        }
        if !failed {
            if rows.len() < CHUNK as usize {
                break;
            }
            continue;
        }
        if rows.is_empty() && at > bound.max(highest) {
            break;
        }
        // The scan from `at` meets a bad page: find the smallest start past it that scans.
        let Some(next) = next_readable(old, table, at, bound.max(highest)) else {
            // Nothing further reads; what lies between was the bad pages' (up to the end).
            lost += (end.max(highest) - at + 1).max(0) as u64;
            break;
        };
        lost += (next - at) as u64;
        at = next;
    }
    (copied, lost, highest.max(0) as u64)
}

/// Whether a scan from `from` reads at least its first row (or reads to the end cleanly).
fn starts(old: &Connection, table: Table, from: i64) -> bool {
    let (rows, failed) = scan(old, table, from);
    !rows.is_empty() || !failed
}

/// The smallest key after `at` from which a scan starts well, up to `end`; None: none.
fn next_readable(old: &Connection, table: Table, at: i64, end: i64) -> Option<i64> {
    // Doubling steps find a start that reads; halving back finds the first such.
    let mut step = 1i64;
    let mut good = None;
    while at + step <= end {
        if starts(old, table, at + step) {
            good = Some(at + step);
            break;
        }
        step *= 2;
    }
    let (mut bad, mut good) = (at + step / 2, good?);
    if step == 1 {
        return Some(good);
    }
    while good - bad > 1 {
        let mid = bad + (good - bad) / 2;
        if starts(old, table, mid) {
            good = mid;
        } else {
            bad = mid;
        }
    }
    Some(good)
}

fn insert(into: &mut Connection, table: Table, rows: &[Row]) -> u64 {
    let Ok(tx) = into.transaction() else { return 0 };
    let mut n = 0;
    {
        let Ok(mut stmt) = tx.prepare_cached(table.write()) else {
            return 0;
        };
        for (seq, ts, topic, qos, retain, body, reason) in rows {
            let done = match table {
                Table::Queue => stmt.execute(params![seq, ts, topic, qos, retain, body]),
                Table::Aside => stmt.execute(params![seq, ts, topic, qos, retain, body, reason]),
            };
            n += done.unwrap_or(0) as u64;
        }
    }
    if tx.commit().is_err() {
        return 0;
    }
    n
}

/// The seq floor kept beside the queue (`queue.seq`): a seq reserved ahead of the file's, so
/// that a new file — after corruption, a zero-byte or a deleted `queue.db` — starts above every
/// seq ever issued, whatever the clock says (it read 1970 before NTP on a Pi without a battery,
/// and a floor taken from the clock gave 1 512 seqs out again). Written once per
/// [`SeqFloor::AHEAD`] seqs: a small file, renamed into place and synced.
#[derive(Debug)]
pub struct SeqFloor {
    path: PathBuf,
    /// Seqs up to this are reserved.
    pub reserved: u64,
}

impl SeqFloor {
    /// Seqs reserved at a time.
    pub const AHEAD: u64 = 100_000;

    /// The floor beside `queue` (its `queue.seq`; 0 when there is none or it does not read).
    pub fn beside(queue: &Path) -> SeqFloor {
        let path = queue.with_file_name("queue.seq");
        let reserved = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        SeqFloor { path, reserved }
    }

    /// Reserves ahead of `last_seq` when it comes within half of [`AHEAD`](Self::AHEAD) of
    /// the reservation (best effort: a failure is retried at the next commit).
    /// Nothing is reserved before the first seq is issued: a floor then would make the next
    /// open of a queue never used look like one that vanished.
    pub fn keep_ahead_of(&mut self, last_seq: u64) {
        if last_seq == 0 || last_seq + Self::AHEAD / 2 <= self.reserved {
            return;
        }
        let reserved = last_seq + Self::AHEAD;
        let tmp = self.path.with_extension("seq.tmp");
        let written = (|| {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            writeln!(f, "{reserved}")?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            if let Some(dir) = self.path.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok::<_, std::io::Error>(())
        })();
        match written {
            Ok(()) => self.reserved = reserved,
            Err(e) => {
                tracing::debug!(error = %e, file = %self.path.display(), "queue: cannot reserve seqs ahead yet")
            }
        }
    }
}

/// Replacing a corrupt file: the new one filled with what the old one still reads.
impl Store {
    /// Fills this new, empty file with what reads of the corrupt one at `old` (see
    /// [`salvage`]), counts the rest as dropped (`corrupt`), and puts the next
    /// seq above every seq the old file, the floor (`queue.seq`) or the clock can show.
    pub(super) fn salvage_from(&mut self, old: &Path) -> Result<Salvaged, StoreError> {
        let saved = salvage(old, &mut self.conn);
        let reserved = SeqFloor::beside(&self.path).reserved;
        self.raise_seq(saved.last_seq.max(reserved).max(now_ms() as u64))?;
        let tx = self.conn.transaction()?;
        meta_add(&tx, "dropped_corrupt", saved.lost)?;
        // The old file's counters came along: "since start" counts from them.
        let acked = meta_get(&tx, "acked_total")?;
        meta_set(&tx, "acked_at_start", acked)?;
        tx.commit()?;
        self.depth = self
            .conn
            .query_row("SELECT count(*) FROM queue", [], |r| r.get::<_, i64>(0))?
            as u64;
        self.last_seq = self.read_last_seq()?;
        self.ages = Ages::default();
        self.ages
            .committed(self.last_seq, std::time::Instant::now());
        Ok(saved)
    }

    /// Replaces a file found corrupt while running: moved aside, a new one started with `seq`
    /// continuing. Returns how many rows the old file was believed to hold.
    pub(super) fn replace_corrupt(&mut self) -> Result<u64, StoreError> {
        let lost = self.depth;
        // Close the old connection first: closing it later would delete `queue.db-wal` and
        // `-shm` by name, by then the new file's (its commits would vanish at the next crash).
        let old = std::mem::replace(&mut self.conn, Connection::open_in_memory()?);
        if let Err((_, e)) = old.close() {
            tracing::warn!(error = %e, "closing the corrupt queue file");
        }
        let aside = move_aside(&self.path)?;
        self.pending_acks.clear();
        let mut fresh = Store::open_file(&self.path, self.limits)?;
        // The seqs this file issued count too (the old file may not show the last ones).
        fresh.raise_seq(self.last_seq)?;
        let saved = fresh.salvage_from(&aside)?;
        tracing::error!(file = %self.path.display(), moved_to = %aside.display(), rows_in_old_file = lost,
            salvaged = saved.rows, lost = saved.lost, aside_lost_at_most = saved.aside_lost,
            "QUEUE FILE BECAME CORRUPT: moved aside, the rows that still read copied into a new queue (the rest counted as dropped: corrupt)");
        fresh.floor = self.floor.take();
        if let Some(f) = &mut fresh.floor {
            f.keep_ahead_of(fresh.last_seq);
        }
        *self = fresh;
        Ok(lost)
    }
}

#[cfg(test)]
mod tests;
