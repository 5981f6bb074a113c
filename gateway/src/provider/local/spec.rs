//! What the local provider reads out of a deployment: the runtime, the command, the
//! watchdog variables and the scaling labels. Everything is checked here, at deploy time,
//! so a bad deployment is a 400 and never a function that fails later.

use std::path::PathBuf;
use std::time::Duration;

use crate::config::{
    HEALTH_PATH_ANNOTATION, RUNTIME_ANNOTATION, RuntimeKind, URL_ANNOTATION, WORKDIR_ANNOTATION,
};
use crate::error::Error;
use crate::names::FunctionRef;
use crate::provider::parse_watchdog_duration;
use crate::types::{FunctionDeployment, StringMap};

/// Label: least replicas (OpenFaaS's; default 1).
pub const SCALE_MIN: &str = "com.openfaas.scale.min";
/// Label: most replicas (default 5).
pub const SCALE_MAX: &str = "com.openfaas.scale.max";
/// Label: in-flight requests per replica the autoscaler aims for (default 50).
pub const SCALE_TARGET: &str = "com.openfaas.scale.target";
/// Label: scale to zero when idle (`true`/`false`).
pub const SCALE_ZERO: &str = "com.openfaas.scale.zero";
/// Label: idle time before scaling to zero (`15m`).
pub const SCALE_ZERO_DURATION: &str = "com.openfaas.scale.zero-duration";
/// Annotation (or label): messages waiting per replica to aim for, when connectors report
/// the function's backlog; the name the connectors' KEDA scaler reads.
pub const BACKLOG_TARGET: &str = "connector.scale.target";
/// Backlog per replica when the function does not say.
pub const DEFAULT_BACKLOG_TARGET: u64 = 10;

/// Variables passed from the gateway's own environment to functions; everything else
/// (credentials in particular) is withheld.
const INHERITED_ENV: &[&str] = &["PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "USER", "TZ"];

/// A deployment as the local provider runs it.
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionSpec {
    /// The function.
    pub function: FunctionRef,
    /// Its runtime.
    pub runtime: RuntimeKind,
    /// `fprocess` split on whitespace (no shell, as the watchdog does).
    pub argv: Vec<String>,
    /// The service address of a `url` function.
    pub url: Option<String>,
    /// Working directory of the command.
    pub workdir: Option<PathBuf>,
    /// Readiness path of an `http` function.
    pub health_path: String,
    /// `envVars` as deployed.
    pub env: StringMap,
    /// `labels` as deployed, also given to the function in its environment.
    pub labels: StringMap,
    /// `exec_timeout` from `envVars`.
    pub exec_timeout: Option<Duration>,
    /// `max_inflight` from `envVars` (0 or absent: no limit).
    pub max_inflight: Option<usize>,
    /// `content_type` from `envVars`.
    pub content_type: Option<String>,
    /// Scaling labels.
    pub scaling: Scaling,
}

/// The scaling labels, read for every runtime (see [`super::scaling`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scaling {
    /// Least replicas while the function is in use.
    pub min: u64,
    /// Most replicas.
    pub max: u64,
    /// In-flight requests per replica to aim for.
    pub target: u64,
    /// Idle time before scaling to zero, when enabled.
    pub zero_after: Option<Duration>,
    /// Messages waiting per replica to aim for (`connector.scale.target`).
    pub backlog_target: u64,
}

