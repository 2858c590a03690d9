//! Sparkplug B (Eclipse Sparkplug 3.0) for the edge node: topic names, metric types and
//! aliases, and the payloads of the node's lifecycle — NBIRTH/NDEATH with `bdSeq`, DBIRTH/
//! DDEATH per device, DDATA from queued readings (historical ones marked), and the commands
//! a host sends (NCMD `Node Control/Rebirth`, DCMD writes). Pure: no I/O; the uplink decides
//! when each is sent (`uplink::sparkplug`).
//!
//! One fieldgate device is one Sparkplug device; each published point is one metric, typed
//! after the point (a scaled register is a Double: its value is the scaled one), with its unit
//! as the `engUnit` property and its scale as `scale` (the property names Ignition reads).
//! Every metric has an alias, unique in the node, fixed for the life of the configuration;
//! births carry names and aliases, DATA messages aliases only.

pub mod proto;

use std::collections::{BTreeMap, HashMap};

use prost::Message as _;

use crate::config::{Config, PublishMode};
use crate::mapping::{DataType, Point, Value};
use proto::{Metric, MetricValue, Payload, PropertySet, PropertyValue, PropertyValueValue};

/// The topic namespace of Sparkplug B.
pub const NAMESPACE: &str = "spBv1.0";

/// The node metric a host writes `true` to for a rebirth.
pub const REBIRTH: &str = "Node Control/Rebirth";

/// Sparkplug data types (sparkplug_b.proto, "Indexes of Data Types").
pub mod datatype {
    pub const INT16: u32 = 2;
    pub const INT32: u32 = 3;
    pub const INT64: u32 = 4;
    pub const UINT16: u32 = 6;
    pub const UINT32: u32 = 7;
    pub const UINT64: u32 = 8;
    pub const FLOAT: u32 = 9;
    pub const DOUBLE: u32 = 10;
    pub const BOOLEAN: u32 = 11;
    pub const STRING: u32 = 12;
}

/// The Sparkplug data type a point's readings have.
pub fn datatype_of(p: &Point) -> u32 {
    use datatype::*;
    if p.bit.is_some() {
        return BOOLEAN;
    }
    let scaled = p.scale.is_some() || p.offset.is_some();
    match p.dtype {
        DataType::Bool => BOOLEAN,
        DataType::String => STRING,
        _ if scaled => DOUBLE,
        DataType::U16 => UINT16,
        DataType::I16 => INT16,
        DataType::U32 => UINT32,
        DataType::I32 => INT32,
        DataType::U64 => UINT64,
        DataType::I64 => INT64,
        DataType::F32 => FLOAT,
        DataType::F64 => DOUBLE,
    }
}

/// A reading's value as a metric value of `datatype`; None for null (or a value that does not
/// fit the type: sent as null rather than as something else).
pub fn metric_value(v: &Value, datatype: u32) -> Option<MetricValue> {
    use datatype::*;
    let int = match v {
        Value::Int(i) => Some(*i as i128),
        Value::UInt(u) => Some(*u as i128),
        Value::Float(f) if f.fract() == 0.0 && f.is_finite() => Some(*f as i128),
        _ => None,
    };
    let float = match v {
        Value::Int(i) => Some(*i as f64),
        Value::UInt(u) => Some(*u as f64),
        Value::Float(f) => Some(*f),
        _ => None,
    };
    Some(match datatype {
        BOOLEAN => match v {
            Value::Bool(b) => MetricValue::BooleanValue(*b),
            _ => MetricValue::BooleanValue(int? != 0),
        },
        STRING => match v {
            Value::Text(t) => MetricValue::StringValue(t.clone()),
            Value::Null => return None,
            other => MetricValue::StringValue(other.to_string()),
        },
        INT16 | INT32 => MetricValue::IntValue(i32::try_from(int?).ok()? as u32),
        UINT16 | UINT32 => MetricValue::IntValue(u32::try_from(int?).ok()?),
        INT64 => MetricValue::LongValue(i64::try_from(int?).ok()? as u64),
        UINT64 => MetricValue::LongValue(u64::try_from(int?).ok()?),
        FLOAT => MetricValue::FloatValue(float? as f32),
        _ => MetricValue::DoubleValue(float?),
    })
}

