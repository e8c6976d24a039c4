//! Overlaying environment variables on a [`Config`], always explicitly.
//!
//! Nothing else in the crate reads the process environment: loading a file
//! never does, [`Config::apply_env`] and [`Config::from_env_vars`] read only the
//! variables they are given, and [`Config::from_env`] /
//! [`Config::apply_process_env`] are the only functions that read
//! [`std::env::vars_os`].

use std::collections::BTreeMap;
use std::time::Duration;

use serde::de::DeserializeOwned;

use super::secret::{quoted, redact_quoted};
use super::{Config, ProcessorConfig, ProviderSection, Violations, shown_in_error};
use crate::error::BackendError;

const ENV_OP: &str = "config.env";

/// The upper-cased names of the top-level [`Config`] fields.
const FIELDS: [&str; 27] = [
    "PROVIDER",
    "PROVIDER_CONFIG",
    "PIPELINE_TYPE",
    "STT_PROVIDER",
    "TTS_PROVIDER",
    "S2S_PROVIDER",
    "VAD_PROVIDER",
    "TURN_DETECTION_PROVIDER",
    "NOISE_CANCELLATION_PROVIDER",
    "LATENCY_TARGET",
    "TIMEOUT",
    "MAX_RETRIES",
    "RETRY_DELAY",
    "MAX_CONCURRENT_SESSIONS",
    "ENABLE_TRACING",
    "ENABLE_METRICS",
    "ENABLE_LOGGING",
    "LOG_LEVEL",
    "PROCESSORS",
    "RATE_LIMIT_PER_SECOND",
    "RATE_LIMIT_BURST",
    "COMPONENTS",
    "STT_FALLBACKS",
    "TTS_FALLBACKS",
    "S2S_FALLBACKS",
    "FAILOVER",
    "PREEMPTIVE",
];

/// The marker that starts a `provider_config` key in a variable name, and
/// separates nested keys.
const KEY_SEPARATOR: &str = "__";

