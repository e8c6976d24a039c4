#![doc = include_str!("docs.md")]

use std::time::Duration;

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::Deserialize;

use crate::config::Config;
use crate::error::Result;
use crate::provider::{Codec, ProviderCapabilities};
use crate::runtime::Provider;

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

#[async_trait]
impl Provider for LocalProvider {
    const NAME: &'static str = NAME;
    type Config = LocalConfig;

    fn capabilities() -> ProviderCapabilities {
        ProviderCapabilities {
            speech_to_speech: true,
            min_latency: Duration::from_millis(20),
            codecs: vec![Codec::Pcm16, Codec::PcmF32, Codec::Mulaw, Codec::Alaw],
            ..ProviderCapabilities::default()
        }
    }

    fn new(_: LocalConfig, _: &Config) -> Result<Self> {
        Ok(LocalProvider)
    }
}

crate::register_provider!(LocalProvider);
