//! Audio formats and frames.
//!
//! An [`AudioFrame`] is a run of interleaved samples in one [`AudioFormat`],
//! held in a reference-counted [`bytes::Bytes`] so frames move through the
//! pipeline without copies. A frame whose byte length does not fit its format
//! is refused when it is made.
//!
//! [`AudioConverter`] converts a stream between any two formats (encoding,
//! channels, sample rate); [`convert_frame`] does the same-rate conversions
//! of a single frame.
//!
//! # Sample conventions
//!
//! Conversions work on 32-bit float samples in `-1.0..=1.0` (between the
//! integer encodings at one rate and layout they skip the floats, with the
//! same result):
//!
//! * **s16 -> f32** divides by 32768: `-32768` becomes exactly `-1.0`, `0`
//!   becomes `0.0`, `32767` becomes `32767 / 32768` (`0.999_969_5`).
//! * **f32 -> s16** clamps to `-1.0..=1.0`, multiplies by the same 32768,
//!   rounds half away from zero and saturates at `32767`: `-1.0` becomes
//!   `-32768`, `1.0` becomes `32767`, NaN becomes `0`. Using one factor both
//!   ways makes s16 -> f32 -> s16 exact for every 16-bit value.
//! * **f32 input** is sanitised as it is read: NaN becomes `0.0` and values
//!   outside `-1.0..=1.0` (infinities included) are clamped, so malformed
//!   input can never poison a resampler's state. f32 output is clamped too.
//! * **G.711** mu-law and A-law follow ITU-T G.711 with the reference
//!   segment algorithm (the one of the classic `g711.c`): encoding works on
//!   the top 14 (mu-law) or 13 (A-law) bits of the 16-bit sample, decoding is
//!   a 256-entry table built at compile time. Mu-law decodes to
//!   `-32124..=32124`, A-law to `-32256..=32256`.
//!
//! # Channels
//!
//! * N -> N: unchanged.
//! * N -> 1: every sample frame is averaged.
//! * 1 -> N: the mono sample is copied to every channel.
//! * N -> M otherwise (e.g. 3 -> 2): mixed down to mono by averaging, then
//!   copied to every output channel. No channel map is guessed.
//!
//! # Sample rate
//!
//! [`AudioConverter`] resamples with one of two band-limited filters (see
//! [`ResamplerKind`]):
//!
//! * **Integer ratios**: when `rate_out / rate_in` reduces to `L / M` with
//!   `L` and `M` at most 6 (48 <-> 16 kHz, 8 <-> 16 kHz, 48 <-> 8 kHz,
//!   48 <-> 24 kHz, 16 <-> 24 kHz, 32 <-> 16 kHz, ...), a streaming
//!   polyphase FIR filter: a Kaiser-windowed sinc designed once per ratio,
//!   just under 64 samples of the lower rate long (191 taps at 48 kHz for
//!   48 <-> 16 kHz). Its passband is flat to within 0.1 dB up to 0.85 of the
//!   lower Nyquist frequency (6.8 kHz for 16 kHz, 3.4 kHz for 8 kHz) and
//!   everything from that Nyquist frequency up is attenuated by at least
//!   80 dB: no aliases when downsampling, no images when upsampling. It
//!   costs under 3 µs per 20 ms frame of 48 <-> 16 kHz mono (x86-64 with
//!   AVX2 and FMA, detected at run time; other CPUs run the same code with
//!   their baseline instructions).
//! * **Other ratios** (e.g. 44.1 kHz <-> 16 kHz): rubato's asynchronous sinc
//!   resampler (Blackman-Harris window, run at a fixed ratio). Its filter
//!   spans about 8 ms of the lower of the two rates (32 to 256 taps at that
//!   rate), so its cut-off sits a few percent below the lower Nyquist
//!   frequency (7.5 kHz for 16 kHz, 3.5 kHz for 8 kHz) and everything above
//!   that Nyquist frequency is suppressed by more than 100 dB. When the ratio
//!   reduces to `L / M` with `L` small enough for an `L`-phase filter table
//!   of at most 2 MiB (44.1 kHz pairs included), every output sample falls
//!   exactly on a table phase, so there is no interpolation error; otherwise
//!   the table has 256 phases joined by cubic interpolation.
//!
//! Rates more than 64:1 apart are refused, and so is resampling more than 32
//! channels kept apart. When the channel count changes, resampling runs on
//! the mono mix (before duplication when going up), so it costs one channel.
//!
//! The resampler adds [`AudioConverter::latency`] of delay: half the
//! integer-ratio filter (just under 2 ms when the lower rate is 16 kHz, just
//! under 4 ms when it is 8 kHz), 2 to 5 ms for the sinc resampler. Output is time-aligned with the input (output
//! sample `j` is the value of the input signal at time `j / rate_out`): the
//! filter's start-up delay is dropped at the start of the stream and
//! [`AudioConverter::flush`] drains the tail, so a whole stream of `n` input
//! frames gives exactly `ceil(n * rate_out / rate_in)` output frames, however
//! it was cut into frames. Alignment is exact for rate pairs whose reduced
//! ratio has a small denominator (8/16/24/32/48 kHz among themselves) and
//! within half an output sample otherwise (e.g. 44.1 kHz <-> 16 kHz). The
//! integer-ratio filter computes every output sample from the same input
//! window in the same order whatever the frame sizes, so a stream cut into
//! 20 ms frames, odd sizes or single samples gives the same samples, bit for
//! bit, as the stream in one frame.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{BackendError, ErrorCode, Result};

