//! `"pocketsphinx"`: offline speech-to-text with CMU PocketSphinx
//! (`stt_provider = "pocketsphinx"`).
//!
//! The recogniser is the system's `libpocketsphinx` (Debian's
//! `libpocketsphinx-dev`) with a model on disk, by default the US English
//! model of Debian's `pocketsphinx-en-us` package
//! (`/usr/share/pocketsphinx/model/en-us`). Nothing is downloaded.
//!
//! ```toml
//! pipeline_type = "stt_tts"
//! stt_provider = "pocketsphinx"
//!
//! [components.pocketsphinx]
//! model_dir = "/usr/share/pocketsphinx/model/en-us"   # the default
//! # acoustic_model = ".../en-us"               # default <model_dir>/en-us
//! # dictionary = ".../cmudict-en-us.dict"      # default <model_dir>/cmudict-en-us.dict
//! # language_model = ".../en-us.lm.bin"       # default <model_dir>/en-us.lm.bin
//! # grammar = "commands.gram"                  # a JSGF grammar instead of the language model
//! # keyphrase = "hello computer"               # or spot one phrase instead
//! # keyphrase_threshold = 1e-20
//! partial_every = "300ms"                      # how often a partial transcript may come
//! ```
//!
//! Every option has its default, so `[components.pocketsphinx]` may be left
//! out. The options are checked when the backend is made: a missing model
//! directory is an [`InvalidConfig`](crate::ErrorCode::InvalidConfig) error
//! naming `components.pocketsphinx.model_dir` that says which package to
//! install (`apt install pocketsphinx-en-us`); a missing file, a grammar that
//! does not parse, `grammar` with `keyphrase`, or an unknown key are refused
//! the same way, each naming its field.
//!
//! # Recognition
//!
//! Each session's stream decodes its turns as they come, 16 kHz mono
//! ([`INTERNAL_FORMAT`]): a [`SttEvent::Partial`] whenever the hypothesis
//! changes (looked at every `partial_every` of audio) while the user speaks,
//! and one [`SttEvent::Final`] per turn when the turn ends (empty when
//! nothing was recognised). With a grammar the transcript is a sentence of
//! the grammar, with a keyphrase it is the phrase (or empty).
//!
//! # Threads and decoders
//!
//! A PocketSphinx decoder is not thread-safe, and decoding is CPU work: each
//! stream owns one decoder on a thread of its own, fed through a queue
//! (30 s of audio; [`SttStream::push_audio`] never blocks), so no async
//! worker ever decodes. Creating a decoder loads the model (about half a
//! second to a second for the default one); decoders are therefore kept in a
//! process-wide pool per configuration when their stream ends and handed to
//! the next stream, and checking the options when a backend is made warms
//! one up in the background, so sessions do not wait for the model. A
//! decoder's adaptive state (its cepstral mean) carries over between
//! sessions, as it does between turns. A decoder's first utterance is
//! decoded twice (the second time with the mean it has adapted to the
//! speaker): a cold decoder often hears its first utterance as nothing.
//!
//! The library's own log (to stderr, hundreds of lines per decoder) is
//! turned off for the process when the first decoder is made.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, Once, OnceLock, PoisonError};
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::audio::{AudioFrame, to_i16_samples};
use crate::config::Violations;
use crate::error::{BackendError, ErrorCode, Result};
use crate::pipeline::builtin::parse_options;
use crate::pipeline::{INTERNAL_FORMAT, SpeechToText, SttEvent, SttStream};

/// The name the component is registered under, and its options section.
pub const NAME: &str = "pocketsphinx";

/// Where Debian's `pocketsphinx-en-us` puts its model: the default `model_dir`.
pub const DEFAULT_MODEL_DIR: &str = "/usr/share/pocketsphinx/model/en-us";

/// The operation named by option errors.
const OPTIONS_OP: &str = "pocketsphinx.options";

/// The operation named by recognition errors.
const STT_OP: &str = "pocketsphinx.stt";

/// Frames a stream's queue holds: 30 s of 20 ms audio.
const STREAM_QUEUE: usize = 1_500;

