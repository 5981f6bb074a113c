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
//!
//! When Redis cannot be reached, no replica can claim a tick; what the scheduler does then
//! is `lock.on_unavailable` (skip, by default). The store itself reconnects with
//! exponential backoff ([`RECONNECT`]): after a failure, calls fail at once with
//! [`LockError::Backoff`] until the delay has passed, so a Redis that is down costs one
//! connection attempt per delay, not one per tick of every function.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use connector_sdk::backoff::{Attempts, Backoff};
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, RedisResult, Script};
use tokio::sync::Mutex;
use tokio::time::Instant;

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

/// Why the lease store could not answer.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Redis refused the command, or could not be reached on this attempt.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Redis could not be reached moments ago; the next attempt waits for the backoff.
    #[error(
        "redis unreachable ({failures} failed attempts in a row); next attempt in {retry_in:?}"
    )]
    Backoff {
        /// Consecutive failed attempts.
        failures: u32,
        /// Until the next attempt.
        retry_in: Duration,
    },
}

/// Delays between attempts to reach an unreachable Redis: full jitter, up to 500 ms after
/// the first failure, doubling to at most 10 s, so a Redis that comes back is used again
/// within seconds.
pub const RECONNECT: Backoff = Backoff {
    initial: Duration::from_millis(500),
    max: Duration::from_secs(10),
};

const DONE: &str = "done";

/// When the next attempt to reach Redis may go out: the backoff state machine, apart
/// from any I/O so that it can be tested on its own.
#[derive(Debug)]
struct Reachability {
    failures: Attempts,
    retry_at: Option<Instant>,
}

impl Reachability {
    fn new() -> Self {
        Self {
            failures: RECONNECT.attempts(),
            retry_at: None,
        }
    }

    /// `Ok` if an attempt may go out at `now`, else the error saying how long to wait.
    fn check(&self, now: Instant) -> Result<(), LockError> {
        match self.retry_at {
            Some(at) if now < at => Err(LockError::Backoff {
                failures: self.failures.failures(),
                retry_in: at - now,
            }),
            _ => Ok(()),
        }
    }

    /// An attempt at `now` found Redis unreachable: wait longer before the next.
    fn failed(&mut self, now: Instant) {
        self.retry_at = Some(now + self.failures.next_delay());
    }

    /// Redis answered: the next failure starts the backoff afresh.
    fn answered(&mut self) {
        self.failures.reset();
        self.retry_at = None;
    }
}

/// The connection to Redis, made on first use (so that a Redis that is down at start
/// does not fail the connector), and its reachability. Once made, the manager
/// reconnects by itself; the reachability spaces out the attempts.
struct Link {
    manager: Option<ConnectionManager>,
    reachability: Reachability,
}

/// Whether `e` says Redis could not be reached (rather than that it answered an error).
fn unreachable(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_connection_refusal() || e.is_timeout() || e.is_connection_dropped()
}

