//! Every shape a message body can take on the queue, told apart by shape and unwrapped into
//! checked [`AssetRequest`]s:
//!
//! - a direct asset request (the contract in the README);
//! - an S3 event notification (`Records[].s3`, URL-encoded keys, several records per body),
//!   and the `s3:TestEvent` S3 sends when a notification is configured;
//! - an SNS notification, raw (the body is the message itself) or not (a JSON envelope whose
//!   `Message` holds one of the other shapes);
//! - an EventBridge `Object Created` event from S3.
//!
//! Objects named by S3 get an id derived from their packaging group and ARN
//! ([`AssetId::derive_from`], the same as a
//! direct request without `id`), and the packaging group and role from configuration. Only
//! manifests MediaPackage VOD can ingest (`.m3u8`, `.smil`) become requests; other objects
//! and other S3 events are skipped, with the reason.

use std::fmt;

use serde::Deserialize;
use serde_json::Value;

use crate::message::{
    is_manifest, json_body, AssetId, AssetRequest, Defaults, InvalidMessage, SourceArn,
};

/// The most objects one body may name.
pub const MAX_OBJECTS_PER_MESSAGE: usize = 100;

/// The shape a body had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Envelope {
    /// A direct asset request.
    Request,
    /// An S3 event notification.
    S3Event,
    /// The `s3:TestEvent` S3 sends when a notification is configured.
    S3TestEvent,
    /// An EventBridge event from S3.
    EventBridge,
    /// A non-raw SNS notification wrapping another shape.
    Sns(Inner),
}

/// The shape inside an SNS notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inner {
    /// A direct asset request.
    Request,
    /// An S3 event notification.
    S3Event,
    /// The `s3:TestEvent`.
    S3TestEvent,
    /// An EventBridge event from S3.
    EventBridge,
}

impl fmt::Display for Envelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = |i: &Inner| match i {
            Inner::Request => "request",
            Inner::S3Event => "s3-event",
            Inner::S3TestEvent => "s3-test-event",
            Inner::EventBridge => "eventbridge",
        };
        match self {
            Self::Request => f.write_str("request"),
            Self::S3Event => f.write_str("s3-event"),
            Self::S3TestEvent => f.write_str("s3-test-event"),
            Self::EventBridge => f.write_str("eventbridge"),
            Self::Sns(i) => write!(f, "sns/{}", inner(i)),
        }
    }
}

/// Something a body named that creates no asset, acknowledged and logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The object (or event) skipped.
    pub what: String,
    /// Why.
    pub reason: String,
}

/// A body unwrapped: its shape, the requests it makes (possibly none) and what it skips.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// The shape the body had.
    pub envelope: Envelope,
    /// The assets to create, in the body's order.
    pub requests: Vec<AssetRequest>,
    /// What the body named that creates no asset.
    pub skipped: Vec<Skipped>,
}

/// Parses one SQS message body of any accepted shape.
pub fn parse_body(body: &str, defaults: &Defaults) -> Result<Parsed, InvalidMessage> {
    let value = json_body(body)?;
    match shape(&value)? {
        Shape::Sns => {
            let sns: SnsNotification = from_value(value, "SNS notification")?;
            let inner: Value = serde_json::from_str(&sns.message).map_err(|e| {
                InvalidMessage::Envelope(format!("the SNS notification's Message is not JSON: {e}"))
            })?;
            let (inner_shape, parsed) = match shape(&inner)? {
                Shape::Sns => {
                    return Err(InvalidMessage::Envelope(
                        "an SNS notification inside an SNS notification".into(),
                    ))
                }
                Shape::Request => (Inner::Request, parse_request(inner, defaults)?),
                Shape::S3Event => (Inner::S3Event, parse_s3_event(inner, defaults)?),
                Shape::S3TestEvent => (Inner::S3TestEvent, test_event(inner)),
                Shape::EventBridge => (Inner::EventBridge, parse_eventbridge(inner, defaults)?),
            };
            Ok(Parsed {
                envelope: Envelope::Sns(inner_shape),
                ..parsed
            })
        }
        Shape::Request => parse_request(value, defaults),
        Shape::S3Event => parse_s3_event(value, defaults),
        Shape::S3TestEvent => Ok(test_event(value)),
        Shape::EventBridge => parse_eventbridge(value, defaults),
    }
}

