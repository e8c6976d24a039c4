//! Vapi's REST API as the provider uses it: `POST {base}/call` creates a
//! session's call with the WebSocket transport, and a call's control URL
//! takes `end-call` when a call must be ended without its socket.
//!
//! Every answer other than a success is mapped here, in one place, to the
//! crate's error codes: 401 and 403 to `authentication_failed`, 429 to
//! `rate_limit_exceeded` (retryable, with `retry_after_ms` when Vapi says),
//! 400, 404 and 422 to `invalid_config` (Vapi's message says which field),
//! 402 to `authorization_failed` (the account cannot place calls), other
//! statuses and transport failures to `connection_failed` (retryable), a
//! timeout to `connection_timeout`. Messages name the API's host and
//! Vapi's message, never the key or a call's URLs.

use std::time::Duration;

use serde_json::{Map, Value, json};
use url::Url;

use super::VapiConfig;
use crate::audio::AudioFormat;
use crate::config::Secret;
use crate::error::{BackendError, ErrorCode, Result};

const OP: &str = "vapi.create_call";

/// The most of Vapi's error message kept in an error.
const MAX_MESSAGE: usize = 300;

/// Checks `base_url` is an `http`/`https` URL with a host and nothing that
/// cannot be a base (credentials, query, fragment); the message does not
/// repeat the URL.
///
/// # Errors
///
/// What is wrong with it.
pub fn check_base_url(base_url: &str) -> std::result::Result<(), String> {
    match Url::parse(base_url) {
        Ok(u) if !matches!(u.scheme(), "http" | "https") => Err(format!(
            "scheme {:?} is not supported; use https (or http for a local stand-in)",
            u.scheme()
        )),
        Ok(u) if u.host_str().is_none() => Err("has no host".into()),
        Ok(u) if !u.username().is_empty() || u.password().is_some() => {
            Err("must not hold a user name or password".into())
        }
        Ok(u) if u.query().is_some() || u.fragment().is_some() => {
            Err("must not have a query or fragment".into())
        }
        Ok(_) => Ok(()),
        Err(e) => Err(format!("is not a valid URL ({e})")),
    }
}

/// What a created call gives the session.
#[derive(Debug)]
#[non_exhaustive]
pub struct CreatedCall {
    /// The call's id.
    pub id: String,
    /// The transport socket's URL (`transport.websocketCallUrl`): whoever
    /// holds it joins the call, so it is a secret.
    pub websocket_url: Secret,
    /// The call's control URL (`monitor.controlUrl`), when Vapi gave one;
    /// a secret like the socket's URL.
    pub control_url: Option<Secret>,
}

/// The custom LLM a call's assistant uses: the session's callback route.
#[derive(Debug)]
pub struct CustomLlm<'a> {
    /// The route's URL (Vapi appends `/chat/completions`).
    pub url: &'a str,
    /// The route's secret, given to Vapi as a transient `custom-llm`
    /// credential, which Vapi sends as `Authorization: Bearer`.
    pub secret: &'a Secret,
    /// The model name.
    pub model: &'a str,
}

/// The body of `POST /call` for a session: the assistant (by id or
/// transient), its overrides, and the `vapi.websocket` transport in
/// `format`. With `custom`, the overrides make the call's model the custom
/// LLM (keeping the configured model's `messages`, the system prompt) and
/// carry its credential; with the config's `control_url`, they ask for the
/// call's control URL.
pub fn call_body(
    config: &VapiConfig,
    format: AudioFormat,
    custom: Option<&CustomLlm<'_>>,
) -> Value {
    let mut body = Map::new();
    if let Some(id) = &config.assistant_id {
        body.insert("assistantId".into(), json!(id));
    }
    if let Some(assistant) = &config.assistant {
        body.insert("assistant".into(), assistant.clone());
    }
    let mut overrides = match &config.assistant_overrides {
        Some(Value::Object(o)) => o.clone(),
        _ => Map::new(),
    };
    if let Some(custom) = custom {
        let messages = overrides
            .get("model")
            .or_else(|| config.assistant.as_ref().and_then(|a| a.get("model")))
            .and_then(|m| m.get("messages"))
            .cloned();
        let mut model = Map::new();
        model.insert("provider".into(), json!("custom-llm"));
        model.insert("url".into(), json!(custom.url));
        model.insert("model".into(), json!(custom.model));
        if let Some(messages) = messages {
            model.insert("messages".into(), messages);
        }
        overrides.insert("model".into(), Value::Object(model));
        let credential = json!({ "provider": "custom-llm", "apiKey": custom.secret.expose() });
        match overrides.get_mut("credentials") {
            Some(Value::Array(list)) => {
                list.retain(|c| c.get("provider") != Some(&json!("custom-llm")));
                list.push(credential);
            }
            _ => {
                overrides.insert("credentials".into(), json!([credential]));
            }
        }
    }
    if config.control_url {
        match overrides.get_mut("monitorPlan") {
            Some(Value::Object(plan)) => {
                plan.insert("controlEnabled".into(), json!(true));
            }
            _ => {
                overrides.insert("monitorPlan".into(), json!({ "controlEnabled": true }));
            }
        }
    }
    if !overrides.is_empty() {
        body.insert("assistantOverrides".into(), Value::Object(overrides));
    }
    body.insert(
        "transport".into(),
        json!({
            "provider": "vapi.websocket",
            "audioFormat": {
                "format": config.audio_format.wire_name(),
                "container": "raw",
                "sampleRate": format.sample_rate,
            }
        }),
    );
    Value::Object(body)
}

