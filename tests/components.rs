//! The built-in components (`energy` VAD, `silence` turn detection, `echo`
//! speech-to-speech) through the public API and the component registries,
//! driven by the deterministic test signals.
#![cfg(feature = "testing")]

use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::mpsc;
use voice_backends::pipeline::builtin::{EchoS2s, EnergyVadOptions};
use voice_backends::pipeline::{
    INTERNAL_FORMAT, S2sEvent, S2sStream, TurnDetector, TurnSignal, Vad, VadDecision, components,
};
use voice_backends::testing::signal;
use voice_backends::{AudioFrame, BackendError, ErrorCode};

const FRAME: Duration = Duration::from_millis(20);
const FRAME_MS: u64 = 20;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn vad(options: Value) -> Box<dyn Vad> {
    components()
        .vad
        .get("energy")
        .unwrap()
        .create(&options)
        .unwrap()
}

fn turn(options: Value) -> Box<dyn TurnDetector> {
    components()
        .turn
        .get("silence")
        .unwrap()
        .create(&options)
        .unwrap()
}

/// The VAD's decision for each 20 ms frame of `samples`.
fn decisions(vad: &mut dyn Vad, samples: &[i16]) -> Vec<VadDecision> {
    signal::frames(samples, 20)
        .iter()
        .map(|f| vad.process(f))
        .collect()
}

/// The index of the 20 ms frame holding sample `at`.
fn frame_of(at: Duration) -> usize {
    (at.as_millis() as u64 / FRAME_MS) as usize
}

/// Every non-`Continue` signal with the audio time at the end of its frame.
fn signals(detector: &mut dyn TurnDetector, vads: &[VadDecision]) -> Vec<(TurnSignal, Duration)> {
    let mut out = Vec::new();
    let mut now = Duration::ZERO;
    for d in vads {
        now += FRAME;
        let s = detector.update(d, FRAME);
        if s != TurnSignal::Continue {
            out.push((s, now));
        }
    }
    out
}

fn speech_frame() -> VadDecision {
    VadDecision {
        speech: true,
        probability: 0.95,
        level_db: -20.0,
    }
}

fn silent_frame() -> VadDecision {
    VadDecision {
        speech: false,
        probability: 0.02,
        level_db: -70.0,
    }
}

/// `idle` of silence, `speech` of speech, `after` of silence, as VAD decisions.
fn utterance_decisions(idle: Duration, speech: Duration, after: Duration) -> Vec<VadDecision> {
    let mut v = vec![silent_frame(); frame_of(idle)];
    v.extend(vec![speech_frame(); frame_of(speech)]);
    v.extend(vec![silent_frame(); frame_of(after)]);
    v
}

fn assert_close(actual: Duration, expected: Duration, tolerance: Duration, what: &str) {
    let diff = actual.abs_diff(expected);
    assert!(
        diff <= tolerance,
        "{what}: {actual:?}, expected {expected:?} ± {tolerance:?}"
    );
}

fn assert_invalid(result: Result<impl Sized, BackendError>, path: &str, needle: &str) {
    let Err(e) = result else {
        panic!("options accepted; expected an error at {path}");
    };
    assert_eq!(e.code, ErrorCode::InvalidConfig, "{e}");
    let detail = e
        .details
        .get(path)
        .unwrap_or_else(|| panic!("no detail at {path}: {:?}", e.details));
    assert!(
        detail.contains(needle),
        "{path}: {detail:?} lacks {needle:?}"
    );
}

// ---------------------------------------------------------------- registry

