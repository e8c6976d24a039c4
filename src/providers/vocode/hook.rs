//! The agent hook: where a Vocode server's REST user-implemented agent
//! calls the application's agent, served on the connector kit's inbound
//! callbacks.
//!
//! Vocode's REST agent posts every call of every conversation to the one
//! URL in the server's configuration, so the hook is one named route
//! (`/callbacks/{route}`) with the secret from the provider's config, which
//! the server presents as `?token=` (its REST agent sets no headers). Calls
//! are told apart by `conversation_id`: each session opens its Vocode
//! conversation with an id of 128 random bits, registered here while the
//! session lives, so reaching a session takes both the secret and a live
//! conversation id.
//!
//! A call becomes the session's final user transcript (the turn), and waits
//! for the agent's reply, which the session's link hands over
//! ([`Conversation::answer`]) when it speaks it.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::Duration;

use futures_util::FutureExt;
use serde_json::json;
use tokio::sync::oneshot;
use url::Url;

use super::protocol::{agent_end, agent_text, parse_agent_call};
use crate::config::Secret;
use crate::error::{BackendError, ErrorCode, Result};
use crate::runtime::callbacks::{
    CallbackConfig, CallbackHandler, CallbackRequest, CallbackResponse, CallbackRoute,
    CallbackServer, StatusCode,
};
use crate::runtime::{Handed, LinkEvent, LinkEvents};

/// How the hook listens, as the provider's config gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct HookSettings {
    pub(super) listen: SocketAddr,
    pub(super) public_url: Option<Url>,
    pub(super) route: String,
    pub(super) secret: Secret,
    pub(super) answer_timeout: Duration,
}

/// Counts of the hook's calls, for health details.
#[derive(Debug, Default)]
pub(super) struct HookCounters {
    /// Calls taken (valid ones, for a live conversation).
    pub(super) calls: AtomicU64,
    /// Calls answered with the agent's reply.
    pub(super) answered: AtomicU64,
    /// Calls answered with no text: no reply within the answer timeout.
    pub(super) unanswered: AtomicU64,
    /// Calls whose body was not a REST agent call.
    pub(super) malformed: AtomicU64,
    /// Calls for a conversation that is not (or no longer) a session's.
    pub(super) unknown_conversation: AtomicU64,
}

type Conversations = RwLock<HashMap<String, Arc<Conversation>>>;

/// A bound agent hook: the callback server and its named route.
pub(super) struct Hook {
    // Dropped first: the route, then the server.
    route: CallbackRoute,
    server: CallbackServer,
    settings: HookSettings,
    conversations: Arc<Conversations>,
    pub(super) counters: Arc<HookCounters>,
}

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hook")
            .field("url", &self.route.url().as_str())
            .field("local_addr", &self.server.local_addr())
            .finish_non_exhaustive()
    }
}

/// Hooks on a fixed port, shared by the backends (and the configs of one
/// backend over `update_config`) that name the same address and route: a
/// port can be bound once.
static SHARED: Mutex<Vec<(SocketAddr, String, Weak<Hook>)>> = Mutex::new(Vec::new());

impl Hook {
    /// The hook `settings` describe: the live one on the same fixed address
    /// and route when there is one, else a new one, bound now.
    ///
    /// # Errors
    ///
    /// `InvalidConfig` when a live hook on that address and route has
    /// another secret or public URL; `ConnectionFailed` when the address
    /// cannot be bound.
    pub(super) async fn bind(settings: &HookSettings) -> Result<Arc<Hook>> {
        const OP: &str = "vocode.agent_hook";
        let fixed = settings.listen.port() != 0;
        if fixed {
            let shared = SHARED.lock().unwrap_or_else(PoisonError::into_inner);
            let live = shared.iter().find_map(|(addr, route, hook)| {
                (*addr == settings.listen && *route == settings.route)
                    .then(|| hook.upgrade())
                    .flatten()
            });
            if let Some(hook) = live {
                let same = hook.settings.secret.expose() == settings.secret.expose()
                    && hook.settings.public_url == settings.public_url;
                if !same {
                    return Err(BackendError::invalid_config(
                        OP,
                        format!(
                            "the agent hook on {} route {:?} serves sessions of a config with another secret or public_url; \
                             stop them first, or use another listen address or route",
                            settings.listen, settings.route
                        ),
                    ));
                }
                return Ok(hook);
            }
        }
        let server = CallbackServer::bind_with(CallbackConfig {
            addr: settings.listen,
            public_url: settings.public_url.clone(),
            ..CallbackConfig::default()
        })
        .await
        .map_err(|e| e.with_op(OP))?;
        let conversations: Arc<Conversations> = Arc::default();
        let counters: Arc<HookCounters> = Arc::default();
        let handler = handler(conversations.clone(), counters.clone());
        let route = server
            .register_named(
                &settings.route,
                settings.secret.clone(),
                "vocode-agent-hook",
                handler,
            )
            .map_err(|e| e.with_op(OP))?;
        let hook = Arc::new(Hook {
            route,
            server,
            settings: settings.clone(),
            conversations,
            counters,
        });
        if fixed {
            let mut shared = SHARED.lock().unwrap_or_else(PoisonError::into_inner);
            shared.retain(|(_, _, h)| h.strong_count() > 0);
            shared.push((
                settings.listen,
                settings.route.clone(),
                Arc::downgrade(&hook),
            ));
        }
        tracing::debug!(url = %hook.route.url(), "Vocode agent hook listening");
        Ok(hook)
    }

    /// The URL the server's REST agent posts to, without the secret.
    pub(super) fn url(&self) -> &Url {
        self.route.url()
    }

