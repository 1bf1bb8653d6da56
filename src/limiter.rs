//! The client-side adaptive rate limiter in front of every MediaPackage VOD call.
//!
//! One limiter serves every concurrent task of an instance and lives as long as the instance,
//! so what it learned carries across warm invocations. It is a token bucket (GCRA) filled at
//! `rate` per second and `burst` deep (one second's worth by default): an instance that has
//! been calling less than its rate sends what it has at once instead of spacing the calls, so
//! an invocation is not billed for waiting between them, while over any longer stretch it
//! stays at `rate`. It adapts `rate` by AIMD from how the API answers:
//!
//! - **probing**: with no starting rate given (`probe`), the limiter does not limit the rate
//!   until the API first throttles: an instance with no evidence of a quota sends a batch's
//!   messages at once, bounded by the function's concurrency and by a window, as TCP's slow
//!   start is: `initial_window` calls before the API has answered any, and each accepted
//!   answer lets two more go (the one it frees and one more), so the window doubles every
//!   round trip. Cold instances starting together thus send their first windows, not all
//!   their concurrency allows, before the first answers say anything of the quota. A call
//!   waits for the window [`WINDOW_HOLD`] at most: an API slower than that is not waited on.
//!   The first 429 sets the rate to half the calls it sent over the last second. Once every
//!   call of that second has answered (a transient error counts as an answer, not accepted; a
//!   call that never answers is waited for [`SETTLE_WITHIN`] at most), the rate is at most the
//!   number the API accepted: instances probing together each learn their share. The API's
//!   bucket was empty at the first 429, and the shares add up to about its refill, so the
//!   limiter's bucket starts empty at that moment and slots taken before the answers were in
//!   are taken again at the settled rate. Then AIMD takes over;
//! - **slow start**: with a starting rate given, until the first throttle, each paced success
//!   adds half a request/s, so the rate grows exponentially (e-fold every two seconds) and an
//!   unknown quota is found in a few seconds without several instances starting together
//!   overshooting it far;
//! - **additive increase**: afterwards each paced success adds `additive / rate`, so the rate
//!   grows by `additive` requests/s per second while the API accepts;
//! - **multiplicative decrease**: a 429 multiplies the rate by `decrease`, at most once per
//!   [`CUT_COOL_DOWN`]: throttles of calls sent before the cut, or just after it while the
//!   quota is still empty, are ignored, so a burst of 429s from one overshoot does not collapse
//!   the rate.
//!
//! Successes only raise the rate when the limiter was actually the constraint (the call had to
//! wait, or took the bucket's last token), so an instance with little work does not inflate
//! its rate. A cut also empties the bucket.
//!
//! Why AIMD: independent instances sharing one quota converge to equal shares without talking
//! to each other (Chiu and Jain, 1989): every instance grows by the same amount per second,
//! while a cut takes more from a larger rate, so each cut narrows the gap. With a multiplicative
//! increase instead (the rate growing in proportion to itself) the gap never closes: measured in
//! the paced simulation of this module's tests, three instances starting at 1, 4 and 12
//! requests/s on a 10 requests/s quota still took 17%, 60% and 23% of it after three minutes
//! (measured with a 1 s cool-down), where AIMD, as configured now, gives 26%, 37% and 36% over
//! the last minute with 2.8% of calls throttled (35%, 30% and 35%, 2.6%, with a one-second
//! bucket). `make bench` compares the whole function with the SDK's own CUBIC limiter
//! (adaptive retry mode).
//!
//! A caller may **lift** the pace for its call above the rate: the part of the quota the other
//! instances cannot be using, as the queue's depth shows ([`crate::drain::DrainGauge::share`]).
//! The lift spaces the call, not the rate: it neither raises the rate when the call is accepted
//! nor applies within [`CALL_BACK_QUIET`] of a cut, while the quota has just been found full.
//!
//! A caller that cannot get a slot before its own deadline is not made to sleep: it gets a
//! **booking** instead, the time from now at which this instance expects to have room for it,
//! taken from a booking line that advances at `overbook` times the rate where the quota was
//! last found (the rate before the last cut, decaying by a tenth per further cut, or the rate
//! now if higher). The message is handed back to SQS to come back then, so the queue, not the
//! function, does the waiting. Overbooking a little keeps the returns at or above what the
//! instance can serve, so a rate learned higher after the booking is still used; the surplus is
//! simply booked again. Nothing is booked beyond the caller's horizon, and a refused booking
//! does not move the line: the function passes half the backoff ceiling of the message's receive
//! count, so bookings made while the rate is still being found stay short, and a message comes
//! back to be booked again from what has been learned by then. A message that cannot be booked
//! within its horizon comes back at a random time within it. Once the queue's depth has been
//! seen falling, the function spreads its hand-backs over the time the backlog has left instead
//! ([`crate::drain`]), the same for every instance; bookings serve until then.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// The least time between two cuts.
pub const CUT_COOL_DOWN: Duration = Duration::from_millis(300);

/// No room for call-backs ([`RateLimiter::room`]), and no lift ([`RateLimiter::reserve_lifted`]),
/// this soon after a cut: the API has just said the quota is full, and call-backs would raise
/// the rate the cut lowered.
pub const CALL_BACK_QUIET: Duration = Duration::from_secs(2);

/// While probing, the longest a call waits for room in the window before it goes anyway: an
/// answer slower than this is no reason to hold a cold batch back.
pub const WINDOW_HOLD: Duration = Duration::from_millis(250);

/// While probing, the first throttle sets the rate from the calls sent over this last stretch.
const PROBE_WINDOW: Duration = Duration::from_secs(1);

/// Settling ends this long after the first throttle even if some probe calls have not answered
/// (a call dropped at its invocation's deadline never does): the calls not heard from are taken
/// to have fared as those that answered. Until it ends there is no room for call-backs and no
/// lift, so an answer that never comes must not hold it for the instance's lifetime.
pub const SETTLE_WITHIN: Duration = Duration::from_secs(5);

