//! The worker pool and the hand-off queue in front of it: how an admitted message gets
//! to a worker, and a worker's life.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use super::Inner;
use super::admission::Job;
use super::cancel::Cancel;

/// The workers that deliver messages, and the hand-off queue in front of them.
///
/// A worker takes one message at a time and stays alive between messages, so a delivery
/// costs neither a task spawn nor moving a task's state around. A message goes to an idle
/// worker, to a new worker (at most `max_inflight` of them), or into the queue; a worker
/// that finished takes the next message from the queue itself. While the source keeps
/// the queue supplied, no message costs a wake-up: workers never park, and a submitter
/// waiting for room is woken once the queue is down to half, not for every message. At
/// `max_inflight` 64 this is what brings the dispatcher close to a plain loop of HTTP
/// calls (see BENCHMARKS.md).
///
/// Invariants, under the state lock: a worker parks only when the queue is empty, and an
/// offered message goes to a parked worker before the queue, so there is never a parked
/// worker while messages wait. The queue is FIFO and lanes are entered in queue order, so
/// the oldest message a worker holds never waits for its lane: there is no deadlock
/// however few workers there are.
pub(super) struct Pool {
    state: Mutex<PoolState>,
    /// Submitters waiting for room in the queue.
    pub(super) room: tokio::sync::Notify,
}

struct PoolState {
    queue: VecDeque<Job>,
    /// How many messages the queue holds at most.
    capacity: usize,
    idle: Vec<Arc<Slot>>,
    /// Workers alive, idle or busy.
    workers: usize,
    max_workers: usize,
    closed: bool,
    /// A submitter found the queue full: wake submitters once it is down to half.
    waiting: bool,
}

/// What [`Pool::offer`] did with a job.
pub(super) enum Offer {
    Taken,
    /// No room; the job is given back.
    Full(Job),
    /// Draining: the job was dropped.
    Closed,
}

/// Where an idle worker waits for its next message; a wake-up without one means: look
/// at the queue (or exit, when the pool is closed).
#[derive(Default)]
struct Slot {
    job: Mutex<Option<Job>>,
    wake: tokio::sync::Notify,
}

/// What a worker does next.
enum Next {
    Run(Job),
    Park,
    Exit,
}

impl Pool {
    /// A pool of at most `max_workers` workers, with a queue of as many places. With
    /// half as many the dispatch bench's deliveries ran at 0.85 of the client loop
    /// instead of 0.94 (21 rounds each): workers found the queue empty before the
    /// source, woken at half, had refilled it.
    pub(super) fn new(max_workers: usize) -> Self {
        let capacity = max_workers.max(1);
        Self {
            state: Mutex::new(PoolState {
                // Grown on demand: `max_inflight` may be configured far above what is
                // ever queued.
                queue: VecDeque::new(),
                capacity,
                idle: Vec::new(),
                workers: 0,
                max_workers,
                closed: false,
                waiting: false,
            }),
            room: tokio::sync::Notify::new(),
        }
    }

    /// Hands `job` to an idle worker, a new worker or the queue, calling `placed` on it
    /// first (under the pool's lock, so jobs are placed in the order `placed` sees them).
    pub(super) fn offer(
        &self,
        inner: &Arc<Inner>,
        mut job: Job,
        placed: impl FnOnce(&mut Job),
    ) -> Offer {
        let Ok(mut state) = self.state.lock() else {
            // A worker panicked while holding the lock: run the job on a worker of its
            // own rather than lose it.
            placed(&mut job);
            spawn_worker(inner.clone(), Some(job));
            return Offer::Taken;
        };
        if state.closed {
            return Offer::Closed;
        }
        if let Some(slot) = state.idle.pop() {
            placed(&mut job);
            drop(state);
            match slot.job.lock() {
                Ok(mut next) => *next = Some(job),
                // Its worker panicked while holding this lock; start another instead.
                Err(_) => {
                    spawn_worker(inner.clone(), Some(job));
                    return Offer::Taken;
                }
            }
            slot.wake.notify_one();
            return Offer::Taken;
        }
        if state.workers < state.max_workers {
            state.workers += 1;
            placed(&mut job);
            drop(state);
            spawn_worker(inner.clone(), Some(job));
            return Offer::Taken;
        }
        if state.queue.len() < state.capacity {
            placed(&mut job);
            state.queue.push_back(job);
            return Offer::Taken;
        }
        state.waiting = true;
        Offer::Full(job)
    }

