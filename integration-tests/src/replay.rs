//! The dead-letter replay scenario every broker connector runs (`<connector> replay`),
//! against its real broker and real binary.
//!
//! 1. A function answering 400 sends two messages to the dead-letter destination.
//! 2. `replay --dry-run` lists both (function, original coordinates, reason, attempts),
//!    invokes nothing and removes nothing.
//! 3. The function now succeeds: `replay --limit 1` delivers the oldest letter once, with
//!    its original payload, `ce-id` and source headers, and removes only it.
//! 4. The function fails again: `replay` reports the remaining letter as failed, exits
//!    non-zero and leaves it in place.
//! 5. The function succeeds: `replay` delivers it and the destination is empty.
//! 6. Filters: `--status 5xx` selects neither letter, `--status 4xx --reason rejected
//!    --topic --function --since` both; a bad filter value is refused. `replay --purge
//!    --status 422` removes a new letter without invoking anything.
//!
//! A connector's test implements [`ReplayFixture`] (on top of the scenario suite's
//! [`Fixture`]) and calls [`dead_letters_replayed`].

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use crate::scenarios::{Fixture, eventually_async, start};
use crate::{FakeGateway, Process, Received, Reply, eventually, unique};

const WITHIN: Duration = Duration::from_secs(30);

/// What the replay scenario needs beyond the shared suite.
#[async_trait::async_trait]
pub trait ReplayFixture: Fixture {
    /// The payloads a replay would still find at `topic`'s dead-letter destination, oldest
    /// first (Kafka: after the replay group's committed offsets).
    async fn remaining_dead_letters(&self, topic: &str) -> Vec<Vec<u8>>;

    /// Request headers that may differ between the original delivery and the replayed one
    /// (lower case), besides those that differ per request anyway.
    fn headers_allowed_to_differ(&self) -> &[&str] {
        &[]
    }
}

/// Runs `binary --config <config> <args>` to completion: exit status and output.
pub async fn run_to_exit(binary: &Path, config: &str, args: &[&str]) -> (ExitStatus, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.toml");
    std::fs::write(&file, config).unwrap();
    let mut argv: Vec<&std::ffi::OsStr> = vec!["--config".as_ref(), file.as_os_str()];
    argv.extend(args.iter().map(|a| std::ffi::OsStr::new(*a)));
    let mut process = Process::start_with_args(binary, &argv, &[], dir);
    let status = process.wait(Duration::from_secs(60)).await;
    (status, process.output())
}

/// The configuration the replay runs with: the connector's own (same gateway, same
/// retries, same source section).
fn replay_config(fixture: &dyn ReplayFixture, gateway: &FakeGateway, topic: &str) -> String {
    format!(
        r#"[connector]
gateway_url = "{gateway}"
metrics_addr = "127.0.0.1:0"
upstream_timeout = "10s"
max_attempts = 3

[connector.backoff]
initial = "50ms"
max = "200ms"

{source}
"#,
        gateway = gateway.url(),
        source = fixture.source_config(topic),
    )
}

