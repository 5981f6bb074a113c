//! The deployment files name only what exists in the code, and say what the code expects:
//!
//! - `Dockerfile`: a stage per workspace binary (from `cargo metadata`), each running that
//!   binary as a non-root user, built by `--bin` flags naming only workspace binaries, and
//!   exposing the default ports of the config structs.
//! - `compose.yaml`: each service built from the Dockerfile runs a binary with a mounted
//!   file from `config/`; that file, with the service's environment, loads and validates
//!   with the binary's own loader; every variable is one the binary reads; the exposed
//!   port is its metrics port; Prometheus scrapes those ports.
//! - `deploy/kubernetes/*.yaml`: each Deployment's ConfigMap TOML plus its env loads with
//!   the binary's loader; namespace `openfaas`, the OpenFaaS gateway URL, basic auth from
//!   the `basic-auth` secret at `/var/secrets`, probes on `/healthz` and `/readyz` and the
//!   scrape annotation on the loaded metrics port, a grace period longer than the drain
//!   and no preStop hook calling the connector (SIGTERM drains; `/drain` needs a token),
//!   resource requests, and the cron connector's several replicas with the Redis lock;
//!   every document deserializes as the Kubernetes API's own type (k8s-openapi) with no
//!   field the API lacks.
//! - `deploy/kubernetes-keda/`: the KEDA overlay patches every broker connector's workload
//!   with a `scaler_addr` it reads and a matching port, has a Service (API schema checked)
//!   and an example ScaledObject per broker connector, each pointing at that Service.
//! - `deploy/helm/`: the same checks on the chart's values (templates are checked for the
//!   values they read, since helm is not available to render them here).
//! - `deploy/grafana/connectors.json` and `deploy/prometheus/*.yml`: every metric name in a
//!   query is one the binaries serve.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use connector_sdk::SdkConfig;
use connector_sdk::config::{EnvVar, SDK_ENV};
use dockerfile_parser::{Dockerfile, Instruction, Stage};
use serde::Deserialize;
use serde_json::Value;

const CONNECTORS: [&str; 8] = [
    "cron-connector",
    "kafka-connector",
    "redis-connector",
    "sqs-connector",
    "nats-connector",
    "rabbitmq-connector",
    "postgres-connector",
    "mqtt-connector",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

fn read(relative: &str) -> String {
    let path = repo().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The binaries the workspace builds, from `cargo metadata`.
fn workspace_binaries() -> BTreeSet<String> {
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--offline",
        ])
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut bins = BTreeSet::new();
    for package in meta["packages"].as_array().unwrap() {
        for target in package["targets"].as_array().unwrap() {
            if target["kind"]
                .as_array()
                .unwrap()
                .iter()
                .any(|k| k == "bin")
            {
                bins.insert(target["name"].as_str().unwrap().to_owned());
            }
        }
    }
    bins
}

/// The variables `binary` reads.
fn env_names(binary: &str) -> BTreeSet<&'static str> {
    let own: &[EnvVar] = match binary {
        "cron-connector" => cron_connector::config::ENV,
        "kafka-connector" => kafka_connector::config::ENV,
        "redis-connector" => redis_connector::config::ENV,
        "sqs-connector" => sqs_connector::config::ENV,
        "nats-connector" => nats_connector::config::ENV,
        "rabbitmq-connector" => rabbitmq_connector::config::ENV,
        "postgres-connector" => postgres_connector::config::ENV,
        "mqtt-connector" => mqtt_connector::config::ENV,
        "gateway" => {
            return gateway::config::GATEWAY_ENV
                .iter()
                .map(|v| v.name)
                .collect();
        }
        other => panic!("unknown binary {other}"),
    };
    SDK_ENV.iter().chain(own).map(|v| v.name).collect()
}

/// What the deployment files must agree with, from a loaded configuration.
#[derive(Debug)]
struct Facts {
    /// `/metrics`, `/healthz`, `/readyz`.
    metrics_port: u16,
    /// The gateway's API port.
    api_port: Option<u16>,
    drain_timeout: Duration,
    gateway_url: String,
    basic_auth: bool,
    secret_mount_path: PathBuf,
    /// The cron connector's Redis lock is configured.
    lock: bool,
}

fn sdk_facts(c: &SdkConfig) -> Facts {
    Facts {
        metrics_port: c.metrics_addr.port(),
        api_port: None,
        drain_timeout: c.drain_timeout,
        gateway_url: c.gateway_url.clone(),
        basic_auth: c.basic_auth,
        secret_mount_path: c.secret_mount_path.clone(),
        lock: false,
    }
}

