//! One SQS batch in, one outcome per message, one `SqsBatchResponse` out.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};
use futures::{FutureExt, StreamExt};
use lambda_runtime::LambdaEvent;
use tokio::time::Instant;
use tracing::{field, Instrument};

use crate::backoff::{visibility_seconds, Backoff};
use crate::config::Config;
use crate::drain::DrainGauge;
use crate::envelope::parse_body;
use crate::limiter::{LimiterConfig, RateLimiter};
use crate::mediapackage::{ApiError, AssetApi, ErrorKind};
use crate::message::{AssetId, AssetRequest, Defaults, InvalidMessage, Refused, SourceArn};
use crate::sqs::{DeadLetter, QueueApi, VisibilityChange};

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

impl From<Refused> for Failure {
    fn from(error: Refused) -> Self {
        Self::new("SourceRefused", error.to_string())
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
    /// Nothing to create (an `s3:TestEvent`, objects that are no manifests, other S3 events):
    /// acknowledged, with the reason.
    Skipped(String),
    /// Cannot succeed, and is now in the dead-letter queue with the reason: acknowledged, so
    /// it costs no more invocations.
    DeadLettered(Failure),
    /// Not done now; SQS must deliver the message again, after the delay the
    /// [`Redelivery`] says.
    Retry(Failure, Redelivery),
    /// Cannot succeed as it is, and could not be sent to a dead-letter queue. Reported for
    /// redelivery, so that the queue's redrive policy moves it there in the end.
    Permanent(Failure),
}

impl Outcome {
    /// Whether SQS must deliver the message again (listed in `batchItemFailures`).
    pub fn must_redeliver(&self) -> bool {
        matches!(self, Self::Retry(..) | Self::Permanent(_))
    }

    fn from_api_error(error: ApiError) -> Self {
        match error.kind {
            ErrorKind::QuotaExceeded => Self::Retry(error.into(), Redelivery::Quota),
            ErrorKind::Throttled | ErrorKind::Transient => {
                Self::Retry(error.into(), Redelivery::Backoff)
            }
            _ => Self::Permanent(error.into()),
        }
    }
}

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
    /// the time the queue's backlog has left once that is known. Not the whole backoff ceiling:
    /// the horizon is already the furthest this message should be away, and measured on
    /// `make bench`, single messages drawn up to twice it (32-45 s ahead on scenario B) came
    /// back after everything else was done and set the drain time.
    Within(Duration),
    /// A resource quota is exhausted: come back after `QUOTA_REDELIVERY_SECONDS`.
    Quota,
    /// Leave the queue's own visibility timeout in place.
    Queue,
    /// Visible again at once: a FIFO message kept back behind a failed one of its group, which
    /// SQS will not deliver before that one anyway.
    Immediate,
}

/// Why a rate-limited call stopped.
enum Stop {
    /// The API answered with an error that another attempt now cannot fix, or attempts ran out.
    Api(ApiError),
    /// No request slot before the message's wait limit: `redelivery` is the booked slot, or
    /// the horizon it could not be booked within.
    NoSlot {
        redelivery: Redelivery,
        last: Option<ApiError>,
    },
}

