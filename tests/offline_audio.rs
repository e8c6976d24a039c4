#![cfg(all(feature = "webrtc-vad", feature = "denoise", feature = "testing"))]
//! WebRTC's VAD (`vad = "webrtc"`) and RNNoise noise suppression
//! (`denoise`): what the denoiser gains on speech in noise, the false starts
//! it saves a VAD on noise alone, the VAD on speech and silence, frames of
//! any size and rate, option checks, and a whole `local` session using both.

use std::time::Duration;

use voice_backends::audio::{AudioConverter, AudioEncoding, AudioFormat, AudioFrame};
use voice_backends::hooks::AudioProcessor;
use voice_backends::pipeline::events::SessionEvent;
use voice_backends::pipeline::offline::denoise::{DenoiseOptions, Denoiser};
use voice_backends::pipeline::offline::webrtc_vad::{WebrtcVad, WebrtcVadOptions};
use voice_backends::pipeline::{INTERNAL_FORMAT, TurnSignal, Vad, components};
use voice_backends::testing::conformance::expect_event_within;
use voice_backends::testing::signal;
use voice_backends::{Config, ErrorCode, SessionConfig, registry};

const PATIENCE: Duration = Duration::from_secs(30);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// `samples` through a fresh denoiser with `options`, in `frame_len`-sample
/// frames; the output (as long as the input) and the denoiser.
fn denoise(samples: &[i16], options: DenoiseOptions, frame_len: usize) -> (Vec<i16>, Denoiser) {
    let mut d = Denoiser::new(options, 0).unwrap();
    let mut out = Vec::with_capacity(samples.len());
    for chunk in samples.chunks(frame_len) {
        let frame = AudioFrame::from_i16(16_000, 1, chunk).unwrap();
        let back = d.process(frame).unwrap();
        assert_eq!(back.format(), INTERNAL_FORMAT);
        assert_eq!(
            back.sample_frames(),
            chunk.len(),
            "a frame comes out as long as it went in"
        );
        out.extend(signal::samples_of([&back]));
    }
    (out, d)
}

/// Scale-invariant SNR of `estimate` against `reference` in dB: the part of
/// the estimate along the reference is signal, the rest noise (so a change
/// of level is not counted as noise).
fn si_snr_db(estimate: &[i16], reference: &[i16]) -> f64 {
    let n = estimate.len().min(reference.len());
    let (e, r) = (&estimate[..n], &reference[..n]);
    let dot: f64 = e
        .iter()
        .zip(r)
        .map(|(a, b)| f64::from(*a) * f64::from(*b))
        .sum();
    let rr: f64 = r.iter().map(|b| f64::from(*b).powi(2)).sum();
    let alpha = dot / rr;
    let (mut signal, mut noise) = (0.0, 0.0);
    for (a, b) in e.iter().zip(r) {
        let target = alpha * f64::from(*b);
        signal += target * target;
        noise += (f64::from(*a) - target).powi(2);
    }
    10.0 * (signal / noise).log10()
}

/// Background noise whose level changes every 250 ms, between -50 and
/// -28 dBFS: a busy room rather than a steady fan, the kind of noise an
/// energy VAD takes for speech when it gets louder.
fn fluctuating_noise(duration: Duration, seed: u64) -> Vec<i16> {
    let mut out = Vec::new();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut i = 0;
    while signal::duration_of(out.len()) < duration {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let level = -50.0 + 22.0 * (state % 1000) as f32 / 1000.0;
        out.extend(signal::noise(ms(250), level, seed * 1000 + i));
        i += 1;
    }
    out.truncate(signal::samples_in(duration));
    out
}

/// Turns `vad` hears in `samples` (20 ms frames), through `denoiser` first
/// when given, with the default `silence` turn detector: the number of
/// `SpeechStarted` signals.
fn speech_starts(samples: &[i16], vad: &str, denoiser: bool) -> usize {
    let c = components();
    let mut vad = c
        .vad
        .get(vad)
        .unwrap()
        .create(&serde_json::Value::Null)
        .unwrap();
    let mut turn = c
        .turn
        .get("silence")
        .unwrap()
        .create(&serde_json::Value::Null)
        .unwrap();
    let mut denoise = denoiser.then(|| {
        c.processor
            .get("denoise")
            .unwrap()
            .create(&serde_json::Value::Null, 0)
            .unwrap()
    });
    let mut starts = 0;
    for frame in signal::frames(samples, 20) {
        let frame = match denoise.as_mut() {
            Some(d) => d.process(frame).unwrap(),
            None => frame,
        };
        let d = vad.process(&frame);
        if turn.update(&d, frame.duration()) == TurnSignal::SpeechStarted {
            starts += 1;
        }
    }
    starts
}

