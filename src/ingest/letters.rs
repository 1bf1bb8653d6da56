//! Dead letters with their reason, and the receive budget they are counted against.

use aws_lambda_events::event::sqs::SqsMessage;
use tokio::time::Instant;

use super::{
    epoch_ms, fifo_group, lanes, log_outcome, receive_count, since_first_receive, Failure,
    Ingestor, Outcome, ReceiveLimit, LIMIT_RETRY,
};
use crate::mediapackage::AssetApi;
use crate::redelivery::{can_delay, Budget};
use crate::sqs::DeadLetter;

impl<A: AssetApi> Ingestor<A> {
    /// The dead letter for `record`, failed with `failure`.
    pub(super) fn letter(
        &self,
        record: &SqsMessage,
        failure: &Failure,
        last: Option<&Failure>,
    ) -> DeadLetter {
        DeadLetter {
            body: record.body.clone().unwrap_or_default(),
            message_id: record.message_id.clone().unwrap_or_default(),
            message_group_id: fifo_group(record).map(str::to_string),
            receive_count: receive_count(record),
            code: failure.code.clone(),
            reason: failure.reason.clone(),
            request_id: failure.request_id.clone(),
            last_error: last.map(|l| format!("{}: {}", l.code, l.reason)),
        }
    }

    /// Sends `letter` to the dead-letter queue of `record`'s queue before `until`. The send and
    /// its outcome stay together: a send still running at `until` counts as not done, and the
    /// message is reported for redelivery (if SQS took it after all, the dead-letter queue holds
    /// a second copy with the same `OriginalMessageId`).
    pub(super) async fn send_letter(
        &self,
        record: &SqsMessage,
        letter: &DeadLetter,
        until: Instant,
    ) -> bool {
        let (Some(queue), Some(queue_arn)) = (&self.queue, record.event_source_arn.as_deref())
        else {
            return false;
        };
        match tokio::time::timeout_at(until, queue.dead_letter(queue_arn, letter)).await {
            Ok(Ok(())) => true,
            Ok(Err(error)) => {
                tracing::warn!(
                    code = error.code,
                    error = error.message,
                    "could not send to the dead-letter queue; reported for redelivery instead"
                );
                false
            }
            Err(_) => {
                tracing::warn!(
                    "the dead-letter send was cut by the invocation deadline; reported for redelivery instead"
                );
                false
            }
        }
    }

    /// Sends a permanent failure to the dead-letter queue and acknowledges it; if there is no
    /// queue port, no dead-letter queue or the send fails, it stays a failure to redeliver.
    pub(super) async fn dead_letter(
        &self,
        record: &SqsMessage,
        outcome: Outcome,
        until: Instant,
    ) -> Outcome {
        let Outcome::Permanent(failure) = &outcome else {
            return outcome;
        };
        let letter = self.letter(record, failure, None);
        if self.send_letter(record, &letter, until).await {
            Outcome::DeadLettered(failure.clone())
        } else {
            outcome
        }
    }

