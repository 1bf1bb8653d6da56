//! The SQS adapter against a real SQS API (moto, on loopback): queue URL from the event source
//! ARN, visibility changes, and a retried message kept away for its delay.

use std::time::Duration;

use async_trait::async_trait;
use aws_lambda_events::event::sqs::SqsMessage;
use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
use mpvod_ingest::config::Config;
use mpvod_ingest::ingest::Ingestor;
use mpvod_ingest::mediapackage::{ApiError, Asset, AssetApi};
use mpvod_ingest::message::{AssetId, AssetRequest};
use mpvod_ingest::sqs::{QueueApi, SdkQueueApi, VisibilityChange};

use crate::common::far_deadline;

/// moto on 127.0.0.1, with clients for it.
pub struct Moto(mpvod_emulator::moto::Moto);

impl Moto {
    pub async fn start() -> Self {
        Self(mpvod_emulator::moto::Moto::start().await)
    }

    /// The server's endpoint.
    pub fn url(&self) -> &str {
        self.0.url()
    }

    /// An EventBridge client on the same moto server.
    pub fn eventbridge(&self) -> aws_sdk_eventbridge::Client {
        let conf = aws_sdk_eventbridge::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(self.url())
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new("test", "test", None, None, "test"))
            .build();
        aws_sdk_eventbridge::Client::from_conf(conf)
    }

    pub fn client(&self) -> aws_sdk_sqs::Client {
        let conf = aws_sdk_sqs::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(self.url())
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new("test", "test", None, None, "test"))
            .build();
        aws_sdk_sqs::Client::from_conf(conf)
    }
}

/// Creates `name`, sends `bodies`, and receives them as Lambda records with real receipt
/// handles, the queue ARN and the receive count.
async fn received(
    client: &aws_sdk_sqs::Client,
    name: &str,
    bodies: &[&str],
    visibility_timeout: i32,
) -> (String, Vec<SqsMessage>) {
    let url = client
        .create_queue()
        .queue_name(name)
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let arn = client
        .get_queue_attributes()
        .queue_url(&url)
        .attribute_names(aws_sdk_sqs::types::QueueAttributeName::QueueArn)
        .send()
        .await
        .unwrap()
        .attributes
        .unwrap()[&aws_sdk_sqs::types::QueueAttributeName::QueueArn]
        .clone();
    for body in bodies {
        client
            .send_message()
            .queue_url(&url)
            .message_body(*body)
            .send()
            .await
            .unwrap();
    }
    let messages = client
        .receive_message()
        .queue_url(&url)
        .max_number_of_messages(10)
        .visibility_timeout(visibility_timeout)
        .message_system_attribute_names(aws_sdk_sqs::types::MessageSystemAttributeName::All)
        .send()
        .await
        .unwrap()
        .messages
        .unwrap_or_default();
    assert_eq!(messages.len(), bodies.len());
    let records = messages
        .into_iter()
        .map(|m| lambda_record(m, &arn))
        .collect();
    (url, records)
}

/// A received SQS message as the Lambda event record for queue `arn`.
pub fn lambda_record(m: aws_sdk_sqs::types::Message, arn: &str) -> SqsMessage {
    let mut r = SqsMessage::default();
    r.message_id = m.message_id;
    r.receipt_handle = m.receipt_handle;
    r.body = m.body;
    r.event_source_arn = Some(arn.to_string());
    for (k, v) in m.attributes.unwrap_or_default() {
        r.attributes.insert(k.as_str().to_string(), v);
    }
    r
}

async fn visible_now(client: &aws_sdk_sqs::Client, url: &str) -> Vec<String> {
    client
        .receive_message()
        .queue_url(url)
        .max_number_of_messages(10)
        .send()
        .await
        .unwrap()
        .messages
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.body)
        .collect()
}

