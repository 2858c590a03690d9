//! `fieldgate demo`: the whole product on loopback, with no hardware.
//!
//! A simulated boiler (Modbus TCP), an in-process MQTT broker (rumqttd), a fault proxy between
//! the gateway and the broker, and the gateway itself running `examples/demo.yaml`. It prints
//! what a subscriber receives; partway through it cuts the uplink, and the readings queued
//! during the outage arrive afterwards with their original timestamps and gapless `seq`.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use fieldgate::config::Config;
use fieldgate::message::now_ms;
use fieldgate::store::Store;
use fieldgate::testkit::proxy::{FaultProxy, Mode};
use fieldgate::testkit::sim::Simulator;
use fieldgate::uplink::Tuning;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

pub struct Options {
    pub duration: Option<Duration>,
    pub cut_at: Duration,
    pub cut_for: Duration,
}

const DEMO_CONFIG: &str = include_str!("../../examples/demo.yaml");
const DEMO_MODEL: &str = include_str!("../../mappings/demo-boiler.yaml");

pub async fn run(opts: Options) -> anyhow::Result<()> {
    let state = tempfile::Builder::new()
        .prefix("fieldgate-demo-")
        .tempdir()?;

    let sim = Simulator::start(None).await?;
    tokio::spawn(animate(sim.clone()));

    let broker_addr = fieldgate::testkit::broker::start()?;
    let (msg_tx, mut msgs) = mpsc::unbounded_channel();
    subscribe(broker_addr, msg_tx)?;
    let proxy = FaultProxy::start(broker_addr).await?;

    // Prefer the file next to the binary's source tree so edits show; fall back to the copy
    // built in, so an installed binary can run the demo anywhere.
    let path = Path::new("examples/demo.yaml");
    let (path, text) = match std::fs::read_to_string(path) {
        Ok(t) => (path.to_path_buf(), t),
        Err(_) => {
            // The built-in copies, laid out as in the source tree.
            let models = state.path().join("mappings");
            let examples = state.path().join("examples");
            std::fs::create_dir_all(&models)?;
            std::fs::create_dir_all(&examples)?;
            std::fs::write(models.join("demo-boiler.yaml"), DEMO_MODEL)?;
            (examples.join("demo.yaml"), DEMO_CONFIG.to_string())
        }
    };
    let sim_port = sim.addr.port().to_string();
    let mqtt_port = proxy.addr().port().to_string();
    let state_dir = state.path().display().to_string();
    // 8080 when it is free, else any free port.
    let web_port = std::net::TcpListener::bind("127.0.0.1:8080")
        .or_else(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(8080)
        .to_string();
    let env = |k: &str| match k {
        "FIELDGATE_DEMO_WEB_PORT" => Some(web_port.clone()),
        "FIELDGATE_DEMO_MODBUS_PORT" => Some(sim_port.clone()),
        "FIELDGATE_DEMO_MQTT_PORT" => Some(mqtt_port.clone()),
        "FIELDGATE_DEMO_STATE_DIR" => Some(state_dir.clone()),
        _ => std::env::var(k).ok(),
    };
    let config =
        Config::from_text_with_env(&path, &text, &env).map_err(|e| anyhow::anyhow!("{e}"))?;
    println!(
        "fieldgate demo: simulated boiler on {}, MQTT broker on {}, queue in {}",
        sim.addr,
        broker_addr,
        state.path().join("queue.db").display()
    );
    if let Some(web) = &config.web {
        println!("status page: http://{}/", web.listen);
    }
    println!(
        "the uplink will be cut at {} for {}; {}\n",
        humantime::format_duration(opts.cut_at),
        humantime::format_duration(opts.cut_for),
        match opts.duration {
            Some(d) => format!("stopping after {}", humantime::format_duration(d)),
            None => "Ctrl-C to stop".into(),
        }
    );

    let cancel = CancellationToken::new();
    tokio::spawn(super::run::stop_on_signal(cancel.clone()));
    let tuning = Tuning {
        backoff_max: Duration::from_secs(1),
        ..Tuning::default()
    };
    let gateway = tokio::spawn(fieldgate::gateway::run_with(config, tuning, cancel.clone()));

    let start = Instant::now();
    let cut_at = start + opts.cut_at;
    let restore_at = cut_at + opts.cut_for;
    let end = opts.duration.map(|d| start + d);
    let mut phase = 0; // 0 before the cut, 1 during, 2 after
    let mut seqs = BTreeSet::new();
    let mut received = 0usize;
    let mut replayed = 0usize;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        let next_switch = match phase {
            0 => cut_at,
            1 => restore_at,
            _ => start + Duration::from_secs(365 * 24 * 3600),
        };
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = sleep_until(end.unwrap_or(next_switch + Duration::from_secs(365 * 24 * 3600))), if end.is_some() => break,
            _ = sleep_until(next_switch) => {
                if phase == 0 {
                    proxy.set(Mode::Cut);
                    tick.reset();
                    println!("\n--- uplink CUT: the broker is unreachable; readings go on being polled and queued on disk ---\n");
                } else {
                    proxy.set(Mode::Pass);
                    println!("\n--- uplink RESTORED: the queued readings follow, with their original timestamps ---\n");
                }
                phase += 1;
            }
            _ = tick.tick(), if phase == 1 => {
                if let Ok(s) = Store::open(state.path()).and_then(|s| s.stats()) {
                    println!("    (uplink down: {} readings waiting in queue.db)", s.depth);
                }
            }
            m = msgs.recv() => {
                let Some((topic, payload)) = m else { break };
                received += 1;
                let text = String::from_utf8_lossy(&payload);
                let mut note = String::new();
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                    if let Some(seq) = v.get("seq").and_then(|s| s.as_u64()) {
                        seqs.insert(seq);
                    }
                    if let Some(age) = v.get("ts").and_then(|t| t.as_str()).and_then(age_ms)
                        && age > 1500
                    {
                        replayed += 1;
                        note = format!("   <- replayed, measured {:.1}s ago", age as f64 / 1000.0);
                    }
                }
                println!("{topic} {text}{note}");
            }
        }
    }
    cancel.cancel();
    gateway.await?.context("gateway")?;

    let gaps = match (seqs.first(), seqs.last()) {
        (Some(&a), Some(&b)) => (a..=b).filter(|s| !seqs.contains(s)).count(),
        _ => 0,
    };
    println!(
        "\nreceived {received} messages; seq {}..{}: {} missing; {replayed} arrived late from the queue with their poll-time ts",
        seqs.first().unwrap_or(&0),
        seqs.last().unwrap_or(&0),
        gaps
    );
    Ok(())
}

