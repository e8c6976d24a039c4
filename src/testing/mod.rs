//! Test support: signals, pipeline component doubles, fuzz targets, the
//! backend conformance suite, with the `link-websocket` feature the link
//! conformance suite, and the benches' measurement helpers.
pub mod components;
pub mod conformance;
pub mod fuzz;
#[cfg(feature = "link-websocket")]
pub mod link;
pub mod measure;
pub mod signal;
