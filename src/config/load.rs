//! Loading configs from TOML, YAML and JSON, saving them, and
//! [`parse_provider_config`] for providers.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde_path_to_error::Segment;

use super::{Config, ProviderSection, SessionConfig, depth};
use crate::error::BackendError;

const LOAD_OP: &str = "config.load";
const SAVE_OP: &str = "config.save";
const SESSION_LOAD_OP: &str = "session_config.load";
const PROVIDER_OP: &str = "provider.validate_config";

/// The file formats a config can be written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Toml,
    Yaml,
    Json,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::Toml => "TOML",
            Format::Yaml => "YAML",
            Format::Json => "JSON",
        }
    }
}

/// `line L, column C` (both from 1) of byte `offset` of `input`.
fn line_column(input: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(input.len());
    let before = &input.as_bytes()[..offset];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let column = String::from_utf8_lossy(&before[line_start..])
        .chars()
        .count()
        + 1;
    (line, column)
}

/// The dotted form of a serde path (`processors[0].name`; empty at the root)
/// and whether any key along it looks secret.
fn describe_path(path: &serde_path_to_error::Path) -> (String, bool) {
    let mut out = String::new();
    let mut secret = false;
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                secret |= ProviderSection::is_secret_key(key);
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(&ProviderSection::shown_key(key));
            }
            Segment::Unknown => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push('?');
            }
        }
    }
    (out, secret)
}

/// `message`, or `invalid value (redacted)` when it is about the value of a
/// secret-looking key and may quote it. Unknown- and missing-field messages
/// name keys only, so they are kept.
fn redact_message(message: String, secret: bool) -> String {
    // Messages that name keys or kinds of value, never a value.
    let names_only = message.starts_with("unknown field")
        || message.starts_with("missing field")
        || message.starts_with("expected a table of options, found")
        || ((message.starts_with("key `") || message.starts_with("component `"))
            && message.ends_with("` given twice"));
    if secret && !names_only {
        "invalid value (redacted)".to_owned()
    } else {
        ProviderSection::redact_quoted(&message)
    }
}

/// serde_json counts a column in bytes; the column in characters (at least 1),
/// as editors show it.
fn char_column(input: &str, line: usize, byte_column: usize) -> usize {
    let Some(text) = input.split('\n').nth(line.saturating_sub(1)) else {
        return byte_column.max(1);
    };
    let mut end = byte_column.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].chars().count().max(1)
}

/// `message` without the ` at line L column C` the YAML and JSON parsers
/// write into it (the position is reported separately).
fn strip_position(message: String, line: usize, column: usize) -> String {
    let suffix = format!(" at line {line} column {column}");
    match message.find(&suffix) {
        Some(at) => format!("{}{}", &message[..at], &message[at + suffix.len()..]),
        None => message,
    }
}

/// Parses `input` as `T`, turning a parser error into `InvalidConfig`.
/// Text nested deeper than [`MAX_NESTING_DEPTH`](super::MAX_NESTING_DEPTH) is
/// refused first, without a parser reading it.
///
/// The message is
/// `invalid <FORMAT>: [<file>: ][line L, column C: ][<key path>: ]<parser message>`,
/// with a detail keyed by the key path. It is rebuilt from the parser's
/// message and position because the TOML parser's own rendering quotes the
/// source line, which may hold a secret; a message about the value of a
/// secret-looking key or of `provider_config` is redacted.
fn parse<T: DeserializeOwned>(
    input: &str,
    format: Format,
    origin: Option<&Path>,
    op: &'static str,
) -> Result<T, BackendError> {
    let too_deep = match format {
        Format::Toml => depth::toml(input),
        Format::Yaml => depth::yaml(input),
        Format::Json => depth::json(input),
    };
    let (position, (key, secret), inner) = match (too_deep, format) {
        (Some(offset), _) => (
            Some(line_column(input, offset)),
            Default::default(),
            depth::too_deep_message(),
        ),
        (None, Format::Toml) => {
            let result = toml::Deserializer::parse(input)
                .map_err(|e| (None, e))
                .and_then(|de| {
                    serde_path_to_error::deserialize(de)
                        .map_err(|e| (Some(describe_path(e.path())), e.into_inner()))
                });
            match result {
                Ok(v) => return Ok(v),
                Err((key, e)) => (
                    e.span().map(|span| line_column(input, span.start)),
                    key.unwrap_or_default(),
                    e.message().trim_end().to_owned(),
                ),
            }
        }
        (None, Format::Yaml) => {
            let de = serde_yaml_ng::Deserializer::from_str(input);
            match serde_path_to_error::deserialize(de) {
                Ok(v) => return Ok(v),
                Err(e) => {
                    let key = describe_path(e.path());
                    let e = e.into_inner();
                    let position = e.location().map(|l| (l.line(), l.column()));
                    let mut inner = e.to_string();
                    if let Some((line, column)) = position {
                        inner = strip_position(inner, line, column);
                    }
                    (position, key, inner)
                }
            }
        }
        (None, Format::Json) => {
            let mut de = serde_json::Deserializer::from_str(input);
            let (key, e) = match serde_path_to_error::deserialize(&mut de) {
                Ok(v) => match de.end() {
                    Ok(()) => return Ok(v),
                    Err(e) => (Default::default(), e),
                },
                Err(e) => (describe_path(e.path()), e.into_inner()),
            };
            let position =
                (e.line() > 0).then(|| (e.line(), char_column(input, e.line(), e.column())));
            let inner = strip_position(e.to_string(), e.line(), e.column());
            (position, key, inner)
        }
    };

    // serde_yaml_ng starts some messages with (part of) the path itself.
    let inner = match inner.split_once(": ") {
        Some((head, rest)) if !key.is_empty() && key.starts_with(head) => rest.to_owned(),
        _ => inner,
    };
    let in_provider_config = key.split(['.', '[']).next() == Some("provider_config");
    let inner = redact_message(inner, secret || in_provider_config);

    let mut message = format!("invalid {}: ", format.name());
    if let Some(path) = origin {
        message.push_str(&format!("{}: ", path.display()));
    }
    if let Some((line, column)) = position {
        message.push_str(&format!("line {line}, column {column}: "));
    }
    if !key.is_empty() {
        message.push_str(&format!("{key}: "));
    }
    message.push_str(&inner);

    let mut error = BackendError::invalid_config(op, message);
    if let Some(path) = origin {
        error.push_detail("file", path.display().to_string());
    }
    if !key.is_empty() {
        error.push_detail(key, inner);
    }
    Err(error)
}

