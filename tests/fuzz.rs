#![cfg(all(feature = "testing", feature = "server", feature = "pipecat"))]
//! Every fuzz target for a modest number of inputs, so each run exercises
//! them: no crash, and the mutants reach both sides of every decoder. The
//! long runs are `cargo run --release --all-features --example fuzz`.

use std::path::Path;

use voice_backends::testing::fuzz::{self, Options, Outcome, Target};

const INPUTS: u64 = 20_000;

/// 20,000 inputs a target, seeds from `fuzz/corpus/` too.
fn options() -> Options {
    Options {
        inputs: INPUTS,
        seed: 0x5eed,
        artifacts: Some(std::env::temp_dir().join("voice-backends-fuzz-test")),
        corpus: Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus")),
        ..Options::default()
    }
}

fn target(name: &str) -> Target {
    *fuzz::targets()
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no target {name}"))
}

fn fuzz_one(name: &str) {
    let report = fuzz::run(&target(name), &options());
    let crashes: Vec<String> = report
        .crashes
        .iter()
        .map(|c| format!("{} ({:?}): {}", c.message, c.path, c.preview()))
        .collect();
    assert!(crashes.is_empty(), "{name} crashed: {crashes:#?}");
    assert_eq!(report.inputs, INPUTS);
    assert_eq!(report.accepted + report.rejected, INPUTS);
    assert!(
        report.mutants_accepted > 0 && report.mutants_rejected > 0,
        "{name}: mutants accepted {} / rejected {}: the mutator reaches only one side",
        report.mutants_accepted,
        report.mutants_rejected
    );
    assert!(
        report.corpus > (target(name).seeds)().len(),
        "{name} kept no mutant"
    );
}

#[test]
fn every_target_is_tested_here() {
    let names: Vec<&str> = fuzz::targets().iter().map(|t| t.name).collect();
    let mut expected = vec!["client_message", "pipecat_frame", "rtvi"];
    if cfg!(feature = "cartesia") {
        expected.push("cartesia_message");
    }
    if cfg!(feature = "livekit") {
        expected.extend(["livekit_signal", "livekit_agent_message"]);
    }
    if cfg!(feature = "vapi") {
        expected.push("vapi_message");
    }
    if cfg!(feature = "vocode") {
        expected.push("vocode_message");
    }
    expected.extend([
        "config_toml",
        "config_yaml",
        "config_json",
        "session_config_json",
    ]);
    assert_eq!(names, expected);
}

#[cfg(feature = "cartesia")]
#[test]
fn cartesia_message() {
    fuzz_one("cartesia_message");
}

#[cfg(feature = "livekit")]
#[test]
fn livekit_signal() {
    fuzz_one("livekit_signal");
}

#[cfg(feature = "livekit")]
#[test]
fn livekit_agent_message() {
    fuzz_one("livekit_agent_message");
}

#[cfg(feature = "vapi")]
#[test]
fn vapi_message() {
    fuzz_one("vapi_message");
}

#[cfg(feature = "vocode")]
#[test]
fn vocode_message() {
    fuzz_one("vocode_message");
}

#[test]
fn client_message() {
    fuzz_one("client_message");
}

#[test]
fn pipecat_frame() {
    fuzz_one("pipecat_frame");
}

#[test]
fn rtvi() {
    fuzz_one("rtvi");
}

#[test]
fn config_toml() {
    fuzz_one("config_toml");
}

#[test]
fn config_yaml() {
    fuzz_one("config_yaml");
}

#[test]
fn config_json() {
    fuzz_one("config_json");
}

#[test]
fn session_config_json() {
    fuzz_one("session_config_json");
}

#[test]
fn every_seed_is_run_first() {
    for target in fuzz::targets() {
        let seeds = (target.seeds)();
        let report = fuzz::run(
            &target,
            &Options {
                inputs: seeds.len() as u64,
                ..options()
            },
        );
        assert_eq!(report.mutants_accepted + report.mutants_rejected, 0);
        assert!(report.accepted > 0, "{}: no seed is accepted", target.name);
    }
}

/// A target that panics on some inputs: the crash is caught, reported with
/// its message, location and input, and written to a file; the run stops
/// there, or goes on with `keep_going`.
#[test]
fn a_panicking_target_is_reported() {
    fn picky(data: &[u8]) -> Outcome {
        if data.contains(&b'!') {
            panic!("picky saw a bang");
        }
        Outcome::Accepted("fine")
    }
    fn seeds() -> Vec<Vec<u8>> {
        vec![b"calm words".to_vec()]
    }
    let target = Target {
        name: "picky",
        run: picky,
        seeds,
        tokens: &["!"],
        nests: &[],
        binary: false,
    };
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        inputs: 100_000,
        artifacts: Some(dir.path().to_owned()),
        ..options()
    };
    let report = fuzz::run(&target, &options);
    assert_eq!(report.crashes.len(), 1, "{report:?}");
    assert!(report.inputs < 100_000, "the run stops at the crash");
    let crash = &report.crashes[0];
    assert!(
        crash.message.starts_with("picky saw a bang at "),
        "{}",
        crash.message
    );
    assert!(crash.message.contains("fuzz.rs"), "{}", crash.message);
    assert!(crash.input.contains(&b'!'));
    let path = crash.path.as_ref().expect("the input is written");
    assert_eq!(std::fs::read(path).unwrap(), crash.input);
    assert!(crash.preview().contains('!'));

    let report = fuzz::run(
        &target,
        &Options {
            keep_going: true,
            inputs: 5_000,
            ..options
        },
    );
    assert_eq!(report.inputs, 5_000);
    assert_eq!(report.crashes.len(), 1, "one distinct panic");
    assert!(report.crashed_inputs > 1);
    assert_eq!(
        report.accepted + report.crashed_inputs,
        5_000,
        "every input is accepted or crashes"
    );
}

/// Files under `<corpus>/<target>/` are extra seeds, run after the built-in ones.
#[test]
fn corpus_files_are_seeds() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("client_message");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(
        folder.join("a"),
        br#"{"type":"start","user_id":"z","sample_rate":0}"#,
    )
    .unwrap();
    let target = target("client_message");
    let seeds = (target.seeds)().len() as u64;
    let report = fuzz::run(
        &target,
        &Options {
            inputs: seeds + 1,
            corpus: Some(dir.path().to_owned()),
            ..options()
        },
    );
    assert_eq!(report.mutants_accepted + report.mutants_rejected, 0);
    let last = fuzz::run_one(
        &target,
        br#"{"type":"start","user_id":"z","sample_rate":0}"#,
    );
    assert!(matches!(last, Ok(Outcome::Rejected(r)) if r.contains("sample_rate 0")));
}