/// Loads `file` (or the defaults) with exactly `env` set, through `binary`'s own loader
/// (defaults, file, variables, then its cross-field checks).
fn load(binary: &str, file: Option<&Path>, env: &BTreeMap<String, String>) -> Facts {
    let mut facts = None;
    figment::Jail::expect_with(|jail| {
        for (name, value) in env {
            jail.set_env(name, value);
        }
        let loaded = match binary {
            "cron-connector" => cron_connector::config::Config::load(file).map(|c| Facts {
                lock: c.lock.redis_url.is_some(),
                ..sdk_facts(&c.connector)
            }),
            "kafka-connector" => kafka_connector::load(file).map(|c| sdk_facts(&c.connector)),
            "redis-connector" => redis_connector::load(file).map(|c| sdk_facts(&c.connector)),
            "sqs-connector" => {
                sqs_connector::config::Config::load(file).map(|c| sdk_facts(&c.connector))
            }
            "nats-connector" => {
                nats_connector::config::Config::load(file).map(|c| sdk_facts(&c.connector))
            }
            "rabbitmq-connector" => rabbitmq_connector::load(file).map(|c| sdk_facts(&c.connector)),
            "postgres-connector" => postgres_connector::load(file).map(|c| sdk_facts(&c.connector)),
            "mqtt-connector" => mqtt_connector::load(file).map(|c| sdk_facts(&c.connector)),
            "gateway" => gateway::Config::load(file).map(|c| Facts {
                metrics_port: c.gateway.metrics_bind.port(),
                api_port: Some(c.gateway.bind.port()),
                drain_timeout: c.supervisor.stop_timeout,
                gateway_url: String::new(),
                basic_auth: c.gateway.basic_auth,
                secret_mount_path: c.gateway.secret_mount_path.clone(),
                lock: false,
            }),
            other => panic!("unknown binary {other}"),
        };
        match loaded {
            Ok(f) => facts = Some(f),
            Err(e) => panic!("{binary} with {file:?} and {env:?}:\n{e}"),
        }
        Ok(())
    });
    facts.unwrap()
}

/// A YAML file's documents as JSON values (merge keys applied, empty documents skipped).
fn yaml_documents(relative: &str) -> Vec<Value> {
    let text = read(relative);
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| {
            let mut value =
                serde_norway::Value::deserialize(doc).unwrap_or_else(|e| panic!("{relative}: {e}"));
            value.apply_merge().unwrap();
            serde_json::to_value(value).unwrap()
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn yaml(relative: &str) -> Value {
    let mut docs = yaml_documents(relative);
    assert_eq!(docs.len(), 1, "{relative}: expected one document");
    docs.remove(0)
}

fn str_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

// ---------------------------------------------------------------------------------------
// Dockerfile

fn dockerfile() -> Dockerfile {
    Dockerfile::parse(&read("Dockerfile")).unwrap_or_else(|e| panic!("Dockerfile: {e}"))
}

/// The text of a stage's `USER`/`EXPOSE`-style instructions named `name`.
fn misc_args<'a>(stage: &Stage<'a>, name: &str) -> Vec<String> {
    stage
        .instructions
        .iter()
        .filter_map(|i| i.as_misc())
        .filter(|m| m.instruction.content.eq_ignore_ascii_case(name))
        .map(|m| m.arguments.to_string().trim().to_owned())
        .collect()
}

/// `stage` and the stages it is built on, nearest first.
fn ancestry<'a>(
    stages: &'a dockerfile_parser::Stages<'a>,
    stage: &'a Stage<'a>,
) -> Vec<&'a Stage<'a>> {
    let mut chain = vec![stage];
    let mut current = stage;
    while let dockerfile_parser::StageParent::Stage(index) = current.parent {
        current = stages.iter().find(|s| s.index == index).unwrap();
        chain.push(current);
    }
    chain
}

#[test]
fn dockerfile_has_a_non_root_stage_per_binary_and_builds_only_real_ones() {
    let binaries = workspace_binaries();
    let expected: BTreeSet<String> = CONNECTORS
        .iter()
        .map(|s| (*s).to_owned())
        .chain(["gateway".to_owned()])
        .collect();
    assert_eq!(
        binaries, expected,
        "the workspace's binaries changed: update the Dockerfile"
    );

    let file = dockerfile();
    let stages = file.stages();

    // The build stage compiles exactly the workspace's binaries.
    let mut built = BTreeSet::new();
    for stage in stages.iter() {
        for instruction in &stage.instructions {
            if let Instruction::Run(run) = instruction {
                let text = run.as_shell().map(|s| s.to_string()).unwrap_or_default();
                let words: Vec<&str> = text.split_whitespace().collect();
                for pair in words.windows(2) {
                    if pair[0] == "--bin" {
                        built.insert(pair[1].to_owned());
                    }
                }
            }
        }
    }
    assert_eq!(built, binaries, "the Dockerfile's --bin flags");

    let default_metrics = SdkConfig::default().metrics_addr.port();
    for binary in &binaries {
        let stage = stages
            .get_by_name(binary)
            .unwrap_or_else(|| panic!("no Dockerfile stage named {binary}"));
        let entrypoint: Vec<String> = stage
            .instructions
            .iter()
            .filter_map(|i| i.as_entrypoint())
            .filter_map(|e| e.as_exec())
            .map(|a| a.as_str_vec().join(" "))
            .collect();
        assert_eq!(
            entrypoint,
            [format!("/usr/local/bin/{binary}")],
            "stage {binary}: ENTRYPOINT (exec form, no shell)"
        );
        let copies_binary = stage
            .instructions
            .iter()
            .filter_map(|i| i.as_copy())
            .any(|c| {
                c.destination.content == format!("/usr/local/bin/{binary}")
                    && c.sources
                        .iter()
                        .any(|s| s.content == format!("/out/{binary}"))
            });
        assert!(copies_binary, "stage {binary} does not copy /out/{binary}");

        let chain = ancestry(&stages, stage);
        let user = chain
            .iter()
            .find_map(|s| misc_args(s, "USER").pop())
            .unwrap_or_else(|| panic!("stage {binary} sets no USER"));
        let uid = user.split(':').next().unwrap();
        assert!(
            uid.parse::<u32>().is_ok_and(|uid| uid != 0),
            "stage {binary} runs as {user}, not a numeric non-root user"
        );
        let root = chain.last().unwrap();
        assert!(
            root.parent.to_string().contains("distroless"),
            "stage {binary}: runtime base {} has a shell",
            root.parent
        );

        let exposed: BTreeSet<u16> = chain
            .iter()
            .flat_map(|s| misc_args(s, "EXPOSE"))
            .flat_map(|a| {
                a.split_whitespace()
                    .map(|p| p.parse::<u16>().unwrap())
                    .collect::<Vec<_>>()
            })
            .collect();
        if binary == "gateway" {
            // The image's ENV must be variables the gateway reads; its ports what it exposes.
            let env: BTreeMap<String, String> = stage
                .instructions
                .iter()
                .filter_map(|i| i.as_env())
                .flat_map(|e| e.vars.iter())
                .map(|v| (v.key.content.clone(), v.value.to_string()))
                .collect();
            for name in env.keys() {
                assert!(
                    env_names("gateway").contains(name.as_str()),
                    "Dockerfile ENV {name} is not a gateway variable"
                );
            }
            let facts = load("gateway", None, &env);
            let ports: BTreeSet<u16> = [facts.metrics_port, facts.api_port.unwrap()].into();
            assert_eq!(exposed, ports, "gateway EXPOSE");
        } else {
            assert_eq!(exposed, [default_metrics].into(), "stage {binary}: EXPOSE");
        }
    }
}

