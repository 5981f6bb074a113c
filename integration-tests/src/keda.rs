//! The KEDA external scaler scenario every broker connector runs: a real gRPC client
//! (generated from `connector-sdk/proto/externalscaler.proto` by tonic) against the real
//! connector binary, with a real backlog at the real broker.
//!
//! After a warm-up message (so a Kafka consumer has its partitions before anything is
//! timed), the function answers 503 while it is "down" (as a gateway does for a function scaled to
//! zero that has not started yet), so the messages published for it wait: at the broker,
//! and in the connector, retrying. `GetMetrics` follows that backlog up and back to zero
//! once the function answers, `StreamIsActive` flips to active within a second of the
//! first message and back when the backlog clears, and an unknown function is an error.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use connector_sdk::scaler::proto::external_scaler_client::ExternalScalerClient;
use connector_sdk::scaler::proto::{GetMetricsRequest, ScaledObjectRef};
use tonic::transport::Channel;

use crate::scenarios::{Fixture, eventually_async, start};
use crate::{FakeGateway, Reply, eventually, free_addr, http_get, metric, unique};

const WITHIN: Duration = Duration::from_secs(30);

fn object(function: &str) -> ScaledObjectRef {
    ScaledObjectRef {
        name: format!("{function}-scaler"),
        namespace: "openfaas-fn".to_owned(),
        scaler_metadata: HashMap::from([("function".to_owned(), function.to_owned())]),
    }
}

async fn backlog(client: &mut ExternalScalerClient<Channel>, function: &str) -> Option<i64> {
    let response = client
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(object(function)),
            metric_name: String::new(),
        })
        .await
        .ok()?;
    response
        .into_inner()
        .metric_values
        .first()
        .map(|v| v.metric_value)
}

