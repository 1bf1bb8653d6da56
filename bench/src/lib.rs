//! The drain benchmark's machinery: an in-memory queue with SQS semantics, an event source
//! mapping that feeds it to function instances, and the strategies compared.
//!
//! The queue keeps what matters for the comparison: a message received becomes invisible for
//! the visibility timeout, comes back with its `ApproximateReceiveCount` raised unless deleted,
//! and `ChangeMessageVisibility` moves its return. With a redrive policy (`maxReceiveCount`), a
//! message received that many times is moved to the dead-letter queue on its next receive, as
//! SQS does; the function's own dead letters are counted apart. A FIFO queue delivers a message
//! group's messages in order, and nothing of a group while one of its messages is in flight.
//! The mapping runs one poller per instance: receive up to 10 visible messages, invoke, delete
//! what the response does not list, and bill the invocation's duration. An invocation that
//! errors or outlives its timeout deletes nothing.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsMessage};
use aws_sdk_mediapackagevod::config::retry::{RetryConfig, RetryPartition};
use aws_sdk_mediapackagevod::config::timeout::TimeoutConfig;
use aws_sdk_mediapackagevod::config::{BehaviorVersion, Credentials, Region};
use mpvod_ingest::config::Config;
use mpvod_ingest::ingest::Ingestor;
use mpvod_ingest::limiter::LimiterStats;
use mpvod_ingest::mediapackage::{ErrorKind, SdkAssetApi};
use mpvod_ingest::message::{AssetRequest, Defaults};
use mpvod_ingest::sqs::{DeadLetter, QueueApi, QueueError, VisibilityChange};
use tokio::time::Instant;

pub mod matrix;
pub mod process;
pub mod sqs;

/// Upper bounds, in seconds, of the trace's buckets of return times (the last takes the rest).
const RETURN_BUCKETS: [f64; 7] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, f64::INFINITY];

/// The queue ARN every simulated message of a standard queue carries.
pub const QUEUE_ARN: &str = "arn:aws:sqs:us-east-1:123456789012:mediapackage-ingest";
/// The queue ARN every simulated message of a FIFO queue carries.
pub const FIFO_QUEUE_ARN: &str = "arn:aws:sqs:us-east-1:123456789012:mediapackage-ingest.fifo";

struct Message {
    id: String,
    body: String,
    group: Option<String>,
    seq: u64,
    visible_at: Instant,
    receives: u32,
    receipt: Option<String>,
    first_receive_ms: Option<u64>,
}

#[derive(Default)]
struct QueueState {
    messages: BTreeMap<String, Message>,
    receipts: BTreeMap<String, String>,
    max_receives: u32,
    receipt_seq: u64,
    send_seq: u64,
    /// Receives of every message deleted or dead-lettered, summed.
    settled_receives: u64,
    settled: u64,
    /// Moved to the dead-letter queue by the redrive policy, by message id.
    redriven: Vec<String>,
    /// Sent to the dead-letter queue by the function: message id and `ErrorCode`.
    dead_letters: Vec<(String, String)>,
}

/// An in-memory queue with SQS visibility, redrive and FIFO semantics.
pub struct SimQueue {
    state: Mutex<QueueState>,
    visibility_timeout: Duration,
    visibility_changes: AtomicU64,
    max_receive_count: Option<u32>,
    fifo: bool,
}

