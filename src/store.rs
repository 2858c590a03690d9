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
//! `NORMAL`, a power loss could roll back the last commits: not acceptable for this queue.) To
//! keep SD-card writes low, every message waiting when the store thread wakes goes into one
//! transaction — one fsync per poll cycle, not per reading — and acknowledgements are deleted
//! in batches (the uplink flushes them every 100 ms). A crash can therefore re-send at most the
//! acknowledged-but-not-yet-deleted rows plus the in-flight window, with their original `seq`.
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
//! queue stats`) may read the file at any time ([`Store::open_read_only`]).

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, params};
use serde::Serialize;
use tokio::sync::{oneshot, watch};

use crate::message::{Body, Message, Stored, now_ms};

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
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_messages: 5_000_000,
            max_bytes: 1 << 30,
            max_age: Duration::from_secs(30 * 24 * 3600),
            when_full: WhenFull::DropOldest,
        }
    }
}

/// The queue's figures, for `fieldgate queue stats` and the status message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    pub depth: u64,
    pub oldest_ts_ms: Option<i64>,
    pub last_seq: u64,
    /// Bytes of the file in use (pages not on the freelist).
    pub bytes: u64,
    pub file_bytes: u64,
    pub dropped_oldest: u64,
    pub dropped_newest: u64,
    pub dropped_expired: u64,
    /// Rows that could never be published, kept in the `aside` table.
    pub set_aside: u64,
    /// Times the wall clock was seen to step while readings were queued.
    pub clock_steps: u64,
    pub acked_total: u64,
    /// Acknowledged since the gateway that writes this file started.
    pub acked_since_start: u64,
}

impl Stats {
    pub fn dropped(&self) -> u64 {
        self.dropped_oldest + self.dropped_newest + self.dropped_expired
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
}

/// A wall clock that moved this much more (or less) than the monotonic clock between two
/// commits was stepped (NTP sync on a Pi without a real-time clock, a manual `date`).
const CLOCK_STEP_MS: i64 = 2_000;

/// When rows entered the queue, by the monotonic clock: `(highest seq, instant)` pairs, oldest
/// first, at most one per minute. All rows up to `seq` entered no later than `instant` (rows of
/// the last minute are dated its end, so a row expires up to a minute late, never early). Rows
/// found at open are dated the open. So `max_age` is time spent in this queue while a gateway
/// ran, immune to wall-clock steps (a Pi without a real-time clock starts with a wrong time,
/// then NTP steps it): no reading is dropped because the clock jumped.
#[derive(Debug, Default)]
struct Ages {
    /// `(highest seq, entered by, minute began)`.
    marks: std::collections::VecDeque<(u64, std::time::Instant, std::time::Instant)>,
}

impl Ages {
    const GRAIN: Duration = Duration::from_secs(60);

    fn committed(&mut self, last_seq: u64, now: std::time::Instant) {
        match self.marks.back_mut() {
            // Within the same minute: its rows are all dated the latest commit.
            Some((seq, at, began)) if now.saturating_duration_since(*began) < Ages::GRAIN => {
                *seq = last_seq;
                *at = now;
            }
            _ => self.marks.push_back((last_seq, now, now)),
        }
    }

