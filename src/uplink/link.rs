//! The two MQTT protocol versions behind one face: the session talks to a [`Client`] and reads
//! [`Ev`]ents, whichever is underneath. Both run on our own I/O loop around rumqttc's packets
//! and session state (`wire`: every waiting request in one write).
//!
//! What differs is kept here: the options each version connects with, how a broker's refusal
//! reads (a 3.1.1 PUBACK cannot refuse; an MQTT 5 PUBACK, PUBREC or PUBCOMP carries a reason
//! code), what the CONNACK grants (MQTT 5: Receive Maximum, Maximum Packet Size, Topic Alias
//! Maximum), and the properties a v5 publish may carry (topic alias, message expiry, user
//! properties). Reason codes are turned into words for the logs and the `aside` table.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::v5::mqttbytes::v5 as p5;
use rumqttc::{Event, Outgoing, Packet, QoS};
use tokio::sync::mpsc;

use super::UplinkError;
use crate::config::{Mqtt, Protocol};

/// A message of the gateway's own, waiting for room in the window: topic, payload, retain.
pub type Outbound = (String, Vec<u8>, bool);

/// What the broker's CONNACK allows this session (MQTT 5; nothing under 3.1.1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Granted {
    /// Most QoS 1/2 publishes the broker takes unacknowledged at once.
    pub receive_max: Option<u16>,
    /// Largest packet the broker accepts.
    pub max_packet: Option<u32>,
    /// Highest topic alias the broker accepts (0: none).
    pub alias_max: u16,
}

/// A broker's refusal of one publish: an MQTT 5 reason code of 0x80 or above.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal(pub u8);

impl Refusal {
    /// The reason in words, as the spec names it (MQTT 5.0, 3.4.2.1 and 3.5.2.1).
    pub fn words(self) -> &'static str {
        match self.0 {
            0x80 => "unspecified error",
            0x83 => "implementation specific error",
            0x87 => "not authorized",
            0x90 => "topic name invalid",
            0x91 => "packet identifier in use",
            0x92 => "packet identifier not found",
            0x97 => "quota exceeded",
            0x99 => "payload format invalid",
            _ => "refused",
        }
    }

    /// Worth sending again later as it is (the broker is busy, or lost track of an id), as
    /// opposed to refused for what the message is (its topic, its payload, the ACL).
    pub fn transient(self) -> bool {
        matches!(self.0, 0x91 | 0x92 | 0x97)
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (0x{:02x})", self.words(), self.0)
    }
}

/// The refusal in a PUBACK's or PUBREC's reason code (the two enums have the same variants).
macro_rules! refusal {
    ($reason:expr, $R:path) => {{
        use $R as R;
        match $reason {
            R::Success | R::NoMatchingSubscribers => None,
            R::UnspecifiedError => Some(Refusal(0x80)),
            R::ImplementationSpecificError => Some(Refusal(0x83)),
            R::NotAuthorized => Some(Refusal(0x87)),
            R::TopicNameInvalid => Some(Refusal(0x90)),
            R::PacketIdentifierInUse => Some(Refusal(0x91)),
            R::QuotaExceeded => Some(Refusal(0x97)),
            R::PayloadFormatInvalid => Some(Refusal(0x99)),
        }
    }};
}

fn puback_code(r: p5::PubAckReason) -> Option<Refusal> {
    refusal!(r, p5::PubAckReason)
}

fn pubrec_code(r: p5::PubRecReason) -> Option<Refusal> {
    refusal!(r, p5::PubRecReason)
}

