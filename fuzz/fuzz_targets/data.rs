#![no_main]
//! Fuzz target `data`: see `spiel::testkit::fuzzing::Target::Data`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // An error is the right answer to a bad file; only a panic, abort or runaway allocation fails.
    let _ = spiel::testkit::fuzzing::Target::Data.run(data);
});
