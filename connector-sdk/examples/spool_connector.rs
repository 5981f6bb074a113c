//! `spool-connector`: a complete connector in one file, built only on connector-sdk's
//! public API. Copy it to start your own.
//!
//! Its event source is a spool directory: every file under `<dir>/<topic>/` is one message
//! on `<topic>`, its content the payload. A file is deleted once every subscribed function
//! accepted it (or it was dead-lettered); a dead letter is moved to `<dir>/.dead/<topic>/`
//! with a `.provenance.json` beside it. A file that failed for good and could not be
//! dead-lettered stays where it is and is not picked up again until a restart, as a Kafka
//! partition holds at such a message.
//!
//! Run it against a gateway:
//!
//! ```text
//! mkdir -p spool/orders && echo '{"id":1}' > spool/orders/0001.json
//! cargo run -p connector-sdk --example spool_connector -- --config spool.toml
//! ```
//!
//! with `spool.toml`:
//!
//! ```toml
//! [connector]
//! gateway_url = "http://127.0.0.1:8080"
//! metrics_addr = "127.0.0.1:8090"
//!
//! [spool]
//! dir = "spool"
//! ```
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use connector_sdk::config::{self, EnvVar, SDK_ENV};
use connector_sdk::dead_letter::{DeadLetter, DeadLetterError, DeadLetterSink};
use connector_sdk::runtime::init_tracing;
use connector_sdk::{
    Disposition, Message, MessageOutcome, Runtime, SdkConfig, Source, SourceError, pump,
};
use serde::{Deserialize, Serialize};

/// The whole configuration: the SDK's `[connector]` section and our own `[spool]`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Gateway, retries, concurrency, metrics: see `SdkConfig`.
    pub connector: SdkConfig,
    /// The spool directory.
    pub spool: SpoolConfig,
}

/// `[spool]`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    /// The directory holding one folder per topic. Env `spool_dir`. (default: `"spool"`)
    pub dir: PathBuf,
    /// How often to look for new files when none are waiting. (default: `"1s"`)
    #[serde(with = "config::duration")]
    pub poll_interval: Duration,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("spool"),
            poll_interval: Duration::from_secs(1),
        }
    }
}

/// Our variables, on top of the SDK's (`gateway_url`, `topics`, ...).
const ENV: &[EnvVar] = &[EnvVar::new("spool_dir", "spool.dir")];

/// The dead-letter folder inside the spool.
const DEAD: &str = ".dead";

/// Reads files; settles by deleting them.
pub struct SpoolSource {
    dir: PathBuf,
    poll_interval: Duration,
    /// Pulled and not yet settled, or held: not to be pulled again.
    taken: HashSet<PathBuf>,
    /// The topics to read: the configured ones, or the topic map's.
    topics: Box<dyn Fn() -> Vec<String> + Send>,
}

impl SpoolSource {
    /// Reads `topics()` as folders of `dir`, looking again every `poll_interval`.
    pub fn new(
        dir: PathBuf,
        poll_interval: Duration,
        topics: impl Fn() -> Vec<String> + Send + 'static,
    ) -> Self {
        Self {
            dir,
            poll_interval,
            taken: HashSet::new(),
            topics: Box::new(topics),
        }
    }
}

#[async_trait::async_trait]
impl Source for SpoolSource {
    type Ack = PathBuf;

