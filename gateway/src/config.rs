//! The gateway's configuration: built-in defaults, then the TOML file given with
//! `--config`, then environment variables (OpenFaaS's gateway names where one exists).
//!
//! Relative paths in the file (`state_dir`, `secrets_path`, a function's `workdir`, a
//! connector's `command` and `config`) are resolved against the directory of the config
//! file; without a file, against the current directory.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use faas_common::backoff::Backoff;
use faas_common::config::{ConfigErrors, EnvVar, Secret, duration, flag};
use faas_common::verdict::StatusClasses;
use serde::{Deserialize, Serialize};

use crate::types::{FunctionDeployment, StringMap};

/// Annotation choosing a function's runtime on the local provider: `process`, `http`, `url`.
pub const RUNTIME_ANNOTATION: &str = "faas-gateway.runtime";
/// Annotation giving a `url` function's address.
pub const URL_ANNOTATION: &str = "faas-gateway.url";
/// Annotation giving an `http` function's readiness path (default `/_/health`).
pub const HEALTH_PATH_ANNOTATION: &str = "faas-gateway.health-path";
/// Annotation giving the working directory of a `process` or `http` function.
pub const WORKDIR_ANNOTATION: &str = "faas-gateway.workdir";

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Listeners, auth, timeouts, state.
    pub gateway: GatewaySection,
    /// The local provider's runtimes and scaling.
    pub provider: ProviderSection,
    /// `/async-function/*`: queue, retries, callbacks.
    #[serde(rename = "async")]
    pub queue: AsyncSection,
    /// How crashed connectors are restarted.
    pub supervisor: SupervisorSection,
    /// Functions deployed at start (local provider only).
    pub functions: Vec<FunctionConfig>,
    /// Connector binaries run alongside the gateway.
    pub connectors: Vec<ConnectorConfig>,
    /// The console's view of connectors the gateway does not supervise.
    pub console: ConsoleSection,
}

/// `[console]`: the operator console (`/ui/`). The connectors the gateway supervises are
/// found by themselves (their backlog reports name their admin API); others are listed
/// here.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleSection {
    /// `[[console.connectors]]`: connectors elsewhere, by the URL of their admin API (their
    /// `metrics_addr`), asked with this gateway's credentials. (default: `[]`)
    pub connectors: Vec<ConsoleConnector>,
}

/// One `[[console.connectors]]` entry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleConnector {
    /// Its name in the console. (required)
    pub name: String,
    /// `http://host:port` of its admin API. (required)
    pub url: String,
}

/// `[gateway]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySection {
    /// Address of the OpenFaaS API. Loopback by default because the local provider runs
    /// commands that the deploy API names; set `0.0.0.0:8080` together with
    /// `basic_auth = true` to serve other machines. Env `gateway_bind`.
    /// (default: `"127.0.0.1:8080"`)
    pub bind: SocketAddr,
    /// Address of `/metrics` and `/healthz` (OpenFaaS serves metrics on 8082).
    /// Env `metrics_bind`. (default: `"127.0.0.1:8082"`)
    pub metrics_bind: SocketAddr,
    /// The namespace of names given without one. Env `function_namespace`.
    /// (default: `"openfaas-fn"`)
    pub function_namespace: String,
    /// Longest time for a function or provider to answer; then 502.
    /// Env `upstream_timeout`. (default: `"60s"`)
    #[serde(with = "duration")]
    pub upstream_timeout: Duration,
    /// Largest body of a synchronous invocation, in bytes; larger gets 413.
    /// Env `max_body_bytes`. (default: `67108864`, 64 MiB)
    pub max_body_bytes: usize,
    /// Basic auth on `/system/*`. Env `basic_auth`. (default: `false`)
    #[serde(with = "flag")]
    pub basic_auth: bool,
    /// Folder with the files `basic-auth-user` and `basic-auth-password`, read when
    /// `basic_auth` is on and `username`/`password` are not set.
    /// Env `secret_mount_path`. (default: `"/run/secrets"`)
    pub secret_mount_path: PathBuf,
    /// The user, instead of the file. (default: unset)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// The password, instead of the file; never logged. (default: unset)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    /// Where deployed functions are kept across restarts, with the PIDs of running
    /// replicas and connectors (stopped by the next start if a killed gateway left them).
    /// Env `state_dir`.
    /// (default: `"gateway-state"`)
    pub state_dir: PathBuf,
    /// A faas-provider (faas-netes, faasd-provider) to forward `/system/*` and function
    /// calls to, instead of the local provider. Env `functions_provider_url`.
    /// (default: unset, the local provider)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider_url: Option<String>,
    /// `text` or `json` logs; the level comes from `RUST_LOG` (default `info`).
    /// Env `log_format`. (default: `"text"`)
    pub log_format: String,
}

