//! Dead-letter replay: the `replay` subcommand every broker connector offers.
//!
//! A connector reads its dead-letter destination through a [`DeadLetterStore`] (the only
//! broker-specific part: read, remove, keep). [`Replayer`] does the rest, the same for
//! every broker:
//!
//! 1. each stored letter's provenance (the `x-dead-letter-*` names of
//!    [`crate::dead_letter::names`]) is decoded back into the original [`Message`]
//!    (topic, payload, `ce-id`, source coordinates, source headers) and the function that
//!    failed ([`ReplayLetter`]);
//! 2. letters not for `--function`, or that cannot be decoded, are skipped and kept;
//! 3. each other letter is delivered through a [`Dispatcher`], the normal path (verdicts,
//!    retries with backoff, the usual headers and `ce-id`, metrics), to the function named
//!    in its provenance only (`submit_to`), one letter at a time;
//! 4. a letter is removed from the dead-letter destination only when its delivery ended
//!    [`DeliveryOutcome::Delivered`]. Any other end (rejected again, out of attempts,
//!    dropped by a `drop` status, interrupted) keeps it where it is, unchanged: the replay
//!    dispatcher has no dead-letter sink and `on_exhausted = "block"`, so a second failure
//!    never writes a second letter, and the first failure's provenance (which function,
//!    first failure time) stays true. The failure is printed in the run's output instead;
//! 5. `--dry-run` prints what would be replayed and touches nothing;
//! 6. a summary line ends the output: replayed, failed, skipped.
//!
//! A replay reads only the letters present when it started (each store bounds its read),
//! so letters kept by this run, or written meanwhile, are not read twice.
//!
//! A replayed delivery starts again at `X-Delivery-Attempt: 1` with the full
//! `max_attempts`: the earlier attempts are in the provenance, not in the new budget.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::config::{OnExhausted, SdkConfig};
use crate::dead_letter::names;
use crate::dispatcher::Dispatcher;
use crate::error::SdkError;
use crate::gateway::GatewayClient;
use crate::message::{DeliveryOutcome, Message, MessageOutcome};
use crate::metrics::Metrics;
use crate::topic_map::{FunctionRef, TopicMap, TopicMapHandle};

/// The `replay` subcommand's arguments, shared by every connector (`--config` is the
/// binary's own, global flag).
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct ReplayArgs {
    /// Replay at most this many letters (skipped letters do not count); unset: all of
    /// them.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Print what would be replayed (or purged: function, original coordinates, reason,
    /// attempts) and remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Remove the selected letters without delivering them (after a fix that makes them
    /// moot, or for letters nobody wants). With `--dry-run`: count them.
    #[arg(long)]
    pub purge: bool,
    /// Which letters: the others are kept, untouched.
    #[command(flatten)]
    pub filter: LetterFilter,
}

/// Which dead letters a replay, a purge or a listing takes: every condition that is set
/// must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct LetterFilter {
    /// Only letters whose provenance names this function (`name.namespace` as in
    /// `x-dead-letter-function`, or `name` for any namespace).
    #[arg(long, value_name = "NAME")]
    pub function: Option<String>,
    /// Only letters dead-lettered for this reason: `rejected` (a dead-letter status),
    /// `exhausted` (out of attempts), `filter_failed`.
    #[arg(long, value_name = "REASON")]
    pub reason: Option<String>,
    /// Only letters whose last response had this status: `422`, or a class, `4xx`/`5xx`.
    /// `none` selects letters without a response (transport errors, timeouts).
    #[arg(long, value_name = "STATUS", value_parser = parse_status_filter)]
    pub status: Option<StatusFilter>,
    /// Only letters that last failed at or after this time (RFC 3339, `2026-12-07T10:00:00Z`).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub since: Option<SystemTime>,
    /// Only letters that last failed before this time (RFC 3339).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub until: Option<SystemTime>,
    /// Only letters of this topic (stream, queue, subject, routing key, table).
    #[arg(long, value_name = "TOPIC")]
    pub topic: Option<String>,
    /// Only letters whose message had this key (`ce-subject`: a Kafka record key, a
    /// NATS subject, an MQTT topic, ...).
    #[arg(long, value_name = "KEY")]
    pub key: Option<String>,
}

/// A status condition of a [`LetterFilter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusFilter {
    /// Exactly this status.
    Exact(u16),
    /// Any status of this class: `4` for `4xx`.
    Class(u16),
    /// No response at all.
    None,
}

/// Parses `422`, `4xx`, `none`.
pub fn parse_status_filter(text: &str) -> Result<StatusFilter, String> {
    let t = text.trim().to_ascii_lowercase();
    if t == "none" {
        return Ok(StatusFilter::None);
    }
    if let Some(class) = t.strip_suffix("xx")
        && let Ok(c @ 1..=5) = class.parse::<u16>()
    {
        return Ok(StatusFilter::Class(c));
    }
    match t.parse::<u16>() {
        Ok(code @ 100..=599) => Ok(StatusFilter::Exact(code)),
        _ => Err(format!(
            "{text:?} is not a status: give a code (422), a class (4xx) or none"
        )),
    }
}

/// Parses an RFC 3339 time.
pub fn parse_time(text: &str) -> Result<SystemTime, String> {
    humantime::parse_rfc3339_weak(text.trim())
        .map_err(|e| format!("{text:?} is not an RFC 3339 time: {e}"))
}

impl LetterFilter {
    /// Whether `letter` is selected.
    pub fn matches(&self, letter: &ReplayLetter) -> bool {
        let p = &letter.provenance;
        let same = |want: &Option<String>, got: Option<&str>| {
            want.as_deref().is_none_or(|w| got == Some(w))
        };
        let status = match self.status {
            None => true,
            Some(StatusFilter::None) => p.status.is_none(),
            Some(StatusFilter::Exact(code)) => p.status == Some(code),
            Some(StatusFilter::Class(class)) => p.status.is_some_and(|s| s / 100 == class),
        };
        let failed = p.last_failure.or(p.first_failure);
        // `name` also selects `name.namespace`: the gateway qualifies names it is given.
        let function = self.function.as_deref().is_none_or(|wanted| {
            let f = letter.function.as_str();
            f == wanted
                || (!wanted.contains('.') && f.split_once('.').is_some_and(|(n, _)| n == wanted))
        });
        function
            && same(&self.reason, p.reason.as_deref())
            && status
            && self.since.is_none_or(|t| failed.is_some_and(|f| f >= t))
            && self.until.is_none_or(|t| failed.is_some_and(|f| f < t))
            && same(&self.topic, Some(p.topic.as_str()))
            && same(&self.key, letter.message.subject.as_deref())
    }
}

