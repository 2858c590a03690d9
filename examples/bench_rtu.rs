//! Modbus RTU throughput against the wire's limit: `cargo run --release --example bench_rtu`.
//!
//! A simulated slave on a pseudo-terminal keeps real 9600-baud 8E1 timing (11 bits per
//! character: the request's and the reply's wire time and the 3.5-character silences), answers
//! with no delay of its own, and the gateway polls N registers back to back. The limit for one
//! request of N registers is N / ((20 + 2N) · 11 / baud) registers per second (8 request bytes,
//! 5 + 2N reply bytes, 2 × 3.5 characters of silence).

use std::time::{Duration, Instant};

use fieldgate::config::Config;
use fieldgate::testkit::sim::RtuBus;
use tokio_util::sync::CancellationToken;

const BAUD: u32 = 9600;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let broker = fieldgate::testkit::broker::start().unwrap();
    println!("Modbus RTU at {BAUD} baud 8E1, one slave answering at once, polled back to back");
    println!(
        "{:>4}  {:>12}  {:>12}  {:>6}",
        "N", "registers/s", "wire limit", "share"
    );
    for n in [1u16, 10, 60, 125] {
        let dir = tempfile::tempdir().unwrap();
        let bus = RtuBus::start(dir.path(), BAUD).unwrap();
        bus.with_unit(1, |b| b.set_holding(0, &vec![0x4142; n as usize]));
        let yaml = format!(
            "gateway: {{ id: bench, state_dir: {state} }}\nmqtt: {{ url: mqtt://{broker} }}\n\
             buses:\n  rs485:\n    modbus_rtu: {{ port: {port}, baud: {BAUD}, parity: even, timeout: 500ms }}\n\
             devices:\n  meter:\n    bus: rs485\n    every: 10ms\n    points:\n      block: {{ register: 0, type: string, length: {n} }}\n",
            state = dir.path().join("state").display(),
            port = bus.path.display()
        );
        let config = Config::from_text(&dir.path().join("bench.yaml"), &yaml).unwrap();
        let cancel = CancellationToken::new();
        let gw = tokio::spawn(fieldgate::gateway::run(config, cancel.clone()));
        tokio::time::sleep(Duration::from_millis(500)).await; // warm up
        let r0 = bus.state.lock().unwrap().requests;
        let t = Instant::now();
        tokio::time::sleep(Duration::from_secs(5)).await;
        let requests = bus.state.lock().unwrap().requests - r0;
        let secs = t.elapsed().as_secs_f64();
        cancel.cancel();
        gw.await.unwrap().unwrap();
        let rate = requests as f64 * n as f64 / secs;
        let limit = n as f64 / ((20.0 + 2.0 * n as f64) * 11.0 / BAUD as f64);
        println!(
            "{n:>4}  {rate:>12.1}  {limit:>12.1}  {:>5.1}%",
            100.0 * rate / limit
        );
    }
}
