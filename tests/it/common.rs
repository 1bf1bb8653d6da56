//! Helpers shared by the integration tests.

use std::path::PathBuf;
use std::time::Duration;

use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage};
use aws_sdk_mediapackagevod::config::retry::RetryPartition;
use aws_sdk_mediapackagevod::config::{BehaviorVersion, Credentials, Region};
use mpvod_ingest::config::Config;
use mpvod_ingest::mediapackage::sdk_settings;

pub const ROLE: &str = "arn:aws:iam::123456789012:role/MediaPackageVodSourceRead";

/// A sample event from `events/`.
pub fn event(name: &str) -> SqsEvent {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("events")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path:?}: {e}"))
}

/// The message ids of the records, in order.
pub fn ids(records: &[SqsMessage]) -> Vec<String> {
    records
        .iter()
        .map(|r| r.message_id.clone().unwrap())
        .collect()
}

/// The item identifiers of a batch response, in order.
pub fn reported(response: &aws_lambda_events::event::sqs::SqsBatchResponse) -> Vec<String> {
    response
        .batch_item_failures
        .iter()
        .map(|f| f.item_identifier.clone())
        .collect()
}

/// Settings fit for tests: a limiter that starts fast and may wait long for a slot, so a test
/// sees its retries happen within the invocation.
pub fn test_config() -> Config {
    Config {
        initial_rate: Some(50.0),
        permit_wait: Duration::from_secs(5),
        ..Config::default()
    }
}

/// A retry partition of its own, so the SDK's process-wide retry token bucket, drained by one
/// throttling test, does not starve the retries of another test running beside it.
pub fn own_retry_partition() -> RetryPartition {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    RetryPartition::new(format!("test-{n}"))
}

/// A real SDK client pointed at `url`, with the function's retry and timeout settings.
pub fn sdk_client(url: &str, config: &Config) -> aws_sdk_mediapackagevod::Client {
    let (retry, timeout) = sdk_settings(config.api_attempt_timeout, config.api_timeout);
    let conf = aws_sdk_mediapackagevod::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(url)
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "test"))
        .retry_config(retry)
        .timeout_config(timeout)
        .retry_partition(own_retry_partition())
        .build();
    aws_sdk_mediapackagevod::Client::from_conf(conf)
}

/// A deadline far enough away not to matter.
pub fn far_deadline() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(60)
}
