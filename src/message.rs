//! The message contract: an SQS body becomes a validated [`AssetRequest`] at the edge, and no
//! code past this module checks strings again.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The largest body accepted, in bytes.
pub const MAX_BODY_BYTES: usize = 256 * 1024;
/// The longest asset or packaging group id accepted.
pub const MAX_ID_LEN: usize = 128;
/// Tag limits, as for every AWS resource.
pub const MAX_TAGS: usize = 50;
const MAX_TAG_KEY_LEN: usize = 128;
const MAX_TAG_VALUE_LEN: usize = 256;

/// Why a message body is not a valid asset request. The text is the reason logged and reported.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum InvalidMessage {
    /// The body is absent or empty.
    #[error("the message body is empty")]
    Empty,
    /// The body is larger than [`MAX_BODY_BYTES`].
    #[error("the message body is {0} bytes, more than the {MAX_BODY_BYTES} accepted")]
    TooLarge(usize),
    /// The body is not JSON of the expected shape.
    #[error("the message body is not a valid asset request: {0}")]
    Malformed(String),
    /// A required field is absent and has no configured default.
    #[error("{0} is missing{1}")]
    Missing(&'static str, &'static str),
    /// A wrapper (S3 event, SNS notification, EventBridge event) is not of its expected shape.
    #[error("{0}")]
    Envelope(String),
    /// A field is present but not valid.
    #[error("{field} is invalid: {reason}")]
    Invalid {
        /// The JSON member at fault.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

impl InvalidMessage {
    fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            field,
            reason: reason.into(),
        }
    }
}

fn check_id(value: &str, what: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if value.len() > MAX_ID_LEN {
        return Err(format!(
            "{what} is {} characters, more than {MAX_ID_LEN}",
            value.len()
        ));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return Err(format!(
            "{what} {value:?} contains {c:?}; only letters, digits, '_' and '-' are allowed"
        ));
    }
    Ok(())
}

macro_rules! string_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// The validated value.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

string_newtype!(
    /// A MediaPackage VOD asset id: 1 to 128 letters, digits, `_` or `-`.
    AssetId
);
string_newtype!(
    /// A MediaPackage VOD packaging group id: 1 to 128 letters, digits, `_` or `-`.
    PackagingGroupId
);
string_newtype!(
    /// The S3 object ARN of an HLS `.m3u8` or `.smil` source: `arn:aws:s3:::bucket/key`.
    SourceArn
);
string_newtype!(
    /// An IAM role ARN: `arn:aws:iam::123456789012:role/name`.
    RoleArn
);

impl AssetId {
    /// Checks an asset id.
    pub fn parse(value: &str) -> Result<Self, String> {
        check_id(value, "asset id").map(|()| Self(value.to_string()))
    }

    /// The id used when a message names none: readable (from the object's file name) and
    /// deterministic (a SHA-256 of the packaging group and the whole ARN), so a redelivered
    /// message never makes a second asset, two objects with the same file name never share an
    /// id, and one source can be packaged into several groups (one per DRM setting, say).
    pub fn derive_from(group: &PackagingGroupId, source: &SourceArn) -> Self {
        let key = source.key();
        let file = key.rsplit('/').next().unwrap_or(key);
        let stem = file.rsplit_once('.').map_or(file, |(stem, _)| stem);
        let mut readable: String = stem
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                    c
                } else {
                    '-'
                }
            })
            .take(40)
            .collect();
        let mut hasher = Sha256::new();
        hasher.update(group.as_str().as_bytes());
        // No group id holds a newline, so group and source cannot run into each other.
        hasher.update(b"\n");
        hasher.update(source.as_str().as_bytes());
        let digest = hasher.finalize();
        let hash: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        if readable.is_empty() {
            readable.push_str("asset");
        }
        Self(format!("{readable}-{hash}"))
    }
}

impl PackagingGroupId {
    /// Checks a packaging group id.
    pub fn parse(value: &str) -> Result<Self, String> {
        check_id(value, "packaging group id").map(|()| Self(value.to_string()))
    }
}

const PARTITIONS: [&str; 3] = ["aws", "aws-cn", "aws-us-gov"];

