//! A small agent to talk to with no account and no model: [`DemoAgent`].
//!
//! It is what `voice-backends serve --demo` answers with, between offline
//! speech recognition and offline speech synthesis, and what answers the
//! text box of the default `serve` page. It understands a few requests,
//! from speech or typed text, in plain words (case and punctuation do not
//! matter):
//!
//! | say | it answers |
//! | --- | --- |
//! | "hello", "hi", "good morning" | a greeting and how to go on |
//! | "help", "what can you do" | what it can do |
//! | "what time is it" | the time, in UTC |
//! | "what day is it", "what's the date" | the day and date, in UTC |
//! | "repeat after me" and words | the words |
//! | "what did I say before" | the user's previous turn, from the conversation history |
//! | "goodbye" | a farewell |
//! | anything else | "You said: ..." and the words |
//!
//! Its reply is streamed sentence by sentence ([`AgentReply::channel`]), so
//! speech synthesis starts on the first sentence.
//!
//! ```
//! use voice_backends::AgentTurn;
//! use voice_backends::demo::DemoAgent;
//!
//! let agent = DemoAgent::new();
//! let turn = AgentTurn::new("session-1", "user-1", "Repeat after me: the sky is blue", 1);
//! assert_eq!(agent.answer(&turn), "the sky is blue");
//! ```
//!
//! Give it to a session like any agent:
//!
//! ```
//! use std::sync::Arc;
//! use voice_backends::SessionConfig;
//! use voice_backends::demo::DemoAgent;
//!
//! let config = SessionConfig::new("user-1").with_agent(Arc::new(DemoAgent::new()));
//! # let _ = config;
//! ```

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;

use crate::agent::{Agent, AgentReply, AgentTurn, Role};
use crate::error::Result;

/// What the agent says to "help" (also part of its greeting's hint).
pub const HELP: &str = "I am the voice-backends demo agent. Ask me what time it is, \
    or what day it is. Say repeat after me, then some words, and I will say them back. \
    Ask what did I say before, and I will remember. Anything else, I repeat.";

/// The demo agent: answers greetings, the time and the date, "repeat after
/// me", "what did I say before", "help", and repeats anything else. See the
/// [module documentation](self).
#[derive(Clone)]
pub struct DemoAgent {
    clock: fn() -> SystemTime,
}

impl fmt::Debug for DemoAgent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DemoAgent")
    }
}

impl Default for DemoAgent {
    fn default() -> Self {
        DemoAgent::new()
    }
}

impl DemoAgent {
    /// The demo agent, on the system clock.
    pub fn new() -> Self {
        DemoAgent {
            clock: SystemTime::now,
        }
    }

    /// The demo agent with `clock` telling it the time (for tests and
    /// examples that need a fixed time).
    ///
    /// ```
    /// use std::time::{Duration, UNIX_EPOCH};
    /// use voice_backends::AgentTurn;
    /// use voice_backends::demo::DemoAgent;
    ///
    /// let agent = DemoAgent::with_clock(|| UNIX_EPOCH + Duration::from_secs(86_400 + 3_600));
    /// let turn = AgentTurn::new("s", "u", "what day is it", 1);
    /// assert_eq!(agent.answer(&turn), "Today is Friday, January 2, 1970, in UTC.");
    /// ```
    pub fn with_clock(clock: fn() -> SystemTime) -> Self {
        DemoAgent { clock }
    }