    /// The highest seq that has been queued for longer than `max_age`, if any.
    fn expired(&mut self, max_age: Duration, now: std::time::Instant) -> Option<u64> {
        let mut upto = None;
        while let Some((seq, at, _)) = self.marks.front() {
            if now.saturating_duration_since(*at) <= max_age {
                break;
            }
            upto = Some(*seq);
            self.marks.pop_front();
        }
        upto
    }
}

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
        body   TEXT    NOT NULL
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
        match Store::open_file(&path, limits) {
            Err(e) if e.is_corrupt() => {
                let (seq_floor, rows) = salvage_counts(&path);
                let aside = move_aside(&path)?;
                tracing::error!(file = %path.display(), moved_to = %aside.display(), error = %e,
                    rows_in_old_file = ?rows, "QUEUE FILE IS CORRUPT: moved aside, starting a new queue; readings in the old file are not published");
                let mut s = Store::open_file(&path, limits)?;
                s.raise_seq(seq_floor)?;
                Ok(s)
            }
            other => other,
        }
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
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(wrap)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(wrap)?;
        conn.pragma_update(None, "journal_size_limit", 8 << 20)
            .map_err(wrap)?;
        conn.execute_batch(SCHEMA).map_err(wrap)?;
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
        })
    }

    /// Marks a clean shutdown, so the next open skips the integrity check.
    pub fn close(self) -> Result<(), StoreError> {
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
        let rows = stmt.query_map(params![after as i64, limit as i64], |r| {
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
                message: Message {
                    topic,
                    qos,
                    retain,
                    ts_ms,
                    body,
                },
            });
        }
        Ok(out)
    }

    /// Deletes acknowledged rows in one transaction; returns how many were deleted (a row a
    /// bound already dropped is not counted twice).
    pub fn ack(&mut self, seqs: &[u64]) -> Result<u64, StoreError> {
        let tx = self.conn.transaction()?;
        let mut n = 0u64;
        {
            let mut stmt = tx.prepare_cached("DELETE FROM queue WHERE seq = ?1")?;
            for s in seqs {
                n += stmt.execute(params![*s as i64])? as u64;
            }
        }
        meta_add(&tx, "acked_total", n)?;
        tx.commit()?;
        self.depth -= n.min(self.depth);
        Ok(n)
    }

    /// Moves rows that can never be published to the `aside` table, in one transaction;
    /// returns how many were moved.
    pub fn set_aside(&mut self, seqs: &[u64]) -> Result<u64, StoreError> {
        let tx = self.conn.transaction()?;
        let mut n = 0u64;
        {
            let mut copy = tx.prepare_cached(
                "INSERT OR REPLACE INTO aside SELECT seq, ts_ms, topic, qos, retain, body FROM queue WHERE seq = ?1",
            )?;
            let mut delete = tx.prepare_cached("DELETE FROM queue WHERE seq = ?1")?;
            for s in seqs {
                copy.execute(params![*s as i64])?;
                n += delete.execute(params![*s as i64])? as u64;
            }
        }
        meta_add(&tx, "set_aside", n)?;
        tx.commit()?;
        self.depth -= n.min(self.depth);
        Ok(n)
    }

    /// Drops rows that have been in the queue for longer than `max_age` (by the queue's own
    /// monotonic clock, see [`Ages`]); returns how many. A range delete on the primary key: no
    /// table scan, whatever the depth.
    pub fn expire(&mut self, now: std::time::Instant) -> Result<u64, StoreError> {
        let Some(upto) = self.ages.expired(self.limits.max_age, now) else {
            return Ok(0);
        };
        let tx = self.conn.transaction()?;
        let n = tx.execute("DELETE FROM queue WHERE seq <= ?1", params![upto as i64])? as u64;
        meta_add(&tx, "dropped_expired", n)?;
        tx.commit()?;
        self.depth -= n.min(self.depth);
        Ok(n)
    }

    pub fn depth(&self) -> u64 {
        self.depth
    }

    pub fn stats(&self) -> Result<Stats, StoreError> {
        let c = &self.conn;
        // The oldest by seq (what is published next), found on the primary key; the depth is
        // kept in memory by the writer. Only a reader in another process counts rows.
        let oldest: Option<i64> = c
            .query_row("SELECT ts_ms FROM queue ORDER BY seq LIMIT 1", [], |r| {
                r.get(0)
            })
            .optional()?;
        let depth = if self.read_only {
            c.query_row("SELECT count(*) FROM queue", [], |r| r.get::<_, i64>(0))? as u64
        } else {
            self.depth
        };
        let pages: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0))?;
        let acked = meta_get(c, "acked_total")? as u64;
        Ok(Stats {
            depth,
            oldest_ts_ms: oldest,
            last_seq: self.read_last_seq()?,
            bytes: used_bytes(c, self.page_size)?,
            file_bytes: pages as u64 * self.page_size,
            dropped_oldest: meta_get(c, "dropped_oldest")? as u64,
            dropped_newest: meta_get(c, "dropped_newest")? as u64,
            dropped_expired: meta_get(c, "dropped_expired")? as u64,
            set_aside: meta_get(c, "set_aside")? as u64,
            clock_steps: meta_get(c, "clock_steps")? as u64,
            acked_total: acked,
            acked_since_start: acked.saturating_sub(meta_get(c, "acked_at_start")? as u64),
        })
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

    /// Replaces a file found corrupt while running: moved aside, a new one started with `seq`
    /// continuing. Returns how many rows the old file was believed to hold.
    fn replace_corrupt(&mut self) -> Result<u64, StoreError> {
        let lost = self.depth;
        let floor = self.last_seq;
        // Close the old connection first: closing it later would delete `queue.db-wal` and
        // `-shm` by name, by then the new file's (its commits would vanish at the next crash).
        let old = std::mem::replace(&mut self.conn, Connection::open_in_memory()?);
        if let Err((_, e)) = old.close() {
            tracing::warn!(error = %e, "closing the corrupt queue file");
        }
        let aside = move_aside(&self.path)?;
        tracing::error!(file = %self.path.display(), moved_to = %aside.display(), rows_in_old_file = lost,
            "QUEUE FILE BECAME CORRUPT: moved aside, starting a new queue; readings in the old file are not published");
        let mut fresh = Store::open_file(&self.path, self.limits)?;
        fresh.raise_seq(floor.max(now_ms() as u64))?;
        *self = fresh;
        Ok(lost)
    }
}

