//! The SQS port: setting the visibility timeout of received messages and sending permanent
//! failures to the dead-letter queue, behind a narrow trait, and the adapter over `aws-sdk-sqs`.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, MessageAttributeValue, QueueAttributeName,
};

/// An SQS failure, with the AWS error code when there is one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct QueueError {
    /// The AWS error code, or a local one.
    pub code: String,
    /// What went wrong.
    pub message: String,
}

impl QueueError {
    fn new(code: &str, message: impl Into<String>) -> Self {
        Self {
            code: code.to_string(),
            message: message.into(),
        }
    }
}

/// One message whose visibility timeout is to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VisibilityChange {
    /// The receipt handle from the Lambda event.
    pub receipt_handle: String,
    /// The new visibility timeout, 0 to 43,200 seconds.
    pub seconds: i32,
}

/// A message that cannot succeed, on its way to the dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The original body, unchanged.
    pub body: String,
    /// The original SQS message id.
    pub message_id: String,
    /// The FIFO message group, if the source queue is FIFO.
    pub message_group_id: Option<String>,
    /// How many times SQS had delivered it.
    pub receive_count: u32,
    /// The error code (`InvalidMessage`, `SourceRefused`, an AWS error code, ...).
    pub code: String,
    /// The reason, for people.
    pub reason: String,
    /// The AWS request id of the refusal, if it came from an API.
    pub request_id: Option<String>,
    /// For a message that ran out of deliveries (`RetriesExhausted`): the error of its last
    /// try, `code: reason`.
    pub last_error: Option<String>,
}

impl DeadLetter {
    /// The message attributes it carries: `ErrorCode`, `ErrorReason`, `OriginalMessageId`,
    /// `ReceiveCount`, `SourceQueueArn` and, when known, `RequestId` and `LastError`. SQS
    /// allows 10.
    pub fn attributes(&self, source_queue_arn: &str) -> Vec<(&'static str, String)> {
        let mut attributes = vec![
            ("ErrorCode", self.code.clone()),
            ("ErrorReason", truncate(&self.reason, 1024)),
            ("OriginalMessageId", self.message_id.clone()),
            ("ReceiveCount", self.receive_count.to_string()),
            ("SourceQueueArn", source_queue_arn.to_string()),
        ];
        if let Some(id) = &self.request_id {
            attributes.push(("RequestId", id.clone()));
        }
        if let Some(last) = &self.last_error {
            attributes.push(("LastError", truncate(last, 1024)));
        }
        attributes
    }
}

fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text.to_string(),
    }
}

/// The SQS calls the function makes.
#[async_trait]
pub trait QueueApi: Send + Sync {
    /// Sends `letter`, received from the queue `queue_arn`, to that queue's dead-letter queue.
    /// An error means the message is not there and must be redelivered instead.
    async fn dead_letter(&self, queue_arn: &str, letter: &DeadLetter) -> Result<(), QueueError>;

    /// Sets the visibility timeout of messages of the queue `queue_arn`. Returns one result per
    /// change, in order.
    async fn change_visibility(
        &self,
        queue_arn: &str,
        changes: &[VisibilityChange],
    ) -> Vec<Result<(), QueueError>>;

    /// How many messages the queue `queue_arn` holds: visible, in flight and delayed, as SQS
    /// approximates them.
    async fn depth(&self, queue_arn: &str) -> Result<u64, QueueError>;

    /// The `maxReceiveCount` of the queue's redrive policy: after that many receives SQS moves a
    /// message to the dead-letter queue. `None` when the queue has no redrive policy.
    async fn max_receive_count(&self, _queue_arn: &str) -> Result<Option<u32>, QueueError> {
        Ok(None)
    }
}

/// What a queue's `RedrivePolicy` attribute says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedrivePolicy {
    /// `deadLetterTargetArn`.
    pub dead_letter_target_arn: String,
    /// `maxReceiveCount` (SQS sends it as a string or a number).
    pub max_receive_count: Option<u32>,
}

