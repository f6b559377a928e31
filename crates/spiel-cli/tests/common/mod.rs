//! Helpers shared by the binary's test files.

use std::path::{Path, PathBuf};

/// The asset folder the tests use ($SPIEL_HOME, else the workspace's `assets/`).
pub fn home() -> PathBuf {
    std::env::var_os("SPIEL_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../assets"))
}

/// Write a tiny random LLaMA (byte-level tokenizer) as a GGUF file in `dir`.
pub fn tiny_model(dir: &Path) -> PathBuf {
    let p = dir.join("tiny.gguf");
    let cfg = spiel::formats::config::ModelConfig {
        vocab_size: spiel::testkit::synth::BYTE_LEVEL_VOCAB,
        ..spiel::model::random::tiny_config()
    };
    let w = spiel::model::random::random_weights(&cfg, 3, &candle_core::Device::Cpu).unwrap();
    spiel::testkit::synth::write_gguf(&p, &cfg, &w, spiel::kernels::quant::Format::F32).unwrap();
    p
}
