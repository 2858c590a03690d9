//! The uplink: publishes queued rows to the MQTT broker and deletes them when acknowledged.
//!
//! The queue, not rumqttc, is the truth. Each connection is a fresh rumqttc client and event
//! loop with `clean_session = true`; when it ends for any reason, everything not yet
//! acknowledged is simply read from the queue again by the next session, oldest first.
//!
//! rumqttc's `publish()` returns no packet id, so the bookkeeping is done here ([`Inflight`],
//! pure, no I/O): publishes are submitted in order, rumqttc reports `Outgoing::Publish(pkid)` in
//! that same order, which ties each packet id to a row; `Incoming::PubAck(pkid)` (PUBCOMP for
//! QoS 2) then names the row to delete. A packet-id collision, an unknown acknowledgement or an
//! acknowledgement that does not come within the ack timeout ends the session: the rows are
//! resent on the next one, never deleted unacknowledged.
//!
//! The uplink never blocks pollers: they only hand messages to the store thread.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, LastWill, MqttOptions, Outgoing, Packet, QoS,
};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, timeout};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Mqtt};
use crate::gateway::Shared;
use crate::message::Stored;
use crate::store::{StoreError, StoreHandle};

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("{0}")]
    Connection(Box<rumqttc::ConnectionError>),
    #[error("the broker refused the connection: {0:?}")]
    Refused(ConnectReturnCode),
    #[error("no CONNACK within {0:?}")]
    ConnectTimeout(Duration),
    #[error("client: {0}")]
    Client(#[from] rumqttc::ClientError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("bookkeeping: {0}")]
    Inflight(#[from] InflightError),
    #[error("no acknowledgement for packet {pkid} within {waited:?}")]
    AckTimeout { pkid: u16, waited: Duration },
}

impl From<rumqttc::ConnectionError> for UplinkError {
    fn from(e: rumqttc::ConnectionError) -> Self {
        match e {
            rumqttc::ConnectionError::ConnectionRefused(code) => UplinkError::Refused(code),
            e => UplinkError::Connection(Box::new(e)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InflightError {
    #[error("rumqttc sent a publish that was never submitted (packet {0})")]
    NothingSubmitted(u16),
    #[error("packet id {0} reused while still awaiting its acknowledgement")]
    Collision(u16),
}

/// Home Assistant discovery as the uplink publishes it.
#[derive(Debug, Clone)]
pub struct Announcements {
    pub prefix: String,
    /// Topic and retained payload of every config.
    pub configs: Vec<(String, Vec<u8>)>,
    /// Where the topics published last time are kept.
    pub file: std::path::PathBuf,
}

/// What a submitted publish stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// A queue row.
    Row { seq: u64, qos: u8 },
    /// The gateway's own status message.
    Control { qos: u8 },
}

impl Entry {
    fn qos(self) -> u8 {
        match self {
            Entry::Row { qos, .. } | Entry::Control { qos } => qos,
        }
    }
}

/// Publishes submitted but not yet acknowledged, tied to their packet ids. No I/O.
#[derive(Debug, Default)]
pub struct Inflight {
    /// Handed to rumqttc, not yet written (no packet id yet), in submission order.
    submitted: VecDeque<Entry>,
    /// Written, awaiting PUBACK/PUBCOMP, with the time they were written.
    awaiting: HashMap<u16, (Entry, Instant)>,
}

impl Inflight {
    /// Everything submitted and not yet acknowledged.
    pub fn len(&self) -> usize {
        self.submitted.len() + self.awaiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn submitted(&mut self, e: Entry) {
        self.submitted.push_back(e);
    }

    /// rumqttc wrote the next submitted publish with `pkid` (0 for QoS 0). Returns the row's
    /// `seq` if that completes it (QoS 0 needs no acknowledgement).
    pub fn written(&mut self, pkid: u16, now: Instant) -> Result<Option<u64>, InflightError> {
        let e = self
            .submitted
            .pop_front()
            .ok_or(InflightError::NothingSubmitted(pkid))?;
        if e.qos() == 0 {
            return Ok(match e {
                Entry::Row { seq, .. } => Some(seq),
                Entry::Control { .. } => None,
            });
        }
        if self.awaiting.insert(pkid, (e, now)).is_some() {
            return Err(InflightError::Collision(pkid));
        }
        Ok(None)
    }

    /// The broker acknowledged `pkid`. Returns the row's `seq` to delete, if it was a row.
    /// An acknowledgement for a packet id we do not await is ignored (a late duplicate).
    pub fn acknowledged(&mut self, pkid: u16) -> Option<u64> {
        match self.awaiting.remove(&pkid) {
            Some((Entry::Row { seq, .. }, _)) => Some(seq),
            Some((Entry::Control { .. }, _)) => None,
            None => {
                tracing::debug!(pkid, "acknowledgement for a packet not awaited; ignored");
                None
            }
        }
    }

    /// The packet that has waited longest for its acknowledgement, and since when.
    pub fn oldest(&self) -> Option<(u16, Instant)> {
        self.awaiting
            .iter()
            .map(|(p, (_, t))| (*p, *t))
            .min_by_key(|(_, t)| *t)
    }

    /// QoS 2 publishes submitted and not yet completed.
    pub fn qos2_awaiting(&self) -> usize {
        self.submitted
            .iter()
            .chain(self.awaiting.values().map(|(e, _)| e))
            .filter(|e| e.qos() == 2)
            .count()
    }

    /// Rows still awaiting an acknowledgement.
    pub fn rows_awaiting(&self) -> usize {
        self.submitted
            .iter()
            .chain(self.awaiting.values().map(|(e, _)| e))
            .filter(|e| matches!(e, Entry::Row { .. }))
            .count()
    }
}

fn qos(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        2 => QoS::ExactlyOnce,
        _ => QoS::AtLeastOnce,
    }
}

/// Longest wait between attempts when the broker keeps refusing the connection.
const REFUSED_BACKOFF_MAX: Duration = Duration::from_secs(300);

/// Settings of the uplink beyond the config's `mqtt:` section.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// How long a PUBACK may take before the session is considered broken.
    pub ack_timeout: Duration,
    /// At shutdown, how long to wait for acknowledgements of what is in flight.
    pub drain_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Least wait after the broker refused the connection (credentials, authorisation).
    pub refused_backoff: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            ack_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(2),
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            refused_backoff: Duration::from_secs(30),
        }
    }
}

pub struct Uplink {
    pub mqtt: Mqtt,
    pub status_topic: String,
    pub store: StoreHandle,
    pub tuning: Tuning,
    /// Messages per second taken from the queue; None: as fast as acknowledgements allow.
    pub replay_rate: Option<f64>,
    /// How often the retained `status/stats` message goes out.
    pub status_interval: Duration,
    pub started: std::time::Instant,
    /// The pollers' figures, reported in the status message.
    /// Figures, device availability and liveness shared with the pollers.
    pub shared: Shared,
    /// Each Modbus device's bus task, for commands.
    pub commands: HashMap<String, mpsc::Sender<crate::poller::Command>>,
    /// `…/set` topic → (device, point index, point).
    pub set_topics: HashMap<String, (String, usize, crate::mapping::Point)>,
    /// Home Assistant discovery: the prefix, the retained configs, and where the topics
    /// published last time are remembered (to remove those of points that left the config).
    pub discovery: Option<Announcements>,
}

/// How a session ended without an error.
enum Ended {
    Shutdown,
}

impl Uplink {
    pub fn new(config: &Config, shared: Shared) -> Uplink {
        Uplink {
            mqtt: config.mqtt.clone(),
            status_topic: config.gateway.status_topic(),
            store: shared.store.clone(),
            tuning: Tuning::default(),
            replay_rate: config.queue.replay_rate,
            status_interval: config.gateway.status_interval,
            started: std::time::Instant::now(),
            shared,
            commands: HashMap::new(),
            set_topics: command_topics(config),
            discovery: config.homeassistant.as_ref().map(|d| {
                let configs = crate::discovery::configs(config, d)
                    .into_iter()
                    .map(|(t, v)| (t, v.to_string().into_bytes()))
                    .collect();
                Announcements {
                    prefix: d.prefix.clone(),
                    configs,
                    file: config.gateway.state_dir.join("discovery.json"),
                }
            }),
        }
    }

    /// Queues every discovery config (retained), and empty retained messages for the topics
    /// published last time that are gone now.
    fn announce(&self, out: &mpsc::UnboundedSender<(String, Vec<u8>, bool)>) {
        let Some(Announcements { configs, file, .. }) = &self.discovery else {
            return;
        };
        let before: Vec<String> = std::fs::read(file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let now: Vec<String> = configs.iter().map(|(t, _)| t.clone()).collect();
        for gone in before.iter().filter(|t| !now.contains(t)) {
            let _ = out.send((gone.clone(), Vec::new(), true));
        }
        for (t, body) in configs {
            let _ = out.send((t.clone(), body.clone(), true));
        }
        if before != now {
            let _ = std::fs::write(file, serde_json::to_vec(&now).expect("strings serialize"));
        }
    }

    /// Promises the watchdog to be back by `within` from now.
    fn beat(&self, within: Duration) {
        self.shared.health.beat(
            "uplink",
            std::time::Instant::now() + within + crate::systemd::SLACK,
        );
    }

    fn stats_topic(&self) -> String {
        format!("{}/stats", self.status_topic)
    }

    /// Connects, publishes, reconnects with backoff, until `cancel` fires.
    pub async fn run(self, cancel: CancellationToken) {
        self.run_inner(&cancel).await;
        self.shared.health.forget("uplink");
    }

    async fn run_inner(&self, cancel: &CancellationToken) {
        let cancel = cancel.clone();
        let mut backoff = self.tuning.backoff_min;
        // When the current outage began; None while the uplink is up (or never tried).
        let mut down_since: Option<Instant> = None;
        loop {
            if cancel.is_cancelled() {
                return;
            }
            let mut connected = false;
            let refused: bool;
            // Connecting takes at most the connect timeout (10 s).
            self.beat(Duration::from_secs(10));
            let result = self.session(&cancel, &mut connected, down_since).await;
            match result {
                Ok(Ended::Shutdown) => return,
                Err(e) => {
                    if connected {
                        backoff = self.tuning.backoff_min;
                    }
                    // A broker that refuses us (bad credentials, not authorised) will not change
                    // its mind in a second: retry slowly, never in a hot loop.
                    refused = matches!(e, UplinkError::Refused(_));
                    if refused {
                        backoff = backoff.max(self.tuning.refused_backoff);
                    }
                    // Logged once per outage; the attempts in between go to debug.
                    if connected || down_since.is_none() {
                        tracing::warn!(broker = %format!("{}:{}", self.mqtt.host, self.mqtt.port), error = %e,
                            "MQTT uplink down; readings stay queued on disk, retrying with backoff");
                        down_since = Some(Instant::now());
                    } else {
                        tracing::debug!(error = %e, retry_in = ?backoff, "MQTT uplink still down");
                    }
                }
            }
            // Up to 25% jitter so a fleet does not reconnect in lockstep after a broker restart.
            let jitter = backoff.mul_f64(0.25 * (crate::message::now_ms() % 1000) as f64 / 1000.0);
            self.beat(backoff + jitter);
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = sleep(backoff + jitter) => {}
            }
            backoff = if refused {
                (backoff * 2).min(REFUSED_BACKOFF_MAX)
            } else {
                (backoff * 2).min(self.tuning.backoff_max)
            };
        }
    }

    fn options(&self) -> MqttOptions {
        let m = &self.mqtt;
        let mut o = MqttOptions::new(m.client_id.clone(), m.host.clone(), m.port);
        if let Some(tls) = &m.tls {
            if m.insecure_skip_verify {
                tracing::warn!(broker = %m.host, "TLS SERVER CERTIFICATE NOT VERIFIED (insecure_skip_verify): anyone on the path can read and forge this link; lab use only");
            }
            o.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls.clone()),
            ));
        }
        o.set_keep_alive(m.keep_alive);
        o.set_clean_session(true);
        o.set_inflight(m.inflight);
        o.set_max_packet_size(1 << 20, 1 << 20);
        o.set_last_will(LastWill::new(
            &self.status_topic,
            "offline",
            QoS::AtLeastOnce,
            true,
        ));
        if let Some(user) = &m.username {
            let pass = m.password.as_ref().map(|p| p.0.clone()).unwrap_or_default();
            o.set_credentials(user.clone(), pass);
        }
        o
    }

    async fn session(
        &self,
        cancel: &CancellationToken,
        connected: &mut bool,
        down_since: Option<Instant>,
    ) -> Result<Ended, UplinkError> {
        let window = self.mqtt.inflight as usize;
        let (client, mut eventloop) = AsyncClient::new(self.options(), window + 16);
        // The event loop runs in its own task so that nothing here cancels a half-written packet.
        let (ev_tx, mut events) = mpsc::channel(window + 16);
        let pump = tokio::spawn(async move {
            loop {
                let ev = eventloop.poll().await;
                let stop = ev.is_err();
                if ev_tx.send(ev).await.is_err() || stop {
                    break;
                }
            }
        });
        let _abort = AbortOnDrop(pump);

        // Connect.
        let connect_timeout = Duration::from_secs(10);
        let deadline = Instant::now() + connect_timeout;
        loop {
            let ev = tokio::select! {
                _ = cancel.cancelled() => return Ok(Ended::Shutdown),
                ev = timeout(deadline.saturating_duration_since(Instant::now()), events.recv()) => ev,
            };
            match ev {
                Err(_) => return Err(UplinkError::ConnectTimeout(connect_timeout)),
                Ok(None) => return Err(UplinkError::ConnectTimeout(connect_timeout)),
                Ok(Some(Err(e))) => return Err(e.into()),
                Ok(Some(Ok(Event::Incoming(Packet::ConnAck(ack))))) => {
                    if ack.code != ConnectReturnCode::Success {
                        return Err(UplinkError::Refused(ack.code));
                    }
                    break;
                }
                Ok(Some(Ok(_))) => {}
            }
        }
        *connected = true;
        let backlog = self.store.stats().await.map(|s| s.depth).unwrap_or(0);
        tracing::info!(broker = %format!("{}:{}", self.mqtt.host, self.mqtt.port), client_id = %self.mqtt.client_id, backlog,
            down_for = ?down_since.map(|t| t.elapsed()), "MQTT uplink connected");

        let mut inflight = Inflight::default();
        client.try_publish(&self.status_topic, QoS::AtLeastOnce, true, "online")?;
        inflight.submitted(Entry::Control { qos: 1 });

        let mut committed = self.store.committed();
        let mut cursor = 0u64; // highest seq read from the queue in this session
        let mut drained = false; // the queue held nothing past `cursor` at the last look
        let mut ready: VecDeque<Stored> = VecDeque::new(); // read, not yet submitted
        let mut acks: Vec<u64> = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut bucket = self.replay_rate.map(TokenBucket::new);
        let mut status = tokio::time::interval(self.status_interval);
        status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        // Commands: every point's `…/set` (a non-writable one gets a refusal, not silence).
        let filters: Vec<rumqttc::SubscribeFilter> = self
            .set_topics
            .keys()
            .map(|t| rumqttc::SubscribeFilter::new(t.clone(), QoS::AtLeastOnce))
            .collect();
        for chunk in filters.chunks(64) {
            client.try_subscribe_many(chunk.to_vec())?;
        }
        // Command results and discovery messages, published as the window allows.
        let (results_tx, mut results) = mpsc::unbounded_channel::<(String, Vec<u8>, bool)>();
        if let Some(a) = &self.discovery {
            client.try_subscribe(format!("{}/status", a.prefix), QoS::AtLeastOnce)?;
            self.announce(&results_tx);
        }

        // Device availability: everything known on connect, then every change.
        let mut announced: HashMap<String, u64> = HashMap::new();
        let result = loop {
            // The loop comes round at least every 100 ms (the tick below).
            self.beat(Duration::from_secs(1));
            for (topic, online, version) in self.shared.availability.snapshot() {
                if announced.get(&topic) != Some(&version) && inflight.len() < window {
                    client.try_publish(
                        topic.as_str(),
                        QoS::AtLeastOnce,
                        true,
                        if online { "online" } else { "offline" },
                    )?;
                    inflight.submitted(Entry::Control { qos: 1 });
                    announced.insert(topic, version);
                }
            }
            // Keep the window full, in seq order, within the QoS 2 limit and the replay rate.
            loop {
                if ready.is_empty() && !drained {
                    committed.borrow_and_update();
                    let want = window.saturating_sub(inflight.len()).max(1);
                    let rows = self.store.peek(cursor, want).await?;
                    drained = rows.len() < want;
                    if let Some(last) = rows.last() {
                        cursor = last.seq;
                    }
                    ready.extend(rows);
                }
                let Some(next) = ready.front() else { break };
                let m = &next.message;
                if inflight.len() >= window
                    || (m.qos == 2 && inflight.qos2_awaiting() >= self.mqtt.inflight_qos2 as usize)
                    || !bucket
                        .as_mut()
                        .is_none_or(|b| b.take(std::time::Instant::now()))
                {
                    break;
                }
                client.try_publish(m.topic.as_str(), qos(m.qos), m.retain, next.payload())?;
                inflight.submitted(Entry::Row {
                    seq: next.seq,
                    qos: m.qos,
                });
                ready.pop_front();
            }
            tokio::select! {
                _ = cancel.cancelled() => break Ok(()),
                ev = events.recv() => {
                    match ev {
                        None => break Err(UplinkError::ConnectTimeout(connect_timeout)),
                        Some(Err(e)) => break Err(e.into()),
                        Some(Ok(Event::Incoming(Packet::Publish(p)))) => {
                            // Home Assistant (re)started: it forgot the configs.
                            if self.discovery.as_ref().is_some_and(|a| p.topic == format!("{}/status", a.prefix))
                            {
                                if p.payload.as_ref() == b"online" {
                                    self.announce(&results_tx);
                                }
                            } else {
                                self.command(p, &results_tx);
                            }
                        }
                        Some(Ok(ev)) => if let Err(e) = handle(&mut inflight, &mut acks, ev) {
                            break Err(e);
                        },
                    }
                }
                Some((topic, payload, retain)) = results.recv(), if inflight.len() < window => {
                    client.try_publish(topic, QoS::AtLeastOnce, retain, payload)?;
                    inflight.submitted(Entry::Control { qos: 1 });
                }
                changed = committed.changed(), if drained && ready.is_empty() => {
                    if changed.is_err() {
                        break Err(UplinkError::Store(StoreError::Closed));
                    }
                    drained = false;
                }
                _ = self.shared.availability.changed() => {}
                _ = status.tick() => {
                    if inflight.len() < window {
                        let payload = crate::status::snapshot_json(&self.shared, self.started).await?;
                        client.try_publish(self.stats_topic(), QoS::AtLeastOnce, true, payload)?;
                        inflight.submitted(Entry::Control { qos: 1 });
                    }
                }
                _ = tick.tick() => {
                    // Deletes are batched per tick: few fsyncs, and a crash re-sends at most
                    // one tick's worth of acknowledged rows.
                    self.store.ack(std::mem::take(&mut acks))?;
                    if let Some((pkid, since)) = inflight.oldest() {
                        let waited = since.elapsed();
                        if waited > self.tuning.ack_timeout {
                            break Err(UplinkError::AckTimeout { pkid, waited });
                        }
                    }
                }
            }
            if acks.len() >= 256 {
                self.store.ack(std::mem::take(&mut acks))?;
            }
        };
        self.store.ack(std::mem::take(&mut acks))?;
        result?;

        // Shutdown: wait briefly for what is in flight, say offline, disconnect.
        let deadline = Instant::now() + self.tuning.drain_timeout;
        let _ = client.try_publish(&self.status_topic, QoS::AtLeastOnce, true, "offline");
        inflight.submitted(Entry::Control { qos: 1 });
        while !inflight.is_empty() {
            match timeout(
                deadline.saturating_duration_since(Instant::now()),
                events.recv(),
            )
            .await
            {
                Ok(Some(Ok(ev))) => {
                    if handle(&mut inflight, &mut acks, ev).is_err() {
                        break;
                    }
                }
                _ => break,
            }
        }
        self.store.ack(std::mem::take(&mut acks))?;
        let left = inflight.rows_awaiting();
        let _ = client.try_disconnect();
        let _ = timeout(Duration::from_millis(500), async {
            while let Some(Ok(ev)) = events.recv().await {
                if matches!(ev, Event::Outgoing(Outgoing::Disconnect)) {
                    break;
                }
            }
        })
        .await;
        tracing::info!(unacknowledged_rows_kept = left, "MQTT uplink closed");
        Ok(Ended::Shutdown)
    }
}

