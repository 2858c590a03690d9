//! Configuration: the only place that reads YAML.
//!
//! Loading happens in two stages, as ripgrep does with its arguments. The raw stage
//! ([`RawConfig`], [`RawModel`]) is plain serde with `deny_unknown_fields`: it checks syntax and
//! types. The resolved stage ([`Config`]) settles every default, loads the device models a device
//! names, checks every reference and range, and plans the Modbus reads. Every error found along
//! the way is collected, not just the first, and each names `file:line:column: field.path`.
//!
//! `${VAR}` (or `${VAR:-default}`) expands from the environment anywhere in a value; `$${` is a
//! literal `${`. Comments are left alone.

mod source_map;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::bus::modbus_rtu::{Endpoint, Parity, SerialSettings};
use crate::mapping::{DataType, Delivery, Order, Point, Source, Table};
use crate::plan::{ReadRequest, plan};
use crate::store::{Limits, WhenFull};
pub use source_map::{Loc, SourceMap};

/// Exit code for a bad configuration (sysexits.h EX_CONFIG).
pub const EX_CONFIG: i32 = 78;

// ---------------------------------------------------------------------------------------------
// Errors

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnostic {
    pub file: String,
    pub loc: Loc,
    /// Dotted field path, e.g. `devices.boiler.points.pump.coil`.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = if self.path.is_empty() {
            "(top)"
        } else {
            &self.path
        };
        write!(
            f,
            "{}:{}:{}: {}: {}",
            self.file, self.loc.line, self.loc.col, path, self.message
        )
    }
}

/// Every problem found in a configuration and the models it uses.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<Diagnostic>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Raw stage: what the YAML says

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
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum FieldName {
    Index(u32),
    Name(String),
}

impl FieldName {
    fn as_key(&self) -> String {
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

// ---------------------------------------------------------------------------------------------
// Resolved stage: what the gateway runs

#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub gateway: Gateway,
    pub mqtt: Mqtt,
    pub queue: Queue,
    /// Where the Prometheus endpoint listens, if enabled.
    pub metrics: Option<std::net::SocketAddr>,
    /// Home Assistant discovery, if enabled.
    pub homeassistant: Option<crate::discovery::Discovery>,
    pub buses: Vec<Bus>,
    pub devices: Vec<Device>,
}

#[derive(Debug, Clone)]
pub struct Queue {
    pub limits: Limits,
    /// Messages per second taken from the queue; None: as fast as the broker acknowledges.
    pub replay_rate: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct Gateway {
    pub id: String,
    pub state_dir: PathBuf,
    pub status_interval: Duration,
    pub log_level: String,
}

impl Gateway {
    /// The retained `online`/`offline` topic of the gateway itself.
    pub fn status_topic(&self) -> String {
        format!("fieldgate/{}/status", self.id)
    }
}

/// A secret that never prints.
#[derive(Clone, PartialEq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

#[derive(Debug, Clone)]
pub struct Mqtt {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub keep_alive: Duration,
    pub inflight: u16,
    pub inflight_qos2: u16,
    /// TLS (mqtts://), ready to use.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// `tls.insecure_skip_verify` (logged loudly at every connect).
    pub insecure_skip_verify: bool,
}

#[derive(Debug, Clone)]
pub struct Bus {
    pub name: String,
    pub transport: Transport,
}

#[derive(Debug, Clone)]
pub enum Transport {
    ModbusTcp {
        host: String,
        port: u16,
        timeout: Duration,
    },
    /// Lines of text on a serial port.
    SerialLine {
        settings: SerialSettings,
        terminator: Vec<u8>,
        max_line: usize,
        timeout: Duration,
    },
    /// RTU framing on a serial port or through a TCP converter.
    ModbusRtu {
        endpoint: Endpoint,
        timeout: Duration,
        retries: u32,
        turnaround: Duration,
    },
}

impl Transport {
    /// The longest one request can take: every attempt timing out, plus the drain after each.
    pub fn worst_request_time(&self) -> Duration {
        match self {
            Transport::ModbusTcp { timeout, .. } => *timeout * 2,
            Transport::SerialLine { timeout, .. } => *timeout * 2,
            Transport::ModbusRtu {
                timeout, retries, ..
            } => *timeout * 3 * (retries + 1),
        }
    }

