//! The redelivery policy: when a message without a request slot goes back to the queue and when
//! it waits inside the invocation instead, how long each call may wait for its slot, how far
//! ahead a message goes, and how much of the invocation is kept for reporting.
//!
//! Each decision is a small function over plain inputs (receive count, the queue's
//! `maxReceiveCount`, time left, the limiter's rate); [`crate::ingest`] gathers the inputs and
//! applies the decisions.
//!
//! The rule, and why:
//!
//! - **Every hand-back spends a delivery.** SQS counts a message handed back like any other
//!   receive, and moves it to the dead-letter queue, with no reason, once it has been received
//!   `maxReceiveCount` times. So a message may be handed back for want of a request slot only
//!   while, after that hand-back, it still has [`RESERVED_DELIVERIES`] deliveries left for real
//!   failures (throttled or failing calls that outlast `API_MAX_ATTEMPTS`, a deadline). Past
//!   that, it waits for its slot inside the invocation: billed, but never dead-lettered for
//!   the function's own pacing. At `maxReceiveCount` 3 no message is ever handed back; at 5, at
//!   most twice. While a queue's redrive policy cannot be read, none is: it may have one.
//! - **No hand-back before the backlog's drain rate is known.** A message without a slot waits
//!   for it while its queue's backlog warms up (up to ten seconds from the first reading of its
//!   depth, until its fall is measured: [`crate::drain`]); after that each hand-back goes at a
//!   random time within the time the backlog has left, however far that is, so the few
//!   hand-backs a message has are made from a measured rate. A queue with no redrive policy is
//!   no exception: nothing is dead-lettered there, but every hand-back is still a receive and
//!   an invocation, and hand-backs kept within one backoff ceiling each brought a message back
//!   3.7 times on average on a 100-message backlog, up to 13 times.
//! - **Paced on its last hand-backs, and called back into free slots.** A message with more
//!   than [`PACED_HAND_BACKS`] hand-backs left returns faster than the backlog drains, to find
//!   quota not yet used; its last ones return at the drain rate, since a return that misses
//!   waits in an invocation on its last allowed delivery ([`Budget::overbook`]). Quota those
//!   returns leave unused goes to messages called back from the queue ([`Away`]): after each
//!   batch, as many as the instance's bucket still holds or, if more, as its rate allowed
//!   while it sat idle before the batch ([`IDLE_CALL_BACK`]).
//! - **Placed where few are due.** Of [`PLACEMENT_CHOICES`] random times within the spread, a
//!   hand-back takes the one with the fewest of this instance's hand-backs due within
//!   [`PLACEMENT_WINDOW`] ([`Away::due_near`]): a return that misses its slot is handed back
//!   again, and uniform draws over the time left heap those again-returns up towards the
//!   backlog's end, where they wait on their last delivery, billed.
//! - **Pushed later where too many are due.** An instance with no room to call back counts
//!   its own hand-backs due over the next [`PUSH_BACK_SPAN`] (past [`CALL_BACK_AHEAD`]). If
//!   that is more than its part of the drain rate serves in that time (its messages away over
//!   the queue's depth, times the drain rate), the excess, furthest due first, is moved later
//!   within the backlog's time left, placed as hand-backs are ([`Away::crowded`]). A push
//!   spends no receive, where a return that finds no slot is handed back again (a delivery
//!   spent) or waits billed on its last one. Call-backs correct a spread that proves too long;
//!   this corrects one that proves too short. In a backlog's last 30 seconds the instance keeps
//!   twice its part ([`PUSH_BACK_MARGIN`]): returns held to the drain rate keep it where it
//!   was measured, and quota left unused that late is not made up.
//! - **A message on its last delivery that still fails** is sent to the dead-letter queue by the
//!   function, with `ErrorCode` `RetriesExhausted` and its last error, instead of being left
//!   for SQS to move there without a reason. So is a message with no visibility time left (SQS
//!   keeps a message invisible at most 12 hours since its first receive).
//! - **FIFO message groups and bodies naming several objects wait in the invocation.** Handing
//!   back a FIFO message blocks its whole group anyway and spends a delivery of every message
//!   behind it; a body naming several objects would spend slots again on the objects already
//!   made, so it is kept until done and makes progress on every delivery.
//! - **Each call has its own wait.** A follow-up call (DescribeAsset after a refused
//!   CreateAsset, or a retry after a throttle, which empties the bucket) may wait at least two
//!   intervals at the limiter's rate, so a retry can happen at all, bounded by the deadline.
//! - **The deadline margin scales with the invocation**: a fifth of its time, at most
//!   `DEADLINE_MARGIN_MS`, at least [`MIN_MARGIN`]; an attempt is started while at least
//!   [`MIN_ATTEMPT`] is left before that, and clamped to the time left.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::backoff::{visibility_room, Backoff, SQS_MAX_VISIBILITY};

