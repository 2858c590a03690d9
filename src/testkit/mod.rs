//! The test kit, compiled only with the `testkit` feature (on by default, off in the Pi
//! package): the parts `fieldgate demo`, the integration tests and the benchmarks run against.
//!
//! - [`sim`]: simulated Modbus devices, over TCP and as an RTU bus on a pseudo-terminal, with
//!   faults on demand (exceptions, silence, CRC errors, line noise, late replies);
//! - [`proxy`]: a TCP proxy between the gateway and the broker that cuts, stalls, resets and
//!   shapes the link (delay, bandwidth);
//! - [`broker`]: rumqttd in process, on a free loopback port.

pub mod broker;
pub mod proxy;
pub mod sim;
