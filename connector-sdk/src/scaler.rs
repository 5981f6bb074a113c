//! KEDA's external scaler, served over gRPC on `scaler_addr` (off by default), on each
//! function's backlog (see [`crate::backlog`]).
//!
//! A ScaledObject names the function in its `scalerMetadata` (`function`: `name` or
//! `name.namespace`; a bare `name` is also looked up in the ScaledObject's namespace) and
//! may set `targetBacklog`, the messages one replica should have waiting; else the
//! function's annotation `connector.scale.target`, else 10.
//!
//! - `IsActive`: whether anything waits for the function.
//! - `StreamIsActive`: the same, pushed when it flips. It is driven by the backlog's change
//!   notifications (a message admitted or completed, a broker backlog measured), not by a
//!   poll, so a function's first waiting message reaches KEDA at once.
//! - `GetMetricSpec` and `GetMetrics`: the target per replica and the backlog.
//! - `StreamMetricSpec`: Unimplemented (KEDA then polls `GetMetricSpec`).
//!
//! A function this connector does not serve is `NOT_FOUND`; a missing `function` or an
//! unusable target is `INVALID_ARGUMENT`; each message names the function or key.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::backlog::Backlogs;
use crate::error::SdkError;
use crate::function::FunctionRef;

/// The generated gRPC code of `proto/externalscaler.proto` (server and client; tests and
/// tools use the client).
#[allow(missing_docs, clippy::all, clippy::pedantic, clippy::unwrap_used)]
pub mod proto {
    tonic::include_proto!("externalscaler");
}

use proto::external_scaler_server::{ExternalScaler, ExternalScalerServer};
use proto::{
    GetMetricSpecResponse, GetMetricsRequest, GetMetricsResponse, IsActiveResponse, MetricSpec,
    MetricValue, ScaledObjectRef,
};

/// `scalerMetadata` key naming the function.
pub const FUNCTION_KEY: &str = "function";
/// `scalerMetadata` key of the backlog one replica should have waiting.
pub const TARGET_KEY: &str = "targetBacklog";
/// The function annotation of the same, used when the metadata has none.
pub const TARGET_ANNOTATION: &str = "connector.scale.target";
/// The target when neither says.
pub const DEFAULT_TARGET: f64 = 10.0;

/// The scaler service.
#[derive(Clone, Debug)]
pub struct Scaler {
    backlogs: Arc<Backlogs>,
    shutdown: CancellationToken,
}

impl Scaler {
    /// A scaler on `backlogs`; its streams end when `shutdown` is cancelled.
    pub fn new(backlogs: Arc<Backlogs>, shutdown: CancellationToken) -> Self {
        Self { backlogs, shutdown }
    }

    /// The function `r` names and its backlog now.
    fn resolve(&self, r: &ScaledObjectRef) -> Result<(FunctionRef, u64), Status> {
        let name = r
            .scaler_metadata
            .get(FUNCTION_KEY)
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "scalerMetadata has no `{FUNCTION_KEY}`: name the function to scale"
                ))
            })?;
        let now = self.backlogs.snapshot();
        let candidates = [
            FunctionRef::new(name, None),
            FunctionRef::new(name, Some(&r.namespace)),
        ];
        candidates
            .into_iter()
            .find_map(|f| now.get(&f).map(|n| (f.clone(), *n)))
            .ok_or_else(|| {
                Status::not_found(format!(
                    "function `{name}` subscribes to no topic of this connector"
                ))
            })
    }

    fn backlog_of(&self, function: &FunctionRef) -> u64 {
        self.backlogs.snapshot().get(function).copied().unwrap_or(0)
    }

    /// The backlog one replica should have: the metadata's, else the annotation's, else
    /// [`DEFAULT_TARGET`].
    fn target(&self, r: &ScaledObjectRef, function: &FunctionRef) -> Result<f64, Status> {
        let parse = |value: &str, origin: String| {
            value
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|t| t.is_finite() && *t > 0.0)
                .ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "{origin} is `{value}`: expected a number above zero"
                    ))
                })
        };
        if let Some(value) = r.scaler_metadata.get(TARGET_KEY) {
            return parse(value, format!("scalerMetadata `{TARGET_KEY}`"));
        }
        let annotation = self.backlogs.topics().and_then(|topics| {
            topics
                .current()
                .subscribers()
                .iter()
                .find(|s| s.function == *function)
                .and_then(|s| s.annotations.get(TARGET_ANNOTATION).cloned())
        });
        match annotation {
            Some(value) => parse(
                &value,
                format!("annotation `{TARGET_ANNOTATION}` of function `{function}`"),
            ),
            None => Ok(DEFAULT_TARGET),
        }
    }
}

