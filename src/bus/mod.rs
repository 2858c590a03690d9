//! Bus transports: the only code that talks to devices.
//!
//! Each transport is one module behind the same small interface, [`Link::read`]: one read
//! request to one unit, with its own timeout, answered by register words or bits, a Modbus
//! exception, or a transport error. A link reconnects by itself on the next request after a
//! transport error or timeout, so a late reply is never matched to a later request. Scheduling
//! (who is asked when) belongs to `poller`; decoding to `mapping`.

pub mod modbus_tcp;

use std::time::Duration;

use tokio_modbus::ExceptionCode;

use crate::config::{Bus, Transport};
use crate::plan::ReadRequest;

/// What a read returns.
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    Words(Vec<u16>),
    Bits(Vec<bool>),
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The device answered with a Modbus exception: a mapping problem, not a bus problem.
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
        }
    }
}

/// An open (or reopenable) connection to one bus.
pub enum Link {
    ModbusTcp(modbus_tcp::ModbusTcp),
}

impl Link {
    pub fn new(bus: &Bus) -> Link {
        match &bus.transport {
            Transport::ModbusTcp {
                host,
                port,
                timeout,
            } => Link::ModbusTcp(modbus_tcp::ModbusTcp::new(host.clone(), *port, *timeout)),
        }
    }

    /// Sends one read request to `unit` and waits for its answer or its timeout.
    pub async fn read(&mut self, unit: u8, req: &ReadRequest) -> Result<Data, BusError> {
        match self {
            Link::ModbusTcp(t) => t.read(unit, req).await,
        }
    }
}
