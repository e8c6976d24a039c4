//! Resampling: the integer-ratio polyphase filter ([`super::polyphase`]) for
//! the common speech rate pairs, rubato's windowed-sinc resampler for the
//! others. Both are time-aligned (output sample `j` is the input signal at
//! time `j / rate_out`), take frames of any length, and drain their tail on
//! flush, so a stream of `n` input frames gives `ceil(n * rate_out / rate_in)`
//! output frames either way.

use std::fmt;
use std::time::Duration;

use rubato::audioadapter_buffers::direct::InterleavedSlice;
use rubato::{
    Async, FixedAsync, Resampler as _, Resizable, SincInterpolationParameters,
    SincInterpolationType, WindowFunction, calculate_cutoff,
};

use super::polyphase::{self, Polyphase};
use crate::error::{BackendError, ErrorCode, Result};

/// Which resampler an [`AudioConverter`](super::AudioConverter) uses when the
/// sample rate changes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ResamplerKind {
    /// The integer-ratio polyphase filter when the reduced ratio of the two
    /// rates has terms of at most 6 (48 <-> 16 kHz, 8 <-> 16 kHz,
    /// 48 <-> 24 kHz, 48 <-> 8 kHz, 16 <-> 24 kHz, ...), the windowed-sinc
    /// resampler otherwise (e.g. 44.1 kHz <-> 16 kHz). The default.
    #[default]
    Auto,
    /// The windowed-sinc resampler (rubato's) for every ratio: slower for the
    /// integer ratios, with a longer filter (more stopband attenuation, more
    /// latency). For comparison.
    Sinc,
}

/// A resampler at a fixed ratio for interleaved channels.
pub(super) struct Resampler {
    engine: Engine,
    channels: usize,
}

enum Engine {
    Polyphase(Polyphase),
    Sinc(Box<Sinc>),
}

impl fmt::Debug for Resampler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Resampler");
        d.field("channels", &self.channels);
        match &self.engine {
            Engine::Polyphase(p) => d.field("polyphase", p),
            Engine::Sinc(s) => d.field("sinc", s),
        };
        d.finish()
    }
}

impl Resampler {
    /// A resampler from `rate_in` to `rate_out` for `channels` channels.
    ///
    /// Fails with [`ErrorCode::PipelineError`] when the rates are more than
    /// [`MAX_RATIO`] apart or there are more than [`MAX_RESAMPLE_CHANNELS`].
    pub(super) fn new(
        rate_in: u32,
        rate_out: u32,
        channels: usize,
        kind: ResamplerKind,
    ) -> Result<Self> {
        let (rin, rout) = (u64::from(rate_in), u64::from(rate_out));
        let g = gcd(rin, rout);
        let (up, down) = (rout / g, rin / g);
        if up > MAX_RATIO * down || down > MAX_RATIO * up {
            return Err(pipeline_error(
                "audio.converter",
                format!(
                    "cannot resample {rate_in} Hz to {rate_out} Hz: the ratio is beyond \
                     {MAX_RATIO}:1; convert in two steps"
                ),
            ));
        }
        if channels > MAX_RESAMPLE_CHANNELS {
            return Err(pipeline_error(
                "audio.converter",
                format!(
                    "cannot resample {channels} channels from {rate_in} Hz to {rate_out} Hz: \
                     at most {MAX_RESAMPLE_CHANNELS} channels are resampled at once"
                ),
            ));
        }
        let engine = if kind == ResamplerKind::Auto && polyphase::handles(up, down) {
            Engine::Polyphase(Polyphase::new(rate_in, up, down, channels))
        } else {
            Engine::Sinc(Box::new(Sinc::new(rate_in, rate_out, channels)?))
        };
        Ok(Resampler { engine, channels })
    }

    /// The channels it resamples, interleaved.
    pub(super) fn channels(&self) -> usize {
        self.channels
    }

    /// The longest an output sample waits for input.
    pub(super) fn latency(&self) -> Duration {
        match &self.engine {
            Engine::Polyphase(p) => p.latency(),
            Engine::Sinc(s) => s.latency,
        }
    }

    /// Resamples interleaved `input` (any length), appending ready output to `out`.
    pub(super) fn process(&mut self, input: &[f32], out: &mut Vec<f32>) -> Result<()> {
        match &mut self.engine {
            Engine::Polyphase(p) => {
                p.process(input, out);
                Ok(())
            }
            Engine::Sinc(s) => s.process(input, out),
        }
    }

    /// Drains the rest of the stream into `out`, then starts a new stream.
    pub(super) fn flush(&mut self, out: &mut Vec<f32>) -> Result<()> {
        match &mut self.engine {
            Engine::Polyphase(p) => {
                p.flush(out);
                Ok(())
            }
            Engine::Sinc(s) => s.flush(out),
        }
    }
}

fn pipeline_error(op: &'static str, message: impl Into<String>) -> BackendError {
    BackendError::new(op, ErrorCode::PipelineError, message)
}

