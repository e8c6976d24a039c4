#![cfg(all(feature = "espeak", feature = "pocketsphinx", feature = "testing"))]
//! Offline speech: eSpeak NG speaks, PocketSphinx listens. The round trip
//! goes through a whole `local` session; the components' own behaviour
//! (streaming, cancellation, options, decoder reuse) is checked on them
//! directly.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::sync::mpsc;
use voice_backends::pipeline::events::SessionEvent;
use voice_backends::pipeline::offline::espeak::{EspeakOptions, EspeakTts};
use voice_backends::pipeline::offline::pocketsphinx::{PocketSphinxOptions, pooled_decoders};
use voice_backends::pipeline::{INTERNAL_FORMAT, SttEvent, TextToSpeech, components};
use voice_backends::testing::conformance::{expect_event_within, wait_until};
use voice_backends::testing::signal;
use voice_backends::{
    AgentReply, AudioFormat, AudioFrame, Config, ErrorCode, PipelineType, SessionConfig, agent_fn,
    registry,
};

/// How long a check waits: decoding runs at about real time on a busy
/// machine, and a decoder takes a second or more to load.
const PATIENCE: Duration = Duration::from_secs(60);

/// The sentence the round trip speaks. PocketSphinx's default language
/// model gets most of what eSpeak NG says wrong (its voice is far from the
/// speech the model was trained on: "good morning" comes out as "oh yeah",
/// "one two three four five" as "want to freak our fight"), but it hears
/// this one, at every rate tried.
const SENTENCE: &str = "thank you";

/// Whether `transcript` holds the sentence's key words.
fn heard_the_sentence(transcript: &str) -> bool {
    transcript.contains("thank you")
}

/// `text` spoken by eSpeak NG at the pipeline's rate, through the component.
async fn speech(text: &str) -> Vec<i16> {
    let tts = EspeakTts::new(EspeakOptions::default()).unwrap();
    signal::samples_of(&synthesize(&tts, text, INTERNAL_FORMAT).await)
}

/// Recognises `audio` with a fresh PocketSphinx stream of `options`: the
/// partials it sent, then the final.
async fn recognise(options: &serde_json::Value, audio: &[i16]) -> (Vec<String>, String) {
    let stt = components().stt.get("pocketsphinx").unwrap();
    let (tx, mut rx) = mpsc::channel(64);
    let mut stream = stt.open(options, tx).unwrap();
    for frame in signal::frames(audio, 20) {
        stream.push_audio(&frame).unwrap();
    }
    stream.end_turn().unwrap();
    let mut partials = Vec::new();
    loop {
        match tokio::time::timeout(PATIENCE, rx.recv()).await {
            Ok(Some(SttEvent::Partial(p))) => partials.push(p),
            Ok(Some(SttEvent::Final(f))) => return (partials, f),
            Ok(None) => panic!("the stream ended without a final"),
            Err(_) => panic!("no final within {PATIENCE:?}"),
        }
    }
}

/// `speech` as a user says it: a moment of silence before, enough after for
/// the turn to end.
fn padded(speech: &[i16]) -> Vec<i16> {
    let mut audio = signal::silence(Duration::from_millis(300));
    audio.extend_from_slice(speech);
    audio.extend(signal::silence(Duration::from_millis(1200)));
    audio
}

/// Renders `text` whole into frames of `format`.
async fn synthesize(tts: &dyn TextToSpeech, text: &str, format: AudioFormat) -> Vec<AudioFrame> {
    voice_backends::testing::components::synthesize(tts, text, format)
        .await
        .unwrap()
}

/// Whether `err` names the option at `path` (the pipeline's plan reports a
/// component's error under the component, with the option's path in the
/// message).
fn names(err: &voice_backends::BackendError, path: &str) -> bool {
    err.details.contains_key(path) || err.message.contains(&format!("{path}:"))
}

fn offline_config() -> Config {
    let mut config = Config::new("local");
    config.pipeline_type = PipelineType::SttTts;
    config.stt_provider = Some("pocketsphinx".into());
    config.tts_provider = Some("espeak".into());
    config
}

