//! Building configs in code: [`Config::new`], [`Config::builder`] and the
//! chainable `SessionConfig::with_*` setters.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::{
    Config, DEFAULT_LATENCY_TARGET, DEFAULT_MAX_CONCURRENT_SESSIONS, DEFAULT_MAX_RETRIES,
    DEFAULT_RETRY_DELAY, DEFAULT_TIMEOUT, LogLevel, PipelineOverride, PipelineType,
    ProcessorConfig, ProviderSection, Secret, SessionConfig, Transport, Violations,
};
use crate::agent::Agent;
use crate::error::BackendError;

impl Config {
    /// A config for `provider` with every other field at its default
    /// (`stt_tts` pipeline without components, 500ms latency target, 30s
    /// timeout, 3 retries 1s apart, 100 sessions, tracing, metrics and logging
    /// on at level `info`, no processors, empty provider section).
    ///
    /// It is not validated: the default `stt_tts` pipeline still needs its
    /// components. Use [`Config::builder`] to set fields and validate in one go.
    pub fn new(provider: impl Into<String>) -> Config {
        Config {
            provider: provider.into(),
            provider_config: ProviderSection::default(),
            pipeline_type: PipelineType::default(),
            stt_provider: None,
            tts_provider: None,
            s2s_provider: None,
            stt_fallbacks: Vec::new(),
            tts_fallbacks: Vec::new(),
            s2s_fallbacks: Vec::new(),
            failover: super::FailoverConfig::default(),
            vad_provider: None,
            turn_detection_provider: None,
            noise_cancellation_provider: None,
            latency_target: DEFAULT_LATENCY_TARGET,
            timeout: DEFAULT_TIMEOUT,
            max_retries: DEFAULT_MAX_RETRIES,
            retry_delay: DEFAULT_RETRY_DELAY,
            max_concurrent_sessions: DEFAULT_MAX_CONCURRENT_SESSIONS,
            rate_limit_per_second: super::DEFAULT_RATE_LIMIT_PER_SECOND,
            rate_limit_burst: super::DEFAULT_RATE_LIMIT_BURST,
            enable_tracing: true,
            enable_metrics: true,
            enable_logging: true,
            log_level: LogLevel::default(),
            processors: Vec::new(),
            components: BTreeMap::new(),
            interruption: super::InterruptionConfig::default(),
            preemptive: super::PreemptiveConfig::default(),
        }
    }

    /// A [`ConfigBuilder`] for `provider`, starting from [`Config::new`].
    ///
    /// ```
    /// use std::time::Duration;
    /// use voice_backends::{Config, PipelineType};
    ///
    /// let config = Config::builder("local")
    ///     .pipeline_type(PipelineType::S2s)
    ///     .s2s_provider("echo")
    ///     .latency_target(Duration::from_millis(300))
    ///     .provider_option("region", "eu")
    ///     .build()?;
    /// assert_eq!(config.provider_config.0["region"], "eu");
    /// # Ok::<(), voice_backends::BackendError>(())
    /// ```
    pub fn builder(provider: impl Into<String>) -> ConfigBuilder {
        ConfigBuilder::new(provider)
    }
}

/// Builds a [`Config`] field by field; [`ConfigBuilder::build`] validates it.
///
/// Made by [`Config::builder`]. Every setter takes and returns the builder, so
/// calls chain.
#[derive(Clone, Debug)]
#[must_use = "a builder does nothing until build() is called"]
pub struct ConfigBuilder {
    config: Config,
    problems: Violations,
}

impl ConfigBuilder {
    /// A builder for `provider`, every other field at its default.
    pub fn new(provider: impl Into<String>) -> Self {
        ConfigBuilder {
            config: Config::new(provider),
            problems: Violations::new(),
        }
    }

    /// Sets [`Config::pipeline_type`].
    pub fn pipeline_type(mut self, pipeline_type: PipelineType) -> Self {
        self.config.pipeline_type = pipeline_type;
        self
    }

