//! The uplink's window: which publishes are in flight, under which packet ids, and how much more
//! may be sent. Pure bookkeeping, no I/O: the session feeds it what rumqttc reports and asks it
//! before every publish.
//!
//! # Packet ids
//! rumqttc's `publish()` returns no packet id. It hands out ids from one counter, `1..=ids`
//! (its `inflight` option) and wrapping, shared by PUBLISH (QoS 1 and 2), SUBSCRIBE and
//! UNSUBSCRIBE, in the order requests are submitted. The window mirrors that counter: every
//! request that takes an id is counted here ([`Window::submit`], [`Window::subscribed`]), so the
//! id the next publish will get is known *before* it is submitted, and a publish is held back
//! while that id is still awaiting its acknowledgement. Ids never collide; out-of-order
//! acknowledgements (QoS 2 beside QoS 1) only delay the next publish.
//!
//! rumqttc then reports `Outgoing::Publish(pkid)` in submission order, which ties each id to a
//! row; `PUBACK`/`PUBCOMP` name the row to delete. Should reality still differ from the mirror
//! (a collision rumqttc resolves by waiting, an id other than predicted, an acknowledgement for
//! nothing), it is counted as a [`Surprise`] and the session goes on: rumqttc's word is the
//! truth, and nothing is ever deleted without its acknowledgement.
//!
//! # How much is in flight
//! At most `limit` publishes (`mqtt.inflight`), and at most a byte budget: the measured delivery
//! rate (bytes acknowledged per second) times half the keep-alive, or three times the shortest round
//! trip seen, whichever is longer. On a thin link a full window would sit in modem buffers for
//! longer than the keep-alive, and the PINGREQ queued behind it would come back too late; the
//! budget keeps that queue short while the window still covers the link's bandwidth × delay.
//! It grows as the link proves faster (each round trip may deliver more than the last).
//!
//! # When a session is broken
//! Not when one packet has waited long — on a slow link every packet waits long — but when
//! nothing at all has been acknowledged for the acknowledgement timeout while something waits.

use std::cell::Cell;
use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// What a submitted publish stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// A queue row.
    Row { seq: u64, qos: u8 },
    /// The gateway's own message (status, availability, command result, discovery).
    Control { qos: u8 },
}

impl Entry {
    pub fn qos(self) -> u8 {
        match self {
            Entry::Row { qos, .. } | Entry::Control { qos } => qos,
        }
    }

    fn seq(self) -> Option<u64> {
        match self {
            Entry::Row { seq, .. } => Some(seq),
            Entry::Control { .. } => None,
        }
    }
}

/// Something rumqttc reported that the mirror did not expect. Never fatal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Surprise {
    #[error("rumqttc sent a publish that was never submitted (packet {0})")]
    NothingSubmitted(u16),
    #[error("packet id {0} reused while still awaiting its acknowledgement")]
    Collision(u16),
    #[error("packet id {actual} where {predicted} was expected")]
    OtherId { predicted: u16, actual: u16 },
}

/// Least byte budget: a few messages, whatever the measured rate.
pub const MIN_BUDGET: usize = 4 * 1024;
/// How far back the delivery rate is measured.
const RATE_SPAN: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy)]
struct Submitted {
    entry: Entry,
    /// The id rumqttc will give it (0 for QoS 0).
    id: u16,
    bytes: usize,
}

#[derive(Debug, Clone, Copy)]
struct Awaiting {
    entry: Entry,
    bytes: usize,
    written: Instant,
}

/// Written publishes by packet id: a slot per id (ids are small and dense, `1..=ids`), so
/// the per-publish lookups are an index, not a hash.
#[derive(Debug, Default)]
struct Slots {
    slots: Vec<Option<Awaiting>>,
    len: usize,
}

impl Slots {
    fn insert(&mut self, id: u16, a: Awaiting) -> Option<Awaiting> {
        let i = id as usize;
        if i >= self.slots.len() {
            // Only an id outside the mirrored space (a surprise) grows it past `ids`.
            self.slots.resize(i + 1, None);
        }
        let old = self.slots[i].replace(a);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    fn remove(&mut self, id: u16) -> Option<Awaiting> {
        let old = self.slots.get_mut(id as usize)?.take();
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    fn contains(&self, id: u16) -> bool {
        self.slots.get(id as usize).is_some_and(Option::is_some)
    }

    fn iter(&self) -> impl Iterator<Item = (u16, &Awaiting)> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, a)| Some((i as u16, a.as_ref()?)))
    }
}

