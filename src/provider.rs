//! The provider contract: what a voice service contributes to the crate.
//!
//! A provider is a named factory of [`VoiceBackend`]s with a description of
//! what it can do. Providers register themselves at link time with
//! [`register_provider!`](crate::register_provider), and are handed out by name
//! by the [`registry`](crate::registry()).

use std::sync::Arc;
use std::time::Duration;

use schemars::JsonSchema;
use serde::Serialize;

use crate::backend::VoiceBackend;
use crate::config::Config;
use crate::error::Result;

/// Pipeline stages a provider's service runs itself; defined with the config
/// rules that depend on them.
pub use crate::config::HostedStages;

/// A wire codec a provider can carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Codec {
    /// Signed 16-bit little-endian PCM.
    Pcm16,
    /// 32-bit float PCM.
    PcmF32,
    /// G.711 mu-law.
    Mulaw,
    /// G.711 A-law.
    Alaw,
    /// Opus.
    Opus,
}

/// What a provider can do.
///
/// Marked non-exhaustive so capabilities can grow; build one from
/// [`ProviderCapabilities::default`] and set the fields that apply.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ProviderCapabilities {
    /// Runs speech-to-speech models.
    pub speech_to_speech: bool,
    /// Serves several users in one session (e.g. a room).
    pub multi_user: bool,
    /// Active sessions persist and survive a restart.
    pub session_persistence: bool,
    /// Brings its own authentication (otherwise the backend's auth hook alone applies).
    pub custom_auth: bool,
    /// Brings its own rate limiting (otherwise the framework's fallback limiter applies).
    pub custom_rate_limiting: bool,
    /// Most sessions at once; 0 means unlimited.
    pub max_concurrent_sessions: u32,
    /// The lowest end-of-speech to first-reply latency the provider can reach.
    #[serde(with = "humantime_serde")]
    pub min_latency: Duration,
    /// Codecs it carries.
    pub codecs: Vec<Codec>,
    /// Pipeline stages its service runs itself (the local engine runs the rest).
    pub hosted_stages: HostedStages,
    /// Who ends the user's turn when the service transcribes.
    pub turns: TurnPolicy,
}

/// Who ends the user's turn on a link to a service that transcribes
/// ([`HostedStages::stt`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum TurnPolicy {
    /// The service ends turns: its final transcript ends the user's turn
    /// (Pipecat: the bot's own VAD and turn analysis).
    #[default]
    Service,
    /// The local VAD and turn detector end turns and tell the service, which
    /// then finishes its transcript (Cartesia's `finalize`).
    Local,
}

/// The JSON Schema of a provider's own config section (`provider_config`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ConfigSchema {
    /// The provider the schema belongs to.
    pub provider: String,
    /// The JSON Schema (draft 2020-12), generated from the provider's typed config.
    pub schema: serde_json::Value,
}

impl ConfigSchema {
    /// The schema of `T`, the provider's typed config.
    pub fn of<T: JsonSchema>(provider: impl Into<String>) -> Self {
        ConfigSchema {
            provider: provider.into(),
            schema: schemars::schema_for!(T).to_value(),
        }
    }

    /// Whether `key` is a top-level property of the schema.
    pub fn has_property(&self, key: &str) -> bool {
        self.schema
            .get("properties")
            .and_then(|p| p.get(key))
            .is_some()
    }
}

/// A voice service: a named factory of [`VoiceBackend`]s.
///
/// Creating a backend does no I/O: it checks and keeps the config. Connecting
/// happens in [`VoiceBackend::start`]. This keeps [`crate::BackendRegistry::create`]
/// cheap and predictable.
pub trait BackendProvider: Send + Sync + std::fmt::Debug + 'static {
    /// The provider's registered name, e.g. `"livekit"`.
    fn name(&self) -> &str;

    /// What the provider can do.
    fn capabilities(&self) -> ProviderCapabilities;

    /// Checks `config` for this provider, in particular `provider_config`
    /// against the provider's typed config (see [`crate::parse_provider_config`]).
    /// Errors are [`crate::ErrorCode::InvalidConfig`] with one detail per bad field.
    fn validate_config(&self, config: &Config) -> Result<()>;

    /// Pipeline stages the provider's service runs itself; the registry
    /// checks a config against them (a hosted stage needs no component).
    /// Nothing by default.
    fn hosted_stages(&self) -> HostedStages {
        HostedStages::NONE
    }

    /// Makes a backend from an already validated config.
    fn create_backend(&self, config: &Config) -> Result<Arc<dyn VoiceBackend>>;

    /// The JSON Schema of the provider's `provider_config`.
    fn config_schema(&self) -> ConfigSchema;
}

/// Registers a provider with every [`crate::BackendRegistry`] at link time.
///
/// Call it once, at module level, either with a type that implements
/// [`runtime::Provider`](crate::runtime::Provider) (the usual way:
/// `register_provider!(AcmeProvider);` derives everything from its typed
/// config, see the README's "Writing a provider"), or with the provider's
/// name and a function (or non-capturing closure) returning a
/// [`BackendProvider`] value, as below. Crates outside `voice-backends` can
/// use it too; they need no direct `linkme` dependency.
///
/// ```
/// # use std::sync::Arc;
/// # use voice_backends::{
/// #     BackendError, BackendProvider, Config, ConfigSchema, ErrorCode, ProviderCapabilities,
/// #     VoiceBackend,
/// # };
/// # #[derive(Debug)]
/// # struct AcmeProvider;
/// # impl AcmeProvider {
/// #     fn new() -> Self {
/// #         AcmeProvider
/// #     }
/// # }
/// # impl BackendProvider for AcmeProvider {
/// #     fn name(&self) -> &str {
/// #         "acme"
/// #     }
/// #     fn capabilities(&self) -> ProviderCapabilities {
/// #         ProviderCapabilities::default()
/// #     }
/// #     fn validate_config(&self, _: &Config) -> voice_backends::Result<()> {
/// #         Ok(())
/// #     }
/// #     fn create_backend(&self, _: &Config) -> voice_backends::Result<Arc<dyn VoiceBackend>> {
/// #         Err(BackendError::new("acme.create_backend", ErrorCode::ConnectionFailed, "no service"))
/// #     }
/// #     fn config_schema(&self) -> ConfigSchema {
/// #         ConfigSchema::of::<()>("acme")
/// #     }
/// # }
/// // At module level, once per provider:
/// voice_backends::register_provider!("acme", AcmeProvider::new);
///
/// # fn main() {
/// assert!(voice_backends::registry().is_registered("acme"));
/// # }
/// ```
#[macro_export]
macro_rules! register_provider {
    ($name:expr, $constructor:expr $(,)?) => {
        const _: () = {
            #[$crate::__private::linkme::distributed_slice($crate::registry::__PROVIDERS)]
            #[linkme(crate = $crate::__private::linkme)]
            static __VOICE_BACKENDS_PROVIDER: $crate::ProviderEntry = $crate::ProviderEntry {
                name: $name,
                module: ::core::module_path!(),
                constructor: || -> ::std::sync::Arc<dyn $crate::BackendProvider> {
                    ::std::sync::Arc::new(($constructor)())
                },
            };
        };
    };
    ($provider:ty $(,)?) => {
        $crate::register_provider!(
            <$provider as $crate::runtime::Provider>::NAME,
            $crate::runtime::Registered::<$provider>::new
        );
    };
}
