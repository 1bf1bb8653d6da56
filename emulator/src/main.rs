//! `mpvod-emulator`: serve the local MediaPackage VOD emulator until stopped.
//!
//! Prints `mpvod-emulator listening on http://127.0.0.1:PORT` on stdout once it accepts
//! connections, logs each call on stderr, and exits on SIGINT/SIGTERM or after
//! `--max-lifetime` seconds.

use std::process::ExitCode;

use mpvod_emulator::cli::{parse_args, USAGE};

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (config, lifetime) = match parse_args(&args) {
        Ok(parsed) => parsed,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("mpvod-emulator: {message}");
            }
            eprintln!("{USAGE}");
            return if message.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            };
        }
    };
    let emulator = match config.spawn().await {
        Ok(e) => e,
        Err(error) => {
            eprintln!("mpvod-emulator: cannot listen: {error}");
            return ExitCode::FAILURE;
        }
    };
    println!("mpvod-emulator listening on {}", emulator.url());
    let lifetime = async {
        match lifetime {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        _ = lifetime => tracing::info!("max lifetime reached"),
    }
    let stats = emulator.stats();
    emulator.shutdown().await;
    eprintln!(
        "mpvod-emulator stopped: {} requests, {} throttled, {} over quota, {} faults, {} assets created",
        stats.requests, stats.throttled, stats.quota_exceeded, stats.faults, stats.assets_created
    );
    ExitCode::SUCCESS
}
