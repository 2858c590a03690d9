//! The point codec against hand-computed words: every type, order, scale and offset, both ways.

use super::*;

fn point(dtype: DataType, order: Order) -> Point {
    Point {
        order,
        ..Point::new("p", Table::Holding, 0, dtype)
    }
}

#[test]
fn u16_and_i16_are_read_big_endian_and_byte_swapped_by_badc() {
    assert_eq!(
        point(DataType::U16, Order::ABCD).decode_words(&[0x1234]),
        Value::UInt(0x1234)
    );
    assert_eq!(
        point(DataType::U16, Order::BADC).decode_words(&[0x1234]),
        Value::UInt(0x3412)
    );
    assert_eq!(
        point(DataType::U16, Order::CDAB).decode_words(&[0x1234]),
        Value::UInt(0x1234)
    );
    assert_eq!(
        point(DataType::I16, Order::ABCD).decode_words(&[0xFFFE]),
        Value::Int(-2)
    );
    assert_eq!(
        point(DataType::I16, Order::DCBA).decode_words(&[0xFEFF]),
        Value::Int(-2)
    );
}

#[test]
fn thirty_two_bit_values_in_all_four_orders() {
    // 0x12345678 laid out as each order puts it on the wire.
    let cases = [
        (Order::ABCD, [0x1234, 0x5678]),
        (Order::CDAB, [0x5678, 0x1234]),
        (Order::BADC, [0x3412, 0x7856]),
        (Order::DCBA, [0x7856, 0x3412]),
    ];
    for (order, words) in cases {
        assert_eq!(
            point(DataType::U32, order).decode_words(&words),
            Value::UInt(0x1234_5678),
            "{order:?}"
        );
    }
    // -2 as i32 = 0xFFFFFFFE
    assert_eq!(
        point(DataType::I32, Order::ABCD).decode_words(&[0xFFFF, 0xFFFE]),
        Value::Int(-2)
    );
    assert_eq!(
        point(DataType::I32, Order::CDAB).decode_words(&[0xFFFE, 0xFFFF]),
        Value::Int(-2)
    );
}

#[test]
fn f32_in_all_four_orders() {
    // 61.25f32 = 0x42750000
    let cases = [
        (Order::ABCD, [0x4275, 0x0000]),
        (Order::CDAB, [0x0000, 0x4275]),
        (Order::BADC, [0x7542, 0x0000]),
        (Order::DCBA, [0x0000, 0x7542]),
    ];
    for (order, words) in cases {
        assert_eq!(
            point(DataType::F32, order).decode_words(&words),
            Value::Float(61.25),
            "{order:?}"
        );
    }
}

#[test]
fn f32_keeps_the_decimal_the_device_meant() {
    // 0.1f32 = 0x3DCCCCCD
    assert_eq!(
        point(DataType::F32, Order::ABCD).decode_words(&[0x3DCC, 0xCCCD]),
        Value::Float(0.1)
    );
}

#[test]
fn sixty_four_bit_values_in_all_four_orders() {
    // 0x0102030405060708
    let cases = [
        (Order::ABCD, [0x0102, 0x0304, 0x0506, 0x0708]),
        (Order::CDAB, [0x0708, 0x0506, 0x0304, 0x0102]),
        (Order::BADC, [0x0201, 0x0403, 0x0605, 0x0807]),
        (Order::DCBA, [0x0807, 0x0605, 0x0403, 0x0201]),
    ];
    for (order, words) in cases {
        assert_eq!(
            point(DataType::U64, order).decode_words(&words),
            Value::UInt(0x0102_0304_0506_0708),
            "{order:?}"
        );
    }
    assert_eq!(
        point(DataType::I64, Order::ABCD).decode_words(&[0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF]),
        Value::Int(-1)
    );
    // 1234.5678f64 = 0x40934A456D5CFAAD
    assert_eq!(
        point(DataType::F64, Order::ABCD).decode_words(&[0x4093, 0x4A45, 0x6D5C, 0xFAAD]),
        Value::Float(1234.5678)
    );
    assert_eq!(
        point(DataType::F64, Order::CDAB).decode_words(&[0xFAAD, 0x6D5C, 0x4A45, 0x4093]),
        Value::Float(1234.5678)
    );
}

#[test]
fn scale_and_offset_apply_to_every_numeric_type() {
    let mut p = point(DataType::U16, Order::ABCD);
    p.scale = Some(0.01);
    assert_eq!(p.decode_words(&[1234]), Value::Float(12.34));
    p.offset = Some(-40.0);
    assert_eq!(p.decode_words(&[1234]), Value::Float(-27.66));

    let mut p = point(DataType::I16, Order::ABCD);
    p.scale = Some(0.1);
    assert_eq!(p.decode_words(&[0xFF9C]), Value::Float(-10.0)); // -100 × 0.1

    let mut p = point(DataType::U32, Order::ABCD);
    p.scale = Some(0.1);
    assert_eq!(p.decode_words(&[0x0001, 0x0000]), Value::Float(6553.6));

    let mut p = point(DataType::F32, Order::ABCD);
    p.offset = Some(1.5);
    assert_eq!(p.decode_words(&[0x4275, 0x0000]), Value::Float(62.75));

    let mut p = point(DataType::I64, Order::ABCD);
    p.scale = Some(2.0);
    p.offset = Some(1.0);
    assert_eq!(
        p.decode_words(&[0xFFFF, 0xFFFF, 0xFFFF, 0xFFFB]), // -5
        Value::Float(-9.0)
    );
}

