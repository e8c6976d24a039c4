//! Pipeline components for tests: a recognizer that says what a script
//! says ([`ScriptedStt`]), a speaker whose audio tells what it was asked to
//! say ([`TestTts`]), and [`synthesize`], which renders a reply of any
//! [`TextToSpeech`] component whole.
//!
//! The doubles are registered like any component, under a name the test
//! picks, and named in the config:
//!
//! ```no_run
//! use std::sync::Arc;
//! use voice_backends::Config;
//! use voice_backends::pipeline::components;
//! use voice_backends::testing::components::{Said, ScriptedStt, TestTts};
//!
//! let stt = ScriptedStt::new();
//! components().stt.register("my-test-stt", Arc::new(stt.clone()));
//! components().tts.register("my-test-tts", Arc::new(TestTts::ramp(50)));
//! let mut config = Config::new("local");
//! config.stt_provider = Some("my-test-stt".into());
//! config.tts_provider = Some("my-test-tts".into());
//! // The next turn: "book a" after 3 frames of it, the final at its end.
//! stt.push(Said::new("book a table").partial(3, "book a"));
//! ```

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::audio::{AudioEncoding, AudioFormat, AudioFrame};
use crate::error::{BackendError, ErrorCode, Result};
use crate::pipeline::{SpeechToText, SttEvent, SttStream, TextToSpeech};

/// One turn of a [`ScriptedStt`]: the partial transcripts it sends once the
/// turn has heard so many frames, and the final one it sends when the turn
/// ends.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Said {
    /// `(frames, text)`: `text` as a partial transcript once the turn has
    /// heard `frames` frames (counting from 1), in the order given.
    pub partials: Vec<(usize, String)>,
    /// The final transcript.
    pub last: String,
}

impl Said {
    /// A turn whose final transcript is `last`, with no partials.
    pub fn new(last: impl Into<String>) -> Self {
        Said {
            partials: Vec::new(),
            last: last.into(),
        }
    }

    /// This turn with `text` sent as a partial transcript once the turn has
    /// heard `after_frames` frames.
    #[must_use]
    pub fn partial(mut self, after_frames: usize, text: impl Into<String>) -> Self {
        self.partials.push((after_frames, text.into()));
        self
    }
}

/// What a [`ScriptedStt`] has left to say.
#[derive(Debug, Default)]
struct Script {
    turns: VecDeque<Said>,
    otherwise: Option<Said>,
}

/// A recognizer whose transcripts are a script's, turn by turn.
///
/// Every stream it opens reads the same script, a queue of [`Said`] turns
/// the test pushes with [`ScriptedStt::push`]: while a turn is the first in
/// the queue, its partials come after their numbers of frames (the frame
/// count starts again after each turn's end); at the turn's end it sends
/// the turn's final transcript and takes the turn off the queue. A turn
/// that ends with nothing queued gets the [`ScriptedStt::repeating`] turn,
/// or an empty final transcript (no words heard).
///
/// Clones share the script: register one clone, push turns through another.
#[derive(Clone, Debug, Default)]
pub struct ScriptedStt {
    script: Arc<Mutex<Script>>,
}

impl ScriptedStt {
    /// A recognizer with nothing scripted: every turn's final transcript is
    /// empty until turns are pushed.
    pub fn new() -> Self {
        Self::default()
    }

    /// A recognizer that says `said` for every turn not otherwise scripted.
    pub fn repeating(said: Said) -> Self {
        let stt = Self::default();
        stt.lock().otherwise = Some(said);
        stt
    }

    /// Queues `said` as the script's next turn.
    pub fn push(&self, said: Said) {
        self.lock().turns.push_back(said);
    }

    /// How many pushed turns have not ended yet.
    pub fn pending(&self) -> usize {
        self.lock().turns.len()
    }

    fn lock(&self) -> MutexGuard<'_, Script> {
        self.script.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl SpeechToText for ScriptedStt {
    fn open(
        &self,
        _options: &serde_json::Value,
        events: mpsc::Sender<SttEvent>,
    ) -> Result<Box<dyn SttStream>> {
        Ok(Box::new(ScriptedStream {
            stt: self.clone(),
            events,
            heard: 0,
        }))
    }
}

/// One session's stream of a [`ScriptedStt`].
struct ScriptedStream {
    stt: ScriptedStt,
    events: mpsc::Sender<SttEvent>,
    heard: usize,
}

impl SttStream for ScriptedStream {
    fn push_audio(&mut self, _frame: &AudioFrame) -> Result<()> {
        self.heard += 1;
        let script = self.stt.lock();
        if let Some(said) = script.turns.front().or(script.otherwise.as_ref()) {
            for (after, text) in &said.partials {
                if *after == self.heard {
                    let _ = self.events.try_send(SttEvent::Partial(text.clone()));
                }
            }
        }
        Ok(())
    }

