//! The cost of one filter evaluation (`connector.filter`) per message.
//!
//! ```text
//! cargo bench -p connector-sdk --bench filter
//! ```
//!
//! Each expression is compiled once, as the topic map does, then evaluated on the same
//! message `BENCH_COUNT` times (default 200,000) in a loop; the figure is wall-clock time
//! per evaluation on one thread (median of five rounds), beside the cost of the loop with
//! no expression (reading the message's attributes only). The message is a 46-byte JSON
//! order with a type, a subject and three headers, as a connector would build it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::Instant;

use connector_sdk::Message;
use connector_sdk::filter::Filter;

const PAYLOAD: &[u8] = br#"{"order":42,"amount":19.99,"currency":"EUR"}"#;

fn main() {
    let count: usize = std::env::var("BENCH_COUNT").map_or(200_000, |v| v.parse().unwrap());
    let mut message = Message::new("orders", PAYLOAD, "orders/0/42", "kafka://orders")
        .with_event_type("com.example.order.created")
        .with_subject("42")
        .with_content_type("application/json");
    for (name, value) in [
        ("x-tenant", "acme"),
        ("x-region", "eu"),
        ("x-priority", "high"),
    ] {
        message.add_header(name, value);
    }
    let expressions = [
        (
            "a CloudEvents attribute",
            "type == 'com.example.order.created'",
        ),
        ("a header", "headers['x-tenant'] == 'acme'"),
        ("a JSON field of the body", "data.amount > 10.0"),
        (
            "attribute and JSON fields",
            "type.startsWith('com.example.') && data.currency == 'EUR' && data.order % 2 == 0",
        ),
    ];
    println!("| filter on | expression | per evaluation |");
    println!("| --- | --- | --- |");
    for (what, expression) in expressions {
        let filter = Filter::compile(expression).unwrap();
        assert!(filter.matches(&message, "bench.message").unwrap());
        let mut rounds: Vec<f64> = (0..5)
            .map(|_| {
                let started = Instant::now();
                for _ in 0..count {
                    black_box(
                        filter
                            .matches(black_box(&message), "bench.message")
                            .unwrap(),
                    );
                }
                started.elapsed().as_secs_f64() / count as f64
            })
            .collect();
        rounds.sort_by(f64::total_cmp);
        println!(
            "| {what} | `{expression}` | {:.2} µs |",
            rounds[rounds.len() / 2] * 1e6
        );
    }
}
