//! Queue and drain figures: `cargo run --release --example bench_queue [N]`.
//!
//! 1. Enqueue: one commit (one fsync, synchronous=FULL) per poll cycle of B readings, and N
//!    readings handed to the store thread, which merges the batches waiting into one commit.
//! 2. Drain: N queued readings published to an in-process broker (and to mosquitto when it is
//!    installed) with the default in-flight window; readings/s until the queue is empty.
//! 3. Memory: peak RSS of this process.

use std::path::Path;
use std::time::{Duration, Instant};

use fieldgate::config::Config;
use fieldgate::mapping::Value;
use fieldgate::message::{Body, Message, now_ms};
use fieldgate::store::{self, Store};
use tokio_util::sync::CancellationToken;

fn reading(i: u64) -> Message {
    Message {
        topic: format!("fieldgate/bench/meter{}/p{}", i % 20, i % 16),
        qos: 1,
        retain: false,
        ts_ms: now_ms(),
        body: Body::Point {
            value: Value::Float(230.0 + (i % 100) as f64 / 10.0),
            unit: Some("V".into()),
        },
    }
}

fn enqueue(dir: &Path, n: u64, batch: u64) -> (f64, f64) {
    let (h, join) = store::spawn(Store::open(dir).unwrap()).unwrap();
    let t = Instant::now();
    let mut i = 0;
    while i < n {
        h.enqueue((i..(i + batch).min(n)).map(reading).collect())
            .unwrap();
        i += batch;
    }
    drop(h);
    join.join().unwrap();
    let secs = t.elapsed().as_secs_f64();
    (n as f64 / secs, secs)
}

async fn drain(dir: &Path, n: u64, broker: std::net::SocketAddr, label: &str) {
    {
        let mut s = Store::open(dir).unwrap();
        for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
            s.append(&chunk.iter().map(|&i| reading(i)).collect::<Vec<_>>())
                .unwrap();
        }
        s.close().unwrap();
    }
    let yaml = format!(
        "gateway: {{ id: bench, state_dir: {} }}\nmqtt: {{ url: mqtt://{broker} }}\n",
        dir.display()
    );
    let config = Config::from_text(&dir.join("bench.yaml"), &yaml).unwrap();
    let cancel = CancellationToken::new();
    let t = Instant::now();
    let gw = tokio::spawn(fieldgate::gateway::run(config, cancel.clone()));
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let depth = Store::open_read_only(dir).unwrap().stats().unwrap().depth;
        if depth == 0 {
            break;
        }
        if t.elapsed() > Duration::from_secs(300) {
            println!("drain to {label}: gave up after 300s with {depth} left");
            break;
        }
    }
    let secs = t.elapsed().as_secs_f64();
    cancel.cancel();
    gw.await.unwrap().unwrap();
    println!(
        "drain to {label:<22} {n} readings in {secs:.2}s = {:.0} readings/s",
        n as f64 / secs
    );
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(50_000);
    println!("fieldgate queue benchmark, N = {n}");
    for batch in [1u64, 16, 256] {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        let commits = 2_000u64.min(n / batch).max(10);
        let t = Instant::now();
        for c in 0..commits {
            s.append(
                &(c * batch..(c + 1) * batch)
                    .map(reading)
                    .collect::<Vec<_>>(),
            )
            .unwrap();
        }
        let secs = t.elapsed().as_secs_f64();
        println!(
            "append, {batch:>3} readings per commit: {:>7.0} commits/s, {:>9.0} readings/s",
            commits as f64 / secs,
            (commits * batch) as f64 / secs
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let (rate, _) = enqueue(dir.path(), n, 16);
    println!("store thread, {n} readings in batches of 16: {rate:.0} readings/s");
    let dir = tempfile::tempdir().unwrap();
    let broker = fieldgate::testkit::broker::start().unwrap();
    drain(dir.path(), n, broker, "rumqttd (in process)").await;

    if fieldgate::testkit::broker::mosquitto_bin().is_some() {
        let mdir = tempfile::tempdir().unwrap();
        let port = fieldgate::testkit::broker::quiet_port().unwrap();
        let mut child = fieldgate::testkit::broker::spawn_mosquitto(
            &mdir.path().join("m.conf"),
            &format!("listener {port} 127.0.0.1\nallow_anonymous true\n"),
            port,
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        drain(
            dir.path(),
            n,
            format!("127.0.0.1:{port}").parse().unwrap(),
            "mosquitto",
        )
        .await;
        let _ = child.kill();
        let _ = child.wait();
    } else {
        println!("drain to mosquitto: skipped (not installed)");
    }
    println!("peak RSS {} KiB", peak_rss_kib());
}
