//! The uplink as a Sparkplug B edge node: when each lifecycle message goes out, the `seq` and
//! `bdSeq` counters, and what a queued reading becomes. The payloads themselves are
//! [`crate::sparkplug`]'s.
//!
//! Per connection: `bdSeq` goes up by one (kept in `{state_dir}/sparkplug.bdseq`, so a restart
//! never reuses the one of a Will the broker may still send) and is in both the Will (NDEATH)
//! and the NBIRTH. The NBIRTH (`seq` 0) goes first, then a DBIRTH for every device that
//! answers; the readings in the queue at connect time follow as DDATA marked `is_historical`,
//! then the live ones. `seq` counts every message of the node, 0–255, wrapping; it is assigned
//! as a message is handed to the client, and the session sends no reading while a birth or
//! death waits, so the wire order is the `seq` order.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;

use super::link::Outbound;
use crate::config::Config;
use crate::mapping::Value;
use crate::message::{Body, Stored};
use crate::sparkplug::{EdgeNode, Request, Source};

/// The edge node of a configuration.
pub struct Edge {
    pub node: EdgeNode,
    /// fieldgate's JSON topics are published too.
    pub json: bool,
    bd_seq_file: PathBuf,
    /// Device availability topic → device name.
    devices_by_availability: HashMap<String, String>,
}

/// A queued reading in Sparkplug terms.
#[derive(Debug, Clone)]
pub struct SpRow {
    source: Source,
    values: Vec<(String, Value)>,
    ts_ms: i64,
}

impl Edge {
    pub fn new(config: &Config) -> Option<Edge> {
        let sp = config.sparkplug.as_ref()?;
        Some(Edge {
            node: EdgeNode::new(config, &sp.group_id, &sp.edge_node_id),
            json: sp.json,
            bd_seq_file: config.gateway.state_dir.join("sparkplug.bdseq"),
            devices_by_availability: config
                .devices
                .iter()
                .map(|d| (d.availability_topic.clone(), d.name.clone()))
                .collect(),
        })
    }

    /// The `bdSeq` of the next connection: one more than the last one used (0 at first).
    pub fn next_bd_seq(&self) -> u8 {
        let last = std::fs::read_to_string(&self.bd_seq_file)
            .ok()
            .and_then(|t| t.trim().parse::<u8>().ok());
        let next = last.map_or(0, |b| b.wrapping_add(1));
        if let Err(e) = std::fs::write(&self.bd_seq_file, next.to_string()) {
            tracing::warn!(file = %self.bd_seq_file.display(), error = %e, "Sparkplug: cannot keep bdSeq; a restart may reuse it");
        }
        next
    }

    /// The Will: NDEATH with `bd_seq` (QoS 1, not retained).
    pub fn will(&self, bd_seq: u8) -> (String, Vec<u8>) {
        (
            self.node.topic("NDEATH"),
            self.node.ndeath(bd_seq, crate::message::now_ms()),
        )
    }

    /// The topics a host sends commands on.
    pub fn command_topics(&self) -> Vec<String> {
        vec![
            self.node.topic("NCMD"),
            format!("{}/+", self.node.topic("DCMD")),
        ]
    }

    /// The requests in a publish on `topic`, or None when it is not a command to this node.
    pub fn requests(&self, topic: &str, payload: &[u8]) -> Option<Vec<Request>> {
        if topic == self.node.topic("NCMD") {
            return Some(self.node.requests(None, payload));
        }
        let device = topic.strip_prefix(&format!("{}/", self.node.topic("DCMD")))?;
        Some(self.node.requests(Some(device), payload))
    }

    /// The reading of a queued row, if it is one of a device's.
    pub fn row(&self, row: &Stored) -> Option<SpRow> {
        let source = self.node.source(&row.message.topic)?.clone();
        let values = match (&source, &row.message.body) {
            (Source::Point(alias), Body::Point { value, .. } | Body::Bare { value }) => {
                let name = self.node.by_alias(*alias)?.name.clone();
                vec![(name, value.clone())]
            }
            (Source::Device(_), Body::Device { values }) => {
                values.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
            }
            _ => return None,
        };
        Some(SpRow {
            source,
            values,
            ts_ms: row.message.ts_ms,
        })
    }

    pub fn device_of(&self, availability_topic: &str) -> Option<&str> {
        self.devices_by_availability
            .get(availability_topic)
            .map(String::as_str)
    }
}

