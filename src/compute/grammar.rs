//! The grammar of expressions: the lexer and a recursive-descent parser, one function per
//! precedence level (see the table in the module above).

use super::{BinOp, ExprError, Func, Node, error};

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Tok {
    Num(f64),
    Ident(String),
    Op(&'static str),
    Open,
    Close,
    Comma,
}

pub(super) fn lex(text: &str) -> Result<Vec<(Tok, usize)>, ExprError> {
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

pub(super) struct Parser {
    pub(super) toks: Vec<(Tok, usize)>,
    pub(super) pos: usize,
    pub(super) end_col: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|(t, _)| t)
    }

    pub(super) fn col(&self) -> usize {
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

    pub(super) fn or(&mut self) -> Result<Node, ExprError> {
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
