#!/usr/bin/env python3
"""Writes the sample SQS events for every envelope the function accepts, and for poison
messages and a FIFO batch, into events/. Run from the repository root; the output is stable."""
import hashlib
import json
import urllib.parse

QUEUE = "arn:aws:sqs:us-east-1:123456789012:mediapackage-ingest"
FIFO_QUEUE = QUEUE + ".fifo"
ROLE = "arn:aws:iam::123456789012:role/MediaPackageVodSourceRead"
BUCKET = "media-masters"
SENT = 1764115207000


def record(n, body, queue=QUEUE, group=None, receives=1):
    message_id = f"7a3d0000-0000-4000-8000-{n:012x}"
    attributes = {
        "ApproximateReceiveCount": str(receives),
        "SentTimestamp": str(SENT + n),
        "SenderId": "AIDAIENQZJOLO23YVJ4VO",
        "ApproximateFirstReceiveTimestamp": str(SENT + n + 500),
    }
    if group is not None:
        attributes["MessageGroupId"] = group
        attributes["MessageDeduplicationId"] = message_id
        attributes["SequenceNumber"] = str(18849496460467696128 + n)
    return {
        "messageId": message_id,
        "receiptHandle": "AQEB" + hashlib.sha256(message_id.encode()).hexdigest(),
        "body": body,
        "attributes": attributes,
        "messageAttributes": {},
        "md5OfBody": hashlib.md5(body.encode()).hexdigest(),
        "eventSource": "aws:sqs",
        "eventSourceARN": queue,
        "awsRegion": "us-east-1",
    }


def s3_record(key, event_name="ObjectCreated:Put", bucket=BUCKET):
    return {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": "us-east-1",
        "eventTime": "2026-11-26T10:00:00.000Z",
        "eventName": event_name,
        "userIdentity": {"principalId": "AWS:AIDAEXAMPLE"},
        "requestParameters": {"sourceIPAddress": "203.0.113.10"},
        "responseElements": {"x-amz-request-id": "C3D13FE58DE4C810", "x-amz-id-2": "FMyUVURIY8"},
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "mediapackage-ingest",
            "bucket": {
                "name": bucket,
                "ownerIdentity": {"principalId": "A3NL1KOZZKExample"},
                "arn": f"arn:aws:s3:::{bucket}",
            },
            # S3 URL-encodes keys in event notifications, a space as '+'.
            "object": {"key": urllib.parse.quote_plus(key, safe="/"), "size": 1024,
                       "eTag": "d41d8cd98f00b204e9800998ecf8427e", "sequencer": "0055AED6DCD90281E5"},
        },
    }


def s3_event(*records):
    return json.dumps({"Records": list(records)})


def sns(message):
    return json.dumps({
        "Type": "Notification",
        "MessageId": "95df01b4-ee98-5cb9-9903-4c221d41eb5e",
        "TopicArn": "arn:aws:sns:us-east-1:123456789012:media-uploads",
        "Subject": "Amazon S3 Notification",
        "Message": message,
        "Timestamp": "2026-11-26T10:00:01.000Z",
        "SignatureVersion": "1",
        "Signature": "EXAMPLE",
        "SigningCertURL": "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-example.pem",
        "UnsubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe",
    })


def eventbridge(key, detail_type="Object Created", bucket=BUCKET):
    return json.dumps({
        "version": "0",
        "id": "17793124-05d4-b198-2fde-7ededc63b103",
        "detail-type": detail_type,
        "source": "aws.s3",
        "account": "123456789012",
        "time": "2026-11-26T10:00:00Z",
        "region": "us-east-1",
        "resources": [f"arn:aws:s3:::{bucket}"],
        "detail": {
            "version": "0",
            "bucket": {"name": bucket},
            "object": {"key": key, "size": 1024, "etag": "b1946ac92492d2347c6235b4d2611184",
                       "sequencer": "617f08299329d189"},
            "request-id": "N4N7GDK58NMKJ12R",
            "requester": "123456789012",
            "reason": "PutObject",
        },
    })


