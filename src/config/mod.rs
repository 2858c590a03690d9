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
//!
//! # Layout
//!
//! - `raw`: the serde shapes of the YAML (syntax and types only);
//! - `env`: `${VAR}` expansion before parsing;
//! - `diagnostic`: errors with `file:line:column`, serde errors placed on the YAML;
//! - `resolve`: the gateway, MQTT and queue sections, and the checks across devices;
//! - `buses`, `devices`, `points`: one section each, with the device models;
//! - `computed`: the computed points of a device (names, kinds, cycles, intervals);
//! - `check`: what `fieldgate check` prints;
//! - this file: the resolved model the gateway runs, and [`Config::load`].

mod buses;
mod check;
mod computed;
mod devices;
mod diagnostic;
mod env;
mod points;
mod raw;
mod resolve;
mod resolver;
mod source_map;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use crate::bus::{Bus, Transport};
use crate::mapping::{Delivery, Point};
use crate::modbus::ReadRequest;
use crate::store::Limits;
pub use check::{ModelSummary, check_model, is_model_text};
pub use computed::Computed;
pub use diagnostic::{ConfigErrors, Diagnostic};
pub use env::expand_env;
pub use raw::*;
pub use source_map::{Loc, SourceMap};

use diagnostic::{Ctx, parse};
use resolver::Resolver;

/// Exit code for a bad configuration (sysexits.h EX_CONFIG).
pub const EX_CONFIG: i32 = 78;

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
    pub homeassistant: Option<Discovery>,
    /// The status page, if enabled.
    pub web: Option<Web>,
    /// Sparkplug B, if enabled.
    pub sparkplug: Option<Sparkplug>,
    pub buses: Vec<Bus>,
    pub devices: Vec<Device>,
    /// What works but is probably not meant: `check` prints these, `run` logs them.
    pub warnings: Vec<Diagnostic>,
}

/// `sparkplug:` in the config: the gateway as a Sparkplug B edge node.
#[derive(Debug, Clone, PartialEq)]
pub struct Sparkplug {
    pub group_id: String,
    pub edge_node_id: String,
    /// fieldgate's JSON topics are published too.
    pub json: bool,
}

/// `web:` in the config: the read-only status page.
#[derive(Debug, Clone, PartialEq)]
pub struct Web {
    pub listen: std::net::SocketAddr,
    /// HTTP basic auth password (any user name); None: no authentication.
    pub password: Option<Secret>,
}

/// `homeassistant:` in the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovery {
    /// Home Assistant's discovery prefix (default `homeassistant`).
    pub prefix: String,
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
        crate::topics::gateway_status(&self.id)
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
    pub protocol: Protocol,
}

/// The MQTT version the uplink speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Protocol {
    /// 3.1.1: every broker speaks it (the default).
    #[default]
    V311,
    /// 5: refused publishes seen as refused, the broker's limits known, topic aliases.
    V5,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::V311 => "3.1.1",
            Protocol::V5 => "5",
        })
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
    /// Computed points (`expr:`), each after the computed points it reads.
    pub computed: Vec<Computed>,
    /// `on_change: device`: a device message carries every point when any is due.
    pub whole_device_on_change: bool,
    /// MQTT 5 message expiry of this device's readings.
    pub message_expiry: Option<Duration>,
}

impl Device {
    /// The topic on which point `i` takes commands.
    pub fn set_topic(&self, i: usize) -> String {
        let p = &self.points[i];
        match self.publish {
            PublishMode::Point => crate::topics::point_set(&p.delivery.topic),
            PublishMode::Device => {
                crate::topics::device_point_set(&self.device_delivery.topic, &p.name)
            }
        }
    }
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

impl Config {
    /// Loads and validates the config file at `path` and every model it uses.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = ConfigErrors::read(path)?;
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
        let mut r = Resolver::new(env);
        r.errors = errors;
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
}
