//! The real `gateway` binary, started on a config file, its log collected.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::wait_for;

/// Writes `gateway.toml` in `dir`: loopback ports, state and secrets in `dir`, a quick
/// supervisor, `provider` (keys) in `[provider]`, then `extra` (tables); returns its path.
pub fn write_config(dir: &Path, provider: &str, extra: &str) -> PathBuf {
    let path = dir.join("gateway.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[gateway]
bind = "127.0.0.1:0"
metrics_bind = "127.0.0.1:0"
state_dir = "state"

[provider]
secrets_path = "secrets"
{provider}

[supervisor]
backoff = {{ initial = "50ms", max = "200ms" }}
stop_timeout = "5s"
{extra}
"#
        ),
    )
    .unwrap();
    path
}

/// A running gateway binary; killed when dropped.
pub struct Running {
    pub child: Child,
    pub addr: String,
    /// Where `/metrics` is served.
    pub metrics_addr: String,
    pub lines: Arc<Mutex<Vec<String>>>,
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

pub async fn start_binary(config: &Path) -> Running {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .arg("--config")
        .arg(config)
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&lines);
    let stderr = child.stderr.take().unwrap();
    tokio::spawn(async move {
        let mut reader = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            sink.lock().unwrap().push(strip_ansi(&line));
        }
    });
    let (addr, metrics_addr) = wait_for(Duration::from_secs(30), "the gateway to listen", || {
        let lines = Arc::clone(&lines);
        async move {
            let lines = lines.lock().unwrap();
            lines.iter().find_map(|l| {
                let at = l.find("gateway listening")?;
                let rest = &l[at..];
                let field = |name: &str| {
                    Some(
                        rest.split(name)
                            .nth(1)?
                            .split_whitespace()
                            .next()?
                            .to_owned(),
                    )
                };
                Some((field(" addr=")?, field(" metrics=")?))
            })
        }
    })
    .await;
    Running {
        child,
        addr,
        metrics_addr,
        lines,
    }
}

impl Running {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The value of the unlabelled series `name` on `/metrics`, when it can be read.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let text = reqwest::get(format!("http://{}/metrics", self.metrics_addr))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    pub fn log(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    pub async fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().unwrap() as i32;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("the gateway stops within 30s of SIGTERM")
            .unwrap()
    }

    pub async fn kill(mut self) {
        self.child.kill().await.unwrap();
    }
}