/// Vapi's API for one backend: an HTTP client (rustls on ring), the base
/// URL and the private key.
pub struct CallApi {
    http: reqwest::Client,
    call_url: Url,
    host: String,
    endpoint: String,
    key: Secret,
}

impl std::fmt::Debug for CallApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallApi")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl CallApi {
    /// A client for the API at `base_url` with the private `key`; each
    /// request may take `timeout`.
    ///
    /// # Errors
    ///
    /// `InvalidConfig` for a base URL that is not one, `PipelineError` when
    /// no HTTP client can be made.
    pub fn new(base_url: &str, key: Secret, timeout: Duration) -> Result<CallApi> {
        check_base_url(base_url)
            .map_err(|m| BackendError::invalid_config(OP, format!("base_url {m}")))?;
        let base = Url::parse(base_url).map_err(|e| {
            BackendError::invalid_config(OP, format!("base_url is not a URL ({e})"))
        })?;
        let call_url = Url::parse(&format!("{}/call", base.as_str().trim_end_matches('/')))
            .map_err(|e| BackendError::invalid_config(OP, format!("base_url: {e}")))?;
        let host = base.host_str().unwrap_or_default().to_owned();
        let endpoint = format!("{host}:{}", base.port_or_known_default().unwrap_or(443));
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| {
                BackendError::new(
                    OP,
                    ErrorCode::PipelineError,
                    format!("no HTTP client for Vapi: {e}"),
                )
            })?;
        Ok(CallApi {
            http,
            call_url,
            host,
            endpoint,
            key,
        })
    }

    /// Whether `url` is on the API's host (where the key may go).
    pub fn same_host(&self, url: &str) -> bool {
        Url::parse(url).is_ok_and(|u| u.host_str() == Some(self.host.as_str()))
    }

    /// Opens and closes a TCP connection to the API's host: a check that
    /// costs no call.
    ///
    /// # Errors
    ///
    /// `ConnectionFailed` naming the host.
    pub async fn probe(&self) -> Result<()> {
        tokio::net::TcpStream::connect(&self.endpoint)
            .await
            .map(drop)
            .map_err(|e| {
                BackendError::new(
                    "vapi.connect",
                    ErrorCode::ConnectionFailed,
                    format!(
                        "Vapi's API at {} does not accept connections: {e}",
                        self.endpoint
                    ),
                )
            })
    }

    /// Creates a call with `body` (see [`call_body`]).
    ///
    /// # Errors
    ///
    /// As mapped in the [module docs](self); a success without an `id` or
    /// `transport.websocketCallUrl` is `connection_failed`.
    pub async fn create(&self, body: &Value) -> Result<CreatedCall> {
        let response = self
            .http
            .post(self.call_url.clone())
            .bearer_auth(self.key.expose())
            .json(body)
            .send()
            .await
            .map_err(|e| self.transport_error(&e))?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let bytes = response
            .bytes()
            .await
            .map_err(|e| self.transport_error(&e))?;
        if !status.is_success() {
            return Err(status_error(
                &self.endpoint,
                status.as_u16(),
                retry_after,
                &bytes,
            ));
        }
        parse_created(&bytes).map_err(|why| {
            BackendError::new(
                OP,
                ErrorCode::ConnectionFailed,
                format!(
                    "Vapi at {} answered the call creation with {why}",
                    self.endpoint
                ),
            )
        })
    }

    /// Ends a call through its control URL, in the background, for a call
    /// whose socket could not be used; failures are logged.
    pub fn end_call_later(&self, control_url: Secret) {
        let http = self.http.clone();
        let endpoint = self.endpoint.clone();
        tokio::spawn(async move {
            let sent = http
                .post(control_url.expose())
                .json(&json!({ "type": "end-call" }))
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => {}
                Ok(r) => tracing::warn!("ending a Vapi call at {endpoint}: HTTP {}", r.status()),
                Err(e) => tracing::warn!("ending a Vapi call at {endpoint}: {}", e.without_url()),
            }
        });
    }

    fn transport_error(&self, e: &reqwest::Error) -> BackendError {
        let code = if e.is_timeout() {
            ErrorCode::ConnectionTimeout
        } else {
            ErrorCode::ConnectionFailed
        };
        // The error's text would repeat the URL: describe it without.
        let what = if e.is_timeout() {
            "it did not answer in time".to_owned()
        } else if e.is_connect() {
            "could not connect".to_owned()
        } else {
            let mut cause = String::new();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                cause = s.to_string();
                source = s.source();
            }
            if cause.is_empty() {
                "the request failed".to_owned()
            } else {
                cause
            }
        };
        BackendError::new(
            OP,
            code,
            format!(
                "could not create a call at Vapi ({}): {what}",
                self.endpoint
            ),
        )
    }
}