fn with_component(mut config: Config, name: &str, options: serde_json::Value) -> Config {
    config.components.insert(
        name.into(),
        voice_backends::config::ProviderSection(options.as_object().cloned().unwrap()),
    );
    config
}

// ---------------------------------------------------------------------------
// The round trip

/// eSpeak NG says a sentence, a `local` session with PocketSphinx hears it
/// (partials while it plays, then the final), the agent gets the
/// transcript and its reply is spoken by eSpeak NG. A second turn says other
/// words, and the transcript the agent gets does not pass for the first.
/// The only test on PocketSphinx's default configuration, so its decoders
/// start fresh (a decoder adapts to what it has heard).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentence_goes_round_through_a_local_session() {
    let backend = registry().create("local", &offline_config()).await.unwrap();
    backend.start().await.unwrap();
    let heard = Arc::new(Mutex::new(Vec::<String>::new()));
    let agent = agent_fn({
        let heard = heard.clone();
        move |turn| {
            heard.lock().unwrap().push(turn.transcript.clone());
            async move { Ok(AgentReply::text(format!("You said {}.", turn.transcript))) }
        }
    });
    let session = backend
        .create_session(SessionConfig::new("ada").with_agent(agent))
        .await
        .unwrap();
    let mut events = session.events();
    let mut reply_audio = session.receive_audio().unwrap();
    session.start().await.unwrap();

    let said = padded(&speech(SENTENCE).await);
    for frame in signal::frames(&said, 20) {
        session.process_audio(frame).await.unwrap();
    }
    let mut partials = Vec::new();
    let last = expect_event_within(PATIENCE, &mut events, "the final transcript", |e| {
        if let SessionEvent::UserTranscript {
            text,
            is_final: false,
        } = e
        {
            partials.push(text.clone());
        }
        matches!(e, SessionEvent::UserTranscript { is_final: true, .. })
    })
    .await;
    let SessionEvent::UserTranscript { text: first, .. } = last else {
        unreachable!()
    };
    assert!(
        heard_the_sentence(&first),
        "heard {first:?} for {SENTENCE:?}"
    );
    expect_event_within(PATIENCE, &mut events, "the agent's reply", |e| {
        matches!(e, SessionEvent::AgentText { .. })
    })
    .await;
    assert_eq!(heard.lock().unwrap().clone(), std::slice::from_ref(&first));
    let reply = tokio::time::timeout(PATIENCE, reply_audio.recv())
        .await
        .expect("the reply is spoken")
        .unwrap();
    assert!(!reply.is_empty());
    tokio::spawn(async move { while reply_audio.recv().await.is_some() {} });

    // Let the reply play out, then say something else.
    wait_until(PATIENCE, "the reply ends", || {
        matches!(session.state(), voice_backends::PipelineState::Listening)
    })
    .await;
    let other = padded(&speech("good morning").await);
    for frame in signal::frames(&other, 20) {
        session.process_audio(frame).await.unwrap();
    }
    wait_until(PATIENCE, "the second turn reaches the agent", || {
        heard.lock().unwrap().len() == 2
    })
    .await;
    // Partial transcripts came as the turns were heard (a cold decoder's
    // first pass may hear nothing until its second, so either turn).
    while let Some(e) = events.try_recv() {
        if let SessionEvent::UserTranscript {
            text,
            is_final: false,
        } = e
        {
            partials.push(text);
        }
    }
    assert!(
        partials.iter().any(|p| !p.trim().is_empty()),
        "partial transcripts came before the finals"
    );
    let second = heard.lock().unwrap()[1].clone();
    assert!(
        !heard_the_sentence(&second),
        "other words do not pass for {SENTENCE:?}: heard {second:?}"
    );
    session.stop().await.unwrap();
    backend.stop().await.unwrap();

    // Silence, straight to a stream of the same configuration: nothing.
    let (_, silent) = recognise(&json!({}), &signal::silence(Duration::from_secs(2))).await;
    assert!(!heard_the_sentence(&silent), "silence heard as {silent:?}");
}

