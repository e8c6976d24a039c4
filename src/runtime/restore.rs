//! A backend's side of persistence: what a session keeps, taking up the
//! sessions a store holds (on `start` and on resume), under capacity.

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use super::{Inner, Reservation, RuntimeSession, persist};
use crate::config::{Secret, SessionConfig};
use crate::error::{BackendError, ErrorCode, Result};
use crate::session::SessionId;
use crate::session::store::SessionRecord;

impl Inner {
    /// A session's part in persistence, when the backend has a store and
    /// the retention hook lets the session be kept: a new session gets a
    /// resume token, a restored one keeps its record's.
    pub(super) async fn session_persist(
        &self,
        id: &SessionId,
        config: &SessionConfig,
        restore: Option<&SessionRecord>,
    ) -> Result<Option<persist::SessionPersist>> {
        if self.persistence.load().is_none() {
            return Ok(None);
        }
        let (keep_state, keep_metadata) = match self.hooks().retention {
            None => (true, true),
            Some(hook) => {
                use crate::hooks::DataKind;
                let limit = self.config().timeout;
                let ask = |kind| {
                    let hook = hook.clone();
                    let id = id.clone();
                    async move {
                        matches!(
                            tokio::time::timeout(limit, hook.should_retain(&id, kind)).await,
                            Ok(true)
                        )
                    }
                };
                (
                    ask(DataKind::SessionState).await,
                    ask(DataKind::Metadata).await,
                )
            }
        };
        if !keep_state {
            return Ok(None);
        }
        let (token, hash, history) = match restore {
            Some(r) => (
                None,
                r.resume_token_sha256.clone().unwrap_or_default(),
                r.messages().into(),
            ),
            None => {
                let token = persist::new_resume_token()?;
                let hash = persist::token_hash(token.expose());
                (Some(token), hash, Arc::from([]))
            }
        };
        Ok(Some(persist::SessionPersist::new(
            &self.provider,
            config,
            token,
            hash,
            keep_metadata,
            history,
        )))
    }

    /// Puts a session built from a record into the table, under capacity.
    pub(super) fn admit(&self, session: &Arc<RuntimeSession>) -> Result<()> {
        const OP: &str = "backend.resume_session";
        let cap = self.capacity();
        let Some(place) = Reservation::take(&self.open, cap) else {
            return Err(BackendError::new(
                OP,
                ErrorCode::SessionLimitExceeded,
                format!("the backend is at its capacity of {cap} sessions"),
            ));
        };
        let mut sessions = self
            .sessions
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if sessions.contains_key(&session.id) {
            return Err(BackendError::new(
                OP,
                ErrorCode::ConnectionFailed,
                format!("session {} is already running here", session.id),
            ));
        }
        self.metrics.session_opened();
        sessions.insert(session.id.clone(), session.clone());
        drop(sessions);
        place.keep();
        Ok(())
    }

    /// Builds the session of `record`, whose lease this backend holds, and
    /// runs it here.
    pub(super) async fn take_up(
        self: &Arc<Self>,
        record: &SessionRecord,
    ) -> Result<Arc<RuntimeSession>> {
        let mut config = record.config.clone();
        config.metadata = record.metadata.clone();
        config.user_id = record.user_id.clone();
        let session = self.build_session(config, Some(record)).await?;
        self.admit(&session)?;
        if let Some(p) = self.persistence.load_full() {
            p.save(&session);
        }
        tracing::info!(session_id = %session.id, messages = record.history.len(), "session restored");
        Ok(session)
    }