/// The error for an HTTP `status` answer to `POST /call`, with Vapi's
/// message from `body` (`{"message": ..., "error": ...}`).
pub fn status_error(
    endpoint: &str,
    status: u16,
    retry_after: Option<u64>,
    body: &[u8],
) -> BackendError {
    let code = match status {
        401 | 403 => ErrorCode::AuthenticationFailed,
        429 => ErrorCode::RateLimitExceeded,
        400 | 404 | 422 => ErrorCode::InvalidConfig,
        402 => ErrorCode::AuthorizationFailed,
        _ => ErrorCode::ConnectionFailed,
    };
    let said = vapi_message(body)
        .map(|m| format!(": {m}"))
        .unwrap_or_default();
    let what = match status {
        401 | 403 => "refused the API key",
        429 => "is limiting the rate of calls",
        402 => "refused the call for the account",
        400 | 404 | 422 => "refused the call's settings",
        _ => "failed to create the call",
    };
    let mut error = BackendError::new(
        OP,
        code,
        format!("Vapi at {endpoint} {what} (HTTP {status}){said}"),
    )
    .with_detail("status", status.to_string());
    if let Some(secs) = retry_after {
        error = error.with_detail("retry_after_ms", (secs.saturating_mul(1000)).to_string());
    }
    error
}

/// Vapi's error message in a body: `message` as a string or a list of
/// strings, else `error`; cut to a bounded length.
fn vapi_message(body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let text = match value.get("message") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join("; "),
        _ => value.get("error")?.as_str()?.to_owned(),
    };
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    Some(match text.char_indices().nth(MAX_MESSAGE) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    })
}

/// The call in a success's body.
fn parse_created(body: &[u8]) -> std::result::Result<CreatedCall, String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("a body that is not JSON ({e})"))?;
    let id = value
        .get("id")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or("no call id")?;
    let socket = value
        .pointer("/transport/websocketCallUrl")
        .and_then(Value::as_str)
        .ok_or("no transport.websocketCallUrl (was the transport vapi.websocket?)")?;
    let control = value
        .pointer("/monitor/controlUrl")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(Secret::new);
    Ok(CreatedCall {
        id: id.to_owned(),
        websocket_url: Secret::new(socket),
        control_url: control,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_codes_and_keep_vapis_message() {
        let body =
            br#"{"message":["assistantId must be a UUID"],"error":"Bad Request","statusCode":400}"#;
        let e = status_error("api.vapi.ai:443", 400, None, body);
        assert_eq!(e.code, ErrorCode::InvalidConfig);
        assert!(e.message.contains("assistantId must be a UUID"), "{e}");
        let e = status_error("h:1", 401, None, br#"{"message":"Invalid Key"}"#);
        assert_eq!(e.code, ErrorCode::AuthenticationFailed);
        assert!(!e.is_retryable());
        let e = status_error("h:1", 429, Some(3), b"");
        assert_eq!(e.code, ErrorCode::RateLimitExceeded);
        assert!(e.is_retryable());
        assert_eq!(
            e.details.get("retry_after_ms").map(String::as_str),
            Some("3000")
        );
        assert_eq!(
            status_error("h:1", 503, None, b"<html>").code,
            ErrorCode::ConnectionFailed
        );
        assert_eq!(
            status_error("h:1", 402, None, b"{}").code,
            ErrorCode::AuthorizationFailed
        );
        let long = format!(r#"{{"message":"{}"}}"#, "x".repeat(1000));
        assert!(
            status_error("h:1", 400, None, long.as_bytes())
                .message
                .len()
                < 400
        );
    }

    #[test]
    fn a_created_call_needs_an_id_and_a_socket_url() {
        let ok = br#"{"id":"c1","transport":{"provider":"vapi.websocket","websocketCallUrl":"wss://x/c1/transport"},"monitor":{"controlUrl":"https://x/c1/control"}}"#;
        let call = parse_created(ok).unwrap();
        assert_eq!(call.id, "c1");
        assert_eq!(call.websocket_url.expose(), "wss://x/c1/transport");
        assert_eq!(call.control_url.unwrap().expose(), "https://x/c1/control");
        assert!(
            parse_created(br#"{"id":"c1"}"#)
                .unwrap_err()
                .contains("websocketCallUrl")
        );
        assert!(
            parse_created(br#"{"transport":{}}"#)
                .unwrap_err()
                .contains("id")
        );
        assert!(parse_created(b"nope").is_err());
    }

    #[test]
    fn base_urls_are_checked() {
        assert!(check_base_url("https://api.vapi.ai").is_ok());
        assert!(check_base_url("http://127.0.0.1:9/").is_ok());
        for bad in ["ws://h", "https://u:p@h", "https://h/?a=1", "nope"] {
            assert!(check_base_url(bad).is_err(), "{bad}");
        }
    }
}
