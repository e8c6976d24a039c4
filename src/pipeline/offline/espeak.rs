//! `"espeak"`: offline text-to-speech with eSpeak NG (`tts_provider = "espeak"`).
//!
//! The synthesiser is [`espeak-ng`](https://crates.io/crates/espeak-ng), a
//! pure-Rust port of eSpeak NG, with its English data (the phoneme tables,
//! the voices and the `en` dictionary) compiled into the binary: nothing is
//! installed on the system and nothing is downloaded. The first use in a
//! process unpacks that data (about 3 MB) into a private directory under the
//! system's temporary directory (`voice-backends-espeak-ng-<version>`, made
//! by the user running the process and writable by no one else; it is reused
//! by later processes), since the synthesiser reads its data from files.
//!
//! **License:** eSpeak NG, and so the `espeak-ng` crate, is
//! GPL-3.0-or-later. A binary built with the `espeak` feature includes it and
//! is therefore distributed under the terms of the GPL.
//!
//! ```toml
//! pipeline_type = "stt_tts"
//! tts_provider = "espeak"
//!
//! [components.espeak]
//! voice = "en-us"   # a voice of the data: en, en-us, en-gb, en-gb-x-rp, en-us+f3, ...
//! rate = 175        # words per minute, 80..=450
//! pitch = 50        # 0..=100
//! volume = 100      # 0..=200
//! # data_dir = "/usr/share/espeak-ng-data"   # other languages, from an eSpeak NG install
//! ```
//!
//! Every option has its default, so `[components.espeak]` may be left out.
//! The options are checked when the backend is made: a value out of range or
//! a voice the data does not have is an
//! [`InvalidConfig`](crate::ErrorCode::InvalidConfig) error naming the field
//! (`components.espeak.voice`), and unknown keys are refused.
//!
//! # Streaming
//!
//! A reply is synthesised clause by clause (eSpeak NG's unit: a sentence, or
//! the part of one up to a comma), and each clause's audio is sent as soon as
//! it is ready, in 20 ms frames of the pipeline's format, resampled from the
//! synthesiser's 22 050 Hz by the crate's [`AudioConverter`]. Synthesis runs
//! on Tokio's blocking threads, never on the async workers, so a long reply
//! does not hold up other sessions. A barge-in (dropping the
//! [`TextToSpeech::synthesize`] future) stops it at the end of the clause
//! being rendered; nothing more is sent.

use std::fs::DirBuilder;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::audio::{AudioConverter, AudioEncoding, AudioFormat, AudioFrame};
use crate::config::Violations;
use crate::error::{BackendError, ErrorCode, Result};
use crate::pipeline::TextToSpeech;
use crate::pipeline::builtin::parse_options;

/// The name the component is registered under, and its options section.
pub const NAME: &str = "espeak";

/// The synthesiser's own sample rate.
pub const NATIVE_RATE: u32 = 22_050;

/// The duration of the frames sent: 20 ms.
pub const FRAME: Duration = Duration::from_millis(20);

/// The operation named by option errors.
const OPTIONS_OP: &str = "espeak.options";

/// The operation named by synthesis errors.
const SYNTH_OP: &str = "espeak.synthesize";

/// Options of [`EspeakTts`] (`[components.espeak]`).
///
/// ```toml
/// [components.espeak]
/// voice = "en-gb"
/// rate = 160
/// pitch = 40
/// volume = 120
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct EspeakOptions {
    /// The voice: a language tag of the data (`en`, `en-us`, `en-gb`,
    /// `en-gb-scotland`, `en-gb-x-rp`, `en-029`, ...), optionally with a
    /// variant after `+` (`en-us+f3`, `en+m2`). Default `en-us`.
    pub voice: String,
    /// Speaking rate in words per minute, 80..=450. Default 175.
    pub rate: u32,
    /// Base pitch, 0..=100. Default 50.
    pub pitch: u32,
    /// Volume, 0..=200 (100 is normal). Default 100.
    pub volume: u32,
    /// An eSpeak NG data directory to use instead of the English data built
    /// in (e.g. `/usr/share/espeak-ng-data` from Debian's `espeak-ng-data`,
    /// for the other languages' voices). Default: the built-in data.
    pub data_dir: Option<PathBuf>,
}

