//! `"echo"`: a speech-to-speech "model" that answers each turn with the user's
//! own audio.
//!
//! It needs no model or service, so it serves demos, tests and the plumbing
//! checks of a deployment. For each turn it sends, in order:
//!
//! 1. [`S2sEvent::UserTranscript`] `{ text: "<n> ms of audio", is_final: true }`;
//! 2. [`S2sEvent::AgentText`] describing the echo (and any audio dropped);
//! 3. the turn's audio as [`S2sEvent::Audio`] frames of 20 ms in
//!    [`INTERNAL_FORMAT`] (the last one shorter when the turn is not a whole
//!    number of 20 ms frames), byte for byte what was pushed;
//! 4. [`S2sEvent::ReplyDone`].
//!
//! A turn without audio gets the two texts and `ReplyDone`.
//!
//! # Buffering
//!
//! A turn's audio is kept up to [`EchoOptions::max_turn`]; beyond that the
//! oldest audio is dropped, counted ([`EchoStream::dropped_samples`]) and
//! mentioned in the `AgentText`.
//!
//! The audio is not copied: the stream keeps the pushed frames' own buffers
//! (their [`Bytes`], shared, not cloned byte by byte) and the reply's frames
//! are slices of them. Only a reply frame that straddles two pushed frames (when
//! they are not 20 ms each) is assembled by copying.
//!
//! # Sending
//!
//! [`S2sStream::push_audio`] and [`S2sStream::end_turn`] never block. Replies
//! are sent by a worker task the stream spawns on the current tokio runtime at
//! its first `end_turn` (one per stream, not per turn; it ends when the stream
//! is dropped). The worker waits for room in the bounded event channel, so a
//! slow consumer slows the reply rather than losing frames, and replies go out
//! whole and in turn order. A task costs a few hundred bytes, so thousands of
//! sessions can each have one.
//!
//! [`S2sStream::interrupt`] discards the reply in progress and any queued
//! replies: the worker stops at once, even while waiting for room in the
//! channel, and sends nothing more of them, not even `ReplyDone` (the
//! interrupted reply is over). Frames already in the channel stay there; the
//! consumer drops those on barge-in. The user audio buffered for the next turn
//! is kept.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use super::{OPTIONS_OP, OptionChecks, parse_options};
use crate::audio::AudioFrame;
use crate::error::{BackendError, ErrorCode, Result};
use crate::pipeline::{INTERNAL_FORMAT, S2sEvent, S2sStream, SpeechToSpeech};

/// The name the component is registered under, and its options section.
pub const NAME: &str = "echo";

/// The duration of the reply's audio frames: 20 ms.
pub const REPLY_FRAME: Duration = Duration::from_millis(20);

/// The longest allowed [`EchoOptions::max_turn`]: 10 min (about 19 MB of audio).
pub const MAX_MAX_TURN: Duration = Duration::from_secs(600);

/// Options of [`EchoS2s`] (`[components.echo]`).
///
/// ```toml
/// [components.echo]
/// max_turn = "30s"
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct EchoOptions {
    /// The most audio of one turn kept (and echoed); older audio is dropped.
    /// From 20ms to 10min, default 30s.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub max_turn: Duration,
}

impl Default for EchoOptions {
    fn default() -> Self {
        EchoOptions {
            max_turn: Duration::from_secs(30),
        }
    }
}