/// The metric's name for `function`: `backlog-` and the function, in the characters a
/// Kubernetes metric name allows.
pub fn metric_name(function: &FunctionRef) -> String {
    let name: String = function
        .as_str()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    format!("backlog-{name}")
}

fn as_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

type ActiveStream = Pin<Box<dyn Stream<Item = Result<IsActiveResponse, Status>> + Send>>;
type SpecStream = Pin<Box<dyn Stream<Item = Result<GetMetricSpecResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalScaler for Scaler {
    async fn is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<IsActiveResponse>, Status> {
        let (_, backlog) = self.resolve(request.get_ref())?;
        Ok(Response::new(IsActiveResponse {
            result: backlog > 0,
        }))
    }

    type StreamIsActiveStream = ActiveStream;

    async fn stream_is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<Self::StreamIsActiveStream>, Status> {
        let (function, _) = self.resolve(request.get_ref())?;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(push_activity(self.clone(), function, tx));
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_metric_spec(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<GetMetricSpecResponse>, Status> {
        let r = request.get_ref();
        let (function, _) = self.resolve(r)?;
        let target = self.target(r, &function)?;
        Ok(Response::new(GetMetricSpecResponse {
            metric_specs: vec![MetricSpec {
                metric_name: metric_name(&function),
                // Deprecated integer field, for older KEDA: rounded up, at least 1.
                #[allow(clippy::cast_possible_truncation)]
                target_size: (target.ceil() as i64).max(1),
                target_size_float: target,
            }],
        }))
    }

    async fn get_metrics(
        &self,
        request: Request<GetMetricsRequest>,
    ) -> Result<Response<GetMetricsResponse>, Status> {
        let req = request.get_ref();
        let r = req.scaled_object_ref.clone().unwrap_or_default();
        let (function, backlog) = self.resolve(&r)?;
        let metric_name = if req.metric_name.is_empty() {
            metric_name(&function)
        } else {
            req.metric_name.clone()
        };
        #[allow(clippy::cast_precision_loss)]
        let float = backlog as f64;
        Ok(Response::new(GetMetricsResponse {
            metric_values: vec![MetricValue {
                metric_name,
                metric_value: as_i64(backlog),
                metric_value_float: float,
            }],
        }))
    }

    type StreamMetricSpecStream = SpecStream;

    async fn stream_metric_spec(
        &self,
        _request: Request<ScaledObjectRef>,
    ) -> Result<Response<Self::StreamMetricSpecStream>, Status> {
        Err(Status::unimplemented(
            "StreamMetricSpec is not served: poll GetMetricSpec",
        ))
    }
}

/// Sends `function`'s activity now and on every flip, until the client goes away or the
/// connector shuts down. Woken by the backlog's change notifications and by topic map
/// changes (a function's topics, hence its broker backlog, may change).
async fn push_activity(
    scaler: Scaler,
    function: FunctionRef,
    tx: mpsc::Sender<Result<IsActiveResponse, Status>>,
) {
    let mut changes = scaler.backlogs.subscribe();
    let mut maps = scaler.backlogs.topics().map(|t| t.subscribe());
    let mut last = None;
    loop {
        // Seen before reading, so a change while reading wakes the next wait.
        changes.mark_unchanged();
        if let Some(m) = maps.as_mut() {
            m.mark_unchanged();
        }
        let active = scaler.backlog_of(&function) > 0;
        if last != Some(active) {
            if tx
                .send(Ok(IsActiveResponse { result: active }))
                .await
                .is_err()
            {
                return;
            }
            last = Some(active);
        }
        let map_changed = async {
            match maps.as_mut() {
                Some(m) => m.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            ok = map_changed => if !ok { return },
            () = tx.closed() => return,
            () = scaler.shutdown.cancelled() => return,
        }
    }
}

/// Binds `addr` (`scaler_addr`; fails at once if it cannot) and returns the bound address
/// and the serving future, which ends when `shutdown` is cancelled.
pub async fn bind(
    addr: SocketAddr,
    scaler: Scaler,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, impl Future<Output = ()>), SdkError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| SdkError::ListenScaler { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| SdkError::ListenScaler { addr, source })?;
    let serve = async move {
        let result = tonic::transport::Server::builder()
            .add_service(ExternalScalerServer::new(scaler))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                shutdown.cancelled_owned(),
            )
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "KEDA scaler stopped");
        }
    };
    Ok((local, serve))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::function::FunctionStatus;
    use crate::topic_map::{TopicMap, TopicMapHandle};
    use std::time::Duration;

    fn scaler(annotations: &[(&str, &str)]) -> (Scaler, Arc<Backlogs>) {
        let mut a: std::collections::BTreeMap<String, String> = annotations
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        a.insert("topic".to_owned(), "orders".to_owned());
        let map = TopicMap::build(
            &[FunctionStatus {
                name: "echo".to_owned(),
                namespace: Some("openfaas-fn".to_owned()),
                annotations: a,
            }],
            ",",
        );
        let handle = TopicMapHandle::fixed(map);
        let backlogs = Arc::new(Backlogs::default());
        backlogs.set_exact_view(handle);
        (
            Scaler::new(backlogs.clone(), CancellationToken::new()),
            backlogs,
        )
    }

    fn object(function: &str, extra: &[(&str, &str)]) -> ScaledObjectRef {
        let mut scaler_metadata: std::collections::HashMap<String, String> = extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        scaler_metadata.insert(FUNCTION_KEY.to_owned(), function.to_owned());
        ScaledObjectRef {
            name: "so".to_owned(),
            namespace: "openfaas-fn".to_owned(),
            scaler_metadata,
        }
    }

    #[tokio::test]
    async fn names_resolve_in_the_objects_namespace_and_unknown_ones_are_not_found() {
        let (s, _) = scaler(&[]);
        assert!(s.resolve(&object("echo.openfaas-fn", &[])).is_ok());
        assert!(s.resolve(&object("echo", &[])).is_ok());
        let e = s
            .resolve(&object("nope", &[]))
            .err()
            .map(|e| (e.code(), e.message().to_owned()));
        assert!(
            matches!(&e, Some((tonic::Code::NotFound, m)) if m.contains("`nope`")),
            "{e:?}"
        );
        let mut no_name = object("x", &[]);
        no_name.scaler_metadata.clear();
        assert_eq!(
            s.resolve(&no_name).err().map(|e| e.code()),
            Some(tonic::Code::InvalidArgument)
        );
    }

    #[tokio::test]
    async fn the_target_comes_from_the_metadata_then_the_annotation() {
        let (s, _) = scaler(&[(TARGET_ANNOTATION, "4")]);
        let f = FunctionRef::new("echo", Some("openfaas-fn"));
        assert_eq!(s.target(&object("echo", &[]), &f).ok(), Some(4.0));
        assert_eq!(
            s.target(&object("echo", &[(TARGET_KEY, "2.5")]), &f).ok(),
            Some(2.5)
        );
        let bad = s.target(&object("echo", &[(TARGET_KEY, "0")]), &f);
        assert!(matches!(bad, Err(e) if e.message().contains(TARGET_KEY)));
        let (s, _) = scaler(&[]);
        assert_eq!(
            s.target(&object("echo", &[]), &f).ok(),
            Some(DEFAULT_TARGET)
        );
    }

    /// The stream pushes a flip as soon as the backlog changes: with time paused, no
    /// timer could have driven it.
    #[tokio::test(start_paused = true)]
    async fn the_stream_pushes_each_flip_without_waiting_for_a_timer() {
        let (s, backlogs) = scaler(&[]);
        let f = FunctionRef::new("echo", Some("openfaas-fn"));
        let (tx, mut rx) = mpsc::channel(4);
        tokio::spawn(push_activity(s, f.clone(), tx));
        let first = rx.recv().await.and_then(Result::ok).map(|r| r.result);
        assert_eq!(first, Some(false));
        let start = tokio::time::Instant::now();
        let held = backlogs.hold([f.clone()].into());
        let flipped = tokio::time::timeout(Duration::from_millis(1), rx.recv()).await;
        assert_eq!(
            flipped
                .ok()
                .flatten()
                .and_then(Result::ok)
                .map(|r| r.result),
            Some(true)
        );
        drop(held);
        let cleared = tokio::time::timeout(Duration::from_millis(1), rx.recv()).await;
        assert_eq!(
            cleared
                .ok()
                .flatten()
                .and_then(Result::ok)
                .map(|r| r.result),
            Some(false)
        );
        // A broker backlog flips it too; a change that keeps it active pushes nothing.
        backlogs.set_source(
            "orders",
            "0",
            crate::backlog::SourceBacklog {
                messages: 3,
                shared: false,
            },
        );
        let up = tokio::time::timeout(Duration::from_millis(1), rx.recv()).await;
        assert_eq!(
            up.ok().flatten().and_then(Result::ok).map(|r| r.result),
            Some(true)
        );
        backlogs.set_source(
            "orders",
            "0",
            crate::backlog::SourceBacklog {
                messages: 5,
                shared: false,
            },
        );
        let none = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        assert!(none.is_err(), "no push while it stays active");
        assert!(start.elapsed() >= Duration::from_secs(5));
    }
}
