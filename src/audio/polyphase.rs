//! The integer-ratio resampler: a streaming polyphase FIR filter for rate
//! pairs whose reduced ratio `up / down` has small terms (48 <-> 16 kHz,
//! 8 <-> 16 kHz, 48 <-> 24 kHz, 48 <-> 8 kHz, 16 <-> 24 kHz, ...).
//!
//! # The filter
//!
//! One linear-phase low-pass filter per ratio, designed once (and cached for
//! the process) at the rate `up * rate_in`, the least common multiple of the
//! two rates: a sinc windowed by a Kaiser window designed for
//! [`STOPBAND_DB`] of attenuation, spanning [`HALF_SPAN`] samples of the lower
//! rate on either side of its centre (an odd number of taps, so the centre
//! is a sample). The stopband starts at the lower of the two Nyquist
//! frequencies, so a tone above it cannot alias into the output
//! (downsampling) and no image of the input spectrum survives (upsampling);
//! the cut-off sits half of Kaiser's transition width below it.
//!
//! # Computing it
//!
//! Output sample `j` is the filtered input at time `j * down / up` input
//! samples, exactly. Outputs come in `up` interleaved phases; the outputs of
//! one phase read windows `down` input samples apart. With the input split
//! into `down` streams (stream `s` holds every `down`-th sample from `s`),
//! each phase becomes `down` ordinary FIR filters over consecutive samples,
//! summed: a block of consecutive outputs is accumulated one tap at a time
//! (the tap broadcast, the outputs side by side in SIMD lanes), which the
//! compiler vectorises with no bounds checks in the inner loop. On x86-64
//! CPUs with AVX2 and FMA (detected at run time) the same code is compiled
//! for those instructions; elsewhere it uses the target's baseline.
//!
//! # Streaming
//!
//! An output is computed as soon as the last input sample its window covers
//! has arrived, and never again, from the same window with the same
//! arithmetic in the same order: the output does not depend on how the input
//! was cut into frames. The start of a stream reads zeros before the first
//! sample, and [`Polyphase::flush`] reads zeros after the last.

use std::sync::OnceLock;
use std::time::Duration;

/// Largest `up` or `down` of a reduced ratio this resampler takes.
pub(super) const MAX_FACTOR: u64 = 6;
/// Stopband attenuation the Kaiser window is designed for, in dB.
pub(super) const STOPBAND_DB: f64 = 81.0;
/// Half the filter's length in samples of the lower rate; the resampler's
/// latency is this many samples of the lower rate.
pub(super) const HALF_SPAN: usize = 32;

/// Whether the reduced ratio `up / down` is one this resampler takes.
pub(super) fn handles(up: u64, down: u64) -> bool {
    up <= MAX_FACTOR && down <= MAX_FACTOR && up != down
}

/// The polyphase filter of one ratio.
pub(super) struct Filter {
    up: usize,
    down: usize,
    /// Taps per phase, a multiple of `down`.
    taps: usize,
    /// The centre of the prototype filter, in samples at `up * rate_in`.
    centre: u64,
    /// `up` phases of `taps` coefficients. Phase `r`, read forwards over an
    /// output's window, is `g[t] = h[r + (taps - 1 - t) * up]`; it is stored
    /// as `down` runs, run `s` holding `g[s], g[s + down], g[s + 2 * down], ...`.
    table: Vec<f32>,
}

