//! A conversation with the built-in `local` backend, no keys, no models:
//! loads a config, opens a session with an agent, sends text, then speaks
//! (a synthetic voice) and gets the echoed turn back with its latency.
//!
//! ```sh
//! cargo run --example quickstart
//! ```

use std::time::Duration;

use voice_backends::{
    AgentReply, AudioFrame, Config, SessionConfig, SessionEvent, agent_fn, registry,
};

const CONFIG: &str = r#"
provider = "local"
pipeline_type = "s2s"
s2s_provider = "echo"        # replays each finished user turn
vad_provider = "energy"
turn_detection_provider = "silence"
latency_target = "300ms"

[components.silence]
min_endpointing_delay = "400ms"
"#;

/// 16 kHz mono PCM: a voiced, syllable-modulated tone, then silence.
fn synthetic_utterance(speech_ms: u32, pause_ms: u32) -> Vec<i16> {
    let rate = 16_000.0;
    let speech = (speech_ms * 16) as usize;
    let mut out: Vec<i16> = (0..speech)
        .map(|i| {
            let t = i as f32 / rate;
            let envelope = 0.5 - 0.5 * (2.0 * std::f32::consts::PI * 4.0 * t).cos();
            let voice: f32 = (1..=5)
                .map(|h| (2.0 * std::f32::consts::PI * 150.0 * h as f32 * t).sin() / h as f32)
                .sum();
            (voice * envelope * 3000.0) as i16
        })
        .collect();
    out.extend(std::iter::repeat_n(0, (pause_ms * 16) as usize));
    out
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = Config::from_toml_str(CONFIG)?;
    let backend = registry().create(&config.provider, &config).await?;
    backend.start().await?;
    println!(
        "backend {} is {}",
        backend.provider(),
        backend.connection_state()
    );

    let agent =
        agent_fn(
            |turn| async move { Ok(AgentReply::text(format!("You said: {}", turn.transcript))) },
        );
    let session = backend
        .create_session(SessionConfig::new("demo-user").with_agent(agent))
        .await?;
    let mut events = session.events();
    let mut audio_out = session.receive_audio()?;
    session.start().await?;

    session.send_text("hello there").await?;

    let samples = synthetic_utterance(1200, 800);
    for chunk in samples.chunks(320) {
        session
            .process_audio(AudioFrame::from_i16(16_000, 1, chunk)?)
            .await?;
        tokio::time::sleep(Duration::from_millis(20)).await; // real time
    }

    let mut echoed = Duration::ZERO;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
    while let Ok(Some(frame)) = tokio::time::timeout_at(deadline, audio_out.recv()).await {
        echoed += frame.duration();
    }
    while let Some(event) = events.try_recv() {
        match event {
            SessionEvent::AgentText { text } => println!("agent: {text}"),
            SessionEvent::TurnEnded { turn } => println!("turn {turn} ended"),
            SessionEvent::Latency(l) => {
                println!(
                    "turn {} first reply audio after {:?}",
                    l.turn, l.first_audio
                )
            }
            SessionEvent::Interrupted { turn } => println!("turn {turn} interrupted"),
            _ => {}
        }
    }
    println!("received {echoed:?} of reply audio");
    backend.stop().await?;
    Ok(())
}
