//! Completion events and full packaging groups against real APIs on loopback: moto serves SQS
//! and EventBridge (a rule on the bus routes the function's events to an SQS queue, where the
//! test reads them), the emulator serves MediaPackage VOD with its asset quota.

use std::collections::BTreeMap;

use aws_lambda_events::event::sqs::SqsMessage;
use mpvod_emulator::{EmulatorConfig, RunningEmulator};
use mpvod_ingest::events::SdkEventBus;
use serde_json::Value;

use crate::common::{far_deadline, reported};
use crate::dead_letter::{
    create_queue, drain, emulator, ingestor_with, queue_with_dead_letter_queue, sample,
    send_and_receive,
};
use crate::sqs::Moto;

/// Creates bus `bus` and a rule on it that sends the function's events to a new queue; returns
/// that queue's URL.
pub(crate) async fn announced_queue(moto: &Moto, bus: &str) -> String {
    let events = moto.eventbridge();
    if bus != "default" {
        events.create_event_bus().name(bus).send().await.unwrap();
    }
    let (url, arn) = create_queue(&moto.client(), &format!("{bus}-announced"), &[]).await;
    events
        .put_rule()
        .name("asset-created")
        .event_bus_name(bus)
        .event_pattern(r#"{"source":["mediapackage-vod-ingest"],"detail-type":["Asset Created"]}"#)
        .send()
        .await
        .unwrap();
    events
        .put_targets()
        .rule("asset-created")
        .event_bus_name(bus)
        .targets(
            aws_sdk_eventbridge::types::Target::builder()
                .id("announced")
                .arn(arn)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    url
}

/// The events the rule delivered so far, by asset id.
pub(crate) async fn announced(moto: &Moto, url: &str) -> BTreeMap<String, Value> {
    drain(&moto.client(), url)
        .await
        .into_iter()
        .map(|m| {
            let event: Value = serde_json::from_str(m.body.as_deref().unwrap()).unwrap();
            assert_eq!(event["source"], "mediapackage-vod-ingest");
            assert_eq!(event["detail-type"], "Asset Created");
            let id = event["detail"]["assetId"].as_str().unwrap().to_string();
            (id, event)
        })
        .collect()
}

fn with_bus(
    emulator: &RunningEmulator,
    moto: &Moto,
    bus: &str,
    vars: &[(&str, &str)],
) -> mpvod_ingest::ingest::Ingestor<mpvod_ingest::mediapackage::SdkAssetApi> {
    ingestor_with(emulator, moto.client(), vars)
        .with_events(SdkEventBus::new(moto.eventbridge(), bus))
}

fn again(records: &[SqsMessage]) -> Vec<SqsMessage> {
    records
        .iter()
        .cloned()
        .map(|mut r| {
            r.attributes
                .insert("ApproximateReceiveCount".into(), "2".into());
            r
        })
        .collect()
}

#[tokio::test]
async fn assets_made_and_found_are_announced_on_the_bus_with_where_they_play() {
    let moto = Moto::start().await;
    let emulator = emulator().await;
    let sqs = moto.client();
    let announced_url = announced_queue(&moto, "pipeline").await;
    let (url, arn, _) = queue_with_dead_letter_queue(&sqs, "ingest").await;
    let records = send_and_receive(&sqs, &url, &arn, &sample("batch-10.json")).await;
    let ingestor = with_bus(&emulator, &moto, "pipeline", &[]);

    let response = ingestor
        .handle_batch(&records, far_deadline())
        .await
        .unwrap();
    assert!(reported(&response).is_empty(), "{response:?}");
    let events = announced(&moto, &announced_url).await;
    assert_eq!(events.len(), 10, "{events:?}");
    for record in &records {
        let body: Value = serde_json::from_str(record.body.as_deref().unwrap()).unwrap();
        let event = &events[body["id"].as_str().unwrap()];
        let detail = &event["detail"];
        assert_eq!(detail["messageId"], record.message_id.as_deref().unwrap());
        assert_eq!(detail["sourceArn"], body["sourceArn"]);
        assert_eq!(detail["packagingGroupId"], "vod-group");
        assert_eq!(detail["requestedPackagingGroupId"], "vod-group");
        assert_eq!(detail["envelope"], "request");
        assert_eq!(detail["found"], false);
        assert_eq!(event["resources"][0], detail["arn"]);
        let endpoints = detail["egressEndpoints"].as_array().unwrap();
        assert_eq!(endpoints.len(), 2, "{detail}");
        assert!(
            endpoints
                .iter()
                .all(|e| e["status"] == "QUEUED"
                    && e["url"].as_str().unwrap().starts_with("https://"))
        );
    }

    // Redelivered after success: each asset is found and announced again, marked as found.
    let response = ingestor
        .handle_batch(&again(&records), far_deadline())
        .await
        .unwrap();
    assert!(reported(&response).is_empty(), "{response:?}");
    let events = announced(&moto, &announced_url).await;
    assert_eq!(events.len(), 10);
    assert!(events.values().all(|e| e["detail"]["found"] == true
        && e["detail"]["egressEndpoints"][0]["status"] == "PLAYABLE"));
    assert_eq!(emulator.stats().assets_created, 10);
}

#[tokio::test]
async fn events_the_bus_refuses_are_retried_and_go_out_when_the_asset_is_found() {
    let moto = Moto::start().await;
    let emulator = emulator().await;
    let sqs = moto.client();
    let (url, arn, dlq_url) = queue_with_dead_letter_queue(&sqs, "ingest").await;
    let records = send_and_receive(&sqs, &url, &arn, &sample("batch-10.json")).await;
    // The bus does not exist yet: PutEvents fails, the assets are made but not announced.
    let ingestor = with_bus(&emulator, &moto, "late", &[]);
    let response = ingestor
        .handle_batch(&records, far_deadline())
        .await
        .unwrap();
    assert_eq!(reported(&response).len(), 10, "every message comes back");
    assert_eq!(emulator.stats().assets_created, 10);
    assert!(drain(&sqs, &dlq_url).await.is_empty());

    let announced_url = announced_queue(&moto, "late").await;
    let response = ingestor
        .handle_batch(&again(&records), far_deadline())
        .await
        .unwrap();
    assert!(reported(&response).is_empty(), "{response:?}");
    let events = announced(&moto, &announced_url).await;
    assert_eq!(events.len(), 10);
    assert!(events.values().all(|e| e["detail"]["found"] == true));
    assert_eq!(emulator.stats().assets_created, 10, "no second asset");
}

#[tokio::test]
async fn a_full_packaging_group_overflows_and_then_ends_in_the_dead_letter_queue_with_the_reason() {
    let moto = Moto::start().await;
    let sqs = moto.client();
    let emulator = EmulatorConfig::default()
        .with_packaging_group("vod-group")
        .with_packaging_group("vod-group-2")
        .with_asset_quota(3)
        .spawn()
        .await
        .unwrap();
    let announced_url = announced_queue(&moto, "pipeline").await;
    let (url, arn, dlq_url) = queue_with_dead_letter_queue(&sqs, "ingest").await;
    let records = send_and_receive(&sqs, &url, &arn, &sample("batch-10.json")).await;
    let ingestor = with_bus(
        &emulator,
        &moto,
        "pipeline",
        &[("OVERFLOW_PACKAGING_GROUP_IDS", "vod-group-2")],
    );
    let response = ingestor
        .handle_batch(&records, far_deadline())
        .await
        .unwrap();

    // Three assets in each group; the events say where each landed.
    let mut per_group = BTreeMap::new();
    for asset in emulator.assets() {
        *per_group.entry(asset.packaging_group_id).or_insert(0) += 1;
    }
    assert_eq!(
        per_group,
        BTreeMap::from([("vod-group".to_string(), 3), ("vod-group-2".to_string(), 3)])
    );
    let events = announced(&moto, &announced_url).await;
    assert_eq!(events.len(), 6);
    let landed: Vec<&str> = events
        .values()
        .map(|e| e["detail"]["packagingGroupId"].as_str().unwrap())
        .collect();
    assert_eq!(landed.iter().filter(|g| **g == "vod-group-2").count(), 3);
    assert!(events
        .values()
        .all(|e| e["detail"]["requestedPackagingGroupId"] == "vod-group"));

    // Of the four left, the first two refusals of the full overflow group come back later;
    // from QUOTA_MAX_REFUSALS (3) on, the rest go to the dead-letter queue with the reason.
    assert_eq!(reported(&response).len(), 2, "{response:?}");
    let letters = drain(&sqs, &dlq_url).await;
    assert_eq!(letters.len(), 2, "{letters:?}");
    for letter in &letters {
        let attributes = letter.message_attributes.clone().unwrap();
        let get = |name: &str| attributes[name].string_value.clone().unwrap();
        assert_eq!(get("ErrorCode"), "AssetQuotaExceeded");
        let reason = get("ErrorReason");
        assert!(
            reason.contains("packaging group vod-group-2 is full")
                && reason.contains("vod-group")
                && reason.contains("Resource limit exceeded"),
            "{reason}"
        );
    }
    assert!(emulator.stats().quota_exceeded >= 4);
}
