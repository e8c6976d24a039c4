//! `"denoise"`: noise suppression by RNNoise (feature `denoise`), an audio
//! processor that runs before voice activity detection.
//!
//! RNNoise (here `nnnoiseless`, its pure-Rust port, with its model built in)
//! estimates, for each 10 ms of 48 kHz audio, a gain per frequency band from
//! a small recurrent network, and applies it: steady noise (fans, hiss,
//! traffic) is taken out, the voice kept. No model file, no network.
//!
//! As the noise cancellation stage (it runs first, before any custom
//! processor):
//!
//! ```toml
//! noise_cancellation_provider = "denoise"
//!
//! [components.denoise]
//! strength = 1.0   # the share of denoised audio in the output, 0..=1
//! vad_gate = 0.0   # mute blocks RNNoise hears no voice in (0: off)
//! ```
//!
//! or as a custom processor, at an `order` of your choice:
//!
//! ```toml
//! processors = [{ name = "denoise", order = -10, options = { strength = 0.9 } }]
//! ```
//!
//! # How the audio goes through
//!
//! The pipeline's 16 kHz frames are resampled to 48 kHz (the crate's
//! integer-ratio resampler, [`AudioConverter`]), cut into RNNoise's 480-sample
//! blocks (whatever the frames' sizes: what is left over waits for the next
//! frame), denoised, resampled back to 16 kHz, and mixed with the input
//! according to [`DenoiseOptions::strength`]. Each frame comes out as long as
//! it went in, in the pipeline's format, delayed by a constant
//! [`Denoiser::latency`]: about 24 ms, that is RNNoise's own 10 ms (each block
//! is overlapped with the next), up to 10 ms waiting for a whole block, and
//! the two resamplers' 2 ms each. The first [`Denoiser::latency`] of output
//! is silence.
//!
//! Above 8 kHz the 16 kHz pipeline carries nothing, so RNNoise's upper bands
//! see no energy there; it still denoises the rest (its bands are fixed, not
//! learned per rate).

use std::collections::VecDeque;
use std::sync::OnceLock;
use std::time::Duration;

use nnnoiseless::{DenoiseState, RnnModel};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::audio::{AudioConverter, AudioEncoding, AudioFormat, AudioFrame};
use crate::error::{BackendError, ErrorCode, Result};
use crate::hooks::AudioProcessor;
use crate::pipeline::builtin::{OPTIONS_OP, OptionChecks, parse_options};
use crate::pipeline::{INTERNAL_FORMAT, ProcessorFactory};

/// The name the processor is registered under, and its options section.
pub const NAME: &str = "denoise";

/// RNNoise's block: 480 samples at 48 kHz, 10 ms.
const BLOCK: usize = DenoiseState::FRAME_SIZE;

/// The rate RNNoise works at.
const RNNOISE_RATE: u32 = 48_000;

/// The rate ratio between RNNoise and the pipeline.
const RATIO: usize = (RNNOISE_RATE / INTERNAL_FORMAT.sample_rate) as usize;

/// 48 kHz mono float, what the resamplers convert to and from.
const F32_48K: AudioFormat = AudioFormat::new(AudioEncoding::PcmF32Le, RNNOISE_RATE, 1);

/// RNNoise's samples are floats in the range of 16-bit integers.
const I16_SCALE: f32 = 32768.0;

/// Options of the [`Denoiser`] (`[components.denoise]`, or a processor's
/// `options`); see the [module documentation](self) for an example.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct DenoiseOptions {
    /// The share of the denoised audio in the output, 0.0..=1.0; the rest is
    /// the input (delayed to match). Default 1.0, all denoised. Lower values
    /// keep some of the background and cap the reduction at
    /// `-20 * log10(1 - strength)` dB (0.9: 20 dB), which sounds more natural
    /// and takes less of the voice with the noise.
    pub strength: f32,
    /// RNNoise's own voice probability (0.0..=1.0) under which a 10 ms block
    /// of denoised audio is muted (the gain ramps down across the block, and
    /// back up across the first block with voice); 0.0, the default, mutes
    /// nothing. What leaks through between words (music, babble) is cut too,
    /// at the risk of the first few milliseconds of a word.
    pub vad_gate: f32,
}