impl SourceArn {
    /// Checks that `value` is an S3 object ARN with a valid bucket name and a non-empty key.
    pub fn parse(value: &str) -> Result<Self, String> {
        let rest = value
            .strip_prefix("arn:")
            .and_then(|r| r.split_once(":s3:::"))
            .filter(|(partition, _)| PARTITIONS.contains(partition))
            .map(|(_, rest)| rest)
            .ok_or_else(|| {
                format!("{value:?} is not an S3 object ARN (arn:aws:s3:::bucket/key)")
            })?;
        let (bucket, key) = rest
            .split_once('/')
            .ok_or_else(|| format!("{value:?} names a bucket but no object key"))?;
        check_bucket(bucket)?;
        if key.is_empty() {
            return Err(format!("{value:?} has an empty object key"));
        }
        if key.len() > 1024 {
            return Err(format!(
                "{value:?} has an object key longer than 1024 bytes"
            ));
        }
        Ok(Self(value.to_string()))
    }

    /// The bucket name.
    pub fn bucket(&self) -> &str {
        self.rest().split_once('/').map_or("", |(b, _)| b)
    }

    /// The object key.
    pub fn key(&self) -> &str {
        self.rest().split_once('/').map_or("", |(_, k)| k)
    }

    fn rest(&self) -> &str {
        self.0.split_once(":s3:::").map_or("", |(_, r)| r)
    }
}

/// Checks an S3 bucket name.
pub fn check_bucket(bucket: &str) -> Result<(), String> {
    let ok_chars = bucket
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-');
    let ok_ends = bucket
        .chars()
        .next()
        .zip(bucket.chars().last())
        .is_some_and(|(a, b)| a.is_ascii_alphanumeric() && b.is_ascii_alphanumeric());
    if (3..=63).contains(&bucket.len()) && ok_chars && ok_ends {
        Ok(())
    } else {
        Err(format!(
            "{bucket:?} is not a valid S3 bucket name (3 to 63 lowercase letters, digits, '.', '-')"
        ))
    }
}

impl RoleArn {
    /// Checks that `value` is an IAM role ARN with a 12-digit account.
    pub fn parse(value: &str) -> Result<Self, String> {
        let bad =
            || format!("{value:?} is not an IAM role ARN (arn:aws:iam::123456789012:role/name)");
        let Some(Arn {
            partition,
            service: "iam",
            region: "",
            account,
            resource,
        }) = Arn::split(value)
        else {
            return Err(bad());
        };
        let name = resource.strip_prefix("role/").ok_or_else(bad)?;
        let name_ok = !name.is_empty()
            && name.len() <= 512
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+=,.@_-/".contains(c));
        if !PARTITIONS.contains(&partition)
            || account.len() != 12
            || !account.bytes().all(|b| b.is_ascii_digit())
            || !name_ok
        {
            return Err(bad());
        }
        Ok(Self(value.to_string()))
    }
}

/// The six colon-separated fields of an ARN; the resource may contain colons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arn<'a> {
    /// `aws`, `aws-cn`, ...
    pub partition: &'a str,
    /// `iam`, `sqs`, ...
    pub service: &'a str,
    /// Empty for global services.
    pub region: &'a str,
    /// The account id; empty for S3.
    pub account: &'a str,
    /// What follows the account.
    pub resource: &'a str,
}

impl<'a> Arn<'a> {
    /// Splits `arn:partition:service:region:account:resource`.
    pub fn split(value: &'a str) -> Option<Self> {
        let mut parts = value.splitn(6, ':');
        if parts.next()? != "arn" {
            return None;
        }
        Some(Self {
            partition: parts.next()?,
            service: parts.next()?,
            region: parts.next()?,
            account: parts.next()?,
            resource: parts.next()?,
        })
    }
}

/// Defaults applied to fields a message leaves out.
#[derive(Debug, Clone, Default)]
pub struct Defaults {
    /// Used when `packagingGroupId` is absent.
    pub packaging_group_id: Option<PackagingGroupId>,
    /// Used when `sourceRoleArn` is absent.
    pub source_role_arn: Option<RoleArn>,
}

/// Which buckets a message may make MediaPackage read and which roles it may make it assume,
/// so that a message cannot turn the function into a confused deputy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourcePolicy {
    /// `ALLOWED_SOURCE_BUCKETS`; `None` allows any bucket.
    pub buckets: Option<BTreeSet<String>>,
    /// The roles allowed, and the variable that set them; `None` allows any role.
    pub roles: Option<(BTreeSet<RoleArn>, &'static str)>,
}

