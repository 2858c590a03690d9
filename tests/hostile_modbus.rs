//! Modbus devices and converters that misbehave in ways found from outside (#28): a reply with
//! more registers than asked, a unit that sends frames nobody asked for after its replies, and
//! a serial-to-TCP converter whose connection gets stuck. Each is served by a small raw server
//! here (tokio-modbus's server cannot be made to misbehave), on loopback, bounded in time.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{Gateway, Subscriber};
use fieldgate::modbus::with_crc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What a raw server does with one read of holding registers: (unit, start, count, the
/// connection's number from 0, the request's number on it) → the register words to answer,
/// or None to stay silent.
type Answer = Arc<dyn Fn(u8, u16, u16, u64, u64) -> Option<Vec<u16>> + Send + Sync>;

/// Register `a` holds `a + 100 * unit`.
fn registers(unit: u8, start: u16, count: u16) -> Vec<u16> {
    (start..start + count)
        .map(|a| a + 100 * unit as u16)
        .collect()
}

/// How a raw server reads requests and frames its replies.
struct Framing {
    /// Bytes of one read request.
    request: usize,
    /// (unit, start, count) of a request.
    parse: fn(&[u8]) -> (u8, u16, u16),
    /// The reply to `req` from `unit` carrying `words`; `stray`: the copy sent unasked after
    /// it (under another transaction id).
    reply: fn(req: &[u8], unit: u8, words: &[u16], stray: bool) -> Vec<u8>,
}

/// The function 3 reply's PDU: function, byte count, the words.
fn pdu(words: &[u16]) -> Vec<u8> {
    let mut f = vec![3, 2 * words.len() as u8];
    words
        .iter()
        .for_each(|w| f.extend_from_slice(&w.to_be_bytes()));
    f
}

/// Modbus TCP: the MBAP header before the unit.
const MBAP: Framing = Framing {
    request: 12,
    parse: |r| {
        let word = |i: usize| u16::from_be_bytes([r[i], r[i + 1]]);
        (r[6], word(8), word(10))
    },
    reply: |req, unit, words, stray| {
        let tid = u16::from_be_bytes([req[0], req[1]]).wrapping_add(if stray { 1000 } else { 0 });
        let mut f = tid.to_be_bytes().to_vec();
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(&(3 + 2 * words.len() as u16).to_be_bytes());
        f.push(unit);
        f.extend(pdu(words));
        f
    },
};

/// RTU frames through a TCP socket, as a serial-to-TCP converter passes them.
const RTU: Framing = Framing {
    request: 8,
    parse: |r| {
        let word = |i: usize| u16::from_be_bytes([r[i], r[i + 1]]);
        (r[0], word(2), word(4))
    },
    reply: |_, unit, words, _| {
        let mut f = vec![unit];
        f.extend(pdu(words));
        with_crc(f)
    },
};

/// A server of reads of holding registers (function 3 only) in `framing`, answering as
/// `answer` says. `extra`: units that send a second, unsolicited frame (their reply again
/// under another transaction id) 20 ms after each reply.
async fn raw_server(framing: &'static Framing, answer: Answer, extra: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut conn = 0u64;
        while let Ok((mut s, _)) = listener.accept().await {
            let (answer, n) = (answer.clone(), conn);
            conn += 1;
            tokio::spawn(async move {
                let mut req = vec![0u8; framing.request];
                let mut i = 0u64;
                while s.read_exact(&mut req).await.is_ok() {
                    let (unit, start, count) = (framing.parse)(&req);
                    let answered = answer(unit, start, count, n, i);
                    i += 1;
                    let Some(words) = answered else { continue };
                    if s.write_all(&(framing.reply)(&req, unit, &words, false))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    if extra.contains(&unit) {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        let _ = s
                            .write_all(&(framing.reply)(&req, unit, &words, true))
                            .await;
                    }
                }
            });
        }
    });
    addr
}

fn config(state: &std::path::Path, broker: SocketAddr, bus: &str, devices: &str) -> String {
    format!(
        "gateway:\n  id: gw1\n  state_dir: {}\nmqtt:\n  url: mqtt://{broker}\n  keep_alive: 2s\nbuses:\n  plc:\n    {bus}\ndevices:\n{devices}",
        state.display()
    )
}

fn device(name: &str, unit: u8) -> String {
    format!(
        "  {name}:\n    bus: plc\n    unit: {unit}\n    every: 100ms\n    offline_after: 2\n    points:\n      a: {{ register: 0 }}\n      b: {{ register: 1 }}\n"
    )
}

fn count(sub: &Subscriber, topic: &str) -> usize {
    sub.all().iter().filter(|r| r.topic == topic).count()
}

