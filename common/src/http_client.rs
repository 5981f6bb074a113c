//! hyper's pooled client, as the connectors' invocations and the gateway's proxy use it:
//! keep-alive, `TCP_NODELAY`, HTTP/1.1 (and HTTP/2 over TLS), TLS with the Mozilla roots
//! for `https`. No redirect or proxy layers: those re-parse every request's URL, which
//! costs more than a loopback request.

use std::time::Duration;

use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

/// The pooled client over plain TCP or TLS, sending bodies of type `B`.
pub type PooledClient<B> = Client<hyper_rustls::HttpsConnector<HttpConnector>, B>;

/// How the pool keeps connections.
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    /// An idle connection is closed after this long.
    pub idle_timeout: Duration,
    /// Idle connections kept per host.
    pub max_idle_per_host: usize,
    /// Longest wait for a TCP connection.
    pub connect_timeout: Duration,
}

/// The TLS setup could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the TLS client configuration: {0}")]
pub struct TlsSetup(#[source] crate::tls::TlsError);

/// A pooled client with `settings`.
pub fn pooled<B>(settings: PoolSettings) -> Result<PooledClient<B>, TlsSetup>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    let mut tcp = HttpConnector::new();
    tcp.set_nodelay(true);
    tcp.enforce_http(false);
    tcp.set_connect_timeout(Some(settings.connect_timeout));
    let tls = crate::tls::client_config(None).map_err(TlsSetup)?;
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(tcp);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(settings.idle_timeout)
        .pool_max_idle_per_host(settings.max_idle_per_host)
        .pool_timer(TokioTimer::new())
        .build(connector))
}
