//! The embedded queue's on-disk store: redb files in one folder holding every accepted
//! request that is not finished, keyed by a sequence number in the order of acceptance.
//!
//! Each file's writes go through its own writer thread, which commits in groups: it takes
//! the first pending
//! operation, then every other one already waiting (up to [`MAX_BATCH`]), applies them all
//! in one write transaction and commits it with one sync to disk. An insert is answered
//! only once its transaction is durable, so a 202 means the request is on disk; while one
//! commit syncs, the next group gathers, so the syncs per second stay near the disk's own
//! rate however many requests arrive. Updates (a retry's attempt count) and removals (a
//! finished request) are not waited for: losing one in a crash only runs a request again,
//! which at-least-once allows.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};

use super::QueuedRequest;
use crate::error::Error;

/// Sequence number to the JSON of a [`Record`].
const REQUESTS: TableDefinition<'static, u64, &[u8]> = TableDefinition::new("requests");

/// Files, each with its own writer thread; a request's key picks its file. A commit's
/// latency is mostly waiting for the disk (the writer thread's time is the kernel's I/O
/// path), so while one file syncs, the others commit: with a fixed number of clients each
/// waiting for its 202, more files accept more requests per second, up to the CPUs' limit
/// (the benchmark in BENCHMARKS.md compares one, two and four).
const SHARDS: usize = 4;

/// redb's page cache per file. Records are read only at start, so the cache holds little
/// more than the trees' upper pages; redb's default (1 GiB) would let it grow with a large
/// backlog.
const CACHE_BYTES: usize = 4 * 1024 * 1024;

/// Most operations in one transaction: a bound on the time one commit takes, so inserts
/// behind a very large group do not wait for all of it.
const MAX_BATCH: usize = 4096;

/// What is stored per request: the request as accepted, and where its retries stand.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record<R> {
    /// The attempt to make next (1-based); the one in progress, if the gateway stopped
    /// during it.
    pub attempt: u32,
    /// Not to be run before this time (Unix milliseconds): a retry's backoff.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before_ms: Option<u64>,
    /// The request.
    pub request: R,
}

impl Record<&QueuedRequest> {
    /// The bytes stored for this record.
    pub fn encode(&self) -> Result<Vec<u8>, Error> {
        serde_json::to_vec(self)
            .map_err(|e| Error::Internal(format!("Error queuing request: {e}\n")))
    }
}

/// One change for the writer thread.
enum Op {
    /// Insert or replace; `done` hears when it is durable (or why not).
    Put {
        key: u64,
        value: Vec<u8>,
        done: Option<oneshot::Sender<Result<(), Error>>>,
    },
    /// Forget a finished request; `place` (its share of `queue_capacity`) is released
    /// once the removal is committed, so the file never holds more than the capacity.
    Remove {
        key: u64,
        place: Option<OwnedSemaphorePermit>,
    },
    /// Commit what is pending, then stop.
    Close { done: oneshot::Sender<()> },
}

/// The store: a handle on the writer threads. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    // One channel per file. Unbounded, because what enters them is bounded elsewhere: an
    // insert holds a place in `queue_capacity`, an update or removal belongs to a request
    // that holds one.
    shards: Arc<[mpsc::UnboundedSender<Op>]>,
    path: Arc<PathBuf>,
    commits: Arc<AtomicU64>,
}

impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Put { key, .. } => write!(f, "Put({key})"),
            Self::Remove { key, .. } => write!(f, "Remove({key})"),
            Self::Close { .. } => write!(f, "Close"),
        }
    }
}

fn store_error(path: &Path, e: impl Into<redb::Error>) -> Error {
    Error::QueueStore {
        path: path.display().to_string(),
        source: Arc::new(e.into()),
    }
}

impl Store {
    /// Opens (or creates) the store's files in the folder `dir` and starts their writer
    /// threads. Returns the records found in them, in the order they were accepted:
    /// requests a previous run accepted and did not finish. Records that cannot be read
    /// are logged and removed.
    pub async fn open(dir: &Path) -> Result<(Self, Found), Error> {
        std::fs::create_dir_all(dir).map_err(|source| Error::State {
            path: dir.display().to_string(),
            source,
        })?;
        let commits = Arc::new(AtomicU64::new(0));
        let mut shards = Vec::with_capacity(SHARDS);
        let mut found = Vec::new();
        for shard in 0..SHARDS {
            let path = dir.join(format!("shard-{shard}.redb"));
            let owned = path.clone();
            let (db, records) = tokio::task::spawn_blocking(move || open_blocking(&owned))
                .await
                .map_err(|e| Error::Internal(format!("opening the async queue store: {e}")))??;
            found.extend(records);
            let (ops, receiver) = mpsc::unbounded_channel();
            let counted = Arc::clone(&commits);
            std::thread::Builder::new()
                .name(format!("async-queue-{shard}"))
                .spawn(move || write_loop(db, &path, receiver, &counted))
                .map_err(|source| Error::State {
                    path: dir.display().to_string(),
                    source,
                })?;
            shards.push(ops);
        }
        found.sort_unstable_by_key(|(key, _)| *key);
        Ok((
            Self {
                shards: shards.into(),
                path: Arc::new(dir.to_path_buf()),
                commits,
            },
            found,
        ))
    }

