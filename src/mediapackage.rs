//! The MediaPackage VOD port: the two calls ingestion needs, behind a narrow trait, and the
//! adapter over `aws-sdk-mediapackagevod`.

use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_mediapackagevod::config::retry::RetryConfig;
use aws_sdk_mediapackagevod::config::timeout::TimeoutConfig;
use aws_sdk_mediapackagevod::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_mediapackagevod::operation::RequestId;

use crate::message::{AssetId, AssetRequest};

/// What kind of failure an API error is, which decides what happens to the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// 429 `TooManyRequestsException` for the request rate: retry later.
    Throttled,
    /// 429 `TooManyRequestsException` "Resource limit exceeded": a resource quota is exhausted;
    /// retrying soon cannot help.
    QuotaExceeded,
    /// 5xx, timeouts, connection errors: retry later.
    Transient,
    /// 404 `NotFoundException`.
    NotFound,
    /// 422 `UnprocessableEntityException`, which CreateAsset also answers for an existing id.
    Unprocessable,
    /// 403 `ForbiddenException`: the function or the source role lacks a permission.
    Forbidden,
    /// Anything else a retry cannot fix.
    Permanent,
}

impl ErrorKind {
    /// Whether trying the same call again later can succeed.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Self::Throttled | Self::QuotaExceeded | Self::Transient
        )
    }
}

/// The end of the message MediaPackage VOD gives a 429 for an exhausted resource quota, such as
/// assets per packaging group: "... Resource limit exceeded".
pub const QUOTA_MESSAGE: &str = "Resource limit exceeded";

/// Whether a 429's message is the one of an exhausted resource quota ([`QUOTA_MESSAGE`], with or
/// without a final full stop), not of the request rate.
pub fn is_quota_message(message: &str) -> bool {
    message
        .trim_end()
        .trim_end_matches('.')
        .ends_with(QUOTA_MESSAGE)
}

/// An error from MediaPackage VOD, keeping the AWS error code and request id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    /// How the failure is handled.
    pub kind: ErrorKind,
    /// The AWS error code (`TooManyRequestsException`, ...) or a local one (`TimeoutError`,
    /// `DispatchFailure`, ...).
    pub code: String,
    /// The service's message.
    pub message: String,
    /// `x-amzn-RequestId`, when a response came back.
    pub request_id: Option<String>,
}

impl ApiError {
    /// Builds an error from what the service answered.
    pub fn from_response(status: Option<u16>, code: Option<&str>, message: Option<&str>) -> Self {
        let message = message.unwrap_or_default().to_string();
        // Throttling is told by its status: any 429, whatever its code. Of the 429s, only the
        // exact wording of an exhausted resource quota is a quota refusal ("Rate limit
        // exceeded", say, is throttling).
        let kind = match (code, status) {
            (_, Some(429)) | (Some("TooManyRequestsException"), None) => {
                if is_quota_message(&message) {
                    ErrorKind::QuotaExceeded
                } else {
                    ErrorKind::Throttled
                }
            }
            (Some("InternalServerErrorException" | "ServiceUnavailableException"), _) => {
                ErrorKind::Transient
            }
            (Some("NotFoundException"), _) | (None, Some(404)) => ErrorKind::NotFound,
            (Some("UnprocessableEntityException"), _) => ErrorKind::Unprocessable,
            (Some("ForbiddenException"), _) | (None, Some(403)) => ErrorKind::Forbidden,
            (_, Some(s)) if s >= 500 => ErrorKind::Transient,
            _ => ErrorKind::Permanent,
        };
        let code = code.map_or_else(
            || format!("HTTP{}", status.map_or("?".into(), |s| s.to_string())),
            str::to_string,
        );
        Self {
            kind,
            code,
            message,
            request_id: None,
        }
    }

    /// A failure on this side of the wire.
    pub fn local(kind: ErrorKind, code: &str, message: impl Into<String>) -> Self {
        Self {
            kind,
            code: code.to_string(),
            message: message.into(),
            request_id: None,
        }
    }
}

impl<E> From<SdkError<E>> for ApiError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    fn from(err: SdkError<E>) -> Self {
        let request_id = err.request_id().map(str::to_string);
        let mut error = match &err {
            SdkError::ServiceError(service) => {
                let status = Some(service.raw().status().as_u16());
                ApiError::from_response(status, err.code(), err.message())
            }
            SdkError::TimeoutError(_) => ApiError::local(
                ErrorKind::Transient,
                "TimeoutError",
                "the call did not finish within its timeout",
            ),
            SdkError::DispatchFailure(e) => ApiError::local(
                ErrorKind::Transient,
                "DispatchFailure",
                format!("{:?}", e.as_connector_error()),
            ),
            SdkError::ResponseError(_) => ApiError::local(
                ErrorKind::Transient,
                "ResponseError",
                aws_smithy_types::error::display::DisplayErrorContext(&err).to_string(),
            ),
            _ => ApiError::local(
                ErrorKind::Permanent,
                "ConstructionFailure",
                aws_smithy_types::error::display::DisplayErrorContext(&err).to_string(),
            ),
        };
        error.request_id = request_id;
        error
    }
}

