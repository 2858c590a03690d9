//! Simulated Modbus devices for the demo, the tests and the benchmarks: a Modbus TCP server
//! (tokio-modbus's server side, on loopback) and an RS-485 bus of RTU slaves on a pseudo-terminal
//! ([`RtuBus`]), with register banks the caller can change while they run and knobs for the
//! faults real buses have: silent slaves, late answers, corrupt frames, noise, an unplugged port.

use std::collections::HashMap;
use std::future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_modbus::prelude::{ExceptionCode, Request, Response, SlaveRequest};
use tokio_modbus::server::Service;
use tokio_modbus::server::tcp::{Server, accept_tcp_connection};

/// The data of one simulated unit. Unset addresses answer with IllegalDataAddress.
#[derive(Debug, Default, Clone)]
pub struct Bank {
    pub holding: HashMap<u16, u16>,
    pub input: HashMap<u16, u16>,
    pub coils: HashMap<u16, bool>,
    pub discrete: HashMap<u16, bool>,
}

impl Bank {
    /// Writes `words` to consecutive holding registers from `addr`.
    pub fn set_holding(&mut self, addr: u16, words: &[u16]) {
        for (i, w) in words.iter().enumerate() {
            self.holding.insert(addr + i as u16, *w);
        }
    }

    pub fn set_input(&mut self, addr: u16, words: &[u16]) {
        for (i, w) in words.iter().enumerate() {
            self.input.insert(addr + i as u16, *w);
        }
    }
}

/// Shared state of the simulator: one bank per unit id, and knobs for fault injection.
#[derive(Debug, Default)]
pub struct State {
    pub units: HashMap<u8, Bank>,
    /// Units that never answer (the request times out).
    pub silent: Vec<u8>,
    /// Units that answer every request with this exception (a gateway in front of a dead
    /// device: 0x0B; a busy device: 0x06).
    pub refusing: HashMap<u8, ExceptionCode>,
    /// Added before every answer.
    pub delay: Duration,
    /// Requests served, for tests.
    pub requests: u64,
    /// RTU: per-unit answer delay (a slave that answers late, after the master's timeout).
    pub unit_delay: HashMap<u8, Duration>,
    /// RTU: delay every Nth reply by this much (a slave that is sometimes late).
    pub late_every: Option<(u64, Duration)>,
    /// RTU: corrupt the CRC of every Nth reply.
    pub corrupt_every: Option<u64>,
    /// RTU: send this many bytes of line noise before every Nth reply.
    pub noise_every: Option<(u64, usize)>,
    /// RTU: replies sent with a corrupted CRC, and bytes of noise sent (what was injected, for
    /// tests to compare the gateway's counts with).
    pub corrupted: u64,
    pub noise_sent: u64,
}

#[derive(Clone)]
pub struct Simulator {
    pub state: Arc<Mutex<State>>,
    pub addr: SocketAddr,
}

impl Simulator {
    /// Starts serving on `127.0.0.1:0` (or `addr`).
    pub async fn start(addr: Option<SocketAddr>) -> std::io::Result<Simulator> {
        let listener =
            TcpListener::bind(addr.unwrap_or_else(|| "127.0.0.1:0".parse().expect("valid")))
                .await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let server = Server::new(listener);
        let st = state.clone();
        tokio::spawn(async move {
            let new_service = |_socket_addr| Ok(Some(Handler { state: st.clone() }));
            let on_connected = |stream, socket_addr| async move {
                accept_tcp_connection(stream, socket_addr, new_service)
            };
            if let Err(e) = server.serve(&on_connected, |_err| {}).await {
                tracing::warn!(error = %e, "simulator stopped");
            }
        });
        Ok(Simulator { state, addr })
    }

    /// Changes the bank of `unit` (created if new).
    pub fn with_unit<R>(&self, unit: u8, f: impl FnOnce(&mut Bank) -> R) -> R {
        let mut st = self.state.lock().expect("not poisoned");
        f(st.units.entry(unit).or_default())
    }

