//! Registry semantics: every contract method, overlay shadowing and removal,
//! concurrency, and link-time registration.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use common::{DoubleProvider, valid_config};
use voice_backends::{BackendProvider, BackendRegistry, ErrorCode, register_provider, registry};

/// The test-only provider registered at link time, through the public macro.
fn static_test_provider() -> DoubleProvider {
    DoubleProvider::plain("static-test", "static-test")
}

register_provider!("static-test", static_test_provider);

/// The providers every registry of this binary must hold: the test's own static
/// one plus one per enabled provider feature.
fn expected_static_names() -> BTreeSet<String> {
    // `local` is built in, never behind a feature.
    let mut names = BTreeSet::from(["local".to_owned(), "static-test".to_owned()]);
    // Each provider feature adds its name here as the provider arrives.
    let features = [
        ("cartesia", cfg!(feature = "cartesia")),
        ("livekit", cfg!(feature = "livekit")),
        ("pipecat", cfg!(feature = "pipecat")),
        ("vapi", cfg!(feature = "vapi")),
        ("vocode", cfg!(feature = "vocode")),
    ];
    for (name, enabled) in features {
        if enabled {
            names.insert(name.to_owned());
        }
    }
    names
}

/// The static names plus `extra`, sorted, as `list_providers` gives them.
fn with_statics(extra: &[&str]) -> Vec<String> {
    let mut names = expected_static_names();
    names.extend(extra.iter().map(|n| n.to_string()));
    names.into_iter().collect()
}

#[test]
fn static_registration_happened_and_matches_the_enabled_features() {
    let reg = BackendRegistry::new();
    let names: BTreeSet<String> = reg.list_providers().into_iter().map(String::from).collect();
    assert_eq!(names, expected_static_names());
    assert!(reg.duplicates().is_empty());
    let p = reg.get_provider("static-test").unwrap();
    assert_eq!(p.name(), "static-test");
}

#[tokio::test]
async fn create_uses_the_static_provider() {
    let reg = BackendRegistry::new();
    let backend = reg
        .create("static-test", &valid_config("static-test"))
        .await
        .unwrap();
    assert_eq!(backend.provider(), "static-test");
    assert_eq!(backend.config().s2s_provider.as_deref(), Some("echo"));
}

#[tokio::test]
async fn unknown_name_is_provider_not_found_listing_the_available_names() {
    let reg = BackendRegistry::new();
    reg.register("zeta", DoubleProvider::new("zeta", "zeta"));
    reg.register("alpha", DoubleProvider::new("alpha", "alpha"));
    let err = reg
        .create("livekt", &valid_config("livekt"))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code, ErrorCode::ProviderNotFound);
    assert_eq!(err.op, "registry.create");
    let available = with_statics(&["alpha", "zeta"]).join(", ");
    assert!(
        err.message.contains("\"livekt\"")
            && err.message.contains(&format!("available: {available}")),
        "{err}"
    );
    let err = reg.get_provider("nope").err().unwrap();
    assert_eq!(err.code, ErrorCode::ProviderNotFound);
    assert!(err.message.contains(&available), "{err}");
    assert!(!reg.is_registered("nope"));
}