fn read_last_seq(c: &Connection) -> rusqlite::Result<u64> {
    let seq: Option<i64> = c
        .query_row(
            "SELECT seq FROM sqlite_sequence WHERE name = 'queue'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    Ok(seq.unwrap_or(0) as u64)
}

fn used_bytes(c: &Connection, page_size: u64) -> rusqlite::Result<u64> {
    let pages: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    let free: i64 = c.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
    Ok((pages - free).max(0) as u64 * page_size)
}

/// Deletes the `n` oldest rows, sparing those up to `spare` (in flight at the uplink: they are
/// probably delivered already, and dropping them would count a delivered reading as dropped)
/// unless nothing older than the batch being added (`seq <= newest_old`) is left; returns how
/// many were deleted.
fn delete_oldest(c: &Connection, n: u64, spare: u64, newest_old: u64) -> rusqlite::Result<u64> {
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

fn meta_get(c: &Connection, key: &str) -> rusqlite::Result<i64> {
    Ok(
        c.query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| {
            r.get(0)
        })
        .optional()?
        .unwrap_or(0),
    )
}

fn meta_set(c: &Connection, key: &str, value: i64) -> rusqlite::Result<()> {
    c.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        params![key, value],
    )?;
    Ok(())
}

fn meta_add(c: &Connection, key: &str, n: u64) -> rusqlite::Result<()> {
    if n > 0 {
        c.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = value + excluded.value",
            params![key, n as i64],
        )?;
    }
    Ok(())
}

/// What can still be read from a corrupt file: its highest `seq` (or, failing that, the current
/// time in ms, which is larger than any `seq` a gateway reaches) and its row count.
fn salvage_counts(path: &Path) -> (u64, Option<u64>) {
    let Ok(c) = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY) else {
        return (now_ms() as u64, None);
    };
    let seq = read_last_seq(&c)
        .ok()
        .filter(|s| *s > 0)
        .unwrap_or(now_ms() as u64);
    let rows = c
        .query_row("SELECT count(*) FROM queue", [], |r| r.get::<_, i64>(0))
        .ok()
        .map(|n| n as u64);
    (seq, rows)
}

/// Renames `queue.db` (and its `-wal`, `-shm`) to `queue.db.corrupt-<unix ms>`.
fn move_aside(path: &Path) -> Result<PathBuf, StoreError> {
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

enum Cmd {
    Enqueue(Vec<Message>),
    Peek {
        after: u64,
        limit: usize,
        reply: oneshot::Sender<Result<Vec<Stored>, String>>,
    },
    Ack(Vec<u64>),
    SetAside(Vec<u64>),
    Stats(oneshot::Sender<Result<Stats, String>>),
}

/// The way pollers and the uplink reach the store thread. Cheap to clone.
#[derive(Clone)]
pub struct StoreHandle {
    tx: mpsc::Sender<Cmd>,
    committed: watch::Receiver<u64>,
    /// The highest seq the uplink has in flight (0: none).
    in_flight: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl StoreHandle {
    /// Hands `msgs` to the store thread; never waits for the disk.
    pub fn enqueue(&self, msgs: Vec<Message>) -> Result<(), StoreError> {
        if msgs.is_empty() {
            return Ok(());
        }
        self.tx
            .send(Cmd::Enqueue(msgs))
            .map_err(|_| StoreError::Closed)
    }

    pub async fn peek(&self, after: u64, limit: usize) -> Result<Vec<Stored>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Peek {
                after,
                limit,
                reply,
            })
            .map_err(|_| StoreError::Closed)?;
        rx.await
            .map_err(|_| StoreError::Closed)?
            .map_err(StoreError::Thread)
    }

    /// Deletes acknowledged rows (batched by the store thread).
    pub fn ack(&self, seqs: Vec<u64>) -> Result<(), StoreError> {
        if seqs.is_empty() {
            return Ok(());
        }
        self.tx.send(Cmd::Ack(seqs)).map_err(|_| StoreError::Closed)
    }

    /// Moves rows that can never be published out of the queue, into its `aside` table.
    pub fn set_aside(&self, seqs: Vec<u64>) -> Result<(), StoreError> {
        self.tx
            .send(Cmd::SetAside(seqs))
            .map_err(|_| StoreError::Closed)
    }

    pub async fn stats(&self) -> Result<Stats, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Stats(reply))
            .map_err(|_| StoreError::Closed)?;
        rx.await
            .map_err(|_| StoreError::Closed)?
            .map_err(StoreError::Thread)
    }

    /// The uplink has rows up to `seq` in flight (0 when its session ended): `drop_oldest`
    /// spares them while it can.
    pub fn in_flight_upto(&self, seq: u64) {
        self.in_flight
            .store(seq, std::sync::atomic::Ordering::Relaxed);
    }

    /// Changes whenever new rows are committed; holds the highest committed `seq`.
    pub fn committed(&self) -> watch::Receiver<u64> {
        self.committed.clone()
    }
}

