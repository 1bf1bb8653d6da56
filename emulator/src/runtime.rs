//! A local Lambda Runtime API: what the Lambda service serves a function's `bootstrap` at
//! `AWS_LAMBDA_RUNTIME_API`, so a compiled function can be run and timed off AWS.
//!
//! Invocations are queued with [`LocalRuntime::invoke`]; the function long-polls
//! `/invocation/next` for them, as under Lambda, and its responses and errors come back through
//! [`LocalRuntime::reply`]. It listens on 127.0.0.1 on an ephemeral port and stops when dropped.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::Router;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// What the function posted back for one invocation.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// `/invocation/{id}/response`, with its JSON body.
    Response(Value),
    /// `/invocation/{id}/error`, with its JSON body.
    Error(Value),
}

struct Job {
    request_id: String,
    body: String,
    timeout: Duration,
}

#[derive(Clone)]
struct Shared {
    jobs: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Job>>>,
    replies: mpsc::UnboundedSender<(String, Reply, Instant)>,
    first_poll: Arc<Mutex<Option<Instant>>>,
    handed_out: Arc<Mutex<Vec<(String, Instant)>>>,
}

/// A running local Runtime API.
pub struct LocalRuntime {
    addr: String,
    jobs: mpsc::UnboundedSender<Job>,
    replies: mpsc::UnboundedReceiver<(String, Reply, Instant)>,
    shared: Shared,
    server: tokio::task::JoinHandle<()>,
}

impl LocalRuntime {
    /// Starts serving on 127.0.0.1, on an ephemeral port.
    pub async fn start() -> std::io::Result<Self> {
        let (jobs, queued) = mpsc::unbounded_channel();
        let (replies_tx, replies) = mpsc::unbounded_channel();
        let shared = Shared {
            jobs: Arc::new(tokio::sync::Mutex::new(queued)),
            replies: replies_tx,
            first_poll: Arc::default(),
            handed_out: Arc::default(),
        };
        let app = Router::new()
            .route("/2018-06-01/runtime/invocation/next", get(next))
            .route(
                "/2018-06-01/runtime/invocation/{id}/response",
                post(response),
            )
            .route("/2018-06-01/runtime/invocation/{id}/error", post(error))
            .route("/2018-06-01/runtime/init/error", post(init_error))
            .with_state(shared.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            addr,
            jobs,
            replies,
            shared,
            server,
        })
    }

    /// `host:port`, the value of `AWS_LAMBDA_RUNTIME_API`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The environment Lambda gives a function's process, pointing it at this Runtime API, for
    /// instance `instance` (its log stream): the `AWS_LAMBDA_*` variables, the Region, and
    /// credentials fit only for local stand-ins. For `Command::envs`.
    pub fn function_env(&self, instance: &str) -> Vec<(&'static str, String)> {
        [
            ("AWS_LAMBDA_RUNTIME_API", self.addr.as_str()),
            ("AWS_LAMBDA_FUNCTION_NAME", "mediapackage-ingest"),
            ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128"),
            ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST"),
            ("AWS_LAMBDA_LOG_STREAM_NAME", instance),
            (
                "AWS_LAMBDA_LOG_GROUP_NAME",
                "/aws/lambda/mediapackage-ingest",
            ),
            ("AWS_LAMBDA_LOG_FORMAT", "JSON"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k, v.to_string()))
        .collect()
    }

    /// Queues an invocation with `body` as its event and `timeout` as the function timeout.
    pub fn invoke(
        &self,
        request_id: impl Into<String>,
        body: impl Into<String>,
        timeout: Duration,
    ) {
        let _ = self.jobs.send(Job {
            request_id: request_id.into(),
            body: body.into(),
            timeout,
        });
    }

    /// The next reply: the request id, what the function posted, and when.
    pub async fn reply(&mut self) -> Option<(String, Reply, Instant)> {
        self.replies.recv().await
    }

    /// When the function first polled for an invocation: the end of its cold start.
    pub fn first_poll(&self) -> Option<Instant> {
        *self.shared.first_poll.lock().expect("first poll")
    }

    /// When the invocation `request_id` was handed to the function.
    pub fn handed_out(&self, request_id: &str) -> Option<Instant> {
        let handed = self.shared.handed_out.lock().expect("handed out");
        handed
            .iter()
            .find(|(id, _)| id == request_id)
            .map(|(_, at)| *at)
    }
}

impl Drop for LocalRuntime {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn next(State(shared): State<Shared>) -> (HeaderMap, String) {
    shared
        .first_poll
        .lock()
        .expect("first poll")
        .get_or_insert_with(Instant::now);
    let job = shared.jobs.lock().await.recv().await;
    let Some(job) = job else {
        // No more work will come: hold the long poll like the real service does.
        std::future::pending::<()>().await;
        unreachable!()
    };
    shared
        .handed_out
        .lock()
        .expect("handed out")
        .push((job.request_id.clone(), Instant::now()));
    let deadline = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        + job.timeout;
    let mut headers = HeaderMap::new();
    let mut set = |name: &'static str, value: String| {
        if let Ok(value) = value.parse() {
            headers.insert(name, value);
        }
    };
    set("lambda-runtime-aws-request-id", job.request_id);
    set(
        "lambda-runtime-deadline-ms",
        deadline.as_millis().to_string(),
    );
    set(
        "lambda-runtime-invoked-function-arn",
        "arn:aws:lambda:us-east-1:123456789012:function:mediapackage-ingest".into(),
    );
    set(
        "lambda-runtime-trace-id",
        "Root=1-5f84c7a5-0123456789abcdef01234567".into(),
    );
    (headers, job.body)
}

fn reply(shared: &Shared, id: String, body: &str, make: fn(Value) -> Reply) -> StatusCode {
    let value = serde_json::from_str(body).unwrap_or(Value::Null);
    let _ = shared.replies.send((id, make(value), Instant::now()));
    StatusCode::ACCEPTED
}

async fn response(
    State(shared): State<Shared>,
    Path(id): Path<String>,
    body: String,
) -> StatusCode {
    reply(&shared, id, &body, Reply::Response)
}

async fn error(State(shared): State<Shared>, Path(id): Path<String>, body: String) -> StatusCode {
    reply(&shared, id, &body, Reply::Error)
}

async fn init_error(State(shared): State<Shared>, body: String) -> StatusCode {
    reply(&shared, "init".into(), &body, Reply::Error)
}
