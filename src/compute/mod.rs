//! Computed points: the small expression language of `expr:` and its evaluation.
//!
//! This module owns the grammar, the checks `fieldgate check` reports (unknown names, types,
//! cycles are found by `config`, which knows the device) and the evaluation of a bound
//! expression over one poll's values. It does no I/O and knows nothing of buses or MQTT.
//!
//! ```text
//! expr   := or
//! or     := and ('||' and)*
//! and    := cmp ('&&' cmp)*
//! cmp    := sum (('==' | '!=' | '<' | '<=' | '>' | '>=') sum)?
//! sum    := term (('+' | '-') term)*
//! term   := unary (('*' | '/' | '%') unary)*
//! unary  := ('-' | '!') unary | power
//! power  := atom ('^' unary)?                      right-associative: 2^3^2 = 2^9
//! atom   := number | true | false | name | name '(' expr (',' expr)* ')' | '(' expr ')'
//! ```
//!
//! Functions: `min(a, b, …)`, `max(a, b, …)`, `abs(x)`, `pow(x, y)`, `sqrt(x)`, `round(x)`,
//! `if(condition, a, b)`. A SunSpec scale factor is `value * 10^sf`.
//!
//! Why our own grammar and not an expression crate: names are point indices bound once at load
//! (no lookup by name at each poll), every name and type is checked before the gateway runs,
//! and the errors can say which column of the expression is wrong. The language is small on
//! purpose: numbers (as f64) and bools, no strings, no assignment, no loops.
//!
//! At run time nothing panics: a missing or `null` input, a division by zero or a result that
//! is not a finite number gives `null`.

use std::fmt;

use crate::mapping::{DataType, Value};

mod grammar;
use grammar::{Parser, lex};

/// The two kinds of values an expression works with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Number,
    Bool,
}

impl Kind {
    /// The kind of a point of type `t`; None for strings (which expressions do not take).
    pub fn of(t: DataType) -> Option<Kind> {
        match t {
            DataType::Bool => Some(Kind::Bool),
            DataType::String => None,
            _ => Some(Kind::Number),
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Number => "a number",
            Kind::Bool => "a bool",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
    Pow,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    And,
    Or,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Func {
    Min,
    Max,
    Abs,
    Pow,
    Sqrt,
    Round,
    If,
}

impl Func {
    fn by_name(name: &str) -> Option<Func> {
        Some(match name {
            "min" => Func::Min,
            "max" => Func::Max,
            "abs" => Func::Abs,
            "pow" => Func::Pow,
            "sqrt" => Func::Sqrt,
            "round" => Func::Round,
            "if" => Func::If,
            _ => return None,
        })
    }

    /// Allowed argument counts.
    fn arity(self) -> (usize, usize) {
        match self {
            Func::Min | Func::Max => (1, usize::MAX),
            Func::Abs | Func::Sqrt | Func::Round => (1, 1),
            Func::Pow => (2, 2),
            Func::If => (3, 3),
        }
    }
}

/// A node of an expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    Number(f64),
    Bool(bool),
    /// A name as written, before [`Expr::bind`]; `col` is its 1-based column.
    Name {
        name: String,
        col: usize,
    },
    /// A bound name: the index of the point it reads.
    Input(usize),
    Neg(Box<Node>),
    Not(Box<Node>),
    Binary(BinOp, Box<Node>, Box<Node>),
    Call(Func, Vec<Node>),
}

/// A parsed expression.
#[derive(Debug, Clone, PartialEq)]
pub struct Expr {
    pub source: String,
    root: Node,
}

/// What is wrong with an expression, at a 1-based column of its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExprError {
    pub col: usize,
    pub message: String,
}

impl fmt::Display for ExprError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (at column {} of the expression)",
            self.message, self.col
        )
    }
}

fn error<T>(col: usize, message: impl Into<String>) -> Result<T, ExprError> {
    Err(ExprError {
        col,
        message: message.into(),
    })
}