    /// Sends to the dead-letter queue, with `ErrorCode` `RetriesExhausted`, every message to
    /// retry that SQS would otherwise move there without a reason: on its last delivery, or
    /// with no visibility time left to be kept away. A FIFO group's messages go in order.
    pub(super) async fn retire_exhausted(
        &self,
        records: &[SqsMessage],
        mut outcomes: Vec<Outcome>,
        until: Instant,
    ) -> Vec<Outcome> {
        if self.queue.is_none() || !outcomes.iter().any(|o| matches!(o, Outcome::Retry(..))) {
            return outcomes;
        }
        let now_ms = epoch_ms();
        let retire = |index: usize| {
            let record = &records[index];
            let outcome = &outcomes[index];
            async move {
                let Outcome::Retry(last, redelivery) = outcome else {
                    return None;
                };
                let receives = receive_count(record);
                let max = self.receive_limit(record.event_source_arn.as_deref()).await;
                let budget = Budget {
                    receives,
                    max_receives: max,
                };
                let why = if budget.is_last() {
                    format!(
                        "not done on its last delivery (receive {receives} of maxReceiveCount {})",
                        max.unwrap_or_default()
                    )
                } else if !can_delay(*redelivery, since_first_receive(record, now_ms)) {
                    "no visibility time left: SQS keeps a message away at most 12 hours since its first receive".to_string()
                } else {
                    return None;
                };
                let failure = Failure {
                    code: "RetriesExhausted".into(),
                    reason: format!("{why}; last error {}: {}", last.code, last.reason),
                    request_id: last.request_id.clone(),
                };
                let letter = self.letter(record, &failure, Some(last));
                if self.send_letter(record, &letter, until).await {
                    let outcome = Outcome::DeadLettered(failure);
                    log_outcome(record.message_id.as_deref(), &outcome);
                    Some((index, outcome))
                } else {
                    tracing::error!(
                        message_id = record.message_id.as_deref(),
                        reason = failure.reason,
                        "out of deliveries and not dead-lettered; SQS will move it to the dead-letter queue without a reason"
                    );
                    None
                }
            }
        };
        let per_lane = lanes(records).into_iter().map(|lane| {
            let retire = &retire;
            async move {
                let mut done = Vec::new();
                for index in lane {
                    done.extend(retire(index).await);
                }
                done
            }
        });
        let retired: Vec<(usize, Outcome)> = futures::future::join_all(per_lane)
            .await
            .into_iter()
            .flatten()
            .collect();
        for (index, outcome) in retired {
            outcomes[index] = outcome;
        }
        outcomes
    }

    /// The `maxReceiveCount` of the queue `queue_arn`: `MAX_RECEIVE_COUNT` if set, else its
    /// redrive policy's, read once per queue. `None` if neither is known.
    pub(super) async fn receive_limit(&self, queue_arn: Option<&str>) -> Option<u32> {
        if let Some(max) = self.config.max_receive_count {
            return Some(max);
        }
        let (Some(queue), Some(arn)) = (&self.queue, queue_arn) else {
            return None;
        };
        match self.receive_limits.lock().expect("limits").get(arn) {
            Some(ReceiveLimit { max: Some(max), .. }) => return Some(*max),
            Some(limit) if limit.read_at.elapsed() < LIMIT_RETRY => return None,
            _ => {}
        }
        let read = queue.max_receive_count(arn).await;
        let max = read.as_ref().ok().copied().flatten();
        self.receive_limits.lock().expect("limits").insert(
            arn.to_string(),
            ReceiveLimit {
                max,
                answered: read.is_ok(),
                read_at: Instant::now(),
            },
        );
        match read {
            Ok(max) => max,
            Err(error) => {
                tracing::warn!(
                    queue = arn,
                    code = error.code,
                    error = error.message,
                    "could not read the queue's maxReceiveCount; set MAX_RECEIVE_COUNT"
                );
                None
            }
        }
    }

    /// The `maxReceiveCount` of the queue `queue_arn` as far as it is known without asking:
    /// `MAX_RECEIVE_COUNT`, or what [`Ingestor::receive_limit`] has read.
    pub(super) fn known_limit(&self, queue_arn: Option<&str>) -> Option<u32> {
        self.config.max_receive_count.or_else(|| {
            self.receive_limits
                .lock()
                .expect("limits")
                .get(queue_arn?)
                .and_then(|limit| limit.max)
        })
    }

    /// Whether the last read of the `maxReceiveCount` of the queue `queue_arn` failed, with no
    /// `MAX_RECEIVE_COUNT` set: the queue may have a redrive policy the function cannot see,
    /// so no message of it is handed back for want of a slot, which could spend its last
    /// deliveries, until a read answers ([`Ingestor::receive_limit`]).
    pub(super) fn limit_unread(&self, queue_arn: Option<&str>) -> bool {
        self.config.max_receive_count.is_none()
            && queue_arn.is_some_and(|arn| {
                self.receive_limits
                    .lock()
                    .expect("limits")
                    .get(arn)
                    .is_some_and(|limit| !limit.answered)
            })
    }
}