enum Shape {
    Request,
    S3Event,
    S3TestEvent,
    EventBridge,
    Sns,
}

/// Tells the shapes apart by their distinctive members.
fn shape(value: &Value) -> Result<Shape, InvalidMessage> {
    let Some(object) = value.as_object() else {
        return Err(InvalidMessage::Malformed(format!(
            "expected a JSON object, found {}",
            kind_of(value)
        )));
    };
    let text = |name: &str| object.get(name).and_then(Value::as_str);
    Ok(if object.contains_key("Records") {
        Shape::S3Event
    } else if text("Event") == Some("s3:TestEvent") {
        Shape::S3TestEvent
    } else if text("Type") == Some("Notification") && object.contains_key("TopicArn") {
        Shape::Sns
    } else if object.contains_key("detail-type") && object.contains_key("detail") {
        Shape::EventBridge
    } else {
        Shape::Request
    })
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn from_value<T: serde::de::DeserializeOwned>(
    value: Value,
    what: &str,
) -> Result<T, InvalidMessage> {
    serde_json::from_value(value)
        .map_err(|e| InvalidMessage::Envelope(format!("not a valid {what}: {e}")))
}

fn parse_request(value: Value, defaults: &Defaults) -> Result<Parsed, InvalidMessage> {
    Ok(Parsed {
        envelope: Envelope::Request,
        requests: vec![AssetRequest::from_value(value, defaults)?],
        skipped: Vec::new(),
    })
}

fn test_event(value: Value) -> Parsed {
    let bucket = value
        .get("Bucket")
        .and_then(Value::as_str)
        .unwrap_or("?")
        .to_string();
    Parsed {
        envelope: Envelope::S3TestEvent,
        requests: Vec::new(),
        skipped: vec![Skipped {
            what: format!("s3:TestEvent for bucket {bucket}"),
            reason: "S3 sends it when a notification is configured; nothing to ingest".into(),
        }],
    }
}

/// An SNS notification as SNS delivers it to SQS without raw message delivery. Only what is
/// used is read; the signature is not checked (the queue policy decides who may send).
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SnsNotification {
    message: String,
}

/// An S3 event notification; only what is used is read, so every event version is accepted.
#[derive(Deserialize)]
struct S3Event {
    #[serde(rename = "Records")]
    records: Vec<S3Record>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct S3Record {
    event_name: Option<String>,
    s3: S3Entity,
}

#[derive(Deserialize)]
struct S3Entity {
    bucket: S3Bucket,
    object: S3Object,
}

#[derive(Deserialize)]
struct S3Bucket {
    name: String,
    arn: Option<String>,
}

#[derive(Deserialize)]
struct S3Object {
    key: String,
}

fn parse_s3_event(value: Value, defaults: &Defaults) -> Result<Parsed, InvalidMessage> {
    let event: S3Event = from_value(value, "S3 event notification")?;
    if event.records.is_empty() {
        return Err(InvalidMessage::Envelope(
            "the S3 event has no Records".into(),
        ));
    }
    check_object_count(event.records.len())?;
    let mut parsed = Parsed {
        envelope: Envelope::S3Event,
        requests: Vec::new(),
        skipped: Vec::new(),
    };
    for (index, record) in event.records.into_iter().enumerate() {
        let key = decode_key(&record.s3.object.key)
            .map_err(|e| InvalidMessage::Envelope(format!("Records[{index}]: {e}")))?;
        let event_name = record.event_name.unwrap_or_default();
        let partition = record
            .s3
            .bucket
            .arn
            .as_deref()
            .and_then(|arn| arn.strip_prefix("arn:"))
            .and_then(|rest| rest.split(':').next())
            .unwrap_or("aws")
            .to_string();
        let object = S3ObjectRef {
            partition,
            bucket: record.s3.bucket.name,
            key,
        };
        if !event_name.starts_with("ObjectCreated:") {
            parsed.skipped.push(Skipped {
                what: object.to_string(),
                reason: format!("{event_name:?} is not an object creation"),
            });
            continue;
        }
        object.add_to(&mut parsed, defaults, &format!("Records[{index}]"))?;
    }
    Ok(parsed)
}

/// An EventBridge event from S3; only what is used is read.
#[derive(Deserialize)]
struct EventBridgeEvent {
    #[serde(rename = "detail-type")]
    detail_type: String,
    source: String,
    #[serde(default)]
    resources: Vec<String>,
    detail: EventBridgeDetail,
}

#[derive(Deserialize)]
struct EventBridgeDetail {
    bucket: S3Bucket,
    object: S3Object,
}

fn parse_eventbridge(value: Value, defaults: &Defaults) -> Result<Parsed, InvalidMessage> {
    let event: EventBridgeEvent = from_value(value, "EventBridge event from S3")?;
    if event.source != "aws.s3" {
        return Err(InvalidMessage::Envelope(format!(
            "an EventBridge event from {:?}; only events from aws.s3 are accepted",
            event.source
        )));
    }
    let partition = event
        .resources
        .iter()
        .find_map(|arn| arn.strip_prefix("arn:")?.split(':').next())
        .unwrap_or("aws")
        .to_string();
    // EventBridge carries the key as it is, not URL-encoded.
    let object = S3ObjectRef {
        partition,
        bucket: event.detail.bucket.name,
        key: event.detail.object.key,
    };
    let mut parsed = Parsed {
        envelope: Envelope::EventBridge,
        requests: Vec::new(),
        skipped: Vec::new(),
    };
    if event.detail_type != "Object Created" {
        parsed.skipped.push(Skipped {
            what: object.to_string(),
            reason: format!("{:?} is not an object creation", event.detail_type),
        });
        return Ok(parsed);
    }
    object.add_to(&mut parsed, defaults, "detail")?;
    Ok(parsed)
}

fn check_object_count(count: usize) -> Result<(), InvalidMessage> {
    if count > MAX_OBJECTS_PER_MESSAGE {
        return Err(InvalidMessage::Envelope(format!(
            "{count} objects in one message, more than {MAX_OBJECTS_PER_MESSAGE}"
        )));
    }
    Ok(())
}

/// S3 event notifications URL-encode object keys as in a form: `+` is a space.
fn decode_key(key: &str) -> Result<String, String> {
    percent_encoding::percent_decode_str(&key.replace('+', " "))
        .decode_utf8()
        .map(|k| k.into_owned())
        .map_err(|_| format!("object key {key:?} does not decode to UTF-8"))
}

/// An S3 object named by an event.
struct S3ObjectRef {
    partition: String,
    bucket: String,
    key: String,
}

impl fmt::Display for S3ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.key)
    }
}

