//! Error codes, their names, retryability, and the error's shape.

use std::error::Error as _;

use voice_backends::{BackendError, ErrorCode, ErrorFields};

#[test]
fn thirteen_codes_with_their_specified_names() {
    let names: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(
        names,
        [
            "invalid_config",
            "provider_not_found",
            "connection_failed",
            "connection_timeout",
            "session_not_found",
            "session_limit_exceeded",
            "rate_limit_exceeded",
            "authentication_failed",
            "authorization_failed",
            "pipeline_error",
            "agent_error",
            "timeout",
            "context_canceled",
        ]
    );
    for code in ErrorCode::ALL {
        assert_eq!(ErrorCode::from_name(code.as_str()), Some(code));
        assert_eq!(code.to_string(), code.as_str());
    }
    assert_eq!(ErrorCode::from_name("InvalidConfig"), None);
}

#[test]
fn exactly_the_transient_codes_are_retryable() {
    let retryable: Vec<ErrorCode> = ErrorCode::ALL
        .into_iter()
        .filter(|c| c.is_retryable())
        .collect();
    assert_eq!(
        retryable,
        [
            ErrorCode::ConnectionFailed,
            ErrorCode::ConnectionTimeout,
            ErrorCode::SessionLimitExceeded,
            ErrorCode::RateLimitExceeded,
            ErrorCode::Timeout,
        ]
    );
    let e = BackendError::new("x", ErrorCode::Timeout, "slow");
    assert!(e.is_retryable());
    assert!(!BackendError::invalid_config("x", "bad").is_retryable());
}

#[test]
fn display_details_and_source() {
    let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused by peer");
    let e = BackendError::new(
        "backend.start",
        ErrorCode::ConnectionFailed,
        "cannot reach the bot",
    )
    .with_detail("url", "ws://127.0.0.1:1")
    .with_detail("url", "second attempt")
    .with_source(io);
    assert_eq!(
        e.to_string(),
        "backend.start: connection_failed: cannot reach the bot"
    );
    assert_eq!(e.details["url"], "ws://127.0.0.1:1; second attempt");
    assert_eq!(e.source().unwrap().to_string(), "refused by peer");
    let e = e.with_op("session.start");
    assert_eq!(e.op, "session.start");
    assert_eq!(e.code, ErrorCode::ConnectionFailed);
}

#[test]
fn errors_cross_threads() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<BackendError>();
}

#[test]
fn fields_are_reached_through_the_error_and_taken_apart_whole() {
    let mut e = BackendError::invalid_config("config.validate", "two problems")
        .with_detail("timeout", "0s is out of range");
    e.code = ErrorCode::Timeout;
    e.message.push_str(" (and more)");
    assert!(e.is_retryable());
    let fields = e.into_fields();
    assert_eq!(fields.message, "two problems (and more)");
    assert_eq!(fields.details["timeout"], "0s is out of range");
    let again: BackendError = ErrorFields {
        op: "registry.create",
        ..fields
    }
    .into();
    assert_eq!(
        again.to_string(),
        "registry.create: timeout: two problems (and more)"
    );
    assert!(format!("{again:?}").starts_with("BackendError { op: \"registry.create\""));
}

#[test]
fn a_result_is_no_wider_than_its_value_and_a_word() {
    use std::mem::size_of;
    use std::sync::Arc;
    // The error is one pointer, so the hot `Ok` paths move small values.
    assert_eq!(size_of::<BackendError>(), size_of::<usize>());
    assert_eq!(size_of::<voice_backends::Result<()>>(), size_of::<usize>());
    assert!(
        size_of::<voice_backends::Result<Arc<dyn voice_backends::VoiceBackend>>>()
            <= 3 * size_of::<usize>()
    );
}
