//! Modbus RTU on a simulated RS-485 bus (a pseudo-terminal with RTU slaves behind it).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Gateway, Subscriber};
use fieldgate::testkit::sim::RtuBus;
use serde_json::json;

fn rtu_config(
    state: &std::path::Path,
    broker: std::net::SocketAddr,
    port: &std::path::Path,
    bus: &str,
    devices: &str,
) -> String {
    format!(
        "gateway:\n  id: gw1\n  state_dir: {}\n  status_interval: 1s\nmqtt:\n  url: mqtt://{broker}\n  keep_alive: 2s\nbuses:\n  rs485:\n    modbus_rtu: {{ port: {}, {bus} }}\ndevices:\n{devices}",
        state.display(),
        port.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_slave_and_a_refusing_slave_leave_the_healthy_one_its_rate_and_exact_values() {
    let dir = tempfile::tempdir().unwrap();
    let bus = RtuBus::start(dir.path(), 9600).unwrap();
    bus.with_unit(1, |b| {
        b.set_holding(0, &[0x4275, 0x0000, 1234]); // 61.25 f32, then 12.34 after scale
        b.coils.insert(3, true);
    });
    bus.with_unit(2, |b| b.set_holding(0, &[1]));
    bus.state.lock().unwrap().silent.push(2); // never answers
    bus.with_unit(3, |_| {}); // answers every read with IllegalDataAddress
    let broker = fieldgate::testkit::broker::start().unwrap();
    let sub = Subscriber::start(broker).await;
    let devices = "  healthy:\n    bus: rs485\n    unit: 1\n    every: 250ms\n    points:\n      temp: { register: 0, type: f32 }\n      level: { register: 2, scale: 0.01 }\n      run: { coil: 3 }\n  dead:\n    bus: rs485\n    unit: 2\n    every: 250ms\n    points:\n      x: { register: 0 }\n  refusing:\n    bus: rs485\n    unit: 3\n    every: 250ms\n    points:\n      y: { register: 0 }\n";
    let yaml = rtu_config(
        &dir.path().join("state"),
        broker,
        &bus.path,
        "baud: 9600, parity: even, timeout: 200ms, retries: 1",
        devices,
    );
    let gw = Gateway::start(dir.path(), &yaml);
    tokio::time::sleep(Duration::from_secs(6)).await;
    gw.stop().await;

    let temps = sub.values("fieldgate/gw1/healthy/temp");
    // 6s at 4/s = 24 polls; the dead slave's timeouts (backed off) and the refusals cost a few.
    // (Each poll of the dead slave costs two 200 ms timeouts of bus time: that is the wire.)
    assert!(
        temps.len() >= 15,
        "healthy slave polled {} times in 6s",
        temps.len()
    );
    assert!(temps.iter().all(|v| *v == json!(61.25)));
    // Every poll publishes every point: `.all()` on an empty list would prove nothing (#17).
    let level = sub.values("fieldgate/gw1/healthy/level");
    let run = sub.values("fieldgate/gw1/healthy/run");
    assert_eq!((level.len(), run.len()), (temps.len(), temps.len()));
    assert!(level.iter().all(|v| *v == json!(12.34)));
    assert!(run.iter().all(|v| *v == json!(true)));
    assert!(sub.values("fieldgate/gw1/dead/x").is_empty());
    assert!(sub.values("fieldgate/gw1/refusing/y").is_empty());
    assert_eq!(
        sub.payloads("fieldgate/gw1/healthy/availability"),
        vec!["online"]
    );
    assert_eq!(
        sub.payloads("fieldgate/gw1/dead/availability"),
        vec!["offline"]
    );
    assert_eq!(
        sub.payloads("fieldgate/gw1/refusing/availability"),
        vec!["online"],
        "an exception is an answer"
    );
    let stats = sub.latest_json("fieldgate/gw1/status/stats");
    let b = &stats["buses"]["rs485"];
    assert!(b["errors"]["timeout"].as_u64().unwrap() >= 3, "{b}");
    assert!(b["errors"]["exception"].as_u64().unwrap() >= 1, "{b}");
    // Refused requests are retried rarely, not on every cycle (24 cycles in 6s).
    assert!(
        b["devices"]["refusing"]["exceptions"].as_u64().unwrap() <= 5,
        "{b}"
    );
    assert!(b["utilisation"].as_f64().unwrap() > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_replies_are_never_decoded_as_the_answer_to_another_request() {
    let dir = tempfile::tempdir().unwrap();
    let bus = RtuBus::start(dir.path(), 115200).unwrap();
    // Every value names its unit and register, so a reply matched to the wrong request shows.
    for unit in [1u8, 2] {
        bus.with_unit(unit, |b| {
            for reg in [0u16, 1, 10] {
                b.set_holding(reg, &[unit as u16 * 0x1000 + reg]);
            }
        });
    }
    // Every seventh reply comes 35 ms late, after the 20 ms timeout.
    bus.state.lock().unwrap().late_every = Some((7, Duration::from_millis(35)));
    let broker = fieldgate::testkit::broker::start().unwrap();
    let sub = Subscriber::start(broker).await;
    let mut devices = String::new();
    for unit in [1, 2] {
        devices += &format!(
            "  u{unit}:\n    bus: rs485\n    unit: {unit}\n    every: 10ms\n    offline_after: 1000\n    points:\n      r0: {{ register: 0 }}\n      r1: {{ register: 1 }}\n      r10: {{ register: 10, every: 15ms }}\n"
        );
    }
    let yaml = rtu_config(
        &dir.path().join("state"),
        broker,
        &bus.path,
        "baud: 115200, timeout: 20ms, retries: 1",
        &devices,
    );
    let gw = Gateway::start(dir.path(), &yaml);
    tokio::time::sleep(Duration::from_secs(10)).await;
    gw.stop().await;

    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for r in sub.all().iter().filter(|r| r.seq().is_some()) {
        let mut parts = r.topic.rsplit('/');
        let point = parts.next().unwrap();
        let device = parts.next().unwrap();
        let unit: u64 = device[1..].parse().unwrap();
        let reg: u64 = point[1..].parse().unwrap();
        assert_eq!(
            r.value(),
            Some(&json!(unit * 0x1000 + reg)),
            "{} got {}",
            r.topic,
            r.payload
        );
        *counts.entry(r.topic.clone()).or_default() += 1;
    }
    let total: usize = counts.values().sum();
    let requests = bus.state.lock().unwrap().requests;
    let late =
        sub.latest_json("fieldgate/gw1/status/stats")["buses"]["rs485"]["line"]["late_replies"]
            .as_u64()
            .unwrap();
    eprintln!(
        "{requests} requests on the wire, {late} late replies discarded, {total} values decoded, all from the right reply: {counts:?}"
    );
    // About a thousand requests here; the bound leaves room for a loaded CI machine.
    assert!(requests >= 600, "only {requests} requests");
    // Values were decoded, of every point, at a rate the requests explain (six of seven replies
    // are on time; a request reads one or two points): a gateway that discards everything
    // around a late reply would publish almost nothing and still pass the checks above (#17).
    assert_eq!(counts.len(), 6, "every point decoded: {counts:?}");
    assert!(counts.values().all(|n| *n >= 50), "{counts:?}");
    assert!(
        total as u64 >= requests / 2,
        "{total} values from {requests} requests"
    );
    assert!(
        late >= 20,
        "only {late} late replies were seen and discarded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_frames_and_line_noise_are_counted_and_never_published() {
    let dir = tempfile::tempdir().unwrap();
    let bus = RtuBus::start(dir.path(), 19200).unwrap();
    bus.with_unit(7, |b| b.set_holding(100, &[0xBEEF, 0x0042]));
    {
        let mut st = bus.state.lock().unwrap();
        st.corrupt_every = Some(4);
        st.noise_every = Some((5, 6));
    }
    let broker = fieldgate::testkit::broker::start().unwrap();
    let sub = Subscriber::start(broker).await;
    let devices = "  meter:\n    bus: rs485\n    unit: 7\n    every: 50ms\n    points:\n      a: { register: 100 }\n      b: { register: 101 }\n";
    let yaml = rtu_config(
        &dir.path().join("state"),
        broker,
        &bus.path,
        "baud: 19200, timeout: 100ms, retries: 1",
        devices,
    );
    let gw = Gateway::start(dir.path(), &yaml);
    tokio::time::sleep(Duration::from_secs(4)).await;
    // Injection stops; two status messages later (1 s apart) the counts are final.
    {
        let mut st = bus.state.lock().unwrap();
        st.corrupt_every = None;
        st.noise_every = None;
    }
    let stats_topic = "fieldgate/gw1/status/stats";
    let seen = sub.payloads(stats_topic).len();
    sub.wait_for(Duration::from_secs(5), "two more status messages", |g| {
        g.iter().filter(|r| r.topic == stats_topic).count() >= seen + 2
    })
    .await;
    gw.stop().await;
    let a = sub.values("fieldgate/gw1/meter/a");
    let b = sub.values("fieldgate/gw1/meter/b");
    assert!(a.len() >= 20, "{} readings", a.len());
    assert_eq!(a.len(), b.len(), "both points in every poll");
    assert!(a.iter().all(|v| *v == json!(0xBEEF)));
    assert!(b.iter().all(|v| *v == json!(0x42)));
    // The gateway's counts against what the simulator injected, not just lower bounds.
    let stats = sub.latest_json("fieldgate/gw1/status/stats");
    let line = &stats["buses"]["rs485"]["line"];
    let (corrupted, noise) = {
        let st = bus.state.lock().unwrap();
        (st.corrupted, st.noise_sent)
    };
    let crc = line["crc_errors"].as_u64().unwrap();
    eprintln!("injected {corrupted} corrupt replies and {noise} noise bytes; gateway saw {line}");
    assert!(corrupted >= 5);
    // A corrupt reply in flight at a timeout is flushed uncounted: at most one.
    assert!(
        crc <= corrupted && crc + 1 >= corrupted,
        "{crc} CRC errors counted, {corrupted} injected"
    );
    let noise_seen = line["noise_bytes"].as_u64().unwrap();
    // Likewise at most one burst of noise (6 bytes) flushed uncounted.
    assert!(
        noise_seen <= noise && noise_seen + 6 >= noise,
        "{noise_seen} noise bytes counted, {noise} injected"
    );
    assert!(line["retries"].as_u64().unwrap() >= crc, "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unplugged_adapter_is_reopened_when_it_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut bus = RtuBus::start(dir.path(), 9600).unwrap();
    bus.with_unit(1, |b| b.set_holding(0, &[5]));
    let broker = fieldgate::testkit::broker::start().unwrap();
    let sub = Subscriber::start(broker).await;
    let devices = "  s:\n    bus: rs485\n    every: 200ms\n    offline_after: 1\n    points:\n      v: { register: 0 }\n";
    let yaml = rtu_config(
        &dir.path().join("state"),
        broker,
        &bus.path,
        "baud: 9600, timeout: 200ms",
        devices,
    );
    let gw = Gateway::start(dir.path(), &yaml);
    sub.wait_for(Duration::from_secs(5), "readings", |g| {
        g.iter().filter(|r| r.topic.ends_with("/s/v")).count() >= 3
    })
    .await;
    bus.unplug();
    sub.wait_for(Duration::from_secs(5), "offline", |g| {
        g.iter()
            .any(|r| r.topic.ends_with("/s/availability") && r.payload == "offline")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = sub.values("fieldgate/gw1/s/v").len();
    bus.plug().unwrap();
    sub.wait_for(
        Duration::from_secs(15),
        "readings after the adapter is back",
        |g| g.iter().filter(|r| r.topic.ends_with("/s/v")).count() >= during + 3,
    )
    .await;
    gw.stop().await;
    assert_eq!(
        sub.payloads("fieldgate/gw1/s/availability"),
        vec!["online", "offline", "online"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_prints_every_interpretation_of_an_unknown_meter() {
    let dir = tempfile::tempdir().unwrap();
    let bus = RtuBus::start(dir.path(), 9600).unwrap();
    bus.with_unit(3, |b| b.set_input(0, &[0x0000, 0x4275, 0x4093, 0x4A45]));
    bus.with_unit(3, |b| {
        b.coils.insert(0, true);
        b.coils.insert(1, false);
    });
    let port = bus.path.display().to_string();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_fieldgate"))
        .args([
            "read", "--port", &port, "--baud", "9600", "--unit", "3", "--input", "0", "--count",
            "4",
        ])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("      0  CDAB  f32=61.25"), "{text}");
    assert!(text.contains("      1  0x4275   17013"), "{text}");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_fieldgate"))
        .args([
            "read", "--port", &port, "--unit", "3", "--coils", "0", "--count", "2",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "address  value\n      0  1\n      1  0\n"
    );
    // A unit that does not answer: a clear error, exit 1.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_fieldgate"))
        .args([
            "read",
            "--port",
            &port,
            "--unit",
            "9",
            "--holding",
            "0",
            "--timeout",
            "200ms",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no answer within"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