#[test]
fn the_denoiser_raises_the_snr_of_speech_in_noise() {
    let clean = signal::speech_like(Duration::from_secs(8), 11);
    // The first second is RNNoise settling on the noise; measured after it.
    let skip = signal::samples_in(Duration::from_secs(1));
    // What the denoiser makes of the clean speech alone: how much of the
    // synthetic voice it keeps (it takes some of it for noise).
    let (kept, d) = denoise(&clean, DenoiseOptions::default(), 320);
    let lag = d.latency_samples();
    let ceiling = si_snr_db(&kept[skip + lag..], &clean[skip..]);
    println!("clean speech alone comes out at {ceiling:.1} dB SNR (its distortion)");
    // (input SNR, least gain against the clean speech, least noise reduction)
    for (snr, min_gain, min_reduction, seed) in [
        (0.0f32, 5.0, 6.0, 1u64),
        (5.0, 4.0, 6.0, 2),
        (10.0, 2.0, 5.0, 3),
    ] {
        let noise = signal::noise(
            Duration::from_secs(8),
            signal::SPEECH_LEVEL_DBFS - snr,
            seed,
        );
        let noisy = signal::mix(&clean, &noise);
        let (out, _) = denoise(&noisy, DenoiseOptions::default(), 320);
        let out = &out[skip + lag..];
        let before = si_snr_db(&noisy[skip..], &clean[skip..]);
        let after = si_snr_db(out, &clean[skip..]);
        // The noise left: the output less what the speech alone gives.
        let left: Vec<i16> = out
            .iter()
            .zip(&kept[skip + lag..])
            .map(|(o, k)| o.saturating_sub(*k))
            .collect();
        let reduction = signal::rms_dbfs(&noise[skip..]) - signal::rms_dbfs(&left);
        println!(
            "input SNR {snr} dB: {before:.1} dB before, {after:.1} dB after (a gain of {:.1} dB); \
             noise {reduction:.1} dB lower",
            after - before
        );
        assert!((before - f64::from(snr)).abs() < 1.0, "{before}");
        assert!(
            after - before >= min_gain,
            "at {snr} dB the denoiser gains {:.1} dB",
            after - before
        );
        assert!(
            f64::from(reduction) >= min_reduction,
            "at {snr} dB the noise is {reduction:.1} dB lower"
        );
    }
}

#[test]
fn denoising_cuts_false_starts_on_noise_alone() {
    let noise = fluctuating_noise(Duration::from_secs(60), 5);
    for vad in ["energy", "webrtc"] {
        let raw = speech_starts(&noise, vad, false);
        let cleaned = speech_starts(&noise, vad, true);
        println!("{vad}: {raw} false starts in 60 s of noise, {cleaned} with denoise in front");
        assert!(
            raw >= 5,
            "{vad}: the noise makes false starts without denoise ({raw})"
        );
        assert!(
            cleaned * 2 <= raw,
            "{vad}: denoising halves false starts or better: {raw} -> {cleaned}"
        );
    }
    // And speech in that noise is still heard through the denoiser.
    let speech = signal::mix(
        &signal::utterance(Duration::from_secs(2), ms(1500), 9),
        &fluctuating_noise(ms(3500), 6),
    );
    let mut audio = fluctuating_noise(Duration::from_secs(2), 7);
    audio.extend(speech);
    for vad in ["energy", "webrtc"] {
        assert!(
            speech_starts(&audio, vad, true) >= 1,
            "{vad} hears the speech"
        );
    }
}

