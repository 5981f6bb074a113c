//! From a function's response to what happens to the delivery next.
//!
//! The default table (DESIGN.md, "Verdict"):
//!
//! | response | verdict |
//! | --- | --- |
//! | 2xx | [`Verdict::Delivered`] |
//! | 408, 409, 425, 429, 5xx, connection error, timeout | [`Verdict::Retry`] (429 and 503 honour `Retry-After`) |
//! | other 4xx (and anything else) | [`Verdict::DeadLetter`] at once |
//!
//! The classes are configurable with [`StatusClasses`]: a list of status patterns per
//! verdict (`"2xx"`, `"404"`, `"500-599"`). A status that matches no list is dead-lettered.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};

/// What the dispatcher does with a delivery after one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The function accepted the message.
    Delivered,
    /// Try again after a backoff; `retry_after` is the server's own hint, if it gave one.
    Retry { retry_after: Option<Duration> },
    /// The function rejected the message for good: dead-letter it without retrying.
    DeadLetter,
    /// The operator chose to discard messages answered with this status.
    Drop,
}

/// One status pattern: a single code (`404`), a class (`5xx`) or an inclusive range
/// (`500-504`). Written as a string in configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusPattern {
    low: u16,
    high: u16,
}

impl StatusPattern {
    /// A pattern matching `low..=high`.
    pub const fn range(low: u16, high: u16) -> Self {
        Self { low, high }
    }

    /// A pattern matching one code.
    pub const fn code(code: u16) -> Self {
        Self::range(code, code)
    }

    /// A pattern matching a whole class, `class` being the hundreds digit (`5` for 5xx).
    pub const fn class(class: u16) -> Self {
        Self::range(class * 100, class * 100 + 99)
    }

    /// Whether `status` is covered.
    pub fn matches(&self, status: u16) -> bool {
        (self.low..=self.high).contains(&status)
    }
}

/// Why a status pattern could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid status pattern `{0}`: expected a code (404), a class (5xx) or a range (500-504)")]
pub struct InvalidStatusPattern(String);

impl FromStr for StatusPattern {
    type Err = InvalidStatusPattern;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || InvalidStatusPattern(s.to_owned());
        let text = s.trim();
        let parse_code = |t: &str| -> Result<u16, InvalidStatusPattern> {
            let code: u16 = t.trim().parse().map_err(|_| err())?;
            if (100..=599).contains(&code) {
                Ok(code)
            } else {
                Err(err())
            }
        };
        if let Some(class) = text.strip_suffix("xx").or_else(|| text.strip_suffix("XX")) {
            let digit: u16 = class.parse().map_err(|_| err())?;
            if !(1..=5).contains(&digit) {
                return Err(err());
            }
            return Ok(Self::class(digit));
        }
        if let Some((low, high)) = text.split_once('-') {
            let (low, high) = (parse_code(low)?, parse_code(high)?);
            if low > high {
                return Err(err());
            }
            return Ok(Self::range(low, high));
        }
        parse_code(text).map(Self::code)
    }
}

impl fmt::Display for StatusPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.low == self.high {
            write!(f, "{}", self.low)
        } else if self.low.is_multiple_of(100) && self.high == self.low + 99 {
            write!(f, "{}xx", self.low / 100)
        } else {
            write!(f, "{}-{}", self.low, self.high)
        }
    }
}

impl Serialize for StatusPattern {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for StatusPattern {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = StatusPattern;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an HTTP status code, class (\"5xx\") or range (\"500-504\")")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<StatusPattern, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<StatusPattern, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<StatusPattern, E> {
                self.visit_str(&v.to_string())
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// Which response statuses mean what. Checked in order: delivered, drop, retry; anything
/// else is dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StatusClasses {
    /// Statuses that count as delivered. (default: `["2xx"]`)
    pub delivered: Vec<StatusPattern>,
    /// Statuses that are retried with backoff; `Retry-After` is honoured on them.
    /// (default: `["408", "409", "425", "429", "5xx"]`)
    pub retry: Vec<StatusPattern>,
    /// Statuses whose message is discarded without a dead letter. (default: `[]`)
    pub drop: Vec<StatusPattern>,
}

impl Default for StatusClasses {
    fn default() -> Self {
        Self {
            delivered: vec![StatusPattern::class(2)],
            retry: vec![
                StatusPattern::code(408),
                StatusPattern::code(409),
                StatusPattern::code(425),
                StatusPattern::code(429),
                StatusPattern::class(5),
            ],
            drop: Vec::new(),
        }
    }
}

impl StatusClasses {
    /// The verdict for a response with `status` and `headers`, read at `now` (for an
    /// HTTP-date `Retry-After`).
    pub fn classify(&self, status: StatusCode, headers: &HeaderMap, now: SystemTime) -> Verdict {
        let code = status.as_u16();
        let any = |patterns: &[StatusPattern]| patterns.iter().any(|p| p.matches(code));
        if any(&self.delivered) {
            Verdict::Delivered
        } else if any(&self.drop) {
            Verdict::Drop
        } else if any(&self.retry) {
            Verdict::Retry {
                retry_after: retry_after(headers, now),
            }
        } else {
            Verdict::DeadLetter
        }
    }

