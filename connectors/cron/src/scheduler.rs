//! The scheduler: one job per scheduled function, one queue of next fire times.
//!
//! The loop sleeps until the earliest next tick, the next topic-map change, or shutdown.
//! At a tick it decides, per due job:
//!
//! - on time (no later than `misfire_threshold`): fire it;
//! - late (the process was down, stalled or starved): `skip` counts every tick up to now
//!   as a misfire and fires none; `fire_once` fires the most recent one and counts the
//!   rest;
//!
//! then queues the job's next tick. Firing runs in its own task, so a slow function never
//! delays other schedules: with `overlap = "forbid"` a tick is skipped while the previous
//! run is still going (on any replica, when a lock is configured). With a lock, a firing
//! first claims its tick (see [`crate::lock`]); a replica that loses the race watches the
//! tick and takes it over if the winner dies before finishing it. A tick that cannot be
//! claimed because the lock's Redis is unreachable is skipped, logged and counted
//! (`lock.on_unavailable = "skip"`, the default): with every replica unable to claim, firing
//! it would fire it once per replica. `lock.on_unavailable = "fire"` fires it unclaimed.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use connector_sdk::server::Health;
use connector_sdk::{
    DeliveryOutcome, Dispatcher, Disposition, FunctionRef, Message, SourceContext, TopicMap,
};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{CronConfig, Misfire, OnLockUnavailable, Overlap};
use crate::lock::{Claim, Leases, LockError};
use crate::metrics::{CronMetrics, Firing};
use crate::schedule::Schedule;

/// The annotation holding a function's schedule.
pub const SCHEDULE_ANNOTATION: &str = "schedule";
/// Per-function misfire policy: `skip` or `fire_once`.
pub const MISFIRE_ANNOTATION: &str = "cron.misfire";
/// Per-function overlap policy: `allow` or `forbid`.
pub const OVERLAP_ANNOTATION: &str = "cron.overlap";

/// Most missed ticks examined after a stall (the rest are counted as one batch).
const MISSED_TICKS_LIMIT: usize = 100_000;

/// What a function's annotations ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSpec {
    /// The schedule as annotated.
    pub expression: String,
    /// Misfire policy.
    pub misfire: Misfire,
    /// Overlap policy.
    pub overlap: Overlap,
}

/// The jobs the topic map asks for: every function subscribed to `topic`, with its
/// schedule and policies, or why they cannot be used.
pub fn wanted_jobs(
    map: &TopicMap,
    config: &CronConfig,
) -> Vec<(FunctionRef, Result<JobSpec, String>)> {
    map.subscribers()
        .iter()
        .filter(|s| s.topics.contains(&config.topic))
        .map(|s| {
            let spec = (|| {
                let expression = s
                    .annotations
                    .get(SCHEDULE_ANNOTATION)
                    .filter(|e| !e.trim().is_empty())
                    .ok_or_else(|| "no `schedule` annotation".to_owned())?
                    .clone();
                let misfire = match s.annotations.get(MISFIRE_ANNOTATION) {
                    Some(v) => v
                        .parse()
                        .map_err(|e| format!("annotation {MISFIRE_ANNOTATION}: {e}"))?,
                    None => config.misfire,
                };
                let overlap = match s.annotations.get(OVERLAP_ANNOTATION) {
                    Some(v) => v
                        .parse()
                        .map_err(|e| format!("annotation {OVERLAP_ANNOTATION}: {e}"))?,
                    None => config.overlap,
                };
                Ok(JobSpec {
                    expression,
                    misfire,
                    overlap,
                })
            })();
            (s.function.clone(), spec)
        })
        .collect()
}

/// Which ticks to fire and how many were missed, for a job whose tick `due` is handled
/// at `now`.
pub fn plan(
    schedule: &Schedule,
    misfire: Misfire,
    due: DateTime<Utc>,
    now: DateTime<Utc>,
    threshold: Duration,
) -> (Option<DateTime<Utc>>, u64) {
    let late = (now - due).to_std().unwrap_or_default();
    if late <= threshold {
        return (Some(due), 0);
    }
    let mut ticks = vec![due];
    ticks.extend(schedule.between(due, now, MISSED_TICKS_LIMIT));
    let count = ticks.len() as u64;
    match misfire {
        Misfire::Skip => (None, count),
        Misfire::FireOnce => (ticks.last().copied(), count - 1),
    }
}

