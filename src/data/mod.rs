//! Stage 1 of the data's journey: raw published files -> canonical Parquet datasets ->
//! few-shot pools.
//!
//! - [`import`]: converters from the raw files, the manifest and its verification;
//! - [`schema`]: the canonical schema, Parquet I/O and validation;
//! - [`catalogue`]: a task's dataset file, languages, splits and rows (every stage opens data
//!   here);
//! - [`lang`]: language-code normalisation and resolution of user codes;
//! - [`describe`]: counts per task x language x split x label;
//! - [`sample`]: the seeded, stratified, nested sampler and the support/query split.

pub mod catalogue;
pub mod describe;
pub mod import;
pub mod lang;
pub mod sample;
pub mod schema;