#[test]
fn the_builtins_are_registered_and_make_components_with_default_options() {
    let c = components();
    assert!(c.vad.list().contains(&"energy"), "{:?}", c.vad.list());
    assert!(c.turn.list().contains(&"silence"), "{:?}", c.turn.list());
    assert!(c.s2s.list().contains(&"echo"), "{:?}", c.s2s.list());
    assert!(c.vad.duplicates().is_empty());
    assert!(c.turn.duplicates().is_empty());
    assert!(c.s2s.duplicates().is_empty());

    let mut v = vad(Value::Null);
    let f = signal::frames(&signal::silence(FRAME), 20);
    assert!(!v.process(&f[0]).speech);
    let mut t = turn(json!({}));
    assert_eq!(t.update(&silent_frame(), FRAME), TurnSignal::Continue);
    let (tx, _rx) = mpsc::channel(4);
    assert!(c.s2s.get("echo").unwrap().open(&Value::Null, tx).is_ok());
}

// ---------------------------------------------------------------- energy VAD

#[test]
fn energy_vad_says_no_speech_on_digital_silence() {
    let mut v = vad(Value::Null);
    let d = decisions(&mut *v, &signal::silence(Duration::from_secs(5)));
    assert_eq!(d.len(), 250);
    assert!(d.iter().all(|d| !d.speech && d.probability < 0.01));
    assert!(d.iter().all(|d| d.level_db <= -90.0));
}

#[test]
fn energy_vad_says_no_speech_on_steady_background_noise() {
    let noise = signal::noise(Duration::from_secs(10), -45.0, 11);
    // Calibrated (the default): never speech, from the first frame.
    let mut v = vad(Value::Null);
    let d = decisions(&mut *v, &noise);
    assert!((d[100].level_db + 45.0).abs() < 1.0, "{}", d[100].level_db);
    let speech = d.iter().filter(|d| d.speech).count();
    assert_eq!(speech, 0, "{speech} noise frames taken for speech");
    assert!(d.iter().all(|d| d.probability < 0.5));

    // Starting from a -60 dBFS floor instead, the noise passes for speech
    // until the floor has risen (4 dB/s, about 1.5 s), then never again.
    let mut v = vad(json!({ "calibration": "0s", "initial_floor_db": -60.0 }));
    let d = decisions(&mut *v, &noise);
    assert!(
        d[..10].iter().any(|d| d.speech),
        "the adaptation is not exercised"
    );
    let last = d.iter().rposition(|d| d.speech).unwrap();
    assert!(
        (50..=125).contains(&last),
        "speech until frame {last}, expected adaptation within ~1.5 s + hangover"
    );
}

/// Noise at -45 dBFS throughout; speech from `onset` for `speech`.
fn speech_over_noise(onset: Duration, speech: Duration, tail: Duration, seed: u64) -> Vec<i16> {
    let total = onset + speech + tail;
    let mut voice = signal::silence(onset);
    voice.extend(signal::speech_like(speech, seed));
    voice.extend(signal::silence(tail));
    signal::mix(&voice, &signal::noise(total, -45.0, seed + 100))
}

#[test]
fn energy_vad_detects_speech_onset_over_noise_and_holds_it_through_syllable_gaps() {
    for seed in 1..=5 {
        let onset = Duration::from_secs(3);
        let audio = speech_over_noise(onset, ms(1500), Duration::from_secs(1), seed);
        let mut v = vad(Value::Null);
        let d = decisions(&mut *v, &audio);
        let start = frame_of(onset);
        assert!(
            d[..start].iter().all(|d| !d.speech),
            "seed {seed}: speech during the noise before the onset"
        );
        let first = start + d[start..].iter().position(|d| d.speech).unwrap();
        let detected = ms((first as u64 + 1) * FRAME_MS);
        assert!(
            detected - onset <= ms(60),
            "seed {seed}: speech reported {:?} after its onset",
            detected - onset
        );
        // The gaps between syllables (40-90 ms) do not end speech.
        let end = frame_of(onset + ms(1500));
        let last_loud = d[..end].iter().rposition(|d| d.probability >= 0.5).unwrap();
        assert!(
            d[first..=last_loud].iter().all(|d| d.speech),
            "seed {seed}: speech broken inside the utterance"
        );
        assert!(
            d[first..=last_loud].iter().any(|d| d.probability < 0.5),
            "seed {seed}: the signal has no syllable gaps to bridge"
        );
    }
}