/// Deliveries a message keeps for real failures: it is not handed back for want of a request
/// slot if that would leave it fewer.
pub const RESERVED_DELIVERIES: u32 = 2;

/// A message's last hand-backs, this many, return at the backlog's measured drain rate; the
/// ones before at [`crate::drain::OVERBOOK`] times it. See [`Budget::overbook`].
pub const PACED_HAND_BACKS: u32 = 2;

/// The least time kept before the deadline to dead-letter, change visibility and answer.
pub const MIN_MARGIN: Duration = Duration::from_millis(200);

/// The least time an attempt may be given: no call starts with less left before the margin.
pub const MIN_ATTEMPT: Duration = Duration::from_millis(200);

/// When a message to retry should come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redelivery {
    /// Exponential backoff with full jitter from the message's receive count.
    Backoff,
    /// No request slot was free in time: come back when the rate limiter expects room (booked
    /// no further ahead than half the backoff ceiling for the message's receive count), or
    /// within the time the queue's backlog has left once that is known ([`crate::drain`]).
    After(Duration),
    /// No request slot was free in time and none could be booked within this horizon: come
    /// back at a random time within it (full jitter, never past the backoff ceiling), or within
    /// the time the queue's backlog has left once that is known.
    Within(Duration),
    /// A resource quota is exhausted: come back after `QUOTA_REDELIVERY_SECONDS`.
    Quota,
    /// Leave the queue's own visibility timeout in place.
    Queue,
    /// Visible again at once: a FIFO message kept back behind a failed one of its group, which
    /// SQS will not deliver before that one anyway.
    Immediate,
}

/// Where a message stands with its deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// `ApproximateReceiveCount`: this delivery's number, from 1.
    pub receives: u32,
    /// The queue's `maxReceiveCount`, if it has a redrive policy.
    pub max_receives: Option<u32>,
}

impl Budget {
    /// Whether the message may go back to the queue for want of a request slot: only if it
    /// keeps [`RESERVED_DELIVERIES`] deliveries after this one.
    pub fn may_hand_back(&self) -> bool {
        self.max_receives
            .is_none_or(|max| self.receives + RESERVED_DELIVERIES < max)
    }

    /// How many of the message's later deliveries may still be handed back for want of a slot
    /// after this one, if its budget is known.
    pub fn hand_backs_after(&self) -> Option<u32> {
        self.max_receives
            .map(|max| max.saturating_sub(self.receives + 1 + RESERVED_DELIVERIES))
    }

    /// How much faster than the backlog has been draining this message's hand-back should
    /// return ([`crate::drain::spread`]): [`crate::drain::OVERBOOK`] while it has hand-backs to
    /// spare, and the measured rate itself on its last [`PACED_HAND_BACKS`].
    ///
    /// Overbooking finds quota the instances are not yet using, and a return that finds no
    /// slot is handed back again: that costs a delivery, affordable while several hand-backs
    /// remain. A message near the end of its hand-backs that returns over the quota waits for
    /// its slot inside the invocation on its last delivery, billed; its returns are paced at
    /// the rate measured, and quota left unused is filled by calling back messages already
    /// handed back ([`Away`]). Measured on `make bench` (docs/throttling.md): overbooking every
    /// hand-back at `maxReceiveCount` 5 billed about 230 s on scenario B, pacing them at the
    /// rate with call-backs 117-181 s at the same drain time; pacing every hand-back at a
    /// budget of 20 drained 1.15-1.23x the ideal, overbooking all but the last two 1.01-1.02x.
    pub fn overbook(&self) -> f64 {
        match self.hand_backs_after() {
            Some(left) if left < PACED_HAND_BACKS => 1.0,
            _ => crate::drain::OVERBOOK,
        }
    }

