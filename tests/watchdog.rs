//! The systemd watchdog is fed only while every task keeps its promise: the one thing it
//! exists for is to stop when a task stalls, so that systemd restarts the gateway. In a test
//! binary of its own: it points this process's NOTIFY_SOCKET at a socket of the test.

use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fieldgate::systemd::{Health, watchdog};
use tokio_util::sync::CancellationToken;

/// WATCHDOG=1 messages received within `window`, as offsets from `t0`.
fn pings(sock: &UnixDatagram, t0: Instant, window: Duration) -> Vec<Duration> {
    let mut out = Vec::new();
    let mut buf = [0u8; 256];
    let end = Instant::now() + window;
    while Instant::now() < end {
        if let Ok(n) = sock.recv(&mut buf)
            && String::from_utf8_lossy(&buf[..n]).contains("WATCHDOG=1")
        {
            out.push(t0.elapsed());
        }
    }
    out
}

#[test]
fn the_watchdog_stops_while_a_task_is_past_its_promise_and_resumes_when_it_beats() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    // Safety: set before any other thread of this test binary exists (one test, no runtime yet).
    unsafe {
        std::env::set_var("NOTIFY_SOCKET", &path);
        std::env::set_var("WATCHDOG_USEC", "400000"); // pings every 200 ms
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let health = Arc::new(Health::default());
    let t0 = Instant::now();
    // The task promises to be back within 1 s, then goes silent.
    health.beat("bus plc", t0 + Duration::from_secs(1));
    let cancel = CancellationToken::new();
    rt.spawn(watchdog(health.clone(), cancel.clone()));

    let alive = pings(&sock, t0, Duration::from_millis(900));
    assert!(
        alive.len() >= 3,
        "fed while the task keeps its promise: {alive:?}"
    );
    // Past the promise (plus one tick): no more pings.
    let _ = pings(&sock, t0, Duration::from_millis(400));
    let stalled = pings(&sock, t0, Duration::from_millis(800));
    assert!(
        stalled.is_empty(),
        "fed while the task was stalled: {stalled:?}"
    );
    // The task beats again: the watchdog is fed again.
    health.beat("bus plc", Instant::now() + Duration::from_secs(5));
    let resumed = pings(&sock, t0, Duration::from_millis(700));
    assert!(resumed.len() >= 2, "fed again after the beat: {resumed:?}");
    cancel.cancel();
}
