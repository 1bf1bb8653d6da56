//! A local emulator of the AWS Elemental MediaPackage VOD REST API (restJson1, API 2018-11-07).
//!
//! It serves the asset and packaging-group operations with the real paths, lowerCamelCase JSON
//! members, status codes and error signalling (`x-amzn-ErrorType` header, `{"message"}` body,
//! `x-amzn-RequestId`), so the unmodified `aws-sdk-mediapackagevod` client talks to it. State
//! lives in memory. Knobs make it misbehave the way the real service can:
//!
//! - a request-rate limit (token bucket of `rate` per second and `burst`) answering 429
//!   `TooManyRequestsException` "Too many requests, please try again.";
//! - a per-packaging-group asset quota answering 429 `TooManyRequestsException`
//!   "... Resource limit exceeded";
//! - a fault rate answering 500 `InternalServerErrorException` or 503
//!   `ServiceUnavailableException`;
//! - added latency on every call.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! let emulator = mpvod_emulator::EmulatorConfig::default()
//!     .with_packaging_group("vod-group")
//!     .with_rate_limit(10.0, 10)
//!     .spawn()
//!     .await?;
//! println!("{}", emulator.url());
//! # Ok(()) }
//! ```

pub mod cli;
pub mod moto;
pub mod runtime;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

const ACCOUNT: &str = "123456789012";
const REGION: &str = "us-east-1";
const THROTTLE_MESSAGE: &str = "Too many requests, please try again.";

/// How the emulator behaves. Every knob defaults to "off": no throttling, no faults, no latency,
/// no quota.
#[derive(Debug, Clone, Default)]
pub struct EmulatorConfig {
    /// Address to listen on; `None` means 127.0.0.1 with a port chosen by the OS.
    pub addr: Option<SocketAddr>,
    /// Token bucket: `(requests per second, burst)`. `None` disables throttling.
    pub rate_limit: Option<(f64, u32)>,
    /// Share of calls (0.0 to 1.0) answered with 500 or 503 before any other processing.
    pub fault_rate: f64,
    /// Share of calls (0.0 to 1.0) whose answer is lost: the call takes effect, then the
    /// connection closes without a response, as when a network path fails mid-call.
    pub drop_rate: f64,
    /// Latency added to every call.
    pub latency: Duration,
    /// Maximum assets per packaging group; `None` means unlimited.
    pub asset_quota: Option<usize>,
    /// Packaging groups that exist from the start.
    pub packaging_groups: Vec<String>,
    /// Seed for the fault generator, so a run can be repeated.
    pub seed: Option<u64>,
    /// Role ARNs the caller may not pass: CreateAsset naming one answers 403.
    pub forbidden_roles: Vec<String>,
}

impl EmulatorConfig {
    /// Adds a packaging group that exists from the start.
    pub fn with_packaging_group(mut self, id: impl Into<String>) -> Self {
        self.packaging_groups.push(id.into());
        self
    }

    /// Throttles every operation beyond `rate` requests per second with a bucket of `burst`.
    pub fn with_rate_limit(mut self, rate: f64, burst: u32) -> Self {
        self.rate_limit = Some((rate, burst));
        self
    }

    /// Answers this share of calls with a 500 or a 503.
    pub fn with_fault_rate(mut self, fault_rate: f64) -> Self {
        self.fault_rate = fault_rate;
        self
    }

    /// Loses the answer of this share of calls: the call takes effect and the connection
    /// closes without a response.
    pub fn with_drop_rate(mut self, drop_rate: f64) -> Self {
        self.drop_rate = drop_rate;
        self
    }

    /// Adds this latency to every call.
    pub fn with_latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    /// Limits the number of assets in each packaging group.
    pub fn with_asset_quota(mut self, quota: usize) -> Self {
        self.asset_quota = Some(quota);
        self
    }

    /// Answers 403 `ForbiddenException` to CreateAsset calls that pass this role.
    pub fn with_forbidden_role(mut self, role_arn: impl Into<String>) -> Self {
        self.forbidden_roles.push(role_arn.into());
        self
    }

