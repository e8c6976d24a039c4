//! [`RuntimeSession`]: a session of a [`RuntimeBackend`](super::RuntimeBackend),
//! its engine and its way out of the backend's table.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use tracing::Instrument;

use super::Inner;
use crate::agent::Agent;
use crate::audio::AudioFrame;
use crate::error::{BackendError, ErrorCode, Result};
use crate::metrics::{Metrics, Op, PROCESS_AUDIO_LATENCY_SAMPLE};
use crate::pipeline::engine::Engine;
use crate::session::events::SessionEvents;
use crate::session::{
    AudioReceiver, PersistenceStatus, PipelineState, ProcessAudio, SessionId, SessionInfo,
    VoiceSession,
};

/// A session of a [`RuntimeBackend`](super::RuntimeBackend).
///
/// Laid out in order (`repr(C)`), what `process_audio` uses first (then the
/// engine's own input state), so a frame touches as few cache lines as
/// possible.
#[repr(C)]
pub struct RuntimeSession {
    pub(super) backend: Weak<Inner>,
    /// `process_audio` calls so far, to time one in [`PROCESS_AUDIO_LATENCY_SAMPLE`].
    pub(super) frames: AtomicU64,
    pub(super) engine: Engine,
    pub(super) id: SessionId,
    pub(super) user_id: String,
    pub(super) metadata: RwLock<BTreeMap<String, serde_json::Value>>,
    pub(super) timeout: Duration,
    /// What the provider published for the application.
    pub(super) info: SessionInfo,
    /// The session's media goes through a [`MediaLink`]: its reply audio is
    /// the link's.
    pub(super) media: bool,
    /// Its part in persistence, when it is kept in the backend's store.
    pub(super) persist: Option<super::persist::SessionPersist>,
    /// Its record stays when it ends (another instance took it up).
    pub(super) keep_record: std::sync::atomic::AtomicBool,
}

impl fmt::Debug for RuntimeSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RuntimeSession")
            .field("id", &self.id)
            .field("user_id", &self.user_id)
            .field("state", &self.engine.state())
            .finish_non_exhaustive()
    }
}

impl RuntimeSession {
    fn metrics(&self) -> Option<Arc<Metrics>> {
        self.backend.upgrade().map(|b| b.metrics.clone())
    }

    fn timed<T>(&self, op: Op, f: impl FnOnce() -> Result<T>) -> Result<T> {
        match self.metrics() {
            Some(m) => {
                let timer = m.observe(op);
                let r = f();
                timer.finish(&r);
                r
            }
            None => f(),
        }
    }
}

/// Takes a stopping session out of its backend's table. If the caller of
/// `stop` gives up waiting (its future is dropped), the stop it asked for
/// goes on, and the session leaves the table once it has ended (or after
/// the stop's deadline), so it does not hold a place of the backend's
/// capacity for good.
struct Removal<'a> {
    session: &'a RuntimeSession,
    pending: bool,
}

impl Removal<'_> {
    fn now(&mut self) {
        self.pending = false;
        if let Some(b) = self.session.backend.upgrade() {
            b.remove_session(&self.session.id);
        }
    }
}

impl Drop for Removal<'_> {
    fn drop(&mut self) {
        if !self.pending {
            return;
        }
        let (backend, id) = (self.session.backend.clone(), self.session.id.clone());
        let remove = move || {
            if let Some(b) = backend.upgrade() {
                b.remove_session(&id);
            }
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return remove();
        };
        let mut ended = self.session.engine.ended();
        // As long as `stop` itself waits, and a little more.
        let patience = self.session.timeout + Duration::from_secs(2);
        runtime.spawn(async move {
            let _ = tokio::time::timeout(patience, ended.wait_for(|&e| e)).await;
            remove();
        });
    }
}

#[async_trait]
impl VoiceSession for RuntimeSession {
    fn id(&self) -> &SessionId {
        &self.id
    }

    fn user_id(&self) -> &str {
        &self.user_id
    }

