//! One SQS batch in, one outcome per message, one `SqsBatchResponse` out.

use std::panic::AssertUnwindSafe;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};
use futures::{FutureExt, StreamExt};
use lambda_runtime::LambdaEvent;
use tokio::time::Instant;
use tracing::{field, Instrument};

use crate::config::Config;
use crate::mediapackage::{ApiError, AssetApi, ErrorKind};
use crate::message::{AssetRequest, Defaults, InvalidMessage};

/// Why a message did not become an asset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// A short code: the AWS error code, or one of this function's (`InvalidMessage`,
    /// `AssetIdConflict`, `DeadlineReached`, `Panic`).
    pub code: String,
    /// The reason, for people.
    pub reason: String,
    /// The AWS request id, when the failure came from a response.
    pub request_id: Option<String>,
}

impl Failure {
    fn new(code: &str, reason: impl Into<String>) -> Self {
        Self {
            code: code.to_string(),
            reason: reason.into(),
            request_id: None,
        }
    }
}

impl From<ApiError> for Failure {
    fn from(error: ApiError) -> Self {
        Self {
            code: error.code,
            reason: error.message,
            request_id: error.request_id,
        }
    }
}

impl From<InvalidMessage> for Failure {
    fn from(error: InvalidMessage) -> Self {
        Self::new("InvalidMessage", error.to_string())
    }
}

/// What happened to one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// CreateAsset made the asset.
    Created {
        /// The new asset's ARN.
        arn: Option<String>,
    },
    /// The asset already existed with the same source: a redelivery after success.
    AlreadyExists,
    /// Not done now; SQS must deliver the message again.
    Retry(Failure),
    /// Cannot succeed as it is. Reported for redelivery, so that the queue's redrive policy
    /// moves it to the dead-letter queue.
    Permanent(Failure),
}

impl Outcome {
    /// Whether SQS must deliver the message again (listed in `batchItemFailures`).
    pub fn must_redeliver(&self) -> bool {
        matches!(self, Self::Retry(_) | Self::Permanent(_))
    }

    fn from_api_error(error: ApiError) -> Self {
        if error.kind.is_retryable() {
            Self::Retry(error.into())
        } else {
            Self::Permanent(error.into())
        }
    }
}

/// A batch response cannot be built: a message to redeliver has no message id, and an empty
/// identifier would make Lambda retry the whole batch anyway. Returning this as the function's
/// error says so plainly.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("message #{0} of the batch must be redelivered but has no messageId; failing the whole batch so nothing is lost")]
pub struct MissingMessageId(pub usize);

/// Builds the response from the outcomes, in record order: exactly the messages to redeliver.
pub fn batch_response(
    records: &[SqsMessage],
    outcomes: &[Outcome],
) -> Result<SqsBatchResponse, MissingMessageId> {
    let mut response = SqsBatchResponse::default();
    for (index, (record, outcome)) in records.iter().zip(outcomes).enumerate() {
        if !outcome.must_redeliver() {
            continue;
        }
        match record.message_id.as_deref() {
            Some(id) if !id.is_empty() => response.add_failure(id),
            _ => return Err(MissingMessageId(index)),
        }
    }
    Ok(response)
}

/// Deadlines below this (2001-09-09 in epoch milliseconds) cannot be real Lambda deadlines.
const EPOCH_MS_FLOOR: u64 = 1_000_000_000_000;

/// Converts the Lambda deadline (epoch milliseconds) to a monotonic instant. Some local
/// runtimes (`cargo lambda watch`) send the function timeout in milliseconds instead of an
/// epoch time; such a value is taken as the time left.
pub fn deadline_instant(deadline_ms: u64) -> Instant {
    if deadline_ms < EPOCH_MS_FLOOR {
        return Instant::now() + Duration::from_millis(deadline_ms);
    }
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    Instant::now() + Duration::from_millis(deadline_ms.saturating_sub(now_ms))
}

/// The function: configuration and the MediaPackage VOD port, built once at cold start.
pub struct Ingestor<A> {
    api: A,
    config: Config,
    defaults: Defaults,
}

impl<A: AssetApi> Ingestor<A> {
    /// Builds the function from its port and configuration.
    pub fn new(api: A, config: Config) -> Self {
        let defaults = Defaults {
            packaging_group_id: config.packaging_group_id.clone(),
            source_role_arn: config.source_role_arn.clone(),
        };
        Self {
            api,
            config,
            defaults,
        }
    }

