//! Support for the end-to-end tests in `tests/`: real binaries, real brokers, real HTTP.
//!
//! - [`Process`]: a workspace binary started with a config file and environment, its
//!   output kept in a log file (printed when a test fails), stopped with SIGTERM (and its
//!   exit status checked) or killed with SIGKILL.
//! - Broker addresses from the environment with loopback defaults ([`redis_url`],
//!   [`nats_url`], [`kafka_brokers`], [`sqs_endpoint`], [`rabbitmq_url`],
//!   `postgres_broker::postgres_url`), as `scripts/test.sh` exports them.
//! - [`unique`] names, so tests never share a topic, stream or queue.
//! - [`admin`]: the admin API scenario (status, dead letters listed, replayed, purged).
//! - [`scenarios`]: the shared suite every broker connector runs; [`keda`]: the KEDA
//!   external scaler scenario, through a generated gRPC client; [`replay`]: the
//!   dead-letter replay scenario; [`redis_broker`], [`kafka_broker`],
//!   [`nats_broker`], [`sqs_broker`], [`rabbitmq_broker`], [`postgres_broker`],
//!   [`mqtt_broker`]: broker fixtures.
//! - The gateway and functions are `connector_sdk::testing::FakeGateway`, a real HTTP
//!   server, except in `tests/system.rs` and `tests/otel.rs`, which run the real
//!   `gateway` binary ([`gateway::Gateway`]) with functions and the connectors it
//!   supervises.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod admin;
pub mod config_keys;
pub mod gateway;
pub mod kafka_broker;
pub mod keda;
pub mod mqtt_broker;
pub mod nats_broker;
pub mod postgres_broker;
pub mod rabbitmq_broker;
pub mod redis_broker;
pub mod replay;
pub mod scenarios;
pub mod sqs_broker;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub use connector_sdk::testing::{FakeGateway, Received, Reply, eventually};