/// A grammar narrows recognition to its sentences: the final is one of
/// them, word for word; the stream's decoder goes back to the pool when the
/// stream ends and the next stream of the configuration takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grammar_gives_its_sentence_and_decoders_are_reused() {
    let dir = tempfile::tempdir().unwrap();
    let grammar = dir.path().join("commands.gram");
    std::fs::write(
        &grammar,
        "#JSGF V1.0;\ngrammar commands;\npublic <command> = thank you | good morning | turn on the lights \
         | open the door | close the door | what time is it | hello there | yes please | no thanks ;\n",
    )
    .unwrap();
    let options = json!({ "grammar": grammar });
    let parsed = PocketSphinxOptions::from_value(&options).unwrap();
    let (_, first) = recognise(&options, &padded(&speech("thank you").await)).await;
    assert_eq!(first, "thank you");
    wait_until(PATIENCE, "the decoder back in the pool", || {
        pooled_decoders(&parsed) == 1
    })
    .await;
    let (_, again) = recognise(&options, &padded(&speech("yes please").await)).await;
    assert_eq!(again, "yes please");
    wait_until(PATIENCE, "one decoder served both streams", || {
        pooled_decoders(&parsed) == 1
    })
    .await;
}

// ---------------------------------------------------------------------------
// eSpeak NG's streaming

/// Twelve sentences: the first audio comes while at most a few are
/// rendered (the thread renders ahead only as far as the reply is taken),
/// and dropping the reply (a barge-in) stops the rendering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_reply_streams_clause_by_clause_and_stops_when_dropped() {
    let text = (1..=12)
        .map(|i| format!("This is sentence number {i} of a long reply."))
        .collect::<Vec<_>>()
        .join(" ");
    let whole = EspeakTts::new(EspeakOptions::default()).unwrap();
    let all = synthesize(&whole, &text, INTERNAL_FORMAT).await;
    let clauses = whole.clauses_rendered();
    assert!(clauses >= 12, "one clause per sentence at least: {clauses}");
    assert!(all.len() > 100, "{} frames", all.len());

    let tts = Arc::new(EspeakTts::new(EspeakOptions::default()).unwrap());
    let (tx, mut rx) = mpsc::channel(1);
    let reply = tokio::spawn({
        let tts = tts.clone();
        let text = text.clone();
        async move { tts.synthesize(&text, INTERNAL_FORMAT, &tx).await }
    });
    let first = tokio::time::timeout(PATIENCE, rx.recv())
        .await
        .expect("the first frame")
        .unwrap();
    assert_eq!(first, all[0], "the same audio, from its start");
    // However long we wait, rendering stays a few clauses ahead of what is
    // taken: the first audio did not wait for the whole reply.
    wait_until(PATIENCE, "rendering ahead", || tts.clauses_rendered() >= 2).await;
    let ahead = tts.clauses_rendered();
    assert!(ahead < clauses, "{ahead} of {clauses} clauses rendered");
    reply.abort();
    let _ = reply.await;
    wait_until(PATIENCE, "rendering stops", || tts.rendering() == 0).await;
    let rendered = tts.clauses_rendered();
    assert!(
        rendered <= ahead + 1,
        "a dropped reply stops within a clause: {rendered} rendered, {ahead} before the drop, {clauses} in all"
    );
}

