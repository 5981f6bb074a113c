//! The local provider: runs functions on this machine, no containers. Functions come from
//! `[[functions]]` in the config and from the deploy API, and are kept in the state
//! directory. It serves one namespace, the default one, as faasd CE does.

pub mod http;
pub mod logs;
pub mod process;
pub mod scaling;
pub mod spec;
pub mod store;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use axum::body::Body;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use self::http::{HttpRuntime, HttpSettings};
use self::logs::LogBook;
use self::process::ProcessRuntime;
use self::scaling::{Scaler, Workers};
use self::spec::FunctionSpec;
use self::store::{Store, StoredFunction};
use super::{
    Deadline, Invocation, LogRequest, LogStream, Provider, Upstream, UpstreamClient, forward,
};
use crate::config::{ProviderSection, RuntimeKind};
use crate::error::Error;
use crate::names::{FunctionRef, check_secret_name, check_service_name};
use crate::types::{FunctionDeployment, FunctionStatus, ProviderInfo, Secret, VersionInfo};

/// What the local provider needs from the configuration.
#[derive(Debug, Clone)]
pub struct LocalSettings {
    /// The one namespace served.
    pub namespace: String,
    /// The gateway's `upstream_timeout`.
    pub upstream_timeout: Duration,
    /// Where functions are kept.
    pub state_dir: PathBuf,
    /// `[provider]`.
    pub provider: ProviderSection,
    /// Where long-running children are recorded.
    pub children: crate::orphans::Children,
}

/// Runs functions as local processes.
#[derive(Debug)]
pub struct LocalProvider {
    settings: LocalSettings,
    functions: RwLock<BTreeMap<String, Arc<Deployed>>>,
    /// Deploys, updates and deletes run one at a time, so the state file is always written
    /// from the latest list.
    mutate: tokio::sync::Mutex<()>,
    store: Store,
    client: UpstreamClient,
    cancel: CancellationToken,
}

#[derive(Debug)]
struct Deployed {
    deployment: FunctionDeployment,
    created_at: String,
    spec: Arc<FunctionSpec>,
    logs: Arc<LogBook>,
    runtime: Runtime,
}

/// A function's runtime. Every one scales on the same policy ([`scaling::Scaler`]); what a
/// replica is differs: a server process (`http`), a watchdog worker admitting
/// `max_inflight` requests at once (`process`), or a lane of `max_inflight` concurrent
/// requests to the backend (`url`: the service's own instances are not ours to count,
/// so a replica is the gateway's share of its concurrency).
#[derive(Debug)]
enum Runtime {
    Process {
        runtime: ProcessRuntime,
        workers: Workers,
    },
    Http(HttpRuntime),
    Url {
        upstream: Upstream,
        workers: Workers,
    },
}

impl Deployed {
    fn replicas(&self) -> (u64, u64) {
        match &self.runtime {
            Runtime::Process { workers, .. } | Runtime::Url { workers, .. } => {
                (workers.replicas(), workers.available())
            }
            Runtime::Http(rt) => (rt.replicas(), rt.available()),
        }
    }

    async fn stop(&self) {
        match &self.runtime {
            Runtime::Http(rt) => rt.stop().await,
            // Their scaling loops end; requests in flight finish on their own.
            Runtime::Process { workers, .. } | Runtime::Url { workers, .. } => workers.stop(),
        }
    }

    fn stored(&self, namespace: &str) -> StoredFunction {
        StoredFunction {
            namespace: namespace.to_owned(),
            created_at: self.created_at.clone(),
            deployment: self.deployment.clone(),
        }
    }
}

impl LocalProvider {
    /// Opens the state directory, starts the functions saved there and then those of
    /// `configured` (which replace saved ones of the same name), and saves the result.
    pub async fn start(
        settings: LocalSettings,
        configured: Vec<FunctionDeployment>,
        client: UpstreamClient,
        cancel: CancellationToken,
    ) -> Result<Self, Error> {
        let store = Store::open(&settings.state_dir)?;
        // Not fatal: the default folder (/var/openfaas/secrets) needs root to create, and a
        // gateway without secrets works; creating one then answers 500 with the reason.
        if let Err(e) = std::fs::create_dir_all(&settings.provider.secrets_path) {
            tracing::warn!(
                path = %settings.provider.secrets_path.display(),
                error = %e,
                "cannot create the secrets folder; set [provider] secrets_path"
            );
        }
        let saved = store.load()?;
        let provider = Self {
            settings,
            functions: RwLock::new(BTreeMap::new()),
            mutate: tokio::sync::Mutex::new(()),
            store,
            client,
            cancel,
        };
        for stored in saved {
            let name = stored.deployment.service.clone();
            if stored.namespace != provider.settings.namespace {
                tracing::warn!(function = %name, namespace = %stored.namespace, "saved function is in another namespace; skipped");
                continue;
            }
            match provider.build(
                stored.deployment,
                stored.created_at,
                None,
                SecretCheck::Restoring,
            ) {
                Ok(deployed) => {
                    provider.insert(deployed);
                }
                Err(e) => {
                    tracing::error!(function = %name, error = %e, "saved function cannot run; skipped");
                }
            }
        }
        for deployment in configured {
            let name = deployment.service.clone();
            let previous = provider.get(&name);
            let created_at = previous
                .as_ref()
                .map_or_else(now_rfc3339, |p| p.created_at.clone());
            let logs = previous.as_ref().map(|p| Arc::clone(&p.logs));
            let deployed = provider
                .build(deployment, created_at, logs, SecretCheck::Required)
                .map_err(|e| Error::Config(format!("[[functions]] {name}: {e}")))?;
            if let Some(previous) = provider.insert(deployed) {
                previous.stop().await;
            }
        }
        provider.save().await?;
        Ok(provider)
    }

