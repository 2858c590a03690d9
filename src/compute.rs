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

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Num(f64),
    Ident(String),
    Op(&'static str),
    Open,
    Close,
    Comma,
}

fn lex(text: &str) -> Result<Vec<(Tok, usize)>, ExprError> {
    const OPS: [&str; 17] = [
        "==", "!=", "<=", ">=", "&&", "||", "+", "-", "*", "/", "%", "^", "<", ">", "!", "=", "&",
    ];
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        let col = text[..i].chars().count() + 1;
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c.is_ascii_digit()
            || (c == b'.' && bytes.get(i + 1).is_some_and(u8::is_ascii_digit))
        {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_digit() || bytes[i] == b'.') {
                i += 1;
            }
            if i < bytes.len() && (bytes[i] == b'e' || bytes[i] == b'E') {
                let mut j = i + 1;
                if j < bytes.len() && (bytes[j] == b'+' || bytes[j] == b'-') {
                    j += 1;
                }
                if j < bytes.len() && bytes[j].is_ascii_digit() {
                    i = j;
                    while i < bytes.len() && bytes[i].is_ascii_digit() {
                        i += 1;
                    }
                }
            }
            match text[start..i].parse::<f64>() {
                Ok(x) => out.push((Tok::Num(x), col)),
                Err(_) => return error(col, format!("`{}` is not a number", &text[start..i])),
            }
        } else if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
            out.push((Tok::Ident(text[start..i].to_string()), col));
        } else if c == b'(' {
            out.push((Tok::Open, col));
            i += 1;
        } else if c == b')' {
            out.push((Tok::Close, col));
            i += 1;
        } else if c == b',' {
            out.push((Tok::Comma, col));
            i += 1;
        } else if let Some(op) = OPS.iter().find(|op| text[i..].starts_with(**op)) {
            match *op {
                "=" => return error(col, "`=` is not an operator; compare with `==`"),
                "&" => return error(col, "`&` is not an operator; use `&&` for and"),
                _ => {}
            }
            out.push((Tok::Op(op), col));
            i += op.len();
        } else {
            let ch = text[i..].chars().next().expect("in bounds");
            return error(col, format!("unexpected character {ch:?}"));
        }
    }
    Ok(out)
}

