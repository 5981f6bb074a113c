//! `postgres-connector` end to end: the real binary against the real PostgreSQL
//! (`POSTGRES_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`, with
//! `wal_level = logical`) and a real HTTP gateway. Every test uses its own tables, slots
//! and publications, dropped at its end. The shared scenario suite runs in replication
//! mode (each row's `payload` column is the body); then what is particular to PostgreSQL:
//! the change as JSON, one table's changes in commit order, many rows across a SIGKILL,
//! LISTEN/NOTIFY, and replay from the dead-letter table.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use integration_tests::postgres_broker::{PgTables, connect, ident, postgres_url};
use integration_tests::scenarios::{self, Fixture, eventually_async};
use integration_tests::{
    FakeGateway, Process, Reply, eventually, free_addr, http_get, metric, unique, wait_http,
};

const WITHIN: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------- the shared suite

#[tokio::test]
async fn postgres_delivered_once() {
    scenarios::delivered_once(&PgTables::new()).await;
}

#[tokio::test]
async fn postgres_scaler_follows_backlog() {
    integration_tests::keda::scaler_follows_backlog(&PgTables::new()).await;
}

#[tokio::test]
async fn postgres_failure_then_success() {
    scenarios::failure_then_success(&PgTables::new()).await;
}

#[tokio::test]
async fn postgres_dead_letter_on_4xx() {
    scenarios::dead_letter_on_4xx(&PgTables::new()).await;
}

#[tokio::test]
async fn postgres_nothing_lost_across_kill() {
    scenarios::nothing_lost_across_kill(&PgTables::new()).await;
}

