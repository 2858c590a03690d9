//! The store-and-forward queue: every message is committed here before it is published.
//!
//! # Design
//!
//! One SQLite file, `{state_dir}/queue.db`, one table:
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
//! ```
//!
//! Invariants:
//! - `seq` is assigned by SQLite when the row is inserted. `AUTOINCREMENT` keeps the highest
//!   `seq` ever used in `sqlite_sequence`, so a `seq` is never reused, even after every row was
//!   deleted and the gateway restarted; a rolled-back insert rolls that counter back too, so the
//!   sequence has no gaps. A consumer can order and de-duplicate by `seq` alone.
//! - A row exists until the broker acknowledged it (PUBACK for QoS 1, PUBCOMP for QoS 2; a QoS 0
//!   row once it was written to the socket). Only [`Store::ack`] deletes, and only the uplink calls
//!   it, only for those acknowledgements.
//! - Rows are published oldest first (`ORDER BY seq`), so replay keeps `seq` order.
//!
//! Durability: WAL journal with `synchronous = FULL`, so a commit is on disk (the WAL fsynced)
//! when [`Store::append`] returns; a `kill -9` or a power loss after that loses nothing. To keep
//! SD-card writes low, every message waiting when the store thread wakes goes into one
//! transaction: one fsync per poll cycle, not per reading.
//!
//! Concurrency: one thread owns the connection ([`spawn`]); pollers and the uplink talk to it
//! through a [`StoreHandle`]. Enqueueing never waits for the disk; the caller only hands the
//! batch to the thread. If a commit fails (disk full, I/O error) the batch stays in memory and
//! is retried every second, so a transient fault loses nothing; it is logged once per episode.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, params};
use tokio::sync::{oneshot, watch};

use crate::message::{Body, Message, Stored};

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
    #[error("the store thread has stopped")]
    Closed,
    #[error("queue database: {0}")]
    Thread(String),
}

/// Queue depth and age, for status reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub depth: u64,
    pub oldest_ts_ms: Option<i64>,
    pub last_seq: u64,
}

/// The queue file. Synchronous; see [`spawn`] for the thread that owns it in the gateway.
pub struct Store {
    conn: Connection,
}

impl Store {
    /// Opens (or creates) `{state_dir}/queue.db`.
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(state_dir).map_err(|source| StoreError::StateDir {
            path: state_dir.to_path_buf(),
            source,
        })?;
        let path = state_dir.join("queue.db");
        let wrap = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let conn = Connection::open_with_flags(
            &path,
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
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS queue (
                seq    INTEGER PRIMARY KEY AUTOINCREMENT,
                ts_ms  INTEGER NOT NULL,
                topic  TEXT    NOT NULL,
                qos    INTEGER NOT NULL,
                retain INTEGER NOT NULL,
                body   TEXT    NOT NULL
            );",
        )
        .map_err(wrap)?;
        Ok(Store { conn })
    }

    /// Appends `msgs` in one transaction; returns the highest `seq` now in use.
    pub fn append(&mut self, msgs: &[Message]) -> Result<u64, StoreError> {
        let tx = self.conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO queue (ts_ms, topic, qos, retain, body) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for m in msgs {
                let body = serde_json::to_string(&m.body).expect("plain data serializes");
                stmt.execute(params![m.ts_ms, m.topic, m.qos, m.retain, body])?;
            }
        }
        tx.commit()?;
        self.last_seq()
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

    /// Deletes acknowledged rows in one transaction; returns how many were deleted.
    pub fn ack(&mut self, seqs: &[u64]) -> Result<usize, StoreError> {
        let tx = self.conn.transaction()?;
        let mut n = 0;
        {
            let mut stmt = tx.prepare_cached("DELETE FROM queue WHERE seq = ?1")?;
            for s in seqs {
                n += stmt.execute(params![*s as i64])?;
            }
        }
        tx.commit()?;
        Ok(n)
    }

    pub fn stats(&self) -> Result<Stats, StoreError> {
        let (depth, oldest): (i64, Option<i64>) =
            self.conn
                .query_row("SELECT count(*), min(ts_ms) FROM queue", [], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?;
        Ok(Stats {
            depth: depth as u64,
            oldest_ts_ms: oldest,
            last_seq: self.last_seq()?,
        })
    }

    /// The highest `seq` ever assigned (0 for a new file).
    pub fn last_seq(&self) -> Result<u64, StoreError> {
        let seq: Option<i64> = self
            .conn
            .query_row(
                "SELECT seq FROM sqlite_sequence WHERE name = 'queue'",
                [],
                |r| r.get(0),
            )
            .or_else(|e| match e {
                rusqlite::Error::QueryReturnedNoRows => Ok(None),
                e => Err(e),
            })?;
        Ok(seq.unwrap_or(0) as u64)
    }
}

enum Cmd {
    Enqueue(Vec<Message>),
    Peek {
        after: u64,
        limit: usize,
        reply: oneshot::Sender<Result<Vec<Stored>, String>>,
    },
    Ack(Vec<u64>),
    Stats(oneshot::Sender<Result<Stats, String>>),
}