// ---------------------------------------------------------------------------------------
// compose.yaml

#[test]
fn compose_services_run_real_binaries_with_loadable_config() {
    let compose = yaml("compose.yaml");
    let file = dockerfile();
    let stages = file.stages();
    let services = compose["services"].as_object().unwrap();
    let mut built = BTreeSet::new();
    for (name, service) in services {
        let Some(target) = service["build"]["target"].as_str() else {
            continue;
        };
        built.insert(target.to_owned());
        assert!(
            stages.get_by_name(target).is_some(),
            "{name}: target {target} is not a Dockerfile stage"
        );
        assert_eq!(
            name, target,
            "service {name} should be named after its binary"
        );
        let env: BTreeMap<String, String> = service["environment"]
            .as_object()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), str_of(v))).collect())
            .unwrap_or_default();
        let known = env_names(target);
        for var in env.keys() {
            assert!(
                known.contains(var.as_str()) || var == "RUST_LOG",
                "{name}: {target} does not read the variable {var}"
            );
        }
        let command: Vec<String> = service["command"]
            .as_array()
            .unwrap_or_else(|| panic!("{name}: command"))
            .iter()
            .map(str_of)
            .collect();
        assert_eq!(command.len(), 2, "{name}: command is --config FILE");
        assert_eq!(command[0], "--config");
        let mount = service["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(str_of)
            .find(|v| v.split(':').nth(1) == Some(command[1].as_str()))
            .unwrap_or_else(|| panic!("{name}: nothing is mounted at {}", command[1]));
        let source = mount.split(':').next().unwrap();
        assert!(
            source.starts_with("./config/"),
            "{name}: mounts {source}, not a file of config/"
        );
        let path = repo().join(source);
        assert!(path.is_file(), "{name}: {source} does not exist");

        let facts = load(target, Some(&path), &env);
        let exposed: BTreeSet<u16> = service["expose"]
            .as_array()
            .map(|a| a.iter().map(|p| str_of(p).parse().unwrap()).collect())
            .unwrap_or_default();
        let published: BTreeSet<u16> = service["ports"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|p| str_of(p).rsplit(':').next().unwrap().parse().unwrap())
                    .collect()
            })
            .unwrap_or_default();
        let ports: BTreeSet<u16> = exposed.union(&published).copied().collect();
        assert!(
            ports.contains(&facts.metrics_port),
            "{name}: metrics port {} is neither exposed nor published ({ports:?})",
            facts.metrics_port
        );
        if let Some(api) = facts.api_port {
            assert!(
                published.contains(&api),
                "{name}: API port {api} not published"
            );
        } else {
            assert!(
                facts.gateway_url.starts_with("http://gateway:"),
                "{name}: gateway_url {} is not the compose gateway",
                facts.gateway_url
            );
            let gateway_port = load(
                "gateway",
                Some(&repo().join("config/compose.toml")),
                &BTreeMap::new(),
            )
            .api_port
            .unwrap();
            assert!(facts.gateway_url.ends_with(&format!(":{gateway_port}")));
        }
        if target == "cron-connector" && service["deploy"]["replicas"].as_u64().unwrap_or(1) > 1 {
            assert!(
                facts.lock,
                "{name}: several replicas without lock.redis_url"
            );
        }
    }
    let expected: BTreeSet<String> = workspace_binaries();
    assert_eq!(built, expected, "compose.yaml should run every binary");

    // Prometheus scrapes every connector service and the gateway on their metrics ports.
    let prometheus = yaml("deploy/prometheus/prometheus.yml");
    let mut scraped = BTreeMap::new();
    for job in prometheus["scrape_configs"].as_array().unwrap() {
        for sd in job["dns_sd_configs"].as_array().into_iter().flatten() {
            for n in sd["names"].as_array().unwrap() {
                scraped.insert(str_of(n), sd["port"].as_u64().unwrap() as u16);
            }
        }
        for sc in job["static_configs"].as_array().into_iter().flatten() {
            for t in sc["targets"].as_array().unwrap() {
                let (host, port) = t.as_str().unwrap().split_once(':').unwrap();
                scraped.insert(host.to_owned(), port.parse().unwrap());
            }
        }
    }
    for binary in &expected {
        let port = scraped
            .get(binary.as_str())
            .unwrap_or_else(|| panic!("prometheus.yml does not scrape {binary}"));
        assert!(services.contains_key(binary.as_str()));
        let metrics = if binary == "gateway" {
            load(
                "gateway",
                Some(&repo().join("config/compose.toml")),
                &BTreeMap::new(),
            )
            .metrics_port
        } else {
            SdkConfig::default().metrics_addr.port()
        };
        assert_eq!(*port, metrics, "prometheus.yml scrapes {binary} on {port}");
    }
}

