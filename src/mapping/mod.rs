//! Typed points and the pure decoding of raw Modbus data into values.
//!
//! This module owns what a configured point *is* once the config has been validated
//! ([`Point`], [`Source`], [`DataType`], [`Order`]) and the function that turns the registers or
//! bits a request returned into a [`Value`] ([`Point::decode_words`], [`Point::decode_bit`],
//! [`Point::decode_text`]), and back for commands ([`Point::encode`]). It does no I/O and knows
//! nothing of buses, queues or MQTT; `config` builds points, `poll` feeds them data.
//!
//! Word and byte order follow the common "ABCD" notation for a 32-bit value whose big-endian
//! bytes are A B C D:
//!
//! | order | registers on the wire | meaning                                 |
//! |-------|-----------------------|-----------------------------------------|
//! | ABCD  | `AB` `CD`             | big-endian words, big-endian bytes      |
//! | CDAB  | `CD` `AB`             | low word first ("word swap")            |
//! | BADC  | `BA` `DC`             | bytes swapped inside each word          |
//! | DCBA  | `DC` `BA`             | fully little-endian                     |
//!
//! The same two switches (word order reversed, bytes in each word swapped) apply to 64-bit
//! values: CDAB on a u64 means the four words arrive lowest first, BADC that each word's two
//! bytes are swapped, DCBA both. On 16-bit values only the byte swap has an effect.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::modbus::{Table, WriteData};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DataType {
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F32,
    F64,
    Bool,
    String,
}

impl DataType {
    /// Registers one value of this type occupies (strings: see [`Point::width`]).
    pub fn registers(self) -> u16 {
        match self {
            DataType::U16 | DataType::I16 | DataType::Bool | DataType::String => 1,
            DataType::U32 | DataType::I32 | DataType::F32 => 2,
            DataType::U64 | DataType::I64 | DataType::F64 => 4,
        }
    }