/// Idle decoders kept per configuration.
const POOL_LIMIT: usize = 4;

/// Options of [`PocketSphinxStt`] (`[components.pocketsphinx]`).
///
/// ```toml
/// [components.pocketsphinx]
/// model_dir = "/usr/share/pocketsphinx/model/en-us"
/// grammar = "/etc/myapp/commands.gram"
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct PocketSphinxOptions {
    /// The model directory. Default [`DEFAULT_MODEL_DIR`] (Debian's
    /// `pocketsphinx-en-us`).
    pub model_dir: PathBuf,
    /// The acoustic model directory (`mdef`, `means`, ...). Default
    /// `<model_dir>/en-us`.
    pub acoustic_model: Option<PathBuf>,
    /// The pronunciation dictionary. Default `<model_dir>/cmudict-en-us.dict`.
    pub dictionary: Option<PathBuf>,
    /// The n-gram language model (`.lm`, `.lm.bin`, `.DMP`). Default
    /// `<model_dir>/en-us.lm.bin`. Not used with `grammar` or `keyphrase`.
    pub language_model: Option<PathBuf>,
    /// A JSGF grammar file: recognise only its sentences.
    pub grammar: Option<PathBuf>,
    /// A phrase to spot (keyword search) instead of free speech; its words
    /// must be in the dictionary.
    pub keyphrase: Option<String>,
    /// The keyphrase's detection threshold, above 0 and at most 1
    /// (smaller finds more, with more false alarms). Default 1e-20.
    pub keyphrase_threshold: f64,
    /// How often (in audio) the stream looks for a new partial transcript,
    /// from 20ms to 5s. Default 300ms.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub partial_every: Duration,
}

impl Default for PocketSphinxOptions {
    fn default() -> Self {
        PocketSphinxOptions {
            model_dir: PathBuf::from(DEFAULT_MODEL_DIR),
            acoustic_model: None,
            dictionary: None,
            language_model: None,
            grammar: None,
            keyphrase: None,
            keyphrase_threshold: 1e-20,
            partial_every: Duration::from_millis(300),
        }
    }
}

/// What a decoder is made with: the arguments PocketSphinx takes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct DecoderArgs(Vec<String>);

