//! connector-sdk: the delivery core every connector stands on.
//!
//! A connector consumes an event source and hands each event to the SDK as a [`Message`].
//! The SDK finds the functions subscribed to its topic, invokes each through an
//! OpenFaaS-compatible gateway with retries and dead letters, and tells the connector, per
//! message, whether to acknowledge it. The connector never has to decide what a response
//! means.
//!
//! Modules:
//! - [`cli`]: the command line every binary shares (`--config`, `replay`).
//! - [`config`]: the shared `[connector]` section [`SdkConfig`] and its OpenFaaS variable
//!   names; the figment layering (defaults, TOML, environment) it re-exports from
//!   `faas_common::config`.
//! - [`topic_map`]: the topic → functions map, built from the gateway, swapped atomically;
//!   [`FunctionRef`] and [`FunctionStatus`](topic_map::FunctionStatus) are defined in a leaf
//!   module (`function`) so the gateway client, messages and metrics need not import it.
//! - [`topic_pattern`]: MQTT and AMQP wildcard topic patterns, for sources whose
//!   subscriptions have wildcards of their own.
//! - [`gateway`]: the gateway client (`/system/*`, invocation headers, keep-alive pool).
//! - [`source_headers`]: which of a message's own headers may reach the function.
//! - [`verdict`] and [`backoff`]: what a response means; how long to wait before retrying.
//!   Both live in faas-common, shared with the gateway, and are re-exported here.
//! - [`follow`]: [`TopicChanges`](follow::TopicChanges), the topic map's changes for
//!   sources that subscribe per topic.
//! - [`filter`]: subscription filters, CEL expressions over the event (`connector.filter`).
//! - [`watermark`]: the contiguous commit point of sources acknowledged by position.
//! - [`dispatcher`]: fan-out, attempts, ordering lanes, batches, `max_inflight` backpressure.
//! - [`dead_letter`]: the sink each connector implements, with provenance.
//! - [`message`]: [`Message`] in, [`MessageOutcome`] and [`Disposition`] out.
//! - [`response`]: bounded response subscribers; the OpenFaaS print options.
//! - [`backlog`]: each function's backlog (broker backlog of its topics plus what the
//!   connector holds for it), `connector_function_backlog_messages`.
//! - [`scaler`]: KEDA's external scaler over gRPC, on that backlog (`scaler_addr`).
//! - [`metrics`] and [`server`]: `connector_` metrics, `/metrics`, `/healthz`, `/readyz`.
//! - [`runtime`]: the run harness every binary uses: tracing, signals, drain, exit.
//! - [`admin`]: the admin API on `metrics_addr` (status, dead letters listed, replayed
//!   and purged with filters), behind the connector's gateway credentials.
//! - [`trace`]: W3C trace context in and out of deliveries, their OpenTelemetry spans.
//! - [`replay`]: the `replay` subcommand: dead letters back through the normal delivery
//!   path, removed once delivered.
//! - [`watermark`]: the contiguous commit point of sources that acknowledge a position
//!   (an LSN) rather than each message.
//! - `testing` (cargo feature `testing`, off by default): a fake OpenFaaS gateway for tests,
//!   and what the load programs share. Enable it in `[dev-dependencies]` only, so no binary
//!   links it.
//!
//! See `examples/spool_connector.rs` for a complete connector built on the public API.
//!
//! Linking the SDK makes mimalloc the binary's global allocator (feature `mimalloc`, on
//! by default). A connector with its own `#[global_allocator]` depends on the SDK with
//! `default-features = false`.

pub mod admin;
pub mod backlog;
pub mod cli;
pub mod config;
pub mod dead_letter;
pub mod dispatcher;
pub mod error;
pub mod filter;
pub mod follow;
mod function;
pub mod gateway;
pub(crate) mod limiter;
pub mod message;
pub mod metrics;
pub mod policy;
pub mod replay;
pub mod response;
pub mod runtime;
pub mod scaler;
pub mod server;
pub mod source;
pub mod source_headers;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod topic_map;
pub mod topic_pattern;
pub mod trace;
pub mod watermark;

// Shared with the gateway through faas-common; re-exported so connectors keep these paths.
pub use faas_common::{backoff, verdict};

pub use config::SdkConfig;
pub use dead_letter::{DeadLetter, DeadLetterError, DeadLetterSink};
pub use dispatcher::{Completion, Dispatcher};
pub use error::SdkError;
pub use message::{DeliveryOutcome, Disposition, Message, MessageOutcome};
pub use runtime::{Runtime, SourceContext};
pub use source::{Source, SourceError, pump};
pub use topic_map::{FunctionRef, TopicMap, TopicMapHandle};

/// mimalloc is the global allocator of every binary built on the SDK (feature
/// `mimalloc`, on by default). A delivery allocates a few dozen small blocks (the message,
/// its headers, the request, the response); with glibc's allocator that was about a fifth
/// of a JetStream connector's CPU time (`perf record` during the nats benchmark).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
