// Microphone capture: resamples the AudioContext's rate (the global
// `sampleRate`, e.g. 48000 or 44100) to `targetRate` (16000 by default) and
// posts 20 ms frames of 16-bit PCM (an Int16Array's ArrayBuffer, transferred)
// to the main thread.
//
// The resampler is a polyphase windowed-sinc FIR (Kaiser window, about 70 dB
// stopband): symmetric, so linear phase. Its low-pass cuts at 95 % of the
// lower Nyquist frequency (7.6 kHz for 16 kHz output) so nothing above the
// output's Nyquist folds back. Input and output positions are tracked with
// exact integer arithmetic (the rates' ratio in lowest terms), so the
// output keeps time with the input however long it runs.

class Resampler {
  constructor(inRate, outRate) {
    this.passthrough = inRate === outRate;
    const g = gcd(inRate, outRate);
    this.step = inRate / g; // input samples per `phases` outputs (M)
    this.phases = outRate / g; // output positions per input sample (L)
    const low = Math.min(inRate, outRate);
    const cutoff = (0.475 * low) / inRate; // -6 dB point, cycles per input sample
    const transition = (0.05 * low) / inRate; // full transition width
    const attenuation = 70; // dB
    const beta = 0.1102 * (attenuation - 8.7);
    // Kaiser's estimate of the taps needed, at the input rate.
    const taps = Math.ceil((attenuation - 7.95) / (2.285 * 2 * Math.PI * transition)) + 1;
    this.half = Math.ceil(taps / 2); // taps either side of the output position
    // One kernel row per output phase. Huge phase counts (odd rates) are
    // quantized to 1024 rows; that error is far below 16-bit resolution.
    this.rows = Math.min(this.phases, 1024);
    const width = 2 * this.half;
    this.kernel = new Float32Array((this.rows + 1) * width);
    const i0beta = besselI0(beta);
    for (let r = 0; r <= this.rows; r++) {
      const frac = r / this.rows; // output position past input sample `base`
      let sum = 0;
      for (let j = 0; j < width; j++) {
        // Tap j weighs input sample base - half + 1 + j.
        const t = j - this.half + 1 - frac; // its distance from the output position
        const x = t / this.half;
        const w = Math.abs(x) >= 1 ? 0 : besselI0(beta * Math.sqrt(1 - x * x)) / i0beta;
        const v = 2 * cutoff * sinc(2 * cutoff * t) * w;
        this.kernel[r * width + j] = v;
        sum += v;
      }
      for (let j = 0; j < width; j++) this.kernel[r * width + j] /= sum; // unity gain at DC
    }
    // Input history: samples from `start` (an absolute index) on.
    this.buf = new Float32Array(8192);
    this.len = 0;
    this.start = 0;
    this.base = this.half - 1; // absolute input index left of the next output
    this.phase = 0; // position past `base`, in 1/L input samples
  }

  // Appends `input` and returns the output samples it completes.
  push(input, out) {
    if (this.passthrough) {
      for (let i = 0; i < input.length; i++) out.push(input[i]);
      return;
    }
    if (this.len + input.length > this.buf.length) {
      const next = new Float32Array(Math.max(this.buf.length * 2, this.len + input.length));
      next.set(this.buf.subarray(0, this.len));
      this.buf = next;
    }
    this.buf.set(input, this.len);
    this.len += input.length;
    const width = 2 * this.half;
    const { kernel, buf, rows, phases, step } = this;
    // An output needs input up to base + half.
    while (this.base + this.half < this.start + this.len) {
      const row = Math.round((this.phase * rows) / phases) * width;
      const first = this.base - this.half + 1 - this.start;
      let acc = 0;
      for (let j = 0; j < width; j++) acc += buf[first + j] * kernel[row + j];
      out.push(acc);
      this.phase += step;
      const whole = Math.floor(this.phase / phases);
      this.base += whole;
      this.phase -= whole * phases;
    }
    // Drop the input no later output can reach.
    const keep = this.base - this.half + 1 - this.start;
    if (keep > 0) {
      this.buf.copyWithin(0, keep, this.len);
      this.len -= keep;
      this.start += keep;
    }
  }
}

function gcd(a, b) {
  while (b) [a, b] = [b, a % b];
  return a;
}

function sinc(x) {
  if (x === 0) return 1;
  const px = Math.PI * x;
  return Math.sin(px) / px;
}

function besselI0(x) {
  let sum = 1;
  let term = 1;
  for (let k = 1; k < 50; k++) {
    term *= (x / (2 * k)) * (x / (2 * k));
    sum += term;
    if (term < 1e-12 * sum) break;
  }
  return sum;
}

class PcmCapture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    this.targetRate = opts.targetRate || 16000;
    this.frameSamples = Math.round((this.targetRate * (opts.frameMs || 20)) / 1000);
    this.resampler = new Resampler(Math.round(sampleRate), this.targetRate);
    this.pending = [];
    this.frame = new Int16Array(this.frameSamples);
    this.fill = 0;
  }

  process(inputs) {
    const input = inputs[0];
    if (!input || input.length === 0) return true; // no source yet: keep running
    let mono = input[0];
    if (input.length > 1) {
      // Down-mix to mono.
      mono = new Float32Array(input[0].length);
      for (const ch of input) for (let i = 0; i < mono.length; i++) mono[i] += ch[i] / input.length;
    }
    this.pending.length = 0;
    this.resampler.push(mono, this.pending);
    for (const s of this.pending) {
      const v = Math.max(-1, Math.min(1, s));
      this.frame[this.fill++] = Math.round(v < 0 ? v * 32768 : v * 32767);
      if (this.fill === this.frameSamples) {
        this.port.postMessage(this.frame.buffer, [this.frame.buffer]);
        this.frame = new Int16Array(this.frameSamples);
        this.fill = 0;
      }
    }
    return true;
  }
}

registerProcessor("pcm-capture", PcmCapture);
