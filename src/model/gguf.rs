//! `mlbench model import --gguf FILE --out DIR`: a GGUF file (llama.cpp) to an HF folder.
//!
//! In: a GGUF v2/v3 file of architecture `gemma3`, `llama` or `qwen2` (quantized or not).
//! Out: `config.json`, `model.safetensors` (dequantized to f32 or bf16) and `tokenizer.json`
//! built from the GGUF vocabulary, written atomically. candle's reader checks every length and
//! offset against the file size; mlbench then checks every tensor's shape against the config.
//!
//! Conversions: tensor names llama.cpp -> HF; Gemma norm weights lose the `+1` llama.cpp folds
//! in; Llama q/k rows are un-permuted from llama.cpp's interleaved rope layout back to HF's
//! half-split layout (`w.reshape(h, hd/2, 2, in).swapaxes(1, 2)`).

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use serde_json::json;

use super::config::{Arch, ModelConfig};
use super::load::save_safetensors_typed;
use super::tokenizer::{byte_level_bpe_json, sentencepiece_bpe_json};
use crate::error::{Error, Result};
use crate::util::write_bytes_atomic;

/// Maps a llama.cpp tensor name to the HF name.
pub fn hf_name(gguf: &str) -> Option<String> {
    let simple = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(s) = simple {
        return Some(s.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, name) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (base, suffix) = name.rsplit_once('.')?;
    let hf = match base {
        "attn_norm" => "input_layernorm",
        "post_attention_norm" => "post_attention_layernorm",
        "ffn_norm" => "FFN_NORM",
        "post_ffw_norm" => "post_feedforward_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

fn gguf_err(gguf: &Path, e: impl std::fmt::Display) -> Error {
    Error::Config {
        path: gguf.to_path_buf(),
        message: e.to_string(),
    }
}

fn meta<'a>(c: &'a Content, key: &str, path: &Path) -> Result<&'a Value> {
    c.metadata.get(key).ok_or_else(|| Error::Config {
        path: path.to_path_buf(),
        message: format!("missing metadata key `{key}`"),
    })
}

fn meta_usize(c: &Content, key: &str, path: &Path) -> Result<usize> {
    let v = meta(c, key, path)?;
    let n = v
        .to_u64()
        .or_else(|_| v.to_u32().map(u64::from))
        .or_else(|_| v.to_i32().map(|x| x.max(0) as u64));
    n.map(|x| x as usize).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        message: format!("metadata `{key}`: {e}"),
    })
}

fn meta_f64(c: &Content, key: &str) -> Option<f64> {
    c.metadata
        .get(key)
        .and_then(|v| v.to_f32().map(f64::from).or_else(|_| v.to_f64()).ok())
}

/// A float that changes the math: absent or not a number is an error naming the file and key.
fn need_f64(c: &Content, key: &str, path: &Path) -> Result<f64> {
    meta_f64(c, key).ok_or_else(|| Error::Config {
        path: path.to_path_buf(),
        message: format!(
            "metadata `{key}` is missing or not a number (mlbench does not guess a value that changes the model's outputs)"
        ),
    })
}

fn meta_u32(c: &Content, key: &str) -> Option<u32> {
    c.metadata.get(key).and_then(|v| {
        v.to_u32()
            .ok()
            .or_else(|| v.to_u64().ok().map(|x| x as u32))
            .or_else(|| v.to_i32().ok().map(|x| x as u32))
    })
}

/// Imports `gguf` into the HF folder `out`, with weights stored as `dtype` (f32 or bf16).
pub fn import(
    gguf: &Path,
    out: &Path,
    dtype: DType,
    pb: &indicatif::ProgressBar,
) -> Result<ModelConfig> {
    if !matches!(dtype, DType::F32 | DType::BF16) {
        return Err(Error::Invalid("model import writes f32 or bf16".into()));
    }
    let mut file = std::fs::File::open(gguf)
        .map_err(|e| Error::missing_or_io("GGUF file", "open", gguf, e))?;
    let content = Content::read(&mut file).map_err(|e| Error::Config {
        path: gguf.to_path_buf(),
        message: format!("not a valid GGUF file: {e}"),
    })?;
    let (arch, a) = architecture(&content, gguf)?;
    let tokens = vocabulary(&content, gguf)?;
    let config = model_config(&content, arch, &a, tokens.len(), gguf)?;
    let tensors = read_tensors(&mut file, &content, &config, gguf, pb)?;
    check_shapes(&config, &tensors, gguf)?;
    let tok_json = tokenizer_json(&content, &tokens, gguf)?;
    write_folder(out, gguf, &config, &tensors, &tok_json, dtype)?;
    Ok(config)
}

