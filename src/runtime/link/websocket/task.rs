//! The link's task: owns the protocol and the connection, writes what the
//! session sends, reads the service, and reconnects.

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;

use super::connect::{close_cause, describe};
use super::endpoints::{ENDPOINT_STAGE, connect_any};
use super::session::{Outbound, Shared, SpeakerMsg};
use super::*;
use crate::audio::{AudioFrame, FormatFollower};
use crate::backend::ConnectionState;
use crate::error::BackendError;
use crate::pipeline::INTERNAL_FORMAT;

/// Why the connection ended.
pub(super) enum Ended {
    /// The session is gone: close and stop.
    SessionGone,
    /// The service went away: reconnect.
    Lost(String),
    /// The service ended the session ([`WireEvent::Ended`]): close, and stop.
    ByService(String),
}

/// The link's task: owns the protocol and the connection.
pub(super) struct Task<P> {
    pub(super) protocol: P,
    pub(super) settings: LinkSettings,
    pub(super) shared: Arc<Shared>,
    pub(super) events: LinkEvents,
    /// Converts the service's audio to where it goes.
    pub(super) converter: FormatFollower,
    pub(super) logged_malformed: bool,
    /// Messages of the reply in flight kept through a reconnect, written
    /// first on the new connection.
    pub(super) resend: Vec<WsMessage>,
    /// What the last message decoded into (kept for its allocation).
    pub(super) decoded: Vec<WireEvent>,
    /// Set when the service ended the session ([`WireEvent::Ended`]).
    pub(super) ended: Option<String>,
    /// The endpoint connected to: 0 for [`LinkSettings::dial`], then the
    /// fallbacks.
    pub(super) endpoint: usize,
}

impl<P: WireProtocol> Task<P> {
    pub(super) async fn run(
        mut self,
        mut ws: Ws,
        mut out: mpsc::Receiver<Outbound>,
        early: Vec<WsMessage>,
    ) {
        for message in early {
            self.on_message(message).await;
        }
        loop {
            let ended = match self.ended.take() {
                // The service ended the session in what it said first.
                Some(why) => Ended::ByService(why),
                None => self.serve(&mut ws, &mut out).await,
            };
            match ended {
                Ended::SessionGone => {
                    self.farewell(&mut ws).await;
                    let _ = tokio::time::timeout(CLOSE_WAIT, ws.close(None)).await;
                    return;
                }
                Ended::ByService(why) => {
                    self.ended_by_service(why).await;
                    let _ = tokio::time::timeout(CLOSE_WAIT, ws.close(None)).await;
                    return;
                }
                Ended::Lost(cause) => {
                    tracing::warn!(endpoint = %self.settings.endpoint_name(self.endpoint), "lost {}: {cause}", self.protocol.service());
                    match self.reconnect(&cause, &mut out).await {
                        Some(new) => ws = new,
                        None => return,
                    }
                }
            }
        }
    }

    /// Sends the protocol's farewell, if it has one, and waits (at most
    /// [`CLOSE_WAIT`]) for the service to finish and close.
    async fn farewell(&mut self, ws: &mut Ws) {
        let farewell = self.protocol.farewell();
        if farewell.is_empty() || self.write(ws, farewell).await.is_err() {
            return;
        }
        let _ = tokio::time::timeout(CLOSE_WAIT, async {
            while let Some(Ok(message)) = ws.next().await {
                if message.is_close() {
                    return;
                }
                self.shared
                    .counters
                    .received
                    .fetch_add(1, Ordering::Relaxed);
            }
        })
        .await;
    }

    /// Encodes one outbound message.
    pub(super) fn encode(&mut self, message: Outbound, into: &mut Vec<WsMessage>) {
        match message {
            Outbound::Audio(frame) => into.push(self.protocol.encode_audio(frame)),
            Outbound::Reply { text, .. } => into.extend(self.protocol.encode_reply(&text)),
            Outbound::ReplyEnd { .. } => into.extend(self.protocol.encode_reply_end()),
            Outbound::Cancel => into.extend(self.protocol.encode_cancel()),
            Outbound::EndOfTurn => into.extend(self.protocol.encode_end_of_turn()),
        }
    }

