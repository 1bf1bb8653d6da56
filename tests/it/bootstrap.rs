//! The compiled `bootstrap` binary, driven through a local Lambda Runtime API exactly as the
//! Lambda service drives it, against the emulator, with configuration from the environment.

use std::process::Stdio;
use std::time::Duration;

use mpvod_emulator::runtime::{LocalRuntime, Reply};
use mpvod_emulator::EmulatorConfig;
use serde_json::Value;
use tokio::process::{Child, Command};

use crate::common::{event, ids, ROLE};

/// A local Runtime API with `events` queued, each with a 30 s function timeout.
async fn runtime_api(events: Vec<(&str, String)>) -> LocalRuntime {
    let runtime = LocalRuntime::start().await.unwrap();
    for (id, body) in events {
        runtime.invoke(id, body, Duration::from_secs(30));
    }
    runtime
}

/// The next reply of `runtime`, within a minute.
async fn reply(runtime: &mut LocalRuntime) -> (String, Reply) {
    let (id, reply, _) = tokio::time::timeout(Duration::from_secs(60), runtime.reply())
        .await
        .expect("the function answers in time")
        .expect("a reply");
    (id, reply)
}

fn bootstrap(runtime: &LocalRuntime, endpoint: &str, extra: &[(&str, &str)]) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_bootstrap"));
    command
        .env_clear()
        .envs(runtime.function_env("local"))
        .env("AWS_ENDPOINT_URL_MEDIAPACKAGE_VOD", endpoint)
        // Nothing here is retried, so SQS is never called; a closed loopback port keeps it so.
        .env("AWS_ENDPOINT_URL_SQS", "http://127.0.0.1:9")
        .env("INITIAL_REQUESTS_PER_SECOND", "100")
        .env("SOURCE_ROLE_ARN", ROLE)
        .env("API_INITIAL_BACKOFF_MS", "5")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in extra {
        command.env(k, v);
    }
    command.spawn().expect("bootstrap starts")
}

#[tokio::test]
async fn the_bootstrap_binary_reports_only_the_bad_messages_of_the_mixed_event() {
    let emulator = EmulatorConfig::default()
        .with_packaging_group("vod-group")
        .spawn()
        .await
        .unwrap();
    let mixed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/events/mixed.json")).unwrap();
    let batch =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/events/batch-10.json"))
            .unwrap();
    let mut runtime = runtime_api(vec![("inv-1", mixed), ("inv-2", batch)]).await;
    let mut child = bootstrap(
        &runtime,
        &emulator.url(),
        &[("PACKAGING_GROUP_ID", "vod-group")],
    );

    let (id, first) = reply(&mut runtime).await;
    assert_eq!(id, "inv-1");
    let Reply::Response(body) = first else {
        panic!("function error: {first:?}");
    };
    let reported: Vec<&str> = body["batchItemFailures"]
        .as_array()
        .expect("batchItemFailures list")
        .iter()
        .map(|f| f["itemIdentifier"].as_str().unwrap())
        .collect();
    let all = ids(&event("mixed.json").records);
    assert_eq!(
        reported,
        [all[1].as_str(), all[2].as_str(), all[3].as_str()]
    );

    // The same warm instance takes the next invocation.
    let (id, second) = reply(&mut runtime).await;
    assert_eq!(id, "inv-2");
    assert!(
        matches!(second, Reply::Response(ref b) if b["batchItemFailures"] == serde_json::json!([])),
        "{second:?}"
    );

    let made: Vec<String> = emulator
        .assets()
        .into_iter()
        .map(|a| a.source_arn)
        .collect();
    assert_eq!(made.len(), 12, "{made:?}");
    assert!(made.contains(&"arn:aws:s3:::media-masters/show/s01e21/index.m3u8".to_string()));
    assert!(made.contains(&"arn:aws:s3:::media-masters/show/s01e25/main.smil".to_string()));

    child.start_kill().unwrap();
    let output = child.wait_with_output().await.unwrap();
    let logs = String::from_utf8_lossy(&output.stdout);
    let json_lines: Vec<Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(!json_lines.is_empty(), "JSON logs expected, got: {logs}");
    assert!(
        json_lines
            .iter()
            .any(|l| l["fields"]["message"] == "permanent failure"
                && l["span"]["message_id"] == all[3].as_str()),
        "a permanent failure is logged with its message id: {logs}"
    );
    assert!(
        json_lines.iter().any(|l| l["level"] == "WARN"
            && l["fields"]["warning"]
                .as_str()
                .is_some_and(|w| w.contains("ALLOWED_SOURCE_BUCKETS"))),
        "no bucket list is warned about at cold start: {logs}"
    );

    // One metrics document per invocation, with the batch's figures.
    let documents = emf_documents(&json_lines);
    assert_eq!(documents.len(), 2, "{logs}");
    let (first, second) = (&documents[0], &documents[1]);
    assert_eq!(first["RequestId"], "inv-1");
    assert_eq!(first["BatchSize"], 5.0);
    assert_eq!(first["AssetsCreated"], 2);
    // No dead-letter queue here: the three bad messages are handed back to SQS.
    assert_eq!(first["HandedBack"], 3);
    assert_eq!(first["DeadLettered"], 0);
    assert_eq!(first["HighestReceiveCount"], 1.0);
    assert_eq!(second["RequestId"], "inv-2");
    assert_eq!(second["BatchSize"], 10.0);
    assert_eq!(second["AssetsCreated"], 10);
    assert_eq!(second["HandedBack"], 0);
    assert_eq!(second["ThrottledCalls"], 0);
    let directive = &first["_aws"]["CloudWatchMetrics"][0];
    assert_eq!(directive["Namespace"], "MediaPackageVodIngest");
    assert_eq!(directive["Dimensions"], serde_json::json!([["Service"]]));
    assert_eq!(first["Service"], "mediapackage-vod-ingest");
}