/// A dead letter read back: the original message, the function it failed for, and why.
#[derive(Debug, Clone)]
pub struct ReplayLetter {
    /// The message as the function first received it (headers included).
    pub message: Message,
    /// The function named in the provenance.
    pub function: FunctionRef,
    /// The provenance, decoded.
    pub provenance: Provenance,
}

impl ReplayLetter {
    /// `message`, restored from a letter with `provenance`, for the function it names.
    pub fn new(message: Message, provenance: Provenance) -> Self {
        Self {
            function: provenance.function_ref(),
            message,
            provenance,
        }
    }
}

/// A name and a value as a store keeps them: `(name, value)` pairs, owned or borrowed.
pub trait NameValue {
    /// The name.
    fn name(&self) -> &str;
    /// The value.
    fn value(&self) -> &str;
}

impl<K: AsRef<str>, V: AsRef<str>> NameValue for (K, V) {
    fn name(&self) -> &str {
        self.0.as_ref()
    }
    fn value(&self) -> &str {
        self.1.as_ref()
    }
}

impl<K: AsRef<str>, V: AsRef<str>> NameValue for &(K, V) {
    fn name(&self) -> &str {
        self.0.as_ref()
    }
    fn value(&self) -> &str {
        self.1.as_ref()
    }
}

/// The provenance of a stored dead letter, decoded from its `x-dead-letter-*` pairs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provenance {
    /// `x-dead-letter-function`.
    pub function: String,
    /// `x-dead-letter-topic`.
    pub topic: String,
    /// `x-dead-letter-id` (`ce-id`).
    pub id: String,
    /// `x-dead-letter-reason`: `rejected` or `exhausted` (kept as text).
    pub reason: Option<String>,
    /// `x-dead-letter-status`.
    pub status: Option<u16>,
    /// `x-dead-letter-error`.
    pub error: Option<String>,
    /// `x-dead-letter-response`.
    pub response: Option<String>,
    /// `x-dead-letter-attempts`.
    pub attempts: Option<u32>,
    /// `x-dead-letter-first-failure`.
    pub first_failure: Option<SystemTime>,
    /// `x-dead-letter-last-failure`.
    pub last_failure: Option<SystemTime>,
    /// `x-dead-letter-time`: the original message's `ce-time`.
    pub time: Option<SystemTime>,
    /// `x-dead-letter-traceparent`: the W3C `traceparent` of the failed delivery's trace.
    pub traceparent: Option<String>,
    /// `x-dead-letter-source-*`, in the order written: the original coordinates.
    pub coordinates: Vec<(String, String)>,
}

/// Why a stored letter cannot be replayed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// A provenance entry every dead letter carries is missing.
    #[error("no `{0}` in the letter's provenance")]
    Missing(&'static str),
    /// The letter is not in the shape this connector writes.
    #[error("{0}")]
    Malformed(String),
}

impl Provenance {
    /// Whether `name` is a provenance name (`x-dead-letter-*`, any case).
    pub fn is_provenance(name: &str) -> bool {
        name.len() >= PREFIX.len() && name[..PREFIX.len()].eq_ignore_ascii_case(PREFIX)
    }

    /// Decodes the `x-dead-letter-*` pairs among `pairs` (names in any case; other names
    /// are ignored). `function`, `topic` and `id` are required; the rest is informative.
    pub fn parse<P: NameValue>(pairs: impl IntoIterator<Item = P>) -> Result<Self, DecodeError> {
        let mut known: BTreeMap<String, String> = BTreeMap::new();
        let mut coordinates = Vec::new();
        for pair in pairs {
            let (name, value) = (pair.name(), pair.value());
            if !Self::is_provenance(name) {
                continue;
            }
            let name = name.to_ascii_lowercase();
            if let Some(coordinate) = name.strip_prefix(names::SOURCE_PREFIX) {
                coordinates.push((coordinate.to_owned(), value.to_owned()));
            } else {
                known.insert(name, value.to_owned());
            }
        }
        let mut take = |name: &'static str| known.remove(name);
        let required = |value: Option<String>, name: &'static str| {
            value
                .filter(|v| !v.is_empty())
                .ok_or(DecodeError::Missing(name))
        };
        let time = |value: Option<String>| {
            value.and_then(|v| humantime::parse_rfc3339_weak(v.trim()).ok())
        };
        Ok(Self {
            function: required(take(names::FUNCTION), names::FUNCTION)?,
            topic: required(take(names::TOPIC), names::TOPIC)?,
            id: required(take(names::ID), names::ID)?,
            reason: take(names::REASON),
            status: take(names::STATUS).and_then(|s| s.trim().parse().ok()),
            error: take(names::ERROR),
            response: take(names::RESPONSE),
            attempts: take(names::ATTEMPTS).and_then(|s| s.trim().parse().ok()),
            first_failure: time(take(names::FIRST_FAILURE)),
            last_failure: time(take(names::LAST_FAILURE)),
            time: time(take(names::TIME)),
            traceparent: take(names::TRACEPARENT).filter(|t| !t.trim().is_empty()),
            coordinates,
        })
    }

    /// The function to invoke.
    pub fn function_ref(&self) -> FunctionRef {
        // `name.namespace` is kept whole: it is exactly what the gateway was called with.
        FunctionRef::new(&self.function, None)
    }

    /// The original coordinate `name` (`partition`, `offset`, `stream`, ...).
    pub fn coordinate(&self, name: &str) -> Option<&str> {
        self.coordinates
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The original message's skeleton: topic, `payload`, `ce-id`, `source` (`ce-source`,
    /// which the connector knows), coordinates, `ce-time` (when the letter kept it) and
    /// the trace context (so the replayed delivery joins the failed one's trace). The
    /// connector adds the source headers, content type and anything else it can restore.
    pub fn message(&self, payload: impl Into<Bytes>, source: impl Into<String>) -> Message {
        let mut message = Message::new(self.topic.clone(), payload, self.id.clone(), source);
        message.coordinates = self.coordinates.clone();
        message.time = self.time;
        if let Some(traceparent) = &self.traceparent {
            message.set_trace_context(traceparent.trim().as_bytes(), None);
        }
        message
    }

    /// A one-line description for the replay's output.
    fn describe(&self) -> String {
        let mut out = format!(
            "function={} topic={} id={}",
            self.function, self.topic, self.id
        );
        if let Some(r) = &self.reason {
            out.push_str(&format!(" reason={r}"));
        }
        if let Some(s) = self.status {
            out.push_str(&format!(" status={s}"));
        }
        if let Some(a) = self.attempts {
            out.push_str(&format!(" attempts={a}"));
        }
        if let Some(t) = self.last_failure {
            out.push_str(&format!(
                " last-failure={}",
                humantime::format_rfc3339_millis(t)
            ));
        }
        for (k, v) in &self.coordinates {
            out.push_str(&format!(" {k}={v}"));
        }
        out
    }
}