fn epoch_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl SimQueue {
    /// An empty standard queue whose received messages stay invisible for
    /// `visibility_timeout`, without a redrive policy.
    pub fn new(visibility_timeout: Duration) -> Arc<Self> {
        Self::with_redrive(visibility_timeout, None, false)
    }

    /// An empty queue, FIFO or not, with a redrive policy of `max_receive_count` if given.
    pub fn with_redrive(
        visibility_timeout: Duration,
        max_receive_count: Option<u32>,
        fifo: bool,
    ) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(QueueState::default()),
            visibility_timeout,
            visibility_changes: AtomicU64::new(0),
            max_receive_count,
            fifo,
        })
    }

    /// Enqueues a message.
    pub fn send(&self, id: impl Into<String>, body: impl Into<String>) {
        self.send_to_group(id, body, None);
    }

    /// Enqueues a message in a FIFO message group.
    pub fn send_to_group(
        &self,
        id: impl Into<String>,
        body: impl Into<String>,
        group: Option<String>,
    ) {
        let id = id.into();
        let mut state = self.state.lock().unwrap();
        state.send_seq += 1;
        let seq = state.send_seq;
        state.messages.insert(
            id.clone(),
            Message {
                id,
                body: body.into(),
                group,
                seq,
                visible_at: Instant::now(),
                receives: 0,
                receipt: None,
                first_receive_ms: None,
            },
        );
    }

    /// The messages receivable now, in the order SQS would hand them out: oldest-visible first
    /// on a standard queue; on a FIFO queue, each group's messages in order, none of a group
    /// with a message in flight.
    fn receivable(&self, state: &QueueState, now: Instant, max: usize) -> Vec<String> {
        if !self.fifo {
            let mut visible: Vec<(Instant, String)> = state
                .messages
                .values()
                .filter(|m| m.visible_at <= now)
                .map(|m| (m.visible_at, m.id.clone()))
                .collect();
            visible.sort();
            visible.truncate(max);
            return visible.into_iter().map(|(_, id)| id).collect();
        }
        let mut by_seq: Vec<&Message> = state.messages.values().collect();
        by_seq.sort_by_key(|m| m.seq);
        let mut blocked: HashSet<&str> = HashSet::new();
        let mut out = Vec::new();
        for m in by_seq {
            let group = m.group.as_deref().unwrap_or("");
            if blocked.contains(group) {
                continue;
            }
            if m.visible_at > now {
                blocked.insert(group);
                continue;
            }
            if out.len() < max {
                out.push(m.id.clone());
            }
        }
        out
    }

    /// Receives up to `max` messages as Lambda event records. A message already received
    /// `maxReceiveCount` times goes to the dead-letter queue instead.
    pub fn receive(&self, max: usize) -> Vec<SqsMessage> {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap();
        if let Some(limit) = self.max_receive_count {
            let over: Vec<String> = state
                .messages
                .values()
                .filter(|m| m.visible_at <= now && m.receives >= limit)
                .map(|m| m.id.clone())
                .collect();
            for id in over {
                let m = state.messages.remove(&id).expect("listed");
                if let Some(receipt) = m.receipt {
                    state.receipts.remove(&receipt);
                }
                state.settled_receives += u64::from(m.receives);
                state.settled += 1;
                state.redriven.push(id);
            }
        }
        let visible = self.receivable(&state, now, max);
        let arn = if self.fifo { FIFO_QUEUE_ARN } else { QUEUE_ARN };
        let mut records = Vec::with_capacity(visible.len());
        for id in visible {
            state.receipt_seq += 1;
            let receipt = format!("rh-{}-{}", id, state.receipt_seq);
            let vt = self.visibility_timeout;
            let message = state.messages.get_mut(&id).expect("listed");
            let old_receipt = message.receipt.replace(receipt.clone());
            message.receives += 1;
            message.visible_at = now + vt;
            let first = *message.first_receive_ms.get_or_insert_with(epoch_ms);
            let mut record = SqsMessage::default();
            record.message_id = Some(message.id.clone());
            record.receipt_handle = Some(receipt.clone());
            record.body = Some(message.body.clone());
            record.event_source = Some("aws:sqs".into());
            record.event_source_arn = Some(arn.into());
            if let Some(group) = &message.group {
                record
                    .attributes
                    .insert("MessageGroupId".into(), group.clone());
            }
            record.aws_region = Some("us-east-1".into());
            record.attributes.insert(
                "ApproximateReceiveCount".into(),
                message.receives.to_string(),
            );
            record
                .attributes
                .insert("ApproximateFirstReceiveTimestamp".into(), first.to_string());
            let receives = message.receives;
            if let Some(old) = old_receipt {
                state.receipts.remove(&old);
            }
            state.max_receives = state.max_receives.max(receives);
            state.receipts.insert(receipt, id);
            records.push(record);
        }
        records
    }

    /// Deletes the message behind `receipt`, if that receipt is still current.
    pub fn delete(&self, receipt: &str) {
        let mut state = self.state.lock().unwrap();
        if let Some(id) = state.receipts.remove(receipt) {
            if let Some(m) = state.messages.remove(&id) {
                state.settled_receives += u64::from(m.receives);
                state.settled += 1;
            }
        }
    }

    /// The mean receives of the messages settled (deleted or dead-lettered).
    pub fn mean_receives(&self) -> f64 {
        let state = self.state.lock().unwrap();
        state.settled_receives as f64 / state.settled.max(1) as f64
    }

    /// Message ids the redrive policy moved to the dead-letter queue.
    pub fn redriven(&self) -> Vec<String> {
        self.state.lock().unwrap().redriven.clone()
    }

    /// Message ids and error codes the function sent to the dead-letter queue.
    pub fn dead_letters(&self) -> Vec<(String, String)> {
        self.state.lock().unwrap().dead_letters.clone()
    }

    /// Messages not yet deleted.
    pub fn len(&self) -> usize {
        self.state.lock().unwrap().messages.len()
    }

    /// Whether every message was deleted.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most times any message was received.
    pub fn max_receives(&self) -> u32 {
        self.state.lock().unwrap().max_receives
    }

    /// ChangeMessageVisibility calls answered.
    pub fn visibility_changes(&self) -> u64 {
        self.visibility_changes.load(Ordering::Relaxed)
    }
}

