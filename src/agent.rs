//! The application's agent: what answers a finished user turn.
//!
//! An agent is either an object implementing [`Agent`] or an async closure
//! wrapped with [`agent_fn`]. Sessions call it once per finished user turn
//! with the final transcript and the conversation so far
//! ([`AgentTurn::history`]), and speak its reply to the user: one string
//! ([`AgentReply::text`]) or text streamed as it is produced
//! ([`AgentReply::channel`], [`AgentReply::stream`]).
//!
//! # Conversation history
//!
//! Each session keeps its own history (never shared between sessions): the
//! user's turns and the agent's replies, oldest first, as [`Message`]s. A
//! turn joins it once it is over (when the next turn starts, or when the
//! user cuts its reply), so the agent sees every previous turn from its
//! second turn on. It is bounded by [`Agent::history_limit`] (by default
//! [`DEFAULT_HISTORY_LIMIT`] messages; [`with_history_limit`] sets it for any
//! agent, closures included): beyond it the oldest messages are dropped.
//!
//! - A reply the user cut (barge-in), or one that failed part way, is kept
//!   with [`Message::interrupted`] set and the text of its sentences whose
//!   audio had started to reach the user (the engine cannot tell where in
//!   a sentence the cut fell); a reply cut before any of its audio reached
//!   the user is not kept, only the user's turn. Without speech synthesis
//!   (a text-only session), what was sent as
//!   [`SessionEvent::AgentText`](crate::pipeline::events::SessionEvent::AgentText) counts as said.
//! - A turn the agent did not answer (an error, a timeout) keeps the user's
//!   message only; an empty reply likewise.
//! - The backend's data-retention hook ([`crate::hooks::Hooks::retention`])
//!   is asked once per turn (unless the agent keeps no history), with
//!   [`crate::hooks::DataKind::Transcript`], while the agent answers: a turn
//!   it refuses (or has not allowed by the time the turn is over) is not
//!   kept, neither the user's message nor the reply.
//!
//! # Streamed replies
//!
//! A streamed reply is spoken as it comes: the text is cut at sentence ends
//! (`.`, `!`, `?` or `;` followed by a space, a newline, `。！？`) or, without
//! one, after [`MAX_PIECE_CHARS`] characters (at a space when there is one),
//! and each piece is synthesized in order while the agent goes on producing
//! the rest. The session's `timeout` (the agent's time to answer) runs from
//! the call to [`Agent::respond`] to the stream's first chunk; later chunks
//! have no time limit. A barge-in drops the rest:
//! the stream's receiver is dropped, so the agent's sender sees it closed
//! (`send` fails, [`tokio::sync::mpsc::Sender::closed`] resolves). An error
//! in the stream ends the reply: the pieces already cut are spoken, an
//! unfinished sentence is dropped, and the turn ends with an `agent_error`.
//! `SessionEvent::AgentText` is sent once, when the stream ends, with the
//! whole text (after an error: the text that was spoken); a reply cut by
//! the user sends none.

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::error::Result;

/// How many messages of the conversation an agent sees by default (user
/// turns and replies count one each); see [`Agent::history_limit`].
pub const DEFAULT_HISTORY_LIMIT: usize = 64;

/// A streamed reply's text is cut for synthesis after this many characters
/// when no sentence has ended in them (at the last space among them, if any).
pub const MAX_PIECE_CHARS: usize = 200;

/// Who said a [`Message`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// The user (a finished turn's transcript, or text sent as a turn).
    User,
    /// The agent (its reply, as said to the user).
    Agent,
}

/// One message of a session's conversation, in [`AgentTurn::history`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Message {
    /// Who said it.
    pub role: Role,
    /// What was said: the user's transcript, or the agent's reply.
    pub text: String,
    /// The agent's reply did not finish: the user cut it (barge-in) or it
    /// failed part way; `text` is what had started to reach the user. Always
    /// `false` for the user's messages.
    pub interrupted: bool,
}

impl Message {
    /// A user's message.
    pub fn user(text: impl Into<String>) -> Self {
        Message {
            role: Role::User,
            text: text.into(),
            interrupted: false,
        }
    }