    /// The MediaPackage VOD port.
    pub fn api(&self) -> &A {
        &self.api
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The Lambda handler: processes the batch and reports what SQS must redeliver.
    pub async fn handle(
        &self,
        event: LambdaEvent<SqsEvent>,
    ) -> Result<SqsBatchResponse, lambda_runtime::Error> {
        let deadline = deadline_instant(event.context.deadline);
        let records = event.payload.records;
        tracing::info!(
            messages = records.len(),
            deadline_ms = event.context.deadline,
            remaining_ms = deadline
                .saturating_duration_since(Instant::now())
                .as_millis() as u64,
            "batch received"
        );
        let outcomes = self.process_batch(&records, deadline).await;
        let response = batch_response(&records, &outcomes)?;
        tracing::info!(
            messages = records.len(),
            redeliver = response.batch_item_failures.len(),
            "batch done"
        );
        Ok(response)
    }

    /// Processes every record, at most `MAX_CONCURRENCY` at once, and returns one outcome per
    /// record in record order. Nothing starts unless an API attempt can finish before
    /// `deadline` minus the margin, and whatever is still running then is cut and reported.
    pub async fn process_batch(&self, records: &[SqsMessage], deadline: Instant) -> Vec<Outcome> {
        let hard_stop = deadline
            .checked_sub(self.config.deadline_margin)
            .unwrap_or_else(Instant::now);
        let mut outcomes: Vec<Option<Outcome>> = vec![None; records.len()];
        let work =
            futures::stream::iter(records.iter().enumerate())
                .map(|(index, record)| async move {
                    (index, self.process_record(record, hard_stop).await)
                })
                .buffer_unordered(self.config.max_concurrency)
                .for_each(|(index, outcome)| {
                    outcomes[index] = Some(outcome);
                    futures::future::ready(())
                });
        if tokio::time::timeout_at(hard_stop, work).await.is_err() {
            tracing::warn!("deadline reached; reporting unfinished messages for redelivery");
        }
        outcomes
            .into_iter()
            .zip(records)
            .map(|(outcome, record)| {
                outcome.unwrap_or_else(|| {
                    let outcome = Outcome::Retry(Failure::new(
                        "DeadlineReached",
                        "the invocation deadline came before the message was done",
                    ));
                    log_outcome(record.message_id.as_deref(), &outcome);
                    outcome
                })
            })
            .collect()
    }

    async fn process_record(&self, record: &SqsMessage, hard_stop: Instant) -> Outcome {
        let message_id = record.message_id.as_deref().unwrap_or("");
        let span = tracing::info_span!("message", message_id, asset_id = field::Empty);
        async move {
            if Instant::now() + self.config.api_attempt_timeout > hard_stop {
                let outcome = Outcome::Retry(Failure::new(
                    "DeadlineReached",
                    "not started: no time left before the invocation deadline",
                ));
                log_outcome(None, &outcome);
                return outcome;
            }
            let work = AssertUnwindSafe(self.process_body(record.body.as_deref()));
            let outcome = work.catch_unwind().await.unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Outcome::Retry(Failure::new("Panic", what))
            });
            log_outcome(None, &outcome);
            outcome
        }
        .instrument(span)
        .await
    }

    /// Parses one body and creates its asset.
    pub async fn process_body(&self, body: Option<&str>) -> Outcome {
        match AssetRequest::parse(body.unwrap_or(""), &self.defaults) {
            Ok(request) => {
                tracing::Span::current().record("asset_id", request.id.as_str());
                self.create(&request).await
            }
            Err(invalid) => Outcome::Permanent(invalid.into()),
        }
    }

    /// CreateAsset, with an existing id settled by DescribeAsset: the same source is a
    /// redelivery after success, another source is a conflict.
    pub async fn create(&self, request: &AssetRequest) -> Outcome {
        let refused = match self.api.create_asset(request).await {
            Ok(arn) => return Outcome::Created { arn },
            Err(error) if error.kind == ErrorKind::Unprocessable => error,
            Err(error) => return Outcome::from_api_error(error),
        };
        match self.api.describe_asset(&request.id).await {
            Ok(Some(existing)) if existing.source_arn == request.source_arn.as_str() => {
                Outcome::AlreadyExists
            }
            Ok(Some(existing)) => Outcome::Permanent(Failure::new(
                "AssetIdConflict",
                format!(
                    "asset {} already exists with source {}, not {}",
                    request.id, existing.source_arn, request.source_arn
                ),
            )),
            Ok(None) => Outcome::Permanent(refused.into()),
            Err(error) => Outcome::from_api_error(error),
        }
    }
}