/// One playback endpoint of an asset: one per packaging configuration of its packaging group.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EgressEndpoint {
    /// The packaging configuration the endpoint plays.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packaging_configuration_id: Option<String>,
    /// `QUEUED`, `PROCESSING`, `PLAYABLE` or `FAILED`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// The playback URL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// An asset as CreateAsset or DescribeAsset returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asset {
    /// The source the asset was made from.
    pub source_arn: String,
    /// The packaging group it belongs to.
    pub packaging_group_id: String,
    /// The role MediaPackage read the source with.
    pub source_role_arn: String,
    /// The asset's ARN.
    pub arn: Option<String>,
    /// Where it plays.
    pub egress_endpoints: Vec<EgressEndpoint>,
}

impl Asset {
    /// The asset as `request` would make it.
    pub fn of(request: &AssetRequest) -> Self {
        Self {
            source_arn: request.source_arn.to_string(),
            packaging_group_id: request.packaging_group_id.to_string(),
            source_role_arn: request.source_role_arn.to_string(),
            arn: None,
            egress_endpoints: Vec::new(),
        }
    }

    /// This asset, with what the API left out (as a stand-in may) taken from `request`, the
    /// request that made it.
    pub fn or_request(self, request: &AssetRequest) -> Self {
        let or = |value: String, asked: &str| {
            if value.is_empty() {
                asked.to_string()
            } else {
                value
            }
        };
        Self {
            source_arn: or(self.source_arn, request.source_arn.as_str()),
            packaging_group_id: or(self.packaging_group_id, request.packaging_group_id.as_str()),
            source_role_arn: or(self.source_role_arn, request.source_role_arn.as_str()),
            ..self
        }
    }

    /// How this asset differs from what `request` asks for: the same id with another source,
    /// packaging group or role is another asset. Empty when it is the asset asked for.
    pub fn differences(&self, request: &AssetRequest) -> Vec<String> {
        [
            ("source", &self.source_arn, request.source_arn.as_str()),
            (
                "packaging group",
                &self.packaging_group_id,
                request.packaging_group_id.as_str(),
            ),
            (
                "role",
                &self.source_role_arn,
                request.source_role_arn.as_str(),
            ),
        ]
        .into_iter()
        .filter(|(_, existing, asked)| existing.as_str() != *asked)
        .map(|(what, existing, asked)| format!("{what} {existing}, not {asked}"))
        .collect()
    }
}

/// The MediaPackage VOD calls ingestion makes.
#[async_trait]
pub trait AssetApi: Send + Sync {
    /// CreateAsset. Returns the new asset.
    async fn create_asset(&self, request: &AssetRequest) -> Result<Asset, ApiError>;

    /// DescribeAsset. `Ok(None)` when the asset does not exist.
    async fn describe_asset(&self, id: &AssetId) -> Result<Option<Asset>, ApiError>;
}

/// [`AssetApi`] over the AWS SDK client.
#[derive(Debug, Clone)]
pub struct SdkAssetApi {
    client: aws_sdk_mediapackagevod::Client,
}

impl SdkAssetApi {
    /// Wraps a client built once at cold start.
    pub fn new(client: aws_sdk_mediapackagevod::Client) -> Self {
        Self { client }
    }
}

#[async_trait]
impl AssetApi for SdkAssetApi {
    async fn create_asset(&self, request: &AssetRequest) -> Result<Asset, ApiError> {
        let tags = (!request.tags.is_empty()).then(|| {
            request
                .tags
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        });
        let output = self
            .client
            .create_asset()
            .id(request.id.as_str())
            .packaging_group_id(request.packaging_group_id.as_str())
            .source_arn(request.source_arn.as_str())
            .source_role_arn(request.source_role_arn.as_str())
            .set_resource_id(request.resource_id.clone())
            .set_tags(tags)
            .send()
            .await?;
        Ok(Asset {
            source_arn: output.source_arn().unwrap_or_default().to_string(),
            packaging_group_id: output.packaging_group_id().unwrap_or_default().to_string(),
            source_role_arn: output.source_role_arn().unwrap_or_default().to_string(),
            arn: output.arn().map(str::to_string),
            egress_endpoints: endpoints(output.egress_endpoints()),
        })
    }

