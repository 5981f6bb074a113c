//! The seam between a broker and the dispatcher: a [`Source`] pulls messages and settles
//! each one when its outcome is known; [`pump`] runs the loop between them.
//!
//! The loop, in priority order (`select!` with `biased`):
//!
//! 1. settle every completed message (ack, hold, release, or retry with broker retries,
//!    per its [`Disposition`]);
//! 2. on shutdown, stop pulling;
//! 3. pull a batch and submit each message, which waits while the dispatcher has no room
//!    (see [`Dispatcher::submit`](crate::Dispatcher::submit)): the source is not pulled
//!    while saturated, and what completes meanwhile is settled.
//!
//! After shutdown, messages still in flight are awaited (the harness cancels them after
//! `drain_timeout`, which releases them), each is settled, then [`Source::flush`] runs.
//! A message pulled but not yet submitted when shutdown came is settled as released.
//!
//! Pull errors are transient by contract: logged, counted by readiness, retried with
//! backoff. The loop never exits on a broker outage.
//!
//! Every connector goes through the same contract: [`Dispatcher::submit`] (or
//! `submit_to`) returns a [`Completion`]; once it resolves, the message's
//! [`Disposition`] decides how its ack handle is settled. [`pump`] settles in its own
//! loop. A source whose read loop cannot settle (Kafka: librdkafka's rebalance callback
//! runs inside the read loop and waits for the revoked partitions' deliveries to settle)
//! hands each completion with its ack handle to a [`Settler`], which settles on a task of
//! its own.
//!
//! [`Dispatcher::submit`]: crate::Dispatcher::submit

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::backoff::Backoff;
use crate::dispatcher::Completion;
use crate::message::{Disposition, Message, MessageOutcome};
use crate::runtime::SourceContext;

/// An error of a broker operation; transient unless the source says otherwise by
/// returning from `pull` with [`SourceError::Fatal`].
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Worth retrying: the broker is unreachable, a request failed.
    #[error("{0}")]
    Transient(String),
    /// Retrying cannot help (bad credentials, missing queue): the connector stops.
    #[error("{0}")]
    Fatal(String),
}

impl SourceError {
    /// A transient error from anything printable.
    pub fn transient(e: impl std::fmt::Display) -> Self {
        Self::Transient(e.to_string())
    }

    /// A fatal error from anything printable.
    pub fn fatal(e: impl std::fmt::Display) -> Self {
        Self::Fatal(e.to_string())
    }
}

/// A pull-based event source that acknowledges per message.
#[async_trait::async_trait]
pub trait Source: Send {
    /// What settling one message needs: an offset, an entry id, a receipt handle.
    type Ack: Send + 'static;

    /// Waits for the next messages. An empty batch (a long poll that timed out) is fine.
    ///
    /// Must be cancel-safe: [`pump`] drops the call whenever a completion is ready first
    /// (and on shutdown), then calls `pull` again. Whatever the source marks as taken
    /// (pulled, not to be handed out again) must be marked only after its last `.await`,
    /// or a dropped call loses those messages until a restart.
    async fn pull(&mut self) -> Result<Vec<(Message, Self::Ack)>, SourceError>;

    /// Settles one completed message: `Ack` acknowledges it, `Hold` keeps it with the
    /// broker (Kafka: stall the partition), `Release` gives it back for redelivery now,
    /// `Retry { after }` (only when the dispatcher runs with broker retries) has the broker
    /// redeliver it after `after`.
    async fn settle(
        &mut self,
        ack: Self::Ack,
        disposition: Disposition,
        outcome: &MessageOutcome,
    ) -> Result<(), SourceError>;

    /// Called once after the last settle on shutdown: flush batched acknowledgements.
    async fn flush(&mut self) -> Result<(), SourceError> {
        Ok(())
    }
}

pin_project_lite::pin_project! {
    /// A submitted message: its completion, with what settling it needs. A named future
    /// rather than a boxed one: no allocation per message.
    struct Pending<A> {
        ack: Option<A>,
        completion: Completion,
    }
}

impl<A> Future for Pending<A> {
    /// With the message's span (traces on), which its settling ends.
    type Output = (A, MessageOutcome, Option<opentelemetry::Context>);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let outcome = std::task::ready!(Pin::new(&mut *this.completion).poll(cx));
        match this.ack.take() {
            Some(ack) => Poll::Ready((ack, outcome, this.completion.take_trace())),
            // Polled again after it completed: FuturesUnordered never does that.
            None => Poll::Pending,
        }
    }
}

