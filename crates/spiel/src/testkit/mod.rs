//! Support for tests, fuzzing and benchmarks, never used by the library's own paths: synthetic
//! models written as real GGUF files ([`synth`]), random adapters ([`adapters`]) and the fuzz harness's entry points
//! ([`fuzzing`]). It sits on top of every other layer, and nothing imports it but tests, the
//! fuzz targets and `examples/`.

pub mod adapters;
pub mod fuzzing;
pub mod synth;
