//! Failover of a link's connection: a service's equivalent endpoints in order
//! of preference (several Pipecat bot servers, several Vocode servers), which
//! of them a backend's links find down, and the connect that tries them in
//! turn.
//!
//! # The design
//!
//! Every connect (a session's link opening, or a live link reconnecting after
//! its connection dropped) tries the endpoints in order and keeps the first
//! that answers: a refused or failed connection, or no WebSocket handshake
//! within `failover.timeout`, moves to the next. An endpoint that failed is
//! marked down for the whole backend, so later connects try it last instead
//! of waiting for it again; once `failover.probe_interval` has passed since
//! it last failed, connects try it in its place again (first, for the
//! primary), which is the health check that switches back. A provider's
//! health check (a TCP probe of each endpoint) marks an endpoint up or down
//! too, so a primary found answering is preferred again at once.
//!
//! There is no background prober: a probe task per backend would need a
//! lifetime of its own and would take seats of single-client services (a
//! Pipecat `WebsocketServerTransport` serves one connection at a time). The
//! price is that one connect per `probe_interval` tries a primary that is
//! still down; a process that is gone refuses at once, and a host that does
//! not answer costs at most `failover.timeout`.
//!
//! A live link stays where it is when the primary comes back (moving it
//! would cut the reply in flight); its next reconnect, and every new link,
//! prefers the primary.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::*;
use crate::config::FailoverConfig;
use crate::session::SessionInfo;
use crate::session::events::SwitchReason;

pub use crate::pipeline::link::ENDPOINT_STAGE;

/// The [`SessionInfo`] key under which a session with fallback endpoints
/// publishes the endpoint its link is connected to (its name: `host:port`).
pub const ENDPOINT_INFO_KEY: &str = "provider_endpoint";

/// A service's equivalent endpoints in order of preference, as every link of
/// one backend knows them: which answered, which failed and when. Made once
/// per backend (like [`LinkCounters`]) and given to each session's link with
/// [`LinkSettings::with_fallbacks`].
///
/// Endpoints are known by their names: `host:port` of their URLs
/// ([`endpoint_of`]), never the URL (it may hold credentials), with `#2`,
/// `#3`, ... after a name an earlier endpoint already has.
#[derive(Debug)]
pub struct Endpoints {
    names: Vec<String>,
    /// How long an endpoint that failed is tried last.
    cool_down: Duration,
    /// How long one endpoint may take to answer (the WebSocket handshake).
    dial_timeout: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    endpoints: Vec<Health>,
    /// The endpoint the backend's last link connected to.
    last: Option<usize>,
}

#[derive(Debug, Default, Clone)]
struct Health {
    /// When it last failed, while it is down.
    down_since: Option<Instant>,
    /// Whether it ever answered or failed.
    known: bool,
    connects: u64,
    failures: u64,
}

/// Why the endpoints before the one that answered were passed over.
pub(super) type Passed = Vec<(usize, SwitchReason)>;