    /// Whether this is the message's last delivery: reported for redelivery, SQS would move it
    /// to the dead-letter queue without a reason.
    pub fn is_last(&self) -> bool {
        self.max_receives.is_some_and(|max| self.receives >= max)
    }
}

/// How many backoff ceilings a hand-back for want of a slot may reach before the queue's drain
/// rate is known. Measured on `make bench` (docs/throttling.md): 1, 4 and 8
/// drain scenarios A and B of the matrix alike, within noise. Once the rate is known the
/// spread alone decides: the instances wait for their slots until then
/// ([`crate::drain::WARM_UP`]), so the rate is measured on a backlog drained at the quota. (An
/// unbounded reach without that warm-up drained B in 1.6 to 4 times the ideal: hand-backs made
/// from the rate of the first seconds went too far.)
pub const BUDGETED_REACH: u32 = 8;

/// What decides how long one call may wait for its request slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    /// The message's deliveries.
    pub budget: Budget,
    /// A FIFO message: handing it back holds up its group.
    pub fifo: bool,
    /// One of several objects of one body.
    pub several: bool,
    /// A follow-up call of the same message: DescribeAsset after a refusal, or a retry.
    pub follow_up: bool,
}

/// How long a call may wait for its slot before its message goes back to the queue: `None` to
/// wait as long as the invocation allows. `interval` is one request at the limiter's rate.
pub fn slot_wait(need: Need, permit_wait: Duration, interval: Duration) -> Option<Duration> {
    if need.fifo || need.several || !need.budget.may_hand_back() {
        None
    } else if need.follow_up {
        Some(permit_wait.max(interval.saturating_mul(2)))
    } else {
        Some(permit_wait)
    }
}

/// The time kept free before the deadline, for an invocation given `budget` in all: a fifth of
/// it, at most `configured`, at least [`MIN_MARGIN`].
pub fn deadline_margin(budget: Duration, configured: Duration) -> Duration {
    (budget / 5).min(configured).max(MIN_MARGIN)
}

/// Whether an invocation given `budget` can do any useful work: one attempt of [`MIN_ATTEMPT`]
/// must fit before its margin.
pub fn fits_an_attempt(budget: Duration, configured_margin: Duration) -> bool {
    budget >= deadline_margin(budget, configured_margin) + MIN_ATTEMPT
}

/// The redelivery delays' settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delays {
    /// Exponential backoff from the receive count.
    pub backoff: Backoff,
    /// `QUOTA_REDELIVERY_SECONDS`.
    pub quota: Duration,
    /// `FIFO_REDELIVERY_CAP_SECONDS`.
    pub fifo_cap: Duration,
}

impl Delays {
    /// How long a message to retry stays away: `None` where the queue's own visibility timeout
    /// applies. `spread` is the time over which its queue's hand-backs are spread, when known
    /// ([`crate::drain::DrainGauge::spread`]); `unit` in `[0, 1)` draws the jitter.
    ///
    /// A hand-back for want of a slot reaches as far as the spread says, or [`BUDGETED_REACH`]
    /// backoff ceilings before the spread is known, instead of one ceiling: each hand-back
    /// spends a receive, so it should bring the message back when there is room.
    pub fn delay(
        &self,
        redelivery: Redelivery,
        receives: u32,
        spread: Option<Duration>,
        fifo: bool,
        unit: f64,
    ) -> Option<Duration> {
        let backoff = self.backoff;
        let reach_cap = backoff
            .ceiling(receives)
            .saturating_mul(BUDGETED_REACH)
            .min(backoff.cap);
        let share = unit.clamp(0.0, 1.0);
        let jitter = |within: Duration| within.min(reach_cap).mul_f64(share);
        let delay = match (redelivery, spread) {
            // As far as the backlog lasts: the gauge's estimate is made once the instances
            // have drained it for a while (`crate::drain::WARM_UP`).
            (Redelivery::After(_) | Redelivery::Within(_), Some(spread)) => spread.mul_f64(share),
            (Redelivery::Within(horizon), None) => jitter(horizon),
            // The booked slot, as it is: the limiter's estimate of when this instance has
            // room, already bounded by the backoff ceiling.
            (Redelivery::After(eta), None) => eta,
            (Redelivery::Backoff, _) => backoff.delay(receives, unit),
            (Redelivery::Quota, _) => self.quota,
            (Redelivery::Immediate, _) => Duration::ZERO,
            (Redelivery::Queue, _) => return None,
        };
        // While a FIFO message is away SQS delivers nothing behind it in its group.
        let cap = if fifo {
            self.fifo_cap
        } else {
            SQS_MAX_VISIBILITY
        };
        Some(delay.min(cap))
    }
}