/// The function's SQS port, served by the simulated queue.
pub struct SimQueuePort(pub Arc<SimQueue>);

#[async_trait]
impl QueueApi for SimQueuePort {
    /// Without a redrive policy there is no dead-letter queue: a permanent failure stays
    /// reported. With one, the letter is kept (the function then acknowledges the message).
    async fn dead_letter(&self, _queue_arn: &str, letter: &DeadLetter) -> Result<(), QueueError> {
        if self.0.max_receive_count.is_none() {
            return Err(QueueError {
                code: "NoDeadLetterQueue".into(),
                message: "the simulated queue has no dead-letter queue".into(),
            });
        }
        self.0
            .state
            .lock()
            .unwrap()
            .dead_letters
            .push((letter.message_id.clone(), letter.code.clone()));
        Ok(())
    }

    async fn max_receive_count(&self, _queue_arn: &str) -> Result<Option<u32>, QueueError> {
        Ok(self.0.max_receive_count)
    }

    async fn change_visibility(
        &self,
        _queue_arn: &str,
        changes: &[VisibilityChange],
    ) -> Vec<Result<(), QueueError>> {
        let now = Instant::now();
        let queue = &self.0;
        queue
            .visibility_changes
            .fetch_add(changes.len() as u64, Ordering::Relaxed);
        let mut state = queue.state.lock().unwrap();
        changes
            .iter()
            .map(|change| {
                let id = state.receipts.get(&change.receipt_handle).cloned();
                match id.and_then(|id| state.messages.get_mut(&id)) {
                    Some(message) => {
                        message.visible_at = now + Duration::from_secs(change.seconds as u64);
                        Ok(())
                    }
                    None => Err(QueueError {
                        code: "ReceiptHandleIsInvalid".into(),
                        message: "unknown receipt handle".into(),
                    }),
                }
            })
            .collect()
    }

    async fn depth(&self, _queue_arn: &str) -> Result<u64, QueueError> {
        Ok(self.0.len() as u64)
    }
}

