//! The MediaPackage VOD calls of a message: each through the rate limiter, within its turn.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::{Failure, Ingestor, Outcome, Ready, Stop, Turn};
use crate::limiter::{Permit, Window};
use crate::mediapackage::{ApiError, Asset, AssetApi, ErrorKind};
use crate::message::{AssetId, AssetRequest, PackagingGroupId, RoleArn, SourceArn};
use crate::metrics::CallCounts;
use crate::redelivery::{slot_wait, Budget, Need, Redelivery};

impl<A: AssetApi> Ingestor<A> {
    /// The latest moment a call of `turn` may start: a short wait while its message may still
    /// go back to the queue, else as late as the invocation allows ([`slot_wait`]). As late,
    /// too, while its queue's `maxReceiveCount` could not be read ([`Ingestor::limit_unread`]).
    pub(super) async fn latest(&self, turn: &Turn<'_>, follow_up: bool) -> Instant {
        let stats = self.limiter.stats();
        // A probing limiter never refuses a slot; FIFO messages and bodies of several objects
        // wait whatever the budget: no need to look the budget up.
        if stats.probing || turn.fifo || turn.several {
            return turn.last_start;
        }
        let max_receives = self.receive_limit(turn.queue_arn).await;
        if self.limit_unread(turn.queue_arn) {
            return turn.last_start;
        }
        let need = Need {
            budget: Budget {
                receives: turn.receives,
                max_receives,
            },
            fifo: turn.fifo,
            several: turn.several,
            follow_up,
        };
        let interval = Duration::from_secs_f64(1.0 / stats.rate);
        match slot_wait(need, self.config.permit_wait, interval) {
            Some(_) if !follow_up && self.warming(turn) => turn.last_start,
            Some(wait) => (Instant::now() + wait).min(turn.last_start),
            None => turn.last_start,
        }
    }

    /// How fast a call of `turn` may go whatever the limiter's rate: the part of its queue's
    /// drain rate that the batch makes of the backlog left ([`crate::drain::DrainGauge::share`]).
    /// Near a backlog's end the instances holding its last messages may use the quota the
    /// others, with nothing to do, leave.
    fn lift(&self, turn: &Turn<'_>) -> f64 {
        turn.queue_arn
            .and_then(|arn| self.gauge.share(arn, Instant::now(), turn.holding))
            .unwrap_or(0.0)
    }

    /// Whether a message that could go back to the queue for want of a slot waits for it
    /// instead, because its queue's backlog is warming up ([`crate::drain::DrainGauge::warming`]),
    /// with or without a receive budget: every hand-back spends a receive. The batch claims its
    /// read of the queue's depth before any call asks ([`Ingestor::process_batch`]).
    fn warming(&self, turn: &Turn<'_>) -> bool {
        turn.queue_arn
            .is_some_and(|arn| self.gauge.warming(arn, Instant::now()))
    }

    /// CreateAsset, with a refusal settled by DescribeAsset: the asset as asked (same source,
    /// packaging group and role) is a redelivery after success, another one is a conflict. A
    /// redelivered body of several objects looks each one up first, so the objects made on an
    /// earlier delivery cost one call, not two, and the body makes progress on every delivery.
    /// A packaging group refused for its asset quota hands over to the next overflow group,
    /// and once `QUOTA_MAX_REFUSALS` calls have been refused for it (and for every group after
    /// it), the message is dead-lettered as `AssetQuotaExceeded`. Every call takes a slot from
    /// the rate limiter.
    pub async fn create(&self, request: &AssetRequest, turn: &Turn<'_>) -> Outcome {
        let chain = self.chain(request);
        if turn.several && turn.receives > 1 {
            match self
                .limited(turn, false, || self.api.describe_asset(&request.id))
                .await
            {
                Ok(Some(existing)) => return settle(request, existing, &chain),
                Ok(None) => {}
                Err(stop) => return stop.into_outcome(),
            }
        }
        for (index, group) in chain.iter().enumerate() {
            let last = index + 1 == chain.len();
            if !last && self.known_full(group) {
                continue;
            }
            let attempt = AssetRequest {
                packaging_group_id: group.clone(),
                ..request.clone()
            };
            let outcome = self.create_in(request, &attempt, &chain, turn).await;
            match &outcome {
                Outcome::Retry(_, Redelivery::Quota) => {
                    CallCounts::add(&self.counts.quota_refusals, 1);
                    let refusals = self.note_quota_refusal(group);
                    if !last {
                        tracing::warn!(
                            packaging_group_id = group.as_str(),
                            next = chain[index + 1].as_str(),
                            "packaging group full; trying the next overflow group"
                        );
                        continue;
                    }
                    return self.quota_end(outcome, group, refusals, &chain);
                }
                Outcome::Created { .. } => {
                    self.quota_refusals.lock().expect("quota").remove(group);
                }
                _ => {}
            }
            return outcome;
        }
        unreachable!("a chain holds the group asked for")
    }