/// Publishes submitted and not yet acknowledged, tied to their packet ids. No I/O.
#[derive(Debug)]
pub struct Window {
    /// Most publishes in flight.
    limit: usize,
    /// rumqttc's id space: ids `1..=ids`.
    ids: u16,
    /// The id rumqttc handed out last, as mirrored here.
    last_id: u16,
    keep_alive: Duration,
    /// Handed to rumqttc, not yet written (no packet id reported yet), in submission order.
    submitted: VecDeque<Submitted>,
    /// Written, awaiting PUBACK/PUBCOMP.
    awaiting: Slots,
    bytes: usize,
    /// Acknowledged bytes of the last [`RATE_SPAN`], oldest first.
    delivered: VecDeque<(Instant, usize)>,
    /// Sum of the bytes in `delivered`.
    delivered_bytes: usize,
    started: Instant,
    /// The last acknowledgement (or the start).
    progress: Instant,
    min_rtt: Option<Duration>,
    surprises: u64,
    /// Acknowledgements received in this session.
    acknowledged: u64,
    /// The byte budget as last worked out, and for when: asked before every publish, it only
    /// changes with the clock and with an acknowledgement.
    budget_at: Cell<Option<(Instant, usize)>>,
}

impl Window {
    /// `limit` publishes at most; `ids` is the id space given to rumqttc (its `inflight`).
    pub fn new(limit: usize, ids: u16, keep_alive: Duration, now: Instant) -> Window {
        Window {
            limit: limit.max(1),
            ids: ids.max(1),
            last_id: 0,
            keep_alive,
            submitted: VecDeque::new(),
            awaiting: Slots::default(),
            bytes: 0,
            delivered: VecDeque::new(),
            delivered_bytes: 0,
            started: now,
            progress: now,
            min_rtt: None,
            surprises: 0,
            acknowledged: 0,
            budget_at: Cell::new(None),
        }
    }

    /// The id space to give rumqttc for a window of `limit`: room for the window twice over
    /// (out-of-order acknowledgements) plus the ids subscriptions take.
    pub fn id_space(limit: u16) -> u16 {
        limit.saturating_mul(2).saturating_add(64)
    }

