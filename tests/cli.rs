//! The `fieldgate` binary as systemd or a shell runs it.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Subscriber, config};
use fieldgate::testkit::sim::Simulator;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_publishes_offline_keeps_the_queue_and_exits_zero_within_seconds() {
    let broker = fieldgate::testkit::broker::start().unwrap();
    let sim = Simulator::start(None).await.unwrap();
    sim.with_unit(1, |b| b.set_input(7, &[152]));
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let cfg = dir.path().join("config.yaml");
    std::fs::write(
        &cfg,
        config(&state, broker, sim.addr, "  boiler:\n    bus: plc\n    every: 100ms\n    points:\n      p: { register: 7, kind: input }\n"),
    )
    .unwrap();
    let sub = Subscriber::start(broker).await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_fieldgate"))
        .arg("run")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    sub.wait_for(Duration::from_secs(10), "readings", |got| {
        got.iter().filter(|r| r.seq().is_some()).count() >= 5
    })
    .await;

    let t = Instant::now();
    let ok = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(ok.success());
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "still running 5s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
    sub.wait_for(Duration::from_secs(2), "offline", |got| {
        got.iter()
            .any(|r| r.topic == "fieldgate/gw1/status" && r.payload == "offline")
    })
    .await;
    // Whatever was not acknowledged is still in the queue, and nothing was lost in between.
    common::assert_nothing_lost(&state, &sub);
}

#[test]
fn version_and_help_work() {
    let out = Command::new(env!("CARGO_BIN_EXE_fieldgate"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("fieldgate "));
    // --help lists every command an integrator needs, and exits 0.
    let out = Command::new(env!("CARGO_BIN_EXE_fieldgate"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for command in ["run", "check", "demo", "read", "queue", "status"] {
        assert!(
            help.lines()
                .any(|l| l.trim_start().starts_with(&format!("{command} "))),
            "`{command}` missing from --help:\n{help}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_over_modbus_tcp_and_from_a_config_bus() {
    let sim = Simulator::start(None).await.unwrap();
    sim.with_unit(4, |b| b.set_holding(10, &[0x534E, 0x2D34]));
    let port = sim.addr.port().to_string();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_fieldgate"))
        .args([
            "read",
            "--host",
            &format!("127.0.0.1:{port}"),
            "--unit",
            "4",
            "--holding",
            "10",
            "--count",
            "2",
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
    assert!(
        text.contains("     10  0x534E   21326    21326  SN"),
        "{text}"
    );
    assert!(text.contains("     10  ABCD  f32="), "{text}");

    // The separate --tcp-port works as well, and a TCP port given to --port (the serial port)
    // is refused with the right spelling (#18).
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_fieldgate"))
        .args(["read", "--host", "127.0.0.1", "--tcp-port", &port])
        .args(["--unit", "4", "--holding", "10", "--count", "2"])
        .output()
        .await
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("     10  0x534E   21326    21326  SN"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_fieldgate"))
        .args(["read", "--port", &port, "--unit", "4", "--holding", "10"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("--port names a serial port (e.g. /dev/ttyUSB0); for Modbus TCP write --host HOST:{port}")),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.yaml");
    std::fs::write(
        &cfg,
        format!("mqtt: {{ url: mqtt://127.0.0.1:1 }}\nbuses:\n  plc:\n    modbus_tcp: {{ host: 127.0.0.1, port: {port} }}\n"),
    )
    .unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_fieldgate"))
        .arg("read")
        .arg("--config")
        .arg(&cfg)
        .args(["--bus", "plc", "--unit", "4", "--holding", "11"])
        .output()
        .await
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("     11  0x2D34"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_demo_runs_anywhere_and_shows_the_outage_replayed_without_a_gap() {
    // From a folder without mappings/: the built-in copies are used.
    let cwd = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fieldgate"))
        .args([
            "demo",
            "--duration",
            "9s",
            "--cut-at",
            "2s",
            "--cut-for",
            "3s",
        ])
        .current_dir(cwd.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("uplink CUT") && stdout.contains("uplink RESTORED"),
        "{stdout}"
    );
    assert!(
        stdout.contains("fieldgate/demo/boiler/flow_temp {\"value\":"),
        "{stdout}"
    );
    // Judged from what the demo printed, not from its own summary (#17): every line is
    // `topic payload`; the seqs from 1 on, without a gap; readings polled during the cut
    // arrive after it with their poll times.
    let reading = |line: &str| -> Option<(u64, i64)> {
        let json: serde_json::Value =
            serde_json::from_str(line.split_once(' ')?.1.split("   <-").next()?).ok()?;
        let ts = time::OffsetDateTime::parse(
            json.get("ts")?.as_str()?,
            &time::format_description::well_known::Rfc3339,
        )
        .ok()?;
        Some((
            json.get("seq")?.as_u64()?,
            (ts.unix_timestamp_nanos() / 1_000_000) as i64,
        ))
    };
    let (before_cut, rest) = stdout.split_once("uplink CUT").unwrap();
    let (_, after_restore) = rest.split_once("uplink RESTORED").unwrap();
    let seqs: std::collections::BTreeSet<u64> =
        stdout.lines().filter_map(reading).map(|(s, _)| s).collect();
    assert_eq!(seqs.first(), Some(&1), "{stdout}");
    common::assert_gapless(seqs.iter().copied());
    let last_before_cut = before_cut
        .lines()
        .filter_map(reading)
        .map(|(_, ts)| ts)
        .max()
        .unwrap();
    let polled_during_cut = after_restore
        .lines()
        .filter_map(reading)
        .filter(|(_, ts)| (last_before_cut + 500..last_before_cut + 3_000).contains(ts))
        .count();
    assert!(
        polled_during_cut >= 5,
        "{polled_during_cut} readings polled during the cut arrived after it:\n{stdout}"
    );
}