/// `NotAuthorized` → "not authorized": rumqttc's reason enums, in the words of the spec.
pub fn words<T: std::fmt::Debug>(reason: T) -> String {
    let name = format!("{reason:?}");
    let mut out = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push(' ');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// One of rumqttc's events, in the terms the session cares about.
#[derive(Debug)]
pub enum Ev {
    /// CONNACK with success.
    Connected(Granted),
    /// CONNACK refusing the connection, the reason in words.
    Refused(String),
    /// A publish went onto the wire with this packet id (0 for QoS 0).
    Written(u16),
    /// rumqttc holds a publish back: its packet id is still in flight.
    HeldBack(u16),
    /// The final acknowledgement of a publish (PUBACK, PUBCOMP, or a refusing PUBREC).
    Acked {
        pkid: u16,
        refused: Option<Refusal>,
    },
    /// A publish from the broker (commands, Home Assistant's status).
    Message {
        topic: String,
        payload: Vec<u8>,
        retain: bool,
    },
    /// Our DISCONNECT went out.
    DisconnectSent,
    Other,
}

fn outgoing(o: &Outgoing) -> Ev {
    match o {
        Outgoing::Publish(pkid) => Ev::Written(*pkid),
        Outgoing::AwaitAck(pkid) => Ev::HeldBack(*pkid),
        Outgoing::Disconnect => Ev::DisconnectSent,
        _ => Ev::Other,
    }
}

fn from_v4(ev: Event) -> Ev {
    match ev {
        Event::Outgoing(o) => outgoing(&o),
        Event::Incoming(Packet::ConnAck(a)) => match a.code {
            rumqttc::ConnectReturnCode::Success => Ev::Connected(Granted::default()),
            code => Ev::Refused(words(code)),
        },
        Event::Incoming(Packet::PubAck(a)) => Ev::Acked {
            pkid: a.pkid,
            refused: None,
        },
        Event::Incoming(Packet::PubComp(c)) => Ev::Acked {
            pkid: c.pkid,
            refused: None,
        },
        Event::Incoming(Packet::Publish(p)) => Ev::Message {
            topic: p.topic,
            payload: p.payload.to_vec(),
            retain: p.retain,
        },
        Event::Incoming(_) => Ev::Other,
    }
}

fn from_v5(ev: rumqttc::v5::Event) -> Ev {
    use rumqttc::v5::Event as E;
    use rumqttc::v5::mqttbytes::v5::Packet as P;
    match ev {
        E::Outgoing(o) => outgoing(&o),
        E::Incoming(P::ConnAck(a)) => match a.code {
            p5::ConnectReturnCode::Success => Ev::Connected(match a.properties {
                Some(props) => Granted {
                    receive_max: props.receive_max,
                    max_packet: props.max_packet_size,
                    alias_max: props.topic_alias_max.unwrap_or(0),
                },
                None => Granted::default(),
            }),
            code => Ev::Refused(words(code)),
        },
        E::Incoming(P::PubAck(a)) => Ev::Acked {
            pkid: a.pkid,
            refused: puback_code(a.reason),
        },
        // A PUBREC that refuses ends the exchange (no PUBREL follows); a successful one is
        // half-way, the PUBCOMP is the delivery.
        E::Incoming(P::PubRec(r)) => match pubrec_code(r.reason) {
            Some(refused) => Ev::Acked {
                pkid: r.pkid,
                refused: Some(refused),
            },
            None => Ev::Other,
        },
        E::Incoming(P::PubComp(c)) => Ev::Acked {
            pkid: c.pkid,
            refused: match c.reason {
                p5::PubCompReason::Success => None,
                p5::PubCompReason::PacketIdentifierNotFound => Some(Refusal(0x92)),
            },
        },
        E::Incoming(P::Publish(p)) => Ev::Message {
            topic: String::from_utf8_lossy(&p.topic).into_owned(),
            payload: p.payload.to_vec(),
            retain: p.retain,
        },
        E::Incoming(_) => Ev::Other,
    }
}

/// What an MQTT 5 publish carries beyond topic and payload (ignored under 3.1.1).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Extras {
    pub alias: Option<u16>,
    /// Message expiry interval, seconds.
    pub expiry: Option<u32>,
    pub user: Vec<(String, String)>,
}

impl Extras {
    pub fn is_empty(&self) -> bool {
        self.alias.is_none() && self.expiry.is_none() && self.user.is_empty()
    }

    /// Bytes these properties add to a publish on the wire (the property length included).
    pub fn wire_bytes(&self) -> usize {
        let mut n = 0;
        if self.alias.is_some() {
            n += 3;
        }
        if self.expiry.is_some() {
            n += 5;
        }
        for (k, v) in &self.user {
            n += 5 + k.len() + v.len();
        }
        n + 1
    }
}