#[test]
fn webrtc_hears_speech_like_audio_and_not_silence() {
    let mut vad = WebrtcVad::default();
    let silence = signal::silence(Duration::from_secs(1));
    for f in signal::frames(&silence, 20) {
        let d = vad.process(&f);
        assert!(!d.speech && d.probability == 0.0, "{d:?}");
        assert_eq!(d.level_db, -100.0);
    }
    let speech = signal::speech_like(Duration::from_secs(3), 4);
    let frames = signal::frames(&speech, 20);
    let mut voiced = 0;
    let mut started = None;
    for (i, f) in frames.iter().enumerate() {
        let d = vad.process(f);
        voiced += usize::from(d.probability >= 0.5);
        if d.speech && started.is_none() {
            started = Some(i);
        }
    }
    println!(
        "{voiced} of {} speech frames voiced, speech from frame {started:?}",
        frames.len()
    );
    assert!(
        started.is_some_and(|i| i < 10),
        "speech starts within 200 ms: {started:?}"
    );
    assert!(
        voiced * 2 > frames.len(),
        "most speech frames are voiced: {voiced}"
    );
    // Back to silence: the hangover, then no speech.
    let mut last = true;
    for f in signal::frames(&signal::silence(Duration::from_secs(1)), 20) {
        last = vad.process(&f).speech;
    }
    assert!(!last, "speech ends in silence");
}

#[test]
fn webrtc_hangover_frames_have_low_probability() {
    let mut vad = WebrtcVad::new(WebrtcVadOptions {
        hangover: ms(400),
        ..Default::default()
    });
    let mut audio = signal::speech_like(ms(1000), 2);
    audio.extend(signal::silence(ms(1000)));
    let mut in_hangover = 0;
    for f in signal::frames(&audio, 20) {
        let d = vad.process(&f);
        if d.speech && d.probability < 0.5 {
            in_hangover += 1;
        }
    }
    // Frames held in speech only by the hangover read as silence to the
    // silence turn detector (probability below 0.5).
    assert!(in_hangover >= 10, "{in_hangover}");
}

#[test]
fn webrtc_decides_the_same_however_the_audio_is_cut() {
    let mut audio = signal::silence(ms(300));
    audio.extend(signal::utterance(ms(1500), ms(700), 3));
    let timeline = |frame_len: usize| {
        let mut vad = WebrtcVad::default();
        let mut fed = 0;
        let mut out = Vec::new();
        for chunk in audio.chunks(frame_len) {
            let d = vad.process(&AudioFrame::from_i16(16_000, 1, chunk).unwrap());
            fed += chunk.len();
            // 140 ms is a whole number of every cut below.
            if fed % 2240 == 0 {
                out.push(d.speech);
            }
        }
        out
    };
    let reference = timeline(320);
    assert!(reference.contains(&true) && reference.contains(&false));
    for len in [1, 80, 560, 2240] {
        assert_eq!(timeline(len), reference, "frames of {len} samples");
    }
}

#[test]
fn webrtc_takes_every_rate_and_odd_frames_without_panicking() {
    let speech = AudioFrame::from_i16(16_000, 1, &{
        let mut a = signal::speech_like(Duration::from_secs(2), 8);
        a.extend(signal::silence(ms(600)));
        a
    })
    .unwrap();
    let formats = [
        AudioFormat::new(AudioEncoding::PcmS16Le, 8_000, 1),
        AudioFormat::new(AudioEncoding::PcmS16Le, 32_000, 1),
        AudioFormat::new(AudioEncoding::PcmS16Le, 48_000, 1),
        AudioFormat::new(AudioEncoding::PcmS16Le, 24_000, 1),
        AudioFormat::new(AudioEncoding::PcmS16Le, 44_100, 2),
        AudioFormat::new(AudioEncoding::PcmF32Le, 16_000, 1),
        AudioFormat::new(AudioEncoding::Mulaw, 8_000, 1),
    ];
    for format in formats {
        let mut converter = AudioConverter::new(INTERNAL_FORMAT, format).unwrap();
        let mut bytes = converter.convert(&speech).unwrap().unwrap().data().to_vec();
        if let Some(tail) = converter.flush().unwrap() {
            bytes.extend_from_slice(tail.data());
        }
        // Odd frames: 7 ms worth of sample frames, whatever the rate.
        let unit = format.bytes_per_frame();
        let per_frame = (format.sample_rate as usize * 7 / 1000).max(1) * unit;
        let mut vad = WebrtcVad::default();
        let mut heard = false;
        for chunk in bytes.chunks(per_frame) {
            let chunk = &chunk[..chunk.len() / unit * unit];
            let d = vad.process(&AudioFrame::new(format, chunk.to_vec()).unwrap());
            heard |= d.speech;
        }
        assert!(heard, "speech heard at {format}");
        assert!(!vad.is_speaking(), "and its end, at {format}");
    }
    // Empty frames and single samples change nothing and do not panic.
    let mut vad = WebrtcVad::default();
    let d = vad.process(&AudioFrame::from_i16(16_000, 1, &[]).unwrap());
    assert!(!d.speech);
    for _ in 0..100 {
        vad.process(&AudioFrame::from_i16(48_000, 1, &[1000]).unwrap());
        vad.process(&AudioFrame::from_i16(11_025, 1, &[-1000]).unwrap());
    }
}