impl Config {
    /// Overrides fields of this config with the variables of `vars` named
    /// `{prefix}_{FIELD}`, then validates the result.
    ///
    /// `FIELD` is a top-level field name upper-cased; values are parsed as in
    /// config files:
    ///
    /// | variable | value |
    /// | --- | --- |
    /// | `VB_PROVIDER`, `VB_STT_PROVIDER`, ... | a name; an empty value unsets an optional component |
    /// | `VB_LATENCY_TARGET`, `VB_TIMEOUT`, `VB_RETRY_DELAY` | a duration: `250ms`, `30s`, `1m 30s` |
    /// | `VB_MAX_RETRIES`, `VB_MAX_CONCURRENT_SESSIONS` | a whole number |
    /// | `VB_ENABLE_TRACING`, `VB_ENABLE_METRICS`, `VB_ENABLE_LOGGING` | `true` or `false` |
    /// | `VB_PIPELINE_TYPE` | `stt_tts` or `s2s` |
    /// | `VB_STT_FALLBACKS`, `VB_TTS_FALLBACKS`, `VB_S2S_FALLBACKS` | names separated by commas, replacing the list; empty clears it |
    /// | `VB_FAILOVER` | a JSON object, replacing `[failover]`: `{"timeout": "2s"}` |
    /// | `VB_PREEMPTIVE` | a JSON object, replacing `[preemptive]`: `{"enabled": true, "stable_for": "200ms"}` |
    /// | `VB_LOG_LEVEL` | `trace`, `debug`, `info`, `warn` or `error` |
    /// | `VB_PROCESSORS` | a JSON array of processors, replacing the list |
    /// | `VB_PROVIDER_CONFIG` | a JSON object, merged (deeply) over `provider_config` |
    /// | `VB_PROVIDER_CONFIG__API_KEY` | the string value of `provider_config.api_key` |
    /// | `VB_PROVIDER_CONFIG__AUDIO__RATE` | the string value of `provider_config.audio.rate` |
    ///
    /// Keys after `PROVIDER_CONFIG__` are lower-cased, `__` separates nested
    /// keys, and they are applied after `VB_PROVIDER_CONFIG`. Variables without
    /// the `{prefix}_` start are ignored; a trailing `_` on `prefix` is
    /// optional. Nothing is read from the process environment.
    ///
    /// ```
    /// let mut config = voice_backends::Config::from_toml_str(
    ///     "provider = \"local\"\npipeline_type = \"s2s\"\ns2s_provider = \"echo\"",
    /// )?;
    /// config.apply_env("VB", [("VB_MAX_RETRIES", "5"), ("HOME", "/root")])?;
    /// assert_eq!(config.max_retries, 5);
    /// # Ok::<(), voice_backends::BackendError>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`](crate::error::ErrorCode::InvalidConfig) (operation
    /// `config.env`) listing, by variable name, every variable that names no
    /// field (with the accepted names) or holds a value that does not parse;
    /// or, when all parse, every violation of the result (see
    /// [`Config::violations`]). The value of a secret-looking variable (see
    /// [`ProviderSection::is_secret_key`]) never appears in a message, and
    /// other values are quoted as [`shown_in_error`]
    /// shows them (a secret-looking value is cut). A JSON value nested deeper
    /// than [`MAX_NESTING_DEPTH`](crate::MAX_NESTING_DEPTH) is refused. On
    /// error the config is left unchanged.
    pub fn apply_env<I, K, V>(&mut self, prefix: &str, vars: I) -> Result<(), BackendError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let prefix = normalize_prefix(prefix)?;
        let vars = owned_vars(vars);
        self.overlay_checked(prefix, vars, Violations::new())
    }

    /// A config made only from the variables of `vars` named
    /// `{prefix}_{FIELD}` (as for [`Config::apply_env`]), starting from the
    /// defaults of [`Config::new`]. `{prefix}_PROVIDER` is required.
    ///
    /// # Errors
    ///
    /// As [`Config::apply_env`], plus a missing `{prefix}_PROVIDER`.
    pub fn from_env_vars<I, K, V>(prefix: &str, vars: I) -> Result<Config, BackendError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let prefix = normalize_prefix(prefix)?;
        let vars = owned_vars(vars);
        from_vars(prefix, vars, Violations::new())
    }

    /// A config made from the process environment's variables named
    /// `{prefix}_{FIELD}`, as [`Config::from_env_vars`] with
    /// [`std::env::vars_os`]. `{prefix}_PROVIDER` is required.
    ///
    /// # Errors
    ///
    /// As [`Config::from_env_vars`]; a prefixed variable whose name or value is
    /// not valid UTF-8 is reported too.
    pub fn from_env(prefix: &str) -> Result<Config, BackendError> {
        let prefix = normalize_prefix(prefix)?;
        let mut violations = Violations::new();
        let vars = process_vars(prefix, &mut violations);
        from_vars(prefix, vars, violations)
    }

    /// Overrides fields of this config with the process environment's
    /// variables named `{prefix}_{FIELD}`: [`Config::apply_env`] with
    /// [`std::env::vars_os`].
    ///
    /// # Errors
    ///
    /// As [`Config::apply_env`]; a prefixed variable whose name or value is not
    /// valid UTF-8 is reported too. On error the config is left unchanged.
    pub fn apply_process_env(&mut self, prefix: &str) -> Result<(), BackendError> {
        let prefix = normalize_prefix(prefix)?;
        let mut violations = Violations::new();
        let vars = process_vars(prefix, &mut violations);
        self.overlay_checked(prefix, vars, violations)
    }

    /// Overlays `vars` on a copy; keeps it only if every variable parsed and
    /// the result is valid.
    fn overlay_checked(
        &mut self,
        prefix: &str,
        vars: Vec<(String, String)>,
        mut violations: Violations,
    ) -> Result<(), BackendError> {
        let mut next = self.clone();
        overlay(&mut next, prefix, vars, &mut violations);
        violations.into_result(ENV_OP)?;
        next.violations_for_any_provider().into_result(ENV_OP)?;
        *self = next;
        Ok(())
    }
}

fn from_vars(
    prefix: &str,
    vars: Vec<(String, String)>,
    mut violations: Violations,
) -> Result<Config, BackendError> {
    let mut config = Config::new("");
    let provider_var = format!("{prefix}_PROVIDER");
    if !vars.iter().any(|(name, _)| *name == provider_var) {
        violations.push(
            provider_var,
            "is required: it names the provider, e.g. \"local\"",
        );
    }
    overlay(&mut config, prefix, vars, &mut violations);
    violations.into_result(ENV_OP)?;
    config.violations_for_any_provider().into_result(ENV_OP)?;
    Ok(config)
}

