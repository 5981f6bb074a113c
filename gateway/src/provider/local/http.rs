//! The `http` runtime: long-running HTTP servers, one per replica, each told its port in
//! `PORT` (and `port`, as of-watchdog reads it).
//!
//! How replicas come and go. One reconciler task per function owns the replica set: it
//! starts replicas until there are `desired` of them and stops the surplus (least busy
//! first, after their in-flight requests finish). Each replica has its own task that runs
//! the process and its health checks: a replica is *ready* once `GET <health_path>` answers
//! 2xx, and only ready replicas get requests; `availableReplicas` counts them. A replica
//! whose process exits is replaced, after a backoff if it died young.
//!
//! `desired` is the function's [`Scaler`]'s, the policy every runtime shares (see
//! [`super::scaling`]): `/system/scale-function` sets it, the autoscaler follows the load
//! between `com.openfaas.scale.min` and `max`, an idle function with scale-to-zero enabled
//! drops to 0. A request that finds no ready replica sets `desired` back to `max(min, 1)`
//! when it was 0 and waits, up to `ready_timeout`, for one to be ready: scale from zero.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Body;
use faas_common::backoff::Backoff;
use http::Response;
use tokio::process::Command;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::logs::LogBook;
use super::scaling::{InFlight, Scaler};
use super::spec::FunctionSpec;
use crate::error::Error;
use crate::provider::{Deadline, Invocation, Upstream, UpstreamClient, forward};

/// Timings shared by every `http` function.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Longest wait for a replica to become ready.
    pub ready_timeout: Duration,
    /// Interval of health checks of ready replicas.
    pub health_interval: Duration,
    /// Interval of autoscaling decisions.
    pub autoscale_interval: Duration,
    /// How long load must stay low before scaling down.
    pub scale_down_after: Duration,
    /// The gateway's `upstream_timeout`.
    pub upstream_timeout: Duration,
    /// Where replica processes are recorded, for cleanup after a crash.
    pub children: crate::orphans::Children,
}

/// An `http` function and its replicas.
#[derive(Debug)]
pub struct HttpRuntime {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    spec: Arc<FunctionSpec>,
    logs: Arc<LogBook>,
    client: UpstreamClient,
    settings: HttpSettings,
    scaler: Arc<Scaler>,
    replicas: Mutex<Vec<Arc<Replica>>>,
    ready: watch::Sender<usize>,
    failures: AtomicU64,
    rotation: AtomicUsize,
    next_id: AtomicU64,
    wake: Notify,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

#[derive(Debug)]
struct Replica {
    id: String,
    port: u16,
    /// `http://127.0.0.1:{port}`, parsed once.
    upstream: Upstream,
    /// The process's PID once started (0 before), for memory usage.
    pid: AtomicU32,
    ready: AtomicBool,
    inflight: AtomicUsize,
    stop: CancellationToken,
}

impl HttpRuntime {
    /// Starts the function's reconciler with `min` replicas (none when `min` is 0).
    pub fn start(
        spec: Arc<FunctionSpec>,
        logs: Arc<LogBook>,
        client: UpstreamClient,
        settings: HttpSettings,
        cancel: CancellationToken,
    ) -> Self {
        let (ready, _) = watch::channel(0);
        let scaler = Arc::new(Scaler::new(
            spec.scaling,
            settings.scale_down_after,
            Arc::clone(&logs),
        ));
        let inner = Arc::new(Inner {
            spec,
            logs,
            client,
            settings,
            scaler,
            replicas: Mutex::new(Vec::new()),
            ready,
            failures: AtomicU64::new(0),
            rotation: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            wake: Notify::new(),
            cancel,
            tasks: TaskTracker::new(),
        });
        let reconciler = Arc::clone(&inner);
        inner
            .tasks
            .spawn(async move { reconciler.reconcile_loop().await });
        Self { inner }
    }

    /// Desired replicas.
    pub fn replicas(&self) -> u64 {
        self.inner.scaler.desired()
    }

    /// Ready replicas.
    pub fn available(&self) -> u64 {
        u64::try_from(*self.inner.ready.borrow()).unwrap_or(u64::MAX)
    }