impl PocketSphinxOptions {
    /// Parses `[components.pocketsphinx]` (`null` gives the defaults) and
    /// checks it against the disk: the model directory and each file exist,
    /// the grammar parses.
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`](crate::ErrorCode::InvalidConfig) with one `details`
    /// entry per bad field, keyed `components.pocketsphinx.<field>`; a
    /// missing model directory's message says to install
    /// `pocketsphinx-en-us`. Unknown keys are errors too.
    pub fn from_value(options: &serde_json::Value) -> Result<Self> {
        let options: PocketSphinxOptions = parse_options(OPTIONS_OP, NAME, options)?;
        options.check()?;
        Ok(options)
    }

    fn acoustic_model(&self) -> PathBuf {
        self.acoustic_model
            .clone()
            .unwrap_or_else(|| self.model_dir.join("en-us"))
    }

    fn dictionary(&self) -> PathBuf {
        self.dictionary
            .clone()
            .unwrap_or_else(|| self.model_dir.join("cmudict-en-us.dict"))
    }

    fn language_model(&self) -> PathBuf {
        self.language_model
            .clone()
            .unwrap_or_else(|| self.model_dir.join("en-us.lm.bin"))
    }

    fn check(&self) -> Result<()> {
        let mut v = Violations::new();
        let field = |f: &str| format!("components.{NAME}.{f}");
        let has_nul = |p: &Path| p.as_os_str().to_string_lossy().contains('\0');
        if !self.model_dir.is_dir() {
            let hint = if self.model_dir == Path::new(DEFAULT_MODEL_DIR) {
                "install the US English model: apt install pocketsphinx-en-us".to_owned()
            } else {
                format!(
                    "set it to a PocketSphinx model directory (the default, {DEFAULT_MODEL_DIR}, \
                     comes with: apt install pocketsphinx-en-us)"
                )
            };
            v.push(
                field("model_dir"),
                format!("{} is not a directory: {hint}", self.model_dir.display()),
            );
            return Err(v.into_error(OPTIONS_OP));
        }
        let acoustic = self.acoustic_model();
        if has_nul(&acoustic) || !acoustic.join("mdef").is_file() {
            v.push(
                field("acoustic_model"),
                format!(
                    "{} is not an acoustic model directory (it has no mdef)",
                    acoustic.display()
                ),
            );
        }
        let file = |v: &mut Violations, name: &str, path: &Path| {
            if has_nul(path) || !path.is_file() {
                v.push(field(name), format!("{} is not a file", path.display()));
            }
        };
        file(&mut v, "dictionary", &self.dictionary());
        if let Some(grammar) = &self.grammar {
            file(&mut v, "grammar", grammar);
            if grammar.is_file()
                && !has_nul(grammar)
                && pocketsphinx::Jsgf::parse_file(grammar.as_os_str()).is_err()
            {
                v.push(
                    field("grammar"),
                    format!("{} is not a JSGF grammar that parses", grammar.display()),
                );
            }
        }
        if let Some(phrase) = &self.keyphrase {
            if self.grammar.is_some() {
                v.push(
                    field("keyphrase"),
                    "set either grammar or keyphrase, not both",
                );
            } else if phrase.trim().is_empty() || phrase.contains('\0') {
                v.push(field("keyphrase"), "must be a phrase of dictionary words");
            }
        }
        if self.grammar.is_none() && self.keyphrase.is_none() {
            file(&mut v, "language_model", &self.language_model());
        }
        if !(self.keyphrase_threshold > 0.0 && self.keyphrase_threshold <= 1.0) {
            v.push(
                field("keyphrase_threshold"),
                format!("{} is outside (0, 1]", self.keyphrase_threshold),
            );
        }
        if !(Duration::from_millis(20)..=Duration::from_secs(5)).contains(&self.partial_every) {
            v.push(
                field("partial_every"),
                format!(
                    "{} is outside 20ms..=5s",
                    humantime::format_duration(self.partial_every)
                ),
            );
        }
        if v.is_empty() {
            Ok(())
        } else {
            Err(v.into_error(OPTIONS_OP))
        }
    }

    fn decoder_args(&self) -> DecoderArgs {
        let path = |p: PathBuf| p.to_string_lossy().into_owned();
        let mut args = vec![
            "pocketsphinx".to_owned(),
            "-hmm".into(),
            path(self.acoustic_model()),
            "-dict".into(),
            path(self.dictionary()),
            "-samprate".into(),
            INTERNAL_FORMAT.sample_rate.to_string(),
        ];
        match (&self.grammar, &self.keyphrase) {
            (Some(grammar), _) => args.extend(["-jsgf".into(), path(grammar.clone())]),
            (None, Some(phrase)) => args.extend([
                "-keyphrase".into(),
                phrase.trim().to_lowercase(),
                "-kws_threshold".into(),
                format!("{:e}", self.keyphrase_threshold),
            ]),
            (None, None) => args.extend(["-lm".into(), path(self.language_model())]),
        }
        DecoderArgs(args)
    }
}

/// A decoder that may move to another thread: PocketSphinx keeps no
/// per-thread state, it only must not be used by two threads at once, and a
/// `Decoder` is only ever owned (by one stream's thread, or the pool).
/// The second field: the decoder has finished an utterance (it is warm;
/// see [`decode`]).
struct Decoder(pocketsphinx::PsDecoder, bool);

// SAFETY: see the type's documentation: the decoder is used by one thread
// at a time, moved between them only through the pool's mutex.
unsafe impl Send for Decoder {}

unsafe extern "C" {
    /// sphinxbase's log destination; null turns the log off.
    fn err_set_logfp(stream: *mut std::ffi::c_void);
}

/// Makes a decoder (slow: it loads the model) on the calling thread.
fn create_decoder(args: &DecoderArgs) -> std::result::Result<Decoder, String> {
    static QUIET: Once = Once::new();
    // SAFETY: sets a global pointer once, before any decoder of this crate
    // exists to log through it.
    QUIET.call_once(|| unsafe { err_set_logfp(std::ptr::null_mut()) });
    let argv: Vec<&str> = args.0.iter().map(String::as_str).collect();
    let made = std::panic::catch_unwind(|| {
        let config = pocketsphinx::CmdLn::init(true, &argv).map_err(|e| e.to_string())?;
        // `PsDecoder::init` panics when the model does not load.
        Ok::<_, String>(pocketsphinx::PsDecoder::init(config))
    });
    match made {
        Ok(Ok(decoder)) => Ok(Decoder(decoder, false)),
        Ok(Err(e)) => Err(format!("PocketSphinx refused its configuration: {e}")),
        Err(_) => Err(format!(
            "PocketSphinx could not load the model ({}): check the files",
            args.0[1..].join(" ")
        )),
    }
}

/// Idle decoders by configuration.
fn pool() -> &'static Mutex<HashMap<DecoderArgs, Vec<Decoder>>> {
    static POOL: OnceLock<Mutex<HashMap<DecoderArgs, Vec<Decoder>>>> = OnceLock::new();
    POOL.get_or_init(Mutex::default)
}

fn take_pooled(args: &DecoderArgs) -> Option<Decoder> {
    pool()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get_mut(args)
        .and_then(Vec::pop)
}

fn give_back(args: DecoderArgs, decoder: Decoder) {
    let mut pool = pool().lock().unwrap_or_else(PoisonError::into_inner);
    let idle = pool.entry(args).or_default();
    if idle.len() < POOL_LIMIT {
        idle.push(decoder);
    }
}

/// How many idle decoders the pool holds for `options` (for tests and
/// monitoring).
pub fn pooled_decoders(options: &PocketSphinxOptions) -> usize {
    pool()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&options.decoder_args())
        .map_or(0, Vec::len)
}

/// Makes one decoder for `options` on the calling thread and puts it in the
/// pool, so the next stream need not wait for the model; returns how long
/// the model took to load.
///
/// # Errors
///
/// [`InvalidConfig`](ErrorCode::InvalidConfig) when the options are wrong,
/// [`PipelineError`](ErrorCode::PipelineError) when the model does not load.
pub fn warm_up(options: &PocketSphinxOptions) -> Result<Duration> {
    options.check()?;
    let args = options.decoder_args();
    let started = std::time::Instant::now();
    let decoder = create_decoder(&args)
        .map_err(|m| BackendError::new(STT_OP, ErrorCode::PipelineError, m))?;
    let took = started.elapsed();
    give_back(args, decoder);
    Ok(took)
}

/// The PocketSphinx speech-to-text component (`stt_provider =
/// "pocketsphinx"`), configured by `[components.pocketsphinx]`
/// ([`PocketSphinxOptions`]).
#[derive(Debug, Default)]
pub struct PocketSphinxStt {
    /// Configurations being warmed up now.
    warming: Arc<Mutex<Vec<DecoderArgs>>>,
}

impl SpeechToText for PocketSphinxStt {
    fn open(
        &self,
        options: &serde_json::Value,
        events: mpsc::Sender<SttEvent>,
    ) -> Result<Box<dyn SttStream>> {
        let options = PocketSphinxOptions::from_value(options)?;
        let args = options.decoder_args();
        let partial_every = INTERNAL_FORMAT.bytes_for(options.partial_every) / 2;
        let (tx, rx) = std_mpsc::sync_channel(STREAM_QUEUE);
        let failed: Failed = Arc::default();
        let thread_failed = failed.clone();
        std::thread::Builder::new()
            .name("pocketsphinx".into())
            .spawn(move || {
                let decoder = match take_pooled(&args) {
                    Some(d) => d,
                    None => match create_decoder(&args) {
                        Ok(d) => d,
                        Err(why) => {
                            tracing::warn!("{why}");
                            *thread_failed.lock().unwrap_or_else(PoisonError::into_inner) =
                                Some(why);
                            return;
                        }
                    },
                };
                let decoder = decode(decoder, rx, events, partial_every);
                give_back(args, decoder);
            })
            .map_err(|e| {
                BackendError::new(
                    STT_OP,
                    ErrorCode::PipelineError,
                    format!("cannot start the recogniser's thread: {e}"),
                )
            })?;
        Ok(Box::new(Stream {
            tx,
            failed,
            warned_full: false,
        }))
    }