/// How long ago an RFC 3339 `ts` of ours was, in ms.
fn age_ms(ts: &str) -> Option<i64> {
    let fmt = time::format_description::well_known::Rfc3339;
    let t = time::OffsetDateTime::parse(ts, &fmt).ok()?;
    Some(now_ms() - (t.unix_timestamp_nanos() / 1_000_000) as i64)
}

/// Moves the boiler's values: a temperature sine, an energy counter, a pump that toggles.
async fn animate(sim: Simulator) {
    let t0 = Instant::now();
    sim.with_unit(1, |b| {
        b.set_input(7, &[152]); // 1.52 bar
        b.set_holding(110, &[0]);
        b.set_holding(
            200,
            &[
                u16::from_be_bytes(*b"FG"),
                u16::from_be_bytes(*b"-D"),
                u16::from_be_bytes(*b"EM"),
                u16::from_be_bytes(*b"O1"),
            ],
        );
        b.discrete.insert(2, false);
    });
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        let t = t0.elapsed().as_secs_f64();
        let temp = 60.0 + 5.0 * (t * std::f64::consts::TAU / 30.0).sin();
        let bits = (temp as f32).to_bits();
        let energy = (t * 10.0) as u32; // 0.1 kWh per step: +1 kWh per second
        sim.with_unit(1, |b| {
            // f32 in CDAB order: low word first.
            b.set_holding(100, &[(bits & 0xFFFF) as u16, (bits >> 16) as u16]);
            b.set_input(120, &[(energy >> 16) as u16, (energy & 0xFFFF) as u16]);
            b.set_input(7, &[150 + ((t * 3.0) as u16 % 5)]);
            b.coils.insert(5, (t as u64 / 3) % 2 == 1);
            b.discrete.insert(2, (t as u64 / 7) % 2 == 1);
            b.set_holding(110, &[if temp > 64.0 { 0b1000 } else { 0 }]);
        });
    }
}

/// Subscribes to everything with a plain MQTT client, as any consumer would.
fn subscribe(
    broker: SocketAddr,
    tx: mpsc::UnboundedSender<(String, Vec<u8>)>,
) -> anyhow::Result<()> {
    let mut o =
        rumqttc::MqttOptions::new("demo-subscriber", broker.ip().to_string(), broker.port());
    o.set_keep_alive(Duration::from_secs(5));
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut el) = rumqttc::AsyncClient::new(o, 100);
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                    let _ = client.subscribe("#", rumqttc::QoS::AtLeastOnce).await;
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    if tx.send((p.topic, p.payload.to_vec())).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    Ok(())
}
