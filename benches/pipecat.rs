//! The `pipecat` bridge's own cost per frame, on the Rust side: encoding a
//! 20 ms user frame (16 kHz PCM16) as a `pipecat.Frame`, decoding a 40 ms
//! reply frame from the bot (24 kHz PCM16, the size Pipecat's output
//! transport sends), converting that reply frame to the pipeline's 16 kHz,
//! and parsing an RTVI `user-transcription` message.
//!
//! With `VOICE_BACKENDS_PIPECAT_PYTHON` set to the venv `scripts/pipecat-venv`
//! makes, it also measures a turn's round trip against a real Pipecat bot
//! (the FastAPI transport, stand-in TTS), twice in the same run:
//!
//! - `roundtrip/raw_websocket`: a bare WebSocket client sends a `text` frame
//!   and waits for the first reply audio frame: the bot's own time;
//! - `roundtrip/through_the_library`: `send_text` on a `pipecat` session whose
//!   agent answers at once, until the first reply frame reaches the session's
//!   audio receiver: the bot's time plus everything this crate adds (engine,
//!   agent call, link, decoding, conversion, playout).
//!
//! Criterion runs the two one after the other. The bridge's added latency
//! per turn is then measured paired (`roundtrip/paired`, printed after them):
//! after a warm-up of both, raw and library turns alternate, and the report
//! gives each path's median turn, the median of the per-pair differences
//! (library minus raw) and a 95 % bootstrap interval of that median.
//!
//! `cargo bench --features pipecat --bench pipecat`

use std::f64::consts::PI;
use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use voice_backends::audio::{AudioConverter, AudioFormat, f32_to_i16};
use voice_backends::providers::pipecat::{proto, rtvi};