    pub fn requests(&self) -> u64 {
        self.state.lock().expect("not poisoned").requests
    }
}

#[derive(Clone)]
struct Handler {
    state: Arc<Mutex<State>>,
}

type Answer = Result<Option<Response>, ExceptionCode>;

impl Service for Handler {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = std::pin::Pin<Box<dyn future::Future<Output = Answer> + Send>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        let (answer, delay) = {
            let mut st = self.state.lock().expect("not poisoned");
            st.requests += 1;
            if st.silent.contains(&req.slave) {
                (Ok(None), Duration::ZERO)
            } else if let Some(code) = st.refusing.get(&req.slave) {
                (Err(*code), st.delay)
            } else {
                (answer(&mut st, req.slave, &req.request), st.delay)
            }
        };
        Box::pin(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            answer
        })
    }
}

fn answer(st: &mut State, unit: u8, req: &Request<'_>) -> Answer {
    let Some(bank) = st.units.get_mut(&unit) else {
        return Err(ExceptionCode::GatewayTargetDevice);
    };
    fn words(map: &HashMap<u16, u16>, start: u16, n: u16) -> Result<Vec<u16>, ExceptionCode> {
        (0..n)
            .map(|i| {
                map.get(&(start + i))
                    .copied()
                    .ok_or(ExceptionCode::IllegalDataAddress)
            })
            .collect()
    }
    fn bits(map: &HashMap<u16, bool>, start: u16, n: u16) -> Result<Vec<bool>, ExceptionCode> {
        (0..n)
            .map(|i| {
                map.get(&(start + i))
                    .copied()
                    .ok_or(ExceptionCode::IllegalDataAddress)
            })
            .collect()
    }
    Ok(Some(match req {
        Request::ReadHoldingRegisters(a, n) => {
            Response::ReadHoldingRegisters(words(&bank.holding, *a, *n)?)
        }
        Request::ReadInputRegisters(a, n) => {
            Response::ReadInputRegisters(words(&bank.input, *a, *n)?)
        }
        Request::ReadCoils(a, n) => Response::ReadCoils(bits(&bank.coils, *a, *n)?),
        Request::ReadDiscreteInputs(a, n) => {
            Response::ReadDiscreteInputs(bits(&bank.discrete, *a, *n)?)
        }
        // Writes land only on addresses that exist, as on a real device.
        Request::WriteSingleCoil(a, v) => {
            let c = bank
                .coils
                .get_mut(a)
                .ok_or(ExceptionCode::IllegalDataAddress)?;
            *c = *v;
            Response::WriteSingleCoil(*a, *v)
        }
        Request::WriteSingleRegister(a, v) => {
            let r = bank
                .holding
                .get_mut(a)
                .ok_or(ExceptionCode::IllegalDataAddress)?;
            *r = *v;
            Response::WriteSingleRegister(*a, *v)
        }
        Request::WriteMultipleRegisters(a, words) => {
            if (0..words.len() as u16).any(|i| !bank.holding.contains_key(&(a + i))) {
                return Err(ExceptionCode::IllegalDataAddress);
            }
            bank.set_holding(*a, words);
            Response::WriteMultipleRegisters(*a, words.len() as u16)
        }
        _ => return Err(ExceptionCode::IllegalFunction),
    }))
}

/// An RS-485 bus of RTU slaves behind a pseudo-terminal. The gateway opens [`path`], a symlink
/// to the pty's slave side, like a USB adapter under `/dev/serial/by-id/`. Replies go out with
/// the timing of a real line at `baud`: the request's and the reply's wire time (11 bits per
/// character) and each unit's delay.
///
/// [`path`]: RtuBus::path
pub struct RtuBus {
    pub state: Arc<Mutex<State>>,
    pub path: std::path::PathBuf,
    baud: u32,
    adapter: Adapter,
}

