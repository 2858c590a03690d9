//! Store and forward through a flaky uplink: every reading polled reaches the broker at least
//! once, `seq` gapless, `ts` the poll time — whatever the link does.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use common::{FAST, Gateway, Subscriber, assert_nothing_lost, config, fast_sim as sim};
use fieldgate::message::now_ms;
use fieldgate::proxy::{FaultProxy, Mode};
use fieldgate::store::Store;

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
    let t = std::time::Instant::now();
    proxy.set(fault);
    // The gateway notices the fault when it opens a new connection.
    let mut noticed = None;
    while t.elapsed() < hold {
        if noticed.is_none() && proxy.connections() > connections {
            noticed = Some(t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
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
    // Readings polled during the fault carry their poll time, not their delivery time.
    for r in sub.by_seq().values() {
        let ts = r.ts_ms().unwrap();
        assert!(ts <= to + 20_000 && ts > from - 60_000, "ts {ts}");
    }
    (sub, dir, from, to)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_loses_nothing() {
    let broker = fieldgate::broker::start().unwrap();
    survive(broker, Mode::Cut, Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_link_is_detected_and_what_vanished_into_it_is_resent() {
    let broker = fieldgate::broker::start().unwrap();
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
    let broker = fieldgate::broker::start().unwrap();
    survive(broker, Mode::ResetMidPacket, Duration::from_millis(300)).await;
}
