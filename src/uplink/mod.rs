//! The uplink: publishes queued rows to the MQTT broker and deletes them when acknowledged.
//!
//! The queue, not rumqttc, is the truth. Each connection is a fresh rumqttc client and event
//! loop with `clean_session = true`; when it ends for any reason, everything not yet
//! acknowledged is simply read from the queue again by the next session, oldest first.
//!
//! Which publish is in flight under which packet id, and how much more may be sent, is the
//! [`window`]'s business (pure, no I/O): it mirrors rumqttc's packet-id counter so ids never
//! collide, keeps the bytes in flight to what the link delivers within half a keep-alive, and
//! calls a session broken only when nothing at all has been acknowledged for the ack timeout.
//! Anything unexpected in rumqttc's reports is logged and counted, never a reason to drop a
//! session that is making progress; the reconnect backoff resets only after a session
//! delivered something.
//!
//! A row that can never be published (a topic with `+`, `#` or NUL, a packet over the size
//! limit) is set aside in the store, counted and logged once: never a head-of-line block.
//!
//! The uplink never blocks pollers: they only hand messages to the store thread.

mod commands;
pub mod window;

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, LastWill, MqttOptions, Outgoing, Packet, QoS,
};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, timeout};
use tokio_util::sync::CancellationToken;

pub use commands::{command_topics, command_value};
pub use window::{Entry, Surprise, Window};

use crate::backoff::{Backoff, Retry};
use crate::config::{Config, Mqtt};
use crate::message::Stored;
use crate::state::Shared;
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
    #[error("nothing acknowledged for {quiet:?} while packet {pkid} awaits its acknowledgement")]
    AckTimeout { pkid: u16, quiet: Duration },
}

impl From<rumqttc::ConnectionError> for UplinkError {
    fn from(e: rumqttc::ConnectionError) -> Self {
        match e {
            rumqttc::ConnectionError::ConnectionRefused(code) => UplinkError::Refused(code),
            e => UplinkError::Connection(Box::new(e)),
        }
    }
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

/// A message of the gateway's own, waiting for room in the window: topic, payload, retain.
type Outbound = (String, Vec<u8>, bool);

/// Command results waiting for the window; beyond this, new commands are refused as busy.
const RESULTS_QUEUED: usize = 64;

/// Largest packet the uplink sends (and accepts).
pub const MAX_PACKET: usize = 1 << 20;

fn qos(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        2 => QoS::ExactlyOnce,
        _ => QoS::AtLeastOnce,
    }
}

/// Why a topic and payload can never be published: MQTT forbids wildcards and NUL in a topic
/// name, an empty topic, and the packet must fit the size limit.
pub fn unpublishable(topic: &str, payload_len: usize) -> Option<String> {
    if topic.is_empty() {
        return Some("empty topic".into());
    }
    if let Some(c) = topic.chars().find(|c| matches!(c, '+' | '#' | '\0')) {
        return Some(format!("topic {topic:?} contains {c:?}"));
    }
    if topic.len() > u16::MAX as usize {
        return Some("topic longer than 65535 bytes".into());
    }
    if topic.len() + payload_len + 16 > MAX_PACKET {
        return Some(format!("packet larger than {MAX_PACKET} bytes"));
    }
    None
}

/// Bytes a publish takes on the wire, near enough for the window's budget.
fn wire_bytes(topic: &str, payload_len: usize) -> usize {
    topic.len() + payload_len + 8
}

/// Longest wait between attempts when the broker keeps refusing the connection.
const REFUSED_BACKOFF_MAX: Duration = Duration::from_secs(300);

/// Settings of the uplink beyond the config's `mqtt:` section.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// How long nothing may be acknowledged, while something awaits, before the session is
    /// considered broken.
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
    /// Figures, device availability and liveness shared with the pollers.
    pub shared: Shared,
    /// Each Modbus device's bus task, for commands.
    pub commands: HashMap<String, mpsc::Sender<crate::state::Command>>,
    /// `…/set` topic → (device, point index, point).
    pub set_topics: HashMap<String, (String, usize, crate::mapping::Point)>,
    /// Home Assistant discovery: the prefix, the retained configs, and where the topics
    /// published last time are remembered (to remove those of points that left the config).
    pub discovery: Option<Announcements>,
    /// Commands handed to a bus task and not yet answered: waited for at shutdown, so their
    /// results go out before `offline`.
    pub pending_commands: tokio_util::task::TaskTracker,
}

