//! Store and forward through a flaky uplink: every reading polled reaches the broker at least
//! once, `seq` gapless, `ts` the poll time — whatever the link does.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use common::{FAST, Gateway, Subscriber, assert_nothing_lost, config, fast_sim as sim};
use fieldgate::message::now_ms;
use fieldgate::store::Store;
use fieldgate::testkit::proxy::{FaultProxy, Mode};

/// Runs at 40 readings/s, applies `fault` for `hold`, then lets the link recover.
async fn survive(
    broker: SocketAddr,
    fault: Mode,
    hold: Duration,
) -> (Subscriber, tempfile::TempDir, i64, i64) {
    let sim = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = FaultProxy::start(broker).await.unwrap();
    let sub = Subscriber::start(broker).await;
    let state = dir.path().join("state");
    let gw = Gateway::start(dir.path(), &config(&state, proxy.addr(), sim.addr, FAST));
    sub.wait_for(Duration::from_secs(10), "first readings", |g| {
        g.iter().any(|r| r.seq().is_some())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let from = now_ms();
    let connections = proxy.connections();
    let reader = Store::open_read_only(&state).unwrap();
    let seq_before = reader.last_seq().unwrap();
    let t = std::time::Instant::now();
    proxy.set(fault);
    // The gateway notices the fault when it opens a new connection.
    let mut noticed = None;
    let mut deepest = 0;
    while t.elapsed() < hold {
        if noticed.is_none() && proxy.connections() > connections {
            noticed = Some(t.elapsed());
        }
        deepest = deepest.max(reader.stats().unwrap().depth);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seq_during = reader.last_seq().unwrap();
    if hold >= Duration::from_secs(2) {
        // 40 readings/s with nothing acknowledged: a backlog must build up, or the fault did
        // nothing (#17).
        assert!(
            deepest >= hold.as_secs() * 20,
            "{fault:?}: deepest queue {deepest} during {hold:?}"
        );
    }
    if fault == Mode::Stall {
        // keep_alive is 2s: a half-open link is found within about two keep-alives.
        let noticed = noticed.expect("a reconnect during the stall");
        eprintln!("half-open link detected after {noticed:?}");
        assert!(
            noticed <= Duration::from_millis(5500),
            "detected after {noticed:?}"
        );
    }
    proxy.set(Mode::Pass);
    let to = now_ms();
    // Recovery: everything polled up to now must arrive.
    let target = Store::open(&state).unwrap().last_seq().unwrap();
    sub.wait_for(Duration::from_secs(20), "the backlog", |g| {
        let seqs: BTreeSet<u64> = g.iter().filter_map(|r| r.seq()).collect();
        (1..=target).all(|s| seqs.contains(&s))
    })
    .await;
    gw.stop().await;
    let n = assert_nothing_lost(&state, &sub);
    assert!(n >= 40, "polling went on: {n} readings");
    assert!(
        proxy.connections() > connections,
        "{fault:?}: the gateway had to reconnect"
    );
    // Readings polled during the fault carry their poll time, not their delivery time: those
    // enqueued while it lasted are stamped inside it, and nothing is stamped after it arrived.
    let by_seq = sub.by_seq();
    for r in by_seq.values() {
        assert!(
            r.ts_ms().unwrap() <= r.at_ms,
            "stamped after arrival: {r:?}"
        );
    }
    let during: Vec<i64> = ((seq_before + 2)..seq_during)
        .filter_map(|s| by_seq.get(&s))
        .map(|r| r.ts_ms().unwrap())
        .collect();
    assert!(!during.is_empty() || hold < Duration::from_secs(1));
    for ts in during {
        assert!(
            (from - 300..=to).contains(&ts),
            "{fault:?}: a reading enqueued during the fault stamped {ts}, outside {from}..={to}"
        );
    }
    (sub, dir, from, to)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_loses_nothing() {
    let broker = fieldgate::testkit::broker::start().unwrap();
    survive(broker, Mode::Cut, Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_link_is_detected_and_what_vanished_into_it_is_resent() {
    let broker = fieldgate::testkit::broker::start().unwrap();
    // keep_alive is 2s in the test config: the stall must be detected within ~2 keep-alives,
    // so 6s of stall means at least one reconnect attempt into the still-stalled link.
    let (sub, _dir, from, to) = survive(broker, Mode::Stall, Duration::from_secs(6)).await;
    let during = sub
        .by_seq()
        .values()
        .filter(|r| (from + 500..to - 500).contains(&r.ts_ms().unwrap()))
        .count();
    assert!(
        during >= 150,
        "{during} readings polled during the stall arrived"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_in_the_middle_of_a_packet_loses_nothing() {
    let broker = fieldgate::testkit::broker::start().unwrap();
    survive(broker, Mode::ResetMidPacket, Duration::from_millis(300)).await;
}

/// Acceptance testing (#10): `connected` reset the reconnect backoff, so a broker that accepts
/// the connection and then drops it at once was hammered at the shortest backoff forever. Only
/// a session that delivered something resets it. The fault: a server that answers CONNECT with
/// a CONNACK and hangs up as soon as anything else arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_connects_but_delivers_nothing_does_not_reset_the_backoff() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let count = accepted.clone();
    let server = tokio::spawn(async move {
        while let Ok((mut c, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                // CONNECT in, CONNACK (accepted) out, then the first thing sent ends it.
                let n = c.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    return;
                }
                // In the client's version: MQTT 5's CONNACK has a (here empty) property list.
                let v5 = n > 8 && buf[8] == 5;
                let connack: &[u8] = if v5 {
                    &[0x20, 0x03, 0x00, 0x00, 0x00]
                } else {
                    &[0x20, 0x02, 0x00, 0x00]
                };
                let _ = c.write_all(connack).await;
                let _ = c.read(&mut buf).await;
            });
        }
    });
    let sim = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    // Test tuning: backoff from 100 ms, doubling to 500 ms.
    let gw = Gateway::start(dir.path(), &config(&state, addr, sim.addr, FAST));
    tokio::time::sleep(Duration::from_secs(4)).await;
    gw.stop().await;
    server.abort();
    let n = accepted.load(Ordering::Relaxed);
    eprintln!("{n} connections in 4 s to a broker that never acknowledges");
    // Backing off to 500 ms (+≤25 % jitter): about eight in 4 s. Reset to 100 ms after every
    // CONNACK it would be about thirty.
    assert!((3..=14).contains(&n), "{n} connections in 4 s");
}
