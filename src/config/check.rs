//! What `fieldgate check` prints: the summary of a valid config with its read plan, and the
//! check of one device model file on its own.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::Config;
use super::diagnostic::ConfigErrors;
use super::resolver::Resolver;
use crate::mapping::Point;

/// A device model file checked on its own (`fieldgate check mappings/eastron-sdm120.yaml`).
#[derive(Debug, Clone)]
pub struct ModelSummary {
    pub path: PathBuf,
    pub name: String,
    pub description: Option<String>,
    pub points: Vec<Point>,
    /// Computed points: (point index, expression).
    pub computed: Vec<(usize, String)>,
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
        for (i, p) in self.points.iter().enumerate() {
            let what = match (&p.field, self.computed.iter().find(|(j, _)| *j == i)) {
                (_, Some((_, expr))) => format!("= {expr}"),
                (Some(f), _) => format!("field {f}"),
                (None, _) => format!("{} {}", p.source.table.name(), p.source.address),
            };
            let _ = writeln!(
                s,
                "  {:<24} {:<28} {:?}{}{}",
                p.name,
                what,
                p.dtype,
                p.unit
                    .as_deref()
                    .map(|u| format!(" [{u}]"))
                    .unwrap_or_default(),
                if p.internal {
                    " (internal: not published)"
                } else {
                    ""
                }
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
    let text = ConfigErrors::read(path)?;
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let env = |k: &str| std::env::var(k).ok();
    let mut r = Resolver::new(&env);
    let result = r.model_from_text(path, &text, &name);
    match result {
        Some((m, description)) if r.errors.is_empty() => Ok(ModelSummary {
            path: path.to_path_buf(),
            name,
            description,
            line: m.parser.is_some(),
            computed: m
                .computed
                .iter()
                .map(|c| (c.point, c.expr.source.clone()))
                .collect(),
            points: m.resolved,
        }),
        _ => Err(ConfigErrors(r.errors)),
    }
}

impl Config {
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
            "gateway {} → {}:{} (MQTT {}) as {}; queue in {}",
            self.gateway.id,
            self.mqtt.host,
            self.mqtt.port,
            self.mqtt.protocol,
            self.mqtt.client_id,
            self.gateway.state_dir.join("queue.db").display()
        );
        if let Some(sp) = &self.sparkplug {
            let devices: Vec<String> = self
                .devices
                .iter()
                .map(|d| {
                    let n = d.points.iter().filter(|p| !p.internal).count();
                    format!("{} ({n} metric{})", d.name, plural(n))
                })
                .collect();
            let _ = writeln!(
                s,
                "Sparkplug B: group {}, edge node {} (spBv1.0/{}/…/{}), {}; devices: {}",
                sp.group_id,
                sp.edge_node_id,
                sp.group_id,
                sp.edge_node_id,
                if sp.json {
                    "JSON topics too"
                } else {
                    "Sparkplug only"
                },
                devices.join(", ")
            );
        }
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
                    .filter(|p| !p.computed)
                    .map(|p| format!("{} ← {}", p.name, p.field.as_deref().unwrap_or("?")))
                    .collect();
                let _ = writeln!(s, "device {} on serial line {}: {how}", d.name, d.bus);
                let _ = writeln!(s, "  {}", fields.join(", "));
                device_extras(&mut s, d);
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
                        match (r.table.is_bits(), r.count) {
                            (true, 1) => "bit",
                            (true, _) => "bits",
                            (false, 1) => "register",
                            (false, _) => "registers",
                        },
                        names.join(", ")
                    );
                }
            }
            device_extras(&mut s, d);
        }
        s
    }
}

/// The computed points of a device and which points are reported by exception.
fn device_extras(s: &mut String, d: &super::Device) {
    use std::fmt::Write;
    for c in &d.computed {
        let p = &d.points[c.point];
        let _ = writeln!(
            s,
            "  computed {} = {}  ({})",
            p.name,
            c.expr.source,
            super::points::type_name(p.dtype)
        );
    }
    let by_exception: Vec<String> = d
        .points
        .iter()
        .filter(|p| p.reporting.on_change)
        .map(|p| {
            let r = &p.reporting;
            let mut how = Vec::new();
            match r.deadband {
                Some(crate::mapping::Deadband::Absolute(x)) => how.push(format!("±{x}")),
                Some(crate::mapping::Deadband::Percent(x)) => how.push(format!("±{x}%")),
                None => {}
            }
            if let Some(h) = r.heartbeat {
                how.push(format!("heartbeat {}", humantime::format_duration(h)));
            }
            if how.is_empty() {
                p.name.clone()
            } else {
                format!("{} ({})", p.name, how.join(", "))
            }
        })
        .collect();
    if !by_exception.is_empty() {
        let whole = if d.whole_device_on_change {
            "; a change sends the whole device"
        } else {
            ""
        };
        let _ = writeln!(
            s,
            "  on change{whole}: {} of {} points: {}",
            by_exception.len(),
            d.points.len(),
            by_exception.join(", ")
        );
    }
}

pub(super) fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}
