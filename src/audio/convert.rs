//! Conversion between audio formats: encoding, channel layout and sample rate.
//!
//! The conventions (scaling, G.711, channel mixing, resampler, latency) are
//! documented on the parent module, [`crate::audio`].

use std::time::Duration;

use super::resample::{Resampler, ResamplerKind};
use super::{AudioEncoding, AudioFormat, AudioFrame};
use crate::error::{BackendError, ErrorCode, Result};

// ---------------------------------------------------------------------------
// Scalar sample conversions
// ---------------------------------------------------------------------------

/// Converts a 16-bit sample to float by dividing by 32768 (`-32768` -> `-1.0`).
#[inline]
pub fn i16_to_f32(sample: i16) -> f32 {
    sample as f32 * (1.0 / 32768.0)
}

/// Converts a float sample to 16 bits: clamps to `-1.0..=1.0`, multiplies by
/// 32768, rounds half away from zero and saturates at 32767; NaN gives 0.
#[inline]
pub fn f32_to_i16(sample: f32) -> i16 {
    // 1.5 * 2^23: a float of magnitude below 2^22 plus this is rounded to an
    // integer (ties to even), which the low bits of the sum hold.
    const MAGIC: f32 = 12_582_912.0;
    // Exact: the clamp and the power-of-two scale.
    let scaled = if sample.is_nan() {
        0.0
    } else {
        sample.clamp(-1.0, 1.0)
    } * 32768.0;
    let biased = scaled + MAGIC;
    let nearest = biased.to_bits() as i32 - MAGIC.to_bits() as i32;
    // Exact too: what rounding removed, in -0.5..=0.5. At a tie the even
    // neighbour was taken; half away from zero takes the outer one. (Float
    // and integer operations only, so a buffer of these vectorises.)
    let removed = scaled - (biased - MAGIC);
    let rounded = nearest + i32::from(removed == 0.5 && scaled > 0.0)
        - i32::from(removed == -0.5 && scaled < 0.0);
    // 32768 saturates to 32767.
    rounded.clamp(i32::from(i16::MIN), i32::from(i16::MAX)) as i16
}

/// Reads an f32 sample from input: NaN becomes 0, anything else is clamped to -1..=1.
#[inline]
fn sanitize(sample: f32) -> f32 {
    if sample.is_nan() {
        0.0
    } else {
        sample.clamp(-1.0, 1.0)
    }
}

// ---------------------------------------------------------------------------
// G.711
// ---------------------------------------------------------------------------

/// Mu-law bias (0x84), as in G.711 on the 16-bit scale.
const ULAW_BIAS: i32 = 0x84;
/// Largest mu-law magnitude on the 14-bit scale before biasing.
const ULAW_CLIP: i32 = 8159;

const fn mulaw_decode_calc(code: u8) -> i16 {
    let u = !code;
    let mut t = (((u & 0x0F) as i32) << 3) + ULAW_BIAS;
    t <<= (u & 0x70) >> 4;
    if u & 0x80 != 0 {
        (ULAW_BIAS - t) as i16
    } else {
        (t - ULAW_BIAS) as i16
    }
}

const fn alaw_decode_calc(code: u8) -> i16 {
    let a = code ^ 0x55;
    let mut t = ((a & 0x0F) as i32) << 4;
    let seg = ((a & 0x70) >> 4) as i32;
    match seg {
        0 => t += 8,
        1 => t += 0x108,
        _ => {
            t += 0x108;
            t <<= seg - 1;
        }
    }
    if a & 0x80 != 0 { t as i16 } else { -t as i16 }
}

const MULAW_TABLE: [i16; 256] = {
    let mut table = [0i16; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = mulaw_decode_calc(i as u8);
        i += 1;
    }
    table
};

const ALAW_TABLE: [i16; 256] = {
    let mut table = [0i16; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = alaw_decode_calc(i as u8);
        i += 1;
    }
    table
};

/// Decodes one G.711 mu-law byte to a 16-bit sample (table lookup).
///
/// `0xFF` and `0x7F` (the two zeros) decode to 0, `0x80` to 32124, `0x00` to -32124.
#[inline]
pub fn mulaw_decode(code: u8) -> i16 {
    MULAW_TABLE[code as usize]
}

