//! `validate`: the config checks (parse, generic rules, the provider's own
//! validation, the registered components) and the diagnostics they print.

use std::collections::BTreeSet;
use std::fmt;
use std::io::Write;
use std::path::Path;

use crate::config::{Config, HostedStages};
use crate::error::BackendError;
use crate::pipeline::{Plan, PlanProblemKind, components};
use crate::registry::registry;

use super::locate::locate;
use super::{Failure, ValidateArgs, write_failed};

/// The file formats a config can be written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigFormat {
    /// `.toml`
    Toml,
    /// `.yaml` or `.yml`
    Yaml,
    /// `.json`
    Json,
}

impl ConfigFormat {
    /// The format given by `path`'s extension (in any case), as
    /// [`Config::from_path`] reads it.
    pub fn from_path(path: &Path) -> Option<ConfigFormat> {
        let extension = path.extension()?.to_string_lossy().to_ascii_lowercase();
        match extension.as_str() {
            "toml" => Some(ConfigFormat::Toml),
            "yaml" | "yml" => Some(ConfigFormat::Yaml),
            "json" => Some(ConfigFormat::Json),
            _ => None,
        }
    }

    /// `TOML`, `YAML` or `JSON`.
    pub fn name(self) -> &'static str {
        match self {
            ConfigFormat::Toml => "TOML",
            ConfigFormat::Yaml => "YAML",
            ConfigFormat::Json => "JSON",
        }
    }
}

/// One problem `validate` found.
///
/// `Display` is `FILE:LINE:COL: PATH: MESSAGE`, leaving out the position and
/// the path when they are unknown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file, as named on the command line.
    pub file: String,
    /// Line and column (from 1) of the offending key or value, when known.
    pub position: Option<(usize, usize)>,
    /// The field path, e.g. `latency_target` or `components.silence.min_speech`.
    pub path: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
        if let Some((line, column)) = self.position {
            write!(f, ":{line}:{column}")?;
        }
        f.write_str(": ")?;
        if let Some(path) = &self.path {
            write!(f, "{path}: ")?;
        }
        f.write_str(&self.message)
    }
}

/// `voice-backends validate FILE`: prints every problem, or `FILE: ok`.
///
/// # Errors
///
/// [`exit::FAILURE`] when the file has any problem (each printed to `out`).
///
/// [`exit::FAILURE`]: super::exit::FAILURE
pub fn validate(args: &ValidateArgs, out: &mut dyn Write) -> Result<(), Failure> {
    let file = args.file.display().to_string();
    let diagnostics = validate_file(&args.file);
    for d in &diagnostics {
        writeln!(out, "{d}").map_err(write_failed)?;
    }
    if diagnostics.is_empty() {
        writeln!(out, "{file}: ok").map_err(write_failed)?;
    }
    out.flush().map_err(write_failed)?;
    match diagnostics.len() {
        0 => Ok(()),
        n => Err(Failure::failed(format!(
            "{file}: {n} config {}; fix {} and run validate again",
            if n == 1 { "error" } else { "errors" },
            if n == 1 { "it" } else { "them" },
        ))),
    }
}

/// Every problem of the config file at `path` (empty when it is valid); an
/// unreadable file or an unsupported extension is one problem.
pub fn validate_file(path: &Path) -> Vec<Diagnostic> {
    let file = path.display().to_string();
    let whole = |message: String| {
        vec![Diagnostic {
            file: file.clone(),
            position: None,
            path: None,
            message,
        }]
    };
    let Some(format) = ConfigFormat::from_path(path) else {
        let found = match path.extension() {
            Some(ext) => format!("extension {:?}", ext.to_string_lossy()),
            None => "no extension".to_owned(),
        };
        return whole(format!(
            "unsupported config file ({found}); use .toml, .yaml, .yml or .json"
        ));
    };
    match std::fs::read_to_string(path) {
        Ok(text) => validate_str(&text, format, &file),
        Err(e) => whole(format!("cannot read the file: {e}")),
    }
}

