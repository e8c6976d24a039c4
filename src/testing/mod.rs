//! Test support: signals, pipeline component doubles, fuzz targets, the
//! backend conformance suite and, with the `link-websocket` feature, the
//! link conformance suite.
pub mod components;
pub mod conformance;
pub mod fuzz;
#[cfg(feature = "link-websocket")]
pub mod link;
pub mod signal;
