use std::collections::{BTreeMap, BTreeSet};

use super::*;
use crate::events::{AssetEvent, PublishError, MAX_ENTRIES};
use crate::mediapackage::Asset;
use crate::message::{AssetId, RoleArn, SourceArn};
use crate::sqs::{DeadLetter, VisibilityChange};

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
    let response = batch_response(&records, &[Outcome::AlreadyExists { assets: vec![] }]).unwrap();
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
fn a_message_not_booked_comes_back_within_its_horizon_and_never_past_eight_backoff_ceilings() {
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
    // one is held to eight ceilings, 256 s (`BUDGETED_REACH`).
    let outcomes = [
        unbooked(Duration::from_secs(16)),
        unbooked(crate::backoff::SQS_MAX_VISIBILITY),
    ];
    assert_eq!(
        ingestor.redelivery_delays(&records, &outcomes, &BTreeMap::new(), || 0.999),
        [Some(16), Some(256)]
    );
    assert_eq!(
        ingestor.redelivery_delays(&records, &outcomes, &BTreeMap::new(), || 0.25),
        [Some(4), Some(64)]
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
    let times_left = BTreeMap::from([(QUEUE, Duration::from_secs(15))]);
    // The queue has 15 s left, spread over 10 s (returns overbooked by 1.5: no receive budget
    // is known): its messages without a slot come back within that, not at their booking
    // (3 s) or within their horizon (16 s), a first receive too, past its 2 s backoff
    // ceiling. Another queue's message keeps its booking, and a throttled one its backoff
    // (ceiling 32 s).
    assert_eq!(
        ingestor.redelivery_delays(&records, &outcomes, &times_left, || 0.999),
        [Some(10), Some(10), Some(10), Some(3), Some(32)]
    );
    assert_eq!(
        ingestor.redelivery_delays(&records, &outcomes, &times_left, || 0.2),
        [Some(2), Some(2), Some(2), Some(3), Some(7)]
    );
}

#[test]
fn a_hand_back_goes_to_the_draw_with_the_fewest_hand_backs_due_near_it() {
    const QUEUE: &str = "arn:aws:sqs:us-east-1:123456789012:ingest";
    let message = || {
        let mut m = record(Some("a"));
        m.event_source_arn = Some(QUEUE.to_string());
        m.attributes
            .insert("ApproximateReceiveCount".into(), "5".into());
        m
    };
    let no_slot = || {
        Outcome::Retry(
            Failure::new("RateLimited", "x"),
            Redelivery::After(Duration::from_secs(3)),
        )
    };
    let records = [message(), message(), message(), message()];
    let outcomes = [no_slot(), no_slot(), no_slot(), retry()];
    // 15 s left, spread over 10 s: a draw of 0.2 is 2 s, 0.5 is 5 s, 0.8 is 8 s.
    let times_left = BTreeMap::from([(QUEUE, Duration::from_secs(15))]);
    let draws = |units: [f64; 3]| {
        let mut units = units.into_iter().cycle();
        move || units.next().unwrap()
    };
    // Nothing due yet: the first message keeps its first draw, the next ones avoid the
    // seconds this batch has already taken. A throttled message draws once: its backoff
    // (ceiling 32 s) at 0.2.
    let ingestor = Ingestor::new(NoApi, Config::default());
    assert_eq!(
        ingestor.redelivery_delays(&records, &outcomes, &times_left, draws([0.2, 0.2, 0.5])),
        [Some(2), Some(5), Some(2), Some(7)]
    );
    // Four hand-backs already due in 2 s: that draw is never taken.
    let ingestor = Ingestor::new(NoApi, Config::default());
    for n in 0..4 {
        ingestor.away.hold(
            QUEUE,
            Instant::now() + Duration::from_secs(2),
            n.to_string(),
        );
    }
    assert_eq!(
        ingestor.redelivery_delays(&records, &outcomes, &times_left, draws([0.2, 0.8, 0.5])),
        [Some(8), Some(5), Some(8), Some(7)]
    );
}

/// SQS as a queue whose depth falls by `fall` messages per read, recording the visibility
/// timeouts set. It has no redrive policy, and says so while `answers` is set; otherwise its
/// `maxReceiveCount` cannot be read.
struct Draining {
    depth: Mutex<u64>,
    fall: u64,
    answers: std::sync::atomic::AtomicBool,
    reads: Mutex<Vec<Instant>>,
    /// Every change: receipt handle and visibility timeout.
    changes: Mutex<Vec<(String, i32)>>,
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
        let mut all = self.changes.lock().unwrap();
        all.extend(
            changes
                .iter()
                .map(|c| (c.receipt_handle.clone(), c.seconds)),
        );
        changes.iter().map(|_| Ok(())).collect()
    }
    async fn depth(&self, _: &str) -> Result<u64, crate::sqs::QueueError> {
        self.reads.lock().unwrap().push(Instant::now());
        let mut depth = self.depth.lock().unwrap();
        *depth -= self.fall;
        Ok(*depth)
    }
    async fn max_receive_count(&self, _: &str) -> Result<Option<u32>, crate::sqs::QueueError> {
        if self.answers.load(Ordering::Relaxed) {
            Ok(None)
        } else {
            Err(crate::sqs::QueueError {
                code: "AccessDenied".into(),
                message: "not authorized to perform sqs:GetQueueAttributes".into(),
            })
        }
    }
}

