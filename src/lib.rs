//! Ingest AWS Elemental MediaPackage VOD assets from an SQS queue.
//!
//! The Lambda handler ([`ingest::Ingestor::handle`]) turns each SQS message into a CreateAsset
//! call and reports exactly the messages SQS must deliver again as partial batch failures.

pub mod backoff;
pub mod config;
pub mod drain;
pub mod envelope;
pub mod ingest;
pub mod limiter;
pub mod mediapackage;
pub mod message;
pub mod redelivery;
pub mod sqs;

use aws_config::BehaviorVersion;

use crate::config::Config;

/// Builds the MediaPackage VOD client once, at cold start: region, credentials and endpoint
/// from the standard AWS chain (so `AWS_ENDPOINT_URL_MEDIAPACKAGE_VOD` or `AWS_ENDPOINT_URL`
/// point it at a stand-in), with this function's explicit retry and timeout settings.
pub async fn mediapackage_client(config: &Config) -> aws_sdk_mediapackagevod::Client {
    let (retry, timeout) =
        mediapackage::sdk_settings(config.api_attempt_timeout, config.api_timeout);
    let shared = aws_config::defaults(BehaviorVersion::latest())
        .retry_config(retry)
        .timeout_config(timeout)
        .load()
        .await;
    aws_sdk_mediapackagevod::Client::new(&shared)
}

/// Builds the SQS client once, at cold start, from the standard AWS chain
/// (`AWS_ENDPOINT_URL_SQS` or `AWS_ENDPOINT_URL` point it at a stand-in). Its calls happen after
/// the batch, inside the deadline margin, so they are short: 1 s per attempt, 2 attempts.
pub async fn sqs_client() -> aws_sdk_sqs::Client {
    use std::time::Duration;
    let shared = aws_config::defaults(BehaviorVersion::latest())
        .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(2))
        .timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .connect_timeout(Duration::from_millis(500))
                .operation_attempt_timeout(Duration::from_secs(1))
                .operation_timeout(Duration::from_millis(1800))
                .build(),
        )
        .load()
        .await;
    aws_sdk_sqs::Client::new(&shared)
}