/// How the limiter adapts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LimiterConfig {
    /// The rate before anything is learned, requests per second.
    pub initial_rate: f64,
    /// A hard ceiling (`MAX_REQUESTS_PER_SECOND`), if any.
    pub max_rate: Option<f64>,
    /// The rate never goes below this.
    pub min_rate: f64,
    /// Additive increase after slow start: requests per second gained per second of accepted
    /// calls.
    pub additive: f64,
    /// Multiplicative decrease applied on a throttle.
    pub decrease: f64,
    /// The booking line runs this much faster than the rate.
    pub overbook: f64,
    /// Requests per second gained per paced success during slow start.
    pub slow_start_gain: f64,
    /// The least time between two cuts ([`CUT_COOL_DOWN`]).
    pub cool_down: Duration,
    /// How much of the rate, in time, may be sent at once after calling less than the rate:
    /// the token bucket's depth (at least one call).
    pub burst: Duration,
    /// Whether to start unlimited and learn the rate from the first throttle (see the module
    /// documentation) instead of starting at `initial_rate`.
    pub probe: bool,
    /// While probing: the calls sent before the API has answered any (at least one; 10 by
    /// default, TCP's initial window).
    pub initial_window: u32,
}

impl Default for LimiterConfig {
    fn default() -> Self {
        Self {
            initial_rate: 3.0,
            max_rate: None,
            min_rate: 0.2,
            additive: 0.2,
            decrease: 0.5,
            overbook: 1.25,
            slow_start_gain: 0.5,
            cool_down: CUT_COOL_DOWN,
            burst: Duration::from_secs(1),
            probe: false,
            initial_window: 10,
        }
    }
}

/// A slot to call the API, returned by [`RateLimiter::acquire`]. Report how the call went with
/// [`RateLimiter::on_success`] or [`RateLimiter::on_throttle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permit {
    at: Instant,
    paced: bool,
    probe: bool,
    /// Taken while the probe's answers were still being counted, at a rate they may lower.
    unsettled: bool,
}

#[derive(Debug)]
struct State {
    rate: f64,
    slow_start: bool,
    next_send: Instant,
    next_book: Instant,
    last_cut: Option<Instant>,
    /// The rate just before the last cut: where the quota was last found.
    peak: f64,
    /// Unlimited until the first throttle; the send times of the last second, to learn from.
    probing: Option<VecDeque<Instant>>,
    /// While probing: when the probe calls of the last second were sent, and whether the API
    /// accepted them.
    probe_answers: VecDeque<(Instant, bool)>,
    /// While probing: how many calls may be out unanswered, and how many are.
    window: usize,
    out: usize,
    /// After the first throttle, until every probe call of the last second has answered, or
    /// [`SETTLE_WITHIN`] has passed.
    settling: Option<Settling>,
    /// For [`LimiterStats`].
    throttles: u64,
    cuts: u64,
}

/// The answers to the probe, counted after the first throttle: the share the API accepted is
/// the share of the quota this instance can have.
#[derive(Debug)]
struct Settling {
    cut: Instant,
    sent: usize,
    answered: usize,
    accepted: usize,
}

/// Counters, for logs and benchmarks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LimiterStats {
    /// The current rate, requests per second.
    pub rate: f64,
    /// Whether the limiter is still in slow start.
    pub slow_start: bool,
    /// Whether the limiter is still probing: no throttle seen, no limit applied.
    pub probing: bool,
    /// Whether the limiter is still counting the answers to its probe ([`SETTLE_WITHIN`]).
    pub settling: bool,
    /// Calls the API throttled, over the limiter's life.
    pub throttles: u64,
    /// Cuts of the rate those throttles made (at most one per cool-down).
    pub cuts: u64,
}

/// An AIMD rate limiter with pacing and a booking line; see the module documentation.
#[derive(Debug)]
pub struct RateLimiter {
    config: LimiterConfig,
    state: Mutex<State>,
    /// Woken when the probe's window may have room: an answer came, or probing ended.
    answered: Notify,
}

/// What a call got from the probe's window ([`RateLimiter::enter_window`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// A probe slot, now.
    Entered(Permit),
    /// The first throttle came while the call waited: ask for a slot at the rate being learned
    /// ([`RateLimiter::acquire`]) as a call the API refused would.
    Closed,
    /// Not probing: ask for a slot ([`RateLimiter::acquire`]).
    NotProbing,
}

impl RateLimiter {
    /// A limiter starting at `config.initial_rate`.
    pub fn new(config: LimiterConfig) -> Self {
        let now = Instant::now();
        let rate = clamp(config.initial_rate, &config);
        Self {
            config,
            state: Mutex::new(State {
                rate,
                slow_start: true,
                next_send: now,
                next_book: now,
                last_cut: None,
                peak: rate,
                probing: config.probe.then(Default::default),
                probe_answers: VecDeque::new(),
                window: config.initial_window.max(1) as usize,
                out: 0,
                settling: None,
                throttles: 0,
                cuts: 0,
            }),
            answered: Notify::new(),
        }
    }

    /// The current rate and phase.
    pub fn stats(&self) -> LimiterStats {
        let mut state = self.state.lock().expect("limiter lock");
        self.settle_overdue(&mut state, Instant::now());
        LimiterStats {
            rate: state.rate,
            slow_start: state.slow_start,
            probing: state.probing.is_some(),
            settling: state.settling.is_some(),
            throttles: state.throttles,
            cuts: state.cuts,
        }
    }

    /// Takes the next slot if it comes no later than `latest`, and returns the slot time
    /// (possibly in the future: wait until then). Otherwise books a later slot and returns how
    /// long from `now` until it, or `None` without booking if that is beyond `horizon`.
    pub fn reserve(
        &self,
        now: Instant,
        latest: Instant,
        horizon: Duration,
    ) -> Result<Permit, Option<Duration>> {
        self.reserve_lifted(now, latest, horizon, 0.0)
    }

    /// [`RateLimiter::reserve`], spacing this call at `lift` requests per second if that is
    /// above the rate (see the module documentation).
    pub fn reserve_lifted(
        &self,
        now: Instant,
        latest: Instant,
        horizon: Duration,
        lift: f64,
    ) -> Result<Permit, Option<Duration>> {
        let mut state = self.state.lock().expect("limiter lock");
        self.settle_overdue(&mut state, now);
        if state.probing.is_some() {
            return Ok(probe_call(&mut state, now));
        }
        let lifted = lift > state.rate && state.settling.is_none() && !cut_lately(&state, now);
        let pace = if lifted { lift } else { state.rate };
        let interval = Duration::from_secs_f64(1.0 / pace);
        // GCRA: `next_send` is when the bucket will be full again; a call may go as soon as
        // it is at most `tolerance` ahead of the time it is sent.
        let tolerance = self.tolerance(state.rate);
        let slot = state
            .next_send
            .checked_sub(tolerance)
            .unwrap_or(now)
            .max(now);
        if slot <= latest {
            // The limiter was the constraint if this call waited or took the last token:
            // only then would calling faster have needed a higher rate. A lifted call was
            // spaced by what the others leave, not by the rate.
            let paced = !lifted && (slot > now || state.next_send + interval > now + tolerance);
            state.next_send = state.next_send.max(now) + interval;
            return Ok(Permit {
                at: slot,
                paced,
                probe: false,
                unsettled: state.settling.is_some(),
            });
        }
        // Booked at the rate where the quota was last found rather than the rate now, which a
        // cut may just have halved: AIMD spends its time between the two.
        let booking_rate = state.rate.max(state.peak) * self.config.overbook;
        let booked = state.next_book.max(slot);
        if booked - now > horizon {
            return Err(None);
        }
        state.next_book = booked + Duration::from_secs_f64(1.0 / booking_rate);
        Err(Some(booked - now))
    }

