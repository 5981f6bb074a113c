//! A subscription's delivery policy, read from its function's annotations.
//!
//! Every setting falls back to the connector's own (`[connector]`); an annotation
//! overrides it for that function only, and a change takes effect at the next topic-map
//! rebuild, without a restart. Retries use OpenFaaS Pro's annotations with their meaning,
//! so functions that already carry them behave as their authors expect; the rest are this
//! project's, in one family, `connector.*`:
//!
//! | annotation | meaning | falls back to |
//! | --- | --- | --- |
//! | `com.openfaas.retry.attempts` | attempts per delivery, the first included | `max_attempts` |
//! | `com.openfaas.retry.codes` | the statuses retried (`429,502,503`); every other non-2xx is dead-lettered at once | `[connector.status]` |
//! | `com.openfaas.retry.min_wait` | the first retry's backoff bound | `backoff.initial` |
//! | `com.openfaas.retry.max_wait` | the longest wait between attempts | `backoff.max` |
//! | `connector.max_inflight` | most invocations of the function in flight from this connector | none: only `max_inflight` |
//! | `connector.adaptive` | `true`: the limit halves after a 429 and grows back by one per limit's worth of successes | `false` |
//! | `connector.timeout` | one invocation's timeout | `upstream_timeout` |
//! | `connector.ordering` | `key`: this function receives the messages of one ordering key one after another; `none`: in parallel | `ordering` |
//! | `connector.batch.size` | most messages in one invocation, as a CloudEvents JSON batch (see [`crate::dispatcher`]'s batches) | `batch.size` (1: one message per invocation) |
//! | `connector.batch.window` | how long a batch waits to fill | `batch.window` |
//! | `connector.batch.max_bytes` | most bytes of payload in one batch | `batch.max_bytes` |
//! | `connector.filter` | a CEL expression over the event: the function is invoked only with the messages it is true for (see [`crate::filter`]) | none: every message |
//!
//! A value that does not parse makes the whole subscription invalid: it is logged with the
//! function and the key, counted, and skipped until it is fixed; the others keep running.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::filter::Filter;
use crate::verdict::{StatusClasses, StatusPattern};

/// OpenFaaS Pro: attempts per delivery.
pub const RETRY_ATTEMPTS: &str = "com.openfaas.retry.attempts";
/// OpenFaaS Pro: the statuses that are retried, comma-separated.
pub const RETRY_CODES: &str = "com.openfaas.retry.codes";
/// OpenFaaS Pro: the first wait between attempts.
pub const RETRY_MIN_WAIT: &str = "com.openfaas.retry.min_wait";
/// OpenFaaS Pro: the longest wait between attempts.
pub const RETRY_MAX_WAIT: &str = "com.openfaas.retry.max_wait";
/// Most invocations of the function in flight from one connector.
pub const MAX_INFLIGHT: &str = "connector.max_inflight";
/// Adaptive concurrency: shrink after 429s, grow back after successes.
pub const ADAPTIVE: &str = "connector.adaptive";
/// One invocation's timeout.
pub const TIMEOUT: &str = "connector.timeout";
/// Whether the function receives the messages of one ordering key one after another.
pub const ORDERING: &str = "connector.ordering";
/// A CEL expression: the function is invoked only with the messages it is true for.
pub const FILTER: &str = "connector.filter";
/// Most messages in one invocation (a batch).
pub const BATCH_SIZE: &str = "connector.batch.size";
/// How long a batch waits to fill.
pub const BATCH_WINDOW: &str = "connector.batch.window";
/// Most payload bytes in one batch.
pub const BATCH_MAX_BYTES: &str = "connector.batch.max_bytes";

/// A function's batches: it is invoked with up to `size` messages at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSettings {
    /// Most messages in one batch (at least 2).
    pub size: usize,
    /// How long the first message of a batch waits for the batch to fill.
    pub window: Duration,
    /// Most payload bytes in one batch; a message larger than this goes alone.
    pub max_bytes: usize,
}

/// The connector's batches (`[connector.batch]`), for functions whose annotations do
/// not say otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchDefaults {
    /// Most messages in one invocation; 1: no batches. Env `batch_size`. (default: `1`)
    pub size: usize,
    /// How long a batch waits to fill. Env `batch_window`. (default: `"100ms"`)
    #[serde(with = "crate::config::duration")]
    pub window: Duration,
    /// Most payload bytes in one batch (`1048576`, `"512KiB"`, `"1MiB"`).
    /// Env `batch_max_bytes`. (default: `"1MiB"`)
    pub max_bytes: bytesize::ByteSize,
}

