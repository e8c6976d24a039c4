//! The HTTP + WebSocket front door (being written).
