//! One MQTT session, from CONNECT to DISCONNECT: connect, announce, publish the queue through
//! the in-flight [`Window`], take commands, and at the end drain what is in flight and say
//! `offline`. The reconnect policy around it is in the module above.
//!
//! Inside a session, the gateway's own messages (availability, status, command results, Home
//! Assistant configs) go first from a bounded outbox; then rows, in seq order, as the window,
//! the QoS 2 limit and the replay rate allow. The next rows are read from the store while the
//! window drains, and each payload is rendered once, when it is read.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::QoS;
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

use super::link::{Aliases, Client, Ev, Events, Extras, Granted, Outbound, Refusal};
use super::ready::{
    MAX_PACKET, Publishing, Ready, TokenBucket, subscriptions, unpublishable_within, wire_bytes,
};
use super::window::{Entry, Window};
use super::{Report, Uplink, UplinkError};
use crate::store::{Batch, StoreError};

mod bookkeeping;

/// Command results waiting for the window; beyond this, new commands are refused as busy.
const RESULTS_QUEUED: usize = 64;

/// Most connection events handled in one pass of the session loop.
const EVENTS_PER_PASS: usize = 256;

/// How long a CONNACK may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the session's housekeeping runs while there is work: the acknowledgement timeout
/// checked, rows that wait for the window's byte budget or the replay rate tried again.
const TICK: Duration = Duration::from_millis(100);
/// ...and while there is none (nothing in flight, queued or to hand over): only the watchdog
/// promise is renewed. An idle gateway wakes once a second here, not ten times.
const IDLE_TICK: Duration = Duration::from_secs(1);

pub(super) fn qos(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        2 => QoS::ExactlyOnce,
        _ => QoS::AtLeastOnce,
    }
}