struct Job {
    spec: JobSpec,
    schedule: Schedule,
    next: DateTime<Utc>,
    previous: Option<DateTime<Utc>>,
    running: Arc<AtomicUsize>,
}

/// Fires ticks: shared by the scheduler loop and the tasks it spawns.
pub struct Firer {
    /// Invokes functions with the SDK's retry rules.
    pub dispatcher: Dispatcher,
    /// Tick leases, when replicas coordinate.
    pub leases: Option<Leases>,
    /// What to do with a tick the leases cannot be asked about.
    pub on_lock_unavailable: OnLockUnavailable,
    /// `connector_cron_*`.
    pub metrics: CronMetrics,
    /// `X-Topic` of every firing.
    pub topic: String,
    /// This replica's name (`X-Cron-Replica`).
    pub replica: String,
    /// How long to watch a tick a peer claimed.
    pub takeover_window: Duration,
    /// Stop watching and firing.
    pub shutdown: CancellationToken,
    /// `/readyz`: not ready while the lease store is unreachable and ticks are skipped.
    pub health: Health,
}

/// One tick to fire.
struct Tick {
    function: FunctionRef,
    at: DateTime<Utc>,
    previous: Option<DateTime<Utc>>,
    expression: String,
    overlap: Overlap,
    running: Arc<AtomicUsize>,
}

impl Firer {
    /// Readiness follows the lease store: with `lock.on_unavailable = "skip"` a replica
    /// that cannot reach it fires nothing, so it is not ready until the store answers;
    /// with `"fire"` it fires anyway and stays ready.
    fn lease_store_answered(&self, answered: bool) {
        self.health
            .set_source_ready(answered || self.on_lock_unavailable == OnLockUnavailable::Fire);
    }

