//! One scaling policy for every runtime of the local provider, OpenFaaS's contract:
//! a function reports `com.openfaas.scale.min` replicas right after deploy, sustained load
//! scales it up to `com.openfaas.scale.max`, it returns to the minimum once the load is
//! gone, and `min == max` turns autoscaling off.
//!
//! What a replica *is* belongs to each runtime; how many there should be is decided here.
//! A [`Scaler`] holds the desired count and the function's load (requests in flight, the
//! peak since the last decision, the last use). The runtime's own loop calls
//! [`Scaler::autoscale`] every `autoscale_interval` and then makes its replicas match
//! [`Scaler::desired`]: the `http` runtime starts and stops server processes, the
//! `process` and `url` runtimes resize a [`WorkerPool`].
//!
//! The decision, every interval: `needed = ceil(peak in flight / com.openfaas.scale.target)`,
//! clamped to `[max(min, 1), max]`. Above the desired count it applies at once; below it
//! only after the load has stayed lower for `scale_down_after`, so a short lull does not
//! stop replicas that the next burst needs. A function with scale-to-zero enabled and no
//! request for its idle time goes to 0; the next request sets it back to `max(min, 1)`
//! ([`Scaler::wake_from_zero`]). `/system/scale-function` sets the count directly
//! ([`Scaler::set`], capped at `max`); the autoscaler moves it again once load says so.
//!
//! Events waiting count as load too. Connectors report each function's backlog (messages
//! waiting for it: broker lag plus what they hold) to the gateway (`POST
//! /system/backlog`), which hands the sum to [`Scaler::set_backlog`]: a function at zero
//! gets `max(min, 1)` replicas at once when a message waits for it, not when the first
//! invocation arrives; `needed` is also at least `ceil(backlog / connector.scale.target)`,
//! so a growing backlog scales the function out to `max`; and a function with a backlog
//! is never idle.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::logs::LogBook;
use super::spec::Scaling;
use crate::error::Error;

/// The desired replica count and the load it is decided from, shared by a runtime's
/// request path and its scaling loop.
#[derive(Debug)]
pub struct Scaler {
    scaling: Scaling,
    scale_down_after: Duration,
    logs: Arc<LogBook>,
    desired: AtomicU64,
    inflight: AtomicUsize,
    /// Most requests in flight at once since the last decision.
    peak: AtomicUsize,
    last_used: Mutex<Instant>,
    /// Messages waiting for the function, as the connectors last reported.
    backlog: AtomicU64,
    /// When the load first fell below the desired count (scale-down pending).
    low_since: Mutex<Option<Instant>>,
    changed: Notify,
}

impl Scaler {
    /// A scaler at `scaling.min` replicas.
    pub fn new(scaling: Scaling, scale_down_after: Duration, logs: Arc<LogBook>) -> Self {
        Self {
            desired: AtomicU64::new(scaling.min),
            scaling,
            scale_down_after,
            logs,
            inflight: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            last_used: Mutex::new(Instant::now()),
            backlog: AtomicU64::new(0),
            low_since: Mutex::new(None),
            changed: Notify::new(),
        }
    }

    /// The function's scaling labels.
    pub fn scaling(&self) -> Scaling {
        self.scaling
    }

    /// Replicas the function should have.
    pub fn desired(&self) -> u64 {
        self.desired.load(Ordering::SeqCst)
    }

    /// Woken whenever the desired count changes.
    pub fn changed(&self) -> &Notify {
        &self.changed
    }

    /// `/system/scale-function`: sets the desired count, capped at `max` (0 allowed).
    pub fn set(&self, replicas: u64) {
        self.store(replicas.min(self.scaling.max));
    }

