//! Sessions whose media goes through a [`MediaLink`]: the user's audio comes
//! in from the provider's service, the session's reply audio goes out to it,
//! and the pipeline runs in process between them.

use std::sync::{Arc, Weak};

use super::{LinkEvent, MediaLink, RuntimeSession};
use crate::error::Result;
use crate::session::VoiceSession;
use crate::session::events::SessionEvent;

/// Carries `session`'s media through `link` until either ends: one task
/// feeds the link's user audio to the session (and its connection changes
/// to the session's events), another sends the session's reply audio to the
/// link.
pub(super) fn carry(session: &Arc<RuntimeSession>, link: MediaLink) -> Result<()> {
    let MediaLink {
        mut audio_in,
        audio_out,
        mut events,
        session_events,
    } = link;
    let mut reply = session.engine.take_receiver()?;
    let weak: Weak<RuntimeSession> = Arc::downgrade(session);
    let span = tracing::info_span!("media_link", session_id = %session.id);
    if let Some(relay) = session_events {
        // A subscription taken now, before the session can emit anything
        // the link should relay; it ends with the session's `Closed`.
        let mut subscription = session.events();
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                while let Some(event) = subscription.recv().await {
                    let last = event == SessionEvent::Closed;
                    if relay.send(event).await.is_err() || last {
                        return;
                    }
                }
            },
            span.clone(),
        ));
    }
    tokio::spawn(tracing::Instrument::instrument(
        async move {
            let mut failing = false;
            loop {
                tokio::select! {
                    frame = audio_in.recv() => {
                        let Some(frame) = frame else { return };
                        let Some(session) = weak.upgrade() else { return };
                        match session.process_audio(frame).await {
                            Ok(()) => failing = false,
                            Err(e) if session.engine.ended().borrow().to_owned() => {
                                tracing::debug!("the session ended: {}", e.message);
                                return;
                            }
                            Err(e) => {
                                if !failing {
                                    failing = true;
                                    tracing::warn!(code = %e.code, "the media link's audio was refused: {}", e.message);
                                }
                            }
                        }
                    }
                    event = events.recv() => {
                        let Some(session) = weak.upgrade() else { return };
                        match event {
                            Some(LinkEvent::Connection(state)) => session.engine.link_state(state),
                            Some(LinkEvent::Failed { code, message }) => {
                                session.engine.link_failed(code, message);
                            }
                            Some(_) => {}
                            None => return,
                        }
                    }
                }
            }
        },
        span.clone(),
    ));
    tokio::spawn(tracing::Instrument::instrument(
        async move {
            while let Some(frame) = reply.recv().await {
                if audio_out.send(frame).await.is_err() {
                    return;
                }
            }
        },
        span,
    ));
    Ok(())
}