/// The command topic of every point: `{point topic}/set`, or `{device topic}/{point}/set` for a
/// device published as one message.
pub fn command_topics(config: &Config) -> HashMap<String, (String, usize, crate::mapping::Point)> {
    let mut out = HashMap::new();
    for d in &config.devices {
        for (i, p) in d.points.iter().enumerate() {
            let topic = match d.publish {
                crate::config::PublishMode::Point => format!("{}/set", p.delivery.topic),
                crate::config::PublishMode::Device => {
                    format!("{}/{}/set", d.device_delivery.topic, p.name)
                }
            };
            out.insert(topic, (d.name.clone(), i, p.clone()));
        }
    }
    out
}

/// What a command payload asks for: a bare value (`21.5`, `true`, `on`) or `{"value": …}`.
pub fn command_value(payload: &[u8]) -> Result<serde_json::Value, String> {
    let text = std::str::from_utf8(payload)
        .map_err(|_| "the payload is not UTF-8".to_string())?
        .trim();
    if text.is_empty() {
        return Err("empty payload".into());
    }
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(m)) => m
            .get("value")
            .cloned()
            .ok_or_else(|| "expected {\"value\": …}".to_string()),
        Ok(
            v @ (serde_json::Value::Number(_)
            | serde_json::Value::Bool(_)
            | serde_json::Value::String(_)),
        ) => Ok(v),
        Ok(other) => Err(format!("expected a value, got {other}")),
        Err(_) if text.starts_with(['{', '[', '"']) => Err("malformed JSON".into()),
        Err(_) => Ok(serde_json::Value::String(text.to_string())),
    }
}

