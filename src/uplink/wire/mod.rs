//! MQTT on the wire: rumqttc's packets and session state (`MqttState`: packet ids, in-flight
//! publishes, collisions, keep-alive) behind an I/O loop of our own that writes everything
//! waiting in one go, for both protocol versions ([`V4`] is 3.1.1, [`V5`] is 5).
//!
//! rumqttc's event loop writes and flushes each request on its own: one `writev` per publish,
//! 17 % of the gateway's CPU at 200 messages a second on loopback (#16's profile). Here each
//! wake-up takes every request waiting (within the in-flight limit) and every reply the
//! incoming packets call for (a PUBACK for a command), encodes them into one buffer and
//! writes it with one call: a device's poll of 20 registers goes out as one segment, not 20.
//! Nothing waits to be batched: a request that arrives alone is written at once.
//!
//! Reads are the other way round. While the session has nothing waiting for room in the window
//! ([`Dial::unhurried`]), a read is held for [`GATHER`] after the one before, with the socket's
//! receive low-water mark raised so that the acknowledgements trickling in meanwhile do not
//! wake the thread: a poll's PUBACKs are read in one or two reads instead of one per segment.
//! Once the session has more to send than the window holds, every read is immediate again (a
//! hold already begun runs out first: at most [`GATHER`]).
//!
//! The rules of rumqttc's loop are kept: a request is taken only while fewer than the
//! in-flight limit of publishes await their acknowledgement and no packet id collides; a
//! PINGREQ goes out every keep-alive interval and a second one without a PINGRESP in between
//! ends the connection; a write that makes no progress for [`STALL`] ends it too. MQTT 5's
//! CONNACK sets the limits as rumqttc applies them (Receive Maximum, Maximum Packet Size,
//! Server Keep Alive, Topic Alias Maximum). Events reach the session as they would from
//! rumqttc (`Outgoing::Publish` once the bytes are written), converted by
//! [`link`](super::link).

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::error::Elapsed;
use tokio::time::{Instant, timeout};

/// The longest a write may make no progress, and the longest the TCP connect, the TLS
/// handshake and the CONNACK may take each (rumqttc's default connection timeout).
pub const STALL: Duration = Duration::from_secs(5);

/// How long acknowledgements may gather after a read before the next, while the session has
/// nothing waiting for room in the window ([`Dial::unhurried`]). A broker answers a burst of
/// publishes with PUBACKs a few at a time: on loopback, 200 publishes came back in ~25 reads,
/// each a wake-up of this thread and of the session. Nothing waits on them then but the
/// queue's deletes; once the session has rows the window cannot take, reads are immediate
/// again (after the hold already begun, if one has).
pub const GATHER: Duration = Duration::from_millis(2);

/// While a read is held, the kernel wakes this thread only once this much has arrived
/// (`SO_RCVLOWAT`): without it every segment that arrives in the hold still wakes the thread,
/// for nothing. A thousand PUBACKs, or a large command, end the hold's quiet early.
const QUIET_BYTES: i32 = 4096;

/// At most this many requests are taken per wake-up (bounds the write buffer: 64 publishes
/// of the largest packet the session sends).
const BATCH: usize = 64;

/// What the loop needs of a protocol version: rumqttc's types for it, and the few places the
/// versions differ.
pub trait Version: Sized {
    type Packet: std::fmt::Debug;
    type Request;
    type Event;
    type State;
    type StateError;
    type Error: From<std::io::Error> + From<Self::StateError> + From<rumqttc::TlsError>;

