//! The store-and-forward queue: every message is committed here before it is published.
//!
//! # Design
//!
//! One SQLite file, `{state_dir}/queue.db`:
//!
//! ```sql
//! CREATE TABLE queue (
//!     seq    INTEGER PRIMARY KEY AUTOINCREMENT,  -- gateway-wide sequence number
//!     ts_ms  INTEGER NOT NULL,                   -- poll time, ms since the Unix epoch (UTC)
//!     topic  TEXT    NOT NULL,
//!     qos    INTEGER NOT NULL,
//!     retain INTEGER NOT NULL,
//!     body   TEXT    NOT NULL                    -- message::Body as JSON, without ts and seq
//! );
//! CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);  -- counters, see Stats
//! CREATE TABLE aside (...same columns as queue...);  -- rows that can never be published
//! ```
//!
//! ## Invariants
//! - `seq` is assigned by SQLite when the row is inserted. `AUTOINCREMENT` keeps the highest
//!   `seq` ever used in `sqlite_sequence`, so a `seq` is never reused, even after every row was
//!   deleted and the gateway restarted; a rolled-back insert rolls that counter back too, so the
//!   sequence has no gaps. A consumer can order and de-duplicate by `seq` alone.
//! - A row leaves the queue in exactly one of four ways, each counted in `meta` in the same
//!   transaction: acknowledged by the broker (`acked_total`; PUBACK for QoS 1, PUBCOMP for QoS 2,
//!   written for QoS 0), or dropped by a bound — `dropped_oldest`, `dropped_expired` — while a
//!   message refused by `when_full: drop_newest` never gets a row and counts in `dropped_newest`.
//!   A row the broker can never take (a topic with `+`, `#` or NUL, a packet over the limit)
//!   is moved to `aside` (`set_aside`), kept for inspection instead of blocking the queue.
//!   Nothing else deletes.
//! - Rows are published oldest first (`ORDER BY seq`), so a replay keeps `seq` order.
//!
//! ## Durability
//! WAL journal with `synchronous = FULL`: a commit is on disk (the WAL fsynced) when
//! [`Store::append`] returns, so a `kill -9` or a power loss after that loses nothing. (With
//! `NORMAL`, a power loss could roll back the last commits: not acceptable for this queue.) The
//! sync is `fdatasync(2)` (`.cargo/config.toml` builds the bundled SQLite as Debian builds its
//! own): the WAL's data and size are made durable, only its timestamps are not. To
//! keep SD-card writes low, every message waiting when the store thread wakes goes into one
//! transaction — one fsync per poll cycle, not per reading — and acknowledgements are deleted
//! in batches (the uplink hands them over as they come, the store thread takes them at its next
//! wake-up). A crash can therefore re-send at most the
//! acknowledged-but-not-yet-deleted rows plus the in-flight window, with their original `seq`.
//!
//! Acknowledgement deletes write nothing when they arrive: [`Store::ack`] takes the rows out of
//! `peek` and the depth at once and keeps their seqs, and the next commit deletes them in its
//! own transaction — the next reading's append, or, when no reading comes, a small commit the
//! store thread makes within [`ACKS_DURABLE_WITHIN`] (2 s: longer than the usual 1 s poll
//! interval, so with readings flowing no extra commit is made). One commit per poll instead of
//! two, and the pages the inserts and the deletes share are written once (SD-card wear, see
//! `examples/bench_report.rs`). A lost delete costs a duplicate (the row is sent again with its
//! `seq`), never a reading. Bound: a crash, `kill -9` or power cut re-sends at most the rows
//! acknowledged since the last commit (≤ 2 s, or `commit_interval`).
//!
//! New files use 1 KiB pages ([`PAGE_SIZE`]): a commit writes every page it touched, and a
//! poll's rows are a few hundred bytes. `commit_interval` (off by default) lets readings wait in
//! memory and commits them together: fewer writes, at the price of losing what waited on a
//! power cut; see the configuration reference.
//!
//! Group commit: when a batch arrives, the store thread sleeps for [`GATHER`] and takes what
//! else arrived meanwhile before committing, so buses polled on the same tick share one fsync and
//! one wake-up of the thread; acknowledgements handed over by then are deleted by that commit.
//!
//! ## Bounds
//! `max_messages` and `max_bytes` bound the queue; `max_bytes` is measured as the pages in use
//! (`page_count - freelist_count`), so it is the file's real size, not an estimate. Deleted rows
//! free their pages to SQLite's freelist and new rows reuse them: the file does not grow past
//! its budget across fills and drains, and no `VACUUM` ever runs on the hot path. The WAL is
//! checkpointed automatically and truncated to `journal_size_limit` (8 MiB). Rows queued for
//! longer than `max_age` are dropped once a minute, by the queue's own monotonic clock (not the
//! wall clock, which a Pi without a real-time clock steps at NTP sync; see `Ages`); rows found
//! at start count from the start. Expiry and stats never scan the table.
//!
//! ## Faults
//! - A commit that fails (disk full, I/O error): the batch stays in memory and is retried every
//!   second, logged once per episode; past [`MAX_HELD`] messages the oldest held ones are dropped
//!   and counted. Pollers never wait.
//! - A corrupt file (at open, or a corruption error later): moved aside as
//!   `queue.db.corrupt-<unix ms>` (with its `-wal`/`-shm`), a new file is started with `seq`
//!   continuing above the old one, and this is logged as an error with the number of rows the
//!   old file held. After an unclean shutdown the file is checked with `PRAGMA quick_check`.
//!
//! Concurrency: one thread owns the connection ([`spawn`]); pollers and the uplink talk to it
//! through a [`StoreHandle`]. Enqueueing never waits for the disk. Other processes (`fieldgate
//! queue stats`) may read the file at any time ([`Store::open_read_only`]). Two paths skip the
//! round trip to the store thread: an uplink that has read everything takes each commit's rows
//! from memory once they are committed ([`fresh`]), and acknowledgements are left for the
//! thread to take at its next wake-up rather than waking it (the bound above counts from the
//! hand-over).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags, params};

