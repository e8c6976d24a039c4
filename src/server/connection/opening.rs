//! The opening of a connection: the client's `start` (or `resume`), the
//! session it opens or takes up, and `ready`; or the refusal.

use super::*;

impl Conn {
    pub(super) async fn run(&mut self, header_token: Option<Secret>) -> End {
        let opening = match self.await_start().await {
            Ok(opening) => opening,
            Err(end) => return end,
        };
        if *self.phase.borrow() != Phase::Running {
            return End::refuse(
                protocol::GOING_AWAY,
                "server shutting down",
                Refusal::Shutdown,
            );
        }
        let span = tracing::Span::current();
        let (session, format, wire, resume_token, resumed) = match opening {
            Opening::Start(start) => {
                let format = AudioFormat::new(start.encoding.encoding(), start.sample_rate, 1);
                span.record("user_id", start.user_id.as_str());
                let mut config = SessionConfig::new(start.user_id)
                    .with_input_format(format)
                    .with_output_format(format);
                config.metadata = start.metadata.into_iter().collect();
                // The start message's token wins over the header's.
                config.auth_token = start.token.filter(|t| !t.is_empty()).or(header_token);
                let session = match self.shared.backend.create_session(config).await {
                    Ok(session) => session,
                    Err(e) => return refused_by_backend(e),
                };
                let token = session.resume_token();
                (session, format, start.encoding, token, false)
            }
            Opening::Resume(resume) => {
                let format = AudioFormat::new(resume.encoding.encoding(), resume.sample_rate, 1);
                let id = SessionId::new(resume.session_id.as_str());
                let session = match self
                    .shared
                    .backend
                    .resume_session(&id, &resume.resume_token)
                    .await
                {
                    Ok(session) => session,
                    Err(e) => return refused_resume(e),
                };
                span.record("user_id", session.user_id());
                (
                    session,
                    format,
                    resume.encoding,
                    Some(resume.resume_token),
                    true,
                )
            }
        };
        span.record("session_id", session.id().as_str());
        let events = session.events();
        let mut audio = match session.receive_audio() {
            Ok(audio) => audio,
            // A resumed session another connection still holds is not
            // stopped when this one is refused.
            Err(_) if resumed => {
                return End::refuse(
                    protocol::POLICY,
                    "resume refused: the session is attached to another connection \
                     (if that was yours and it dropped, try again in a moment)",
                    Refusal::Protocol,
                );
            }
            Err(e) => {
                self.guard.session = Some(session);
                return internal(&e, Refusal::Error);
            }
        };
        if resumed {
            // Holding the session's audio, this connection claims it from
            // its resume window, if it is in one.
            match self
                .shared
                .detached
                .claim(session.id(), &self.shared.metrics)
            {
                Claim::Taken => tracing::info!("taken up within its resume window"),
                Claim::NotDetached => {}
                Claim::Ended => {
                    // Stopped with the others: it may be the session taken
                    // up from the store as its stop deleted it.
                    self.guard.session = Some(session);
                    return End::refuse(
                        protocol::POLICY,
                        format!(
                            "resume refused: the session has ended (its client closed it, or \
                             its resume window of {} ended)",
                            humantime::format_duration(self.shared.config.resume_window)
                        ),
                        Refusal::Protocol,
                    );
                }
            }
        }
        self.guard.session = Some(session.clone());
        // A session taken up while it runs (its client came back within the
        // window) is not started again; one restored from the store is.
        if !resumed || session.state() == PipelineState::Idle {
            match session.start().await {
                Ok(()) => {}
                Err(_) if resumed => {
                    return End::refuse(
                        protocol::POLICY,
                        "resume refused: no such active session (it has ended)",
                        Refusal::Protocol,
                    );
                }
                Err(e) => return internal(&e, Refusal::Error),
            }
        }
        let resumable = resume_token.is_some();
        let mut ready = Ready::new(session.id().as_str(), format.sample_rate, wire);
        // The session's own client is given what the provider published,
        // its secrets (a join token) included, and its resume token; logs
        // never see them.
        ready.info = session.info().exposed();
        ready.resume_token = resume_token.map(|t| t.expose().to_owned());
        ready.resumed = resumed;
        ready.metadata = session.metadata();
        let ready = serde_json::to_string(&ready).unwrap_or_default();
        if let Err(gone) = self.send(Message::Text(ready.into())).await {
            return gone.into();
        }
        self.guard.resumable = resumable;
        if resumed {
            self.shared.metrics.resumed();
            tracing::info!("session resumed");
        }
        tracing::info!(sample_rate = format.sample_rate, "session started");
        let end = self
            .session_loop(&session, events, &mut audio, format)
            .await;
        self.guard.audio = Some(audio);
        end
    }

