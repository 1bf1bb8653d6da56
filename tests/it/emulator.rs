//! The handler with the real SDK client against the emulator on loopback: plain, throttled,
//! faulty, slow, over quota.

use std::collections::BTreeSet;
use std::time::Duration;

use aws_lambda_events::event::sqs::SqsMessage;
use mpvod_emulator::{EmulatorConfig, RunningEmulator};
use mpvod_ingest::config::Config;
use mpvod_ingest::ingest::{batch_response, Ingestor, Outcome};
use mpvod_ingest::mediapackage::SdkAssetApi;

use crate::common::{event, far_deadline, ids, reported, sdk_client, test_config, ROLE};

async fn emulator(config: EmulatorConfig) -> RunningEmulator {
    config
        .with_packaging_group("vod-group")
        .spawn()
        .await
        .expect("emulator starts")
}

fn ingestor(emulator: &RunningEmulator, config: Config) -> Ingestor<SdkAssetApi> {
    Ingestor::new(
        SdkAssetApi::new(sdk_client(&emulator.url(), &config)),
        config,
    )
}

/// Runs `records` the way SQS would: each round redelivers exactly the reported failures,
/// until none is left or `rounds` is reached. Returns the messages still failing.
async fn drain(
    ingestor: &Ingestor<SdkAssetApi>,
    mut records: Vec<SqsMessage>,
    rounds: usize,
) -> Vec<SqsMessage> {
    for _ in 0..rounds {
        if records.is_empty() {
            break;
        }
        let outcomes = ingestor.process_batch(&records, far_deadline()).await;
        let response = batch_response(&records, &outcomes).unwrap();
        let failed: BTreeSet<String> = response
            .batch_item_failures
            .into_iter()
            .map(|f| f.item_identifier)
            .collect();
        records.retain(|r| failed.contains(r.message_id.as_deref().unwrap()));
        // SQS hands a reported message back only after its visibility timeout.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    records
}

#[tokio::test]
async fn a_full_batch_becomes_assets_and_reports_no_failure() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let ingestor = ingestor(&emulator, test_config());
    let records = event("batch-10.json").records;
    let outcomes = ingestor.process_batch(&records, far_deadline()).await;
    assert!(batch_response(&records, &outcomes)
        .unwrap()
        .batch_item_failures
        .is_empty());
    let assets = emulator.assets();
    assert_eq!(assets.len(), 10);
    let s01e07 = assets
        .iter()
        .find(|a| a.id == "show-s01e07")
        .expect("asset exists");
    assert_eq!(
        s01e07.source_arn,
        "arn:aws:s3:::media-masters/show/s01e07/index.m3u8"
    );
    assert_eq!(s01e07.source_role_arn, ROLE);
    assert_eq!(s01e07.packaging_group_id, "vod-group");
}

#[tokio::test]
async fn the_mixed_batch_reports_only_its_bad_messages() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let ingestor = ingestor(&emulator, test_config());
    let records = event("mixed.json").records;
    let outcomes = ingestor.process_batch(&records, far_deadline()).await;
    let response = batch_response(&records, &outcomes).unwrap();
    let reported = reported(&response);
    let all = ids(&records);
    assert_eq!(reported, [all[1].clone(), all[2].clone(), all[3].clone()]);
    assert!(matches!(&outcomes[1], Outcome::Permanent(f) if f.code == "InvalidMessage"));
    assert!(
        matches!(&outcomes[2], Outcome::Permanent(f) if f.reason.contains("sourceArn is missing"))
    );
    assert!(matches!(&outcomes[3], Outcome::Permanent(f) if f.code == "NotFoundException"));
    let mut made: Vec<_> = emulator
        .assets()
        .into_iter()
        .map(|a| a.source_arn)
        .collect();
    made.sort();
    assert_eq!(
        made,
        [
            "arn:aws:s3:::media-masters/show/s01e21/index.m3u8",
            "arn:aws:s3:::media-masters/show/s01e25/main.smil",
        ]
    );
}

#[tokio::test]
async fn a_redelivered_message_does_not_make_a_second_asset() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let ingestor = ingestor(&emulator, test_config());
    let records = event("single.json").records;
    let first = ingestor.process_batch(&records, far_deadline()).await;
    let second = ingestor.process_batch(&records, far_deadline()).await;
    assert!(matches!(first[0], Outcome::Created { .. }), "{first:?}");
    assert!(
        matches!(second[0], Outcome::AlreadyExists { .. }),
        "{:?}",
        second[0]
    );
    assert_eq!(emulator.assets().len(), 1);
}

