//! The events a session emits.
//!
//! They are defined with the session contract, in [`crate::session::events`]
//! (the session trait hands them out, so they sit below the pipeline that
//! emits them); this module keeps their pipeline-side path.

pub use crate::session::events::{SessionEvent, SessionEvents, TurnLatency};
