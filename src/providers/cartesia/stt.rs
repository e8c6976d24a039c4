//! Cartesia's speech-to-text socket on the link kit: one connection per
//! session (`/stt/websocket`), the user's audio up as binary PCM, `finalize`
//! when the local turn detector ends the turn (answered by `flush_done`,
//! which ends the turn's transcript), `close` when the session ends
//! (answered by `done`). The same protocol serves the provider's link and
//! the `cartesia` speech-to-text component ([`CartesiaStt`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;

use super::CartesiaConfig;
use super::protocol::{self, CLOSE, FINALIZE, Heard, SttMessage, TurnText};
use crate::audio::{AudioEncoding, AudioFormat, AudioFrame};
use crate::error::{BackendError, ErrorCode, Result};
use crate::pipeline::{SpeechToText, SttEvent, SttStream};
use crate::runtime::{
    Dial, Link, LinkCounters, LinkEvent, LinkSettings, RetryPolicy, WebSocketLink, WireEvent,
    WireProtocol, WsMessage,
};

/// How messages name the service.
pub(super) const SERVICE: &str = "Cartesia's speech-to-text";

/// One session's side of the speech-to-text socket.
#[derive(Debug)]
pub(super) struct SttProtocol {
    sample_rate: u32,
    turn: TurnText,
}

impl SttProtocol {
    pub(super) fn new(sample_rate: u32) -> SttProtocol {
        SttProtocol {
            sample_rate,
            turn: TurnText::default(),
        }
    }
}

impl WireProtocol for SttProtocol {
    fn service(&self) -> &'static str {
        SERVICE
    }

    fn input_format(&self) -> AudioFormat {
        AudioFormat::new(AudioEncoding::PcmS16Le, self.sample_rate, 1)
    }

    fn encode_audio(&mut self, frame: AudioFrame) -> WsMessage {
        WsMessage::Binary(frame.into_data())
    }

    /// Replies are spoken on the text-to-speech socket, never here.
    fn encode_reply(&mut self, _text: &str) -> Vec<WsMessage> {
        Vec::new()
    }

    fn encode_end_of_turn(&mut self) -> Vec<WsMessage> {
        vec![WsMessage::Text(FINALIZE.into())]
    }

    fn farewell(&mut self) -> Vec<WsMessage> {
        vec![WsMessage::Text(CLOSE.into())]
    }

    fn decode(
        &mut self,
        message: WsMessage,
        out: &mut Vec<WireEvent>,
    ) -> std::result::Result<(), String> {
        let text = match message {
            WsMessage::Text(t) => t,
            WsMessage::Binary(b) => {
                return Err(format!(
                    "a {}-byte binary message (the service sends JSON text)",
                    b.len()
                ));
            }
            _ => return Ok(()),
        };
        let message = protocol::decode_stt(text.as_str())?;
        if let SttMessage::Error(e) = &message {
            out.push(WireEvent::Error(format!("{} [{}]", e.describe(), e.code())));
        }
        match self.turn.take(&message) {
            Some(Heard::Partial(text)) => out.push(WireEvent::UserTranscript {
                text,
                is_final: false,
            }),
            Some(Heard::Final(text)) => out.push(WireEvent::UserTranscript {
                text,
                is_final: true,
            }),
            None => {}
        }
        Ok(())
    }

    fn close_cause(&self, code: u16, reason: &str) -> Option<String> {
        // Cartesia closes with a policy code when the key or the concurrency
        // limit refuses the session mid-way.
        (code == 1008).then(|| format!("{SERVICE} refused the session (close code 1008: {reason})"))
    }
}

/// The dial of the speech-to-text socket for `config`: its URL, the key as
/// `Authorization: Bearer` and the `Cartesia-Version` header.
pub(super) fn dial(config: &CartesiaConfig) -> Dial {
    let stt = &config.stt;
    let url = protocol::stt_url(
        &config.base_url,
        &stt.model,
        stt.sample_rate,
        stt.language.as_deref(),
        stt.min_volume,
        stt.max_silence_duration_secs,
    );
    config.headers(Dial::new(url))
}

