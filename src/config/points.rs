//! One point as the YAML gives it, checked field by field: its register or field, type, order,
//! scaling, topic, QoS and command limits.

use std::time::Duration;

use super::diagnostic::{Ctx, Diagnostic};
use super::raw::*;
use crate::compute::Expr;
use crate::mapping::{DataType, Deadband, Delivery, Order, Point, Reporting, Source};
use crate::modbus::Table;
use crate::topics::template_error;

/// A point as validated from YAML, before a device's defaults are applied.
#[derive(Debug, Clone)]
pub(super) struct PointSpec {
    pub(super) name: String,
    pub(super) source: Source,
    pub(super) dtype: DataType,
    pub(super) order: Order,
    pub(super) bit: Option<u8>,
    pub(super) length: u16,
    pub(super) scale: Option<f64>,
    pub(super) offset: Option<f64>,
    pub(super) unit: Option<String>,
    pub(super) every: Option<Duration>,
    pub(super) topic: Option<String>,
    pub(super) payload: Option<PayloadFormat>,
    pub(super) qos: Option<u8>,
    pub(super) retain: Option<bool>,
    /// Serial line points: the parsed field.
    pub(super) field: Option<String>,
    pub(super) writable: bool,
    pub(super) min: Option<f64>,
    pub(super) max: Option<f64>,
    /// Defined in the device's model (errors about it name the model).
    pub(super) from_model: bool,
    /// A computed point's expression (names bound when the device is resolved).
    pub(super) expr: Option<Expr>,
    /// `type:` was given (a computed point without it takes its expression's kind).
    pub(super) dtype_given: bool,
    pub(super) on_change: Option<bool>,
    pub(super) deadband: Option<Deadband>,
    pub(super) heartbeat: Option<Duration>,
    pub(super) internal: bool,
}

/// What a point takes from its device unless it says otherwise.
pub(super) struct Defaults {
    pub(super) every: Duration,
    pub(super) qos: Option<u8>,
    pub(super) retain: Option<bool>,
    /// The device's report-by-exception settings (`on_change: device` counts as on).
    pub(super) on_change: Option<bool>,
    pub(super) deadband: Option<Deadband>,
    pub(super) heartbeat: Option<Duration>,
}

impl Defaults {
    /// A point's defaults when nothing is said: every second, QoS 1, published at every poll.
    pub(super) fn plain() -> Defaults {
        Defaults {
            every: Duration::from_secs(1),
            qos: None,
            retain: None,
            on_change: None,
            deadband: None,
            heartbeat: None,
        }
    }
}

impl PointSpec {
    /// What every point takes from its YAML as given; the rest as for the simplest point.
    fn new(name: &str, r: &RawPoint, source: Source, dtype: DataType) -> PointSpec {
        PointSpec {
            name: name.to_string(),
            source,
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
            field: None,
            from_model: false,
            writable: false,
            min: None,
            max: None,
            expr: None,
            dtype_given: r.dtype.is_some(),
            on_change: r.on_change,
            deadband: None,
            heartbeat: r.heartbeat,
            internal: r.internal.unwrap_or(false),
        }
    }

    /// The resolved point, published on `topic`, and its expression if it is computed (to be
    /// bound once the device's points are all known).
    pub(super) fn into_point(self, topic: String, defaults: &Defaults) -> (Point, Option<Expr>) {
        let point = Point {
            name: self.name,
            source: self.source,
            dtype: self.dtype,
            order: self.order,
            bit: self.bit,
            length: self.length,
            scale: self.scale,
            offset: self.offset,
            unit: self.unit,
            every: self.every.unwrap_or(defaults.every),
            delivery: Delivery {
                topic,
                qos: self.qos.or(defaults.qos).unwrap_or(1),
                retain: self.retain.or(defaults.retain).unwrap_or(false),
            },
            field: self.field,
            writable: self.writable,
            min: self.min,
            max: self.max,
            reporting: Reporting {
                on_change: self.on_change.or(defaults.on_change).unwrap_or(false),
                // A device's deadband is for its numbers; bools and text change or do not.
                deadband: self
                    .deadband
                    .or(defaults.deadband.filter(|_| self.dtype.is_numeric())),
                heartbeat: self.heartbeat.or(defaults.heartbeat),
            },
            computed: self.expr.is_some(),
            internal: self.internal,
        };
        (point, self.expr)
    }
}