impl EchoOptions {
    /// Parses `[components.echo]` (`null` gives the defaults) and checks it.
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`](crate::ErrorCode::InvalidConfig) with a `details`
    /// entry keyed `components.echo.<field>`; unknown keys are errors too.
    pub fn from_value(options: &serde_json::Value) -> Result<Self> {
        let options: EchoOptions = parse_options(OPTIONS_OP, NAME, options)?;
        options.validate()?;
        Ok(options)
    }

    /// Checks that `max_turn` is within 20ms..=10min.
    ///
    /// # Errors
    ///
    /// As [`EchoOptions::from_value`].
    pub fn validate(&self) -> Result<()> {
        let mut c = OptionChecks::new(NAME);
        c.check(
            (REPLY_FRAME..=MAX_MAX_TURN).contains(&self.max_turn),
            "max_turn",
            || {
                format!(
                    "{} is outside 20ms..=10m",
                    humantime::format_duration(self.max_turn)
                )
            },
        );
        c.finish()
    }
}

/// The echo speech-to-speech service; see the [module documentation](self).
#[derive(Clone, Copy, Debug, Default)]
pub struct EchoS2s;

impl EchoS2s {
    /// Opens a stream like [`SpeechToSpeech::open`], keeping its concrete type
    /// (for [`EchoStream::dropped_samples`] and friends).
    ///
    /// # Errors
    ///
    /// `InvalidConfig` for bad options (see [`EchoOptions::from_value`]).
    pub fn open_stream(
        &self,
        options: &serde_json::Value,
        events: mpsc::Sender<S2sEvent>,
    ) -> Result<EchoStream> {
        Ok(EchoStream::new(EchoOptions::from_value(options)?, events))
    }
}

impl SpeechToSpeech for EchoS2s {
    fn open(
        &self,
        options: &serde_json::Value,
        events: mpsc::Sender<S2sEvent>,
    ) -> Result<Box<dyn S2sStream>> {
        Ok(Box::new(self.open_stream(options, events)?))
    }

    fn check_options(&self, options: &serde_json::Value) -> Result<()> {
        EchoOptions::from_value(options).map(drop)
    }
}

crate::register_component!(s2s, "echo", EchoS2s::default);

/// One reply, queued for the worker.
struct Reply {
    /// The stream's epoch when the reply was made; an interrupt bumps the
    /// epoch, cancelling every reply made before it.
    epoch: u64,
    events: Vec<S2sEvent>,
}

/// One session's echo stream, made by [`EchoS2s`].
pub struct EchoStream {
    options: EchoOptions,
    events: mpsc::Sender<S2sEvent>,
    /// The turn's audio, s16le bytes: the pushed frames' buffers, oldest
    /// first, `buffered_bytes` in all, at most `max_bytes`.
    buffer: VecDeque<Bytes>,
    buffered_bytes: usize,
    max_bytes: usize,
    /// Samples dropped from the current turn.
    turn_dropped: u64,
    /// Samples dropped since the stream opened.
    dropped: u64,
    epoch: watch::Sender<u64>,
    worker: Option<mpsc::UnboundedSender<Reply>>,
}

impl std::fmt::Debug for EchoStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EchoStream")
            .field("options", &self.options)
            .field("buffered", &self.buffered())
            .field("dropped_samples", &self.dropped)
            .field("worker", &self.worker.is_some())
            .finish_non_exhaustive()
    }
}

/// Samples (16-bit mono) per millisecond of [`INTERNAL_FORMAT`].
const SAMPLES_PER_MS: u64 = INTERNAL_FORMAT.sample_rate as u64 / 1000;

impl EchoStream {
    /// A stream sending its events to `events` (options assumed valid).
    pub fn new(options: EchoOptions, events: mpsc::Sender<S2sEvent>) -> Self {
        let max_bytes = INTERNAL_FORMAT.bytes_for(options.max_turn);
        EchoStream {
            options,
            events,
            buffer: VecDeque::new(),
            buffered_bytes: 0,
            max_bytes,
            turn_dropped: 0,
            dropped: 0,
            epoch: watch::channel(0).0,
            worker: None,
        }
    }

    /// The user audio buffered for the current turn.
    pub fn buffered(&self) -> Duration {
        Duration::from_nanos(
            (self.buffered_bytes / INTERNAL_FORMAT.bytes_per_frame()) as u64 * 1_000_000_000
                / u64::from(INTERNAL_FORMAT.sample_rate),
        )
    }

    /// Samples of user audio dropped since the stream opened, because a turn
    /// was longer than [`EchoOptions::max_turn`].
    pub fn dropped_samples(&self) -> u64 {
        self.dropped
    }

    /// The options in use.
    pub fn options(&self) -> &EchoOptions {
        &self.options
    }

    /// Drops the oldest `n` buffered bytes.
    fn drop_oldest(&mut self, mut n: usize) {
        self.buffered_bytes -= n;
        while n > 0 {
            let Some(front) = self.buffer.front_mut() else {
                break;
            };
            if front.len() <= n {
                n -= front.len();
                self.buffer.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
    }

    /// The reply to the buffered turn, emptying the buffer (its allocation is
    /// kept for the next turn).
    fn take_reply(&mut self) -> Vec<S2sEvent> {
        let bytes = std::mem::take(&mut self.buffered_bytes);
        let samples = (bytes / 2) as u64;
        let ms = samples / SAMPLES_PER_MS;
        let dropped_ms = std::mem::take(&mut self.turn_dropped) / SAMPLES_PER_MS;
        let mut text = if samples == 0 {
            "Nothing to echo: the turn had no audio.".to_owned()
        } else {
            format!("Echoing {ms} ms of audio.")
        };
        if dropped_ms > 0 {
            text.push_str(&format!(
                " The {dropped_ms} ms before it were dropped (max_turn is {}).",
                humantime::format_duration(self.options.max_turn)
            ));
        }
        let frame_bytes = INTERNAL_FORMAT.bytes_for(REPLY_FRAME);
        let mut events = Vec::with_capacity(3 + bytes.div_ceil(frame_bytes));
        events.push(S2sEvent::UserTranscript {
            text: format!("{ms} ms of audio"),
            is_final: true,
        });
        events.push(S2sEvent::AgentText(text));
        let audio = |data: Bytes| {
            let frame = AudioFrame::new(INTERNAL_FORMAT, data)
                .expect("whole 16-bit samples of a valid format");
            S2sEvent::Audio(frame)
        };
        // A reply frame being assembled from the ends of pushed frames.
        let mut partial = BytesMut::new();
        for mut chunk in self.buffer.drain(..) {
            if !partial.is_empty() {
                let take = (frame_bytes - partial.len()).min(chunk.len());
                partial.extend_from_slice(&chunk.split_to(take));
                if partial.len() == frame_bytes {
                    events.push(audio(partial.split().freeze()));
                }
            }
            while chunk.len() >= frame_bytes {
                events.push(audio(chunk.split_to(frame_bytes)));
            }
            if !chunk.is_empty() {
                partial.reserve(frame_bytes);
                partial.extend_from_slice(&chunk);
            }
        }
        if !partial.is_empty() {
            events.push(audio(partial.freeze()));
        }
        events.push(S2sEvent::ReplyDone);
        events
    }

    /// The worker task, started on first use (inside the session's runtime).
    fn worker(&mut self) -> Result<&mpsc::UnboundedSender<Reply>> {
        if self.worker.is_none() {
            let handle = tokio::runtime::Handle::try_current().map_err(|e| {
                BackendError::new(
                    "s2s.end_turn",
                    ErrorCode::PipelineError,
                    "the echo component replies from a tokio task; call it inside a tokio runtime",
                )
                .with_source(e)
            })?;
            let (replies, queue) = mpsc::unbounded_channel::<Reply>();
            handle.spawn(run_worker(
                queue,
                self.events.clone(),
                self.epoch.subscribe(),
            ));
            self.worker = Some(replies);
        }
        Ok(self.worker.as_ref().expect("just started"))
    }

    /// Cancels every reply made so far; the worker notices at once.
    fn cancel_replies(&self) {
        self.epoch.send_modify(|e| *e += 1);
    }
}

impl S2sStream for EchoStream {
    fn push_audio(&mut self, frame: &AudioFrame) -> Result<()> {
        if frame.format() != INTERNAL_FORMAT {
            return Err(BackendError::new(
                "s2s.push_audio",
                ErrorCode::PipelineError,
                format!(
                    "the echo component takes {INTERNAL_FORMAT} frames, not {}",
                    frame.format()
                ),
            ));
        }
        let data = frame.data();
        // Keep the newest `max_bytes`: drop what overflows, oldest first.
        let keep_new = data.len().min(self.max_bytes);
        let overflow = (self.buffered_bytes + keep_new).saturating_sub(self.max_bytes);
        self.drop_oldest(overflow);
        if keep_new > 0 {
            self.buffer.push_back(data.slice(data.len() - keep_new..));
            self.buffered_bytes += keep_new;
        }
        let dropped = ((overflow + data.len() - keep_new) / 2) as u64;
        self.turn_dropped += dropped;
        self.dropped += dropped;
        Ok(())
    }

    fn end_turn(&mut self) -> Result<()> {
        if self.events.is_closed() {
            return Err(BackendError::new(
                "s2s.end_turn",
                ErrorCode::PipelineError,
                "the echo component's event receiver is gone",
            ));
        }
        let events = self.take_reply();
        let epoch = *self.epoch.borrow();
        let worker = self.worker()?;
        worker.send(Reply { epoch, events }).map_err(|_| {
            BackendError::new(
                "s2s.end_turn",
                ErrorCode::PipelineError,
                "the echo component's reply thread has stopped",
            )
        })
    }

    fn interrupt(&mut self) {
        self.cancel_replies();
    }
}

impl Drop for EchoStream {
    fn drop(&mut self) {
        // Stop the reply in progress; dropping `replies` then ends the worker.
        self.cancel_replies();
    }
}

/// The worker loop: sends each reply's events in order until the reply is
/// cancelled, the receiver goes away, or the stream is dropped.
async fn run_worker(
    mut queue: mpsc::UnboundedReceiver<Reply>,
    events: mpsc::Sender<S2sEvent>,
    mut epoch: watch::Receiver<u64>,
) {
    while let Some(reply) = queue.recv().await {
        for event in reply.events {
            if *epoch.borrow_and_update() != reply.epoch {
                break;
            }
            // Room in the channel: no need to wait (nor to watch the epoch).
            let event = match events.try_send(event) {
                Ok(()) => continue,
                Err(mpsc::error::TrySendError::Closed(_)) => return,
                Err(mpsc::error::TrySendError::Full(event)) => event,
            };
            tokio::select! {
                biased;
                sent = events.send(event) => {
                    if sent.is_err() {
                        // The receiver is gone: nothing more can be sent.
                        return;
                    }
                }
                // Interrupted (or the stream dropped) while waiting for room:
                // the check at the top of the loop drops the rest.
                _ = epoch.changed() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(samples: &[i16]) -> AudioFrame {
        AudioFrame::from_i16(16_000, 1, samples).unwrap()
    }

    #[test]
    fn the_buffer_keeps_the_newest_audio_and_counts_the_rest() {
        let (tx, _rx) = mpsc::channel(8);
        let mut s = EchoStream::new(
            EchoOptions {
                max_turn: Duration::from_millis(20),
            },
            tx,
        );
        let a: Vec<i16> = (0..200).collect();
        let b: Vec<i16> = (200..400).collect();
        s.push_audio(&frame(&a)).unwrap();
        assert_eq!(s.dropped_samples(), 0);
        s.push_audio(&frame(&b)).unwrap();
        assert_eq!(s.dropped_samples(), 80);
        assert_eq!(s.buffered(), Duration::from_millis(20));
        let kept: Vec<i16> = s
            .buffer
            .iter()
            .flat_map(|b| b.iter().copied())
            .collect::<Vec<u8>>()
            .chunks_exact(2)
            .map(|p| i16::from_le_bytes([p[0], p[1]]))
            .collect();
        assert_eq!(kept, (80..400).collect::<Vec<i16>>());
        // A single frame longer than the limit keeps its own tail.
        let long: Vec<i16> = (0..1000).collect();
        s.push_audio(&frame(&long)).unwrap();
        assert_eq!(s.dropped_samples(), 80 + 320 + 680);
        assert_eq!(s.buffered(), Duration::from_millis(20));
        assert_eq!(s.turn_dropped, 1080);
    }

    #[test]
    fn the_reply_is_framed_in_20ms_with_a_short_last_frame() {
        let (tx, _rx) = mpsc::channel(8);
        let mut s = EchoStream::new(EchoOptions::default(), tx);
        s.push_audio(&frame(&vec![7; 700])).unwrap();
        let events = s.take_reply();
        let sizes: Vec<usize> = events
            .iter()
            .filter_map(|e| match e {
                S2sEvent::Audio(f) => Some(f.sample_frames()),
                _ => None,
            })
            .collect();
        assert_eq!(sizes, [320, 320, 60]);
        assert_eq!(
            events[0],
            S2sEvent::UserTranscript {
                text: "43 ms of audio".into(),
                is_final: true
            }
        );
        assert_eq!(events.last(), Some(&S2sEvent::ReplyDone));
        assert_eq!(s.buffered(), Duration::ZERO);
    }

    #[test]
    fn whole_20ms_frames_are_echoed_without_copying() {
        let (tx, _rx) = mpsc::channel(8);
        let mut s = EchoStream::new(EchoOptions::default(), tx);
        let pushed: Vec<AudioFrame> = (0..3).map(|i| frame(&vec![i as i16; 320])).collect();
        for f in &pushed {
            s.push_audio(f).unwrap();
        }
        let echoed: Vec<AudioFrame> = s
            .take_reply()
            .into_iter()
            .filter_map(|e| match e {
                S2sEvent::Audio(f) => Some(f),
                _ => None,
            })
            .collect();
        assert_eq!(echoed.len(), 3);
        for (a, b) in pushed.iter().zip(&echoed) {
            assert_eq!(a.data().as_ptr(), b.data().as_ptr(), "the same buffer");
            assert_eq!(a, b);
        }
    }

    #[test]
    fn a_trimmed_turn_is_reframed_in_20ms() {
        let (tx, _rx) = mpsc::channel(8);
        let mut s = EchoStream::new(
            EchoOptions {
                max_turn: Duration::from_millis(50),
            },
            tx,
        );
        let samples: Vec<i16> = (0..1000).collect();
        for chunk in samples.chunks(320) {
            s.push_audio(&frame(chunk)).unwrap();
        }
        // 800 samples kept (50 ms), the oldest 200 dropped mid-frame.
        assert_eq!(s.dropped_samples(), 200);
        let echoed: Vec<AudioFrame> = s
            .take_reply()
            .into_iter()
            .filter_map(|e| match e {
                S2sEvent::Audio(f) => Some(f),
                _ => None,
            })
            .collect();
        let sizes: Vec<usize> = echoed.iter().map(AudioFrame::sample_frames).collect();
        assert_eq!(sizes, [320, 320, 160]);
        let back: Vec<i16> = echoed
            .iter()
            .flat_map(|f| {
                f.data()
                    .chunks_exact(2)
                    .map(|p| i16::from_le_bytes([p[0], p[1]]))
            })
            .collect();
        assert_eq!(back, (200..1000).collect::<Vec<i16>>());
    }

    #[test]
    fn other_formats_are_refused() {
        let (tx, _rx) = mpsc::channel(8);
        let mut s = EchoStream::new(EchoOptions::default(), tx);
        let f = AudioFrame::from_i16(48_000, 1, &[0; 480]).unwrap();
        assert_eq!(s.push_audio(&f).unwrap_err().code, ErrorCode::PipelineError);
    }

    #[test]
    fn max_turn_is_validated() {
        for bad in ["0s", "10ms", "11m"] {
            let e = EchoOptions::from_value(&serde_json::json!({ "max_turn": bad })).unwrap_err();
            assert!(
                e.details.contains_key("components.echo.max_turn"),
                "{bad}: {e:?}"
            );
        }
    }
}
