//! Every sample event in `events/` through the whole batch path, against recording fakes of
//! MediaPackage VOD and SQS: each envelope's assets, skips, poison messages sent to the
//! dead-letter queue, FIFO group order and one call per asset.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use aws_lambda_events::event::sqs::SqsMessage;
use mpvod_ingest::config::Config;
use mpvod_ingest::ingest::{batch_response, Ingestor, Outcome};
use mpvod_ingest::mediapackage::{ApiError, Asset, AssetApi};
use mpvod_ingest::message::{AssetId, AssetRequest, SourceArn};
use mpvod_ingest::sqs::{DeadLetter, QueueApi, QueueError, VisibilityChange};

use crate::common::{event, far_deadline, ids, reported, test_config, ROLE};

/// MediaPackage VOD as a map, recording every CreateAsset in call order.
#[derive(Default)]
struct Recorder {
    assets: Mutex<BTreeMap<String, Asset>>,
    calls: Mutex<Vec<String>>,
}

#[async_trait]
impl AssetApi for Recorder {
    async fn create_asset(&self, request: &AssetRequest) -> Result<Asset, ApiError> {
        self.calls.lock().unwrap().push(request.id.to_string());
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut assets = self.assets.lock().unwrap();
        if assets.contains_key(request.id.as_str()) {
            return Err(ApiError::local(
                mpvod_ingest::mediapackage::ErrorKind::Unprocessable,
                "UnprocessableEntityException",
                "asset exists",
            ));
        }
        assets.insert(request.id.to_string(), Asset::of(request));
        Ok(Asset {
            arn: Some(format!(
                "arn:aws:mediapackage-vod:us-east-1:123456789012:assets/{}",
                request.id
            )),
            ..Asset::of(request)
        })
    }

    async fn describe_asset(&self, id: &AssetId) -> Result<Option<Asset>, ApiError> {
        Ok(self.assets.lock().unwrap().get(id.as_str()).cloned())
    }
}

/// SQS with a dead-letter queue that keeps what it is sent.
#[derive(Default)]
struct DeadLetters(Mutex<Vec<(String, DeadLetter)>>);

#[async_trait]
impl QueueApi for &'static DeadLetters {
    async fn dead_letter(&self, queue_arn: &str, letter: &DeadLetter) -> Result<(), QueueError> {
        self.0
            .lock()
            .unwrap()
            .push((queue_arn.to_string(), letter.clone()));
        Ok(())
    }

    async fn change_visibility(
        &self,
        _queue_arn: &str,
        changes: &[VisibilityChange],
    ) -> Vec<Result<(), QueueError>> {
        changes.iter().map(|_| Ok(())).collect()
    }

    async fn depth(&self, _queue_arn: &str) -> Result<u64, QueueError> {
        Err(QueueError {
            code: "NotCounted".into(),
            message: "this fake does not count messages".into(),
        })
    }
}

/// The configuration `make invoke` runs with.
fn config() -> Config {
    Config::from_lookup(|name| match name {
        "PACKAGING_GROUP_ID" => Some("vod-group".to_string()),
        "SOURCE_ROLE_ARN" => Some(ROLE.to_string()),
        "ALLOWED_SOURCE_BUCKETS" => Some("media-masters".to_string()),
        _ => None,
    })
    .map(|c| Config {
        initial_rate: test_config().initial_rate,
        permit_wait: test_config().permit_wait,
        ..c
    })
    .unwrap()
}

struct Run {
    records: Vec<SqsMessage>,
    outcomes: Vec<Outcome>,
    reported: Vec<String>,
    calls: Vec<String>,
    letters: Vec<(String, DeadLetter)>,
}

async fn run(name: &str, with_dead_letter_queue: bool) -> Run {
    let letters: &'static DeadLetters = Box::leak(Box::default());
    let mut ingestor = Ingestor::new(Recorder::default(), config());
    if with_dead_letter_queue {
        ingestor = ingestor.with_queue(letters);
    }
    let records = event(name).records;
    let outcomes = ingestor.process_batch(&records, far_deadline()).await;
    let reported = reported(&batch_response(&records, &outcomes).unwrap());
    let calls = ingestor.api().calls.lock().unwrap().clone();
    let letters = letters.0.lock().unwrap().clone();
    Run {
        records,
        outcomes,
        reported,
        calls,
        letters,
    }
}

fn derived(key: &str) -> String {
    let arn = SourceArn::parse(&format!("arn:aws:s3:::media-masters/{key}")).unwrap();
    let group = mpvod_ingest::message::PackagingGroupId::parse("vod-group").unwrap();
    AssetId::derive_from(&group, &arn).to_string()
}

#[tokio::test]
async fn an_s3_notification_creates_each_manifest_it_names_and_skips_the_rest() {
    let run = run("s3-notification.json", true).await;
    assert!(run.reported.is_empty(), "{:?}", run.outcomes);
    assert!(
        matches!(run.outcomes[0], Outcome::Created { .. }),
        "{:?}",
        run.outcomes
    );
    assert!(matches!(&run.outcomes[1], Outcome::Skipped(r) if r.contains("segment_00001.ts")));
    let mut calls = run.calls;
    calls.sort();
    let mut expected = [
        derived("uploads/Show Two: Pilot/index.m3u8"),
        derived("uploads/show-two-s01e02/main.smil"),
    ];
    expected.sort();
    assert_eq!(calls, expected);
}

