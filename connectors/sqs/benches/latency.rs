//! Send-to-function latency through `sqs-connector` against a plain SQS client calling the
//! same function, in one run (issue 23's added latency), on moto's server.
//!
//! ```text
//! cargo bench -p sqs-connector --bench latency
//! ```
//!
//! Needs an SQS endpoint at `SQS_ENDPOINT` (default `http://127.0.0.1:4566`, moto's server
//! as scripts/test.sh starts it). The no-op function runs in a child process
//! (`connector_sdk::testing::load`) and keeps each message's SendMessage-to-arrival time.
//! Messages are sent at `BENCH_RATE` per second (default 20) for `BENCH_SECONDS`
//! (default 30), each path after a one-second warm-up whose samples are dropped. Not
//! 1,000 per second as for the other brokers: moto receives and deletes about 60
//! messages a second with no connector at all (see BENCHMARKS.md), and at 200 a second
//! both paths queue for over 20 s behind it, which measures moto's queue, not a client.
//!
//! - **plain**: two long-polling receivers in this process (as the connector's default
//!   `pollers`), `ReceiveMessage` of up to 10 with a 20 s wait; each message posted to
//!   the function (those of one receive concurrently), then one `DeleteMessageBatch`;
//! - **connector**: the release `sqs-connector` binary with its defaults, on a queue of
//!   its own.
//!
//! Printed: samples, p50 and p99 of each path and their difference. With `BENCH_AA=1`
//! the plain path runs a second time after the connector (on a fresh queue), and its
//! difference from the first run is printed too: how far the bench's figures move with
//! nothing changed, the noise the connector's difference is to be read against.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::DeleteMessageBatchRequestEntry;
use connector_sdk::testing::load::{self, ConnectorProcess, NoopFunction, PlainInvoker};
use support::{create_queue, endpoint};

fn main() {
    load::main(bench);
}

async fn bench() {
    let rate = load::env_or("BENCH_RATE", 20);
    let seconds = load::env_or("BENCH_SECONDS", 30);
    let sqs = support::client().await;
    let run = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    );
    let plain_queue = format!("latency-plain-{run}");
    let connector_queue = format!("latency-connector-{run}");
    let plain_url = create_queue(&sqs, &plain_queue).await;
    let connector_url = create_queue(&sqs, &connector_queue).await;
    let function = NoopFunction::spawn(&connector_queue).unwrap();

    let invoker = PlainInvoker::new(&function.url()).unwrap();
    let plain = plain_run(&function, &sqs, &invoker, &plain_url, rate, seconds).await;

    let metrics = load::free_addr().unwrap();
    let config = format!(
        r#"[connector]
gateway_url = "{gateway}"
metrics_addr = "{metrics}"

[sqs]
queues = ["{connector_queue}"]
endpoint_url = "{endpoint}"
region = "us-east-1"
access_key_id = "test"
secret_access_key = "test"
"#,
        gateway = function.url(),
        endpoint = endpoint(),
    );
    let connector = ConnectorProcess::start(env!("CARGO_BIN_EXE_sqs-connector"), &config, metrics)
        .await
        .unwrap();
    let through = measure(&function, &sqs, &connector_url, rate, seconds).await;
    connector.stop().unwrap();
    for url in [&plain_url, &connector_url] {
        sqs.delete_queue().queue_url(url).send().await.unwrap();
    }
    // The bench's own noise: the plain path once more, after the connector, on a queue
    // of its own, against its first run (an A/B/A order).
    let again = if load::env_or("BENCH_AA", 0) == 1 {
        let url = create_queue(&sqs, &format!("latency-again-{run}")).await;
        let again = plain_run(&function, &sqs, &invoker, &url, rate, seconds).await;
        sqs.delete_queue().queue_url(&url).send().await.unwrap();
        Some(again)
    } else {
        None
    };
    println!(
        "{}",
        load::latency_table(rate, seconds, "plain SQS client", plain.clone(), through)
    );
    if let Some(again) = again {
        println!(
            "{}",
            load::latency_comparison(
                rate,
                seconds,
                ("plain SQS client, first run", plain),
                ("plain SQS client, again after the connector", again),
                "the plain client against itself",
            )
        );
    }
}

/// The plain client's two receive loops on `url` while `rate` messages a second go in.
async fn plain_run(
    function: &NoopFunction,
    sqs: &Client,
    invoker: &PlainInvoker,
    url: &str,
    rate: u64,
    seconds: u64,
) -> Vec<u64> {
    let receivers: Vec<_> = (0..2)
        .map(|_| tokio::spawn(receive(sqs.clone(), url.to_owned(), invoker.clone())))
        .collect();
    let latencies = measure(function, sqs, url, rate, seconds).await;
    for r in receivers {
        r.abort();
    }
    latencies
}

/// `rate` messages a second to `url` (see [`load::latencies`]).
async fn measure(
    function: &NoopFunction,
    sqs: &Client,
    url: &str,
    rate: u64,
    seconds: u64,
) -> Vec<u64> {
    let (sqs, url) = (sqs.clone(), url.to_owned());
    let publish = move |body: String| {
        let (sqs, url) = (sqs.clone(), url.clone());
        async move {
            sqs.send_message()
                .queue_url(url)
                .message_body(body)
                .send()
                .await
                .is_ok()
        }
    };
    load::latencies(function, rate, seconds, publish)
        .await
        .unwrap()
}

/// Receives from `url` in a loop, posts each body to the function, deletes what it got.
async fn receive(sqs: Client, url: String, invoker: PlainInvoker) {
    loop {
        let received = sqs
            .receive_message()
            .queue_url(&url)
            .max_number_of_messages(10)
            .wait_time_seconds(20)
            .send()
            .await
            .unwrap();
        let messages = received.messages.unwrap_or_default();
        let mut calls = tokio::task::JoinSet::new();
        for m in &messages {
            let body = m.body.clone().unwrap_or_default();
            let invoker = invoker.clone();
            calls.spawn(async move { invoker.invoke(body).await.unwrap() });
        }
        while let Some(call) = calls.join_next().await {
            call.unwrap();
        }
        let entries: Vec<_> = messages
            .iter()
            .enumerate()
            .filter_map(|(i, m)| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(m.receipt_handle.clone()?)
                    .build()
                    .ok()
            })
            .collect();
        if !entries.is_empty() {
            sqs.delete_message_batch()
                .queue_url(&url)
                .set_entries(Some(entries))
                .send()
                .await
                .unwrap();
        }
    }
}