/// One connection of the edge node.
pub struct SpSession {
    pub bd_seq: u8,
    /// `seq` of the next message.
    seq: u8,
    /// Rows up to this seq were queued before the connection: historical.
    backlog_upto: u64,
    /// Devices with a DBIRTH in this session (and no DDEATH since).
    born: HashSet<String>,
    /// A device was born for its reading: look at availability when the queue is drained.
    recheck: bool,
}

impl SpSession {
    pub fn new(bd_seq: u8, backlog_upto: u64) -> SpSession {
        SpSession {
            bd_seq,
            seq: 0,
            backlog_upto,
            born: HashSet::new(),
            recheck: false,
        }
    }

    fn next_seq(&mut self) -> u8 {
        let s = self.seq;
        self.seq = self.seq.wrapping_add(1);
        s
    }

    /// NBIRTH (`seq` 0, the counter starts over) and a DBIRTH for each device born before (a
    /// rebirth) — `values` gives each device's current values.
    pub fn births(
        &mut self,
        edge: &Edge,
        values: impl Fn(&str) -> BTreeMap<String, (Value, i64)>,
    ) -> Vec<Outbound> {
        let now = crate::message::now_ms();
        self.seq = 0;
        let mut out = vec![(
            edge.node.topic("NBIRTH"),
            edge.node.nbirth(self.bd_seq, now),
            false,
        )];
        self.next_seq();
        let born: Vec<String> = edge
            .node
            .devices
            .iter()
            .map(|(d, _)| d.clone())
            .filter(|d| self.born.contains(d))
            .collect();
        for d in born {
            out.push(self.dbirth(edge, &d, &values(&d)));
        }
        out
    }

    fn dbirth(
        &mut self,
        edge: &Edge,
        device: &str,
        values: &BTreeMap<String, (Value, i64)>,
    ) -> Outbound {
        self.born.insert(device.to_string());
        let seq = self.next_seq();
        (
            edge.node.device_topic("DBIRTH", device),
            edge.node
                .dbirth(device, values, seq, crate::message::now_ms()),
            false,
        )
    }

    /// A device's availability changed (or is announced at connect): DBIRTH when it answers
    /// and is not born, DDEATH when it stopped answering and was.
    pub fn availability(
        &mut self,
        edge: &Edge,
        device: &str,
        online: bool,
        values: impl Fn(&str) -> BTreeMap<String, (Value, i64)>,
    ) -> Option<Outbound> {
        match (online, self.born.contains(device)) {
            (true, false) => Some(self.dbirth(edge, device, &values(device))),
            (false, true) => {
                self.born.remove(device);
                let seq = self.next_seq();
                Some((
                    edge.node.device_topic("DDEATH", device),
                    edge.node.ddeath(seq, crate::message::now_ms()),
                    false,
                ))
            }
            _ => None,
        }
    }

    /// The DDATA of a queued reading: topic and payload (None when nothing in it is a metric).
    /// Its device must be born first (see [`SpSession::is_born`]).
    pub fn ddata(&mut self, edge: &Edge, row_seq: u64, r: &SpRow) -> Option<(String, Vec<u8>)> {
        let values: Vec<(&str, &Value)> = r.values.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let seq = self.seq;
        let (device, payload) = edge.node.ddata(
            &r.source,
            &values,
            r.ts_ms,
            row_seq <= self.backlog_upto,
            seq,
            crate::message::now_ms(),
        )?;
        self.next_seq();
        Some((edge.node.device_topic("DDATA", &device), payload))
    }

    /// Whether `device` has a DBIRTH in this session.
    pub fn is_born(&self, device: &str) -> bool {
        self.born.contains(device)
    }

    /// A DBIRTH for a device whose reading is due before the device was born (readings kept
    /// from before a restart, or from while it answered during an outage). Marks the session
    /// for a look at availability once the queue is drained (a device that no longer answers
    /// then gets its DDEATH).
    pub fn birth_for_reading(
        &mut self,
        edge: &Edge,
        device: &str,
        values: &BTreeMap<String, (Value, i64)>,
    ) -> Outbound {
        self.recheck = true;
        self.dbirth(edge, device, values)
    }

    /// Whether availability must be looked at again once the queue is drained; clears it.
    pub fn take_recheck(&mut self) -> bool {
        std::mem::take(&mut self.recheck)
    }

    /// The device a reading belongs to.
    pub fn device_of_row<'e>(&self, edge: &'e Edge, r: &SpRow) -> Option<&'e str> {
        match &r.source {
            Source::Point(a) => edge.node.by_alias(*a).map(|m| m.device.as_str()),
            Source::Device(d) => edge
                .node
                .devices
                .iter()
                .find(|(n, _)| n == d)
                .map(|(n, _)| n.as_str()),
        }
    }
}
