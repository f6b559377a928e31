//! Training: the config ([`config`]), instruction data and batches ([`data`]), the objective
//! ([`loss`]), SpIEL's budget, schedule, pruning and regrowth ([`select`]), the step loop over
//! every method ([`trainer`]), metrics ([`metrics`]), the run directory ([`run`]) and the memory
//! plan ([`plan`]). Uses [`crate::model`], [`crate::formats`] and [`crate::kernels`]; knows
//! nothing of tasks or the command line.
//!
//! Inside: [`config`], [`data`], [`select`] < [`loss`], [`metrics`] < [`trainer`] < [`run`],
//! [`plan`].

pub mod config;
pub mod data;
pub mod loss;
pub mod metrics;
pub mod plan;
pub mod run;
pub mod select;
pub mod trainer;
