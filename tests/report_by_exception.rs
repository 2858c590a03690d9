//! Report by exception and computed points, end to end: a simulated Modbus device whose
//! registers the test changes, the gateway, a broker and a subscriber.
//!
//! The heartbeat's timing is specified with a paused clock in `change.rs`'s unit tests; here
//! the rules are checked as a consumer sees them.

mod common;

use std::time::Duration;

use common::{Gateway, Mosquitto, Subscriber, config};
use fieldgate::testkit::sim::Simulator;
use serde_json::json;

const T: &str = "fieldgate/gw1/meter";

/// Waits until the simulator has answered `n` more requests (polls of a one-request device).
async fn polls(sim: &Simulator, n: u64) {
    let until = sim.requests() + n;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while sim.requests() < until {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the device was not polled {n} more times in 10s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One request reads them all: voltage (0.1 V), W and its SunSpec scale factor, a zero.
const METER: &str = r#"  meter:
    bus: plc
    every: 100ms
    on_change: true
    points:
      voltage: { register: 0, scale: 0.1, unit: V, deadband: 0.5 }
      w:       { register: 1, type: i16 }
      w_sf:    { register: 2, type: i16 }
      zero:    { register: 3 }
      power:   { expr: "w * 10^w_sf", unit: W }
      ratio:   { expr: "w / zero" }
      high:    { expr: "voltage > 240" }
"#;

fn set(sim: &Simulator, voltage: u16, w: i16, sf: i16) {
    sim.with_unit(1, |b| {
        b.set_holding(0, &[voltage, w as u16, sf as u16, 0]);
    });
}

async fn deadbands_and_computed_points(broker: std::net::SocketAddr) {
    let sim = Simulator::start(None).await.unwrap();
    set(&sim, 2300, 12345, -2);
    let dir = tempfile::tempdir().unwrap();
    let sub = Subscriber::start(broker).await;
    let yaml = config(&dir.path().join("state"), broker, sim.addr, METER)
        .replace("  id: gw1\n", "  id: gw1\n  status_interval: 1s\n");
    let gw = Gateway::start(dir.path(), &yaml);
    sub.wait_for(Duration::from_secs(10), "the first poll", |got| {
        got.iter().any(|r| r.topic == format!("{T}/high"))
    })
    .await;
    // Computed exactly: the scale factor makes 123.45, not 123.45000000000002; w / 0 is null.
    assert_eq!(sub.values(&format!("{T}/power")), vec![json!(123.45)]);
    assert_eq!(sub.latest_json(&format!("{T}/power"))["unit"], json!("W"));
    assert_eq!(sub.values(&format!("{T}/ratio")), vec![json!(null)]);
    assert_eq!(sub.values(&format!("{T}/high")), vec![json!(false)]);

    // Inside the 0.5 V deadband: read, not published.
    set(&sim, 2304, 12345, -2);
    polls(&sim, 5).await;
    set(&sim, 2296, 12345, -2);
    polls(&sim, 5).await;
    // Outside it: published; then measured from 230.6, not from the 230.0 published before.
    set(&sim, 2306, 12345, -2);
    polls(&sim, 5).await;
    set(&sim, 2310, 12345, -2);
    polls(&sim, 5).await;
    // A computed point changes with its inputs: 12345 × 10^-1.
    set(&sim, 2420, 12345, -1);
    sub.wait_for(Duration::from_secs(10), "the changed power", |got| {
        got.iter()
            .filter(|r| r.topic == format!("{T}/power"))
            .count()
            == 2
    })
    .await;
    polls(&sim, 3).await;
    let stats = "fieldgate/gw1/status/stats";
    let before = sub.all().iter().filter(|r| r.topic == stats).count();
    sub.wait_for(Duration::from_secs(5), "a status message", |got| {
        got.iter().filter(|r| r.topic == stats).count() > before
    })
    .await;
    gw.stop().await;

    assert_eq!(
        sub.values(&format!("{T}/voltage")),
        vec![json!(230.0), json!(230.6), json!(242.0)]
    );
    assert_eq!(
        sub.values(&format!("{T}/power")),
        vec![json!(123.45), json!(1234.5)]
    );
    assert_eq!(
        sub.values(&format!("{T}/high")),
        vec![json!(false), json!(true)]
    );
    assert_eq!(sub.values(&format!("{T}/ratio")), vec![json!(null)]);
    assert_eq!(sub.values(&format!("{T}/w")), vec![json!(12345)]);
    assert_eq!(sub.values(&format!("{T}/w_sf")), vec![json!(-2), json!(-1)]);
    // What was not published is counted (status figures).
    let status = sub.latest_json(stats);
    let unchanged = status["buses"]["plc"]["devices"]["meter"]["unchanged"]
        .as_u64()
        .unwrap_or(0);
    assert!(unchanged > 50, "unchanged readings counted: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_inside_the_deadband_is_not_published_and_computed_values_are_exact() {
    let broker = fieldgate::testkit::broker::start().unwrap();
    deadbands_and_computed_points(broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_a_value_inside_the_deadband_is_not_published_and_computed_values_are_exact() {
    let Some(m) = Mosquitto::start() else { return };
    deadbands_and_computed_points(m.addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_device_publishes_nothing_until_it_answers_then_everything() {
    let broker = fieldgate::testkit::broker::start().unwrap();
    let sim = Simulator::start(None).await.unwrap();
    set(&sim, 2300, 100, 0);
    let dir = tempfile::tempdir().unwrap();
    let sub = Subscriber::start(broker).await;
    let gw = Gateway::start(
        dir.path(),
        &config(&dir.path().join("state"), broker, sim.addr, METER),
    );
    sub.wait_for(Duration::from_secs(10), "the first poll", |got| {
        got.iter().any(|r| r.topic == format!("{T}/high"))
    })
    .await;
    polls(&sim, 5).await;
    sim.state.lock().unwrap().silent.push(1);
    sub.wait_for(Duration::from_secs(10), "offline", |got| {
        got.iter()
            .any(|r| r.topic == format!("{T}/availability") && r.payload == "offline")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Back, with the same values: the consumer cannot know nothing changed while it was away.
    sim.state.lock().unwrap().silent.clear();
    sub.wait_for(Duration::from_secs(10), "everything again", |got| {
        got.iter()
            .filter(|r| r.topic == format!("{T}/power"))
            .count()
            == 2
    })
    .await;
    polls(&sim, 5).await;
    gw.stop().await;

    let got = sub.all();
    let at = |topic: &str, payload: &str| {
        got.iter()
            .position(|r| r.topic == topic && r.payload == payload)
            .unwrap_or_else(|| panic!("no {payload} on {topic}"))
    };
    let offline = at(&format!("{T}/availability"), "offline");
    let online_again = got
        .iter()
        .rposition(|r| r.topic == format!("{T}/availability") && r.payload == "online")
        .unwrap();
    assert!(online_again > offline);
    let readings = |r: &common::Received| r.topic.starts_with(T) && r.seq().is_some();
    assert!(
        !got[offline..online_again].iter().any(readings),
        "nothing published while offline: {:?}",
        &got[offline..online_again]
    );
    for point in ["voltage", "w", "w_sf", "zero", "power", "ratio", "high"] {
        let n = got
            .iter()
            .filter(|r| r.topic == format!("{T}/{point}"))
            .count();
        assert_eq!(n, 2, "{point}: once at the start, once when back");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_publishes_every_point_once() {
    let broker = fieldgate::testkit::broker::start().unwrap();
    let sim = Simulator::start(None).await.unwrap();
    set(&sim, 2300, 100, 0);
    let dir = tempfile::tempdir().unwrap();
    let sub = Subscriber::start(broker).await;
    let yaml = config(&dir.path().join("state"), broker, sim.addr, METER);
    for run in 1..=2 {
        let gw = Gateway::start(dir.path(), &yaml);
        sub.wait_for(Duration::from_secs(10), "a poll", |got| {
            got.iter()
                .filter(|r| r.topic == format!("{T}/high"))
                .count()
                == run
        })
        .await;
        polls(&sim, 5).await;
        gw.stop().await;
    }
    for point in ["voltage", "w", "power", "high"] {
        let n = sub.values(&format!("{T}/{point}")).len();
        assert_eq!(n, 2, "{point}: once per start");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_message_carries_the_changed_points_or_all_of_them() {
    let broker = fieldgate::testkit::broker::start().unwrap();
    let sim = Simulator::start(None).await.unwrap();
    set(&sim, 2300, 100, 0);
    let dir = tempfile::tempdir().unwrap();
    let sub = Subscriber::start(broker).await;
    let devices = "  changed:\n    bus: plc\n    every: 100ms\n    publish: device\n    on_change: true\n    points:\n      voltage: { register: 0, scale: 0.1, deadband: 0.5 }\n      w: { register: 1 }\n  whole:\n    bus: plc\n    every: 100ms\n    publish: device\n    on_change: device\n    points:\n      voltage: { register: 0, scale: 0.1, deadband: 0.5 }\n      w: { register: 1 }\n";
    let gw = Gateway::start(
        dir.path(),
        &config(&dir.path().join("state"), broker, sim.addr, devices),
    );
    let device_messages = |sub: &Subscriber, d: &str| -> Vec<serde_json::Value> {
        sub.all()
            .iter()
            .filter(|r| r.topic == format!("fieldgate/gw1/{d}") && r.seq().is_some())
            .map(|r| r.json.clone().unwrap()["values"].clone())
            .collect()
    };
    sub.wait_for(Duration::from_secs(10), "both devices", |got| {
        got.iter().filter(|r| r.seq().is_some()).count() >= 2
    })
    .await;
    polls(&sim, 10).await;
    set(&sim, 2302, 100, 0); // inside the deadband: nothing
    polls(&sim, 10).await;
    set(&sim, 2302, 101, 0); // w changed
    polls(&sim, 10).await;
    gw.stop().await;

    assert_eq!(
        device_messages(&sub, "changed"),
        vec![json!({"voltage": 230.0, "w": 100}), json!({"w": 101})]
    );
    assert_eq!(
        device_messages(&sub, "whole"),
        vec![
            json!({"voltage": 230.0, "w": 100}),
            json!({"voltage": 230.2, "w": 101})
        ]
    );
}