/// Where the event source mapping polls: the in-memory [`SimQueue`], or a real SQS API
/// ([`sqs::SqsSource`]).
#[async_trait]
pub trait Source: Send + Sync {
    /// Up to `max` messages visible now, as Lambda event records; none if none is visible.
    async fn receive(&self, max: usize) -> Vec<SqsMessage>;
    /// Deletes the messages behind `receipts`: those an invocation did not report.
    async fn delete(&self, receipts: &[String]);
    /// Whether no message is left, visible or in flight.
    async fn is_empty(&self) -> bool;
    /// A line on the queue's state, printed every few seconds under `BENCH_TRACE`.
    fn trace(&self) -> Option<String> {
        None
    }
}

#[async_trait]
impl Source for SimQueue {
    async fn receive(&self, max: usize) -> Vec<SqsMessage> {
        SimQueue::receive(self, max)
    }

    async fn delete(&self, receipts: &[String]) {
        for receipt in receipts {
            SimQueue::delete(self, receipt);
        }
    }

    async fn is_empty(&self) -> bool {
        SimQueue::is_empty(self)
    }

    fn trace(&self) -> Option<String> {
        let state = self.state.lock().unwrap();
        let now = Instant::now();
        let visible = state
            .messages
            .values()
            .filter(|m| m.visible_at <= now)
            .count();
        // When the invisible messages come back, in doubling buckets of seconds.
        let mut returns = [0usize; RETURN_BUCKETS.len()];
        for m in state.messages.values().filter(|m| m.visible_at > now) {
            let secs = (m.visible_at - now).as_secs_f64();
            returns[bucket(RETURN_BUCKETS.into_iter(), secs)] += 1;
        }
        let returns: Vec<String> = RETURN_BUCKETS
            .iter()
            .zip(returns)
            .map(|(upper, n)| {
                if upper.is_finite() {
                    format!("<{upper}s:{n}")
                } else {
                    format!(">={}s:{n}", RETURN_BUCKETS[RETURN_BUCKETS.len() - 2])
                }
            })
            .collect();
        Some(format!(
            "left {} visible {visible} returning {}",
            state.messages.len(),
            returns.join(" ")
        ))
    }
}

/// One function instance: an invocation takes a batch and a deadline.
#[async_trait]
pub trait Function: Send + Sync {
    /// Handles one batch; `Err` fails the whole invocation.
    async fn invoke(
        &self,
        records: &[SqsMessage],
        deadline: Instant,
    ) -> Result<SqsBatchResponse, String>;

    /// The instance's own rate limiter, if it has one: traced under `BENCH_TRACE`.
    fn limiter(&self) -> Option<LimiterStats> {
        None
    }
}

/// The event source mapping's settings.
#[derive(Debug, Clone, Copy)]
pub struct Mapping {
    /// Records per invocation (10 by default on SQS).
    pub batch_size: usize,
    /// How long a poller gathers messages for a batch before it invokes with fewer than
    /// `batch_size` (`MaximumBatchingWindowInSeconds`; zero: invoke with what one poll gets).
    pub batching_window: Duration,
    /// The function timeout.
    pub function_timeout: Duration,
    /// Give up after this long.
    pub give_up_after: Duration,
    /// How long after the one before each poller starts: zero for instances that all start
    /// at once, more for instances whose cold starts are spread out.
    pub stagger: Duration,
}

/// What a drain cost.
#[derive(Debug, Clone, Copy, Default)]
pub struct DrainReport {
    /// From the first poll until the queue was empty (or the give-up time).
    pub drain_time: Duration,
    /// Whether the queue was emptied.
    pub drained: bool,
    /// Billed function time: the sum of invocation durations, each rounded up to 1 ms.
    pub billed: Duration,
    /// Invocations made.
    pub invocations: u64,
    /// Invocations that failed or timed out.
    pub failed_invocations: u64,
    /// Invocations that outlived the function timeout.
    pub timeouts: u64,
}