impl S3ObjectRef {
    /// Adds the request for this object to `parsed`, or notes it as skipped if it is no
    /// manifest. `at` says where the object was in the body, for errors.
    fn add_to(
        self,
        parsed: &mut Parsed,
        defaults: &Defaults,
        at: &str,
    ) -> Result<(), InvalidMessage> {
        if !is_manifest(&self.key) {
            parsed.skipped.push(Skipped {
                what: self.to_string(),
                reason: "not a manifest MediaPackage VOD ingests (.m3u8, .smil)".into(),
            });
            return Ok(());
        }
        let arn = format!("arn:{}:s3:::{}/{}", self.partition, self.bucket, self.key);
        let source_arn =
            SourceArn::parse(&arn).map_err(|e| InvalidMessage::Envelope(format!("{at}: {e}")))?;
        let missing = |what, var| {
            InvalidMessage::Envelope(format!(
                "{at}: an object from S3 takes its {what} from {var}, which is not set"
            ))
        };
        let packaging_group_id = defaults
            .packaging_group_id
            .clone()
            .ok_or_else(|| missing("packaging group", "PACKAGING_GROUP_ID"))?;
        parsed.requests.push(AssetRequest {
            id: AssetId::derive_from(&packaging_group_id, &source_arn),
            packaging_group_id,
            source_role_arn: defaults
                .source_role_arn
                .clone()
                .ok_or_else(|| missing("role", "SOURCE_ROLE_ARN"))?,
            source_arn,
            resource_id: None,
            tags: Default::default(),
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{PackagingGroupId, RoleArn};

    const ROLE: &str = "arn:aws:iam::123456789012:role/MediaPackageRead";

    fn defaults() -> Defaults {
        Defaults {
            packaging_group_id: Some(PackagingGroupId::parse("vod").unwrap()),
            source_role_arn: Some(RoleArn::parse(ROLE).unwrap()),
        }
    }

    fn s3_event(records: &[(&str, &str)]) -> String {
        let records: Vec<Value> = records
            .iter()
            .map(|(name, key)| {
                serde_json::json!({
                    "eventVersion": "2.1",
                    "eventSource": "aws:s3",
                    "eventName": name,
                    "s3": {
                        "bucket": {"name": "media-in", "arn": "arn:aws:s3:::media-in"},
                        "object": {"key": key, "size": 100}
                    }
                })
            })
            .collect();
        serde_json::json!({ "Records": records }).to_string()
    }

    #[test]
    fn an_s3_event_decodes_keys_and_derives_the_id_a_direct_request_would_get() {
        let body = s3_event(&[("ObjectCreated:Put", "shows/ep+1%3A+final/index.m3u8")]);
        let parsed = parse_body(&body, &defaults()).unwrap();
        assert_eq!(parsed.envelope, Envelope::S3Event);
        let [request] = parsed.requests.as_slice() else {
            panic!("{parsed:?}")
        };
        assert_eq!(request.source_arn.key(), "shows/ep 1: final/index.m3u8");
        assert_eq!(request.packaging_group_id.as_str(), "vod");
        assert_eq!(request.source_role_arn.as_str(), ROLE);
        let direct = r#"{"sourceArn":"arn:aws:s3:::media-in/shows/ep 1: final/index.m3u8"}"#;
        let direct = parse_body(direct, &defaults()).unwrap();
        assert_eq!(direct.requests[0].id, request.id);
    }

    #[test]
    fn several_records_make_several_requests_and_non_manifests_are_skipped() {
        let body = s3_event(&[
            ("ObjectCreated:Put", "a/index.m3u8"),
            ("ObjectCreated:CompleteMultipartUpload", "b/main.SMIL"),
            ("ObjectCreated:Put", "a/segment_001.ts"),
            ("ObjectRemoved:Delete", "c/index.m3u8"),
        ]);
        let parsed = parse_body(&body, &defaults()).unwrap();
        let keys: Vec<_> = parsed.requests.iter().map(|r| r.source_arn.key()).collect();
        assert_eq!(keys, ["a/index.m3u8", "b/main.SMIL"]);
        let skipped: Vec<_> = parsed.skipped.iter().map(|s| s.what.as_str()).collect();
        assert_eq!(
            skipped,
            [
                "s3://media-in/a/segment_001.ts",
                "s3://media-in/c/index.m3u8"
            ]
        );
    }

    #[test]
    fn the_s3_test_event_is_acknowledged_with_nothing_to_create() {
        let body = r#"{"Service":"Amazon S3","Event":"s3:TestEvent","Time":"2026-11-26T10:00:00.000Z","Bucket":"media-in","RequestId":"R","HostId":"H"}"#;
        let parsed = parse_body(body, &defaults()).unwrap();
        assert_eq!(parsed.envelope, Envelope::S3TestEvent);
        assert!(parsed.requests.is_empty());
        assert_eq!(parsed.skipped.len(), 1);
    }

    #[test]
    fn sns_wraps_either_shape_and_raw_delivery_is_the_message_itself() {
        let inner = s3_event(&[("ObjectCreated:Put", "x/index.m3u8")]);
        let sns = serde_json::json!({
            "Type": "Notification",
            "MessageId": "m",
            "TopicArn": "arn:aws:sns:us-east-1:123456789012:uploads",
            "Message": inner,
            "Timestamp": "2026-11-26T10:00:00.000Z",
        })
        .to_string();
        let parsed = parse_body(&sns, &defaults()).unwrap();
        assert_eq!(parsed.envelope, Envelope::Sns(Inner::S3Event));
        assert_eq!(parsed.envelope.to_string(), "sns/s3-event");
        let raw = parse_body(&inner, &defaults()).unwrap();
        assert_eq!(parsed.requests, raw.requests);

        let request = r#"{"id":"ep1","sourceArn":"arn:aws:s3:::media-in/ep1.m3u8"}"#;
        let sns = serde_json::json!({
            "Type": "Notification",
            "TopicArn": "arn:aws:sns:us-east-1:123456789012:uploads",
            "Message": request,
        })
        .to_string();
        let parsed = parse_body(&sns, &defaults()).unwrap();
        assert_eq!(parsed.envelope, Envelope::Sns(Inner::Request));
        assert_eq!(parsed.requests[0].id.as_str(), "ep1");
    }

    #[test]
    fn eventbridge_object_created_takes_the_key_as_it_is() {
        let body = serde_json::json!({
            "version": "0",
            "detail-type": "Object Created",
            "source": "aws.s3",
            "resources": ["arn:aws-cn:s3:::media-in"],
            "detail": {
                "bucket": {"name": "media-in"},
                "object": {"key": "a+b/index.m3u8", "size": 5}
            }
        })
        .to_string();
        let parsed = parse_body(&body, &defaults()).unwrap();
        assert_eq!(parsed.envelope, Envelope::EventBridge);
        assert_eq!(
            parsed.requests[0].source_arn.as_str(),
            "arn:aws-cn:s3:::media-in/a+b/index.m3u8"
        );
        let deleted = body.replace("Object Created", "Object Deleted");
        let parsed = parse_body(&deleted, &defaults()).unwrap();
        assert!(parsed.requests.is_empty());
        assert_eq!(parsed.skipped.len(), 1);
        let other = body.replace("aws.s3", "aws.ec2");
        assert!(matches!(
            parse_body(&other, &defaults()),
            Err(InvalidMessage::Envelope(m)) if m.contains("aws.ec2")
        ));
    }

    #[test]
    fn envelope_errors_say_what_is_wrong_and_where() {
        let cases = [
            ("[1,2]", "expected a JSON object, found an array"),
            (r#"{"Records":[]}"#, "the S3 event has no Records"),
            (r#"{"Records":[{"s3":{}}]}"#, "missing field `bucket`"),
            (
                &s3_event(&[("ObjectCreated:Put", "bad%FF.m3u8")]),
                "Records[0]: object key \"bad%FF.m3u8\" does not decode to UTF-8",
            ),
            (
                r#"{"Type":"Notification","TopicArn":"t","Message":"not json"}"#,
                "the SNS notification's Message is not JSON",
            ),
        ];
        for (body, expected) in cases {
            let err = parse_body(body, &defaults()).unwrap_err().to_string();
            assert!(err.contains(expected), "{body}: {err}");
        }
        let body = s3_event(&[("ObjectCreated:Put", "a/index.m3u8")]);
        let err = parse_body(&body, &Defaults::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("PACKAGING_GROUP_ID"), "{err}");
    }

    #[test]
    fn too_many_objects_in_one_body_are_refused() {
        let many: Vec<_> = (0..=MAX_OBJECTS_PER_MESSAGE)
            .map(|_| ("ObjectCreated:Put", "a/index.m3u8"))
            .collect();
        let err = parse_body(&s3_event(&many), &defaults()).unwrap_err();
        assert!(err.to_string().contains("more than 100"), "{err}");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// JSON built from the member names the parser looks at, so that generated bodies
        /// reach every shape and nearly-valid variants of it.
        fn json() -> impl Strategy<Value = Value> {
            let names = prop::sample::select(vec![
                "Records",
                "s3",
                "bucket",
                "object",
                "key",
                "name",
                "arn",
                "eventName",
                "Type",
                "TopicArn",
                "Message",
                "Event",
                "detail-type",
                "detail",
                "source",
                "resources",
                "id",
                "sourceArn",
                "sourceRoleArn",
                "packagingGroupId",
                "tags",
                "resourceId",
            ]);
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                prop::sample::select(vec![
                    "Notification",
                    "s3:TestEvent",
                    "ObjectCreated:Put",
                    "Object Created",
                    "aws.s3",
                    "media-in",
                    "a/index.m3u8",
                    "arn:aws:s3:::media-in/a.m3u8",
                    "arn:aws:iam::123456789012:role/MediaPackageRead",
                    "%ZZ",
                    "+",
                    "",
                ])
                .prop_map(Value::from),
                ".*".prop_map(Value::from),
            ];
            leaf.prop_recursive(5, 64, 6, move |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                    prop::collection::vec((names.clone(), inner.clone()), 0..6).prop_map(
                        |members| Value::Object(
                            members
                                .into_iter()
                                .map(|(k, v)| (k.to_string(), v))
                                .collect()
                        )
                    ),
                    // An SNS envelope around generated JSON, as its Message string.
                    inner.prop_map(|v| serde_json::json!({
                        "Type": "Notification", "TopicArn": "t", "Message": v.to_string()
                    })),
                ]
            })
        }

        fn check(body: &str) {
            match parse_body(body, &defaults()) {
                Ok(parsed) => {
                    for request in &parsed.requests {
                        assert!(AssetId::parse(request.id.as_str()).is_ok());
                        assert!(is_manifest(request.source_arn.key()));
                        assert!(SourceArn::parse(request.source_arn.as_str()).is_ok());
                    }
                }
                Err(error) => assert!(!error.to_string().is_empty()),
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn any_text_gives_a_typed_outcome(body in ".{0,300}") {
                check(&body);
            }

            #[test]
            fn any_json_gives_a_typed_outcome_and_only_valid_requests(value in json()) {
                check(&value.to_string());
            }

            #[test]
            fn an_encoded_key_decodes_to_the_object_a_direct_request_names(
                key in "[a-zA-Z0-9 +%:/()&=é_.-]{1,60}\\.(m3u8|smil)"
            ) {
                prop_assume!(!key.starts_with('/') && !key.contains("//"));
                let encoded = percent_encoding::utf8_percent_encode(
                    &key, percent_encoding::NON_ALPHANUMERIC,
                )
                .to_string()
                .replace("%20", "+")
                .replace("%2F", "/");
                let parsed = parse_body(
                    &s3_event(&[("ObjectCreated:Put", &encoded)]),
                    &defaults(),
                )
                .unwrap();
                prop_assert_eq!(parsed.requests[0].source_arn.key(), key.as_str());
                let direct = serde_json::json!({
                    "sourceArn": format!("arn:aws:s3:::media-in/{key}")
                })
                .to_string();
                let direct = parse_body(&direct, &defaults()).unwrap();
                prop_assert_eq!(&direct.requests[0].id, &parsed.requests[0].id);
            }
        }
    }
}