    /// Everything submitted and not yet acknowledged.
    pub fn len(&self) -> usize {
        self.submitted.len() + self.awaiting.len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes submitted and not yet acknowledged.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Surprises seen in this session.
    pub fn surprises(&self) -> u64 {
        self.surprises
    }

    /// Acknowledgements received in this session: it delivered something.
    pub fn acknowledged(&self) -> u64 {
        self.acknowledged
    }

    /// The id rumqttc gives the next request that takes one.
    fn peek_id(&self) -> u16 {
        let next = self.last_id + 1;
        if next >= self.ids { self.ids } else { next }
    }

    fn take_id(&mut self) -> u16 {
        let id = self.peek_id();
        self.last_id = if id == self.ids { 0 } else { id };
        id
    }

    fn id_busy(&self, id: u16) -> bool {
        self.awaiting.contains(id) || self.submitted.iter().any(|s| s.id == id)
    }

    /// Delivered bytes per second, measured over the last couple of seconds.
    pub fn rate(&self, now: Instant) -> f64 {
        let span = now
            .saturating_duration_since(self.started)
            .min(RATE_SPAN)
            .max(Duration::from_millis(50));
        // A running sum, less the few oldest entries that aged out since the last ack: this is
        // asked before every publish, so no walk over seconds of acknowledgements.
        let stale: usize = self
            .delivered
            .iter()
            .take_while(|(t, _)| now.saturating_duration_since(*t) > RATE_SPAN)
            .map(|(_, b)| b)
            .sum();
        (self.delivered_bytes - stale) as f64 / span.as_secs_f64()
    }

    /// Most bytes to have in flight now.
    pub fn budget(&self, now: Instant) -> usize {
        if let Some((at, b)) = self.budget_at.get()
            && at == now
        {
            return b;
        }
        let hold = (self.keep_alive / 2).max(self.min_rtt.unwrap_or_default() * 3);
        let b = ((self.rate(now) * hold.as_secs_f64()) as usize).max(MIN_BUDGET);
        self.budget_at.set(Some((now, b)));
        b
    }

    /// May a publish of `bytes` at `qos` be submitted now? Always when nothing is in flight.
    pub fn can_submit(&self, qos: u8, bytes: usize, now: Instant) -> bool {
        if self.is_empty() {
            return true;
        }
        self.len() < self.limit
            && self.bytes + bytes <= self.budget(now)
            && (qos == 0 || !self.id_busy(self.peek_id()))
    }

    /// A publish was handed to rumqttc.
    pub fn submit(&mut self, entry: Entry, bytes: usize) {
        let id = if entry.qos() == 0 { 0 } else { self.take_id() };
        self.bytes += bytes;
        self.submitted.push_back(Submitted { entry, id, bytes });
    }

    /// A SUBSCRIBE (or UNSUBSCRIBE) was handed to rumqttc: it takes an id from the same counter.
    pub fn subscribed(&mut self) {
        self.take_id();
    }

    /// rumqttc wrote the next submitted publish with `pkid` (0 for QoS 0). Returns the row's
    /// `seq` if that completes it (QoS 0 needs no acknowledgement), and what was unexpected.
    pub fn written(&mut self, pkid: u16, now: Instant) -> (Option<u64>, Option<Surprise>) {
        let Some(s) = self.submitted.pop_front() else {
            self.surprises += 1;
            return (None, Some(Surprise::NothingSubmitted(pkid)));
        };
        if s.entry.qos() == 0 {
            self.bytes -= s.bytes;
            return (s.entry.seq(), None);
        }
        let mut surprise = (s.id != pkid).then_some(Surprise::OtherId {
            predicted: s.id,
            actual: pkid,
        });
        let awaiting = Awaiting {
            entry: s.entry,
            bytes: s.bytes,
            written: now,
        };
        if let Some(old) = self.awaiting.insert(pkid, awaiting) {
            // rumqttc only writes an id once it is free, so this cannot be; if it is, the older
            // publish is simply resent by a later session (it stays in the queue).
            self.bytes -= old.bytes;
            surprise = Some(Surprise::Collision(pkid));
        }
        if surprise.is_some() {
            self.surprises += 1;
        }
        (None, surprise)
    }

    /// rumqttc holds the next publish back because its id is still awaited (a collision it
    /// resolves by waiting for that acknowledgement). It stays first in line; nothing to undo.
    pub fn held_back(&mut self, pkid: u16) -> Surprise {
        self.surprises += 1;
        Surprise::Collision(pkid)
    }

    /// The broker acknowledged `pkid`. Returns the row's `seq` to delete, if it was a row.
    /// An acknowledgement for a packet id not awaited is ignored (a late duplicate).
    pub fn ack(&mut self, pkid: u16, now: Instant) -> Option<u64> {
        let a = self.awaiting.remove(pkid)?;
        self.budget_at.set(None);
        self.bytes -= a.bytes;
        self.acknowledged += 1;
        self.progress = now;
        let rtt = now.saturating_duration_since(a.written);
        self.min_rtt = Some(self.min_rtt.map_or(rtt, |m| m.min(rtt)));
        while self
            .delivered
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > RATE_SPAN)
        {
            let (_, b) = self.delivered.pop_front().expect("front exists");
            self.delivered_bytes -= b;
        }
        self.delivered.push_back((now, a.bytes));
        self.delivered_bytes += a.bytes;
        a.entry.seq()
    }

    /// Some packet has awaited its acknowledgement for longer than `timeout` and nothing at
    /// all was acknowledged meanwhile: the id of the oldest, and how long nothing moved.
    pub fn stuck(&self, now: Instant, timeout: Duration) -> Option<(u16, Duration)> {
        let (pkid, oldest) = self
            .awaiting
            .iter()
            .map(|(p, a)| (p, a.written))
            .min_by_key(|(_, t)| *t)?;
        let quiet = now.saturating_duration_since(oldest.max(self.progress));
        (quiet > timeout).then_some((pkid, quiet))
    }

    /// QoS 2 publishes submitted and not yet completed.
    pub fn qos2_in_flight(&self) -> usize {
        self.entries().filter(|e| e.qos() == 2).count()
    }

    /// Rows still awaiting an acknowledgement.
    pub fn rows_in_flight(&self) -> usize {
        self.entries()
            .filter(|e| matches!(e, Entry::Row { .. }))
            .count()
    }

    fn entries(&self) -> impl Iterator<Item = Entry> + '_ {
        self.submitted
            .iter()
            .map(|s| s.entry)
            .chain(self.awaiting.iter().map(|(_, a)| a.entry))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KA: Duration = Duration::from_secs(30);

    fn row(seq: u64) -> Entry {
        Entry::Row { seq, qos: 1 }
    }

    fn window(limit: usize, ids: u16) -> (Window, Instant) {
        let t0 = Instant::now();
        (Window::new(limit, ids, KA, t0), t0)
    }

