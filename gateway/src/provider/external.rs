//! External provider mode: every call goes to a faas-provider (faas-netes, faasd-provider)
//! over HTTP, so the same gateway runs in front of a cluster. The provider's own status
//! codes and bodies are passed back as they come.

use async_trait::async_trait;
use axum::body::Body;
use futures::StreamExt;
use http::{Method, StatusCode};
use serde::de::DeserializeOwned;

use super::{
    Deadline, Invocation, LogRequest, LogStream, Provider, Upstream, UpstreamClient, forward,
};
use crate::error::Error;
use crate::names::FunctionRef;
use crate::types::{
    DeleteFunctionRequest, FunctionDeployment, FunctionStatus, LogMessage, ProviderInfo,
    ScaleServiceRequest, Secret,
};
use faas_common::config::Secret as Password;

/// A faas-provider reached over HTTP.
#[derive(Debug)]
pub struct ExternalProvider {
    base: String,
    client: reqwest::Client,
    /// `/function/*` goes through hyper's client, to the provider parsed once.
    upstream: Upstream,
    invoker: UpstreamClient,
    credentials: Option<(String, Password)>,
    upstream_timeout: std::time::Duration,
}

impl ExternalProvider {
    /// A provider at `base`; `credentials` are sent on `/system/*` calls (through
    /// `client`), invocations go through `invoker`.
    pub fn new(
        base: &str,
        client: reqwest::Client,
        invoker: UpstreamClient,
        credentials: Option<(String, Password)>,
        upstream_timeout: std::time::Duration,
    ) -> Result<Self, Error> {
        let upstream = Upstream::parse(base)
            .map_err(|e| Error::Config(format!("gateway.provider_url: {e}")))?;
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            client,
            upstream,
            invoker,
            credentials,
            upstream_timeout,
        })
    }

    fn system(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let builder = self
            .client
            .request(method, format!("{}{path}", self.base))
            .timeout(self.upstream_timeout);
        match &self.credentials {
            Some((user, password)) => builder.basic_auth(user, Some(password.expose())),
            None => builder,
        }
    }

    async fn send(&self, builder: reqwest::RequestBuilder) -> Result<reqwest::Response, Error> {
        let response = builder
            .send()
            .await
            .map_err(|e| Error::BadGateway(format!("provider: {e}")))?;
        if response.status().is_success() {
            Ok(response)
        } else {
            let status = response.status();
            let body = response.text().await.unwrap_or_default();
            Err(Error::Upstream { status, body })
        }
    }

    async fn json<T: DeserializeOwned>(
        &self,
        builder: reqwest::RequestBuilder,
    ) -> Result<T, Error> {
        let response = self.send(builder).await?;
        let bytes = response
            .bytes()
            .await
            .map_err(|e| Error::BadGateway(format!("provider: {e}")))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| Error::Internal(format!("cannot read the provider's answer: {e}")))
    }
}

#[async_trait]
impl Provider for ExternalProvider {
    async fn list(&self, namespace: &str) -> Result<Vec<FunctionStatus>, Error> {
        self.json(
            self.system(Method::GET, "/system/functions")
                .query(&[("namespace", namespace)]),
        )
        .await
    }

    async fn status(&self, function: &FunctionRef) -> Result<FunctionStatus, Error> {
        let path = format!("/system/function/{}", function.name);
        match self
            .json(
                self.system(Method::GET, &path)
                    .query(&[("namespace", function.namespace.as_str())]),
            )
            .await
        {
            Err(Error::Upstream { status, .. }) if status == StatusCode::NOT_FOUND => {
                Err(Error::SystemFunctionNotFound(function.qualified()))
            }
            other => other,
        }
    }

    async fn deploy(&self, deployment: FunctionDeployment, namespace: &str) -> Result<(), Error> {
        let mut deployment = deployment;
        deployment.namespace = Some(namespace.to_owned());
        self.send(
            self.system(Method::POST, "/system/functions")
                .json(&deployment),
        )
        .await
        .map(drop)
    }

    async fn update(&self, deployment: FunctionDeployment, namespace: &str) -> Result<(), Error> {
        let mut deployment = deployment;
        deployment.namespace = Some(namespace.to_owned());
        self.send(
            self.system(Method::PUT, "/system/functions")
                .json(&deployment),
        )
        .await
        .map(drop)
    }

    async fn delete(&self, function: &FunctionRef) -> Result<(), Error> {
        let body = DeleteFunctionRequest {
            function_name: function.name.clone(),
            namespace: Some(function.namespace.clone()),
        };
        self.send(self.system(Method::DELETE, "/system/functions").json(&body))
            .await
            .map(drop)
    }

    async fn scale(&self, function: &FunctionRef, replicas: u64) -> Result<(), Error> {
        let body = ScaleServiceRequest {
            service_name: function.name.clone(),
            replicas,
            namespace: Some(function.namespace.clone()),
        };
        let path = format!("/system/scale-function/{}", function.name);
        self.send(
            self.system(Method::POST, &path)
                .query(&[("namespace", function.namespace.as_str())])
                .json(&body),
        )
        .await
        .map(drop)
    }

