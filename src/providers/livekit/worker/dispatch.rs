//! The provider's side of worker mode: jobs become sessions.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::super::{JoinTarget, LiveKitConfig};
use super::{Job, Load, Worker, WorkerOptions, lock};
use crate::config::{Config, Secret};
use crate::error::{BackendError, ErrorCode, Result};
use crate::runtime::{LinkRequest, RetryPolicy};

/// The `livekit` provider's worker mode: a [`Worker`] made from the
/// provider's config, whose jobs become sessions.
///
/// The worker's capacity is the backend's `max_concurrent_sessions`, and its
/// load the jobs its sessions hold (every session in worker mode comes from
/// a job). [`Dispatch::claim`] gives a session the next job (waiting for
/// one up to half the backend's `timeout`), keyed by the session's id;
/// [`Dispatch::release`] ends it when the session ends or fails to open.
pub struct Dispatch {
    options: WorkerOptions,
    capacity: usize,
    claim_wait: Duration,
    worker: Mutex<Option<Arc<Worker>>>,
    jobs: Mutex<HashMap<String, Job>>,
}

impl fmt::Debug for Dispatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dispatch")
            .field("options", &self.options)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl Dispatch {
    /// The worker mode of a backend with `backend`'s config and `config` as
    /// its `provider_config`: its server, keys and agent name, the
    /// backend's retry policy and capacity.
    ///
    /// # Errors
    ///
    /// `InvalidConfig` when the worker's options are not usable.
    pub fn new(config: Arc<LiveKitConfig>, backend: &Config) -> Result<Dispatch> {
        let mut options = WorkerOptions::new(
            config.url.clone(),
            Secret::new(config.api_key.clone()),
            config.api_secret.clone(),
        );
        options.agent_name = config.agent_name.clone();
        options.retry = RetryPolicy::from_config(backend);
        options.check()?;
        Ok(Dispatch {
            options,
            capacity: backend.max_concurrent_sessions as usize,
            claim_wait: backend.timeout / 2,
            worker: Mutex::default(),
            jobs: Mutex::default(),
        })
    }

    /// Starts the worker (once; a started worker is kept).
    ///
    /// # Errors
    ///
    /// As [`Worker::start`].
    pub async fn start(&self) -> Result<()> {
        if lock(&self.worker).is_some() {
            return Ok(());
        }
        let capacity = self.capacity;
        let load = Arc::new(move || Load {
            active: 0,
            capacity,
        });
        let worker = Arc::new(Worker::start(self.options.clone(), load).await?);
        let mut slot = lock(&self.worker);
        if slot.is_none() {
            *slot = Some(worker);
        }
        Ok(())
    }

    /// The running worker, once started.
    pub fn worker(&self) -> Option<Arc<Worker>> {
        lock(&self.worker).clone()
    }

    /// The job of session `request.session_id`: the one it already holds
    /// (a retried open), or the next assigned job. Publishes the room, the
    /// server URL and the job id as session info.
    ///
    /// # Errors
    ///
    /// `Timeout` when no job is assigned within half the backend's
    /// `timeout`, `ConnectionFailed` when the worker is not running.
    pub async fn claim(&self, request: &LinkRequest<'_>) -> Result<Claim> {
        const CLAIM: &str = "livekit.claim_job";
        let held = lock(&self.jobs).get(request.session_id).map(Claim::of);
        if let Some(claim) = held {
            return Ok(claim);
        }
        let worker = self.worker().ok_or_else(|| {
            BackendError::new(
                CLAIM,
                ErrorCode::ConnectionFailed,
                "the LiveKit worker is not running",
            )
        })?;
        let job = tokio::time::timeout(self.claim_wait, worker.next_job())
            .await
            .map_err(|_| {
                BackendError::new(
                    CLAIM,
                    ErrorCode::Timeout,
                    format!(
                        "LiveKit assigned this worker no job within {}",
                        humantime::format_duration(self.claim_wait)
                    ),
                )
            })?
            .ok_or_else(|| {
                BackendError::new(
                    CLAIM,
                    ErrorCode::ConnectionFailed,
                    format!("the LiveKit worker is {}", worker.state().as_str()),
                )
            })?;
        request.info.set("room", job.room.clone());
        request.info.set("url", job.url.clone());
        request.info.set("job_id", job.id.clone());
        let claim = Claim::of(&job);
        lock(&self.jobs).insert(request.session_id.to_owned(), job);
        Ok(claim)
    }

    /// Ends the job of session `session_id` (if it holds one): as failed
    /// with `failure`, or as done.
    pub fn release(&self, session_id: &str, failure: Option<&str>) {
        let job = lock(&self.jobs).remove(session_id);
        if let (Some(job), Some(why)) = (job, failure) {
            job.fail(why);
        }
        if let Some(worker) = self.worker() {
            worker.load_changed();
        }
    }

    /// Resolves when the server terminates the job of session `session_id`;
    /// never when the session holds none.
    pub async fn terminated(&self, session_id: &str) {
        let signal = lock(&self.jobs)
            .get(session_id)
            .map(|job| job.lease.terminated.clone());
        match signal {
            Some(mut rx) => {
                if rx.wait_for(|t| *t).await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending().await,
        }
    }

    /// Stops the worker.
    pub async fn stop(&self) {
        let worker = lock(&self.worker).take();
        if let Some(worker) = worker {
            worker.stop().await;
        }
    }

    /// The worker's health details ([`Worker::health`]), or its state as
    /// `not_started`.
    pub fn health(&self) -> BTreeMap<String, String> {
        match self.worker() {
            Some(worker) => worker.health(),
            None => BTreeMap::from([("livekit_worker_state".into(), "not_started".into())]),
        }
    }
}

/// What a session needs of its job to join the room.
#[derive(Clone, Debug)]
pub struct Claim {
    /// The job's id.
    pub job_id: String,
    /// The room to join.
    pub room: String,
    /// The agent's identity in it (the one its token carries).
    pub identity: String,
    /// The participant a publisher job is for; `None` for a room job.
    pub participant: Option<String>,
    /// The token the server minted for the agent.
    pub token: Secret,
    /// The server to join at.
    pub url: String,
}

impl Claim {
    fn of(job: &Job) -> Claim {
        Claim {
            job_id: job.id.clone(),
            room: job.room.clone(),
            identity: job.identity.clone(),
            participant: job.participant.clone(),
            token: job.token.clone(),
            url: job.url.clone(),
        }
    }
}

impl From<Claim> for JoinTarget {
    fn from(claim: Claim) -> JoinTarget {
        JoinTarget {
            room: claim.room,
            token: claim.token,
            // A publisher job names its user; a room job listens to any
            // participant that is not an agent.
            user_identity: claim.participant.unwrap_or_default(),
            agent_identity: claim.identity,
            url: claim.url,
        }
    }
}