/// The index of the first of `uppers` (ascending) that `value` is below; the last takes the rest.
fn bucket<T: PartialOrd>(uppers: impl ExactSizeIterator<Item = T>, value: T) -> usize {
    let last = uppers.len() - 1;
    uppers
        .into_iter()
        .position(|upper| value < upper)
        .unwrap_or(last)
}

/// Invocation lengths the trace groups billed time by: below each bound, in milliseconds.
const LENGTHS: [(u128, &str); 5] = [
    (10, "<10ms"),
    (100, "10-100ms"),
    (300, "100-300ms"),
    (500, "300-500ms"),
    (u128::MAX, ">=500ms"),
];

/// A batch for one invocation: what one poll gets, or, with a batching window, what polls get
/// until the batch is full or the window ends (an empty poll waits a little before the next).
async fn gather(queue: &dyn Source, mapping: &Mapping) -> Vec<SqsMessage> {
    let mut records = queue.receive(mapping.batch_size).await;
    if mapping.batching_window.is_zero() || records.is_empty() {
        return records;
    }
    let until = Instant::now() + mapping.batching_window;
    while records.len() < mapping.batch_size && Instant::now() < until {
        let more = queue.receive(mapping.batch_size - records.len()).await;
        if more.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        records.extend(more);
    }
    records
}

/// How one invocation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// It answered; what it did not report was deleted.
    Answered,
    /// It returned an error: nothing deleted.
    Failed,
    /// It outlived the function timeout: nothing deleted.
    TimedOut,
}

/// Invokes `function` with `records` as the event source mapping does: under the function
/// timeout, then deletes the messages the response does not list. Returns how it ended and how
/// long it ran.
pub async fn invoke_batch(
    queue: &dyn Source,
    function: &dyn Function,
    records: &[SqsMessage],
    mapping: &Mapping,
) -> (Ending, Duration, usize) {
    let began = Instant::now();
    let deadline = began + mapping.function_timeout;
    let result = tokio::time::timeout_at(deadline, function.invoke(records, deadline)).await;
    let elapsed = began.elapsed();
    let mut deleted = 0;
    let ending = match result {
        Ok(Ok(response)) => {
            let failed: HashSet<String> = response
                .batch_item_failures
                .into_iter()
                .map(|f| f.item_identifier)
                .collect();
            let done: Vec<String> = records
                .iter()
                .filter(|r| !failed.contains(r.message_id.as_deref().unwrap_or("")))
                .filter_map(|r| r.receipt_handle.clone())
                .collect();
            queue.delete(&done).await;
            deleted = done.len();
            Ending::Answered
        }
        Ok(Err(_)) => Ending::Failed,
        Err(_) => Ending::TimedOut,
    };
    (ending, elapsed, deleted)
}

/// What [`serve`] has done so far.
#[derive(Debug, Default)]
pub struct ServeCounts {
    /// Invocations made.
    pub invocations: AtomicU64,
    /// Invocations that failed or timed out.
    pub failed: AtomicU64,
}