    /// Asks the lease store every `every` until shutdown, so that readiness follows it
    /// between ticks too (a schedule may tick once an hour).
    async fn watch_lease_store(self: Arc<Self>, every: Duration) {
        let Some(leases) = &self.leases else {
            return;
        };
        loop {
            let answered = leases.ping().await.is_ok();
            self.lease_store_answered(answered);
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = self.shutdown.cancelled() => return,
            }
        }
    }

    async fn fire(self: Arc<Self>, tick: Tick) {
        let name = tick.function.as_str().to_owned();
        // Whether this replica holds a claim on the tick, to renew and finish.
        let mut claimed = false;
        if let Some(leases) = &self.leases {
            if tick.overlap == Overlap::Forbid
                && let Some(previous) = tick.previous
                && matches!(leases.running(&name, previous).await, Ok(true))
            {
                self.metrics.firing(&tick.function, Firing::SkippedOverlap);
                tracing::info!(function = %tick.function, "previous run still going on a replica; tick skipped");
                return;
            }
            let claim = self.claim_or_watch(leases, &name, tick.at).await;
            self.lease_store_answered(claim.is_ok());
            match claim {
                Ok(true) => claimed = true,
                Ok(false) => return,
                Err(e) => {
                    self.metrics.lock_error();
                    match self.on_lock_unavailable {
                        OnLockUnavailable::Skip => {
                            self.metrics
                                .firing(&tick.function, Firing::SkippedLockUnavailable);
                            tracing::warn!(
                                function = %tick.function,
                                schedule = %tick.expression,
                                tick = %tick.at,
                                error = %e,
                                "tick lease store unreachable; tick skipped (lock.on_unavailable = \"skip\")"
                            );
                            return;
                        }
                        OnLockUnavailable::Fire => {
                            tracing::warn!(
                                function = %tick.function,
                                schedule = %tick.expression,
                                tick = %tick.at,
                                error = %e,
                                "tick lease store unreachable; firing without it (lock.on_unavailable = \"fire\": a peer may fire this tick too)"
                            );
                        }
                    }
                }
            }
        }
        tick.running.fetch_add(1, Ordering::SeqCst);
        let firing = self.invoke(&tick, claimed).await;
        tick.running.fetch_sub(1, Ordering::SeqCst);
        self.metrics.firing(&tick.function, firing);
        if let Some(leases) = self.leases.as_ref().filter(|_| claimed) {
            let done = match firing {
                Firing::Released => leases.release(&name, tick.at).await,
                _ => leases.finish(&name, tick.at).await,
            };
            if let Err(e) = done {
                self.metrics.lock_error();
                tracing::warn!(function = %tick.function, error = %e, "could not record the tick in the lease store");
            }
        }
    }

    /// `Ok(true)`: this replica claimed the tick and fires it; `Ok(false)`: a peer fires
    /// it (or fired it, or shutdown came first); `Err`: the first claim failed, the lease
    /// store is unreachable. Errors while watching a peer's claim are logged and the
    /// watch goes on: the peer holds the tick.
    async fn claim_or_watch(
        &self,
        leases: &Leases,
        name: &str,
        at: DateTime<Utc>,
    ) -> Result<bool, LockError> {
        let mut first = true;
        let deadline = at + chrono::Duration::from_std(self.takeover_window).unwrap_or_default();
        loop {
            match leases.claim(name, at).await {
                Ok(Claim::Won) => {
                    if !first {
                        tracing::warn!(function = name, tick = %at, "taking over a tick its claimant did not finish");
                    }
                    return Ok(true);
                }
                Ok(Claim::Done) => return Ok(false),
                Ok(Claim::Taken) => {}
                Err(e) if first => return Err(e),
                Err(e) => {
                    self.metrics.lock_error();
                    tracing::warn!(function = name, error = %e, "watching a claimed tick failed");
                }
            }
            if first {
                self.metrics
                    .firing(&FunctionRef::new(name, None), Firing::Peer);
                first = false;
            }
            if Utc::now() > deadline {
                return Ok(false);
            }
            let wait = (leases.lease() / 2).max(Duration::from_millis(100));
            tokio::select! {
                () = self.shutdown.cancelled() => return Ok(false),
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Invokes the function for `tick`, renewing this replica's claim meanwhile if it
    /// holds one.
    async fn invoke(&self, tick: &Tick, claimed: bool) -> Firing {
        let scheduled = humantime::format_rfc3339_millis(tick.at.into()).to_string();
        let mut message = Message::new(
            self.topic.clone(),
            bytes::Bytes::new(),
            format!("{}/{scheduled}", tick.function),
            "/cron-connector",
        )
        .with_time(tick.at.into())
        .with_subject(tick.function.as_str())
        .with_event_type("cron-connector.tick")
        .with_coordinate("function", &tick.function)
        .with_coordinate("scheduled_time", &scheduled);
        message.add_header("X-Cron-Schedule", &tick.expression);
        message.add_header("X-Cron-Replica", &self.replica);
        let lateness = (Utc::now() - tick.at).as_seconds_f64();
        self.metrics.lateness(lateness);
        let renewal = if claimed {
            self.renew_while_running(tick)
        } else {
            CancellationToken::new()
        };
        let completion = self
            .dispatcher
            .submit_to(message, Arc::new([tick.function.clone()]))
            .await;
        let outcome = match completion {
            Ok(completion) => completion.await,
            Err(_) => {
                renewal.cancel();
                return Firing::Released;
            }
        };
        renewal.cancel();
        match outcome.disposition() {
            Disposition::Release => Firing::Released,
            _ if outcome
                .deliveries
                .iter()
                .all(|d| d.outcome == DeliveryOutcome::Delivered) =>
            {
                Firing::Delivered
            }
            _ => {
                tracing::error!(function = %tick.function, tick = %scheduled, "firing failed after every attempt");
                Firing::Failed
            }
        }
    }

    /// Keeps this replica's claim alive until the returned token is cancelled.
    fn renew_while_running(&self, tick: &Tick) -> CancellationToken {
        let stop = CancellationToken::new();
        if let Some(leases) = self.leases.clone() {
            let (name, at, stop2) = (tick.function.as_str().to_owned(), tick.at, stop.clone());
            let every = (leases.lease() / 3).max(Duration::from_millis(100));
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = stop2.cancelled() => return,
                        () = tokio::time::sleep(every) => {}
                    }
                    match leases.renew(&name, at).await {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::warn!(function = %name, "lost the claim on a running tick; a peer may fire it too");
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(function = %name, error = %e, "renewing a tick claim failed")
                        }
                    }
                }
            });
        }
        stop
    }
}