    /// An agent's reply, said in full.
    pub fn agent(text: impl Into<String>) -> Self {
        Message {
            role: Role::Agent,
            text: text.into(),
            interrupted: false,
        }
    }

    /// An agent's reply that did not finish; `text` is what was said of it.
    pub fn agent_interrupted(text: impl Into<String>) -> Self {
        Message {
            interrupted: true,
            ..Message::agent(text)
        }
    }
}

/// One finished user turn, handed to the agent.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct AgentTurn {
    /// The session the turn belongs to.
    pub session_id: String,
    /// The user who spoke.
    pub user_id: String,
    /// The final transcript of the user's turn.
    pub transcript: String,
    /// The turn's number within the session, from 1.
    pub turn: u64,
    /// The session's conversation before this turn, oldest first: at most
    /// [`Agent::history_limit`] messages. See the
    /// [module documentation](self#conversation-history) for what is kept.
    pub history: Arc<[Message]>,
}

impl AgentTurn {
    /// A turn with the given identifiers and transcript, and no history.
    pub fn new(
        session_id: impl Into<String>,
        user_id: impl Into<String>,
        transcript: impl Into<String>,
        turn: u64,
    ) -> Self {
        AgentTurn {
            session_id: session_id.into(),
            user_id: user_id.into(),
            transcript: transcript.into(),
            turn,
            history: Arc::from([]),
        }
    }

    /// The turn with `history` as the conversation before it.
    pub fn with_history(mut self, history: impl Into<Arc<[Message]>>) -> Self {
        self.history = history.into();
        self
    }
}

/// The agent's answer to a turn.
///
/// Clones share a streamed reply's stream: whichever is spoken first takes it.
/// Two replies are equal when their text is and they share the same stream
/// (or have none).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct AgentReply {
    /// What the agent says; an empty reply says nothing. With a stream,
    /// it is said first, before the stream's text.
    pub text: String,
    stream: Option<TextStream>,
}

/// A streamed reply's chunks, taken once.
#[derive(Clone)]
struct TextStream(Arc<Mutex<Option<mpsc::Receiver<Result<String>>>>>);

impl PartialEq for TextStream {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for TextStream {}

impl fmt::Debug for TextStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TextStream")
    }
}

impl AgentReply {
    /// A reply that speaks `text`.
    pub fn text(text: impl Into<String>) -> Self {
        AgentReply {
            text: text.into(),
            stream: None,
        }
    }

    /// A reply streamed from `chunks`: its text as the agent produces it, in
    /// pieces of any size. The reply ends when every sender is dropped; an
    /// `Err` ends it with an `agent_error` after what was spoken. A barge-in
    /// drops the receiver (the senders see the channel closed). See the
    /// [module documentation](self#streamed-replies).
    pub fn stream(chunks: mpsc::Receiver<Result<String>>) -> Self {
        AgentReply {
            text: String::new(),
            stream: Some(TextStream(Arc::new(Mutex::new(Some(chunks))))),
        }
    }

    /// A streamed reply and the sender its text goes to (`buffer` chunks
    /// wait at most; see [`AgentReply::stream`]).
    ///
    /// ```
    /// use voice_backends::{agent_fn, AgentReply};
    /// let agent = agent_fn(|turn| async move {
    ///     let (tx, reply) = AgentReply::channel(16);
    ///     tokio::spawn(async move {
    ///         for word in ["You said ", &turn.transcript, ". ", "Anything else?"] {
    ///             if tx.send(Ok(word.to_owned())).await.is_err() {
    ///                 return; // the user cut in: stop producing
    ///             }
    ///         }
    ///     });
    ///     Ok(reply)
    /// });
    /// # let _ = agent;
    /// ```
    pub fn channel(buffer: usize) -> (mpsc::Sender<Result<String>>, AgentReply) {
        let (tx, rx) = mpsc::channel(buffer.max(1));
        (tx, AgentReply::stream(rx))
    }