/// Why a request is refused by the [`SourcePolicy`].
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Refused {
    /// The source bucket is not allowed.
    #[error("source bucket {0:?} is not in ALLOWED_SOURCE_BUCKETS")]
    Bucket(String),
    /// The role is not allowed.
    #[error("source role {0} is not allowed by {1}")]
    Role(String, &'static str),
}

impl SourcePolicy {
    /// Checks the bucket and role a request names.
    pub fn check(&self, request: &AssetRequest) -> Result<(), Refused> {
        let bucket = request.source_arn.bucket();
        if let Some(buckets) = &self.buckets {
            if !buckets.contains(bucket) {
                return Err(Refused::Bucket(bucket.to_string()));
            }
        }
        if let Some((roles, by)) = &self.roles {
            if !roles.contains(&request.source_role_arn) {
                return Err(Refused::Role(request.source_role_arn.to_string(), by));
            }
        }
        Ok(())
    }
}

/// A checked CreateAsset request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssetRequest {
    /// The asset id, given or derived from the source.
    pub id: AssetId,
    /// The packaging group the asset joins.
    pub packaging_group_id: PackagingGroupId,
    /// The S3 object MediaPackage ingests.
    pub source_arn: SourceArn,
    /// The role MediaPackage assumes to read the source.
    pub source_role_arn: RoleArn,
    /// An optional CDN resource id.
    pub resource_id: Option<String>,
    /// Tags for the asset.
    pub tags: BTreeMap<String, String>,
}

/// The JSON shape of a message body, before validation.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawAssetRequest {
    id: Option<String>,
    packaging_group_id: Option<String>,
    source_arn: Option<String>,
    source_role_arn: Option<String>,
    resource_id: Option<String>,
    tags: Option<BTreeMap<String, String>>,
}

/// A message body as JSON, after the checks every shape shares: not empty, not over
/// [`MAX_BODY_BYTES`], well-formed.
pub fn json_body(body: &str) -> Result<serde_json::Value, InvalidMessage> {
    if body.trim().is_empty() {
        return Err(InvalidMessage::Empty);
    }
    if body.len() > MAX_BODY_BYTES {
        return Err(InvalidMessage::TooLarge(body.len()));
    }
    serde_json::from_str(body).map_err(|e| InvalidMessage::Malformed(e.to_string()))
}

/// Whether an object key names a manifest MediaPackage VOD ingests: HLS `.m3u8` or `.smil`
/// (any case).
pub fn is_manifest(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    key.ends_with(".m3u8") || key.ends_with(".smil")
}

impl AssetRequest {
    /// Parses and validates one SQS message body holding a direct asset request.
    pub fn parse(body: &str, defaults: &Defaults) -> Result<Self, InvalidMessage> {
        Self::from_value(json_body(body)?, defaults)
    }

    /// Validates a direct asset request already parsed as JSON.
    pub fn from_value(
        value: serde_json::Value,
        defaults: &Defaults,
    ) -> Result<Self, InvalidMessage> {
        let raw: RawAssetRequest =
            serde_json::from_value(value).map_err(|e| InvalidMessage::Malformed(e.to_string()))?;
        let source_arn = match raw.source_arn {
            Some(v) => SourceArn::parse(&v).map_err(|e| InvalidMessage::invalid("sourceArn", e))?,
            None => return Err(InvalidMessage::Missing("sourceArn", "")),
        };
        if !is_manifest(source_arn.key()) {
            return Err(InvalidMessage::invalid(
                "sourceArn",
                format!("{source_arn} is not a manifest MediaPackage VOD ingests (.m3u8 or .smil)"),
            ));
        }
        let packaging_group_id = match raw.packaging_group_id {
            Some(v) => PackagingGroupId::parse(&v)
                .map_err(|e| InvalidMessage::invalid("packagingGroupId", e))?,
            None => defaults
                .packaging_group_id
                .clone()
                .ok_or(InvalidMessage::Missing(
                    "packagingGroupId",
                    " and PACKAGING_GROUP_ID is not set",
                ))?,
        };
        let id = match raw.id {
            Some(v) => AssetId::parse(&v).map_err(|e| InvalidMessage::invalid("id", e))?,
            None => AssetId::derive_from(&packaging_group_id, &source_arn),
        };
        let source_role_arn = match raw.source_role_arn {
            Some(v) => {
                RoleArn::parse(&v).map_err(|e| InvalidMessage::invalid("sourceRoleArn", e))?
            }
            None => defaults
                .source_role_arn
                .clone()
                .ok_or(InvalidMessage::Missing(
                    "sourceRoleArn",
                    " and SOURCE_ROLE_ARN is not set",
                ))?,
        };
        if let Some(r) = &raw.resource_id {
            if r.is_empty() || r.len() > 1024 {
                return Err(InvalidMessage::invalid(
                    "resourceId",
                    "must be 1 to 1024 characters",
                ));
            }
        }
        let tags = raw.tags.unwrap_or_default();
        check_tags(&tags)?;
        Ok(Self {
            id,
            packaging_group_id,
            source_arn,
            source_role_arn,
            resource_id: raw.resource_id,
            tags,
        })
    }
}