#[test]
fn the_denoiser_delays_by_its_stated_latency_whatever_the_frames() {
    let mut audio = signal::speech_like(Duration::from_secs(2), 5);
    audio = signal::mix(&audio, &signal::noise(Duration::from_secs(2), -40.0, 3));
    // strength 0: the output is the input, exactly `latency` late.
    let dry = DenoiseOptions {
        strength: 0.0,
        ..Default::default()
    };
    let (out, d) = denoise(&audio, dry, 320);
    let lag = d.latency_samples();
    println!("latency {lag} samples, {:?}", d.latency());
    assert!(
        d.latency() > ms(20) && d.latency() < ms(30),
        "{:?}",
        d.latency()
    );
    assert!(out[..lag].iter().all(|&s| s == 0));
    assert_eq!(&out[lag..], &audio[..audio.len() - lag]);

    // Denoised: the output lines up with the input at the same lag (the
    // cross-correlation peaks there).
    let (wet, _) = denoise(&audio, DenoiseOptions::default(), 320);
    let corr = |k: usize| -> f64 {
        audio[..audio.len() - 1000]
            .iter()
            .zip(&wet[k..])
            .map(|(a, b)| f64::from(*a) * f64::from(*b))
            .sum()
    };
    let best = (0..800)
        .max_by(|&a, &b| corr(a).total_cmp(&corr(b)))
        .unwrap();
    assert_eq!(best, lag, "the denoised speech is {best} samples late");

    // Any cut gives the same samples, and none comes out late.
    for len in [1, 7, 160, 333, 480, 1000] {
        let (cut, d) = denoise(&audio, DenoiseOptions::default(), len);
        assert_eq!(d.underruns(), 0, "frames of {len}");
        assert!(cut == wet, "frames of {len} samples give the same output");
    }
}

#[test]
fn the_denoiser_refuses_other_formats_with_an_error() {
    let mut d = Denoiser::new(DenoiseOptions::default(), 0).unwrap();
    let frame = AudioFrame::from_i16(48_000, 1, &[0; 960]).unwrap();
    let e = d.process(frame).unwrap_err();
    assert_eq!(e.code, ErrorCode::PipelineError);
    assert!(
        e.message.contains("48000") || e.message.contains("48 kHz"),
        "{e}"
    );
    // And goes on with the right format.
    let ok = d.process(AudioFrame::from_i16(16_000, 1, &[0; 320]).unwrap());
    assert_eq!(ok.unwrap().sample_frames(), 320);
}

#[test]
fn the_vad_gate_mutes_noise_alone() {
    let noise = signal::noise(Duration::from_secs(3), -35.0, 4);
    let gated = DenoiseOptions {
        vad_gate: 0.5,
        ..Default::default()
    };
    let (open, _) = denoise(&noise, DenoiseOptions::default(), 320);
    let (shut, _) = denoise(&noise, gated, 320);
    let tail = signal::samples_in(Duration::from_secs(1));
    let (open_db, shut_db) = (
        signal::rms_dbfs(&open[tail..]),
        signal::rms_dbfs(&shut[tail..]),
    );
    println!("noise at -35 dBFS: {open_db:.1} dBFS denoised, {shut_db:.1} gated");
    assert!(shut_db < open_db - 10.0, "{open_db} -> {shut_db}");
}

fn local_config(toml_tail: &str) -> Result<Config, voice_backends::BackendError> {
    Config::from_toml_str(&format!(
        "provider = \"local\"\npipeline_type = \"s2s\"\ns2s_provider = \"echo\"\n{toml_tail}"
    ))
}

