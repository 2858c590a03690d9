//! Serial line transport: the port of a text-sensor bus ([`LinePort`]: opened on demand,
//! reopened with backoff, requests written, answers and streams read) and the framing of its
//! bytes into lines ([`LineFramer`]: the terminator, the longest line accepted, valid UTF-8;
//! pure). What the lines mean belongs to `parse`; who is asked when, to `poll::line`.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, timeout_at};
use tokio_serial::{SerialPort, SerialStream};

use super::serial::SerialSettings;
use crate::backoff::{Backoff, Retry};

/// What the framer makes of the bytes between two terminators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Framed {
    Line(String),
    /// More than `max_line` bytes without a terminator; the rest up to the next one is dropped.
    TooLong,
    InvalidUtf8,
}

pub struct LineFramer {
    terminator: Vec<u8>,
    /// A terminator ending in "\n" also accepts a bare "\n" (devices disagree about "\r").
    bare_newline: bool,
    max_line: usize,
    buf: Vec<u8>,
    /// Discarding the rest of an overlong line.
    overflow: bool,
}

impl LineFramer {
    pub fn new(terminator: &[u8], max_line: usize) -> LineFramer {
        LineFramer {
            terminator: terminator.to_vec(),
            bare_newline: terminator.len() > 1 && terminator.ends_with(b"\n"),
            max_line,
            buf: Vec::with_capacity(max_line.min(4096)),
            overflow: false,
        }
    }

    /// Forgets any partial line (before a request, so a stale fragment is not taken for the answer).
    pub fn clear(&mut self) {
        self.buf.clear();
        self.overflow = false;
    }

    /// Starts over in the middle of a stream (a port just opened on a sensor that was already
    /// talking): everything up to the first line ending may be the tail of a line, so it is
    /// discarded without counting it as an error. The first whole line after that is framed.
    pub fn resync(&mut self) {
        self.buf.clear();
        self.overflow = true;
    }

    /// Feeds bytes; complete lines (and framing errors) are appended to `out`. Empty lines are
    /// skipped.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<Framed>) {
        for &b in bytes {
            self.buf.push(b);
            let end = if self.buf.ends_with(&self.terminator) {
                Some(self.buf.len() - self.terminator.len())
            } else if self.bare_newline && b == b'\n' {
                Some(self.buf.len() - 1)
            } else {
                None
            };
            match end {
                Some(end) => {
                    if self.overflow {
                        self.overflow = false;
                    } else if end > self.max_line {
                        out.push(Framed::TooLong);
                    } else if end > 0 {
                        out.push(match std::str::from_utf8(&self.buf[..end]) {
                            Ok(s) => Framed::Line(s.to_string()),
                            Err(_) => Framed::InvalidUtf8,
                        });
                    }
                    self.buf.clear();
                }
                None => {
                    // Room for a terminator beyond the line itself.
                    if self.buf.len() > self.max_line + self.terminator.len() {
                        if !self.overflow {
                            out.push(Framed::TooLong);
                            self.overflow = true;
                        }
                        // Keep only what could be the start of a terminator.
                        let keep = self.terminator.len().saturating_sub(1);
                        let cut = self.buf.len() - keep;
                        self.buf.drain(..cut);
                    }
                }
            }
        }
    }
}

/// A byte stream a line bus can run on: a serial port, or in tests any stream.
pub trait LineIo: AsyncRead + AsyncWrite + Unpin + Send {
    /// Discards what the kernel holds for us (serial: `tcflush(TCIFLUSH)`).
    fn clear_input(&mut self) {}
}

impl LineIo for SerialStream {
    fn clear_input(&mut self) {
        let _ = self.clear(tokio_serial::ClearBuffer::Input);
    }
}

impl LineIo for tokio::io::DuplexStream {}

/// Opens the stream of a line bus; a failure is retried with backoff.
type Opener = Box<dyn FnMut() -> std::io::Result<Box<dyn LineIo>> + Send>;

/// The serial port of a line bus, opened on demand, with the framer of its bytes.
pub struct LinePort {
    bus: String,
    /// The port's name, for the log.
    name: String,
    open: Opener,
    port: Option<Box<dyn LineIo>>,
    framer: LineFramer,
    /// One streaming device owns the port: after opening it, the bytes up to the first line
    /// ending are discarded (the sensor may be mid-line). A request/response answer is whole.
    streaming: bool,
    opening: Retry,
    buf: Vec<u8>,
}

impl LinePort {
    pub fn new(
        bus: &str,
        settings: SerialSettings,
        terminator: &[u8],
        max_line: usize,
        streaming: bool,
    ) -> LinePort {
        let name = settings.port.clone();
        LinePort::with_opener(
            bus,
            &name,
            Box::new(move || Ok(Box::new(settings.open()?) as Box<dyn LineIo>)),
            terminator,
            max_line,
            streaming,
        )
    }

