//! Consuming: pollers long-poll each queue and hand batches to [`SqsSource`], which the
//! SDK's `pump` drives; settling maps each message's disposition to SQS.
//!
//! Why pollers: `pump` drops `pull()` whenever a completion is settled, and a
//! ReceiveMessage dropped mid-flight would hide the messages SQS picked for it until their
//! visibility timeout. So each ReceiveMessage runs to completion in its own task, and
//! `pull()` is a receive from a small bounded channel, which is cancel-safe. Each poller
//! takes a channel slot before it receives, so while the dispatcher is saturated (`pull()`
//! not called) the slots stay full and nothing more is received; messages waiting in the
//! channel keep their leases renewed by the heartbeat.
//!
//! | disposition | SQS |
//! | --- | --- |
//! | Ack | DeleteMessageBatch |
//! | Release (shutdown; or queued behind a FIFO message that was not acknowledged) | visibility 0: redelivered now |
//! | Retry (an attempt failed, attempts remain) | visibility = the backoff delay: redelivered then, even if this process died |
//! | Hold (failed for good, no dead-letter queue) | visibility = backoff for its receive count: redelivered later, moved by the redrive policy after `maxReceiveCount` |
//!
//! FIFO order: messages of one group share an ordering lane with strict release, so a
//! message that is not acknowledged releases the ones queued behind it, and its group
//! stays blocked until it is received again (or its retry delay plus a grace period
//! passed): messages of the group handed over a moment after it failed (the rest of the
//! same receive) are released at once as well. Real SQS does not return a group's later
//! messages while an earlier one is in flight, so nothing else can overtake it.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::MessageSystemAttributeName;
use connector_sdk::backoff::Backoff;
use connector_sdk::{Disposition, Message, MessageOutcome, Source, SourceError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::acker::{Acker, AckerTasks, Receipt, Settlement};
use crate::config::{MAX_VISIBILITY, SqsConfig};
use crate::metrics::SqsMetrics;
use crate::queue::Queue;

/// Header names set on every invocation (besides the SDK's own).
pub mod headers {
    /// The SQS message id (also `ce-id`).
    pub const MESSAGE_ID: &str = "X-SQS-Message-ID";
    /// The queue's URL.
    pub const QUEUE_URL: &str = "X-SQS-Queue-URL";
    /// ApproximateReceiveCount: 1 on the first receive.
    pub const RECEIVE_COUNT: &str = "X-SQS-Receive-Count";
    /// The MessageGroupId of a FIFO message.
    pub const GROUP_ID: &str = "X-SQS-Message-Group-ID";
    /// Prefix of each String or Number message attribute: `X-SQS-Attr-<name>`.
    pub const ATTRIBUTE_PREFIX: &str = "X-SQS-Attr-";
}

type Batch = Result<Vec<(Message, Receipt)>, SourceError>;

/// The SQS side of `pump`.
pub struct SqsSource {
    rx: mpsc::Receiver<Batch>,
    acker: Option<Acker>,
    acker_tasks: Option<AckerTasks>,
    pollers: TaskTracker,
    stop_pollers: CancellationToken,
    backoff: Backoff,
}

/// How the pollers read messages.
#[derive(Debug, Clone)]
pub struct PollSettings {
    /// Long-poll seconds.
    pub wait_secs: i32,
    /// Messages per receive.
    pub max_messages: i32,
    /// Visibility timeout seconds.
    pub visibility_secs: i32,
    /// Message attribute naming the topic.
    pub topic_attribute: Option<String>,
}

impl PollSettings {
    /// From the `[sqs]` section.
    pub fn new(config: &SqsConfig) -> Self {
        let secs = |d: Duration| i32::try_from(d.as_secs()).unwrap_or(i32::MAX);
        Self {
            wait_secs: secs(config.wait_time),
            max_messages: config.max_messages,
            visibility_secs: secs(config.visibility_timeout),
            topic_attribute: config.topic_attribute.clone(),
        }
    }
}

impl SqsSource {
    /// Starts `pollers` receive loops per queue. They stop on `shutdown` (or at `flush`).
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        client: Client,
        queues: &[Queue],
        pollers: usize,
        settings: PollSettings,
        acker: Acker,
        acker_tasks: AckerTasks,
        metrics: SqsMetrics,
        backoff: Backoff,
        shutdown: &CancellationToken,
    ) -> Self {
        let (tx, rx) = mpsc::channel(pollers.max(1));
        let tracker = TaskTracker::new();
        let stop = shutdown.child_token();
        for queue in queues {
            let queue = Arc::new(queue.clone());
            for _ in 0..pollers {
                tracker.spawn(poll(Poller {
                    client: client.clone(),
                    queue: queue.clone(),
                    url: Arc::from(queue.url.as_str()),
                    settings: settings.clone(),
                    acker: acker.clone(),
                    tx: tx.clone(),
                    metrics: metrics.clone(),
                    stop: stop.clone(),
                }));
            }
        }
        tracker.close();
        Self {
            rx,
            acker: Some(acker),
            acker_tasks: Some(acker_tasks),
            pollers: tracker,
            stop_pollers: stop,
            backoff,
        }
    }

    async fn settle_as(&self, receipt: Receipt, settlement: Settlement) -> Result<(), SourceError> {
        match &self.acker {
            Some(acker) => acker
                .settle(receipt, settlement)
                .await
                .map_err(SourceError::transient),
            None => Err(SourceError::transient("settled after flush")),
        }
    }
}