impl Endpoints {
    /// The endpoints at `urls`, in order of preference (the first is the
    /// primary), failing over as `failover` says: `timeout` bounds each
    /// endpoint's handshake, and one that failed is tried last for
    /// `probe_interval`.
    pub fn new<'a>(
        urls: impl IntoIterator<Item = &'a str>,
        failover: &FailoverConfig,
    ) -> Arc<Endpoints> {
        let mut names: Vec<String> = Vec::new();
        for url in urls {
            let base = endpoint_of(url);
            let mut name = base.clone();
            let mut n = 1;
            while names.contains(&name) {
                n += 1;
                name = format!("{base}#{n}");
            }
            names.push(name);
        }
        let endpoints = vec![Health::default(); names.len()];
        Arc::new(Endpoints {
            names,
            cool_down: failover.probe_interval,
            dial_timeout: failover.timeout,
            state: Mutex::new(State {
                endpoints,
                last: None,
            }),
        })
    }

    /// The endpoints' names, in order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// How many endpoints there are.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The name of endpoint `i` (`?` past the end).
    pub fn name(&self, i: usize) -> &str {
        self.names.get(i).map_or("?", String::as_str)
    }

    /// Whether endpoint `i` is marked down (it failed less than
    /// `probe_interval` ago, or its last health probe failed).
    pub fn is_down(&self, i: usize) -> bool {
        let state = self.state();
        state
            .endpoints
            .get(i)
            .and_then(|h| h.down_since)
            .is_some_and(|since| since.elapsed() < self.cool_down)
    }

    /// The endpoint the backend's last link connected to.
    pub fn active(&self) -> Option<usize> {
        self.state().last
    }

    /// The endpoints as health details: `{prefix}_endpoint_{i}` (its name),
    /// `{prefix}_endpoint_{i}_state` (`up`, `down` or `unknown`, before
    /// anything tried it), `{prefix}_endpoint_{i}_connects` and
    /// `{prefix}_endpoint_{i}_failures`, and `{prefix}_endpoint_active`
    /// (the name of the endpoint the last link connected to). Nothing for a
    /// single endpoint: there is nothing to fail over to.
    pub fn health(&self, prefix: &str) -> BTreeMap<String, String> {
        let mut details = BTreeMap::new();
        if self.len() < 2 {
            return details;
        }
        let state = self.state();
        for (i, (name, h)) in self.names.iter().zip(&state.endpoints).enumerate() {
            let status = match h.down_since {
                Some(_) => "down",
                None if h.known => "up",
                None => "unknown",
            };
            let key = format!("{prefix}_endpoint_{i}");
            details.insert(format!("{key}_state"), status.to_owned());
            details.insert(format!("{key}_connects"), h.connects.to_string());
            details.insert(format!("{key}_failures"), h.failures.to_string());
            details.insert(key, name.clone());
        }
        if let Some(last) = state.last {
            details.insert(
                format!("{prefix}_endpoint_active"),
                self.name(last).to_owned(),
            );
        }
        details
    }

    /// Checks each endpoint of `dials` (in the order of these endpoints)
    /// accepts TCP connections ([`Dial::probe`], which takes no WebSocket
    /// seat), marking it up or down: a primary found answering is preferred
    /// again by the next connect. A single endpoint is probed as
    /// [`Dial::probe`] does, its error as it is.
    ///
    /// # Errors
    ///
    /// `ConnectionFailed` when none answers, naming each endpoint and why.
    pub async fn probe(&self, dials: &[Dial], service: &str) -> Result<()> {
        if let [only] = dials {
            return only.probe(service).await;
        }
        let mut failures = Vec::new();
        for (i, dial) in dials.iter().enumerate().take(self.len()) {
            match dial.probe(service).await {
                Ok(()) => {
                    let mut state = self.state();
                    let h = &mut state.endpoints[i];
                    h.known = true;
                    h.down_since = None;
                }
                Err(e) => {
                    self.failed(i);
                    failures.push(e);
                }
            }
        }
        if failures.len() < dials.len().min(self.len()) {
            return Ok(());
        }
        Err(none_answered(service, failures))
    }

    /// The order to try the endpoints in: those not marked down in order of
    /// preference, then those marked down (each also in order).
    pub(super) fn order(&self) -> Vec<usize> {
        let state = self.state();
        let (mut up, down): (Vec<usize>, Vec<usize>) = (0..self.len()).partition(|&i| {
            state.endpoints[i]
                .down_since
                .is_none_or(|since| since.elapsed() >= self.cool_down)
        });
        up.extend(down);
        up
    }

    /// Endpoint `i` failed to answer.
    pub(super) fn failed(&self, i: usize) {
        let mut state = self.state();
        if let Some(h) = state.endpoints.get_mut(i) {
            h.known = true;
            h.failures += 1;
            h.down_since = Some(Instant::now());
        }
    }

    /// A link connected to endpoint `i` after passing over `passed`;
    /// returns the switch to report when the backend's links were served by
    /// another endpoint before (`from`, `to`, why).
    pub(super) fn connected(&self, i: usize, passed: &Passed) -> Option<(usize, SwitchReason)> {
        let mut state = self.state();
        if let Some(h) = state.endpoints.get_mut(i) {
            h.known = true;
            h.connects += 1;
            h.down_since = None;
        }
        let reason_for = |from: usize| {
            passed
                .iter()
                .find(|(j, _)| *j == from)
                .map_or(SwitchReason::Down, |(_, r)| *r)
        };
        let switch = match state.last {
            Some(last) if last == i => None,
            // Back to a more preferred endpoint, unless the one before
            // failed just now.
            Some(last) if last > i => Some((
                last,
                passed
                    .iter()
                    .find(|(j, _)| *j == last)
                    .map_or(SwitchReason::Recovered, |(_, r)| *r),
            )),
            Some(last) => Some((last, reason_for(last))),
            // The backend's first link: a switch when the primary did not
            // serve it.
            None if i == 0 => None,
            None => Some((0, reason_for(0))),
        };
        state.last = Some(i);
        switch
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Endpoints after a link's first, and where it tells which one serves
/// ([`LinkSettings::with_fallbacks`]).
#[derive(Clone, Debug)]
pub struct Fallbacks {
    /// The endpoints after [`LinkSettings::dial`], in order of preference.
    pub dials: Vec<Dial>,
    /// What the backend's links know of all the endpoints, `dial` first.
    pub endpoints: Arc<Endpoints>,
    /// Where the session's link publishes the endpoint it is connected to
    /// ([`ENDPOINT_INFO_KEY`]).
    pub info: Option<SessionInfo>,
}

/// The error when no endpoint answered: a connection failure naming each
/// (with the code all share, else `ConnectionFailed`), the first as source.
fn none_answered(service: &str, failures: Vec<BackendError>) -> BackendError {
    let code = match failures.first() {
        Some(first) if failures.iter().all(|e| e.code == first.code) => first.code,
        _ => ErrorCode::ConnectionFailed,
    };
    let causes: Vec<&str> = failures.iter().map(|e| e.message.as_str()).collect();
    let n = failures.len();
    let mut error = BackendError::new(
        "link.connect",
        code,
        format!(
            "none of the {n} endpoints of {service} answered: {}",
            causes.join("; ")
        ),
    )
    .with_detail("endpoints", n.to_string());
    if let Some(first) = failures.into_iter().next() {
        error = error.with_source(first);
    }
    error
}

/// A connection [`connect_any`] made: what the service said first, which
/// endpoint it is, and the endpoints passed over on the way (with why).
pub(super) struct Connected {
    pub(super) ws: Ws,
    pub(super) early: Vec<WsMessage>,
    pub(super) endpoint: usize,
    pub(super) passed: Passed,
}

impl Connected {
    /// The session's switch to report when its link was served by
    /// endpoint `from` before (the primary, for a link just opened):
    /// `None` when it is the same one.
    pub(super) fn switch_from(&self, from: usize) -> Option<SwitchReason> {
        if from == self.endpoint {
            return None;
        }
        let why = self
            .passed
            .iter()
            .find(|(j, _)| *j == from)
            .map(|(_, r)| *r);
        Some(why.unwrap_or(if from > self.endpoint {
            SwitchReason::Recovered
        } else {
            SwitchReason::Down
        }))
    }
}

/// Dials, greets and waits for the service to be ready at the first
/// endpoint that answers, in the order of [`Endpoints::order`]. Without
/// fallbacks, dials [`LinkSettings::dial`] as ever.
pub(super) async fn connect_any<P: WireProtocol>(
    protocol: &mut P,
    settings: &LinkSettings,
    counters: &LinkCounters,
) -> Result<Connected> {
    let Some(fallbacks) = &settings.fallbacks else {
        let (ws, early) =
            super::connect::connect(protocol, settings, &settings.dial, None, counters).await?;
        return Ok(Connected {
            ws,
            early,
            endpoint: 0,
            passed: Vec::new(),
        });
    };
    let endpoints = &fallbacks.endpoints;
    let service = protocol.service();
    let mut passed: Passed = Vec::new();
    let mut failures = Vec::new();
    for i in endpoints.order() {
        let Some(dial) = settings.dial_at(i) else {
            continue;
        };
        let bound = Some(endpoints.dial_timeout);
        match super::connect::connect(protocol, settings, dial, bound, counters).await {
            Ok((ws, early)) => {
                // Passed over without being tried: marked down.
                for j in 0..i {
                    if !passed.iter().any(|(k, _)| *k == j) {
                        passed.push((j, SwitchReason::Down));
                    }
                }
                let switch = endpoints.connected(i, &passed);
                report(settings, fallbacks, i, switch);
                return Ok(Connected {
                    ws,
                    early,
                    endpoint: i,
                    passed,
                });
            }
            Err(e) => {
                tracing::warn!(
                    endpoint = %dial.endpoint,
                    "{service} did not answer; trying the next endpoint: {}",
                    e.message
                );
                endpoints.failed(i);
                let reason = if e.code == ErrorCode::ConnectionTimeout {
                    SwitchReason::Timeout
                } else {
                    SwitchReason::Error
                };
                passed.push((i, reason));
                failures.push(e);
            }
        }
    }
    Err(none_answered(service, failures))
}

/// Publishes which endpoint serves the session, and counts a switch.
fn report(
    settings: &LinkSettings,
    fallbacks: &Fallbacks,
    to: usize,
    switch: Option<(usize, SwitchReason)>,
) {
    let endpoints = &fallbacks.endpoints;
    let name = endpoints.name(to);
    if let Some(info) = &fallbacks.info {
        info.set(ENDPOINT_INFO_KEY, name);
    }
    let Some((from, reason)) = switch else {
        return;
    };
    let from = endpoints.name(from);
    tracing::info!(
        from,
        to = name,
        reason = reason.as_str(),
        "the service's connections are served by another endpoint"
    );
    if let Some(metrics) = &settings.metrics {
        metrics.component_switched(ENDPOINT_STAGE, from, name, reason.as_str());
    }
}

/// How long `dial` may take when bounded, as an error past it.
pub(super) fn dial_timed_out(service: &str, endpoint: &str, bound: Duration) -> BackendError {
    BackendError::new(
        "link.connect",
        ErrorCode::ConnectionTimeout,
        format!(
            "could not reach {service} at {endpoint}: no answer within failover.timeout = {}",
            humantime::format_duration(bound)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failover(probe_interval: Duration) -> FailoverConfig {
        FailoverConfig {
            probe_interval,
            ..FailoverConfig::default()
        }
    }

    #[test]
    fn names_are_host_and_port_never_the_url_and_repeats_are_numbered() {
        let e = Endpoints::new(
            [
                "ws://user:pw@a:1/x?token=secret",
                "wss://b/",
                "ws://a:1/y?token=other",
            ],
            &FailoverConfig::default(),
        );
        assert_eq!(e.names(), ["a:1", "b:443", "a:1#2"]);
        let shown = format!("{:?}", e.health("p"));
        assert!(
            !shown.contains("secret") && !shown.contains("pw"),
            "{shown}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_endpoint_is_tried_last_until_its_cool_down_is_over() {
        let e = Endpoints::new(
            ["ws://a:1", "ws://b:2", "ws://c:3"],
            &failover(Duration::from_millis(50)),
        );
        assert_eq!(e.order(), [0, 1, 2]);
        e.failed(0);
        assert!(e.is_down(0));
        assert_eq!(e.order(), [1, 2, 0]);
        e.failed(1);
        assert_eq!(e.order(), [2, 0, 1]);
        tokio::time::advance(Duration::from_millis(49)).await;
        assert_eq!(e.order(), [2, 0, 1], "still cooling down");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(!e.is_down(0));
        assert_eq!(e.order(), [0, 1, 2], "the primary comes first again");
    }

    #[test]
    fn switches_are_reported_with_why_and_back_as_recovered() {
        let e = Endpoints::new(["ws://a:1", "ws://b:2"], &FailoverConfig::default());
        let health = |k: &str| e.health("p").get(k).cloned().unwrap_or_default();
        assert_eq!(health("p_endpoint_0_state"), "unknown");
        // The first link: the primary refused.
        e.failed(0);
        assert_eq!(
            e.connected(1, &vec![(0, SwitchReason::Error)]),
            Some((0, SwitchReason::Error))
        );
        assert_eq!(health("p_endpoint_0_state"), "down");
        assert_eq!(health("p_endpoint_1_state"), "up");
        assert_eq!(health("p_endpoint_active"), "b:2");
        // The next link skipped the primary, marked down: no new switch.
        assert_eq!(e.connected(1, &vec![(0, SwitchReason::Down)]), None);
        // The primary answers again.
        assert_eq!(
            e.connected(0, &Vec::new()),
            Some((1, SwitchReason::Recovered))
        );
        assert_eq!(health("p_endpoint_0_state"), "up");
        assert_eq!(health("p_endpoint_0_connects"), "1");
        assert_eq!(health("p_endpoint_0_failures"), "1");
        // The primary times out for a link.
        assert_eq!(
            e.connected(1, &vec![(0, SwitchReason::Timeout)]),
            Some((0, SwitchReason::Timeout))
        );
    }
}
