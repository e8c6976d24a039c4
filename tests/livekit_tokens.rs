#![cfg(feature = "livekit")]
//! LiveKit access tokens (`providers::livekit::token`): what each token
//! grants, verification, bad key material, and agreement with LiveKit's own
//! Python SDK in both directions (Rust mints and `livekit.api.TokenVerifier`
//! verifies; `livekit.api.AccessToken` mints and Rust verifies).
//!
//! The Python half runs `tests/livekit_py/tokens.py` in the venv made by
//! `./scripts/venv livekit-api tests/livekit_py/requirements.txt
//! tests/livekit_py/check_imports.py`, whose python `VOICE_BACKENDS_LIVEKIT_PYTHON`
//! names. Without that variable those tests print why and pass without
//! running; with it set, a failing script fails them.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use livekit_api::access_token::{Claims, TokenVerifier, VideoGrants};
use serde_json::{Value, json};
use voice_backends::config::Secret;
use voice_backends::providers::livekit::token::{
    ADMIN_TTL, AdminScope, ApiKeys, KIND_AGENT, KIND_STANDARD, MAX_TTL, Participant,
};
use voice_backends::{ErrorCode, REDACTED};

const KEY: &str = "APIvoicebackends";
const SECRET: &str = "a-test-secret-that-is-long-enough-for-hs256-0123456789";

