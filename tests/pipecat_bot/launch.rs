//! Starts the Pipecat test bot (`bot.py`) for tests and benches.
#![allow(dead_code)] // each user takes what it needs

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The venv's python, when the tests are asked to run.
pub fn python() -> Option<PathBuf> {
    std::env::var_os("VOICE_BACKENDS_PIPECAT_PYTHON").map(PathBuf::from)
}

/// A running bot; killed when dropped. It also exits when its stdin closes,
/// so a bot shared by the whole test binary ends with it.
pub struct Bot {
    child: Child,
    /// Where the bot listens.
    pub url: String,
}

#[derive(Clone, Copy, PartialEq)]
/// Which of Pipecat's WebSocket transports the bot serves.
pub enum Transport {
    /// `WebsocketServerTransport`: one client at a time.
    Server,
    /// FastAPI: many clients.
    FastApi,
}

impl Bot {
    /// Starts a bot and waits (up to a minute) until it listens.
    pub fn start(transport: Transport, port: u16, llm: bool) -> Bot {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/pipecat_bot/bot.py");
        let mut cmd = Command::new(python().expect("VOICE_BACKENDS_PIPECAT_PYTHON is set"));
        cmd.arg(script)
            .arg("--transport")
            .arg(match transport {
                Transport::Server => "server",
                Transport::FastApi => "fastapi",
            })
            .arg("--port")
            .arg(port.to_string())
            .arg("--exit-on-stdin-eof")
            .args(["--log-level", "WARNING"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if llm {
            cmd.arg("--llm");
        }
        let mut child = cmd.spawn().expect("the bot starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(url) = line.strip_prefix("READY ") {
                    let _ = tx.send(url.trim().to_owned());
                }
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the bot prints READY <url> within a minute");
        Bot { child, url }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        url::Url::parse(&self.url).unwrap().port().unwrap()
    }

    /// Stops it now.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Bot {
    fn drop(&mut self) {
        self.kill();
    }
}
