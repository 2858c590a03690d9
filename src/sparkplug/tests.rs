//! The edge node's pure parts: metric types and aliases, birth and data payloads, and the
//! commands a host sends, decoded the way a host encodes them.

use super::*;

fn node() -> (Config, EdgeNode) {
    let yaml = "gateway: { id: gw1 }\nmqtt: { url: mqtt://127.0.0.1 }\nbuses: { plc: { modbus_tcp: { host: 127.0.0.1 } } }\ndevices:\n  boiler:\n    bus: plc\n    points:\n      temp: { register: 0, scale: 0.1, unit: \"°C\" }\n      count: { register: 1, type: i32 }\n      pump: { coil: 0, writable: true }\n      raw: { register: 4, internal: true }\n  meter:\n    bus: plc\n    publish: device\n    points:\n      kwh: { register: 0, type: u64 }\n";
    let config = Config::from_text(std::path::Path::new("c.yaml"), yaml).unwrap();
    let node = EdgeNode::new(&config, "plant", "gw1");
    (config, node)
}

#[test]
fn every_published_point_is_a_typed_metric_with_an_alias_unique_in_the_node() {
    let (_, n) = node();
    let names: Vec<(&str, u64, u32)> = n
        .devices
        .iter()
        .flat_map(|(_, m)| m.iter().map(|m| (m.name.as_str(), m.alias, m.datatype)))
        .collect();
    assert_eq!(
        names,
        vec![
            ("count", 2, datatype::INT32),
            ("pump", 3, datatype::BOOLEAN),
            ("temp", 4, datatype::DOUBLE),
            ("kwh", 5, datatype::UINT64),
        ],
        "points in name order; internal ones are not metrics; 0 and 1 are the node's"
    );
    assert_eq!(n.topic("NBIRTH"), "spBv1.0/plant/NBIRTH/gw1");
    assert_eq!(
        n.device_topic("DDATA", "meter"),
        "spBv1.0/plant/DDATA/gw1/meter"
    );
    assert_eq!(
        n.source("fieldgate/gw1/boiler/temp"),
        Some(&Source::Point(4))
    );
    assert_eq!(
        n.source("fieldgate/gw1/meter"),
        Some(&Source::Device("meter".into()))
    );
}

#[test]
fn values_are_encoded_in_their_type_and_nothing_is_coerced_silently() {
    use datatype::*;
    assert_eq!(
        metric_value(&Value::Int(-2), INT16),
        Some(MetricValue::IntValue((-2i32) as u32))
    );
    assert_eq!(
        metric_value(&Value::Int(-2), INT64),
        Some(MetricValue::LongValue((-2i64) as u64))
    );
    assert_eq!(metric_value(&Value::Int(-2), UINT16), None, "does not fit");
    assert_eq!(
        metric_value(&Value::UInt(u64::MAX), UINT64),
        Some(MetricValue::LongValue(u64::MAX))
    );
    assert_eq!(
        metric_value(&Value::Int(230), DOUBLE),
        Some(MetricValue::DoubleValue(230.0))
    );
    assert_eq!(metric_value(&Value::Null, DOUBLE), None);
    assert_eq!(
        json_of(&MetricValue::IntValue((-5i32) as u32), Some(INT32)),
        serde_json::json!(-5)
    );
}

#[test]
fn births_carry_names_and_values_data_only_aliases() {
    let (_, n) = node();
    let birth = Payload::decode(n.nbirth(7, 1000).as_slice()).unwrap();
    assert_eq!(birth.seq, Some(0));
    assert_eq!(birth.metrics[0].name.as_deref(), Some("bdSeq"));
    assert_eq!(birth.metrics[0].value, Some(MetricValue::LongValue(7)));
    assert_eq!(birth.metrics[1].name.as_deref(), Some(REBIRTH));
    let death = Payload::decode(n.ndeath(7, 1000).as_slice()).unwrap();
    assert_eq!(death.seq, None);
    assert_eq!(death.metrics[0].value, Some(MetricValue::LongValue(7)));

    let mut values = BTreeMap::new();
    values.insert("temp".to_string(), (Value::Float(61.5), 900));
    let db = Payload::decode(n.dbirth("boiler", &values, 1, 1000).as_slice()).unwrap();
    assert_eq!(db.metrics.len(), 3);
    let temp = &db.metrics[2];
    assert_eq!(temp.name.as_deref(), Some("temp"));
    assert_eq!(temp.value, Some(MetricValue::DoubleValue(61.5)));
    assert_eq!(temp.timestamp, Some(900));
    let props = temp.properties.as_ref().unwrap();
    assert_eq!(props.keys, vec!["engUnit", "scale"]);
    assert_eq!(
        db.metrics[0].is_null,
        Some(true),
        "no value yet: null, typed"
    );
    assert_eq!(db.metrics[0].datatype, Some(datatype::INT32));

    let (device, bytes) = n
        .ddata(
            &Source::Point(4),
            &[("temp", &Value::Float(62.0))],
            950,
            true,
            2,
            1000,
        )
        .unwrap();
    assert_eq!(device, "boiler");
    let dd = Payload::decode(bytes.as_slice()).unwrap();
    assert_eq!(dd.metrics[0].name, None);
    assert_eq!(dd.metrics[0].alias, Some(4));
    assert_eq!(dd.metrics[0].is_historical, Some(true));
    assert_eq!(dd.metrics[0].timestamp, Some(950));
}

#[test]
fn commands_name_a_rebirth_or_a_write_to_a_metric() {
    let (_, n) = node();
    let cmd = |metrics: Vec<Metric>| {
        Payload {
            timestamp: Some(1),
            metrics,
            seq: None,
        }
        .encode_to_vec()
    };
    let rebirth = cmd(vec![Metric {
        name: Some(REBIRTH.into()),
        datatype: Some(datatype::BOOLEAN),
        value: Some(MetricValue::BooleanValue(true)),
        ..Default::default()
    }]);
    assert_eq!(n.requests(None, &rebirth), vec![Request::Rebirth]);
    let write = cmd(vec![Metric {
        alias: Some(3),
        value: Some(MetricValue::BooleanValue(true)),
        ..Default::default()
    }]);
    assert_eq!(
        n.requests(Some("boiler"), &write),
        vec![Request::Write {
            device: "boiler".into(),
            point: 1,
            value: serde_json::json!(true)
        }]
    );
    // An alias of another device's metric is not this device's.
    assert!(matches!(
        n.requests(Some("meter"), &write)[0],
        Request::Ignored(_)
    ));
    assert!(matches!(
        n.requests(None, b"\xff\xff")[0],
        Request::Ignored(_)
    ));
}