    /// Seeds the fault generator.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Binds the listener and serves in a background task until the returned handle is
    /// dropped or [`RunningEmulator::shutdown`] is called.
    pub async fn spawn(self) -> std::io::Result<RunningEmulator> {
        let addr = self
            .addr
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Emulator::new(&self));
        let app = router(state.clone());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        Ok(RunningEmulator {
            addr,
            state,
            shutdown: Some(tx),
            task,
        })
    }
}

/// A served emulator. Dropping it stops the server.
pub struct RunningEmulator {
    addr: SocketAddr,
    state: Arc<Emulator>,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningEmulator {
    /// The base URL, e.g. `http://127.0.0.1:41234`, to use as the SDK endpoint.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Counters of what the emulator has answered so far.
    pub fn stats(&self) -> Stats {
        self.state.stats()
    }

    /// Every asset held now, in creation order.
    pub fn assets(&self) -> Vec<Asset> {
        self.state.assets()
    }

    /// Stops serving and waits for the server task to end.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for RunningEmulator {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Counters of the emulator's answers, also served at `GET /_emulator/stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    /// Every API call received.
    pub requests: u64,
    /// Calls answered 429 by the rate limit.
    pub throttled: u64,
    /// Calls answered 429 by the asset quota.
    pub quota_exceeded: u64,
    /// Calls answered 500 or 503 by fault injection.
    pub faults: u64,
    /// Calls whose connection closed without an answer, after they took effect.
    #[serde(default)]
    pub dropped: u64,
    /// Assets created.
    pub assets_created: u64,
}

/// An asset as the API returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Asset {
    pub arn: String,
    pub created_at: String,
    pub egress_endpoints: Vec<Value>,
    pub id: String,
    pub packaging_group_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource_id: Option<String>,
    pub source_arn: String,
    pub source_role_arn: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub tags: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct PackagingGroup {
    arn: String,
    id: String,
    domain_name: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    tags: BTreeMap<String, String>,
}

struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    refilled_at: Instant,
}