/// How a session ended without an error.
enum Ended {
    Shutdown,
}

/// What a session achieved before it ended, for the reconnect policy.
#[derive(Debug, Default, Clone, Copy)]
struct Report {
    connected: bool,
    /// The broker acknowledged at least one publish.
    delivered: bool,
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
            pending_commands: tokio_util::task::TaskTracker::new(),
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

    /// Every discovery config (retained), after empty retained messages for the topics
    /// published last time that are gone now. A new announcement replaces one still under way
    /// (Home Assistant restarting twice gets one full set, not two).
    fn announcements(&self) -> VecDeque<Outbound> {
        let Some(Announcements { configs, file, .. }) = &self.discovery else {
            return VecDeque::new();
        };
        let before: Vec<String> = std::fs::read(file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let now: Vec<String> = configs.iter().map(|(t, _)| t.clone()).collect();
        let mut out: VecDeque<Outbound> = before
            .iter()
            .filter(|t| !now.contains(t))
            .map(|gone| (gone.clone(), Vec::new(), true))
            .collect();
        out.extend(
            configs
                .iter()
                .map(|(t, body)| (t.clone(), body.clone(), true)),
        );
        if before != now {
            let _ = std::fs::write(file, serde_json::to_vec(&now).expect("strings serialize"));
        }
        out
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
        let mut retry = Retry::new(Backoff::new(
            self.tuning.backoff_min,
            self.tuning.backoff_max,
        ));
        // When the current outage began; None while the uplink is up (or never tried).
        let mut down_since: Option<Instant> = None;
        loop {
            if cancel.is_cancelled() {
                return;
            }
            let mut report = Report::default();
            let mut backoff: Duration;
            // Connecting takes at most the connect timeout (10 s).
            self.beat(Duration::from_secs(10));
            let result = self.session(&cancel, &mut report, down_since).await;
            // Whatever was in flight is not any more: the next session sends it again.
            self.store.in_flight_upto(0);
            match result {
                Ok(Ended::Shutdown) => return,
                Err(e) => {
                    // Only a session that delivered something proves the link works: one that
                    // connects and then fails at once must not turn into a reconnect storm.
                    if report.delivered {
                        retry.succeeded();
                    }
                    backoff = retry.failed();
                    // A broker that refuses us (bad credentials, not authorised) will not change
                    // its mind in a second: retry slowly, never in a hot loop.
                    if matches!(e, UplinkError::Refused(_)) {
                        backoff = Backoff::new(self.tuning.refused_backoff, REFUSED_BACKOFF_MAX)
                            .after(retry.failures());
                    }
                    // Logged once per outage; the attempts in between go to debug.
                    if report.delivered || down_since.is_none() {
                        tracing::warn!(broker = %format!("{}:{}", self.mqtt.host, self.mqtt.port), error = %e,
                            "MQTT uplink down; readings stay queued on disk, retrying with backoff");
                        if let Some(fix) = crate::tls::explain(&format!("{e:?}")) {
                            tracing::error!(broker = %self.mqtt.host, "TLS: {fix}");
                        }
                        down_since = Some(Instant::now());
                    } else {
                        tracing::debug!(error = %e, connected = report.connected, retry_in = ?backoff, "MQTT uplink still down");
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
        // rumqttc's `inflight` is its packet-id space; the window (mqtt.inflight) is enforced
        // here, with ids to spare so out-of-order acknowledgements rarely hold a publish back.
        o.set_inflight(Window::id_space(m.inflight));
        o.set_max_packet_size(MAX_PACKET, MAX_PACKET);
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
        report: &mut Report,
        down_since: Option<Instant>,
    ) -> Result<Ended, UplinkError> {
        let limit = self.mqtt.inflight as usize;
        let filters: Vec<rumqttc::SubscribeFilter> = self
            .set_topics
            .keys()
            .map(|t| rumqttc::SubscribeFilter::new(t.clone(), QoS::AtLeastOnce))
            .collect();
        let subscribes = filters.len().div_ceil(64) + 1;
        // Room for the whole window, the subscriptions and the odd control message: try_publish
        // never finds the request channel full.
        let capacity = limit + subscribes + 16;
        let (client, mut eventloop) = AsyncClient::new(self.options(), capacity);
        // Small PUBLISHes paced by acknowledgements: with Nagle on, each waits for the peer's
        // (delayed) ACK of the one before, and a 50 ms link behaved like a 100 ms one.
        let mut network = rumqttc::NetworkOptions::new();
        network.set_tcp_nodelay(true);
        eventloop.set_network_options(network);
        // The event loop runs in its own task so that nothing here cancels a half-written packet.
        let (ev_tx, mut events) = mpsc::channel(capacity);
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
        report.connected = true;
        let backlog = self.store.stats().await.map(|s| s.depth).unwrap_or(0);
        tracing::info!(broker = %format!("{}:{}", self.mqtt.host, self.mqtt.port), client_id = %self.mqtt.client_id, backlog,
            down_for = ?down_since.map(|t| t.elapsed()), "MQTT uplink connected");

        let mut s = Session {
            client: &client,
            win: Window::new(
                limit,
                Window::id_space(self.mqtt.inflight),
                self.mqtt.keep_alive,
                Instant::now(),
            ),
            acks: Vec::new(),
            surprised: false,
        };
        s.control(&self.status_topic, b"online".to_vec(), true)?;

        let mut committed = self.store.committed();
        let mut cursor = 0u64; // highest seq read from the queue in this session
        let mut drained = false; // the queue held nothing past `cursor` at the last look
        let mut ready: VecDeque<Ready> = VecDeque::new(); // read, not yet submitted
        let fetch_size = limit.max(64);
        let mut fetch: Option<Fetch<'_>> = None; // a read of the queue under way
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut bucket = self.replay_rate.map(TokenBucket::new);
        let mut status = tokio::time::interval(self.status_interval);
        status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        // Commands: every point's `…/set` (a non-writable one gets a refusal, not silence).
        for chunk in filters.chunks(64) {
            client.try_subscribe_many(chunk.to_vec())?;
            s.win.subscribed();
        }
        // Command results, published as the window allows; bounded.
        let (results_tx, mut results) = mpsc::channel::<Outbound>(RESULTS_QUEUED);
        // Status and command results waiting for room in the window (first in line).
        let mut outbox: VecDeque<Outbound> = VecDeque::new();
        // Discovery configs still to publish.
        let mut announcing: VecDeque<Outbound> = VecDeque::new();
        if let Some(a) = &self.discovery {
            client.try_subscribe(format!("{}/status", a.prefix), QoS::AtLeastOnce)?;
            s.win.subscribed();
            announcing = self.announcements();
        }

        // Device availability: everything known on connect, then every change.
        let mut announced: HashMap<String, u64> = HashMap::new();
        let result = 'session: loop {
            // The loop comes round at least every 100 ms (the tick below).
            self.beat(Duration::from_secs(1));
            let now = Instant::now();
            for (topic, online, version) in self.shared.availability.snapshot() {
                let body: &[u8] = if online { b"online" } else { b"offline" };
                if announced.get(&topic) != Some(&version)
                    && s.win.can_submit(1, wire_bytes(&topic, body.len()), now)
                {
                    s.control(&topic, body.to_vec(), true)?;
                    announced.insert(topic, version);
                }
            }
            // The gateway's own messages go before rows: a backlog must not starve them.
            s.send_while_room(&mut outbox, now)?;
            s.send_while_room(&mut announcing, now)?;
            // Keep the window full, in seq order, within the QoS 2 limit and the replay rate.
            // The next rows are fetched while these go out: waiting for the store thread (which
            // may be in an fsync) must not leave the window empty.
            if fetch.is_none() && !drained && ready.len() < fetch_size / 2 {
                committed.borrow_and_update();
                fetch = Some(Box::pin(self.store.peek(cursor, fetch_size)));
            }
            while let Some(next) = ready.front() {
                if !s.win.can_submit(next.qos, next.bytes, now)
                    || (next.qos == 2 && s.win.qos2_in_flight() >= self.mqtt.inflight_qos2 as usize)
                    || !bucket
                        .as_mut()
                        .is_none_or(|b| b.take(std::time::Instant::now()))
                {
                    break;
                }
                let next = ready.pop_front().expect("front exists");
                client.try_publish(next.topic, qos(next.qos), next.retain, next.payload)?;
                s.win.submit(
                    Entry::Row {
                        seq: next.seq,
                        qos: next.qos,
                    },
                    next.bytes,
                );
                // Rows go out in seq order: everything up to here may be in flight.
                self.store.in_flight_upto(next.seq);
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
                                    announcing = self.announcements();
                                }
                            } else {
                                self.command(p, &results_tx);
                            }
                        }
                        Some(Ok(ev)) => s.handle(ev),
                    }
                }
                Some(result) = results.recv(), if outbox.len() < RESULTS_QUEUED => {
                    outbox.push_back(result);
                }
                rows = async { fetch.as_mut().expect("guarded").await }, if fetch.is_some() => {
                    fetch = None;
                    let rows = match rows {
                        Ok(r) => r,
                        Err(e) => break Err(e.into()),
                    };
                    drained = rows.len() < fetch_size;
                    if let Some(last) = rows.last() {
                        cursor = last.seq;
                    }
                    // Each payload is rendered once, here; a row the broker could never take
                    // is set aside instead of blocking the ones behind it.
                    for row in rows {
                        match Ready::new(row) {
                            Ok(r) => ready.push_back(r),
                            Err((seq, topic, why)) => {
                                tracing::error!(seq, %topic, reason = %why,
                                    "a queued reading can never be published; set aside in the queue file (table aside)");
                                if let Err(e) = self.store.set_aside(vec![seq]) {
                                    break 'session Err(e.into());
                                }
                            }
                        }
                    }
                }
                changed = committed.changed(), if drained => {
                    if changed.is_err() {
                        break Err(UplinkError::Store(StoreError::Closed));
                    }
                    drained = false;
                }
                _ = self.shared.availability.changed() => {}
                _ = status.tick() => {
                    let payload = crate::status::Snapshot::take(&self.shared, self.started)
                        .await?
                        .to_json();
                    let topic = self.stats_topic();
                    // One status message waiting is enough: a newer one replaces it.
                    outbox.retain(|(t, _, _)| *t != topic);
                    outbox.push_back((topic, payload, true));
                }
                _ = tick.tick() => {
                    // Deletes are batched per tick: few fsyncs, and a crash re-sends at most
                    // one tick's worth of acknowledged rows.
                    self.store.ack(std::mem::take(&mut s.acks))?;
                    if let Some((pkid, quiet)) = s.win.stuck(Instant::now(), self.tuning.ack_timeout) {
                        break Err(UplinkError::AckTimeout { pkid, quiet });
                    }
                }
            }
            report.delivered |= s.win.acknowledged() > 0;
            if s.acks.len() >= 256 {
                self.store.ack(std::mem::take(&mut s.acks))?;
            }
        };
        report.delivered |= s.win.acknowledged() > 0;
        self.store.ack(std::mem::take(&mut s.acks))?;
        result?;

