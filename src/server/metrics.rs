//! The server's own metrics, rendered next to the backend's on `/metrics`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering::Relaxed};

/// Why a connection ended without a session (the `reason` label of
/// `server_connections_refused_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    /// The `Origin` header is not allowed (HTTP 403).
    Origin,
    /// The `Host` header names a host the server may not be reached by
    /// (HTTP 403).
    Host,
    /// The auth hook refused the token (close 1008).
    Auth,
    /// Too many connections per second from the address (HTTP 429), or the
    /// backend's session rate limit (close 1013).
    RateLimit,
    /// Too many connections from the address (HTTP 429), or the backend is
    /// full (close 1013).
    Capacity,
    /// The client broke the protocol before its session started (close
    /// 1002; 1007 for text that is not UTF-8, 1009 for a message over the
    /// limit).
    Protocol,
    /// No `start` within `start_timeout` (close 1002).
    StartTimeout,
    /// The server is shutting down (HTTP 503 or close 1001).
    Shutdown,
    /// The session could not be created or started (close 1011).
    Error,
}

impl Refusal {
    const ALL: [Refusal; 9] = [
        Refusal::Origin,
        Refusal::Host,
        Refusal::Auth,
        Refusal::RateLimit,
        Refusal::Capacity,
        Refusal::Protocol,
        Refusal::StartTimeout,
        Refusal::Shutdown,
        Refusal::Error,
    ];

    const fn as_str(self) -> &'static str {
        match self {
            Refusal::Origin => "origin",
            Refusal::Host => "host",
            Refusal::Auth => "auth",
            Refusal::RateLimit => "rate_limit",
            Refusal::Capacity => "capacity",
            Refusal::Protocol => "protocol",
            Refusal::StartTimeout => "start_timeout",
            Refusal::Shutdown => "shutdown",
            Refusal::Error => "error",
        }
    }
}

/// Why the server dropped a connection without a WebSocket close frame (the
/// `reason` label of `server_connections_dropped_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Dropped {
    /// An HTTP connection beyond `max_http_connections_per_ip`.
    AddressLimit,
    /// An HTTP connection that sent no whole request within
    /// `request_timeout` (idle keep-alive included).
    RequestTimeout,
    /// A WebSocket client that took nothing for `send_timeout`.
    NotReading,
}

impl Dropped {
    const ALL: [Dropped; 3] = [
        Dropped::AddressLimit,
        Dropped::RequestTimeout,
        Dropped::NotReading,
    ];

    const fn as_str(self) -> &'static str {
        match self {
            Dropped::AddressLimit => "address_limit",
            Dropped::RequestTimeout => "request_timeout",
            Dropped::NotReading => "not_reading",
        }
    }
}

/// The close codes the server sends, in label order.
const CLOSE_CODES: [u16; 10] = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1011, 1013, 0];

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Counters of the server, all relaxed atomics.
#[derive(Debug, Default)]
pub(super) struct ServerMetrics {
    active: AtomicI64,
    total: AtomicU64,
    refused: [AtomicU64; Refusal::ALL.len()],
    messages: [Messages; SHARDS],
    closed: [AtomicU64; CLOSE_CODES.len()],
    /// WebSocket connections whose client went without a close frame.
    vanished: AtomicU64,
    /// Connections closed by the server without a close frame, by why
    /// ([`Dropped`]).
    dropped: [AtomicU64; Dropped::ALL.len()],
    /// Failed `accept` calls (out of file descriptors, memory, ...).
    accept_errors: AtomicU64,
    /// Sessions in their resume window now.
    detached: AtomicI64,
    /// Sessions detached so far.
    detaches: AtomicU64,
    /// Sessions taken up by a `resume`.
    resumes: AtomicU64,
    /// Resume windows that ended without a resume.
    windows_expired: AtomicU64,
    /// TCP connections each worker thread serves now (empty without workers).
    workers: Box<[WorkerLoad]>,
}

/// One worker's connection count, on a cache line of its own: the acceptor
/// and the worker both write it.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(super) struct WorkerLoad(pub(super) AtomicUsize);

/// Shards of the message counters, which every message of every connection
/// adds to: a thread adds to its own shard (threads take the shards in turn),
/// each on cache lines of its own, so the runtime's threads do not pass one
/// line back and forth (nor the lines of the fields around it). Reading
/// sums the shards.
const SHARDS: usize = 8;

#[derive(Debug, Default)]
#[repr(align(128))]
struct Messages {
    inbound: AtomicU64,
    outbound: AtomicU64,
}

