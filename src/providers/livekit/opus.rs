//! Opus for room audio: LiveKit rooms carry 48 kHz Opus, one 20 ms frame per
//! RTP packet. [`OpusDecoder`] turns the user's packets into 48 kHz mono
//! PCM (the session converts it to the pipeline's rate);
//! [`OpusEncoder`] takes the session's reply audio in any format, converts
//! it to 48 kHz mono and encodes each whole 20 ms.
//!
//! Built on libopus (Debian's `libopus-dev`) through `audiopus`.

use audiopus::coder::{Decoder, Encoder};
use audiopus::{Application, Bitrate, Channels, MutSignals, SampleRate, packet::Packet};

use crate::audio::{AudioConverter, AudioEncoding, AudioFormat, AudioFrame};
use crate::error::{BackendError, ErrorCode, Result};

/// Room audio's sample rate.
pub const SAMPLE_RATE: u32 = 48_000;

/// Samples in one 20 ms frame at 48 kHz: one RTP packet's worth.
pub const FRAME_SAMPLES: usize = 960;

/// The PCM the decoder gives and the encoder takes: 48 kHz mono s16le.
pub const PCM_FORMAT: AudioFormat = AudioFormat::new(AudioEncoding::PcmS16Le, SAMPLE_RATE, 1);

/// The longest Opus packet decodes to 120 ms: 5760 samples at 48 kHz.
const MAX_DECODED: usize = 5_760;

/// The largest encoded packet libopus writes for one frame (its own
/// recommendation for a buffer).
const MAX_PACKET: usize = 4_000;

fn opus_error(op: &'static str, what: &str, e: audiopus::Error) -> BackendError {
    BackendError::new(op, ErrorCode::PipelineError, format!("{what}: {e}"))
}

/// Decodes the user's Opus packets to 48 kHz mono PCM. A stereo stream is
/// mixed down by libopus.
pub struct OpusDecoder {
    decoder: Decoder,
    pcm: Vec<i16>,
}

impl std::fmt::Debug for OpusDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpusDecoder").finish_non_exhaustive()
    }
}

impl OpusDecoder {
    /// A decoder for one stream.
    ///
    /// # Errors
    ///
    /// `PipelineError` when libopus cannot make one.
    pub fn new() -> Result<Self> {
        let decoder = Decoder::new(SampleRate::Hz48000, Channels::Mono)
            .map_err(|e| opus_error("livekit.opus", "creating the Opus decoder", e))?;
        Ok(OpusDecoder {
            decoder,
            pcm: vec![0; MAX_DECODED],
        })
    }

    /// Decodes one packet's payload into 48 kHz mono PCM
    /// ([`PCM_FORMAT`]).
    ///
    /// # Errors
    ///
    /// `PipelineError` naming the problem for an empty or malformed packet;
    /// the decoder stays usable.
    pub fn decode(&mut self, payload: &[u8]) -> Result<AudioFrame> {
        let packet = Packet::try_from(payload)
            .map_err(|e| opus_error("livekit.opus", "an Opus packet was refused", e))?;
        self.run(Some(packet))
    }

    /// Conceals one lost 20 ms packet (libopus's packet loss concealment).
    ///
    /// # Errors
    ///
    /// `PipelineError` when libopus fails.
    pub fn conceal(&mut self) -> Result<AudioFrame> {
        let samples = &mut self.pcm[..FRAME_SAMPLES];
        let signals = MutSignals::try_from(samples)
            .map_err(|e| opus_error("livekit.opus", "concealing a lost packet", e))?;
        let n = self
            .decoder
            .decode(None, signals, false)
            .map_err(|e| opus_error("livekit.opus", "concealing a lost packet", e))?;
        AudioFrame::from_i16(SAMPLE_RATE, 1, &self.pcm[..n])
    }