    /// While probing, takes a place in the window: at once if it has room, else as soon as an
    /// answer makes room, or once [`WINDOW_HOLD`] has passed (or `latest`, if sooner) whatever
    /// the window. [`Window::Closed`] if the first throttle came meanwhile, and
    /// [`Window::NotProbing`] if the limiter was not probing.
    pub async fn enter_window(&self, latest: Instant) -> Window {
        let held = (Instant::now() + WINDOW_HOLD).min(latest);
        let mut waited = false;
        loop {
            // Registered before looking, so that an answer in between is not missed.
            let answered = self.answered.notified();
            tokio::pin!(answered);
            answered.as_mut().enable();
            let now = Instant::now();
            {
                let mut state = self.state.lock().expect("limiter lock");
                if state.probing.is_none() {
                    return if waited {
                        Window::Closed
                    } else {
                        Window::NotProbing
                    };
                }
                if state.out < state.window || now >= held {
                    return Window::Entered(probe_call(&mut state, now));
                }
            }
            waited = true;
            let _ = tokio::time::timeout_at(held, answered).await;
        }
    }

    /// How many calls this instance could send at once at `now`, at most `most`: room for
    /// messages it calls back from the queue ([`crate::redelivery::Away`]). The slots are not
    /// taken: those messages come back through the queue, to whichever instance, and take their
    /// slots there. Each one counts as a paced call would after slow start, raising the rate:
    /// it is demand the limiter could not see, since a message handed back further ahead than
    /// the quota needed never asked for a slot. No room while probing or settling, or within
    /// [`CALL_BACK_QUIET`] of the last cut, while the quota has just been found full.
    ///
    /// `idle` is how long the instance sat without an invocation before this one: the calls
    /// its rate allowed over that time went unused, and as many may be called back, if that is
    /// more than the bucket holds (the batch has just spent it). The caller bounds it
    /// ([`crate::redelivery::IDLE_CALL_BACK`]).
    pub fn room(&self, now: Instant, most: u32, idle: Duration) -> u32 {
        let mut state = self.state.lock().expect("limiter lock");
        self.settle_overdue(&mut state, now);
        if most == 0
            || state.probing.is_some()
            || state.settling.is_some()
            || cut_lately(&state, now)
        {
            return 0;
        }
        let interval = 1.0 / state.rate;
        let tolerance = self.tolerance(state.rate).as_secs_f64();
        let ahead = state.next_send.saturating_duration_since(now).as_secs_f64();
        let in_bucket = if ahead > tolerance {
            0
        } else {
            ((tolerance - ahead) / interval).floor() as u32 + 1
        };
        let unused = (state.rate * idle.as_secs_f64()).floor() as u32;
        let room = in_bucket.max(unused).min(most);
        if room == 0 {
            return 0;
        }
        if !state.slow_start {
            let gain = self.config.additive / state.rate * f64::from(room);
            state.rate = clamp(state.rate + gain, &self.config);
        }
        room
    }

    /// How far ahead of now `next_send` may be and a call still go at once: the burst less
    /// one call.
    fn tolerance(&self, rate: f64) -> Duration {
        Duration::from_secs_f64((self.config.burst.as_secs_f64() - 1.0 / rate).max(0.0))
    }

    /// When a bucket emptied at `at` lets the next call go at `rate`: one interval later.
    fn emptied(&self, at: Instant, rate: f64) -> Instant {
        at + self.tolerance(rate) + Duration::from_secs_f64(1.0 / rate)
    }

    /// Waits for a slot no later than `latest`; see [`RateLimiter::reserve`]. A slot taken
    /// before the probe settled is taken again once it has, at the settled rate. While
    /// probing, a caller that keeps to the window asks [`RateLimiter::enter_window`] first.
    pub async fn acquire(
        &self,
        latest: Instant,
        horizon: Duration,
    ) -> Result<Permit, Option<Duration>> {
        self.acquire_lifted(latest, horizon, 0.0).await
    }

    /// [`RateLimiter::acquire`], spacing this call at `lift` if that is above the rate
    /// ([`RateLimiter::reserve_lifted`]).
    pub async fn acquire_lifted(
        &self,
        latest: Instant,
        horizon: Duration,
        lift: f64,
    ) -> Result<Permit, Option<Duration>> {
        let mut permit = self.reserve_lifted(Instant::now(), latest, horizon, lift)?;
        tokio::time::sleep_until(permit.at).await;
        if permit.unsettled && !self.stats().settling {
            permit = self.reserve_lifted(Instant::now(), latest, horizon, lift)?;
            tokio::time::sleep_until(permit.at).await;
        }
        Ok(permit)
    }

    /// Counts an answer to a probe call (see [`Settling`]). Once every probe call sent in the
    /// second before the first throttle has answered, the rate is no more than the calls the
    /// API accepted of them: several instances probing at once each learn their share.
    fn tally(&self, state: &mut State, permit: &Permit, accepted: bool) {
        if !permit.probe {
            return;
        }
        if state.probing.is_some() {
            let now = Instant::now();
            state.out = state.out.saturating_sub(1);
            state.window += usize::from(accepted);
            self.answered.notify_waiters();
            state.probe_answers.push_back((permit.at, accepted));
            while state
                .probe_answers
                .front()
                .is_some_and(|(at, _)| now.duration_since(*at) >= PROBE_WINDOW)
            {
                state.probe_answers.pop_front();
            }
            return;
        }
        let Some(settling) = &mut state.settling else {
            return;
        };
        if permit.at + PROBE_WINDOW < settling.cut {
            return;
        }
        settling.answered += 1;
        settling.accepted += usize::from(accepted);
        if settling.answered >= settling.sent {
            self.settle(state, false);
        }
    }