impl FunctionSpec {
    /// Reads and checks `deployment`; `zero_after` is the provider's default idle time.
    pub fn from_deployment(
        function: FunctionRef,
        deployment: &FunctionDeployment,
        zero_after: Duration,
    ) -> Result<Self, Error> {
        let annotations = deployment.annotations.clone().unwrap_or_default();
        let labels = deployment.labels.clone().unwrap_or_default();
        let env = deployment.env_vars.clone().unwrap_or_default();
        let argv: Vec<String> = deployment
            .env_process
            .as_deref()
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        let runtime = match annotations.get(RUNTIME_ANNOTATION).map(String::as_str) {
            Some("process") => RuntimeKind::Process,
            Some("http") => RuntimeKind::Http,
            Some("url") => RuntimeKind::Url,
            Some(other) => {
                return Err(Error::BadRequest(format!(
                    "annotation {RUNTIME_ANNOTATION}={other:?}: the local provider runs `process`, `http` or `url`"
                )));
            }
            None if !argv.is_empty() => RuntimeKind::Process,
            None => {
                return Err(Error::BadRequest(format!(
                    "the local provider does not run container images (image {:?} was not pulled). \
                     It runs: a command per request (set envProcess), a long-running HTTP server \
                     (envProcess plus annotation {RUNTIME_ANNOTATION}=http; it gets its port in PORT), \
                     or an existing service (annotations {RUNTIME_ANNOTATION}=url and {URL_ANNOTATION}=http://...)",
                    deployment.image
                )));
            }
        };
        if matches!(runtime, RuntimeKind::Process | RuntimeKind::Http) && argv.is_empty() {
            return Err(Error::BadRequest(format!(
                "a `{}` function needs envProcess, the command to run",
                runtime.as_str()
            )));
        }
        let url = match runtime {
            RuntimeKind::Url => {
                let url = annotations.get(URL_ANNOTATION).ok_or_else(|| {
                    Error::BadRequest(format!(
                        "a `url` function needs the annotation {URL_ANNOTATION}"
                    ))
                })?;
                match reqwest::Url::parse(url) {
                    Ok(u) if matches!(u.scheme(), "http" | "https") => Some(url.clone()),
                    _ => {
                        return Err(Error::BadRequest(format!(
                            "annotation {URL_ANNOTATION}={url:?} is not an http(s) URL"
                        )));
                    }
                }
            }
            _ => None,
        };
        let health_path = annotations
            .get(HEALTH_PATH_ANNOTATION)
            .cloned()
            .unwrap_or_else(|| "/_/health".to_owned());
        if !health_path.starts_with('/') {
            return Err(Error::BadRequest(format!(
                "annotation {HEALTH_PATH_ANNOTATION}={health_path:?} must start with /"
            )));
        }
        let exec_timeout = match env.get("exec_timeout") {
            Some(text) => Some(parse_watchdog_duration(text).ok_or_else(|| {
                Error::BadRequest(format!("envVars.exec_timeout={text:?} is not a duration"))
            })?),
            None => None,
        };
        let max_inflight = match env.get("max_inflight") {
            Some(text) => {
                let n: usize = text.trim().parse().map_err(|_| {
                    Error::BadRequest(format!("envVars.max_inflight={text:?} is not a number"))
                })?;
                (n > 0).then_some(n)
            }
            None => None,
        };
        let scaling = Scaling::from_labels(&labels, &annotations, zero_after)?;
        let labels: StringMap = labels
            .into_iter()
            .filter(|(key, _)| valid_env_name(key))
            .collect();
        Ok(Self {
            function,
            runtime,
            argv,
            url,
            workdir: annotations.get(WORKDIR_ANNOTATION).map(PathBuf::from),
            health_path,
            content_type: env.get("content_type").cloned(),
            env,
            labels,
            exec_timeout,
            max_inflight,
            scaling,
        })
    }

    /// Sets the function's environment on `command`: a few variables of the gateway's
    /// own, then the labels under their own names (`com.openfaas.scale.min` included;
    /// read them with `os.environ`/`getenv`, as shells cannot name a variable with dots),
    /// then `envVars`, which win over a label of the same name, then `fprocess`.
    pub fn apply_env(&self, command: &mut tokio::process::Command) {
        command.env_clear();
        for name in INHERITED_ENV {
            if let Ok(value) = std::env::var(name) {
                command.env(name, value);
            }
        }
        command.envs(&self.labels);
        command.envs(&self.env);
        command.env("fprocess", self.argv.join(" "));
    }
}

/// Whether `name` can be an environment variable: not empty, no `=` and no NUL (what
/// the process environment itself forbids). Labels that cannot are left out of it.
fn valid_env_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(['=', '\0'])
}