/// A connected client of either version: the request channel of its loop (`wire`), and the
/// session's word to it on how soon acknowledgements must be read.
pub struct Client {
    requests: Requests,
    unhurried: Arc<AtomicBool>,
}

enum Requests {
    V4(mpsc::Sender<rumqttc::Request>),
    V5(mpsc::Sender<rumqttc::v5::Request>),
}

fn qos5(q: QoS) -> QoS5 {
    match q {
        QoS::AtMostOnce => QoS5::AtMostOnce,
        QoS::AtLeastOnce => QoS5::AtLeastOnce,
        QoS::ExactlyOnce => QoS5::ExactlyOnce,
    }
}

impl Client {
    /// `true` while nothing of the session waits for room in the window: the loop may then
    /// gather acknowledgements for a moment before it reads them (see `wire::GATHER`); `false`
    /// (the start) reads each as it comes.
    pub fn unhurried(&self, yes: bool) {
        self.unhurried.store(yes, Ordering::Relaxed);
    }

    /// Hands a publish to the loop (never waits: the request channel has room for the window).
    pub fn publish(
        &self,
        topic: String,
        qos: QoS,
        retain: bool,
        payload: Vec<u8>,
        extras: Extras,
    ) -> Result<(), UplinkError> {
        let valid = rumqttc::valid_topic(&topic);
        match &self.requests {
            Requests::V4(c) => {
                let mut p = rumqttc::Publish::new(topic, qos, payload);
                p.retain = retain;
                request(c, rumqttc::Request::Publish(p), valid, err4)
            }
            Requests::V5(c) => {
                let props = (!extras.is_empty()).then(|| p5::PublishProperties {
                    topic_alias: extras.alias,
                    message_expiry_interval: extras.expiry,
                    user_properties: extras.user,
                    ..Default::default()
                });
                let mut p = p5::Publish::new(topic, qos5(qos), payload, props);
                p.retain = retain;
                request(c, rumqttc::v5::Request::Publish(p), valid, err5)
            }
        }
    }

    /// Subscribes to `topics` at QoS 1 in one SUBSCRIBE.
    pub fn subscribe(&self, topics: Vec<String>) -> Result<(), UplinkError> {
        let valid = !topics.is_empty() && topics.iter().all(|t| rumqttc::valid_filter(t));
        let topics = topics.into_iter();
        match &self.requests {
            Requests::V4(c) => {
                let filters = topics.map(|t| rumqttc::SubscribeFilter::new(t, QoS::AtLeastOnce));
                let s = rumqttc::Subscribe::new_many(filters);
                request(c, rumqttc::Request::Subscribe(s), valid, err4)
            }
            Requests::V5(c) => {
                let filters = topics.map(|t| p5::Filter::new(t, QoS5::AtLeastOnce));
                let s = p5::Subscribe::new_many(filters, None);
                request(c, rumqttc::v5::Request::Subscribe(s), valid, err5)
            }
        }
    }

    pub fn disconnect(&self) -> Result<(), UplinkError> {
        match &self.requests {
            Requests::V4(c) => {
                let r = rumqttc::Request::Disconnect(rumqttc::Disconnect);
                request(c, r, true, err4)
            }
            Requests::V5(c) => request(c, rumqttc::v5::Request::Disconnect, true, err5),
        }
    }
}

fn err4(r: rumqttc::Request) -> UplinkError {
    rumqttc::ClientError::TryRequest(r).into()
}

fn err5(r: rumqttc::v5::Request) -> UplinkError {
    rumqttc::v5::ClientError::TryRequest(r).into()
}

/// Hands a request to the loop without waiting; one that is not valid, or finds the channel
/// full or closed, comes back in the error as rumqttc's client would return it.
fn request<R>(
    c: &mpsc::Sender<R>,
    r: R,
    valid: bool,
    err: fn(R) -> UplinkError,
) -> Result<(), UplinkError> {
    if !valid {
        return Err(err(r));
    }
    c.try_send(r).map_err(|e| match e {
        mpsc::error::TrySendError::Full(r) | mpsc::error::TrySendError::Closed(r) => err(r),
    })
}