impl Default for BatchDefaults {
    fn default() -> Self {
        Self {
            size: 1,
            window: Duration::from_millis(100),
            max_bytes: bytesize::ByteSize::mib(1),
        }
    }
}

impl BatchDefaults {
    /// A function's batches: its overrides over these; `None` for one message per call.
    pub fn settings(&self, own: Option<&BatchOverrides>) -> Option<BatchSettings> {
        let own = own.copied().unwrap_or_default();
        let size = own.size.unwrap_or(self.size);
        (size > 1).then(|| BatchSettings {
            size,
            window: own.window.unwrap_or(self.window),
            max_bytes: own
                .max_bytes
                .unwrap_or_else(|| usize::try_from(self.max_bytes.as_u64()).unwrap_or(usize::MAX)),
        })
    }
}

/// A function's `connector.batch.*` annotations; `None` falls back to `[connector.batch]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchOverrides {
    /// `connector.batch.size`.
    pub size: Option<usize>,
    /// `connector.batch.window`.
    pub window: Option<Duration>,
    /// `connector.batch.max_bytes`.
    pub max_bytes: Option<usize>,
}

/// A function's overrides of the connector's delivery settings; `None` falls back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyOverrides {
    /// Attempts per delivery.
    pub max_attempts: Option<u32>,
    /// The first retry's backoff bound.
    pub min_wait: Option<Duration>,
    /// The longest wait between attempts.
    pub max_wait: Option<Duration>,
    /// With `com.openfaas.retry.codes`: 2xx delivered, those codes retried, the rest
    /// dead-lettered.
    pub status: Option<StatusClasses>,
    /// Most invocations in flight from this connector.
    pub max_inflight: Option<usize>,
    /// Adaptive concurrency.
    pub adaptive: bool,
    /// One invocation's timeout.
    pub timeout: Option<Duration>,
    /// `Some(true)`: the function's deliveries of one ordering key run one after another;
    /// `Some(false)`: in parallel.
    pub ordered: Option<bool>,
    /// Only the messages this expression is true for are delivered.
    pub filter: Option<Filter>,
    /// Its batch settings, over the connector's.
    pub batch: BatchOverrides,
}

/// An annotation whose value cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("annotation `{key}` = {value:?}: {reason}")]
pub struct PolicyError {
    /// The annotation.
    pub key: &'static str,
    /// Its value.
    pub value: String,
    /// Why it cannot be used.
    pub reason: String,
}

/// Reads a function's annotations, each value trimmed, each error naming its annotation.
struct Reader<'a>(&'a BTreeMap<String, String>);

impl Reader<'_> {
    fn get(&self, key: &'static str) -> Option<(&'static str, &str)> {
        self.0.get(key).map(|v| (key, v.trim()))
    }

    /// A whole number of at least 1.
    fn positive<T: std::str::FromStr + PartialOrd + From<u8>>(
        &self,
        key: &'static str,
    ) -> Result<Option<T>, PolicyError> {
        let Some((key, v)) = self.get(key) else {
            return Ok(None);
        };
        match v.parse::<T>() {
            Ok(n) if n >= T::from(1) => Ok(Some(n)),
            _ => Err(fail(key, v, "a whole number of at least 1")),
        }
    }

    /// A duration (`250ms`, `2s`, `1m`).
    fn duration(&self, key: &'static str) -> Result<Option<Duration>, PolicyError> {
        self.get(key)
            .map(|(key, v)| crate::config::duration::parse(v).map_err(|e| fail(key, v, e)))
            .transpose()
    }
}

fn fail(key: &'static str, value: &str, reason: impl Into<String>) -> PolicyError {
    PolicyError {
        key,
        value: value.to_owned(),
        reason: reason.into(),
    }
}

/// The function's `connector.batch.*` annotations.
fn batch_overrides(read: &Reader<'_>) -> Result<BatchOverrides, PolicyError> {
    let mut batch = BatchOverrides {
        size: read.positive(BATCH_SIZE)?,
        window: read.duration(BATCH_WINDOW)?,
        max_bytes: None,
    };
    if let Some((key, v)) = read.get(BATCH_MAX_BYTES) {
        batch.max_bytes = Some(match v.parse::<bytesize::ByteSize>().map(|b| b.as_u64()) {
            Ok(n) if n >= 1 => usize::try_from(n).unwrap_or(usize::MAX),
            _ => return Err(fail(key, v, "a size in bytes (1048576, 512KiB, 1MiB)")),
        });
    }
    Ok(batch)
}

