//! Serving many adapters over one base: the adapter [`registry`] (by name, loaded on first use,
//! kept under a byte budget) and the continuous-batching [`engine`] that decodes requests for
//! different adapters in one batch. Uses [`crate::model`] and [`crate::tasks`] (sampling); the
//! HTTP API over it lives in the command line's `serve` verb.
//!
//! Inside: [`registry`] and [`engine`] do not use each other; the server hands the engine the
//! adapters the registry gave it.

pub mod engine;
pub mod registry;