impl Stop {
    fn into_outcome(self) -> Outcome {
        match self {
            Stop::Api(error) => Outcome::from_api_error(error),
            Stop::NoSlot { redelivery, last } => Outcome::Retry(
                last.map_or_else(
                    || {
                        Failure::new(
                            "RateLimited",
                            "no request slot free in time; handed back to the queue",
                        )
                    },
                    Failure::from,
                ),
                redelivery,
            ),
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

/// The function: configuration, the ports and the rate limiter, built once at cold start and
/// kept across warm invocations.
pub struct Ingestor<A> {
    api: A,
    queue: Option<Box<dyn QueueApi>>,
    limiter: RateLimiter,
    gauge: DrainGauge,
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
        let limiter = RateLimiter::new(LimiterConfig {
            initial_rate: config.initial_rate,
            max_rate: config.max_rate,
            burst: config.burst,
            ..LimiterConfig::default()
        });
        Self {
            api,
            queue: None,
            limiter,
            gauge: DrainGauge::default(),
            config,
            defaults,
        }
    }

    /// Sets message visibility through `queue` for messages to retry. Without a queue, retried
    /// messages come back after the queue's own visibility timeout.
    pub fn with_queue(mut self, queue: impl QueueApi + 'static) -> Self {
        self.queue = Some(Box::new(queue));
        self
    }

    /// The rate limiter shared by every call of this instance.
    pub fn limiter(&self) -> &RateLimiter {
        &self.limiter
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
        tracing::info!(
            messages = event.payload.records.len(),
            deadline_ms = event.context.deadline,
            remaining_ms = deadline
                .saturating_duration_since(Instant::now())
                .as_millis() as u64,
            "batch received"
        );
        Ok(self.handle_batch(&event.payload.records, deadline).await?)
    }

    /// Processes `records`, delays the redelivery of those to retry, and returns the batch
    /// response: the whole invocation, given its deadline.
    pub async fn handle_batch(
        &self,
        records: &[SqsMessage],
        deadline: Instant,
    ) -> Result<SqsBatchResponse, MissingMessageId> {
        let outcomes = self.process_batch(records, deadline).await;
        let response = batch_response(records, &outcomes)?;
        self.delay_redeliveries(records, &outcomes).await;
        tracing::info!(
            messages = records.len(),
            redeliver = response.batch_item_failures.len(),
            rate = self.limiter.stats().rate,
            "batch done"
        );
        Ok(response)
    }

    /// Processes every record and returns one outcome per record in record order. At most
    /// `MAX_CONCURRENCY` messages run at once; the messages of one FIFO message group run one
    /// after another, and after the first failure in a group the rest of that group are kept
    /// back without calling the API. Two messages for the same asset make one call. Nothing
    /// starts unless an API attempt can finish before `deadline` minus the margin, and whatever
    /// is still running then is cut and reported.
    pub async fn process_batch(&self, records: &[SqsMessage], deadline: Instant) -> Vec<Outcome> {
        let hard_stop = deadline
            .checked_sub(self.config.deadline_margin)
            .unwrap_or_else(Instant::now);
        let outcomes: Mutex<Vec<Option<Outcome>>> = Mutex::new(vec![None; records.len()]);
        let calls = Calls::default();
        // Collected first so the futures have one concrete type, which keeps the whole batch
        // future `Send` for callers that spawn it.
        let tasks: Vec<_> = lanes(records)
            .into_iter()
            .map(|lane| {
                let (outcomes, calls) = (&outcomes, &calls);
                async move {
                    let mut failed: Option<usize> = None;
                    for index in lane {
                        let record = &records[index];
                        let outcome = match failed {
                            Some(first) => kept_back(record, &records[first]),
                            None => self.process_record(record, hard_stop, calls).await,
                        };
                        if failed.is_none() && outcome.must_redeliver() {
                            failed = Some(index);
                        }
                        outcomes.lock().expect("outcomes")[index] = Some(outcome);
                    }
                }
            })
            .collect();
        let work = futures::stream::iter(tasks)
            .buffer_unordered(self.config.max_concurrency)
            .collect::<()>();
        if tokio::time::timeout_at(hard_stop, work).await.is_err() {
            tracing::warn!("deadline reached; reporting unfinished messages for redelivery");
        }
        let outcomes = outcomes.into_inner().expect("outcomes");
        outcomes
            .into_iter()
            .zip(records)
            .map(|(outcome, record)| {
                outcome.unwrap_or_else(|| {
                    let outcome = Outcome::Retry(
                        Failure::new(
                            "DeadlineReached",
                            "the invocation deadline came before the message was done",
                        ),
                        Redelivery::Backoff,
                    );
                    log_outcome(record.message_id.as_deref(), &outcome);
                    outcome
                })
            })
            .collect()
    }

    async fn process_record(
        &self,
        record: &SqsMessage,
        hard_stop: Instant,
        calls: &Calls,
    ) -> Outcome {
        let message_id = record.message_id.as_deref().unwrap_or("");
        let span = tracing::info_span!(
            "message",
            message_id,
            envelope = field::Empty,
            asset_id = field::Empty
        );
        async move {
            let now = Instant::now();
            let Some(last_start) = hard_stop.checked_sub(self.config.api_attempt_timeout) else {
                return not_started();
            };
            if now > last_start {
                return not_started();
            }
            // On its last delivery a message waits for a slot as long as the invocation allows:
            // handed back, SQS would dead-letter it with no reason given.
            let receives = receive_count(record);
            let last_delivery = self
                .config
                .max_receive_count
                .is_some_and(|max| receives >= max);
            // A booking reaches no further than half the backoff ceiling for this receive: a
            // message the instance cannot serve soon comes back soon, to be booked again from
            // what the limiter has learned by then, rather than sitting out a booking made from
            // a rate that was still being found; one that cannot be booked within it comes back
            // at a random time within it. (Measured: the whole ceiling, or twice it, drained
            // scenario B of `make bench` later; a quarter of it, later on A.)
            let window = Window {
                latest: if last_delivery {
                    last_start
                } else {
                    last_start.min(now + self.config.permit_wait)
                },
                horizon: self.backoff().ceiling(receives) / 2,
            };
            let work = AssertUnwindSafe(self.process_body(record.body.as_deref(), window, calls));
            let outcome = work.catch_unwind().await.unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Outcome::Retry(Failure::new("Panic", what), Redelivery::Queue)
            });
            let outcome = self.dead_letter(record, outcome).await;
            log_outcome(None, &outcome);
            if last_delivery && matches!(outcome, Outcome::Retry(..)) {
                tracing::error!(
                    receives,
                    "not done on its last delivery (MAX_RECEIVE_COUNT): SQS will move it to the dead-letter queue"
                );
            }
            outcome
        }
        .instrument(span)
        .await
    }

