//! CPU, memory and fsyncs per reading on the peer workload (#16):
//! `cargo build --release && cargo run --release --example bench_cpu [UNITS] [SECONDS]`.
//!
//! UNITS Modbus TCP simulators (default 10), each a device of 20 holding registers polled every
//! second, one JSON message per register (QoS 1): 20 × UNITS messages/s to mosquitto (it must be
//! installed). The gateway is the release binary (`target/release/fieldgate run`), a process of
//! its own, measured from /proc: CPU (user + system) per 1 000 messages, RSS at the start and
//! the end of the window, and the queue's commits (each one fsync at synchronous=FULL) per
//! second from the store's own count (read from the status page's live API; the gateway keeps
//! its default status interval). A subscriber times each reading from its poll time (`ts`)
//! to its arrival: p50 and p99. `BENCH_MQTT=5` runs the uplink on MQTT 5, `BENCH_SPARKPLUG=1`
//! adds a Sparkplug B edge node (each reading also as DDATA), `BENCH_EVERY=1h` measures an idle
//! gateway, `BENCH_INFLIGHT=N` sets the uplink's window (`mqtt.inflight`). `BENCH_FLOOR=1` runs
//! no gateway: a bare publisher writes each second's messages (the same topics and payloads)
//! in one write, stamped the moment it writes them, and the subscriber times them the same way:
//! the broker's and the subscriber's share of the latency, which no gateway can go below here.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fieldgate::message::now_ms;
use fieldgate::testkit::sim::Simulator;

/// (CPU in ms of each thread, RSS in KiB) of a process. CPU is each thread's time on a CPU
/// from `/proc/PID/task/*/schedstat` (nanoseconds; user + system): `/proc/PID/stat` counts in
/// 10 ms ticks, too coarse for a gateway that uses a few ms a second.
fn usage(pid: u32) -> (Threads, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    (threads(pid), rss)
}

/// Thread id → (name, CPU time in ms).
type Threads = std::collections::BTreeMap<String, (String, f64)>;

fn threads(pid: u32) -> Threads {
    let mut by_tid = Threads::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let read = |f: &str| std::fs::read_to_string(task.path().join(f)).unwrap_or_default();
        let ns = read("schedstat")
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        let tid = task.file_name().to_string_lossy().into_owned();
        by_tid.insert(tid, (read("comm").trim().to_string(), ns as f64 / 1e6));
    }
    by_tid
}

/// CPU used between two looks, by thread name, counting the threads alive at the second
/// (one that ended in between — tokio's blocking pool lets its connect-time thread go after
/// 10 s idle — loses its share of the window, instead of taking its whole past off the total).
fn cpu_between(before: &Threads, after: &Threads) -> std::collections::BTreeMap<String, f64> {
    let mut by_name = std::collections::BTreeMap::new();
    for (tid, (name, ms)) in after {
        let earlier = before.get(tid).map_or(0.0, |(_, ms)| *ms);
        *by_name.entry(name.clone()).or_default() += ms - earlier;
    }
    by_name
}

/// RssAnon and RssFile in KiB: the process's own memory, and the pages of its binary and
/// libraries it has touched (shared, clean, given back under memory pressure).
fn rss_split(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("RssAnon:"), field("RssFile:"))
}

fn mosquitto() -> (std::process::Child, SocketAddr, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let port = fieldgate::testkit::broker::quiet_port().unwrap();
    let child = fieldgate::testkit::broker::spawn_mosquitto(
        &dir.path().join("m.conf"),
        &format!("listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"),
        port,
    )
    .expect("mosquitto is installed (apt-get install mosquitto)");
    (child, format!("127.0.0.1:{port}").parse().unwrap(), dir)
}

/// Poll-to-arrival latencies in ms, and the count, of what a subscriber receives.
fn subscribe(broker: SocketAddr, lat: Arc<Mutex<Vec<i64>>>) {
    let mut o = rumqttc::MqttOptions::new("bench-sub", broker.ip().to_string(), broker.port());
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut el) = rumqttc::AsyncClient::new(o, 100);
    tokio::spawn(async move {
        client
            .subscribe("fieldgate/bench/+/+", rumqttc::QoS::AtMostOnce)
            .await
            .unwrap();
        while let Ok(ev) = el.poll().await {
            if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) = ev {
                let now = now_ms();
                let v: serde_json::Value = match serde_json::from_slice(&p.payload) {
                    Ok(v) => v,
                    Err(_) => continue,
                };
                if let Some(ts) = v["ts"].as_str()
                    && let Ok(t) = time::OffsetDateTime::parse(
                        ts,
                        &time::format_description::well_known::Rfc3339,
                    )
                {
                    let ms = (t.unix_timestamp_nanos() / 1_000_000) as i64;
                    lat.lock().unwrap().push(now - ms);
                }
            }
        }
    });
}

