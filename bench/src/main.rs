//! `make bench`: the configuration matrix. Every row drains a backlog through the MediaPackage
//! VOD emulator and the simulated SQS event source mapping with this function and, where the
//! targets compare with them, the baselines, side by side in one run.
//!
//! Environment: `BENCH_ROWS` (comma-separated row names, default all: `cold`, `a3`, `a5`,
//! `a20`, `b3`, `b5`, `b20`, `c5`, `slow`, `fifo`), `BENCH_STRATEGIES=ours` (this function
//! only), `BENCH_ENV_<VAR>` (the function's variable `<VAR>`), `BENCH_TRACE=1`.

use mpvod_bench::matrix::{header, line, rows, run, Outcome, Strategy};
use mpvod_ingest::config::Config;

#[tokio::main]
async fn main() {
    let wanted = std::env::var("BENCH_ROWS").ok();
    let ours_only = std::env::var("BENCH_STRATEGIES").is_ok_and(|s| s == "ours");
    let config = bench_config();
    let mut all: Vec<Outcome> = Vec::new();
    println!("{}", header());
    for (row, strategies) in rows() {
        if wanted
            .as_deref()
            .is_some_and(|w| !w.split(',').any(|n| n.trim() == row.name))
        {
            continue;
        }
        let mut outcomes = Vec::new();
        for &strategy in strategies {
            if ours_only && strategy != Strategy::Ours {
                continue;
            }
            eprintln!("running {} with {}", row.name, strategy.label());
            let outcome = run(&row, strategy, &config).await;
            println!("{}", line(&outcome));
            outcomes.push(outcome);
        }
        let ours = &outcomes[0];
        for other in &outcomes[1..] {
            println!(
                "{:<6}   {} against this function: drain {:.2}x, billed {:.2}x",
                row.name,
                other.strategy.label(),
                other.report.drain_time.as_secs_f64() / ours.report.drain_time.as_secs_f64(),
                other.report.billed.as_secs_f64() / ours.report.billed.as_secs_f64(),
            );
        }
        if !ours.function_dead_letters.is_empty() {
            println!(
                "{:<6}   this function's dead letters by code: {:?}",
                row.name, ours.function_dead_letters
            );
        }
        let rates: Vec<String> = ours.rates.iter().map(|r| format!("{r:.1}")).collect();
        println!(
            "{:<6}   limiter rates at the end: {} req/s",
            row.name,
            rates.join(", ")
        );
        all.extend(outcomes);
    }
    println!();
    println!("{}", header());
    for outcome in &all {
        println!("{}", line(outcome));
    }
}

/// The function's settings: its defaults, with `BENCH_ENV_*` overrides for experiments.
fn bench_config() -> Config {
    Config::from_lookup(|name| std::env::var(format!("BENCH_ENV_{name}")).ok())
        .expect("valid BENCH_ENV_ settings")
}