impl RedrivePolicy {
    /// Parses the attribute's JSON; `None` if it names no dead-letter queue.
    pub fn parse(json: &str) -> Option<Self> {
        let value: serde_json::Value = serde_json::from_str(json).ok()?;
        let target = value.get("deadLetterTargetArn")?.as_str()?.to_string();
        let max = value.get("maxReceiveCount").and_then(|v| match v {
            serde_json::Value::Number(n) => n.as_u64(),
            serde_json::Value::String(s) => s.trim().parse().ok(),
            _ => None,
        });
        Some(Self {
            dead_letter_target_arn: target,
            max_receive_count: max.and_then(|m| u32::try_from(m).ok()),
        })
    }
}

/// The queue name and owner account of an SQS ARN `arn:aws:sqs:region:account:name`.
pub fn parse_queue_arn(arn: &str) -> Option<(&str, &str)> {
    match crate::message::Arn::split(arn)? {
        crate::message::Arn {
            service: "sqs",
            account,
            resource: name,
            ..
        } if !account.is_empty() && !name.is_empty() && !name.contains(':') => {
            Some((name, account))
        }
        _ => None,
    }
}

/// [`QueueApi`] over the AWS SDK client, with queue URLs looked up once per queue ARN.
#[derive(Debug)]
pub struct SdkQueueApi {
    client: aws_sdk_sqs::Client,
    urls: Mutex<HashMap<String, String>>,
    policies: Mutex<HashMap<String, RedrivePolicy>>,
    dead_letter_override: Option<String>,
}

impl SdkQueueApi {
    /// Wraps a client built once at cold start.
    pub fn new(client: aws_sdk_sqs::Client) -> Self {
        Self {
            client,
            urls: Mutex::new(HashMap::new()),
            policies: Mutex::new(HashMap::new()),
            dead_letter_override: None,
        }
    }

    /// Sends every permanent failure to `url` instead of the source queue's redrive target.
    pub fn with_dead_letter_queue_url(mut self, url: Option<String>) -> Self {
        self.dead_letter_override = url;
        self
    }

    /// The dead-letter queue URL for messages of `queue_arn`: the override if set, else the
    /// `deadLetterTargetArn` of the queue's `RedrivePolicy`.
    pub async fn dead_letter_queue_url(&self, queue_arn: &str) -> Result<String, QueueError> {
        if let Some(url) = &self.dead_letter_override {
            return Ok(url.clone());
        }
        let policy = self.redrive_policy(queue_arn).await?.ok_or_else(|| {
            QueueError::new(
                "NoDeadLetterQueue",
                format!("{queue_arn} has no RedrivePolicy and DEAD_LETTER_QUEUE_URL is not set"),
            )
        })?;
        self.queue_url(&policy.dead_letter_target_arn).await
    }

    /// The queue's `RedrivePolicy`, read with `GetQueueAttributes` once and cached. A queue
    /// without one is asked again next time, so a policy added later is seen.
    pub async fn redrive_policy(
        &self,
        queue_arn: &str,
    ) -> Result<Option<RedrivePolicy>, QueueError> {
        if let Some(policy) = self.policies.lock().expect("policy cache").get(queue_arn) {
            return Ok(Some(policy.clone()));
        }
        let source_url = self.queue_url(queue_arn).await?;
        let output = self
            .client
            .get_queue_attributes()
            .queue_url(&source_url)
            .attribute_names(QueueAttributeName::RedrivePolicy)
            .send()
            .await
            .map_err(sdk_error)?;
        let Some(json) = output
            .attributes()
            .and_then(|a| a.get(&QueueAttributeName::RedrivePolicy))
        else {
            return Ok(None);
        };
        let policy = RedrivePolicy::parse(json).ok_or_else(|| {
            QueueError::new(
                "NoDeadLetterQueue",
                format!("the RedrivePolicy of {queue_arn} names no deadLetterTargetArn: {json}"),
            )
        })?;
        self.policies
            .lock()
            .expect("policy cache")
            .insert(queue_arn.to_string(), policy.clone());
        Ok(Some(policy))
    }

