//! Resolution of the gateway, MQTT and queue sections, and the checks that span devices
//! (unique topics). Buses, devices and points each have a file of their own.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::diagnostic::Ctx;
use super::raw::*;
use super::resolver::{DeviceEnv, Resolver};
use super::{Config, Device, Gateway, Mqtt, Protocol, Queue, Secret, Web};
use crate::store::Limits;

impl Resolver<'_> {
    /// A password from a file (its first line, without the line end); an error names `key`.
    pub(super) fn read_secret(&mut self, ctx: &Ctx, key: &str, f: &Path) -> Option<Secret> {
        match std::fs::read_to_string(f) {
            Ok(s) => Some(Secret(s.trim_end_matches(['\n', '\r']).to_string())),
            Err(e) => {
                let why = match e.kind() {
                    std::io::ErrorKind::PermissionDenied => crate::files::permission_hint(f),
                    _ => e.to_string(),
                };
                self.errors
                    .push(ctx.diag(key, format!("cannot read {}: {why}", f.display())));
                None
            }
        }
    }

    /// `web:`, the status page: where it listens, and its password.
    pub(super) fn resolve_web(&mut self, ctx: &Ctx, base: &Path, w: &RawWeb) -> Web {
        let password = w
            .password_file
            .as_ref()
            .and_then(|f| self.read_secret(ctx, "web.password_file", &base.join(f)));
        if password.as_ref().is_some_and(|p| p.0.is_empty()) {
            self.errors
                .push(ctx.diag("web.password_file", "the password file is empty"));
        }
        if !w.listen.ip().is_loopback() && w.password_file.is_none() {
            self.warnings.push(ctx.diag(
                "web.listen",
                format!(
                    "the status page listens on {} without a password: anyone on that network sees every value (add `password_file:`, or listen on 127.0.0.1)",
                    w.listen
                ),
            ));
        }
        if let Some(user) = crate::files::user(&crate::files::service_user_name())
            && let Some(why) = w
                .password_file
                .as_ref()
                .and_then(|f| crate::files::unreadable_by(&base.join(f), &user))
        {
            self.warnings.push(ctx.diag("web.password_file", why));
        }
        Web {
            listen: w.listen,
            password,
        }
    }

    pub(super) fn resolve(
        &mut self,
        ctx: &Ctx,
        path: &Path,
        base: &Path,
        raw: RawConfig,
    ) -> Config {
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
        let web = raw.web.as_ref().map(|w| self.resolve_web(ctx, base, w));

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
        // A missing folder matters only to a device that names a model.
        let uses_models = raw.devices.values().any(|d| d.model.is_some());
        for (i, f) in folders.iter().enumerate() {
            if !f.is_dir() {
                let d = ctx.diag(
                    &format!("models[{i}]"),
                    format!(
                        "model folder {} does not exist (`{}` is relative to the config file's folder)",
                        std::path::absolute(f).unwrap_or_else(|_| f.clone()).display(),
                        raw.models[i]
                    ),
                );
                if uses_models {
                    self.errors.push(d);
                } else {
                    self.warnings.push(d);
                }
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
        if mqtt.protocol == Protocol::V311 {
            for d in devices.iter().filter(|d| d.message_expiry.is_some()) {
                self.warnings.push(ctx.diag(
                    &format!("devices.{}.message_expiry", d.name),
                    "message expiry is an MQTT 5 property: set `mqtt.protocol: 5` (under 3.1.1 it is not sent)",
                ));
            }
        }
        // Home Assistant reads each entity from every device message: one that carries only
        // the changed points leaves the others' templates without a value.
        if raw.homeassistant.as_ref().is_some_and(|h| h.discovery) {
            for d in &devices {
                if d.publish == PublishMode::Device
                    && !d.whole_device_on_change
                    && d.points.iter().any(|p| p.reporting.on_change)
                {
                    self.warnings.push(ctx.diag(
                        &format!("devices.{}.on_change", d.name),
                        "with `publish: device` and Home Assistant discovery, use `on_change: device`: a message with only the changed points leaves the other entities without a value",
                    ));
                }
            }
        }
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
        let sparkplug = raw.sparkplug.as_ref().map(|sp| {
            // Sparkplug ids are topic levels: no `/`, `+`, `#` (Sparkplug 3.0, 4.1.1).
            let edge = sp
                .edge_node_id
                .clone()
                .unwrap_or_else(|| gateway.id.clone());
            for (key, id) in [
                ("sparkplug.group_id", &sp.group_id),
                ("sparkplug.edge_node_id", &edge),
            ] {
                if id.is_empty() || id.contains(['/', '+', '#']) {
                    self.errors.push(ctx.diag(
                        key,
                        format!("{id:?} is not a Sparkplug id: not empty, no `/`, `+` or `#`"),
                    ));
                }
            }
            for d in &devices {
                if d.name.contains(['/', '+', '#']) {
                    self.errors.push(ctx.diag(
                        &format!("devices.{}", d.name),
                        "a Sparkplug device id has no `/`, `+` or `#`",
                    ));
                }
            }
            super::Sparkplug {
                group_id: sp.group_id.clone(),
                edge_node_id: edge,
                json: sp.json.unwrap_or(true),
            }
        });
        Config {
            sparkplug,
            path: path.to_path_buf(),
            gateway,
            mqtt,
            queue,
            metrics: raw.metrics.as_ref().map(|m| m.listen),
            web,
            homeassistant: raw.homeassistant.as_ref().filter(|h| h.discovery).map(|h| {
                super::Discovery {
                    prefix: h.prefix.clone().unwrap_or_else(|| "homeassistant".into()),
                }
            }),
            buses,
            devices,
            warnings: std::mem::take(&mut self.warnings),
        }
    }
}

impl Resolver<'_> {
    pub(super) fn resolve_queue(&mut self, ctx: &Ctx, q: &RawQueue) -> Queue {
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
        let commit_interval = q.commit_interval.unwrap_or(d.commit_interval);
        if commit_interval > Duration::from_secs(60) {
            self.errors.push(ctx.diag(
                "queue.commit_interval",
                "at most 60s: readings wait in memory this long, and a power cut loses them",
            ));
        }
        Queue {
            limits: Limits {
                max_messages,
                max_bytes,
                max_age: q.max_age.unwrap_or(d.max_age),
                when_full: q.when_full.unwrap_or(d.when_full),
                commit_interval,
            },
            replay_rate,
        }
    }

    pub(super) fn resolve_mqtt(
        &mut self,
        ctx: &Ctx,
        base: &Path,
        gateway: &Gateway,
        m: &RawMqtt,
    ) -> Mqtt {
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
        // Files the service reads as its own user: a key or password left `0600 root` passes a
        // `check` run with sudo and then fails in the service.
        let service_files = [
            ("mqtt.password_file", m.password_file.as_ref()),
            (
                "mqtt.tls.ca_file",
                m.tls.as_ref().and_then(|t| t.ca_file.as_ref()),
            ),
            (
                "mqtt.tls.cert_file",
                m.tls.as_ref().and_then(|t| t.cert_file.as_ref()),
            ),
            (
                "mqtt.tls.key_file",
                m.tls.as_ref().and_then(|t| t.key_file.as_ref()),
            ),
        ];
        if let Some(user) = crate::files::user(&crate::files::service_user_name()) {
            for (key, file) in service_files {
                if let Some(why) =
                    file.and_then(|f| crate::files::unreadable_by(&base.join(f), &user))
                {
                    self.warnings.push(ctx.diag(key, why));
                }
            }
        }
        let password = match (&m.password, &m.password_file) {
            (Some(_), Some(_)) => {
                self.errors.push(ctx.diag(
                    "mqtt.password_file",
                    "give either password or password_file, not both",
                ));
                None
            }
            (Some(p), None) => Some(Secret(p.clone())),
            (None, Some(f)) => self.read_secret(ctx, "mqtt.password_file", &base.join(f)),
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
        let protocol = match &m.protocol {
            None => Protocol::V311,
            Some(RawProtocol::Number(5)) => Protocol::V5,
            Some(RawProtocol::Float(f)) if *f == 5.0 => Protocol::V5,
            Some(RawProtocol::Text(t)) if t.trim() == "5" || t.trim() == "5.0" => Protocol::V5,
            Some(RawProtocol::Text(t)) if t.trim() == "3.1.1" => Protocol::V311,
            Some(other) => {
                let shown = match other {
                    RawProtocol::Number(n) => n.to_string(),
                    RawProtocol::Float(f) => f.to_string(),
                    RawProtocol::Text(t) => format!("{t:?}"),
                };
                self.errors.push(ctx.diag(
                    "mqtt.protocol",
                    format!("unknown MQTT version {shown}: expected 3.1.1 or 5"),
                ));
                Protocol::V311
            }
        };
        // rumqttc's MQTT 5 client takes no keep-alive under 5 s (it would panic).
        let keep_alive = if protocol == Protocol::V5 && keep_alive < Duration::from_secs(5) {
            if m.keep_alive.is_some() {
                self.warnings.push(ctx.diag(
                    "mqtt.keep_alive",
                    "under MQTT 5 the keep-alive is at least 5s; 5s is used",
                ));
            }
            Duration::from_secs(5)
        } else {
            keep_alive
        };
        Mqtt {
            protocol,
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
    pub(super) fn check_topics_unique(&mut self, ctx: &Ctx, devices: &[Device]) {
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
}

/// `mqtt://host[:port]`; `tcp://` is accepted as a synonym.
pub(super) fn parse_mqtt_url(url: &str) -> Result<(String, u16, bool), String> {
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
pub(super) fn parse_bytes(t: &str) -> Result<u64, String> {
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
pub(super) fn tidy_path(p: &Path) -> PathBuf {
    p.components()
        .filter(|c| !matches!(c, std::path::Component::CurDir))
        .collect()
}

pub(super) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "fieldgate".into())
}
