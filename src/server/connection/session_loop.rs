//! The session loop: the session's audio, text and events both ways until
//! the session or the connection ends.

use super::*;

impl Conn {
    pub(super) async fn session_loop(
        &mut self,
        session: &Arc<dyn VoiceSession>,
        events: SessionEvents,
        audio: &mut AudioReceiver,
        format: AudioFormat,
    ) -> End {
        // Whether client audio and text still go to the session: not after
        // the client's `stop`, nor while the server drains.
        let phase = *self.phase.borrow_and_update();
        let mut input_open = phase == Phase::Running;
        let mut stop_requested = false;
        // Whether the session's reply audio may still bring frames.
        let mut audio_open = true;
        let mut stopper: Option<JoinHandle<Result<()>>> = None;
        // A run of failed inputs is reported to the client once.
        let mut failing = false;
        // The inputs that wait on a registration of their own (a phase
        // change, the next event) are futures kept across wake-ups. They and
        // the stop task are polled only when their own waker has fired (see
        // `Inputs`); reply audio and the socket on every wake-up.
        let mut phase_change = pin!(phase_change_of(self.phase.clone()));
        let mut next = pin!(next_event(events));
        if phase == Phase::Closing {
            // The last phase: no change of it will come to wait for.
            if let Err(gone) = self.finish(next.as_mut(), audio).await {
                return gone.into();
            }
            return End::close(protocol::GOING_AWAY, "server shutting down");
        }
        // A session whose client sends nothing for `idle_timeout` is closed.
        // The timer is set again only when it fires, for the time left after
        // the last message heard.
        let idle_timeout = self.shared.config.idle_timeout;
        let mut last_heard = Instant::now();
        let mut idle = pin!(tokio::time::sleep(idle_timeout));
        // Every input starts marked.
        let inputs = Inputs::new(PHASE | STOPPER | EVENTS | IDLE);
        let mut registered: Option<Waker> = None;
        // Messages are queued as inputs are handled and written once nothing
        // more is ready (`Woke::Flush`): a turn's events and the reply audio
        // that comes with them go out in one write, not one each.
        let mut unflushed = false;
        loop {
            let woke = std::future::poll_fn(|cx| {
                if !registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    inputs.register(cx.waker());
                    registered = Some(cx.waker().clone());
                }
                let mut due = inputs.take();
                if stopper.is_none() {
                    // Marked from the start; marked again when it is spawned.
                    due &= !STOPPER;
                }
                let mut poll = |input: u8, f: &mut dyn FnMut(&mut Context<'_>) -> Poll<Woke>| {
                    if due & input == 0 {
                        return Poll::Pending;
                    }
                    due &= !input;
                    let woke = f(&mut Context::from_waker(inputs.waker(input)));
                    if woke.is_ready() {
                        // The input may have more; those not polled yet are still due.
                        inputs.mark(due | input);
                    }
                    woke
                };
                if let Poll::Ready(w) = poll(PHASE, &mut |cx| {
                    phase_change
                        .as_mut()
                        .poll(cx)
                        .map(|(rx, p)| Woke::Phase(rx, p))
                }) {
                    return Poll::Ready(w);
                }
                if let Some(task) = stopper.as_mut()
                    && let Poll::Ready(w) = poll(STOPPER, &mut |cx| {
                        Pin::new(&mut *task).poll(cx).map(Woke::Stopped)
                    })
                {
                    return Poll::Ready(w);
                }
                if let Poll::Ready(w) = poll(EVENTS, &mut |cx| {
                    next.as_mut().poll(cx).map(|(rx, e)| Woke::Event(rx, e))
                }) {
                    return Poll::Ready(w);
                }
                if let Poll::Ready(w) =
                    poll(IDLE, &mut |cx| idle.as_mut().poll(cx).map(|()| Woke::Idle))
                {
                    return Poll::Ready(w);
                }
                // Reply audio and the socket wake the task directly: they are
                // the frequent ones, and cheap to poll.
                if audio_open && let Poll::Ready(frame) = pin!(audio.recv()).poll(cx) {
                    inputs.mark(due);
                    return Poll::Ready(Woke::Audio(frame));
                }
                let received = self.socket.poll_next_unpin(cx).map(Woke::Received);
                if received.is_ready() {
                    inputs.mark(due);
                    return received;
                }
                // Everything that was ready is handled: what it queued goes
                // out now, in one write.
                if unflushed {
                    inputs.mark(due);
                    return Poll::Ready(Woke::Flush);
                }
                Poll::Pending
            })
            .await;
            match woke {
                Woke::Idle => {
                    let heard = last_heard + idle_timeout;
                    if Instant::now() >= heard {
                        return End::close(
                            protocol::POLICY,
                            format!(
                                "idle: no audio or message for {}",
                                humantime::format_duration(idle_timeout)
                            ),
                        );
                    }
                    idle.as_mut().reset(heard);
                }
                Woke::Phase(rx, phase) => match phase {
                    Phase::Running => phase_change.set(phase_change_of(rx)),
                    Phase::Draining => {
                        input_open = false;
                        phase_change.set(phase_change_of(rx));
                    }
                    Phase::Closing => {
                        if let Err(gone) = self.finish(next.as_mut(), audio).await {
                            return gone.into();
                        }
                        return End::close(protocol::GOING_AWAY, "server shutting down");
                    }
                },
                Woke::Event(events, event) => {
                    next.set(next_event(events));
                    match event {
                        Some(SessionEvent::Closed) | None => {
                            self.guard.closed();
                            if let Err(gone) = self.finish(next.as_mut(), audio).await {
                                return gone.into();
                            }
                            return self.session_closed(stop_requested);
                        }
                        Some(event) => {
                            if let Err(gone) = self.feed_event(&event).await {
                                return gone.into();
                            }
                            unflushed = true;
                        }
                    }
                }
                Woke::Audio(Some(frame)) => {
                    if let Err(gone) = self.feed_audio(frame, audio).await {
                        return gone.into();
                    }
                    unflushed = true;
                }
                // The session's reply audio ended before the session did (a
                // session of the application's own may do that): no more
                // polling it, the `Closed` event ends the connection.
                Woke::Audio(None) => audio_open = false,
                Woke::Flush => {
                    if let Err(gone) = self.flush().await {
                        return gone.into();
                    }
                    unflushed = false;
                }
                Woke::Stopped(done) => {
                    let done = done.unwrap_or_else(|e| {
                        Err(BackendError::new(
                            "server.stop_session",
                            ErrorCode::PipelineError,
                            format!("the stop task failed: {e}"),
                        ))
                    });
                    if let Err(e) = done {
                        tracing::warn!(code = %e.code, "stopping the session: {}", e.message);
                    }
                    // `stop` returns once the session has closed: its last
                    // events are waiting in `events`.
                    self.guard.closed();
                    if let Err(gone) = self.finish(next.as_mut(), audio).await {
                        return gone.into();
                    }
                    return self.session_closed(true);
                }
                Woke::Received(received) => {
                    let payload = match self.incoming(received).await {
                        Ok(p) => p,
                        Err(end) => return end,
                    };
                    if !matches!(payload, Incoming::Nothing) {
                        last_heard = Instant::now();
                    }
                    let outcome = match payload {
                        Incoming::Nothing => Ok(()),
                        Incoming::Binary(data) => {
                            let unit = format.bytes_per_frame();
                            if !data.len().is_multiple_of(unit) {
                                return End::close(
                                    protocol::UNSUPPORTED,
                                    format!(
                                        "bad audio: {} bytes is not a whole number of 16-bit samples",
                                        data.len()
                                    ),
                                );
                            }
                            let seconds =
                                data.len() as f64 / (unit as f64 * f64::from(format.sample_rate));
                            if !self.audio_budget.take_at(seconds, Instant::now()) {
                                return End::close(
                                    protocol::POLICY,
                                    format!(
                                        "audio faster than real time: more than {} ahead",
                                        humantime::format_duration(
                                            self.shared.config.max_audio_ahead
                                        )
                                    ),
                                );
                            }
                            if !input_open || data.is_empty() {
                                continue;
                            }
                            match AudioFrame::new(format, data) {
                                Ok(frame) => session.process_audio(frame).await,
                                Err(e) => Err(e),
                            }
                        }
                        Incoming::Text(text) => match ClientMessage::parse(&text) {
                            Err(reason) => return End::close(protocol::PROTOCOL, reason),
                            Ok(ClientMessage::Start(_) | ClientMessage::Resume(_)) => {
                                return End::close(
                                    protocol::PROTOCOL,
                                    "start sent twice: the session has already started",
                                );
                            }
                            Ok(ClientMessage::Text(text)) if input_open => {
                                session.send_text(&text).await
                            }
                            Ok(ClientMessage::Text(_)) => Ok(()),
                            Ok(ClientMessage::Stop) => {
                                if !stop_requested {
                                    stop_requested = true;
                                    input_open = false;
                                    tracing::info!("the client stops the session");
                                    let session = session.clone();
                                    stopper =
                                        Some(tokio::spawn(async move { session.stop().await }));
                                    inputs.mark(STOPPER);
                                }
                                Ok(())
                            }
                        },
                    };
                    match outcome {
                        Ok(()) => failing = false,
                        Err(_) if !input_open || *self.phase.borrow() != Phase::Running => {}
                        Err(e) => {
                            if !failing {
                                failing = true;
                                tracing::debug!(code = %e.code, "client input failed: {}", e.message);
                                let event = SessionEvent::Error {
                                    code: e.code,
                                    message: e.into_fields().message,
                                };
                                if let Err(gone) = self.feed_event(&event).await {
                                    return gone.into();
                                }
                                unflushed = true;
                            }
                        }
                    }
                }
            }
        }
    }

    /// How a closed session's connection ends.
    fn session_closed(&self, stop_requested: bool) -> End {
        if *self.phase.borrow() != Phase::Running {
            End::close(protocol::GOING_AWAY, "server shutting down")
        } else if stop_requested {
            End::close(protocol::NORMAL, "session stopped")
        } else {
            End::close(protocol::NORMAL, "session closed")
        }
    }

    /// Sends what the session still has for the client (reply audio first,
    /// then events), then `closed`. `next` is the pending wait for the next
    /// event: whatever it can take now is sent.
    async fn finish<F>(
        &mut self,
        next: Pin<&mut F>,
        audio: &mut AudioReceiver,
    ) -> std::result::Result<(), Gone>
    where
        F: Future<Output = (SessionEvents, Option<SessionEvent>)>,
    {
        while let Some(frame) = audio.try_recv() {
            self.send(Message::Binary(frame.into_data())).await?;
        }
        let ready = next.poll(&mut Context::from_waker(Waker::noop()));
        if let Poll::Ready((mut events, mut event)) = ready {
            while let Some(e) = event {
                if e == SessionEvent::Closed {
                    break;
                }
                self.send_event(&e).await?;
                event = events.try_recv();
            }
        }
        self.send_event(&SessionEvent::Closed).await
    }
}