    /// The whole answer to `turn` (what [`Agent::respond`] streams, sentence
    /// by sentence).
    pub fn answer(&self, turn: &AgentTurn) -> String {
        let heard = turn.transcript.trim();
        let words = words(heard);
        let has = |w: &str| words.iter().any(|x| x == w);
        let phrase = |p: &str| contains_phrase(&words, p);

        if words.is_empty() {
            return "I did not catch that. Say help to hear what I can do.".to_owned();
        }
        if let Some(rest) = after_phrase(heard, "repeat after me") {
            return if rest.is_empty() {
                "Repeat what? Say repeat after me, then the words.".to_owned()
            } else {
                rest
            };
        }
        if phrase("what did i say") || phrase("what did i just say") || phrase("what i said") {
            return match previous_user_message(turn) {
                Some(before) => format!("Before this, you said: {before}"),
                None => "You have not said anything before this.".to_owned(),
            };
        }
        if has("help") || phrase("what can you do") {
            return HELP.to_owned();
        }
        let now = (self.clock)()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if has("time") {
            return format!("It is {}, in UTC.", clock_time(now));
        }
        if has("day") || has("date") || has("today") {
            return format!("Today is {}, in UTC.", calendar_date(now));
        }
        if ["bye", "goodbye"].iter().any(|w| has(w)) {
            return "Goodbye! Thank you for trying voice-backends.".to_owned();
        }
        let greeting = ["hello", "hi", "hey", "greetings", "howdy"]
            .iter()
            .any(|w| words.first().is_some_and(|f| f == w))
            || ["good morning", "good afternoon", "good evening"]
                .iter()
                .any(|p| phrase(p));
        if greeting {
            return "Hello! I am the demo agent. Ask me what time it is, or say help.".to_owned();
        }
        let heard = heard.trim_end_matches(['.', '!', '?', ',', ';', ' ']);
        format!("You said: {heard}.")
    }
}

#[async_trait]
impl Agent for DemoAgent {
    async fn respond(&self, turn: AgentTurn) -> Result<AgentReply> {
        let answer = self.answer(&turn);
        let sentences = sentences(&answer);
        // Room for every sentence: none waits, and no task is needed.
        let (tx, reply) = AgentReply::channel(sentences.len());
        for sentence in sentences {
            if tx.try_send(Ok(sentence)).is_err() {
                break; // the reply was dropped (the user cut in)
            }
        }
        Ok(reply)
    }
}

/// The user's message before the current turn, if any.
fn previous_user_message(turn: &AgentTurn) -> Option<&str> {
    turn.history
        .iter()
        .rev()
        .find(|m| m.role == Role::User && !m.text.trim().is_empty())
        .map(|m| m.text.trim())
}

/// `text`'s words, lower case, without punctuation ("what's" stays one word).
fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !(c.is_alphanumeric() || c == '\''))
        .map(|w| w.trim_matches('\'').to_lowercase())
        .filter(|w| !w.is_empty())
        .collect()
}

/// Whether `words` hold the words of `phrase` one after the other.
fn contains_phrase(words: &[String], phrase: &str) -> bool {
    let wanted: Vec<&str> = phrase.split(' ').collect();
    words
        .windows(wanted.len())
        .any(|w| w.iter().zip(&wanted).all(|(a, b)| a == b))
}

/// What follows `phrase` in `text` (matched by words, whatever the case and
/// punctuation), as the user wrote it, without the separators around it.
fn after_phrase(text: &str, phrase: &str) -> Option<String> {
    let wanted = words(phrase);
    // Each word of `text` with where it ends.
    let mut spans = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices().chain([(text.len(), ' ')]) {
        let in_word = c.is_alphanumeric() || c == '\'';
        match (in_word, start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                spans.push((text[s..i].trim_matches('\'').to_lowercase(), i));
                start = None;
            }
            _ => {}
        }
    }
    let at = spans
        .windows(wanted.len())
        .position(|w| w.iter().zip(&wanted).all(|((a, _), b)| a == b))?;
    let end = spans[at + wanted.len() - 1].1;
    let rest = text[end..]
        .trim_start_matches(|c: char| c.is_whitespace() || matches!(c, ':' | ',' | '-' | '.'))
        .trim_end();
    Some(rest.to_owned())
}

/// `text` cut after each `.`, `!` or `?` followed by a space: the pieces a
/// streamed reply is sent in.
fn sentences(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut start = 0;
    let bytes = text.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if matches!(b, b'.' | b'!' | b'?') && bytes.get(i + 1) == Some(&b' ') {
            out.push(text[start..=i].to_owned());
            start = i + 1;
        }
    }
    if start < text.len() {
        out.push(text[start..].to_owned());
    }
    out
}

/// `secs` since the Unix epoch as a time of day, e.g. `2:05 PM`.
fn clock_time(secs: u64) -> String {
    let of_day = secs % 86_400;
    let (hour, minute) = (of_day / 3_600, of_day % 3_600 / 60);
    let (h12, half) = match hour {
        0 => (12, "AM"),
        1..=11 => (hour, "AM"),
        12 => (12, "PM"),
        _ => (hour - 12, "PM"),
    };
    format!("{h12}:{minute:02} {half}")
}

