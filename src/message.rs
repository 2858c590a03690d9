//! The values that flow between stages, and the rendering of MQTT payloads.
//!
//! `poll` turns decoded values into [`Message`]s (topic, QoS, retain, poll time, body);
//! `store` gives each one a gateway-wide `seq` and keeps it as a [`Stored`] row; `uplink`
//! renders the final payload with [`Stored::payload`] when it publishes. Rendering is late on
//! purpose: `seq` exists only once the row is committed, and the payload must carry it.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::macros::format_description;

use crate::mapping::Value;

/// The body of a message, before `ts` and `seq` are added.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Body {
    /// `{"value": …, "unit": …, "ts": …, "seq": …}`
    Point { value: Value, unit: Option<String> },
    /// The bare value as text (`payload: value`).
    Bare { value: Value },
    /// `{"ts": …, "seq": …, "values": {…}}` (`publish: device`).
    Device { values: BTreeMap<String, Value> },
}

/// A message waiting to be stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub topic: String,
    pub qos: u8,
    pub retain: bool,
    /// Poll time, milliseconds since the Unix epoch (UTC).
    pub ts_ms: i64,
    pub body: Body,
}

/// A message as the queue holds it: with its gateway-wide sequence number.
#[derive(Debug, Clone)]
pub struct Stored {
    pub seq: u64,
    pub message: Message,
    /// When it entered the queue by the monotonic clock, as the queue knows it (rows found at
    /// open: the open); None where nobody knows. Ages (MQTT 5 message expiry) count from here:
    /// a wall clock stepped from 1970 by NTP made a reading's `ts` an hour-long age of nothing.
    pub queued: Option<std::time::Instant>,
}

/// Two rows are the same row whenever they were read.
impl PartialEq for Stored {
    fn eq(&self, other: &Self) -> bool {
        self.seq == other.seq && self.message == other.message
    }
}

impl Stored {
    /// The payload bytes as a subscriber receives them.
    pub fn payload(&self) -> Vec<u8> {
        let m = &self.message;
        let ts = format_ts(m.ts_ms);
        match &m.body {
            Body::Point { value, unit } => {
                #[derive(Serialize)]
                struct P<'a> {
                    value: &'a Value,
                    #[serde(skip_serializing_if = "Option::is_none")]
                    unit: &'a Option<String>,
                    ts: &'a str,
                    seq: u64,
                }
                serde_json::to_vec(&P {
                    value,
                    unit,
                    ts: &ts,
                    seq: self.seq,
                })
                .expect("plain data serializes")
            }
            Body::Bare { value } => value.to_string().into_bytes(),
            Body::Device { values } => {
                #[derive(Serialize)]
                struct D<'a> {
                    ts: &'a str,
                    seq: u64,
                    values: &'a BTreeMap<String, Value>,
                }
                serde_json::to_vec(&D {
                    ts: &ts,
                    seq: self.seq,
                    values,
                })
                .expect("plain data serializes")
            }
        }
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// RFC 3339, UTC, milliseconds: `2026-11-26T04:00:00.123Z`.
pub fn format_ts(ts_ms: i64) -> String {
    let fmt =
        format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    OffsetDateTime::from_unix_timestamp_nanos(ts_ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| t.format(&fmt).ok())
        .unwrap_or_else(|| ts_ms.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(body: Body) -> Stored {
        Stored {
            seq: 1042,
            queued: None,
            message: Message {
                topic: "t".into(),
                qos: 1,
                retain: false,
                ts_ms: 1_795_665_600_123, // 2026-11-26T04:00:00.123Z
                body,
            },
        }
    }

    #[test]
    fn point_payload_has_value_unit_ts_and_seq() {
        let s = stored(Body::Point {
            value: Value::Float(61.25),
            unit: Some("°C".into()),
        });
        assert_eq!(
            String::from_utf8(s.payload()).unwrap(),
            r#"{"value":61.25,"unit":"°C","ts":"2026-11-26T04:00:00.123Z","seq":1042}"#
        );
    }

    #[test]
    fn point_payload_without_unit_omits_it() {
        let s = stored(Body::Point {
            value: Value::Bool(true),
            unit: None,
        });
        assert_eq!(
            String::from_utf8(s.payload()).unwrap(),
            r#"{"value":true,"ts":"2026-11-26T04:00:00.123Z","seq":1042}"#
        );
    }

    #[test]
    fn bare_payload_is_the_value_as_text() {
        let s = stored(Body::Bare {
            value: Value::Int(-3),
        });
        assert_eq!(s.payload(), b"-3");
    }

    #[test]
    fn device_payload_carries_all_values() {
        let mut values = BTreeMap::new();
        values.insert("a".to_string(), Value::UInt(1));
        values.insert("b".to_string(), Value::Text("x".into()));
        let s = stored(Body::Device { values });
        assert_eq!(
            String::from_utf8(s.payload()).unwrap(),
            r#"{"ts":"2026-11-26T04:00:00.123Z","seq":1042,"values":{"a":1,"b":"x"}}"#
        );
    }

    #[test]
    fn body_round_trips_through_json_for_the_store() {
        let b = Body::Point {
            value: Value::Float(0.1),
            unit: None,
        };
        let text = serde_json::to_string(&b).unwrap();
        assert_eq!(serde_json::from_str::<Body>(&text).unwrap(), b);
    }
}
