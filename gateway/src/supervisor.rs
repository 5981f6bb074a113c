//! `[[connectors]]`: connector binaries run as child processes once the gateway listens.
//! Each one's stdout and stderr lines are logged with its name as prefix; one that exits is
//! started again after a backoff (reset once it has run for a minute); on shutdown each
//! gets SIGTERM, then SIGKILL after `stop_timeout`.

use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{ConnectorConfig, SupervisorSection};
use crate::orphans::Children;
use crate::provider::local::http::terminate;

/// How long a connector must run before a crash counts as a fresh failure.
const STABLE_AFTER: Duration = Duration::from_secs(60);

/// Starts one supervising task per connector on `tracker`.
pub fn start(
    children: &Children,
    connectors: &[ConnectorConfig],
    settings: &SupervisorSection,
    gateway_url: &str,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
) {
    for connector in connectors {
        let connector = connector.clone();
        let settings = settings.clone();
        let gateway_url = gateway_url.to_owned();
        let cancel = cancel.clone();
        let children = children.clone();
        tracker.spawn(async move {
            supervise(connector, settings, gateway_url, children, cancel).await;
        });
    }
}

async fn supervise(
    connector: ConnectorConfig,
    settings: SupervisorSection,
    gateway_url: String,
    children: Children,
    cancel: CancellationToken,
) {
    let name = connector.name.clone();
    let mut attempts = settings.backoff.attempts();
    loop {
        if cancel.is_cancelled() {
            return;
        }
        let mut command = Command::new(&connector.command);
        command
            .args(&connector.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            // Its own process group: a ctrl-c in the gateway's terminal reaches the
            // gateway only, which then stops its children in order.
            .process_group(0);
        if let Some(config) = &connector.config {
            command.arg("--config").arg(config);
        }
        if !connector.env.contains_key("gateway_url") {
            command.env("gateway_url", &gateway_url);
        }
        command.envs(&connector.env);
        let started = Instant::now();
        match command.spawn() {
            Ok(mut child) => {
                let pid = child.id();
                children.add(pid);
                tracing::info!(connector = %name, pid = child.id().unwrap_or_default(), "connector started");
                if let Some(out) = child.stdout.take() {
                    prefix_lines(name.clone(), out);
                }
                if let Some(err) = child.stderr.take() {
                    prefix_lines(name.clone(), err);
                }
                tokio::select! {
                    status = child.wait() => {
                        match status {
                            Ok(s) => tracing::warn!(connector = %name, status = %s, "connector exited"),
                            Err(e) => tracing::warn!(connector = %name, error = %e, "connector lost"),
                        }
                        children.remove(pid);
                    }
                    () = cancel.cancelled() => {
                        terminate(&mut child, settings.stop_timeout).await;
                        children.remove(pid);
                        tracing::info!(connector = %name, "connector stopped");
                        return;
                    }
                }
            }
            Err(e) => {
                tracing::error!(connector = %name, command = %connector.command, error = %e, "cannot start connector");
            }
        }
        if started.elapsed() >= STABLE_AFTER {
            attempts.reset();
        }
        let delay = attempts.next_delay();
        tracing::info!(connector = %name, delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX), "restarting connector after backoff");
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = cancel.cancelled() => return,
        }
    }
}

/// Writes each line of `reader` to stderr as `[name] line`: the connector's own log
/// format (text or JSON) is kept as it is, only prefixed.
fn prefix_lines<R: AsyncRead + Unpin + Send + 'static>(name: String, reader: R) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(reader).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("[{name}] {line}");
        }
    });
}