    /// Whether the reply is streamed (and its stream not taken yet).
    pub fn is_stream(&self) -> bool {
        self.stream
            .as_ref()
            .is_some_and(|s| s.0.lock().unwrap_or_else(PoisonError::into_inner).is_some())
    }

    /// Takes a streamed reply's chunks (once; clones share them), leaving a
    /// reply of its `text` only.
    pub fn take_stream(&mut self) -> Option<mpsc::Receiver<Result<String>>> {
        self.stream
            .take()?
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

impl From<String> for AgentReply {
    fn from(text: String) -> Self {
        AgentReply::text(text)
    }
}

impl From<&str> for AgentReply {
    fn from(text: &str) -> Self {
        AgentReply::text(text)
    }
}

/// The application's conversational logic (the specification's agent instance).
///
/// Errors returned here surface as [`crate::ErrorCode::AgentError`] events on the
/// session; they end the turn, not the session.
#[async_trait]
pub trait Agent: Send + Sync {
    /// Answers one finished user turn.
    async fn respond(&self, turn: AgentTurn) -> Result<AgentReply>;

    /// How many messages of the conversation [`AgentTurn::history`] holds at
    /// most (the oldest are dropped beyond); 0 keeps none. By default
    /// [`DEFAULT_HISTORY_LIMIT`]; [`with_history_limit`] sets it for any
    /// agent.
    fn history_limit(&self) -> usize {
        DEFAULT_HISTORY_LIMIT
    }
}

/// An [`Agent`] made from an async closure (the specification's agent callback).
///
/// ```
/// use voice_backends::{agent_fn, AgentReply};
/// let agent = agent_fn(|turn| async move { Ok(AgentReply::text(format!("you said {}", turn.transcript))) });
/// # let _ = agent;
/// ```
pub fn agent_fn<F, Fut>(f: F) -> Arc<dyn Agent>
where
    F: Fn(AgentTurn) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<AgentReply>> + Send + 'static,
{
    Arc::new(AgentFn(f))
}

struct AgentFn<F>(F);

#[async_trait]
impl<F, Fut> Agent for AgentFn<F>
where
    F: Fn(AgentTurn) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<AgentReply>> + Send + 'static,
{
    async fn respond(&self, turn: AgentTurn) -> Result<AgentReply> {
        (self.0)(turn).await
    }
}

impl<F> fmt::Debug for AgentFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AgentFn")
    }
}

/// `agent` with a history of at most `limit` messages
/// ([`Agent::history_limit`]); 0 keeps none.
///
/// ```
/// use voice_backends::{agent_fn, AgentReply};
/// use voice_backends::agent::with_history_limit;
/// let agent = with_history_limit(
///     agent_fn(|turn| async move { Ok(AgentReply::text(format!("{} messages so far", turn.history.len()))) }),
///     8,
/// );
/// assert_eq!(agent.history_limit(), 8);
/// ```
pub fn with_history_limit(agent: Arc<dyn Agent>, limit: usize) -> Arc<dyn Agent> {
    Arc::new(HistoryLimit { agent, limit })
}

struct HistoryLimit {
    agent: Arc<dyn Agent>,
    limit: usize,
}

#[async_trait]
impl Agent for HistoryLimit {
    async fn respond(&self, turn: AgentTurn) -> Result<AgentReply> {
        self.agent.respond(turn).await
    }

    fn history_limit(&self) -> usize {
        self.limit
    }
}

/// Cuts a streamed reply's text into pieces to synthesize one by one:
/// sentences, or [`MAX_PIECE_CHARS`] characters without a sentence end.
/// Pieces are contiguous slices of the text (whitespace kept), each with
/// something besides whitespace.
#[derive(Debug, Default)]
pub(crate) struct Sentences {
    buf: String,
}

impl Sentences {
    /// Adds `chunk`; the pieces it completes go to `piece`, in order.
    pub(crate) fn push(&mut self, chunk: &str, mut piece: impl FnMut(String)) {
        self.buf.push_str(chunk);
        while let Some(end) = self.next_cut() {
            let rest = self.buf.split_off(end);
            piece(std::mem::replace(&mut self.buf, rest));
        }
    }

