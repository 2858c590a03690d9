//! The queue's unit tests: the design's invariants, one by one.

use super::*;
use crate::mapping::Value;

/// 2026-11-26, so the default max_age keeps them.
pub(super) const T0: i64 = 1_795_665_600_000;

pub(super) fn msg(i: i64) -> Message {
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

pub(super) fn msgs(r: std::ops::RangeInclusive<i64>) -> Vec<Message> {
    r.map(msg).collect()
}

pub(super) fn seqs(s: &Store) -> Vec<u64> {
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
    use crate::mapping::{DataType, Point};
    use crate::modbus::Table;
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

/// #16: acknowledgements are looked up and deleted per run of consecutive seqs; runs with
/// gaps, repeats, rows already gone and rows acknowledged twice still count and delete exactly.
#[test]
fn acknowledged_runs_with_gaps_and_repeats_delete_exactly_those_rows() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path()).unwrap();
    s.append(&msgs(1..=20)).unwrap();
    assert_eq!(s.ack(&[3, 4, 5, 9, 10, 7, 5, 15]).unwrap(), 7);
    assert_eq!(
        s.ack(&[10, 11, 12]).unwrap(),
        2,
        "10 was acknowledged already"
    );
    assert_eq!(s.ack(&[21, 22]).unwrap(), 0, "never queued");
    s.append(&msgs(21..=21)).unwrap(); // the deletes ride on this commit
    assert_eq!(seqs(&s), vec![1, 2, 6, 8, 13, 14, 16, 17, 18, 19, 20, 21]);
    let st = s.stats().unwrap();
    assert_eq!((st.depth, st.acked_total), (12, 9));
    // A run that spans rows already deleted counts only what is left.
    assert_eq!(s.ack(&[12, 13, 14, 15, 16]).unwrap(), 3);
    s.sync_acks().unwrap();
    assert_eq!(s.stats().unwrap().acked_total, 12);
    assert_eq!(seqs(&s), vec![1, 2, 6, 8, 17, 18, 19, 20, 21]);
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
    s.ages.marks = [(3, t0, t0, 3), (5, t5, t5, 5)].into();
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
    // The old rows read (the file was not really corrupt): salvaged with their seqs (#28).
    assert_eq!(
        seqs(&s),
        vec![1, 2, 3, 4, 5, floor + 1, floor + 2, floor + 3]
    );
}

/// Review of #10: a wall clock that steps between two commits is logged and counted, so a
/// consumer who sees odd `ts` values can tell why from the status.
#[test]
fn a_wall_clock_step_between_commits_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path()).unwrap();
    s.append(&msgs(1..=1)).unwrap();
    s.append(&msgs(2..=2)).unwrap();
    assert_eq!(
        s.stats().unwrap().clock_steps,
        0,
        "no step between close commits"
    );
    // As if the wall clock had said a minute earlier at the last commit: NTP stepped it.
    let (wall, mono) = s.clock.unwrap();
    s.clock = Some((wall - 60_000, mono));
    s.append(&msgs(3..=3)).unwrap();
    assert_eq!(s.stats().unwrap().clock_steps, 1);
    s.append(&msgs(4..=4)).unwrap();
    assert_eq!(s.stats().unwrap().clock_steps, 1, "one step, counted once");
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
    assert_eq!(h.peek(0, 10).await.unwrap().rows.len(), 2);
}

/// Waits until the store thread has committed up to `seq`.
async fn committed_upto(h: &StoreHandle, seq: u64) {
    let mut c = h.committed();
    tokio::time::timeout(Duration::from_secs(10), c.wait_for(|s| *s >= seq))
        .await
        .expect("committed in time")
        .unwrap();
}