/// The way pollers and the uplink reach the store thread. Cheap to clone.
#[derive(Clone)]
pub struct StoreHandle {
    tx: mpsc::Sender<Cmd>,
    committed: watch::Receiver<u64>,
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

    pub async fn stats(&self) -> Result<Stats, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Stats(reply))
            .map_err(|_| StoreError::Closed)?;
        rx.await
            .map_err(|_| StoreError::Closed)?
            .map_err(StoreError::Thread)
    }

    /// Changes whenever new rows are committed; holds the highest committed `seq`.
    pub fn committed(&self) -> watch::Receiver<u64> {
        self.committed.clone()
    }
}

/// Starts the thread that owns `store`. It runs until every [`StoreHandle`] is dropped, then
/// commits whatever is still waiting and returns; join the handle to be sure it did.
pub fn spawn(store: Store) -> Result<(StoreHandle, thread::JoinHandle<()>), StoreError> {
    let (tx, rx) = mpsc::channel();
    let (committed_tx, committed) = watch::channel(store.last_seq()?);
    let join = thread::Builder::new()
        .name("fieldgate-store".into())
        .spawn(move || run(store, rx, committed_tx))
        .expect("spawning a thread");
    Ok((StoreHandle { tx, committed }, join))
}

fn run(mut store: Store, rx: mpsc::Receiver<Cmd>, committed: watch::Sender<u64>) {
    let mut unsaved: Vec<Message> = Vec::new();
    let mut unacked: Vec<u64> = Vec::new();
    let mut failing = false;
    let mut open = true;
    while open || !unsaved.is_empty() || !unacked.is_empty() {
        let first = if unsaved.is_empty() && unacked.is_empty() {
            rx.recv().ok()
        } else {
            match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(c) => Some(c),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    open = false;
                    None
                }
            }
        };
        if first.is_none() && unsaved.is_empty() && unacked.is_empty() {
            break; // every handle dropped and nothing left to write
        }
        let mut cmds: Vec<Cmd> = first.into_iter().collect();
        while let Ok(c) = rx.try_recv() {
            cmds.push(c);
        }
        let mut queries = Vec::new();
        for c in cmds {
            match c {
                Cmd::Enqueue(m) => unsaved.extend(m),
                Cmd::Ack(s) => unacked.extend(s),
                q => queries.push(q),
            }
        }
        if !unsaved.is_empty() {
            match store.append(&unsaved) {
                Ok(last) => {
                    if failing {
                        tracing::info!(
                            count = unsaved.len(),
                            "queue writes work again; readings held in memory are saved"
                        );
                        failing = false;
                    }
                    unsaved.clear();
                    committed.send_replace(last);
                }
                Err(e) => {
                    if !failing {
                        tracing::error!(error = %e, held = unsaved.len(), "cannot write to the queue; holding readings in memory and retrying every second");
                        failing = true;
                    }
                }
            }
        }
        if !unacked.is_empty() {
            match store.ack(&unacked) {
                Ok(_) => unacked.clear(),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot delete acknowledged rows; retrying (they may be published twice)")
                }
            }
        }
        for q in queries {
            match q {
                Cmd::Peek {
                    after,
                    limit,
                    reply,
                } => {
                    let _ = reply.send(store.peek(after, limit).map_err(|e| e.to_string()));
                }
                Cmd::Stats(reply) => {
                    let _ = reply.send(store.stats().map_err(|e| e.to_string()));
                }
                Cmd::Enqueue(_) | Cmd::Ack(_) => unreachable!("sorted out above"),
            }
        }
        if !open && failing {
            // Shutting down while the disk refuses writes: we cannot keep them.
            tracing::error!(
                lost = unsaved.len(),
                "shutting down with readings the queue could not save"
            );
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::Value;

    fn msg(i: i64) -> Message {
        Message {
            topic: format!("t/{i}"),
            qos: 1,
            retain: false,
            ts_ms: 1_000 + i,
            body: Body::Point {
                value: Value::Int(i),
                unit: None,
            },
        }
    }

    #[test]
    fn seq_is_gapless_and_survives_deletes_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        assert_eq!(s.append(&[msg(1), msg(2), msg(3)]).unwrap(), 3);
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
        assert_eq!(s.append(&[msg(4)]).unwrap(), 4);
        assert_eq!(s.peek(0, 10).unwrap()[0].seq, 4);
    }

    #[test]
    fn peek_is_oldest_first_after_a_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        s.append(&(1..=10).map(msg).collect::<Vec<_>>()).unwrap();
        let rows = s.peek(4, 3).unwrap();
        assert_eq!(
            rows.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![5, 6, 7]
        );
    }

    #[test]
    fn ack_out_of_order_deletes_only_those_rows() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        s.append(&(1..=5).map(msg).collect::<Vec<_>>()).unwrap();
        s.ack(&[4, 2]).unwrap();
        let rows = s.peek(0, 10).unwrap();
        assert_eq!(
            rows.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![1, 3, 5]
        );
        let st = s.stats().unwrap();
        assert_eq!((st.depth, st.oldest_ts_ms, st.last_seq), (3, Some(1001), 5));
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
