//! Stage 5 of the data's journey: experiments. A grid's cells (resolved by
//! [`crate::plan::grid`] from an experiment file) in; trained and evaluated
//! cells in a resumable, shardable Parquet results store out; comparison tables from the store.
//!
//! - [`eee_store`]: a store's finished cells in the Every Eval Ever schema;
//! - [`store`]: the results store (one folder per finished cell, committed by a rename);
//! - [`lock`]: claims on a store's cells and on its compaction (one worker per cell);
//! - [`grid`]: running one cell (train, evaluate, commit);
//! - [`select`]: choosing each searched method's settings on the dev split;
//! - [`candidates`]: every candidate of a selection with its dev diagnostics, for the report;
//! - [`compare`]: tables over the store (mean over seeds with intervals, paired tests);
//! - [`stats`]: seed-aware intervals, paired bootstrap differences, non-inferiority verdicts;
//! - [`verdict`]: the verdict table of a study against its declared reference and margin;
//! - [`study`]: the budget table, label-distribution diagnostics and the setup block;
//! - [`dynamics`]: one line per cell of those diagnostics (collapse, loss, update norms).

pub mod candidates;
pub mod compare;
pub mod dynamics;
pub mod eee_store;
pub mod grid;
pub mod lock;
pub mod select;
pub mod stats;
pub mod store;
pub mod study;
pub mod verdict;
