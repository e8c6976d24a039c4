//! The contracts' value types, hooks and audio frames.

use std::time::Duration;

use voice_backends::hooks::sort_processors;
use voice_backends::{
    AgentReply, AgentTurn, AudioEncoding, AudioFormat, AudioFrame, AudioProcessor, BackendProvider,
    ConnectionState, ErrorCode, Health, HealthStatus, PipelineState, RateLimiter,
    TokenBucketLimiter, VoiceBackend, VoiceSession, agent_fn,
};

#[test]
fn contracts_are_object_safe_and_shareable() {
    fn shareable<T: ?Sized + Send + Sync>() {}
    shareable::<dyn BackendProvider>();
    shareable::<dyn VoiceBackend>();
    shareable::<dyn VoiceSession>();
    shareable::<dyn voice_backends::AuthHook>();
    shareable::<dyn voice_backends::RateLimiter>();
    shareable::<dyn voice_backends::DataRetentionHook>();
    shareable::<dyn voice_backends::Agent>();
}

#[test]
fn state_names() {
    assert_eq!(
        [
            ConnectionState::Disconnected,
            ConnectionState::Connecting,
            ConnectionState::Connected,
            ConnectionState::Reconnecting,
            ConnectionState::Error
        ]
        .map(|s| s.as_str()),
        [
            "disconnected",
            "connecting",
            "connected",
            "reconnecting",
            "error"
        ]
    );
    assert_eq!(
        [
            PipelineState::Idle,
            PipelineState::Listening,
            PipelineState::Processing,
            PipelineState::Speaking,
            PipelineState::Error
        ]
        .map(|s| s.to_string()),
        ["idle", "listening", "processing", "speaking", "error"]
    );
    assert_eq!(ConnectionState::default(), ConnectionState::Disconnected);
    assert_eq!(PipelineState::default(), PipelineState::Idle);
}

#[test]
fn health_status_serializes_verdict_details_and_time() {
    let h = HealthStatus::new(Health::Degraded).with_detail("link", "reconnecting");
    assert!(!h.is_healthy());
    let v = serde_json::to_value(&h).unwrap();
    assert_eq!(v["status"], "degraded");
    assert_eq!(v["details"]["link"], "reconnecting");
    let t = v["last_check"].as_str().unwrap();
    assert!(t.ends_with('Z') && t.contains('T'), "RFC 3339: {t}");
    assert!(Health::Healthy < Health::Degraded && Health::Degraded < Health::Unhealthy);
}

#[tokio::test]
async fn agent_callbacks_answer_turns() {
    let agent = agent_fn(|turn: AgentTurn| async move {
        if turn.transcript.is_empty() {
            Err(voice_backends::BackendError::new(
                "agent",
                ErrorCode::AgentError,
                "nothing heard",
            ))
        } else {
            Ok(AgentReply::text(format!(
                "{} #{}",
                turn.transcript.to_uppercase(),
                turn.turn
            )))
        }
    });
    let reply = agent
        .respond(AgentTurn::new("s1", "u1", "hello", 3))
        .await
        .unwrap();
    assert_eq!(reply.text, "HELLO #3");
    let err = agent
        .respond(AgentTurn::new("s1", "u1", "", 4))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code, ErrorCode::AgentError);
}

#[test]
fn audio_frames_must_fit_their_format() {
    let f = AudioFormat::PCM16_16K_MONO;
    let frame = AudioFrame::new(f, vec![0u8; 640]).unwrap();
    assert_eq!(frame.sample_frames(), 320);
    assert_eq!(frame.duration(), Duration::from_millis(20));
    assert_eq!(f.bytes_for(Duration::from_millis(20)), 640);

    let err = AudioFrame::new(f, vec![0u8; 641]).err().unwrap();
    assert_eq!(err.code, ErrorCode::PipelineError);
    assert!(err.message.contains("641 bytes"), "{err}");

    let stereo_f32 = AudioFormat::new(AudioEncoding::PcmF32Le, 48_000, 2);
    assert!(AudioFrame::new(stereo_f32, vec![0u8; 12]).is_err());
    assert_eq!(
        AudioFrame::new(stereo_f32, vec![0u8; 16])
            .unwrap()
            .sample_frames(),
        2
    );

    assert!(AudioFrame::new(AudioFormat::new(AudioEncoding::Mulaw, 0, 1), vec![0u8; 8]).is_err());
    assert!(AudioFrame::new(AudioFormat::new(AudioEncoding::Alaw, 8000, 0), vec![0u8; 8]).is_err());
    let frame = AudioFrame::from_i16(16_000, 1, &[1, -2]).unwrap();
    assert_eq!(&frame.data()[..], &[1, 0, 0xfe, 0xff]);
}

