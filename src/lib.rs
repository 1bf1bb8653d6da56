//! Ingest AWS Elemental MediaPackage VOD assets from an SQS queue.
//!
//! The Lambda handler ([`ingest::Ingestor::handle`]) turns each SQS message into a CreateAsset
//! call and reports exactly the messages SQS must deliver again as partial batch failures.

pub mod config;
pub mod ingest;
pub mod mediapackage;
pub mod message;

use aws_config::BehaviorVersion;

use crate::config::Config;

/// Builds the MediaPackage VOD client once, at cold start: region, credentials and endpoint
/// from the standard AWS chain (so `AWS_ENDPOINT_URL_MEDIAPACKAGE_VOD` or `AWS_ENDPOINT_URL`
/// point it at a stand-in), with this function's explicit retry and timeout settings.
pub async fn mediapackage_client(config: &Config) -> aws_sdk_mediapackagevod::Client {
    let (retry, timeout) = mediapackage::sdk_settings(
        config.api_max_attempts,
        config.api_initial_backoff,
        config.api_attempt_timeout,
        config.api_timeout,
    );
    let shared = aws_config::defaults(BehaviorVersion::latest())
        .retry_config(retry)
        .timeout_config(timeout)
        .load()
        .await;
    aws_sdk_mediapackagevod::Client::new(&shared)
}
