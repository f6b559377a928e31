//! Replays the fuzz corpora that matter in CI: every input under `fuzz/regressions/<target>/`
//! (crashes the fuzzer found, and hand-made hostile files) must be refused with an error, not a
//! panic; every valid seed the fuzzers start from must be accepted, so the harness is known to
//! reach the parsers' happy paths too.

mod common;

use std::path::PathBuf;

use spiel::testkit::fuzzing::{self, Target};

fn regressions(target: Target) -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/regressions")
        .join(target.name());
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    files.sort();
    files
}

#[test]
fn regression_inputs_are_refused_without_panicking() {
    let mut seen = 0;
    for target in Target::ALL {
        for file in regressions(target) {
            let bytes = std::fs::read(&file).unwrap();
            let got = std::panic::catch_unwind(|| target.run(&bytes));
            match got {
                Ok(Err(e)) => {
                    let msg = e.to_string();
                    // The table in docs/robustness.md is this output (`-- --nocapture`).
                    eprintln!(
                        "| {} | `{}` | {msg} |",
                        target.name(),
                        file.file_name().unwrap().to_string_lossy()
                    );
                    assert!(!msg.is_empty() && !msg.contains('\n'), "{}: {msg:?}", file.display());
                }
                Ok(Ok(())) => panic!("{}: hostile input was accepted", file.display()),
                Err(_) => panic!("{}: panicked", file.display()),
            }
            seen += 1;
        }
    }
    assert!(seen >= 40, "only {seen} regression inputs found");
}

#[test]
fn valid_seeds_are_accepted() {
    // With the assets present the seeds include the real config and data; the truncated real
    // GGUF header is the one seed that must be refused.
    let home = common::home();
    for target in Target::ALL {
        let seeds = fuzzing::seeds(target, &home).unwrap();
        assert!(!seeds.is_empty(), "{target:?}");
        for (name, bytes) in seeds {
            let r = target.run(&bytes);
            if name.contains("header-64k") {
                assert!(r.is_err(), "{target:?} {name}: a truncated file was accepted");
            } else {
                r.unwrap_or_else(|e| panic!("{target:?} {name}: {e}"));
            }
        }
    }
}
