//! The expression language's tests: grammar, kinds, evaluation.

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
