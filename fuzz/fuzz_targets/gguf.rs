#![no_main]
//! Fuzz target `gguf`: see `spiel::testkit::fuzzing::Target::Gguf`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // An error is the right answer to a bad file; only a panic, abort or runaway allocation fails.
    let _ = spiel::testkit::fuzzing::Target::Gguf.run(data);
});
