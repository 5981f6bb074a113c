//! Publish-to-function latency through `redis-connector` against a plain Redis client
//! calling the same function, in one run (issue 23's added latency).
//!
//! ```text
//! cargo bench -p redis-connector --bench latency
//! ```
//!
//! Needs the Redis at `REDIS_URL` (default `redis://127.0.0.1:6379`). The no-op function
//! runs in a child process (`connector_sdk::testing::load`) and keeps each message's
//! XADD-to-arrival time. Entries are added at `BENCH_RATE` per second (default 1,000)
//! for `BENCH_SECONDS` (default 10), each path after a one-second warm-up whose samples
//! are dropped:
//!
//! - **plain**: a consumer-group reader in this process: `XREADGROUP ... COUNT 100
//!   BLOCK 2000 STREAMS s >`, each entry's `payload` posted to the function (the entries
//!   of one read concurrently), then one `XACK` for the read;
//! - **connector**: the release `redis-connector` binary with its defaults (`batch_size`
//!   100, `block` 2 s), on a stream of its own.
//!
//! Printed: samples, p50 and p99 of each path and their difference.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use connector_sdk::testing::load::{self, ConnectorProcess, NoopFunction, PlainInvoker};
use redis::AsyncCommands;
use redis::streams::{StreamReadOptions, StreamReadReply};

fn main() {
    load::main(bench);
}

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

async fn bench() {
    let rate = load::env_or("BENCH_RATE", 1000);
    let seconds = load::env_or("BENCH_SECONDS", 10);
    let redis = redis::Client::open(redis_url()).unwrap();
    let conn = redis.get_multiplexed_async_connection().await.unwrap();
    let run = uuid::Uuid::new_v4().simple().to_string();
    let plain_stream = format!("latency-plain-{run}");
    let connector_stream = format!("latency-connector-{run}");
    let function = NoopFunction::spawn(&connector_stream).unwrap();

    // The plain client.
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&plain_stream)
        .arg("plain")
        .arg("$")
        .arg("MKSTREAM")
        .query_async(&mut conn.clone())
        .await
        .unwrap();
    let reader = tokio::spawn(plain_reader(
        redis.clone(),
        plain_stream.clone(),
        PlainInvoker::new(&function.url()).unwrap(),
    ));
    let plain = measure(&function, &conn, &plain_stream, rate, seconds).await;
    reader.abort();

    // The connector.
    let metrics = load::free_addr().unwrap();
    let config = format!(
        r#"[connector]
gateway_url = "{gateway}"
metrics_addr = "{metrics}"
topics = ["{connector_stream}"]

[redis]
url = "{url}"
group = "bench"
start_id = "$"
body_field = "payload"
"#,
        gateway = function.url(),
        url = redis_url(),
    );
    let connector =
        ConnectorProcess::start(env!("CARGO_BIN_EXE_redis-connector"), &config, metrics)
            .await
            .unwrap();
    let through = measure(&function, &conn, &connector_stream, rate, seconds).await;
    connector.stop().unwrap();
    for stream in [&plain_stream, &connector_stream] {
        let _: () = conn.clone().del(stream).await.unwrap();
    }
    println!(
        "{}",
        load::latency_table(rate, seconds, "plain XREADGROUP client", plain, through)
    );
}

/// `rate` entries a second on `stream` (see [`load::latencies`]).
async fn measure(
    function: &NoopFunction,
    conn: &redis::aio::MultiplexedConnection,
    stream: &str,
    rate: u64,
    seconds: u64,
) -> Vec<u64> {
    let (conn, stream) = (conn.clone(), stream.to_owned());
    let publish = move |body: String| {
        let (mut conn, stream) = (conn.clone(), stream.clone());
        async move {
            conn.xadd::<_, _, _, _, String>(&stream, "*", &[("payload", body)])
                .await
                .is_ok()
        }
    };
    load::latencies(function, rate, seconds, publish)
        .await
        .unwrap()
}

/// Reads `stream` as group `plain`, posts each entry's payload to the function, acks.
async fn plain_reader(redis: redis::Client, stream: String, invoker: PlainInvoker) {
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    let options = StreamReadOptions::default()
        .group("plain", "reader")
        .count(100)
        .block(2000);
    loop {
        let reply: StreamReadReply = conn
            .xread_options(&[&stream], &[">"], &options)
            .await
            .unwrap();
        for key in reply.keys {
            let calls = key.ids.iter().map(|entry| {
                let body: Vec<u8> = entry.get("payload").unwrap_or_default();
                let invoker = invoker.clone();
                async move { invoker.invoke(body).await.unwrap() }
            });
            futures::future::join_all(calls).await;
            let ids: Vec<&str> = key.ids.iter().map(|e| e.id.as_str()).collect();
            if !ids.is_empty() {
                let _: u64 = conn.xack(&stream, "plain", &ids).await.unwrap();
            }
        }
    }
}
