//! The baseline `make footprint` measures this function against: `cargo lambda new`'s function
//! template (`lambda_runtime` with its default tracing subscriber) plus one SDK client, built
//! with the same profile. It makes one CreateAsset per message, all at once, and reports the
//! failed ones; no limiter, no dead-letter queue, no events, no metrics.

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use lambda_runtime::{service_fn, Error, LambdaEvent};
use serde_json::Value;

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda_runtime::tracing::init_default_subscriber();
    let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let client = aws_sdk_mediapackagevod::Client::new(&config);
    let client = &client;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<SqsEvent>| async move {
        let calls = event.payload.records.iter().map(|record| async move {
            let body: Value = serde_json::from_str(record.body.as_deref().unwrap_or_default())
                .map_err(|e| e.to_string())?;
            let field = |name: &str| body[name].as_str().map(str::to_string);
            client
                .create_asset()
                .set_id(field("id"))
                .set_packaging_group_id(field("packagingGroupId"))
                .set_source_arn(field("sourceArn"))
                .set_source_role_arn(field("sourceRoleArn"))
                .send()
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
        let results = futures::future::join_all(calls).await;
        let mut response = SqsBatchResponse::default();
        for (record, result) in event.payload.records.iter().zip(results) {
            if result.is_err() {
                response.add_failure(record.message_id.clone().unwrap_or_default());
            }
        }
        Ok::<_, Error>(response)
    }))
    .await
}