impl Filter {
    /// The cached filter for `up / down` (see [`handles`]).
    fn cached(up: u64, down: u64) -> &'static Filter {
        const SLOTS: usize = (MAX_FACTOR * MAX_FACTOR) as usize;
        static FILTERS: [OnceLock<Filter>; SLOTS] = [const { OnceLock::new() }; SLOTS];
        let slot = ((up - 1) * MAX_FACTOR + (down - 1)) as usize;
        FILTERS[slot]
            .get_or_init(|| Filter::design(up as usize, down as usize, HALF_SPAN, STOPBAND_DB))
    }

    /// Designs the Kaiser-windowed sinc low-pass for `up / down`, spanning
    /// `half_span` samples of the lower rate on either side of its centre,
    /// with a window for `stopband_db` of attenuation.
    pub(super) fn design(up: usize, down: usize, half_span: usize, stopband_db: f64) -> Filter {
        let wide = up.max(down);
        // Taps per phase: enough for the span, a whole number of runs.
        let taps = (2 * half_span * wide - 1)
            .div_ceil(up)
            .next_multiple_of(down);
        // The longest odd length that fits, so the centre is a sample.
        let len = if (taps * up) % 2 == 1 {
            taps * up
        } else {
            taps * up - 1
        };
        let centre = (len - 1) / 2;
        // At the filter's rate the lower Nyquist frequency is 1 / (2 * wide)
        // cycles per sample; the stopband starts there, after a transition
        // band as wide as Kaiser's formula gives for this length.
        let stop = 0.5 / wide as f64;
        let transition = (stopband_db - 7.95) / (14.36 * (len - 1) as f64);
        let cutoff = stop - transition / 2.0;
        let beta = 0.1102 * (stopband_db - 8.7);
        let i0_beta = bessel_i0(beta);
        let pi = std::f64::consts::PI;
        let h: Vec<f64> = (0..len)
            .map(|n| {
                let x = n as f64 - centre as f64;
                let r = x / centre as f64;
                let window = bessel_i0(beta * (1.0 - r * r).max(0.0).sqrt()) / i0_beta;
                let arg = pi * 2.0 * cutoff * x;
                let sinc = if x == 0.0 { 1.0 } else { arg.sin() / arg };
                2.0 * cutoff * sinc * window
            })
            .collect();
        let runs = taps / down;
        let mut table = vec![0.0f32; up * taps];
        for r in 0..up {
            let g: Vec<f64> = (0..taps)
                .map(|t| h.get(r + (taps - 1 - t) * up).copied().unwrap_or(0.0))
                .collect();
            // Every phase passes DC at unit gain: no image of a constant, and
            // the phases sum to `up`, the gain zero-stuffing needs.
            let sum: f64 = g.iter().sum();
            let phase = &mut table[r * taps..(r + 1) * taps];
            for (t, c) in g.iter().enumerate() {
                phase[(t % down) * runs + t / down] = (c / sum) as f32;
            }
        }
        Filter {
            up,
            down,
            taps,
            centre: centre as u64,
            table,
        }
    }

    /// Run `s` of phase `r`.
    fn run(&self, r: usize, s: usize) -> &[f32] {
        let runs = self.taps / self.down;
        let start = r * self.taps + s * runs;
        &self.table[start..start + runs]
    }

    /// The first input sample of output `j`'s window, counted from `taps - 1`
    /// samples before the stream's first, and the phase that computes it.
    fn window(&self, j: u64) -> (u64, usize) {
        let q = j * self.down as u64 + self.centre;
        (q / self.up as u64, (q % self.up as u64) as usize)
    }

    /// The filter's response at `freq` (a fraction of its own rate, `up *
    /// rate_in`), as a gain: the phases interleaved back into the prototype.
    #[cfg(test)]
    pub(super) fn response(&self, freq: f64) -> f64 {
        let runs = self.taps / self.down;
        let (mut re, mut im) = (0.0, 0.0);
        for r in 0..self.up {
            for t in 0..self.taps {
                let g =
                    f64::from(self.table[r * self.taps + (t % self.down) * runs + t / self.down]);
                let n = (r + (self.taps - 1 - t) * self.up) as f64 - self.centre as f64;
                let phase = 2.0 * std::f64::consts::PI * freq * n;
                re += g * phase.cos();
                im += g * phase.sin();
            }
        }
        (re * re + im * im).sqrt() / self.up as f64
    }
}

/// The zeroth-order modified Bessel function of the first kind (power series).
fn bessel_i0(x: f64) -> f64 {
    let (mut sum, mut term, mut k) = (1.0f64, 1.0f64, 1.0f64);
    let half = x / 2.0;
    loop {
        term *= (half / k) * (half / k);
        sum += term;
        if term < sum * 1e-17 {
            return sum;
        }
        k += 1.0;
    }
}