#[test]
fn a_bit_of_a_register_is_a_bool() {
    let mut p = point(DataType::Bool, Order::ABCD);
    p.bit = Some(3);
    assert_eq!(p.decode_words(&[0b1000]), Value::Bool(true));
    assert_eq!(p.decode_words(&[0b0111]), Value::Bool(false));
    p.bit = Some(15);
    assert_eq!(p.decode_words(&[0x8000]), Value::Bool(true));
}

#[test]
fn strings_trim_trailing_nuls_and_spaces() {
    let mut p = point(DataType::String, Order::ABCD);
    p.length = 4;
    // "SN-42  " then NUL
    assert_eq!(
        p.decode_words(&[0x534E, 0x2D34, 0x3220, 0x2000]),
        Value::Text("SN-42".into())
    );
    p.order = Order::BADC;
    assert_eq!(
        p.decode_words(&[0x4E53, 0x342D, 0x2032, 0x0020]),
        Value::Text("SN-42".into())
    );
    assert_eq!(p.decode_words(&[0, 0, 0, 0]), Value::Text(String::new()));
}

#[test]
fn text_fields_decode_by_type_with_scale() {
    let mut p = point(DataType::F64, Order::ABCD);
    assert_eq!(p.decode_text(" 21.5 "), Some(Value::Float(21.5)));
    assert_eq!(p.decode_text("abc"), None);
    assert_eq!(p.decode_text("NaN"), None);
    p.scale = Some(0.1);
    assert_eq!(p.decode_text("215"), Some(Value::Float(21.5)));
    let p = point(DataType::I16, Order::ABCD);
    assert_eq!(p.decode_text("-40"), Some(Value::Int(-40)));
    assert_eq!(p.decode_text("40000"), None, "out of range for i16");
    assert_eq!(
        point(DataType::U32, Order::ABCD).decode_text("+7"),
        Some(Value::UInt(7))
    );
    assert_eq!(
        point(DataType::Bool, Order::ABCD).decode_text("ON"),
        Some(Value::Bool(true))
    );
    assert_eq!(
        point(DataType::String, Order::ABCD).decode_text("A"),
        Some(Value::Text("A".into()))
    );
}

#[test]
fn encoding_is_the_inverse_of_decoding_in_every_order() {
    for order in [Order::ABCD, Order::CDAB, Order::BADC, Order::DCBA] {
        for (dtype, v) in [
            (DataType::F32, serde_json::json!(61.25)),
            (DataType::I32, serde_json::json!(-123456)),
            (DataType::U16, serde_json::json!(4242)),
            (DataType::F64, serde_json::json!(1234.5678)),
            (DataType::I64, serde_json::json!(-5)),
        ] {
            let mut p = point(dtype, order);
            p.writable = true;
            let crate::modbus::WriteData::Registers(words) = p.encode(&v).unwrap() else {
                panic!()
            };
            assert_eq!(
                serde_json::to_value(p.decode_words(&words)).unwrap(),
                v,
                "{dtype:?} {order:?}"
            );
        }
    }
}

#[test]
fn encoding_applies_inverse_scale_and_refuses_what_does_not_fit() {
    let mut p = point(DataType::U16, Order::ABCD);
    p.writable = true;
    p.scale = Some(0.1);
    p.offset = Some(-40.0);
    assert_eq!(
        p.encode(&serde_json::json!(21.5)),
        Ok(crate::modbus::WriteData::Registers(vec![615]))
    );
    assert!(
        p.encode(&serde_json::json!(21.55))
            .unwrap_err()
            .contains("whole number of steps")
    );
    assert!(
        p.encode(&serde_json::json!(-50))
            .unwrap_err()
            .contains("does not fit")
    );
    assert!(
        p.encode(&serde_json::json!("warm"))
            .unwrap_err()
            .contains("expected a number")
    );
    p.max = Some(30.0);
    assert!(
        p.encode(&serde_json::json!(31))
            .unwrap_err()
            .contains("above the maximum 30")
    );
    p.writable = false;
    assert!(
        p.encode(&serde_json::json!(21.5))
            .unwrap_err()
            .contains("not writable")
    );
    let mut c = point(DataType::Bool, Order::ABCD);
    c.source.table = Table::Coil;
    c.writable = true;
    assert_eq!(
        c.encode(&serde_json::json!("on")),
        Ok(crate::modbus::WriteData::Coil(true))
    );
    assert!(c.encode(&serde_json::json!(2)).is_err());
}

