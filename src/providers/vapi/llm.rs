//! The session's agent as the call's custom LLM.
//!
//! A call created for a session with an agent has the model
//! `{"provider": "custom-llm", "url": <the session's callback route>}`;
//! Vapi's OpenAI client then posts chat completions there (to the route
//! itself or to `…/chat/completions`: both are answered), authenticated with
//! the route's secret, which the call carries as a transient `custom-llm`
//! credential and Vapi sends as `Authorization: Bearer` (the kit's callback
//! server refuses any other request with 401).
//!
//! A request's `messages` are the conversation so far: its last `user`
//! message is the turn's transcript and the `user` and `assistant` messages
//! before it are the agent's [`AgentTurn::history`] (system and tool
//! messages are left out; at most [`Agent::history_limit`] of them). The
//! agent's reply is streamed back as it comes, as Server-Sent Events of
//! `chat.completion.chunk` objects (the role first, then one chunk per piece
//! of text, then `finish_reason: "stop"`) and `data: [DONE]`; a request with
//! `"stream": false` gets one `chat.completion` object instead.
//!
//! The session's `timeout` bounds the agent's answer up to its first chunk
//! (a late agent makes the request fail with 502, which Vapi reports as a
//! model error). When Vapi drops the request (the user barged in), the
//! reply's stream is dropped and the agent's sender sees it closed. An
//! error in the middle of the stream ends it with an `error` event and no
//! `[DONE]`, so Vapi does not take a cut reply as whole.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::agent::{Agent, AgentReply, AgentTurn, Message};
use crate::error::{BackendError, ErrorCode, Result};
use crate::runtime::callbacks::{
    CallbackRequest, CallbackResponse, CallbackRoute, CallbackServer, Method, StatusCode,
};

const OP: &str = "vapi.custom_llm";

/// Events waiting to be written to Vapi.
const EVENT_QUEUE: usize = 32;

/// What a session's custom-LLM route answers with.
pub struct Endpoint {
    /// The session's agent.
    pub agent: Arc<dyn Agent>,
    /// The session.
    pub session_id: String,
    /// The session's user.
    pub user_id: String,
    /// How long the agent may take to its first chunk.
    pub timeout: Duration,
    /// The model name in the answers.
    pub model: String,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("session_id", &self.session_id)
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

/// Registers the session's custom-LLM route on `server`; it answers while
/// `open()` says the session is there, and 404 from the moment it says no
/// (the route itself goes when the [`CallbackRoute`] is dropped, which may
/// come a moment later).
///
/// # Errors
///
/// As [`CallbackServer::register`].
pub fn register(
    server: &CallbackServer,
    endpoint: Endpoint,
    open: impl Fn() -> bool + Send + Sync + 'static,
) -> Result<CallbackRoute> {
    let endpoint = Arc::new(endpoint);
    let open = Arc::new(open);
    server.register(endpoint.session_id.clone(), move |request| {
        let (endpoint, open) = (endpoint.clone(), open.clone());
        async move {
            if !open() {
                return Ok(error_answer(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "the session of this custom LLM has ended",
                ));
            }
            endpoint.answer(request).await
        }
    })
}

/// A chat-completion request, as far as the agent needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ChatRequest {
    /// The last user message: the turn's transcript; `None` when the
    /// conversation does not end with the user.
    pub transcript: Option<String>,
    /// The user and assistant messages before it, oldest first.
    pub history: Vec<Message>,
    /// The number of user messages, the turn's included.
    pub turn: u64,
    /// Whether the answer is streamed (`stream`, by default `false` as in
    /// OpenAI's API; Vapi sends `true`).
    pub stream: bool,
    /// The `model` asked for.
    pub model: Option<String>,
}

/// The text of a message's `content`: a string, or the `text` of each
/// `{"type":"text"}` part; `null` (a tool call) is no text.
fn content_text(content: Option<&Value>) -> std::result::Result<String, String> {
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for part in parts {
                if part.get("type").and_then(Value::as_str) == Some("text") {
                    let piece = part
                        .get("text")
                        .and_then(Value::as_str)
                        .ok_or("a text part without a string `text`")?;
                    text.push_str(piece);
                }
            }
            Ok(text)
        }
        Some(_) => Err("a message whose `content` is neither a string, parts nor null".into()),
    }
}

