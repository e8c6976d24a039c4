//! Persistence of a backend's active sessions in its [`SessionStore`]: the
//! per-session part (status, resume token, the conversation as last
//! published) and the backend's writer task.
//!
//! Nothing here runs on the audio path. A change (a session opened, its
//! metadata updated, a turn joining its history, the session closed) marks
//! the session dirty in a map keyed by session, so changes coalesce: however
//! many come while a write is under way, one write follows with the latest
//! state. One task per backend takes the dirty sessions and writes them; a
//! store that fails (or takes longer than the config's `timeout`) leaves
//! them dirty, marks the backend's health `degraded` and is retried with
//! backoff, and the sessions go on. The same task renews the leases of the
//! sessions the backend runs and retries a restore that could not read the
//! store at `start`.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use tokio::sync::Notify;

use super::Inner;
use super::session::RuntimeSession;
use crate::agent::Message;
use crate::config::{Secret, SessionConfig};
use crate::error::{BackendError, ErrorCode, Result};
use crate::session::store::{SessionRecord, SessionStore, StoredInfo, StoredMessage, now_ms};
use crate::session::{PersistenceStatus, SessionId};

/// The longest wait between two retries of a failing store.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// The first wait after a failure.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// A new resume token: 32 bytes from the OS's CSPRNG, in hex.
pub(super) fn new_resume_token() -> Result<Secret> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| {
        BackendError::new(
            "backend.create_session",
            ErrorCode::PipelineError,
            format!("no randomness for the session's resume token: {e}"),
        )
    })?;
    Ok(Secret::new(hex(&bytes)))
}