mod convert;
mod polyphase;
mod resample;
pub use convert::*;
pub use resample::ResamplerKind;

/// How samples are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum AudioEncoding {
    /// Signed 16-bit little-endian PCM.
    PcmS16Le,
    /// 32-bit little-endian IEEE float PCM, nominally in -1.0..=1.0.
    PcmF32Le,
    /// G.711 mu-law, 8 bits per sample.
    Mulaw,
    /// G.711 A-law, 8 bits per sample.
    Alaw,
}

impl AudioEncoding {
    /// Bytes one sample of one channel takes.
    pub const fn bytes_per_sample(self) -> usize {
        match self {
            AudioEncoding::PcmS16Le => 2,
            AudioEncoding::PcmF32Le => 4,
            AudioEncoding::Mulaw | AudioEncoding::Alaw => 1,
        }
    }

    /// The snake_case name, e.g. `pcm_s16_le`.
    pub const fn as_str(self) -> &'static str {
        match self {
            AudioEncoding::PcmS16Le => "pcm_s16_le",
            AudioEncoding::PcmF32Le => "pcm_f32_le",
            AudioEncoding::Mulaw => "mulaw",
            AudioEncoding::Alaw => "alaw",
        }
    }
}

/// The shape of an audio stream: encoding, sample rate and channel count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AudioFormat {
    /// How samples are encoded.
    pub encoding: AudioEncoding,
    /// Samples per second per channel.
    pub sample_rate: u32,
    /// Interleaved channels.
    pub channels: u16,
}

impl AudioFormat {
    /// 16 kHz mono signed 16-bit PCM, the common format of speech models.
    pub const PCM16_16K_MONO: AudioFormat = AudioFormat::new(AudioEncoding::PcmS16Le, 16_000, 1);

    /// A format; check it with [`AudioFormat::validate`] when it comes from outside.
    pub const fn new(encoding: AudioEncoding, sample_rate: u32, channels: u16) -> Self {
        AudioFormat {
            encoding,
            sample_rate,
            channels,
        }
    }

    /// Bytes one frame (one sample of every channel) takes.
    pub const fn bytes_per_frame(&self) -> usize {
        self.encoding.bytes_per_sample() * self.channels as usize
    }

    /// Refuses a zero sample rate, a rate above 384 kHz, or zero channels.
    pub fn validate(&self) -> Result<()> {
        if self.sample_rate == 0 || self.sample_rate > 384_000 {
            return Err(BackendError::new(
                "audio.format",
                ErrorCode::PipelineError,
                format!("sample rate {} Hz is outside 1..=384000", self.sample_rate),
            ));
        }
        if self.channels == 0 {
            return Err(BackendError::new(
                "audio.format",
                ErrorCode::PipelineError,
                "an audio format needs at least one channel",
            ));
        }
        Ok(())
    }

    /// The byte length of `duration` of audio in this format, rounded down to whole frames.
    pub fn bytes_for(&self, duration: Duration) -> usize {
        let frames = (duration.as_nanos() * self.sample_rate as u128 / 1_000_000_000) as usize;
        frames * self.bytes_per_frame()
    }
}

impl fmt::Display for AudioFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} Hz x{}",
            self.encoding.as_str(),
            self.sample_rate,
            self.channels
        )
    }
}

/// A run of interleaved audio samples in one format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AudioFrame {
    format: AudioFormat,
    data: Bytes,
}

impl AudioFrame {
    /// A frame of `data` in `format`.
    ///
    /// Fails with [`ErrorCode::PipelineError`] when the format is invalid or the
    /// byte length is not a whole number of sample frames (e.g. 321 bytes of
    /// 16-bit mono).
    pub fn new(format: AudioFormat, data: impl Into<Bytes>) -> Result<Self> {
        format.validate()?;
        let data = data.into();
        let unit = format.bytes_per_frame();
        if data.len() % unit != 0 {
            return Err(BackendError::new(
                "audio.frame",
                ErrorCode::PipelineError,
                format!(
                    "{} bytes is not a whole number of {}-byte sample frames of {format}",
                    data.len(),
                    unit
                ),
            ));
        }
        Ok(AudioFrame { format, data })
    }

    /// A frame of `samples` 16-bit samples in a PCM s16le format of the given rate and channels.
    pub fn from_i16(sample_rate: u32, channels: u16, samples: &[i16]) -> Result<Self> {
        let mut data = Vec::with_capacity(samples.len() * 2);
        for s in samples {
            data.extend_from_slice(&s.to_le_bytes());
        }
        AudioFrame::new(
            AudioFormat::new(AudioEncoding::PcmS16Le, sample_rate, channels),
            data,
        )
    }

    /// The frame's format.
    pub fn format(&self) -> AudioFormat {
        self.format
    }

    /// The raw bytes (cheap to clone).
    pub fn data(&self) -> &Bytes {
        &self.data
    }

    /// Consumes the frame, returning its bytes.
    pub fn into_data(self) -> Bytes {
        self.data
    }

    /// Sample frames (one sample per channel) in the frame.
    pub fn sample_frames(&self) -> usize {
        self.data.len() / self.format.bytes_per_frame()
    }

    /// How long the frame plays.
    pub fn duration(&self) -> Duration {
        Duration::from_nanos(
            (self.sample_frames() as u64 * 1_000_000_000) / self.format.sample_rate as u64,
        )
    }

    /// Whether the frame holds no samples.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}