    /// Parses one body of any accepted shape, checks what it asks for against the source
    /// policy, and creates its assets (one call per distinct asset in the batch), taking request
    /// slots within `window`. A body naming several assets succeeds or fails as one message.
    async fn process_body(&self, body: Option<&str>, window: Window, calls: &Calls) -> Outcome {
        let parsed = match parse_body(body.unwrap_or(""), &self.defaults) {
            Ok(parsed) => parsed,
            Err(invalid) => return Outcome::Permanent(invalid.into()),
        };
        let span = tracing::Span::current();
        span.record("envelope", field::display(parsed.envelope));
        for skipped in &parsed.skipped {
            tracing::info!(object = skipped.what, reason = skipped.reason, "skipped");
        }
        if let Some(refused) = parsed
            .requests
            .iter()
            .find_map(|r| self.config.policy.check(r).err())
        {
            return Outcome::Permanent(refused.into());
        }
        match parsed.requests.as_slice() {
            [] => Outcome::Skipped(
                parsed
                    .skipped
                    .iter()
                    .map(|s| format!("{}: {}", s.what, s.reason))
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
            [request] => {
                span.record("asset_id", request.id.as_str());
                calls.create(self, request, window).await
            }
            requests => {
                let ids: Vec<_> = requests.iter().map(|r| r.id.as_str()).collect();
                span.record("asset_id", field::display(ids.join(",")));
                let outcomes = futures::future::join_all(
                    requests.iter().map(|r| calls.create(self, r, window)),
                )
                .await;
                for (request, outcome) in requests.iter().zip(&outcomes) {
                    tracing::debug!(asset_id = request.id.as_str(), ?outcome, "one of several");
                }
                combine(outcomes)
            }
        }
    }

    /// Sends a permanent failure to the dead-letter queue and acknowledges it; if there is no
    /// queue port, no dead-letter queue or the send fails, it stays a failure to redeliver.
    async fn dead_letter(&self, record: &SqsMessage, outcome: Outcome) -> Outcome {
        let (Outcome::Permanent(failure), Some(queue), Some(queue_arn)) =
            (&outcome, &self.queue, record.event_source_arn.as_deref())
        else {
            return outcome;
        };
        let letter = DeadLetter {
            body: record.body.clone().unwrap_or_default(),
            message_id: record.message_id.clone().unwrap_or_default(),
            message_group_id: fifo_group(record).map(str::to_string),
            receive_count: receive_count(record),
            code: failure.code.clone(),
            reason: failure.reason.clone(),
            request_id: failure.request_id.clone(),
        };
        match queue.dead_letter(queue_arn, &letter).await {
            Ok(()) => Outcome::DeadLettered(failure.clone()),
            Err(error) => {
                tracing::warn!(
                    code = error.code,
                    error = error.message,
                    "could not send to the dead-letter queue; reported for redelivery instead"
                );
                outcome
            }
        }
    }

    /// CreateAsset, with an existing id settled by DescribeAsset: the same source is a
    /// redelivery after success, another source is a conflict. Every call takes a slot from the
    /// rate limiter within `window`.
    pub async fn create(&self, request: &AssetRequest, window: Window) -> Outcome {
        let refused = match self
            .limited(window, || self.api.create_asset(request))
            .await
        {
            Ok(arn) => return Outcome::Created { arn },
            Err(Stop::Api(error)) if error.kind == ErrorKind::Unprocessable => error,
            Err(stop) => return stop.into_outcome(),
        };
        match self
            .limited(window, || self.api.describe_asset(&request.id))
            .await
        {
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
            Err(stop) => stop.into_outcome(),
        }
    }

    /// Makes `call` through the rate limiter, up to `API_MAX_ATTEMPTS` times while it is
    /// throttled or fails transiently, and teaches the limiter from each answer. Never sleeps
    /// past `window.latest`.
    async fn limited<T, F, Fut>(&self, window: Window, call: F) -> Result<T, Stop>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, ApiError>>,
    {
        let mut last = None;
        for _ in 0..self.config.api_max_attempts {
            let permit = match self.limiter.acquire(window.latest, window.horizon).await {
                Ok(permit) => permit,
                Err(eta) => {
                    let redelivery =
                        eta.map_or(Redelivery::Within(window.horizon), Redelivery::After);
                    return Err(Stop::NoSlot { redelivery, last });
                }
            };
            match call().await {
                Ok(value) => {
                    self.limiter.on_success(&permit);
                    return Ok(value);
                }
                Err(error) => match error.kind {
                    ErrorKind::Throttled => {
                        self.limiter.on_throttle(&permit);
                        last = Some(error);
                    }
                    ErrorKind::Transient => last = Some(error),
                    // Not a rate problem: it must not shrink the rate for other messages.
                    ErrorKind::QuotaExceeded => return Err(Stop::Api(error)),
                    _ => {
                        // The API took the request, so the rate was fine.
                        self.limiter.on_success(&permit);
                        return Err(Stop::Api(error));
                    }
                },
            }
        }
        Err(Stop::Api(last.expect("at least one attempt")))
    }

    fn backoff(&self) -> Backoff {
        Backoff {
            base: self.config.redelivery_base,
            cap: self.config.redelivery_cap,
        }
    }

    /// The visibility timeout each message to retry gets, from its [`Redelivery`] and receive
    /// count; `None` where the queue's own timeout applies. A message that got no request slot
    /// comes back at a random time within its queue's entry in `spreads` (the backlog's
    /// expected time left, see [`crate::drain`]) when there is one. `unit` draws the jitter.
    pub fn redelivery_delays(
        &self,
        records: &[SqsMessage],
        outcomes: &[Outcome],
        spreads: &BTreeMap<&str, Duration>,
        mut unit: impl FnMut() -> f64,
    ) -> Vec<Option<i32>> {
        let backoff = self.backoff();
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        records
            .iter()
            .zip(outcomes)
            .map(|(record, outcome)| {
                let Outcome::Retry(_, redelivery) = outcome else {
                    return None;
                };
                let attribute = |name: &str| {
                    record
                        .attributes
                        .get(name)
                        .and_then(|v| v.parse::<u64>().ok())
                };
                let receives = receive_count(record);
                let spread = record
                    .event_source_arn
                    .as_deref()
                    .and_then(|arn| spreads.get(arn));
                let delay = match (redelivery, spread) {
                    // Spread over the time the backlog has left, like every other instance's
                    // hand-backs, rather than on this instance's own booking line.
                    (Redelivery::After(_) | Redelivery::Within(_), Some(spread)) => {
                        backoff.delay_within(receives, *spread, unit())
                    }
                    // The booked slot, as it is: the limiter's estimate of when this instance
                    // has room, already bounded by the backoff ceiling (see `process_record`).
                    (Redelivery::After(eta), None) => *eta,
                    (Redelivery::Within(horizon), None) => {
                        backoff.delay_within(receives, *horizon, unit())
                    }
                    (Redelivery::Backoff, _) => backoff.delay(receives, unit()),
                    (Redelivery::Quota, _) => self.config.quota_redelivery,
                    (Redelivery::Immediate, _) => Duration::ZERO,
                    (Redelivery::Queue, _) => return None,
                }
                .min(crate::backoff::SQS_MAX_VISIBILITY);
                let first_receive = attribute("ApproximateFirstReceiveTimestamp").unwrap_or(now_ms);
                let since = Duration::from_millis(now_ms.saturating_sub(first_receive));
                Some(visibility_seconds(delay, since))
            })
            .collect()
    }

    /// For each queue with messages handed back for want of a request slot, how long its
    /// backlog has left ([`DrainGauge::spread`]), reading the queue's depth when it is due.
    async fn spreads<'r>(
        &self,
        queue: &dyn QueueApi,
        records: &'r [SqsMessage],
        outcomes: &[Outcome],
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
            if self.gauge.due(arn, Instant::now()) {
                match queue.depth(arn).await {
                    Ok(depth) => self.gauge.observe(arn, Instant::now(), depth),
                    Err(error) => tracing::debug!(
                        queue = arn,
                        code = error.code,
                        error = error.message,
                        "could not read the queue's depth; handed-back messages keep their booking"
                    ),
                }
            }
            if let Some(spread) = self.gauge.spread(arn, Instant::now()) {
                spreads.insert(arn, spread);
            }
        }
        spreads
    }

    /// Sets the visibility timeout of every message to retry, so SQS delivers it again when it
    /// stands a chance. A message whose visibility cannot be changed is still reported: the
    /// queue's own visibility timeout then applies, and nothing is lost.
    pub async fn delay_redeliveries(&self, records: &[SqsMessage], outcomes: &[Outcome]) {
        let Some(queue) = &self.queue else {
            return;
        };
        let spreads = self.spreads(queue.as_ref(), records, outcomes).await;
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
        for (arn, (changes, message_ids)) in by_queue {
            let results = queue.change_visibility(arn, &changes).await;
            for ((result, change), message_id) in results.iter().zip(&changes).zip(message_ids) {
                match result {
                    Ok(()) => {
                        tracing::debug!(message_id, seconds = change.seconds, "redelivery delayed")
                    }
                    Err(error) => tracing::warn!(
                        message_id,
                        code = error.code,
                        error = error.message,
                        "could not delay redelivery; the queue's visibility timeout applies"
                    ),
                }
            }
        }
    }
}