/// The scheduling loop's state.
pub struct Scheduler {
    config: CronConfig,
    zone: Tz,
    firer: Arc<Firer>,
    jobs: HashMap<FunctionRef, Job>,
    invalid: HashMap<FunctionRef, String>,
    queue: BTreeSet<(DateTime<Utc>, FunctionRef)>,
    tasks: TaskTracker,
}

impl Scheduler {
    /// A scheduler with no jobs yet.
    pub fn new(config: CronConfig, zone: Tz, firer: Arc<Firer>) -> Self {
        Self {
            config,
            zone,
            firer,
            jobs: HashMap::new(),
            invalid: HashMap::new(),
            queue: BTreeSet::new(),
            tasks: TaskTracker::new(),
        }
    }

    /// Runs until `ctx.shutdown`, then waits for running firings (the harness bounds the
    /// wait with `drain_timeout`).
    pub async fn run(mut self, ctx: SourceContext) {
        let mut changes = ctx.topics.subscribe();
        self.reconcile(&ctx.topics.current(), Utc::now());
        match &self.firer.leases {
            Some(leases) => {
                // Ready once the lease store answered (or firing without it is allowed).
                self.firer.lease_store_answered(leases.ping().await.is_ok());
                let every = leases
                    .lease()
                    .clamp(Duration::from_secs(1), Duration::from_secs(10));
                tokio::spawn(self.firer.clone().watch_lease_store(every));
            }
            None => ctx.health.set_source_ready(true),
        }
        loop {
            let wake = self.queue.first().map(|(t, _)| *t);
            let sleep = async {
                match wake {
                    Some(t) => {
                        let wait = (t - Utc::now()).to_std().unwrap_or_default();
                        tokio::time::sleep(wait).await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = ctx.shutdown.cancelled() => break,
                changed = changes.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let map = changes.borrow_and_update().clone();
                    self.reconcile(&map, Utc::now());
                }
                () = sleep => self.fire_due(Utc::now()),
            }
        }
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Brings the jobs in line with the topic map: new ones scheduled, removed ones
    /// dropped, changed ones replaced; invalid schedules logged once and counted.
    pub fn reconcile(&mut self, map: &TopicMap, now: DateTime<Utc>) {
        let mut seen = HashSet::new();
        for (function, spec) in wanted_jobs(map, &self.config) {
            seen.insert(function.clone());
            let spec = match spec {
                Ok(spec) => spec,
                Err(reason) => {
                    self.mark_invalid(&function, String::new(), &reason);
                    continue;
                }
            };
            if self.jobs.get(&function).is_some_and(|j| j.spec == spec) {
                continue;
            }
            match Schedule::parse(&spec.expression, self.zone) {
                Ok(schedule) => {
                    let Some(next) = schedule.next_after(now) else {
                        self.mark_invalid(&function, spec.expression, "never fires");
                        continue;
                    };
                    self.invalid.remove(&function);
                    let replaced = self.remove(&function);
                    tracing::info!(
                        function = %function,
                        schedule = %spec.expression,
                        next = %next,
                        "{}", if replaced { "schedule changed" } else { "scheduled" }
                    );
                    if !replaced {
                        self.catch_up(&function, &schedule, &spec, now);
                    }
                    self.queue.insert((next, function.clone()));
                    self.firer
                        .metrics
                        .set_next(&function, next.timestamp_millis() as f64 / 1000.0);
                    self.jobs.insert(
                        function,
                        Job {
                            spec,
                            schedule,
                            next,
                            previous: None,
                            running: Arc::new(AtomicUsize::new(0)),
                        },
                    );
                }
                Err(e) => {
                    let expression = spec.expression.clone();
                    self.mark_invalid(&function, expression, &e.to_string());
                }
            }
        }
        let gone: Vec<FunctionRef> = self
            .jobs
            .keys()
            .filter(|f| !seen.contains(*f))
            .cloned()
            .collect();
        for function in gone {
            self.remove(&function);
            tracing::info!(function = %function, "unscheduled");
        }
        self.invalid.retain(|f, _| seen.contains(f));
        self.firer
            .metrics
            .set_counts(self.jobs.len(), self.invalid.len());
    }

    fn mark_invalid(&mut self, function: &FunctionRef, expression: String, reason: &str) {
        if self.invalid.get(function) != Some(&expression) {
            tracing::error!(
                function = %function,
                expression = %expression,
                error = reason,
                "invalid schedule; this function is not scheduled"
            );
        }
        self.remove(function);
        self.invalid.insert(function.clone(), expression);
    }

    fn remove(&mut self, function: &FunctionRef) -> bool {
        match self.jobs.remove(function) {
            Some(job) => {
                self.queue.remove(&(job.next, function.clone()));
                self.firer.metrics.forget(function);
                true
            }
            None => false,
        }
    }

    /// With a lease store, ticks missed while no replica ran (after the last one any
    /// replica finished) follow the misfire policy. Without one, nothing is remembered
    /// across restarts.
    fn catch_up(
        &self,
        function: &FunctionRef,
        schedule: &Schedule,
        spec: &JobSpec,
        now: DateTime<Utc>,
    ) {
        let Some(leases) = self.firer.leases.clone() else {
            return;
        };
        let (firer, function, schedule, spec) = (
            self.firer.clone(),
            function.clone(),
            schedule.clone(),
            spec.clone(),
        );
        let threshold = self.config.misfire_threshold;
        self.tasks.spawn(async move {
            let last = match leases.last_fired(function.as_str()).await {
                Ok(Some(last)) => last,
                Ok(None) => return,
                Err(e) => {
                    firer.metrics.lock_error();
                    tracing::warn!(function = %function, error = %e, "cannot read the last fired tick");
                    return;
                }
            };
            let limit = now - chrono::Duration::from_std(threshold).unwrap_or_default();
            let missed = schedule.between(last, limit, MISSED_TICKS_LIMIT);
            let Some(latest) = missed.last().copied() else {
                return;
            };
            tracing::warn!(function = %function, missed = missed.len(), since = %last, "ticks missed while no replica ran");
            match spec.misfire {
                Misfire::Skip => firer.metrics.misfired(&function, missed.len() as u64),
                Misfire::FireOnce => {
                    firer.metrics.misfired(&function, missed.len() as u64 - 1);
                    let tick = Tick {
                        function,
                        at: latest,
                        previous: None,
                        expression: spec.expression,
                        overlap: spec.overlap,
                        running: Arc::new(AtomicUsize::new(0)),
                    };
                    firer.fire(tick).await;
                }
            }
        });
    }

    /// Fires (or skips) every job due at `now` and queues its next tick.
    pub fn fire_due(&mut self, now: DateTime<Utc>) {
        while let Some((due, function)) = self.queue.first().cloned() {
            if due > now {
                break;
            }
            self.queue.pop_first();
            let Some(job) = self.jobs.get_mut(&function) else {
                continue;
            };
            let (fire_at, missed) = plan(
                &job.schedule,
                job.spec.misfire,
                due,
                now,
                self.config.misfire_threshold,
            );
            if missed > 0 {
                tracing::warn!(function = %function, missed, late_by = ?(now - due).to_std().unwrap_or_default(), "ticks missed (the connector was stalled or down)");
                self.firer.metrics.misfired(&function, missed);
            }
            if let Some(at) = fire_at {
                if job.spec.overlap == Overlap::Forbid && job.running.load(Ordering::SeqCst) > 0 {
                    self.firer.metrics.firing(&function, Firing::SkippedOverlap);
                    tracing::info!(function = %function, "previous run still going; tick skipped");
                } else {
                    let tick = Tick {
                        function: function.clone(),
                        at,
                        previous: job.previous,
                        expression: job.spec.expression.clone(),
                        overlap: job.spec.overlap,
                        running: job.running.clone(),
                    };
                    job.previous = Some(at);
                    self.tasks.spawn(self.firer.clone().fire(tick));
                }
            }
            let after = if fire_at == Some(due) { due } else { now };
            match job.schedule.next_after(after) {
                Some(next) => {
                    job.next = next;
                    self.queue.insert((next, function.clone()));
                    self.firer
                        .metrics
                        .set_next(&function, next.timestamp_millis() as f64 / 1000.0);
                }
                None => {
                    tracing::info!(function = %function, "schedule has no further ticks");
                    self.jobs.remove(&function);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use connector_sdk::topic_map::FunctionStatus;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn function(name: &str, annotations: &[(&str, &str)]) -> FunctionStatus {
        FunctionStatus {
            name: name.into(),
            namespace: None,
            annotations: annotations
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    #[test]
    fn cron_function_alone_or_among_topics() {
        let map = TopicMap::build(
            &[
                function(
                    "a",
                    &[("topic", "cron-function"), ("schedule", "* * * * *")],
                ),
                function(
                    "b",
                    &[("topic", "orders, cron-function"), ("schedule", "@hourly")],
                ),
                function("c", &[("topic", "orders"), ("schedule", "@hourly")]),
                function("d", &[("topic", "cron-function")]),
                function(
                    "e",
                    &[
                        ("topic", "cron-function"),
                        ("schedule", "@daily"),
                        ("cron.misfire", "fire_once"),
                        ("cron.overlap", "forbid"),
                    ],
                ),
                function(
                    "f",
                    &[
                        ("topic", "cron-function"),
                        ("schedule", "@daily"),
                        ("cron.overlap", "never"),
                    ],
                ),
            ],
            ",",
        );
        let wanted: HashMap<String, Result<JobSpec, String>> =
            wanted_jobs(&map, &CronConfig::default())
                .into_iter()
                .map(|(f, s)| (f.to_string(), s))
                .collect();
        assert_eq!(wanted.len(), 5, "{wanted:?}");
        assert!(!wanted.contains_key("c"));
        assert_eq!(wanted["a"].as_ref().unwrap().expression, "* * * * *");
        assert_eq!(wanted["b"].as_ref().unwrap().misfire, Misfire::Skip);
        assert!(wanted["d"].as_ref().unwrap_err().contains("schedule"));
        let e = wanted["e"].as_ref().unwrap();
        assert_eq!((e.misfire, e.overlap), (Misfire::FireOnce, Overlap::Forbid));
        assert!(wanted["f"].as_ref().unwrap_err().contains("cron.overlap"));
    }

    #[test]
    fn plan_fires_on_time_and_applies_the_misfire_policy_when_late() {
        let s = Schedule::parse("@every 1s", Tz::UTC).unwrap();
        let due = at("2030-01-01T00:00:10Z");
        let threshold = Duration::from_secs(1);
        assert_eq!(
            plan(
                &s,
                Misfire::Skip,
                due,
                at("2030-01-01T00:00:10.200Z"),
                threshold
            ),
            (Some(due), 0)
        );
        let now = at("2030-01-01T00:00:15.500Z");
        // Ticks 10, 11, 12, 13, 14, 15 all passed.
        assert_eq!(plan(&s, Misfire::Skip, due, now, threshold), (None, 6));
        assert_eq!(
            plan(&s, Misfire::FireOnce, due, now, threshold),
            (Some(at("2030-01-01T00:00:15Z")), 5)
        );
    }
}
