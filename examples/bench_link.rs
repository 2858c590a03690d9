//! Drain rate over real links: `cargo run --release --example bench_link`.
//!
//! A backlog of N readings is queued, then the gateway drains it to a broker (mosquitto when
//! installed, with `set_tcp_nodelay true`, else the in-process rumqttd) through the fault proxy
//! shaped as a link of 50, 300
//! and 800 ms round trip, and as a GPRS modem (32 kbit/s, 600 ms). A subscriber of the broker
//! counts what arrives. Printed for each: the time to the first reading at the broker, the
//! drain rate while the backlog goes from 90 % to 10 %
//! (the steady drain, without connection set-up and the tail), and that rate as a share of
//! window ÷ round trip — the most any window-limited sender can reach (target ≥ 70 %) — or, on
//! the rate-limited link, as a share of what the line can carry. A first line without delay
//! shows what the machine itself manages (CPU-bound: gateway, proxy and broker share it).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fieldgate::config::Config;
use fieldgate::mapping::Value;
use fieldgate::message::{Body, Message, now_ms};
use fieldgate::store::Store;
use fieldgate::testkit::proxy::{FaultProxy, Link};
use tokio_util::sync::CancellationToken;

const WINDOW: u32 = 500;

/// The readings' topics (and nothing the gateway publishes of its own).
const TOPICS: &str = "benchlink/#";

fn reading(i: u64) -> Message {
    Message {
        topic: format!("benchlink/meter{}/p{}", i % 20, i % 16),
        qos: 1,
        retain: false,
        ts_ms: now_ms(),
        body: Body::Point {
            value: Value::Float(230.0 + (i % 100) as f64 / 10.0),
            unit: Some("V".into()),
        },
    }
}

async fn drain(broker: SocketAddr, link: Link, n: u64, label: &str) {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    {
        let mut s = Store::open(dir).unwrap();
        for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
            s.append(&chunk.iter().map(|&i| reading(i)).collect::<Vec<_>>())
                .unwrap();
        }
        s.close().unwrap();
    }
    let proxy = FaultProxy::start(broker).await.unwrap();
    proxy.shape(link);
    let yaml = format!(
        "gateway: {{ id: bench, state_dir: {} }}\nmqtt: {{ url: mqtt://{}, inflight: {WINDOW} }}\n",
        dir.display(),
        proxy.addr()
    );
    let config = Config::from_text(&dir.join("bench.yaml"), &yaml).unwrap();
    let (arrived, subscriber) = subscribe(broker).await;
    let cancel = CancellationToken::new();
    let t = Instant::now();
    let gw = tokio::spawn(fieldgate::gateway::run(config, cancel.clone()));
    let (mut first, mut at90, mut at10) = (None, None, None);
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        // Left = not yet at the broker, as its subscriber counts (the queue's own depth falls
        // only when the acknowledged rows' deletes are committed, up to 2 s later).
        let left = n.saturating_sub(arrived.load(Ordering::Relaxed));
        let now = t.elapsed();
        if left < n && first.is_none() {
            first = Some(now);
        }
        if left <= n * 9 / 10 && at90.is_none() {
            at90 = Some((now, left));
        }
        if left <= n / 10 && at10.is_none() {
            at10 = Some((now, left));
        }
        if left == 0 {
            break;
        }
        if now > Duration::from_secs(600) {
            println!("{label}: gave up after 600 s with {left} left");
            break;
        }
    }
    let total = t.elapsed();
    // Gone before the next drain: a subscriber left behind would double the broker's work.
    subscriber.abort();
    cancel.cancel();
    gw.await.unwrap().unwrap();
    let rtt = link.delay * 2;
    let (Some((t90, d90)), Some((t10, d10))) = (at90, at10) else {
        return;
    };
    let steady = (d90 - d10) as f64 / (t10 - t90).as_secs_f64();
    // What bounds the drain: the window over the round trip, or the line's rate.
    let bound = match link.rate {
        None if rtt.is_zero() => "reference: no delay, CPU-bound".to_string(),
        None => {
            let ceiling = WINDOW as f64 / rtt.as_secs_f64();
            format!(
                "{:>3.0}% of window/RTT ({ceiling:.0}/s)",
                100.0 * steady / ceiling
            )
        }
        Some(r) => {
            let m = fieldgate::message::Stored {
                seq: n,
                message: reading(n),
                queued: None,
            };
            // PUBLISH on the wire: fixed header 2, topic length 2, packet id 2.
            let bytes = m.message.topic.len() + m.payload().len() + 6;
            let ceiling = r as f64 / bytes as f64;
            format!(
                "{:>3.0}% of the line ({r} bytes/s ÷ {bytes} bytes = {ceiling:.0}/s)",
                100.0 * steady / ceiling
            )
        }
    };
    println!(
        "{label:<6} rtt {:>4} ms: {n:>6} readings, first at the broker after {:>5.2}s, all in {:>6.2}s; steady {steady:>6.0}/s = {bound}",
        rtt.as_millis(),
        first.unwrap_or_default().as_secs_f64(),
        total.as_secs_f64(),
    );
}