/// Validates one point; every problem is pushed to `errors`.
pub(super) fn validate_point(
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
    // Where it is published: the same rules for register and field points.
    if let Some(t) = &r.topic
        && let Some(msg) = template_error(t)
    {
        err("topic", msg);
    }
    if let Some(msg) = r.qos.and_then(qos_error) {
        err("qos", msg);
    }
    let deadband = r.deadband.as_ref().and_then(|d| match parse_deadband(d) {
        Ok(d) => Some(d),
        Err(msg) => {
            err("deadband", msg);
            None
        }
    });
    if let Some(msg) = r.heartbeat.and_then(heartbeat_error) {
        err("heartbeat", msg);
    }
    if r.internal == Some(true) {
        not_applicable(
            &mut err,
            &[
                ("writable", r.writable == Some(true)),
                ("topic", r.topic.is_some()),
                ("payload", r.payload.is_some()),
                ("qos", r.qos.is_some()),
                ("retain", r.retain.is_some()),
                ("on_change", r.on_change.is_some()),
                ("deadband", r.deadband.is_some()),
                ("heartbeat", r.heartbeat.is_some()),
            ],
            "an internal point (read for computed points, never published)",
        );
    }

    if let Some(text) = &r.expr {
        // Computed from other points: nothing is read from a bus.
        let others = [
            ("field", r.field.is_some()),
            ("scale", r.scale.is_some()),
            ("offset", r.offset.is_some()),
            ("writable", r.writable == Some(true)),
            ("min", r.min.is_some()),
            ("max", r.max.is_some()),
            ("every", r.every.is_some()),
        ];
        not_applicable(
            &mut err,
            &[register_keys(r).as_slice(), &others].concat(),
            "a computed point (`expr:`; it is computed whenever its inputs are read)",
        );
        if r.dtype == Some(DataType::String) {
            err(
                "type",
                "an expression gives a number or a bool, not a string".into(),
            );
        }
        let expr = match Expr::parse(text) {
            Ok(e) => Some(e),
            Err(e) => {
                err("expr", format!("{e}: {text}"));
                None
            }
        };
        if deadband.is_some() && r.dtype == Some(DataType::Bool) {
            err("deadband", "a deadband applies to numbers, not bool".into());
        }
        if errors.len() != before {
            return None;
        }
        return Some(PointSpec {
            expr,
            deadband,
            ..PointSpec::new(
                name,
                r,
                Source {
                    table: Table::Holding,
                    address: 0,
                },
                r.dtype.unwrap_or(DataType::F64),
            )
        });
    }

    if let Some(field) = &r.field {
        // A field of a parsed text line: none of the register keys apply.
        not_applicable(
            &mut err,
            &[
                &[("writable", r.writable == Some(true))],
                register_keys(r).as_slice(),
            ]
            .concat(),
            "a `field:` point (a field of a text line)",
        );
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
        if deadband.is_some() && !dtype.is_numeric() {
            err(
                "deadband",
                format!("a deadband applies to numbers, not {}", type_name(dtype)),
            );
        }
        if errors.len() != before {
            return None;
        }
        return Some(PointSpec {
            field: Some(field.as_key()),
            deadband,
            // Not read from registers: the source is never used.
            ..PointSpec::new(
                name,
                r,
                Source {
                    table: Table::Holding,
                    address: 0,
                },
                dtype,
            )
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
        let what = if table == Table::Coil {
            "a coil (a single bit)"
        } else {
            "a discrete input (a single bit)"
        };
        not_applicable(
            &mut err,
            &[
                ("kind", r.kind.is_some()),
                ("order", r.order.is_some()),
                ("bit", r.bit.is_some()),
                ("length", r.length.is_some()),
                ("scale", r.scale.is_some()),
                ("offset", r.offset.is_some()),
            ],
            what,
        );
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
    if deadband.is_some() && !dtype.is_numeric() {
        err(
            "deadband",
            format!("a deadband applies to numbers, not {}", type_name(dtype)),
        );
    }
    if errors.len() != before {
        return None;
    }
    Some(PointSpec {
        deadband,
        order: r.order.unwrap_or_default(),
        bit,
        length,
        writable: r.writable.unwrap_or(false),
        min: r.min,
        max: r.max,
        ..PointSpec::new(
            name,
            r,
            Source {
                table,
                address: address as u16,
            },
            dtype,
        )
    })
}

pub(super) fn type_name(t: DataType) -> String {
    format!("{t:?}").to_lowercase()
}

/// The keys that place a point in a Modbus table, and whether each is given.
fn register_keys(r: &RawPoint) -> [(&'static str, bool); 7] {
    [
        ("register", r.register.is_some()),
        ("coil", r.coil.is_some()),
        ("discrete", r.discrete.is_some()),
        ("kind", r.kind.is_some()),
        ("order", r.order.is_some()),
        ("bit", r.bit.is_some()),
        ("length", r.length.is_some()),
    ]
}

/// Refuses each key that is given (`true`) but means nothing for `what`.
fn not_applicable(err: &mut impl FnMut(&str, String), keys: &[(&str, bool)], what: &str) {
    for (key, _) in keys.iter().filter(|(_, given)| *given) {
        err(key, format!("`{key}` does not apply to {what}"));
    }
}

/// `0.5` (engineering units) or `"2%"` (of the last published value); never negative.
pub(super) fn parse_deadband(d: &RawDeadband) -> Result<Deadband, String> {
    let bad = || {
        "a deadband is a number in the point's units (`0.5`) or a percentage of the last published value (`\"2%\"`)".to_string()
    };
    let (x, percent) = match d {
        RawDeadband::Number(x) => (*x, false),
        RawDeadband::Text(t) => match t.trim().strip_suffix('%') {
            Some(p) => (p.trim().parse::<f64>().map_err(|_| bad())?, true),
            None => (t.trim().parse::<f64>().map_err(|_| bad())?, false),
        },
    };
    if !x.is_finite() || x < 0.0 {
        return Err(format!("{x} is not a deadband: it must be 0 or more"));
    }
    Ok(if percent {
        Deadband::Percent(x)
    } else {
        Deadband::Absolute(x)
    })
}

/// A heartbeat of at least a second.
pub(super) fn heartbeat_error(h: Duration) -> Option<String> {
    (h < Duration::from_secs(1)).then(|| "a heartbeat must be at least 1s".to_string())
}

/// QoS 0, 1 or 2 only.
fn qos_error(q: u8) -> Option<String> {
    (q > 2).then(|| format!("QoS {q} does not exist (0, 1 or 2)"))
}

pub(super) fn check_qos(ctx: &Ctx, errors: &mut Vec<Diagnostic>, path: &str, q: u8) {
    if let Some(msg) = qos_error(q) {
        errors.push(ctx.diag(path, msg));
    }
}

pub(super) fn check_template(ctx: &Ctx, errors: &mut Vec<Diagnostic>, path: &str, t: &str) {
    if let Some(msg) = template_error(t) {
        errors.push(ctx.diag(path, msg));
    }
}

pub(super) fn check_topic_segment(
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

pub(super) fn check_topic_segment_with(err: &mut dyn FnMut(&str, String), name: &str, what: &str) {
    if name.is_empty() || name.contains(['/', '+', '#', '\0']) {
        err(
            "",
            format!("{what} `{name}` cannot be an MQTT topic level (no '/', '+', '#', not empty)"),
        );
    }
}
