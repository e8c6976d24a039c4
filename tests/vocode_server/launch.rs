//! Starts the Vocode test server (`server.py`) for tests and benches.
#![allow(dead_code)] // each user takes what it needs

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
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

/// How long a server may take to load (Python importing Vocode: seconds
/// here, many more on a busy machine).
const LOADING: Duration = Duration::from_secs(60);

/// What a server says on its stdout.
enum Said {
    /// `--take-port`: loaded, waiting for its port to be free.
    Waiting,
    /// Listening on this port.
    Listening(u16),
}

/// A running Vocode server; killed when dropped. It also exits when its
/// stdin closes, so a server kept by the whole test binary ends with it.
pub struct Server {
    child: Child,
    /// Where it listens.
    pub port: u16,
    /// Where its REST agent posts.
    pub agent_url: String,
    env: Vec<(String, String)>,
}

/// Starts `server.py` with `args` and `env`; what it says comes on the
/// receiver.
fn spawn(args: &[&str], env: &[(String, String)]) -> (Child, Receiver<Said>) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vocode_server/server.py");
    let mut child = Command::new(python().expect("VOICE_BACKENDS_VOCODE_PYTHON is set"))
        .arg(script)
        .args(args)
        .arg("--exit-on-stdin-eof")
        .envs(env.iter().map(|(k, v)| (k, v)))
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
            let said = if line.starts_with("vocode server waiting for port ") {
                Said::Waiting
            } else if let Some(at) = line.strip_prefix("vocode server listening on ") {
                let port = at.rsplit(':').next().and_then(|p| p.parse::<u16>().ok());
                Said::Listening(port.expect("a port"))
            } else {
                continue;
            };
            let _ = tx.send(said);
        }
    });
    (child, rx)
}

fn listening(said: &Receiver<Said>, within: Duration) -> u16 {
    match said.recv_timeout(within) {
        Ok(Said::Listening(port)) => port,
        Ok(Said::Waiting) => panic!("the server waits for a port it was not asked to take"),
        Err(e) => panic!("the server does not say where it listens within {within:?}: {e}"),
    }
}

impl Server {
    /// Starts a server on `port` (0: any) whose REST agent posts to
    /// `agent_url`, and waits (up to a minute) until it listens.
    pub fn start(port: u16, agent_url: &str) -> Server {
        Server::start_with_env(port, agent_url, &[])
    }

    /// As [`Server::start`], with `env` added to its environment.
    pub fn start_with_env(port: u16, agent_url: &str, env: &[(&str, &str)]) -> Server {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let (child, said) = spawn(
            &["--port", &port.to_string(), "--agent-url", agent_url],
            &env,
        );
        let port = listening(&said, LOADING);
        Server {
            child,
            port,
            agent_url: agent_url.to_owned(),
            env,
        }
    }

    /// Replaces this server with a new process on the same port: the new
    /// one loads while this one still serves, then this one is killed and
    /// the new one takes the port at once. The port is away for moments,
    /// however long Python takes to load Vocode (so a client's reconnection
    /// budget is tested against a restart, not against the machine's load).
    pub fn replace(&mut self) {
        let (child, said) = spawn(
            &[
                "--port",
                &self.port.to_string(),
                "--agent-url",
                &self.agent_url,
                "--take-port",
            ],
            &self.env,
        );
        match said.recv_timeout(LOADING) {
            Ok(Said::Waiting) => {}
            Ok(Said::Listening(port)) => {
                panic!("the new server took port {port} while the old one held it")
            }
            Err(e) => panic!("the new server does not load within {LOADING:?}: {e}"),
        }
        self.kill();
        self.child = child;
        let port = listening(&said, Duration::from_secs(20));
        assert_eq!(port, self.port, "the new server took the old one's port");
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