// ---------------------------------------------------------------------------------------
// Kubernetes

/// A connector's Deployment with the TOML of the ConfigMap it mounts.
struct Deployment {
    binary: String,
    deployment: Value,
    toml: String,
    config_path: String,
}

/// The ConfigMaps and Deployments of a set of YAML documents.
fn deployments(docs: &[Value], origin: &str) -> Vec<Deployment> {
    let config_maps: BTreeMap<String, &Value> = docs
        .iter()
        .filter(|d| d["kind"] == "ConfigMap")
        .map(|d| (str_of(&d["metadata"]["name"]), d))
        .collect();
    let mut out = Vec::new();
    // A StatefulSet where each replica needs a stable identity (mqtt-connector: the pod
    // name is its client id, and so its broker session).
    for d in docs
        .iter()
        .filter(|d| d["kind"] == "Deployment" || d["kind"] == "StatefulSet")
    {
        let name = str_of(&d["metadata"]["name"]);
        let pod = &d["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        let image = str_of(&container["image"]);
        let binary = CONNECTORS
            .iter()
            .find(|b| image.contains(&format!("/{b}:")) || image.contains(&format!("/{b}\"")))
            .unwrap_or_else(|| panic!("{origin} {name}: image {image} is no connector's"));
        let args: Vec<String> = container["args"]
            .as_array()
            .unwrap_or_else(|| panic!("{origin} {name}: args"))
            .iter()
            .map(str_of)
            .collect();
        assert_eq!(args.len(), 2, "{origin} {name}: args are --config FILE");
        assert_eq!(args[0], "--config");
        let config_path = args[1].clone();
        let (dir, key) = config_path.rsplit_once('/').unwrap();
        let mount = container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"] == dir)
            .unwrap_or_else(|| panic!("{origin} {name}: nothing mounted at {dir}"));
        let volume = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap();
        let map_name = str_of(&volume["configMap"]["name"]);
        let map = config_maps
            .get(&map_name)
            .unwrap_or_else(|| panic!("{origin} {name}: no ConfigMap {map_name}"));
        let toml = map["data"][key]
            .as_str()
            .unwrap_or_else(|| panic!("{origin} ConfigMap {map_name} has no key {key}"))
            .to_owned();
        out.push(Deployment {
            binary: (*binary).to_owned(),
            deployment: d.clone(),
            toml,
            config_path,
        });
    }
    out
}

/// Checks one connector Deployment against its binary's configuration.
fn check_deployment(d: &Deployment, origin: &str) {
    let binary = d.binary.as_str();
    let what = format!("{origin} {binary}");
    let meta = &d.deployment["metadata"];
    assert_eq!(meta["namespace"], "openfaas", "{what}: namespace");
    let template = &d.deployment["spec"]["template"];
    let pod = &template["spec"];
    let container = &pod["containers"][0];

    // Variables: each one the binary reads; the plain ones are loaded with the TOML.
    let known = env_names(binary);
    let mut env = BTreeMap::new();
    for var in container["env"].as_array().unwrap() {
        let name = str_of(&var["name"]);
        assert!(
            known.contains(name.as_str()) || name == "RUST_LOG",
            "{what}: {binary} does not read the variable {name}"
        );
        if let Some(value) = var.get("value") {
            env.insert(name, str_of(value));
        } else {
            assert!(
                var["valueFrom"]["secretKeyRef"]["name"].is_string()
                    || var["valueFrom"]["fieldRef"]["fieldPath"].is_string(),
                "{what}: {name} has neither value, secretKeyRef nor fieldRef"
            );
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("connector.toml");
    std::fs::write(&file, &d.toml).unwrap();
    let facts = load(binary, Some(&file), &env);
    assert!(d.config_path.ends_with(".toml"));

    assert_eq!(
        facts.gateway_url, "http://gateway.openfaas:8080",
        "{what}: gateway_url"
    );
    assert!(facts.basic_auth, "{what}: basic_auth is off");
    assert_eq!(facts.secret_mount_path, Path::new("/var/secrets"), "{what}");
    let mounts = container["volumeMounts"].as_array().unwrap();
    let auth_mount = mounts
        .iter()
        .find(|m| m["mountPath"] == "/var/secrets")
        .unwrap_or_else(|| panic!("{what}: nothing mounted at /var/secrets"));
    let auth_volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == auth_mount["name"])
        .unwrap();
    assert_eq!(auth_volume["secret"]["secretName"], "basic-auth", "{what}");

    // Probes and the scrape on the loaded metrics port.
    let port = facts.metrics_port;
    let ports = container["ports"].as_array().unwrap();
    let named = |name: &Value| -> u16 {
        match name {
            Value::Number(n) => n.as_u64().unwrap() as u16,
            Value::String(s) => ports
                .iter()
                .find(|p| p["name"] == s.as_str())
                .map(|p| p["containerPort"].as_u64().unwrap() as u16)
                .unwrap_or_else(|| panic!("{what}: no port named {s}")),
            other => panic!("{what}: port {other}"),
        }
    };
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"], path, "{what}: {probe} path");
        assert_eq!(named(&get["port"]), port, "{what}: {probe} port");
    }
    // SIGTERM drains. No preStop hook calls the health server's /drain: it is off without
    // a drain token (connector_sdk::server), and an httpGet hook could carry the token
    // only in plain text in the spec.
    let pre_stop = &container["lifecycle"]["preStop"];
    assert!(
        pre_stop["httpGet"].is_null() && pre_stop["exec"].is_null(),
        "{what}: a preStop hook that calls the connector: {pre_stop}"
    );
    let annotations = &template["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true", "{what}");
    assert_eq!(
        str_of(&annotations["prometheus.io/port"]),
        port.to_string(),
        "{what}"
    );
    assert_eq!(annotations["prometheus.io/path"], "/metrics", "{what}");

    // The pod is given longer than the drain (after any preStop sleep) before SIGKILL.
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap_or_else(|| panic!("{what}: terminationGracePeriodSeconds"));
    let pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        Duration::from_secs(grace) >= facts.drain_timeout + Duration::from_secs(pre_stop + 5),
        "{what}: terminationGracePeriodSeconds {grace} does not cover preStop {pre_stop}s + drain_timeout {:?} + 5s",
        facts.drain_timeout
    );

    let requests = &container["resources"]["requests"];
    assert!(
        requests["cpu"].is_string() && requests["memory"].is_string(),
        "{what}: requests"
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{what}");

    if binary == "cron-connector" {
        let replicas = d.deployment["spec"]["replicas"].as_u64().unwrap_or(1);
        assert!(
            replicas > 1,
            "{what}: the cron connector should run several replicas"
        );
        assert!(
            facts.lock,
            "{what}: several replicas without lock.redis_url"
        );
    }
}

/// `dir/kustomization.yaml` and its `resources`.
fn kustomization(dir: &str) -> (Value, BTreeSet<String>) {
    let kustomization = yaml(&format!("{dir}/kustomization.yaml"));
    let resources = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(str_of)
        .collect();
    (kustomization, resources)
}

#[test]
fn kubernetes_manifests_match_the_connectors() {
    let dir = repo().join("deploy/kubernetes");
    let (kustomization, resources) = kustomization("deploy/kubernetes");
    assert_eq!(kustomization["namespace"], "openfaas");
    let files: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".yaml") && f != "kustomization.yaml")
        .collect();
    assert_eq!(resources, files, "kustomization.yaml resources");

    let mut seen = BTreeSet::new();
    for file in &files {
        let origin = format!("deploy/kubernetes/{file}");
        let docs = yaml_documents(&origin);
        for doc in &docs {
            assert_eq!(
                doc["metadata"]["namespace"], "openfaas",
                "{origin}: {}",
                doc["kind"]
            );
        }
        for d in deployments(&docs, &origin) {
            check_deployment(&d, &origin);
            seen.insert(d.binary);
        }
    }
    let expected: BTreeSet<String> = CONNECTORS.iter().map(|s| (*s).to_owned()).collect();
    assert_eq!(seen, expected, "a Deployment per connector");
}