    fn run(&mut self, packet: Option<Packet<'_>>) -> Result<AudioFrame> {
        let signals = MutSignals::try_from(&mut self.pcm)
            .map_err(|e| opus_error("livekit.opus", "decoding an Opus packet", e))?;
        let n = self
            .decoder
            .decode(packet, signals, false)
            .map_err(|e| opus_error("livekit.opus", "an Opus packet did not decode", e))?;
        AudioFrame::from_i16(SAMPLE_RATE, 1, &self.pcm[..n])
    }
}

/// Encodes reply audio to Opus, 20 ms a packet.
///
/// Frames in any format are converted to 48 kHz mono; each whole 20 ms
/// becomes one packet, the rest waits for the next frame (or
/// [`OpusEncoder::flush`]).
pub struct OpusEncoder {
    encoder: Encoder,
    converter: Option<AudioConverter>,
    pending: Vec<i16>,
    packet: Vec<u8>,
}

impl std::fmt::Debug for OpusEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpusEncoder")
            .field("pending_samples", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl OpusEncoder {
    /// An encoder for speech at `bitrate` bits per second (6000..=510000).
    ///
    /// # Errors
    ///
    /// `PipelineError` when libopus refuses the bitrate or cannot make one.
    pub fn new(bitrate: u32) -> Result<Self> {
        const OP: &str = "livekit.opus";
        let mut encoder = Encoder::new(SampleRate::Hz48000, Channels::Mono, Application::Voip)
            .map_err(|e| opus_error(OP, "creating the Opus encoder", e))?;
        let bits = i32::try_from(bitrate).unwrap_or(i32::MAX);
        encoder
            .set_bitrate(Bitrate::BitsPerSecond(bits))
            .map_err(|e| opus_error(OP, "setting the Opus bitrate", e))?;
        Ok(OpusEncoder {
            encoder,
            converter: None,
            pending: Vec::with_capacity(FRAME_SAMPLES * 2),
            packet: vec![0; MAX_PACKET],
        })
    }

    /// Samples waiting for a whole 20 ms frame.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Takes `frame` (any format) and hands `emit` each 20 ms packet it
    /// completes.
    ///
    /// # Errors
    ///
    /// `PipelineError` when the frame cannot be converted or libopus fails.
    pub fn push(&mut self, frame: &AudioFrame, mut emit: impl FnMut(&[u8])) -> Result<()> {
        if frame.format() == PCM_FORMAT {
            extend_i16(&mut self.pending, frame);
        } else {
            let format = frame.format();
            if self
                .converter
                .as_ref()
                .is_none_or(|c| c.input_format() != format)
            {
                self.converter = Some(AudioConverter::new(format, PCM_FORMAT)?);
            }
            if let Some(converter) = self.converter.as_mut()
                && let Some(converted) = converter.convert(frame)?
            {
                extend_i16(&mut self.pending, &converted);
            }
        }
        self.drain(&mut emit)
    }

    /// Encodes what is left, padded with silence to a whole frame, and
    /// starts a new stream (the end of a reply).
    ///
    /// # Errors
    ///
    /// `PipelineError` when libopus fails.
    pub fn flush(&mut self, mut emit: impl FnMut(&[u8])) -> Result<()> {
        if let Some(converter) = self.converter.as_mut()
            && let Some(tail) = converter.flush()?
        {
            extend_i16(&mut self.pending, &tail);
        }
        if !self.pending.is_empty() {
            let whole = self.pending.len().div_ceil(FRAME_SAMPLES) * FRAME_SAMPLES;
            self.pending.resize(whole, 0);
        }
        self.drain(&mut emit)
    }

    fn drain(&mut self, emit: &mut impl FnMut(&[u8])) -> Result<()> {
        let mut start = 0;
        while self.pending.len() - start >= FRAME_SAMPLES {
            let pcm = &self.pending[start..start + FRAME_SAMPLES];
            let n = self
                .encoder
                .encode(pcm, &mut self.packet)
                .map_err(|e| opus_error("livekit.opus", "encoding reply audio", e))?;
            emit(&self.packet[..n]);
            start += FRAME_SAMPLES;
        }
        self.pending.drain(..start);
        Ok(())
    }
}

fn extend_i16(into: &mut Vec<i16>, frame: &AudioFrame) {
    into.extend(
        frame
            .data()
            .chunks_exact(2)
            .map(|b| i16::from_le_bytes([b[0], b[1]])),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::to_i16_samples;
    use proptest::prelude::*;

    fn tone(rate: u32, hz: f32, ms: u32) -> AudioFrame {
        let n = (rate * ms / 1000) as usize;
        let samples: Vec<i16> = (0..n)
            .map(|i| {
                let t = i as f32 / rate as f32;
                (8000.0 * (2.0 * std::f32::consts::PI * hz * t).sin()) as i16
            })
            .collect();
        AudioFrame::from_i16(rate, 1, &samples).unwrap()
    }

    fn rms(samples: &[i16]) -> f64 {
        let sum: f64 = samples.iter().map(|&s| (s as f64).powi(2)).sum();
        (sum / samples.len().max(1) as f64).sqrt()
    }

    #[test]
    fn a_tone_survives_encode_and_decode_at_48k_in_20ms_packets() {
        let mut enc = OpusEncoder::new(32_000).unwrap();
        let mut dec = OpusDecoder::new().unwrap();
        let mut packets = Vec::new();
        enc.push(&tone(48_000, 440.0, 200), |p| packets.push(p.to_vec()))
            .unwrap();
        assert_eq!(packets.len(), 10, "200 ms is ten 20 ms packets");
        let mut out = Vec::new();
        for p in &packets {
            let frame = dec.decode(p).unwrap();
            assert_eq!(frame.format(), PCM_FORMAT);
            assert_eq!(frame.sample_frames(), FRAME_SAMPLES);
            out.extend(to_i16_samples(&frame));
        }
        // Past the codec's start-up, the level is the tone's (8000 peak, 5657 RMS).
        let level = rms(&out[FRAME_SAMPLES * 2..]);
        assert!((4000.0..7500.0).contains(&level), "rms {level}");
    }

    #[test]
    fn other_formats_are_converted_and_partial_frames_wait() {
        let mut enc = OpusEncoder::new(24_000).unwrap();
        let mut count = 0;
        // 30 ms at 16 kHz: one packet, then 10 ms (less the resampler's delay) waits.
        enc.push(&tone(16_000, 300.0, 30), |_| count += 1).unwrap();
        assert_eq!(count, 1);
        assert!(enc.pending() > 0 && enc.pending() < FRAME_SAMPLES);
        enc.flush(|_| count += 1).unwrap();
        assert_eq!(count, 2, "the tail is padded to one more packet");
        assert_eq!(enc.pending(), 0);
    }

    #[test]
    fn garbage_and_empty_packets_are_errors_and_the_decoder_goes_on() {
        let mut dec = OpusDecoder::new().unwrap();
        let err = dec.decode(&[]).unwrap_err();
        assert_eq!(err.code, ErrorCode::PipelineError);
        // A code-3 packet claiming more frames than it holds.
        let err = dec.decode(&[0xFF, 0xFF, 0xFF]).unwrap_err();
        assert!(err.message.contains("Opus"), "{err}");
        let mut enc = OpusEncoder::new(32_000).unwrap();
        let mut packet = Vec::new();
        enc.push(&tone(48_000, 440.0, 20), |p| packet = p.to_vec())
            .unwrap();
        assert_eq!(dec.decode(&packet).unwrap().sample_frames(), FRAME_SAMPLES);
        assert_eq!(dec.conceal().unwrap().sample_frames(), FRAME_SAMPLES);
    }

    proptest! {
        #[test]
        fn any_bytes_decode_or_fail_without_panicking(payload in proptest::collection::vec(any::<u8>(), 0..1500)) {
            let mut dec = OpusDecoder::new().unwrap();
            match dec.decode(&payload) {
                Ok(frame) => prop_assert!(frame.sample_frames() <= MAX_DECODED),
                Err(e) => prop_assert_eq!(e.code, ErrorCode::PipelineError),
            }
        }
    }
}