    fn get(&self, name: &str) -> Option<Arc<Deployed>> {
        self.functions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
    }

    fn insert(&self, deployed: Deployed) -> Option<Arc<Deployed>> {
        self.functions
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(deployed.deployment.service.clone(), Arc::new(deployed))
    }

    fn lookup(&self, function: &FunctionRef) -> Option<Arc<Deployed>> {
        if function.namespace != self.settings.namespace {
            return None;
        }
        self.get(&function.name)
    }

    fn check_namespace(&self, namespace: &str) -> Result<(), Error> {
        if namespace == self.settings.namespace {
            Ok(())
        } else {
            Err(Error::BadRequest(format!(
                "namespace {namespace:?} is not served: the local provider has one namespace, {:?}",
                self.settings.namespace
            )))
        }
    }

    /// Checks `deployment` and starts its runtime.
    fn build(
        &self,
        deployment: FunctionDeployment,
        created_at: String,
        logs: Option<Arc<LogBook>>,
        secrets: SecretCheck,
    ) -> Result<Deployed, Error> {
        check_service_name(&deployment.service)?;
        let function = FunctionRef {
            name: deployment.service.clone(),
            namespace: self.settings.namespace.clone(),
        };
        let spec = Arc::new(FunctionSpec::from_deployment(
            function.clone(),
            &deployment,
            self.settings.provider.scale_to_zero_after,
        )?);
        for secret in deployment.secrets.iter().flatten() {
            check_secret_name(secret)?;
            if secrets == SecretCheck::Required
                && !self.settings.provider.secrets_path.join(secret).is_file()
            {
                return Err(Error::BadRequest(format!(
                    "unable to find secret: {secret}"
                )));
            }
        }
        let logs = logs.unwrap_or_else(|| LogBook::new(function, self.settings.provider.log_lines));
        let workers = || {
            let mut scaling = spec.scaling;
            // A worker never holds more than `max_inflight`: a target above it would never
            // be reached, so the function would never scale.
            if let Some(slots) = spec.max_inflight {
                scaling.target = scaling.target.min(u64::try_from(slots).unwrap_or(u64::MAX));
            }
            Workers::start(
                Arc::new(Scaler::new(
                    scaling,
                    self.settings.provider.scale_down_after,
                    Arc::clone(&logs),
                )),
                spec.max_inflight,
                self.settings.provider.autoscale_interval,
                self.cancel.child_token(),
            )
        };
        let runtime = match spec.runtime {
            RuntimeKind::Process => Runtime::Process {
                runtime: ProcessRuntime::new(
                    Arc::clone(&spec),
                    Arc::clone(&logs),
                    self.settings.upstream_timeout,
                ),
                workers: workers(),
            },
            RuntimeKind::Http => Runtime::Http(HttpRuntime::start(
                Arc::clone(&spec),
                Arc::clone(&logs),
                self.client.clone(),
                HttpSettings {
                    ready_timeout: self.settings.provider.ready_timeout,
                    health_interval: self.settings.provider.health_interval,
                    autoscale_interval: self.settings.provider.autoscale_interval,
                    scale_down_after: self.settings.provider.scale_down_after,
                    upstream_timeout: self.settings.upstream_timeout,
                    children: self.settings.children.clone(),
                },
                self.cancel.child_token(),
            )),
            RuntimeKind::Url => Runtime::Url {
                upstream: Upstream::parse(spec.url.as_deref().unwrap_or_default())?,
                workers: workers(),
            },
        };
        Ok(Deployed {
            deployment,
            created_at,
            spec,
            logs,
            runtime,
        })
    }

    async fn save(&self) -> Result<(), Error> {
        let list: Vec<StoredFunction> = self
            .functions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(|d| d.stored(&self.settings.namespace))
            .collect();
        self.store.save(list).await
    }

