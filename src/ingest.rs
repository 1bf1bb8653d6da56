//! One SQS batch in, one outcome per message, one `SqsBatchResponse` out.
//!
//! The batch runs in three steps: every message is processed ([`Ingestor::process_batch`]),
//! the messages to retry that have no delivery or visibility time left are sent to the
//! dead-letter queue with their reason, and the rest get the visibility timeout the
//! [`crate::redelivery`] policy gives them. Each step is bounded by the invocation's deadline.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
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
use crate::events::{AssetEvent, EventBus, PublishError, MAX_ENTRIES};
use crate::limiter::{LimiterConfig, RateLimiter};
use crate::mediapackage::{ApiError, Asset, AssetApi, ErrorKind};
use crate::message::{
    AssetId, AssetRequest, Defaults, InvalidMessage, PackagingGroupId, Refused, RoleArn, SourceArn,
};
use crate::metrics::{BatchMetrics, CallCounts, Emf};
pub use crate::redelivery::Redelivery;
use crate::redelivery::{
    can_delay, deadline_margin, fits_an_attempt, slot_wait, Budget, Delays, Need, Reach,
    MIN_ATTEMPT,
};
use crate::sqs::{DeadLetter, QueueApi, VisibilityChange};

/// How long a queue without a known `maxReceiveCount` goes before it is asked again.
const LIMIT_RETRY: Duration = Duration::from_secs(60);

/// Kept free at the very end of the invocation for the runtime to send the response.
const RESPONSE_TIME: Duration = Duration::from_millis(50);

/// Why a message did not become an asset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// A short code: the AWS error code, or one of this function's (`InvalidMessage`,
    /// `AssetIdConflict`, `DeadlineReached`, `RetriesExhausted`, `Panic`).
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

/// An asset a message asked for, made or found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    /// What the message asked for.
    pub request: AssetRequest,
    /// The asset as the API returned it: its packaging group is the one asked for or an
    /// overflow group.
    pub asset: Asset,
    /// Found already existing rather than made now.
    pub found: bool,
    /// The shape the message came in.
    pub envelope: String,
}

/// What happened to one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// CreateAsset made the asset (of a body naming several, at least one; the others existed).
    Created {
        /// The assets.
        assets: Vec<Ready>,
    },
    /// The asset already existed as asked (same id, source, packaging group and role): a
    /// redelivery after success.
    AlreadyExists {
        /// The assets.
        assets: Vec<Ready>,
    },
    /// Nothing to create (an `s3:TestEvent`, objects that are no manifests, other S3 events):
    /// acknowledged, with the reason.
    Skipped(String),
    /// Cannot succeed, or ran out of deliveries, and is now in the dead-letter queue with the
    /// reason: acknowledged, so it costs no more invocations.
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

    /// The assets a message made or found.
    pub fn assets(&self) -> &[Ready] {
        match self {
            Self::Created { assets } | Self::AlreadyExists { assets } => assets,
            _ => &[],
        }
    }

    fn assets_mut(&mut self) -> &mut [Ready] {
        match self {
            Self::Created { assets } | Self::AlreadyExists { assets } => assets,
            _ => &mut [],
        }
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
    /// The invocation's deadline came first: no time for an attempt, or the call was cut.
    Deadline { last: Option<ApiError> },
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
            Stop::Deadline { last } => Outcome::Retry(
                Failure::new(
                    "DeadlineReached",
                    match last {
                        Some(last) => format!(
                            "the invocation deadline came before the message was done (last error {last})"
                        ),
                        None => "the invocation deadline came before the message was done".into(),
                    },
                ),
                Redelivery::Backoff,
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
    let now_ms = epoch_ms();
    Instant::now() + Duration::from_millis(deadline_ms.saturating_sub(now_ms))
}

fn epoch_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The points in an invocation's time that bound its work.
#[derive(Debug, Clone, Copy)]
struct Stops {
    /// No API attempt starts after this: one of [`MIN_ATTEMPT`] must fit before `hard_stop`.
    last_start: Instant,
    /// API calls are cut here; the time after it is for reporting.
    hard_stop: Instant,
    /// Dead-letter sends and visibility changes end here, just before the deadline.
    report: Instant,
    /// Dead-letter sends of the processing step end here, a little before `report`, where
    /// that step is cut: a send and its outcome are never separated by the cut.
    letters: Instant,
}

/// One message's turn at the API: what decides how long its calls may wait for a request
/// slot and when they must stop.
#[derive(Debug, Clone, Copy)]
pub struct Turn<'a> {
    queue_arn: Option<&'a str>,
    receives: u32,
    fifo: bool,
    several: bool,
    last_start: Instant,
    hard_stop: Instant,
    horizon: Duration,
}

impl Turn<'_> {
    /// A turn for tests and tools: a first delivery of a standard queue's message, which may
    /// wait as long as `PERMIT_WAIT_MS` allows and whose calls must end by `deadline`.
    pub fn until(deadline: Instant) -> Self {
        Self {
            queue_arn: None,
            receives: 1,
            fifo: false,
            several: false,
            last_start: deadline,
            hard_stop: deadline,
            horizon: crate::backoff::SQS_MAX_VISIBILITY,
        }
    }
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
    /// Each source queue's `maxReceiveCount` and when it was read. A known one is kept; none
    /// (no redrive policy, or the read failed) is asked again after [`LIMIT_RETRY`], so a policy
    /// added later is seen.
    receive_limits: Mutex<HashMap<String, (Option<u32>, Instant)>>,
    warned_short_timeout: AtomicBool,
    events: Option<Box<dyn EventBus>>,
    counts: CallCounts,
    emf: Option<Emf>,
    /// Per packaging group: CreateAsset calls refused for the asset quota since the last asset
    /// made in it, and when the last one was.
    quota_refusals: Mutex<HashMap<PackagingGroupId, (u32, Instant)>>,
}

impl<A: AssetApi> Ingestor<A> {
    /// Builds the function from its port and configuration.
    pub fn new(api: A, config: Config) -> Self {
        let defaults = Defaults {
            packaging_group_id: config.packaging_group_id.clone(),
            source_role_arn: config.source_role_arn.clone(),
        };
        let fallback = LimiterConfig::default();
        let limiter = RateLimiter::new(LimiterConfig {
            // No evidence of a quota yet: probe, unless a rate or a ceiling is given.
            probe: config.initial_rate.is_none() && config.max_rate.is_none(),
            initial_rate: config
                .initial_rate
                .or(config.max_rate)
                .unwrap_or(fallback.initial_rate),
            max_rate: config.max_rate,
            burst: config.burst,
            ..fallback
        });
        Self {
            api,
            queue: None,
            limiter,
            gauge: DrainGauge::default(),
            config,
            defaults,
            receive_limits: Mutex::default(),
            warned_short_timeout: AtomicBool::new(false),
            events: None,
            counts: CallCounts::default(),
            emf: None,
            quota_refusals: Mutex::default(),
        }
    }

    /// Publishes an `Asset Created` event on `bus` for each asset made or found
    /// ([`crate::events`]).
    pub fn with_events(mut self, bus: impl EventBus + 'static) -> Self {
        self.events = Some(Box::new(bus));
        self
    }

    /// Sets message visibility through `queue` for messages to retry, and sends what cannot
    /// succeed to its dead-letter queue. Without a queue, retried messages come back after the
    /// queue's own visibility timeout.
    pub fn with_queue(mut self, queue: impl QueueApi + 'static) -> Self {
        self.queue = Some(Box::new(queue));
        self
    }

    /// Writes one EMF metrics document per invocation handled by [`Ingestor::handle`].
    pub fn with_metrics(mut self, emf: Emf) -> Self {
        self.emf = Some(emf);
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
        let (response, metrics) = self.run_batch(&event.payload.records, deadline).await;
        if let Some(emf) = &self.emf {
            emf.flush(&event.context.request_id, &metrics);
        }
        Ok(response?)
    }

