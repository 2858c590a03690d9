//! Polling: one task per bus decides which device is asked for what, and when, and turns what
//! the device answered into messages for the store.
//!
//! - [`modbus`]: Modbus TCP and RTU buses (poll groups, commands, refused reads);
//! - [`line`](mod@line): serial line buses (text sensors that stream or answer a request).
//!
//! Both share what a bus task does besides asking: the device health kept here
//! ([`DeviceHealth`]: failures in a row, `offline` after `offline_after`, `online` again at the
//! first success, and what was last published), the figures and liveness reported through a
//! [`Reporter`], and what a poll's values become: computed points added ([`compute`]), those
//! unchanged left out (`change`, report by exception), then messages ([`messages`]). The bytes
//! to and from devices belong to `bus`; decoding to `mapping`. Nothing here waits for the uplink: the store takes every message.

pub mod line;
pub mod modbus;

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::bus::Bus;
use crate::change::ChangeFilter;
use crate::config::{Device, PayloadFormat, PublishMode};
use crate::mapping::Value;
use crate::message::{Body, Message, now_ms};
use crate::state::{DeviceStats, Shared};

/// Adds to a poll's `values` the computed points whose inputs it read (a missing input makes
/// the computed value `null`).
pub fn compute(device: &Device, values: &mut Vec<(usize, Value)>) {
    for c in &device.computed {
        if !values.iter().any(|(i, _)| c.inputs.contains(i)) {
            continue;
        }
        let v = c
            .expr
            .eval(&|j| values.iter().find(|(i, _)| *i == j).map(|(_, v)| v.clone()));
        values.push((
            c.point,
            crate::compute::as_type(v, device.points[c.point].dtype),
        ));
    }
}

/// The messages one poll of `device` produces from `values` (point index, value).
pub fn messages(device: &Device, ts_ms: i64, values: Vec<(usize, Value)>) -> Vec<Message> {
    if values.is_empty() {
        return Vec::new();
    }
    match device.publish {
        PublishMode::Device => {
            let values = values
                .into_iter()
                .map(|(i, v)| (device.points[i].name.clone(), v))
                .collect();
            let d = &device.device_delivery;
            vec![Message {
                topic: d.topic.clone(),
                qos: d.qos,
                retain: d.retain,
                ts_ms,
                body: Body::Device { values },
            }]
        }
        PublishMode::Point => values
            .into_iter()
            .map(|(i, value)| {
                let p = &device.points[i];
                let body = match device.payload.get(&p.name) {
                    Some(PayloadFormat::Value) => Body::Bare { value },
                    _ => Body::Point {
                        value,
                        unit: p.unit.clone(),
                    },
                };
                Message {
                    topic: p.delivery.topic.clone(),
                    qos: p.delivery.qos,
                    retain: p.delivery.retain,
                    ts_ms,
                    body,
                }
            })
            .collect(),
    }
}

/// What a bus task reports through: the bus's figures, device availability, liveness for the
/// watchdog, and the store its messages go to.
pub struct Reporter {
    bus: String,
    task: String,
    shared: Shared,
    /// The longest one request can take on this bus.
    worst_request: Duration,
}

/// The figures kept under `name`, made on first use: the name is copied once, not on every
/// poll (`entry` would take an owned key each time).
fn named<'a, V: Default>(map: &'a mut BTreeMap<String, V>, name: &str) -> &'a mut V {
    if !map.contains_key(name) {
        map.insert(name.to_owned(), V::default());
    }
    map.get_mut(name).expect("just inserted")
}

impl Reporter {
    pub fn new(bus: &Bus, shared: Shared) -> Reporter {
        Reporter {
            bus: bus.name.clone(),
            task: format!("bus {}", bus.name),
            worst_request: bus.transport.worst_request_time(),
            shared,
        }
    }

    pub fn bus(&self) -> &str {
        &self.bus
    }

    /// Promises the watchdog to be back by `until` plus the time `requests` requests may take.
    pub fn beat(&self, until: Instant, requests: u32) {
        self.shared.health.beat(
            &self.task,
            until.max(Instant::now()).into_std()
                + self.worst_request * requests.max(1)
                + crate::systemd::SLACK,
        );
    }

    /// The task has stopped: the watchdog stops expecting it.
    pub fn stopped(&self) {
        self.shared.health.forget(&self.task);
    }

    /// Changes the figures of this bus.
    pub fn bus_stats<R>(&self, f: impl FnOnce(&mut crate::state::BusStats) -> R) -> R {
        let mut all = self.shared.stats.lock().expect("not poisoned");
        f(named(&mut all, &self.bus))
    }

    /// Counts one failed request or rejected line of `kind` on this bus.
    pub fn count_error(&self, kind: &'static str) {
        self.bus_stats(|b| *b.errors.entry(kind.into()).or_default() += 1);
    }

    /// Keeps `message` as the last error of this bus (and of `device`, if it is one device's).
    pub fn note_error(&self, device: Option<&str>, message: String) {
        let note = crate::state::ErrorNote {
            message,
            at_ms: now_ms(),
        };
        self.bus_stats(|b| {
            if let Some(d) = device {
                named(&mut b.devices, d).last_error = Some(note.clone());
            }
            b.last_error = Some(note);
        });
    }

    /// Keeps each value as its point's latest reading, for the status page (when it is on).
    fn keep_readings(&self, device: &Device, ts_ms: i64, values: &[(usize, Value)]) {
        if !self.shared.keep_values || values.is_empty() {
            return;
        }
        self.device(&device.name, |d| {
            for (i, v) in values {
                let p = &device.points[*i];
                if p.internal {
                    continue;
                }
                match d.values.get_mut(&p.name) {
                    Some(r) => {
                        r.value = v.clone();
                        r.ts_ms = ts_ms;
                    }
                    None => {
                        d.values.insert(
                            p.name.clone(),
                            crate::state::Reading {
                                value: v.clone(),
                                unit: p.unit.clone(),
                                ts_ms,
                                every_ms: p.every.as_millis() as u64,
                            },
                        );
                    }
                }
            }
        });
    }