/// Every problem of `text`, a config in `format`, reported as being in
/// `file`, in the order they appear in the file (problems without a position
/// last).
///
/// A file that does not parse (bad syntax, an unknown key, a value of the
/// wrong type) has exactly one problem, the first the parser met. A file that
/// parses is checked by [`Config::violations_for`] the stages its provider
/// hosts, by its provider's
/// [`crate::BackendProvider::validate_config`], and against the registered pipeline
/// components as a backend is when it is made ([`Plan::check`]): every name
/// must be registered, and the options of each VAD, turn detector, audio
/// processor, and speech-to-text or speech-to-speech component in use must be
/// accepted by it.
pub fn validate_str(text: &str, format: ConfigFormat, file: &str) -> Vec<Diagnostic> {
    let parsed: Result<Config, ()> = match format {
        // Too deep for the parsers: the loader refuses it (see `MAX_NESTING_DEPTH`).
        _ if crate::config::nesting_exceeded(text, format.name()) => Err(()),
        ConfigFormat::Toml => toml::from_str(text).map_err(|_| ()),
        ConfigFormat::Yaml => serde_yaml_ng::from_str(text).map_err(|_| ()),
        ConfigFormat::Json => serde_json::from_str(text).map_err(|_| ()),
    };
    let problems = match parsed {
        Ok(config) => semantic_problems(&config),
        Err(()) => vec![parse_problem(text, format)],
    };
    let mut diagnostics: Vec<Diagnostic> = problems
        .into_iter()
        .map(|p| {
            let position = p.position.or_else(|| {
                p.path
                    .as_deref()
                    .and_then(|path| locate(text, format, path))
            });
            Diagnostic {
                file: file.to_owned(),
                position,
                path: p.path,
                message: p.message,
            }
        })
        .collect();
    // In file order; those without a position last, in the order found.
    diagnostics.sort_by_key(|d| (d.position.is_none(), d.position));
    diagnostics
}

/// A problem before its file and position are known.
pub(super) struct Problem {
    position: Option<(usize, usize)>,
    pub(super) path: Option<String>,
    pub(super) message: String,
}

impl Problem {
    fn at(path: impl Into<String>, message: impl Into<String>) -> Self {
        Problem {
            position: None,
            path: Some(path.into()),
            message: message.into(),
        }
    }
}

/// The parse error of `text`, taken from the crate's loader so its message
/// is the same (and as careful with secrets) as [`Config::from_path`]'s.
fn parse_problem(text: &str, format: ConfigFormat) -> Problem {
    let result = match format {
        ConfigFormat::Toml => Config::from_toml_str(text),
        ConfigFormat::Yaml => Config::from_yaml_str(text),
        ConfigFormat::Json => Config::from_json_str(text),
    };
    let error = match result {
        Err(e) => e,
        Ok(_) => {
            return Problem {
                position: None,
                path: None,
                message: format!("does not parse as {}", format.name()),
            };
        }
    };
    // `invalid FORMAT: [line L, column C: ][PATH: ]MESSAGE`, with a detail
    // PATH -> MESSAGE when there is a path.
    let prefix = format!("invalid {}: ", format.name());
    let rest = error
        .message
        .strip_prefix(&prefix)
        .unwrap_or(&error.message);
    let (position, rest) = split_position(rest);
    match error.details.iter().find(|(key, _)| key.as_str() != "file") {
        Some((path, message)) => Problem {
            position,
            path: Some(path.clone()),
            message: format!("invalid {}: {message}", format.name()),
        },
        None => Problem {
            position,
            path: None,
            message: format!("invalid {}: {rest}", format.name()),
        },
    }
}

/// Splits `line L, column C: ` off the front of `message`.
fn split_position(message: &str) -> (Option<(usize, usize)>, &str) {
    let parse = || {
        let rest = message.strip_prefix("line ")?;
        let (line, rest) = rest.split_once(", column ")?;
        let (column, rest) = rest.split_once(": ")?;
        Some(((line.parse().ok()?, column.parse().ok()?), rest))
    };
    match parse() {
        Some((position, rest)) => (Some(position), rest),
        None => (None, message),
    }
}

