//! Every key a configuration struct accepts, read from the struct itself, and every key an
//! example TOML file or a document mentions: the tests in `tests/config_docs.rs` and
//! `tests/deploy.rs` compare them so that examples, docs and manifests cannot drift from
//! the code.
//!
//! The code's keys come from serde: each struct is `deny_unknown_fields`, so offering it
//! an unknown key (`__probe__`) makes its derived `Deserialize` answer with the list of
//! the fields it does accept (figment keeps that list in `Kind::UnknownField`). Probing
//! each field in turn finds the nested sections (`connector.backoff`), arrays of tables
//! (`[[functions]]`) and the free-form maps (`kafka.properties`, which accept any key).
//! `Option` fields are found too, though a serialized default skips them.
//!
//! Keys are dotted paths as written in TOML; an array of tables contributes its element's
//! keys under its own name (`functions.name`).

use std::collections::BTreeSet;

use figment::Figment;
use figment::error::Kind;
use figment::providers::Serialized;
use serde::Serialize;
use serde::de::DeserializeOwned;

const PROBE: &str = "__probe__";

/// One step of a path into the configuration.
#[derive(Clone, Debug)]
enum Step {
    Field(String),
    Element,
}

/// What a probe found at a path.
enum Shape {
    /// A struct with these fields.
    Struct(Vec<String>),
    /// A map taking any key (it accepted the probe).
    OpenMap,
    /// Anything else: a value.
    Leaf,
}

/// Every key `C` accepts, as dotted paths (`connector.gateway_url`). Intermediate tables
/// (`connector`, `connector.backoff`) are not listed; free-form maps are listed by name
/// (`kafka.properties`).
pub fn keys<C: DeserializeOwned>() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let Shape::Struct(fields) = shape::<C>(&[]) else {
        panic!(
            "{} did not reject an unknown key: is it deny_unknown_fields?",
            std::any::type_name::<C>()
        );
    };
    for field in fields {
        walk::<C>(vec![Step::Field(field)], &mut out);
    }
    out
}

/// The keys of `C`'s serialized default, each [`covered`] by [`keys`]: a check of the probe
/// (a key here that `keys` does not cover would mean the probe went wrong). An empty array
/// of tables appears by its name (`functions`).
pub fn default_keys<C: Serialize + Default>() -> BTreeSet<String> {
    let value = toml::Value::try_from(C::default()).expect("the default serializes to TOML");
    let mut out = BTreeSet::new();
    leaves("", &value, &mut out);
    out
}

/// Whether `key` is one of `keys` or the parent of some (`functions` of `functions.name`).
pub fn covered(keys: &BTreeSet<String>, key: &str) -> bool {
    keys.contains(key)
        || keys.iter().any(|k| {
            k.strip_prefix(key)
                .is_some_and(|rest| rest.starts_with('.'))
        })
}

fn walk<C: DeserializeOwned>(path: Vec<Step>, out: &mut BTreeSet<String>) {
    match shape::<C>(&path) {
        Shape::Struct(fields) => {
            for field in fields {
                let mut next = path.clone();
                next.push(Step::Field(field));
                walk::<C>(next, out);
            }
        }
        Shape::OpenMap => {
            out.insert(dotted(&path));
        }
        Shape::Leaf => {
            let mut element = path.clone();
            element.push(Step::Element);
            match shape::<C>(&element) {
                Shape::Struct(fields) => {
                    for field in fields {
                        let mut next = element.clone();
                        next.push(Step::Field(field));
                        walk::<C>(next, out);
                    }
                }
                _ => {
                    out.insert(dotted(&path));
                }
            }
        }
    }
}

/// Offers `{ __probe__ = 0 }` at `path` (inside an array for `Element` steps) and reads
/// what the deserializer says about it.
fn shape<C: DeserializeOwned>(path: &[Step]) -> Shape {
    let mut value = serde_json::json!({ PROBE: 0 });
    for step in path.iter().rev() {
        value = match step {
            Step::Field(name) => serde_json::json!({ name.clone(): value }),
            Step::Element => serde_json::json!([value]),
        };
    }
    match Figment::from(Serialized::defaults(value)).extract::<C>() {
        Ok(_) => Shape::OpenMap,
        Err(errors) => {
            for e in errors {
                if let Kind::UnknownField(field, expected) = &e.kind
                    && field == PROBE
                {
                    return Shape::Struct(expected.iter().map(|s| (*s).to_owned()).collect());
                }
            }
            Shape::Leaf
        }
    }
}

