//! A worker's cancellation: its drain and abort tokens, and the cheap abort signal its
//! invocations watch.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering as AtomicOrdering};
use std::task::{Context, Poll};

use tokio_util::sync::CancellationToken;

use super::Inner;

/// A worker's own children of the dispatcher's drain and abort tokens, and its abort
/// signal. Checking or awaiting a token locks its node; with one node per worker,
/// deliveries on both runtime threads do not contend for the dispatcher's. The tokens
/// serve the rare waits (lanes, backoff, dead letters); the invocation, on every
/// delivery, watches the cheaper signal.
pub(super) struct Cancel {
    pub(super) drain: CancellationToken,
    pub(super) abort: CancellationToken,
    pub(super) signal: Arc<AbortSignal>,
    /// Set on the task of a message that left its worker: told as each of its batch
    /// deliveries takes its place.
    pub(super) handoff: Option<Arc<Handoff>>,
}

impl Cancel {
    pub(super) fn new(inner: &Inner) -> Self {
        let signal = register_signal(inner);
        // `abort` cancels its token before it fires the listed signals: one of the two
        // reaches this worker.
        let abort = inner.abort.child_token();
        if abort.is_cancelled() {
            signal.fire();
        }
        Self {
            drain: inner.drain.child_token(),
            abort,
            signal,
            handoff: None,
        }
    }

    /// For the task of a message that left `worker`, which `handoff` lets go on: the
    /// worker's tokens (shared, not new children: one per message would cost a node in
    /// the dispatcher's token tree each), and an abort signal of its own, since a signal
    /// wakes one waiting invocation.
    pub(super) fn detached(worker: &Cancel, inner: &Inner, handoff: Arc<Handoff>) -> Self {
        let signal = register_signal(inner);
        if worker.abort.is_cancelled() {
            signal.fire();
        }
        Self {
            drain: worker.drain.clone(),
            abort: worker.abort.clone(),
            signal,
            handoff: Some(handoff),
        }
    }
}

/// A new abort signal, listed for [`Dispatcher::abort`](super::Dispatcher::abort).
fn register_signal(inner: &Inner) -> Arc<AbortSignal> {
    let signal = Arc::new(AbortSignal::default());
    {
        if let Ok(mut signals) = inner.signals.lock() {
            // Those of workers (and detached messages) that ended are held by this list
            // alone. Swept when the list is full rather than on every registration: a
            // detached message registers one, thousands may be alive, and a sweep per
            // registration cost as much as the rest of the message.
            if signals.len() == signals.capacity() {
                signals.retain(|s| Arc::strong_count(s) > 1);
            }
            signals.push(signal.clone());
        }
    }
    signal
}

/// A message handed from its worker to a task of its own because some of its deliveries
/// go to functions that take batches: the worker waits until each of those has its
/// place in its batcher (or the message is finished), so the worker bounds how fast
/// messages enter, and the batchers' places how many wait in batches.
pub(super) struct Handoff {
    left: AtomicUsize,
    ready: tokio::sync::Notify,
}

impl Handoff {
    /// A hand-off waiting for `deliveries` places.
    pub(super) fn new(deliveries: usize) -> Self {
        Self {
            left: AtomicUsize::new(deliveries),
            ready: tokio::sync::Notify::new(),
        }
    }

    /// One delivery has its place.
    pub(super) fn placed(&self) {
        let was = self
            .left
            .fetch_update(AtomicOrdering::AcqRel, AtomicOrdering::Acquire, |n| {
                n.checked_sub(1)
            });
        if was == Ok(1) {
            self.ready.notify_waiters();
        }
    }

    /// The message is finished (or could not place everything): the worker goes on.
    pub(super) fn finished(&self) {
        self.left.store(0, AtomicOrdering::Release);
        self.ready.notify_waiters();
    }

    /// Until every delivery has its place, or the message is finished (or its task
    /// ended by a panic: [`FinishOnDrop`]).
    pub(super) async fn wait(&self) {
        loop {
            let ready = self.ready.notified();
            tokio::pin!(ready);
            ready.as_mut().enable();
            if self.left.load(AtomicOrdering::Acquire) == 0 {
                return;
            }
            ready.await;
        }
    }
}

/// Interrupts the invocation a worker is running when the dispatcher aborts: a flag and
/// a waker, which an invocation polls for two atomic operations. A cancellation token's
/// `cancelled()` locks a mutex on every poll, and to register and unregister its waiter:
/// about 400 instructions per delivery (callgrind, dispatch bench).
#[derive(Default)]
pub(super) struct AbortSignal {
    aborted: AtomicBool,
    waker: futures::task::AtomicWaker,
}

impl AbortSignal {
    pub(super) fn fire(&self) {
        self.aborted.store(true, AtomicOrdering::Release);
        self.waker.wake();
    }
}

/// Tells a [`Handoff`] the message is finished when dropped, however its task ends.
pub(super) struct FinishOnDrop(pub(super) Arc<Handoff>);

impl Drop for FinishOnDrop {
    fn drop(&mut self) {
        self.0.finished();
    }
}

pin_project_lite::pin_project! {
    /// `inner`'s output, or `None` once the signal fired.
    pub(super) struct UntilAborted<'a, F> {
        pub(super) signal: &'a AbortSignal,
        #[pin]
        pub(super) inner: F,
    }
}

impl<F: Future> Future for UntilAborted<'_, F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if this.signal.aborted.load(AtomicOrdering::Acquire) {
            return Poll::Ready(None);
        }
        this.signal.waker.register(cx.waker());
        // Fired between the first look and the registration: its wake-up went elsewhere.
        if this.signal.aborted.load(AtomicOrdering::Acquire) {
            return Poll::Ready(None);
        }
        this.inner.poll(cx).map(Some)
    }
}
