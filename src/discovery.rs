//! Home Assistant MQTT discovery: a retained config message per point, so every point appears
//! in Home Assistant as a sensor, binary_sensor, number or switch, grouped by device, with its
//! unit, device_class and state_class where the unit makes them clear, and availability tied to
//! both the gateway's and the device's availability topics. Pure: the uplink publishes what
//! [`configs`] returns.
//!
//! Schema: Home Assistant's "MQTT Discovery" documentation (discovery topic
//! `<prefix>/<component>/<node_id>/<object_id>/config`, shared keys `name`, `unique_id`,
//! `state_topic`, `value_template`, `availability`, `availability_mode`, `device`), and the
//! MQTT sensor, binary_sensor, number and switch integrations for their own keys.

use serde_json::{Value as Json, json};

use crate::config::{Config, Discovery, PayloadFormat, PublishMode};
use crate::mapping::DataType;
use crate::modbus::Table;

/// The device_class and state_class a unit implies (None where it does not make them clear).
pub fn classes(unit: Option<&str>) -> (Option<&'static str>, Option<&'static str>) {
    match unit.unwrap_or("") {
        "°C" | "°F" | "K" => (Some("temperature"), Some("measurement")),
        "V" | "mV" | "kV" => (Some("voltage"), Some("measurement")),
        "A" | "mA" => (Some("current"), Some("measurement")),
        "W" | "kW" | "MW" => (Some("power"), Some("measurement")),
        "VA" | "kVA" => (Some("apparent_power"), Some("measurement")),
        "var" | "kvar" => (Some("reactive_power"), Some("measurement")),
        "Wh" | "kWh" | "MWh" => (Some("energy"), Some("total_increasing")),
        "Hz" => (Some("frequency"), Some("measurement")),
        "bar" | "mbar" | "Pa" | "hPa" | "kPa" | "psi" => (Some("pressure"), Some("measurement")),
        "" => (None, None),
        _ => (None, Some("measurement")),
    }
}

/// Every discovery message of `config`: (topic, retained payload).
pub fn configs(config: &Config, d: &Discovery) -> Vec<(String, Json)> {
    let gw = &config.gateway.id;
    let mut out = Vec::new();
    for dev in &config.devices {
        let device_info = json!({
            "identifiers": [format!("fieldgate_{gw}_{}", dev.name)],
            "name": dev.name,
            "manufacturer": "fieldgate",
            "model": if dev.line.is_some() { "serial line device" } else { "Modbus device" },
            "via_device": format!("fieldgate_{gw}"),
        });
        for (i, p) in dev.points.iter().enumerate().filter(|(_, p)| !p.internal) {
            let (component, mut body) = entity(dev, i);
            body["name"] = json!(p.name);
            // Reported by exception with a heartbeat: a value that stops coming (two heartbeats
            // and a poll without it) shows as unavailable, not as the last value for ever.
            if let Some(h) = p.reporting.heartbeat.filter(|_| p.reporting.on_change)
                && matches!(component, "sensor" | "binary_sensor")
            {
                body["expire_after"] = json!((2 * h + p.every).as_secs().max(1));
            }
            body["unique_id"] = json!(format!("fieldgate_{gw}_{}_{}", dev.name, p.name));
            body["availability"] = json!([
                {"topic": config.gateway.status_topic()},
                {"topic": dev.availability_topic},
            ]);
            body["availability_mode"] = json!("all");
            body["device"] = device_info.clone();
            body["origin"] = json!({"name": "fieldgate", "sw_version": env!("CARGO_PKG_VERSION")});
            let topic = crate::topics::ha_config(&d.prefix, component, gw, &dev.name, &p.name);
            out.push((topic, body));
        }
    }
    out
}