impl Default for GatewaySection {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            metrics_bind: SocketAddr::from(([127, 0, 0, 1], 8082)),
            function_namespace: "openfaas-fn".to_owned(),
            upstream_timeout: Duration::from_secs(60),
            max_body_bytes: 64 * 1024 * 1024,
            basic_auth: false,
            secret_mount_path: PathBuf::from("/run/secrets"),
            username: None,
            password: None,
            state_dir: PathBuf::from("gateway-state"),
            provider_url: None,
            log_format: "text".to_owned(),
        }
    }
}

/// `[provider]`: the local provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProviderSection {
    /// Folder where secrets are kept as files, one per secret, read by functions at
    /// `<secrets_path>/<name>` (OpenFaaS functions use `/var/openfaas/secrets`).
    /// (default: `"/var/openfaas/secrets"`)
    pub secrets_path: PathBuf,
    /// Longest wait for an `http` replica to pass its readiness check, also the longest a
    /// request waits when it scales a function from zero; then 504.
    /// (default: `"30s"`)
    #[serde(with = "duration")]
    pub ready_timeout: Duration,
    /// How often ready replicas are health-checked. (default: `"2s"`)
    #[serde(with = "duration")]
    pub health_interval: Duration,
    /// Idle time after which a function with `com.openfaas.scale.zero=true` or
    /// `com.openfaas.scale.min=0` is scaled to zero; the label
    /// `com.openfaas.scale.zero-duration` overrides it. (default: `"5m"`)
    #[serde(with = "duration")]
    pub scale_to_zero_after: Duration,
    /// How often the autoscaler compares in-flight requests to the target, in every
    /// runtime. (default: `"1s"`)
    #[serde(with = "duration")]
    pub autoscale_interval: Duration,
    /// How long the load must stay low before replicas are removed (adding is
    /// immediate). (default: `"30s"`)
    #[serde(with = "duration")]
    pub scale_down_after: Duration,
    /// Log lines kept per function for `/system/logs`. (default: `1000`)
    pub log_lines: usize,
}

impl Default for ProviderSection {
    fn default() -> Self {
        Self {
            secrets_path: PathBuf::from("/var/openfaas/secrets"),
            ready_timeout: Duration::from_secs(30),
            health_interval: Duration::from_secs(2),
            scale_to_zero_after: Duration::from_secs(300),
            autoscale_interval: Duration::from_secs(1),
            scale_down_after: Duration::from_secs(30),
            log_lines: 1000,
        }
    }
}

