//! Serial port settings (speed, parity, data and stop bits), their timing on the wire, and
//! opening a port with them. Shared by Modbus RTU and the serial line transport.

use std::time::Duration;

use tokio_serial::{SerialPortBuilderExt, SerialStream};

/// Serial line settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SerialSettings {
    pub port: String,
    pub baud: u32,
    pub parity: Parity,
    pub data_bits: u8,
    pub stop_bits: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    None,
    Even,
    Odd,
}

impl SerialSettings {
    /// Bits on the wire per character: start, data, parity, stop.
    pub fn bits_per_char(&self) -> u32 {
        1 + self.data_bits as u32 + u32::from(self.parity != Parity::None) + self.stop_bits as u32
    }

    /// Time one character takes on the wire.
    pub fn char_time(&self) -> Duration {
        Duration::from_secs_f64(self.bits_per_char() as f64 / self.baud as f64)
    }

    /// The inter-frame silence: 3.5 character times, fixed at 1.75 ms above 19200 baud.
    pub fn t35(&self) -> Duration {
        if self.baud > 19200 {
            Duration::from_micros(1750)
        } else {
            self.char_time().mul_f64(3.5)
        }
    }

    pub fn open(&self) -> std::io::Result<SerialStream> {
        let parity = match self.parity {
            Parity::None => tokio_serial::Parity::None,
            Parity::Even => tokio_serial::Parity::Even,
            Parity::Odd => tokio_serial::Parity::Odd,
        };
        let data_bits = match self.data_bits {
            5 => tokio_serial::DataBits::Five,
            6 => tokio_serial::DataBits::Six,
            7 => tokio_serial::DataBits::Seven,
            _ => tokio_serial::DataBits::Eight,
        };
        let stop_bits = if self.stop_bits == 2 {
            tokio_serial::StopBits::Two
        } else {
            tokio_serial::StopBits::One
        };
        let port = tokio_serial::new(&self.port, self.baud)
            .parity(parity)
            .data_bits(data_bits)
            .stop_bits(stop_bits)
            .open_native_async()
            .map_err(std::io::Error::from)?;
        Ok(port)
    }
}

/// Where the RTU frames go.
#[derive(Debug, Clone, PartialEq)]
pub enum Endpoint {
    Serial(SerialSettings),
    Tcp { host: String, port: u16 },
}