/// A metric's value as JSON, for the command path (`{"value": …}` of a `…/set`).
pub fn json_of(v: &MetricValue, datatype: Option<u32>) -> serde_json::Value {
    use datatype::*;
    match (v, datatype) {
        (MetricValue::IntValue(i), Some(INT16 | INT32)) => serde_json::json!(*i as i32),
        (MetricValue::IntValue(i), _) => serde_json::json!(i),
        (MetricValue::LongValue(l), Some(INT64)) => serde_json::json!(*l as i64),
        (MetricValue::LongValue(l), _) => serde_json::json!(l),
        (MetricValue::FloatValue(f), _) => serde_json::json!(f),
        (MetricValue::DoubleValue(d), _) => serde_json::json!(d),
        (MetricValue::BooleanValue(b), _) => serde_json::json!(b),
        (MetricValue::StringValue(s), _) => serde_json::json!(s),
    }
}

/// One metric of a device.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricSpec {
    pub device: String,
    /// Index of the point in its device.
    pub point: usize,
    pub name: String,
    pub alias: u64,
    pub datatype: u32,
    pub unit: Option<String>,
    pub scale: Option<f64>,
    pub writable: bool,
}

/// Where a queued reading's topic comes from: a point, or a whole device (`publish: device`).
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    Point(u64),
    Device(String),
}

/// What the edge node is made of, fixed for the life of a configuration: names, topics,
/// metrics and aliases. Aliases 0 and 1 are the node's own metrics.
#[derive(Debug, Clone)]
pub struct EdgeNode {
    pub group: String,
    pub edge: String,
    /// Devices in config order, each with its metrics.
    pub devices: Vec<(String, Vec<MetricSpec>)>,
    by_alias: HashMap<u64, MetricSpec>,
    /// Device → point name → alias.
    by_name: HashMap<String, HashMap<String, u64>>,
    /// A reading's JSON topic → where it belongs.
    topics: HashMap<String, Source>,
}

/// Alias of the node's `bdSeq` metric.
const BDSEQ_ALIAS: u64 = 0;
/// Alias of `Node Control/Rebirth`.
const REBIRTH_ALIAS: u64 = 1;

impl EdgeNode {
    pub fn new(config: &Config, group: &str, edge: &str) -> EdgeNode {
        let mut node = EdgeNode {
            group: group.to_string(),
            edge: edge.to_string(),
            devices: Vec::new(),
            by_alias: HashMap::new(),
            by_name: HashMap::new(),
            topics: HashMap::new(),
        };
        let mut next = REBIRTH_ALIAS + 1;
        for d in &config.devices {
            let mut metrics = Vec::new();
            for (i, p) in d.points.iter().enumerate().filter(|(_, p)| !p.internal) {
                let m = MetricSpec {
                    device: d.name.clone(),
                    point: i,
                    name: p.name.clone(),
                    alias: next,
                    datatype: datatype_of(p),
                    unit: p.unit.clone(),
                    scale: p.scale,
                    writable: p.writable,
                };
                next += 1;
                node.by_alias.insert(m.alias, m.clone());
                node.by_name
                    .entry(d.name.clone())
                    .or_default()
                    .insert(p.name.clone(), m.alias);
                if d.publish == PublishMode::Point {
                    node.topics
                        .insert(p.delivery.topic.clone(), Source::Point(m.alias));
                }
                metrics.push(m);
            }
            if d.publish == PublishMode::Device {
                node.topics.insert(
                    d.device_delivery.topic.clone(),
                    Source::Device(d.name.clone()),
                );
            }
            node.devices.push((d.name.clone(), metrics));
        }
        node
    }