        // Shutdown: wait briefly for what is in flight, say offline, disconnect. Command results
        // go out first: a command handed to a bus task gets its answer (the bus task answers
        // the ones it did not carry out as it stops).
        self.pending_commands.close();
        let _ = timeout(self.tuning.drain_timeout, self.pending_commands.wait()).await;
        while let Ok(result) = results.try_recv() {
            outbox.push_back(result);
        }
        for (topic, payload, retain) in outbox {
            if s.control(&topic, payload, retain).is_err() {
                break;
            }
        }
        let deadline = Instant::now() + self.tuning.drain_timeout;
        // If the publish cannot even be handed over, there is nothing to wait for.
        let _ = s.control(&self.status_topic, b"offline".to_vec(), true);
        while !s.win.is_empty() {
            match timeout(
                deadline.saturating_duration_since(Instant::now()),
                events.recv(),
            )
            .await
            {
                Ok(Some(Ok(ev))) => s.handle(ev),
                _ => break,
            }
        }
        self.store.ack(std::mem::take(&mut s.acks))?;
        let left = s.win.rows_in_flight();
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

/// A queued row read for publishing, its payload rendered once.
struct Ready {
    seq: u64,
    topic: String,
    qos: u8,
    retain: bool,
    payload: Vec<u8>,
    /// On the wire, for the window's byte budget.
    bytes: usize,
}

impl Ready {
    /// The row ready to publish, or why it can never be: (seq, topic, reason).
    fn new(row: Stored) -> Result<Ready, (u64, String, String)> {
        let payload = row.payload();
        let m = row.message;
        if let Some(why) = unpublishable(&m.topic, payload.len()) {
            return Err((row.seq, m.topic, why));
        }
        Ok(Ready {
            seq: row.seq,
            bytes: wire_bytes(&m.topic, payload.len()),
            topic: m.topic,
            qos: m.qos,
            retain: m.retain,
            payload,
        })
    }
}

/// A read of the next rows from the queue, under way.
type Fetch<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Vec<Stored>, StoreError>> + Send + 'a>,
>;

/// One connection's publishing state: the client, the window, acknowledged rows to delete.
struct Session<'a> {
    client: &'a AsyncClient,
    win: Window,
    /// Rows acknowledged, not yet deleted from the queue.
    acks: Vec<u64>,
    /// A surprise was logged at warn level in this session (later ones go to debug).
    surprised: bool,
}

