//! The raw stage: what the YAML says, checked by serde for syntax and types only
//! (`deny_unknown_fields` everywhere). Nothing here has a default applied or a reference checked.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::bus::serial::Parity;
use crate::mapping::{DataType, Order};
use crate::store::WhenFull;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub gateway: RawGateway,
    pub mqtt: RawMqtt,
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub buses: BTreeMap<String, RawBus>,
    #[serde(default)]
    pub devices: BTreeMap<String, RawDevice>,
    #[serde(default)]
    pub queue: RawQueue,
    pub metrics: Option<RawMetrics>,
    pub homeassistant: Option<RawHomeAssistant>,
    pub web: Option<RawWeb>,
    pub sparkplug: Option<RawSparkplug>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSparkplug {
    /// Sparkplug group id.
    pub group_id: String,
    /// Edge node id (default: the gateway id).
    pub edge_node_id: Option<String>,
    /// Also publish fieldgate's own JSON topics (default true).
    pub json: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWeb {
    /// Address of the status page, e.g. 127.0.0.1:8080 (off unless given).
    pub listen: std::net::SocketAddr,
    /// HTTP basic auth: the password, in a file (any user name).
    pub password_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHomeAssistant {
    /// Publish retained discovery configs for every point.
    pub discovery: bool,
    /// Home Assistant's discovery prefix (default `homeassistant`).
    pub prefix: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    /// Address of the Prometheus endpoint, e.g. 127.0.0.1:9108.
    pub listen: std::net::SocketAddr,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQueue {
    pub max_messages: Option<u64>,
    /// Bytes, as a number or with a unit: `512MiB`, `1GB`.
    pub max_bytes: Option<NumberOrText>,
    #[serde(default, with = "humantime_serde")]
    pub max_age: Option<Duration>,
    pub when_full: Option<WhenFull>,
    /// Most messages per second the uplink takes from the queue (0: no limit).
    pub replay_rate: Option<f64>,
    /// Commit readings together at most this often (default 0: each poll at once). Fewer
    /// SD-card writes; a power cut loses up to this much.
    #[serde(default, with = "humantime_serde")]
    pub commit_interval: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum NumberOrText {
    Number(u64),
    Text(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGateway {
    pub id: Option<String>,
    pub state_dir: Option<PathBuf>,
    /// How often the retained `status/stats` message is published.
    #[serde(default, with = "humantime_serde")]
    pub status_interval: Option<Duration>,
    /// Log level (error, warn, info, debug, trace, or a tracing filter); RUST_LOG wins.
    pub log_level: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMqtt {
    pub url: String,
    pub client_id: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub password_file: Option<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    pub keep_alive: Option<Duration>,
    /// Most QoS 1/2 publishes awaiting their acknowledgement at once.
    pub inflight: Option<u16>,
    /// Most QoS 2 publishes in flight (mosquitto 2.0.11 stalls a publisher past 20).
    pub inflight_qos2: Option<u16>,
    pub tls: Option<RawTls>,
    /// `3.1.1` (default) or `5`.
    pub protocol: Option<RawProtocol>,
}

/// `protocol: 5`, `protocol: "5"`, `protocol: 3.1.1`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawProtocol {
    Number(u64),
    Float(f64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// PEM CA certificates to trust instead of the system store.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and key, for mutual TLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Accept any server certificate. For the lab only; logged loudly.
    pub insecure_skip_verify: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBus {
    pub modbus_tcp: Option<RawModbusTcp>,
    pub modbus_rtu: Option<RawModbusRtu>,
    pub modbus_rtu_over_tcp: Option<RawModbusTcp>,
    pub serial_line: Option<RawSerialLine>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSerialLine {
    pub port: String,
    pub baud: Option<u32>,
    pub parity: Option<Parity>,
    pub data_bits: Option<u8>,
    pub stop_bits: Option<u8>,
    /// Bytes that end a line (default "\r\n"; a lone "\n" is accepted too).
    pub terminator: Option<String>,
    /// Longest line accepted, in bytes (default 512).
    pub max_line: Option<usize>,
    /// How long a request waits for its answer line (default 1s).
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModbusRtu {
    pub port: String,
    pub baud: Option<u32>,
    pub parity: Option<Parity>,
    pub data_bits: Option<u8>,
    pub stop_bits: Option<u8>,
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Extra attempts after a timeout or a bad frame.
    pub retries: Option<u32>,
    /// Extra silence after t3.5 before each request (slow RS-485 transceivers).
    #[serde(default, with = "humantime_serde")]
    pub turnaround: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModbusTcp {
    pub host: String,
    pub port: Option<u16>,
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PayloadFormat {
    Json,
    Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishMode {
    Point,
    Device,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDevice {
    pub bus: String,
    pub unit: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    pub every: Option<Duration>,
    pub model: Option<String>,
    #[serde(default)]
    pub points: BTreeMap<String, RawPoint>,
    pub topic: Option<String>,
    pub payload: Option<PayloadFormat>,
    pub publish: Option<PublishMode>,
    pub qos: Option<u8>,
    pub retain: Option<bool>,
    /// Unused addresses a request may read over to join two points (default 0).
    pub max_gap: Option<u16>,
    /// Most registers per request, for devices that accept fewer than 125.
    pub max_registers: Option<u16>,
    /// Consecutive failed polls before the device is announced `offline` (default 3).
    pub offline_after: Option<u32>,
    /// Serial line devices: sent every `every`; the next line is the answer.
    pub request: Option<String>,
    /// Serial line devices: how lines are parsed.
    pub parse: Option<RawParseSpec>,
    /// Report by exception for every point: `true`, or `device` (a device message carries
    /// all points when any changed).
    pub on_change: Option<RawOnChange>,
    /// Default deadband of the numeric points: a number in engineering units or `"2%"`.
    pub deadband: Option<RawDeadband>,
    /// Publish unchanged values anyway after this much silence.
    #[serde(default, with = "humantime_serde")]
    pub heartbeat: Option<Duration>,
    /// MQTT 5: how long the broker keeps a reading of this device for subscribers to come.
    #[serde(default, with = "humantime_serde")]
    pub message_expiry: Option<Duration>,
}

/// `on_change: true | false | device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum RawOnChange {
    Flag(bool),
    Mode(OnChangeMode),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnChangeMode {
    Device,
}

/// `deadband: 0.5` or `deadband: "2%"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawDeadband {
    Number(f64),
    Text(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegisterKind {
    Holding,
    Input,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPoint {
    pub register: Option<u32>,
    pub kind: Option<RegisterKind>,
    pub coil: Option<u32>,
    pub discrete: Option<u32>,
    #[serde(rename = "type")]
    pub dtype: Option<DataType>,
    pub order: Option<Order>,
    pub bit: Option<u32>,
    pub length: Option<u32>,
    pub scale: Option<f64>,
    pub offset: Option<f64>,
    pub unit: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub every: Option<Duration>,
    pub topic: Option<String>,
    pub payload: Option<PayloadFormat>,
    pub qos: Option<u8>,
    pub retain: Option<bool>,
    /// Serial line devices: the parsed field this point takes (a name, a path or an index).
    pub field: Option<FieldName>,
    /// Accept commands on `{point topic}/set` (coils and holding registers).
    pub writable: Option<bool>,
    /// Limits of a commanded value, in engineering units (after scale and offset).
    pub min: Option<f64>,
    pub max: Option<f64>,
    /// A computed point: an expression over other points of the device.
    pub expr: Option<String>,
    /// Read (for computed points) but never published: a scale factor register, a raw word.
    pub internal: Option<bool>,
    /// Report by exception (overrides the device's `on_change`).
    pub on_change: Option<bool>,
    pub deadband: Option<RawDeadband>,
    #[serde(default, with = "humantime_serde")]
    pub heartbeat: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum FieldName {
    Index(u32),
    Name(String),
}

impl FieldName {
    pub(super) fn as_key(&self) -> String {
        match self {
            FieldName::Index(i) => i.to_string(),
            FieldName::Name(n) => n.clone(),
        }
    }
}

/// How a serial line device's lines are parsed: exactly one of these.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawParse {
    pub regex: Option<String>,
    pub split: Option<String>,
    pub nmea: Option<Vec<String>>,
    pub json: Option<bool>,
}

/// `parse: json` or `parse: { … }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawParseSpec {
    Name(String),
    Spec(RawParse),
}

/// A device model file: `mappings/<model>.yaml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    pub model: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub points: BTreeMap<String, RawPoint>,
    /// Serial line models: how lines are parsed, and the request that asks for one.
    pub parse: Option<RawParseSpec>,
    pub request: Option<String>,
}
