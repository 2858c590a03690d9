//! One MQTT session, from CONNECT to DISCONNECT: connect, announce, publish the queue through
//! the in-flight [`Window`], take commands, and at the end drain what is in flight and say
//! `offline`. The reconnect policy around it is in the module above.
//!
//! Inside a session, the gateway's own messages (availability, status, command results, Home
//! Assistant configs) go first from a bounded outbox; then rows, in seq order, as the window,
//! the QoS 2 limit and the replay rate allow. The next rows are read from the store while the
//! window drains, and each payload is rendered once, when it is read.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use rumqttc::{AsyncClient, ConnectReturnCode, Event, EventLoop, Outgoing, Packet, QoS};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

use super::window::{Entry, Window};
use super::{Report, Uplink, UplinkError};
use crate::message::Stored;
use crate::store::StoreError;

/// A message of the gateway's own, waiting for room in the window: topic, payload, retain.
pub type Outbound = (String, Vec<u8>, bool);

/// Command results waiting for the window; beyond this, new commands are refused as busy.
const RESULTS_QUEUED: usize = 64;

/// Largest packet the uplink sends (and accepts).
pub const MAX_PACKET: usize = 1 << 20;

/// How long a CONNACK may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) fn qos(q: u8) -> QoS {
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

/// rumqttc's events, from its event loop running in a task of its own (so that nothing here
/// cancels a half-written packet). The task stops when this is dropped.
struct Events {
    rx: mpsc::Receiver<Result<Event, rumqttc::ConnectionError>>,
    pump: tokio::task::JoinHandle<()>,
}

impl Events {
    fn spawn(mut eventloop: EventLoop, capacity: usize) -> Events {
        let (tx, rx) = mpsc::channel(capacity);
        let pump = tokio::spawn(async move {
            loop {
                let ev = eventloop.poll().await;
                let stop = ev.is_err();
                if tx.send(ev).await.is_err() || stop {
                    break;
                }
            }
        });
        Events { rx, pump }
    }

    async fn recv(&mut self) -> Option<Result<Event, rumqttc::ConnectionError>> {
        self.rx.recv().await
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        self.pump.abort();
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

/// Where the session is in the queue.
struct Rows<'a> {
    /// Highest seq read from the queue in this session.
    cursor: u64,
    /// The queue held nothing past `cursor` at the last look.
    drained: bool,
    /// Read, not yet submitted.
    ready: VecDeque<Ready>,
    /// A read of the queue under way.
    fetch: Option<Fetch<'a>>,
    batch: usize,
}

/// One connection's publishing state: the client, the window, acknowledged rows to delete.
struct Session<'a> {
    client: &'a AsyncClient,
    win: Window,
    /// Rows acknowledged, not yet deleted from the queue.
    acks: Vec<u64>,
    /// A surprise was logged at warn level in this session (later ones go to debug).
    surprised: bool,
    /// The gateway's status and command results waiting for room in the window (first in line).
    outbox: VecDeque<Outbound>,
    /// Home Assistant configs still to publish.
    announcing: VecDeque<Outbound>,
    /// The availability version last published, per topic.
    announced: HashMap<String, u64>,
}