    fn status_of(&self, deployed: &Deployed) -> FunctionStatus {
        let mut status = deployed
            .deployment
            .to_status(&self.settings.namespace, &deployed.created_at);
        let (replicas, available) = deployed.replicas();
        status.replicas = replicas;
        status.available_replicas = available;
        if let Runtime::Http(rt) = &deployed.runtime {
            // Reported as faas-cli describe shows it; CPU is not measured.
            #[allow(clippy::cast_precision_loss)]
            let bytes = rt.memory_bytes() as f64;
            status.usage = Some(crate::types::FunctionUsage {
                cpu: None,
                total_memory_bytes: Some(bytes),
            });
        }
        status
    }

    fn secret_path(&self, name: &str) -> Result<PathBuf, Error> {
        check_secret_name(name)?;
        Ok(self.settings.provider.secrets_path.join(name))
    }

    async fn write_secret(&self, secret: Secret, must_exist: bool) -> Result<(), Error> {
        self.check_namespace(
            secret
                .namespace
                .as_deref()
                .unwrap_or(&self.settings.namespace),
        )?;
        let path = self.secret_path(&secret.name)?;
        let exists = path.is_file();
        if must_exist && !exists {
            return Err(Error::SecretNotFound(secret.name));
        }
        if !must_exist && exists {
            return Err(Error::Conflict(format!(
                "secret {} already exists",
                secret.name
            )));
        }
        let value = match (secret.value, secret.raw_value) {
            (Some(v), _) if !v.is_empty() => v.into_bytes(),
            (_, Some(raw)) => raw,
            (v, None) => v.unwrap_or_default().into_bytes(),
        };
        tokio::task::spawn_blocking(move || store::write_atomically(&path, &value))
            .await
            .map_err(|e| Error::Internal(e.to_string()))?
            .map_err(|e| Error::Internal(format!("cannot write the secret: {e}")))
    }
}

/// Whether a deployment's secrets must exist: yes for a deploy, no when restoring saved
/// functions, so a deleted secret never drops a function from the state file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SecretCheck {
    Required,
    Restoring,
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

#[async_trait]
impl Provider for LocalProvider {
    async fn list(&self, namespace: &str) -> Result<Vec<FunctionStatus>, Error> {
        if namespace != self.settings.namespace {
            return Ok(Vec::new());
        }
        let all: Vec<Arc<Deployed>> = self
            .functions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        Ok(all.iter().map(|d| self.status_of(d)).collect())
    }

    async fn status(&self, function: &FunctionRef) -> Result<FunctionStatus, Error> {
        let deployed = self
            .lookup(function)
            .ok_or_else(|| Error::SystemFunctionNotFound(function.qualified()))?;
        Ok(self.status_of(&deployed))
    }