fn entity(dev: &crate::config::Device, i: usize) -> (&'static str, Json) {
    let p = &dev.points[i];
    let (state_topic, value) = match dev.publish {
        PublishMode::Device => (
            dev.device_delivery.topic.clone(),
            format!("value_json['values']['{}']", p.name),
        ),
        PublishMode::Point => match dev.payload.get(&p.name) {
            Some(PayloadFormat::Value) => (p.delivery.topic.clone(), "value".to_string()),
            _ => (p.delivery.topic.clone(), "value_json.value".to_string()),
        },
    };
    let command_topic = dev.set_topic(i);
    let is_bool = p.dtype == DataType::Bool;
    if is_bool {
        // Rendered to HA's default ON/OFF, whether the payload carries JSON true or "true".
        let template =
            format!("{{{{ 'ON' if ({value}) in [true, 'true', 'True', 1] else 'OFF' }}}}");
        if p.writable && p.source.table == Table::Coil {
            return (
                "switch",
                json!({
                    "state_topic": state_topic, "value_template": template,
                    "command_topic": command_topic, "payload_on": "true", "payload_off": "false",
                    "state_on": "ON", "state_off": "OFF",
                }),
            );
        }
        return (
            "binary_sensor",
            json!({"state_topic": state_topic, "value_template": template}),
        );
    }
    let mut body =
        json!({"state_topic": state_topic, "value_template": format!("{{{{ {value} }}}}")});
    if let Some(u) = &p.unit {
        body["unit_of_measurement"] = json!(u);
    }
    let (device_class, state_class) = classes(p.unit.as_deref());
    if let Some(dc) = device_class {
        body["device_class"] = json!(dc);
    }
    if p.dtype.is_numeric() {
        if p.writable {
            body["command_topic"] = json!(command_topic);
            body["mode"] = json!("box");
            let step = p.scale.unwrap_or(1.0);
            body["step"] = json!(if matches!(p.dtype, DataType::F32 | DataType::F64) {
                0.001
            } else {
                step
            });
            body["min"] = json!(p.min.unwrap_or(-1e9));
            body["max"] = json!(p.max.unwrap_or(1e9));
            return ("number", body);
        }
        if let Some(sc) = state_class {
            body["state_class"] = json!(sc);
        }
    }
    ("sensor", body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_imply_classes_only_where_clear() {
        assert_eq!(
            classes(Some("°C")),
            (Some("temperature"), Some("measurement"))
        );
        assert_eq!(
            classes(Some("kWh")),
            (Some("energy"), Some("total_increasing"))
        );
        assert_eq!(classes(Some("%")), (None, Some("measurement")));
        assert_eq!(classes(None), (None, None));
    }

    #[test]
    fn computed_points_are_announced_internal_ones_are_not_and_heartbeats_expire() {
        let yaml = "homeassistant: { discovery: true }\nmqtt: { url: mqtt://127.0.0.1 }\nbuses: { plc: { modbus_tcp: { host: 127.0.0.1 } } }\ndevices:\n  inv:\n    bus: plc\n    every: 10s\n    on_change: true\n    heartbeat: 5m\n    points:\n      w: { register: 0, type: i16, internal: true }\n      w_sf: { register: 1, type: i16, internal: true }\n      power: { expr: \"w * 10^w_sf\", unit: W }\n      running: { expr: \"power > 0\" }\n";
        let c = Config::from_text(std::path::Path::new("c.yaml"), yaml).unwrap();
        let configs = configs(&c, c.homeassistant.as_ref().unwrap());
        let names: Vec<&str> = configs
            .iter()
            .map(|(_, b)| b["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["power", "running"]);
        let (topic, power) = &configs[0];
        assert!(topic.starts_with("homeassistant/sensor/"), "{topic}");
        assert_eq!(power["device_class"], json!("power"));
        // Two heartbeats and a poll: 2 × 300 s + 10 s.
        assert_eq!(power["expire_after"], json!(610));
        assert!(configs[1].0.starts_with("homeassistant/binary_sensor/"));
    }
}