/// Decodes one G.711 A-law byte to a 16-bit sample (table lookup).
///
/// `0xD5` decodes to 8, `0x55` to -8, `0xAA` to 32256, `0x2A` to -32256.
#[inline]
pub fn alaw_decode(code: u8) -> i16 {
    ALAW_TABLE[code as usize]
}

/// Encodes a 16-bit sample as G.711 mu-law with the standard segment algorithm.
///
/// The sample is reduced to 14 bits, its magnitude clipped to 8159 and biased
/// by 33; the segment is the position of the highest set bit above bit 5, and
/// the four bits after it are the step within the segment. Code bits are
/// inverted as G.711 specifies.
#[inline]
pub fn mulaw_encode(sample: i16) -> u8 {
    let mut pcm = i32::from(sample) >> 2;
    let mask: u8 = if pcm < 0 {
        pcm = -pcm;
        0x7F
    } else {
        0xFF
    };
    pcm = pcm.min(ULAW_CLIP) + (ULAW_BIAS >> 2);
    // Segment s covers biased magnitudes below 64 << s.
    let seg = 32 - ((pcm >> 6) as u32).leading_zeros();
    if seg >= 8 {
        return 0x7F ^ mask;
    }
    let code = ((seg as u8) << 4) | ((pcm >> (seg + 1)) & 0x0F) as u8;
    code ^ mask
}

/// Encodes a 16-bit sample as G.711 A-law with the standard segment algorithm.
///
/// The sample is reduced to 13 bits (negative values to their one's
/// complement magnitude); the segment is the position of the highest set bit
/// above bit 4, the four bits after it are the step within the segment, and
/// even bits are inverted (XOR 0x55) as G.711 specifies.
#[inline]
pub fn alaw_encode(sample: i16) -> u8 {
    let mut pcm = i32::from(sample) >> 3;
    let mask: u8 = if pcm >= 0 {
        0xD5
    } else {
        pcm = -pcm - 1;
        0x55
    };
    // pcm is now 0..=4095: segment s covers magnitudes below 32 << s, s <= 7.
    let seg = 32 - ((pcm >> 5) as u32).leading_zeros();
    let step = if seg < 2 { pcm >> 1 } else { pcm >> seg };
    let code = ((seg as u8) << 4) | (step & 0x0F) as u8;
    code ^ mask
}

// ---------------------------------------------------------------------------
// Buffers: decode, mix, encode
// ---------------------------------------------------------------------------

