//! mlbench: how much task data does an LLM need per language and per task?
//!
//! The crate follows the data's journey, one module per stage:
//! [`data`] (raw files -> canonical Parquet datasets -> few-shot pools) ->
//! [`tasks`] (prompt templates, label words, scoring, metrics) ->
//! [`train`] (a train plan -> PEFT adapters) and [`eval`] (an eval plan -> metrics), both on
//! [`model`] -> [`runner`] (a grid's cells -> the results store, comparisons) ->
//! [`report`] (tables, plots, pages). [`plan`] resolves flags, files and `--set` into the typed,
//! checked plans train, eval and the runner take (it reads data, tasks and model to do so);
//! [`precision`], [`error`] and [`util`] serve them all.

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
