//! fieldgate: an edge gateway that polls Modbus devices and publishes their readings to MQTT
//! without losing any, through a SQLite store-and-forward queue.
//!
//! # Layout
//!
//! The data flows through one module per stage:
//!
//! ```text
//! config ──► plan                     (at start: validated config, read plans)
//!   │
//!   ▼
//! poller ──► bus/{modbus_tcp,         (one task per Modbus bus: ask devices, get words and bits)
//!   │          modbus_rtu}
//! line   ──► bus/serial_line, parse   (one task per serial line bus: lines → named fields)
//!   │   └──► mapping                  (decode words into typed values)
//!   │   └──► message                  (values → Message: topic, QoS, retain, ts, body)
//!   ▼
//! store                               (SQLite queue: seq assigned, committed before publishing)
//!   │
//!   ▼
//! uplink                              (rumqttc QoS 1; a row is deleted on its PUBACK)
//! ```
//!
//! `gateway` wires these together and owns shutdown; `commission` serves `fieldgate read`. `sim` (a simulated Modbus device), `proxy`
//! (a fault-injecting TCP proxy) and `broker` (rumqttd in-process) serve the demo and the tests.

pub mod backoff;
#[cfg(feature = "testkit")]
pub mod broker;
pub mod bus;
pub mod commission;
pub mod config;
pub mod discovery;
pub mod gateway;
pub mod mapping;
pub mod message;
pub mod metrics;
pub mod modbus;
pub mod parse;
pub mod plan;
pub mod poll;
#[cfg(feature = "testkit")]
pub mod proxy;
#[cfg(feature = "testkit")]
pub mod sim;
pub mod state;
pub mod status;
pub mod store;
pub mod systemd;
pub mod tls;
pub mod topics;
pub mod uplink;
