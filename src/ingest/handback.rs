//! The visibility timeout of each message handed back: when SQS delivers it again.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use aws_lambda_events::event::sqs::SqsMessage;
use tokio::time::Instant;

use super::{epoch_ms, fifo_group, receive_count, since_first_receive, Ingestor, Outcome};
use crate::backoff::{visibility_seconds, Backoff, SQS_MAX_VISIBILITY};
use crate::drain::spread;
use crate::mediapackage::AssetApi;
use crate::redelivery::{
    push_back_keeps, Budget, Delays, Redelivery, CALL_BACK_AHEAD, IDLE_CALL_BACK,
    PLACEMENT_CHOICES, PLACEMENT_WINDOW, PUSH_BACK_SPAN,
};
use crate::sqs::{QueueApi, VisibilityChange};

impl<A: AssetApi> Ingestor<A> {
    pub(super) fn delays(&self) -> Delays {
        Delays {
            backoff: Backoff {
                base: self.config.redelivery_base,
                cap: self.config.redelivery_cap,
            },
            quota: self.config.quota_redelivery,
            fifo_cap: self.config.fifo_redelivery_cap,
        }
    }

    /// The visibility timeout each message to retry gets, from its [`Redelivery`] and receive
    /// count ([`Delays::delay`]); `None` where the queue's own timeout applies. A message that
    /// got no request slot comes back at a random time within the spread of its queue's entry
    /// in `times_left` (the backlog's expected time left, see [`crate::drain`]) when there is
    /// one, overbooked as its budget says ([`Budget::overbook`]): of [`PLACEMENT_CHOICES`]
    /// such times, the one with the fewest of this instance's hand-backs due near it
    /// ([`crate::redelivery::Away::due_near`], this batch's included). `unit` draws the
    /// jitter.
    pub fn redelivery_delays(
        &self,
        records: &[SqsMessage],
        outcomes: &[Outcome],
        times_left: &BTreeMap<&str, Duration>,
        mut unit: impl FnMut() -> f64,
    ) -> Vec<Option<i32>> {
        let delays = self.delays();
        let now_ms = epoch_ms();
        let now = Instant::now();
        // This batch's hand-backs placed so far: queue and due time.
        let mut placed: Vec<(&str, Instant)> = Vec::new();
        records
            .iter()
            .zip(outcomes)
            .map(|(record, outcome)| {
                let Outcome::Retry(_, redelivery) = outcome else {
                    return None;
                };
                let fifo = fifo_group(record).is_some();
                let receives = receive_count(record);
                let budget = Budget {
                    receives,
                    max_receives: self.known_limit(record.event_source_arn.as_deref()),
                };
                let spread = record
                    .event_source_arn
                    .as_deref()
                    .and_then(|arn| times_left.get(arn))
                    .map(|left| spread(*left, budget.overbook()));
                let mut draw = || delays.delay(*redelivery, receives, spread, fifo, unit());
                let delay = match (record.event_source_arn.as_deref(), spread) {
                    (Some(arn), Some(_)) if may_call_back(record, outcome) => {
                        let draws = (0..PLACEMENT_CHOICES).filter_map(|_| draw());
                        let due = self
                            .away
                            .least_crowded(arn, draws.map(|d| now + d), |due| {
                                placed
                                    .iter()
                                    .filter(|(queue, at)| *queue == arn && near(*at, due))
                                    .count()
                            })?;
                        placed.push((arn, due));
                        due - now
                    }
                    _ => draw()?,
                };
                Some(visibility_seconds(
                    delay,
                    since_first_receive(record, now_ms),
                ))
            })
            .collect()
    }

