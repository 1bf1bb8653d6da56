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
//! evenly until the backlog is gone. A message with hand-backs to spare comes back [`OVERBOOK`]
//! times faster than the backlog has been draining, so a quota the instances are not yet using
//! is found; one on its last two hand-backs at the drain rate itself
//! ([`crate::redelivery::Budget::overbook`]). The gauge keeps, per queue, the depths it
//! has read over the last [`WINDOW`]; the drain rate is the fall from the oldest of them to the
//! newest. With no fall to measure (too little history, or a backlog steady or growing), it
//! gives no estimate, and the limiter's booking decides as before.
//!
//! The spread uses the highest drain rate the gauge has measured over at least [`PEAK_SPAN`]
//! within the last [`PEAK_MEMORY`], if that is higher than the last ten seconds'. The rate of
//! the moment is a poor guide at both ends of a backlog: at the start it still counts the
//! seconds the instances spent finding the quota, and near the end the backlog drains slower
//! because messages handed back earlier are still away. Spreading over the rate of the moment
//! then feeds on itself: a slower drain lengthens the spreads, which slows the drain further,
//! and the API idles while the last messages come back. A rate the API has already sustained
//! for seconds is one it can sustain again. Spreading too short is safe: a message that comes
//! back too early is handed back again or waits for its slot. The peak is forgotten once the
//! queue is seen empty, so the next backlog starts from its own rate.
//!
//! A rate measured over the first seconds of a backlog is the least sure: it counts the
//! instances finding the quota, and a slow start makes it low. A low rate makes a long spread,
//! and a message handed back that far cannot be called back. So an instance does not hand a
//! message back for want of a slot before the gauge has an estimate: for up to [`WARM_UP`]
//! after it first reads a backlog's depth (while it has not seen it fall for [`MIN_SPAN`]),
//! such a message waits for its slot inside the invocation instead, and the instances drain
//! the backlog at the rate they have found while the gauge measures it. This applies to every
//! queue, with a receive budget or not: each hand-back spends a receive, one of a few
//! deliveries, or with no redrive policy a receive and an invocation more. A backlog that does
//! not fall (traffic steadily above the quota) gives no estimate, and after [`WARM_UP`] the
//! limiter's bookings decide as before. With the estimate made this way, the spread is not
//! bounded further: on `make bench`, a bound of four times the time watched (the rule before
//! the warm-up) held a 6,000-message backlog's hand-backs to the first minute or so, and its
//! last deliveries then waited in their invocations (docs/throttling.md).
//!
//! The depth also says how much of the quota the other instances can be using. A backlog's last
//! messages are few and scattered: some held by an instance whose rate AIMD left low, some away
//! until their time, while the other instances have nothing to do. So an instance holding a
//! batch may call at the part of the drain rate its batch makes of the depth
//! ([`DrainGauge::share`]), if that is above its own rate: the depth counts every message in
//! flight, so these parts add up to the drain rate at most. And once the backlog would drain
//! within [`ENDGAME`] at its rate ([`DrainGauge::ending`]), each instance calls back every
//! message it still has away, rather than leave the last of them to come back one by one after
//! the API has gone idle.

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
/// The returns of a message with hand-backs to spare are spread this much faster than the
/// backlog has been draining ([`crate::redelivery::Budget::overbook`]).
pub const OVERBOOK: f64 = 1.5;
/// The spread is never shorter than this (SQS visibility counts whole seconds).
pub const MIN_SPREAD: Duration = Duration::from_secs(1);
/// The least span a drain rate must be measured over to count as a peak.
pub const PEAK_SPAN: Duration = Duration::from_secs(4);
/// How long a peak drain rate is remembered.
pub const PEAK_MEMORY: Duration = Duration::from_secs(60);
/// A backlog that drains within this at its drain rate is in its last seconds: the messages
/// each instance handed back are called back whole, since the quota can take them all.
pub const ENDGAME: Duration = Duration::from_secs(2);
/// How long after it first reads a backlog's depth an instance keeps messages it has no slot
/// for, rather than hand them back before the gauge has an estimate.
pub const WARM_UP: Duration = Duration::from_secs(10);

/// Depth readings per queue, and the drain rates measured from them, kept across warm
/// invocations; see the module documentation.
#[derive(Debug, Default)]
pub struct DrainGauge {
    queues: Mutex<HashMap<String, Queue>>,
}