/// A message handed back is called back only if it is due more than this far ahead: one due
/// sooner comes back about as soon anyway, and its receipt handle may be about to lapse.
pub const CALL_BACK_AHEAD: Duration = Duration::from_secs(1);

/// The most messages called back at once: one `ChangeMessageVisibilityBatch`.
pub const CALL_BACK_MOST: usize = 10;

/// The longest idle gap before an invocation whose unused calls its call-back may make up
/// ([`crate::limiter::RateLimiter::room`]). An instance checks for room right after its own
/// batch, when its bucket is spent, while the API may be idle: the quota those returns left
/// unused sits with the instances that had nothing to do, which have no invocation to call
/// back from. An instance that sat idle before its batch calls back what its rate allowed over
/// that gap, up to this much. Measured on `make bench`, this function alone (docs/throttling.md,
/// stops 45 and 46): with 2 s, scenario B drained at the ideal but billed about 178 s, over
/// half the sequential approach's; with 0.5 s, B drained within 1.1x the ideal in 7 of 8 runs
/// (4 of 11 without) and met every target in 5 (3 of 11), and A was throttled at most 8% in 7
/// of 14 (12 of 17).
pub const IDLE_CALL_BACK: Duration = Duration::from_millis(500);

/// The most messages one instance keeps to call back per queue; past it, the soonest due are
/// let go (they come back by themselves soonest). A receipt handle is a few hundred bytes.
pub const AWAY_KEPT: usize = 1000;

/// Of a hand-back's [`PLACEMENT_CHOICES`] random times, the one with the fewest of this
/// instance's hand-backs due within [`PLACEMENT_WINDOW`] of it is taken ([`Away::due_near`]).
pub const PLACEMENT_CHOICES: usize = 3;

/// The stretch either side of a time over which the hand-backs due are counted.
pub const PLACEMENT_WINDOW: Duration = Duration::from_secs(1);

/// The stretch, past [`CALL_BACK_AHEAD`], over which an instance with no room to call back
/// compares its hand-backs due with what its part of the drain rate serves
/// ([`push_back_keeps`]).
pub const PUSH_BACK_SPAN: Duration = Duration::from_secs(2);

/// Within this much of a backlog's end (its time left), the push-back keeps
/// [`PUSH_BACK_MARGIN`] times what the instance's part of the drain rate serves.
pub const PUSH_BACK_MARGIN_WITHIN: Duration = Duration::from_secs(30);

/// How many times its part of the drain rate an instance keeps due in a backlog's last 30 s
/// ([`push_back_keeps`]). The drain rate is measured from the returns the instances serve, so
/// returns held to it keep the drain where it was first measured, below the quota when the
/// instances were still finding it (docs/throttling.md, stops 39 and 41). A margin lets the
/// drain rise again. In the last 30 s, a return pushed too late leaves quota unused that the
/// backlog cannot make up; earlier, the margin costs billing (the 6,000-message backlog billed
/// about 750 s with a margin of 2 throughout and about 620 s with it in the last minute,
/// against 390 s to 540 s without and 440 s to 570 s with it in the last 30 s).
pub const PUSH_BACK_MARGIN: f64 = 2.0;

/// How many of an instance's hand-backs due over [`PUSH_BACK_SPAN`] stay where they are when
/// its part of the queue's drain rate is `rate` messages a second and the backlog has `left`
/// to go: what that rate serves over the span, [`PUSH_BACK_MARGIN`] times that within
/// [`PUSH_BACK_MARGIN_WITHIN`] of the end. The rest are pushed later ([`Away::crowded`]).
pub fn push_back_keeps(rate: f64, left: Duration) -> usize {
    let margin = if left < PUSH_BACK_MARGIN_WITHIN {
        PUSH_BACK_MARGIN
    } else {
        1.0
    };
    (rate.max(0.0) * margin * PUSH_BACK_SPAN.as_secs_f64()).floor() as usize
}

