//! Providers: each folder holds only what is specific to one service (its
//! config, its wire protocol, its connector). Everything shared lives in
//! [`crate::runtime`].

pub mod local;
#[cfg(feature = "pipecat")]
#[cfg_attr(docsrs, doc(cfg(feature = "pipecat")))]
pub mod pipecat;