    /// Highest unit id the transport addresses (RTU: 1..=247 per the serial line spec).
    fn unit_range(&self) -> std::ops::RangeInclusive<u32> {
        match self {
            Transport::ModbusTcp { .. } | Transport::SerialLine { .. } => 0..=255,
            Transport::ModbusRtu { .. } => 1..=247,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Device {
    pub name: String,
    pub bus: String,
    pub unit: u8,
    pub points: Vec<Point>,
    /// Points grouped by interval, each with its read plan.
    pub groups: Vec<PollGroup>,
    pub publish: PublishMode,
    pub payload: HashMap<String, PayloadFormat>,
    /// Topic, QoS and retain of the one-message-per-poll form (`publish: device`).
    pub device_delivery: Delivery,
    /// Retained `online`/`offline` topic of this device.
    pub availability_topic: String,
    pub offline_after: u32,
    /// Serial line devices: how their lines are read.
    pub line: Option<LineSpec>,
}

/// How a serial line device is read.
#[derive(Debug, Clone)]
pub struct LineSpec {
    pub parser: crate::parse::Parser,
    /// Sent every `every`; the next line is the answer. None: the device streams lines.
    pub request: Option<Vec<u8>>,
    /// Request interval; for a streaming device, at most one message per point per `every`
    /// (the latest value wins). None on a streaming device: every line is published.
    pub every: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct PollGroup {
    pub every: Duration,
    pub requests: Vec<ReadRequest>,
}

/// A device model file checked on its own (`fieldgate check mappings/sdm120.yaml`).
#[derive(Debug, Clone)]
pub struct ModelSummary {
    pub path: PathBuf,
    pub name: String,
    pub description: Option<String>,
    pub points: Vec<Point>,
    pub line: bool,
}

impl ModelSummary {
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let mut s = format!(
            "{}: ok: model {}, {} point{}{}\n",
            self.path.display(),
            self.name,
            self.points.len(),
            plural(self.points.len()),
            if self.line { " (serial line)" } else { "" }
        );
        if let Some(d) = &self.description {
            let _ = writeln!(s, "{}", d.trim());
        }
        for p in &self.points {
            let what = match &p.field {
                Some(f) => format!("field {f}"),
                None => format!("{} {}", p.source.table.name(), p.source.address),
            };
            let _ = writeln!(
                s,
                "  {:<24} {:<28} {:?}{}",
                p.name,
                what,
                p.dtype,
                p.unit
                    .as_deref()
                    .map(|u| format!(" [{u}]"))
                    .unwrap_or_default()
            );
        }
        s
    }
}

/// Whether a YAML text is a model file (it has `model:` at the top, and no `mqtt:`).
pub fn is_model_text(text: &str) -> bool {
    let top = |k: &str| text.lines().any(|l| l.starts_with(&format!("{k}:")));
    top("model") && !top("mqtt")
}

/// Validates a model file on its own.
pub fn check_model(path: &Path) -> Result<ModelSummary, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![Diagnostic {
            file: path.display().to_string(),
            loc: Loc { line: 1, col: 1 },
            path: String::new(),
            message: format!("cannot read the file: {e}"),
        }])
    })?;
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let env = |k: &str| std::env::var(k).ok();
    let mut r = Resolver {
        errors: Vec::new(),
        models: HashMap::new(),
        env: &env,
    };
    let result = r.model_from_text(path, &text, &name);
    match result {
        Some((m, description)) if r.errors.is_empty() => Ok(ModelSummary {
            path: path.to_path_buf(),
            name,
            description,
            line: m.parser.is_some(),
            points: m
                .points
                .into_iter()
                .map(|s| Point {
                    name: s.name,
                    source: s.source,
                    dtype: s.dtype,
                    order: s.order,
                    bit: s.bit,
                    length: s.length,
                    scale: s.scale,
                    offset: s.offset,
                    unit: s.unit,
                    every: s.every.unwrap_or(Duration::from_secs(1)),
                    delivery: Delivery {
                        topic: String::new(),
                        qos: s.qos.unwrap_or(1),
                        retain: s.retain.unwrap_or(false),
                    },
                    field: s.field,
                    writable: s.writable,
                    min: s.min,
                    max: s.max,
                })
                .collect(),
        }),
        _ => Err(ConfigErrors(r.errors)),
    }
}

impl Config {
    /// Loads and validates the config file at `path` and every model it uses.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![Diagnostic {
                file: path.display().to_string(),
                loc: Loc { line: 1, col: 1 },
                path: String::new(),
                message: format!("cannot read the file: {e}"),
            }])
        })?;
        Config::from_text(path, &text)
    }

    /// Validates `text` as if read from `path` (models are looked up relative to it).
    pub fn from_text(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
        Config::from_text_with_env(path, text, &|k| std::env::var(k).ok())
    }

    pub fn from_text_with_env(
        path: &Path,
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        let mut errors = Vec::new();
        let file = path.display().to_string();
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let Some((raw, map)) = parse::<RawConfig>(&file, text, env, &mut errors) else {
            return Err(ConfigErrors(errors));
        };
        let mut r = Resolver {
            errors,
            models: HashMap::new(),
            env,
        };
        let ctx = Ctx {
            file: &file,
            map: &map,
        };
        let config = r.resolve(&ctx, path, &base, raw);
        if r.errors.is_empty() {
            Ok(config)
        } else {
            r.errors.sort_by(|a, b| {
                (&a.file, a.loc.line, a.loc.col).cmp(&(&b.file, b.loc.line, b.loc.col))
            });
            r.errors.dedup();
            Err(ConfigErrors(r.errors))
        }
    }

    /// Modbus read requests one full poll cycle makes (every group of every device once).
    pub fn requests_per_cycle(&self) -> usize {
        self.devices
            .iter()
            .flat_map(|d| &d.groups)
            .map(|g| g.requests.len())
            .sum()
    }

    /// What `fieldgate check` prints for a valid config.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let points: usize = self.devices.iter().map(|d| d.points.len()).sum();
        let mut s = format!(
            "{}: ok: {} bus{}, {} device{}, {} point{}, {} Modbus request{} per poll cycle\n",
            self.path.display(),
            self.buses.len(),
            if self.buses.len() == 1 { "" } else { "es" },
            self.devices.len(),
            plural(self.devices.len()),
            points,
            plural(points),
            self.requests_per_cycle(),
            plural(self.requests_per_cycle()),
        );
        let _ = writeln!(
            s,
            "gateway {} → {}:{} as {}; queue in {}",
            self.gateway.id,
            self.mqtt.host,
            self.mqtt.port,
            self.mqtt.client_id,
            self.gateway.state_dir.join("queue.db").display()
        );
        for d in &self.devices {
            if let Some(line) = &d.line {
                let how = match (&line.request, line.every) {
                    (Some(r), every) => format!(
                        "asks {:?} every {}",
                        String::from_utf8_lossy(r),
                        humantime::format_duration(every.unwrap_or(Duration::from_secs(1)))
                    ),
                    (None, Some(every)) => format!(
                        "streams; latest value per point every {}",
                        humantime::format_duration(every)
                    ),
                    (None, None) => "streams; every line published".to_string(),
                };
                let fields: Vec<String> = d
                    .points
                    .iter()
                    .map(|p| format!("{} ← {}", p.name, p.field.as_deref().unwrap_or("?")))
                    .collect();
                let _ = writeln!(s, "device {} on serial line {}: {how}", d.name, d.bus);
                let _ = writeln!(s, "  {}", fields.join(", "));
                continue;
            }
            let _ = writeln!(s, "device {} on bus {}, unit {}:", d.name, d.bus, d.unit);
            for g in &d.groups {
                for r in &g.requests {
                    let names: Vec<&str> = r
                        .points
                        .iter()
                        .map(|&i| d.points[i].name.as_str())
                        .collect();
                    let _ = writeln!(
                        s,
                        "  every {:>6}  read {} {}..{} ({} {})  {}",
                        humantime::format_duration(g.every).to_string(),
                        r.table.name(),
                        r.start,
                        r.end(),
                        r.count,
                        if r.table.is_bits() {
                            "bits"
                        } else {
                            "registers"
                        },
                        names.join(", ")
                    );
                }
            }
        }
        s
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

// ---------------------------------------------------------------------------------------------
// Parsing with positions

struct Ctx<'a> {
    file: &'a str,
    map: &'a SourceMap,
}

impl Ctx<'_> {
    fn diag(&self, path: &str, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            file: self.file.to_string(),
            loc: self.map.locate(path),
            path: path.to_string(),
            message: message.into(),
        }
    }
}

/// Expands the environment, indexes positions and deserializes `text` as `T`.
fn parse<T: serde::de::DeserializeOwned>(
    file: &str,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
    errors: &mut Vec<Diagnostic>,
) -> Option<(T, SourceMap)> {
    let expanded = match expand_env(text, env) {
        Ok(t) => t,
        Err(missing) => {
            // Index the unexpanded text to name the fields whose variables are missing.
            for (loc, var) in missing {
                errors.push(Diagnostic {
                    file: file.to_string(),
                    loc,
                    path: SourceMap::build(text)
                        .ok()
                        .and_then(|m| m.path_at(loc))
                        .unwrap_or_default(),
                    message: format!("environment variable {var} is not set (write ${{{var}:-default}} for a default)"),
                });
            }
            return None;
        }
    };
    let map = match SourceMap::build(&expanded) {
        Ok(m) => m,
        Err((loc, message)) => {
            errors.push(Diagnostic {
                file: file.to_string(),
                loc,
                path: String::new(),
                message: format!("YAML syntax: {message}"),
            });
            return None;
        }
    };
    for (path, loc) in &map.duplicates {
        errors.push(Diagnostic {
            file: file.to_string(),
            loc: *loc,
            path: path.clone(),
            message: "duplicate key: this name is already defined above in the same mapping".into(),
        });
    }
    match serde_yaml::from_str::<T>(&expanded) {
        Ok(v) if errors.is_empty() => Some((v, map)),
        Ok(_) => None,
        Err(e) => {
            errors.push(serde_diagnostic(file, &map, &e));
            None
        }
    }
}

/// Turns a serde_yaml error into a diagnostic, keeping its path and position.
fn serde_diagnostic(file: &str, map: &SourceMap, e: &serde_yaml::Error) -> Diagnostic {
    let mut text = e.to_string();
    if let Some(i) = text.rfind(" at line ") {
        text.truncate(i);
    }
    // serde_yaml writes "path.to.field: message"; a message may itself hold ": ".
    let (path, message) = match text.split_once(": ") {
        Some((p, m)) if !p.contains(' ') => (p.to_string(), m.to_string()),
        _ => (String::new(), text.clone()),
    };
    let path = if path == "." { String::new() } else { path };
    // For an unknown field, point at the offending key itself.
    let key_path = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split('`').next())
        .map(|k| {
            if path.is_empty() {
                k.to_string()
            } else {
                format!("{path}.{k}")
            }
        });
    let loc = match (&key_path, e.location()) {
        (Some(k), _) if map.has(k) => map.locate_key(k),
        (_, Some(l)) => Loc {
            line: l.line(),
            col: l.column(),
        },
        _ => map.locate(&path),
    };
    Diagnostic {
        file: file.to_string(),
        loc,
        path: key_path.unwrap_or(path),
        message,
    }
}