fn load(input: &str, format: Format, origin: Option<&Path>) -> Result<Config, BackendError> {
    let config: Config = parse(input, format, origin, LOAD_OP)?;
    config.violations_for_any_provider().into_result(LOAD_OP)?;
    Ok(config)
}

impl Config {
    /// Parses and validates a TOML config.
    ///
    /// ```
    /// let config = voice_backends::Config::from_toml_str(r#"
    ///     provider = "local"
    ///     pipeline_type = "s2s"
    ///     s2s_provider = "echo"
    ///     timeout = "10s"
    /// "#)?;
    /// assert_eq!(config.timeout, std::time::Duration::from_secs(10));
    /// # Ok::<(), voice_backends::BackendError>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`](crate::error::ErrorCode::InvalidConfig) (operation
    /// `config.load`): `invalid TOML: line L, column C: ...` for a syntax error,
    /// an unknown key (named in the message), a value of the wrong type or
    /// nesting deeper than [`MAX_NESTING_DEPTH`](crate::MAX_NESTING_DEPTH)
    /// (`nested deeper than the limit of 64 levels of tables and lists`, at
    /// the line where it is passed); quoted keys and values are shown as
    /// [`shown_in_error`](crate::shown_in_error) shows them; otherwise every
    /// violation found by
    /// [`Config::violations_for_any_provider`] (the components the pipeline
    /// needs depend on the provider: `BackendRegistry::create` checks them).
    pub fn from_toml_str(toml: &str) -> Result<Config, BackendError> {
        load(toml, Format::Toml, None)
    }

    /// Parses and validates a YAML config.
    ///
    /// # Errors
    ///
    /// As [`Config::from_toml_str`], with messages starting `invalid YAML:`.
    pub fn from_yaml_str(yaml: &str) -> Result<Config, BackendError> {
        load(yaml, Format::Yaml, None)
    }

    /// Parses and validates a JSON config.
    ///
    /// # Errors
    ///
    /// As [`Config::from_toml_str`], with messages starting `invalid JSON:`.
    pub fn from_json_str(json: &str) -> Result<Config, BackendError> {
        load(json, Format::Json, None)
    }

