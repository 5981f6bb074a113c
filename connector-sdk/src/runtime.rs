//! The run harness every connector binary uses.
//!
//! [`Runtime::new`] validates the configuration and builds everything without I/O.
//! [`Runtime::run`] then:
//!
//! 1. binds `metrics_addr` (`/metrics`, `/healthz`, `/readyz`, `/drain`), failing at
//!    once if it cannot;
//! 2. installs SIGTERM and SIGINT handlers that cancel the root shutdown token (as does
//!    `POST /drain` with the drain token, when one is configured, which answers once the
//!    drain below is over);
//! 3. starts the topic-map rebuild loop and waits for the first successful build (the
//!    gateway may be down at start: the loop retries, nothing exits);
//! 4. runs the source with a [`SourceContext`];
//! 5. on a signal: readiness turns 503, the dispatcher drains (no new attempts; waiting
//!    retries are released), the source stops pulling and acknowledges what completed.
//!    After `drain_timeout` running invocations are cancelled and released. Then the
//!    background tasks stop and `run` returns `Ok`: exit 0.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{LogFormat, SdkConfig};
use crate::dead_letter::DeadLetterSink;
use crate::dispatcher::{Dispatcher, Matcher};
use crate::error::SdkError;
use crate::gateway::GatewayClient;
use crate::metrics::Metrics;
use crate::response::{InvocationResult, Subscribers, print_responses};
use crate::server::{self, DrainToken, Health};
use crate::topic_map::{TopicMapHandle, rebuild_loop};

/// How long the source may take to acknowledge and return after in-flight invocations
/// were cancelled at the end of `drain_timeout`.
const AFTER_ABORT_GRACE: Duration = Duration::from_secs(5);

/// Everything a source needs while it runs.
#[derive(Clone, Debug)]
pub struct SourceContext {
    /// Hand messages here; await their completions; acknowledge per disposition.
    pub dispatcher: Dispatcher,
    /// The current topic map; `subscribe()` to follow its changes.
    pub topics: TopicMapHandle,
    /// Cancelled on SIGTERM/SIGINT: stop pulling, finish what is in flight, return.
    pub shutdown: CancellationToken,
    /// Tell readiness whether the source is connected.
    pub health: Health,
    /// Backlog and stalled-partition gauges.
    pub metrics: Metrics,
    /// The SDK configuration.
    pub config: Arc<SdkConfig>,
}

impl SourceContext {
    /// The topics to consume: the configured list, else every topic in the current map.
    pub fn wanted_topics(&self) -> Vec<String> {
        if self.config.topics.is_empty() {
            self.topics.current().topics().map(str::to_owned).collect()
        } else {
            self.config.topics.clone()
        }
    }

    /// Whether the topics follow the topic map (no explicit `topics` configured).
    pub fn topics_follow_map(&self) -> bool {
        self.config.topics.is_empty()
    }
}

/// A connector process: configuration, metrics, gateway, topic map, dispatcher.
pub struct Runtime {
    name: String,
    config: Arc<SdkConfig>,
    registry: Registry,
    metrics: Metrics,
    gateway: GatewayClient,
    topics: TopicMapHandle,
    health: Health,
    shutdown: CancellationToken,
    subscribers: Subscribers,
    dead_letters: Option<Arc<dyn DeadLetterSink>>,
    matcher: Option<Matcher>,
    broker_retries: bool,
    strict_lanes: bool,
    install_signals: bool,
    printer: Option<mpsc::Receiver<Arc<InvocationResult>>>,
    /// The credential of `/drain`; `None` turns it off.
    drain_token: Option<DrainToken>,
    /// Opens the dead-letter destination for the admin API.
    dead_letter_store: Option<crate::admin::StoreFactory>,
    /// Adds to each subscription in `/admin/status`.
    status_details: Option<crate::admin::StatusDetails>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").field("name", &self.name).finish()
    }
}