/// #16: an uplink that has read everything takes each new commit's rows from memory — the
/// rows, seqs and bodies the file holds, none twice — and one behind them reads the file.
#[tokio::test]
async fn a_caught_up_reader_takes_each_commit_from_memory_as_the_file_holds_it() {
    let dir = tempfile::tempdir().unwrap();
    let (h, _join) = spawn(Store::open(dir.path()).unwrap()).unwrap();
    h.enqueue(msgs(1..=2)).unwrap();
    committed_upto(&h, 2).await;
    assert!(h.take_fresh(0, 10).is_none(), "behind: read the file");
    let read = h.peek(0, 10).await.unwrap();
    assert_eq!(read.rows.len(), 2);
    assert_eq!(read.upto, 2, "everything up to the last seq was read");
    assert!(h.take_fresh(read.upto, 10).unwrap().rows.is_empty());

    h.enqueue(msgs(3..=5)).unwrap();
    committed_upto(&h, 5).await;
    let memory = h.take_fresh(2, 10).expect("caught up: from memory");
    let file = h.peek(2, 10).await.unwrap();
    assert_eq!(memory.rows, file.rows);
    assert_eq!(
        memory.rows.iter().map(|r| r.seq).collect::<Vec<_>>(),
        [3, 4, 5]
    );
    assert_eq!((memory.upto, file.upto), (5, 5));
    assert!(h.take_fresh(5, 10).unwrap().rows.is_empty(), "none twice");
}

/// #16: with `drop_newest`, the readings refused by a full queue have no row, so they are not
/// handed out from memory either.
#[tokio::test]
async fn readings_a_full_queue_refuses_are_not_handed_out_from_memory() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_messages: 3,
        when_full: WhenFull::DropNewest,
        ..Limits::default()
    };
    let (h, _join) = spawn(Store::open_with(dir.path(), limits).unwrap()).unwrap();
    assert!(h.take_fresh(0, 10).unwrap().rows.is_empty());
    h.enqueue(msgs(1..=5)).unwrap();
    committed_upto(&h, 3).await;
    let memory = h.take_fresh(0, 10).unwrap();
    assert_eq!(memory.rows, h.peek(0, 10).await.unwrap().rows);
    assert_eq!(
        memory
            .rows
            .iter()
            .map(|r| r.message.topic.as_str())
            .collect::<Vec<_>>(),
        ["t/1", "t/2", "t/3"]
    );
    assert_eq!(memory.upto, 3);
}

/// #16: acknowledgement deletes are not fsynced on their own; the next durable commit (a
/// reading's append) carries them, and only durable commits are counted as such.
#[test]
fn acknowledgement_deletes_ride_on_the_next_durable_commit() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path()).unwrap();
    s.append(&msgs(1..=10)).unwrap();
    let durable = s.stats().unwrap().commits;
    assert_eq!(s.ack(&[1, 2, 3]).unwrap(), 3);
    assert_eq!(s.undurable_acks(), 3);
    assert_eq!(
        s.stats().unwrap().commits,
        durable,
        "an ack commit is not an fsync"
    );
    assert_eq!(
        seqs(&s),
        (4..=10).collect::<Vec<_>>(),
        "deleted all the same"
    );
    s.append(&msgs(11..=11)).unwrap();
    assert_eq!(
        s.undurable_acks(),
        0,
        "the append's fsync covers the deletes before it"
    );
    assert_eq!(s.stats().unwrap().commits, durable + 1);
    s.ack(&[4]).unwrap();
    s.sync_acks().unwrap();
    assert_eq!(s.undurable_acks(), 0);
    assert_eq!(s.stats().unwrap().commits, durable + 2);
    s.sync_acks().unwrap();
    assert_eq!(
        s.stats().unwrap().commits,
        durable + 2,
        "nothing to sync: no fsync"
    );
    // The connection is back at FULL for what follows.
    let sync: i64 = s
        .conn
        .query_row("PRAGMA synchronous", [], |r| r.get(0))
        .unwrap();
    assert_eq!(sync, 2, "synchronous = FULL");
}

/// #16, the bound: with no reading coming to carry them, the store thread makes the deletes
/// durable within ACKS_DURABLE_WITHIN, so a power cut re-sends at most two seconds of
/// acknowledged rows.
#[tokio::test]
async fn idle_acknowledgement_deletes_are_made_durable_within_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let (h, join) = spawn(Store::open(dir.path()).unwrap()).unwrap();
    h.enqueue(msgs(1..=5)).unwrap();
    let mut committed = h.committed();
    committed.wait_for(|s| *s >= 5).await.unwrap();
    let before = h.stats().await.unwrap().commits;
    let t = std::time::Instant::now();
    h.ack(vec![1, 2, 3, 4, 5]);
    loop {
        let s = h.stats().await.unwrap();
        if s.commits > before {
            assert_eq!(s.depth, 0);
            break;
        }
        assert!(
            t.elapsed() < ACKS_DURABLE_WITHIN + std::time::Duration::from_millis(500),
            "deletes still not durable after {:?}",
            t.elapsed()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        t.elapsed() >= std::time::Duration::from_millis(500),
        "not fsynced at once: {:?}",
        t.elapsed()
    );
    drop(h);
    join.join().unwrap();
}

