//! The uplink: publishes queued rows to the MQTT broker and deletes them when acknowledged.
//!
//! The queue, not the MQTT client, is the truth. Each connection starts from fresh session
//! state (rumqttc's `MqttState` behind our I/O loop, `wire`) with `clean_session = true`; when
//! it ends for any reason, everything not yet acknowledged is simply read from the queue again
//! by the next session, oldest first.
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
//!
//! # Layout
//!
//! - this file: the reconnect loop, its backoff, and the client's options;
//! - `session`: one connection, from CONNECT to DISCONNECT;
//! - [`link`]: the two protocol versions behind one face; `wire`: the connection's I/O loop,
//!   every waiting request in one write;
//! - [`window`]: which publish is in flight under which packet id (pure);
//! - `commands`: `…/set` topics to the devices' bus tasks and back;
//! - `announce`: Home Assistant discovery configs.

mod announce;
mod commands;
pub mod link;
mod ready;
mod session;
mod sparkplug;
pub mod window;
mod wire;

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;

pub use commands::{command_topics, command_value};
pub use ready::{MAX_PACKET, unpublishable};
pub use window::{Entry, Surprise, Window};

use crate::backoff::{Backoff, Retry};
use crate::config::{Config, Mqtt};
use crate::state::{Command, Shared};
use crate::store::{StoreError, StoreHandle};
use announce::Announcements;

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("{0}")]
    Connection(Box<rumqttc::ConnectionError>),
    #[error("{0}")]
    Connection5(Box<rumqttc::v5::ConnectionError>),
    #[error("the broker refused the connection: {0}")]
    Refused(String),
    #[error("the broker disconnected us: {reason}{}", .detail.as_ref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Disconnected {
        reason: String,
        detail: Option<String>,
    },
    #[error("no CONNACK within {0:?}")]
    ConnectTimeout(Duration),
    #[error("client: {0}")]
    Client(#[from] rumqttc::ClientError),
    #[error("client: {0}")]
    Client5(Box<rumqttc::v5::ClientError>),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("nothing acknowledged for {quiet:?} while packet {pkid} awaits its acknowledgement")]
    AckTimeout { pkid: u16, quiet: Duration },
    #[error("the broker turned a publish down for now: {0}; sent again after a pause")]
    Busy(link::Refusal),
}

impl From<rumqttc::ConnectionError> for UplinkError {
    fn from(e: rumqttc::ConnectionError) -> Self {
        match e {
            rumqttc::ConnectionError::ConnectionRefused(code) => {
                UplinkError::Refused(link::words(code))
            }
            e => UplinkError::Connection(Box::new(e)),
        }
    }
}

impl From<rumqttc::v5::ClientError> for UplinkError {
    fn from(e: rumqttc::v5::ClientError) -> Self {
        UplinkError::Client5(Box::new(e))
    }
}

impl From<rumqttc::v5::ConnectionError> for UplinkError {
    fn from(e: rumqttc::v5::ConnectionError) -> Self {
        use rumqttc::v5::{ConnectionError as C, StateError as S};
        match e {
            C::ConnectionRefused(code) | C::MqttState(S::ConnFail { reason: code }) => {
                UplinkError::Refused(link::words(code))
            }
            C::MqttState(S::ServerDisconnect {
                reason_code,
                reason_string,
            }) => UplinkError::Disconnected {
                reason: link::words(reason_code),
                detail: reason_string,
            },
            e => UplinkError::Connection5(Box::new(e)),
        }
    }
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

/// The uplink of one configuration: what it publishes, where, and how.
pub struct Uplink {
    mqtt: Mqtt,
    gateway_id: String,
    status_topic: String,
    store: StoreHandle,
    tuning: Tuning,
    /// Messages per second taken from the queue; None: as fast as acknowledgements allow.
    replay_rate: Option<f64>,
    /// How often the retained `status/stats` message goes out.
    status_interval: Duration,
    started: std::time::Instant,
    /// Figures, device availability and liveness shared with the pollers.
    shared: Shared,
    /// Each Modbus device's bus task, for commands.
    commands: HashMap<String, mpsc::Sender<Command>>,
    /// `…/set` topic → (device, point index, point).
    set_topics: HashMap<String, (String, usize, crate::mapping::Point)>,
    /// Home Assistant discovery, if configured.
    discovery: Option<Announcements>,
    /// Commands handed to a bus task and not yet answered: waited for at shutdown, so their
    /// results go out before `offline`.
    pending_commands: tokio_util::task::TaskTracker,
    /// The gateway's own stop. When the uplink is stopped without it, the gateway is reloading:
    /// no `offline` is published, the next uplink says `online` again at once.
    gateway_stop: CancellationToken,
    /// MQTT 5: a reading's topic → its device's `message_expiry`, seconds.
    expiry: HashMap<String, u32>,
    /// Sparkplug B, if configured.
    edge: Option<sparkplug::Edge>,
}

/// What a session achieved before it ended, for the reconnect policy.
#[derive(Debug, Default, Clone, Copy)]
struct Report {
    connected: bool,
    /// The broker acknowledged at least one publish.
    delivered: bool,
}

impl Uplink {
    /// The uplink of `config`. `commands` reaches each Modbus device's bus task; `started` is
    /// when the gateway started (for its uptime); `gateway_stop` fires when the gateway stops,
    /// as opposed to reloading.
    pub fn new(
        config: &Config,
        shared: Shared,
        tuning: Tuning,
        started: std::time::Instant,
        commands: HashMap<String, mpsc::Sender<Command>>,
        gateway_stop: CancellationToken,
    ) -> Uplink {
        Uplink {
            mqtt: config.mqtt.clone(),
            gateway_id: config.gateway.id.clone(),
            status_topic: config.gateway.status_topic(),
            store: shared.store.clone(),
            tuning,
            replay_rate: config.queue.replay_rate,
            status_interval: config.gateway.status_interval,
            started,
            shared,
            commands,
            set_topics: command_topics(config),
            pending_commands: tokio_util::task::TaskTracker::new(),
            discovery: Announcements::new(config),
            gateway_stop,
            expiry: expiry_of(config),
            edge: sparkplug::Edge::new(config),
        }
    }

    /// Whether fieldgate's own JSON topics are published (always, unless Sparkplug B is
    /// configured with `json: false`).
    fn publishes_json(&self) -> bool {
        self.edge.as_ref().is_none_or(|e| e.json)
    }

    /// Promises the watchdog to be back by `within` from now.
    fn beat(&self, within: Duration) {
        self.shared.health.beat(
            "uplink",
            std::time::Instant::now() + within + crate::systemd::SLACK,
        );
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
            if let Err(e) = &result {
                let now = crate::message::now_ms();
                let mut b = self.shared.broker.lock().expect("not poisoned");
                if b.connected || b.since_ms.is_none() {
                    b.since_ms = Some(now);
                    b.since = Some(std::time::Instant::now());
                }
                b.connected = false;
                b.last_error = Some(crate::state::ErrorNote {
                    message: e.to_string(),
                    at_ms: now,
                });
            }
            match result {
                Ok(()) => return,
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
}

/// Each published topic of a device with `message_expiry`, and its expiry in seconds.
fn expiry_of(config: &Config) -> HashMap<String, u32> {
    let mut out = HashMap::new();
    for d in &config.devices {
        let Some(e) = d.message_expiry else { continue };
        let secs = e.as_secs().clamp(1, u32::MAX as u64) as u32;
        out.insert(d.device_delivery.topic.clone(), secs);
        for p in &d.points {
            out.insert(p.delivery.topic.clone(), secs);
        }
    }
    out
}