    /// Reads, parses and validates a config file, in the format given by its
    /// extension: `.toml`, `.yaml` / `.yml` or `.json` (in any case).
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`](crate::error::ErrorCode::InvalidConfig) (operation
    /// `config.load`) when the extension is none of those, when the file
    /// cannot be read (the I/O error is the source), or as
    /// [`Config::from_toml_str`], with the file's path in the message.
    pub fn from_path(path: impl AsRef<Path>) -> Result<Config, BackendError> {
        let path = path.as_ref();
        let extension = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        let format = match extension.as_deref() {
            Some("toml") => Format::Toml,
            Some("yaml" | "yml") => Format::Yaml,
            Some("json") => Format::Json,
            other => {
                let found = match other {
                    Some(ext) => format!("extension {ext:?}"),
                    None => "no extension".to_owned(),
                };
                return Err(BackendError::invalid_config(
                    LOAD_OP,
                    format!(
                        "unsupported config file {}: {found}; accepted extensions: toml, yaml, yml, json",
                        path.display()
                    ),
                )
                .with_detail("file", path.display().to_string()));
            }
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            BackendError::invalid_config(
                LOAD_OP,
                format!("cannot read config file {}: {e}", path.display()),
            )
            .with_detail("file", path.display().to_string())
            .with_source(e)
        })?;
        load(&text, format, Some(path))
    }

    /// The config as TOML. Secret-looking `provider_config` values come out
    /// as `[redacted]`, so the output is safe to log but must have its secrets
    /// supplied again before it is loaded.
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`](crate::error::ErrorCode::InvalidConfig) (operation
    /// `config.save`) when a value cannot be written as TOML (e.g. a JSON
    /// `null` in `provider_config`).
    pub fn to_toml_string(&self) -> Result<String, BackendError> {
        toml::to_string(self).map_err(|e| {
            BackendError::invalid_config(
                SAVE_OP,
                format!(
                    "cannot write config as TOML: {}",
                    ProviderSection::redact_quoted(&e.to_string())
                ),
            )
        })
    }

    /// The config as pretty-printed JSON, secrets redacted as for
    /// [`Config::to_toml_string`].
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`](crate::error::ErrorCode::InvalidConfig) (operation
    /// `config.save`) if serialization fails.
    pub fn to_json_string(&self) -> Result<String, BackendError> {
        serde_json::to_string_pretty(self).map_err(|e| {
            BackendError::invalid_config(
                SAVE_OP,
                format!(
                    "cannot write config as JSON: {}",
                    ProviderSection::redact_quoted(&e.to_string())
                ),
            )
        })
    }
}

impl SessionConfig {
    /// Parses and validates a JSON session config (the agent is not part of
    /// it; set it with [`SessionConfig::with_agent`]).
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`](crate::error::ErrorCode::InvalidConfig) (operation
    /// `session_config.load`): `invalid JSON: ...` for a syntax error, an
    /// unknown key, a value of the wrong type or nesting deeper than
    /// [`MAX_NESTING_DEPTH`](crate::MAX_NESTING_DEPTH); otherwise every
    /// violation found by [`SessionConfig::violations`].
    pub fn from_json_str(json: &str) -> Result<SessionConfig, BackendError> {
        let config: SessionConfig = parse(json, Format::Json, None, SESSION_LOAD_OP)?;
        config.violations().into_result(SESSION_LOAD_OP)?;
        Ok(config)
    }

    /// The session config as pretty-printed JSON; `auth_token` comes out as
    /// `[redacted]` and the agent is left out.
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`](crate::error::ErrorCode::InvalidConfig) (operation
    /// `session_config.save`) if serialization fails.
    pub fn to_json_string(&self) -> Result<String, BackendError> {
        serde_json::to_string_pretty(self).map_err(|e| {
            BackendError::invalid_config(
                "session_config.save",
                format!("cannot write session config as JSON: {e}"),
            )
        })
    }
}

/// Deserializes [`Config::provider_config`] into a provider's typed config `T`.
///
/// Providers call it from their config validation; marking `T`
/// `#[serde(deny_unknown_fields)]` turns a misspelled key into an error.
///
/// ```
/// use serde::Deserialize;
/// use voice_backends::{parse_provider_config, Config};
///
/// #[derive(Deserialize)]
/// #[serde(deny_unknown_fields)]
/// struct MyConfig {
///     region: String,
/// }
///
/// let config = Config::builder("mine")
///     .pipeline_type(voice_backends::PipelineType::S2s)
///     .s2s_provider("echo")
///     .provider_option("region", "eu")
///     .build()?;
/// let mine: MyConfig = parse_provider_config(&config)?;
/// assert_eq!(mine.region, "eu");
/// # Ok::<(), voice_backends::BackendError>(())
/// ```
///
/// # Errors
///
/// [`InvalidConfig`](crate::error::ErrorCode::InvalidConfig) (operation
/// `provider.validate_config`) with one detail keyed by the offending path,
/// e.g. `provider_config.region` or `provider_config.audio.rate`. The value of
/// a secret-looking key (see [`ProviderSection::is_secret_key`]) is never
/// echoed: such errors read `invalid value (redacted)`.
pub fn parse_provider_config<T: DeserializeOwned>(config: &Config) -> Result<T, BackendError> {
    let value = serde_json::Value::Object(config.provider_config.0.clone());
    let error = match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(parsed) => return Ok(parsed),
        Err(e) => e,
    };

    let (key, mut secret) = describe_path(error.path());
    let mut path = String::from("provider_config");
    if !key.is_empty() {
        path.push('.');
        path.push_str(&key);
    }
    let inner = error.into_inner().to_string();
    // A missing field is reported by serde at its parent; point at the field.
    if let Some(field) = inner
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next())
    {
        secret |= ProviderSection::is_secret_key(field);
        path.push('.');
        path.push_str(field);
    }
    let message = redact_message(inner, secret);
    Err(BackendError::invalid_config(
        PROVIDER_OP,
        format!("invalid provider config: {path}: {message}"),
    )
    .with_detail(path, message))
}

#[cfg(test)]
mod tests {
    use super::line_column;

    #[test]
    fn line_column_counts_from_one() {
        assert_eq!(line_column("abc", 0), (1, 1));
        assert_eq!(line_column("a\nbc", 3), (2, 2));
        assert_eq!(line_column("a\n", 2), (2, 1));
        assert_eq!(line_column("é\nx", 1), (1, 2));
    }
}