    /// Cancel-safe: the pump drops this call whenever a completion is ready first, so a
    /// file is marked taken only once the whole batch is read and nothing else is awaited.
    async fn pull(&mut self) -> Result<Vec<(Message, PathBuf)>, SourceError> {
        loop {
            let mut batch = Vec::new();
            for topic in (self.topics)() {
                let folder = self.dir.join(&topic);
                let Ok(entries) = std::fs::read_dir(&folder) else {
                    continue;
                };
                let mut files: Vec<PathBuf> = entries
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.is_file() && !self.taken.contains(p))
                    .collect();
                files.sort();
                for path in files.into_iter().take(100) {
                    let payload = tokio::fs::read(&path)
                        .await
                        .map_err(|e| SourceError::transient(format!("{}: {e}", path.display())))?;
                    let name = path.file_name().unwrap_or_default().to_string_lossy();
                    let message = Message::new(
                        topic.clone(),
                        payload,
                        format!("{topic}/{name}"),
                        format!("spool://{}", folder.display()),
                    )
                    .with_subject(name.to_string())
                    .with_coordinate("file", path.display());
                    batch.push((message, path));
                }
            }
            if !batch.is_empty() {
                self.taken
                    .extend(batch.iter().map(|(_, path)| path.clone()));
                return Ok(batch);
            }
            // Nothing waiting: a pause, then look again.
            tokio::time::sleep(self.poll_interval).await;
        }
    }

    async fn settle(
        &mut self,
        path: PathBuf,
        disposition: Disposition,
        _outcome: &MessageOutcome,
    ) -> Result<(), SourceError> {
        match disposition {
            Disposition::Ack => {
                self.taken.remove(&path);
                tokio::fs::remove_file(&path)
                    .await
                    .map_err(|e| SourceError::transient(format!("{}: {e}", path.display())))
            }
            // Keep it in `taken`: not retried until a restart.
            Disposition::Hold => Ok(()),
            // Picked up again by the next pull (or the next run).
            Disposition::Release => {
                self.taken.remove(&path);
                Ok(())
            }
            // Only with broker retries, which this connector does not turn on.
            Disposition::Retry { .. } => {
                self.taken.remove(&path);
                Ok(())
            }
        }
    }
}

/// Moves dead letters to `<dir>/.dead/<topic>/`, with their provenance as JSON.
pub struct SpoolDeadLetters {
    dir: PathBuf,
}

#[async_trait::async_trait]
impl DeadLetterSink for SpoolDeadLetters {
    async fn write(&self, letter: &DeadLetter) -> Result<(), DeadLetterError> {
        let folder = self.dir.join(DEAD).join(&letter.message.topic);
        tokio::fs::create_dir_all(&folder)
            .await
            .map_err(DeadLetterError::new)?;
        let name = format!(
            "{}.{}",
            letter.message.subject.as_deref().unwrap_or("message"),
            letter.function
        );
        let provenance: serde_json::Map<String, serde_json::Value> = letter
            .provenance()
            .into_iter()
            .map(|(k, v)| (k, serde_json::Value::String(v)))
            .collect();
        let json = serde_json::to_vec_pretty(&provenance).map_err(DeadLetterError::new)?;
        // The payload first, the provenance last: a letter whose provenance file exists is
        // complete.
        tokio::fs::write(folder.join(&name), &letter.message.payload)
            .await
            .map_err(DeadLetterError::new)?;
        tokio::fs::write(folder.join(format!("{name}.provenance.json")), json)
            .await
            .map_err(DeadLetterError::new)
    }
}

/// Runs the connector until the runtime's shutdown (SIGTERM/SIGINT, or `runtime`'s token).
pub async fn run(config: Config, runtime: Runtime) -> anyhow::Result<()> {
    let dir = config.spool.dir.clone();
    let runtime = runtime.dead_letters(Arc::new(SpoolDeadLetters { dir: dir.clone() }));
    runtime
        .run(|ctx| async move {
            let topics_ctx = ctx.clone();
            let source = SpoolSource::new(dir, config.spool.poll_interval, move || {
                topics_ctx
                    .wanted_topics()
                    .into_iter()
                    .filter(|t| t != DEAD && !t.contains(std::path::MAIN_SEPARATOR))
                    .collect()
            });
            pump(&ctx, source).await
        })
        .await?;
    Ok(())
}

/// Loads the configuration: defaults, then `--config FILE`, then environment variables.
pub fn load(path: Option<&Path>) -> anyhow::Result<Config> {
    let env: Vec<EnvVar> = SDK_ENV.iter().chain(ENV).copied().collect();
    Ok(config::load(path, &env)?)
}

/// Command line.
#[derive(clap::Parser)]
#[command(about = "Delivers files from a spool directory to functions")]
struct Args {
    /// TOML configuration file.
    #[arg(long)]
    config: Option<PathBuf>,
}

#[allow(dead_code)] // the example's tests include this file and drive `run` themselves
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = <Args as clap::Parser>::parse();
    let config = load(args.config.as_deref())?;
    init_tracing(config.connector.log_format);
    let runtime = Runtime::new("spool-connector", config.connector.clone())?;
    run(config, runtime).await
}
