//! MQTT 3.1.1 on the wire: rumqttc's packets and session state ([`MqttState`]: packet ids,
//! in-flight publishes, collisions, keep-alive) behind an I/O loop of our own that writes
//! everything waiting in one go.
//!
//! rumqttc's event loop writes and flushes each request on its own: one `writev` per publish,
//! 17 % of the gateway's CPU at 200 messages a second on loopback (#16's profile). Here each
//! wake-up takes every request waiting (within the in-flight limit) and every reply the
//! incoming packets call for (a PUBACK for a command), encodes them into one buffer and
//! writes it with one call: a device's poll of 20 registers goes out as one segment, not 20.
//! Nothing waits to be batched: a request that arrives alone is written at once.
//!
//! The rules of rumqttc's loop are kept: a request is taken only while fewer than the
//! in-flight limit of publishes await their acknowledgement and no packet id collides; a
//! PINGREQ goes out every keep-alive interval and a second one without a PINGRESP in between
//! ends the connection; a write that makes no progress for [`STALL`] ends it too. Events
//! reach the session as they would from rumqttc (`Outgoing::Publish` once the bytes are
//! written), converted by [`link`](super::link). MQTT 5 still runs on rumqttc's own loop.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use rumqttc::{
    ConnectReturnCode, ConnectionError, Event, MqttState, Packet, PingReq, Request, StateError,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};

/// The longest a write may make no progress, and the longest the TCP connect, the TLS
/// handshake and the CONNACK may take each (rumqttc's default connection timeout).
pub const STALL: Duration = Duration::from_secs(5);

/// At most this many requests are taken per wake-up (bounds the write buffer: 64 publishes
/// of the largest packet the session sends).
const BATCH: usize = 64;

/// Where and how to connect: the CONNECT packet is sent as given.
pub struct Dial {
    pub host: String,
    pub port: u16,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub connect: rumqttc::Connect,
    /// Packet-id space and the most publishes unacknowledged at once.
    pub inflight: u16,
    /// Largest packet read or written.
    pub max_packet: usize,
    pub keep_alive: Duration,
}

trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// Runs one connection: connects, sends each event down `events` (as `map` makes it) in the
/// order rumqttc's event loop would yield it, and returns the error that ended it
/// (`RequestsDone` when the requests' sender is gone; `Ok` when `events` is closed).
pub async fn run<T>(
    dial: Dial,
    requests: mpsc::Receiver<Request>,
    events: &mpsc::Sender<T>,
    map: fn(Event) -> T,
) -> Result<(), ConnectionError> {
    let io = timeout(STALL, open(&dial))
        .await
        .map_err(|_| ConnectionError::NetworkTimeout)??;
    serve(io, dial, requests, events, map).await
}

