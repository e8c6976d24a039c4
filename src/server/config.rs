//! [`ServerConfig`]: how the server listens and what it allows, and the
//! checks of its options.

use std::net::SocketAddr;
use std::time::Duration;

use super::checks::parse_host;
use super::workers;
use crate::error::{BackendError, Result};

/// The least [`ServerConfig::max_audio_ahead`].
const MIN_AUDIO_AHEAD: Duration = Duration::from_millis(100);

/// The least [`ServerConfig::send_buffer_bytes`].
const MIN_SEND_BUFFER: usize = 4 * 1024;

/// How the server listens and what it allows.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The address to listen on (port 0 picks a free port); default
    /// `127.0.0.1:8089`.
    pub listen: SocketAddr,
    /// Exact origins (`scheme://host[:port]`, e.g. `"http://localhost:8089"`)
    /// whose pages may open WebSockets. Empty (the default): only pages of the
    /// same host, whose `Origin` host and port equal the `Host` header.
    /// Clients that send no `Origin` (not browsers) are always allowed.
    /// Each is checked to be written as browsers send it (no default port,
    /// path or wildcard), or it could never match.
    pub allowed_origins: Vec<String>,
    /// The largest WebSocket message accepted, in bytes; larger ones close
    /// the connection with 1009. Default 64 KiB.
    pub max_frame_bytes: usize,
    /// Host names the server may be reached by: the `Host` header of every
    /// request must name one (its port is not compared), or the request is
    /// refused with 403, so that a page of another site whose name an
    /// attacker points at this server's address (DNS rebinding) cannot use
    /// it. An entry is a name (`voice.example.com`), an IP address
    /// (`192.0.2.7`, `[2001:db8::7]`), a domain with its subdomains
    /// (`.example.com`), or `*` for any host. Requests without a `Host`
    /// header are allowed (browsers always send one).
    ///
    /// Empty (the default): when the server listens on a loopback address,
    /// `localhost`, names ending in `.localhost`, and IP addresses; on any
    /// other address, any host (list the server's names when it is reachable
    /// from other machines).
    pub allowed_hosts: Vec<String>,
    /// WebSocket connections open at once from one IP address; default 32.
    pub max_connections_per_ip: usize,
    /// HTTP connections not (yet) upgraded to a WebSocket open at once from
    /// one IP address: requests for the page, `/healthz` or `/metrics`, idle
    /// keep-alive connections, upgrades under way; default 16. A connection
    /// beyond is closed as soon as it is accepted.
    pub max_http_connections_per_ip: usize,
    /// How long an HTTP connection may take to send a request's headers,
    /// counted from when it opens and again from the end of each response
    /// (so it is also how long an idle keep-alive connection is kept);
    /// default 10 s.
    pub request_timeout: Duration,
    /// How long a started session may go without a message from its client
    /// (binary audio or text; pings and pongs do not count) before it is
    /// closed with 1008 `idle: ...`; default 60 s.
    pub idle_timeout: Duration,
    /// How long the server waits for a client to take what it sends (reply
    /// audio and events): a write that cannot complete in this time (the
    /// client stopped reading and the buffers between are full) closes the
    /// connection and stops its session; default 10 s.
    pub send_timeout: Duration,
    /// The kernel send buffer of each connection, in bytes (Linux doubles
    /// it): with the socket's own write buffer, how much of its reply a
    /// client that stops reading holds before the server's writes wait (and
    /// [`send_timeout`](Self::send_timeout) starts to run); default 256 KiB,
    /// at least 4 KiB. The reply's audio at 48 kHz is 96 KB per second.
    pub send_buffer_bytes: usize,
    /// New WebSocket connections per second from one IP address, on average;
    /// default 20. Bursts of twice as many are allowed.
    pub connections_per_second_per_ip: f64,
    /// Client messages per second on one connection, on average; default
    /// 200. Bursts of twice as many are allowed; beyond, close 1008.
    pub messages_per_second: f64,
    /// How far ahead of real time a client's audio may run. Audio is taken
    /// at one second of it per second, plus up to this much more at once (a
    /// client catching up after a network stall, a recording sent whole);
    /// audio beyond closes the connection with 1008, so that no client makes
    /// its worker process audio faster than real time for long. Default
    /// 10 s; at least 100 ms.
    pub max_audio_ahead: Duration,
    /// How long a new connection has to send `start`; default 10 s.
    pub start_timeout: Duration,
    /// How long in-flight turns may take to finish on shutdown; default 10 s.
    pub shutdown_deadline: Duration,
    /// How long a session whose client went away without a close (the
    /// connection dropped, or the client stopped reading) waits for the
    /// client to come back with `resume`; default 30 s; zero turns it off.
    ///
    /// It applies to sessions with a resume token, those the backend keeps
    /// in a session store
    /// ([`VoiceBackend::set_session_store`](crate::backend::VoiceBackend::set_session_store)).
    /// Such a session is *detached* rather than stopped: it runs on (a turn
    /// in flight completes), the reply audio it makes while nobody listens
    /// is dropped, and its events go unread. A `resume` within the window
    /// takes it up (`ready` with `resumed: true`) and audio flows both ways
    /// again; once the window ends without one, the session is stopped and
    /// a late `resume` is refused. A client that closes cleanly (a close
    /// frame, or `stop`) ends its session at once, without a window; so
    /// does every other refusal (idle, a protocol violation). Without a
    /// store, or with a zero window, a client that goes away takes its
    /// session with it.
    pub resume_window: Duration,
    /// Threads that serve the connections, each a runtime of its own
    /// (threads `vb-serve-0`, `vb-serve-1`, ...), at most 1024. A new
    /// connection goes to the worker serving the fewest (the gauge
    /// `server_worker_connections`), and everything of a connection (its
    /// session and the session's timers and components) stays on that
    /// thread, so no wake-up crosses threads and no task moves between
    /// cores. One per core is the fastest way to serve many sessions.
    ///
    /// 0 (the default): connections are served on the runtime that calls
    /// [`Server::run`](super::Server::run), where its scheduler puts them.
    ///
    /// The workers end with `run`: dropping its future before it completes
    /// ends them at once, with the connections they serve. (With 0, the
    /// listener closes then too, but connections already upgraded to
    /// WebSockets go on as tasks of the caller's runtime.)
    pub workers: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8089)),
            allowed_origins: Vec::new(),
            allowed_hosts: Vec::new(),
            max_frame_bytes: 64 * 1024,
            max_connections_per_ip: 32,
            max_http_connections_per_ip: 16,
            request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(10),
            send_buffer_bytes: 256 * 1024,
            connections_per_second_per_ip: 20.0,
            messages_per_second: 200.0,
            max_audio_ahead: Duration::from_secs(10),
            start_timeout: Duration::from_secs(10),
            shutdown_deadline: Duration::from_secs(10),
            resume_window: Duration::from_secs(30),
            workers: 0,
        }
    }
}