/// The calling thread's shard.
fn shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Relaxed) % SHARDS;
    }
    SHARD.with(|s| *s)
}

impl ServerMetrics {
    pub(super) fn connection_attempt(&self) {
        self.total.fetch_add(1, Relaxed);
    }

    pub(super) fn connection_opened(&self) {
        self.active.fetch_add(1, Relaxed);
    }

    pub(super) fn connection_closed(&self) {
        self.active.fetch_sub(1, Relaxed);
    }

    pub(super) fn refused(&self, reason: Refusal) {
        self.refused[reason as usize].fetch_add(1, Relaxed);
    }

    /// A WebSocket client went without a close frame.
    pub(super) fn vanished(&self) {
        self.vanished.fetch_add(1, Relaxed);
    }

    /// The server dropped a connection without a close frame.
    pub(super) fn dropped(&self, why: Dropped) {
        self.dropped[why as usize].fetch_add(1, Relaxed);
    }

    /// `accept` failed.
    pub(super) fn accept_failed(&self) {
        self.accept_errors.fetch_add(1, Relaxed);
    }

    /// A session was detached: its resume window began.
    pub(super) fn detached(&self) {
        self.detaches.fetch_add(1, Relaxed);
        self.detached.fetch_add(1, Relaxed);
    }

    /// A detached session left its window (taken up, expired, closed by
    /// itself, or stopped on shutdown).
    pub(super) fn reattached_or_gone(&self) {
        self.detached.fetch_sub(1, Relaxed);
    }

    /// A `resume` took a session up.
    pub(super) fn resumed(&self) {
        self.resumes.fetch_add(1, Relaxed);
    }

    /// A resume window ended without a resume.
    pub(super) fn window_expired(&self) {
        self.windows_expired.fetch_add(1, Relaxed);
    }

    pub(super) fn message_in(&self) {
        self.messages[shard()].inbound.fetch_add(1, Relaxed);
    }

    pub(super) fn message_out(&self) {
        self.messages[shard()].outbound.fetch_add(1, Relaxed);
    }

    /// A close frame the server sent (code 0 stands for any other code).
    pub(super) fn closed_with(&self, code: u16) {
        let i = CLOSE_CODES
            .iter()
            .position(|&c| c == code)
            .unwrap_or(CLOSE_CODES.len() - 1);
        self.closed[i].fetch_add(1, Relaxed);
    }

    /// Appends the Prometheus text exposition of the server's families.
    /// Counters for a server with `workers` worker threads.
    pub(super) fn with_workers(workers: usize) -> Self {
        ServerMetrics {
            workers: (0..workers).map(|_| WorkerLoad::default()).collect(),
            ..ServerMetrics::default()
        }
    }

    /// The connection count of each worker thread.
    pub(super) fn worker_loads(&self) -> &[WorkerLoad] {
        &self.workers
    }

