//! Providers: each folder holds only what is specific to one service (its
//! config, its wire protocol, its connector). Everything shared lives in
//! [`crate::runtime`].

#[cfg(feature = "cartesia")]
#[cfg_attr(docsrs, doc(cfg(feature = "cartesia")))]
pub mod cartesia;
#[cfg(feature = "livekit")]
#[cfg_attr(docsrs, doc(cfg(feature = "livekit")))]
pub mod livekit;
pub mod local;
#[cfg(feature = "pipecat")]
#[cfg_attr(docsrs, doc(cfg(feature = "pipecat")))]
pub mod pipecat;
#[cfg(feature = "vapi")]
#[cfg_attr(docsrs, doc(cfg(feature = "vapi")))]
pub mod vapi;
#[cfg(feature = "vocode")]
#[cfg_attr(docsrs, doc(cfg(feature = "vocode")))]
pub mod vocode;