const PREFIX: &str = "x-dead-letter-";

/// One letter as a store read it.
#[derive(Debug)]
pub struct StoredLetter<H> {
    /// Where it sits in the dead-letter destination (`orders:dead-letter 1700000000000-0`,
    /// `dead-letters/0@17`), for the output.
    pub location: String,
    /// The decoded letter, or why it cannot be replayed (it is then skipped and kept).
    pub letter: Result<ReplayLetter, DecodeError>,
    /// What [`DeadLetterStore::remove`] or [`DeadLetterStore::keep`] needs.
    pub handle: H,
}

/// An error of a dead-letter destination.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

impl StoreError {
    /// An error from anything printable.
    pub fn new(e: impl std::fmt::Display) -> Self {
        Self(e.to_string())
    }
}

/// A connector's dead-letter destination, as replay reads it.
#[async_trait::async_trait]
pub trait DeadLetterStore: Send {
    /// What removing or keeping one letter needs: an entry id, an offset, a receipt
    /// handle, a JetStream message.
    type Handle: Send;

    /// The next letters, oldest first. An empty batch means every letter that was there
    /// when the replay started has been read.
    async fn next_batch(&mut self) -> Result<Vec<StoredLetter<Self::Handle>>, StoreError>;

    /// Removes a letter that was delivered (XDEL, commit past it, DeleteMessage, ack).
    async fn remove(&mut self, handle: Self::Handle) -> Result<(), StoreError>;

    /// Leaves a letter that was not delivered, or was skipped, in the destination, if the
    /// broker needs anything for that (Kafka writes it again at the end of the topic before
    /// moving past it). Not called on a dry run.
    async fn keep(&mut self, handle: Self::Handle) -> Result<(), StoreError> {
        let _ = handle;
        Ok(())
    }

