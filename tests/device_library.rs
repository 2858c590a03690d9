//! The device library in `mappings/`: every model checks, names its source, and decodes a
//! simulated device exactly.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Gateway, Subscriber};
use fieldgate::config::{Config, check_model, is_model_text};
use fieldgate::testkit::sim::RtuBus;
use serde_json::json;

fn models() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir("mappings")
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .filter(|p| is_model_text(&std::fs::read_to_string(p).unwrap()))
        .collect();
    v.sort();
    v
}

#[test]
fn every_shipped_model_checks_and_names_its_source() {
    let models = models();
    let real: Vec<_> = models
        .iter()
        .filter(|p| !p.ends_with("demo-boiler.yaml"))
        .collect();
    assert!(real.len() >= 8, "{} real device models", real.len());
    for path in &models {
        let m = check_model(path).unwrap_or_else(|e| panic!("{}:\n{e}", path.display()));
        assert!(!m.points.is_empty(), "{}", path.display());
        if !path.ends_with("demo-boiler.yaml") {
            let d = m.description.unwrap_or_default();
            assert!(d.contains("Source:"), "{} names no source", path.display());
        }
        // `fieldgate check` accepts the model file itself.
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_fieldgate"))
            .arg("check")
            .arg(path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn a_config_using_every_model_loads() {
    let mut devices = String::new();
    for path in models() {
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        let bus = if text.contains("\nparse:") {
            "gps"
        } else if text.contains("Modbus TCP") || name == "demo-boiler" {
            "lan"
        } else {
            "rs485"
        };
        devices += &format!("  {name}:\n    bus: {bus}\n    model: {name}\n");
    }
    let yaml = format!(
        "mqtt: {{ url: mqtt://127.0.0.1 }}\nmodels: [../mappings]\nbuses:\n  rs485:\n    modbus_rtu: {{ port: /dev/ttyUSB0 }}\n  lan:\n    modbus_tcp: {{ host: 127.0.0.1 }}\n  gps:\n    serial_line: {{ port: /dev/ttyACM0, baud: 4800 }}\ndevices:\n{devices}"
    );
    let c =
        Config::from_text(Path::new("tests/library.yaml"), &yaml).unwrap_or_else(|e| panic!("{e}"));
    assert!(c.devices.len() >= 9);
    assert!(c.requests_per_cycle() > 0);
}

#[test]
fn the_packaged_example_config_checks() {
    let text = std::fs::read_to_string("packaging/config.yaml").unwrap();
    // The package installs the models under /usr/share; here they are in ./mappings.
    let text = text.replace("/usr/share/fieldgate/mappings", "../mappings");
    Config::from_text(Path::new("packaging/config.yaml"), &text).unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_xy_md02_and_an_sdm120_on_one_bus_decode_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let bus = RtuBus::start(dir.path(), 9600).unwrap();
    bus.with_unit(1, |b| b.set_input(1, &[0xFF9C, 456])); // -10.0 °C, 45.6 %
    bus.with_unit(2, |b| {
        let mut regs = vec![0u16; 344];
        let mut put = |addr: usize, v: f32| {
            let bits = v.to_bits();
            regs[addr] = (bits >> 16) as u16;
            regs[addr + 1] = bits as u16;
        };
        put(0, 230.1);
        put(6, 1.25);
        put(12, 287.6);
        put(70, 50.02);
        put(342, 1234.5);
        b.set_input(0, &regs);
    });
    let broker = fieldgate::testkit::broker::start().unwrap();
    let sub = Subscriber::start(broker).await;
    let mappings = std::fs::canonicalize("mappings").unwrap();
    let yaml = format!(
        "gateway: {{ id: gw1, state_dir: {} }}\nmqtt: {{ url: mqtt://{broker} }}\nmodels: [{}]\nbuses:\n  rs485:\n    modbus_rtu: {{ port: {}, baud: 9600 }}\ndevices:\n  room:\n    bus: rs485\n    unit: 1\n    model: xy-md02\n  meter:\n    bus: rs485\n    unit: 2\n    model: eastron-sdm120\n",
        dir.path().join("state").display(),
        mappings.display(),
        bus.path.display()
    );
    let gw = Gateway::start(dir.path(), &yaml);
    sub.wait_for(Duration::from_secs(10), "both devices", |g| {
        g.iter().any(|r| r.topic.ends_with("/room/humidity"))
            && g.iter().any(|r| r.topic.ends_with("/meter/total_energy"))
    })
    .await;
    gw.stop().await;
    let v = |t: &str| {
        sub.all()
            .iter()
            .find(|r| r.topic == format!("fieldgate/gw1/{t}"))
            .and_then(|r| r.value().cloned())
    };
    assert_eq!(v("room/temperature"), Some(json!(-10.0)));
    assert_eq!(v("room/humidity"), Some(json!(45.6)));
    assert_eq!(v("meter/voltage"), Some(json!(230.1)));
    assert_eq!(v("meter/current"), Some(json!(1.25)));
    assert_eq!(v("meter/active_power"), Some(json!(287.6)));
    assert_eq!(v("meter/frequency"), Some(json!(50.02)));
    assert_eq!(v("meter/total_energy"), Some(json!(1234.5)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sunspec_inverter_publishes_scaled_values_and_no_raw_registers() {
    let sim = fieldgate::testkit::sim::Simulator::start(None)
        .await
        .unwrap();
    sim.with_unit(1, |b| {
        let mut r = vec![0u16; 38]; // 40071..=40108
        let mut put = |addr: usize, v: i32| r[addr - 40071] = v as u16;
        put(40071, 1234); // A, A_SF -2 → 12.34 A
        put(40072, 411);
        put(40073, 412);
        put(40074, 411);
        put(40075, -2);
        put(40079, 2301); // V, V_SF -1 → 230.1 V
        put(40080, 2299);
        put(40081, 2310);
        put(40082, -1);
        put(40083, 8470); // W, W_SF 0
        put(40084, 0);
        put(40085, 5002); // Hz, Hz_SF -2 → 50.02
        put(40086, -2);
        put(40087, 8500);
        put(40088, 0);
        put(40089, -120);
        put(40090, 0);
        put(40091, 9960); // PF, PF_SF -2 → 99.6 %
        put(40092, -2);
        put(40093, (123_456_789u32 >> 16) as i32); // WH acc32, high word first
        put(40094, (123_456_789u32 & 0xFFFF) as i32);
        put(40095, 1); // WH_SF 1 → 1 234 567 890 Wh
        put(40096, 2050); // DC A, SF -2 → 20.5
        put(40097, -2);
        put(40098, 4500); // DC V, SF -1 → 450
        put(40099, -1);
        put(40100, 9225); // DC W, SF 0
        put(40101, 0);
        put(40103, 453); // heat sink, Tmp_SF -1 → 45.3 °C
        put(40106, -1);
        put(40107, 4); // MPPT: producing
        b.set_holding(40071, &r);
    });
    let dir = tempfile::tempdir().unwrap();
    let broker = fieldgate::testkit::broker::start().unwrap();
    let sub = Subscriber::start(broker).await;
    let mappings = std::fs::canonicalize("mappings").unwrap();
    let yaml = format!(
        "gateway: {{ id: gw1, state_dir: {} }}\nmqtt: {{ url: mqtt://{broker} }}\nmodels: [{}]\nbuses:\n  lan:\n    modbus_tcp: {{ host: 127.0.0.1, port: {} }}\ndevices:\n  inverter:\n    bus: lan\n    model: sunspec-inverter\n",
        dir.path().join("state").display(),
        mappings.display(),
        sim.addr.port()
    );
    let gw = Gateway::start(dir.path(), &yaml);
    sub.wait_for(Duration::from_secs(10), "a poll", |g| {
        g.iter().any(|r| r.topic.ends_with("/inverter/fault"))
    })
    .await;
    gw.stop().await;
    let v = |t: &str| {
        sub.all()
            .iter()
            .find(|r| r.topic == format!("fieldgate/gw1/inverter/{t}"))
            .and_then(|r| r.value().cloned())
            .unwrap_or_else(|| panic!("nothing on {t}"))
    };
    for (point, want) in [
        ("ac_current", json!(12.34)),
        ("l1_current", json!(4.11)),
        ("l2_current", json!(4.12)),
        ("l1_voltage", json!(230.1)),
        ("l2_voltage", json!(229.9)),
        ("l3_voltage", json!(231.0)),
        ("ac_power", json!(8470.0)),
        ("frequency", json!(50.02)),
        ("apparent_power", json!(8500.0)),
        ("reactive_power", json!(-120.0)),
        ("power_factor", json!(99.6)),
        ("energy", json!(1_234_567_890.0)),
        ("dc_current", json!(20.5)),
        ("dc_voltage", json!(450.0)),
        ("dc_power", json!(9225.0)),
        ("efficiency", json!(100.0 * 8470.0 / 9225.0)),
        ("heatsink_temperature", json!(45.3)),
        ("status", json!(4)),
        ("producing", json!(true)),
        ("fault", json!(false)),
    ] {
        assert_eq!(v(point), want, "{point}");
    }
    // The raw registers and scale factors are read, not published.
    let topics: std::collections::BTreeSet<String> = sub
        .all()
        .iter()
        .filter(|r| r.seq().is_some())
        .map(|r| r.topic.clone())
        .collect();
    for raw in ["a", "a_sf", "w", "w_sf", "wh", "tmp_sink"] {
        assert!(
            !topics.contains(&format!("fieldgate/gw1/inverter/{raw}")),
            "{raw} published: {topics:?}"
        );
    }
    assert_eq!(
        topics.len(),
        21,
        "20 computed points and the status: {topics:?}"
    );
}
