//! The gateway as systemd runs it: readiness, watchdog, reload on SIGHUP, and the unit file.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Subscriber, config};
use fieldgate::testkit::sim::Simulator;

fn spawn(cfg: &std::path::Path, env: &[(&str, String)]) -> Child {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fieldgate"));
    c.arg("run")
        .arg(cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    c.spawn().unwrap()
}

fn term(child: &mut Child) -> String {
    Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    let out = std::mem::replace(child, Command::new("true").spawn().unwrap())
        .wait_with_output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_and_the_watchdog_are_notified() {
    let broker = fieldgate::testkit::broker::start().unwrap();
    let sim = Simulator::start(None).await.unwrap();
    sim.with_unit(1, |b| b.set_holding(0, &[1]));
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let cfg = dir.path().join("config.yaml");
    std::fs::write(
        &cfg,
        config(
            &dir.path().join("state"),
            broker,
            sim.addr,
            "  d:\n    bus: plc\n    points:\n      p: { register: 0 }\n",
        ),
    )
    .unwrap();
    let mut child = spawn(
        &cfg,
        &[
            ("NOTIFY_SOCKET", sock_path.display().to_string()),
            ("WATCHDOG_USEC", "1000000".into()),
        ],
    );
    let t = Instant::now();
    let mut seen = Vec::new();
    let mut pings = Vec::new();
    let mut buf = [0u8; 512];
    // Three seconds of a 1 s watchdog: pings every half interval.
    while t.elapsed() < Duration::from_secs(3) {
        if let Ok(n) = sock.recv(&mut buf) {
            let m = String::from_utf8_lossy(&buf[..n]).into_owned();
            if m.contains("WATCHDOG=1") {
                pings.push(t.elapsed());
            }
            seen.push(m);
        }
    }
    term(&mut child);
    assert!(seen.iter().any(|m| m.contains("READY=1")), "{seen:?}");
    // The cadence, not just "some pings" (#17): at half the interval, so never a gap that
    // systemd would take for a hang.
    assert!(pings.len() >= 4, "{pings:?}");
    let worst = pings.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    assert!(
        worst <= Duration::from_millis(700),
        "a {worst:?} gap between pings: {pings:?}"
    );
}

/// A device with two registers, and two configs: device `a`, then `a` and `b`.
async fn reload_setup() -> (Simulator, tempfile::TempDir, &'static str, String) {
    let sim = Simulator::start(None).await.unwrap();
    sim.with_unit(1, |b| b.set_holding(0, &[1, 2]));
    let one = "  a:\n    bus: plc\n    every: 100ms\n    points:\n      p: { register: 0 }\n";
    let two = format!(
        "{one}  b:\n    bus: plc\n    every: 100ms\n    points:\n      q: {{ register: 1 }}\n"
    );
    (sim, tempfile::tempdir().unwrap(), one, two)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_a_good_config_and_refuses_a_bad_one() {
    let broker = fieldgate::testkit::broker::start().unwrap();
    let (sim, dir, one, two) = reload_setup().await;
    let state = dir.path().join("state");
    let cfg = dir.path().join("config.yaml");
    std::fs::write(&cfg, config(&state, broker, sim.addr, one)).unwrap();
    let sub = Subscriber::start(broker).await;
    let mut child = spawn(&cfg, &[]);
    sub.wait_for(Duration::from_secs(10), "device a", |g| {
        g.iter().any(|r| r.topic == "fieldgate/gw1/a/p")
    })
    .await;

    std::fs::write(&cfg, config(&state, broker, sim.addr, &two)).unwrap();
    Command::new("kill")
        .arg("-HUP")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    sub.wait_for(Duration::from_secs(10), "device b after the reload", |g| {
        g.iter().any(|r| r.topic == "fieldgate/gw1/b/q")
    })
    .await;

    // A bad config: refused, and the running one goes on.
    std::fs::write(
        &cfg,
        "mqtt: { url: mqtt://x }\ndevices: { c: { bus: nope, points: { r: { coil: 1 } } } }\n",
    )
    .unwrap();
    Command::new("kill")
        .arg("-HUP")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = sub
        .all()
        .iter()
        .filter(|r| r.topic == "fieldgate/gw1/b/q")
        .count();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = sub
        .all()
        .iter()
        .filter(|r| r.topic == "fieldgate/gw1/b/q")
        .count();
    assert!(
        after > before + 3,
        "polling goes on after a refused reload ({before} → {after})"
    );
    let stderr = term(&mut child);
    assert!(stderr.contains("reload refused"), "{stderr}");
    assert!(stderr.contains("unknown bus `nope`"), "{stderr}");
    // The queue was untouched: one gapless sequence across the reload.
    common::assert_gapless(sub.by_seq().keys().copied());
}

/// A reload is not an outage (#18): a subscriber watching the gateway's and the devices'
/// availability sees no `offline` across two `systemctl reload`s; the stop afterwards does
/// publish it (so the test can see one). Red when the uplink says `offline` at a reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_publishes_no_offline() {
    // mosquitto: rumqttd keys Last Wills by client id, so a quick reconnect under the same id
    // fires the *new* connection's Will when the old one closes, DISCONNECT or not.
    let Some(mosquitto) = common::Mosquitto::start() else {
        return;
    };
    let broker = mosquitto.addr;
    let (sim, dir, one, two) = reload_setup().await;
    let state = dir.path().join("state");
    let cfg = dir.path().join("config.yaml");
    std::fs::write(&cfg, config(&state, broker, sim.addr, one)).unwrap();
    let sub = Subscriber::start(broker).await;
    let mut child = spawn(&cfg, &[]);
    sub.wait_for(Duration::from_secs(10), "device a online", |g| {
        g.iter()
            .any(|r| r.topic == "fieldgate/gw1/a/availability" && r.payload == "online")
    })
    .await;
    for round in 0..2 {
        let cfg_text = if round == 0 { &two } else { one };
        std::fs::write(&cfg, config(&state, broker, sim.addr, cfg_text)).unwrap();
        let onlines = sub
            .payloads("fieldgate/gw1/status")
            .iter()
            .filter(|p| *p == "online")
            .count();
        Command::new("kill")
            .arg("-HUP")
            .arg(child.id().to_string())
            .status()
            .unwrap();
        // The new uplink has connected once it said `online` again.
        sub.wait_for(Duration::from_secs(10), "online after the reload", |g| {
            g.iter()
                .filter(|r| r.topic == "fieldgate/gw1/status" && r.payload == "online")
                .count()
                > onlines
        })
        .await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let offline = |sub: &Subscriber| {
        sub.all()
            .iter()
            .filter(|r| r.payload == "offline")
            .map(|r| r.topic.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        offline(&sub),
        Vec::<String>::new(),
        "offline published across a reload"
    );
    let stderr = term(&mut child);
    sub.wait_for(Duration::from_secs(5), "offline at the stop", |g| {
        g.iter()
            .any(|r| r.topic == "fieldgate/gw1/status" && r.payload == "offline")
    })
    .await;
    assert!(stderr.contains("configuration reloaded"), "{stderr}");
}

#[test]
fn the_unit_file_passes_systemd_analyze_verify() {
    let Ok(out) = Command::new("systemd-analyze").arg("--version").output() else {
        if std::env::var("FIELDGATE_REQUIRE_SYSTEMD_ANALYZE").as_deref() == Ok("1") {
            panic!("systemd-analyze is required (FIELDGATE_REQUIRE_SYSTEMD_ANALYZE=1)");
        }
        eprintln!("SKIPPED: systemd-analyze is not installed");
        return;
    };
    assert!(out.status.success());
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string("systemd/fieldgate.service")
        .unwrap()
        .replace("/usr/bin/fieldgate", env!("CARGO_BIN_EXE_fieldgate"));
    let path = dir.path().join("fieldgate.service");
    std::fs::write(&path, unit).unwrap();
    let v = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        v.status.success() && v.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&v.stderr)
    );
    let s = Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&s.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for fieldgate.service: ")
                .nth(1)
        })
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no score in {text}"));
    eprintln!("systemd-analyze security: exposure {score}");
    assert!(score <= 2.0, "exposure {score}");
}