/// The CreateAsset calls of one batch, one per asset id and source: a second message for the
/// same asset waits for the first one's outcome and shares it.
#[derive(Default)]
struct Calls {
    cells: Mutex<HashMap<(AssetId, SourceArn), Shared>>,
}

/// The outcome of one call, set once and read by every message that asked for it.
type Shared = Arc<tokio::sync::OnceCell<Outcome>>;

impl Calls {
    async fn create<A: AssetApi>(
        &self,
        ingestor: &Ingestor<A>,
        request: &AssetRequest,
        window: Window,
    ) -> Outcome {
        let cell = self
            .cells
            .lock()
            .expect("calls")
            .entry((request.id.clone(), request.source_arn.clone()))
            .or_default()
            .clone();
        cell.get_or_init(|| ingestor.create(request, window))
            .await
            .clone()
    }
}

/// One outcome for a body that named several assets: to retry if any is to retry (the others
/// are then found existing), else permanent if any is, else done.
fn combine(outcomes: Vec<Outcome>) -> Outcome {
    let first = |keep: fn(&Outcome) -> bool| outcomes.iter().find(|o| keep(o)).cloned();
    first(|o| matches!(o, Outcome::Retry(..)))
        .or_else(|| first(|o| matches!(o, Outcome::Permanent(_))))
        .or_else(|| first(|o| matches!(o, Outcome::Created { .. })))
        .unwrap_or(Outcome::AlreadyExists)
}

