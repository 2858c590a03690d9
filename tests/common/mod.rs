//! The shared harness of the integration tests: simulated devices, brokers (in-process rumqttd
//! or a real mosquitto), a subscriber that records what arrives, and the gateway itself.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fieldgate::config::Config;
use fieldgate::uplink::Tuning;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A message as a subscriber received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub payload: String,
    /// The payload as it came (binary payloads: Sparkplug).
    pub bytes: Vec<u8>,
    pub retain: bool,
    pub json: Option<serde_json::Value>,
    /// When it arrived, ms since the Unix epoch.
    pub at_ms: i64,
}

impl Received {
    pub fn seq(&self) -> Option<u64> {
        self.json.as_ref()?.get("seq")?.as_u64()
    }
    pub fn value(&self) -> Option<&serde_json::Value> {
        self.json.as_ref()?.get("value")
    }
    pub fn ts_ms(&self) -> Option<i64> {
        let ts = self.json.as_ref()?.get("ts")?.as_str()?;
        let t =
            time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339).ok()?;
        Some((t.unix_timestamp_nanos() / 1_000_000) as i64)
    }
}

/// Records every message on `#`.
#[derive(Clone)]
pub struct Subscriber {
    pub got: Arc<Mutex<Vec<Received>>>,
}

impl Subscriber {
    /// Connects, subscribes to `#` with QoS 1 and returns once the broker confirmed it.
    pub async fn start(broker: SocketAddr) -> Subscriber {
        let id = format!(
            "test-sub-{}",
            std::process::id() as u64 * 1000 + rand_u16() as u64
        );
        Subscriber::connect(broker, id, true).await
    }

    /// Like [`start`](Subscriber::start) with a persistent session (`clean_session = false`):
    /// a broker that keeps sessions queues what arrives while this subscriber is away.
    pub async fn start_persistent(broker: SocketAddr, id: &str) -> Subscriber {
        Subscriber::connect(broker, id.to_string(), false).await
    }

    async fn connect(broker: SocketAddr, id: String, clean: bool) -> Subscriber {
        let mut o = rumqttc::MqttOptions::new(id, broker.ip().to_string(), broker.port());
        o.set_keep_alive(Duration::from_secs(5));
        o.set_max_packet_size(1 << 20, 1 << 20);
        o.set_clean_session(clean);
        let (client, mut el) = rumqttc::AsyncClient::new(o, 1000);
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = got.clone();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut ready_tx = Some(ready_tx);
        tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        client
                            .subscribe("#", rumqttc::QoS::AtLeastOnce)
                            .await
                            .unwrap();
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        let payload = String::from_utf8_lossy(&p.payload).into_owned();
                        let json = serde_json::from_str(&payload).ok();
                        sink.lock().unwrap().push(Received {
                            topic: p.topic,
                            payload,
                            bytes: p.payload.to_vec(),
                            retain: p.retain,
                            json,
                            at_ms: fieldgate::message::now_ms(),
                        });
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .expect("subscriber connects within 10s")
            .unwrap();
        Subscriber { got }
    }