    fn state(inflight: u16) -> Self::State;
    /// Publishes awaiting acknowledgement, and whether a packet id collided.
    fn in_flight(s: &Self::State) -> (u16, bool);
    fn outgoing(
        s: &mut Self::State,
        r: Self::Request,
    ) -> Result<Option<Self::Packet>, Self::StateError>;
    fn incoming(
        s: &mut Self::State,
        p: Self::Packet,
    ) -> Result<Option<Self::Packet>, Self::StateError>;
    fn next_event(s: &mut Self::State) -> Option<Self::Event>;
    fn ping() -> Self::Request;
    /// The acknowledgement of the QoS 1 publish `pkid` (for one read past: [`Oversize`]).
    fn puback(pkid: u16) -> Self::Packet;
    /// The next whole packet in `inb`, if one is there.
    fn decode(inb: &mut BytesMut, max: usize) -> Result<Option<Self::Packet>, Self::StateError>;
    fn encode(p: &Self::Packet, out: &mut BytesMut, max: usize) -> Result<(), Self::StateError>;
    /// Takes the broker's answer to CONNECT: when it accepts, its event is queued in the state
    /// and the limits it sets are applied to `dial`.
    fn connack(
        s: &mut Self::State,
        p: Self::Packet,
        dial: &mut Dial<Self>,
    ) -> Result<(), Self::Error>;
    /// A wait ran out (`writing`: for room in the socket, else for the connection).
    fn timed_out(e: Elapsed, writing: bool) -> Self::Error;
    fn requests_done() -> Self::Error;
    fn aborted() -> Self::Error;
}

/// Where and how to connect: the CONNECT packet is sent as given.
pub struct Dial<V: Version> {
    pub host: String,
    pub port: u16,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub connect: V::Packet,
    /// Packet-id space and the most publishes unacknowledged at once.
    pub inflight: u16,
    /// Largest packet read.
    pub max_in: usize,
    /// Largest packet written.
    pub max_out: usize,
    pub keep_alive: Duration,
    /// Set by the session while nothing of it waits for room in the window: a read is then
    /// held until [`GATHER`] after the one before.
    pub unhurried: Arc<AtomicBool>,
    /// Told of each incoming packet larger than `max_in`, read past and dropped.
    pub on_discard: OnDiscard,
}

/// What the session is told of a packet read past: its topic (a PUBLISH) and its size.
pub type OnDiscard = Arc<dyn Fn(&Discarded) + Send + Sync>;

/// An incoming packet larger than the loop takes (`Dial::max_in`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discarded {
    /// The topic of a PUBLISH (cut to [`crate::mapping::QUOTED`] characters); None for
    /// another kind of packet.
    pub topic: Option<String>,
    /// The whole packet's size in bytes.
    pub bytes: usize,
}

trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// Runs one connection: connects, sends each event down `events` (as `map` makes it) in the
/// order rumqttc's event loop would yield it, and returns the error that ended it
/// (`RequestsDone` when the requests' sender is gone; `Ok` when `events` is closed).
pub async fn run<V: Version, T>(
    dial: Dial<V>,
    requests: mpsc::Receiver<V::Request>,
    events: &mpsc::Sender<T>,
    map: fn(V::Event) -> T,
) -> Result<(), V::Error> {
    let (io, socket) = timeout(STALL, open::<V>(&dial))
        .await
        .map_err(|e| V::timed_out(e, false))??;
    serve(io, Quiet::new(socket), dial, requests, events, map).await
}

/// The receive low-water mark of the connection's socket: raised while a read is held (see
/// [`QUIET_BYTES`]), lowered to one byte (the default) before the next read. Linux raises
/// EPOLLIN at once when lowering it finds data waiting (`tcp_set_rcvlowat`), so nothing that
/// arrived in the hold waits for more. Best effort: where the option is refused the thread is
/// merely woken more often.
struct Quiet {
    socket: Option<RawFd>,
    raised: bool,
}

impl Quiet {
    /// `socket`: the TCP socket under the stream (`None`: never raised).
    fn new(socket: Option<RawFd>) -> Self {
        Quiet {
            socket,
            raised: false,
        }
    }

