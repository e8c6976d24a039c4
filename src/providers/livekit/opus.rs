//! Opus for room audio. LiveKit rooms carry Opus, one 20 ms frame per RTP
//! packet, on the 48 kHz RTP clock Opus always uses (RFC 7587). libopus
//! itself decodes to and encodes from 8, 12, 16, 24 or 48 kHz, so nothing
//! is resampled around it: [`OpusDecoder`] turns the user's packets straight
//! into the pipeline's 16 kHz mono PCM ([`PCM_FORMAT`]), and
//! [`OpusEncoder`] encodes the session's 16 kHz reply as it comes (other
//! formats are converted to 16 kHz first).
//!
//! The encoder runs one of two modes ([`OpusApplication`]): `LowDelay`
//! (CELT only, libopus's transform coder; the default, at 40 kb/s) or
//! `Voip` (SILK, its speech coder, at 32 kb/s; optional in-band FEC), at a
//! chosen complexity, with discontinuous transmission (DTX): a 20 ms frame
//! libopus finds silent comes out as a TOC-only packet, and a frame of
//! digital silence past the first 200 ms of it is not even encoded; neither
//! is sent ([`Encoded::Silent`]), and the RTP timestamp jumps over the gap.
//! On the way in, TOC-only packets ([`is_dtx`]) need no decoding.
//!
//! Built on libopus (Debian's `libopus-dev`) through `audiopus`.

use audiopus::coder::{Decoder, Encoder};
use audiopus::{Application, Bitrate, Channels, MutSignals, SampleRate, packet::Packet};
use schemars::JsonSchema;
use serde::Deserialize;

use crate::audio::{AudioConverter, AudioEncoding, AudioFormat, AudioFrame};
use crate::error::{BackendError, ErrorCode, Result};

/// The RTP clock of Opus, whatever the audio's own rate (RFC 7587).
pub const RTP_CLOCK: u32 = 48_000;

/// RTP timestamp units in one 20 ms packet.
pub const RTP_FRAME: u32 = 960;

/// The rate the decoder gives and the encoder takes: the pipeline's.
pub const PCM_RATE: u32 = 16_000;

/// Samples in one 20 ms frame at [`PCM_RATE`]: one RTP packet's worth.
pub const FRAME_SAMPLES: usize = 320;

/// The PCM the decoder gives and the encoder takes: 16 kHz mono s16le.
pub const PCM_FORMAT: AudioFormat = AudioFormat::new(AudioEncoding::PcmS16Le, PCM_RATE, 1);

/// The encoder's complexity when none is configured: most of complexity
/// 10's quality for speech at well under its cost (see the `livekit` bench).
pub const DEFAULT_COMPLEXITY: u8 = 5;

/// The highest complexity libopus takes.
pub const MAX_COMPLEXITY: u8 = 10;

/// The longest payload that is a DTX frame: a TOC byte (and at most one
/// more) with no coded audio. Senders do not transmit them; a receiver
/// that gets one has nothing to decode.
pub const DTX_MAX_PAYLOAD: usize = 2;

/// Frames of digital silence encoded (and sent) before DTX stops
/// encoding them: 200 ms, libopus's own hangover, which lets the
/// listener's decoder ring out to silence.
pub const SILENCE_HANGOVER: u32 = 10;

/// The longest Opus packet decodes to 120 ms: 1920 samples at 16 kHz.
const MAX_DECODED: usize = 1_920;

/// The largest encoded packet libopus writes for one frame (its own
/// recommendation for a buffer).
const MAX_PACKET: usize = 4_000;

fn opus_error(op: &'static str, what: &str, e: audiopus::Error) -> BackendError {
    BackendError::new(op, ErrorCode::PipelineError, format!("{what}: {e}"))
}

/// Whether `payload` is a DTX frame (a TOC byte without coded audio): it
/// carries silence, and decoding it is skipped.
pub fn is_dtx(payload: &[u8]) -> bool {
    !payload.is_empty() && payload.len() <= DTX_MAX_PAYLOAD
}

/// Silence shared by every [`silence`] frame up to 5 s long (zeroed
/// memory, not in the binary): handing the session a DTX frame or gap
/// allocates nothing.
static ZEROS: [u8; FRAME_SAMPLES * 2 * 250] = [0; FRAME_SAMPLES * 2 * 250];