/// `[async]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AsyncSection {
    /// Largest body accepted by `/async-function/*`, in bytes; larger gets 413.
    /// Env `max_async_body_bytes`. (default: `1048576`, 1 MiB)
    pub max_body_bytes: usize,
    /// Queued invocations run at the same time. (default: `4`)
    pub concurrency: usize,
    /// Requests the embedded queue holds, from acceptance until they are finished (running
    /// and waiting to retry included); when full, enqueueing answers 503.
    /// (default: `10000`)
    pub queue_capacity: usize,
    /// Where the embedded queue keeps accepted requests: `disk` (a 202 means the request
    /// is on disk; after a restart or a crash, SIGKILL included, every request not yet
    /// finished runs again, with its attempt count) or `memory` (faster to accept, but
    /// queued requests are lost when the gateway stops). Not used with `nats_url`.
    /// Env `async_queue_store`. (default: `"disk"`)
    pub queue_store: QueueStore,
    /// The embedded queue's folder with `queue_store = "disk"` (redb databases, created
    /// when missing; one gateway at a time). Env `async_queue_path`.
    /// (default: unset, `async-queue` in `gateway.state_dir`)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_path: Option<PathBuf>,
    /// Attempts per request before it is dead-lettered (logged and counted; the callback
    /// receives the last status). (default: `5`)
    pub max_attempts: u32,
    /// Backoff between attempts, full jitter. (default: `{ initial = "500ms", max = "60s" }`)
    pub backoff: Backoff,
    /// Which function statuses mean delivered, retry or drop; anything else is a dead
    /// letter at once. (default: delivered `["2xx"]`, retry `["408", "409", "425", "429",
    /// "5xx"]`, drop `[]`)
    pub status: StatusClasses,
    /// Longest wait for a callback receiver. (default: `"10s"`)
    #[serde(with = "duration")]
    pub callback_timeout: Duration,
    /// NATS server for a JetStream queue instead of the embedded one: durable too, and
    /// shared by every gateway on the stream. Env `nats_url`. (default: unset)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_url: Option<String>,
    /// JetStream stream name (created when missing). (default: `"faas-gateway-async"`)
    pub nats_stream: String,
    /// Subject the stream stores. (default: `"faas-gateway.async"`)
    pub nats_subject: String,
    /// Durable consumer name shared by every gateway using the stream.
    /// (default: `"faas-gateway-worker"`)
    pub nats_consumer: String,
    /// How long JetStream waits for an acknowledgement before redelivering: the delay
    /// before a request that a crashed gateway was running runs again. Longer invocations
    /// are kept alive with in-progress acks every half of it. (default: `"30s"`)
    #[serde(with = "duration")]
    pub nats_ack_wait: Duration,
}

impl Default for AsyncSection {
    fn default() -> Self {
        Self {
            max_body_bytes: 1024 * 1024,
            concurrency: 4,
            queue_capacity: 10_000,
            queue_store: QueueStore::Disk,
            queue_path: None,
            max_attempts: 5,
            backoff: Backoff::default(),
            status: StatusClasses::default(),
            callback_timeout: Duration::from_secs(10),
            nats_url: None,
            nats_stream: "faas-gateway-async".to_owned(),
            nats_subject: "faas-gateway.async".to_owned(),
            nats_consumer: "faas-gateway-worker".to_owned(),
            nats_ack_wait: Duration::from_secs(30),
        }
    }
}

impl AsyncSection {
    /// The embedded queue's folder: `queue_path`, else `async-queue` in `state_dir`.
    pub fn queue_dir(&self, state_dir: &Path) -> PathBuf {
        self.queue_path
            .clone()
            .unwrap_or_else(|| state_dir.join("async-queue"))
    }
}

/// Where the embedded queue keeps accepted requests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueStore {
    /// In a file, synced before the 202: nothing accepted is lost in a crash.
    #[default]
    Disk,
    /// In memory: lost when the gateway stops.
    Memory,
}

/// `[supervisor]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SupervisorSection {
    /// Backoff between restarts of a connector that exited; reset once it has run for a
    /// minute. (default: `{ initial = "500ms", max = "60s" }`)
    pub backoff: Backoff,
    /// On shutdown, how long a connector has after SIGTERM before SIGKILL.
    /// (default: `"10s"`)
    #[serde(with = "duration")]
    pub stop_timeout: Duration,
}

impl Default for SupervisorSection {
    fn default() -> Self {
        Self {
            backoff: Backoff::default(),
            stop_timeout: Duration::from_secs(10),
        }
    }
}

/// Which runtime a `[[functions]]` entry uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeKind {
    /// One process per request: body on stdin, stdout is the response.
    #[default]
    Process,
    /// A long-running HTTP server given its port in `PORT`.
    Http,
    /// An existing HTTP service.
    Url,
}

impl RuntimeKind {
    /// The annotation value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Process => "process",
            Self::Http => "http",
            Self::Url => "url",
        }
    }
}

