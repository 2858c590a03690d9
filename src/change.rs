//! Report by exception: which of a poll's values are published.
//!
//! A point with `on_change` is published when its value differs from the last value
//! *published* (not the last one read, so a slow drift inside the deadband is still reported
//! once it adds up), beyond its deadband for numbers, on any change for bools and text; and
//! again after `heartbeat` of silence, so that a consumer can tell "unchanged" from "gone".
//! Points without `on_change` are published at every poll.
//!
//! The filter holds what was last published per point. It is empty at start (the first poll
//! publishes everything) and emptied by the poller when a device goes offline (the first good
//! poll afterwards publishes everything: the consumer cannot know what happened in between).
//! A device that does not answer produces no values, so nothing stale is ever republished.
//!
//! Pure: the clock is passed in (`tokio::time::Instant`, so tests run on a paused clock).

use tokio::time::Instant;

use crate::mapping::{Deadband, Point, Reporting, Value};

/// What was last published per point of one device.
#[derive(Debug, Default)]
pub struct ChangeFilter {
    last: Vec<Option<(Value, Instant)>>,
}

impl ChangeFilter {
    /// Forgets everything published: the next values are all published.
    pub fn forget(&mut self) {
        self.last.clear();
    }

    /// Keeps in `values` (point index, value) those to publish now and records them as
    /// published. With `whole_device`, one value due keeps them all (`on_change: device`).
    pub fn retain(
        &mut self,
        points: &[Point],
        whole_device: bool,
        now: Instant,
        values: &mut Vec<(usize, Value)>,
    ) {
        if self.last.len() < points.len() {
            self.last.resize(points.len(), None);
        }
        let due =
            |(i, v): &(usize, Value)| is_due(&points[*i].reporting, self.last[*i].as_ref(), v, now);
        if whole_device {
            if !values.iter().any(due) {
                values.clear();
            }
        } else {
            values.retain(due);
        }
        // Only points reported by exception ever look at what was published before: the
        // others cost no copy of their value.
        for (i, v) in values
            .iter()
            .filter(|(i, _)| points[*i].reporting.on_change)
        {
            self.last[*i] = Some((v.clone(), now));
        }
    }

    /// Records a value published outside a poll (a command's read-back).
    pub fn published(&mut self, point: usize, value: &Value, now: Instant) {
        if self.last.len() <= point {
            self.last.resize(point + 1, None);
        }
        self.last[point] = Some((value.clone(), now));
    }
}

/// Whether `v` is to be published, given what was last published.
fn is_due(r: &Reporting, last: Option<&(Value, Instant)>, v: &Value, now: Instant) -> bool {
    if !r.on_change {
        return true;
    }
    let Some((prev, at)) = last else {
        return true;
    };
    if r.heartbeat.is_some_and(|h| now.duration_since(*at) >= h) {
        return true;
    }
    changed(prev, v, r.deadband)
}

/// Whether `v` differs from `prev` by more than the deadband (numbers) or at all (the rest,
/// and numbers without a deadband, compared exactly).
fn changed(prev: &Value, v: &Value, deadband: Option<Deadband>) -> bool {
    let (Some(db), Some(a), Some(b)) = (deadband, number(prev), number(v)) else {
        return prev != v;
    };
    let limit = match db {
        Deadband::Absolute(d) => d,
        Deadband::Percent(p) => p / 100.0 * a.abs(),
    };
    (b - a).abs() > limit
}

fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Int(x) => Some(*x as f64),
        Value::UInt(x) => Some(*x as f64),
        Value::Float(x) => Some(*x),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::mapping::DataType;
    use crate::modbus::Table;

    fn point(reporting: Reporting) -> Point {
        Point {
            reporting,
            ..Point::new("p", Table::Holding, 0, DataType::F32)
        }
    }

    fn on_change(deadband: Option<Deadband>, heartbeat: Option<Duration>) -> Reporting {
        Reporting {
            on_change: true,
            deadband,
            heartbeat,
        }
    }

    /// Feeds one value of point 0 and says whether it was published.
    fn feed(f: &mut ChangeFilter, points: &[Point], v: Value) -> bool {
        let mut values = vec![(0, v)];
        f.retain(points, false, Instant::now(), &mut values);
        !values.is_empty()
    }

    #[test]
    fn without_on_change_every_value_is_published() {
        let points = [point(Reporting::default())];
        let mut f = ChangeFilter::default();
        for _ in 0..3 {
            assert!(feed(&mut f, &points, Value::Float(1.0)));
        }
    }

    #[test]
    fn a_value_inside_the_deadband_is_not_published_one_outside_is() {
        let points = [point(on_change(Some(Deadband::Absolute(0.5)), None))];
        let mut f = ChangeFilter::default();
        assert!(
            feed(&mut f, &points, Value::Float(230.0)),
            "the first value"
        );
        assert!(!feed(&mut f, &points, Value::Float(230.4)));
        assert!(!feed(&mut f, &points, Value::Float(229.6)));
        assert!(
            !feed(&mut f, &points, Value::Float(230.5)),
            "exactly the deadband"
        );
        assert!(feed(&mut f, &points, Value::Float(230.6)));
        // Measured from the last *published* value (230.6), so a slow drift is reported.
        assert!(!feed(&mut f, &points, Value::Float(231.0)));
        assert!(feed(&mut f, &points, Value::Float(231.2)));
    }

    #[test]
    fn a_percentage_deadband_is_of_the_last_published_value() {
        let points = [point(on_change(Some(Deadband::Percent(2.0)), None))];
        let mut f = ChangeFilter::default();
        assert!(feed(&mut f, &points, Value::Float(100.0)));
        assert!(!feed(&mut f, &points, Value::Float(101.9)));
        assert!(feed(&mut f, &points, Value::Float(102.1)));
        // Around zero a percentage is no band at all: any change is published.
        assert!(feed(&mut f, &points, Value::Float(0.0)));
        assert!(feed(&mut f, &points, Value::Float(0.01)));
    }

    #[test]
    fn without_a_deadband_any_change_is_published_exactly() {
        let points = [point(on_change(None, None))];
        let mut f = ChangeFilter::default();
        assert!(feed(&mut f, &points, Value::UInt(u64::MAX)));
        assert!(!feed(&mut f, &points, Value::UInt(u64::MAX)));
        assert!(
            feed(&mut f, &points, Value::UInt(u64::MAX - 1)),
            "not compared as f64"
        );
        assert!(feed(&mut f, &points, Value::Null), "null is a change");
        assert!(!feed(&mut f, &points, Value::Null));
        assert!(feed(&mut f, &points, Value::Text("x".into())));
        assert!(feed(&mut f, &points, Value::Bool(true)));
        assert!(!feed(&mut f, &points, Value::Bool(true)));
    }

    #[test]
    fn a_deadband_never_hides_a_change_to_or_from_null() {
        let points = [point(on_change(Some(Deadband::Absolute(10.0)), None))];
        let mut f = ChangeFilter::default();
        assert!(feed(&mut f, &points, Value::Float(1.0)));
        assert!(feed(&mut f, &points, Value::Null));
        assert!(feed(&mut f, &points, Value::Float(1.0)));
    }

    #[tokio::test(start_paused = true)]
    async fn the_heartbeat_fires_after_the_set_silence() {
        let points = [point(on_change(
            Some(Deadband::Absolute(1.0)),
            Some(Duration::from_secs(300)),
        ))];
        let mut f = ChangeFilter::default();
        assert!(feed(&mut f, &points, Value::Float(20.0)));
        tokio::time::advance(Duration::from_secs(299)).await;
        assert!(
            !feed(&mut f, &points, Value::Float(20.0)),
            "4 m 59 s of silence"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(
            feed(&mut f, &points, Value::Float(20.0)),
            "5 m: the heartbeat"
        );
        tokio::time::advance(Duration::from_secs(200)).await;
        assert!(
            !feed(&mut f, &points, Value::Float(20.5)),
            "counted from the heartbeat"
        );
        tokio::time::advance(Duration::from_secs(100)).await;
        assert!(feed(&mut f, &points, Value::Float(20.5)));
    }

    #[test]
    fn forgetting_publishes_everything_once_more() {
        let points = [point(on_change(None, None))];
        let mut f = ChangeFilter::default();
        assert!(feed(&mut f, &points, Value::Float(1.0)));
        assert!(!feed(&mut f, &points, Value::Float(1.0)));
        f.forget();
        assert!(feed(&mut f, &points, Value::Float(1.0)));
        assert!(!feed(&mut f, &points, Value::Float(1.0)));
    }

    #[test]
    fn a_whole_device_is_published_when_any_point_is_due() {
        let points = [
            point(on_change(Some(Deadband::Absolute(1.0)), None)),
            point(on_change(Some(Deadband::Absolute(1.0)), None)),
        ];
        let now = Instant::now();
        let poll = |a: f64, b: f64| vec![(0, Value::Float(a)), (1, Value::Float(b))];
        for whole in [false, true] {
            let mut f = ChangeFilter::default();
            let mut v = poll(1.0, 1.0);
            f.retain(&points, whole, now, &mut v);
            assert_eq!(v.len(), 2, "first poll");
            let mut v = poll(1.5, 1.5);
            f.retain(&points, whole, now, &mut v);
            assert!(v.is_empty(), "nothing changed enough");
            let mut v = poll(1.5, 3.0);
            f.retain(&points, whole, now, &mut v);
            let kept: Vec<usize> = v.iter().map(|(i, _)| *i).collect();
            assert_eq!(kept, if whole { vec![0, 1] } else { vec![1] });
        }
    }

    #[test]
    fn a_commanded_value_counts_as_published() {
        let points = [point(on_change(None, None))];
        let mut f = ChangeFilter::default();
        f.published(0, &Value::Float(5.0), Instant::now());
        assert!(!feed(&mut f, &points, Value::Float(5.0)));
    }
}