/// Appends the samples of `data` (in `encoding`) to `out` as floats.
fn decode_into(data: &[u8], encoding: AudioEncoding, out: &mut Vec<f32>) {
    match encoding {
        AudioEncoding::PcmS16Le => out.extend(
            data.as_chunks::<2>()
                .0
                .iter()
                .map(|c| i16_to_f32(i16::from_le_bytes(*c))),
        ),
        AudioEncoding::PcmF32Le => out.extend(
            data.chunks_exact(4)
                .map(|c| sanitize(f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
        ),
        AudioEncoding::Mulaw => out.extend(data.iter().map(|&b| i16_to_f32(mulaw_decode(b)))),
        AudioEncoding::Alaw => out.extend(data.iter().map(|&b| i16_to_f32(alaw_decode(b)))),
    }
}

/// Encodes float samples in `encoding`.
fn encode(samples: &[f32], encoding: AudioEncoding) -> Vec<u8> {
    let mut out = vec![0u8; samples.len() * encoding.bytes_per_sample()];
    match encoding {
        AudioEncoding::PcmS16Le => encode_s16(samples, out.as_chunks_mut::<2>().0),
        AudioEncoding::PcmF32Le => {
            for (dst, &s) in out.chunks_exact_mut(4).zip(samples) {
                dst.copy_from_slice(&sanitize(s).to_le_bytes());
            }
        }
        AudioEncoding::Mulaw => {
            for (dst, &s) in out.iter_mut().zip(samples) {
                *dst = mulaw_encode(f32_to_i16(s));
            }
        }
        AudioEncoding::Alaw => {
            for (dst, &s) in out.iter_mut().zip(samples) {
                *dst = alaw_encode(f32_to_i16(s));
            }
        }
    }
    out
}

/// Encodes float samples as s16le, as [`f32_to_i16`] does one by one.
fn encode_s16(samples: &[f32], out: &mut [[u8; 2]]) {
    #[inline(always)]
    fn encode_with(samples: &[f32], out: &mut [[u8; 2]]) {
        for (dst, &s) in out.iter_mut().zip(samples) {
            *dst = f32_to_i16(s).to_le_bytes();
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn encode_avx2(samples: &[f32], out: &mut [[u8; 2]]) {
        encode_with(samples, out);
    }
    #[cfg(target_arch = "x86_64")]
    if super::polyphase::avx2_fma() {
        // SAFETY: the CPU supports AVX2, the feature the function is compiled
        // for, as checked just above.
        unsafe { encode_avx2(samples, out) };
        return;
    }
    encode_with(samples, out);
}

/// The channel count resampling runs at: the input's when the layout is
/// unchanged, otherwise mono (every other mix goes through mono).
fn core_channels(from: u16, to: u16) -> usize {
    if from == to { from as usize } else { 1 }
}

/// Mixes interleaved `input` from `from` channels to `to` channels, appending to `out`.
///
/// Callers handle `from == to` without copying; it is still correct here.
fn remix_into(input: &[f32], from: usize, to: usize, out: &mut Vec<f32>) {
    if from == to {
        out.extend_from_slice(input);
        return;
    }
    let frames = input.len() / from;
    let start = out.len();
    out.resize(start + frames * to, 0.0);
    let dst = &mut out[start..];
    if from == 1 {
        for (d, &s) in dst.chunks_exact_mut(to).zip(input) {
            d.fill(s);
        }
    } else if from == 2 && to == 1 {
        for (d, pair) in dst.iter_mut().zip(input.chunks_exact(2)) {
            *d = (pair[0] + pair[1]) * 0.5;
        }
    } else {
        let n = from as f32;
        for (d, frame) in dst.chunks_exact_mut(to).zip(input.chunks_exact(from)) {
            d.fill(frame.iter().sum::<f32>() / n);
        }
    }
}

/// Converts between the integer encodings (s16, mu-law, A-law) at the same
/// channel count, without going through floats.
fn transcode_int(data: &[u8], from: AudioEncoding, to: AudioEncoding) -> Vec<u8> {
    let samples = data.len() / from.bytes_per_sample();
    match from {
        AudioEncoding::PcmS16Le => encode_i16(
            data.chunks_exact(2)
                .map(|c| i16::from_le_bytes([c[0], c[1]])),
            samples,
            to,
        ),
        AudioEncoding::Mulaw => encode_i16(data.iter().map(|&b| mulaw_decode(b)), samples, to),
        AudioEncoding::Alaw => encode_i16(data.iter().map(|&b| alaw_decode(b)), samples, to),
        AudioEncoding::PcmF32Le => unreachable!("transcode_int is for integer encodings"),
    }
}

/// Encodes `count` 16-bit samples in an integer encoding.
fn encode_i16(samples: impl Iterator<Item = i16>, count: usize, to: AudioEncoding) -> Vec<u8> {
    let mut out = vec![0u8; count * to.bytes_per_sample()];
    match to {
        AudioEncoding::PcmS16Le => {
            for (dst, s) in out.chunks_exact_mut(2).zip(samples) {
                dst.copy_from_slice(&s.to_le_bytes());
            }
        }
        AudioEncoding::Mulaw => {
            for (dst, s) in out.iter_mut().zip(samples) {
                *dst = mulaw_encode(s);
            }
        }
        AudioEncoding::Alaw => {
            for (dst, s) in out.iter_mut().zip(samples) {
                *dst = alaw_encode(s);
            }
        }
        AudioEncoding::PcmF32Le => unreachable!("encode_i16 is for integer encodings"),
    }
    out
}

/// Whether a same-rate conversion can skip floats: same channels, no f32 on either side.
fn integer_path(from: AudioFormat, to: AudioFormat) -> bool {
    from.channels == to.channels
        && from.encoding != AudioEncoding::PcmF32Le
        && to.encoding != AudioEncoding::PcmF32Le
}

fn pipeline_error(op: &'static str, message: impl Into<String>) -> BackendError {
    BackendError::new(op, ErrorCode::PipelineError, message)
}

// ---------------------------------------------------------------------------
// Stateless helpers
// ---------------------------------------------------------------------------

/// Converts a frame to another encoding and channel layout at the same sample rate.
///
/// Returns the frame itself (sharing its bytes) when `to` is its format.
/// Fails with [`ErrorCode::PipelineError`] when `to` is invalid or has another
/// sample rate: resampling needs the filter state that [`AudioConverter`]
/// keeps from one frame to the next.
pub fn convert_frame(frame: &AudioFrame, to: AudioFormat) -> Result<AudioFrame> {
    let from = frame.format();
    if from == to {
        return Ok(frame.clone());
    }
    to.validate()
        .map_err(|e| e.with_op("audio.convert_frame"))?;
    if from.sample_rate != to.sample_rate {
        return Err(pipeline_error(
            "audio.convert_frame",
            format!(
                "cannot convert {from} to {to}: the sample rate changes, and convert_frame only \
                 converts encoding and channels; use an AudioConverter, which keeps the \
                 resampler's state from one frame to the next"
            ),
        ));
    }
    if integer_path(from, to) {
        let bytes = transcode_int(frame.data(), from.encoding, to.encoding);
        return AudioFrame::new(to, bytes).map_err(|e| e.with_op("audio.convert_frame"));
    }
    let mut decoded = Vec::with_capacity(frame.sample_frames() * from.channels as usize);
    decode_into(frame.data(), from.encoding, &mut decoded);
    let bytes = if from.channels == to.channels {
        encode(&decoded, to.encoding)
    } else {
        let mut mixed = Vec::new();
        remix_into(
            &decoded,
            from.channels as usize,
            to.channels as usize,
            &mut mixed,
        );
        encode(&mixed, to.encoding)
    };
    AudioFrame::new(to, bytes).map_err(|e| e.with_op("audio.convert_frame"))
}

/// The frame's samples as 16-bit integers, interleaved as they are.
///
/// s16 is copied, f32 converted with [`f32_to_i16`], G.711 decoded with its table.
pub fn to_i16_samples(frame: &AudioFrame) -> Vec<i16> {
    let data = frame.data();
    match frame.format().encoding {
        AudioEncoding::PcmS16Le => data
            .chunks_exact(2)
            .map(|c| i16::from_le_bytes([c[0], c[1]]))
            .collect(),
        AudioEncoding::PcmF32Le => data
            .chunks_exact(4)
            .map(|c| f32_to_i16(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        AudioEncoding::Mulaw => data.iter().map(|&b| mulaw_decode(b)).collect(),
        AudioEncoding::Alaw => data.iter().map(|&b| alaw_decode(b)).collect(),
    }
}

/// The RMS level of `samples` in dBFS (0 dBFS is a full-scale square wave,
/// a full-scale sine is about -3 dBFS), never below -100; -100 for silence
/// or no samples.
pub fn level_dbfs(samples: &[i16]) -> f32 {
    if samples.is_empty() {
        return -100.0;
    }
    let sum: f64 = samples
        .iter()
        .map(|&s| {
            let s = f64::from(s);
            s * s
        })
        .sum();
    let rms = (sum / samples.len() as f64).sqrt() / 32768.0;
    if rms <= 0.0 {
        return -100.0;
    }
    ((20.0 * rms.log10()) as f32).max(-100.0)
}

// ---------------------------------------------------------------------------
// AudioConverter
// ---------------------------------------------------------------------------

#[derive(Debug)]
enum Stage {
    /// `from == to`: frames go through untouched.
    Passthrough,
    /// Same rate: encoding and/or channels change, sample by sample.
    Direct,
    /// The rate changes.
    Resample(Box<Resampler>),
}

/// Converts a stream of frames from one [`AudioFormat`] to another.
///
/// Made once per stream with [`AudioConverter::new`]; it keeps the resampler's
/// state from one frame to the next, so frames of any length (20 ms, 40 ms,
/// odd sizes) can be fed and the result is the same as converting the whole
/// stream at once. See the [module documentation](crate::audio) for the numeric
/// conventions, the channel mixing and the resampler.
///
/// * When `from == to`, [`convert`](AudioConverter::convert) hands back the
///   input frame itself (its `Bytes` cloned, no copy).
/// * When only the encoding or channels change, no resampler is made and
///   every frame converts to exactly one output frame.
/// * When the rate changes, output lags input by
///   [`latency`](AudioConverter::latency); call
///   [`flush`](AudioConverter::flush) at the end of the stream for the tail.
///
/// ```
/// use voice_backends::audio::{AudioConverter, AudioEncoding, AudioFormat, AudioFrame};
///
/// let from = AudioFormat::new(AudioEncoding::Mulaw, 8_000, 1);
/// let mut converter = AudioConverter::new(from, AudioFormat::PCM16_16K_MONO)?;
/// let frame = AudioFrame::new(from, vec![0xFFu8; 160])?; // 20 ms of silence
/// let mut out = Vec::new();
/// if let Some(f) = converter.convert(&frame)? {
///     out.push(f);
/// }
/// if let Some(f) = converter.flush()? {
///     out.push(f);
/// }
/// let frames: usize = out.iter().map(|f| f.sample_frames()).sum();
/// assert_eq!(frames, 320);
/// # Ok::<(), voice_backends::BackendError>(())
/// ```
#[derive(Debug)]
pub struct AudioConverter {
    from: AudioFormat,
    to: AudioFormat,
    stage: Stage,
    decoded: Vec<f32>,
    mixed: Vec<f32>,
    resampled: Vec<f32>,
    remixed: Vec<f32>,
}

impl AudioConverter {
    /// The format it converts from.
    pub fn input_format(&self) -> AudioFormat {
        self.from
    }

    /// The format it converts to.
    pub fn output_format(&self) -> AudioFormat {
        self.to
    }

    /// A converter from `from` to `to`.
    ///
    /// Fails with [`ErrorCode::PipelineError`] when either format is invalid
    /// (see [`AudioFormat::validate`]), the rates differ by more than 64:1, or
    /// the rate changes for more than 32 channels kept apart (a mix down to
    /// fewer channels resamples mono, and is fine).
    pub fn new(from: AudioFormat, to: AudioFormat) -> Result<Self> {
        Self::with_resampler(from, to, ResamplerKind::Auto)
    }

    /// A converter from `from` to `to` that resamples with `kind`; the same
    /// as [`AudioConverter::new`] when `kind` is [`ResamplerKind::Auto`].
    ///
    /// # Errors
    ///
    /// [`AudioConverter::new`]'s.
    pub fn with_resampler(from: AudioFormat, to: AudioFormat, kind: ResamplerKind) -> Result<Self> {
        from.validate().map_err(|e| e.with_op("audio.converter"))?;
        to.validate().map_err(|e| e.with_op("audio.converter"))?;
        let stage = if from == to {
            Stage::Passthrough
        } else if from.sample_rate == to.sample_rate {
            Stage::Direct
        } else {
            Stage::Resample(Box::new(Resampler::new(
                from.sample_rate,
                to.sample_rate,
                core_channels(from.channels, to.channels),
                kind,
            )?))
        };
        Ok(AudioConverter {
            from,
            to,
            stage,
            decoded: Vec::new(),
            mixed: Vec::new(),
            resampled: Vec::new(),
            remixed: Vec::new(),
        })
    }

    /// The format frames must have.
    pub fn from_format(&self) -> AudioFormat {
        self.from
    }

    /// The format of the frames produced.
    pub fn to_format(&self) -> AudioFormat {
        self.to
    }

    /// Whether frames go through untouched (`from == to`).
    pub fn is_passthrough(&self) -> bool {
        matches!(self.stage, Stage::Passthrough)
    }

    /// Whether the converter resamples (the rates differ).
    pub fn resamples(&self) -> bool {
        matches!(self.stage, Stage::Resample(_))
    }

    /// The delay the resampler adds: the longest an output sample waits for
    /// input. The output sample for time `t` comes out once the input sample
    /// for time `t + latency()` (or, between samples, the one before it) has
    /// been fed, so output lags input by at most this much. Zero when the rate
    /// does not change; just under 2 ms for 48 kHz <-> 16 kHz and 4 ms for
    /// 8 kHz <-> 16 kHz (the integer-ratio filter, half its length), about
    /// 3 ms for 44.1 kHz <-> 48 kHz (the sinc resampler).
    pub fn latency(&self) -> Duration {
        match &self.stage {
            Stage::Resample(r) => r.latency(),
            _ => Duration::ZERO,
        }
    }

    /// Converts one frame, returning the output that is ready.
    ///
    /// Without resampling every non-empty frame gives one frame (the same
    /// frame when `from == to`). With resampling the output is whatever the
    /// filter has completed: `None` while it is still filling (the first few
    /// milliseconds, or a frame shorter than a few samples). An empty frame
    /// gives `None`.
    ///
    /// Fails with [`ErrorCode::PipelineError`] when the frame's format is not
    /// the converter's input format.
    #[inline]
    pub fn convert(&mut self, frame: &AudioFrame) -> Result<Option<AudioFrame>> {
        if frame.format() != self.from {
            return Err(self.mismatch(frame.format()));
        }
        if frame.is_empty() {
            return Ok(None);
        }
        match self.stage {
            Stage::Passthrough => Ok(Some(frame.clone())),
            Stage::Direct => self.convert_direct(frame).map(Some),
            Stage::Resample(_) => self.convert_resampled(frame),
        }
    }

    /// Ends the stream: returns the output still held by the resampler, the
    /// input's tail filtered against zero padding (`None` when there is none,
    /// and always without resampling). The converter then starts a new
    /// stream, so it can be reused.
    pub fn flush(&mut self) -> Result<Option<AudioFrame>> {
        let Stage::Resample(r) = &mut self.stage else {
            return Ok(None);
        };
        self.resampled.clear();
        r.flush(&mut self.resampled)?;
        self.finish_resampled()
    }

    #[cold]
    #[inline(never)]
    fn mismatch(&self, got: AudioFormat) -> BackendError {
        pipeline_error(
            "audio.convert",
            format!(
                "frame format {got} does not match the converter's input format {}; \
                 make a converter for {got}",
                self.from
            ),
        )
        .with_detail("frame_format", got.to_string())
        .with_detail("expected_format", self.from.to_string())
    }

    fn convert_direct(&mut self, frame: &AudioFrame) -> Result<AudioFrame> {
        if integer_path(self.from, self.to) {
            let bytes = transcode_int(frame.data(), self.from.encoding, self.to.encoding);
            return AudioFrame::new(self.to, bytes).map_err(|e| e.with_op("audio.convert"));
        }
        self.decoded.clear();
        decode_into(frame.data(), self.from.encoding, &mut self.decoded);
        let bytes = if self.from.channels == self.to.channels {
            encode(&self.decoded, self.to.encoding)
        } else {
            self.mixed.clear();
            remix_into(
                &self.decoded,
                self.from.channels as usize,
                self.to.channels as usize,
                &mut self.mixed,
            );
            encode(&self.mixed, self.to.encoding)
        };
        AudioFrame::new(self.to, bytes).map_err(|e| e.with_op("audio.convert"))
    }

    fn convert_resampled(&mut self, frame: &AudioFrame) -> Result<Option<AudioFrame>> {
        let Stage::Resample(r) = &mut self.stage else {
            unreachable!("convert_resampled is only called when resampling");
        };
        self.decoded.clear();
        decode_into(frame.data(), self.from.encoding, &mut self.decoded);
        let input = if self.from.channels as usize == r.channels() {
            &self.decoded
        } else {
            self.mixed.clear();
            remix_into(
                &self.decoded,
                self.from.channels as usize,
                r.channels(),
                &mut self.mixed,
            );
            &self.mixed
        };
        self.resampled.clear();
        r.process(input, &mut self.resampled)?;
        self.finish_resampled()
    }

    /// Mixes and encodes `self.resampled` into an output frame.
    fn finish_resampled(&mut self) -> Result<Option<AudioFrame>> {
        if self.resampled.is_empty() {
            return Ok(None);
        }
        let core = core_channels(self.from.channels, self.to.channels);
        let samples = if core == self.to.channels as usize {
            &self.resampled
        } else {
            self.remixed.clear();
            remix_into(
                &self.resampled,
                core,
                self.to.channels as usize,
                &mut self.remixed,
            );
            &self.remixed
        };
        let bytes = encode(samples, self.to.encoding);
        AudioFrame::new(self.to, bytes)
            .map(Some)
            .map_err(|e| e.with_op("audio.convert"))
    }
}

/// Converts a stream of frames to whatever format is asked for next, keeping
/// one [`AudioConverter`] (and its resampler's state) while the source and
/// target formats stay the same, and making a new one when either changes.
/// A frame already in the target format is handed back as it is.
///
/// What a resampler still holds (a few milliseconds) is not lost when the
/// format changes: it comes out in front of the next frame in the same
/// target format, whether that frame passes through or goes through a new
/// converter. [`FormatFollower::flush`] ends a stream (its last audio out),
/// [`FormatFollower::reset`] drops it (a reply cut short).
///
/// Making a converter can take milliseconds (a resampler between unrelated
/// rates computes a filter table), so at most
/// [`MAX_CONVERTERS_PER_SECOND`] are made in any second: a frame that would
/// need another within it is refused, and a stream whose format changes
/// every frame cannot turn into a resampler per frame.
///
/// ```
/// use voice_backends::audio::{AudioEncoding, AudioFormat, AudioFrame, FormatFollower};
///
/// let mut follower = FormatFollower::default();
/// let mulaw = AudioFormat::new(AudioEncoding::Mulaw, 8_000, 1);
/// let frame = AudioFrame::new(mulaw, vec![0xFFu8; 160])?;
/// let out = follower.convert(frame, AudioFormat::PCM16_16K_MONO)?;
/// assert!(out.is_some_and(|f| f.format() == AudioFormat::PCM16_16K_MONO));
/// # Ok::<(), voice_backends::BackendError>(())
/// ```
#[derive(Debug, Default)]
pub struct FormatFollower {
    /// Boxed: a pointer while no conversion is needed.
    kept: Option<Box<Kept>>,
}

/// Converters a [`FormatFollower`] makes in any one second at most.
pub const MAX_CONVERTERS_PER_SECOND: u32 = 4;

/// The converter a [`FormatFollower`] keeps, and how many it made lately.
#[derive(Debug)]
struct Kept {
    converter: AudioConverter,
    /// Whether the converter may hold audio not yet out (it resampled
    /// something since it was made or flushed).
    holding: bool,
    /// The start of the current one-second window, and converters made in it.
    window: std::time::Instant,
    made: u32,
}

impl From<Option<AudioConverter>> for FormatFollower {
    /// A follower that starts with `converter` (made beforehand), if any.
    fn from(converter: Option<AudioConverter>) -> Self {
        FormatFollower {
            kept: converter.map(|converter| {
                Box::new(Kept {
                    converter,
                    holding: false,
                    window: std::time::Instant::now(),
                    made: 0,
                })
            }),
        }
    }
}

impl FormatFollower {
    /// Whether it holds a converter from `from` to `to` (made beforehand or
    /// by an earlier frame).
    pub fn holds(&self, from: AudioFormat, to: AudioFormat) -> bool {
        self.kept
            .as_ref()
            .is_some_and(|k| k.converter.from == from && k.converter.to == to)
    }

    /// `frame` in format `to`: itself when it is in `to` already, otherwise
    /// through the kept converter. `None` while a resampler is still filling
    /// up. Errors are [`AudioConverter::new`]'s and [`AudioConverter::convert`]'s,
    /// and [`ErrorCode::PipelineError`] for a frame that would need a new
    /// converter when [`MAX_CONVERTERS_PER_SECOND`] were made in the last
    /// second (the kept one stays).
    pub fn convert(&mut self, frame: AudioFrame, to: AudioFormat) -> Result<Option<AudioFrame>> {
        let from = frame.format();
        if from == to {
            // What the kept resampler still holds goes out first.
            let tail = self.tail_for(to)?;
            return join(tail, Some(frame));
        }
        let mut tail = None;
        let kept = match &mut self.kept {
            Some(k) if k.converter.from == from && k.converter.to == to => k,
            Some(k) => {
                let now = std::time::Instant::now();
                if now.duration_since(k.window) >= Duration::from_secs(1) {
                    k.window = now;
                    k.made = 0;
                }
                if k.made >= MAX_CONVERTERS_PER_SECOND {
                    return Err(pipeline_error(
                        "audio.convert",
                        format!(
                            "the audio format changed more than {MAX_CONVERTERS_PER_SECOND} \
                             times in a second; a frame in {from} is refused until the \
                             second is over (each change makes a new converter)"
                        ),
                    ));
                }
                let next = AudioConverter::new(from, to)?;
                // The old converter's last audio, in front of the new one's.
                if k.holding {
                    let old = k.converter.flush()?;
                    tail = old.filter(|f| f.format() == to);
                }
                k.converter = next;
                k.holding = false;
                k.made += 1;
                k
            }
            slot => slot.insert(Box::new(Kept {
                converter: AudioConverter::new(from, to)?,
                holding: false,
                window: std::time::Instant::now(),
                made: 1,
            })),
        };
        kept.holding |= kept.converter.resamples();
        let out = kept.converter.convert(&frame)?;
        join(tail, out)
    }

    /// Ends the stream: what the kept resampler still holds, in format `to`
    /// (`None` when it holds nothing, or converts to another format).
    ///
    /// # Errors
    ///
    /// [`AudioConverter::flush`]'s.
    pub fn flush(&mut self, to: AudioFormat) -> Result<Option<AudioFrame>> {
        self.tail_for(to)
    }

    /// Drops what the kept resampler still holds (the stream was cut).
    pub fn reset(&mut self) {
        if let Some(k) = self.kept.as_mut()
            && k.holding
        {
            // The converter starts a new stream; its old audio is dropped.
            let _ = k.converter.flush();
            k.holding = false;
        }
    }

    /// Flushes the kept converter if it may hold audio, keeping the output
    /// when it is in format `to`.
    fn tail_for(&mut self, to: AudioFormat) -> Result<Option<AudioFrame>> {
        match self.kept.as_mut() {
            Some(k) if k.holding => {
                k.holding = false;
                Ok(k.converter.flush()?.filter(|f| f.format() == to))
            }
            _ => Ok(None),
        }
    }
}

/// `head` then `rest` as one frame (they are in the same format).
pub(crate) fn join(
    head: Option<AudioFrame>,
    rest: Option<AudioFrame>,
) -> Result<Option<AudioFrame>> {
    match (head, rest) {
        (None, rest) => Ok(rest),
        (head, None) => Ok(head),
        (Some(head), Some(rest)) => {
            let mut data = Vec::with_capacity(head.data().len() + rest.data().len());
            data.extend_from_slice(head.data());
            data.extend_from_slice(rest.data());
            AudioFrame::new(rest.format(), data)
                .map(Some)
                .map_err(|e| e.with_op("audio.convert"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::resample::gcd;
    use super::*;

    const RATES: [u32; 5] = [8_000, 16_000, 24_000, 44_100, 48_000];

    /// Output sample frames the converter gives for `samples` (mono s16 at `rate`).
    fn feed(converter: &mut AudioConverter, rate: u32, samples: &[i16]) -> u64 {
        let frame = AudioFrame::from_i16(rate, 1, samples).unwrap();
        let out = converter.convert(&frame).unwrap();
        out.map_or(0, |f| f.sample_frames() as u64)
    }

    /// Measures how long output samples wait for input: 200 ms in 20 ms
    /// frames, then 20 ms one sample at a time. Output sample `j` belongs
    /// to time `j / rate_out` (the stream is time-aligned); its wait is the
    /// time of the input sample whose arrival brings it out, less its own
    /// time. The longest wait is `latency()`, to within one output sample;
    /// after every 20 ms frame the output owed is at most `latency()`.
    #[test]
    fn latency_is_the_longest_an_output_sample_waits_for_input() {
        for rin in RATES {
            for rout in RATES.into_iter().filter(|&r| r != rin) {
                let pcm = |rate| AudioFormat::new(AudioEncoding::PcmS16Le, rate, 1);
                let mut converter = AudioConverter::new(pcm(rin), pcm(rout)).unwrap();
                let latency = converter.latency().as_secs_f64();
                // Times in units of 1 / lcm(rin, rout).
                let lcm = u64::from(rin) / gcd(rin.into(), rout.into()) * u64::from(rout);
                let (per_in, per_out) = (lcm / u64::from(rin), lcm / u64::from(rout));
                let frame = vec![0i16; rin as usize / 50];
                let (mut fed, mut out) = (0u64, 0u64);
                for _ in 0..10 {
                    out += feed(&mut converter, rin, &frame);
                    fed += frame.len() as u64;
                    let owed = (fed * u64::from(rout)).div_ceil(u64::from(rin)) - out;
                    assert!(
                        owed as f64 / f64::from(rout) <= latency + 1e-12,
                        "{rin} -> {rout}: {owed} output samples owed after {fed} in, \
                         latency {latency}"
                    );
                }
                let mut longest = 0u64;
                for _ in 0..frame.len() {
                    let came = feed(&mut converter, rin, &[0]);
                    fed += 1;
                    for j in out..out + came {
                        longest = longest.max(((fed - 1) * per_in).saturating_sub(j * per_out));
                    }
                    out += came;
                }
                let measured = longest as f64 / lcm as f64;
                // One output sample, and the nanosecond latency() is rounded up to.
                let sample = 1.0 / f64::from(rout);
                assert!(
                    (latency - measured).abs() <= sample + 1e-9,
                    "{rin} -> {rout}: latency() {:.1} us, measured {:.1} us (one output \
                     sample is {:.1} us)",
                    latency * 1e6,
                    measured * 1e6,
                    sample * 1e6
                );
            }
        }
    }
}