/// The options of a client of `mqtt.protocol`: `inflight_ids` is its packet-id space, `will`
/// the Last Will (topic, payload, retain; QoS 1).
pub fn connect(
    mqtt: &Mqtt,
    inflight_ids: u16,
    max_packet: usize,
    will: (String, Vec<u8>, bool),
    capacity: usize,
    on_discard: super::wire::OnDiscard,
) -> (Client, Events) {
    let credentials = mqtt.username.as_ref().map(|user| {
        let pass = mqtt
            .password
            .as_ref()
            .map(|p| p.0.clone())
            .unwrap_or_default();
        (user.clone(), pass)
    });
    // What CONNECT carries beyond these is the version's own: built below.
    let unhurried = Arc::new(AtomicBool::new(false));
    fn dial<V: super::wire::Version>(
        mqtt: &Mqtt,
        connect: V::Packet,
        inflight: u16,
        max_packet: usize,
        unhurried: &Arc<AtomicBool>,
        on_discard: super::wire::OnDiscard,
    ) -> super::wire::Dial<V> {
        super::wire::Dial {
            host: mqtt.host.clone(),
            port: mqtt.port,
            tls: mqtt.tls.clone(),
            connect,
            inflight,
            max_in: max_packet,
            max_out: max_packet,
            keep_alive: mqtt.keep_alive,
            unhurried: unhurried.clone(),
            on_discard,
        }
    }
    let keep_alive = mqtt.keep_alive.as_secs().min(u16::MAX as u64) as u16;
    let (requests, events) = match mqtt.protocol {
        Protocol::V311 => {
            let mut connect = rumqttc::Connect::new(mqtt.client_id.clone());
            connect.keep_alive = keep_alive;
            connect.clean_session = true;
            connect.last_will = Some(rumqttc::LastWill::new(
                will.0,
                will.1,
                QoS::AtLeastOnce,
                will.2,
            ));
            if let Some((u, p)) = credentials {
                connect.set_login(u, p);
            }
            let dial = dial(
                mqtt,
                Packet::Connect(connect),
                inflight_ids,
                max_packet,
                &unhurried,
                on_discard,
            );
            let (requests, rx) = mpsc::channel(capacity);
            let events = Events::spawn(capacity, move |tx| async move {
                let map = |ev| Ok(from_v4(ev));
                if let Err(e) = super::wire::run::<super::wire::V4, _>(dial, rx, &tx, map).await {
                    let _ = tx.send(Err(e.into())).await;
                }
            });
            (Requests::V4(requests), events)
        }
        Protocol::V5 => {
            let connect = p5::Connect {
                client_id: mqtt.client_id.clone(),
                keep_alive,
                // The queue, not the broker, keeps what is undelivered: a clean start, and a
                // session that ends with the connection (commands sent while we were away are
                // never replayed: a setpoint from an hour ago is not an order).
                clean_start: true,
                properties: Some(p5::ConnectProperties {
                    session_expiry_interval: Some(0),
                    max_packet_size: Some(max_packet as u32),
                    ..p5::ConnectProperties::new()
                }),
            };
            let will = p5::LastWill::new(will.0, will.1, QoS5::AtLeastOnce, will.2, None);
            let login = credentials.map(|(u, p)| p5::Login::new(u, p));
            let packet = p5::Packet::Connect(connect, Some(will), login);
            let dial = dial(
                mqtt,
                packet,
                inflight_ids,
                max_packet,
                &unhurried,
                on_discard,
            );
            let (requests, rx) = mpsc::channel(capacity);
            let events = Events::spawn(capacity, move |tx| async move {
                let map = |ev| Ok(from_v5(ev));
                if let Err(e) = super::wire::run::<super::wire::V5, _>(dial, rx, &tx, map).await {
                    let _ = tx.send(Err(e.into())).await;
                }
            });
            (Requests::V5(requests), events)
        }
    };
    (
        Client {
            requests,
            unhurried,
        },
        events,
    )
}

/// The connection's events, from its loop running in a task of its own (so that nothing here
/// cancels a half-written packet). The task stops when this is dropped.
pub struct Events {
    rx: mpsc::Receiver<Result<Ev, UplinkError>>,
    pump: tokio::task::JoinHandle<()>,
}

