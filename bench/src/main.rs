//! `make bench`: the configuration matrix. Every row drains a backlog through the MediaPackage
//! VOD emulator and the simulated SQS event source mapping with this function and, where the
//! targets compare with them, the baselines, side by side in one run.
//!
//! Environment: `BENCH_ROWS` (comma-separated row names, default all: `cold`, `a3`, `a5`,
//! `a5s`, `a20`, `a-`, `b3`, `b5`, `b5s`, `b20`, `b-`, `c5`, `slow`, `fifo`; `a-` and `b-`
//! have no redrive policy, `a5s` and `b5s` start their instances 300 ms apart),
//! `BENCH_STRATEGIES=ours` (this function only), `BENCH_RUNS` (runs of each row, default 1:
//! with more, the strategies take turns, and a summary table gives the median and the range
//! of each figure), `BENCH_ENV_<VAR>` (the function's variable `<VAR>`), `BENCH_TRACE=1`.

use mpvod_bench::matrix::{
    header, line, rows, run, summary_header, summary_line, Outcome, Strategy, Summary,
};
use mpvod_ingest::config::Config;

#[tokio::main]
async fn main() {
    let wanted = std::env::var("BENCH_ROWS").ok();
    let ours_only = std::env::var("BENCH_STRATEGIES").is_ok_and(|s| s == "ours");
    let runs = bench_runs();
    let config = bench_config();
    let mut all: Vec<Outcome> = Vec::new();
    let mut summaries: Vec<Summary> = Vec::new();
    println!("{}", header());
    for (row, strategies) in rows() {
        if wanted
            .as_deref()
            .is_some_and(|w| !w.split(',').any(|n| n.trim() == row.name))
        {
            continue;
        }
        let strategies: Vec<Strategy> = strategies
            .iter()
            .copied()
            .filter(|&s| !ours_only || s == Strategy::Ours)
            .collect();
        let first = all.len();
        for turn in 1..=runs {
            let mut outcomes = Vec::new();
            for &strategy in &strategies {
                eprintln!(
                    "running {} with {} (run {turn} of {runs})",
                    row.name,
                    strategy.label()
                );
                let outcome = run(&row, strategy, &config).await;
                println!("{}", line(&outcome));
                outcomes.push(outcome);
            }
            compare(&outcomes);
            all.extend(outcomes);
        }
        for &strategy in &strategies {
            let runs: Vec<&Outcome> = all[first..]
                .iter()
                .filter(|o| o.strategy == strategy)
                .collect();
            summaries.extend(Summary::of(&runs));
        }
    }
    println!();
    println!("{}", header());
    for outcome in &all {
        println!("{}", line(outcome));
    }
    if runs > 1 {
        println!();
        println!("median (least-most) over {runs} runs of each row");
        println!("{}", summary_header());
        for summary in &summaries {
            println!("{}", summary_line(summary));
        }
    }
}

/// The baselines against this function, and what it dead-lettered, for one run of one row.
fn compare(outcomes: &[Outcome]) {
    let Some(ours) = outcomes.first() else {
        return;
    };
    let name = ours.row.name;
    for other in &outcomes[1..] {
        println!(
            "{:<6}   {} against this function: drain {:.2}x, billed {:.2}x",
            name,
            other.strategy.label(),
            other.report.drain_time.as_secs_f64() / ours.report.drain_time.as_secs_f64(),
            other.report.billed.as_secs_f64() / ours.report.billed.as_secs_f64(),
        );
    }
    if !ours.function_dead_letters.is_empty() {
        println!(
            "{:<6}   this function's dead letters by code: {:?}",
            name, ours.function_dead_letters
        );
    }
    let rates: Vec<String> = ours.rates.iter().map(|r| format!("{r:.1}")).collect();
    println!(
        "{:<6}   limiter rates at the end: {} req/s",
        name,
        rates.join(", ")
    );
}

/// `BENCH_RUNS`: how many times each row runs (1 to 100, default 1).
fn bench_runs() -> usize {
    match std::env::var("BENCH_RUNS") {
        Err(_) => 1,
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n @ 1..=100) => n,
            _ => panic!("BENCH_RUNS={v:?}: expected a whole number of runs from 1 to 100"),
        },
    }
}

/// The function's settings: its defaults, with `BENCH_ENV_*` overrides for experiments.
fn bench_config() -> Config {
    Config::from_lookup(|name| std::env::var(format!("BENCH_ENV_{name}")).ok())
        .expect("valid BENCH_ENV_ settings")
}
