//! Response subscribers: every invocation result, passed through bounded channels.
//!
//! A subscriber that falls behind loses results (counted in
//! `connector_response_subscriber_dropped_total`); it can never slow delivery down, unlike
//! OpenFaaS's unbuffered response channel. OpenFaaS's `print_response` and
//! `print_response_body` are a built-in subscriber, [`print_responses`].

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::function::FunctionRef;
use crate::message::InvocationResponse;
use crate::metrics::Metrics;

/// One invocation attempt's result.
#[derive(Debug, Clone)]
pub struct InvocationResult {
    /// The topic of the message.
    pub topic: String,
    /// The message's `ce-id`.
    pub message_id: String,
    /// The function invoked.
    pub function: FunctionRef,
    /// Attempt number (1-based, the broker's earlier deliveries included).
    pub attempt: u32,
    /// How long the attempt took.
    pub duration: Duration,
    /// The response, when one arrived.
    pub response: Option<Arc<InvocationResponse>>,
    /// Why no response arrived.
    pub error: Option<String>,
}

/// The set of subscribers; the dispatcher offers each result to all of them.
#[derive(Clone, Default, Debug)]
pub struct Subscribers {
    senders: Vec<mpsc::Sender<Arc<InvocationResult>>>,
}

impl Subscribers {
    /// Adds a subscriber with a buffer of `capacity` results and returns its receiver.
    pub fn subscribe(&mut self, capacity: usize) -> mpsc::Receiver<Arc<InvocationResult>> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        self.senders.push(tx);
        rx
    }

    /// Whether anyone listens.
    pub fn is_empty(&self) -> bool {
        self.senders.is_empty()
    }

    /// Offers `result` to every subscriber without waiting.
    pub(crate) fn publish(&self, result: InvocationResult, metrics: &Metrics) {
        if self.senders.is_empty() {
            return;
        }
        let result = Arc::new(result);
        for tx in &self.senders {
            if tx.try_send(result.clone()).is_err() {
                metrics.response_dropped();
            }
        }
    }
}

/// Logs each result as OpenFaaS's `ResponsePrinter` does, with the body when `with_body`.
/// Runs until every sender is gone.
pub async fn print_responses(mut rx: mpsc::Receiver<Arc<InvocationResult>>, with_body: bool) {
    while let Some(r) = rx.recv().await {
        match (&r.response, &r.error) {
            (Some(resp), _) => {
                let body = if with_body {
                    String::from_utf8_lossy(&resp.body).into_owned()
                } else {
                    String::new()
                };
                tracing::info!(
                    topic = %r.topic,
                    function = %r.function,
                    status = resp.status.as_u16(),
                    bytes = resp.body.len(),
                    attempt = r.attempt,
                    duration_ms = r.duration.as_millis() as u64,
                    body = %body,
                    "got result"
                );
            }
            (None, error) => {
                tracing::info!(
                    topic = %r.topic,
                    function = %r.function,
                    attempt = r.attempt,
                    error = error.as_deref().unwrap_or("unknown"),
                    "got error"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(n: u32) -> InvocationResult {
        InvocationResult {
            topic: "t".into(),
            message_id: n.to_string(),
            function: FunctionRef::new("f", None),
            attempt: n,
            duration: Duration::ZERO,
            response: None,
            error: None,
        }
    }

    #[tokio::test]
    async fn a_full_subscriber_loses_results_instead_of_blocking() {
        let (metrics, registry) = Metrics::standalone("t");
        let mut subs = Subscribers::default();
        let mut slow = subs.subscribe(2);
        let mut fast = subs.subscribe(10);
        for n in 0..5 {
            subs.publish(result(n), &metrics);
        }
        let mut got = Vec::new();
        while let Ok(r) = slow.try_recv() {
            got.push(r.attempt);
        }
        assert_eq!(got, [0, 1]);
        let mut fast_count = 0;
        while fast.try_recv().is_ok() {
            fast_count += 1;
        }
        assert_eq!(fast_count, 5);
        assert!(
            crate::metrics::encode(&registry)
                .contains("connector_response_subscriber_dropped_total 3")
        );
    }
}
