//! Computed points of one device (`expr:`): their names bound to the device's points, their
//! kinds checked, cycles refused, and the interval they are computed at.

use std::collections::HashMap;

use super::diagnostic::closest;
use super::diagnostic::{Ctx, Diagnostic};
use crate::compute::{Expr, Kind};
use crate::mapping::{DataType, Point};

/// A computed point of a device: which point, and its bound expression.
#[derive(Debug, Clone, PartialEq)]
pub struct Computed {
    pub point: usize,
    pub expr: Expr,
    /// The points it reads (bound once; a poll that read none of them does not compute it).
    pub inputs: Vec<usize>,
}

/// A computed point as the device's points give it, before binding.
pub(super) struct Unbound {
    pub(super) point: usize,
    pub(super) expr: Expr,
    /// Where errors about it are reported.
    pub(super) path: String,
    pub(super) from_model: bool,
    pub(super) dtype_given: bool,
}

fn unknown(point: &str, name: &str, col: usize, names: &[String]) -> Option<String> {
    if name == point {
        return Some(format!(
            "`{point}` cannot be computed from itself (column {col} of the expression)"
        ));
    }
    if names.iter().any(|n| n == name) {
        return None;
    }
    let hint = match closest(name, names) {
        Some(c) => format!("; did you mean `{c}`?"),
        None => format!("; the points are: {}", names.join(", ")),
    };
    Some(format!(
        "unknown name `{name}` at column {col} of the expression: not a point of this device{hint}"
    ))
}

/// Binds the computed points of a device in an order where each comes after its inputs, sets
/// their type (the expression's kind unless `type:` says otherwise) and, on a polled device,
/// their interval: that of their inputs, which must agree.
pub(super) fn bind(
    ctx: &Ctx,
    errors: &mut Vec<Diagnostic>,
    points: &mut [Point],
    unbound: Vec<Unbound>,
    polled: bool,
) -> Vec<Computed> {
    let before = errors.len();
    let names: Vec<String> = points.iter().map(|p| p.name.clone()).collect();
    let index: HashMap<&str, usize> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i))
        .collect();
    let at = |u: &Unbound, msg: String| {
        let msg = if u.from_model {
            format!("point `{}` of the model: {msg}", names[u.point])
        } else {
            msg
        };
        ctx.diag(&u.path, msg)
    };
    // A computed point naming what is not there is reported and left out; the rest go on, so
    // that one `check` shows every problem.
    let mut unbound = unbound;
    unbound.retain(|u| {
        let mut ok = true;
        for (name, col) in u.expr.names() {
            if let Some(msg) = unknown(&names[u.point], name, col, &names) {
                errors.push(at(u, msg));
                ok = false;
            }
        }
        ok
    });

    // Order: inputs first; a cycle is an error naming it.
    let by_point: HashMap<usize, usize> = unbound
        .iter()
        .enumerate()
        .map(|(k, u)| (u.point, k))
        .collect();
    let deps: Vec<Vec<usize>> = unbound
        .iter()
        .map(|u| {
            u.expr
                .names()
                .iter()
                .filter_map(|(n, _)| by_point.get(&index[n]).copied())
                .collect()
        })
        .collect();
    let mut order = Vec::new();
    let mut state = vec![0u8; unbound.len()]; // 0 new, 1 on the path, 2 done
    let mut reported = false;
    for start in 0..unbound.len() {
        let mut path = Vec::new();
        if let Err(cycle) = visit(start, &deps, &mut state, &mut order, &mut path)
            && !reported
        {
            reported = true;
            let names: Vec<&str> = cycle
                .iter()
                .map(|&k| names[unbound[k].point].as_str())
                .collect();
            errors.push(at(
                &unbound[cycle[0]],
                format!(
                    "computed points cannot depend on each other in a circle: {}",
                    names.join(" → ")
                ),
            ));
        }
    }

    let mut kinds: Vec<Option<Kind>> = points.iter().map(|p| Kind::of(p.dtype)).collect();
    let mut unbound: Vec<Option<Unbound>> = unbound.into_iter().map(Some).collect();
    let mut out = Vec::new();
    for k in order {
        let mut u = unbound[k].take().expect("each once");
        let i = u.point;
        let kind = match u.expr.bind(&|n| index.get(n).copied(), &|j| kinds[j]) {
            Ok(kind) => kind,
            Err(e) => {
                errors.push(at(&u, format!("{e}: {}", u.expr.source)));
                continue;
            }
        };
        let p = &mut points[i];
        if !u.dtype_given {
            p.dtype = if kind == Kind::Bool {
                DataType::Bool
            } else {
                DataType::F64
            };
        } else if Kind::of(p.dtype) != Some(kind) {
            errors.push(at(
                &u,
                format!(
                    "the expression gives {kind} but the point's type is {}",
                    super::points::type_name(p.dtype)
                ),
            ));
            continue;
        }
        if kind == Kind::Bool {
            // A device's deadband is for numbers; a bool changes or does not.
            p.reporting.deadband = None;
        }
        kinds[i] = Some(kind);
        let inputs = u.expr.inputs();
        if inputs.is_empty() {
            errors.push(at(
                &u,
                "the expression reads no point; a computed point is computed when its inputs are read".into(),
            ));
            continue;
        }
        if polled {
            let mut intervals: Vec<(std::time::Duration, &str)> = inputs
                .iter()
                .map(|&j| (points[j].every, points[j].name.as_str()))
                .collect();
            intervals.sort();
            intervals.dedup_by_key(|(e, _)| *e);
            if intervals.len() > 1 {
                let list: Vec<String> = intervals
                    .iter()
                    .map(|(e, n)| format!("`{n}` every {}", humantime::format_duration(*e)))
                    .collect();
                errors.push(at(
                    &u,
                    format!(
                        "its inputs are polled at different intervals ({}); a computed point reads the inputs of one poll: give them the same `every`",
                        list.join(", ")
                    ),
                ));
                continue;
            }
            let every = intervals[0].0;
            points[i].every = every;
        }
        u.path.clear();
        out.push(Computed {
            point: i,
            expr: u.expr,
            inputs,
        });
    }
    if errors.len() != before {
        return Vec::new();
    }
    out
}

/// Depth-first: pushes `k` after everything it depends on; Err(the cycle) on a circle.
fn visit(
    k: usize,
    deps: &[Vec<usize>],
    state: &mut [u8],
    order: &mut Vec<usize>,
    path: &mut Vec<usize>,
) -> Result<(), Vec<usize>> {
    match state[k] {
        2 => return Ok(()),
        1 => {
            let from = path.iter().position(|&x| x == k).unwrap_or(0);
            let mut cycle = path[from..].to_vec();
            cycle.push(k);
            return Err(cycle);
        }
        _ => {}
    }
    state[k] = 1;
    path.push(k);
    for &d in &deps[k] {
        visit(d, deps, state, order, path)?;
    }
    path.pop();
    state[k] = 2;
    order.push(k);
    Ok(())
}
