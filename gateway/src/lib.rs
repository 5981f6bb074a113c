//! `gateway`: the bundled OpenFaaS-compatible gateway.
//!
//! | module | what it does |
//! | --- | --- |
//! | [`config`] | the TOML file and environment variables |
//! | [`api`] | `/system/*` routes, basic auth, `/healthz` |
//! | [`proxy`] | `/function/*`: call ids, forwarding headers, metrics |
//! | [`queue`] | `/async-function/*`: embedded (on disk by default, or in memory) or JetStream queue, retries, callbacks |
//! | [`provider`] | the [`provider::Provider`] trait; `local` (processes) and `external` (a faas-provider) |
//! | [`supervisor`] | `[[connectors]]` run as child processes |
//! | [`backlog`] | `/system/backlog`: connectors' backlog reports, summed per function for the provider |
//! | [`console`] | `/ui/api/*`: the connectors the console knows, and their admin APIs |
//! | [`metrics`] | OpenFaaS's metric names on the metrics port (with `/healthz`, `/readyz`) |
//! | [`error`] | the one error type, rendered as OpenFaaS's status codes and bodies |
//!
//! [`router`] builds the API so tests drive it without a socket; [`Gateway::start`] binds
//! the listeners and starts everything; [`Gateway::stop`] takes it down in order.

pub mod api;
pub mod backlog;
pub mod config;
pub mod console;
pub mod error;
pub mod metrics;
pub mod names;
pub mod orphans;
pub mod provider;
pub mod proxy;
pub mod queue;
pub mod supervisor;
pub mod trace;
pub mod types;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use crate::config::Config;
pub use crate::error::{ApiError, Error};

use crate::api::BasicAuth;
use crate::metrics::Metrics;
use crate::provider::Provider;
use crate::provider::external::ExternalProvider;
use crate::provider::local::{LocalProvider, LocalSettings};
use crate::queue::{EmbeddedQueue, NatsQueue, Queue, Worker};

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// Runs the functions.
    pub provider: Arc<dyn Provider>,
    /// The metric families.
    pub metrics: Arc<Metrics>,
    /// Where `/async-function/*` puts requests (`None`: async answers 501).
    pub queue: Option<Arc<dyn Queue>>,
    /// Credentials for `/system/*` (`None`: open).
    pub auth: Option<BasicAuth>,
    /// The default namespace.
    pub namespace: String,
    /// Largest synchronous body.
    pub max_body_bytes: usize,
    /// Largest asynchronous body.
    pub async_max_body_bytes: usize,
    /// Long-running children (replicas, connectors), recorded in the state directory.
    pub children: orphans::Children,
    /// Cancelled when the gateway starts to stop: `/readyz` turns 503 and followed log
    /// streams end, so they do not hold the shutdown.
    pub draining: CancellationToken,
    /// The connectors' latest backlog reports.
    pub backlogs: Arc<backlog::BacklogReports>,
    /// `[[console.connectors]]`.
    pub console: Arc<[config::ConsoleConnector]>,
    /// The console's client for connectors' admin APIs.
    pub console_client: reqwest::Client,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("namespace", &self.namespace)
            .field("auth", &self.auth.is_some())
            .finish_non_exhaustive()
    }
}

/// The OpenFaaS API on the main port. Handlers share the state behind one `Arc`, so a
/// request clones a pointer rather than every field.
pub fn router(state: AppState) -> Router {
    routes(Arc::new(state))
}

/// The main port's service: `/function/{name}[/...]` straight to [`proxy::function_route`],
/// everything else through the [`router`]. The invocation path is the hot one, and the
/// router's work on it (route matching, path parameters stored in the request, a boxed
/// handler future per layer) bought nothing: the handler reads the name from the raw path
/// itself. Both ways reach the same handler, so the answers are the same.
#[derive(Clone)]
pub struct App {
    state: Arc<AppState>,
    router: Router,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").field("state", &self.state).finish()
    }
}

/// [`App`] over `state`.
pub fn app(state: AppState) -> App {
    let state = Arc::new(state);
    App {
        router: routes(Arc::clone(&state)),
        state,
    }
}