/// Reads an OpenAI-shaped chat-completion request.
///
/// # Errors
///
/// What is wrong: no `messages` list, a message that is not an object or
/// has no string `role`, a `content` of another shape, a `stream` that is
/// not a boolean.
pub fn parse_chat_request(body: &Value) -> std::result::Result<ChatRequest, String> {
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .ok_or("the request has no `messages` list")?;
    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err("`stream` is not a boolean".into()),
    };
    let mut said = Vec::with_capacity(messages.len());
    for (i, message) in messages.iter().enumerate() {
        let role = message
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("messages[{i}] has no string `role`"))?;
        let text =
            content_text(message.get("content")).map_err(|e| format!("messages[{i}]: {e}"))?;
        match role {
            "user" => said.push(Message::user(text)),
            // An assistant message without text is a tool call.
            "assistant" if !text.trim().is_empty() => said.push(Message::agent(text)),
            _ => {}
        }
    }
    let turn = said
        .iter()
        .filter(|m| m.role == crate::agent::Role::User)
        .count() as u64;
    let transcript = match said.last() {
        Some(m) if m.role == crate::agent::Role::User => said.pop().map(|m| m.text),
        _ => None,
    };
    Ok(ChatRequest {
        transcript,
        history: said,
        turn,
        stream,
        model: body.get("model").and_then(Value::as_str).map(str::to_owned),
    })
}

/// One `chat.completion.chunk`: `delta` with `finish`.
pub fn chunk(id: &str, created: u64, model: &str, delta: Value, finish: Option<&str>) -> String {
    json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{ "index": 0, "delta": delta, "finish_reason": finish }],
    })
    .to_string()
}

fn error_answer(status: StatusCode, kind: &str, message: &str) -> CallbackResponse {
    CallbackResponse::json_with_status(
        status,
        json!({ "error": { "message": message, "type": kind } }),
    )
}

impl Endpoint {
    async fn answer(&self, request: CallbackRequest) -> Result<CallbackResponse> {
        let path = request.path.trim_end_matches('/');
        if !matches!(path, "" | "/chat/completions") {
            return Ok(error_answer(
                StatusCode::NOT_FOUND,
                "not_found",
                "this custom LLM answers POST /chat/completions",
            ));
        }
        if request.method != Method::POST {
            return Ok(error_answer(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                "chat completions are POSTed",
            ));
        }
        let chat = match parse_chat_request(&request.body) {
            Ok(chat) => chat,
            Err(why) => {
                tracing::warn!(session_id = %self.session_id, "Vapi's custom-LLM request is malformed: {why}");
                return Ok(error_answer(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    &why,
                ));
            }
        };
        let model = chat.model.clone().unwrap_or_else(|| self.model.clone());
        let reply = match &chat.transcript {
            None => AgentReply::default(),
            Some(transcript) => self.respond(transcript, &chat).await?,
        };
        let id = format!(
            "chatcmpl-{:016x}{:016x}",
            fastrand::u64(..),
            fastrand::u64(..)
        );
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if chat.stream {
            Ok(stream_reply(reply, id, created, model))
        } else {
            whole_reply(reply, id, created, model).await
        }
    }

    /// Asks the agent, bounded by the timeout.
    async fn respond(&self, transcript: &str, chat: &ChatRequest) -> Result<AgentReply> {
        let limit = self.agent.history_limit();
        let skip = chat.history.len().saturating_sub(limit);
        let turn = AgentTurn::new(&self.session_id, &self.user_id, transcript, chat.turn)
            .with_history(chat.history[skip..].to_vec());
        match tokio::time::timeout(self.timeout, self.agent.respond(turn)).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(e)) => Err(BackendError::new(
                OP,
                ErrorCode::AgentError,
                format!("the agent failed: {}", e.message),
            )
            .with_source(e)),
            Err(_) => Err(BackendError::new(
                OP,
                ErrorCode::Timeout,
                format!(
                    "the agent did not answer within timeout = {}",
                    humantime::format_duration(self.timeout)
                ),
            )),
        }
    }
}

