//! Functions as the connector knows them: [`FunctionRef`], how one is invoked, and
//! [`FunctionStatus`], one entry of the gateway's function list.
//!
//! A leaf module: the gateway client, messages, metrics and the topic map all name
//! functions, and import them from here rather than from each other. The public paths are
//! [`crate::topic_map::FunctionRef`] and [`crate::topic_map::FunctionStatus`].

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::Deserialize;

/// A function as the gateway invokes it: `name`, or `name.namespace` when a namespace is
/// known.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FunctionRef {
    // Shared: a function's name is cloned into every delivery and metric label.
    path: Arc<str>,
}

impl FunctionRef {
    /// The function `name` in `namespace`.
    pub fn new(name: &str, namespace: Option<&str>) -> Self {
        let path = match namespace.filter(|ns| !ns.is_empty()) {
            Some(ns) => format!("{name}.{ns}"),
            None => name.to_owned(),
        };
        Self { path: path.into() }
    }

    /// The name to invoke: `name` or `name.namespace`.
    pub fn as_str(&self) -> &str {
        &self.path
    }
}

impl prometheus_client::encoding::EncodeLabelValue for FunctionRef {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder,
    ) -> Result<(), fmt::Error> {
        prometheus_client::encoding::EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

impl fmt::Display for FunctionRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path)
    }
}

/// One function from the gateway's list, as far as connectors care.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct FunctionStatus {
    /// Function name.
    pub name: String,
    /// Its namespace, when the provider has namespaces.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Its annotations; `null` and non-string values are ignored.
    #[serde(default, deserialize_with = "string_annotations")]
    pub annotations: BTreeMap<String, String>,
}

fn string_annotations<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    let raw: Option<BTreeMap<String, serde_json::Value>> = Option::deserialize(d)?;
    Ok(raw
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(k, v)| match v {
            serde_json::Value::String(s) => Some((k, s)),
            _ => None,
        })
        .collect())
}