    /// A line bus on whatever `open` returns (tests: one end of an in-memory pipe).
    pub fn with_opener(
        bus: &str,
        name: &str,
        open: Opener,
        terminator: &[u8],
        max_line: usize,
        streaming: bool,
    ) -> LinePort {
        LinePort {
            bus: bus.to_string(),
            name: name.to_string(),
            open,
            port: None,
            framer: LineFramer::new(terminator, max_line),
            streaming,
            opening: Retry::new(Backoff::DEVICE),
            buf: vec![0; 1024],
        }
    }

    /// Opens the port if it is closed; on failure returns how long to wait before trying again.
    pub fn try_open(&mut self) -> Result<(), Duration> {
        if self.port.is_some() {
            return Ok(());
        }
        match (self.open)() {
            Ok(p) => {
                if self.opening.succeeded() > 0 {
                    tracing::info!(bus = %self.bus, port = %self.name, "serial port open again");
                }
                if self.streaming {
                    self.framer.resync();
                } else {
                    self.framer.clear();
                }
                self.port = Some(p);
                Ok(())
            }
            Err(e) => {
                let wait = self.opening.failed();
                if self.opening.failures() == 1 {
                    tracing::warn!(bus = %self.bus, port = %self.name, error = %e,
                        "cannot open the serial port; retrying with backoff (up to 60s)");
                }
                Err(wait)
            }
        }
    }

    fn close(&mut self, why: &str) {
        if self.port.take().is_some() {
            tracing::warn!(bus = %self.bus, port = %self.name, why, "serial port lost; reopening");
        }
    }

    /// Waits for bytes and appends the lines they complete to `out`. A port that reaches its
    /// end or fails is closed (and reopened by the next [`try_open`](Self::try_open)): `Err`.
    /// Cancel-safe: nothing is lost when the wait is abandoned.
    pub async fn read_lines(&mut self, out: &mut Vec<Framed>) -> Result<(), ()> {
        let Some(port) = self.port.as_mut() else {
            return Err(());
        };
        match port.read(&mut self.buf).await {
            Ok(0) => {
                self.close("end of file");
                Err(())
            }
            Err(e) => {
                self.close(&e.to_string());
                Err(())
            }
            Ok(n) => {
                self.framer.push(&self.buf[..n], out);
                Ok(())
            }
        }
    }

    /// Sends a request. Whatever waits in the input (a partial line, the kernel's queue) is
    /// discarded first: it is not the answer to this request.
    pub async fn send(&mut self, request: &[u8]) -> Result<(), ()> {
        self.framer.clear();
        let Some(port) = self.port.as_mut() else {
            return Err(());
        };
        port.clear_input();
        let sent = async {
            port.write_all(request).await?;
            port.flush().await
        }
        .await;
        sent.map_err(|e| self.close(&e.to_string()))
    }