#[test]
fn energy_vad_releases_speech_after_the_hangover() {
    for (options, hangover_frames) in [(Value::Null, 10), (json!({ "hangover": "300ms" }), 15)] {
        let onset = Duration::from_secs(2);
        let audio = speech_over_noise(onset, ms(1200), Duration::from_secs(1), 3);
        let mut v = vad(options.clone());
        let d = decisions(&mut *v, &audio);
        let end = frame_of(onset + ms(1200));
        let last_loud = d[..end].iter().rposition(|d| d.probability >= 0.5).unwrap();
        let release = last_loud + hangover_frames;
        assert!(
            d[last_loud..release].iter().all(|d| d.speech),
            "{options}: released before the hangover"
        );
        assert!(
            d[release..].iter().all(|d| !d.speech),
            "{options}: still speech after the hangover"
        );
    }
}

// ---------------------------------------------------------------- silence turn detection

#[test]
fn silence_detector_makes_one_turn_per_utterance_at_the_configured_delay() {
    for (options, delay) in [
        (Value::Null, ms(500)),
        (json!({ "min_endpointing_delay": "700ms" }), ms(700)),
    ] {
        let mut t = turn(options.clone());
        let speech_start = Duration::from_secs(1);
        let speech_end = speech_start + Duration::from_secs(1);
        let v = utterance_decisions(speech_start, Duration::from_secs(1), Duration::from_secs(2));
        let s = signals(&mut *t, &v);
        assert_eq!(s.len(), 2, "{options}: {s:?}");
        assert_eq!(s[0].0, TurnSignal::SpeechStarted);
        // Speech must last min_speech (100 ms) before it counts.
        assert_close(s[0].1, speech_start + ms(100), FRAME, "SpeechStarted");
        assert_eq!(s[1].0, TurnSignal::TurnEnded);
        assert_close(s[1].1, speech_end + delay, FRAME, "TurnEnded");
    }
}

#[test]
fn silence_detector_waits_up_to_the_max_delay_when_the_hint_is_incomplete() {
    for (options, max) in [
        (Value::Null, Duration::from_secs(3)),
        (
            json!({ "max_endpointing_delay": "2s" }),
            Duration::from_secs(2),
        ),
    ] {
        let mut t = turn(options.clone());
        let mut v = utterance_decisions(Duration::from_secs(1), Duration::from_secs(1), ms(0));
        let mut s = signals(&mut *t, &v);
        t.hint_transcript("I would like to book a");
        v = vec![silent_frame(); frame_of(Duration::from_secs(5))];
        s.extend(
            signals(&mut *t, &v)
                .into_iter()
                .map(|(sig, at)| (sig, at + Duration::from_secs(2))),
        );
        assert_eq!(
            s.iter().map(|x| x.0).collect::<Vec<_>>(),
            [TurnSignal::SpeechStarted, TurnSignal::TurnEnded],
            "{options}"
        );
        assert_close(s[1].1, Duration::from_secs(2) + max, FRAME, "TurnEnded");

        // A complete hint ends the next turn at the min delay again.
        t.hint_transcript("Book a table for two.");
        let v = utterance_decisions(ms(0), Duration::from_secs(1), Duration::from_secs(1));
        let s = signals(&mut *t, &v);
        assert_eq!(s.len(), 2, "{s:?}");
        assert_close(s[1].1, Duration::from_secs(1) + ms(500), FRAME, "TurnEnded");
    }
}

