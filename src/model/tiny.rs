//! Tiny random models of the real architectures, built by mlbench itself so tests need no
//! download: 2 layers, hidden 64, 4 query heads over 2 KV heads, a few hundred tokens.
//!
//! In: an architecture and a seed. Out: an HF folder (`config.json`, `model.safetensors`,
//! `tokenizer.json`) that mlbench and transformers both load. Weights are drawn with mlbench's
//! own RNG, so the same seed gives byte-identical files.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde_json::Value;

use super::config::{Arch, ModelConfig};
use super::load::{expected_shapes, save_hf_folder};
use super::tokenizer::{byte_alphabet, byte_level_bpe_json, sentencepiece_bpe_json};
use crate::error::Result;
use crate::util::Rng;

/// Extra pieces of the tiny tokenizers (common English fragments), so text is not all bytes.
const PIECES: &[&str] = &[
    "th", "he", "the", "in", "er", "an", "on", "re", "at", "en", "is", "it", "or", "es", "ou",
    "to", "of", "and", "ing", "ion",
];

/// The tiny configuration of `arch`.
pub fn tiny_config(arch: Arch) -> ModelConfig {
    let json = match arch {
        Arch::Gemma3 => serde_json::json!({
            "model_type": "gemma3_text", "vocab_size": 384, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "rms_norm_eps": 1e-6, "rope_theta": 1e6, "rope_local_base_freq": 1e4, "sliding_window": 4,
            "layer_types": ["sliding_attention", "full_attention"], "query_pre_attn_scalar": 16,
            "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": true,
            "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0
        }),
        Arch::Llama | Arch::Qwen2 => serde_json::json!({
            "model_type": if arch == Arch::Llama { "llama" } else { "qwen2" },
            "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "rms_norm_eps": 1e-5, "rope_theta": 1e5, "hidden_act": "silu", "tie_word_embeddings": true,
            "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0
        }),
    };
    ModelConfig::from_json(&json.to_string(), Path::new("<tiny>")).expect("tiny configs are valid")
}

/// The tiny tokenizer of `arch` as `tokenizer.json` content.
pub fn tiny_tokenizer(arch: Arch) -> Value {
    match arch {
        Arch::Gemma3 => {
            let specials = [(0u32, "<pad>"), (1, "<eos>"), (2, "<bos>"), (3, "<unk>")];
            let mut pieces: Vec<(String, f32)> =
                specials.iter().map(|(_, s)| (s.to_string(), 0.0)).collect();
            for b in 0..=255u8 {
                pieces.push((format!("<0x{b:02X}>"), 0.0));
            }
            let mut singles: Vec<String> = vec!["▁".into()];
            singles.extend(
                ('a'..='z')
                    .chain('A'..='Z')
                    .chain('0'..='9')
                    .map(|c| c.to_string()),
            );
            singles.extend([".", ",", "?", "!", ":", "'"].iter().map(|s| s.to_string()));
            let mut words: Vec<String> = PIECES.iter().map(|s| s.to_string()).collect();
            words.extend(PIECES.iter().map(|s| format!("▁{s}")));
            words.extend(
                ["▁a", "▁b", "▁c", "▁s", "▁t", "▁w"]
                    .iter()
                    .map(|s| s.to_string()),
            );
            let n0 = pieces.len();
            for (i, p) in singles.into_iter().chain(words).enumerate() {
                pieces.push((p, -((n0 + i) as f32)));
            }
            sentencepiece_bpe_json(&pieces, &specials, "<unk>")
        }
        Arch::Llama | Arch::Qwen2 => {
            let alpha = byte_alphabet();
            let sp = alpha[b' ' as usize];
            let mut tokens: Vec<String> = vec!["<|endoftext|>".into()];
            // Byte-level alphabet in byte order.
            tokens.extend(alpha.iter().map(|c| c.to_string()));
            let mut merges: Vec<(String, String)> = Vec::new();
            let mut add = |l: String, r: String, tokens: &mut Vec<String>| {
                let m = format!("{l}{r}");
                if !tokens.contains(&m) {
                    tokens.push(m);
                }
                merges.push((l, r));
            };
            for w in PIECES {
                let cs: Vec<String> = w.chars().map(|c| c.to_string()).collect();
                let mut acc = cs[0].clone();
                for c in &cs[1..] {
                    add(acc.clone(), c.clone(), &mut tokens);
                    acc.push_str(c);
                }
                add(sp.to_string(), w.to_string(), &mut tokens);
            }
            byte_level_bpe_json(&tokens, &merges, &[(0, "<|endoftext|>")])
        }
    }
}

fn uniform(rng: &mut Rng, shape: &[usize], lo: f64, hi: f64) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| (lo + (hi - lo) * rng.next_f64()) as f32)
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// Random weights under HF names, one per entry of [`expected_shapes`], in that order:
/// embeddings U(-1, 1); linear weights U(-1/sqrt(in), 1/sqrt(in)); biases U(-0.1, 0.1); norm
/// weights U(-0.2, 0.2) for Gemma (used as `1 + w`) and U(0.8, 1.2) otherwise.
pub fn tiny_tensors(c: &ModelConfig, seed: u64) -> Result<BTreeMap<String, Tensor>> {
    let mut rng = Rng::new(seed);
    let gemma = c.arch == Arch::Gemma3;
    let mut t = BTreeMap::new();
    for (name, shape) in expected_shapes(c) {
        let (lo, hi) = if name == "model.embed_tokens.weight" || name == "lm_head.weight" {
            (-1.0, 1.0)
        } else if name.ends_with("norm.weight") || name.ends_with("layernorm.weight") {
            if gemma {
                (-0.2, 0.2)
            } else {
                (0.8, 1.2)
            }
        } else if name.ends_with(".bias") {
            (-0.1, 0.1)
        } else {
            let b = 1.0 / (shape[1] as f64).sqrt();
            (-b, b)
        };
        t.insert(name, uniform(&mut rng, &shape, lo, hi)?);
    }
    Ok(t)
}

/// Writes a tiny model folder for `arch`.
pub fn write_tiny(arch: Arch, dir: &Path, seed: u64) -> Result<()> {
    let c = tiny_config(arch);
    let tensors = tiny_tensors(&c, seed)?;
    save_hf_folder(dir, &c, &tensors, Some(&tiny_tokenizer(arch)))
}

/// Writes a model with the configuration of the HF folder `like` (its `config.json` and
/// tokenizer files are copied) and random weights drawn as for the tiny models: the real shape
/// and speed without the real weights (for speed checks where the weights cannot travel).
pub fn write_random_like(like: &Path, dir: &Path, seed: u64) -> Result<()> {
    let cp = like.join("config.json");
    let text = std::fs::read_to_string(&cp)
        .map_err(|e| crate::error::Error::missing_or_io("config.json", "read", &cp, e))?;
    let c = ModelConfig::from_json(&text, &cp)?;
    let tensors = tiny_tensors(&c, seed)?;
    save_hf_folder(dir, &c, &tensors, None)?;
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        let src = like.join(f);
        if src.exists() {
            let bytes =
                std::fs::read(&src).map_err(|e| crate::error::Error::io("read", &src, e))?;
            crate::util::write_bytes_atomic(&dir.join(f), &bytes)?;
        }
    }
    Ok(())
}
