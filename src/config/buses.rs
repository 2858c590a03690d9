//! `buses:`: transports, serial settings and timing, checked and filled in.

use std::time::Duration;

use super::diagnostic::{Ctx, Diagnostic};
use super::raw::*;
use super::resolver::Resolver;
use crate::bus::serial::{Endpoint, Parity, SerialSettings};
use crate::bus::{Bus, Transport};

/// Checks and fills in the settings of a serial port.
#[allow(clippy::too_many_arguments)] // one per YAML key, all optional
pub(super) fn serial_settings(
    ctx: &Ctx,
    errors: &mut Vec<Diagnostic>,
    at: &str,
    port: &str,
    baud: Option<u32>,
    parity: Option<Parity>,
    data_bits: Option<u8>,
    stop_bits: Option<u8>,
) -> SerialSettings {
    let baud = baud.unwrap_or(9600);
    if !(300..=4_000_000).contains(&baud) {
        errors.push(ctx.diag(
            &format!("{at}.baud"),
            format!("{baud} baud is not a serial speed"),
        ));
    }
    let data_bits = data_bits.unwrap_or(8);
    if !(5..=8).contains(&data_bits) {
        errors.push(ctx.diag(&format!("{at}.data_bits"), "must be 5, 6, 7 or 8"));
    }
    let stop_bits = stop_bits.unwrap_or(1);
    if !(1..=2).contains(&stop_bits) {
        errors.push(ctx.diag(&format!("{at}.stop_bits"), "must be 1 or 2"));
    }
    SerialSettings {
        port: port.to_string(),
        baud,
        parity: parity.unwrap_or(Parity::None),
        data_bits,
        stop_bits,
    }
}

impl Resolver<'_> {
    pub(super) fn resolve_bus(&mut self, ctx: &Ctx, name: &str, b: &RawBus) -> Option<Bus> {
        let p = format!("buses.{name}");
        let given = [
            b.modbus_tcp.is_some(),
            b.modbus_rtu.is_some(),
            b.modbus_rtu_over_tcp.is_some(),
            b.serial_line.is_some(),
        ];
        if given.iter().filter(|g| **g).count() != 1 {
            self.errors.push(ctx.diag(
                &p,
                "a bus needs exactly one transport: `modbus_tcp: {…}`, `modbus_rtu: {…}`, \
                 `modbus_rtu_over_tcp: {…}` or `serial_line: {…}`",
            ));
            return None;
        }
        let errors = &mut self.errors;
        let mut timeout_of = |field: &str, t: Option<Duration>, default: Duration| {
            let t = t.unwrap_or(default);
            if t.is_zero() {
                errors.push(ctx.diag(&format!("{p}.{field}.timeout"), "must be more than 0"));
            }
            t
        };
        let transport = if let Some(t) = &b.modbus_tcp {
            Transport::ModbusTcp {
                host: t.host.clone(),
                port: t.port.unwrap_or(502),
                timeout: timeout_of("modbus_tcp", t.timeout, Duration::from_secs(1)),
            }
        } else if let Some(t) = &b.modbus_rtu_over_tcp {
            Transport::ModbusRtu {
                endpoint: Endpoint::Tcp {
                    host: t.host.clone(),
                    port: t.port.unwrap_or(502),
                },
                timeout: timeout_of("modbus_rtu_over_tcp", t.timeout, Duration::from_secs(1)),
                retries: 1,
                turnaround: Duration::ZERO,
            }
        } else if let Some(l) = &b.serial_line {
            let timeout = timeout_of("serial_line", l.timeout, Duration::from_secs(1));
            let terminator = l
                .terminator
                .clone()
                .unwrap_or_else(|| "\r\n".into())
                .into_bytes();
            let max_line = l.max_line.unwrap_or(512);
            let at = format!("{p}.serial_line");
            if terminator.is_empty() {
                self.errors
                    .push(ctx.diag(&format!("{at}.terminator"), "cannot be empty"));
            }
            if !(8..=65536).contains(&max_line) {
                self.errors
                    .push(ctx.diag(&format!("{at}.max_line"), "must be within 8..=65536 bytes"));
            }
            let settings = serial_settings(
                ctx,
                &mut self.errors,
                &at,
                &l.port,
                l.baud,
                l.parity,
                l.data_bits,
                l.stop_bits,
            );
            Transport::SerialLine {
                settings,
                terminator,
                max_line,
                timeout,
            }
        } else {
            let r = b.modbus_rtu.as_ref().expect("one transport given");
            let timeout = timeout_of("modbus_rtu", r.timeout, Duration::from_millis(500));
            let at = format!("{p}.modbus_rtu");
            let settings = serial_settings(
                ctx,
                &mut self.errors,
                &at,
                &r.port,
                r.baud,
                r.parity,
                r.data_bits,
                r.stop_bits,
            );
            Transport::ModbusRtu {
                endpoint: Endpoint::Serial(settings),
                timeout,
                retries: r.retries.unwrap_or(1),
                turnaround: r.turnaround.unwrap_or(Duration::ZERO),
            }
        };
        Some(Bus {
            name: name.to_string(),
            transport,
        })
    }
}
