//! [`EmbeddedStore`]: sessions kept in an embedded database file (redb).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redb::{Database, ReadableTable, TableDefinition};

use crate::error::{BackendError, ErrorCode, Result};
use crate::session::SessionId;
use crate::session::store::{DEFAULT_LEASE_TTL, Lease, SessionRecord, SessionStore, now_ms};

/// Records by session id.
const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");
/// Leases by session id (JSON [`Lease`]s).
const LEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("leases");

/// A [`SessionStore`] in one file on disk, an embedded
/// [redb](https://docs.rs/redb) database: every write is committed durably
/// (fsync) before it counts as done, so a session written before a crash is
/// there after it. One process opens the file at a time (a second one is
/// refused with `ConnectionFailed`), so opening it frees every lease a
/// crashed process left in it. Calls run on tokio's blocking threads.
pub struct EmbeddedStore {
    db: Arc<Database>,
    path: PathBuf,
    ttl: Duration,
}

impl fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// A redb error of any kind, boxed (they are large).
struct DbError(Box<redb::Error>);

impl<E: Into<redb::Error>> From<E> for DbError {
    fn from(e: E) -> Self {
        DbError(Box::new(e.into()))
    }
}

fn failed(op: &'static str, path: &Path, e: impl fmt::Display) -> BackendError {
    BackendError::new(
        op,
        ErrorCode::ConnectionFailed,
        format!("the session store {}: {e}", path.display()),
    )
}

impl EmbeddedStore {
    /// Opens the store at `path`, creating the file (and its directory) if
    /// there is none.
    ///
    /// # Errors
    ///
    /// `ConnectionFailed` naming the file: it cannot be created or read, is
    /// not a store, or another process has it open.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        const OP: &str = "store.open";
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| failed(OP, &path, e))?;
        }
        let db = Database::create(&path).map_err(|e| failed(OP, &path, e))?;
        let tx = db.begin_write().map_err(|e| failed(OP, &path, e))?;
        tx.open_table(SESSIONS).map_err(|e| failed(OP, &path, e))?;
        // Only one process opens the file: the leases in it were taken by a
        // process that is gone (it crashed), so its sessions are free now.
        tx.delete_table(LEASES).map_err(|e| failed(OP, &path, e))?;
        tx.open_table(LEASES).map_err(|e| failed(OP, &path, e))?;
        tx.commit().map_err(|e| failed(OP, &path, e))?;
        Ok(EmbeddedStore {
            db: Arc::new(db),
            path,
            ttl: DEFAULT_LEASE_TTL,
        })
    }

    /// The same store with leases lasting `ttl`.
    pub fn with_lease_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on a blocking thread with the database.
    async fn blocking<T: Send + 'static>(
        &self,
        op: &'static str,
        f: impl FnOnce(&Database) -> std::result::Result<T, DbError> + Send + 'static,
    ) -> Result<T> {
        let db = self.db.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || f(&db).map_err(|e| failed(op, &path, e.0)))
            .await
            .map_err(|e| failed(op, &self.path, e))?
    }
}

#[async_trait]
impl SessionStore for EmbeddedStore {
    fn kind(&self) -> &str {
        "embedded"
    }

    async fn save(&self, record: &SessionRecord) -> Result<()> {
        let (id, bytes) = (record.id.clone(), record.to_bytes());
        self.blocking("store.save", move |db| {
            let tx = db.begin_write()?;
            tx.open_table(SESSIONS)?
                .insert(id.as_str(), bytes.as_slice())?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn load(&self, id: &SessionId) -> Result<Option<SessionRecord>> {
        let id = id.clone();
        let bytes = self
            .blocking("store.load", move |db| {
                let tx = db.begin_read()?;
                let table = tx.open_table(SESSIONS)?;
                Ok(table.get(id.as_str())?.map(|v| v.value().to_vec()))
            })
            .await?;
        bytes.map(|b| SessionRecord::from_bytes(&b)).transpose()
    }

    async fn delete(&self, id: &SessionId) -> Result<()> {
        let id = id.clone();
        self.blocking("store.delete", move |db| {
            let tx = db.begin_write()?;
            tx.open_table(SESSIONS)?.remove(id.as_str())?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn list(&self, provider: &str) -> Result<Vec<SessionRecord>> {
        let all = self
            .blocking("store.list", |db| {
                let tx = db.begin_read()?;
                let table = tx.open_table(SESSIONS)?;
                let mut all = Vec::new();
                for item in table.iter()? {
                    let (_, v) = item?;
                    all.push(v.value().to_vec());
                }
                Ok(all)
            })
            .await?;
        let mut records = Vec::new();
        for bytes in all {
            let record = SessionRecord::from_bytes(&bytes)?;
            if record.provider == provider {
                records.push(record);
            }
        }
        Ok(records)
    }

    async fn acquire(&self, id: &SessionId, owner: &str, ttl: Duration) -> Result<bool> {
        let (id, owner) = (id.clone(), owner.to_owned());
        self.blocking("store.acquire", move |db| {
            // One write transaction at a time: the check and the take are one.
            let tx = db.begin_write()?;
            let granted = {
                let mut table = tx.open_table(LEASES)?;
                let now = now_ms();
                let held = table
                    .get(id.as_str())?
                    .and_then(|v| serde_json::from_slice::<Lease>(v.value()).ok());
                if held.is_some_and(|l| !l.grants(&owner, now)) {
                    false
                } else {
                    let lease = Lease {
                        owner,
                        expires_ms: now + ttl.as_millis() as u64,
                    };
                    let bytes = serde_json::to_vec(&lease).unwrap_or_default();
                    table.insert(id.as_str(), bytes.as_slice())?;
                    true
                }
            };
            tx.commit()?;
            Ok(granted)
        })
        .await
    }

    async fn release(&self, id: &SessionId, owner: &str) -> Result<()> {
        let (id, owner) = (id.clone(), owner.to_owned());
        self.blocking("store.release", move |db| {
            let tx = db.begin_write()?;
            {
                let mut table = tx.open_table(LEASES)?;
                let mine = table
                    .get(id.as_str())?
                    .and_then(|v| serde_json::from_slice::<Lease>(v.value()).ok())
                    .is_some_and(|l| l.owner == owner);
                if mine {
                    table.remove(id.as_str())?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    fn lease_ttl(&self) -> Duration {
        self.ttl
    }
}