// ---------------------------------------------------------------------------------------
// Metrics: the dashboard and the scrape configs name only metrics the binaries serve.

/// Every sample name the binaries serve: each registry encoded, `# TYPE` lines read, and
/// the suffixes of each type added (`_total`, `_bucket`, `_info`, ...).
fn served_metric_names() -> BTreeSet<String> {
    let (sdk, mut registry) = connector_sdk::metrics::Metrics::standalone("deploy-test");
    cron_connector::metrics::CronMetrics::register(&mut registry);
    kafka_connector::metrics::KafkaMetrics::register(&mut registry);
    redis_connector::metrics::RedisMetrics::register(&mut registry);
    sqs_connector::metrics::SqsMetrics::register(&mut registry);
    nats_connector::metrics::NatsMetrics::register(&mut registry, sdk);
    let mut text = connector_sdk::metrics::encode(&registry);
    text.push_str(&gateway::metrics::Metrics::new().encode().unwrap());
    let mut names = BTreeSet::new();
    for (name, kind) in text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
    {
        let suffixes: &[&str] = match kind {
            "counter" => &["_total", "_created"],
            "histogram" => &["_bucket", "_sum", "_count"],
            "info" => &["_info"],
            _ => &[""],
        };
        for s in suffixes {
            names.insert(format!("{name}{s}"));
        }
    }
    assert!(names.len() > 40, "{names:?}");
    names
}

/// The metric names (`connector_...`, `gateway_...`) a PromQL expression mentions.
fn metric_names_in(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = expr.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut start = None;
    for (i, &b) in bytes.iter().chain(std::iter::once(&b' ')).enumerate() {
        match (word(b), start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                let token = &expr[s..i];
                let after = bytes.get(i).copied();
                // A label name (`service=`) or a function call (`rate(`) is not a metric.
                let is_metric = (token.starts_with("connector_") || token.starts_with("gateway_"))
                    && !matches!(after, Some(b'=') | Some(b'!') | Some(b'('));
                if is_metric {
                    out.insert(token.to_owned());
                }
                start = None;
            }
            _ => {}
        }
    }
    out
}

