//! Home Assistant MQTT discovery, checked field by field against HA's documented schema.

mod common;

use std::time::Duration;

use common::{Gateway, Subscriber, config};
use fieldgate::testkit::sim::Simulator;
use serde_json::json;

const DEVICES: &str = "  boiler:\n    bus: plc\n    points:\n      temp: { register: 0, type: f32, unit: \"°C\" }\n      energy: { register: 2, type: u32, unit: kWh }\n      door: { discrete: 1 }\n      pump: { coil: 1, writable: true }\n      setpoint: { register: 4, type: f32, writable: true, min: 5, max: 80, unit: \"°C\" }\n      label: { register: 6, type: string, length: 2 }\n";

fn disc(sub: &Subscriber, component: &str, point: &str) -> Vec<common::Received> {
    let topic = format!("homeassistant/{component}/gw1/boiler_{point}/config");
    sub.all().into_iter().filter(|r| r.topic == topic).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_point_is_announced_republished_for_ha_and_removed_when_it_leaves() {
    let broker = fieldgate::testkit::broker::start().unwrap();
    let sim = Simulator::start(None).await.unwrap();
    sim.with_unit(1, |b| {
        b.set_holding(0, &[0x41A0, 0, 0, 5, 0x4248, 0, 0x4142, 0x4344]);
        b.discrete.insert(1, true);
        b.coils.insert(1, false);
    });
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let sub = Subscriber::start(broker).await;
    let yaml = config(&state, broker, sim.addr, DEVICES) + "homeassistant: { discovery: true }\n";
    let gw = Gateway::start(dir.path(), &yaml);
    sub.wait_for(Duration::from_secs(5), "six configs", |g| {
        g.iter()
            .filter(|r| r.topic.starts_with("homeassistant/"))
            .count()
            >= 6
    })
    .await;

    let temp = disc(&sub, "sensor", "temp")[0].json.clone().unwrap();
    assert_eq!(temp["name"], json!("temp"));
    assert_eq!(temp["unique_id"], json!("fieldgate_gw1_boiler_temp"));
    assert_eq!(temp["state_topic"], json!("fieldgate/gw1/boiler/temp"));
    assert_eq!(temp["value_template"], json!("{{ value_json.value }}"));
    assert_eq!(temp["unit_of_measurement"], json!("°C"));
    assert_eq!(temp["device_class"], json!("temperature"));
    assert_eq!(temp["state_class"], json!("measurement"));
    assert_eq!(temp["availability_mode"], json!("all"));
    assert_eq!(
        temp["availability"],
        json!([{"topic": "fieldgate/gw1/status"}, {"topic": "fieldgate/gw1/boiler/availability"}])
    );
    assert_eq!(
        temp["device"]["identifiers"],
        json!(["fieldgate_gw1_boiler"])
    );
    assert_eq!(temp["device"]["name"], json!("boiler"));
    assert_eq!(temp["device"]["via_device"], json!("fieldgate_gw1"));

    let energy = disc(&sub, "sensor", "energy")[0].json.clone().unwrap();
    assert_eq!(
        (
            energy["device_class"].clone(),
            energy["state_class"].clone()
        ),
        (json!("energy"), json!("total_increasing"))
    );

    let door = disc(&sub, "binary_sensor", "door")[0].json.clone().unwrap();
    assert_eq!(door["state_topic"], json!("fieldgate/gw1/boiler/door"));
    assert!(door["value_template"].as_str().unwrap().contains("'ON' if"));
    assert!(door.get("unit_of_measurement").is_none());

    let pump = disc(&sub, "switch", "pump")[0].json.clone().unwrap();
    assert_eq!(
        pump["command_topic"],
        json!("fieldgate/gw1/boiler/pump/set")
    );
    assert_eq!(
        (pump["payload_on"].clone(), pump["payload_off"].clone()),
        (json!("true"), json!("false"))
    );
    assert_eq!(
        (pump["state_on"].clone(), pump["state_off"].clone()),
        (json!("ON"), json!("OFF"))
    );

    let sp = disc(&sub, "number", "setpoint")[0].json.clone().unwrap();
    assert_eq!(
        sp["command_topic"],
        json!("fieldgate/gw1/boiler/setpoint/set")
    );
    assert_eq!(
        (sp["min"].clone(), sp["max"].clone()),
        (json!(5.0), json!(80.0))
    );
    assert_eq!(sp["device_class"], json!("temperature"));
    assert!(
        sp.get("state_class").is_none(),
        "number entities take no state_class"
    );

    let label = disc(&sub, "sensor", "label")[0].json.clone().unwrap();
    assert!(label.get("state_class").is_none() && label.get("device_class").is_none());

    // Home Assistant restarts and says so: everything is announced again.
    let before = sub
        .all()
        .iter()
        .filter(|r| r.topic.starts_with("homeassistant/") && r.topic.ends_with("/config"))
        .count();
    let o = rumqttc::MqttOptions::new("fake-ha", broker.ip().to_string(), broker.port());
    let (ha, mut el) = rumqttc::AsyncClient::new(o, 10);
    tokio::spawn(async move { while el.poll().await.is_ok() {} });
    ha.publish(
        "homeassistant/status",
        rumqttc::QoS::AtLeastOnce,
        false,
        "online",
    )
    .await
    .unwrap();
    sub.wait_for(Duration::from_secs(5), "the configs again", |g| {
        g.iter()
            .filter(|r| r.topic.starts_with("homeassistant/") && r.topic.ends_with("/config"))
            .count()
            >= before + 6
    })
    .await;
    gw.stop().await;

    // `label` leaves the config: its config is removed (empty retained message).
    let devices = DEVICES.replace(
        "      label: { register: 6, type: string, length: 2 }\n",
        "",
    );
    let yaml = config(&state, broker, sim.addr, &devices) + "homeassistant: { discovery: true }\n";
    let gw = Gateway::start(dir.path(), &yaml);
    sub.wait_for(Duration::from_secs(5), "the removal", |g| {
        g.iter().any(|r| {
            r.topic == "homeassistant/sensor/gw1/boiler_label/config" && r.payload.is_empty()
        })
    })
    .await;
    gw.stop().await;
}

/// Review of #10: every `online` from Home Assistant queued all discovery configs again in an
/// unbounded channel; during a backlog they piled up in memory and all went out. A new
/// announcement now replaces one still waiting: ten `online`s during a backlog give at most a
/// couple of sets, not ten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_home_assistant_births_during_a_backlog_are_coalesced() {
    use fieldgate::mapping::Value;
    use fieldgate::message::{Body, Message, now_ms};
    use fieldgate::testkit::proxy::{FaultProxy, Link};

    let broker = fieldgate::testkit::broker::start().unwrap();
    let sim = Simulator::start(None).await.unwrap();
    sim.with_unit(1, |b| {
        b.set_holding(0, &[0x41A0, 0, 0, 5, 0x4248, 0, 0x4142, 0x4344])
    });
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    // A backlog of 3 000 readings over a 600 ms round trip: the window stays full for seconds.
    {
        let mut s = fieldgate::store::Store::open(&state).unwrap();
        let rows: Vec<Message> = (0..3000)
            .map(|i| Message {
                topic: "site/backlog/x".into(),
                qos: 1,
                retain: false,
                ts_ms: now_ms() - 10_000 + i,
                body: Body::Point {
                    value: Value::Int(i),
                    unit: None,
                },
            })
            .collect();
        s.append(&rows).unwrap();
        s.close().unwrap();
    }
    let proxy = FaultProxy::start(broker).await.unwrap();
    proxy.shape(Link::round_trip(Duration::from_millis(600)));
    let sub = Subscriber::start(broker).await;
    let yaml =
        config(&state, proxy.addr(), sim.addr, DEVICES) + "homeassistant: { discovery: true }\n";
    let gw = Gateway::start(dir.path(), &yaml);
    sub.wait_for(
        Duration::from_secs(10),
        "the first announcement and backlog",
        |g| {
            g.iter().any(|r| r.topic.starts_with("homeassistant/"))
                && g.iter().filter(|r| r.topic == "site/backlog/x").count() >= 100
        },
    )
    .await;
    // Home Assistant restarts ten times in a row.
    let o = rumqttc::MqttOptions::new("ha", broker.ip().to_string(), broker.port());
    let (ha, mut el) = rumqttc::AsyncClient::new(o, 100);
    tokio::spawn(async move { while el.poll().await.is_ok() {} });
    for _ in 0..10 {
        ha.publish(
            "homeassistant/status",
            rumqttc::QoS::AtLeastOnce,
            false,
            "online",
        )
        .await
        .unwrap();
    }
    sub.wait_for(Duration::from_secs(30), "the backlog", |g| {
        g.iter().filter(|r| r.topic == "site/backlog/x").count() >= 3000
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    gw.stop().await;
    let sets = disc(&sub, "sensor", "temp").len();
    assert!(
        (2..=3).contains(&sets),
        "{sets} announcements of one config: the first, then the births coalesced"
    );
}
