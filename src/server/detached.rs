//! The resume window: a session whose client went away without a close is
//! detached rather than stopped. It runs on for
//! [`ServerConfig::resume_window`](super::ServerConfig::resume_window), its
//! reply audio going nowhere; a `resume` within the window takes it up
//! ([`Detached::claim`]), and once the window ends it is stopped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::task::AbortHandle;

use super::Shared;
use super::metrics::ServerMetrics;
use crate::session::{SessionEvent, SessionEvents, SessionId, VoiceSession};

/// How long a session's mark stays once it has stopped, so that a `resume`
/// racing the stop is refused (not given the session from the store, whose
/// record the stop is deleting) and told why.
const MARK_AFTER_STOP: Duration = Duration::from_secs(5);

/// The sessions in their resume window, and those stopped a moment ago (so
/// a late `resume` is told why it is refused).
#[derive(Debug, Default)]
pub(super) struct Detached {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    sessions: HashMap<SessionId, Entry>,
    /// The server is shutting down: nothing more is detached.
    closed: bool,
    /// Numbers the windows, so a timer acts on its own window only (a
    /// session may be detached, taken up and detached again).
    next: u64,
}

#[derive(Debug)]
struct Entry {
    window: u64,
    /// The window's task: its timer, then the stop. `None` for a session
    /// stopped without a window.
    timer: Option<AbortHandle>,
    /// The session while its window runs; `None` once it is stopping.
    session: Option<Arc<dyn VoiceSession>>,
}

/// What a `resume` finds of a session's window.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Claim {
    /// The session was detached: its window's timer is cancelled and the
    /// resuming connection has it.
    Taken,
    /// The session was not detached here (restored from the store, or made
    /// by another instance).
    NotDetached,
    /// The session's window ended, or it was stopped without one: it is
    /// stopped, or stopping.
    Ended,
}

impl Detached {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Detaches `session` for the server's resume window: a task of the
    /// current runtime waits out the window and stops the session unless a
    /// `resume` claims it first, or the session closes by itself. Gives the
    /// session back when the server is shutting down (the caller stops it).
    pub(super) fn detach(
        shared: &Arc<Shared>,
        session: Arc<dyn VoiceSession>,
    ) -> std::result::Result<(), Arc<dyn VoiceSession>> {
        // Subscribed now, so a close that comes before the task runs is seen.
        let events = session.events();
        let mut inner = shared.detached.lock();
        if inner.closed {
            return Err(session);
        }
        inner.next += 1;
        let window = inner.next;
        let timer =
            tokio::spawn(wait_out(shared.clone(), session.clone(), events, window)).abort_handle();
        let previous = inner.sessions.insert(
            session.id().clone(),
            Entry {
                window,
                timer: Some(timer),
                session: Some(session),
            },
        );
        shared.metrics.detached();
        if let Some(previous) = previous {
            // A window that had ended and was waiting to be forgotten.
            if let Some(timer) = previous.timer {
                timer.abort();
            }
            if previous.session.is_some() {
                shared.metrics.reattached_or_gone();
            }
        }
        Ok(())
    }

    /// Stops `session`, whose connection ended without a window for it, on
    /// a task of its own. Until it has stopped, a `resume` of it is refused,
    /// rather than given a session that is about to close.
    pub(super) fn stop(shared: &Arc<Shared>, session: Arc<dyn VoiceSession>) {
        let id = session.id().clone();
        let window = {
            let mut inner = shared.detached.lock();
            if inner.closed || inner.sessions.contains_key(&id) {
                None
            } else {
                inner.next += 1;
                let window = inner.next;
                inner.sessions.insert(
                    id.clone(),
                    Entry {
                        window,
                        timer: None,
                        session: None,
                    },
                );
                Some(window)
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = session.stop().await {
                tracing::warn!(session_id = %id, code = %e.code, "stopping a session: {}", e.message);
            }
            if let Some(window) = window {
                tokio::time::sleep(MARK_AFTER_STOP).await;
                shared.detached.forget(&id, window, &shared.metrics);
            }
        });
    }

    /// Claims session `id` for a resuming connection (which holds its audio
    /// now): cancels its window, unless it has ended.
    pub(super) fn claim(&self, id: &SessionId, metrics: &ServerMetrics) -> Claim {
        let mut inner = self.lock();
        match inner.sessions.get(id) {
            None => Claim::NotDetached,
            Some(entry) if entry.session.is_none() => Claim::Ended,
            Some(_) => {
                if let Some(entry) = inner.sessions.remove(id) {
                    if let Some(timer) = entry.timer {
                        timer.abort();
                    }
                    metrics.reattached_or_gone();
                }
                Claim::Taken
            }
        }
    }

    /// Ends window `window` of session `id`: `true` if it was still waiting
    /// (the caller stops the session), `false` if it was claimed meanwhile.
    fn expire(&self, id: &SessionId, window: u64, metrics: &ServerMetrics) -> bool {
        let mut inner = self.lock();
        match inner.sessions.get_mut(id) {
            Some(entry) if entry.window == window && entry.session.is_some() => {
                entry.session = None;
                metrics.reattached_or_gone();
                true
            }
            _ => false,
        }
    }

    /// Forgets window `window` of session `id`, if it is still the
    /// session's.
    fn forget(&self, id: &SessionId, window: u64, metrics: &ServerMetrics) {
        let mut inner = self.lock();
        if inner.sessions.get(id).is_some_and(|e| e.window == window)
            && let Some(entry) = inner.sessions.remove(id)
            && entry.session.is_some()
        {
            metrics.reattached_or_gone();
        }
    }

    /// Shutting down: detaches nothing more, cancels every window, and
    /// gives back the sessions that were in one, for the caller to stop.
    pub(super) fn close(&self, metrics: &ServerMetrics) -> Vec<Arc<dyn VoiceSession>> {
        let mut inner = self.lock();
        inner.closed = true;
        inner
            .sessions
            .drain()
            .filter_map(|(_, entry)| {
                if let Some(timer) = entry.timer {
                    timer.abort();
                }
                let session = entry.session?;
                metrics.reattached_or_gone();
                Some(session)
            })
            .collect()
    }
}

/// Waits out window `window` of `session`: stops the session when it ends
/// unclaimed, then keeps the window's mark for [`MARK_AFTER_STOP`].
async fn wait_out(
    shared: Arc<Shared>,
    session: Arc<dyn VoiceSession>,
    mut events: SessionEvents,
    window: u64,
) {
    let length = shared.config.resume_window;
    let id = session.id().clone();
    let closed_by_itself = tokio::select! {
        () = tokio::time::sleep(length) => false,
        () = closed(&mut events) => true,
    };
    drop(events);
    if closed_by_itself {
        shared.detached.forget(&id, window, &shared.metrics);
        return;
    }
    if !shared.detached.expire(&id, window, &shared.metrics) {
        return;
    }
    shared.metrics.window_expired();
    tracing::info!(
        session_id = %id,
        "no resume within {}: stopping the session",
        humantime::format_duration(length)
    );
    if let Err(e) = session.stop().await {
        tracing::warn!(session_id = %id, code = %e.code, "stopping a session: {}", e.message);
    }
    drop(session);
    tokio::time::sleep(MARK_AFTER_STOP).await;
    shared.detached.forget(&id, window, &shared.metrics);
}

/// Resolves once the session has closed.
async fn closed(events: &mut SessionEvents) {
    loop {
        match events.recv().await {
            Some(SessionEvent::Closed) | None => return,
            Some(_) => {}
        }
    }
}
