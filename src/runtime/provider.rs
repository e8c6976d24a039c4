//! The one trait a provider author writes: [`Provider`]. Its typed config
//! is the way in: the runtime derives the registry's
//! [`BackendProvider`](crate::provider::BackendProvider) (validation, schema,
//! capabilities) and the backend's [`Connector`] from it, parses the config
//! once per step, and hands an updated config to the provider.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use schemars::JsonSchema;
use serde::de::DeserializeOwned;

use super::{Connector, Link, LinkRequest, RuntimeBackend};
use crate::backend::VoiceBackend;
use crate::config::{Config, parse_provider_config};
use crate::error::Result;
use crate::provider::{BackendProvider, ConfigSchema, HostedStages, ProviderCapabilities};

/// A provider: its name, its typed `provider_config`, what it can do, and
/// how it reaches its service. Register it with
/// [`register_provider!`](crate::register_provider) (`register_provider!(MyProvider);`):
/// the registry then validates configs by parsing [`Provider::Config`]
/// (unknown keys refused) and [`Provider::check`], publishes its JSON
/// schema, and builds backends on the shared runtime with a value made by
/// [`Provider::new`]. A backend's `update_config` makes a new value from the
/// new config; sessions opened after it use it.
///
/// Everything else (sessions, capacity, auth, rate limits, retries, health,
/// metrics, tracing, the pipeline) is the runtime's. A provider whose
/// service speaks over a WebSocket builds its link with the link kit
/// (`runtime::WebSocketLink`, feature `link-websocket`) and writes only its wire
/// protocol.
#[async_trait]
pub trait Provider: Send + Sync + Sized + 'static {
    /// The registered name (`provider = "..."` in configs).
    const NAME: &'static str;

    /// The provider's `provider_config`. Deny unknown fields
    /// (`#[serde(deny_unknown_fields)]`) so a misspelled key is reported,
    /// and keep secrets in [`Secret`](crate::Secret)s.
    type Config: DeserializeOwned + JsonSchema + Send + Sync + 'static;

    /// What the provider can do, the pipeline stages its service hosts and
    /// who ends turns included.
    fn capabilities() -> ProviderCapabilities;

    /// Checks the parsed config beyond its types (one field against
    /// another, ranges); the default accepts it.
    ///
    /// # Errors
    ///
    /// `InvalidConfig` naming each bad field.
    fn check(config: &Self::Config) -> Result<()> {
        let _ = config;
        Ok(())
    }

    /// The provider for a backend with `config` (already checked), whose
    /// `provider_config` parsed as `typed`.
    ///
    /// # Errors
    ///
    /// `InvalidConfig` for what can only be found out here.
    fn new(typed: Self::Config, config: &Config) -> Result<Self>;

    /// Connects to the service when the backend starts (the runtime retries
    /// under the config's policy); nothing by default.
    async fn connect(&self, config: &Config) -> Result<()> {
        let _ = config;
        Ok(())
    }

    /// Opens a session's link ([`Link`]); `None` (the default) runs the
    /// whole pipeline in process.
    async fn open_link(&self, request: LinkRequest<'_>) -> Result<Option<Link>> {
        let _ = request;
        Ok(None)
    }

    /// Disconnects when the backend stops.
    async fn disconnect(&self) {}

    /// Checks the service; details are merged into the backend's health.
    async fn health(&self) -> Result<BTreeMap<String, String>> {
        Ok(BTreeMap::new())
    }
}

/// Parses and checks `config`'s `provider_config` for `P`.
fn parse<P: Provider>(config: &Config) -> Result<P::Config> {
    let typed = parse_provider_config::<P::Config>(config)?;
    P::check(&typed)?;
    Ok(typed)
}

/// The registry's view of a [`Provider`]: what
/// [`register_provider!`](crate::register_provider) registers.
pub struct Registered<P>(PhantomData<fn() -> P>);

impl<P: Provider> Registered<P> {
    /// The registration of `P`.
    pub fn new() -> Self {
        Registered(PhantomData)
    }
}

impl<P: Provider> Default for Registered<P> {
    fn default() -> Self {
        Registered::new()
    }
}

impl<P> fmt::Debug for Registered<P>
where
    P: Provider,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Registered").field(&P::NAME).finish()
    }
}

impl<P: Provider> BackendProvider for Registered<P> {
    fn name(&self) -> &str {
        P::NAME
    }

    fn capabilities(&self) -> ProviderCapabilities {
        P::capabilities()
    }

    fn hosted_stages(&self) -> HostedStages {
        P::capabilities().hosted_stages
    }

    fn validate_config(&self, config: &Config) -> Result<()> {
        parse::<P>(config).map(drop)
    }

    fn create_backend(&self, config: &Config) -> Result<Arc<dyn VoiceBackend>> {
        let provider = P::new(parse::<P>(config)?, config)?;
        let connector = ProviderConnector {
            current: ArcSwap::from_pointee(provider),
        };
        Ok(Arc::new(RuntimeBackend::new(Arc::new(connector), config)?))
    }

    fn config_schema(&self) -> ConfigSchema {
        ConfigSchema::of::<P::Config>(P::NAME)
    }
}

/// A [`Provider`] as the runtime's [`Connector`]: the provider made from the
/// backend's current config.
struct ProviderConnector<P> {
    current: ArcSwap<P>,
}

#[async_trait]
impl<P: Provider> Connector for ProviderConnector<P> {
    fn provider(&self) -> &str {
        P::NAME
    }

    fn capabilities(&self) -> ProviderCapabilities {
        P::capabilities()
    }

    fn validate_config(&self, config: &Config) -> Result<()> {
        parse::<P>(config).map(drop)
    }

    fn hosted_stages(&self) -> HostedStages {
        P::capabilities().hosted_stages
    }

    fn reconfigure(&self, config: &Config) -> Result<()> {
        let provider = P::new(parse::<P>(config)?, config)?;
        self.current.store(Arc::new(provider));
        Ok(())
    }

    async fn connect(&self, config: &Config) -> Result<()> {
        self.current.load_full().connect(config).await
    }

    async fn open_link(&self, request: LinkRequest<'_>) -> Result<Option<Link>> {
        self.current.load_full().open_link(request).await
    }

    async fn disconnect(&self) {
        self.current.load_full().disconnect().await
    }

    async fn health(&self) -> Result<BTreeMap<String, String>> {
        self.current.load_full().health().await
    }
}
