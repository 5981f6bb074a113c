//! The `process` runtime: one process per request, with the classic watchdog's contract.
//! The body goes to stdin, stdout is the response, request headers arrive as `Http_*`
//! variables. A non-zero exit is 500 with the output; passing `exec_timeout` kills the
//! process and answers 504 (passing the gateway's `upstream_timeout` first: 502, as for
//! every runtime).
//!
//! Replicas: each replica is a watchdog worker admitting `max_inflight` requests at once
//! (a [`super::scaling::WorkerPool`] owned by the provider, which calls [`ProcessRuntime::invoke`]
//! with a slot held); with every worker full the answer is 429.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use futures::StreamExt;
use http::{HeaderValue, Response, StatusCode, header};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use super::logs::LogBook;
use super::spec::FunctionSpec;
use crate::error::Error;
use crate::provider::{Deadline, Invocation};

/// A `process` function.
#[derive(Debug)]
pub struct ProcessRuntime {
    spec: Arc<FunctionSpec>,
    logs: Arc<LogBook>,
    /// The function's `exec_timeout` (504 when passed) or the gateway's
    /// `upstream_timeout` (502), whichever is shorter.
    deadline: Deadline,
}

impl ProcessRuntime {
    /// A runtime for `spec`; `default_timeout` applies when the function sets no
    /// `exec_timeout`.
    pub fn new(spec: Arc<FunctionSpec>, logs: Arc<LogBook>, default_timeout: Duration) -> Self {
        let deadline = Deadline::new(default_timeout, spec.exec_timeout);
        Self {
            spec,
            logs,
            deadline,
        }
    }

    /// Runs the command once for `invocation` (admission is the caller's: a worker slot).
    pub async fn invoke(&self, invocation: Invocation) -> Result<Response<Body>, Error> {
        let started = Instant::now();
        let request_type = invocation.headers.get(header::CONTENT_TYPE).cloned();
        let mut command = self.command(&invocation)?;
        let mut child = command.spawn().map_err(|e| {
            self.logs
                .write("process", &format!("Failed to start process: {e}"));
            Error::Internal(format!("Failed to start process: {e}\n"))
        })?;
        let pid = child
            .id()
            .map_or_else(|| "process".to_owned(), |p| p.to_string());
        self.logs.write(&pid, "Forking fprocess.");
        let stdin = child.stdin.take();
        let mut stdout = child.stdout.take();
        let stderr_done = child
            .stderr
            .take()
            .map(|stderr| self.logs.pipe(pid.clone(), stderr));
        let body = invocation.body;
        let feed = async move {
            let Some(mut stdin) = stdin else { return };
            let mut chunks = body.into_data_stream();
            while let Some(Ok(chunk)) = chunks.next().await {
                // A process that does not read its input closes the pipe: not an error.
                if stdin.write_all(&chunk).await.is_err() {
                    return;
                }
            }
            let _ = stdin.shutdown().await;
        };
        let collect = async move {
            let mut out = Vec::new();
            if let Some(stdout) = stdout.as_mut() {
                stdout.read_to_end(&mut out).await?;
            }
            Ok::<_, std::io::Error>(out)
        };
        let run = async {
            let ((), out) = tokio::join!(feed, collect);
            let status = child.wait().await?;
            Ok::<_, std::io::Error>((status, out?))
        };
        let (status, output) = match tokio::time::timeout(self.deadline.timeout, run).await {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => {
                self.logs
                    .write(&pid, &format!("Failed to run process: {e}"));
                return Err(Error::Internal(format!("{e}\n")));
            }
            Err(_) => {
                // `kill_on_drop` reaps it when `child` goes out of scope; kill now so the
                // answer does not wait.
                let _ = child.start_kill();
                let limit = humantime::format_duration(self.deadline.timeout);
                if self.deadline.is_exec_timeout {
                    self.logs.write(
                        &pid,
                        &format!("Killed process after exec_timeout of {limit}"),
                    );
                    return Err(Error::GatewayTimeout("Killed process.\n".to_owned()));
                }
                self.logs.write(
                    &pid,
                    &format!("Killed process after upstream_timeout of {limit}"),
                );
                return Err(Error::BadGateway(format!("process ran past {limit}")));
            }
        };
        // Let the process's last stderr lines reach the log before answering, so the log
        // is complete when the caller reads it; bounded, as a child of the process may
        // hold stderr open.
        if let Some(done) = stderr_done {
            let _ = tokio::time::timeout(Duration::from_millis(500), done).await;
        }
        let seconds = started.elapsed().as_secs_f64();
        if !status.success() {
            let code = status.code().map_or_else(
                || "signal: killed".to_owned(),
                |c| format!("exit status {c}"),
            );
            self.logs.write(&pid, &format!("Error: {code}"));
            let mut body = format!("{code}\n").into_bytes();
            body.extend_from_slice(&output);
            let mut response = Response::new(Body::from(body));
            *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            set_duration(&mut response, seconds);
            return Ok(response);
        }
        self.logs.write(
            &pid,
            &format!(
                "Wrote {} Bytes - Duration: {seconds:.6} seconds",
                output.len()
            ),
        );
        let content_type = self
            .spec
            .content_type
            .as_deref()
            .and_then(|t| HeaderValue::from_str(t).ok())
            .or(request_type)
            .unwrap_or(HeaderValue::from_static("text/plain"));
        let mut response = Response::new(Body::from(output));
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, content_type);
        set_duration(&mut response, seconds);
        Ok(response)
    }

    fn command(&self, invocation: &Invocation) -> Result<Command, Error> {
        let Some((program, args)) = self.spec.argv.split_first() else {
            return Err(Error::Internal("the function has no command\n".to_owned()));
        };
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            // Its own process group: a ctrl-c in the gateway's terminal reaches the
            // gateway only, which then stops its children in order.
            .process_group(0);
        self.spec.apply_env(&mut command);
        if let Some(dir) = &self.spec.workdir {
            command.current_dir(PathBuf::from(dir));
        }
        for (name, value) in cgi_env(invocation) {
            command.env(name, value);
        }
        Ok(command)
    }
}

