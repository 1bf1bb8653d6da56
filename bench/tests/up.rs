//! `make up` as a user runs it: start the local stack, send messages of one's own (a direct
//! request, an S3 notification, a bad one), watch them become assets or dead letters on the
//! status line, then Ctrl-C, which stops everything the stack started.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

/// The value after `label` on the banner line that starts with it.
fn field(lines: &[String], label: &str) -> String {
    lines
        .iter()
        .find_map(|l| l.trim_start().strip_prefix(label))
        .map(|rest| rest.split_whitespace().next().unwrap().to_string())
        .unwrap_or_else(|| panic!("no {label} in {lines:?}"))
}

#[tokio::test]
async fn messages_sent_to_the_local_stack_become_assets_or_dead_letters_and_ctrl_c_stops_it() {
    let logs = std::env::temp_dir().join(format!("local-stack-{}", std::process::id()));
    let mut stack = tokio::process::Command::new(env!("CARGO_BIN_EXE_local-stack"))
        .env("BOOTSTRAP", mpvod_bench::bootstrap_binary())
        .env("LOG_DIR", &logs)
        .env("INSTANCES", "1")
        .env("EMULATOR_ARGS", "--rate 50")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(stack.stdout.take().unwrap()).lines();
    let mut banner = Vec::new();
    while let Some(line) = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .expect("the stack starts")
        .unwrap()
    {
        if line.starts_with("queue:") {
            break;
        }
        banner.push(line);
    }
    let endpoint = field(&banner, "SQS (moto)");
    let queue = field(&banner, "queue ");
    assert!(banner.iter().any(|l| l.contains("aws --endpoint-url")));
    assert!(banner.iter().any(|l| l.contains("scripts/local.py send")));

    let sqs = mpvod_bench::sqs::local_client(&endpoint);
    let s3 = r#"{"Records":[{"eventSource":"aws:s3","eventName":"ObjectCreated:Put","s3":{"bucket":{"name":"media-masters"},"object":{"key":"show/s01e02/index.m3u8"}}}]}"#;
    for body in [
        r#"{"sourceArn":"arn:aws:s3:::media-masters/show/s01e01/index.m3u8"}"#,
        s3,
        "{not json",
    ] {
        sqs.send_message()
            .queue_url(&queue)
            .message_body(body)
            .send()
            .await
            .unwrap();
    }
    let mut last = String::new();
    let watched = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            last = line;
            if last.contains("assets 2 ") && last.contains("dead letters 1 ") {
                return;
            }
        }
    })
    .await;
    assert!(watched.is_ok(), "status never showed the outcome: {last}");
    assert!(last.starts_with("queue: 0 visible, 0 in flight"), "{last}");
    assert!(last.contains("(0 failed)"), "{last}");

    // Ctrl-C: everything stops, moto included.
    let pid = stack.id().unwrap().to_string();
    let signalled = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(signalled.success());
    let status = tokio::time::timeout(Duration::from_secs(20), stack.wait())
        .await
        .expect("stops on Ctrl-C")
        .unwrap();
    assert!(status.success(), "{status:?}");
    let port = endpoint.rsplit(':').next().unwrap().parse::<u16>().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "moto still listens after Ctrl-C"
    );
    let log = std::fs::read_to_string(logs.join("ingest-i0.log")).unwrap();
    assert!(log.contains("asset created"), "{log}");
    let _ = std::fs::remove_dir_all(&logs);
}
