//! Throughput of `postgres-connector` in replication mode beside the plain HTTP ceiling and
//! a plain replication client, in one run.
//!
//! ```text
//! cargo bench -p postgres-connector --bench throughput
//! ```
//!
//! Needs the PostgreSQL at `POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`) with `wal_level = logical`. A no-op
//! function (and the gateway's `/system/functions`) runs in a child process
//! (`connector_sdk::testing::load`). Each round, on a fresh table with two slots on one
//! publication, `COUNT` rows inserted beforehand (a backlog, 1,000 rows per transaction):
//!
//! - **ceiling**: a plain `reqwest` loop making the requests the connector makes (same
//!   route, headers and JSON body), 64 in flight;
//! - **plain client**: pgwire-replication and pg_walstream's decoder reading the backlog
//!   from the first slot and confirming each commit, nothing else: what PostgreSQL itself
//!   can stream;
//! - **connector**: the release `postgres-connector` (`body = "change"`, `max_inflight`
//!   64) on the second slot. The clock starts when `/readyz` turns 200 and stops when the
//!   function has every row and the slot is confirmed past the last commit.
//!
//! Three rounds; printed are the medians (single rounds go to stderr), with the
//! connector's CPU time per message and resident memory.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use connector_sdk::Message;
use connector_sdk::testing::load::{self, ConnectorProcess, NoopFunction};
use pg_walstream::{LogicalReplicationMessage, LogicalReplicationParser};
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent};
use tokio_postgres::{Client, NoTls};

const COUNT: usize = 50_000;
const ROUNDS: usize = 3;
const INFLIGHT: usize = 64;

fn main() {
    load::main(bench);
}