/// Starts the thread that owns `store`. It runs until every [`StoreHandle`] is dropped, then
/// commits whatever is still waiting, marks the file cleanly closed and returns; join the
/// handle to be sure it did.
pub fn spawn(store: Store) -> Result<(StoreHandle, thread::JoinHandle<()>), StoreError> {
    let (tx, rx) = mpsc::channel();
    let (committed_tx, committed) = watch::channel(store.last_seq()?);
    let in_flight = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen = in_flight.clone();
    let join = thread::Builder::new()
        .name("fieldgate-store".into())
        .spawn(move || Worker::new(store, committed_tx, seen).run(rx))
        .expect("spawning a thread");
    Ok((
        StoreHandle {
            tx,
            committed,
            in_flight,
        },
        join,
    ))
}

/// The store thread's state.
struct Worker {
    store: Store,
    committed: watch::Sender<u64>,
    /// What the uplink has in flight, see [`StoreHandle::in_flight_upto`].
    in_flight: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Messages not yet committed (the disk refused them so far).
    unsaved: Vec<Message>,
    /// Acknowledged seqs not yet deleted.
    unacked: Vec<u64>,
    /// Held messages dropped because memory was full, not yet added to the file's counter.
    dropped_held: u64,
    failing: bool,
    /// Drops by a bound since the last log line (logged at most once a minute).
    dropped_unlogged: u64,
    last_drop_log: Option<std::time::Instant>,
    last_expiry: std::time::Instant,
    /// When the file was last replaced after corruption (within the hour).
    repairs: Vec<std::time::Instant>,
}

/// Most corrupt-file replacements an hour.
const REPAIRS_PER_HOUR: usize = 3;

