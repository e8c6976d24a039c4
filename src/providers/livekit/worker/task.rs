//! The worker's task: connecting and registering, answering the server,
//! reporting the load, reconnecting.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use livekit_protocol as proto;
use prost::Message as _;
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};

use super::wire::{job_status, register, worker_message};
use super::*;
use crate::runtime::{Dial, WsMessage, WsStream};

/// Dials `/agent` with a fresh token, registers, and waits for the
/// server's answer.
pub(super) async fn connect(shared: &Shared) -> Result<WsStream> {
    let options = &shared.options;
    let counters = &shared.counters.messages;
    let url = agent_url(&options.url)
        .map_err(|m| BackendError::invalid_config(OP, format!("the server URL {m}")))?;
    let mut dial = Dial::new(url).bearer(&options.token()?);
    dial.max_message = MAX_MESSAGE;
    let mut ws = dial.connect(SERVICE).await?;
    let lost = |cause: String| {
        BackendError::new(
            OP,
            ErrorCode::ConnectionFailed,
            format!("{SERVICE} at {}: {cause}", dial.endpoint),
        )
    };
    write(&mut ws, &register(options), counters, options.retry.timeout)
        .await
        .map_err(lost)?;
    loop {
        let bytes = match ws.next().await {
            Some(Ok(WsMessage::Binary(b))) => b,
            Some(Ok(WsMessage::Text(_))) => {
                bump(&counters.received);
                bump(&counters.malformed);
                continue;
            }
            Some(Ok(WsMessage::Close(frame))) => {
                let why = frame.map(|f| f.reason.to_string()).unwrap_or_default();
                return Err(lost(format!(
                    "it closed the connection before registering the worker {why}"
                )));
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(lost(e.to_string())),
            None => {
                return Err(lost(
                    "the connection ended before the worker was registered".into(),
                ));
            }
        };
        bump(&counters.received);
        match decode_server_message(&bytes) {
            Ok(ServerEvent::Registered { worker_id }) => {
                tracing::info!(%worker_id, agent_name = %options.agent_name, "registered with {SERVICE}");
                *lock(&shared.worker_id) = Some(worker_id);
                bump(&shared.counters.registrations);
                shared.set_state(WorkerState::Registered);
                return Ok(ws);
            }
            Ok(other) => {
                tracing::debug!("{SERVICE} sent {other:?} before registering the worker; ignored")
            }
            Err(e) => {
                bump(&counters.malformed);
                tracing::warn!("skipped a malformed message from {SERVICE}: {e}");
            }
        }
    }
}

/// Writes one message, bounded by `timeout`.
async fn write(
    ws: &mut WsStream,
    message: &proto::WorkerMessage,
    counters: &LinkCounters,
    timeout: Duration,
) -> std::result::Result<(), String> {
    let frame = WsMessage::Binary(message.encode_to_vec().into());
    match tokio::time::timeout(timeout, ws.send(frame)).await {
        Ok(Ok(())) => {
            bump(&counters.sent);
            Ok(())
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "a write waited longer than {}",
            humantime::format_duration(timeout)
        )),
    }
}

fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// How long closing a lost connection may take.
const CLOSE_WAIT: Duration = Duration::from_millis(500);

/// How one connection ended.
enum End {
    Stopped,
    Lost(String),
}