    async fn namespaces(&self) -> Result<Vec<String>, Error> {
        let response = self
            .send(self.system(Method::GET, "/system/namespaces"))
            .await?;
        let bytes = response
            .bytes()
            .await
            .map_err(|e| Error::BadGateway(format!("provider: {e}")))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Vec::new());
        }
        serde_json::from_slice::<Option<Vec<String>>>(&bytes)
            .map(Option::unwrap_or_default)
            .map_err(|e| Error::Internal(format!("cannot read the provider's namespaces: {e}")))
    }

    async fn info(&self) -> Result<ProviderInfo, Error> {
        // A faas-provider answers with `ProviderInfo`; a gateway in front of one (another
        // faas-gateway, an OpenFaaS gateway) wraps it in `GatewayInfo.provider`.
        let mut value: serde_json::Value =
            self.json(self.system(Method::GET, "/system/info")).await?;
        if value
            .get("provider")
            .is_some_and(serde_json::Value::is_object)
        {
            value = value["provider"].take();
        }
        serde_json::from_value(value)
            .map_err(|e| Error::Internal(format!("cannot read the provider's info: {e}")))
    }

    async fn list_secrets(&self, namespace: &str) -> Result<Vec<Secret>, Error> {
        let secrets: Option<Vec<Secret>> = self
            .json(
                self.system(Method::GET, "/system/secrets")
                    .query(&[("namespace", namespace)]),
            )
            .await?;
        // Values never leave the gateway, whatever the provider sends.
        Ok(secrets
            .unwrap_or_default()
            .into_iter()
            .map(|s| Secret {
                value: None,
                raw_value: None,
                ..s
            })
            .collect())
    }

    async fn create_secret(&self, secret: Secret, namespace: &str) -> Result<(), Error> {
        let secret = Secret {
            namespace: Some(namespace.to_owned()),
            ..secret
        };
        self.send(self.system(Method::POST, "/system/secrets").json(&secret))
            .await
            .map(drop)
    }

    async fn update_secret(&self, secret: Secret, namespace: &str) -> Result<(), Error> {
        let secret = Secret {
            namespace: Some(namespace.to_owned()),
            ..secret
        };
        self.send(self.system(Method::PUT, "/system/secrets").json(&secret))
            .await
            .map(drop)
    }

    async fn delete_secret(&self, name: &str, namespace: &str) -> Result<(), Error> {
        let body = serde_json::json!({ "name": name, "namespace": namespace });
        self.send(self.system(Method::DELETE, "/system/secrets").json(&body))
            .await
            .map(drop)
    }

    async fn logs(&self, request: LogRequest) -> Result<LogStream, Error> {
        // OpenFaaS forwards the caller's credentials for logs, not its own.
        let mut url = format!("{}/system/logs", self.base);
        if let Some(q) = &request.raw_query {
            url.push('?');
            url.push_str(q);
        }
        let mut builder = self.client.get(url);
        if let Some(auth) = request.authorization {
            builder = builder.header(http::header::AUTHORIZATION, auth);
        }
        let response = builder
            .send()
            .await
            .map_err(|e| Error::BadGateway(format!("provider: {e}")))?;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND | StatusCode::NOT_IMPLEMENTED => {
                return Err(Error::NotImplemented(
                    "the provider does not serve logs".to_owned(),
                ));
            }
            other => {
                return Err(Error::Internal(format!(
                    "unknown log request error ({})",
                    other.as_u16()
                )));
            }
        }
        let lines = futures::stream::unfold(
            (response.bytes_stream(), Vec::<u8>::new()),
            |(mut stream, mut buffer)| async move {
                loop {
                    if let Some(at) = buffer.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = buffer.drain(..=at).collect();
                        return Some((line, (stream, buffer)));
                    }
                    match stream.next().await {
                        Some(Ok(chunk)) => buffer.extend_from_slice(&chunk),
                        _ if !buffer.is_empty() => {
                            let line = std::mem::take(&mut buffer);
                            return Some((line, (stream, buffer)));
                        }
                        _ => return None,
                    }
                }
            },
        );
        Ok(lines
            .filter_map(|line| async move { serde_json::from_slice::<LogMessage>(&line).ok() })
            .boxed())
    }

    async fn invoke(
        &self,
        function: &FunctionRef,
        invocation: Invocation,
    ) -> Result<http::Response<Body>, Error> {
        forward(
            &self.invoker,
            &self.upstream,
            Some(&function.qualified()),
            invocation,
            Deadline::new(self.upstream_timeout, None),
            (),
        )
        .await
    }

    async fn health(&self) -> Result<(), Error> {
        self.send(self.system(Method::GET, "/healthz"))
            .await
            .map(drop)
    }

    async fn shutdown(&self) {}
}