    /// Waits for the client's `start` (or `resume`), within `start_timeout`.
    async fn await_start(&mut self) -> std::result::Result<Opening, End> {
        let timeout = self.shared.config.start_timeout;
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        loop {
            if *self.phase.borrow_and_update() != Phase::Running {
                return Err(End::refuse(
                    protocol::GOING_AWAY,
                    "server shutting down",
                    Refusal::Shutdown,
                ));
            }
            let received = tokio::select! {
                _ = &mut deadline => {
                    return Err(End::refuse(
                        protocol::PROTOCOL,
                        format!("no start message within {}", humantime::format_duration(timeout)),
                        Refusal::StartTimeout,
                    ));
                }
                _ = self.phase.changed() => continue,
                received = self.socket.next() => received,
            };
            let text = match self.incoming(received).await {
                Ok(Incoming::Nothing) => continue,
                Ok(Incoming::Binary(_)) => {
                    return Err(End::refuse(
                        protocol::PROTOCOL,
                        "binary message before start: send {\"type\":\"start\",...} first",
                        Refusal::Protocol,
                    ));
                }
                Ok(Incoming::Text(text)) => text,
                Err(End::Close {
                    code,
                    reason,
                    refusal: None,
                }) => {
                    return Err(End::refuse(code, reason, refusal_for(code)));
                }
                Err(End::Broken {
                    code,
                    reason,
                    refusal: None,
                }) => {
                    return Err(End::Broken {
                        code,
                        reason,
                        refusal: Some(refusal_for(code)),
                    });
                }
                Err(end) => return Err(end),
            };
            return match ClientMessage::parse(&text) {
                Ok(ClientMessage::Start(start)) => match start.check() {
                    Ok(()) => Ok(Opening::Start(start)),
                    Err(reason) => Err(End::refuse(
                        protocol::PROTOCOL,
                        format!("bad start message: {reason}"),
                        Refusal::Protocol,
                    )),
                },
                Ok(ClientMessage::Resume(resume)) => match resume.check() {
                    Ok(()) => Ok(Opening::Resume(resume)),
                    Err(reason) => Err(End::refuse(
                        protocol::PROTOCOL,
                        format!("bad resume message: {reason}"),
                        Refusal::Protocol,
                    )),
                },
                Ok(ClientMessage::Text(_)) => Err(End::refuse(
                    protocol::PROTOCOL,
                    "expected start first, got text",
                    Refusal::Protocol,
                )),
                Ok(ClientMessage::Stop) => Err(End::refuse(
                    protocol::PROTOCOL,
                    "expected start first, got stop",
                    Refusal::Protocol,
                )),
                Err(reason) => Err(End::refuse(protocol::PROTOCOL, reason, Refusal::Protocol)),
            };
        }
    }
}

/// What opens a connection's session.
enum Opening {
    Start(Start),
    Resume(Resume),
}

/// How a refused `resume` ends the connection. The token is never quoted.
fn refused_resume(e: BackendError) -> End {
    match e.code {
        ErrorCode::AuthenticationFailed => {
            tracing::info!(code = %e.code, "resume refused");
            End::refuse(
                protocol::POLICY,
                "resume refused: the resume token is not this session's",
                Refusal::Auth,
            )
        }
        ErrorCode::SessionNotFound => End::refuse(
            protocol::POLICY,
            "resume refused: no such active session (closed, its resume window over, or never opened)",
            Refusal::Protocol,
        ),
        ErrorCode::ConnectionFailed | ErrorCode::ConnectionTimeout => {
            tracing::info!(code = %e.code, "resume refused: {}", e.message);
            End::refuse(
                protocol::TRY_AGAIN,
                "resume refused: the session runs elsewhere or the session store is away; try again later",
                Refusal::Capacity,
            )
        }
        _ => refused_by_backend(e),
    }
}

/// How a refused `create_session` ends the connection.
fn refused_by_backend(e: BackendError) -> End {
    // Auth errors come from the application's hook: log the code only.
    match e.code {
        ErrorCode::AuthenticationFailed => {
            tracing::info!(code = %e.code, "session refused");
            End::refuse(protocol::POLICY, "authentication failed", Refusal::Auth)
        }
        ErrorCode::AuthorizationFailed => {
            tracing::info!(code = %e.code, "session refused");
            End::refuse(
                protocol::POLICY,
                "authorization failed: this user may not open a session",
                Refusal::Auth,
            )
        }
        ErrorCode::SessionLimitExceeded => End::refuse(
            protocol::TRY_AGAIN,
            "server at capacity: no session is available; try again later",
            Refusal::Capacity,
        ),
        ErrorCode::RateLimitExceeded => {
            let retry = e
                .details
                .get("retry_after_ms")
                .map(|ms| format!("; retry in {ms} ms"))
                .unwrap_or_default();
            End::refuse(
                protocol::TRY_AGAIN,
                format!("session rate limit exceeded{retry}"),
                Refusal::RateLimit,
            )
        }
        ErrorCode::InvalidConfig => End::refuse(
            protocol::PROTOCOL,
            format!("start refused: {}", e.message),
            Refusal::Protocol,
        ),
        ErrorCode::ContextCanceled => End::refuse(
            protocol::GOING_AWAY,
            "server shutting down",
            Refusal::Shutdown,
        ),
        _ => internal(&e, Refusal::Error),
    }
}

fn internal(e: &BackendError, refusal: Refusal) -> End {
    tracing::warn!(code = %e.code, op = e.op, "session failed: {}", e.message);
    End::refuse(
        protocol::INTERNAL,
        format!("internal error: could not open a session ({})", e.code),
        refusal,
    )
}

/// How a connection closed before its `start` counts: over a limit (the
/// policy close), or a protocol error.
fn refusal_for(code: u16) -> Refusal {
    if code == protocol::POLICY {
        Refusal::RateLimit
    } else {
        Refusal::Protocol
    }
}
