//! Modbus TCP: one TCP connection per bus, one transaction at a time.
//!
//! tokio-modbus's client has no timeout of its own; every request here has one. After a
//! timeout or a transport error the connection is dropped and reopened on the next request,
//! so a reply that arrives late can never be taken for the answer to a later request.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_modbus::client::{Client, Context};
use tokio_modbus::prelude::{Slave, SlaveContext};
use tokio_modbus::{Request, Response};

use super::{BusError, Data, WriteData};
use crate::modbus::{ReadRequest, Table};
use tokio_modbus::client::Writer;

pub struct ModbusTcp {
    host: String,
    port: u16,
    timeout: Duration,
    ctx: Option<Context>,
}

impl ModbusTcp {
    pub fn new(host: String, port: u16, timeout: Duration) -> ModbusTcp {
        ModbusTcp {
            host,
            port,
            timeout,
            ctx: None,
        }
    }

    async fn connect(&mut self) -> Result<&mut Context, BusError> {
        if self.ctx.is_none() {
            let addr = (self.host.as_str(), self.port);
            let stream = match timeout(self.timeout, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Err(BusError::Connect(e)),
                Err(_) => return Err(BusError::Timeout(self.timeout)),
            };
            let _ = stream.set_nodelay(true);
            self.ctx = Some(tokio_modbus::client::tcp::attach(stream));
        }
        Ok(self.ctx.as_mut().expect("just set"))
    }

    /// Writes a coil (function 05) or registers (06 for one, 16 for more).
    pub async fn write(
        &mut self,
        unit: u8,
        address: u16,
        data: &WriteData,
    ) -> Result<(), BusError> {
        let limit = self.timeout;
        let ctx = self.connect().await?;
        ctx.set_slave(Slave(unit));
        let answer = timeout(limit, async {
            match data {
                WriteData::Coil(b) => ctx.write_single_coil(address, *b).await,
                WriteData::Registers(w) if w.len() == 1 => {
                    ctx.write_single_register(address, w[0]).await
                }
                WriteData::Registers(w) => ctx.write_multiple_registers(address, w).await,
            }
        })
        .await;
        self.settle(answer, limit)
    }

    /// Turns a transaction's outcome into ours; after a timeout or a transport error the
    /// connection is dropped, so a late reply can never answer a later request.
    fn settle<T>(
        &mut self,
        answer: Result<tokio_modbus::Result<T>, tokio::time::error::Elapsed>,
        limit: Duration,
    ) -> Result<T, BusError> {
        match answer {
            Err(_) => {
                self.ctx = None;
                Err(BusError::Timeout(limit))
            }
            Ok(Err(e)) => {
                self.ctx = None;
                Err(match e {
                    tokio_modbus::Error::Transport(io) => BusError::Io(io),
                    tokio_modbus::Error::Protocol(p) => BusError::Protocol(p.to_string()),
                })
            }
            Ok(Ok(Err(code))) => Err(BusError::Exception(code)),
            Ok(Ok(Ok(v))) => Ok(v),
        }
    }

    /// Reads one request. A reply that does not fit it (another transaction id, a frame the
    /// unit before sent unasked after its answer) on a connection already in use is the old
    /// connection's fault, not this unit's: asked once more on a fresh connection before it
    /// counts against this unit (#28: a unit that sent unsolicited frames after its replies got
    /// its healthy neighbour marked offline).
    pub async fn read(&mut self, unit: u8, req: &ReadRequest) -> Result<Data, BusError> {
        let reused = self.ctx.is_some();
        match self.read_once(unit, req).await {
            Err(BusError::Protocol(e)) if reused => {
                tracing::debug!(unit, error = %e, "Modbus TCP: a reply that does not fit on a connection in use; asked again on a new one");
                self.read_once(unit, req).await
            }
            other => other,
        }
    }

    async fn read_once(&mut self, unit: u8, req: &ReadRequest) -> Result<Data, BusError> {
        let limit = self.timeout;
        let ctx = self.connect().await?;
        ctx.set_slave(Slave(unit));
        let (start, count) = (req.start, req.count);
        // Through `Client::call`, not tokio-modbus's `Reader`: its readers assert (in debug
        // builds) that the device sent as many registers as asked, so a device that sends more
        // would panic the poller; here the count is checked below, for every build.
        let request = match req.table {
            Table::Holding => Request::ReadHoldingRegisters(start, count),
            Table::Input => Request::ReadInputRegisters(start, count),
            Table::Coil => Request::ReadCoils(start, count),
            Table::Discrete => Request::ReadDiscreteInputs(start, count),
        };
        let answer = timeout(limit, ctx.call(request)).await;
        let data = match self.settle(answer, limit)? {
            Response::ReadHoldingRegisters(w) | Response::ReadInputRegisters(w) => Data::Words(w),
            // Bits come in whole bytes: the padding past `count` is not data.
            Response::ReadCoils(mut b) | Response::ReadDiscreteInputs(mut b) => {
                if b.len() >= count as usize && b.len() < count as usize + 8 {
                    b.truncate(count as usize);
                }
                Data::Bits(b)
            }
            other => {
                self.ctx = None;
                return Err(BusError::Protocol(format!("answered {other:?} to a read")));
            }
        };
        let got = match &data {
            Data::Words(w) => w.len(),
            Data::Bits(b) => b.len(),
        };
        // Exactly what was asked: more registers than asked is a device (or a frame) that
        // answers something else, never published as if it were this (#28).
        if got != count as usize {
            self.ctx = None;
            return Err(BusError::Protocol(format!(
                "asked for {count} items, got {got}"
            )));
        }
        Ok(data)
    }
}