    fn end_turn(&mut self) -> Result<()> {
        self.heard = 0;
        let mut script = self.stt.lock();
        let text = match script.turns.pop_front() {
            Some(said) => said.last,
            None => script
                .otherwise
                .as_ref()
                .map(|s| s.last.clone())
                .unwrap_or_default(),
        };
        let _ = self.events.try_send(SttEvent::Final(text));
        Ok(())
    }
}

/// What a [`TestTts`] says a reply as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Sound {
    /// Sample `i` of every reply is [`ramp_sample`]`(i)`, whatever the
    /// text: each sample tells where in the reply it is (the first 65,536
    /// are distinct), so the audio received can be compared sample for
    /// sample with [`TestTts::whole_reply`].
    Ramp,
    /// Every sample of the reply to `text` is [`tag`]`(text)`: the audio
    /// tells which reply it is of.
    Tag,
    /// A square wave of this peak, 20 samples up and 20 down (400 Hz at
    /// 16 kHz), whatever the text: a steady level, so a quieter (ducked)
    /// frame shows.
    Tone(i16),
}

/// The sample at `i` of every [`Sound::Ramp`] reply: `i - 32000`, wrapping
/// within 16 bits.
pub fn ramp_sample(i: usize) -> i16 {
    (i as i64 - 32_000) as i16
}

/// The sample every frame of a [`Sound::Tag`] reply to `text` is made of:
/// from 1 to 20,000, the sum of the text's bytes modulo 20,000, plus one.
pub fn tag(text: &str) -> i16 {
    let sum: u64 = text.bytes().map(u64::from).sum();
    (sum % 20_000) as i16 + 1
}

/// A speaker that says every reply as a fixed number of 20 ms frames of a
/// [`Sound`], in 16-bit PCM (`pcm_s16_le`) of the format it is asked for.
///
/// Frames are sent as fast as the pipeline takes them, after
/// [`TestTts::with_first_audio_delay`] (none by default) before the first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestTts {
    sound: Sound,
    frames: usize,
    first_audio_delay: Duration,
}

impl TestTts {
    /// Says every reply as `frames` frames of `sound`.
    pub fn new(sound: Sound, frames: usize) -> Self {
        TestTts {
            sound,
            frames,
            first_audio_delay: Duration::ZERO,
        }
    }

    /// Says every reply as `frames` frames of [`Sound::Ramp`].
    pub fn ramp(frames: usize) -> Self {
        Self::new(Sound::Ramp, frames)
    }

    /// Says every reply as `frames` frames of [`Sound::Tag`] of its text.
    pub fn tagged(frames: usize) -> Self {
        Self::new(Sound::Tag, frames)
    }

    /// Says every reply as `frames` frames of [`Sound::Tone`] at `peak`.
    pub fn tone(frames: usize, peak: i16) -> Self {
        Self::new(Sound::Tone(peak), frames)
    }

    /// This speaker, waiting `delay` before each reply's first frame (a
    /// service's time to first audio).
    #[must_use]
    pub fn with_first_audio_delay(mut self, delay: Duration) -> Self {
        self.first_audio_delay = delay;
        self
    }

    /// The samples of a whole reply to `text` in 16 kHz mono, as the
    /// pipeline's internal format has it.
    pub fn whole_reply(&self, text: &str) -> Vec<i16> {
        let per_frame = samples_per_frame(crate::pipeline::INTERNAL_FORMAT);
        (0..self.frames * per_frame)
            .map(|i| self.sample(text, i))
            .collect()
    }

    fn sample(&self, text: &str, i: usize) -> i16 {
        match self.sound {
            Sound::Ramp => ramp_sample(i),
            Sound::Tag => tag(text),
            Sound::Tone(peak) if (i / 20).is_multiple_of(2) => peak,
            Sound::Tone(peak) => peak.saturating_neg(),
        }
    }
}

/// Interleaved samples in 20 ms of `format`.
fn samples_per_frame(format: AudioFormat) -> usize {
    format.sample_rate as usize / 50 * usize::from(format.channels)
}

#[async_trait]
impl TextToSpeech for TestTts {
    async fn synthesize(
        &self,
        text: &str,
        format: AudioFormat,
        out: &mpsc::Sender<AudioFrame>,
    ) -> Result<()> {
        if format.encoding != AudioEncoding::PcmS16Le {
            return Err(BackendError::new(
                "tts.synthesize",
                ErrorCode::PipelineError,
                format!("the test speaker speaks pcm_s16_le only, not {format}"),
            ));
        }
        if !self.first_audio_delay.is_zero() {
            tokio::time::sleep(self.first_audio_delay).await;
        }
        let per_frame = samples_per_frame(format);
        for f in 0..self.frames {
            let data: Vec<u8> = (f * per_frame..(f + 1) * per_frame)
                .flat_map(|i| self.sample(text, i).to_le_bytes())
                .collect();
            if out.send(AudioFrame::new(format, data)?).await.is_err() {
                // The pipeline stopped listening: the reply was cut.
                return Ok(());
            }
        }
        Ok(())
    }
}