/// `prefix` without a trailing `_`; an empty prefix is refused because it
/// would claim every variable, and one that is not upper-case letters,
/// digits and `_` because the field names it prefixes are (it could match
/// nothing, silently).
fn normalize_prefix(prefix: &str) -> Result<&str, BackendError> {
    let trimmed = prefix.strip_suffix('_').unwrap_or(prefix);
    if trimmed.is_empty() {
        return Err(BackendError::invalid_config(
            ENV_OP,
            "the environment variable prefix must be non-empty, e.g. \"VB\"",
        ));
    }
    let well_formed = trimmed
        .bytes()
        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
        && !trimmed.starts_with(|c: char| c.is_ascii_digit());
    if !well_formed {
        let shown: String = trimmed.chars().take(40).collect();
        // The suggestion is the prefix itself, upper-cased: none for one that
        // looks secret.
        let suggestion = if super::looks_secret(&shown) {
            String::new()
        } else {
            format!(
                ": e.g. {:?}",
                shown
                    .to_ascii_uppercase()
                    .replace(|c: char| !c.is_ascii_alphanumeric(), "_")
            )
        };
        return Err(BackendError::invalid_config(
            ENV_OP,
            format!(
                "the environment variable prefix {} must be upper-case letters, digits and _ \
                 (not starting with a digit), as the variables are{suggestion}",
                quoted(&shown),
            ),
        ));
    }
    Ok(trimmed)
}

/// The process environment's variables that start with `{prefix}_`; those
/// whose name or value is not UTF-8 are reported instead.
fn process_vars(prefix: &str, violations: &mut Violations) -> Vec<(String, String)> {
    let start = format!("{prefix}_");
    let mut vars = Vec::new();
    for (name, value) in std::env::vars_os() {
        let lossy = name.to_string_lossy().into_owned();
        if !lossy.starts_with(&start) {
            continue;
        }
        let shown = shown_in_error(&lossy).into_owned();
        match (name.into_string(), value.into_string()) {
            (Ok(name), Ok(value)) => vars.push((name, value)),
            (Err(_), _) => violations.push(shown, "the variable's name is not valid UTF-8"),
            (Ok(_), Err(_)) => violations.push(shown, "the value is not valid UTF-8"),
        }
    }
    vars
}

/// Applies every `{prefix}_*` variable of `vars` to `config`, recording the
/// ones that name no field or do not parse.
fn overlay(
    config: &mut Config,
    prefix: &str,
    vars: Vec<(String, String)>,
    violations: &mut Violations,
) {
    let start = format!("{prefix}_");
    // Sorted by name (the last of duplicates wins), which also applies
    // `{prefix}_PROVIDER_CONFIG` before the `{prefix}_PROVIDER_CONFIG__*` keys.
    let vars: BTreeMap<String, String> = vars
        .into_iter()
        .filter(|(name, _)| name.starts_with(&start))
        .collect();
    for (name, value) in &vars {
        let field = &name[start.len()..];
        let shown = || shown_in_error(name).into_owned();
        if !is_known(field) {
            violations.push(shown(), unknown_message(prefix, field));
        } else if let Err(message) = apply_var(config, field, value) {
            violations.push(shown(), message);
        }
    }
}

fn is_known(field: &str) -> bool {
    FIELDS.contains(&field) || field.starts_with("PROVIDER_CONFIG__")
}

