//! One function's concurrency limit (`connector.max_inflight`, `connector.adaptive`).
//!
//! Two bounds. *Admission*: at most twice the limit of the function's messages (for a
//! function that takes batches of `size`, the limit plus one times `size`: a batch in
//! every running place and one filling) are inside the dispatcher at once (running, or waiting for a worker or for the limit); a source
//! submitting one more waits for its function alone, so a function at its limit never
//! fills the dispatcher's queue and workers and the other functions' messages keep
//! flowing. *Running*: at most `limit` invocations at once (a batch is one invocation).
//!
//! Adaptive mode is additive increase, multiplicative decrease: a 429 halves the limit
//! (never below one), and every `limit` successes in a row raise it by one, up to the
//! configured maximum; a busy function is not hammered with retries, and gets its
//! concurrency back once it copes.

use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// A function's limiter. Shared by its deliveries.
#[derive(Debug)]
pub(crate) struct Limiter {
    max: usize,
    adaptive: bool,
    batch: usize,
    state: Mutex<State>,
    freed: Notify,
    admission: Arc<Semaphore>,
}

#[derive(Debug)]
struct State {
    limit: usize,
    running: usize,
    successes: usize,
}

/// One running invocation's place under the limit; freed when dropped.
#[derive(Debug)]
pub(crate) struct Running(Arc<Limiter>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.lock().running -= 1;
        self.0.freed.notify_one();
    }
}

impl Limiter {
    /// A limiter of `max` (at least one), adaptive or fixed, for a function that takes
    /// batches of `batch` messages (1: one message per invocation).
    pub(crate) fn new(max: usize, adaptive: bool, batch: usize) -> Arc<Self> {
        let max = max.clamp(1, Semaphore::MAX_PERMITS / 2);
        let admitted = (max + 1)
            .saturating_mul(batch.max(1))
            .max(max * 2)
            .min(Semaphore::MAX_PERMITS);
        Arc::new(Self {
            max,
            adaptive,
            batch,
            state: Mutex::new(State {
                limit: max,
                running: 0,
                successes: 0,
            }),
            freed: Notify::new(),
            admission: Arc::new(Semaphore::new(admitted)),
        })
    }

    /// Whether this limiter was made for these settings.
    pub(crate) fn fits(&self, max: usize, adaptive: bool, batch: usize) -> bool {
        self.max == max.clamp(1, Semaphore::MAX_PERMITS / 2)
            && self.adaptive == adaptive
            && self.batch == batch
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a message may be admitted without waiting.
    pub(crate) fn has_room(&self) -> bool {
        self.admission.available_permits() > 0
    }

    /// Waits for a place among the function's admitted messages.
    pub(crate) async fn admit(&self) -> OwnedSemaphorePermit {
        loop {
            // The semaphore is never closed; a failure would only mean it was.
            if let Ok(permit) = self.admission.clone().acquire_owned().await {
                return permit;
            }
        }
    }

    /// Waits for a place under the current limit. Cancel-safe.
    pub(crate) async fn run(self: &Arc<Self>) -> Running {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut s = self.lock();
                if s.running < s.limit {
                    s.running += 1;
                    return Running(self.clone());
                }
            }
            freed.await;
        }
    }

    /// The function answered 429: in adaptive mode, halve the limit.
    pub(crate) fn throttled(&self) {
        if !self.adaptive {
            return;
        }
        let mut s = self.lock();
        let limit = (s.limit / 2).max(1);
        if limit < s.limit {
            tracing::info!(
                limit,
                was = s.limit,
                "function throttled (429): concurrency lowered"
            );
        }
        s.limit = limit;
        s.successes = 0;
    }

    /// The function accepted an invocation: in adaptive mode, every `limit` successes in
    /// a row raise the limit by one.
    pub(crate) fn succeeded(&self) {
        if !self.adaptive {
            return;
        }
        let raised = {
            let mut s = self.lock();
            if s.limit >= self.max {
                return;
            }
            s.successes += 1;
            if s.successes < s.limit {
                return;
            }
            s.successes = 0;
            s.limit += 1;
            true
        };
        if raised {
            self.freed.notify_one();
        }
    }

    /// The limit in force.
    #[cfg(test)]
    pub(crate) fn limit(&self) -> usize {
        self.lock().limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn running_never_exceeds_the_limit_and_a_freed_place_is_taken() {
        let l = Limiter::new(2, false, 1);
        let a = l.run().await;
        let _b = l.run().await;
        let third = tokio::spawn({
            let l = l.clone();
            async move { l.run().await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!third.is_finished(), "a third ran past a limit of two");
        drop(a);
        let _c = tokio::time::timeout(Duration::from_secs(1), third)
            .await
            .expect("the freed place was not taken")
            .unwrap();
    }

    #[tokio::test]
    async fn admission_holds_twice_the_limit() {
        let l = Limiter::new(3, false, 1);
        let mut admitted = Vec::new();
        for _ in 0..6 {
            admitted.push(l.admit().await);
        }
        assert!(!l.has_room());
        admitted.pop();
        assert!(l.has_room());
    }

    #[tokio::test]
    async fn a_batch_function_admits_a_batch_per_running_place_and_one_filling() {
        let l = Limiter::new(2, false, 10);
        let mut admitted = Vec::new();
        for _ in 0..30 {
            admitted.push(l.admit().await);
        }
        assert!(!l.has_room(), "more than (2 + 1) x 10 admitted");
        admitted.pop();
        assert!(l.has_room());
    }

    #[test]
    fn adaptive_halves_on_429_and_grows_back_by_one_per_limit_of_successes() {
        let l = Limiter::new(8, true, 1);
        l.throttled();
        assert_eq!(l.limit(), 4);
        l.throttled();
        l.throttled();
        l.throttled();
        assert_eq!(l.limit(), 1, "never below one");
        l.succeeded();
        assert_eq!(l.limit(), 2);
        l.succeeded();
        assert_eq!(l.limit(), 2, "two successes at a limit of two");
        l.succeeded();
        assert_eq!(l.limit(), 3);
        for _ in 0..100 {
            l.succeeded();
        }
        assert_eq!(l.limit(), 8, "never above the maximum");
        let fixed = Limiter::new(4, false, 1);
        fixed.throttled();
        assert_eq!(fixed.limit(), 4, "a fixed limit does not move");
    }
}