fn dotted(path: &[Step]) -> String {
    path.iter()
        .filter_map(|s| match s {
            Step::Field(name) => Some(name.as_str()),
            Step::Element => None,
        })
        .collect::<Vec<_>>()
        .join(".")
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

/// The dotted paths of the leaves of `value`; empty tables count as leaves (a free-form
/// map with no entry), tables in arrays add their keys under the array's name.
fn leaves(prefix: &str, value: &toml::Value, out: &mut BTreeSet<String>) {
    match value {
        toml::Value::Table(table) if !table.is_empty() => {
            for (k, v) in table {
                leaves(&join(prefix, k), v, out);
            }
        }
        toml::Value::Array(items) if items.iter().any(toml::Value::is_table) => {
            for item in items {
                leaves(prefix, item, out);
            }
        }
        _ => {
            out.insert(prefix.to_owned());
        }
    }
}

/// Every key an example TOML file mentions: the keys it sets, and the keys shown in
/// comments as a TOML line of their own (`# callback_url = "http://..."`, a commented
/// `# [[functions]]` header followed by commented keys). Each line is parsed by the
/// `toml` crate on its own; comment lines that are not TOML (prose) are skipped.
pub fn example_keys(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut section = String::new();
    for line in text.lines() {
        let candidate = line.trim_start().trim_start_matches('#').trim();
        if candidate.is_empty() {
            continue;
        }
        let Ok(table) = candidate.parse::<toml::Table>() else {
            continue;
        };
        if candidate.starts_with('[') {
            section = header_path(&table);
            out.insert(section.clone());
        } else {
            for (k, v) in &table {
                let key = join(&section, k);
                out.insert(key.clone());
                if let toml::Value::Table(inner) = v {
                    let mut nested = BTreeSet::new();
                    leaves(&key, &toml::Value::Table(inner.clone()), &mut nested);
                    // Dotted keys (`a.b = 1`) and inline tables (`status = { retry = [] }`)
                    // mention every level.
                    for n in nested {
                        let mut prefix = String::new();
                        for part in n.split('.') {
                            prefix = join(&prefix, part);
                            out.insert(prefix.clone());
                        }
                    }
                }
            }
        }
    }
    out
}

/// The dotted path of a header line parsed alone: `[a.b]` is `{a = {b = {}}}`,
/// `[[a]]` is `{a = [{}]}`.
fn header_path(table: &toml::Table) -> String {
    let mut path = Vec::new();
    let mut current = table;
    while let Some((key, value)) = current.iter().next() {
        path.push(key.clone());
        current = match value {
            toml::Value::Table(t) => t,
            toml::Value::Array(items) => match items.first() {
                Some(toml::Value::Table(t)) => t,
                _ => break,
            },
            _ => break,
        };
    }
    path.join(".")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::collections::BTreeMap;

    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Outer {
        section: Inner,
        #[serde(skip_serializing_if = "Option::is_none")]
        maybe: Option<String>,
        items: Vec<Item>,
        free: BTreeMap<String, i64>,
        list: Vec<String>,
    }

    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Inner {
        a: u32,
        nested: Deeper,
    }

    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Deeper {
        b: String,
    }

    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Item {
        name: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        url: Option<String>,
    }

    #[test]
    fn probes_find_options_sections_arrays_and_maps() {
        let keys = keys::<Outer>();
        let expected = [
            "free",
            "items.name",
            "items.url",
            "list",
            "maybe",
            "section.a",
            "section.nested.b",
        ];
        assert_eq!(
            keys.iter().map(String::as_str).collect::<Vec<_>>(),
            expected
        );
        assert!(default_keys::<Outer>().iter().all(|k| covered(&keys, k)));
        assert!(default_keys::<Outer>().contains("items"));
        assert!(!default_keys::<Outer>().contains("maybe"));
    }

    #[test]
    fn examples_count_commented_keys_and_headers() {
        let text = r#"
            # prose that is not TOML = at all
            maybe = "x"     # a comment
            [section]
            a = 1
            # [section.nested]
            # b = "shown"
            # [[items]]
            # name = "one"                # required
            [free]
            status = { retry = ["5xx"] }
        "#;
        let keys = example_keys(text);
        for k in [
            "maybe",
            "section",
            "section.a",
            "section.nested",
            "section.nested.b",
            "items",
            "items.name",
            "free",
            "free.status",
            "free.status.retry",
        ] {
            assert!(keys.contains(k), "{k} missing from {keys:?}");
        }
        assert!(!keys.iter().any(|k| k.contains("prose")));
    }
}