/// [`run`] on a stream already open.
async fn serve<T, S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    dial: Dial,
    mut requests: mpsc::Receiver<Request>,
    events: &mpsc::Sender<T>,
    map: fn(Event) -> T,
) -> Result<(), ConnectionError> {
    let emit = |ev| events.send(map(ev));
    let mut out = BytesMut::with_capacity(4096);
    let mut inb = BytesMut::with_capacity(4096);
    encode(
        &Packet::Connect(dial.connect.clone()),
        &mut out,
        dial.max_packet,
    )?;
    send(&mut io, &mut out).await?;
    let connack = timeout(STALL, async {
        loop {
            if let Some(p) = decode(&mut inb, dial.max_packet)? {
                return Ok::<_, ConnectionError>(p);
            }
            fill(&mut io, &mut inb).await?;
        }
    })
    .await
    .map_err(|_| ConnectionError::NetworkTimeout)??;
    match connack {
        Packet::ConnAck(a) if a.code == ConnectReturnCode::Success => {
            if emit(Event::Incoming(Packet::ConnAck(a))).await.is_err() {
                return Ok(());
            }
        }
        Packet::ConnAck(a) => return Err(ConnectionError::ConnectionRefused(a.code)),
        other => return Err(ConnectionError::NotConnAck(other)),
    }

    let mut state = MqttState::new(dial.inflight, false);
    let mut taken: VecDeque<Request> = VecDeque::new();
    let mut batch = Vec::with_capacity(BATCH);
    let pinging = !dial.keep_alive.is_zero();
    let mut ping = tokio::time::interval_at(
        Instant::now() + dial.keep_alive.max(Duration::from_millis(1)),
        dial.keep_alive.max(Duration::from_millis(1)),
    );
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Whatever came in behind the CONNACK in the same read.
    incoming(&mut inb, &mut state, &mut out, dial.max_packet)?;
    loop {
        // What was taken goes out while the rules allow; the rest waits for acknowledgements.
        while state.inflight() < dial.inflight && state.collision.is_none() {
            let Some(r) = taken.pop_front() else { break };
            if let Some(p) = state.handle_outgoing_packet(r)? {
                encode(&p, &mut out, dial.max_packet)?;
            }
        }
        send(&mut io, &mut out).await?;
        while let Some(ev) = state.events.pop_front() {
            if emit(ev).await.is_err() {
                return Ok(());
            }
        }
        let room = dial.inflight.saturating_sub(state.inflight()) as usize;
        let open_for_more = taken.is_empty() && room > 0 && state.collision.is_none();
        tokio::select! {
            r = io.read_buf(&mut inb) => {
                if r? == 0 {
                    return Err(StateError::ConnectionAborted.into());
                }
                incoming(&mut inb, &mut state, &mut out, dial.max_packet)?;
            }
            n = requests.recv_many(&mut batch, BATCH.min(room.max(1))), if open_for_more => {
                if n == 0 {
                    return Err(ConnectionError::RequestsDone);
                }
                taken.extend(batch.drain(..));
            }
            _ = ping.tick(), if pinging => {
                if let Some(p) = state.handle_outgoing_packet(Request::PingReq(PingReq))? {
                    encode(&p, &mut out, dial.max_packet)?;
                }
            }
        }
    }
}

async fn open(dial: &Dial) -> Result<Box<dyn Stream>, ConnectionError> {
    let tcp = tokio::net::TcpStream::connect((dial.host.as_str(), dial.port)).await?;
    // Small PUBLISHes paced by acknowledgements: with Nagle on, each waits for the peer's
    // (delayed) ACK of the one before.
    tcp.set_nodelay(true)?;
    let Some(config) = &dial.tls else {
        return Ok(Box::new(tcp));
    };
    let name = rustls::pki_types::ServerName::try_from(dial.host.clone())
        .map_err(|e| ConnectionError::Tls(rumqttc::TlsError::DNSName(e)))?;
    let tls = rumqttc::tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| ConnectionError::Tls(rumqttc::TlsError::Io(e)))?;
    Ok(Box::new(tls))
}

/// Hands every whole packet in `inb` to the state, its replies (PUBACK, PUBREL, …) to `out`.
fn incoming(
    inb: &mut BytesMut,
    state: &mut MqttState,
    out: &mut BytesMut,
    max: usize,
) -> Result<(), StateError> {
    while let Some(p) = decode(inb, max)? {
        if let Some(reply) = state.handle_incoming_packet(p)? {
            encode(&reply, out, max)?;
        }
    }
    Ok(())
}

fn encode(p: &Packet, out: &mut BytesMut, max: usize) -> Result<(), StateError> {
    p.write(out, max)
        .map(|_| ())
        .map_err(StateError::Deserialization)
}

/// The next whole packet in `inb`, if one is there.
fn decode(inb: &mut BytesMut, max: usize) -> Result<Option<Packet>, StateError> {
    match Packet::read(inb, max) {
        Ok(p) => Ok(Some(p)),
        Err(rumqttc::Error::InsufficientBytes(_)) => Ok(None),
        Err(e) => Err(StateError::Deserialization(e)),
    }
}

async fn fill(
    io: &mut (impl AsyncRead + Unpin),
    inb: &mut BytesMut,
) -> Result<(), ConnectionError> {
    if io.read_buf(inb).await? == 0 {
        return Err(StateError::ConnectionAborted.into());
    }
    Ok(())
}