/// Span of the anti-aliasing filter, in seconds of the lower rate.
const FILTER_SPAN_SECS: f64 = 0.008;
/// Bounds of the filter length in samples of the lower rate.
const MIN_FILTER_TAPS: usize = 32;
const MAX_FILTER_TAPS: usize = 256;
/// Largest supported ratio between the two rates, either way.
pub(super) const MAX_RATIO: u64 = 64;
/// Largest exact-phase filter table, in coefficients (2 MiB of f32).
const MAX_EXACT_TABLE: usize = 1 << 19;
/// Phases of the filter table when the exact table would be too large.
const CUBIC_PHASES: usize = 256;
/// Largest chunk handed to rubato at once, in input frames.
const MAX_CHUNK: usize = 1024;
/// Most channels resampled at once (bounds the resampler's memory).
pub(super) const MAX_RESAMPLE_CHANNELS: usize = 32;

pub(super) fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The general resampler: rubato's windowed-sinc resampler at a fixed
/// rational ratio, time-aligned and fed any number of frames.
struct Sinc {
    resampler: Async<f32>,
    channels: usize,
    /// Output rate / input rate, reduced: `up / down`.
    up: u64,
    down: u64,
    /// Zero frames fed at the start of every stream to make the delay whole.
    pre_pad: usize,
    /// Output frames of start-up delay dropped at the start of every stream.
    delay_frames: usize,
    /// Delay frames still to drop.
    skip_left: usize,
    /// Input frames fed and output frames emitted since the stream started.
    frames_in: u64,
    frames_out: u64,
    latency: Duration,
    out_scratch: Vec<f32>,
    zeros: Vec<f32>,
}

impl fmt::Debug for Sinc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sinc")
            .field("channels", &self.channels)
            .field("ratio", &format_args!("{}/{}", self.up, self.down))
            .field("delay_frames", &self.delay_frames)
            .field("pre_pad", &self.pre_pad)
            .field("latency", &self.latency)
            .finish_non_exhaustive()
    }
}

fn resample_error(e: impl std::error::Error + Send + Sync + 'static) -> BackendError {
    pipeline_error("audio.resample", format!("resampler failed: {e}")).with_source(e)
}

impl Sinc {
    fn new(rate_in: u32, rate_out: u32, channels: usize) -> Result<Self> {
        let (rin, rout) = (u64::from(rate_in), u64::from(rate_out));
        let g = gcd(rin, rout);
        let (up, down) = (rout / g, rin / g);
        let ratio = rout as f64 / rin as f64;

        // Filter length: ~8 ms at the lower rate, so the transition band (and so
        // the cut-off below the lower Nyquist) is the same whichever way we go.
        let lower = rin.min(rout) as f64;
        let base = ((lower * FILTER_SPAN_SECS).ceil() as usize)
            .next_multiple_of(8)
            .clamp(MIN_FILTER_TAPS, MAX_FILTER_TAPS);
        // rubato's filter runs at the input rate: stretch it when downsampling.
        let taps = if rout < rin {
            ((base as u64 * rin).div_ceil(rout) as usize).next_multiple_of(8)
        } else {
            base
        };
        // Relative to the lower Nyquist frequency (rubato scales it when downsampling).
        let cutoff = calculate_cutoff::<f32>(base, WindowFunction::BlackmanHarris);

        // With `up` phases every output position falls exactly on a table entry.
        let exact = (up as usize).saturating_mul(taps) <= MAX_EXACT_TABLE;
        let (phases, interpolation) = if exact {
            (up as usize, SincInterpolationType::Nearest)
        } else {
            (CUBIC_PHASES, SincInterpolationType::Cubic)
        };
        let params = SincInterpolationParameters::new(taps, WindowFunction::BlackmanHarris)
            .f_cutoff(cutoff)
            .oversampling_factor(phases)
            .interpolation(interpolation);
        let resampler =
            Async::<f32>::new_sinc(ratio, 1.0, &params, MAX_CHUNK, channels, FixedAsync::Input)
                .map_err(|e| resample_error(e).with_op("audio.converter"))?;

        // rubato's k-th output (from 0) sits at input position
        // (k + 1) / ratio - taps / 2 + 1 / phases. Feeding `pre_pad` zeros first
        // and dropping `delay_frames` outputs puts output j at input position
        // j / ratio. With exact phases the delay is
        // (up * (taps / 2 + pre_pad) - 1) / down - 1, a whole number when
        // up * (taps / 2 + pre_pad) = 1 (mod down): look for such a pad of at
        // most 1 ms; failing that, round (alignment within half a sample).
        let half = taps as u64 / 2;
        let max_pad = (rin / 1000).min(down - 1);
        let pad = if exact {
            (0..=max_pad).find(|z| (up * (half + z)) % down == 1 % down)
        } else {
            None
        };
        let (pre_pad, delay_frames) = match pad {
            Some(z) => (
                z as usize,
                ((up * (half + z) - 1) / down).saturating_sub(1) as usize,
            ),
            None => {
                let d = ratio * (half as f64 - 1.0 / phases as f64) - 1.0;
                (0, d.round().max(0.0) as usize)
            }
        };
        // rubato emits its k-th output once it has `(k + 1) / ratio + 2` input
        // frames (compared in floats: at a tie it may wait for one more frame,
        // which the bound below allows for). The pre-pad adds no wait. Output j of
        // the stream is rubato's output j + delay_frames, and rubato's input runs
        // pre_pad frames ahead of the stream's, so output j (time j / rate_out)
        // comes out once the stream's input reaches time
        // j / rate_out + (delay_frames + 1) / rate_out + (2 - pre_pad) / rate_in.
        // In units of 1 / lcm(rate_in, rate_out) = 1 / (up * rate_in):
        let latency_units =
            ((delay_frames as u64 + 1) * down + 2 * up).saturating_sub(pre_pad as u64 * up);
        let lcm = up * rin;
        let latency = Duration::from_nanos(
            (u128::from(latency_units) * 1_000_000_000).div_ceil(u128::from(lcm)) as u64,
        );

        let out_len = resampler.output_frames_max() * channels;
        let mut this = Sinc {
            resampler,
            channels,
            up,
            down,
            pre_pad,
            delay_frames,
            skip_left: delay_frames,
            frames_in: 0,
            frames_out: 0,
            latency,
            out_scratch: vec![0.0; out_len],
            zeros: vec![0.0; MAX_CHUNK * channels],
        };
        this.start_stream()?;
        Ok(this)
    }