/// Opens one session's speech-to-text link.
pub(super) async fn open(
    config: &CartesiaConfig,
    settings: LinkSettings,
    counters: Arc<LinkCounters>,
) -> Result<Link> {
    WebSocketLink::open(SttProtocol::new(config.stt.sample_rate), settings, counters).await
}

/// The `cartesia` speech-to-text component (`stt_provider = "cartesia"`),
/// configured by `[components.cartesia]` (the shape of the provider's
/// `provider_config`): each session's stream is its own speech-to-text
/// socket, told of each turn's end with `finalize`.
#[derive(Debug, Default)]
pub struct CartesiaStt {
    counters: Arc<LinkCounters>,
    streams: AtomicU64,
}

impl CartesiaStt {
    /// The counters of every stream's socket (messages sent, received,
    /// malformed, dropped, reconnects).
    pub fn counters(&self) -> &LinkCounters {
        &self.counters
    }
}

/// How a component's socket retries and waits, with no backend config to
/// take it from.
pub(super) const COMPONENT_RETRY: RetryPolicy = RetryPolicy {
    max_retries: 3,
    retry_delay: Duration::from_millis(500),
    timeout: Duration::from_secs(10),
};

impl SpeechToText for CartesiaStt {
    fn open(
        &self,
        options: &serde_json::Value,
        events: mpsc::Sender<SttEvent>,
    ) -> Result<Box<dyn SttStream>> {
        let config = CartesiaConfig::from_component_options(options)?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            BackendError::new(
                "cartesia.stt_open",
                ErrorCode::PipelineError,
                "the cartesia speech-to-text component needs a Tokio runtime",
            )
        })?;
        let n = self.streams.fetch_add(1, Ordering::Relaxed) + 1;
        let settings = LinkSettings {
            dial: dial(&config),
            session_id: format!("cartesia-stt-{n}"),
            retry: COMPONENT_RETRY,
            reply_timeout: COMPONENT_RETRY.timeout,
            keepalive: None,
            metrics: None,
            fallbacks: None,
        };
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let failed = Arc::new(std::sync::Mutex::new(None));
        runtime.spawn(run_stream(
            config,
            settings,
            self.counters.clone(),
            rx,
            events,
            failed.clone(),
        ));
        Ok(Box::new(Stream {
            tx,
            failed,
            counters: self.counters.clone(),
        }))
    }

    fn check_options(&self, options: &serde_json::Value) -> Result<()> {
        CartesiaConfig::from_component_options(options).map(drop)
    }
}

/// Why a component stream's socket failed for good.
type Failed = Arc<std::sync::Mutex<Option<(ErrorCode, String)>>>;

/// Frames waiting for a stream's socket: ten seconds of 20 ms audio.
const STREAM_QUEUE: usize = 512;

enum Command {
    Audio(AudioFrame),
    EndTurn,
}

/// One session's stream: what the session sends goes to the stream's task.
struct Stream {
    tx: mpsc::Sender<Command>,
    failed: Failed,
    counters: Arc<LinkCounters>,
}

impl Stream {
    fn send(&self, op: &'static str, command: Command) -> Result<()> {
        if let Some((code, message)) = self
            .failed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
        {
            return Err(BackendError::new(op, code, message));
        }
        match self.tx.try_send(command) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(BackendError::new(
                op,
                ErrorCode::ConnectionFailed,
                format!("the stream to {SERVICE} has ended"),
            )),
        }
    }
}

impl SttStream for Stream {
    fn push_audio(&mut self, frame: &AudioFrame) -> Result<()> {
        self.send("cartesia.stt_push_audio", Command::Audio(frame.clone()))
    }