    /// Resident memory of all running replicas, in bytes (from `/proc`).
    pub fn memory_bytes(&self) -> u64 {
        self.inner
            .replicas()
            .iter()
            .map(|r| r.pid.load(Ordering::SeqCst))
            .filter(|pid| *pid != 0)
            .filter_map(resident_bytes)
            .sum()
    }

    /// Sets desired replicas, capped at the function's maximum.
    pub fn scale(&self, replicas: u64) {
        self.inner.scaler.set(replicas);
    }

    /// The function's scaler.
    pub fn scaler(&self) -> &Arc<Scaler> {
        &self.inner.scaler
    }

    /// Sends `invocation` to the least busy ready replica, scaling from zero if needed.
    pub async fn invoke(&self, invocation: Invocation) -> Result<Response<Body>, Error> {
        let inner = &self.inner;
        inner.scaler.touch();
        let replica = inner.pick().await?;
        let upstream = replica.upstream.clone();
        let guard = InflightGuard::new(&inner.scaler, replica);
        let deadline = Deadline::new(inner.settings.upstream_timeout, inner.spec.exec_timeout);
        // The request counts as in flight until its body has been streamed out: the
        // guard goes with the body.
        forward(&inner.client, &upstream, None, invocation, deadline, guard).await
    }

    /// Stops every replica and waits for them.
    pub async fn stop(&self) {
        self.inner.cancel.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }
}

impl Drop for HttpRuntime {
    fn drop(&mut self) {
        self.inner.cancel.cancel();
    }
}

/// A request in flight on a replica, counted there and by the function's scaler.
struct InflightGuard {
    replica: Arc<Replica>,
    _load: InFlight,
}

impl InflightGuard {
    fn new(scaler: &Arc<Scaler>, replica: Arc<Replica>) -> Self {
        replica.inflight.fetch_add(1, Ordering::SeqCst);
        Self {
            replica,
            _load: scaler.begin(),
        }
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.replica.inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Inner {
    fn replicas(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Replica>>> {
        self.replicas.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The least busy ready replica; ties go round-robin so sequential requests spread.
    fn choose_ready(&self) -> Option<Arc<Replica>> {
        let replicas = self.replicas();
        // Two passes over the few replicas rather than a list of the ready ones per request.
        let ready = || {
            replicas
                .iter()
                .filter(|r| r.ready.load(Ordering::SeqCst) && !r.stop.is_cancelled())
        };
        let count = ready().count();
        if count == 0 {
            return None;
        }
        let start = self.rotation.fetch_add(1, Ordering::Relaxed) % count;
        ready()
            .skip(start)
            .chain(ready().take(start))
            .min_by_key(|r| r.inflight.load(Ordering::SeqCst))
            .map(Arc::clone)
    }

    async fn pick(&self) -> Result<Arc<Replica>, Error> {
        if let Some(r) = self.choose_ready() {
            return Ok(r);
        }
        let wait_until = tokio::time::Instant::now() + self.settings.ready_timeout;
        let mut ready = self.ready.subscribe();
        loop {
            self.scaler.wake_from_zero();
            let waited = tokio::select! {
                r = tokio::time::timeout_at(wait_until, ready.wait_for(|n| *n > 0)) => r,
                () = self.cancel.cancelled() => {
                    return Err(Error::BadGateway("function is being removed".into()));
                }
            };
            match waited {
                Ok(Ok(_)) => {}
                Ok(Err(_)) => return Err(Error::BadGateway("function was removed".into())),
                Err(_) => {
                    return Err(Error::GatewayTimeout(format!(
                        "function {} did not become ready within {}",
                        self.spec.function,
                        humantime::format_duration(self.settings.ready_timeout)
                    )));
                }
            }
            if let Some(r) = self.choose_ready() {
                return Ok(r);
            }
        }
    }

    fn publish_ready(&self) {
        let n = self
            .replicas()
            .iter()
            .filter(|r| r.ready.load(Ordering::SeqCst) && !r.stop.is_cancelled())
            .count();
        self.ready.send_if_modified(|current| {
            let changed = *current != n;
            *current = n;
            changed
        });
    }

    async fn reconcile_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.settings.autoscale_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.cancel.cancelled() => break,
                () = self.wake.notified() => {}
                () = self.scaler.changed().notified() => {}
                _ = tick.tick() => {
                    self.scaler.autoscale();
                }
            }
            self.reconcile();
        }
        let all: Vec<Arc<Replica>> = self.replicas().drain(..).collect();
        for replica in all {
            replica.stop.cancel();
        }
        self.publish_ready();
    }

    fn reconcile(self: &Arc<Self>) {
        let want = usize::try_from(self.scaler.desired()).unwrap_or(usize::MAX);
        let mut started = Vec::new();
        {
            let mut replicas = self.replicas();
            if replicas.len() > want {
                // Stop the least useful first: not ready, then least busy.
                replicas.sort_by_key(|r| {
                    (
                        r.ready.load(Ordering::SeqCst),
                        r.inflight.load(Ordering::SeqCst),
                    )
                });
                let surplus = replicas.len() - want;
                for replica in replicas.drain(..surplus) {
                    replica.stop.cancel();
                }
            }
            while replicas.len() < want {
                let Some((port, upstream)) =
                    free_port().and_then(|p| Upstream::loopback(p).ok().map(|u| (p, u)))
                else {
                    self.logs.write("gateway", "No free port for a new replica");
                    break;
                };
                let n = self.next_id.fetch_add(1, Ordering::SeqCst);
                let replica = Arc::new(Replica {
                    id: format!("{}-{n}", self.spec.function.name),
                    port,
                    upstream,
                    pid: AtomicU32::new(0),
                    ready: AtomicBool::new(false),
                    inflight: AtomicUsize::new(0),
                    stop: self.cancel.child_token(),
                });
                replicas.push(Arc::clone(&replica));
                started.push(replica);
            }
        }
        for replica in started {
            let inner = Arc::clone(self);
            self.tasks
                .spawn(async move { inner.run_replica(replica).await });
        }
        self.publish_ready();
    }

    async fn run_replica(self: Arc<Self>, replica: Arc<Replica>) {
        let began = Instant::now();
        let exited_early = match self.supervise(&replica).await {
            Ok(()) => return self.forget(&replica),
            Err(reason) => {
                self.logs
                    .write(&replica.id, &format!("Replica failed: {reason}"));
                began.elapsed() < Duration::from_secs(10)
            }
        };
        replica.ready.store(false, Ordering::SeqCst);
        self.publish_ready();
        if exited_early {
            // A process that keeps dying at start is retried with backoff, not in a loop.
            let failures = self.failures.fetch_add(1, Ordering::SeqCst) + 1;
            let delay = Backoff::default().delay(u32::try_from(failures).unwrap_or(u32::MAX));
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = replica.stop.cancelled() => {}
            }
        } else {
            self.failures.store(0, Ordering::SeqCst);
        }
        self.forget(&replica);
    }

