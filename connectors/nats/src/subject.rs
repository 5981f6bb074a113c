//! NATS subjects: validation, wildcard matching as the server does it, and which of
//! several overlapping subscriptions owns a message.
//!
//! A subject is tokens separated by `.`; a pattern may use `*` (exactly one token) and `>`
//! (one or more tokens, last only). Function annotations are patterns: a message on
//! `orders.eu.created` goes to functions subscribed to `orders.eu.created`, `orders.*.created`,
//! `orders.>` and `>`, each once.
//!
//! Subscriptions (core) and consumers (JetStream) follow the topic map's patterns, which
//! may overlap (`orders.*` and `orders.eu`). Core queue subscriptions need nothing more:
//! the server gives a message to one member of a queue group across every matching
//! subscription with that group name. But plain subscriptions and JetStream consumers
//! each get their own copy. The [`owner`] of a subject is the smallest pattern (in byte
//! order) among those subscribed that match it; only the owner's copy is delivered, the
//! others are skipped (JetStream: acknowledged). Every replica computes the same owner,
//! so each message is delivered once however the patterns overlap.

use std::sync::Arc;

use connector_sdk::dispatcher::Matcher;
use connector_sdk::{FunctionRef, TopicMap};

/// Why a subject, pattern or name is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    /// Empty.
    #[error("is empty")]
    Empty,
    /// Whitespace or a control character.
    #[error("contains whitespace")]
    Whitespace,
    /// `a..b`, `.a`, `a.`.
    #[error("has an empty token")]
    EmptyToken,
    /// `>` not last, or a wildcard inside a token (`a*`).
    #[error("has a misplaced wildcard (`*` is a whole token, `>` the last token)")]
    Wildcard,
    /// A wildcard where a concrete subject is needed.
    #[error("has a wildcard")]
    NotConcrete,
    /// A stream or consumer name with `.`, `*`, `>`, `/` or `\`.
    #[error("must not contain `.`, `*`, `>`, `/`, `\\` or whitespace")]
    BadName,
}

fn check_chars(s: &str) -> Result<(), SubjectError> {
    if s.is_empty() {
        return Err(SubjectError::Empty);
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(SubjectError::Whitespace);
    }
    Ok(())
}

/// A subscription pattern: tokens, `*` tokens, and `>` as the last token.
pub fn validate_pattern(pattern: &str) -> Result<(), SubjectError> {
    check_chars(pattern)?;
    let tokens: Vec<&str> = pattern.split('.').collect();
    let last = tokens.len() - 1;
    for (i, token) in tokens.iter().enumerate() {
        if token.is_empty() {
            return Err(SubjectError::EmptyToken);
        }
        let wild = token.contains('*') || token.contains('>');
        if wild && !(*token == "*" || (*token == ">" && i == last)) {
            return Err(SubjectError::Wildcard);
        }
    }
    Ok(())
}

/// A concrete subject one can publish to.
pub fn validate_subject(subject: &str) -> Result<(), SubjectError> {
    validate_pattern(subject)?;
    if subject.split('.').any(|t| t == "*" || t == ">") {
        return Err(SubjectError::NotConcrete);
    }
    Ok(())
}

/// A stream or consumer name.
pub fn validate_name(name: &str) -> Result<(), SubjectError> {
    check_chars(name)?;
    if name.contains(['.', '*', '>', '/', '\\']) {
        return Err(SubjectError::BadName);
    }
    Ok(())
}