    /// The next job for a worker: from the queue, else park (`slot` is registered as
    /// idle), else exit when the pool is closed.
    fn next(&self, slot: &Arc<Slot>) -> Next {
        let Ok(mut state) = self.state.lock() else {
            return Next::Exit;
        };
        if let Some(job) = state.queue.pop_front() {
            let wake = state.waiting && state.queue.len() <= state.capacity / 2;
            if wake {
                state.waiting = false;
            }
            drop(state);
            if wake {
                self.room.notify_waiters();
            }
            return Next::Run(job);
        }
        if state.closed {
            return Next::Exit;
        }
        state.idle.push(slot.clone());
        Next::Park
    }

    /// Messages `offer` takes right now.
    pub(super) fn room_now(&self) -> usize {
        match self.state.lock() {
            Ok(state) if !state.closed => {
                state.idle.len()
                    + state.max_workers.saturating_sub(state.workers)
                    + (state.capacity - state.queue.len())
            }
            _ => 0,
        }
    }

    /// Refuses new jobs; idle workers exit, busy ones once their message is finished.
    /// Queued messages are finished at once on a task of their own: with the in-flight
    /// permits closed (drain), each is released without an invocation.
    pub(super) fn close(&self, inner: &Arc<Inner>) {
        let (idle, queued) = match self.state.lock() {
            Ok(mut state) => {
                state.closed = true;
                (
                    std::mem::take(&mut state.idle),
                    std::mem::take(&mut state.queue),
                )
            }
            Err(_) => return,
        };
        for slot in idle {
            slot.wake.notify_one();
        }
        self.room.notify_waiters();
        if queued.is_empty() {
            return;
        }
        // Without a runtime (dropped outside one) the jobs are dropped: their completions
        // resolve as interrupted, which releases the messages too.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let inner = inner.clone();
            runtime.spawn(async move {
                let cancel = Cancel::new(&inner);
                for job in queued {
                    inner.execute(&cancel, job).await;
                }
            });
        }
    }
}

/// Counts a worker out of the pool when it ends, even by a panic; then, if messages are
/// still queued, starts a worker for them.
struct Alive(Arc<Inner>);

impl Drop for Alive {
    fn drop(&mut self) {
        let Ok(mut state) = self.0.pool.state.lock() else {
            return;
        };
        if !state.queue.is_empty() && state.workers <= 1 {
            // The last worker ended with messages queued (a panic): keep them moving,
            // unless the runtime itself is going away.
            drop(state);
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(work(self.0.clone(), None));
            }
            return;
        }
        state.workers = state.workers.saturating_sub(1);
    }
}

/// Starts a worker, counted in the pool's `workers` by the caller; it runs `first`, then
/// whatever the queue holds, until the pool closes.
fn spawn_worker(inner: Arc<Inner>, first: Option<Job>) {
    tokio::spawn(work(inner, first));
}

/// A worker's life.
async fn work(inner: Arc<Inner>, first: Option<Job>) {
    let alive = Alive(inner);
    let inner = &alive.0;
    let slot = Arc::new(Slot::default());
    let cancel = Cancel::new(inner);
    if let Some(job) = first {
        inner.execute(&cancel, job).await;
    }
    loop {
        match inner.pool.next(&slot) {
            Next::Run(job) => inner.execute(&cancel, job).await,
            Next::Exit => return,
            Next::Park => {
                slot.wake.notified().await;
                let handed = slot.job.lock().ok().and_then(|mut next| next.take());
                if let Some(job) = handed {
                    inner.execute(&cancel, job).await;
                }
            }
        }
    }
}
