//! A fault-injecting TCP proxy for the demo and the tests: forwards loopback connections to an
//! upstream address and can cut them (and refuse new ones), black-hole them without a reset
//! (half-open), reset them in the middle of a packet, or pass traffic again.
//!
//! Independently of the fault mode it can shape the link like a real uplink ([`Link`]): every
//! byte is delayed by a one-way latency (order kept) and, optionally, serialised at a fixed rate
//! each way, as on DSL, LTE or a GPRS modem. Loopback hides latency bugs; this is how the tests
//! see them.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward bytes both ways.
    Pass,
    /// Close every connection and refuse new ones (accepted, then closed at once).
    Cut,
    /// Keep connections open but deliver nothing: bytes sent either way are lost, as on a
    /// half-open link. When the stall ends, the stalled connections are closed: what was sent
    /// into the hole never arrives.
    Stall,
    /// Forward only the first half of the next chunk from the client, then reset (RST) the
    /// connection; afterwards behave as `Pass`.
    ResetMidPacket,
}

/// The shape of the link between client and upstream, the same each way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Link {
    /// One-way latency: a round trip takes twice this.
    pub delay: Duration,
    /// Bytes per second each way; None: unlimited.
    pub rate: Option<u32>,
}

impl Link {
    /// A link with this round-trip time and no rate limit.
    pub fn round_trip(rtt: Duration) -> Link {
        Link {
            delay: rtt / 2,
            rate: None,
        }
    }

    /// The same link serialising `bits_per_second` each way.
    pub fn with_bits_per_second(self, bits_per_second: u32) -> Link {
        Link {
            rate: Some((bits_per_second / 8).max(1)),
            ..self
        }
    }
}

pub struct FaultProxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    link: watch::Sender<Link>,
    connections: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on `127.0.0.1:0` and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (mode, mode_rx) = watch::channel(Mode::Pass);
        let (link, link_rx) = watch::channel(Link::default());
        let connections = Arc::new(AtomicU64::new(0));
        let count = connections.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if *mode_rx.borrow() == Mode::Cut {
                    drop(client);
                    continue;
                }
                count.fetch_add(1, Ordering::Relaxed);
                let rx = mode_rx.clone();
                let link = link_rx.clone();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        relay(client, server, rx, link).await;
                    }
                });
            }
        });
        Ok(FaultProxy {
            addr,
            mode,
            link,
            connections,
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// Shapes the link from now on (bytes already on their way keep their schedule).
    pub fn shape(&self, link: Link) {
        self.link.send_replace(link);
    }

    /// Connections accepted and forwarded so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.mode.send_replace(Mode::Cut);
    }
}

/// One direction of a shaped link: chunks read, each with the instant it is due at the far end.
#[derive(Default)]
struct Pipe {
    due: VecDeque<(Instant, Vec<u8>)>,
    /// Bytes in `due`.
    queued: usize,
    /// When the (rate-limited) line is free to start serialising the next byte.
    line_free: Option<Instant>,
}

/// Most bytes in one direction that the proxy holds (its "modem buffer"); beyond that it stops
/// reading and TCP pushes back on the sender.
const PIPE_BYTES: usize = 256 * 1024;

impl Pipe {
    fn bytes(&self) -> usize {
        self.queued
    }

    fn pop(&mut self) -> Option<Vec<u8>> {
        let (_, bytes) = self.due.pop_front()?;
        self.queued -= bytes.len();
        Some(bytes)
    }

    /// Every chunk due by `now`, in one piece (one write instead of one per chunk).
    fn take_due(&mut self, now: Instant) -> Vec<u8> {
        let mut out = Vec::new();
        while self.next_due().is_some_and(|t| t <= now) {
            out.extend(self.pop().expect("due implies a chunk"));
        }
        out
    }

    fn clear(&mut self) {
        self.due.clear();
        self.queued = 0;
    }

