//! Ingest AWS Elemental MediaPackage VOD assets from an SQS queue.
//!
//! The Lambda handler ([`ingest::Ingestor::handle`]) turns each SQS message into a CreateAsset
//! call and reports exactly the messages SQS must deliver again as partial batch failures.

pub mod backoff;
pub mod config;
pub mod drain;
pub mod envelope;
pub mod events;
pub mod ingest;
pub mod limiter;
pub mod mediapackage;
pub mod message;
pub mod metrics;
pub mod redelivery;
pub mod sqs;

use std::time::Duration;

use aws_config::{BehaviorVersion, SdkConfig};

use crate::config::Config;

/// The AWS settings every client shares, loaded once at cold start from the standard chain:
/// region, credentials, and endpoints (`AWS_ENDPOINT_URL_MEDIAPACKAGE_VOD`,
/// `AWS_ENDPOINT_URL_SQS`, `AWS_ENDPOINT_URL_EVENTBRIDGE`, or `AWS_ENDPOINT_URL` for all, point
/// a client at a stand-in).
pub async fn sdk_config() -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest()).load().await
}

/// The MediaPackage VOD client, with this function's explicit retry and timeout settings
/// ([`mediapackage::sdk_settings`]).
pub fn mediapackage_client(shared: &SdkConfig, config: &Config) -> aws_sdk_mediapackagevod::Client {
    let (retry, timeout) =
        mediapackage::sdk_settings(config.api_attempt_timeout, config.api_timeout);
    aws_sdk_mediapackagevod::Client::from_conf(
        aws_sdk_mediapackagevod::config::Builder::from(shared)
            .retry_config(retry)
            .timeout_config(timeout)
            .build(),
    )
}

/// Retries and timeouts of the calls made after the batch, inside the deadline margin (SQS,
/// EventBridge): short, 1 s per attempt, 2 attempts.
fn reporting_settings() -> (
    aws_config::retry::RetryConfig,
    aws_config::timeout::TimeoutConfig,
) {
    (
        aws_config::retry::RetryConfig::standard().with_max_attempts(2),
        aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(Duration::from_millis(500))
            .operation_attempt_timeout(Duration::from_secs(1))
            .operation_timeout(Duration::from_millis(1800))
            .build(),
    )
}

/// The SQS client: its calls happen after the batch, inside the deadline margin.
pub fn sqs_client(shared: &SdkConfig) -> aws_sdk_sqs::Client {
    let (retry, timeout) = reporting_settings();
    aws_sdk_sqs::Client::from_conf(
        aws_sdk_sqs::config::Builder::from(shared)
            .retry_config(retry)
            .timeout_config(timeout)
            .build(),
    )
}

/// The EventBridge client, for completion events ([`events`]), published after the batch.
pub fn eventbridge_client(shared: &SdkConfig) -> aws_sdk_eventbridge::Client {
    let (retry, timeout) = reporting_settings();
    aws_sdk_eventbridge::Client::from_conf(
        aws_sdk_eventbridge::config::Builder::from(shared)
            .retry_config(retry)
            .timeout_config(timeout)
            .build(),
    )
}