    /// A request found no replica: when the function is at zero, sets it back to
    /// `max(min, 1)`. Returns whether it was at zero.
    pub fn wake_from_zero(&self) -> bool {
        let to = self.scaling.min.max(1);
        let woke = self
            .desired
            .compare_exchange(0, to, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok();
        if woke {
            self.logs
                .write("gateway", &format!("Scaling from zero to {to} replica(s)"));
            self.changed.notify_one();
        }
        woke
    }

    /// Messages waiting for the function now (the connectors' sum). A backlog wakes a
    /// function at zero at once and keeps it from going idle; the next
    /// [`autoscale`](Self::autoscale) scales it out as far as the backlog calls for.
    pub fn set_backlog(&self, messages: u64) {
        self.backlog.store(messages, Ordering::SeqCst);
        if messages > 0 {
            self.touch();
            self.wake_from_zero();
        }
    }

    /// The last reported backlog.
    pub fn backlog(&self) -> u64 {
        self.backlog.load(Ordering::SeqCst)
    }

    /// Counts a request in flight until the returned guard is dropped.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        let now = self.inflight.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        self.touch();
        InFlight {
            scaler: Arc::clone(self),
        }
    }

    /// A request was refused for want of room (429): it counts as one more in flight, so
    /// a function whose replicas are all full scales up even when the target per replica
    /// equals what a replica admits.
    pub fn refused(&self) {
        let demand = self.inflight.load(Ordering::SeqCst) + 1;
        self.peak.fetch_max(demand, Ordering::SeqCst);
        self.touch();
    }

    /// Marks the function as used now (an invocation arrived).
    pub fn touch(&self) {
        *self
            .last_used
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Instant::now();
    }

    fn store(&self, replicas: u64) {
        if self.desired.swap(replicas, Ordering::SeqCst) != replicas {
            self.changed.notify_one();
        }
    }

    /// One autoscaling decision (see the module comment); the runtime's loop calls it every
    /// `autoscale_interval`. Returns the new desired count when it changed.
    pub fn autoscale(&self) -> Option<u64> {
        let scaling = self.scaling;
        let desired = self.desired();
        let current = self.inflight.load(Ordering::SeqCst);
        let peak = self.peak.swap(current, Ordering::SeqCst).max(current);
        let mut low_since = self
            .low_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Scaled to zero (by idleness or by the API): only a request brings it back. And
        // `min == max` is OpenFaaS's way to turn autoscaling off.
        if desired == 0 || scaling.min == scaling.max {
            *low_since = None;
            return None;
        }
        let now = Instant::now();
        if let Some(after) = scaling.zero_after {
            let idle = now.duration_since(
                *self
                    .last_used
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner),
            );
            if current == 0 && self.backlog() == 0 && idle >= after {
                self.logs.write(
                    "gateway",
                    &format!(
                        "Scaling to zero after {} idle",
                        humantime::format_duration(after)
                    ),
                );
                *low_since = None;
                self.store(0);
                return Some(0);
            }
        }
        let peak = u64::try_from(peak).unwrap_or(u64::MAX);
        let backlog = self.backlog();
        let needed = peak
            .div_ceil(scaling.target)
            .max(backlog.div_ceil(scaling.backlog_target))
            .clamp(scaling.min.max(1), scaling.max);
        if needed > desired {
            self.logs.write(
                "gateway",
                &format!(
                    "Scaling up from {desired} to {needed} replicas ({peak} in flight, {backlog} waiting)"
                ),
            );
            *low_since = None;
            self.store(needed);
            return Some(needed);
        }
        if needed == desired {
            *low_since = None;
            return None;
        }
        let since = *low_since.get_or_insert(now);
        if now.duration_since(since) < self.scale_down_after {
            return None;
        }
        self.logs.write(
            "gateway",
            &format!("Scaling down from {desired} to {needed} replicas"),
        );
        *low_since = None;
        self.store(needed);
        Some(needed)
    }
}

/// A request in flight, counted by its [`Scaler`] until dropped.
#[derive(Debug)]
pub struct InFlight {
    scaler: Arc<Scaler>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.scaler.inflight.fetch_sub(1, Ordering::SeqCst);
        self.scaler.touch();
    }
}