    /// Sets [`Config::stt_provider`].
    pub fn stt_provider(mut self, name: impl Into<String>) -> Self {
        self.config.stt_provider = Some(name.into());
        self
    }

    /// Sets [`Config::tts_provider`].
    pub fn tts_provider(mut self, name: impl Into<String>) -> Self {
        self.config.tts_provider = Some(name.into());
        self
    }

    /// Sets [`Config::s2s_provider`].
    pub fn s2s_provider(mut self, name: impl Into<String>) -> Self {
        self.config.s2s_provider = Some(name.into());
        self
    }

    /// Sets [`Config::stt_fallbacks`].
    pub fn stt_fallbacks<I: IntoIterator<Item = S>, S: Into<String>>(mut self, names: I) -> Self {
        self.config.stt_fallbacks = names.into_iter().map(Into::into).collect();
        self
    }

    /// Sets [`Config::tts_fallbacks`].
    pub fn tts_fallbacks<I: IntoIterator<Item = S>, S: Into<String>>(mut self, names: I) -> Self {
        self.config.tts_fallbacks = names.into_iter().map(Into::into).collect();
        self
    }

    /// Sets [`Config::s2s_fallbacks`].
    pub fn s2s_fallbacks<I: IntoIterator<Item = S>, S: Into<String>>(mut self, names: I) -> Self {
        self.config.s2s_fallbacks = names.into_iter().map(Into::into).collect();
        self
    }

    /// Sets [`Config::failover`].
    pub fn failover(mut self, failover: super::FailoverConfig) -> Self {
        self.config.failover = failover;
        self
    }

    /// Sets [`Config::vad_provider`].
    pub fn vad_provider(mut self, name: impl Into<String>) -> Self {
        self.config.vad_provider = Some(name.into());
        self
    }

    /// Sets [`Config::turn_detection_provider`].
    pub fn turn_detection_provider(mut self, name: impl Into<String>) -> Self {
        self.config.turn_detection_provider = Some(name.into());
        self
    }

    /// Sets [`Config::noise_cancellation_provider`].
    pub fn noise_cancellation_provider(mut self, name: impl Into<String>) -> Self {
        self.config.noise_cancellation_provider = Some(name.into());
        self
    }

    /// Sets [`Config::latency_target`] (100ms..=5s).
    pub fn latency_target(mut self, latency_target: Duration) -> Self {
        self.config.latency_target = latency_target;
        self
    }

