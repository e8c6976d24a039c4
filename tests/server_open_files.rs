#![cfg(all(feature = "server", feature = "testing", target_os = "linux"))]
//! The server and the open files limit: `bind` raises the soft limit to the
//! hard one, and a server out of file descriptors says so (at most once a
//! second), counts its failed accepts, and serves again once descriptors are
//! free. A binary of its own: it changes the process's limit.

#[path = "support/server.rs"]
mod support;

use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::timeout;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_raises_the_limit_and_outlives_running_out_of_descriptors() {
    let (soft, hard) = rlimit::Resource::NOFILE.get().unwrap();
    assert!(
        hard > 256,
        "a hard limit of {hard} is too low for this test"
    );
    // A soft limit under the hard one: binding raises it.
    let lowered = (hard - 1).min(soft.max(1024));
    rlimit::Resource::NOFILE.set(lowered, hard).unwrap();
    let server = Running::echo().await;
    assert_eq!(rlimit::Resource::NOFILE.get().unwrap(), (hard, hard));

    // Out of descriptors: files take every one the process may have, then
    // one is given back for a client, whose connection waits in the
    // listener's backlog while every accept the server tries fails.
    let open = std::fs::read_dir("/proc/self/fd").unwrap().count() as u64;
    rlimit::Resource::NOFILE.set(open + 64, hard).unwrap();
    let mut files = Vec::new();
    while let Ok(f) = std::fs::File::open("/dev/null") {
        files.push(f);
        assert!(
            files.len() < 100_000,
            "opening files never ran out of descriptors"
        );
    }
    files.pop();
    let client = TcpStream::connect(server.addr)
        .await
        .expect("the freed descriptor takes a client connection");
    // Accepting pauses 100 ms after each failure: several fail meanwhile.
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(files);
    drop(client);
    rlimit::Resource::NOFILE.set(hard, hard).unwrap();
    // Served again, and the failures were counted.
    let text = timeout(PATIENCE, async {
        loop {
            let (status, _, text) = http_get(server.addr, "/metrics").await;
            if status == 200 {
                return text;
            }
        }
    })
    .await
    .expect("the server serves again");
    assert!(
        metric(&text, "server_accept_errors_total") >= 1.0,
        "no failed accept counted:\n{text}"
    );
    assert_healthy_session(server.addr, "after").await;
    server.stop().await.unwrap();
}