/// The SHA-256 of `token`, in hex: what the store keeps.
pub(super) fn token_hash(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

/// Whether `token` hashes to `expected` (hex), compared in constant time.
pub(super) fn token_matches(token: &str, expected: &str) -> bool {
    use subtle::ConstantTimeEq;
    let got = token_hash(token);
    got.len() == expected.len() && bool::from(got.as_bytes().ct_eq(expected.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// A session's part in persistence.
pub(super) struct SessionPersist {
    pub(super) status: Mutex<PersistenceStatus>,
    /// The token handed to the session's user; `None` for a restored
    /// session (only its hash was kept).
    pub(super) token: Option<Secret>,
    pub(super) token_hash: String,
    /// The provider of the session's backend.
    pub(super) provider: String,
    /// The session's config as kept: no auth token, agent or metadata.
    pub(super) config: SessionConfig,
    /// The retention hook allowed keeping the session's metadata.
    pub(super) keep_metadata: bool,
    /// The conversation as the session's task last published it.
    pub(super) history: Mutex<Arc<[Message]>>,
    pub(super) revision: AtomicU64,
}

impl fmt::Debug for SessionPersist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionPersist")
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

impl SessionPersist {
    pub(super) fn new(
        provider: &str,
        config: &SessionConfig,
        token: Option<Secret>,
        token_hash: String,
        keep_metadata: bool,
        history: Arc<[Message]>,
    ) -> Self {
        let mut kept = config.clone();
        kept.auth_token = None;
        kept.agent = None;
        kept.metadata.clear();
        SessionPersist {
            status: Mutex::new(PersistenceStatus::Pending),
            token,
            token_hash,
            provider: provider.to_owned(),
            config: kept,
            keep_metadata,
            history: Mutex::new(history),
            revision: AtomicU64::new(0),
        }
    }

    pub(super) fn status(&self) -> PersistenceStatus {
        self.status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_status(&self, status: PersistenceStatus) {
        *self.status.lock().unwrap_or_else(PoisonError::into_inner) = status;
    }
}

/// What the writer task has to do for a session.
enum Pending {
    /// Write the session's record (built when written: the latest state).
    Save(Weak<RuntimeSession>),
    /// The session was closed: delete its record and let go of its lease.
    Delete,
    /// The session stopped with its backend: keep the record, let go of the
    /// lease (the next `start`, here or elsewhere, takes it up).
    Release,
    /// As `Release`, but the session stopped before its last change was
    /// written: write this record (taken when it stopped) first.
    Keep(Box<SessionRecord>),
}

/// A backend's persistence: its store, its lease identity and the writer
/// task's work.
pub(super) struct Persistence {
    pub(super) store: Arc<dyn SessionStore>,
    /// This backend's identity as a lease holder.
    pub(super) owner: String,
    pub(super) ttl: Duration,
    dirty: Mutex<HashMap<SessionId, Pending>>,
    wake: Notify,
    /// Writes under way (taken from `dirty`, not finished).
    busy: AtomicU64,
    /// Why the store last failed, while it fails.
    failing: Mutex<Option<String>>,
    /// A restore is still to be done (the store failed at `start`).
    pub(super) restore_due: AtomicBool,
    /// The writer task runs.
    running: AtomicBool,
}

impl fmt::Debug for Persistence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Persistence")
            .field("store", &self.store.kind())
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

impl Persistence {
    pub(super) fn new(store: Arc<dyn SessionStore>) -> Result<Self> {
        let owner = new_resume_token()?.expose()[..16].to_owned();
        Ok(Persistence {
            ttl: store.lease_ttl(),
            store,
            owner,
            dirty: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            busy: AtomicU64::new(0),
            failing: Mutex::new(None),
            restore_due: AtomicBool::new(false),
            running: AtomicBool::new(false),
        })
    }

    fn dirty(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Pending>> {
        self.dirty.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The session changed: its record is to be written.
    pub(super) fn save(&self, session: &Arc<RuntimeSession>) {
        let Some(p) = &session.persist else { return };
        {
            let mut dirty = self.dirty();
            // A close already asked for wins over a late change.
            if matches!(
                dirty.get(&session.id),
                Some(Pending::Delete | Pending::Release | Pending::Keep(_))
            ) {
                return;
            }
            dirty.insert(session.id.clone(), Pending::Save(Arc::downgrade(session)));
        }
        if !matches!(p.status(), PersistenceStatus::Failed { .. }) {
            p.set_status(PersistenceStatus::Pending);
        }
        self.wake.notify_one();
    }

    /// The session ended: its record is deleted (`keep` false) or kept for
    /// the next start (`keep`), and its lease let go of.
    pub(super) fn ended(&self, session: &RuntimeSession, keep: bool) {
        let Some(p) = &session.persist else { return };
        {
            let mut dirty = self.dirty();
            let pending = match (keep, dirty.get(&session.id)) {
                (false, _) => Pending::Delete,
                // Its last change is not written yet and the session is going
                // away: what it holds now is written before the lease goes.
                (true, Some(Pending::Save(_))) => Pending::Keep(Box::new(session.record())),
                (true, _) => Pending::Release,
            };
            dirty.insert(session.id.clone(), pending);
        }
        if !keep {
            p.set_status(PersistenceStatus::Ephemeral);
        }
        self.wake.notify_one();
    }

    /// Why the store fails, while it does.
    pub(super) fn failing(&self) -> Option<String> {
        self.failing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(super) fn set_failing(&self, reason: Option<String>) {
        let mut failing = self.failing.lock().unwrap_or_else(PoisonError::into_inner);
        match (&*failing, &reason) {
            (None, Some(r)) => {
                tracing::warn!(store = self.store.kind(), "the session store fails: {r}")
            }
            (Some(_), None) => {
                tracing::info!(store = self.store.kind(), "the session store works again")
            }
            _ => {}
        }
        *failing = reason;
    }

    /// Waits until every change made so far is written (or `limit` passed).
    pub(super) async fn flush(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while (!self.dirty().is_empty() || self.busy.load(Ordering::Acquire) > 0)
            && tokio::time::Instant::now() < deadline
        {
            self.wake.notify_one();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Starts the writer task of `inner`'s backend, once.
    pub(super) fn spawn_writer(self: &Arc<Self>, inner: Weak<Inner>) {
        if self.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            this.writer(inner).await;
            this.running.store(false, Ordering::Release);
        });
    }

    async fn writer(&self, inner: Weak<Inner>) {
        let mut backoff = FIRST_BACKOFF;
        let mut next_renew = tokio::time::Instant::now() + self.ttl / 3;
        loop {
            let Some(backend) = inner.upgrade() else {
                return;
            };
            let timeout = backend.config().timeout;
            let mut ok = true;
            if tokio::time::Instant::now() >= next_renew {
                next_renew = tokio::time::Instant::now() + self.ttl / 3;
                ok &= self.renew(&backend, timeout).await;
            }
            if self.restore_due.load(Ordering::Acquire) {
                match backend.restore(timeout).await {
                    Ok(()) => self.restore_due.store(false, Ordering::Release),
                    Err(e) => {
                        self.set_failing(Some(e.message.clone()));
                        ok = false;
                    }
                }
            }
            let batch: Vec<(SessionId, Pending)> = {
                let mut dirty = self.dirty();
                self.busy.store(dirty.len() as u64, Ordering::Release);
                dirty.drain().collect()
            };
            for (id, pending) in batch {
                if ok {
                    ok = self.write(&id, &pending, timeout).await;
                }
                if !ok {
                    // Not written (this write failed, or an earlier one did
                    // and the store is taken to be away): the session says
                    // so, and the change is kept for the retry unless a
                    // newer one came.
                    if let Pending::Save(weak) = &pending
                        && let Some(s) = weak.upgrade()
                        && let Some(p) = &s.persist
                        && let Some(reason) = self.failing()
                    {
                        p.set_status(PersistenceStatus::Failed { reason });
                    }
                    self.dirty().entry(id).or_insert(pending);
                }
                self.busy.fetch_sub(1, Ordering::AcqRel);
            }
            drop(backend);
            if ok && !self.restore_due.load(Ordering::Acquire) {
                backoff = FIRST_BACKOFF;
                if self.dirty().is_empty() {
                    let renew_in =
                        next_renew.saturating_duration_since(tokio::time::Instant::now());
                    let _ = tokio::time::timeout(renew_in, self.wake.notified()).await;
                }
                continue;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Does one pending write; whether the store took it.
    async fn write(&self, id: &SessionId, pending: &Pending, timeout: Duration) -> bool {
        let session = match pending {
            Pending::Save(weak) => match weak.upgrade() {
                Some(s) => Some(s),
                None => return true,
            },
            _ => None,
        };
        let store = &self.store;
        let work = async {
            match (pending, &session) {
                (Pending::Save(_), Some(s)) => {
                    // The lease first: a session another instance took up
                    // is not written over.
                    if !store.acquire(id, &self.owner, self.ttl).await? {
                        self.lost(s.clone());
                        return Ok(());
                    }
                    store.save(&s.record()).await
                }
                (Pending::Delete, _) => {
                    store.delete(id).await?;
                    store.release(id, &self.owner).await
                }
                (Pending::Keep(record), _) => {
                    if store.acquire(id, &self.owner, self.ttl).await? {
                        store.save(record).await?;
                        store.release(id, &self.owner).await?;
                    }
                    Ok(())
                }
                (Pending::Release, _) => store.release(id, &self.owner).await,
                _ => Ok(()),
            }
        };
        let result = match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(BackendError::new(
                "store.write",
                ErrorCode::Timeout,
                format!(
                    "the {} session store did not answer within {}",
                    store.kind(),
                    humantime::format_duration(timeout)
                ),
            )),
        };
        match result {
            Ok(()) => {
                self.set_failing(None);
                if let Some(s) = &session
                    && let Some(p) = &s.persist
                {
                    p.set_status(PersistenceStatus::Persisted {
                        saved_at: SystemTime::now(),
                    });
                }
                true
            }
            Err(e) => {
                let reason = format!("{}: {}", e.code, e.message);
                if let Some(s) = &session
                    && let Some(p) = &s.persist
                {
                    p.set_status(PersistenceStatus::Failed {
                        reason: reason.clone(),
                    });
                }
                self.set_failing(Some(reason));
                false
            }
        }
    }

    /// Renews the leases of the sessions `backend` runs. A session whose
    /// lease another instance holds now (it expired while the store was
    /// away, and that instance took the session up) stops here, its record
    /// kept. Whether the store answered.
    async fn renew(&self, backend: &Arc<Inner>, timeout: Duration) -> bool {
        for session in backend.sessions_snapshot() {
            if session.persist.is_none() {
                continue;
            }
            let granted = tokio::time::timeout(
                timeout,
                self.store.acquire(&session.id, &self.owner, self.ttl),
            )
            .await;
            match granted {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => self.lost(session),
                Ok(Err(e)) => {
                    self.set_failing(Some(format!("{}: {}", e.code, e.message)));
                    return false;
                }
                Err(_) => {
                    self.set_failing(Some(format!(
                        "the {} session store did not answer within {}",
                        self.store.kind(),
                        humantime::format_duration(timeout)
                    )));
                    return false;
                }
            }
        }
        true
    }
}

impl Persistence {
    /// Another instance holds the session's lease now (it expired while the
    /// store was away, and that instance took the session up): the session
    /// stops here, its record kept.
    fn lost(&self, session: Arc<RuntimeSession>) {
        tracing::warn!(session_id = %session.id, "another instance runs the session now: stopping it here");
        session.keep_record.store(true, Ordering::Release);
        tokio::spawn(async move {
            let _ = crate::session::VoiceSession::stop(&*session).await;
        });
    }

    /// Wakes the writer task (its backend is gone: it ends).
    pub(super) fn wake(&self) {
        self.wake.notify_one();
    }
}

impl RuntimeSession {
    /// The session's record as of now.
    pub(super) fn record(&self) -> SessionRecord {
        let p = self
            .persist
            .as_ref()
            .expect("only persisted sessions are written");
        let history = p
            .history
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        SessionRecord {
            id: self.id.clone(),
            provider: p.provider.clone(),
            user_id: self.user_id.clone(),
            config: p.config.clone(),
            metadata: if p.keep_metadata {
                self.metadata
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone()
            } else {
                Default::default()
            },
            state: self.engine.state(),
            history: history.iter().map(StoredMessage::from).collect(),
            info: self
                .info
                .entries()
                .into_iter()
                .map(|(k, value, secret)| (k, StoredInfo { value, secret }))
                .collect(),
            resume_token_sha256: Some(p.token_hash.clone()),
            revision: p.revision.fetch_add(1, Ordering::AcqRel) + 1,
            saved_at_ms: now_ms(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_their_hash_only() {
        let token = new_resume_token().unwrap();
        assert_eq!(token.expose().len(), 64);
        let hash = token_hash(token.expose());
        assert!(token_matches(token.expose(), &hash));
        assert!(!token_matches("nope", &hash));
        assert!(!token_matches(token.expose(), "short"));
        assert_ne!(new_resume_token().unwrap().expose(), token.expose());
    }
}