/// Headers of a request, minus those that differ between any two requests.
fn comparable(r: &Received, allowed: &[&str]) -> BTreeMap<String, String> {
    r.headers
        .iter()
        .filter(|(name, _)| !allowed.contains(&name.as_str()))
        .map(|(name, value)| {
            (
                name.as_str().to_owned(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            )
        })
        .collect()
}

/// Publishes `payloads` to `topic` one at a time, each once the one before is in the
/// dead-letter destination, so that the letters are in this order.
pub async fn dead_letter_in_order(
    fixture: &dyn ReplayFixture,
    topic: &str,
    payloads: &[Vec<u8>],
    connector: &Process,
) {
    for p in payloads {
        fixture.produce(topic, std::slice::from_ref(p)).await;
        assert!(
            eventually_async(WITHIN, || async {
                fixture.remaining_dead_letters(topic).await.contains(p)
            })
            .await,
            "{} was not dead-lettered:\n{}",
            String::from_utf8_lossy(p),
            connector.output()
        );
    }
}

/// The scenario described in the module docs.
pub async fn dead_letters_replayed(fixture: &dyn ReplayFixture) {
    let topic = unique("replay");
    fixture.create_topic(&topic).await;
    let gw = FakeGateway::start().await.unwrap();
    let status = Arc::new(AtomicU16::new(400));
    let answer = status.clone();
    gw.function("replay-fn", &topic, move |_, _| {
        Reply::status(answer.load(Ordering::SeqCst)).body(b"answer")
    });
    let connector = start(fixture, &gw, &topic, "").await;
    let sent = vec![b"replay-first".to_vec(), b"replay-second".to_vec()];
    dead_letter_in_order(fixture, &topic, &sent, &connector.process).await;
    assert_eq!(fixture.remaining_dead_letters(&topic).await, sent);
    let originals = gw.requests_to("replay-fn");
    assert_eq!(originals.len(), 2, "a 400 is not retried");
    // The connector keeps running: a replay reads the dead letters beside it.

    let binary = fixture.binary();
    let config = replay_config(fixture, &gw, &topic);

    // Dry run: listed, not invoked, not removed.
    let (exit, out) = run_to_exit(&binary, &config, &["replay", "--dry-run"]).await;
    assert!(exit.success(), "dry run failed ({exit:?}):\n{out}");
    assert_eq!(out.matches("would replay").count(), 2, "{out}");
    assert!(
        out.contains("function=replay-fn")
            && out.contains(&format!("topic={topic}"))
            && out.contains("reason=rejected status=400 attempts=1"),
        "{out}"
    );
    assert!(
        out.contains("dry run: 2 would be replayed, 0 skipped; nothing was removed"),
        "{out}"
    );
    assert_eq!(gw.requests_to("replay-fn").len(), 2, "a dry run invoked");
    assert_eq!(fixture.remaining_dead_letters(&topic).await, sent);
    // Filters select: none of them failed with a 5xx; both with a 4xx, rejected.
    let (exit, out) = run_to_exit(
        &binary,
        &config,
        &["replay", "--dry-run", "--status", "5xx"],
    )
    .await;
    assert!(exit.success(), "{out}");
    assert!(
        out.contains("dry run: 0 would be replayed, 2 skipped"),
        "{out}"
    );
    let (exit, out) = run_to_exit(
        &binary,
        &config,
        &[
            "replay",
            "--dry-run",
            "--status",
            "4xx",
            "--reason",
            "rejected",
            "--topic",
            &topic,
            "--function",
            "replay-fn",
            "--since",
            "2020-01-01T00:00:00Z",
        ],
    )
    .await;
    assert!(exit.success(), "{out}");
    assert!(
        out.contains("dry run: 2 would be replayed, 0 skipped"),
        "{out}"
    );
    let (exit, out) = run_to_exit(&binary, &config, &["replay", "--status", "teapot"]).await;
    assert!(
        !exit.success() && out.contains("teapot"),
        "a bad filter is refused:\n{out}"
    );

    // The function is fixed: the oldest letter is delivered once, as it was, and removed.
    status.store(200, Ordering::SeqCst);
    let (exit, out) = run_to_exit(&binary, &config, &["replay", "--limit", "1"]).await;
    assert!(exit.success(), "replay failed ({exit:?}):\n{out}");
    assert!(
        out.contains("replay: 1 replayed, 0 failed, 0 skipped"),
        "{out}"
    );
    let requests = gw.requests_to("replay-fn");
    assert_eq!(requests.len(), 3, "{out}");
    let replayed = &requests[2];
    assert_eq!(&replayed.body[..], b"replay-first");
    let allowed = [
        &["x-delivery-attempt"][..],
        fixture.headers_allowed_to_differ(),
    ]
    .concat();
    assert_eq!(
        comparable(replayed, &allowed),
        comparable(&originals[0], &allowed),
        "the replayed request differs from the original"
    );
    assert_eq!(replayed.header("x-delivery-attempt").as_deref(), Some("1"));
    assert_eq!(
        fixture.remaining_dead_letters(&topic).await,
        [sent[1].clone()],
        "only the delivered letter is removed"
    );

    // The function fails again: the letter stays, the replay says so and exits non-zero.
    status.store(400, Ordering::SeqCst);
    let (exit, out) = run_to_exit(&binary, &config, &["replay"]).await;
    assert!(
        !exit.success(),
        "a failed letter must fail the replay:\n{out}"
    );
    assert!(
        out.contains("replay: 0 replayed, 1 failed, 0 skipped"),
        "{out}"
    );
    assert!(out.contains("failed ") && out.contains("kept"), "{out}");
    assert!(eventually(WITHIN, || gw.requests_to("replay-fn").len() == 4).await);
    assert_eq!(
        fixture.remaining_dead_letters(&topic).await,
        [sent[1].clone()],
        "a letter that failed again must stay"
    );

    // Fixed for good: the last letter goes, and nothing is left.
    status.store(200, Ordering::SeqCst);
    let (exit, out) = run_to_exit(&binary, &config, &["replay"]).await;
    assert!(exit.success(), "replay failed ({exit:?}):\n{out}");
    assert!(
        out.contains("replay: 1 replayed, 0 failed, 0 skipped"),
        "{out}"
    );
    let requests = gw.requests_to("replay-fn");
    assert_eq!(requests.len(), 5);
    assert_eq!(&requests[4].body[..], b"replay-second");
    assert_eq!(
        requests[4].header("ce-id"),
        originals[1].header("ce-id"),
        "ce-id must survive the replay"
    );
    assert!(fixture.remaining_dead_letters(&topic).await.is_empty());

    // A purge removes the letters it selects without delivering them.
    status.store(422, Ordering::SeqCst);
    let doomed = b"replay-purged".to_vec();
    dead_letter_in_order(
        fixture,
        &topic,
        std::slice::from_ref(&doomed),
        &connector.process,
    )
    .await;
    drop(connector);
    let invoked = gw.requests_to("replay-fn").len();
    let (exit, out) =
        run_to_exit(&binary, &config, &["replay", "--purge", "--status", "422"]).await;
    assert!(exit.success(), "purge failed ({exit:?}):\n{out}");
    assert!(out.contains("purge: 1 purged, 0 skipped"), "{out}");
    assert_eq!(
        gw.requests_to("replay-fn").len(),
        invoked,
        "a purge invokes nothing"
    );
    assert!(
        fixture.remaining_dead_letters(&topic).await.is_empty(),
        "{out}"
    );
}