fn postgres_url() -> String {
    std::env::var("POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

struct Round {
    ceiling: f64,
    plain: f64,
    connector: f64,
    cpu: Duration,
    idle_kib: u64,
    peak_kib: u64,
}

async fn bench() {
    let (sql, connection) = tokio_postgres::connect(&postgres_url(), NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut rounds = Vec::new();
    for _ in 0..ROUNDS {
        let name = format!("bench_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let round = round(&sql, &name).await;
        eprintln!(
            "ceiling {:.0}/s, plain client {:.0}/s, connector {:.0}/s: {:.2} of the ceiling, {:.2} of the plain client",
            round.ceiling,
            round.plain,
            round.connector,
            round.connector / round.ceiling,
            round.connector / round.plain
        );
        rounds.push(round);
    }
    let median = |f: &dyn Fn(&Round) -> f64| {
        let mut v: Vec<f64> = rounds.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (ceiling, plain, connector) = (
        median(&|r| r.ceiling),
        median(&|r| r.plain),
        median(&|r| r.connector),
    );
    println!(
        "| rows | ceiling req/s | plain client rows/s | connector rows/s | of ceiling | of plain client | connector CPU/row | RSS idle | RSS peak |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    println!(
        "| {COUNT} | {ceiling:.0} | {plain:.0} | {connector:.0} | {:.2} | {:.2} | {:.1} µs | {:.1} MiB | {:.1} MiB |",
        connector / ceiling,
        connector / plain,
        median(&|r| r.cpu.as_secs_f64()) * 1e6,
        median(&|r| r.idle_kib as f64) / 1024.0,
        rounds.iter().map(|r| r.peak_kib).max().unwrap_or(0) as f64 / 1024.0,
    );
}

async fn round(sql: &Client, name: &str) -> Round {
    let (plain_slot, conn_slot) = (format!("{name}_plain"), format!("{name}_conn"));
    sql.batch_execute(&format!(
        "CREATE TABLE {name} (id bigserial PRIMARY KEY, customer text NOT NULL, total numeric(12,2) NOT NULL); CREATE PUBLICATION {name} FOR TABLE {name}"
    ))
    .await
    .unwrap();
    for slot in [&plain_slot, &conn_slot] {
        sql.query(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[slot],
        )
        .await
        .unwrap();
    }
    for _ in 0..COUNT / 1000 {
        sql.batch_execute(&format!(
            "INSERT INTO {name} (customer, total) SELECT 'customer-' || i, i * 0.25 FROM generate_series(1, 1000) i"
        ))
        .await
        .unwrap();
    }
    let end: i64 = sql
        .query_one("SELECT (pg_current_wal_lsn() - '0/0')::bigint", &[])
        .await
        .unwrap()
        .get(0);

    let function = NoopFunction::spawn(name).unwrap();
    let body = format!(
        r#"{{"op":"insert","schema":"public","table":"{name}","lsn":"0/1A2B3C4D","new":{{"id":1234,"customer":"customer-1234","total":"308.50"}}}}"#
    );
    let topic = name.to_owned();
    let _ = load::ceiling(&function.url(), "postgres-connector", INFLIGHT, 2000, {
        let (topic, body) = (topic.clone(), body.clone());
        move |i| message(&topic, &body, i)
    })
    .await
    .unwrap();
    let ceiling = load::ceiling(
        &function.url(),
        "postgres-connector",
        INFLIGHT,
        COUNT as u64,
        move |i| message(&topic, &body, i),
    )
    .await
    .unwrap();

    let plain = plain_client(name, &plain_slot).await;

    let metrics = load::free_addr().unwrap();
    let config = format!(
        "[connector]\ngateway_url = \"{url}\"\nmetrics_addr = \"{metrics}\"\ntopics = [\"{name}\"]\nmax_inflight = {INFLIGHT}\n\n[postgres]\nurl = \"{pg}\"\nslot = \"{conn_slot}\"\npublication = \"{name}\"\ndead_letter_table = \"\"\n",
        url = function.url(),
        pg = postgres_url(),
    );
    let connector =
        ConnectorProcess::start(env!("CARGO_BIN_EXE_postgres-connector"), &config, metrics)
            .await
            .unwrap();
    let pid = connector.pid;
    let started = Instant::now();
    let idle_kib = load::status_kib(pid, "VmRSS");
    let cpu = load::cpu_time(pid);
    let deadline = started + Duration::from_secs(300);
    loop {
        let calls = function.calls().await.unwrap();
        let confirmed: i64 = sql
            .query_one(
                "SELECT (confirmed_flush_lsn - '0/0')::bigint FROM pg_replication_slots WHERE slot_name = $1",
                &[&conn_slot],
            )
            .await
            .unwrap()
            .get(0);
        if calls >= COUNT as u64 && confirmed >= end {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "connector did not finish: {calls} calls"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = started.elapsed();
    let cpu = load::cpu_time(pid) - cpu;
    let peak_kib = load::status_kib(pid, "VmHWM");
    connector.stop().unwrap();
    drop(function);
    for slot in [&plain_slot, &conn_slot] {
        sql.query("SELECT pg_drop_replication_slot($1)", &[slot])
            .await
            .unwrap();
    }
    sql.batch_execute(&format!("DROP PUBLICATION {name}; DROP TABLE {name}"))
        .await
        .unwrap();
    Round {
        ceiling,
        plain,
        connector: COUNT as f64 / took.as_secs_f64(),
        cpu: cpu / COUNT as u32,
        idle_kib,
        peak_kib,
    }
}

/// The request the connector makes for one row.
fn message(topic: &str, body: &str, i: u64) -> Message {
    let mut m = Message::new(
        topic,
        body.to_owned(),
        format!("slot/0/1A2B3C4D/{i}"),
        "postgres://127.0.0.1:5432/postgres",
    )
    .with_content_type("application/json")
    .with_subject(format!("public.{topic}"));
    m.add_header("X-Postgres-Table", &format!("public.{topic}"));
    m.add_header("X-Postgres-Operation", "insert");
    m.add_header("X-Postgres-Lsn", "0/1A2B3C4D");
    m
}

/// Rows per second a bare replication client decodes from `slot`, confirming each commit.
async fn plain_client(publication: &str, slot: &str) -> f64 {
    let pg: tokio_postgres::Config = postgres_url().parse().unwrap();
    let host = match &pg.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(h) => h.clone(),
        other => panic!("{other:?}"),
    };
    let cfg = ReplicationConfig::new(
        host,
        pg.get_user().unwrap_or("postgres"),
        "",
        pg.get_dbname().unwrap_or("postgres"),
        slot,
        publication,
    )
    .with_port(pg.get_ports().first().copied().unwrap_or(5432));
    let started = Instant::now();
    let mut client = ReplicationClient::connect(cfg).await.unwrap();
    let mut parser = LogicalReplicationParser::with_protocol_version(1);
    let mut rows = 0usize;
    while rows < COUNT {
        match client.recv().await.unwrap() {
            Some(ReplicationEvent::XLogData { data, .. }) => {
                if let LogicalReplicationMessage::Insert { .. } =
                    parser.parse_wal_message_bytes(data).unwrap().message
                {
                    rows += 1;
                }
            }
            Some(ReplicationEvent::Commit { end_lsn, .. }) => {
                client.update_applied_lsn(Lsn::from_u64(end_lsn.as_u64()));
            }
            Some(_) => {}
            None => panic!("the stream ended"),
        }
    }
    let rate = COUNT as f64 / started.elapsed().as_secs_f64();
    let _ = client.shutdown().await;
    rate
}