    /// Processes `records`, dead-letters those out of deliveries, delays the redelivery of
    /// the rest to retry, and returns the batch response: the whole invocation, given its
    /// deadline.
    pub async fn handle_batch(
        &self,
        records: &[SqsMessage],
        deadline: Instant,
    ) -> Result<SqsBatchResponse, MissingMessageId> {
        self.run_batch(records, deadline).await.0
    }

    /// [`Ingestor::handle_batch`], with the invocation's figures.
    pub async fn run_batch(
        &self,
        records: &[SqsMessage],
        deadline: Instant,
    ) -> (Result<SqsBatchResponse, MissingMessageId>, BatchMetrics) {
        let started = Instant::now();
        let report = deadline.checked_sub(RESPONSE_TIME).unwrap_or(deadline);
        let outcomes = self.process_batch(records, deadline).await;
        // Events take at most half of what is left, so dead letters and delays keep the rest.
        let now = Instant::now();
        let events_until = now + report.saturating_duration_since(now) / 2;
        let outcomes = self.publish(records, outcomes, events_until).await;
        let outcomes = self.retire_exhausted(records, outcomes, report).await;
        let response = batch_response(records, &outcomes);
        if response.is_ok() {
            self.delay_redeliveries(records, &outcomes, report).await;
        }
        let metrics = BatchMetrics::of(
            records,
            &outcomes,
            &self.counts,
            self.limiter.stats().rate,
            started.elapsed(),
        );
        tracing::info!(
            messages = records.len(),
            redeliver = metrics.handed_back,
            created = metrics.created,
            found = metrics.found,
            dead_lettered = metrics.dead_lettered.values().sum::<u64>(),
            rate = metrics.rate,
            "batch done"
        );
        (response, metrics)
    }

    /// The bounds of an invocation that must be done by `deadline`, with a margin that scales
    /// with the time it has ([`deadline_margin`]).
    fn stops(&self, deadline: Instant) -> Stops {
        let now = Instant::now();
        let budget = deadline.saturating_duration_since(now);
        let margin = deadline_margin(budget, self.config.deadline_margin);
        if !fits_an_attempt(budget, self.config.deadline_margin)
            && !self.warned_short_timeout.swap(true, Ordering::Relaxed)
        {
            tracing::error!(
                budget_ms = budget.as_millis() as u64,
                margin_ms = margin.as_millis() as u64,
                min_attempt_ms = MIN_ATTEMPT.as_millis() as u64,
                "the invocation is too short for any MediaPackage VOD call: raise the function \
                 timeout (Timeout, at least 1 s; 3 s or more recommended) or lower DEADLINE_MARGIN_MS"
            );
        }
        let hard_stop = deadline.checked_sub(margin).unwrap_or(now);
        Stops {
            // In the past when no attempt fits: then nothing starts.
            last_start: hard_stop.checked_sub(MIN_ATTEMPT).unwrap_or(now),
            hard_stop,
            report: deadline.checked_sub(RESPONSE_TIME).unwrap_or(deadline),
            letters: deadline.checked_sub(2 * RESPONSE_TIME).unwrap_or(deadline),
        }
    }

    /// Processes every record and returns one outcome per record in record order. At most
    /// `MAX_CONCURRENCY` messages run at once; the messages of one FIFO message group run one
    /// after another, and after the first failure in a group the rest of that group are kept
    /// back without calling the API. Two messages for the same asset make one call. Bodies are
    /// parsed, and poison ones dead-lettered, whatever the time left; no API attempt starts
    /// unless one can finish before `deadline` less the margin, and every call is cut there.
    pub async fn process_batch(&self, records: &[SqsMessage], deadline: Instant) -> Vec<Outcome> {
        let stops = self.stops(deadline);
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
                            None => self.process_record(record, stops, calls).await,
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
        // Every wait and call ends by the hard stop on its own; this only guards the reporting
        // time against anything that does not.
        if tokio::time::timeout_at(stops.report, work).await.is_err() {
            tracing::warn!("deadline reached; reporting unfinished messages for redelivery");
        }
        let outcomes = outcomes.into_inner().expect("outcomes");
        outcomes
            .into_iter()
            .zip(records)
            .map(|(outcome, record)| {
                outcome.unwrap_or_else(|| {
                    let outcome = Stop::Deadline { last: None }.into_outcome();
                    log_outcome(record.message_id.as_deref(), &outcome);
                    outcome
                })
            })
            .collect()
    }