fn log_outcome(message_id: Option<&str>, outcome: &Outcome) {
    match outcome {
        Outcome::Created { arn } => tracing::info!(arn, message_id, "asset created"),
        Outcome::AlreadyExists => tracing::info!(message_id, "asset already exists"),
        Outcome::Retry(f) => tracing::warn!(
            code = f.code,
            reason = f.reason,
            request_id = f.request_id,
            message_id,
            "will be redelivered"
        ),
        Outcome::Permanent(f) => tracing::error!(
            code = f.code,
            reason = f.reason,
            request_id = f.request_id,
            message_id,
            "permanent failure"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: Option<&str>) -> SqsMessage {
        let mut m = SqsMessage::default();
        m.message_id = id.map(str::to_string);
        m
    }

    fn retry() -> Outcome {
        Outcome::Retry(Failure::new("TooManyRequestsException", "slow down"))
    }

    #[test]
    fn an_epoch_deadline_and_a_relative_one_both_give_the_time_left() {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let left = |d: Instant| d.saturating_duration_since(Instant::now()).as_millis();
        let epoch = left(deadline_instant(now_ms + 30_000));
        assert!((29_000..=30_000).contains(&epoch), "{epoch}");
        let relative = left(deadline_instant(600_000));
        assert!((599_000..=600_000).contains(&relative), "{relative}");
        assert_eq!(left(deadline_instant(now_ms - 5_000)), 0);
    }

    #[test]
    fn only_retry_and_permanent_outcomes_are_redelivered() {
        assert!(!Outcome::Created { arn: None }.must_redeliver());
        assert!(!Outcome::AlreadyExists.must_redeliver());
        assert!(retry().must_redeliver());
        assert!(Outcome::Permanent(Failure::new("InvalidMessage", "bad")).must_redeliver());
    }

    #[test]
    fn the_response_lists_exactly_the_messages_to_redeliver_in_order() {
        let records = [record(Some("a")), record(Some("b")), record(Some("c"))];
        let outcomes = [
            retry(),
            Outcome::Created { arn: None },
            Outcome::Permanent(Failure::new("ForbiddenException", "no")),
        ];
        let response = batch_response(&records, &outcomes).unwrap();
        let ids: Vec<_> = response
            .batch_item_failures
            .iter()
            .map(|f| f.item_identifier.as_str())
            .collect();
        assert_eq!(ids, ["a", "c"]);
    }

    #[test]
    fn a_failed_message_without_an_id_fails_the_batch_instead_of_sending_an_empty_identifier() {
        let records = [record(Some("a")), record(Some(""))];
        let err = batch_response(&records, &[retry(), retry()]).unwrap_err();
        assert_eq!(err, MissingMessageId(1));
        let ok = batch_response(&records, &[retry(), Outcome::AlreadyExists]).unwrap();
        assert_eq!(ok.batch_item_failures.len(), 1);
    }

    #[test]
    fn an_all_good_batch_has_an_empty_failure_list() {
        let records = [record(Some("a"))];
        let response = batch_response(&records, &[Outcome::AlreadyExists]).unwrap();
        assert!(response.batch_item_failures.is_empty());
        assert_eq!(
            serde_json::to_string(&response).unwrap(),
            r#"{"batchItemFailures":[]}"#
        );
    }

    #[test]
    fn api_errors_map_to_retry_or_permanent_by_kind() {
        let e = |kind| ApiError::local(kind, "X", "m");
        assert!(matches!(
            Outcome::from_api_error(e(ErrorKind::Throttled)),
            Outcome::Retry(_)
        ));
        assert!(matches!(
            Outcome::from_api_error(e(ErrorKind::Transient)),
            Outcome::Retry(_)
        ));
        assert!(matches!(
            Outcome::from_api_error(e(ErrorKind::QuotaExceeded)),
            Outcome::Retry(_)
        ));
        assert!(matches!(
            Outcome::from_api_error(e(ErrorKind::Permanent)),
            Outcome::Permanent(_)
        ));
        assert!(matches!(
            Outcome::from_api_error(e(ErrorKind::NotFound)),
            Outcome::Permanent(_)
        ));
    }
}