impl RtuBus {
    /// Creates the pty and serves on it; `dir` holds the `ttyRTU` symlink.
    pub fn start(dir: &std::path::Path, baud: u32) -> std::io::Result<RtuBus> {
        let mut bus = RtuBus {
            state: Arc::new(Mutex::new(State::default())),
            path: dir.join("ttyRTU"),
            baud,
            adapter: Adapter::default(),
        };
        bus.plug()?;
        Ok(bus)
    }

    /// Changes the bank of `unit` (created if new).
    pub fn with_unit<R>(&self, unit: u8, f: impl FnOnce(&mut Bank) -> R) -> R {
        let mut st = self.state.lock().expect("not poisoned");
        f(st.units.entry(unit).or_default())
    }

    /// The adapter is pulled out: the pty closes and the device path disappears.
    pub fn unplug(&mut self) {
        self.adapter.unplug(&self.path);
    }

    /// The adapter is plugged in again: a new pty behind the same path.
    pub fn plug(&mut self) -> std::io::Result<()> {
        let state = self.state.clone();
        let char_time = Duration::from_secs_f64(11.0 / self.baud as f64);
        self.adapter.plug(&self.path, move |master| {
            serve_rtu(master, state, char_time)
        })
    }
}

impl Drop for RtuBus {
    fn drop(&mut self) {
        self.unplug();
    }
}