impl tower::Service<axum::extract::Request> for App {
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = futures::future::BoxFuture<'static, Result<Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: axum::extract::Request) -> Self::Future {
        // Only a non-empty name goes the short way; `/function/` and other odd shapes get
        // the router's answers.
        let invocation = proxy::split_function_path(request.uri().path(), "/function/")
            .is_some_and(|(name, _)| !name.is_empty());
        if invocation {
            let state = Arc::clone(&self.state);
            Box::pin(async move { Ok(proxy::function_route(State(state), request).await) })
        } else {
            let call = tower::Service::call(&mut self.router, request);
            Box::pin(call)
        }
    }
}

fn routes(state: Arc<AppState>) -> Router {
    let system = Router::new()
        .route(
            "/system/functions",
            get(api::list_functions)
                .post(api::deploy_function)
                .put(api::update_function)
                .delete(api::delete_function),
        )
        .route("/system/function/{name}", get(api::function_status))
        .route("/system/scale-function/{name}", post(api::scale_function))
        .route("/system/namespaces", get(api::namespaces))
        .route("/system/info", get(api::info))
        .route(
            "/system/secrets",
            get(api::list_secrets)
                .post(api::create_secret)
                .put(api::update_secret)
                .delete(api::delete_secret),
        )
        .route("/system/logs", get(api::logs))
        .route("/system/backlog", post(backlog::report))
        .route("/ui", get(console::to_index))
        .route("/ui/", get(console::index))
        .route("/ui/console.js", get(console::script))
        .route("/ui/console.css", get(console::style))
        .route("/ui/api/connectors", get(console::connectors))
        .route(
            "/ui/api/connectors/{id}/dead-letters",
            get(console::dead_letters),
        )
        .route(
            "/ui/api/connectors/{id}/dead-letters/{operation}",
            post(console::operate),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            api::require_auth,
        ));
    Router::new()
        .merge(system)
        .route("/function/{name}", any(proxy::function_route))
        .route("/function/{name}/", any(proxy::function_route))
        .route("/function/{name}/{*path}", any(proxy::function_route))
        .route("/async-function/{name}", any(queue::async_route))
        .route("/async-function/{name}/", any(queue::async_route))
        .route("/async-function/{name}/{*path}", any(queue::async_route))
        .route("/healthz", get(api::healthz))
        .fallback(api::not_found)
        .with_state(state)
}

/// `/metrics` and `/healthz` on the metrics port.
pub fn metrics_router(state: AppState) -> Router {
    let state = Arc::new(state);
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "OK" }))
        .route("/readyz", get(readyz))
        .fallback(api::not_found)
        .with_state(state)
}

/// Serves `service` on `listener` until `stop`, with the client's address as
/// `ConnectInfo` (for `X-Forwarded-For`). `TCP_NODELAY` on every connection, as nginx
/// sets it on keep-alive ones: a streamed answer's chunks leave when written, not after
/// the client's delayed ACK.
async fn serve<S>(listener: tokio::net::TcpListener, service: S, stop: CancellationToken)
where
    S: tower::Service<
            axum::extract::Request,
            Response = Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    use axum::ServiceExt as _;
    use axum::serve::ListenerExt as _;
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    let service = service.into_make_service_with_connect_info::<SocketAddr>();
    if let Err(e) = axum::serve(listener, service)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
    {
        tracing::error!(error = %e, "server failed");
    }
}

/// 200 while serving, 503 once the gateway is stopping.
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.draining.is_cancelled() {
        (axum::http::StatusCode::SERVICE_UNAVAILABLE, "draining").into_response()
    } else {
        "OK".into_response()
    }
}

