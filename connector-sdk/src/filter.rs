//! Subscription filters: a function's `connector.filter` annotation, a CEL expression
//! (the Common Expression Language, evaluated by the `cel` crate) that decides, per
//! message, whether the function is invoked with it.
//!
//! The expression sees the event:
//!
//! | variable | value |
//! | --- | --- |
//! | `id`, `source` | the CloudEvents id and source (strings) |
//! | `type` | the CloudEvents type: the one the function receives as `ce-type` (the connector's `<connector>.message` unless the source gave one) |
//! | `subject` | the CloudEvents subject (a string, or `null` when the event has none) |
//! | `time` | the event time (a timestamp, or `null`) |
//! | `topic` | the topic, subject, queue or table it came from |
//! | `headers` | the source's headers, by lowercase name (a map of strings) |
//! | `data` | the body parsed as JSON when it is JSON (content type `*json*`, or none and it parses), else its bytes |
//!
//! It must evaluate to a boolean. Compiled once per topic-map rebuild, not per message:
//! an expression that does not compile, or names a variable that is not in the table,
//! makes the subscription invalid (logged, counted, skipped until fixed; see
//! [`crate::policy`]). One that fails on a message (a missing field without `has()`, a
//! type mismatch, a result that is not a boolean) cannot say whether the function wants
//! it: that delivery is dead-lettered with reason `filter_failed` and the error, so the
//! message can be replayed once the expression is fixed.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::{Arc, LazyLock};

use cel::common::ast::{EntryExpr, Expr, IdedExpr};
use cel::objects::{Key, Map};
use cel::{Context, Program, Value};

use crate::message::Message;

/// The variables an expression may use.
pub const VARIABLES: [&str; 8] = [
    "id", "source", "type", "subject", "time", "topic", "headers", "data",
];

/// The standard functions and macros, built once; each evaluation adds its variables in
/// a scope of its own on top.
static STANDARD: LazyLock<Context<'static>> = LazyLock::new(Context::default);

/// A compiled filter expression.
#[derive(Clone)]
pub struct Filter {
    source: Arc<str>,
    program: Arc<Program>,
    /// Which of [`VARIABLES`] the expression uses (bit `i` for `VARIABLES[i]`): only
    /// those are computed for a message; the body is parsed only if `data` is used.
    uses: u8,
}

/// A filter that failed on one message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("filter `{expression}` failed: {reason}")]
pub struct FilterError {
    /// The expression.
    pub expression: String,
    /// Why.
    pub reason: String,
}

impl Filter {
    /// Compiles `expression`. The error says why it cannot be used.
    pub fn compile(expression: &str) -> Result<Self, String> {
        let program = Program::compile(expression).map_err(|e| e.to_string())?;
        let mut bound = BTreeSet::new();
        bound_names(program.expression(), &mut bound);
        let mut uses = 0u8;
        let references = program.references();
        let mut unknown: Vec<&str> = Vec::new();
        for name in references.variables() {
            match VARIABLES.iter().position(|v| *v == name) {
                Some(i) => uses |= 1 << i,
                None if bound.contains(name) => {}
                None => unknown.push(name),
            }
        }
        if !unknown.is_empty() {
            unknown.sort_unstable();
            return Err(format!(
                "unknown variable {} (an expression sees {})",
                unknown.join(", "),
                VARIABLES.join(", ")
            ));
        }
        Ok(Self {
            source: expression.into(),
            program: Arc::new(program),
            uses,
        })
    }

    /// The expression as written.
    pub fn expression(&self) -> &str {
        &self.source
    }