/// The lease store. Cheap to clone.
#[derive(Clone)]
pub struct Leases {
    client: redis::Client,
    // One connection attempt at a time: callers arriving meanwhile wait for its outcome
    // (a connection to share, or a backoff to respect) instead of starting their own.
    link: std::sync::Arc<Mutex<Link>>,
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
            link: std::sync::Arc::new(Mutex::new(Link {
                manager: None,
                reachability: Reachability::new(),
            })),
            prefix: prefix.to_owned(),
            replica: replica.to_owned(),
            lease,
            retention,
        })
    }

    /// The connection, made now if there is none; fails at once while the backoff after
    /// the last failure runs.
    async fn conn(&self) -> Result<ConnectionManager, LockError> {
        let mut link = self.link.lock().await;
        link.reachability.check(Instant::now())?;
        if let Some(manager) = &link.manager {
            return Ok(manager.clone());
        }
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_number_of_retries(2)
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)));
        match ConnectionManager::new_with_config(self.client.clone(), config).await {
            Ok(manager) => {
                link.reachability.answered();
                link.manager = Some(manager.clone());
                Ok(manager)
            }
            Err(e) => {
                link.reachability.failed(Instant::now());
                Err(e.into())
            }
        }
    }

    /// Records what a command's `result` says about Redis's reachability.
    async fn settle<T>(&self, result: RedisResult<T>) -> Result<T, LockError> {
        let mut link = self.link.lock().await;
        match &result {
            Err(e) if unreachable(e) => link.reachability.failed(Instant::now()),
            _ => link.reachability.answered(),
        }
        Ok(result?)
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
        let result = async {
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
        .await;
        self.settle(result).await
    }

    /// Extends this replica's claim on `tick`; `false` if it no longer holds it.
    pub async fn renew(&self, function: &str, tick: DateTime<Utc>) -> Result<bool, LockError> {
        let script = Script::new(
            r"if redis.call('GET', KEYS[1]) == ARGV[1] then
                return redis.call('PEXPIRE', KEYS[1], ARGV[2])
              else return 0 end",
        );
        let mut conn = self.conn().await?;
        let renewed: i64 = self
            .settle(
                script
                    .key(self.tick_key(function, tick))
                    .arg(&self.replica)
                    .arg(ms(self.lease))
                    .invoke_async(&mut conn)
                    .await,
            )
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
        let _: i64 = self
            .settle(
                script
                    .key(self.tick_key(function, tick))
                    .key(self.last_key(function))
                    .arg(&self.replica)
                    .arg(ms(self.retention))
                    .arg(tick.timestamp_millis())
                    .arg(ms(self.retention.max(Duration::from_secs(30 * 24 * 3600))))
                    .invoke_async(&mut conn)
                    .await,
            )
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
        let _: i64 = self
            .settle(
                script
                    .key(self.tick_key(function, tick))
                    .arg(&self.replica)
                    .invoke_async(&mut conn)
                    .await,
            )
            .await?;
        Ok(())
    }

    /// The last tick of `function` any replica finished, if one is remembered.
    pub async fn last_fired(&self, function: &str) -> Result<Option<DateTime<Utc>>, LockError> {
        let mut conn = self.conn().await?;
        let last: Option<i64> = self.settle(conn.get(self.last_key(function)).await).await?;
        Ok(last.and_then(|ms| Utc.timestamp_millis_opt(ms).single()))
    }

    /// Whether some replica holds `tick` of `function` and has not finished it.
    pub async fn running(&self, function: &str, tick: DateTime<Utc>) -> Result<bool, LockError> {
        let mut conn = self.conn().await?;
        let holder: Option<String> = self
            .settle(conn.get(self.tick_key(function, tick)).await)
            .await?;
        Ok(holder.is_some_and(|h| h != DONE))
    }

    /// Round-trips to Redis.
    pub async fn ping(&self) -> Result<(), LockError> {
        let mut conn = self.conn().await?;
        let _: String = self
            .settle(redis::cmd("PING").query_async(&mut conn).await)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_redis_is_tried_again_only_after_a_growing_backoff() {
        let start = Instant::now();
        let mut r = Reachability::new();
        assert!(r.check(start).is_ok(), "the first attempt goes out at once");
        let mut ceilings = Vec::new();
        for failure in 1..=8u32 {
            let now = start + Duration::from_secs(u64::from(failure) * 100);
            r.failed(now);
            let ceiling = RECONNECT.ceiling(failure);
            ceilings.push(ceiling);
            // Right after the failure no attempt goes out unless the jitter drew zero.
            match r.check(now) {
                Err(LockError::Backoff { failures, retry_in }) => {
                    assert_eq!(failures, failure);
                    assert!(retry_in <= ceiling, "{retry_in:?} > {ceiling:?}");
                }
                Err(e) => panic!("unexpected {e}"),
                Ok(()) => {}
            }
            assert!(
                r.check(now + ceiling).is_ok(),
                "the delay never exceeds its ceiling"
            );
        }
        assert_eq!(ceilings[0], Duration::from_millis(500));
        assert_eq!(ceilings[1], Duration::from_secs(1));
        assert_eq!(*ceilings.last().unwrap(), RECONNECT.max);
        // An answer resets it: the next failure waits at most the first delay again.
        r.answered();
        assert!(r.check(start).is_ok());
        r.failed(start);
        assert!(r.check(start + RECONNECT.initial).is_ok());
        assert_eq!(r.failures.failures(), 1);
    }
}