impl Draining {
    /// The visibility timeout of every change, in order.
    fn seconds(&self) -> Vec<i32> {
        let changes = self.changes.lock().unwrap();
        changes.iter().map(|(_, seconds)| *seconds).collect()
    }

    /// How many messages had their redelivery delayed: distinct receipt handles given a
    /// visibility timeout above zero. A hand-back pushed later after it was placed
    /// ([`Ingestor::call_back`]) is one message changed twice, and counts once.
    fn delayed(&self) -> usize {
        let changes = self.changes.lock().unwrap();
        let handles: std::collections::BTreeSet<&str> = changes
            .iter()
            .filter(|(_, seconds)| *seconds > 0)
            .map(|(handle, _)| handle.as_str())
            .collect();
        handles.len()
    }
}

/// A [`Draining`] queue `depth` deep, falling by `fall` messages per read, for the test's life.
fn draining(depth: u64, fall: u64) -> &'static Draining {
    Box::leak(Box::new(Draining {
        depth: Mutex::new(depth),
        fall,
        answers: true.into(),
        reads: Mutex::default(),
        changes: Mutex::default(),
    }))
}

#[tokio::test(start_paused = true)]
async fn handed_back_messages_are_spread_over_the_time_the_backlog_has_left() {
    fastrand::seed(7);
    let queue = draining(110, 10);
    let ingestor = Ingestor::new(Instant0, slow_config()).with_queue(queue);
    // The instance has seen the backlog fall from 120 over the last two seconds: its warm-up
    // is over.
    ingestor.gauge.observe(
        "arn:aws:sqs:us-east-1:123456789012:ingest",
        Instant::now(),
        120,
    );
    tokio::time::advance(Duration::from_secs(2)).await;
    let records = batch(5);
    let start = Instant::now();
    let mut delays = Vec::new();
    for step_ms in [0, 1000, 500, 500] {
        tokio::time::advance(Duration::from_millis(step_ms)).await;
        queue.changes.lock().unwrap().clear();
        ingestor
            .handle_batch(&records, Instant::now() + Duration::from_secs(60))
            .await
            .unwrap();
        delays.push(queue.seconds());
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
    // At 0 s, 100 messages falling by 10/s have 10 s left: the nine messages without a slot
    // come back at random within 10 / 1.5 = 6.7 s, not at the limiter's bookings (0.53-0.67 s
    // apart from 1 s on, in order).
    let (first, _) = delays[0].split_at(9);
    assert!(first.iter().all(|d| (0..=7).contains(d)), "{first:?}");
    assert!(
        first.windows(2).any(|w| w[0] > w[1]),
        "in booking order: {first:?}"
    );
    // From 2 s on, 80 messages falling by 10/s have 80 / 15 = 5.3 s left: the messages
    // handed back come back at random within that, whatever their booking would be. With no
    // room to call back, those due over the next three seconds beyond what this instance's
    // part of the drain rate serves are then pushed later, within the 8 s left at that rate.
    for all in &delays[3..] {
        let (later, pushed) = all.split_at(9);
        assert!(later.iter().all(|d| (0..=6).contains(d)), "{later:?}");
        assert!(pushed.iter().all(|d| (3..=8).contains(d)), "{pushed:?}");
        assert!(
            later.windows(2).any(|w| w[0] > w[1]),
            "in booking order: {later:?}"
        );
    }
}

fn no_slot() -> Outcome {
    Outcome::Retry(
        Failure::new("RateLimited", "no slot"),
        Redelivery::Within(Duration::from_secs(60)),
    )
}

/// Lets `ingestor` see its queue's backlog fall from 1,000 to 980 messages over two seconds
/// (10/s): its warm-up is over, and hand-backs are spread over the time left.
async fn past_warm_up<A: AssetApi>(ingestor: &Ingestor<A>) {
    const ARN: &str = "arn:aws:sqs:us-east-1:123456789012:ingest";
    ingestor.gauge.observe(ARN, Instant::now(), 1000);
    tokio::time::advance(Duration::from_secs(2)).await;
    ingestor.gauge.observe(ARN, Instant::now(), 980);
}

/// An instance with a receive budget of five, on a queue of 1,000 messages that held 980 two
/// seconds later (98 s left at 10/s), which has just set the redelivery delays of a first
/// delivery's batch of ten with outcome `outcome(i)` for record `i`.
struct HandedBack {
    queue: &'static Draining,
    ingestor: Ingestor<Instant0>,
    records: Vec<SqsMessage>,
    /// The delay set for each receipt handle.
    delays: BTreeMap<String, i32>,
    /// The end of the invocation.
    until: Instant,
}

impl HandedBack {
    async fn new(outcome: impl Fn(usize) -> Outcome) -> Self {
        fastrand::seed(11);
        let queue = draining(980, 0);
        let config = Config {
            max_receive_count: Some(5),
            ..slow_config()
        };
        let ingestor = Ingestor::new(Instant0, config).with_queue(queue);
        past_warm_up(&ingestor).await;
        let records = batch(1);
        let outcomes: Vec<Outcome> = (0..10).map(outcome).collect();
        let until = Instant::now() + Duration::from_secs(30);
        ingestor
            .delay_redeliveries(&records, &outcomes, until)
            .await;
        let delays = queue.changes.lock().unwrap().drain(..).collect();
        Self {
            queue,
            ingestor,
            records,
            delays,
            until,
        }
    }

    /// Calls back with no room: nothing is called back, and the messages due within three
    /// seconds that this instance cannot serve are pushed later. The delay of each message
    /// from now on, pushes included.
    async fn call_back_without_room(&self) -> BTreeMap<String, i32> {
        let returns = self
            .ingestor
            .call_back(&self.records, self.until, Duration::ZERO)
            .await;
        assert_eq!(returns.called_back, 0);
        let mut due = self.delays.clone();
        let pushes: Vec<(String, i32)> = self.queue.changes.lock().unwrap().drain(..).collect();
        assert_eq!(pushes.len(), returns.pushed_back);
        for (handle, seconds) in pushes {
            assert!(
                (2..=3).contains(&self.delays[&handle]) && seconds >= 3,
                "{handle} due in {} s pushed to {seconds} s",
                self.delays[&handle]
            );
            due.insert(handle, seconds);
        }
        due
    }
}

#[tokio::test(start_paused = true)]
async fn messages_handed_back_for_want_of_a_slot_are_called_back_furthest_first_into_room() {
    // Six handed back for want of a slot, two throttled (their backoff stands), two made.
    let back = HandedBack::new(|i| match i {
        0..6 => no_slot(),
        6 | 7 => retry(),
        _ => Outcome::Skipped("made".into()),
    })
    .await;
    assert_eq!(back.delays.len(), 8);
    // The limiter's one slot is taken: no room, nothing called back.
    back.ingestor
        .limiter
        .reserve(Instant::now(), back.until, Duration::ZERO)
        .unwrap();
    let due = back.call_back_without_room().await;
    // A slot a second: one call-back each, the furthest due first, each made visible at once.
    let mut called = Vec::new();
    for _ in 0..6 {
        tokio::time::advance(Duration::from_secs(1)).await;
        let n = back
            .ingestor
            .call_back(&back.records, back.until, Duration::ZERO)
            .await
            .called_back;
        let changes: Vec<(String, i32)> = back.queue.changes.lock().unwrap().drain(..).collect();
        assert_eq!(changes.len(), n);
        assert!(n <= 1, "{changes:?}");
        for (handle, seconds) in changes {
            assert_eq!(seconds, 0);
            called.push(handle);
        }
    }
    let mut away: Vec<(i32, String)> = (0..6)
        .map(|i| {
            let handle = format!("rh-{i}");
            (due[&handle], handle)
        })
        .collect();
    away.sort_by(|a, b| b.cmp(a));
    let expected: Vec<&String> = away.iter().map(|(_, handle)| handle).collect();
    assert!(called.len() >= 4, "{called:?} of {away:?}");
    assert_eq!(
        called.iter().collect::<Vec<_>>(),
        expected[..called.len()],
        "{away:?}"
    );
    // The throttled messages keep their backoff.
    assert!(called.iter().all(|h| h != "rh-6" && h != "rh-7"));
}

#[tokio::test(start_paused = true)]
async fn in_a_backlog_s_last_seconds_every_message_away_is_called_back_whatever_the_room() {
    const ARN: &str = "arn:aws:sqs:us-east-1:123456789012:ingest";
    let back = HandedBack::new(|i| match i {
        0..6 => no_slot(),
        _ => Outcome::Skipped("made".into()),
    })
    .await;
    assert_eq!(back.delays.len(), 6);
    // Every slot taken: no room.
    let no_room = || {
        back.ingestor
            .limiter
            .reserve(Instant::now(), back.until, Duration::ZERO)
            .unwrap()
    };
    no_room();
    let due = back.call_back_without_room().await;
    // A second later the backlog has fallen to 15 messages, under two seconds at its rate: every
    // message still due more than a second ahead comes back now, though there is no room.
    tokio::time::advance(Duration::from_secs(1)).await;
    back.ingestor.gauge.observe(ARN, Instant::now(), 15);
    no_room();
    let due_later = due.values().filter(|d| **d > 2).count();
    assert!(due_later >= 4, "{due:?}");
    assert_eq!(
        back.ingestor
            .call_back(&back.records, back.until, Duration::ZERO)
            .await
            .called_back,
        due_later
    );
    let called: Vec<(String, i32)> = back.queue.changes.lock().unwrap().drain(..).collect();
    assert_eq!(called.len(), due_later);
    assert!(called
        .iter()
        .all(|(handle, seconds)| *seconds == 0 && due[handle] > 2));
}

#[tokio::test(start_paused = true)]
async fn an_instance_that_sat_idle_calls_back_the_calls_its_rate_left_unused_meanwhile() {
    const ARN: &str = "arn:aws:sqs:us-east-1:123456789012:ingest";
    let queue = draining(980, 0);
    let config = Config {
        initial_rate: Some(4.0),
        ..slow_config()
    };
    let ingestor = Ingestor::new(Instant0, config).with_queue(queue);
    past_warm_up(&ingestor).await;
    // Six messages away, due 20 to 25 s from now.
    let now = Instant::now();
    for i in 0..6 {
        let due = now + Duration::from_secs(20 + i);
        ingestor.away.hold(ARN, due, format!("away-{i}"));
    }
    // One message a batch: it takes the bucket's one slot (4/s, no burst).
    let one = &batch(1)[..1];
    let deadline = || Instant::now() + Duration::from_secs(30);
    let called = |queue: &Draining| -> Vec<String> {
        let changes: Vec<(String, i32)> = queue.changes.lock().unwrap().drain(..).collect();
        assert!(
            changes.iter().all(|(_, seconds)| *seconds == 0),
            "{changes:?}"
        );
        changes.into_iter().map(|(handle, _)| handle).collect()
    };
    // The instance's first invocation: no idle gap known, the bucket spent, nothing called back.
    ingestor.handle_batch(one, deadline()).await.unwrap();
    assert_eq!(called(queue), Vec::<String>::new());
    // After two seconds without an invocation: the rate allowed eight calls, half a second's
    // worth (two) is made up, the furthest due first.
    tokio::time::advance(Duration::from_secs(2)).await;
    ingestor.handle_batch(one, deadline()).await.unwrap();
    assert_eq!(called(queue), ["away-5", "away-4"]);
    // 0.3 s idle is one call at 4/s.
    tokio::time::advance(Duration::from_millis(300)).await;
    ingestor.handle_batch(one, deadline()).await.unwrap();
    assert_eq!(called(queue), ["away-3"]);
}

/// An instance with no room to call back, on a backlog that fell by 20 messages over two
/// seconds to `depth` (10/s, `depth / 10` s left), holding `soon` hand-backs due in 2.5 s
/// ("soon-i") and `far` due from 10 s on: what `call_back` did, and the changes it made.
async fn push_backs(depth: u64, soon: usize, far: usize) -> (Returns, Vec<(String, i32)>) {
    const ARN: &str = "arn:aws:sqs:us-east-1:123456789012:ingest";
    fastrand::seed(5);
    let queue = draining(depth, 0);
    let ingestor = Ingestor::new(Instant0, slow_config()).with_queue(queue);
    ingestor.gauge.observe(ARN, Instant::now(), depth + 20);
    tokio::time::advance(Duration::from_secs(2)).await;
    ingestor.gauge.observe(ARN, Instant::now(), depth);
    let now = Instant::now();
    for i in 0..soon {
        let due = now + Duration::from_millis(2500);
        ingestor.away.hold(ARN, due, format!("soon-{i}"));
    }
    for i in 0..far {
        let due = now + Duration::from_secs(10 + (i % 18) as u64);
        ingestor.away.hold(ARN, due, format!("far-{i}"));
    }
    let until = now + Duration::from_secs(30);
    ingestor
        .limiter
        .reserve(now, until, Duration::ZERO)
        .unwrap();
    let returns = ingestor.call_back(&batch(1), until, Duration::ZERO).await;
    let changes = queue.changes.lock().unwrap().drain(..).collect();
    // Nothing is lost: every message is still held, due where it went or where it was.
    assert_eq!(ingestor.away.due_from(ARN, now), soon + far);
    (returns, changes)
}

/// `call_back` called nothing back and pushed `pushed` of the messages due soon later, each
/// from 3 s on and within the `left` seconds the backlog has left.
fn assert_pushed_soon_ones(returns: Returns, changes: &[(String, i32)], pushed: usize, left: i32) {
    assert_eq!(
        returns,
        Returns {
            called_back: 0,
            pushed_back: pushed
        }
    );
    assert_eq!(changes.len(), pushed, "{changes:?}");
    assert!(
        changes
            .iter()
            .all(|(handle, seconds)| handle.starts_with("soon-") && (3..=left).contains(seconds)),
        "{changes:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn with_no_room_hand_backs_due_sooner_than_the_instance_serves_are_pushed_later() {
    // 800 messages left, 80 s at 10/s. 86 of 800 away: its part of the drain rate, 1.07/s,
    // serves 2 of the 8 due over the next two seconds. The other 6 go later, within the 80 s
    // the backlog has left, and spend no receive; none is called back, for there is no room.
    let (returns, changes) = push_backs(800, 8, 78).await;
    assert_pushed_soon_ones(returns, &changes, 6, 80);
    // 8 of 800: 0.1/s serves none of them. 232 of 800: 2.9/s serves 5.
    assert_eq!(push_backs(800, 8, 0).await.0.pushed_back, 8);
    assert_eq!(push_backs(800, 8, 224).await.0.pushed_back, 3);
    // Holding the whole backlog, its part is the drain rate, 10/s: it serves all 8.
    let (returns, changes) = push_backs(800, 8, 792).await;
    assert_eq!(returns, Returns::default());
    assert!(changes.is_empty(), "{changes:?}");
}

#[tokio::test(start_paused = true)]
async fn in_a_backlog_s_last_30_seconds_the_push_back_keeps_twice_the_instance_s_part() {
    // 280 messages left, 28 s at 10/s. 30 of 280 away: 1.07/s serves 2 of the 8 due over the
    // next two seconds, and twice that stays: 4 are pushed, where a long backlog pushes 6.
    let (returns, changes) = push_backs(280, 8, 22).await;
    assert_pushed_soon_ones(returns, &changes, 4, 28);
    // 8 of 280: 0.29/s, twice that over two seconds keeps 1.
    assert_eq!(push_backs(280, 8, 0).await.0.pushed_back, 7);
}

#[tokio::test(start_paused = true)]
async fn an_instance_holding_most_of_a_backlog_s_last_messages_calls_at_its_drain_rate() {
    const ARN: &str = "arn:aws:sqs:us-east-1:123456789012:ingest";
    // Third deliveries of five: no hand-back, every message waits for its slot. `depth` is
    // what is left of a backlog that fell by 20 messages a second over three seconds.
    async fn third_deliveries(depth: u64) -> f64 {
        let queue = draining(depth, 0);
        let config = Config {
            max_receive_count: Some(5),
            ..slow_config()
        };
        let ingestor = Ingestor::new(Instant0, config).with_queue(queue);
        for left in [depth + 60, depth + 40, depth + 20] {
            ingestor.gauge.observe(ARN, Instant::now(), left);
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        let (created, handed_back, seconds) = drain_batch(&ingestor, &batch(3)).await;
        assert_eq!((created, handed_back), (10, 0));
        seconds
    }
    // The batch is all that is left: the other instances have nothing, and the ten go at
    // 20/s, not at this instance's 1/s.
    let alone = third_deliveries(10).await;
    assert!(alone < 1.0, "{alone} s");
    // Ten of a thousand: the others are busy, and the instance keeps to its own rate.
    let among = third_deliveries(1000).await;
    assert!(among >= 3.0, "{among} s");
}

/// Runs `records` through `ingestor` with a minute to go: (messages created, messages handed
/// back, seconds taken).
async fn drain_batch(ingestor: &Ingestor<Instant0>, records: &[SqsMessage]) -> (usize, usize, f64) {
    let start = Instant::now();
    let response = ingestor
        .handle_batch(records, Instant::now() + Duration::from_secs(60))
        .await
        .unwrap();
    let handed_back = response.batch_item_failures.len();
    (
        records.len() - handed_back,
        handed_back,
        (Instant::now() - start).as_secs_f64(),
    )
}

#[tokio::test(start_paused = true)]
async fn messages_wait_for_their_slots_until_the_backlog_drain_is_measured() {
    let config = Config {
        max_receive_count: Some(5),
        ..slow_config()
    };
    // A backlog falling by 10 messages a read. The first batch finds no drain rate: at 1
    // request/s every message waits for its slot and is made, none spends a delivery.
    let queue = draining(1000, 10);
    let ingestor = Ingestor::new(Instant0, config.clone()).with_queue(queue);
    let (created, handed_back, seconds) = drain_batch(&ingestor, &batch(1)).await;
    assert_eq!((created, handed_back), (10, 0));
    assert!(seconds >= 2.0, "{seconds} s");
    assert!(queue.changes.lock().unwrap().is_empty());
    // The next batch reads the depth again, more than two seconds later: the fall is measured,
    // and the messages without a slot go back within the time the backlog has left.
    let (_, handed_back, _) = drain_batch(&ingestor, &batch(1)).await;
    assert!(handed_back >= 5, "{handed_back} handed back");
    assert_eq!(queue.delayed(), handed_back);
    assert_eq!(queue.reads.lock().unwrap().len(), 2);

    // A backlog that does not fall: batch after batch waits, until ten seconds after the
    // first read.
    let queue = draining(1000, 0);
    let ingestor = Ingestor::new(Instant0, config).with_queue(queue);
    let start = Instant::now();
    let mut batches = 0;
    while Instant::now() - start < Duration::from_secs(10) {
        let (_, handed_back, _) = drain_batch(&ingestor, &batch(1)).await;
        assert_eq!(handed_back, 0, "batch {batches}");
        batches += 1;
        tokio::time::advance(Duration::from_millis(100)).await;
    }
    assert!(batches >= 3, "{batches} batches");
    let (_, handed_back, _) = drain_batch(&ingestor, &batch(1)).await;
    assert!(handed_back >= 5, "{handed_back} handed back");

    // Without a receive budget (no redrive policy) just the same: nothing is dead-lettered
    // there, but every hand-back is still a receive and an invocation.
    let queue = draining(1000, 10);
    let ingestor = Ingestor::new(Instant0, slow_config()).with_queue(queue);
    let (created, handed_back, seconds) = drain_batch(&ingestor, &batch(1)).await;
    assert_eq!((created, handed_back), (10, 0));
    assert!(seconds >= 2.0, "{seconds} s");
    assert!(queue.changes.lock().unwrap().is_empty());
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

fn bookings(receives: u32, rate: f64) -> Vec<Redelivery> {
    let config = Config {
        initial_rate: Some(rate),
        ..slow_config()
    };
    let ingestor = Ingestor::new(Instant0, config);
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
async fn a_message_without_two_deliveries_to_spare_waits_for_a_slot_instead_of_being_handed_back() {
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
fn bookings_reach_no_further_than_four_backoff_ceilings_of_the_receive_count() {
    // At 0.25 request/s, paced strictly, one message goes now and the others are booked
    // seconds apart. A first receive (ceiling 2 s) may be booked 8 s ahead at most (half of
    // `BUDGETED_REACH` ceilings); the rest come back within those 8 s.
    let first = bookings(1, 0.25);
    assert_eq!(first.len(), 9);
    let booked: Vec<_> = first
        .iter()
        .filter_map(|r| match r {
            Redelivery::After(eta) => Some(*eta),
            _ => None,
        })
        .collect();
    assert!(!booked.is_empty(), "{first:?}");
    assert!(
        booked.iter().all(|eta| *eta <= Duration::from_secs(8)),
        "{first:?}"
    );
    assert_eq!(
        first
            .iter()
            .filter(|r| **r == Redelivery::Within(Duration::from_secs(8)))
            .count(),
        9 - booked.len()
    );
    assert!(booked.len() < 9, "{first:?}");
    // A fourth receive (ceiling 16 s) may be booked 64 s ahead: every message is booked.
    let fourth = bookings(4, 0.25);
    assert!(
        fourth
            .iter()
            .all(|r| matches!(r, Redelivery::After(eta) if *eta <= Duration::from_secs(64))),
        "{fourth:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn while_the_receive_budget_cannot_be_read_no_message_is_handed_back_for_want_of_a_slot() {
    let queue = draining(1000, 0);
    queue.answers.store(false, Ordering::Relaxed);
    let ingestor = Ingestor::new(Instant0, slow_config()).with_queue(queue);
    past_warm_up(&ingestor).await;
    // The queue may have a redrive policy of 3: at 1 request/s every message waits for its
    // slot and is made, none spends a delivery.
    let (created, handed_back, seconds) = drain_batch(&ingestor, &batch(1)).await;
    assert_eq!((created, handed_back), (10, 0));
    assert!(seconds >= 2.0, "{seconds} s");
    assert!(queue.changes.lock().unwrap().is_empty());
    // A minute later the read answers: no redrive policy, so messages without a slot go back.
    tokio::time::advance(Duration::from_secs(60)).await;
    queue.answers.store(true, Ordering::Relaxed);
    past_warm_up(&ingestor).await;
    let (_, handed_back, _) = drain_batch(&ingestor, &batch(1)).await;
    assert!(handed_back >= 5, "{handed_back} handed back");
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
/// Ten messages like [`batch`]'s first delivery, for ten other assets.
fn other_batch() -> Vec<SqsMessage> {
    batch(1)
        .into_iter()
        .enumerate()
        .map(|(i, mut m)| {
            m.message_id = Some(format!("n{i}"));
            m.body = Some(format!(
                r#"{{"sourceArn":"arn:aws:s3:::bucket/n{i}.m3u8"}}"#
            ));
            m
        })
        .collect()
}

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
    // Ten calls of 50 ms, all at once (the initial window is ten): one round trip, not ten.
    assert_eq!(
        created_in(&ingestor, &batch(1)).await,
        Duration::from_millis(50)
    );
}

/// Runs `records` through `ingestor`, with 3 s to go: the time taken, once every asset is made.
async fn created_in(ingestor: &Ingestor<Fake>, records: &[SqsMessage]) -> Duration {
    let start = Instant::now();
    let outcomes = ingestor
        .process_batch(records, start + Duration::from_secs(3))
        .await;
    assert_all_created(&outcomes);
    Instant::now() - start
}

#[tokio::test(start_paused = true)]
async fn a_smaller_initial_window_sends_a_cold_batch_in_two_round_trips_then_one() {
    let ingestor = Ingestor::new(
        Fake::new(50),
        Config {
            initial_window: 5,
            ..slow_config_defaults()
        },
    );
    // Five calls, then the other five as the first answers come in: two round trips.
    assert_eq!(
        created_in(&ingestor, &batch(1)).await,
        Duration::from_millis(100)
    );
    // Warm, the window has grown past the batch: ten other assets in one round trip.
    assert_eq!(
        created_in(&ingestor, &other_batch()).await,
        Duration::from_millis(50)
    );
}

#[tokio::test(start_paused = true)]
async fn a_cold_instance_allowed_more_than_its_window_at_once_sends_the_window_first() {
    let ingestor = Ingestor::new(
        Fake::new(50),
        Config {
            max_concurrency: 20,
            ..slow_config_defaults()
        },
    );
    let twenty: Vec<SqsMessage> = batch(1).into_iter().chain(other_batch()).collect();
    // Ten calls (the initial window), then ten more as their answers come in.
    assert_eq!(
        created_in(&ingestor, &twenty).await,
        Duration::from_millis(100)
    );
    assert_eq!(ingestor.api.counts().0, 20);
}

/// Answers its first calls from a script (an error of that kind, or `None` for success) after
/// 50 ms, and every later call with success.
struct Scripted(Mutex<std::collections::VecDeque<Option<ErrorKind>>>);

#[async_trait::async_trait]
impl AssetApi for Scripted {
    async fn create_asset(&self, request: &AssetRequest) -> Result<Asset, ApiError> {
        let answer = self.0.lock().unwrap().pop_front().flatten();
        tokio::time::sleep(Duration::from_millis(50)).await;
        match answer {
            Some(kind) => Err(ApiError::local(kind, "Scripted", "as scripted")),
            None => Ok(Asset::of(request)),
        }
    }
    async fn describe_asset(&self, _: &AssetId) -> Result<Option<Asset>, ApiError> {
        Ok(None)
    }
}

#[tokio::test(start_paused = true)]
async fn a_probe_call_that_fails_transiently_does_not_keep_the_instance_from_settling() {
    let script = [Some(ErrorKind::Transient), Some(ErrorKind::Throttled), None];
    let ingestor = Ingestor::new(Scripted(Mutex::new(script.into())), slow_config_defaults());
    let outcomes = ingestor
        .process_batch(&batch(1)[..3], Instant::now() + Duration::from_secs(10))
        .await;
    assert_all_created(&outcomes);
    // Every probe call has answered, the 503 too (its retry went out as a fourth probe call):
    // the probe has settled, and once the quiet after the cut is over there is room for
    // call-backs, not [`crate::limiter::SETTLE_WITHIN`] later.
    assert!(!ingestor.limiter.stats().settling);
    tokio::time::advance(crate::limiter::CALL_BACK_QUIET).await;
    assert!(ingestor.limiter.room(Instant::now(), 10, Duration::ZERO) > 0);
}

#[tokio::test(start_paused = true)]
async fn calls_still_waiting_for_the_window_at_the_first_429_may_go_back_as_refused_calls_do() {
    // A cold instance with a window of five, a receive budget and a backlog warming up: a
    // first call would wait there for its slot, but the five left waiting when the first of
    // the window is throttled ask as the refused call does, and may go back to the queue.
    let config = Config {
        initial_window: 5,
        max_receive_count: Some(5),
        ..slow_config_defaults()
    };
    let queue = draining(1000, 10);
    let script = [Some(ErrorKind::Throttled), None, None, None, None];
    let ingestor = Ingestor::new(Scripted(Mutex::new(script.into())), config).with_queue(queue);
    let response = ingestor
        .handle_batch(&batch(1), Instant::now() + Duration::from_secs(60))
        .await
        .unwrap();
    // Four of the window made; the rate learned is 2.5/s, so of the six left (the throttled
    // call's retry and the five) those without a slot within two intervals go back.
    let handed_back = response.batch_item_failures.len();
    assert!((2..=6).contains(&handed_back), "{handed_back} handed back");
    assert_eq!(queue.delayed(), handed_back);
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
    // Past its warm-up: messages without a slot are handed back.
    ingestor.gauge.observe(
        "arn:aws:sqs:us-east-1:123456789012:ingest",
        Instant::now(),
        1000,
    );
    tokio::time::advance(Duration::from_secs(2)).await;
    ingestor.gauge.observe(
        "arn:aws:sqs:us-east-1:123456789012:ingest",
        Instant::now(),
        980,
    );
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