    fn set(&mut self, raised: bool) {
        let Some(fd) = self.socket else { return };
        if self.raised == raised {
            return;
        }
        self.raised = raised;
        let bytes: libc::c_int = if raised { QUIET_BYTES } else { 1 };
        // SAFETY: `fd` is the socket of the stream this loop owns, open for as long as the
        // loop runs; the option's value is a c_int that lives across the call.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&bytes as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

/// [`run`] on a stream already open.
async fn serve<V: Version, T, S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    mut quiet: Quiet,
    mut dial: Dial<V>,
    mut requests: mpsc::Receiver<V::Request>,
    events: &mpsc::Sender<T>,
    map: fn(V::Event) -> T,
) -> Result<(), V::Error> {
    let emit = |ev| events.send(map(ev));
    let mut out = BytesMut::with_capacity(4096);
    let mut inb = BytesMut::with_capacity(4096);
    V::encode(&dial.connect, &mut out, dial.max_out)?;
    send::<V>(&mut io, &mut out).await?;
    let connack = timeout(STALL, async {
        loop {
            if let Some(p) = V::decode(&mut inb, dial.max_in)? {
                return Ok::<_, V::Error>(p);
            }
            fill::<V>(&mut io, &mut inb).await?;
        }
    })
    .await
    .map_err(|e| V::timed_out(e, false))??;
    let mut state = V::state(dial.inflight);
    V::connack(&mut state, connack, &mut dial)?;

    let mut taken: VecDeque<V::Request> = VecDeque::new();
    let mut batch = Vec::with_capacity(BATCH);
    let pinging = !dial.keep_alive.is_zero();
    let every = dial.keep_alive.max(Duration::from_millis(1));
    let mut ping = tokio::time::interval_at(Instant::now() + every, every);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The next read is held until then while the session is unhurried.
    let mut read_at: Option<Instant> = None;
    // Bytes of an over-size packet still to be read past.
    let mut skip = 0;
    // Whatever came in behind the CONNACK in the same read.
    incoming::<V>(&mut inb, &mut skip, &mut state, &mut out, &dial)?;
    loop {
        // What was taken goes out while the rules allow; the rest waits for acknowledgements.
        while let (n, false) = V::in_flight(&state)
            && n < dial.inflight
        {
            let Some(r) = taken.pop_front() else { break };
            if let Some(p) = V::outgoing(&mut state, r)? {
                V::encode(&p, &mut out, dial.max_out)?;
            }
        }
        send::<V>(&mut io, &mut out).await?;
        while let Some(ev) = V::next_event(&mut state) {
            if emit(ev).await.is_err() {
                return Ok(());
            }
        }
        let (n, collided) = V::in_flight(&state);
        let room = dial.inflight.saturating_sub(n) as usize;
        let open_for_more = taken.is_empty() && room > 0 && !collided;
        let hold =
            read_at.filter(|at| dial.unhurried.load(Ordering::Relaxed) && *at > Instant::now());
        quiet.set(hold.is_some());
        tokio::select! {
            r = fill::<V>(&mut io, &mut inb), if hold.is_none() => {
                r?;
                incoming::<V>(&mut inb, &mut skip, &mut state, &mut out, &dial)?;
                read_at = Some(Instant::now() + GATHER);
            }
            _ = tokio::time::sleep_until(hold.unwrap_or_else(Instant::now)), if hold.is_some() => {
                read_at = None;
            }
            n = requests.recv_many(&mut batch, BATCH.min(room.max(1))), if open_for_more => {
                if n == 0 {
                    return Err(V::requests_done());
                }
                taken.extend(batch.drain(..));
            }
            _ = ping.tick(), if pinging => {
                if let Some(p) = V::outgoing(&mut state, V::ping())? {
                    V::encode(&p, &mut out, dial.max_out)?;
                }
            }
        }
    }
}

/// Hands every whole packet in `inb` to the state, its replies (PUBACK, PUBREL, …) to `out`.
/// A packet larger than `dial.max_in` is read past instead (`skip`: what is left of it beyond
/// `inb`), acknowledged when it is a QoS 1 publish, and reported to `dial.on_discard`: a 2 MB
/// retained message on a command topic used to end the session at every SUBSCRIBE.
fn incoming<V: Version>(
    inb: &mut BytesMut,
    skip: &mut usize,
    state: &mut V::State,
    out: &mut BytesMut,
    dial: &Dial<V>,
) -> Result<(), V::StateError> {
    loop {
        if *skip > 0 {
            let n = (*skip).min(inb.len());
            inb.advance(n);
            *skip -= n;
            if *skip > 0 {
                return Ok(());
            }
        }
        match Oversize::of(inb, dial.max_in) {
            Oversize::No => {}
            Oversize::NotYetKnown => return Ok(()),
            Oversize::Packet { bytes, topic, pkid } => {
                if let Some(pkid) = pkid {
                    V::encode(&V::puback(pkid), out, dial.max_out)?;
                }
                let topic = topic.map(|t| crate::mapping::cut(t, crate::mapping::QUOTED));
                (dial.on_discard)(&Discarded { topic, bytes });
                *skip = bytes;
                continue;
            }
        }
        let Some(p) = V::decode(inb, dial.max_in)? else {
            return Ok(());
        };
        if let Some(reply) = V::incoming(state, p)? {
            V::encode(&reply, out, dial.max_out)?;
        }
    }
}

/// Whether the packet at the head of a read buffer is larger than the loop takes, from its
/// fixed header (MQTT 3.1.1 and 5 alike: 2.2 and 2.1.4) and, for a PUBLISH, its topic and
/// packet id (3.3.2).
#[derive(Debug, PartialEq, Eq)]
enum Oversize {
    /// It fits, is not all there yet, or is malformed: for the decoder to say.
    No,
    /// It is too large, but the topic and packet id of the publish are not all there yet.
    NotYetKnown,
    /// It is too large: `bytes` in all; a publish's topic, and its packet id at QoS 1.
    Packet {
        bytes: usize,
        topic: Option<String>,
        pkid: Option<u16>,
    },
}

impl Oversize {
    fn of(inb: &[u8], max: usize) -> Oversize {
        let Some((&first, rest)) = inb.split_first() else {
            return Oversize::No;
        };
        // Remaining Length: up to four bytes, seven bits each, least significant first.
        let mut remaining = 0usize;
        let mut header = None;
        for (i, b) in rest.iter().take(4).enumerate() {
            remaining |= usize::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                header = Some(2 + i);
                break;
            }
        }
        let Some(header) = header else {
            return Oversize::No;
        };
        let bytes = header + remaining;
        if bytes <= max {
            return Oversize::No;
        }
        if first >> 4 != 3 {
            return Oversize::Packet {
                bytes,
                topic: None,
                pkid: None,
            };
        }
        let qos = (first >> 1) & 3;
        let Some(len) = inb.get(header..header + 2) else {
            return Oversize::NotYetKnown;
        };
        let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
        let topic_at = header + 2;
        let Some(topic) = inb.get(topic_at..topic_at + len) else {
            return Oversize::NotYetKnown;
        };
        let topic = Some(String::from_utf8_lossy(topic).into_owned());
        let pkid = if qos == 1 {
            let at = topic_at + len;
            let Some(id) = inb.get(at..at + 2) else {
                return Oversize::NotYetKnown;
            };
            Some(u16::from_be_bytes([id[0], id[1]]))
        } else {
            // QoS 0 needs no answer; we subscribe at QoS 1, so a broker sends no QoS 2.
            None
        };
        Oversize::Packet { bytes, topic, pkid }
    }
}

