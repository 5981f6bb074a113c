//! Redis for end-to-end tests: Redis Streams as a [`Fixture`] and [`ReplayFixture`] with
//! its own consumer group and the dead-letter stream `<topic>:dead-letter`, and
//! [`OwnRedis`], a redis-server of a test's own to stop and start.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use redis::Value;

use crate::replay::ReplayFixture;
use crate::scenarios::{Fixture, eventually_async};
use crate::{free_addr, redis_url};

/// Streams consumed by one group, dead letters to `<stream>:dead-letter`.
pub struct RedisStreams {
    url: String,
    group: String,
    /// `claim_idle` of the `[redis]` section.
    claim_idle: String,
    /// The CA of a TLS server, for the fixture's own connections.
    ca: Option<PathBuf>,
    /// Extra lines for the `[redis]` section.
    extra: String,
}

impl Default for RedisStreams {
    fn default() -> Self {
        Self::new()
    }
}

impl RedisStreams {
    /// On `REDIS_URL`, with a fresh group name, `claim_idle = "3s"` and no extra lines.
    pub fn new() -> Self {
        Self {
            url: redis_url(),
            group: crate::unique("group"),
            claim_idle: "3s".to_owned(),
            ca: None,
            extra: String::new(),
        }
    }

    /// On the Redis at `url` instead of `REDIS_URL`.
    #[must_use]
    pub fn with_url(mut self, url: impl Into<String>) -> Self {
        self.url = url.into();
        self
    }

    /// With `claim_idle = "<claim_idle>"` in the `[redis]` section.
    #[must_use]
    pub fn with_claim_idle(mut self, claim_idle: &str) -> Self {
        claim_idle.clone_into(&mut self.claim_idle);
        self
    }

    /// With `extra` (TOML lines) at the end of the `[redis]` section.
    #[must_use]
    pub fn with_extra_config(mut self, extra: &str) -> Self {
        extra.clone_into(&mut self.extra);
        self
    }

    /// The fixture's own connections trust the CA in `ca` (for a `rediss://` url; the
    /// connector's is `tls_ca_file`, an extra config line).
    #[must_use]
    pub fn with_tls_ca(mut self, ca: PathBuf) -> Self {
        self.ca = Some(ca);
        self
    }

    /// The consumer group.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// A connection to the test's Redis.
    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        let client = match &self.ca {
            None => redis::Client::open(self.url.as_str()),
            Some(ca) => redis::Client::build_with_tls(
                self.url.as_str(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(std::fs::read(ca).unwrap()),
                },
            ),
        };
        client
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// The dead-letter stream of `topic`.
    pub fn dead_letter_stream(topic: &str) -> String {
        format!("{topic}:dead-letter")
    }

    /// The `payload` field of every entry of `stream`, oldest first.
    pub async fn payloads(&self, stream: &str) -> Vec<Vec<u8>> {
        self.entries(stream)
            .await
            .into_iter()
            .filter_map(|mut fields| fields.remove("payload"))
            .collect()
    }

    /// Every field of every dead-letter entry of `topic`, oldest first.
    pub async fn dead_letter_entries(&self, topic: &str) -> Vec<BTreeMap<String, Vec<u8>>> {
        self.entries(&Self::dead_letter_stream(topic)).await
    }

    /// Every field of every entry of `stream`, oldest first.
    async fn entries(&self, stream: &str) -> Vec<BTreeMap<String, Vec<u8>>> {
        let mut c = self.conn().await;
        let reply: Value = redis::cmd("XRANGE")
            .arg(stream)
            .arg("-")
            .arg("+")
            .query_async(&mut c)
            .await
            .unwrap();
        let Value::Array(entries) = reply else {
            return Vec::new();
        };
        entries
            .into_iter()
            .filter_map(|e| match e {
                Value::Array(mut pair) if pair.len() == 2 => match pair.remove(1) {
                    Value::Array(flat) => Some(
                        flat.chunks(2)
                            .filter_map(|kv| match kv {
                                [Value::BulkString(k), Value::BulkString(v)] => {
                                    Some((String::from_utf8_lossy(k).into_owned(), v.clone()))
                                }
                                _ => None,
                            })
                            .collect(),
                    ),
                    _ => None,
                },
                _ => None,
            })
            .collect()
    }

    /// Pending entries and lag of the group on `topic` (what it has not acknowledged),
    /// read in one transaction: read apart, an entry the connector reads in between
    /// would be counted in neither (or, the other way round, in both).
    pub async fn backlog(&self, topic: &str) -> (u64, u64) {
        let mut c = self.conn().await;
        let (pending, groups): (Value, Value) = redis::pipe()
            .atomic()
            .cmd("XPENDING")
            .arg(topic)
            .arg(&self.group)
            .cmd("XINFO")
            .arg("GROUPS")
            .arg(topic)
            .query_async(&mut c)
            .await
            .unwrap_or((Value::Nil, Value::Nil));
        let pending = match pending {
            Value::Array(parts) => match parts.first() {
                Some(Value::Int(n)) => u64::try_from(*n).unwrap_or(0),
                _ => 0,
            },
            _ => 0,
        };
        // Unread entries: those after the group's last delivered id.
        let mut lag = 0;
        if let Value::Array(groups) = groups {
            for g in groups {
                let Value::Array(flat) = g else { continue };
                let field = |name: &[u8]| {
                    flat.chunks(2).find_map(|kv| match kv {
                        [Value::BulkString(k), v] if k == name => Some(v.clone()),
                        _ => None,
                    })
                };
                if field(b"name") == Some(Value::BulkString(self.group.clone().into_bytes())) {
                    lag = match field(b"lag") {
                        Some(Value::Int(n)) => u64::try_from(n).unwrap_or(0),
                        _ => u64::MAX,
                    };
                }
            }
        }
        (pending, lag)
    }

