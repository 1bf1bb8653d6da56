//! Metrics: one CloudWatch Embedded Metric Format (EMF) document per invocation, written to
//! standard output, where Lambda's log delivery turns it into CloudWatch metrics.
//!
//! The counts come from the batch's outcomes and from the calls the invocation made
//! ([`CallCounts`]); they go through the `metrics` facade to `metrics_cloudwatch_embedded`, which
//! writes the document. Error codes of dead letters are a property (`DeadLetterCodes`), not a
//! dimension, so each invocation stays one document.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aws_lambda_events::event::sqs::SqsMessage;
use metrics::Unit;

use crate::ingest::Outcome;

/// The namespace when neither `METRICS_NAMESPACE` nor `POWERTOOLS_METRICS_NAMESPACE` is set.
pub const DEFAULT_NAMESPACE: &str = "MediaPackageVodIngest";

/// The `Service` dimension when neither `METRICS_SERVICE_NAME` nor `POWERTOOLS_SERVICE_NAME`
/// is set.
pub const DEFAULT_SERVICE: &str = "mediapackage-vod-ingest";

/// Every counter of the document, with what it counts.
pub const COUNTERS: [(&str, &str); 10] = [
    ("AssetsCreated", "assets CreateAsset made"),
    (
        "AssetsFound",
        "assets found already existing (redeliveries after success)",
    ),
    (
        "MessagesSkipped",
        "messages with nothing to create (s3:TestEvent, not a manifest)",
    ),
    (
        "DeadLettered",
        "messages sent to the dead-letter queue (codes in DeadLetterCodes)",
    ),
    (
        "HandedBack",
        "messages reported in batchItemFailures for SQS to redeliver",
    ),
    (
        "Retried",
        "MediaPackage VOD attempts after a throttled or failed one",
    ),
    (
        "ThrottledCalls",
        "MediaPackage VOD calls answered 429 for the request rate",
    ),
    (
        "QuotaRefusals",
        "CreateAsset calls refused for the asset quota",
    ),
    ("EventsPublished", "Asset Created events the bus accepted"),
    (
        "EventsFailed",
        "Asset Created events not published (their messages retried)",
    ),
];

/// What the calls of one invocation met, counted as they happen.
#[derive(Debug, Default)]
pub struct CallCounts {
    /// Attempts after a throttled or failed one.
    pub retried: AtomicU64,
    /// 429s for the request rate.
    pub throttled: AtomicU64,
    /// 429s for the asset quota.
    pub quota_refusals: AtomicU64,
    /// Events accepted by the bus.
    pub events_published: AtomicU64,
    /// Events not published.
    pub events_failed: AtomicU64,
}

impl CallCounts {
    /// Counts one more of `counter`.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// The counts so far, which start again from zero.
    fn take(&self) -> [u64; 5] {
        [
            &self.retried,
            &self.throttled,
            &self.quota_refusals,
            &self.events_published,
            &self.events_failed,
        ]
        .map(|c| c.swap(0, Ordering::Relaxed))
    }
}

/// The figures of one invocation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchMetrics {
    /// Messages in the batch.
    pub batch_size: u64,
    /// Assets made.
    pub created: u64,
    /// Assets found already existing.
    pub found: u64,
    /// Messages with nothing to create.
    pub skipped: u64,
    /// Messages dead-lettered, by error code.
    pub dead_lettered: BTreeMap<String, u64>,
    /// Messages reported for redelivery.
    pub handed_back: u64,
    /// Attempts after a throttled or failed one.
    pub retried: u64,
    /// 429s for the request rate.
    pub throttled: u64,
    /// 429s for the asset quota.
    pub quota_refusals: u64,
    /// Events accepted.
    pub events_published: u64,
    /// Events not published.
    pub events_failed: u64,
    /// The highest `ApproximateReceiveCount` in the batch.
    pub highest_receive_count: u64,
    /// The limiter's rate at the end, requests per second.
    pub rate: f64,
    /// How long the invocation took.
    pub duration: Duration,
}

