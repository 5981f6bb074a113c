//! Settling messages with SQS, in batches, and keeping in-flight messages invisible.
//!
//! Every received message holds a [`Lease`] until it is settled. The heartbeat renews the
//! visibility of leases older than a quarter of the visibility timeout, so a message is
//! renewed at the latest halfway through its visibility: long invocations are never
//! redelivered meanwhile, and if the process dies SQS redelivers the message one
//! visibility timeout after its last renewal at most. (Retries do not hold a lease: a
//! retrying message is settled with its backoff delay as its visibility.)
//!
//! Settlements go through one task that batches them per queue and operation
//! (DeleteMessageBatch, ChangeMessageVisibilityBatch, 10 entries each) over a short window,
//! and retries the entries a batch reports as failed. A delete that fails for good only
//! means the message comes back: at-least-once holds.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::MAX_BATCH;
use crate::metrics::{AckOp, SqsMetrics};

/// How long settlements are gathered before their batch requests go out.
const LINGER: Duration = Duration::from_millis(20);
/// Tries of one entry before it is given up (the message then comes back by itself).
const TRIES: u32 = 3;

/// One received message as SQS knows it.
#[derive(Debug)]
pub struct Receipt {
    /// The queue URL.
    pub queue: Arc<str>,
    /// The receipt handle of this receive.
    pub handle: String,
    /// SQS's ApproximateReceiveCount for this receive.
    pub receive_count: u32,
    lease: u64,
}

#[derive(Debug)]
struct Lease {
    queue: Arc<str>,
    handle: String,
    renewed: Instant,
}

/// What to do with a settled message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Settlement {
    /// Delete it.
    Delete,
    /// Make it visible again after this many seconds (0: now).
    Visible(i32),
}

/// The leases and the settle channel; cheap to clone.
#[derive(Clone, Debug)]
pub struct Acker {
    leases: Arc<Mutex<HashMap<u64, Lease>>>,
    next: Arc<AtomicU64>,
    tx: mpsc::Sender<(Receipt, Settlement)>,
}

/// The background tasks of an [`Acker`], stopped by [`AckerTasks::finish`].
#[derive(Debug)]
pub struct AckerTasks {
    settler: JoinHandle<()>,
    heartbeat: Option<JoinHandle<()>>,
    stop_heartbeat: CancellationToken,
}

impl Acker {
    /// Starts the settle task, and the heartbeat when `heartbeat` is on.
    pub fn start(
        client: Client,
        visibility: Duration,
        heartbeat: bool,
        metrics: SqsMetrics,
    ) -> (Self, AckerTasks) {
        let (tx, rx) = mpsc::channel(1024);
        let acker = Self {
            leases: Arc::new(Mutex::new(HashMap::new())),
            next: Arc::new(AtomicU64::new(0)),
            tx,
        };
        let stop_heartbeat = CancellationToken::new();
        let settler = tokio::spawn(settle_loop(client.clone(), rx, metrics.clone()));
        let heartbeat = heartbeat.then(|| {
            tokio::spawn(heartbeat_loop(
                client,
                acker.leases.clone(),
                visibility,
                metrics,
                stop_heartbeat.clone(),
            ))
        });
        (
            acker,
            AckerTasks {
                settler,
                heartbeat,
                stop_heartbeat,
            },
        )
    }

    /// Takes a lease on a message just received.
    pub fn lease(&self, queue: Arc<str>, handle: String, receive_count: u32) -> Receipt {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut leases) = self.leases.lock() {
            leases.insert(
                id,
                Lease {
                    queue: queue.clone(),
                    handle: handle.clone(),
                    renewed: Instant::now(),
                },
            );
        }
        Receipt {
            queue,
            handle,
            receive_count,
            lease: id,
        }
    }

    /// Ends the message's lease and queues its settlement. Errors only when the settle
    /// task is gone (then the message comes back after its visibility timeout).
    pub async fn settle(&self, receipt: Receipt, settlement: Settlement) -> Result<(), String> {
        if let Ok(mut leases) = self.leases.lock() {
            leases.remove(&receipt.lease);
        }
        self.tx
            .send((receipt, settlement))
            .await
            .map_err(|_| "the settle task has stopped".to_owned())
    }
}

impl AckerTasks {
    /// Waits until every settlement queued before all [`Acker`] clones were dropped is
    /// done, then stops the heartbeat.
    pub async fn finish(self) {
        if let Err(e) = self.settler.await {
            tracing::error!(error = %e, "the settle task failed");
        }
        self.stop_heartbeat.cancel();
        if let Some(heartbeat) = self.heartbeat {
            let _ = heartbeat.await;
        }
    }
}

/// One batch request's worth of entries for one queue and operation.
type Key = (Arc<str>, Settlement);

async fn settle_loop(
    client: Client,
    mut rx: mpsc::Receiver<(Receipt, Settlement)>,
    metrics: SqsMetrics,
) {
    while let Some(first) = rx.recv().await {
        let mut groups: HashMap<Key, Vec<Receipt>> = HashMap::new();
        let mut add = |(receipt, settlement): (Receipt, Settlement)| {
            groups
                .entry((receipt.queue.clone(), settlement))
                .or_default()
                .push(receipt);
        };
        add(first);
        let deadline = tokio::time::Instant::now() + LINGER;
        while let Ok(Some(next)) = tokio::time::timeout_at(deadline, rx.recv()).await {
            add(next);
        }
        for ((queue, settlement), receipts) in groups {
            for chunk in receipts.chunks(MAX_BATCH as usize) {
                let handles: Vec<&str> = chunk.iter().map(|r| r.handle.as_str()).collect();
                match settlement {
                    Settlement::Delete => delete(&client, &queue, &handles, &metrics).await,
                    Settlement::Visible(secs) => {
                        let op = if secs == 0 {
                            AckOp::Release
                        } else {
                            AckOp::RetryLater
                        };
                        change_visibility(&client, &queue, &handles, secs, op, &metrics).await;
                    }
                }
            }
        }
    }
}

