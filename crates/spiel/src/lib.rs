//! spiel: sparse fine-tuning (SpIEL) of LLaMA-family language models on candle.
//!
//! The folders are layers, from the bottom; each uses only the ones below it (checked by
//! `tests/layers.rs`):
//!
//! - [`kernels`]: numerical ops and their references; no models, files or training.
//! - [`formats`]: GGUF, config.json, tokenizer, checkpoints, plots, assets, atomic writes.
//! - [`dist`]: the process group of data-parallel training (MPI under `mpirun`, else one rank).
//! - [`model`]: the transformer, its linears, adapters and their files, loading.
//! - [`train`]: config, data, selection, the step loop, metrics, run directories, memory plan.
//! - [`tasks`]: evaluation, generation, scoring, comparison, inspection, benchmarks.
//! - [`serve`]: the adapter registry and the continuous-batching engine of `spiel serve`.
//! - [`testkit`]: synthetic models and fuzzing entry points, for tests only.
//!
//! [`Error`] and [`Result`] belong to no layer and are used by all.

pub mod dist;
mod error;
pub mod formats;
pub mod kernels;
pub mod model;
pub mod serve;
pub mod tasks;
pub mod testkit;
pub mod train;

pub use error::{Error, Result};