    /// Ends the probe's settling, if any: the rate becomes at most the share the API accepted,
    /// counting the calls not heard from as faring as those that answered. `overdue`: ended by
    /// [`SETTLE_WITHIN`], when the calls given slots while it settled have long gone out.
    fn settle(&self, state: &mut State, overdue: bool) {
        let Some(settling) = state.settling.take() else {
            return;
        };
        let answered = settling.answered.clamp(1, settling.sent.max(1));
        let share = (settling.accepted * settling.sent) as f64 / answered as f64;
        state.rate = clamp(state.rate.min(share.max(1.0)), &self.config);
        // The bucket empty since the first throttle, at the settled rate: the slots taken
        // meanwhile at the halved window are taken again (`acquire`). Once overdue, those calls
        // went out at their slots, and the bucket keeps them.
        let emptied = self.emptied(state.last_cut.unwrap_or(settling.cut), state.rate);
        state.next_send = if overdue {
            state.next_send.max(emptied)
        } else {
            emptied
        };
    }

    /// Settles the probe if its answers have been awaited for [`SETTLE_WITHIN`].
    fn settle_overdue(&self, state: &mut State, now: Instant) {
        if state
            .settling
            .as_ref()
            .is_some_and(|s| now.saturating_duration_since(s.cut) >= SETTLE_WITHIN)
        {
            self.settle(state, true);
        }
    }

    /// The call made with `permit` got no answer about the rate: a transient error, an
    /// exhausted quota, or no answer before the invocation's deadline. It counts among the
    /// probe's answers as not accepted, and changes nothing else.
    pub fn on_failure(&self, permit: &Permit) {
        let mut state = self.state.lock().expect("limiter lock");
        self.tally(&mut state, permit, false);
    }

    /// The call made with `permit` was accepted.
    pub fn on_success(&self, permit: &Permit) {
        let mut state = self.state.lock().expect("limiter lock");
        self.tally(&mut state, permit, true);
        if !permit.paced {
            return;
        }
        let gain = if state.slow_start {
            self.config.slow_start_gain
        } else {
            self.config.additive / state.rate
        };
        state.rate = clamp(state.rate + gain, &self.config);
    }

    /// The call made with `permit` was throttled (429 for the request rate).
    pub fn on_throttle(&self, permit: &Permit) {
        let mut state = self.state.lock().expect("limiter lock");
        let first = state.probing.is_some();
        state.throttles += 1;
        if !first {
            self.tally(&mut state, permit, false);
        }
        // One cut per cool-down: a throttle of a call sent before the last cut, or just after
        // it, answers for a rate that was already cut (calls right after a cut can still find
        // the quota empty). A short cool-down lets a large overshoot, as when several instances
        // leave slow start together, be cut again within the second.
        if state
            .last_cut
            .is_some_and(|cut| permit.at < cut + self.config.cool_down)
        {
            return;
        }
        let now = Instant::now();
        if let Some(sent) = state.probing.take() {
            // The first throttle: the quota lies below what was sent over the last second. The
            // answers still to come tell how far below (`tally`). Calls waiting for the window
            // now ask for a slot at the rate instead.
            self.answered.notify_waiters();
            let window = sent
                .iter()
                .filter(|at| now.duration_since(**at) < PROBE_WINDOW)
                .count()
                .max(1);
            let recent = |at: &Instant| now.duration_since(*at) < PROBE_WINDOW;
            let answers: Vec<bool> = state
                .probe_answers
                .drain(..)
                .filter(|(at, _)| recent(at))
                .map(|(_, ok)| ok)
                .collect();
            state.settling = Some(Settling {
                cut: now,
                sent: window,
                answered: answers.len() + 1,
                accepted: answers.iter().filter(|ok| **ok).count(),
            });
            state.peak = window as f64;
            state.rate = window as f64;
        }
        // A cascade of cuts (the quota still exceeded a second later) must not drag the booking
        // rate down with it: the peak only decays by a tenth per cut.
        state.peak = state.rate.max(state.peak * 0.9);
        state.rate = clamp(state.rate * self.config.decrease, &self.config);
        state.slow_start = false;
        state.cuts += 1;
        state.last_cut = Some(now);
        // An empty bucket: the next call waits one interval at the new rate.
        let empty = self.emptied(now, state.rate);
        state.next_send = state.next_send.max(empty);
        // The first throttle may be the probe's last answer: then there is nothing left to
        // count, and no later answer would end the settling.
        if state
            .settling
            .as_ref()
            .is_some_and(|s| s.answered >= s.sent)
        {
            self.settle(&mut state, false);
        }
    }
}

/// A probe call sent at `now`: counted among the last second's calls and those out.
fn probe_call(state: &mut State, now: Instant) -> Permit {
    if let Some(sent) = &mut state.probing {
        while sent
            .front()
            .is_some_and(|at| now.duration_since(*at) >= PROBE_WINDOW)
        {
            sent.pop_front();
        }
        sent.push_back(now);
    }
    state.out += 1;
    Permit {
        at: now,
        paced: false,
        probe: true,
        unsettled: false,
    }
}

/// Whether the last cut was within [`CALL_BACK_QUIET`] of `now`.
fn cut_lately(state: &State, now: Instant) -> bool {
    state
        .last_cut
        .is_some_and(|cut| now.saturating_duration_since(cut) < CALL_BACK_QUIET)
}

