//! Test doubles shared by the integration tests and benches: a provider whose
//! validation outcome is chosen by the test, and a backend that records what
//! made it.
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use voice_backends::{
    BackendError, BackendProvider, Config, ConfigSchema, ConnectionState, ErrorCode, Health,
    HealthStatus, ProviderCapabilities, SessionConfig, SessionId, VoiceBackend, VoiceSession,
};

/// How a [`DoubleProvider`] answers `validate_config`.
#[derive(Clone, Debug)]
pub enum Verdict {
    Accept,
    Reject(ErrorCode, &'static str),
}

#[derive(Debug)]
/// A provider double: counts validations and creations; backends it makes
/// carry its `tag`, so a test can tell which registration served a call.
pub struct DoubleProvider {
    pub name: String,
    pub tag: String,
    pub verdict: Verdict,
    pub validated: AtomicUsize,
    pub created: AtomicUsize,
    /// Skip counting and keep no copy of the config (for benches: no shared
    /// writes); backends made are [`LightBackend`]s.
    pub light: bool,
    /// With `light`: hand out a clone of a backend made beforehand (one per
    /// thread) instead of making one, so creating allocates nothing.
    pub premade: bool,
}

impl DoubleProvider {
    pub fn new(name: &str, tag: &str) -> Arc<Self> {
        Arc::new(Self::plain(name, tag))
    }

    pub fn plain(name: &str, tag: &str) -> Self {
        DoubleProvider {
            name: name.to_owned(),
            tag: tag.to_owned(),
            verdict: Verdict::Accept,
            validated: AtomicUsize::new(0),
            created: AtomicUsize::new(0),
            light: false,
            premade: false,
        }
    }

    /// A double for benches: no counters, no config copy.
    pub fn light(name: &str) -> Arc<Self> {
        Arc::new(Self::light_value(name))
    }

    /// A light double whose every `create_backend` allocates one
    /// [`LightBackend`] (a zero-size value: the allocation is the `Arc`'s counts).
    pub fn light_value(name: &str) -> Self {
        let mut p = Self::plain(name, name);
        p.light = true;
        p
    }

    /// A light double whose `create_backend` clones a [`LightBackend`] made
    /// beforehand, one per thread (so threads share no reference count):
    /// no allocation, one uncontended reference-count increment.
    pub fn premade_value(name: &str) -> Self {
        let mut p = Self::light_value(name);
        p.premade = true;
        p
    }