impl Uplink {
    /// Handles one incoming publish on a command topic: refuses it with a result message, or
    /// hands it to the device's bus task and publishes the result when it is done.
    fn command(
        &self,
        p: rumqttc::Publish,
        results: &mpsc::UnboundedSender<(String, Vec<u8>, bool)>,
    ) {
        let Some((device, point, spec)) = self.set_topics.get(&p.topic) else {
            return;
        };
        // An empty publish is how a retained message is cleared: not a command.
        if p.payload.is_empty() {
            tracing::debug!(topic = %p.topic, "empty command payload ignored");
            return;
        }
        let result_topic = format!("{}/result", p.topic);
        let refuse = |why: String| {
            tracing::warn!(topic = %p.topic, reason = %why, "command refused; nothing written");
            let body = serde_json::json!({"ok": false, "error": why});
            let _ = results.send((result_topic.clone(), body.to_string().into_bytes(), false));
        };
        // A retained command would be carried out again at every reconnect, hours later.
        if p.retain {
            return refuse("retained commands are ignored; publish without retain".into());
        }
        let data = match command_value(&p.payload).and_then(|v| spec.encode(&v)) {
            Ok(d) => d,
            Err(why) => return refuse(why),
        };
        let Some(tx) = self.commands.get(device) else {
            return refuse(format!("device {device} does not take commands"));
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        let cmd = crate::poller::Command {
            device: device.clone(),
            point: *point,
            data,
            reply,
        };
        if tx.try_send(cmd).is_err() {
            return refuse("the bus is busy with other commands; try again".into());
        }
        let results = results.clone();
        tokio::spawn(async move {
            let body = match tokio::time::timeout(Duration::from_secs(30), answer).await {
                Ok(Ok(Ok(v))) => serde_json::json!({"ok": true, "value": v}),
                Ok(Ok(Err(e))) => serde_json::json!({"ok": false, "error": e}),
                _ => {
                    serde_json::json!({"ok": false, "error": "no answer from the bus within 30 s"})
                }
            };
            let _ = results.send((result_topic, body.to_string().into_bytes(), false));
        });
    }
}

/// Applies one event to the bookkeeping; acknowledged rows go to `acks`.
fn handle(inflight: &mut Inflight, acks: &mut Vec<u64>, ev: Event) -> Result<(), UplinkError> {
    match ev {
        Event::Outgoing(Outgoing::Publish(pkid)) => {
            if let Some(seq) = inflight.written(pkid, Instant::now())? {
                acks.push(seq);
            }
        }
        Event::Outgoing(Outgoing::AwaitAck(pkid)) => {
            return Err(InflightError::Collision(pkid).into());
        }
        Event::Incoming(Packet::PubAck(a)) => acks.extend(inflight.acknowledged(a.pkid)),
        Event::Incoming(Packet::PubComp(c)) => acks.extend(inflight.acknowledged(c.pkid)),
        _ => {}
    }
    Ok(())
}

/// Paces publishing to `rate` messages per second, with at most one second of burst.
#[derive(Debug)]
struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: std::time::Instant,
}

