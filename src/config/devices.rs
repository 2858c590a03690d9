//! `devices:` and the device models they name: each device's points (its own and its model's),
//! topics, serial line parsing, and the read plan of every poll group.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::computed::{self, Unbound};
use super::diagnostic::{Ctx, Diagnostic, closest, parse};
use super::points::{
    Defaults, PointSpec, check_qos, check_template, check_topic_segment, heartbeat_error,
    parse_deadband, validate_point,
};
use super::raw::*;
use super::resolver::{DeviceEnv, ModelDef, Resolver};
use super::{Device, LineSpec, PollGroup};
use crate::bus::{Bus, Transport};
use crate::mapping::Delivery;
use crate::plan::plan;
use crate::topics::render_topic;

/// Builds the parser of `parse: …`; errors name `path`.
pub(super) fn build_parser(
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

impl Resolver<'_> {
    pub(super) fn resolve_device(
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
        if let Some(e) = d.message_expiry
            && (e < Duration::from_secs(1) || e.as_secs() > u32::MAX as u64)
        {
            self.errors.push(ctx.diag(
                &format!("{p}.message_expiry"),
                "must be between 1s and 136 years (whole seconds on the wire)",
            ));
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
            PublishMode::Point => crate::topics::POINT_TEMPLATE.into(),
            PublishMode::Device => crate::topics::DEVICE_TEMPLATE.into(),
        });
        if publish == PublishMode::Device
            && (device_topic.contains("{point}") || device_topic.contains("{unit}"))
        {
            self.errors.push(ctx.diag(
                &format!("{p}.topic"),
                "with `publish: device` the topic is per device: {point} and {unit} cannot be used",
            ));
        }
        // Report by exception: the device's settings, and points that set a deadband or a
        // heartbeat that nothing would use.
        let device_on_change = d.on_change.map(|o| !matches!(o, RawOnChange::Flag(false)));
        let deadband = d.deadband.as_ref().and_then(|db| match parse_deadband(db) {
            Ok(db) => Some(db),
            Err(msg) => {
                self.errors.push(ctx.diag(&format!("{p}.deadband"), msg));
                None
            }
        });
        if let Some(msg) = d.heartbeat.and_then(heartbeat_error) {
            self.errors.push(ctx.diag(&format!("{p}.heartbeat"), msg));
        }
        let any_on_change = specs
            .values()
            .any(|s| s.on_change.or(device_on_change).unwrap_or(false));
        for (key, set) in [
            ("deadband", d.deadband.is_some()),
            ("heartbeat", d.heartbeat.is_some()),
        ] {
            if set && !any_on_change {
                self.errors.push(ctx.diag(
                    &format!("{p}.{key}"),
                    format!(
                        "`{key}` applies to points reported by exception: add `on_change: true`"
                    ),
                ));
            }
        }
        for s in specs.values().filter(|s| !s.from_model) {
            if s.on_change.or(device_on_change).unwrap_or(false) {
                continue;
            }
            for (key, set) in [
                ("deadband", s.deadband.is_some()),
                ("heartbeat", s.heartbeat.is_some()),
            ] {
                if set {
                    self.errors.push(ctx.diag(
                        &format!("{p}.points.{}.{key}", s.name),
                        format!("`{key}` applies to points reported by exception: add `on_change: true` here or on the device"),
                    ));
                }
            }
        }

        let mut points = Vec::new();
        let mut payload = HashMap::new();
        let mut unbound = Vec::new();
        let defaults = Defaults {
            every,
            qos: d.qos,
            retain: d.retain,
            on_change: device_on_change,
            deadband,
            heartbeat: d.heartbeat,
        };
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
            let (from_model, dtype_given) = (s.from_model, s.dtype_given);
            let (point, expr) = s.into_point(topic, &defaults);
            if let Some(expr) = expr {
                unbound.push(Unbound {
                    point: points.len(),
                    path: if from_model {
                        format!("{p}.model")
                    } else {
                        format!("{p}.points.{}.expr", point.name)
                    },
                    expr,
                    from_model,
                    dtype_given,
                });
            }
            points.push(point);
        }
        if self.errors.len() != before {
            return None;
        }
        let computed = computed::bind(ctx, &mut self.errors, &mut points, unbound, line.is_none());
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
        for (i, pt) in points.iter().enumerate().filter(|(_, p)| !p.computed) {
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
            availability_topic: crate::topics::device_availability(&gateway.id, name),
            offline_after: offline_after.max(1),
            line,
            computed,
            whole_device_on_change: d.on_change == Some(RawOnChange::Mode(OnChangeMode::Device)),
            message_expiry: d.message_expiry,
        })
    }

    /// The serial line part of a device: its parser, request and interval, and the checks that
    /// tie its points to what the parser produces. None for a Modbus device.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn resolve_line(
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
                for s in specs.values().filter(|s| s.expr.is_none()) {
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
    pub(super) fn load_model(
        &mut self,
        ctx: &Ctx,
        folders: &[PathBuf],
        path: &str,
        model: &str,
    ) -> Option<ModelDef> {
        // `eastron-sdm120` and `eastron-sdm120.yaml` name the same model.
        let model = model
            .strip_suffix(".yaml")
            .or_else(|| model.strip_suffix(".yml"))
            .unwrap_or(model);
        if let Some(cached) = self.models.get(model) {
            return cached.clone();
        }
        let file = folders
            .iter()
            .map(|f| f.join(format!("{model}.yaml")))
            .find(|f| f.is_file());
        let Some(file) = file else {
            let message = if folders.is_empty() {
                format!(
                    "unknown model `{model}`: no model folders are configured (add `models: [/usr/share/fieldgate/mappings]`)"
                )
            } else {
                let searched: Vec<String> =
                    folders.iter().map(|f| f.display().to_string()).collect();
                let known = available_models(folders);
                let hint = match closest(model, &known) {
                    Some(m) => format!("; did you mean `{m}`?"),
                    None => String::new(),
                };
                format!(
                    "unknown model `{model}`: no {model}.yaml in {}{hint} (available: {})",
                    searched.join(", "),
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                )
            };
            self.errors.push(ctx.diag(path, message));
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
    pub(super) fn model_from_text(
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
                // The computed points of the model, bound on their own: names, kinds, cycles
                // and intervals are the model's errors, at its lines.
                let mut points = Vec::new();
                let mut computed = Vec::new();
                if self.errors.len() == before {
                    let mut unbound = Vec::new();
                    for s in &specs {
                        let dtype_given = s.dtype_given;
                        let (point, expr) = s.clone().into_point(String::new(), &Defaults::plain());
                        if let Some(expr) = expr {
                            unbound.push(Unbound {
                                point: points.len(),
                                path: format!("points.{}.expr", point.name),
                                expr,
                                from_model: false,
                                dtype_given,
                            });
                        }
                        points.push(point);
                    }
                    computed = computed::bind(
                        &mctx,
                        &mut self.errors,
                        &mut points,
                        unbound,
                        raw.parse.is_none(),
                    );
                }
                let parser = raw
                    .parse
                    .as_ref()
                    .and_then(|spec| build_parser(&mctx, &mut self.errors, "parse", spec));
                (self.errors.len() == before).then_some((
                    ModelDef {
                        points: specs,
                        resolved: points,
                        computed,
                        parser,
                        request: raw.request.clone(),
                    },
                    raw.description.clone(),
                ))
            }
        }
    }
}

pub(super) fn list_or_none(items: &[&str]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

/// The models in `folders`: every `*.yaml` that is a device model (not a whole config), by name.
fn available_models(folders: &[PathBuf]) -> Vec<String> {
    let mut names: Vec<String> = folders
        .iter()
        .filter_map(|f| std::fs::read_dir(f).ok())
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .filter(|p| std::fs::read_to_string(p).is_ok_and(|t| super::check::is_model_text(&t)))
        .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .collect();
    names.sort();
    names.dedup();
    names
}