/// #16: acknowledgements are handed to the store thread without waking it; the bound holds
/// when nothing else wakes it either (no readings, no questions), counted from the hand-over.
#[tokio::test]
async fn acknowledgements_nobody_asks_about_are_durable_within_the_bound_too() {
    let dir = tempfile::tempdir().unwrap();
    let (h, join) = spawn(Store::open(dir.path()).unwrap()).unwrap();
    h.enqueue(msgs(1..=5)).unwrap();
    h.committed().wait_for(|s| *s >= 5).await.unwrap();
    let before = h.stats().await.unwrap().commits;
    h.ack(vec![1, 2, 3, 4, 5]);
    tokio::time::sleep(ACKS_DURABLE_WITHIN + std::time::Duration::from_millis(100)).await;
    // Read from the file by another connection: what a restart after a power cut would find.
    let other = Store::open_read_only(dir.path()).unwrap();
    assert_eq!(other.stats().unwrap().depth, 0, "the deletes are committed");
    let s = h.stats().await.unwrap();
    assert_eq!((s.depth, s.commits), (0, before + 1));
    drop(h);
    join.join().unwrap();
}

/// #12: an acknowledgement writes nothing on its own; the next commit (a reading's append)
/// deletes the rows in the same transaction, so a poll cycle costs one commit, not two.
#[test]
fn acknowledged_rows_are_deleted_by_the_next_append_in_one_commit() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path()).unwrap();
    s.append(&msgs(1..=4)).unwrap();
    let commits = s.stats().unwrap().commits;
    assert_eq!(s.ack(&[1, 2]).unwrap(), 2);
    assert_eq!(
        s.ack(&[2, 99]).unwrap(),
        0,
        "twice or unknown: not counted again"
    );
    assert_eq!(seqs(&s), vec![3, 4], "gone from peek at once");
    assert_eq!(
        s.peek(0, 1).unwrap()[0].seq,
        3,
        "the limit counts what is left"
    );
    let st = s.stats().unwrap();
    assert_eq!((st.depth, st.acked_total, st.commits), (2, 2, commits));
    let rows: i64 = s
        .conn
        .query_row("SELECT count(*) FROM queue", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 4, "not deleted yet");
    s.append(&msgs(5..=5)).unwrap();
    assert_eq!(
        s.stats().unwrap().commits,
        commits + 1,
        "one commit for both"
    );
    let rows: i64 = s
        .conn
        .query_row("SELECT count(*) FROM queue", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 3);
    assert_eq!(s.stats().unwrap().acked_total, 2);
}

/// The bound of deferring the deletes: a crash before the next commit re-sends the rows
/// acknowledged since the last one — duplicates with their seq, never a lost reading.
#[test]
fn a_crash_before_the_next_commit_re_sends_the_acknowledged_rows() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path()).unwrap();
    s.append(&msgs(1..=3)).unwrap();
    s.ack(&[1, 2]).unwrap();
    std::mem::forget(s); // a crash: no close, no drop
    let s = Store::open(dir.path()).unwrap();
    assert_eq!(seqs(&s), vec![1, 2, 3]);
}

/// `queue.commit_interval`: readings wait in memory and are committed together, once per
/// interval; what waits at shutdown is committed, not dropped.
#[tokio::test]
async fn with_a_commit_interval_readings_are_committed_together() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        commit_interval: Duration::from_millis(800),
        ..Limits::default()
    };
    let (h, join) = spawn(Store::open_with(dir.path(), limits).unwrap()).unwrap();
    let before = h.stats().await.unwrap().commits;
    let t = std::time::Instant::now();
    let committed = h.committed();
    for i in 0..4 {
        h.enqueue(msgs(i * 3 + 1..=i * 3 + 3)).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(*committed.borrow(), 0, "not committed before the interval");
    }
    let mut c = h.committed();
    c.wait_for(|s| *s >= 12).await.unwrap();
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(750) && waited < Duration::from_millis(2000),
        "{waited:?}"
    );
    assert_eq!(
        h.stats().await.unwrap().commits,
        before + 1,
        "one commit for four polls"
    );
    // What waits at shutdown is committed.
    h.enqueue(msgs(13..=14)).unwrap();
    drop(h);
    join.join().unwrap();
    let s = Store::open(dir.path()).unwrap();
    assert_eq!(seqs(&s), (1..=14).collect::<Vec<_>>());
}