async fn serve_rtu(
    mut port: tokio_serial::SerialStream,
    state: Arc<Mutex<State>>,
    char_time: Duration,
) {
    use crate::modbus::{crc16, with_crc};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 256];
    let mut replies = 0u64;
    loop {
        match port.read(&mut chunk).await {
            Ok(0) | Err(_) => {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        // Reads and single writes are 8 bytes; a multiple-register write (16) carries its byte
        // count. A frame without a valid CRC is noise: skip a byte and look again.
        while buf.len() >= 8 {
            let len = if buf[1] == 0x10 {
                if buf.len() < 7 {
                    break;
                }
                9 + buf[6] as usize
            } else {
                8
            };
            if buf.len() < len {
                break;
            }
            let frame: Vec<u8> = buf[..len].to_vec();
            if crc16(&frame[..len - 2]).to_le_bytes() != [frame[len - 2], frame[len - 1]] {
                buf.remove(0);
                continue;
            }
            buf.drain(..len);
            let word = |i: usize| u16::from_be_bytes([frame[i], frame[i + 1]]);
            let unit = frame[0];
            let (answer, delay, corrupt, noise) = {
                let mut st = state.lock().expect("not poisoned");
                st.requests += 1;
                // On a serial bus nobody answers for a unit that is not there.
                if st.silent.contains(&unit) || !st.units.contains_key(&unit) {
                    continue;
                }
                replies += 1;
                let req = match frame[1] {
                    0x01 => Request::ReadCoils(
                        u16::from_be_bytes([frame[2], frame[3]]),
                        u16::from_be_bytes([frame[4], frame[5]]),
                    ),
                    0x02 => Request::ReadDiscreteInputs(
                        u16::from_be_bytes([frame[2], frame[3]]),
                        u16::from_be_bytes([frame[4], frame[5]]),
                    ),
                    0x03 => Request::ReadHoldingRegisters(
                        u16::from_be_bytes([frame[2], frame[3]]),
                        u16::from_be_bytes([frame[4], frame[5]]),
                    ),
                    0x04 => Request::ReadInputRegisters(
                        u16::from_be_bytes([frame[2], frame[3]]),
                        u16::from_be_bytes([frame[4], frame[5]]),
                    ),
                    0x05 => Request::WriteSingleCoil(word(2), word(4) == 0xFF00),
                    0x06 => Request::WriteSingleRegister(word(2), word(4)),
                    0x10 => Request::WriteMultipleRegisters(
                        word(2),
                        (0..word(4) as usize)
                            .map(|i| word(7 + 2 * i))
                            .collect::<Vec<u16>>()
                            .into(),
                    ),
                    _ => Request::ReadCoils(0, 0),
                };
                let pdu = match answer(&mut st, unit, &req) {
                    Ok(Some(Response::WriteSingleCoil(..)))
                    | Ok(Some(Response::WriteSingleRegister(..)))
                    | Ok(Some(Response::WriteMultipleRegisters(..))) => frame[..6].to_vec(),
                    Ok(Some(Response::ReadHoldingRegisters(w)))
                    | Ok(Some(Response::ReadInputRegisters(w))) => {
                        let mut p = vec![unit, frame[1], (w.len() * 2) as u8];
                        w.iter().for_each(|x| p.extend_from_slice(&x.to_be_bytes()));
                        p
                    }
                    Ok(Some(Response::ReadCoils(b)))
                    | Ok(Some(Response::ReadDiscreteInputs(b))) => {
                        let mut bytes = vec![0u8; b.len().div_ceil(8)];
                        for (i, bit) in b.iter().enumerate() {
                            if *bit {
                                bytes[i / 8] |= 1 << (i % 8);
                            }
                        }
                        let mut p = vec![unit, frame[1], bytes.len() as u8];
                        p.extend(bytes);
                        p
                    }
                    Err(code) => vec![unit, frame[1] | 0x80, u8::from(code)],
                    Ok(_) => continue,
                };
                let corrupt = st.corrupt_every.is_some_and(|n| replies.is_multiple_of(n));
                let noise = st
                    .noise_every
                    .filter(|(n, _)| replies.is_multiple_of(*n))
                    .map(|(_, len)| len);
                st.corrupted += u64::from(corrupt);
                st.noise_sent += noise.unwrap_or(0) as u64;
                let mut delay = st.unit_delay.get(&unit).copied().unwrap_or(st.delay);
                if let Some((n, late)) = st.late_every
                    && replies.is_multiple_of(n)
                {
                    delay += late;
                }
                (with_crc(pdu), delay, corrupt, noise)
            };
            let mut answer = answer;
            if corrupt {
                let i = answer.len() / 2;
                answer[i] ^= 0x5A;
            }
            // The request's wire time, the 3.5 characters of silence that end it, the slave's
            // own delay, then the reply's wire time.
            tokio::time::sleep(
                char_time * 8 + char_time.mul_f64(3.5) + delay + char_time * answer.len() as u32,
            )
            .await;
            if let Some(len) = noise {
                let junk: Vec<u8> = (0..len)
                    .map(|i| (i as u8).wrapping_mul(37).wrapping_add(11))
                    .collect();
                let _ = port.write_all(&junk).await;
            }
            let _ = port.write_all(&answer).await;
        }
    }
}

/// The serving task of a simulated serial adapter, behind a `/dev`-like link.
#[derive(Default)]
struct Adapter(Option<tokio::task::JoinHandle<()>>);

impl Adapter {
    fn unplug(&mut self, path: &std::path::Path) {
        if let Some(t) = self.0.take() {
            t.abort();
        }
        let _ = std::fs::remove_file(path);
    }

    /// A new pty behind `path`, its master side served by `serve`.
    fn plug<F, Fut>(&mut self, path: &std::path::Path, serve: F) -> std::io::Result<()>
    where
        F: FnOnce(tokio_serial::SerialStream) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        self.unplug(path);
        let (master, slave) = pty_at(path)?;
        let serving = serve(master);
        self.0 = Some(tokio::spawn(async move {
            // Keeping the slave side open keeps the master readable before the gateway opens it.
            let _slave = slave;
            serving.await
        }));
        Ok(())
    }
}