    /// For each queue with messages handed back for want of a request slot, how long its
    /// backlog has left ([`crate::drain::DrainGauge::time_left`]), reading the queue's depth
    /// when it is due.
    pub(super) async fn times_left<'r>(
        &self,
        queue: &dyn QueueApi,
        records: &'r [SqsMessage],
        outcomes: &[Outcome],
        until: Instant,
    ) -> BTreeMap<&'r str, Duration> {
        let unbooked = records
            .iter()
            .zip(outcomes)
            .filter_map(|(record, outcome)| {
                no_slot(outcome).then_some(record.event_source_arn.as_deref()?)
            });
        let arns: BTreeSet<&str> = unbooked.collect();
        let mut times_left = BTreeMap::new();
        for arn in arns {
            self.read_depth(queue, arn, until).await;
            if let Some(left) = self.gauge.time_left(arn, Instant::now()) {
                times_left.insert(arn, left);
            }
        }
        times_left
    }

    /// Reads the depth of the queue `arn` into the drain gauge if a read is due and no other
    /// call of this instance has claimed it, giving up at `until`.
    pub(super) async fn read_depth(&self, queue: &dyn QueueApi, arn: &str, until: Instant) {
        if !self.gauge.claim(arn, Instant::now()) {
            return;
        }
        match tokio::time::timeout_at(until, queue.depth(arn)).await {
            Ok(Ok(depth)) => self.gauge.observe(arn, Instant::now(), depth),
            Ok(Err(error)) => tracing::debug!(
                queue = arn,
                code = error.code,
                error = error.message,
                "could not read the queue's depth; handed-back messages keep their booking"
            ),
            Err(_) => tracing::debug!(
                queue = arn,
                "no time left to read the queue's depth; handed-back messages keep their booking"
            ),
        }
    }

    /// Reads the depth of each source queue of `records` that is due, giving up at `until`,
    /// so the drain gauge follows the backlog on every batch, including those whose messages
    /// can no longer be handed back.
    pub(super) async fn read_depths(&self, records: &[SqsMessage], until: Instant) {
        let Some(queue) = &self.queue else {
            return;
        };
        let arns: BTreeSet<&str> = records
            .iter()
            .filter_map(|record| record.event_source_arn.as_deref())
            .collect();
        for arn in arns {
            self.read_depth(queue.as_ref(), arn, until).await;
        }
    }

    /// Sets the visibility timeout of every message to retry, so SQS delivers it again when it
    /// stands a chance, all before `until`. The queue's depth, which only refines the delays, is
    /// read in the first quarter of the time left at most. A message whose visibility cannot be
    /// changed in time is still reported: the queue's own visibility timeout then applies, and
    /// nothing is lost.
    pub async fn delay_redeliveries(
        &self,
        records: &[SqsMessage],
        outcomes: &[Outcome],
        until: Instant,
    ) {
        let Some(queue) = &self.queue else {
            return;
        };
        if !outcomes.iter().any(|o| matches!(o, Outcome::Retry(..))) {
            return;
        }
        let now = Instant::now();
        let depth_until = now + until.saturating_duration_since(now) / 4;
        let times_left = self
            .times_left(queue.as_ref(), records, outcomes, depth_until)
            .await;
        let delays = self.redelivery_delays(records, outcomes, &times_left, fastrand::f64);
        // Per queue: the changes, and for each its message ID and whether it may be called back.
        type Changes<'r> = (Vec<VisibilityChange>, Vec<(&'r str, bool)>);
        let mut by_queue: BTreeMap<&str, Changes> = BTreeMap::new();
        for ((record, delay), outcome) in records.iter().zip(delays).zip(outcomes) {
            let (Some(seconds), Some(arn), Some(receipt_handle)) = (
                delay,
                record.event_source_arn.as_deref(),
                record.receipt_handle.as_deref(),
            ) else {
                continue;
            };
            // Spread over its backlog's time left for want of a slot: it may be called back.
            let callable = times_left.contains_key(arn) && may_call_back(record, outcome);
            let entry = by_queue.entry(arn).or_default();
            entry.0.push(VisibilityChange {
                receipt_handle: receipt_handle.to_string(),
                seconds,
            });
            entry
                .1
                .push((record.message_id.as_deref().unwrap_or(""), callable));
        }
        let changes = by_queue
            .iter()
            .map(|(arn, (changes, messages))| async move {
                let results = queue.change_visibility(arn, changes).await;
                let now = Instant::now();
                for ((result, change), (message_id, callable)) in
                    results.iter().zip(changes).zip(messages)
                {
                    match result {
                        Ok(()) => {
                            if *callable {
                                let due = now + Duration::from_secs(change.seconds.max(0) as u64);
                                self.away.hold(arn, due, change.receipt_handle.clone());
                            }
                            tracing::debug!(
                                message_id,
                                seconds = change.seconds,
                                "redelivery delayed"
                            )
                        }
                        Err(error) => tracing::warn!(
                            message_id,
                            code = error.code,
                            error = error.message,
                            "could not delay redelivery; the queue's visibility timeout applies"
                        ),
                    }
                }
            });
        if tokio::time::timeout_at(until, futures::future::join_all(changes))
            .await
            .is_err()
        {
            tracing::warn!(
                "the invocation deadline came before every redelivery delay was set; the queue's visibility timeout applies to the rest"
            );
        }
    }

    /// How long this instance sat idle before an invocation that started at `started`: since
    /// its last one ended, at most [`IDLE_CALL_BACK`]. Nothing before its first.
    pub(super) fn idle_before(&self, started: Instant) -> Duration {
        self.last_ended
            .lock()
            .expect("last ended")
            .map_or(Duration::ZERO, |ended| {
                started.saturating_duration_since(ended).min(IDLE_CALL_BACK)
            })
    }

    /// Calls back messages this instance handed back for want of a slot, the furthest due
    /// first, as many as its limiter has room for now, counting the calls its rate allowed
    /// over the `idle` gap before this invocation ([`crate::redelivery::Away`],
    /// [`crate::limiter::RateLimiter::room`]), or every one once the backlog is within
    /// [`crate::drain::ENDGAME`] of its end, giving up at `until`: quota the returns leave
    /// unused is used by messages that were away rather than left idle. With no room, pushes
    /// later those due too soon for its part of the drain rate ([`Ingestor::push_back`]).
    /// A call-back or push that fails changes nothing: the message comes back when due.
    pub async fn call_back(
        &self,
        records: &[SqsMessage],
        until: Instant,
        idle: Duration,
    ) -> Returns {
        let mut returns = Returns::default();
        let Some(queue) = &self.queue else {
            return returns;
        };
        let arns: BTreeSet<&str> = records
            .iter()
            .filter_map(|record| record.event_source_arn.as_deref())
            .collect();
        for arn in arns {
            let now = Instant::now();
            // In the backlog's last seconds the quota can take every message still away.
            let ending = self.gauge.ending(arn, now);
            let handles = self.away.take(arn, now, |available| {
                if ending {
                    available
                } else {
                    self.limiter.room(now, available as u32, idle) as usize
                }
            });
            if handles.is_empty() {
                if !ending {
                    returns.pushed_back += self.push_back(queue.as_ref(), arn, until).await;
                }
                continue;
            }
            let changes: Vec<VisibilityChange> = handles
                .into_iter()
                .map(|receipt_handle| VisibilityChange {
                    receipt_handle,
                    seconds: 0,
                })
                .collect();
            let Ok(results) =
                tokio::time::timeout_at(until, queue.change_visibility(arn, &changes)).await
            else {
                tracing::debug!(queue = arn, "no time left to call messages back");
                break;
            };
            for result in results {
                match result {
                    Ok(()) => returns.called_back += 1,
                    Err(error) => tracing::debug!(
                        queue = arn,
                        code = error.code,
                        error = error.message,
                        "could not call a message back; it comes back when due"
                    ),
                }
            }
        }
        returns
    }

    /// Pushes later the messages this instance handed back to `arn` that are due too soon for
    /// it to serve: of those due over [`PUSH_BACK_SPAN`] past [`CALL_BACK_AHEAD`], all beyond
    /// what its part of the drain rate serves in that time, with a margin in the backlog's
    /// last 30 seconds ([`push_back_keeps`], [`crate::drain::DrainGauge::share`] of the messages
    /// it has away), the furthest due first. Each goes to the least crowded of
    /// [`PLACEMENT_CHOICES`] random times from the end of that span to the end of the
    /// backlog's time left. Returns how many were moved.
    /// Nothing is pushed while the limiter probes or counts the answers to its probe after the
    /// first 429, nor while the backlog's time left is unknown or shorter than the span.
    async fn push_back(&self, queue: &dyn QueueApi, arn: &str, until: Instant) -> usize {
        let stats = self.limiter.stats();
        if stats.probing || stats.settling {
            return 0;
        }
        let now = Instant::now();
        let Some(left) = self.gauge.time_left(arn, now) else {
            return 0;
        };
        let from = now + CALL_BACK_AHEAD;
        let to = from + PUSH_BACK_SPAN;
        let end = now + spread(left, 1.0).min(SQS_MAX_VISIBILITY);
        if end <= to + Duration::from_secs(1) {
            return 0;
        }
        let away = self.away.due_from(arn, now) as u64;
        let Some(rate) = self.gauge.share(arn, now, away) else {
            return 0;
        };
        let crowded = self
            .away
            .crowded(arn, from, to, push_back_keeps(rate, left));
        if crowded.is_empty() {
            return 0;
        }
        let room = (end - to).as_secs_f64();
        let moves: Vec<(Instant, String, i32)> = crowded
            .into_iter()
            .map(|(due, handle)| {
                let draws = (0..PLACEMENT_CHOICES)
                    .map(|_| to + Duration::from_secs_f64(room * fastrand::f64()));
                let at = self.away.least_crowded(arn, draws, |_| 0).unwrap_or(due);
                let seconds = at.saturating_duration_since(now).as_secs().max(1);
                (due, handle, seconds as i32)
            })
            .collect();
        let changes: Vec<VisibilityChange> = moves
            .iter()
            .map(|(_, handle, seconds)| VisibilityChange {
                receipt_handle: handle.clone(),
                seconds: *seconds,
            })
            .collect();
        let results = tokio::time::timeout_at(until, queue.change_visibility(arn, &changes))
            .await
            .unwrap_or_default();
        let now = Instant::now();
        let mut pushed = 0;
        for (i, (due, handle, seconds)) in moves.into_iter().enumerate() {
            if let Some(Ok(())) = results.get(i) {
                pushed += 1;
                self.away
                    .hold(arn, now + Duration::from_secs(seconds as u64), handle);
            } else {
                self.away.hold(arn, due, handle);
            }
        }
        tracing::debug!(queue = arn, pushed, "hand-backs pushed later");
        pushed
    }
}

/// What [`Ingestor::call_back`] did: messages called back, and messages pushed later.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Returns {
    pub called_back: usize,
    pub pushed_back: usize,
}

/// Whether a message handed back with `outcome` may be called back once spread over its
/// backlog's time left: handed back for want of a slot, and not in a FIFO group (the group
/// behind it waits on it, so it is never sent far).
fn may_call_back(record: &SqsMessage, outcome: &Outcome) -> bool {
    fifo_group(record).is_none() && no_slot(outcome)
}

/// Whether two due times fall within [`PLACEMENT_WINDOW`] of each other.
fn near(a: Instant, b: Instant) -> bool {
    a.max(b) - a.min(b) <= PLACEMENT_WINDOW
}

/// Whether `outcome` hands its message back for want of a request slot.
fn no_slot(outcome: &Outcome) -> bool {
    matches!(
        outcome,
        Outcome::Retry(_, Redelivery::After(_) | Redelivery::Within(_))
    )
}
