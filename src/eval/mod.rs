//! Stage 4 of the data's journey: evaluation. A [`crate::plan::EvalPlan`] (model, adapters and
//! opened tasks) in; per-example
//! records, metrics with intervals and a results file out.
//!
//! - [`batch`]: the batch size `--batch-size auto` stands for (tried on CUDA, estimated
//!   from the available memory elsewhere);
//! - [`choices`]: multiple-choice log-likelihoods with the context computed once per example;
//! - [`metrics`]: acc, acc_norm, acc_bytes, exact_match, standard errors, Wilson and bootstrap
//!   intervals, micro and macro averages;
//! - [`eee`]: an evaluation folder in the Every Eval Ever schema (aggregate and instances; a
//!   results store's cells are exported by [`crate::runner::eee_store`] with its pieces);
//! - [`resume`]: a stoppable evaluation's finished (variant, task, language) groups, kept
//!   under a fingerprint of what decides them and read back by the next run;
//! - [`lmeval`]: the same results in lm-evaluation-harness's shapes (results file, sample logs);
//! - [`run`]: prompts (zero- and n-shot), variants (base, adapters, per-task adapter sets),
//!   scoring of every variant on one loaded base, and the output files.

pub mod batch;
pub mod choices;
pub mod eee;
pub mod lmeval;
pub mod metrics;
pub mod resume;
pub mod run;
