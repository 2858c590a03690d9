//! The loop against a raw peer on loopback: the broker's end speaks packets through rumqttc's
//! codec, so each rule is seen on the wire.

use super::*;
use rumqttc::{
    ConnAck, ConnectReturnCode, ConnectionError, Event, Outgoing, Packet, PubAck, Publish, QoS,
    Request, StateError,
};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use tokio::net::{TcpListener, TcpStream};

/// A stream that counts the writes that put bytes on the socket, and the reads that took some.
struct Counted {
    inner: TcpStream,
    writes: Arc<AtomicUsize>,
    reads: Arc<AtomicUsize>,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.reads.fetch_add(1, Ordering::SeqCst);
        }
        r
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
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
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
                if let Some(p) = V4::decode(&mut self.buf, 1 << 20).unwrap() {
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
        V4::encode(&p, &mut out, 1 << 20).unwrap();
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
    reads: Arc<AtomicUsize>,
    /// The session's flag: nothing waits for room in the window.
    unhurried: Arc<AtomicBool>,
    /// What the loop reported read past.
    discarded: Arc<std::sync::Mutex<Vec<Discarded>>>,
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
    // A broker that writes each packet as it goes (mosquitto's `set_tcp_nodelay true`).
    sock.set_nodelay(true).unwrap();
    let writes = Arc::new(AtomicUsize::new(0));
    let reads = Arc::new(AtomicUsize::new(0));
    let socket = Some(client.as_raw_fd());
    let io = Counted {
        inner: client,
        writes: writes.clone(),
        reads: reads.clone(),
    };
    let unhurried = Arc::new(AtomicBool::new(false));
    let discarded = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (requests, rx) = mpsc::channel(256);
    for r in queued {
        requests.try_send(r).unwrap();
    }
    let (tx, events) = mpsc::channel(1024);
    let dial = Dial::<V4> {
        host: "127.0.0.1".into(),
        port: 0,
        tls: None,
        connect: Packet::Connect(rumqttc::Connect::new("wire-test")),
        inflight,
        max_in: 1 << 20,
        max_out: 1 << 20,
        keep_alive,
        unhurried: unhurried.clone(),
        on_discard: {
            let discarded = discarded.clone();
            Arc::new(move |d: &Discarded| discarded.lock().unwrap().push(d.clone()))
        },
    };
    let done =
        tokio::spawn(async move { serve(io, Quiet::new(socket), dial, rx, &tx, |e| e).await });
    Running {
        peer: Peer {
            sock,
            buf: BytesMut::new(),
        },
        requests,
        events,
        writes,
        reads,
        unhurried,
        discarded,
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

/// Ten publishes written and reported, the first acknowledged and its event seen: the loop's
/// read count at that moment.
async fn ten_in_flight_first_acknowledged(r: &mut Running) -> usize {
    r.peer.accept_session().await;
    for _ in 0..10 {
        r.peer.expect().await;
    }
    r.peer.send(Packet::PubAck(PubAck::new(1))).await;
    assert_eq!(acked(r).await, 1);
    r.reads.load(Ordering::SeqCst)
}

/// The next acknowledgement the loop reports. No timeout of its own: under a paused clock a
/// pending timer would let the clock jump while the loop waits for the socket.
async fn acked(r: &mut Running) -> u16 {
    loop {
        match r.events.recv().await {
            Some(Event::Incoming(Packet::PubAck(a))) => return a.pkid,
            Some(_) => {}
            None => panic!("the loop ended"),
        }
    }
}

// The real clock (a paused one lumps a trickle into one read whatever the loop does): the
// bound allows for a machine that stretches the trickle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledgements_trickling_in_are_read_together_while_the_session_is_unhurried() {
    let mut r = start(100, Duration::ZERO, (0..10).map(publish).collect()).await;
    r.unhurried.store(true, Ordering::SeqCst);
    let before = ten_in_flight_first_acknowledged(&mut r).await;
    let t0 = std::time::Instant::now();
    // Eight more, one every 150 µs (this thread sleeps; the loop runs on the workers).
    for pkid in 2..=9 {
        std::thread::sleep(Duration::from_micros(150));
        r.peer.send(Packet::PubAck(PubAck::new(pkid))).await;
    }
    let trickle = t0.elapsed();
    // All of them, read after the hold without anything more arriving: lowering the mark
    // again signals what waits.
    for pkid in 2..=9 {
        let next = timeout(Duration::from_secs(5), acked(&mut r)).await;
        assert_eq!(next.expect("reported within 5 s"), pkid);
    }
    // At most one read per GATHER the trickle lasted (and one for a late straggler), where
    // reading each as it came would take eight.
    let reads = r.reads.load(Ordering::SeqCst) - before;
    let bound = (trickle.as_micros() / GATHER.as_micros()) as usize + 2;
    assert!(
        reads <= bound.min(7),
        "{reads} reads for 8 acknowledgements over {trickle:?}"
    );
    // The tenth, alone after the hold, is read and reported.
    r.peer.send(Packet::PubAck(PubAck::new(10))).await;
    let tenth = timeout(Duration::from_secs(5), acked(&mut r)).await;
    assert_eq!(tenth.expect("reported within 5 s"), 10);
}

#[tokio::test(start_paused = true)]
async fn each_acknowledgement_is_read_at_once_while_the_session_waits_for_room() {
    let mut r = start(100, Duration::ZERO, (0..10).map(publish).collect()).await;
    let before = ten_in_flight_first_acknowledged(&mut r).await;
    for pkid in 2..=9 {
        let sent = Instant::now();
        r.peer.send(Packet::PubAck(PubAck::new(pkid))).await;
        assert_eq!(acked(&mut r).await, pkid);
        // Not a moment of the clock passed: no hold.
        assert_eq!(Instant::now(), sent);
    }
    assert_eq!(r.reads.load(Ordering::SeqCst) - before, 8);
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

/// #28 (3): a 2 MB retained message on a command topic ended the session ("payload size limit
/// exceeded"), and the next SUBSCRIBE brought it back: 38 reconnects in 40 s.
#[tokio::test]
async fn a_publish_larger_than_the_loop_takes_is_acknowledged_read_past_and_the_session_goes_on() {
    let mut r = start(10, Duration::ZERO, vec![]).await;
    r.peer.accept_session().await;
    let mut big = Publish::new(
        "site/pump/speed/set",
        QoS::AtLeastOnce,
        vec![b'9'; 2_000_000],
    );
    big.pkid = 7;
    big.retain = true;
    let mut huge = BytesMut::new();
    Packet::Publish(big).write(&mut huge, 4 << 20).unwrap();
    let mut small = Publish::new("site/pump/speed/set", QoS::AtLeastOnce, "40");
    small.pkid = 8;
    let mut after = BytesMut::new();
    Packet::Publish(small).write(&mut after, 1 << 20).unwrap();
    // In pieces that cut the header, the topic and the end of the packet, the next packet
    // right behind it in the same write.
    let mut wire = huge.to_vec();
    wire.extend_from_slice(&after);
    let cuts = [1, 3, 12, 70_001, wire.len() - after.len() - 1, wire.len()];
    let mut at = 0;
    for cut in cuts {
        r.peer.sock.write_all(&wire[at..cut]).await.unwrap();
        r.peer.sock.flush().await.unwrap();
        at = cut;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Both are acknowledged (the broker would otherwise hold the large one in flight).
    assert_eq!(r.peer.expect().await, Packet::PubAck(PubAck::new(7)));
    assert_eq!(r.peer.expect().await, Packet::PubAck(PubAck::new(8)));
    let _connack = r.events.recv().await;
    match r.events.recv().await {
        Some(Event::Incoming(Packet::Publish(p))) => {
            assert_eq!((p.pkid, &p.payload[..]), (8, &b"40"[..]))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        *r.discarded.lock().unwrap(),
        vec![Discarded {
            topic: Some("site/pump/speed/set".into()),
            bytes: huge.len()
        }]
    );
    // The session lives on: a publish of ours still goes out.
    r.requests.send(publish(1)).await.unwrap();
    assert_eq!(payload(r.peer.expect().await), (1, "1".into()));
    assert!(!r.done.is_finished());
}

#[test]
fn an_over_size_packet_is_known_from_its_fixed_header_and_a_publish_by_its_topic_and_id() {
    let mut p = Publish::new("a/b", QoS::AtLeastOnce, vec![0u8; 300]);
    p.pkid = 0x1234;
    let mut b = BytesMut::new();
    Packet::Publish(p).write(&mut b, 1 << 20).unwrap();
    let total = b.len();
    // Within the limit, or its header not all there: the decoder's to judge.
    assert_eq!(Oversize::of(&b, total), Oversize::No);
    assert_eq!(Oversize::of(&b[..1], 10), Oversize::No);
    assert_eq!(Oversize::of(&b[..2], 10), Oversize::No);
    // Over it, the topic and id not yet read.
    assert_eq!(Oversize::of(&b[..3], 10), Oversize::NotYetKnown);
    assert_eq!(Oversize::of(&b[..7], 10), Oversize::NotYetKnown);
    let whole = Oversize::Packet {
        bytes: total,
        topic: Some("a/b".into()),
        pkid: Some(0x1234),
    };
    assert_eq!(Oversize::of(&b[..10], 10), whole);
    // QoS 0 has no id; another kind of packet has no topic.
    let mut b0 = BytesMut::new();
    Packet::Publish(Publish::new("a/b", QoS::AtMostOnce, vec![0u8; 300]))
        .write(&mut b0, 1 << 20)
        .unwrap();
    assert!(matches!(
        Oversize::of(&b0[..8], 10),
        Oversize::Packet { pkid: None, .. }
    ));
    let suback = [0x90, 0xff, 0x01];
    assert_eq!(
        Oversize::of(&suback, 10),
        Oversize::Packet {
            bytes: 3 + 255,
            topic: None,
            pkid: None
        }
    );
    // A Remaining Length of five bytes is malformed: the decoder says so.
    assert_eq!(
        Oversize::of(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], 10),
        Oversize::No
    );
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

#[tokio::test]
async fn an_mqtt5_connack_sets_the_in_flight_limit_and_the_largest_packet() {
    use rumqttc::v5::mqttbytes::v5 as p5;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (mut sock, _) = listener.accept().await.unwrap();
    let (requests, rx) = mpsc::channel(16);
    let payload = |n: usize| vec![b'x'; n];
    for n in [10, 10, 10, 300] {
        let p = p5::Publish::new(
            "t",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            payload(n),
            None,
        );
        requests.try_send(rumqttc::v5::Request::Publish(p)).unwrap();
    }
    let (tx, mut events) = mpsc::channel(64);
    let connect = p5::Connect {
        client_id: "wire-test".into(),
        keep_alive: 0,
        clean_start: true,
        properties: None,
    };
    let dial = Dial::<V5> {
        host: "127.0.0.1".into(),
        port: 0,
        tls: None,
        connect: p5::Packet::Connect(connect, None, None),
        inflight: 10,
        max_in: 1 << 20,
        max_out: 1 << 20,
        keep_alive: Duration::ZERO,
        unhurried: Default::default(),
        on_discard: Arc::new(|_: &Discarded| {}),
    };
    let done =
        tokio::spawn(async move { serve(client, Quiet::new(None), dial, rx, &tx, |e| e).await });
    let mut buf = BytesMut::new();
    let mut next = async |sock: &mut TcpStream, within| {
        timeout(within, async {
            loop {
                if let Some(p) = V5::decode(&mut buf, 1 << 20).unwrap() {
                    return p;
                }
                if sock.read_buf(&mut buf).await.unwrap() == 0 {
                    std::future::pending::<()>().await; // closed: nothing more comes
                }
            }
        })
        .await
        .ok()
    };
    assert!(matches!(
        next(&mut sock, STALL).await,
        Some(p5::Packet::Connect(..))
    ));
    let props = p5::ConnAckProperties {
        session_expiry_interval: None,
        receive_max: Some(2),
        max_qos: None,
        retain_available: None,
        max_packet_size: Some(100),
        assigned_client_identifier: None,
        topic_alias_max: None,
        reason_string: None,
        user_properties: vec![],
        wildcard_subscription_available: None,
        subscription_identifiers_available: None,
        shared_subscription_available: None,
        server_keep_alive: None,
        response_information: None,
        server_reference: None,
        authentication_method: None,
        authentication_data: None,
    };
    let ack = p5::ConnAck {
        session_present: false,
        code: p5::ConnectReturnCode::Success,
        properties: Some(props),
    };
    let mut out = BytesMut::new();
    V5::encode(&p5::Packet::ConnAck(ack), &mut out, 1 << 20).unwrap();
    sock.write_all(&out).await.unwrap();
    // Two in flight at most, whatever the client asked for.
    for pkid in [1, 2] {
        match next(&mut sock, STALL).await {
            Some(p5::Packet::Publish(p)) => assert_eq!(p.pkid, pkid),
            other => panic!("{other:?}"),
        }
    }
    assert!(next(&mut sock, Duration::from_millis(300)).await.is_none());
    out.clear();
    V5::encode(
        &p5::Packet::PubAck(p5::PubAck::new(1, None)),
        &mut out,
        1 << 20,
    )
    .unwrap();
    sock.write_all(&out).await.unwrap();
    match next(&mut sock, STALL).await {
        Some(p5::Packet::Publish(p)) => assert_eq!(p.pkid, 1),
        other => panic!("{other:?}"),
    }
    // The last is larger than the broker takes: the connection ends before it is written
    // (as with rumqttc; the session never hands over one the broker would not take).
    out.clear();
    V5::encode(
        &p5::Packet::PubAck(p5::PubAck::new(2, None)),
        &mut out,
        1 << 20,
    )
    .unwrap();
    sock.write_all(&out).await.unwrap();
    let e = timeout(STALL, done).await.unwrap().unwrap();
    assert!(
        matches!(&e, Err(rumqttc::v5::ConnectionError::MqttState(_))),
        "{e:?}"
    );
    assert!(next(&mut sock, Duration::from_millis(100)).await.is_none());
    let mut written = 0;
    while let Ok(ev) = events.try_recv() {
        written += matches!(ev, rumqttc::v5::Event::Outgoing(Outgoing::Publish(_))) as u32;
    }
    assert_eq!(written, 3);
}
