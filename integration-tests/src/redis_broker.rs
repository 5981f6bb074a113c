//! Redis Streams for end-to-end tests: a [`Fixture`] and [`ReplayFixture`] with its own
//! consumer group, the dead-letter stream `<topic>:dead-letter`.

use std::path::PathBuf;

use redis::Value;

use crate::redis_url;
use crate::replay::ReplayFixture;
use crate::scenarios::Fixture;

/// Streams consumed by one group, dead letters to `<stream>:dead-letter`.
pub struct RedisStreams {
    url: String,
    group: String,
}

impl Default for RedisStreams {
    fn default() -> Self {
        Self::new()
    }
}

impl RedisStreams {
    /// On `REDIS_URL`, with a fresh group name.
    pub fn new() -> Self {
        Self {
            url: redis_url(),
            group: crate::unique("group"),
        }
    }

    /// A connection to the test's Redis.
    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url.as_str())
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
                    Value::Array(flat) => flat.chunks(2).find_map(|kv| match kv {
                        [Value::BulkString(k), Value::BulkString(v)] if k == b"payload" => {
                            Some(v.clone())
                        }
                        _ => None,
                    }),
                    _ => None,
                },
                _ => None,
            })
            .collect()
    }

    async fn pending_plus_lag(&self, topic: &str) -> u64 {
        let mut c = self.conn().await;
        let pending: Value = redis::cmd("XPENDING")
            .arg(topic)
            .arg(&self.group)
            .query_async(&mut c)
            .await
            .unwrap_or(Value::Nil);
        let pending = match pending {
            Value::Array(parts) => match parts.first() {
                Some(Value::Int(n)) => u64::try_from(*n).unwrap_or(0),
                _ => 0,
            },
            _ => 0,
        };
        // Unread entries: those after the group's last delivered id.
        let groups: Value = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(topic)
            .query_async(&mut c)
            .await
            .unwrap_or(Value::Nil);
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
        pending.saturating_add(lag)
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
claim_idle = "3s"
claim_interval = "500ms"
metrics_interval = "200ms"
"#,
            url = self.url,
            group = self.group,
        )
    }

    async fn produce(&self, topic: &str, payloads: &[Vec<u8>]) {
        let mut c = self.conn().await;
        for p in payloads {
            let _: String = redis::cmd("XADD")
                .arg(topic)
                .arg("*")
                .arg("payload")
                .arg(p.as_slice())
                .query_async(&mut c)
                .await
                .unwrap();
        }
    }

    async fn dead_letters(&self, topic: &str) -> Vec<Vec<u8>> {
        self.payloads(&Self::dead_letter_stream(topic)).await
    }

    async fn unacknowledged(&self, topic: &str) -> u64 {
        self.pending_plus_lag(topic).await
    }
}

#[async_trait::async_trait]
impl ReplayFixture for RedisStreams {
    async fn remaining_dead_letters(&self, topic: &str) -> Vec<Vec<u8>> {
        self.dead_letters(topic).await
    }
}
