//! Serving on worker threads ([`ServerConfig::workers`](super::ServerConfig::workers)):
//! each worker is a runtime with one thread, serving the connections handed
//! to it, and no task ever moves between workers.
//!
//! The acceptor (on the runtime that calls [`Server::run`](super::Server::run))
//! takes connections off the listener and hands each to the worker serving
//! the fewest connections at that moment (the first such after the previous
//! choice, so equal workers take turns); each worker's count is the gauge
//! `server_worker_connections`.
//! A connection's WebSocket task, its session's task, the components' tasks
//! and their timers then all live on one thread: a wake-up between them is a
//! push onto that thread's own run queue, never a notification to another
//! thread, and no scheduler moves tasks (and their data) between cores.
//!
//! A worker is tokio's multi-thread runtime with one worker thread rather
//! than a current-thread runtime: its scheduler runs a task woken by the
//! running one next (the "LIFO slot"), so the chain of wake-ups from a
//! turn's last audio frame to the first reply frame on the socket (session,
//! model, playout, connection) runs without waiting behind every other ready
//! task of the thread. With a current-thread runtime each of those hops went
//! to the back of the queue, and with 1,000 sessions on two cores the
//! server's first-audio latency at the 99th percentile grew from well under
//! a millisecond to 1-17 ms (10 ms or more in two of three runs).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use axum::Router;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio::sync::watch;

/// The most worker threads a server may have ([`ServerConfig::workers`](super::ServerConfig::workers)).
pub const MAX_WORKERS: usize = 1024;

use super::Shared;
use super::http::{Slot, serve_http};
use super::metrics::WorkerLoad;

/// A connection counted against a worker until dropped.
struct Ticket {
    shared: Arc<Shared>,
    worker: usize,
}

impl Ticket {
    fn new(shared: &Arc<Shared>, worker: usize) -> Ticket {
        shared.metrics.worker_loads()[worker]
            .0
            .fetch_add(1, Ordering::Relaxed);
        Ticket {
            shared: Arc::clone(shared),
            worker,
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.shared.metrics.worker_loads()[self.worker]
            .0
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// A worker's connection: the socket, counted against the worker while open.
pub(super) struct Counted {
    tcp: TcpStream,
    _ticket: Ticket,
}

super::write_through!(impl[] Counted, tcp);

impl AsyncRead for Counted {
    #[inline]
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

/// The running workers. Dropping them ends every worker at once, with
/// whatever it still serves.
pub(super) struct Workers {
    runtimes: Vec<Runtime>,
    /// The worker that took the last connection.
    last: usize,
}

impl Workers {
    /// Starts `count` workers (threads `vb-serve-0`, `vb-serve-1`, ...).
    pub(super) fn start(count: usize) -> io::Result<Workers> {
        let mut runtimes = Vec::with_capacity(count);
        for i in 0..count {
            runtimes.push(
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name(format!("vb-serve-{i}"))
                    .enable_all()
                    .build()?,
            );
        }
        Ok(Workers {
            last: count.saturating_sub(1),
            runtimes,
        })
    }

    /// Hands an accepted connection to the least loaded worker, which
    /// serves it (see [`serve_http`]).
    pub(super) fn serve(
        &mut self,
        shared: &Arc<Shared>,
        app: &Router,
        tcp: TcpStream,
        peer: SocketAddr,
        slot: Slot,
        stop: watch::Receiver<bool>,
    ) {
        // Taken off this runtime's reactor; the worker registers it with its own.
        let stream = match tcp.into_std() {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(%peer, "dropped an accepted connection: {e}");
                return;
            }
        };
        let worker = least_loaded(shared.metrics.worker_loads(), self.last);
        self.last = worker;
        let ticket = Ticket::new(shared, worker);
        let shared = Arc::clone(shared);
        let app = app.clone();
        self.runtimes[worker].spawn(async move {
            match TcpStream::from_std(stream) {
                Ok(tcp) => {
                    let counted = Counted {
                        tcp,
                        _ticket: ticket,
                    };
                    serve_http(shared, app, counted, peer, slot, stop).await;
                }
                Err(e) => tracing::warn!(%peer, "dropped an accepted connection: {e}"),
            }
        });
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        // Without waiting for the threads: this may run inside a runtime.
        for runtime in self.runtimes.drain(..) {
            runtime.shutdown_background();
        }
    }
}

/// The worker with the fewest connections; of equals, the first after
/// `last`.
fn least_loaded(loads: &[WorkerLoad], last: usize) -> usize {
    let n = loads.len();
    (1..=n)
        .map(|step| (last + step) % n)
        .min_by_key(|&i| loads[i].0.load(Ordering::Relaxed))
        .unwrap_or(0)
}

/// Completes when `flag` turns `true` or its sender is dropped.
pub(super) async fn wait_true_ref(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|v| *v).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loads(counts: &[usize]) -> Vec<WorkerLoad> {
        counts
            .iter()
            .map(|&n| {
                let load = WorkerLoad::default();
                load.0.store(n, Ordering::Relaxed);
                load
            })
            .collect()
    }

    #[test]
    fn the_least_loaded_worker_gets_the_connection_and_equals_take_turns() {
        // Equal loads: the one after the last choice, wrapping around.
        assert_eq!(least_loaded(&loads(&[0, 0, 0]), 2), 0);
        assert_eq!(least_loaded(&loads(&[1, 0, 0]), 0), 1);
        assert_eq!(least_loaded(&loads(&[1, 1, 0]), 1), 2);
        assert_eq!(least_loaded(&loads(&[4, 4, 4]), 1), 2);
        // A worker whose connections closed is filled up first, even out of turn.
        assert_eq!(least_loaded(&loads(&[2, 0, 2]), 1), 1);
        assert_eq!(least_loaded(&loads(&[2, 1, 2]), 1), 1);
        assert_eq!(least_loaded(&loads(&[3, 5, 2]), 2), 2);
        assert_eq!(least_loaded(&loads(&[7]), 0), 0);
    }
}