/// A pause a little shorter than the endpointing delay, then more speech:
/// one turn, not one that ends just as the user goes on (the first
/// `min_speech` of the new burst is not counted as silence).
#[test]
fn silence_detector_does_not_end_a_turn_as_the_user_goes_on() {
    for pause in [ms(400), ms(440), ms(480)] {
        let mut t = turn(Value::Null);
        let mut v = utterance_decisions(Duration::from_secs(1), Duration::from_secs(1), pause);
        v.extend(utterance_decisions(
            ms(0),
            Duration::from_secs(1),
            Duration::from_secs(1),
        ));
        let s = signals(&mut *t, &v);
        assert_eq!(
            s.iter().map(|x| x.0).collect::<Vec<_>>(),
            [TurnSignal::SpeechStarted, TurnSignal::TurnEnded],
            "{pause:?}: {s:?}"
        );
        // The turn ends 500 ms after the second part.
        let end = Duration::from_secs(2) + pause + Duration::from_secs(1) + ms(500);
        assert_close(s[1].1, end, FRAME, "TurnEnded");
    }
    // A click within the pause counts as silence: the turn ends on time.
    let mut t = turn(Value::Null);
    let mut v = utterance_decisions(Duration::from_secs(1), Duration::from_secs(1), ms(200));
    v.extend(utterance_decisions(ms(0), ms(40), Duration::from_secs(1)));
    let s = signals(&mut *t, &v);
    assert_eq!(s.len(), 2, "{s:?}");
    assert_close(s[1].1, Duration::from_secs(2) + ms(500), FRAME, "TurnEnded");
}

#[test]
fn silence_detector_ignores_a_40ms_click() {
    let mut t = turn(Value::Null);
    let v = utterance_decisions(Duration::from_secs(1), ms(40), Duration::from_secs(4));
    assert_eq!(signals(&mut *t, &v), []);
    // The same detector still hears real speech afterwards.
    let v = utterance_decisions(ms(0), ms(300), Duration::from_secs(1));
    assert_eq!(signals(&mut *t, &v).len(), 2);
}

#[test]
fn energy_vad_and_silence_detector_find_three_turns_in_three_utterances() {
    for background in [None, Some(-45.0f32)] {
        let speech = [ms(1200), ms(800), ms(1600)];
        let pause = Duration::from_secs(1);
        let mut voice = signal::silence(ms(500));
        let mut speech_ends = Vec::new();
        for (i, &len) in speech.iter().enumerate() {
            voice.extend(signal::utterance(len, pause, 40 + i as u64));
            speech_ends.push(signal::duration_of(voice.len()) - pause);
        }
        let audio = match background {
            Some(db) => signal::mix(
                &voice,
                &signal::noise(signal::duration_of(voice.len()), db, 9),
            ),
            None => voice,
        };

        let mut v = vad(Value::Null);
        let mut t = turn(Value::Null);
        let d = decisions(&mut *v, &audio);
        let s = signals(&mut *t, &d);
        let kinds: Vec<TurnSignal> = s.iter().map(|x| x.0).collect();
        assert_eq!(
            kinds,
            [TurnSignal::SpeechStarted, TurnSignal::TurnEnded].repeat(3),
            "background {background:?}: {s:?}"
        );
        for (i, end) in speech_ends.iter().enumerate() {
            let ended = s[2 * i + 1].1;
            // Silence counts from the last loud frame, at or before the end of the signal.
            assert!(
                ended <= *end + ms(500) + FRAME && ended >= *end + ms(300),
                "background {background:?}: turn {i} ended at {ended:?}, speech ended at {end:?}"
            );
        }
    }
}

// ---------------------------------------------------------------- echo

/// Receives events until `ReplyDone` (inclusive), failing after 5 s.
async fn reply(rx: &mut mpsc::Receiver<S2sEvent>) -> Vec<S2sEvent> {
    let mut out = Vec::new();
    loop {
        let e = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("the reply stalled")
            .expect("the event channel closed");
        let done = e == S2sEvent::ReplyDone;
        out.push(e);
        if done {
            return out;
        }
    }
}

fn audio_of(events: &[S2sEvent]) -> Vec<AudioFrame> {
    events
        .iter()
        .filter_map(|e| match e {
            S2sEvent::Audio(f) => Some(f.clone()),
            _ => None,
        })
        .collect()
}

