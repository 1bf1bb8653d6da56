//! `make bench`: drains a backlog through a throttled MediaPackage VOD emulator with this
//! project's function and with the baselines, side by side, in one run.
//!
//! Environment: `BENCH_SCENARIOS` (comma-separated `a`, `b`, `c`; default `a,b`; `c` is a
//! 6,000-message backlog, for receive counts).

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_mediapackagevod::config::retry::RetryConfig;
use mpvod_bench::{
    body, drain, AllAtOnce, DrainReport, Function, Mapping, Ours, SequentialSleep, SimQueue,
};
use mpvod_emulator::{EmulatorConfig, Stats};
use mpvod_ingest::config::Config;

#[derive(Debug, Clone, Copy)]
struct Scenario {
    name: &'static str,
    messages: usize,
    instances: usize,
    rate: f64,
    burst: u32,
    latency: Duration,
    visibility_timeout: Duration,
    function_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Strategy {
    Ours,
    Sequential,
    AllAtOnce,
    AllAtOnceCubic,
}

impl Strategy {
    fn label(self) -> &'static str {
        match self {
            Strategy::Ours => "this function (AIMD + queue)",
            Strategy::Sequential => "sequential, sleep 2*2^n",
            Strategy::AllAtOnce => "all at once, SDK standard",
            Strategy::AllAtOnceCubic => "all at once, SDK adaptive",
        }
    }
}

struct Row {
    strategy: Strategy,
    report: DrainReport,
    stats: Stats,
    assets: usize,
    max_receives: u32,
    visibility_changes: u64,
    rates: Vec<f64>,
}

async fn run(scenario: &Scenario, strategy: Strategy) -> Row {
    let emulator = EmulatorConfig::default()
        .with_packaging_group("vod-group")
        .with_rate_limit(scenario.rate, scenario.burst)
        .with_latency(scenario.latency)
        .spawn()
        .await
        .expect("emulator");
    let url = emulator.url();
    let queue = SimQueue::new(scenario.visibility_timeout);
    for i in 0..scenario.messages {
        queue.send(format!("msg-{i:05}"), body(i));
    }
    let mut ours = Vec::new();
    let instances: Vec<Arc<dyn Function>> = (0..scenario.instances)
        .map(|k| {
            let name = format!("{}-{k}", scenario.name);
            let f: Arc<dyn Function> = match strategy {
                Strategy::Ours => {
                    let o = Arc::new(Ours::new(&url, queue.clone(), bench_config(), &name));
                    ours.push(o.clone());
                    o
                }
                Strategy::Sequential => Arc::new(SequentialSleep::new(&url, &name)),
                Strategy::AllAtOnce => {
                    Arc::new(AllAtOnce::new(&url, RetryConfig::standard(), &name))
                }
                Strategy::AllAtOnceCubic => {
                    Arc::new(AllAtOnce::new(&url, RetryConfig::adaptive(), &name))
                }
            };
            f
        })
        .collect();
    let ideal = scenario.messages as f64 / scenario.rate;
    let mapping = Mapping {
        batch_size: 10,
        function_timeout: scenario.function_timeout,
        give_up_after: Duration::from_secs_f64(ideal * 6.0 + 60.0),
    };
    let emulator = Arc::new(emulator);
    let tracer = std::env::var("BENCH_TRACE").is_ok().then(|| {
        let emulator = emulator.clone();
        tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                eprintln!(
                    "t={:.0} {:?}",
                    start.elapsed().as_secs_f64(),
                    emulator.stats()
                );
            }
        })
    });
    let report = drain(queue.clone(), instances, mapping).await;
    if let Some(t) = tracer {
        t.abort();
    }
    let row = Row {
        strategy,
        report,
        stats: emulator.stats(),
        assets: emulator.assets().len(),
        max_receives: queue.max_receives(),
        visibility_changes: queue.visibility_changes(),
        rates: ours.iter().map(|o| o.0.limiter().stats().rate).collect(),
    };
    drop(emulator);
    row
}