/// Replicas without a process of their own: the `process` runtime's watchdog workers and
/// the `url` runtime's lanes to the backend. Each replica (a worker) admits up to
/// `max_inflight` requests at once (no limit when unset), as one watchdog container does;
/// a request goes to the least busy worker with a free slot, and gets 429 when every
/// worker is full. Workers start at once (nothing to wait for), so all desired replicas
/// are available. A surplus worker is retired from the pool at once; its requests in
/// flight finish on it.
#[derive(Debug)]
pub struct WorkerPool {
    scaler: Arc<Scaler>,
    slots: Option<usize>,
    workers: Mutex<Vec<Arc<Worker>>>,
}

#[derive(Debug)]
struct Worker {
    slots: Option<Arc<Semaphore>>,
    inflight: AtomicUsize,
}

/// A request's place on a worker: its slot and its count in the scaler, freed on drop.
#[derive(Debug)]
pub struct WorkerSlot {
    worker: Arc<Worker>,
    _permit: Option<OwnedSemaphorePermit>,
    _inflight: InFlight,
}

impl Drop for WorkerSlot {
    fn drop(&mut self) {
        self.worker.inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl WorkerPool {
    /// A pool following `scaler`, each worker admitting `slots` requests (`None`: no limit).
    pub fn new(scaler: Arc<Scaler>, slots: Option<usize>) -> Self {
        let pool = Self {
            scaler,
            slots,
            workers: Mutex::new(Vec::new()),
        };
        pool.resize();
        pool
    }

    /// The pool's scaler.
    pub fn scaler(&self) -> &Arc<Scaler> {
        &self.scaler
    }

    /// Workers in the pool.
    pub fn available(&self) -> u64 {
        u64::try_from(self.workers().len()).unwrap_or(u64::MAX)
    }

    fn workers(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Worker>>> {
        self.workers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts or retires workers until there are as many as the scaler wants.
    pub fn resize(&self) {
        let want = usize::try_from(self.scaler.desired()).unwrap_or(usize::MAX);
        let mut workers = self.workers();
        if workers.len() > want {
            // Retire the least busy first.
            workers.sort_by_key(|w| std::cmp::Reverse(w.inflight.load(Ordering::SeqCst)));
            workers.truncate(want);
        }
        while workers.len() < want {
            workers.push(Arc::new(Worker {
                slots: self.slots.map(|n| Arc::new(Semaphore::new(n))),
                inflight: AtomicUsize::new(0),
            }));
        }
    }

    /// A slot on the least busy worker that has one; a function at zero replicas is woken
    /// first. 429 when every worker is full.
    pub fn acquire(&self) -> Result<WorkerSlot, Error> {
        self.scaler.touch();
        if self.scaler.wake_from_zero() {
            self.resize();
        }
        let workers = self.workers();
        let mut by_load: Vec<&Arc<Worker>> = workers.iter().collect();
        by_load.sort_by_key(|w| w.inflight.load(Ordering::SeqCst));
        for worker in by_load {
            let permit = match &worker.slots {
                Some(slots) => match Arc::clone(slots).try_acquire_owned() {
                    Ok(permit) => Some(permit),
                    Err(_) => continue,
                },
                None => None,
            };
            worker.inflight.fetch_add(1, Ordering::SeqCst);
            return Ok(WorkerSlot {
                worker: Arc::clone(worker),
                _permit: permit,
                _inflight: self.scaler.begin(),
            });
        }
        self.scaler.refused();
        Err(Error::TooManyRequests(self.slots.unwrap_or_default()))
    }

    /// Runs the pool's scaling loop until `cancel`: a decision every `interval`, and the
    /// pool resized after every change of the desired count.
    pub async fn run(
        self: Arc<Self>,
        interval: Duration,
        cancel: tokio_util::sync::CancellationToken,
    ) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                () = self.scaler.changed().notified() => {}
                _ = tick.tick() => {
                    self.scaler.autoscale();
                }
            }
            self.resize();
        }
    }
}

/// A [`WorkerPool`] with its scaling loop running: what a `process` or `url` function
/// owns. The loop stops when this is dropped.
#[derive(Debug)]
pub struct Workers {
    pool: Arc<WorkerPool>,
    cancel: tokio_util::sync::CancellationToken,
}

impl Workers {
    /// Starts a pool following `scaler` (workers of `slots` each) and its loop, a decision
    /// every `interval`, until `cancel` or drop.
    pub fn start(
        scaler: Arc<Scaler>,
        slots: Option<usize>,
        interval: Duration,
        cancel: tokio_util::sync::CancellationToken,
    ) -> Self {
        let pool = Arc::new(WorkerPool::new(scaler, slots));
        tokio::spawn(Arc::clone(&pool).run(interval, cancel.clone()));
        Self { pool, cancel }
    }