fn exprs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                if k == "expr" {
                    out.push(str_of(v));
                } else if k == "query" && v.is_object() {
                    exprs(v, out);
                } else if k == "query" || k == "definition" {
                    out.push(str_of(v));
                } else {
                    exprs(v, out);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

#[test]
fn dashboard_queries_name_served_metrics() {
    let served = served_metric_names();
    let dashboard: Value = serde_json::from_str(&read("deploy/grafana/connectors.json")).unwrap();
    let mut queries = Vec::new();
    exprs(&dashboard, &mut queries);
    let mut used = BTreeSet::new();
    for q in &queries {
        for name in metric_names_in(q) {
            assert!(
                served.contains(&name),
                "deploy/grafana/connectors.json queries {name}, which no binary serves:\n{q}"
            );
            used.insert(name);
        }
    }
    // What an operator opens the dashboard for.
    for needed in [
        "connector_deliveries_total",
        "connector_invocation_duration_seconds_bucket",
        "connector_backlog_messages",
        "connector_partition_stalled",
        "connector_dead_letters_total",
        "connector_dead_letter_write_failures_total",
        "connector_retries_total",
        "connector_ready",
        "gateway_function_invocation_total",
        "gateway_functions_seconds_bucket",
    ] {
        assert!(
            used.contains(needed),
            "the dashboard does not show {needed}"
        );
    }
    // Every panel has a query and a unique id.
    let panels = dashboard["panels"].as_array().unwrap();
    let ids: BTreeSet<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), panels.len(), "panel ids are unique");
    for p in panels.iter().filter(|p| p["type"] != "row") {
        assert!(
            p["targets"].as_array().is_some_and(|t| !t.is_empty()),
            "panel {} has no query",
            p["title"]
        );
    }
}

#[test]
fn metric_name_extraction_skips_labels_and_functions() {
    let names = metric_names_in(
        r#"histogram_quantile(0.99, sum by (le) (rate(connector_invocation_duration_seconds_bucket{service=~"$service", connector_x="y"}[5m]))) / gateway_service_count"#,
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        [
            "connector_invocation_duration_seconds_bucket",
            "gateway_service_count"
        ]
    );
}

// ---------------------------------------------------------------------------------------
// Helm chart (helm is not available here to render it: its values are checked as the
// manifests are, and its templates for the values they read)

/// The dotted paths following `prefix` in `text` (`.Values.image.tag` gives `image.tag`).
fn references(text: &str, prefix: &str) -> BTreeSet<String> {
    text.match_indices(prefix)
        .map(|(i, _)| {
            text[i + prefix.len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '.')
                .collect::<String>()
                .trim_end_matches('.')
                .to_owned()
        })
        .filter(|p| !p.is_empty())
        .collect()
}

