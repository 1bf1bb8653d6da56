//! The Lambda entry point (`bootstrap`): wiring only.

use lambda_runtime::{service_fn, Error, LambdaEvent};
use mpvod_ingest::config::Config;
use mpvod_ingest::ingest::Ingestor;
use mpvod_ingest::mediapackage::SdkAssetApi;
use mpvod_ingest::sqs::SdkQueueApi;

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda_runtime::tracing::init_default_subscriber();
    let config =
        Config::from_env().inspect_err(|e| tracing::error!(error = %e, "cold start failed"))?;
    for warning in config.warnings() {
        tracing::warn!(warning, "configuration");
    }
    let mediapackage = mpvod_ingest::mediapackage_client(&config).await;
    let sqs = mpvod_ingest::sqs_client().await;
    let queue =
        SdkQueueApi::new(sqs).with_dead_letter_queue_url(config.dead_letter_queue_url.clone());
    let ingestor = Ingestor::new(SdkAssetApi::new(mediapackage), config).with_queue(queue);
    let ingestor = &ingestor;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<_>| async move {
        ingestor.handle(event).await
    }))
    .await
}