fn bytes_of(frames: &[AudioFrame]) -> Vec<u8> {
    frames.iter().flat_map(|f| f.data().to_vec()).collect()
}

fn open_echo(options: Value, capacity: usize) -> (Box<dyn S2sStream>, mpsc::Receiver<S2sEvent>) {
    let (tx, rx) = mpsc::channel(capacity);
    let s = components()
        .s2s
        .get("echo")
        .unwrap()
        .open(&options, tx)
        .unwrap();
    (s, rx)
}

#[tokio::test]
async fn echo_replays_exactly_the_samples_pushed() {
    // A tiny channel: the reply must wait for room, not drop frames.
    let (mut s, mut rx) = open_echo(Value::Null, 2);
    let samples = signal::speech_like(ms(1013), 21);
    // Odd frame sizes: the reply is re-framed to 20 ms.
    let pushed = signal::frames(&samples, 7);
    for f in &pushed {
        s.push_audio(f).unwrap();
    }
    s.end_turn().unwrap();
    let events = reply(&mut rx).await;
    assert_eq!(
        events[0],
        S2sEvent::UserTranscript {
            text: "1013 ms of audio".into(),
            is_final: true
        }
    );
    assert!(
        matches!(&events[1], S2sEvent::AgentText(t) if t.contains("1013 ms")),
        "{:?}",
        events[1]
    );
    let frames = audio_of(&events);
    assert_eq!(events.len(), frames.len() + 3);
    assert_eq!(bytes_of(&frames), bytes_of(&pushed));
    assert_eq!(signal::samples_of(&frames), samples);
    assert!(frames.iter().all(|f| f.format() == INTERNAL_FORMAT));
    let (last, whole) = frames.split_last().unwrap();
    assert!(whole.iter().all(|f| f.duration() == FRAME));
    assert_eq!(last.sample_frames(), 16_208 % 320);

    // The next turn echoes only its own audio.
    let second = signal::speech_like(ms(400), 22);
    for f in signal::frames(&second, 20) {
        s.push_audio(&f).unwrap();
    }
    s.end_turn().unwrap();
    assert_eq!(signal::samples_of(&audio_of(&reply(&mut rx).await)), second);
}

#[tokio::test]
async fn echo_answers_turns_in_order_and_an_empty_turn_with_reply_done() {
    let (mut s, mut rx) = open_echo(Value::Null, 4);
    let a = signal::speech_like(ms(600), 1);
    let b = signal::speech_like(ms(300), 2);
    for f in signal::frames(&a, 20) {
        s.push_audio(&f).unwrap();
    }
    s.end_turn().unwrap();
    for f in signal::frames(&b, 20) {
        s.push_audio(&f).unwrap();
    }
    s.end_turn().unwrap();
    s.end_turn().unwrap();
    assert_eq!(signal::samples_of(&audio_of(&reply(&mut rx).await)), a);
    assert_eq!(signal::samples_of(&audio_of(&reply(&mut rx).await)), b);
    let empty = reply(&mut rx).await;
    assert_eq!(
        empty[0],
        S2sEvent::UserTranscript {
            text: "0 ms of audio".into(),
            is_final: true
        }
    );
    assert!(matches!(empty[1], S2sEvent::AgentText(_)));
    assert_eq!(empty[2..], [S2sEvent::ReplyDone]);
}