    /// The text not cut yet (an unfinished sentence).
    pub(crate) fn pending(&self) -> &str {
        &self.buf
    }

    /// The rest, as the last piece, unless it is only whitespace.
    pub(crate) fn finish(self) -> Option<String> {
        (!self.buf.trim().is_empty()).then_some(self.buf)
    }

    /// Where the first complete piece in the buffer ends, if there is one.
    fn next_cut(&self) -> Option<usize> {
        let buf = self.buf.as_str();
        let start = buf.len() - buf.trim_start().len();
        let mut last_space = None;
        for (count, (i, c)) in buf[start..].char_indices().enumerate() {
            let i = start + i;
            if count >= MAX_PIECE_CHARS {
                // No sentence end: cut at the last space, else here.
                return Some(last_space.unwrap_or(i));
            }
            match c {
                '\n' | '。' | '！' | '？' => return Some(i + c.len_utf8()),
                '.' | '!' | '?' | ';' => {
                    // An end only when a space follows (after closing
                    // quotes or brackets): not "3.14", and undecided at
                    // the buffer's end.
                    let after =
                        buf[i + 1..].trim_start_matches(['"', '\'', ')', ']', '”', '’', '»']);
                    match after.chars().next() {
                        Some(next) if next.is_whitespace() => {
                            return Some(buf.len() - after.len());
                        }
                        Some(_) => {}
                        None => return None,
                    }
                }
                c if c.is_whitespace() => last_space = Some(i),
                _ => {}
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(chunks: &[&str]) -> Vec<String> {
        let mut s = Sentences::default();
        let mut out = Vec::new();
        for c in chunks {
            s.push(c, |p| out.push(p));
        }
        out.extend(s.finish());
        out
    }

    #[test]
    fn sentences_are_cut_at_their_ends_and_keep_the_text_whole() {
        let chunks = [
            "Hel",
            "lo there. ",
            "Pi is 3.",
            "14! Isn't",
            " it? Yes;",
            " no\n\n",
            "Fin",
        ];
        let got = pieces(&chunks);
        assert_eq!(
            got,
            [
                "Hello there.",
                " Pi is 3.14!",
                " Isn't it?",
                " Yes;",
                " no\n",
                "\nFin"
            ]
        );
        assert_eq!(got.concat(), chunks.concat());
        assert_eq!(pieces(&["\"Quoted.\" Next"]), ["\"Quoted.\"", " Next"]);
        assert_eq!(pieces(&["好。再见"]), ["好。", "再见"]);
        assert!(pieces(&["  ", "\n"]).is_empty());
    }

    #[test]
    fn text_without_a_sentence_end_is_cut_at_a_space_after_the_limit() {
        let words = "word ".repeat(100);
        let got = pieces(&[&words]);
        assert!(got.len() > 1);
        assert!(got.iter().all(|p| p.chars().count() <= MAX_PIECE_CHARS));
        assert!(got[0].ends_with("word"), "{:?}", got[0]);
        assert_eq!(got.concat().trim_end(), words.trim_end());
        let solid = "x".repeat(MAX_PIECE_CHARS * 2 + 1);
        let got = pieces(&[&solid]);
        assert_eq!(got.len(), 3);
        assert_eq!(got.concat(), solid);
    }

    #[test]
    fn a_streamed_reply_is_taken_once_and_clones_share_it() {
        let (tx, mut reply) = AgentReply::channel(1);
        let copy = reply.clone();
        assert_eq!(copy, reply);
        assert!(reply.is_stream() && copy.is_stream());
        assert!(reply.take_stream().is_some());
        assert!(!copy.is_stream());
        assert!(tx.is_closed());
        assert_ne!(AgentReply::channel(1).1, AgentReply::channel(1).1);
        assert_eq!(AgentReply::text("a"), AgentReply::from("a"));
        let turn = AgentTurn::new("s", "u", "t", 1);
        assert!(turn.history.is_empty());
        let turn = turn.with_history(vec![Message::user("hi"), Message::agent_interrupted("he")]);
        assert!(turn.history[1].interrupted && turn.history[1].role == Role::Agent);
    }
}