#[tokio::test]
async fn a_throttled_backlog_drains_through_redelivery_with_nothing_lost() {
    let emulator = emulator(EmulatorConfig::default().with_rate_limit(5.0, 2)).await;
    let ingestor = ingestor(&emulator, test_config());
    let records = event("throttle.json").records;
    let first = ingestor.process_batch(&records, far_deadline()).await;
    let throttled = first
        .iter()
        .filter(|o| matches!(o, Outcome::Retry(f, _) if f.code == "TooManyRequestsException"))
        .count();
    assert!(
        throttled > 0,
        "a burst of 10 against 5/s must be throttled: {first:?}"
    );
    let created = first
        .iter()
        .filter(|o| matches!(o, Outcome::Created { .. }))
        .count();
    assert_eq!(created + throttled, 10, "{first:?}");
    assert_eq!(emulator.assets().len(), created);

    let failed: Vec<SqsMessage> = records
        .iter()
        .zip(&first)
        .filter(|(_, o)| o.must_redeliver())
        .map(|(r, _)| r.clone())
        .collect();
    let left = drain(&ingestor, failed, 40).await;
    assert!(left.is_empty(), "still failing: {:?}", ids(&left));
    let made: BTreeSet<_> = emulator.assets().into_iter().map(|a| a.id).collect();
    let wanted: BTreeSet<_> = (30..40).map(|i| format!("show-s01e{i:02}")).collect();
    assert_eq!(made, wanted);
    assert!(emulator.stats().throttled > 0);
}

#[tokio::test]
async fn server_faults_are_retried_and_every_asset_is_made_exactly_once() {
    let emulator = emulator(EmulatorConfig::default().with_fault_rate(0.5).with_seed(7)).await;
    let ingestor = ingestor(&emulator, test_config());
    let left = drain(&ingestor, event("batch-10.json").records, 20).await;
    assert!(left.is_empty(), "still failing: {:?}", ids(&left));
    assert_eq!(emulator.assets().len(), 10);
    assert!(emulator.stats().faults > 0, "faults were injected");
}

#[tokio::test]
async fn an_answer_lost_after_the_asset_was_made_is_a_transient_error() {
    let emulator = emulator(EmulatorConfig::default().with_drop_rate(1.0)).await;
    let config = test_config();
    let api = SdkAssetApi::new(sdk_client(&emulator.url(), &config));
    let request = mpvod_ingest::message::AssetRequest::parse(
        event("single.json").records[0].body.as_deref().unwrap(),
        &Default::default(),
    )
    .unwrap();
    use mpvod_ingest::mediapackage::{AssetApi, ErrorKind};
    let error = api.create_asset(&request).await.unwrap_err();
    assert_eq!(error.kind, ErrorKind::Transient, "{error:?}");
    // The call took effect: the asset exists, and the emulator counted the dropped answer.
    assert_eq!(emulator.assets().len(), 1);
    assert_eq!(emulator.stats().dropped, 1);
}

#[tokio::test]
async fn server_faults_and_lost_answers_are_retried_and_every_asset_is_made_exactly_once() {
    let emulator = emulator(
        EmulatorConfig::default()
            .with_fault_rate(0.3)
            .with_drop_rate(0.3)
            .with_seed(11),
    )
    .await;
    let ingestor = ingestor(&emulator, test_config());
    let left = drain(&ingestor, event("batch-10.json").records, 30).await;
    assert!(left.is_empty(), "still failing: {:?}", ids(&left));
    assert_eq!(emulator.assets().len(), 10);
    assert_eq!(emulator.stats().assets_created, 10);
    assert!(emulator.stats().dropped > 0, "answers were lost");
}

#[tokio::test]
async fn a_forbidden_role_is_a_permanent_failure() {
    let emulator = emulator(EmulatorConfig::default().with_forbidden_role(ROLE)).await;
    let ingestor = ingestor(&emulator, test_config());
    let outcomes = ingestor
        .process_batch(&event("single.json").records, far_deadline())
        .await;
    assert!(
        matches!(&outcomes[0], Outcome::Permanent(f) if f.code == "ForbiddenException"),
        "{outcomes:?}"
    );
    assert_eq!(emulator.stats().requests, 1, "a 403 is not retried");
}

#[tokio::test]
async fn an_exhausted_asset_quota_is_retryable_not_permanent() {
    let emulator = emulator(EmulatorConfig::default().with_asset_quota(1)).await;
    let ingestor = ingestor(
        &emulator,
        Config {
            max_concurrency: 1,
            ..test_config()
        },
    );
    let records = event("batch-10.json").records;
    let outcomes = ingestor.process_batch(&records[..2], far_deadline()).await;
    assert!(matches!(outcomes[0], Outcome::Created { .. }));
    assert!(
        matches!(&outcomes[1], Outcome::Retry(f, _) if f.reason.contains("Resource limit exceeded")),
        "{outcomes:?}"
    );
}