impl PolicyOverrides {
    /// Reads the delivery annotations of `annotations`; the others are ignored.
    pub fn from_annotations(annotations: &BTreeMap<String, String>) -> Result<Self, PolicyError> {
        let read = Reader(annotations);
        let mut p = Self {
            max_attempts: read.positive(RETRY_ATTEMPTS)?,
            min_wait: read.duration(RETRY_MIN_WAIT)?,
            max_wait: read.duration(RETRY_MAX_WAIT)?,
            timeout: read.duration(TIMEOUT)?,
            max_inflight: read.positive(MAX_INFLIGHT)?,
            batch: batch_overrides(&read)?,
            ..Self::default()
        };
        if let (Some(v), Some(t)) = (read.get(TIMEOUT), p.timeout)
            && t.is_zero()
        {
            return Err(fail(v.0, v.1, "must be above zero"));
        }
        if let (Some(min), Some(max)) = (p.min_wait, p.max_wait)
            && min > max
        {
            return Err(fail(
                RETRY_MIN_WAIT,
                &humantime::format_duration(min).to_string(),
                format!(
                    "longer than {RETRY_MAX_WAIT} ({})",
                    humantime::format_duration(max)
                ),
            ));
        }
        if let Some((key, v)) = read.get(RETRY_CODES) {
            let retry = v
                .split(',')
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(|c| c.parse::<StatusPattern>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| fail(key, v, e.to_string()))?;
            p.status = Some(StatusClasses {
                delivered: vec![StatusPattern::class(2)],
                retry,
                drop: Vec::new(),
            });
        }
        if let Some((key, v)) = read.get(ADAPTIVE) {
            p.adaptive = match v {
                "true" | "1" => true,
                "false" | "0" => false,
                _ => return Err(fail(key, v, "true or false")),
            };
        }
        if let Some((key, v)) = read.get(ORDERING) {
            p.ordered = Some(match v {
                "key" => true,
                "none" => false,
                _ => return Err(fail(key, v, "key or none")),
            });
        }
        if let Some((key, v)) = read.get(FILTER) {
            p.filter = Some(Filter::compile(v).map_err(|e| fail(key, v, e))?);
        }
        Ok(p)
    }

    /// Whether nothing is overridden.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Whether the function's concurrency is limited (a fixed or adaptive limit).
    pub fn limits_concurrency(&self) -> bool {
        self.max_inflight.is_some() || self.adaptive
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn openfaas_retry_annotations_and_ours_are_read() {
        let p = PolicyOverrides::from_annotations(&annotations(&[
            ("topic", "orders"),
            (RETRY_ATTEMPTS, "10"),
            (RETRY_CODES, "429, 502,503"),
            (RETRY_MIN_WAIT, "5s"),
            (RETRY_MAX_WAIT, "1m"),
            (MAX_INFLIGHT, "2"),
            (ADAPTIVE, "true"),
            (TIMEOUT, "750ms"),
            (ORDERING, "key"),
        ]))
        .unwrap();
        assert_eq!(p.max_attempts, Some(10));
        assert_eq!(p.min_wait, Some(Duration::from_secs(5)));
        assert_eq!(p.max_wait, Some(Duration::from_secs(60)));
        assert_eq!(p.max_inflight, Some(2));
        assert!(p.adaptive);
        assert_eq!(p.timeout, Some(Duration::from_millis(750)));
        assert_eq!(p.ordered, Some(true));
        let status = p.status.unwrap();
        assert_eq!(
            status.retry,
            [
                StatusPattern::code(429),
                StatusPattern::code(502),
                StatusPattern::code(503)
            ]
        );
        assert!(
            PolicyOverrides::from_annotations(&annotations(&[("topic", "t")]))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn a_bad_value_names_the_annotation() {
        for (key, value) in [
            (RETRY_ATTEMPTS, "0"),
            (RETRY_ATTEMPTS, "many"),
            (RETRY_MIN_WAIT, "5"),
            (RETRY_CODES, "429,abc"),
            (MAX_INFLIGHT, "0"),
            (ADAPTIVE, "maybe"),
            (TIMEOUT, "0s"),
            (ORDERING, "partition"),
        ] {
            let e = PolicyOverrides::from_annotations(&annotations(&[(key, value)])).unwrap_err();
            assert_eq!(e.key, key, "{e}");
            assert!(e.to_string().contains(value), "{e}");
        }
        let e = PolicyOverrides::from_annotations(&annotations(&[
            (RETRY_MIN_WAIT, "2m"),
            (RETRY_MAX_WAIT, "1m"),
        ]))
        .unwrap_err();
        assert_eq!(e.key, RETRY_MIN_WAIT);
    }
}