/// A streaming integer-ratio resampler of interleaved channels.
pub(super) struct Polyphase {
    filter: &'static Filter,
    channels: usize,
    /// Per channel, the input still needed: `taps - 1` zeros before the
    /// stream's first sample, then the samples as fed, minus what is dropped.
    history: Vec<Vec<f32>>,
    /// The index of `history[c][0]`, counted like [`Filter::window`]'s.
    history_start: u64,
    /// Input frames fed and output frames emitted since the stream started.
    frames_in: u64,
    frames_out: u64,
    latency: Duration,
    /// The history split into `down` streams, when `down > 1`.
    split: Vec<f32>,
    /// One phase's outputs as they are summed.
    sums: Vec<f32>,
}

impl std::fmt::Debug for Polyphase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Polyphase")
            .field(
                "ratio",
                &format_args!("{}/{}", self.filter.up, self.filter.down),
            )
            .field("taps_per_phase", &self.filter.taps)
            .field("channels", &self.channels)
            .field("latency", &self.latency)
            .finish_non_exhaustive()
    }
}

impl Polyphase {
    /// A resampler from `rate_in` Hz by the reduced ratio `up / down`
    /// (see [`handles`]) for `channels` interleaved channels.
    pub(super) fn new(rate_in: u32, up: u64, down: u64, channels: usize) -> Polyphase {
        let filter = Filter::cached(up, down);
        // Output j (at input time j * down / up) comes out with input sample
        // floor((j * down + centre) / up): the wait is longest, centre / up
        // input samples, when the division is exact (some j makes it so).
        let lcm = u128::from(up) * u128::from(rate_in);
        let latency =
            Duration::from_nanos((u128::from(filter.centre) * 1_000_000_000).div_ceil(lcm) as u64);
        let mut this = Polyphase {
            filter,
            channels,
            history: vec![Vec::new(); channels],
            history_start: 0,
            frames_in: 0,
            frames_out: 0,
            latency,
            split: Vec::new(),
            sums: Vec::new(),
        };
        this.start_stream();
        this
    }

    /// The longest an output sample waits for input.
    pub(super) fn latency(&self) -> Duration {
        self.latency
    }

    fn start_stream(&mut self) {
        for h in &mut self.history {
            h.clear();
            h.resize(self.filter.taps - 1, 0.0);
        }
        self.history_start = 0;
        self.frames_in = 0;
        self.frames_out = 0;
    }

    /// Resamples interleaved `input` (any length), appending ready output to `out`.
    pub(super) fn process(&mut self, input: &[f32], out: &mut Vec<f32>) {
        let ch = self.channels;
        if ch == 1 {
            self.history[0].extend_from_slice(input);
        } else {
            for (c, h) in self.history.iter_mut().enumerate() {
                h.extend(input.iter().skip(c).step_by(ch));
            }
        }
        self.frames_in += (input.len() / ch) as u64;
        // Output j needs input floor((j * down + centre) / up): it is ready
        // when j * down + centre < frames_in * up.
        let f = self.filter;
        let ready = (self.frames_in * f.up as u64)
            .saturating_sub(f.centre)
            .div_ceil(f.down as u64);
        self.emit(ready, out);
    }

    /// Drains the rest of the stream into `out` (the input's tail filtered
    /// against zeros), then starts a new stream.
    pub(super) fn flush(&mut self, out: &mut Vec<f32>) {
        let f = self.filter;
        let total = (self.frames_in * f.up as u64).div_ceil(f.down as u64);
        if total > self.frames_out {
            // Zeros up to the end of the last output's window.
            let (start, _) = f.window(total - 1);
            let end = start + f.taps as u64;
            let have = self.history_start + self.history[0].len() as u64;
            let zeros = end.saturating_sub(have) as usize;
            for h in &mut self.history {
                h.resize(h.len() + zeros, 0.0);
            }
            self.emit(total, out);
        }
        self.start_stream();
    }