/// Expands `${VAR}` and `${VAR:-default}` outside comments. Line numbers are preserved; a value
/// that YAML would misread where it stands unquoted (`: `, ` #`, a leading `*` …) is quoted.
pub fn expand_env(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, Vec<(Loc, String)>> {
    let mut out = String::with_capacity(text.len());
    let mut missing = Vec::new();
    for (lineno, line) in text.split_inclusive('\n').enumerate() {
        let mut quote: Option<char> = None;
        let mut prev_space = true;
        let mut i = 0;
        let bytes = line.as_bytes();
        while i < line.len() {
            let c = line[i..].chars().next().expect("in bounds");
            if quote.is_none() && c == '#' && prev_space {
                out.push_str(&line[i..]);
                break;
            }
            if line[i..].starts_with("$${") {
                out.push_str("${");
                i += 3;
                prev_space = false;
                continue;
            }
            if line[i..].starts_with("${")
                && let Some(end) = line[i + 2..].find('}')
            {
                let inner = &line[i + 2..i + 2 + end];
                let (name, default) = match inner.split_once(":-") {
                    Some((n, d)) => (n, Some(d)),
                    None => (inner, None),
                };
                match env(name).or_else(|| default.map(str::to_string)) {
                    Some(v) => {
                        let whole_scalar = quote.is_none()
                            && line[..i].trim_end().ends_with(':')
                            && line[i + 3 + end..].trim().is_empty();
                        out.push_str(&quote_for(&v, quote, whole_scalar));
                    }
                    None => missing.push((
                        Loc {
                            line: lineno + 1,
                            col: line[..i].chars().count() + 1,
                        },
                        name.to_string(),
                    )),
                }
                i += 3 + end;
                prev_space = false;
                continue;
            }
            match (quote, c) {
                (None, '"') | (None, '\'')
                    if prev_space
                        || i == 0
                        || matches!(bytes[i - 1], b'[' | b'{' | b',' | b':') =>
                {
                    quote = Some(c)
                }
                (Some('"'), '\\') => {
                    // Keep the escaped character with its backslash.
                    out.push(c);
                    i += 1;
                    if let Some(n) = line[i..].chars().next() {
                        out.push(n);
                        i += n.len_utf8();
                    }
                    continue;
                }
                (Some(q), c) if q == c => quote = None,
                _ => {}
            }
            prev_space = c == ' ' || c == '\t';
            out.push(c);
            i += c.len_utf8();
        }
    }
    if missing.is_empty() {
        Ok(out)
    } else {
        Err(missing)
    }
}

fn quote_for(v: &str, quote: Option<char>, whole_scalar: bool) -> String {
    match quote {
        Some('"') => v
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
            .replace('\t', "\\t"),
        Some('\'') => v.replace('\'', "''").replace('\n', " "),
        _ => {
            let plain_safe = !v.is_empty()
                && !v.contains(": ")
                && !v.contains(" #")
                && !v.contains('\n')
                && !v.ends_with(':')
                && !v.starts_with(|c: char| "*&!|>%@`'\"{[,?#-".contains(c) || c.is_whitespace())
                && !v.ends_with(char::is_whitespace);
            if plain_safe || !whole_scalar {
                v.to_string()
            } else {
                format!("\"{}\"", quote_for(v, Some('"'), false))
            }
        }
    }
}

impl SourceMap {
    /// The deepest recorded path whose value starts on `loc.line` (for env errors).
    fn path_at(&self, loc: Loc) -> Option<String> {
        self.paths_on_line(loc.line)
    }
}

// ---------------------------------------------------------------------------------------------
// Resolution

struct Resolver<'e> {
    errors: Vec<Diagnostic>,
    /// Model name → validated points (or None if the model file had errors).
    models: HashMap<String, Option<ModelDef>>,
    env: &'e dyn Fn(&str) -> Option<String>,
}

/// Builds the parser of `parse: …`; errors name `path`.
fn build_parser(
    ctx: &Ctx,
    errors: &mut Vec<Diagnostic>,
    path: &str,
    spec: &RawParseSpec,
) -> Option<crate::parse::Parser> {
    use crate::parse::{NMEA_SENTENCES, Parser};
    let spec = match spec {
        RawParseSpec::Name(n) if n == "json" => return Some(Parser::Json),
        RawParseSpec::Name(n) => {
            errors.push(ctx.diag(path, format!("unknown parser `{n}`: write `parse: json` or `parse: {{ regex: … }}`, `{{ split: \",\" }}`, `{{ nmea: [GGA, RMC] }}`")));
            return None;
        }
        RawParseSpec::Spec(s) => s,
    };
    let given = [
        spec.regex.is_some(),
        spec.split.is_some(),
        spec.nmea.is_some(),
        spec.json.is_some(),
    ];
    if given.iter().filter(|g| **g).count() != 1 {
        errors.push(ctx.diag(path, "give exactly one of `regex`, `split`, `nmea`, `json`"));
        return None;
    }
    if let Some(re) = &spec.regex {
        return match Parser::regex(re) {
            Ok(p) => Some(p),
            Err(e) => {
                errors.push(ctx.diag(&format!("{path}.regex"), format!("not a valid regex: {e}")));
                None
            }
        };
    }
    if let Some(sep) = &spec.split {
        if sep.is_empty() {
            errors.push(ctx.diag(&format!("{path}.split"), "the separator cannot be empty"));
            return None;
        }
        return Some(Parser::Split(sep.clone()));
    }
    if let Some(sentences) = &spec.nmea {
        let mut ok = !sentences.is_empty();
        for (i, s) in sentences.iter().enumerate() {
            if !NMEA_SENTENCES.iter().any(|(k, _)| k == s) {
                errors.push(ctx.diag(
                    &format!("{path}.nmea[{i}]"),
                    format!("sentence `{s}` is not decoded (decoded: GGA, RMC)"),
                ));
                ok = false;
            }
        }
        if sentences.is_empty() {
            errors.push(ctx.diag(
                &format!("{path}.nmea"),
                "name the sentences to decode, e.g. [GGA, RMC]",
            ));
        }
        return ok.then(|| Parser::Nmea(sentences.clone()));
    }
    if spec.json == Some(false) {
        errors.push(ctx.diag(
            &format!("{path}.json"),
            "`json: false` parses nothing: remove it or write `json: true`",
        ));
        return None;
    }
    Some(Parser::Json)
}

/// Checks and fills in the settings of a serial port.
#[allow(clippy::too_many_arguments)] // one per YAML key, all optional
fn serial_settings(
    ctx: &Ctx,
    errors: &mut Vec<Diagnostic>,
    at: &str,
    port: &str,
    baud: Option<u32>,
    parity: Option<Parity>,
    data_bits: Option<u8>,
    stop_bits: Option<u8>,
) -> SerialSettings {
    let baud = baud.unwrap_or(9600);
    if !(300..=4_000_000).contains(&baud) {
        errors.push(ctx.diag(
            &format!("{at}.baud"),
            format!("{baud} baud is not a serial speed"),
        ));
    }
    let data_bits = data_bits.unwrap_or(8);
    if !(5..=8).contains(&data_bits) {
        errors.push(ctx.diag(&format!("{at}.data_bits"), "must be 5, 6, 7 or 8"));
    }
    let stop_bits = stop_bits.unwrap_or(1);
    if !(1..=2).contains(&stop_bits) {
        errors.push(ctx.diag(&format!("{at}.stop_bits"), "must be 1 or 2"));
    }
    SerialSettings {
        port: port.to_string(),
        baud,
        parity: parity.unwrap_or(Parity::None),
        data_bits,
        stop_bits,
    }
}

/// What resolving a device needs from the rest of the config.
#[derive(Clone, Copy)]
struct DeviceEnv<'a> {
    gateway: &'a Gateway,
    /// Every bus named in the file, valid or not (so a device is not told its bus is unknown
    /// when the bus only has an error of its own).
    buses: &'a BTreeMap<String, RawBus>,
    resolved: &'a [Bus],
    folders: &'a [PathBuf],
}