fn tone(rate: u32, ms: u32) -> Vec<u8> {
    let n = (rate * ms / 1000) as usize;
    (0..n)
        .flat_map(|i| {
            let t = i as f64 / f64::from(rate);
            f32_to_i16((0.3 * (2.0 * PI * 440.0 * t).sin()) as f32).to_le_bytes()
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let user = Bytes::from(tone(16_000, 20));
    c.bench_function("pipecat/encode_user_audio_20ms_16k", |b| {
        b.iter(|| black_box(proto::encode_audio(black_box(user.clone()), 16_000, 1)))
    });

    let reply = Bytes::from(proto::encode_audio(
        Bytes::from(tone(24_000, 40)),
        24_000,
        1,
    ));
    c.bench_function("pipecat/decode_bot_audio_40ms_24k", |b| {
        b.iter(|| black_box(proto::decode(black_box(reply.clone())).unwrap()))
    });

    let proto::Inbound::Audio(frame) = proto::decode(reply.clone()).unwrap() else {
        unreachable!()
    };
    let mut converter = AudioConverter::new(frame.format(), AudioFormat::PCM16_16K_MONO).unwrap();
    for _ in 0..3 {
        converter.convert(&frame).unwrap();
    }
    c.bench_function("pipecat/convert_bot_audio_40ms_24k_to_16k", |b| {
        b.iter(|| black_box(converter.convert(black_box(&frame)).unwrap()))
    });

    let mut converter = AudioConverter::new(frame.format(), AudioFormat::PCM16_16K_MONO).unwrap();
    c.bench_function("pipecat/decode_and_convert_bot_audio_40ms", |b| {
        b.iter(|| {
            let proto::Inbound::Audio(f) = proto::decode(black_box(reply.clone())).unwrap() else {
                unreachable!()
            };
            black_box(converter.convert(&f).unwrap())
        })
    });

    let transcript = Bytes::from(proto::encode_message(
        r#"{"label":"rtvi-ai","type":"user-transcription","data":{"text":"heard 800 ms of speech","user_id":"caller","timestamp":"2026-11-26T00:00:00.000+00:00","final":true}}"#
            .to_owned(),
    ));
    c.bench_function("pipecat/decode_rtvi_transcription", |b| {
        b.iter(|| {
            let proto::Inbound::Message(json) =
                proto::decode(black_box(transcript.clone())).unwrap()
            else {
                unreachable!()
            };
            black_box(rtvi::parse(&json).unwrap())
        })
    });
}

#[path = "../tests/pipecat_bot/launch.rs"]
mod launch;

mod roundtrip {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use criterion::Criterion;
    use futures_util::{SinkExt, StreamExt};
    use tokio::runtime::Runtime;
    use tokio_tungstenite::tungstenite::Message;
    use voice_backends::pipeline::events::SessionEvent;
    use voice_backends::providers::pipecat::{proto, rtvi};
    use voice_backends::{
        AgentReply, AudioReceiver, Config, PipelineState, SessionConfig, VoiceBackend,
        VoiceSession, agent_fn, registry,
    };

    use super::launch::{Bot, Transport, python};

    const TEXT: &str = "hello there";

    type Ws = tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >;

    async fn raw_client(url: &str) -> Ws {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("{url}?session=raw"))
            .await
            .unwrap();
        let ready = proto::encode_message(rtvi::client_ready("bench"));
        ws.send(Message::Binary(ready.into())).await.unwrap();
        wait_for(&mut ws, |ev| ev == rtvi::RtviEvent::BotReady).await;
        ws
    }

    async fn wait_for(ws: &mut Ws, mut want: impl FnMut(rtvi::RtviEvent) -> bool) {
        while let Some(Ok(msg)) = ws.next().await {
            if let Message::Binary(b) = msg
                && let Ok(proto::Inbound::Message(json)) = proto::decode(b)
                && let Ok(Some(ev)) = rtvi::parse(&json)
                && want(ev)
            {
                return;
            }
        }
        panic!("the bot went away");
    }

    /// One raw turn: text out, time to the first audio frame back.
    async fn raw_turn(ws: &mut Ws) -> Duration {
        let start = Instant::now();
        ws.send(Message::Binary(proto::encode_text(TEXT).into()))
            .await
            .unwrap();
        let took = loop {
            match ws.next().await {
                Some(Ok(Message::Binary(b))) => {
                    if let Ok(proto::Inbound::Audio(_)) = proto::decode(Bytes::clone(&b)) {
                        break start.elapsed();
                    }
                }
                Some(Ok(_)) => {}
                _ => panic!("the bot went away"),
            }
        };
        wait_for(ws, |ev| ev == rtvi::RtviEvent::BotStoppedSpeaking).await;
        took
    }

    struct Library {
        _backend: Arc<dyn VoiceBackend>,
        session: Arc<dyn VoiceSession>,
        audio: AudioReceiver,
        events: voice_backends::pipeline::events::SessionEvents,
    }

    async fn library_session(url: &str) -> Library {
        let mut config = Config::new("pipecat");
        config.provider_config.0.insert(
            "url_template".into(),
            format!("{url}?session={{session_id}}").into(),
        );
        let backend = registry().create("pipecat", &config).await.unwrap();
        backend.start().await.unwrap();
        let agent = agent_fn(|turn| async move { Ok(AgentReply::text(turn.transcript)) });
        let session = backend
            .create_session(SessionConfig::new("bench").with_agent(agent))
            .await
            .unwrap();
        let events = session.events();
        let audio = session.receive_audio().unwrap();
        session.start().await.unwrap();
        Library {
            _backend: backend,
            session,
            audio,
            events,
        }
    }

    /// One turn through the library: `send_text` to the first reply frame.
    async fn library_turn(lib: &mut Library) -> Duration {
        let start = Instant::now();
        lib.session.send_text(TEXT).await.unwrap();
        lib.audio.recv().await.expect("reply audio");
        let took = start.elapsed();
        loop {
            match lib.events.recv().await {
                Some(SessionEvent::State {
                    to: PipelineState::Listening,
                    ..
                }) => break,
                Some(_) => {}
                None => panic!("the session closed"),
            }
        }
        while lib.audio.try_recv().is_some() {}
        took
    }

    pub fn bench(c: &mut Criterion) {
        if python().is_none() {
            eprintln!(
                "roundtrip: skipped (set VOICE_BACKENDS_PIPECAT_PYTHON to run it against a real bot)"
            );
            return;
        }
        let bot = Bot::start(Transport::FastApi, 0, false);
        let rt = Runtime::new().unwrap();
        let mut ws = rt.block_on(raw_client(&bot.url));
        let mut lib = rt.block_on(library_session(&bot.url));
        let mut group = c.benchmark_group("pipecat/roundtrip");
        group.sample_size(10);
        group.bench_function("raw_websocket", |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        total += raw_turn(&mut ws).await;
                    }
                    total
                })
            })
        });
        group.bench_function("through_the_library", |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        total += library_turn(&mut lib).await;
                    }
                    total
                })
            })
        });
        group.finish();
        rt.block_on(paired(&mut ws, &mut lib));
    }

    /// Turns alternated between the two paths, after a warm-up of each.
    const PAIRS: usize = 200;
    const WARM_UP: usize = 20;

    async fn paired(ws: &mut Ws, lib: &mut Library) {
        for _ in 0..WARM_UP {
            raw_turn(ws).await;
            library_turn(lib).await;
        }
        let (mut raw, mut through, mut diff) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..PAIRS {
            // Which path goes first alternates too.
            let (r, l) = if i % 2 == 0 {
                let r = raw_turn(ws).await;
                (r, library_turn(lib).await)
            } else {
                let l = library_turn(lib).await;
                (raw_turn(ws).await, l)
            };
            let (r, l) = (r.as_secs_f64() * 1e3, l.as_secs_f64() * 1e3);
            raw.push(r);
            through.push(l);
            diff.push(l - r);
        }
        let (low, high) = bootstrap_median(&diff, 2000);
        println!(
            "pipecat/roundtrip/paired: {PAIRS} pairs; median turn raw {:.2} ms, through the \
             library {:.2} ms; library minus raw: median {:+.2} ms (95 % bootstrap interval \
             {low:+.2} to {high:+.2} ms)",
            median(&mut raw),
            median(&mut through),
            median(&mut diff.clone()),
        );
    }

    fn median(values: &mut [f64]) -> f64 {
        values.sort_by(f64::total_cmp);
        let n = values.len();
        if n % 2 == 1 {
            values[n / 2]
        } else {
            (values[n / 2 - 1] + values[n / 2]) / 2.0
        }
    }

    /// The 2.5th and 97.5th percentiles of the median over `rounds`
    /// resamples (with replacement) of `values`.
    fn bootstrap_median(values: &[f64], rounds: usize) -> (f64, f64) {
        // A fixed-seed xorshift: the interval is the same for the same data.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut medians: Vec<f64> = (0..rounds)
            .map(|_| {
                let mut sample: Vec<f64> = (0..values.len())
                    .map(|_| values[(next() % values.len() as u64) as usize])
                    .collect();
                median(&mut sample)
            })
            .collect();
        medians.sort_by(f64::total_cmp);
        let at = |q: f64| medians[((rounds - 1) as f64 * q).round() as usize];
        (at(0.025), at(0.975))
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench
}
criterion_group! {
    name = roundtrips;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(10));
    targets = roundtrip::bench
}
criterion_main!(benches, roundtrips);