impl Default for DenoiseOptions {
    fn default() -> Self {
        DenoiseOptions {
            strength: 1.0,
            vad_gate: 0.0,
        }
    }
}

impl DenoiseOptions {
    /// Parses `[components.denoise]` or a processor's `options` (`null`
    /// gives the defaults) and checks the ranges.
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`](ErrorCode::InvalidConfig) (operation
    /// `component.options`) with one `details` entry per bad field, keyed
    /// `components.denoise.<field>`; unknown keys are errors too.
    pub fn from_value(options: &serde_json::Value) -> Result<Self> {
        let options: DenoiseOptions = parse_options(OPTIONS_OP, NAME, options)?;
        options.validate()?;
        Ok(options)
    }

    /// Checks the ranges (see each field).
    ///
    /// # Errors
    ///
    /// As [`DenoiseOptions::from_value`].
    pub fn validate(&self) -> Result<()> {
        let mut checks = OptionChecks::new(NAME);
        checks.check((0.0..=1.0).contains(&self.strength), "strength", || {
            format!("{} is outside 0..=1", self.strength)
        });
        checks.check((0.0..=1.0).contains(&self.vad_gate), "vad_gate", || {
            format!("{} is outside 0..=1", self.vad_gate)
        });
        checks.finish()
    }
}

/// RNNoise's model, parsed once for every session.
fn model() -> &'static RnnModel {
    static MODEL: OnceLock<RnnModel> = OnceLock::new();
    MODEL.get_or_init(RnnModel::default)
}

/// One session's noise suppressor; see the [module documentation](self).
pub struct Denoiser {
    options: DenoiseOptions,
    order: i32,
    rnnoise: Box<DenoiseState<'static>>,
    up: AudioConverter,
    down: AudioConverter,
    /// 48 kHz samples (in 16-bit range) waiting for a whole block.
    pending: Vec<f32>,
    /// Denoised 16 kHz samples, the first `wet_delay` of them silence.
    wet: VecDeque<f32>,
    /// The input, the first `latency` of it silence.
    dry: VecDeque<f32>,
    /// The gain the last block ended with (the gate's).
    gain: f32,
    /// Samples the output was short of (zero unless the delay is too small).
    underruns: u64,
    latency_samples: usize,
    block_in: [f32; BLOCK],
    block_out: [f32; BLOCK],
}

impl std::fmt::Debug for Denoiser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Denoiser")
            .field("options", &self.options)
            .field("order", &self.order)
            .field("latency_samples", &self.latency_samples)
            .finish_non_exhaustive()
    }
}

impl Denoiser {
    /// A denoiser with `options` (assumed valid; see
    /// [`DenoiseOptions::validate`]), running at `order` among the processors.
    ///
    /// # Errors
    ///
    /// [`PipelineError`](ErrorCode::PipelineError) if a resampler cannot be
    /// made (not expected: the rates are fixed).
    pub fn new(options: DenoiseOptions, order: i32) -> Result<Self> {
        let up = AudioConverter::new(INTERNAL_FORMAT, F32_48K)?;
        let down = AudioConverter::new(F32_48K, INTERNAL_FORMAT)?;
        let rate = f64::from(INTERNAL_FORMAT.sample_rate);
        let lag = |d: Duration| (d.as_secs_f64() * rate).ceil() as usize;
        // The most the denoised stream can be behind the input: the
        // resamplers' look-ahead and a block less one sample waiting to be
        // whole, with a sample for rounding.
        let wet_delay = lag(up.latency()) + lag(down.latency()) + BLOCK.div_ceil(RATIO) + 1;
        // RNNoise's output block is its input block before (overlap-add).
        let latency_samples = wet_delay + BLOCK / RATIO;
        Ok(Denoiser {
            options,
            order,
            rnnoise: DenoiseState::with_model(model()),
            up,
            down,
            pending: Vec::with_capacity(2 * BLOCK),
            wet: std::iter::repeat_n(0.0, wet_delay).collect(),
            dry: std::iter::repeat_n(0.0, latency_samples).collect(),
            gain: 1.0,
            underruns: 0,
            latency_samples,
            block_in: [0.0; BLOCK],
            block_out: [0.0; BLOCK],
        })
    }

    /// How late the output is: every input sample comes out (denoised) this
    /// much later. About 24 ms; see the [module documentation](self).
    pub fn latency(&self) -> Duration {
        Duration::from_nanos(
            self.latency_samples as u64 * 1_000_000_000 / u64::from(INTERNAL_FORMAT.sample_rate),
        )
    }

    /// [`Denoiser::latency`] in samples of the pipeline's 16 kHz.
    pub fn latency_samples(&self) -> usize {
        self.latency_samples
    }

    /// Output samples that were not ready in time and came out as silence
    /// (zero: the latency is chosen so that none are, whatever the frames'
    /// sizes).
    pub fn underruns(&self) -> u64 {
        self.underruns
    }

    /// The options in use.
    pub fn options(&self) -> &DenoiseOptions {
        &self.options
    }

    /// Denoises whole blocks of `pending` into `wet`.
    fn run_blocks(&mut self) -> Result<()> {
        let mut done = 0;
        let mut out48 = Vec::new();
        while self.pending.len() - done >= BLOCK {
            self.block_in
                .copy_from_slice(&self.pending[done..done + BLOCK]);
            done += BLOCK;
            let voice = self
                .rnnoise
                .process_frame(&mut self.block_out, &self.block_in);
            let target = if voice < self.options.vad_gate {
                0.0
            } else {
                1.0
            };
            let from = self.gain;
            for (i, s) in self.block_out.iter().enumerate() {
                let g = from + (target - from) * (i + 1) as f32 / BLOCK as f32;
                let v = (s * g / I16_SCALE).clamp(-1.0, 1.0);
                out48.extend_from_slice(&v.to_le_bytes());
            }
            self.gain = target;
        }
        self.pending.drain(..done);
        if out48.is_empty() {
            return Ok(());
        }
        let frame = AudioFrame::new(F32_48K, out48)?;
        if let Some(back) = self.down.convert(&frame)? {
            self.wet.extend(
                back.data()
                    .chunks_exact(2)
                    .map(|b| f32::from(i16::from_le_bytes([b[0], b[1]]))),
            );
        }
        Ok(())
    }
}

impl AudioProcessor for Denoiser {
    fn name(&self) -> &str {
        NAME
    }

    fn order(&self) -> i32 {
        self.order
    }

    fn process(&mut self, frame: AudioFrame) -> Result<AudioFrame> {
        if frame.format() != INTERNAL_FORMAT {
            return Err(BackendError::new(
                "denoise.process",
                ErrorCode::PipelineError,
                format!(
                    "a frame in {} (the denoiser takes the pipeline's {})",
                    frame.format(),
                    INTERNAL_FORMAT
                ),
            ));
        }
        if frame.is_empty() {
            return Ok(frame);
        }
        let input: Vec<f32> = frame
            .data()
            .chunks_exact(2)
            .map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])))
            .collect();
        if let Some(up) = self.up.convert(&frame)? {
            self.pending.extend(
                up.data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) * I16_SCALE),
            );
        }
        self.run_blocks()?;
        self.dry.extend(&input);
        let strength = self.options.strength;
        let mut out = Vec::with_capacity(input.len() * 2);
        for _ in 0..input.len() {
            let dry = self.dry.pop_front().unwrap_or(0.0);
            let wet = self.wet.pop_front().unwrap_or_else(|| {
                self.underruns += 1;
                0.0
            });
            let v = strength * wet + (1.0 - strength) * dry;
            let s = v.round().clamp(f32::from(i16::MIN), f32::from(i16::MAX)) as i16;
            out.extend_from_slice(&s.to_le_bytes());
        }
        AudioFrame::new(INTERNAL_FORMAT, out)
    }
}

/// Makes a [`Denoiser`] per session from `[components.denoise]` or the
/// processor's `options`.
#[derive(Clone, Copy, Debug, Default)]
pub struct DenoiseFactory;

impl ProcessorFactory for DenoiseFactory {
    fn create(&self, options: &serde_json::Value, order: i32) -> Result<Box<dyn AudioProcessor>> {
        let options = DenoiseOptions::from_value(options)?;
        Ok(Box::new(Denoiser::new(options, order)?))
    }
}

crate::register_component!(processor, NAME, DenoiseFactory::default);