    /// Changes the figures of one device of this bus.
    pub fn device<R>(&self, name: &str, f: impl FnOnce(&mut DeviceStats) -> R) -> R {
        self.bus_stats(|b| f(named(&mut b.devices, name)))
    }

    /// Hands the messages of one poll to the store (which never makes a poller wait).
    pub fn enqueue(&self, device: &Device, ts_ms: i64, values: Vec<(usize, Value)>) {
        if let Err(e) = self.shared.store.enqueue(messages(device, ts_ms, values)) {
            tracing::error!(error = %e, device = %device.name, "cannot hand readings to the store");
        }
    }

    fn set_online(&self, device: &Device, online: bool, failures: u32) {
        self.device(&device.name, |d| {
            d.online = Some(online);
            if online {
                d.last_success_ms = Some(now_ms());
            }
        });
        if self
            .shared
            .availability
            .set(&device.availability_topic, online)
            && !online
        {
            tracing::warn!(bus = %self.bus, device = %device.name, failed_polls = failures, "device is offline");
        }
    }
}

/// The health of one device: failed polls in a row and what they imply, and what was last
/// published of it. A device is announced `offline` after `offline_after` failed polls and
/// `online` at its first success; one failed poll is retried at the next cycle, a device that
/// keeps failing is backed off. Offline, it forgets what it published: the first good poll
/// afterwards publishes every point.
#[derive(Debug, Default)]
pub struct DeviceHealth {
    failures: u32,
    published: ChangeFilter,
}

impl DeviceHealth {
    /// Hands one poll's values to the store: computed points added, values unchanged since
    /// they were last published (`on_change`) left out and counted.
    pub fn publish(
        &mut self,
        r: &Reporter,
        device: &Device,
        ts_ms: i64,
        mut values: Vec<(usize, Value)>,
    ) {
        compute(device, &mut values);
        self.publish_computed(r, device, ts_ms, values);
    }

    /// As [`DeviceHealth::publish`], for values that already include the computed points.
    pub fn publish_computed(
        &mut self,
        r: &Reporter,
        device: &Device,
        ts_ms: i64,
        mut values: Vec<(usize, Value)>,
    ) {
        r.keep_readings(device, ts_ms, &values);
        values.retain(|(i, _)| !device.points[*i].internal);
        let read = values.len();
        self.published.retain(
            &device.points,
            device.whole_device_on_change,
            Instant::now(),
            &mut values,
        );
        if values.len() < read {
            r.device(&device.name, |d| {
                d.unchanged += (read - values.len()) as u64
            });
        }
        r.enqueue(device, ts_ms, values);
    }

    /// Hands a commanded point's read-back value to the store (always published).
    pub fn publish_command(&mut self, r: &Reporter, device: &Device, point: usize, value: Value) {
        let ts_ms = now_ms();
        self.published.published(point, &value, Instant::now());
        let values = vec![(point, value)];
        r.keep_readings(device, ts_ms, &values);
        r.enqueue(device, ts_ms, values);
    }

    /// Records a good poll: figures, availability, and a log line if it had been failing.
    pub fn succeeded(&mut self, r: &Reporter, device: &Device) {
        if self.failures > 0 {
            tracing::info!(bus = %r.bus, device = %device.name, failed_polls = self.failures, "device answers again");
        }
        self.failures = 0;
        r.set_online(device, true, 0);
    }

    /// Records a failed poll; returns the failures in a row.
    pub fn failed(&mut self, r: &Reporter, device: &Device) -> u32 {
        self.failures += 1;
        r.device(&device.name, |d| d.failed_polls += 1);
        if self.failures >= device.offline_after {
            r.set_online(device, false, self.failures);
            self.published.forget();
        }
        self.failures
    }

    /// Failed polls in a row.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// How long to wait before polling again: nothing after one failure, then doubling.
    pub fn backoff(&self) -> Duration {
        Backoff::DEVICE.after(self.failures.saturating_sub(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// A serial line device (fields of a text line) with a computed point.
    fn line_device() -> Device {
        let yaml = "mqtt: { url: mqtt://127.0.0.1 }\nbuses:\n  port: { serial_line: { port: /dev/null } }\ndevices:\n  scale:\n    bus: port\n    parse: { split: \",\" }\n    points:\n      gross: { field: 0, type: f64 }\n      tare: { field: 1, type: f64 }\n      net: { expr: \"gross - tare\", unit: kg }\n";
        let c = Config::from_text(std::path::Path::new("c.yaml"), yaml).unwrap();
        c.devices[0].clone()
    }

    fn index(d: &Device, name: &str) -> usize {
        d.points.iter().position(|p| p.name == name).unwrap()
    }

    #[test]
    fn computed_points_come_from_the_values_of_the_same_poll() {
        let d = line_device();
        let (gross, tare, net) = (index(&d, "gross"), index(&d, "tare"), index(&d, "net"));
        let mut values = vec![(gross, Value::Float(12.5)), (tare, Value::Float(0.5))];
        compute(&d, &mut values);
        assert_eq!(values.last(), Some(&(net, Value::Float(12.0))));
        // An input missing from this line: null, not the value of another line.
        let mut values = vec![(gross, Value::Float(13.0))];
        compute(&d, &mut values);
        assert_eq!(values.last(), Some(&(net, Value::Null)));
        // None of its inputs read: not computed at all.
        let mut values = vec![];
        compute(&d, &mut values);
        assert!(values.is_empty());
    }
}
