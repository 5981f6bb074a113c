//! `POST /system/backlog`: connectors report how many messages wait for each function, and
//! the provider scales on the sum.
//!
//! A connector with `connector.report_backlog` on (the gateway turns it on for the
//! connectors it supervises) posts `{"source": "<id>", "functions": {"<name or
//! name.namespace>": <messages>}}` whenever a function's backlog turns zero or non-zero,
//! and at least every couple of seconds. Each report replaces that source's previous one;
//! a function's backlog is the sum over the sources, and a source not heard from for
//! [`BacklogReports::ttl`] no longer counts (a connector that stopped or lost its way
//! here must not keep a function scaled out). The provider gets every changed sum
//! ([`Provider::set_backlog`](crate::provider::Provider::set_backlog)): the local
//! provider wakes a function at zero as soon as a message waits for it and scales it out
//! on backlog per replica (see `provider::local::scaling`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::State;
use bytes::Bytes;
use http::StatusCode;
use serde::Deserialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::AppState;
use crate::error::Error;
use crate::names::FunctionRef;

/// How long a source's report counts without a newer one.
pub const REPORT_TTL: Duration = Duration::from_secs(10);

/// One connector's report.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BacklogReport {
    /// Who reports: the same string every time for one connector process.
    pub source: String,
    /// Messages waiting per function (`name` or `name.namespace`).
    pub functions: BTreeMap<String, u64>,
    /// The connector's name, for the console.
    #[serde(default)]
    pub connector: Option<String>,
    /// Its admin API (`http://127.0.0.1:port`), for the console; taken only on a loopback
    /// address (see [`Reporter`]).
    #[serde(default)]
    pub admin: Option<String>,
}

/// A connector that reports, as the console lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reporter {
    /// The report's `source`.
    pub source: String,
    /// The connector's name.
    pub connector: String,
    /// Its admin API: only ever a loopback `http://` address. A report is data from a
    /// client, and the console sends the gateway's credentials to what it names, so it
    /// may name only this machine (a connector the gateway supervises); a connector
    /// elsewhere is listed by URL in the gateway's config instead.
    pub admin: Option<String>,
}

/// `admin` when it is `http://<loopback ip>:<port>` and nothing more.
fn loopback_admin(admin: &str) -> Option<String> {
    let rest = admin.strip_prefix("http://")?;
    let addr: std::net::SocketAddr = rest.trim_end_matches('/').parse().ok()?;
    addr.ip().is_loopback().then(|| format!("http://{addr}"))
}

#[derive(Debug)]
struct Report {
    at: Instant,
    functions: BTreeMap<FunctionRef, u64>,
    connector: Option<String>,
    admin: Option<String>,
}

/// The latest report of every source.
#[derive(Debug)]
pub struct BacklogReports {
    ttl: Duration,
    sources: Mutex<HashMap<String, Report>>,
}

impl Default for BacklogReports {
    fn default() -> Self {
        Self::new(REPORT_TTL)
    }
}

impl BacklogReports {
    /// Reports count for `ttl` each.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            sources: Mutex::new(HashMap::new()),
        }
    }

    /// How long a report counts.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn sources(&self) -> std::sync::MutexGuard<'_, HashMap<String, Report>> {
        self.sources.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces `source`'s report; returns the new sum of every function it names now or
    /// named before.
    pub fn record(
        &self,
        source: &str,
        functions: BTreeMap<FunctionRef, u64>,
    ) -> BTreeMap<FunctionRef, u64> {
        self.record_from(source, functions, None, None)
    }

    /// [`record`](Self::record), with who reports: its name and admin API.
    pub fn record_from(
        &self,
        source: &str,
        functions: BTreeMap<FunctionRef, u64>,
        connector: Option<String>,
        admin: Option<&str>,
    ) -> BTreeMap<FunctionRef, u64> {
        let mut sources = self.sources();
        let mut touched: BTreeSet<FunctionRef> = functions.keys().cloned().collect();
        let report = Report {
            at: Instant::now(),
            functions,
            connector,
            admin: admin.and_then(loopback_admin),
        };
        if let Some(old) = sources.insert(source.to_owned(), report) {
            touched.extend(old.functions.into_keys());
        }
        sums(&sources, touched)
    }

    /// Forgets the reports older than the TTL; returns the new sum of every function they
    /// named.
    pub fn expire(&self) -> BTreeMap<FunctionRef, u64> {
        let mut sources = self.sources();
        let now = Instant::now();
        let mut touched = BTreeSet::new();
        sources.retain(|source, report| {
            let fresh = now.duration_since(report.at) < self.ttl;
            if !fresh {
                tracing::info!(source = %source, "backlog reports stopped: no longer counted");
                touched.extend(report.functions.keys().cloned());
            }
            fresh
        });
        sums(&sources, touched)
    }

    /// The sources reporting now, by source id.
    pub fn reporters(&self) -> Vec<Reporter> {
        let mut out: Vec<Reporter> = self
            .sources()
            .iter()
            .map(|(source, r)| Reporter {
                source: source.clone(),
                connector: r.connector.clone().unwrap_or_else(|| source.clone()),
                admin: r.admin.clone(),
            })
            .collect();
        out.sort_by(|a, b| a.source.cmp(&b.source));
        out
    }
}