    /// Computes outputs `frames_out..end` into `out`, then drops the input
    /// no later output needs.
    fn emit(&mut self, end: u64, out: &mut Vec<f32>) {
        let f = self.filter;
        let first = self.frames_out;
        if end <= first {
            return;
        }
        let ch = self.channels;
        let base = out.len();
        out.resize(base + (end - first) as usize * ch, 0.0);
        let dst = &mut out[base..];
        let (up, down) = (f.up, f.down);
        for (c, history) in self.history.iter().enumerate() {
            // Stream s holds history[s], history[s + down], ...
            let stream_len = history.len().div_ceil(down);
            let streams: &[f32] = if down == 1 {
                history
            } else {
                self.split.clear();
                self.split.resize(down * stream_len, 0.0);
                split(history, &mut self.split, down);
                &self.split
            };
            // The outputs of phase p are first + p, first + p + up, ...: in
            // one run of `dst` when there is one phase and one channel, else
            // in `sums` (phase p from p * per_phase), interleaved after.
            let direct = up == 1 && ch == 1;
            let per_phase = (end - first).div_ceil(up as u64) as usize;
            if !direct {
                self.sums.clear();
                self.sums.resize(up * per_phase, 0.0);
            }
            for p in 0..up.min((end - first) as usize) {
                let j0 = first + p as u64;
                let count = (end - j0).div_ceil(up as u64) as usize;
                let (start, phase) = f.window(j0);
                // Output i reads history[at + i * down + t] for t in 0..taps:
                // run s of the phase reads stream (at + s) % down from
                // (at + s) / down + i on.
                let at = (start - self.history_start) as usize;
                let sums = if direct {
                    &mut dst[..count]
                } else {
                    &mut self.sums[p * per_phase..p * per_phase + count]
                };
                for s in 0..down {
                    let (stream, from) = ((at + s) % down, (at + s) / down);
                    let x = &streams[stream * stream_len..(stream + 1) * stream_len];
                    kernel::accumulate(sums, f.run(phase, s), &x[from..]);
                }
            }
            if ch == 1 && up > 1 {
                merge(&self.sums, up, dst);
            } else if !direct {
                for (i, frame) in dst.chunks_exact_mut(ch).enumerate() {
                    frame[c] = self.sums[(i % up) * per_phase + i / up];
                }
            }
        }
        self.frames_out = end;
        let (next, _) = f.window(end);
        let drop = ((next - self.history_start) as usize).min(self.history[0].len());
        for h in &mut self.history {
            h.drain(..drop);
        }
        self.history_start += drop as u64;
    }
}

/// Splits `history` into `down` streams of `split.len() / down` samples:
/// stream `s` holds `history[s], history[s + down], ...`, then zeros.
fn split(history: &[f32], split: &mut [f32], down: usize) {
    fn split_by<const D: usize>(history: &[f32], split: &mut [f32]) {
        let len = split.len() / D;
        let (frames, rest) = history.as_chunks::<D>();
        let n = frames.len();
        // Each stream's first n samples, and the rest (one sample from
        // `rest`, if any, then zeros).
        let mut streams = split.chunks_exact_mut(len);
        let mut heads: [(&mut [f32], &mut [f32]); D] = std::array::from_fn(|_| {
            streams
                .next()
                .map_or((&mut [][..], &mut [][..]), |s| s.split_at_mut(n))
        });
        for (k, frame) in frames.iter().enumerate() {
            for ((head, _), v) in heads.iter_mut().zip(frame) {
                head[k] = *v;
            }
        }
        for ((_, tail), v) in heads.iter_mut().zip(rest) {
            tail[0] = *v;
        }
    }
    match down {
        2 => split_by::<2>(history, split),
        3 => split_by::<3>(history, split),
        4 => split_by::<4>(history, split),
        5 => split_by::<5>(history, split),
        6 => split_by::<6>(history, split),
        _ => {
            let len = split.len() / down;
            for (i, v) in history.iter().enumerate() {
                split[(i % down) * len + i / down] = *v;
            }
        }
    }
}