impl Runtime {
    /// Validates `config` and builds the connector named `name` (the binary's name, sent
    /// as `X-Connector`). Nothing connects yet.
    pub fn new(name: &str, config: SdkConfig) -> Result<Self, SdkError> {
        config.validate()?;
        // OpenTelemetry traces, when the `OTEL_*` variables configure an endpoint.
        if faas_common::otel::init(name)? {
            tracing::info!("exporting traces over OTLP/HTTP");
        }
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry, name);
        let gateway = GatewayClient::new(name, &config)?.with_metrics(metrics.clone());
        let drain_token = DrainToken::from_config(&config)?;
        let topics = TopicMapHandle::new();
        let health = Health::new(topics.clone(), metrics.clone());
        let mut subscribers = Subscribers::default();
        let printer = config.print_response.then(|| subscribers.subscribe(1024));
        Ok(Self {
            name: name.to_owned(),
            config: Arc::new(config),
            registry,
            metrics,
            gateway,
            topics,
            health,
            shutdown: CancellationToken::new(),
            subscribers,
            dead_letters: None,
            matcher: None,
            broker_retries: false,
            strict_lanes: false,
            install_signals: true,
            printer,
            drain_token,
            dead_letter_store: None,
            status_details: None,
        })
    }

    /// What `/admin/status` adds to each subscription, as its `details`.
    pub fn status_details(mut self, details: crate::admin::StatusDetails) -> Self {
        self.status_details = Some(details);
        self
    }

    /// How the admin API opens the connector's dead-letter destination (the `replay`
    /// subcommand's store), to list, replay and purge letters while the connector runs.
    pub fn dead_letter_store(mut self, factory: crate::admin::StoreFactory) -> Self {
        self.dead_letter_store = Some(factory);
        self
    }

    /// [`dead_letter_store`](Self::dead_letter_store) from the connector's configuration
    /// and the function its `replay` subcommand opens its store with.
    pub fn dead_letter_store_with<C, S, E, F, Fut>(self, config: C, open: F) -> Self
    where
        C: Send + Sync + 'static,
        F: Fn(Arc<C>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<S, E>> + Send + 'static,
        S: crate::replay::DeadLetterStore + 'static,
        S::Handle: 'static,
        E: std::fmt::Display,
    {
        let config = Arc::new(config);
        self.dead_letter_store(Arc::new(move || {
            let opened = open(config.clone());
            Box::pin(async move {
                opened
                    .await
                    .map(crate::admin::BoxedStore::new)
                    .map_err(crate::replay::StoreError::new)
            })
        }))
    }

    /// The registry, to add the connector's own metrics before `run`.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// The SDK metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The SDK configuration.
    pub fn config(&self) -> &SdkConfig {
        &self.config
    }

    /// The root shutdown token: cancelling it starts the same drain as SIGTERM.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Do not install signal handlers (for tests that run several connectors in one
    /// process and stop them through [`shutdown_token`](Self::shutdown_token)).
    pub fn without_signal_handlers(mut self) -> Self {
        self.install_signals = false;
        self
    }

    /// Every invocation result is also sent to the returned receiver, which holds
    /// `capacity` results; when it is full, results are dropped, never delivery.
    pub fn subscribe_responses(
        &mut self,
        capacity: usize,
    ) -> mpsc::Receiver<Arc<InvocationResult>> {
        self.subscribers.subscribe(capacity)
    }

    /// Dead letters go to `sink`.
    pub fn dead_letters(mut self, sink: Arc<dyn DeadLetterSink>) -> Self {
        self.dead_letters = Some(sink);
        self
    }

    /// Topics are matched with `matcher` instead of exactly.
    pub fn matcher(mut self, matcher: Matcher) -> Self {
        self.matcher = Some(matcher);
        self
    }

    /// Retries go through the broker (see
    /// [`DispatcherBuilder::broker_retries`](crate::dispatcher::DispatcherBuilder::broker_retries)):
    /// the source must handle [`Disposition::Retry`](crate::Disposition::Retry).
    pub fn broker_retries(mut self, on: bool) -> Self {
        self.broker_retries = on;
        self
    }

    /// A message that is not acknowledged releases the rest of its ordering lane (see
    /// [`DispatcherBuilder::strict_lanes`](crate::dispatcher::DispatcherBuilder::strict_lanes)).
    pub fn strict_lanes(mut self, on: bool) -> Self {
        self.strict_lanes = on;
        self
    }

    /// Runs the connector until SIGTERM/SIGINT (or the shutdown token), then drains.
    /// `source` consumes the event source through the [`SourceContext`]; it must stop
    /// pulling when `shutdown` is cancelled, await the completions it holds, acknowledge
    /// what they allow, and return.
    ///
    /// The source runs as a task of the runtime rather than inline: under
    /// `#[tokio::main]` the caller is the main thread, outside the worker pool, and every
    /// delivery it started there would go through the runtime's shared queue and wake a
    /// parked worker (and every completion would wake the main thread back).
    pub async fn run<F, Fut, E>(self, source: F) -> Result<(), SdkError>
    where
        F: FnOnce(SourceContext) -> Fut,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
    {
        let Runtime {
            name,
            config,
            registry,
            metrics,
            gateway,
            topics,
            health,
            shutdown,
            subscribers,
            dead_letters,
            matcher,
            broker_retries,
            strict_lanes,
            install_signals,
            printer,
            drain_token,
            dead_letter_store,
            status_details,
        } = self;
        let background = CancellationToken::new();
        let tasks = TaskTracker::new();

        if let Some(rx) = printer {
            // Detached: it ends when the last sender (the dispatcher) is gone.
            tokio::spawn(print_responses(rx, config.print_response_body));
        }
        let drained = CancellationToken::new();
        let drain = server::Drain {
            start: shutdown.clone(),
            done: drained.clone(),
            token: drain_token,
        };
        let credential = crate::gateway::BasicAuth::from_config(&config)?;
        let admin_on = credential.is_some();
        let admin = crate::admin::Admin {
            name: name.clone(),
            config: config.clone(),
            credential,
            health: health.clone(),
            metrics: metrics.clone(),
            topics: topics.clone(),
            store: dead_letter_store,
            details: status_details,
            busy: Arc::default(),
            rates: crate::admin::Rates::default(),
        };
        if admin_on {
            tasks.spawn(crate::admin::sample_rates(
                admin.rates.clone(),
                metrics.clone(),
                topics.clone(),
                background.clone(),
            ));
        }
        let router = server::router(Arc::new(registry), metrics.clone(), health.clone(), drain)
            .merge(crate::admin::router(admin));
        let (addr, serve) = server::bind(config.metrics_addr, router, background.clone()).await?;
        tasks.spawn(serve);
        if install_signals {
            tasks.spawn(wait_for_signal(shutdown.clone(), background.clone())?);
        }
        tracing::info!(
            connector = %name,
            gateway = %gateway.base_url(),
            metrics = %addr,
            "starting"
        );

        tasks.spawn(rebuild_loop(
            gateway.clone(),
            topics.clone(),
            config.topic_delimiter.clone(),
            config.rebuild_interval,
            metrics.clone(),
            background.clone(),
        ));

        let reporter = config.report_backlog.then(|| gateway.clone());
        let mut builder = Dispatcher::builder(gateway, topics.clone(), &config, metrics.clone())
            .subscribers(subscribers)
            .broker_retries(broker_retries)
            .strict_lanes(strict_lanes);
        if let Some(sink) = dead_letters {
            builder = builder.dead_letters(sink);
        }
        let backlog_matcher = matcher.clone();
        if let Some(m) = matcher {
            builder = builder.matcher(m);
        }
        let dispatcher = builder.build();
        // Reported broker backlogs are matched to functions as messages are (wildcards).
        match backlog_matcher {
            Some(m) => {
                let map = topics.clone();
                metrics.backlogs().set_view(
                    topics.clone(),
                    Arc::new(move |topic| m(&map.current(), topic)),
                );
            }
            None => metrics.backlogs().set_exact_view(topics.clone()),
        }
        if let Some(gateway) = reporter {
            let source = crate::backlog::ReportSource {
                id: format!(
                    "{name}-{}-{}",
                    std::process::id(),
                    &uuid::Uuid::new_v4().simple().to_string()[..8]
                ),
                connector: name.clone(),
                // Reachable from the gateway that supervises it, on the same machine.
                admin: admin_on.then(|| {
                    let mut at = addr;
                    if at.ip().is_unspecified() {
                        at.set_ip(if at.is_ipv4() {
                            std::net::Ipv4Addr::LOCALHOST.into()
                        } else {
                            std::net::Ipv6Addr::LOCALHOST.into()
                        });
                    }
                    format!("http://{at}")
                }),
            };
            tasks.spawn(crate::backlog::report_loop(
                metrics.backlogs().clone(),
                gateway,
                source,
                background.clone(),
            ));
        }
        if let Some(addr) = config.scaler_addr {
            let scaler = crate::scaler::Scaler::new(metrics.backlogs().clone(), background.clone());
            let (addr, serve) = crate::scaler::bind(addr, scaler, background.clone()).await?;
            tasks.spawn(serve);
            tracing::info!(scaler = %addr, "serving KEDA's external scaler");
        }

        let result = tokio::select! {
            () = topics.wait_ready() => {
                let ctx = SourceContext {
                    dispatcher: dispatcher.clone(),
                    topics,
                    shutdown: shutdown.clone(),
                    health: health.clone(),
                    metrics,
                    config: config.clone(),
                };
                let task = tokio::spawn(source(ctx));
                let stop = task.abort_handle();
                let source = async move {
                    match task.await {
                        Ok(result) => result.map_err(Into::into),
                        Err(e) => Err(format!("the source task failed: {e}").into()),
                    }
                };
                let result =
                    drive(source, &dispatcher, &health, &shutdown, config.drain_timeout).await;
                // `drive` gives up on a source that does not stop; make sure it is gone.
                stop.abort();
                result
            }
            () = shutdown.cancelled() => {
                tracing::info!("stopped before the topic map was ever built");
                Ok(())
            }
        };

        health.set_draining();
        dispatcher.drain();
        if tokio::time::timeout(config.drain_timeout, dispatcher.wait_idle())
            .await
            .is_err()
        {
            dispatcher.abort();
            dispatcher.wait_idle().await;
        }
        drop(dispatcher);
        // `/drain` answers now; the server's graceful shutdown below lets it finish.
        drained.cancel();
        background.cancel();
        tasks.close();
        tasks.wait().await;
        // The last spans (acknowledgements of the drain) go out before the exit.
        let _ = tokio::task::spawn_blocking(faas_common::otel::shutdown).await;
        match &result {
            Ok(()) => tracing::info!(connector = %name, "stopped"),
            Err(e) => tracing::error!(connector = %name, error = %e, "stopped with an error"),
        }
        result
    }
}