    /// Sets [`Config::timeout`] (1s..=5m).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.config.timeout = timeout;
        self
    }

    /// Sets [`Config::max_retries`] (0..=10).
    pub fn max_retries(mut self, max_retries: u32) -> Self {
        self.config.max_retries = max_retries;
        self
    }

    /// Sets [`Config::retry_delay`] (100ms..=30s).
    pub fn retry_delay(mut self, retry_delay: Duration) -> Self {
        self.config.retry_delay = retry_delay;
        self
    }

    /// Sets [`Config::max_concurrent_sessions`] (at least 1).
    pub fn max_concurrent_sessions(mut self, max_concurrent_sessions: u32) -> Self {
        self.config.max_concurrent_sessions = max_concurrent_sessions;
        self
    }

    /// Sets [`Config::enable_tracing`].
    pub fn enable_tracing(mut self, enable: bool) -> Self {
        self.config.enable_tracing = enable;
        self
    }

    /// Sets [`Config::enable_metrics`].
    pub fn enable_metrics(mut self, enable: bool) -> Self {
        self.config.enable_metrics = enable;
        self
    }

    /// Sets [`Config::enable_logging`].
    pub fn enable_logging(mut self, enable: bool) -> Self {
        self.config.enable_logging = enable;
        self
    }

    /// Sets [`Config::log_level`].
    pub fn log_level(mut self, log_level: LogLevel) -> Self {
        self.config.log_level = log_level;
        self
    }

    /// Appends a processor named `name` at position `order`, without options.
    pub fn processor(mut self, name: impl Into<String>, order: i32) -> Self {
        self.config.processors.push(ProcessorConfig {
            name: name.into(),
            order,
            options: serde_json::Value::Object(serde_json::Map::new()),
        });
        self
    }

    /// Appends a fully specified processor (with options).
    pub fn processor_config(mut self, processor: ProcessorConfig) -> Self {
        self.config.processors.push(processor);
        self
    }

    /// Sets one key of [`Config::provider_config`] to `value`, serialized to JSON.
    ///
    /// If `value` cannot be serialized, [`ConfigBuilder::build`] reports it
    /// at `provider_config.<key>`.
    pub fn provider_option(mut self, key: impl Into<String>, value: impl Serialize) -> Self {
        let key = key.into();
        match serde_json::to_value(value) {
            Ok(value) => {
                self.config.provider_config.0.insert(key, value);
            }
            Err(e) => {
                let message = if ProviderSection::is_secret_key(&key) {
                    "could not be serialized to JSON".to_owned()
                } else {
                    format!(
                        "could not be serialized to JSON: {}",
                        ProviderSection::redact_quoted(&e.to_string())
                    )
                };
                self.problems.push(
                    format!("provider_config.{}", ProviderSection::shown_key(&key)),
                    message,
                );
            }
        }
        self
    }

    /// Replaces the whole [`Config::provider_config`] section, including keys
    /// set earlier with [`ConfigBuilder::provider_option`].
    pub fn provider_config(mut self, section: serde_json::Map<String, serde_json::Value>) -> Self {
        self.config.provider_config = ProviderSection(section);
        self
    }

    /// The config, validated.
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`](crate::error::ErrorCode::InvalidConfig) (operation
    /// `config.build`) listing every violation (see [`Config::violations`]) and
    /// every provider option that could not be serialized.
    pub fn build(self) -> Result<Config, BackendError> {
        let mut problems = self.problems;
        problems.append(self.config.violations());
        problems.into_result("config.build")?;
        Ok(self.config)
    }
}

impl SessionConfig {
    /// A session config for `user_id` with every other field at its default
    /// (WebSocket transport, no URL, token, override, metadata or agent).
    pub fn new(user_id: impl Into<String>) -> SessionConfig {
        SessionConfig {
            user_id: user_id.into(),
            transport: Transport::default(),
            connection_url: None,
            auth_token: None,
            pipeline: None,
            metadata: BTreeMap::new(),
            input_format: crate::audio::AudioFormat::PCM16_16K_MONO,
            output_format: crate::audio::AudioFormat::PCM16_16K_MONO,
            agent: None,
        }
    }

    /// Sets [`SessionConfig::input_format`].
    pub fn with_input_format(mut self, format: crate::audio::AudioFormat) -> Self {
        self.input_format = format;
        self
    }

    /// Sets [`SessionConfig::output_format`].
    pub fn with_output_format(mut self, format: crate::audio::AudioFormat) -> Self {
        self.output_format = format;
        self
    }

    /// Sets [`SessionConfig::transport`].
    pub fn with_transport(mut self, transport: Transport) -> Self {
        self.transport = transport;
        self
    }

    /// Sets [`SessionConfig::connection_url`].
    pub fn with_connection_url(mut self, url: impl Into<String>) -> Self {
        self.connection_url = Some(url.into());
        self
    }

    /// Sets [`SessionConfig::auth_token`].
    pub fn with_auth_token(mut self, token: impl Into<Secret>) -> Self {
        self.auth_token = Some(token.into());
        self
    }

    /// Sets [`SessionConfig::pipeline`].
    pub fn with_pipeline(mut self, pipeline: PipelineOverride) -> Self {
        self.pipeline = Some(pipeline);
        self
    }

    /// Sets one [`SessionConfig::metadata`] entry, replacing any earlier value.
    pub fn with_metadata(
        mut self,
        key: impl Into<String>,
        value: impl Into<serde_json::Value>,
    ) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Sets [`SessionConfig::agent`].
    pub fn with_agent(mut self, agent: Arc<dyn Agent>) -> Self {
        self.agent = Some(agent);
        self
    }
}
