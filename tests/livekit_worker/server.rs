//! An in-process LiveKit `/agent` endpoint, bound to 127.0.0.1:0: it checks
//! each worker's token with LiveKit's own `TokenVerifier` (the API key as
//! issuer, the `agent` video grant), refuses a bad one with HTTP 401, and
//! hands each accepted connection to the test, which plays the server's
//! side of the protocol in `livekit_protocol`'s binary protobuf messages.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use livekit_api::access_token::{Claims, TokenVerifier};
use livekit_protocol as proto;
use prost::Message as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;

use proto::server_message::Message as S;
use proto::worker_message::Message as W;

/// How long the test waits for anything from the worker.
pub const WAIT: Duration = Duration::from_secs(5);

pub struct AgentServer {
    /// The server's URL, as a worker is configured with it.
    pub url: String,
    /// Connections refused for their token or path.
    pub refused: Arc<AtomicUsize>,
    conns: mpsc::UnboundedReceiver<Conn>,
    listener: JoinHandle<()>,
}

impl AgentServer {
    /// A server taking tokens signed with `secret` and issued by `key`.
    pub async fn start(key: &str, secret: &str) -> AgentServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}", listener.local_addr().unwrap());
        let verifier = TokenVerifier::with_api_key(key, secret);
        let refused = Arc::new(AtomicUsize::new(0));
        let (tx, conns) = mpsc::unbounded_channel();
        let counted = refused.clone();
        let listener = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (verifier, tx, refused) = (verifier.clone(), tx.clone(), counted.clone());
                tokio::spawn(async move {
                    if let Some(conn) = accept(tcp, &verifier).await {
                        let _ = tx.send(conn);
                    } else {
                        refused.fetch_add(1, Ordering::SeqCst);
                    }
                });
            }
        });
        AgentServer {
            url,
            refused,
            conns,
            listener,
        }
    }

    /// The next worker connection that passed the token check.
    pub async fn next_conn(&mut self) -> Conn {
        tokio::time::timeout(WAIT, self.conns.recv())
            .await
            .expect("no worker connected in time")
            .expect("the server stopped")
    }

    /// Whether a connection arrives within `wait`.
    pub async fn conn_within(&mut self, wait: Duration) -> Option<Conn> {
        tokio::time::timeout(wait, self.conns.recv())
            .await
            .ok()
            .flatten()
    }

    /// Stops listening: further dials are refused by the OS.
    pub fn shut(&self) {
        self.listener.abort();
    }
}

// The handshake callback's error type is tungstenite's HTTP response.
#[allow(clippy::result_large_err)]
async fn accept(tcp: TcpStream, verifier: &TokenVerifier) -> Option<Conn> {
    let mut claims = None;
    let check = |request: &Request, response: Response| {
        let refuse = |why: &str| {
            let mut r = ErrorResponse::new(Some(why.to_owned()));
            *r.status_mut() = StatusCode::UNAUTHORIZED;
            r
        };
        if request.uri().path() != "/agent" {
            return Err(refuse("not /agent"));
        }
        let token = request
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| refuse("no bearer token"))?;
        let verified = verifier.verify(token).map_err(|_| refuse("bad token"))?;
        if !verified.video.agent {
            return Err(refuse("no agent grant"));
        }
        claims = Some(verified);
        Ok(response)
    };
    let ws = tokio_tungstenite::accept_hdr_async(tcp, check).await.ok()?;
    Some(Conn {
        ws,
        claims: claims?,
        pong: true,
    })
}

/// One worker's connection, the server's side.
pub struct Conn {
    ws: WebSocketStream<TcpStream>,
    /// The worker's verified token.
    pub claims: Claims,
    /// Answer the worker's pings (and hide them from `recv`).
    pub pong: bool,
}

impl Conn {
    /// The worker's next message (pings answered and skipped while
    /// `pong`); panics on a close or after [`WAIT`].
    pub async fn recv(&mut self) -> W {
        self.recv_by(tokio::time::Instant::now() + WAIT).await
    }