/// A point as validated from YAML, before a device's defaults are applied.
#[derive(Debug, Clone)]
struct PointSpec {
    name: String,
    source: Source,
    dtype: DataType,
    order: Order,
    bit: Option<u8>,
    length: u16,
    scale: Option<f64>,
    offset: Option<f64>,
    unit: Option<String>,
    every: Option<Duration>,
    topic: Option<String>,
    payload: Option<PayloadFormat>,
    qos: Option<u8>,
    retain: Option<bool>,
    /// Serial line points: the parsed field.
    field: Option<String>,
    writable: bool,
    min: Option<f64>,
    max: Option<f64>,
    /// Defined in the device's model (errors about it name the model).
    from_model: bool,
}

/// A device model, validated once per config.
#[derive(Debug, Clone)]
struct ModelDef {
    points: Vec<PointSpec>,
    parser: Option<crate::parse::Parser>,
    request: Option<String>,
}

const PLACEHOLDERS: [&str; 4] = ["gateway", "device", "point", "unit"];

impl Resolver<'_> {
    fn resolve(&mut self, ctx: &Ctx, path: &Path, base: &Path, raw: RawConfig) -> Config {
        let id = raw.gateway.id.clone().unwrap_or_else(hostname);
        if id.is_empty() || id.contains(['/', '+', '#', '\0']) {
            self.errors.push(ctx.diag(
                "gateway.id",
                format!("`{id}` cannot be part of an MQTT topic (no '/', '+', '#', not empty)"),
            ));
        }
        let state_dir = match raw.gateway.state_dir {
            Some(d) if d.is_relative() => base.join(d),
            Some(d) => d,
            None => PathBuf::from("/var/lib/fieldgate"),
        };
        let status_interval = raw
            .gateway
            .status_interval
            .unwrap_or(Duration::from_secs(60));
        if status_interval < Duration::from_secs(1) {
            self.errors
                .push(ctx.diag("gateway.status_interval", "must be at least 1s"));
        }
        let log_level = raw
            .gateway
            .log_level
            .clone()
            .unwrap_or_else(|| "info".into());
        if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
            self.errors.push(ctx.diag(
                "gateway.log_level",
                format!("`{log_level}` is not a log level (error, warn, info, debug, trace)"),
            ));
        }
        let gateway = Gateway {
            id,
            state_dir,
            status_interval,
            log_level,
        };
        let mqtt = self.resolve_mqtt(ctx, base, &gateway, &raw.mqtt);
        let queue = self.resolve_queue(ctx, &raw.queue);

        let mut buses = Vec::new();
        for (name, b) in &raw.buses {
            if let Some(bus) = self.resolve_bus(ctx, name, b) {
                buses.push(bus);
            }
        }

        let folders: Vec<PathBuf> = raw
            .models
            .iter()
            .map(|m| tidy_path(&base.join(m)))
            .collect();
        for (i, f) in folders.iter().enumerate() {
            if !f.is_dir() {
                self.errors.push(ctx.diag(
                    &format!("models[{i}]"),
                    format!("model folder {} does not exist", f.display()),
                ));
            }
        }

        let env = DeviceEnv {
            gateway: &gateway,
            buses: &raw.buses,
            resolved: &buses,
            folders: &folders,
        };
        let mut devices = Vec::new();
        for (name, d) in &raw.devices {
            if let Some(dev) = self.resolve_device(ctx, &env, name, d) {
                devices.push(dev);
            }
        }
        self.check_topics_unique(ctx, &devices);
        // A streaming device owns its line: nothing else may share the port.
        for bus in &buses {
            let on_bus: Vec<&Device> = devices
                .iter()
                .filter(|d| d.bus == bus.name && d.line.is_some())
                .collect();
            if on_bus.len() < 2 {
                continue;
            }
            for d in on_bus
                .iter()
                .filter(|d| d.line.as_ref().is_some_and(|l| l.request.is_none()))
            {
                let others: Vec<&str> = on_bus
                    .iter()
                    .filter(|o| o.name != d.name)
                    .map(|o| o.name.as_str())
                    .collect();
                self.errors.push(ctx.diag(
                    &format!("devices.{}", d.name),
                    format!(
                        "`{}` streams lines (no `request:`) on bus `{}`, which {} also use{}: devices may share a serial line only in request/response mode",
                        d.name,
                        bus.name,
                        others.join(", "),
                        if others.len() == 1 { "s" } else { "" }
                    ),
                ));
            }
        }
        Config {
            path: path.to_path_buf(),
            gateway,
            mqtt,
            queue,
            metrics: raw.metrics.as_ref().map(|m| m.listen),
            homeassistant: raw.homeassistant.as_ref().filter(|h| h.discovery).map(|h| {
                crate::discovery::Discovery {
                    prefix: h.prefix.clone().unwrap_or_else(|| "homeassistant".into()),
                }
            }),
            buses,
            devices,
        }
    }

    fn resolve_bus(&mut self, ctx: &Ctx, name: &str, b: &RawBus) -> Option<Bus> {
        let p = format!("buses.{name}");
        let given = [
            b.modbus_tcp.is_some(),
            b.modbus_rtu.is_some(),
            b.modbus_rtu_over_tcp.is_some(),
            b.serial_line.is_some(),
        ];
        if given.iter().filter(|g| **g).count() != 1 {
            self.errors.push(ctx.diag(
                &p,
                "a bus needs exactly one transport: `modbus_tcp: {…}`, `modbus_rtu: {…}`, \
                 `modbus_rtu_over_tcp: {…}` or `serial_line: {…}`",
            ));
            return None;
        }
        let errors = &mut self.errors;
        let mut timeout_of = |field: &str, t: Option<Duration>, default: Duration| {
            let t = t.unwrap_or(default);
            if t.is_zero() {
                errors.push(ctx.diag(&format!("{p}.{field}.timeout"), "must be more than 0"));
            }
            t
        };
        let transport = if let Some(t) = &b.modbus_tcp {
            Transport::ModbusTcp {
                host: t.host.clone(),
                port: t.port.unwrap_or(502),
                timeout: timeout_of("modbus_tcp", t.timeout, Duration::from_secs(1)),
            }
        } else if let Some(t) = &b.modbus_rtu_over_tcp {
            Transport::ModbusRtu {
                endpoint: Endpoint::Tcp {
                    host: t.host.clone(),
                    port: t.port.unwrap_or(502),
                },
                timeout: timeout_of("modbus_rtu_over_tcp", t.timeout, Duration::from_secs(1)),
                retries: 1,
                turnaround: Duration::ZERO,
            }
        } else if let Some(l) = &b.serial_line {
            let timeout = timeout_of("serial_line", l.timeout, Duration::from_secs(1));
            let terminator = l
                .terminator
                .clone()
                .unwrap_or_else(|| "\r\n".into())
                .into_bytes();
            let max_line = l.max_line.unwrap_or(512);
            let at = format!("{p}.serial_line");
            if terminator.is_empty() {
                self.errors
                    .push(ctx.diag(&format!("{at}.terminator"), "cannot be empty"));
            }
            if !(8..=65536).contains(&max_line) {
                self.errors
                    .push(ctx.diag(&format!("{at}.max_line"), "must be within 8..=65536 bytes"));
            }
            let settings = serial_settings(
                ctx,
                &mut self.errors,
                &at,
                &l.port,
                l.baud,
                l.parity,
                l.data_bits,
                l.stop_bits,
            );
            Transport::SerialLine {
                settings,
                terminator,
                max_line,
                timeout,
            }
        } else {
            let r = b.modbus_rtu.as_ref().expect("one transport given");
            let timeout = timeout_of("modbus_rtu", r.timeout, Duration::from_millis(500));
            let at = format!("{p}.modbus_rtu");
            let settings = serial_settings(
                ctx,
                &mut self.errors,
                &at,
                &r.port,
                r.baud,
                r.parity,
                r.data_bits,
                r.stop_bits,
            );
            Transport::ModbusRtu {
                endpoint: Endpoint::Serial(settings),
                timeout,
                retries: r.retries.unwrap_or(1),
                turnaround: r.turnaround.unwrap_or(Duration::ZERO),
            }
        };
        Some(Bus {
            name: name.to_string(),
            transport,
        })
    }

    fn resolve_queue(&mut self, ctx: &Ctx, q: &RawQueue) -> Queue {
        let d = Limits::default();
        let max_bytes = match &q.max_bytes {
            None => d.max_bytes,
            Some(NumberOrText::Number(n)) => *n,
            Some(NumberOrText::Text(t)) => parse_bytes(t).unwrap_or_else(|msg| {
                self.errors.push(ctx.diag("queue.max_bytes", msg));
                d.max_bytes
            }),
        };
        if max_bytes < 64 * 1024 {
            self.errors
                .push(ctx.diag("queue.max_bytes", "must be at least 64KiB"));
        }
        let max_messages = q.max_messages.unwrap_or(d.max_messages);
        if max_messages == 0 {
            self.errors
                .push(ctx.diag("queue.max_messages", "must be at least 1"));
        }
        let replay_rate = match q.replay_rate {
            Some(r) if r < 0.0 || !r.is_finite() => {
                self.errors.push(ctx.diag(
                    "queue.replay_rate",
                    "must be 0 (no limit) or a positive number of messages per second",
                ));
                None
            }
            Some(r) if r > 0.0 => Some(r),
            _ => None,
        };
        Queue {
            limits: Limits {
                max_messages,
                max_bytes,
                max_age: q.max_age.unwrap_or(d.max_age),
                when_full: q.when_full.unwrap_or(d.when_full),
            },
            replay_rate,
        }
    }

    fn resolve_mqtt(&mut self, ctx: &Ctx, base: &Path, gateway: &Gateway, m: &RawMqtt) -> Mqtt {
        let (host, port, use_tls) = match parse_mqtt_url(&m.url) {
            Ok(hp) => hp,
            Err(msg) => {
                self.errors.push(ctx.diag("mqtt.url", msg));
                (String::new(), 0, false)
            }
        };
        if m.tls.is_some() && !use_tls {
            self.errors
                .push(ctx.diag("mqtt.tls", "`tls:` needs an mqtts:// URL"));
        }
        let settings = m.tls.as_ref().map(|t| crate::tls::TlsSettings {
            ca_file: t.ca_file.as_ref().map(|f| base.join(f)),
            cert_file: t.cert_file.as_ref().map(|f| base.join(f)),
            key_file: t.key_file.as_ref().map(|f| base.join(f)),
            insecure_skip_verify: t.insecure_skip_verify.unwrap_or(false),
        });
        let insecure_skip_verify = settings.as_ref().is_some_and(|s| s.insecure_skip_verify);
        let tls = if use_tls {
            match crate::tls::client_config(&settings.unwrap_or_default()) {
                Ok(c) => Some(c),
                Err((field, msg)) => {
                    let key = match field {
                        crate::tls::Field::CaFile => "mqtt.tls.ca_file",
                        crate::tls::Field::CertFile => "mqtt.tls.cert_file",
                        crate::tls::Field::KeyFile => "mqtt.tls.key_file",
                    };
                    self.errors.push(ctx.diag(key, msg));
                    None
                }
            }
        } else {
            None
        };
        let password = match (&m.password, &m.password_file) {
            (Some(_), Some(_)) => {
                self.errors.push(ctx.diag(
                    "mqtt.password_file",
                    "give either password or password_file, not both",
                ));
                None
            }
            (Some(p), None) => Some(Secret(p.clone())),
            (None, Some(f)) => {
                let f = base.join(f);
                match std::fs::read_to_string(&f) {
                    Ok(s) => Some(Secret(s.trim_end_matches(['\n', '\r']).to_string())),
                    Err(e) => {
                        self.errors.push(ctx.diag(
                            "mqtt.password_file",
                            format!("cannot read {}: {e}", f.display()),
                        ));
                        None
                    }
                }
            }
            (None, None) => None,
        };
        if password.is_some() && m.username.is_none() {
            self.errors
                .push(ctx.diag("mqtt.username", "a password needs a username"));
        }
        let keep_alive = m.keep_alive.unwrap_or(Duration::from_secs(30));
        if keep_alive < Duration::from_secs(1) {
            self.errors
                .push(ctx.diag("mqtt.keep_alive", "must be at least 1s"));
        }
        let inflight = m.inflight.unwrap_or(500);
        if inflight == 0 {
            self.errors
                .push(ctx.diag("mqtt.inflight", "must be at least 1"));
        }
        let inflight_qos2 = m.inflight_qos2.unwrap_or(20);
        if inflight_qos2 == 0 {
            self.errors
                .push(ctx.diag("mqtt.inflight_qos2", "must be at least 1"));
        }
        Mqtt {
            host,
            port,
            client_id: m
                .client_id
                .clone()
                .unwrap_or_else(|| format!("fieldgate-{}", gateway.id)),
            username: m.username.clone(),
            password,
            keep_alive,
            inflight: inflight.max(1),
            inflight_qos2: inflight_qos2.clamp(1, inflight.max(1)),
            tls,
            insecure_skip_verify,
        }
    }

    /// Every published topic belongs to one point (or one `publish: device` device): two
    /// owners would mix their readings, and a command on `…/set` would reach whichever was
    /// resolved last. Both places are named.
    fn check_topics_unique(&mut self, ctx: &Ctx, devices: &[Device]) {
        let mut owners: HashMap<String, String> = HashMap::new();
        for d in devices {
            let published: Vec<(String, String)> = match d.publish {
                PublishMode::Point => d
                    .points
                    .iter()
                    .map(|pt| {
                        (
                            pt.delivery.topic.clone(),
                            format!("devices.{}.points.{}", d.name, pt.name),
                        )
                    })
                    .collect(),
                PublishMode::Device => vec![(
                    d.device_delivery.topic.clone(),
                    format!("devices.{}", d.name),
                )],
            };
            for (topic, path) in published {
                match owners.get(&topic) {
                    Some(first) => {
                        let at = ctx.map.locate(first);
                        self.errors.push(ctx.diag(
                            &path,
                            format!(
                                "publishes to `{topic}`, as {first} does ({}:{}:{}); give one of them its own `topic:`",
                                ctx.file, at.line, at.col
                            ),
                        ));
                    }
                    None => {
                        owners.insert(topic, path);
                    }
                }
            }
        }
    }

    fn resolve_device(
        &mut self,
        ctx: &Ctx,
        env: &DeviceEnv,
        name: &str,
        d: &RawDevice,
    ) -> Option<Device> {
        let DeviceEnv {
            gateway,
            buses,
            resolved,
            folders,
        } = *env;
        let p = format!("devices.{name}");
        let before = self.errors.len();
        check_topic_segment(ctx, &mut self.errors, &p, name, "device name");
        if !buses.contains_key(&d.bus) {
            let known: Vec<&str> = buses.keys().map(String::as_str).collect();
            self.errors.push(ctx.diag(
                &format!("{p}.bus"),
                format!(
                    "unknown bus `{}` (buses defined: {})",
                    d.bus,
                    list_or_none(&known)
                ),
            ));
        }
        let unit = d.unit.unwrap_or(1);
        let range = resolved
            .iter()
            .find(|b| b.name == d.bus)
            .map_or(0..=255, |b| b.transport.unit_range());
        if !range.contains(&unit) {
            self.errors.push(ctx.diag(
                &format!("{p}.unit"),
                format!(
                    "unit id {unit} is out of range {}..={} for this bus",
                    range.start(),
                    range.end()
                ),
            ));
        }
        let offline_after = d.offline_after.unwrap_or(3);
        if offline_after == 0 {
            self.errors
                .push(ctx.diag(&format!("{p}.offline_after"), "must be at least 1"));
        }
        let every = d.every.unwrap_or(Duration::from_secs(1));
        if every < Duration::from_millis(10) {
            self.errors
                .push(ctx.diag(&format!("{p}.every"), "must be at least 10ms"));
        }
        if let Some(q) = d.qos {
            check_qos(ctx, &mut self.errors, &format!("{p}.qos"), q);
        }
        if let Some(t) = &d.topic {
            check_template(ctx, &mut self.errors, &format!("{p}.topic"), t);
        }

        // Model points first, then inline points replace those of the same name.
        let mut specs: BTreeMap<String, PointSpec> = BTreeMap::new();
        let mut model_failed = false;
        let mut model_parser = None;
        let mut model_request = None;
        if let Some(model) = &d.model {
            match self.load_model(ctx, folders, &format!("{p}.model"), model) {
                Some(m) => {
                    specs.extend(m.points.into_iter().map(|s| (s.name.clone(), s)));
                    model_parser = m.parser;
                    model_request = m.request;
                }
                // Reported once, where the model is first used or in its own file.
                None => model_failed = true,
            }
        }
        for (pname, rp) in &d.points {
            let pp = format!("{p}.points.{pname}");
            if let Some(spec) = validate_point(ctx, &mut self.errors, &pp, pname, rp) {
                specs.insert(pname.clone(), spec);
            }
        }
        if model_failed {
            return None;
        }
        let line = self.resolve_line(ctx, &p, d, resolved, &specs, model_parser, model_request);
        if specs.is_empty() && self.errors.len() == before {
            self.errors.push(ctx.diag(
                &p,
                "a device needs at least one point (from `model:` or `points:`)",
            ));
        }

        let publish = d.publish.unwrap_or(PublishMode::Point);
        let device_topic = d.topic.clone().unwrap_or_else(|| match publish {
            PublishMode::Point => "fieldgate/{gateway}/{device}/{point}".into(),
            PublishMode::Device => "fieldgate/{gateway}/{device}".into(),
        });
        if publish == PublishMode::Device
            && (device_topic.contains("{point}") || device_topic.contains("{unit}"))
        {
            self.errors.push(ctx.diag(
                &format!("{p}.topic"),
                "with `publish: device` the topic is per device: {point} and {unit} cannot be used",
            ));
        }
        let mut points = Vec::new();
        let mut payload = HashMap::new();
        for s in specs.into_values() {
            let template = s.topic.as_deref().unwrap_or(&device_topic);
            let topic = render_topic(
                template,
                &gateway.id,
                name,
                &s.name,
                s.unit.as_deref().unwrap_or(""),
            );
            // A placeholder's value (a unit like `#/h`, a point name from a model) can put what
            // MQTT forbids into the topic: no session could ever publish it.
            if let Some(c) = topic.chars().find(|c| matches!(c, '+' | '#' | '\0')) {
                self.errors.push(ctx.diag(
                    &format!("{p}.points.{}", s.name),
                    format!(
                        "the topic `{template}` becomes `{}` for this point, and {c:?} cannot be in an MQTT topic; change the unit or name, or give the point a `topic:` without that placeholder",
                        topic.escape_debug()
                    ),
                ));
            }
            payload.insert(
                s.name.clone(),
                s.payload.or(d.payload).unwrap_or(PayloadFormat::Json),
            );
            points.push(Point {
                name: s.name,
                source: s.source,
                dtype: s.dtype,
                order: s.order,
                bit: s.bit,
                length: s.length,
                scale: s.scale,
                offset: s.offset,
                unit: s.unit,
                every: s.every.unwrap_or(every),
                delivery: Delivery {
                    topic,
                    qos: s.qos.or(d.qos).unwrap_or(1),
                    retain: s.retain.or(d.retain).unwrap_or(false),
                },
                field: s.field,
                writable: s.writable,
                min: s.min,
                max: s.max,
            });
        }
        if self.errors.len() != before {
            return None;
        }

        let max_registers = d.max_registers.unwrap_or(125);
        if !(1..=125).contains(&max_registers) {
            self.errors
                .push(ctx.diag(&format!("{p}.max_registers"), "must be within 1..=125"));
            return None;
        }
        let mut by_every: BTreeMap<Duration, Vec<usize>> = BTreeMap::new();
        for (i, pt) in points.iter().enumerate() {
            by_every.entry(pt.every).or_default().push(i);
        }
        let groups = if line.is_some() {
            Vec::new() // line devices are not planned in Modbus requests
        } else {
            by_every
                .into_iter()
                .map(|(every, members)| PollGroup {
                    every,
                    requests: plan(&points, &members, d.max_gap.unwrap_or(0), max_registers),
                })
                .collect()
        };
        Some(Device {
            name: name.to_string(),
            bus: d.bus.clone(),
            unit: unit as u8,
            points,
            groups,
            publish,
            payload,
            device_delivery: Delivery {
                topic: render_topic(&device_topic, &gateway.id, name, "", ""),
                qos: d.qos.unwrap_or(1),
                retain: d.retain.unwrap_or(false),
            },
            availability_topic: format!("fieldgate/{}/{name}/availability", gateway.id),
            offline_after: offline_after.max(1),
            line,
        })
    }

    /// The serial line part of a device: its parser, request and interval, and the checks that
    /// tie its points to what the parser produces. None for a Modbus device.
    #[allow(clippy::too_many_arguments)]
    fn resolve_line(
        &mut self,
        ctx: &Ctx,
        p: &str,
        d: &RawDevice,
        resolved: &[Bus],
        specs: &BTreeMap<String, PointSpec>,
        model_parser: Option<crate::parse::Parser>,
        model_request: Option<String>,
    ) -> Option<LineSpec> {
        let is_line = resolved
            .iter()
            .find(|b| b.name == d.bus)
            .map(|b| matches!(b.transport, Transport::SerialLine { .. }));
        let point_path = |s: &PointSpec| {
            if s.from_model {
                format!("{p}.model")
            } else {
                format!("{p}.points.{}", s.name)
            }
        };
        match is_line {
            None => None, // unknown bus: reported already
            Some(false) => {
                for (key, set) in [
                    ("parse", d.parse.is_some()),
                    ("request", d.request.is_some()),
                ] {
                    if set {
                        self.errors.push(ctx.diag(
                            &format!("{p}.{key}"),
                            format!("`{key}` is for devices on a serial_line bus"),
                        ));
                    }
                }
                for s in specs.values().filter(|s| s.field.is_some()) {
                    self.errors.push(ctx.diag(
                        &point_path(s),
                        format!("point `{}`: `field` is for devices on a serial_line bus; Modbus points use `register`, `coil` or `discrete`", s.name),
                    ));
                }
                None
            }
            Some(true) => {
                let parser = match &d.parse {
                    Some(spec) => build_parser(ctx, &mut self.errors, &format!("{p}.parse"), spec),
                    None => model_parser,
                };
                let Some(parser) = parser else {
                    if d.parse.is_none() {
                        self.errors.push(ctx.diag(
                            p,
                            "a serial_line device needs `parse:` (regex, split, nmea or json)",
                        ));
                    }
                    return None;
                };
                for s in specs.values() {
                    match &s.field {
                        None => self.errors.push(ctx.diag(
                            &point_path(s),
                            format!("point `{}` of a serial_line device needs `field:` (what the parser gives it)", s.name),
                        )),
                        Some(f) => {
                            if let Err(msg) = parser.knows_field(f) {
                                let at = if s.from_model { point_path(s) } else { format!("{}.field", point_path(s)) };
                                self.errors.push(ctx.diag(&at, msg));
                            }
                        }
                    }
                }
                let request = d.request.clone().or(model_request).map(String::into_bytes);
                if request.as_ref().is_some_and(|r| r.is_empty()) {
                    self.errors
                        .push(ctx.diag(&format!("{p}.request"), "cannot be empty"));
                }
                Some(LineSpec {
                    parser,
                    request,
                    every: d.every,
                })
            }
        }
    }

    /// Loads `model` from the first folder holding `<model>.yaml`, once per config.
    fn load_model(
        &mut self,
        ctx: &Ctx,
        folders: &[PathBuf],
        path: &str,
        model: &str,
    ) -> Option<ModelDef> {
        if let Some(cached) = self.models.get(model) {
            return cached.clone();
        }
        let file = folders
            .iter()
            .map(|f| f.join(format!("{model}.yaml")))
            .find(|f| f.is_file());
        let Some(file) = file else {
            let searched: Vec<String> = folders.iter().map(|f| f.display().to_string()).collect();
            self.errors.push(ctx.diag(
                path,
                format!(
                    "unknown model `{model}`: no {model}.yaml in the model folders ({})",
                    if searched.is_empty() {
                        "none configured: add `models: [./mappings]`".to_string()
                    } else {
                        searched.join(", ")
                    }
                ),
            ));
            self.models.insert(model.to_string(), None);
            return None;
        };
        let result = match std::fs::read_to_string(&file) {
            Err(e) => {
                self.errors
                    .push(ctx.diag(path, format!("cannot read {}: {e}", file.display())));
                None
            }
            Ok(text) => self.model_from_text(&file, &text, model).map(|(m, _)| m),
        };
        self.models.insert(model.to_string(), result.clone());
        result
    }

    /// Validates a model file's text; `model` is the name its file gives it.
    fn model_from_text(
        &mut self,
        file: &Path,
        text: &str,
        model: &str,
    ) -> Option<(ModelDef, Option<String>)> {
        let fname = file.display().to_string();
        let before = self.errors.len();
        match parse::<RawModel>(&fname, text, self.env, &mut self.errors) {
            None => None,
            Some((raw, map)) => {
                let mctx = Ctx {
                    file: &fname,
                    map: &map,
                };
                if raw.model != model {
                    self.errors.push(mctx.diag(
                        "model",
                        format!(
                            "the file is named {model}.yaml but says `model: {}`",
                            raw.model
                        ),
                    ));
                }
                let mut specs = Vec::new();
                for (pname, rp) in &raw.points {
                    if let Some(mut s) = validate_point(
                        &mctx,
                        &mut self.errors,
                        &format!("points.{pname}"),
                        pname,
                        rp,
                    ) {
                        s.from_model = true;
                        specs.push(s);
                    }
                }
                let parser = raw
                    .parse
                    .as_ref()
                    .and_then(|spec| build_parser(&mctx, &mut self.errors, "parse", spec));
                (self.errors.len() == before).then_some((
                    ModelDef {
                        points: specs,
                        parser,
                        request: raw.request.clone(),
                    },
                    raw.description.clone(),
                ))
            }
        }
    }
}

