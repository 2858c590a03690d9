//! Parsing the lines of serial text sensors into named fields: `regex` (named groups), `split`
//! (fields by index), `json` (fields by key path) and `nmea` (NMEA 0183 sentences, checksum
//! verified). Pure functions; `poll::line` feeds them lines, `mapping` turns fields into values.
//!
//! NMEA 0183 facts used here (sentence layouts of GGA and RMC, the checksum as the XOR of every
//! character between `$` and `*`, latitude as ddmm.mmmm and longitude as dddmm.mmmm): NMEA 0183
//! Standard v4.11 as summarised by the gpsd project's "NMEA Revealed" (catb.org/gpsd/NMEA.html).

use std::collections::BTreeMap;

use regex::Regex;

/// Field name → text. Numbers keep their textual form until a point's type decodes them.
pub type Fields = BTreeMap<String, String>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("the line does not match the pattern")]
    NoMatch,
    #[error("not JSON: {0}")]
    BadJson(String),
    #[error("NMEA checksum {got:02X} where {want:02X} was expected")]
    BadChecksum { got: u8, want: u8 },
    #[error("not an NMEA sentence with a checksum")]
    NotNmea,
}

impl ParseError {
    /// A short, stable name for counters.
    pub fn kind(&self) -> &'static str {
        match self {
            ParseError::NoMatch => "no_match",
            ParseError::BadJson(_) => "bad_json",
            ParseError::BadChecksum { .. } => "bad_checksum",
            ParseError::NotNmea => "not_nmea",
        }
    }
}

/// NMEA sentences decoded, and the field names each gives.
pub const NMEA_SENTENCES: [(&str, &[&str]); 2] = [
    (
        "GGA",
        &[
            "time",
            "latitude",
            "longitude",
            "fix_quality",
            "satellites",
            "hdop",
            "altitude",
        ],
    ),
    (
        "RMC",
        &[
            "time",
            "date",
            "status",
            "latitude",
            "longitude",
            "speed_knots",
            "course",
        ],
    ),
];

#[derive(Debug, Clone)]
pub enum Parser {
    Regex(Regex),
    Split(String),
    Json,
    /// Sentence types to decode (e.g. GGA, RMC); others are ignored.
    Nmea(Vec<String>),
}

impl Parser {
    /// A regex parser that matches the **whole line**: a fragment glued to the next line after
    /// noise (`T=21.5,H=4T=21.5,H=40`) must not yield a field. `.*` is there for a search.
    pub fn regex(re: &str) -> Result<Parser, regex::Error> {
        Ok(Parser::Regex(Regex::new(&format!("^(?:{re})$"))?))
    }

    /// Parses one line. `Ok(None)`: a valid line this parser does not decode (an NMEA sentence
    /// of a type not asked for), which is neither published nor an error.
    pub fn parse(&self, line: &str) -> Result<Option<Fields>, ParseError> {
        match self {
            Parser::Regex(re) => {
                let caps = re.captures(line).ok_or(ParseError::NoMatch)?;
                let mut f = Fields::new();
                for (i, name) in re.capture_names().enumerate() {
                    if let Some(m) = caps.get(i) {
                        f.insert(i.to_string(), m.as_str().to_string());
                        if let Some(n) = name {
                            f.insert(n.to_string(), m.as_str().to_string());
                        }
                    }
                }
                Ok(Some(f))
            }
            Parser::Split(sep) => Ok(Some(
                line.split(sep.as_str())
                    .enumerate()
                    .map(|(i, s)| (i.to_string(), s.trim().to_string()))
                    .collect(),
            )),
            Parser::Json => {
                let v: serde_json::Value =
                    serde_json::from_str(line).map_err(|e| ParseError::BadJson(e.to_string()))?;
                let mut f = Fields::new();
                flatten("", &v, &mut f);
                Ok(Some(f))
            }
            Parser::Nmea(wanted) => nmea(line, wanted),
        }
    }

