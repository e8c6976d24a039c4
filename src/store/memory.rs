//! [`MemoryStore`]: sessions kept in the process.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;

use crate::error::{BackendError, ErrorCode, Result};
use crate::session::SessionId;
use crate::session::store::{DEFAULT_LEASE_TTL, Lease, SessionRecord, SessionStore, now_ms};

/// A [`SessionStore`] in the process's memory: records survive a backend's
/// `stop` and `start` (and a backend made anew with the same store), not
/// the process. Records are kept as the bytes a file or Redis would hold.
///
/// [`MemoryStore::set_available`] makes it fail every call, as a store that
/// went away does.
#[derive(Debug)]
pub struct MemoryStore {
    records: Mutex<HashMap<SessionId, Vec<u8>>>,
    leases: Mutex<HashMap<SessionId, Lease>>,
    available: AtomicBool,
    ttl: Duration,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        MemoryStore {
            records: Mutex::new(HashMap::new()),
            leases: Mutex::new(HashMap::new()),
            available: AtomicBool::new(true),
            ttl: DEFAULT_LEASE_TTL,
        }
    }

    /// The same store with leases lasting `ttl`.
    pub fn with_lease_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Makes every call fail (`false`), as a store that went away, or work
    /// again (`true`).
    pub fn set_available(&self, available: bool) {
        self.available.store(available, Ordering::Release);
    }

    /// The bytes of every record, for checks of what is kept.
    pub fn raw(&self) -> Vec<Vec<u8>> {
        self.records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    fn check(&self, op: &'static str) -> Result<()> {
        if self.available.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(BackendError::new(
                op,
                ErrorCode::ConnectionFailed,
                "the memory store is unavailable",
            ))
        }
    }
}

#[async_trait]
impl SessionStore for MemoryStore {
    fn kind(&self) -> &str {
        "memory"
    }

    async fn save(&self, record: &SessionRecord) -> Result<()> {
        self.check("store.save")?;
        self.records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(record.id.clone(), record.to_bytes());
        Ok(())
    }

    async fn load(&self, id: &SessionId) -> Result<Option<SessionRecord>> {
        self.check("store.load")?;
        let bytes = self
            .records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned();
        bytes.map(|b| SessionRecord::from_bytes(&b)).transpose()
    }

    async fn delete(&self, id: &SessionId) -> Result<()> {
        self.check("store.delete")?;
        self.records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
        Ok(())
    }

    async fn list(&self, provider: &str) -> Result<Vec<SessionRecord>> {
        self.check("store.list")?;
        let all = self.raw();
        let mut records = Vec::new();
        for bytes in all {
            let record = SessionRecord::from_bytes(&bytes)?;
            if record.provider == provider {
                records.push(record);
            }
        }
        records.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(records)
    }

    async fn acquire(&self, id: &SessionId, owner: &str, ttl: Duration) -> Result<bool> {
        self.check("store.acquire")?;
        let now = now_ms();
        let mut leases = self.leases.lock().unwrap_or_else(PoisonError::into_inner);
        if leases.get(id).is_some_and(|l| !l.grants(owner, now)) {
            return Ok(false);
        }
        leases.insert(
            id.clone(),
            Lease {
                owner: owner.to_owned(),
                expires_ms: now + ttl.as_millis() as u64,
            },
        );
        Ok(true)
    }

    async fn release(&self, id: &SessionId, owner: &str) -> Result<()> {
        self.check("store.release")?;
        let mut leases = self.leases.lock().unwrap_or_else(PoisonError::into_inner);
        if leases.get(id).is_some_and(|l| l.owner == owner) {
            leases.remove(id);
        }
        Ok(())
    }

    fn lease_ttl(&self) -> Duration {
        self.ttl
    }
}
