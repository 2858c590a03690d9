//! The queue against an in-memory model: any sequence of enqueues, peeks, out-of-order
//! acknowledgements and reopens leaves the file holding exactly what the model holds.

use std::collections::BTreeMap;

use fieldgate::mapping::Value;
use fieldgate::message::{Body, Message};
use fieldgate::store::{Limits, Store};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Enqueue(u8),
    /// Acknowledge the queued rows at these positions (modulo the depth), in this order.
    Ack(Vec<u16>),
    Peek {
        after_pos: u16,
        limit: u8,
    },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u8..30).prop_map(Op::Enqueue),
        3 => proptest::collection::vec(any::<u16>(), 0..12).prop_map(Op::Ack),
        2 => (any::<u16>(), 1u8..40).prop_map(|(after_pos, limit)| Op::Peek { after_pos, limit }),
        1 => Just(Op::Reopen),
    ]
}

fn msg(i: u64) -> Message {
    Message {
        topic: format!("t/{}", i % 7),
        qos: (i % 3) as u8,
        retain: i.is_multiple_of(5),
        ts_ms: 1_795_665_600_000 + i as i64,
        body: Body::Point {
            value: Value::UInt(i),
            unit: None,
        },
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    #[test]
    fn the_queue_behaves_like_its_model(ops in proptest::collection::vec(op(), 1..60), max in 5u64..80) {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits { max_messages: max, ..Limits::default() };
        let mut store = Store::open_with(dir.path(), limits).unwrap();
        let mut model: BTreeMap<u64, Message> = BTreeMap::new();
        let (mut next_seq, mut counter, mut dropped, mut acked) = (1u64, 0u64, 0u64, 0u64);
        for op in ops {
            match op {
                Op::Enqueue(n) => {
                    let batch: Vec<Message> = (0..n).map(|_| { counter += 1; msg(counter) }).collect();
                    let a = store.append(&batch).unwrap();
                    for m in batch {
                        model.insert(next_seq, m);
                        next_seq += 1;
                    }
                    while model.len() as u64 > max {
                        model.pop_first();
                        dropped += 1;
                    }
                    prop_assert_eq!(a.last_seq, next_seq - 1);
                }
                Op::Ack(positions) => {
                    let keys: Vec<u64> = model.keys().copied().collect();
                    if keys.is_empty() { continue; }
                    let seqs: Vec<u64> = positions.iter().map(|p| keys[*p as usize % keys.len()]).collect();
                    let n = store.ack(&seqs).unwrap();
                    let mut removed = 0;
                    for s in &seqs {
                        if model.remove(s).is_some() { removed += 1; }
                    }
                    prop_assert_eq!(n, removed);
                    acked += removed;
                }
                Op::Peek { after_pos, limit } => {
                    let keys: Vec<u64> = model.keys().copied().collect();
                    let after = if keys.is_empty() { 0 } else { keys[after_pos as usize % keys.len()] };
                    let got = store.peek(after, limit as usize).unwrap();
                    let want: Vec<(u64, Message)> = model.range(after + 1..).take(limit as usize).map(|(k, v)| (*k, v.clone())).collect();
                    prop_assert_eq!(got.iter().map(|r| (r.seq, r.message.clone())).collect::<Vec<_>>(), want);
                }
                Op::Reopen => {
                    drop(store);
                    store = Store::open_with(dir.path(), limits).unwrap();
                }
            }
            let st = store.stats().unwrap();
            prop_assert_eq!(st.depth, model.len() as u64);
            prop_assert_eq!(st.dropped_oldest, dropped);
            prop_assert_eq!(st.acked_total, acked);
            prop_assert_eq!(st.last_seq, next_seq - 1);
        }
    }
}
