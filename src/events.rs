//! Completion events: an `Asset Created` event on an EventBridge bus for each asset a message
//! made or found, so the next step of a pipeline knows the asset exists and where it plays.
//!
//! Off unless `EVENT_BUS_NAME` is set. Events go out in `PutEvents` calls of up to
//! [`MAX_ENTRIES`] entries after the batch is processed, and each entry's result is checked: a
//! message whose event was not published is retried, and its asset is then found existing and
//! published again (with `found: true`).

use async_trait::async_trait;
use serde::Serialize;

use crate::mediapackage::EgressEndpoint;

/// The events' `source`.
pub const SOURCE: &str = "mediapackage-vod-ingest";

/// The events' `detail-type`.
pub const DETAIL_TYPE: &str = "Asset Created";

/// The most entries one `PutEvents` call takes.
pub const MAX_ENTRIES: usize = 10;

/// The `detail` of an `Asset Created` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AssetEvent {
    /// The asset's id.
    pub asset_id: String,
    /// The asset's ARN.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arn: Option<String>,
    /// The packaging group the asset is in: the one asked for, or an overflow group.
    pub packaging_group_id: String,
    /// The packaging group the message asked for.
    pub requested_packaging_group_id: String,
    /// The source the asset was made from.
    pub source_arn: String,
    /// The role MediaPackage VOD read the source with.
    pub source_role_arn: String,
    /// The message's `resourceId`, if it gave one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource_id: Option<String>,
    /// Where the asset plays: one endpoint per packaging configuration of its group.
    pub egress_endpoints: Vec<EgressEndpoint>,
    /// `true` when the asset already existed (a redelivery after success), `false` when this
    /// delivery made it.
    pub found: bool,
    /// The SQS message that asked for the asset.
    pub message_id: String,
    /// The shape the request came in: `request`, `s3-event`, `eventbridge`, `sns(...)`.
    pub envelope: String,
}

/// A failure to publish, for one entry or a whole call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct PublishError {
    /// The EventBridge error code, or a local one.
    pub code: String,
    /// What went wrong.
    pub message: String,
}

/// Where completion events go.
#[async_trait]
pub trait EventBus: Send + Sync {
    /// Publishes up to [`MAX_ENTRIES`] events in one call. `Ok` holds one result per event, in
    /// order; `Err` means none was published.
    async fn put(
        &self,
        events: &[AssetEvent],
    ) -> Result<Vec<Result<(), PublishError>>, PublishError>;
}

/// [`EventBus`] over the EventBridge SDK client.
#[derive(Debug, Clone)]
pub struct SdkEventBus {
    client: aws_sdk_eventbridge::Client,
    bus: String,
}

impl SdkEventBus {
    /// Publishes to `bus`, a bus name or ARN.
    pub fn new(client: aws_sdk_eventbridge::Client, bus: impl Into<String>) -> Self {
        Self {
            client,
            bus: bus.into(),
        }
    }
}

#[async_trait]
impl EventBus for SdkEventBus {
    async fn put(
        &self,
        events: &[AssetEvent],
    ) -> Result<Vec<Result<(), PublishError>>, PublishError> {
        use aws_sdk_eventbridge::error::ProvideErrorMetadata;
        use aws_sdk_eventbridge::types::PutEventsRequestEntry;
        let now = aws_smithy_types::DateTime::from(std::time::SystemTime::now());
        let entries = events
            .iter()
            .map(|event| {
                PutEventsRequestEntry::builder()
                    .event_bus_name(&self.bus)
                    .source(SOURCE)
                    .detail_type(DETAIL_TYPE)
                    .detail(serde_json::to_string(event).expect("an event serializes"))
                    .set_resources(event.arn.clone().map(|arn| vec![arn]))
                    .time(now)
                    .build()
            })
            .collect();
        let output = self
            .client
            .put_events()
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|err| PublishError {
                code: err.code().unwrap_or("PutEventsFailed").to_string(),
                message: aws_smithy_types::error::display::DisplayErrorContext(&err).to_string(),
            })?;
        let results = output.entries();
        Ok((0..events.len())
            .map(|i| match results.get(i) {
                Some(entry) if entry.error_code().is_none() && entry.event_id().is_some() => Ok(()),
                Some(entry) => Err(PublishError {
                    code: entry.error_code().unwrap_or("NoEventId").to_string(),
                    message: entry.error_message().unwrap_or_default().to_string(),
                }),
                None => Err(PublishError {
                    code: "MissingEntry".into(),
                    message: "PutEvents returned fewer results than entries".into(),
                }),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_detail_is_camel_case_and_leaves_out_what_is_unknown() {
        let event = AssetEvent {
            asset_id: "show-s01e01".into(),
            arn: None,
            packaging_group_id: "vod-group-2".into(),
            requested_packaging_group_id: "vod-group".into(),
            source_arn: "arn:aws:s3:::media/show/s01e01.m3u8".into(),
            source_role_arn: "arn:aws:iam::123456789012:role/Read".into(),
            resource_id: None,
            egress_endpoints: vec![EgressEndpoint {
                packaging_configuration_id: Some("hls".into()),
                status: Some("QUEUED".into()),
                url: None,
            }],
            found: false,
            message_id: "m1".into(),
            envelope: "request".into(),
        };
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["assetId"], "show-s01e01");
        assert_eq!(json["requestedPackagingGroupId"], "vod-group");
        assert_eq!(
            json["egressEndpoints"][0]["packagingConfigurationId"],
            "hls"
        );
        assert!(json.get("arn").is_none() && json.get("resourceId").is_none());
        assert!(json["egressEndpoints"][0].get("url").is_none());
        assert_eq!(json["found"], false);
    }
}
