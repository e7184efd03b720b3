//! Loading a model from an HF folder (`config.json`, `model.safetensors` or a sharded
//! `model.safetensors.index.json`), and writing one.
//!
//! In: a folder. Out: a [`Model`] with every expected tensor present and of the shape the config
//! implies (missing tensors and shape mismatches are errors naming the tensor), every value
//! finite (a NaN or infinity is an error naming the file, the tensor and the first bad index).
//! Pickled `pytorch_model.bin` weights are refused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::blocks::{Layer, Linear, RmsNorm};
use super::config::{Arch, ModelConfig};
use super::transformer::Model;
use crate::error::{Error, Result};
use crate::util::write_bytes_atomic;

/// The safetensors files of a folder: the shards named by the index, or `model.safetensors`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io("read", &index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: index.clone(),
            message: format!("not JSON: {e}"),
        })?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::Config {
                path: index.clone(),
                message: "missing `weight_map`".into(),
            })?;
        let mut files: Vec<String> = map
            .values()
            .filter_map(|f| f.as_str().map(str::to_string))
            .collect();
        files.sort();
        files.dedup();
        let mut out = Vec::new();
        for f in files {
            if f.contains('/') || f.contains("..") || !f.ends_with(".safetensors") {
                return Err(Error::Config {
                    path: index.clone(),
                    message: format!("shard name `{f}` is not a plain .safetensors file name"),
                });
            }
            out.push(dir.join(f));
        }
        return Ok(out);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    if dir.join("pytorch_model.bin").exists() {
        return Err(Error::Config {
            path: dir.join("pytorch_model.bin"),
            message: "pickled PyTorch weights are refused; convert the model to safetensors (or import a GGUF)".into(),
        });
    }
    Err(Error::MissingFile {
        what: "model weights (model.safetensors)",
        path: single,
    })
}

/// Tensor name -> tensor, from all weight files, converted to `dtype`.
fn read_all(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<BTreeMap<String, (Tensor, PathBuf)>> {
    let mut out = BTreeMap::new();
    for f in files {
        // SAFETY: the file is mapped read-only; the safetensors crate validates the header,
        // every offset and every size against the file length before any tensor is built.
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(f) }.map_err(|e| {
            Error::Config {
                path: f.clone(),
                message: format!("not a valid safetensors file: {e}"),
            }
        })?;
        for (name, _) in st.tensors() {
            let t = st.load(&name, device).map_err(|e| Error::Config {
                path: f.clone(),
                message: format!("tensor `{name}`: {e}"),
            })?;
            let t = t.to_dtype(dtype)?;
            super::lora::check_finite(&t, f, &name)?;
            out.insert(name, (t, f.clone()));
        }
    }
    Ok(out)
}

/// Loads a model folder.
pub fn load_model(dir: &Path, dtype: DType, device: &Device) -> Result<Model> {
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let files = weight_files(dir)?;
    let mut tensors = read_all(&files, dtype, device)?;
    build(config, &mut tensors, dir, dtype, device)
}

/// A model from the tensors of its folder: every tensor `config` implies is checked, then
/// taken out of `tensors`; what is left is warned about as unused.
fn build(
    config: ModelConfig,
    tensors: &mut BTreeMap<String, (Tensor, PathBuf)>,
    dir: &Path,
    dtype: DType,
    device: &Device,
) -> Result<Model> {
    check_shapes(&config, tensors, dir)?;
    let mut parts = Parts {
        tensors,
        gemma: config.arch == Arch::Gemma3,
        eps: config.rms_norm_eps,
        dtype,
    };
    let embed = parts.take("model.embed_tokens.weight");
    let layers = (0..config.num_hidden_layers)
        .map(|i| parts.layer(&config, i))
        .collect::<Result<Vec<_>>>()?;
    let final_norm = parts.norm("model.norm.weight")?;
    let lm_head = if config.tie_word_embeddings {
        parts.tensors.remove("lm_head.weight");
        None
    } else {
        Some(parts.take("lm_head.weight"))
    };
    for name in parts.tensors.keys() {
        tracing::warn!(tensor = %name, "unused tensor in the model folder");
    }
    Ok(Model {
        config,
        embed,
        layers,
        final_norm,
        lm_head,
        head_packs: Default::default(),
        dtype,
        device: device.clone(),
    })
}