/// Writes all of `out` (and flushes: TLS holds records back until then). Each step may wait
/// up to [`STALL`] for room in the socket: a slow link makes slow progress, a dead one ends.
async fn send(
    io: &mut (impl AsyncWrite + Unpin),
    out: &mut BytesMut,
) -> Result<(), ConnectionError> {
    if out.is_empty() {
        return Ok(());
    }
    while !out.is_empty() {
        let n = timeout(STALL, io.write(out))
            .await
            .map_err(|_| ConnectionError::FlushTimeout)??;
        if n == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into());
        }
        out.advance(n);
    }
    timeout(STALL, io.flush())
        .await
        .map_err(|_| ConnectionError::FlushTimeout)??;
    out.clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::{ConnAck, Outgoing, PubAck, Publish, QoS};
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll};
    use tokio::net::{TcpListener, TcpStream};

    /// A stream that counts the writes that put bytes on the socket.
    struct Counted {
        inner: TcpStream,
        writes: Arc<AtomicUsize>,
    }

    impl AsyncRead for Counted {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Counted {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let r = Pin::new(&mut self.inner).poll_write(cx, buf);
            if matches!(r, Poll::Ready(Ok(_))) {
                self.writes.fetch_add(1, Ordering::SeqCst);
            }
            r
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// The broker's end of the connection, speaking raw packets.
    struct Peer {
        sock: TcpStream,
        buf: BytesMut,
    }

    impl Peer {
        async fn next(&mut self, within: Duration) -> Option<Packet> {
            timeout(within, async {
                loop {
                    if let Some(p) = decode(&mut self.buf, 1 << 20).unwrap() {
                        return p;
                    }
                    assert!(
                        self.sock.read_buf(&mut self.buf).await.unwrap() > 0,
                        "closed"
                    );
                }
            })
            .await
            .ok()
        }
        async fn expect(&mut self) -> Packet {
            self.next(Duration::from_secs(5)).await.expect("a packet")
        }
        async fn send(&mut self, p: Packet) {
            let mut out = BytesMut::new();
            encode(&p, &mut out, 1 << 20).unwrap();
            self.sock.write_all(&out).await.unwrap();
        }
        async fn accept_session(&mut self) {
            assert!(matches!(self.expect().await, Packet::Connect(_)));
            self.send(Packet::ConnAck(ConnAck::new(
                ConnectReturnCode::Success,
                false,
            )))
            .await;
        }
    }

    struct Running {
        peer: Peer,
        requests: mpsc::Sender<Request>,
        events: mpsc::Receiver<Event>,
        writes: Arc<AtomicUsize>,
        done: tokio::task::JoinHandle<Result<(), ConnectionError>>,
    }

    /// The loop on a real loopback connection; `queued` requests wait in its channel before it
    /// starts.
    async fn start(inflight: u16, keep_alive: Duration, queued: Vec<Request>) -> Running {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (sock, _) = listener.accept().await.unwrap();
        let writes = Arc::new(AtomicUsize::new(0));
        let io = Counted {
            inner: client,
            writes: writes.clone(),
        };
        let (requests, rx) = mpsc::channel(256);
        for r in queued {
            requests.try_send(r).unwrap();
        }
        let (tx, events) = mpsc::channel(1024);
        let dial = Dial {
            host: "127.0.0.1".into(),
            port: 0,
            tls: None,
            connect: rumqttc::Connect::new("wire-test"),
            inflight,
            max_packet: 1 << 20,
            keep_alive,
        };
        let done = tokio::spawn(async move { serve(io, dial, rx, &tx, |e| e).await });
        Running {
            peer: Peer {
                sock,
                buf: BytesMut::new(),
            },
            requests,
            events,
            writes,
            done,
        }
    }

    use rumqttc::ConnectionError as Ce;

    /// How the loop ended (within 2 s).
    async fn ended(done: tokio::task::JoinHandle<Result<(), Ce>>) -> Result<(), Ce> {
        let joined = timeout(Duration::from_secs(2), done).await.expect("ended");
        joined.expect("did not panic")
    }

    fn publish(i: usize) -> Request {
        Request::Publish(Publish::new("t", QoS::AtLeastOnce, format!("{i}")))
    }

    fn payload(p: Packet) -> (u16, String) {
        match p {
            Packet::Publish(p) => (p.pkid, String::from_utf8(p.payload.to_vec()).unwrap()),
            other => panic!("not a publish: {other:?}"),
        }
    }

    #[tokio::test]
    async fn requests_waiting_when_the_loop_wakes_go_out_in_one_write() {
        let mut r = start(100, Duration::ZERO, (0..20).map(publish).collect()).await;
        r.peer.accept_session().await;
        for i in 0..20 {
            assert_eq!(
                payload(r.peer.expect().await),
                (i as u16 + 1, format!("{i}"))
            );
        }
        // CONNECT, then all twenty publishes.
        assert_eq!(r.writes.load(Ordering::SeqCst), 2);
        // Each is reported written, in order, after the CONNACK.
        assert!(matches!(
            r.events.recv().await,
            Some(Event::Incoming(Packet::ConnAck(_)))
        ));
        for pkid in 1..=20 {
            match r.events.recv().await {
                Some(Event::Outgoing(Outgoing::Publish(p))) => assert_eq!(p, pkid),
                other => panic!("{other:?}"),
            }
        }
        // One that comes alone is written at once.
        r.requests.send(publish(20)).await.unwrap();
        assert_eq!(payload(r.peer.expect().await), (21, "20".into()));
        assert_eq!(r.writes.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn no_more_publishes_await_acknowledgement_than_the_in_flight_limit() {
        let mut r = start(4, Duration::ZERO, (0..10).map(publish).collect()).await;
        r.peer.accept_session().await;
        let mut got = Vec::new();
        for _ in 0..4 {
            got.push(payload(r.peer.expect().await));
        }
        assert_eq!(r.peer.next(Duration::from_millis(300)).await, None);
        // Each acknowledgement lets exactly one more out, on the packet id it freed.
        while got.len() < 10 {
            let (pkid, _) = got[got.len() - 4];
            r.peer.send(Packet::PubAck(PubAck::new(pkid))).await;
            let next = payload(r.peer.expect().await);
            assert_eq!(next.0, pkid);
            got.push(next);
            assert_eq!(r.peer.next(Duration::from_millis(50)).await, None);
        }
        let order: Vec<String> = got.into_iter().map(|(_, p)| p).collect();
        assert_eq!(order, (0..10).map(|i| i.to_string()).collect::<Vec<_>>());
        assert!(!r.done.is_finished());
    }

    #[tokio::test]
    async fn a_publish_from_the_broker_is_acknowledged_and_reported() {
        let mut r = start(10, Duration::ZERO, vec![]).await;
        r.peer.accept_session().await;
        let mut cmd = Publish::new("cmd", QoS::AtLeastOnce, "on");
        cmd.pkid = 7;
        r.peer.send(Packet::Publish(cmd)).await;
        assert_eq!(r.peer.expect().await, Packet::PubAck(PubAck::new(7)));
        let _connack = r.events.recv().await;
        match r.events.recv().await {
            Some(Event::Incoming(Packet::Publish(p))) => assert_eq!(&p.payload[..], b"on"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_ping_left_unanswered_ends_the_connection_at_the_next_one() {
        let mut r = start(10, Duration::from_millis(400), vec![]).await;
        r.peer.accept_session().await;
        // The first is answered; the second is not.
        assert_eq!(r.peer.expect().await, Packet::PingReq);
        r.peer.send(Packet::PingResp).await;
        assert_eq!(r.peer.expect().await, Packet::PingReq);
        let e = ended(r.done).await;
        assert!(
            matches!(e, Err(Ce::MqttState(StateError::AwaitPingResp))),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn a_refusing_connack_is_the_error_rumqttc_gives() {
        let mut r = start(10, Duration::ZERO, vec![]).await;
        assert!(matches!(r.peer.expect().await, Packet::Connect(_)));
        let no = ConnAck::new(ConnectReturnCode::NotAuthorized, false);
        r.peer.send(Packet::ConnAck(no)).await;
        let e = ended(r.done).await;
        let no = ConnectReturnCode::NotAuthorized;
        assert!(
            matches!(e, Err(Ce::ConnectionRefused(c)) if c == no),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn the_broker_closing_the_connection_ends_the_loop() {
        let mut r = start(10, Duration::ZERO, vec![]).await;
        r.peer.accept_session().await;
        drop(r.peer);
        let e = ended(r.done).await;
        assert!(
            matches!(e, Err(Ce::MqttState(StateError::ConnectionAborted))),
            "{e:?}"
        );
    }
}