#[tokio::test]
async fn postgres_drain_on_shutdown() {
    scenarios::drain_on_shutdown(&PgTables::new()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_long_outage_loses_nothing() {
    scenarios::long_outage_loses_nothing(&PgTables::new()).await;
}

#[tokio::test]
async fn postgres_dead_letters_replayed() {
    integration_tests::replay::dead_letters_replayed(&PgTables::new()).await;
}

// ---------------------------------------------------------------- PostgreSQL specifics

/// A connector process and its metrics address.
struct Connector {
    process: Process,
    metrics: SocketAddr,
}

impl Connector {
    async fn start(gw: &FakeGateway, connector: &str, postgres: &str) -> Self {
        let metrics = free_addr();
        let config = format!(
            "[connector]\ngateway_url = \"{gw}\"\nmetrics_addr = \"{metrics}\"\nrebuild_interval = \"300ms\"\nmax_attempts = 3\n{connector}\n\n[connector.backoff]\ninitial = \"50ms\"\nmax = \"200ms\"\n\n{postgres}\n",
            gw = gw.url(),
        );
        let process = Process::start(&PgTables::new().binary(), &config, &[]);
        assert!(
            wait_http(metrics, "/readyz", 200, WITHIN).await,
            "connector not ready:\n{}",
            process.output()
        );
        Self { process, metrics }
    }

    async fn metrics(&self) -> String {
        http_get(self.metrics, "/metrics")
            .await
            .map(|(_, body)| body)
            .unwrap_or_default()
    }
}

fn bodies(gw: &FakeGateway, function: &str) -> Vec<Vec<u8>> {
    gw.requests_to(function)
        .into_iter()
        .map(|r| r.body.to_vec())
        .collect()
}

/// With `body = "change"`, inserts, updates and deletes arrive as JSON with typed values,
/// the old row where the replica identity sends it, and the `X-Postgres-*` headers; the
/// slot's lag is on `/metrics`.
#[tokio::test]
async fn changes_arrive_as_json() {
    let fx = PgTables::new().json_body();
    let topic = unique("json");
    fx.create_topic(&topic).await;
    let sql = connect().await;
    let t = ident(&topic);
    sql.batch_execute(&format!(
        "ALTER TABLE {t} ADD COLUMN qty integer, ADD COLUMN ok boolean, ADD COLUMN doc jsonb; ALTER TABLE {t} REPLICA IDENTITY FULL"
    ))
    .await
    .unwrap();
    let gw = FakeGateway::start().await.unwrap();
    gw.function("json-fn", &topic, |_, _| Reply::ok());
    // In order: the three changes are compared one by one.
    let connector = Connector::start(&gw, "ordering = \"key\"", &fx.source_config(&topic)).await;
    sql.batch_execute(&format!(
        "INSERT INTO {t} (payload, qty, ok, doc) VALUES ('\\x6869', 2, true, '{{\"a\": [1]}}'); UPDATE {t} SET qty = 3; DELETE FROM {t}"
    ))
    .await
    .unwrap();
    assert!(
        eventually(WITHIN, || gw.requests_to("json-fn").len() >= 3).await,
        "{}",
        connector.process.output()
    );
    let requests = gw.requests_to("json-fn");
    let body =
        |i: usize| -> serde_json::Value { serde_json::from_slice(&requests[i].body).unwrap() };
    let (insert, update, delete) = (body(0), body(1), body(2));
    assert_eq!(insert["op"], "insert");
    assert_eq!(insert["schema"], "public");
    assert_eq!(insert["table"], topic.as_str());
    assert_eq!(insert["new"]["qty"], 2);
    assert_eq!(insert["new"]["ok"], true);
    assert_eq!(insert["new"]["doc"], serde_json::json!({"a": [1]}));
    assert_eq!(insert["new"]["payload"], "\\x6869");
    assert!(insert.get("old").is_none());
    assert_eq!(update["op"], "update");
    assert_eq!(update["old"]["qty"], 2);
    assert_eq!(update["new"]["qty"], 3);
    assert_eq!(delete["op"], "delete");
    assert_eq!(delete["old"]["qty"], 3);
    assert!(delete.get("new").is_none());
    // One transaction: the same commit LSN, changes numbered in order.
    let r = &requests[0];
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(r.header("x-postgres-operation").as_deref(), Some("insert"));
    assert_eq!(
        r.header("x-postgres-table"),
        Some(format!("public.{topic}"))
    );
    assert_eq!(r.header("ce-subject"), Some(format!("public.{topic}")));
    let lsn = r.header("x-postgres-lsn").unwrap();
    assert_eq!(insert["lsn"], lsn.as_str());
    assert!(r.header("ce-id").unwrap().ends_with(&format!("/{lsn}/0")));
    assert!(
        eventually_async(WITHIN, || async {
            metric(
                &connector.metrics().await,
                &format!(
                    "connector_postgres_slot_lag_bytes{{slot=\"{}\"}}",
                    integration_tests::postgres_broker::slot_of(&topic)
                ),
            )
            .is_some()
        })
        .await,
        "no slot lag on /metrics"
    );
}

/// With `ordering = "key"`, each table's changes reach the function in commit order
/// while tables run in parallel.
#[tokio::test]
async fn one_tables_changes_arrive_in_commit_order() {
    let fx = PgTables::new();
    let a = unique("order-a");
    let b = unique("order-b");
    fx.create_topic(&a).await;
    let sql = connect().await;
    // Both tables in the first one's publication, read through its slot.
    sql.batch_execute(&format!(
        "CREATE TABLE {} (id bigserial PRIMARY KEY, payload bytea NOT NULL); ALTER PUBLICATION {} ADD TABLE {}",
        ident(&b),
        integration_tests::postgres_broker::slot_of(&a),
        ident(&b)
    ))
    .await
    .unwrap();
    let gw = FakeGateway::start().await.unwrap();
    gw.function("ordered", &format!("{a},{b}"), |req, _| {
        // Uneven durations: without ordering, later changes would overtake.
        let n: u64 = String::from_utf8_lossy(&req.body)
            .rsplit('-')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        Reply::ok().delay(Duration::from_millis((n * 7) % 20))
    });
    let _connector = Connector::start(
        &gw,
        "ordering = \"key\"\nmax_inflight = 32",
        &fx.source_config(&a),
    )
    .await;
    let mut sent_a = Vec::new();
    let mut sent_b = Vec::new();
    for n in 0..20 {
        let (pa, pb) = (format!("a-{n}").into_bytes(), format!("b-{n}").into_bytes());
        fx.insert(&sql, &a, std::slice::from_ref(&pa)).await;
        fx.insert(&sql, &b, std::slice::from_ref(&pb)).await;
        sent_a.push(pa);
        sent_b.push(pb);
    }
    assert!(eventually(WITHIN, || gw.requests_to("ordered").len() >= 40).await);
    let got = bodies(&gw, "ordered");
    let of = |prefix: &[u8]| -> Vec<Vec<u8>> {
        got.iter()
            .filter(|b| b.starts_with(prefix))
            .cloned()
            .collect()
    };
    assert_eq!(of(b"a-"), sent_a, "table a out of commit order");
    assert_eq!(of(b"b-"), sent_b, "table b out of commit order");
    sql.batch_execute(&format!("DROP TABLE {}", ident(&b)))
        .await
        .unwrap();
}

/// SIGKILL part-way through many rows, then a restart: every row reaches the function
/// (duplicates allowed), and the slot is confirmed past all of them.
#[tokio::test]
async fn many_rows_survive_a_kill() {
    let fx = PgTables::new();
    let topic = unique("kill-many");
    fx.create_topic(&topic).await;
    let gw = FakeGateway::start().await.unwrap();
    gw.function("many-fn", &topic, |_, _| {
        Reply::ok().delay(Duration::from_millis(30))
    });
    let source = fx.source_config(&topic);
    let mut connector = Connector::start(&gw, "max_inflight = 4", &source).await;
    let sent: Vec<Vec<u8>> = (0..500)
        .map(|i| format!("row-{i:04}").into_bytes())
        .collect();
    fx.produce(&topic, &sent).await;
    assert!(
        eventually(WITHIN, || gw.requests_to("many-fn").len() >= 100).await,
        "{}",
        connector.process.output()
    );
    connector.process.kill();
    let before = gw.requests_to("many-fn").len();
    assert!(before < sent.len(), "all delivered before the kill");
    connector = Connector::start(&gw, "max_inflight = 4", &source).await;
    let delivered = || bodies(&gw, "many-fn").into_iter().collect::<BTreeSet<_>>();
    assert!(
        eventually(Duration::from_secs(60), || delivered().len() == sent.len()).await,
        "lost {} rows across the kill:\n{}",
        sent.len() - delivered().len(),
        connector.process.output()
    );
    assert!(
        eventually_async(WITHIN, || async { fx.unacknowledged(&topic).await == 0 }).await,
        "the slot was not confirmed past every row"
    );
}

/// `mode = "notify"`: every notification on a listened channel reaches the function, with
/// its channel as topic and header; a 4xx is dead-lettered to the table.
#[tokio::test]
async fn notify_mode_delivers() {
    // A dot, as topics often have: one channel name, not schema and table.
    let channel = format!("{}.created", unique("chan"));
    let dead = unique("it_dead").replace('-', "_");
    let gw = FakeGateway::start().await.unwrap();
    gw.function("notify-fn", &channel, |req, _| {
        if req.body.starts_with(b"bad") {
            Reply::status(400)
        } else {
            Reply::ok()
        }
    });
    let connector = Connector::start(
        &gw,
        "",
        &format!(
            "[postgres]\nurl = \"{}\"\nmode = \"notify\"\ndead_letter_table = \"{dead}\"\n",
            postgres_url()
        ),
    )
    .await;
    let sql = connect().await;
    // Readiness follows the LISTEN; the probe is a bounded wait all the same.
    let mut sent = Vec::new();
    assert!(
        eventually_async(WITHIN, || async {
            sql.execute("SELECT pg_notify($1, 'probe')", &[&channel])
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
            !gw.requests_to("notify-fn").is_empty()
        })
        .await,
        "no notification arrived:\n{}",
        connector.process.output()
    );
    for i in 0..50 {
        let payload = format!("note-{i}");
        sql.execute("SELECT pg_notify($1, $2)", &[&channel, &payload])
            .await
            .unwrap();
        sent.push(payload.into_bytes());
    }
    sql.execute("SELECT pg_notify($1, 'bad-one')", &[&channel])
        .await
        .unwrap();
    assert!(
        eventually(WITHIN, || {
            let got: BTreeSet<Vec<u8>> = bodies(&gw, "notify-fn").into_iter().collect();
            sent.iter().all(|p| got.contains(p))
        })
        .await,
        "notifications lost:\n{}",
        connector.process.output()
    );
    let r = &gw.requests_to("notify-fn")[0];
    assert_eq!(r.header("x-topic"), Some(channel.clone()));
    assert_eq!(r.header("x-postgres-channel"), Some(channel.clone()));
    let query = format!(
        "SELECT body, function, status, reason FROM {} WHERE topic = $1",
        ident(&dead)
    );
    assert!(
        eventually_async(WITHIN, || async {
            sql.query(&query, &[&channel])
                .await
                .is_ok_and(|rows| rows.len() == 1)
        })
        .await,
        "the 4xx was not dead-lettered:\n{}",
        connector.process.output()
    );
    let row = sql.query_one(&query, &[&channel]).await.unwrap();
    assert_eq!(row.get::<_, Vec<u8>>(0), b"bad-one");
    assert_eq!(row.get::<_, String>(1), "notify-fn");
    assert_eq!(row.get::<_, Option<i32>>(2), Some(400));
    assert_eq!(row.get::<_, String>(3), "rejected");
    sql.batch_execute(&format!("DROP TABLE {}", ident(&dead)))
        .await
        .unwrap();
}

/// With `create = false`, a missing slot stops the connector with an error naming it.
#[tokio::test]
async fn a_missing_slot_without_create_is_fatal() {
    let gw = FakeGateway::start().await.unwrap();
    let metrics = free_addr();
    let slot = unique("it_missing").replace('-', "_");
    let config = format!(
        "[connector]\ngateway_url = \"{gw}\"\nmetrics_addr = \"{metrics}\"\n\n[postgres]\nurl = \"{url}\"\nslot = \"{slot}\"\npublication = \"{slot}\"\ncreate = false\n",
        gw = gw.url(),
        url = postgres_url(),
    );
    let mut process = Process::start(&PgTables::new().binary(), &config, &[]);
    let status = process.wait(WITHIN).await;
    assert!(!status.success());
    let out = process.output();
    assert!(
        out.contains(&format!("publication {slot} does not exist")),
        "{out}"
    );
}

/// `tls = "verify_full"` (notify mode): the connection is TLS, the server's certificate
/// checked against `tls_ca_file`. Uses the Debian cluster's own certificate (`localhost`,
/// self-signed); where the server has no TLS or that file is missing, there is nothing
/// to test against and the test says so.
#[tokio::test]
async fn notify_over_tls() {
    const CERT: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";
    let sql = connect().await;
    let ssl: String = sql.query_one("SHOW ssl", &[]).await.unwrap().get(0);
    if ssl != "on" || !std::path::Path::new(CERT).exists() {
        eprintln!("the server has no TLS (ssl = {ssl}) or {CERT} is missing: nothing to test");
        return;
    }
    let channel = unique("tls");
    let gw = FakeGateway::start().await.unwrap();
    gw.function("tls-fn", &channel, |_, _| Reply::ok());
    let pg: tokio_postgres::Config = postgres_url().parse().unwrap();
    let url = format!(
        "postgres://{}@localhost:{}/{}",
        pg.get_user().unwrap_or("postgres"),
        pg.get_ports().first().copied().unwrap_or(5432),
        pg.get_dbname().unwrap_or("postgres")
    );
    let connector = Connector::start(
        &gw,
        "",
        &format!(
            "[postgres]\nurl = \"{url}\"\nmode = \"notify\"\ntls = \"verify_full\"\ntls_ca_file = \"{CERT}\"\ndead_letter_table = \"\"\n"
        ),
    )
    .await;
    assert!(
        eventually_async(WITHIN, || async {
            sql.execute("SELECT pg_notify($1, 'over-tls')", &[&channel])
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
            !gw.requests_to("tls-fn").is_empty()
        })
        .await,
        "no notification arrived over TLS:\n{}",
        connector.process.output()
    );
    let encrypted: i64 = sql
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE application_name = 'postgres-connector' AND ssl AND client_port IS NOT NULL AND query LIKE 'LISTEN%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(encrypted >= 1, "the connector's connection is not TLS");
}

/// The server drops the connector's replication connection (`pg_terminate_backend` on
/// its walsender, as a restart or failover would): the connector reconnects with backoff,
/// stays up, and every row, before and after, reaches the function.
#[tokio::test]
async fn a_dropped_replication_connection_is_reconnected() {
    let fx = PgTables::new();
    let topic = unique("drop-conn");
    fx.create_topic(&topic).await;
    let gw = FakeGateway::start().await.unwrap();
    gw.function("reconnect-fn", &topic, |_, _| Reply::ok());
    let mut connector = Connector::start(&gw, "", &fx.source_config(&topic)).await;
    let first: Vec<Vec<u8>> = (0..20)
        .map(|i| format!("before-{i}").into_bytes())
        .collect();
    fx.produce(&topic, &first).await;
    assert!(eventually(WITHIN, || gw.requests_to("reconnect-fn").len() >= 20).await);
    let sql = connect().await;
    let slot = integration_tests::postgres_broker::slot_of(&topic);
    let terminated: Vec<bool> = sql
        .query(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1 AND active",
            &[&slot],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(terminated, [true], "the walsender was not found");
    let second: Vec<Vec<u8>> = (0..20).map(|i| format!("after-{i}").into_bytes()).collect();
    fx.produce(&topic, &second).await;
    let delivered = || {
        bodies(&gw, "reconnect-fn")
            .into_iter()
            .collect::<BTreeSet<_>>()
    };
    assert!(
        eventually(WITHIN, || second.iter().all(|p| delivered().contains(p))).await,
        "rows after the drop did not arrive:\n{}",
        connector.process.output()
    );
    assert!(first.iter().all(|p| delivered().contains(p)));
    assert!(
        eventually_async(WITHIN, || async { fx.unacknowledged(&topic).await == 0 }).await,
        "the slot was not confirmed past every row"
    );
    assert!(connector.process.exited().is_none(), "the connector exited");
    assert!(
        connector
            .process
            .output()
            .contains("pulling from the source failed")
    );
}