#[tokio::test]
async fn work_still_running_at_the_deadline_is_cut_and_reported_in_time() {
    let emulator = emulator(EmulatorConfig::default().with_latency(Duration::from_secs(5))).await;
    let config = Config {
        deadline_margin: Duration::from_millis(200),
        api_attempt_timeout: Duration::from_millis(500),
        ..test_config()
    };
    let ingestor = ingestor(&emulator, config);
    let records = event("batch-10.json").records;
    let started = tokio::time::Instant::now();
    let deadline = started + Duration::from_millis(1500);
    let outcomes = ingestor.process_batch(&records, deadline).await;
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_millis(1500),
        "returned after {elapsed:?}"
    );
    assert_eq!(outcomes.len(), 10);
    assert!(outcomes.iter().all(|o| o.must_redeliver()), "{outcomes:?}");
    assert!(
        batch_response(&records, &outcomes)
            .unwrap()
            .batch_item_failures
            .len()
            == 10
    );
}

#[tokio::test]
async fn nothing_is_started_when_no_attempt_fits_before_the_deadline() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let ingestor = ingestor(&emulator, test_config());
    let records = event("batch-10.json").records;
    // 350 ms in all: the 200 ms margin leaves 150 ms, less than the 200 ms an attempt needs.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(350);
    let outcomes = ingestor.process_batch(&records, deadline).await;
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, Outcome::Retry(f, _) if f.code == "DeadlineReached")),
        "{outcomes:?}"
    );
    assert_eq!(emulator.stats().requests, 0);
}

#[tokio::test]
async fn the_real_sdk_drives_every_emulated_operation() {
    use aws_sdk_mediapackagevod::error::ProvideErrorMetadata;
    let emulator = emulator(EmulatorConfig::default()).await;
    let client = sdk_client(&emulator.url(), &test_config());

    let group = client
        .create_packaging_group()
        .id("second-group")
        .send()
        .await
        .expect("CreatePackagingGroup");
    assert_eq!(group.id(), Some("second-group"));
    let again = client
        .create_packaging_group()
        .id("second-group")
        .send()
        .await;
    assert_eq!(
        again.unwrap_err().code(),
        Some("UnprocessableEntityException")
    );

    for i in 0..5 {
        client
            .create_asset()
            .id(format!("a{i}"))
            .packaging_group_id(if i < 3 { "vod-group" } else { "second-group" })
            .source_arn(format!("arn:aws:s3:::media-masters/a{i}.m3u8"))
            .source_role_arn(ROLE)
            .tags("n", i.to_string())
            .send()
            .await
            .expect("CreateAsset");
    }
    let described = client
        .describe_asset()
        .id("a1")
        .send()
        .await
        .expect("DescribeAsset");
    assert_eq!(
        described.source_arn(),
        Some("arn:aws:s3:::media-masters/a1.m3u8")
    );
    assert_eq!(described.packaging_group_id(), Some("vod-group"));
    assert_eq!(
        described
            .tags()
            .and_then(|t| t.get("n"))
            .map(String::as_str),
        Some("1")
    );
    assert!(described.created_at().is_some());

    let first = client
        .list_assets()
        .max_results(2)
        .send()
        .await
        .expect("ListAssets");
    assert_eq!(first.assets().len(), 2);
    let token = first.next_token().expect("a next page");
    let rest = client
        .list_assets()
        .max_results(10)
        .next_token(token)
        .send()
        .await
        .unwrap();
    assert_eq!(rest.assets().len(), 3);
    assert!(rest.next_token().is_none());
    let in_group = client
        .list_assets()
        .packaging_group_id("second-group")
        .send()
        .await
        .unwrap();
    let ids: Vec<_> = in_group.assets().iter().filter_map(|a| a.id()).collect();
    assert_eq!(ids, ["a3", "a4"]);

    let pg = client
        .describe_packaging_group()
        .id("vod-group")
        .send()
        .await
        .expect("DescribePackagingGroup");
    assert_eq!(pg.approximate_asset_count(), Some(3));

    client
        .delete_asset()
        .id("a0")
        .send()
        .await
        .expect("DeleteAsset");
    let gone = client.describe_asset().id("a0").send().await.unwrap_err();
    assert_eq!(gone.code(), Some("NotFoundException"));
    let missing = client
        .describe_packaging_group()
        .id("nope")
        .send()
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Some("NotFoundException"));
    assert_eq!(emulator.assets().len(), 4);
}