/// The worker's task: serves each connection, reconnects when one is lost.
pub(super) async fn run(shared: Arc<Shared>, mut ws: WsStream) {
    let mut stop = shared.stop.subscribe();
    loop {
        let cause = match serve(&shared, &mut ws, &mut stop).await {
            End::Stopped => break,
            End::Lost(cause) => cause,
        };
        // Whatever is left of the connection is closed, not kept while the
        // worker dials again.
        let _ = tokio::time::timeout(CLOSE_WAIT, ws.close(None)).await;
        // The server forgets offers with the connection; their places are free.
        shared.book().pending.clear();
        shared.set_state(WorkerState::Reconnecting);
        tracing::warn!("lost {SERVICE}: {cause}; connecting again");
        let again = shared.options.retry.run(
            OP,
            SERVICE,
            || connect(&shared),
            |retry, delay, e| {
                tracing::warn!(
                    retry,
                    "connecting to {SERVICE} failed, retrying in {delay:?}: {}",
                    e.message
                );
            },
        );
        tokio::select! {
            biased;
            _ = stopped(&mut stop) => break,
            outcome = again => match outcome {
                Ok(new) => {
                    bump(&shared.counters.messages.reconnects);
                    ws = new;
                }
                Err(e) => {
                    tracing::error!(code = %e.code, "{SERVICE} is lost for good: {}", e.message);
                    *lock(&shared.failure) = Some((e.code, e.message.clone()));
                    shared.set_state(WorkerState::Failed);
                    // Queued jobs stay: their tokens still join their rooms.
                    drop(shared.close(false));
                    return;
                }
            },
        }
    }
    drop(shared.close(true));
    shared.set_state(WorkerState::Stopped);
}

/// Serves one registered connection until it is lost or the worker stops.
async fn serve(shared: &Arc<Shared>, ws: &mut WsStream, stop: &mut watch::Receiver<bool>) -> End {
    let options = &shared.options;
    let counters = &shared.counters.messages;
    let timeout = options.retry.timeout;
    let mut conn = Connection {
        last_report: None,
        seq: 0,
    };
    // The jobs this worker still holds, for a server that lost track of them.
    let held: Vec<String> = {
        let book = shared.book();
        book.running
            .iter()
            .cloned()
            .chain(book.queue.iter().map(|j| j.id.clone()))
            .collect()
    };
    if !held.is_empty() {
        let migrate = worker_message(proto::worker_message::Message::MigrateJob(
            proto::MigrateJobRequest { job_ids: held },
        ));
        if let Err(e) = write(ws, &migrate, counters, timeout).await {
            return End::Lost(e);
        }
    }
    if let Err(e) = conn.report(shared, ws, true).await {
        return End::Lost(e);
    }
    let mut last_heard = Instant::now();
    let start = Instant::now();
    let mut check = tokio::time::interval_at(
        start + options.load_check_interval,
        options.load_check_interval,
    );
    let mut report =
        tokio::time::interval_at(start + options.report_interval, options.report_interval);
    let mut ping = tokio::time::interval_at(start + options.ping_interval, options.ping_interval);
    for t in [&mut check, &mut report, &mut ping] {
        t.set_missed_tick_behavior(MissedTickBehavior::Delay);
    }
    loop {
        let outbox = std::mem::take(&mut shared.book().outbox);
        for (i, message) in outbox.iter().enumerate() {
            if let Err(e) = write(ws, message, counters, timeout).await {
                shared
                    .book()
                    .outbox
                    .splice(0..0, outbox[i..].iter().cloned());
                return End::Lost(e);
            }
        }
        // Whatever happened last (an offer answered, a job queued, taken or
        // ended, the load moved) is reported when it changed the load.
        if let Err(e) = conn.report(shared, ws, false).await {
            return End::Lost(e);
        }
        let step = tokio::select! {
            biased;
            _ = stopped(stop) => {
                conn.farewell(shared, ws).await;
                return End::Stopped;
            }
            message = ws.next() => {
                last_heard = Instant::now();
                match message {
                    Some(Ok(WsMessage::Binary(bytes))) => {
                        bump(&counters.received);
                        match decode_server_message(&bytes) {
                            Ok(event) => conn.handle(shared, ws, event).await,
                            Err(e) => {
                                bump(&counters.malformed);
                                tracing::warn!("skipped a malformed message from {SERVICE}: {e}");
                                Ok(())
                            }
                        }
                    }
                    Some(Ok(WsMessage::Text(_))) => {
                        bump(&counters.received);
                        bump(&counters.malformed);
                        tracing::warn!("skipped a text message from {SERVICE}, which speaks binary protobuf");
                        Ok(())
                    }
                    Some(Ok(WsMessage::Close(frame))) => Err(match frame {
                        Some(f) => format!("it closed the connection (code {}: {})", u16::from(f.code), shown_in_error(&f.reason)),
                        None => "it closed the connection".to_owned(),
                    }),
                    Some(Ok(_)) => Ok(()),
                    Some(Err(e)) => Err(e.to_string()),
                    None => Err("the connection ended".to_owned()),
                }
            }
            _ = check.tick() => {
                conn.expire(shared);
                if last_heard.elapsed() > options.ping_timeout {
                    Err(format!("it was silent for {}", humantime::format_duration(options.ping_timeout)))
                } else {
                    Ok(())
                }
            }
            _ = report.tick() => conn.report(shared, ws, true).await,
            _ = ping.tick() => {
                let ping = worker_message(proto::worker_message::Message::Ping(proto::WorkerPing { timestamp: now_millis() }));
                write(ws, &ping, counters, timeout).await
            }
            _ = shared.wake.notified() => Ok(()),
        };
        if let Err(cause) = step {
            return End::Lost(cause);
        }
    }
}