/// Whether `subject` matches `pattern`, as the server decides it.
pub fn matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether some subject matches both patterns (a consumer filter `a` can select
/// messages of a stream capturing `b`).
pub fn overlaps(a: &str, b: &str) -> bool {
    let mut x = a.split('.');
    let mut y = b.split('.');
    loop {
        match (x.next(), y.next()) {
            (Some(">"), Some(_)) | (Some(_), Some(">")) => return true,
            (Some("*"), Some(_)) | (Some(_), Some("*")) => {}
            (Some(p), Some(q)) if p == q => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The pattern among `subscribed` that owns messages on `subject`: the smallest that
/// matches it.
pub fn owner<'a>(subscribed: impl IntoIterator<Item = &'a str>, subject: &str) -> Option<&'a str> {
    subscribed.into_iter().filter(|p| matches(p, subject)).min()
}

/// The functions subscribed to `subject` in `map`, through any pattern, each once.
pub fn functions_for(map: &TopicMap, subject: &str) -> Arc<[FunctionRef]> {
    map.functions_matching(subject, matches)
}

/// The dispatcher's matcher: NATS wildcards in annotations.
pub fn matcher() -> Matcher {
    connector_sdk::dispatcher::pattern_matcher(matches)
}

#[cfg(test)]
mod tests {
    use super::*;
    use connector_sdk::topic_map::FunctionStatus;

    #[test]
    fn patterns_and_subjects() {
        for ok in ["a", "a.b", "a.*", "a.>", ">", "*", "a.*.c", "orders-eu.x_y"] {
            assert_eq!(validate_pattern(ok), Ok(()), "{ok}");
        }
        assert_eq!(validate_pattern(""), Err(SubjectError::Empty));
        assert_eq!(validate_pattern("a..b"), Err(SubjectError::EmptyToken));
        assert_eq!(validate_pattern(".a"), Err(SubjectError::EmptyToken));
        assert_eq!(validate_pattern("a."), Err(SubjectError::EmptyToken));
        assert_eq!(validate_pattern("a b"), Err(SubjectError::Whitespace));
        assert_eq!(validate_pattern("a.>.b"), Err(SubjectError::Wildcard));
        assert_eq!(validate_pattern("a*"), Err(SubjectError::Wildcard));
        assert_eq!(validate_subject("a.*"), Err(SubjectError::NotConcrete));
        assert_eq!(validate_subject("a.b"), Ok(()));
        assert_eq!(validate_name("orders"), Ok(()));
        assert_eq!(validate_name("a.b"), Err(SubjectError::BadName));
    }

    #[test]
    fn matching_follows_the_server() {
        assert!(matches("a.b", "a.b"));
        assert!(!matches("a.b", "a.b.c"));
        assert!(matches("a.*", "a.b"));
        assert!(!matches("a.*", "a.b.c"));
        assert!(!matches("a.*", "a"));
        assert!(matches("a.>", "a.b.c"));
        assert!(!matches("a.>", "a"));
        assert!(matches(">", "a"));
        assert!(matches("*.b.*", "x.b.y"));
        assert!(!matches("*.b.*", "x.c.y"));
    }

    #[test]
    fn overlapping_patterns() {
        assert!(overlaps("orders.*", "orders.>"));
        assert!(overlaps("orders.eu", "*.eu"));
        assert!(overlaps(">", "a.b"));
        assert!(overlaps("a.*.c", "a.b.*"));
        assert!(!overlaps("orders.*", "payments.>"));
        assert!(!overlaps("a.b", "a.b.c"));
        assert!(!overlaps("a.*", "a"));
    }

    #[test]
    fn the_owner_is_the_same_for_every_overlapping_pattern() {
        let subscribed = ["orders.*", "orders.eu", "orders.>", "payments.*"];
        assert_eq!(owner(subscribed, "orders.eu"), Some("orders.*"));
        assert_eq!(owner(subscribed, "orders.eu.x"), Some("orders.>"));
        assert_eq!(owner(subscribed, "payments.x"), Some("payments.*"));
        assert_eq!(owner(subscribed, "other"), None);
    }

    fn function(name: &str, topic: &str) -> FunctionStatus {
        FunctionStatus {
            name: name.into(),
            namespace: None,
            annotations: [("topic".to_owned(), topic.to_owned())].into(),
        }
    }

    #[test]
    fn functions_by_wildcard_each_once() {
        let list = [
            function("exact", "orders.created"),
            function("star", "orders.*"),
            function("tail", "orders.>"),
            function("both", "orders.*, orders.created"),
            function("other", "payments.*"),
        ];
        let map = TopicMap::build(&list, ",");
        let names = |subject: &str| {
            let mut v: Vec<String> = functions_for(&map, subject)
                .iter()
                .map(ToString::to_string)
                .collect();
            v.sort();
            v
        };
        assert_eq!(names("orders.created"), ["both", "exact", "star", "tail"]);
        assert_eq!(names("orders.eu.created"), ["tail"]);
        assert_eq!(names("payments.in"), ["other"]);
        assert!(names("nothing").is_empty());
    }
}