impl TokenBucket {
    fn new(rate: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate,
            burst,
            tokens: burst,
            refilled_at: Instant::now(),
        }
    }

    fn try_take(&mut self) -> bool {
        let now = Instant::now();
        let elapsed = now.duration_since(self.refilled_at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.refilled_at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[derive(Default)]
struct Store {
    assets: BTreeMap<String, Asset>,
    order: Vec<String>,
    groups: BTreeMap<String, PackagingGroup>,
}

struct Emulator {
    store: Mutex<Store>,
    bucket: Option<Mutex<TokenBucket>>,
    fault_rate: f64,
    drop_rate: f64,
    latency: Duration,
    asset_quota: Option<usize>,
    forbidden_roles: Vec<String>,
    rng: Mutex<fastrand::Rng>,
    requests: AtomicU64,
    throttled: AtomicU64,
    quota_exceeded: AtomicU64,
    faults: AtomicU64,
    dropped: AtomicU64,
    assets_created: AtomicU64,
    request_ids: AtomicU64,
}

impl Emulator {
    fn new(config: &EmulatorConfig) -> Self {
        let mut store = Store::default();
        for id in &config.packaging_groups {
            store.groups.insert(id.clone(), packaging_group(id, None));
        }
        Self {
            store: Mutex::new(store),
            bucket: config
                .rate_limit
                .map(|(rate, burst)| Mutex::new(TokenBucket::new(rate, burst))),
            fault_rate: config.fault_rate.clamp(0.0, 1.0),
            drop_rate: config.drop_rate.clamp(0.0, 1.0),
            latency: config.latency,
            asset_quota: config.asset_quota,
            forbidden_roles: config.forbidden_roles.clone(),
            rng: Mutex::new(
                config
                    .seed
                    .map_or_else(fastrand::Rng::new, fastrand::Rng::with_seed),
            ),
            requests: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
            quota_exceeded: AtomicU64::new(0),
            faults: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            assets_created: AtomicU64::new(0),
            request_ids: AtomicU64::new(0),
        }
    }

    fn stats(&self) -> Stats {
        Stats {
            requests: self.requests.load(Ordering::Relaxed),
            throttled: self.throttled.load(Ordering::Relaxed),
            quota_exceeded: self.quota_exceeded.load(Ordering::Relaxed),
            faults: self.faults.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            assets_created: self.assets_created.load(Ordering::Relaxed),
        }
    }

    fn assets(&self) -> Vec<Asset> {
        let store = self.store.lock().expect("store lock");
        store
            .order
            .iter()
            .filter_map(|id| store.assets.get(id).cloned())
            .collect()
    }

    fn next_request_id(&self) -> String {
        let n = self.request_ids.fetch_add(1, Ordering::Relaxed);
        format!("00000000-0000-4000-8000-{n:012x}")
    }

    /// Applies latency, fault injection and the rate limit, in that order, before the call is
    /// allowed to touch state.
    async fn admit(&self) -> Result<(), ApiError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        if self.fault_rate > 0.0 {
            let (fault, unavailable) = {
                let mut rng = self.rng.lock().expect("rng lock");
                (rng.f64() < self.fault_rate, rng.bool())
            };
            if fault {
                self.faults.fetch_add(1, Ordering::Relaxed);
                return Err(if unavailable {
                    ApiError::ServiceUnavailable("Service is unavailable, please try again.".into())
                } else {
                    ApiError::InternalServerError("An internal error occurred.".into())
                });
            }
        }
        if let Some(bucket) = &self.bucket {
            if !bucket.lock().expect("bucket lock").try_take() {
                self.throttled.fetch_add(1, Ordering::Relaxed);
                return Err(ApiError::TooManyRequests(THROTTLE_MESSAGE.into()));
            }
        }
        Ok(())
    }
}

/// The packaging configurations every emulated packaging group plays its assets with: one
/// egress endpoint each.
pub const PACKAGING_CONFIGURATIONS: [(&str, &str); 2] =
    [("hls", "index.m3u8"), ("dash", "index.mpd")];

/// A stable hex digest for the emulated URLs (FNV-1a).
fn digest(parts: &[&str]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in parts.join("/").bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// The egress endpoints of asset `id` in `group`, one per packaging configuration, as the API
/// lists them: `QUEUED` when CreateAsset answers, `PLAYABLE` once DescribeAsset is asked.
fn egress_endpoints(group: &PackagingGroup, id: &str, status: &str) -> Vec<Value> {
    PACKAGING_CONFIGURATIONS
        .iter()
        .map(|(config, manifest)| {
            json!({
                "packagingConfigurationId": config,
                "status": status,
                "url": format!(
                    "{}/out/v1/{}/{}/{}/{manifest}",
                    group.domain_name,
                    digest(&[id]),
                    digest(&[&group.id, config]),
                    digest(&[&group.id, config, id]),
                ),
            })
        })
        .collect()
}

fn packaging_group(id: &str, tags: Option<BTreeMap<String, String>>) -> PackagingGroup {
    PackagingGroup {
        arn: format!("arn:aws:mediapackage-vod:{REGION}:{ACCOUNT}:packaging-groups/{id}"),
        id: id.to_string(),
        domain_name: format!("https://{id}.egress.mediapackage-vod.{REGION}.amazonaws.com"),
        tags: tags.unwrap_or_default(),
    }
}

/// The modeled errors of the API, each answered with its status, `x-amzn-ErrorType` and
/// `{"message"}` body.
#[derive(Debug, thiserror::Error)]
enum ApiError {
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    UnprocessableEntity(String),
    #[error("{0}")]
    TooManyRequests(String),
    #[error("{0}")]
    InternalServerError(String),
    #[error("{0}")]
    ServiceUnavailable(String),
}

impl ApiError {
    fn parts(&self) -> (StatusCode, &'static str) {
        match self {
            Self::Forbidden(_) => (StatusCode::FORBIDDEN, "ForbiddenException"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "NotFoundException"),
            Self::UnprocessableEntity(_) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "UnprocessableEntityException",
            ),
            Self::TooManyRequests(_) => (StatusCode::TOO_MANY_REQUESTS, "TooManyRequestsException"),
            Self::InternalServerError(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalServerErrorException",
            ),
            Self::ServiceUnavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailableException",
            ),
        }
    }
}

