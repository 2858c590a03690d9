//! The store thread: owns the queue file's connection, takes the pollers' readings and the
//! uplink's acknowledgements over a channel, commits each batch in one transaction, answers
//! reads, expires, repairs a corrupt file, and holds readings in memory while the disk refuses
//! them. Pollers never wait for it.

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use tokio::sync::{oneshot, watch};

use super::fresh::{Batch, Fresh};
use super::{ACKS_DURABLE_WITHIN, GATHER, MAX_HELD, Stats, Store, StoreError};
use crate::message::Message;

enum Cmd {
    Enqueue(Vec<Message>),
    Peek {
        after: u64,
        limit: usize,
        reply: oneshot::Sender<Result<Batch, String>>,
    },
    SetAside(Vec<(u64, String)>),
    Stats(oneshot::Sender<Result<Stats, String>>),
}

/// The way pollers and the uplink reach the store thread. Cheap to clone.
#[derive(Clone)]
pub struct StoreHandle {
    tx: mpsc::Sender<Cmd>,
    committed: watch::Receiver<u64>,
    /// The highest seq the uplink has in flight (0: none).
    in_flight: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Rows just committed, for an uplink that has read everything before them.
    fresh: std::sync::Arc<Fresh>,
    /// Acknowledged seqs, taken by the store thread whenever it wakes.
    acks: std::sync::Arc<std::sync::Mutex<Acks>>,
}

/// Acknowledged seqs waiting for the store thread, and since when the oldest waits.
///
/// Handed over without a message: waking the store thread for them (the uplink flushes ten
/// times a second) cost a thread switch and a read transaction each time. The store thread
/// takes them whenever it wakes — for the next poll's readings, any question, or at least once
/// a second — before anything else, so every question asked after an acknowledgement sees it,
/// and their deletes are made durable within [`ACKS_DURABLE_WITHIN`] counted from here.
#[derive(Debug, Default)]
struct Acks {
    seqs: Vec<u64>,
    since: Option<std::time::Instant>,
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