impl Default for EspeakOptions {
    fn default() -> Self {
        EspeakOptions {
            voice: "en-us".into(),
            rate: 175,
            pitch: 50,
            volume: 100,
            data_dir: None,
        }
    }
}

impl EspeakOptions {
    /// Parses `[components.espeak]` (`null` gives the defaults) and checks
    /// the ranges (not the voice: [`EspeakTts::new`] does, with the data).
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`](crate::ErrorCode::InvalidConfig) with one `details`
    /// entry per bad field, keyed `components.espeak.<field>`; unknown keys
    /// are errors too.
    pub fn from_value(options: &serde_json::Value) -> Result<Self> {
        let options: EspeakOptions = parse_options(OPTIONS_OP, NAME, options)?;
        let mut v = Violations::new();
        let field = |f: &str| format!("components.{NAME}.{f}");
        if !(80..=450).contains(&options.rate) {
            v.push(
                field("rate"),
                format!("{} is outside 80..=450 words per minute", options.rate),
            );
        }
        if options.pitch > 100 {
            v.push(
                field("pitch"),
                format!("{} is outside 0..=100", options.pitch),
            );
        }
        if options.volume > 200 {
            v.push(
                field("volume"),
                format!("{} is outside 0..=200", options.volume),
            );
        }
        if options.voice.trim().is_empty() {
            v.push(field("voice"), "must be a voice such as \"en-us\"");
        }
        if v.is_empty() {
            Ok(options)
        } else {
            Err(v.into_error(OPTIONS_OP))
        }
    }
}

/// The eSpeak NG text-to-speech component (`tts_provider = "espeak"`).
///
/// Made from [`EspeakOptions`] by [`EspeakTts::new`] (what the pipeline does
/// with `[components.espeak]`); the registered value speaks with the default
/// options. The synthesiser is shared by every session using the same
/// options: each reply renders on its own blocking thread.
pub struct EspeakTts {
    options: EspeakOptions,
    engine: OnceLock<std::result::Result<Arc<espeak_ng::EspeakNg>, String>>,
    counters: Arc<Counters>,
}

/// What a component has rendered, for monitoring.
#[derive(Debug, Default)]
struct Counters {
    /// Clauses rendered.
    clauses: AtomicU64,
    /// Replies being rendered now.
    rendering: AtomicUsize,
}

impl std::fmt::Debug for EspeakTts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EspeakTts")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Default for EspeakTts {
    /// The component with the default options; its synthesiser is made (and
    /// the data unpacked) at its first reply.
    fn default() -> Self {
        EspeakTts {
            options: EspeakOptions::default(),
            engine: OnceLock::new(),
            counters: Arc::default(),
        }
    }
}

impl EspeakTts {
    /// A synthesiser with `options`, checked: the voice is tried on a short
    /// text, so a voice the data lacks fails here, not at the first reply.
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`](crate::ErrorCode::InvalidConfig) naming
    /// `components.espeak.voice` (with the voices the data has) or
    /// `components.espeak.data_dir`; [`PipelineError`](ErrorCode::PipelineError)
    /// when the built-in data cannot be unpacked.
    pub fn new(options: EspeakOptions) -> Result<Self> {
        let engine = build_engine(&options)?;
        Ok(EspeakTts {
            options,
            engine: OnceLock::from(Ok(engine)),
            counters: Arc::default(),
        })
    }

    /// The options it speaks with.
    pub fn options(&self) -> &EspeakOptions {
        &self.options
    }

    /// How many clauses this component has rendered (a clause is the unit
    /// of streaming: a sentence, or the part of one up to a comma).
    pub fn clauses_rendered(&self) -> u64 {
        self.counters.clauses.load(Ordering::Acquire)
    }

    /// How many replies are being rendered now, on blocking threads; a reply
    /// whose [`TextToSpeech::synthesize`] future was dropped stops within a
    /// clause.
    pub fn rendering(&self) -> usize {
        self.counters.rendering.load(Ordering::Acquire)
    }

    fn engine(&self) -> Result<Arc<espeak_ng::EspeakNg>> {
        self.engine
            .get_or_init(|| build_engine(&self.options).map_err(|e| e.message.clone()))
            .clone()
            .map_err(|m| BackendError::new(SYNTH_OP, ErrorCode::PipelineError, m))
    }

    /// Synthesises `text` whole, at the synthesiser's own rate
    /// ([`NATIVE_RATE`]), on the calling thread: for measurements and
    /// offline use, not for a session (which streams with
    /// [`TextToSpeech::synthesize`]).
    ///
    /// # Errors
    ///
    /// [`PipelineError`](ErrorCode::PipelineError) when synthesis fails.
    pub fn synthesize_native(&self, text: &str) -> Result<Vec<i16>> {
        let engine = self.engine()?;
        let mut all = Vec::new();
        render(&engine, text, |chunk| {
            all.extend_from_slice(chunk);
            true
        })?;
        Ok(all)
    }
}