#[tokio::test]
async fn the_s3_test_event_is_acknowledged_without_a_call() {
    let run = run("s3-test-event.json", true).await;
    assert!(run.reported.is_empty());
    assert!(matches!(&run.outcomes[0], Outcome::Skipped(r) if r.contains("s3:TestEvent")));
    assert!(run.calls.is_empty() && run.letters.is_empty());
}

#[tokio::test]
async fn sns_raw_and_wrapped_messages_all_become_assets() {
    let run = run("sns.json", true).await;
    assert!(run.reported.is_empty(), "{:?}", run.outcomes);
    let mut calls = run.calls;
    calls.sort();
    let mut expected = [
        "show-three-s01e02".to_string(),
        "show-three-s01e03".to_string(),
        derived("uploads/show-three-s01e01/index.m3u8"),
    ];
    expected.sort();
    assert_eq!(calls, expected);
}

#[tokio::test]
async fn eventbridge_object_created_makes_an_asset_and_other_events_are_skipped() {
    let run = run("eventbridge.json", true).await;
    assert!(run.reported.is_empty());
    assert_eq!(run.calls, [derived("uploads/show-four-s01e01/index.m3u8")]);
    assert!(matches!(&run.outcomes[1], Outcome::Skipped(r) if r.contains("Object Deleted")));
}

#[tokio::test]
async fn poison_messages_go_to_the_dead_letter_queue_at_once_with_their_reason() {
    let run = run("poison.json", true).await;
    // All acknowledged: six in the dead-letter queue, the valid one created.
    assert!(run.reported.is_empty(), "{:?}", run.outcomes);
    assert_eq!(run.calls, ["show-five-s01e07"]);
    let letters: BTreeMap<_, _> = run
        .letters
        .iter()
        .map(|(queue, l)| {
            assert_eq!(
                queue,
                "arn:aws:sqs:us-east-1:123456789012:mediapackage-ingest"
            );
            (l.message_id.clone(), l)
        })
        .collect();
    let ids = ids(&run.records);
    let expect = [
        (0, "InvalidMessage", "EOF while parsing"),
        (1, "InvalidMessage", "unknown field `sourceARN`"),
        (2, "InvalidMessage", "id is invalid"),
        (3, "InvalidMessage", "not a manifest"),
        (
            4,
            "SourceRefused",
            "\"someone-elses-bucket\" is not in ALLOWED_SOURCE_BUCKETS",
        ),
        (
            5,
            "SourceRefused",
            "SomeoneElsesRole is not allowed by SOURCE_ROLE_ARN",
        ),
    ];
    assert_eq!(letters.len(), expect.len());
    for (index, code, reason) in expect {
        let letter = letters[&ids[index]];
        assert_eq!(letter.code, code, "{letter:?}");
        assert!(letter.reason.contains(reason), "{letter:?}");
        assert_eq!(letter.body, run.records[index].body.clone().unwrap());
        assert_eq!(letter.receive_count, 1);
        assert!(matches!(&run.outcomes[index], Outcome::DeadLettered(f) if f.code == code));
    }
}

#[tokio::test]
async fn without_a_dead_letter_queue_poison_messages_are_reported_instead() {
    let run = run("poison.json", false).await;
    let ids = ids(&run.records);
    assert_eq!(run.reported, ids[..6]);
    assert_eq!(run.calls, ["show-five-s01e07"]);
}

#[tokio::test]
async fn a_fifo_batch_keeps_group_order_and_makes_one_call_per_asset() {
    let run = run("fifo.json", true).await;
    // The poison message of group show-six went to the dead-letter queue (in its group), so
    // the rest of the group went on; the repeat of show-six-s01e01 made no call.
    assert!(run.reported.is_empty(), "{:?}", run.outcomes);
    assert_eq!(run.letters.len(), 1);
    assert_eq!(
        run.letters[0].1.message_group_id.as_deref(),
        Some("show-six")
    );
    assert_eq!(run.calls.len(), 4, "{:?}", run.calls);
    let position = |id: &str| run.calls.iter().position(|c| c == id).unwrap();
    assert!(position("show-six-s01e01") < position("show-six-s01e03"));
    assert!(position("show-seven-s01e01") < position("show-seven-s01e02"));
    // The groups ran side by side: the second group's first call came before the first
    // group's last.
    assert!(position("show-seven-s01e01") < position("show-six-s01e03"));
}

#[tokio::test]
async fn after_a_failure_the_rest_of_its_fifo_group_is_kept_back_without_a_call() {
    let run = run("fifo.json", false).await;
    let ids = ids(&run.records);
    // Without a dead-letter queue the poison message (index 2) fails, and show-six-s01e03
    // (index 3) is kept back; group show-seven is not affected.
    assert_eq!(run.reported, [ids[2].clone(), ids[3].clone()]);
    assert!(
        matches!(&run.outcomes[3], Outcome::Retry(f, _) if f.code == "EarlierMessageFailed" && f.reason.contains(&ids[2]))
    );
    assert!(!run.calls.contains(&"show-six-s01e03".to_string()));
    assert_eq!(run.calls.len(), 3, "{:?}", run.calls);
}
