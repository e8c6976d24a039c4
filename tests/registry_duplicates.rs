//! Two link-time registrations of one name are reported, never resolved
//! silently to one of them. This binary links exactly that conflict.

mod common;

use common::{DoubleProvider, valid_config};
use voice_backends::{BackendRegistry, ErrorCode, register_provider};

mod first {
    pub fn provider() -> super::DoubleProvider {
        super::DoubleProvider::plain("twin", "first")
    }
    voice_backends::register_provider!("twin", provider);
}

mod second {
    pub fn provider() -> super::DoubleProvider {
        super::DoubleProvider::plain("twin", "second")
    }
    voice_backends::register_provider!("twin", provider);
}

fn single() -> DoubleProvider {
    DoubleProvider::plain("single", "single")
}
register_provider!("single", single);

#[tokio::test]
async fn a_duplicated_static_name_is_reported_not_picked() {
    let reg = BackendRegistry::new();
    let mut expected = vec!["local", "single", "twin"];
    for (name, enabled) in [
        ("cartesia", cfg!(feature = "cartesia")),
        ("livekit", cfg!(feature = "livekit")),
        ("pipecat", cfg!(feature = "pipecat")),
        ("vapi", cfg!(feature = "vapi")),
        ("vocode", cfg!(feature = "vocode")),
    ] {
        if enabled {
            expected.push(name);
        }
    }
    expected.sort_unstable();
    assert_eq!(reg.list_providers(), expected, "listed once");
    assert!(reg.is_registered("twin"));

    let dups = reg.duplicates();
    assert_eq!(dups.len(), 1);
    assert_eq!(dups[0].name, "twin");
    let mut modules = dups[0].modules.clone();
    modules.sort();
    assert_eq!(
        modules,
        vec!["registry_duplicates::first", "registry_duplicates::second"]
    );

    for err in [
        reg.create("twin", &valid_config("twin"))
            .await
            .err()
            .unwrap(),
        reg.get_provider("twin").err().unwrap(),
    ] {
        assert_eq!(err.code, ErrorCode::InvalidConfig);
        assert!(err.message.contains("registry_duplicates::first"), "{err}");
        assert!(err.message.contains("registry_duplicates::second"), "{err}");
        assert!(err.message.contains("registered 2 times"), "{err}");
    }

    // The other static entry is unaffected.
    let b = reg.create("single", &valid_config("single")).await.unwrap();
    assert_eq!(b.provider(), "single");
}

#[tokio::test]
async fn an_overlay_entry_resolves_the_conflict_and_removing_it_restores_the_report() {
    let reg = BackendRegistry::new();
    assert!(
        reg.register("twin", DoubleProvider::new("twin", "chosen"))
            .is_none(),
        "a conflicted name has no single visible value to return"
    );
    let b = reg.create("twin", &valid_config("twin")).await.unwrap();
    assert_eq!(b.provider(), "chosen");
    reg.deregister("twin");
    assert_eq!(
        reg.get_provider("twin").err().unwrap().code,
        ErrorCode::InvalidConfig
    );
}
