#![cfg(feature = "testing")]
//! The `adaptive` turn detector against `silence`, on recorded-style speech
//! ([`signal::recorded_style_turn`]), counted on the audio clock in 20 ms
//! frames; its options; and a whole session through the `local` provider.

use std::time::Duration;

use voice_backends::pipeline::builtin::adaptive::contour::Ending;
use voice_backends::pipeline::builtin::{
    AdaptiveTurnDetector, AdaptiveTurnOptions, EnergyVad, SilenceTurnDetector,
};
use voice_backends::pipeline::events::SessionEvent;
use voice_backends::pipeline::{TurnDetector, TurnSignal, Vad};
use voice_backends::testing::conformance::{Harness, expect_event};
use voice_backends::testing::signal::{self, Boundary, PauseKind, RecordedTurn, TurnPlan};
use voice_backends::{Config, ErrorCode, PipelineType, SessionConfig, registry};

const FRAME: usize = 320; // 20 ms at 16 kHz

/// A turn's audio under -60 dBFS of noise (a quiet room).
fn turn(plan: &TurnPlan, seed: u64) -> RecordedTurn {
    let mut t = signal::recorded_style_turn(plan, seed);
    let noise = signal::noise(signal::duration_of(t.samples.len()), -60.0, seed + 100);
    t.samples = signal::mix(&t.samples, &noise);
    t
}

/// Runs `d` over `t` behind the energy VAD, as the engine does (observe,
/// then update), calling `before` with each frame's index first; returns the
/// frame indices at whose end a turn ended.
fn ends_with<D: TurnDetector>(
    t: &RecordedTurn,
    d: &mut D,
    mut before: impl FnMut(usize, &mut D),
) -> Vec<usize> {
    let mut vad = EnergyVad::default();
    let mut ends = Vec::new();
    for (i, f) in signal::frames(&t.samples, 20).iter().enumerate() {
        before(i, d);
        let decision = vad.process(f);
        d.observe(f);
        if d.update(&decision, f.duration()) == TurnSignal::TurnEnded {
            ends.push(i);
        }
    }
    ends
}

fn ends<D: TurnDetector>(t: &RecordedTurn, d: &mut D) -> Vec<usize> {
    ends_with(t, d, |_, _| {})
}

/// The pauses of `t` of `kind`, as (first frame, last frame) inclusive.
fn pauses(t: &RecordedTurn, kind: PauseKind) -> Vec<(usize, usize)> {
    t.pauses
        .iter()
        .filter(|p| p.kind == kind)
        .map(|p| (p.start / FRAME, (p.start + p.len) / FRAME))
        .collect()
}

/// Frames from the start of the pause to the frame that ended the turn in it.
fn wait_in(ends: &[usize], (from, to): (usize, usize)) -> Option<usize> {
    ends.iter()
        .find(|&&e| e >= from && e <= to)
        .map(|e| e + 1 - from)
}

fn statement(phrases: usize) -> TurnPlan {
    TurnPlan::statement(phrases, Duration::from_millis(1500))
}

#[test]
fn a_finished_sentence_ends_sooner_than_silence_at_500ms() {
    for seed in 0..12 {
        let t = turn(&statement(1), seed);
        let end = pauses(&t, PauseKind::TurnEnd)[0];
        let adaptive = ends(&t, &mut AdaptiveTurnDetector::default());
        let silence = ends(&t, &mut SilenceTurnDetector::default());
        assert_eq!(adaptive.len(), 1, "seed {seed}: one turn, {adaptive:?}");
        assert_eq!(silence.len(), 1, "seed {seed}: one turn, {silence:?}");
        let fast = wait_in(&adaptive, end).expect("adaptive ends the turn in its final pause");
        let slow = wait_in(&silence, end).expect("silence ends the turn in its final pause");
        // 200 ms (10 frames) of silence after the speech, give or take a
        // frame the VAD still hears as speech.
        assert!(fast <= 12, "seed {seed}: adaptive waited {fast} frames");
        assert!(slow >= 25, "seed {seed}: silence waited {slow} frames");
    }
}