#[derive(Debug, Default)]
struct Queue {
    /// Depths read over the last [`WINDOW`].
    readings: VecDeque<(Instant, u64)>,
    /// When a read was last claimed ([`DrainGauge::claim`]).
    claimed: Option<Instant>,
    /// Drain rates measured over at least [`PEAK_SPAN`], over the last [`PEAK_MEMORY`].
    rates: VecDeque<(Instant, f64)>,
    /// When this backlog's warm-up began: the first claim of a read since the queue was last
    /// seen empty, or the first reading after a gap of [`WINDOW`].
    warm_from: Option<Instant>,
}

impl Queue {
    fn due(&self, now: Instant) -> bool {
        let last = self.readings.back().map(|(at, _)| *at).max(self.claimed);
        last.is_none_or(|at| now.saturating_duration_since(at) >= READ_EVERY)
    }

    /// The fall in depth per second from the oldest reading within [`WINDOW`] of `now` to the
    /// newest, if it is measured over at least `span` and the depth fell.
    fn drain_rate(&self, now: Instant, span: Duration) -> Option<f64> {
        let (first_at, first) = self
            .readings
            .iter()
            .find(|(at, _)| now.saturating_duration_since(*at) <= WINDOW)?;
        let (last_at, last) = self.readings.back()?;
        let measured = last_at.saturating_duration_since(*first_at);
        (measured >= span && last < first).then(|| (first - last) as f64 / measured.as_secs_f64())
    }

    /// The latest depth and the rate it drains at: the last ten seconds' rate, or the peak of
    /// the last minute if higher. `None` without a fall to measure now.
    fn outlook(&self, now: Instant) -> Option<(u64, f64)> {
        let rate = self.drain_rate(now, MIN_SPAN)?;
        let peak = self
            .rates
            .iter()
            .filter(|(at, _)| now.saturating_duration_since(*at) <= PEAK_MEMORY)
            .map(|(_, rate)| *rate)
            .fold(rate, f64::max);
        let (_, depth) = self.readings.back()?;
        Some((*depth, peak))
    }
}

impl DrainGauge {
    /// Whether the depth of `queue` is due to be read again at `now`: read at most once per
    /// [`READ_EVERY`], counting reads claimed and not yet recorded. Readers use
    /// [`DrainGauge::claim`].
    #[cfg(test)]
    pub fn due(&self, queue: &str, now: Instant) -> bool {
        let queues = self.queues.lock().expect("drain gauge");
        queues.get(queue).is_none_or(|q| q.due(now))
    }

    /// The part of the backlog's drain rate that `holding` messages of `queue` make of its
    /// latest depth: the rate at which an instance holding them may call while they are most
    /// of what is left ([`crate::limiter::RateLimiter::reserve_lifted`]). The depth counts the
    /// messages in flight, so what every instance may take this way adds up to the drain rate
    /// at most. `None` without a fall to measure now.
    pub fn share(&self, queue: &str, now: Instant, holding: u64) -> Option<f64> {
        let queues = self.queues.lock().expect("drain gauge");
        let (depth, rate) = queues.get(queue)?.outlook(now)?;
        Some(rate * holding.min(depth) as f64 / depth.max(1) as f64)
    }

    /// Whether what is left of `queue`'s backlog drains within [`ENDGAME`] at its drain rate:
    /// then the messages handed back are called back whole ([`crate::redelivery::Away`]).
    pub fn ending(&self, queue: &str, now: Instant) -> bool {
        let queues = self.queues.lock().expect("drain gauge");
        queues
            .get(queue)
            .and_then(|q| q.outlook(now))
            .is_some_and(|(depth, rate)| depth as f64 <= rate * ENDGAME.as_secs_f64())
    }

    /// Claims the next read of `queue`'s depth: true if it is due at `now`, and then it is not
    /// due for anyone else until [`READ_EVERY`] has passed. Concurrent calls of one invocation
    /// read it once.
    pub fn claim(&self, queue: &str, now: Instant) -> bool {
        let mut queues = self.queues.lock().expect("drain gauge");
        let q = queues.entry(queue.to_string()).or_default();
        let due = q.due(now);
        if due {
            q.claimed = Some(now);
            q.warm_from.get_or_insert(now);
        }
        due
    }

    /// Whether a message of `queue` without a request slot should wait for it rather than be
    /// handed back: less than [`WARM_UP`] has passed since the first read of this backlog's
    /// depth was claimed (answered or not), and there is no drain rate to spread hand-backs
    /// over yet.
    pub fn warming(&self, queue: &str, now: Instant) -> bool {
        let queues = self.queues.lock().expect("drain gauge");
        queues.get(queue).is_some_and(|q| {
            q.warm_from
                .is_some_and(|from| now.saturating_duration_since(from) < WARM_UP)
                && q.drain_rate(now, MIN_SPAN).is_none()
        })
    }

