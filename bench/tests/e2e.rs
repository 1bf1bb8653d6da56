//! `make e2e`: the path a deployed stack runs, on loopback. Messages go to a real SQS API
//! (moto) with a redrive policy; the bench's event source mapping ([`mpvod_bench::drain`] over
//! [`SqsSource`]) feeds them to compiled `bootstrap` processes, each behind its own local
//! Runtime API, against the MediaPackage VOD emulator. Each scenario prints its figures and
//! asserts every message's fate: an asset exactly once, or the dead-letter queue with its
//! reason; nothing left in the queue; no invocation failed or timed out.
//!
//! The `bootstrap` binary is `BOOTSTRAP`, else `target/debug/bootstrap` (`make e2e` builds it;
//! `cargo test --workspace` builds it before running any test).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mpvod_bench::process::ProcessInstance;
use mpvod_bench::sqs::{local_client, queue_with_dead_letter_queue, QueuePair, SqsSource};
use mpvod_bench::{bootstrap_binary, drain, DrainReport, Function, Mapping};
use mpvod_emulator::moto::Moto;
use mpvod_emulator::{EmulatorConfig, RunningEmulator};
use serde_json::Value;

const ROLE: &str = "arn:aws:iam::123456789012:role/MediaPackageVodSourceRead";

fn bootstrap() -> PathBuf {
    let path = bootstrap_binary();
    assert!(
        path.exists(),
        "{} not found: `make e2e` builds it (cargo build --bin bootstrap)",
        path.display()
    );
    path
}

/// The bodies of a sample event, with their FIFO message group.
fn sample(name: &str) -> Vec<(String, Option<String>)> {
    let path = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../events")).join(name);
    let event: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    event["Records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["body"].as_str().unwrap().to_string(),
                r["attributes"]["MessageGroupId"]
                    .as_str()
                    .map(str::to_string),
            )
        })
        .collect()
}

/// Direct requests for `n` assets.
fn requests(n: usize) -> Vec<(String, Option<String>)> {
    (0..n)
        .map(|i| {
            let body = serde_json::json!({
                "id": format!("e2e-{i:04}"),
                "sourceArn": format!("arn:aws:s3:::media-masters/e2e/{i:04}/index.m3u8"),
            });
            (body.to_string(), None)
        })
        .collect()
}

/// A scenario's stack: moto's SQS with the ingest queue and its dead-letter queue, the
/// emulator, and `instances` bootstrap processes.
struct Stack {
    _moto: Moto,
    sqs: aws_sdk_sqs::Client,
    url: String,
    dlq_url: String,
    emulator: RunningEmulator,
    instances: Vec<Arc<dyn Function>>,
}

struct Setup {
    emulator: EmulatorConfig,
    instances: usize,
    fifo: bool,
    visibility_timeout: u32,
    max_receive_count: u32,
    env: Vec<(&'static str, String)>,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            emulator: EmulatorConfig::default().with_packaging_group("vod-group"),
            instances: 2,
            fifo: false,
            visibility_timeout: 30,
            max_receive_count: 5,
            env: Vec::new(),
        }
    }
}

async fn stack(setup: Setup) -> Stack {
    let moto = Moto::start().await;
    let sqs = local_client(moto.url());
    let suffix = if setup.fifo { ".fifo" } else { "" };
    let QueuePair { url, dlq_url } = queue_with_dead_letter_queue(
        &sqs,
        &format!("ingest{suffix}"),
        setup.visibility_timeout,
        setup.max_receive_count,
    )
    .await
    .unwrap();
    let emulator = setup.emulator.spawn().await.unwrap();
    let mut env: Vec<(String, String)> = vec![
        ("AWS_ENDPOINT_URL_MEDIAPACKAGE_VOD".into(), emulator.url()),
        ("AWS_ENDPOINT_URL_SQS".into(), moto.url().to_string()),
        ("PACKAGING_GROUP_ID".into(), "vod-group".into()),
        ("SOURCE_ROLE_ARN".into(), ROLE.into()),
        ("ALLOWED_SOURCE_BUCKETS".into(), "media-masters".into()),
    ];
    env.extend(setup.env.iter().map(|(k, v)| (k.to_string(), v.clone())));
    let mut instances: Vec<Arc<dyn Function>> = Vec::new();
    for n in 0..setup.instances {
        let instance = ProcessInstance::start(&bootstrap(), &format!("i{n}"), &env, None)
            .await
            .unwrap();
        instances.push(Arc::new(instance));
    }
    Stack {
        _moto: moto,
        sqs,
        url,
        dlq_url,
        emulator,
        instances,
    }
}