    /// Called once at the end, dry run included: return what is still held, close.
    async fn finish(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Why a replay stopped early.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The SDK could not be set up (gateway client, configuration).
    #[error(transparent)]
    Sdk(#[from] SdkError),
    /// Reading the dead-letter destination failed.
    #[error("reading the dead letters failed: {0}")]
    Read(#[source] StoreError),
    /// Removing a delivered letter failed: it stays and would be replayed again.
    #[error("removing letter {location} failed (it stays among the dead letters): {source}")]
    Remove {
        /// The letter.
        location: String,
        /// Why.
        #[source]
        source: StoreError,
    },
    /// Keeping a letter failed.
    #[error("keeping letter {location} failed: {source}")]
    Keep {
        /// The letter.
        location: String,
        /// Why.
        #[source]
        source: StoreError,
    },
    /// Finishing (committing, releasing) failed.
    #[error("finishing the replay failed: {0}")]
    Finish(#[source] StoreError),
    /// The output could not be written.
    #[error("writing the replay's output failed: {0}")]
    Output(#[from] std::io::Error),
    /// Some letters failed again (they were kept): see [`Summary::check`].
    #[error("{failed} dead letter(s) failed again and were kept")]
    Failed {
        /// How many.
        failed: usize,
    },
}

/// What a replay (or a purge) did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    /// Delivered and removed (on a dry run: would be replayed).
    pub replayed: usize,
    /// Delivered but failed again: kept.
    pub failed: usize,
    /// Removed without delivery by a purge (on a dry run: would be purged).
    pub purged: usize,
    /// Not selected by the filter, or undecodable: kept.
    pub skipped: usize,
    /// Whether this was a dry run.
    pub dry_run: bool,
    /// Whether this was a purge.
    pub purge: bool,
}

impl Summary {
    /// An error when a letter failed again, so that the binary exits non-zero and a
    /// script running the replay notices.
    pub fn check(self) -> Result<Self, ReplayError> {
        if self.failed > 0 {
            Err(ReplayError::Failed {
                failed: self.failed,
            })
        } else {
            Ok(self)
        }
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.purge {
            if self.dry_run {
                write!(
                    f,
                    "dry run: {} would be purged, {} skipped; nothing was removed",
                    self.purged, self.skipped
                )
            } else {
                write!(f, "purge: {} purged, {} skipped", self.purged, self.skipped)
            }
        } else if self.dry_run {
            write!(
                f,
                "dry run: {} would be replayed, {} skipped; nothing was removed",
                self.replayed, self.skipped
            )
        } else {
            write!(
                f,
                "replay: {} replayed, {} failed, {} skipped",
                self.replayed, self.failed, self.skipped
            )
        }
    }
}

/// Runs a replay: decodes, filters, delivers through the normal path, removes what was
/// delivered. See the module docs.
pub struct Replayer {
    dispatcher: Dispatcher,
    args: ReplayArgs,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Replayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replayer")
            .field("args", &self.args)
            .finish()
    }
}

impl Replayer {
    /// A replayer for connector `name` (sent as `X-Connector`) invoking through the
    /// gateway of `config`, with its retry policy and status classes. Nothing connects.
    pub fn new(name: &str, config: &SdkConfig, args: ReplayArgs) -> Result<Self, SdkError> {
        config.validate()?;
        let mut config = config.clone();
        // A delivery that fails again is held (its letter kept), never dropped.
        config.on_exhausted = OnExhausted::Block;
        let (metrics, _registry) = Metrics::standalone(name);
        let gateway = GatewayClient::new(name, &config)?.with_metrics(metrics.clone());
        // `submit_to` names the function; the topic map is never consulted.
        let dispatcher =
            Dispatcher::builder(gateway, TopicMapHandle::new(), &config, metrics).build();
        Ok(Self {
            dispatcher,
            args,
            shutdown: CancellationToken::new(),
        })
    }

    /// Cancelling this token stops the replay after the current letter (a running
    /// delivery is cut short and its letter kept).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Cancels the shutdown token on SIGTERM or SIGINT (for the binaries).
    pub fn stop_on_signals(&self) -> Result<(), SdkError> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).map_err(SdkError::Signals)?;
        let mut int = signal(SignalKind::interrupt()).map_err(SdkError::Signals)?;
        let token = self.shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::info!("replay interrupted: stopping after the current letter");
            token.cancel();
        });
        Ok(())
    }

    /// Replays `store`'s letters, writing one line per letter and the summary to `out`.
    pub async fn run<S: DeadLetterStore>(
        &self,
        mut store: S,
        out: &mut (dyn Write + Send),
    ) -> Result<Summary, ReplayError> {
        let result = self.replay(&mut store, out).await;
        let finished = store.finish().await.map_err(ReplayError::Finish);
        let summary = result?;
        finished?;
        writeln!(out, "{summary}")?;
        out.flush()?;
        Ok(summary)
    }

    async fn replay<S: DeadLetterStore>(
        &self,
        store: &mut S,
        out: &mut (dyn Write + Send),
    ) -> Result<Summary, ReplayError> {
        let dry_run = self.args.dry_run;
        let purge = self.args.purge;
        let limit = self.args.limit.unwrap_or(usize::MAX);
        let mut summary = Summary {
            dry_run,
            purge,
            ..Summary::default()
        };
        let mut attempted = 0usize;
        'read: while attempted < limit && !self.shutdown.is_cancelled() {
            let batch = tokio::select! {
                biased;
                () = self.shutdown.cancelled() => break 'read,
                b = store.next_batch() => b.map_err(ReplayError::Read)?,
            };
            if batch.is_empty() {
                break;
            }
            let mut batch = batch.into_iter();
            while let Some(stored) = batch.next() {
                let StoredLetter {
                    location,
                    letter,
                    handle,
                } = stored;
                if attempted >= limit || self.shutdown.is_cancelled() {
                    // Read but not to be replayed in this run: keep it, and the rest.
                    if !dry_run {
                        self.keep(store, handle, &location).await?;
                        for rest in batch.by_ref() {
                            self.keep(store, rest.handle, &rest.location).await?;
                        }
                    }
                    break 'read;
                }
                let letter = match letter {
                    Ok(letter) => letter,
                    Err(e) => {
                        writeln!(out, "skipped {location}: {e}")?;
                        tracing::warn!(%location, error = %e, "dead letter cannot be replayed; kept");
                        summary.skipped += 1;
                        if !dry_run {
                            self.keep(store, handle, &location).await?;
                        }
                        continue;
                    }
                };
                if !self.args.filter.matches(&letter) {
                    summary.skipped += 1;
                    if !dry_run {
                        self.keep(store, handle, &location).await?;
                    }
                    continue;
                }
                attempted += 1;
                let described = letter.provenance.describe();
                if purge {
                    if dry_run {
                        writeln!(out, "would purge {location} {described}")?;
                    } else {
                        store
                            .remove(handle)
                            .await
                            .map_err(|source| ReplayError::Remove {
                                location: location.clone(),
                                source,
                            })?;
                        writeln!(out, "purged {location} {described}")?;
                    }
                    summary.purged += 1;
                    continue;
                }
                if dry_run {
                    writeln!(out, "would replay {location} {described}")?;
                    summary.replayed += 1;
                    continue;
                }
                let outcome = self.deliver(letter).await;
                let delivered = !outcome.interrupted
                    && !outcome.deliveries.is_empty()
                    && outcome.deliveries.iter().all(|d| {
                        // Filtered: the function's filter, fixed since, does not want it.
                        matches!(
                            d.outcome,
                            DeliveryOutcome::Delivered | DeliveryOutcome::Filtered
                        )
                    });
                if delivered {
                    store
                        .remove(handle)
                        .await
                        .map_err(|source| ReplayError::Remove {
                            location: location.clone(),
                            source,
                        })?;
                    writeln!(out, "replayed {location} {described}")?;
                    summary.replayed += 1;
                } else {
                    let why = failure(&outcome);
                    writeln!(out, "failed {location} {described} ({why}); kept")?;
                    tracing::warn!(%location, why, "replay failed; the letter is kept");
                    summary.failed += 1;
                    self.keep(store, handle, &location).await?;
                }
            }
        }
        Ok(summary)
    }

    async fn keep<S: DeadLetterStore>(
        &self,
        store: &mut S,
        handle: S::Handle,
        location: &str,
    ) -> Result<(), ReplayError> {
        store
            .keep(handle)
            .await
            .map_err(|source| ReplayError::Keep {
                location: location.to_owned(),
                source,
            })
    }

    async fn deliver(&self, letter: ReplayLetter) -> MessageOutcome {
        let interrupted = MessageOutcome {
            held_unmatched: false,
            id: letter.message.id.clone(),
            deliveries: Vec::new(),
            interrupted: true,
        };
        let functions: Arc<[FunctionRef]> = Arc::new([letter.function]);
        let completion = match self.dispatcher.submit_to(letter.message, functions).await {
            Ok(c) => c,
            Err(_) => return interrupted,
        };
        let completion = std::pin::pin!(completion);
        let mut completion = completion;
        tokio::select! {
            outcome = &mut completion => outcome,
            () = self.shutdown.cancelled() => {
                // No new attempt starts; a running one may finish and still count.
                self.dispatcher.drain();
                completion.await
            }
        }
    }
}

/// How much of a payload a listing shows.
pub const PREVIEW_BYTES: usize = 512;

/// One dead letter as an operator sees it in a listing.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LetterView {
    /// Where it sits in the dead-letter destination.
    pub location: String,
    /// The function it failed for.
    pub function: String,
    /// The original topic.
    pub topic: String,
    /// The original `ce-id`.
    pub id: String,
    /// `rejected`, `exhausted`, `filter_failed`.
    pub reason: Option<String>,
    /// The last response's status.
    pub status: Option<u16>,
    /// The last transport error.
    pub error: Option<String>,
    /// An excerpt of the last response's body.
    pub response: Option<String>,
    /// Attempts made.
    pub attempts: Option<u32>,
    /// First and last failure, RFC 3339.
    pub first_failure: Option<String>,
    pub last_failure: Option<String>,
    /// The message's key (`ce-subject`), when it had one.
    pub key: Option<String>,
    /// The original coordinates (`partition`, `offset`, `stream`, ...).
    pub coordinates: BTreeMap<String, String>,
    /// The payload's content type, when known.
    pub content_type: Option<String>,
    /// The payload's size.
    pub payload_bytes: usize,
    /// Its first [`PREVIEW_BYTES`], as text (invalid UTF-8 replaced). Untrusted: a
    /// page shows it as text, never as markup.
    pub preview: String,
    /// Whether the preview is cut.
    pub truncated: bool,
}