/// `secs` since the Unix epoch as a date, e.g. `Monday, December 7, 2026`.
fn calendar_date(secs: u64) -> String {
    const WEEKDAYS: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = secs / 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{}, {} {day}, {year}",
        WEEKDAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize]
    )
}

/// The (year, month 1..=12, day 1..=31) of `days` since 1970-01-01, in the
/// proleptic Gregorian calendar (H. Hinnant's `civil_from_days`).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::agent::Message;

    /// 2026-12-07 14:05:09 UTC, a Monday.
    fn monday_afternoon() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_796_652_309)
    }

    fn agent() -> DemoAgent {
        DemoAgent::with_clock(monday_afternoon)
    }

    fn answer(text: &str) -> String {
        agent().answer(&AgentTurn::new("s", "u", text, 1))
    }

    #[test]
    fn it_tells_the_time_and_the_date_in_utc() {
        assert_eq!(answer("What time is it?"), "It is 2:05 PM, in UTC.");
        assert_eq!(
            answer("what day is it"),
            "Today is Monday, December 7, 2026, in UTC."
        );
        assert_eq!(
            answer("What's the date today"),
            "Today is Monday, December 7, 2026, in UTC."
        );
        assert_eq!(clock_time(0), "12:00 AM");
        assert_eq!(clock_time(12 * 3_600 + 59), "12:00 PM");
        assert_eq!(clock_time(23 * 3_600 + 59 * 60), "11:59 PM");
        // Leap years, month and year ends.
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(11_017), (2000, 3, 1));
        assert_eq!(civil_from_days(19_722), (2023, 12, 31));
        assert_eq!(calendar_date(19_723 * 86_400), "Monday, January 1, 2024");
    }

    #[test]
    fn it_repeats_after_the_user() {
        assert_eq!(
            answer("Repeat after me: the sky is blue"),
            "the sky is blue"
        );
        assert_eq!(
            answer("please REPEAT after me, what time is it"),
            "what time is it"
        );
        assert_eq!(
            answer("repeat after me"),
            "Repeat what? Say repeat after me, then the words."
        );
        assert_eq!(
            answer("the cat sat on the mat"),
            "You said: the cat sat on the mat."
        );
        assert_eq!(answer("Is it raining?"), "You said: Is it raining.");
        assert_eq!(
            answer("  "),
            "I did not catch that. Say help to hear what I can do."
        );
    }

    #[test]
    fn it_greets_helps_and_says_goodbye() {
        assert!(
            answer("Hello there").starts_with("Hello!"),
            "{}",
            answer("Hello there")
        );
        assert!(answer("good morning agent").starts_with("Hello!"));
        // "hi" only greets at the start: not inside other words or later on.
        assert_eq!(answer("this is it"), "You said: this is it.");
        assert_eq!(answer("help"), HELP);
        assert_eq!(answer("What can you do?"), HELP);
        assert_eq!(
            answer("ok goodbye"),
            "Goodbye! Thank you for trying voice-backends."
        );
    }

    #[test]
    fn it_remembers_what_the_user_said_before() {
        let history = vec![
            Message::user("the sky is blue"),
            Message::agent("You said: the sky is blue."),
            Message::user("what time is it"),
            Message::agent("It is 2:05 PM, in UTC."),
        ];
        let turn = AgentTurn::new("s", "u", "What did I say before?", 3).with_history(history);
        assert_eq!(
            agent().answer(&turn),
            "Before this, you said: what time is it"
        );
        let first = AgentTurn::new("s", "u", "what did I just say", 1);
        assert_eq!(
            agent().answer(&first),
            "You have not said anything before this."
        );
    }

    #[tokio::test]
    async fn its_reply_is_streamed_sentence_by_sentence() {
        let mut reply = agent()
            .respond(AgentTurn::new("s", "u", "help", 1))
            .await
            .unwrap();
        assert_eq!(reply.text, "");
        let mut stream = reply.take_stream().expect("a streamed reply");
        let mut pieces = Vec::new();
        while let Some(piece) = stream.recv().await {
            pieces.push(piece.unwrap());
        }
        assert!(pieces.len() > 2, "{pieces:?}");
        assert!(pieces[0].ends_with("demo agent."), "{pieces:?}");
        assert_eq!(pieces.concat(), HELP);
    }
}