struct Reply {
    request_id: String,
    result: Result<(StatusCode, Option<Value>), ApiError>,
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let mut headers = HeaderMap::new();
        if let Ok(value) = HeaderValue::from_str(&self.request_id) {
            headers.insert("x-amzn-RequestId", value);
        }
        match self.result {
            Ok((status, Some(body))) => (status, headers, axum::Json(body)).into_response(),
            Ok((status, None)) => (status, headers).into_response(),
            Err(error) => {
                let (status, code) = error.parts();
                headers.insert("x-amzn-ErrorType", HeaderValue::from_static(code));
                let body = json!({ "message": error.to_string() });
                (status, headers, axum::Json(body)).into_response()
            }
        }
    }
}

type Shared = State<Arc<Emulator>>;

fn router(state: Arc<Emulator>) -> Router {
    Router::new()
        .route("/assets", get(list_assets).post(create_asset))
        .route("/assets/{id}", get(describe_asset).delete(delete_asset))
        .route(
            "/packaging_groups",
            axum::routing::post(create_packaging_group),
        )
        .route("/packaging_groups/{id}", get(describe_packaging_group))
        .route("/_emulator/stats", get(stats))
        .route("/_emulator/assets", get(all_assets))
        .fallback(unknown_operation)
        .layer(axum::middleware::from_fn(log_call))
        .with_state(state)
}

async fn log_call(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> impl IntoResponse {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let started = Instant::now();
    let response = next.run(request).await;
    let error_type = response
        .headers()
        .get("x-amzn-ErrorType")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    tracing::info!(
        %method,
        path,
        status = response.status().as_u16(),
        error_type,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "call"
    );
    response
}

async fn unknown_operation(method: Method, uri: Uri) -> Response {
    let body = json!({ "message": format!("No operation matches {method} {}", uri.path()) });
    let mut headers = HeaderMap::new();
    headers.insert(
        "x-amzn-ErrorType",
        HeaderValue::from_static("NotFoundException"),
    );
    (StatusCode::NOT_FOUND, headers, axum::Json(body)).into_response()
}

async fn stats(State(emulator): Shared) -> axum::Json<Stats> {
    axum::Json(emulator.stats())
}

/// Every asset, in creation order, for tools: not an API call, so never throttled or counted.
async fn all_assets(State(emulator): Shared) -> axum::Json<Value> {
    axum::Json(json!({ "assets": emulator.assets() }))
}

/// Runs one API call: admission (latency, faults, throttling), then the operation itself.
async fn call(
    emulator: &Emulator,
    op: impl FnOnce(&Emulator) -> Result<(StatusCode, Option<Value>), ApiError>,
) -> Reply {
    let request_id = emulator.next_request_id();
    let result = match emulator.admit().await {
        Ok(()) => op(emulator),
        Err(error) => Err(error),
    };
    if emulator.drop_rate > 0.0 && emulator.rng.lock().expect("rng lock").f64() < emulator.drop_rate
    {
        emulator.dropped.fetch_add(1, Ordering::Relaxed);
        // Unwinding the connection's task closes its socket with no response written; unlike
        // `panic!`, `resume_unwind` does not run the panic hook, so nothing is printed.
        std::panic::resume_unwind(Box::new("emulated dropped connection"));
    }
    Reply { request_id, result }
}

fn parse_body<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::UnprocessableEntity(format!("Invalid request body: {e}")))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateAssetBody {
    id: Option<String>,
    packaging_group_id: Option<String>,
    source_arn: Option<String>,
    source_role_arn: Option<String>,
    resource_id: Option<String>,
    #[serde(default)]
    tags: BTreeMap<String, String>,
}

fn required(value: Option<String>, name: &str) -> Result<String, ApiError> {
    match value {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(ApiError::UnprocessableEntity(format!(
            "Parameter {name} is required."
        ))),
    }
}