use crate::message::{Body, Message, Stored, now_ms};

mod ages;
pub mod fresh;
pub mod requeue;
mod salvage;
mod sql;
mod stats;
mod worker;

use ages::Ages;
pub use fresh::Batch;
pub use requeue::AsideRow;
use sql::*;
pub use stats::Stats;
pub use worker::{StoreHandle, spawn};

/// Most messages held in memory while the disk refuses writes.
pub const MAX_HELD: usize = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("queue database {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("queue database: {0}")]
    Query(#[from] rusqlite::Error),
    #[error("re-queue: {0}")]
    Requeue(String),
    #[error("cannot move the corrupt queue aside: {0}")]
    MoveAside(std::io::Error),
    #[error("the store thread has stopped")]
    Closed,
    #[error("queue database: {0}")]
    Thread(String),
}

impl StoreError {
    fn sqlite(&self) -> Option<&rusqlite::Error> {
        match self {
            StoreError::Sqlite { source, .. } | StoreError::Query(source) => Some(source),
            _ => None,
        }
    }

    /// The disk (or the file's quota) is full.
    pub fn is_disk_full(&self) -> bool {
        self.sqlite().and_then(|e| e.sqlite_error_code()) == Some(ErrorCode::DiskFull)
    }

    /// The file is damaged (not a transient I/O problem).
    pub fn is_corrupt(&self) -> bool {
        matches!(
            self.sqlite().and_then(|e| e.sqlite_error_code()),
            Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
        )
    }
}

/// What to do with a new message when the queue is at a bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Delete the oldest rows to make room (the newest readings are usually worth more).
    #[default]
    DropOldest,
    /// Keep what is queued and refuse new messages.
    DropNewest,
}

