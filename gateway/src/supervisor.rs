//! `[[connectors]]`: connector binaries run as child processes once the gateway listens.
//! Each one's stdout and stderr lines are logged with its name as prefix; one that exits is
//! started again after a backoff (reset once it has run for a minute); on shutdown each
//! gets SIGTERM, then SIGKILL after `stop_timeout`.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{ConnectorConfig, GATEWAY_ENV, GatewaySection, SupervisorSection};
use crate::orphans::Children;
use crate::provider::local::http::terminate;

/// How long a connector must run before a crash counts as a fresh failure.
const STABLE_AFTER: Duration = Duration::from_secs(60);

/// The variables every connector gets (its own `env` overrides them): `gateway_url`
/// pointing at this gateway, `report_backlog` on (so the local provider scales functions
/// on the messages waiting for them, see [`crate::backlog`]) and, when `/system/*` needs
/// basic auth, the credentials in the connector-sdk's names (the same files, or
/// `gateway_username`/`gateway_password`).
pub fn connector_env(gateway_url: &str, gateway: &GatewaySection) -> BTreeMap<String, String> {
    let mut env = BTreeMap::from([
        ("gateway_url".to_owned(), gateway_url.to_owned()),
        ("report_backlog".to_owned(), "true".to_owned()),
    ]);
    if gateway.basic_auth {
        env.insert("basic_auth".to_owned(), "true".to_owned());
        match (&gateway.username, &gateway.password) {
            (Some(user), Some(password)) => {
                env.insert("gateway_username".to_owned(), user.clone());
                env.insert("gateway_password".to_owned(), password.expose().to_owned());
            }
            _ => {
                env.insert(
                    "secret_mount_path".to_owned(),
                    gateway.secret_mount_path.to_string_lossy().into_owned(),
                );
            }
        }
    }
    env
}

/// Starts one supervising task per connector on `tracker`.
pub fn start(
    children: &Children,
    connectors: &[ConnectorConfig],
    settings: &SupervisorSection,
    base_env: &BTreeMap<String, String>,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
) {
    for connector in connectors {
        let connector = connector.clone();
        let settings = settings.clone();
        let base_env = base_env.clone();
        let cancel = cancel.clone();
        let children = children.clone();
        tracker.spawn(async move {
            supervise(connector, settings, base_env, children, cancel).await;
        });
    }
}

async fn supervise(
    connector: ConnectorConfig,
    settings: SupervisorSection,
    base_env: BTreeMap<String, String>,
    children: Children,
    cancel: CancellationToken,
) {
    let name = connector.name.clone();
    let mut attempts = settings.backoff.attempts();
    loop {
        if cancel.is_cancelled() {
            return;
        }
        let mut command = command(&connector, &base_env);
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

/// The command that starts `connector`: its arguments, `--config`, and the gateway's
/// environment without the gateway's own variables, then `base_env`, then its own `env`.
///
/// The gateway's variables configure the gateway; several name a different setting in a
/// connector (`nats_url`, the gateway's JetStream queue, is the NATS connector's server;
/// `upstream_timeout` is a connector's invocation timeout), and a variable beats the
/// connector's file. What a connector should share, it gets in `base_env`.
fn command(connector: &ConnectorConfig, base_env: &BTreeMap<String, String>) -> Command {
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
    for var in GATEWAY_ENV {
        command.env_remove(var.name);
    }
    command.envs(base_env);
    command.envs(&connector.env);
    command
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

#[cfg(test)]
mod tests {
    use super::*;
    use faas_common::config::Secret;

    #[test]
    fn connectors_get_the_gateway_and_its_credentials() {
        let mut gateway = GatewaySection::default();
        let env = connector_env("http://127.0.0.1:8080", &gateway);
        assert_eq!(env.len(), 2);
        assert_eq!(env["gateway_url"], "http://127.0.0.1:8080");
        assert_eq!(env["report_backlog"], "true");
        gateway.basic_auth = true;
        let env = connector_env("http://gw", &gateway);
        assert_eq!(env["basic_auth"], "true");
        assert_eq!(env["secret_mount_path"], "/run/secrets");
        gateway.username = Some("admin".into());
        gateway.password = Some(Secret::new("pw"));
        let env = connector_env("http://gw", &gateway);
        assert_eq!(env["gateway_username"], "admin");
        assert_eq!(env["gateway_password"], "pw");
    }

    #[test]
    fn connectors_do_not_inherit_the_gateways_own_variables() {
        let connector = ConnectorConfig {
            name: "nats".into(),
            command: "nats-connector".into(),
            args: Vec::new(),
            config: None,
            env: BTreeMap::from([("upstream_timeout".to_owned(), "5s".to_owned())]),
        };
        let base = BTreeMap::from([
            ("gateway_url".to_owned(), "http://gw".to_owned()),
            ("basic_auth".to_owned(), "true".to_owned()),
        ]);
        let command = command(&connector, &base);
        let env: BTreeMap<_, _> = command
            .as_std()
            .get_envs()
            .map(|(k, v)| {
                (
                    k.to_string_lossy().into_owned(),
                    v.map(|v| v.to_string_lossy().into_owned()),
                )
            })
            .collect();
        // Removed from what the gateway's environment would pass on...
        assert_eq!(env["nats_url"], None);
        assert_eq!(env["secret_mount_path"], None);
        // ...unless the supervisor or the entry's `env` sets them.
        assert_eq!(env["gateway_url"].as_deref(), Some("http://gw"));
        assert_eq!(env["basic_auth"].as_deref(), Some("true"));
        assert_eq!(env["upstream_timeout"].as_deref(), Some("5s"));
    }
}