    /// The worker's next message, by `deadline` (pings answered and
    /// skipped while `pong` count against it).
    async fn recv_by(&mut self, deadline: tokio::time::Instant) -> W {
        loop {
            let frame = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .expect("the worker sent nothing in time")
                .expect("the worker closed the connection")
                .expect("the connection failed");
            let WsMessage::Binary(bytes) = frame else {
                continue;
            };
            let message = proto::WorkerMessage::decode(bytes.as_ref())
                .expect("the worker sent a malformed message")
                .message
                .expect("the worker sent an empty message");
            match message {
                W::Ping(ping) if self.pong => {
                    self.send(S::Pong(proto::WorkerPong {
                        last_timestamp: ping.timestamp,
                        timestamp: ping.timestamp,
                    }))
                    .await;
                }
                other => return other,
            }
        }
    }

    /// The next message `pick` takes, skipping others.
    pub async fn recv_where<T>(&mut self, mut pick: impl FnMut(W) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(t) = pick(self.recv_by(deadline).await) {
                return t;
            }
        }
    }

    /// The next load report matching `want`.
    pub async fn update_where(
        &mut self,
        mut want: impl FnMut(&proto::UpdateWorkerStatus) -> bool,
    ) -> proto::UpdateWorkerStatus {
        self.recv_where(|m| match m {
            W::UpdateWorker(u) if want(&u) => Some(u),
            _ => None,
        })
        .await
    }

    /// The next job status update.
    pub async fn job_update(&mut self) -> proto::UpdateJobStatus {
        self.recv_where(|m| match m {
            W::UpdateJob(u) => Some(u),
            _ => None,
        })
        .await
    }

    /// Whether the worker closes the connection (or it ends) within `wait`.
    pub async fn closed_within(&mut self, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return false,
                Ok(None | Some(Err(_)) | Some(Ok(WsMessage::Close(_)))) => return true,
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    pub async fn send(&mut self, message: S) {
        let bytes = proto::ServerMessage {
            message: Some(message),
        }
        .encode_to_vec();
        self.send_raw(WsMessage::Binary(bytes.into())).await;
    }

    pub async fn send_raw(&mut self, frame: WsMessage) {
        self.ws.send(frame).await.expect("the worker is gone");
    }

    /// Expects the registration (the first message) and answers it.
    pub async fn register(&mut self, worker_id: &str) -> proto::RegisterWorkerRequest {
        let W::Register(request) = self.recv().await else {
            panic!("the worker's first message is not its registration");
        };
        self.send(S::Register(proto::RegisterWorkerResponse {
            worker_id: worker_id.to_owned(),
            server_info: Some(proto::ServerInfo::default()),
            ..Default::default()
        }))
        .await;
        request
    }

    /// Offers job `id` in `room`; the worker's answer.
    pub async fn offer(&mut self, id: &str, room: &str) -> proto::AvailabilityResponse {
        self.send(S::Availability(proto::AvailabilityRequest {
            job: Some(job(id, room)),
            resuming: false,
        }))
        .await;
        self.recv_where(|m| match m {
            W::Availability(a) => Some(a),
            _ => None,
        })
        .await
    }

    /// Assigns job `id` in `room` with `token`.
    pub async fn assign(&mut self, id: &str, room: &str, token: &str, url: Option<&str>) {
        self.send(S::Assignment(proto::JobAssignment {
            job: Some(job(id, room)),
            url: url.map(str::to_owned),
            token: token.to_owned(),
        }))
        .await;
    }

    /// Terminates job `id`.
    pub async fn terminate(&mut self, id: &str) {
        self.send(S::Termination(proto::JobTermination {
            job_id: id.to_owned(),
        }))
        .await;
    }
}

/// A room job as the server sends it, dispatched for the participant `user`.
pub fn job(id: &str, room: &str) -> proto::Job {
    proto::Job {
        id: id.to_owned(),
        dispatch_id: format!("AD_{id}"),
        r#type: proto::JobType::JtRoom as i32,
        room: Some(proto::Room {
            name: room.to_owned(),
            sid: format!("RM_{room}"),
            ..Default::default()
        }),
        participant: Some(proto::ParticipantInfo {
            identity: "user".to_owned(),
            ..Default::default()
        }),
        metadata: format!("meta-{id}"),
        agent_name: "support".to_owned(),
        ..Default::default()
    }
}