impl TokenBucket {
    fn new(rate: f64) -> TokenBucket {
        TokenBucket {
            rate,
            tokens: 1.0,
            last: std::time::Instant::now(),
        }
    }

    /// Takes one token if there is one.
    fn take(&mut self, now: std::time::Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.rate.max(1.0));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seq: u64) -> Entry {
        Entry::Row { seq, qos: 1 }
    }

    #[test]
    fn packet_ids_are_matched_to_rows_in_submission_order() {
        let mut f = Inflight::default();
        let now = Instant::now();
        f.submitted(row(10));
        f.submitted(row(11));
        assert_eq!(f.written(1, now), Ok(None));
        assert_eq!(f.written(2, now), Ok(None));
        assert_eq!(f.acknowledged(2), Some(11));
        assert_eq!(f.acknowledged(1), Some(10));
        assert!(f.is_empty());
    }

    #[test]
    fn qos0_rows_are_done_once_written() {
        let mut f = Inflight::default();
        f.submitted(Entry::Row { seq: 5, qos: 0 });
        assert_eq!(f.written(0, Instant::now()), Ok(Some(5)));
        assert!(f.is_empty());
    }

    #[test]
    fn a_reused_packet_id_is_a_collision_not_a_delete() {
        let mut f = Inflight::default();
        let now = Instant::now();
        f.submitted(row(1));
        f.submitted(row(2));
        f.written(7, now).unwrap();
        assert_eq!(f.written(7, now), Err(InflightError::Collision(7)));
    }

    #[test]
    fn an_unknown_ack_deletes_nothing() {
        let mut f = Inflight::default();
        f.submitted(row(1));
        f.written(1, Instant::now()).unwrap();
        assert_eq!(f.acknowledged(9), None);
        assert_eq!(f.rows_awaiting(), 1);
    }

    #[test]
    fn control_messages_are_tracked_but_never_deleted_from_the_queue() {
        let mut f = Inflight::default();
        f.submitted(Entry::Control { qos: 1 });
        f.written(1, Instant::now()).unwrap();
        assert_eq!(f.acknowledged(1), None);
        assert!(f.is_empty());
    }

    #[test]
    fn written_without_submission_is_an_error() {
        let mut f = Inflight::default();
        assert_eq!(
            f.written(3, Instant::now()),
            Err(InflightError::NothingSubmitted(3))
        );
    }

    #[test]
    fn the_token_bucket_paces_to_its_rate() {
        let t0 = std::time::Instant::now();
        let mut b = TokenBucket::new(10.0);
        b.last = t0;
        assert!(b.take(t0));
        assert!(!b.take(t0), "no burst beyond the first token at start");
        // One second later: ten more, not eleven.
        let t1 = t0 + Duration::from_secs(1);
        let n = (0..20).filter(|_| b.take(t1)).count();
        assert_eq!(n, 10);
    }

    #[test]
    fn qos2_in_flight_is_counted_apart() {
        let mut f = Inflight::default();
        f.submitted(Entry::Row { seq: 1, qos: 2 });
        f.submitted(Entry::Row { seq: 2, qos: 1 });
        f.written(1, Instant::now()).unwrap();
        assert_eq!(f.qos2_awaiting(), 1);
        f.acknowledged(1);
        assert_eq!(f.qos2_awaiting(), 0);
    }

    #[test]
    fn oldest_names_the_longest_waiting_packet() {
        let mut f = Inflight::default();
        let t0 = Instant::now();
        f.submitted(row(1));
        f.submitted(row(2));
        f.written(4, t0 + Duration::from_millis(5)).unwrap();
        f.written(3, t0).unwrap();
        assert_eq!(f.oldest(), Some((3, t0)));
    }
}