    /// Records that `queue` held `depth` messages (visible, in flight and delayed) at `now`.
    pub fn observe(&self, queue: &str, now: Instant, depth: u64) {
        let mut queues = self.queues.lock().expect("drain gauge");
        let q = queues.entry(queue.to_string()).or_default();
        if depth == 0 {
            // The backlog is gone: the next one is measured afresh, and warms up again.
            q.readings.clear();
            q.rates.clear();
            q.warm_from = None;
        }
        forget_older(&mut q.readings, now, WINDOW);
        if q.readings.is_empty() && depth > 0 {
            // Not read for a while: a new backlog, as far as this instance can tell.
            q.warm_from = Some(now);
        }
        q.readings.push_back((now, depth));
        if let Some(rate) = q.drain_rate(now, PEAK_SPAN) {
            q.rates.push_back((now, rate));
        }
        forget_older(&mut q.rates, now, PEAK_MEMORY);
    }

    /// The time the backlog of `queue` has left at `now`: its latest depth over its drain rate
    /// (the last ten seconds', or the peak of the last minute if higher); `None` without a fall
    /// to measure now. Hand-backs are spread over it ([`spread`]).
    pub fn time_left(&self, queue: &str, now: Instant) -> Option<Duration> {
        let queues = self.queues.lock().expect("drain gauge");
        let (depth, rate) = queues.get(queue)?.outlook(now)?;
        Some(Duration::from_secs_f64((depth as f64 / rate).min(1e9)))
    }
}

/// The time over which to spread a message handed back while its backlog has `time_left`,
/// returning `overbook` times faster than the backlog has been draining
/// ([`crate::redelivery::Budget::overbook`]): at least [`MIN_SPREAD`].
pub fn spread(time_left: Duration, overbook: f64) -> Duration {
    time_left.div_f64(overbook).max(MIN_SPREAD)
}

