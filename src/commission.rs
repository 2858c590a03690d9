//! `fieldgate read`: one raw read and every way to interpret it, for commissioning a device
//! whose register types and word order are unknown. Formatting is pure; the read goes through
//! the same bus links as the gateway.

use crate::mapping::{DataType, Order, Point, Value};
use crate::modbus::Table;
use std::fmt::Write;

fn point(dtype: DataType, order: Order) -> Point {
    Point {
        order,
        ..Point::new("", Table::Holding, 0, dtype)
    }
}

fn show(v: Value) -> String {
    match v {
        Value::Float(f) if f.is_finite() && (f.abs() >= 1e15 || (f != 0.0 && f.abs() < 1e-6)) => {
            format!("{f:e}")
        }
        v => v.to_string(),
    }
}

const ORDERS: [Order; 4] = [Order::ABCD, Order::CDAB, Order::BADC, Order::DCBA];

/// Every interpretation of `words` read from `start`: per register u16, i16, hex and ASCII;
/// per pair u32, i32, f32 and per four f64, u64, i64, each in all four orders.
pub fn describe_words(start: u16, words: &[u16]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:>7}  {:>6}  {:>6}  {:>7}  ascii",
        "address", "hex", "u16", "i16"
    );
    for (i, w) in words.iter().enumerate() {
        let ascii: String = w
            .to_be_bytes()
            .iter()
            .map(|&b| {
                if b.is_ascii_graphic() || b == b' ' {
                    b as char
                } else {
                    '.'
                }
            })
            .collect();
        let _ = writeln!(
            s,
            "{:>7}  0x{w:04X}  {w:>6}  {:>7}  {ascii}",
            start as usize + i,
            *w as i16
        );
    }
    for (width, types) in [
        (2usize, [DataType::F32, DataType::U32, DataType::I32]),
        (4, [DataType::F64, DataType::U64, DataType::I64]),
    ] {
        if words.len() < width {
            continue;
        }
        let _ = writeln!(
            s,
            "\n{}-bit values (first register, then each order)",
            width * 16
        );
        for i in 0..=words.len() - width {
            for order in ORDERS {
                let w = &words[i..i + width];
                let cells: Vec<String> = types
                    .iter()
                    .map(|&t| {
                        format!(
                            "{}={}",
                            format!("{t:?}").to_lowercase(),
                            show(point(t, order).decode_words(w))
                        )
                    })
                    .collect();
                let _ = writeln!(
                    s,
                    "{:>7}  {order:?}  {}",
                    start as usize + i,
                    cells.join("  ")
                );
            }
        }
    }
    s
}

/// Coils or discrete inputs, one per line.
pub fn describe_bits(start: u16, bits: &[bool]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{:>7}  value", "address");
    for (i, b) in bits.iter().enumerate() {
        let _ = writeln!(s, "{:>7}  {}", start as usize + i, u8::from(*b));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_float_shows_up_under_its_order() {
        // 61.25f32 written low word first (CDAB).
        let out = describe_words(100, &[0x0000, 0x4275]);
        assert!(out.contains("    100  CDAB  f32=61.25"), "{out}");
        assert!(out.contains("    100  0x0000       0        0"), "{out}");
        assert!(
            out.contains("    101  0x4275   17013    17013  Bu"),
            "{out}"
        );
    }

    #[test]
    fn sixty_four_bit_rows_appear_with_four_registers() {
        let out = describe_words(0, &[0x4093, 0x4A45, 0x6D5C, 0xFAAD]);
        assert!(out.contains("      0  ABCD  f64=1234.5678"), "{out}");
        assert!(!describe_words(0, &[1, 2, 3]).contains("64-bit"));
    }

    #[test]
    fn bits_list_one_per_address() {
        assert_eq!(
            describe_bits(5, &[true, false]),
            "address  value\n      5  1\n      6  0\n"
        );
    }
}
