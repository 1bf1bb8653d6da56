//! The configuration matrix: one row per way users run the function (throttled or not, one
//! instance or many, `maxReceiveCount` 3 to 20 or no redrive policy, a 3 s timeout on a slow
//! API, FIFO), each drained through the simulated event source mapping, with the outcome of
//! every message checked.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_mediapackagevod::config::retry::RetryConfig;
use mpvod_emulator::{EmulatorConfig, Stats};
use mpvod_ingest::config::Config;

use crate::{
    body, drain, AllAtOnce, DrainReport, Function, Mapping, Ours, SequentialSleep, SimQueue,
};

/// One configuration.
#[derive(Debug, Clone, Copy)]
pub struct Row {
    /// Short name, as `BENCH_ROWS` selects it.
    pub name: &'static str,
    /// Messages in the backlog.
    pub messages: usize,
    /// Function instances (the event source mapping's concurrency).
    pub instances: usize,
    /// The API's request quota, requests/s; `None` for an API that never throttles.
    pub rate: Option<f64>,
    /// The quota's burst.
    pub burst: u32,
    /// Latency of every API call.
    pub latency: Duration,
    /// The queue's visibility timeout.
    pub visibility_timeout: Duration,
    /// The function timeout.
    pub function_timeout: Duration,
    /// The queue's redrive policy.
    pub max_receive_count: Option<u32>,
    /// FIFO message groups; `None` for a standard queue.
    pub fifo_groups: Option<usize>,
    /// How long after the one before each instance starts (zero: all at once).
    pub stagger: Duration,
}

impl Row {
    /// The ideal drain time: messages over the quota, or, unthrottled, one API round trip per
    /// round of batches.
    pub fn ideal(&self) -> Duration {
        match self.rate {
            Some(rate) => Duration::from_secs_f64(self.messages as f64 / rate),
            None => {
                let rounds = self.messages.div_ceil(10 * self.instances);
                self.latency * rounds as u32
            }
        }
    }
}

/// What drains the backlog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// This function.
    Ours,
    /// One message after another, sleeping `2 * 2^n` s after each 429.
    Sequential,
    /// Every message of a batch at once with the SDK's standard retries.
    AllAtOnce,
    /// The same with the SDK's adaptive (CUBIC) retry mode.
    AllAtOnceCubic,
}

impl Strategy {
    /// The label in the tables.
    pub fn label(self) -> &'static str {
        match self {
            Strategy::Ours => "this function",
            Strategy::Sequential => "sequential, sleep 2*2^n",
            Strategy::AllAtOnce => "all at once, SDK standard",
            Strategy::AllAtOnceCubic => "all at once, SDK adaptive",
        }
    }
}

/// What one drain of one row did.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The row.
    pub row: Row,
    /// The strategy.
    pub strategy: Strategy,
    /// Drain time, billed time, invocations, timeouts.
    pub report: DrainReport,
    /// The emulator's counters.
    pub stats: Stats,
    /// Distinct assets made for the backlog's messages.
    pub assets: usize,
    /// Mean and most receives per message.
    pub mean_receives: f64,
    /// The most times one message was received.
    pub max_receives: u32,
    /// Valid messages the queue's redrive policy moved to the dead-letter queue.
    pub queue_dead_lettered: usize,
    /// Messages the function sent to the dead-letter queue, by error code.
    pub function_dead_letters: BTreeMap<String, usize>,
    /// Messages neither made into an asset nor in a dead-letter queue.
    pub lost: usize,
    /// Visibility changes: each one a hand-back or a delayed retry.
    pub visibility_changes: u64,
    /// For FIFO rows: whether every group's assets were made in the group's order.
    pub order_kept: Option<bool>,
    /// This function's limiter rates at the end, per instance.
    pub rates: Vec<f64>,
}

impl Outcome {
    /// Drain time over the ideal.
    pub fn x_ideal(&self) -> f64 {
        self.report.drain_time.as_secs_f64() / self.row.ideal().as_secs_f64()
    }