/// `[[functions]]`: a function deployed at start. It is the same as a deploy through the
/// API, and shows up in the API with the runtime annotations set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FunctionConfig {
    /// The function's name (a DNS label). (required)
    pub name: String,
    /// `process`, `http` or `url`. (default: `"process"`)
    pub runtime: RuntimeKind,
    /// The command (`fprocess`), split on spaces, no shell. Required for `process` and
    /// `http`. (default: unset)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// The service's base URL, for `url`. (default: unset)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Working directory of the command. (default: the config file's directory)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workdir: Option<PathBuf>,
    /// Readiness path of an `http` function. (default: `"/_/health"`)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_path: Option<String>,
    /// Recorded as the function's image. (default: `"local/<name>"`)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Environment variables (`exec_timeout`, `max_inflight`, `content_type` are read as
    /// the watchdog reads them). (default: `{}`)
    pub env: StringMap,
    /// Labels (`com.openfaas.scale.min`, `max`, `target`, `zero`, `zero-duration`).
    /// (default: `{}`)
    pub labels: StringMap,
    /// Annotations (`topic`, `schedule`). (default: `{}`)
    pub annotations: StringMap,
    /// Secrets the function reads. (default: `[]`)
    pub secrets: Vec<String>,
}

impl FunctionConfig {
    /// The deployment this entry stands for; relative `workdir`s are resolved against `base`.
    pub fn to_deployment(&self, base: &Path) -> FunctionDeployment {
        let mut annotations = self.annotations.clone();
        annotations.insert(
            RUNTIME_ANNOTATION.to_owned(),
            self.runtime.as_str().to_owned(),
        );
        if let Some(url) = &self.url {
            annotations.insert(URL_ANNOTATION.to_owned(), url.clone());
        }
        if let Some(path) = &self.health_path {
            annotations.insert(HEALTH_PATH_ANNOTATION.to_owned(), path.clone());
        }
        if self.runtime != RuntimeKind::Url {
            let workdir = match &self.workdir {
                Some(dir) => base.join(dir),
                None => base.to_path_buf(),
            };
            annotations.insert(
                WORKDIR_ANNOTATION.to_owned(),
                workdir.to_string_lossy().into_owned(),
            );
        }
        let non_empty = |m: &StringMap| (!m.is_empty()).then(|| m.clone());
        FunctionDeployment {
            service: self.name.clone(),
            image: self
                .image
                .clone()
                .unwrap_or_else(|| format!("local/{}", self.name)),
            namespace: None,
            env_process: self.command.clone(),
            env_vars: non_empty(&self.env),
            constraints: None,
            secrets: (!self.secrets.is_empty()).then(|| self.secrets.clone()),
            labels: non_empty(&self.labels),
            annotations: Some(annotations),
            limits: None,
            requests: None,
            read_only_root_filesystem: None,
        }
    }
}

/// `[[connectors]]`: a connector binary run as a supervised child process.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectorConfig {
    /// Name used as the log prefix. (required)
    pub name: String,
    /// The program: a path (relative to the config file's directory when it contains a
    /// `/`) or a name looked up in `PATH`. (required)
    pub command: String,
    /// Arguments. (default: `[]`)
    pub args: Vec<String>,
    /// A config file passed as `--config FILE`. (default: unset)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<PathBuf>,
    /// Extra environment variables. Every connector gets `gateway_url` (this gateway)
    /// and, with `basic_auth` on, `basic_auth=true` and the gateway's credentials;
    /// these override them. The rest of the gateway's environment is passed on, except
    /// the gateway's own variables ([`GATEWAY_ENV`]: in a connector they name other
    /// settings). (default: `{}`)
    pub env: BTreeMap<String, String>,
}

