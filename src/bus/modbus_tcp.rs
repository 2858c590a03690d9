//! Modbus TCP: one TCP connection per bus, one transaction at a time.
//!
//! tokio-modbus's client has no timeout of its own; every request here has one. After a
//! timeout or a transport error the connection is dropped and reopened on the next request,
//! so a reply that arrives late can never be taken for the answer to a later request.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_modbus::client::{Context, Reader};
use tokio_modbus::prelude::{Slave, SlaveContext};

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

    pub async fn read(&mut self, unit: u8, req: &ReadRequest) -> Result<Data, BusError> {
        let limit = self.timeout;
        let ctx = self.connect().await?;
        ctx.set_slave(Slave(unit));
        let (start, count) = (req.start, req.count);
        let answer = timeout(limit, async {
            match req.table {
                Table::Holding => ctx
                    .read_holding_registers(start, count)
                    .await
                    .map(|r| r.map(Data::Words)),
                Table::Input => ctx
                    .read_input_registers(start, count)
                    .await
                    .map(|r| r.map(Data::Words)),
                Table::Coil => ctx
                    .read_coils(start, count)
                    .await
                    .map(|r| r.map(Data::Bits)),
                Table::Discrete => ctx
                    .read_discrete_inputs(start, count)
                    .await
                    .map(|r| r.map(Data::Bits)),
            }
        })
        .await;
        let data = self.settle(answer, limit)?;
        let got = match &data {
            Data::Words(w) => w.len(),
            Data::Bits(b) => b.len(),
        };
        if got < count as usize {
            self.ctx = None;
            return Err(BusError::Protocol(format!(
                "asked for {count} items, got {got}"
            )));
        }
        Ok(data)
    }
}