fn check_tags(tags: &BTreeMap<String, String>) -> Result<(), InvalidMessage> {
    if tags.len() > MAX_TAGS {
        return Err(InvalidMessage::invalid(
            "tags",
            format!("{} tags, more than {MAX_TAGS}", tags.len()),
        ));
    }
    for (key, value) in tags {
        if key.is_empty() || key.chars().count() > MAX_TAG_KEY_LEN {
            return Err(InvalidMessage::invalid(
                "tags",
                format!("key {key:?} must be 1 to {MAX_TAG_KEY_LEN} characters"),
            ));
        }
        if key.to_ascii_lowercase().starts_with("aws:") {
            return Err(InvalidMessage::invalid(
                "tags",
                format!("key {key:?} uses the reserved prefix aws:"),
            ));
        }
        if value.chars().count() > MAX_TAG_VALUE_LEN {
            return Err(InvalidMessage::invalid(
                "tags",
                format!("value of {key:?} is longer than {MAX_TAG_VALUE_LEN} characters"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOURCE: &str = "arn:aws:s3:::media-bucket/shows/ep1/index.m3u8";
    const ROLE: &str = "arn:aws:iam::123456789012:role/MediaPackageRead";

    fn defaults() -> Defaults {
        Defaults {
            packaging_group_id: Some(PackagingGroupId::parse("default-group").unwrap()),
            source_role_arn: Some(RoleArn::parse(ROLE).unwrap()),
        }
    }

    #[test]
    fn a_complete_body_is_taken_as_written() {
        let body = format!(
            r#"{{"id":"ep1","packagingGroupId":"vod","sourceArn":"{SOURCE}","sourceRoleArn":"{ROLE}","resourceId":"r-1","tags":{{"show":"one"}}}}"#
        );
        let req = AssetRequest::parse(&body, &Defaults::default()).unwrap();
        assert_eq!(req.id.as_str(), "ep1");
        assert_eq!(req.packaging_group_id.as_str(), "vod");
        assert_eq!(req.source_arn.bucket(), "media-bucket");
        assert_eq!(req.source_arn.key(), "shows/ep1/index.m3u8");
        assert_eq!(req.resource_id.as_deref(), Some("r-1"));
        assert_eq!(req.tags.get("show").map(String::as_str), Some("one"));
    }

    #[test]
    fn missing_group_and_role_come_from_the_configured_defaults() {
        let body = format!(r#"{{"id":"ep1","sourceArn":"{SOURCE}"}}"#);
        let req = AssetRequest::parse(&body, &defaults()).unwrap();
        assert_eq!(req.packaging_group_id.as_str(), "default-group");
        assert_eq!(req.source_role_arn.as_str(), ROLE);
    }

    #[test]
    fn missing_group_without_a_default_says_which_variable_would_fix_it() {
        let body = format!(r#"{{"sourceArn":"{SOURCE}","sourceRoleArn":"{ROLE}"}}"#);
        let err = AssetRequest::parse(&body, &Defaults::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "packagingGroupId is missing and PACKAGING_GROUP_ID is not set"
        );
    }

    #[test]
    fn a_missing_id_is_derived_the_same_way_every_time() {
        let body = format!(r#"{{"sourceArn":"{SOURCE}"}}"#);
        let a = AssetRequest::parse(&body, &defaults()).unwrap();
        let b = AssetRequest::parse(&body, &defaults()).unwrap();
        assert_eq!(a.id, b.id);
        assert!(a.id.as_str().starts_with("index-"), "{}", a.id);
        assert!(AssetId::parse(a.id.as_str()).is_ok());
        let other = format!(r#"{{"sourceArn":"{}"}}"#, SOURCE.replace("ep1", "ep2"));
        assert_ne!(AssetRequest::parse(&other, &defaults()).unwrap().id, a.id);
    }

    #[test]
    fn one_source_in_two_packaging_groups_gets_two_ids() {
        let in_group = |group: &str| {
            let body = format!(r#"{{"sourceArn":"{SOURCE}","packagingGroupId":"{group}"}}"#);
            AssetRequest::parse(&body, &defaults()).unwrap().id
        };
        assert_ne!(in_group("g1"), in_group("g2"));
        assert_eq!(in_group("g1"), in_group("g1"));
        assert!(in_group("g2").as_str().starts_with("index-"));
    }

    #[test]
    fn malformed_json_is_rejected_with_the_parser_position() {
        let err = AssetRequest::parse("{not json", &defaults()).unwrap_err();
        assert!(
            matches!(err, InvalidMessage::Malformed(ref m) if m.contains("line 1")),
            "{err}"
        );
    }

    #[test]
    fn a_misspelt_field_is_named() {
        let body = format!(r#"{{"sourceARN":"{SOURCE}"}}"#);
        let err = AssetRequest::parse(&body, &defaults()).unwrap_err();
        assert!(
            err.to_string().contains("unknown field `sourceARN`"),
            "{err}"
        );
    }

    #[test]
    fn invalid_fields_are_named_with_the_reason() {
        let cases = [
            (r#"{"id":"a b","sourceArn":"SRC"}"#, "id"),
            (
                r#"{"sourceArn":"arn:aws:s3:::Bad_Bucket/k.m3u8"}"#,
                "sourceArn",
            ),
            (r#"{"sourceArn":"arn:aws:s3:::bucket"}"#, "sourceArn"),
            (r#"{"sourceArn":"https://bucket/k.m3u8"}"#, "sourceArn"),
            (
                r#"{"sourceArn":"SRC","sourceRoleArn":"arn:aws:iam::12:role/x"}"#,
                "sourceRoleArn",
            ),
            (
                r#"{"sourceArn":"SRC","packagingGroupId":""}"#,
                "packagingGroupId",
            ),
            (r#"{"sourceArn":"SRC","tags":{"aws:x":"y"}}"#, "tags"),
            (r#"{"sourceArn":"SRC","resourceId":""}"#, "resourceId"),
        ];
        for (body, field) in cases {
            let body = body.replace("SRC", SOURCE);
            match AssetRequest::parse(&body, &defaults()) {
                Err(InvalidMessage::Invalid { field: f, .. }) => assert_eq!(f, field, "{body}"),
                other => panic!("{body}: expected invalid {field}, got {other:?}"),
            }
        }
    }

    #[test]
    fn an_empty_or_oversized_body_is_rejected() {
        assert_eq!(
            AssetRequest::parse("  ", &defaults()),
            Err(InvalidMessage::Empty)
        );
        let big = " ".repeat(MAX_BODY_BYTES) + "{}";
        assert!(matches!(
            AssetRequest::parse(&big, &defaults()),
            Err(InvalidMessage::TooLarge(_))
        ));
    }

    #[test]
    fn role_arns_accept_paths_and_other_partitions() {
        assert!(RoleArn::parse("arn:aws-cn:iam::123456789012:role/path/to/Role").is_ok());
        assert!(RoleArn::parse("arn:aws:iam::123456789012:user/Bob").is_err());
        assert!(RoleArn::parse("arn:aws:sts::123456789012:role/Role").is_err());
    }

    #[test]
    fn derived_ids_are_valid_even_for_odd_keys() {
        let source = SourceArn::parse("arn:aws:s3:::bucket/dir/.m3u8").unwrap();
        let group = PackagingGroupId::parse("g").unwrap();
        let id = AssetId::derive_from(&group, &source);
        assert!(AssetId::parse(id.as_str()).is_ok(), "{id}");
        let source = SourceArn::parse("arn:aws:s3:::bucket/dir/épisode 1+2.smil").unwrap();
        let id = AssetId::derive_from(&group, &source);
        assert!(AssetId::parse(id.as_str()).is_ok(), "{id}");
    }
}
