#![no_main]
//! Fuzz target `gguf_tokenizer`: see `spiel::fuzzing::Target::GgufTokenizer`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // An error is the right answer to a bad file; only a panic, abort or runaway allocation fails.
    let _ = spiel::fuzzing::Target::GgufTokenizer.run(data);
});