fn print(scenario: &Scenario, rows: &[Row]) {
    let ideal = scenario.messages as f64 / scenario.rate;
    println!();
    println!(
        "Scenario {}: {} messages, {} instances, batches of 10; API limited to {} req/s (burst {}), {} ms latency; \
         visibility timeout {} s, function timeout {} s. Ideal drain {:.1} s.",
        scenario.name.to_uppercase(),
        scenario.messages,
        scenario.instances,
        scenario.rate,
        scenario.burst,
        scenario.latency.as_millis(),
        scenario.visibility_timeout.as_secs(),
        scenario.function_timeout.as_secs(),
        ideal
    );
    println!(
        "{:<30} {:>9} {:>7} {:>6} {:>6} {:>7} {:>9} {:>6} {:>6} {:>6} {:>7} {:>8} {:>8}",
        "strategy",
        "drain s",
        "x ideal",
        "calls",
        "429s",
        "429 %",
        "billed s",
        "invoc",
        "maxrcv",
        "vischg",
        "assets",
        "drain/us",
        "bill/us"
    );
    let ours = rows
        .iter()
        .find(|r| r.strategy == Strategy::Ours)
        .expect("ours ran");
    for row in rows {
        let drain = row.report.drain_time.as_secs_f64();
        let billed = row.report.billed.as_secs_f64();
        let throttled = row.stats.throttled as f64 / row.stats.requests.max(1) as f64 * 100.0;
        println!(
            "{:<30} {:>9.1} {:>7.2} {:>6} {:>6} {:>7.1} {:>9.1} {:>6} {:>6} {:>6} {:>7} {:>8.2} {:>8.2}{}",
            row.strategy.label(),
            drain,
            drain / ideal,
            row.stats.requests,
            row.stats.throttled,
            throttled,
            billed,
            row.report.invocations,
            row.max_receives,
            row.visibility_changes,
            format!("{}/{}", row.assets, scenario.messages),
            drain / ours.report.drain_time.as_secs_f64(),
            billed / ours.report.billed.as_secs_f64(),
            if row.report.drained { "" } else { "  (gave up: not drained)" }
        );
    }
    if !ours.rates.is_empty() {
        let rates: Vec<String> = ours.rates.iter().map(|r| format!("{r:.1}")).collect();
        println!(
            "this function's limiter rates at the end, per instance: {} req/s (fair share {:.1})",
            rates.join(", "),
            scenario.rate / scenario.instances as f64
        );
    }
}

#[tokio::main]
async fn main() {
    let a = Scenario {
        name: "a",
        messages: 300,
        instances: 3,
        rate: 10.0,
        burst: 10,
        latency: Duration::from_millis(50),
        visibility_timeout: Duration::from_secs(30),
        function_timeout: Duration::from_secs(30),
    };
    let b = Scenario {
        name: "b",
        messages: 1200,
        instances: 5,
        rate: 20.0,
        burst: 20,
        ..a
    };
    // A long backlog, for receive counts; not run by default.
    let c = Scenario {
        name: "c",
        messages: 6000,
        ..b
    };
    let all = [a, b, c];
    let wanted = std::env::var("BENCH_SCENARIOS").unwrap_or_else(|_| "a,b".into());
    let strategies: Vec<Strategy> = match std::env::var("BENCH_STRATEGIES") {
        Ok(s) if s == "ours" => vec![Strategy::Ours],
        _ => vec![
            Strategy::Ours,
            Strategy::Sequential,
            Strategy::AllAtOnce,
            Strategy::AllAtOnceCubic,
        ],
    };
    for scenario in all
        .iter()
        .filter(|s| wanted.split(',').any(|w| w.trim() == s.name))
    {
        let mut rows = Vec::new();
        for &strategy in &strategies {
            eprintln!(
                "running scenario {} with {}",
                scenario.name,
                strategy.label()
            );
            rows.push(run(scenario, strategy).await);
        }
        print(scenario, &rows);
    }
}

/// The function's settings: its defaults, with `BENCH_ENV_*` overrides for experiments.
fn bench_config() -> Config {
    Config::from_lookup(|name| std::env::var(format!("BENCH_ENV_{name}")).ok())
        .expect("valid BENCH_ENV_ settings")
}