/// A pseudo-terminal pair whose slave side `path` links to, as a USB adapter's
/// `/dev/serial/by-id/…` name does.
fn pty_at(
    path: &std::path::Path,
) -> std::io::Result<(tokio_serial::SerialStream, tokio_serial::SerialStream)> {
    let (master, slave) = tokio_serial::SerialStream::pair().map_err(std::io::Error::from)?;
    // Close-on-exec: a process the tests spawn (mosquitto) would otherwise inherit the pty,
    // and an unplugged adapter would stay open in it.
    for fd in [
        std::os::fd::AsRawFd::as_raw_fd(&master),
        std::os::fd::AsRawFd::as_raw_fd(&slave),
    ] {
        // SAFETY: fcntl on a descriptor we own; F_SETFD only changes its flags.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    let name = tokio_serial::SerialPort::name(&slave)
        .ok_or_else(|| std::io::Error::other("pty without a name"))?;
    std::os::unix::fs::symlink(&name, path)?;
    Ok((master, slave))
}

/// What a simulated instrument answers to a request line: after a delay, a reply (or nothing).
pub type Responder = Box<dyn Fn(&str) -> Option<(Duration, Vec<u8>)> + Send + Sync>;

/// A serial text instrument behind a pseudo-terminal: it streams what the test writes, and
/// answers request lines with a [`Responder`]. The gateway opens [`path`](LineSensor::path).
pub struct LineSensor {
    pub path: std::path::PathBuf,
    tx: tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
    responder: Arc<Mutex<Option<Responder>>>,
    adapter: Adapter,
    rx_slot: Arc<Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>>>>,
}

impl LineSensor {
    pub fn start(dir: &std::path::Path, name: &str) -> std::io::Result<LineSensor> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut s = LineSensor {
            path: dir.join(name),
            tx,
            responder: Arc::new(Mutex::new(None)),
            adapter: Adapter::default(),
            rx_slot: Arc::new(Mutex::new(Some(rx))),
        };
        s.plug()?;
        Ok(s)
    }

    /// Sends bytes down the line as the instrument would.
    pub fn write(&self, bytes: impl Into<Vec<u8>>) {
        let _ = self.tx.send(bytes.into());
    }

    /// Answers every request line (terminator stripped) with `f`.
    pub fn answer_with(
        &self,
        f: impl Fn(&str) -> Option<(Duration, Vec<u8>)> + Send + Sync + 'static,
    ) {
        *self.responder.lock().expect("not poisoned") = Some(Box::new(f));
    }

    /// The instrument is unplugged: the pty closes and the device path disappears.
    pub fn unplug(&mut self) {
        self.adapter.unplug(&self.path);
    }

    /// Plugged in again: a new pty behind the same path.
    pub fn plug(&mut self) -> std::io::Result<()> {
        let responder = self.responder.clone();
        let rx_slot = self.rx_slot.clone();
        let tx = self.tx.clone();
        self.adapter.plug(&self.path, move |master| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let Some(rx) = rx_slot.lock().expect("not poisoned").take() else {
                return;
            };
            let mut master = master;
            let mut buf = [0u8; 512];
            let mut pending: Vec<u8> = Vec::new();
            // Returns the receiver for the next plug when this task ends.
            struct Give(
                Arc<Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>>>>,
                Option<tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>>,
            );
            impl Drop for Give {
                fn drop(&mut self) {
                    if let Some(rx) = self.1.take() {
                        *self.0.lock().expect("not poisoned") = Some(rx);
                    }
                }
            }
            // Held by a guard so that an unplug (abort) hands the receiver back.
            let mut give = Give(rx_slot.clone(), Some(rx));
            loop {
                let rx = give.1.as_mut().expect("held");
                tokio::select! {
                    bytes = rx.recv() => match bytes {
                        Some(b) => { let _ = master.write_all(&b).await; }
                        None => break,
                    },
                    n = master.read(&mut buf) => match n {
                        Ok(0) | Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                        Ok(n) => {
                            pending.extend_from_slice(&buf[..n]);
                            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                                let line: Vec<u8> = pending.drain(..=end).collect();
                                let text = String::from_utf8_lossy(&line).trim_end_matches(['\r', '\n']).to_string();
                                let reply = responder.lock().expect("not poisoned").as_ref().and_then(|f| f(&text));
                                if let Some((delay, bytes)) = reply {
                                    let tx = tx.clone();
                                    tokio::spawn(async move {
                                        tokio::time::sleep(delay).await;
                                        let _ = tx.send(bytes);
                                    });
                                }
                            }
                        }
                    },
                }
            }
        })
    }
}

impl Drop for LineSensor {
    fn drop(&mut self) {
        self.unplug();
    }
}