/// Where the built-in data is unpacked (once per process).
fn builtin_data_dir() -> Result<PathBuf> {
    static DIR: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(unpack_builtin_data).clone().map_err(|why| {
        BackendError::new(
            SYNTH_OP,
            ErrorCode::PipelineError,
            format!("cannot unpack eSpeak NG's built-in data: {why}"),
        )
    })
}

/// Unpacks the compiled-in English data into
/// `<tmp>/voice-backends-espeak-ng-<version>`: into a fresh directory first,
/// renamed into place once complete, so a reader never sees half of it. A
/// directory already there is used when it is the current user's and no one
/// else can write to it; otherwise this process keeps its own.
fn unpack_builtin_data() -> std::result::Result<PathBuf, String> {
    let tmp = std::env::temp_dir();
    let name = format!(
        "voice-backends-espeak-ng-{}",
        espeak_ng::EspeakNg::version()
    );
    let target = tmp.join(&name);
    let staging = tmp.join(format!(
        "{name}.{}-{:016x}",
        std::process::id(),
        fastrand::u64(..)
    ));
    let mut builder = DirBuilder::new();
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(&staging)
        .map_err(|e| format!("{}: {e}", staging.display()))?;
    if trusted(&target, &staging) {
        let _ = std::fs::remove_dir(&staging);
        return Ok(target);
    }
    espeak_ng::install_bundled_language(&staging, "en")
        .map_err(|e| format!("{}: {e}", staging.display()))?;
    match std::fs::rename(&staging, &target) {
        Ok(()) => Ok(target),
        // Another process put its copy in place meanwhile.
        Err(_) if trusted(&target, &staging) => {
            let _ = std::fs::remove_dir_all(&staging);
            Ok(target)
        }
        Err(_) => Ok(staging),
    }
}

/// Whether `dir` holds unpacked data this process can trust: made by the
/// owner of `ours` (a directory just made), writable by no one else.
fn trusted(dir: &Path, ours: &Path) -> bool {
    let (Ok(meta), Ok(mine)) = (std::fs::symlink_metadata(dir), std::fs::metadata(ours)) else {
        return false;
    };
    if !meta.is_dir() || !dir.join("phontab").is_file() || !dir.join("en_dict").is_file() {
        return false;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        meta.uid() == mine.uid() && meta.mode() & 0o022 == 0
    }
    #[cfg(not(unix))]
    {
        let _ = mine;
        true
    }
}

/// The synthesiser for `options`, checked by rendering a short text.
fn build_engine(options: &EspeakOptions) -> Result<Arc<espeak_ng::EspeakNg>> {
    let field = |f: &str| format!("components.{NAME}.{f}");
    let data_dir = match &options.data_dir {
        Some(dir) => {
            if !dir.join("phontab").is_file() {
                let message = format!(
                    "{} is not an eSpeak NG data directory (it has no phontab)",
                    dir.display()
                );
                return Err(BackendError::invalid_config(
                    OPTIONS_OP,
                    format!("{}: {message}", field("data_dir")),
                )
                .with_detail(field("data_dir"), message));
            }
            dir.clone()
        }
        None => builtin_data_dir()?,
    };
    let engine = espeak_ng::EspeakNg::builder()
        .voice(options.voice.trim())
        .rate(options.rate)
        .pitch(options.pitch)
        .volume(options.volume)
        .data_dir(&data_dir)
        .build()
        .map_err(|e| {
            BackendError::new(
                SYNTH_OP,
                ErrorCode::PipelineError,
                format!("eSpeak NG: {e}"),
            )
        })?;
    let unknown_variant = options
        .voice
        .split_once('+')
        .is_some_and(|(_, variant)| espeak_ng::voices::load_variant(&data_dir, variant).is_none());
    if unknown_variant || render(&engine, "a", |_| true).is_err() {
        let voices: Vec<String> = espeak_ng::voices::list_voices(&data_dir)
            .into_iter()
            .map(|v| v.language)
            .filter(|lang| {
                let stem = lang.split('-').next().unwrap_or(lang);
                data_dir.join(format!("{stem}_dict")).is_file()
            })
            .collect();
        let message = format!(
            "unknown voice {:?}: the data has {} (a variant may follow `+`, e.g. en-us+f3)",
            options.voice,
            voices.join(", ")
        );
        return Err(BackendError::invalid_config(
            OPTIONS_OP,
            format!("{}: {message}", field("voice")),
        )
        .with_detail(field("voice"), message));
    }
    Ok(Arc::new(engine))
}

