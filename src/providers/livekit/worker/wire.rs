//! The `/agent` wire: the worker's messages, and the server's decoded and
//! checked.

use livekit_protocol as proto;
use prost::Message as _;

use super::{JobKind, WorkerOptions, agent_url};
use crate::config::{Secret, shown_in_error};

pub(super) fn register(options: &WorkerOptions) -> proto::WorkerMessage {
    #[allow(deprecated)] // `agent` is deprecated but still read by servers.
    let permissions = proto::ParticipantPermission {
        can_subscribe: true,
        can_publish: true,
        can_publish_data: true,
        can_update_metadata: true,
        agent: true,
        ..Default::default()
    };
    let kind = match options.kind {
        JobKind::Room => proto::JobType::JtRoom,
        JobKind::Publisher => proto::JobType::JtPublisher,
    };
    worker_message(proto::worker_message::Message::Register(
        proto::RegisterWorkerRequest {
            r#type: kind as i32,
            agent_name: options.agent_name.clone(),
            version: options.version.clone(),
            ping_interval: options.ping_interval.as_secs().clamp(1, u32::MAX as u64) as u32,
            namespace: options.namespace.clone(),
            allowed_permissions: Some(permissions),
            ..Default::default()
        },
    ))
}

pub(super) fn worker_message(message: proto::worker_message::Message) -> proto::WorkerMessage {
    proto::WorkerMessage {
        message: Some(message),
    }
}

pub(super) fn job_status(id: &str, error: Option<String>) -> proto::WorkerMessage {
    let status = match error {
        None => proto::JobStatus::JsSuccess,
        Some(_) => proto::JobStatus::JsFailed,
    };
    worker_message(proto::worker_message::Message::UpdateJob(
        proto::UpdateJobStatus {
            job_id: id.to_owned(),
            status: status as i32,
            error: error.unwrap_or_default(),
        },
    ))
}

/// A job as the server describes it in an offer or an assignment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobInfo {
    /// The job's id.
    pub id: String,
    /// The dispatch that made it (may be empty).
    pub dispatch_id: String,
    /// The room's name.
    pub room: String,
    /// The participant a publisher job is for.
    pub participant: Option<String>,
    /// The dispatch's metadata.
    pub metadata: String,
    /// The agent name the job was dispatched to.
    pub agent_name: String,
}

/// One message from the server, checked.
#[derive(Debug)]
#[non_exhaustive]
pub enum ServerEvent {
    /// The worker is registered, under this id.
    Registered {
        /// The id the server gave the worker.
        worker_id: String,
    },
    /// A job offer: will the worker take it?
    Offer {
        /// The job.
        job: JobInfo,
        /// Whether the job ran on another worker before.
        resuming: bool,
    },
    /// The job the worker accepted is its own: join the room.
    Assigned {
        /// The job.
        job: JobInfo,
        /// The token the server minted for the agent.
        token: Secret,
        /// Where to join, when not the worker's server.
        url: Option<String>,
    },
    /// The server ended a job.
    Terminated {
        /// The job's id.
        job_id: String,
    },
    /// The answer to a ping.
    Pong {
        /// The timestamp of the ping answered.
        last_timestamp: i64,
    },
    /// The server is draining the connection: register again.
    GoAway {
        /// Why.
        reason: String,
    },
}

/// Decodes and checks one binary message from the server: a
/// `ServerMessage` with a message this worker knows, a job with an id and a
/// room, an assignment with a token (and a usable URL when it names one).
///
/// # Errors
///
/// What was wrong with the message; the worker counts it as malformed and
/// skips it.
pub fn decode_server_message(bytes: &[u8]) -> std::result::Result<ServerEvent, String> {
    use proto::server_message::Message as M;
    let message = proto::ServerMessage::decode(bytes)
        .map_err(|e| format!("not a protobuf ServerMessage ({e})"))?;
    match message.message {
        None => Err("a ServerMessage with no message this worker knows".into()),
        Some(M::Register(r)) if r.worker_id.is_empty() => {
            Err("a registration answer without a worker id".into())
        }
        Some(M::Register(r)) => Ok(ServerEvent::Registered {
            worker_id: r.worker_id,
        }),
        Some(M::Availability(a)) => Ok(ServerEvent::Offer {
            job: job_info(a.job, "job offer")?,
            resuming: a.resuming,
        }),
        Some(M::Assignment(a)) => {
            let job = job_info(a.job, "job assignment")?;
            if a.token.is_empty() {
                return Err(format!(
                    "the assignment of job {:?} has no token",
                    shown_in_error(&job.id)
                ));
            }
            let url = a.url.filter(|u| !u.is_empty());
            if let Some(u) = &url
                && let Err(m) = agent_url(u)
            {
                return Err(format!(
                    "the assignment of job {:?} names a server URL that {m}",
                    shown_in_error(&job.id)
                ));
            }
            Ok(ServerEvent::Assigned {
                job,
                token: Secret::new(a.token),
                url,
            })
        }
        Some(M::Termination(t)) if t.job_id.is_empty() => {
            Err("a job termination without a job id".into())
        }
        Some(M::Termination(t)) => Ok(ServerEvent::Terminated { job_id: t.job_id }),
        Some(M::Pong(p)) => Ok(ServerEvent::Pong {
            last_timestamp: p.last_timestamp,
        }),
        Some(M::GoAway(g)) => Ok(ServerEvent::GoAway { reason: g.reason }),
    }
}

fn job_info(job: Option<proto::Job>, what: &str) -> std::result::Result<JobInfo, String> {
    let job = job.ok_or_else(|| format!("a {what} without a job"))?;
    if job.id.is_empty() {
        return Err(format!("a {what} whose job has no id"));
    }
    let room = job
        .room
        .map(|r| r.name)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            format!(
                "a {what} for job {:?} without a room name",
                shown_in_error(&job.id)
            )
        })?;
    Ok(JobInfo {
        id: job.id,
        dispatch_id: job.dispatch_id,
        room,
        participant: job
            .participant
            .map(|p| p.identity)
            .filter(|i| !i.is_empty()),
        metadata: job.metadata,
        agent_name: job.agent_name,
    })
}
