//! `make up`: the path a deployed stack runs, on loopback, until Ctrl-C. moto serves SQS with
//! an ingest queue and a FIFO one, each with a dead-letter queue in its redrive policy (as in
//! `template.yaml`); the MediaPackage VOD emulator takes `EMULATOR_ARGS`; `INSTANCES` (default
//! 2) compiled `bootstrap` processes per queue, each behind its own local Runtime API, are fed
//! by the event source mapping of `make bench` and `make e2e`. It prints the queue URLs and the
//! commands to send messages, then a status line every second.
//!
//! Environment: `INSTANCES` (the mapping's maximum concurrency, per queue), `BATCH_SIZE`
//! (default 10; the FIFO queue takes at most 10), `BATCHING_WINDOW_SECONDS` (default 0),
//! `EMULATOR_ARGS`, `BOOTSTRAP` (default `target/debug/bootstrap`), `LOG_DIR` (default
//! `target/local-stack`: one log file per instance).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use mpvod_bench::process::ProcessInstance;
use mpvod_bench::sqs::{self, local_client, queue_with_dead_letter_queue, SqsSource};
use mpvod_bench::{bootstrap_binary, serve, Function, Mapping, ServeCounts};
use mpvod_emulator::cli::{parse_args, USAGE};
use mpvod_emulator::moto::Moto;

const ROLE: &str = "arn:aws:iam::123456789012:role/MediaPackageVodSourceRead";

/// The visibility timeout of the local queues: six times the function timeout would be three
/// minutes; a minute keeps a local session lively.
const VISIBILITY_TIMEOUT: u32 = 60;
const MAX_RECEIVE_COUNT: u32 = 5;

struct Queue {
    name: &'static str,
    url: String,
    dlq_url: String,
}

async fn create_queues(sqs: &aws_sdk_sqs::Client, name: &'static str) -> Queue {
    let pair = queue_with_dead_letter_queue(sqs, name, VISIBILITY_TIMEOUT, MAX_RECEIVE_COUNT)
        .await
        .expect("create the queues");
    Queue {
        name,
        url: pair.url,
        dlq_url: pair.dlq_url,
    }
}

/// Visible, in flight and delayed messages of the queue at `url` (zeros if SQS does not answer).
async fn depth(sqs: &aws_sdk_sqs::Client, url: &str) -> [u64; 3] {
    sqs::depth(sqs, url).await.unwrap_or_default()
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| default.to_string())
}

