//! Built-in pipeline components that need no model or service.
//!
//! | kind | name | type | options (`[components.<name>]`) |
//! |------|------|------|---------------------------------|
//! | `vad` | `"energy"` | [`EnergyVad`] | [`EnergyVadOptions`] |
//! | `turn` | `"silence"` | [`SilenceTurnDetector`] | [`SilenceTurnOptions`] |
//! | `turn` | `"adaptive"` | [`AdaptiveTurnDetector`] | [`AdaptiveTurnOptions`] |
//! | `s2s` | `"echo"` | [`EchoS2s`] | [`EchoOptions`] |
//!
//! Each registers itself at link time with
//! [`register_component!`](crate::register_component), so
//! [`components()`](crate::pipeline::components)`.vad.get("energy")` and friends
//! find them without any setup.
//!
//! Options are parsed strictly: unknown keys and out-of-range values fail with
//! [`InvalidConfig`](crate::ErrorCode::InvalidConfig) (operation
//! `component.options`), with one entry in `details` per offending field, keyed
//! by its path, e.g. `components.energy.threshold_db`. Durations are written
//! like `"200ms"` or `"3s"`.

pub mod adaptive;
pub mod echo;
pub mod turn;
pub mod vad;

pub use adaptive::{AdaptiveTurnDetector, AdaptiveTurnFactory, AdaptiveTurnOptions};
pub use echo::{EchoOptions, EchoS2s, EchoStream};
pub use turn::{SilenceTurnDetector, SilenceTurnFactory, SilenceTurnOptions};
pub use vad::{EnergyVad, EnergyVadFactory, EnergyVadOptions};

use serde::de::DeserializeOwned;
use serde_path_to_error::Segment;

use crate::config::ProviderSection;
use crate::error::{BackendError, Result};
use crate::pipeline::options_or_empty;

/// The operation named by option errors of the built-in components.
pub(crate) const OPTIONS_OP: &str = "component.options";

/// Parses the options of the component configured as `[components.<component>]`
/// strictly: unknown keys and anything but a table are refused.
///
/// `null` means "all defaults". Errors are `InvalidConfig` of operation `op`
/// (the built-in components' is [`OPTIONS_OP`]), carrying the field path
/// `components.<component>.<field>` in `details`; keys and quoted values
/// that look like secrets are redacted.
pub(crate) fn parse_options<T: DeserializeOwned>(
    op: &'static str,
    component: &str,
    options: &serde_json::Value,
) -> Result<T> {
    let base = format!("components.{component}");
    let value = options_or_empty(options);
    if !value.is_object() {
        let message = "must be a table (an object of options)";
        return Err(BackendError::invalid_config(
            op,
            format!("invalid options: {base}: {message}"),
        )
        .with_detail(base, message));
    }
    let error = match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(parsed) => return Ok(parsed),
        Err(e) => e,
    };
    let mut path = base;
    for segment in error.path().iter() {
        match segment {
            Segment::Seq { index } => path.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                path.push('.');
                path.push_str(&ProviderSection::shown_key(key));
            }
            Segment::Unknown => path.push_str(".?"),
        }
    }
    let message = ProviderSection::redact_quoted(&error.into_inner().to_string());
    // serde reports an unknown key at its parent; point at the key itself.
    if let Some(key) = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split('`').next())
        && !path.ends_with(&format!(".{key}"))
    {
        path.push('.');
        path.push_str(key);
    }
    Err(
        BackendError::invalid_config(op, format!("invalid options: {path}: {message}"))
            .with_detail(path, message),
    )
}

/// Collects range violations of one component's options, reported together
/// as one `InvalidConfig` of operation [`OPTIONS_OP`].
pub(crate) struct OptionChecks {
    component: &'static str,
    violations: Vec<(String, String)>,
}

impl OptionChecks {
    pub(crate) fn new(component: &'static str) -> Self {
        OptionChecks {
            component,
            violations: Vec::new(),
        }
    }

    /// Records a violation of `field` unless `ok`.
    pub(crate) fn check(&mut self, ok: bool, field: &str, message: impl FnOnce() -> String) {
        if !ok {
            self.violations
                .push((format!("components.{}.{field}", self.component), message()));
        }
    }

    /// `Ok` when nothing was recorded, else one `InvalidConfig` listing every violation.
    pub(crate) fn finish(self) -> Result<()> {
        if self.violations.is_empty() {
            return Ok(());
        }
        let summary = self
            .violations
            .iter()
            .map(|(path, message)| format!("{path}: {message}"))
            .collect::<Vec<_>>()
            .join("; ");
        let mut error =
            BackendError::invalid_config(OPTIONS_OP, format!("invalid options: {summary}"));
        for (path, message) in self.violations {
            error.push_detail(path, message);
        }
        Err(error)
    }
}

/// Reads s16le bytes as samples (a trailing odd byte is ignored).
#[cfg(test)]
fn s16le_samples(bytes: &[u8]) -> impl Iterator<Item = i16> + '_ {
    bytes
        .chunks_exact(2)
        .map(|pair| i16::from_le_bytes([pair[0], pair[1]]))
}
