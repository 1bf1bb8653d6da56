//! The Lambda entry point (`bootstrap`): wiring only.

use lambda_runtime::{service_fn, Error, LambdaEvent};
use mpvod_ingest::config::Config;
use mpvod_ingest::events::SdkEventBus;
use mpvod_ingest::ingest::Ingestor;
use mpvod_ingest::mediapackage::SdkAssetApi;
use mpvod_ingest::metrics::Emf;
use mpvod_ingest::sqs::SdkQueueApi;

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda_runtime::tracing::init_default_subscriber();
    let config =
        Config::from_env().inspect_err(|e| tracing::error!(error = %e, "cold start failed"))?;
    for warning in config.warnings() {
        tracing::warn!(warning, "configuration");
    }
    let shared = mpvod_ingest::sdk_config().await;
    let mediapackage = mpvod_ingest::mediapackage_client(&shared, &config);
    let queue = SdkQueueApi::new(mpvod_ingest::sqs_client(&shared))
        .with_dead_letter_queue_url(config.dead_letter_queue_url.clone());
    let bus = config.event_bus.clone();
    let mut ingestor = Ingestor::new(SdkAssetApi::new(mediapackage), config).with_queue(queue);
    let (namespace, service) = mpvod_ingest::metrics::names(|var| std::env::var(var).ok());
    match Emf::install(&namespace, &service) {
        Ok(emf) => ingestor = ingestor.with_metrics(emf),
        Err(error) => tracing::warn!(
            error,
            "metrics disabled: the recorder could not be installed"
        ),
    }
    if let Some(bus) = bus {
        let client = mpvod_ingest::eventbridge_client(&shared);
        ingestor = ingestor.with_events(SdkEventBus::new(client, bus));
    }
    let ingestor = &ingestor;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<_>| async move {
        ingestor.handle(event).await
    }))
    .await
}
