//! The Prometheus text of the gateway's figures, encoded with the prometheus-client crate from
//! the same snapshot as the status message, taken at each scrape. The status page's server
//! (`web`) serves it: at `/metrics` beside the page, and alone on `metrics: { listen: … }`.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::status::Snapshot;

type Labels = Vec<(String, String)>;

/// The exposition text for one snapshot.
pub fn render(snapshot: &Snapshot) -> String {
    let mut r = Registry::with_prefix("fieldgate");
    let gauge = |r: &mut Registry, name: &str, help: &str, value: f64| {
        let g: Gauge<f64, AtomicU64> = Gauge::default();
        g.set(value);
        r.register(name, help, g);
    };
    let q = &snapshot.queue;
    gauge(
        &mut r,
        "uptime_seconds",
        "Seconds since the gateway started",
        snapshot.uptime_s as f64,
    );
    gauge(
        &mut r,
        "queue_depth",
        "Readings waiting in the queue",
        q.depth as f64,
    );
    gauge(
        &mut r,
        "queue_oldest_age_seconds",
        "Age of the oldest queued reading",
        q.oldest_age_s.unwrap_or(0) as f64,
    );
    gauge(
        &mut r,
        "queue_bytes",
        "Bytes of queue.db in use",
        q.bytes as f64,
    );
    gauge(
        &mut r,
        "queue_last_seq",
        "Highest sequence number assigned",
        q.last_seq as f64,
    );
    gauge(
        &mut r,
        "queue_held",
        "Readings held in memory because the disk refuses writes",
        q.held as f64,
    );
    gauge(
        &mut r,
        "queue_write_failing",
        "1 while the disk refuses the queue's writes",
        if q.write_error.is_some() { 1.0 } else { 0.0 },
    );
    gauge(
        &mut r,
        "broker_connected",
        "1 while the MQTT uplink is connected",
        if snapshot.gateway.broker.connected {
            1.0
        } else {
            0.0
        },
    );
    let discarded: Counter = Counter::default();
    discarded.inc_by(snapshot.gateway.broker.discarded_incoming);
    r.register(
        "broker_discarded_incoming",
        "Packets from the broker larger than the gateway takes (1 MiB), read past and dropped",
        discarded,
    );
    let acked: Counter = Counter::default();
    acked.inc_by(q.acked_total);
    r.register("acknowledged", "Readings acknowledged by the broker", acked);
    let dropped: Family<Labels, Counter> = Family::default();
    for (reason, n) in [
        ("oldest", q.dropped.oldest),
        ("newest", q.dropped.newest),
        ("expired", q.dropped.expired),
        ("unsaved", q.dropped.unsaved),
        ("corrupt", q.dropped.corrupt),
    ] {
        dropped
            .get_or_create(&vec![("reason".into(), reason.into())])
            .inc_by(n);
    }
    r.register("dropped", "Readings dropped by a queue bound", dropped);
    let aside: Family<Labels, Gauge> = Family::default();
    for (reason, n) in &q.dropped.aside_by_reason {
        aside
            .get_or_create(&vec![("reason".into(), reason.clone())])
            .set(*n as i64);
    }
    r.register(
        "queue_aside",
        "Readings set aside (never published or refused by the broker), by reason",
        aside,
    );

    let requests: Family<Labels, Counter> = Family::default();
    let errors: Family<Labels, Counter> = Family::default();
    let util: Family<Labels, Gauge<f64, AtomicU64>> = Family::default();
    let online: Family<Labels, Gauge> = Family::default();
    let last_ok: Family<Labels, Gauge> = Family::default();
    for (bus, b) in &snapshot.buses {
        let l = vec![("bus".to_string(), bus.clone())];
        requests.get_or_create(&l).inc_by(b.requests);
        util.get_or_create(&l).set(b.utilisation);
        for (kind, n) in &b.errors {
            let mut l = l.clone();
            l.push(("kind".into(), kind.to_string()));
            errors.get_or_create(&l).inc_by(*n);
        }
        for (d, s) in &b.devices {
            let l = vec![
                ("bus".to_string(), bus.clone()),
                ("device".to_string(), d.clone()),
            ];
            online
                .get_or_create(&l)
                .set(i64::from(s.online == Some(true)));
            last_ok
                .get_or_create(&l)
                .set(s.last_success_ms.unwrap_or(0) / 1000);
        }
    }
    r.register("bus_requests", "Requests sent on a bus", requests);
    r.register(
        "bus_errors",
        "Failed requests and rejected lines, by kind",
        errors,
    );
    r.register(
        "bus_utilisation",
        "Share of time with a transaction on the wire",
        util,
    );
    r.register("device_online", "1 while the device answers", online);
    r.register(
        "device_last_success_timestamp_seconds",
        "When the device last answered",
        last_ok,
    );
    let mut out = String::new();
    encode(&mut out, &r).expect("writing to a String");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_snapshot_becomes_prometheus_text() {
        let s: Snapshot = serde_json::from_value(serde_json::json!({
            "uptime_s": 42,
            "gateway": {"id": "gw", "broker": {"connected": true}},
            "queue": {"depth": 3, "oldest_age_s": 7, "bytes": 4096, "last_seq": 99,
                      "dropped": {"oldest": 1, "newest": 0, "expired": 2, "total": 3}, "acked_total": 96},
            "buses": {"rs485": {"requests": 10, "utilisation": 0.25, "errors": {"timeout": 2},
                                 "devices": {"meter": {"online": true, "last_success_ms": 1795665600000_i64}}}}
        }))
        .unwrap();
        let text = render(&s);
        for line in [
            "fieldgate_uptime_seconds 42.0",
            "fieldgate_broker_connected 1.0",
            "fieldgate_queue_depth 3.0",
            "fieldgate_acknowledged_total 96",
            "fieldgate_dropped_total{reason=\"expired\"} 2",
            "fieldgate_bus_requests_total{bus=\"rs485\"} 10",
            "fieldgate_bus_errors_total{bus=\"rs485\",kind=\"timeout\"} 2",
            "fieldgate_bus_utilisation{bus=\"rs485\"} 0.25",
            "fieldgate_device_online{bus=\"rs485\",device=\"meter\"} 1",
        ] {
            assert!(text.contains(line), "missing `{line}` in\n{text}");
        }
    }
}
