//! `cron-connector`: invokes functions on the schedules in their annotations.
//!
//! A function is scheduled when its `topic` annotation includes `cron-function` (alone or
//! among other topics) and it has a `schedule` annotation ([`schedule`] lists the forms).
//! Schedules follow the topic map without a restart. Each tick invokes the function
//! through the SDK (retries, metrics) with `X-Topic: cron-function`,
//! `X-Connector: cron-connector`, `X-Cron-Schedule`, `X-Cron-Replica`, `ce-time` = the
//! scheduled time and `ce-id` = `<function>/<scheduled time>`.
//!
//! Modules: [`config`] (`[cron]`, `[lock]`), [`schedule`] (expressions to fire times),
//! [`scheduler`] (jobs, misfires, overlap), [`lock`] (tick leases in Redis for several
//! replicas), [`metrics`] (`connector_cron_*`).

pub mod config;
pub mod lock;
pub mod metrics;
pub mod schedule;
pub mod scheduler;

use std::sync::Arc;

use connector_sdk::Runtime;

use crate::config::{Config, OnLockUnavailable};
use crate::lock::Leases;
use crate::metrics::CronMetrics;
use crate::scheduler::{Firer, Scheduler};

/// The binary's name, sent as `X-Connector`.
pub const NAME: &str = "cron-connector";

/// Why the connector could not run.
#[derive(Debug, thiserror::Error)]
pub enum CronError {
    /// The lock's Redis URL is not a valid URL.
    #[error("lock.redis_url: {0}")]
    LockUrl(#[from] lock::LockError),
    /// The SDK's harness failed (metrics address taken, ...).
    #[error(transparent)]
    Sdk(#[from] connector_sdk::SdkError),
}

/// How many fire times `/admin/status` shows per function.
const NEXT_FIRES: usize = 3;

/// Runs the connector until SIGTERM or SIGINT (or `runtime`'s shutdown token).
pub async fn run(config: Config, mut runtime: Runtime) -> Result<(), CronError> {
    let metrics = CronMetrics::register(runtime.registry_mut());
    let replica = if config.lock.replica_id.is_empty() {
        default_replica_id()
    } else {
        config.lock.replica_id.clone()
    };
    let leases = match &config.lock.redis_url {
        Some(url) => Some(Leases::new(
            url.expose(),
            &config.lock.key_prefix,
            &replica,
            config.lock.lease,
            config.lock.retention,
        )?),
        None => None,
    };
    let zone = config.zone().unwrap_or(chrono_tz::Tz::UTC);
    // `/admin/status` (and the gateway's console) shows each function's next fire times.
    runtime = runtime.status_details(Arc::new(move |subscriber| {
        let expression = subscriber.annotations.get(scheduler::SCHEDULE_ANNOTATION)?;
        let next = match schedule::Schedule::parse(expression, zone) {
            Ok(schedule) => {
                let mut at = chrono::Utc::now();
                let mut times = Vec::new();
                while times.len() < NEXT_FIRES {
                    let Some(t) = schedule.next_after(at) else {
                        break;
                    };
                    times.push(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
                    at = t;
                }
                serde_json::json!(times)
            }
            Err(e) => serde_json::json!({ "error": e.to_string() }),
        };
        Some(serde_json::json!({ "schedule": expression, "next": next }))
    }));
    match &leases {
        Some(leases) => match leases.ping().await {
            Ok(()) => {
                tracing::info!(replica = %replica, "replicas coordinate through Redis tick leases")
            }
            Err(e) => match config.lock.on_unavailable {
                OnLockUnavailable::Skip => tracing::warn!(
                    replica = %replica, error = %e,
                    "Redis for tick leases is unreachable; ticks are skipped until it answers (lock.on_unavailable = \"skip\")"
                ),
                OnLockUnavailable::Fire => tracing::warn!(
                    replica = %replica, error = %e,
                    "Redis for tick leases is unreachable; firing without it until it answers (lock.on_unavailable = \"fire\")"
                ),
            },
        },
        None => tracing::info!(
            "no [lock] configured: single-replica mode (every replica would fire every tick)"
        ),
    }
    let cron = config.cron.clone();
    let takeover_window = config.lock.takeover_window;
    let on_lock_unavailable = config.lock.on_unavailable;
    runtime
        .run(|ctx| async move {
            let firer = Arc::new(Firer {
                dispatcher: ctx.dispatcher.clone(),
                leases,
                on_lock_unavailable,
                metrics,
                topic: cron.topic.clone(),
                replica,
                takeover_window,
                shutdown: ctx.shutdown.clone(),
                health: ctx.health.clone(),
            });
            Scheduler::new(cron, zone, firer).run(ctx).await;
            Ok::<(), std::convert::Infallible>(())
        })
        .await?;
    Ok(())
}

fn default_replica_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "cron".to_owned());
    format!("{host}-{}", std::process::id())
}
