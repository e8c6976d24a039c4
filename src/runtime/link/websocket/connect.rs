//! Dialing a service and waiting for it to be ready.

use std::sync::atomic::Ordering;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, http::HeaderValue};

use super::*;
use crate::error::{BackendError, ErrorCode, Result};

/// Dials once.
pub(super) async fn dial(d: &Dial, service: &str) -> Result<Ws> {
    const OP: &str = "link.connect";
    // wss:// uses rustls with ring; an application that installed its own
    // provider keeps it (this then does nothing).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut request = d.url.as_str().into_client_request().map_err(|e| {
        BackendError::invalid_config(
            OP,
            format!("the URL of {service} is not usable: {}", describe(&e)),
        )
    })?;
    for (name, value) in &d.headers {
        let value = HeaderValue::from_str(value.expose()).map_err(|_| {
            BackendError::invalid_config(
                OP,
                format!("the {name} header for {service} holds characters a header cannot carry"),
            )
        })?;
        request.headers_mut().insert(*name, value);
    }
    let config = WebSocketConfig::default()
        .max_message_size(Some(d.max_message))
        .max_frame_size(Some(d.max_message));
    let (ws, _) = tokio_tungstenite::connect_async_with_config(request, Some(config), true)
        .await
        .map_err(|e| {
            let code = match &e {
                tungstenite::Error::Http(r) if matches!(r.status().as_u16(), 401 | 403) => {
                    ErrorCode::AuthenticationFailed
                }
                tungstenite::Error::Http(r) if r.status().as_u16() == 429 => {
                    ErrorCode::RateLimitExceeded
                }
                tungstenite::Error::Url(_) => ErrorCode::InvalidConfig,
                _ => ErrorCode::ConnectionFailed,
            };
            BackendError::new(
                OP,
                code,
                format!(
                    "could not reach {service} at {}: {}",
                    d.endpoint,
                    describe(&e)
                ),
            )
        })?;
    Ok(ws)
}

/// An error's description without the URL (which may hold credentials).
pub(super) fn describe(e: &tungstenite::Error) -> String {
    match e {
        tungstenite::Error::Io(io) => io.to_string(),
        tungstenite::Error::Http(r) => format!("it answered HTTP {}", r.status()),
        tungstenite::Error::Url(tungstenite::error::UrlError::TlsFeatureNotEnabled) => {
            "wss:// needs TLS, which this build does not include; use ws://".into()
        }
        tungstenite::Error::Url(u) => u.to_string(),
        other => other.to_string(),
    }
}

/// Why a close frame ended the connection.
pub(super) fn close_cause<P: WireProtocol>(protocol: &P, frame: Option<&CloseFrame>) -> String {
    let Some(f) = frame else {
        return format!("{} closed the connection", protocol.service());
    };
    let code = u16::from(f.code);
    if let Some(cause) = protocol.close_cause(code, &f.reason) {
        return cause;
    }
    let reason = if f.reason.is_empty() {
        String::new()
    } else {
        format!(": {}", f.reason)
    };
    format!(
        "{} closed the connection (code {code}{reason})",
        protocol.service()
    )
}

/// Dials, greets and waits for the service to be ready; what it said first
/// is returned for the link to handle.
///
/// `target` is the endpoint to dial (the settings' own, or a fallback);
/// `bound`, when set, is how long its handshake may take.
pub(super) async fn connect<P: WireProtocol>(
    protocol: &mut P,
    settings: &LinkSettings,
    target: &Dial,
    bound: Option<std::time::Duration>,
    counters: &LinkCounters,
) -> Result<(Ws, Vec<WsMessage>)> {
    let service = protocol.service();
    let mut ws = match bound {
        None => dial(target, service).await?,
        Some(bound) => tokio::time::timeout(bound, dial(target, service))
            .await
            .map_err(|_| super::endpoints::dial_timed_out(service, &target.endpoint, bound))??,
    };
    let refused = |cause: String| {
        BackendError::new(
            "link.connect",
            ErrorCode::ConnectionFailed,
            format!("{service} at {}: {cause}", target.endpoint),
        )
    };
    let greeting = protocol.greeting(&settings.session_id);
    let greeted = greeting.len() as u64;
    for message in greeting {
        ws.feed(message).await.map_err(|e| {
            refused(format!(
                "it dropped the connection at once: {}",
                describe(&e)
            ))
        })?;
    }
    ws.flush().await.map_err(|e| {
        refused(format!(
            "it dropped the connection at once: {}",
            describe(&e)
        ))
    })?;
    counters.sent.fetch_add(greeted, Ordering::Relaxed);
    let Some(wait) = protocol.ready_wait() else {
        return Ok((ws, Vec::new()));
    };
    let deadline = tokio::time::Instant::now() + wait;
    let mut early = Vec::new();
    let (mut early_bytes, mut dropped_early) = (0, false);
    let mut decoded = Vec::new();
    loop {
        let message = match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Ok((ws, early)),
            Ok(Some(Ok(WsMessage::Close(frame)))) => {
                return Err(refused(close_cause(protocol, frame.as_ref())));
            }
            Ok(Some(Ok(m @ (WsMessage::Text(_) | WsMessage::Binary(_))))) => m,
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => return Err(refused(describe(&e))),
            Ok(None) => return Err(refused("the connection ended".into())),
        };
        decoded.clear();
        let ready = protocol.decode(message.clone(), &mut decoded).is_ok()
            && decoded.iter().any(|e| matches!(e, WireEvent::Ready));
        if ready {
            counters.received.fetch_add(1, Ordering::Relaxed);
            return Ok((ws, early));
        }
        if early_bytes + message.len() <= MAX_EARLY_BYTES {
            early_bytes += message.len();
            early.push(message);
            continue;
        }
        counters.received.fetch_add(1, Ordering::Relaxed);
        if !dropped_early {
            dropped_early = true;
            tracing::warn!(
                "{service} sent more than {MAX_EARLY_BYTES} bytes before it was ready; the rest is dropped"
            );
        }
    }
}