    fn check_options(&self, options: &serde_json::Value) -> Result<()> {
        let options = PocketSphinxOptions::from_value(options)?;
        let args = options.decoder_args();
        if pooled_decoders(&options) > 0 {
            return Ok(());
        }
        {
            let mut warming = self.warming.lock().unwrap_or_else(PoisonError::into_inner);
            if warming.contains(&args) {
                return Ok(());
            }
            warming.push(args.clone());
        }
        let warming = self.warming.clone();
        let spawned = std::thread::Builder::new()
            .name("pocketsphinx-warm-up".into())
            .spawn(move || {
                if let Ok(decoder) = create_decoder(&args) {
                    give_back(args.clone(), decoder);
                }
                warming
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .retain(|a| a != &args);
            });
        // Without the warm-up, the first session makes its decoder itself.
        drop(spawned);
        Ok(())
    }
}

/// Why a stream's decoder could not be made.
type Failed = Arc<Mutex<Option<String>>>;

enum Command {
    Audio(Vec<i16>),
    EndTurn,
}

/// One session's stream: its audio goes to the decoder's thread.
struct Stream {
    tx: std_mpsc::SyncSender<Command>,
    failed: Failed,
    warned_full: bool,
}

impl Stream {
    fn send(&mut self, op: &'static str, command: Command) -> Result<()> {
        if let Some(why) = self
            .failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        {
            return Err(BackendError::new(op, ErrorCode::PipelineError, why));
        }
        match self.tx.try_send(command) {
            Ok(()) => Ok(()),
            Err(std_mpsc::TrySendError::Full(_)) => {
                if !std::mem::replace(&mut self.warned_full, true) {
                    tracing::warn!(
                        "PocketSphinx is {}s of audio behind: audio is dropped",
                        STREAM_QUEUE / 50
                    );
                }
                Ok(())
            }
            Err(std_mpsc::TrySendError::Disconnected(_)) => {
                let why = self
                    .failed
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone()
                    .unwrap_or_else(|| "the recogniser has stopped".into());
                Err(BackendError::new(op, ErrorCode::PipelineError, why))
            }
        }
    }
}

impl SttStream for Stream {
    fn push_audio(&mut self, frame: &AudioFrame) -> Result<()> {
        const OP: &str = "pocketsphinx.push_audio";
        if frame.format() != INTERNAL_FORMAT {
            return Err(BackendError::new(
                OP,
                ErrorCode::PipelineError,
                format!(
                    "PocketSphinx takes {INTERNAL_FORMAT} audio, not {}",
                    frame.format()
                ),
            ));
        }
        if frame.is_empty() {
            return Ok(());
        }
        self.send(OP, Command::Audio(to_i16_samples(frame)))
    }

