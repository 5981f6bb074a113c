//! Wildcard topic patterns for sources whose subscriptions have wildcards of their own:
//! a topic is a sequence of levels split on a separator, one wildcard stands for exactly
//! one level and another for any number of levels (none included). [`Wildcards::MQTT`]
//! (`/`, `+`, `#`) and [`Wildcards::AMQP`] (`.`, `*`, `#`) are such syntaxes; a connector
//! passes `|p, t| Wildcards::MQTT.matches(p, t)` to
//! [`pattern_matcher`](crate::dispatcher::pattern_matcher) so that a function's `topic`
//! annotation selects messages as the broker's subscription does.

/// A topic syntax with a one-level and a many-level wildcard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wildcards {
    /// Between levels.
    pub separator: char,
    /// Matches exactly one level.
    pub one: &'static str,
    /// Matches zero or more levels.
    pub any: &'static str,
    /// Topics starting with `$` (MQTT's `$SYS`, `$share`) are not matched by a wildcard
    /// in the first level.
    pub dollar_is_system: bool,
}

impl Wildcards {
    /// MQTT topic filters: `sensors/+/temp`, `sensors/#` (`#` also matches `sensors`).
    pub const MQTT: Self = Self {
        separator: '/',
        one: "+",
        any: "#",
        dollar_is_system: true,
    };

    /// AMQP topic-exchange binding keys: `orders.*`, `orders.#`, `#.created`.
    pub const AMQP: Self = Self {
        separator: '.',
        one: "*",
        any: "#",
        dollar_is_system: false,
    };

    /// Whether `pattern` covers `topic`.
    pub fn matches(&self, pattern: &str, topic: &str) -> bool {
        if self.dollar_is_system
            && topic.starts_with('$')
            && !pattern.starts_with('$')
            && !pattern.is_empty()
        {
            return false;
        }
        let pattern: Vec<&str> = pattern.split(self.separator).collect();
        let topic: Vec<&str> = topic.split(self.separator).collect();
        // Dynamic programming over (pattern prefix, topic prefix): `reach[j]` says whether
        // the pattern so far can consume exactly the first `j` levels of the topic.
        let mut reach = vec![false; topic.len() + 1];
        reach[0] = true;
        for level in &pattern {
            let mut next = vec![false; topic.len() + 1];
            if *level == self.any {
                let mut seen = false;
                for j in 0..=topic.len() {
                    seen |= reach[j];
                    next[j] = seen;
                }
            } else {
                for j in 0..topic.len() {
                    next[j + 1] = reach[j] && (*level == self.one || *level == topic[j]);
                }
            }
            reach = next;
        }
        reach[topic.len()]
    }

    /// Whether every topic `narrow` matches is matched by `wide` too: a subscription to
    /// `wide` makes one to `narrow` redundant (and a broker that sends one copy per
    /// matching subscription, as Mosquitto does for MQTT 5, would send it twice).
    pub fn covers(&self, wide: &str, narrow: &str) -> bool {
        // `narrow`'s wildcards as literal levels no topic has: only a wildcard of `wide`
        // matches them, and only `any` matches `narrow`'s `any`.
        let literal: Vec<String> = narrow
            .split(self.separator)
            .map(|level| {
                if level == self.one || level == self.any {
                    format!("\0{level}")
                } else {
                    level.to_owned()
                }
            })
            .collect();
        let sep = self.separator.to_string();
        if !self.matches(wide, &literal.join(&sep)) {
            return false;
        }
        match literal.split_last() {
            // `a/#` also matches `a`: so must `wide`, and it must end in `any` itself.
            Some((last, parent)) if *last == format!("\0{}", self.any) => {
                wide.ends_with(self.any)
                    && (parent.is_empty() || self.matches(wide, &parent.join(&sep)))
            }
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Wildcards;

    #[test]
    fn mqtt_filters() {
        let m = |p, t| Wildcards::MQTT.matches(p, t);
        for (p, t) in [
            ("a/b", "a/b"),
            ("a/+", "a/b"),
            ("+/+", "a/b"),
            ("a/#", "a"),
            ("a/#", "a/b/c"),
            ("#", "a/b"),
            ("+/b/#", "a/b"),
            ("a/+/c", "a//c"),
            ("$SYS/#", "$SYS/broker"),
        ] {
            assert!(m(p, t), "{p} {t}");
        }
        for (p, t) in [
            ("a/b", "a/b/c"),
            ("a/+", "a"),
            ("a/+", "a/b/c"),
            ("+/b", "b"),
            ("#", "$SYS/broker"),
            ("+/broker", "$SYS/broker"),
            ("a/b", "a.b"),
        ] {
            assert!(!m(p, t), "{p} {t}");
        }
    }

    #[test]
    fn covering_filters() {
        let c = |w, n| Wildcards::MQTT.covers(w, n);
        for (w, n) in [
            ("p/#", "p/+/temp"),
            ("p/#", "p/#"),
            ("+/#", "p/#"),
            ("#", "p"),
            ("p/+/temp", "p/a/temp"),
            ("p/+", "p/+"),
        ] {
            assert!(c(w, n), "{w} {n}");
        }
        for (w, n) in [
            ("p/+", "p/#"),
            ("p/+/#", "p/#"),
            ("p/a/temp", "p/+/temp"),
            ("p/+/temp", "p/#"),
            ("q/#", "p/a"),
        ] {
            assert!(!c(w, n), "{w} {n}");
        }
    }

    #[test]
    fn amqp_keys_match_as_the_broker_does() {
        let m = |p, t| Wildcards::AMQP.matches(p, t);
        for (p, t) in [
            ("a.b", "a.b"),
            ("a.*", "a.b"),
            ("a.#", "a"),
            ("a.#", "a.b.c"),
            ("#", "anything.at.all"),
            ("#.c", "a.b.c"),
            ("*.b.#", "a.b"),
            ("a.#.d", "a.b.c.d"),
        ] {
            assert!(m(p, t), "{p} {t}");
        }
        for (p, t) in [
            ("a.b", "a.b.c"),
            ("a.*", "a"),
            ("a.*", "a.b.c"),
            ("*.b", "b"),
            ("a.#.d", "a.b.c"),
        ] {
            assert!(!m(p, t), "{p} {t}");
        }
    }
}