#[tokio::test]
async fn echo_interrupt_stops_and_discards_the_reply() {
    const CAPACITY: usize = 4;
    let (mut s, mut rx) = open_echo(Value::Null, CAPACITY);
    for f in signal::frames(&signal::speech_like(Duration::from_secs(2), 5), 20) {
        s.push_audio(&f).unwrap();
    }
    s.end_turn().unwrap();
    // Take the texts and a few frames of the 100-frame reply, then barge in.
    for _ in 0..5 {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
    }
    s.interrupt();
    // Buffer the user's next turn meanwhile: interrupt keeps it.
    let next = signal::speech_like(ms(200), 6);
    for f in signal::frames(&next, 20) {
        s.push_audio(&f).unwrap();
    }
    tokio::time::sleep(ms(100)).await;
    // What was already in the channel (plus at most one frame in flight) is
    // all that is left of the interrupted reply.
    let mut leftovers = Vec::new();
    while let Ok(e) = rx.try_recv() {
        leftovers.push(e);
    }
    assert!(
        leftovers.len() <= CAPACITY + 1,
        "{} events after the interrupt",
        leftovers.len()
    );
    assert!(
        leftovers.iter().all(|e| matches!(e, S2sEvent::Audio(_))),
        "{leftovers:?}"
    );
    // Nothing more of it comes: the next events are the next turn's reply.
    s.end_turn().unwrap();
    let events = reply(&mut rx).await;
    assert_eq!(
        events[0],
        S2sEvent::UserTranscript {
            text: "200 ms of audio".into(),
            is_final: true
        }
    );
    assert_eq!(signal::samples_of(&audio_of(&events)), next);
}

#[tokio::test]
async fn echo_keeps_at_most_max_turn_and_counts_what_it_drops() {
    let (tx, mut rx) = mpsc::channel(8);
    let mut s = EchoS2s
        .open_stream(&json!({ "max_turn": "100ms" }), tx)
        .unwrap();
    let samples = signal::speech_like(ms(300), 8);
    for f in signal::frames(&samples, 20) {
        s.push_audio(&f).unwrap();
    }
    assert_eq!(s.dropped_samples(), 3200);
    assert_eq!(s.buffered(), ms(100));
    s.end_turn().unwrap();
    let events = reply(&mut rx).await;
    // The newest 100 ms are echoed.
    assert_eq!(signal::samples_of(&audio_of(&events)), samples[3200..]);
    assert_eq!(
        events[0],
        S2sEvent::UserTranscript {
            text: "100 ms of audio".into(),
            is_final: true
        }
    );
    assert!(
        matches!(&events[1], S2sEvent::AgentText(t) if t.contains("200 ms") && t.contains("dropped")),
        "{:?}",
        events[1]
    );
    // The count is cumulative; the next turn starts empty.
    assert_eq!(s.buffered(), Duration::ZERO);
    assert_eq!(s.dropped_samples(), 3200);
}

#[tokio::test]
async fn echo_refuses_frames_of_another_format() {
    let (mut s, _rx) = open_echo(Value::Null, 4);
    let f = AudioFrame::from_i16(48_000, 2, &[0; 960]).unwrap();
    assert_eq!(s.push_audio(&f).unwrap_err().code, ErrorCode::PipelineError);
}

// ---------------------------------------------------------------- options

#[test]
fn bad_options_are_invalid_config_at_the_field_path() {
    let c = components();
    let energy = c.vad.get("energy").unwrap();
    let silence = c.turn.get("silence").unwrap();
    let echo = c.s2s.get("echo").unwrap();
    let (tx, _rx) = mpsc::channel(1);

    assert_invalid(
        energy.create(&json!({ "threshold_db": -3.0 })),
        "components.energy.threshold_db",
        "-3",
    );
    assert_invalid(
        energy.create(&json!({ "hangover": "soon" })),
        "components.energy.hangover",
        "",
    );
    assert_invalid(
        energy.create(&json!({ "min_level_db": "loud" })),
        "components.energy.min_level_db",
        "invalid type",
    );
    assert_invalid(
        energy.create(&json!(["threshold_db", 9])),
        "components.energy",
        "table",
    );
    assert_invalid(
        silence.create(&json!({
            "min_endpointing_delay": "5s",
            "max_endpointing_delay": "1s"
        })),
        "components.silence.min_endpointing_delay",
        "max_endpointing_delay",
    );
    assert_invalid(
        silence.create(&json!({ "min_speech": 100 })),
        "components.silence.min_speech",
        "",
    );
    assert_invalid(
        echo.open(&json!({ "max_turn": "0s" }), tx.clone()),
        "components.echo.max_turn",
        "outside",
    );
    // Every violation is reported at once.
    let e = energy
        .create(&json!({ "threshold_db": 0.0, "onset": "3s" }))
        .err()
        .unwrap();
    assert!(e.details.contains_key("components.energy.threshold_db"));
    assert!(e.details.contains_key("components.energy.onset"));
}

