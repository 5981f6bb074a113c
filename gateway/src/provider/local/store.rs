//! Deployed functions kept across restarts: one JSON file in the state directory,
//! replaced atomically (write a temporary file, fsync, rename, fsync the directory) so a
//! crash leaves either the old or the new list, never half of one.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::types::FunctionDeployment;

/// One stored function.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredFunction {
    /// Its namespace.
    pub namespace: String,
    /// When it was first deployed (RFC 3339).
    pub created_at: String,
    /// The deployment as received.
    pub deployment: FunctionDeployment,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    version: u32,
    functions: Vec<StoredFunction>,
}

/// The state file.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
}

impl Store {
    /// The store in `dir`, created if missing.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        std::fs::create_dir_all(dir).map_err(|source| Error::State {
            path: dir.display().to_string(),
            source,
        })?;
        Ok(Self {
            path: dir.join("functions.json"),
        })
    }

    /// The functions last saved; none when the file does not exist yet.
    pub fn load(&self) -> Result<Vec<StoredFunction>, Error> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(self.error(source)),
        };
        let state: StateFile = serde_json::from_str(&text)
            .map_err(|e| self.error(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
        Ok(state.functions)
    }

    /// Replaces the saved list with `functions`.
    pub async fn save(&self, functions: Vec<StoredFunction>) -> Result<(), Error> {
        let path = self.path.clone();
        let state = StateFile {
            version: 1,
            functions,
        };
        let bytes =
            serde_json::to_vec_pretty(&state).map_err(|e| self.error(std::io::Error::other(e)))?;
        tokio::task::spawn_blocking(move || write_atomically(&path, &bytes))
            .await
            .map_err(|e| self.error(std::io::Error::other(e)))?
            .map_err(|source| self.error(source))
    }

    fn error(&self, source: std::io::Error) -> Error {
        Error::State {
            path: self.path.display().to_string(),
            source,
        }
    }
}

/// Writes `bytes` to `path` so that readers see the old or the new content, never a mix.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        set_private(&file)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// State and secrets are readable by the gateway's user only.
fn set_private(file: &std::fs::File) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn saves_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state")).unwrap();
        assert!(store.load().unwrap().is_empty());
        let f = StoredFunction {
            namespace: "openfaas-fn".into(),
            created_at: "2026-01-01T00:00:00Z".into(),
            deployment: FunctionDeployment {
                service: "echo".into(),
                image: "i".into(),
                env_process: Some("cat".into()),
                ..FunctionDeployment::default()
            },
        };
        store.save(vec![f.clone()]).await.unwrap();
        assert_eq!(store.load().unwrap(), vec![f]);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("state"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, ["functions.json"]);
    }
}