def request(asset_id=None, key=None, **extra):
    body = {}
    if asset_id:
        body["id"] = asset_id
    body["sourceArn"] = f"arn:aws:s3:::{BUCKET}/{key or f'show/{asset_id}/index.m3u8'}"
    body.update(extra)
    return json.dumps(body, separators=(",", ":"))


TEST_EVENT = json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent",
                         "Time": "2026-11-26T09:59:00.000Z", "Bucket": BUCKET,
                         "RequestId": "5582815E1AEA5ADF", "HostId": "8cLeGAmw098X5cv4Zkwcmo8vvZa3eH3eKxsPzbB9wrR+YstdA6Knx4Ip8EXAMPLE"})

EVENTS = {
    # Two objects in one notification (one with a space and a colon in its key), and a
    # notification for a segment, which is no manifest and is skipped.
    "s3-notification.json": [
        record(1, s3_event(s3_record("uploads/Show Two: Pilot/index.m3u8"),
                           s3_record("uploads/show-two-s01e02/main.smil"))),
        record(2, s3_event(s3_record("uploads/show-two-s01e02/segment_00001.ts"))),
    ],
    "s3-test-event.json": [record(3, TEST_EVENT)],
    # Non-raw SNS wrapping an S3 notification and a direct request; raw SNS delivery, where
    # the body is the message itself.
    "sns.json": [
        record(4, sns(s3_event(s3_record("uploads/show-three-s01e01/index.m3u8")))),
        record(5, sns(request("show-three-s01e02"))),
        record(6, request("show-three-s01e03")),
    ],
    "eventbridge.json": [
        record(7, eventbridge("uploads/show-four-s01e01/index.m3u8")),
        record(8, eventbridge("uploads/show-four-s01e01/index.m3u8", "Object Deleted")),
    ],
    # Each body is refused at the edge: not JSON, a misspelt field, a bad id, no manifest, a
    # bucket outside ALLOWED_SOURCE_BUCKETS, a role other than SOURCE_ROLE_ARN; then one
    # valid message beside them.
    "poison.json": [
        record(9, '{"id":"show-five-s01e01","sourceArn":'),
        record(10, request("show-five-s01e02", sourceARN="x")),
        record(11, request("show five/s01e03", key="show/five/s01e03/index.m3u8")),
        record(12, request("show-five-s01e04", key="show/five/s01e04/video.mp4")),
        record(13, json.dumps({"id": "show-five-s01e05",
                               "sourceArn": "arn:aws:s3:::someone-elses-bucket/secret/index.m3u8"})),
        record(14, request("show-five-s01e06",
                           sourceRoleArn="arn:aws:iam::123456789012:role/SomeoneElsesRole")),
        record(15, request("show-five-s01e07")),
    ],
    # A FIFO batch with two message groups: group "show-six" has a poison message in the
    # middle, group "show-seven" runs beside it; the last message repeats an asset of the
    # first group, and makes no second CreateAsset call.
    "fifo.json": [
        record(16, request("show-six-s01e01"), FIFO_QUEUE, "show-six"),
        record(17, request("show-seven-s01e01"), FIFO_QUEUE, "show-seven"),
        record(18, '{"id":"show-six-s01e02"', FIFO_QUEUE, "show-six"),
        record(19, request("show-six-s01e03"), FIFO_QUEUE, "show-six"),
        record(20, request("show-seven-s01e02"), FIFO_QUEUE, "show-seven"),
        record(21, request("show-six-s01e01"), FIFO_QUEUE, "show-seven"),
    ],
    # One source, no id, for two packaging groups (one per DRM setting, say): two assets, each
    # with the id derived from its group and the source.
    "two-groups.json": [
        record(22, request(key="show/eight/s01e01/index.m3u8", packagingGroupId="vod-group")),
        record(23, request(key="show/eight/s01e01/index.m3u8", packagingGroupId="drm-group")),
    ],
}

for name, records in EVENTS.items():
    with open(f"events/{name}", "w") as f:
        json.dump({"Records": records}, f, indent=2)
        f.write("\n")
    print(f"events/{name}: {len(records)} records")