impl Scaling {
    fn from_labels(
        labels: &StringMap,
        annotations: &StringMap,
        default_zero_after: Duration,
    ) -> Result<Self, Error> {
        let number_in = |map: &StringMap, kind: &str, key: &str| -> Result<Option<u64>, Error> {
            map.get(key)
                .map(|text| {
                    text.trim().parse().map_err(|_| {
                        Error::BadRequest(format!("{kind} {key}={text:?} is not a whole number"))
                    })
                })
                .transpose()
        };
        let number = |key: &str, default: u64| -> Result<u64, Error> {
            Ok(number_in(labels, "label", key)?.unwrap_or(default))
        };
        let backlog_target = match number_in(annotations, "annotation", BACKLOG_TARGET)? {
            Some(n) => n,
            None => number(BACKLOG_TARGET, DEFAULT_BACKLOG_TARGET)?,
        }
        .max(1);
        let min = number(SCALE_MIN, 1)?;
        let max = number(SCALE_MAX, 5)?.max(1);
        let target = number(SCALE_TARGET, 50)?.max(1);
        if min > max {
            return Err(Error::BadRequest(format!(
                "label {SCALE_MIN}={min} is above {SCALE_MAX}={max}"
            )));
        }
        let zero_enabled = match labels
            .get(SCALE_ZERO)
            .map(|s| s.trim().to_ascii_lowercase())
        {
            Some(v) if v == "true" || v == "1" => true,
            Some(v) if v == "false" || v == "0" => false,
            Some(v) => {
                return Err(Error::BadRequest(format!(
                    "label {SCALE_ZERO}={v:?} is neither true nor false"
                )));
            }
            None => min == 0,
        };
        let zero_after = match labels.get(SCALE_ZERO_DURATION) {
            Some(text) => parse_watchdog_duration(text).ok_or_else(|| {
                Error::BadRequest(format!(
                    "label {SCALE_ZERO_DURATION}={text:?} is not a duration"
                ))
            })?,
            None => default_zero_after,
        };
        Ok(Self {
            min,
            max,
            target,
            zero_after: zero_enabled.then_some(zero_after),
            backlog_target,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f() -> FunctionRef {
        FunctionRef {
            name: "f".into(),
            namespace: "openfaas-fn".into(),
        }
    }

    fn deploy(json: &str) -> Result<FunctionSpec, Error> {
        let d: FunctionDeployment = serde_json::from_str(json).unwrap();
        FunctionSpec::from_deployment(f(), &d, Duration::from_secs(300))
    }

    #[test]
    fn image_only_is_refused_with_what_can_run() {
        let e = deploy(r#"{"service":"f","image":"ghcr.io/x/figlet:latest"}"#).unwrap_err();
        assert!(matches!(e, Error::BadRequest(_)));
        assert!(e.to_string().contains("envProcess"), "{e}");
    }

    #[test]
    fn env_process_means_process() {
        let s = deploy(r#"{"service":"f","image":"i","envProcess":"wc -c","envVars":{"exec_timeout":"2s","max_inflight":"3"}}"#).unwrap();
        assert_eq!(s.runtime, RuntimeKind::Process);
        assert_eq!(s.argv, ["wc", "-c"]);
        assert_eq!(s.exec_timeout, Some(Duration::from_secs(2)));
        assert_eq!(s.max_inflight, Some(3));
    }

    #[test]
    fn scaling_labels() {
        let s = deploy(r#"{"service":"f","image":"i","envProcess":"srv","annotations":{"faas-gateway.runtime":"http"},"labels":{"com.openfaas.scale.min":"0","com.openfaas.scale.max":"3","com.openfaas.scale.target":"4"}}"#).unwrap();
        assert_eq!(s.runtime, RuntimeKind::Http);
        assert_eq!(
            s.scaling,
            Scaling {
                min: 0,
                max: 3,
                target: 4,
                zero_after: Some(Duration::from_secs(300)),
                backlog_target: DEFAULT_BACKLOG_TARGET,
            }
        );
        let s = deploy(r#"{"service":"f","image":"i","envProcess":"x","annotations":{"connector.scale.target":"25"}}"#).unwrap();
        assert_eq!(s.scaling.backlog_target, 25);
        assert!(deploy(r#"{"service":"f","image":"i","envProcess":"x","annotations":{"connector.scale.target":"lots"}}"#).is_err());
        assert!(deploy(r#"{"service":"f","image":"i","envProcess":"x","labels":{"com.openfaas.scale.min":"two"}}"#).is_err());
        assert!(deploy(r#"{"service":"f","image":"i","envProcess":"x","labels":{"com.openfaas.scale.min":"4","com.openfaas.scale.max":"2"}}"#).is_err());
    }

    #[test]
    fn url_needs_a_url() {
        assert!(
            deploy(r#"{"service":"f","image":"i","annotations":{"faas-gateway.runtime":"url"}}"#)
                .is_err()
        );
        assert!(deploy(r#"{"service":"f","image":"i","annotations":{"faas-gateway.runtime":"url","faas-gateway.url":"ftp://x"}}"#).is_err());
        let s = deploy(r#"{"service":"f","image":"i","annotations":{"faas-gateway.runtime":"url","faas-gateway.url":"http://127.0.0.1:9/"}}"#).unwrap();
        assert_eq!(s.url.as_deref(), Some("http://127.0.0.1:9/"));
    }
}