/// Validates one point; every problem is pushed to `errors`.
fn validate_point(
    ctx: &Ctx,
    errors: &mut Vec<Diagnostic>,
    p: &str,
    name: &str,
    r: &RawPoint,
) -> Option<PointSpec> {
    let before = errors.len();
    let mut err = |field: &str, msg: String| {
        let path = if field.is_empty() {
            p.to_string()
        } else {
            format!("{p}.{field}")
        };
        errors.push(ctx.diag(&path, msg));
    };
    check_topic_segment_with(&mut err, name, "point name");

    if let Some(field) = &r.field {
        // A field of a parsed text line: none of the register keys apply.
        for (key, set) in [
            ("writable", r.writable == Some(true)),
            ("register", r.register.is_some()),
            ("coil", r.coil.is_some()),
            ("discrete", r.discrete.is_some()),
            ("kind", r.kind.is_some()),
            ("order", r.order.is_some()),
            ("bit", r.bit.is_some()),
            ("length", r.length.is_some()),
        ] {
            if set {
                err(
                    key,
                    format!("`{key}` does not apply to a `field:` point (a field of a text line)"),
                );
            }
        }
        let dtype = r.dtype.unwrap_or(DataType::F64);
        if !dtype.is_numeric() {
            for (key, set) in [("scale", r.scale.is_some()), ("offset", r.offset.is_some())] {
                if set {
                    err(
                        key,
                        format!(
                            "`{key}` applies only to numeric types, not {}",
                            type_name(dtype)
                        ),
                    );
                }
            }
        }
        if let Some(t) = &r.topic
            && let Some(msg) = template_error(t)
        {
            err("topic", msg);
        }
        if let Some(q) = r.qos
            && q > 2
        {
            err("qos", format!("QoS {q} does not exist (0, 1 or 2)"));
        }
        if errors.len() != before {
            return None;
        }
        return Some(PointSpec {
            name: name.to_string(),
            source: Source {
                table: Table::Holding,
                address: 0,
            },
            dtype,
            order: Order::ABCD,
            bit: None,
            length: 1,
            scale: r.scale,
            offset: r.offset,
            unit: r.unit.clone(),
            every: r.every,
            topic: r.topic.clone(),
            payload: r.payload,
            qos: r.qos,
            retain: r.retain,
            field: Some(field.as_key()),
            from_model: false,
            writable: false,
            min: None,
            max: None,
        });
    }

    let sources = [
        ("register", r.register),
        ("coil", r.coil),
        ("discrete", r.discrete),
    ];
    let given: Vec<&str> = sources
        .iter()
        .filter(|(_, v)| v.is_some())
        .map(|(k, _)| *k)
        .collect();
    let (table, address) = match (given.as_slice(), r.register, r.coil, r.discrete) {
        (["register"], Some(a), _, _) => (
            match r.kind.unwrap_or(RegisterKind::Holding) {
                RegisterKind::Holding => Table::Holding,
                RegisterKind::Input => Table::Input,
            },
            a,
        ),
        (["coil"], _, Some(a), _) => (Table::Coil, a),
        (["discrete"], _, _, Some(a)) => (Table::Discrete, a),
        ([], ..) => {
            err(
                "",
                "a point needs one of `register:`, `coil:` or `discrete:` (or `field:` on a serial_line device)".into(),
            );
            return None;
        }
        _ => {
            err(
                given[1],
                format!(
                    "give only one of `register:`, `coil:`, `discrete:` (found {})",
                    given.join(", ")
                ),
            );
            return None;
        }
    };
    if table.is_bits() {
        for (field, set) in [
            ("kind", r.kind.is_some()),
            ("order", r.order.is_some()),
            ("bit", r.bit.is_some()),
            ("length", r.length.is_some()),
            ("scale", r.scale.is_some()),
            ("offset", r.offset.is_some()),
        ] {
            if set {
                err(
                    field,
                    format!(
                        "`{field}` does not apply to a {} (a single bit)",
                        if table == Table::Coil {
                            "coil"
                        } else {
                            "discrete input"
                        }
                    ),
                );
            }
        }
        if let Some(t) = r.dtype.filter(|t| *t != DataType::Bool) {
            err(
                "type",
                format!("a single bit is a bool, not {}", type_name(t)),
            );
        }
    }
    let dtype = match (r.dtype, r.bit, table.is_bits()) {
        (_, _, true) => DataType::Bool,
        (None, Some(_), _) => DataType::Bool,
        (Some(DataType::Bool), Some(_), _) => DataType::Bool,
        (Some(t), Some(_), _) => {
            err("type", format!("`bit:` reads a bool, not {}", type_name(t)));
            DataType::Bool
        }
        (Some(t), None, _) => t,
        (None, None, _) => DataType::U16,
    };
    let bit = match r.bit {
        Some(b) if b > 15 => {
            err("bit", format!("bit {b} is out of range 0..=15"));
            None
        }
        b => b.map(|b| b as u8),
    };
    let length = match (dtype, r.length) {
        (DataType::String, None) => {
            err(
                "length",
                "a string needs `length:` in registers (two characters each)".into(),
            );
            1
        }
        (DataType::String, Some(0)) => {
            err("length", "must be at least 1".into());
            1
        }
        (DataType::String, Some(l)) if l > 125 => {
            err(
                "length",
                format!("{l} registers do not fit one request (at most 125)"),
            );
            1
        }
        (DataType::String, Some(l)) => l as u16,
        (_, Some(_)) => {
            err("length", "`length:` applies only to `type: string`".into());
            1
        }
        (_, None) => 1,
    };
    if !dtype.is_numeric() {
        for (field, set) in [("scale", r.scale.is_some()), ("offset", r.offset.is_some())] {
            if set && !table.is_bits() {
                err(
                    field,
                    format!(
                        "`{field}` applies only to numeric types, not {}",
                        type_name(dtype)
                    ),
                );
            }
        }
    }
    if r.scale == Some(0.0) {
        err("scale", "a scale of 0 makes every reading 0".into());
    }
    let width: u32 = if table.is_bits() || bit.is_some() {
        1
    } else if dtype == DataType::String {
        length as u32
    } else {
        dtype.registers() as u32
    };
    let field = given[0];
    if address > 65535 {
        err(
            field,
            format!(
                "address {address} is past 65535 (addresses are 0-based protocol addresses; see README: 4xxxx/3xxxx numbers)"
            ),
        );
    } else if address + width - 1 > 65535 {
        err(
            field,
            format!("{address} + {width} registers runs past address 65535"),
        );
    }
    if let Some(e) = r.every
        && e < Duration::from_millis(10)
    {
        err("every", "must be at least 10ms".into());
    }
    if let Some(q) = r.qos
        && q > 2
    {
        err("qos", format!("QoS {q} does not exist (0, 1 or 2)"));
    }
    if let Some(t) = &r.topic
        && let Some(msg) = template_error(t)
    {
        err("topic", msg);
    }
    if r.writable == Some(true) {
        if !matches!(table, Table::Coil | Table::Holding) {
            err(
                "writable",
                format!(
                    "{} cannot be written; only coils and holding registers",
                    table.name()
                ),
            );
        } else if bit.is_some() || dtype == DataType::String {
            err("writable", "bit and string points are not writable".into());
        }
    } else if r.min.is_some() || r.max.is_some() {
        err(
            if r.min.is_some() { "min" } else { "max" },
            "`min` and `max` limit commands: they need `writable: true`".into(),
        );
    }
    if let (Some(lo), Some(hi)) = (r.min, r.max)
        && lo > hi
    {
        err("min", format!("min {lo} is above max {hi}"));
    }
    if errors.len() != before {
        return None;
    }
    Some(PointSpec {
        name: name.to_string(),
        source: Source {
            table,
            address: address as u16,
        },
        dtype,
        order: r.order.unwrap_or_default(),
        bit,
        length,
        scale: r.scale,
        offset: r.offset,
        unit: r.unit.clone(),
        every: r.every,
        topic: r.topic.clone(),
        payload: r.payload,
        qos: r.qos,
        retain: r.retain,
        field: None,
        from_model: false,
        writable: r.writable.unwrap_or(false),
        min: r.min,
        max: r.max,
    })
}