impl Expr {
    /// Parses `text`; the names in it are bound later with [`Expr::bind`].
    pub fn parse(text: &str) -> Result<Expr, ExprError> {
        let toks = lex(text)?;
        if toks.is_empty() {
            return error(1, "the expression is empty");
        }
        let mut p = Parser {
            toks,
            pos: 0,
            end_col: text.chars().count() + 1,
        };
        let root = p.or()?;
        if p.pos < p.toks.len() {
            return error(p.col(), "unexpected text after the end of the expression");
        }
        Ok(Expr {
            source: text.to_string(),
            root,
        })
    }

    /// The names the expression reads, each once, in order of appearance, with its column.
    pub fn names(&self) -> Vec<(&str, usize)> {
        fn walk<'a>(n: &'a Node, out: &mut Vec<(&'a str, usize)>) {
            match n {
                Node::Name { name, col } => {
                    if !out.iter().any(|(m, _)| *m == name) {
                        out.push((name, *col));
                    }
                }
                Node::Neg(a) | Node::Not(a) => walk(a, out),
                Node::Binary(_, a, b) => {
                    walk(a, out);
                    walk(b, out);
                }
                Node::Call(_, args) => args.iter().for_each(|a| walk(a, out)),
                Node::Number(_) | Node::Bool(_) | Node::Input(_) => {}
            }
        }
        let mut out = Vec::new();
        walk(&self.root, &mut out);
        out
    }

    /// Replaces every name by the index `lookup` gives it and checks the kinds: `kind_of` says
    /// what each index holds. Returns the kind of the result.
    pub fn bind(
        &mut self,
        lookup: &dyn Fn(&str) -> Option<usize>,
        kind_of: &dyn Fn(usize) -> Option<Kind>,
    ) -> Result<Kind, ExprError> {
        fn bind_node(
            n: &mut Node,
            lookup: &dyn Fn(&str) -> Option<usize>,
            kind_of: &dyn Fn(usize) -> Option<Kind>,
        ) -> Result<(Kind, usize), ExprError> {
            // Returns the kind and the column where the node starts (for messages).
            match n {
                Node::Number(_) => Ok((Kind::Number, 0)),
                Node::Bool(_) => Ok((Kind::Bool, 0)),
                Node::Input(i) => Ok((kind_of(*i).unwrap_or(Kind::Number), 0)),
                Node::Name { name, col } => {
                    let col = *col;
                    let Some(i) = lookup(name) else {
                        return error(col, format!("unknown name `{name}`"));
                    };
                    let Some(kind) = kind_of(i) else {
                        return error(
                            col,
                            format!("`{name}` is a string; expressions take numbers and bools"),
                        );
                    };
                    *n = Node::Input(i);
                    Ok((kind, col))
                }
                Node::Neg(a) => {
                    let (k, col) = bind_node(a, lookup, kind_of)?;
                    expect(k, Kind::Number, col, "`-`")?;
                    Ok((Kind::Number, col))
                }
                Node::Not(a) => {
                    let (k, col) = bind_node(a, lookup, kind_of)?;
                    expect(k, Kind::Bool, col, "`!`")?;
                    Ok((Kind::Bool, col))
                }
                Node::Binary(op, a, b) => {
                    let (ka, ca) = bind_node(a, lookup, kind_of)?;
                    let (kb, cb) = bind_node(b, lookup, kind_of)?;
                    let what = format!("`{}`", op_text(*op));
                    match op {
                        BinOp::And | BinOp::Or => {
                            expect(ka, Kind::Bool, ca, &what)?;
                            expect(kb, Kind::Bool, cb, &what)?;
                            Ok((Kind::Bool, ca))
                        }
                        BinOp::Eq | BinOp::Ne => {
                            if ka != kb {
                                return error(
                                    cb,
                                    format!(
                                        "{what} compares {ka} with {kb}; both sides must be of one kind"
                                    ),
                                );
                            }
                            Ok((Kind::Bool, ca))
                        }
                        BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge => {
                            expect(ka, Kind::Number, ca, &what)?;
                            expect(kb, Kind::Number, cb, &what)?;
                            Ok((Kind::Bool, ca))
                        }
                        _ => {
                            expect(ka, Kind::Number, ca, &what)?;
                            expect(kb, Kind::Number, cb, &what)?;
                            Ok((Kind::Number, ca))
                        }
                    }
                }
                Node::Call(f, args) => {
                    let mut kinds = Vec::with_capacity(args.len());
                    for a in args.iter_mut() {
                        kinds.push(bind_node(a, lookup, kind_of)?);
                    }
                    if *f == Func::If {
                        expect(kinds[0].0, Kind::Bool, kinds[0].1, "the condition of `if`")?;
                        if kinds[1].0 != kinds[2].0 {
                            return error(
                                kinds[2].1,
                                format!(
                                    "`if` gives {} or {}; both branches must be of one kind",
                                    kinds[1].0, kinds[2].0
                                ),
                            );
                        }
                        return Ok((kinds[1].0, kinds[0].1));
                    }
                    for (k, col) in &kinds {
                        expect(*k, Kind::Number, *col, &format!("`{}`", func_name(*f)))?;
                    }
                    Ok((Kind::Number, kinds[0].1))
                }
            }
        }
        fn expect(got: Kind, want: Kind, col: usize, what: &str) -> Result<(), ExprError> {
            if got == want {
                Ok(())
            } else {
                error(col.max(1), format!("{what} takes {want}, not {got}"))
            }
        }
        bind_node(&mut self.root, lookup, kind_of).map(|(k, _)| k)
    }

