//! Publish-to-function latency through `nats-connector`, core and JetStream, against a
//! plain NATS client calling the same function, in one run (issue 23's added latency).
//!
//! ```text
//! cargo bench -p nats-connector --bench latency
//! ```
//!
//! Needs the nats-server with JetStream at `NATS_URL` (default `nats://127.0.0.1:4222`).
//! The no-op function runs in a child process (`connector_sdk::testing::load`) and keeps
//! each message's publish-to-arrival time. Messages are published at `BENCH_RATE` per
//! second (default 1,000) for `BENCH_SECONDS` (default 10), each path after a one-second
//! warm-up whose samples are dropped. For each mode (`BENCH_MODES`, default
//! `core,jetstream`):
//!
//! - **plain**: a client in this process: core, a subscription; JetStream, a durable
//!   pull consumer's message stream on a memory stream. Each message is posted to the
//!   function in a task of its own and, in JetStream, acknowledged after the call;
//! - **connector**: the release `nats-connector` binary with its defaults, on a subject
//!   (and, in JetStream, a stream) of its own.
//!
//! Printed per mode: samples, p50 and p99 of each path and their difference.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use async_nats::jetstream;
use connector_sdk::testing::load::{self, ConnectorProcess, NoopFunction, PlainInvoker};
use futures::StreamExt;

fn main() {
    load::main(bench);
}

fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

async fn bench() {
    let rate = load::env_or("BENCH_RATE", 1000);
    let seconds = load::env_or("BENCH_SECONDS", 10);
    let modes = std::env::var("BENCH_MODES").unwrap_or_else(|_| "core,jetstream".into());
    let nats = async_nats::connect(nats_url()).await.unwrap();
    let js = jetstream::new(nats.clone());
    for mode in modes.split(',') {
        let run = uuid::Uuid::new_v4().simple().to_string();
        let plain_subject = format!("latency.plain.{run}");
        let connector_subject = format!("latency.connector.{run}");
        let jetstream = mode == "jetstream";
        let streams = [
            format!("LATENCY_PLAIN_{run}"),
            format!("LATENCY_CONNECTOR_{run}"),
        ];
        if jetstream {
            for (name, subject) in streams.iter().zip([&plain_subject, &connector_subject]) {
                js.create_stream(jetstream::stream::Config {
                    name: name.clone(),
                    subjects: vec![subject.clone()],
                    storage: jetstream::stream::StorageType::Memory,
                    ..Default::default()
                })
                .await
                .unwrap();
            }
        }
        let function = NoopFunction::spawn(&connector_subject).unwrap();
        let invoker = PlainInvoker::new(&function.url()).unwrap();

        let reader = if jetstream {
            let stream = js.get_stream(&streams[0]).await.unwrap();
            let consumer = stream
                .create_consumer(jetstream::consumer::pull::Config {
                    durable_name: Some("plain".into()),
                    ..Default::default()
                })
                .await
                .unwrap();
            tokio::spawn(async move {
                let mut messages = consumer.messages().await.unwrap();
                while let Some(Ok(message)) = messages.next().await {
                    let invoker = invoker.clone();
                    tokio::spawn(async move {
                        invoker.invoke(message.payload.clone()).await.unwrap();
                        message.ack().await.unwrap();
                    });
                }
            })
        } else {
            let mut subscription = nats.subscribe(plain_subject.clone()).await.unwrap();
            tokio::spawn(async move {
                while let Some(message) = subscription.next().await {
                    let invoker = invoker.clone();
                    tokio::spawn(async move { invoker.invoke(message.payload).await.unwrap() });
                }
            })
        };
        let plain = measure(
            &function,
            &nats,
            &js,
            jetstream,
            &plain_subject,
            rate,
            seconds,
        )
        .await;
        reader.abort();

        let metrics = load::free_addr().unwrap();
        let config = format!(
            r#"[connector]
gateway_url = "{gateway}"
metrics_addr = "{metrics}"
topics = ["{connector_subject}"]

[nats]
url = "{url}"
mode = "{mode}"

[jetstream]
stream = "{stream}"
consumer = "bench"
"#,
            gateway = function.url(),
            url = nats_url(),
            stream = streams[1],
        );
        let connector =
            ConnectorProcess::start(env!("CARGO_BIN_EXE_nats-connector"), &config, metrics)
                .await
                .unwrap();
        let through = measure(
            &function,
            &nats,
            &js,
            jetstream,
            &connector_subject,
            rate,
            seconds,
        )
        .await;
        connector.stop().unwrap();
        if jetstream {
            for name in &streams {
                js.delete_stream(name).await.unwrap();
            }
        }
        println!("{mode}:\n");
        println!(
            "{}",
            load::latency_table(
                rate,
                seconds,
                &format!("plain {mode} client"),
                plain,
                through
            )
        );
    }
}

/// `rate` messages a second on `subject` (see [`load::latencies`]); in JetStream each
/// publish waits for the stream's confirmation.
async fn measure(
    function: &NoopFunction,
    nats: &async_nats::Client,
    js: &jetstream::Context,
    jetstream: bool,
    subject: &str,
    rate: u64,
    seconds: u64,
) -> Vec<u64> {
    let (nats, js, subject) = (nats.clone(), js.clone(), subject.to_owned());
    let publish = move |body: String| {
        let (nats, js, subject) = (nats.clone(), js.clone(), subject.clone());
        async move {
            if jetstream {
                match js.publish(subject, body.into()).await {
                    Ok(ack) => ack.await.is_ok(),
                    Err(_) => false,
                }
            } else {
                nats.publish(subject, body.into()).await.is_ok()
            }
        }
    };
    load::latencies(function, rate, seconds, publish)
        .await
        .unwrap()
}