/// The message group of a record from a FIFO queue. Standard queues may carry a
/// `MessageGroupId` too (fair queues), without any order to keep.
fn fifo_group(record: &SqsMessage) -> Option<&str> {
    record
        .event_source_arn
        .as_deref()
        .filter(|arn| arn.ends_with(".fifo"))?;
    record.attributes.get("MessageGroupId").map(String::as_str)
}

fn receive_count(record: &SqsMessage) -> u32 {
    record
        .attributes
        .get("ApproximateReceiveCount")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

/// The records as lanes that run concurrently, each in order: one lane per FIFO message
/// group (in the order the group first appears), one per record otherwise.
fn lanes(records: &[SqsMessage]) -> Vec<Vec<usize>> {
    let mut lanes: Vec<Vec<usize>> = Vec::new();
    let mut by_group: HashMap<(&str, &str), usize> = HashMap::new();
    for (index, record) in records.iter().enumerate() {
        let queue = record.event_source_arn.as_deref().unwrap_or("");
        match fifo_group(record) {
            Some(group) => match by_group.get(&(queue, group)) {
                Some(&lane) => lanes[lane].push(index),
                None => {
                    by_group.insert((queue, group), lanes.len());
                    lanes.push(vec![index]);
                }
            },
            None => lanes.push(vec![index]),
        }
    }
    lanes
}

/// The outcome of a FIFO message kept back because `failed`, earlier in its group, failed.
fn kept_back(record: &SqsMessage, failed: &SqsMessage) -> Outcome {
    let outcome = Outcome::Retry(
        Failure::new(
            "EarlierMessageFailed",
            format!(
                "message {} of group {} failed earlier in this batch; kept back to keep the group's order",
                failed.message_id.as_deref().unwrap_or("?"),
                fifo_group(record).unwrap_or("?"),
            ),
        ),
        Redelivery::Immediate,
    );
    log_outcome(record.message_id.as_deref(), &outcome);
    outcome
}

/// How long a message may wait for a request slot, and how far ahead it may be booked.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// The latest moment to start a call.
    pub latest: Instant,
    /// The furthest booking: beyond it the message comes back at a random time within it.
    pub horizon: Duration,
}

impl Window {
    /// A window for tests and tools: wait until `latest`, book without limit.
    pub fn until(latest: Instant) -> Self {
        Self {
            latest,
            horizon: crate::backoff::SQS_MAX_VISIBILITY,
        }
    }
}

fn not_started() -> Outcome {
    let outcome = Outcome::Retry(
        Failure::new(
            "DeadlineReached",
            "not started: no time left before the invocation deadline",
        ),
        Redelivery::Backoff,
    );
    log_outcome(None, &outcome);
    outcome
}

