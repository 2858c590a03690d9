//! Bus transports: the only code that talks to devices.
//!
//! Each transport is one module behind the same small interface, [`Link::read`]: one read
//! request to one unit, with its own timeout, answered by register words or bits, a Modbus
//! exception, or a transport error. A link reconnects by itself on the next request after a
//! transport error or timeout, so a late reply is never matched to a later request. Scheduling
//! (who is asked when) belongs to `poll`; decoding to `mapping`.

pub mod modbus_rtu;
pub mod modbus_tcp;
pub mod serial;
pub mod serial_line;

use std::time::Duration;

use tokio_modbus::ExceptionCode;

use self::serial::{Endpoint, SerialSettings};
use crate::modbus::ReadRequest;
pub use crate::modbus::{Data, WriteData};

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The device (or a gateway in front of it) answered with a Modbus exception: see
    /// [`Refusal`] for what each one means.
    #[error("Modbus exception: {0}")]
    Exception(ExceptionCode),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("transport: {0}")]
    Io(std::io::Error),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("CRC error")]
    Crc,
}

impl BusError {
    /// A short, stable name for counters and log fields.
    pub fn kind(&self) -> &'static str {
        match self {
            BusError::Exception(_) => "exception",
            BusError::Timeout(_) => "timeout",
            BusError::Connect(_) => "connect",
            BusError::Io(_) => "io",
            BusError::Protocol(_) => "protocol",
            BusError::Crc => "crc",
        }
    }
}

/// What a Modbus exception says, and so what the poller does about it (#28: every exception
/// used to be taken for a mapping problem, so a gateway in front of a dead meter left the
/// device "online" with no data and its reads retried every 5 minutes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 0x01–0x03 (and anything unknown): the request is wrong for this device — the mapping.
    /// Those points are skipped and retried rarely.
    Mapping,
    /// 0x05 Acknowledge, 0x06 Server Device Busy: the device is there and will answer; the
    /// request is retried at the next cycle.
    Busy,
    /// 0x04 Server Device Failure, 0x08 Memory Parity Error: the device reports it cannot do
    /// it now; counted, retried after a modest pause.
    DeviceFailure,
    /// 0x0A Gateway Path Unavailable, 0x0B Gateway Target Device Failed to Respond: a gateway in
    /// between cannot reach the device — a health failure, like a timeout.
    Unreachable,
}

impl Refusal {
    /// The class of `code` (Modbus Application Protocol V1.1b3, section 7, "MODBUS Exception
    /// Responses").
    pub fn of(code: ExceptionCode) -> Refusal {
        match code {
            ExceptionCode::Acknowledge | ExceptionCode::ServerDeviceBusy => Refusal::Busy,
            ExceptionCode::ServerDeviceFailure | ExceptionCode::MemoryParityError => {
                Refusal::DeviceFailure
            }
            ExceptionCode::GatewayPathUnavailable | ExceptionCode::GatewayTargetDevice => {
                Refusal::Unreachable
            }
            _ => Refusal::Mapping,
        }
    }
}

/// Line faults a link has absorbed, counted even when a retry then succeeded.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct LineFaults {
    pub crc_errors: u64,
    /// Bytes of line noise skipped before replies.
    pub noise_bytes: u64,
    /// Replies that came after their timeout and were discarded.
    pub late_replies: u64,
    /// Requests sent again after a timeout or a bad frame.
    pub retries: u64,
}

#[derive(Debug, Clone)]
pub struct Bus {
    pub name: String,
    pub transport: Transport,
}

#[derive(Debug, Clone)]
pub enum Transport {
    ModbusTcp {
        host: String,
        port: u16,
        timeout: Duration,
    },
    /// Lines of text on a serial port.
    SerialLine {
        settings: SerialSettings,
        terminator: Vec<u8>,
        max_line: usize,
        timeout: Duration,
    },
    /// RTU framing on a serial port or through a TCP converter.
    ModbusRtu {
        endpoint: Endpoint,
        timeout: Duration,
        retries: u32,
        turnaround: Duration,
    },
}