    /// Whether `message` is for the function: the expression's value on it.
    /// `default_type` is its `type` when it has none of its own.
    pub fn matches(&self, message: &Message, default_type: &str) -> Result<bool, FilterError> {
        let mut scope = STANDARD.new_inner_scope();
        for (i, name) in VARIABLES.iter().enumerate() {
            if self.uses & (1 << i) != 0 {
                scope.add_variable_from_value(*name, variable(message, name, default_type));
            }
        }
        let fail = |reason: String| FilterError {
            expression: self.source.to_string(),
            reason,
        };
        match self.program.execute(&scope) {
            Ok(Value::Bool(keep)) => Ok(keep),
            Ok(other) => Err(fail(format!(
                "evaluates to {:?}, not a boolean",
                other.type_of()
            ))),
            Err(e) => Err(fail(e.to_string())),
        }
    }
}

impl fmt::Debug for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Filter").field(&self.source).finish()
    }
}

/// Two filters are the same when their expressions are.
impl PartialEq for Filter {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Eq for Filter {}

/// The value of variable `name` for `message`, whose type is `default_type` when it has
/// none of its own.
fn variable(message: &Message, name: &str, default_type: &str) -> Value {
    let text = |s: &str| Value::String(Arc::new(s.to_owned()));
    match name {
        "id" => text(&message.id),
        "source" => text(&message.source),
        "type" => text(message.event_type_or(default_type)),
        "subject" => message.subject.as_deref().map_or(Value::Null, text),
        "topic" => text(&message.topic),
        "time" => message.time.map_or(Value::Null, |t| {
            Value::Timestamp(chrono::DateTime::<chrono::Utc>::from(t).fixed_offset())
        }),
        "headers" => headers(message),
        "data" => data(message),
        _ => Value::Null,
    }
}

/// The headers by name; of a repeated header, the first value.
fn headers(message: &Message) -> Value {
    let mut map: HashMap<Key, Value> = HashMap::with_capacity(message.headers.keys_len());
    for (name, value) in &message.headers {
        map.entry(Key::String(Arc::new(name.as_str().to_owned())))
            .or_insert_with(|| {
                Value::String(Arc::new(
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                ))
            });
    }
    Value::Map(Map { map: Arc::new(map) })
}

/// The body as JSON when it is JSON, else its bytes.
fn data(message: &Message) -> Value {
    if message.may_be_json()
        && let Ok(json) = serde_json::from_slice::<serde_json::Value>(&message.payload)
    {
        return json_value(json);
    }
    Value::Bytes(Arc::new(message.payload.to_vec()))
}

/// A JSON value as CEL sees it. A whole number is an `int` (a `uint` above `int`'s
/// range), so that `data.n % 2 == 0` works as written; other numbers are `double`.
fn json_value(json: serde_json::Value) -> Value {
    use serde_json::Value as Json;
    match json {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Bool(b),
        Json::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Value::Int(i),
            (None, Some(u)) => Value::UInt(u),
            (None, None) => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Json::String(s) => Value::String(Arc::new(s)),
        Json::Array(items) => Value::List(Arc::new(items.into_iter().map(json_value).collect())),
        Json::Object(fields) => Value::Map(Map {
            map: Arc::new(
                fields
                    .into_iter()
                    .map(|(k, v)| (Key::String(Arc::new(k)), json_value(v)))
                    .collect(),
            ),
        }),
    }
}

/// The names macros bind (`exists(x, ...)`, `map(y, ...)`): not free variables.
fn bound_names<'a>(expr: &'a IdedExpr, names: &mut BTreeSet<&'a str>) {
    match &expr.expr {
        Expr::Unspecified | Expr::Ident(_) | Expr::Literal(_) => {}
        Expr::Call(call) => {
            if let Some(target) = &call.target {
                bound_names(target, names);
            }
            call.args.iter().for_each(|a| bound_names(a, names));
        }
        Expr::Comprehension(c) => {
            names.insert(&c.iter_var);
            if let Some(second) = &c.iter_var2 {
                names.insert(second);
            }
            names.insert(&c.accu_var);
            for part in [
                &c.iter_range,
                &c.accu_init,
                &c.loop_cond,
                &c.loop_step,
                &c.result,
            ] {
                bound_names(part, names);
            }
        }
        Expr::List(list) => list.elements.iter().for_each(|e| bound_names(e, names)),
        Expr::Map(map) => map.entries.iter().for_each(|e| match &e.expr {
            EntryExpr::MapEntry(entry) => {
                bound_names(&entry.key, names);
                bound_names(&entry.value, names);
            }
            EntryExpr::StructField(field) => bound_names(&field.value, names),
        }),
        Expr::Select(select) => bound_names(&select.operand, names),
        Expr::Struct(s) => s.entries.iter().for_each(|e| {
            if let EntryExpr::StructField(field) = &e.expr {
                bound_names(&field.value, names);
            }
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use std::time::{Duration, SystemTime};

    fn event(payload: &str) -> Message {
        let mut m = Message::new("orders", payload.to_owned(), "id-1", "test://orders");
        m.event_type = Some("order.created".to_owned());
        m.headers
            .insert("x-region", HeaderValue::from_static("eu-west"));
        m.time = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000));
        m
    }

    fn keeps(expression: &str, message: &Message) -> Result<bool, FilterError> {
        Filter::compile(expression)
            .unwrap()
            .matches(message, "test.message")
    }

    #[test]
    fn attributes_headers_and_json_data_are_visible() {
        let m = event(r#"{"amount": 120, "items": [{"sku": "a"}, {"sku": "b"}]}"#);
        assert_eq!(keeps("type == 'order.created'", &m), Ok(true));
        assert_eq!(keeps("type.startsWith('refund.')", &m), Ok(false));
        assert_eq!(keeps("topic == 'orders' && id == 'id-1'", &m), Ok(true));
        assert_eq!(keeps("headers['x-region'] == 'eu-west'", &m), Ok(true));
        assert_eq!(keeps("data.amount > 100", &m), Ok(true));
        assert_eq!(keeps("data.amount % 2 == 0", &m), Ok(true));
        assert_eq!(keeps("data.amount / 7 == 17", &m), Ok(true));
        assert_eq!(keeps("data.items.exists(i, i.sku == 'b')", &m), Ok(true));
        assert_eq!(keeps("has(data.currency)", &m), Ok(false));
        assert_eq!(keeps("subject == null", &m), Ok(true));
        let mut untyped = m.clone();
        untyped.event_type = None;
        assert_eq!(keeps("type == 'test.message'", &untyped), Ok(true));
        assert_eq!(
            keeps("time > timestamp('2026-01-01T00:00:00Z')", &m),
            Ok(true)
        );
    }

    #[test]
    fn a_body_that_is_not_json_is_bytes() {
        let m = event("plain text");
        assert_eq!(keeps("data == b'plain text'", &m), Ok(true));
        let mut declared = event(r#"{"a": 1}"#);
        declared.content_type = Some(HeaderValue::from_static("text/plain"));
        assert_eq!(keeps("data == b'{\"a\": 1}'", &declared), Ok(true));
    }

    #[test]
    fn what_cannot_be_compiled_says_why() {
        let syntax = Filter::compile("type ==").unwrap_err();
        assert!(syntax.contains("Syntax error"), "{syntax}");
        let typo = Filter::compile("tpye == 'a' && data.x.all(v, v > 1)").unwrap_err();
        assert!(typo.starts_with("unknown variable tpye"), "{typo}");
    }

    #[test]
    fn a_failure_on_one_message_is_an_error_not_a_verdict() {
        let m = event(r#"{"amount": 1}"#);
        let missing = keeps("data.currency == 'EUR'", &m).unwrap_err();
        assert!(missing.reason.contains("currency"), "{missing}");
        let not_bool = keeps("data.amount", &m).unwrap_err();
        assert!(not_bool.reason.contains("not a boolean"), "{not_bool}");
    }

    #[test]
    fn only_the_variables_used_are_computed() {
        let f = Filter::compile("topic == 'orders'").unwrap();
        assert_eq!(f.uses, 1 << 5);
        assert_eq!(f, Filter::compile("topic == 'orders'").unwrap());
    }
}