/// Interleaves `up` phases of `sums.len() / up` outputs into `dst`:
/// `dst[i * up + p] = sums[p * (sums.len() / up) + i]`, for as many as fit.
fn merge(sums: &[f32], up: usize, dst: &mut [f32]) {
    fn merge_by<const U: usize>(sums: &[f32], dst: &mut [f32]) {
        let len = sums.len() / U;
        let (frames, rest) = dst.as_chunks_mut::<U>();
        let n = frames.len();
        let mut phases = sums.chunks_exact(len);
        let heads: [(&[f32], &[f32]); U] = std::array::from_fn(|_| {
            phases
                .next()
                .map_or((&[][..], &[][..]), |p| p.split_at(n.min(p.len())))
        });
        for (k, frame) in frames.iter_mut().enumerate() {
            for (d, (head, _)) in frame.iter_mut().zip(&heads) {
                *d = head[k];
            }
        }
        for (d, (_, tail)) in rest.iter_mut().zip(&heads) {
            *d = tail[0];
        }
    }
    match up {
        2 => merge_by::<2>(sums, dst),
        3 => merge_by::<3>(sums, dst),
        4 => merge_by::<4>(sums, dst),
        5 => merge_by::<5>(sums, dst),
        6 => merge_by::<6>(sums, dst),
        _ => {
            let len = sums.len() / up;
            for (i, d) in dst.iter_mut().enumerate() {
                *d = sums[(i % up) * len + i / up];
            }
        }
    }
}

/// Whether the CPU runs AVX2 and FMA (checked once, then cached by std).
#[cfg(target_arch = "x86_64")]
#[inline]
pub(super) fn avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// `sums[i] += taps . x[i..i + taps.len()]`: the outputs side by side in
/// lanes, one tap at a time, in blocks the registers hold.
mod kernel {
    /// Outputs per block in the baseline build and with AVX2: enough
    /// independent sums to keep the multiply-add units busy, few enough to
    /// stay in registers.
    const BLOCK: usize = 32;
    #[cfg(target_arch = "x86_64")]
    const BLOCK_AVX2: usize = 64;
    /// Whether the baseline build fuses multiply-adds (the target has them
    /// without run-time detection).
    const FUSED: bool = cfg!(any(target_arch = "aarch64", target_feature = "fma"));

