//! `gateway`: the bundled OpenFaaS-compatible gateway.
//!
//! ```text
//! gateway --config config/gateway.toml
//! ```
//!
//! Serves the OpenFaaS API (default 127.0.0.1:8080) and metrics (127.0.0.1:8082) until
//! SIGTERM or ctrl-c, then stops connectors, drains requests and stops functions.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;

/// The bundled OpenFaaS-compatible gateway.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The TOML config file (relative paths in it are relative to its directory).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

/// mimalloc as the allocator: a proxied request allocates a few dozen small blocks (header
/// maps, URIs, body frames, futures), and glibc's allocator was about a tenth of the
/// gateway's CPU time in front of a no-op function (`perf record` during the proxy bench).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = match gateway::Config::load(args.config.as_deref()) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("{errors}");
            std::process::exit(2);
        }
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Logs go to stderr, with the connectors' prefixed lines.
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if config.gateway.log_format == "json" {
        logs.json().init();
    } else {
        logs.init();
    }
    // OpenTelemetry traces, when the `OTEL_*` variables configure an endpoint.
    if faas_common::otel::init("gateway").context("OpenTelemetry traces")? {
        tracing::info!("exporting traces over OTLP/HTTP");
    }
    let grace = config.gateway.upstream_timeout;
    let gateway = gateway::Gateway::start(config)
        .await
        .context("cannot start the gateway")?;
    tracing::info!(addr = %gateway.addr, metrics = %gateway.metrics_addr, "gateway listening");
    shutdown_signal().await;
    tracing::info!("shutting down");
    gateway.stop(grace.min(Duration::from_secs(30))).await;
    let _ = tokio::task::spawn_blocking(faas_common::otel::shutdown).await;
    Ok(())
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; ctrl-c only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
