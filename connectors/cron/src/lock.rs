//! Tick leases in Redis: any number of replicas fire each scheduled time of each function
//! once.
//!
//! Every replica computes the same fire times. At a tick, each tries
//! `SET {prefix}:tick:{function}:{unix_ms} {replica} NX PX {lease}`:
//!
//! - the one that succeeds fires, renewing the lease while the firing runs, and on the
//!   end writes `done` (kept for `retention`) and advances `{prefix}:last:{function}`;
//! - the others watch the key until it says `done`. If it disappears first (the owner
//!   died and its lease lapsed), they race for it again and the winner fires: the tick is
//!   not lost. The function may then see the tick twice, with the same `ce-id`.
//!
//! On shutdown an owner whose firing was cut short deletes its claim, so a peer takes the
//! tick over at once instead of after the lease.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};
use tokio::sync::OnceCell;

/// Result of trying to claim a tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This replica owns the tick and must fire it.
    Won,
    /// Another replica is firing it.
    Taken,
    /// It was already fired.
    Done,
}

/// Why Redis could not answer.
#[derive(Debug, thiserror::Error)]
#[error("redis: {0}")]
pub struct LockError(#[from] redis::RedisError);

const DONE: &str = "done";

/// The lease store. Cheap to clone.
#[derive(Clone)]
pub struct Leases {
    client: redis::Client,
    // Connected on first use, so that a Redis that is down at start delays coordination
    // instead of failing the connector; the manager reconnects by itself afterwards.
    conn: std::sync::Arc<OnceCell<ConnectionManager>>,
    prefix: String,
    replica: String,
    lease: Duration,
    retention: Duration,
}

impl std::fmt::Debug for Leases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leases")
            .field("prefix", &self.prefix)
            .field("replica", &self.replica)
            .finish()
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl Leases {
    /// A store on `url`; connects on first use. Fails only if the URL is invalid.
    pub fn new(
        url: &str,
        prefix: &str,
        replica: &str,
        lease: Duration,
        retention: Duration,
    ) -> Result<Self, LockError> {
        let client = redis::Client::open(url)?;
        Ok(Self {
            client,
            conn: std::sync::Arc::new(OnceCell::new()),
            prefix: prefix.to_owned(),
            replica: replica.to_owned(),
            lease,
            retention,
        })
    }

    async fn conn(&self) -> Result<ConnectionManager, LockError> {
        let conn = self
            .conn
            .get_or_try_init(|| {
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_number_of_retries(2)
                    .set_connection_timeout(Some(Duration::from_secs(2)))
                    .set_response_timeout(Some(Duration::from_secs(2)));
                ConnectionManager::new_with_config(self.client.clone(), config)
            })
            .await?;
        Ok(conn.clone())
    }

    /// This replica's name.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// How long a claim lasts without renewal.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    fn tick_key(&self, function: &str, tick: DateTime<Utc>) -> String {
        format!(
            "{}:tick:{function}:{}",
            self.prefix,
            tick.timestamp_millis()
        )
    }

    fn last_key(&self, function: &str) -> String {
        format!("{}:last:{function}", self.prefix)
    }

    /// Tries to claim `tick` of `function`.
    pub async fn claim(&self, function: &str, tick: DateTime<Utc>) -> Result<Claim, LockError> {
        let key = self.tick_key(function, tick);
        let mut conn = self.conn().await?;
        let set: Option<String> = redis::cmd("SET")
            .arg(&key)
            .arg(&self.replica)
            .arg("NX")
            .arg("PX")
            .arg(ms(self.lease))
            .query_async(&mut conn)
            .await?;
        if set.is_some() {
            return Ok(Claim::Won);
        }
        let holder: Option<String> = conn.get(&key).await?;
        Ok(match holder.as_deref() {
            Some(DONE) => Claim::Done,
            Some(_) => Claim::Taken,
            // Lapsed between the two calls: let the caller try again on its next look.
            None => Claim::Taken,
        })
    }

    /// Extends this replica's claim on `tick`; `false` if it no longer holds it.
    pub async fn renew(&self, function: &str, tick: DateTime<Utc>) -> Result<bool, LockError> {
        let script = Script::new(
            r"if redis.call('GET', KEYS[1]) == ARGV[1] then
                return redis.call('PEXPIRE', KEYS[1], ARGV[2])
              else return 0 end",
        );
        let mut conn = self.conn().await?;
        let renewed: i64 = script
            .key(self.tick_key(function, tick))
            .arg(&self.replica)
            .arg(ms(self.lease))
            .invoke_async(&mut conn)
            .await?;
        Ok(renewed == 1)
    }

    /// Marks `tick` fired (if this replica holds it) and advances the function's
    /// last-fired watermark.
    pub async fn finish(&self, function: &str, tick: DateTime<Utc>) -> Result<(), LockError> {
        let script = Script::new(
            r"if redis.call('GET', KEYS[1]) == ARGV[1] then
                redis.call('SET', KEYS[1], 'done', 'PX', ARGV[2])
              end
              local last = tonumber(redis.call('GET', KEYS[2]) or '0')
              if tonumber(ARGV[3]) > last then
                redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
              end
              return 1",
        );
        let mut conn = self.conn().await?;
        let _: i64 = script
            .key(self.tick_key(function, tick))
            .key(self.last_key(function))
            .arg(&self.replica)
            .arg(ms(self.retention))
            .arg(tick.timestamp_millis())
            .arg(ms(self.retention.max(Duration::from_secs(30 * 24 * 3600))))
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    /// Gives up this replica's claim on `tick` so a peer can fire it now.
    pub async fn release(&self, function: &str, tick: DateTime<Utc>) -> Result<(), LockError> {
        let script = Script::new(
            r"if redis.call('GET', KEYS[1]) == ARGV[1] then
                return redis.call('DEL', KEYS[1])
              else return 0 end",
        );
        let mut conn = self.conn().await?;
        let _: i64 = script
            .key(self.tick_key(function, tick))
            .arg(&self.replica)
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    /// The last tick of `function` any replica finished, if one is remembered.
    pub async fn last_fired(&self, function: &str) -> Result<Option<DateTime<Utc>>, LockError> {
        let mut conn = self.conn().await?;
        let last: Option<i64> = conn.get(self.last_key(function)).await?;
        Ok(last.and_then(|ms| Utc.timestamp_millis_opt(ms).single()))
    }

    /// Whether some replica holds `tick` of `function` and has not finished it.
    pub async fn running(&self, function: &str, tick: DateTime<Utc>) -> Result<bool, LockError> {
        let mut conn = self.conn().await?;
        let holder: Option<String> = conn.get(self.tick_key(function, tick)).await?;
        Ok(holder.is_some_and(|h| h != DONE))
    }

    /// Round-trips to Redis.
    pub async fn ping(&self) -> Result<(), LockError> {
        let mut conn = self.conn().await?;
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(())
    }
}