/// The connection, and its TCP socket (for [`Quiet`]; the stream owns it).
async fn open<V: Version>(dial: &Dial<V>) -> Result<(Box<dyn Stream>, Option<RawFd>), V::Error> {
    let tcp = tokio::net::TcpStream::connect((dial.host.as_str(), dial.port)).await?;
    // Small PUBLISHes paced by acknowledgements: with Nagle on, each waits for the peer's
    // (delayed) ACK of the one before.
    tcp.set_nodelay(true)?;
    let socket = Some(tcp.as_raw_fd());
    let Some(config) = &dial.tls else {
        return Ok((Box::new(tcp), socket));
    };
    let name = rustls::pki_types::ServerName::try_from(dial.host.clone())
        .map_err(rumqttc::TlsError::DNSName)?;
    let tls = rumqttc::tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await
        .map_err(rumqttc::TlsError::Io)?;
    Ok((Box::new(tls), socket))
}

/// Reads what has arrived into `inb`; the connection's end is an error. Cancel-safe (a read
/// abandoned by `select!` took nothing).
async fn fill<V: Version>(
    io: &mut (impl AsyncRead + Unpin),
    inb: &mut BytesMut,
) -> Result<(), V::Error> {
    if io.read_buf(inb).await? == 0 {
        return Err(V::aborted());
    }
    Ok(())
}

