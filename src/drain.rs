//! How soon the queue's backlog will be gone, from how fast its depth falls.
//!
//! Every instance hands back the messages it has no request slot for. Where each instance puts
//! them on its own booking line (at its own learned rate), the instance AIMD has left slowest
//! hands back the most, since every instance receives about the same share of the queue, and
//! books them furthest out: the backlog's last messages then come back slowly, from that one
//! line, while the others have room. (Measured on `make bench`: in the slowest runs, one
//! instance held nearly all of the last hundred messages.)
//!
//! The queue's depth is the one thing every instance sees alike. While the backlog drains, the
//! time left is about `depth / drain rate`; a message handed back at a uniformly random time
//! within that, from whichever instance, makes the returns of all instances together arrive
//! evenly until the backlog is gone, and `overbook` times faster than it has been draining, so
//! a quota the instances are not yet using is found. The gauge keeps, per queue, the depths it
//! has read over the last [`WINDOW`]; the drain rate is the fall from the oldest of them to the
//! newest. With no fall to measure (too little history, or a backlog steady or growing), it
//! gives no estimate, and the limiter's booking decides as before.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Depths older than this are forgotten: the drain rate is that of the last few seconds.
pub const WINDOW: Duration = Duration::from_secs(10);
/// The least history the drain rate is measured over.
pub const MIN_SPAN: Duration = Duration::from_secs(2);
/// How often an instance reads the depth of a queue it hands messages back to.
pub const READ_EVERY: Duration = Duration::from_secs(1);
/// The returns are spread this much faster than the backlog has been draining.
pub const OVERBOOK: f64 = 1.5;
/// The spread is never shorter than this (SQS visibility counts whole seconds).
pub const MIN_SPREAD: Duration = Duration::from_secs(1);

/// Depth readings per queue, kept across warm invocations; see the module documentation.
#[derive(Debug, Default)]
pub struct DrainGauge {
    readings: Mutex<HashMap<String, VecDeque<(Instant, u64)>>>,
}

impl DrainGauge {
    /// Whether the depth of `queue` is due to be read again at `now`.
    pub fn due(&self, queue: &str, now: Instant) -> bool {
        let readings = self.readings.lock().expect("drain gauge");
        readings
            .get(queue)
            .and_then(VecDeque::back)
            .is_none_or(|(at, _)| now.saturating_duration_since(*at) >= READ_EVERY)
    }

    /// Records that `queue` held `depth` messages (visible, in flight and delayed) at `now`.
    pub fn observe(&self, queue: &str, now: Instant, depth: u64) {
        let mut readings = self.readings.lock().expect("drain gauge");
        let series = readings.entry(queue.to_string()).or_default();
        series.push_back((now, depth));
        while series
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) > WINDOW)
        {
            series.pop_front();
        }
    }

    /// The time over which to spread the messages handed back to `queue` at `now`: the
    /// backlog's latest depth over `OVERBOOK` times its drain rate, at least [`MIN_SPREAD`];
    /// `None` without a fall to measure.
    pub fn spread(&self, queue: &str, now: Instant) -> Option<Duration> {
        let readings = self.readings.lock().expect("drain gauge");
        let series = readings.get(queue)?;
        let (first_at, first) = series
            .iter()
            .find(|(at, _)| now.saturating_duration_since(*at) <= WINDOW)?;
        let (last_at, last) = series.back()?;
        let span = last_at.saturating_duration_since(*first_at);
        if span < MIN_SPAN || last >= first {
            return None;
        }
        let rate = (first - last) as f64 / span.as_secs_f64();
        let seconds = *last as f64 / (OVERBOOK * rate);
        Some(Duration::from_secs_f64(seconds.min(1e9)).max(MIN_SPREAD))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const Q: &str = "arn:aws:sqs:us-east-1:123456789012:ingest";

    fn at(start: Instant, seconds: f64) -> Instant {
        start + Duration::from_secs_f64(seconds)
    }

    #[test]
    fn the_spread_is_the_depth_over_one_and_a_half_times_the_drain_rate() {
        let gauge = DrainGauge::default();
        let t0 = Instant::now();
        gauge.observe(Q, t0, 1000);
        gauge.observe(Q, at(t0, 1.0), 980);
        gauge.observe(Q, at(t0, 4.0), 920);
        // 80 messages in 4 s: 20/s; 920 left at 30/s is 30.67 s.
        let spread = gauge.spread(Q, at(t0, 4.0)).unwrap();
        assert_eq!(spread.as_millis(), 30_666);
    }

    #[test]
    fn no_estimate_without_two_seconds_of_history_or_a_falling_depth() {
        let gauge = DrainGauge::default();
        let t0 = Instant::now();
        assert_eq!(gauge.spread(Q, t0), None);
        gauge.observe(Q, t0, 100);
        gauge.observe(Q, at(t0, 1.5), 90);
        assert_eq!(gauge.spread(Q, at(t0, 1.5)), None, "1.5 s of history");
        gauge.observe(Q, at(t0, 3.0), 100);
        assert_eq!(gauge.spread(Q, at(t0, 3.0)), None, "steady backlog");
        gauge.observe(Q, at(t0, 4.0), 130);
        assert_eq!(gauge.spread(Q, at(t0, 4.0)), None, "growing backlog");
        assert_eq!(gauge.spread("another queue", at(t0, 4.0)), None);
    }

    #[test]
    fn old_readings_are_forgotten_and_the_rate_is_that_of_the_last_ten_seconds() {
        let gauge = DrainGauge::default();
        let t0 = Instant::now();
        gauge.observe(Q, t0, 10_000);
        gauge.observe(Q, at(t0, 20.0), 600);
        // The first reading is 20 s old: one reading left, nothing to measure.
        assert_eq!(gauge.spread(Q, at(t0, 20.0)), None);
        gauge.observe(Q, at(t0, 25.0), 500);
        // 20/s over the last 5 s, not 380/s since the start: 500 / 30 = 16.67 s.
        assert_eq!(gauge.spread(Q, at(t0, 25.0)).unwrap().as_millis(), 16_666);
        // A reading older than the window by the time it is asked for is not used either.
        assert_eq!(gauge.spread(Q, at(t0, 31.0)), None);
    }

    #[test]
    fn a_nearly_empty_queue_spreads_over_one_second() {
        let gauge = DrainGauge::default();
        let t0 = Instant::now();
        gauge.observe(Q, t0, 60);
        gauge.observe(Q, at(t0, 2.0), 20);
        assert_eq!(gauge.spread(Q, at(t0, 2.0)), Some(MIN_SPREAD));
    }

    #[test]
    fn the_depth_is_read_at_most_once_a_second_per_queue() {
        let gauge = DrainGauge::default();
        let t0 = Instant::now();
        assert!(gauge.due(Q, t0));
        gauge.observe(Q, t0, 10);
        assert!(!gauge.due(Q, at(t0, 0.5)));
        assert!(gauge.due("another queue", at(t0, 0.5)));
        assert!(gauge.due(Q, at(t0, 1.0)));
    }
}
