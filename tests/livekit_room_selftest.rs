#![cfg(all(feature = "livekit", feature = "testing"))]
//! The test LiveKit room (`tests/livekit_room/`) against a minimal client.

#[path = "livekit_room/mod.rs"]
mod livekit_room;

use livekit_room::TestRoom;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_starts() {
    let room = TestRoom::start("APIkey", "secret").await;
    assert!(room.url().starts_with("ws://127.0.0.1:"));
}