/// MQTT 5 (#15): a refused reading is kept with the broker's reason, listed, counted by
/// reason, and re-queued under a new seq with its original time.
#[test]
fn rows_set_aside_keep_their_reason_and_requeue_puts_them_back_after_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path()).unwrap();
    s.append(&msgs(1..=5)).unwrap();
    s.set_aside(&[
        (2, "not authorized (0x87)".to_string()),
        (4, "not authorized (0x87)".to_string()),
        (
            5,
            "packet larger than the broker's maximum packet size (100 bytes)".to_string(),
        ),
    ])
    .unwrap();
    assert_eq!(seqs(&s), vec![1, 3]);
    assert_eq!(s.depth(), 2);
    let stats = s.stats().unwrap();
    assert_eq!(stats.set_aside, 3);
    assert_eq!(stats.aside_by_reason["not authorized (0x87)"], 2);
    let listed = s.aside(Some("not auth"), 10).unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|r| (r.seq, r.topic.as_str()))
            .collect::<Vec<_>>(),
        vec![(2, "t/2"), (4, "t/4")]
    );
    // Only those refused as not authorized go back: after everything queued, original ts.
    assert_eq!(s.requeue(Some("not authorized")).unwrap(), 2);
    assert_eq!(seqs(&s), vec![1, 3, 6, 7]);
    assert_eq!(s.depth(), 4);
    let rows = s.peek(5, 10).unwrap();
    assert_eq!(rows[0].message.ts_ms, T0 + 2);
    assert_eq!(rows[1].message.ts_ms, T0 + 4);
    assert_eq!(s.aside(None, 10).unwrap().len(), 1);
    // The next reading gets the next seq: nothing reused.
    s.append(&msgs(6..=6)).unwrap();
    assert_eq!(*seqs(&s).last().unwrap(), 8);
}

#[test]
fn a_queue_file_from_before_reasons_gains_the_column_and_keeps_its_rows() {
    let dir = tempfile::tempdir().unwrap();
    {
        let c = rusqlite::Connection::open(dir.path().join("queue.db")).unwrap();
        c.execute_batch(
            "CREATE TABLE aside (seq INTEGER PRIMARY KEY, ts_ms INTEGER NOT NULL, topic TEXT NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL, body TEXT NOT NULL);
             INSERT INTO aside VALUES (7, 1, 'site/+/bad', 1, 0, '{\"point\":{\"value\":1,\"unit\":null}}');",
        )
        .unwrap();
    }
    let s = Store::open(dir.path()).unwrap();
    let rows = s.aside(None, 10).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].seq, rows[0].reason.as_str()), (7, ""));
    assert_eq!(s.stats().unwrap().aside_by_reason["unpublishable"], 1);
}

/// Without a running gateway, `fieldgate queue requeue` withdraws its request and does the
/// work on the file; with one, the store thread does it and answers.
#[tokio::test]
async fn a_requeue_request_is_served_by_the_store_thread_or_done_on_the_file() {
    use super::requeue::{Requeued, request};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    {
        let mut s = Store::open(&path).unwrap();
        s.append(&msgs(1..=3)).unwrap();
        s.set_aside(&[(2, "not authorized (0x87)".into())]).unwrap();
    }
    let p = path.clone();
    let done = tokio::task::spawn_blocking(move || {
        request(&p, None, std::time::Duration::from_millis(300))
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(done, Requeued::OnFile(1));
    assert!(!path.join("requeue.request").exists(), "withdrawn");
    {
        let mut s = Store::open(&path).unwrap();
        assert_eq!(seqs(&s), vec![1, 3, 4]);
        s.set_aside(&[(4, "quota".into())]).unwrap();
    }
    let (handle, join) = spawn(Store::open(&path).unwrap()).unwrap();
    let mut committed = handle.committed();
    let p = path.clone();
    let done = tokio::task::spawn_blocking(move || {
        request(&p, Some("quota"), std::time::Duration::from_secs(5))
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(done, Requeued::ByGateway(1));
    // The uplink hears of the new row.
    tokio::time::timeout(std::time::Duration::from_secs(2), committed.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(*committed.borrow(), 5);
    assert_eq!(handle.stats().await.unwrap().depth, 3);
    drop(handle);
    join.join().unwrap();
}
