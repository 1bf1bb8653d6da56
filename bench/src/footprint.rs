//! `make footprint`: this function's `bootstrap` beside a minimal `lambda_runtime` + SDK
//! function (`minimal`), both release builds from the same run, each started as Lambda starts
//! it (a local Runtime API) against the emulator:
//!
//! - the stripped binary's size;
//! - cold init: process start to the first poll of the Runtime API;
//! - peak RSS (`VmHWM`) after one 10-message batch;
//! - that batch's latency: from the invocation handed out to the response posted;
//! - the CPU time of init and the batch (what a 128 MB function, with a fraction of a vCPU,
//!   pays for in wall time).
//!
//! Runs alternate between the two binaries (`FOOTPRINT_RUNS`, default 9) and the medians are
//! printed, so the shared machine's noise falls on both alike.
//!
//! Usage: `footprint [BOOTSTRAP MINIMAL]` (default: `target/release/{bootstrap,minimal}`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use mpvod_emulator::runtime::{LocalRuntime, Reply};
use mpvod_emulator::EmulatorConfig;

const ROLE: &str = "arn:aws:iam::123456789012:role/MediaPackageVodSourceRead";

/// What one run measured.
#[derive(Debug, Clone, Copy)]
struct Run {
    init: Duration,
    latency: Duration,
    peak_rss_kib: u64,
    cpu: Duration,
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// The peak resident set of process `pid`, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

async fn run_once(binary: &Path, batch: &str) -> Run {
    let emulator = EmulatorConfig::default()
        .with_packaging_group("vod-group")
        .spawn()
        .await
        .expect("emulator");
    let mut runtime = LocalRuntime::start().await.expect("runtime API");
    let started = Instant::now();
    let mut child = tokio::process::Command::new(binary)
        .env_clear()
        .envs(runtime.function_env("footprint"))
        .env("AWS_ENDPOINT_URL_MEDIAPACKAGE_VOD", emulator.url())
        .env("AWS_ENDPOINT_URL_SQS", "http://127.0.0.1:9")
        .env("PACKAGING_GROUP_ID", "vod-group")
        .env("SOURCE_ROLE_ARN", ROLE)
        .env("ALLOWED_SOURCE_BUCKETS", "media-masters")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", binary.display()));
    let first_poll = loop {
        if let Some(at) = runtime.first_poll() {
            break at;
        }
        if started.elapsed() > Duration::from_secs(30) {
            panic!("{} never polled the Runtime API", binary.display());
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    };
    runtime.invoke("batch", batch, Duration::from_secs(30));
    let (_, reply, answered) = tokio::time::timeout(Duration::from_secs(30), runtime.reply())
        .await
        .expect("an answer in time")
        .expect("a reply");
    assert!(
        matches!(&reply, Reply::Response(body) if body["batchItemFailures"] == serde_json::json!([])),
        "{}: {reply:?}",
        binary.display()
    );
    assert_eq!(emulator.assets().len(), 10, "{}", binary.display());
    let handed_out = runtime.handed_out("batch").expect("handed out");
    let pid = child.id().expect("running");
    let peak_rss_kib = peak_rss_kib(pid);
    let cpu = cpu_time(pid);
    let _ = child.kill().await;
    Run {
        init: first_poll - started,
        latency: answered - handed_out,
        peak_rss_kib,
        cpu,
    }
}

/// CPU time process `pid` has used so far, all its threads (`/proc/PID/task/*/schedstat`).
fn cpu_time(pid: u32) -> Duration {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Duration::ZERO;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .map(Duration::from_nanos)
        .sum()
}

fn median<T: Copy + Ord>(mut values: Vec<T>) -> T {
    values.sort();
    values[values.len() / 2]
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

#[tokio::main]
async fn main() {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let release = target_dir().join("release");
    let (ours, minimal) = match args.as_slice() {
        [ours, minimal] => (ours.clone(), minimal.clone()),
        _ => (release.join("bootstrap"), release.join("minimal")),
    };
    let runs: usize = std::env::var("FOOTPRINT_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(9);
    let event: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../events/batch-10.json"),
        )
        .expect("events/batch-10.json"),
    )
    .expect("a JSON event");
    let batch = event.to_string();

    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        a.push(run_once(&ours, &batch).await);
        b.push(run_once(&minimal, &batch).await);
    }
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let (size_a, size_b) = (size(&ours), size(&minimal));
    let init = |runs: &[Run]| median(runs.iter().map(|r| r.init).collect());
    let latency = |runs: &[Run]| median(runs.iter().map(|r| r.latency).collect());
    let rss = |runs: &[Run]| median(runs.iter().map(|r| r.peak_rss_kib).collect());
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;

    println!(
        "footprint: {} runs each, alternating; medians (release builds, stripped)",
        runs
    );
    println!(
        "{:<34} {:>14} {:>14} {:>8}   target",
        "", "this function", "minimal", "ratio"
    );
    println!(
        "{:<34} {:>10.2} MiB {:>10.2} MiB {:>7.2}x   <= 8 MiB",
        "binary size",
        mib(size_a),
        mib(size_b),
        size_a as f64 / size_b as f64
    );
    println!(
        "{:<34} {:>11.1} ms {:>11.1} ms {:>7.2}x   <= 1.1x minimal",
        "cold init (start to first poll)",
        ms(init(&a)),
        ms(init(&b)),
        ms(init(&a)) / ms(init(&b))
    );
    println!(
        "{:<34} {:>10.2} MiB {:>10.2} MiB {:>7.2}x   <= 16 MiB",
        "peak RSS after a 10-message batch",
        rss(&a) as f64 / 1024.0,
        rss(&b) as f64 / 1024.0,
        rss(&a) as f64 / rss(&b) as f64
    );
    println!(
        "{:<34} {:>11.1} ms {:>11.1} ms {:>7.2}x",
        "10-message batch latency",
        ms(latency(&a)),
        ms(latency(&b)),
        ms(latency(&a)) / ms(latency(&b))
    );
    let cpu = |runs: &[Run]| median(runs.iter().map(|r| r.cpu).collect());
    println!(
        "{:<34} {:>11.1} ms {:>11.1} ms {:>7.2}x",
        "CPU time, init and the batch",
        ms(cpu(&a)),
        ms(cpu(&b)),
        ms(cpu(&a)) / ms(cpu(&b))
    );
    let spread = |runs: &[Run]| {
        let inits: Vec<f64> = runs.iter().map(|r| ms(r.init)).collect();
        let lo = inits.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = inits.iter().cloned().fold(0.0, f64::max);
        format!("{lo:.1}-{hi:.1} ms")
    };
    println!(
        "{:<34} {:>14} {:>14}",
        "cold init, fastest-slowest",
        spread(&a),
        spread(&b)
    );
}