    /// The names of the group's consumers on `topic`.
    pub async fn consumers(&self, topic: &str) -> Vec<String> {
        let mut c = self.conn().await;
        let reply: Value = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(topic)
            .arg(&self.group)
            .query_async(&mut c)
            .await
            .unwrap_or(Value::Nil);
        let Value::Array(consumers) = reply else {
            return Vec::new();
        };
        consumers
            .iter()
            .filter_map(|c| match c {
                Value::Array(flat) => flat.chunks(2).find_map(|kv| match kv {
                    [Value::BulkString(k), Value::BulkString(v)] if k == b"name" => {
                        Some(String::from_utf8_lossy(v).into_owned())
                    }
                    _ => None,
                }),
                _ => None,
            })
            .collect()
    }
}

#[async_trait::async_trait]
impl Fixture for RedisStreams {
    fn binary(&self) -> PathBuf {
        crate::binary("redis-connector", "redis-connector")
    }

    async fn create_topic(&self, topic: &str) {
        let mut c = self.conn().await;
        let _: () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(topic)
            .arg(&self.group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut c)
            .await
            .unwrap();
    }

    fn source_config(&self, _topic: &str) -> String {
        format!(
            r#"[redis]
url = "{url}"
group = "{group}"
body_field = "payload"
block = "500ms"
claim_idle = "{claim_idle}"
claim_interval = "500ms"
metrics_interval = "200ms"
{extra}
"#,
            url = self.url,
            group = self.group,
            claim_idle = self.claim_idle,
            extra = self.extra,
        )
    }

    /// No dead-letter stream; a held entry is claimed again after one second idle
    /// (`claim_idle`, its minimum), looked for every 200 ms.
    fn source_config_without_dead_letters(&self, _topic: &str) -> String {
        format!(
            r#"[redis]
url = "{url}"
group = "{group}"
body_field = "payload"
block = "200ms"
claim_idle = "1s"
claim_interval = "200ms"
metrics_interval = "200ms"
dead_letter_stream = ""
{extra}
"#,
            url = self.url,
            group = self.group,
            extra = self.extra,
        )
    }

    async fn produce(&self, topic: &str, payloads: &[Vec<u8>]) {
        let mut c = self.conn().await;
        let mut pipe = redis::pipe();
        for p in payloads {
            pipe.cmd("XADD")
                .arg(topic)
                .arg("*")
                .arg("payload")
                .arg(p.as_slice())
                .ignore();
        }
        let _: () = pipe.query_async(&mut c).await.unwrap();
    }

    async fn dead_letters(&self, topic: &str) -> Vec<Vec<u8>> {
        self.payloads(&Self::dead_letter_stream(topic)).await
    }

    async fn unacknowledged(&self, topic: &str) -> u64 {
        let (pending, lag) = self.backlog(topic).await;
        pending.saturating_add(lag)
    }
}

#[async_trait::async_trait]
impl ReplayFixture for RedisStreams {
    async fn remaining_dead_letters(&self, topic: &str) -> Vec<Vec<u8>> {
        self.dead_letters(topic).await
    }
}

/// A redis-server of our own on a free loopback port (never the shared one).
pub struct OwnRedis {
    port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Default for OwnRedis {
    fn default() -> Self {
        Self::new()
    }
}

impl OwnRedis {
    /// The loopback port it listens on (once started).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A free port, nothing started yet: connecting to it is refused until [`Self::start`].
    pub fn new() -> Self {
        Self {
            port: free_addr().port(),
            child: None,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// Starts it (no persistence) and waits until it answers.
    pub async fn start(&mut self) {
        self.start_with(&[], &self.url()).await;
    }

    /// Starts it serving TLS only, with a certificate for 127.0.0.1 signed by a CA made
    /// here (openssl); returns the CA file.
    pub async fn start_tls(&mut self) -> PathBuf {
        let ca = crate::tls_certificates(self.dir.path());
        let port = self.port.to_string();
        let probe = String::new();
        self.start_with(
            &[
                "--port",
                "0",
                "--tls-port",
                &port,
                "--tls-cert-file",
                "server.crt",
                "--tls-key-file",
                "server.key",
                "--tls-ca-cert-file",
                "ca.crt",
                "--tls-auth-clients",
                "no",
            ],
            &probe,
        )
        .await;
        ca
    }

    async fn start_with(&mut self, args: &[&str], probe: &str) {
        let mut command = Command::new("redis-server");
        if args.is_empty() {
            command.args(["--port", &self.port.to_string()]);
        }
        let child = command
            .args(args)
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(self.dir.path())
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/test.sh installs it)");
        self.child = Some(child);
        let url = probe.to_owned();
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        assert!(
            eventually_async(Duration::from_secs(10), || async {
                if url.is_empty() {
                    // TLS: listening is enough.
                    return tokio::net::TcpStream::connect(addr).await.is_ok();
                }
                match redis::Client::open(url.as_str()) {
                    Ok(c) => c.get_multiplexed_async_connection().await.is_ok(),
                    Err(_) => false,
                }
            })
            .await,
            "own redis-server did not start"
        );
    }

    /// Kills it; its data is gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
    }
}