/// The queue's budget. The defaults suit a 32 GB SD card: at most 1 GiB and 5 million
/// readings (days of backlog for hundreds of points), and nothing older than 30 days.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub max_messages: u64,
    pub max_bytes: u64,
    pub max_age: Duration,
    pub when_full: WhenFull,
    /// Readings wait in memory up to this long and are committed together (`queue.commit_interval`,
    /// default 0: committed at once). Fewer SD-card writes, but a power cut or a crash loses
    /// what waited, and readings are published that much later. Never the default.
    pub commit_interval: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_messages: 5_000_000,
            max_bytes: 1 << 30,
            max_age: Duration::from_secs(30 * 24 * 3600),
            when_full: WhenFull::DropOldest,
            commit_interval: Duration::ZERO,
        }
    }
}

/// What one [`Store::append`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Appended {
    /// Highest `seq` in use afterwards.
    pub last_seq: u64,
    pub inserted: u64,
    pub dropped_oldest: u64,
    pub dropped_newest: u64,
}

/// The queue file. Synchronous; see [`spawn`] for the thread that owns it in the gateway.
pub struct Store {
    conn: Connection,
    path: PathBuf,
    limits: Limits,
    page_size: u64,
    depth: u64,
    last_seq: u64,
    /// Opened read-only (another process writes): figures are read from the file each time.
    read_only: bool,
    /// The queue's own clock for `max_age`: see [`Ages`].
    ages: Ages,
    /// Wall and monotonic time of the last commit, to notice the wall clock stepping.
    clock: Option<(i64, std::time::Instant)>,
    /// Rows up to this seq may be in flight at the uplink: `drop_oldest` spares them.
    pub in_flight_upto: u64,
    /// Durable commits since open (see [`Stats::commits`]).
    commits: u64,
    /// Acknowledged rows, deleted by the next commit (see `## Durability`); gone from `peek`
    /// and the depth already.
    pending_acks: HashSet<u64>,
    /// The seq floor kept beside the file (`queue.seq`); None when opened read-only.
    floor: Option<salvage::SeqFloor>,
}

/// Page size of a new queue file, in bytes.
pub const PAGE_SIZE: i64 = 1024;

/// How long the store thread waits for more readings before a commit (group commit).
pub const GATHER: Duration = Duration::from_millis(3);

/// Acknowledgement deletes are made durable at most this long after they were committed.
pub const ACKS_DURABLE_WITHIN: Duration = Duration::from_secs(2);

/// A wall clock that moved this much more (or less) than the monotonic clock between two
/// commits was stepped (NTP sync on a Pi without a real-time clock, a manual `date`).
const CLOCK_STEP_MS: i64 = 2_000;

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS queue (
        seq    INTEGER PRIMARY KEY AUTOINCREMENT,
        ts_ms  INTEGER NOT NULL,
        topic  TEXT    NOT NULL,
        qos    INTEGER NOT NULL,
        retain INTEGER NOT NULL,
        body   TEXT    NOT NULL
    );
    CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
    CREATE TABLE IF NOT EXISTS aside (
        seq    INTEGER PRIMARY KEY,
        ts_ms  INTEGER NOT NULL,
        topic  TEXT    NOT NULL,
        qos    INTEGER NOT NULL,
        retain INTEGER NOT NULL,
        body   TEXT    NOT NULL,
        reason TEXT    NOT NULL DEFAULT ''
    );
";