#[tokio::test]
async fn provider_validation_runs_first_and_failure_is_invalid_config_with_nothing_created() {
    let reg = BackendRegistry::new();
    // Whatever code the provider uses, the registry reports InvalidConfig.
    let p = DoubleProvider::rejecting("picky", ErrorCode::PipelineError, "url must be wss");
    reg.register("picky", p.clone());
    let err = reg
        .create("picky", &valid_config("picky"))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code, ErrorCode::InvalidConfig);
    assert_eq!(err.op, "registry.create");
    assert!(err.message.contains("url must be wss"));
    assert_eq!(
        err.details.get("provider_config.url").map(String::as_str),
        Some("rejected by the double")
    );
    assert_eq!(p.validated.load(Ordering::Relaxed), 1);
    assert_eq!(p.created.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn generic_config_validation_runs_before_the_provider_sees_the_config() {
    let reg = BackendRegistry::new();
    let p = DoubleProvider::new("double", "double");
    reg.register("double", p.clone());
    let mut config = valid_config("double");
    config.max_retries = 11;
    config.s2s_provider = None;
    let err = reg.create("double", &config).await.err().unwrap();
    assert_eq!(err.code, ErrorCode::InvalidConfig);
    assert!(err.details.contains_key("max_retries"), "{:?}", err.details);
    assert!(
        err.details.contains_key("s2s_provider"),
        "{:?}",
        err.details
    );
    assert_eq!(p.validated.load(Ordering::Relaxed), 0);
    assert_eq!(p.created.load(Ordering::Relaxed), 0);

    let backend = reg.create("double", &valid_config("double")).await.unwrap();
    assert_eq!(backend.provider(), "double");
    assert_eq!(
        (
            p.validated.load(Ordering::Relaxed),
            p.created.load(Ordering::Relaxed)
        ),
        (1, 1)
    );
}

#[tokio::test]
async fn overlay_shadows_a_static_entry_and_removal_reveals_it_again() {
    let reg = BackendRegistry::new();
    let double = DoubleProvider::new("static-test", "the-double");
    let replaced = reg
        .register("static-test", double.clone())
        .expect("static entry was visible");
    assert_eq!(replaced.name(), "static-test");
    let backend = reg
        .create("static-test", &valid_config("static-test"))
        .await
        .unwrap();
    assert_eq!(backend.provider(), "the-double");
    assert_eq!(
        reg.list_providers(),
        with_statics(&[]),
        "shadowing must not duplicate the name"
    );

    // A second overlay registration returns the first double.
    let second = DoubleProvider::new("static-test", "second");
    let replaced = reg.register("static-test", second).unwrap();
    let b = reg.create("static-test", &valid_config("x")).await.unwrap();
    assert_eq!(b.provider(), "second");
    drop(replaced);

    let removed = reg
        .deregister("static-test")
        .expect("overlay entry removed");
    assert_eq!(removed.name(), "static-test");
    let backend = reg
        .create("static-test", &valid_config("static-test"))
        .await
        .unwrap();
    assert_eq!(
        backend.provider(),
        "static-test",
        "the static entry is back"
    );
    assert!(
        reg.deregister("static-test").is_none(),
        "static entries cannot be removed"
    );
    assert!(reg.is_registered("static-test"));
}

#[tokio::test]
async fn register_and_deregister_a_new_name() {
    let reg = BackendRegistry::new();
    assert!(
        reg.register("fresh", DoubleProvider::new("fresh", "fresh"))
            .is_none()
    );
    assert!(reg.is_registered("fresh"));
    assert_eq!(reg.list_providers(), with_statics(&["fresh"]));
    assert_eq!(
        reg.get_provider("fresh")
            .unwrap()
            .capabilities()
            .max_concurrent_sessions,
        7
    );
    assert!(reg.deregister("fresh").is_some());
    assert!(!reg.is_registered("fresh"));
    assert_eq!(
        reg.get_provider("fresh").err().unwrap().code,
        ErrorCode::ProviderNotFound
    );
    assert!(reg.deregister("fresh").is_none());
}

#[tokio::test]
async fn scoped_entries_restore_what_was_there() {
    let reg = BackendRegistry::new();
    reg.register("svc", DoubleProvider::new("svc", "outer"));
    {
        let _guard = reg.register_scoped("svc", DoubleProvider::new("svc", "inner"));
        let b = reg.create("svc", &valid_config("svc")).await.unwrap();
        assert_eq!(b.provider(), "inner");
        let _g2 = reg.register_scoped("temp", DoubleProvider::new("temp", "temp"));
        assert!(reg.is_registered("temp"));
    }
    assert!(!reg.is_registered("temp"));
    let b = reg.create("svc", &valid_config("svc")).await.unwrap();
    assert_eq!(b.provider(), "outer");
}

#[test]
fn registries_are_independent() {
    let a = BackendRegistry::new();
    let b = BackendRegistry::new();
    a.register("only-a", DoubleProvider::new("only-a", "a"));
    assert!(a.is_registered("only-a"));
    assert!(!b.is_registered("only-a"));
}

#[tokio::test]
async fn global_registry_and_new_backend() {
    let global = registry();
    assert!(std::ptr::eq(global, registry()), "one global instance");
    assert!(global.is_registered("static-test"));
    let _guard = global.register_scoped("global-double", DoubleProvider::new("global-double", "g"));
    let backend = voice_backends::new_backend("global-double", &valid_config("global-double"))
        .await
        .unwrap();
    assert_eq!(backend.provider(), "g");
    let err = voice_backends::new_backend("missing", &valid_config("missing"))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code, ErrorCode::ProviderNotFound);
}