fn valid_asset_id(id: &str) -> bool {
    id.chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn now_iso8601() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

async fn create_asset(State(emulator): Shared, body: Bytes) -> Reply {
    call(&emulator, |emulator| {
        let body: CreateAssetBody = parse_body(&body)?;
        let id = required(body.id, "id")?;
        let group_id = required(body.packaging_group_id, "packagingGroupId")?;
        let source_arn = required(body.source_arn, "sourceArn")?;
        let source_role_arn = required(body.source_role_arn, "sourceRoleArn")?;
        if !valid_asset_id(&id) {
            return Err(ApiError::UnprocessableEntity(format!(
                "Asset id {id} may contain only letters, digits, '_' and '-'."
            )));
        }
        if !source_role_arn.starts_with("arn:") || !source_role_arn.contains(":role/") {
            return Err(ApiError::UnprocessableEntity(format!(
                "sourceRoleArn {source_role_arn} is not an IAM role ARN."
            )));
        }
        if !source_arn.starts_with("arn:") || !source_arn.contains(":s3:::") {
            return Err(ApiError::UnprocessableEntity(format!(
                "sourceArn {source_arn} is not an S3 object ARN."
            )));
        }
        if emulator.forbidden_roles.contains(&source_role_arn) {
            return Err(ApiError::Forbidden(format!(
                "User is not authorized to perform: iam:PassRole on resource: {source_role_arn}"
            )));
        }
        let mut store = emulator.store.lock().expect("store lock");
        let Some(group) = store.groups.get(&group_id) else {
            return Err(ApiError::NotFound(format!(
                "PackagingGroup {group_id} does not exist."
            )));
        };
        let egress = egress_endpoints(group, &id, "QUEUED");
        if store.assets.contains_key(&id) {
            return Err(ApiError::UnprocessableEntity(format!(
                "Asset {id} already exists."
            )));
        }
        if let Some(quota) = emulator.asset_quota {
            let in_group = store
                .assets
                .values()
                .filter(|a| a.packaging_group_id == group_id)
                .count();
            if in_group >= quota {
                emulator.quota_exceeded.fetch_add(1, Ordering::Relaxed);
                return Err(ApiError::TooManyRequests(format!(
                    "Asset quota of {quota} per packaging group reached for {group_id}. Resource limit exceeded"
                )));
            }
        }
        let asset = Asset {
            arn: format!("arn:aws:mediapackage-vod:{REGION}:{ACCOUNT}:assets/{id}"),
            created_at: now_iso8601(),
            egress_endpoints: egress,
            id: id.clone(),
            packaging_group_id: group_id,
            resource_id: body.resource_id,
            source_arn,
            source_role_arn,
            tags: body.tags,
        };
        store.assets.insert(id.clone(), asset.clone());
        store.order.push(id);
        emulator.assets_created.fetch_add(1, Ordering::Relaxed);
        Ok((StatusCode::OK, Some(json!(asset))))
    })
    .await
}

async fn describe_asset(State(emulator): Shared, Path(id): Path<String>) -> Reply {
    call(&emulator, |emulator| {
        let store = emulator.store.lock().expect("store lock");
        match store.assets.get(&id) {
            Some(asset) => {
                let mut asset = asset.clone();
                if let Some(group) = store.groups.get(&asset.packaging_group_id) {
                    asset.egress_endpoints = egress_endpoints(group, &id, "PLAYABLE");
                }
                Ok((StatusCode::OK, Some(json!(asset))))
            }
            None => Err(ApiError::NotFound(format!("Asset {id} does not exist."))),
        }
    })
    .await
}

async fn delete_asset(State(emulator): Shared, Path(id): Path<String>) -> Reply {
    call(&emulator, |emulator| {
        let mut store = emulator.store.lock().expect("store lock");
        if store.assets.remove(&id).is_none() {
            return Err(ApiError::NotFound(format!("Asset {id} does not exist.")));
        }
        store.order.retain(|a| a != &id);
        Ok((StatusCode::ACCEPTED, None))
    })
    .await
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListAssetsQuery {
    max_results: Option<String>,
    next_token: Option<String>,
    packaging_group_id: Option<String>,
}

async fn list_assets(State(emulator): Shared, Query(query): Query<ListAssetsQuery>) -> Reply {
    call(&emulator, |emulator| {
        let max_results = match query.max_results.as_deref() {
            None => 50,
            Some(raw) => match raw.parse::<usize>() {
                Ok(n) if (1..=1000).contains(&n) => n,
                _ => {
                    return Err(ApiError::UnprocessableEntity(format!(
                        "maxResults must be between 1 and 1000, got {raw}."
                    )))
                }
            },
        };
        let start = match query.next_token.as_deref() {
            None => 0,
            Some(token) => token.parse::<usize>().map_err(|_| {
                ApiError::UnprocessableEntity(format!("Invalid nextToken {token}."))
            })?,
        };
        let store = emulator.store.lock().expect("store lock");
        let matching: Vec<&Asset> = store
            .order
            .iter()
            .filter_map(|id| store.assets.get(id))
            .filter(|a| {
                query
                    .packaging_group_id
                    .as_ref()
                    .is_none_or(|g| &a.packaging_group_id == g)
            })
            .collect();
        let page: Vec<Value> = matching
            .iter()
            .skip(start)
            .take(max_results)
            .map(|a| {
                let mut shallow = json!(a);
                if let Some(obj) = shallow.as_object_mut() {
                    obj.remove("egressEndpoints");
                }
                shallow
            })
            .collect();
        let mut body = json!({ "assets": page });
        if start + max_results < matching.len() {
            body["nextToken"] = json!((start + max_results).to_string());
        }
        Ok((StatusCode::OK, Some(body)))
    })
    .await
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreatePackagingGroupBody {
    id: Option<String>,
    tags: Option<BTreeMap<String, String>>,
}

async fn create_packaging_group(State(emulator): Shared, body: Bytes) -> Reply {
    call(&emulator, |emulator| {
        let body: CreatePackagingGroupBody = parse_body(&body)?;
        let id = required(body.id, "id")?;
        if !valid_asset_id(&id) {
            return Err(ApiError::UnprocessableEntity(format!(
                "PackagingGroup id {id} may contain only letters, digits, '_' and '-'."
            )));
        }
        let mut store = emulator.store.lock().expect("store lock");
        if store.groups.contains_key(&id) {
            return Err(ApiError::UnprocessableEntity(format!(
                "PackagingGroup {id} already exists."
            )));
        }
        if store.groups.len() >= 10 {
            return Err(ApiError::TooManyRequests(
                "PackagingGroup quota of 10 reached. Resource limit exceeded".into(),
            ));
        }
        let group = packaging_group(&id, body.tags);
        store.groups.insert(id, group.clone());
        Ok((StatusCode::OK, Some(json!(group))))
    })
    .await
}

async fn describe_packaging_group(State(emulator): Shared, Path(id): Path<String>) -> Reply {
    call(&emulator, |emulator| {
        let store = emulator.store.lock().expect("store lock");
        let Some(group) = store.groups.get(&id) else {
            return Err(ApiError::NotFound(format!(
                "PackagingGroup {id} does not exist."
            )));
        };
        let count = store
            .assets
            .values()
            .filter(|a| a.packaging_group_id == id)
            .count();
        let mut body = json!(group);
        body["approximateAssetCount"] = json!(count);
        Ok((StatusCode::OK, Some(body)))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bucket_allows_burst_then_refuses() {
        let mut bucket = TokenBucket::new(1.0, 3);
        assert!(bucket.try_take());
        assert!(bucket.try_take());
        assert!(bucket.try_take());
        assert!(!bucket.try_take());
    }

    #[test]
    fn dates_are_iso8601() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(now_iso8601().len(), 20);
    }

    #[test]
    fn asset_ids_allow_only_the_documented_characters() {
        assert!(valid_asset_id("movie_01-a"));
        assert!(!valid_asset_id("movie 01"));
        assert!(!valid_asset_id("movie/01"));
    }
}
