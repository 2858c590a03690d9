//! Modbus RTU on a serial line (RS-485), or tunnelled over TCP (`modbus_rtu_over_tcp`, for
//! RS-485-to-Ethernet converters).
//!
//! The framing is done here rather than by tokio-modbus's RTU client because the wire needs
//! care that client does not give: every request has its own timeout; between frames the line is
//! silent for at least 3.5 character times (1.75 ms above 19200 baud) plus `turnaround`; after a
//! timeout, a CRC error or a malformed reply the input is flushed — the kernel's queue too
//! (`tcflush`) — and the line is drained for a while, so a late reply is never decoded as the
//! answer to the next request; a reply must come from the unit asked, with the function code and
//! byte count asked for. A port that vanishes (USB unplugged: EOF or EIO) is closed and reopened
//! on a later request; the poller backs the bus off meanwhile, so nothing spins.
//!
//! Frame layout and CRC: Modbus over Serial Line, Specification and Implementation Guide V1.02,
//! §2.5 (RTU framing, t3.5 = 1.75 ms above 19200 baud) and §6.2.2 (CRC-16, polynomial 0xA001
//! reflected, initial value 0xFFFF, low byte first).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep_until, timeout_at};
use tokio_serial::{SerialPort, SerialStream};

use super::serial::Endpoint;
use super::{BusError, Data, WriteData};
use crate::modbus::{
    ReadRequest, crc16, encode_read, exception, expected_byte_count, function_code, with_crc,
};

enum Stream {
    Serial(SerialStream),
    Tcp(TcpStream),
}

impl Stream {
    async fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        match self {
            Stream::Serial(s) => {
                s.write_all(b).await?;
                s.flush().await
            }
            Stream::Tcp(s) => s.write_all(b).await,
        }
    }

    async fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Serial(s) => s.read(b).await,
            Stream::Tcp(s) => s.read(b).await,
        }
    }

    /// Discards what the kernel holds for us (serial: `tcflush(TCIFLUSH)`).
    fn clear_input(&mut self) {
        if let Stream::Serial(s) = self {
            let _ = s.clear(tokio_serial::ClearBuffer::Input);
        }
    }
}

/// One RTU bus: a port (opened on demand), its timing, and the time it last went quiet.
pub struct ModbusRtu {
    endpoint: Endpoint,
    timeout: Duration,
    retries: u32,
    turnaround: Duration,
    t35: Duration,
    stream: Option<Stream>,
    quiet_since: Instant,
    /// Time spent with a transaction on the wire, for utilisation figures.
    pub busy: Duration,
    /// Bytes of line noise skipped before replies.
    pub noise_bytes: u64,
    /// Replies that arrived after their timeout (and were discarded).
    pub late_replies: u64,
    /// Frames refused for their CRC (including those a retry then got right).
    pub crc_errors: u64,
    /// Requests sent again after a timeout or a bad frame.
    pub retried: u64,
    /// The last request that timed out, while its reply could still arrive.
    suspect: Option<Suspect>,
    /// Requests in a row that timed out (any unit): through a TCP converter, two mean the
    /// connection itself may be stuck (see [`STUCK_AFTER`]).
    timeouts_in_row: u32,
}

/// Through a serial-to-TCP converter, after this many timeouts in a row the connection is
/// closed and opened anew at the next request (#28: a converter whose connection got stuck
/// left every unit on that bus offline for good). One dead unit among answering ones never
/// gets there: each answer resets the count.
const STUCK_AFTER: u32 = 2;

#[derive(Debug, Clone, Copy)]
struct Suspect {
    unit: u8,
    fc: u8,
    start: u16,
    count: u16,
    until: Instant,
}

impl ModbusRtu {
    pub fn new(
        endpoint: Endpoint,
        timeout: Duration,
        retries: u32,
        turnaround: Duration,
    ) -> ModbusRtu {
        let t35 = match &endpoint {
            Endpoint::Serial(s) => s.t35(),
            Endpoint::Tcp { .. } => Duration::ZERO,
        };
        ModbusRtu {
            endpoint,
            timeout,
            retries,
            turnaround,
            t35,
            stream: None,
            quiet_since: Instant::now(),
            busy: Duration::ZERO,
            noise_bytes: 0,
            late_replies: 0,
            crc_errors: 0,
            retried: 0,
            timeouts_in_row: 0,
            suspect: None,
        }
    }