fn log_outcome(message_id: Option<&str>, outcome: &Outcome) {
    match outcome {
        Outcome::Created { arn } => tracing::info!(arn, message_id, "asset created"),
        Outcome::AlreadyExists => tracing::info!(message_id, "asset already exists"),
        Outcome::Skipped(reason) => tracing::info!(message_id, reason, "nothing to create"),
        Outcome::DeadLettered(f) => tracing::error!(
            code = f.code,
            reason = f.reason,
            request_id = f.request_id,
            message_id,
            "permanent failure; sent to the dead-letter queue"
        ),
        Outcome::Retry(f, Redelivery::Quota) => tracing::error!(
            code = f.code,
            reason = f.reason,
            request_id = f.request_id,
            message_id,
            "resource quota exhausted; redelivery in QUOTA_REDELIVERY_SECONDS"
        ),
        Outcome::Retry(f, _) => tracing::warn!(
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
        Outcome::Retry(
            Failure::new("TooManyRequestsException", "slow down"),
            Redelivery::Backoff,
        )
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
            Outcome::Retry(_, Redelivery::Backoff)
        ));
        assert!(matches!(
            Outcome::from_api_error(e(ErrorKind::Transient)),
            Outcome::Retry(_, Redelivery::Backoff)
        ));
        assert!(matches!(
            Outcome::from_api_error(e(ErrorKind::QuotaExceeded)),
            Outcome::Retry(_, Redelivery::Quota)
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

    fn fifo(id: &str, queue: &str, group: Option<&str>) -> SqsMessage {
        let mut m = record(Some(id));
        m.event_source_arn = Some(queue.to_string());
        if let Some(group) = group {
            m.attributes
                .insert("MessageGroupId".to_string(), group.to_string());
        }
        m
    }

    #[test]
    fn fifo_records_run_in_one_lane_per_group_and_others_alone() {
        const FIFO: &str = "arn:aws:sqs:us-east-1:123456789012:q.fifo";
        const STANDARD: &str = "arn:aws:sqs:us-east-1:123456789012:q";
        let records = [
            fifo("a1", FIFO, Some("a")),
            fifo("b1", FIFO, Some("b")),
            fifo("a2", FIFO, Some("a")),
            // A standard (fair) queue's group keeps no order.
            fifo("s1", STANDARD, Some("a")),
            fifo("s2", STANDARD, Some("a")),
            fifo("b2", FIFO, Some("b")),
        ];
        assert_eq!(lanes(&records), [vec![0, 2], vec![1, 5], vec![3], vec![4]]);
    }

    #[test]
    fn several_assets_in_one_body_retry_together_if_any_must() {
        let created = || Outcome::Created { arn: None };
        let permanent = || Outcome::Permanent(Failure::new("ForbiddenException", "no"));
        assert_eq!(combine(vec![created(), Outcome::AlreadyExists]), created());
        assert_eq!(
            combine(vec![Outcome::AlreadyExists, Outcome::AlreadyExists]),
            Outcome::AlreadyExists
        );
        assert_eq!(combine(vec![created(), permanent()]), permanent());
        assert_eq!(combine(vec![permanent(), retry(), created()]), retry());
    }

    #[test]
    fn a_kept_back_fifo_message_is_visible_again_at_once() {
        let ingestor = Ingestor::new(NoApi, Config::default());
        let records = [record(Some("a")), record(Some("b"))];
        let outcomes = [
            retry(),
            Outcome::Retry(
                Failure::new("EarlierMessageFailed", "x"),
                Redelivery::Immediate,
            ),
        ];
        let delays = ingestor.redelivery_delays(&records, &outcomes, &BTreeMap::new(), || 1.0);
        assert!(delays[0].unwrap() > 0);
        assert_eq!(delays[1], Some(0));
    }

    #[test]
    fn a_message_not_booked_comes_back_within_its_horizon_and_never_past_the_backoff_ceiling() {
        let ingestor = Ingestor::new(NoApi, Config::default());
        let mut fifth = record(Some("a"));
        fifth
            .attributes
            .insert("ApproximateReceiveCount".into(), "5".into());
        let records = [fifth.clone(), fifth];
        let unbooked = |horizon| {
            Outcome::Retry(
                Failure::new("RateLimited", "no slot"),
                Redelivery::Within(horizon),
            )
        };
        // Fifth receive: backoff ceiling 32 s, so a 16 s horizon bounds the delay and a 12 h
        // one is held to the ceiling.
        let outcomes = [
            unbooked(Duration::from_secs(16)),
            unbooked(crate::backoff::SQS_MAX_VISIBILITY),
        ];
        assert_eq!(
            ingestor.redelivery_delays(&records, &outcomes, &BTreeMap::new(), || 0.999),
            [Some(16), Some(32)]
        );
        assert_eq!(
            ingestor.redelivery_delays(&records, &outcomes, &BTreeMap::new(), || 0.25),
            [Some(4), Some(8)]
        );
    }

    #[test]
    fn a_message_without_a_slot_comes_back_within_the_time_its_queue_has_left() {
        const QUEUE: &str = "arn:aws:sqs:us-east-1:123456789012:ingest";
        const OTHER: &str = "arn:aws:sqs:us-east-1:123456789012:other";
        let ingestor = Ingestor::new(NoApi, Config::default());
        let message = |queue: &str, receives: u32| {
            let mut m = record(Some("a"));
            m.event_source_arn = Some(queue.to_string());
            m.attributes
                .insert("ApproximateReceiveCount".into(), receives.to_string());
            m
        };
        let no_slot = |redelivery| Outcome::Retry(Failure::new("RateLimited", "x"), redelivery);
        let records = [
            message(QUEUE, 5),
            message(QUEUE, 5),
            message(QUEUE, 1),
            message(OTHER, 5),
            message(QUEUE, 5),
        ];
        let outcomes = [
            no_slot(Redelivery::After(Duration::from_secs(3))),
            no_slot(Redelivery::Within(Duration::from_secs(16))),
            no_slot(Redelivery::After(Duration::from_secs(1))),
            no_slot(Redelivery::After(Duration::from_secs(3))),
            retry(),
        ];
        let spreads = BTreeMap::from([(QUEUE, Duration::from_secs(10))]);
        // The queue has 10 s left: its messages without a slot come back within that, not at
        // their booking (3 s) or within their horizon (16 s); a first receive is still held to
        // its 2 s backoff ceiling. Another queue's message keeps its booking, and a throttled
        // one its backoff (ceiling 32 s).
        assert_eq!(
            ingestor.redelivery_delays(&records, &outcomes, &spreads, || 0.999),
            [Some(10), Some(10), Some(2), Some(3), Some(32)]
        );
        assert_eq!(
            ingestor.redelivery_delays(&records, &outcomes, &spreads, || 0.2),
            [Some(2), Some(2), Some(1), Some(3), Some(7)]
        );
    }

    /// SQS as a queue whose depth falls by `fall` messages per read, recording the visibility
    /// timeouts set.
    struct Draining {
        depth: Mutex<u64>,
        fall: u64,
        reads: Mutex<Vec<Instant>>,
        delays: Mutex<Vec<i32>>,
    }

    #[async_trait::async_trait]
    impl QueueApi for &'static Draining {
        async fn dead_letter(&self, _: &str, _: &DeadLetter) -> Result<(), crate::sqs::QueueError> {
            unreachable!("no dead letter expected")
        }
        async fn change_visibility(
            &self,
            _: &str,
            changes: &[VisibilityChange],
        ) -> Vec<Result<(), crate::sqs::QueueError>> {
            let mut delays = self.delays.lock().unwrap();
            delays.extend(changes.iter().map(|c| c.seconds));
            changes.iter().map(|_| Ok(())).collect()
        }
        async fn depth(&self, _: &str) -> Result<u64, crate::sqs::QueueError> {
            self.reads.lock().unwrap().push(Instant::now());
            let mut depth = self.depth.lock().unwrap();
            *depth -= self.fall;
            Ok(*depth)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn handed_back_messages_are_spread_over_the_time_the_backlog_has_left() {
        fastrand::seed(7);
        let queue: &'static Draining = Box::leak(Box::new(Draining {
            depth: Mutex::new(110),
            fall: 10,
            reads: Mutex::default(),
            delays: Mutex::default(),
        }));
        let ingestor = Ingestor::new(Instant0, slow_config()).with_queue(queue);
        let records = batch(5);
        let start = Instant::now();
        let mut delays = Vec::new();
        for step_ms in [0, 1000, 500, 500] {
            tokio::time::advance(Duration::from_millis(step_ms)).await;
            queue.delays.lock().unwrap().clear();
            ingestor
                .handle_batch(&records, Instant::now() + Duration::from_secs(60))
                .await
                .unwrap();
            delays.push(queue.delays.lock().unwrap().clone());
        }
        // The depth is read at most once a second: at 0 s, 1 s and 2 s, not at 1.5 s.
        let reads: Vec<u128> = queue
            .reads
            .lock()
            .unwrap()
            .iter()
            .map(|at| (*at - start).as_millis())
            .collect();
        assert_eq!(reads, [0, 1000, 2000]);
        // Under 2 s of readings, nothing to measure: the nine messages without a slot keep the
        // limiter's bookings, 0.53-0.67 s apart from 1 s on, within their 16 s horizon.
        assert_eq!(delays[0].len(), 9);
        assert!(
            delays[0].windows(2).all(|w| w[0] <= w[1]),
            "{:?}",
            delays[0]
        );
        assert!(
            delays[0].iter().all(|d| (1..=6).contains(d)),
            "{:?}",
            delays[0]
        );
        // From 2 s on, 80 messages falling by 10/s have 80 / 15 = 5.3 s left: the messages
        // handed back come back at random within that, whatever their booking would be.
        for later in &delays[3..] {
            assert_eq!(later.len(), 9);
            assert!(later.iter().all(|d| (0..=6).contains(d)), "{later:?}");
            assert!(
                later.windows(2).any(|w| w[0] > w[1]),
                "in booking order: {later:?}"
            );
        }
    }

    fn slow_config() -> Config {
        Config {
            initial_rate: 1.0,
            burst: Duration::ZERO,
            permit_wait: Duration::ZERO,
            packaging_group_id: Some(crate::message::PackagingGroupId::parse("g").unwrap()),
            source_role_arn: Some(
                crate::message::RoleArn::parse("arn:aws:iam::123456789012:role/R").unwrap(),
            ),
            ..Config::default()
        }
    }

    fn batch(receives: u32) -> Vec<SqsMessage> {
        (0..10)
            .map(|i| {
                let mut m = record(Some(&format!("m{i}")));
                m.body = Some(format!(r#"{{"sourceArn":"arn:aws:s3:::bucket/{i}.m3u8"}}"#));
                m.event_source_arn = Some("arn:aws:sqs:us-east-1:123456789012:ingest".into());
                m.receipt_handle = Some(format!("rh-{i}"));
                m.attributes
                    .insert("ApproximateReceiveCount".into(), receives.to_string());
                m
            })
            .collect()
    }

    /// Creates every asset at once.
    struct Instant0;

    #[async_trait::async_trait]
    impl AssetApi for Instant0 {
        async fn create_asset(&self, _: &AssetRequest) -> Result<Option<String>, ApiError> {
            Ok(None)
        }
        async fn describe_asset(
            &self,
            _: &AssetId,
        ) -> Result<Option<crate::mediapackage::ExistingAsset>, ApiError> {
            Ok(None)
        }
    }

    fn bookings(receives: u32) -> Vec<Redelivery> {
        let ingestor = Ingestor::new(Instant0, slow_config());
        let records = batch(receives);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let outcomes = runtime
            .block_on(ingestor.process_batch(&records, Instant::now() + Duration::from_secs(60)));
        outcomes
            .into_iter()
            .filter_map(|o| match o {
                Outcome::Retry(_, redelivery) => Some(redelivery),
                _ => None,
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_on_its_last_delivery_waits_for_a_slot_instead_of_being_handed_back() {
        let config = Config {
            max_receive_count: Some(5),
            ..slow_config()
        };
        let ingestor = Ingestor::new(Instant0, config);
        let deadline = Instant::now() + Duration::from_secs(60);
        // Fourth receive: one slot now, nine handed back, as with no maximum.
        let fourth = ingestor.process_batch(&batch(4), deadline).await;
        let handed_back = fourth.iter().filter(|o| o.must_redeliver()).count();
        assert_eq!(handed_back, 9);
        // Fifth and last: every message waits its turn at the limiter's rate and is created.
        let start = Instant::now();
        let last = ingestor.process_batch(&batch(5), deadline).await;
        assert!(
            last.iter().all(|o| matches!(o, Outcome::Created { .. })),
            "{last:?}"
        );
        assert!(
            Instant::now() - start >= Duration::from_secs(3),
            "it waited"
        );
    }

    #[test]
    fn bookings_reach_no_further_than_half_the_backoff_ceiling_of_the_receive_count() {
        // At 1 request/s, paced strictly, one message goes now (and slow start raises the rate
        // to 1.5/s) and the others are booked from 1 s on, 0.53 s apart. A first receive
        // (ceiling 2 s) may be booked 1 s ahead at most; the rest come back within that 1 s.
        let first = bookings(1);
        assert_eq!(first.len(), 9);
        let booked: Vec<_> = first
            .iter()
            .filter_map(|r| match r {
                Redelivery::After(eta) => Some(eta.as_millis()),
                _ => None,
            })
            .collect();
        assert_eq!(booked, [1000]);
        assert_eq!(
            first
                .iter()
                .filter(|r| **r == Redelivery::Within(Duration::from_secs(1)))
                .count(),
            8
        );
        // A fourth receive (ceiling 16 s) has every message booked, within 8 s.
        let fourth = bookings(4);
        assert!(
            fourth
                .iter()
                .all(|r| matches!(r, Redelivery::After(eta) if *eta <= Duration::from_secs(8))),
            "{fourth:?}"
        );
    }

    struct NoApi;

    #[async_trait::async_trait]
    impl AssetApi for NoApi {
        async fn create_asset(&self, _: &AssetRequest) -> Result<Option<String>, ApiError> {
            unreachable!("no call expected")
        }
        async fn describe_asset(
            &self,
            _: &AssetId,
        ) -> Result<Option<crate::mediapackage::ExistingAsset>, ApiError> {
            unreachable!("no call expected")
        }
    }
}
