//! Start-up with a big queue: `cargo run --release --example bench_startup [N]`.
//!
//! Builds a queue of N readings (1 000 000 by default), leaves it as a power cut would (not
//! marked clean), then times what stands between `fieldgate run` and systemd's READY: opening
//! the queue (with its check after an unclean shutdown) and the first stats. Then the periodic
//! work that must not scan the table: one expiry pass and one stats call on the full queue.
//! Target: ready within 5 s for 1 000 000 rows.

use std::time::Instant;

use fieldgate::mapping::Value;
use fieldgate::message::{Body, Message, now_ms};
use fieldgate::store::Store;

fn reading(i: u64, t0: i64) -> Message {
    Message {
        topic: format!("fieldgate/bench/meter{}/p{}", i % 20, i % 16),
        qos: 1,
        retain: false,
        ts_ms: t0 + i as i64,
        body: Body::Point {
            value: Value::Float(230.0 + (i % 100) as f64 / 10.0),
            unit: Some("V".into()),
        },
    }
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    {
        let mut s = Store::open(dir.path()).unwrap();
        let t0 = now_ms() - n as i64;
        let mut i = 0;
        while i < n {
            let batch: Vec<Message> = (i..(i + 10_000).min(n)).map(|j| reading(j, t0)).collect();
            s.append(&batch).unwrap();
            i += 10_000;
        }
        // Dropped without close(): as after a power cut or kill -9.
    }
    let size = std::fs::metadata(dir.path().join("queue.db"))
        .map(|m| m.len())
        .unwrap_or(0);
    println!(
        "built {n} readings in {:.1}s: queue.db {:.1} MiB",
        t.elapsed().as_secs_f64(),
        size as f64 / (1 << 20) as f64
    );

    // As after a power cut: nothing of the file in the page cache (needs root; skipped if not).
    let cold = std::process::Command::new("sync").status().is_ok()
        && std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok();
    let t = Instant::now();
    let mut s = Store::open(dir.path()).unwrap();
    let opened = t.elapsed();
    let stats = s.stats().unwrap();
    let ready = t.elapsed();
    println!(
        "unclean open ({} cache) {:.3}s, first stats {:.3}s: ready after {:.3}s (depth {})",
        if cold { "cold" } else { "warm" },
        opened.as_secs_f64(),
        (ready - opened).as_secs_f64(),
        ready.as_secs_f64(),
        stats.depth
    );
    let t = Instant::now();
    let expired = s.expire(Instant::now()).unwrap();
    println!(
        "expiry pass, nothing due: {:.4}s ({expired} expired)",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    s.stats().unwrap();
    println!("stats on the full queue: {:.4}s", t.elapsed().as_secs_f64());
    s.close().unwrap();
    let t = Instant::now();
    let s = Store::open(dir.path()).unwrap();
    println!("clean open {:.3}s", t.elapsed().as_secs_f64());
    drop(s);
}
