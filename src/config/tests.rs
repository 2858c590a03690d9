//! Unit tests of the pure helpers: environment expansion, sizes, MQTT URLs, topic templates.

use super::resolve::{parse_bytes, parse_mqtt_url};
use super::*;

fn env(k: &str) -> Option<String> {
    match k {
        "PASS" => Some("s3cret".into()),
        "ODD" => Some("a: b #c".into()),
        _ => None,
    }
}

#[test]
fn env_expands_in_values_but_not_in_comments() {
    let out = expand_env("password: ${PASS} # ${NOT_SET} stays\n", &env).unwrap();
    assert_eq!(out, "password: s3cret # ${NOT_SET} stays\n");
}

#[test]
fn env_defaults_and_escapes() {
    assert_eq!(
        expand_env("port: ${NOPE:-1883}\n", &env).unwrap(),
        "port: 1883\n"
    );
    assert_eq!(expand_env("x: $${PASS}\n", &env).unwrap(), "x: ${PASS}\n");
    // Only `$${` is an escape: other dollars stay as written (documented, #18).
    assert_eq!(
        expand_env("p: pa$$word cost$ $x\n", &env).unwrap(),
        "p: pa$$word cost$ $x\n"
    );
}

#[test]
fn env_values_yaml_would_misread_are_quoted() {
    assert_eq!(expand_env("p: ${ODD}\n", &env).unwrap(), "p: \"a: b #c\"\n");
    assert_eq!(
        expand_env("p: \"x${ODD}\"\n", &env).unwrap(),
        "p: \"xa: b #c\"\n"
    );
}

#[test]
fn a_missing_env_var_names_its_line_and_column() {
    let err = expand_env("a: 1\nb: ${MISSING}\n", &env).unwrap_err();
    assert_eq!(err, vec![(Loc { line: 2, col: 4 }, "MISSING".to_string())]);
}

#[test]
fn sizes_take_units() {
    assert_eq!(parse_bytes("1048576"), Ok(1 << 20));
    assert_eq!(parse_bytes("512KiB"), Ok(512 << 10));
    assert_eq!(parse_bytes("1GB"), Ok(1_000_000_000));
    assert_eq!(parse_bytes("1.5 GiB"), Ok(3 << 29));
    assert!(parse_bytes("12 parsecs").is_err());
}

#[test]
fn mqtt_urls() {
    let url = |u| parse_mqtt_url(u).unwrap();
    assert_eq!(
        url("mqtt://127.0.0.1:1883"),
        ("127.0.0.1".into(), 1883, false)
    );
    assert_eq!(url("mqtt://broker"), ("broker".into(), 1883, false));
    assert_eq!(url("mqtts://broker"), ("broker".into(), 8883, true));
    assert_eq!(url("mqtt://[::1]:1884"), ("::1".into(), 1884, false));
    assert!(parse_mqtt_url("http://x").is_err());
    assert!(parse_mqtt_url("mqtt://x:99999").is_err());
    assert!(
        parse_mqtt_url("mqtt://user:pw@broker").is_err(),
        "no credentials in URLs"
    );
}

#[test]
fn report_by_exception_settles_per_point_and_warns_where_home_assistant_would_miss_values() {
    let yaml = "homeassistant: { discovery: true }\nmqtt: { url: mqtt://127.0.0.1 }\nbuses: { plc: { modbus_tcp: { host: 127.0.0.1 } } }\ndevices:\n  d:\n    bus: plc\n    publish: device\n    on_change: true\n    deadband: 2\n    heartbeat: 10m\n    points:\n      t: { register: 0, deadband: \"1%\" }\n      flag: { coil: 0 }\n      raw: { register: 1, on_change: false }\n";
    let c = Config::from_text(Path::new("c.yaml"), yaml).unwrap();
    let d = &c.devices[0];
    let r = |n: &str| d.points.iter().find(|p| p.name == n).unwrap().reporting;
    use crate::mapping::Deadband;
    assert!(r("t").on_change);
    assert_eq!(
        r("t").deadband,
        Some(Deadband::Percent(1.0)),
        "the point's own"
    );
    assert_eq!(r("flag").deadband, None, "a bool takes no deadband");
    assert_eq!(r("flag").heartbeat, Some(Duration::from_secs(600)));
    assert!(!r("raw").on_change, "turned off for one point");
    assert!(!d.whole_device_on_change);
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    assert!(c.warnings[0].message.contains("on_change: device"));
    let whole = Config::from_text(
        Path::new("c.yaml"),
        &yaml.replace("on_change: true", "on_change: device"),
    )
    .unwrap();
    assert!(whole.devices[0].whole_device_on_change);
    assert!(whole.warnings.is_empty());
}

