//! Starts the Vocode test server (`server.py`) for tests and benches.
#![allow(dead_code)] // each user takes what it needs

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The venv's python, when the tests are asked to run.
pub fn python() -> Option<PathBuf> {
    std::env::var_os("VOICE_BACKENDS_VOCODE_PYTHON").map(PathBuf::from)
}

/// A free port on 127.0.0.1 (bound and released: taken again soon after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A running Vocode server; killed when dropped. It also exits when its
/// stdin closes, so a server kept by the whole test binary ends with it.
pub struct Server {
    child: Child,
    /// Where it listens.
    pub port: u16,
    /// Where its REST agent posts.
    pub agent_url: String,
}

impl Server {
    /// Starts a server on `port` (0: any) whose REST agent posts to
    /// `agent_url`, and waits (up to a minute) until it listens.
    pub fn start(port: u16, agent_url: &str) -> Server {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vocode_server/server.py");
        let mut child = Command::new(python().expect("VOICE_BACKENDS_VOCODE_PYTHON is set"))
            .arg(script)
            .args(["--port", &port.to_string(), "--agent-url", agent_url])
            .arg("--exit-on-stdin-eof")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the server starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(at) = line.strip_prefix("vocode server listening on ") {
                    let port = at.rsplit(':').next().and_then(|p| p.parse::<u16>().ok());
                    let _ = tx.send(port);
                }
            }
        });
        let port = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the server says where it listens within a minute")
            .expect("a port");
        Server {
            child,
            port,
            agent_url: agent_url.to_owned(),
        }
    }

    /// The conversation socket's URL.
    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/conversation", self.port)
    }

    /// Stops it now.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}