/// Renders `text` clause by clause, handing each clause's samples (at
/// [`NATIVE_RATE`]) to `chunk`, which returns `false` to stop. A panic in
/// the synthesiser is an error, not the caller's panic.
fn render(
    engine: &espeak_ng::EspeakNg,
    text: &str,
    mut chunk: impl FnMut(&[i16]) -> bool,
) -> Result<()> {
    let run = std::panic::AssertUnwindSafe(|| {
        engine.synth_streaming(text, |samples, _last| samples.is_empty() || !chunk(samples))
    });
    match std::panic::catch_unwind(run) {
        Ok(Ok(_rate)) => Ok(()),
        Ok(Err(e)) => Err(BackendError::new(
            SYNTH_OP,
            ErrorCode::PipelineError,
            format!("eSpeak NG could not synthesise the text: {e}"),
        )),
        Err(_) => Err(BackendError::new(
            SYNTH_OP,
            ErrorCode::PipelineError,
            "eSpeak NG failed (panicked) on the text",
        )),
    }
}

/// Checked components by options, so every session of a backend (and every
/// check of the same config) shares one synthesiser.
fn cached(options: EspeakOptions) -> Result<Arc<EspeakTts>> {
    static CACHE: OnceLock<Mutex<Vec<Arc<EspeakTts>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Mutex::default);
    if let Some(hit) = cache
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .find(|t| t.options == options)
    {
        return Ok(hit.clone());
    }
    let made = Arc::new(EspeakTts::new(options)?);
    let mut cache = cache.lock().unwrap_or_else(PoisonError::into_inner);
    // A handful of distinct configurations at most; keep the latest ones.
    if cache.len() >= 16 {
        cache.remove(0);
    }
    cache.push(made.clone());
    Ok(made)
}

/// What the synthesiser's thread hands the async side.
type Chunk = Result<Vec<i16>>;

#[async_trait]
impl TextToSpeech for EspeakTts {
    async fn synthesize(
        &self,
        text: &str,
        format: AudioFormat,
        out: &mpsc::Sender<AudioFrame>,
    ) -> Result<()> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(());
        }
        let engine = self.engine()?;
        let native = AudioFormat::new(AudioEncoding::PcmS16Le, NATIVE_RATE, 1);
        let mut converter = AudioConverter::new(native, format).map_err(|e| e.with_op(SYNTH_OP))?;
        // Two clauses ahead at most: the thread waits for the reply to be
        // taken, and stops when the receiver is gone (a barge-in).
        let (tx, mut rx) = mpsc::channel::<Chunk>(2);
        let owned = text.to_owned();
        let counters = self.counters.clone();
        counters.rendering.fetch_add(1, Ordering::AcqRel);
        tokio::task::spawn_blocking(move || {
            let mut sent = true;
            let done = render(&engine, &owned, |samples| {
                counters.clauses.fetch_add(1, Ordering::AcqRel);
                sent = tx.blocking_send(Ok(samples.to_vec())).is_ok();
                sent
            });
            if let Err(e) = done
                && sent
            {
                let _ = tx.blocking_send(Err(e));
            }
            counters.rendering.fetch_sub(1, Ordering::AcqRel);
        });
        // Dropping this future drops `rx`, which stops the thread at its
        // next clause.
        let frame_bytes = format.bytes_for(FRAME).max(format.bytes_per_frame());
        let mut pending: Vec<u8> = Vec::with_capacity(frame_bytes * 2);
        while let Some(chunk) = rx.recv().await {
            let samples = chunk?;
            let frame =
                AudioFrame::from_i16(NATIVE_RATE, 1, &samples).map_err(|e| e.with_op(SYNTH_OP))?;
            if let Some(converted) = converter.convert(&frame).map_err(|e| e.with_op(SYNTH_OP))? {
                pending.extend_from_slice(converted.data());
            }
            if !send_frames(&mut pending, frame_bytes, format, out, false).await? {
                return Ok(());
            }
        }
        if let Some(tail) = converter.flush().map_err(|e| e.with_op(SYNTH_OP))? {
            pending.extend_from_slice(tail.data());
        }
        send_frames(&mut pending, frame_bytes, format, out, true).await?;
        Ok(())
    }

    fn with_options(&self, options: &serde_json::Value) -> Result<Option<Arc<dyn TextToSpeech>>> {
        let options = EspeakOptions::from_value(options)?;
        Ok(Some(cached(options)?))
    }
}

