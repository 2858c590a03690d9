//! The small SQL helpers of the queue file: counters in `meta`, the last `seq`, the bytes in
//! use, the deletes that bounds and acknowledgements make, and moving a corrupt file aside.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};

use super::StoreError;
use crate::message::now_ms;

pub(super) fn read_last_seq(c: &Connection) -> rusqlite::Result<u64> {
    // Cached: run at every commit.
    let seq: Option<i64> = c
        .prepare_cached("SELECT seq FROM sqlite_sequence WHERE name = 'queue'")?
        .query_row([], |r| r.get(0))
        .optional()?;
    Ok(seq.unwrap_or(0) as u64)
}

/// Bytes the rows take in the file (pages in use). Asked once per append: the two statements
/// are prepared once (a `PRAGMA` statement reads the count when it runs, not when prepared).
pub(super) fn used_bytes(c: &Connection, page_size: u64) -> rusqlite::Result<u64> {
    let pages: i64 = c
        .prepare_cached("PRAGMA page_count")?
        .query_row([], |r| r.get(0))?;
    let free: i64 = c
        .prepare_cached("PRAGMA freelist_count")?
        .query_row([], |r| r.get(0))?;
    Ok((pages - free).max(0) as u64 * page_size)
}

/// Deletes the `n` oldest rows, sparing those up to `spare` (in flight at the uplink: they are
/// probably delivered already, and dropping them would count a delivered reading as dropped)
/// unless nothing older than the batch being added (`seq <= newest_old`) is left; returns how
/// many were deleted.
pub(super) fn delete_oldest(
    c: &Connection,
    n: u64,
    spare: u64,
    newest_old: u64,
) -> rusqlite::Result<u64> {
    let beyond = c.execute(
        "DELETE FROM queue WHERE seq IN (SELECT seq FROM queue WHERE seq > ?2 AND seq <= ?3 ORDER BY seq LIMIT ?1)",
        params![n as i64, spare as i64, newest_old as i64],
    )? as u64;
    if beyond == n {
        return Ok(n);
    }
    Ok(beyond
        + c.execute(
            "DELETE FROM queue WHERE seq IN (SELECT seq FROM queue ORDER BY seq LIMIT ?1)",
            params![(n - beyond) as i64],
        )? as u64)
}

/// Deletes the acknowledged rows `pending` inside the transaction on `c` and counts them.
pub(super) fn delete_pending(c: &Connection, pending: &HashSet<u64>) -> rusqlite::Result<()> {
    if pending.is_empty() {
        return Ok(());
    }
    let mut n = 0u64;
    // Acknowledgements come in runs of consecutive seqs: one statement per run, not per row.
    let mut stmt = c.prepare_cached("DELETE FROM queue WHERE seq BETWEEN ?1 AND ?2")?;
    let mut seqs: Vec<u64> = pending.iter().copied().collect();
    seqs.sort_unstable();
    for (first, last) in runs(&seqs) {
        n += stmt.execute(params![first as i64, last as i64])? as u64;
    }
    meta_add(c, "acked_total", n)
}

/// The runs of consecutive values in `sorted` (ascending, no repeats), as (first, last).
pub(super) fn runs(sorted: &[u64]) -> impl Iterator<Item = (u64, u64)> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        let first = *sorted.get(i)?;
        let mut last = first;
        i += 1;
        while sorted.get(i) == Some(&(last + 1)) {
            last += 1;
            i += 1;
        }
        Some((first, last))
    })
}

pub(super) fn meta_get(c: &Connection, key: &str) -> rusqlite::Result<i64> {
    Ok(
        c.query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| {
            r.get(0)
        })
        .optional()?
        .unwrap_or(0),
    )
}

pub(super) fn meta_set(c: &Connection, key: &str, value: i64) -> rusqlite::Result<()> {
    c.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        params![key, value],
    )?;
    Ok(())
}

pub(super) fn meta_add(c: &Connection, key: &str, n: u64) -> rusqlite::Result<()> {
    if n > 0 {
        c.prepare_cached(
            "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = value + excluded.value",
        )?
        .execute(params![key, n as i64])?;
    }
    Ok(())
}

/// Renames `queue.db` (and its `-wal`, `-shm`) to `queue.db.corrupt-<unix ms>`.
pub(super) fn move_aside(path: &Path) -> Result<PathBuf, StoreError> {
    let stamp = now_ms();
    // Unique even for two in the same millisecond: nothing moved aside is ever overwritten.
    let aside = (0..)
        .map(|n| match n {
            0 => PathBuf::from(format!("{}.corrupt-{stamp}", path.display())),
            n => PathBuf::from(format!("{}.corrupt-{stamp}-{n}", path.display())),
        })
        .find(|p| !p.exists())
        .expect("some name is free");
    std::fs::rename(path, &aside).map_err(StoreError::MoveAside)?;
    for ext in ["-wal", "-shm"] {
        let side = PathBuf::from(format!("{}{ext}", path.display()));
        if side.exists() {
            let _ = std::fs::rename(&side, format!("{}{ext}", aside.display()));
        }
    }
    Ok(aside)
}
