//! A fault-injecting TCP proxy for the demo and the tests: forwards loopback connections to an
//! upstream address and can cut them (and refuse new ones), black-hole them without a reset
//! (half-open), reset them in the middle of a packet, or pass traffic again.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

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

pub struct FaultProxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    connections: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on `127.0.0.1:0` and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (mode, mode_rx) = watch::channel(Mode::Pass);
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
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        relay(client, server, rx).await;
                    }
                });
            }
        });
        Ok(FaultProxy {
            addr,
            mode,
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

async fn relay(client: TcpStream, server: TcpStream, mut mode: watch::Receiver<Mode>) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let mut cbuf = vec![0u8; 16 * 1024];
    let mut sbuf = vec![0u8; 16 * 1024];
    let mut stalled = false;
    loop {
        let m = *mode.borrow_and_update();
        if stalled && m != Mode::Stall {
            return; // the half-open connection never recovers
        }
        match m {
            Mode::Cut => return,
            Mode::Stall => stalled = true,
            Mode::Pass | Mode::ResetMidPacket => {}
        }
        tokio::select! {
            r = mode.changed() => if r.is_err() { return },
            n = cr.read(&mut cbuf) => match n {
                Ok(0) | Err(_) => return,
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
                Ok(n) => if sw.write_all(&cbuf[..n]).await.is_err() { return },
            },
            n = sr.read(&mut sbuf) => match n {
                Ok(0) | Err(_) => return,
                Ok(_) if stalled => {}
                Ok(n) => if cw.write_all(&sbuf[..n]).await.is_err() { return },
            },
        }
    }
}
