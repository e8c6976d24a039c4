//! Test support: signals and the conformance suite.
pub mod signal;
