//! `providers` and `schema`: the compiled-in providers, their capabilities
//! and their `provider_config` JSON Schemas.

use std::io::Write;

use crate::error::BackendError;
use crate::provider::ProviderCapabilities;
use crate::registry::registry;

use super::{Failure, ProvidersArgs, SchemaArgs, write_failed};

/// One provider as `providers --json` prints it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProviderInfo {
    /// The registered name.
    pub name: String,
    /// What it can do.
    pub capabilities: ProviderCapabilities,
}

/// Every compiled-in provider (of the global [`registry()`]), sorted by name.
///
/// # Errors
///
/// The registry's error for a name registered twice at link time.
pub fn provider_infos() -> Result<Vec<ProviderInfo>, BackendError> {
    registry()
        .list_providers()
        .into_iter()
        .map(|name| {
            let provider = registry().get_provider(name)?;
            Ok(ProviderInfo {
                name: name.to_owned(),
                capabilities: provider.capabilities(),
            })
        })
        .collect()
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// `providers` as an aligned text table, one provider a row, with a header.
pub fn providers_table(infos: &[ProviderInfo]) -> String {
    let header = [
        "name",
        "s2s",
        "multi-user",
        "persistence",
        "custom auth",
        "custom rate limit",
        "service limit",
        "min latency",
        "codecs",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| (*h).to_owned()).collect()];
    for info in infos {
        let c = &info.capabilities;
        let codecs = c
            .codecs
            .iter()
            .map(|codec| {
                serde_json::to_value(codec)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_else(|| format!("{codec:?}"))
            })
            .collect::<Vec<_>>()
            .join(", ");
        rows.push(vec![
            info.name.clone(),
            yes_no(c.speech_to_speech).to_owned(),
            yes_no(c.multi_user).to_owned(),
            yes_no(c.session_persistence).to_owned(),
            yes_no(c.custom_auth).to_owned(),
            yes_no(c.custom_rate_limiting).to_owned(),
            if c.max_concurrent_sessions == 0 {
                "none".to_owned()
            } else {
                c.max_concurrent_sessions.to_string()
            },
            humantime::format_duration(c.min_latency).to_string(),
            if codecs.is_empty() {
                "-".to_owned()
            } else {
                codecs
            },
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut table = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(cell);
                let pad = widths[i] - cell.chars().count() + 2;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        table.push_str(line.trim_end());
        table.push('\n');
    }
    table.push_str(
        "\nservice limit: sessions the provider's service takes at most (none: no limit of its own).\n\
         A backend also holds at most its config's max_concurrent_sessions (100 by default),\n\
         which /healthz shows as sessions: open/limit.\n",
    );
    table
}

/// `voice-backends providers [--json]`.
///
/// # Errors
///
/// [`exit::FAILURE`] if a provider cannot be listed or the output not written.
///
/// [`exit::FAILURE`]: super::exit::FAILURE
pub fn providers(args: &ProvidersArgs, out: &mut dyn Write) -> Result<(), Failure> {
    let infos = provider_infos().map_err(|e| Failure::failed(e.into_fields().message))?;
    if args.json {
        let json = serde_json::to_string_pretty(&infos)
            .map_err(|e| Failure::failed(format!("cannot write JSON: {e}")))?;
        writeln!(out, "{json}").map_err(write_failed)?;
    } else {
        write!(out, "{}", providers_table(&infos)).map_err(write_failed)?;
    }
    out.flush().map_err(write_failed)
}

/// The JSON Schema of `provider`'s `provider_config`.
///
/// # Errors
///
/// [`exit::USAGE`] with the registry's message (which lists the available
/// providers) for an unknown name.
///
/// [`exit::USAGE`]: super::exit::USAGE
pub fn provider_schema(provider: &str) -> Result<serde_json::Value, Failure> {
    let provider = registry()
        .get_provider(provider)
        .map_err(|e| Failure::usage(super::with_feature_hint(provider, e.into_fields().message)))?;
    Ok(provider.config_schema().schema)
}

/// `voice-backends schema PROVIDER`: the schema, pretty-printed.
///
/// # Errors
///
/// As [`provider_schema`].
pub fn schema(args: &SchemaArgs, out: &mut dyn Write) -> Result<(), Failure> {
    let schema = provider_schema(&args.provider)?;
    let text = serde_json::to_string_pretty(&schema)
        .map_err(|e| Failure::failed(format!("cannot write JSON: {e}")))?;
    writeln!(out, "{text}").map_err(write_failed)?;
    out.flush().map_err(write_failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_aligned() {
        let infos = provider_infos().unwrap();
        let table = providers_table(&infos);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("name"));
        let column = lines[0].find("s2s").unwrap();
        for line in lines[1..].iter().take_while(|l| !l.is_empty()) {
            let cell = &line[column..column + 3];
            assert!(cell == "yes" || cell == "no ", "{cell:?} in {line:?}");
        }
        let local = lines.iter().find(|l| l.starts_with("local")).unwrap();
        assert_eq!(&local[column..column + 3], "yes");
    }
}
