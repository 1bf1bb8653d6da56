//! The handler's decisions on scripted MediaPackage VOD answers (aws-smithy-mocks): throttling,
//! idempotent redelivery, and permanent refusals.

use aws_sdk_mediapackagevod::operation::create_asset::CreateAssetOutput;
use aws_sdk_mediapackagevod::operation::describe_asset::DescribeAssetOutput;
use aws_sdk_mediapackagevod::Client;
use aws_smithy_mocks::{mock, mock_client, Rule, RuleMode};
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::http::StatusCode;
use aws_smithy_types::body::SdkBody;
use mpvod_ingest::config::Config;
use mpvod_ingest::ingest::{Ingestor, Outcome, Turn};
use mpvod_ingest::mediapackage::{sdk_settings, SdkAssetApi};
use mpvod_ingest::message::{AssetRequest, Defaults};

use crate::common::{far_deadline, own_retry_partition, test_config, ROLE};

const SOURCE: &str = "arn:aws:s3:::media-masters/show/s01e01/index.m3u8";

/// An error answered the way the service answers it on the wire.
fn error_response(status: u16, code: &'static str, message: &'static str) -> HttpResponse {
    let body = format!(r#"{{"message":"{message}"}}"#);
    let mut response =
        HttpResponse::new(StatusCode::try_from(status).unwrap(), SdkBody::from(body));
    response.headers_mut().insert("x-amzn-ErrorType", code);
    response
        .headers_mut()
        .insert("x-amzn-RequestId", "req-1234");
    response
        .headers_mut()
        .insert("content-type", "application/json");
    response
}

fn throttled() -> HttpResponse {
    error_response(
        429,
        "TooManyRequestsException",
        "Too many requests, please try again.",
    )
}

fn ingestor(rules: &[&Rule], config: Config) -> Ingestor<SdkAssetApi> {
    let (retry, timeout) = sdk_settings(config.api_attempt_timeout, config.api_timeout);
    let partition = own_retry_partition();
    let client: Client = mock_client!(aws_sdk_mediapackagevod, RuleMode::MatchAny, rules, |c| c
        .retry_config(retry.clone())
        .timeout_config(timeout.clone())
        .retry_partition(partition.clone()));
    Ingestor::new(SdkAssetApi::new(client), config)
}

/// Runs CreateAsset for `request()` against `rules` with the test settings.
async fn create_with(rules: &[&Rule]) -> Outcome {
    ingestor(rules, test_config())
        .create(&request(), &Turn::until(far_deadline()))
        .await
}

/// CreateAsset refused because the id exists, as the service answers it.
fn already_exists() -> Rule {
    mock!(Client::create_asset).then_http_response(|| {
        error_response(
            422,
            "UnprocessableEntityException",
            "Asset s01e01 already exists.",
        )
    })
}

fn request() -> AssetRequest {
    let body = format!(
        r#"{{"id":"s01e01","packagingGroupId":"vod-group","sourceArn":"{SOURCE}","sourceRoleArn":"{ROLE}"}}"#
    );
    AssetRequest::parse(&body, &Defaults::default()).unwrap()
}

fn created() -> CreateAssetOutput {
    CreateAssetOutput::builder()
        .id("s01e01")
        .arn("arn:aws:mediapackage-vod:us-east-1:123456789012:assets/s01e01")
        .build()
}

#[tokio::test]
async fn two_throttles_then_success_creates_the_asset() {
    let create = mock!(Client::create_asset)
        .sequence()
        .http_response(throttled)
        .times(2)
        .output(created)
        .build();
    let outcome = create_with(&[&create]).await;
    assert!(
        matches!(&outcome, Outcome::Created { assets } if assets[0].asset.arn.as_deref().is_some_and(|a| a.ends_with("/s01e01"))),
        "{outcome:?}"
    );
    assert_eq!(create.num_calls(), 3);
}

#[tokio::test]
async fn a_throttle_that_outlasts_the_retries_is_reported_for_redelivery() {
    let create = mock!(Client::create_asset)
        .sequence()
        .http_response(throttled)
        .repeatedly()
        .build();
    let outcome = create_with(&[&create]).await;
    match outcome {
        Outcome::Retry(f, _) => {
            assert_eq!(f.code, "TooManyRequestsException");
            assert_eq!(f.request_id.as_deref(), Some("req-1234"));
        }
        other => panic!("expected a retry, got {other:?}"),
    }
    assert_eq!(create.num_calls(), 3, "bounded by API_MAX_ATTEMPTS");
}

#[tokio::test]
async fn an_existing_id_with_the_same_source_is_a_success() {
    let create = already_exists();
    let describe = described_in("vod-group");
    let outcome = create_with(&[&create, &describe]).await;
    assert!(
        matches!(outcome, Outcome::AlreadyExists { .. }),
        "{:?}",
        outcome
    );
    assert_eq!(describe.num_calls(), 1);
}

#[tokio::test]
async fn an_existing_id_with_another_source_is_a_permanent_conflict() {
    let create = already_exists();
    let describe = mock!(Client::describe_asset).then_output(|| {
        DescribeAssetOutput::builder()
            .id("s01e01")
            .source_arn("arn:aws:s3:::other-bucket/other.m3u8")
            .packaging_group_id("vod-group")
            .source_role_arn(ROLE)
            .build()
    });
    let outcome = create_with(&[&create, &describe]).await;
    assert!(
        matches!(outcome, Outcome::Permanent(ref f) if f.code == "AssetIdConflict"),
        "{outcome:?}"
    );
}

/// DescribeAsset showing `s01e01` as `request()` asks for it, but in `group`.
fn described_in(group: &'static str) -> Rule {
    mock!(Client::describe_asset)
        .match_requests(|r| r.id() == Some("s01e01"))
        .then_output(move || {
            DescribeAssetOutput::builder()
                .id("s01e01")
                .source_arn(SOURCE)
                .packaging_group_id(group)
                .source_role_arn(ROLE)
                .build()
        })
}

#[tokio::test]
async fn an_existing_id_in_another_packaging_group_is_a_conflict_not_a_success() {
    let create = already_exists();
    let describe = described_in("drm-group");
    let outcome = create_with(&[&create, &describe]).await;
    match outcome {
        Outcome::Permanent(f) => {
            assert_eq!(f.code, "AssetIdConflict");
            assert!(
                f.reason
                    .contains("packaging group drm-group, not vod-group"),
                "{}",
                f.reason
            );
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
}

#[tokio::test]
async fn a_refusal_with_an_undocumented_code_is_settled_by_describe_asset() {
    let create = mock!(Client::create_asset).then_http_response(|| {
        error_response(409, "ConflictException", "Asset s01e01 is already there.")
    });
    let describe = described_in("vod-group");
    let outcome = create_with(&[&create, &describe]).await;
    assert!(
        matches!(outcome, Outcome::AlreadyExists { .. }),
        "{:?}",
        outcome
    );
    assert_eq!(describe.num_calls(), 1);
}

#[tokio::test]
async fn an_unknown_packaging_group_is_not_looked_up_as_an_existing_asset() {
    let create = mock!(Client::create_asset).then_http_response(|| {
        error_response(
            404,
            "NotFoundException",
            "PackagingGroup vod-group not found.",
        )
    });
    let describe = described_in("vod-group");
    let outcome = create_with(&[&create, &describe]).await;
    assert!(
        matches!(outcome, Outcome::Permanent(ref f) if f.code == "NotFoundException"),
        "{outcome:?}"
    );
    assert_eq!(describe.num_calls(), 0);
}

/// At the default settings, a first call throttled is retried within the invocation: the
/// retry waits for its own slot after the cut, not within the first call's permit wait.
#[tokio::test(start_paused = true)]
async fn at_the_default_settings_a_throttled_call_is_retried_after_the_cut() {
    let create = mock!(Client::create_asset)
        .sequence()
        .http_response(throttled)
        .output(created)
        .build();
    let outcome = ingestor(&[&create], Config::default())
        .create(&request(), &Turn::until(far_deadline()))
        .await;
    assert!(matches!(outcome, Outcome::Created { .. }), "{outcome:?}");
    assert_eq!(create.num_calls(), 2);
}

#[tokio::test]
async fn a_422_for_an_asset_that_does_not_exist_is_permanent() {
    let create = mock!(Client::create_asset).then_http_response(|| {
        error_response(
            422,
            "UnprocessableEntityException",
            "sourceArn must point to a manifest.",
        )
    });
    let describe = mock!(Client::describe_asset)
        .then_http_response(|| error_response(404, "NotFoundException", "Asset not found."));
    let outcome = create_with(&[&create, &describe]).await;
    assert!(
        matches!(outcome, Outcome::Permanent(ref f) if f.code == "UnprocessableEntityException"),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn a_403_is_permanent_and_not_retried() {
    let create = mock!(Client::create_asset)
        .sequence()
        .http_response(|| {
            error_response(
                403,
                "ForbiddenException",
                "not authorized to perform: iam:PassRole",
            )
        })
        .repeatedly()
        .build();
    let outcome = create_with(&[&create]).await;
    assert!(
        matches!(outcome, Outcome::Permanent(ref f) if f.code == "ForbiddenException"),
        "{outcome:?}"
    );
    assert_eq!(create.num_calls(), 1);
}

#[tokio::test]
async fn server_errors_are_retried_then_reported_for_redelivery() {
    let create = mock!(Client::create_asset)
        .sequence()
        .http_response(|| error_response(503, "ServiceUnavailableException", "unavailable"))
        .repeatedly()
        .build();
    let outcome = create_with(&[&create]).await;
    assert!(
        matches!(outcome, Outcome::Retry(ref f, _) if f.code == "ServiceUnavailableException"),
        "{outcome:?}"
    );
    assert_eq!(create.num_calls(), 3);
}