/// The queue's commits so far, from the running gateway's live snapshot (`GET /api/status`
/// of its status page): exact at any moment, where `status.json` is only as fresh as the
/// status interval, which stays at the gateway's default (a status every second would be
/// a workload of its own).
fn commits(web: SocketAddr) -> u64 {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(web) else {
        return 0;
    };
    let _ = s.write_all(b"GET /api/status HTTP/1.0\r\nHost: bench\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.split_once("\r\n\r\n")
        .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(body).ok())
        .and_then(|v| v["status"]["queue"]["commits"].as_u64())
        .unwrap_or(0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let units: usize = args.next().map(|a| a.parse().unwrap()).unwrap_or(10);
    let seconds: u64 = args.next().map(|a| a.parse().unwrap()).unwrap_or(60);
    // FIELDGATE_BIN: another build (e.g. one with symbols for perf).
    let bin = std::env::var("FIELDGATE_BIN").unwrap_or_else(|_| "target/release/fieldgate".into());
    let bin = std::path::Path::new(&bin);
    assert!(bin.exists(), "build it first: cargo build --release");

    let (mut broker, broker_addr, _bdir) = mosquitto();
    let mut sims = Vec::new();
    for u in 0..units {
        let sim = Simulator::start(None).await.unwrap();
        sim.with_unit(1, |b| {
            b.set_holding(
                0,
                &(0..20).map(|i| (u * 100 + i) as u16).collect::<Vec<_>>(),
            )
        });
        sims.push(sim);
    }
    // BENCH_EVERY: the poll interval (default 1s); `1h` measures a connected gateway with
    // nothing to do (its idle CPU: one poll at start, then only its own timers).
    let every = std::env::var("BENCH_EVERY").unwrap_or_else(|_| "1s".into());
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let web = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    // BENCH_MQTT=5: the uplink speaks MQTT 5; BENCH_SPARKPLUG=1: also a Sparkplug B edge node
    // (every reading as DDATA too).
    let protocol = std::env::var("BENCH_MQTT").unwrap_or_else(|_| "3.1.1".into());
    // BENCH_INFLIGHT: the uplink's window (`mqtt.inflight`; default: the gateway's).
    let inflight = std::env::var("BENCH_INFLIGHT")
        .map(|n| format!(", inflight: {n}"))
        .unwrap_or_default();
    let mut yaml = format!(
        "gateway: {{ id: bench, state_dir: {} }}\nmqtt: {{ url: mqtt://{broker_addr}, protocol: {protocol}{inflight} }}\nweb: {{ listen: \"{web}\" }}\nbuses:\n",
        state.display()
    );
    if std::env::var("BENCH_SPARKPLUG").as_deref() == Ok("1") {
        yaml = yaml.replace("buses:\n", "sparkplug: { group_id: bench }\nbuses:\n");
    }
    eprintln!(
        "MQTT {protocol}{}",
        if yaml.contains("sparkplug:") {
            ", Sparkplug B and JSON"
        } else {
            ""
        }
    );
    for (u, sim) in sims.iter().enumerate() {
        yaml += &format!(
            "  plc{u}:\n    modbus_tcp: {{ host: 127.0.0.1, port: {} }}\n",
            sim.addr.port()
        );
    }
    yaml += "devices:\n";
    for u in 0..units {
        yaml += &format!("  unit{u}:\n    bus: plc{u}\n    every: {every}\n    points:\n");
        for r in 0..20 {
            yaml += &format!("      r{r}: {{ register: {r} }}\n");
        }
    }
    let cfg = dir.path().join("config.yaml");
    std::fs::write(&cfg, yaml).unwrap();

    let lat = Arc::new(Mutex::new(Vec::new()));
    subscribe(broker_addr, lat.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    if std::env::var("BENCH_FLOOR").as_deref() == Ok("1") {
        floor(broker_addr, units, seconds, &lat).await;
        let _ = broker.kill();
        return;
    }
    let mut gw = Command::new(bin)
        .arg("run")
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = gw.id();
    // Warm up: connected, every device polled a few times.
    tokio::time::sleep(Duration::from_secs(5)).await;
    lat.lock().unwrap().clear();
    let (threads0, rss0) = usage(pid);
    let commits0 = commits(web);
    let t0 = Instant::now();
    // BENCH_ATTACH: a profiler to attach for the window, e.g.
    // `perf record -g -o /tmp/perf.data -p {pid} -- sleep {secs}` or
    // `timeout -s INT {secs} strace -c -f -o /tmp/strace.txt -p {pid}`.
    let attached = std::env::var("BENCH_ATTACH").ok().map(|cmd| {
        let cmd = cmd
            .replace("{pid}", &pid.to_string())
            .replace("{secs}", &seconds.to_string());
        Command::new("sh")
            .args(["-c", &cmd])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    });
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let (threads1, rss1) = usage(pid);
    let by_name = cpu_between(&threads0, &threads1);
    let cpu: f64 = by_name.values().sum();
    let (anon1, file1) = rss_split(pid);
    let commits1 = commits(web);
    let wall = t0.elapsed().as_secs_f64();
    let mut l = std::mem::take(&mut *lat.lock().unwrap());
    if let Some(mut a) = attached {
        let _ = a.wait();
    }
    let _ = Command::new("kill").arg(pid.to_string()).status();
    let _ = gw.wait();
    let _ = broker.kill();

    let (p50, p99, max) = spread(&mut l);
    let msgs = l.len() as f64;
    println!(
        "{units} units × 20 registers every {every}, QoS 1, mosquitto; {wall:.0} s measured after 5 s warm-up"
    );
    println!(
        "messages received:        {:.0} ({:.0}/s)",
        msgs,
        msgs / wall
    );
    println!(
        "CPU per 1 000 messages:   {:.1} ms  ({:.1} % of one core)",
        cpu / msgs.max(1.0) * 1000.0,
        cpu / wall / 10.0
    );
    println!("CPU per second:           {:.2} ms", cpu / wall);
    let by_thread: Vec<String> = by_name
        .iter()
        .map(|(name, ms)| format!("{name} {:.1}", ms / msgs.max(1.0) * 1000.0))
        .collect();
    println!("  by thread, per 1 000:   {}", by_thread.join(", "));
    println!(
        "RSS:                      {rss0} KiB at start, {rss1} KiB at end ({anon1} KiB anonymous, {file1} KiB of mapped files)"
    );
    println!(
        "queue commits (fsyncs)/s: {:.1}",
        (commits1 - commits0) as f64 / wall
    );
    println!("poll → subscriber:        p50 {p50} ms, p99 {p99} ms, max {max} ms");
}

/// p50, p99 and the largest of latencies in ms (sorts them).
fn spread(l: &mut [i64]) -> (i64, i64, i64) {
    l.sort_unstable();
    let n = l.len().max(1);
    let pct = |p: f64| {
        l.get(((n as f64 * p) as usize).min(n - 1))
            .copied()
            .unwrap_or(0)
    };
    (pct(0.50), pct(0.99), l.last().copied().unwrap_or(0))
}

/// The floor (`BENCH_FLOOR=1`): UNITS × 20 QoS 1 PUBLISH packets every second, built by hand
/// and written in one `write` with `ts` = the moment of writing; PUBACKs read and dropped.
async fn floor(broker: SocketAddr, units: usize, seconds: u64, lat: &Arc<Mutex<Vec<i64>>>) {
    use std::io::{Read, Write};
    fn remaining(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let b = (n % 128) as u8;
            n /= 128;
            out.push(if n > 0 { b | 0x80 } else { b });
            if n == 0 {
                break;
            }
        }
    }
    let mut s = std::net::TcpStream::connect(broker).unwrap();
    s.set_nodelay(true).unwrap();
    // CONNECT, MQTT 3.1.1, clean session, keep-alive 60 s, client id "floor".
    s.write_all(b"\x10\x11\x00\x04MQTT\x04\x02\x00\x3c\x00\x05floor")
        .unwrap();
    let mut acks = s.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while matches!(acks.read(&mut buf), Ok(n) if n > 0) {}
    });
    let stop = Instant::now() + Duration::from_secs(5 + seconds);
    let mut id: u16 = 0;
    let publisher = std::thread::spawn(move || {
        while Instant::now() < stop {
            let now = now_ms();
            std::thread::sleep(Duration::from_millis((1000 - now.rem_euclid(1000)) as u64));
            let ts = fieldgate::message::format_ts(now_ms());
            let mut out = Vec::with_capacity(units * 20 * 100);
            for u in 0..units {
                for r in 0..20 {
                    id = id % 65535 + 1;
                    let topic = format!("fieldgate/bench/unit{u}/r{r}");
                    let body = format!(
                        r#"{{"value":{},"unit":null,"ts":"{ts}","seq":{id}}}"#,
                        u * 100 + r
                    );
                    out.push(0x32);
                    remaining(2 + topic.len() + 2 + body.len(), &mut out);
                    out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
                    out.extend_from_slice(topic.as_bytes());
                    out.extend_from_slice(&id.to_be_bytes());
                    out.extend_from_slice(body.as_bytes());
                }
            }
            s.write_all(&out).unwrap();
        }
    });
    tokio::time::sleep(Duration::from_secs(5)).await;
    lat.lock().unwrap().clear();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let _ = tokio::task::spawn_blocking(move || publisher.join()).await;
    let mut l = std::mem::take(&mut *lat.lock().unwrap());
    let (p50, p99, max) = spread(&mut l);
    println!(
        "floor: no gateway; {units} × 20 messages written at once every second, {} received",
        l.len()
    );
    println!("write → subscriber:       p50 {p50} ms, p99 {p99} ms, max {max} ms");
}