    /// Stores `value` under `key` and returns once it is on disk.
    pub async fn insert(&self, key: u64, value: Vec<u8>) -> Result<(), Error> {
        let (done, committed) = oneshot::channel();
        self.send(
            key,
            Op::Put {
                key,
                value,
                done: Some(done),
            },
        )?;
        committed.await.map_err(|_| self.stopped())?
    }

    /// Replaces the record under `key` (a retry's attempt count), without waiting.
    pub fn update(&self, key: u64, value: Vec<u8>) {
        let _ = self.send(
            key,
            Op::Put {
                key,
                value,
                done: None,
            },
        );
    }

    /// Removes the record under `key`, without waiting; `place` is dropped once the
    /// removal is committed.
    pub fn remove(&self, key: u64, place: Option<OwnedSemaphorePermit>) {
        let _ = self.send(key, Op::Remove { key, place });
    }

    /// Transactions committed so far.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Commits what is pending and stops the writers; later inserts fail.
    pub async fn close(&self) {
        let mut closing = Vec::new();
        for shard in self.shards.iter() {
            let (done, closed) = oneshot::channel();
            if shard.send(Op::Close { done }).is_ok() {
                closing.push(closed);
            }
        }
        for closed in closing {
            let _ = closed.await;
        }
    }

    /// A key's operations all go to one file, in order.
    fn send(&self, key: u64, op: Op) -> Result<(), Error> {
        let shard = usize::try_from(key % self.shards.len() as u64).unwrap_or(0);
        self.shards
            .get(shard)
            .ok_or_else(|| self.stopped())?
            .send(op)
            .map_err(|_| self.stopped())
    }

    fn stopped(&self) -> Error {
        tracing::debug!(path = %self.path.display(), "async queue store is closed");
        Error::ServiceUnavailable("Error queuing request: the gateway is stopping\n".into())
    }
}

/// Records found at start, with their keys.
pub type Found = Vec<(u64, Record<QueuedRequest>)>;

fn open_blocking(path: &Path) -> Result<(Database, Found), Error> {
    // A file left by a killed gateway is repaired here (redb checks it on open).
    let db = Database::builder()
        .set_cache_size(CACHE_BYTES)
        .create(path)
        .map_err(|e| store_error(path, e))?;
    let txn = db.begin_write().map_err(|e| store_error(path, e))?;
    let mut found = Vec::new();
    {
        let mut table = txn.open_table(REQUESTS).map_err(|e| store_error(path, e))?;
        let mut unreadable = Vec::new();
        for entry in table.iter().map_err(|e| store_error(path, e))? {
            let (key, value) = entry.map_err(|e| store_error(path, e))?;
            let key = key.value();
            match serde_json::from_slice::<Record<QueuedRequest>>(value.value()) {
                Ok(record) => found.push((key, record)),
                Err(e) => {
                    tracing::error!(key, error = %e, "unreadable queued request; removed");
                    unreadable.push(key);
                }
            }
        }
        for key in unreadable {
            table.remove(key).map_err(|e| store_error(path, e))?;
        }
    }
    txn.commit().map_err(|e| store_error(path, e))?;
    Ok((db, found))
}

/// The writer thread: group commits until [`Op::Close`] or until every handle is gone.
/// The file is closed before `Close` is answered, so it can be opened again at once.
fn write_loop(
    db: Database,
    path: &Path,
    mut ops: mpsc::UnboundedReceiver<Op>,
    commits: &AtomicU64,
) {
    let mut batch = Vec::new();
    let mut closed = Vec::new();
    while closed.is_empty()
        && let Some(first) = ops.blocking_recv()
    {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match ops.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let started = std::time::Instant::now();
        let result = commit(&db, &batch);
        commits.fetch_add(1, Ordering::Relaxed);
        tracing::trace!(
            operations = batch.len(),
            micros = started.elapsed().as_micros() as u64,
            "committed"
        );
        if let Err(e) = &result {
            tracing::error!(path = %path.display(), error = %e, operations = batch.len(), "async queue store commit failed");
        }
        for op in batch.drain(..) {
            match op {
                Op::Put {
                    done: Some(done), ..
                } => {
                    let answer = match &result {
                        Ok(()) => Ok(()),
                        Err(e) => Err(Error::QueueStore {
                            path: path.display().to_string(),
                            source: Arc::clone(e),
                        }),
                    };
                    let _ = done.send(answer);
                }
                Op::Close { done } => closed.push(done),
                // A removal's place is given back here, after the commit.
                Op::Remove { place, .. } => drop(place),
                Op::Put { done: None, .. } => {}
            }
        }
    }
    drop(db);
    for done in closed {
        let _ = done.send(());
    }
}

