//! Fuzzing of every decoder a client or a service can reach, on the stable
//! toolchain: the WebSocket protocol's client messages (feature `server`),
//! Pipecat frames and RTVI messages (feature `pipecat`), Cartesia's
//! messages (feature `cartesia`), LiveKit's signal and `/agent` messages
//! (feature `livekit`), Vapi's transport events (feature `vapi`), Vocode's
//! conversation messages and their WAV audio (feature `vocode`), and the
//! config loaders.
//!
//! Each target is a function of raw bytes that panics when an invariant
//! breaks: a decoder never panics, refuses input with a typed error that says
//! something, and what it accepts survives re-encoding unchanged where there
//! is an encoder. [`run`] drives a target with a seed corpus and mutations
//! from a seeded PRNG (bit and byte flips, inserted, deleted and duplicated
//! ranges, splices, dictionary tokens, odd numbers, deep nesting, protobuf
//! varints), keeps the mutants that reach a new kind of outcome, catches
//! panics and writes each crashing or slow input to a file. It is not
//! coverage-guided: it finds what random mutation of well-formed input
//! finds. `examples/fuzz.rs` is its command line.

#[cfg(feature = "cartesia")]
mod cartesia;
mod driver;
#[cfg(feature = "livekit")]
mod livekit;
mod targets;
#[cfg(feature = "vapi")]
mod vapi;
#[cfg(feature = "vocode")]
mod vocode;

#[cfg(feature = "cartesia")]
pub use cartesia::cartesia_message;
pub use driver::*;
#[cfg(feature = "livekit")]
pub use livekit::{livekit_agent_message, livekit_signal};
pub use targets::*;
#[cfg(feature = "vapi")]
pub use vapi::vapi_message;
#[cfg(feature = "vocode")]
pub use vocode::vocode_message;
