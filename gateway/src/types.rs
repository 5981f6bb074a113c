//! The OpenFaaS API's JSON types, with its exact keys. Optional fields are left out when
//! absent, never sent as empty; `null` is accepted wherever faas-cli sends it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A string map (`envVars`, `labels`, `annotations`).
pub type StringMap = BTreeMap<String, String>;

/// The body of `POST` and `PUT /system/functions`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FunctionDeployment {
    /// The function's name.
    pub service: String,
    /// The image; recorded by the local provider, never pulled.
    pub image: String,
    /// The namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The command the watchdog runs (`fprocess`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_process: Option<String>,
    /// Environment variables for the function.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_vars: Option<StringMap>,
    /// Placement constraints; recorded only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraints: Option<Vec<String>>,
    /// Secrets the function reads as files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<Vec<String>>,
    /// Labels (`com.openfaas.scale.*` among them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<StringMap>,
    /// Annotations (`topic`, `schedule`, and the local provider's `com.openfaas.local.*`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<StringMap>,
    /// Resource limits; recorded only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<FunctionResources>,
    /// Resource requests; recorded only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<FunctionResources>,
    /// Read-only root file system; recorded only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only_root_filesystem: Option<bool>,
}

/// `limits` and `requests`: Kubernetes quantities as strings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FunctionResources {
    /// Memory, e.g. `128Mi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// CPU, e.g. `100m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    /// NVIDIA GPUs.
    #[serde(
        default,
        rename = "nvidia.com/gpu",
        skip_serializing_if = "Option::is_none"
    )]
    pub nvidia_gpu: Option<String>,
    /// AMD GPUs.
    #[serde(
        default,
        rename = "amd.com/gpu",
        skip_serializing_if = "Option::is_none"
    )]
    pub amd_gpu: Option<String>,
    /// Intel GPUs.
    #[serde(
        default,
        rename = "intel.com/gpu",
        skip_serializing_if = "Option::is_none"
    )]
    pub intel_gpu: Option<String>,
}

/// An item of `GET /system/functions` and the body of `GET /system/function/{name}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FunctionStatus {
    /// The function's name.
    pub name: String,
    /// Its image.
    #[serde(default)]
    pub image: String,
    /// Its namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// `fprocess`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_process: Option<String>,
    /// Environment variables as deployed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_vars: Option<StringMap>,
    /// Constraints as deployed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraints: Option<Vec<String>>,
    /// Secret names as deployed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<Vec<String>>,
    /// Labels as deployed, plus `faas_function`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<StringMap>,
    /// Annotations as deployed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<StringMap>,
    /// Limits as deployed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<FunctionResources>,
    /// Requests as deployed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<FunctionResources>,
    /// As deployed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only_root_filesystem: Option<bool>,
    /// Invocations through this gateway since it started.
    #[serde(default)]
    pub invocation_count: f64,
    /// Desired replicas.
    #[serde(default)]
    pub replicas: u64,
    /// Replicas that passed their readiness check.
    #[serde(default)]
    pub available_replicas: u64,
    /// When the function was first deployed (RFC 3339).
    #[serde(default = "zero_time")]
    pub created_at: String,
    /// Resource usage, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<FunctionUsage>,
}

fn zero_time() -> String {
    "0001-01-01T00:00:00Z".to_owned()
}

/// `usage` of a function status.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FunctionUsage {
    /// CPU use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<f64>,
    /// Resident memory of all replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_memory_bytes: Option<f64>,
}

/// The body of `POST /system/scale-function/{name}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScaleServiceRequest {
    /// The function.
    #[serde(default)]
    pub service_name: String,
    /// Desired replicas; 0 is allowed.
    #[serde(default)]
    pub replicas: u64,
    /// The namespace, if sent in the body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// The body of `DELETE /system/functions`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeleteFunctionRequest {
    /// The function.
    pub function_name: String,
    /// The namespace, if sent in the body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// A secret: its value is accepted, never listed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Secret {
    /// Its name.
    pub name: String,
    /// Its namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The value as text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// The value as bytes (base64 in JSON), used when `value` is empty.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "base64_bytes"
    )]
    pub raw_value: Option<Vec<u8>>,
}

mod base64_bytes {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(bytes) => s.serialize_str(&STANDARD.encode(bytes)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        let text = Option::<String>::deserialize(d)?;
        text.map(|t| STANDARD.decode(t).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// `version` of `/system/info`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// The commit message, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_message: Option<String>,
    /// The commit.
    #[serde(default)]
    pub sha: String,
    /// The release.
    #[serde(default)]
    pub release: String,
}

/// `provider` of `/system/info`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProviderInfo {
    /// The provider's name.
    #[serde(default)]
    pub provider: String,
    /// Its version; clients read `version.release` without a nil check, so it is always sent.
    #[serde(default)]
    pub version: VersionInfo,
    /// What it orchestrates with.
    #[serde(default)]
    pub orchestration: String,
}

/// The body of `GET /system/info`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GatewayInfo {
    /// The provider behind the gateway.
    pub provider: ProviderInfo,
    /// The gateway's own version.
    pub version: VersionInfo,
    /// The machine architecture.
    pub arch: String,
}

/// One line of `/system/logs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogMessage {
    /// The function.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// The replica or process that wrote the line.
    pub instance: String,
    /// When (RFC 3339 with nanoseconds).
    pub timestamp: String,
    /// The line.
    pub text: String,
}

impl FunctionDeployment {
    /// The status a newly deployed function reports, before counts and replicas are filled in.
    pub fn to_status(&self, namespace: &str, created_at: &str) -> FunctionStatus {
        let mut labels = self.labels.clone().unwrap_or_default();
        labels.insert("faas_function".to_owned(), self.service.clone());
        FunctionStatus {
            name: self.service.clone(),
            image: self.image.clone(),
            namespace: Some(namespace.to_owned()),
            env_process: self.env_process.clone(),
            env_vars: self.env_vars.clone(),
            constraints: self.constraints.clone(),
            secrets: self.secrets.clone(),
            labels: Some(labels),
            annotations: self.annotations.clone(),
            limits: self.limits.clone(),
            requests: self.requests.clone(),
            read_only_root_filesystem: self.read_only_root_filesystem,
            invocation_count: 0.0,
            replicas: 0,
            available_replicas: 0,
            created_at: created_at.to_owned(),
            usage: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nulls_are_accepted_and_absent_fields_left_out() {
        let d: FunctionDeployment = serde_json::from_str(
            r#"{"service":"f","image":"i","labels":null,"annotations":null,"limits":null,"requests":null,"envProcess":"cat"}"#,
        )
        .unwrap();
        assert_eq!(d.labels, None);
        let out = serde_json::to_value(&d).unwrap();
        assert_eq!(
            out,
            serde_json::json!({"service":"f","image":"i","envProcess":"cat"})
        );
    }

    #[test]
    fn resources_keep_gpu_keys() {
        let r: FunctionResources =
            serde_json::from_str(r#"{"memory":"128Mi","nvidia.com/gpu":"1"}"#).unwrap();
        assert_eq!(r.nvidia_gpu.as_deref(), Some("1"));
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"memory":"128Mi","nvidia.com/gpu":"1"})
        );
    }

    #[test]
    fn secret_raw_value_is_base64() {
        let s: Secret = serde_json::from_str(r#"{"name":"k","rawValue":"aGk="}"#).unwrap();
        assert_eq!(s.raw_value.as_deref(), Some(&b"hi"[..]));
    }
}
