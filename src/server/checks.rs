//! What the server checks of each request before it serves it: the `Host`
//! (against DNS rebinding), the `Origin` of a WebSocket, and its bearer
//! token.

use std::net::SocketAddr;

use axum::http::{HeaderMap, header};

use crate::config::Secret;

/// The host and port of a `Host` header's value (`name[:port]`,
/// `[v6]:port`), lowercased; `None` when it is not one.
pub(super) fn parse_host(value: &str) -> Option<(url::Host<String>, Option<u16>)> {
    if value.is_empty() || value.contains(['/', '@', '?', '#', '\\', ' ']) {
        return None;
    }
    let url = url::Url::parse(&format!("http://{value}/")).ok()?;
    Some((url.host()?.to_owned(), url.port()))
}

/// Whether a request's `Host` names the server as
/// [`ServerConfig::allowed_hosts`] allows; the error is the reason.
pub(super) fn check_host(
    allowed: &[String],
    local: SocketAddr,
    headers: &HeaderMap,
) -> std::result::Result<(), String> {
    let Some(value) = headers.get(header::HOST) else {
        return Ok(());
    };
    let shown = || {
        String::from_utf8_lossy(value.as_bytes())
            .chars()
            .take(100)
            .collect::<String>()
    };
    let refused = || Err(format!("host not allowed: {}", shown()));
    let Some((host, _)) = value.to_str().ok().and_then(parse_host) else {
        return refused();
    };
    let ok = if allowed.is_empty() {
        !local.ip().is_loopback()
            || match &host {
                url::Host::Domain(name) => name == "localhost" || name.ends_with(".localhost"),
                url::Host::Ipv4(_) | url::Host::Ipv6(_) => true,
            }
    } else {
        allowed.iter().any(|entry| {
            if entry == "*" {
                return true;
            }
            match (entry.strip_prefix('.'), &host) {
                (Some(domain), url::Host::Domain(name)) => {
                    let domain = domain.to_ascii_lowercase();
                    *name == domain
                        || name
                            .strip_suffix(domain.as_str())
                            .is_some_and(|sub| sub.ends_with('.'))
                }
                (Some(_), _) => false,
                (None, _) => parse_host(entry).is_some_and(|(listed, _)| listed == host),
            }
        })
    };
    if ok { Ok(()) } else { refused() }
}

/// The token of an `Authorization: Bearer <token>` header.
pub(super) fn bearer_token(headers: &HeaderMap) -> Option<Secret> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| Secret::new(token))
}

/// Whether the request's `Origin` may open a WebSocket; the error is the reason.
pub(super) fn check_origin(
    allowed: &[String],
    headers: &HeaderMap,
) -> std::result::Result<(), String> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let Ok(origin) = origin.to_str() else {
        return Err("origin not allowed: the Origin header is not valid text".into());
    };
    let shown = || origin.chars().take(100).collect::<String>();
    if !allowed.is_empty() {
        return if allowed
            .iter()
            .any(|a| a.trim_end_matches('/').eq_ignore_ascii_case(origin))
        {
            Ok(())
        } else {
            Err(format!("origin not allowed: {}", shown()))
        };
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    if same_host(origin, host) {
        Ok(())
    } else {
        Err(format!(
            "origin not allowed: {} is not this server's host",
            shown()
        ))
    }
}

