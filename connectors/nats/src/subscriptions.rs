//! The set of subscriptions (core) or consumers (JetStream) a source runs, one task per
//! subject pattern, following the topic map.
//!
//! Each task forwards what it receives into one bounded channel, tagged with its pattern,
//! so the source reads a single stream and the bound is the backpressure: a task whose
//! send waits stops taking messages from its subscription. Removing a pattern cancels its
//! task (dropping the subscription unsubscribes).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;

use connector_sdk::SourceContext;
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::subject;

/// What a subscription task reports.
#[derive(Debug)]
pub enum Event<T> {
    /// A message received through `pattern`.
    Message {
        /// The pattern of the subscription or consumer that received it.
        pattern: Arc<str>,
        /// The message.
        item: T,
    },
    /// Subscribing or consuming failed; the task retries with backoff.
    Failed {
        /// The pattern.
        pattern: Arc<str>,
        /// What failed.
        error: String,
    },
    /// The task is consuming again after a failure.
    Recovered {
        /// The pattern.
        pattern: Arc<str>,
    },
}

/// Starts the task for one pattern: it sends into the sender until the token is cancelled.
pub type Starter<T> =
    Box<dyn Fn(Arc<str>, mpsc::Sender<Event<T>>, CancellationToken) + Send + Sync>;

/// The running tasks, by pattern.
pub struct Subscriptions<T> {
    active: BTreeMap<Arc<str>, DropGuard>,
    tx: mpsc::Sender<Event<T>>,
    rx: mpsc::Receiver<Event<T>>,
    start: Starter<T>,
}

impl<T: Send + 'static> Subscriptions<T> {
    /// No tasks yet; events are buffered up to `capacity`.
    pub fn new(capacity: usize, start: Starter<T>) -> Self {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        Self {
            active: BTreeMap::new(),
            tx,
            rx,
            start,
        }
    }

    /// Starts the tasks of new patterns and stops those of patterns no longer wanted.
    pub fn reconcile(&mut self, wanted: &BTreeSet<String>) {
        self.active.retain(|pattern, _| {
            let keep = wanted.contains(pattern.as_ref());
            if !keep {
                tracing::info!(subject = %pattern, "unsubscribing");
            }
            keep
        });
        for pattern in wanted {
            if !self.active.contains_key(pattern.as_str()) {
                tracing::info!(subject = %pattern, "subscribing");
                let pattern: Arc<str> = pattern.as_str().into();
                let token = CancellationToken::new();
                (self.start)(pattern.clone(), self.tx.clone(), token.clone());
                self.active.insert(pattern, token.drop_guard());
            }
        }
    }

    /// The patterns subscribed to now.
    pub fn patterns(&self) -> impl Iterator<Item = &str> {
        self.active.keys().map(|p| p.as_ref())
    }

    /// Whether `pattern` owns messages on `subject` (see [`subject::owner`]).
    pub fn owns(&self, pattern: &str, subject: &str) -> bool {
        if self.active.len() == 1 {
            // The common case, checked per message without matching: a message received
            // through the only pattern matches it, and one received through a pattern no
            // longer subscribed is owned by none.
            return self.active.contains_key(pattern);
        }
        subject::owner(self.patterns(), subject) == Some(pattern)
    }

    /// The next event (cancel-safe).
    pub async fn next(&mut self) -> Option<Event<T>> {
        self.rx.recv().await
    }

    /// An event if one is waiting.
    pub fn try_next(&mut self) -> Option<Event<T>> {
        self.rx.try_recv().ok()
    }

    /// Stops every task.
    pub fn clear(&mut self) {
        self.active.clear();
    }
}

/// The patterns to subscribe to now: the configured topics, else the topic map's, without
/// those that are not valid NATS patterns (logged).
pub fn wanted(ctx: &SourceContext) -> BTreeSet<String> {
    ctx.wanted_topics()
        .into_iter()
        .filter(|topic| match subject::validate_pattern(topic) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(topic = %topic, error = %e, "a function's topic is not a valid NATS subject; ignored");
                false
            }
        })
        .collect()
}

/// Runs `body` until `token` is cancelled.
pub fn spawn_until<F>(token: CancellationToken, body: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        tokio::select! {
            () = token.cancelled() => {}
            () = body => {}
        }
    });
}