    /// Carries messages both ways until one side ends.
    pub(super) async fn serve(&mut self, ws: &mut Ws, out: &mut mpsc::Receiver<Outbound>) -> Ended {
        if !self.resend.is_empty() {
            let batch = std::mem::take(&mut self.resend);
            if let Err(ended) = self.write(ws, batch).await {
                return ended;
            }
        }
        let keepalive = self.settings.keepalive;
        let idle = tokio::time::sleep(keepalive.unwrap_or(Duration::MAX));
        tokio::pin!(idle);
        loop {
            tokio::select! {
                biased;
                () = self.events.closed() => return Ended::SessionGone,
                msg = ws.next() => match msg {
                    Some(Ok(WsMessage::Close(frame))) => {
                        return Ended::Lost(close_cause(&self.protocol, frame.as_ref()));
                    }
                    Some(Ok(m @ (WsMessage::Text(_) | WsMessage::Binary(_)))) => {
                        self.on_message(m).await;
                        if let Some(why) = self.ended.take() {
                            return Ended::ByService(why);
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Ended::Lost(describe(&e)),
                    None => return Ended::Lost("the connection ended".into()),
                },
                next = out.recv() => {
                    let Some(first) = next else { return Ended::SessionGone };
                    let mut batch = Vec::new();
                    self.encode(first, &mut batch);
                    while let Ok(more) = out.try_recv() {
                        self.encode(more, &mut batch);
                    }
                    if let Err(ended) = self.write(ws, batch).await {
                        return ended;
                    }
                    if let Some(every) = keepalive {
                        idle.as_mut().reset(tokio::time::Instant::now() + every);
                    }
                }
                () = &mut idle, if keepalive.is_some() => {
                    if let Err(ended) = self.write(ws, vec![WsMessage::Ping(Default::default())]).await {
                        return ended;
                    }
                    if let Some(every) = keepalive {
                        idle.as_mut().reset(tokio::time::Instant::now() + every);
                    }
                }
            }
        }
    }

    /// Writes `batch` within the reply timeout and counts it. A service that
    /// stops reading (a stalled process) would hold the link, and the
    /// session's stop, for as long as TCP keeps trying: after the timeout it
    /// counts as lost.
    pub(super) async fn write(
        &mut self,
        ws: &mut Ws,
        batch: Vec<WsMessage>,
    ) -> std::result::Result<(), Ended> {
        if batch.is_empty() {
            return Ok(());
        }
        let n = batch.len() as u64;
        let write = async {
            for message in batch {
                ws.feed(message).await?;
            }
            ws.flush().await
        };
        let patience = self.shared.reply_timeout;
        match tokio::time::timeout(patience, write).await {
            Ok(Ok(())) => {
                self.shared.counters.sent.fetch_add(n, Ordering::Relaxed);
                Ok(())
            }
            Ok(Err(e)) => Err(Ended::Lost(describe(&e))),
            Err(_) => Err(Ended::Lost(format!(
                "it took nothing for {}",
                humantime::format_duration(patience)
            ))),
        }
    }

    /// Reconnects under the retry policy; `None` when the session is gone
    /// or every attempt failed (then the session hears `Failed`).
    pub(super) async fn reconnect(
        &mut self,
        cause: &str,
        out: &mut mpsc::Receiver<Outbound>,
    ) -> Option<Ws> {
        if let Some(sink) = self.shared.sink().take() {
            let _ = sink.tx.try_send(SpeakerMsg::Failed(cause.to_owned()));
        }
        self.emit(LinkEvent::Connection(ConnectionState::Reconnecting))
            .await;
        let service = self.protocol.service();
        let retry = self.settings.retry;
        let outcome = {
            let (protocol, settings, counters) =
                (&mut self.protocol, &self.settings, &self.shared.counters);
            let protocol = tokio::sync::Mutex::new(protocol);
            let attempt = || async {
                let mut protocol = protocol.lock().await;
                let connected = connect_any(&mut **protocol, settings, counters).await?;
                // What the service said before it was ready is of no reply
                // in flight.
                counters
                    .received
                    .fetch_add(connected.early.len() as u64, Ordering::Relaxed);
                Ok::<_, BackendError>(connected)
            };
            tokio::select! {
                () = self.events.closed() => return None,
                r = retry.run("link.reconnect", service, attempt, |retry, delay, e| {
                    tracing::warn!(retry, "reconnecting to {service} failed, retrying in {delay:?}: {}", e.message);
                }) => r,
            }
        };
        match outcome {
            Ok(connected) => {
                let from = self.endpoint;
                let switch = connected.switch_from(from);
                let (ws, endpoint) = (connected.ws, connected.endpoint);
                self.endpoint = endpoint;
                if from == endpoint {
                    tracing::info!(endpoint = %self.settings.endpoint_name(endpoint), "reconnected to {service}");
                } else {
                    tracing::info!(
                        endpoint = %self.settings.endpoint_name(endpoint),
                        from = %self.settings.endpoint_name(from),
                        "reconnected to {service} at another endpoint"
                    );
                }
                self.shared
                    .counters
                    .reconnects
                    .fetch_add(1, Ordering::Relaxed);
                // Audio queued while the service was away is stale: drop it.
                // The text of the reply in flight (one the agent made while
                // the link was reconnecting) goes first; a reply that already
                // failed with the old connection is dropped, as are barge-ins
                // and turn ends of the time away.
                let current = self.shared.sink().as_ref().map(|s| s.id);
                while let Ok(message) = out.try_recv() {
                    match message {
                        Outbound::Audio(_) => self.shared.counters.dropped_input(),
                        m @ (Outbound::Reply { reply, .. } | Outbound::ReplyEnd { reply })
                            if Some(reply) == current =>
                        {
                            let mut encoded = std::mem::take(&mut self.resend);
                            self.encode(m, &mut encoded);
                            self.resend = encoded;
                        }
                        _ => {}
                    }
                }
                self.emit(LinkEvent::Connection(ConnectionState::Connected))
                    .await;
                if let Some(reason) = switch {
                    let event = LinkEvent::EndpointSwitched {
                        from: self.settings.endpoint_name(from).to_owned(),
                        to: self.settings.endpoint_name(endpoint).to_owned(),
                        reason,
                    };
                    self.emit(event).await;
                }
                Some(ws)
            }
            Err(e) => {
                let why = format!("{cause}; {}", e.message);
                *self
                    .shared
                    .failed
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(why.clone());
                self.shared.is_failed.store(true, Ordering::Release);
                let message = format!(
                    "lost {service} at {}: {why}",
                    self.settings.endpoint_name(self.endpoint)
                );
                self.emit(LinkEvent::Failed {
                    code: e.code,
                    message,
                })
                .await;
                None
            }
        }
    }

    /// The service ended the session: the reply in flight fails, the link
    /// counts as lost for good, and the session hears why.
    async fn ended_by_service(&mut self, why: String) {
        if let Some(sink) = self.shared.sink().take() {
            let _ = sink.tx.try_send(SpeakerMsg::Failed(why.clone()));
        }
        let message = format!("{} ended the session: {why}", self.protocol.service());
        tracing::info!(endpoint = %self.settings.endpoint_name(self.endpoint), "{message}");
        *self
            .shared
            .failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(message.clone());
        self.shared.is_failed.store(true, Ordering::Release);
        self.emit(LinkEvent::Failed {
            code: crate::error::ErrorCode::ConnectionFailed,
            message,
        })
        .await;
    }

    /// Counts a user turn the endpoint served (its final transcript), when
    /// the link has fallbacks (`pipeline_component_served_total{stage="provider"}`).
    fn served(&self) {
        if let (Some(f), Some(metrics)) = (&self.settings.fallbacks, &self.settings.metrics) {
            metrics.component_served(ENDPOINT_STAGE, f.endpoints.name(self.endpoint));
        }
    }

    pub(super) fn on_malformed(&mut self, what: &str) {
        self.shared
            .counters
            .malformed
            .fetch_add(1, Ordering::Relaxed);
        if !self.logged_malformed {
            self.logged_malformed = true;
            tracing::warn!(endpoint = %self.settings.endpoint_name(self.endpoint), "skipping a message from {}: {what} (further ones are only counted)", self.protocol.service());
        }
    }

    /// Hands `event` to the session's task ([`LinkEvents::send`]), counting
    /// dropped audio. A session that is gone is seen by `serve` next.
    pub(super) async fn emit(&mut self, event: LinkEvent) {
        let handed = self.events.send(event).await;
        self.count(handed);
    }

    pub(super) fn count(&self, handed: Handed) {
        if handed == Handed::Dropped {
            self.shared.counters.dropped_output();
        }
    }

    pub(super) async fn on_message(&mut self, message: WsMessage) {
        self.shared
            .counters
            .received
            .fetch_add(1, Ordering::Relaxed);
        let mut decoded = std::mem::take(&mut self.decoded);
        decoded.clear();
        if let Err(what) = self.protocol.decode(message, &mut decoded) {
            self.on_malformed(&what);
        }
        for event in decoded.drain(..) {
            self.on_event(event).await;
        }
        self.decoded = decoded;
    }

    pub(super) async fn on_event(&mut self, event: WireEvent) {
        match event {
            WireEvent::Ready => {}
            WireEvent::UserTranscript { text, is_final } => {
                if is_final {
                    self.served();
                }
                self.emit(LinkEvent::UserTranscript { text, is_final })
                    .await;
            }
            WireEvent::ServiceText(text) => {
                // While the service speaks the agent's text, the agent's
                // text is already in the session's events.
                let speaking = self.shared.sink().is_some();
                if !speaking {
                    self.emit(LinkEvent::ServiceText(text)).await;
                }
            }
            WireEvent::Audio(frame) => self.on_audio(frame),
            WireEvent::SpeakingStopped => {
                let ended_unasked = {
                    let mut sink = self.shared.sink();
                    match sink.as_ref() {
                        Some(s) if s.heard => {
                            let _ = s.tx.try_send(SpeakerMsg::Done);
                            *sink = None;
                            false
                        }
                        // Not this reply's end: it has not started speaking yet.
                        Some(_) => false,
                        None => true,
                    }
                };
                if ended_unasked {
                    self.emit(LinkEvent::ReplyDone).await;
                }
            }
            WireEvent::Interrupted => {
                self.shared.sink().take();
                self.emit(LinkEvent::Interrupted).await;
            }
            WireEvent::Error(message) => {
                tracing::warn!(endpoint = %self.settings.endpoint_name(self.endpoint), "{} reports an error: {message}", self.protocol.service());
            }
            WireEvent::Ended(why) => {
                // The first reason wins; `serve` ends the connection next.
                self.ended.get_or_insert(why);
            }
        }
    }

    pub(super) fn on_audio(&mut self, frame: AudioFrame) {
        let mut sink = self.shared.sink();
        let to = sink.as_ref().map_or(INTERNAL_FORMAT, |s| s.format);
        let frame = match self.converter.convert(frame, to) {
            Ok(f) => f,
            Err(e) => {
                drop(sink);
                self.on_malformed(&format!("audio that cannot be converted: {}", e.message));
                return;
            }
        };
        let Some(frame) = frame else { return };
        match sink.as_mut() {
            Some(s) => {
                s.heard = true;
                if s.tx.try_send(SpeakerMsg::Audio(frame)).is_err() {
                    self.shared.counters.dropped_output();
                }
            }
            None => {
                drop(sink);
                let handed = self.events.audio(frame);
                self.count(handed);
            }
        }
    }
}