    /// The queue URL for `queue_arn`, from `GetQueueUrl` the first time, cached after.
    pub async fn queue_url(&self, queue_arn: &str) -> Result<String, QueueError> {
        if let Some(url) = self.urls.lock().expect("url cache").get(queue_arn) {
            return Ok(url.clone());
        }
        let (name, account) = parse_queue_arn(queue_arn).ok_or_else(|| {
            QueueError::new(
                "InvalidQueueArn",
                format!("{queue_arn:?} is not an SQS queue ARN"),
            )
        })?;
        let output = self
            .client
            .get_queue_url()
            .queue_name(name)
            .queue_owner_aws_account_id(account)
            .send()
            .await
            .map_err(sdk_error)?;
        let url = output
            .queue_url()
            .ok_or_else(|| QueueError::new("NoQueueUrl", "GetQueueUrl returned no URL"))?
            .to_string();
        self.urls
            .lock()
            .expect("url cache")
            .insert(queue_arn.to_string(), url.clone());
        Ok(url)
    }
}

impl SdkQueueApi {
    async fn change_chunk(
        &self,
        url: &str,
        chunk: &[VisibilityChange],
    ) -> Vec<Result<(), QueueError>> {
        let entries: Vec<_> = chunk
            .iter()
            .enumerate()
            .map(|(i, c)| {
                ChangeMessageVisibilityBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(&c.receipt_handle)
                    .visibility_timeout(c.seconds)
                    .build()
                    .expect("id and receipt handle are set")
            })
            .collect();
        match self
            .client
            .change_message_visibility_batch()
            .queue_url(url)
            .set_entries(Some(entries))
            .send()
            .await
        {
            Ok(output) => {
                let failed: HashMap<&str, QueueError> = output
                    .failed()
                    .iter()
                    .map(|f| {
                        (
                            f.id(),
                            QueueError::new(f.code(), f.message().unwrap_or_default()),
                        )
                    })
                    .collect();
                (0..chunk.len())
                    .map(|i| match failed.get(i.to_string().as_str()) {
                        Some(e) => Err(e.clone()),
                        None => Ok(()),
                    })
                    .collect()
            }
            Err(err) => {
                let error = sdk_error(err);
                chunk.iter().map(|_| Err(error.clone())).collect()
            }
        }
    }
}

fn sdk_error<E>(err: aws_sdk_sqs::error::SdkError<E>) -> QueueError
where
    E: aws_sdk_sqs::error::ProvideErrorMetadata + std::error::Error + 'static,
{
    use aws_sdk_sqs::error::ProvideErrorMetadata;
    QueueError::new(
        err.code().unwrap_or("SqsError"),
        aws_smithy_types::error::display::DisplayErrorContext(&err).to_string(),
    )
}

/// The message counts whose sum is a queue's depth.
const DEPTH: [QueueAttributeName; 3] = [
    QueueAttributeName::ApproximateNumberOfMessages,
    QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
    QueueAttributeName::ApproximateNumberOfMessagesDelayed,
];

#[async_trait]
impl QueueApi for SdkQueueApi {
    async fn dead_letter(&self, queue_arn: &str, letter: &DeadLetter) -> Result<(), QueueError> {
        let url = self.dead_letter_queue_url(queue_arn).await?;
        // SQS refuses an empty body; the attributes say what happened to it.
        let body = if letter.body.is_empty() {
            "(empty message body)"
        } else {
            &letter.body
        };
        let mut send = self
            .client
            .send_message()
            .queue_url(&url)
            .message_body(body);
        for (name, value) in letter.attributes(queue_arn) {
            let data_type = if name == "ReceiveCount" {
                "Number"
            } else {
                "String"
            };
            let value = MessageAttributeValue::builder()
                .data_type(data_type)
                .string_value(value)
                .build()
                .expect("data type is set");
            send = send.message_attributes(name, value);
        }
        if url.ends_with(".fifo") {
            // A FIFO queue's dead-letter queue is FIFO too: keep the group, and let a second
            // attempt for the same message be deduplicated.
            send = send
                .message_group_id(letter.message_group_id.as_deref().unwrap_or("dead-letter"))
                .message_deduplication_id(&letter.message_id);
        }
        send.send().await.map_err(sdk_error)?;
        Ok(())
    }