fn commit(db: &Database, batch: &[Op]) -> Result<(), Arc<redb::Error>> {
    let apply = || -> Result<(), redb::Error> {
        // Durability::Immediate, redb's default: committed means synced to disk.
        let txn = db.begin_write()?;
        {
            let mut table = txn.open_table(REQUESTS)?;
            for op in batch {
                match op {
                    Op::Put { key, value, .. } => {
                        table.insert(*key, value.as_slice())?;
                    }
                    Op::Remove { key, .. } => {
                        table.remove(*key)?;
                    }
                    Op::Close { .. } => {}
                }
            }
        }
        txn.commit()?;
        Ok(())
    };
    apply().map_err(Arc::new)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn request(n: u32) -> QueuedRequest {
        QueuedRequest {
            call_id: format!("call-{n}"),
            function: "f.openfaas-fn".into(),
            path: "/".into(),
            query: None,
            headers: vec![("x-n".into(), n.to_string())],
            body: "aGk=".into(),
            callback_url: None,
            accepted_at_ms: 1,
        }
    }

    fn encode(n: u32, attempt: u32) -> Vec<u8> {
        Record {
            attempt,
            not_before_ms: None,
            request: &request(n),
        }
        .encode()
        .unwrap()
    }

    #[tokio::test]
    async fn inserted_records_are_found_on_reopen_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q");
        let (store, found) = Store::open(&path).await.unwrap();
        assert!(found.is_empty());
        for n in 0..5 {
            store.insert(u64::from(n), encode(n, 1)).await.unwrap();
        }
        store.close().await;
        let (store, found) = Store::open(&path).await.unwrap();
        let keys: Vec<u64> = found.iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, [0, 1, 2, 3, 4]);
        assert_eq!(found[3].1.request, request(3));
        assert_eq!(found[3].1.attempt, 1);
        store.close().await;
    }

    #[tokio::test]
    async fn updates_and_removals_are_kept_after_close() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q");
        let (store, _) = Store::open(&path).await.unwrap();
        for n in 0..3 {
            store.insert(u64::from(n), encode(n, 1)).await.unwrap();
        }
        store.update(1, encode(1, 3));
        store.remove(0, None);
        store.close().await;
        let (store, found) = Store::open(&path).await.unwrap();
        let seen: Vec<(u64, u32)> = found.iter().map(|(k, r)| (*k, r.attempt)).collect();
        assert_eq!(seen, [(1, 3), (2, 1)]);
        store.close().await;
    }

    #[tokio::test]
    async fn concurrent_inserts_share_commits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q");
        let (store, _) = Store::open(&path).await.unwrap();
        let inserts = (0..500u32).map(|n| {
            let store = store.clone();
            tokio::spawn(async move { store.insert(u64::from(n), encode(n, 1)).await })
        });
        for insert in futures::future::join_all(inserts).await {
            insert.unwrap().unwrap();
        }
        // One transaction (one sync) per group, not per insert.
        assert!(store.commits() < 500, "{} commits", store.commits());
        store.close().await;
        let (store, found) = Store::open(&path).await.unwrap();
        assert_eq!(found.len(), 500);
        store.close().await;
    }

    #[tokio::test]
    async fn a_removal_releases_its_place_after_the_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(&dir.path().join("q")).await.unwrap();
        let places = Arc::new(tokio::sync::Semaphore::new(1));
        let place = Arc::clone(&places).try_acquire_owned().unwrap();
        store.insert(7, encode(7, 1)).await.unwrap();
        assert_eq!(places.available_permits(), 0);
        store.remove(7, Some(place));
        // The next insert to the same file is committed after the removal, in the same
        // group or a later one.
        let same_file = 7 + SHARDS as u64;
        store.insert(same_file, encode(9, 1)).await.unwrap();
        assert_eq!(places.available_permits(), 1);
        store.close().await;
    }

    #[tokio::test]
    async fn unreadable_records_are_dropped_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q");
        let (store, _) = Store::open(&path).await.unwrap();
        store.insert(1, b"not json".to_vec()).await.unwrap();
        store.insert(2, encode(2, 1)).await.unwrap();
        store.close().await;
        let (store, found) = Store::open(&path).await.unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, 2);
        store.close().await;
        let (store, found) = Store::open(&path).await.unwrap();
        assert_eq!(found.len(), 1, "the unreadable record is gone for good");
        store.close().await;
    }

    #[tokio::test]
    async fn inserts_after_close_fail() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(&dir.path().join("q")).await.unwrap();
        store.close().await;
        let err = store.insert(1, encode(1, 1)).await.unwrap_err();
        assert_eq!(err.status(), axum::http::StatusCode::SERVICE_UNAVAILABLE);
    }

    #[tokio::test]
    async fn a_second_gateway_on_the_same_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q");
        let (store, _) = Store::open(&path).await.unwrap();
        let err = Store::open(&path).await.unwrap_err();
        assert!(err.to_string().contains("shard-0.redb"), "{err}");
        store.close().await;
    }
}