impl LetterView {
    fn of(location: String, letter: &ReplayLetter) -> Self {
        let p = &letter.provenance;
        let time =
            |t: Option<SystemTime>| t.map(|t| humantime::format_rfc3339_millis(t).to_string());
        let payload = &letter.message.payload;
        let cut = payload.len().min(PREVIEW_BYTES);
        Self {
            location,
            function: p.function.clone(),
            topic: p.topic.clone(),
            id: p.id.clone(),
            reason: p.reason.clone(),
            status: p.status,
            error: p.error.clone(),
            response: p.response.clone(),
            attempts: p.attempts,
            first_failure: time(p.first_failure),
            last_failure: time(p.last_failure),
            key: letter.message.subject.clone(),
            coordinates: p.coordinates.iter().cloned().collect(),
            content_type: letter
                .message
                .content_type
                .as_ref()
                .and_then(|c| c.to_str().ok())
                .map(str::to_owned),
            payload_bytes: payload.len(),
            preview: String::from_utf8_lossy(&payload[..cut]).into_owned(),
            truncated: cut < payload.len(),
        }
    }
}

/// A page of a listing.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct LetterPage {
    /// The selected letters from `offset`, at most `limit` of them, oldest first.
    pub letters: Vec<LetterView>,
    /// How many letters the filter selects in all.
    pub matched: usize,
    /// Letters that cannot be decoded (never selected).
    pub undecodable: usize,
    /// The offset of the next page, when there is one.
    pub next: Option<usize>,
}

/// Lists `store`'s letters that `filter` selects, skipping the first `offset` of them and
/// showing at most `limit`; reads every letter (to count them) and removes or rewrites
/// none, as a dry run does.
pub async fn list<S: DeadLetterStore>(
    mut store: S,
    filter: &LetterFilter,
    offset: usize,
    limit: usize,
) -> Result<LetterPage, ReplayError> {
    let mut page = LetterPage::default();
    let read = async {
        loop {
            let batch = store.next_batch().await.map_err(ReplayError::Read)?;
            if batch.is_empty() {
                return Ok::<_, ReplayError>(());
            }
            for stored in batch {
                let Ok(letter) = &stored.letter else {
                    page.undecodable += 1;
                    continue;
                };
                if !filter.matches(letter) {
                    continue;
                }
                if page.matched >= offset && page.letters.len() < limit {
                    page.letters.push(LetterView::of(stored.location, letter));
                }
                page.matched += 1;
            }
        }
    };
    let result = read.await;
    let finished = store.finish().await.map_err(ReplayError::Finish);
    result?;
    finished?;
    let shown = offset.saturating_add(page.letters.len());
    page.next = (shown < page.matched && !page.letters.is_empty()).then_some(shown);
    Ok(page)
}

