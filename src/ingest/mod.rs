//! One SQS batch in, one outcome per message, one `SqsBatchResponse` out.
//!
//! The batch runs in three steps: every message is processed ([`Ingestor::process_batch`]),
//! the messages to retry that have no delivery or visibility time left are sent to the
//! dead-letter queue with their reason, and the rest get the visibility timeout the
//! [`crate::redelivery`] policy gives them. Each step is bounded by the invocation's deadline.
//!
//! This module holds the batch and the outcomes; the steps' details are in its parts: the
//! calls of one message through the rate limiter (`calls`), the `Asset Created` events
//! (`publish`), dead letters and the receive budget (`letters`), and the visibility timeout of
//! each message handed back (`handback`).

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};
use futures::{FutureExt, StreamExt};
use lambda_runtime::LambdaEvent;
use tokio::time::Instant;
use tracing::{field, Instrument};

use crate::config::Config;
use crate::drain::DrainGauge;
use crate::envelope::parse_body;
use crate::events::EventBus;
use crate::limiter::{LimiterConfig, RateLimiter};
use crate::mediapackage::{ApiError, Asset, AssetApi, ErrorKind};
use crate::message::{AssetRequest, Defaults, InvalidMessage, PackagingGroupId, Refused};
use crate::metrics::{BatchMetrics, CallCounts, Emf};
pub use crate::redelivery::Redelivery;
use crate::redelivery::{deadline_margin, fits_an_attempt, Away, MIN_ATTEMPT};
use crate::sqs::QueueApi;

mod calls;
mod handback;
mod letters;
mod publish;

use calls::Calls;
pub use handback::Returns;

/// How long a queue without a known `maxReceiveCount` goes before it is asked again.
const LIMIT_RETRY: Duration = Duration::from_secs(60);

/// Kept free at the very end of the invocation for the runtime to send the response.
const RESPONSE_TIME: Duration = Duration::from_millis(50);

/// The longest a batch waits for a read of its queue's depth.
const DEPTH_READ_WAIT: Duration = Duration::from_secs(1);

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
    /// The batch's messages: what this instance holds of its queue's backlog.
    holding: u64,
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
    /// The messages of the batch ([`Stops::holding`]).
    holding: u64,
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
            holding: 1,
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
    /// Each source queue's `maxReceiveCount`, whether the queue answered, and when it was read.
    /// A known one is kept; none (no redrive policy, or the read failed) is asked again after
    /// [`LIMIT_RETRY`], so a policy added later is seen.
    receive_limits: Mutex<HashMap<String, ReceiveLimit>>,
    warned_short_timeout: AtomicBool,
    events: Option<Box<dyn EventBus>>,
    counts: CallCounts,
    emf: Option<Emf>,
    /// Per packaging group: CreateAsset calls refused for the asset quota since the last asset
    /// made in it, and when the last one was.
    quota_refusals: Mutex<HashMap<PackagingGroupId, (u32, Instant)>>,
    /// The messages this instance handed back for want of a slot, to call back when it has
    /// room.
    away: Away,
    /// When this instance's last invocation ended: the idle gap before the next sizes its
    /// call-back ([`crate::redelivery::IDLE_CALL_BACK`]).
    last_ended: Mutex<Option<Instant>>,
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
            initial_window: config.initial_window,
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
            away: Away::default(),
            last_ended: Mutex::default(),
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
        let idle = self.idle_before(started);
        let report = deadline.checked_sub(RESPONSE_TIME).unwrap_or(deadline);
        let outcomes = self.process_batch(records, deadline).await;
        // Events take at most half of what is left, so dead letters and delays keep the rest.
        let now = Instant::now();
        let events_until = now + report.saturating_duration_since(now) / 2;
        let outcomes = self.publish(records, outcomes, events_until).await;
        let outcomes = self.retire_exhausted(records, outcomes, report).await;
        let response = batch_response(records, &outcomes);
        let mut returns = Returns::default();
        if response.is_ok() {
            self.delay_redeliveries(records, &outcomes, report).await;
            returns = self.call_back(records, report, idle).await;
        }
        *self.last_ended.lock().expect("last ended") = Some(Instant::now());
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
            called_back = returns.called_back,
            pushed_back = returns.pushed_back,
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
            holding: 0,
        }
    }

    /// Processes every record and returns one outcome per record in record order. At most
    /// `MAX_CONCURRENCY` messages run at once; the messages of one FIFO message group run one
    /// after another, and after the first failure in a group the rest of that group are kept
    /// back without calling the API. Two messages for the same asset make one call. Bodies are
    /// parsed, and poison ones dead-lettered, whatever the time left; no API attempt starts
    /// unless one can finish before `deadline` less the margin, and every call is cut there.
    pub async fn process_batch(&self, records: &[SqsMessage], deadline: Instant) -> Vec<Outcome> {
        let stops = Stops {
            holding: records.len() as u64,
            ..self.stops(deadline)
        };
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
        // The queue's depth is followed beside the work, from the first batch: the drain rate
        // then counts what the API's burst let through before its first throttle. (Read only
        // from the first throttle on, the rate came out lower and the spreads longer: B of
        // `make bench` drained in 1.04x to 1.17x the ideal instead of 1.00x to 1.07x.)
        // Polled first, the read is claimed before any call asks whether its queue is warming up.
        let until = (Instant::now() + DEPTH_READ_WAIT).min(stops.last_start);
        let depths = self.read_depths(records, until);
        let work = futures::future::join(depths, work);
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
        let turn = Turn {
            queue_arn: record.event_source_arn.as_deref(),
            receives,
            fifo: fifo_group(record).is_some(),
            several: parsed.requests.len() > 1,
            last_start: stops.last_start,
            hard_stop: stops.hard_stop,
            holding: stops.holding,
            // A booking reaches no further than half of the `BUDGETED_REACH` backoff ceilings a
            // hand-back may reach before the queue's drain rate is known: a message the
            // instance cannot serve soon comes back soon, to be booked again from what the
            // limiter has learned by then.
            horizon: (backoff
                .ceiling(receives)
                .saturating_mul(crate::redelivery::BUDGETED_REACH)
                / 2)
            .min(backoff.cap),
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

/// A source queue's `maxReceiveCount` as last read ([`Ingestor::receive_limit`]).
#[derive(Debug, Clone, Copy)]
struct ReceiveLimit {
    /// `None`: no redrive policy, or the read failed.
    max: Option<u32>,
    /// Whether the queue answered the read.
    answered: bool,
    read_at: Instant,
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
mod tests;