    /// The verdict when no response arrived (connection refused or reset, timeout):
    /// always a retry, the gateway or function may come back.
    pub fn classify_transport_error(&self) -> Verdict {
        Verdict::Retry { retry_after: None }
    }
}

/// Reads `Retry-After` as delay-seconds or an HTTP-date (RFC 9110 §10.2.3). A date in the
/// past means "now"; anything unreadable is ignored.
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify(code: u16, headers: &[(&str, &str)]) -> Verdict {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        StatusClasses::default().classify(
            StatusCode::from_u16(code).unwrap(),
            &map,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000),
        )
    }

    #[test]
    fn default_table() {
        for code in [200, 201, 202, 204, 299] {
            assert_eq!(classify(code, &[]), Verdict::Delivered, "{code}");
        }
        for code in [408, 409, 425, 429, 500, 502, 503, 504, 599] {
            assert_eq!(
                classify(code, &[]),
                Verdict::Retry { retry_after: None },
                "{code}"
            );
        }
        for code in [400, 401, 403, 404, 405, 410, 413, 422, 301, 302, 100] {
            assert_eq!(classify(code, &[]), Verdict::DeadLetter, "{code}");
        }
    }

    #[test]
    fn retry_after_seconds_and_date() {
        assert_eq!(
            classify(429, &[("retry-after", "7")]),
            Verdict::Retry {
                retry_after: Some(Duration::from_secs(7))
            }
        );
        let later =
            httpdate::fmt_http_date(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + 120));
        assert_eq!(
            classify(503, &[("retry-after", &later)]),
            Verdict::Retry {
                retry_after: Some(Duration::from_secs(120))
            }
        );
        let earlier = httpdate::fmt_http_date(SystemTime::UNIX_EPOCH);
        assert_eq!(
            classify(503, &[("retry-after", &earlier)]),
            Verdict::Retry {
                retry_after: Some(Duration::ZERO)
            }
        );
        assert_eq!(
            classify(503, &[("retry-after", "soon")]),
            Verdict::Retry { retry_after: None }
        );
    }

    #[test]
    fn patterns_parse_and_print() {
        for (text, printed) in [
            ("404", "404"),
            ("5xx", "5xx"),
            ("5XX", "5xx"),
            ("500-504", "500-504"),
            (" 429 ", "429"),
        ] {
            let p: StatusPattern = text.parse().unwrap();
            assert_eq!(p.to_string(), printed);
        }
        for bad in ["", "6xx", "0xx", "abc", "600", "504-500", "99", "4x"] {
            assert!(bad.parse::<StatusPattern>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn configured_classes_override_the_table() {
        let classes = StatusClasses {
            delivered: vec!["200".parse().unwrap()],
            retry: vec!["404".parse().unwrap(), "5xx".parse().unwrap()],
            drop: vec!["410".parse().unwrap()],
        };
        let now = SystemTime::now();
        let headers = HeaderMap::new();
        let at = |c| classes.classify(StatusCode::from_u16(c).unwrap(), &headers, now);
        assert_eq!(at(200), Verdict::Delivered);
        assert_eq!(at(202), Verdict::DeadLetter);
        assert_eq!(at(404), Verdict::Retry { retry_after: None });
        assert_eq!(at(410), Verdict::Drop);
        assert_eq!(at(400), Verdict::DeadLetter);
    }
}
