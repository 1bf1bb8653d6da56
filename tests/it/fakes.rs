//! The batch machinery against a hand-written fake port: panics, concurrency bound.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use mpvod_ingest::config::Config;
use mpvod_ingest::ingest::{batch_response, Ingestor, Outcome};
use mpvod_ingest::mediapackage::{ApiError, Asset, AssetApi};
use mpvod_ingest::message::{AssetId, AssetRequest};

use crate::common::{event, far_deadline, ids, reported, test_config};

#[derive(Default)]
struct Fake {
    in_flight: AtomicUsize,
    most_in_flight: AtomicUsize,
    calls: AtomicUsize,
}

#[async_trait]
impl AssetApi for Fake {
    async fn create_asset(&self, request: &AssetRequest) -> Result<Asset, ApiError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if request.id.as_str() == "show-s01e03" {
            panic!("bug while creating {}", request.id);
        }
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_in_flight.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        Ok(Asset::of(request))
    }

    async fn describe_asset(&self, _id: &AssetId) -> Result<Option<Asset>, ApiError> {
        Ok(None)
    }
}

#[tokio::test]
async fn a_panic_fails_only_its_own_message() {
    let ingestor = Ingestor::new(Fake::default(), test_config());
    let records = event("batch-10.json").records;
    let outcomes = ingestor.process_batch(&records, far_deadline()).await;
    let response = batch_response(&records, &outcomes).unwrap();
    let reported = reported(&response);
    assert_eq!(reported, [ids(&records)[2].clone()]);
    assert!(
        matches!(&outcomes[2], Outcome::Retry(f, _) if f.code == "Panic" && f.reason.contains("bug while creating"))
    );
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Created { .. }))
            .count(),
        9
    );
}

#[tokio::test]
async fn no_more_than_max_concurrency_messages_run_at_once() {
    let ingestor = Ingestor::new(
        Fake::default(),
        Config {
            max_concurrency: 3,
            ..test_config()
        },
    );
    let mut records = event("batch-10.json").records;
    records.remove(2);
    let outcomes = ingestor.process_batch(&records, far_deadline()).await;
    assert!(outcomes.iter().all(|o| !o.must_redeliver()));
    let fake = ingestor.api();
    assert_eq!(fake.calls.load(Ordering::SeqCst), 9);
    assert_eq!(fake.most_in_flight.load(Ordering::SeqCst), 3);
}