    pub fn rejecting(name: &str, code: ErrorCode, message: &'static str) -> Arc<Self> {
        Arc::new(DoubleProvider {
            name: name.to_owned(),
            tag: name.to_owned(),
            verdict: Verdict::Reject(code, message),
            validated: AtomicUsize::new(0),
            created: AtomicUsize::new(0),
            light: false,
            premade: false,
        })
    }
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct DoubleConfig {
    /// Where the double would connect.
    pub url: Option<String>,
}

impl BackendProvider for DoubleProvider {
    fn name(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> ProviderCapabilities {
        let mut caps = ProviderCapabilities::default();
        caps.max_concurrent_sessions = 7;
        caps
    }

    fn validate_config(&self, _config: &Config) -> voice_backends::Result<()> {
        if !self.light {
            self.validated.fetch_add(1, Ordering::Relaxed);
        }
        match &self.verdict {
            Verdict::Accept => Ok(()),
            Verdict::Reject(code, message) => {
                Err(BackendError::new("double.validate", *code, *message)
                    .with_detail("provider_config.url", "rejected by the double"))
            }
        }
    }

    fn create_backend(&self, config: &Config) -> voice_backends::Result<Arc<dyn VoiceBackend>> {
        if self.premade {
            thread_local! {
                static PREMADE: Arc<dyn VoiceBackend> = Arc::new(LightBackend);
            }
            return Ok(PREMADE.with(Arc::clone));
        }
        if self.light {
            return Ok(Arc::new(LightBackend));
        }
        self.created.fetch_add(1, Ordering::Relaxed);
        Ok(Arc::new(DoubleBackend {
            provider: self.tag.clone(),
            config: Mutex::new(Some(Arc::new(config.clone()))),
        }))
    }

    fn config_schema(&self) -> ConfigSchema {
        ConfigSchema::of::<DoubleConfig>(self.name.clone())
    }
}

/// A backend with no sessions; `provider()` returns the tag of its maker.
#[derive(Debug)]
pub struct DoubleBackend {
    pub provider: String,
    pub config: Mutex<Option<Arc<Config>>>,
}

#[async_trait]
impl VoiceBackend for DoubleBackend {
    fn provider(&self) -> &str {
        &self.provider
    }
    fn set_hooks(&self, _hooks: voice_backends::hooks::Hooks) {}
    async fn start(&self) -> voice_backends::Result<()> {
        Ok(())
    }
    async fn stop(&self) -> voice_backends::Result<()> {
        Ok(())
    }
    async fn create_session(
        &self,
        _config: SessionConfig,
    ) -> voice_backends::Result<Arc<dyn VoiceSession>> {
        Err(holds_no_sessions("double.create_session"))
    }
    async fn get_session(&self, id: &SessionId) -> voice_backends::Result<Arc<dyn VoiceSession>> {
        Err(no_session("double.get_session", id))
    }
    async fn list_sessions(&self) -> Vec<Arc<dyn VoiceSession>> {
        Vec::new()
    }
    async fn close_session(&self, id: &SessionId) -> voice_backends::Result<()> {
        Err(no_session("double.close_session", id))
    }
    async fn health_check(&self) -> HealthStatus {
        HealthStatus::new(Health::Healthy).with_detail("double", "ok")
    }
    fn connection_state(&self) -> ConnectionState {
        ConnectionState::Disconnected
    }
    fn active_session_count(&self) -> usize {
        0
    }
    fn config(&self) -> Arc<Config> {
        self.config
            .lock()
            .unwrap()
            .clone()
            .unwrap_or_else(|| Arc::new(Config::new(self.provider.clone())))
    }
    async fn update_config(&self, config: Config) -> voice_backends::Result<()> {
        config.validate()?;
        *self.config.lock().unwrap() = Some(Arc::new(config));
        Ok(())
    }
}

/// The backend of light doubles: holds nothing (zero-size), so an
/// `Arc<LightBackend>` is one 16-byte allocation; `provider()` is `"light"`.
#[derive(Debug)]
pub struct LightBackend;

#[async_trait]
impl VoiceBackend for LightBackend {
    fn provider(&self) -> &str {
        "light"
    }
    fn set_hooks(&self, _hooks: voice_backends::hooks::Hooks) {}
    async fn start(&self) -> voice_backends::Result<()> {
        Ok(())
    }
    async fn stop(&self) -> voice_backends::Result<()> {
        Ok(())
    }
    async fn create_session(
        &self,
        _config: SessionConfig,
    ) -> voice_backends::Result<Arc<dyn VoiceSession>> {
        Err(holds_no_sessions("light.create_session"))
    }
    async fn get_session(&self, id: &SessionId) -> voice_backends::Result<Arc<dyn VoiceSession>> {
        Err(no_session("light.get_session", id))
    }
    async fn list_sessions(&self) -> Vec<Arc<dyn VoiceSession>> {
        Vec::new()
    }
    async fn close_session(&self, id: &SessionId) -> voice_backends::Result<()> {
        Err(no_session("light.close_session", id))
    }
    async fn health_check(&self) -> HealthStatus {
        HealthStatus::new(Health::Healthy)
    }
    fn connection_state(&self) -> ConnectionState {
        ConnectionState::Disconnected
    }
    fn active_session_count(&self) -> usize {
        0
    }
    fn config(&self) -> Arc<Config> {
        Arc::new(Config::new("light"))
    }
    async fn update_config(&self, config: Config) -> voice_backends::Result<()> {
        config.validate()
    }
}

/// The error of a double's `create_session`: doubles hold no sessions.
fn holds_no_sessions(op: &'static str) -> BackendError {
    BackendError::new(
        op,
        ErrorCode::SessionLimitExceeded,
        "the double holds no sessions",
    )
}

/// The error of a double's session lookups: there is never such a session.
fn no_session(op: &'static str, id: &SessionId) -> BackendError {
    BackendError::new(op, ErrorCode::SessionNotFound, format!("no session {id}"))
}

/// A valid config: an s2s pipeline with the echo component.
pub fn valid_config(provider: &str) -> Config {
    let mut c = Config::new(provider);
    c.pipeline_type = voice_backends::PipelineType::S2s;
    c.s2s_provider = Some("echo".into());
    c
}
