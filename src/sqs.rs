//! The SQS port: setting the visibility timeout of received messages, behind a narrow trait,
//! and the adapter over `aws-sdk-sqs`.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use aws_sdk_sqs::types::ChangeMessageVisibilityBatchRequestEntry;

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

/// The SQS calls the function makes.
#[async_trait]
pub trait QueueApi: Send + Sync {
    /// Sets the visibility timeout of messages of the queue `queue_arn`. Returns one result per
    /// change, in order.
    async fn change_visibility(
        &self,
        queue_arn: &str,
        changes: &[VisibilityChange],
    ) -> Vec<Result<(), QueueError>>;
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
}

impl SdkQueueApi {
    /// Wraps a client built once at cold start.
    pub fn new(client: aws_sdk_sqs::Client) -> Self {
        Self {
            client,
            urls: Mutex::new(HashMap::new()),
        }
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

#[async_trait]
impl QueueApi for SdkQueueApi {
    async fn change_visibility(
        &self,
        queue_arn: &str,
        changes: &[VisibilityChange],
    ) -> Vec<Result<(), QueueError>> {
        let url = match self.queue_url(queue_arn).await {
            Ok(url) => url,
            Err(e) => return vec![Err(e); changes.len()],
        };
        let mut results = Vec::with_capacity(changes.len());
        // ChangeMessageVisibilityBatch takes at most 10 entries.
        for chunk in changes.chunks(10) {
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
                .queue_url(&url)
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
                    results.extend((0..chunk.len()).map(
                        |i| match failed.get(i.to_string().as_str()) {
                            Some(e) => Err(e.clone()),
                            None => Ok(()),
                        },
                    ));
                }
                Err(err) => {
                    let error = sdk_error(err);
                    results.extend(chunk.iter().map(|_| Err(error.clone())));
                }
            }
        }
        results
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
