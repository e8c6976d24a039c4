//! The `cartesia` provider's added latency, against the fake of Cartesia's
//! two WebSockets (`tests/cartesia_fake/`, on 127.0.0.1), and its decoders.
//!
//! One session speaks `TURNS` utterances (pushed faster than real time: the
//! turn detector runs on the audio clock); its agent answers each at once.
//! Per turn it records:
//!
//! - `end of turn -> first TTS request`: from the session's `TurnEnded`
//!   event to the fake receiving the reply's first generation request (the
//!   link's `finalize`, the fake's transcript and `flush_done`, the engine,
//!   the agent, the speaker and the shared socket);
//! - of which `flush_done -> first TTS request`: from the fake sending
//!   `flush_done` to the request arriving: everything on our side once the
//!   transcript is complete;
//! - `first TTS chunk -> first reply frame out`: from the fake sending the
//!   context's first `chunk` to the first reply frame reaching the session's
//!   `receive_audio` (decoding, conversion, the engine's playout).
//!
//! and prints each one's median, quartiles and maximum. Criterion then
//! times decoding a 40 ms chunk and a transcript event.
//!
//! `cargo bench --features cartesia,testing --bench cartesia`

use std::hint::black_box;
use std::time::Duration;

use base64::Engine as _;
use criterion::Criterion;
use serde_json::json;
use tokio::time::{Instant, timeout};
use voice_backends::pipeline::events::SessionEvent;
use voice_backends::providers::cartesia::protocol;
use voice_backends::testing::conformance::speak;
use voice_backends::{AgentReply, Config, SessionConfig, agent_fn, registry};

#[path = "../tests/cartesia_fake/mod.rs"]
mod cartesia_fake;

const TURNS: usize = 60;
const KEY: &str = "sk_car_bench_key_0123456789";

fn summary(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    println!(
        "cartesia/{name}: median {:.3} ms (quartiles {:.3} to {:.3} ms, max {:.3} ms, {} turns)",
        at(0.5).as_secs_f64() * 1e3,
        at(0.25).as_secs_f64() * 1e3,
        at(0.75).as_secs_f64() * 1e3,
        at(1.0).as_secs_f64() * 1e3,
        samples.len()
    );
}

async fn latencies() {
    let fake = cartesia_fake::FakeCartesia::start(KEY).await;
    *fake.state.pace.lock().unwrap() = Duration::ZERO;
    let mut config = Config::new("cartesia");
    config.provider_config.0 = json!({
        "api_key": KEY,
        "base_url": fake.base_url,
        "tts": { "voice_id": "6ccbfb76-1fc6-48f7-b71d-91ac6298247b" },
    })
    .as_object()
    .cloned()
    .unwrap();
    let backend = registry().create("cartesia", &config).await.unwrap();
    backend.start().await.unwrap();
    let agent = agent_fn(|_| async { Ok(AgentReply::text("Okay.")) });
    let session = backend
        .create_session(SessionConfig::new("bench").with_agent(agent))
        .await
        .unwrap();
    let mut events = session.events();
    let mut audio = session.receive_audio().unwrap();
    session.start().await.unwrap();
    let (mut to_request, mut after_flush, mut to_frame) = (Vec::new(), Vec::new(), Vec::new());
    let patience = Duration::from_secs(10);
    for turn in 0..TURNS + 3 {
        let requests_before = fake.state.tts_requests.lock().unwrap().len();
        speak(
            &*session,
            Duration::from_millis(600),
            Duration::from_millis(900),
            turn as u64,
            Duration::ZERO,
        )
        .await;
        let ended = loop {
            match timeout(patience, events.recv()).await {
                Ok(Some(SessionEvent::TurnEnded { .. })) => break Instant::now(),
                Ok(Some(_)) => {}
                other => panic!("no turn end: {other:?}"),
            }
        };
        let frame = timeout(patience, audio.recv())
            .await
            .expect("reply audio")
            .expect("reply audio");
        let frame_at = Instant::now();
        drop(frame);
        // The rest of the reply, and back to listening.
        loop {
            match timeout(patience, events.recv()).await {
                Ok(Some(SessionEvent::State {
                    to: voice_backends::PipelineState::Listening,
                    ..
                })) => break,
                Ok(Some(_)) => {}
                other => panic!("no end of reply: {other:?}"),
            }
        }
        while audio.try_recv().is_some() {}
        let requests = fake.state.tts_requests.lock().unwrap().clone();
        let (request_at, context) = requests
            .iter()
            .skip(requests_before)
            .find(|(_, v)| v["transcript"] == "Okay.")
            .map(|(t, v)| (*t, v["context_id"].as_str().unwrap().to_owned()))
            .expect("the reply's request");
        let flush_done = fake
            .state
            .stt_times
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|(_, what)| *what == "flush_done")
            .map(|(t, _)| *t)
            .expect("flush_done");
        let chunk_at = fake.state.first_chunks.lock().unwrap()[&context];
        if turn >= 3 {
            to_request.push(request_at.saturating_duration_since(ended));
            after_flush.push(request_at - flush_done);
            to_frame.push(frame_at - chunk_at);
        }
    }
    summary("end_of_turn_to_first_tts_request", to_request);
    summary("flush_done_to_first_tts_request", after_flush);
    summary("first_tts_chunk_to_first_reply_frame", to_frame);
    backend.stop().await.unwrap();
}

fn decoders(c: &mut Criterion) {
    let pcm = vec![7u8; 1_280];
    let chunk = json!({
        "type": "chunk", "context_id": "sess_1-1", "status_code": 206, "done": false,
        "step_time": 1.0, "flush_id": 1,
        "data": base64::engine::general_purpose::STANDARD.encode(&pcm),
    })
    .to_string();
    c.bench_function("cartesia/decode_tts_chunk_40ms_16k", |b| {
        b.iter(|| black_box(protocol::decode_tts(black_box(&chunk)).unwrap()))
    });
    let transcript = json!({
        "type": "transcript", "is_final": true, "text": "Hello there, how are you today?",
        "request_id": "r", "duration": 1.2,
    })
    .to_string();
    c.bench_function("cartesia/decode_stt_transcript", |b| {
        b.iter(|| black_box(protocol::decode_stt(black_box(&transcript)).unwrap()))
    });
}

fn main() {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(latencies());
    let mut c = Criterion::default().configure_from_args();
    decoders(&mut c);
    c.final_summary();
}