/// Every semantic problem of a config that parsed.
pub(super) fn semantic_problems(config: &Config) -> Vec<Problem> {
    // Stages the provider's service runs need no component in the config.
    let hosted = registry()
        .get_provider(&config.provider)
        .map(|p| p.hosted_stages())
        .unwrap_or_default();
    let mut problems: Vec<Problem> = config
        .violations_for(hosted)
        .into_iter()
        .map(|v| Problem::at(v.path, v.message))
        .collect();
    let flagged: BTreeSet<String> = problems.iter().filter_map(|p| p.path.clone()).collect();

    if !flagged.contains("provider") {
        match registry().get_provider(&config.provider) {
            Err(e) => problems.push(Problem::at(
                "provider",
                super::with_feature_hint(&config.provider, quoted_input(e)),
            )),
            Ok(provider) => {
                if let Err(e) = provider.validate_config(config) {
                    push_error(&mut problems, "provider_config", e);
                }
            }
        }
    }
    component_problems(config, hosted, &flagged, &mut problems);
    problems
}

/// The message of a registry error about a name the config gives, the name
/// shown as every config error shows input (cut where it looks secret; see
/// [`crate::shown_in_error`]).
fn quoted_input(error: BackendError) -> String {
    crate::config::ProviderSection::redact_quoted(&error.into_fields().message)
}

/// Adds `error` as one problem per detail (keyed by field path), or as one
/// problem at `fallback` when it has none.
fn push_error(problems: &mut Vec<Problem>, fallback: &str, error: BackendError) {
    let error = error.into_fields();
    let details: Vec<_> = error
        .details
        .into_iter()
        .filter(|(key, _)| key != "file")
        .collect();
    if details.is_empty() {
        problems.push(Problem::at(fallback, error.message));
    } else {
        for (path, message) in details {
            problems.push(Problem::at(path, message));
        }
    }
}

/// Checks every component the config names against the global component
/// registries, as a backend is checked when it is made ([`Plan::check`]):
/// the name is registered, and the component accepts its options. A
/// component whose name field is already reported is left out.
fn component_problems(
    config: &Config,
    hosted: HostedStages,
    flagged: &BTreeSet<String>,
    problems: &mut Vec<Problem>,
) {
    let Err(error) = Plan::check(config, hosted, components()) else {
        return;
    };
    // One report of each problem (a name used for two stages shares its options).
    let mut seen: BTreeSet<(String, String)> = BTreeSet::new();
    for p in error.into_problems() {
        if flagged.contains(&p.field) || !seen.insert((p.path.clone(), p.error.message.clone())) {
            continue;
        }
        match p.kind {
            PlanProblemKind::Options => push_error(problems, &p.path, p.error),
            _ => problems.push(Problem::at(p.path, quoted_input(p.error))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checks make a runtime of their own for the components they open;
    /// called from async code, they must not panic dropping it.
    #[tokio::test]
    async fn validation_runs_from_async_code() {
        let valid = "provider = \"local\"\npipeline_type = \"s2s\"\ns2s_provider = \"echo\"\n";
        assert!(validate_str(valid, ConfigFormat::Toml, "ok.toml").is_empty());
        let unknown = valid.replace("\"echo\"", "\"no-such-model\"");
        let found = validate_str(&unknown, ConfigFormat::Toml, "bad.toml");
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].to_string().contains("s2s_provider"), "{found:?}");
    }

    #[test]
    fn positions_split_off_messages() {
        assert_eq!(
            split_position("line 3, column 7: timeout: bad"),
            (Some((3, 7)), "timeout: bad")
        );
        assert_eq!(split_position("no position"), (None, "no position"));
    }

    #[test]
    fn diagnostics_display_with_and_without_position() {
        let mut d = Diagnostic {
            file: "c.toml".into(),
            position: Some((4, 1)),
            path: Some("timeout".into()),
            message: "bad".into(),
        };
        assert_eq!(d.to_string(), "c.toml:4:1: timeout: bad");
        d.position = None;
        d.path = None;
        assert_eq!(d.to_string(), "c.toml: bad");
    }

    #[cfg(feature = "pipecat")]
    #[test]
    fn a_provider_hosting_stt_and_tts_needs_no_components() {
        let pipecat = "provider = \"pipecat\"\n[provider_config]\nurl = \"ws://127.0.0.1:8765/\"\n";
        assert_eq!(validate_str(pipecat, ConfigFormat::Toml, "p.toml"), []);
        let local = "provider = \"local\"\n";
        let problems = validate_str(local, ConfigFormat::Toml, "l.toml");
        assert!(
            problems
                .iter()
                .any(|d| d.to_string().contains("requires stt_provider")),
            "{problems:?}"
        );
    }
}
