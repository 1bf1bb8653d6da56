//! moto's server (from PyPI) on loopback: the real SQS and EventBridge APIs for tests and local
//! runs. It listens on 127.0.0.1 on a free port and stops when dropped.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

/// A running moto server.
pub struct Moto {
    url: String,
    _child: Child,
}

/// Where moto is: `MOTO_SERVER`, else the project's virtualenv (`make venv` installs it).
pub fn moto_server() -> PathBuf {
    std::env::var_os("MOTO_SERVER").map_or_else(
        || {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../.venv/bin/moto_server"
            ))
        },
        PathBuf::from,
    )
}

impl Moto {
    /// Starts moto and waits until it listens; panics with what to do if it is not installed.
    pub async fn start() -> Self {
        let exe = moto_server();
        assert!(
            exe.exists(),
            "{} not found: run `make test`, which installs moto into .venv, or set MOTO_SERVER",
            exe.display()
        );
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
            listener.local_addr().expect("an address").port()
        };
        let child = Command::new(&exe)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("moto_server starts");
        let started = tokio::time::Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "moto did not listen"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Self {
            url: format!("http://127.0.0.1:{port}"),
            _child: child,
        }
    }

    /// The endpoint, for `endpoint_url` or `AWS_ENDPOINT_URL_SQS`.
    pub fn url(&self) -> &str {
        &self.url
    }
}