/// What the task keeps for one connection.
struct Connection {
    last_report: Option<(proto::WorkerStatus, u32, u32)>,
    seq: u64,
}

impl Connection {
    /// Reports the load when it changed, or always when `force`.
    async fn report(
        &mut self,
        shared: &Shared,
        ws: &mut WsStream,
        force: bool,
    ) -> std::result::Result<(), String> {
        let (status, load, job_count) = shared.snapshot();
        let key = (status, load.to_bits(), job_count);
        if !force && self.last_report == Some(key) {
            return Ok(());
        }
        if self.last_report.is_some_and(|(s, ..)| s != status) {
            tracing::info!(load, job_count, "worker now {}", status.as_str_name());
        }
        self.last_report = Some(key);
        self.seq += 1;
        let update = worker_message(proto::worker_message::Message::UpdateWorker(
            proto::UpdateWorkerStatus {
                status: Some(status as i32),
                load,
                job_count,
                draining: false,
                seq: self.seq,
            },
        ));
        write(
            ws,
            &update,
            &shared.counters.messages,
            shared.options.retry.timeout,
        )
        .await
    }

    /// Gives up on accepted offers whose assignment is late.
    fn expire(&mut self, shared: &Shared) {
        let now = Instant::now();
        let mut book = shared.book();
        let before = book.pending.len();
        book.pending.retain(|_, p| p.deadline > now);
        let expired = before - book.pending.len();
        drop(book);
        if expired > 0 {
            shared
                .counters
                .assignments_timed_out
                .fetch_add(expired as u64, Ordering::Relaxed);
            tracing::warn!(
                expired,
                "accepted job offers got no assignment in time; their places are free again"
            );
        }
    }

    async fn handle(
        &mut self,
        shared: &Arc<Shared>,
        ws: &mut WsStream,
        event: ServerEvent,
    ) -> std::result::Result<(), String> {
        let counters = &shared.counters;
        let timeout = shared.options.retry.timeout;
        match event {
            ServerEvent::Registered { worker_id } => {
                *lock(&shared.worker_id) = Some(worker_id);
                Ok(())
            }
            ServerEvent::Offer { job, .. } => {
                let identity = format!("agent-{}", job.id);
                let accepted = shared.offer(&job.id, &identity);
                let mut answer = proto::AvailabilityResponse {
                    job_id: job.id.clone(),
                    available: accepted,
                    ..Default::default()
                };
                if accepted {
                    bump(&counters.offers_accepted);
                    answer.participant_identity = identity;
                    answer.participant_attributes.insert(
                        AGENT_NAME_ATTRIBUTE.to_owned(),
                        shared.options.agent_name.clone(),
                    );
                } else {
                    bump(&counters.offers_refused);
                    tracing::info!(job_id = %job.id, room = %job.room, "refused a job offer: the worker is full");
                }
                let answer = worker_message(proto::worker_message::Message::Availability(answer));
                write(ws, &answer, &counters.messages, timeout).await
            }
            ServerEvent::Assigned { job, token, url } => {
                let id = job.id.clone();
                if shared.assigned(job, token, url) {
                    bump(&counters.assignments);
                    Ok(())
                } else {
                    // Not waited for (late, or never offered): the server
                    // counts it as running, so it is told the job failed.
                    bump(&counters.assignments_unexpected);
                    tracing::warn!(job_id = %id, "an assignment for a job the worker was not waiting for; reported failed");
                    let failed = job_status(
                        &id,
                        Some("the worker was not waiting for this job's assignment".into()),
                    );
                    write(ws, &failed, &counters.messages, timeout).await
                }
            }
            ServerEvent::Terminated { job_id } => {
                bump(&counters.terminations);
                let dropped = shared.terminated(&job_id);
                // Dropping a queued job reports it ended (to the outbox).
                drop(dropped);
                Ok(())
            }
            ServerEvent::Pong { .. } => Ok(()),
            ServerEvent::GoAway { reason } => Err(format!(
                "the server is draining this connection ({})",
                shown_in_error(&reason)
            )),
        }
    }