/// Feeds `queue` to `instances` as the event source mapping does, for as long as the future
/// runs (drop it to stop): one poller per instance.
pub async fn serve(
    queue: Arc<dyn Source>,
    instances: Vec<Arc<dyn Function>>,
    mapping: Mapping,
    counts: Arc<ServeCounts>,
) {
    let pollers = instances.into_iter().enumerate().map(|(index, function)| {
        let (queue, counts) = (queue.clone(), counts.clone());
        async move {
            tokio::time::sleep(mapping.stagger * index as u32).await;
            loop {
                let records = gather(queue.as_ref(), &mapping).await;
                if records.is_empty() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                let (ending, _, _) =
                    invoke_batch(queue.as_ref(), function.as_ref(), &records, &mapping).await;
                counts.invocations.fetch_add(1, Ordering::Relaxed);
                if ending != Ending::Answered {
                    counts.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });
    futures::future::join_all(pollers).await;
}

/// Feeds `queue` to `instances` the way the Lambda event source mapping does until the queue is
/// empty, and reports the cost: one poller per instance (the mapping's maximum concurrency)
/// gathers a batch, invokes, deletes what the response does not list and bills the
/// invocation's duration; an invocation that errors or outlives its timeout deletes nothing.
pub async fn drain(
    queue: Arc<dyn Source>,
    instances: Vec<Arc<dyn Function>>,
    mapping: Mapping,
) -> DrainReport {
    let start = Instant::now();
    let stop = start + mapping.give_up_after;
    let mut pollers = Vec::new();
    let trace = std::env::var("BENCH_TRACE").is_ok();
    // Under BENCH_TRACE: invocations, records and billed seconds by invocation length.
    let histogram: Arc<Mutex<[(u64, usize, f64); LENGTHS.len()]>> = Arc::default();
    // Under BENCH_TRACE: records of the invocations ended, and of them those deleted, since
    // the last line.
    let handled: Arc<(AtomicU64, AtomicU64)> = Arc::default();
    // Under BENCH_TRACE: milliseconds the pollers found nothing visible (idle, short of work)
    // and spent in invocations that ended (busy), since the last line.
    let idle: Arc<AtomicU64> = Arc::default();
    let busy: Arc<AtomicU64> = Arc::default();
    // Under BENCH_TRACE: the limiters traced every second.
    let traced = instances.clone();
    for (index, function) in instances.into_iter().enumerate() {
        let idle = idle.clone();
        let busy = busy.clone();
        let queue = queue.clone();
        let histogram = histogram.clone();
        let handled = handled.clone();
        pollers.push(tokio::spawn(async move {
            let mut report = DrainReport::default();
            tokio::time::sleep(mapping.stagger * index as u32).await;
            while !queue.is_empty().await && Instant::now() < stop {
                let records = gather(queue.as_ref(), &mapping).await;
                if records.is_empty() {
                    if trace {
                        idle.fetch_add(20, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                let (ending, elapsed, deleted) =
                    invoke_batch(queue.as_ref(), function.as_ref(), &records, &mapping).await;
                if trace {
                    busy.fetch_add(elapsed.as_millis() as u64, Ordering::Relaxed);
                    handled.0.fetch_add(records.len() as u64, Ordering::Relaxed);
                    handled.1.fetch_add(deleted as u64, Ordering::Relaxed);
                    let b = bucket(LENGTHS.iter().map(|(upto, _)| *upto), elapsed.as_millis());
                    let mut h = histogram.lock().unwrap();
                    h[b].0 += 1;
                    h[b].1 += records.len();
                    h[b].2 += elapsed.as_secs_f64();
                }
                report.billed += Duration::from_millis(elapsed.as_micros().div_ceil(1000) as u64);
                report.invocations += 1;
                match ending {
                    Ending::Answered => {}
                    Ending::Failed => report.failed_invocations += 1,
                    Ending::TimedOut => {
                        report.failed_invocations += 1;
                        report.timeouts += 1;
                    }
                }
            }
            report
        }));
    }
    let ticker = std::env::var("BENCH_TRACE").is_ok().then(|| {
        let queue = queue.clone();
        let idle = idle.clone();
        let busy = busy.clone();
        tokio::spawn(async move {
            for tick in 1u64.. {
                tokio::time::sleep(Duration::from_secs(1)).await;
                // Each instance's limiter: rate/throttles/cuts.
                let limiters: Vec<String> = traced
                    .iter()
                    .filter_map(|f| f.limiter())
                    .map(|s| format!("{:.1}/{}/{}", s.rate, s.throttles, s.cuts))
                    .collect();
                // The baselines have no limiter of their own: no line for them.
                if !limiters.is_empty() {
                    eprintln!(
                        "t={:>5.1}s limiters {}",
                        start.elapsed().as_secs_f64(),
                        limiters.join(" ")
                    );
                }
                if tick % 5 != 0 {
                    continue;
                }
                if let Some(line) = queue.trace() {
                    // Of the records of the invocations that ended over the last five seconds,
                    // those not deleted were reported back (handed back, or to retry).
                    let received = handled.0.swap(0, Ordering::Relaxed);
                    let deleted = handled.1.swap(0, Ordering::Relaxed);
                    let back = received.saturating_sub(deleted);
                    // Instance-seconds with nothing visible to take, and spent invoked.
                    let idle = idle.swap(0, Ordering::Relaxed) as f64 / 1000.0;
                    let busy = busy.swap(0, Ordering::Relaxed) as f64 / 1000.0;
                    eprintln!(
                        "t={:>5.1}s {line} | last 5 s: deleted {deleted} reported {back} \
                         idle {idle:.1}s busy {busy:.1}s",
                        start.elapsed().as_secs_f64()
                    );
                }
            }
        })
    });
    let mut total = DrainReport::default();
    for poller in pollers {
        let report = poller.await.expect("poller");
        total.billed += report.billed;
        total.invocations += report.invocations;
        total.failed_invocations += report.failed_invocations;
        total.timeouts += report.timeouts;
    }
    total.drain_time = start.elapsed();
    if let Some(ticker) = ticker {
        ticker.abort();
        let h = histogram.lock().unwrap();
        for ((_, label), (n, records, secs)) in LENGTHS.iter().zip(h.iter()) {
            eprintln!(
                "invocations {label:>10}: {n:>5}, {records:>5} records, {secs:>7.1} s billed"
            );
        }
    }
    total.drained = queue.is_empty().await;
    total
}

/// A MediaPackage VOD client for one instance: its own retry partition, as a separate process
/// would have.
pub fn client(
    url: &str,
    retry: RetryConfig,
    timeout: Option<TimeoutConfig>,
    instance: &str,
) -> aws_sdk_mediapackagevod::Client {
    static RUN: AtomicU64 = AtomicU64::new(0);
    let n = RUN.fetch_add(1, Ordering::Relaxed);
    let mut conf = aws_sdk_mediapackagevod::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(url)
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("bench", "bench", None, None, "bench"))
        .retry_config(retry)
        .retry_partition(RetryPartition::new(format!("bench-{instance}-{n}")));
    if let Some(timeout) = timeout {
        conf = conf.timeout_config(timeout);
    }
    aws_sdk_mediapackagevod::Client::from_conf(conf.build())
}

/// This project's function, one instance.
pub struct Ours(pub Ingestor<SdkAssetApi>);

impl Ours {
    /// An instance with `config`, calling `url`, delaying redeliveries on `queue`.
    pub fn new(url: &str, queue: Arc<SimQueue>, config: Config, instance: &str) -> Self {
        let (retry, timeout) = mpvod_ingest::mediapackage::sdk_settings(
            config.api_attempt_timeout,
            config.api_timeout,
        );
        let client = client(url, retry, Some(timeout), instance);
        Self(Ingestor::new(SdkAssetApi::new(client), config).with_queue(SimQueuePort(queue)))
    }
}

#[async_trait]
impl Function for Ours {
    async fn invoke(
        &self,
        records: &[SqsMessage],
        deadline: Instant,
    ) -> Result<SqsBatchResponse, String> {
        self.0
            .handle_batch(records, deadline)
            .await
            .map_err(|e| e.to_string())
    }

    fn limiter(&self) -> Option<LimiterStats> {
        Some(self.0.limiter().stats())
    }
}

fn request(record: &SqsMessage) -> Option<AssetRequest> {
    AssetRequest::parse(record.body.as_deref().unwrap_or(""), &Defaults::default()).ok()
}

async fn create(
    client: &aws_sdk_mediapackagevod::Client,
    request: &AssetRequest,
) -> Result<(), ErrorKind> {
    let result = client
        .create_asset()
        .id(request.id.as_str())
        .packaging_group_id(request.packaging_group_id.as_str())
        .source_arn(request.source_arn.as_str())
        .source_role_arn(request.source_role_arn.as_str())
        .send()
        .await;
    match result {
        Ok(_) => Ok(()),
        Err(err) => {
            let error = mpvod_ingest::mediapackage::ApiError::from(err);
            // A redelivery after success: the asset is there.
            if error.kind == ErrorKind::Unprocessable && error.message.contains("already exists") {
                Ok(())
            } else {
                Err(error.kind)
            }
        }
    }
}

/// The widely copied approach: one message after another; after each
/// `TooManyRequestsException` sleep `2 * 2^n` seconds, at most 5 retries.
pub struct SequentialSleep(pub aws_sdk_mediapackagevod::Client);

impl SequentialSleep {
    /// One instance calling `url`, the SDK's retries off (the loop is the retry).
    pub fn new(url: &str, instance: &str) -> Self {
        Self(client(url, RetryConfig::disabled(), None, instance))
    }
}

#[async_trait]
impl Function for SequentialSleep {
    async fn invoke(
        &self,
        records: &[SqsMessage],
        _deadline: Instant,
    ) -> Result<SqsBatchResponse, String> {
        let mut response = SqsBatchResponse::default();
        for record in records {
            let Some(request) = request(record) else {
                response.add_failure(record.message_id.clone().unwrap_or_default());
                continue;
            };
            let mut done = false;
            for retries in 0..=5u32 {
                match create(&self.0, &request).await {
                    Ok(()) => {
                        done = true;
                        break;
                    }
                    Err(ErrorKind::Throttled) if retries < 5 => {
                        tokio::time::sleep(Duration::from_secs(2 * (1 << retries))).await;
                    }
                    Err(_) => break,
                }
            }
            if !done {
                response.add_failure(record.message_id.clone().unwrap_or_default());
            }
        }
        Ok(response)
    }
}

/// Every message of the batch at once, with the SDK's retries (`RetryConfig` as given: the
/// default standard mode, or adaptive mode with its CUBIC client-side rate limiter).
pub struct AllAtOnce(pub aws_sdk_mediapackagevod::Client);

impl AllAtOnce {
    /// One instance calling `url` with `retry`.
    pub fn new(url: &str, retry: RetryConfig, instance: &str) -> Self {
        Self(client(url, retry, None, instance))
    }
}

#[async_trait]
impl Function for AllAtOnce {
    async fn invoke(
        &self,
        records: &[SqsMessage],
        _deadline: Instant,
    ) -> Result<SqsBatchResponse, String> {
        let results = futures::future::join_all(records.iter().map(|record| async move {
            match request(record) {
                Some(request) => create(&self.0, &request).await.is_ok(),
                None => false,
            }
        }))
        .await;
        let mut response = SqsBatchResponse::default();
        for (record, ok) in records.iter().zip(results) {
            if !ok {
                response.add_failure(record.message_id.clone().unwrap_or_default());
            }
        }
        Ok(response)
    }
}

/// The compiled `bootstrap` that `make up` and `make e2e` run: `BOOTSTRAP`, else
/// `target/debug/bootstrap` (under `CARGO_TARGET_DIR` if set).
pub fn bootstrap_binary() -> std::path::PathBuf {
    use std::path::PathBuf;
    std::env::var_os("BOOTSTRAP").map_or_else(
        || {
            std::env::var_os("CARGO_TARGET_DIR")
                .map_or_else(
                    || PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")),
                    PathBuf::from,
                )
                .join("debug/bootstrap")
        },
        PathBuf::from,
    )
}

/// A message body for asset `i`.
pub fn body(i: usize) -> String {
    serde_json::json!({
        "id": format!("bench-{i:05}"),
        "packagingGroupId": "vod-group",
        "sourceArn": format!("arn:aws:s3:::media-masters/bench/{i:05}/index.m3u8"),
        "sourceRoleArn": "arn:aws:iam::123456789012:role/MediaPackageVodSourceRead",
    })
    .to_string()
}