async fn create_err(toml_tail: &str) -> voice_backends::BackendError {
    let config = match local_config(toml_tail) {
        Ok(c) => c,
        Err(e) => return e,
    };
    registry()
        .create("local", &config)
        .await
        .expect_err("refused")
}

#[tokio::test]
async fn options_are_checked_when_the_backend_is_made() {
    let e = create_err("vad_provider = \"webrtc\"\n[components.webrtc]\nmode = 4\n").await;
    assert_eq!(e.code, ErrorCode::InvalidConfig);
    assert!(e.details.contains_key("components.webrtc"), "{e:?}");
    assert!(e.message.contains("components.webrtc.mode"), "{e}");

    let e = create_err("vad_provider = \"webrtc\"\n[components.webrtc]\nagressive = true\n").await;
    assert_eq!(e.code, ErrorCode::InvalidConfig);
    assert!(e.message.contains("components.webrtc.agressive"), "{e}");

    let e = create_err("vad_provider = \"webrtc\"\n[components.webrtc]\nframe = \"15ms\"\n").await;
    assert!(e.message.contains("components.webrtc.frame"), "{e}");

    let e = create_err(
        "noise_cancellation_provider = \"denoise\"\n[components.denoise]\nstrength = 1.5\n",
    )
    .await;
    assert_eq!(e.code, ErrorCode::InvalidConfig);
    assert!(e.message.contains("components.denoise.strength"), "{e}");

    let e = create_err("processors = [{ name = \"denoise\", options = { level = 3 } }]\n").await;
    assert_eq!(e.code, ErrorCode::InvalidConfig);
    assert!(e.details.contains_key("processors[0].options"), "{e:?}");
    assert!(e.message.contains("level"), "{e}");

    // Directly, each bad field with its path.
    let e = WebrtcVadOptions::from_value(&serde_json::json!({
        "mode": 4, "frame": "25ms", "onset": "2s", "hangover": "6s"
    }))
    .unwrap_err();
    let keys: Vec<&str> = e.details.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "components.webrtc.frame",
            "components.webrtc.hangover",
            "components.webrtc.mode",
            "components.webrtc.onset"
        ]
    );
    let e = DenoiseOptions::from_value(&serde_json::json!({"strength": -0.1, "vad_gate": 2}))
        .unwrap_err();
    assert_eq!(e.details.len(), 2, "{e:?}");
    assert!(WebrtcVadOptions::from_value(&serde_json::json!([1])).is_err());
    for mode in 0..=3 {
        WebrtcVadOptions::from_value(&serde_json::json!({ "mode": mode })).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_session_with_webrtc_and_denoise_answers_a_turn_in_noise() {
    let config = local_config(
        "vad_provider = \"webrtc\"\nprocessors = [{ name = \"denoise\" }]\n\
         [components.webrtc]\nmode = 3\n",
    )
    .unwrap();
    let backend = registry().create("local", &config).await.unwrap();
    backend.start().await.unwrap();
    let session = backend
        .create_session(SessionConfig::new("u"))
        .await
        .unwrap();
    let mut events = session.events();
    let mut rx = session.receive_audio().unwrap();
    session.start().await.unwrap();
    // Noise, then an utterance in the same noise, 10 dB under it.
    let mut audio = signal::noise(Duration::from_secs(1), -30.0, 1);
    let utterance = signal::utterance(ms(1200), ms(1500), 2);
    audio.extend(signal::mix(
        &utterance,
        &signal::noise(signal::duration_of(utterance.len()), -30.0, 2),
    ));
    for f in signal::frames(&audio, 20) {
        session.process_audio(f).await.unwrap();
    }
    expect_event_within(PATIENCE, &mut events, "speech start", |e| {
        matches!(e, SessionEvent::SpeechStarted)
    })
    .await;
    expect_event_within(PATIENCE, &mut events, "turn end", |e| {
        matches!(e, SessionEvent::TurnEnded { turn: 1 })
    })
    .await;
    // The echo is the turn as the pipeline heard it: denoised speech.
    let mut back = Vec::new();
    while let Ok(Some(f)) = tokio::time::timeout(Duration::from_secs(2), rx.recv()).await {
        back.extend(signal::samples_of([&f]));
    }
    assert!(
        signal::duration_of(back.len()) >= ms(1000),
        "the reply holds the turn: {:?}",
        signal::duration_of(back.len())
    );
    backend.stop().await.unwrap();
}
