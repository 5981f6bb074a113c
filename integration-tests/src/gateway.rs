//! The real `gateway` binary for whole-system tests: started on a config the test writes,
//! its API and its supervised connectors' addresses read from its log, and stopped with
//! SIGTERM, also when a test fails, so that it stops the connectors and functions it
//! started (a SIGKILL would leave them running).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use crate::Process;
use crate::scenarios::eventually_async;

/// A gateway process and the directory of its config.
pub struct Gateway {
    process: Process,
    /// The temporary directory of its config (`gateway.toml`), state, and what the test
    /// put beside them; functions and connectors run in it.
    pub dir: PathBuf,
    stopped: bool,
}

impl Gateway {
    /// Writes `config` to `gateway.toml` in `temp` (which lives as long as the gateway)
    /// and starts the gateway on it with `env`, in that directory's terms.
    pub fn start(temp: tempfile::TempDir, config: &str, env: &[(&str, &str)]) -> Self {
        let dir = temp.path().to_owned();
        let config_file = dir.join("gateway.toml");
        std::fs::write(&config_file, config).unwrap();
        let binary = crate::binary("gateway", "gateway");
        let process = Process::start_with_args(
            &binary,
            &["--config".as_ref(), config_file.as_os_str()],
            env,
            temp,
        );
        Self {
            process,
            dir,
            stopped: false,
        }
    }

    /// Everything it (and its connectors, prefixed `[name] `) printed so far.
    pub fn output(&self) -> String {
        self.process.output()
    }

    /// Whether it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.process.exited()
    }

    /// The API address, from its `gateway listening addr=...` line, waiting up to
    /// `within`.
    pub async fn listening(&mut self, within: Duration) -> SocketAddr {
        let deadline = Instant::now() + within;
        loop {
            if let Some(addr) =
                last_addr(&self.output(), |l| l.contains("gateway listening"), "addr=")
            {
                return addr;
            }
            assert!(self.exited().is_none(), "the gateway exited at start");
            assert!(Instant::now() < deadline, "the gateway is not listening");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Where supervised connector `name` serves `/metrics` and `/readyz`: the address on
    /// its latest `starting ... metrics=ADDR` line (a restarted connector binds a new
    /// port), if it has started.
    pub fn connector_metrics(&self, name: &str) -> Option<SocketAddr> {
        let prefix = format!("[{name}] ");
        last_addr(
            &self.output(),
            |l| l.starts_with(&prefix) && l.contains(" starting "),
            "metrics=",
        )
    }

    /// [`connector_metrics`](Self::connector_metrics), waiting up to `within` for the
    /// connector to start.
    pub async fn wait_connector_metrics(&self, name: &str, within: Duration) -> SocketAddr {
        let known =
            eventually_async(within, || async { self.connector_metrics(name).is_some() }).await;
        assert!(known, "connector {name} did not start:\n{}", self.output());
        self.connector_metrics(name).unwrap()
    }

    /// SIGTERM, then waits up to `within` for it to exit; returns its status.
    pub async fn stop(&mut self, within: Duration) -> ExitStatus {
        let status = self.process.terminate(within).await;
        self.stopped = true;
        status
    }
}

/// The address after `key` on the last line of `output` that `line` accepts.
fn last_addr(output: &str, line: impl Fn(&str) -> bool, key: &str) -> Option<SocketAddr> {
    output
        .lines()
        .rev()
        .filter(|l| line(l))
        .find_map(|l| l.split(key).nth(1)?.split_whitespace().next()?.parse().ok())
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let pid = self.process.pid();
        if self.stopped || pid == 0 || self.process.exited().is_some() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.process.exited().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