#[test]
fn unknown_option_keys_are_rejected() {
    let c = components();
    let (tx, _rx) = mpsc::channel(1);
    assert_invalid(
        c.vad
            .get("energy")
            .unwrap()
            .create(&json!({ "treshold_db": 9.0 })),
        "components.energy.treshold_db",
        "unknown field",
    );
    assert_invalid(
        c.turn
            .get("silence")
            .unwrap()
            .create(&json!({ "max_delay": "2s" })),
        "components.silence.max_delay",
        "unknown field",
    );
    assert_invalid(
        c.s2s
            .get("echo")
            .unwrap()
            .open(&json!({ "voice": "alloy" }), tx),
        "components.echo.voice",
        "unknown field",
    );
}

#[test]
fn energy_options_round_trip_through_json() {
    let o =
        EnergyVadOptions::from_value(&json!({ "onset": "60ms", "threshold_db": 12.0 })).unwrap();
    let back = EnergyVadOptions::from_value(&serde_json::to_value(&o).unwrap()).unwrap();
    assert_eq!(back, o);
    assert_eq!(back.onset, ms(60));
}

/// The start of the user's speech reaches the S2S model however long the
/// VAD's onset and the turn detector's `min_speech` make the wait before the
/// turn starts: the engine keeps that much more audio from before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_longer_onset_and_min_speech_still_hand_over_the_start_of_the_turn() {
    use voice_backends::pipeline::events::SessionEvent;
    use voice_backends::{Config, SessionConfig, registry};

    for (onset, min_speech) in [("60ms", "100ms"), ("300ms", "400ms")] {
        let config = Config::from_toml_str(&format!(
            "provider = \"local\"\npipeline_type = \"s2s\"\ns2s_provider = \"echo\"\n\
             [components.energy]\nonset = \"{onset}\"\n\
             [components.silence]\nmin_speech = \"{min_speech}\"\n"
        ))
        .unwrap();
        let backend = registry().create("local", &config).await.unwrap();
        backend.start().await.unwrap();
        let session = backend
            .create_session(SessionConfig::new("onset"))
            .await
            .unwrap();
        let mut events = session.events();
        let mut replies = session.receive_audio().unwrap();
        session.start().await.unwrap();
        // Silence, 800 ms of steady noise (no pause to break the onset), silence.
        let speech = signal::noise(Duration::from_millis(800), -20.0, 7);
        let mut audio = signal::silence(Duration::from_millis(300));
        audio.extend_from_slice(&speech);
        audio.extend(signal::silence(Duration::from_millis(900)));
        for f in signal::frames(&audio, 20) {
            session.process_audio(f).await.unwrap();
        }
        tokio::time::timeout(Duration::from_secs(10), async {
            while !matches!(
                events.recv().await,
                Some(SessionEvent::TurnEnded { .. }) | None
            ) {}
        })
        .await
        .expect("the turn ends");
        let mut echoed = Vec::new();
        while let Ok(Some(f)) =
            tokio::time::timeout(Duration::from_millis(1500), replies.recv()).await
        {
            echoed.extend(signal::samples_of([&f]));
        }
        backend.stop().await.unwrap();
        // The first 10 ms of the speech are in what the echo model heard.
        let head = &speech[..160];
        assert!(
            echoed.windows(head.len()).any(|w| w == head),
            "onset {onset}, min_speech {min_speech}: the echo ({} ms) lacks the speech's start",
            echoed.len() / 16
        );
    }
}