async fn metrics_handler(State(state): State<Arc<AppState>>) -> Response {
    // `gateway_service_count` is refreshed from the provider on each scrape, as OpenFaaS
    // resets it; a slow provider costs at most two seconds of staleness, not the scrape.
    let refresh = async {
        let mut counts = Vec::new();
        for ns in state.provider.namespaces().await.unwrap_or_default() {
            for f in state.provider.list(&ns).await.unwrap_or_default() {
                let ns = f.namespace.clone().unwrap_or_else(|| ns.clone());
                counts.push((format!("{}.{ns}", f.name), f.replicas));
            }
        }
        counts
    };
    if let Ok(counts) = tokio::time::timeout(Duration::from_secs(2), refresh).await {
        state.metrics.set_service_counts(&counts);
    }
    if let Some(held) = state.queue.as_ref().and_then(|q| q.held()) {
        state
            .metrics
            .async_queue_requests
            .set(i64::try_from(held).unwrap_or(i64::MAX));
    }
    match state.metrics.encode() {
        Ok(text) => {
            let mut response = text.into_response();
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            response
        }
        Err(_) => Error::Internal("cannot encode metrics".into()).into_response(),
    }
}

/// Reads the `/system/*` credentials: from the config, else from `secret_mount_path`.
pub fn load_auth(config: &config::GatewaySection) -> Result<Option<BasicAuth>, Error> {
    if !config.basic_auth {
        return Ok(None);
    }
    if let (Some(user), Some(password)) = (&config.username, &config.password) {
        return Ok(Some(BasicAuth {
            user: user.clone(),
            password: password.clone(),
        }));
    }
    let read = |file: &str| -> Result<String, Error> {
        let path = config.secret_mount_path.join(file);
        std::fs::read_to_string(&path)
            .map(|s| s.trim().to_owned())
            .map_err(|e| {
                Error::Config(format!(
                    "basic_auth is on but {} cannot be read: {e}",
                    path.display()
                ))
            })
    };
    Ok(Some(BasicAuth {
        user: read("basic-auth-user")?,
        password: faas_common::config::Secret::new(read("basic-auth-password")?),
    }))
}

/// Builds the provider, metrics and async queue: everything [`router`] needs. The queue's
/// worker runs on `work_tasks` until `work` is cancelled.
pub async fn build_state(
    config: &Config,
    work: &CancellationToken,
    work_tasks: &TaskTracker,
) -> Result<AppState, Error> {
    let client = provider::http_client()?;
    let invoker = provider::upstream_client(config.gateway.upstream_timeout)?;
    let auth = load_auth(&config.gateway)?;
    std::fs::create_dir_all(&config.gateway.state_dir).map_err(|source| Error::State {
        path: config.gateway.state_dir.display().to_string(),
        source,
    })?;
    let children = orphans::Children::in_dir(&config.gateway.state_dir);
    children.stop_leftovers();
    let provider: Arc<dyn Provider> = match &config.gateway.provider_url {
        Some(url) => Arc::new(ExternalProvider::new(
            url,
            client.clone(),
            invoker,
            auth.as_ref().map(|a| (a.user.clone(), a.password.clone())),
            config.gateway.upstream_timeout,
        )?),
        None => {
            let settings = LocalSettings {
                namespace: config.gateway.function_namespace.clone(),
                upstream_timeout: config.gateway.upstream_timeout,
                state_dir: config.gateway.state_dir.clone(),
                provider: config.provider.clone(),
                children: children.clone(),
            };
            let base = std::env::current_dir().unwrap_or_default();
            let configured = config
                .functions
                .iter()
                .map(|f| f.to_deployment(&base))
                .collect();
            Arc::new(
                LocalProvider::start(settings, configured, invoker, CancellationToken::new())
                    .await?,
            )
        }
    };
    let mut state = AppState {
        provider,
        metrics: Arc::new(Metrics::new()),
        queue: None,
        auth,
        namespace: config.gateway.function_namespace.clone(),
        max_body_bytes: config.gateway.max_body_bytes,
        async_max_body_bytes: config.queue.max_body_bytes,
        children,
        draining: CancellationToken::new(),
        backlogs: Arc::default(),
        console: config.console.connectors.clone().into(),
        console_client: reqwest::Client::new(),
    };
    let worker = Arc::new(Worker::new(state.clone(), &config.queue, client));
    let queue: Arc<dyn Queue> = match &config.queue.nats_url {
        Some(url) => Arc::new(
            NatsQueue::start(
                &config.queue,
                url,
                config.queue.nats_ack_wait,
                worker,
                work.clone(),
                work_tasks,
            )
            .await?,
        ),
        None => {
            let store = match config.queue.queue_store {
                config::QueueStore::Disk => Some(config.queue.queue_dir(&config.gateway.state_dir)),
                config::QueueStore::Memory => None,
            };
            Arc::new(
                EmbeddedQueue::start(
                    &config.queue,
                    store.as_deref(),
                    worker,
                    work.clone(),
                    work_tasks,
                )
                .await?,
            )
        }
    };
    state.queue = Some(queue);
    Ok(state)
}