#[test]
fn a_mid_sentence_pause_with_level_pitch_does_not_end_the_turn() {
    for seed in 0..12 {
        let plan = TurnPlan {
            mid_pause: (Duration::from_millis(650), Duration::from_millis(650)),
            boundary: Boundary::Level,
            ..statement(2)
        };
        let t = turn(&plan, seed);
        let mid = pauses(&t, PauseKind::MidSentence)[0];
        let mut d = AdaptiveTurnDetector::default();
        let mut reading = None;
        let adaptive = ends_with(&t, &mut d, |i, d| {
            // What the detector made of the pause, read mid-pause.
            if i == mid.0 + 10 {
                reading = d.reading();
            }
        });
        assert_eq!(
            wait_in(&adaptive, mid),
            None,
            "seed {seed}: adaptive cut the pause ({reading:?})"
        );
        let r = reading.expect("a reading during the pause");
        assert_eq!(r.ending, Ending::Continuing, "seed {seed}: {r:?}");
        assert_eq!(
            adaptive.len(),
            1,
            "seed {seed}: only the real end, {adaptive:?}"
        );
        // The pause is long enough to matter: silence at 500 ms cuts it.
        let silence = ends(&t, &mut SilenceTurnDetector::default());
        assert!(wait_in(&silence, mid).is_some(), "seed {seed}: {silence:?}");
    }
}

#[test]
fn a_complete_transcript_ends_a_level_pause_early() {
    let plan = TurnPlan {
        mid_pause: (Duration::from_millis(650), Duration::from_millis(650)),
        boundary: Boundary::Level,
        ..statement(2)
    };
    let t = turn(&plan, 3);
    let mid = pauses(&t, PauseKind::MidSentence)[0];
    let hinted = ends_with(&t, &mut AdaptiveTurnDetector::default(), |i, d| {
        if i == mid.0 {
            d.hint_transcript("I'd like a table for four.");
        }
    });
    let wait = wait_in(&hinted, mid).expect("the complete sentence ends the turn in the pause");
    assert!(wait <= 12, "waited {wait} frames");
    // Without the hint the same pause is not cut.
    let plain = ends(&t, &mut AdaptiveTurnDetector::default());
    assert_eq!(wait_in(&plain, mid), None);
}

#[test]
fn a_trailing_conjunction_or_filler_holds_a_falling_end() {
    for hint in ["I'd like a table for four and", "so, um", "because"] {
        let t = turn(&statement(1), 5);
        let end = pauses(&t, PauseKind::TurnEnd)[0];
        let held = ends_with(&t, &mut AdaptiveTurnDetector::default(), |i, d| {
            if i == end.0 {
                d.hint_transcript(hint);
            }
        });
        let wait = wait_in(&held, end).expect("the turn still ends, after max_wait");
        // max_wait is 1 s: 50 frames of silence (the VAD may hold one more).
        assert!((50..=52).contains(&wait), "{hint:?}: waited {wait} frames");
        // Without the hint this ending is read as finished.
        let plain = ends(&t, &mut AdaptiveTurnDetector::default());
        assert!(wait_in(&plain, end).unwrap() <= 12);
    }
}

#[test]
fn without_audio_every_pause_waits_neutral_wait() {
    // A caller that never calls observe gets silence's behaviour.
    let t = turn(&statement(1), 2);
    let end = pauses(&t, PauseKind::TurnEnd)[0];
    let mut vad = EnergyVad::default();
    let mut d = AdaptiveTurnDetector::default();
    let mut ended = None;
    for (i, f) in signal::frames(&t.samples, 20).iter().enumerate() {
        if d.update(&vad.process(f), f.duration()) == TurnSignal::TurnEnded {
            ended = Some(i);
        }
    }
    let wait = ended.unwrap() + 1 - end.0;
    assert!((25..=27).contains(&wait), "waited {wait} frames");
}

