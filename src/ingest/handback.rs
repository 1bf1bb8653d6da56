//! The visibility timeout of each message handed back: when SQS delivers it again.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use aws_lambda_events::event::sqs::SqsMessage;
use tokio::time::Instant;

use super::{epoch_ms, fifo_group, receive_count, since_first_receive, Ingestor, Outcome};
use crate::backoff::{visibility_seconds, Backoff};
use crate::mediapackage::AssetApi;
use crate::redelivery::{Budget, Delays, Redelivery};
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
    /// got no request slot comes back at a random time within its queue's entry in `spreads`
    /// (the backlog's expected time left, see [`crate::drain`]) when there is one. `unit` draws
    /// the jitter.
    pub fn redelivery_delays(
        &self,
        records: &[SqsMessage],
        outcomes: &[Outcome],
        spreads: &BTreeMap<&str, Duration>,
        mut unit: impl FnMut() -> f64,
    ) -> Vec<Option<i32>> {
        let delays = self.delays();
        let now_ms = epoch_ms();
        records
            .iter()
            .zip(outcomes)
            .map(|(record, outcome)| {
                let Outcome::Retry(_, redelivery) = outcome else {
                    return None;
                };
                let spread = record
                    .event_source_arn
                    .as_deref()
                    .and_then(|arn| spreads.get(arn))
                    .copied();
                let fifo = fifo_group(record).is_some();
                let receives = receive_count(record);
                let reach = Budget {
                    receives,
                    max_receives: self.known_limit(record.event_source_arn.as_deref()),
                }
                .reach();
                let delay = delays.delay(*redelivery, receives, spread, reach, fifo, unit())?;
                Some(visibility_seconds(
                    delay,
                    since_first_receive(record, now_ms),
                ))
            })
            .collect()
    }

    /// For each queue with messages handed back for want of a request slot, how long its
    /// backlog has left ([`DrainGauge::spread`]), reading the queue's depth when it is due.
    pub(super) async fn spreads<'r>(
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
                matches!(
                    outcome,
                    Outcome::Retry(_, Redelivery::After(_) | Redelivery::Within(_))
                )
                .then_some(record.event_source_arn.as_deref()?)
            });
        let arns: BTreeSet<&str> = unbooked.collect();
        let mut spreads = BTreeMap::new();
        for arn in arns {
            self.read_depth(queue, arn, until).await;
            if let Some(spread) = self.gauge.spread(arn, Instant::now()) {
                spreads.insert(arn, spread);
            }
        }
        spreads
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
        let spreads = self
            .spreads(queue.as_ref(), records, outcomes, depth_until)
            .await;
        let delays = self.redelivery_delays(records, outcomes, &spreads, fastrand::f64);
        let mut by_queue: BTreeMap<&str, (Vec<VisibilityChange>, Vec<&str>)> = BTreeMap::new();
        for (record, delay) in records.iter().zip(delays) {
            let (Some(seconds), Some(arn), Some(receipt_handle)) = (
                delay,
                record.event_source_arn.as_deref(),
                record.receipt_handle.as_deref(),
            ) else {
                continue;
            };
            let entry = by_queue.entry(arn).or_default();
            entry.0.push(VisibilityChange {
                receipt_handle: receipt_handle.to_string(),
                seconds,
            });
            entry.1.push(record.message_id.as_deref().unwrap_or(""));
        }
        let changes = by_queue
            .iter()
            .map(|(arn, (changes, message_ids))| async move {
                let results = queue.change_visibility(arn, changes).await;
                for ((result, change), message_id) in results.iter().zip(changes).zip(message_ids) {
                    match result {
                        Ok(()) => {
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
}
