//! Function names as OpenFaaS writes them: `NAME` or `NAME.NAMESPACE`, split at the last `.`.

use std::fmt;

use crate::error::Error;

/// A function and its namespace, resolved against the default namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FunctionRef {
    /// The function's name, without namespace.
    pub name: String,
    /// Its namespace (the default one when none was given).
    pub namespace: String,
}

impl FunctionRef {
    /// Reads `NAME` or `NAME.NAMESPACE` from a URL or body. `namespace` (a query or body
    /// field) is used when the name carries none; an empty namespace means the default.
    pub fn parse(raw: &str, namespace: Option<&str>, default_ns: &str) -> Result<Self, Error> {
        check_reference(raw)?;
        let (name, ns) = match raw.rsplit_once('.') {
            Some((name, ns)) => (name, Some(ns)),
            None => (raw, None),
        };
        let ns = ns
            .or(namespace)
            .map(str::trim)
            .filter(|ns| !ns.is_empty())
            .unwrap_or(default_ns);
        check_reference(ns)?;
        if name.is_empty() {
            return Err(Error::BadRequest(format!("invalid function name {raw:?}")));
        }
        Ok(Self {
            name: name.to_owned(),
            namespace: ns.to_owned(),
        })
    }

    /// Reads the `NAME[.NAMESPACE]` of an invocation path (`/function/...`,
    /// `/async-function/...`) as [`Self::parse`] does, except that an empty name
    /// (`/function/.openfaas-fn`) names no function: 404, as a missing function gets.
    pub fn parse_invoked(raw: &str, default_ns: &str) -> Result<Self, Error> {
        let name = raw.rsplit_once('.').map_or(raw, |(name, _)| name);
        if name.is_empty() {
            return Err(Error::FunctionNotFound(raw.to_owned()));
        }
        Self::parse(raw, None, default_ns)
    }

    /// The `name.namespace` form used in metric labels and messages.
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.name, self.namespace)
    }
}

impl fmt::Display for FunctionRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.name, self.namespace)
    }
}

/// OpenFaaS's name class `[-a-zA-Z_0-9.]+`, without `..` (no path tricks through a name).
fn check_reference(raw: &str) -> Result<(), Error> {
    let valid = !raw.is_empty()
        && raw.len() <= 253
        && !raw.contains("..")
        && !raw.starts_with('.')
        && !raw.ends_with('.')
        && raw
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if valid {
        Ok(())
    } else {
        Err(Error::BadRequest(format!(
            "invalid function name {raw:?}: use letters, digits, '-', '_' and '.', without '/' or '..'"
        )))
    }
}

/// A name a function can be deployed under: a DNS label, as Kubernetes and faasd require
/// (`[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 characters).
pub fn check_service_name(name: &str) -> Result<(), Error> {
    let bytes = name.as_bytes();
    let inner_ok = bytes
        .iter()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-');
    let ends_ok = matches!(bytes.first(), Some(b) if *b != b'-')
        && matches!(bytes.last(), Some(b) if *b != b'-');
    if inner_ok && ends_ok && name.len() <= 63 {
        Ok(())
    } else {
        Err(Error::BadRequest(format!(
            "invalid function name {name:?}: it must be a DNS label (lower-case letters, digits and '-', at most 63 characters)"
        )))
    }
}

/// A secret name: no `/`, no `..`, not empty (faasd's rule), and a plain file name.
pub fn check_secret_name(name: &str) -> Result<(), Error> {
    let valid = !name.is_empty()
        && name.len() <= 253
        && !name.contains("..")
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if valid {
        Ok(())
    } else {
        Err(Error::BadRequest(format!(
            "invalid secret name {name:?}: use letters, digits, '-', '_' and '.', without '/' or '..'"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: &str = "openfaas-fn";

    #[test]
    fn splits_at_the_last_dot() {
        let r = FunctionRef::parse("figlet.openfaas-fn", None, NS).unwrap();
        assert_eq!((r.name.as_str(), r.namespace.as_str()), ("figlet", NS));
        let r = FunctionRef::parse("figlet", Some("dev"), NS).unwrap();
        assert_eq!(r.namespace, "dev");
        let r = FunctionRef::parse("figlet", Some(""), NS).unwrap();
        assert_eq!(r.namespace, NS);
        let r = FunctionRef::parse("a.b.c", None, NS).unwrap();
        assert_eq!((r.name.as_str(), r.namespace.as_str()), ("a.b", "c"));
        assert_eq!(r.qualified(), "a.b.c");
    }

    #[test]
    fn refuses_paths_and_odd_characters() {
        for bad in ["", "a/b", "..", "a..b", ".a", "a b", "a%2fb", "fn.", "é"] {
            assert!(FunctionRef::parse(bad, None, NS).is_err(), "{bad:?}");
        }
        assert!(FunctionRef::parse("ok", Some("../x"), NS).is_err());
    }

    #[test]
    fn an_invoked_empty_name_is_a_missing_function() {
        for empty in ["", ".openfaas-fn", ".x"] {
            assert!(
                matches!(
                    FunctionRef::parse_invoked(empty, NS),
                    Err(Error::FunctionNotFound(_))
                ),
                "{empty:?}"
            );
        }
        for bad in ["..", "a..b", "a/b"] {
            assert!(
                matches!(
                    FunctionRef::parse_invoked(bad, NS),
                    Err(Error::BadRequest(_))
                ),
                "{bad:?}"
            );
        }
        let r = FunctionRef::parse_invoked("figlet.dev", NS).unwrap();
        assert_eq!((r.name.as_str(), r.namespace.as_str()), ("figlet", "dev"));
    }

    #[test]
    fn service_names_are_dns_labels() {
        for good in ["a", "figlet", "nodeinfo-2", "0x"] {
            check_service_name(good).unwrap();
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"x".repeat(64)] {
            assert!(check_service_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn secret_names() {
        check_secret_name("api-key").unwrap();
        for bad in ["", "../x", "a/b", ".hidden"] {
            assert!(check_secret_name(bad).is_err(), "{bad:?}");
        }
    }
}
