//! Rows read from the queue, made ready to publish: the payload rendered once, what can never
//! be published found out (and why), the MQTT 5 properties of each, and the pacing of a
//! replay; and the command subscriptions cut to the broker's packet size. Pure: no I/O.

use std::collections::HashMap;

use super::link::Extras;
use crate::message::{Body, Stored};

/// Largest packet the uplink sends (and accepts).
pub const MAX_PACKET: usize = 1 << 20;

/// Why a topic and payload can never be published: MQTT forbids wildcards and NUL in a topic
/// name, an empty topic, and the packet must fit the size limit.
pub fn unpublishable(topic: &str, payload_len: usize) -> Option<String> {
    unpublishable_within(topic, payload_len, MAX_PACKET)
}

/// [`unpublishable`] under a packet size limit of `max` bytes (the broker's, under MQTT 5).
pub(super) fn unpublishable_within(topic: &str, payload_len: usize, max: usize) -> Option<String> {
    if topic.is_empty() {
        return Some("empty topic".into());
    }
    if let Some(c) = topic.chars().find(|c| matches!(c, '+' | '#' | '\0')) {
        return Some(format!("topic {topic:?} contains {c:?}"));
    }
    if topic.len() > u16::MAX as usize {
        return Some("topic longer than 65535 bytes".into());
    }
    if topic.len() + payload_len + 16 > max {
        return Some(if max < MAX_PACKET {
            format!("packet larger than the broker's maximum packet size ({max} bytes)")
        } else {
            format!("packet larger than {MAX_PACKET} bytes")
        });
    }
    None
}

/// Bytes a publish takes on the wire, near enough for the window's budget.
pub(super) fn wire_bytes(topic: &str, payload_len: usize) -> usize {
    topic.len() + payload_len + 8
}

/// A queued row read for publishing, its payload rendered once.
pub(super) struct Ready {
    pub(super) seq: u64,
    pub(super) topic: String,
    pub(super) qos: u8,
    pub(super) retain: bool,
    pub(super) payload: Vec<u8>,
    /// MQTT 5 properties (message expiry, `ts`/`seq` of a bare value); the alias is added when
    /// it is sent.
    pub(super) extras: Extras,
    /// Sparkplug: this is the reading's DDATA copy, encoded when it is sent.
    pub(super) sp: Option<super::sparkplug::SpRow>,
}

/// What a session needs to know to turn rows into publishes.
pub(super) struct Publishing<'a> {
    /// The largest packet the broker takes (ours, or the broker's under MQTT 5).
    pub(super) max_packet: usize,
    /// MQTT 5: the properties are sent.
    pub(super) v5: bool,
    pub(super) expiry: &'a HashMap<String, u32>,
}

impl Ready {
    /// The row ready to publish at `now`, or why it can never be: (seq, topic, reason).
    pub(super) fn new(
        row: Stored,
        how: &Publishing<'_>,
        now: std::time::Instant,
    ) -> Result<Ready, (u64, String, String)> {
        let payload = row.payload();
        let mut extras = Extras::default();
        if how.v5 {
            // Expiry counts from when the broker has it: a reading replayed late keeps only
            // what is left of its time (at least a second: live subscribers still get it).
            // Its age is the time it has been queued, by the monotonic clock (#28: after NTP
            // stepped the clock from 1970, a reading's `ts` made every age enormous, and
            // readings polled before the step went out with 1 s of their hour).
            if let Some(&secs) = how.expiry.get(&row.message.topic) {
                let age = match row.queued {
                    Some(at) => now.saturating_duration_since(at).as_secs() as i64,
                    None => (crate::message::now_ms() - row.message.ts_ms).max(0) / 1000,
                };
                extras.expiry = Some((secs as i64 - age).max(1) as u32);
            }
            if matches!(row.message.body, Body::Bare { .. }) {
                extras.user = vec![
                    ("ts".into(), crate::message::format_ts(row.message.ts_ms)),
                    ("seq".into(), row.seq.to_string()),
                ];
            }
        }
        let m = row.message;
        if let Some(why) = unpublishable_within(
            &m.topic,
            payload.len() + extras.wire_bytes(),
            how.max_packet,
        ) {
            return Err((row.seq, m.topic, why));
        }
        Ok(Ready {
            seq: row.seq,
            topic: m.topic,
            qos: m.qos,
            retain: m.retain,
            payload,
            extras,
            sp: None,
        })
    }

    /// Bytes on the wire with this topic (the full one, or none behind an alias).
    pub(super) fn bytes(&self, topic: &str) -> usize {
        wire_bytes(topic, self.payload.len())
            + if self.extras.is_empty() {
                0
            } else {
                self.extras.wire_bytes()
            }
    }
}

/// Paces publishing to `rate` messages per second, with at most one second of burst.
#[derive(Debug)]
pub(super) struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: std::time::Instant,
}

impl TokenBucket {
    pub(super) fn new(rate: f64) -> TokenBucket {
        TokenBucket {
            rate,
            tokens: 1.0,
            last: std::time::Instant::now(),
        }
    }

