//! The example TOML files in `config/` and `docs/configuration.md` mention every key of
//! every binary's configuration, and every environment variable it reads. The keys come
//! from the config structs themselves ([`config_keys::keys`]), so a field added to a struct
//! fails here until the example and the reference document it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use connector_sdk::config::{EnvVar, SDK_ENV};
use integration_tests::config_keys;

/// One binary: its name, its keys, its serialized default's keys, its example, its
/// variables.
struct Binary {
    name: &'static str,
    keys: BTreeSet<String>,
    default_keys: BTreeSet<String>,
    example: &'static str,
    env: Vec<EnvVar>,
}

fn with_sdk(own: &[EnvVar]) -> Vec<EnvVar> {
    SDK_ENV.iter().chain(own).copied().collect()
}

fn binaries() -> Vec<Binary> {
    vec![
        Binary {
            name: "cron-connector",
            keys: config_keys::keys::<cron_connector::config::Config>(),
            default_keys: config_keys::default_keys::<cron_connector::config::Config>(),
            example: "cron.toml",
            env: with_sdk(cron_connector::config::ENV),
        },
        Binary {
            name: "kafka-connector",
            keys: config_keys::keys::<kafka_connector::Config>(),
            default_keys: config_keys::default_keys::<kafka_connector::Config>(),
            example: "kafka.toml",
            env: with_sdk(kafka_connector::config::ENV),
        },
        Binary {
            name: "redis-connector",
            keys: config_keys::keys::<redis_connector::Config>(),
            default_keys: config_keys::default_keys::<redis_connector::Config>(),
            example: "redis.toml",
            env: with_sdk(redis_connector::config::ENV),
        },
        Binary {
            name: "sqs-connector",
            keys: config_keys::keys::<sqs_connector::config::Config>(),
            default_keys: config_keys::default_keys::<sqs_connector::config::Config>(),
            example: "sqs.toml",
            env: with_sdk(sqs_connector::config::ENV),
        },
        Binary {
            name: "nats-connector",
            keys: config_keys::keys::<nats_connector::config::Config>(),
            default_keys: config_keys::default_keys::<nats_connector::config::Config>(),
            example: "nats.toml",
            env: with_sdk(nats_connector::config::ENV),
        },
        Binary {
            name: "rabbitmq-connector",
            keys: config_keys::keys::<rabbitmq_connector::Config>(),
            default_keys: config_keys::default_keys::<rabbitmq_connector::Config>(),
            example: "rabbitmq.toml",
            env: with_sdk(rabbitmq_connector::config::ENV),
        },
        Binary {
            name: "postgres-connector",
            keys: config_keys::keys::<postgres_connector::Config>(),
            default_keys: config_keys::default_keys::<postgres_connector::Config>(),
            example: "postgres.toml",
            env: with_sdk(postgres_connector::config::ENV),
        },
        Binary {
            name: "mqtt-connector",
            keys: config_keys::keys::<mqtt_connector::Config>(),
            default_keys: config_keys::default_keys::<mqtt_connector::Config>(),
            example: "mqtt.toml",
            env: with_sdk(mqtt_connector::config::ENV),
        },
        Binary {
            name: "gateway",
            keys: config_keys::keys::<gateway::Config>(),
            default_keys: config_keys::default_keys::<gateway::Config>(),
            example: "gateway.toml",
            env: gateway::config::GATEWAY_ENV.to_vec(),
        },
    ]
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(relative: &str) -> String {
    let path = repo().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The `## ` section of `docs/configuration.md` whose heading contains `needle`.
fn doc_section<'a>(doc: &'a str, needle: &str) -> &'a str {
    doc.split("\n## ")
        .find(|s| s.lines().next().is_some_and(|h| h.contains(needle)))
        .unwrap_or_else(|| panic!("docs/configuration.md has no `## ` section for {needle}"))
}

