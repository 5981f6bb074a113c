//! The `/system/*` routes, basic auth in front of them, and `/healthz`.

use std::sync::Arc;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use futures::StreamExt;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::AppState;
use crate::error::Error;
use crate::names::{FunctionRef, check_secret_name, check_service_name};
use crate::provider::LogRequest;
use crate::types::{
    DeleteFunctionRequest, FunctionDeployment, FunctionStatus, GatewayInfo, ScaleServiceRequest,
    Secret, VersionInfo,
};

/// `?namespace=`.
#[derive(Debug, Default, Deserialize)]
pub struct NamespaceQuery {
    namespace: Option<String>,
}

/// Credentials checked on `/system/*`.
#[derive(Debug, Clone)]
pub struct BasicAuth {
    /// The user.
    pub user: String,
    /// The password.
    pub password: faas_common::config::Secret,
}

impl BasicAuth {
    fn accepts(&self, headers: &HeaderMap) -> bool {
        let Some(encoded) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Basic ")
                    .or_else(|| v.strip_prefix("basic "))
            })
        else {
            return false;
        };
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
            return false;
        };
        let Some((user, password)) = std::str::from_utf8(&decoded)
            .ok()
            .and_then(|text| text.split_once(':'))
        else {
            return false;
        };
        // The user is compared directly, the password in constant time, as OpenFaaS does.
        user == self.user
            && constant_time_eq(password.as_bytes(), self.password.expose().as_bytes())
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Middleware on `/system/*`: 401 with realm `Restricted` unless the credentials match.
pub async fn require_auth(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    match &state.auth {
        Some(auth) if !auth.accepts(request.headers()) => Error::Unauthorized.into_response(),
        _ => next.run(request).await,
    }
}

fn parse_json<T: DeserializeOwned>(body: &Bytes) -> Result<T, Error> {
    serde_json::from_slice(body).map_err(|e| Error::BadRequest(format!("invalid JSON body: {e}")))
}

impl AppState {
    fn namespace(&self, requested: Option<&str>) -> Result<String, Error> {
        match requested.map(str::trim).filter(|ns| !ns.is_empty()) {
            Some(ns) => {
                // Reuse the name rules: a namespace is a name without dots.
                if ns.contains('.') {
                    return Err(Error::BadRequest(format!("invalid namespace {ns:?}")));
                }
                FunctionRef::parse("x", Some(ns), &self.namespace).map(|f| f.namespace)
            }
            None => Ok(self.namespace.clone()),
        }
    }

    fn with_counts(&self, mut status: FunctionStatus) -> FunctionStatus {
        let ns = status.namespace.as_deref().unwrap_or(&self.namespace);
        status.invocation_count = self
            .metrics
            .invocation_count(&format!("{}.{ns}", status.name));
        status
    }
}

/// `GET /system/functions`.
pub async fn list_functions(
    State(state): State<Arc<AppState>>,
    Query(q): Query<NamespaceQuery>,
) -> Result<Json<Vec<FunctionStatus>>, Error> {
    let ns = state.namespace(q.namespace.as_deref())?;
    let list = state.provider.list(&ns).await?;
    Ok(Json(
        list.into_iter().map(|s| state.with_counts(s)).collect(),
    ))
}

/// `GET /system/function/{name}`.
pub async fn function_status(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(q): Query<NamespaceQuery>,
) -> Result<Json<FunctionStatus>, Error> {
    let function = FunctionRef::parse(&name, q.namespace.as_deref(), &state.namespace)?;
    let status = state.provider.status(&function).await?;
    Ok(Json(state.with_counts(status)))
}

fn deployment_from(state: &AppState, body: &Bytes) -> Result<(FunctionDeployment, String), Error> {
    let deployment: FunctionDeployment = parse_json(body)?;
    check_service_name(&deployment.service)?;
    let ns = state.namespace(deployment.namespace.as_deref())?;
    Ok((deployment, ns))
}