impl Transport {
    /// The longest one request can take: every attempt timing out, plus the drain after each.
    pub fn worst_request_time(&self) -> Duration {
        match self {
            Transport::ModbusTcp { timeout, .. } => *timeout * 2,
            Transport::SerialLine { timeout, .. } => *timeout * 2,
            Transport::ModbusRtu {
                timeout, retries, ..
            } => *timeout * 3 * (retries + 1),
        }
    }

    /// Highest unit id the transport addresses (RTU: 1..=247 per the serial line spec).
    pub fn unit_range(&self) -> std::ops::RangeInclusive<u32> {
        match self {
            Transport::ModbusTcp { .. } | Transport::SerialLine { .. } => 0..=255,
            Transport::ModbusRtu { .. } => 1..=247,
        }
    }
}

/// An open (or reopenable) connection to one bus.
pub enum Link {
    ModbusTcp(modbus_tcp::ModbusTcp),
    ModbusRtu(modbus_rtu::ModbusRtu),
}

impl Link {
    /// The link of a Modbus bus; None for a serial line bus (served by `poll::line`).
    pub fn new(bus: &Bus) -> Option<Link> {
        Some(match &bus.transport {
            Transport::ModbusTcp {
                host,
                port,
                timeout,
            } => Link::ModbusTcp(modbus_tcp::ModbusTcp::new(host.clone(), *port, *timeout)),
            Transport::ModbusRtu {
                endpoint,
                timeout,
                retries,
                turnaround,
            } => Link::ModbusRtu(modbus_rtu::ModbusRtu::new(
                endpoint.clone(),
                *timeout,
                *retries,
                *turnaround,
            )),
            Transport::SerialLine { .. } => return None,
        })
    }

    /// Sends one read request to `unit` and waits for its answer or its timeout.
    pub async fn read(&mut self, unit: u8, req: &ReadRequest) -> Result<Data, BusError> {
        match self {
            Link::ModbusTcp(t) => t.read(unit, req).await,
            Link::ModbusRtu(t) => t.read(unit, req).await,
        }
    }

    /// Writes one coil or a run of holding registers (commands), then the caller reads back.
    pub async fn write(
        &mut self,
        unit: u8,
        address: u16,
        data: &WriteData,
    ) -> Result<(), BusError> {
        match self {
            Link::ModbusTcp(t) => t.write(unit, address, data).await,
            Link::ModbusRtu(t) => t.write(unit, address, data).await,
        }
    }

    /// What the line has done so far (RTU; zeros for TCP).
    pub fn line_faults(&self) -> LineFaults {
        match self {
            Link::ModbusTcp(_) => LineFaults::default(),
            Link::ModbusRtu(t) => LineFaults {
                crc_errors: t.crc_errors,
                noise_bytes: t.noise_bytes,
                late_replies: t.late_replies,
                retries: t.retried,
            },
        }
    }

    /// Time spent with transactions on the wire so far (RTU; TCP reports none).
    pub fn busy(&self) -> Duration {
        match self {
            Link::ModbusTcp(_) => Duration::ZERO,
            Link::ModbusRtu(t) => t.busy,
        }
    }
}

#[cfg(test)]
mod refusal_tests {
    use super::*;

    /// #28 (6): which exceptions are the mapping's, the device's, or the path's.
    #[test]
    fn each_exception_code_has_its_class() {
        use ExceptionCode as E;
        for (code, class) in [
            (E::IllegalFunction, Refusal::Mapping),
            (E::IllegalDataAddress, Refusal::Mapping),
            (E::IllegalDataValue, Refusal::Mapping),
            (E::ServerDeviceFailure, Refusal::DeviceFailure),
            (E::Acknowledge, Refusal::Busy),
            (E::ServerDeviceBusy, Refusal::Busy),
            (E::MemoryParityError, Refusal::DeviceFailure),
            (E::GatewayPathUnavailable, Refusal::Unreachable),
            (E::GatewayTargetDevice, Refusal::Unreachable),
            (E::Custom(0x42), Refusal::Mapping),
        ] {
            assert_eq!(Refusal::of(code), class, "{code:?}");
        }
    }
}