    async fn start(&self) -> Result<()> {
        let span = tracing::info_span!("session.start", session_id = %self.id);
        let _g = span.enter();
        self.engine.start()
    }

    async fn stop(&self) -> Result<()> {
        let span = tracing::info_span!("session.stop", session_id = %self.id);
        let mut removal = Removal {
            session: self,
            pending: true,
        };
        let result = self.engine.stop(self.timeout).instrument(span).await;
        removal.now();
        result
    }

    fn process_audio(&self, frame: AudioFrame) -> ProcessAudio<'_> {
        // The input path runs inline, here: the future is ready at once and
        // nothing is allocated per frame.
        // Every call is counted; one in PROCESS_AUDIO_LATENCY_SAMPLE is timed.
        // The engine's metrics are the backend's: no reference count to touch.
        // A span per frame, at `trace` level: a check of one flag when off.
        let span = tracing::trace_span!("session.process_audio", session_id = %self.id);
        let _entered = span.enter();
        let metrics = self.engine.metrics();
        if self
            .frames
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(PROCESS_AUDIO_LATENCY_SAMPLE)
        {
            let timer = metrics.observe(Op::ProcessAudio);
            let r = self.engine.process_audio(frame);
            timer.finish(&r);
            return ProcessAudio::ready(r);
        }
        let r = self.engine.process_audio(frame);
        metrics.request(Op::ProcessAudio);
        if let Err(e) = &r {
            metrics.error(Op::ProcessAudio, e.code);
        }
        ProcessAudio::ready(r)
    }

    #[tracing::instrument(name = "session.send_audio", level = "trace", skip_all, fields(session_id = %self.id))]
    async fn send_audio(&self, frame: AudioFrame) -> Result<()> {
        let metrics = self.metrics();
        let timer = metrics.as_ref().map(|m| m.observe(Op::SendAudio));
        let r = self.engine.send_audio(frame).await;
        if let Some(t) = timer {
            t.finish(&r);
        }
        r
    }

    #[tracing::instrument(name = "session.receive_audio", skip_all, fields(session_id = %self.id))]
    fn receive_audio(&self) -> Result<AudioReceiver> {
        if self.media {
            return Err(BackendError::new(
                "session.receive_audio",
                ErrorCode::PipelineError,
                "the session's reply audio goes to its provider's media link",
            ));
        }
        self.engine.take_receiver()
    }

    fn info(&self) -> SessionInfo {
        self.info.clone()
    }

    #[tracing::instrument(name = "session.send_text", skip_all, fields(session_id = %self.id))]
    async fn send_text(&self, text: &str) -> Result<()> {
        self.timed(Op::SendText, || self.engine.send_text(text))
    }

    fn events(&self) -> SessionEvents {
        self.engine.subscribe()
    }

    fn set_agent(&self, agent: Arc<dyn Agent>) {
        self.engine.set_agent(agent);
    }

    fn state(&self) -> PipelineState {
        self.engine.state()
    }

    fn persistence_status(&self) -> PersistenceStatus {
        self.persist
            .as_ref()
            .map_or(PersistenceStatus::Ephemeral, |p| p.status())
    }

    fn resume_token(&self) -> Option<crate::config::Secret> {
        self.persist.as_ref().and_then(|p| p.token.clone())
    }

    fn metadata(&self) -> BTreeMap<String, serde_json::Value> {
        self.metadata
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    #[tracing::instrument(name = "session.update_metadata", skip_all, fields(session_id = %self.id))]
    async fn update_metadata(&self, metadata: BTreeMap<String, serde_json::Value>) -> Result<()> {
        {
            let mut current = self
                .metadata
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            for (k, v) in metadata {
                if v.is_null() {
                    current.remove(&k);
                } else {
                    current.insert(k, v);
                }
            }
        }
        if self.persist.is_some()
            && let Some(backend) = self.backend.upgrade()
            && let Some(p) = backend.persistence.load_full()
            && let Some(me) = backend
                .sessions
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&self.id)
                .cloned()
        {
            p.save(&me);
        }
        Ok(())
    }
}
