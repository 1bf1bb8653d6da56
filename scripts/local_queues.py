#!/usr/bin/env python3
"""The sample events' queues on a local SQS (moto at $SQS): `create` makes them, each with a
dead-letter queue in its redrive policy; `show` prints what the dead-letter queues hold.
Uses boto3, which moto brings into .venv."""
import json
import os
import sys

import boto3

QUEUES = ["mediapackage-ingest", "mediapackage-ingest.fifo"]


def client():
    return boto3.client("sqs", endpoint_url=os.environ["SQS"], region_name="us-east-1",
                        aws_access_key_id="local", aws_secret_access_key="local")


def dlq_name(name):
    return name[:-5] + "-dlq.fifo" if name.endswith(".fifo") else name + "-dlq"


def create(sqs):
    for name in QUEUES:
        fifo = {"FifoQueue": "true"} if name.endswith(".fifo") else {}
        dlq_url = sqs.create_queue(QueueName=dlq_name(name), Attributes=fifo)["QueueUrl"]
        dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])[
            "Attributes"]["QueueArn"]
        policy = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "5"})
        sqs.create_queue(QueueName=name, Attributes={**fifo, "RedrivePolicy": policy})


def show(sqs):
    total = 0
    for name in QUEUES:
        url = sqs.get_queue_url(QueueName=dlq_name(name))["QueueUrl"]
        while True:
            messages = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                                           MessageAttributeNames=["All"]).get("Messages", [])
            if not messages:
                break
            for m in messages:
                total += 1
                a = {k: v["StringValue"] for k, v in m.get("MessageAttributes", {}).items()}
                print(f"    {dlq_name(name)}: {a.get('OriginalMessageId')} "
                      f"{a.get('ErrorCode')}: {a.get('ErrorReason')}")
    print(f"    ({total} messages)")


if __name__ == "__main__":
    {"create": create, "show": show}[sys.argv[1]](client())