/// `REDIS_URL`, default `redis://127.0.0.1:6379`.
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// `NATS_URL`, default `nats://127.0.0.1:4222`.
pub fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// `RABBITMQ_URL`, default `amqp://guest:guest@127.0.0.1:5672/%2f`.
pub fn rabbitmq_url() -> String {
    std::env::var("RABBITMQ_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// `KAFKA_BROKERS`, default `127.0.0.1:9092`.
pub fn kafka_brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// `SQS_ENDPOINT`, default `http://127.0.0.1:4566`.
pub fn sqs_endpoint() -> String {
    std::env::var("SQS_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:4566".into())
}

/// `prefix` plus a random suffix: a name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// A free loopback port (bound and released; the race with other processes is accepted).
pub fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// The workspace's target directory.
fn target_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("target")
}

/// The path of workspace binary `name` (package `package`), brought up to date with
/// `cargo build` first (skipped when `TEST_BINARIES_BUILT` is set, as scripts/test.sh
/// does after `cargo test --workspace` built them all).
pub fn binary(package: &str, name: &str) -> PathBuf {
    build(
        package,
        "--bin",
        name,
        target_dir().join("debug").join(name),
    )
}

/// The path of example `name` of `package`, built first.
pub fn example_binary(package: &str, name: &str) -> PathBuf {
    build(
        package,
        "--example",
        name,
        target_dir().join("debug").join("examples").join(name),
    )
}

fn build(package: &str, kind: &str, name: &str, path: PathBuf) -> PathBuf {
    // scripts/test.sh runs `cargo test --workspace`, which has already built every binary
    // and example with the workspace's features; building one package on its own here
    // would resolve features differently and rebuild it.
    if std::env::var_os("TEST_BINARIES_BUILT").is_some() && path.exists() {
        return path;
    }
    static BUILD_LOCK: OnceLock<std::sync::Mutex<()>> = OnceLock::new();
    let _guard = BUILD_LOCK
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .args(["build", "--quiet", "-p", package, kind, name])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    // `cargo test` runs this test with the variables it sets for a crate
    // (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, ...). Passed on, build scripts that read them
    // (ring's reads `CARGO_MANIFEST_DIR`) see a changed value, so this build and the next
    // `cargo test` each found the other's dependencies stale and rebuilt them, a minute or
    // two per run. Without them this build sees what a `cargo` run from a shell sees.
    for (var, _) in std::env::vars_os() {
        let Some(var) = var.to_str() else { continue };
        if var.starts_with("CARGO_PKG_")
            || var.starts_with("CARGO_BIN_EXE_")
            || matches!(
                var,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "OUT_DIR"
            )
        {
            cargo.env_remove(var);
        }
    }
    let status = cargo.status().expect("cargo runs");
    assert!(status.success(), "building {name} failed");
    assert!(path.exists(), "{} missing after the build", path.display());
    path
}

/// A running binary. Killed (SIGKILL) when dropped, with its log printed if the test is
/// panicking.
pub struct Process {
    name: String,
    child: Option<Child>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Process {
    /// Starts `binary` with `--config <file holding config_toml>` and `env`.
    pub fn start(binary: &Path, config_toml: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        std::fs::write(&config, config_toml).unwrap();
        Self::start_with_args(binary, &["--config".as_ref(), config.as_os_str()], env, dir)
    }

    /// Starts `binary` with `args` and `env`; `dir` lives as long as the process.
    pub fn start_with_args(
        binary: &Path,
        args: &[&std::ffi::OsStr],
        env: &[(&str, &str)],
        dir: tempfile::TempDir,
    ) -> Self {
        let log = dir.path().join("output.log");
        let out = std::fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let mut command = Command::new(binary);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .env(
                "RUST_LOG",
                std::env::var("TEST_RUST_LOG").unwrap_or_else(|_| "info".into()),
            );
        for (k, v) in env {
            command.env(k, v);
        }
        let child = command.spawn().unwrap_or_else(|e| {
            panic!("cannot start {}: {e}", binary.display());
        });
        Self {
            name: binary
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            child: Some(child),
            log,
            _dir: dir,
        }
    }

    /// Everything the process printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Whether it has exited (without reaping a status another call needs).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Sends SIGTERM and waits up to `within` for it to exit; returns the status.
    pub async fn terminate(&mut self, within: Duration) -> ExitStatus {
        self.signal("TERM");
        self.wait(within).await
    }

    /// Sends SIGKILL and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits up to `within` for the process to exit by itself, without blocking the
    /// runtime (the test's own servers keep answering meanwhile).
    pub async fn wait(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.exited() {
                self.child = None;
                return status;
            }
            if Instant::now() >= deadline {
                let output = self.output();
                self.kill();
                panic!(
                    "{} did not exit within {within:?}; output:\n{output}",
                    self.name
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn signal(&self, name: &str) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .args([&format!("-{name}"), &child.id().to_string()])
                .status();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- output of {} -----\n{}\n----- end of {} -----",
                self.name,
                self.output(),
                self.name
            );
        }
        self.kill();
    }
}

/// `GET http://{addr}{path}`: status and body, or `None` if nothing answers.
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let resp = reqwest::get(format!("http://{addr}{path}")).await.ok()?;
    let status = resp.status().as_u16();
    Some((status, resp.text().await.ok()?))
}

/// Polls `GET {path}` until it answers `status`, for up to `within`.
pub async fn wait_http(addr: SocketAddr, path: &str, status: u16, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if http_get(addr, path).await.map(|(s, _)| s) == Some(status) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// The value of an unlabelled or fully labelled series in a `/metrics` text, e.g.
/// `connector_messages_total{outcome="ack"}`.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A CA (`ca.crt`) and a server certificate for 127.0.0.1 (`server.crt`, `server.key`)
/// in `dir`, made with openssl; returns the CA file.
pub fn tls_certificates(dir: &std::path::Path) -> std::path::PathBuf {
    let run = |args: &[&str]| {
        let ok = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl is installed")
            .success();
        assert!(ok, "openssl {args:?} failed");
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    dir.join("ca.crt")
}
