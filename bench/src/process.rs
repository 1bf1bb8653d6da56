//! A function instance as Lambda runs it: the compiled `bootstrap` in its own process, behind
//! its own local Runtime API ([`mpvod_emulator::runtime`]), configured by its environment.

use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsMessage};
use mpvod_emulator::runtime::{LocalRuntime, Reply};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::Function;

/// One `bootstrap` process.
pub struct ProcessInstance {
    name: String,
    runtime: tokio::sync::Mutex<LocalRuntime>,
    _child: Child,
    invocations: AtomicU64,
}

impl ProcessInstance {
    /// Starts `binary` as instance `name` with the environment `env` (on top of the Lambda
    /// variables a runtime sets), its standard output and error appended to `log` if given.
    pub async fn start(
        binary: &Path,
        name: &str,
        env: &[(String, String)],
        log: Option<&Path>,
    ) -> std::io::Result<Self> {
        let runtime = LocalRuntime::start().await?;
        let output = |log: Option<&Path>| -> std::io::Result<Stdio> {
            Ok(match log {
                Some(path) => Stdio::from(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)?,
                ),
                None => Stdio::null(),
            })
        };
        let child = Command::new(binary)
            .envs(runtime.function_env(name))
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(output(log)?)
            .stderr(output(log)?)
            .kill_on_drop(true)
            .spawn()?;
        Ok(Self {
            name: name.to_string(),
            runtime: tokio::sync::Mutex::new(runtime),
            _child: child,
            invocations: AtomicU64::new(0),
        })
    }
}

#[async_trait]
impl Function for ProcessInstance {
    async fn invoke(
        &self,
        records: &[SqsMessage],
        deadline: Instant,
    ) -> Result<SqsBatchResponse, String> {
        let mut runtime = self.runtime.lock().await;
        let n = self.invocations.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{n}", self.name);
        let event = serde_json::json!({ "Records": records });
        runtime.invoke(
            &id,
            event.to_string(),
            deadline.saturating_duration_since(Instant::now()),
        );
        loop {
            let (reply_id, reply, _) = runtime.reply().await.ok_or("the runtime API stopped")?;
            // A late answer to an invocation that timed out belongs to no one now.
            if reply_id != id && reply_id != "init" {
                continue;
            }
            return match reply {
                Reply::Response(body) => {
                    serde_json::from_value(body).map_err(|e| format!("bad response: {e}"))
                }
                Reply::Error(body) => Err(body.to_string()),
            };
        }
    }
}