/// The environment variables the gateway reads, with OpenFaaS's names where it has one.
pub const GATEWAY_ENV: &[EnvVar] = &[
    EnvVar::new("gateway_bind", "gateway.bind"),
    EnvVar::new("metrics_bind", "gateway.metrics_bind"),
    EnvVar::new("function_namespace", "gateway.function_namespace"),
    EnvVar::new("upstream_timeout", "gateway.upstream_timeout"),
    EnvVar::new("max_body_bytes", "gateway.max_body_bytes"),
    EnvVar::new("basic_auth", "gateway.basic_auth"),
    EnvVar::new("secret_mount_path", "gateway.secret_mount_path"),
    EnvVar::new("state_dir", "gateway.state_dir"),
    EnvVar::new("functions_provider_url", "gateway.provider_url"),
    EnvVar::new("log_format", "gateway.log_format"),
    EnvVar::new("max_async_body_bytes", "async.max_body_bytes"),
    EnvVar::new("async_queue_store", "async.queue_store"),
    EnvVar::new("async_queue_path", "async.queue_path"),
    EnvVar::new("nats_url", "async.nats_url"),
];

impl Config {
    /// Loads defaults, `file`, then the environment; relative paths are resolved and the
    /// result is checked.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigErrors> {
        let mut config: Self = faas_common::config::load(file, GATEWAY_ENV)?;
        let base = file
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let base = if base.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            base
        };
        config.resolve_paths(&base);
        config.validate()?;
        Ok(config)
    }

    /// Makes relative paths relative to `base` (the config file's directory).
    pub fn resolve_paths(&mut self, base: &Path) {
        let abs = |p: &Path| -> PathBuf {
            let joined = if p.is_relative() {
                base.join(p)
            } else {
                p.to_path_buf()
            };
            std::path::absolute(&joined).unwrap_or(joined)
        };
        self.gateway.state_dir = abs(&self.gateway.state_dir);
        self.gateway.secret_mount_path = abs(&self.gateway.secret_mount_path);
        self.provider.secrets_path = abs(&self.provider.secrets_path);
        if let Some(path) = &self.queue.queue_path {
            self.queue.queue_path = Some(abs(path));
        }
        let base_abs = abs(Path::new("."));
        for f in &mut self.functions {
            let dir = match &f.workdir {
                Some(dir) => abs(dir),
                None => base_abs.clone(),
            };
            f.workdir = Some(dir);
        }
        for c in &mut self.connectors {
            if c.command.contains('/') {
                c.command = abs(Path::new(&c.command)).to_string_lossy().into_owned();
            }
            if let Some(cfg) = &c.config {
                c.config = Some(abs(cfg));
            }
        }
    }

    /// Cross-field checks, each naming its key.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        let mut fail = |key: String, message: String| {
            errors.extend(ConfigErrors::single(&key, message).0);
        };
        if self.gateway.upstream_timeout.is_zero() {
            fail(
                "gateway.upstream_timeout".into(),
                "must be above zero".into(),
            );
        }
        if self.gateway.username.is_some() != self.gateway.password.is_some() {
            fail(
                "gateway.username".into(),
                "username and password are set together or not at all".into(),
            );
        }
        if !matches!(self.gateway.log_format.as_str(), "text" | "json") {
            fail(
                "gateway.log_format".into(),
                format!(
                    "{:?} is neither \"text\" nor \"json\"",
                    self.gateway.log_format
                ),
            );
        }
        if let Some(url) = &self.gateway.provider_url {
            if reqwest::Url::parse(url).is_err() {
                fail(
                    "gateway.provider_url".into(),
                    format!("{url:?} is not a URL"),
                );
            }
            if !self.functions.is_empty() {
                fail(
                    "functions".into(),
                    "[[functions]] need the local provider; remove them or provider_url".into(),
                );
            }
        }
        let mut console_names = std::collections::BTreeSet::new();
        for c in &self.console.connectors {
            if c.name.trim().is_empty() || !console_names.insert(c.name.as_str()) {
                fail(
                    "console.connectors.name".into(),
                    format!("{:?}: every entry needs a name of its own", c.name),
                );
            }
            let url = reqwest::Url::parse(&c.url);
            if !url.is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host()) {
                fail(
                    "console.connectors.url".into(),
                    format!("{:?} is not an http(s) URL", c.url),
                );
            }
        }
        if self.queue.concurrency == 0 {
            fail("async.concurrency".into(), "must be at least 1".into());
        }
        if self.queue.max_attempts == 0 {
            fail("async.max_attempts".into(), "must be at least 1".into());
        }
        if self.queue.queue_capacity == 0 {
            fail("async.queue_capacity".into(), "must be at least 1".into());
        }
        if self.queue.nats_ack_wait < Duration::from_secs(1) {
            fail(
                "async.nats_ack_wait".into(),
                "must be at least 1s (in-progress acks are sent every half of it)".into(),
            );
        }
        if self.queue.backoff.initial > self.queue.backoff.max {
            fail(
                "async.backoff.initial".into(),
                "is longer than async.backoff.max".into(),
            );
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, f) in self.functions.iter().enumerate() {
            let key = format!("functions[{i}]");
            if let Err(e) = crate::names::check_service_name(&f.name) {
                fail(format!("{key}.name"), e.to_string());
            }
            if !seen.insert(f.name.clone()) {
                fail(
                    format!("{key}.name"),
                    format!("{:?} is listed twice", f.name),
                );
            }
            match f.runtime {
                RuntimeKind::Process | RuntimeKind::Http if f.command.is_none() => {
                    fail(
                        format!("{key}.command"),
                        format!("a `{}` function needs a command", f.runtime.as_str()),
                    );
                }
                RuntimeKind::Url => match &f.url {
                    Some(url) if reqwest::Url::parse(url).is_ok() => {}
                    Some(url) => fail(format!("{key}.url"), format!("{url:?} is not a URL")),
                    None => fail(format!("{key}.url"), "a `url` function needs a url".into()),
                },
                _ => {}
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, c) in self.connectors.iter().enumerate() {
            let key = format!("connectors[{i}]");
            if c.name.is_empty() {
                fail(format!("{key}.name"), "is required".into());
            }
            if !seen.insert(c.name.clone()) {
                fail(
                    format!("{key}.name"),
                    format!("{:?} is listed twice", c.name),
                );
            }
            if c.command.is_empty() {
                fail(format!("{key}.command"), "is required".into());
            }
        }
        ConfigErrors::check(errors)
    }
}