/// Every tensor the config implies must be present with exactly that shape.
fn check_shapes(
    c: &ModelConfig,
    tensors: &BTreeMap<String, (Tensor, PathBuf)>,
    dir: &Path,
) -> Result<()> {
    for (name, shape) in expected_shapes(c) {
        match tensors.get(&name) {
            None => {
                return Err(Error::Config {
                    path: dir.to_path_buf(),
                    message: format!("missing tensor `{name}` (expected shape {shape:?})"),
                })
            }
            Some((t, file)) if t.dims() != shape.as_slice() => {
                return Err(Error::Config {
                    path: file.clone(),
                    message: format!(
                        "tensor `{name}` has shape {:?}, the config implies {shape:?}",
                        t.dims()
                    ),
                })
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// The checked tensors of a folder, taken out one by one into the model's parts.
struct Parts<'a> {
    tensors: &'a mut BTreeMap<String, (Tensor, PathBuf)>,
    gemma: bool,
    eps: f64,
    dtype: DType,
}

impl Parts<'_> {
    /// The tensor `name` (present: [`check_shapes`] ran first).
    fn take(&mut self, name: &str) -> Tensor {
        self.tensors.remove(name).expect("checked above").0
    }

    /// The norm with weight `name`; Gemma's `1 + w` is folded in here (computed in f32, or f64).
    fn norm(&mut self, name: &str) -> Result<RmsNorm> {
        let t = self.take(name);
        let work = if self.dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let scale = if self.gemma {
            (t.to_dtype(work)? + 1.0)?.to_dtype(self.dtype)?
        } else {
            t
        };
        Ok(RmsNorm {
            scale,
            eps: self.eps,
        })
    }

    /// The linear module `name` (`.weight`, and `.bias` when `bias`).
    fn linear(&mut self, name: String, bias: bool) -> Linear {
        let weight = self.take(&format!("{name}.weight"));
        let bias = bias.then(|| self.take(&format!("{name}.bias")));
        Linear {
            name,
            weight,
            bias,
            packs: Default::default(),
        }
    }

    /// Decoder layer `i`.
    fn layer(&mut self, c: &ModelConfig, i: usize) -> Result<Layer> {
        let p = format!("model.layers.{i}");
        let ab = c.attention_bias;
        let q = self.linear(format!("{p}.self_attn.q_proj"), ab);
        let k = self.linear(format!("{p}.self_attn.k_proj"), ab);
        let v = self.linear(format!("{p}.self_attn.v_proj"), ab);
        let o = self.linear(format!("{p}.self_attn.o_proj"), false);
        let gate = self.linear(format!("{p}.mlp.gate_proj"), false);
        let up = self.linear(format!("{p}.mlp.up_proj"), false);
        let down = self.linear(format!("{p}.mlp.down_proj"), false);
        let input_norm = self.norm(&format!("{p}.input_layernorm.weight"))?;
        let post_attn_norm = self.norm(&format!("{p}.post_attention_layernorm.weight"))?;
        let (pre_ff_norm, post_ff_norm, q_norm, k_norm) = if self.gemma {
            (
                Some(self.norm(&format!("{p}.pre_feedforward_layernorm.weight"))?),
                Some(self.norm(&format!("{p}.post_feedforward_layernorm.weight"))?),
                Some(self.norm(&format!("{p}.self_attn.q_norm.weight"))?),
                Some(self.norm(&format!("{p}.self_attn.k_norm.weight"))?),
            )
        } else {
            (None, None, None, None)
        };
        Ok(Layer {
            kind: c.layer_kinds[i],
            input_norm,
            post_attn_norm,
            pre_ff_norm,
            post_ff_norm,
            q_norm,
            k_norm,
            q,
            k,
            v,
            o,
            gate,
            up,
            down,
        })
    }
}

/// Every tensor a model of `c` needs, with its shape (HF names).
pub fn expected_shapes(c: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, hd, nh, nkv, ff, v) = (
        c.hidden_size,
        c.head_dim,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.intermediate_size,
        c.vocab_size,
    );
    let mut out = vec![
        ("model.embed_tokens.weight".to_string(), vec![v, h]),
        ("model.norm.weight".to_string(), vec![h]),
    ];
    if !c.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![v, h]));
    }
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let mut add = |n: &str, s: Vec<usize>| out.push((format!("{p}.{n}"), s));
        add("self_attn.q_proj.weight", vec![nh * hd, h]);
        add("self_attn.k_proj.weight", vec![nkv * hd, h]);
        add("self_attn.v_proj.weight", vec![nkv * hd, h]);
        add("self_attn.o_proj.weight", vec![h, nh * hd]);
        add("mlp.gate_proj.weight", vec![ff, h]);
        add("mlp.up_proj.weight", vec![ff, h]);
        add("mlp.down_proj.weight", vec![h, ff]);
        add("input_layernorm.weight", vec![h]);
        add("post_attention_layernorm.weight", vec![h]);
        if c.attention_bias {
            add("self_attn.q_proj.bias", vec![nh * hd]);
            add("self_attn.k_proj.bias", vec![nkv * hd]);
            add("self_attn.v_proj.bias", vec![nkv * hd]);
        }
        if c.arch == Arch::Gemma3 {
            add("pre_feedforward_layernorm.weight", vec![h]);
            add("post_feedforward_layernorm.weight", vec![h]);
            add("self_attn.q_norm.weight", vec![hd]);
            add("self_attn.k_norm.weight", vec![hd]);
        }
    }
    out
}