/// A running gateway.
pub struct Gateway {
    /// Where the API listens.
    pub addr: SocketAddr,
    /// Where `/metrics` listens.
    pub metrics_addr: SocketAddr,
    /// The shared state (tests use it to reach the provider).
    pub state: AppState,
    connectors: CancellationToken,
    servers: CancellationToken,
    work: CancellationToken,
    connector_tasks: TaskTracker,
    server_tasks: TaskTracker,
    work_tasks: TaskTracker,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("addr", &self.addr)
            .field("metrics_addr", &self.metrics_addr)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// Builds the provider and queue, binds both listeners, serves, and then starts the
    /// connectors (they need a gateway that answers).
    pub async fn start(config: Config) -> Result<Self, Error> {
        let bind = |addr: SocketAddr| async move {
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| Error::Bind {
                    addr: addr.to_string(),
                    source,
                })
        };
        let api_listener = bind(config.gateway.bind).await?;
        let metrics_listener = bind(config.gateway.metrics_bind).await?;
        let addr = api_listener.local_addr().map_err(|source| Error::Bind {
            addr: config.gateway.bind.to_string(),
            source,
        })?;
        let metrics_addr = metrics_listener
            .local_addr()
            .map_err(|source| Error::Bind {
                addr: config.gateway.metrics_bind.to_string(),
                source,
            })?;
        // Listeners first: a port in use fails the start before any function is started.
        let work = CancellationToken::new();
        let work_tasks = TaskTracker::new();
        let state = build_state(&config, &work, &work_tasks).await?;
        let servers = CancellationToken::new();
        let server_tasks = TaskTracker::new();
        server_tasks.spawn(serve(api_listener, app(state.clone()), servers.clone()));
        server_tasks.spawn(backlog::expire_loop(state.clone(), servers.clone()));
        server_tasks.spawn(serve(
            metrics_listener,
            metrics_router(state.clone()),
            servers.clone(),
        ));

        let connectors = CancellationToken::new();
        let connector_tasks = TaskTracker::new();
        let local = if addr.ip().is_unspecified() {
            SocketAddr::from(([127, 0, 0, 1], addr.port()))
        } else {
            addr
        };
        supervisor::start(
            &state.children,
            &config.connectors,
            &config.supervisor,
            &supervisor::connector_env(&format!("http://{local}"), &config.gateway),
            &connectors,
            &connector_tasks,
        );
        Ok(Self {
            addr,
            metrics_addr,
            state,
            connectors,
            servers,
            work,
            connector_tasks,
            server_tasks,
            work_tasks,
        })
    }

    /// Stops in order: connectors (they invoke through the gateway), the listeners
    /// (in-flight requests finish, up to `grace`), the async worker, then the functions.
    pub async fn stop(self, grace: Duration) {
        self.state.draining.cancel();
        self.connectors.cancel();
        self.connector_tasks.close();
        self.connector_tasks.wait().await;
        self.servers.cancel();
        self.server_tasks.close();
        if tokio::time::timeout(grace, self.server_tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("requests still running after the grace period; stopping anyway");
        }
        self.work.cancel();
        self.work_tasks.close();
        let _ = tokio::time::timeout(grace, self.work_tasks.wait()).await;
        self.state.provider.shutdown().await;
    }
}