    pub(super) fn render(&self, out: &mut String) {
        family(
            out,
            "server_connections_active",
            "gauge",
            "WebSocket connections open now.",
        );
        let _ = writeln!(
            out,
            "server_connections_active {}",
            self.active.load(Relaxed).max(0)
        );
        family(
            out,
            "server_connections_total",
            "counter",
            "WebSocket upgrade requests received on /ws, refused or not.",
        );
        let _ = writeln!(out, "server_connections_total {}", self.total.load(Relaxed));
        family(
            out,
            "server_connections_refused_total",
            "counter",
            "WebSocket connections that ended without a session, by reason.",
        );
        for r in Refusal::ALL {
            let _ = writeln!(
                out,
                "server_connections_refused_total{{reason=\"{}\"}} {}",
                r.as_str(),
                self.refused[r as usize].load(Relaxed)
            );
        }
        family(
            out,
            "server_messages_total",
            "counter",
            "WebSocket data messages (text and binary), by direction.",
        );
        let _ = writeln!(
            out,
            "server_messages_total{{direction=\"in\"}} {}",
            self.messages
                .iter()
                .map(|m| m.inbound.load(Relaxed))
                .sum::<u64>()
        );
        let _ = writeln!(
            out,
            "server_messages_total{{direction=\"out\"}} {}",
            self.messages
                .iter()
                .map(|m| m.outbound.load(Relaxed))
                .sum::<u64>()
        );
        family(
            out,
            "server_closes_total",
            "counter",
            "Close frames the server sent, by close code (\"other\" for the rest).",
        );
        for (i, code) in CLOSE_CODES.iter().enumerate() {
            let label = match code {
                0 => "other".to_owned(),
                c => c.to_string(),
            };
            let _ = writeln!(
                out,
                "server_closes_total{{code=\"{label}\"}} {}",
                self.closed[i].load(Relaxed)
            );
        }
        family(
            out,
            "server_connections_vanished_total",
            "counter",
            "WebSocket connections whose client went without a close frame (reset or closed TCP).",
        );
        let _ = writeln!(
            out,
            "server_connections_vanished_total {}",
            self.vanished.load(Relaxed)
        );
        family(
            out,
            "server_connections_dropped_total",
            "counter",
            "Connections the server closed without a WebSocket close frame, by reason.",
        );
        for d in Dropped::ALL {
            let _ = writeln!(
                out,
                "server_connections_dropped_total{{reason=\"{}\"}} {}",
                d.as_str(),
                self.dropped[d as usize].load(Relaxed)
            );
        }
        family(
            out,
            "server_accept_errors_total",
            "counter",
            "Failed accepts of new TCP connections (out of file descriptors, memory, ...).",
        );
        let _ = writeln!(
            out,
            "server_accept_errors_total {}",
            self.accept_errors.load(Relaxed)
        );
        family(
            out,
            "server_sessions_detached",
            "gauge",
            "Sessions whose client went away, running on in their resume window now.",
        );
        let _ = writeln!(
            out,
            "server_sessions_detached {}",
            self.detached.load(Relaxed).max(0)
        );
        family(
            out,
            "server_sessions_detached_total",
            "counter",
            "Sessions whose client went away without a close, kept for a resume.",
        );
        let _ = writeln!(
            out,
            "server_sessions_detached_total {}",
            self.detaches.load(Relaxed)
        );
        family(
            out,
            "server_resumes_total",
            "counter",
            "Sessions taken up again by a resume (within the resume window, or restored from the store).",
        );
        let _ = writeln!(out, "server_resumes_total {}", self.resumes.load(Relaxed));
        family(
            out,
            "server_resume_windows_expired_total",
            "counter",
            "Detached sessions stopped because their resume window ended without a resume.",
        );
        let _ = writeln!(
            out,
            "server_resume_windows_expired_total {}",
            self.windows_expired.load(Relaxed)
        );
        if self.workers.is_empty() {
            return;
        }
        family(
            out,
            "server_worker_connections",
            "gauge",
            "TCP connections (HTTP and WebSocket) each worker thread serves now.",
        );
        for (i, load) in self.workers.iter().enumerate() {
            let _ = writeln!(
                out,
                "server_worker_connections{{worker=\"{i}\"}} {}",
                load.0.load(Relaxed)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_series() {
        let m = ServerMetrics::default();
        m.connection_attempt();
        m.connection_opened();
        m.refused(Refusal::Origin);
        m.message_in();
        m.message_out();
        m.message_out();
        m.closed_with(1009);
        m.closed_with(4000);
        m.vanished();
        m.dropped(Dropped::NotReading);
        m.accept_failed();
        m.detached();
        m.detached();
        m.reattached_or_gone();
        m.resumed();
        m.window_expired();
        let mut text = String::new();
        m.render(&mut text);
        for line in [
            "server_connections_active 1",
            "server_connections_total 1",
            "server_connections_refused_total{reason=\"origin\"} 1",
            "server_connections_refused_total{reason=\"auth\"} 0",
            "server_messages_total{direction=\"in\"} 1",
            "server_messages_total{direction=\"out\"} 2",
            "server_closes_total{code=\"1009\"} 1",
            "server_closes_total{code=\"other\"} 1",
            "server_connections_vanished_total 1",
            "server_connections_dropped_total{reason=\"not_reading\"} 1",
            "server_connections_dropped_total{reason=\"address_limit\"} 0",
            "server_accept_errors_total 1",
            "server_sessions_detached 1",
            "server_sessions_detached_total 2",
            "server_resumes_total 1",
            "server_resume_windows_expired_total 1",
            "# TYPE server_connections_active gauge",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        assert!(!text.contains("server_worker_connections"), "no workers");

        let m = ServerMetrics::with_workers(2);
        m.worker_loads()[1].0.fetch_add(3, Relaxed);
        let mut text = String::new();
        m.render(&mut text);
        for line in [
            "# TYPE server_worker_connections gauge",
            "server_worker_connections{worker=\"0\"} 0",
            "server_worker_connections{worker=\"1\"} 3",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }
}