    /// Takes one token if there is one.
    pub(super) fn take(&mut self, now: std::time::Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.rate.max(1.0));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Most filters in one SUBSCRIBE.
const FILTERS_PER_SUBSCRIBE: usize = 64;

/// `filters` in SUBSCRIBE packets of at most [`FILTERS_PER_SUBSCRIBE`] filters that each fit
/// `max_packet` bytes, and the filters that fit in none. Pure.
pub(super) fn subscriptions(
    filters: &[String],
    max_packet: usize,
) -> (Vec<Vec<String>>, Vec<String>) {
    // The fixed header (at most 5 bytes), the packet id and MQTT 5's property length: 16 is
    // generous; each filter costs its length, its two-byte length and its options byte.
    const HEADER: usize = 16;
    let cost = |f: &String| f.len() + 3;
    let (mut batches, mut too_large) = (Vec::new(), Vec::new());
    let mut batch: Vec<String> = Vec::new();
    let mut bytes = HEADER;
    for f in filters {
        if HEADER + cost(f) > max_packet {
            too_large.push(f.clone());
            continue;
        }
        if batch.len() == FILTERS_PER_SUBSCRIBE || bytes + cost(f) > max_packet {
            batches.push(std::mem::take(&mut batch));
            bytes = HEADER;
        }
        bytes += cost(f);
        batch.push(f.clone());
    }
    if !batch.is_empty() {
        batches.push(batch);
    }
    (batches, too_large)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_token_bucket_paces_to_its_rate() {
        let t0 = std::time::Instant::now();
        let mut b = TokenBucket::new(10.0);
        b.last = t0;
        assert!(b.take(t0));
        assert!(!b.take(t0), "no burst beyond the first token at start");
        // One second later: ten more, not eleven.
        let t1 = t0 + Duration::from_secs(1);
        let n = (0..20).filter(|_| b.take(t1)).count();
        assert_eq!(n, 10);
    }

    /// #28 (10), found from outside: a reading polled before NTP stepped the clock from 1970
    /// carried a `ts` of 1970 and went out with 1 s of its hour's `message_expiry`. Its age is
    /// the time it has been queued, by the monotonic clock.
    #[test]
    fn message_expiry_counts_the_time_queued_not_the_wall_clock() {
        let row = |ts_ms, queued| Stored {
            seq: 7,
            queued,
            message: crate::message::Message {
                topic: "t".into(),
                qos: 1,
                retain: false,
                ts_ms,
                body: crate::message::Body::Point {
                    value: crate::mapping::Value::Int(1),
                    unit: None,
                },
            },
        };
        let expiry = HashMap::from([("t".to_string(), 3600u32)]);
        let how = Publishing {
            max_packet: MAX_PACKET,
            v5: true,
            expiry: &expiry,
        };
        let now = std::time::Instant::now();
        let expiry_of = |r| Ready::new(r, &how, now).unwrap().extras.expiry.unwrap();
        // Polled in "1970", queued a moment ago: nearly all of its hour.
        assert!(expiry_of(row(1_000, Some(now))) >= 3599);
        // Queued 20 minutes ago (a backlog replayed): what is left.
        let earlier = now.checked_sub(Duration::from_secs(1200)).unwrap();
        let left = expiry_of(row(1_000, Some(earlier)));
        assert!((2399..=2400).contains(&left), "{left}");
        // Queued longer than its hour: a second, so live subscribers still get it.
        let long_ago = now.checked_sub(Duration::from_secs(4000)).unwrap();
        assert_eq!(expiry_of(row(crate::message::now_ms(), Some(long_ago))), 1);
    }

    #[test]
    fn topics_mqtt_forbids_are_unpublishable() {
        assert_eq!(unpublishable("site/a/temp", 10), None);
        for bad in ["site/+/temp", "site/#", "a\0b", ""] {
            assert!(unpublishable(bad, 10).is_some(), "{bad:?}");
        }
        assert!(unpublishable("a", MAX_PACKET).is_some());
    }

    /// #28 (1): one over-size command topic made a SUBSCRIBE larger than the broker's limit,
    /// which ended every session before anything was published.
    #[test]
    fn subscriptions_fit_the_brokers_packet_size_and_an_over_size_filter_is_left_out() {
        let long = format!("fieldgate/gw1/{}/a/set", "x".repeat(4200));
        let mut filters: Vec<String> = (0..150)
            .map(|i| format!("fieldgate/gw1/m/p{i}/set"))
            .collect();
        filters.insert(70, long.clone());
        let (batches, too_large) = subscriptions(&filters, 4096);
        assert_eq!(too_large, vec![long]);
        let sent: Vec<&String> = batches.iter().flatten().collect();
        assert_eq!(sent.len(), 150, "every other filter is subscribed");
        for b in &batches {
            assert!(b.len() <= FILTERS_PER_SUBSCRIBE);
            assert!(16 + b.iter().map(|f| f.len() + 3).sum::<usize>() <= 4096);
        }
        // A small limit: more, smaller packets, nothing lost.
        let (batches, too_large) = subscriptions(&filters[..10], 100);
        assert!(too_large.is_empty());
        assert_eq!(batches.iter().flatten().count(), 10);
        assert!(batches.len() >= 3);
    }
}