/// Runs `source` until shutdown: pulls, submits, settles; then drains and flushes.
/// Returns an error only when the source reports a fatal one.
pub async fn pump<S: Source>(ctx: &SourceContext, mut source: S) -> Result<(), SourceError> {
    let mut pending: FuturesUnordered<Pending<S::Ack>> = FuturesUnordered::new();
    let mut failures = Backoff {
        initial: Duration::from_millis(200),
        max: Duration::from_secs(30),
    }
    .attempts();
    ctx.health.set_source_ready(true);
    'pull: loop {
        tokio::select! {
            biased;
            Some((ack, outcome, trace)) = pending.next(), if !pending.is_empty() => {
                settle(&mut source, ack, &outcome, trace).await;
                // Settle the rest of what completed meanwhile before pulling again: every
                // turn of this loop builds a new `pull` future.
                while let Some(Some((ack, outcome, trace))) = pending.next().now_or_never() {
                    settle(&mut source, ack, &outcome, trace).await;
                }
            }
            () = ctx.shutdown.cancelled() => break 'pull,
            pulled = source.pull() => match pulled {
                Ok(batch) => {
                    if failures.failures() > 0 {
                        tracing::info!("source recovered");
                        ctx.health.set_source_ready(true);
                    }
                    failures.reset();
                    let mut batch = batch.into_iter();
                    while let Some((message, ack)) = batch.next() {
                        let submit = ctx.dispatcher.submit(message);
                        tokio::pin!(submit);
                        // While there is no room, completions are settled: each one wakes
                        // this task anyway, and settling them is what frees the room.
                        let submitted = loop {
                            tokio::select! {
                                biased;
                                () = ctx.shutdown.cancelled() => break None,
                                c = &mut submit => break c.ok(),
                                Some((ack, outcome, trace)) = pending.next(), if !pending.is_empty() => {
                                    settle(&mut source, ack, &outcome, trace).await;
                                }
                            }
                        };
                        match submitted {
                            Some(completion) => pending.push(Pending {
                                ack: Some(ack),
                                completion,
                            }),
                            None => {
                                // Shutdown while waiting for room: give back this message and
                                // the rest of the batch.
                                release(&mut source, ack).await;
                                for (_, ack) in batch.by_ref() {
                                    release(&mut source, ack).await;
                                }
                                break 'pull;
                            }
                        }
                    }
                }
                Err(SourceError::Fatal(e)) => {
                    ctx.health.set_source_ready(false);
                    drain(&mut source, &mut pending).await;
                    return Err(SourceError::Fatal(e));
                }
                Err(SourceError::Transient(e)) => {
                    ctx.health.set_source_ready(false);
                    let delay = failures.next_delay();
                    tracing::warn!(error = %e, failures = failures.failures(), retry_in = ?delay, "pulling from the source failed");
                    // Completions keep being settled while waiting to pull again.
                    let sleep = tokio::time::sleep(delay);
                    tokio::pin!(sleep);
                    loop {
                        tokio::select! {
                            biased;
                            Some((ack, outcome, trace)) = pending.next(), if !pending.is_empty() => {
                                settle(&mut source, ack, &outcome, trace).await;
                            }
                            () = ctx.shutdown.cancelled() => break 'pull,
                            () = &mut sleep => break,
                        }
                    }
                }
            },
        }
    }
    drain(&mut source, &mut pending).await;
    Ok(())
}

async fn drain<S: Source>(source: &mut S, pending: &mut FuturesUnordered<Pending<S::Ack>>) {
    if !pending.is_empty() {
        tracing::info!(in_flight = pending.len(), "waiting for in-flight messages");
    }
    while let Some((ack, outcome, trace)) = pending.next().await {
        settle(source, ack, &outcome, trace).await;
    }
    if let Err(e) = source.flush().await {
        tracing::error!(error = %e, "flushing acknowledgements failed; those messages will be redelivered");
    }
}

async fn settle<S: Source>(
    source: &mut S,
    ack: S::Ack,
    outcome: &MessageOutcome,
    trace: Option<opentelemetry::Context>,
) {
    let disposition = outcome.disposition();
    let settling = async {
        if let Err(e) = source.settle(ack, disposition, outcome).await {
            // The message stays with the broker and comes back: at-least-once holds.
            tracing::warn!(error = %e, ce_id = %outcome.id, ?disposition, "settling a message failed; it will be redelivered");
        }
    };
    crate::trace::acknowledged(trace, disposition.as_str(), settling).await;
}

async fn release<S: Source>(source: &mut S, ack: S::Ack) {
    let outcome = MessageOutcome {
        id: String::new(),
        deliveries: Vec::new(),
        interrupted: true,
        held_unmatched: false,
    };
    settle(source, ack, &outcome, None).await;
}

/// Settles completed messages on a task of its own, several at once: for sources whose
/// read loop cannot wait for completions (see the module docs). Each message is settled
/// by `settle(ack, outcome)` as soon as its [`Completion`] resolves; a message whose
/// completion is dropped unresolved (the dispatcher torn down) is settled as interrupted,
/// which releases it.
pub struct Settler<A> {
    tx: mpsc::UnboundedSender<Pending<A>>,
    task: JoinHandle<()>,
}

impl<A: Send + 'static> Settler<A> {
    /// Starts the settling task.
    pub fn spawn<F, Fut>(settle: F) -> Self
    where
        F: FnMut(A, MessageOutcome) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(settle_all(rx, settle));
        Self { tx, task }
    }

    /// Settles `ack` once `completion` resolves.
    pub fn push(&self, ack: A, completion: Completion) {
        let pending = Pending {
            ack: Some(ack),
            completion,
        };
        if self.tx.send(pending).is_err() {
            // The task is gone only if it panicked; nothing would settle the message.
            tracing::error!("the settling task is gone: the message stays unacknowledged");
        }
    }

    /// Waits until everything pushed is settled.
    pub async fn close(self) {
        drop(self.tx);
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "the settling task failed");
        }
    }
}

/// The settling task: receives submitted messages, settles each once complete, returns
/// when the sender is gone and nothing is left.
async fn settle_all<A, F, Fut>(mut rx: mpsc::UnboundedReceiver<Pending<A>>, mut settle: F)
where
    F: FnMut(A, MessageOutcome) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut pending: FuturesUnordered<Pending<A>> = FuturesUnordered::new();
    let mut settling = FuturesUnordered::new();
    let mut open = true;
    while open || !pending.is_empty() || !settling.is_empty() {
        tokio::select! {
            biased;
            Some(()) = settling.next(), if !settling.is_empty() => {}
            Some((ack, outcome, trace)) = pending.next(), if !pending.is_empty() => {
                let disposition = outcome.disposition().as_str();
                settling.push(crate::trace::acknowledged(trace, disposition, settle(ack, outcome)));
            }
            received = rx.recv(), if open => match received {
                Some(p) => pending.push(p),
                None => open = false,
            },
        }
    }
}