    /// Desired replicas.
    pub fn replicas(&self) -> u64 {
        self.pool.scaler().desired()
    }

    /// Running workers.
    pub fn available(&self) -> u64 {
        self.pool.available()
    }

    /// `/system/scale-function`.
    pub fn scale(&self, replicas: u64) {
        self.pool.scaler().set(replicas);
        self.pool.resize();
    }

    /// Messages waiting for the function (see [`Scaler::set_backlog`]).
    pub fn set_backlog(&self, messages: u64) {
        self.pool.scaler().set_backlog(messages);
        self.pool.resize();
    }

    /// Ends the scaling loop.
    pub fn stop(&self) {
        self.cancel.cancel();
    }

    /// See [`WorkerPool::acquire`].
    pub fn acquire(&self) -> Result<WorkerSlot, Error> {
        self.pool.acquire()
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::FunctionRef;

    fn scaler(min: u64, max: u64, zero_after: Option<Duration>) -> Arc<Scaler> {
        let logs = LogBook::new(
            FunctionRef {
                name: "f".into(),
                namespace: "openfaas-fn".into(),
            },
            100,
        );
        Arc::new(Scaler::new(
            Scaling {
                min,
                max,
                target: 2,
                zero_after,
                backlog_target: 10,
            },
            Duration::from_secs(30),
            logs,
        ))
    }

    #[tokio::test(start_paused = true)]
    async fn load_scales_up_at_once_to_max_and_down_only_after_the_delay() {
        let s = scaler(1, 3, None);
        assert_eq!(s.desired(), 1);
        let load: Vec<InFlight> = (0..5).map(|_| s.begin()).collect();
        assert_eq!(
            s.autoscale(),
            Some(3),
            "5 in flight / target 2, capped at 3"
        );
        let more: Vec<InFlight> = (0..20).map(|_| s.begin()).collect();
        assert_eq!(s.autoscale(), None, "never beyond max");
        assert_eq!(s.desired(), 3);
        drop(more);
        drop(load);
        // The peak of the last interval still counts once, then the load is low.
        assert_eq!(s.autoscale(), None);
        assert_eq!(s.autoscale(), None);
        tokio::time::advance(Duration::from_secs(29)).await;
        assert_eq!(s.autoscale(), None, "low for 29 s of 30");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(s.autoscale(), Some(1));
        assert_eq!(s.desired(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_during_the_delay_restarts_it() {
        let s = scaler(1, 4, None);
        let load: Vec<InFlight> = (0..8).map(|_| s.begin()).collect();
        assert_eq!(s.autoscale(), Some(4));
        drop(load);
        s.autoscale(); // the interval's peak, 8, still counts
        assert_eq!(s.autoscale(), None, "low from here");
        tokio::time::advance(Duration::from_secs(20)).await;
        assert_eq!(s.autoscale(), None);
        let burst: Vec<InFlight> = (0..7).map(|_| s.begin()).collect();
        assert_eq!(
            s.autoscale(),
            None,
            "7 / 2 needs 4: the pending scale-down is off"
        );
        drop(burst);
        s.autoscale();
        assert_eq!(s.autoscale(), None, "low again from here");
        tokio::time::advance(Duration::from_secs(29)).await;
        assert_eq!(s.autoscale(), None, "the delay counts from the new lull");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(s.autoscale(), Some(1));
    }

    #[tokio::test(start_paused = true)]
    async fn min_equal_to_max_never_changes() {
        let s = scaler(2, 2, Some(Duration::from_secs(1)));
        assert_eq!(s.desired(), 2);
        let load: Vec<InFlight> = (0..50).map(|_| s.begin()).collect();
        assert_eq!(s.autoscale(), None);
        drop(load);
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(s.autoscale(), None);
        assert_eq!(s.desired(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_goes_to_zero_and_a_request_wakes_it_at_min() {
        let s = scaler(0, 3, Some(Duration::from_secs(60)));
        assert_eq!(s.desired(), 0, "min 0: no replica after deploy");
        assert!(s.wake_from_zero());
        assert_eq!(s.desired(), 1);
        assert!(!s.wake_from_zero());
        let busy = s.begin();
        tokio::time::advance(Duration::from_secs(120)).await;
        assert_eq!(s.autoscale(), None, "a request in flight is not idle");
        drop(busy);
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(s.autoscale(), None);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(s.autoscale(), Some(0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_backlog_wakes_from_zero_scales_out_and_keeps_the_function_busy() {
        // Backlog target 10 per replica, max 4, idle after 60 s.
        let s = scaler(0, 4, Some(Duration::from_secs(60)));
        assert_eq!(s.desired(), 0);
        s.set_backlog(0);
        assert_eq!(s.desired(), 0, "nothing waits: stays at zero");
        s.set_backlog(3);
        assert_eq!(s.desired(), 1, "a waiting message wakes it at once");
        s.set_backlog(35);
        assert_eq!(
            s.autoscale(),
            Some(4),
            "35 waiting / 10 per replica, capped at 4"
        );
        tokio::time::advance(Duration::from_secs(120)).await;
        assert_eq!(s.autoscale(), None, "a function with a backlog is not idle");
        s.set_backlog(12);
        assert_eq!(s.autoscale(), None, "lower: the scale-down waits");
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(s.autoscale(), Some(2), "12 / 10 needs 2");
        s.set_backlog(0);
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(s.autoscale(), Some(0), "idle once nothing waits");
    }

    #[tokio::test(start_paused = true)]
    async fn the_scale_api_is_capped_at_max_and_autoscaling_resumes_from_it() {
        let s = scaler(1, 3, None);
        s.set(10);
        assert_eq!(s.desired(), 3);
        s.autoscale();
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(s.autoscale(), Some(1));
        s.set(0);
        assert_eq!(s.autoscale(), None, "at zero until a request arrives");
    }

    #[tokio::test(start_paused = true)]
    async fn full_workers_scale_up_one_at_a_time() {
        let s = scaler(1, 3, None);
        let pool = WorkerPool::new(Arc::clone(&s), Some(2));
        let held: Vec<WorkerSlot> = (0..2).map(|_| pool.acquire().unwrap()).collect();
        assert_eq!(s.autoscale(), None, "full, but nobody was refused");
        assert!(pool.acquire().is_err());
        assert_eq!(
            s.autoscale(),
            Some(2),
            "a refusal is demand beyond the full worker"
        );
        pool.resize();
        drop(held);
    }

    #[tokio::test(start_paused = true)]
    async fn workers_each_admit_their_slots_and_follow_the_desired_count() {
        let s = scaler(1, 3, None);
        let pool = WorkerPool::new(Arc::clone(&s), Some(2));
        assert_eq!(pool.available(), 1);
        let a = pool.acquire().unwrap();
        let b = pool.acquire().unwrap();
        assert!(matches!(pool.acquire(), Err(Error::TooManyRequests(2))));
        assert_eq!(s.autoscale(), Some(2), "the refused request is demand");
        pool.resize();
        assert_eq!(pool.available(), 2);
        let c = pool.acquire().unwrap();
        let d = pool.acquire().unwrap();
        assert!(pool.acquire().is_err(), "two workers of two slots");
        s.set(1);
        pool.resize();
        assert_eq!(pool.available(), 1);
        drop((a, b, c, d));
        assert_eq!(s.inflight.load(Ordering::SeqCst), 0);
        s.set(0);
        pool.resize();
        assert_eq!(pool.available(), 0);
        let e = pool.acquire().unwrap();
        assert_eq!((s.desired(), pool.available()), (1, 1), "woken from zero");
        drop(e);
    }
}