    #[test]
    fn packet_ids_are_matched_to_rows_in_submission_order() {
        let (mut w, t) = window(10, 20);
        w.submit(row(10), 100);
        w.submit(row(11), 100);
        assert_eq!(w.written(1, t), (None, None));
        assert_eq!(w.written(2, t), (None, None));
        assert_eq!(w.ack(2, t), Some(11));
        assert_eq!(w.ack(1, t), Some(10));
        assert!(w.is_empty());
        assert_eq!(w.bytes(), 0);
    }

    #[test]
    fn qos0_rows_are_done_once_written_and_take_no_id() {
        let (mut w, t) = window(10, 20);
        w.submit(Entry::Row { seq: 5, qos: 0 }, 10);
        w.submit(row(6), 10);
        assert_eq!(w.written(0, t), (Some(5), None));
        assert_eq!(w.written(1, t), (None, None), "the QoS 1 row gets id 1");
    }

    /// The defect of acceptance testing: `online`, then a SUBSCRIBE, then a full window of rows
    /// over a link slow enough that nothing is acknowledged before the counter wraps. rumqttc's
    /// SUBSCRIBE took an id, so the row after the window's worth would get the id of the still
    /// unacknowledged `online`: the window must hold it back instead.
    #[test]
    fn a_subscribe_taking_an_id_never_makes_a_publish_collide() {
        let limit = 8;
        let ids = 8; // the worst case: the id space no larger than the window
        let (mut w, t) = window(limit, ids);
        w.submit(Entry::Control { qos: 1 }, 10); // online: id 1
        w.subscribed(); // id 2
        let mut seq = 0;
        while w.can_submit(1, 10, t) {
            seq += 1;
            w.submit(row(seq), 10);
        }
        // ids 3..=8 are free for six rows; the next would be 1, still awaited (by online).
        assert_eq!(seq, 6);
        assert_eq!(w.written(1, t), (None, None));
        for id in 3..=8 {
            assert_eq!(w.written(id, t), (None, None));
        }
        assert!(!w.can_submit(1, 10, t));
        // online acknowledged: id 1 is free again, and the next row takes it.
        assert_eq!(w.ack(1, t), None);
        assert!(w.can_submit(1, 10, t));
        w.submit(row(7), 10);
        assert_eq!(w.written(1, t), (None, None));
        assert_eq!(w.surprises(), 0);
    }

    #[test]
    fn out_of_order_acknowledgements_hold_the_next_publish_back_instead_of_colliding() {
        let (mut w, t) = window(4, 4);
        for s in 1..=4 {
            w.submit(row(s), 10);
            w.written(s as u16, t);
        }
        // 2, 3 and 4 acknowledged, 1 (a QoS 2 exchange, say) not yet.
        for id in 2..=4 {
            w.ack(id, t);
        }
        assert!(!w.can_submit(1, 10, t), "the next id (1) is still awaited");
        w.ack(1, t);
        assert!(w.can_submit(1, 10, t));
    }

    #[test]
    fn a_collision_is_counted_and_both_rows_stay_accounted() {
        let (mut w, t) = window(10, 20);
        w.submit(row(1), 10);
        w.submit(row(2), 10);
        w.written(1, t);
        let (done, surprise) = w.written(1, t);
        assert_eq!(done, None);
        assert_eq!(surprise, Some(Surprise::Collision(1)));
        assert_eq!(
            w.ack(1, t),
            Some(2),
            "the later one is what the broker acknowledges"
        );
        assert_eq!(w.bytes(), 0);
    }

    #[test]
    fn an_unknown_ack_deletes_nothing() {
        let (mut w, t) = window(10, 20);
        w.submit(row(1), 10);
        w.written(1, t);
        assert_eq!(w.ack(9, t), None);
        assert_eq!(w.rows_in_flight(), 1);
        assert_eq!(w.acknowledged(), 0);
    }

    #[test]
    fn control_messages_are_tracked_but_never_deleted_from_the_queue() {
        let (mut w, t) = window(10, 20);
        w.submit(Entry::Control { qos: 1 }, 10);
        w.written(1, t);
        assert_eq!(w.ack(1, t), None);
        assert!(w.is_empty());
        assert_eq!(w.acknowledged(), 1);
    }

    #[test]
    fn written_without_submission_is_a_surprise_not_an_error() {
        let (mut w, t) = window(10, 20);
        assert_eq!(w.written(3, t), (None, Some(Surprise::NothingSubmitted(3))));
        assert_eq!(w.surprises(), 1);
    }