impl Stack {
    async fn send(&self, messages: &[(String, Option<String>)]) {
        for (n, (body, group)) in messages.iter().enumerate() {
            let mut send = self
                .sqs
                .send_message()
                .queue_url(&self.url)
                .message_body(body);
            if let Some(group) = group {
                send = send
                    .message_group_id(group)
                    .message_deduplication_id(format!("m{n}"));
            }
            send.send().await.unwrap();
        }
    }

    /// Drains the queue through the event source mapping; prints the figures.
    async fn drain(&self, name: &str, timeout: Duration) -> (DrainReport, HashMap<String, u32>) {
        let source = Arc::new(SqsSource::new(self.sqs.clone(), &self.url).await);
        let mapping = Mapping {
            batch_size: 10,
            batching_window: Duration::ZERO,
            function_timeout: timeout,
            give_up_after: Duration::from_secs(240),
            stagger: Duration::ZERO,
        };
        let report = drain(source.clone(), self.instances.clone(), mapping).await;
        let receives = source.receives();
        let stats = self.emulator.stats();
        let mean = receives.values().sum::<u32>() as f64 / receives.len().max(1) as f64;
        println!(
            "{name}: drained in {:.1} s, {} API calls ({} throttled), {} invocations, {:.1} s billed, {:.2} receives per message (max {})",
            report.drain_time.as_secs_f64(),
            stats.requests,
            stats.throttled,
            report.invocations,
            report.billed.as_secs_f64(),
            mean,
            receives.values().max().copied().unwrap_or(0),
        );
        (report, receives)
    }

    /// Every message in the dead-letter queue: its `ErrorCode` by original message id.
    async fn letters(&self) -> BTreeMap<String, String> {
        let mut letters = BTreeMap::new();
        loop {
            let batch = self
                .sqs
                .receive_message()
                .queue_url(&self.dlq_url)
                .max_number_of_messages(10)
                .message_attribute_names("All")
                .send()
                .await
                .unwrap()
                .messages
                .unwrap_or_default();
            if batch.is_empty() {
                return letters;
            }
            for m in batch {
                let attributes = m.message_attributes.unwrap_or_default();
                let get = |k: &str| attributes.get(k).and_then(|v| v.string_value.clone());
                let code = get("ErrorCode").expect("every dead letter says why");
                assert!(get("ErrorReason").is_some_and(|r| !r.is_empty()));
                letters.insert(get("OriginalMessageId").unwrap(), code);
            }
        }
    }

    /// What every scenario asserts: the queue emptied, no invocation failed or timed out,
    /// each asset made once.
    fn assert_clean(&self, report: &DrainReport) {
        assert!(report.drained, "messages left in the queue");
        assert_eq!(report.failed_invocations, 0, "failed invocations");
        assert_eq!(report.timeouts, 0, "timeouts");
        let mut ids: Vec<String> = self.emulator.assets().into_iter().map(|a| a.id).collect();
        let made = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), made, "an asset made twice");
        assert_eq!(
            self.emulator.stats().assets_created as usize,
            made,
            "an asset made twice"
        );
    }
}

#[tokio::test]
async fn steady_throttled_load_with_several_instances() {
    let stack = stack(Setup {
        emulator: EmulatorConfig::default()
            .with_packaging_group("vod-group")
            .with_rate_limit(10.0, 10),
        instances: 3,
        ..Setup::default()
    })
    .await;
    stack.send(&requests(80)).await;
    let (report, receives) = stack.drain("steady", Duration::from_secs(30)).await;
    stack.assert_clean(&report);
    assert_eq!(stack.emulator.assets().len(), 80);
    assert!(stack.letters().await.is_empty());
    // Two deliveries stay in reserve at maxReceiveCount 5.
    assert!(receives.values().all(|&r| r <= 3), "{receives:?}");
}

#[tokio::test]
async fn poison_messages_beside_valid_ones_go_to_the_dead_letter_queue_with_their_reason() {
    let stack = stack(Setup::default()).await;
    let poison = sample("poison.json");
    stack.send(&poison).await;
    stack.send(&requests(10)).await;
    let (report, _) = stack.drain("poison", Duration::from_secs(30)).await;
    stack.assert_clean(&report);
    // poison.json: one valid message among six bad ones.
    assert_eq!(stack.emulator.assets().len(), 11);
    let letters = stack.letters().await;
    assert_eq!(letters.len(), poison.len() - 1, "{letters:?}");
    assert!(
        letters
            .values()
            .all(|c| c == "InvalidMessage" || c == "SourceRefused"),
        "{letters:?}"
    );
}