    pub fn all(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    /// Messages carrying a `seq`, one per seq (duplicates from at-least-once dropped).
    pub fn by_seq(&self) -> BTreeMap<u64, Received> {
        self.all()
            .into_iter()
            .filter_map(|r| Some((r.seq()?, r)))
            .collect()
    }

    /// The values (`"value"` of JSON payloads) that arrived on `topic`, in order.
    pub fn values(&self, topic: &str) -> Vec<serde_json::Value> {
        self.all()
            .iter()
            .filter(|r| r.topic == topic)
            .filter_map(|r| r.value().cloned())
            .collect()
    }

    /// The raw payloads that arrived on `topic`, in order.
    pub fn payloads(&self, topic: &str) -> Vec<String> {
        self.all()
            .iter()
            .filter(|r| r.topic == topic)
            .map(|r| r.payload.clone())
            .collect()
    }

    /// The last JSON payload on `topic` (e.g. the latest status message).
    pub fn latest_json(&self, topic: &str) -> serde_json::Value {
        self.all()
            .iter()
            .rev()
            .find(|r| r.topic == topic)
            .and_then(|r| r.json.clone())
            .unwrap_or_else(|| panic!("nothing on {topic}"))
    }

    /// Waits until `pred` holds for what has arrived, or panics after `limit`.
    pub async fn wait_for(&self, limit: Duration, what: &str, pred: impl Fn(&[Received]) -> bool) {
        let deadline = Instant::now() + limit;
        loop {
            if pred(&self.got.lock().unwrap()) {
                return;
            }
            if Instant::now() > deadline {
                let got = self.all();
                panic!(
                    "timed out after {limit:?} waiting for {what}; {} messages arrived, last: {:?}",
                    got.len(),
                    got.last()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn rand_u16() -> u16 {
    (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        % 65536) as u16
}

/// A gateway running in this process.
pub struct Gateway {
    pub cancel: CancellationToken,
    pub task: tokio::task::JoinHandle<Result<(), fieldgate::gateway::GatewayError>>,
    pub state_dir: PathBuf,
}

impl Gateway {
    /// Loads `yaml` as if from `{dir}/config.yaml` and runs it.
    pub fn start(dir: &Path, yaml: &str) -> Gateway {
        Gateway::start_with(dir, yaml, test_tuning())
    }

    pub fn start_with(dir: &Path, yaml: &str, tuning: Tuning) -> Gateway {
        logs();
        let path = dir.join("config.yaml");
        std::fs::write(&path, with_test_protocol(yaml)).unwrap();
        let config = Config::load(&path).unwrap_or_else(|e| panic!("test config is invalid:\n{e}"));
        let state_dir = config.gateway.state_dir.clone();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(fieldgate::gateway::run_with(config, tuning, cancel.clone()));
        Gateway {
            cancel,
            task,
            state_dir,
        }
    }

    /// Cancels and waits for a clean stop (bounded).
    pub async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("gateway stops within 10s")
            .unwrap()
            .unwrap();
    }
}

/// Short timeouts so fault tests stay quick.
pub fn test_tuning() -> Tuning {
    Tuning {
        ack_timeout: Duration::from_secs(5),
        drain_timeout: Duration::from_secs(2),
        backoff_min: Duration::from_millis(100),
        backoff_max: Duration::from_millis(500),
        refused_backoff: Duration::from_secs(30),
    }
}

/// `yaml` speaking the suite's MQTT version (`FIELDGATE_TEST_MQTT_PROTOCOL`, see
/// `testkit::broker::test_protocol`) unless it names one itself: `.ci/run` runs the uplink
/// tests under 3.1.1 and again under 5.
pub fn with_test_protocol(yaml: &str) -> String {
    let protocol = fieldgate::testkit::broker::test_protocol();
    if protocol == "3.1.1" || yaml.contains("protocol:") {
        return yaml.to_string();
    }
    let mut out = String::with_capacity(yaml.len() + 16);
    let mut done = false;
    for line in yaml.split_inclusive('\n') {
        let t = line.trim_start();
        if !done && t.starts_with("mqtt:") && t.contains('{') {
            // Flow style: `mqtt: { url: …, … }`.
            out.push_str(&line.replacen('{', &format!("{{ protocol: {protocol},"), 1));
            done = true;
        } else if !done && t.starts_with("url: mqtt") {
            out.push_str(line);
            let indent = &line[..line.len() - t.len()];
            out.push_str(&format!("{indent}protocol: {protocol}\n"));
            done = true;
        } else {
            out.push_str(line);
        }
    }
    out
}

/// A config with one Modbus TCP bus `plc` at `modbus`, publishing to `mqtt`.
pub fn config(state: &Path, mqtt: SocketAddr, modbus: SocketAddr, devices: &str) -> String {
    format!(
        "gateway:\n  id: gw1\n  state_dir: {}\nmqtt:\n  url: mqtt://{}\n  keep_alive: 2s\nbuses:\n  plc:\n    modbus_tcp: {{ host: 127.0.0.1, port: {}, timeout: 300ms }}\ndevices:\n{}",
        state.display(),
        mqtt,
        modbus.port(),
        devices
    )
}

/// A mosquitto broker on a free loopback port, killed on drop.
pub struct Mosquitto {
    pub addr: SocketAddr,
    child: Child,
    persistent: bool,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    /// Starts mosquitto, or returns None (test skipped) when it is not installed — unless
    /// `FIELDGATE_REQUIRE_MOSQUITTO=1`, as `.ci/run` sets, which turns a skip into a failure.
    pub fn start() -> Option<Mosquitto> {
        if mosquitto_bin().is_none() {
            if std::env::var("FIELDGATE_REQUIRE_MOSQUITTO").as_deref() == Ok("1") {
                panic!("mosquitto is required (FIELDGATE_REQUIRE_MOSQUITTO=1) but not installed");
            }
            eprintln!("SKIPPED: mosquitto is not installed (apt-get install mosquitto)");
            return None;
        }
        Some(Mosquitto::launch(
            tempfile::tempdir().unwrap(),
            free_port(),
            false,
        ))
    }

    /// A mosquitto that saves its sessions and queued messages in its own directory when it
    /// stops, so a persistent subscriber misses nothing across [`restart`](Mosquitto::restart).
    pub fn start_persistent() -> Option<Mosquitto> {
        let m = Mosquitto::start()?;
        let (dir, port) = m.stop();
        Some(Mosquitto::launch(dir, port, true))
    }

    /// A mosquitto with a plain anonymous listener (`addr`, for test subscribers) and `extra`
    /// configuration (more listeners; `per_listener_settings true` is set). Files written by
    /// the test stay readable: it runs as the invoking user (see `spawn_mosquitto`).
    pub fn start_custom(dir: tempfile::TempDir, extra: &str) -> Option<Mosquitto> {
        if mosquitto_bin().is_none() {
            if std::env::var("FIELDGATE_REQUIRE_MOSQUITTO").as_deref() == Ok("1") {
                panic!("mosquitto is required (FIELDGATE_REQUIRE_MOSQUITTO=1) but not installed");
            }
            eprintln!("SKIPPED: mosquitto is not installed (apt-get install mosquitto)");
            return None;
        }
        let port = free_port();
        let child = fieldgate::testkit::broker::spawn_mosquitto(
            &dir.path().join("mosquitto.conf"),
            &format!("per_listener_settings true\nlistener {port} 127.0.0.1\nallow_anonymous true\n{extra}"),
            port,
        )
        .expect("mosquitto starts");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        std::thread::sleep(Duration::from_millis(100)); // the other listeners
        Some(Mosquitto {
            addr,
            child,
            persistent: false,
            _dir: dir,
        })
    }

    /// Makes mosquitto read its configuration (and ACL file) again: SIGHUP.
    pub fn reload(&self) {
        let _ = Command::new("kill")
            .arg("-HUP")
            .arg(self.child.id().to_string())
            .status();
    }

    /// Stops the broker (SIGTERM: it saves its state) and starts it again on the same port.
    pub fn restart(self) -> Mosquitto {
        let persistent = self.persistent;
        let (dir, port) = self.stop();
        Mosquitto::launch(dir, port, persistent)
    }

    fn stop(mut self) -> (tempfile::TempDir, u16) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
        if self.persistent {
            // What a restart is for: a broker that could not save would forget every session.
            let db = self._dir.path().join("mosquitto.db");
            assert!(db.exists(), "mosquitto saved no state in {}", db.display());
        }
        let dir = std::mem::replace(&mut self._dir, tempfile::tempdir().unwrap());
        (dir, self.addr.port())
    }

    fn launch(dir: tempfile::TempDir, port: u16, persistent: bool) -> Mosquitto {
        // It can write in the test's private directory because it runs as the invoking user
        // (`spawn_mosquitto`); `stop` checks that it saved.
        let persistence = if persistent {
            format!(
                "persistence true\npersistence_location {}/\nautosave_interval 1\n",
                dir.path().display()
            )
        } else {
            "persistence false\n".to_string()
        };
        // FIELDGATE_TEST_MOSQ_LOG=DIR: each broker logs everything to a file in DIR (which
        // must be writable by the broker), for following a failure packet by packet.
        let logging = match std::env::var("FIELDGATE_TEST_MOSQ_LOG") {
            Ok(d) => format!(
                "log_dest file {d}/mosquitto-{port}-{}.log\nlog_type all\n",
                fieldgate::message::now_ms()
            ),
            Err(_) => String::new(),
        };
        let child = fieldgate::testkit::broker::spawn_mosquitto(
            &dir.path().join("mosquitto.conf"),
            &format!("listener {port} 127.0.0.1\nallow_anonymous true\n{persistence}{logging}max_queued_messages 0\nmax_inflight_messages 0\n"),
            port,
        )
        .expect("mosquitto starts");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        Mosquitto {
            addr,
            child,
            persistent,
            _dir: dir,
        }
    }
}

fn mosquitto_bin() -> Option<&'static str> {
    fieldgate::testkit::broker::mosquitto_bin()
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free loopback port outside the ephemeral range, not handed out before in this process
/// (so a broker restarted on it is not beaten to it by an outgoing connection).
pub fn free_port() -> u16 {
    fieldgate::testkit::broker::quiet_port().unwrap()
}

/// Asserts that `seqs` is exactly `first..=last` with no gap.
pub fn assert_gapless(seqs: impl IntoIterator<Item = u64>) {
    // Sorted and de-duplicated first: the binary search below needs it, and callers chain
    // received and queued seqs in any order.
    let mut v: Vec<u64> = seqs.into_iter().collect();
    v.sort_unstable();
    v.dedup();
    assert!(!v.is_empty(), "no seq at all");
    let missing: Vec<u64> = (v[0]..=*v.last().unwrap())
        .filter(|s| v.binary_search(s).is_err())
        .collect();
    assert!(
        missing.is_empty(),
        "seq gaps: {missing:?} (of {}..={})",
        v[0],
        v.last().unwrap()
    );
}

/// Logs to stderr when `FIELDGATE_TEST_LOG` is set (e.g. `FIELDGATE_TEST_LOG=debug`).
pub fn logs() {
    if let Ok(level) = std::env::var("FIELDGATE_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(level)
            .with_test_writer()
            .try_init();
    }
}

/// One device with four points every 100 ms: 40 readings/s, for the fault tests.
pub const FAST: &str = "  boiler:\n    bus: plc\n    every: 100ms\n    points:\n      a: { register: 0 }\n      b: { register: 1 }\n      c: { coil: 0 }\n      d: { register: 2, type: u32 }\n";

/// A simulator with the registers `FAST` reads.
pub async fn fast_sim() -> fieldgate::testkit::sim::Simulator {
    let sim = fieldgate::testkit::sim::Simulator::start(None)
        .await
        .unwrap();
    sim.with_unit(1, |b| {
        b.set_holding(0, &[1, 2, 0, 3]);
        b.coils.insert(0, true);
    });
    sim
}

/// Everything enqueued was received, or is still queued (the run ended before its turn).
pub fn assert_nothing_lost(state: &Path, sub: &Subscriber) -> usize {
    let store = fieldgate::store::Store::open(state).unwrap();
    let last = store.last_seq().unwrap();
    let queued: std::collections::BTreeSet<u64> = store
        .peek(0, 1_000_000)
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect();
    let got = sub.by_seq();
    let lost: Vec<u64> = (1..=last)
        .filter(|s| !got.contains_key(s) && !queued.contains(s))
        .collect();
    assert!(
        lost.is_empty(),
        "lost {} of {last}: {:?}",
        lost.len(),
        &lost[..lost.len().min(20)]
    );
    assert_gapless(got.keys().copied().chain(queued));
    last as usize
}

/// Descriptors this process holds on the device behind `path` (a pty's symlink).
pub fn descriptors_on(path: &Path) -> usize {
    let Ok(target) = std::fs::canonicalize(path) else {
        return 0;
    };
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| *l == target)
        .count()
}

/// Waits (at most 5 s) until the in-process gateway has opened the port behind `path`: this
/// process holds more descriptors on it than `before` (the simulator's own). Replaces a fixed
/// sleep before writing to a streaming sensor (#17).
pub async fn port_opened(path: &Path, before: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while descriptors_on(path) <= before {
        assert!(
            std::time::Instant::now() < deadline,
            "the gateway did not open {} within 5 s",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