    /// Restores the sessions the store holds for this provider that no live
    /// instance runs (their lease is free or expired).
    pub(super) async fn restore(self: &Arc<Self>, timeout: std::time::Duration) -> Result<()> {
        let Some(p) = self.persistence.load_full() else {
            return Ok(());
        };
        let store_error = |what: &str| {
            BackendError::new(
                "backend.restore",
                ErrorCode::ConnectionFailed,
                format!(
                    "the {} session store did not answer within {} ({what})",
                    p.store.kind(),
                    humantime::format_duration(timeout)
                ),
            )
        };
        let records = tokio::time::timeout(timeout, p.store.list(&self.provider))
            .await
            .map_err(|_| store_error("listing sessions"))??;
        for record in records {
            if !self.accepting.load(Ordering::Acquire) {
                break;
            }
            let running = self
                .sessions
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .contains_key(&record.id);
            if running {
                continue;
            }
            let granted =
                tokio::time::timeout(timeout, p.store.acquire(&record.id, &p.owner, p.ttl))
                    .await
                    .map_err(|_| store_error("taking a lease"))??;
            if !granted {
                continue;
            }
            if let Err(e) = self.take_up(&record).await {
                tracing::warn!(session_id = %record.id, code = %e.code, "a kept session could not be restored: {}", e.message);
                let _ = p.store.release(&record.id, &p.owner).await;
                if e.code == ErrorCode::SessionLimitExceeded {
                    break;
                }
            }
        }
        Ok(())
    }
}

impl Inner {
    /// Takes up session `id` for its client holding `token`: the session
    /// running here, or its record in the store (see
    /// [`VoiceBackend::resume_session`](crate::VoiceBackend::resume_session)).
    pub(super) async fn resume(
        self: &Arc<Self>,
        id: &SessionId,
        token: &Secret,
    ) -> Result<Arc<RuntimeSession>> {
        const OP: &str = "backend.resume_session";
        let refused = || {
            BackendError::new(
                OP,
                ErrorCode::AuthenticationFailed,
                format!("the resume token is not session {id}'s"),
            )
        };
        let not_found = || {
            BackendError::new(
                OP,
                ErrorCode::SessionNotFound,
                format!("no active session {id} to resume (closed, completed or never opened)"),
            )
        };
        let Some(p) = self.persistence.load_full() else {
            return Err(not_found());
        };
        if !self.accepting.load(Ordering::Acquire) {
            return Err(BackendError::new(
                OP,
                ErrorCode::ConnectionFailed,
                format!("the backend is {}; it resumes no sessions", self.state()),
            ));
        }
        let running = self
            .sessions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned();
        if let Some(session) = running {
            let Some(sp) = &session.persist else {
                return Err(not_found());
            };
            if !persist::token_matches(token.expose(), &sp.token_hash) {
                return Err(refused());
            }
            return Ok(session);
        }
        let timeout = self.config().timeout;
        let unavailable = |e: BackendError| {
            BackendError::new(
                OP,
                ErrorCode::ConnectionFailed,
                format!("the session store cannot be read: {}", e.message),
            )
        };
        let record = tokio::time::timeout(timeout, p.store.load(id))
            .await
            .map_err(|_| {
                BackendError::new(
                    OP,
                    ErrorCode::ConnectionTimeout,
                    "the session store did not answer",
                )
            })?
            .map_err(unavailable)?
            .filter(|r| r.provider == self.provider)
            .ok_or_else(not_found)?;
        let hash = record.resume_token_sha256.as_deref().unwrap_or_default();
        if !persist::token_matches(token.expose(), hash) {
            return Err(refused());
        }
        let granted = tokio::time::timeout(timeout, p.store.acquire(id, &p.owner, p.ttl))
            .await
            .map_err(|_| {
                BackendError::new(
                    OP,
                    ErrorCode::ConnectionTimeout,
                    "the session store did not answer",
                )
            })?
            .map_err(unavailable)?;
        if !granted {
            return Err(BackendError::new(
                OP,
                ErrorCode::ConnectionFailed,
                format!("session {id} runs on another instance; retry once it lets go of it"),
            ));
        }
        match self.take_up(&record).await {
            Ok(session) => Ok(session),
            Err(e) => {
                let _ = p.store.release(id, &p.owner).await;
                Err(e.with_op(OP))
            }
        }
    }
}