    async fn change_visibility(
        &self,
        queue_arn: &str,
        changes: &[VisibilityChange],
    ) -> Vec<Result<(), QueueError>> {
        let url = match self.queue_url(queue_arn).await {
            Ok(url) => url,
            Err(e) => return vec![Err(e); changes.len()],
        };
        // ChangeMessageVisibilityBatch takes at most 10 entries; the batches go at once, since
        // they run in the little time left before the invocation's deadline.
        let batches = changes
            .chunks(10)
            .map(|chunk| self.change_chunk(&url, chunk));
        futures::future::join_all(batches)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    async fn depth(&self, queue_arn: &str) -> Result<u64, QueueError> {
        let url = self.queue_url(queue_arn).await?;
        let output = self
            .client
            .get_queue_attributes()
            .queue_url(&url)
            .set_attribute_names(Some(DEPTH.to_vec()))
            .send()
            .await
            .map_err(sdk_error)?;
        let attributes = output.attributes();
        DEPTH.iter().try_fold(0u64, |sum, name| {
            let count = attributes
                .and_then(|a| a.get(name))
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| {
                    QueueError::new(
                        "NoQueueDepth",
                        format!(
                            "GetQueueAttributes gave no {} for {queue_arn}",
                            name.as_str()
                        ),
                    )
                })?;
            Ok(sum + count)
        })
    }

    async fn max_receive_count(&self, queue_arn: &str) -> Result<Option<u32>, QueueError> {
        Ok(self
            .redrive_policy(queue_arn)
            .await?
            .and_then(|p| p.max_receive_count))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_letter_carries_its_reason_in_at_most_ten_attributes() {
        let letter = DeadLetter {
            body: "{}".into(),
            message_id: "m-1".into(),
            message_group_id: None,
            receive_count: 3,
            code: "InvalidMessage".into(),
            reason: "é".repeat(2000),
            request_id: Some("r-1".into()),
            last_error: Some("TooManyRequestsException: slow down".into()),
        };
        let attributes = letter.attributes("arn:aws:sqs:us-east-1:123456789012:q");
        assert!(attributes.len() <= 10);
        let get = |n: &str| attributes.iter().find(|(k, _)| *k == n).unwrap().1.clone();
        assert_eq!(get("ErrorCode"), "InvalidMessage");
        assert_eq!(get("OriginalMessageId"), "m-1");
        assert_eq!(get("ReceiveCount"), "3");
        assert_eq!(get("RequestId"), "r-1");
        assert_eq!(get("ErrorReason").chars().count(), 1027);
        assert_eq!(get("LastError"), "TooManyRequestsException: slow down");
    }

    #[test]
    fn a_redrive_policy_gives_its_target_and_receive_count_as_string_or_number() {
        let dlq = "arn:aws:sqs:us-east-1:123456789012:dlq";
        let policy = |json: &str| RedrivePolicy::parse(json);
        assert_eq!(
            policy(&format!(
                r#"{{"deadLetterTargetArn":"{dlq}","maxReceiveCount":"3"}}"#
            )),
            Some(RedrivePolicy {
                dead_letter_target_arn: dlq.into(),
                max_receive_count: Some(3)
            })
        );
        assert_eq!(
            policy(&format!(
                r#"{{"deadLetterTargetArn":"{dlq}","maxReceiveCount":5}}"#
            ))
            .unwrap()
            .max_receive_count,
            Some(5)
        );
        assert_eq!(policy(r#"{"maxReceiveCount":5}"#), None);
        assert_eq!(policy("not json"), None);
    }

    #[test]
    fn queue_arns_give_name_and_account() {
        assert_eq!(
            parse_queue_arn("arn:aws:sqs:us-east-1:123456789012:ingest.fifo"),
            Some(("ingest.fifo", "123456789012"))
        );
        assert_eq!(parse_queue_arn("arn:aws:sqs:us-east-1:123456789012"), None);
        assert_eq!(
            parse_queue_arn("arn:aws:sns:us-east-1:123456789012:topic"),
            None
        );
        assert_eq!(
            parse_queue_arn("https://sqs.us-east-1.amazonaws.com/1/q"),
            None
        );
    }
}