/// Writes all of `out` (and flushes: TLS holds records back until then). Each step may wait
/// up to [`STALL`] for room in the socket: a slow link makes slow progress, a dead one ends.
async fn send<V: Version>(
    io: &mut (impl AsyncWrite + Unpin),
    out: &mut BytesMut,
) -> Result<(), V::Error> {
    if out.is_empty() {
        return Ok(());
    }
    while !out.is_empty() {
        let n = timeout(STALL, io.write(out))
            .await
            .map_err(|e| V::timed_out(e, true))??;
        if n == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into());
        }
        out.advance(n);
    }
    timeout(STALL, io.flush())
        .await
        .map_err(|e| V::timed_out(e, true))??;
    Ok(())
}

/// The parts of rumqttc's `MqttState` that both versions spell alike.
macro_rules! same_state_api {
    ($state:ty) => {
        fn state(inflight: u16) -> Self::State {
            <$state>::new(inflight, false)
        }
        fn in_flight(s: &Self::State) -> (u16, bool) {
            (s.inflight(), s.collision.is_some())
        }
        fn outgoing(
            s: &mut Self::State,
            r: Self::Request,
        ) -> Result<Option<Self::Packet>, Self::StateError> {
            s.handle_outgoing_packet(r)
        }
        fn incoming(
            s: &mut Self::State,
            p: Self::Packet,
        ) -> Result<Option<Self::Packet>, Self::StateError> {
            s.handle_incoming_packet(p)
        }
        fn next_event(s: &mut Self::State) -> Option<Self::Event> {
            s.events.pop_front()
        }
    };
}

/// MQTT 3.1.1.
pub struct V4;

impl Version for V4 {
    type Packet = rumqttc::Packet;
    type Request = rumqttc::Request;
    type Event = rumqttc::Event;
    type State = rumqttc::MqttState;
    type StateError = rumqttc::StateError;
    type Error = rumqttc::ConnectionError;