    /// CreateAsset of `attempt` (what `request` asks for, in one group of `chain`).
    pub(super) async fn create_in(
        &self,
        request: &AssetRequest,
        attempt: &AssetRequest,
        chain: &[PackagingGroupId],
        turn: &Turn<'_>,
    ) -> Outcome {
        let refused = match self
            .limited(turn, false, || self.api.create_asset(attempt))
            .await
        {
            Ok(asset) => {
                return Outcome::Created {
                    assets: vec![Ready {
                        request: request.clone(),
                        asset: asset.or_request(attempt),
                        found: false,
                        envelope: String::new(),
                    }],
                }
            }
            // Which code CreateAsset answers for an existing id is not documented: any refusal
            // a retry cannot fix, but 403 and 404 (an unknown packaging group), is checked.
            Err(Stop::Api(error))
                if matches!(error.kind, ErrorKind::Unprocessable | ErrorKind::Permanent) =>
            {
                error
            }
            Err(stop) => return stop.into_outcome(),
        };
        match self
            .limited(turn, true, || self.api.describe_asset(&request.id))
            .await
        {
            Ok(Some(existing)) => settle(request, existing, chain),
            Ok(None) => Outcome::Permanent(refused.into()),
            Err(stop) => stop.into_outcome(),
        }
    }

    /// The packaging groups an asset of `request` may go to, in order: the one it names, then,
    /// for `PACKAGING_GROUP_ID`, the `OVERFLOW_PACKAGING_GROUP_IDS`.
    pub(super) fn chain(&self, request: &AssetRequest) -> Vec<PackagingGroupId> {
        let mut chain = vec![request.packaging_group_id.clone()];
        if self.config.packaging_group_id.as_ref() == Some(&request.packaging_group_id) {
            chain.extend(self.config.overflow_groups.iter().cloned());
        }
        chain
    }

    /// Whether `group` was refused for its asset quota within the last
    /// `QUOTA_REDELIVERY_SECONDS`, with no asset made in it since: the next group is tried
    /// first.
    pub(super) fn known_full(&self, group: &PackagingGroupId) -> bool {
        self.quota_refusals
            .lock()
            .expect("quota")
            .get(group)
            .is_some_and(|(_, at)| at.elapsed() < self.config.quota_redelivery)
    }

    /// Counts a quota refusal for `group`; returns the count since the last asset made in it.
    pub(super) fn note_quota_refusal(&self, group: &PackagingGroupId) -> u32 {
        let mut refusals = self.quota_refusals.lock().expect("quota");
        let entry = refusals.entry(group.clone()).or_insert((0, Instant::now()));
        *entry = (entry.0 + 1, Instant::now());
        entry.0
    }