impl BatchMetrics {
    /// The figures of a batch from its final outcomes and its calls' counts (which start again
    /// from zero).
    pub fn of(
        records: &[SqsMessage],
        outcomes: &[Outcome],
        calls: &CallCounts,
        rate: f64,
        duration: Duration,
    ) -> Self {
        let [retried, throttled, quota_refusals, events_published, events_failed] = calls.take();
        let mut metrics = Self {
            batch_size: records.len() as u64,
            retried,
            throttled,
            quota_refusals,
            events_published,
            events_failed,
            rate,
            duration,
            highest_receive_count: records
                .iter()
                .filter_map(|r| r.attributes.get("ApproximateReceiveCount")?.parse().ok())
                .max()
                .unwrap_or(0),
            ..Self::default()
        };
        for outcome in outcomes {
            match outcome {
                Outcome::Created { assets } | Outcome::AlreadyExists { assets } => {
                    for ready in assets {
                        if ready.found {
                            metrics.found += 1;
                        } else {
                            metrics.created += 1;
                        }
                    }
                }
                Outcome::Skipped(_) => metrics.skipped += 1,
                Outcome::DeadLettered(failure) => {
                    *metrics
                        .dead_lettered
                        .entry(failure.code.clone())
                        .or_default() += 1;
                }
                Outcome::Retry(..) | Outcome::Permanent(_) => metrics.handed_back += 1,
            }
        }
        metrics
    }

    /// Hands the figures to the `metrics` facade (a no-op when no recorder is installed).
    pub fn record(&self) {
        let counts = [
            self.created,
            self.found,
            self.skipped,
            self.dead_lettered.values().sum(),
            self.handed_back,
            self.retried,
            self.throttled,
            self.quota_refusals,
            self.events_published,
            self.events_failed,
        ];
        for ((name, _), value) in COUNTERS.iter().zip(counts) {
            metrics::counter!(*name).increment(value);
        }
        metrics::gauge!("BatchSize").set(self.batch_size as f64);
        metrics::gauge!("HighestReceiveCount").set(self.highest_receive_count as f64);
        metrics::gauge!("RequestRate").set(self.rate);
        metrics::gauge!("InvocationDuration").set(self.duration.as_secs_f64() * 1000.0);
    }
}

/// The EMF writer: one document per invocation on standard output.
pub struct Emf {
    collector: &'static metrics_cloudwatch_embedded::Collector,
}

impl Emf {
    /// Installs the global recorder, with `namespace` and a `Service` dimension. Every metric
    /// is registered at once, so each document holds all of them, zeros included.
    pub fn install(namespace: &str, service: &str) -> Result<Self, String> {
        let collector = metrics_cloudwatch_embedded::Builder::new()
            .cloudwatch_namespace(namespace.to_string())
            .with_dimension("Service", service.to_string())
            .emit_zeros(true)
            .init()
            .map_err(|e| e.to_string())?;
        for (name, what) in COUNTERS {
            metrics::describe_counter!(name, Unit::Count, what);
            metrics::counter!(name).increment(0);
        }
        metrics::describe_gauge!("BatchSize", Unit::Count, "messages in the batch");
        metrics::describe_gauge!(
            "HighestReceiveCount",
            Unit::Count,
            "the highest ApproximateReceiveCount in the batch"
        );
        metrics::describe_gauge!(
            "RequestRate",
            Unit::CountPerSecond,
            "the instance's MediaPackage VOD request rate at the end of the invocation"
        );
        metrics::describe_gauge!(
            "InvocationDuration",
            Unit::Milliseconds,
            "from the batch received to the response"
        );
        Ok(Self { collector })
    }

    /// Writes the document of the invocation `request_id` whose figures are `batch`.
    pub fn flush(&self, request_id: &str, batch: &BatchMetrics) {
        let codes: serde_json::Map<String, serde_json::Value> = batch
            .dead_lettered
            .iter()
            .map(|(code, n)| (code.clone(), (*n).into()))
            .collect();
        self.collector
            .set_property("RequestId", request_id.to_string())
            .set_property("DeadLetterCodes", serde_json::Value::Object(codes));
        batch.record();
        if let Err(error) = self.collector.flush(std::io::stdout().lock()) {
            tracing::warn!(%error, "could not write the metrics document");
        }
    }
}