#[test]
fn helm_chart_values_match_the_connectors() {
    const CHART: &str = "deploy/helm/faas-connectors";
    let chart = yaml(&format!("{CHART}/Chart.yaml"));
    assert_eq!(chart["apiVersion"], "v2");
    let values = yaml(&format!("{CHART}/values.yaml"));
    assert_eq!(values["namespace"], "openfaas");
    assert_eq!(values["basicAuth"]["secretName"], "basic-auth");
    let mount_path = str_of(&values["basicAuth"]["mountPath"]);
    let metrics_port = values["metricsPort"].as_u64().unwrap() as u16;
    let grace = values["terminationGracePeriodSeconds"].as_u64().unwrap();
    let shared: BTreeMap<String, String> = values["env"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), str_of(v)))
        .collect();

    let connectors = values["connectors"].as_object().unwrap();
    let mut seen = BTreeSet::new();
    for (key, c) in connectors {
        let binary = format!("{key}-connector");
        let what = format!("values.yaml connectors.{key}");
        assert!(
            CONNECTORS.contains(&binary.as_str()),
            "{what}: no binary {binary}"
        );
        seen.insert(binary.clone());
        let known = env_names(&binary);
        let mut env = shared.clone();
        for (k, v) in c["env"].as_object().into_iter().flatten() {
            env.insert(k.clone(), str_of(v));
        }
        for name in env.keys() {
            assert!(
                known.contains(name.as_str()),
                "{what}: {binary} does not read {name}"
            );
        }
        for s in c["secretEnv"].as_array().into_iter().flatten() {
            let name = str_of(&s["name"]);
            assert!(
                known.contains(name.as_str()),
                "{what}: {binary} does not read {name}"
            );
            assert!(
                s["secret"].is_string() && s["key"].is_string(),
                "{what}: {name}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("connector.toml");
        std::fs::write(&file, c["config"].as_str().unwrap()).unwrap();
        let facts = load(&binary, Some(&file), &env);
        assert_eq!(facts.metrics_port, metrics_port, "{what}: metrics port");
        assert_eq!(facts.gateway_url, "http://gateway.openfaas:8080", "{what}");
        assert!(facts.basic_auth, "{what}: basic_auth is off");
        assert_eq!(facts.secret_mount_path, Path::new(&mount_path), "{what}");
        assert!(
            Duration::from_secs(grace) >= facts.drain_timeout + Duration::from_secs(5),
            "{what}: terminationGracePeriodSeconds {grace} does not cover drain_timeout {:?} + 5s",
            facts.drain_timeout
        );
        let requests = &c["resources"]["requests"];
        assert!(
            requests["cpu"].is_string() && requests["memory"].is_string(),
            "{what}"
        );
        if key == "cron" {
            assert!(
                c["replicas"].as_u64().unwrap() > 1,
                "{what}: several replicas"
            );
            assert!(
                facts.lock,
                "{what}: several replicas without lock.redis_url"
            );
        }
    }
    let expected: BTreeSet<String> = CONNECTORS.iter().map(|s| (*s).to_owned()).collect();
    assert_eq!(seen, expected, "values.yaml: an entry per connector");

    // The templates read only values that exist.
    let templates = repo().join(CHART).join("templates");
    let mut text = String::new();
    for entry in std::fs::read_dir(&templates).unwrap() {
        text.push_str(&std::fs::read_to_string(entry.unwrap().path()).unwrap());
    }
    let values_paths = references(&text, ".Values.");
    assert!(values_paths.len() > 5, "{values_paths:?}");
    for path in values_paths {
        let mut v = &values;
        for part in path.split('.') {
            v = &v[part];
        }
        assert!(
            !v.is_null(),
            "a template reads .Values.{path}, which values.yaml lacks"
        );
    }
    let fields: BTreeSet<String> = connectors
        .values()
        .flat_map(|c| c.as_object().unwrap().keys().cloned())
        .collect();
    for path in references(&text, "$c.") {
        let field = path.split('.').next().unwrap();
        assert!(
            fields.contains(field),
            "a template reads $c.{path}: no connector in values.yaml has {field}"
        );
    }
    assert!(
        !text.contains("preStop:"),
        "the chart's templates have a preStop hook (SIGTERM drains; /drain needs a token)"
    );
    for needed in [
        "/healthz",
        "/readyz",
        "prometheus.io/scrape",
        "terminationGracePeriodSeconds",
        "--config",
    ] {
        assert!(
            text.contains(needed),
            "the chart's templates do not mention {needed}"
        );
    }
}

/// Deserializes `doc` as the Kubernetes type `T` (k8s-openapi's bindings of the API),
/// failing on a wrong type and on any field the API does not have (a misspelt
/// `terminationGracePeriodSecond` would otherwise be ignored by the API server's client).
fn check_schema<T: serde::de::DeserializeOwned>(doc: &Value, origin: &str) {
    let mut unknown = Vec::new();
    let result: Result<T, _> =
        serde_ignored::deserialize(doc.clone(), |path| unknown.push(path.to_string()));
    if let Err(e) = result {
        panic!(
            "{origin} {}: not a valid {}: {e}",
            doc["kind"],
            std::any::type_name::<T>()
        );
    }
    assert!(
        unknown.is_empty(),
        "{origin} {}: fields the Kubernetes API does not have: {unknown:?}",
        doc["kind"]
    );
}

#[test]
fn kubernetes_manifests_follow_the_api_schema() {
    use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
    use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
    let dir = repo().join("deploy/kubernetes");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let file = entry.unwrap().file_name().to_string_lossy().into_owned();
        if !file.ends_with(".yaml") || file == "kustomization.yaml" {
            continue;
        }
        let origin = format!("deploy/kubernetes/{file}");
        for doc in yaml_documents(&origin) {
            match doc["kind"].as_str() {
                Some("Deployment") => check_schema::<Deployment>(&doc, &origin),
                Some("StatefulSet") => check_schema::<StatefulSet>(&doc, &origin),
                Some("ConfigMap") => check_schema::<ConfigMap>(&doc, &origin),
                Some("ServiceAccount") => check_schema::<ServiceAccount>(&doc, &origin),
                other => panic!("{origin}: unexpected kind {other:?}"),
            }
            checked += 1;
        }
    }
    assert!(checked >= 10, "{checked} documents");
    // The check itself: a misspelt field and a wrong type are caught.
    let mut doc = yaml_documents("deploy/kubernetes/kafka-connector.yaml")
        .into_iter()
        .find(|d| d["kind"] == "Deployment")
        .unwrap();
    doc["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 45.into();
    let caught = std::panic::catch_unwind(|| check_schema::<Deployment>(&doc, "probe"));
    assert!(caught.is_err(), "an unknown field was not reported");
}

/// The connectors that have a backlog to scale on (all but cron).
fn broker_connectors() -> impl Iterator<Item = &'static str> {
    CONNECTORS.into_iter().filter(|c| *c != "cron-connector")
}