/// Sets the field named `field` (upper-cased, without the prefix) from `value`.
/// `field` is one [`is_known`] accepts.
fn apply_var(config: &mut Config, field: &str, value: &str) -> Result<(), String> {
    let shown = shown_value(field, value);
    match field {
        "PROVIDER" => config.provider = value.to_owned(),
        "PIPELINE_TYPE" => {
            config.pipeline_type = parse_enum(value, &shown, "stt_tts or s2s")?;
        }
        "STT_PROVIDER" => config.stt_provider = optional(value),
        "TTS_PROVIDER" => config.tts_provider = optional(value),
        "S2S_PROVIDER" => config.s2s_provider = optional(value),
        "STT_FALLBACKS" => config.stt_fallbacks = name_list(value),
        "TTS_FALLBACKS" => config.tts_fallbacks = name_list(value),
        "S2S_FALLBACKS" => config.s2s_fallbacks = name_list(value),
        "FAILOVER" => {
            let json = parse_json(value, "a JSON object of failover settings")?;
            config.failover = serde_json::from_value(json).map_err(|e| {
                format!(
                    "is not a JSON object of failover settings: {}",
                    redact_quoted(&e.to_string())
                )
            })?;
        }
        "PREEMPTIVE" => {
            let json = parse_json(value, "a JSON object of preemptive reply settings")?;
            config.preemptive = serde_json::from_value(json).map_err(|e| {
                format!(
                    "is not a JSON object of preemptive reply settings: {}",
                    redact_quoted(&e.to_string())
                )
            })?;
        }
        "VAD_PROVIDER" => config.vad_provider = optional(value),
        "TURN_DETECTION_PROVIDER" => config.turn_detection_provider = optional(value),
        "NOISE_CANCELLATION_PROVIDER" => config.noise_cancellation_provider = optional(value),
        "LATENCY_TARGET" => config.latency_target = parse_duration(value, &shown)?,
        "TIMEOUT" => config.timeout = parse_duration(value, &shown)?,
        "RETRY_DELAY" => config.retry_delay = parse_duration(value, &shown)?,
        "MAX_RETRIES" => config.max_retries = parse_u32(value, &shown)?,
        "MAX_CONCURRENT_SESSIONS" => config.max_concurrent_sessions = parse_u32(value, &shown)?,
        "ENABLE_TRACING" => config.enable_tracing = parse_bool(value, &shown)?,
        "ENABLE_METRICS" => config.enable_metrics = parse_bool(value, &shown)?,
        "ENABLE_LOGGING" => config.enable_logging = parse_bool(value, &shown)?,
        "LOG_LEVEL" => {
            config.log_level = parse_enum(value, &shown, "trace, debug, info, warn or error")?;
        }
        "PROCESSORS" => {
            let json = parse_json(value, "a JSON array of processors")?;
            config.processors =
                serde_json::from_value::<Vec<ProcessorConfig>>(json).map_err(|e| {
                    format!(
                        "is not a JSON array of processors: {}",
                        redact_quoted(&e.to_string())
                    )
                })?;
        }
        "RATE_LIMIT_PER_SECOND" => {
            config.rate_limit_per_second = value
                .parse()
                .map_err(|_| format!("{shown} is not a number"))?;
        }
        "RATE_LIMIT_BURST" => config.rate_limit_burst = parse_u32(value, &shown)?,
        "COMPONENTS" => {
            let json = parse_json(value, "a JSON object of component options")?;
            let parsed = serde_json::from_value::<BTreeMap<String, ProviderSection>>(json)
                .map_err(|_| {
                    "is not a JSON object of component names to objects of options".to_owned()
                })?;
            for (name, options) in parsed {
                merge(&mut config.components.entry(name).or_default().0, options.0);
            }
        }
        "PROVIDER_CONFIG" => match parse_json(value, "a JSON object")? {
            serde_json::Value::Object(map) => merge(&mut config.provider_config.0, map),
            other => {
                return Err(format!("must be a JSON object, not {}", json_kind(&other)));
            }
        },
        _ => {
            if let Some(keys) = field.strip_prefix("PROVIDER_CONFIG__") {
                set_provider_key(config, keys, value)?;
            }
        }
    }
    Ok(())
}

/// How a value may be shown in a message: not at all when its variable looks
/// secret, otherwise quoted as [`shown_in_error`] shows it (cut when the value
/// itself looks secret).
fn shown_value(field: &str, value: &str) -> String {
    if ProviderSection::is_secret_key(field) {
        "the value (redacted)".to_owned()
    } else {
        quoted(value)
    }
}

/// A comma-separated list of names (each trimmed); empty for an empty value.
fn name_list(value: &str) -> Vec<String> {
    if value.trim().is_empty() {
        return Vec::new();
    }
    value.split(',').map(|n| n.trim().to_owned()).collect()
}

fn optional(value: &str) -> Option<String> {
    (!value.is_empty()).then(|| value.to_owned())
}

fn parse_enum<T: DeserializeOwned>(value: &str, shown: &str, expected: &str) -> Result<T, String> {
    serde_json::from_value(serde_json::Value::String(value.to_owned()))
        .map_err(|_| format!("{shown} is not one of {expected}"))
}

fn parse_duration(value: &str, shown: &str) -> Result<Duration, String> {
    humantime::parse_duration(value).map_err(|e| {
        // The parser's message may repeat part of the value (the unit, or the
        // number before a missing unit): left out when the value looks secret.
        let why = if super::looks_secret(value) {
            String::new()
        } else {
            format!(" ({})", redact_quoted(&e.to_string()))
        };
        format!("{shown} is not a duration such as 500ms, 30s or 1m 30s{why}")
    })
}

fn parse_u32(value: &str, shown: &str) -> Result<u32, String> {
    value
        .parse()
        .map_err(|_| format!("{shown} is not a whole number in 0..={}", u32::MAX))
}

fn parse_bool(value: &str, shown: &str) -> Result<bool, String> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(format!("{shown} is not true or false")),
    }
}

