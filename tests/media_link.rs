#![cfg(feature = "testing")]
//! A session whose media goes through a media link (the way a room-based
//! provider carries it): the user's audio comes in from the link, the whole
//! pipeline runs in process, the reply goes out to the link, the session's
//! events go out to it for relaying, and the link's connection changes
//! reach the session's events.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio::time::timeout;
use voice_backends::pipeline::events::SessionEvent;
use voice_backends::runtime::{
    Connector, Link, LinkEvent, LinkEvents, LinkRequest, MediaLink, RuntimeBackend,
};
use voice_backends::testing::signal;
use voice_backends::{
    AudioFrame, Config, ConnectionState, PipelineType, ProviderCapabilities, SessionConfig,
    VoiceBackend,
};

const PATIENCE: Duration = Duration::from_secs(10);

/// The test's ends of a session's media link.
struct Ends {
    user: mpsc::Sender<AudioFrame>,
    reply: mpsc::Receiver<AudioFrame>,
    events: LinkEvents,
    relayed: mpsc::Receiver<SessionEvent>,
}

/// A connector whose sessions get a media link whose other ends the test
/// holds.
#[derive(Default)]
struct Room {
    ends: Mutex<Option<Ends>>,
}

#[async_trait]
impl Connector for Room {
    fn provider(&self) -> &str {
        "room"
    }
    fn capabilities(&self) -> ProviderCapabilities {
        ProviderCapabilities::default()
    }
    fn validate_config(&self, _: &Config) -> voice_backends::Result<()> {
        Ok(())
    }
    async fn connect(&self, _: &Config) -> voice_backends::Result<()> {
        Ok(())
    }
    async fn open_link(&self, request: LinkRequest<'_>) -> voice_backends::Result<Option<Link>> {
        let (user, audio_in) = mpsc::channel(64);
        let (audio_out, reply) = mpsc::channel(64);
        let (events, events_rx) = LinkEvents::channel(16);
        let (relay, relayed) = mpsc::channel(64);
        *self.ends.lock().unwrap() = Some(Ends {
            user,
            reply,
            events,
            relayed,
        });
        request.info.set("room", "room-1");
        Ok(Some(Link::Media(MediaLink {
            audio_in,
            audio_out,
            events: events_rx,
            session_events: Some(relay),
        })))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_runs_between_the_links_audio_in_and_out() {
    let mut config = Config::new("room");
    config.pipeline_type = PipelineType::S2s;
    config.s2s_provider = Some("echo".into());
    let room = Arc::new(Room::default());
    let backend = RuntimeBackend::new(room.clone(), &config).unwrap();
    backend.start().await.unwrap();
    let session = backend
        .create_session(SessionConfig::new("ann"))
        .await
        .unwrap();
    let Ends {
        user,
        mut reply,
        events: link,
        mut relayed,
    } = room.ends.lock().unwrap().take().expect("a link was opened");
    let mut events = session.events();
    assert_eq!(
        events.recv().await,
        Some(SessionEvent::Connection {
            state: ConnectionState::Connected
        }),
        "a subscriber hears the link's state first"
    );
    let err = session.receive_audio().unwrap_err();
    assert!(err.message.contains("media link"), "{err}");
    assert_eq!(session.info().get("room").as_deref(), Some("room-1"));
    session.start().await.unwrap();

    // The user speaks through the link; the echo comes back out of it.
    let speech = signal::utterance(Duration::from_millis(600), Duration::from_millis(900), 4);
    for frame in signal::frames(&speech, 20) {
        user.send(frame).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let first = timeout(PATIENCE, reply.recv())
        .await
        .expect("the reply comes out of the link")
        .expect("the link's reply channel is open");
    let mut heard = first.duration();
    while heard < Duration::from_millis(500) {
        let frame = timeout(PATIENCE, reply.recv()).await.unwrap().unwrap();
        heard += frame.duration();
    }
    assert!(
        signal::rms_dbfs(&signal::samples_of([&first])) > -60.0,
        "the reply is the echo of speech, not silence"
    );

    // The session's own events went to the link too, for it to relay: the
    // turn that made the reply among them.
    let relayed_turn = timeout(PATIENCE, async {
        while let Some(event) = relayed.recv().await {
            if matches!(event, SessionEvent::TurnEnded { turn: 1 }) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(
        relayed_turn,
        Ok(true),
        "the link hears the session's turn end"
    );

    // The link's connection changes reach the session's events.
    link.send(LinkEvent::Connection(ConnectionState::Reconnecting))
        .await;
    loop {
        let event = timeout(PATIENCE, events.recv()).await.unwrap().unwrap();
        if event
            == (SessionEvent::Connection {
                state: ConnectionState::Reconnecting,
            })
        {
            break;
        }
    }

    // Once the session stops, the link's reply channel ends.
    session.stop().await.unwrap();
    let ended = timeout(PATIENCE, async { while reply.recv().await.is_some() {} }).await;
    assert!(ended.is_ok(), "the reply channel ends with the session");
    let relay_ended = timeout(PATIENCE, async {
        let mut last = None;
        while let Some(event) = relayed.recv().await {
            last = Some(event);
        }
        last
    })
    .await;
    assert_eq!(
        relay_ended,
        Ok(Some(SessionEvent::Closed)),
        "the relay ends with the session's last event"
    );
    backend.stop().await.unwrap();
}