/// Runs a gateway with `devices` on `bus` (its YAML) until `n` readings of `topic` arrived,
/// stops it, and returns what the subscriber saw.
async fn run_until(bus: &str, devices: &str, topic: &str, n: usize) -> Subscriber {
    let broker = fieldgate::testkit::broker::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sub = Subscriber::start(broker).await;
    let gw = Gateway::start(
        dir.path(),
        &config(&dir.path().join("state"), broker, bus, devices),
    );
    sub.wait_for(
        Duration::from_secs(10),
        &format!("{n} readings of {topic}"),
        |got| got.iter().filter(|r| r.topic == topic).count() >= n,
    )
    .await;
    gw.stop().await;
    sub
}

fn tcp_bus(server: SocketAddr) -> String {
    format!(
        "modbus_tcp: {{ host: 127.0.0.1, port: {}, timeout: 300ms }}",
        server.port()
    )
}

/// #28 (11): a reply with more registers than asked was accepted and published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_with_more_registers_than_asked_is_refused_not_published() {
    let server = raw_server(
        &MBAP,
        Arc::new(|unit, start, n, _, _| {
            Some(registers(unit, start, if unit == 2 { n + 1 } else { n }))
        }),
        &[],
    )
    .await;
    let devices = device("honest", 1) + &device("liar", 2);
    let sub = run_until(&tcp_bus(server), &devices, "fieldgate/gw1/honest/a", 10).await;
    assert_eq!(
        count(&sub, "fieldgate/gw1/liar/a"),
        0,
        "a reply of 3 registers for 2 published"
    );
    let honest = sub.values("fieldgate/gw1/honest/b");
    assert!(
        honest.iter().all(|v| *v == serde_json::json!(101)),
        "{honest:?}"
    );
}

/// #28 (11): a unit that sends an unsolicited frame after each reply got its healthy
/// neighbour on the same connection blamed (the stray frame read as the neighbour's answer)
/// and marked offline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_nobody_asked_for_never_blame_the_healthy_neighbour() {
    let server = raw_server(
        &MBAP,
        Arc::new(|unit, start, n, _, _| Some(registers(unit, start, n))),
        &[1],
    )
    .await;
    let devices = device("chatty", 1) + &device("neighbour", 2);
    let sub = run_until(&tcp_bus(server), &devices, "fieldgate/gw1/neighbour/a", 20).await;
    let availability = sub.payloads("fieldgate/gw1/neighbour/availability");
    assert!(
        !availability.iter().any(|p| p == "offline"),
        "the healthy neighbour was marked offline: {availability:?}"
    );
    let values = sub.values("fieldgate/gw1/neighbour/a");
    assert!(
        values.iter().all(|v| *v == serde_json::json!(200)),
        "{values:?}"
    );
}

/// #28 (7): a serial-to-TCP converter whose connection gets stuck (it takes requests and
/// answers none) left every unit on the bus offline for good. After two timeouts in a row
/// the connection is opened anew, and the new one answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_rtu_over_tcp_connection_is_reopened() {
    let broker = fieldgate::testkit::broker::start().unwrap();
    let connections = Arc::new(AtomicU64::new(0));
    let seen = connections.clone();
    let converter = raw_server(
        &RTU,
        Arc::new(move |unit, start, n, conn, i| {
            seen.fetch_max(conn + 1, Ordering::Relaxed);
            // The first connection answers ten requests, then nothing ever again.
            (conn > 0 || i < 10).then(|| registers(unit, start, n))
        }),
        &[],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let sub = Subscriber::start(broker).await;
    let bus = format!(
        "modbus_rtu_over_tcp: {{ host: 127.0.0.1, port: {}, timeout: 200ms }}",
        converter.port()
    );
    let devices = device("meter", 1) + &device("other", 2);
    let gw = Gateway::start(
        dir.path(),
        &config(&dir.path().join("state"), broker, &bus, &devices),
    );
    sub.wait_for(Duration::from_secs(10), "the first readings", |got| {
        got.iter().any(|r| r.topic == "fieldgate/gw1/meter/a")
    })
    .await;
    // The connection is stuck from the eleventh request on; readings come back on a new one.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = count(&sub, "fieldgate/gw1/meter/a") + count(&sub, "fieldgate/gw1/other/a");
    sub.wait_for(
        Duration::from_secs(10),
        "readings after the stuck connection",
        |got| {
            got.iter()
                .filter(|r| r.topic.ends_with("/a") && r.topic.starts_with("fieldgate/gw1/"))
                .count()
                >= before + 20
        },
    )
    .await;
    gw.stop().await;
    assert!(connections.load(Ordering::Relaxed) >= 2);
}