/// Drops the entries of `series` more than `age` older than `now`.
fn forget_older<T>(series: &mut VecDeque<(Instant, T)>, now: Instant, age: Duration) {
    while series
        .front()
        .is_some_and(|(at, _)| now.saturating_duration_since(*at) > age)
    {
        series.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const Q: &str = "arn:aws:sqs:us-east-1:123456789012:ingest";

    fn at(start: Instant, seconds: f64) -> Instant {
        start + Duration::from_secs_f64(seconds)
    }

    /// The spread of a message with hand-backs to spare.
    fn spread_at(gauge: &DrainGauge, queue: &str, now: Instant) -> Option<Duration> {
        gauge
            .time_left(queue, now)
            .map(|left| spread(left, OVERBOOK))
    }

    #[test]
    fn a_message_on_its_last_hand_backs_returns_at_the_drain_rate_itself() {
        let gauge = DrainGauge::default();
        let t0 = Instant::now();
        gauge.observe(Q, t0, 1000);
        gauge.observe(Q, at(t0, 4.0), 920);
        // 920 left at 20/s: 46 s, overbooked by 1.5 to 30.67 s.
        let left = gauge.time_left(Q, at(t0, 4.0)).unwrap();
        assert_eq!(left.as_millis(), 46_000);
        assert_eq!(spread(left, 1.0).as_millis(), 46_000);
        assert_eq!(spread(left, OVERBOOK).as_millis(), 30_666);
        assert_eq!(spread(Duration::from_millis(300), 1.0), MIN_SPREAD);
    }

    #[test]
    fn the_spread_is_the_depth_over_one_and_a_half_times_the_drain_rate() {
        let gauge = DrainGauge::default();
        let t0 = Instant::now();
        gauge.observe(Q, t0, 1000);
        gauge.observe(Q, at(t0, 4.0), 920);
        gauge.observe(Q, at(t0, 8.0), 840);
        // 160 messages in 8 s: 20/s; 840 left at 30/s is 28 s.
        let spread = spread_at(&gauge, Q, at(t0, 8.0)).unwrap();
        assert_eq!(spread.as_millis(), 28_000);
    }

    #[test]
    fn no_estimate_without_two_seconds_of_history_or_a_falling_depth() {
        let gauge = DrainGauge::default();
        let t0 = Instant::now();
        assert_eq!(spread_at(&gauge, Q, t0), None);
        gauge.observe(Q, t0, 100);
        gauge.observe(Q, at(t0, 1.5), 90);
        assert_eq!(spread_at(&gauge, Q, at(t0, 1.5)), None, "1.5 s of history");
        gauge.observe(Q, at(t0, 3.0), 100);
        assert_eq!(spread_at(&gauge, Q, at(t0, 3.0)), None, "steady backlog");
        gauge.observe(Q, at(t0, 4.0), 130);
        assert_eq!(spread_at(&gauge, Q, at(t0, 4.0)), None, "growing backlog");
        assert_eq!(spread_at(&gauge, "another queue", at(t0, 4.0)), None);
    }

    #[test]
    fn old_readings_are_forgotten_and_the_rate_is_that_of_the_last_ten_seconds() {
        let gauge = DrainGauge::default();
        let t0 = Instant::now();
        gauge.observe(Q, t0, 10_000);
        gauge.observe(Q, at(t0, 20.0), 600);
        // The first reading is 20 s old: one reading left, nothing to measure.
        assert_eq!(spread_at(&gauge, Q, at(t0, 20.0)), None);
        gauge.observe(Q, at(t0, 25.0), 500);
        // 20/s over the last 5 s, not 380/s since the start: 500 / 30 = 16.67 s.
        assert_eq!(
            spread_at(&gauge, Q, at(t0, 25.0)).unwrap().as_millis(),
            16_666
        );
        // A reading older than the window by the time it is asked for is not used either.
        assert_eq!(spread_at(&gauge, Q, at(t0, 31.0)), None);
    }

    #[test]
    fn a_slower_drain_now_spreads_over_the_peak_rate_of_the_last_minute() {
        let gauge = DrainGauge::default();
        let t0 = Instant::now();
        // 20/s for four seconds, then 5/s.
        for second in 0..=4 {
            gauge.observe(Q, at(t0, second as f64), 1000 - 20 * second);
        }
        for second in 5..=14 {
            gauge.observe(Q, at(t0, second as f64), 920 - 5 * (second - 4));
        }
        // The last ten seconds drained 5/s (870 left: 116 s at 7.5/s), but 20/s was
        // sustained for four seconds within the minute: 870 / 30 = 29 s.
        assert_eq!(
            spread_at(&gauge, Q, at(t0, 14.0)).unwrap().as_millis(),
            29_000
        );
        // A minute later the peak is forgotten and the rate of the moment applies again.
        for second in 15..=80 {
            gauge.observe(Q, at(t0, second as f64), 870 - 5 * (second - 14));
        }
        // 540 left at 5/s: 540 / 7.5 = 72 s.
        assert_eq!(
            spread_at(&gauge, Q, at(t0, 80.0)).unwrap().as_millis(),
            72_000
        );
    }

    #[test]
    fn a_fall_shorter_than_the_peak_span_is_no_peak_and_an_empty_queue_forgets_it() {
        let gauge = DrainGauge::default();
        let t0 = Instant::now();
        // 100 messages gone in three seconds, then 1/s: the burst is never measured over
        // four seconds on its own; the peak is the first four seconds, which include it.
        gauge.observe(Q, t0, 400);
        gauge.observe(Q, at(t0, 3.0), 300);
        gauge.observe(Q, at(t0, 4.0), 299);
        gauge.observe(Q, at(t0, 14.0), 289);
        // The window now holds 4.0 to 14.0 (1/s); the peak 101 / 4 = 25.25/s.
        let spread = spread_at(&gauge, Q, at(t0, 14.0)).unwrap();
        assert_eq!(spread.as_millis(), (289_000.0 / (1.5 * 25.25)) as u128);
        // The queue empties; a new backlog starts with no peak.
        gauge.observe(Q, at(t0, 20.0), 0);
        gauge.observe(Q, at(t0, 21.0), 500);
        gauge.observe(Q, at(t0, 23.0), 490);
        // Measured from the oldest reading in the window (0 at 20 s), the depth grew: no
        // estimate.
        assert_eq!(spread_at(&gauge, Q, at(t0, 23.0)), None);
        gauge.observe(Q, at(t0, 31.0), 450);
        gauge.observe(Q, at(t0, 36.0), 425);
        // The readings of 21 and 23 s are over ten seconds old: 450 to 425 in 5 s is 5/s, and
        // the earlier peak (25.25/s) is gone: 425 / 7.5 = 56.67 s.
        assert_eq!(
            spread_at(&gauge, Q, at(t0, 36.0)).unwrap().as_millis(),
            56_666
        );
    }

    #[test]
    fn a_batch_may_take_its_part_of_the_drain_rate_and_the_last_two_seconds_are_called_back() {
        let gauge = DrainGauge::default();
        let t0 = Instant::now();
        assert_eq!(gauge.share(Q, t0, 10), None, "never read");
        assert!(!gauge.ending(Q, t0));
        // 20/s: 100, 80, 60 left.
        for second in 0..=2 {
            gauge.observe(Q, at(t0, second as f64), 100 - 20 * second);
        }
        let now = at(t0, 2.0);
        // Ten messages of the sixty left: a sixth of 20/s.
        let share = gauge.share(Q, now, 10).unwrap();
        assert!((share - 20.0 / 6.0).abs() < 1e-9, "{share}");
        // Three seconds' worth is not the end.
        assert!(!gauge.ending(Q, now));
        gauge.observe(Q, at(t0, 3.0), 40);
        let now = at(t0, 3.0);
        assert!(gauge.ending(Q, now), "40 left at 20/s");
        assert!((gauge.share(Q, now, 10).unwrap() - 5.0).abs() < 1e-9);
        // Holding more than the depth read (read before more came): the drain rate at most.
        assert!((gauge.share(Q, now, 50).unwrap() - 20.0).abs() < 1e-9);
        assert_eq!(gauge.share("another queue", now, 10), None);
        // A backlog that stopped falling for ten seconds gives no part and no end.
        gauge.observe(Q, at(t0, 14.0), 40);
        assert_eq!(gauge.share(Q, at(t0, 14.0), 10), None);
        assert!(!gauge.ending(Q, at(t0, 14.0)));
    }

    #[test]
    fn a_backlog_warms_up_until_its_fall_is_measured_and_ten_seconds_at_most() {
        let gauge = DrainGauge::default();
        let t0 = Instant::now();
        assert!(!gauge.warming(Q, t0), "never read: nothing to wait for");
        assert!(gauge.claim(Q, t0));
        assert!(gauge.warming(Q, t0), "a read under way");
        gauge.observe(Q, t0, 300);
        assert!(gauge.warming(Q, at(t0, 1.0)));
        gauge.observe(Q, at(t0, 1.5), 290);
        assert!(gauge.warming(Q, at(t0, 1.5)), "1.5 s of history");
        // Two seconds of falling depth: an estimate, and no more waiting. Without the old
        // bound, 280 left at 15/s is 18.67 s, though the backlog was watched for two.
        gauge.observe(Q, at(t0, 2.0), 280);
        assert!(!gauge.warming(Q, at(t0, 2.0)));
        assert_eq!(
            spread_at(&gauge, Q, at(t0, 2.0)).unwrap().as_millis(),
            18_666
        );
        // A backlog that does not fall gives no estimate, nor does a depth that cannot be
        // read: the wait ends ten seconds after the first reading or claim all the same.
        for second in 0..=10 {
            gauge.observe("steady", at(t0, second as f64), 500);
            assert!(gauge.claim("unreadable", at(t0, second as f64)));
            for queue in ["steady", "unreadable"] {
                assert_eq!(gauge.warming(queue, at(t0, second as f64)), second < 10);
            }
        }
        // Once the queue is seen empty, the next backlog warms up again.
        gauge.observe("steady", at(t0, 11.0), 0);
        assert!(gauge.claim("steady", at(t0, 12.0)));
        gauge.observe("steady", at(t0, 12.0), 200);
        assert!(gauge.warming("steady", at(t0, 12.5)));
    }

    #[test]
    fn concurrent_callers_claim_one_read_a_second() {
        let gauge = DrainGauge::default();
        let t0 = Instant::now();
        assert!(gauge.claim(Q, t0));
        assert!(!gauge.claim(Q, t0), "claimed, not yet read");
        assert!(!gauge.due(Q, at(t0, 0.5)));
        gauge.observe(Q, at(t0, 0.1), 10);
        assert!(!gauge.claim(Q, at(t0, 0.9)));
        assert!(gauge.claim(Q, at(t0, 1.1)));
    }

    #[test]
    fn a_nearly_empty_queue_spreads_over_one_second() {
        let gauge = DrainGauge::default();
        let t0 = Instant::now();
        gauge.observe(Q, t0, 60);
        gauge.observe(Q, at(t0, 2.0), 20);
        assert_eq!(spread_at(&gauge, Q, at(t0, 2.0)), Some(MIN_SPREAD));
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