/// Why a replayed delivery did not count as delivered, for the output.
fn failure(outcome: &MessageOutcome) -> String {
    if outcome.interrupted {
        return "interrupted".to_owned();
    }
    outcome
        .deliveries
        .iter()
        .map(|d| {
            let status = d
                .response
                .as_ref()
                .map(|r| format!(" status={}", r.status.as_u16()))
                .unwrap_or_default();
            let error = d
                .error
                .as_ref()
                .map(|e| format!(" error={e}"))
                .unwrap_or_default();
            format!(
                "{} after {} attempt(s){status}{error}",
                d.outcome.as_str(),
                d.attempts
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The topics of the functions the gateway lists right now: where a connector configured
/// without `topics` looks for dead letters.
pub async fn gateway_topics(name: &str, config: &SdkConfig) -> Result<Vec<String>, SdkError> {
    let gateway = GatewayClient::new(name, config)?;
    let functions = gateway.list_all_functions().await?;
    let map = TopicMap::build(&functions, &config.topic_delimiter);
    Ok(map.topics().map(str::to_owned).collect())
}

/// The topics whose dead letters a replay reads: the configured `topics`, else those of
/// the gateway's functions.
pub async fn topics(name: &str, config: &SdkConfig) -> Result<Vec<String>, SdkError> {
    if config.topics.is_empty() {
        gateway_topics(name, config).await
    } else {
        Ok(config.topics.clone())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use super::*;
    use crate::dead_letter::{DeadLetter, DeadLetterReason};
    use crate::testing::{FakeGateway, Reply};

    fn letter(id: &str, function: &str) -> DeadLetter {
        let mut message = Message::new("orders", format!("body-{id}"), id, "test://orders")
            .with_coordinate("partition", 1)
            .with_coordinate("offset", 9);
        message.add_header("X-Test", "kept");
        DeadLetter {
            message: Arc::new(message),
            function: FunctionRef::new(function, None),
            reason: DeadLetterReason::Rejected,
            status: Some(400),
            error: None,
            response_excerpt: Bytes::from_static(b"bad"),
            attempts: 1,
            first_failure: SystemTime::UNIX_EPOCH,
            last_failure: SystemTime::UNIX_EPOCH,
        }
    }

    /// Decodes what dead_letter.rs writes: headers on top of the provenance.
    fn decode(letter: &DeadLetter) -> Result<ReplayLetter, DecodeError> {
        let pairs = letter.provenance();
        let provenance = Provenance::parse(&pairs)?;
        let mut message = provenance.message(letter.message.payload.clone(), "test://orders");
        message.headers = letter.message.headers.clone();
        Ok(ReplayLetter::new(message, provenance))
    }

    #[test]
    fn provenance_round_trips() {
        let mut l = letter("orders/1/9", "f");
        l.function = FunctionRef::new("f", Some("ns"));
        l.error = Some("timeout".into());
        let when = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123);
        l.message = Arc::new((*l.message).clone().with_time(when));
        let pairs: Vec<(String, String)> = l
            .provenance()
            .into_iter()
            .map(|(k, v)| (k.to_ascii_uppercase(), v))
            .chain([("X-Kafka-Key".to_owned(), "k".to_owned())])
            .collect();
        let p = Provenance::parse(&pairs).unwrap();
        assert_eq!(p.function, "f.ns");
        assert_eq!(p.function_ref(), FunctionRef::new("f", Some("ns")));
        assert_eq!(p.topic, "orders");
        assert_eq!(p.id, "orders/1/9");
        assert_eq!(p.reason.as_deref(), Some("rejected"));
        assert_eq!(p.status, Some(400));
        assert_eq!(p.error.as_deref(), Some("timeout"));
        assert_eq!(p.response.as_deref(), Some("bad"));
        assert_eq!(p.attempts, Some(1));
        assert_eq!(p.first_failure, Some(SystemTime::UNIX_EPOCH));
        assert_eq!(p.time, Some(when));
        assert_eq!(p.message("x", "s").time, Some(when));
        assert_eq!(p.coordinate("partition"), Some("1"));
        assert_eq!(p.coordinate("offset"), Some("9"));
        let m = p.message("x", "src");
        assert_eq!((m.topic.as_str(), m.id.as_str()), ("orders", "orders/1/9"));
        assert_eq!(m.coordinates, p.coordinates);
    }

    #[test]
    fn missing_provenance_is_named() {
        let e = Provenance::parse([("x-dead-letter-function", "f")]).unwrap_err();
        assert_eq!(e, DecodeError::Missing(names::TOPIC));
        assert!(Provenance::is_provenance("X-Dead-Letter-Id"));
        assert!(!Provenance::is_provenance("x-dead"));
    }

    /// An in-memory destination recording what replay did.
    #[derive(Clone, Default)]
    struct Memory {
        letters: Arc<Mutex<VecDeque<StoredLetter<String>>>>,
        removed: Arc<Mutex<Vec<String>>>,
        kept: Arc<Mutex<Vec<String>>>,
        finished: Arc<Mutex<bool>>,
    }

    impl Memory {
        fn with(letters: Vec<Result<ReplayLetter, DecodeError>>) -> Self {
            let m = Self::default();
            for (i, letter) in letters.into_iter().enumerate() {
                m.letters.lock().unwrap().push_back(StoredLetter {
                    location: format!("dlq@{i}"),
                    letter,
                    handle: format!("dlq@{i}"),
                });
            }
            m
        }
    }

    #[async_trait::async_trait]
    impl DeadLetterStore for Memory {
        type Handle = String;
        async fn next_batch(&mut self) -> Result<Vec<StoredLetter<String>>, StoreError> {
            // Two at a time, to cross batch boundaries.
            let mut letters = self.letters.lock().unwrap();
            let n = letters.len().min(2);
            Ok(letters.drain(..n).collect())
        }
        async fn remove(&mut self, handle: String) -> Result<(), StoreError> {
            self.removed.lock().unwrap().push(handle);
            Ok(())
        }
        async fn keep(&mut self, handle: String) -> Result<(), StoreError> {
            self.kept.lock().unwrap().push(handle);
            Ok(())
        }
        async fn finish(&mut self) -> Result<(), StoreError> {
            *self.finished.lock().unwrap() = true;
            Ok(())
        }
    }

    async fn replay(gw: &FakeGateway, args: ReplayArgs, store: Memory) -> (Summary, String) {
        let mut config = gw.config();
        config.max_attempts = 2;
        let replayer = Replayer::new("test-connector", &config, args).unwrap();
        let mut out = Vec::new();
        let summary = replayer.run(store, &mut out).await.unwrap();
        (summary, String::from_utf8(out).unwrap())
    }

    #[tokio::test]
    async fn delivered_letters_are_removed_and_failures_kept() {
        let gw = FakeGateway::start().await.unwrap();
        gw.function("good", "unrelated", |_, _| Reply::ok());
        gw.function("bad", "unrelated", |_, _| Reply::status(400));
        let store = Memory::with(vec![
            decode(&letter("a", "good")),
            decode(&letter("b", "bad")),
            Err(DecodeError::Missing(names::FUNCTION)),
            decode(&letter("c", "good")),
        ]);
        let (summary, out) = replay(&gw, ReplayArgs::default(), store.clone()).await;
        assert_eq!(
            (summary.replayed, summary.failed, summary.skipped),
            (2, 1, 1),
            "{out}"
        );
        assert_eq!(*store.removed.lock().unwrap(), ["dlq@0", "dlq@3"]);
        assert_eq!(*store.kept.lock().unwrap(), ["dlq@1", "dlq@2"]);
        assert!(*store.finished.lock().unwrap());
        assert!(out.contains("failed dlq@1 function=bad"), "{out}");
        assert!(
            out.contains("dead_lettered") || out.contains("held"),
            "{out}"
        );
        assert!(
            out.ends_with("replay: 2 replayed, 1 failed, 1 skipped\n"),
            "{out}"
        );
        // The normal path: original payload, headers and ce-id, attempt 1, one call each.
        let good = gw.requests_to("good");
        assert_eq!(good.len(), 2);
        assert_eq!(&good[0].body[..], b"body-a");
        assert_eq!(good[0].header("x-test").as_deref(), Some("kept"));
        assert_eq!(good[0].header("ce-id").as_deref(), Some("a"));
        assert_eq!(good[0].header("x-topic").as_deref(), Some("orders"));
        assert_eq!(good[0].header("x-delivery-attempt").as_deref(), Some("1"));
        assert_eq!(gw.requests_to("bad").len(), 1, "a 4xx is not retried");
    }

    /// A letter written from a traced message keeps the trace in
    /// `x-dead-letter-traceparent`; replaying it invokes the function in that trace.
    #[tokio::test]
    async fn a_replayed_letter_continues_its_trace() {
        let gw = FakeGateway::start().await.unwrap();
        gw.function("good", "unrelated", |_, _| Reply::ok());
        let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
        let mut traced = letter("a", "good");
        let mut message = (*traced.message).clone();
        message.set_trace_context(
            format!("00-{trace_id}-00f067aa0ba902b7-01").as_bytes(),
            None,
        );
        traced.message = Arc::new(message);
        let decoded = decode(&traced).unwrap();
        assert!(
            decoded
                .provenance
                .traceparent
                .as_deref()
                .is_some_and(|t| t.contains(trace_id))
        );
        let store = Memory::with(vec![Ok(decoded), decode(&letter("b", "good"))]);
        let (summary, out) = replay(&gw, ReplayArgs::default(), store).await;
        assert_eq!(summary.replayed, 2, "{out}");
        let requests = gw.requests_to("good");
        let traceparent = |id: &str| {
            requests
                .iter()
                .find(|r| r.header("ce-id").as_deref() == Some(id))
                .and_then(|r| r.header("traceparent"))
        };
        let continued = traceparent("a").unwrap();
        assert_eq!(continued.split('-').nth(1), Some(trace_id), "{continued}");
        assert_eq!(
            traceparent("b"),
            None,
            "a letter without a trace starts none"
        );
    }

    #[tokio::test]
    async fn retries_follow_the_policy_and_exhaustion_keeps_the_letter() {
        let gw = FakeGateway::start().await.unwrap();
        gw.function("flaky", "t", |_, call| {
            if call == 0 {
                Reply::status(503)
            } else {
                Reply::ok()
            }
        });
        gw.function("down", "t", |_, _| Reply::status(503));
        let store = Memory::with(vec![
            decode(&letter("a", "flaky")),
            decode(&letter("b", "down")),
        ]);
        let (summary, out) = replay(&gw, ReplayArgs::default(), store.clone()).await;
        assert_eq!((summary.replayed, summary.failed), (1, 1), "{out}");
        assert_eq!(gw.requests_to("flaky").len(), 2);
        assert_eq!(gw.requests_to("down").len(), 2, "max_attempts = 2");
        assert_eq!(*store.removed.lock().unwrap(), ["dlq@0"]);
        assert_eq!(*store.kept.lock().unwrap(), ["dlq@1"]);
        assert!(out.contains("held after 2 attempt(s) status=503"), "{out}");
    }

    #[tokio::test]
    async fn dry_run_limit_and_function_filter() {
        let gw = FakeGateway::start().await.unwrap();
        gw.function("good", "t", |_, _| Reply::ok());
        let letters = || {
            vec![
                decode(&letter("a", "other")),
                decode(&letter("b", "good")),
                decode(&letter("c", "good")),
                decode(&letter("d", "good")),
            ]
        };
        let store = Memory::with(letters());
        let args = ReplayArgs {
            dry_run: true,
            limit: Some(2),
            filter: LetterFilter {
                function: Some("good".into()),
                ..LetterFilter::default()
            },
            ..ReplayArgs::default()
        };
        let (summary, out) = replay(&gw, args, store.clone()).await;
        assert_eq!((summary.replayed, summary.skipped), (2, 1), "{out}");
        assert!(out.contains("would replay dlq@1 function=good topic=orders id=b reason=rejected status=400 attempts=1"), "{out}");
        assert!(!out.contains("dlq@3"), "{out}");
        assert!(out.ends_with("dry run: 2 would be replayed, 1 skipped; nothing was removed\n"));
        assert!(gw.requests().is_empty(), "a dry run invokes nothing");
        assert!(store.removed.lock().unwrap().is_empty());
        assert!(store.kept.lock().unwrap().is_empty());
        assert!(*store.finished.lock().unwrap());

        let store = Memory::with(letters().split_off(1));
        let args = ReplayArgs {
            limit: Some(1),
            filter: LetterFilter {
                function: Some("good".into()),
                ..LetterFilter::default()
            },
            ..ReplayArgs::default()
        };
        let (summary, out) = replay(&gw, args, store.clone()).await;
        assert_eq!((summary.replayed, summary.skipped), (1, 0), "{out}");
        assert_eq!(*store.removed.lock().unwrap(), ["dlq@0"]);
        // Read past the limit in the same batch: kept, not lost; the next batch is not read.
        assert_eq!(*store.kept.lock().unwrap(), ["dlq@1"]);
        assert_eq!(store.letters.lock().unwrap().len(), 1);
        assert_eq!(gw.requests_to("good").len(), 1);
    }

    /// A letter for `function` with `status` (none: a transport error), `reason`, last
    /// failure at `at` seconds after the epoch, on `topic` with `key`.
    fn varied(
        id: &str,
        function: &str,
        status: Option<u16>,
        reason: DeadLetterReason,
        at: u64,
        topic: &str,
        key: Option<&str>,
    ) -> ReplayLetter {
        let mut l = letter(id, function);
        l.status = status;
        l.reason = reason;
        l.last_failure = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(at);
        let mut message = (*l.message).clone();
        message.topic = topic.to_owned();
        message.subject = key.map(str::to_owned);
        l.message = Arc::new(message);
        let mut decoded = decode(&l).unwrap();
        decoded.message.subject = key.map(str::to_owned);
        decoded
    }

    #[test]
    fn a_filter_selects_by_every_condition_it_sets() {
        let a = varied(
            "a",
            "f",
            Some(422),
            DeadLetterReason::Rejected,
            100,
            "orders",
            Some("k1"),
        );
        let b = varied(
            "b",
            "g",
            Some(503),
            DeadLetterReason::Exhausted,
            200,
            "payments",
            None,
        );
        let c = varied(
            "c",
            "f",
            None,
            DeadLetterReason::Exhausted,
            300,
            "orders",
            Some("k2"),
        );
        let pick = |filter: LetterFilter| -> Vec<String> {
            [&a, &b, &c]
                .into_iter()
                .filter(|l| filter.matches(l))
                .map(|l| l.provenance.id.clone())
                .collect()
        };
        let t = |secs| Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs));
        assert_eq!(pick(LetterFilter::default()), ["a", "b", "c"]);
        let f = |function: &str| LetterFilter {
            function: Some(function.into()),
            ..LetterFilter::default()
        };
        assert_eq!(pick(f("f")), ["a", "c"]);
        let mut qualified = varied(
            "q",
            "f",
            None,
            DeadLetterReason::Exhausted,
            1,
            "orders",
            None,
        );
        qualified.function = FunctionRef::new("f", Some("openfaas-fn"));
        assert!(
            f("f").matches(&qualified),
            "a name selects it in any namespace"
        );
        assert!(f("f.openfaas-fn").matches(&qualified));
        assert!(!f("f.other").matches(&qualified));
        assert!(!f("ff").matches(&qualified));
        let status = |s: &str| LetterFilter {
            status: Some(parse_status_filter(s).unwrap()),
            ..LetterFilter::default()
        };
        assert_eq!(pick(status("4xx")), ["a"]);
        assert_eq!(pick(status("503")), ["b"]);
        assert_eq!(pick(status("none")), ["c"]);
        assert!(parse_status_filter("6xx").is_err());
        assert!(parse_status_filter("teapot").is_err());
        let reason = LetterFilter {
            reason: Some("exhausted".into()),
            ..LetterFilter::default()
        };
        assert_eq!(pick(reason), ["b", "c"]);
        let window = LetterFilter {
            since: t(150),
            until: t(300),
            ..LetterFilter::default()
        };
        assert_eq!(pick(window), ["b"], "since inclusive, until exclusive");
        let topic_key = LetterFilter {
            topic: Some("orders".into()),
            key: Some("k2".into()),
            ..LetterFilter::default()
        };
        assert_eq!(pick(topic_key), ["c"]);
        let both = LetterFilter {
            function: Some("f".into()),
            status: Some(StatusFilter::Class(4)),
            ..LetterFilter::default()
        };
        assert_eq!(pick(both), ["a"], "every condition must hold");
        assert!(parse_time("2026-12-07T10:00:00Z").is_ok());
        assert!(parse_time("yesterday").is_err());
    }

    #[tokio::test]
    async fn a_purge_removes_what_the_filter_selects_without_delivering_it() {
        let gw = FakeGateway::start().await.unwrap();
        gw.function("f", "t", |_, _| Reply::ok());
        let letters = || {
            vec![
                Ok(varied(
                    "a",
                    "f",
                    Some(422),
                    DeadLetterReason::Rejected,
                    1,
                    "orders",
                    None,
                )),
                Ok(varied(
                    "b",
                    "f",
                    Some(503),
                    DeadLetterReason::Exhausted,
                    2,
                    "orders",
                    None,
                )),
                Err(DecodeError::Missing(names::FUNCTION)),
                Ok(varied(
                    "c",
                    "g",
                    Some(422),
                    DeadLetterReason::Rejected,
                    3,
                    "orders",
                    None,
                )),
            ]
        };
        let filter = LetterFilter {
            status: Some(StatusFilter::Class(4)),
            ..LetterFilter::default()
        };
        let dry = ReplayArgs {
            dry_run: true,
            purge: true,
            filter: filter.clone(),
            ..ReplayArgs::default()
        };
        let store = Memory::with(letters());
        let (summary, out) = replay(&gw, dry, store.clone()).await;
        assert_eq!((summary.purged, summary.skipped), (2, 2), "{out}");
        assert!(
            out.ends_with("dry run: 2 would be purged, 2 skipped; nothing was removed\n"),
            "{out}"
        );
        assert!(store.removed.lock().unwrap().is_empty());

        let purge = ReplayArgs {
            purge: true,
            filter,
            ..ReplayArgs::default()
        };
        let store = Memory::with(letters());
        let (summary, out) = replay(&gw, purge, store.clone()).await;
        assert_eq!(
            (summary.purged, summary.replayed, summary.skipped),
            (2, 0, 2),
            "{out}"
        );
        assert_eq!(*store.removed.lock().unwrap(), ["dlq@0", "dlq@3"]);
        assert_eq!(*store.kept.lock().unwrap(), ["dlq@1", "dlq@2"]);
        assert!(out.contains("purged dlq@0 function=f"), "{out}");
        assert!(out.ends_with("purge: 2 purged, 2 skipped\n"), "{out}");
        assert!(gw.requests().is_empty(), "a purge delivers nothing");
    }

    #[tokio::test]
    async fn a_listing_pages_through_the_selected_letters_and_touches_none() {
        let mut letters = Vec::new();
        for i in 0..5 {
            letters.push(Ok(varied(
                &format!("m{i}"),
                "f",
                Some(500),
                DeadLetterReason::Exhausted,
                i,
                "orders",
                Some("k"),
            )));
        }
        letters.insert(
            2,
            Ok(varied(
                "other",
                "g",
                Some(500),
                DeadLetterReason::Exhausted,
                9,
                "orders",
                None,
            )),
        );
        letters.push(Err(DecodeError::Missing(names::TOPIC)));
        let mut big = varied(
            "big",
            "f",
            Some(500),
            DeadLetterReason::Exhausted,
            10,
            "orders",
            None,
        );
        big.message.payload =
            Bytes::from(format!("<script>{}</script>", "x".repeat(PREVIEW_BYTES)));
        letters.push(Ok(big));
        let filter = LetterFilter {
            function: Some("f".into()),
            ..LetterFilter::default()
        };
        let store = Memory::with(letters);
        let page = list(store.clone(), &filter, 0, 4).await.unwrap();
        assert_eq!(page.matched, 6);
        assert_eq!(page.undecodable, 1);
        assert_eq!(page.next, Some(4));
        let ids: Vec<&str> = page.letters.iter().map(|l| l.id.as_str()).collect();
        assert_eq!(ids, ["m0", "m1", "m2", "m3"]);
        let first = &page.letters[0];
        assert_eq!(
            (first.status, first.reason.as_deref()),
            (Some(500), Some("exhausted"))
        );
        assert_eq!(first.key.as_deref(), Some("k"));
        assert_eq!(first.coordinates["partition"], "1");
        assert_eq!(first.preview, "body-m0");
        assert!(!first.truncated);
        assert!(
            store.removed.lock().unwrap().is_empty(),
            "a listing removes nothing"
        );
        assert!(
            store.kept.lock().unwrap().is_empty(),
            "nor rewrites anything"
        );
        assert!(*store.finished.lock().unwrap());
    }

    #[tokio::test]
    async fn a_listing_previews_a_large_payload_cut() {
        let mut big = varied(
            "big",
            "f",
            Some(500),
            DeadLetterReason::Exhausted,
            10,
            "orders",
            None,
        );
        big.message.payload = Bytes::from(format!("<b>{}</b>", "x".repeat(PREVIEW_BYTES)));
        let page = list(Memory::with(vec![Ok(big)]), &LetterFilter::default(), 0, 10)
            .await
            .unwrap();
        let view = &page.letters[0];
        assert_eq!(view.payload_bytes, PREVIEW_BYTES + 7);
        assert_eq!(view.preview.len(), PREVIEW_BYTES);
        assert!(
            view.preview.starts_with("<b>xx"),
            "the text as it is: escaping is the page's"
        );
        assert!(view.truncated);
        assert_eq!(page.next, None);
        let past = list(Memory::with(Vec::new()), &LetterFilter::default(), 5, 10)
            .await
            .unwrap();
        assert_eq!((past.matched, past.next), (0, None));
    }

    #[tokio::test]
    async fn a_signal_lets_the_running_letter_finish_and_keeps_the_rest() {
        let gw = FakeGateway::start().await.unwrap();
        gw.function("slow", "t", |_, _| {
            Reply::ok().delay(std::time::Duration::from_millis(300))
        });
        let store = Memory::with(vec![
            decode(&letter("a", "slow")),
            decode(&letter("b", "slow")),
        ]);
        let replayer =
            Replayer::new("test-connector", &gw.config(), ReplayArgs::default()).unwrap();
        let token = replayer.shutdown_token();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            token.cancel();
        });
        let mut out = Vec::new();
        let summary = replayer.run(store.clone(), &mut out).await.unwrap();
        let out = String::from_utf8(out).unwrap();
        assert_eq!((summary.replayed, summary.failed), (1, 0), "{out}");
        assert_eq!(*store.removed.lock().unwrap(), ["dlq@0"]);
        assert_eq!(*store.kept.lock().unwrap(), ["dlq@1"]);
        assert_eq!(gw.requests_to("slow").len(), 1);
    }
}