    async fn deploy(&self, deployment: FunctionDeployment, namespace: &str) -> Result<(), Error> {
        self.check_namespace(namespace)?;
        let _one_at_a_time = self.mutate.lock().await;
        if self.get(&deployment.service).is_some() {
            return Err(Error::BadRequest(format!(
                "function {} already exists; update it with PUT",
                deployment.service
            )));
        }
        let deployed = self.build(deployment, now_rfc3339(), None, SecretCheck::Required)?;
        let name = deployed.deployment.service.clone();
        self.insert(deployed);
        if let Err(e) = self.save().await {
            let removed = self
                .functions
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&name);
            if let Some(d) = removed {
                d.stop().await;
            }
            return Err(e);
        }
        tracing::info!(function = %name, "deployed");
        Ok(())
    }

    async fn update(&self, deployment: FunctionDeployment, namespace: &str) -> Result<(), Error> {
        let function = FunctionRef {
            name: deployment.service.clone(),
            namespace: namespace.to_owned(),
        };
        let _one_at_a_time = self.mutate.lock().await;
        let previous = self
            .lookup(&function)
            .ok_or_else(|| Error::SystemFunctionNotFound(function.qualified()))?;
        let deployed = self.build(
            deployment,
            previous.created_at.clone(),
            Some(Arc::clone(&previous.logs)),
            SecretCheck::Required,
        )?;
        self.insert(deployed);
        previous.stop().await;
        self.save().await?;
        tracing::info!(function = %function, "updated");
        Ok(())
    }

    async fn delete(&self, function: &FunctionRef) -> Result<(), Error> {
        let _one_at_a_time = self.mutate.lock().await;
        if self.lookup(function).is_none() {
            return Err(Error::SystemFunctionNotFound(function.qualified()));
        }
        let removed = self
            .functions
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&function.name);
        self.save().await?;
        if let Some(d) = removed {
            d.stop().await;
        }
        tracing::info!(function = %function, "deleted");
        Ok(())
    }

    async fn scale(&self, function: &FunctionRef, replicas: u64) -> Result<(), Error> {
        let deployed = self
            .lookup(function)
            .ok_or_else(|| Error::SystemFunctionNotFound(format!("{function}")))?;
        match &deployed.runtime {
            Runtime::Process { workers, .. } | Runtime::Url { workers, .. } => {
                workers.scale(replicas);
            }
            Runtime::Http(rt) => rt.scale(replicas),
        }
        Ok(())
    }

    async fn set_backlog(&self, function: &FunctionRef, messages: u64) -> Result<(), Error> {
        let deployed = self
            .lookup(function)
            .ok_or_else(|| Error::SystemFunctionNotFound(format!("{function}")))?;
        match &deployed.runtime {
            Runtime::Process { workers, .. } | Runtime::Url { workers, .. } => {
                workers.set_backlog(messages);
            }
            Runtime::Http(rt) => rt.scaler().set_backlog(messages),
        }
        Ok(())
    }

    async fn namespaces(&self) -> Result<Vec<String>, Error> {
        Ok(vec![self.settings.namespace.clone()])
    }

    async fn info(&self) -> Result<ProviderInfo, Error> {
        Ok(ProviderInfo {
            provider: "faas-gateway-local".to_owned(),
            version: VersionInfo {
                commit_message: None,
                sha: option_env!("GIT_SHA").unwrap_or("unknown").to_owned(),
                release: env!("CARGO_PKG_VERSION").to_owned(),
            },
            orchestration: "process".to_owned(),
        })
    }

    async fn list_secrets(&self, namespace: &str) -> Result<Vec<Secret>, Error> {
        if namespace != self.settings.namespace {
            return Ok(Vec::new());
        }
        let dir = self.settings.provider.secrets_path.clone();
        let names = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<String>> {
            let mut names = Vec::new();
            let entries = match std::fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(names),
                Err(e) => return Err(e),
            };
            for entry in entries {
                let entry = entry?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if !name.starts_with('.') && entry.file_type()?.is_file() {
                    names.push(name);
                }
            }
            names.sort();
            Ok(names)
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))?
        .map_err(|e| Error::Internal(format!("cannot list secrets: {e}")))?;
        Ok(names
            .into_iter()
            .map(|name| Secret {
                name,
                namespace: Some(namespace.to_owned()),
                value: None,
                raw_value: None,
            })
            .collect())
    }

    async fn create_secret(&self, secret: Secret, _namespace: &str) -> Result<(), Error> {
        self.write_secret(secret, false).await
    }

    async fn update_secret(&self, secret: Secret, _namespace: &str) -> Result<(), Error> {
        self.write_secret(secret, true).await
    }

    async fn delete_secret(&self, name: &str, namespace: &str) -> Result<(), Error> {
        self.check_namespace(namespace)?;
        let path = self.secret_path(name)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(Error::SecretNotFound(name.to_owned()))
            }
            Err(e) => Err(Error::Internal(format!("cannot delete the secret: {e}"))),
        }
    }

    async fn logs(&self, request: LogRequest) -> Result<LogStream, Error> {
        let function = request
            .function
            .clone()
            .ok_or_else(|| Error::BadRequest("name is required".to_owned()))?;
        let deployed = self
            .lookup(&function)
            .ok_or_else(|| Error::SystemFunctionNotFound(function.qualified()))?;
        let cancel = self.cancel.clone();
        // A follower's stream ends with the gateway, so shutdown does not wait on it.
        Ok(deployed
            .logs
            .read(&request)
            .take_until(async move { cancel.cancelled().await })
            .boxed())
    }

    async fn invoke(
        &self,
        function: &FunctionRef,
        invocation: Invocation,
    ) -> Result<::http::Response<Body>, Error> {
        let deployed = self
            .lookup(function)
            .ok_or_else(|| Error::FunctionNotFound(function.qualified()))?;
        match &deployed.runtime {
            Runtime::Process { runtime, workers } => {
                let _slot = workers.acquire()?;
                runtime.invoke(invocation).await
            }
            Runtime::Http(rt) => rt.invoke(invocation).await,
            Runtime::Url { upstream, workers } => {
                let slot = workers.acquire()?;
                let deadline =
                    Deadline::new(self.settings.upstream_timeout, deployed.spec.exec_timeout);
                // The slot goes with the response body: the request holds it until streamed.
                forward(&self.client, upstream, None, invocation, deadline, slot).await
            }
        }
    }

    async fn health(&self) -> Result<(), Error> {
        Ok(())
    }

    async fn shutdown(&self) {
        self.cancel.cancel();
        let all: Vec<Arc<Deployed>> = self
            .functions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        futures::future::join_all(all.iter().map(|d| d.stop())).await;
    }
}