    async fn open(&mut self) -> Result<&mut Stream, BusError> {
        if self.stream.is_none() {
            let s = match &self.endpoint {
                Endpoint::Serial(s) => Stream::Serial(s.open().map_err(BusError::Connect)?),
                Endpoint::Tcp { host, port } => {
                    let c = tokio::time::timeout(
                        self.timeout,
                        TcpStream::connect((host.as_str(), *port)),
                    )
                    .await
                    .map_err(|_| BusError::Timeout(self.timeout))?
                    .map_err(BusError::Connect)?;
                    let _ = c.set_nodelay(true);
                    Stream::Tcp(c)
                }
            };
            self.stream = Some(s);
            self.quiet_since = Instant::now();
        }
        Ok(self.stream.as_mut().expect("just opened"))
    }

    /// One read request, retried `retries` times after a timeout or a bad frame.
    pub async fn read(&mut self, unit: u8, req: &ReadRequest) -> Result<Data, BusError> {
        let mut attempt = 0;
        loop {
            let started = Instant::now();
            let r = self.transact(unit, req).await;
            self.busy += started.elapsed();
            match r {
                Err(e @ (BusError::Timeout(_) | BusError::Crc | BusError::Protocol(_)))
                    if attempt < self.retries =>
                {
                    tracing::debug!(unit, error = %e, attempt, "RTU request failed; retrying");
                    self.count(&e);
                    self.retried += 1;
                    attempt += 1;
                }
                Err(e) => {
                    self.count(&e);
                    return Err(e);
                }
                ok => return ok,
            }
        }
    }

    /// Writes a coil (function 05) or registers (06 for one, 16 for more). Not retried: a write
    /// whose reply was lost may have happened, and the read-back tells.
    pub async fn write(
        &mut self,
        unit: u8,
        address: u16,
        data: &WriteData,
    ) -> Result<(), BusError> {
        let [ah, al] = address.to_be_bytes();
        let (fc, frame) = match data {
            WriteData::Coil(b) => (
                0x05,
                vec![unit, 0x05, ah, al, if *b { 0xFF } else { 0x00 }, 0x00],
            ),
            WriteData::Registers(w) if w.len() == 1 => {
                let [vh, vl] = w[0].to_be_bytes();
                (0x06, vec![unit, 0x06, ah, al, vh, vl])
            }
            WriteData::Registers(w) => {
                let [qh, ql] = (w.len() as u16).to_be_bytes();
                let mut f = vec![unit, 0x10, ah, al, qh, ql, (w.len() * 2) as u8];
                w.iter().for_each(|x| f.extend_from_slice(&x.to_be_bytes()));
                (0x10, f)
            }
        };
        let frame = with_crc(frame);
        let gap = self.t35 + self.turnaround;
        let timeout = self.timeout;
        let started = Instant::now();
        self.send(&frame).await?;
        let stream = self.stream.as_mut().expect("open");
        let deadline = Instant::now() + timeout;
        let result = async {
            let mut one = [0u8; 1];
            let mut prev: Option<u8> = None;
            loop {
                read_exact_by(stream, &mut one, deadline, timeout).await?;
                if prev == Some(unit) && (one[0] == fc || one[0] == fc | 0x80) {
                    break;
                }
                prev = Some(one[0]);
            }
            let mut reply = vec![unit, one[0]];
            let rest = if one[0] & 0x80 != 0 { 3 } else { 6 };
            let mut tail = vec![0u8; rest];
            read_exact_by(stream, &mut tail, deadline, timeout).await?;
            reply.extend_from_slice(&tail);
            let (body, crc) = reply.split_at(reply.len() - 2);
            if crc16(body).to_le_bytes() != [crc[0], crc[1]] {
                return Err(BusError::Crc);
            }
            if body[1] & 0x80 != 0 {
                return Err(BusError::Exception(exception(body[2])));
            }
            if body[2..4] != frame[2..4] {
                return Err(BusError::Protocol("write reply for another address".into()));
            }
            Ok(())
        }
        .await;
        match &result {
            Ok(()) | Err(BusError::Exception(_)) => {}
            Err(BusError::Io(_)) => self.stream = None,
            Err(_) => {
                if let Some(s) = self.stream.as_mut() {
                    drain(s, Instant::now() + timeout.max(gap * 4)).await;
                }
            }
        }
        self.quiet_since = Instant::now();
        self.busy += started.elapsed();
        result
    }