#[test]
fn keda_overlay_scales_a_function_through_every_broker_connector() {
    use k8s_openapi::api::core::v1::Service;
    const DIR: &str = "deploy/kubernetes-keda";
    let (kustomization, resources) = kustomization(DIR);
    let expected: BTreeSet<String> = ["../kubernetes", "services.yaml", "scaledobjects.yaml"]
        .map(str::to_owned)
        .into();
    assert_eq!(resources, expected, "{DIR}/kustomization.yaml resources");

    // The kind of each connector's workload in the base.
    let mut kinds = BTreeMap::new();
    for binary in CONNECTORS {
        for doc in yaml_documents(&format!("deploy/kubernetes/{binary}.yaml")) {
            if matches!(doc["kind"].as_str(), Some("Deployment" | "StatefulSet")) {
                kinds.insert(binary.to_owned(), str_of(&doc["kind"]));
            }
        }
    }

    // Each patch turns the scaler on: an address the binary reads, a named port.
    let mut ports: BTreeMap<String, u16> = BTreeMap::new();
    for patch in kustomization["patches"].as_array().unwrap() {
        let target = str_of(&patch["target"]["name"]);
        let what = format!("{DIR}/kustomization.yaml patch of {target}");
        assert_eq!(
            kinds.get(&target),
            Some(&str_of(&patch["target"]["kind"])),
            "{what}: no such workload in deploy/kubernetes"
        );
        assert!(env_names(&target).contains("scaler_addr"), "{what}");
        let ops: Value = serde_json::to_value(
            serde_norway::from_str::<serde_norway::Value>(patch["patch"].as_str().unwrap())
                .unwrap(),
        )
        .unwrap();
        let mut addr = None;
        let mut port = None;
        for op in ops.as_array().unwrap() {
            let value = &op["value"];
            match str_of(&op["path"]).as_str() {
                "/spec/template/spec/containers/0/env/-" => {
                    assert_eq!(value["name"], "scaler_addr", "{what}");
                    let a: std::net::SocketAddr = str_of(&value["value"]).parse().unwrap();
                    addr = Some(a.port());
                }
                "/spec/template/spec/containers/0/ports/-" => {
                    assert_eq!(value["name"], "scaler", "{what}");
                    port = value["containerPort"].as_u64().map(|p| p as u16);
                }
                other => panic!("{what}: unexpected path {other}"),
            }
        }
        assert!(
            addr.is_some() && addr == port,
            "{what}: scaler_addr {addr:?}, containerPort {port:?}"
        );
        ports.insert(target, port.unwrap());
    }
    let brokers: BTreeSet<String> = broker_connectors().map(str::to_owned).collect();
    assert_eq!(
        ports.keys().cloned().collect::<BTreeSet<_>>(),
        brokers,
        "a patch per broker connector"
    );

    // A Service per broker connector, on its scaler port.
    let mut services = BTreeMap::new();
    for doc in yaml_documents(&format!("{DIR}/services.yaml")) {
        check_schema::<Service>(&doc, DIR);
        let name = str_of(&doc["metadata"]["name"]);
        assert_eq!(doc["metadata"]["namespace"], "openfaas", "{name}");
        assert_eq!(
            doc["spec"]["selector"]["app.kubernetes.io/name"],
            name.as_str()
        );
        let port = &doc["spec"]["ports"][0];
        assert_eq!(port["targetPort"], "scaler", "{name}");
        services.insert(format!("{name}.openfaas:{}", port["port"]), name.clone());
        assert_eq!(
            port["port"].as_u64().map(|p| p as u16),
            ports.get(&name).copied(),
            "{name}"
        );
    }

    // A ScaledObject per broker connector, pointing at its Service and naming a function.
    let mut scaled = BTreeSet::new();
    for doc in yaml_documents(&format!("{DIR}/scaledobjects.yaml")) {
        let name = str_of(&doc["metadata"]["name"]);
        assert_eq!(doc["apiVersion"], "keda.sh/v1alpha1", "{name}");
        assert_eq!(doc["kind"], "ScaledObject", "{name}");
        assert!(doc["metadata"]["namespace"].is_string(), "{name}");
        assert!(doc["spec"]["scaleTargetRef"]["name"].is_string(), "{name}");
        let trigger = &doc["spec"]["triggers"][0];
        assert!(
            matches!(trigger["type"].as_str(), Some("external-push" | "external")),
            "{name}: {}",
            trigger["type"]
        );
        let meta = &trigger["metadata"];
        let connector = services
            .get(&str_of(&meta["scalerAddress"]))
            .unwrap_or_else(|| {
                panic!(
                    "{name}: scalerAddress {} is no Service",
                    meta["scalerAddress"]
                )
            });
        assert!(
            !str_of(&meta[connector_sdk::scaler::FUNCTION_KEY]).is_empty(),
            "{name}: no function"
        );
        if let Some(target) = meta[connector_sdk::scaler::TARGET_KEY].as_str() {
            assert!(
                target.parse::<f64>().is_ok_and(|t| t > 0.0),
                "{name}: {target}"
            );
        }
        scaled.insert(connector.clone());
    }
    assert_eq!(scaled, brokers, "a ScaledObject per broker connector");
}

#[test]
fn helm_chart_keda_is_off_by_default_and_renders_what_the_overlay_has() {
    const CHART: &str = "deploy/helm/faas-connectors";
    let values = yaml(&format!("{CHART}/values.yaml"));
    assert_eq!(values["keda"]["enabled"], false, "KEDA is off by default");
    assert!(values["keda"]["port"].is_u64());
    for binary in broker_connectors() {
        let key = binary.trim_end_matches("-connector");
        assert!(
            values["connectors"][key]["scaledObjects"].is_array(),
            "values.yaml connectors.{key}.scaledObjects"
        );
    }
    let template = read(&format!("{CHART}/templates/connectors.yaml"));
    for needed in [
        "name: scaler_addr",
        "kind: ScaledObject",
        "type: external-push",
        "scalerAddress:",
        "kind: Service",
    ] {
        assert!(
            template.contains(needed),
            "the chart does not render {needed}"
        );
    }
}
