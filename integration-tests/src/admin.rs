//! The admin API scenario (issue 20), against a connector's real binary and broker:
//!
//! 1. A function answering 422 dead-letters three messages, one of them a payload holding
//!    markup.
//! 2. Without credentials, or with a wrong password, every admin route answers 401;
//!    replay and purge only take `POST`.
//! 3. `/admin/status` shows the subscription: its topic, `dead_lettered` total 3.
//! 4. `/admin/dead-letters` lists what a filter selects (function, status class, reason),
//!    with provenance and the payload's preview as it is (escaping is a page's job),
//!    pages with `offset`/`limit`, and refuses a bad filter with 400.
//! 5. `replay` with `dry_run` counts and delivers nothing; once the function is fixed,
//!    `replay` with `limit: 2` delivers two (the function gets them again, same `ce-id`)
//!    and removes only them.
//! 6. `purge` removes the last one without delivering it; the list is then empty.

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};

use serde_json::{Value, json};

use crate::replay::ReplayFixture;
use crate::scenarios::start;
use crate::{FakeGateway, Reply, unique};

const USER: &str = "admin";
const PASSWORD: &str = "admin-s3cret";

/// The scenario described in the module docs.
pub async fn admin_api_lists_replays_and_purges(fixture: &dyn ReplayFixture) {
    let topic = unique("admin");
    fixture.create_topic(&topic).await;
    let gw = FakeGateway::start().await.unwrap();
    let status = Arc::new(AtomicU16::new(422));
    let answer = status.clone();
    gw.function("admin-fn", &topic, move |_, _| {
        Reply::status(answer.load(Ordering::SeqCst)).body(b"no")
    });
    let extra = format!(
        "basic_auth = true\ngateway_username = \"{USER}\"\ngateway_password = \"{PASSWORD}\""
    );
    let connector = start(fixture, &gw, &topic, &extra).await;
    let sent: Vec<Vec<u8>> = vec![
        b"admin-one".to_vec(),
        b"<script>alert(1)</script>".to_vec(),
        b"admin-three".to_vec(),
    ];
    crate::replay::dead_letter_in_order(fixture, &topic, &sent, &connector.process).await;
    let base = format!("http://{}", connector.metrics_addr);
    let client = reqwest::Client::new();

    // Credentials, methods.
    for path in ["/admin/status", "/admin/dead-letters"] {
        let anonymous = client.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(anonymous.status(), 401, "{path}");
        let wrong = client
            .get(format!("{base}{path}"))
            .basic_auth(USER, Some("wrong"))
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), 401, "{path}");
    }
    for path in ["/admin/dead-letters/replay", "/admin/dead-letters/purge"] {
        let anonymous = client
            .post(format!("{base}{path}"))
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(anonymous.status(), 401, "{path}");
        let get = client
            .get(format!("{base}{path}"))
            .basic_auth(USER, Some(PASSWORD))
            .send()
            .await
            .unwrap();
        assert_eq!(get.status(), 405, "{path} only takes POST");
    }
    let get = |path: String| {
        let request = client
            .get(format!("{base}{path}"))
            .basic_auth(USER, Some(PASSWORD))
            .send();
        async move {
            let response = request.await.unwrap();
            let code = response.status().as_u16();
            (code, response.json::<Value>().await.unwrap())
        }
    };
    let post = |path: &str, body: Value| {
        let request = client
            .post(format!("{base}{path}"))
            .basic_auth(USER, Some(PASSWORD))
            .json(&body)
            .send();
        async move {
            let response = request.await.unwrap();
            let code = response.status().as_u16();
            (code, response.json::<Value>().await.unwrap())
        }
    };

    // Status.
    let (code, status_json) = get("/admin/status".into()).await;
    assert_eq!(code, 200, "{status_json}");
    assert_eq!(status_json["ready"], true, "{status_json}");
    assert_eq!(status_json["dead_letters"], true, "{status_json}");
    let subscription = status_json["subscriptions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["function"] == "admin-fn")
        .unwrap_or_else(|| panic!("no admin-fn: {status_json}"))
        .clone();
    assert_eq!(subscription["topics"], json!([topic]), "{subscription}");
    assert_eq!(subscription["totals"]["dead_lettered"], 3, "{subscription}");
    assert!(subscription["backlog"].is_u64(), "{subscription}");
    // Every delivery has ended: none under way, none waiting out a backoff.
    assert_eq!(subscription["attempting"], 0, "{subscription}");
    assert_eq!(subscription["retrying"], 0, "{subscription}");

    // Listing, with filters and pages.
    let (code, page) =
        get("/admin/dead-letters?function=admin-fn&status=4xx&reason=rejected".into()).await;
    assert_eq!(code, 200, "{page}");
    assert_eq!(page["matched"], 3, "{page}");
    let letters = page["letters"].as_array().unwrap();
    let previews: Vec<&str> = letters
        .iter()
        .map(|l| l["preview"].as_str().unwrap())
        .collect();
    assert_eq!(
        previews,
        ["admin-one", "<script>alert(1)</script>", "admin-three"]
    );
    assert_eq!(letters[0]["status"], 422);
    assert_eq!(letters[0]["topic"], topic.as_str());
    assert_eq!(letters[0]["function"], "admin-fn");
    assert!(letters[0]["last_failure"].is_string(), "{page}");
    let (_, none) = get("/admin/dead-letters?status=5xx".into()).await;
    assert_eq!(none["matched"], 0, "{none}");
    let (_, second) = get("/admin/dead-letters?offset=1&limit=1".into()).await;
    assert_eq!(second["letters"][0]["preview"], "<script>alert(1)</script>");
    assert_eq!(second["next"], 2, "{second}");
    let (code, bad) = get("/admin/dead-letters?status=teapot".into()).await;
    assert_eq!(code, 400, "{bad}");
    assert!(bad["error"].as_str().unwrap().contains("status"), "{bad}");

    // Replay: a dry run counts, then two go once the function is fixed.
    let invoked = gw.requests_to("admin-fn").len();
    let (code, dry) = post(
        "/admin/dead-letters/replay",
        json!({"function": "admin-fn", "dry_run": true}),
    )
    .await;
    assert_eq!(code, 200, "{dry}");
    assert_eq!(dry["summary"]["replayed"], 3, "{dry}");
    assert_eq!(
        gw.requests_to("admin-fn").len(),
        invoked,
        "a dry run invokes nothing"
    );
    assert_eq!(fixture.remaining_dead_letters(&topic).await, sent);
    status.store(200, Ordering::SeqCst);
    let (code, replayed) = post("/admin/dead-letters/replay", json!({"limit": 2})).await;
    assert_eq!(code, 200, "{replayed}");
    assert_eq!(replayed["summary"]["replayed"], 2, "{replayed}");
    let requests = gw.requests_to("admin-fn");
    let again: Vec<&[u8]> = requests[invoked..].iter().map(|r| &r.body[..]).collect();
    assert_eq!(again, [&sent[0][..], &sent[1][..]]);
    assert_eq!(
        requests[invoked].header("ce-id"),
        requests[0].header("ce-id"),
        "the normal path: same ce-id"
    );
    assert_eq!(
        fixture.remaining_dead_letters(&topic).await,
        [sent[2].clone()]
    );

    // Purge: removed without a delivery.
    let invoked = gw.requests_to("admin-fn").len();
    let (code, purged) = post("/admin/dead-letters/purge", json!({"status": "422"})).await;
    assert_eq!(code, 200, "{purged}");
    assert_eq!(purged["summary"]["purged"], 1, "{purged}");
    assert_eq!(
        gw.requests_to("admin-fn").len(),
        invoked,
        "a purge invokes nothing"
    );
    assert!(fixture.remaining_dead_letters(&topic).await.is_empty());
    let (_, empty) = get("/admin/dead-letters".into()).await;
    assert_eq!(empty["matched"], 0, "{empty}");
    drop(connector);
}