    /// Sends `frame` once the line has been silent for t3.5 plus `turnaround`.
    async fn send(&mut self, frame: &[u8]) -> Result<(), BusError> {
        let quiet_until = self.quiet_since + self.t35 + self.turnaround;
        let stream = self.open().await?;
        sleep_until(quiet_until).await;
        if let Err(e) = stream.write_all(frame).await {
            self.stream = None;
            return Err(BusError::Io(e));
        }
        Ok(())
    }

    fn count(&mut self, e: &BusError) {
        if matches!(e, BusError::Crc) {
            self.crc_errors += 1;
        }
    }

    async fn transact(&mut self, unit: u8, req: &ReadRequest) -> Result<Data, BusError> {
        let frame = encode_read(unit, req);
        let gap = self.t35 + self.turnaround;
        let timeout = self.timeout;
        // A request shaped like one that timed out, to a different address, waits until the
        // late reply (if any) has come and gone: swallowed, never taken for this one's answer.
        let wait_out = self.suspect.filter(|x| {
            x.unit == unit
                && x.fc == function_code(req.table)
                && x.count == req.count
                && x.start != req.start
        });
        if let Some(x) = wait_out {
            self.suspect = None;
            let s = self.open().await?;
            if drain(s, x.until).await > 0 {
                tracing::debug!(
                    unit,
                    ?timeout,
                    "a reply came after its timeout and was discarded; consider a longer `timeout`"
                );
                self.late_replies += 1;
            }
            self.quiet_since = Instant::now();
        }
        self.send(&frame).await?;
        let stream = self.stream.as_mut().expect("open");
        let deadline = Instant::now() + timeout;
        tracing::trace!(unit, start = req.start, count = req.count, "request sent");
        let (mut noise, mut stale) = (0, 0);
        let result = read_reply(stream, unit, req, deadline, &mut noise, &mut stale).await;
        if noise > 0 {
            tracing::debug!(unit, bytes = noise, "skipped line noise before a reply");
            self.noise_bytes += noise;
        }
        if stale > 0 {
            tracing::debug!(
                unit,
                ?timeout,
                "skipped a reply that came after its timeout; consider a longer `timeout`"
            );
            self.late_replies += stale;
        }
        if matches!(result, Err(BusError::Timeout(_))) {
            self.timeouts_in_row += 1;
        } else {
            self.timeouts_in_row = 0;
        }
        match &result {
            Ok(_) | Err(BusError::Exception(_)) => {}
            Err(BusError::Timeout(_))
                if matches!(self.endpoint, Endpoint::Tcp { .. })
                    && self.timeouts_in_row >= STUCK_AFTER =>
            {
                // The converter's connection may be stuck (half-open, or its firmware wedged):
                // opened anew at the next request, as a plain Modbus TCP bus does.
                tracing::debug!(
                    timeouts = self.timeouts_in_row,
                    "RTU over TCP: no answer to several requests in a row; reconnecting"
                );
                self.stream = None;
                self.timeouts_in_row = 0;
            }
            Err(BusError::Io(_)) => {
                // EOF or EIO: the port is gone (unplugged). Reopen later.
                self.stream = None;
            }
            Err(BusError::Timeout(_)) => {
                // A late reply may still be on its way. One from another unit, for another
                // function or another count is refused by the reply checks; one with the very
                // shape of a later request to a different address would not be, so such a
                // request waits until this one's reply can no longer come (see `suspect`).
                let s = self.stream.as_mut().expect("open");
                drain(s, Instant::now() + gap * 4).await;
                self.suspect = Some(Suspect {
                    unit,
                    fc: function_code(req.table),
                    start: req.start,
                    count: req.count,
                    until: Instant::now() + timeout * 2,
                });
            }
            Err(_) => {
                let s = self.stream.as_mut().expect("open");
                drain(s, Instant::now() + gap * 4 + Duration::from_millis(5)).await;
            }
        }
        self.quiet_since = Instant::now();
        result
    }
}