/// The messages this instance handed back for want of a request slot, per queue: when each is
/// due back and the receipt handle it can be called back with. A message handed back is still
/// in flight, so `ChangeMessageVisibility` to 0 with the receipt handle of its last receive
/// makes it visible at once, with no extra receive: quota the returns leave unused is filled
/// with the messages handed back furthest ahead ([`Budget::overbook`]).
///
/// It also counts how many of them are due in each second, so a hand-back can be placed where
/// few are due ([`Away::due_near`]): each return that finds no slot on the instance that
/// receives it is handed back again, and uniform random times over the backlog's time left
/// heap those again-returns up towards its end.
#[derive(Debug)]
pub struct Away {
    origin: Instant,
    queues: Mutex<HashMap<String, Held>>,
}

#[derive(Debug, Default)]
struct Held {
    /// Due time and receipt handle of the messages that may be called back, at most
    /// [`AWAY_KEPT`].
    callable: Vec<(Instant, String)>,
    /// How many messages handed back are due in each second since [`Away::origin`].
    due_per_second: BTreeMap<u64, u32>,
}

impl Default for Away {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
            queues: Mutex::default(),
        }
    }
}

impl Away {
    fn second(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.origin).as_secs()
    }

    /// Stops counting `taken`, no longer held, among the messages due in their seconds.
    fn uncount(&self, held: &mut Held, taken: &[(Instant, String)]) {
        for (due, _) in taken {
            if let Some(count) = held.due_per_second.get_mut(&self.second(*due)) {
                *count = count.saturating_sub(1);
            }
        }
    }

    /// Keeps a message handed back to `queue`, due back at `due`.
    pub fn hold(&self, queue: &str, due: Instant, receipt_handle: String) {
        let now = self.second(Instant::now());
        let mut queues = self.queues.lock().expect("away lock");
        let held = queues.entry(queue.to_string()).or_default();
        // Seconds past are forgotten.
        held.due_per_second = held.due_per_second.split_off(&now);
        *held.due_per_second.entry(self.second(due)).or_default() += 1;
        held.callable.push((due, receipt_handle));
        if held.callable.len() > AWAY_KEPT {
            held.callable.sort_by_key(|(due, _)| *due);
            held.callable.drain(..held.callable.len() - AWAY_KEPT);
        }
    }

    /// How many of the messages this instance handed back to `queue` are due within
    /// [`PLACEMENT_WINDOW`] of `at`, called back ones not counted.
    pub fn due_near(&self, queue: &str, at: Instant) -> usize {
        let queues = self.queues.lock().expect("away lock");
        let Some(held) = queues.get(queue) else {
            return 0;
        };
        let window = PLACEMENT_WINDOW.as_secs();
        let second = self.second(at);
        held.due_per_second
            .range(second.saturating_sub(window)..=second + window)
            .map(|(_, n)| *n as usize)
            .sum()
    }

    /// Of `times`, the one with the fewest of this instance's hand-backs to `queue` due near it
    /// ([`Away::due_near`]) plus `also` more, the first of them on a tie: where a hand-back or
    /// a push goes.
    pub fn least_crowded(
        &self,
        queue: &str,
        times: impl IntoIterator<Item = Instant>,
        also: impl Fn(Instant) -> usize,
    ) -> Option<Instant> {
        times
            .into_iter()
            .min_by_key(|at| self.due_near(queue, *at) + also(*at))
    }

    /// How many of the messages this instance handed back to `queue` are due from `now` on,
    /// called back ones not counted.
    pub fn due_from(&self, queue: &str, now: Instant) -> usize {
        let queues = self.queues.lock().expect("away lock");
        queues.get(queue).map_or(0, |held| {
            held.due_per_second
                .range(self.second(now)..)
                .map(|(_, n)| *n as usize)
                .sum()
        })
    }

    /// The messages of `queue` to push later because too many are due in `(from, to]`: when
    /// more than `keep` are due in its whole seconds, the excess of those that may be called
    /// back, furthest due first, with their due times. They are no longer held: the caller
    /// holds each again where it goes, or where it was if it could not be moved.
    pub fn crowded(
        &self,
        queue: &str,
        from: Instant,
        to: Instant,
        keep: usize,
    ) -> Vec<(Instant, String)> {
        let mut queues = self.queues.lock().expect("away lock");
        let Some(held) = queues.get_mut(queue) else {
            return Vec::new();
        };
        let due: usize = held
            .due_per_second
            .range(self.second(from) + 1..=self.second(to))
            .map(|(_, n)| *n as usize)
            .sum();
        let Some(mut excess) = due.checked_sub(keep).filter(|n| *n > 0) else {
            return Vec::new();
        };
        held.callable.sort_by_key(|(due, _)| *due);
        let mut taken = Vec::new();
        let mut i = held.callable.len();
        while i > 0 && excess > 0 {
            i -= 1;
            let due = held.callable[i].0;
            if due > from && due <= to {
                taken.push(held.callable.remove(i));
                excess -= 1;
            }
        }
        self.uncount(held, &taken);
        taken
    }

    /// The receipt handles of the messages of `queue` to call back at `now`: of those due more
    /// than [`CALL_BACK_AHEAD`] from now (the others are let go), `room` is asked how many it
    /// takes of at most [`CALL_BACK_MOST`], and gets the furthest due.
    pub fn take(
        &self,
        queue: &str,
        now: Instant,
        room: impl FnOnce(usize) -> usize,
    ) -> Vec<String> {
        let mut queues = self.queues.lock().expect("away lock");
        let Some(held) = queues.get_mut(queue) else {
            return Vec::new();
        };
        held.callable
            .retain(|(due, _)| due.saturating_duration_since(now) > CALL_BACK_AHEAD);
        if held.callable.is_empty() {
            return Vec::new();
        }
        let available = held.callable.len().min(CALL_BACK_MOST);
        let n = room(available).min(available);
        held.callable.sort_by_key(|(due, _)| *due);
        let taken = held.callable.split_off(held.callable.len() - n);
        self.uncount(held, &taken);
        taken
            .into_iter()
            .rev()
            .map(|(_, receipt_handle)| receipt_handle)
            .collect()
    }
}