/// Parses JSON without ever quoting the input: only syntax errors (which give
/// a position, not the text) are possible here, and nesting deeper than
/// [`MAX_NESTING_DEPTH`](super::MAX_NESTING_DEPTH) is refused before parsing.
fn parse_json(value: &str, expected: &str) -> Result<serde_json::Value, String> {
    if let Some(at) = super::depth::json(value) {
        return Err(format!(
            "is not {expected}: {} (at column {})",
            super::depth::too_deep_message(),
            value[..at].chars().count() + 1
        ));
    }
    serde_json::from_str(value)
        .map_err(|e| format!("is not {expected}: {}", redact_quoted(&e.to_string())))
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Merges `src` over `dst`: objects merge key by key, anything else replaces.
fn merge(
    dst: &mut serde_json::Map<String, serde_json::Value>,
    src: serde_json::Map<String, serde_json::Value>,
) {
    for (key, value) in src {
        match (dst.get_mut(&key), value) {
            (Some(serde_json::Value::Object(d)), serde_json::Value::Object(s)) => merge(d, s),
            (_, value) => {
                dst.insert(key, value);
            }
        }
    }
}

/// Sets `provider_config.a.b` from the `A__B` of `{prefix}_PROVIDER_CONFIG__A__B`.
fn set_provider_key(config: &mut Config, keys: &str, value: &str) -> Result<(), String> {
    let keys: Vec<String> = keys
        .split(KEY_SEPARATOR)
        .map(str::to_ascii_lowercase)
        .collect();
    if keys.iter().any(String::is_empty) {
        return Err(format!(
            "names an empty provider_config key; use PROVIDER_CONFIG{KEY_SEPARATOR}<KEY>, with {KEY_SEPARATOR} between nested keys"
        ));
    }
    let (last, parents) = keys.split_last().expect("split yields at least one key");
    let mut map = &mut config.provider_config.0;
    let mut path = String::from("provider_config");
    for key in parents {
        path.push('.');
        path.push_str(&shown_in_error(key));
        let entry = map
            .entry(key.clone())
            .or_insert_with(|| serde_json::Value::Object(serde_json::Map::new()));
        map = match entry {
            serde_json::Value::Object(m) => m,
            other => {
                return Err(format!(
                    "cannot set a key inside {path}: it is {}, not an object",
                    json_kind(other)
                ));
            }
        };
    }
    map.insert(last.clone(), serde_json::Value::String(value.to_owned()));
    Ok(())
}

/// The message for a variable that names no field, with a suggestion and
/// every accepted name.
fn unknown_message(prefix: &str, field: &str) -> String {
    let suggestion = if let Some(rest) = field.strip_prefix("PROVIDER_CONFIG_") {
        Some(format!(
            "PROVIDER_CONFIG{KEY_SEPARATOR}{}",
            shown_in_error(rest)
        ))
    } else {
        FIELDS
            .iter()
            .map(|f| (edit_distance(field, f), *f))
            .filter(|(d, _)| *d <= 3)
            .min()
            .map(|(_, f)| f.to_owned())
    };
    let accepted = FIELDS
        .iter()
        .map(|f| format!("{prefix}_{f}"))
        .chain(std::iter::once(format!(
            "{prefix}_PROVIDER_CONFIG{KEY_SEPARATOR}<KEY>"
        )))
        .collect::<Vec<_>>()
        .join(", ");
    match suggestion {
        Some(s) => {
            format!("names no config field (did you mean {prefix}_{s}?); accepted: {accepted}")
        }
        None => format!("names no config field; accepted: {accepted}"),
    }
}

/// Levenshtein distance, for typo suggestions.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (prev + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            prev = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// The variables as owned name/value pairs.
fn owned_vars<I, K, V>(vars: I) -> Vec<(String, String)>
where
    I: IntoIterator<Item = (K, V)>,
    K: AsRef<str>,
    V: AsRef<str>,
{
    vars.into_iter()
        .map(|(k, v)| (k.as_ref().to_owned(), v.as_ref().to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::edit_distance;

    #[test]
    fn edit_distance_counts_edits() {
        assert_eq!(edit_distance("TIMEOUT", "TIMEOUT"), 0);
        assert_eq!(edit_distance("TIMEOTU", "TIMEOUT"), 2);
        assert_eq!(edit_distance("LATENCY_TARGT", "LATENCY_TARGET"), 1);
        assert_eq!(edit_distance("", "ABC"), 3);
    }
}