impl ServerConfig {
    /// Checks the options; [`Server::bind`](super::Server::bind) does too.
    ///
    /// # Errors
    ///
    /// `InvalidConfig` naming the first option out of range: an allowed
    /// origin that no browser would send, an allowed host that is not a
    /// host name, a `max_frame_bytes` under 256, no connections per address,
    /// a rate that is not a positive number, more than 1024 `workers`, a
    /// `max_audio_ahead` under 100 ms, a zero timeout, or a
    /// `send_buffer_bytes` under 4 KiB.
    pub fn validate(&self) -> Result<()> {
        const OP: &str = "server.bind";
        let rate_ok = |r: f64| r.is_finite() && r > 0.0;
        if self.max_frame_bytes < 256 {
            return Err(BackendError::invalid_config(
                OP,
                format!(
                    "max_frame_bytes must be at least 256, got {}",
                    self.max_frame_bytes
                ),
            ));
        }
        if self.max_connections_per_ip == 0 {
            return Err(BackendError::invalid_config(
                OP,
                "max_connections_per_ip must be at least 1",
            ));
        }
        if self.max_http_connections_per_ip == 0 {
            return Err(BackendError::invalid_config(
                OP,
                "max_http_connections_per_ip must be at least 1",
            ));
        }
        if self.send_buffer_bytes < MIN_SEND_BUFFER {
            return Err(BackendError::invalid_config(
                OP,
                format!(
                    "send_buffer_bytes must be at least {MIN_SEND_BUFFER}, got {}",
                    self.send_buffer_bytes
                ),
            ));
        }
        for host in &self.allowed_hosts {
            check_allowed_host(host).map_err(|why| BackendError::invalid_config(OP, why))?;
        }
        if !rate_ok(self.connections_per_second_per_ip) {
            return Err(BackendError::invalid_config(
                OP,
                format!(
                    "connections_per_second_per_ip must be a positive number, got {}",
                    self.connections_per_second_per_ip
                ),
            ));
        }
        if !rate_ok(self.messages_per_second) {
            return Err(BackendError::invalid_config(
                OP,
                format!(
                    "messages_per_second must be a positive number, got {}",
                    self.messages_per_second
                ),
            ));
        }
        if self.workers > workers::MAX_WORKERS {
            return Err(BackendError::invalid_config(
                OP,
                format!(
                    "workers must be at most {}, got {}",
                    workers::MAX_WORKERS,
                    self.workers
                ),
            ));
        }
        for origin in &self.allowed_origins {
            check_allowed_origin(origin).map_err(|why| BackendError::invalid_config(OP, why))?;
        }
        if self.max_audio_ahead < MIN_AUDIO_AHEAD {
            return Err(BackendError::invalid_config(
                OP,
                format!(
                    "max_audio_ahead must be at least 100ms, got {}",
                    humantime::format_duration(self.max_audio_ahead)
                ),
            ));
        }
        for (name, timeout) in [
            ("start_timeout", self.start_timeout),
            ("request_timeout", self.request_timeout),
            ("idle_timeout", self.idle_timeout),
            ("send_timeout", self.send_timeout),
        ] {
            if timeout.is_zero() {
                return Err(BackendError::invalid_config(
                    OP,
                    format!("{name} must be more than zero"),
                ));
            }
        }
        Ok(())
    }
}