    /// A message refused for the asset quota of `group`, the last of its `chain`: it comes
    /// back after `QUOTA_REDELIVERY_SECONDS` until the group has been refused
    /// `QUOTA_MAX_REFUSALS` times, then it goes to the dead-letter queue with the reason.
    pub(super) fn quota_end(
        &self,
        outcome: Outcome,
        group: &PackagingGroupId,
        refusals: u32,
        chain: &[PackagingGroupId],
    ) -> Outcome {
        let max = self.config.quota_max_refusals;
        let Outcome::Retry(last, _) = &outcome else {
            return outcome;
        };
        if refusals < max {
            return outcome;
        }
        let groups = if chain.len() > 1 {
            format!(
                " (so are the groups before it: {})",
                chain[..chain.len() - 1]
                    .iter()
                    .map(PackagingGroupId::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        } else {
            String::new()
        };
        Outcome::Permanent(Failure {
            code: "AssetQuotaExceeded".into(),
            reason: format!(
                "packaging group {group} is full{groups}: {refusals} CreateAsset calls refused for \
                 its asset quota (QUOTA_MAX_REFUSALS {max}); raise the quota, delete assets or set \
                 OVERFLOW_PACKAGING_GROUP_IDS, then redrive; last error {}: {}",
                last.code, last.reason
            ),
            request_id: last.request_id.clone(),
        })
    }

    /// A request slot for a call of `turn` (`again`: a follow-up or a retry): a place in the
    /// probe's window while the instance probes, else a slot from the limiter within
    /// [`Ingestor::latest`]. `Err`: when the message should come back instead. A call that was
    /// still waiting for room in the window when the first 429 came asks as the refused call it
    /// would have been with a wider window: it may go back to the queue rather than wait out
    /// the warm-up at the rate just learned.
    async fn slot(&self, turn: &Turn<'_>, again: bool) -> Result<Permit, Redelivery> {
        let window = self.limiter.enter_window(turn.last_start).await;
        if let Window::Entered(permit) = window {
            return Ok(permit);
        }
        let latest = self.latest(turn, again || window == Window::Closed).await;
        self.limiter
            .acquire_lifted(latest, turn.horizon, self.lift(turn))
            .await
            .map_err(|eta| eta.map_or(Redelivery::Within(turn.horizon), Redelivery::After))
    }

    /// Makes `call` through the rate limiter, up to `API_MAX_ATTEMPTS` times while it is
    /// throttled or fails transiently, and teaches the limiter from each answer. Each attempt
    /// waits for its own slot ([`Ingestor::latest`]) and is cut at the turn's hard stop.
    pub(super) async fn limited<T, F, Fut>(
        &self,
        turn: &Turn<'_>,
        follow_up: bool,
        call: F,
    ) -> Result<T, Stop>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, ApiError>>,
    {
        let mut last = None;
        for attempt in 0..self.config.api_max_attempts {
            if Instant::now() > turn.last_start {
                return Err(Stop::Deadline { last });
            }
            if attempt > 0 {
                CallCounts::add(&self.counts.retried, 1);
            }
            let permit = match self.slot(turn, follow_up || attempt > 0).await {
                Ok(permit) => permit,
                Err(redelivery) => return Err(Stop::NoSlot { redelivery, last }),
            };
            let Ok(result) = tokio::time::timeout_at(turn.hard_stop, call()).await else {
                self.limiter.on_failure(&permit);
                return Err(Stop::Deadline { last });
            };
            match result {
                Ok(value) => {
                    self.limiter.on_success(&permit);
                    return Ok(value);
                }
                Err(error) => match error.kind {
                    ErrorKind::Throttled => {
                        CallCounts::add(&self.counts.throttled, 1);
                        self.limiter.on_throttle(&permit);
                        last = Some(error);
                    }
                    // No word on the rate, but an answer the probe must not wait for.
                    ErrorKind::Transient => {
                        self.limiter.on_failure(&permit);
                        last = Some(error);
                    }
                    // Not a rate problem: it must not shrink the rate for other messages.
                    ErrorKind::QuotaExceeded => {
                        self.limiter.on_failure(&permit);
                        return Err(Stop::Api(error));
                    }
                    _ => {
                        // The API took the request, so the rate was fine.
                        self.limiter.on_success(&permit);
                        return Err(Stop::Api(error));
                    }
                },
            }
        }
        Err(Stop::Api(last.expect("at least one attempt")))
    }
}

/// The outcome of a refused CreateAsset whose id exists: the asset as asked, or a conflict. The
/// asset may be in any group of `chain`, the group asked for or one of its overflow groups.
fn settle(request: &AssetRequest, existing: Asset, chain: &[PackagingGroupId]) -> Outcome {
    let expected = match chain
        .iter()
        .find(|g| g.as_str() == existing.packaging_group_id)
    {
        Some(group) => AssetRequest {
            packaging_group_id: group.clone(),
            ..request.clone()
        },
        None => request.clone(),
    };
    let differences = existing.differences(&expected);
    if differences.is_empty() {
        Outcome::AlreadyExists {
            assets: vec![Ready {
                request: request.clone(),
                asset: existing,
                found: true,
                envelope: String::new(),
            }],
        }
    } else {
        Outcome::Permanent(Failure::new(
            "AssetIdConflict",
            format!(
                "asset {} already exists with {}",
                request.id,
                differences.join(", ")
            ),
        ))
    }
}

/// One asset: the same id, source, packaging group and role.
type AssetKey = (AssetId, SourceArn, PackagingGroupId, RoleArn);

/// The CreateAsset calls of one batch, one per asset: a second message for the same asset
/// waits for the first one's outcome and shares it.
#[derive(Default)]
pub(super) struct Calls {
    cells: Mutex<HashMap<AssetKey, Shared>>,
}

/// The outcome of one call, set once and read by every message that asked for it.
type Shared = Arc<tokio::sync::OnceCell<Outcome>>;

impl Calls {
    pub(super) async fn create<A: AssetApi>(
        &self,
        ingestor: &Ingestor<A>,
        request: &AssetRequest,
        turn: &Turn<'_>,
    ) -> Outcome {
        let key = (
            request.id.clone(),
            request.source_arn.clone(),
            request.packaging_group_id.clone(),
            request.source_role_arn.clone(),
        );
        let cell = self
            .cells
            .lock()
            .expect("calls")
            .entry(key)
            .or_default()
            .clone();
        cell.get_or_init(|| ingestor.create(request, turn))
            .await
            .clone()
    }
}
