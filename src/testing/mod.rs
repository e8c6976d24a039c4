//! Test support: signals and the conformance suite.
pub mod conformance;
pub mod fuzz;
pub mod signal;