    /// Throttled calls as a share of all calls, in percent.
    pub fn throttled_percent(&self) -> f64 {
        self.stats.throttled as f64 / self.stats.requests.max(1) as f64 * 100.0
    }
}

/// Drains `row`'s backlog with `strategy`; `config` is this function's configuration.
pub async fn run(row: &Row, strategy: Strategy, config: &Config) -> Outcome {
    let mut emulator = EmulatorConfig::default()
        .with_packaging_group("vod-group")
        .with_latency(row.latency);
    if let Some(rate) = row.rate {
        emulator = emulator.with_rate_limit(rate, row.burst);
    }
    let emulator = Arc::new(emulator.spawn().await.expect("emulator"));
    let url = emulator.url();
    let queue = SimQueue::with_redrive(
        row.visibility_timeout,
        row.max_receive_count,
        row.fifo_groups.is_some(),
    );
    for i in 0..row.messages {
        let group = row.fifo_groups.map(|g| format!("group-{}", i % g));
        queue.send_to_group(format!("msg-{i:05}"), body(i), group);
    }
    let mut ours = Vec::new();
    let instances: Vec<Arc<dyn Function>> = (0..row.instances)
        .map(|k| {
            let name = format!("{}-{k}", row.name);
            let f: Arc<dyn Function> = match strategy {
                Strategy::Ours => {
                    let o = Arc::new(Ours::new(&url, queue.clone(), config.clone(), &name));
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
    let mapping = Mapping {
        batch_size: 10,
        batching_window: Duration::ZERO,
        function_timeout: row.function_timeout,
        give_up_after: row.ideal().mul_f64(6.0) + Duration::from_secs(60),
        stagger: row.stagger,
    };
    let report = drain(queue.clone(), instances, mapping).await;
    let made = emulator.assets();
    let ids: BTreeSet<String> = made.iter().map(|a| a.id.clone()).collect();
    let redriven: BTreeSet<String> = queue.redriven().into_iter().collect();
    let letters = queue.dead_letters();
    let lettered: BTreeSet<&str> = letters.iter().map(|(id, _)| id.as_str()).collect();
    let mut function_dead_letters = BTreeMap::new();
    for (_, code) in &letters {
        *function_dead_letters.entry(code.clone()).or_default() += 1;
    }
    let lost = (0..row.messages)
        .filter(|i| {
            let id = format!("msg-{i:05}");
            !ids.contains(&format!("bench-{i:05}"))
                && !redriven.contains(&id)
                && !lettered.contains(id.as_str())
        })
        .count();
    let order_kept = row.fifo_groups.map(|groups| {
        let mut last: BTreeMap<usize, usize> = BTreeMap::new();
        made.iter().all(|asset| {
            let i: usize = asset.id.trim_start_matches("bench-").parse().unwrap_or(0);
            let previous = last.insert(i % groups, i);
            previous.is_none_or(|p| p < i)
        })
    });
    let outcome = Outcome {
        row: *row,
        strategy,
        report,
        stats: emulator.stats(),
        assets: ids.len(),
        mean_receives: queue.mean_receives(),
        max_receives: queue.max_receives(),
        queue_dead_lettered: redriven.len(),
        function_dead_letters,
        lost,
        visibility_changes: queue.visibility_changes(),
        order_kept,
        rates: ours.iter().map(|o| o.0.limiter().stats().rate).collect(),
    };
    drop(ours);
    outcome
}

/// Scenario A: 300 messages, 3 instances, 10 req/s, `maxReceiveCount` 5.
pub const A: Row = Row {
    name: "a5",
    messages: 300,
    instances: 3,
    rate: Some(10.0),
    burst: 10,
    latency: Duration::from_millis(50),
    visibility_timeout: Duration::from_secs(30),
    function_timeout: Duration::from_secs(30),
    max_receive_count: Some(5),
    fifo_groups: None,
    stagger: Duration::ZERO,
};

/// Scenario B: 1,200 messages, 5 instances, 20 req/s, `maxReceiveCount` 5.
pub const B: Row = Row {
    name: "b5",
    messages: 1200,
    instances: 5,
    rate: Some(20.0),
    burst: 20,
    ..A
};

/// An API that never throttles, a cold instance, `maxReceiveCount` 3.
pub const COLD: Row = Row {
    name: "cold",
    messages: 100,
    instances: 1,
    rate: None,
    max_receive_count: Some(3),
    ..A
};

/// A slow API (1.5 s per call, 2 requests/s) and Lambda's short 3 s timeout.
pub const SLOW: Row = Row {
    name: "slow",
    messages: 20,
    instances: 2,
    rate: Some(2.0),
    burst: 2,
    latency: Duration::from_millis(1500),
    visibility_timeout: Duration::from_secs(18),
    function_timeout: Duration::from_secs(3),
    ..A
};

/// A FIFO queue: three message groups, 5 requests/s, two instances.
pub const FIFO: Row = Row {
    name: "fifo",
    messages: 30,
    instances: 2,
    rate: Some(5.0),
    burst: 5,
    fifo_groups: Some(3),
    ..A
};

/// How far apart the instances of the staggered rows (`a5s`, `b5s`) start, as cold starts
/// spread out: the first instance meets the API's whole burst alone.
pub const STAGGER: Duration = Duration::from_millis(300);

/// The rows of `make bench`, with the strategies each runs: the baselines run where the
/// targets compare with them.
pub fn rows() -> Vec<(Row, &'static [Strategy])> {
    const OURS: &[Strategy] = &[Strategy::Ours];
    const ALL: &[Strategy] = &[
        Strategy::Ours,
        Strategy::Sequential,
        Strategy::AllAtOnce,
        Strategy::AllAtOnceCubic,
    ];
    const SEQUENTIAL: &[Strategy] = &[Strategy::Ours, Strategy::Sequential];
    vec![
        (COLD, OURS),
        (
            Row {
                name: "a3",
                max_receive_count: Some(3),
                ..A
            },
            OURS,
        ),
        (A, ALL),
        (
            Row {
                name: "a5s",
                stagger: STAGGER,
                ..A
            },
            OURS,
        ),
        (
            Row {
                name: "a20",
                max_receive_count: Some(20),
                ..A
            },
            OURS,
        ),
        (
            Row {
                name: "a-",
                max_receive_count: None,
                ..A
            },
            OURS,
        ),
        (
            Row {
                name: "b3",
                max_receive_count: Some(3),
                ..B
            },
            OURS,
        ),
        (B, ALL),
        (
            Row {
                name: "b5s",
                stagger: STAGGER,
                ..B
            },
            OURS,
        ),
        (
            Row {
                name: "b20",
                max_receive_count: Some(20),
                ..B
            },
            OURS,
        ),
        (
            Row {
                name: "b-",
                max_receive_count: None,
                ..B
            },
            OURS,
        ),
        (
            Row {
                name: "c5",
                messages: 6000,
                ..B
            },
            SEQUENTIAL,
        ),
        (SLOW, OURS),
        (FIFO, OURS),
    ]
}

/// The header of the matrix table.
pub fn header() -> String {
    format!(
        "{:<6} {:<26} {:>8} {:>7} {:>6} {:>8} {:>6} {:>6} {:>5} {:>6} {:>5} {:>4} {:>9} {:>5}",
        "row",
        "strategy",
        "drain s",
        "x ideal",
        "429 %",
        "billed s",
        "rcv",
        "maxrcv",
        "qDLQ",
        "fnDLQ",
        "tmout",
        "lost",
        "assets",
        "order"
    )
}

/// One line of the matrix table.
pub fn line(o: &Outcome) -> String {
    let letters: usize = o.function_dead_letters.values().sum();
    format!(
        "{:<6} {:<26} {:>8.1} {:>7.2} {:>6.1} {:>8.1} {:>6.2} {:>6} {:>5} {:>6} {:>5} {:>4} {:>9} {:>5}{}",
        o.row.name,
        o.strategy.label(),
        o.report.drain_time.as_secs_f64(),
        o.x_ideal(),
        o.throttled_percent(),
        o.report.billed.as_secs_f64(),
        o.mean_receives,
        o.max_receives,
        o.queue_dead_lettered,
        letters,
        o.report.timeouts,
        o.lost,
        format!("{}/{}", o.assets, o.row.messages),
        match o.order_kept {
            Some(true) => "kept",
            Some(false) => "BROKEN",
            None => "-",
        },
        if o.report.drained { "" } else { "  (not drained)" }
    )
}

/// One figure over several runs: the least, the median and the most.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    /// The least value.
    pub min: f64,
    /// The median (the mean of the middle two for an even count).
    pub median: f64,
    /// The most.
    pub max: f64,
}

impl Spread {
    /// The spread of `values`; `None` if there are none.
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Self> {
        let mut values: Vec<f64> = values.into_iter().collect();
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let median = match n {
            0 => return None,
            _ if n % 2 == 1 => values[n / 2],
            _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
        };
        Some(Self {
            min: values[0],
            median,
            max: values[n - 1],
        })
    }
}

/// Several runs of one strategy on one row (`BENCH_RUNS`): the spread of the figures that vary
/// from run to run, and the worst or the total of those that must hold in every run.
#[derive(Debug, Clone)]
pub struct Summary {
    /// The row.
    pub row: Row,
    /// The strategy.
    pub strategy: Strategy,
    /// How many runs.
    pub runs: usize,
    /// Drain time over the ideal.
    pub x_ideal: Spread,
    /// Throttled calls, percent of all calls.
    pub throttled_percent: Spread,
    /// Billed seconds.
    pub billed: Spread,
    /// Mean receives per message.
    pub mean_receives: Spread,
    /// The most times one message was received, over every run.
    pub max_receives: u32,
    /// Valid messages dead-lettered by the queue, over every run.
    pub queue_dead_lettered: usize,
    /// Messages the function dead-lettered, over every run.
    pub function_dead_letters: usize,
    /// Invocation timeouts, over every run.
    pub timeouts: u64,
    /// Messages lost, over every run.
    pub lost: usize,
    /// Runs that did not empty the queue.
    pub not_drained: usize,
    /// FIFO rows: runs that broke a group's order.
    pub order_broken: Option<usize>,
}

impl Summary {
    /// Sums up `outcomes`, runs of one strategy on one row; `None` if there are none.
    pub fn of(outcomes: &[&Outcome]) -> Option<Self> {
        let first = outcomes.first()?;
        let spread = |figure: fn(&Outcome) -> f64| {
            Spread::of(outcomes.iter().map(|o| figure(o))).expect("at least one run")
        };
        Some(Self {
            row: first.row,
            strategy: first.strategy,
            runs: outcomes.len(),
            x_ideal: spread(Outcome::x_ideal),
            throttled_percent: spread(Outcome::throttled_percent),
            billed: spread(|o| o.report.billed.as_secs_f64()),
            mean_receives: spread(|o| o.mean_receives),
            max_receives: outcomes.iter().map(|o| o.max_receives).max().unwrap_or(0),
            queue_dead_lettered: outcomes.iter().map(|o| o.queue_dead_lettered).sum(),
            function_dead_letters: outcomes
                .iter()
                .map(|o| o.function_dead_letters.values().sum::<usize>())
                .sum(),
            timeouts: outcomes.iter().map(|o| o.report.timeouts).sum(),
            lost: outcomes.iter().map(|o| o.lost).sum(),
            not_drained: outcomes.iter().filter(|o| !o.report.drained).count(),
            order_broken: first.order_kept.map(|_| {
                outcomes
                    .iter()
                    .filter(|o| o.order_kept == Some(false))
                    .count()
            }),
        })
    }
}

/// The header of the summary table: median, and least to most in brackets.
pub fn summary_header() -> String {
    format!(
        "{:<6} {:<26} {:>4} {:>18} {:>18} {:>22} {:>6} {:>6} {:>5} {:>6} {:>5} {:>4} {:>6} {:>6}",
        "row",
        "strategy",
        "runs",
        "x ideal",
        "429 %",
        "billed s",
        "rcv",
        "maxrcv",
        "qDLQ",
        "fnDLQ",
        "tmout",
        "lost",
        "undrnd",
        "broken"
    )
}

/// One line of the summary table.
pub fn summary_line(s: &Summary) -> String {
    let spread = |s: Spread, decimals: usize| {
        format!(
            "{:.d$} ({:.d$}-{:.d$})",
            s.median,
            s.min,
            s.max,
            d = decimals
        )
    };
    format!(
        "{:<6} {:<26} {:>4} {:>18} {:>18} {:>22} {:>6.2} {:>6} {:>5} {:>6} {:>5} {:>4} {:>6} {:>6}",
        s.row.name,
        s.strategy.label(),
        s.runs,
        spread(s.x_ideal, 2),
        spread(s.throttled_percent, 1),
        spread(s.billed, 1),
        s.mean_receives.median,
        s.max_receives,
        s.queue_dead_lettered,
        s.function_dead_letters,
        s.timeouts,
        s.lost,
        s.not_drained,
        s.order_broken.map_or("-".to_string(), |n| n.to_string()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spread_has_the_least_the_median_and_the_most() {
        let odd = Spread::of([3.0, 1.0, 2.0]).unwrap();
        assert_eq!((odd.min, odd.median, odd.max), (1.0, 2.0, 3.0));
        let even = Spread::of([4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!((even.min, even.median, even.max), (1.0, 2.5, 4.0));
        assert_eq!(Spread::of([]), None);
    }

    fn outcome(drain_s: f64, billed_s: f64, max_receives: u32, lost: usize) -> Outcome {
        Outcome {
            row: A,
            strategy: Strategy::Ours,
            report: DrainReport {
                drain_time: Duration::from_secs_f64(drain_s),
                drained: lost == 0,
                billed: Duration::from_secs_f64(billed_s),
                ..DrainReport::default()
            },
            stats: Stats {
                requests: 100,
                throttled: 5,
                ..Stats::default()
            },
            assets: A.messages - lost,
            mean_receives: 2.0,
            max_receives,
            queue_dead_lettered: 0,
            function_dead_letters: BTreeMap::from([("RetriesExhausted".to_string(), 1)]),
            lost,
            visibility_changes: 0,
            order_kept: None,
            rates: vec![],
        }
    }

    #[test]
    fn a_summary_keeps_the_worst_of_what_must_hold_in_every_run() {
        let ideal = A.ideal().as_secs_f64();
        let runs = [
            outcome(ideal, 10.0, 3, 0),
            outcome(2.0 * ideal, 30.0, 4, 2),
            outcome(1.5 * ideal, 20.0, 2, 0),
        ];
        let s = Summary::of(&runs.iter().collect::<Vec<_>>()).unwrap();
        assert_eq!(s.runs, 3);
        assert_eq!(
            (s.x_ideal.min, s.x_ideal.median, s.x_ideal.max),
            (1.0, 1.5, 2.0)
        );
        assert_eq!(s.billed.median, 20.0);
        assert_eq!(s.throttled_percent.median, 5.0);
        // One bad run shows, whatever the others did.
        assert_eq!(s.max_receives, 4);
        assert_eq!(s.lost, 2);
        assert_eq!(s.not_drained, 1);
        assert_eq!(s.function_dead_letters, 3);
        assert_eq!(s.order_broken, None);
        assert!(
            summary_line(&s).contains("1.50 (1.00-2.00)"),
            "{}",
            summary_line(&s)
        );
        assert_eq!(Summary::of(&[]).map(|s| s.runs), None);
    }
}