    async fn process_record(&self, record: &SqsMessage, stops: Stops, calls: &Calls) -> Outcome {
        let message_id = record.message_id.as_deref().unwrap_or("");
        let span = tracing::info_span!(
            "message",
            message_id,
            envelope = field::Empty,
            asset_id = field::Empty
        );
        async move {
            let work = AssertUnwindSafe(self.process_body(record, stops, calls));
            let outcome = work.catch_unwind().await.unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Outcome::Retry(Failure::new("Panic", what), Redelivery::Queue)
            });
            let outcome = self.dead_letter(record, outcome, stops.letters).await;
            log_outcome(None, &outcome);
            outcome
        }
        .instrument(span)
        .await
    }

    /// Parses one body of any accepted shape, checks what it asks for against the source
    /// policy, and creates its assets (one call per distinct asset in the batch). A body naming
    /// several assets succeeds or fails as one message.
    async fn process_body(&self, record: &SqsMessage, stops: Stops, calls: &Calls) -> Outcome {
        let parsed = match parse_body(record.body.as_deref().unwrap_or(""), &self.defaults) {
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
        if parsed.requests.is_empty() {
            return Outcome::Skipped(
                parsed
                    .skipped
                    .iter()
                    .map(|s| format!("{}: {}", s.what, s.reason))
                    .collect::<Vec<_>>()
                    .join("; "),
            );
        }
        if Instant::now() > stops.last_start {
            return Stop::Deadline { last: None }.into_outcome();
        }
        let receives = receive_count(record);
        let backoff = self.delays().backoff;
        // With a receive budget a message may be booked further ahead (`BUDGETED_REACH`); the
        // budget is looked up only when hand-backs can happen at all.
        let budgeted = !self.limiter.stats().probing
            && Budget {
                receives,
                max_receives: self.receive_limit(record.event_source_arn.as_deref()).await,
            }
            .reach()
                != Reach::Ceiling;
        let turn = Turn {
            queue_arn: record.event_source_arn.as_deref(),
            receives,
            fifo: fifo_group(record).is_some(),
            several: parsed.requests.len() > 1,
            last_start: stops.last_start,
            hard_stop: stops.hard_stop,
            // A booking reaches no further than half the backoff ceiling for this receive: a
            // message the instance cannot serve soon comes back soon, to be booked again from
            // what the limiter has learned by then. (Measured: the whole ceiling, or twice it,
            // drained scenario B of `make bench` later; a quarter of it, later on A.)
            horizon: if budgeted {
                (backoff
                    .ceiling(receives)
                    .saturating_mul(crate::redelivery::BUDGETED_REACH)
                    / 2)
                .min(backoff.cap)
            } else {
                backoff.ceiling(receives) / 2
            },
        };
        let mut outcome = match parsed.requests.as_slice() {
            [request] => {
                span.record("asset_id", request.id.as_str());
                calls.create(self, request, &turn).await
            }
            requests => {
                let ids: Vec<_> = requests.iter().map(|r| r.id.as_str()).collect();
                span.record("asset_id", field::display(ids.join(",")));
                let outcomes = futures::future::join_all(
                    requests.iter().map(|r| calls.create(self, r, &turn)),
                )
                .await;
                for (request, outcome) in requests.iter().zip(&outcomes) {
                    tracing::debug!(asset_id = request.id.as_str(), ?outcome, "one of several");
                }
                combine(outcomes)
            }
        };
        for ready in outcome.assets_mut() {
            ready.envelope = parsed.envelope.to_string();
        }
        outcome
    }

    /// The dead letter for `record`, failed with `failure`.
    fn letter(&self, record: &SqsMessage, failure: &Failure, last: Option<&Failure>) -> DeadLetter {
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
    async fn send_letter(&self, record: &SqsMessage, letter: &DeadLetter, until: Instant) -> bool {
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
    async fn dead_letter(&self, record: &SqsMessage, outcome: Outcome, until: Instant) -> Outcome {
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
    async fn retire_exhausted(
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
    async fn receive_limit(&self, queue_arn: Option<&str>) -> Option<u32> {
        if let Some(max) = self.config.max_receive_count {
            return Some(max);
        }
        let (Some(queue), Some(arn)) = (&self.queue, queue_arn) else {
            return None;
        };
        match self.receive_limits.lock().expect("limits").get(arn) {
            Some((Some(max), _)) => return Some(*max),
            Some((None, read_at)) if read_at.elapsed() < LIMIT_RETRY => return None,
            _ => {}
        }
        let read = queue.max_receive_count(arn).await;
        let max = read.as_ref().ok().copied().flatten();
        self.receive_limits
            .lock()
            .expect("limits")
            .insert(arn.to_string(), (max, Instant::now()));
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
    fn known_limit(&self, queue_arn: Option<&str>) -> Option<u32> {
        self.config.max_receive_count.or_else(|| {
            self.receive_limits
                .lock()
                .expect("limits")
                .get(queue_arn?)
                .and_then(|(max, _)| *max)
        })
    }

    /// The latest moment a call of `turn` may start: a short wait while its message may still
    /// go back to the queue, else as late as the invocation allows ([`slot_wait`]).
    async fn latest(&self, turn: &Turn<'_>, follow_up: bool) -> Instant {
        let stats = self.limiter.stats();
        // A probing limiter never refuses a slot; FIFO messages and bodies of several objects
        // wait whatever the budget: no need to look the budget up.
        if stats.probing || turn.fifo || turn.several {
            return turn.last_start;
        }
        let need = Need {
            budget: Budget {
                receives: turn.receives,
                max_receives: self.receive_limit(turn.queue_arn).await,
            },
            fifo: turn.fifo,
            several: turn.several,
            follow_up,
        };
        let interval = Duration::from_secs_f64(1.0 / stats.rate);
        match slot_wait(need, self.config.permit_wait, interval) {
            Some(wait) => (Instant::now() + wait).min(turn.last_start),
            None => turn.last_start,
        }
    }

    /// CreateAsset, with a refusal settled by DescribeAsset: the asset as asked (same source,
    /// packaging group and role) is a redelivery after success, another one is a conflict. A
    /// redelivered body of several objects looks each one up first, so the objects made on an
    /// earlier delivery cost one call, not two, and the body makes progress on every delivery.
    /// A packaging group refused for its asset quota hands over to the next overflow group,
    /// and once `QUOTA_MAX_REFUSALS` calls have been refused for it (and for every group after
    /// it), the message is dead-lettered as `AssetQuotaExceeded`. Every call takes a slot from
    /// the rate limiter.
    pub async fn create(&self, request: &AssetRequest, turn: &Turn<'_>) -> Outcome {
        let chain = self.chain(request);
        if turn.several && turn.receives > 1 {
            match self
                .limited(turn, false, || self.api.describe_asset(&request.id))
                .await
            {
                Ok(Some(existing)) => return settle(request, existing, &chain),
                Ok(None) => {}
                Err(stop) => return stop.into_outcome(),
            }
        }
        for (index, group) in chain.iter().enumerate() {
            let last = index + 1 == chain.len();
            if !last && self.known_full(group) {
                continue;
            }
            let attempt = AssetRequest {
                packaging_group_id: group.clone(),
                ..request.clone()
            };
            let outcome = self.create_in(request, &attempt, &chain, turn).await;
            match &outcome {
                Outcome::Retry(_, Redelivery::Quota) => {
                    CallCounts::add(&self.counts.quota_refusals, 1);
                    let refusals = self.note_quota_refusal(group);
                    if !last {
                        tracing::warn!(
                            packaging_group_id = group.as_str(),
                            next = chain[index + 1].as_str(),
                            "packaging group full; trying the next overflow group"
                        );
                        continue;
                    }
                    return self.quota_end(outcome, group, refusals, &chain);
                }
                Outcome::Created { .. } => {
                    self.quota_refusals.lock().expect("quota").remove(group);
                }
                _ => {}
            }
            return outcome;
        }
        unreachable!("a chain holds the group asked for")
    }

    /// CreateAsset of `attempt` (what `request` asks for, in one group of `chain`).
    async fn create_in(
        &self,
        request: &AssetRequest,
        attempt: &AssetRequest,
        chain: &[PackagingGroupId],
        turn: &Turn<'_>,
    ) -> Outcome {
        let refused = match self
            .limited(turn, false, || self.api.create_asset(attempt))
            .await
        {
            Ok(asset) => {
                return Outcome::Created {
                    assets: vec![Ready {
                        request: request.clone(),
                        asset: asset.or_request(attempt),
                        found: false,
                        envelope: String::new(),
                    }],
                }
            }
            // Which code CreateAsset answers for an existing id is not documented: any refusal
            // a retry cannot fix, but 403 and 404 (an unknown packaging group), is checked.
            Err(Stop::Api(error))
                if matches!(error.kind, ErrorKind::Unprocessable | ErrorKind::Permanent) =>
            {
                error
            }
            Err(stop) => return stop.into_outcome(),
        };
        match self
            .limited(turn, true, || self.api.describe_asset(&request.id))
            .await
        {
            Ok(Some(existing)) => settle(request, existing, chain),
            Ok(None) => Outcome::Permanent(refused.into()),
            Err(stop) => stop.into_outcome(),
        }
    }

    /// The packaging groups an asset of `request` may go to, in order: the one it names, then,
    /// for `PACKAGING_GROUP_ID`, the `OVERFLOW_PACKAGING_GROUP_IDS`.
    fn chain(&self, request: &AssetRequest) -> Vec<PackagingGroupId> {
        let mut chain = vec![request.packaging_group_id.clone()];
        if self.config.packaging_group_id.as_ref() == Some(&request.packaging_group_id) {
            chain.extend(self.config.overflow_groups.iter().cloned());
        }
        chain
    }

    /// Whether `group` was refused for its asset quota within the last
    /// `QUOTA_REDELIVERY_SECONDS`, with no asset made in it since: the next group is tried
    /// first.
    fn known_full(&self, group: &PackagingGroupId) -> bool {
        self.quota_refusals
            .lock()
            .expect("quota")
            .get(group)
            .is_some_and(|(_, at)| at.elapsed() < self.config.quota_redelivery)
    }

    /// Counts a quota refusal for `group`; returns the count since the last asset made in it.
    fn note_quota_refusal(&self, group: &PackagingGroupId) -> u32 {
        let mut refusals = self.quota_refusals.lock().expect("quota");
        let entry = refusals.entry(group.clone()).or_insert((0, Instant::now()));
        *entry = (entry.0 + 1, Instant::now());
        entry.0
    }

    /// A message refused for the asset quota of `group`, the last of its `chain`: it comes
    /// back after `QUOTA_REDELIVERY_SECONDS` until the group has been refused
    /// `QUOTA_MAX_REFUSALS` times, then it goes to the dead-letter queue with the reason.
    fn quota_end(
        &self,
        outcome: Outcome,
        group: &PackagingGroupId,
        refusals: u32,
        chain: &[PackagingGroupId],
    ) -> Outcome {
        let max = self.config.quota_max_refusals;
        let Outcome::Retry(last, _) = &outcome else {
            return outcome;
        };
        if refusals < max {
            return outcome;
        }
        let groups = if chain.len() > 1 {
            format!(
                " (so are the groups before it: {})",
                chain[..chain.len() - 1]
                    .iter()
                    .map(PackagingGroupId::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        } else {
            String::new()
        };
        Outcome::Permanent(Failure {
            code: "AssetQuotaExceeded".into(),
            reason: format!(
                "packaging group {group} is full{groups}: {refusals} CreateAsset calls refused for \
                 its asset quota (QUOTA_MAX_REFUSALS {max}); raise the quota, delete assets or set \
                 OVERFLOW_PACKAGING_GROUP_IDS, then redrive; last error {}: {}",
                last.code, last.reason
            ),
            request_id: last.request_id.clone(),
        })
    }

    /// Publishes an `Asset Created` event for every asset made or found, before `until`. A
    /// message with an event not published is retried (its asset is found next time, and the
    /// event sent then), and so, to keep their order, are the messages after it in its FIFO
    /// group.
    async fn publish(
        &self,
        records: &[SqsMessage],
        mut outcomes: Vec<Outcome>,
        until: Instant,
    ) -> Vec<Outcome> {
        let Some(bus) = &self.events else {
            return outcomes;
        };
        let events: Vec<(usize, AssetEvent)> = outcomes
            .iter()
            .enumerate()
            .flat_map(|(index, outcome)| {
                let message_id = records[index].message_id.as_deref().unwrap_or("");
                outcome
                    .assets()
                    .iter()
                    .map(move |ready| (index, asset_event(message_id, ready)))
            })
            .collect();
        // Collected first so the futures have one concrete type, which keeps the batch future
        // `Send`.
        let calls: Vec<_> = events
            .chunks(MAX_ENTRIES)
            .map(|chunk| async move {
                let batch: Vec<AssetEvent> = chunk.iter().map(|(_, e)| e.clone()).collect();
                let results = match tokio::time::timeout_at(until, bus.put(&batch)).await {
                    Ok(Ok(results)) => results,
                    Ok(Err(error)) => vec![Err(error); batch.len()],
                    Err(_) => vec![
                        Err(PublishError {
                            code: "DeadlineReached".into(),
                            message: "PutEvents had not answered when the invocation's time for \
                                  events ran out"
                                .into(),
                        });
                        batch.len()
                    ],
                };
                chunk
                    .iter()
                    .map(|(index, _)| *index)
                    .zip(results)
                    .collect::<Vec<_>>()
            })
            .collect();
        let results: Vec<(usize, Result<(), PublishError>)> = futures::stream::iter(calls)
            .buffer_unordered(MAX_ENTRIES)
            .flat_map(futures::stream::iter)
            .collect()
            .await;
        let mut failed: BTreeMap<usize, PublishError> = BTreeMap::new();
        for (index, result) in results {
            match result {
                Ok(()) => CallCounts::add(&self.counts.events_published, 1),
                Err(error) => {
                    CallCounts::add(&self.counts.events_failed, 1);
                    failed.entry(index).or_insert(error);
                }
            }
        }
        for (index, error) in failed {
            let outcome = Outcome::Retry(
                Failure::new(
                    "EventNotPublished",
                    format!(
                        "the asset exists but its Asset Created event was not published ({error}); \
                         retried so the event goes out when the asset is found"
                    ),
                ),
                Redelivery::Backoff,
            );
            log_outcome(records[index].message_id.as_deref(), &outcome);
            outcomes[index] = outcome;
        }
        for lane in lanes(records) {
            let Some(first) = lane.iter().position(|&i| outcomes[i].must_redeliver()) else {
                continue;
            };
            for &index in &lane[first + 1..] {
                if !outcomes[index].assets().is_empty()
                    || matches!(outcomes[index], Outcome::Skipped(_))
                {
                    outcomes[index] = kept_back(&records[index], &records[lane[first]]);
                }
            }
        }
        outcomes
    }

    /// Makes `call` through the rate limiter, up to `API_MAX_ATTEMPTS` times while it is
    /// throttled or fails transiently, and teaches the limiter from each answer. Each attempt
    /// waits for its own slot ([`Ingestor::latest`]) and is cut at the turn's hard stop.
    async fn limited<T, F, Fut>(&self, turn: &Turn<'_>, follow_up: bool, call: F) -> Result<T, Stop>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, ApiError>>,
    {
        let mut last = None;
        for attempt in 0..self.config.api_max_attempts {
            if Instant::now() > turn.last_start {
                return Err(Stop::Deadline { last });
            }
            if attempt > 0 {
                CallCounts::add(&self.counts.retried, 1);
            }
            let latest = self.latest(turn, follow_up || attempt > 0).await;
            let permit = match self.limiter.acquire(latest, turn.horizon).await {
                Ok(permit) => permit,
                Err(eta) => {
                    let redelivery =
                        eta.map_or(Redelivery::Within(turn.horizon), Redelivery::After);
                    return Err(Stop::NoSlot { redelivery, last });
                }
            };
            let Ok(result) = tokio::time::timeout_at(turn.hard_stop, call()).await else {
                return Err(Stop::Deadline { last });
            };
            match result {
                Ok(value) => {
                    self.limiter.on_success(&permit);
                    return Ok(value);
                }
                Err(error) => match error.kind {
                    ErrorKind::Throttled => {
                        CallCounts::add(&self.counts.throttled, 1);
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

    fn delays(&self) -> Delays {
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
    async fn spreads<'r>(
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
            if self.gauge.due(arn, Instant::now()) {
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
            if let Some(spread) = self.gauge.spread(arn, Instant::now()) {
                spreads.insert(arn, spread);
            }
        }
        spreads
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

/// The outcome of a refused CreateAsset whose id exists: the asset as asked, or a conflict. The
/// asset may be in any group of `chain`, the group asked for or one of its overflow groups.
fn settle(request: &AssetRequest, existing: Asset, chain: &[PackagingGroupId]) -> Outcome {
    let expected = match chain
        .iter()
        .find(|g| g.as_str() == existing.packaging_group_id)
    {
        Some(group) => AssetRequest {
            packaging_group_id: group.clone(),
            ..request.clone()
        },
        None => request.clone(),
    };
    let differences = existing.differences(&expected);
    if differences.is_empty() {
        Outcome::AlreadyExists {
            assets: vec![Ready {
                request: request.clone(),
                asset: existing,
                found: true,
                envelope: String::new(),
            }],
        }
    } else {
        Outcome::Permanent(Failure::new(
            "AssetIdConflict",
            format!(
                "asset {} already exists with {}",
                request.id,
                differences.join(", ")
            ),
        ))
    }
}

/// The `Asset Created` event of `ready`, asked for by message `message_id`.
fn asset_event(message_id: &str, ready: &Ready) -> AssetEvent {
    AssetEvent {
        asset_id: ready.request.id.to_string(),
        arn: ready.asset.arn.clone(),
        packaging_group_id: ready.asset.packaging_group_id.clone(),
        requested_packaging_group_id: ready.request.packaging_group_id.to_string(),
        source_arn: ready.asset.source_arn.clone(),
        source_role_arn: ready.asset.source_role_arn.clone(),
        resource_id: ready.request.resource_id.clone(),
        egress_endpoints: ready.asset.egress_endpoints.clone(),
        found: ready.found,
        message_id: message_id.to_string(),
        envelope: ready.envelope.clone(),
    }
}

/// One asset: the same id, source, packaging group and role.
type AssetKey = (AssetId, SourceArn, PackagingGroupId, RoleArn);

/// The CreateAsset calls of one batch, one per asset: a second message for the same asset
/// waits for the first one's outcome and shares it.
#[derive(Default)]
struct Calls {
    cells: Mutex<HashMap<AssetKey, Shared>>,
}

/// The outcome of one call, set once and read by every message that asked for it.
type Shared = Arc<tokio::sync::OnceCell<Outcome>>;

impl Calls {
    async fn create<A: AssetApi>(
        &self,
        ingestor: &Ingestor<A>,
        request: &AssetRequest,
        turn: &Turn<'_>,
    ) -> Outcome {
        let key = (
            request.id.clone(),
            request.source_arn.clone(),
            request.packaging_group_id.clone(),
            request.source_role_arn.clone(),
        );
        let cell = self
            .cells
            .lock()
            .expect("calls")
            .entry(key)
            .or_default()
            .clone();
        cell.get_or_init(|| ingestor.create(request, turn))
            .await
            .clone()
    }
}

/// One outcome for a body that named several assets: to retry if any is to retry (the others
/// are then found existing), else permanent if any is, else done.
fn combine(outcomes: Vec<Outcome>) -> Outcome {
    let first = |keep: fn(&Outcome) -> bool| outcomes.iter().find(|o| keep(o)).cloned();
    if let Some(failed) = first(|o| matches!(o, Outcome::Retry(..)))
        .or_else(|| first(|o| matches!(o, Outcome::Permanent(_))))
    {
        return failed;
    }
    let created = outcomes
        .iter()
        .any(|o| matches!(o, Outcome::Created { .. }));
    let assets = outcomes
        .iter()
        .flat_map(|o| o.assets().iter().cloned())
        .collect();
    if created {
        Outcome::Created { assets }
    } else {
        Outcome::AlreadyExists { assets }
    }
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

/// How long ago the message was first received (`ApproximateFirstReceiveTimestamp`); zero if
/// unknown.
fn since_first_receive(record: &SqsMessage, now_ms: u64) -> Duration {
    let first = record
        .attributes
        .get("ApproximateFirstReceiveTimestamp")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(now_ms);
    Duration::from_millis(now_ms.saturating_sub(first))
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

fn log_outcome(message_id: Option<&str>, outcome: &Outcome) {
    match outcome {
        Outcome::Created { assets } | Outcome::AlreadyExists { assets } => {
            for ready in assets {
                tracing::info!(
                    arn = ready.asset.arn,
                    packaging_group_id = ready.asset.packaging_group_id,
                    message_id,
                    "{}",
                    if ready.found {
                        "asset already exists"
                    } else {
                        "asset created"
                    }
                );
            }
        }
        Outcome::Skipped(reason) => tracing::info!(message_id, reason, "nothing to create"),
        Outcome::DeadLettered(f) => tracing::error!(
            code = f.code,
            reason = f.reason,
            request_id = f.request_id,
            message_id,
            "sent to the dead-letter queue"
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
    use crate::mediapackage::Asset;

    fn request(n: usize) -> AssetRequest {
        AssetRequest {
            id: AssetId::parse(&format!("a{n}")).unwrap(),
            packaging_group_id: PackagingGroupId::parse("g").unwrap(),
            source_arn: SourceArn::parse(&format!("arn:aws:s3:::media/{n}.m3u8")).unwrap(),
            source_role_arn: RoleArn::parse("arn:aws:iam::123456789012:role/Read").unwrap(),
            resource_id: None,
            tags: BTreeMap::new(),
        }
    }

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
        assert!(!Outcome::Created { assets: vec![] }.must_redeliver());
        assert!(!Outcome::AlreadyExists { assets: vec![] }.must_redeliver());
        assert!(retry().must_redeliver());
        assert!(Outcome::Permanent(Failure::new("InvalidMessage", "bad")).must_redeliver());
    }

    #[test]
    fn the_response_lists_exactly_the_messages_to_redeliver_in_order() {
        let records = [record(Some("a")), record(Some("b")), record(Some("c"))];
        let outcomes = [
            retry(),
            Outcome::Created { assets: vec![] },
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
        let ok = batch_response(
            &records,
            &[retry(), Outcome::AlreadyExists { assets: vec![] }],
        )
        .unwrap();
        assert_eq!(ok.batch_item_failures.len(), 1);
    }

    #[test]
    fn an_all_good_batch_has_an_empty_failure_list() {
        let records = [record(Some("a"))];
        let response =
            batch_response(&records, &[Outcome::AlreadyExists { assets: vec![] }]).unwrap();
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
        let ready = |n: usize, found: bool| {
            let request = request(n);
            Ready {
                asset: Asset::of(&request),
                request,
                found,
                envelope: "s3-event".into(),
            }
        };
        let created = || Outcome::Created {
            assets: vec![ready(0, false)],
        };
        let found = |n| Outcome::AlreadyExists {
            assets: vec![ready(n, true)],
        };
        let permanent = || Outcome::Permanent(Failure::new("ForbiddenException", "no"));
        // Every asset of the body is kept, for its event.
        assert_eq!(
            combine(vec![created(), found(1)]),
            Outcome::Created {
                assets: vec![ready(0, false), ready(1, true)]
            }
        );
        assert_eq!(
            combine(vec![found(1), found(2)]),
            Outcome::AlreadyExists {
                assets: vec![ready(1, true), ready(2, true)]
            }
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
            initial_rate: Some(1.0),
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
        async fn create_asset(&self, request: &AssetRequest) -> Result<Asset, ApiError> {
            Ok(Asset::of(request))
        }
        async fn describe_asset(
            &self,
            _: &AssetId,
        ) -> Result<Option<crate::mediapackage::Asset>, ApiError> {
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
    async fn a_message_without_two_deliveries_to_spare_waits_for_a_slot_instead_of_being_handed_back(
    ) {
        let config = Config {
            max_receive_count: Some(5),
            ..slow_config()
        };
        let ingestor = Ingestor::new(Instant0, config);
        let deadline = Instant::now() + Duration::from_secs(60);
        // Second receive of five: three deliveries left after a hand-back, so nine go back.
        let second = ingestor.process_batch(&batch(2), deadline).await;
        let handed_back = second.iter().filter(|o| o.must_redeliver()).count();
        assert_eq!(handed_back, 9);
        // Third: a hand-back would leave only the two kept for real failures, so every message
        // waits its turn at the limiter's rate and is created.
        let start = Instant::now();
        let third = ingestor.process_batch(&batch(3), deadline).await;
        assert!(
            third.iter().all(|o| matches!(o, Outcome::Created { .. })),
            "{third:?}"
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

    /// MediaPackage VOD as a map, each call taking `latency`; an existing id is refused with
    /// `refusal`. Counts its calls.
    struct Fake {
        latency: Duration,
        refusal: ErrorKind,
        assets: Mutex<HashMap<String, Asset>>,
        creates: std::sync::atomic::AtomicUsize,
        describes: std::sync::atomic::AtomicUsize,
    }

    impl Fake {
        fn new(latency_ms: u64) -> Self {
            Self {
                latency: Duration::from_millis(latency_ms),
                refusal: ErrorKind::Unprocessable,
                assets: Mutex::default(),
                creates: Default::default(),
                describes: Default::default(),
            }
        }

        fn counts(&self) -> (usize, usize) {
            (
                self.creates.load(Ordering::Relaxed),
                self.describes.load(Ordering::Relaxed),
            )
        }
    }

    #[async_trait::async_trait]
    impl AssetApi for Fake {
        async fn create_asset(&self, request: &AssetRequest) -> Result<Asset, ApiError> {
            self.creates.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(self.latency).await;
            let mut assets = self.assets.lock().unwrap();
            if assets.contains_key(request.id.as_str()) {
                return Err(ApiError::local(self.refusal, "Refused", "exists"));
            }
            assets.insert(request.id.to_string(), Asset::of(request));
            Ok(Asset::of(request))
        }
        async fn describe_asset(&self, id: &AssetId) -> Result<Option<Asset>, ApiError> {
            self.describes.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(self.latency).await;
            Ok(self.assets.lock().unwrap().get(id.as_str()).cloned())
        }
    }

    fn assert_all_created(outcomes: &[Outcome]) {
        assert!(
            outcomes
                .iter()
                .all(|o| matches!(o, Outcome::Created { .. })),
            "{outcomes:?}"
        );
    }

    /// A limiter that has learned `rate` from a throttle and has a full bucket again.
    async fn learned(ingestor: &Ingestor<Fake>, rate: usize) {
        let now = Instant::now();
        let far = now + Duration::from_secs(60);
        let permits: Vec<_> = (0..rate * 2)
            .map(|_| ingestor.limiter.reserve(now, far, Duration::ZERO).unwrap())
            .collect();
        ingestor.limiter.on_throttle(&permits[0]);
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(!ingestor.limiter.stats().probing);
    }

    #[tokio::test(start_paused = true)]
    async fn at_the_default_settings_a_slow_refusal_is_still_checked_with_describe_asset() {
        // A redelivery of an asset made before; the refusal takes 300 ms, twice the permit
        // wait: the DescribeAsset gets a wait of its own.
        let ingestor = Ingestor::new(Fake::new(300), slow_config_defaults());
        learned(&ingestor, 5).await;
        let records = batch(2);
        let request = parse_body(records[0].body.as_deref().unwrap(), &ingestor.defaults)
            .unwrap()
            .requests
            .remove(0);
        ingestor
            .api
            .assets
            .lock()
            .unwrap()
            .insert(request.id.to_string(), Asset::of(&request));
        let outcomes = ingestor
            .process_batch(&records[..1], Instant::now() + Duration::from_secs(30))
            .await;
        assert!(
            matches!(&outcomes[..], [Outcome::AlreadyExists { assets }] if assets[0].found),
            "{outcomes:?}"
        );
        assert_eq!(ingestor.api.counts(), (1, 1));
    }

    /// The default settings with a packaging group and role for the bodies of [`batch`].
    fn slow_config_defaults() -> Config {
        Config {
            packaging_group_id: slow_config().packaging_group_id,
            source_role_arn: slow_config().source_role_arn,
            ..Config::default()
        }
    }

    /// One S3 event naming `n` manifests, on its `receives`th delivery.
    fn s3_body(n: usize, receives: u32) -> SqsMessage {
        let records: Vec<String> = (0..n)
            .map(|i| {
                format!(
                    r#"{{"eventSource":"aws:s3","eventName":"ObjectCreated:Put","s3":{{"bucket":{{"name":"bucket"}},"object":{{"key":"show/{i}.m3u8"}}}}}}"#
                )
            })
            .collect();
        let mut m = batch(receives).remove(0);
        m.body = Some(format!(r#"{{"Records":[{}]}}"#, records.join(",")));
        m
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_naming_more_objects_than_the_burst_makes_them_all_in_one_delivery() {
        // 1 request/s, strictly paced: twelve objects need twelve seconds of slots.
        let ingestor = Ingestor::new(Fake::new(20), slow_config());
        let outcomes = ingestor
            .process_batch(&[s3_body(12, 1)], Instant::now() + Duration::from_secs(60))
            .await;
        assert!(
            matches!(&outcomes[..], [Outcome::Created { assets }] if !assets[0].found),
            "{outcomes:?}"
        );
        assert_eq!(ingestor.api.assets.lock().unwrap().len(), 12);
    }

    #[tokio::test(start_paused = true)]
    async fn a_redelivered_body_finds_the_objects_already_made_without_spending_create_slots() {
        let ingestor = Ingestor::new(Fake::new(20), slow_config());
        let first = s3_body(12, 1);
        // Ten of the twelve were made on an earlier delivery.
        let requests = parse_body(first.body.as_deref().unwrap(), &ingestor.defaults)
            .unwrap()
            .requests;
        for request in &requests[..10] {
            ingestor
                .api
                .assets
                .lock()
                .unwrap()
                .insert(request.id.to_string(), Asset::of(request));
        }
        let outcomes = ingestor
            .process_batch(&[s3_body(12, 2)], Instant::now() + Duration::from_secs(60))
            .await;
        // Each object once, for its event: ten found, two made now.
        let [Outcome::Created { assets }] = &outcomes[..] else {
            panic!("{outcomes:?}");
        };
        assert_eq!(assets.len(), 12);
        assert_eq!(assets.iter().filter(|r| r.found).count(), 10);
        // One DescribeAsset each, and CreateAsset only for the two missing.
        assert_eq!(ingestor.api.counts(), (2, 12));
    }

    fn fifo_batch(groups: usize, per_group: usize) -> Vec<SqsMessage> {
        let mut records = batch(1);
        records.truncate(groups * per_group);
        for (i, m) in records.iter_mut().enumerate() {
            m.event_source_arn = Some("arn:aws:sqs:us-east-1:123456789012:ingest.fifo".into());
            m.attributes
                .insert("MessageGroupId".into(), format!("g{}", i % groups));
        }
        records
    }

    #[tokio::test(start_paused = true)]
    async fn fifo_messages_wait_for_their_slot_instead_of_holding_up_their_group() {
        // 1 request/s: a standard queue's messages would mostly be handed back.
        let ingestor = Ingestor::new(Fake::new(20), slow_config());
        let records = fifo_batch(3, 3);
        let outcomes = ingestor
            .process_batch(&records, Instant::now() + Duration::from_secs(60))
            .await;
        assert_all_created(&outcomes);
    }

    #[tokio::test(start_paused = true)]
    async fn a_fifo_group_failed_in_one_invocation_starts_afresh_in_the_next() {
        let ingestor = Ingestor::new(Fake::new(20), slow_config());
        let mut records = fifo_batch(1, 3);
        // The head is poison: with no dead-letter queue it fails, and its group is kept back.
        records[0].body = Some("{not json".into());
        let first = ingestor
            .process_batch(&records, Instant::now() + Duration::from_secs(60))
            .await;
        assert!(matches!(first[0], Outcome::Permanent(_)));
        assert!(
            matches!(&first[1], Outcome::Retry(f, Redelivery::Immediate) if f.code == "EarlierMessageFailed")
        );
        // The next invocation, with the rest of the group alone, does not remember the failure.
        let second = ingestor
            .process_batch(&records[1..], Instant::now() + Duration::from_secs(60))
            .await;
        assert!(
            second.iter().all(|o| matches!(o, Outcome::Created { .. })),
            "{second:?}"
        );
    }

    #[test]
    fn a_fifo_message_is_never_kept_away_longer_than_the_fifo_cap() {
        let ingestor = Ingestor::new(NoApi, Config::default());
        let mut records = fifo_batch(1, 2);
        for r in &mut records {
            r.attributes
                .insert("ApproximateReceiveCount".into(), "9".into());
        }
        let outcomes = [
            retry(),
            Outcome::Retry(
                Failure::new("TooManyRequestsException", "x"),
                Redelivery::Quota,
            ),
        ];
        assert_eq!(
            ingestor.redelivery_delays(&records, &outcomes, &BTreeMap::new(), || 0.999),
            [Some(10), Some(10)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_unthrottled_cold_instance_sends_the_whole_batch_at_once_and_hands_nothing_back() {
        let ingestor = Ingestor::new(Fake::new(50), slow_config_defaults());
        let start = Instant::now();
        let outcomes = ingestor
            .process_batch(&batch(1), start + Duration::from_secs(3))
            .await;
        assert_all_created(&outcomes);
        // Ten calls of 50 ms, all at once: one round trip, not ten.
        assert_eq!(Instant::now() - start, Duration::from_millis(50));
    }

    #[tokio::test(start_paused = true)]
    async fn a_three_second_invocation_with_a_slow_api_still_makes_its_calls() {
        // 1.5 s per call; the margin is 600 ms of the 3 s, so a call started at once fits.
        let ingestor = Ingestor::new(Fake::new(1500), slow_config_defaults());
        let outcomes = ingestor
            .process_batch(&batch(1)[..2], Instant::now() + Duration::from_secs(3))
            .await;
        assert_all_created(&outcomes);
    }

    /// A queue whose every call hangs for a minute.
    struct Hanging(Mutex<Vec<String>>);

    #[async_trait::async_trait]
    impl QueueApi for &'static Hanging {
        async fn dead_letter(
            &self,
            _: &str,
            letter: &DeadLetter,
        ) -> Result<(), crate::sqs::QueueError> {
            self.0.lock().unwrap().push(letter.code.clone());
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(())
        }
        async fn change_visibility(
            &self,
            _: &str,
            changes: &[VisibilityChange],
        ) -> Vec<Result<(), crate::sqs::QueueError>> {
            tokio::time::sleep(Duration::from_secs(60)).await;
            changes.iter().map(|_| Ok(())).collect()
        }
        async fn depth(&self, _: &str) -> Result<u64, crate::sqs::QueueError> {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(0)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_queue_cannot_keep_the_invocation_past_its_deadline() {
        let queue: &'static Hanging = Box::leak(Box::new(Hanging(Mutex::default())));
        let ingestor = Ingestor::new(Fake::new(20), slow_config()).with_queue(queue);
        let mut records = batch(1);
        records[0].body = Some("{not json".into());
        let start = Instant::now();
        let deadline = start + Duration::from_secs(3);
        let response = ingestor.handle_batch(&records, deadline).await.unwrap();
        assert!(Instant::now() <= deadline, "{:?}", Instant::now() - start);
        // The poison message was tried on the dead-letter queue before any API time; its send
        // did not finish, so it is reported, with the eight handed back (one of the nine valid
        // messages had the one slot a second).
        assert_eq!(queue.0.lock().unwrap().as_slice(), ["InvalidMessage"]);
        assert_eq!(response.batch_item_failures.len(), 1 + 8);
    }

    struct NoApi;

    #[async_trait::async_trait]
    impl AssetApi for NoApi {
        async fn create_asset(&self, _: &AssetRequest) -> Result<Asset, ApiError> {
            unreachable!("no call expected")
        }
        async fn describe_asset(
            &self,
            _: &AssetId,
        ) -> Result<Option<crate::mediapackage::Asset>, ApiError> {
            unreachable!("no call expected")
        }
    }

    /// MediaPackage VOD with a quota of assets per packaging group (raised by tests).
    struct Groups {
        quota: std::sync::atomic::AtomicUsize,
        assets: Mutex<HashMap<String, Asset>>,
        /// The packaging group of each CreateAsset call, in order.
        creates: Mutex<Vec<String>>,
    }

    impl Groups {
        fn new(quota: usize) -> Self {
            Self {
                quota: quota.into(),
                assets: Mutex::default(),
                creates: Mutex::default(),
            }
        }
        fn in_group(&self, group: &str) -> usize {
            let assets = self.assets.lock().unwrap();
            assets
                .values()
                .filter(|a| a.packaging_group_id == group)
                .count()
        }
    }

    #[async_trait::async_trait]
    impl AssetApi for Groups {
        async fn create_asset(&self, request: &AssetRequest) -> Result<Asset, ApiError> {
            let group = request.packaging_group_id.as_str();
            self.creates.lock().unwrap().push(group.to_string());
            tokio::time::sleep(Duration::from_millis(5)).await;
            if self
                .assets
                .lock()
                .unwrap()
                .contains_key(request.id.as_str())
            {
                return Err(ApiError::local(
                    ErrorKind::Unprocessable,
                    "UnprocessableEntityException",
                    "exists",
                ));
            }
            if self.in_group(group) >= self.quota.load(Ordering::Relaxed) {
                return Err(ApiError::from_response(
                    Some(429),
                    Some("TooManyRequestsException"),
                    Some("Asset quota reached. Resource limit exceeded"),
                ));
            }
            let asset = Asset {
                arn: Some(format!("arn:aws:mediapackage-vod:::assets/{}", request.id)),
                ..Asset::of(request)
            };
            let mut assets = self.assets.lock().unwrap();
            assets.insert(request.id.to_string(), asset.clone());
            Ok(asset)
        }
        async fn describe_asset(&self, id: &AssetId) -> Result<Option<Asset>, ApiError> {
            Ok(self.assets.lock().unwrap().get(id.as_str()).cloned())
        }
    }

    fn quota_config(overflow: &[&str]) -> Config {
        Config {
            initial_rate: Some(1000.0),
            burst: Duration::from_secs(1),
            permit_wait: Duration::from_secs(5),
            overflow_groups: overflow
                .iter()
                .map(|g| PackagingGroupId::parse(g).unwrap())
                .collect(),
            ..slow_config()
        }
    }

    /// `n` messages for new sources, from `first` on.
    fn sources(first: usize, n: usize) -> Vec<SqsMessage> {
        (first..first + n)
            .map(|i| {
                let mut m = batch(1).remove(0);
                m.message_id = Some(format!("m{i}"));
                m.body = Some(format!(r#"{{"sourceArn":"arn:aws:s3:::bucket/{i}.m3u8"}}"#));
                m
            })
            .collect()
    }

    fn code(outcome: &Outcome) -> &str {
        match outcome {
            Outcome::Retry(f, _) | Outcome::Permanent(f) | Outcome::DeadLettered(f) => &f.code,
            Outcome::Created { .. } => "Created",
            Outcome::AlreadyExists { .. } => "AlreadyExists",
            Outcome::Skipped(_) => "Skipped",
        }
    }

    fn codes(outcomes: &[Outcome]) -> BTreeMap<&str, usize> {
        let mut codes = BTreeMap::new();
        for outcome in outcomes {
            *codes.entry(code(outcome)).or_default() += 1;
        }
        codes
    }

    #[tokio::test]
    async fn a_full_group_sends_messages_back_until_quota_max_refusals_then_dead_letters_them() {
        let ingestor = Ingestor::new(Groups::new(0), quota_config(&[]));
        let far = || Instant::now() + Duration::from_secs(30);
        let outcomes = ingestor.process_batch(&sources(0, 10), far()).await;
        // Two refusals come back after QUOTA_REDELIVERY_SECONDS; from the third on the group
        // is taken as full and the messages go to the dead-letter queue with the reason.
        let quota_retries = outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Retry(_, Redelivery::Quota)))
            .count();
        assert_eq!(quota_retries, 2, "{outcomes:?}");
        let full: Vec<&Failure> = outcomes
            .iter()
            .filter_map(|o| match o {
                Outcome::Permanent(f) if f.code == "AssetQuotaExceeded" => Some(f),
                _ => None,
            })
            .collect();
        assert_eq!(full.len(), 8, "{outcomes:?}");
        assert!(
            full[0].reason.contains("packaging group g is full")
                && full[0].reason.contains("QUOTA_MAX_REFUSALS 3")
                && full[0].reason.contains("Resource limit exceeded"),
            "{}",
            full[0].reason
        );
        // Room again (quota raised): an asset made in the group clears its count, so a group
        // full again later gets its QUOTA_MAX_REFUSALS again.
        ingestor.api.quota.store(1, Ordering::Relaxed);
        let made = ingestor.process_batch(&sources(10, 1), far()).await;
        assert_eq!(codes(&made), BTreeMap::from([("Created", 1)]));
        let again = ingestor.process_batch(&sources(11, 3), far()).await;
        assert_eq!(
            codes(&again),
            BTreeMap::from([("AssetQuotaExceeded", 1), ("TooManyRequestsException", 2)])
        );
    }

    #[tokio::test]
    async fn a_full_group_overflows_into_the_next_and_redeliveries_find_the_asset_there() {
        let ingestor = Ingestor::new(Groups::new(3), quota_config(&["g2", "g3"]));
        let far = || Instant::now() + Duration::from_secs(30);
        let outcomes = ingestor.process_batch(&sources(0, 10), far()).await;
        // Three assets per group; the tenth finds every group full and comes back later.
        assert_eq!(
            (
                ingestor.api.in_group("g"),
                ingestor.api.in_group("g2"),
                ingestor.api.in_group("g3")
            ),
            (3, 3, 3)
        );
        assert_eq!(
            codes(&outcomes),
            BTreeMap::from([("Created", 9), ("TooManyRequestsException", 1)])
        );
        let landed: BTreeSet<&str> = outcomes
            .iter()
            .flat_map(|o| o.assets())
            .map(|r| r.asset.packaging_group_id.as_str())
            .collect();
        assert_eq!(landed, BTreeSet::from(["g", "g2", "g3"]));
        assert!(outcomes.iter().flat_map(|o| o.assets()).all(|r| r
            .request
            .packaging_group_id
            .as_str()
            == "g"));
        // Known full, g and g2 are skipped: new messages try g3 alone.
        ingestor.api.creates.lock().unwrap().clear();
        let more = ingestor.process_batch(&sources(10, 3), far()).await;
        assert_eq!(
            *ingestor.api.creates.lock().unwrap(),
            ["g3", "g3", "g3"],
            "{more:?}"
        );
        assert_eq!(
            codes(&more),
            BTreeMap::from([("AssetQuotaExceeded", 2), ("TooManyRequestsException", 1)])
        );
        // A redelivered message whose asset landed in g2 finds it there: no conflict.
        let in_g2 = outcomes
            .iter()
            .position(|o| {
                o.assets()
                    .iter()
                    .any(|r| r.asset.packaging_group_id == "g2")
            })
            .unwrap();
        let mut again = sources(in_g2, 1);
        again[0]
            .attributes
            .insert("ApproximateReceiveCount".into(), "2".into());
        let redelivered = ingestor.process_batch(&again, far()).await;
        let [Outcome::AlreadyExists { assets }] = &redelivered[..] else {
            panic!("{redelivered:?}");
        };
        assert_eq!(assets[0].asset.packaging_group_id, "g2");
        assert!(assets[0].found);
    }

    /// An event bus that records each call and fails the entries of the given assets.
    #[derive(Default)]
    struct Bus {
        calls: Mutex<Vec<Vec<AssetEvent>>>,
        fail: BTreeSet<String>,
        hang: bool,
    }

    #[async_trait::async_trait]
    impl EventBus for &'static Bus {
        async fn put(
            &self,
            events: &[AssetEvent],
        ) -> Result<Vec<Result<(), PublishError>>, PublishError> {
            self.calls.lock().unwrap().push(events.to_vec());
            if self.hang {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            Ok(events
                .iter()
                .map(|e| {
                    if self.fail.contains(&e.asset_id) {
                        Err(PublishError {
                            code: "InternalFailure".into(),
                            message: "try again".into(),
                        })
                    } else {
                        Ok(())
                    }
                })
                .collect())
        }
    }

    fn leak(bus: Bus) -> &'static Bus {
        Box::leak(Box::new(bus))
    }

    #[tokio::test]
    async fn every_asset_gets_an_event_in_calls_of_ten_and_a_failed_entry_retries_its_message() {
        let probe = Ingestor::new(Groups::new(100), quota_config(&[]));
        let records = sources(0, 25);
        let ids: Vec<String> = records
            .iter()
            .map(|r| {
                parse_body(r.body.as_deref().unwrap(), &probe.defaults)
                    .unwrap()
                    .requests[0]
                    .id
                    .to_string()
            })
            .collect();
        let bus = leak(Bus {
            fail: BTreeSet::from([ids[7].clone()]),
            ..Bus::default()
        });
        let ingestor = Ingestor::new(Groups::new(100), quota_config(&[])).with_events(bus);
        let deadline = Instant::now() + Duration::from_secs(30);
        let response = ingestor.handle_batch(&records, deadline).await.unwrap();
        let sizes: Vec<usize> = bus.calls.lock().unwrap().iter().map(Vec::len).collect();
        assert_eq!(sizes.iter().sum::<usize>(), 25);
        assert!(sizes.iter().all(|&n| n <= MAX_ENTRIES), "{sizes:?}");
        assert_eq!(sizes.len(), 3);
        // Only the message whose event failed is redelivered; its asset exists.
        assert_eq!(
            response
                .batch_item_failures
                .iter()
                .map(|f| f.item_identifier.as_str())
                .collect::<Vec<_>>(),
            ["m7"]
        );
        let events: Vec<AssetEvent> = bus.calls.lock().unwrap().concat();
        let first = events.iter().find(|e| e.message_id == "m0").unwrap();
        assert_eq!(first.asset_id, ids[0]);
        assert_eq!(first.packaging_group_id, "g");
        assert_eq!(first.requested_packaging_group_id, "g");
        assert_eq!(first.source_arn, "arn:aws:s3:::bucket/0.m3u8");
        assert_eq!(first.envelope, "request");
        assert!(!first.found && first.arn.is_some());
        // Redelivered, the asset is found and its event goes out, marked as found.
        bus.calls.lock().unwrap().clear();
        let mut again = records[7..8].to_vec();
        again[0]
            .attributes
            .insert("ApproximateReceiveCount".into(), "2".into());
        let ok = Ingestor::new(Groups::new(100), quota_config(&[]));
        ok.api
            .assets
            .lock()
            .unwrap()
            .extend(ingestor.api.assets.lock().unwrap().clone());
        let bus2 = leak(Bus::default());
        let ok = ok.with_events(bus2);
        let response = ok.handle_batch(&again, deadline).await.unwrap();
        assert!(response.batch_item_failures.is_empty());
        let events = bus2.calls.lock().unwrap().concat();
        assert_eq!(events.len(), 1);
        assert!(events[0].found && events[0].message_id == "m7");
    }

    #[tokio::test]
    async fn a_fifo_message_whose_event_failed_keeps_the_rest_of_its_group_back() {
        let mut records = fifo_batch(1, 3);
        let probe = Ingestor::new(Groups::new(100), quota_config(&[]));
        let second = parse_body(records[1].body.as_deref().unwrap(), &probe.defaults)
            .unwrap()
            .requests[0]
            .id
            .to_string();
        let bus = leak(Bus {
            fail: BTreeSet::from([second]),
            ..Bus::default()
        });
        let ingestor = Ingestor::new(Groups::new(100), quota_config(&[])).with_events(bus);
        records.iter_mut().for_each(|r| {
            r.attributes
                .insert("ApproximateReceiveCount".into(), "1".into());
        });
        let outcomes = ingestor
            .process_batch(&records, Instant::now() + Duration::from_secs(30))
            .await;
        let outcomes = ingestor
            .publish(&records, outcomes, Instant::now() + Duration::from_secs(5))
            .await;
        let codes: Vec<&str> = outcomes.iter().map(code).collect();
        assert_eq!(
            codes,
            ["Created", "EventNotPublished", "EarlierMessageFailed"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_bus_that_does_not_answer_cannot_hold_the_invocation_past_its_deadline() {
        let bus = leak(Bus {
            hang: true,
            ..Bus::default()
        });
        let ingestor = Ingestor::new(Groups::new(100), quota_config(&[])).with_events(bus);
        let start = Instant::now();
        let deadline = start + Duration::from_secs(3);
        let response = ingestor
            .handle_batch(&sources(0, 5), deadline)
            .await
            .unwrap();
        assert!(Instant::now() <= deadline, "{:?}", Instant::now() - start);
        // Made, but not announced: all five come back, to be found and announced.
        assert_eq!(response.batch_item_failures.len(), 5);
        assert_eq!(ingestor.api.in_group("g"), 5);
    }
}