fn type_name(t: DataType) -> String {
    format!("{t:?}").to_lowercase()
}

fn check_qos(ctx: &Ctx, errors: &mut Vec<Diagnostic>, path: &str, q: u8) {
    if q > 2 {
        errors.push(ctx.diag(path, format!("QoS {q} does not exist (0, 1 or 2)")));
    }
}

fn check_template(ctx: &Ctx, errors: &mut Vec<Diagnostic>, path: &str, t: &str) {
    if let Some(msg) = template_error(t) {
        errors.push(ctx.diag(path, msg));
    }
}

fn check_topic_segment(
    ctx: &Ctx,
    errors: &mut Vec<Diagnostic>,
    path: &str,
    name: &str,
    what: &str,
) {
    check_topic_segment_with(
        &mut |_: &str, m: String| errors.push(ctx.diag(path, m)),
        name,
        what,
    );
}

fn check_topic_segment_with(err: &mut dyn FnMut(&str, String), name: &str, what: &str) {
    if name.is_empty() || name.contains(['/', '+', '#', '\0']) {
        err(
            "",
            format!("{what} `{name}` cannot be an MQTT topic level (no '/', '+', '#', not empty)"),
        );
    }
}

/// Checks a topic template: known placeholders only, no wildcards.
fn template_error(t: &str) -> Option<String> {
    if t.is_empty() {
        return Some("a topic cannot be empty".into());
    }
    if t.contains(['+', '#']) {
        return Some(format!(
            "`{t}`: '+' and '#' are subscription wildcards, not allowed in a topic"
        ));
    }
    if t.contains('\0') {
        return Some(format!(
            "`{}`: NUL is not allowed in a topic",
            t.escape_debug()
        ));
    }
    let mut rest = t;
    while let Some(i) = rest.find('{') {
        let Some(j) = rest[i..].find('}') else {
            return Some(format!("`{t}`: unclosed '{{'"));
        };
        let name = &rest[i + 1..i + j];
        if !PLACEHOLDERS.contains(&name) {
            return Some(format!(
                "unknown placeholder {{{name}}} in `{t}` (known: {{gateway}} {{device}} {{point}} {{unit}})"
            ));
        }
        rest = &rest[i + j + 1..];
    }
    None
}