#[test]
fn options_are_parsed_strictly_and_validated() {
    let e =
        AdaptiveTurnOptions::from_value(&serde_json::json!({ "min_wiat": "100ms" })).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidConfig);
    assert!(
        e.details.contains_key("components.adaptive.min_wiat"),
        "{e:?}"
    );

    let e = AdaptiveTurnOptions::from_value(&serde_json::json!({
        "min_wait": "2s", "max_wait": "1s", "window": "5s", "pitch_fall_semitones": 0.0
    }))
    .unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidConfig);
    for field in ["min_wait", "window", "pitch_fall_semitones"] {
        let key = format!("components.adaptive.{field}");
        assert!(e.details.contains_key(&key), "{key} in {e:?}");
    }
    assert!(
        e.details["components.adaptive.min_wait"].contains("max_wait"),
        "{e:?}"
    );
    let ok = AdaptiveTurnOptions::from_value(&serde_json::json!({
        "min_wait": "300ms", "neutral_wait": "300ms", "max_wait": "300ms"
    }))
    .unwrap();
    assert_eq!(ok.min_wait, ok.max_wait);
    assert_eq!(
        AdaptiveTurnOptions::from_value(&serde_json::Value::Null).unwrap(),
        AdaptiveTurnOptions::default()
    );
}

fn adaptive_config(options: &str) -> Config {
    Config::from_toml_str(&format!(
        "provider = \"local\"\npipeline_type = \"s2s\"\ns2s_provider = \"echo\"\n\
         turn_detection_provider = \"adaptive\"\n[components.adaptive]\n{options}"
    ))
    .unwrap()
}

#[tokio::test]
async fn bad_options_fail_when_the_backend_is_made() {
    let err = registry()
        .create("local", &adaptive_config("min_wait = \"3s\"\n"))
        .await
        .expect_err("min_wait longer than max_wait is refused");
    assert_eq!(err.code, ErrorCode::InvalidConfig);
    assert!(err.details.contains_key("components.adaptive"), "{err}");
    assert!(
        err.message.contains("components.adaptive.min_wait"),
        "names the field: {err}"
    );
}

struct Adaptive;

impl Harness for Adaptive {
    fn config(&self) -> Config {
        let mut config = Config::new("local");
        config.pipeline_type = PipelineType::S2s;
        config.s2s_provider = Some("echo".into());
        config.turn_detection_provider = Some("adaptive".into());
        config
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_with_the_adaptive_detector_answers_a_turn() {
    let backend = registry()
        .create("local", &adaptive_config("max_wait = \"2s\"\n"))
        .await
        .unwrap();
    backend.start().await.unwrap();
    let session = backend
        .create_session(SessionConfig::new("u1"))
        .await
        .unwrap();
    let mut events = session.events();
    let mut rx = session.receive_audio().unwrap();
    session.start().await.unwrap();
    let t = turn(&statement(1), 4);
    for f in signal::frames(&t.samples, 20) {
        session.process_audio(f).await.unwrap();
    }
    expect_event(&Adaptive, &mut events, "speech start", |e| {
        matches!(e, SessionEvent::SpeechStarted)
    })
    .await;
    expect_event(&Adaptive, &mut events, "turn end", |e| {
        matches!(e, SessionEvent::TurnEnded { turn: 1 })
    })
    .await;
    let first = tokio::time::timeout(Adaptive.patience(), rx.recv())
        .await
        .expect("the echo answers")
        .expect("reply audio");
    assert!(!first.is_empty());
    let SessionEvent::Latency(l) = expect_event(&Adaptive, &mut events, "latency", |e| {
        matches!(e, SessionEvent::Latency(_))
    })
    .await
    else {
        unreachable!()
    };
    // The silence the detector waited, on the audio clock: the finished
    // sentence's min_wait (200 ms), not silence's 500 ms.
    assert!(
        l.endpointing <= Duration::from_millis(240),
        "endpointing {:?}",
        l.endpointing
    );
    backend.stop().await.unwrap();
}