impl Worker {
    fn new(
        store: Store,
        committed: watch::Sender<u64>,
        in_flight: std::sync::Arc<std::sync::atomic::AtomicU64>,
    ) -> Worker {
        Worker {
            store,
            committed,
            in_flight,
            unsaved: Vec::new(),
            unacked: Vec::new(),
            dropped_held: 0,
            failing: false,
            dropped_unlogged: 0,
            last_drop_log: None,
            // Not `now - 1 h`: that panics on a machine up for less than an hour (a Pi that
            // starts fieldgate at boot). Nothing can be due at start anyway: rows found at
            // start count their age from the start.
            last_expiry: std::time::Instant::now(),
            repairs: Vec::new(),
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Cmd>) {
        let mut open = true;
        loop {
            let pending = !self.unsaved.is_empty() || !self.unacked.is_empty();
            if !open && (!pending || self.failing) {
                break;
            }
            // Wake at least once a second for retries and expiry.
            let first = match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(c) => Some(c),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    open = false;
                    None
                }
            };
            let mut queries = Vec::new();
            for c in first
                .into_iter()
                .chain(std::iter::from_fn(|| rx.try_recv().ok()))
            {
                match c {
                    Cmd::Enqueue(m) => self.unsaved.extend(m),
                    Cmd::Ack(s) => self.unacked.extend(s),
                    q => queries.push(q),
                }
            }
            self.save();
            self.delete_acked();
            if self.last_expiry.elapsed() >= Duration::from_secs(60) {
                self.last_expiry = std::time::Instant::now();
                match self.retried(|s| s.expire(std::time::Instant::now())) {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::warn!(dropped = n, max_age = ?self.store.limits().max_age, "queue: dropped readings older than max_age")
                    }
                    Err(e) => tracing::warn!(error = %e, "queue: cannot drop expired readings"),
                }
            }
            for q in queries {
                match q {
                    Cmd::Peek {
                        after,
                        limit,
                        reply,
                    } => {
                        let rows = self.retried(|s| s.peek(after, limit));
                        let _ = reply.send(rows.map_err(|e| e.to_string()));
                    }
                    Cmd::Stats(reply) => {
                        let stats = self.retried(|s| s.stats());
                        let _ = reply.send(stats.map_err(|e| e.to_string()));
                    }
                    Cmd::SetAside(seqs) => {
                        if let Err(e) = self.retried(|s| s.set_aside(&seqs)) {
                            tracing::error!(error = %e, ?seqs, "queue: cannot set unpublishable rows aside");
                        }
                    }
                    Cmd::Enqueue(_) | Cmd::Ack(_) => unreachable!("sorted out above"),
                }
            }
        }
        if !self.unsaved.is_empty() {
            tracing::error!(
                lost = self.unsaved.len(),
                "shutting down with readings the queue could not save"
            );
        }
        if let Err(e) = self.store.close() {
            tracing::warn!(error = %e, "queue: cannot mark a clean shutdown");
        }
    }

    /// Runs `op` on the store; after a corruption error the file is replaced (see
    /// [`repair`](Worker::repair)) and `op` tried once more.
    fn retried<T>(
        &mut self,
        mut op: impl FnMut(&mut Store) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        match op(&mut self.store) {
            Err(e) if self.repair(&e) => op(&mut self.store),
            other => other,
        }
    }

    fn save(&mut self) {
        if self.unsaved.len() > MAX_HELD {
            let n = self.unsaved.len() - MAX_HELD;
            self.unsaved.drain(..n);
            self.dropped_held += n as u64;
            tracing::error!(
                dropped = n,
                held = MAX_HELD,
                "queue: the disk refuses writes and memory is full; dropped the oldest held readings"
            );
        }
        if self.unsaved.is_empty() {
            return;
        }
        self.store.in_flight_upto = self.in_flight.load(std::sync::atomic::Ordering::Relaxed);
        // All at once if it fits; after a failure (a nearly full disk), in ever smaller parts,
        // so what fits is saved and only the rest waits in memory.
        let mut part = self.unsaved.len();
        while !self.unsaved.is_empty() {
            let n = part.min(self.unsaved.len());
            match self
                .store
                .append_counting(&self.unsaved[..n], self.dropped_held)
            {
                Ok(a) => {
                    if self.failing {
                        tracing::info!(
                            saved = n,
                            "queue writes work again; the readings held in memory are saved"
                        );
                        self.failing = false;
                    }
                    // Held-and-dropped readings were counted as the oldest dropped in that commit.
                    self.dropped_held = 0;
                    self.unsaved.drain(..n);
                    self.note_drops(a.dropped_oldest + a.dropped_newest);
                    self.committed.send_replace(a.last_seq);
                }
                Err(e) if self.repair(&e) => {}
                Err(e) if n > 1 && e.is_disk_full() => part = n / 2,
                Err(e) => {
                    self.fail(&e);
                    return;
                }
            }
        }
    }

    /// After a corruption error on any path (write or read), replaces the file — at most
    /// [`REPAIRS_PER_HOUR`] times an hour, so a dying card is reported, not churned through.
    /// True if the file was replaced and the operation is worth one more try.
    fn repair(&mut self, e: &StoreError) -> bool {
        if !e.is_corrupt() {
            return false;
        }
        let now = std::time::Instant::now();
        self.repairs
            .retain(|t| now.saturating_duration_since(*t) < Duration::from_secs(3600));
        if self.repairs.len() >= REPAIRS_PER_HOUR {
            tracing::error!(error = %e, "queue file corrupt again; not replacing it more than {REPAIRS_PER_HOUR} times an hour (check the SD card)");
            return false;
        }
        self.repairs.push(now);
        match self.store.replace_corrupt() {
            Ok(_) => true,
            Err(e) => {
                tracing::error!(error = %e, "cannot replace the corrupt queue file");
                false
            }
        }
    }

    fn fail(&mut self, e: &StoreError) {
        if !self.failing {
            tracing::error!(error = %e, held = self.unsaved.len(), file = %self.store.path().display(),
                "cannot write to the queue; holding readings in memory and retrying every second");
            self.failing = true;
        }
    }

    fn delete_acked(&mut self) {
        if self.unacked.is_empty() {
            return;
        }
        let unacked = std::mem::take(&mut self.unacked);
        let result = self.retried(|s| s.ack(&unacked));
        self.unacked = unacked;
        match result {
            Ok(_) => self.unacked.clear(),
            Err(e) => {
                if !self.failing {
                    tracing::warn!(error = %e, "cannot delete acknowledged rows; retrying (they may be published twice)");
                }
                // Bounded: acks are cheap, but do not grow without end.
                if self.unacked.len() > MAX_HELD {
                    self.unacked.drain(..self.unacked.len() - MAX_HELD);
                }
            }
        }
    }

    fn note_drops(&mut self, n: u64) {
        self.dropped_unlogged += n;
        if self.dropped_unlogged > 0
            && self
                .last_drop_log
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
        {
            let l = self.store.limits();
            tracing::warn!(dropped = self.dropped_unlogged, policy = ?l.when_full, max_messages = l.max_messages, max_bytes = l.max_bytes,
                "queue full: readings dropped (see `fieldgate queue stats`)");
            self.dropped_unlogged = 0;
            self.last_drop_log = Some(std::time::Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::Value;

    /// 2026-11-26, so the default max_age keeps them.
    const T0: i64 = 1_795_665_600_000;

    fn msg(i: i64) -> Message {
        Message {
            topic: format!("t/{i}"),
            qos: 1,
            retain: false,
            ts_ms: T0 + i,
            body: Body::Point {
                value: Value::Int(i),
                unit: None,
            },
        }
    }

    fn msgs(r: std::ops::RangeInclusive<i64>) -> Vec<Message> {
        r.map(msg).collect()
    }

    fn seqs(s: &Store) -> Vec<u64> {
        s.peek(0, usize::MAX >> 1)
            .unwrap()
            .iter()
            .map(|r| r.seq)
            .collect()
    }

    /// Acceptance testing (#10): a meter's "not available" float (`0xFFFF 0xFFFF`, NaN) went
    /// into the queue as JSON null, could not be read back as a value, and was published as
    /// the raw internal JSON, without `ts` and `seq`.
    #[test]
    fn a_non_finite_float_is_published_as_null_with_ts_and_seq() {
        use crate::mapping::{DataType, Point, Table};
        let f32p = Point::new("p", Table::Holding, 0, DataType::F32);
        let f64p = Point::new("q", Table::Holding, 0, DataType::F64);
        let nan = f32p.decode_words(&[0xFFFF, 0xFFFF]);
        let quiet_nan = f32p.decode_words(&[0x7FC0, 0x0000]);
        let inf = f32p.decode_words(&[0x7F80, 0x0000]);
        let minus_inf = f64p.decode_words(&[0xFFF0, 0, 0, 0]);
        for v in [&nan, &quiet_nan, &inf, &minus_inf] {
            assert_eq!(*v, Value::Null);
        }
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        let mut device_values = std::collections::BTreeMap::new();
        device_values.insert("ok".to_string(), Value::Float(1.5));
        device_values.insert("na".to_string(), nan.clone());
        s.append(&[
            Message {
                body: Body::Point {
                    value: nan,
                    unit: Some("V".into()),
                },
                ..msg(1)
            },
            Message {
                body: Body::Device {
                    values: device_values,
                },
                ..msg(2)
            },
        ])
        .unwrap();
        let rows = s.peek(0, 10).unwrap();
        let point: serde_json::Value = serde_json::from_slice(&rows[0].payload()).unwrap();
        assert_eq!(point["value"], serde_json::Value::Null);
        assert_eq!(point["unit"], "V");
        assert_eq!(point["seq"], 1);
        assert!(point["ts"].is_string(), "{point}");
        let device: serde_json::Value = serde_json::from_slice(&rows[1].payload()).unwrap();
        assert_eq!(device["values"]["na"], serde_json::Value::Null);
        assert_eq!(device["values"]["ok"], 1.5);
        assert_eq!(device["seq"], 2);
        assert!(device["ts"].is_string(), "{device}");
    }

    #[test]
    fn seq_is_gapless_and_survives_deletes_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        assert_eq!(s.append(&msgs(1..=3)).unwrap().last_seq, 3);
        let rows = s.peek(0, 10).unwrap();
        assert_eq!(
            rows.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(rows[1].message, msg(2));
        assert_eq!(s.ack(&[1, 2, 3]).unwrap(), 3);
        drop(s);
        let mut s = Store::open(dir.path()).unwrap();
        assert_eq!(s.stats().unwrap().depth, 0);
        assert_eq!(s.append(&[msg(4)]).unwrap().last_seq, 4);
        assert_eq!(s.peek(0, 10).unwrap()[0].seq, 4);
    }

    #[test]
    fn peek_is_oldest_first_after_a_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        s.append(&msgs(1..=10)).unwrap();
        let rows = s.peek(4, 3).unwrap();
        assert_eq!(
            rows.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![5, 6, 7]
        );
    }

    #[test]
    fn ack_out_of_order_deletes_only_those_rows_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        s.append(&msgs(1..=5)).unwrap();
        assert_eq!(s.ack(&[4, 2, 4]).unwrap(), 2);
        assert_eq!(seqs(&s), vec![1, 3, 5]);
        let st = s.stats().unwrap();
        assert_eq!(
            (st.depth, st.oldest_ts_ms, st.last_seq, st.acked_total),
            (3, Some(T0 + 1), 5, 2)
        );
    }

    #[test]
    fn drop_oldest_keeps_the_newest_and_counts_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            max_messages: 100,
            ..Limits::default()
        };
        let mut s = Store::open_with(dir.path(), limits).unwrap();
        for chunk in 0..25 {
            s.append(&msgs(chunk * 10 + 1..=chunk * 10 + 10)).unwrap();
        }
        assert_eq!(seqs(&s), (151..=250).collect::<Vec<_>>());
        let st = s.stats().unwrap();
        assert_eq!(
            (st.depth, st.dropped_oldest, st.dropped_newest),
            (100, 150, 0)
        );
        // Persisted: a reopened file reports the same.
        drop(s);
        let st = Store::open_with(dir.path(), limits)
            .unwrap()
            .stats()
            .unwrap();
        assert_eq!(st.dropped_oldest, 150);
    }

    #[test]
    fn drop_newest_keeps_the_oldest_and_counts_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            max_messages: 100,
            when_full: WhenFull::DropNewest,
            ..Limits::default()
        };
        let mut s = Store::open_with(dir.path(), limits).unwrap();
        let mut refused = 0;
        for chunk in 0..25 {
            refused += s
                .append(&msgs(chunk * 10 + 1..=chunk * 10 + 10))
                .unwrap()
                .dropped_newest;
        }
        assert_eq!(refused, 150);
        assert_eq!(seqs(&s), (1..=100).collect::<Vec<_>>());
        assert_eq!(s.stats().unwrap().dropped_newest, 150);
        // Room again after acknowledgements; seq continues without a gap.
        s.ack(&[1, 2]).unwrap();
        assert_eq!(
            s.append(&msgs(1..=3)).unwrap(),
            Appended {
                last_seq: 102,
                inserted: 2,
                dropped_oldest: 0,
                dropped_newest: 1
            }
        );
    }

    #[test]
    fn the_file_stays_within_max_bytes_across_fill_and_drain_cycles() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            max_bytes: 256 * 1024,
            ..Limits::default()
        };
        let mut s = Store::open_with(dir.path(), limits).unwrap();
        let mut sizes = Vec::new();
        let mut next = 1;
        for _cycle in 0..10 {
            // Fill well past the budget …
            for _ in 0..80 {
                s.append(&msgs(next..=next + 99)).unwrap();
                next += 100;
            }
            let st = s.stats().unwrap();
            assert!(st.bytes <= limits.max_bytes, "{st:?}");
            assert!(st.dropped_oldest > 0);
            // … then drain everything.
            let all = seqs(&s);
            s.ack(&all).unwrap();
            let size = |f: &str| std::fs::metadata(dir.path().join(f)).map_or(0, |m| m.len());
            sizes.push(size("queue.db"));
            assert!(
                size("queue.db-wal") <= (8 << 20) + 64 * 1024,
                "the WAL is truncated to its limit"
            );
        }
        // Freed pages are reused: the file never grows past its budget (plus one batch), and
        // once it has reached its working size it stays there.
        for size in &sizes {
            assert!(*size <= limits.max_bytes + 64 * 1024, "sizes {sizes:?}");
        }
        assert!(sizes[2..].iter().all(|s| *s == sizes[1]), "sizes {sizes:?}");
    }

    #[test]
    fn readings_queued_longer_than_max_age_expire_and_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            max_age: Duration::from_secs(600),
            ..Limits::default()
        };
        let mut s = Store::open_with(dir.path(), limits).unwrap();
        s.append(&msgs(1..=5)).unwrap();
        // Rows 1..=3 entered at t0, rows 4..=5 five minutes later (dated by hand).
        let t0 = std::time::Instant::now();
        let t5 = t0 + Duration::from_secs(300);
        s.ages.marks = [(3, t0, t0), (5, t5, t5)].into();
        assert_eq!(s.expire(t0 + Duration::from_secs(599)).unwrap(), 0);
        assert_eq!(s.expire(t0 + Duration::from_secs(601)).unwrap(), 3);
        assert_eq!(seqs(&s), vec![4, 5]);
        assert_eq!(s.stats().unwrap().dropped_expired, 3);
        assert_eq!(s.stats().unwrap().depth, 2);
    }

    /// Acceptance testing (#10): a Pi without a real-time clock stamps readings with a wrong
    /// time until NTP steps the clock; `max_age` by the readings' timestamps then dropped good
    /// readings. Age is time spent in the queue by the monotonic clock: a reading stamped 1970
    /// is kept, and a reading found at start counts from the start.
    #[test]
    fn a_wall_clock_step_never_expires_a_reading() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            max_age: Duration::from_secs(3600),
            ..Limits::default()
        };
        let mut s = Store::open_with(dir.path(), limits).unwrap();
        let epoch_1970 = Message {
            ts_ms: 1_000,
            ..msg(1)
        };
        s.append(&[epoch_1970, msg(2)]).unwrap();
        let now = std::time::Instant::now();
        assert_eq!(s.expire(now + Duration::from_secs(60)).unwrap(), 0);
        assert_eq!(seqs(&s), vec![1, 2]);
        s.close().unwrap();
        // After a restart (the clock synced meanwhile), the rows count from the start.
        let mut s = Store::open_with(dir.path(), limits).unwrap();
        let start = std::time::Instant::now();
        assert_eq!(s.expire(start + Duration::from_secs(3599)).unwrap(), 0);
        assert_eq!(s.expire(start + Duration::from_secs(3601)).unwrap(), 2);
    }

    #[test]
    fn queue_ages_are_kept_per_minute_and_date_rows_late_not_early() {
        let mut a = Ages::default();
        let t0 = std::time::Instant::now();
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

    /// Review of #10: replacing a corrupt file while running opened the new file before the old
    /// connection was closed; closing it then deleted `queue.db-wal` by name — the new file's —
    /// so its commits vanished at the next crash. Two replacements in one millisecond must not
    /// overwrite each other's aside file either.
    #[test]
    fn a_file_replaced_while_running_keeps_what_is_committed_to_it_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        s.append(&msgs(1..=5)).unwrap();
        s.replace_corrupt().unwrap();
        s.replace_corrupt().unwrap();
        let asides = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                let name = name.to_string_lossy();
                name.contains(".corrupt-") && !name.ends_with("-wal") && !name.ends_with("-shm")
            })
            .count();
        assert_eq!(asides, 2, "each replaced file kept under its own name");
        let floor = s.last_seq;
        assert!(
            dir.path().join("queue.db-wal").exists(),
            "the new file's WAL is still there"
        );
        s.append(&msgs(6..=8)).unwrap();
        // A crash: the connection is never closed, the WAL never checkpointed.
        std::mem::forget(s);
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(seqs(&s), vec![floor + 1, floor + 2, floor + 3]);
    }

    /// Review of #10: drop_oldest deleted rows in flight at the uplink (probably delivered),
    /// then counted them as dropped. It spares them while other rows can go instead.
    #[test]
    fn drop_oldest_spares_the_rows_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            max_messages: 10,
            ..Limits::default()
        };
        let mut s = Store::open_with(dir.path(), limits).unwrap();
        s.append(&msgs(1..=10)).unwrap();
        s.in_flight_upto = 3; // 1..=3 published, awaiting PUBACK
        s.append(&msgs(11..=12)).unwrap();
        assert_eq!(seqs(&s), vec![1, 2, 3, 6, 7, 8, 9, 10, 11, 12]);
        // With nothing but in-flight rows left to drop, the bound still holds.
        s.in_flight_upto = 12;
        s.append(&msgs(13..=14)).unwrap();
        assert_eq!(seqs(&s), vec![3, 6, 7, 8, 9, 10, 11, 12, 13, 14]);
        assert_eq!(s.stats().unwrap().dropped_oldest, 4);
    }

    #[test]
    fn a_corrupt_file_is_moved_aside_and_seq_keeps_growing() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        s.append(&msgs(1..=5)).unwrap();
        s.close().unwrap();
        std::fs::write(
            dir.path().join("queue.db"),
            b"this is not a database, it is a mess".repeat(200),
        )
        .unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with("queue.db.corrupt-"))
            .collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
        let seq = s.append(&[msg(6)]).unwrap().last_seq;
        assert!(
            seq > 5,
            "a new seq ({seq}) is above every seq of the old file"
        );
    }

    #[test]
    fn acked_since_start_counts_from_this_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        s.append(&msgs(1..=5)).unwrap();
        s.ack(&[1, 2]).unwrap();
        s.close().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        s.ack(&[3]).unwrap();
        let st = s.stats().unwrap();
        assert_eq!((st.acked_total, st.acked_since_start), (3, 1));
    }

    #[tokio::test]
    async fn the_thread_commits_everything_before_it_exits() {
        let dir = tempfile::tempdir().unwrap();
        let (h, join) = spawn(Store::open(dir.path()).unwrap()).unwrap();
        for i in 0..100 {
            h.enqueue(vec![msg(i)]).unwrap();
        }
        drop(h);
        join.join().unwrap();
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.stats().unwrap().depth, 100);
    }

    #[tokio::test]
    async fn committed_tells_the_uplink_about_new_rows() {
        let dir = tempfile::tempdir().unwrap();
        let (h, _join) = spawn(Store::open(dir.path()).unwrap()).unwrap();
        let mut c = h.committed();
        assert_eq!(*c.borrow_and_update(), 0);
        h.enqueue(vec![msg(1), msg(2)]).unwrap();
        c.changed().await.unwrap();
        assert_eq!(*c.borrow(), 2);
        assert_eq!(h.peek(0, 10).await.unwrap().len(), 2);
    }
}
