//! The console's API, `/ui/api/*`, behind the gateway's basic auth: the connectors it
//! knows and their admin APIs, asked with the gateway's own credentials.
//!
//! A connector is known either because the gateway supervises it (its backlog reports
//! name its admin API, a loopback address: see [`crate::backlog::Reporter`]) or because
//! `[[console.connectors]]` lists it. A request names a connector by its id from the list,
//! never by an address: where the gateway sends its credentials is decided by its own
//! configuration and processes, not by a client.
//!
//! - `GET /ui/api/connectors`: every connector, `up` with its `/admin/status`, or the
//!   error reaching it;
//! - `GET /ui/api/connectors/{id}/dead-letters?...`, `POST .../dead-letters/replay` and
//!   `POST .../dead-letters/purge`: passed on to that connector's admin API as they came
//!   (query, JSON body), its answer returned as it came.
//!
//! The page itself, `/ui/` (`index.html`, `console.js`, `console.css` from `gateway/ui/`,
//! compiled into the binary: no network beyond the gateway), is plain HTML and
//! JavaScript with no build step; it polls these routes and `/system/functions`, and puts
//! every value it shows on the page as text. A `Content-Security-Policy` of `'self'`
//! keeps any script but its own from running.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use crate::AppState;

/// Longest wait for a connector's status in the list.
const STATUS_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest wait for a dead-letter operation (a replay delivers letter by letter).
const OPERATION_TIMEOUT: Duration = Duration::from_secs(300);

/// A connector the console can ask.
#[derive(Debug, Clone, serde::Serialize)]
struct Known {
    /// What requests name it by.
    id: String,
    /// Its name.
    name: String,
    /// `supervised` (found by its reports) or `configured`.
    origin: &'static str,
    /// Its admin API; `None` for a supervised connector without one (no credentials).
    #[serde(skip)]
    url: Option<String>,
}

fn known(state: &AppState) -> Vec<Known> {
    let mut out: Vec<Known> = state
        .backlogs
        .reporters()
        .into_iter()
        .map(|r| Known {
            id: r.source,
            name: r.connector,
            origin: "supervised",
            url: r.admin,
        })
        .collect();
    out.extend(state.console.iter().map(|c| Known {
        id: c.name.clone(),
        name: c.name.clone(),
        origin: "configured",
        url: Some(c.url.trim_end_matches('/').to_owned()),
    }));
    out
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        axum::Json(serde_json::json!({"error": message.into()})),
    )
        .into_response()
}

/// A request to a connector's admin API, with the gateway's credentials.
fn request(
    state: &AppState,
    method: reqwest::Method,
    url: String,
    timeout: Duration,
) -> reqwest::RequestBuilder {
    let mut req = state.console_client.request(method, url).timeout(timeout);
    if let Some(auth) = &state.auth {
        req = req.basic_auth(&auth.user, Some(auth.password.expose()));
    }
    req
}

/// `GET /ui/api/connectors`.
pub async fn connectors(State(state): State<Arc<AppState>>) -> Response {
    let asks = known(&state).into_iter().map(|k| {
        let state = state.clone();
        async move {
            let Some(url) = &k.url else {
                return serde_json::json!({
                    "connector": k, "up": false,
                    "error": "no admin API (the connector runs without basic_auth)",
                });
            };
            let asked = request(
                &state,
                reqwest::Method::GET,
                format!("{url}/admin/status"),
                STATUS_TIMEOUT,
            )
            .send()
            .await;
            let answer = match asked {
                Ok(r) if r.status().is_success() => r.json::<serde_json::Value>().await.ok(),
                Ok(r) => {
                    let status = r.status();
                    let body = r.text().await.unwrap_or_default();
                    return serde_json::json!({
                        "connector": k, "up": true,
                        "error": format!("status {status}: {body}"),
                    });
                }
                Err(e) => {
                    return serde_json::json!({"connector": k, "up": false, "error": e.to_string()});
                }
            };
            match answer {
                Some(status) => serde_json::json!({"connector": k, "up": true, "status": status}),
                None => serde_json::json!({
                    "connector": k, "up": true, "error": "an unreadable status",
                }),
            }
        }
    });
    let all = futures::future::join_all(asks).await;
    axum::Json(serde_json::json!({ "connectors": all })).into_response()
}

/// The admin API of connector `id`, or why there is none (the answer's message).
fn admin_url(state: &AppState, id: &str) -> Result<String, String> {
    let Some(k) = known(state).into_iter().find(|k| k.id == id) else {
        return Err(format!("no connector {id:?} is known"));
    };
    k.url
        .ok_or_else(|| format!("connector {id:?} has no admin API (it runs without basic_auth)"))
}

/// Passes a connector's answer on: its status, content type and body.
async fn pass_on(asked: Result<reqwest::Response, reqwest::Error>) -> Response {
    match asked {
        Ok(r) => {
            let status =
                StatusCode::from_u16(r.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let body = r.bytes().await.unwrap_or_default();
            (
                status,
                [(http::header::CONTENT_TYPE, "application/json")],
                body,
            )
                .into_response()
        }
        Err(e) => error(
            StatusCode::BAD_GATEWAY,
            format!("the connector did not answer: {e}"),
        ),
    }
}

/// `GET /ui/api/connectors/{id}/dead-letters`.
pub async fn dead_letters(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    let url = match admin_url(&state, &id) {
        Ok(u) => u,
        Err(why) => return error(StatusCode::NOT_FOUND, why),
    };
    let query = query.map(|q| format!("?{q}")).unwrap_or_default();
    let asked = request(
        &state,
        reqwest::Method::GET,
        format!("{url}/admin/dead-letters{query}"),
        STATUS_TIMEOUT * 10,
    )
    .send()
    .await;
    pass_on(asked).await
}

/// `POST /ui/api/connectors/{id}/dead-letters/{replay|purge}`.
pub async fn operate(
    State(state): State<Arc<AppState>>,
    Path((id, operation)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    if !matches!(operation.as_str(), "replay" | "purge") {
        return error(StatusCode::NOT_FOUND, "replay or purge");
    }
    let url = match admin_url(&state, &id) {
        Ok(u) => u,
        Err(why) => return error(StatusCode::NOT_FOUND, why),
    };
    let asked = request(
        &state,
        reqwest::Method::POST,
        format!("{url}/admin/dead-letters/{operation}"),
        OPERATION_TIMEOUT,
    )
    .header(http::header::CONTENT_TYPE, "application/json")
    .body(body)
    .send()
    .await;
    pass_on(asked).await
}

const INDEX: &str = include_str!("../ui/index.html");
const SCRIPT: &str = include_str!("../ui/console.js");
const STYLE: &str = include_str!("../ui/console.css");

/// Served with every page asset: only the gateway's own scripts, styles and requests.
const POLICY: &str =
    "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (http::header::CONTENT_TYPE, content_type),
            (http::header::CONTENT_SECURITY_POLICY, POLICY),
            (http::header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (http::header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// `GET /ui/`.
pub async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX)
}

/// `GET /ui/console.js`.
pub async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

/// `GET /ui/console.css`.
pub async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

/// `GET /ui`: to `/ui/`, so that the page's relative links resolve.
pub async fn to_index() -> Response {
    axum::response::Redirect::permanent("/ui/").into_response()
}