#[async_trait::async_trait]
impl Source for SqsSource {
    type Ack = Receipt;

    async fn pull(&mut self) -> Result<Vec<(Message, Receipt)>, SourceError> {
        match self.rx.recv().await {
            Some(batch) => batch,
            // Every poller stopped: only at shutdown, which `pump` is about to see.
            None => std::future::pending().await,
        }
    }

    async fn settle(
        &mut self,
        receipt: Receipt,
        disposition: Disposition,
        _outcome: &MessageOutcome,
    ) -> Result<(), SourceError> {
        let settlement = match disposition {
            Disposition::Ack => Settlement::Delete,
            Disposition::Release => Settlement::Visible(0),
            Disposition::Hold => {
                Settlement::Visible(retry_delay(&self.backoff, receipt.receive_count))
            }
            Disposition::Retry { after } => Settlement::Visible(visibility_secs(after)),
        };
        self.settle_as(receipt, settlement).await
    }

    async fn flush(&mut self) -> Result<(), SourceError> {
        self.stop_pollers.cancel();
        self.pollers.wait().await;
        // Batches received but never pulled go back to the queue.
        self.rx.close();
        while let Some(batch) = self.rx.recv().await {
            for (_, receipt) in batch.unwrap_or_default() {
                self.settle_as(receipt, Settlement::Visible(0)).await?;
            }
        }
        self.acker = None;
        if let Some(tasks) = self.acker_tasks.take() {
            tasks.finish().await;
        }
        Ok(())
    }
}

/// How long a failed message stays invisible before SQS redelivers it: the connector's
/// backoff ceiling for its receive count, in whole seconds from 1 s to 12 h.
fn retry_delay(backoff: &Backoff, receive_count: u32) -> i32 {
    let d = backoff.ceiling(receive_count.max(1));
    let secs = d
        .as_secs_f64()
        .ceil()
        .clamp(1.0, MAX_VISIBILITY.as_secs_f64());
    secs as i32
}

/// A retry delay as a visibility timeout: whole seconds, rounded up (so a retry never comes
/// back sooner than asked), at most 12 h.
fn visibility_secs(after: Duration) -> i32 {
    let secs = after
        .as_secs_f64()
        .ceil()
        .clamp(0.0, MAX_VISIBILITY.as_secs_f64());
    secs as i32
}

struct Poller {
    client: Client,
    queue: Arc<Queue>,
    url: Arc<str>,
    settings: PollSettings,
    acker: Acker,
    tx: mpsc::Sender<Batch>,
    metrics: SqsMetrics,
    stop: CancellationToken,
}