/// Sends the whole frames of `pending` (and, when `last`, the rest) to
/// `out`. `Ok(false)` when `out` is closed (the reply is no longer wanted).
async fn send_frames(
    pending: &mut Vec<u8>,
    frame_bytes: usize,
    format: AudioFormat,
    out: &mpsc::Sender<AudioFrame>,
    last: bool,
) -> Result<bool> {
    let whole = pending.len() / frame_bytes * frame_bytes;
    let cut = if last {
        pending.len() / format.bytes_per_frame() * format.bytes_per_frame()
    } else {
        whole
    };
    let mut start = 0;
    while start < cut {
        let end = (start + frame_bytes).min(cut);
        let frame = AudioFrame::new(format, pending[start..end].to_vec())
            .map_err(|e| e.with_op(SYNTH_OP))?;
        if out.send(frame).await.is_err() {
            return Ok(false);
        }
        start = end;
    }
    pending.drain(..cut);
    Ok(true)
}

crate::register_component!(tts, NAME, EspeakTts::default);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn options_are_parsed_strictly_with_the_field_named() {
        assert_eq!(
            EspeakOptions::from_value(&serde_json::Value::Null).unwrap(),
            EspeakOptions::default()
        );
        let err = EspeakOptions::from_value(&json!({"speed": 3})).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidConfig);
        assert!(err.details.contains_key("components.espeak.speed"), "{err}");
        let err = EspeakOptions::from_value(&json!({"rate": 20, "pitch": 101, "volume": 300}))
            .unwrap_err();
        for f in ["rate", "pitch", "volume"] {
            assert!(
                err.details.contains_key(&format!("components.espeak.{f}")),
                "{err}"
            );
        }
        let err = EspeakOptions::from_value(&json!({"rate": "fast"})).unwrap_err();
        assert!(err.details.contains_key("components.espeak.rate"), "{err}");
        let err = EspeakOptions::from_value(&json!(["en"])).unwrap_err();
        assert!(err.details.contains_key("components.espeak"), "{err}");
    }

    #[test]
    fn unknown_voices_and_variants_are_refused_with_the_voices_there_are() {
        for voice in ["xx", "de", "en-us+nosuchvariant"] {
            let options = EspeakOptions {
                voice: voice.into(),
                ..EspeakOptions::default()
            };
            let err = EspeakTts::new(options).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidConfig, "{voice}: {err}");
            let detail = &err.details["components.espeak.voice"];
            assert!(detail.contains("en-us"), "lists the voices: {detail}");
        }
        for voice in ["en", "en-us", "en-gb", "en-us+f3"] {
            let options = EspeakOptions {
                voice: voice.into(),
                ..EspeakOptions::default()
            };
            EspeakTts::new(options).unwrap_or_else(|e| panic!("{voice}: {e}"));
        }
    }

    #[test]
    fn the_built_in_data_is_unpacked_once_and_trusted() {
        let dir = builtin_data_dir().unwrap();
        assert!(dir.join("phontab").is_file() && dir.join("en_dict").is_file());
        assert_eq!(builtin_data_dir().unwrap(), dir, "once per process");
        let err = EspeakTts::new(EspeakOptions {
            data_dir: Some("/nonexistent".into()),
            ..EspeakOptions::default()
        })
        .unwrap_err();
        assert!(
            err.details.contains_key("components.espeak.data_dir"),
            "{err}"
        );
    }
}