#[tokio::test]
async fn visibility_changes_reach_the_queue_named_by_the_event_source_arn() {
    let moto = Moto::start().await;
    let client = moto.client();
    let (url, records) = received(&client, "visibility", &["soon", "later"], 30).await;
    let arn = records[0].event_source_arn.clone().unwrap();
    let queue = SdkQueueApi::new(client.clone());
    assert_eq!(queue.queue_url(&arn).await.unwrap(), url);
    let seconds = |r: &SqsMessage| {
        if r.body.as_deref() == Some("soon") {
            0
        } else {
            600
        }
    };
    let changes: Vec<VisibilityChange> = records
        .iter()
        .map(|r| VisibilityChange {
            receipt_handle: r.receipt_handle.clone().unwrap(),
            seconds: seconds(r),
        })
        .chain([VisibilityChange {
            receipt_handle: "not-a-receipt-handle".into(),
            seconds: 5,
        }])
        .collect();
    let results = queue.change_visibility(&arn, &changes).await;
    assert!(results[0].is_ok() && results[1].is_ok(), "{results:?}");
    assert!(
        results[2].is_err(),
        "a bad receipt handle is reported, not hidden"
    );
    assert_eq!(visible_now(&client, &url).await, ["soon"]);
}

#[tokio::test]
async fn an_unknown_queue_is_an_error_for_every_change() {
    let moto = Moto::start().await;
    let queue = SdkQueueApi::new(moto.client());
    let change = VisibilityChange {
        receipt_handle: "x".into(),
        seconds: 1,
    };
    let results = queue
        .change_visibility(
            "arn:aws:sqs:us-east-1:123456789012:missing",
            &[change.clone(), change],
        )
        .await;
    assert_eq!(results.len(), 2);
    assert!(results.iter().all(Result::is_err));
}

#[tokio::test]
async fn the_depth_counts_visible_in_flight_and_delayed_messages() {
    let moto = Moto::start().await;
    let client = moto.client();
    // Two received (in flight), then two visible and one delayed sent after them.
    let (url, records) = received(&client, "depth", &["a", "b"], 30).await;
    let arn = records[0].event_source_arn.clone().unwrap();
    for (body, delay) in [("c", 0), ("d", 0), ("e", 60)] {
        client
            .send_message()
            .queue_url(&url)
            .message_body(body)
            .delay_seconds(delay)
            .send()
            .await
            .unwrap();
    }
    let queue = SdkQueueApi::new(client.clone());
    assert_eq!(queue.depth(&arn).await.unwrap(), 5);
    // Deleting one in-flight message takes it off the count.
    client
        .delete_message()
        .queue_url(&url)
        .receipt_handle(records[0].receipt_handle.clone().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(queue.depth(&arn).await.unwrap(), 4);
    let missing = queue
        .depth("arn:aws:sqs:us-east-1:123456789012:missing")
        .await
        .unwrap_err();
    assert_eq!(missing.code, "AWS.SimpleQueueService.NonExistentQueue");
}

/// An API whose every call says the asset quota is exhausted.
struct QuotaExhausted;

#[async_trait]
impl AssetApi for QuotaExhausted {
    async fn create_asset(&self, _: &AssetRequest) -> Result<Asset, ApiError> {
        Err(ApiError::from_response(
            Some(429),
            Some("TooManyRequestsException"),
            Some("Asset quota reached. Resource limit exceeded"),
        ))
    }

    async fn describe_asset(&self, _: &AssetId) -> Result<Option<Asset>, ApiError> {
        unreachable!("not called for a quota refusal")
    }
}

#[tokio::test]
async fn a_message_refused_for_an_exhausted_quota_is_reported_and_kept_away_for_the_quota_delay() {
    let moto = Moto::start().await;
    let client = moto.client();
    let body = r#"{"id":"q1","packagingGroupId":"vod-group","sourceArn":"arn:aws:s3:::media-masters/q1.m3u8","sourceRoleArn":"arn:aws:iam::123456789012:role/MediaPackageVodSourceRead"}"#;
    let (url, records) = received(&client, "quota", &[body], 0).await;
    let config = Config {
        quota_redelivery: Duration::from_secs(1800),
        ..crate::common::test_config()
    };
    let ingestor =
        Ingestor::new(QuotaExhausted, config).with_queue(SdkQueueApi::new(client.clone()));
    let response = ingestor
        .handle_batch(&records, far_deadline())
        .await
        .unwrap();
    assert_eq!(response.batch_item_failures.len(), 1);
    assert_eq!(
        ingestor.redelivery_delays(
            &records,
            &ingestor.process_batch(&records, far_deadline()).await,
            &Default::default(),
            || 0.5
        ),
        [Some(1800)]
    );
    assert_eq!(
        ingestor.limiter().stats().rate,
        50.0,
        "a quota refusal does not cut the rate"
    );
    // Received with a visibility timeout of 0, the message would be back at once: only the
    // delay the function set keeps it away.
    assert!(visible_now(&client, &url).await.is_empty());
}
