//! Resolution, the layer between the command line and the work: raw inputs (a struct's
//! defaults, TOML files and sections, command-line flags, `--set` pairs, experiment files) in;
//! typed, checked plans out, which training, evaluation and the runner accept (they never read
//! a flag or a key by name). It reads the data catalogue ([`crate::data`]), task specs
//! ([`crate::tasks`]) and the LoRA defaults and model identity ([`crate::model`]) to resolve;
//! [`crate::train`], [`crate::eval`] and [`crate::runner`] depend on it, never the reverse.
//!
//! - [`method`]: the [`Method`] enum, the only place a method name is parsed;
//! - [`device`]: [`DeviceSpec`] and [`Precision`], parsed once;
//! - [`layers`]: raw inputs merged with their sources; unknown keys and wrong types reported at
//!   once, naming file and key;
//! - [`train`]: [`TrainConfig`] (the training keys and their defaults) and [`TrainPlan`];
//! - [`eval`]: [`EvalConfig`] (the evaluation keys and their defaults) and [`EvalPlan`];
//! - [`grid`]: experiment files resolved into a [`grid::GridPlan`] of cells (method x K x
//!   seed, selection candidates included), each with its typed configurations and content
//!   key; sharding.

pub mod device;
pub mod eval;
pub mod grid;
pub mod layers;
pub mod method;
pub mod train;

pub use device::{DeviceSpec, Precision};
pub use eval::{BatchSize, EvalConfig, EvalPlan};
pub use layers::{Layers, Source};
pub use method::{Method, METHODS};
pub use train::{TrainConfig, TrainPlan};