/// Runs the scenario against `fixture`'s connector.
pub async fn scaler_follows_backlog(fixture: &dyn Fixture) {
    const SENT: usize = 5;
    let topic = unique("keda");
    fixture.create_topic(&topic).await;
    let gw = FakeGateway::start().await.unwrap();
    let down = Arc::new(AtomicBool::new(true));
    let up = down.clone();
    gw.function_with_annotations(
        "keda-fn",
        &[
            ("topic", topic.as_str()),
            // Waits out the outage instead of dead-lettering.
            ("com.openfaas.retry.attempts", "1000"),
            ("connector.scale.target", "2"),
        ],
        move |_, _| {
            if up.load(Ordering::SeqCst) {
                Reply::status(503)
            } else {
                Reply::ok()
            }
        },
    );
    let scaler_addr = free_addr();
    let connector = start(
        fixture,
        &gw,
        &topic,
        &format!("scaler_addr = \"{scaler_addr}\""),
    )
    .await;
    let mut client = ExternalScalerClient::connect(format!("http://{scaler_addr}"))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "no scaler at {scaler_addr}: {e}\n{}",
                connector.process.output()
            )
        });

    // An unknown function is an error that names it.
    let unknown = client.is_active(object("no-such-fn")).await;
    match unknown {
        Err(status) => {
            assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
            assert!(status.message().contains("no-such-fn"), "{status:?}");
        }
        Ok(r) => panic!("an unknown function answered {r:?}"),
    }
    let spec = client
        .get_metric_spec(object("keda-fn"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(spec.metric_specs.len(), 1);
    assert!(
        (spec.metric_specs[0].target_size_float - 2.0).abs() < f64::EPSILON,
        "{spec:?}"
    );

    // Warm-up while the function is up: one message through, so the consumer has joined
    // its group and been assigned its partitions (Kafka) before the timed part.
    down.store(false, Ordering::SeqCst);
    fixture.produce(&topic, &[b"warm-up".to_vec()]).await;
    assert!(
        eventually(WITHIN, || !gw.requests_to("keda-fn").is_empty()).await,
        "the warm-up message was not delivered:\n{}",
        connector.process.output()
    );
    assert!(
        eventually_async(WITHIN, || {
            let mut c = client.clone();
            async move { backlog(&mut c, "keda-fn").await == Some(0) }
        })
        .await,
        "the backlog did not clear after the warm-up: {:?}",
        backlog(&mut client, "keda-fn").await
    );
    down.store(true, Ordering::SeqCst);

    let mut stream = client
        .stream_is_active(object("keda-fn"))
        .await
        .unwrap()
        .into_inner();
    // The stream settles on inactive: its first answer is the backlog now, and a broker
    // reading taken just before the warm-up's acknowledgement (SQS counts a message in
    // flight until it is deleted, and moto's counts are approximate) may still say active
    // until the next reading pushes the change.
    let settled = tokio::time::timeout(WITHIN, async {
        loop {
            match stream.message().await {
                Ok(Some(r)) if !r.result => return Ok(()),
                Ok(Some(_)) => continue,
                other => return Err(format!("{other:?}")),
            }
        }
    })
    .await;
    assert!(
        matches!(settled, Ok(Ok(()))),
        "the stream never said inactive after the warm-up: {settled:?}"
    );

    let sent: Vec<Vec<u8>> = (0..SENT)
        .map(|i| format!("keda-{i}").into_bytes())
        .collect();
    fixture.produce(&topic, &sent).await;
    let flipped = tokio::time::timeout(Duration::from_secs(1), stream.message()).await;
    assert!(
        matches!(flipped, Ok(Ok(Some(ref r))) if r.result),
        "StreamIsActive did not flip to active within a second of the messages: {flipped:?}\n{}",
        connector.process.output()
    );
    // IsActive agrees (eventually: with broker retries a message handed back between
    // attempts counts again at the broker's next measurement).
    assert!(
        eventually_async(WITHIN, || {
            let mut c = client.clone();
            async move {
                c.is_active(object("keda-fn"))
                    .await
                    .is_ok_and(|r| r.into_inner().result)
            }
        })
        .await,
        "IsActive did not say active"
    );
    assert!(
        eventually_async(WITHIN, || {
            let mut c = client.clone();
            async move { backlog(&mut c, "keda-fn").await >= Some(SENT as i64) }
        })
        .await,
        "GetMetrics did not follow the backlog up: {:?}\n{}",
        backlog(&mut client, "keda-fn").await,
        connector.process.output()
    );
    // The same number in /metrics. Eventually: with broker retries (SQS visibility, JetStream
    // nak) a message handed back to the broker counts again only at the next measurement.
    let addr = connector.metrics_addr;
    let exported = || async move {
        let (_, text) = http_get(addr, "/metrics").await.unwrap_or_default();
        metric(
            &text,
            "connector_function_backlog_messages{function=\"keda-fn\"}",
        )
    };
    assert!(
        eventually_async(WITHIN, || async {
            exported().await.is_some_and(|v| v >= SENT as f64)
        })
        .await,
        "connector_function_backlog_messages: {:?}",
        exported().await
    );

    // The function comes up: everything is delivered, the backlog clears (the broker's
    // count follows at its next measurement), and the stream says so.
    down.store(false, Ordering::SeqCst);
    assert!(
        eventually_async(WITHIN, || {
            let mut c = client.clone();
            async move { backlog(&mut c, "keda-fn").await == Some(0) }
        })
        .await,
        "GetMetrics did not follow the backlog back to zero: {:?}\n{}",
        backlog(&mut client, "keda-fn").await,
        connector.process.output()
    );
    let mut last = None;
    while let Ok(Ok(Some(r))) = tokio::time::timeout(Duration::from_secs(1), stream.message()).await
    {
        last = Some(r.result);
    }
    assert_eq!(
        last,
        Some(false),
        "StreamIsActive's last word after the backlog cleared\n{}",
        connector.process.output()
    );
    let delivered: std::collections::BTreeSet<Vec<u8>> = gw
        .requests_to("keda-fn")
        .into_iter()
        .map(|r| r.body.to_vec())
        .collect();
    assert_eq!(
        delivered.len(),
        SENT + 1,
        "every message reached the function"
    );
}