    /// Reports the worker full, the queued jobs failed, and closes.
    async fn farewell(&mut self, shared: &Shared, ws: &mut WsStream) {
        for job in shared.close(true) {
            job.fail("the worker stopped before the job was taken");
        }
        let counters = &shared.counters.messages;
        let outbox = std::mem::take(&mut shared.book().outbox);
        for message in &outbox {
            if write(ws, message, counters, STOP_WAIT).await.is_err() {
                return;
            }
        }
        if self.report(shared, ws, true).await.is_err() {
            return;
        }
        let _ = tokio::time::timeout(STOP_WAIT, async {
            let _ = ws.close(None).await;
            while let Some(Ok(_)) = ws.next().await {}
        })
        .await;
    }
}

impl Shared {
    /// Takes an offer when there is room: the worker is open and what it
    /// runs and holds stays under capacity with this job.
    fn offer(&self, id: &str, identity: &str) -> bool {
        let load = self.load.load();
        let mut book = self.book();
        let active = load.active.max(book.running.len());
        let held = active + book.pending.len() + book.queue.len();
        let known = book.pending.contains_key(id) || book.terminations.contains_key(id);
        if book.closed || known || held >= load.capacity {
            return false;
        }
        book.pending.insert(
            id.to_owned(),
            Pending {
                identity: identity.to_owned(),
                deadline: Instant::now() + self.options.assignment_timeout,
            },
        );
        true
    }

    /// Queues the assignment of an accepted offer; `false` when the worker
    /// was not waiting for it.
    fn assigned(self: &Arc<Self>, job: JobInfo, token: Secret, url: Option<String>) -> bool {
        let mut book = self.book();
        if book.closed {
            return false;
        }
        let Some(pending) = book.pending.remove(&job.id) else {
            return false;
        };
        let (terminate, terminated) = watch::channel(false);
        book.terminations.insert(job.id.clone(), terminate);
        book.queue.push_back(Job {
            lease: Lease {
                id: job.id.clone(),
                shared: Arc::downgrade(self),
                terminated,
                error: None,
            },
            id: job.id,
            dispatch_id: job.dispatch_id,
            room: job.room,
            identity: pending.identity,
            participant: job.participant,
            metadata: job.metadata,
            token,
            url: url.unwrap_or_else(|| self.options.url.clone()),
        });
        drop(book);
        self.jobs_ready.notify_waiters();
        true
    }

    /// Ends job `id` as the server asked: an offer is forgotten, a queued
    /// job taken out (returned, to be dropped outside the lock), a running
    /// one told.
    fn terminated(&self, id: &str) -> Option<Job> {
        let mut book = self.book();
        book.pending.remove(id);
        if let Some(signal) = book.terminations.get(id) {
            signal.send_replace(true);
        }
        let at = book.queue.iter().position(|j| j.id == id)?;
        book.queue.remove(at)
    }
}

/// Resolves once the worker is told to stop.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not `Send`: dropped here.
    let _ = stop.wait_for(|s| *s).await.map(drop);
}