/// Readings that reached the broker so far, counted by a subscriber of its own (connected
/// directly, not through the proxy) that is subscribed before this returns; aborting its task
/// disconnects it.
async fn subscribe(broker: SocketAddr) -> (Arc<AtomicU64>, tokio::task::JoinHandle<()>) {
    let n = Arc::new(AtomicU64::new(0));
    let id = format!("bench-link-{}", now_ms());
    let o = rumqttc::MqttOptions::new(id, broker.ip().to_string(), broker.port());
    let (client, mut el) = rumqttc::AsyncClient::new(o, 10);
    client
        .subscribe(TOPICS, rumqttc::QoS::AtMostOnce)
        .await
        .unwrap();
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    let count = n.clone();
    let task = tokio::spawn(async move {
        let _client = client;
        let mut ready_tx = Some(ready_tx);
        while let Ok(ev) = el.poll().await {
            match ev {
                rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) => {
                    if let Some(tx) = ready_tx.take() {
                        let _ = tx.send(());
                    }
                }
                rumqttc::Event::Incoming(rumqttc::Packet::Publish(_)) => {
                    count.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
        }
    });
    ready.await.expect("subscribed");
    (n, task)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let _mosquitto;
    let (broker, name) = match fieldgate::testkit::broker::mosquitto_bin() {
        Some(_) => {
            let mdir = tempfile::tempdir().unwrap();
            let port = fieldgate::testkit::broker::quiet_port().unwrap();
            let child = fieldgate::testkit::broker::spawn_mosquitto(
                &mdir.path().join("m.conf"),
                // Without it mosquitto's small PUBACKs wait for Nagle: 68 % instead of 81 % of
                // window/RTT at 50 ms (measured); the README recommends it for brokers.
                // The counting subscriber takes QoS 0: nothing is held back for it or dropped.
                &format!("listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\nmax_queued_messages 0\n"),
                port,
            )
            .unwrap();
            _mosquitto = KillOnDrop(child, mdir);
            (format!("127.0.0.1:{port}").parse().unwrap(), "mosquitto")
        }
        None => (
            fieldgate::testkit::broker::start().unwrap(),
            "rumqttd (in process)",
        ),
    };
    println!("fieldgate drain over shaped links to {name}, window {WINDOW}");
    for (rtt, n) in [(0u64, 40_000u64), (50, 40_000), (300, 15_000), (800, 6_000)] {
        let link = Link::round_trip(Duration::from_millis(rtt));
        drain(broker, link, n, &format!("{rtt} ms")).await;
    }
    let gprs = Link::round_trip(Duration::from_millis(600)).with_bits_per_second(32_000);
    drain(broker, gprs, 1_500, "GPRS").await;
}

/// mosquitto and its configuration folder, both gone at the end.
struct KillOnDrop(std::process::Child, #[allow(dead_code)] tempfile::TempDir);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