    /// Removes `replica` from the set (if still there) and lets the reconciler replace it.
    fn forget(&self, replica: &Arc<Replica>) {
        self.replicas().retain(|r| !Arc::ptr_eq(r, replica));
        self.publish_ready();
        self.wake.notify_one();
    }

    /// Runs one replica's process until it is stopped (`Ok`) or fails (`Err`).
    async fn supervise(&self, replica: &Arc<Replica>) -> Result<(), String> {
        let Some((program, args)) = self.spec.argv.split_first() else {
            return Err("no command".to_owned());
        };
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            // Its own process group: a ctrl-c in the gateway's terminal reaches the
            // gateway only, which then stops its children in order.
            .process_group(0);
        self.spec.apply_env(&mut command);
        command.env("PORT", replica.port.to_string());
        command.env("port", replica.port.to_string());
        if let Some(dir) = &self.spec.workdir {
            command.current_dir(dir);
        }
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start {program}: {e}"))?;
        self.logs.write(
            &replica.id,
            &format!(
                "Started process {} on port {}",
                child.id().unwrap_or_default(),
                replica.port
            ),
        );
        if let Some(out) = child.stdout.take() {
            self.logs.pipe(replica.id.clone(), out);
        }
        if let Some(err) = child.stderr.take() {
            self.logs.pipe(replica.id.clone(), err);
        }
        let pid = child.id();
        replica.pid.store(pid.unwrap_or_default(), Ordering::SeqCst);
        self.settings.children.add(pid);
        let result = self.watch(replica, &mut child).await;
        self.settings.children.remove(pid);
        result
    }

