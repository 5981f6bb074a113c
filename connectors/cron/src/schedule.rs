//! Schedule expressions, as OpenFaaS users write them, turned into fire times.
//!
//! Accepted forms (the `cron` crate parses; this module only adapts the notation):
//!
//! | form | example |
//! | --- | --- |
//! | 5 fields: minute hour day-of-month month day-of-week | `*/5 * * * *` |
//! | 6 fields, seconds first | `*/10 * * * * *` |
//! | 7 fields, seconds first and a year | `0 0 12 1 1 * 2030` |
//! | shorthands | `@yearly` (`@annually`), `@monthly`, `@weekly`, `@daily` (`@midnight`), `@hourly` |
//! | fixed interval | `@every 30s`, `@every 1m30s` |
//!
//! A time zone is given as a prefix, as robfig/cron accepts it:
//! `CRON_TZ=Europe/Paris 0 9 * * 1-5` (or `TZ=`); without one, the connector's
//! `time_zone` applies (UTC by default).
//! Days of the week are numbered as in Unix cron, 0 or 7 for Sunday through 6 for
//! Saturday; names (`MON-FRI`) work too. `@every` ticks are aligned to the Unix epoch, so
//! that every replica computes the same fire times.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;

/// Why an expression was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// The `CRON_TZ=`/`TZ=` prefix names no IANA zone.
    #[error("unknown time zone `{0}` (expected an IANA name such as Europe/Paris)")]
    TimeZone(String),
    /// `@every` without a valid duration of at least one second.
    #[error("invalid interval `{0}`: write `@every 30s`, at least 1s")]
    Interval(String),
    /// Wrong number of fields.
    #[error(
        "expected 5 fields (minute hour day month weekday), 6 or 7 with seconds first; found {0}"
    )]
    Fields(usize),
    /// The cron crate refused the fields.
    #[error("{0}")]
    Cron(String),
    /// The expression never fires (`0 0 30 2 *`).
    #[error("the expression never fires")]
    Never,
}

/// A parsed schedule.
#[derive(Debug, Clone)]
pub enum Schedule {
    /// A cron expression evaluated in a time zone.
    Cron {
        /// The parsed fields.
        schedule: Box<cron::Schedule>,
        /// The zone the fields are read in.
        zone: Tz,
    },
    /// Every `interval`, aligned to the Unix epoch.
    Every(Duration),
}

impl Schedule {
    /// Parses `expression`; fields without a zone prefix are read in `default_zone`.
    pub fn parse(expression: &str, default_zone: Tz) -> Result<Self, ScheduleError> {
        let mut text = expression.trim();
        let mut zone = default_zone;
        for prefix in ["CRON_TZ=", "TZ="] {
            if let Some(rest) = text.strip_prefix(prefix) {
                let (name, fields) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
                zone = Tz::from_str(name).map_err(|_| ScheduleError::TimeZone(name.to_owned()))?;
                text = fields.trim();
                break;
            }
        }
        if let Some(interval) = text.strip_prefix("@every") {
            let interval = interval.trim();
            let duration = humantime::parse_duration(interval)
                .ok()
                .filter(|d| *d >= Duration::from_secs(1))
                .ok_or_else(|| ScheduleError::Interval(interval.to_owned()))?;
            return Ok(Self::Every(duration));
        }
        let fields = normalize(text)?;
        let schedule =
            cron::Schedule::from_str(&fields).map_err(|e| ScheduleError::Cron(e.to_string()))?;
        let parsed = Self::Cron {
            schedule: Box::new(schedule),
            zone,
        };
        if parsed.next_after(Utc::now()).is_none() {
            return Err(ScheduleError::Never);
        }
        Ok(parsed)
    }

    /// The first fire time strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Self::Cron { schedule, zone } => schedule
                .after(&after.with_timezone(zone))
                .next()
                .map(|t| t.with_timezone(&Utc)),
            Self::Every(interval) => {
                let step = i64::try_from(interval.as_millis()).ok()?.max(1);
                let now = after.timestamp_millis();
                let next = (now.div_euclid(step) + 1).checked_mul(step)?;
                Utc.timestamp_millis_opt(next).single()
            }
        }
    }

    /// Fire times in `(from, until]`, oldest first, at most `limit` of them.
    pub fn between(
        &self,
        from: DateTime<Utc>,
        until: DateTime<Utc>,
        limit: usize,
    ) -> Vec<DateTime<Utc>> {
        let mut times = Vec::new();
        let mut cursor = from;
        while times.len() < limit {
            match self.next_after(cursor) {
                Some(t) if t <= until => {
                    times.push(t);
                    cursor = t;
                }
                _ => break,
            }
        }
        times
    }
}