    /// How much to read at once: about 50 ms of line time on a rate-limited link, so bytes
    /// trickle out instead of arriving in one late lump.
    fn chunk(link: &Link) -> usize {
        link.rate
            .map_or(16 * 1024, |r| (r as usize / 20).clamp(1, 16 * 1024))
    }

    /// Schedules `bytes`, read now, for delivery: serialised after what is already on the line,
    /// then delayed by the one-way latency. Delivery instants never go backwards.
    fn push(&mut self, bytes: Vec<u8>, link: &Link) {
        let now = Instant::now();
        let sent = match link.rate {
            Some(rate) => {
                let start = self.line_free.map_or(now, |f| f.max(now));
                let end = start + Duration::from_secs_f64(bytes.len() as f64 / rate as f64);
                self.line_free = Some(end);
                end
            }
            None => now,
        };
        let mut due = sent + link.delay;
        if let Some((last, _)) = self.due.back() {
            due = due.max(*last);
        }
        self.queued += bytes.len();
        self.due.push_back((due, bytes));
    }

    /// Writes everything still queued, each chunk when it is due.
    async fn deliver(&mut self, to: &mut tokio::net::tcp::OwnedWriteHalf) {
        while let Some(due) = self.next_due() {
            sleep_until(due).await;
            let bytes = self.pop().expect("due implies a chunk");
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
    }

    fn next_due(&self) -> Option<Instant> {
        self.due.front().map(|(t, _)| *t)
    }
}

async fn relay(
    client: TcpStream,
    server: TcpStream,
    mut mode: watch::Receiver<Mode>,
    link: watch::Receiver<Link>,
) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let mut cbuf = vec![0u8; 16 * 1024];
    let mut sbuf = vec![0u8; 16 * 1024];
    let mut up = Pipe::default(); // client → server
    let mut down = Pipe::default(); // server → client
    let mut stalled = false;
    let far_future = Instant::now() + Duration::from_secs(86_400 * 365);
    loop {
        let m = *mode.borrow_and_update();
        if stalled && m != Mode::Stall {
            return; // the half-open connection never recovers
        }
        match m {
            Mode::Cut => return,
            Mode::Stall => {
                stalled = true;
                up.clear();
                down.clear();
            }
            Mode::Pass | Mode::ResetMidPacket => {}
        }
        let shape = *link.borrow();
        let chunk = Pipe::chunk(&shape);
        let up_due = up.next_due();
        let down_due = down.next_due();
        tokio::select! {
            r = mode.changed() => if r.is_err() { return },
            n = cr.read(&mut cbuf[..chunk]), if up.bytes() < PIPE_BYTES => match n {
                // What the client sent before it closed still reaches the server.
                Ok(0) | Err(_) => return up.deliver(&mut sw).await,
                Ok(_) if stalled => {}
                Ok(n) if m == Mode::ResetMidPacket => {
                    let _ = sw.write_all(&cbuf[..n.div_ceil(2)]).await;
                    // Reset both sides: SO_LINGER 0 turns the close into an RST.
                    if let (Ok(c), Ok(s)) = (cr.reunite(cw), sr.reunite(sw)) {
                        let _ = c.set_zero_linger();
                        let _ = s.set_zero_linger();
                    }
                    return;
                }
                Ok(n) => up.push(cbuf[..n].to_vec(), &shape),
            },
            n = sr.read(&mut sbuf[..chunk]), if down.bytes() < PIPE_BYTES => match n {
                // A broker that answers and closes (a refused CONNACK): the answer arrives.
                Ok(0) | Err(_) => return down.deliver(&mut cw).await,
                Ok(_) if stalled => {}
                Ok(n) => down.push(sbuf[..n].to_vec(), &shape),
            },
            _ = sleep_until(up_due.unwrap_or(far_future)), if up_due.is_some() => {
                if sw.write_all(&up.take_due(Instant::now())).await.is_err() {
                    return;
                }
            }
            _ = sleep_until(down_due.unwrap_or(far_future)), if down_due.is_some() => {
                if cw.write_all(&down.take_due(Instant::now())).await.is_err() {
                    return;
                }
            }
        }
    }
}
