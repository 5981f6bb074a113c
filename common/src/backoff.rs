//! Exponential backoff with full jitter, shared by delivery retries and by every loop that
//! reconnects to a gateway or broker.
//!
//! Attempt `n` (1-based) waits a uniformly random time in `[0, min(cap, initial * 2^(n-1))]`
//! ("full jitter", as in the AWS architecture blog's analysis): retries from many
//! deliveries that failed together spread out instead of arriving in waves.

use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};

/// Backoff parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Backoff {
    /// The upper bound of the first wait. (default: `"500ms"`)
    #[serde(with = "crate::config::duration")]
    pub initial: Duration,
    /// No wait is longer than this, `Retry-After` included. (default: `"60s"`)
    #[serde(with = "crate::config::duration")]
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(60),
        }
    }
}

impl Backoff {
    /// The largest wait attempt `attempt` (1-based) may draw: `min(max, initial * 2^(attempt-1))`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(31);
        self.initial
            .checked_mul(1u32 << exponent)
            .unwrap_or(self.max)
            .min(self.max)
    }

    /// A random wait before retry number `attempt` (1-based), full jitter.
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt);
        if ceiling.is_zero() {
            return ceiling;
        }
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rand::rng().random_range(0..=nanos))
    }

    /// The wait before retry `attempt` when the server asked for `retry_after`: the larger of
    /// the two, never above `max`.
    pub fn delay_with_hint(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let drawn = self.delay(attempt);
        match retry_after {
            Some(hint) => drawn.max(hint).min(self.max),
            None => drawn,
        }
    }

    /// A fresh [`Attempts`] counter over these parameters, for reconnect loops.
    pub fn attempts(self) -> Attempts {
        Attempts {
            backoff: self,
            attempt: 0,
        }
    }
}

/// Counts consecutive failures for a reconnect loop: `next_delay` after each failure,
/// `reset` after a success.
#[derive(Debug, Clone)]
pub struct Attempts {
    backoff: Backoff,
    attempt: u32,
}

impl Attempts {
    /// The wait after one more consecutive failure.
    pub fn next_delay(&mut self) -> Duration {
        self.attempt = self.attempt.saturating_add(1);
        self.backoff.delay(self.attempt)
    }

    /// Forget earlier failures: the next wait starts small again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backoff(initial_ms: u64, max_ms: u64) -> Backoff {
        Backoff {
            initial: Duration::from_millis(initial_ms),
            max: Duration::from_millis(max_ms),
        }
    }

    #[test]
    fn ceiling_doubles_then_caps() {
        let b = backoff(100, 1_000);
        let ceilings: Vec<u128> = (1..=6).map(|n| b.ceiling(n).as_millis()).collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1_000, 1_000]);
        assert_eq!(b.ceiling(0), Duration::from_millis(100));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_millis(1_000));
    }

    #[test]
    fn delays_stay_within_bounds_and_spread() {
        let b = backoff(100, 1_000);
        for attempt in 1..=10 {
            let mut seen = std::collections::HashSet::new();
            for _ in 0..200 {
                let d = b.delay(attempt);
                assert!(d <= b.ceiling(attempt), "{d:?} above ceiling at {attempt}");
                seen.insert(d);
            }
            assert!(seen.len() > 100, "no jitter at attempt {attempt}");
        }
    }

    #[test]
    fn retry_after_raises_the_wait_but_not_past_the_cap() {
        let b = backoff(10, 5_000);
        let d = b.delay_with_hint(1, Some(Duration::from_secs(2)));
        assert_eq!(d, Duration::from_secs(2));
        let d = b.delay_with_hint(1, Some(Duration::from_secs(3_600)));
        assert_eq!(d, Duration::from_secs(5));
        assert!(b.delay_with_hint(1, None) <= Duration::from_millis(10));
    }

    #[test]
    fn zero_initial_means_no_wait() {
        assert_eq!(backoff(0, 0).delay(3), Duration::ZERO);
    }

    #[test]
    fn attempts_reset() {
        let mut a = backoff(100, 100_000).attempts();
        for _ in 0..5 {
            a.next_delay();
        }
        assert_eq!(a.failures(), 5);
        a.reset();
        assert!(a.next_delay() <= Duration::from_millis(100));
    }
}