/// The whole of `tts`'s reply to `text` in `format`: every frame it sent,
/// in order, once it has finished.
///
/// # Errors
///
/// What `tts` fails with.
pub async fn synthesize(
    tts: &dyn TextToSpeech,
    text: &str,
    format: AudioFormat,
) -> Result<Vec<AudioFrame>> {
    let (tx, mut rx) = mpsc::channel(64);
    let collect = async {
        let mut frames = Vec::new();
        while let Some(f) = rx.recv().await {
            frames.push(f);
        }
        frames
    };
    let (done, frames) = tokio::join!(
        async {
            let r = tts.synthesize(text, format, &tx).await;
            drop(tx);
            r
        },
        collect
    );
    done.map(|()| frames)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::INTERNAL_FORMAT;
    use crate::testing::signal;

    fn frame() -> AudioFrame {
        signal::frames(&signal::silence(Duration::from_millis(20)), 20).remove(0)
    }

    #[test]
    fn a_scripted_turn_says_its_partials_then_its_final_then_the_next() {
        let stt = ScriptedStt::new();
        stt.push(
            Said::new("book a table")
                .partial(2, "book")
                .partial(3, "book a"),
        );
        stt.push(Said::new("thanks"));
        let (tx, mut rx) = mpsc::channel(16);
        let mut stream = stt.open(&serde_json::Value::Null, tx).unwrap();
        for _ in 0..4 {
            stream.push_audio(&frame()).unwrap();
        }
        stream.end_turn().unwrap();
        assert_eq!(stt.pending(), 1);
        stream.push_audio(&frame()).unwrap();
        stream.push_audio(&frame()).unwrap();
        stream.end_turn().unwrap();
        stream.end_turn().unwrap();
        let mut got = Vec::new();
        while let Ok(e) = rx.try_recv() {
            got.push(e);
        }
        assert_eq!(
            got,
            [
                SttEvent::Partial("book".into()),
                SttEvent::Partial("book a".into()),
                SttEvent::Final("book a table".into()),
                SttEvent::Final("thanks".into()),
                SttEvent::Final(String::new()),
            ]
        );
    }

    #[test]
    fn a_repeating_script_says_the_same_turn_each_time() {
        let stt = ScriptedStt::repeating(Said::new("stop").partial(1, "st"));
        let (tx, mut rx) = mpsc::channel(16);
        let mut stream = stt.open(&serde_json::Value::Null, tx).unwrap();
        for _ in 0..2 {
            stream.push_audio(&frame()).unwrap();
            stream.end_turn().unwrap();
        }
        let mut got = Vec::new();
        while let Ok(e) = rx.try_recv() {
            got.push(e);
        }
        let turn = [
            SttEvent::Partial("st".into()),
            SttEvent::Final("stop".into()),
        ];
        assert_eq!(got, [turn.clone(), turn].concat());
    }

    #[tokio::test]
    async fn each_sound_is_what_its_reply_holds() {
        let ramp = TestTts::ramp(3);
        let frames = synthesize(&ramp, "any", INTERNAL_FORMAT).await.unwrap();
        assert_eq!(frames.len(), 3);
        let heard = signal::samples_of(&frames);
        assert_eq!(heard, ramp.whole_reply("other"));
        assert_eq!(heard[..2], [-32_000, -31_999]);

        let tagged = TestTts::tagged(2);
        let heard = signal::samples_of(&synthesize(&tagged, "hi", INTERNAL_FORMAT).await.unwrap());
        assert_eq!(heard.len(), 640);
        assert!(heard.iter().all(|&s| s == tag("hi")));
        assert_ne!(tag("hi"), tag("ho"));

        let tone = TestTts::tone(1, 1000);
        let heard = signal::samples_of(&synthesize(&tone, "x", INTERNAL_FORMAT).await.unwrap());
        assert_eq!(
            (heard[0], heard[19], heard[20], heard[40]),
            (1000, 1000, -1000, 1000)
        );
    }

    #[tokio::test]
    async fn a_format_it_cannot_speak_is_an_error() {
        let mulaw = AudioFormat::new(AudioEncoding::Mulaw, 8000, 1);
        let e = synthesize(&TestTts::ramp(1), "x", mulaw).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::PipelineError);
        assert!(e.message.contains("mulaw"), "{e}");
    }
}
