//! Which of a message's own headers may reach the function: the one rule every connector's
//! invocations go through ([`GatewayClient::invocation_headers`] applies it).
//!
//! A message's headers come from whoever published it: NATS headers as they are, Kafka
//! record headers as `X-Kafka-<name>`, SQS attributes as `X-SQS-Attr-<name>`, and whatever
//! a dead letter carried back on replay. That input is untrusted (DESIGN.md, "Input from a
//! broker is untrusted"), so a header is withheld when forwarding it could
//!
//! - change the HTTP exchange itself: the hop-by-hop and framing headers (`Connection`,
//!   `Content-Length`, `Transfer-Encoding`, `TE`, `Trailer`, `Upgrade`, `Keep-Alive`,
//!   `Expect`, `Proxy-*`). A `Content-Length: 1` truncates the body, a
//!   `Transfer-Encoding: chunked` reframes it, an `Expect` makes the server wait;
//! - speak for the connector or redirect what the gateway does: `Host`, `Authorization`,
//!   `Cookie`, `X-Callback-Url` (the gateway would post the function's result to a URL the
//!   publisher chose), `X-Call-Id` (the gateway takes a caller's call id as its own), and
//!   the forwarding headers a proxy vouches for (`Forwarded`, `X-Forwarded-*`,
//!   `X-Real-IP`);
//! - impersonate a header the connector sets itself: `X-Topic`, `X-Connector`,
//!   `X-Delivery-Attempt`, `User-Agent` and every CloudEvents attribute (`ce-*`). The
//!   connector's values are set after the message's and would replace most of these
//!   anyway; withholding them all means one that the connector leaves unset on some
//!   message (`ce-subject`, `X-Callback-Url`) cannot be filled in by a publisher either;
//! - `traceparent` and `tracestate` are replaced, not forwarded: the invocation carries
//!   the context of the connector's delivery attempt, a child of the message's own (see
//!   [`crate::trace`]);
//! - `Content-Type` is not taken from the headers either: it comes from the connector's
//!   `content_type`, else the message's own ([`Message::content_type`], which each
//!   connector sets from its source's content type).
//!
//! Everything else (`X-Tenant`, `X-Kafka-*`, ...) passes unchanged. Names
//! are compared case-insensitively: [`HeaderName`]s are lowercase.
//!
//! [`GatewayClient::invocation_headers`]: crate::gateway::GatewayClient::invocation_headers
//! [`Message::content_type`]: crate::message::Message::content_type

use http::HeaderName;

/// Names withheld exactly, lowercase.
const WITHHELD: &[&str] = &[
    // hop-by-hop and framing
    "connection",
    "content-length",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "keep-alive",
    "expect",
    // who is calling, and where results go
    "host",
    "authorization",
    "cookie",
    "x-callback-url",
    "x-call-id",
    "forwarded",
    "x-real-ip",
    // set by the connector
    "x-topic",
    "x-connector",
    "x-delivery-attempt",
    "user-agent",
    "content-type",
    // W3C trace context: the connector sends its own delivery span's (see `crate::trace`,
    // which reads the message's as the parent), never the publisher's beside it
    "traceparent",
    "tracestate",
];

/// Prefixes withheld, lowercase, as they are reported.
const WITHHELD_PREFIXES: &[(&str, &str)] = &[
    ("proxy-", "proxy-*"),
    ("x-forwarded-", "x-forwarded-*"),
    ("ce-", "ce-*"),
];

/// Whether a message header named `name` is withheld from invocations, and if so the
/// rule that withholds it: the lowercase name itself, or a pattern (`proxy-*`,
/// `x-forwarded-*`, `ce-*`). The rule comes from a fixed set, so it can label a metric.
pub fn withheld(name: &HeaderName) -> Option<&'static str> {
    let name = name.as_str();
    if let Some(exact) = WITHHELD.iter().find(|w| **w == name) {
        return Some(exact);
    }
    WITHHELD_PREFIXES
        .iter()
        .find(|(prefix, _)| name.starts_with(prefix))
        .map(|(_, pattern)| *pattern)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str) -> Option<&'static str> {
        withheld(&HeaderName::from_bytes(name.as_bytes()).unwrap())
    }

    #[test]
    fn headers_that_shape_the_exchange_or_speak_for_the_connector_are_withheld() {
        for (name, expected) in [
            ("Connection", "connection"),
            ("Content-Length", "content-length"),
            ("TRANSFER-ENCODING", "transfer-encoding"),
            ("te", "te"),
            ("Trailer", "trailer"),
            ("Upgrade", "upgrade"),
            ("Keep-Alive", "keep-alive"),
            ("Expect", "expect"),
            ("Proxy-Authorization", "proxy-*"),
            ("Proxy-Connection", "proxy-*"),
            ("Host", "host"),
            ("Authorization", "authorization"),
            ("Cookie", "cookie"),
            ("X-Callback-Url", "x-callback-url"),
            ("x-call-id", "x-call-id"),
            ("Forwarded", "forwarded"),
            ("X-Forwarded-For", "x-forwarded-*"),
            ("x-forwarded-host", "x-forwarded-*"),
            ("X-Real-IP", "x-real-ip"),
            ("X-Topic", "x-topic"),
            ("X-Connector", "x-connector"),
            ("X-Delivery-Attempt", "x-delivery-attempt"),
            ("User-Agent", "user-agent"),
            ("Content-Type", "content-type"),
            ("traceparent", "traceparent"),
            ("TraceState", "tracestate"),
            ("ce-id", "ce-*"),
            ("CE-Source", "ce-*"),
            ("ce-myextension", "ce-*"),
        ] {
            assert_eq!(rule(name), Some(expected), "{name}");
        }
    }

    #[test]
    fn ordinary_application_headers_pass() {
        for name in [
            "X-Trace-Me",
            "X-Tenant",
            "Accept",
            "X-Kafka-Offset",
            "X-Kafka-Content-Length",
            "X-SQS-Attr-Host",
            "X-Nats-Subject",
            "Nats-Msg-Id",
            "X-Topics",
            "content-language",
            "hosting",
            "cert",
        ] {
            assert_eq!(rule(name), None, "{name}");
        }
    }
}