fn render_topic(t: &str, gateway: &str, device: &str, point: &str, unit: &str) -> String {
    t.replace("{gateway}", gateway)
        .replace("{device}", device)
        .replace("{point}", point)
        .replace("{unit}", unit)
}

fn list_or_none(items: &[&str]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

/// `mqtt://host[:port]`; `tcp://` is accepted as a synonym.
fn parse_mqtt_url(url: &str) -> Result<(String, u16, bool), String> {
    let (rest, tls) = if let Some(r) = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
    {
        (r, false)
    } else if let Some(r) = url
        .strip_prefix("mqtts://")
        .or_else(|| url.strip_prefix("ssl://"))
    {
        (r, true)
    } else {
        return Err(format!(
            "`{url}` is not an MQTT URL: expected mqtt://host:port or mqtts://host:port"
        ));
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = if let Some(stripped) = rest.strip_prefix('[') {
        // [ipv6]:port
        let (h, p) = stripped
            .split_once(']')
            .ok_or_else(|| format!("`{url}`: unclosed '['"))?;
        (h.to_string(), p.strip_prefix(':'))
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (rest.to_string(), None),
        }
    };
    if host.is_empty() || host.contains(['/', '@']) {
        return Err(format!(
            "`{url}`: expected mqtt://host:port (credentials go in `username` and `password`)"
        ));
    }
    let port = match port {
        None if tls => 8883,
        None => 1883,
        Some(p) => p
            .parse::<u16>()
            .map_err(|_| format!("`{url}`: port `{p}` is not a number 1..=65535"))?,
    };
    Ok((host, port, tls))
}

/// `1048576`, `512KiB`, `64MB`, `1GiB`, `1.5GB` → bytes (KB/MB/GB are powers of 1000).
fn parse_bytes(t: &str) -> Result<u64, String> {
    let t = t.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num
        .replace('_', "")
        .parse()
        .map_err(|_| format!("`{t}` is not a size (write e.g. 512MiB or 1GB)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "tib" => 1 << 40,
        u => {
            return Err(format!(
                "unknown size unit `{u}` in `{t}` (B, KB, KiB, MB, MiB, GB, GiB)"
            ));
        }
    };
    Ok((num * mult as f64) as u64)
}

/// Drops `.` components so file names in messages read naturally (`a/./b` → `a/b`).
fn tidy_path(p: &Path) -> PathBuf {
    p.components()
        .filter(|c| !matches!(c, std::path::Component::CurDir))
        .collect()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "fieldgate".into())
}

#[cfg(test)]
mod tests {
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
    fn templates_accept_known_placeholders_only() {
        assert_eq!(
            template_error("site/{gateway}/{device}/{point}/{unit}"),
            None
        );
        assert!(
            template_error("x/{devise}")
                .unwrap()
                .contains("unknown placeholder {devise}")
        );
        assert!(template_error("x/#").is_some());
    }
}