impl Events {
    /// Waits for the CONNACK, at most `within`: what the broker granted when connected, None
    /// when cancelled first.
    pub async fn connected(
        &mut self,
        cancel: &tokio_util::sync::CancellationToken,
        within: std::time::Duration,
    ) -> Result<Option<Granted>, UplinkError> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let ev = tokio::select! {
                _ = cancel.cancelled() => return Ok(None),
                ev = tokio::time::timeout_at(deadline, self.recv()) => ev,
            };
            match ev {
                Err(_) | Ok(None) => return Err(UplinkError::ConnectTimeout(within)),
                Ok(Some(Err(e))) => return Err(e),
                Ok(Some(Ok(Ev::Refused(why)))) => return Err(UplinkError::Refused(why)),
                Ok(Some(Ok(Ev::Connected(granted)))) => return Ok(Some(granted)),
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    fn spawn<F, Fut>(capacity: usize, pump: F) -> Events
    where
        F: FnOnce(mpsc::Sender<Result<Ev, UplinkError>>) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(capacity);
        Events {
            rx,
            pump: tokio::spawn(pump(tx)),
        }
    }

    pub async fn recv(&mut self) -> Option<Result<Ev, UplinkError>> {
        self.rx.recv().await
    }

    /// Waits for an event, then moves every one waiting (at most `limit`) into `buf`; 0 when
    /// the connection's task is gone. Cancel-safe.
    pub async fn recv_many(
        &mut self,
        buf: &mut Vec<Result<Ev, UplinkError>>,
        limit: usize,
    ) -> usize {
        self.rx.recv_many(buf, limit).await
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        self.pump.abort();
    }
}

/// Topic aliases of one MQTT 5 session: the first publish on a topic names it with a new alias,
/// the later ones send the alias and an empty topic.
#[derive(Debug, Default)]
pub struct Aliases {
    max: u16,
    known: std::collections::HashMap<String, u16>,
}

impl Aliases {
    pub fn new(max: u16) -> Aliases {
        Aliases {
            max,
            known: std::collections::HashMap::new(),
        }
    }

    /// The topic to send and the alias to carry: (topic, None) when aliases are used up or not
    /// offered; (topic, Some(a)) the first time; ("", Some(a)) after.
    pub fn apply(&mut self, topic: String) -> (String, Option<u16>) {
        if let Some(&a) = self.known.get(&topic) {
            return (String::new(), Some(a));
        }
        let next = self.known.len() + 1;
        if next > self.max as usize {
            return (topic, None);
        }
        self.known.insert(topic.clone(), next as u16);
        (topic, Some(next as u16))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_name_a_topic_once_then_stand_for_it_within_the_brokers_maximum() {
        let mut a = Aliases::new(2);
        assert_eq!(a.apply("a/t".into()), ("a/t".into(), Some(1)));
        assert_eq!(a.apply("a/t".into()), (String::new(), Some(1)));
        assert_eq!(a.apply("b/t".into()), ("b/t".into(), Some(2)));
        // Used up: the full topic, no alias, every time.
        assert_eq!(a.apply("c/t".into()), ("c/t".into(), None));
        assert_eq!(a.apply("c/t".into()), ("c/t".into(), None));
        assert_eq!(a.apply("b/t".into()), (String::new(), Some(2)));
        let mut none = Aliases::new(0);
        assert_eq!(none.apply("a/t".into()), ("a/t".into(), None));
    }

    #[test]
    fn refusals_read_in_words_and_only_busy_ones_are_retried() {
        assert_eq!(
            Refusal(0x87).to_string(),
            "not authorized (0x87)".to_string()
        );
        assert!(!Refusal(0x87).transient());
        assert!(!Refusal(0x90).transient());
        assert!(Refusal(0x97).transient());
        assert_eq!(
            puback_code(p5::PubAckReason::NoMatchingSubscribers),
            None,
            "no subscriber is still a delivery to the broker"
        );
        assert_eq!(
            words(p5::ConnectReturnCode::BadUserNamePassword),
            "bad user name password"
        );
    }
}
