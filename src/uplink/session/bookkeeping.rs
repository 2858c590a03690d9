//! The bookkeeping of one connection's [`Session`]: the gateway's own messages through the
//! window, each event of the connection, and what an acknowledgement or a refusal settles.
//! No I/O of its own: requests go to the client, deletes and set-asides to the store.

use super::*;

impl Session<'_> {
    /// Publishes a message of the gateway's own (QoS 1) and counts it in the window. One
    /// larger than the broker takes is logged and left out: sending it would only end the
    /// session (the status message comes again; a refused command result is in the log).
    pub(super) fn control(
        &mut self,
        topic: &str,
        payload: Vec<u8>,
        retain: bool,
    ) -> Result<(), UplinkError> {
        if let Some(why) = unpublishable_within(topic, payload.len(), self.max_packet) {
            tracing::warn!(%topic, reason = %why, "a gateway message cannot be published; left out");
            return Ok(());
        }
        let bytes = wire_bytes(topic, payload.len());
        self.client.publish(
            topic.to_string(),
            QoS::AtLeastOnce,
            retain,
            payload,
            Extras::default(),
        )?;
        self.win.submit(Entry::Control { qos: 1 }, bytes);
        Ok(())
    }

    /// Publishes the outbox, then the Home Assistant configs, oldest first, while the window
    /// has room for them.
    pub(super) fn send_outbox(&mut self, now: Instant) -> Result<(), UplinkError> {
        for announcing in [false, true] {
            loop {
                let queue = if announcing {
                    &mut self.announcing
                } else {
                    &mut self.outbox
                };
                let Some((t, body, _)) = queue.front() else {
                    break;
                };
                if !self.win.can_submit(1, wire_bytes(t, body.len()), now) {
                    return Ok(());
                }
                let (t, body, retain) = queue.pop_front().expect("front exists");
                self.control(&t, body, retain)?;
            }
        }
        Ok(())
    }

    /// Hands acknowledged rows to the store for deletion, refused ones to be set aside.
    pub(super) fn flush(&mut self, store: &crate::store::StoreHandle) -> Result<(), UplinkError> {
        store.ack(std::mem::take(&mut self.acks));
        if !self.refused.is_empty() {
            store.set_aside(std::mem::take(&mut self.refused))?;
        }
        Ok(())
    }

    /// Applies one of rumqttc's events to the window; acknowledged rows go to `acks`, refused
    /// ones to `refused` — a refusal is never taken as a delivery.
    pub(super) fn handle(&mut self, ev: Ev) {
        let now = Instant::now();
        let surprise = match ev {
            Ev::Written(pkid) => {
                let (done, surprise) = self.win.written(pkid, now);
                if let Some(seq) = done {
                    self.done(seq);
                }
                surprise
            }
            Ev::HeldBack(pkid) => Some(self.win.held_back(pkid)),
            Ev::Acked {
                pkid,
                refused: None,
            } => {
                if let Some(seq) = self.win.ack(pkid, now) {
                    self.done(seq);
                }
                None
            }
            Ev::Acked {
                pkid,
                refused: Some(r),
            } => {
                let seq = self.win.ack(pkid, now);
                self.refusal(seq, r);
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

impl Session<'_> {
    /// One publish of row `seq` was acknowledged: the row is done when all its copies are
    /// (JSON and Sparkplug).
    pub(super) fn done(&mut self, seq: u64) {
        if let Some(left) = self.pairs.get_mut(&seq) {
            *left -= 1;
            if *left > 0 {
                return;
            }
            self.pairs.remove(&seq);
        }
        self.acks.push(seq);
    }

    /// The broker refused the publish of `seq` (None: one of the gateway's own messages).
    pub(super) fn refusal(&mut self, seq: Option<u64>, r: Refusal) {
        let first = !self.refusal_logged;
        self.refusal_logged = true;
        match seq {
            Some(_) if r.transient() => {
                // Kept in the queue: the session ends and it is sent again after a pause.
                tracing::warn!(seq, reason = %r, "the broker turned a reading down for now; it stays queued");
                if self.busy.is_none() {
                    self.busy = Some((r, Instant::now()));
                }
            }
            Some(seq) => {
                if first {
                    tracing::warn!(seq, reason = %r, "the broker refused a reading; set aside, not deleted (`fieldgate queue aside`, `fieldgate queue requeue` once the broker takes it; further refusals at debug level)");
                } else {
                    tracing::debug!(seq, reason = %r, "the broker refused a reading; set aside");
                }
                self.refused.push((seq, r.to_string()));
            }
            None if first => {
                tracing::warn!(reason = %r, "the broker refused one of the gateway's own messages (status, availability, command result or discovery); check its ACL")
            }
            None => tracing::debug!(reason = %r, "the broker refused a gateway message"),
        }
    }
}
