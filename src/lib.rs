//! mlbench: how much task data does an LLM need per language and per task?
//!
//! The crate follows the data's journey, one module per stage:
//! [`data`] (raw files -> canonical Parquet datasets -> few-shot pools) ->
//! [`tasks`] (prompt templates, label words, scoring, metrics) -> later stages
//! (model, train, eval, results, report) as their issues land.

pub mod data;
pub mod error;
pub mod eval;
pub mod model;
pub mod plan;
pub mod precision;
pub mod report;
pub mod runner;
pub mod tasks;
pub mod train;
pub mod util;

pub use error::{Error, Result};