/// The log lines that are CloudWatch Embedded Metric Format documents, each checked against
/// the specification's required shape: a `_aws` member with a millisecond `Timestamp` and
/// `CloudWatchMetrics` directives whose every metric and dimension has a value at the root.
fn emf_documents(lines: &[Value]) -> Vec<Value> {
    let documents: Vec<Value> = lines
        .iter()
        .filter(|l| l.get("_aws").is_some())
        .cloned()
        .collect();
    for document in &documents {
        let aws = &document["_aws"];
        assert!(aws["Timestamp"].as_u64().is_some(), "{document}");
        for directive in aws["CloudWatchMetrics"].as_array().unwrap() {
            assert!(directive["Namespace"].as_str().is_some(), "{document}");
            for set in directive["Dimensions"].as_array().unwrap() {
                for dimension in set.as_array().unwrap() {
                    let name = dimension.as_str().unwrap();
                    assert!(document[name].is_string(), "{name} in {document}");
                }
            }
            for metric in directive["Metrics"].as_array().unwrap() {
                let name = metric["Name"].as_str().unwrap();
                assert!(document[name].is_number(), "{name} in {document}");
            }
        }
    }
    documents
}

#[tokio::test]
async fn an_invalid_setting_fails_the_cold_start_naming_the_variable() {
    let runtime = runtime_api(Vec::new()).await;
    let child = bootstrap(
        &runtime,
        "http://127.0.0.1:9",
        &[("MAX_CONCURRENCY", "zero")],
    );
    let output = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("exits at once")
        .unwrap();
    assert!(!output.status.success());
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(all.contains("MAX_CONCURRENCY"), "{all}");
}

#[tokio::test]
async fn the_bootstrap_binary_publishes_events_on_the_bus_its_environment_names() {
    let moto = crate::sqs::Moto::start().await;
    let announced_url = crate::events::announced_queue(&moto, "pipeline").await;
    let emulator = EmulatorConfig::default()
        .with_packaging_group("vod-group")
        .spawn()
        .await
        .unwrap();
    let single =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/events/single.json"))
            .unwrap();
    let mut runtime = runtime_api(vec![("inv-1", single)]).await;
    let mut child = bootstrap(
        &runtime,
        &emulator.url(),
        &[
            ("EVENT_BUS_NAME", "pipeline"),
            ("AWS_ENDPOINT_URL_EVENTBRIDGE", moto.url()),
            ("POWERTOOLS_METRICS_NAMESPACE", "Pipeline"),
            ("POWERTOOLS_SERVICE_NAME", "ingest"),
        ],
    );
    let (_, answer) = reply(&mut runtime).await;
    assert!(
        matches!(answer, Reply::Response(ref b) if b["batchItemFailures"] == serde_json::json!([])),
        "{answer:?}"
    );
    let events = crate::events::announced(&moto, &announced_url).await;
    let announced = &events["show-s01e01"];
    assert_eq!(announced["detail"]["found"], false);
    assert_eq!(
        announced["detail"]["messageId"],
        ids(&event("single.json").records)[0].as_str()
    );

    child.start_kill().unwrap();
    let output = child.wait_with_output().await.unwrap();
    let lines: Vec<Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let documents = emf_documents(&lines);
    assert_eq!(documents.len(), 1);
    assert_eq!(
        documents[0]["_aws"]["CloudWatchMetrics"][0]["Namespace"],
        "Pipeline"
    );
    assert_eq!(documents[0]["Service"], "ingest");
    assert_eq!(documents[0]["EventsPublished"], 1);
    assert_eq!(documents[0]["AssetsCreated"], 1);
}