    /// Whether `field` can ever come out of this parser (checked at config time).
    pub fn knows_field(&self, field: &str) -> Result<(), String> {
        match self {
            Parser::Regex(re) => {
                let numbered = field.parse::<usize>().is_ok_and(|i| i < re.captures_len());
                if numbered || re.capture_names().flatten().any(|n| n == field) {
                    Ok(())
                } else {
                    let names: Vec<&str> = re.capture_names().flatten().collect();
                    Err(format!(
                        "the regex has no group `{field}` (named groups: {})",
                        names.join(", ")
                    ))
                }
            }
            Parser::Split(_) => field
                .parse::<usize>()
                .map(|_| ())
                .map_err(|_| format!("with `split`, a field is an index (0, 1, …), not `{field}`")),
            Parser::Json => Ok(()),
            Parser::Nmea(wanted) => {
                let (sentence, name) = match field.split_once('.') {
                    Some((s, n)) => (Some(s), n),
                    None => (None, field),
                };
                let ok = NMEA_SENTENCES.iter().any(|(s, names)| {
                    sentence.is_none_or(|x| x == *s)
                        && wanted.iter().any(|w| w == s)
                        && names.contains(&name)
                });
                if ok {
                    Ok(())
                } else {
                    Err(format!(
                        "no NMEA field `{field}` in the sentences decoded ({}); GGA gives {}, RMC gives {}",
                        wanted.join(", "),
                        NMEA_SENTENCES[0].1.join(", "),
                        NMEA_SENTENCES[1].1.join(", ")
                    ))
                }
            }
        }
    }
}

fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Fields) {
    let key = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match v {
        serde_json::Value::Object(m) => m.iter().for_each(|(k, v)| flatten(&key(k), v, out)),
        serde_json::Value::Array(a) => a
            .iter()
            .enumerate()
            .for_each(|(i, v)| flatten(&key(&i.to_string()), v, out)),
        serde_json::Value::Null => {}
        serde_json::Value::String(s) => {
            out.insert(prefix.to_string(), s.clone());
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

/// Verifies the checksum and decodes GGA and RMC (any talker: GP, GN, GL …).
fn nmea(line: &str, wanted: &[String]) -> Result<Option<Fields>, ParseError> {
    let line = line.trim();
    let body = line
        .strip_prefix('$')
        .or_else(|| line.strip_prefix('!'))
        .ok_or(ParseError::NotNmea)?;
    let (data, sum) = body.rsplit_once('*').ok_or(ParseError::NotNmea)?;
    let want = u8::from_str_radix(sum.get(..2).ok_or(ParseError::NotNmea)?, 16)
        .map_err(|_| ParseError::NotNmea)?;
    let got = data.bytes().fold(0u8, |a, b| a ^ b);
    if got != want {
        return Err(ParseError::BadChecksum { got, want });
    }
    if !data.is_ascii() {
        return Err(ParseError::NotNmea); // NMEA 0183 is ASCII; this also keeps slicing safe
    }
    let f: Vec<&str> = data.split(',').collect();
    let address = f[0];
    if address.len() != 5 || address.starts_with('P') {
        return Ok(None); // proprietary or unusual: not ours to decode
    }
    let kind = &address[2..];
    if !wanted.iter().any(|w| w == kind) {
        return Ok(None);
    }
    let get = |i: usize| f.get(i).copied().filter(|s| !s.is_empty());
    let mut out = Fields::new();
    let mut put = |name: &str, v: Option<String>| {
        if let Some(v) = v {
            out.insert(format!("{kind}.{name}"), v.clone());
            out.insert(name.to_string(), v);
        }
    };
    match kind {
        "GGA" => {
            put("time", get(1).and_then(nmea_time));
            put("latitude", coordinate(get(2), get(3), 2));
            put("longitude", coordinate(get(4), get(5), 3));
            put("fix_quality", get(6).map(str::to_string));
            put(
                "satellites",
                get(7)
                    .map(|s| s.trim_start_matches('0').to_string())
                    .map(|s| if s.is_empty() { "0".into() } else { s }),
            );
            put("hdop", get(8).map(str::to_string));
            put("altitude", get(9).map(str::to_string));
        }
        "RMC" => {
            put("time", get(1).and_then(nmea_time));
            put("status", get(2).map(str::to_string));
            put("latitude", coordinate(get(3), get(4), 2));
            put("longitude", coordinate(get(5), get(6), 3));
            put("speed_knots", get(7).map(str::to_string));
            put("course", get(8).map(str::to_string));
            put("date", get(9).and_then(nmea_date));
        }
        _ => return Ok(None),
    }
    Ok(Some(out))
}

/// `hhmmss.ss` → `hh:mm:ss.ss`.
fn nmea_time(s: &str) -> Option<String> {
    if s.len() < 6 || !s[..6].bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(format!("{}:{}:{}", &s[..2], &s[2..4], &s[4..]))
}

/// `ddmmyy` → `20yy-mm-dd` (NMEA carries two-digit years; this reads them as 2000–2099).
fn nmea_date(s: &str) -> Option<String> {
    if s.len() != 6 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(format!("20{}-{}-{}", &s[4..6], &s[2..4], &s[..2]))
}

/// `ddmm.mmmm` (or `dddmm.mmmm`) with its hemisphere → signed decimal degrees.
fn coordinate(
    value: Option<&str>,
    hemisphere: Option<&str>,
    degree_digits: usize,
) -> Option<String> {
    let v = value?;
    if v.len() < degree_digits + 2 {
        return None;
    }
    let deg: f64 = v[..degree_digits].parse().ok()?;
    let min: f64 = v[degree_digits..].parse().ok()?;
    if !(0.0..60.0).contains(&min) {
        return None;
    }
    let sign = match hemisphere? {
        "N" | "E" => 1.0,
        "S" | "W" => -1.0,
        _ => return None,
    };
    let d = sign * (deg + min / 60.0);
    // Seven decimals: about a centimetre, more than any receiver gives.
    Some(
        format!("{:.7}", d)
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nm() -> Parser {
        Parser::Nmea(vec!["GGA".into(), "RMC".into()])
    }

    /// Acceptance testing (#10): a line cut short by noise, glued to the next one, published
    /// humidity 4 because the regex was searched, not matched against the whole line.
    #[test]
    fn a_regex_must_match_the_whole_line() {
        let p = Parser::regex(r"T=(?P<temp>-?\d+(\.\d+)?),H=(?P<hum>\d+)").unwrap();
        assert_eq!(p.parse("T=21.5,H=4T=21.5,H=40"), Err(ParseError::NoMatch));
        assert_eq!(p.parse("noise T=21.5,H=40"), Err(ParseError::NoMatch));
        let f = p.parse("T=21.5,H=40").unwrap().unwrap();
        assert_eq!(f["hum"], "40");
        // Alternatives are anchored as a whole, not just the first and the last.
        let p = Parser::regex(r"A=(?P<a>\d+)|B=(?P<b>\d+)").unwrap();
        assert_eq!(p.parse("A=1x"), Err(ParseError::NoMatch));
        assert_eq!(p.parse("xB=2"), Err(ParseError::NoMatch));
        assert_eq!(p.parse("B=2").unwrap().unwrap()["b"], "2");
        // `.*` searches, for those who want it.
        let p = Parser::regex(r".*H=(?P<hum>\d+).*").unwrap();
        assert_eq!(p.parse("junk H=40 junk").unwrap().unwrap()["hum"], "40");
    }

    #[test]
    fn regex_named_and_numbered_groups() {
        let p = Parser::Regex(Regex::new(r"T=(?P<temp>-?\d+(\.\d+)?),H=(?P<hum>\d+)").unwrap());
        let f = p.parse("T=-3.5,H=81").unwrap().unwrap();
        assert_eq!(f["temp"], "-3.5");
        assert_eq!(f["hum"], "81");
        assert_eq!(f["1"], "-3.5");
        assert_eq!(p.parse("garbage"), Err(ParseError::NoMatch));
        assert!(p.knows_field("temp").is_ok());
        assert!(
            p.knows_field("pressure")
                .unwrap_err()
                .contains("named groups: temp, hum")
        );
    }

    #[test]
    fn split_by_index_trims() {
        let f = Parser::Split(",".into())
            .parse("a, 12.5 ,x")
            .unwrap()
            .unwrap();
        assert_eq!(
            (f["0"].as_str(), f["1"].as_str(), f["2"].as_str()),
            ("a", "12.5", "x")
        );
        assert!(Parser::Split(",".into()).knows_field("temp").is_err());
    }

    #[test]
    fn json_by_key_path() {
        let f = Parser::Json
            .parse(r#"{"env":{"temp":21.5,"ok":true},"pm":[3,4],"id":"A1"}"#)
            .unwrap()
            .unwrap();
        assert_eq!(f["env.temp"], "21.5");
        assert_eq!(f["env.ok"], "true");
        assert_eq!(f["pm.1"], "4");
        assert_eq!(f["id"], "A1");
        assert!(matches!(
            Parser::Json.parse("{oops"),
            Err(ParseError::BadJson(_))
        ));
    }

    #[test]
    fn gga_decodes_with_south_and_west_negative() {
        // From gpsd's NMEA reference; checksum recomputed for the altered hemispheres.
        let f = nm()
            .parse("$GPGGA,123519,4807.038,S,01131.000,W,1,08,0.9,545.4,M,46.9,M,,*48")
            .unwrap()
            .unwrap();
        assert_eq!(f["time"], "12:35:19");
        assert_eq!(f["latitude"], "-48.1173");
        assert_eq!(f["longitude"], "-11.5166667");
        assert_eq!(f["fix_quality"], "1");
        assert_eq!(f["satellites"], "8");
        assert_eq!(f["hdop"], "0.9");
        assert_eq!(f["altitude"], "545.4");
        assert_eq!(f["GGA.altitude"], "545.4");
    }

    #[test]
    fn rmc_decodes_from_any_talker() {
        let f = nm()
            .parse("$GNRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W*74")
            .unwrap()
            .unwrap();
        assert_eq!(f["time"], "12:35:19");
        assert_eq!(f["status"], "A");
        assert_eq!(f["date"], "2094-03-23");
        assert_eq!(f["latitude"], "48.1173");
        assert_eq!(f["longitude"], "11.5166667");
        assert_eq!(f["speed_knots"], "022.4");
        assert_eq!(f["course"], "084.4");
    }

    #[test]
    fn a_bad_checksum_is_refused() {
        let r = nm().parse("$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*49");
        assert!(matches!(r, Err(ParseError::BadChecksum { .. })), "{r:?}");
        assert_eq!(nm().parse("GPGGA,no dollar"), Err(ParseError::NotNmea));
        assert_eq!(nm().parse("$GPGGA,123519"), Err(ParseError::NotNmea));
    }

    #[test]
    fn other_sentences_are_ignored_not_errors() {
        // $GPGSV with a valid checksum.
        let line = "$GPGSV,2,1,08,01,40,083,46,02,17,308,41,12,07,344,39,14,22,228,45*75";
        assert_eq!(nm().parse(line), Ok(None));
    }

    #[test]
    fn a_fix_without_position_gives_no_position() {
        let f = nm()
            .parse("$GPGGA,123520,,,,,0,00,,,M,,M,,*61")
            .unwrap()
            .unwrap();
        assert!(!f.contains_key("latitude"));
        assert_eq!(f["fix_quality"], "0");
        assert_eq!(f["satellites"], "0");
    }

    #[test]
    fn non_ascii_with_a_valid_checksum_is_refused_not_a_panic() {
        let data = "GPGGA,1é3519,4807.038,N";
        let sum = data.bytes().fold(0u8, |a, b| a ^ b);
        assert_eq!(
            nm().parse(&format!("${data}*{sum:02X}")),
            Err(ParseError::NotNmea)
        );
        let data = "GéGGA,1";
        let sum = data.bytes().fold(0u8, |a, b| a ^ b);
        assert_eq!(
            nm().parse(&format!("${data}*{sum:02X}")),
            Err(ParseError::NotNmea)
        );
    }

    #[test]
    fn nmea_field_names_are_checked() {
        assert!(nm().knows_field("latitude").is_ok());
        assert!(nm().knows_field("RMC.speed_knots").is_ok());
        assert!(nm().knows_field("GGA.speed_knots").is_err());
        assert!(
            Parser::Nmea(vec!["GGA".into()])
                .knows_field("date")
                .is_err()
        );
    }
}