/// DeleteMessageBatch, retrying the entries that failed.
async fn delete(client: &Client, queue: &str, handles: &[&str], metrics: &SqsMetrics) {
    let mut pending: Vec<(usize, &str)> = handles.iter().copied().enumerate().collect();
    for try_no in 1..=TRIES {
        let entries: Vec<DeleteMessageBatchRequestEntry> = pending
            .iter()
            .filter_map(|(i, h)| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(*h)
                    .build()
                    .ok()
            })
            .collect();
        let result = client
            .delete_message_batch()
            .queue_url(queue)
            .set_entries(Some(entries))
            .send()
            .await;
        match result {
            Ok(out) => {
                let failed: Vec<String> = out.failed.iter().map(|f| f.id.clone()).collect();
                let permanent = out.failed.iter().filter(|f| f.sender_fault).count();
                metrics.acked(AckOp::Delete, true, (pending.len() - failed.len()) as u64);
                if failed.is_empty() {
                    return;
                }
                if permanent > 0 {
                    tracing::warn!(queue, failed = permanent, reason = ?out.failed.first().map(|f| f.code.clone()), "SQS refused to delete messages (receipt expired?); they will be redelivered");
                    metrics.acked(AckOp::Delete, false, permanent as u64);
                }
                let retry: std::collections::HashSet<String> = out
                    .failed
                    .iter()
                    .filter(|f| !f.sender_fault)
                    .map(|f| f.id.clone())
                    .collect();
                pending.retain(|(i, _)| retry.contains(&i.to_string()));
                if pending.is_empty() {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(queue, try_no, error = %crate::queue::describe(&e), "DeleteMessageBatch failed");
            }
        }
        if try_no < TRIES {
            tokio::time::sleep(Duration::from_millis(200 << try_no)).await;
        }
    }
    metrics.acked(AckOp::Delete, false, pending.len() as u64);
    tracing::warn!(
        queue,
        messages = pending.len(),
        "deleting messages failed; they will be redelivered after their visibility timeout"
    );
}

/// ChangeMessageVisibilityBatch, retrying the entries that failed.
async fn change_visibility(
    client: &Client,
    queue: &str,
    handles: &[&str],
    secs: i32,
    op: AckOp,
    metrics: &SqsMetrics,
) {
    let mut pending: Vec<(usize, &str)> = handles.iter().copied().enumerate().collect();
    for try_no in 1..=TRIES {
        let entries: Vec<ChangeMessageVisibilityBatchRequestEntry> = pending
            .iter()
            .filter_map(|(i, h)| {
                ChangeMessageVisibilityBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(*h)
                    .visibility_timeout(secs)
                    .build()
                    .ok()
            })
            .collect();
        let result = client
            .change_message_visibility_batch()
            .queue_url(queue)
            .set_entries(Some(entries))
            .send()
            .await;
        match result {
            Ok(out) => {
                metrics.acked(op, true, (pending.len() - out.failed.len()) as u64);
                let retry: std::collections::HashSet<String> = out
                    .failed
                    .iter()
                    .filter(|f| !f.sender_fault)
                    .map(|f| f.id.clone())
                    .collect();
                let permanent = out.failed.len() - retry.len();
                if permanent > 0 {
                    metrics.acked(op, false, permanent as u64);
                }
                pending.retain(|(i, _)| retry.contains(&i.to_string()));
                if pending.is_empty() {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(queue, try_no, error = %crate::queue::describe(&e), "ChangeMessageVisibilityBatch failed");
            }
        }
        if try_no < TRIES {
            tokio::time::sleep(Duration::from_millis(200 << try_no)).await;
        }
    }
    metrics.acked(op, false, pending.len() as u64);
    tracing::warn!(
        queue,
        messages = pending.len(),
        visibility_secs = secs,
        "changing visibility failed; the messages come back after their current visibility timeout"
    );
}

async fn heartbeat_loop(
    client: Client,
    leases: Arc<Mutex<HashMap<u64, Lease>>>,
    visibility: Duration,
    metrics: SqsMetrics,
    stop: CancellationToken,
) {
    let tick = visibility / 4;
    let secs = i32::try_from(visibility.as_secs()).unwrap_or(i32::MAX);
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = interval.tick() => {}
        }
        let now = Instant::now();
        let mut due: HashMap<Arc<str>, Vec<String>> = HashMap::new();
        if let Ok(mut leases) = leases.lock() {
            for lease in leases.values_mut() {
                if now.duration_since(lease.renewed) >= tick {
                    lease.renewed = now;
                    due.entry(lease.queue.clone())
                        .or_default()
                        .push(lease.handle.clone());
                }
            }
        }
        for (queue, handles) in due {
            for chunk in handles.chunks(MAX_BATCH as usize) {
                let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
                change_visibility(&client, &queue, &refs, secs, AckOp::Heartbeat, &metrics).await;
            }
        }
    }
}
