//! The crate's one error type. It doubles as the API's error: [`IntoResponse`] renders the
//! status codes and plain-text bodies that OpenFaaS clients (faas-cli, go-sdk,
//! connector-sdk) expect.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// Everything that can go wrong, at startup or while serving a request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration could not be used.
    #[error("{0}")]
    Config(String),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: String,
        /// Why binding failed.
        source: std::io::Error,
    },
    /// Reading or writing the state directory failed.
    #[error("state directory {path}: {source}")]
    State {
        /// The file or folder concerned.
        path: String,
        /// What failed.
        source: std::io::Error,
    },
    /// The embedded queue's file could not be opened, read or written.
    #[error("async queue store {path}: {source}")]
    QueueStore {
        /// The file.
        path: String,
        /// What redb said (shared: one failed commit fails every insert in it).
        source: std::sync::Arc<redb::Error>,
    },
    /// Connecting to NATS or setting up the JetStream stream failed.
    #[error("NATS: {0}")]
    Nats(String),
    /// 401 with the `Restricted` realm.
    #[error("invalid credentials")]
    Unauthorized,
    /// 400 with the reason.
    #[error("{0}")]
    BadRequest(String),
    /// 404 for a function: OpenFaaS's `error finding function NAME.NS` text on invocation.
    #[error("error finding function {0}: not found")]
    FunctionNotFound(String),
    /// 404 for a function on the `/system/*` routes.
    #[error("function {0} not found")]
    SystemFunctionNotFound(String),
    /// 404 for a secret.
    #[error("secret {0} not found")]
    SecretNotFound(String),
    /// 409: the thing already exists (secrets).
    #[error("{0}")]
    Conflict(String),
    /// 413: the body is larger than the limit.
    #[error("request body too large: the limit is {limit} bytes")]
    PayloadTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// 422: `tail` or `since` of a log request could not be read.
    #[error("could not parse the log request")]
    UnprocessableLogRequest,
    /// 429 from a function's `max_inflight`, with the watchdog's body.
    #[error("Concurrent request limit exceeded. Max concurrent requests: {0}")]
    TooManyRequests(usize),
    /// 500 with a message (a function process that failed, a scale that could not happen).
    #[error("{0}")]
    Internal(String),
    /// 501.
    #[error("{0}")]
    NotImplemented(String),
    /// 503: the async queue is full.
    #[error("{0}")]
    ServiceUnavailable(String),
    /// 502 with an empty body: the function or provider could not be reached, or the
    /// gateway's `upstream_timeout` passed.
    #[error("bad gateway: {0}")]
    BadGateway(String),
    /// 504: the function's own `exec_timeout` passed, or it never became ready.
    #[error("{0}")]
    GatewayTimeout(String),
    /// A status and body passed back from an external provider as they came.
    #[error("provider answered {status}: {body}")]
    Upstream {
        /// The provider's status.
        status: StatusCode,
        /// The provider's body.
        body: String,
    },
}

/// The same type under the name the API code uses.
pub type ApiError = Error;

impl Error {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::FunctionNotFound(_)
            | Self::SystemFunctionNotFound(_)
            | Self::SecretNotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnprocessableLogRequest => StatusCode::UNPROCESSABLE_ENTITY,
            Self::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            Self::ServiceUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::BadGateway(_) => StatusCode::BAD_GATEWAY,
            Self::GatewayTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::Upstream { status, .. } => *status,
            Self::Config(_)
            | Self::Bind { .. }
            | Self::State { .. }
            | Self::QueueStore { .. }
            | Self::Nats(_)
            | Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = match &self {
            // OpenFaaS answers an unreachable upstream with an empty 502.
            Self::BadGateway(reason) => {
                tracing::debug!(reason = %reason, "bad gateway");
                String::new()
            }
            Self::Upstream { body, .. } => body.clone(),
            // Never echo internal paths of startup errors to a client.
            Self::Config(_)
            | Self::Bind { .. }
            | Self::State { .. }
            | Self::QueueStore { .. }
            | Self::Nats(_) => {
                tracing::error!(error = %self, "internal error");
                "internal error".to_owned()
            }
            other => other.to_string(),
        };
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        match &self {
            Self::Unauthorized => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"Restricted\""),
                );
            }
            Self::TooManyRequests(_) => {
                headers.insert(
                    "x-openfaas-internal",
                    HeaderValue::from_static("faas-middleware"),
                );
            }
            _ => {}
        }
        response
    }
}