    /// The ids are slots, not hash keys: an id rumqttc reports outside the mirrored space
    /// (a surprise) is still tracked and acknowledged, and an acknowledgement for an id never
    /// written, inside or outside the space, deletes nothing.
    #[test]
    fn an_id_outside_the_mirrored_space_is_tracked_and_strays_delete_nothing() {
        let (mut w, t) = window(10, 20);
        assert_eq!(w.ack(7, t), None);
        assert_eq!(w.ack(60_000, t), None);
        w.submit(row(1), 10);
        let (_, surprise) = w.written(500, t);
        assert_eq!(
            surprise,
            Some(Surprise::OtherId {
                predicted: 1,
                actual: 500
            })
        );
        assert_eq!(w.len(), 1);
        assert_eq!(
            w.stuck(t + Duration::from_secs(9), Duration::from_secs(5))
                .map(|s| s.0),
            Some(500)
        );
        assert_eq!(w.ack(1, t), None, "not the id it was written with");
        assert_eq!(w.ack(500, t), Some(1));
        assert!(w.is_empty());
    }

    #[test]
    fn a_session_is_stuck_only_when_nothing_moves_for_the_timeout() {
        let (mut w, t0) = window(10, 20);
        let timeout = Duration::from_secs(5);
        for s in 1..=3 {
            w.submit(row(s), 10);
            w.written(s as u16, t0);
        }
        // A slow link: each packet waits 4 s, but one is acknowledged every 4 s.
        let t4 = t0 + Duration::from_secs(4);
        w.ack(1, t4);
        let t8 = t0 + Duration::from_secs(8);
        assert_eq!(
            w.stuck(t8, timeout),
            None,
            "packet 2 waited 8 s, but acks flow"
        );
        w.ack(2, t8);
        let t14 = t0 + Duration::from_secs(14);
        assert_eq!(w.stuck(t14, timeout), Some((3, Duration::from_secs(6))));
    }

    #[test]
    fn the_byte_budget_follows_the_delivery_rate_and_keep_alive() {
        let t0 = Instant::now();
        let mut w = Window::new(500, 1064, Duration::from_secs(6), t0);
        assert_eq!(w.budget(t0), MIN_BUDGET, "nothing measured yet");
        // 4000 bytes/s delivered for two seconds (a 32 kbit/s link).
        for i in 0..40u16 {
            w.submit(row(i as u64), 200);
            w.written(i + 1, t0 + Duration::from_millis(50 * i as u64));
        }
        for i in 0..40u16 {
            w.ack(i + 1, t0 + Duration::from_millis(50 * i as u64 + 60));
        }
        let t2 = t0 + Duration::from_secs(2);
        let rate = w.rate(t2);
        assert!((3_900.0..=4_100.0).contains(&rate), "{rate}");
        // Half the keep-alive's worth: about 12 kB, i.e. 3 s of line time, not a whole window.
        let budget = w.budget(t2);
        assert!((11_000..=12_500).contains(&budget), "{budget}");
        w.submit(row(100), 200);
        assert!(w.can_submit(1, 200, t2));
        for s in 0..60 {
            w.submit(row(200 + s), 200);
        }
        assert!(!w.can_submit(1, 200, t2), "{} bytes in flight", w.bytes());
    }

    #[test]
    fn one_publish_may_always_go_even_past_the_budget() {
        let (w, t) = window(10, 20);
        assert!(w.can_submit(1, 1 << 20, t));
    }

    #[test]
    fn the_window_limit_counts_every_publish() {
        let (mut w, t) = window(3, 100);
        w.submit(Entry::Control { qos: 1 }, 1);
        w.submit(row(1), 1);
        w.submit(row(2), 1);
        assert!(!w.can_submit(1, 1, t));
        assert!(!w.can_submit(0, 1, t));
    }

    #[test]
    fn qos2_in_flight_is_counted_apart() {
        let (mut w, t) = window(10, 20);
        w.submit(Entry::Row { seq: 1, qos: 2 }, 1);
        w.submit(row(2), 1);
        w.written(1, t);
        assert_eq!(w.qos2_in_flight(), 1);
        w.ack(1, t);
        assert_eq!(w.qos2_in_flight(), 0);
    }

    #[test]
    fn the_mirrored_counter_wraps_like_rumqttcs() {
        // rumqttc: ids 1..=max, then 1 again.
        let (mut w, _) = window(10, 3);
        let got: Vec<u16> = (0..7).map(|_| w.take_id()).collect();
        assert_eq!(got, vec![1, 2, 3, 1, 2, 3, 1]);
    }
}