/// Runs the source; on shutdown, drains with the deadline described in the module docs.
async fn drive<Fut>(
    source: Fut,
    dispatcher: &Dispatcher,
    health: &Health,
    shutdown: &CancellationToken,
    drain_timeout: Duration,
) -> Result<(), SdkError>
where
    Fut: Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>>,
{
    let source = std::pin::pin!(source);
    let mut source = source;
    let finished = tokio::select! {
        r = &mut source => Some(r),
        () = shutdown.cancelled() => None,
    };
    let result = match finished {
        Some(r) => r,
        None => {
            tracing::info!(drain_timeout = ?drain_timeout, "shutting down: draining in-flight deliveries");
            health.set_draining();
            dispatcher.drain();
            match tokio::time::timeout(drain_timeout, &mut source).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::warn!(
                        "drain_timeout reached: cancelling running invocations; their messages are released"
                    );
                    dispatcher.abort();
                    match tokio::time::timeout(AFTER_ABORT_GRACE, &mut source).await {
                        Ok(r) => r,
                        Err(_) => {
                            tracing::error!(
                                "the source did not stop after the drain; exiting anyway"
                            );
                            Ok(())
                        }
                    }
                }
            }
        }
    };
    result.map_err(SdkError::Source)
}

/// Cancels `shutdown` on the first SIGTERM or SIGINT. Returns the waiting future so that
/// a failure to install the handlers is reported before anything runs.
fn wait_for_signal(
    shutdown: CancellationToken,
    stop: CancellationToken,
) -> Result<impl Future<Output = ()>, SdkError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(SdkError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(SdkError::Signals)?;
    Ok(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            () = stop.cancelled() => return,
        };
        tracing::info!(signal = name, "shutdown requested");
        shutdown.cancel();
    })
}

/// Starts `tracing` output: text or JSON lines on stderr, level from `RUST_LOG` (default
/// `info`). Does nothing if a subscriber is already installed.
pub fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours only on a terminal: not in files, pipes or a supervisor's log.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
