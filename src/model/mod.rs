//! The language model that training (stage 3, [`crate::train`]) and evaluation (stage 4,
//! [`crate::eval`]) run; it is not a stage of the data's journey itself. A model folder (or a
//! Hub id) in; a [`LoadedModel`] out, whose decoder gives hidden states, logits, losses and
//! scores, with or without a LoRA adapter.
//!
//! - [`autograd`]: hand-written backward passes re-attached to fused or graph-free values;
//! - [`config`]: `config.json` -> validated [`config::ModelConfig`] (gemma3, llama, qwen2);
//! - [`load`](mod@load): HF folder (safetensors, sharded or not) -> [`transformer::Model`];
//! - `blocks`: the decoder's building blocks (linear layers with their LoRA hook, RMSNorm, a
//!   layer's weights, the forward-pass context), re-exported by [`transformer`];
//! - [`transformer`]: the decoder; hidden states out, logits only at requested rows;
//! - `layer_train`: a decoder layer as one graph node for LoRA training on the CPU in f32;
//! - [`loss`]: token cross-entropy with a fused backward pass;
//! - [`lora`]: PEFT-compatible LoRA adapters (init, save, strict load, merge);
//! - [`tokenizer`]: `tokenizer.json`, lm-evaluation-harness pair encoding, tokenizer builders;
//! - [`gguf`]: GGUF (llama.cpp) -> HF folder, with a tokenizer built from its vocabulary;
//! - [`hub`]: Hugging Face Hub ids -> local snapshot folders (HF_HOME, HF_HUB_OFFLINE, HF_TOKEN);
//! - [`kernels`]: fused CPU kernels, one file per concern (gated activation and `exp`, RMSNorm
//!   backward, softmax rows and cross-entropy, frozen-weight products and the precision
//!   switch, attention for inference and training);
//! - [`amx`]: opt-in bf16 products of frozen weights on Intel AMX tiles;
//! - `cpu`: what the kernels and `amx` share (f32 slices of tensors, a shared output pointer,
//!   CPU feature checks);
//! - [`tiny`]: tiny random models of each architecture for tests;
//! - [`score`]: log-likelihood requests and greedy generation.
//!
//! Imports run one way: `transformer` -> `layer_train` -> `blocks`, `transformer` -> `blocks`,
//! and `kernels` -> `amx` -> `cpu` (the kernels also use `cpu` directly). The precision of
//! frozen products is stored in [`crate::precision`], below the whole model.

pub mod amx;
pub mod autograd;
mod blocks;
pub mod config;
mod cpu;
pub mod gguf;
pub mod hub;
pub mod kernels;
mod layer_train;
pub mod load;
pub mod lora;
pub mod loss;
pub mod score;
pub mod tiny;
pub mod tokenizer;
pub mod transformer;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use crate::error::{Error, Result};
use config::Arch;
use tokenizer::Tok;
use transformer::Model;

/// A model with its tokenizer and where it came from.
pub struct LoadedModel {
    pub model: Model,
    pub tok: Tok,
    pub dir: PathBuf,
}

/// Loads a model from a local HF folder (or a Hub id, see [`resolve`]).
pub fn load(source: &str, dtype: DType, device: &Device) -> Result<LoadedModel> {
    let dir = resolve(source)?;
    load_dir(&dir, dtype, device)
}

/// Loads a local HF folder.
pub fn load_dir(dir: &Path, dtype: DType, device: &Device) -> Result<LoadedModel> {
    let model = load::load_model(dir, dtype, device)?;
    let c = &model.config;
    let tok = Tok::load(
        &dir.join("tokenizer.json"),
        c.vocab_size,
        c.bos_token_id,
        c.eos_token_id,
        c.arch == Arch::Gemma3,
    )?;
    Ok(LoadedModel {
        model,
        tok,
        dir: dir.to_path_buf(),
    })
}

/// Turns a model argument into a local folder: an existing folder is used as is; an
/// `owner/name[@revision]` Hub id is fetched (or found in the cache) through [`hub`].
pub fn resolve(source: &str) -> Result<PathBuf> {
    let p = PathBuf::from(source);
    if p.is_dir() {
        return Ok(p);
    }
    if hub::is_hub_id(source) {
        return hub::fetch(source);
    }
    if p.extension().is_some_and(|e| e == "gguf") {
        return Err(Error::Invalid(format!(
            "{source} is a GGUF file: convert it first with `mlbench model import --gguf {source} --out DIR`"
        )));
    }
    Err(Error::MissingFile {
        what: "model folder",
        path: p,
    })
}