struct Parser {
    toks: Vec<(Tok, usize)>,
    pos: usize,
    end_col: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|(t, _)| t)
    }

    fn col(&self) -> usize {
        self.toks.get(self.pos).map_or(self.end_col, |(_, c)| *c)
    }

    fn eat_op(&mut self, ops: &[&'static str]) -> Option<&'static str> {
        match self.peek() {
            Some(Tok::Op(op)) if ops.contains(op) => {
                let op = *op;
                self.pos += 1;
                Some(op)
            }
            _ => None,
        }
    }

    fn binary_level(
        &mut self,
        ops: &[&'static str],
        next: fn(&mut Parser) -> Result<Node, ExprError>,
    ) -> Result<Node, ExprError> {
        let mut left = next(self)?;
        while let Some(op) = self.eat_op(ops) {
            let right = next(self)?;
            left = Node::Binary(bin_op(op), Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn or(&mut self) -> Result<Node, ExprError> {
        self.binary_level(&["||"], Parser::and)
    }

    fn and(&mut self) -> Result<Node, ExprError> {
        self.binary_level(&["&&"], Parser::cmp)
    }

    fn cmp(&mut self) -> Result<Node, ExprError> {
        let left = self.sum()?;
        if let Some(op) = self.eat_op(&["==", "!=", "<=", ">=", "<", ">"]) {
            let right = self.sum()?;
            if let Some(Tok::Op(o)) = self.peek()
                && ["==", "!=", "<=", ">=", "<", ">"].contains(o)
            {
                return error(self.col(), "comparisons do not chain; join them with `&&`");
            }
            return Ok(Node::Binary(bin_op(op), Box::new(left), Box::new(right)));
        }
        Ok(left)
    }

    fn sum(&mut self) -> Result<Node, ExprError> {
        self.binary_level(&["+", "-"], Parser::term)
    }

    fn term(&mut self) -> Result<Node, ExprError> {
        self.binary_level(&["*", "/", "%"], Parser::unary)
    }

    fn unary(&mut self) -> Result<Node, ExprError> {
        match self.eat_op(&["-", "!"]) {
            Some("-") => Ok(Node::Neg(Box::new(self.unary()?))),
            Some(_) => Ok(Node::Not(Box::new(self.unary()?))),
            None => self.power(),
        }
    }

    fn power(&mut self) -> Result<Node, ExprError> {
        let base = self.atom()?;
        if self.eat_op(&["^"]).is_some() {
            let exp = self.unary()?;
            return Ok(Node::Binary(BinOp::Pow, Box::new(base), Box::new(exp)));
        }
        Ok(base)
    }

    fn atom(&mut self) -> Result<Node, ExprError> {
        let col = self.col();
        let Some((tok, _)) = self.toks.get(self.pos).cloned() else {
            return error(col, "the expression ends where a value was expected");
        };
        self.pos += 1;
        match tok {
            Tok::Num(x) => Ok(Node::Number(x)),
            Tok::Open => {
                let inner = self.or()?;
                match self.peek() {
                    Some(Tok::Close) => {
                        self.pos += 1;
                        Ok(inner)
                    }
                    _ => error(self.col(), format!("`(` at column {col} is not closed")),
                }
            }
            Tok::Ident(name) if name == "true" => Ok(Node::Bool(true)),
            Tok::Ident(name) if name == "false" => Ok(Node::Bool(false)),
            Tok::Ident(name) if self.peek() == Some(&Tok::Open) => {
                let Some(func) = Func::by_name(&name) else {
                    return error(
                        col,
                        format!(
                            "unknown function `{name}` (functions: min, max, abs, pow, sqrt, round, if)"
                        ),
                    );
                };
                self.pos += 1;
                let mut args = vec![self.or()?];
                loop {
                    match self.peek() {
                        Some(Tok::Comma) => {
                            self.pos += 1;
                            args.push(self.or()?);
                        }
                        Some(Tok::Close) => {
                            self.pos += 1;
                            break;
                        }
                        _ => return error(self.col(), format!("`{name}(` expects `,` or `)`")),
                    }
                }
                let (lo, hi) = func.arity();
                if args.len() < lo || args.len() > hi {
                    let wanted = if lo == hi {
                        format!("{lo}")
                    } else {
                        format!("at least {lo}")
                    };
                    return error(
                        col,
                        format!("`{name}` takes {wanted} argument(s), not {}", args.len()),
                    );
                }
                Ok(Node::Call(func, args))
            }
            Tok::Ident(name) => Ok(Node::Name { name, col }),
            Tok::Op(op) => error(col, format!("`{op}` where a value was expected")),
            Tok::Close => error(col, "`)` where a value was expected"),
            Tok::Comma => error(col, "`,` where a value was expected"),
        }
    }
}

fn bin_op(op: &str) -> BinOp {
    match op {
        "+" => BinOp::Add,
        "-" => BinOp::Sub,
        "*" => BinOp::Mul,
        "/" => BinOp::Div,
        "%" => BinOp::Rem,
        "^" => BinOp::Pow,
        "==" => BinOp::Eq,
        "!=" => BinOp::Ne,
        "<" => BinOp::Lt,
        "<=" => BinOp::Le,
        ">" => BinOp::Gt,
        ">=" => BinOp::Ge,
        "&&" => BinOp::And,
        "||" => BinOp::Or,
        _ => unreachable!("only lexed operators"),
    }
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
mod tests {
    use super::*;

    /// Binds `text` over the named inputs and evaluates it with their values.
    fn run(text: &str, inputs: &[(&str, Value)]) -> Value {
        let mut e = Expr::parse(text).unwrap();
        let kinds: Vec<Kind> = inputs
            .iter()
            .map(|(_, v)| match v {
                Value::Bool(_) => Kind::Bool,
                _ => Kind::Number,
            })
            .collect();
        e.bind(&|n| inputs.iter().position(|(m, _)| *m == n), &|i| {
            Some(kinds[i])
        })
        .unwrap();
        e.eval(&|i| Some(inputs[i].1.clone()))
    }

    fn bind_error(text: &str, inputs: &[(&str, Option<Kind>)]) -> ExprError {
        let mut e = Expr::parse(text).unwrap();
        e.bind(&|n| inputs.iter().position(|(m, _)| *m == n), &|i| {
            inputs[i].1
        })
        .unwrap_err()
    }

    #[test]
    fn arithmetic_follows_the_usual_precedence() {
        assert_eq!(run("1 + 2 * 3", &[]), Value::Float(7.0));
        assert_eq!(run("(1 + 2) * 3", &[]), Value::Float(9.0));
        assert_eq!(run("-2^2", &[]), Value::Float(-4.0));
        assert_eq!(run("2^3^2", &[]), Value::Float(512.0));
        assert_eq!(run("2^-1", &[]), Value::Float(0.5));
        assert_eq!(run("7 % 4 - 10 / 4", &[]), Value::Float(0.5));
        assert_eq!(run("1.5e3 + .5", &[]), Value::Float(1500.5));
    }

    #[test]
    fn power_is_voltage_times_current() {
        let v = run(
            "voltage * current",
            &[
                ("voltage", Value::Float(230.5)),
                ("current", Value::UInt(4)),
            ],
        );
        assert_eq!(v, Value::Float(922.0));
    }

    #[test]
    fn scale_factors_are_exact() {
        // SunSpec: W = 12345, W_SF = -2 → 123.45 exactly as written, not 123.45000000000002.
        let v = run(
            "w * 10^w_sf",
            &[("w", Value::UInt(12345)), ("w_sf", Value::Int(-2))],
        );
        assert_eq!(v, Value::Float(12345.0 * 0.01));
        assert_eq!(v.to_string(), "123.45");
        let v = run("a * 10^sf", &[("a", Value::UInt(7)), ("sf", Value::Int(3))]);
        assert_eq!(v, Value::Float(7000.0));
        assert_eq!(run("pow(10, -1) * 5", &[]).to_string(), "0.5");
    }

    #[test]
    fn functions_and_comparisons() {
        let i = [("a", Value::Int(-3)), ("b", Value::Float(2.5))];
        assert_eq!(run("min(a, b, 0)", &i), Value::Float(-3.0));
        assert_eq!(run("max(a, b)", &i), Value::Float(2.5));
        assert_eq!(run("abs(a)", &i), Value::Float(3.0));
        assert_eq!(run("round(b)", &i), Value::Float(3.0));
        assert_eq!(run("sqrt(16)", &i), Value::Float(4.0));
        assert_eq!(run("a < b && !(b >= 3)", &i), Value::Bool(true));
        assert_eq!(run("if(a < 0, -a, a)", &i), Value::Float(3.0));
        assert_eq!(run("a == -3 || b == 0", &i), Value::Bool(true));
    }

    #[test]
    fn division_by_zero_and_missing_inputs_give_null() {
        let i = [("a", Value::Float(1.0)), ("z", Value::UInt(0))];
        assert_eq!(run("a / z", &i), Value::Null);
        assert_eq!(run("a % z", &i), Value::Null);
        assert_eq!(run("sqrt(-a)", &i), Value::Null);
        assert_eq!(run("10^400", &i), Value::Null, "overflow is not finite");
        assert_eq!(
            run("a + n", &[("a", Value::Float(1.0)), ("n", Value::Null)]),
            Value::Null
        );
        let mut e = Expr::parse("a + 1").unwrap();
        e.bind(&|_| Some(0), &|_| Some(Kind::Number)).unwrap();
        assert_eq!(e.eval(&|_| None), Value::Null, "not read in this poll");
    }

    #[test]
    fn syntax_errors_name_the_column() {
        let e = Expr::parse("voltage * (current + 1").unwrap_err();
        assert_eq!(e.col, 23);
        assert!(e.message.contains("column 11 is not closed"), "{e}");
        let e = Expr::parse("a = b").unwrap_err();
        assert_eq!((e.col, e.message.contains("==")), (3, true));
        let e = Expr::parse("a * ").unwrap_err();
        assert_eq!(e.col, 5);
        let e = Expr::parse("a b").unwrap_err();
        assert_eq!(e.col, 3);
        let e = Expr::parse("1 < a < 3").unwrap_err();
        assert!(e.message.contains("do not chain"), "{e}");
        let e = Expr::parse("avg(a, b)").unwrap_err();
        assert!(e.message.contains("unknown function `avg`"), "{e}");
        let e = Expr::parse("pow(a)").unwrap_err();
        assert!(e.message.contains("takes 2 argument(s), not 1"), "{e}");
        let e = Expr::parse("a $ b").unwrap_err();
        assert_eq!(e.col, 3);
        assert!(Expr::parse("   ").is_err());
    }

    #[test]
    fn names_and_kinds_are_checked_when_bound() {
        let e = bind_error("voltage * curent", &[("voltage", Some(Kind::Number))]);
        assert_eq!((e.col, e.message.as_str()), (11, "unknown name `curent`"));
        let e = bind_error("name + 1", &[("name", None)]);
        assert!(e.message.contains("is a string"), "{e}");
        let e = bind_error("alarm * 2", &[("alarm", Some(Kind::Bool))]);
        assert_eq!(e.message, "`*` takes a number, not a bool");
        let e = bind_error("!v", &[("v", Some(Kind::Number))]);
        assert_eq!(e.message, "`!` takes a bool, not a number");
        let e = bind_error("if(v, 1, 2)", &[("v", Some(Kind::Number))]);
        assert!(e.message.contains("condition of `if`"), "{e}");
        let e = bind_error("if(v > 1, true, 2)", &[("v", Some(Kind::Number))]);
        assert!(e.message.contains("both branches"), "{e}");
        let e = bind_error("v == true", &[("v", Some(Kind::Number))]);
        assert!(e.message.contains("of one kind"), "{e}");
    }

    #[test]
    fn results_take_the_points_type() {
        assert_eq!(as_type(Value::Float(2.6), DataType::U16), Value::UInt(3));
        assert_eq!(as_type(Value::Float(-2.5), DataType::I32), Value::Int(-3));
        assert_eq!(as_type(Value::Float(70000.0), DataType::U16), Value::Null);
        assert_eq!(as_type(Value::Float(-1.0), DataType::U32), Value::Null);
        assert_eq!(as_type(Value::Float(0.1), DataType::F32), Value::Float(0.1));
        assert_eq!(
            as_type(Value::Bool(true), DataType::Bool),
            Value::Bool(true)
        );
        assert_eq!(as_type(Value::Null, DataType::U16), Value::Null);
    }

    #[test]
    fn bound_expressions_list_their_inputs_once() {
        let mut e = Expr::parse("a * b + a").unwrap();
        assert_eq!(e.names(), vec![("a", 1), ("b", 5)]);
        let k = e
            .bind(&|n| Some(if n == "a" { 4 } else { 9 }), &|_| {
                Some(Kind::Number)
            })
            .unwrap();
        assert_eq!(k, Kind::Number);
        assert_eq!(e.inputs(), vec![4, 9]);
    }
}
