//! The event source mapping over a real SQS API (moto on loopback in `make e2e`): the same
//! [`crate::drain`] as the bench's in-memory queue, polling with `ReceiveMessage` and deleting
//! with `DeleteMessageBatch`, while SQS itself keeps visibility, redrive and FIFO order.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use aws_lambda_events::event::sqs::SqsMessage;
use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, MessageSystemAttributeName, QueueAttributeName,
};

use crate::Source;

/// An SQS client for a stand-in at `endpoint` (moto), with test credentials.
pub fn local_client(endpoint: &str) -> aws_sdk_sqs::Client {
    use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
    aws_sdk_sqs::Client::from_conf(
        aws_sdk_sqs::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(endpoint)
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new("test", "test", None, None, "test"))
            .build(),
    )
}

/// A queue and its dead-letter queue.
#[derive(Debug, Clone)]
pub struct QueuePair {
    /// The queue's URL.
    pub url: String,
    /// Its dead-letter queue's URL.
    pub dlq_url: String,
}

/// Creates queue `name` (FIFO if it ends in `.fifo`) with `visibility_timeout` seconds and a
/// redrive policy of `max_receive_count` to a new dead-letter queue (`<stem>-dlq`), as
/// `template.yaml` makes them.
pub async fn queue_with_dead_letter_queue(
    sqs: &aws_sdk_sqs::Client,
    name: &str,
    visibility_timeout: u32,
    max_receive_count: u32,
) -> Result<QueuePair, aws_sdk_sqs::Error> {
    let fifo = name.ends_with(".fifo");
    let create = |queue: String, attributes: Vec<(QueueAttributeName, String)>| async move {
        let mut create = sqs.create_queue().queue_name(queue);
        for (k, v) in attributes {
            create = create.attributes(k, v);
        }
        if fifo {
            create = create.attributes(QueueAttributeName::FifoQueue, "true");
        }
        Ok::<_, aws_sdk_sqs::Error>(create.send().await?.queue_url.unwrap_or_default())
    };
    let dlq_name = match name.strip_suffix(".fifo") {
        Some(stem) => format!("{stem}-dlq.fifo"),
        None => format!("{name}-dlq"),
    };
    let dlq_url = create(dlq_name, Vec::new()).await?;
    let dlq_arn = sqs
        .get_queue_attributes()
        .queue_url(&dlq_url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await?
        .attributes
        .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
        .unwrap_or_default();
    let policy =
        format!(r#"{{"deadLetterTargetArn":"{dlq_arn}","maxReceiveCount":"{max_receive_count}"}}"#);
    let url = create(
        name.to_string(),
        vec![
            (QueueAttributeName::RedrivePolicy, policy),
            (
                QueueAttributeName::VisibilityTimeout,
                visibility_timeout.to_string(),
            ),
        ],
    )
    .await?;
    Ok(QueuePair { url, dlq_url })
}

/// One SQS queue as an event source.
pub struct SqsSource {
    client: aws_sdk_sqs::Client,
    url: String,
    arn: String,
    /// The highest `ApproximateReceiveCount` seen of each message.
    receives: Mutex<HashMap<String, u32>>,
    /// Held across each `ReceiveMessage`: moto checks a message's visibility and marks it
    /// received without a lock, so two concurrent receives can both return it (in 3 of 60
    /// tries of three concurrent receives of 20 messages). SQS itself does not hand one copy
    /// to two concurrent receives but for its rare at-least-once duplicates, which the
    /// function's idempotence covers; one receive at a time keeps the tests' receive counts
    /// the function's doing.
    receiving: tokio::sync::Mutex<()>,
}

impl SqsSource {
    /// The queue at `url`.
    pub async fn new(client: aws_sdk_sqs::Client, url: impl Into<String>) -> Self {
        let url = url.into();
        let arn = client
            .get_queue_attributes()
            .queue_url(&url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .ok()
            .and_then(|o| o.attributes)
            .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
            .unwrap_or_default();
        Self {
            client,
            url,
            arn,
            receives: Mutex::default(),
            receiving: tokio::sync::Mutex::default(),
        }
    }

    /// How many times each message was received, by message id.
    pub fn receives(&self) -> HashMap<String, u32> {
        self.receives.lock().unwrap().clone()
    }

    async fn counts(&self) -> Option<u64> {
        depth(&self.client, &self.url)
            .await
            .map(|counts| counts.iter().sum())
    }
}

/// Visible, in flight and delayed messages of the queue at `url`; `None` if SQS does not
/// answer.
pub async fn depth(sqs: &aws_sdk_sqs::Client, url: &str) -> Option<[u64; 3]> {
    let names = [
        QueueAttributeName::ApproximateNumberOfMessages,
        QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
        QueueAttributeName::ApproximateNumberOfMessagesDelayed,
    ];
    let attributes = sqs
        .get_queue_attributes()
        .queue_url(url)
        .set_attribute_names(Some(names.to_vec()))
        .send()
        .await
        .ok()?
        .attributes?;
    Some(names.map(|n| attributes.get(&n).and_then(|v| v.parse().ok()).unwrap_or(0)))
}

/// A received SQS message as the Lambda event record for queue `arn`.
pub fn lambda_record(m: aws_sdk_sqs::types::Message, arn: &str) -> SqsMessage {
    let mut r = SqsMessage::default();
    r.message_id = m.message_id;
    r.receipt_handle = m.receipt_handle;
    r.body = m.body;
    r.md5_of_body = m.md5_of_body;
    r.event_source = Some("aws:sqs".into());
    r.event_source_arn = Some(arn.to_string());
    r.aws_region = Some("us-east-1".into());
    for (k, v) in m.attributes.unwrap_or_default() {
        r.attributes.insert(k.as_str().to_string(), v);
    }
    r
}

#[async_trait]
impl Source for SqsSource {
    async fn receive(&self, max: usize) -> Vec<SqsMessage> {
        let receiving = self.receiving.lock().await;
        let received = self
            .client
            .receive_message()
            .queue_url(&self.url)
            .max_number_of_messages(max.clamp(1, 10) as i32)
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .send()
            .await;
        drop(receiving);
        let Ok(output) = received else {
            return Vec::new();
        };
        let records: Vec<SqsMessage> = output
            .messages
            .unwrap_or_default()
            .into_iter()
            .map(|m| lambda_record(m, &self.arn))
            .collect();
        let mut receives = self.receives.lock().unwrap();
        for record in &records {
            let count = record
                .attributes
                .get("ApproximateReceiveCount")
                .and_then(|c| c.parse().ok())
                .unwrap_or(1);
            let seen = receives
                .entry(record.message_id.clone().unwrap_or_default())
                .or_default();
            *seen = (*seen).max(count);
        }
        records
    }

    async fn delete(&self, receipts: &[String]) {
        for chunk in receipts.chunks(10) {
            let entries = chunk
                .iter()
                .enumerate()
                .filter_map(|(i, receipt)| {
                    DeleteMessageBatchRequestEntry::builder()
                        .id(format!("m{i}"))
                        .receipt_handle(receipt)
                        .build()
                        .ok()
                })
                .collect();
            let _ = self
                .client
                .delete_message_batch()
                .queue_url(&self.url)
                .set_entries(Some(entries))
                .send()
                .await;
        }
    }

    async fn is_empty(&self) -> bool {
        self.counts().await == Some(0)
    }

    fn trace(&self) -> Option<String> {
        Some(format!(
            "messages received {}",
            self.receives.lock().unwrap().len()
        ))
    }
}