    /// Up to `limit` rows with `seq > after`, oldest first, read from the file by the store
    /// thread; see [`take_fresh`](StoreHandle::take_fresh) for the way without it.
    pub async fn peek(&self, after: u64, limit: usize) -> Result<Batch, StoreError> {
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

    /// [`peek`](StoreHandle::peek) without the store thread, when the rows after `after` are
    /// the ones just committed (the reader is caught up); `None`: peek.
    pub fn take_fresh(&self, after: u64, limit: usize) -> Option<Batch> {
        self.fresh.take(after, limit)
    }

    /// A new reader (an uplink session) starts from the file: see [`Fresh::restart`].
    pub fn new_reader(&self) {
        self.fresh.restart();
    }

    /// Deletes acknowledged rows: handed over without waking the store thread, which takes
    /// them at its next wake-up (at least once a second) and deletes them in batches.
    pub fn ack(&self, seqs: Vec<u64>) {
        if seqs.is_empty() {
            return;
        }
        let mut acks = self.acks.lock().unwrap_or_else(|p| p.into_inner());
        acks.since.get_or_insert_with(std::time::Instant::now);
        acks.seqs.extend(seqs);
    }

    /// Moves rows that can never be published out of the queue, into its `aside` table.
    /// Moves rows to the `aside` table, each with its reason.
    pub fn set_aside(&self, seqs: Vec<(u64, String)>) -> Result<(), StoreError> {
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
    let worker = Worker::new(store, committed_tx, seen);
    let (fresh, acks) = (worker.fresh.clone(), worker.acks.clone());
    let join = thread::Builder::new()
        .name("fieldgate-store".into())
        .spawn(move || worker.run(rx))
        .expect("spawning a thread");
    Ok((
        StoreHandle {
            tx,
            committed,
            in_flight,
            fresh,
            acks,
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
    /// Each commit's rows, handed to a caught-up uplink.
    fresh: std::sync::Arc<Fresh>,
    /// Acknowledgements handed over by the uplink, taken at every wake-up.
    acks: std::sync::Arc<std::sync::Mutex<Acks>>,
    /// Messages not yet committed (the disk refused them so far).
    unsaved: Vec<Message>,
    /// Acknowledged seqs not yet deleted.
    unacked: Vec<u64>,
    /// Held messages dropped because memory was full, not yet added to the file's counter.
    dropped_held: u64,
    failing: bool,
    /// The error that made it fail, while it does (for the status views).
    write_error: Option<String>,
    /// Drops by a bound since the last log line (logged at most once a minute).
    dropped_unlogged: u64,
    last_drop_log: Option<std::time::Instant>,
    last_expiry: std::time::Instant,
    /// When the file was last replaced after corruption (within the hour).
    repairs: Vec<std::time::Instant>,
    /// Since when acknowledgement deletes wait to be made durable.
    acks_since: Option<std::time::Instant>,
    /// When the oldest reading not yet committed arrived (`commit_interval`).
    unsaved_since: Option<std::time::Instant>,
    /// When a re-queue request was last looked for.
    requeue_checked: std::time::Instant,
    /// While failing: when the held readings are tried again ([`RETRY_EVERY`] after the last
    /// try, whatever the commit interval; #28: with `commit_interval: 0` the wait was zero and
    /// the thread retried in a loop, 89-99 % of a core on a full disk).
    retry_at: Option<std::time::Instant>,
    /// Held readings dropped in this failing episode (logged once when it begins, and in
    /// total when writes work again).
    dropped_in_episode: u64,
}

/// How often held readings are tried again while the disk refuses them.
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// Size of `queue.reserve`, the room kept beside the queue for a stop on a full disk: deleted
/// then, it lets the readings held in memory be saved (some hundreds) and the rest counted.
const RESERVE: usize = 256 * 1024;

/// Where the reserve lives: beside the queue file.
fn reserve_path(store: &Store) -> std::path::PathBuf {
    store.path().with_file_name("queue.reserve")
}

/// Writes the reserve if it is not there (best effort: on a full disk it waits for the next
/// start).
fn keep_reserve(store: &Store) {
    let path = reserve_path(store);
    if std::fs::metadata(&path).is_ok_and(|m| m.len() as usize >= RESERVE) {
        return;
    }
    if let Err(e) = std::fs::write(&path, vec![0u8; RESERVE]) {
        let _ = std::fs::remove_file(&path);
        tracing::debug!(error = %e, "queue: cannot keep the reserve beside the queue yet");
    }
}

/// Most corrupt-file replacements an hour.
const REPAIRS_PER_HOUR: usize = 3;

impl Worker {
    fn new(
        store: Store,
        committed: watch::Sender<u64>,
        in_flight: std::sync::Arc<std::sync::atomic::AtomicU64>,
    ) -> Worker {
        let fresh = std::sync::Arc::new(Fresh::new(store.last_seq));
        Worker {
            store,
            committed,
            in_flight,
            fresh,
            acks: Default::default(),
            unsaved: Vec::new(),
            unacked: Vec::new(),
            dropped_held: 0,
            failing: false,
            write_error: None,
            dropped_unlogged: 0,
            last_drop_log: None,
            // Not `now - 1 h`: that panics on a machine up for less than an hour (a Pi that
            // starts fieldgate at boot). Nothing can be due at start anyway: rows found at
            // start count their age from the start.
            last_expiry: std::time::Instant::now(),
            repairs: Vec::new(),
            acks_since: None,
            unsaved_since: None,
            requeue_checked: std::time::Instant::now(),
            retry_at: None,
            dropped_in_episode: 0,
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Cmd>) {
        keep_reserve(&self.store);
        let mut open = true;
        loop {
            let pending = !self.unsaved.is_empty() || !self.unacked.is_empty();
            if !open && (!pending || self.failing) {
                break;
            }
            // Wake at least once a second for retries and expiry, and when acknowledgement
            // deletes are due to be made durable (with readings flowing, the next append
            // carries them before that).
            let mut wait = Duration::from_secs(1);
            if let Some(due) = self.acks_due() {
                wait = wait.min(due.saturating_duration_since(std::time::Instant::now()));
            }
            let interval = self.store.limits().commit_interval;
            if let Some(since) = self.unsaved_since {
                // While failing, the next try is at the retry pace, not the commit interval's.
                let due = match self.retry_at {
                    Some(at) if self.failing => at,
                    _ => since + interval,
                };
                wait = wait.min(due.saturating_duration_since(std::time::Instant::now()));
            }
            let first = match rx.recv_timeout(wait) {
                Ok(c) => Some(c),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    open = false;
                    None
                }
            };
            // Group commit: readings from buses polled on the same tick arrive within
            // moments of each other; gathering them costs one fsync instead of one each.
            // (With a commit interval, readings gather for that long anyway.) The thread
            // sleeps through the gathering instead of waiting on the channel: a receiver that
            // waits is woken by every send (a thread switch and a contended lock each, ten per
            // tick at ten buses), one that sleeps is woken once.
            let mut cmds: Vec<Cmd> = first.into_iter().collect();
            if interval.is_zero() && matches!(cmds.first(), Some(Cmd::Enqueue(_))) {
                thread::sleep(GATHER);
            }
            cmds.extend(rx.try_iter());
            // Acknowledgements first: the readings' commit below carries their deletes.
            self.take_acks();
            self.delete_acked();
            let mut queries = Vec::new();
            for c in cmds {
                match c {
                    Cmd::Enqueue(m) => self.unsaved.extend(m),
                    q => queries.push(q),
                }
            }
            if self.unsaved.is_empty() {
                self.unsaved_since = None;
            } else {
                let since = *self
                    .unsaved_since
                    .get_or_insert_with(std::time::Instant::now);
                // Due: at once without an interval, when it has passed, at shutdown; while
                // failing, at the retry pace only.
                let due = if self.failing {
                    self.retry_at
                        .is_none_or(|at| std::time::Instant::now() >= at)
                } else {
                    interval.is_zero() || since.elapsed() >= interval || !open
                };
                if due {
                    self.save();
                    if self.unsaved.is_empty() {
                        self.unsaved_since = None;
                    }
                }
            }
            self.sync_acks();
            // A `fieldgate queue requeue` request: looked for once a second.
            let serve = self.requeue_checked.elapsed() >= Duration::from_secs(1);
            if serve {
                self.requeue_checked = std::time::Instant::now();
            }
            match serve
                .then(|| super::requeue::serve(&mut self.store))
                .flatten()
            {
                None => {}
                Some(Ok(n)) => {
                    tracing::info!(
                        rows = n,
                        "queue: readings set aside are queued again (fieldgate queue requeue)"
                    );
                    self.fresh.reset(self.store.last_seq);
                    self.committed.send_replace(self.store.last_seq);
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "queue: cannot re-queue the readings set aside")
                }
            }
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
                        let rows = self.retried(|s| {
                            let rows = s.peek(after, limit)?;
                            // Fewer than asked: every row up to the last seq was there to read.
                            let upto = match rows.last() {
                                Some(last) if rows.len() >= limit => last.seq,
                                _ => s.last_seq.max(after),
                            };
                            Ok(Batch { rows, upto })
                        });
                        let _ = reply.send(rows.map_err(|e| e.to_string()));
                    }
                    Cmd::Stats(reply) => {
                        let stats = self.retried(|s| s.stats()).map(|mut s| {
                            // What only this thread knows: held readings, and those dropped
                            // from memory that the file does not count yet.
                            s.held = self.unsaved.len() as u64;
                            s.write_error = self.write_error.clone();
                            s.dropped_oldest += self.dropped_held;
                            s
                        });
                        let _ = reply.send(stats.map_err(|e| e.to_string()));
                    }
                    Cmd::SetAside(seqs) => {
                        if let Err(e) = self.retried(|s| s.set_aside(&seqs)) {
                            tracing::error!(error = %e, ?seqs, "queue: cannot set unpublishable rows aside");
                        }
                    }
                    Cmd::Enqueue(_) => unreachable!("sorted out above"),
                }
            }
        }
        if !self.unsaved.is_empty() {
            // The disk refused them to the end: the reserve is given up to save what fits.
            let held = self.unsaved.len();
            let _ = std::fs::remove_file(reserve_path(&self.store));
            self.failing = false;
            self.retry_at = None;
            self.save();
            if self.unsaved.len() < held {
                tracing::warn!(
                    saved = held - self.unsaved.len(),
                    "queue: stopping on a refusing disk; held readings saved in the room of queue.reserve"
                );
            }
        }
        if !self.unsaved.is_empty() {
            // They never had a seq: no consumer can see them missing. Counted in the file,
            // with the held ones dropped earlier, if the disk takes that much.
            let lost = self.unsaved.len() as u64;
            let held = self.dropped_held;
            let counted = self
                .store
                .count_unsaved(lost)
                .and_then(|()| self.store.append_counting(&[], held).map(|_| ()));
            match counted {
                Ok(()) => tracing::error!(
                    lost,
                    "stopping with readings the disk refused: lost, counted in the queue's dropped figures (`unsaved`)"
                ),
                Err(e) => tracing::error!(
                    lost,
                    dropped_from_memory = held,
                    error = %e,
                    "stopping with readings the disk refused: lost, and the disk did not take even their count"
                ),
            }
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
            if self.dropped_in_episode == 0 {
                tracing::error!(
                    dropped = n,
                    held = MAX_HELD,
                    "queue: the disk refuses writes and memory is full; dropping the oldest held readings (counted; the total is logged when writes work again)"
                );
            }
            self.dropped_in_episode += n as u64;
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
                            dropped_while_failing = self.dropped_in_episode,
                            "queue writes work again; the readings held in memory are saved"
                        );
                        self.failing = false;
                        self.write_error = None;
                        self.retry_at = None;
                        self.dropped_in_episode = 0;
                    }
                    // Held-and-dropped readings were counted as the oldest dropped in that commit.
                    self.dropped_held = 0;
                    // The first `inserted` got a row each, with consecutive seqs (the rest were
                    // refused by `drop_newest`); a caught-up uplink takes them from memory.
                    let rows = self.unsaved.drain(..n).take(a.inserted as usize);
                    self.fresh.committed(rows, a.last_seq);
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
            Ok(_) => {
                // The new file's seqs start past the old ones: rows kept for the uplink are
                // the old file's.
                self.fresh.reset(self.store.last_seq);
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot replace the corrupt queue file");
                false
            }
        }
    }

    fn fail(&mut self, e: &StoreError) {
        self.retry_at = Some(std::time::Instant::now() + RETRY_EVERY);
        self.write_error = Some(e.to_string());
        if !self.failing {
            tracing::error!(error = %e, held = self.unsaved.len(), file = %self.store.path().display(),
                "cannot write to the queue; holding readings in memory and retrying every second");
            self.failing = true;
        }
    }

    /// When the acknowledgement deletes waiting must be committed on their own: a little
    /// before [`ACKS_DURABLE_WITHIN`] has passed since the oldest was handed over (with a
    /// commit interval the deletes ride on its commits, so within that). `None`: none waits.
    fn acks_due(&self) -> Option<std::time::Instant> {
        if self.store.undurable_acks() == 0 {
            return None;
        }
        let within = ACKS_DURABLE_WITHIN.max(self.store.limits().commit_interval);
        let since = self.acks_since.unwrap_or_else(std::time::Instant::now);
        Some(since + within.saturating_sub(Duration::from_millis(250)))
    }

    /// Makes acknowledgement deletes durable once they are due (see
    /// [`acks_due`](Worker::acks_due)) without a durable commit (a reading's append) carrying
    /// them.
    fn sync_acks(&mut self) {
        if self.store.undurable_acks() == 0 {
            self.acks_since = None;
            return;
        }
        self.acks_since.get_or_insert_with(std::time::Instant::now);
        if self
            .acks_due()
            .is_some_and(|due| std::time::Instant::now() >= due)
        {
            match self.retried(|s| s.sync_acks()) {
                Ok(()) => self.acks_since = None,
                Err(e) => {
                    tracing::debug!(error = %e, "queue: cannot sync acknowledgement deletes yet")
                }
            }
        }
    }

    /// Takes the acknowledgements the uplink handed over; the wait for their durable delete
    /// counts from when they were handed over.
    fn take_acks(&mut self) {
        let mut acks = self.acks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(since) = acks.since.take() {
            self.unacked.append(&mut acks.seqs);
            self.acks_since = Some(self.acks_since.map_or(since, |s| s.min(since)));
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
    use super::super::tests::msgs;
    use super::*;

    fn corrupt() -> StoreError {
        StoreError::Query(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
            None,
        ))
    }

    fn asides(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir)
            .unwrap()
            .filter(|e| {
                let n = e
                    .as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .into_owned();
                n.contains(".corrupt-") && !n.ends_with("-wal") && !n.ends_with("-shm")
            })
            .count()
    }

    /// #16: ten buses polled on the same tick hand their readings over within moments of each
    /// other. The store thread sleeps through the gathering (one wake-up, not one per bus) and
    /// commits them together; the acknowledgements handed over before the tick are deleted by
    /// that same commit — not left for a commit of their own later.
    #[tokio::test]
    async fn a_tick_of_ten_buses_and_the_acknowledgements_before_it_cost_one_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (h, join) = spawn(Store::open(dir.path()).unwrap()).unwrap();
        let mut committed = h.committed();
        h.enqueue(msgs(1..=4)).unwrap();
        committed.wait_for(|s| *s >= 4).await.unwrap();
        let before = h.stats().await.unwrap();
        h.ack(vec![1, 2, 3, 4]);
        for bus in 0..10 {
            h.enqueue(msgs(5 + bus * 2..=6 + bus * 2)).unwrap();
        }
        committed.wait_for(|s| *s >= 24).await.unwrap();
        let after = h.stats().await.unwrap();
        assert_eq!(after.commits, before.commits + 1, "one commit for the tick");
        assert_eq!(
            after.acked_total,
            before.acked_total + 4,
            "the deletes rode on the readings' commit"
        );
        assert_eq!(after.depth, 20);
        drop(h);
        join.join().unwrap();
    }

    /// Review of #10: corruption found on a read path (peek, ack, expire, stats) was not
    /// repaired — only writes replaced the file. Any path now replaces it and tries once more,
    /// at most three times an hour.
    #[test]
    fn corruption_on_a_read_path_replaces_the_file_and_retries_a_bounded_number_of_times() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (committed, _rx) = watch::channel(0);
        let mut w = Worker::new(store, committed, Default::default());
        // A read that finds the file corrupt once: replaced, retried, answered.
        let mut calls = 0;
        let rows = w.retried(|s| {
            calls += 1;
            if calls == 1 {
                Err(corrupt())
            } else {
                s.peek(0, 10)
            }
        });
        assert!(rows.unwrap().is_empty());
        assert_eq!(calls, 2);
        assert_eq!(asides(dir.path()), 1, "the corrupt file moved aside");
        // Two more repairs are allowed this hour; the fourth corruption is reported, not
        // repaired (a dying card is not churned through).
        for _ in 0..2 {
            assert!(w.retried(|_| Err::<(), _>(corrupt())).is_err());
        }
        assert_eq!(asides(dir.path()), 3);
        assert!(w.retried(|_| Err::<(), _>(corrupt())).is_err());
        assert_eq!(
            asides(dir.path()),
            3,
            "no fourth replacement within the hour"
        );
        // Other errors are never taken for corruption.
        let busy = StoreError::Query(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            None,
        ));
        assert!(!w.repair(&busy));
    }
}
