#!/usr/bin/env python3
"""Talk to the queues of `make up` (moto on 127.0.0.1) with boto3 from the project's virtualenv.

  scripts/local.py send QUEUE_URL BODY [--group GROUP]   send one message (GROUP for FIFO)
  scripts/local.py letters DLQ_URL                       print each dead letter and its reason
"""
import argparse
import sys
import uuid
from urllib.parse import urlsplit

import boto3


def client(queue_url):
    parts = urlsplit(queue_url)
    return boto3.client(
        "sqs",
        endpoint_url=f"{parts.scheme}://{parts.netloc}",
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )


def send(args):
    extra = {}
    if args.group:
        extra = {"MessageGroupId": args.group, "MessageDeduplicationId": str(uuid.uuid4())}
    sent = client(args.queue_url).send_message(QueueUrl=args.queue_url, MessageBody=args.body, **extra)
    print(sent["MessageId"])


def letters(args):
    sqs = client(args.queue_url)
    count = 0
    while True:
        batch = sqs.receive_message(
            QueueUrl=args.queue_url,
            MaxNumberOfMessages=10,
            MessageAttributeNames=["All"],
            VisibilityTimeout=0,
        ).get("Messages", [])
        new = [m for m in batch if m["MessageId"] not in seen]
        if not new:
            break
        for m in new:
            seen.add(m["MessageId"])
            count += 1
            attributes = {k: v.get("StringValue") for k, v in m.get("MessageAttributes", {}).items()}
            print(f"{attributes.get('OriginalMessageId', m['MessageId'])}: "
                  f"{attributes.get('ErrorCode', '(no ErrorCode: moved by SQS)')}: "
                  f"{attributes.get('ErrorReason', '')}")
            for key in ("LastError", "ReceiveCount", "RequestId"):
                if key in attributes:
                    print(f"    {key}: {attributes[key]}")
            print(f"    body: {m['Body']}")
    print(f"({count} dead letters)")


seen = set()
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
commands = parser.add_subparsers(dest="command", required=True)
s = commands.add_parser("send")
s.add_argument("queue_url")
s.add_argument("body")
s.add_argument("--group")
s.set_defaults(run=send)
letters_parser = commands.add_parser("letters")
letters_parser.add_argument("queue_url")
letters_parser.set_defaults(run=letters)
parsed = parser.parse_args()
sys.exit(parsed.run(parsed))