/// Acceptance testing (#10): 2^64 on a u64 wrote 0, 2^63 on an i64 wrote i64::MIN, 1e39 on
/// an f32 wrote +inf. Every value the type holds is accepted, exactly; nothing else is.
#[test]
fn commands_refuse_every_value_the_type_cannot_hold_exactly() {
    let written = |dtype: DataType, v: serde_json::Value| -> Result<Value, String> {
        let mut p = point(dtype, Order::ABCD);
        p.writable = true;
        let crate::modbus::WriteData::Registers(words) = p.encode(&v)? else {
            panic!()
        };
        Ok(p.decode_words(&words))
    };
    use serde_json::json;
    // The reported cases.
    assert!(written(DataType::U64, json!(18446744073709551616.0)).is_err());
    assert!(written(DataType::U64, json!("18446744073709551616")).is_err());
    assert!(written(DataType::I64, json!(9223372036854775808.0)).is_err());
    assert!(written(DataType::I64, json!(9223372036854775808u64)).is_err());
    assert!(written(DataType::F32, json!(1e39)).is_err());
    assert!(written(DataType::F32, json!(-1e39)).is_err());
    // The ends of each range are exact.
    assert_eq!(
        written(DataType::U64, json!(u64::MAX)),
        Ok(Value::UInt(u64::MAX))
    );
    assert_eq!(
        written(DataType::I64, json!(i64::MIN)),
        Ok(Value::Int(i64::MIN))
    );
    assert_eq!(
        written(DataType::I64, json!(i64::MAX)),
        Ok(Value::Int(i64::MAX))
    );
    assert_eq!(
        written(DataType::I64, json!("9007199254740993")),
        Ok(Value::Int(9_007_199_254_740_993))
    );
    assert_eq!(written(DataType::U16, json!(65535)), Ok(Value::UInt(65535)));
    assert!(written(DataType::U16, json!(65536)).is_err());
    assert!(written(DataType::U32, json!(-1)).is_err());
    assert!(written(DataType::I16, json!(-32769)).is_err());
    assert_eq!(
        written(DataType::F32, json!(3.0e38)),
        Ok(Value::Float(3.0e38))
    );
    // Past 2^53 a scaled value is no longer exact in f64: refused, not rounded.
    let mut p = point(DataType::I64, Order::ABCD);
    p.writable = true;
    p.scale = Some(0.5);
    assert!(
        p.encode(&json!(9007199254740993.0))
            .unwrap_err()
            .contains("exactly")
    );
    assert!(p.encode(&json!(10.5)).is_ok());
}

#[test]
fn width_counts_registers_or_bits() {
    assert_eq!(point(DataType::F64, Order::ABCD).width(), 4);
    let mut p = point(DataType::String, Order::ABCD);
    p.length = 10;
    assert_eq!(p.width(), 10);
    let mut p = point(DataType::Bool, Order::ABCD);
    p.source.table = Table::Coil;
    assert_eq!(p.width(), 1);
}

#[test]
fn values_read_back_from_json_as_they_were_written() {
    let cases = [
        (Value::Null, "null"),
        (Value::Bool(true), "true"),
        (Value::Int(-7), "-7"),
        (Value::Int(42), "42"),
        (Value::UInt(u64::MAX), "18446744073709551615"),
        (Value::Float(230.125), "230.125"),
        (Value::Float(-0.5), "-0.5"),
        (Value::Text("on \"2\"".into()), r#""on \"2\"""#),
    ];
    for (value, json) in cases {
        assert_eq!(serde_json::to_string(&value).unwrap(), json);
        let back: Value = serde_json::from_str(json).unwrap();
        assert_eq!(back, value, "{json}");
        // The variant too, not only equality across Int/UInt.
        assert_eq!(
            std::mem::discriminant(&back),
            std::mem::discriminant(&value),
            "{json}"
        );
    }
    // Integers that fit i64 come back as Int, however they were held.
    assert!(matches!(serde_json::from_str("5").unwrap(), Value::Int(5)));
    let err = serde_json::from_str::<Value>("[1]")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("null, a boolean, a number or a string"),
        "{err}"
    );
}

/// #28 (5): a 900 kB command came back as a 900 kB result message and log line. A refusal
/// quotes at most [`QUOTED`] bytes of the value, and says how long it was.
#[test]
fn a_refused_value_is_quoted_short_with_its_length() {
    let mut p = point(DataType::U16, Order::ABCD);
    p.writable = true;
    let huge = serde_json::Value::String("w".repeat(900_000));
    let why = p.encode(&huge).unwrap_err();
    assert!(why.len() < QUOTED + 60, "{} bytes", why.len());
    assert!(
        why.contains("expected a number") && why.contains("(900002 bytes)"),
        "{why}"
    );
    // Cut at a character boundary, never inside one.
    let wide = serde_json::Value::String("°".repeat(100_000));
    assert!(p.encode(&wide).unwrap_err().is_char_boundary(0));
    let refused =
        crate::uplink::command_value(format!("[{}]", "1,".repeat(400_000) + "1").as_bytes())
            .unwrap_err();
    assert!(refused.len() < QUOTED + 60, "{} bytes", refused.len());
    // Short values are quoted whole.
    assert_eq!(
        p.encode(&serde_json::json!("warm")).unwrap_err(),
        "expected a number, got \"warm\""
    );
}