    /// The point indices the bound expression reads.
    pub fn inputs(&self) -> Vec<usize> {
        fn walk(n: &Node, out: &mut Vec<usize>) {
            match n {
                Node::Input(i) if !out.contains(i) => out.push(*i),
                Node::Neg(a) | Node::Not(a) => walk(a, out),
                Node::Binary(_, a, b) => {
                    walk(a, out);
                    walk(b, out);
                }
                Node::Call(_, args) => args.iter().for_each(|a| walk(a, out)),
                _ => {}
            }
        }
        let mut out = Vec::new();
        walk(&self.root, &mut out);
        out
    }

    /// Evaluates the bound expression; `input(i)` is point `i`'s value in this poll (None when
    /// it was not read). Any missing or `null` input, a division by zero or a result that is not
    /// finite gives [`Value::Null`].
    pub fn eval(&self, input: &dyn Fn(usize) -> Option<Value>) -> Value {
        match eval(&self.root, input) {
            Some(V::Num(x)) if x.is_finite() => Value::Float(x),
            Some(V::Bool(b)) => Value::Bool(b),
            _ => Value::Null,
        }
    }
}

/// A computed value as a point of type `t` publishes it: integers rounded to the nearest (null
/// when out of the type's range), f32 as its shortest decimal, bools as they are.
pub fn as_type(v: Value, t: DataType) -> Value {
    let Value::Float(x) = v else {
        return v;
    };
    let (lo, hi) = match t {
        DataType::F64 => return Value::Float(x),
        DataType::F32 => return Value::Float(crate::mapping::f32_as_f64(x as f32)),
        DataType::U16 => (0.0, u16::MAX as f64),
        DataType::U32 => (0.0, u32::MAX as f64),
        DataType::U64 => (0.0, u64::MAX as f64),
        DataType::I16 => (i16::MIN as f64, i16::MAX as f64),
        DataType::I32 => (i32::MIN as f64, i32::MAX as f64),
        DataType::I64 => (i64::MIN as f64, i64::MAX as f64),
        DataType::Bool | DataType::String => return Value::Null,
    };
    let r = x.round();
    if r < lo || r > hi {
        Value::Null
    } else if lo < 0.0 {
        Value::Int(r as i64)
    } else {
        Value::UInt(r as u64)
    }
}

/// A value inside an evaluation.
#[derive(Debug, Clone, Copy)]
enum V {
    Num(f64),
    Bool(bool),
}

impl V {
    fn num(self) -> Option<f64> {
        match self {
            V::Num(x) if x.is_finite() => Some(x),
            _ => None,
        }
    }
    fn bool(self) -> Option<bool> {
        match self {
            V::Bool(b) => Some(b),
            V::Num(_) => None,
        }
    }
}