struct Tag(&'static str, i32);
impl AudioProcessor for Tag {
    fn name(&self) -> &str {
        self.0
    }
    fn order(&self) -> i32 {
        self.1
    }
    fn process(&mut self, frame: AudioFrame) -> voice_backends::Result<AudioFrame> {
        Ok(frame)
    }
}

#[test]
fn processors_run_lower_order_first_keeping_ties_in_order() {
    let mut ps: Vec<Box<dyn AudioProcessor>> = vec![
        Box::new(Tag("c", 10)),
        Box::new(Tag("a", -5)),
        Box::new(Tag("b1", 0)),
        Box::new(Tag("b2", 0)),
    ];
    sort_processors(&mut ps);
    let names: Vec<&str> = ps.iter().map(|p| p.name()).collect();
    assert_eq!(names, ["a", "b1", "b2", "c"]);
}

#[tokio::test(start_paused = true)]
async fn token_bucket_allows_the_burst_then_the_rate() {
    let limiter = TokenBucketLimiter::new(2.0, 3).unwrap();
    for _ in 0..3 {
        limiter.check("alice").await.unwrap();
    }
    let err = limiter.check("alice").await.err().unwrap();
    assert_eq!(err.code, ErrorCode::RateLimitExceeded);
    assert!(err.is_retryable());
    assert_eq!(err.details["retry_after_ms"], "500");
    // Another key has its own bucket.
    limiter.check("bob").await.unwrap();
    // Half a second refills one unit at 2/s.
    tokio::time::advance(Duration::from_millis(500)).await;
    limiter.check("alice").await.unwrap();
    assert!(limiter.check("alice").await.is_err());
    // Refill never exceeds the burst.
    tokio::time::advance(Duration::from_secs(60)).await;
    for _ in 0..3 {
        limiter.check("alice").await.unwrap();
    }
    assert!(limiter.check("alice").await.is_err());
}

#[tokio::test(start_paused = true)]
async fn token_bucket_memory_is_bounded_and_keeps_busy_keys() {
    let limiter = TokenBucketLimiter::with_max_keys(1.0, 2, 160).unwrap();
    // A busy key: its bucket is empty.
    limiter.check("busy").await.unwrap();
    limiter.check("busy").await.unwrap();
    for i in 0..1_000 {
        limiter.check(&format!("drive-by-{i}")).await.unwrap();
    }
    assert!(
        limiter.tracked_keys() <= 160,
        "bounded: {}",
        limiter.tracked_keys()
    );
    // The busy key was not evicted in favour of a fresh full bucket.
    assert!(limiter.check("busy").await.is_err());
}

#[tokio::test]
async fn token_bucket_with_a_tiny_rate_refuses_with_the_longest_wait() {
    // One unit per 1e20 s: the wait does not fit a `Duration`.
    let limiter = TokenBucketLimiter::new(1e-20, 1).unwrap();
    limiter.check("alice").await.unwrap();
    let err = limiter.check("alice").await.err().unwrap();
    assert_eq!(err.code, ErrorCode::RateLimitExceeded);
    let wait: u128 = err.details["retry_after_ms"].parse().unwrap();
    assert_eq!(wait, Duration::MAX.as_millis());
    assert_eq!(
        limiter.try_take_at("alice", 1, tokio::time::Instant::now()),
        Err(Duration::MAX)
    );
}

#[test]
fn token_bucket_refuses_nonsense_parameters() {
    for (rate, burst) in [
        (0.0, 1),
        (-1.0, 1),
        (f64::NAN, 1),
        (f64::INFINITY, 1),
        (1.0, 0),
    ] {
        let err = TokenBucketLimiter::new(rate, burst).err().unwrap();
        assert_eq!(err.code, ErrorCode::InvalidConfig, "{rate} {burst}");
    }
}

#[test]
fn session_events_serialize_as_tagged_json_with_latencies_in_ms() {
    use voice_backends::pipeline::events::{SessionEvent, TurnLatency};
    let e = SessionEvent::State {
        from: PipelineState::Listening,
        to: PipelineState::Processing,
    };
    assert_eq!(
        serde_json::to_value(&e).unwrap(),
        serde_json::json!({"type": "state", "from": "listening", "to": "processing"})
    );
    let l = SessionEvent::Latency(TurnLatency {
        turn: 2,
        endpointing: Duration::from_millis(500),
        stt: None,
        agent: Some(Duration::from_micros(1500)),
        tts_first_audio: None,
        first_audio: Duration::from_millis(120),
        preemptive: None,
    });
    let v = serde_json::to_value(&l).unwrap();
    assert_eq!(v["type"], "latency");
    assert_eq!(v["turn"], 2);
    assert_eq!(v["endpointing_ms"], 500.0);
    assert_eq!(v["agent_ms"], 1.5);
    assert!(v["stt_ms"].is_null());
    assert_eq!(v["first_audio_ms"], 120.0);
    let err = SessionEvent::Error {
        code: ErrorCode::AgentError,
        message: "boom".into(),
    };
    assert_eq!(
        serde_json::to_value(&err).unwrap(),
        serde_json::json!({"type": "error", "code": "agent_error", "message": "boom"})
    );
}