/// Turns the accepted notations into the `cron` crate's: seconds first, Sunday = 1.
fn normalize(text: &str) -> Result<String, ScheduleError> {
    let shorthand = match text {
        "@yearly" | "@annually" => Some("0 0 0 1 1 *"),
        "@monthly" => Some("0 0 0 1 * *"),
        "@weekly" => Some("0 0 0 * * SUN"),
        "@daily" | "@midnight" => Some("0 0 0 * * *"),
        "@hourly" => Some("0 0 * * * *"),
        _ => None,
    };
    if let Some(fields) = shorthand {
        return Ok(fields.to_owned());
    }
    let mut fields: Vec<String> = text.split_whitespace().map(str::to_owned).collect();
    match fields.len() {
        5 => fields.insert(0, "0".to_owned()),
        6 | 7 => {}
        n => return Err(ScheduleError::Fields(n)),
    }
    fields[5] = weekdays(&fields[5]);
    Ok(fields.join(" "))
}

const DAY_NAMES: [&str; 8] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT", "SUN"];

/// Rewrites Unix day numbers (0–7, Sunday = 0 or 7) as names, which mean the same in
/// every cron dialect. Steps (`*/2`) and names are left alone; a range ending on Sunday
/// as 7 (`5-7`) becomes `FRI-SAT,SUN`.
fn weekdays(field: &str) -> String {
    let name = |n: &str| -> Option<&'static str> {
        n.parse::<usize>()
            .ok()
            .and_then(|i| DAY_NAMES.get(i).copied())
    };
    field
        .split(',')
        .map(|part| {
            let (base, step) = match part.split_once('/') {
                Some((b, s)) => (b, Some(s)),
                None => (part, None),
            };
            let base = match base.split_once('-') {
                Some((a, b)) => match (name(a), name(b)) {
                    (Some(a), Some(_)) if b == "7" && step.is_none() => {
                        format!("{a}-SAT,SUN")
                    }
                    (Some(a), Some(b)) => format!("{a}-{b}"),
                    _ => base.to_owned(),
                },
                None => name(base).map_or_else(|| base.to_owned(), str::to_owned),
            };
            match step {
                Some(s) => format!("{base}/{s}"),
                None => base,
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Datelike, Timelike, Weekday};

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn next(expr: &str, after: &str) -> DateTime<Utc> {
        Schedule::parse(expr, Tz::UTC)
            .unwrap()
            .next_after(at(after))
            .unwrap()
    }

    #[test]
    fn five_fields_fire_on_the_minute() {
        assert_eq!(
            next("*/5 * * * *", "2030-01-01T10:02:30Z"),
            at("2030-01-01T10:05:00Z")
        );
        assert_eq!(
            next("0 9 * * *", "2030-01-01T10:00:00Z"),
            at("2030-01-02T09:00:00Z")
        );
    }

    #[test]
    fn six_and_seven_fields_have_seconds() {
        assert_eq!(
            next("*/10 * * * * *", "2030-01-01T10:00:01Z"),
            at("2030-01-01T10:00:10Z")
        );
        assert_eq!(
            next("0 0 12 1 1 * 2031", "2030-06-01T00:00:00Z"),
            at("2031-01-01T12:00:00Z")
        );
    }

    #[test]
    fn weekdays_use_unix_numbering() {
        // 2030-01-05 is a Saturday.
        let monday = next("0 9 * * 1-5", "2030-01-05T00:00:00Z");
        assert_eq!(monday.weekday(), Weekday::Mon);
        let sunday = next("0 9 * * 0", "2030-01-01T00:00:00Z");
        assert_eq!(sunday.weekday(), Weekday::Sun);
        let sunday7 = next("0 9 * * 7", "2030-01-01T00:00:00Z");
        assert_eq!(sunday7.weekday(), Weekday::Sun);
        let weekend = next("0 9 * * 6-7", "2030-01-01T00:00:00Z");
        assert_eq!(weekend.weekday(), Weekday::Sat);
        assert_eq!(
            next("0 9 * * MON-FRI", "2030-01-05T00:00:00Z").weekday(),
            Weekday::Mon
        );
        assert_eq!(weekdays("1-5"), "MON-FRI");
        assert_eq!(weekdays("0,3"), "SUN,WED");
        assert_eq!(weekdays("*/2"), "*/2");
        assert_eq!(weekdays("1-5/2"), "MON-FRI/2");
        assert_eq!(weekdays("5-7"), "FRI-SAT,SUN");
    }

    #[test]
    fn shorthands() {
        let after = "2030-03-15T10:30:00Z";
        assert_eq!(next("@hourly", after), at("2030-03-15T11:00:00Z"));
        assert_eq!(next("@daily", after), at("2030-03-16T00:00:00Z"));
        assert_eq!(next("@midnight", after), at("2030-03-16T00:00:00Z"));
        assert_eq!(next("@weekly", after).weekday(), Weekday::Sun);
        assert_eq!(next("@monthly", after), at("2030-04-01T00:00:00Z"));
        assert_eq!(next("@yearly", after), at("2031-01-01T00:00:00Z"));
        assert_eq!(next("@annually", after), at("2031-01-01T00:00:00Z"));
    }

    #[test]
    fn every_is_aligned_to_the_epoch() {
        assert_eq!(
            next("@every 30s", "2030-01-01T10:00:10Z"),
            at("2030-01-01T10:00:30Z")
        );
        assert_eq!(
            next("@every 30s", "2030-01-01T10:00:30Z"),
            at("2030-01-01T10:01:00Z")
        );
        assert_eq!(next("@every 1m30s", "2030-01-01T00:00:00Z").second(), 30);
        assert!(matches!(
            Schedule::parse("@every 10ms", Tz::UTC),
            Err(ScheduleError::Interval(_))
        ));
        assert!(Schedule::parse("@every soon", Tz::UTC).is_err());
    }

    #[test]
    fn time_zone_prefix_and_default_zone() {
        // 09:00 in Paris in January is 08:00 UTC.
        let t = Schedule::parse("CRON_TZ=Europe/Paris 0 9 * * *", Tz::UTC)
            .unwrap()
            .next_after(at("2030-01-10T00:00:00Z"))
            .unwrap();
        assert_eq!(t, at("2030-01-10T08:00:00Z"));
        let t = Schedule::parse("TZ=America/New_York 0 9 * * *", Tz::UTC)
            .unwrap()
            .next_after(at("2030-01-10T00:00:00Z"))
            .unwrap();
        assert_eq!(t, at("2030-01-10T14:00:00Z"));
        let t = Schedule::parse("0 9 * * *", Tz::Europe__Paris)
            .unwrap()
            .next_after(at("2030-07-10T00:00:00Z"))
            .unwrap();
        assert_eq!(t, at("2030-07-10T07:00:00Z"), "summer time");
        assert_eq!(
            Schedule::parse("CRON_TZ=Mars/Olympus 0 9 * * *", Tz::UTC).unwrap_err(),
            ScheduleError::TimeZone("Mars/Olympus".into())
        );
    }

    #[test]
    fn invalid_expressions_say_why() {
        assert_eq!(
            Schedule::parse("* * *", Tz::UTC).unwrap_err(),
            ScheduleError::Fields(3)
        );
        assert!(matches!(
            Schedule::parse("61 * * * *", Tz::UTC),
            Err(ScheduleError::Cron(_))
        ));
        assert!(Schedule::parse("not a cron", Tz::UTC).is_err());
        assert!(Schedule::parse("", Tz::UTC).is_err());
        assert_eq!(
            Schedule::parse("0 0 0 30 2 * 2030", Tz::UTC).unwrap_err(),
            ScheduleError::Never
        );
    }

    #[test]
    fn between_lists_missed_ticks() {
        let s = Schedule::parse("@every 1s", Tz::UTC).unwrap();
        let times = s.between(at("2030-01-01T00:00:00Z"), at("2030-01-01T00:00:05Z"), 100);
        assert_eq!(times.len(), 5);
        assert_eq!(times[4], at("2030-01-01T00:00:05Z"));
        assert_eq!(
            s.between(at("2030-01-01T00:00:00Z"), at("2030-01-02T00:00:00Z"), 10)
                .len(),
            10
        );
    }
}