#[tokio::main]
async fn main() -> ExitCode {
    let workspace = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    let workspace = workspace.canonicalize().unwrap_or(workspace);
    let instances: usize = match env_or("INSTANCES", "2").parse() {
        Ok(n) if (1..=50).contains(&n) => n,
        _ => {
            eprintln!("make up: INSTANCES must be a whole number from 1 to 50");
            return ExitCode::from(2);
        }
    };
    let (batch_size, batching_window) = match (
        env_or("BATCH_SIZE", "10").parse::<usize>(),
        env_or("BATCHING_WINDOW_SECONDS", "0").parse::<u64>(),
    ) {
        (Ok(size), Ok(window)) if (1..=10_000).contains(&size) && window <= 300 => {
            (size, Duration::from_secs(window))
        }
        _ => {
            eprintln!(
                "make up: BATCH_SIZE must be 1 to 10000 and BATCHING_WINDOW_SECONDS 0 to 300"
            );
            return ExitCode::from(2);
        }
    };
    let emulator_args = env_or("EMULATOR_ARGS", "");
    let args: Vec<String> = emulator_args.split_whitespace().map(String::from).collect();
    let (mut config, _) = match parse_args(&args) {
        Ok(parsed) => parsed,
        Err(message) => {
            eprintln!("make up: EMULATOR_ARGS: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if config.packaging_groups.is_empty() {
        config.packaging_groups.push("vod-group".into());
    }
    let group = config.packaging_groups[0].clone();
    let bootstrap = bootstrap_binary();
    if !bootstrap.exists() {
        eprintln!(
            "make up: {} not found (make up builds it with cargo build --bin bootstrap)",
            bootstrap.display()
        );
        return ExitCode::from(2);
    }
    let logs = std::env::var_os("LOG_DIR")
        .map_or_else(|| workspace.join("target/local-stack"), PathBuf::from);
    if let Err(error) = std::fs::create_dir_all(&logs) {
        eprintln!("make up: cannot create {}: {error}", logs.display());
        return ExitCode::FAILURE;
    }

    let moto = Moto::start().await;
    let sqs = local_client(moto.url());
    let queues = [
        create_queues(&sqs, "ingest").await,
        create_queues(&sqs, "ingest.fifo").await,
    ];
    let emulator = match config.spawn().await {
        Ok(emulator) => emulator,
        Err(error) => {
            eprintln!("make up: the emulator cannot listen: {error}");
            return ExitCode::FAILURE;
        }
    };
    let env: Vec<(String, String)> = vec![
        ("AWS_ENDPOINT_URL_MEDIAPACKAGE_VOD".into(), emulator.url()),
        ("AWS_ENDPOINT_URL_SQS".into(), moto.url().to_string()),
        ("PACKAGING_GROUP_ID".into(), group.clone()),
        ("SOURCE_ROLE_ARN".into(), ROLE.into()),
        ("ALLOWED_SOURCE_BUCKETS".into(), "media-masters".into()),
    ];
    let counts = Arc::new(ServeCounts::default());
    let mut tasks = Vec::new();
    let mut log_files = Vec::new();
    for queue in &queues {
        let mut functions: Vec<Arc<dyn Function>> = Vec::new();
        for n in 0..instances {
            let name = format!("{}-i{n}", queue.name.replace('.', "-"));
            let log = logs.join(format!("{name}.log"));
            let _ = std::fs::remove_file(&log);
            match ProcessInstance::start(&bootstrap, &name, &env, Some(&log)).await {
                Ok(instance) => functions.push(Arc::new(instance)),
                Err(error) => {
                    eprintln!("make up: cannot start {}: {error}", bootstrap.display());
                    return ExitCode::FAILURE;
                }
            }
            log_files.push(log);
        }
        let source = Arc::new(SqsSource::new(sqs.clone(), &queue.url).await);
        let mapping = Mapping {
            batch_size: if queue.name.ends_with(".fifo") {
                batch_size.min(10)
            } else {
                batch_size
            },
            batching_window,
            function_timeout: Duration::from_secs(30),
            give_up_after: Duration::MAX,
            stagger: Duration::ZERO,
        };
        tasks.push(tokio::spawn(serve(
            source,
            functions,
            mapping,
            counts.clone(),
        )));
    }

    let [ingest, fifo] = &queues;
    let endpoint = moto.url();
    let body = r#"{"sourceArn":"arn:aws:s3:::media-masters/show/s01e01/index.m3u8"}"#;
    println!("local stack up; Ctrl-C stops everything it started");
    println!("  SQS (moto)             {endpoint}");
    println!(
        "  MediaPackage VOD       {} (packaging group {group}; EMULATOR_ARGS=\"{emulator_args}\")",
        emulator.url()
    );
    println!("  queue                  {}", ingest.url);
    println!("  dead-letter queue      {}", ingest.dlq_url);
    println!("  FIFO queue             {}", fifo.url);
    println!("  FIFO dead-letter queue {}", fifo.dlq_url);
    println!(
        "  function instances     {instances} per queue, maxReceiveCount {MAX_RECEIVE_COUNT}, visibility timeout {VISIBILITY_TIMEOUT} s"
    );
    println!(
        "  event source mapping   batch size {batch_size}, batching window {} s, maximum concurrency {instances}",
        batching_window.as_secs()
    );
    for log in &log_files {
        println!("  log                    {}", log.display());
    }
    println!();
    println!("send a message with the AWS CLI:");
    println!(
        "  AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_DEFAULT_REGION=us-east-1 \\\n    aws --endpoint-url {endpoint} sqs send-message --queue-url {} \\\n    --message-body '{body}'",
        ingest.url
    );
    println!("or with Python (boto3) from the project's virtualenv:");
    println!(
        "  .venv/bin/python scripts/local.py send {} '{body}'",
        ingest.url
    );
    println!(
        "  .venv/bin/python scripts/local.py send {} '{body}' --group show-1",
        fifo.url
    );
    println!("read the dead letters and their reasons:");
    println!(
        "  .venv/bin/python scripts/local.py letters {}",
        ingest.dlq_url
    );
    println!();
    let _ = std::io::stdout().flush();

    let terminal = std::io::stdout().is_terminal();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = ticker.tick() => {}
        }
        let [visible, in_flight, delayed] = depth(&sqs, &ingest.url).await;
        let [f_visible, f_in_flight, f_delayed] = depth(&sqs, &fifo.url).await;
        let letters: u64 = [
            depth(&sqs, &ingest.dlq_url).await,
            depth(&sqs, &fifo.dlq_url).await,
        ]
        .iter()
        .map(|d| d.iter().sum::<u64>())
        .sum();
        let stats = emulator.stats();
        let line = format!(
            "queue: {visible} visible, {in_flight} in flight, {delayed} delayed | fifo: {f_visible}/{f_in_flight}/{f_delayed} | assets {} | dead letters {letters} | throttled {} | invocations {} ({} failed)",
            emulator.assets().len(),
            stats.throttled,
            counts.invocations.load(Ordering::Relaxed),
            counts.failed.load(Ordering::Relaxed),
        );
        if terminal {
            print!("\r\x1b[2K{line}");
        } else {
            println!("{line}");
        }
        let _ = std::io::stdout().flush();
    }
    println!("\nstopping: the function instances, the emulator and moto");
    for task in &tasks {
        task.abort();
    }
    for task in tasks {
        let _ = task.await;
    }
    drop(emulator);
    drop(moto);
    ExitCode::SUCCESS
}