/// Discards everything until `until`, and the kernel's queue too; returns the bytes read.
async fn drain(s: &mut Stream, until: Instant) -> usize {
    s.clear_input();
    let mut buf = [0u8; 256];
    let mut total = 0;
    while let Ok(Ok(n)) = timeout_at(until, s.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        total += n;
    }
    s.clear_input();
    total
}

async fn read_exact_by(
    s: &mut Stream,
    buf: &mut [u8],
    deadline: Instant,
    limit: Duration,
) -> Result<(), BusError> {
    let mut got = 0;
    while got < buf.len() {
        match timeout_at(deadline, s.read(&mut buf[got..])).await {
            Err(_) => return Err(BusError::Timeout(limit)),
            Ok(Ok(0)) => {
                return Err(BusError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the port closed (unplugged?)",
                )));
            }
            Ok(Ok(n)) => got += n,
            Ok(Err(e)) => return Err(BusError::Io(e)),
        }
    }
    Ok(())
}

async fn read_reply(
    s: &mut Stream,
    unit: u8,
    req: &ReadRequest,
    deadline: Instant,
    noise: &mut u64,
    stale: &mut u64,
) -> Result<Data, BusError> {
    let limit = deadline.saturating_duration_since(Instant::now());
    let fc = function_code(req.table);
    let want = expected_byte_count(req);
    let mut one = [0u8; 1];
    let mut prev: Option<u8> = None;
    loop {
        // Find where a reply starts, [unit, fc] or [unit, fc | 0x80]; bytes before it are noise.
        read_exact_by(s, &mut one, deadline, limit).await?;
        let b = one[0];
        if prev != Some(unit) || (b != fc && b != fc | 0x80) {
            if prev.is_some() {
                *noise += 1;
                if *noise > 512 {
                    return Err(BusError::Protocol("no reply frame in the noise".into()));
                }
            }
            prev = Some(b);
            continue;
        }
        prev = None;
        let mut frame = vec![unit, b];
        if b == fc | 0x80 {
            let mut rest = [0u8; 3];
            read_exact_by(s, &mut rest, deadline, limit).await?;
            frame.extend_from_slice(&rest);
            return decode_reply(unit, req, &frame);
        }
        read_exact_by(s, &mut one, deadline, limit).await?;
        let count = one[0] as usize;
        frame.push(one[0]);
        let mut rest = vec![0u8; count + 2];
        read_exact_by(s, &mut rest, deadline, limit).await?;
        frame.extend_from_slice(&rest);
        if count != want {
            // A whole frame of another shape from this unit with a valid CRC is a reply to an
            // earlier request that came late: skip it and keep waiting for ours.
            if crc16(&frame[..frame.len() - 2]).to_le_bytes()
                == [frame[frame.len() - 2], frame[frame.len() - 1]]
            {
                *stale += 1;
                continue;
            }
            return Err(BusError::Protocol(format!(
                "byte count {count} where {want} was asked for"
            )));
        }
        return decode_reply(unit, req, &frame);
    }
}

