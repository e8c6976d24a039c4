//! The `pipecat` bridge's own cost per frame, on the Rust side: encoding a
//! 20 ms user frame (16 kHz PCM16) as a `pipecat.Frame`, decoding a 40 ms
//! reply frame from the bot (24 kHz PCM16, the size Pipecat's output
//! transport sends), converting that reply frame to the pipeline's 16 kHz,
//! and parsing an RTVI `user-transcription` message.
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

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