#[test]
fn a_status_page_beyond_loopback_without_a_password_is_warned_about() {
    let base = "mqtt: { url: mqtt://127.0.0.1 }\n";
    let open = Config::from_text(
        Path::new("c.yaml"),
        &format!("{base}web: {{ listen: 0.0.0.0:8080 }}\n"),
    )
    .unwrap();
    assert_eq!(open.warnings.len(), 1, "{:?}", open.warnings);
    assert_eq!(open.warnings[0].path, "web.listen");
    assert!(open.warnings[0].message.contains("without a password"));
    let local = Config::from_text(
        Path::new("c.yaml"),
        &format!("{base}web: {{ listen: 127.0.0.1:8080 }}\n"),
    )
    .unwrap();
    assert!(local.warnings.is_empty());
    assert_eq!(local.web.unwrap().password, None);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("web.pass"), "pw\n").unwrap();
    let guarded = Config::from_text(
        &dir.path().join("c.yaml"),
        &format!("{base}web: {{ listen: 0.0.0.0:8080, password_file: web.pass }}\n"),
    )
    .unwrap();
    assert_eq!(guarded.web.unwrap().password, Some(Secret("pw".into())));
    let missing = Config::from_text(
        &dir.path().join("c.yaml"),
        &format!("{base}web: {{ listen: 0.0.0.0:8080, password_file: nope }}\n"),
    )
    .unwrap_err();
    assert_eq!(missing.0[0].path, "web.password_file");
}

#[test]
fn the_mqtt_version_is_chosen_in_words_and_v5_only_settings_are_explained() {
    let load = |mqtt: &str, devices: &str| {
        Config::from_text(
            Path::new("c.yaml"),
            &format!("mqtt: {{ url: mqtt://127.0.0.1{mqtt} }}\n{devices}"),
        )
    };
    assert_eq!(load("", "").unwrap().mqtt.protocol, Protocol::V311);
    for five in [", protocol: 5", ", protocol: \"5\"", ", protocol: 5.0"] {
        assert_eq!(
            load(five, "").unwrap().mqtt.protocol,
            Protocol::V5,
            "{five}"
        );
    }
    assert_eq!(
        load(", protocol: 3.1.1", "").unwrap().mqtt.protocol,
        Protocol::V311
    );
    let bad = load(", protocol: 4", "").unwrap_err();
    assert_eq!(bad.0[0].path, "mqtt.protocol");
    assert!(
        bad.0[0].message.contains("expected 3.1.1 or 5"),
        "{}",
        bad.0[0].message
    );
    // rumqttc's v5 client takes no keep-alive under 5 s: raised, and said so.
    let short = load(", protocol: 5, keep_alive: 2s", "").unwrap();
    assert_eq!(short.mqtt.keep_alive, std::time::Duration::from_secs(5));
    assert_eq!(short.warnings[0].path, "mqtt.keep_alive");
    // Message expiry is an MQTT 5 property: under 3.1.1 it would silently not be sent.
    let devices = "buses: { plc: { modbus_tcp: { host: 127.0.0.1 } } }\ndevices:\n  d:\n    bus: plc\n    message_expiry: 10m\n    points: { p: { register: 0 } }\n";
    let v311 = load("", devices).unwrap();
    assert_eq!(v311.warnings[0].path, "devices.d.message_expiry");
    let v5 = load(", protocol: 5", devices).unwrap();
    assert!(v5.warnings.is_empty(), "{:?}", v5.warnings);
    assert_eq!(
        v5.devices[0].message_expiry,
        Some(std::time::Duration::from_secs(600))
    );
    let zero = load(", protocol: 5", &devices.replace("10m", "500ms")).unwrap_err();
    assert_eq!(zero.0[0].path, "devices.d.message_expiry");
}

#[test]
fn sparkplug_ids_are_topic_levels_and_check_names_them() {
    let load = |sp: &str| {
        Config::from_text(
            Path::new("c.yaml"),
            &format!(
                "gateway: {{ id: gw1 }}\nmqtt: {{ url: mqtt://127.0.0.1 }}\nsparkplug: {sp}\nbuses: {{ plc: {{ modbus_tcp: {{ host: 127.0.0.1 }} }} }}\ndevices:\n  boiler:\n    bus: plc\n    points: {{ t: {{ register: 0 }}, raw: {{ register: 1, internal: true }} }}\n"
            ),
        )
    };
    let c = load("{ group_id: plant }").unwrap();
    let sp = c.sparkplug.as_ref().unwrap();
    assert_eq!(
        (sp.group_id.as_str(), sp.edge_node_id.as_str(), sp.json),
        ("plant", "gw1", true),
        "the edge node id defaults to the gateway id"
    );
    assert!(
        c.summary().contains(
            "Sparkplug B: group plant, edge node gw1 (spBv1.0/plant/…/gw1), JSON topics too; devices: boiler (1 metric)"
        ),
        "{}",
        c.summary()
    );
    let bad = load("{ group_id: \"a/b\", edge_node_id: \"#\" }").unwrap_err();
    let paths: Vec<&str> = bad.0.iter().map(|d| d.path.as_str()).collect();
    assert_eq!(paths, vec!["sparkplug.group_id", "sparkplug.edge_node_id"]);
    let unknown = load("{ group_id: plant, groop: x }").unwrap_err();
    assert!(
        unknown.0[0].message.contains("groop"),
        "{}",
        unknown.0[0].message
    );
}