    fn end_turn(&mut self) -> Result<()> {
        self.send("pocketsphinx.end_turn", Command::EndTurn)
    }
}

/// A stream's thread: decodes each turn's audio, sends partials as the
/// hypothesis changes and a final at each turn's end, until the stream is
/// dropped (or the session stops listening); returns the decoder.
///
/// A decoder that has not yet finished an utterance is *cold*: its
/// cepstral mean normalisation starts from the model's `-cmninit`, far from
/// most microphones' (and eSpeak NG's) channel, and its first utterance is
/// often heard as nothing. So a cold decoder keeps its first utterance's
/// audio and, once the turn ends and the utterance has moved its mean to
/// the speaker's channel, decodes it a second time; the second result is
/// the final. Only the first turn a decoder hears costs twice; pooled
/// decoders stay warm.
fn decode(
    mut decoder: Decoder,
    commands: std_mpsc::Receiver<Command>,
    events: mpsc::Sender<SttEvent>,
    partial_every: usize,
) -> Decoder {
    let ps = &decoder.0;
    let mut in_utterance = false;
    let mut since_partial = 0usize;
    let mut last_partial = String::new();
    // The first utterance of a cold decoder, kept for its second pass.
    let mut first: Option<Vec<i16>> = (!decoder.1).then(Vec::new);
    while let Ok(command) = commands.recv() {
        match command {
            Command::Audio(samples) => {
                if !in_utterance {
                    if ps.start_utt(None).is_err() {
                        tracing::warn!("PocketSphinx could not start an utterance");
                        continue;
                    }
                    in_utterance = true;
                    since_partial = 0;
                    last_partial.clear();
                }
                if ps.process_raw(&samples, false, false).is_err() {
                    tracing::warn!("PocketSphinx could not decode {} samples", samples.len());
                }
                if let Some(kept) = first.as_mut() {
                    kept.extend_from_slice(&samples);
                }
                since_partial += samples.len();
                if since_partial >= partial_every {
                    since_partial = 0;
                    let hyp = ps.get_hyp().map(|h| h.0).unwrap_or_default();
                    if !hyp.trim().is_empty() && hyp != last_partial {
                        last_partial.clone_from(&hyp);
                        if events.blocking_send(SttEvent::Partial(hyp)).is_err() {
                            break;
                        }
                    }
                }
            }
            Command::EndTurn => {
                let mut text = if std::mem::take(&mut in_utterance) && ps.end_utt().is_ok() {
                    ps.get_hyp().map(|h| h.0).unwrap_or_default()
                } else {
                    String::new()
                };
                if let Some(kept) = first.take_if(|k| !k.is_empty()) {
                    text = second_pass(ps, &kept).unwrap_or(text);
                }
                if events
                    .blocking_send(SttEvent::Final(text.trim().to_owned()))
                    .is_err()
                {
                    break;
                }
            }
        }
    }
    if in_utterance {
        let _ = ps.end_utt();
    }
    decoder.1 = first.is_none();
    decoder
}

/// Decodes `audio` again as one utterance, in 20 ms pieces as it came; the
/// hypothesis, or `None` if PocketSphinx refused.
fn second_pass(ps: &pocketsphinx::PsDecoder, audio: &[i16]) -> Option<String> {
    ps.start_utt(None).ok()?;
    for piece in audio.chunks(320) {
        if ps.process_raw(piece, false, false).is_err() {
            let _ = ps.end_utt();
            return None;
        }
    }
    ps.end_utt().ok()?;
    Some(ps.get_hyp().map(|h| h.0).unwrap_or_default())
}

crate::register_component!(stt, NAME, PocketSphinxStt::default);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_missing_model_says_which_package_to_install() {
        let err = PocketSphinxOptions::from_value(&json!({"model_dir": "/nonexistent/en-us"}))
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidConfig);
        let detail = &err.details["components.pocketsphinx.model_dir"];
        assert!(
            detail.contains("apt install pocketsphinx-en-us"),
            "{detail}"
        );
    }

    #[test]
    fn options_are_strict_and_each_bad_field_is_named() {
        let err = PocketSphinxOptions::from_value(&json!({"modeldir": "x"})).unwrap_err();
        assert!(
            err.details.contains_key("components.pocketsphinx.modeldir"),
            "{err}"
        );
        let err = PocketSphinxOptions::from_value(&json!({
            "dictionary": "/nonexistent.dict",
            "grammar": "/nonexistent.gram",
            "keyphrase": "hello",
            "keyphrase_threshold": 2.0,
            "partial_every": "10s",
        }))
        .unwrap_err();
        for f in [
            "dictionary",
            "grammar",
            "keyphrase",
            "keyphrase_threshold",
            "partial_every",
        ] {
            assert!(
                err.details
                    .contains_key(&format!("components.pocketsphinx.{f}")),
                "{f}: {err}"
            );
        }
    }
}