fn eval(n: &Node, input: &dyn Fn(usize) -> Option<Value>) -> Option<V> {
    Some(match n {
        Node::Number(x) => V::Num(*x),
        Node::Bool(b) => V::Bool(*b),
        Node::Name { .. } => return None,
        Node::Input(i) => match input(*i)? {
            Value::Bool(b) => V::Bool(b),
            Value::Int(x) => V::Num(x as f64),
            Value::UInt(x) => V::Num(x as f64),
            Value::Float(x) => V::Num(x),
            Value::Null | Value::Text(_) => return None,
        },
        Node::Neg(a) => V::Num(-eval(a, input)?.num()?),
        Node::Not(a) => V::Bool(!eval(a, input)?.bool()?),
        Node::Binary(op, a, b) => {
            let a = eval(a, input)?;
            // `&&` and `||` look at the right side only when they need it.
            match op {
                BinOp::And => return Some(V::Bool(a.bool()? && eval(b, input)?.bool()?)),
                BinOp::Or => return Some(V::Bool(a.bool()? || eval(b, input)?.bool()?)),
                _ => {}
            }
            let b = eval(b, input)?;
            if let (BinOp::Eq | BinOp::Ne, V::Bool(x), V::Bool(y)) = (op, a, b) {
                return Some(V::Bool((x == y) == (*op == BinOp::Eq)));
            }
            let (x, y) = (a.num()?, b.num()?);
            match op {
                BinOp::Add => V::Num(x + y),
                BinOp::Sub => V::Num(x - y),
                BinOp::Mul => V::Num(x * y),
                BinOp::Div if y == 0.0 => return None,
                BinOp::Div => V::Num(x / y),
                BinOp::Rem if y == 0.0 => return None,
                BinOp::Rem => V::Num(x % y),
                BinOp::Pow => V::Num(power(x, y)),
                BinOp::Eq => V::Bool(x == y),
                BinOp::Ne => V::Bool(x != y),
                BinOp::Lt => V::Bool(x < y),
                BinOp::Le => V::Bool(x <= y),
                BinOp::Gt => V::Bool(x > y),
                BinOp::Ge => V::Bool(x >= y),
                BinOp::And | BinOp::Or => unreachable!("handled above"),
            }
        }
        Node::Call(Func::If, args) => {
            if eval(&args[0], input)?.bool()? {
                eval(&args[1], input)?
            } else {
                eval(&args[2], input)?
            }
        }
        Node::Call(f, args) => {
            let mut xs = Vec::with_capacity(args.len());
            for a in args {
                xs.push(eval(a, input)?.num()?);
            }
            V::Num(match f {
                Func::Min => xs.iter().copied().fold(f64::INFINITY, f64::min),
                Func::Max => xs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                Func::Abs => xs[0].abs(),
                Func::Pow => power(xs[0], xs[1]),
                Func::Sqrt if xs[0] < 0.0 => return None,
                Func::Sqrt => xs[0].sqrt(),
                Func::Round => xs[0].round(),
                Func::If => unreachable!("handled above"),
            })
        }
    })
}

/// `x^y`; exact for the integer powers of ten a scale factor makes (`10^-2` is 0.01, not
/// 0.010000000000000002).
fn power(x: f64, y: f64) -> f64 {
    if x == 10.0 && y.fract() == 0.0 && y.abs() <= 22.0 {
        let p = 10f64.powi(y.abs() as i32); // exact up to 10^22
        return if y < 0.0 { 1.0 / p } else { p };
    }
    x.powf(y)
}

fn op_text(op: BinOp) -> &'static str {
    match op {
        BinOp::Add => "+",
        BinOp::Sub => "-",
        BinOp::Mul => "*",
        BinOp::Div => "/",
        BinOp::Rem => "%",
        BinOp::Pow => "^",
        BinOp::Eq => "==",
        BinOp::Ne => "!=",
        BinOp::Lt => "<",
        BinOp::Le => "<=",
        BinOp::Gt => ">",
        BinOp::Ge => ">=",
        BinOp::And => "&&",
        BinOp::Or => "||",
    }
}

fn func_name(f: Func) -> &'static str {
    match f {
        Func::Min => "min",
        Func::Max => "max",
        Func::Abs => "abs",
        Func::Pow => "pow",
        Func::Sqrt => "sqrt",
        Func::Round => "round",
        Func::If => "if",
    }
}

#[cfg(test)]
mod tests;