/// `frames` times 20 ms of silence at [`PCM_RATE`] (what a DTX frame or a
/// DTX gap stands for). Up to 5 s it shares one static buffer.
///
/// # Errors
///
/// None in practice: the format is fixed and the length whole samples.
pub fn silence(frames: usize) -> Result<AudioFrame> {
    let bytes = FRAME_SAMPLES * frames * 2;
    match ZEROS.get(..bytes) {
        Some(zeros) => AudioFrame::new(PCM_FORMAT, zeros),
        None => AudioFrame::new(PCM_FORMAT, vec![0u8; bytes]),
    }
}

/// Decodes the user's Opus packets to 16 kHz mono PCM. A stereo stream is
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
    /// A decoder for one stream, giving [`PCM_FORMAT`].
    ///
    /// # Errors
    ///
    /// `PipelineError` when libopus cannot make one.
    pub fn new() -> Result<Self> {
        let decoder = Decoder::new(SampleRate::Hz16000, Channels::Mono)
            .map_err(|e| opus_error("livekit.opus", "creating the Opus decoder", e))?;
        Ok(OpusDecoder {
            decoder,
            pcm: vec![0; MAX_DECODED],
        })
    }

    /// Decodes one packet's payload into 16 kHz mono PCM ([`PCM_FORMAT`]).
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
        AudioFrame::from_i16(PCM_RATE, 1, &self.pcm[..n])
    }

    fn run(&mut self, packet: Option<Packet<'_>>) -> Result<AudioFrame> {
        let signals = MutSignals::try_from(&mut self.pcm)
            .map_err(|e| opus_error("livekit.opus", "decoding an Opus packet", e))?;
        let n = self
            .decoder
            .decode(packet, signals, false)
            .map_err(|e| opus_error("livekit.opus", "an Opus packet did not decode", e))?;
        AudioFrame::from_i16(PCM_RATE, 1, &self.pcm[..n])
    }
}

/// Which of Opus's coders encodes the reply (libopus's "application").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OpusApplication {
    /// `OPUS_APPLICATION_VOIP`: SILK, the linear-prediction speech coder,
    /// tuned for voice; the only mode with in-band FEC. Costlier per frame
    /// than `LowDelay`.
    Voip,
    /// `OPUS_APPLICATION_RESTRICTED_LOWDELAY`: CELT only, the transform
    /// coder: 2.5 ms less delay and, at its default 40 kb/s, recorded
    /// speech scored as well as `Voip` at 32 kb/s for about a third of its
    /// CPU (see the `livekit` bench). No in-band FEC. Below complexity 7
    /// libopus 1.3 finds no silence in this mode; the encoder's own check
    /// still leaves digital silence unsent.
    #[default]
    LowDelay,
}

impl OpusApplication {
    /// The name used in the provider's config.
    pub fn as_str(self) -> &'static str {
        match self {
            OpusApplication::Voip => "voip",
            OpusApplication::LowDelay => "low_delay",
        }
    }

    /// The bitrate this mode is run at when none is configured: 32 kb/s
    /// for SILK (which spends about 30 of it on wideband speech), 40 kb/s
    /// for CELT (which spends all of it, and at 40 matches SILK's quality
    /// at 32 on recorded speech: see the `livekit` bench).
    pub fn default_bitrate(self) -> u32 {
        match self {
            OpusApplication::Voip => 32_000,
            OpusApplication::LowDelay => 40_000,
        }
    }

    fn libopus(self) -> Application {
        match self {
            OpusApplication::Voip => Application::Voip,
            OpusApplication::LowDelay => Application::LowDelay,
        }
    }
}

/// How the reply is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncoderSettings {
    /// Which coder: SILK (`Voip`) or CELT (`LowDelay`).
    pub application: OpusApplication,
    /// Bits per second (6000..=510000).
    pub bitrate: u32,
    /// libopus's complexity, 0..=10: higher is better and costlier.
    pub complexity: u8,
    /// In-band forward error correction: each packet also carries a coarse
    /// copy of the previous one, which a receiver can use for a lost one.
    pub fec: bool,
    /// Discontinuous transmission: silent frames become TOC-only packets,
    /// not sent.
    pub dtx: bool,
}