    async fn describe_asset(&self, id: &AssetId) -> Result<Option<Asset>, ApiError> {
        match self.client.describe_asset().id(id.as_str()).send().await {
            Ok(output) => Ok(Some(Asset {
                source_arn: output.source_arn().unwrap_or_default().to_string(),
                packaging_group_id: output.packaging_group_id().unwrap_or_default().to_string(),
                source_role_arn: output.source_role_arn().unwrap_or_default().to_string(),
                arn: output.arn().map(str::to_string),
                egress_endpoints: endpoints(output.egress_endpoints()),
            })),
            Err(err) => {
                let error = ApiError::from(err);
                if error.kind == ErrorKind::NotFound {
                    Ok(None)
                } else {
                    Err(error)
                }
            }
        }
    }
}

fn endpoints(sdk: &[aws_sdk_mediapackagevod::types::EgressEndpoint]) -> Vec<EgressEndpoint> {
    sdk.iter()
        .map(|e| EgressEndpoint {
            packaging_configuration_id: e.packaging_configuration_id().map(str::to_string),
            status: e.status().map(str::to_string),
            url: e.url().map(str::to_string),
        })
        .collect()
}

/// The SDK's retry and timeout settings for MediaPackage VOD, set explicitly rather than left to
/// the SDK's defaults. The SDK does not retry (one attempt): retries happen in one layer only,
/// the ingest loop, where every attempt goes through the rate limiter, so no layer multiplies
/// another's calls. Each attempt and the whole operation have a timeout.
pub fn sdk_settings(
    attempt_timeout: Duration,
    operation_timeout: Duration,
) -> (RetryConfig, TimeoutConfig) {
    let retry = RetryConfig::standard().with_max_attempts(1);
    let timeout = TimeoutConfig::builder()
        .connect_timeout(Duration::from_millis(3100).min(attempt_timeout))
        .operation_attempt_timeout(attempt_timeout)
        .operation_timeout(operation_timeout)
        .build();
    (retry, timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_throttling_and_exhausted_quota_are_told_apart() {
        let rate = ApiError::from_response(
            Some(429),
            Some("TooManyRequestsException"),
            Some("Too many requests, please try again."),
        );
        assert_eq!(rate.kind, ErrorKind::Throttled);
        let quota = ApiError::from_response(
            Some(429),
            Some("TooManyRequestsException"),
            Some("Asset quota reached. Resource limit exceeded"),
        );
        assert_eq!(quota.kind, ErrorKind::QuotaExceeded);
    }

    #[test]
    fn every_429_is_throttling_unless_its_message_is_the_exact_quota_one() {
        let kind = |code, message| ApiError::from_response(Some(429), code, Some(message)).kind;
        // Another code on a 429 is still throttling, not a permanent failure.
        assert_eq!(
            kind(Some("ThrottlingException"), "Rate exceeded"),
            ErrorKind::Throttled
        );
        assert_eq!(kind(None, "slow down"), ErrorKind::Throttled);
        // "Rate limit exceeded" is about the rate, not a resource quota.
        assert_eq!(
            kind(Some("TooManyRequestsException"), "Rate limit exceeded"),
            ErrorKind::Throttled
        );
        assert_eq!(
            kind(
                Some("TooManyRequestsException"),
                "Asset quota of 10000 per packaging group reached for g. Resource limit exceeded."
            ),
            ErrorKind::QuotaExceeded
        );
        assert_eq!(
            kind(Some("ThrottlingException"), "Resource limit exceeded"),
            ErrorKind::QuotaExceeded
        );
    }

    #[test]
    fn error_codes_decide_the_kind() {
        let kind = |status, code| ApiError::from_response(Some(status), Some(code), None).kind;
        assert_eq!(
            kind(500, "InternalServerErrorException"),
            ErrorKind::Transient
        );
        assert_eq!(
            kind(503, "ServiceUnavailableException"),
            ErrorKind::Transient
        );
        assert_eq!(kind(403, "ForbiddenException"), ErrorKind::Forbidden);
        assert_eq!(kind(404, "NotFoundException"), ErrorKind::NotFound);
        assert_eq!(
            kind(422, "UnprocessableEntityException"),
            ErrorKind::Unprocessable
        );
        assert!(ErrorKind::Throttled.is_retryable());
        assert!(!ErrorKind::Permanent.is_retryable());
    }

    #[test]
    fn responses_without_a_code_fall_back_on_the_status() {
        assert_eq!(
            ApiError::from_response(Some(502), None, None).kind,
            ErrorKind::Transient
        );
        assert_eq!(
            ApiError::from_response(Some(429), None, None).kind,
            ErrorKind::Throttled
        );
        let teapot = ApiError::from_response(Some(418), None, None);
        assert_eq!(teapot.kind, ErrorKind::Permanent);
        assert_eq!(teapot.code, "HTTP418");
    }
}