/// Serialises named tensors as one safetensors file (f32), metadata `{"format": "pt"}`.
pub fn save_safetensors(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    save_safetensors_typed(path, tensors, DType::F32)
}

/// Serialises named tensors as f32 or bf16 safetensors, written atomically.
pub fn save_safetensors_typed(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    dtype: DType,
) -> Result<()> {
    let mut raw: Vec<(String, Vec<u8>, Vec<usize>)> = Vec::with_capacity(tensors.len());
    for (n, t) in tensors {
        let flat = t.flatten_all()?;
        let bytes: Vec<u8> = match dtype {
            DType::BF16 => flat
                .to_dtype(DType::BF16)?
                .to_vec1::<half::bf16>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
            _ => flat
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        };
        raw.push((n.clone(), bytes, t.dims().to_vec()));
    }
    let st_dtype = if dtype == DType::BF16 {
        safetensors::Dtype::BF16
    } else {
        safetensors::Dtype::F32
    };
    let views = raw
        .iter()
        .map(|(n, b, s)| {
            safetensors::tensor::TensorView::new(st_dtype, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::Internal(format!("tensor {n}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta: std::collections::HashMap<String, String> =
        [("format".to_string(), "pt".to_string())].into();
    let bytes = safetensors::serialize(views, Some(meta))
        .map_err(|e| Error::Internal(format!("serialising {}: {e}", path.display())))?;
    write_bytes_atomic(path, &bytes)
}

/// Writes an HF folder: `config.json`, `model.safetensors`, and `tokenizer.json` when given.
pub fn save_hf_folder(
    dir: &Path,
    config: &ModelConfig,
    tensors: &BTreeMap<String, Tensor>,
    tokenizer_json: Option<&serde_json::Value>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io("create directory", dir, e))?;
    save_safetensors(&dir.join("model.safetensors"), tensors)?;
    if let Some(tok) = tokenizer_json {
        write_bytes_atomic(&dir.join("tokenizer.json"), &serde_json::to_vec(tok)?)?;
    }
    write_bytes_atomic(
        &dir.join("config.json"),
        &serde_json::to_vec_pretty(&config.to_hf_json())?,
    )
}

/// The identity of a model folder's weights: the sha256 of its one safetensors file, or of the
/// sorted `name sha256` lines of its shards.
/// Hashed once per process and file version (a model folder is read by every cell of a grid).
pub fn weights_sha256(dir: &Path) -> Result<String> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    type Version = (std::path::PathBuf, u64, Option<std::time::SystemTime>);
    static SEEN: OnceLock<Mutex<HashMap<Version, String>>> = OnceLock::new();
    let files = weight_files(dir)?;
    let meta = files.first().and_then(|f| std::fs::metadata(f).ok());
    let version = (
        dir.to_path_buf(),
        meta.as_ref().map_or(0, |m| m.len()),
        meta.and_then(|m| m.modified().ok()),
    );
    let seen = SEEN.get_or_init(Default::default);
    if let Some(h) = seen.lock().ok().and_then(|s| s.get(&version).cloned()) {
        return Ok(h);
    }
    let h = hash_weight_files(&files)?;
    if let Ok(mut s) = seen.lock() {
        s.insert(version, h.clone());
    }
    Ok(h)
}

fn hash_weight_files(files: &[std::path::PathBuf]) -> Result<String> {
    if let [one] = files {
        return crate::util::sha256_file(one);
    }
    let mut lines = Vec::new();
    for f in files {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        lines.push(format!("{name} {}", crate::util::sha256_file(f)?));
    }
    Ok(crate::util::sha256_hex(lines.join("\n").as_bytes()))
}