    fn end_turn(&mut self) -> Result<()> {
        self.send("cartesia.stt_end_turn", Command::EndTurn)
    }
}

/// A component stream's task: opens the socket (under the retry policy),
/// then carries the session's audio and turn ends to it and its transcripts
/// back, until the session drops the stream (the socket then says `close`).
async fn run_stream(
    config: CartesiaConfig,
    settings: LinkSettings,
    counters: Arc<LinkCounters>,
    mut commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<SttEvent>,
    failed: Failed,
) {
    let fail = |e: BackendError| {
        tracing::warn!(code = %e.code, "{SERVICE}: {}", e.message);
        *failed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((e.code, format!("{SERVICE} is lost: {}", e.message)));
    };
    let retry = settings.retry;
    let opened = retry
        .run(
            "cartesia.stt_open",
            SERVICE,
            || open(&config, settings.clone(), counters.clone()),
            |retry, delay, e| {
                tracing::warn!(
                    retry,
                    "connecting to {SERVICE} failed, retrying in {delay:?}: {}",
                    e.message
                );
            },
        )
        .await;
    let mut link = match opened {
        Ok(Link::Service(link)) => link,
        Ok(Link::Media(_)) => return,
        Err(e) => return fail(e),
    };
    loop {
        tokio::select! {
            command = commands.recv() => {
                let done = match command {
                    Some(Command::Audio(frame)) => link.input.push_audio(&frame),
                    Some(Command::EndTurn) => link.input.end_turn(),
                    None => return,
                };
                if let Err(e) = done {
                    return fail(e);
                }
            }
            event = link.events.recv() => match event {
                Some(LinkEvent::UserTranscript { text, is_final }) => {
                    let event = if is_final { SttEvent::Final(text) } else { SttEvent::Partial(text) };
                    if events.send(event).await.is_err() {
                        return;
                    }
                }
                Some(LinkEvent::Failed { code, message }) => {
                    return fail(BackendError::new("cartesia.stt", code, message));
                }
                Some(_) => {}
                None => return,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(p: &mut SttProtocol, text: &str) -> std::result::Result<Vec<WireEvent>, String> {
        let mut out = Vec::new();
        p.decode(WsMessage::Text(text.into()), &mut out)
            .map(|()| out)
    }

    #[test]
    fn flush_done_ends_the_turn_with_its_final_pieces() {
        let mut p = SttProtocol::new(16_000);
        let e = decode(
            &mut p,
            r#"{"type":"transcript","is_final":true,"text":"Hello ","request_id":"r"}"#,
        )
        .unwrap();
        assert!(
            matches!(&e[..], [WireEvent::UserTranscript { text, is_final: false }] if text == "Hello")
        );
        let e = decode(
            &mut p,
            r#"{"type":"transcript","is_final":true,"text":"world.","request_id":"r"}"#,
        )
        .unwrap();
        assert!(matches!(
            &e[..],
            [WireEvent::UserTranscript {
                is_final: false,
                ..
            }]
        ));
        let e = decode(&mut p, r#"{"type":"flush_done","request_id":"r"}"#).unwrap();
        assert!(
            matches!(&e[..], [WireEvent::UserTranscript { text, is_final: true }] if text == "Hello world.")
        );
        assert!(
            decode(&mut p, r#"{"type":"done","request_id":"r"}"#)
                .unwrap()
                .is_empty()
        );
        let e = decode(
            &mut p,
            r#"{"type":"error","message":"bad","status_code":429,"title":"Limit"}"#,
        )
        .unwrap();
        assert!(matches!(&e[..], [WireEvent::Error(m)] if m.contains("rate_limit_exceeded")));
        assert!(decode(&mut p, "finalize").is_err());
        assert_eq!(
            p.encode_end_of_turn(),
            vec![WsMessage::Text(FINALIZE.into())]
        );
        assert_eq!(p.farewell(), vec![WsMessage::Text(CLOSE.into())]);
    }
}
