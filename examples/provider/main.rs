//! A provider written on the connector kit, end to end: `acme.rs` is the
//! whole provider (its typed config, capabilities and wire protocol); this
//! file runs it against an in-process fake of the Acme speech service, and
//! its test runs the link conformance suite.
//!
//! ```sh
//! cargo run --example provider --features testing,link-websocket
//! ```

mod acme;

use std::time::Duration;

use serde_json::{Value, json};
use voice_backends::pipeline::events::SessionEvent;
use voice_backends::runtime::WsMessage;
use voice_backends::testing::link::{ClientSaid, FakeService, FakeWire};
use voice_backends::testing::signal;
use voice_backends::{AgentReply, Config, SessionConfig, agent_fn, registry};

/// The Acme service's side of the wire, for the fake.
#[derive(Clone)]
struct AcmeWire;

fn text(value: Value) -> WsMessage {
    WsMessage::Text(value.to_string().into())
}

impl FakeWire for AcmeWire {
    fn client_said(&self, message: &WsMessage) -> ClientSaid {
        let json = match message {
            WsMessage::Binary(pcm) => return ClientSaid::Audio(pcm.len()),
            WsMessage::Text(t) => serde_json::from_str::<Value>(t.as_str()).unwrap_or_default(),
            _ => return ClientSaid::Other,
        };
        match json["type"].as_str() {
            Some("hello") => ClientSaid::Greeting,
            Some("speak") => ClientSaid::Reply(json["text"].as_str().unwrap_or("").into()),
            Some("speak_end") => ClientSaid::ReplyEnd,
            Some("cancel") => ClientSaid::Cancel,
            Some("end_of_turn") => ClientSaid::EndOfTurn,
            _ => ClientSaid::Other,
        }
    }

    fn ready(&self) -> Vec<WsMessage> {
        vec![text(json!({"type": "ready"}))]
    }

    fn transcript(&self, words: &str, is_final: bool) -> WsMessage {
        text(json!({"type": "transcript", "text": words, "final": is_final}))
    }

    fn audio(&self, samples: &[i16], _rate: u32) -> WsMessage {
        WsMessage::Binary(samples.iter().flat_map(|s| s.to_le_bytes()).collect())
    }

    fn reply_done(&self) -> Vec<WsMessage> {
        vec![text(json!({"type": "done"}))]
    }

    fn interrupted(&self) -> Vec<WsMessage> {
        vec![text(json!({"type": "interrupted"}))]
    }

    fn malformed(&self) -> WsMessage {
        text(json!({"type": "no-such-message"}))
    }

    fn has_cancel(&self) -> bool {
        true
    }
}

/// An `acme` config for the service at `url`.
fn config(url: &str, api_key: Option<&str>) -> Config {
    let mut config = Config::new("acme");
    config.max_retries = 2;
    config.retry_delay = Duration::from_millis(100);
    config.provider_config.0.insert("url".into(), url.into());
    if let Some(key) = api_key {
        config
            .provider_config
            .0
            .insert("api_key".into(), key.into());
    }
    config
}

#[tokio::main]
async fn main() -> voice_backends::Result<()> {
    let service = FakeService::start(AcmeWire, Some("acme-key")).await;
    let backend = registry()
        .create("acme", &config(service.url(), Some("acme-key")))
        .await?;
    backend.start().await?;
    let session = backend.create_session(SessionConfig::new("ann")).await?;
    let mut events = session.events();
    let mut reply = session.receive_audio()?;
    session.set_agent(agent_fn(|turn| async move {
        Ok(AgentReply::text(format!("You said: {}", turn.transcript)))
    }));
    session.start().await?;
    println!("session {} published {:?}", session.id(), session.info());
    let speech = signal::utterance(Duration::from_millis(800), Duration::from_millis(900), 1);
    for frame in signal::frames(&speech, 20) {
        session.process_audio(frame).await?;
    }
    let mut reply_ms = 0;
    while reply_ms < 2_000 {
        tokio::select! {
            event = events.recv() => match event {
                Some(SessionEvent::UserTranscript { text, is_final: true }) => println!("user: {text}"),
                Some(SessionEvent::AgentText { text }) => println!("agent: {text}"),
                Some(_) => {}
                None => break,
            },
            frame = reply.recv() => match frame {
                Some(frame) => reply_ms += frame.duration().as_millis(),
                None => break,
            },
        }
    }
    println!(
        "heard {reply_ms} ms of reply audio; the service heard {} bytes",
        service.audio_bytes()
    );
    session.stop().await?;
    backend.stop().await
}

#[cfg(test)]
mod tests {
    use voice_backends::testing::link::{LinkHarness, link_conformance};

    use super::*;

    struct AcmeLink;

    impl LinkHarness for AcmeLink {
        type Wire = AcmeWire;

        fn wire(&self) -> AcmeWire {
            AcmeWire
        }

        fn config(&self, url: &str, token: Option<&str>) -> Config {
            config(url, token)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_acme_link_conforms() {
        link_conformance(&AcmeLink).await;
    }

    #[tokio::test]
    async fn a_bad_config_names_its_fields() {
        let mut bad = config("http://acme", None);
        bad.provider_config
            .0
            .insert("sample_rate".into(), 100.into());
        let err = registry().create("acme", &bad).await.err().unwrap();
        assert!(err.to_string().contains("provider_config.url"), "{err}");
        assert!(
            err.to_string().contains("provider_config.sample_rate"),
            "{err}"
        );
        let schema = registry().get_provider("acme").unwrap().config_schema();
        assert!(schema.has_property("api_key"));
    }
}