impl Default for EncoderSettings {
    fn default() -> Self {
        let application = OpusApplication::default();
        EncoderSettings {
            application,
            bitrate: application.default_bitrate(),
            complexity: DEFAULT_COMPLEXITY,
            fec: false,
            dtx: true,
        }
    }
}

/// One 20 ms frame of the reply, encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoded<'a> {
    /// A packet to send.
    Packet(&'a [u8]),
    /// A silent frame under DTX: nothing to send; the RTP timestamp moves
    /// on by a frame.
    Silent,
}

/// Encodes reply audio to Opus, 20 ms a packet.
///
/// Frames in [`PCM_FORMAT`] are encoded as they are; other formats are
/// converted to it. Each whole 20 ms becomes one [`Encoded`], the rest
/// waits for the next frame (or [`OpusEncoder::flush`]).
pub struct OpusEncoder {
    encoder: Encoder,
    /// DTX on: digital silence past [`SILENCE_HANGOVER`] is not encoded.
    dtx: bool,
    /// Frames of digital silence in a row so far.
    silent_run: u32,
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
    /// An encoder in `settings.application`'s mode with `settings`.
    ///
    /// # Errors
    ///
    /// `PipelineError` when libopus refuses a setting (a bitrate outside
    /// 6000..=510000, a complexity above 10) or cannot make one.
    pub fn new(settings: EncoderSettings) -> Result<Self> {
        const OP: &str = "livekit.opus";
        let mut encoder = Encoder::new(
            SampleRate::Hz16000,
            Channels::Mono,
            settings.application.libopus(),
        )
        .map_err(|e| opus_error(OP, "creating the Opus encoder", e))?;
        let bits = i32::try_from(settings.bitrate).unwrap_or(i32::MAX);
        encoder
            .set_bitrate(Bitrate::BitsPerSecond(bits))
            .map_err(|e| opus_error(OP, "setting the Opus bitrate", e))?;
        encoder
            .set_complexity(settings.complexity)
            .map_err(|e| opus_error(OP, "setting the Opus complexity", e))?;
        encoder
            .set_inband_fec(settings.fec)
            .map_err(|e| opus_error(OP, "setting Opus in-band FEC", e))?;
        if settings.fec {
            // FEC is only spent when the encoder expects some loss.
            encoder
                .set_packet_loss_perc(5)
                .map_err(|e| opus_error(OP, "setting Opus's expected loss", e))?;
        }
        encoder
            .set_dtx(settings.dtx)
            .map_err(|e| opus_error(OP, "setting Opus DTX", e))?;
        Ok(OpusEncoder {
            encoder,
            dtx: settings.dtx,
            silent_run: 0,
            converter: None,
            pending: Vec::with_capacity(FRAME_SAMPLES * 2),
            packet: vec![0; MAX_PACKET],
        })
    }