#[test]
fn the_probe_finds_every_key_of_the_serialized_defaults() {
    for b in binaries() {
        let missed: Vec<_> = b
            .default_keys
            .iter()
            .filter(|k| !config_keys::covered(&b.keys, k))
            .collect();
        assert!(
            missed.is_empty(),
            "{}: keys of the serialized default that probing missed: {missed:?}",
            b.name
        );
        // Sanity: the probe went deep (sections, options), not just the top level.
        assert!(b.keys.len() > b.default_keys.len() / 2 && b.keys.len() >= 20);
        if b.name != "gateway" {
            for k in [
                "connector.gateway_url",
                "connector.backoff.initial",
                "connector.status.retry",
                "connector.callback_url",
            ] {
                assert!(b.keys.contains(k), "{}: {k} not found", b.name);
            }
        }
    }
    let gw = config_keys::keys::<gateway::Config>();
    for k in [
        "functions.name",
        "connectors.env",
        "async.nats_url",
        "gateway.password",
    ] {
        assert!(gw.contains(k), "gateway: {k} not found in {gw:?}");
    }
}

#[test]
fn every_key_is_in_its_example_file() {
    let mut failures = Vec::new();
    for b in binaries() {
        let mentioned = config_keys::example_keys(&read(&format!("config/{}", b.example)));
        let missing: Vec<_> = b.keys.difference(&mentioned).collect();
        if !missing.is_empty() {
            failures.push(format!(
                "config/{} does not mention {missing:?} (write each as `key = default`, or as a `# key = example` comment when it has no default)",
                b.example
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_example_file_loads() {
    // The example files are what users copy: they must load as they are (no variables).
    for b in binaries() {
        let path = repo().join("config").join(b.example);
        let result = match b.name {
            "cron-connector" => {
                connector_sdk::config::load::<cron_connector::config::Config>(Some(&path), &[])
                    .map(drop)
            }
            "kafka-connector" => {
                connector_sdk::config::load::<kafka_connector::Config>(Some(&path), &[]).map(drop)
            }
            "redis-connector" => {
                connector_sdk::config::load::<redis_connector::Config>(Some(&path), &[]).map(drop)
            }
            "sqs-connector" => {
                connector_sdk::config::load::<sqs_connector::config::Config>(Some(&path), &[])
                    .map(drop)
            }
            "nats-connector" => {
                connector_sdk::config::load::<nats_connector::config::Config>(Some(&path), &[])
                    .map(drop)
            }
            "rabbitmq-connector" => {
                connector_sdk::config::load::<rabbitmq_connector::Config>(Some(&path), &[])
                    .map(drop)
            }
            "postgres-connector" => {
                connector_sdk::config::load::<postgres_connector::Config>(Some(&path), &[])
                    .map(drop)
            }
            "mqtt-connector" => {
                connector_sdk::config::load::<mqtt_connector::Config>(Some(&path), &[]).map(drop)
            }
            "gateway" => connector_sdk::config::load::<gateway::Config>(Some(&path), &[]).map(drop),
            other => panic!("no loader for {other}"),
        };
        if let Err(e) = result {
            panic!("config/{}: {e}", b.example);
        }
    }
}

#[test]
fn every_key_and_variable_is_in_the_reference() {
    let doc = read("docs/configuration.md");
    let sdk = doc_section(&doc, "[connector]");
    let mut failures = Vec::new();
    for b in binaries() {
        let own = doc_section(&doc, &format!("`{}`", b.name));
        for key in &b.keys {
            let section = if key.starts_with("connector.") && b.name != "gateway" {
                sdk
            } else {
                own
            };
            if !section.contains(&format!("`{key}`")) {
                failures.push(format!("{}: key `{key}`", b.name));
            }
        }
        for var in &b.env {
            assert!(
                b.keys.contains(var.key),
                "{}: variable {} sets `{}`, which is not a key",
                b.name,
                var.name,
                var.key
            );
            let section = if SDK_ENV.contains(var) { sdk } else { own };
            let row = section
                .lines()
                .find(|l| l.starts_with(&format!("| `{}` ", var.key)));
            match row {
                Some(row) if row.contains(&format!("`{}`", var.name)) => {}
                _ => failures.push(format!(
                    "{}: variable `{}` (in the row of `{}`)",
                    b.name, var.name, var.key
                )),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "docs/configuration.md does not document:\n{}",
        failures.join("\n")
    );
}