/// Whether `origin` (`scheme://host[:port]`) names the same host and port as
/// the `Host` header `host` (whose missing port is the scheme's default).
fn same_host(origin: &str, host: &str) -> bool {
    let Ok(origin) = url::Url::parse(origin) else {
        return false;
    };
    if host.is_empty() || host.contains(['/', '@', '?', '#']) {
        return false;
    }
    let Ok(host) = url::Url::parse(&format!("{}://{host}", origin.scheme())) else {
        return false;
    };
    origin.host().is_some()
        && origin.host() == host.host()
        && origin.port_or_known_default() == host.port_or_known_default()
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::super::config::check_allowed_host;
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn same_host_origins_and_no_origin_pass_by_default() {
        let ok = |o: &str, h: &str| check_origin(&[], &headers(&[("origin", o), ("host", h)]));
        assert!(check_origin(&[], &headers(&[("host", "x:1")])).is_ok());
        assert!(ok("http://localhost:8089", "localhost:8089").is_ok());
        assert!(ok("http://LOCALHOST:8089", "localhost:8089").is_ok());
        assert!(ok("https://example.com", "example.com").is_ok());
        assert!(ok("https://example.com", "example.com:443").is_ok());
        assert!(ok("http://[::1]:8089", "[::1]:8089").is_ok());
        assert!(ok("http://localhost:8089", "localhost:8090").is_err());
        assert!(ok("http://evil.example", "localhost:8089").is_err());
        assert!(ok("null", "localhost:8089").is_err());
        assert!(ok("http://localhost:8089", "").is_err());
        assert!(ok("http://a.com", "a.com@b.com").is_err());
    }

    #[test]
    fn listed_origins_are_exact() {
        let allowed = vec!["http://app.example:3000".to_owned()];
        let h = |o: &str| headers(&[("origin", o), ("host", "api.example")]);
        assert!(check_origin(&allowed, &h("http://app.example:3000")).is_ok());
        assert!(check_origin(&allowed, &h("http://app.example")).is_err());
        assert!(check_origin(&allowed, &headers(&[("host", "api.example")])).is_ok());
    }

    #[test]
    fn hosts_are_checked_against_rebinding() {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 8089));
        let anywhere = SocketAddr::from(([0, 0, 0, 0], 8089));
        let check = |allowed: &[&str], local, host: &str| {
            let allowed: Vec<String> = allowed.iter().map(|s| s.to_string()).collect();
            check_host(&allowed, local, &headers(&[("host", host)]))
        };
        // Bound to loopback: loopback names and IP addresses only.
        for ok in [
            "localhost:8089",
            "LOCALHOST",
            "app.localhost:8089",
            "127.0.0.1:8089",
            "[::1]:8089",
            "10.1.2.3",
        ] {
            assert!(check(&[], loopback, ok).is_ok(), "{ok}");
        }
        for bad in [
            "rebind.example:18089",
            "localhost.example.com",
            "evillocalhost",
            "a@localhost",
            "",
        ] {
            let e = check(&[], loopback, bad).unwrap_err();
            assert!(e.starts_with("host not allowed"), "{e}");
        }
        assert!(check_host(&[], loopback, &headers(&[])).is_ok());
        // Bound elsewhere with nothing listed: any host.
        assert!(check(&[], anywhere, "rebind.example:18089").is_ok());
        // Listed hosts, names and domains.
        let listed = [
            "voice.example.com",
            ".example.org",
            "192.0.2.7",
            "[2001:db8::7]",
        ];
        for ok in [
            "voice.example.com:443",
            "VOICE.example.com",
            "example.org",
            "a.b.example.org",
            "192.0.2.7:8089",
            "[2001:db8::7]:1",
        ] {
            assert!(check(&listed, anywhere, ok).is_ok(), "{ok}");
            assert!(check(&listed, loopback, ok).is_ok(), "{ok}");
        }
        for bad in ["example.com", "badexample.org", "localhost", "192.0.2.8"] {
            assert!(check(&listed, loopback, bad).is_err(), "{bad}");
        }
        assert!(check(&["*"], loopback, "rebind.example").is_ok());
        // Entries are checked.
        for good in [
            "*",
            "voice.example.com",
            ".example.com",
            "192.0.2.7",
            "[::1]",
        ] {
            assert!(check_allowed_host(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "http://a.com",
            "a.com:80",
            "a.com/x",
            ".192.0.2.7",
            "*.example.com",
        ] {
            let e = check_allowed_host(bad).unwrap_err();
            assert!(e.contains("is not a host"), "{e}");
        }
    }

    #[test]
    fn bearer_tokens() {
        let t = |v: &str| {
            bearer_token(&headers(&[("authorization", v)])).map(|s| s.expose().to_owned())
        };
        assert_eq!(t("Bearer abc").as_deref(), Some("abc"));
        assert_eq!(t("bearer  abc ").as_deref(), Some("abc"));
        assert_eq!(t("Basic abc"), None);
        assert_eq!(t("Bearer "), None);
    }
}
