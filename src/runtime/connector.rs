//! [`Connector`]: what a provider contributes to the runtime.

use std::collections::BTreeMap;

use async_trait::async_trait;

use super::{Link, LinkRequest};
use crate::config::Config;
use crate::error::Result;
use crate::provider::{HostedStages, ProviderCapabilities};

/// What a provider contributes: how to reach its service.
///
/// The runtime calls [`Connector::connect`] from
/// [`VoiceBackend::start`](crate::VoiceBackend::start),
/// under `timeout` and with `max_retries` retries spaced by `retry_delay`
/// doubling each time; errors whose code is not retryable stop at once.
#[async_trait]
pub trait Connector: Send + Sync + 'static {
    /// The provider's name.
    fn provider(&self) -> &str;

    /// What the provider can do.
    fn capabilities(&self) -> ProviderCapabilities;

    /// Checks the provider's part of a config (usually `provider_config`).
    fn validate_config(&self, config: &Config) -> Result<()>;

    /// Pipeline stages the service runs itself (see [`Connector::open_link`]).
    fn hosted_stages(&self) -> HostedStages {
        HostedStages::NONE
    }

    /// Takes an updated config (already checked by the runtime): sessions
    /// opened from now on use it. The default checks it with
    /// [`Connector::validate_config`] and keeps nothing; a
    /// [`Provider`](super::Provider)'s connector makes the provider
    /// anew from it.
    ///
    /// # Errors
    ///
    /// `InvalidConfig`: the update is refused and nothing changes.
    fn reconfigure(&self, config: &Config) -> Result<()> {
        self.validate_config(config)
    }

    /// Connects to the service.
    async fn connect(&self, config: &Config) -> Result<()>;

    /// Opens a session's [`Link`] to the service, for a service that runs
    /// pipeline stages itself; `None` (the default) runs the whole pipeline
    /// in process. Called when the session is created, under `timeout` and
    /// with the config's retries; the link reconnects by itself when it
    /// drops later, following [`LinkRequest::retry`].
    async fn open_link(&self, _request: LinkRequest<'_>) -> Result<Option<Link>> {
        Ok(None)
    }

    /// Disconnects from the service.
    async fn disconnect(&self) {}

    /// Checks the service; details are merged into the backend's health.
    async fn health(&self) -> Result<BTreeMap<String, String>> {
        Ok(BTreeMap::new())
    }
}
