//! Speech components that run offline: no account, no service and no
//! download at run time. Each is behind its own feature (`demo` turns them
//! all on) and registers itself under its name like the
//! [built-in](crate::pipeline::builtin) components.

#[cfg(feature = "denoise")]
pub mod denoise;
#[cfg(feature = "espeak")]
pub mod espeak;
#[cfg(feature = "pocketsphinx")]
pub mod pocketsphinx;
#[cfg(feature = "webrtc-vad")]
pub mod webrtc_vad;
