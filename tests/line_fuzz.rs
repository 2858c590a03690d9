//! Arbitrary bytes never panic the line reader or any parser (a property test standing in for
//! a fuzz target: `cargo test` runs it everywhere).

use fieldgate::bus::serial_line::{Framed, LineFramer};
use fieldgate::parse::Parser;
use proptest::prelude::*;

fn parsers() -> Vec<Parser> {
    vec![
        Parser::Regex(regex::Regex::new(r"T=(?P<temp>-?\d+(\.\d+)?),H=(?P<hum>\d+)").unwrap()),
        Parser::Split(",".into()),
        Parser::Json,
        Parser::Nmea(vec!["GGA".into(), "RMC".into()]),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    #[test]
    fn the_line_reader_never_panics_and_bounds_its_lines(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..20),
        max in 8usize..64,
        crlf in any::<bool>(),
    ) {
        let term: &[u8] = if crlf { b"\r\n" } else { b"\n" };
        let mut f = LineFramer::new(term, max);
        let mut out = Vec::new();
        for c in &chunks {
            f.push(c, &mut out);
        }
        for framed in out {
            if let Framed::Line(l) = framed {
                prop_assert!(l.len() <= max, "a line of {} bytes passed max_line {max}", l.len());
                prop_assert!(!l.contains('\n'));
            }
        }
    }

    #[test]
    fn no_parser_panics_on_any_text(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let text = String::from_utf8_lossy(&bytes);
        for p in parsers() {
            let _ = p.parse(&text);
        }
    }

    #[test]
    fn no_parser_panics_on_nmea_shaped_text(
        talker in "[A-Z]{2}",
        kind in prop_oneof![Just("GGA"), Just("RMC"), Just("GSV")],
        fields in proptest::collection::vec("[0-9A-Z.,-]{0,12}", 0..16),
    ) {
        let data = format!("{talker}{kind},{}", fields.join(","));
        let sum = data.bytes().fold(0u8, |a, b| a ^ b);
        let line = format!("${data}*{sum:02X}");
        for p in parsers() {
            let _ = p.parse(&line);
        }
    }
}