/// `POST /system/functions`.
pub async fn deploy_function(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<StatusCode, Error> {
    let (deployment, ns) = deployment_from(&state, &body)?;
    state.provider.deploy(deployment, &ns).await?;
    Ok(StatusCode::ACCEPTED)
}

/// `PUT /system/functions`.
pub async fn update_function(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<StatusCode, Error> {
    let (deployment, ns) = deployment_from(&state, &body)?;
    state.provider.update(deployment, &ns).await?;
    Ok(StatusCode::OK)
}

/// `DELETE /system/functions`.
pub async fn delete_function(
    State(state): State<Arc<AppState>>,
    Query(q): Query<NamespaceQuery>,
    body: Bytes,
) -> Result<StatusCode, Error> {
    let request: DeleteFunctionRequest = parse_json(&body)?;
    let ns = request.namespace.as_deref().or(q.namespace.as_deref());
    let function = FunctionRef::parse(&request.function_name, ns, &state.namespace)?;
    state.provider.delete(&function).await?;
    Ok(StatusCode::OK)
}

/// `POST /system/scale-function/{name}`: 0 is allowed (no 1..5 clamp).
pub async fn scale_function(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(q): Query<NamespaceQuery>,
    body: Bytes,
) -> Result<StatusCode, Error> {
    let request: ScaleServiceRequest = parse_json(&body)?;
    // Body first, then the query, then the default (the gateway's own scale call sends the
    // namespace only in the query).
    let ns = request
        .namespace
        .as_deref()
        .filter(|n| !n.is_empty())
        .or(q.namespace.as_deref());
    let function = FunctionRef::parse(&name, ns, &state.namespace)?;
    state.provider.scale(&function, request.replicas).await?;
    Ok(StatusCode::ACCEPTED)
}

/// `GET /system/namespaces`: always a JSON array.
pub async fn namespaces(State(state): State<Arc<AppState>>) -> Result<Json<Vec<String>>, Error> {
    Ok(Json(state.provider.namespaces().await?))
}

/// `GET /system/info`.
pub async fn info(State(state): State<Arc<AppState>>) -> Result<Json<GatewayInfo>, Error> {
    let provider = state.provider.info().await?;
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    Ok(Json(GatewayInfo {
        provider,
        version: VersionInfo {
            commit_message: None,
            sha: option_env!("GIT_SHA").unwrap_or("unknown").to_owned(),
            release: env!("CARGO_PKG_VERSION").to_owned(),
        },
        arch: arch.to_owned(),
    }))
}

/// `GET /system/secrets`: names and namespaces only.
pub async fn list_secrets(
    State(state): State<Arc<AppState>>,
    Query(q): Query<NamespaceQuery>,
) -> Result<Json<Vec<Secret>>, Error> {
    let ns = state.namespace(q.namespace.as_deref())?;
    let secrets = state.provider.list_secrets(&ns).await?;
    Ok(Json(
        secrets
            .into_iter()
            .map(|s| Secret {
                name: s.name,
                namespace: s.namespace,
                value: None,
                raw_value: None,
            })
            .collect(),
    ))
}

fn secret_from(state: &AppState, body: &Bytes) -> Result<(Secret, String), Error> {
    let secret: Secret = parse_json(body)?;
    check_secret_name(&secret.name)?;
    let ns = state.namespace(secret.namespace.as_deref())?;
    Ok((secret, ns))
}

/// `POST /system/secrets`.
pub async fn create_secret(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<StatusCode, Error> {
    let (secret, ns) = secret_from(&state, &body)?;
    state.provider.create_secret(secret, &ns).await?;
    Ok(StatusCode::CREATED)
}

/// `PUT /system/secrets`.
pub async fn update_secret(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<StatusCode, Error> {
    let (secret, ns) = secret_from(&state, &body)?;
    state.provider.update_secret(secret, &ns).await?;
    Ok(StatusCode::OK)
}

/// `DELETE /system/secrets`: 200, not the spec's 204, which faas-cli rejects.
pub async fn delete_secret(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<StatusCode, Error> {
    let (secret, ns) = secret_from(&state, &body)?;
    state.provider.delete_secret(&secret.name, &ns).await?;
    Ok(StatusCode::OK)
}

/// `?name=&namespace=&instance=&tail=&since=&follow=`.
#[derive(Debug, Default, Deserialize)]
pub struct LogQuery {
    name: Option<String>,
    namespace: Option<String>,
    instance: Option<String>,
    tail: Option<String>,
    since: Option<String>,
    follow: Option<String>,
}

/// `GET /system/logs`: an `application/x-ndjson` stream.
pub async fn logs(
    State(state): State<Arc<AppState>>,
    Query(q): Query<LogQuery>,
    request: Request,
) -> Result<Response, Error> {
    let name = q
        .name
        .as_deref()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| Error::BadRequest("name is required".to_owned()))?;
    let function = FunctionRef::parse(name, q.namespace.as_deref(), &state.namespace)?;
    let tail = match q.tail.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
        Some(text) => {
            let n: i64 = text.parse().map_err(|_| Error::UnprocessableLogRequest)?;
            usize::try_from(n).ok().filter(|n| *n > 0)
        }
        None => None,
    };
    let since = match q.since.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
        Some(text) => {
            Some(humantime::parse_rfc3339_weak(text).map_err(|_| Error::UnprocessableLogRequest)?)
        }
        None => None,
    };
    let follow = match q.follow.as_deref().map(str::trim) {
        None | Some("" | "false" | "0") => false,
        Some("true" | "1") => true,
        Some(_) => return Err(Error::UnprocessableLogRequest),
    };
    let log_request = LogRequest {
        function: Some(function),
        instance: q.instance.filter(|i| !i.is_empty()),
        tail,
        since,
        follow,
        raw_query: request.uri().query().map(str::to_owned),
        authorization: request.headers().get(header::AUTHORIZATION).cloned(),
    };
    let stream = state.provider.logs(log_request).await?;
    let draining = state.draining.clone();
    let lines = stream
        .take_until(draining.cancelled_owned())
        .map(|message| {
            let mut line = serde_json::to_vec(&message).unwrap_or_default();
            line.push(b'\n');
            Ok::<_, std::io::Error>(Bytes::from(line))
        });
    let mut response = Response::new(Body::from_stream(lines));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    Ok(response)
}

/// `GET /healthz`.
pub async fn healthz(State(state): State<Arc<AppState>>) -> Result<&'static str, Error> {
    state.provider.health().await?;
    Ok("OK")
}

/// Unknown paths, with the Go router's text.
pub async fn not_found() -> (StatusCode, &'static str) {
    (StatusCode::NOT_FOUND, "404 page not found\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> BasicAuth {
        BasicAuth {
            user: "admin".into(),
            password: faas_common::config::Secret::new("s3cret"),
        }
    }

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn basic_auth_checks_user_and_password() {
        let ok = base64::engine::general_purpose::STANDARD.encode("admin:s3cret");
        assert!(auth().accepts(&headers(&format!("Basic {ok}"))));
        let bad = base64::engine::general_purpose::STANDARD.encode("admin:nope");
        assert!(!auth().accepts(&headers(&format!("Basic {bad}"))));
        assert!(!auth().accepts(&headers("Bearer")));
        assert!(!auth().accepts(&HeaderMap::new()));
    }
}