    /// Puts the resampler at the start of a stream: pads with `pre_pad` zeros.
    fn start_stream(&mut self) -> Result<()> {
        self.skip_left = self.delay_frames;
        self.frames_in = 0;
        self.frames_out = 0;
        if self.pre_pad > 0 {
            let mut sink = Vec::new();
            let zeros = std::mem::take(&mut self.zeros);
            let result = self.run_chunk(&zeros[..self.pre_pad * self.channels], &mut sink);
            self.zeros = zeros;
            result?;
        }
        Ok(())
    }

    /// Resamples interleaved `input` (any length), appending ready output to `out`.
    fn process(&mut self, input: &[f32], out: &mut Vec<f32>) -> Result<()> {
        for chunk in input.chunks(MAX_CHUNK * self.channels) {
            self.run_chunk(chunk, out)?;
        }
        self.frames_in += (input.len() / self.channels) as u64;
        Ok(())
    }

    /// Feeds one chunk of at most `MAX_CHUNK` frames.
    fn run_chunk(&mut self, chunk: &[f32], out: &mut Vec<f32>) -> Result<()> {
        let ch = self.channels;
        let frames = chunk.len() / ch;
        if frames == 0 {
            return Ok(());
        }
        if self.resampler.input_frames_next() != frames {
            self.resampler
                .set_chunk_size(frames)
                .map_err(resample_error)?;
        }
        let written = {
            let input = InterleavedSlice::new(chunk, ch, frames).map_err(resample_error)?;
            let capacity = self.out_scratch.len() / ch;
            let mut output = InterleavedSlice::new_mut(&mut self.out_scratch, ch, capacity)
                .map_err(resample_error)?;
            let (_, written) = self
                .resampler
                .process_into_buffer(&input, &mut output, None)
                .map_err(resample_error)?;
            written
        };
        let skip = self.skip_left.min(written);
        self.skip_left -= skip;
        out.extend_from_slice(&self.out_scratch[skip * ch..written * ch]);
        self.frames_out += (written - skip) as u64;
        Ok(())
    }

    /// Output frames a stream of `frames_in` input frames resamples to.
    fn expected_out(&self) -> u64 {
        (u128::from(self.frames_in) * u128::from(self.up)).div_ceil(u128::from(self.down)) as u64
    }

    /// Drains the rest of the stream into `out` (zero-padded), then starts a new stream.
    fn flush(&mut self, out: &mut Vec<f32>) -> Result<()> {
        if self.frames_in == 0 && self.frames_out == 0 {
            return Ok(());
        }
        let expected = self.expected_out();
        let start = out.len();
        let wanted = expected.saturating_sub(self.frames_out) as usize;
        // Enough zero chunks to push every pending sample through the filter.
        let pending_in = self.resampler.output_delay() as u64 * self.down / self.up
            + (wanted as u64 * self.down).div_ceil(self.up)
            + self.delay_frames as u64
            + 64;
        let max_chunks = pending_in.div_ceil(MAX_CHUNK as u64) + 2;
        let zeros = std::mem::take(&mut self.zeros);
        let mut result = Ok(());
        for _ in 0..max_chunks {
            if (out.len() - start) / self.channels >= wanted {
                break;
            }
            result = self.run_chunk(&zeros, out);
            if result.is_err() {
                break;
            }
        }
        self.zeros = zeros;
        result?;
        out.truncate(start + wanted.min((out.len() - start) / self.channels) * self.channels);
        self.resampler.reset();
        self.start_stream()
    }
}