    pub fn topic(&self, kind: &str) -> String {
        format!("{NAMESPACE}/{}/{kind}/{}", self.group, self.edge)
    }

    pub fn device_topic(&self, kind: &str, device: &str) -> String {
        format!("{NAMESPACE}/{}/{kind}/{}/{device}", self.group, self.edge)
    }

    /// The metric of a device's point by name.
    pub fn metric(&self, device: &str, point: &str) -> Option<&MetricSpec> {
        self.by_name
            .get(device)?
            .get(point)
            .and_then(|a| self.by_alias.get(a))
    }

    pub fn by_alias(&self, alias: u64) -> Option<&MetricSpec> {
        self.by_alias.get(&alias)
    }

    /// Where a queued reading on `topic` belongs; None when it is not a device reading.
    pub fn source(&self, topic: &str) -> Option<&Source> {
        self.topics.get(topic)
    }

    /// NDEATH: `bdSeq` only, no `seq` (the broker sends it as our Will).
    pub fn ndeath(&self, bd_seq: u8, now_ms: i64) -> Vec<u8> {
        Payload {
            timestamp: Some(now_ms as u64),
            metrics: vec![bd_seq_metric(bd_seq, now_ms, false)],
            seq: None,
        }
        .encode_to_vec()
    }

    /// NBIRTH: `bdSeq` and `Node Control/Rebirth`, `seq` 0.
    pub fn nbirth(&self, bd_seq: u8, now_ms: i64) -> Vec<u8> {
        Payload {
            timestamp: Some(now_ms as u64),
            metrics: vec![
                bd_seq_metric(bd_seq, now_ms, true),
                Metric {
                    name: Some(REBIRTH.into()),
                    alias: Some(REBIRTH_ALIAS),
                    timestamp: Some(now_ms as u64),
                    datatype: Some(datatype::BOOLEAN),
                    value: Some(MetricValue::BooleanValue(false)),
                    ..Default::default()
                },
            ],
            seq: Some(0),
        }
        .encode_to_vec()
    }

    /// DBIRTH of `device`: every metric with its name, alias, type, properties and current
    /// value (null when none is known yet).
    pub fn dbirth(
        &self,
        device: &str,
        values: &BTreeMap<String, (Value, i64)>,
        seq: u8,
        now_ms: i64,
    ) -> Vec<u8> {
        let metrics = self
            .devices
            .iter()
            .find(|(d, _)| d == device)
            .map(|(_, m)| m.as_slice())
            .unwrap_or_default()
            .iter()
            .map(|m| {
                let (value, ts) = values
                    .get(&m.name)
                    .map_or((None, now_ms), |(v, ts)| (metric_value(v, m.datatype), *ts));
                let mut props = PropertySet::default();
                if let Some(u) = &m.unit {
                    props.keys.push("engUnit".into());
                    props.values.push(PropertyValue {
                        r#type: Some(datatype::STRING),
                        is_null: None,
                        value: Some(PropertyValueValue::StringValue(u.clone())),
                    });
                }
                if let Some(s) = m.scale {
                    props.keys.push("scale".into());
                    props.values.push(PropertyValue {
                        r#type: Some(datatype::DOUBLE),
                        is_null: None,
                        value: Some(PropertyValueValue::DoubleValue(s)),
                    });
                }
                Metric {
                    name: Some(m.name.clone()),
                    alias: Some(m.alias),
                    timestamp: Some(ts as u64),
                    datatype: Some(m.datatype),
                    is_null: value.is_none().then_some(true),
                    properties: (!props.keys.is_empty()).then_some(props),
                    value,
                    ..Default::default()
                }
            })
            .collect();
        Payload {
            timestamp: Some(now_ms as u64),
            metrics,
            seq: Some(seq as u64),
        }
        .encode_to_vec()
    }

    /// DDEATH of a device: no metrics.
    pub fn ddeath(&self, seq: u8, now_ms: i64) -> Vec<u8> {
        Payload {
            timestamp: Some(now_ms as u64),
            metrics: Vec::new(),
            seq: Some(seq as u64),
        }
        .encode_to_vec()
    }