impl Session<'_> {
    /// Publishes a message of the gateway's own (QoS 1) and counts it in the window.
    fn control(&mut self, topic: &str, payload: Vec<u8>, retain: bool) -> Result<(), UplinkError> {
        let bytes = wire_bytes(topic, payload.len());
        self.client
            .try_publish(topic, QoS::AtLeastOnce, retain, payload)?;
        self.win.submit(Entry::Control { qos: 1 }, bytes);
        Ok(())
    }

    /// Publishes the gateway's own messages from `queue`, oldest first, while the window has
    /// room for them.
    fn send_while_room(
        &mut self,
        queue: &mut VecDeque<Outbound>,
        now: Instant,
    ) -> Result<(), UplinkError> {
        while let Some((t, body, _)) = queue.front() {
            if !self.win.can_submit(1, wire_bytes(t, body.len()), now) {
                break;
            }
            let (t, body, retain) = queue.pop_front().expect("front exists");
            self.control(&t, body, retain)?;
        }
        Ok(())
    }

    /// Applies one of rumqttc's events to the window; acknowledged rows go to `acks`.
    fn handle(&mut self, ev: Event) {
        let now = Instant::now();
        let surprise = match ev {
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                let (done, surprise) = self.win.written(pkid, now);
                self.acks.extend(done);
                surprise
            }
            Event::Outgoing(Outgoing::AwaitAck(pkid)) => Some(self.win.held_back(pkid)),
            Event::Incoming(Packet::PubAck(a)) => {
                self.acks.extend(self.win.ack(a.pkid, now));
                None
            }
            Event::Incoming(Packet::PubComp(c)) => {
                self.acks.extend(self.win.ack(c.pkid, now));
                None
            }
            _ => None,
        };
        if let Some(s) = surprise {
            if self.surprised {
                tracing::debug!(surprise = %s, "MQTT bookkeeping surprise; session goes on");
            } else {
                self.surprised = true;
                tracing::warn!(surprise = %s, "MQTT bookkeeping surprise; session goes on, nothing is deleted unacknowledged (further ones at debug level)");
            }
        }
    }
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
    fn topics_mqtt_forbids_are_unpublishable() {
        assert_eq!(unpublishable("site/a/temp", 10), None);
        for bad in ["site/+/temp", "site/#", "a\0b", ""] {
            assert!(unpublishable(bad, 10).is_some(), "{bad:?}");
        }
        assert!(unpublishable("a", MAX_PACKET).is_some());
    }
}
