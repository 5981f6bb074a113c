//! Produce-to-function latency through `kafka-connector` against a plain librdkafka
//! consumer calling the same function, in one run (issue 23's added latency).
//!
//! ```text
//! cargo bench -p kafka-connector --bench latency
//! ```
//!
//! Needs a Kafka at `KAFKA_BROKERS` (default `127.0.0.1:9092`; scripts/test.sh starts
//! tansu there). The no-op function runs in a child process
//! (`connector_sdk::testing::load`) and keeps each record's produce-to-arrival time.
//! Records are produced at `BENCH_RATE` per second (default 1,000) for `BENCH_SECONDS`
//! (default 10), one partition, each path after a one-second warm-up whose samples are
//! dropped:
//!
//! - **plain**: a `StreamConsumer` in this process with the connector's own consumer
//!   settings (`fetch.queue.backoff.ms` 10, `queued.min.messages` 10,000), each record
//!   posted to the function in a task of its own, offsets committed every second;
//! - **connector**: the release `kafka-connector` binary with its defaults, on a topic
//!   of its own.
//!
//! `BENCH_FETCH_WAIT_MS`, when set, is librdkafka's `fetch.wait.max.ms` on both paths
//! (tansu answers a fetch with nothing new only after it; the default is 500).
//!
//! Printed: samples, p50 and p99 of each path and their difference.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use connector_sdk::testing::load::{self, ConnectorProcess, NoopFunction, PlainInvoker};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message};

fn main() {
    load::main(bench);
}

fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

async fn bench() {
    let rate = load::env_or("BENCH_RATE", 1000);
    let seconds = load::env_or("BENCH_SECONDS", 10);
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros();
    let plain_topic = format!("latency-plain-{run}");
    let connector_topic = format!("latency-connector-{run}");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    for topic in [&plain_topic, &connector_topic] {
        for created in admin
            .create_topics(
                &[NewTopic::new(topic, 1, TopicReplication::Fixed(1))],
                &AdminOptions::new(),
            )
            .await
            .unwrap()
        {
            created.unwrap();
        }
    }
    // As the throughput bench: one record per produce batch (tansu 0.6 answers a fetch
    // inside a batch with the next batch), sent at once.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("batch.num.messages", "1")
        .set("linger.ms", "0")
        .create()
        .unwrap();
    let function = NoopFunction::spawn(&connector_topic).unwrap();

    let fetch_wait = std::env::var("BENCH_FETCH_WAIT_MS").ok();
    let mut plain_config = ClientConfig::new();
    if let Some(ms) = &fetch_wait {
        plain_config.set("fetch.wait.max.ms", ms);
    }
    let consumer: StreamConsumer = plain_config
        .set("bootstrap.servers", brokers())
        .set("group.id", format!("plain-{run}"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("queued.min.messages", "10000")
        .set("fetch.queue.backoff.ms", "10")
        .create()
        .unwrap();
    consumer.subscribe(&[&plain_topic]).unwrap();
    let invoker = PlainInvoker::new(&function.url()).unwrap();
    let reader = tokio::spawn(async move {
        let mut last_commit = std::time::Instant::now();
        loop {
            let record = consumer.recv().await.unwrap();
            let body = record.payload().unwrap_or_default().to_vec();
            let invoker = invoker.clone();
            tokio::spawn(async move { invoker.invoke(body).await.unwrap() });
            if last_commit.elapsed() >= Duration::from_secs(1) {
                let _ = consumer.commit_message(&record, CommitMode::Async);
                last_commit = std::time::Instant::now();
            }
        }
    });
    let plain = measure(&function, &producer, &plain_topic, rate, seconds).await;
    reader.abort();

    let metrics = load::free_addr().unwrap();
    let config = format!(
        r#"[connector]
gateway_url = "{gateway}"
metrics_addr = "{metrics}"
topics = ["{connector_topic}"]

[kafka]
brokers = "{brokers}"
group = "connector-{run}"
{properties}"#,
        gateway = function.url(),
        brokers = brokers(),
        properties = fetch_wait
            .map(|ms| format!("\n[kafka.properties]\n\"fetch.wait.max.ms\" = \"{ms}\"\n"))
            .unwrap_or_default(),
    );
    let connector =
        ConnectorProcess::start(env!("CARGO_BIN_EXE_kafka-connector"), &config, metrics)
            .await
            .unwrap();
    let through = measure(&function, &producer, &connector_topic, rate, seconds).await;
    connector.stop().unwrap();
    let _ = admin
        .delete_topics(&[&plain_topic, &connector_topic], &AdminOptions::new())
        .await;
    println!(
        "{}",
        load::latency_table(rate, seconds, "plain librdkafka consumer", plain, through)
    );
}

/// `rate` records a second to `topic` (see [`load::latencies`]).
async fn measure(
    function: &NoopFunction,
    producer: &FutureProducer,
    topic: &str,
    rate: u64,
    seconds: u64,
) -> Vec<u64> {
    let (producer, topic) = (producer.clone(), topic.to_owned());
    let publish = move |body: String| {
        let (producer, topic) = (producer.clone(), topic.clone());
        async move {
            producer
                .send(
                    FutureRecord::<(), _>::to(&topic).payload(&body),
                    Duration::from_secs(30),
                )
                .await
                .is_ok()
        }
    };
    load::latencies(function, rate, seconds, publish)
        .await
        .unwrap()
}
