//! Fuzzes the decoders a client or a service can reach, on the stable
//! toolchain (`voice_backends::testing::fuzz`).
//!
//! ```text
//! cargo run --release --all-features --example fuzz -- [TARGET|all] [--inputs N]
//!     [--seed S] [--max-len BYTES] [--keep-going] [--artifacts DIR]
//! cargo run --release --all-features --example fuzz -- TARGET --replay FILE...
//! ```
//!
//! Prints, per target, the inputs run, how many the decoder accepted and
//! refused, inputs per second and every crash (its message, the file the
//! input was written to and an escaped preview); exits with 1 after a crash.
//! Extra seeds are read from `fuzz/corpus/<target>/`.

use std::path::PathBuf;
use std::process::ExitCode;

use voice_backends::testing::fuzz::{self, Options, Target};

fn usage(targets: &[Target]) -> String {
    let names: Vec<&str> = targets.iter().map(|t| t.name).collect();
    format!(
        "usage: fuzz [TARGET|all] [--inputs N] [--seed S] [--max-len BYTES] [--keep-going] \
         [--artifacts DIR] | fuzz TARGET --replay FILE...\ntargets: {}",
        names.join(", ")
    )
}

fn main() -> ExitCode {
    let targets = fuzz::targets();
    let mut options = Options {
        corpus: Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus")),
        ..Options::default()
    };
    let mut chosen = "all".to_owned();
    let mut replay = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |what: &str| {
            args.next()
                .unwrap_or_else(|| fail(&format!("{what} needs a value")))
        };
        let number = |text: String| {
            text.replace('_', "")
                .parse::<u64>()
                .unwrap_or_else(|_| fail(&format!("not a number: {text}")))
        };
        match arg.as_str() {
            "--inputs" => options.inputs = number(value("--inputs")),
            "--seed" => options.seed = number(value("--seed")),
            "--max-len" => options.max_len = number(value("--max-len")).max(1) as usize,
            "--keep-going" => options.keep_going = true,
            "--artifacts" => options.artifacts = Some(value("--artifacts").into()),
            "--replay" => replay.extend(args.by_ref().map(PathBuf::from)),
            "-h" | "--help" => {
                println!("{}", usage(&targets));
                return ExitCode::SUCCESS;
            }
            name if !name.starts_with('-') => chosen = name.to_owned(),
            other => fail(&format!("unknown option {other}\n{}", usage(&targets))),
        }
    }
    let selected: Vec<&Target> = targets
        .iter()
        .filter(|t| chosen == "all" || t.name == chosen)
        .collect();
    if selected.is_empty() {
        fail(&format!("no target {chosen}\n{}", usage(&targets)));
    }

    if !replay.is_empty() {
        let mut crashed = false;
        for target in &selected {
            for path in &replay {
                let input = std::fs::read(path)
                    .unwrap_or_else(|e| fail(&format!("{}: {e}", path.display())));
                let began = std::time::Instant::now();
                let result = fuzz::run_one(target, &input);
                crashed |= result.is_err();
                let took = began.elapsed();
                println!(
                    "{} {}: {result:?} in {took:.2?}",
                    target.name,
                    path.display()
                );
            }
        }
        return if crashed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        };
    }

    let mut crashed = false;
    for target in selected {
        let report = fuzz::run(target, &options);
        println!(
            "{}: {} inputs, {} accepted, {} rejected ({} / {} of them mutants), \
             {:.0} inputs/s over {:.1?}, corpus {}, slowest {:.2?}, {} crashes",
            report.target,
            report.inputs,
            report.accepted,
            report.rejected,
            report.mutants_accepted,
            report.mutants_rejected,
            report.rate(),
            report.elapsed,
            report.corpus,
            report.slowest,
            report.crashed_inputs,
        );
        for (what, findings) in [("CRASH", &report.crashes), ("SLOW", &report.slow)] {
            for f in findings {
                let path = f.path.as_ref().map(|p| p.display().to_string());
                println!("  {what}: {}", f.message);
                println!("    input: {}", path.as_deref().unwrap_or("(not written)"));
                println!("    preview: {}", f.preview());
            }
        }
        crashed |= !report.crashes.is_empty();
    }
    if crashed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn fail(message: &str) -> ! {
    eprintln!("{message}");
    std::process::exit(2)
}
