//! The `Asset Created` events of a batch.

use std::collections::BTreeMap;

use aws_lambda_events::event::sqs::SqsMessage;
use futures::StreamExt;
use tokio::time::Instant;

use super::{kept_back, lanes, log_outcome, Failure, Ingestor, Outcome, Ready};
use crate::events::{AssetEvent, PublishError, MAX_ENTRIES};
use crate::mediapackage::AssetApi;
use crate::metrics::CallCounts;
use crate::redelivery::Redelivery;

impl<A: AssetApi> Ingestor<A> {
    /// Publishes an `Asset Created` event for every asset made or found, before `until`. A
    /// message with an event not published is retried (its asset is found next time, and the
    /// event sent then), and so, to keep their order, are the messages after it in its FIFO
    /// group.
    pub(super) async fn publish(
        &self,
        records: &[SqsMessage],
        mut outcomes: Vec<Outcome>,
        until: Instant,
    ) -> Vec<Outcome> {
        let Some(bus) = &self.events else {
            return outcomes;
        };
        let events: Vec<(usize, AssetEvent)> = outcomes
            .iter()
            .enumerate()
            .flat_map(|(index, outcome)| {
                let message_id = records[index].message_id.as_deref().unwrap_or("");
                outcome
                    .assets()
                    .iter()
                    .map(move |ready| (index, asset_event(message_id, ready)))
            })
            .collect();
        // Collected first so the futures have one concrete type, which keeps the batch future
        // `Send`.
        let calls: Vec<_> = events
            .chunks(MAX_ENTRIES)
            .map(|chunk| async move {
                let batch: Vec<AssetEvent> = chunk.iter().map(|(_, e)| e.clone()).collect();
                let results = match tokio::time::timeout_at(until, bus.put(&batch)).await {
                    Ok(Ok(results)) => results,
                    Ok(Err(error)) => vec![Err(error); batch.len()],
                    Err(_) => vec![
                        Err(PublishError {
                            code: "DeadlineReached".into(),
                            message: "PutEvents had not answered when the invocation's time for \
                                  events ran out"
                                .into(),
                        });
                        batch.len()
                    ],
                };
                chunk
                    .iter()
                    .map(|(index, _)| *index)
                    .zip(results)
                    .collect::<Vec<_>>()
            })
            .collect();
        let results: Vec<(usize, Result<(), PublishError>)> = futures::stream::iter(calls)
            .buffer_unordered(MAX_ENTRIES)
            .flat_map(futures::stream::iter)
            .collect()
            .await;
        let mut failed: BTreeMap<usize, PublishError> = BTreeMap::new();
        for (index, result) in results {
            match result {
                Ok(()) => CallCounts::add(&self.counts.events_published, 1),
                Err(error) => {
                    CallCounts::add(&self.counts.events_failed, 1);
                    failed.entry(index).or_insert(error);
                }
            }
        }
        for (index, error) in failed {
            let outcome = Outcome::Retry(
                Failure::new(
                    "EventNotPublished",
                    format!(
                        "the asset exists but its Asset Created event was not published ({error}); \
                         retried so the event goes out when the asset is found"
                    ),
                ),
                Redelivery::Backoff,
            );
            log_outcome(records[index].message_id.as_deref(), &outcome);
            outcomes[index] = outcome;
        }
        for lane in lanes(records) {
            let Some(first) = lane.iter().position(|&i| outcomes[i].must_redeliver()) else {
                continue;
            };
            for &index in &lane[first + 1..] {
                if !outcomes[index].assets().is_empty()
                    || matches!(outcomes[index], Outcome::Skipped(_))
                {
                    outcomes[index] = kept_back(&records[index], &records[lane[first]]);
                }
            }
        }
        outcomes
    }
}

/// The `Asset Created` event of `ready`, asked for by message `message_id`.
fn asset_event(message_id: &str, ready: &Ready) -> AssetEvent {
    AssetEvent {
        asset_id: ready.request.id.to_string(),
        arn: ready.asset.arn.clone(),
        packaging_group_id: ready.asset.packaging_group_id.clone(),
        requested_packaging_group_id: ready.request.packaging_group_id.to_string(),
        source_arn: ready.asset.source_arn.clone(),
        source_role_arn: ready.asset.source_role_arn.clone(),
        resource_id: ready.request.resource_id.clone(),
        egress_endpoints: ready.asset.egress_endpoints.clone(),
        found: ready.found,
        message_id: message_id.to_string(),
        envelope: ready.envelope.clone(),
    }
}