/// The namespace and service name from the environment: this function's variables first, then
/// Powertools', then the defaults.
pub fn names(lookup: impl Fn(&str) -> Option<String>) -> (String, String) {
    let first = |vars: [&str; 2], default: &str| {
        vars.iter()
            .find_map(|v| lookup(v).filter(|s| !s.trim().is_empty()))
            .unwrap_or_else(|| default.to_string())
    };
    (
        first(
            ["METRICS_NAMESPACE", "POWERTOOLS_METRICS_NAMESPACE"],
            DEFAULT_NAMESPACE,
        ),
        first(
            ["METRICS_SERVICE_NAME", "POWERTOOLS_SERVICE_NAME"],
            DEFAULT_SERVICE,
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::{Failure, Ready, Redelivery};
    use crate::mediapackage::Asset;
    use crate::message::{AssetRequest, Defaults};

    fn ready(found: bool) -> Ready {
        let request = AssetRequest::parse(
            r#"{"sourceArn":"arn:aws:s3:::media/a.m3u8","packagingGroupId":"g","sourceRoleArn":"arn:aws:iam::123456789012:role/R"}"#,
            &Defaults::default(),
        )
        .unwrap();
        Ready {
            asset: Asset::of(&request),
            request,
            found,
            envelope: "request".into(),
        }
    }

    fn failure(code: &str) -> Failure {
        Failure {
            code: code.into(),
            reason: "why".into(),
            request_id: None,
        }
    }

    #[test]
    fn the_figures_count_each_asset_and_each_message_once() {
        let mut records = vec![SqsMessage::default(); 6];
        records[4]
            .attributes
            .insert("ApproximateReceiveCount".into(), "4".into());
        let outcomes = [
            Outcome::Created {
                assets: vec![ready(false), ready(true)],
            },
            Outcome::AlreadyExists {
                assets: vec![ready(true)],
            },
            Outcome::DeadLettered(failure("InvalidMessage")),
            Outcome::DeadLettered(failure("InvalidMessage")),
            Outcome::Retry(failure("RateLimited"), Redelivery::Backoff),
            Outcome::Skipped("test event".into()),
        ];
        let calls = CallCounts::default();
        CallCounts::add(&calls.throttled, 3);
        CallCounts::add(&calls.retried, 2);
        let m = BatchMetrics::of(&records, &outcomes, &calls, 7.5, Duration::from_millis(40));
        assert_eq!((m.batch_size, m.created, m.found, m.skipped), (6, 1, 2, 1));
        assert_eq!(
            m.dead_lettered,
            BTreeMap::from([("InvalidMessage".into(), 2)])
        );
        assert_eq!((m.handed_back, m.throttled, m.retried), (1, 3, 2));
        assert_eq!(m.highest_receive_count, 4);
        // The call counts start again for the next invocation.
        let next = BatchMetrics::of(&records, &[], &calls, 7.5, Duration::ZERO);
        assert_eq!((next.throttled, next.retried), (0, 0));
    }

    #[test]
    fn this_functions_names_come_first_then_powertools_then_the_defaults() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(
            names(env(&[])),
            (DEFAULT_NAMESPACE.to_string(), DEFAULT_SERVICE.to_string())
        );
        assert_eq!(
            names(env(&[
                ("POWERTOOLS_METRICS_NAMESPACE", "Media"),
                ("POWERTOOLS_SERVICE_NAME", "ingest")
            ])),
            ("Media".to_string(), "ingest".to_string())
        );
        assert_eq!(
            names(env(&[
                ("POWERTOOLS_METRICS_NAMESPACE", "Media"),
                ("METRICS_NAMESPACE", "Own")
            ]))
            .0,
            "Own"
        );
    }
}