fn set_duration(response: &mut Response<Body>, seconds: f64) {
    if let Ok(v) = HeaderValue::from_str(&format!("{seconds:.6}")) {
        response.headers_mut().insert("x-duration-seconds", v);
    }
}

/// The classic watchdog's CGI variables: each header as `Http_<Canonical_Name>` (first
/// value), plus method, path, query, host and content length.
pub fn cgi_env(invocation: &Invocation) -> Vec<(String, String)> {
    let mut env = Vec::new();
    for name in invocation.headers.keys() {
        let Some(value) = invocation.headers.get(name).and_then(|v| v.to_str().ok()) else {
            continue;
        };
        env.push((
            format!("Http_{}", canonical_env_name(name.as_str())),
            value.to_owned(),
        ));
    }
    env.push(("Http_Method".to_owned(), invocation.method.to_string()));
    env.push(("Http_Path".to_owned(), invocation.path.clone()));
    if let Some(q) = invocation.query.as_deref().filter(|q| !q.is_empty()) {
        env.push(("Http_Query".to_owned(), q.to_owned()));
    }
    if let Some(length) = invocation
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
    {
        env.push(("Http_ContentLength".to_owned(), length.to_owned()));
    }
    env
}

/// `x-call-id` → `X_Call_Id` (Go's canonical header case, `-` as `_`).
fn canonical_env_name(header: &str) -> String {
    header
        .split('-')
        .map(|part| {
            let mut chars = part.chars();
            match chars.next() {
                Some(first) => {
                    first.to_ascii_uppercase().to_string() + &chars.as_str().to_ascii_lowercase()
                }
                None => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join("_")
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, Method};

    #[test]
    fn headers_become_http_variables() {
        let mut headers = HeaderMap::new();
        headers.insert("x-call-id", HeaderValue::from_static("abc"));
        headers.insert("content-type", HeaderValue::from_static("text/plain"));
        headers.insert("host", HeaderValue::from_static("gw:8080"));
        let inv = Invocation {
            method: Method::PUT,
            path: "/a/b".into(),
            query: Some("x=1".into()),
            headers,
            body: Body::empty(),
        };
        let env = cgi_env(&inv);
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("Http_X_Call_Id"), Some("abc"));
        assert_eq!(get("Http_Content_Type"), Some("text/plain"));
        assert_eq!(get("Http_Host"), Some("gw:8080"));
        assert_eq!(get("Http_Method"), Some("PUT"));
        assert_eq!(get("Http_Path"), Some("/a/b"));
        assert_eq!(get("Http_Query"), Some("x=1"));
    }
}