#[tokio::test]
async fn redelivered_assets_that_already_exist_are_acknowledged_without_a_second_asset() {
    let stack = stack(Setup::default()).await;
    stack.send(&requests(20)).await;
    let (first, _) = stack.drain("first delivery", Duration::from_secs(30)).await;
    stack.assert_clean(&first);
    // The same requests again, as after a redrive or a duplicate send.
    stack.send(&requests(20)).await;
    let (again, receives) = stack.drain("again", Duration::from_secs(30)).await;
    stack.assert_clean(&again);
    assert_eq!(stack.emulator.assets().len(), 20);
    assert!(stack.letters().await.is_empty());
    assert!(receives.values().all(|&r| r == 1), "{receives:?}");
}

#[tokio::test]
async fn s3_notifications_become_assets_and_segments_are_skipped() {
    let stack = stack(Setup::default()).await;
    stack.send(&sample("s3-notification.json")).await;
    stack.send(&sample("s3-test-event.json")).await;
    let (report, _) = stack.drain("s3", Duration::from_secs(30)).await;
    stack.assert_clean(&report);
    let sources: Vec<String> = stack
        .emulator
        .assets()
        .into_iter()
        .map(|a| a.source_arn)
        .collect();
    assert!(!sources.is_empty());
    assert!(sources
        .iter()
        .all(|s| s.ends_with(".m3u8") || s.ends_with(".smil")));
    assert!(stack.letters().await.is_empty());
}

#[tokio::test]
async fn a_slow_api_with_a_three_second_timeout_still_drains() {
    let stack = stack(Setup {
        emulator: EmulatorConfig::default()
            .with_packaging_group("vod-group")
            .with_latency(Duration::from_millis(1200)),
        ..Setup::default()
    })
    .await;
    stack.send(&requests(12)).await;
    let (report, _) = stack.drain("slow", Duration::from_secs(3)).await;
    stack.assert_clean(&report);
    assert_eq!(stack.emulator.assets().len(), 12);
    assert!(stack.letters().await.is_empty());
}

#[tokio::test]
async fn a_fifo_queue_keeps_each_groups_order_under_throttling() {
    let stack = stack(Setup {
        emulator: EmulatorConfig::default()
            .with_packaging_group("vod-group")
            .with_rate_limit(5.0, 5),
        fifo: true,
        ..Setup::default()
    })
    .await;
    let messages: Vec<(String, Option<String>)> = requests(24)
        .into_iter()
        .enumerate()
        .map(|(i, (body, _))| (body, Some(format!("g{}", i % 3))))
        .collect();
    stack.send(&messages).await;
    let (report, _) = stack.drain("fifo", Duration::from_secs(30)).await;
    stack.assert_clean(&report);
    let made: Vec<String> = stack.emulator.assets().into_iter().map(|a| a.id).collect();
    assert_eq!(made.len(), 24);
    for group in 0..3 {
        let order: Vec<&String> = made
            .iter()
            .filter(|id| id.trim_start_matches("e2e-").parse::<usize>().unwrap() % 3 == group)
            .collect();
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(order, sorted, "group g{group} out of order");
    }
}

#[tokio::test]
async fn chaos_500s_503s_dropped_connections_and_throttling_together_still_make_every_asset_once() {
    let stack = stack(Setup {
        emulator: EmulatorConfig::default()
            .with_packaging_group("vod-group")
            .with_rate_limit(10.0, 10)
            .with_fault_rate(0.2)
            .with_drop_rate(0.1)
            .with_seed(7),
        visibility_timeout: 10,
        ..Setup::default()
    })
    .await;
    stack.send(&requests(40)).await;
    let (report, _) = stack.drain("chaos", Duration::from_secs(30)).await;
    stack.assert_clean(&report);
    assert_eq!(stack.emulator.assets().len(), 40);
    assert!(stack.emulator.stats().faults > 0);
    // Some CreateAssets took effect with their answer lost: retried, they are found existing.
    assert!(stack.emulator.stats().dropped > 0);
    // Faults are retried, not dead-lettered: every letter would be a valid message lost.
    assert!(stack.letters().await.is_empty());
}