/// Audio comes in the format asked for, in 20 ms frames; a longer text
/// lasts longer; speech starts at once, with no silence ahead of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audio_is_in_the_pipelines_format_and_lasts_as_long_as_the_text() {
    let tts = EspeakTts::new(EspeakOptions::default()).unwrap();
    let short = synthesize(&tts, "Hello.", INTERNAL_FORMAT).await;
    let long = synthesize(
        &tts,
        "Hello. This reply has a good many more words in it, and a second clause too.",
        INTERNAL_FORMAT,
    )
    .await;
    let duration =
        |frames: &[AudioFrame]| frames.iter().map(AudioFrame::duration).sum::<Duration>();
    assert!(
        duration(&long) > duration(&short) * 3,
        "{:?} vs {:?}",
        duration(&long),
        duration(&short)
    );
    for frames in [&short, &long] {
        let (last, whole) = frames.split_last().unwrap();
        assert!(whole.iter().all(|f| f.format() == INTERNAL_FORMAT && f.duration() == Duration::from_millis(20)));
        assert!(last.format() == INTERNAL_FORMAT && last.duration() <= Duration::from_millis(20));
    }
    let native = tts.synthesize_native("Hello.").unwrap();
    let at_16k = signal::samples_of(&short);
    let expected = native.len() * 16_000 / 22_050;
    assert!(
        at_16k.len().abs_diff(expected) <= 2,
        "{} samples for {expected}",
        at_16k.len()
    );
    let onset = at_16k
        .iter()
        .position(|s| s.unsigned_abs() > 1_000)
        .unwrap();
    assert!(
        onset < 16_000 / 50,
        "speech starts within 20 ms, at sample {onset}"
    );

    let stereo = AudioFormat::new(voice_backends::AudioEncoding::PcmS16Le, 48_000, 2);
    let frames = synthesize(&tts, "Hello.", stereo).await;
    assert!(frames.iter().all(|f| f.format() == stereo));
    let d = duration(&frames);
    assert!(
        d.abs_diff(duration(&short)) < Duration::from_millis(1),
        "{d:?}"
    );
}

// ---------------------------------------------------------------------------
// Options, checked when the backend is made

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_options_are_refused_when_the_backend_is_made() {
    let refused = |config: Config| async move {
        let err = registry().create("local", &config).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidConfig, "{err}");
        err
    };
    // The text-to-speech component's options, as the pipeline's plan
    // hands them over.
    let espeak = components().tts.get("espeak").unwrap();
    let tts_refused = |options: serde_json::Value| {
        let err = espeak.with_options(&options).err().unwrap();
        assert_eq!(err.code, ErrorCode::InvalidConfig, "{err}");
        err
    };
    let err = tts_refused(json!({"voice": "klingon"}));
    let voice = &err.details["components.espeak.voice"];
    assert!(
        voice.contains("klingon") && voice.contains("en-us"),
        "{voice}"
    );
    let err = tts_refused(json!({"speed": 2}));
    assert!(err.details.contains_key("components.espeak.speed"), "{err}");
    let err = tts_refused(json!({"rate": 1000}));
    assert!(err.details.contains_key("components.espeak.rate"), "{err}");
    let good = json!({"voice": "en-gb", "rate": 160, "pitch": 40, "volume": 120});
    let tts = espeak
        .with_options(&good)
        .unwrap()
        .expect("a configured synthesiser");
    assert!(
        !synthesize(&*tts, "Hello.", INTERNAL_FORMAT)
            .await
            .is_empty()
    );

    let err = refused(with_component(
        offline_config(),
        "pocketsphinx",
        json!({"model_dir": "/nonexistent/pocketsphinx/en-us"}),
    ))
    .await;
    assert!(names(&err, "components.pocketsphinx.model_dir"), "{err}");
    assert!(
        err.message.contains("apt install pocketsphinx-en-us"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let grammar = dir.path().join("broken.gram");
    std::fs::write(&grammar, "this is not JSGF").unwrap();
    let err = refused(with_component(
        offline_config(),
        "pocketsphinx",
        json!({"grammar": grammar}),
    ))
    .await;
    assert!(names(&err, "components.pocketsphinx.grammar"), "{err}");
    let err = refused(with_component(
        offline_config(),
        "pocketsphinx",
        json!({"lm": "x"}),
    ))
    .await;
    assert!(names(&err, "components.pocketsphinx.lm"), "{err}");

    // Good options make a backend.
    let good = with_component(
        offline_config(),
        "pocketsphinx",
        json!({"partial_every": "200ms"}),
    );
    registry().create("local", &good).await.unwrap();
}
