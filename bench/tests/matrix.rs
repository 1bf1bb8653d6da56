//! A reduced configuration matrix, run by `make test`: the invariants that must hold in every
//! ordinary configuration. No valid message is dead-lettered by the queue, no invocation
//! times out, nothing is lost, FIFO order is kept, and an API that never throttles sees no
//! message handed back.

use mpvod_bench::matrix::{run, Outcome, Row, Strategy, A, COLD, FIFO, SLOW, STAGGER};
use mpvod_ingest::config::Config;

async fn ours(row: Row) -> Outcome {
    let outcome = run(&row, Strategy::Ours, &Config::default()).await;
    eprintln!("{}", mpvod_bench::matrix::line(&outcome));
    outcome
}

/// Every message is an asset: none dead-lettered, lost or timed out.
fn assert_clean(o: &Outcome) {
    assert!(o.report.drained, "{}: not drained", o.row.name);
    assert_eq!(
        o.queue_dead_lettered, 0,
        "{}: valid messages dead-lettered by SQS",
        o.row.name
    );
    assert!(
        o.function_dead_letters.is_empty(),
        "{}: {:?}",
        o.row.name,
        o.function_dead_letters
    );
    assert_eq!(
        o.report.timeouts, 0,
        "{}: invocations timed out",
        o.row.name
    );
    assert_eq!(o.lost, 0, "{}: messages lost", o.row.name);
    assert_eq!(o.assets, o.row.messages, "{}: assets", o.row.name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_that_never_throttles_sees_no_message_handed_back() {
    let o = ours(Row {
        messages: 30,
        ..COLD
    })
    .await;
    assert_clean(&o);
    assert_eq!(o.max_receives, 1, "every message received once");
    assert_eq!(o.visibility_changes, 0, "nothing handed back");
    assert_eq!(o.stats.requests, 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_backlog_at_max_receive_count_3_loses_no_valid_message() {
    let o = ours(Row {
        name: "a3",
        messages: 60,
        max_receive_count: Some(3),
        ..A
    })
    .await;
    assert_clean(&o);
    assert!(o.max_receives <= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_starting_apart_at_max_receive_count_3_lose_no_valid_message() {
    // The first instance meets the API's whole burst alone and the later ones find it empty:
    // their cold probes are refused, and what they learn from it must not cost a delivery
    // they do not have.
    let o = ours(Row {
        name: "a3s",
        messages: 60,
        max_receive_count: Some(3),
        stagger: STAGGER,
        ..A
    })
    .await;
    assert_clean(&o);
    assert!(o.max_receives <= 3);
    assert!(
        o.stats.throttled > 0,
        "the later instances' probes were refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_api_with_a_three_second_timeout_drains_without_timeouts() {
    let o = ours(Row {
        messages: 6,
        instances: 1,
        ..SLOW
    })
    .await;
    assert_clean(&o);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_fifo_queue_keeps_its_order_and_hands_nothing_back() {
    let o = ours(Row {
        messages: 15,
        max_receive_count: Some(3),
        ..FIFO
    })
    .await;
    assert_clean(&o);
    assert_eq!(o.order_kept, Some(true));
    assert!(o.max_receives <= 2, "received {} times", o.max_receives);
}