/// Checks and decodes a complete reply frame (CRC included).
pub fn decode_reply(unit: u8, req: &ReadRequest, frame: &[u8]) -> Result<Data, BusError> {
    if frame.len() < 5 {
        return Err(BusError::Protocol("short frame".into()));
    }
    let (body, crc) = frame.split_at(frame.len() - 2);
    if crc16(body).to_le_bytes() != [crc[0], crc[1]] {
        return Err(BusError::Crc);
    }
    let fc = function_code(req.table);
    if body[0] != unit {
        return Err(BusError::Protocol(format!("reply from unit {}", body[0])));
    }
    if body[1] == fc | 0x80 {
        return Err(BusError::Exception(exception(body[2])));
    }
    if body[1] != fc
        || body[2] as usize != expected_byte_count(req)
        || body.len() != 3 + body[2] as usize
    {
        return Err(BusError::Protocol(
            "reply does not match the request".into(),
        ));
    }
    let data = &body[3..];
    Ok(if req.table.is_bits() {
        Data::Bits(
            (0..req.count as usize)
                .map(|i| data[i / 8] >> (i % 8) & 1 == 1)
                .collect(),
        )
    } else {
        Data::Words(
            data.chunks(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::serial::{Parity, SerialSettings};
    use crate::modbus::Table;
    use tokio_modbus::ExceptionCode;

    fn req(table: Table, start: u16, count: u16) -> ReadRequest {
        ReadRequest {
            table,
            start,
            count,
            points: vec![],
        }
    }

    #[test]
    fn crc_matches_the_specifications_example() {
        // Modbus over Serial Line V1.02 §6.2.2 / common reference frame:
        // 01 03 00 00 00 0A → CRC C5 CD
        let f = encode_read(1, &req(Table::Holding, 0, 10));
        assert_eq!(f, vec![0x01, 0x03, 0x00, 0x00, 0x00, 0x0A, 0xC5, 0xCD]);
    }

    #[test]
    fn a_register_reply_decodes() {
        let f = with_crc(vec![0x11, 0x03, 0x04, 0x12, 0x34, 0xAB, 0xCD]);
        assert_eq!(
            decode_reply(0x11, &req(Table::Holding, 0, 2), &f).unwrap(),
            Data::Words(vec![0x1234, 0xABCD])
        );
    }

    #[test]
    fn a_bit_reply_decodes_lsb_first() {
        // Coils 0..10: first byte 0b1100_1101, second 0b01.
        let f = with_crc(vec![0x01, 0x01, 0x02, 0xCD, 0x01]);
        let Data::Bits(b) = decode_reply(1, &req(Table::Coil, 0, 10), &f).unwrap() else {
            panic!()
        };
        assert_eq!(
            b,
            vec![
                true, false, true, true, false, false, true, true, true, false
            ]
        );
    }

    #[test]
    fn a_bad_crc_is_a_crc_error() {
        let mut f = with_crc(vec![0x11, 0x03, 0x02, 0x00, 0x07]);
        f[3] ^= 0x40;
        assert!(matches!(
            decode_reply(0x11, &req(Table::Holding, 0, 1), &f),
            Err(BusError::Crc)
        ));
    }

    #[test]
    fn an_exception_reply_is_an_exception() {
        let f = with_crc(vec![0x05, 0x83, 0x02]);
        assert!(matches!(
            decode_reply(5, &req(Table::Holding, 0, 1), &f),
            Err(BusError::Exception(ExceptionCode::IllegalDataAddress))
        ));
    }

    #[test]
    fn a_reply_for_another_request_is_refused() {
        // Right unit and CRC, but two registers where one was asked for.
        let f = with_crc(vec![0x01, 0x03, 0x04, 0, 1, 0, 2]);
        assert!(matches!(
            decode_reply(1, &req(Table::Holding, 0, 1), &f),
            Err(BusError::Protocol(_))
        ));
        let f = with_crc(vec![0x02, 0x03, 0x02, 0, 1]);
        assert!(matches!(
            decode_reply(1, &req(Table::Holding, 0, 1), &f),
            Err(BusError::Protocol(_))
        ));
    }

    #[test]
    fn silence_is_3_5_characters_or_1_75ms_above_19200() {
        let s = |baud, parity| SerialSettings {
            port: String::new(),
            baud,
            parity,
            data_bits: 8,
            stop_bits: 1,
        };
        // 9600 8E1: 11 bits per character, 3.5 × 11 / 9600 s = 4.01 ms
        assert_eq!(s(9600, Parity::Even).t35().as_micros(), 4010);
        // 9600 8N1: 10 bits
        assert_eq!(s(9600, Parity::None).t35().as_micros(), 3645);
        assert_eq!(s(38400, Parity::None).t35(), Duration::from_micros(1750));
    }
}
