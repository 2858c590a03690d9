//! fieldgate: an edge gateway that polls Modbus devices and publishes their readings to MQTT
//! without losing any, through a SQLite store-and-forward queue.
//!
//! # Layout
//!
//! One reading, from the bus to the broker, by file:
//!
//! ```text
//! config/ ─────────────► (at start) the validated model: buses, devices, points, read plans
//!   uses bus::Transport, mapping::Point, plan, topics
//!
//! poll/modbus.rs ──► bus/{modbus_tcp,modbus_rtu}.rs   words and bits from a device
//! poll/line.rs   ──► bus/serial_line.rs, parse.rs      lines and their fields
//!        │
//!        ├──► mapping/          decoded into typed values (pure)
//!        ├──► compute           computed points (`expr:`) added (pure)
//!        ├──► change            unchanged values left out: report by exception (pure)
//!        └──► poll::messages    values → message::Message (topic, QoS, ts, body)
//!                 │
//!                 ▼
//!              store/           SQLite queue: seq assigned, committed before publishing
//!                 │
//!                 ▼
//!              uplink/          rumqttc: session, in-flight window; deleted on PUBACK
//! ```
//!
//! Below them all, free of I/O: `modbus` (tables, requests, frames, CRC), `backoff`, `topics`.
//! `state` holds what the running tasks share (figures, availability, the queue's handle) and
//! `status` its typed snapshot (status message, `status.json`, `/metrics` in `metrics`).
//! `gateway` wires the tasks together and owns reload and shutdown; `discovery` renders Home
//! Assistant configs; `commission` serves `fieldgate read`; `systemd` and `tls` are the edges to
//! the service manager and the broker's certificates. `testkit` (feature `testkit`) holds the
//! simulator, the fault proxy and the in-process broker of the demo and the tests.

pub mod backoff;
pub mod bus;
pub mod change;
pub mod commission;
pub mod compute;
pub mod config;
pub mod discovery;
pub mod files;
pub mod gateway;
pub mod mapping;
pub mod message;
pub mod metrics;
pub mod modbus;
pub mod parse;
pub mod plan;
pub mod poll;
pub mod sparkplug;
pub mod state;
pub mod status;
pub mod store;
pub mod systemd;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod tls;
pub mod topics;
pub mod uplink;
pub mod web;