fn sums(
    sources: &HashMap<String, Report>,
    functions: impl IntoIterator<Item = FunctionRef>,
) -> BTreeMap<FunctionRef, u64> {
    functions
        .into_iter()
        .map(|f| {
            let sum = sources
                .values()
                .filter_map(|r| r.functions.get(&f))
                .fold(0u64, |a, n| a.saturating_add(*n));
            (f, sum)
        })
        .collect()
}

/// Hands each sum to the provider; a function the provider does not know is skipped (a
/// connector may serve functions before they are deployed, or after they are removed).
async fn apply(state: &AppState, sums: BTreeMap<FunctionRef, u64>) {
    for (function, messages) in sums {
        if let Err(e) = state.provider.set_backlog(&function, messages).await {
            tracing::debug!(function = %function, messages, error = %e, "backlog not applied");
        }
    }
}

/// `POST /system/backlog`.
pub async fn report(State(state): State<Arc<AppState>>, body: Bytes) -> Result<StatusCode, Error> {
    let report: BacklogReport = serde_json::from_slice(&body)
        .map_err(|e| Error::BadRequest(format!("backlog report: {e}")))?;
    let mut functions = BTreeMap::new();
    for (name, messages) in report.functions {
        let function = FunctionRef::parse(&name, None, &state.namespace)?;
        functions.insert(function, messages);
    }
    let sums = state.backlogs.record_from(
        &report.source,
        functions,
        report.connector,
        report.admin.as_deref(),
    );
    apply(&state, sums).await;
    Ok(StatusCode::NO_CONTENT)
}

/// Forgets stale reports every half TTL until `cancel`, and gives the provider the sums
/// that changed.
pub async fn expire_loop(state: AppState, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(state.backlogs.ttl() / 2);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {
                let sums = state.backlogs.expire();
                apply(&state, sums).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(name: &str) -> FunctionRef {
        FunctionRef {
            name: name.into(),
            namespace: "openfaas-fn".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn sums_over_sources_and_forgets_the_silent() {
        let r = BacklogReports::new(Duration::from_secs(10));
        let sums = r.record("kafka", BTreeMap::from([(f("a"), 5), (f("b"), 1)]));
        assert_eq!(sums, BTreeMap::from([(f("a"), 5), (f("b"), 1)]));
        tokio::time::advance(Duration::from_secs(6)).await;
        let sums = r.record("redis", BTreeMap::from([(f("a"), 2)]));
        assert_eq!(sums, BTreeMap::from([(f("a"), 7)]));
        // kafka's next report no longer names b: b's sum is given, as 0.
        let sums = r.record("kafka", BTreeMap::from([(f("a"), 1)]));
        assert_eq!(sums, BTreeMap::from([(f("a"), 3), (f("b"), 0)]));
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(r.expire().is_empty(), "both reported within 10 s");
        tokio::time::advance(Duration::from_secs(5)).await;
        // redis last reported 11 s ago, kafka 11 s too: both go.
        assert_eq!(r.expire(), BTreeMap::from([(f("a"), 0)]));
        assert!(r.expire().is_empty(), "nothing left to forget");
    }

    #[test]
    fn only_a_loopback_admin_address_is_kept() {
        let r = BacklogReports::new(Duration::from_secs(10));
        let reported = |admin: &str| {
            r.record_from(
                "s",
                BTreeMap::new(),
                Some("redis-connector".into()),
                Some(admin),
            );
            r.reporters()[0].admin.clone()
        };
        assert_eq!(
            reported("http://127.0.0.1:8081"),
            Some("http://127.0.0.1:8081".into())
        );
        assert_eq!(
            reported("http://[::1]:8081/"),
            Some("http://[::1]:8081".into())
        );
        for elsewhere in [
            "http://10.0.0.5:8081",
            "http://evil.example:80",
            "https://127.0.0.1:8081",
            "http://127.0.0.1:8081/x",
            "http://user@127.0.0.1:8081",
            "file:///etc/passwd",
        ] {
            assert_eq!(reported(elsewhere), None, "{elsewhere}");
        }
        assert_eq!(r.reporters()[0].connector, "redis-connector");
    }
}