    /// Registers a session's conversation under `id` until the returned
    /// registration is dropped.
    ///
    /// # Errors
    ///
    /// `PipelineError` when `id` is registered already (ids are random:
    /// never in practice).
    pub(super) fn register(
        self: &Arc<Self>,
        id: &str,
        conversation: Arc<Conversation>,
    ) -> Result<Registration> {
        let mut map = self
            .conversations
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if map.contains_key(id) {
            return Err(BackendError::new(
                "vocode.open_link",
                ErrorCode::PipelineError,
                "a conversation id was drawn twice",
            ));
        }
        map.insert(id.to_owned(), conversation);
        Ok(Registration {
            hook: self.clone(),
            id: id.to_owned(),
        })
    }

    /// How many sessions' conversations are registered.
    pub(super) fn conversations(&self) -> usize {
        self.conversations
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// A session's conversation on the hook; dropping it unregisters it (calls
/// for it are then answered `restful_agent_end`).
pub(super) struct Registration {
    hook: Arc<Hook>,
    id: String,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.hook
            .conversations
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

/// One session's conversation: where its calls become turns and wait for
/// their answers.
pub(super) struct Conversation {
    /// The session's link events, where a call's text becomes the user's
    /// final transcript.
    events: LinkEvents,
    /// The calls waiting for an answer, oldest first.
    calls: Mutex<VecDeque<oneshot::Sender<String>>>,
    answer_timeout: Duration,
}

impl Conversation {
    pub(super) fn new(events: LinkEvents, answer_timeout: Duration) -> Self {
        Conversation {
            events,
            calls: Mutex::new(VecDeque::new()),
            answer_timeout,
        }
    }

    fn calls(&self) -> std::sync::MutexGuard<'_, VecDeque<oneshot::Sender<String>>> {
        self.calls.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Hands `human_input` to the session as its final transcript and waits
    /// for the agent's answer; `None` when none came within the answer
    /// timeout or the session is gone.
    async fn ask(&self, human_input: String) -> Option<String> {
        let (tx, rx) = oneshot::channel();
        self.calls().push_back(tx);
        let asked = async {
            let handed = self
                .events
                .send(LinkEvent::UserTranscript {
                    text: human_input,
                    is_final: true,
                })
                .await;
            if handed == Handed::SessionGone {
                return None;
            }
            rx.await.ok()
        };
        tokio::time::timeout(self.answer_timeout, asked)
            .await
            .ok()
            .flatten()
    }

    /// Whether a call waits for an answer.
    pub(super) fn waiting(&self) -> bool {
        let mut calls = self.calls();
        calls.retain(|c| !c.is_closed());
        !calls.is_empty()
    }

    /// Answers the oldest call still waiting with `text`; `false` when none
    /// waits.
    pub(super) fn answer(&self, text: &str) -> bool {
        let mut calls = self.calls();
        while let Some(call) = calls.pop_front() {
            if call.send(text.to_owned()).is_ok() {
                return true;
            }
        }
        false
    }
}

fn handler(conversations: Arc<Conversations>, counters: Arc<HookCounters>) -> CallbackHandler {
    Arc::new(move |request: CallbackRequest| {
        let conversations = conversations.clone();
        let counters = counters.clone();
        async move {
            let call = match parse_agent_call(&request.body) {
                Ok(call) => call,
                Err(why) => {
                    counters.malformed.fetch_add(1, Ordering::Relaxed);
                    return Ok(CallbackResponse::json_with_status(
                        StatusCode::BAD_REQUEST,
                        json!({"error": {"code": "invalid_request", "message": why}}),
                    ));
                }
            };
            let conversation = conversations
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&call.conversation_id)
                .cloned();
            let Some(conversation) = conversation else {
                // The session ended (or never was): so does the conversation.
                counters
                    .unknown_conversation
                    .fetch_add(1, Ordering::Relaxed);
                return Ok(CallbackResponse::json(agent_end()));
            };
            counters.calls.fetch_add(1, Ordering::Relaxed);
            let answer = conversation.ask(call.human_input).await;
            drop(conversation);
            Ok(CallbackResponse::json(match answer {
                Some(text) => {
                    counters.answered.fetch_add(1, Ordering::Relaxed);
                    agent_text(&text)
                }
                None => {
                    // No answer this turn; the conversation goes on.
                    counters.unanswered.fetch_add(1, Ordering::Relaxed);
                    agent_text("")
                }
            }))
        }
        .boxed()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_answer_goes_to_the_oldest_call_still_waiting() {
        let (events, mut rx) = LinkEvents::channel(8);
        let c = Arc::new(Conversation::new(events, Duration::from_secs(5)));
        assert!(!c.waiting());
        assert!(!c.answer("nobody asked"));
        let first = tokio::spawn({
            let c = c.clone();
            async move { c.ask("one".into()).await }
        });
        assert!(matches!(
            rx.recv().await,
            Some(LinkEvent::UserTranscript { ref text, is_final: true }) if text == "one"
        ));
        assert!(c.waiting());
        assert!(c.answer("answer one"));
        assert_eq!(first.await.unwrap().as_deref(), Some("answer one"));
        assert!(!c.waiting());
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_without_an_answer_gives_up_after_the_timeout() {
        let (events, _rx) = LinkEvents::channel(8);
        let c = Conversation::new(events, Duration::from_secs(2));
        assert_eq!(c.ask("hello".into()).await, None);
        assert!(!c.waiting(), "the abandoned call no longer waits");
        assert!(!c.answer("too late"));
    }
}