    pub fn is_numeric(self) -> bool {
        !matches!(self, DataType::Bool | DataType::String)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
pub enum Order {
    #[default]
    ABCD,
    CDAB,
    BADC,
    DCBA,
}

impl Order {
    fn word_swap(self) -> bool {
        matches!(self, Order::CDAB | Order::DCBA)
    }
    fn byte_swap(self) -> bool {
        matches!(self, Order::BADC | Order::DCBA)
    }
}

/// A decoded reading value, as it appears in a payload. Serialized as the bare JSON value;
/// read back (from the queue, at every publish) by the visitor below.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Value {
    /// No value: a float register holding NaN or an infinity, which meters use for "not
    /// available" (`0xFFFF 0xFFFF`, `0x7FC0 0x0000`). Published as `"value": null`.
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Text(String),
}

/// The bare JSON value back into a `Value`: integers that fit `i64` as `Int`, larger ones as
/// `UInt`. Written out instead of `#[serde(untagged)]`, which buffers the value and tries each
/// variant in turn, building (and formatting) an error for each that does not fit — for every
/// row the queue hands to the uplink.
impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Value;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("null, a boolean, a number or a string")
            }
            fn visit_unit<E>(self) -> Result<Value, E> {
                Ok(Value::Null)
            }
            fn visit_none<E>(self) -> Result<Value, E> {
                Ok(Value::Null)
            }
            fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
                Ok(Value::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
                Ok(Value::Int(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
                Ok(i64::try_from(v).map_or(Value::UInt(v), Value::Int))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
                Ok(Value::Float(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Value, E> {
                Ok(Value::Text(v.to_string()))
            }
            fn visit_string<E>(self, v: String) -> Result<Value, E> {
                Ok(Value::Text(v))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// Equal when the payload would be equal: `Int(2) == UInt(2)` (JSON has one kind of integer,
/// so a value read back from the queue may come back as the other variant).
impl PartialEq for Value {
    fn eq(&self, other: &Value) -> bool {
        use Value::*;
        match (self, other) {
            (Null, Null) => true,
            (Bool(a), Bool(b)) => a == b,
            (Int(a), Int(b)) => a == b,
            (UInt(a), UInt(b)) => a == b,
            (Int(a), UInt(b)) | (UInt(b), Int(a)) => u64::try_from(*a) == Ok(*b),
            (Float(a), Float(b)) => a == b,
            (Text(a), Text(b)) => a == b,
            _ => false,
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("null"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::UInt(u) => write!(f, "{u}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Text(s) => f.write_str(s),
        }
    }
}

/// Where a point's data lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source {
    pub table: Table,
    pub address: u16,
}

/// How a point's message is published.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// The topic with every placeholder already filled in.
    pub topic: String,
    pub qos: u8,
    pub retain: bool,
}

/// A fully resolved point: everything needed to plan its read, decode it and publish it.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub name: String,
    pub source: Source,
    pub dtype: DataType,
    pub order: Order,
    /// A single bit (0 = least significant) of a register, decoded as bool.
    pub bit: Option<u8>,
    /// String length in registers (two characters each).
    pub length: u16,
    pub scale: Option<f64>,
    pub offset: Option<f64>,
    pub unit: Option<String>,
    pub every: Duration,
    pub delivery: Delivery,
    /// Serial line devices: the parsed field this point takes (`source` is unused then).
    pub field: Option<String>,
    /// Accepts commands on `{topic}/set`, within `min..=max` (engineering units).
    pub writable: bool,
    pub min: Option<f64>,
    pub max: Option<f64>,
    /// When its readings are published (every poll, or by exception).
    pub reporting: Reporting,
    /// Computed from other points of its device (`expr:`); the expression itself is kept by
    /// the device (`config::Device::computed`).
    pub computed: bool,
    /// Read for computed points but never published (`internal: true`).
    pub internal: bool,
}

/// When a point's readings are published: at every poll, or by exception (`on_change`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Reporting {
    /// Only when the value differs from the last one published (beyond `deadband`).
    pub on_change: bool,
    pub deadband: Option<Deadband>,
    /// Published anyway after this much silence.
    pub heartbeat: Option<Duration>,
}

/// How far a number may move from the last published value before it is published again.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Deadband {
    /// In engineering units (after scale and offset).
    Absolute(f64),
    /// A percentage of the last published value.
    Percent(f64),
}

impl Point {
    /// A point with every option at its default: ABCD order, no scale, polled every second,
    /// published on `name` with QoS 1, not writable.
    pub fn new(name: &str, table: Table, address: u16, dtype: DataType) -> Point {
        Point {
            name: name.to_string(),
            source: Source { table, address },
            dtype,
            order: Order::ABCD,
            bit: None,
            length: 1,
            scale: None,
            offset: None,
            unit: None,
            every: Duration::from_secs(1),
            delivery: Delivery {
                topic: name.to_string(),
                qos: 1,
                retain: false,
            },
            field: None,
            writable: false,
            min: None,
            max: None,
            reporting: Reporting::default(),
            computed: false,
            internal: false,
        }
    }

    /// Number of registers (or bits, for coils and discrete inputs) this point spans.
    pub fn width(&self) -> u16 {
        if self.source.table.is_bits() || self.bit.is_some() {
            1
        } else if self.dtype == DataType::String {
            self.length
        } else {
            self.dtype.registers()
        }
    }

    /// Decodes this point from the registers of its span (`words.len() == self.width()`).
    pub fn decode_words(&self, words: &[u16]) -> Value {
        debug_assert_eq!(words.len(), self.width() as usize);
        if let Some(bit) = self.bit {
            return Value::Bool(words[0] >> bit & 1 == 1);
        }
        let bytes = ordered_bytes(words, self.order);
        let raw = match self.dtype {
            DataType::U16 => Value::UInt(u16::from_be_bytes([bytes[0], bytes[1]]) as u64),
            DataType::I16 => Value::Int(i16::from_be_bytes([bytes[0], bytes[1]]) as i64),
            DataType::U32 => Value::UInt(u32::from_be_bytes(take(&bytes)) as u64),
            DataType::I32 => Value::Int(i32::from_be_bytes(take(&bytes)) as i64),
            DataType::U64 => Value::UInt(u64::from_be_bytes(take(&bytes))),
            DataType::I64 => Value::Int(i64::from_be_bytes(take(&bytes))),
            DataType::F32 => Value::Float(f32_as_f64(f32::from_be_bytes(take(&bytes)))),
            DataType::F64 => Value::Float(f64::from_be_bytes(take(&bytes))),
            DataType::Bool => Value::Bool(words[0] != 0),
            DataType::String => Value::Text(decode_string(&bytes)),
        };
        match self.apply_scale(raw) {
            Value::Float(f) if !f.is_finite() => Value::Null,
            v => v,
        }
    }

    /// Decodes a field of a parsed text line; None if the text is not of the point's type.
    pub fn decode_text(&self, text: &str) -> Option<Value> {
        let t = text.trim();
        let raw = match self.dtype {
            DataType::String => return Some(Value::Text(text.to_string())),
            DataType::Bool => Value::Bool(match t.to_ascii_lowercase().as_str() {
                "1" | "true" | "on" | "yes" => true,
                "0" | "false" | "off" | "no" => false,
                _ => return None,
            }),
            DataType::F32 | DataType::F64 => {
                let f: f64 = t.parse().ok()?;
                if !f.is_finite() {
                    return None;
                }
                Value::Float(if self.dtype == DataType::F32 {
                    f32_as_f64(f as f32)
                } else {
                    f
                })
            }
            DataType::U16 | DataType::U32 | DataType::U64 => {
                let v: u64 = t.trim_start_matches('+').parse().ok()?;
                let max = match self.dtype {
                    DataType::U16 => u16::MAX as u64,
                    DataType::U32 => u32::MAX as u64,
                    _ => u64::MAX,
                };
                if v > max {
                    return None;
                }
                Value::UInt(v)
            }
            DataType::I16 | DataType::I32 | DataType::I64 => {
                let v: i64 = t.trim_start_matches('+').parse().ok()?;
                let ok = match self.dtype {
                    DataType::I16 => i16::try_from(v).is_ok(),
                    DataType::I32 => i32::try_from(v).is_ok(),
                    _ => true,
                };
                if !ok {
                    return None;
                }
                Value::Int(v)
            }
        };
        Some(self.apply_scale(raw))
    }

    /// Encodes a commanded value (a JSON number or bool, or text) for this point: range checked,
    /// inverse scale and offset, the point's type and word/byte order. Errors say why, for the
    /// `set/result` message.
    pub fn encode(&self, v: &serde_json::Value) -> Result<WriteData, String> {
        if !self.writable {
            return Err(format!("point {} is not writable", self.name));
        }
        if self.source.table == Table::Coil {
            let b = match v {
                serde_json::Value::Bool(b) => *b,
                serde_json::Value::Number(n) if n.as_f64() == Some(1.0) => true,
                serde_json::Value::Number(n) if n.as_f64() == Some(0.0) => false,
                serde_json::Value::String(s) => match s.to_ascii_lowercase().as_str() {
                    "true" | "on" | "1" => true,
                    "false" | "off" | "0" => false,
                    _ => return Err(format!("expected true or false, got {}", quote(v))),
                },
                _ => return Err(format!("expected true or false, got {}", quote(v))),
            };
            return Ok(WriteData::Coil(b));
        }
        let x = match v {
            serde_json::Value::Number(n) => n.as_f64(),
            serde_json::Value::String(s) => s.trim().parse::<f64>().ok(),
            _ => None,
        }
        .filter(|x| x.is_finite())
        .ok_or_else(|| format!("expected a number, got {}", quote(v)))?;
        if let Some(min) = self.min
            && x < min
        {
            return Err(format!("{x} is below the minimum {min}"));
        }
        if let Some(max) = self.max
            && x > max
        {
            return Err(format!("{x} is above the maximum {max}"));
        }
        let raw = (x - self.offset.unwrap_or(0.0)) / self.scale.unwrap_or(1.0);
        let unscaled = self.scale.is_none() && self.offset.is_none();
        // An integer given as such, without scale or offset, is taken exactly (f64 holds
        // integers exactly only up to 2^53).
        let exact: Option<i128> = match v {
            serde_json::Value::Number(n) if unscaled => n
                .as_i64()
                .map(i128::from)
                .or_else(|| n.as_u64().map(i128::from)),
            serde_json::Value::String(s) if unscaled => s.trim().parse::<i128>().ok(),
            _ => None,
        };
        let doesnt_fit = || format!("{x} does not fit a {:?}", self.dtype);
        // Every value of the type, and nothing else: `MIN..=MAX` exactly, never a wrap-around.
        let int = |min: i128, max: i128| -> Result<i128, String> {
            let r = match exact {
                Some(i) => i,
                None => {
                    let r = raw.round();
                    if !raw.is_finite() || (raw - r).abs() > 1e-6 * raw.abs().max(1.0) {
                        return Err(format!(
                            "{x} is not a whole number of steps of {}",
                            self.scale.unwrap_or(1.0)
                        ));
                    }
                    // Past 2^53 an f64 is not every integer: the device would get a neighbour.
                    if r.abs() > 9_007_199_254_740_992.0 {
                        return Err(format!(
                            "{x} cannot be written exactly (more than 2^53 steps; give the raw integer without scale or offset)"
                        ));
                    }
                    r as i128
                }
            };
            if r < min || r > max {
                return Err(doesnt_fit());
            }
            Ok(r)
        };
        let be: Vec<u8> = match self.dtype {
            DataType::U16 => (int(0, u16::MAX.into())? as u16).to_be_bytes().to_vec(),
            DataType::I16 => (int(i16::MIN.into(), i16::MAX.into())? as i16)
                .to_be_bytes()
                .to_vec(),
            DataType::U32 => (int(0, u32::MAX.into())? as u32).to_be_bytes().to_vec(),
            DataType::I32 => (int(i32::MIN.into(), i32::MAX.into())? as i32)
                .to_be_bytes()
                .to_vec(),
            DataType::U64 => (int(0, u64::MAX.into())? as u64).to_be_bytes().to_vec(),
            DataType::I64 => (int(i64::MIN.into(), i64::MAX.into())? as i64)
                .to_be_bytes()
                .to_vec(),
            DataType::F32 => {
                // Out of range or past the inverse scale: an f32 would hold an infinity.
                let f = raw as f32;
                if !f.is_finite() {
                    return Err(doesnt_fit());
                }
                f.to_be_bytes().to_vec()
            }
            DataType::F64 => {
                if !raw.is_finite() {
                    return Err(doesnt_fit());
                }
                raw.to_be_bytes().to_vec()
            }
            DataType::Bool | DataType::String => {
                return Err(format!("a {:?} point cannot be written", self.dtype));
            }
        };
        // The inverse of `ordered_bytes`: big-endian bytes back into words on the wire.
        let mut words: Vec<u16> = be
            .chunks(2)
            .map(|c| {
                if self.order.byte_swap() {
                    u16::from_be_bytes([c[1], c[0]])
                } else {
                    u16::from_be_bytes([c[0], c[1]])
                }
            })
            .collect();
        if self.order.word_swap() {
            words.reverse();
        }
        Ok(WriteData::Registers(words))
    }

    /// Decodes a coil or discrete input.
    pub fn decode_bit(&self, bit: bool) -> Value {
        Value::Bool(bit)
    }

    fn apply_scale(&self, raw: Value) -> Value {
        if self.scale.is_none() && self.offset.is_none() {
            return raw;
        }
        let x = match raw {
            Value::Int(i) => i as f64,
            Value::UInt(u) => u as f64,
            Value::Float(f) => f,
            other => return other,
        };
        let y = x * self.scale.unwrap_or(1.0) + self.offset.unwrap_or(0.0);
        Value::Float(tidy(y))
    }
}

/// Puts the bytes of `words` into big-endian order according to `order`.
/// Most bytes of a refused value quoted back in an error: a 900 kB command must not come back
/// as a 900 kB result message and log line (#28).
pub const QUOTED: usize = 120;

/// `v` as text for an error message, cut to at most [`QUOTED`] bytes (at a character boundary)
/// with its full length said after it.
pub fn quote(v: &impl fmt::Display) -> String {
    cut(v.to_string(), QUOTED)
}

/// `text` cut to at most `max` bytes (at a character boundary), its full length said after it.
pub fn cut(text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &text[..end], text.len())
}

fn ordered_bytes(words: &[u16], order: Order) -> Vec<u8> {
    let mut out = Vec::with_capacity(words.len() * 2);
    let mut push = |w: u16| {
        let [hi, lo] = w.to_be_bytes();
        if order.byte_swap() {
            out.extend_from_slice(&[lo, hi]);
        } else {
            out.extend_from_slice(&[hi, lo]);
        }
    };
    if order.word_swap() {
        words.iter().rev().copied().for_each(&mut push);
    } else {
        words.iter().copied().for_each(&mut push);
    }
    out
}

fn take<const N: usize>(bytes: &[u8]) -> [u8; N] {
    bytes[..N].try_into().expect("span checked by width()")
}

/// Widens an f32 through its shortest decimal form, so 0.1f32 becomes 0.1 and not
/// 0.10000000149011612: consumers see the number the device meant.
pub fn f32_as_f64(x: f32) -> f64 {
    if !x.is_finite() {
        return x as f64;
    }
    x.to_string().parse().unwrap_or(x as f64)
}

/// Rounds away binary noise from scaling (1234 × 0.01 = 12.340000000000002) by keeping
/// 12 significant digits, more than any Modbus register carries.
fn tidy(x: f64) -> f64 {
    if !x.is_finite() {
        return x;
    }
    format!("{x:.11e}").parse().unwrap_or(x)
}

/// Two characters per register, high byte first; trailing NULs and spaces trimmed.
fn decode_string(bytes: &[u8]) -> String {
    let end = bytes
        .iter()
        .rposition(|&b| b != 0 && b != b' ')
        .map_or(0, |i| i + 1);
    let text = &bytes[..end];
    // A NUL inside the string ends it, as in C.
    let text = match text.iter().position(|&b| b == 0) {
        Some(i) => &text[..i],
        None => text,
    };
    String::from_utf8_lossy(text).into_owned()
}

#[cfg(test)]
mod tests;