impl Uplink {
    /// One session: connect, publish until cancelled or broken, then (when cancelled) drain.
    pub(super) async fn session(
        &self,
        cancel: &CancellationToken,
        report: &mut Report,
        down_since: Option<Instant>,
    ) -> Result<(), UplinkError> {
        let filters: Vec<rumqttc::SubscribeFilter> = self
            .set_topics
            .keys()
            .map(|t| rumqttc::SubscribeFilter::new(t.clone(), QoS::AtLeastOnce))
            .collect();
        let limit = self.mqtt.inflight as usize;
        // Room for the whole window, the subscriptions and the odd control message: try_publish
        // never finds the request channel full.
        let capacity = limit + filters.len().div_ceil(64) + 1 + 16;
        let (client, mut eventloop) = AsyncClient::new(self.options(), capacity);
        // Small PUBLISHes paced by acknowledgements: with Nagle on, each waits for the peer's
        // (delayed) ACK of the one before, and a 50 ms link behaved like a 100 ms one.
        let mut network = rumqttc::NetworkOptions::new();
        network.set_tcp_nodelay(true);
        eventloop.set_network_options(network);
        let mut events = Events::spawn(eventloop, capacity);
        if !connected(&mut events, cancel).await? {
            return Ok(());
        }
        report.connected = true;
        {
            let mut b = self.shared.broker.lock().expect("not poisoned");
            b.connected = true;
            b.since_ms = Some(crate::message::now_ms());
        }
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
            outbox: VecDeque::new(),
            announcing: VecDeque::new(),
            announced: HashMap::new(),
        };
        s.control(&self.status_topic, b"online".to_vec(), true)?;
        // Commands: every point's `…/set` (a non-writable one gets a refusal, not silence).
        for chunk in filters.chunks(64) {
            client.try_subscribe_many(chunk.to_vec())?;
            s.win.subscribed();
        }
        if let Some(a) = &self.discovery {
            client.try_subscribe(a.status_topic(), QoS::AtLeastOnce)?;
            s.win.subscribed();
            s.announcing = a.messages();
        }
        // Command results, published as the window allows; bounded.
        let (results_tx, mut results) = mpsc::channel::<Outbound>(RESULTS_QUEUED);
        let result = self
            .publish(&mut s, &mut events, &results_tx, &mut results, cancel)
            .await;
        report.delivered |= s.win.acknowledged() > 0;
        self.store.ack(std::mem::take(&mut s.acks))?;
        result?;
        self.close(s, events, results).await
    }

    /// Publishes until cancelled (Ok) or until the session breaks (Err).
    async fn publish(
        &self,
        s: &mut Session<'_>,
        events: &mut Events,
        results_tx: &mpsc::Sender<Outbound>,
        results: &mut mpsc::Receiver<Outbound>,
        cancel: &CancellationToken,
    ) -> Result<(), UplinkError> {
        let mut committed = self.store.committed();
        let mut availability = self.shared.availability.watch();
        let batch = (self.mqtt.inflight as usize).max(64);
        let mut rows = Rows {
            cursor: 0,
            drained: false,
            ready: VecDeque::new(),
            fetch: None,
            batch,
        };
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut bucket = self.replay_rate.map(TokenBucket::new);
        let mut status = tokio::time::interval(self.status_interval);
        status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Device availability to publish: everything known on connect, then on each change.
        let mut availability_due = true;
        let mut beaten = Instant::now();
        self.beat(Duration::from_secs(1));
        loop {
            let now = Instant::now();
            // The loop comes round at least every 100 ms (the tick below); promising the
            // watchdog once per 100 ms is enough, not once per acknowledgement.
            if now.saturating_duration_since(beaten) >= Duration::from_millis(100) {
                self.beat(Duration::from_secs(1));
                beaten = now;
            }
            if availability_due {
                availability_due = !self.send_availability(s, now)?;
            }
            // The gateway's own messages go before rows: a backlog must not starve them.
            s.send_outbox(now)?;
            // The next rows are fetched while these go out: waiting for the store thread (which
            // may be in an fsync) must not leave the window empty.
            if rows.fetch.is_none() && !rows.drained && rows.ready.len() < batch / 2 {
                committed.borrow_and_update();
                rows.fetch = Some(Box::pin(self.store.peek(rows.cursor, batch)));
            }
            self.submit_rows(s, &mut rows, bucket.as_mut(), now)?;
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                ev = events.recv() => match ev {
                    None => return Err(UplinkError::ConnectTimeout(CONNECT_TIMEOUT)),
                    Some(Err(e)) => return Err(e.into()),
                    Some(Ok(Event::Incoming(Packet::Publish(p)))) => {
                        // Home Assistant (re)started: it forgot the configs.
                        match &self.discovery {
                            Some(a) if p.topic == a.status_topic() => {
                                if p.payload.as_ref() == b"online" {
                                    s.announcing = a.messages();
                                }
                            }
                            _ => self.command(p, results_tx),
                        }
                    }
                    Some(Ok(ev)) => s.handle(ev),
                },
                Some(result) = results.recv(), if s.outbox.len() < RESULTS_QUEUED => {
                    s.outbox.push_back(result);
                }
                read = async { rows.fetch.as_mut().expect("guarded").await }, if rows.fetch.is_some() => {
                    rows.fetch = None;
                    self.take_rows(&mut rows, read?)?;
                }
                changed = committed.changed(), if rows.drained => {
                    if changed.is_err() {
                        return Err(UplinkError::Store(StoreError::Closed));
                    }
                    rows.drained = false;
                }
                _ = availability.changed() => availability_due = true,
                _ = status.tick() => {
                    let payload = crate::status::Snapshot::take(&self.shared, self.started)
                        .await?
                        .for_broker();
                    let topic = crate::topics::gateway_stats(&self.gateway_id);
                    // One status message waiting is enough: a newer one replaces it.
                    s.outbox.retain(|(t, _, _)| *t != topic);
                    s.outbox.push_back((topic, payload, true));
                }
                _ = tick.tick() => {
                    // Deletes are batched per tick: few fsyncs, and a crash re-sends at most
                    // one tick's worth of acknowledged rows.
                    self.store.ack(std::mem::take(&mut s.acks))?;
                    if let Some((pkid, quiet)) = s.win.stuck(Instant::now(), self.tuning.ack_timeout) {
                        return Err(UplinkError::AckTimeout { pkid, quiet });
                    }
                }
            }
            if s.acks.len() >= 256 {
                self.store.ack(std::mem::take(&mut s.acks))?;
            }
        }
    }

    /// Publishes the device availability not yet published; Ok(true) when all of it went out
    /// (Ok(false): the window was full, try again on the next pass).
    fn send_availability(&self, s: &mut Session<'_>, now: Instant) -> Result<bool, UplinkError> {
        let mut all = true;
        for (topic, online, version) in self.shared.availability.snapshot() {
            let body: &[u8] = if online { b"online" } else { b"offline" };
            if s.announced.get(&topic) == Some(&version) {
                continue;
            }
            if s.win.can_submit(1, wire_bytes(&topic, body.len()), now) {
                s.control(&topic, body.to_vec(), true)?;
                s.announced.insert(topic, version);
            } else {
                all = false;
            }
        }
        Ok(all)
    }

    /// Keeps the window full of rows, in seq order, within the QoS 2 limit and the replay rate.
    fn submit_rows(
        &self,
        s: &mut Session<'_>,
        rows: &mut Rows<'_>,
        mut bucket: Option<&mut TokenBucket>,
        now: Instant,
    ) -> Result<(), UplinkError> {
        while let Some(next) = rows.ready.front() {
            if !s.win.can_submit(next.qos, next.bytes, now)
                || (next.qos == 2 && s.win.qos2_in_flight() >= self.mqtt.inflight_qos2 as usize)
                || !bucket
                    .as_mut()
                    .is_none_or(|b| b.take(std::time::Instant::now()))
            {
                break;
            }
            let next = rows.ready.pop_front().expect("front exists");
            s.client
                .try_publish(next.topic, qos(next.qos), next.retain, next.payload)?;
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
        Ok(())
    }

    /// Takes rows read from the queue: each payload is rendered once, here; a row the broker
    /// could never take is set aside instead of blocking the ones behind it.
    fn take_rows(&self, rows: &mut Rows<'_>, read: Vec<Stored>) -> Result<(), UplinkError> {
        rows.drained = read.len() < rows.batch;
        if let Some(last) = read.last() {
            rows.cursor = last.seq;
        }
        for row in read {
            match Ready::new(row) {
                Ok(r) => rows.ready.push_back(r),
                Err((seq, topic, why)) => {
                    tracing::error!(seq, %topic, reason = %why,
                        "a queued reading can never be published; set aside in the queue file (table aside)");
                    self.store.set_aside(vec![seq])?;
                }
            }
        }
        Ok(())
    }

    /// Shutdown: waits briefly for what is in flight, says offline (not on a reload), disconnects. Command results
    /// go out first: a command handed to a bus task gets its answer (the bus task answers the
    /// ones it did not carry out as it stops).
    async fn close(
        &self,
        mut s: Session<'_>,
        mut events: Events,
        mut results: mpsc::Receiver<Outbound>,
    ) -> Result<(), UplinkError> {
        self.pending_commands.close();
        let _ = timeout(self.tuning.drain_timeout, self.pending_commands.wait()).await;
        while let Ok(result) = results.try_recv() {
            s.outbox.push_back(result);
        }
        for (topic, payload, retain) in std::mem::take(&mut s.outbox) {
            if s.control(&topic, payload, retain).is_err() {
                break;
            }
        }
        let deadline = Instant::now() + self.tuning.drain_timeout;
        // A reload is not an outage: the next uplink connects at once and says `online`, so no
        // `offline` in between (Home Assistant entities would blink unavailable). A clean
        // DISCONNECT keeps the broker from publishing the Will.
        let stopping = self.gateway_stop.is_cancelled();
        if stopping {
            // If the publish cannot even be handed over, there is nothing to wait for.
            let _ = s.control(&self.status_topic, b"offline".to_vec(), true);
        }
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
        let _ = s.client.try_disconnect();
        let _ = timeout(Duration::from_millis(500), async {
            while let Some(Ok(ev)) = events.recv().await {
                if matches!(ev, Event::Outgoing(Outgoing::Disconnect)) {
                    break;
                }
            }
        })
        .await;
        tracing::info!(
            unacknowledged_rows_kept = left,
            reloading = !stopping,
            "MQTT uplink closed"
        );
        Ok(())
    }
}