/// Whether a message to retry can still be kept away at all: SQS keeps a message invisible at
/// most 12 hours since its first receive. Without room, a redelivery would come back at once
/// and burn the message's deliveries within seconds.
pub fn can_delay(redelivery: Redelivery, since_first_receive: Duration) -> bool {
    matches!(redelivery, Redelivery::Immediate | Redelivery::Queue)
        || visibility_room(since_first_receive) >= Duration::from_secs(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(receives: u32, max: Option<u32>) -> Budget {
        Budget {
            receives,
            max_receives: max,
        }
    }

    #[test]
    fn a_message_is_handed_back_only_while_it_keeps_two_deliveries_for_real_failures() {
        let table = [
            // (receives, maxReceiveCount, may hand back, last delivery)
            (1, Some(3), false, false),
            (3, Some(3), false, true),
            (1, Some(5), true, false),
            (2, Some(5), true, false),
            (3, Some(5), false, false),
            (5, Some(5), false, true),
            (17, Some(20), true, false),
            (18, Some(20), false, false),
            (40, None, true, false),
        ];
        for (receives, max, hand_back, last) in table {
            let b = budget(receives, max);
            assert_eq!(b.may_hand_back(), hand_back, "{b:?}");
            assert_eq!(b.is_last(), last, "{b:?}");
        }
    }

    #[test]
    fn fifo_messages_bodies_of_several_objects_and_spent_budgets_wait_in_the_invocation() {
        let wait = Duration::from_millis(150);
        let interval = Duration::from_millis(500);
        let need = |fifo, several, follow_up, max| Need {
            budget: budget(1, max),
            fifo,
            several,
            follow_up,
        };
        assert_eq!(
            slot_wait(need(false, false, false, None), wait, interval),
            Some(wait)
        );
        assert_eq!(
            slot_wait(need(true, false, false, None), wait, interval),
            None
        );
        assert_eq!(
            slot_wait(need(false, true, false, None), wait, interval),
            None
        );
        assert_eq!(
            slot_wait(need(false, false, false, Some(3)), wait, interval),
            None
        );
        // A follow-up call waits at least two intervals: a retry after a cut can happen.
        assert_eq!(
            slot_wait(need(false, false, true, None), wait, interval),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            slot_wait(
                need(false, false, true, None),
                wait,
                Duration::from_millis(10)
            ),
            Some(wait)
        );
    }

    #[test]
    fn the_margin_is_a_fifth_of_the_invocation_within_its_bounds() {
        let configured = Duration::from_millis(2000);
        let margin = |ms| deadline_margin(Duration::from_millis(ms), configured).as_millis();
        assert_eq!(margin(3000), 600);
        assert_eq!(margin(60_000), 2000);
        assert_eq!(margin(500), 200);
        assert!(fits_an_attempt(Duration::from_millis(3000), configured));
        assert!(fits_an_attempt(Duration::from_millis(400), configured));
        assert!(!fits_an_attempt(Duration::from_millis(399), configured));
    }

    #[test]
    fn fifo_delays_are_capped_low_and_others_keep_their_schedule() {
        let delays = Delays {
            backoff: Backoff::default(),
            quota: Duration::from_secs(3600),
            fifo_cap: Duration::from_secs(10),
        };
        let d = |r, fifo| delays.delay(r, 6, None, fifo, 0.999).unwrap().as_secs();
        assert_eq!(d(Redelivery::Quota, false), 3600);
        assert_eq!(d(Redelivery::Quota, true), 10);
        assert_eq!(d(Redelivery::Backoff, false), 63);
        assert_eq!(d(Redelivery::Backoff, true), 10);
        assert_eq!(delays.delay(Redelivery::Queue, 6, None, true, 0.5), None);
    }

    #[test]
    fn a_hand_back_reaches_as_far_as_the_backlog_lasts() {
        let delays = Delays {
            backoff: Backoff::default(),
            quota: Duration::from_secs(3600),
            fifo_cap: Duration::from_secs(10),
        };
        let no_slot = Redelivery::Within(Duration::from_secs(60));
        let d = |spread| {
            delays
                .delay(no_slot, 2, spread, false, 0.5)
                .unwrap()
                .as_secs_f64()
        };
        // Second receive: the ceiling is 4 s. A hand-back goes as far as the backlog lasts,
        // past that ceiling (a 400 s spread: 200 s at half way)...
        assert_eq!(d(Some(Duration::from_secs(40))), 20.0);
        assert_eq!(d(Some(Duration::from_secs(400))), 200.0);
        assert_eq!(d(Some(Duration::from_secs(10))), 5.0);
        // ... and, before the gauge has an estimate, within 8 x 4 = 32 s.
        assert_eq!(d(None), 16.0);
    }

    #[test]
    fn a_message_overbooks_its_returns_until_its_last_two_hand_backs() {
        // (receives, maxReceiveCount, hand-backs left after this one, overbook)
        let table = [
            (1, Some(5), Some(1), 1.0),
            (2, Some(5), Some(0), 1.0),
            (1, Some(20), Some(16), 1.5),
            (15, Some(20), Some(2), 1.5),
            (16, Some(20), Some(1), 1.0),
            (17, Some(20), Some(0), 1.0),
            (3, Some(3), Some(0), 1.0),
            (9, None, None, 1.5),
        ];
        for (receives, max, left, overbook) in table {
            let b = budget(receives, max);
            assert_eq!(b.hand_backs_after(), left, "{b:?}");
            assert_eq!(b.overbook(), overbook, "{b:?}");
        }
    }

    #[test]
    fn the_furthest_messages_away_are_called_back_as_many_as_there_is_room_for() {
        let away = Away::default();
        let now = Instant::now();
        let due = |ms: u64| now + Duration::from_millis(ms);
        for (ms, handle) in [
            (500, "soon"),
            (3000, "c"),
            (9000, "far"),
            (1500, "b"),
            (6000, "d"),
        ] {
            away.hold("q", due(ms), handle.to_string());
        }
        // Asked with the four due more than a second ahead; the one due in 0.5 s is let go.
        let mut asked = 0;
        let taken = away.take("q", now, |available| {
            asked = available;
            2
        });
        assert_eq!(asked, 4);
        assert_eq!(taken, ["far", "d"]);
        // No room: nothing taken, nothing lost.
        assert!(away.take("q", now, |_| 0).is_empty());
        // Room for more than are held: the rest, furthest first; then none.
        assert_eq!(away.take("q", now, |_| 10), ["c", "b"]);
        assert!(away
            .take("q", now, |_| unreachable!("nothing held"))
            .is_empty());
        assert!(away
            .take("other", now, |_| unreachable!("nothing held"))
            .is_empty());
        // Two seconds later, a message due in 3 s is due in 1 s: let go.
        away.hold("q", due(3000), "late".into());
        assert!(away
            .take("q", now + Duration::from_secs(2), |_| unreachable!(
                "let go"
            ))
            .is_empty());
    }

    #[test]
    fn an_instance_keeps_the_furthest_thousand_messages_per_queue_and_calls_back_ten_at_once() {
        let away = Away::default();
        let now = Instant::now();
        for n in 0..(AWAY_KEPT as u64 + 500) {
            away.hold("q", now + Duration::from_secs(10 + n), n.to_string());
        }
        let mut available = 0;
        let taken = away.take("q", now, |n| {
            available = n;
            usize::MAX
        });
        assert_eq!(available, CALL_BACK_MOST);
        assert_eq!(taken.len(), CALL_BACK_MOST);
        assert_eq!(taken[0], (AWAY_KEPT + 499).to_string());
        let rest = away.take("q", now, |_| usize::MAX).len()
            + (0..200)
                .map(|_| away.take("q", now, |_| usize::MAX).len())
                .sum::<usize>();
        assert_eq!(rest + CALL_BACK_MOST, AWAY_KEPT, "the soonest 500 let go");
    }

    #[tokio::test(start_paused = true)]
    async fn hand_backs_are_counted_by_the_second_they_are_due_until_called_back_or_past() {
        let away = Away::default();
        let now = Instant::now();
        let at = |s: u64| now + Duration::from_secs(s);
        for (s, handle) in [(5, "a"), (5, "b"), (6, "c"), (9, "d"), (20, "e")] {
            away.hold("q", at(s), handle.to_string());
        }
        // Within a second either side.
        assert_eq!(away.due_near("q", at(5)), 3);
        assert_eq!(away.due_near("q", at(8)), 1);
        assert_eq!(away.due_near("q", at(14)), 0);
        assert_eq!(away.due_near("other", at(5)), 0);
        // A message called back is no longer due then.
        assert_eq!(away.take("q", now, |_| 1), ["e"]);
        assert_eq!(away.due_near("q", at(20)), 0);
        // Seconds past are forgotten.
        tokio::time::advance(Duration::from_secs(8)).await;
        away.hold("q", at(30), "f".into());
        assert_eq!(away.due_near("q", at(6)), 0);
        assert_eq!(away.due_near("q", at(9)), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_crowded_stretch_gives_up_its_furthest_due_beyond_what_is_kept() {
        let away = Away::default();
        let now = Instant::now();
        let at = |ms: u64| now + Duration::from_millis(ms);
        for (ms, handle) in [
            (2100, "a"),
            (2200, "b"),
            (2400, "c"),
            (2900, "d"),
            (500, "soon"),
            (8000, "far"),
        ] {
            away.hold("q", at(ms), handle.to_string());
        }
        assert_eq!(away.due_from("q", now), 6);
        assert_eq!(away.due_from("q", at(3000)), 1);
        // Four due in the second after `from`; two are kept, the two furthest due given up.
        let from = at(1000);
        let to = at(3000);
        assert!(away.crowded("q", from, to, 4).is_empty());
        let taken = away.crowded("q", from, to, 2);
        assert_eq!(
            taken,
            [(at(2900), "d".to_string()), (at(2400), "c".to_string())]
        );
        // No longer counted or held, until held again where they go.
        assert_eq!(away.due_from("q", now), 4);
        assert!(away.crowded("q", from, to, 2).is_empty());
        for (_, handle) in taken {
            away.hold("q", at(20_000), handle);
        }
        assert_eq!(away.due_near("q", at(20_000)), 2);
        assert_eq!(away.take("q", now, |_| 2), ["c", "d"]);
        assert!(away.crowded("other", from, to, 0).is_empty());
        let long = Duration::from_secs(30);
        let last_seconds = Duration::from_secs(29);
        assert_eq!(push_back_keeps(1.07, long), 2);
        assert_eq!(push_back_keeps(1.07, last_seconds), 4);
        assert_eq!(push_back_keeps(0.3, long), 0);
        assert_eq!(push_back_keeps(0.3, last_seconds), 1);
        assert_eq!(push_back_keeps(-1.0, last_seconds), 0);
    }

    #[test]
    fn a_message_twelve_hours_past_its_first_receive_cannot_be_delayed() {
        let hours = |h: u64| Duration::from_secs(h * 3600);
        assert!(can_delay(Redelivery::Quota, hours(11)));
        assert!(!can_delay(Redelivery::Quota, hours(12)));
        assert!(!can_delay(Redelivery::Backoff, hours(12)));
        assert!(can_delay(Redelivery::Immediate, hours(12)));
    }
}
