//! An event loop polled by a task of its own: keep-alives and acknowledgements go out
//! while the pump waits for room in the dispatcher. What matters reaches the reader as a
//! [`Signal`]; a lost connection is reported and reconnected with backoff.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use connector_sdk::backoff::Backoff;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::link::{Event, Events, LinkError, Publish};

/// What the driving task hands on.
#[derive(Debug)]
pub enum Signal {
    /// Connected (again); `session_present` when the broker resumed the session (its
    /// subscriptions are in place).
    Connected { session_present: bool },
    /// The broker acknowledged a subscription.
    Subscribed,
    /// A message, received on connection `epoch`.
    Publish(Publish, u64),
    /// The connection was lost; the task reconnects.
    Lost(LinkError),
    /// A subscription was refused.
    Refused(String),
}

/// An event loop polled by a task: its signals, and which connection is current.
pub struct Driver {
    /// Signals, in order.
    pub rx: mpsc::Receiver<Signal>,
    /// Changes on every connect and every loss: a PUBACK is sent only on the connection
    /// its message came on. After a reconnect the broker sends the unacknowledged
    /// messages again with their packet ids, so an acknowledgement from the older
    /// connection could hit another message that reused the id.
    epoch: Arc<AtomicU64>,
    /// Stops the task when the driver is dropped.
    stop: DropGuard,
    task: JoinHandle<()>,
}

impl Driver {
    /// Polls `events` in a task; `capacity` bounds the signals waiting; `acknowledged`
    /// runs for each PUBACK written to the broker.
    pub fn spawn(events: Events, capacity: usize, acknowledged: Acknowledged) -> Self {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let epoch = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let task = tokio::spawn(drive(events, tx, epoch.clone(), stop.clone(), acknowledged));
        Self {
            rx,
            epoch,
            stop: stop.drop_guard(),
            task,
        }
    }

    /// Whether messages of connection `epoch` may still be acknowledged.
    pub fn current(&self, epoch: u64) -> bool {
        self.epoch.load(Ordering::SeqCst) == epoch
    }

    /// Waits up to `within` for the task to see our DISCONNECT go out, then stops it.
    pub async fn finish(self, within: Duration) {
        let mut task = self.task;
        let stop = self.stop.disarm();
        if tokio::time::timeout(within, &mut task).await.is_err() {
            stop.cancel();
            let _ = task.await;
        }
    }
}

/// Told of each PUBACK written to the broker.
pub type Acknowledged = Box<dyn Fn() + Send + Sync>;

async fn drive(
    mut events: Events,
    tx: mpsc::Sender<Signal>,
    epoch: Arc<AtomicU64>,
    stop: CancellationToken,
    acknowledged: Acknowledged,
) {
    let mut failures = Backoff {
        initial: Duration::from_millis(200),
        max: Duration::from_secs(30),
    }
    .attempts();
    loop {
        let event = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            event = events.poll() => event,
        };
        let signal = match event {
            Ok(Event::Connected { session_present }) => {
                failures.reset();
                epoch.fetch_add(1, Ordering::SeqCst);
                Signal::Connected { session_present }
            }
            Ok(Event::Publish(p)) => Signal::Publish(p, epoch.load(Ordering::SeqCst)),
            Ok(Event::Subscribed) => Signal::Subscribed,
            Ok(Event::Refused(why)) => Signal::Refused(why),
            Ok(Event::Disconnected) => return,
            Ok(Event::Acknowledged) => {
                acknowledged();
                continue;
            }
            Ok(_) => continue,
            Err(e) => {
                epoch.fetch_add(1, Ordering::SeqCst);
                let fatal = e.fatal;
                // Dropped when the channel is full: the reader learns of it soon enough.
                let _ = tx.try_send(Signal::Lost(e));
                if fatal {
                    return;
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(failures.next_delay()) => continue,
                }
            }
        };
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            sent = tx.send(signal) => if sent.is_err() { return },
        }
    }
}
