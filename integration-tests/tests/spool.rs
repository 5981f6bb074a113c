//! The scenario suite against the SDK's example connector (a spool directory as the
//! broker): proves the suite itself, and the example, end to end as a real process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use integration_tests::scenarios::{self, Fixture};

struct Spool {
    dir: tempfile::TempDir,
}

impl Spool {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn files(dir: &std::path::Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default();
        files.sort();
        files
    }
}

#[async_trait::async_trait]
impl Fixture for Spool {
    fn binary(&self) -> PathBuf {
        integration_tests::example_binary("connector-sdk", "spool_connector")
    }

    async fn create_topic(&self, topic: &str) {
        std::fs::create_dir_all(self.dir.path().join(topic)).unwrap();
    }

    fn source_config(&self, _topic: &str) -> String {
        format!(
            "[spool]\ndir = \"{}\"\npoll_interval = \"50ms\"\n",
            self.dir.path().display()
        )
    }

    /// The example always dead-letters to `.dead/`, and a file it holds is not picked up
    /// again until a restart: the long-outage scenario does not apply.
    fn source_config_without_dead_letters(&self, _topic: &str) -> String {
        panic!("the spool example has no configuration without dead letters")
    }

    async fn produce(&self, topic: &str, payloads: &[Vec<u8>]) {
        let staging = self.dir.path().join(".staging");
        std::fs::create_dir_all(&staging).unwrap();
        for payload in payloads {
            // Written aside, then renamed in: the connector never sees half a file.
            let name = format!("{}.msg", uuid::Uuid::new_v4().simple());
            let tmp = staging.join(&name);
            std::fs::write(&tmp, payload).unwrap();
            std::fs::rename(&tmp, self.dir.path().join(topic).join(name)).unwrap();
        }
    }

    async fn dead_letters(&self, topic: &str) -> Vec<Vec<u8>> {
        Self::files(&self.dir.path().join(".dead").join(topic))
            .into_iter()
            .filter(|p| !p.to_string_lossy().ends_with(".provenance.json"))
            .map(|p| std::fs::read(p).unwrap())
            .collect()
    }

    async fn unacknowledged(&self, topic: &str) -> u64 {
        Self::files(&self.dir.path().join(topic)).len() as u64
    }
}

#[tokio::test]
async fn spool_delivered_once() {
    scenarios::delivered_once(&Spool::new()).await;
}

#[tokio::test]
async fn spool_failure_then_success() {
    scenarios::failure_then_success(&Spool::new()).await;
}

#[tokio::test]
async fn spool_dead_letter_on_4xx() {
    scenarios::dead_letter_on_4xx(&Spool::new()).await;
}

#[tokio::test]
async fn spool_nothing_lost_across_kill() {
    scenarios::nothing_lost_across_kill(&Spool::new()).await;
}

#[tokio::test]
async fn spool_drain_on_shutdown() {
    scenarios::drain_on_shutdown(&Spool::new()).await;
}
