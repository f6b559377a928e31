//! One file per verb: each owns its clap arguments and its handler (`run`).

pub mod bench;
pub mod bench_serve;
pub mod compare;
pub mod eval;
pub mod export;
pub mod fetch;
pub mod generate;
pub mod inspect;
pub mod merge;
pub mod plan;
pub mod score;
pub mod serve;
pub mod train;
