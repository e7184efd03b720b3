//! Stage 3 of the data's journey: training. A [`crate::plan::TrainPlan`] (the checked
//! configuration and its opened tasks) in; PEFT adapters, a step log and a run manifest out.
//!
//! - [`data`]: task units (pools rendered and tokenised);
//! - [`step`]: the masked answer-token loss and its gradient, accumulated over micro-batches;
//! - [`optim`]: AdamW, SGD, clipping and the learning-rate schedule;
//! - [`loops`]: the LoRA, MeTA-LoRA and adaptation loops;
//! - [`checkpoint`]: atomic checkpoints for bit-exact resumption;
//! - [`run`]: a run end to end (outputs, log, manifest).

pub mod checkpoint;
pub mod data;
pub mod loops;
pub mod optim;
pub mod run;
pub mod step;