impl Store {
    /// Opens (or creates) `{state_dir}/queue.db` with the default limits.
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        Store::open_with(state_dir, Limits::default())
    }

    /// Opens (or creates) `{state_dir}/queue.db`. A corrupt file is moved aside and replaced.
    pub fn open_with(state_dir: &Path, limits: Limits) -> Result<Store, StoreError> {
        std::fs::create_dir_all(state_dir).map_err(|source| StoreError::StateDir {
            path: state_dir.to_path_buf(),
            source,
        })?;
        let path = state_dir.join("queue.db");
        if std::fs::metadata(&path).is_ok_and(|m| m.len() == 0) {
            tracing::warn!(file = %path.display(), "the queue file is empty (0 bytes: truncated, or created by hand); starting a new queue with seq above every seq issued before (queue.seq)");
        }
        let mut s = match Store::open_file(&path, limits) {
            Err(e) if e.is_corrupt() => {
                let aside = move_aside(&path)?;
                let mut s = Store::open_file(&path, limits)?;
                let saved = s.salvage_from(&aside)?;
                tracing::error!(file = %path.display(), moved_to = %aside.display(), error = %e,
                    salvaged = saved.rows, lost = saved.lost, aside_lost_at_most = saved.aside_lost,
                    "QUEUE FILE IS CORRUPT: moved aside, the rows that still read copied into a new queue (the rest counted as dropped: corrupt)");
                s
            }
            other => other?,
        };
        // A new file where one was before (deleted, truncated): seqs go on above the floor.
        let mut floor = salvage::SeqFloor::beside(&path);
        if s.last_seq < floor.reserved {
            if s.last_seq > 0 || s.depth > 0 {
                tracing::debug!(
                    last_seq = s.last_seq,
                    reserved = floor.reserved,
                    "queue: seqs reserved ahead"
                );
            } else {
                tracing::warn!(file = %path.display(), floor = floor.reserved, "a new queue file where one was before: seq continues above every seq issued before");
                s.raise_seq(floor.reserved)?;
            }
        }
        floor.keep_ahead_of(s.last_seq);
        s.floor = Some(floor);
        Ok(s)
    }

    fn open_file(path: &Path, limits: Limits) -> Result<Store, StoreError> {
        let wrap = |source| StoreError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(wrap)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(wrap)?;
        // A new file gets small pages: a commit writes every page it touched to the WAL, and
        // a poll's few hundred bytes of rows touch a handful of pages (SD-card wear, see
        // bench_report). No effect on an existing file.
        conn.pragma_update(None, "page_size", PAGE_SIZE)
            .map_err(wrap)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(wrap)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(wrap)?;
        conn.pragma_update(None, "journal_size_limit", 8 << 20)
            .map_err(wrap)?;
        conn.execute_batch(SCHEMA).map_err(wrap)?;
        // Files from before reasons were kept: add the column.
        let has_reason: bool = conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM pragma_table_info('aside') WHERE name = 'reason')",
                [],
                |r| r.get(0),
            )
            .map_err(wrap)?;
        if !has_reason {
            conn.execute_batch("ALTER TABLE aside ADD COLUMN reason TEXT NOT NULL DEFAULT ''")
                .map_err(wrap)?;
        }
        let clean: i64 = meta_get(&conn, "clean_shutdown").map_err(wrap)?;
        let fresh: bool = conn
            .query_row("SELECT NOT EXISTS (SELECT 1 FROM meta)", [], |r| r.get(0))
            .map_err(wrap)?;
        if clean == 0 && !fresh {
            let verdict: String = conn
                .query_row("PRAGMA quick_check(1)", [], |r| r.get(0))
                .map_err(wrap)?;
            if verdict != "ok" {
                return Err(wrap(rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
                    Some(verdict),
                )));
            }
        }
        let s = Store::from_conn(conn, path, limits).map_err(wrap)?;
        // Marked clean again by `close`; a crash leaves it at 0 and the next open checks the file.
        let mut s = s;
        let acked = meta_get(&s.conn, "acked_total").map_err(wrap)?;
        let tx = s.conn.transaction().map_err(wrap)?;
        meta_set(&tx, "clean_shutdown", 0).map_err(wrap)?;
        meta_set(&tx, "acked_at_start", acked).map_err(wrap)?;
        tx.commit().map_err(wrap)?;
        Ok(s)
    }

    /// Opens an existing queue for reading only (while a gateway writes it).
    pub fn open_read_only(state_dir: &Path) -> Result<Store, StoreError> {
        let path = state_dir.join("queue.db");
        let wrap = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(wrap)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(wrap)?;
        let mut s = Store::from_conn(conn, &path, Limits::default()).map_err(wrap)?;
        s.read_only = true;
        Ok(s)
    }

    /// The in-memory figures of an open connection: page size, depth, last seq.
    fn from_conn(conn: Connection, path: &Path, limits: Limits) -> rusqlite::Result<Store> {
        let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        let depth: i64 = conn.query_row("SELECT count(*) FROM queue", [], |r| r.get(0))?;
        let last_seq = read_last_seq(&conn)?;
        let mut ages = Ages::default();
        if last_seq > 0 {
            ages.committed(last_seq, std::time::Instant::now());
        }
        Ok(Store {
            conn,
            path: path.to_path_buf(),
            limits,
            page_size: page_size as u64,
            depth: depth as u64,
            last_seq,
            read_only: false,
            ages,
            clock: None,
            in_flight_upto: 0,
            commits: 0,
            pending_acks: HashSet::new(),
            floor: None,
        })
    }

    /// Marks a clean shutdown, so the next open skips the integrity check.
    pub fn close(mut self) -> Result<(), StoreError> {
        self.sync_acks()?;
        meta_set(&self.conn, "clean_shutdown", 1)?;
        let _ = self.conn.pragma_update(None, "wal_checkpoint", "TRUNCATE");
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Appends `msgs` in one transaction, enforcing the bounds; see [`Appended`].
    pub fn append(&mut self, msgs: &[Message]) -> Result<Appended, StoreError> {
        self.append_counting(msgs, 0)
    }

    /// [`append`](Store::append), and `held_dropped` readings that were dropped from memory
    /// while the disk refused writes counted as `dropped_oldest` in the same transaction.
    pub fn append_counting(
        &mut self,
        msgs: &[Message],
        held_dropped: u64,
    ) -> Result<Appended, StoreError> {
        let limits = self.limits;
        let page_size = self.page_size;
        let tx = self.conn.transaction()?;
        delete_pending(&tx, &self.pending_acks)?;
        let mut out = Appended::default();
        let mut depth = self.depth;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO queue (ts_ms, topic, qos, retain, body) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for (i, m) in msgs.iter().enumerate() {
                if limits.when_full == WhenFull::DropNewest
                    && (depth >= limits.max_messages
                        || (i % 64 == 0 && used_bytes(&tx, page_size)? >= limits.max_bytes))
                {
                    out.dropped_newest = (msgs.len() - i) as u64;
                    break;
                }
                let body = serde_json::to_string(&m.body).expect("plain data serializes");
                stmt.execute(params![m.ts_ms, m.topic, m.qos, m.retain, body])?;
                depth += 1;
                out.inserted += 1;
            }
        }
        if limits.when_full == WhenFull::DropOldest {
            let over = depth.saturating_sub(limits.max_messages);
            if over > 0 {
                depth -= delete_oldest(&tx, over, self.in_flight_upto, self.last_seq)?;
                out.dropped_oldest += over;
            }
            while depth > 0 && used_bytes(&tx, page_size)? > limits.max_bytes {
                let n = delete_oldest(
                    &tx,
                    (depth / 64).max(16),
                    self.in_flight_upto,
                    self.last_seq,
                )?;
                depth -= n;
                out.dropped_oldest += n;
            }
        }
        meta_add(&tx, "dropped_oldest", out.dropped_oldest + held_dropped)?;
        meta_add(&tx, "dropped_newest", out.dropped_newest)?;
        let (wall, mono) = (now_ms(), std::time::Instant::now());
        if let Some((wall0, mono0)) = self.clock {
            let step = (wall - wall0) - mono.saturating_duration_since(mono0).as_millis() as i64;
            if step.abs() > CLOCK_STEP_MS {
                tracing::warn!(
                    step_ms = step,
                    "the wall clock was stepped: readings polled before carry the old clock's time (their seq keeps the order); none expires because of it"
                );
                meta_add(&tx, "clock_steps", 1)?;
            }
        }
        let last_seq = read_last_seq(&tx)?;
        tx.commit()?;
        self.durable();
        if let Some(f) = &mut self.floor {
            f.keep_ahead_of(last_seq);
        }
        self.depth = depth;
        self.last_seq = last_seq;
        self.ages.committed(last_seq, mono);
        self.clock = Some((wall, mono));
        out.last_seq = last_seq;
        Ok(out)
    }

    /// Up to `limit` rows with `seq > after`, oldest first.
    pub fn peek(&self, after: u64, limit: usize) -> Result<Vec<Stored>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, ts_ms, topic, qos, retain, body FROM queue WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        // Acknowledged rows whose delete waits for the next commit are gone already.
        let fetch = limit
            .saturating_add(self.pending_acks.len())
            .min(i64::MAX as usize);
        let rows = stmt.query_map(params![after as i64, fetch as i64], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, u8>(3)?,
                r.get::<_, bool>(4)?,
                r.get::<_, String>(5)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, ts_ms, topic, qos, retain, body) = row?;
            if self.pending_acks.contains(&(seq as u64)) {
                continue;
            }
            let body: Body = match serde_json::from_str(&body) {
                Ok(b) => b,
                Err(e) => {
                    // Never silently drop: publish what we have as text so it is visible.
                    tracing::error!(seq, error = %e, "queue row has an unreadable body; publishing it as text");
                    Body::Bare {
                        value: crate::mapping::Value::Text(body),
                    }
                }
            };
            out.push(Stored {
                seq: seq as u64,
                queued: self.ages.entered(seq as u64),
                message: Message {
                    topic,
                    qos,
                    retain,
                    ts_ms,
                    body,
                },
            });
        }
        out.truncate(limit);
        Ok(out)
    }

    /// Takes acknowledged rows out of the queue; returns how many were in it (a row a bound
    /// already dropped is not counted twice). Nothing is written now: the rows are gone from
    /// `peek` and the depth at once, and deleted by the next commit — a reading's append, or
    /// [`sync_acks`](Store::sync_acks) when none comes (see `## Durability`).
    pub fn ack(&mut self, seqs: &[u64]) -> Result<u64, StoreError> {
        let mut n = 0u64;
        let mut seqs = seqs.to_vec();
        seqs.sort_unstable();
        seqs.dedup();
        // One read transaction for the batch: outside a transaction every lookup would be one
        // of its own, and each takes and drops the WAL read lock (two fcntl calls per reading).
        // Acknowledgements come in runs of consecutive seqs: one range read per run finds
        // which of them are still queued (a row may have expired or been dropped meanwhile).
        let tx = self.conn.transaction()?;
        {
            let mut queued =
                tx.prepare_cached("SELECT seq FROM queue WHERE seq BETWEEN ?1 AND ?2")?;
            for (first, last) in runs(&seqs) {
                let mut rows = queued.query(params![first as i64, last as i64])?;
                while let Some(r) = rows.next()? {
                    let s = r.get::<_, i64>(0)? as u64;
                    if self.pending_acks.insert(s) {
                        n += 1;
                    }
                }
            }
        }
        tx.commit()?;
        self.depth -= n.min(self.depth);
        Ok(n)
    }

    /// Acknowledged rows whose delete is not yet committed.
    pub fn undurable_acks(&self) -> u64 {
        self.pending_acks.len() as u64
    }

    /// Commits the acknowledgement deletes on their own (a small commit at `synchronous =
    /// FULL`), when no reading's append has carried them.
    pub fn sync_acks(&mut self) -> Result<(), StoreError> {
        if self.pending_acks.is_empty() {
            return Ok(());
        }
        let tx = self.conn.transaction()?;
        delete_pending(&tx, &self.pending_acks)?;
        tx.commit()?;
        self.durable();
        Ok(())
    }

    /// A commit at `synchronous = FULL` returned: everything before it is on disk, the
    /// acknowledgement deletes it carried included.
    fn durable(&mut self) {
        self.commits += 1;
        self.pending_acks.clear();
    }

    /// Moves rows that can never be published (or that the broker refused) to the `aside`
    /// table with the reason, in one transaction; returns how many were moved.
    pub fn set_aside(&mut self, rows: &[(u64, String)]) -> Result<u64, StoreError> {
        let tx = self.conn.transaction()?;
        let mut n = 0u64;
        {
            let mut copy = tx.prepare_cached(
                "INSERT OR REPLACE INTO aside SELECT seq, ts_ms, topic, qos, retain, body, ?2 FROM queue WHERE seq = ?1",
            )?;
            let mut delete = tx.prepare_cached("DELETE FROM queue WHERE seq = ?1")?;
            for (s, reason) in rows {
                copy.execute(params![*s as i64, reason])?;
                n += delete.execute(params![*s as i64])? as u64;
            }
        }
        meta_add(&tx, "set_aside", n)?;
        delete_pending(&tx, &self.pending_acks)?;
        tx.commit()?;
        self.durable();
        self.depth -= n.min(self.depth);
        Ok(n)
    }

    /// Drops rows that have been in the queue for longer than `max_age` (by the queue's own
    /// monotonic clock, see `ages::Ages`); returns how many. A range delete on the primary key: no
    /// table scan, whatever the depth.
    pub fn expire(&mut self, now: std::time::Instant) -> Result<u64, StoreError> {
        let Some(upto) = self.ages.expired(self.limits.max_age, now) else {
            return Ok(0);
        };
        let tx = self.conn.transaction()?;
        delete_pending(&tx, &self.pending_acks)?;
        let n = tx.execute("DELETE FROM queue WHERE seq <= ?1", params![upto as i64])? as u64;
        meta_add(&tx, "dropped_expired", n)?;
        tx.commit()?;
        self.durable();
        self.depth -= n.min(self.depth);
        Ok(n)
    }

    pub fn depth(&self) -> u64 {
        self.depth
    }

    /// Counts `n` readings lost at a stop, unsaved (see [`Stats::dropped_unsaved`]): one small
    /// update, which a full disk may still take (a page rewritten in place in the WAL) where
    /// the readings' rows did not fit.
    pub fn count_unsaved(&mut self, n: u64) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        meta_add(&tx, "dropped_unsaved", n)?;
        tx.commit()?;
        self.durable();
        Ok(())
    }

    /// The highest `seq` ever assigned (0 for a new file).
    pub fn last_seq(&self) -> Result<u64, StoreError> {
        Ok(self.read_last_seq()?)
    }

    fn read_last_seq(&self) -> rusqlite::Result<u64> {
        read_last_seq(&self.conn)
    }

    /// Makes the next `seq` larger than `floor` (used when a corrupt file is replaced).
    fn raise_seq(&mut self, floor: u64) -> Result<(), StoreError> {
        if floor > self.last_seq {
            self.conn
                .execute("DELETE FROM sqlite_sequence WHERE name = 'queue'", [])?;
            self.conn.execute(
                "INSERT INTO sqlite_sequence (name, seq) VALUES ('queue', ?1)",
                params![floor as i64],
            )?;
            self.last_seq = floor;
        }
        Ok(())
    }
}

/// A store dropped without [`Store::close`] still commits the acknowledgement deletes it
/// holds (a crash does not, and re-sends those rows: see `## Durability`).
impl Drop for Store {
    fn drop(&mut self) {
        if let Err(e) = self.sync_acks() {
            tracing::debug!(error = %e, "queue: acknowledgement deletes not committed at drop");
        }
    }
}

#[cfg(test)]
mod tests;