/// That `origin` is written as browsers send `Origin` (`scheme://host[:port]`,
/// no default port, path or wildcard), so it can match one.
fn check_allowed_origin(origin: &str) -> std::result::Result<(), String> {
    let trimmed = origin.trim_end_matches('/');
    let bad = |how: String| format!("allowed origin {origin:?} {how}");
    let url = url::Url::parse(trimmed).map_err(|_| {
        bad("is not an origin; write scheme://host[:port], e.g. https://app.example.com".into())
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(bad("is not an http or https origin".into()));
    }
    let canonical = url.origin().ascii_serialization();
    if canonical.eq_ignore_ascii_case(trimmed) {
        Ok(())
    } else {
        Err(bad(format!(
            "never matches: browsers send it as {canonical:?} (no default port, path or query)"
        )))
    }
}

/// That `entry` of [`ServerConfig::allowed_hosts`] can match a `Host`: `*`,
/// a host name or IP address without port, or `.` and a domain.
pub(super) fn check_allowed_host(entry: &str) -> std::result::Result<(), String> {
    let bad = || {
        format!(
            "allowed host {entry:?} is not a host: write a name (voice.example.com), an IP \
             address, .example.com for a domain and its subdomains, or * for any host"
        )
    };
    if entry == "*" {
        return Ok(());
    }
    if entry.contains('*') {
        return Err(bad());
    }
    let name = entry.strip_prefix('.').unwrap_or(entry);
    // Written as the host alone: no port (not even the default one, which
    // parsing drops), no path.
    let alone = |host: &url::Host<String>| host.to_string().eq_ignore_ascii_case(name);
    match parse_host(name) {
        Some((host @ url::Host::Domain(_), None)) if alone(&host) => Ok(()),
        Some((host, None)) if !entry.starts_with('.') && alone(&host) => Ok(()),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::burst_of;
    use super::*;
    use crate::error::ErrorCode;

    #[test]
    fn config_is_checked() {
        assert!(ServerConfig::default().validate().is_ok());
        for bad in [
            ServerConfig {
                max_frame_bytes: 10,
                ..ServerConfig::default()
            },
            ServerConfig {
                messages_per_second: f64::NAN,
                ..ServerConfig::default()
            },
            ServerConfig {
                connections_per_second_per_ip: 0.0,
                ..ServerConfig::default()
            },
            ServerConfig {
                max_connections_per_ip: 0,
                ..ServerConfig::default()
            },
            ServerConfig {
                workers: workers::MAX_WORKERS + 1,
                ..ServerConfig::default()
            },
            ServerConfig {
                max_audio_ahead: Duration::from_millis(99),
                ..ServerConfig::default()
            },
        ] {
            assert_eq!(bad.validate().unwrap_err().code, ErrorCode::InvalidConfig);
        }
        for origin in [
            "*",
            "app.example.com",
            "https://app.example.com:443",
            "https://app.example.com/page",
            "ftp://files.example.com",
        ] {
            let bad = ServerConfig {
                allowed_origins: vec![origin.into()],
                ..ServerConfig::default()
            };
            let e = bad.validate().unwrap_err();
            assert!(e.message.contains(origin), "{e}");
        }
        let e = ServerConfig {
            allowed_origins: vec!["https://app.example.com:443".into()],
            ..ServerConfig::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.message.contains("\"https://app.example.com\""), "{e}");
        for good in [
            "https://app.example.com",
            "http://localhost:8089/",
            "HTTPS://App.Example.com",
        ] {
            let config = ServerConfig {
                allowed_origins: vec![good.into()],
                ..ServerConfig::default()
            };
            assert!(config.validate().is_ok(), "{good}");
        }
        for workers in [0, 1, workers::MAX_WORKERS] {
            let config = ServerConfig {
                workers,
                ..ServerConfig::default()
            };
            assert!(config.validate().is_ok(), "{workers} workers");
        }
        let just_enough = ServerConfig {
            max_audio_ahead: MIN_AUDIO_AHEAD,
            ..ServerConfig::default()
        };
        assert!(just_enough.validate().is_ok());
        let too_many = ServerConfig {
            workers: 5000,
            ..ServerConfig::default()
        };
        let e = too_many.validate().unwrap_err();
        assert!(
            e.message.contains("workers must be at most 1024, got 5000"),
            "{e}"
        );
        assert_eq!(burst_of(200.0), 400);
        assert_eq!(burst_of(0.1), 1);
    }
}