    /// After an unanswered request: lets a late answer arrive until `until` and drops it, so it
    /// is never taken for the next device's answer. Returns the bytes dropped.
    pub async fn drop_late_answer(&mut self, until: Instant) -> usize {
        let Some(port) = self.port.as_mut() else {
            return 0;
        };
        let mut late = 0;
        while let Ok(Ok(n)) = timeout_at(until, port.read(&mut self.buf)).await {
            if n == 0 {
                break;
            }
            late += n;
        }
        port.clear_input();
        self.framer.clear();
        late
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A line bus over an in-memory pipe; the other end plays the device.
    fn piped(streaming: bool) -> (LinePort, tokio::io::DuplexStream) {
        let (ours, device) = tokio::io::duplex(4096);
        let mut ours = Some(ours);
        let open: Opener = Box::new(move || {
            ours.take()
                .map(|s| Box::new(s) as Box<dyn LineIo>)
                .ok_or_else(|| std::io::Error::other("already taken"))
        });
        let port = LinePort::with_opener("test", "pipe", open, b"\r\n", 80, streaming);
        (port, device)
    }

    #[tokio::test]
    async fn a_request_goes_out_and_its_answer_comes_back_as_a_line() {
        let (mut port, mut device) = piped(false);
        port.try_open().unwrap();
        port.send(b"READ?\r\n").await.unwrap();
        let mut asked = [0u8; 7];
        device.read_exact(&mut asked).await.unwrap();
        assert_eq!(&asked, b"READ?\r\n");
        device.write_all(b"21.5;48\r\n").await.unwrap();
        let mut out = Vec::new();
        while out.is_empty() {
            port.read_lines(&mut out).await.unwrap();
        }
        assert_eq!(out, vec![Framed::Line("21.5;48".into())]);
    }

    #[tokio::test]
    async fn a_stream_opened_mid_line_starts_at_the_next_whole_line() {
        let (mut port, mut device) = piped(true);
        port.try_open().unwrap();
        device.write_all(b"5;48\r\n22.0;47\r\n").await.unwrap();
        let mut out = Vec::new();
        while out.is_empty() {
            port.read_lines(&mut out).await.unwrap();
        }
        assert_eq!(out, vec![Framed::Line("22.0;47".into())]);
    }

    #[tokio::test]
    async fn a_late_answer_is_dropped_not_taken_for_the_next_one() {
        let (mut port, mut device) = piped(false);
        port.try_open().unwrap();
        device.write_all(b"late\r\nmore").await.unwrap();
        let dropped = port
            .drop_late_answer(Instant::now() + Duration::from_millis(50))
            .await;
        assert_eq!(dropped, 10);
        device.write_all(b"fresh\r\n").await.unwrap();
        let mut out = Vec::new();
        while out.is_empty() {
            port.read_lines(&mut out).await.unwrap();
        }
        assert_eq!(out, vec![Framed::Line("fresh".into())]);
    }

    #[tokio::test]
    async fn a_port_that_ends_is_closed_and_reopened_with_backoff() {
        let (mut port, device) = piped(false);
        port.try_open().unwrap();
        drop(device);
        let mut out = Vec::new();
        assert!(port.read_lines(&mut out).await.is_err());
        assert_eq!(port.try_open(), Err(Duration::from_secs(1)));
        assert_eq!(port.try_open(), Err(Duration::from_secs(2)));
    }

    /// Acceptance testing (#10): a streaming port opened in the middle of a line framed its
    /// tail as a line of its own. After `resync` the tail is discarded, silently.
    #[test]
    fn after_a_resync_the_tail_of_a_line_is_discarded_without_an_error() {
        let mut f = LineFramer::new(b"\r\n", 64);
        let mut out = Vec::new();
        f.resync();
        f.push(b"5,H=4", &mut out);
        f.push(b"0\r\nT=21.5,H=40\r\n", &mut out);
        assert_eq!(out, vec![Framed::Line("T=21.5,H=40".into())]);
        // A terminator right away: nothing lost.
        let mut out = Vec::new();
        f.resync();
        f.push(b"\r\nT=1,H=2\r\n", &mut out);
        assert_eq!(out, vec![Framed::Line("T=1,H=2".into())]);
    }

    fn frame(t: &[u8], max: usize, chunks: &[&[u8]]) -> Vec<Framed> {
        let mut f = LineFramer::new(t, max);
        let mut out = Vec::new();
        for c in chunks {
            f.push(c, &mut out);
        }
        out
    }

    fn line(s: &str) -> Framed {
        Framed::Line(s.into())
    }

    #[test]
    fn lines_split_across_reads_are_joined() {
        assert_eq!(
            frame(b"\r\n", 64, &[b"T=2", b"1.5\r", b"\nH=4\r\n"]),
            vec![line("T=21.5"), line("H=4")]
        );
    }

    #[test]
    fn a_bare_newline_ends_a_line_when_the_terminator_is_crlf() {
        assert_eq!(
            frame(b"\r\n", 64, &[b"a\nb\r\n\r\n"]),
            vec![line("a"), line("b")]
        );
    }

    #[test]
    fn other_terminators_work() {
        assert_eq!(frame(b"\r", 64, &[b"x\ry\r"]), vec![line("x"), line("y")]);
        assert_eq!(frame(b";", 64, &[b"1;2;"]), vec![line("1"), line("2")]);
    }

    #[test]
    fn an_overlong_line_is_reported_once_and_dropped_to_its_end() {
        let long = vec![b'x'; 100];
        assert_eq!(
            frame(b"\r\n", 16, &[b"ok\r\n", &long, b"tail\r\nnext\r\n"]),
            vec![line("ok"), Framed::TooLong, line("next")]
        );
    }

    #[test]
    fn a_line_of_exactly_max_line_bytes_is_accepted() {
        assert_eq!(frame(b"\r\n", 4, &[b"abcd\r\n"]), vec![line("abcd")]);
        assert_eq!(frame(b"\r\n", 4, &[b"abcde\r\n"]), vec![Framed::TooLong]);
    }

    #[test]
    fn invalid_utf8_is_reported() {
        assert_eq!(
            frame(b"\n", 64, &[b"\xff\xfe\n", b"ok\n"]),
            vec![Framed::InvalidUtf8, line("ok")]
        );
    }
}