    /// The DDATA of one queued reading (`values`: point name → value, all read at `ts_ms`):
    /// its device and payload. Metrics by alias only; `historical` marks readings taken while
    /// the uplink was down. None when nothing in it is a metric of this node.
    pub fn ddata(
        &self,
        source: &Source,
        values: &[(&str, &Value)],
        ts_ms: i64,
        historical: bool,
        seq: u8,
        now_ms: i64,
    ) -> Option<(String, Vec<u8>)> {
        let device = match source {
            Source::Point(alias) => self.by_alias.get(alias)?.device.clone(),
            Source::Device(d) => d.clone(),
        };
        let metrics: Vec<Metric> = values
            .iter()
            .filter_map(|(name, v)| {
                let m = match source {
                    Source::Point(alias) => self.by_alias.get(alias)?,
                    Source::Device(d) => self.metric(d, name)?,
                };
                let value = metric_value(v, m.datatype);
                Some(Metric {
                    alias: Some(m.alias),
                    timestamp: Some(ts_ms as u64),
                    datatype: Some(m.datatype),
                    is_historical: historical.then_some(true),
                    is_null: value.is_none().then_some(true),
                    value,
                    ..Default::default()
                })
            })
            .collect();
        if metrics.is_empty() {
            return None;
        }
        let payload = Payload {
            timestamp: Some(now_ms as u64),
            metrics,
            seq: Some(seq as u64),
        };
        Some((device, payload.encode_to_vec()))
    }
}

fn bd_seq_metric(bd_seq: u8, now_ms: i64, with_alias: bool) -> Metric {
    Metric {
        name: Some("bdSeq".into()),
        alias: with_alias.then_some(BDSEQ_ALIAS),
        timestamp: Some(now_ms as u64),
        datatype: Some(datatype::INT64),
        value: Some(MetricValue::LongValue(bd_seq as u64)),
        ..Default::default()
    }
}

/// What a host asked of the node or of a device.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Rebirth,
    /// Write `value` (as JSON, for the checked command path) to a device's point.
    Write {
        device: String,
        point: usize,
        value: serde_json::Value,
    },
    /// Something the node does not do, in words (logged).
    Ignored(String),
}

impl EdgeNode {
    /// The requests in an NCMD (`device` None) or a DCMD payload.
    pub fn requests(&self, device: Option<&str>, payload: &[u8]) -> Vec<Request> {
        let p = match Payload::decode(payload) {
            Ok(p) => p,
            Err(e) => return vec![Request::Ignored(format!("not a Sparkplug B payload: {e}"))],
        };
        p.metrics
            .iter()
            .map(|m| match device {
                None => {
                    let rebirth =
                        m.name.as_deref() == Some(REBIRTH) || m.alias == Some(REBIRTH_ALIAS);
                    match (rebirth, &m.value) {
                        (true, Some(MetricValue::BooleanValue(true))) => Request::Rebirth,
                        _ => Request::Ignored(format!(
                            "node command {:?} is not supported",
                            m.name.as_deref().unwrap_or("(alias)")
                        )),
                    }
                }
                Some(d) => {
                    let spec = match (&m.name, m.alias) {
                        (Some(n), _) => self.metric(d, n),
                        (None, Some(a)) => self.by_alias(a).filter(|s| s.device == d),
                        _ => None,
                    };
                    match (spec, &m.value) {
                        (Some(s), Some(v)) => Request::Write {
                            device: d.to_string(),
                            point: s.point,
                            value: json_of(v, m.datatype.or(Some(s.datatype))),
                        },
                        (None, _) => Request::Ignored(format!(
                            "device {d} has no metric {:?}",
                            m.name.clone().or(m.alias.map(|a| format!("alias {a}")))
                        )),
                        (Some(s), None) => {
                            Request::Ignored(format!("a write to {} without a value", s.name))
                        }
                    }
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