/// One receive loop. It takes a slot in the channel to `pump` before each
/// ReceiveMessage, so while `pump` is saturated (not pulling) every slot is full and
/// nothing more is received: at most `pollers` batches wait beyond the dispatcher.
/// A failed receive is reported to `pump` (readiness goes 503) and retried with backoff;
/// the first success after it reports an empty batch so readiness comes back.
async fn poll(p: Poller) {
    let mut failures = Backoff {
        initial: Duration::from_millis(200),
        max: Duration::from_secs(30),
    }
    .attempts();
    loop {
        let permit = tokio::select! {
            biased;
            () = p.stop.cancelled() => return,
            permit = p.tx.reserve() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        let request = p
            .client
            .receive_message()
            .queue_url(p.url.as_ref())
            .max_number_of_messages(p.settings.max_messages)
            .wait_time_seconds(p.settings.wait_secs)
            .visibility_timeout(p.settings.visibility_secs)
            // Only the system attributes `convert` reads: smaller answers to build and parse.
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
            .message_system_attribute_names(MessageSystemAttributeName::MessageGroupId)
            .message_attribute_names("All")
            .send();
        // Dropping a long poll at shutdown may hide the messages SQS picked for it until
        // their visibility timeout; waiting up to `wait_time` instead would delay every
        // shutdown.
        let received = tokio::select! {
            () = p.stop.cancelled() => return,
            r = request => r,
        };
        match received {
            Ok(out) => {
                let messages = out.messages.unwrap_or_default();
                p.metrics.receive(messages.len() as u64);
                let recovered = failures.failures() > 0;
                failures.reset();
                if messages.is_empty() && !recovered {
                    continue;
                }
                permit.send(Ok(messages
                    .into_iter()
                    .filter_map(|m| {
                        convert(
                            &p.queue,
                            &p.url,
                            p.settings.topic_attribute.as_deref(),
                            &p.acker,
                            m,
                        )
                    })
                    .collect()));
            }
            Err(e) => {
                let error = crate::queue::describe(&e);
                let delay = failures.next_delay();
                tracing::warn!(queue = %p.queue.name, error = %error, retry_in = ?delay, "ReceiveMessage failed");
                permit.send(Err(SourceError::Transient(format!(
                    "ReceiveMessage on {}: {error}",
                    p.queue.name
                ))));
                tokio::select! {
                    () = p.stop.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// One SQS message as the dispatcher sees it.
fn convert(
    queue: &Queue,
    url: &Arc<str>,
    topic_attribute: Option<&str>,
    acker: &Acker,
    m: aws_sdk_sqs::types::Message,
) -> Option<(Message, Receipt)> {
    let handle = m.receipt_handle?;
    let system = m.attributes.unwrap_or_default();
    let receive_count: u32 = system
        .get(&MessageSystemAttributeName::ApproximateReceiveCount)
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let receipt = acker.lease(url.clone(), handle, receive_count);
    let id = m.message_id.unwrap_or_default();
    let attributes = m.message_attributes.unwrap_or_default();
    let topic = topic_attribute
        .and_then(|name| attributes.get(name))
        .and_then(|v| v.string_value.clone())
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| queue.name.clone());
    let group = system
        .get(&MessageSystemAttributeName::MessageGroupId)
        .cloned();
    let mut message = Message::new(
        topic,
        m.body.unwrap_or_default().into_bytes(),
        id.clone(),
        format!("sqs://{}", queue.name),
    )
    .with_coordinate("queue", &queue.url)
    .with_coordinate("message-id", &id)
    .with_coordinate("receive-count", receive_count)
    .with_prior_attempts(receive_count.saturating_sub(1));
    if let Some(ms) = system
        .get(&MessageSystemAttributeName::SentTimestamp)
        .and_then(|v| v.parse::<u64>().ok())
    {
        message = message.with_time(UNIX_EPOCH + Duration::from_millis(ms));
    } else {
        message = message.with_time(SystemTime::now());
    }
    message.add_header(headers::MESSAGE_ID, &id);
    message.add_header(headers::QUEUE_URL, &queue.url);
    message.add_header(headers::RECEIVE_COUNT, &receive_count.to_string());
    if let Some(group) = group {
        message.add_header(headers::GROUP_ID, &group);
        // Per queue: two FIFO queues may use the same group ids.
        let key = format!("{}\n{group}", queue.url);
        message = message
            .with_coordinate("message-group-id", &group)
            .with_ordering_key(key.into_bytes());
    }
    // W3C trace context in `traceparent`/`tracestate` attributes: the message's trace
    // (connector-sdk's `trace`), sent as the invocation's own `traceparent`, not also as
    // `X-SQS-Attr-traceparent`.
    let trace_attribute = |field: &str| {
        attributes
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(field))
            .and_then(|(_, v)| v.string_value.as_deref())
    };
    if let Some(traceparent) = trace_attribute("traceparent") {
        message.set_trace_context(
            traceparent.as_bytes(),
            trace_attribute("tracestate").map(str::as_bytes),
        );
    }
    let mut names: Vec<&String> = attributes.keys().collect();
    names.sort();
    for name in names {
        if name.eq_ignore_ascii_case("traceparent") || name.eq_ignore_ascii_case("tracestate") {
            continue;
        }
        let Some(value) = attributes.get(name).and_then(|v| v.string_value.as_deref()) else {
            continue; // Binary attributes are not forwarded.
        };
        if name.eq_ignore_ascii_case("content-type") {
            message = message.with_content_type(value);
        }
        message.add_header(&format!("{}{name}", headers::ATTRIBUTE_PREFIX), value);
    }
    Some((message, receipt))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use aws_sdk_sqs::config::{BehaviorVersion, Region};
    use aws_sdk_sqs::types::MessageAttributeValue;

    use super::*;
    use crate::acker::Acker;

    fn acker() -> (Acker, AckerTasks) {
        let config = aws_sdk_sqs::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .build();
        Acker::start(
            Client::from_conf(config),
            Duration::from_secs(30),
            false,
            SqsMetrics::default(),
        )
    }

    fn queue(name: &str) -> Queue {
        Queue {
            name: name.into(),
            url: format!("http://127.0.0.1:4566/000000000000/{name}"),
            fifo: name.ends_with(".fifo"),
            redrive_policy: None,
        }
    }

    fn string(v: &str) -> MessageAttributeValue {
        MessageAttributeValue::builder()
            .data_type("String")
            .string_value(v)
            .build()
            .unwrap()
    }

    fn sqs_message(
        group: Option<&str>,
        attributes: &[(&str, &str)],
    ) -> aws_sdk_sqs::types::Message {
        let mut system = HashMap::from([
            (
                MessageSystemAttributeName::ApproximateReceiveCount,
                "3".to_owned(),
            ),
            (
                MessageSystemAttributeName::SentTimestamp,
                "1700000000000".to_owned(),
            ),
        ]);
        if let Some(group) = group {
            system.insert(MessageSystemAttributeName::MessageGroupId, group.to_owned());
        }
        aws_sdk_sqs::types::Message::builder()
            .message_id("m-1")
            .receipt_handle("r-1")
            .body("hello")
            .set_attributes(Some(system))
            .set_message_attributes(Some(
                attributes
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), string(v)))
                    .collect(),
            ))
            .build()
    }

    #[tokio::test]
    async fn a_message_carries_its_coordinates_and_attributes() {
        let (acker, _tasks) = acker();
        let q = queue("orders.fifo");
        let url: Arc<str> = Arc::from(q.url.as_str());
        let m = sqs_message(
            Some("g1"),
            &[("tenant", "acme"), ("content-type", "application/json")],
        );
        let (message, receipt) = convert(&q, &url, None, &acker, m).unwrap();
        assert_eq!(message.topic, "orders.fifo");
        assert_eq!(message.id, "m-1");
        assert_eq!(message.payload.as_ref(), b"hello");
        assert_eq!(message.prior_attempts, 2);
        assert_eq!(
            message.ordering_key.as_deref(),
            Some(format!("{}\ng1", q.url).as_bytes())
        );
        assert_eq!(
            message.time,
            Some(UNIX_EPOCH + Duration::from_millis(1_700_000_000_000))
        );
        assert_eq!(
            message.content_type.as_ref().map(|v| v.as_bytes()),
            Some(&b"application/json"[..])
        );
        let h = |name: &str| {
            message
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        assert_eq!(h("x-sqs-message-id").as_deref(), Some("m-1"));
        assert_eq!(h("x-sqs-queue-url").as_deref(), Some(q.url.as_str()));
        assert_eq!(h("x-sqs-receive-count").as_deref(), Some("3"));
        assert_eq!(h("x-sqs-message-group-id").as_deref(), Some("g1"));
        assert_eq!(h("x-sqs-attr-tenant").as_deref(), Some("acme"));
        assert_eq!(receipt.handle, "r-1");
        assert_eq!(receipt.receive_count, 3);
    }

    #[tokio::test]
    async fn the_topic_attribute_routes_and_falls_back_to_the_queue() {
        let (acker, _tasks) = acker();
        let q = queue("inbox");
        let url: Arc<str> = Arc::from(q.url.as_str());
        let routed = sqs_message(None, &[("Topic", "billing")]);
        let (message, _) = convert(&q, &url, Some("Topic"), &acker, routed).unwrap();
        assert_eq!(message.topic, "billing");
        assert!(message.ordering_key.is_none());
        let plain = sqs_message(None, &[("Topic", "")]);
        let (message, _) = convert(&q, &url, Some("Topic"), &acker, plain).unwrap();
        assert_eq!(message.topic, "inbox");
    }

    #[test]
    fn retry_delay_follows_the_backoff_within_sqs_limits() {
        let backoff = Backoff {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(60),
        };
        assert_eq!(retry_delay(&backoff, 0), 1);
        assert_eq!(retry_delay(&backoff, 1), 1);
        assert_eq!(retry_delay(&backoff, 4), 4);
        assert_eq!(retry_delay(&backoff, 30), 60);
        let huge = Backoff {
            initial: Duration::from_secs(3600),
            max: Duration::from_secs(100_000),
        };
        assert_eq!(retry_delay(&huge, 10), 43_200);
    }

    #[test]
    fn a_retry_delay_becomes_whole_seconds_never_shorter() {
        assert_eq!(visibility_secs(Duration::ZERO), 0);
        assert_eq!(visibility_secs(Duration::from_millis(1)), 1);
        assert_eq!(visibility_secs(Duration::from_millis(2_000)), 2);
        assert_eq!(visibility_secs(Duration::from_millis(2_001)), 3);
        assert_eq!(visibility_secs(Duration::from_secs(100_000)), 43_200);
    }
}
