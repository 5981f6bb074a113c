//! Child processes that outlive a gateway killed with SIGKILL (or crashed) are stopped by
//! the next start. Every long-running child (an `http` replica, a connector) is recorded
//! in `state_dir/children.json` with its start time from `/proc`, so a recycled PID is
//! never mistaken for one of ours. (Making children die with their parent would need
//! `prctl(PR_SET_PDEATHSIG)` in `pre_exec`, which is `unsafe`; this crate has none.)

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use crate::provider::local::store::write_atomically;

/// The record of running children.
#[derive(Debug, Clone)]
pub struct Children {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: Option<PathBuf>,
    running: Mutex<BTreeMap<u32, u64>>,
}

impl Children {
    /// A record kept in `dir/children.json`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            inner: Arc::new(Inner {
                path: Some(dir.join("children.json")),
                running: Mutex::new(BTreeMap::new()),
            }),
        }
    }

    /// A record kept nowhere (external provider, tests).
    pub fn none() -> Self {
        Self {
            inner: Arc::new(Inner {
                path: None,
                running: Mutex::new(BTreeMap::new()),
            }),
        }
    }

    /// Sends SIGTERM to the children a previous gateway left running, then forgets them.
    pub fn stop_leftovers(&self) {
        let Some(path) = &self.inner.path else { return };
        let Ok(text) = std::fs::read_to_string(path) else {
            return;
        };
        let recorded: BTreeMap<u32, u64> = serde_json::from_str(&text).unwrap_or_default();
        for (pid, started) in recorded {
            if start_time(pid) == Some(started)
                && let Ok(raw) = i32::try_from(pid)
            {
                tracing::warn!(pid, "stopping a child left running by a previous gateway");
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(raw),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
        self.save(&BTreeMap::new());
    }

    /// Records a started child.
    pub fn add(&self, pid: Option<u32>) {
        let Some(pid) = pid else { return };
        let Some(started) = start_time(pid) else {
            return;
        };
        let snapshot = {
            let mut running = self.lock();
            running.insert(pid, started);
            running.clone()
        };
        self.save(&snapshot);
    }

    /// Forgets a child that exited.
    pub fn remove(&self, pid: Option<u32>) {
        let Some(pid) = pid else { return };
        let snapshot = {
            let mut running = self.lock();
            if running.remove(&pid).is_none() {
                return;
            }
            running.clone()
        };
        self.save(&snapshot);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, u64>> {
        self.inner
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn save(&self, running: &BTreeMap<u32, u64>) {
        let Some(path) = &self.inner.path else { return };
        let bytes = serde_json::to_vec(running).unwrap_or_default();
        if let Err(e) = write_atomically(path, &bytes) {
            tracing::warn!(path = %path.display(), error = %e, "cannot record child processes");
        }
    }
}

/// The process's start time in clock ticks since boot (`/proc/<pid>/stat`, field 22).
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields after it follow the last ')'.
    let after = stat.rsplit_once(')')?.1;
    after.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn leftovers_are_stopped_and_recycled_pids_spared() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = tokio::process::Command::new("sleep")
            .arg("30")
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let first = Children::in_dir(dir.path());
        first.add(child.id());
        // A PID whose start time does not match is not ours any more.
        let me = std::process::id();
        first.lock().insert(me, 1);
        first.save(&first.lock().clone());
        let next = Children::in_dir(dir.path());
        next.stop_leftovers();
        let status = tokio::time::timeout(std::time::Duration::from_secs(10), child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(!status.success(), "the leftover got SIGTERM");
        let text = std::fs::read_to_string(dir.path().join("children.json")).unwrap();
        assert_eq!(text, "{}");
    }
}