    /// Adds `taps . x[i..i + taps.len()]` to `sums[i]` for every `i`;
    /// `x` holds at least `sums.len() + taps.len() - 1` samples.
    pub(super) fn accumulate(sums: &mut [f32], taps: &[f32], x: &[f32]) {
        #[cfg(target_arch = "x86_64")]
        if super::avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA, the features the function
            // is compiled for, as checked just above.
            unsafe { accumulate_avx2(sums, taps, x) };
            return;
        }
        accumulate_with::<FUSED, BLOCK>(sums, taps, x);
    }

    /// [`accumulate`] compiled for AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn accumulate_avx2(sums: &mut [f32], taps: &[f32], x: &[f32]) {
        accumulate_with::<true, BLOCK_AVX2>(sums, taps, x);
    }

    /// [`accumulate`] with the baseline instructions.
    #[cfg(test)]
    pub(super) fn accumulate_baseline(sums: &mut [f32], taps: &[f32], x: &[f32]) {
        accumulate_with::<FUSED, BLOCK>(sums, taps, x);
    }

    #[inline(always)]
    fn mac<const FUSED: bool>(h: f32, x: f32, sum: f32) -> f32 {
        if FUSED {
            h.mul_add(x, sum)
        } else {
            h * x + sum
        }
    }

    /// Every output's sum runs over the taps in order, whichever block it
    /// falls in, so a sample's value does not depend on where a block starts.
    #[inline(always)]
    fn accumulate_with<const FUSED: bool, const B: usize>(
        sums: &mut [f32],
        taps: &[f32],
        x: &[f32],
    ) {
        let k = taps.len();
        if k == 0 {
            return;
        }
        let mut at = 0;
        let mut rest = sums;
        // Whole blocks of `B`, then of smaller sizes for what is left (each
        // block is as many independent sums as it has lanes).
        macro_rules! blocks {
            ($($size:expr),*) => {$(
                if $size <= B {
                    let mut blocks = rest.chunks_exact_mut($size);
                    for block in &mut blocks {
                        block_with::<FUSED, { $size }>(
                            block.try_into().unwrap(),
                            taps,
                            &x[at..at + k + $size - 1],
                        );
                        at += $size;
                    }
                    rest = blocks.into_remainder();
                }
            )*};
        }
        if B == 64 {
            blocks!(64);
        }
        blocks!(32, 16, 8);
        for sum in rest {
            let mut s = *sum;
            for (h, v) in taps.iter().zip(&x[at..at + k]) {
                s = mac::<FUSED>(*h, *v, s);
            }
            *sum = s;
            at += 1;
        }
    }

    /// One block of `B` outputs, held in registers across the taps.
    #[inline(always)]
    fn block_with<const FUSED: bool, const B: usize>(sums: &mut [f32; B], taps: &[f32], x: &[f32]) {
        let mut acc = *sums;
        for (h, w) in taps.iter().zip(x.windows(B)) {
            let w: &[f32; B] = w.try_into().unwrap();
            for i in 0..B {
                acc[i] = mac::<FUSED>(*h, w[i], acc[i]);
            }
        }
        *sums = acc;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The designed filters' responses, on a fine grid: flat to 0.1 dB up to
    /// 0.85 of the lower Nyquist frequency, 80 dB down from it to the
    /// filter's own Nyquist frequency.
    #[test]
    fn the_designed_filter_meets_its_specification() {
        for (up, down) in [
            (1, 3),
            (3, 1),
            (2, 1),
            (1, 2),
            (1, 6),
            (6, 1),
            (3, 2),
            (2, 3),
        ] {
            let f = Filter::cached(up, down);
            let nyquist = 0.5 / up.max(down) as f64;
            let db = |g: f64| 20.0 * g.log10();
            let mut edge = 0.0;
            for i in 0..=1000 {
                let fr = nyquist * f64::from(i) / 1000.0;
                if db(f.response(fr)).abs() > 0.1 {
                    break;
                }
                edge = fr / nyquist;
            }
            let mut worst: f64 = 0.0;
            for i in 0..=4000 {
                let fr = nyquist + (0.5 - nyquist) * f64::from(i) / 4000.0;
                worst = worst.max(f.response(fr));
            }
            assert!(
                edge >= 0.85,
                "{up}/{down}: flat to 0.1 dB only up to {edge:.3} of the lower Nyquist frequency"
            );
            assert!(
                db(worst) <= -80.0,
                "{up}/{down}: the stopband reaches {:.1} dB",
                db(worst)
            );
        }
    }

    #[test]
    fn baseline_and_avx2_kernels_agree() {
        let taps: Vec<f32> = (0..77).map(|i| ((i as f32) * 0.37).sin() * 0.05).collect();
        let x: Vec<f32> = (0..400).map(|i| ((i as f32) * 0.11).cos()).collect();
        for n in [0, 1, 7, 8, 9, 31, 32, 33, 64, 65, 150, 300] {
            let mut a = vec![0.5f32; n];
            let mut b = a.clone();
            kernel::accumulate_baseline(&mut a, &taps, &x);
            kernel::accumulate(&mut b, &taps, &x);
            for i in 0..n {
                let exact: f64 = 0.5
                    + taps
                        .iter()
                        .zip(&x[i..])
                        .map(|(h, v)| f64::from(*h) * f64::from(*v))
                        .sum::<f64>();
                assert!((f64::from(a[i]) - exact).abs() < 1e-5, "{n} {i}");
                assert!((f64::from(b[i]) - exact).abs() < 1e-5, "{n} {i}");
            }
        }
    }
}