#[cfg(test)]
// figment::Jail's closures return figment's large error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn file_paths_resolve_against_the_file() {
        Jail::expect_with(|jail| {
            jail.create_dir("conf")?;
            jail.create_file(
                "conf/g.toml",
                r#"
                [gateway]
                state_dir = "state"
                upstream_timeout = "5s"

                [[functions]]
                name = "echo"
                command = "cat"

                [[connectors]]
                name = "cron"
                command = "./bin/cron-connector"
                config = "cron.toml"
                "#,
            )?;
            let c = Config::load(Some(Path::new("conf/g.toml"))).unwrap();
            let root = jail.directory().join("conf");
            assert_eq!(c.gateway.state_dir, root.join("state"));
            assert_eq!(c.gateway.upstream_timeout, Duration::from_secs(5));
            assert_eq!(c.functions[0].workdir.as_deref(), Some(root.as_path()));
            assert_eq!(c.connectors[0].config, Some(root.join("cron.toml")));
            assert!(c.connectors[0].command.ends_with("conf/bin/cron-connector"));
            Ok(())
        });
    }

    #[test]
    fn bad_console_connectors_name_their_key() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "g.toml",
                "[[console.connectors]]\nname = \"kafka\"\nurl = \"kafka:8081\"\n\n[[console.connectors]]\nname = \"kafka\"\nurl = \"http://kafka:8081\"\n",
            )?;
            let errs = Config::load(Some(Path::new("g.toml"))).unwrap_err();
            let keys: Vec<&str> = errs.0.iter().map(|e| e.key.as_str()).collect();
            assert_eq!(
                keys,
                ["console.connectors.url", "console.connectors.name"],
                "{errs}"
            );
            jail.create_file(
                "ok.toml",
                "[[console.connectors]]\nname = \"kafka\"\nurl = \"http://kafka:8081\"\n",
            )?;
            let c = Config::load(Some(Path::new("ok.toml"))).unwrap();
            assert_eq!(c.console.connectors[0].url, "http://kafka:8081");
            Ok(())
        });
    }

    #[test]
    fn bad_function_entries_name_their_key() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "g.toml",
                "[[functions]]\nname = \"Bad_Name\"\nruntime = \"url\"\n",
            )?;
            let errs = Config::load(Some(Path::new("g.toml"))).unwrap_err();
            let keys: Vec<&str> = errs.0.iter().map(|e| e.key.as_str()).collect();
            assert_eq!(keys, ["functions[0].name", "functions[0].url"], "{errs}");
            jail.create_file("u.toml", "[gateway]\nbindd = \"x\"\n")?;
            let errs = Config::load(Some(Path::new("u.toml"))).unwrap_err();
            assert_eq!(errs.0[0].key, "gateway.bindd");
            assert_eq!(errs.0[0].line, Some(2));
            Ok(())
        });
    }

    #[test]
    fn shipped_config_files_load() {
        Jail::expect_with(|_| {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
            let full = Config::load(Some(&dir.join("gateway.toml"))).unwrap();
            let mut expected = Config::default();
            expected.resolve_paths(&dir);
            assert_eq!(full, expected, "gateway.toml documents the defaults");
            let quick = Config::load(Some(&dir.join("quickstart.toml"))).unwrap();
            let names: Vec<&str> = quick.functions.iter().map(|f| f.name.as_str()).collect();
            assert_eq!(names, ["hello", "echo"]);
            Ok(())
        });
    }

    #[test]
    fn the_queue_store_is_on_disk_unless_memory_is_chosen() {
        Jail::expect_with(|jail| {
            let c = Config::load(None).unwrap();
            assert_eq!(c.queue.queue_store, QueueStore::Disk);
            assert_eq!(
                c.queue.queue_dir(&c.gateway.state_dir),
                c.gateway.state_dir.join("async-queue")
            );
            jail.create_dir("conf")?;
            jail.create_file(
                "conf/g.toml",
                "[async]\nqueue_store = \"memory\"\nqueue_path = \"q\"\n",
            )?;
            let c = Config::load(Some(Path::new("conf/g.toml"))).unwrap();
            assert_eq!(c.queue.queue_store, QueueStore::Memory);
            assert_eq!(c.queue.queue_path, Some(jail.directory().join("conf/q")));
            jail.set_env("async_queue_store", "disk");
            jail.set_env("async_queue_path", "/var/q");
            let c = Config::load(Some(Path::new("conf/g.toml"))).unwrap();
            assert_eq!(c.queue.queue_store, QueueStore::Disk);
            assert_eq!(c.queue.queue_path, Some(PathBuf::from("/var/q")));
            Ok(())
        });
    }

    #[test]
    fn a_bad_queue_store_names_its_key_and_origin() {
        Jail::expect_with(|jail| {
            jail.create_file("g.toml", "[async]\nqueue_store = \"disc\"\n")?;
            let errs = Config::load(Some(Path::new("g.toml"))).unwrap_err();
            assert_eq!(errs.0[0].key, "async.queue_store", "{errs}");
            assert_eq!(errs.0[0].line, Some(2), "{errs}");
            assert!(errs.to_string().contains("g.toml"), "{errs}");
            jail.set_env("async_queue_store", "ram");
            let errs = Config::load(None).unwrap_err();
            assert!(errs.to_string().contains("async_queue_store"), "{errs}");
            Ok(())
        });
    }

    #[test]
    fn env_uses_openfaas_names() {
        Jail::expect_with(|jail| {
            jail.set_env("functions_provider_url", "http://provider:8081");
            jail.set_env("basic_auth", "1");
            jail.set_env("upstream_timeout", "65s");
            let c = Config::load(None).unwrap();
            assert_eq!(
                c.gateway.provider_url.as_deref(),
                Some("http://provider:8081")
            );
            assert!(c.gateway.basic_auth);
            assert_eq!(c.gateway.upstream_timeout, Duration::from_secs(65));
            Ok(())
        });
    }
}