    /// Health-checks a started replica until it is stopped (`Ok`) or fails (`Err`).
    async fn watch(
        &self,
        replica: &Arc<Replica>,
        child: &mut tokio::process::Child,
    ) -> Result<(), String> {
        let health = replica.upstream.clone();
        let started = Instant::now();
        let mut ever_ready = false;
        let mut wait = Duration::from_millis(20);
        loop {
            tokio::select! {
                status = child.wait() => {
                    return Err(match status {
                        Ok(s) => format!("process exited ({s})"),
                        Err(e) => format!("cannot wait for the process: {e}"),
                    });
                }
                () = replica.stop.cancelled() => {
                    self.drain_and_stop(replica, child).await;
                    return Ok(());
                }
                () = tokio::time::sleep(wait) => {}
            }
            let healthy = self.healthy(&health).await;
            if healthy != replica.ready.load(Ordering::SeqCst) {
                replica.ready.store(healthy, Ordering::SeqCst);
                self.publish_ready();
                if healthy {
                    self.failures.store(0, Ordering::SeqCst);
                    if !ever_ready {
                        self.logs.write(
                            &replica.id,
                            &format!("Ready after {:.3}s", started.elapsed().as_secs_f64()),
                        );
                    }
                } else {
                    self.logs.write(&replica.id, "Health check failed");
                }
            }
            ever_ready |= healthy;
            if !ever_ready && started.elapsed() > self.settings.ready_timeout {
                let _ = child.start_kill();
                return Err(format!(
                    "not ready within {}",
                    humantime::format_duration(self.settings.ready_timeout)
                ));
            }
            wait = if healthy {
                self.settings.health_interval
            } else {
                Duration::from_millis(50)
            };
        }
    }

    /// Whether `GET <health_path>` on the replica answers 2xx within 2 s.
    async fn healthy(&self, replica: &Upstream) -> bool {
        let check = Invocation {
            method: http::Method::GET,
            path: self.spec.health_path.clone(),
            query: None,
            headers: http::HeaderMap::new(),
            body: Body::empty(),
        };
        let deadline = Deadline::new(Duration::from_secs(2), None);
        match forward(&self.client, replica, None, check, deadline, ()).await {
            Ok(response) => {
                let ok = response.status().is_success();
                // Read the answer so the connection goes back to the pool.
                let _ = http_body_util::BodyExt::collect(response.into_body()).await;
                ok
            }
            Err(_) => false,
        }
    }

    /// Lets in-flight requests finish (bounded by `upstream_timeout`), then SIGTERM,
    /// then SIGKILL after 5 s.
    async fn drain_and_stop(&self, replica: &Replica, child: &mut tokio::process::Child) {
        replica.ready.store(false, Ordering::SeqCst);
        self.publish_ready();
        let drain_until = Instant::now() + self.settings.upstream_timeout;
        while replica.inflight.load(Ordering::SeqCst) > 0 && Instant::now() < drain_until {
            tokio::select! {
                _ = child.wait() => return,
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
        terminate(child, Duration::from_secs(5)).await;
        self.logs.write(&replica.id, "Stopped");
    }
}

/// SIGTERM, then SIGKILL when the process is still there after `grace`.
pub async fn terminate(child: &mut tokio::process::Child, grace: Duration) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
        if tokio::time::timeout(grace, child.wait()).await.is_ok() {
            return;
        }
    }
    let _ = child.kill().await;
}

/// A port nothing listens on right now, drawn at random below Linux's ephemeral range
/// (32768 and up), where the kernel hands out ports for `bind(0)` and outgoing
/// connections: a port from there could be taken by another server between this check and
/// the replica's own bind, and that server could then pass the replica's health check.
/// Another process may still take the port; the replica then fails to start and is
/// replaced on another one.
fn free_port() -> Option<u16> {
    use std::hash::{BuildHasher, Hasher};
    for _ in 0..64 {
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let port = 20_000 + u16::try_from(random % 12_000).unwrap_or(0);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Some(port);
        }
    }
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .ok()
}

/// `VmRSS` of a process, in bytes.
fn resident_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}
