#![doc = include_str!("docs.md")]

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::Deserialize;

use crate::backend::VoiceBackend;
use crate::config::{Config, parse_provider_config};
use crate::error::Result;
use crate::provider::{BackendProvider, Codec, ConfigSchema, ProviderCapabilities};
use crate::runtime::{Connector, RuntimeBackend};

/// The provider's registered name.
pub const NAME: &str = "local";

/// The `local` provider's `provider_config`: it has no options today, and
/// rejects unknown keys so a misspelling is reported.
#[derive(Clone, Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {}

/// Runs the whole pipeline in process; no service, no account, no keys.
#[derive(Clone, Debug, Default)]
pub struct LocalProvider;

impl LocalProvider {
    /// The provider.
    pub fn new() -> Self {
        LocalProvider
    }
}

fn capabilities() -> ProviderCapabilities {
    ProviderCapabilities {
        speech_to_speech: true,
        min_latency: Duration::from_millis(20),
        codecs: vec![Codec::Pcm16, Codec::PcmF32, Codec::Mulaw, Codec::Alaw],
        ..ProviderCapabilities::default()
    }
}

impl BackendProvider for LocalProvider {
    fn name(&self) -> &str {
        NAME
    }

    fn capabilities(&self) -> ProviderCapabilities {
        capabilities()
    }

    fn validate_config(&self, config: &Config) -> Result<()> {
        LocalConnector.validate_config(config)
    }

    fn create_backend(&self, config: &Config) -> Result<Arc<dyn VoiceBackend>> {
        Ok(Arc::new(RuntimeBackend::new(
            Arc::new(LocalConnector),
            config,
        )?))
    }

    fn config_schema(&self) -> ConfigSchema {
        ConfigSchema::of::<LocalConfig>(NAME)
    }
}

/// The local connector: nothing to connect to.
#[derive(Debug)]
pub(crate) struct LocalConnector;

#[async_trait]
impl Connector for LocalConnector {
    fn provider(&self) -> &str {
        NAME
    }

    fn capabilities(&self) -> ProviderCapabilities {
        capabilities()
    }

    fn validate_config(&self, config: &Config) -> Result<()> {
        parse_provider_config::<LocalConfig>(config).map(|_| ())
    }

    async fn connect(&self, _config: &Config) -> Result<()> {
        Ok(())
    }
}

crate::register_provider!(NAME, LocalProvider::new);