/// What woke the session loop.
enum Woke {
    /// The idle timer fired.
    Idle,
    Phase(watch::Receiver<Phase>, Phase),
    Stopped(std::result::Result<Result<()>, tokio::task::JoinError>),
    Event(SessionEvents, Option<SessionEvent>),
    Audio(Option<AudioFrame>),
    Received(Option<std::result::Result<Message, WsError>>),
    /// Nothing else is ready and messages wait in the write buffer.
    Flush,
}

/// The session loop's rarely woken inputs, one bit each.
const PHASE: u8 = 1;
const STOPPER: u8 = 1 << 1;
const EVENTS: u8 = 1 << 2;
const IDLE: u8 = 1 << 3;

/// Which of the session loop's rare inputs (a phase change, the stop task,
/// session events, the idle timer) may have something: each is polled with a waker of its
/// own, which marks it and wakes the task, so the frequent wake-ups (client
/// audio, reply audio) do not poll them. Polling them costs locks: the event
/// channel's and the phase's waiter lists.
type Inputs = InputMarks<4>;

/// The next phase change: the receiver back, and the new phase (`Closing`
/// when the server is gone).
async fn phase_change_of(mut rx: watch::Receiver<Phase>) -> (watch::Receiver<Phase>, Phase) {
    let phase = match rx.changed().await {
        Ok(()) => *rx.borrow_and_update(),
        Err(_) => Phase::Closing,
    };
    (rx, phase)
}

/// The next session event, with the subscription back.
async fn next_event(mut events: SessionEvents) -> (SessionEvents, Option<SessionEvent>) {
    let event = events.recv().await;
    (events, event)
}