    /// Samples waiting for a whole 20 ms frame.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Takes `frame` (any format) and hands `emit` each 20 ms frame it
    /// completes.
    ///
    /// # Errors
    ///
    /// `PipelineError` when the frame cannot be converted or libopus fails.
    pub fn push(&mut self, frame: &AudioFrame, mut emit: impl FnMut(Encoded<'_>)) -> Result<()> {
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

    /// Encodes what is left, padded with silence to a whole frame (the end
    /// of a reply).
    ///
    /// # Errors
    ///
    /// `PipelineError` when libopus fails.
    pub fn flush(&mut self, mut emit: impl FnMut(Encoded<'_>)) -> Result<()> {
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

    fn drain(&mut self, emit: &mut impl FnMut(Encoded<'_>)) -> Result<()> {
        let mut start = 0;
        while self.pending.len() - start >= FRAME_SAMPLES {
            let pcm = &self.pending[start..start + FRAME_SAMPLES];
            start += FRAME_SAMPLES;
            // Digital silence (libopus's own test: no sample past one LSB).
            // libopus's CELT mode finds it only at complexity 7 and up (its
            // signal analysis runs there); checked here, it is caught in
            // every mode, and not encoded at all past the hangover.
            if self.dtx && pcm.iter().all(|s| s.unsigned_abs() <= 1) {
                self.silent_run = self.silent_run.saturating_add(1);
                if self.silent_run > SILENCE_HANGOVER {
                    emit(Encoded::Silent);
                    continue;
                }
            } else {
                self.silent_run = 0;
            }
            let n = self
                .encoder
                .encode(pcm, &mut self.packet)
                .map_err(|e| opus_error("livekit.opus", "encoding reply audio", e))?;
            if is_dtx(&self.packet[..n]) {
                emit(Encoded::Silent);
            } else {
                emit(Encoded::Packet(&self.packet[..n]));
            }
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

    fn packets_of(enc: &mut OpusEncoder, frame: &AudioFrame) -> Vec<Option<Vec<u8>>> {
        let mut out = Vec::new();
        enc.push(frame, |e| {
            out.push(match e {
                Encoded::Packet(p) => Some(p.to_vec()),
                Encoded::Silent => None,
            })
        })
        .unwrap();
        out
    }

    const MODES: [OpusApplication; 2] = [OpusApplication::Voip, OpusApplication::LowDelay];

    #[test]
    fn a_tone_survives_encode_and_decode_at_16k_in_20ms_packets() {
        let each = MODES.iter().flat_map(|&a| {
            [3, DEFAULT_COMPLEXITY, MAX_COMPLEXITY].map(|complexity| (a, complexity))
        });
        for (application, complexity) in each {
            let settings = EncoderSettings {
                application,
                complexity,
                ..EncoderSettings::default()
            };
            let mut enc = OpusEncoder::new(settings).unwrap();
            let mut dec = OpusDecoder::new().unwrap();
            let packets = packets_of(&mut enc, &tone(PCM_RATE, 440.0, 200));
            assert_eq!(packets.len(), 10, "200 ms is ten 20 ms packets");
            let mut out = Vec::new();
            for p in &packets {
                let p = p.as_ref().expect("a tone is never a DTX frame");
                let frame = dec.decode(p).unwrap();
                assert_eq!(frame.format(), PCM_FORMAT);
                assert_eq!(frame.sample_frames(), FRAME_SAMPLES);
                out.extend(to_i16_samples(&frame));
            }
            // Past the codec's start-up, the level is the tone's (8000 peak, 5657 RMS).
            let level = rms(&out[FRAME_SAMPLES * 2..]);
            assert!(
                (4000.0..7500.0).contains(&level),
                "{application:?} complexity {complexity}: rms {level}"
            );
        }
    }

    /// `ms` of a voiced, speech-like sound at 16 kHz: a 140 Hz pitch with
    /// vibrato, 20 harmonics under two formants, its level moving like
    /// syllables.
    fn speech(ms: u32) -> Vec<i16> {
        let n = (PCM_RATE * ms / 1000) as usize;
        (0..n)
            .map(|i| {
                let t = i as f64 / f64::from(PCM_RATE);
                let tau = 2.0 * std::f64::consts::PI;
                let pitch = 140.0 * (1.0 + 0.05 * (tau * 3.0 * t).sin());
                let voiced: f64 = (1..=20)
                    .map(|h| {
                        let hz = pitch * f64::from(h);
                        let formant = (-((hz - 700.0) / 500.0).powi(2)).exp()
                            + 0.5 * (-((hz - 1_800.0) / 600.0).powi(2)).exp();
                        (0.05 + formant) * (tau * pitch * t * f64::from(h)).sin()
                            / f64::from(h).sqrt()
                    })
                    .sum();
                let syllable = 0.55 + 0.45 * (tau * 4.0 * t).sin();
                (voiced * syllable * 6_000.0) as i16
            })
            .collect()
    }

    /// The largest normalized cross-correlation of `decoded` with
    /// `original` over the codec's possible delays (0..400 samples).
    fn best_correlation(original: &[i16], decoded: &[i16]) -> f64 {
        let skip = FRAME_SAMPLES * 5;
        let len = original.len().min(decoded.len()) - skip - 400;
        (0..400)
            .map(|lag| {
                let (mut xy, mut xx, mut yy) = (0.0, 0.0, 0.0);
                for i in skip..skip + len {
                    let (x, y) = (f64::from(original[i]), f64::from(decoded[i + lag]));
                    xy += x * y;
                    xx += x * x;
                    yy += y * y;
                }
                xy / (xx * yy).sqrt().max(1.0)
            })
            .fold(f64::MIN, f64::max)
    }

    #[test]
    fn the_default_encoder_round_trips_speech_and_leaves_its_pauses_unsent() {
        let settings = EncoderSettings::default();
        assert_eq!(settings.application, OpusApplication::LowDelay);
        // One second of speech, a second of digital silence, a second more.
        let talk = speech(1_000);
        let mut all = talk.clone();
        all.extend(std::iter::repeat_n(0, PCM_RATE as usize));
        all.extend_from_slice(&talk);
        let frame = AudioFrame::from_i16(PCM_RATE, 1, &all).unwrap();

        let mut enc = OpusEncoder::new(settings).unwrap();
        let mut dec = OpusDecoder::new().unwrap();
        let encoded = packets_of(&mut enc, &frame);
        assert_eq!(encoded.len(), 150, "3 s is 150 frames");
        let mut decoded = Vec::new();
        for p in &encoded {
            match p {
                Some(p) => {
                    // CELT only: TOC configurations 16..=31 (RFC 6716 3.1).
                    assert!(p[0] >> 3 >= 16, "not a CELT packet: TOC {:#x}", p[0]);
                    let out = to_i16_samples(&dec.decode(p).unwrap());
                    assert_eq!(out.len(), FRAME_SAMPLES);
                    decoded.extend(out);
                }
                None => decoded.extend(std::iter::repeat_n(0, FRAME_SAMPLES)),
            }
        }
        assert_eq!(decoded.len(), all.len());
        let (first, pause) = (&encoded[..50], &encoded[50..100]);
        assert!(first.iter().all(Option::is_some), "speech is sent");
        let unsent = pause.iter().filter(|p| p.is_none()).count();
        assert_eq!(
            unsent,
            50 - SILENCE_HANGOVER as usize,
            "the pause is unsent past the hangover"
        );
        assert!(encoded[100..].iter().all(Option::is_some), "speech resumes");
        // The decoded speech has the original's level and shape.
        let (original, heard) = (&all[..FRAME_SAMPLES * 50], &decoded[..FRAME_SAMPLES * 50]);
        let ratio = rms(&heard[FRAME_SAMPLES * 5..]) / rms(&original[FRAME_SAMPLES * 5..]);
        assert!((0.8..1.25).contains(&ratio), "level ratio {ratio}");
        let correlation = best_correlation(original, heard);
        assert!(correlation > 0.9, "correlation {correlation}");
        // After the pause, speech is heard again at its level.
        let ratio = rms(&decoded[FRAME_SAMPLES * 105..]) / rms(&talk[FRAME_SAMPLES * 5..]);
        assert!(
            (0.8..1.25).contains(&ratio),
            "level after the pause {ratio}"
        );
    }

    #[test]
    fn each_application_codes_with_its_own_coder() {
        let frame = AudioFrame::from_i16(PCM_RATE, 1, &speech(200)).unwrap();
        for application in MODES {
            let mut enc = OpusEncoder::new(EncoderSettings {
                application,
                bitrate: application.default_bitrate(),
                ..EncoderSettings::default()
            })
            .unwrap();
            for p in packets_of(&mut enc, &frame).into_iter().flatten() {
                // TOC configurations: 0..=11 SILK only, 16..=31 CELT only.
                let config = p[0] >> 3;
                match application {
                    OpusApplication::Voip => assert!(config < 12, "TOC config {config}"),
                    OpusApplication::LowDelay => assert!(config >= 16, "TOC config {config}"),
                }
            }
        }
    }

    #[test]
    fn digital_silence_is_unsent_in_every_mode_and_complexity() {
        // libopus 1.3's CELT mode finds silence only at complexity 7 and up.
        let mut all = speech(400);
        all.extend(std::iter::repeat_n(0, PCM_RATE as usize));
        let frame = AudioFrame::from_i16(PCM_RATE, 1, &all).unwrap();
        for application in MODES {
            for complexity in [0, 3, DEFAULT_COMPLEXITY, MAX_COMPLEXITY] {
                let mut enc = OpusEncoder::new(EncoderSettings {
                    application,
                    complexity,
                    ..EncoderSettings::default()
                })
                .unwrap();
                let encoded = packets_of(&mut enc, &frame);
                let unsent = encoded[20..].iter().filter(|p| p.is_none()).count();
                assert!(
                    unsent >= 50 - SILENCE_HANGOVER as usize,
                    "{application:?} complexity {complexity}: {unsent} of 50 unsent"
                );
            }
        }
    }

    #[test]
    fn other_formats_are_converted_and_partial_frames_wait() {
        let mut enc = OpusEncoder::new(EncoderSettings::default()).unwrap();
        let mut count = 0;
        // 30 ms at 48 kHz: one packet, then 10 ms (less the resampler's delay) waits.
        enc.push(&tone(48_000, 300.0, 30), |_| count += 1).unwrap();
        assert_eq!(count, 1);
        assert!(enc.pending() > 0 && enc.pending() < FRAME_SAMPLES);
        enc.flush(|_| count += 1).unwrap();
        assert_eq!(count, 2, "the tail is padded to one more packet");
        assert_eq!(enc.pending(), 0);
    }

    #[test]
    fn silence_after_speech_is_not_sent_under_dtx() {
        let mut speech_then_silence = to_i16_samples(&tone(PCM_RATE, 440.0, 400));
        speech_then_silence.extend(std::iter::repeat_n(0, PCM_RATE as usize * 2));
        let frame = AudioFrame::from_i16(PCM_RATE, 1, &speech_then_silence).unwrap();

        let mut enc = OpusEncoder::new(EncoderSettings::default()).unwrap();
        let encoded = packets_of(&mut enc, &frame);
        assert_eq!(encoded.len(), 120, "2.4 s is 120 frames");
        assert!(encoded[..20].iter().all(Option::is_some), "speech is sent");
        let silent = encoded[20..].iter().filter(|p| p.is_none()).count();
        // libopus goes DTX a few frames into the silence and sends a
        // comfort-noise update now and then.
        assert!(silent >= 80, "{silent} of 100 silent frames were not sent");

        let mut enc = OpusEncoder::new(EncoderSettings {
            dtx: false,
            ..EncoderSettings::default()
        })
        .unwrap();
        let encoded = packets_of(&mut enc, &frame);
        assert!(
            encoded.iter().all(Option::is_some),
            "without DTX every frame is sent"
        );
    }

    #[test]
    fn dtx_frames_are_known_by_their_size() {
        assert!(is_dtx(&[0x08]));
        assert!(is_dtx(&[0x08, 0x00]));
        assert!(!is_dtx(&[]));
        assert!(!is_dtx(&[0x08, 0x01, 0x02]));
        assert_eq!(silence(2).unwrap().sample_frames(), FRAME_SAMPLES * 2);
        for frames in [250, 251, 400] {
            let long = silence(frames).unwrap();
            assert_eq!(long.sample_frames(), FRAME_SAMPLES * frames);
            assert!(long.data().iter().all(|&b| b == 0));
        }
        assert_eq!(silence(1).unwrap().format(), PCM_FORMAT);
    }

    #[test]
    fn settings_libopus_refuses_are_errors() {
        let err = OpusEncoder::new(EncoderSettings {
            complexity: 11,
            ..EncoderSettings::default()
        })
        .unwrap_err();
        assert_eq!(err.code, ErrorCode::PipelineError);
        assert!(err.message.contains("complexity"), "{err}");
    }

    #[test]
    fn garbage_and_empty_packets_are_errors_and_the_decoder_goes_on() {
        let mut dec = OpusDecoder::new().unwrap();
        let err = dec.decode(&[]).unwrap_err();
        assert_eq!(err.code, ErrorCode::PipelineError);
        // A code-3 packet claiming more frames than it holds.
        let err = dec.decode(&[0xFF, 0xFF, 0xFF]).unwrap_err();
        assert!(err.message.contains("Opus"), "{err}");
        let mut enc = OpusEncoder::new(EncoderSettings::default()).unwrap();
        let packet = packets_of(&mut enc, &tone(PCM_RATE, 440.0, 20))
            .pop()
            .flatten()
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