/// Waits for the CONNACK: Ok(true) when connected, Ok(false) when cancelled first.
async fn connected(events: &mut Events, cancel: &CancellationToken) -> Result<bool, UplinkError> {
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    loop {
        let ev = tokio::select! {
            _ = cancel.cancelled() => return Ok(false),
            ev = timeout(deadline.saturating_duration_since(Instant::now()), events.recv()) => ev,
        };
        match ev {
            Err(_) | Ok(None) => return Err(UplinkError::ConnectTimeout(CONNECT_TIMEOUT)),
            Ok(Some(Err(e))) => return Err(e.into()),
            Ok(Some(Ok(Event::Incoming(Packet::ConnAck(ack))))) => {
                if ack.code != ConnectReturnCode::Success {
                    return Err(UplinkError::Refused(ack.code));
                }
                return Ok(true);
            }
            Ok(Some(Ok(_))) => {}
        }
    }
}

/// Publishes a message of the gateway's own (QoS 1) and counts it in the window.
fn control(
    client: &AsyncClient,
    win: &mut Window,
    topic: &str,
    payload: Vec<u8>,
    retain: bool,
) -> Result<(), UplinkError> {
    let bytes = wire_bytes(topic, payload.len());
    client.try_publish(topic, QoS::AtLeastOnce, retain, payload)?;
    win.submit(Entry::Control { qos: 1 }, bytes);
    Ok(())
}

impl Session<'_> {
    /// Publishes a message of the gateway's own (QoS 1) and counts it in the window.
    fn control(&mut self, topic: &str, payload: Vec<u8>, retain: bool) -> Result<(), UplinkError> {
        control(self.client, &mut self.win, topic, payload, retain)
    }

    /// Publishes the outbox, then the Home Assistant configs, oldest first, while the window
    /// has room for them.
    fn send_outbox(&mut self, now: Instant) -> Result<(), UplinkError> {
        let Session {
            client,
            win,
            outbox,
            announcing,
            ..
        } = self;
        for queue in [outbox, announcing] {
            while let Some((t, body, _)) = queue.front() {
                if !win.can_submit(1, wire_bytes(t, body.len()), now) {
                    return Ok(());
                }
                let (t, body, retain) = queue.pop_front().expect("front exists");
                control(client, win, &t, body, retain)?;
            }
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
