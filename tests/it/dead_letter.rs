//! Poison messages and FIFO batches against a real SQS API (moto, on loopback) and the
//! MediaPackage VOD emulator: the dead-letter queue found from the source queue's
//! `RedrivePolicy` receives each poison message with its reason, valid messages become assets,
//! and a FIFO batch keeps its group order.

use std::collections::HashMap;

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsMessage};
use aws_sdk_sqs::types::{MessageSystemAttributeName, QueueAttributeName};
use mpvod_emulator::{EmulatorConfig, RunningEmulator};
use mpvod_ingest::config::Config;
use mpvod_ingest::ingest::Ingestor;
use mpvod_ingest::mediapackage::SdkAssetApi;
use mpvod_ingest::sqs::SdkQueueApi;

use crate::common::{event, far_deadline, reported, sdk_client, test_config, ROLE};
use crate::sqs::{lambda_record, Moto};

/// Creates `name` (FIFO if it ends in `.fifo`) with extra attributes; returns URL and ARN.
pub(crate) async fn create_queue(
    client: &aws_sdk_sqs::Client,
    name: &str,
    attributes: &[(QueueAttributeName, String)],
) -> (String, String) {
    let mut create = client.create_queue().queue_name(name);
    if name.ends_with(".fifo") {
        create = create.attributes(QueueAttributeName::FifoQueue, "true");
    }
    for (k, v) in attributes {
        create = create.attributes(k.clone(), v);
    }
    let url = create.send().await.unwrap().queue_url.unwrap();
    let arn = client
        .get_queue_attributes()
        .queue_url(&url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .unwrap()
        .attributes
        .unwrap()[&QueueAttributeName::QueueArn]
        .clone();
    (url, arn)
}

/// A source queue `name` whose redrive policy targets a new dead-letter queue; returns the
/// source queue's URL and ARN and the dead-letter queue's URL.
pub(crate) async fn queue_with_dead_letter_queue(
    client: &aws_sdk_sqs::Client,
    name: &str,
) -> (String, String, String) {
    let dlq_name = match name.strip_suffix(".fifo") {
        Some(stem) => format!("{stem}-dlq.fifo"),
        None => format!("{name}-dlq"),
    };
    let (dlq_url, dlq_arn) = create_queue(client, &dlq_name, &[]).await;
    let policy = format!(r#"{{"deadLetterTargetArn":"{dlq_arn}","maxReceiveCount":"5"}}"#);
    let (url, arn) =
        create_queue(client, name, &[(QueueAttributeName::RedrivePolicy, policy)]).await;
    (url, arn, dlq_url)
}

/// Sends the bodies (with their FIFO group, if any) and receives them as Lambda records.
pub(crate) async fn send_and_receive(
    client: &aws_sdk_sqs::Client,
    url: &str,
    arn: &str,
    messages: &[(String, Option<String>)],
) -> Vec<SqsMessage> {
    for (n, (body, group)) in messages.iter().enumerate() {
        let mut send = client.send_message().queue_url(url).message_body(body);
        if let Some(group) = group {
            send = send
                .message_group_id(group)
                .message_deduplication_id(format!("m{n}"));
        }
        send.send().await.unwrap();
    }
    let received = client
        .receive_message()
        .queue_url(url)
        .max_number_of_messages(10)
        .visibility_timeout(60)
        .message_system_attribute_names(MessageSystemAttributeName::All)
        .send()
        .await
        .unwrap()
        .messages
        .unwrap_or_default();
    assert_eq!(received.len(), messages.len());
    received
        .into_iter()
        .map(|m| lambda_record(m, arn))
        .collect()
}

/// Everything in a queue now, with message and system attributes.
pub(crate) async fn drain(
    client: &aws_sdk_sqs::Client,
    url: &str,
) -> Vec<aws_sdk_sqs::types::Message> {
    let mut all = Vec::new();
    loop {
        let batch = client
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(10)
            .message_attribute_names("All")
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .send()
            .await
            .unwrap()
            .messages
            .unwrap_or_default();
        if batch.is_empty() {
            return all;
        }
        all.extend(batch);
    }
}

/// The function as `make invoke` configures it, over the emulator and moto.
fn ingestor(emulator: &RunningEmulator, sqs: aws_sdk_sqs::Client) -> Ingestor<SdkAssetApi> {
    ingestor_with(emulator, sqs, &[])
}

/// The function as `make invoke` configures it with the environment variables `vars` on top.
pub(crate) fn ingestor_with(
    emulator: &RunningEmulator,
    sqs: aws_sdk_sqs::Client,
    vars: &[(&str, &str)],
) -> Ingestor<SdkAssetApi> {
    let config = Config::from_lookup(|name| {
        if let Some((_, value)) = vars.iter().find(|(var, _)| *var == name) {
            return Some(value.to_string());
        }
        match name {
            "PACKAGING_GROUP_ID" => Some("vod-group".into()),
            "SOURCE_ROLE_ARN" => Some(ROLE.into()),
            "ALLOWED_SOURCE_BUCKETS" => Some("media-masters".into()),
            _ => None,
        }
    })
    .unwrap();
    let config = Config {
        initial_rate: test_config().initial_rate,
        permit_wait: test_config().permit_wait,
        ..config
    };
    let api = SdkAssetApi::new(sdk_client(&emulator.url(), &config));
    Ingestor::new(api, config).with_queue(SdkQueueApi::new(sqs))
}

pub(crate) async fn emulator() -> RunningEmulator {
    EmulatorConfig::default()
        .with_packaging_group("vod-group")
        .spawn()
        .await
        .unwrap()
}

/// The bodies of a sample event, with their FIFO message group if they have one.
pub(crate) fn sample(name: &str) -> Vec<(String, Option<String>)> {
    event(name)
        .records
        .into_iter()
        .map(|r| (r.body.unwrap(), r.attributes.get("MessageGroupId").cloned()))
        .collect()
}

/// One invocation of the function, as `make invoke` configures it, on `records`.
async fn handle(
    emulator: &RunningEmulator,
    client: &aws_sdk_sqs::Client,
    records: &[SqsMessage],
) -> SqsBatchResponse {
    ingestor(emulator, client.clone())
        .handle_batch(records, far_deadline())
        .await
        .unwrap()
}

#[tokio::test]
async fn poison_messages_land_in_the_dead_letter_queue_with_their_reason() {
    let moto = Moto::start().await;
    let client = moto.client();
    let emulator = emulator().await;
    let (url, arn, dlq_url) = queue_with_dead_letter_queue(&client, "ingest").await;
    let records = send_and_receive(&client, &url, &arn, &sample("poison.json")).await;
    let response = handle(&emulator, &client, &records).await;

    // Every message is settled: nothing for SQS to redeliver.
    assert!(reported(&response).is_empty(), "{response:?}");
    let assets: Vec<_> = emulator.assets().into_iter().map(|a| a.id).collect();
    assert_eq!(assets, ["show-five-s01e07"]);
    let letters = drain(&client, &dlq_url).await;
    assert_eq!(letters.len(), 6, "{letters:?}");
    let by_id: HashMap<_, _> = records
        .iter()
        .map(|r| (r.message_id.clone().unwrap(), r))
        .collect();
    for letter in &letters {
        let attributes = letter.message_attributes.clone().unwrap();
        let get = |name: &str| {
            attributes
                .get(name)
                .and_then(|v| v.string_value.clone())
                .unwrap_or_else(|| panic!("{name} missing from {attributes:?}"))
        };
        let original = by_id[&get("OriginalMessageId")];
        assert_eq!(letter.body, original.body, "the body is kept as it was");
        assert_eq!(get("ReceiveCount"), "1");
        assert_eq!(get("SourceQueueArn"), arn);
        let code = get("ErrorCode");
        assert!(
            code == "InvalidMessage" || code == "SourceRefused",
            "{code}"
        );
        assert!(!get("ErrorReason").is_empty());
    }
    emulator.shutdown().await;
}

#[tokio::test]
async fn dead_letter_queue_url_overrides_the_redrive_policy() {
    let moto = Moto::start().await;
    let client = moto.client();
    let emulator = emulator().await;
    let (url, arn, policy_dlq_url) = queue_with_dead_letter_queue(&client, "override").await;
    let (chosen_url, _) = create_queue(&client, "chosen-dlq", &[]).await;
    let records = send_and_receive(&client, &url, &arn, &[("{not json".into(), None)]).await;
    let ingestor = ingestor(&emulator, client.clone()).with_queue(
        SdkQueueApi::new(client.clone()).with_dead_letter_queue_url(Some(chosen_url.clone())),
    );
    let response = ingestor
        .handle_batch(&records, far_deadline())
        .await
        .unwrap();
    assert!(reported(&response).is_empty());
    assert_eq!(drain(&client, &chosen_url).await.len(), 1);
    assert!(drain(&client, &policy_dlq_url).await.is_empty());
}

#[tokio::test]
async fn without_a_redrive_policy_poison_messages_are_reported_for_redelivery() {
    let moto = Moto::start().await;
    let client = moto.client();
    let emulator = emulator().await;
    let (url, arn) = create_queue(&client, "no-dlq", &[]).await;
    let bodies = [
        ("{not json".to_string(), None),
        (
            r#"{"id":"ok-1","sourceArn":"arn:aws:s3:::media-masters/ok/1.m3u8"}"#.to_string(),
            None,
        ),
    ];
    let records = send_and_receive(&client, &url, &arn, &bodies).await;
    let response = handle(&emulator, &client, &records).await;
    let poison = records
        .iter()
        .find(|r| r.body.as_deref() == Some("{not json"))
        .unwrap();
    assert_eq!(reported(&response), [poison.message_id.clone().unwrap()]);
    assert_eq!(emulator.assets().len(), 1);
}

#[tokio::test]
async fn a_fifo_batch_keeps_its_group_order_and_its_poison_goes_to_the_fifo_dead_letter_queue() {
    let moto = Moto::start().await;
    let client = moto.client();
    let emulator = emulator().await;
    let (url, arn, dlq_url) = queue_with_dead_letter_queue(&client, "ingest.fifo").await;
    let records = send_and_receive(&client, &url, &arn, &sample("fifo.json")).await;
    let response = handle(&emulator, &client, &records).await;

    assert!(reported(&response).is_empty(), "{response:?}");
    let created: Vec<_> = emulator.assets().into_iter().map(|a| a.id).collect();
    let position = |id: &str| created.iter().position(|c| c == id).unwrap();
    assert!(position("show-six-s01e01") < position("show-six-s01e03"));
    assert!(position("show-seven-s01e01") < position("show-seven-s01e02"));
    assert_eq!(created.len(), 4, "{created:?}");
    assert_eq!(
        emulator.stats().requests,
        4,
        "the repeated asset made no second call"
    );
    let letters = drain(&client, &dlq_url).await;
    assert_eq!(letters.len(), 1);
    let system = letters[0].attributes.clone().unwrap();
    assert_eq!(
        system
            .get(&MessageSystemAttributeName::MessageGroupId)
            .map(String::as_str),
        Some("show-six")
    );
    assert_eq!(
        letters[0].body.as_deref(),
        Some(r#"{"id":"show-six-s01e02""#)
    );
}

/// The dead letters' attribute `name`, by message body.
fn letter_attribute(letter: &aws_sdk_sqs::types::Message, name: &str) -> String {
    letter
        .message_attributes
        .as_ref()
        .and_then(|a| a.get(name))
        .and_then(|v| v.string_value.clone())
        .unwrap_or_else(|| panic!("{name} missing from {letter:?}"))
}

#[tokio::test]
async fn a_message_still_failing_on_its_last_delivery_is_dead_lettered_with_its_last_error() {
    let moto = Moto::start().await;
    let client = moto.client();
    // Every call fails with a 500 or a 503: retrying cannot help within the invocation.
    let emulator = EmulatorConfig::default()
        .with_packaging_group("vod-group")
        .with_fault_rate(1.0)
        .spawn()
        .await
        .unwrap();
    // maxReceiveCount 5 in the queue's redrive policy, MAX_RECEIVE_COUNT unset: learned.
    let (url, arn, dlq_url) = queue_with_dead_letter_queue(&client, "exhausted").await;
    let bodies = [
        (
            r#"{"id":"fourth","sourceArn":"arn:aws:s3:::media-masters/a/4.m3u8"}"#.to_string(),
            None,
        ),
        (
            r#"{"id":"fifth","sourceArn":"arn:aws:s3:::media-masters/a/5.m3u8"}"#.to_string(),
            None,
        ),
    ];
    let mut records = send_and_receive(&client, &url, &arn, &bodies).await;
    for record in &mut records {
        let receives = if record.body.as_deref().unwrap().contains("fourth") {
            "4"
        } else {
            "5"
        };
        record
            .attributes
            .insert("ApproximateReceiveCount".into(), receives.into());
    }
    let response = handle(&emulator, &client, &records).await;
    let fourth = records
        .iter()
        .find(|r| r.body.as_deref().unwrap().contains("fourth"))
        .unwrap();
    // The fourth receive has a delivery left: reported for redelivery. The fifth and last is
    // not left for SQS to dead-letter without a reason.
    assert_eq!(reported(&response), [fourth.message_id.clone().unwrap()]);
    let letters = drain(&client, &dlq_url).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert!(letter.body.as_deref().unwrap().contains("fifth"));
    assert_eq!(letter_attribute(letter, "ErrorCode"), "RetriesExhausted");
    assert_eq!(letter_attribute(letter, "ReceiveCount"), "5");
    let reason = letter_attribute(letter, "ErrorReason");
    assert!(reason.contains("maxReceiveCount 5"), "{reason}");
    let last = letter_attribute(letter, "LastError");
    assert!(
        last.starts_with("InternalServerErrorException")
            || last.starts_with("ServiceUnavailableException"),
        "{last}"
    );
}

#[tokio::test]
async fn a_message_with_no_visibility_time_left_is_dead_lettered_not_redelivered_at_once() {
    let moto = Moto::start().await;
    let client = moto.client();
    // The packaging group is full: every CreateAsset is refused for quota.
    let emulator = EmulatorConfig::default()
        .with_packaging_group("vod-group")
        .with_asset_quota(0)
        .spawn()
        .await
        .unwrap();
    let (url, arn, dlq_url) = queue_with_dead_letter_queue(&client, "no-room").await;
    let body = r#"{"id":"late","sourceArn":"arn:aws:s3:::media-masters/late.m3u8"}"#;
    let mut records = send_and_receive(&client, &url, &arn, &[(body.into(), None)]).await;
    // First received 12 hours ago, on its second receive of five.
    let twelve_hours_ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        - 12 * 3600 * 1000;
    records[0].attributes.insert(
        "ApproximateFirstReceiveTimestamp".into(),
        twelve_hours_ago.to_string(),
    );
    records[0]
        .attributes
        .insert("ApproximateReceiveCount".into(), "2".into());
    let response = handle(&emulator, &client, &records).await;
    assert!(reported(&response).is_empty(), "{response:?}");
    let letters = drain(&client, &dlq_url).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(
        letter_attribute(&letters[0], "ErrorCode"),
        "RetriesExhausted"
    );
    assert!(letter_attribute(&letters[0], "ErrorReason").contains("12 hours"));
    assert!(letter_attribute(&letters[0], "LastError").contains("Resource limit exceeded"));
}