fn keys() -> ApiKeys {
    ApiKeys::new(KEY, Secret::new(SECRET)).expect("valid keys")
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn user() -> Participant {
    Participant::new("user-42")
        .with_name("Ada")
        .with_metadata(r#"{"plan":"pro"}"#)
        .with_attribute("lang", "en")
}

/// Verifies with the SDK's own verifier, independent of `ApiKeys::verify`.
fn sdk_verify(token: &Secret) -> Claims {
    TokenVerifier::with_api_key(KEY, SECRET)
        .verify(token.expose())
        .expect("LiveKit's Rust verifier accepts the token")
}

// ---------------------------------------------------------------------------
// What each token grants (Rust side)

#[test]
fn the_user_token_joins_exactly_one_room_and_nothing_else() {
    let ttl = Duration::from_secs(600);
    let token = keys().user_token("room-a", &user(), ttl).unwrap();
    for claims in [keys().verify(token.expose()).unwrap(), sdk_verify(&token)] {
        assert_eq!(claims.iss, KEY);
        assert_eq!(claims.sub, "user-42");
        assert_eq!(claims.name, "Ada");
        assert_eq!(claims.kind, KIND_STANDARD);
        assert_eq!(claims.metadata, r#"{"plan":"pro"}"#);
        assert_eq!(
            claims.attributes,
            HashMap::from([("lang".to_owned(), "en".to_owned())])
        );
        assert_eq!((claims.exp - claims.nbf) as u64, ttl.as_secs());
        assert!((claims.nbf as u64).abs_diff(now()) <= 2);
        // The whole grant, so nothing beyond these is set.
        assert_eq!(
            claims.video,
            VideoGrants {
                room_join: true,
                room: "room-a".into(),
                can_publish: Some(true),
                can_subscribe: Some(true),
                can_publish_data: Some(true),
                can_update_own_metadata: Some(false),
                ..VideoGrants::default()
            }
        );
        assert!(!claims.video.room_admin && !claims.video.room_create && !claims.video.room_list);
        assert!(!claims.video.agent && !claims.video.hidden);
        assert_eq!(claims.sip, Default::default());
    }
}

#[test]
fn the_agent_token_is_an_agent_in_its_room_and_hidden_only_when_asked() {
    let agent = Participant::new("agent").with_name("Assistant");
    for hidden in [false, true] {
        let token = keys()
            .agent_token("room-a", &agent, hidden, Duration::from_secs(60))
            .unwrap();
        let claims = keys().verify(token.expose()).unwrap();
        assert_eq!(claims.sub, "agent");
        assert_eq!(claims.kind, KIND_AGENT);
        assert_eq!(
            claims.video,
            VideoGrants {
                room_join: true,
                room: "room-a".into(),
                can_publish: Some(true),
                can_subscribe: Some(true),
                can_publish_data: Some(true),
                can_update_own_metadata: Some(true),
                agent: true,
                hidden,
                ..VideoGrants::default()
            }
        );
        assert_eq!(sdk_verify(&token).video, claims.video);
    }
}

#[test]
fn admin_tokens_carry_one_scope_each_and_no_identity() {
    let cases = [
        (
            AdminScope::CreateRooms,
            VideoGrants {
                room_create: true,
                ..VideoGrants::default()
            },
        ),
        (
            AdminScope::ListRooms,
            VideoGrants {
                room_list: true,
                ..VideoGrants::default()
            },
        ),
        (
            AdminScope::Room("room-a".into()),
            VideoGrants {
                room_admin: true,
                room: "room-a".into(),
                ..VideoGrants::default()
            },
        ),
    ];
    for (scope, grants) in cases {
        let token = keys().admin_token(&scope, ADMIN_TTL).unwrap();
        let claims = keys().verify(token.expose()).unwrap();
        assert_eq!(claims.video, grants, "{scope:?}");
        assert_eq!(claims.sub, "");
        assert!(!claims.video.room_join);
        assert_eq!((claims.exp - claims.nbf) as u64, ADMIN_TTL.as_secs());
    }
}

// ---------------------------------------------------------------------------
// Verification and bad input (Rust side)

#[test]
fn verify_refuses_a_wrong_secret_another_key_and_garbage_naming_why() {
    let token = keys()
        .user_token("room-a", &user(), Duration::from_secs(60))
        .unwrap();

    let other_secret = ApiKeys::new(KEY, Secret::new("another-secret-another-secret")).unwrap();
    let e = other_secret.verify(token.expose()).unwrap_err();
    assert_eq!(e.code, ErrorCode::AuthenticationFailed);
    assert!(e.message.contains("signature"), "{e}");
    assert!(!e.is_retryable());

    let other_key = ApiKeys::new("APIother", Secret::new(SECRET)).unwrap();
    let e = other_key.verify(token.expose()).unwrap_err();
    assert_eq!(e.code, ErrorCode::AuthenticationFailed);
    assert!(e.message.contains("issued for API key"), "{e}");

    // A token whose signature was changed.
    let mut tampered = token.expose().to_owned();
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    let e = keys().verify(&tampered).unwrap_err();
    assert_eq!(e.code, ErrorCode::AuthenticationFailed);

    for garbage in ["", "not a jwt", "a.b.c", "eyJhbGciOiJIUzI1NiJ9..x"] {
        let e = keys().verify(garbage).unwrap_err();
        assert_eq!(e.code, ErrorCode::AuthenticationFailed, "{garbage:?}");
        assert!(e.message.contains("not a JWT"), "{e}");
    }

    // No message or detail repeats the token or the secret.
    for e in [
        other_secret.verify(token.expose()).unwrap_err(),
        other_key.verify(token.expose()).unwrap_err(),
        keys().verify(&tampered).unwrap_err(),
    ] {
        let shown = format!("{e} {e:?}");
        assert!(!shown.contains(token.expose()) && !shown.contains(&tampered));
        assert!(!shown.contains(SECRET));
    }
}

#[test]
fn bad_key_material_and_claims_are_invalid_config() {
    let bad_keys = [
        ("", SECRET, "api_key"),
        (" APIkey", SECRET, "api_key"),
        ("API\nkey", SECRET, "api_key"),
        (KEY, "", "api_secret"),
        (KEY, REDACTED, "api_secret"),
        (KEY, "secret-with-a-newline\n", "api_secret"),
    ];
    for (key, secret, field) in bad_keys {
        let e = ApiKeys::new(key, Secret::new(secret)).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidConfig, "{key:?} {secret:?}");
        assert!(e.details.contains_key(field), "{e:?}");
        if !secret.is_empty() && secret != REDACTED {
            assert!(!format!("{e} {e:?}").contains(secret.trim()));
        }
    }

    let k = keys();
    let minute = Duration::from_secs(60);
    let cases = [
        k.user_token("room-a", &Participant::new(""), minute),
        k.user_token("", &user(), minute),
        k.user_token("room-a", &user(), Duration::ZERO),
        k.user_token("room-a", &user(), Duration::from_millis(999)),
        k.user_token("room-a", &user(), MAX_TTL + Duration::from_secs(1)),
        k.agent_token("", &Participant::new("agent"), false, minute),
        k.agent_token("room-a", &Participant::new(""), false, minute),
        k.admin_token(&AdminScope::Room(String::new()), minute),
        k.admin_token(&AdminScope::CreateRooms, Duration::ZERO),
    ];
    for (i, r) in cases.into_iter().enumerate() {
        let e = r.expect_err("refused");
        assert_eq!(e.code, ErrorCode::InvalidConfig, "case {i}: {e}");
    }
    // The bounds themselves are accepted.
    k.user_token("room-a", &user(), Duration::from_secs(1))
        .unwrap();
    k.user_token("room-a", &user(), MAX_TTL).unwrap();
}

#[test]
fn keys_and_tokens_never_show_in_debug() {
    let k = keys();
    let shown = format!("{k:?}");
    assert!(shown.contains(KEY), "{shown}");
    assert!(!shown.contains(SECRET), "{shown}");
    let token = k.user_token("room-a", &user(), ADMIN_TTL).unwrap();
    assert_eq!(format!("{token:?}"), REDACTED);
    assert_eq!(format!("{token}"), REDACTED);
}

// ---------------------------------------------------------------------------
// Against LiveKit's Python SDK

fn python() -> Option<String> {
    std::env::var("VOICE_BACKENDS_LIVEKIT_PYTHON")
        .ok()
        .filter(|p| !p.is_empty())
}

macro_rules! require_python {
    () => {
        if python().is_none() {
            eprintln!(
                "skipped: set VOICE_BACKENDS_LIVEKIT_PYTHON (./scripts/test does) to check tokens against LiveKit's Python SDK"
            );
            return;
        }
    };
}

/// Runs `tests/livekit_py/tokens.py COMMAND` with `request` on stdin.
fn py(command: &str, request: Value) -> Value {
    let python = python().expect("checked by require_python!");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/livekit_py/tokens.py");
    let mut child = Command::new(&python)
        .args(["-W", "ignore", script, command])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{python} does not start: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(request.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "tokens.py {command} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("tokens.py prints JSON")
}

fn py_verify(token: &str, secret: &str, leeway_s: u64) -> Value {
    py(
        "verify",
        json!({"key": KEY, "secret": secret, "token": token, "leeway_s": leeway_s}),
    )
}

#[test]
fn livekits_python_verifier_accepts_the_rust_user_token_with_its_one_room() {
    require_python!();
    let token = keys()
        .user_token("room-a", &user(), Duration::from_secs(600))
        .unwrap();
    let v = py_verify(token.expose(), SECRET, 60);
    assert_eq!(v["ok"], true, "{v}");
    let claims = &v["claims"];
    assert_eq!(claims["identity"], "user-42");
    assert_eq!(claims["name"], "Ada");
    assert_eq!(claims["kind"], "standard");
    assert_eq!(claims["metadata"], r#"{"plan":"pro"}"#);
    assert_eq!(claims["attributes"], json!({"lang": "en"}));
    let video = &claims["video"];
    assert_eq!(video["room_join"], true);
    assert_eq!(video["room"], "room-a");
    assert_eq!(video["can_publish"], true);
    assert_eq!(video["can_subscribe"], true);
    assert_eq!(video["can_publish_data"], true);
    assert_eq!(video["can_update_own_metadata"], false);
    for admin in [
        "room_admin",
        "room_create",
        "room_list",
        "room_record",
        "agent",
        "hidden",
    ] {
        assert!(
            matches!(video[admin], Value::Null | Value::Bool(false)),
            "{admin}: {video}"
        );
    }
    assert_eq!(v["raw"]["iss"], KEY);
    assert_eq!(
        v["raw"]["exp"].as_u64().unwrap() - v["raw"]["nbf"].as_u64().unwrap(),
        600
    );
    // What LiveKit's server would allow: joining room-a, and nothing else.
    assert_eq!(
        v["may"],
        json!({"join_room": "room-a", "admin_room": null, "create": false, "list": false})
    );
}

#[test]
fn livekits_python_verifier_reads_the_agent_and_admin_tokens_grants() {
    require_python!();
    let agent = keys()
        .agent_token(
            "room-a",
            &Participant::new("agent"),
            true,
            Duration::from_secs(60),
        )
        .unwrap();
    let v = py_verify(agent.expose(), SECRET, 60);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["claims"]["kind"], "agent");
    assert_eq!(v["claims"]["video"]["agent"], true);
    assert_eq!(v["claims"]["video"]["hidden"], true);
    assert_eq!(v["claims"]["video"]["can_update_own_metadata"], true);
    assert_eq!(
        v["may"],
        json!({"join_room": "room-a", "admin_room": null, "create": false, "list": false})
    );

    let expected = [
        (
            AdminScope::CreateRooms,
            json!({"join_room": null, "admin_room": null, "create": true, "list": false}),
        ),
        (
            AdminScope::ListRooms,
            json!({"join_room": null, "admin_room": null, "create": false, "list": true}),
        ),
        (
            AdminScope::Room("room-a".into()),
            json!({"join_room": null, "admin_room": "room-a", "create": false, "list": false}),
        ),
    ];
    for (scope, may) in expected {
        let token = keys().admin_token(&scope, ADMIN_TTL).unwrap();
        let v = py_verify(token.expose(), SECRET, 60);
        assert_eq!(v["ok"], true, "{scope:?}: {v}");
        assert_eq!(v["may"], may, "{scope:?}");
    }
}

#[test]
fn livekits_python_verifier_refuses_rust_tokens_with_a_wrong_secret_or_expired() {
    require_python!();
    let token = keys()
        .user_token("room-a", &user(), Duration::from_secs(60))
        .unwrap();
    let v = py_verify(token.expose(), "the-wrong-secret-the-wrong-secret", 60);
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["error"], "InvalidSignatureError");

    // A 3 s token verifies at once and not once its exp has passed (no leeway).
    let short = keys()
        .user_token("room-a", &user(), Duration::from_secs(3))
        .unwrap();
    let v = py_verify(short.expose(), SECRET, 0);
    assert_eq!(v["ok"], true, "fresh: {v}");
    let exp = v["raw"]["exp"].as_u64().unwrap();
    let expired_at = UNIX_EPOCH + Duration::from_secs(exp) + Duration::from_millis(100);
    if let Ok(wait) = expired_at.duration_since(SystemTime::now()) {
        std::thread::sleep(wait);
    }
    let v = py_verify(short.expose(), SECRET, 0);
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["error"], "ExpiredSignatureError");
}

fn py_mint(secret: &str, key: &str, identity: &str, grants: Value, ttl_s: i64) -> String {
    let v = py(
        "mint",
        json!({
            "key": key, "secret": secret, "identity": identity, "name": "Grace",
            "kind": "standard", "metadata": "m", "attributes": {"a": "1"},
            "grants": grants, "ttl_s": ttl_s,
        }),
    );
    v["token"].as_str().unwrap().to_owned()
}

#[test]
fn rust_verifies_tokens_livekits_python_sdk_mints_and_reads_their_grants() {
    require_python!();
    let grants = json!({"room_join": true, "room": "room-b", "can_publish_data": false});
    let token = py_mint(SECRET, KEY, "py-user", grants, 300);
    let claims = keys().verify(&token).unwrap();
    assert_eq!(claims.iss, KEY);
    assert_eq!(claims.sub, "py-user");
    assert_eq!(claims.name, "Grace");
    assert_eq!(claims.kind, "standard");
    assert_eq!(claims.metadata, "m");
    assert_eq!(
        claims.attributes.into_iter().collect::<BTreeMap<_, _>>(),
        BTreeMap::from([("a".to_owned(), "1".to_owned())])
    );
    assert_eq!((claims.exp - claims.nbf) as u64, 300);
    assert!(claims.video.room_join);
    assert_eq!(claims.video.room, "room-b");
    assert!(claims.video.can_publish() && claims.video.can_subscribe());
    assert!(!claims.video.can_publish_data());
    assert!(!claims.video.room_admin && !claims.video.room_create && !claims.video.room_list);

    // A Python-minted admin token scoped to one room reads so here.
    let admin = py_mint(
        SECRET,
        KEY,
        "",
        json!({"room_admin": true, "room": "room-b"}),
        60,
    );
    let claims = keys().verify(&admin).unwrap();
    assert!(claims.video.room_admin && !claims.video.room_join);
    assert_eq!(claims.video.room, "room-b");
}

#[test]
fn rust_refuses_python_tokens_with_a_wrong_secret_another_key_expired_or_not_yet_valid() {
    require_python!();
    let grants = json!({"room_join": true, "room": "room-b"});
    let cases = [
        (
            py_mint(
                "the-wrong-secret-the-wrong-secret",
                KEY,
                "u",
                grants.clone(),
                300,
            ),
            "signature",
        ),
        (
            py_mint(SECRET, "APIother", "u", grants.clone(), 300),
            "issued for API key",
        ),
        // Expired five minutes ago: past the one-minute leeway.
        (py_mint(SECRET, KEY, "u", grants.clone(), -300), "expired"),
    ];
    for (token, why) in cases {
        let e = keys().verify(&token).unwrap_err();
        assert_eq!(e.code, ErrorCode::AuthenticationFailed, "{why}");
        assert!(e.message.contains(why), "{why}: {e}");
        assert!(!format!("{e} {e:?}").contains(&token));
    }

    // Expired 30 s ago: within the leeway LiveKit's verifiers give, accepted.
    let recent = py_mint(SECRET, KEY, "u", grants.clone(), -30);
    keys().verify(&recent).expect("within the leeway");

    let claims = |nbf: u64, exp: u64| {
        json!({"iss": KEY, "sub": "u", "nbf": nbf, "exp": exp,
               "video": {"roomJoin": true, "room": "room-b"}})
    };
    let forge = |claims: Value, algorithm: &str| {
        py(
            "forge",
            json!({"secret": SECRET, "claims": claims, "algorithm": algorithm}),
        )["token"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let t = now();
    // Not valid for another ten minutes.
    let e = keys()
        .verify(&forge(claims(t + 600, t + 1200), "HS256"))
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::AuthenticationFailed);
    assert!(e.message.contains("not valid for another"), "{e}");
    // The right secret with another algorithm: LiveKit's tokens are HS256.
    let e = keys()
        .verify(&forge(claims(t, t + 600), "HS512"))
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::AuthenticationFailed);
    // The same claims in HS256 pass, so it was the algorithm.
    keys()
        .verify(&forge(claims(t, t + 600), "HS256"))
        .expect("HS256 with the right secret");
}

// ---------------------------------------------------------------------------
// Tokens from outside: whatever arrives, a typed refusal and no panic

mod arbitrary_tokens {
    use super::*;
    use proptest::prelude::*;

    fn b64(bytes: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Three dot-separated segments: a header and claims that are JSON of
    /// LiveKit's shape (or not), and any signature.
    fn jwt_shaped() -> impl Strategy<Value = String> {
        let header = prop_oneof![
            Just(r#"{"alg":"HS256","typ":"JWT"}"#.to_owned()),
            Just(r#"{"alg":"none"}"#.to_owned()),
            ".{0,40}",
        ];
        let claims = (
            any::<i64>(),
            any::<i64>(),
            prop_oneof![Just(KEY.to_owned()), ".{0,12}"],
            any::<bool>(),
        )
            .prop_map(|(nbf, exp, iss, join)| {
                json!({"iss": iss, "sub": "u", "nbf": nbf, "exp": exp,
                       "video": {"roomJoin": join, "room": "r"}})
                .to_string()
            });
        let claims = prop_oneof![claims, ".{0,80}"];
        let signature = prop::collection::vec(any::<u8>(), 0..48);
        (header, claims, signature).prop_map(|(h, c, s)| {
            format!("{}.{}.{}", b64(h.as_bytes()), b64(c.as_bytes()), b64(&s))
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn anything_not_signed_with_the_secret_is_refused_as_authentication_failed(
            token in prop_oneof![jwt_shaped(), ".{0,200}"]
        ) {
            let e = keys().verify(&token).expect_err("not signed with the secret");
            prop_assert_eq!(e.code, ErrorCode::AuthenticationFailed);
            prop_assert!(!e.message.contains(&token) || token.len() < 8, "{}", e);
        }

        #[test]
        fn a_valid_token_changed_anywhere_is_refused(at in any::<prop::sample::Index>(), c in "[A-Za-z0-9_.-]") {
            let token = keys().user_token("room-a", &user(), Duration::from_secs(60)).unwrap();
            let mut chars: Vec<char> = token.expose().chars().collect();
            let last = chars.len() - 1;
            let i = at.index(chars.len());
            let replacement = c.chars().next().unwrap();
            prop_assume!(chars[i] != replacement);
            chars[i] = replacement;
            let changed: String = chars.into_iter().collect();
            match keys().verify(&changed) {
                Err(e) => prop_assert_eq!(e.code, ErrorCode::AuthenticationFailed),
                // Base64's last character may carry unused bits: the same
                // bytes, the same valid token; nowhere else.
                Ok(claims) => {
                    prop_assert_eq!(i, last);
                    prop_assert_eq!(claims.sub, "user-42");
                }
            }
        }
    }
}