    same_state_api!(rumqttc::MqttState);
    fn ping() -> Self::Request {
        rumqttc::Request::PingReq(rumqttc::PingReq)
    }
    fn puback(pkid: u16) -> Self::Packet {
        rumqttc::Packet::PubAck(rumqttc::PubAck::new(pkid))
    }
    fn decode(inb: &mut BytesMut, max: usize) -> Result<Option<Self::Packet>, Self::StateError> {
        match rumqttc::Packet::read(inb, max) {
            Ok(p) => Ok(Some(p)),
            Err(rumqttc::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(rumqttc::StateError::Deserialization(e)),
        }
    }
    fn encode(p: &Self::Packet, out: &mut BytesMut, max: usize) -> Result<(), Self::StateError> {
        p.write(out, max)
            .map(|_| ())
            .map_err(rumqttc::StateError::Deserialization)
    }
    fn connack(
        s: &mut Self::State,
        p: Self::Packet,
        _dial: &mut Dial<Self>,
    ) -> Result<(), Self::Error> {
        use rumqttc::{ConnectReturnCode, ConnectionError, Event, Packet};
        match p {
            Packet::ConnAck(a) if a.code == ConnectReturnCode::Success => {
                s.events.push_back(Event::Incoming(Packet::ConnAck(a)));
                Ok(())
            }
            Packet::ConnAck(a) => Err(ConnectionError::ConnectionRefused(a.code)),
            other => Err(ConnectionError::NotConnAck(other)),
        }
    }
    fn timed_out(_: Elapsed, writing: bool) -> Self::Error {
        if writing {
            rumqttc::ConnectionError::FlushTimeout
        } else {
            rumqttc::ConnectionError::NetworkTimeout
        }
    }
    fn requests_done() -> Self::Error {
        rumqttc::ConnectionError::RequestsDone
    }
    fn aborted() -> Self::Error {
        rumqttc::StateError::ConnectionAborted.into()
    }
}

/// MQTT 5.
pub struct V5;

impl Version for V5 {
    type Packet = rumqttc::v5::mqttbytes::v5::Packet;
    type Request = rumqttc::v5::Request;
    type Event = rumqttc::v5::Event;
    type State = rumqttc::v5::MqttState;
    type StateError = rumqttc::v5::StateError;
    type Error = rumqttc::v5::ConnectionError;

    same_state_api!(rumqttc::v5::MqttState);
    fn ping() -> Self::Request {
        rumqttc::v5::Request::PingReq
    }
    fn puback(pkid: u16) -> Self::Packet {
        Self::Packet::PubAck(rumqttc::v5::mqttbytes::v5::PubAck::new(pkid, None))
    }
    fn decode(inb: &mut BytesMut, max: usize) -> Result<Option<Self::Packet>, Self::StateError> {
        use rumqttc::v5::mqttbytes::Error;
        match Self::Packet::read(inb, Some(max as u32)) {
            Ok(p) => Ok(Some(p)),
            Err(Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(rumqttc::v5::StateError::Deserialization(e)),
        }
    }
    fn encode(p: &Self::Packet, out: &mut BytesMut, max: usize) -> Result<(), Self::StateError> {
        p.write(out, Some(max as u32))
            .map(|_| ())
            .map_err(rumqttc::v5::StateError::Deserialization)
    }
    fn connack(
        s: &mut Self::State,
        p: Self::Packet,
        dial: &mut Dial<Self>,
    ) -> Result<(), Self::Error> {
        use rumqttc::v5::ConnectionError;
        use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet};
        match p {
            Packet::ConnAck(a) if a.code == ConnectReturnCode::Success => {
                if let Some(props) = &a.properties {
                    if let Some(k) = props.server_keep_alive {
                        dial.keep_alive = Duration::from_secs(k.into());
                    }
                    if let Some(m) = props.max_packet_size {
                        dial.max_out = dial.max_out.min(m as usize);
                    }
                    if let Some(rm) = props.receive_max {
                        dial.inflight = dial.inflight.min(rm).max(1);
                    }
                }
                // Takes the Receive and Topic Alias Maximum, and queues the event.
                s.handle_incoming_packet(Packet::ConnAck(a))?;
                Ok(())
            }
            Packet::ConnAck(a) => Err(ConnectionError::ConnectionRefused(a.code)),
            other => Err(ConnectionError::NotConnAck(Box::new(other))),
        }
    }
    fn timed_out(e: Elapsed, _writing: bool) -> Self::Error {
        rumqttc::v5::ConnectionError::Timeout(e)
    }
    fn requests_done() -> Self::Error {
        rumqttc::v5::ConnectionError::RequestsDone
    }
    fn aborted() -> Self::Error {
        rumqttc::v5::StateError::ConnectionAborted.into()
    }
}

#[cfg(test)]
mod tests;