/// The file's architecture and its llama.cpp name (the prefix of its metadata keys).
fn architecture(content: &Content, gguf: &Path) -> Result<(Arch, String)> {
    let arch_name = meta(content, "general.architecture", gguf)?
        .to_string()
        .map_err(|e| gguf_err(gguf, e))?
        .clone();
    let arch = match arch_name.as_str() {
        "gemma3" => Arch::Gemma3,
        "llama" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        other => {
            return Err(Error::Unknown {
                kind: "GGUF architecture",
                code: other.to_string(),
                scope: format!(" in {} (supported: gemma3, llama, qwen2)", gguf.display()),
                suggestions: vec![],
            })
        }
    };
    Ok((arch, arch_name))
}

/// The tokens of the file's vocabulary, by id.
fn vocabulary(content: &Content, gguf: &Path) -> Result<Vec<String>> {
    Ok(meta(content, "tokenizer.ggml.tokens", gguf)?
        .to_vec()
        .map_err(|e| gguf_err(gguf, e))?
        .iter()
        .map(|v| v.to_string().cloned().unwrap_or_default())
        .collect())
}

/// The model configuration from the metadata of architecture `a` (checked as a
/// `config.json` would be), for a vocabulary of `vocab` tokens.
fn model_config(
    content: &Content,
    arch: Arch,
    a: &str,
    vocab: usize,
    gguf: &Path,
) -> Result<ModelConfig> {
    let hidden = meta_usize(content, &format!("{a}.embedding_length"), gguf)?;
    let heads = meta_usize(content, &format!("{a}.attention.head_count"), gguf)?;
    let kv = meta_usize(content, &format!("{a}.attention.head_count_kv"), gguf).unwrap_or(heads);
    let head_dim = meta_usize(content, &format!("{a}.attention.key_length"), gguf)
        .unwrap_or(hidden / heads.max(1));
    let layers = meta_usize(content, &format!("{a}.block_count"), gguf)?;
    refuse_rope_scaling(content, a, gguf)?;
    let mut cfg = json!({
        "model_type": match arch { Arch::Gemma3 => "gemma3_text", Arch::Llama => "llama", Arch::Qwen2 => "qwen2" },
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": meta_usize(content, &format!("{a}.feed_forward_length"), gguf)?,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": head_dim,
        "rms_norm_eps": need_f64(content, &format!("{a}.attention.layer_norm_rms_epsilon"), gguf)?,
        "rope_theta": need_f64(content, &format!("{a}.rope.freq_base"), gguf)?,
        "tie_word_embeddings": !content.tensor_infos.contains_key("output.weight"),
        "bos_token_id": meta_u32(content, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta_u32(content, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta_u32(content, "tokenizer.ggml.padding_token_id"),
    });
    if arch == Arch::Gemma3 {
        // llama.cpp's gemma3: local layers use base 1e4 and 5 of every 6 layers are local;
        // queries are scaled by 1/sqrt(head_dim).
        cfg["rope_local_base_freq"] = json!(10000.0);
        cfg["sliding_window"] =
            json!(meta_usize(content, "gemma3.attention.sliding_window", gguf).unwrap_or(512));
        cfg["sliding_window_pattern"] = json!(6);
        cfg["query_pre_attn_scalar"] = json!(head_dim);
        cfg["hidden_activation"] = json!("gelu_pytorch_tanh");
    }
    ModelConfig::from_json(&cfg.to_string(), gguf)
}

/// Refuses rope scaling in the metadata of architecture `a` (`none` or a factor of 1 pass).
fn refuse_rope_scaling(content: &Content, a: &str, gguf: &Path) -> Result<()> {
    for key in [
        format!("{a}.rope.scaling.type"),
        format!("{a}.rope.scaling.factor"),
    ] {
        if let Some(v) = content.metadata.get(&key) {
            let shown = v
                .to_string()
                .cloned()
                .or_else(|_| v.to_f32().map(|f| f.to_string()))
                .unwrap_or_else(|_| "?".into());
            if !(shown == "none" || shown == "1") {
                return Err(Error::Config {
                    path: gguf.to_path_buf(),
                    message: format!("metadata `{key}` = {shown}: rope scaling is not implemented"),
                });
            }
        }
    }
    Ok(())
}

/// Every tensor of the file under its HF name, dequantized to f32 and in HF's conventions;
/// tensors mlbench does not know are skipped with a warning.
fn read_tensors(
    file: &mut std::fs::File,
    content: &Content,
    config: &ModelConfig,
    gguf: &Path,
    pb: &indicatif::ProgressBar,
) -> Result<BTreeMap<String, Tensor>> {
    let gemma = config.arch == Arch::Gemma3;
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    pb.set_length(names.len() as u64);
    let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
    for gname in names {
        let Some(name) = tensor_name(gname, gemma, gguf)? else {
            tracing::warn!(tensor = %gname, "skipping an unknown GGUF tensor");
            pb.inc(1);
            continue;
        };
        let q = content.tensor_infos[gname]
            .read(file, content.tensor_data_offset, &Device::Cpu)
            .map_err(|e| Error::Config {
                path: gguf.to_path_buf(),
                message: format!("tensor `{gname}`: {e}"),
            })?;
        let t = q.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?;
        let t = to_hf_layout(t, &name, gname, config, gguf)?;
        tensors.insert(name, t);
        pb.inc(1);
    }
    Ok(tensors)
}

/// The HF name of the file's tensor `gname`, `None` for a tensor mlbench does not know; rope
/// frequency factors are refused.
fn tensor_name(gname: &str, gemma: bool, gguf: &Path) -> Result<Option<String>> {
    let Some(name) = hf_name(gname) else {
        if gname.starts_with("rope_freqs") {
            return Err(Error::Config {
                path: gguf.to_path_buf(),
                message: "rope frequency factors (rope scaling) are not supported".into(),
            });
        }
        return Ok(None);
    };
    if !name.contains("FFN_NORM") {
        return Ok(Some(name));
    }
    // Gemma's ffn_norm is the pre-feed-forward norm; Llama's is the post-attention norm.
    Ok(Some(name.replace(
        "FFN_NORM",
        if gemma {
            "pre_feedforward_layernorm"
        } else {
            "post_attention_layernorm"
        },
    )))
}

/// The f32 tensor `t` (HF name `name`, file name `gname`) converted from llama.cpp's
/// conventions to HF's: Gemma norm weights lose the folded-in `+1`, Llama-family q/k rows are
/// un-permuted from the interleaved rope layout to the half-split one.
fn to_hf_layout(
    t: Tensor,
    name: &str,
    gname: &str,
    config: &ModelConfig,
    gguf: &Path,
) -> Result<Tensor> {
    let gemma = config.arch == Arch::Gemma3;
    if gemma && name.ends_with("norm.weight") {
        return Ok((t - 1.0)?);
    }
    let is_q = name.ends_with("q_proj.weight");
    if gemma || !(is_q || name.ends_with("k_proj.weight")) {
        return Ok(t);
    }
    let head_dim = config.head_dim;
    let n_heads = if is_q {
        config.num_attention_heads
    } else {
        config.num_key_value_heads
    };
    let (out, inp) = t.dims2()?;
    if out != n_heads * head_dim {
        return Err(Error::Config {
            path: gguf.to_path_buf(),
            message: format!(
                "tensor `{gname}` has {out} rows, expected {}",
                n_heads * head_dim
            ),
        });
    }
    Ok(t.reshape((n_heads, head_dim / 2, 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))?)
}

/// Checks every tensor's shape against the config before anything is written.
fn check_shapes(
    config: &ModelConfig,
    tensors: &BTreeMap<String, Tensor>,
    gguf: &Path,
) -> Result<()> {
    let check = super::load::expected_shapes(config);
    for (name, shape) in &check {
        match tensors.get(name) {
            Some(t) if t.dims() == shape.as_slice() => {}
            Some(t) => {
                return Err(Error::Config {
                    path: gguf.to_path_buf(),
                    message: format!(
                        "tensor `{name}` has shape {:?}, the metadata implies {shape:?}",
                        t.dims()
                    ),
                })
            }
            None => {
                return Err(Error::Config {
                    path: gguf.to_path_buf(),
                    message: format!("missing tensor for `{name}`"),
                })
            }
        }
    }
    Ok(())
}

/// `tokenizer.json` built from the file's vocabulary: a SentencePiece-style BPE (`llama`) or a
/// byte-level BPE (`gpt2`), with control and user-defined tokens as specials.
fn tokenizer_json(content: &Content, tokens: &[String], gguf: &Path) -> Result<serde_json::Value> {
    let model_kind = meta(content, "tokenizer.ggml.model", gguf)?
        .to_string()
        .cloned()
        .unwrap_or_default();
    let types: Vec<i32> = content
        .metadata
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.to_vec().ok())
        .map(|v| v.iter().map(|x| x.to_i32().unwrap_or(1)).collect())
        .unwrap_or_else(|| vec![1; tokens.len()]);
    let specials: Vec<(u32, &str)> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
        .map(|(i, t)| (i as u32, t.as_str()))
        .collect();
    match model_kind.as_str() {
        "llama" => Ok(sentencepiece_tokenizer(content, tokens, &specials)),
        "gpt2" => {
            let merges = bpe_merges(content, gguf)?;
            Ok(byte_level_bpe_json(tokens, &merges, &specials))
        }
        other => Err(Error::Config {
            path: gguf.to_path_buf(),
            message: format!("tokenizer model `{other}` is not supported (llama or gpt2)"),
        }),
    }
}

/// The SentencePiece-style tokenizer of a `llama` vocabulary, with its scores and unknown token.
fn sentencepiece_tokenizer(
    content: &Content,
    tokens: &[String],
    specials: &[(u32, &str)],
) -> serde_json::Value {
    let scores: Vec<f32> = content
        .metadata
        .get("tokenizer.ggml.scores")
        .and_then(|v| v.to_vec().ok())
        .map(|v| v.iter().map(|x| x.to_f32().unwrap_or(0.0)).collect())
        .unwrap_or_else(|| vec![0.0; tokens.len()]);
    let pieces: Vec<(String, f32)> = tokens.iter().cloned().zip(scores).collect();
    let unk = meta_u32(content, "tokenizer.ggml.unknown_token_id")
        .and_then(|i| tokens.get(i as usize))
        .cloned()
        .unwrap_or_else(|| "<unk>".into());
    sentencepiece_bpe_json(&pieces, specials, &unk)
}

/// The merges of a `gpt2` (byte-level BPE) vocabulary, as pairs.
fn bpe_merges(content: &Content, gguf: &Path) -> Result<Vec<(String, String)>> {
    Ok(meta(content, "tokenizer.ggml.merges", gguf)?
        .to_vec()
        .map_err(|e| gguf_err(gguf, e))?
        .iter()
        .filter_map(|m| {
            m.to_string().ok().and_then(|s| {
                s.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
            })
        })
        .collect())
}

/// Writes the HF folder `out`: the weights as `dtype`, `tokenizer.json`, and `config.json`
/// naming the weights' dtype and the GGUF file it came from (with its sha256).
fn write_folder(
    out: &Path,
    gguf: &Path,
    config: &ModelConfig,
    tensors: &BTreeMap<String, Tensor>,
    tok_json: &serde_json::Value,
    dtype: DType,
) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io("create directory", out, e))?;
    save_safetensors_typed(&out.join("model.safetensors"), tensors, dtype)?;
    write_bytes_atomic(&out.join("tokenizer.json"), &serde_json::to_vec(tok_json)?)?;
    let mut hf = config.to_hf_json();
    hf["torch_dtype"] = json!(if dtype == DType::BF16 {
        "bfloat16"
    } else {
        "float32"
    });
    hf["mlbench_source"] = json!({"gguf": gguf.file_name().map(|f| f.to_string_lossy().into_owned()), "sha256": crate::util::sha256_file(gguf)?});
    write_bytes_atomic(&out.join("config.json"), &serde_json::to_vec_pretty(&hf)?)?;
    Ok(())
}