#[test]
fn config_schema_comes_from_the_provider_type() {
    let p = DoubleProvider::new("double", "double");
    let schema = p.config_schema();
    assert_eq!(schema.provider, "double");
    assert!(schema.has_property("url"), "{}", schema.schema);
    assert!(!schema.has_property("api_key"));
}

#[test]
fn the_global_registry_is_shared_across_threads() {
    let handles: Vec<_> = (0..8)
        .map(|_| std::thread::spawn(|| registry() as *const BackendRegistry as usize))
        .collect();
    let addrs: BTreeSet<usize> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(addrs.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_register_and_create_lose_and_tear_nothing() {
    let reg = Arc::new(BackendRegistry::new());
    let shared = DoubleProvider::new("shared", "shared");
    reg.register("shared", shared.clone());
    const TASKS: usize = 32;
    const ROUNDS: usize = 50;
    let mut handles = Vec::new();
    for t in 0..TASKS {
        let reg = reg.clone();
        handles.push(tokio::spawn(async move {
            for r in 0..ROUNDS {
                let name = format!("task{t}-{r}");
                reg.register(&name, DoubleProvider::new(&name, &name));
                // Our own entry is visible at once and served by the right provider.
                let b = reg.create(&name, &valid_config(&name)).await.unwrap();
                assert_eq!(b.provider(), name, "torn entry");
                // The shared entry stays intact while everyone writes.
                let s = reg.create("shared", &valid_config("shared")).await.unwrap();
                assert_eq!(s.provider(), "shared");
                // Remove every other entry again.
                if r % 2 == 1 {
                    assert!(reg.deregister(&name).is_some());
                }
                tokio::task::yield_now().await;
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let names: Vec<String> = reg.list_providers().into_iter().map(String::from).collect();
    let expected: BTreeSet<String> = (0..TASKS)
        .flat_map(|t| {
            (0..ROUNDS)
                .filter(|r| r % 2 == 0)
                .map(move |r| format!("task{t}-{r}"))
        })
        .chain(["shared".to_owned()])
        .chain(expected_static_names())
        .collect();
    assert_eq!(names.len(), expected.len(), "no duplicates in the listing");
    assert_eq!(
        names.iter().cloned().collect::<BTreeSet<_>>(),
        expected,
        "no lost entries"
    );
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "listing is sorted");
    assert_eq!(shared.created.load(Ordering::Relaxed), TASKS * ROUNDS);
}

#[tokio::test]
async fn lookups_tell_apart_names_that_share_length_and_edges() {
    let reg = BackendRegistry::new();
    // Names whose length, first 8 and last 8 bytes agree differ only in the middle.
    let long_a = "provider-alpha-middle-region-eu-1";
    let long_b = "provider-alpha-MIDDLE-region-eu-1";
    let mut names = vec![
        long_a.to_owned(),
        long_b.to_owned(),
        "a".into(),
        "ab".into(),
        "abc".into(),
        "acc".into(),
        "".into(),
    ];
    names.extend((0..200).map(|i| format!("p{i}")));
    for n in &names {
        reg.register(n, DoubleProvider::new(n, &format!("tag:{n}")));
    }
    for n in &names {
        let b = reg.create(n, &valid_config("any")).await.unwrap();
        assert_eq!(b.provider(), format!("tag:{n}"));
    }
    for missing in [
        "provider-alpha-middlE-region-eu-1",
        "abd",
        "b",
        "p200",
        "p1 ",
    ] {
        assert!(!reg.is_registered(missing), "{missing:?}");
    }
    assert_eq!(
        reg.list_providers().len(),
        names.len() + expected_static_names().len(),
        "plus the static entries"
    );
}

#[test]
fn unknown_names_with_odd_characters_are_quoted_safely() {
    let reg = BackendRegistry::new();
    let err = reg.get_provider("evil\"\nname").err().unwrap();
    assert!(err.message.contains(r#""evil\"\nname""#), "{}", err.message);
    assert!(!err.message.contains('\n'));
}

#[test]
fn unknown_names_that_look_secret_are_cut() {
    let reg = BackendRegistry::new();
    let key = "sk_live_4eC39HqLyjWDarjtT1zdp7dc";
    let err = reg.get_provider(key).err().unwrap();
    assert!(!err.message.contains(key), "{}", err.message);
    assert!(!format!("{err:?}").contains(key));
    assert!(err.message.contains("\"sk_…\""), "{}", err.message);
    // Ordinary names are quoted whole.
    let err = reg.get_provider("pipcat-provider").err().unwrap();
    assert!(
        err.message.contains("\"pipcat-provider\""),
        "{}",
        err.message
    );
}

/// Lookups hit exactly the registered names, in tables of every size (small
/// ones get a collision-free index, larger ones probe) and for names of every
/// length, including names whose first and last bytes agree.
#[test]
fn lookups_find_exactly_the_registered_names() {
    let repeated = (1..=20).map(|n| "a".repeat(n));
    let varied = (0..40).map(|i: usize| format!("{}{i}", &"provider-name-long"[..i % 18]));
    let pool: Vec<String> = repeated.chain(varied).collect();
    for count in [1, 2, 3, 6, 12, 25, pool.len()] {
        let reg = BackendRegistry::new();
        let names: BTreeSet<String> = pool
            .iter()
            .step_by(pool.len() / count)
            .take(count)
            .cloned()
            .collect();
        for n in &names {
            reg.register(n, DoubleProvider::new(n, &format!("tag:{n}")));
        }
        let mut all = names.clone();
        all.extend(expected_static_names());
        for n in &all {
            assert!(reg.is_registered(n), "{n:?} of {count}");
        }
        for n in &names {
            let p = reg.get_provider(n).unwrap();
            assert_eq!(p.name(), n.as_str());
        }
        // Every name one edit away is found exactly when it is registered too.
        let mut probes = BTreeSet::from([String::new()]);
        for n in &all {
            for i in 0..n.len() {
                let mut changed = n.clone().into_bytes();
                changed[i] = if changed[i] == b'a' { b'b' } else { b'a' };
                probes.insert(String::from_utf8(changed).unwrap());
                probes.insert(format!("{}{}", &n[..i], &n[i + 1..]));
            }
            probes.insert(format!("{n}a"));
            probes.insert(format!("a{n}"));
        }
        for probe in &probes {
            assert_eq!(
                reg.is_registered(probe),
                all.contains(probe),
                "{probe:?} of {count}"
            );
        }
        let err = reg.get_provider("nope").err().unwrap();
        let listed: Vec<&str> = all.iter().map(String::as_str).collect();
        assert_eq!(
            err.message,
            format!(
                "no provider named \"nope\" is registered; available: {}",
                listed.join(", ")
            )
        );
    }
}
