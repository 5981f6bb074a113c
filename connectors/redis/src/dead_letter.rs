//! Dead letters go to a Redis stream (by default `<stream>:dead-letter`): XADD with the
//! original payload and provenance; the source XACKs the original only after the XADD
//! succeeded (the dispatcher completes the delivery as dead-lettered only then).
//!
//! Fields of a dead-letter entry, in order: `payload` (the body functions received),
//! `content-type` (when known), the provenance fields of
//! `connector_sdk::dead_letter::names` (`x-dead-letter-function`, `-reason`, `-status`,
//! `-response`, `-attempts`, `-first-failure`, `-last-failure`, `-topic`, `-id`,
//! `-source-stream`, `-source-id`, `-source-group`), and each request header the message
//! carried as `header:<name>`.

use connector_sdk::dead_letter::{DeadLetter, DeadLetterError, DeadLetterSink};
use redis::aio::ConnectionManager;

use crate::metrics::RedisMetrics;

/// The placeholder replaced by the source stream in `dead_letter_stream`.
pub const STREAM_PLACEHOLDER: &str = "{stream}";

/// The dead-letter stream of `stream` under `template`.
pub fn dead_letter_stream(template: &str, stream: &str) -> String {
    template.replace(STREAM_PLACEHOLDER, stream)
}

/// Writes dead letters with XADD.
pub struct StreamDeadLetters {
    conn: ConnectionManager,
    template: String,
    maxlen: usize,
    metrics: RedisMetrics,
}

impl StreamDeadLetters {
    /// Dead letters of stream `s` go to `template` with `{stream}` replaced by `s`,
    /// trimmed to about `maxlen` entries (0: no trimming).
    pub fn new(
        conn: ConnectionManager,
        template: &str,
        maxlen: usize,
        metrics: RedisMetrics,
    ) -> Self {
        Self {
            conn,
            template: template.to_owned(),
            maxlen,
            metrics,
        }
    }

    /// The XADD command for `letter`.
    pub fn command(&self, letter: &DeadLetter) -> redis::Cmd {
        let stream = dead_letter_stream(&self.template, &letter.message.topic);
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&stream);
        if self.maxlen > 0 {
            cmd.arg("MAXLEN").arg("~").arg(self.maxlen);
        }
        cmd.arg("*")
            .arg("payload")
            .arg(letter.message.payload.as_ref());
        if let Some(ct) = &letter.message.content_type {
            cmd.arg("content-type").arg(ct.as_bytes());
        }
        for (name, value) in letter.provenance() {
            cmd.arg(name).arg(value);
        }
        for (name, value) in &letter.message.headers {
            cmd.arg(format!("header:{name}")).arg(value.as_bytes());
        }
        cmd
    }
}

#[async_trait::async_trait]
impl DeadLetterSink for StreamDeadLetters {
    async fn write(&self, letter: &DeadLetter) -> Result<(), DeadLetterError> {
        let mut conn = self.conn.clone();
        let written: Result<redis::Value, _> = self.command(letter).query_async(&mut conn).await;
        written.map(|_| ()).map_err(|e| {
            self.metrics.error("dead_letter");
            DeadLetterError::new(format!("XADD to the dead-letter stream: {e}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template() {
        assert_eq!(
            dead_letter_stream("{stream}:dead-letter", "orders"),
            "orders:dead-letter"
        );
        assert_eq!(dead_letter_stream("all-dead", "orders"), "all-dead");
    }
}