/// The reply as Server-Sent Events, chunk by chunk as the agent makes them.
fn stream_reply(
    mut reply: AgentReply,
    id: String,
    created: u64,
    model: String,
) -> CallbackResponse {
    let (tx, rx) = mpsc::channel::<String>(EVENT_QUEUE);
    let chunks = reply.take_stream();
    let first = reply.text;
    tokio::spawn(async move {
        let piece = |delta: Value, finish: Option<&str>| chunk(&id, created, &model, delta, finish);
        let mut opening = vec![piece(json!({ "role": "assistant", "content": "" }), None)];
        if !first.is_empty() {
            opening.push(piece(json!({ "content": first }), None));
        }
        for event in opening {
            if tx.send(event).await.is_err() {
                return;
            }
        }
        if let Some(mut chunks) = chunks {
            loop {
                let next = tokio::select! {
                    // Vapi dropped the request: the agent's stream goes too.
                    () = tx.closed() => return,
                    next = chunks.recv() => next,
                };
                match next {
                    Some(Ok(text)) if text.is_empty() => {}
                    Some(Ok(text)) => {
                        if tx
                            .send(piece(json!({ "content": text }), None))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!(code = %e.code, "the agent's reply failed mid-stream: {}", e.message);
                        let error = json!({ "error": {
                            "message": format!("the agent failed: {}", e.message),
                            "type": ErrorCode::AgentError.as_str(),
                        }});
                        let _ = tx.send(error.to_string()).await;
                        return;
                    }
                    None => break,
                }
            }
        }
        for event in [piece(json!({}), Some("stop")), "[DONE]".to_owned()] {
            if tx.send(event).await.is_err() {
                return;
            }
        }
    });
    CallbackResponse::sse_channel(rx)
}

/// The reply as one `chat.completion` object, once the agent is done.
async fn whole_reply(
    mut reply: AgentReply,
    id: String,
    created: u64,
    model: String,
) -> Result<CallbackResponse> {
    let mut text = std::mem::take(&mut reply.text);
    if let Some(mut chunks) = reply.take_stream() {
        while let Some(next) = chunks.recv().await {
            text.push_str(&next.map_err(|e| {
                BackendError::new(
                    OP,
                    ErrorCode::AgentError,
                    format!("the agent failed: {}", e.message),
                )
            })?);
        }
    }
    Ok(CallbackResponse::json(json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": { "role": "assistant", "content": text },
            "finish_reason": "stop",
        }],
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::Role;

    #[test]
    fn the_last_user_message_is_the_turn_and_the_rest_its_history() {
        let body = json!({
            "model": "m",
            "stream": true,
            "messages": [
                { "role": "system", "content": "be brief" },
                { "role": "assistant", "content": "Hello." },
                { "role": "user", "content": "hi" },
                { "role": "assistant", "content": null, "tool_calls": [] },
                { "role": "assistant", "content": [{ "type": "text", "text": "Yes?" }] },
                { "role": "tool", "content": "42" },
                { "role": "user", "content": "what time is it" },
            ],
        });
        let chat = parse_chat_request(&body).unwrap();
        assert_eq!(chat.transcript.as_deref(), Some("what time is it"));
        assert_eq!(chat.turn, 2);
        assert!(chat.stream);
        let roles: Vec<_> = chat
            .history
            .iter()
            .map(|m| (m.role, m.text.as_str()))
            .collect();
        assert_eq!(
            roles,
            [
                (Role::Agent, "Hello."),
                (Role::User, "hi"),
                (Role::Agent, "Yes?")
            ]
        );
        let ends_with_assistant = json!({ "messages": [{ "role": "assistant", "content": "Hi" }] });
        assert_eq!(
            parse_chat_request(&ends_with_assistant).unwrap().transcript,
            None
        );
    }

    #[test]
    fn malformed_requests_say_what_is_wrong() {
        assert!(
            parse_chat_request(&json!({}))
                .unwrap_err()
                .contains("messages")
        );
        assert!(
            parse_chat_request(&json!({ "messages": [1] }))
                .unwrap_err()
                .contains("role")
        );
        assert!(
            parse_chat_request(&json!({ "messages": [{ "role": "user", "content": 3 }] }))
                .unwrap_err()
                .contains("content")
        );
        assert!(
            parse_chat_request(&json!({ "messages": [], "stream": "yes" }))
                .unwrap_err()
                .contains("stream")
        );
    }
}