/// Bodies without `id` naming `source` in each of `groups`, as SQS records.
fn same_source_in(groups: &[&str], source: &str) -> Vec<SqsMessage> {
    groups
        .iter()
        .enumerate()
        .map(|(n, group)| {
            let mut m = SqsMessage::default();
            m.message_id = Some(format!("m-{n}"));
            m.body = Some(format!(
                r#"{{"sourceArn":"{source}","packagingGroupId":"{group}","sourceRoleArn":"{ROLE}"}}"#
            ));
            m
        })
        .collect()
}

#[tokio::test]
async fn one_source_becomes_an_asset_in_each_packaging_group_it_is_sent_to() {
    let emulator = emulator(EmulatorConfig::default().with_packaging_group("drm-group")).await;
    let ingestor = ingestor(&emulator, test_config());
    let source = "arn:aws:s3:::media-masters/film/index.m3u8";
    // In one batch ...
    let both = same_source_in(&["vod-group", "drm-group"], source);
    let outcomes = ingestor.process_batch(&both, far_deadline()).await;
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, Outcome::Created { .. })),
        "{outcomes:?}"
    );
    // ... and again, as a redelivery, in two batches: each finds its own asset.
    for one in both.chunks(1) {
        let outcomes = ingestor.process_batch(one, far_deadline()).await;
        assert!(
            matches!(&outcomes[..], [Outcome::AlreadyExists { .. }]),
            "{outcomes:?}"
        );
    }
    let mut groups: Vec<String> = emulator
        .assets()
        .into_iter()
        .map(|a| a.packaging_group_id)
        .collect();
    groups.sort();
    assert_eq!(groups, ["drm-group", "vod-group"]);
}

#[tokio::test]
async fn an_explicit_id_taken_in_another_packaging_group_is_a_conflict() {
    let emulator = emulator(EmulatorConfig::default().with_packaging_group("drm-group")).await;
    let ingestor = ingestor(&emulator, test_config());
    let body = |group: &str| {
        let mut m = SqsMessage::default();
        m.message_id = Some(group.to_string());
        m.body = Some(format!(
            r#"{{"id":"film","sourceArn":"arn:aws:s3:::media-masters/film.m3u8","packagingGroupId":"{group}","sourceRoleArn":"{ROLE}"}}"#
        ));
        m
    };
    let first = ingestor
        .process_batch(&[body("vod-group")], far_deadline())
        .await;
    assert!(matches!(first[0], Outcome::Created { .. }), "{first:?}");
    let second = ingestor
        .process_batch(&[body("drm-group")], far_deadline())
        .await;
    assert!(
        matches!(&second[0], Outcome::Permanent(f) if f.code == "AssetIdConflict"),
        "{second:?}"
    );
    assert_eq!(emulator.assets().len(), 1);
}

#[tokio::test]
async fn the_two_groups_sample_makes_one_asset_in_each_group() {
    let emulator = emulator(EmulatorConfig::default().with_packaging_group("drm-group")).await;
    let config = Config {
        source_role_arn: Some(mpvod_ingest::message::RoleArn::parse(ROLE).unwrap()),
        ..test_config()
    };
    let ingestor = ingestor(&emulator, config);
    let records = event("two-groups.json").records;
    let outcomes = ingestor.process_batch(&records, far_deadline()).await;
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, Outcome::Created { .. })),
        "{outcomes:?}"
    );
    let assets = emulator.assets();
    assert_eq!(assets.len(), 2);
    assert_ne!(assets[0].id, assets[1].id);
    assert_eq!(assets[0].source_arn, assets[1].source_arn);
}

/// A plain HTTP GET on the emulator, outside the SDK: status line and body.
async fn http_get(emulator: &RunningEmulator, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(emulator.addr())
        .await
        .unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

#[tokio::test]
async fn tools_read_the_assets_without_spending_the_api_rate() {
    let emulator = emulator(EmulatorConfig::default().with_rate_limit(1.0, 1)).await;
    let ingestor = ingestor(&emulator, test_config());
    ingestor
        .process_batch(&event("single.json").records, far_deadline())
        .await;
    let before = emulator.stats();
    // The bucket is empty now: ListAssets would be throttled; the tools' listing is not.
    for _ in 0..3 {
        let (status, body) = http_get(&emulator, "/_emulator/assets").await;
        assert!(status.contains(" 200 "), "{status}");
        assert!(body.contains("show-s01e01"), "{body}");
    }
    assert_eq!(emulator.stats(), before, "not counted as API calls");
}
