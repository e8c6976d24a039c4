//! Per-frame overhead of the input path: `session.process_audio(frame)` on a
//! started `local` session (energy VAD, silence turn detection, echo S2S) with
//! K = 0, 1, 5, 10 pass-through audio processors, plus K = 0 with 48 kHz input
//! resampled to the internal 16 kHz at the edge.
//!
//! Frames are 20 ms of speech-like audio cycling through pre-generated
//! utterances (speech, then silence), so VAD and turn detection do real work
//! and turns end (each turn hands its audio to the echo model, which replies;
//! the next utterance barges in on the reply). One criterion iteration is one
//! frame, so the reported time is the time per frame.
//!
//! The session's own task, the echo model's reply task and a task draining
//! the session's output audio and events run on a second tokio worker thread;
//! the measured thread only calls `process_audio` back to back (pushing far
//! faster than real time). The runtime is a multi-thread runtime with one
//! worker: `block_on` runs the measured loop on the bench thread.
//!
//! Reference (Pipecat 1.14 on the same machine, same shape, measured when
//! the goal was set; not re-run here): 55, 77, 150 and
//! 240 us per frame for K = 0, 1, 5, 10; the goal is 50x lower (about 1.1,
//! 1.5, 3 and 4.8 us).
//!
//! Run: `cargo bench --features testing --bench pipeline`

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use voice_backends::audio::AudioFrame;
use voice_backends::hooks::AudioProcessor;
use voice_backends::pipeline::{ProcessorFactory, components};
use voice_backends::testing::signal;
use voice_backends::{
    AudioEncoding, AudioFormat, Config, PipelineType, ProcessorConfig, SessionConfig, VoiceBackend,
    VoiceSession, registry,
};

/// The processor counts measured.
const KS: [usize; 4] = [0, 1, 5, 10];
/// The most processors any case uses ("pass-0" .. "pass-9").
const MAX_K: usize = 10;

/// A processor handing every frame on unchanged.
struct Pass {
    name: String,
    order: i32,
}

impl AudioProcessor for Pass {
    fn name(&self) -> &str {
        &self.name
    }

    fn order(&self) -> i32 {
        self.order
    }

    fn process(&mut self, frame: AudioFrame) -> voice_backends::Result<AudioFrame> {
        Ok(frame)
    }
}

struct PassFactory(&'static str);

impl ProcessorFactory for PassFactory {
    fn create(
        &self,
        _options: &serde_json::Value,
        order: i32,
    ) -> voice_backends::Result<Box<dyn AudioProcessor>> {
        Ok(Box::new(Pass {
            name: self.0.to_owned(),
            order,
        }))
    }
}

/// Registers "pass-0" .. "pass-9" (the config forbids duplicate names).
fn register_pass_processors() -> Vec<&'static str> {
    (0..MAX_K)
        .map(|i| {
            let name: &'static str = Box::leak(format!("pass-{i}").into_boxed_str());
            components()
                .processor
                .register(name, Arc::new(PassFactory(name)));
            name
        })
        .collect()
}

/// Utterances (speech then silence) of a few lengths, as 16 kHz samples.
fn utterances() -> Vec<i16> {
    let mut audio = Vec::new();
    for (i, (speech_ms, pause_ms)) in [(1200, 900), (800, 1100), (1600, 800), (1000, 1000)]
        .into_iter()
        .enumerate()
    {
        audio.extend(signal::utterance(
            Duration::from_millis(speech_ms),
            Duration::from_millis(pause_ms),
            i as u64 + 1,
        ));
    }
    audio
}

/// `samples` (16 kHz) as 48 kHz 20 ms frames, by linear interpolation.
fn frames_48k(samples: &[i16]) -> Vec<AudioFrame> {
    let mut up = Vec::with_capacity(samples.len() * 3);
    for (i, &s) in samples.iter().enumerate() {
        let next = samples.get(i + 1).copied().unwrap_or(s);
        let (a, b) = (i32::from(s), i32::from(next));
        up.push(s);
        up.push((a + (b - a) / 3) as i16);
        up.push((a + 2 * (b - a) / 3) as i16);
    }
    up.chunks(960)
        .map(|c| AudioFrame::from_i16(48_000, 1, c).expect("48 kHz mono frame"))
        .collect()
}

/// A started `local` echo session with `k` pass-through processors, and a
/// task draining its output audio and events.
async fn open_session(
    k: usize,
    names: &[&'static str],
    input: AudioFormat,
) -> (Arc<dyn VoiceBackend>, Arc<dyn VoiceSession>) {
    let mut config = Config::new("local");
    config.pipeline_type = PipelineType::S2s;
    config.s2s_provider = Some("echo".into());
    // Stopping waits for the reply in flight at most this long.
    config.timeout = Duration::from_secs(1);
    config.processors = names[..k]
        .iter()
        .enumerate()
        .map(|(i, name)| ProcessorConfig {
            name: (*name).to_owned(),
            order: i as i32,
            options: serde_json::Value::Object(serde_json::Map::new()),
        })
        .collect();
    let backend = registry().create("local", &config).await.expect("backend");
    backend.start().await.expect("backend start");
    let session = backend
        .create_session(SessionConfig::new("bench").with_input_format(input))
        .await
        .expect("session");
    let mut events = session.events();
    let mut rx = session.receive_audio().expect("receiver");
    session.start().await.expect("session start");
    tokio::spawn(async move {
        let mut audio_open = true;
        let mut events_open = true;
        while audio_open || events_open {
            tokio::select! {
                f = rx.recv(), if audio_open => audio_open = f.is_some(),
                e = events.recv(), if events_open => events_open = e.is_some(),
            }
        }
    });
    (backend, session)
}

fn bench_pipeline(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_time()
        .build()
        .expect("tokio runtime");
    let names = register_pass_processors();
    let samples = utterances();
    let frames_16k = signal::frames(&samples, 20);
    let frames_48k = frames_48k(&samples);
    let pcm48 = AudioFormat::new(AudioEncoding::PcmS16Le, 48_000, 1);

    let mut cases: Vec<(String, usize, AudioFormat, &[AudioFrame])> = KS
        .iter()
        .map(|&k| {
            (
                format!("16k/{k}"),
                k,
                AudioFormat::PCM16_16K_MONO,
                &frames_16k[..],
            )
        })
        .collect();
    cases.push(("48k-resampled/0".into(), 0, pcm48, &frames_48k[..]));

    let mut group = c.benchmark_group("process_audio");
    group.throughput(Throughput::Elements(1));
    for (label, k, format, frames) in cases {
        let (backend, session) = rt.block_on(open_session(k, &names, format));
        let mut next = 0usize;
        group.bench_function(BenchmarkId::from_parameter(&label), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let frame = frames[next].clone();
                        next = if next + 1 == frames.len() {
                            0
                        } else {
                            next + 1
                        };
                        black_box(session.process_audio(frame).await).expect("process_audio");
                    }
                    start.elapsed()
                })
            })
        });
        rt.block_on(async {
            backend.stop().await.expect("backend stop");
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench_pipeline
}
criterion_main!(benches);