fn clamp(rate: f64, config: &LimiterConfig) -> f64 {
    let ceiling = config.max_rate.unwrap_or(f64::MAX);
    rate.max(config.min_rate).min(ceiling)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_HORIZON: Duration = Duration::from_secs(3600);

    /// A limiter that paces strictly (a bucket one call deep), so slot times are easy to read.
    fn limiter(initial_rate: f64) -> RateLimiter {
        RateLimiter::new(LimiterConfig {
            initial_rate,
            burst: Duration::ZERO,
            ..LimiterConfig::default()
        })
    }

    fn bursty(initial_rate: f64) -> RateLimiter {
        RateLimiter::new(LimiterConfig {
            initial_rate,
            ..LimiterConfig::default()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn an_instance_that_called_less_than_its_rate_sends_a_second_worth_at_once() {
        let limiter = bursty(4.0);
        let start = Instant::now();
        let far = start + Duration::from_secs(60);
        let ms = |permit: Permit| (permit.at - start).as_millis();
        let first: Vec<u128> = (0..6)
            .map(|_| ms(limiter.reserve(start, far, NO_HORIZON).unwrap()))
            .collect();
        // Four tokens (one second at 4/s) go at once, then one every 250 ms.
        assert_eq!(first, [0, 0, 0, 0, 250, 500]);
        // A quiet second refills the bucket, and nothing beyond its depth piles up.
        tokio::time::advance(Duration::from_secs(2) + Duration::from_millis(500)).await;
        let now = Instant::now();
        let again: Vec<u128> = (0..5)
            .map(|_| ms(limiter.reserve(now, far, NO_HORIZON).unwrap()))
            .collect();
        assert_eq!(again, [2500, 2500, 2500, 2500, 2750]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lifted_call_is_spaced_at_the_lift_and_leaves_the_rate_alone() {
        let limiter = limiter(2.0);
        let start = Instant::now();
        let far = start + Duration::from_secs(60);
        let ms = |permit: Permit| (permit.at - start).as_millis();
        let lifted: Vec<Permit> = (0..4)
            .map(|_| {
                limiter
                    .reserve_lifted(start, far, NO_HORIZON, 10.0)
                    .unwrap()
            })
            .collect();
        assert_eq!(
            lifted.iter().map(|p| ms(*p)).collect::<Vec<_>>(),
            [0, 100, 200, 300]
        );
        for permit in &lifted {
            limiter.on_success(permit);
        }
        assert_eq!(limiter.stats().rate, 2.0, "the lift is not the rate");
        // A lift under the rate changes nothing: calls 500 ms apart, at 2/s.
        let unlifted: Vec<Permit> = (0..2)
            .map(|_| limiter.reserve_lifted(start, far, NO_HORIZON, 1.0).unwrap())
            .collect();
        assert_eq!(
            unlifted.iter().map(|p| ms(*p)).collect::<Vec<_>>(),
            [400, 900]
        );
        // Just after a cut (to 1/s here), no lift: the quota was just found full.
        limiter.on_throttle(&unlifted[1]);
        assert_eq!(limiter.stats().rate, 1.0);
        let now = Instant::now();
        let after_cut: Vec<u128> = (0..2)
            .map(|_| ms(limiter.reserve_lifted(now, far, NO_HORIZON, 10.0).unwrap()))
            .collect();
        assert_eq!(after_cut, [1400, 2400]);
        // Two seconds on, lifted again.
        tokio::time::advance(Duration::from_secs(3)).await;
        let now = Instant::now();
        let again: Vec<u128> = (0..3)
            .map(|_| ms(limiter.reserve_lifted(now, far, NO_HORIZON, 10.0).unwrap()))
            .collect();
        assert_eq!(again, [3400, 3500, 3600]);
    }

    #[tokio::test(start_paused = true)]
    async fn room_for_call_backs_is_what_could_go_at_once_and_is_left_in_the_bucket() {
        let limiter = bursty(4.0);
        let start = Instant::now();
        let far = start + Duration::from_secs(60);
        assert_eq!(limiter.room(start, 10, Duration::ZERO), 4);
        assert_eq!(limiter.room(start, 3, Duration::ZERO), 3);
        assert_eq!(
            limiter.stats().rate,
            4.0,
            "slow start: the rate is not raised"
        );
        // The room was not taken: the four tokens still go at once.
        let permits: Vec<Permit> = (0..4)
            .map(|_| limiter.reserve(start, far, NO_HORIZON).unwrap())
            .collect();
        assert!(permits.iter().all(|p| p.at == start));
        assert_eq!(
            limiter.room(start, 10, Duration::ZERO),
            0,
            "the bucket is empty"
        );
        // The instance sat idle before this invocation: what its rate allowed over that time
        // went unused, and is room, though its batch has just emptied the bucket.
        let idle = Duration::from_millis(500);
        assert_eq!(limiter.room(start, 10, idle), 2);
        assert_eq!(limiter.room(start, 1, idle), 1);
        assert_eq!(limiter.room(start, 10, Duration::from_millis(200)), 0);
        // A cut to 2/s: no room for two seconds, though the bucket refills in one, and none for
        // an idle gap either: the quota has just been found full.
        limiter.on_throttle(&permits[3]);
        assert_eq!(limiter.stats().rate, 2.0);
        tokio::time::advance(Duration::from_millis(1900)).await;
        assert_eq!(limiter.room(Instant::now(), 10, Duration::ZERO), 0);
        assert_eq!(limiter.room(Instant::now(), 10, idle), 0);
        tokio::time::advance(Duration::from_millis(100)).await;
        // A second deep at 2/s: room for two, each raising the rate as a paced call does.
        assert_eq!(limiter.room(Instant::now(), 10, Duration::ZERO), 2);
        assert!(
            (limiter.stats().rate - 2.2).abs() < 1e-9,
            "{:?}",
            limiter.stats()
        );
        // Probing, the limiter limits nothing and knows no quota: no room to call back into.
        let probing = RateLimiter::new(LimiterConfig {
            probe: true,
            ..LimiterConfig::default()
        });
        assert_eq!(probing.room(Instant::now(), 10, Duration::ZERO), 0);
        assert_eq!(probing.room(Instant::now(), 10, Duration::from_secs(1)), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probing_limiter_limits_nothing_until_the_first_throttle_then_halves_what_it_sent() {
        let limiter = RateLimiter::new(LimiterConfig {
            probe: true,
            ..LimiterConfig::default()
        });
        let start = Instant::now();
        let far = start + Duration::from_secs(60);
        // Thirty calls at once: every one goes now, none is paced.
        let permits: Vec<Permit> = (0..30)
            .map(|_| limiter.reserve(start, far, NO_HORIZON).unwrap())
            .collect();
        assert!(permits.iter().all(|p| p.at == start && !p.paced));
        assert!(limiter.stats().probing);
        // Calls accepted change nothing while probing.
        limiter.on_success(&permits[0]);
        assert!(limiter.stats().probing);
        // Ten more, half a second later; then a 429: 40 were sent in the last second, so the
        // rate becomes 20 and the next call waits one interval.
        tokio::time::advance(Duration::from_millis(500)).await;
        let now = Instant::now();
        for _ in 0..10 {
            limiter.reserve(now, far, NO_HORIZON).unwrap();
        }
        limiter.on_throttle(&permits[29]);
        let stats = limiter.stats();
        assert!(!stats.probing && !stats.slow_start);
        assert_eq!(stats.rate, 20.0);
        let next = limiter.reserve(now, far, NO_HORIZON).unwrap();
        assert_eq!(next.at - now, Duration::from_millis(50));
    }

    /// A probing limiter with an initial window of 5 and ten callers asking it for a place at
    /// once, each reporting what it got.
    fn ten_cold_callers() -> (
        std::sync::Arc<RateLimiter>,
        tokio::sync::mpsc::UnboundedReceiver<Window>,
    ) {
        let limiter = std::sync::Arc::new(RateLimiter::new(LimiterConfig {
            probe: true,
            initial_window: 5,
            ..LimiterConfig::default()
        }));
        let far = Instant::now() + Duration::from_secs(60);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..10 {
            let (limiter, tx) = (limiter.clone(), tx.clone());
            tokio::spawn(async move {
                tx.send(limiter.enter_window(far).await).unwrap();
            });
        }
        (limiter, rx)
    }

    /// The probe slots granted so far, once every task that can run has run; panics on
    /// anything else.
    async fn entered(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Window>) -> Vec<Permit> {
        tokio::time::sleep(Duration::from_millis(1)).await;
        let mut permits = Vec::new();
        while let Ok(window) = rx.try_recv() {
            match window {
                Window::Entered(permit) => permits.push(permit),
                other => panic!("{other:?}"),
            }
        }
        permits
    }

    #[tokio::test(start_paused = true)]
    async fn a_cold_instance_sends_its_initial_window_then_two_calls_per_accepted_answer() {
        let (limiter, mut rx) = ten_cold_callers();
        let first = entered(&mut rx).await;
        assert_eq!(first.len(), 5, "the initial window");
        assert!(first.iter().all(|p| p.probe && !p.paced));
        // Two answers, both accepted: each frees its place and widens the window by one.
        limiter.on_success(&first[0]);
        limiter.on_success(&first[1]);
        assert_eq!(entered(&mut rx).await.len(), 4);
        // The other three accepted: the window (ten) covers the whole batch, two round trips.
        for permit in &first[2..] {
            limiter.on_success(permit);
        }
        assert_eq!(entered(&mut rx).await.len(), 1);
        assert!(limiter.stats().probing);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_answer_frees_its_place_in_the_window_without_widening_it() {
        let (limiter, mut rx) = ten_cold_callers();
        let first = entered(&mut rx).await;
        limiter.on_failure(&first[0]);
        assert_eq!(entered(&mut rx).await.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cold_call_waits_for_the_window_no_longer_than_the_hold() {
        let start = Instant::now();
        let (_limiter, mut rx) = ten_cold_callers();
        assert_eq!(entered(&mut rx).await.len(), 5);
        // No answer at all (an API slower than the hold): the rest go once the hold is over.
        tokio::time::sleep_until(start + WINDOW_HOLD).await;
        let rest = entered(&mut rx).await;
        assert_eq!(rest.len(), 5);
        assert!(rest.iter().all(|p| p.at == start + WINDOW_HOLD && p.probe));
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_throttle_closes_the_window_on_the_calls_waiting_for_it() {
        let (limiter, mut rx) = ten_cold_callers();
        let first = entered(&mut rx).await;
        // Two accepted: four more go, and the last caller waits for the window.
        limiter.on_success(&first[0]);
        limiter.on_success(&first[1]);
        assert_eq!(entered(&mut rx).await.len(), 4);
        // Then a 429: the caller still waiting is told to ask for a slot at the rate instead.
        limiter.on_throttle(&first[2]);
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(rx.try_recv().unwrap(), Window::Closed);
        // A caller that comes after the probe is told it is over without waiting.
        let far = Instant::now() + Duration::from_secs(60);
        assert_eq!(limiter.enter_window(far).await, Window::NotProbing);
    }

    /// A probing limiter that sent ten calls at once, 50 ms ago, none answered yet.
    async fn ten_probe_calls_answered_50ms_later() -> (RateLimiter, Vec<Permit>) {
        let limiter = RateLimiter::new(LimiterConfig {
            probe: true,
            ..LimiterConfig::default()
        });
        let now = Instant::now();
        let far = now + Duration::from_secs(60);
        let permits: Vec<Permit> = (0..10)
            .map(|_| limiter.reserve(now, far, NO_HORIZON).unwrap())
            .collect();
        tokio::time::advance(Duration::from_millis(50)).await;
        (limiter, permits)
    }

    #[tokio::test(start_paused = true)]
    async fn after_the_probe_the_rate_is_the_share_of_it_the_api_accepted() {
        let (limiter, permits) = ten_probe_calls_answered_50ms_later().await;
        // Two accepted, then the first throttle (10 sent: the rate halves to 5), then the
        // other answers: one more accepted, six throttled.
        limiter.on_success(&permits[0]);
        limiter.on_success(&permits[1]);
        limiter.on_throttle(&permits[2]);
        assert_eq!(limiter.stats().rate, 5.0);
        limiter.on_success(&permits[3]);
        for p in &permits[4..9] {
            limiter.on_throttle(p);
            assert_eq!(limiter.stats().rate, 5.0, "no cut within the cool-down");
        }
        limiter.on_throttle(&permits[9]);
        // Three of ten accepted: three instances probing a quota of ten at once each end
        // near their share instead of halving to five each, fifteen in all.
        assert_eq!(limiter.stats().rate, 3.0);
    }

    /// Answers `permits` in order, one letter each: `A` accepted, `T` throttled, `F` failed.
    fn answer(limiter: &RateLimiter, permits: &[Permit], answers: &str) {
        assert_eq!(permits.len(), answers.len());
        for (permit, answer) in permits.iter().zip(answers.chars()) {
            match answer {
                'A' => limiter.on_success(permit),
                'T' => limiter.on_throttle(permit),
                'F' => limiter.on_failure(permit),
                other => panic!("no answer {other}"),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_call_counts_as_answered_and_not_accepted() {
        let (limiter, permits) = ten_probe_calls_answered_50ms_later().await;
        // Then two transient errors (a 503, a timeout): answers, but no word on the rate.
        answer(&limiter, &permits[..9], "ATATTTTTF");
        assert!(limiter.stats().settling, "one answer still out");
        answer(&limiter, &permits[9..], "F");
        let stats = limiter.stats();
        assert!(!stats.settling, "every probe call has answered");
        assert_eq!(stats.rate, 2.0, "two of ten accepted");
    }

    #[tokio::test(start_paused = true)]
    async fn a_first_throttle_that_is_the_probe_s_last_answer_settles_it_at_once() {
        let (limiter, permits) = ten_probe_calls_answered_50ms_later().await;
        answer(&limiter, &permits, "AAAAAAAAAT");
        let stats = limiter.stats();
        assert!(!stats.settling, "no answer is left to wait for");
        assert_eq!(
            stats.rate, 5.0,
            "half the ten sent, below the nine accepted"
        );
        tokio::time::advance(CALL_BACK_QUIET).await;
        assert!(limiter.room(Instant::now(), 10, Duration::ZERO) > 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_call_that_never_answers_holds_the_settling_only_until_settle_within() {
        let (limiter, permits) = ten_probe_calls_answered_50ms_later().await;
        answer(&limiter, &permits[..9], "AATTTTTTT");
        // The tenth call was dropped at its invocation's deadline: no answer ever comes.
        tokio::time::advance(SETTLE_WITHIN - Duration::from_millis(1)).await;
        let stats = limiter.stats();
        assert!(stats.settling);
        assert_eq!(stats.rate, 5.0, "the halved window while settling");
        assert_eq!(
            limiter.room(Instant::now(), 10, Duration::ZERO),
            0,
            "no call-backs while settling"
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        let stats = limiter.stats();
        assert!(!stats.settling);
        // Two accepted of the nine that answered, of ten sent: the tenth counts as they fared.
        assert!((stats.rate - 20.0 / 9.0).abs() < 1e-9, "{}", stats.rate);
        assert_eq!(
            limiter.room(Instant::now(), 10, Duration::ZERO),
            2,
            "call-backs again"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_slot_taken_before_the_probe_settles_is_taken_again_at_the_settled_rate() {
        let (limiter, permits) = ten_probe_calls_answered_50ms_later().await;
        let limiter = std::sync::Arc::new(limiter);
        let far = Instant::now() + Duration::from_secs(60);
        let cut = Instant::now();
        limiter.on_success(&permits[0]);
        limiter.on_throttle(&permits[1]);
        // A retry asks for a slot while the other answers are out: at the halved window (5/s)
        // it would go 200 ms after the throttle.
        let retry = tokio::spawn({
            let limiter = limiter.clone();
            async move { limiter.acquire(far, NO_HORIZON).await.unwrap() }
        });
        tokio::task::yield_now().await;
        for p in &permits[2..] {
            limiter.on_throttle(p);
        }
        // One of ten accepted: 1/s, from a bucket emptied at the throttle.
        assert_eq!(limiter.stats().rate, 1.0);
        let slot = retry.await.unwrap();
        assert_eq!(slot.at - cut, Duration::from_secs(1));
        let next = limiter.reserve(Instant::now(), far, NO_HORIZON).unwrap();
        assert_eq!(next.at - cut, Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_cut_empties_the_bucket() {
        let limiter = bursty(4.0);
        let far = Instant::now() + Duration::from_secs(60);
        let p = limiter.reserve(Instant::now(), far, NO_HORIZON).unwrap();
        tokio::time::advance(Duration::from_millis(100)).await;
        limiter.on_throttle(&p);
        let now = Instant::now();
        let next = limiter.reserve(now, far, NO_HORIZON).unwrap();
        // 2/s after the cut: the next call waits one interval, with no burst left.
        assert_eq!(next.at - now, Duration::from_millis(500));
    }

    #[tokio::test(start_paused = true)]
    async fn calls_that_leave_tokens_in_the_bucket_do_not_raise_the_rate() {
        let limiter = bursty(5.0);
        let far = Instant::now() + Duration::from_secs(600);
        // Three calls at once every second: 3/s, within the 5-token bucket and the 5/s rate.
        for _ in 0..30 {
            for _ in 0..3 {
                let p = limiter.acquire(far, NO_HORIZON).await.unwrap();
                limiter.on_success(&p);
            }
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        assert_eq!(limiter.stats().rate, 5.0);
        // Seven at once take the last token: the limiter was the constraint.
        for _ in 0..7 {
            let p = limiter.acquire(far, NO_HORIZON).await.unwrap();
            limiter.on_success(&p);
        }
        assert!(limiter.stats().rate > 5.0);
    }

    #[tokio::test(start_paused = true)]
    async fn calls_are_paced_at_the_rate() {
        let limiter = limiter(4.0);
        let start = Instant::now();
        let far = start + Duration::from_secs(60);
        let mut slots = Vec::new();
        for _ in 0..5 {
            slots.push(limiter.acquire(far, NO_HORIZON).await.unwrap().at - start);
        }
        let ms: Vec<u128> = slots.iter().map(|d| d.as_millis()).collect();
        assert_eq!(ms, [0, 250, 500, 750, 1000]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_cannot_wait_gets_a_booking_instead_of_a_sleep() {
        let limiter = limiter(2.0);
        let now = Instant::now();
        let latest = now + Duration::from_millis(600);
        assert!(limiter.reserve(now, latest, NO_HORIZON).is_ok()); // at 0
        assert!(limiter.reserve(now, latest, NO_HORIZON).is_ok()); // at 500 ms
        let bookings: Vec<u128> = (0..3)
            .map(|_| {
                limiter
                    .reserve(now, latest, NO_HORIZON)
                    .unwrap_err()
                    .unwrap()
                    .as_millis()
            })
            .collect();
        // The booking line starts at the first free slot (1 s) and runs at 1.25 x 2/s.
        assert_eq!(bookings, [1000, 1400, 1800]);
        assert_eq!(Instant::now(), now, "nothing slept");
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_booked_beyond_the_horizon() {
        let limiter = limiter(1.0);
        let now = Instant::now();
        assert!(limiter.reserve(now, now, Duration::from_secs(2)).is_ok());
        let horizon = Duration::from_millis(1500);
        assert_eq!(
            limiter.reserve(now, now, horizon),
            Err(Some(Duration::from_secs(1)))
        );
        // The next booking would be 1.8 s out: refused, and the line does not move.
        assert_eq!(limiter.reserve(now, now, horizon), Err(None));
        assert_eq!(
            limiter.reserve(now, now, NO_HORIZON),
            Err(Some(Duration::from_millis(1800)))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn slow_start_grows_the_rate_exponentially_until_the_first_throttle() {
        let limiter = limiter(2.0);
        let far = Instant::now() + Duration::from_secs(600);
        let start = Instant::now();
        while Instant::now() - start < Duration::from_secs(3) {
            let p = limiter.acquire(far, NO_HORIZON).await.unwrap();
            limiter.on_success(&p);
        }
        let rate = limiter.stats().rate;
        assert!(
            (7.0..=12.0).contains(&rate),
            "2/s after 3 s of slow start, e-fold every 2 s: {rate}"
        );
        let p = limiter.acquire(far, NO_HORIZON).await.unwrap();
        limiter.on_throttle(&p);
        let after = limiter.stats();
        assert!(!after.slow_start);
        assert!(
            (after.rate - rate * 0.5).abs() < 1.5,
            "{} vs {rate}",
            after.rate
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_throttles_cuts_once_per_cool_down() {
        let limiter = limiter(10.0);
        let far = Instant::now() + Duration::from_secs(60);
        let in_flight: Vec<Permit> = (0..5)
            .map(|_| limiter.reserve(Instant::now(), far, NO_HORIZON).unwrap())
            .collect();
        tokio::time::advance(Duration::from_secs(1)).await;
        for p in &in_flight {
            limiter.on_throttle(p);
        }
        assert!((limiter.stats().rate - 5.0).abs() < 1e-9);
        let just_after = limiter.acquire(far, NO_HORIZON).await.unwrap();
        limiter.on_throttle(&just_after);
        assert!(
            (limiter.stats().rate - 5.0).abs() < 1e-9,
            "within the cool-down"
        );
        tokio::time::advance(CUT_COOL_DOWN).await;
        let later = limiter.acquire(far, NO_HORIZON).await.unwrap();
        limiter.on_throttle(&later);
        assert!((limiter.stats().rate - 2.5).abs() < 1e-9);
        let stats = limiter.stats();
        assert_eq!(
            (stats.throttles, stats.cuts),
            (7, 2),
            "seven throttles, two cuts"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn after_slow_start_the_rate_grows_by_the_additive_step_per_second() {
        let limiter = limiter(10.0);
        let far = Instant::now() + Duration::from_secs(600);
        let p = limiter.acquire(far, NO_HORIZON).await.unwrap();
        tokio::time::advance(Duration::from_millis(1)).await;
        limiter.on_throttle(&p); // leave slow start at 5/s
        let start = Instant::now();
        while Instant::now() - start < Duration::from_secs(10) {
            let p = limiter.acquire(far, NO_HORIZON).await.unwrap();
            limiter.on_success(&p);
        }
        let rate = limiter.stats().rate;
        assert!((6.8..=7.2).contains(&rate), "5/s + 10 s x 0.2/s: {rate}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_instance_does_not_inflate_its_rate() {
        let limiter = limiter(5.0);
        let far = Instant::now() + Duration::from_secs(600);
        for _ in 0..20 {
            tokio::time::advance(Duration::from_secs(2)).await;
            let p = limiter.acquire(far, NO_HORIZON).await.unwrap();
            limiter.on_success(&p);
        }
        assert_eq!(limiter.stats().rate, 5.0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_ceiling_and_the_floor_hold() {
        let limiter = RateLimiter::new(LimiterConfig {
            initial_rate: 50.0,
            max_rate: Some(8.0),
            ..LimiterConfig::default()
        });
        assert_eq!(limiter.stats().rate, 8.0);
        for _ in 0..50 {
            let p = limiter
                .acquire(Instant::now() + Duration::from_secs(60), NO_HORIZON)
                .await
                .unwrap();
            tokio::time::advance(Duration::from_millis(1)).await;
            limiter.on_throttle(&p);
        }
        assert_eq!(limiter.stats().rate, LimiterConfig::default().min_rate);
    }

    #[tokio::test(start_paused = true)]
    async fn independent_instances_settle_near_a_fair_share_of_an_unknown_quota() {
        settle_on_a_shared_quota(limiter).await;
    }

    #[tokio::test(start_paused = true)]
    async fn independent_bursty_instances_settle_near_a_fair_share_too() {
        settle_on_a_shared_quota(bursty).await;
    }

    /// Three instances, each with its own limiter, share one API limited to 10 requests/s
    /// (token bucket, burst 10), each always having work. Simulated in paused time.
    async fn settle_on_a_shared_quota(limiter: fn(f64) -> RateLimiter) {
        use std::sync::Arc;
        struct Bucket {
            tokens: f64,
            at: Instant,
        }
        let bucket = Arc::new(Mutex::new(Bucket {
            tokens: 10.0,
            at: Instant::now(),
        }));
        let accepted = Arc::new(Mutex::new([0u32; 3]));
        let refused = Arc::new(Mutex::new(0u32));
        let limiters: Vec<Arc<RateLimiter>> = [1.0, 4.0, 12.0]
            .into_iter()
            .map(|r| Arc::new(limiter(r)))
            .collect();
        let end = Instant::now() + Duration::from_secs(180);
        let mut tasks = Vec::new();
        for (i, limiter) in limiters.iter().cloned().enumerate() {
            let (bucket, accepted, refused) = (bucket.clone(), accepted.clone(), refused.clone());
            tasks.push(tokio::spawn(async move {
                while Instant::now() < end {
                    let p = limiter
                        .acquire(end + Duration::from_secs(60), NO_HORIZON)
                        .await
                        .unwrap();
                    tokio::time::sleep(Duration::from_millis(5)).await; // round trip
                    let ok = {
                        let mut b = bucket.lock().unwrap();
                        let now = Instant::now();
                        b.tokens = (b.tokens + (now - b.at).as_secs_f64() * 10.0).min(10.0);
                        b.at = now;
                        if b.tokens >= 1.0 {
                            b.tokens -= 1.0;
                            true
                        } else {
                            false
                        }
                    };
                    if ok {
                        limiter.on_success(&p);
                        if Instant::now() > end - Duration::from_secs(60) {
                            accepted.lock().unwrap()[i] += 1;
                        }
                    } else {
                        limiter.on_throttle(&p);
                        if Instant::now() > end - Duration::from_secs(60) {
                            *refused.lock().unwrap() += 1;
                        }
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let accepted = *accepted.lock().unwrap();
        let total: u32 = accepted.iter().sum();
        let refused = *refused.lock().unwrap();
        eprintln!("last minute: accepted {accepted:?} (total {total}), refused {refused}");
        // Over the last minute: the quota is used (10/s), shared about evenly, few refusals.
        assert!(
            total >= 540,
            "accepted {total} of 600 possible: {accepted:?}"
        );
        for share in accepted {
            let share = f64::from(share) / f64::from(total);
            assert!((0.2..=0.47).contains(&share), "shares {accepted:?}");
        }
        assert!(
            f64::from(refused) < 0.05 * f64::from(total),
            "refused {refused} in the last minute"
        );
    }
}