/// A read of the next rows from the queue, under way.
type Fetch<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Batch, StoreError>> + Send + 'a>>;

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
    client: &'a Client,
    win: Window,
    /// Rows acknowledged, not yet deleted from the queue.
    acks: Vec<u64>,
    /// Rows the broker refused (MQTT 5), to be set aside with the reason.
    refused: Vec<(u64, String)>,
    /// A refusal worth retrying later (the broker's quota) and when it came: nothing more is
    /// sent, the acknowledgements of what is in flight are awaited (briefly), then the session
    /// ends and the refused rows, still queued, go again after a pause.
    busy: Option<(Refusal, Instant)>,
    /// A refusal was logged at warn level in this session (later ones go to debug).
    refusal_logged: bool,
    /// MQTT 5 topic aliases of this connection.
    aliases: Aliases,
    /// The largest packet the broker takes.
    max_packet: usize,
    /// Sparkplug B: this connection of the edge node.
    sp: Option<super::sparkplug::SpSession>,
    /// Rows sent both as JSON and as Sparkplug: acknowledgements still awaited per seq.
    pairs: HashMap<u64, u8>,
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
        let filters: Vec<String> = self.set_topics.keys().cloned().collect();
        let mut limit = self.mqtt.inflight as usize;
        // Room for the whole window, the subscriptions and the odd control message: try_publish
        // never finds the request channel full.
        let capacity = limit + filters.len().div_ceil(64) + 1 + 16;
        let mut ids = Window::id_space(self.mqtt.inflight);
        if self.mqtt.insecure_skip_verify && self.mqtt.tls.is_some() {
            tracing::warn!(broker = %self.mqtt.host, "TLS SERVER CERTIFICATE NOT VERIFIED (insecure_skip_verify): anyone on the path can read and forge this link; lab use only");
        }
        // Sparkplug: a new bdSeq per connection, in the Will (NDEATH) and the NBIRTH.
        let bd_seq = self.edge.as_ref().map(|e| e.next_bd_seq());
        let will = match (&self.edge, bd_seq) {
            (Some(edge), Some(bd)) => {
                let (topic, payload) = edge.will(bd);
                (topic, payload, false)
            }
            _ => (self.status_topic.clone(), b"offline".to_vec(), true),
        };
        let broker = self.shared.broker.clone();
        let on_discard: super::wire::OnDiscard = Arc::new(move |d: &super::wire::Discarded| {
            let mut b = broker.lock().expect("not poisoned");
            b.discarded_incoming += 1;
            // Once per topic per session would still flood on a loop; the count says the rest.
            if b.discarded_incoming <= 10 || b.discarded_incoming.is_power_of_two() {
                tracing::warn!(
                    topic = d.topic.as_deref().unwrap_or("(not a publish)"),
                    bytes = d.bytes,
                    max = MAX_PACKET,
                    discarded = b.discarded_incoming,
                    "a packet from the broker larger than the gateway takes was read past and dropped (a retained message on a command topic? clear it with `mosquitto_pub -r -n -t TOPIC`)"
                );
            }
        });
        let (client, mut events) =
            super::link::connect(&self.mqtt, ids, MAX_PACKET, will, capacity, on_discard);
        let Some(granted) = events.connected(cancel, CONNECT_TIMEOUT).await? else {
            return Ok(());
        };
        // The broker's Receive Maximum caps the window; rumqttc's packet ids wrap there too.
        if let Some(rm) = granted.receive_max {
            limit = limit.min(rm as usize).max(1);
            ids = ids.min(rm.max(1));
        }
        let max_packet = granted
            .max_packet
            .map_or(MAX_PACKET, |m| (m as usize).min(MAX_PACKET));
        report.connected = true;
        {
            let mut b = self.shared.broker.lock().expect("not poisoned");
            b.connected = true;
            b.since_ms = Some(crate::message::now_ms());
            b.since = Some(std::time::Instant::now());
        }
        let (backlog, queued_upto) = self
            .store
            .stats()
            .await
            .map(|s| (s.depth, s.last_seq))
            .unwrap_or((0, 0));
        tracing::info!(broker = %format!("{}:{}", self.mqtt.host, self.mqtt.port), client_id = %self.mqtt.client_id, backlog,
            protocol = %self.mqtt.protocol, down_for = ?down_since.map(|t| t.elapsed()), "MQTT uplink connected");
        if granted != Granted::default() {
            tracing::debug!(receive_max = ?granted.receive_max, max_packet = ?granted.max_packet,
                topic_alias_max = granted.alias_max, window = limit, "the broker's limits");
        }

        let mut s = Session {
            client: &client,
            win: Window::new(limit, ids, self.mqtt.keep_alive, Instant::now()),
            acks: Vec::new(),
            refused: Vec::new(),
            busy: None,
            refusal_logged: false,
            aliases: Aliases::new(granted.alias_max),
            max_packet,
            sp: bd_seq.map(|bd| super::sparkplug::SpSession::new(bd, queued_upto)),
            pairs: HashMap::new(),
            surprised: false,
            outbox: VecDeque::new(),
            announcing: VecDeque::new(),
            announced: HashMap::new(),
        };
        let json = self.publishes_json();
        if json {
            s.control(&self.status_topic, b"online".to_vec(), true)?;
            // Commands: every point's `…/set` (a non-writable one gets a refusal, not silence),
            // in SUBSCRIBE packets the broker takes; a filter that alone is too large is left
            // out and said (#28: it used to end every session before the first reading).
            let (batches, too_large) = subscriptions(&filters, max_packet);
            for f in &too_large {
                tracing::warn!(filter = %f, max_packet, "a command topic is longer than the broker's maximum packet size; not subscribed (commands to that point cannot arrive)");
            }
            for batch in batches {
                client.subscribe(batch)?;
                s.win.subscribed();
            }
        }
        if let (Some(edge), Some(sp)) = (&self.edge, s.sp.as_mut()) {
            client.subscribe(edge.command_topics())?;
            s.win.subscribed();
            let births = sp.births(edge, |d| self.shared.device_values(d));
            s.outbox.extend(births);
        }
        if let Some(a) = &self.discovery {
            client.subscribe(vec![a.status_topic().to_string()])?;
            s.win.subscribed();
            s.announcing = a.messages();
        }
        // Command results, published as the window allows; bounded.
        let (results_tx, mut results) = mpsc::channel::<Outbound>(RESULTS_QUEUED);
        let how = Publishing {
            max_packet,
            v5: self.mqtt.protocol == crate::config::Protocol::V5,
            expiry: &self.expiry,
        };
        let result = self
            .publish(&mut s, &how, &mut events, &results_tx, &mut results, cancel)
            .await;
        report.delivered |= s.win.acknowledged() > 0;
        s.flush(&self.store)?;
        result?;
        self.close(s, events, results).await
    }

    /// Publishes until cancelled (Ok) or until the session breaks (Err).
    async fn publish(
        &self,
        s: &mut Session<'_>,
        how: &Publishing<'_>,
        events: &mut Events,
        results_tx: &mpsc::Sender<Outbound>,
        results: &mut mpsc::Receiver<Outbound>,
        cancel: &CancellationToken,
    ) -> Result<(), UplinkError> {
        let mut committed = self.store.committed();
        let mut availability = self.shared.availability.watch();
        let batch = (self.mqtt.inflight as usize).max(64);
        // From the first row still queued: the last session's unacknowledged rows included.
        self.store.new_reader();
        let mut rows = Rows {
            cursor: 0,
            drained: false,
            ready: VecDeque::new(),
            fetch: None,
            batch,
        };
        let mut ticked = Instant::now();
        let tick = tokio::time::sleep_until(ticked + TICK);
        tokio::pin!(tick);
        let mut bucket = self.replay_rate.map(TokenBucket::new);
        let mut status = tokio::time::interval(self.status_interval);
        status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Device availability to publish: everything known on connect, then on each change.
        let mut availability_due = true;
        let mut arrived = Vec::with_capacity(EVENTS_PER_PASS);
        let mut beaten = Instant::now();
        self.beat(IDLE_TICK);
        loop {
            let now = Instant::now();
            // The loop comes round at least every IDLE_TICK (the tick below), so that is the
            // promise to the watchdog; renewed once per TICK, not once per acknowledgement.
            if now.saturating_duration_since(beaten) >= TICK {
                self.beat(IDLE_TICK);
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
                // Caught up: the rows just committed, from memory; else from the file.
                match self.store.take_fresh(rows.cursor, batch) {
                    Some(read) => self.take_rows(s, &mut rows, read, how)?,
                    None => rows.fetch = Some(Box::pin(self.store.peek(rows.cursor, batch))),
                }
            }
            // Sparkplug: no reading overtakes a birth or a death (its `seq` is already set).
            if s.busy.is_none() && (s.sp.is_none() || s.outbox.is_empty()) {
                self.submit_rows(s, &mut rows, bucket.as_mut(), now)?;
            }
            if rows.drained
                && rows.ready.is_empty()
                && s.sp.as_mut().is_some_and(|sp| sp.take_recheck())
            {
                availability_due = true;
            }
            // Nothing of the session waits to be sent (a quota pause counts as waiting).
            let nothing_waits = rows.ready.is_empty()
                && s.outbox.is_empty()
                && s.announcing.is_empty()
                && !availability_due
                && s.busy.is_none();
            let idle =
                nothing_waits && s.win.is_empty() && s.acks.is_empty() && s.refused.is_empty();
            // Nor will the store's next rows: the loop may gather acknowledgements before
            // reading them (fewer wake-ups); anything waiting, and it reads at once.
            s.client.unhurried(nothing_waits && rows.drained);
            let due = ticked + if idle { IDLE_TICK } else { TICK };
            if tick.deadline() != due {
                tick.as_mut().reset(due);
            }
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                // Every event waiting, in one pass of the loop: a burst of acknowledgements
                // is handled together instead of one loop round (and one look at every other
                // source) each.
                n = events.recv_many(&mut arrived, EVENTS_PER_PASS) => {
                    if n == 0 {
                        return Err(UplinkError::ConnectTimeout(CONNECT_TIMEOUT));
                    }
                    for ev in arrived.drain(..) {
                        self.on_event(s, ev?, results_tx);
                    }
                }
                Some(result) = results.recv(), if s.outbox.len() < RESULTS_QUEUED => {
                    // Sparkplug only: the host sees a write's outcome as the new DDATA value.
                    if self.publishes_json() {
                        s.outbox.push_back(result);
                    }
                }
                read = async { rows.fetch.as_mut().expect("guarded").await }, if rows.fetch.is_some() => {
                    rows.fetch = None;
                    self.take_rows(s, &mut rows, read?, how)?;
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
                _ = &mut tick => {
                    ticked = Instant::now();
                    if let Some((pkid, quiet)) = s.win.stuck(Instant::now(), self.tuning.ack_timeout) {
                        return Err(UplinkError::AckTimeout { pkid, quiet });
                    }
                }
            }
            // Acknowledged rows go to the store after every pass: handing them over takes a
            // lock, not a wake-up of its thread (which deletes them with its next commit), and
            // with nothing left to hand over the session goes idle as soon as the window is
            // empty instead of ticking on.
            if !s.acks.is_empty() || !s.refused.is_empty() {
                s.flush(&self.store)?;
            }
            if let Some((r, since)) = s.busy
                && (s.win.rows_in_flight() == 0 || since.elapsed() >= self.tuning.drain_timeout)
            {
                s.flush(&self.store)?;
                return Err(UplinkError::Busy(r));
            }
        }
    }

    /// Applies one event of the connection: a publish from the broker (a command, a Sparkplug
    /// request, Home Assistant's status) or one of the window's.
    fn on_event(&self, s: &mut Session<'_>, ev: Ev, results_tx: &mpsc::Sender<Outbound>) {
        let Ev::Message {
            topic,
            payload,
            retain,
        } = ev
        else {
            return s.handle(ev);
        };
        if let Some(requests) = self
            .edge
            .as_ref()
            .and_then(|e| e.requests(&topic, &payload))
        {
            return self.sparkplug_requests(s, requests, results_tx);
        }
        // Home Assistant (re)started: it forgot the configs.
        match &self.discovery {
            Some(a) if topic == a.status_topic() => {
                if payload == b"online" {
                    s.announcing = a.messages();
                }
            }
            _ => self.command(&topic, &payload, retain, results_tx),
        }
    }

    /// Carries out what a Sparkplug host asked: a rebirth, or writes through the checked
    /// command path of `…/set` (their read-back reaches the host as DDATA).
    fn sparkplug_requests(
        &self,
        s: &mut Session<'_>,
        requests: Vec<crate::sparkplug::Request>,
        results: &mpsc::Sender<Outbound>,
    ) {
        use crate::sparkplug::Request;
        for r in requests {
            match r {
                Request::Rebirth => {
                    if let (Some(edge), Some(sp)) = (&self.edge, s.sp.as_mut()) {
                        // One rebirth pending at a time (#28): a host, or anyone allowed on
                        // NCMD, asking a thousand times gets the births once: a set still
                        // waiting in the outbox answers every request made meanwhile.
                        let nbirth = edge.node.topic("NBIRTH");
                        if s.outbox.iter().any(|(t, _, _)| *t == nbirth) {
                            tracing::debug!(
                                "Sparkplug: rebirth requested again while one is pending; coalesced"
                            );
                            continue;
                        }
                        tracing::info!("Sparkplug: rebirth requested by a host");
                        let births = sp.births(edge, |d| self.shared.device_values(d));
                        s.outbox.extend(births);
                    }
                }
                Request::Write {
                    device,
                    point,
                    value,
                } => {
                    let topic = self
                        .set_topics
                        .iter()
                        .find(|(_, (d, i, _))| *d == device && *i == point)
                        .map(|(t, _)| t.clone());
                    if let Some(topic) = topic {
                        let body = serde_json::json!({ "value": value }).to_string();
                        self.command(&topic, body.as_bytes(), false, results);
                    }
                }
                Request::Ignored(why) => {
                    tracing::warn!(reason = %why, "Sparkplug command ignored")
                }
            }
        }
    }

    /// Publishes the device availability not yet published; Ok(true) when all of it went out
    /// (Ok(false): the window was full, try again on the next pass). Sparkplug: a device that
    /// answers is born (DBIRTH), one that stopped answering dies (DDEATH).
    fn send_availability(&self, s: &mut Session<'_>, now: Instant) -> Result<bool, UplinkError> {
        let mut all = true;
        let json = self.publishes_json();
        for (topic, online, version) in self.shared.availability.snapshot() {
            let body: &[u8] = if online { b"online" } else { b"offline" };
            if let (Some(edge), Some(sp)) = (&self.edge, s.sp.as_mut())
                && let Some(device) = edge.device_of(&topic)
                && let Some(msg) =
                    sp.availability(edge, device, online, |d| self.shared.device_values(d))
            {
                s.outbox.push_back(msg);
            }
            if s.announced.get(&topic) == Some(&version) {
                continue;
            }
            if !json {
                s.announced.insert(topic, version);
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
            if !s.win.can_submit(next.qos, next.bytes(&next.topic), now)
                || (next.qos == 2 && s.win.qos2_in_flight() >= self.mqtt.inflight_qos2 as usize)
                || !bucket
                    .as_mut()
                    .is_none_or(|b| b.take(std::time::Instant::now()))
            {
                break;
            }
            let mut next = rows.ready.pop_front().expect("front exists");
            if let Some(r) = next.sp.take() {
                let (Some(edge), Some(sp)) = (&self.edge, s.sp.as_mut()) else {
                    continue;
                };
                if let Some(device) = sp.device_of_row(edge, &r)
                    && !sp.is_born(device)
                {
                    // Born first; the reading goes after the DBIRTH.
                    let birth =
                        sp.birth_for_reading(edge, device, &self.shared.device_values(device));
                    s.outbox.push_back(birth);
                    next.sp = Some(r);
                    rows.ready.push_front(next);
                    break;
                }
                match sp.ddata(edge, next.seq, &r) {
                    // Larger than the broker takes (a string metric, a small limit): set aside
                    // like any reading that can never be published, not handed to the client.
                    Some((topic, payload))
                        if let Some(why) =
                            unpublishable_within(&topic, payload.len(), s.max_packet) =>
                    {
                        tracing::error!(seq = next.seq, %topic, reason = %why,
                            "a queued reading can never be published as Sparkplug DDATA; set aside in the queue file (`fieldgate queue aside`)");
                        s.pairs.remove(&next.seq);
                        s.refused.push((next.seq, why));
                    }
                    Some((topic, payload)) => {
                        let bytes = wire_bytes(&topic, payload.len());
                        s.client.publish(
                            topic,
                            qos(next.qos),
                            false,
                            payload,
                            Extras::default(),
                        )?;
                        s.win.submit(
                            Entry::Row {
                                seq: next.seq,
                                qos: next.qos,
                            },
                            bytes,
                        );
                    }
                    // Nothing in it is a metric: done as far as Sparkplug goes.
                    None => s.done(next.seq),
                }
                self.store.in_flight_upto(next.seq);
                continue;
            }
            let (topic, alias) = s.aliases.apply(std::mem::take(&mut next.topic));
            next.extras.alias = alias;
            let bytes = next.bytes(&topic);
            s.client
                .publish(topic, qos(next.qos), next.retain, next.payload, next.extras)?;
            s.win.submit(
                Entry::Row {
                    seq: next.seq,
                    qos: next.qos,
                },
                bytes,
            );
            // Rows go out in seq order: everything up to here may be in flight.
            self.store.in_flight_upto(next.seq);
        }
        Ok(())
    }

    /// Takes rows read from the queue: each payload is rendered once, here; a row the broker
    /// could never take is set aside instead of blocking the ones behind it.
    fn take_rows(
        &self,
        s: &mut Session<'_>,
        rows: &mut Rows<'_>,
        read: Batch,
        how: &Publishing<'_>,
    ) -> Result<(), UplinkError> {
        rows.drained = read.rows.len() < rows.batch;
        rows.cursor = rows.cursor.max(read.upto);
        // Message expiry counts the time queued up to now (std's clock: the queue's).
        let now = std::time::Instant::now();
        for row in read.rows {
            // Sparkplug: the reading as DDATA (encoded when it is sent: its `seq` is the
            // node's), and as JSON too unless the gateway speaks Sparkplug only.
            let sp = self.edge.as_ref().and_then(|e| e.row(&row));
            let json = self.publishes_json() || sp.is_none();
            if let Some(sp) = sp {
                rows.ready.push_back(Ready {
                    seq: row.seq,
                    topic: String::new(),
                    qos: row.message.qos,
                    retain: false,
                    payload: Vec::new(),
                    extras: Extras::default(),
                    sp: Some(sp),
                });
                if json {
                    s.pairs.insert(row.seq, 2);
                }
            }
            if !json {
                continue;
            }
            match Ready::new(row, how, now) {
                Ok(r) => rows.ready.push_back(r),
                Err((seq, topic, why)) => {
                    tracing::error!(seq, %topic, reason = %why,
                        "a queued reading can never be published; set aside in the queue file (`fieldgate queue aside`)");
                    self.store.set_aside(vec![(seq, why)])?;
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
        if stopping && self.publishes_json() {
            // If the publish cannot even be handed over, there is nothing to wait for.
            let _ = s.control(&self.status_topic, b"offline".to_vec(), true);
        }
        // Sparkplug: a clean disconnect sends no Will, so the NDEATH is published here.
        if let (Some(edge), Some(sp)) = (&self.edge, &s.sp) {
            let (topic, payload) = edge.will(sp.bd_seq);
            let _ = s.control(&topic, payload, false);
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
        s.flush(&self.store)?;
        let left = s.win.rows_in_flight();
        let _ = s.client.disconnect();
        let _ = timeout(Duration::from_millis(500), async {
            while let Some(Ok(ev)) = events.recv().await {
                if matches!(ev, Ev::DisconnectSent) {
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
