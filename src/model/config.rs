//! Model configuration: the fields of an HF `config.json` that the decoder needs, for the
//! `gemma3` (Gemma 3 text) and Llama-family (`llama`, `qwen2`) architectures.
//!
//! In: `config.json` text. Out: a validated [`ModelConfig`] (every size checked to be positive
//! and consistent before any tensor is allocated).
//!
//! Nothing that changes the model's outputs is guessed. The rope bases are read from either
//! shape transformers writes: `rope_theta` (with Gemma 3's `rope_local_base_freq`) as 4.x
//! saves them, or `rope_parameters` as 5.x does (one `{rope_type, rope_theta}` object, or one
//! per layer type: `full_attention`, `sliding_attention`); a file with both must agree. A
//! `rope_type` other than `default`, any rope scaling, `rms_norm_eps` missing, and for Gemma 3
//! `head_dim` or `query_pre_attn_scalar` missing are errors naming the file and the key. Keys
//! whose absence the HF format itself defines are read with that definition
//! (`num_key_value_heads` = `num_attention_heads`, `head_dim` = hidden / heads for Llama).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The decoder families mlbench implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Gemma 3 text decoder: (1 + w) RMSNorm, q/k norms, sandwich norms, GeGLU (tanh),
    /// sliding-window layers with their own rope base, embeddings scaled by sqrt(hidden).
    Gemma3,
    /// Llama / SmolLM2: RMSNorm, SwiGLU, rope.
    Llama,
    /// Qwen2: Llama plus biases on q, k and v.
    Qwen2,
}

/// What kind of attention a layer does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    Full,
    Sliding,
}

/// The decoder configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    /// Rope base of full-attention layers.
    pub rope_theta: f64,
    /// Rope base of sliding-window layers (Gemma 3).
    pub rope_local_base_freq: Option<f64>,
    /// Sliding window in tokens (a key is visible when `q - k < window`).
    pub sliding_window: Option<usize>,
    /// Per-layer attention kind (length `num_hidden_layers`).
    #[serde(skip)]
    pub layer_kinds: Vec<LayerKind>,
    /// Attention scores are multiplied by `query_pre_attn_scalar^-0.5` (Gemma) or
    /// `head_dim^-0.5` (Llama).
    pub query_pre_attn_scalar: Option<f64>,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub final_logit_softcapping: Option<f64>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_local_base_freq: Option<f64>,
    sliding_window: Option<usize>,
    sliding_window_pattern: Option<usize>,
    layer_types: Option<Vec<String>>,
    query_pre_attn_scalar: Option<f64>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    final_logit_softcapping: Option<f64>,
    attn_logit_softcapping: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    rope_parameters: Option<serde_json::Value>,
    partial_rotary_factor: Option<f64>,
    hidden_act: Option<String>,
    hidden_activation: Option<String>,
    use_sliding_window: Option<bool>,
    bos_token_id: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
    pad_token_id: Option<serde_json::Value>,
}

/// The rope bases `(full-attention layers, sliding layers)` of a config, from `rope_parameters`
/// or `rope_theta` / `rope_local_base_freq`; `local` is `None` when the file gives none.
fn rope_bases(raw: &RawConfig) -> std::result::Result<(f64, Option<f64>), String> {
    // One `{rope_type, rope_theta, ...}` object: its base, with anything but plain rope refused.
    let entry = |v: &serde_json::Value, key: &str| -> std::result::Result<f64, String> {
        let o = v
            .as_object()
            .ok_or_else(|| format!("`{key}` must be an object"))?;
        let kind = o.get("rope_type").or_else(|| o.get("type"));
        match kind.map(|k| k.as_str()) {
            None | Some(Some("default")) => {}
            Some(Some(k)) => {
                return Err(format!(
                    "`{key}.rope_type` = `{k}`: only `default` rope is implemented (no linear, dynamic, yarn, llama3, longrope scaling)"
                ))
            }
            Some(None) => return Err(format!("`{key}.rope_type` must be a string")),
        }
        for (k, v) in o {
            let harmless = matches!(k.as_str(), "rope_type" | "type" | "rope_theta")
                || (k == "partial_rotary_factor" && v.as_f64() == Some(1.0));
            if !harmless && !v.is_null() {
                return Err(format!(
                    "`{key}.{k}` is not implemented (plain rope reads only `rope_type` and `rope_theta`)"
                ));
            }
        }
        let theta = o
            .get("rope_theta")
            .ok_or_else(|| format!("missing `{key}.rope_theta`"))?
            .as_f64()
            .ok_or_else(|| format!("`{key}.rope_theta` must be a number"))?;
        if !(theta.is_finite() && theta > 0.0) {
            return Err(format!("`{key}.rope_theta` = {theta} must be positive"));
        }
        Ok(theta)
    };
    let (full, local) = match raw.rope_parameters.as_ref().filter(|v| !v.is_null()) {
        None => (None, None),
        Some(p) => {
            let o = p.as_object().ok_or("`rope_parameters` must be an object")?;
            let per_type = o.contains_key("full_attention") || o.contains_key("sliding_attention");
            if per_type {
                for k in o.keys() {
                    if k != "full_attention" && k != "sliding_attention" {
                        return Err(format!(
                            "`rope_parameters.{k}`: unknown layer type (known: full_attention, sliding_attention)"
                        ));
                    }
                }
                let get = |k: &str| {
                    o.get(k)
                        .map(|v| entry(v, &format!("rope_parameters.{k}")))
                        .transpose()
                };
                (get("full_attention")?, get("sliding_attention")?)
            } else {
                (Some(entry(p, "rope_parameters")?), None)
            }
        }
    };
    let agree = |name: &str, from_params: Option<f64>, flat: Option<f64>| match (from_params, flat)
    {
        (Some(a), Some(b)) if a != b => Err(format!(
            "`{name}` = {b} contradicts `rope_parameters` ({a}); the file must say one thing"
        )),
        (a, b) => Ok(a.or(b)),
    };
    let full = agree("rope_theta", full, raw.rope_theta)?.ok_or(
        "missing `rope_theta` (or `rope_parameters`): the rope base changes every output, so it is not guessed",
    )?;
    let local = agree("rope_local_base_freq", local, raw.rope_local_base_freq)?;
    Ok((full, local))
}

fn first_id(v: &Option<serde_json::Value>) -> Option<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|x| x as u32),
        Some(serde_json::Value::Array(a)) => a.first().and_then(|x| x.as_u64()).map(|x| x as u32),
        _ => None,
    }
}

/// A configuration error naming the file `path`.
fn config_error(path: &Path, message: String) -> Error {
    Error::Config {
        path: path.to_path_buf(),
        message,
    }
}

/// The architecture named by `model_type`, or else by `architectures`.
fn architecture(raw: &RawConfig, path: &Path) -> Result<Arch> {
    let mt = raw.model_type.clone().unwrap_or_default();
    let archs = raw.architectures.join(",");
    Ok(match mt.as_str() {
        "gemma3_text" | "gemma3" => Arch::Gemma3,
        "llama" | "smollm2" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        "" if archs.contains("Gemma3ForCausalLM") => Arch::Gemma3,
        "" if archs.contains("LlamaForCausalLM") => Arch::Llama,
        "" if archs.contains("Qwen2ForCausalLM") => Arch::Qwen2,
        _ => {
            return Err(Error::Unknown {
                kind: "architecture",
                code: if mt.is_empty() { archs } else { mt },
                scope: format!(
                    " in {} (supported: gemma3_text, llama, qwen2)",
                    path.display()
                ),
                suggestions: vec![],
            })
        }
    })
}

/// The value of the size `name`, which must be present and positive.
fn positive(v: Option<usize>, name: &str, path: &Path) -> Result<usize> {
    match v {
        Some(x) if x > 0 => Ok(x),
        Some(_) => Err(config_error(path, format!("`{name}` must be positive"))),
        None => Err(config_error(path, format!("missing `{name}`"))),
    }
}

/// The sizes of a decoder, each checked positive, consistent with the others and within what
/// mlbench supports (before anything is allocated).
struct Sizes {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: usize,
    head_dim: usize,
}

impl Sizes {
    fn read(raw: &RawConfig, arch: Arch, path: &Path) -> Result<Sizes> {
        let cfg = |message: String| config_error(path, message);
        let hidden_size = positive(raw.hidden_size, "hidden_size", path)?;
        let num_attention_heads = positive(raw.num_attention_heads, "num_attention_heads", path)?;
        let num_key_value_heads = raw.num_key_value_heads.unwrap_or(num_attention_heads);
        let head_dim = head_dim(raw, arch, hidden_size, num_attention_heads, path)?;
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(cfg(format!(
                "num_attention_heads {num_attention_heads} is not a multiple of num_key_value_heads {num_key_value_heads}"
            )));
        }
        let num_hidden_layers = positive(raw.num_hidden_layers, "num_hidden_layers", path)?;
        // Guard against absurd sizes before anything is allocated.
        let vocab_size = positive(raw.vocab_size, "vocab_size", path)?;
        let intermediate_size = positive(raw.intermediate_size, "intermediate_size", path)?;
        for (name, v, max) in [
            ("vocab_size", vocab_size, 1 << 22),
            ("hidden_size", hidden_size, 1 << 16),
            ("intermediate_size", intermediate_size, 1 << 18),
            ("num_hidden_layers", num_hidden_layers, 1024),
        ] {
            if v > max {
                return Err(cfg(format!(
                    "`{name}` = {v} is larger than mlbench supports ({max})"
                )));
            }
        }
        Ok(Sizes {
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
        })
    }
}

/// The head size: `head_dim`, or for Llama-family models hidden / heads when the key is
/// absent; positive and even (rope).
fn head_dim(
    raw: &RawConfig,
    arch: Arch,
    hidden: usize,
    heads: usize,
    path: &Path,
) -> Result<usize> {
    let cfg = |message: String| config_error(path, message);
    let head_dim =
        match raw.head_dim {
            Some(h) => h,
            None if arch == Arch::Gemma3 => return Err(cfg(
                "missing `head_dim` (Gemma 3's head size is not hidden_size / num_attention_heads)"
                    .into(),
            )),
            None if hidden % heads == 0 => hidden / heads,
            None => {
                return Err(cfg(
                    "hidden_size is not a multiple of num_attention_heads and head_dim is missing"
                        .into(),
                ))
            }
        };
    if head_dim == 0 || head_dim % 2 != 0 {
        return Err(cfg(format!(
            "head_dim {head_dim} must be positive and even (rope)"
        )));
    }
    Ok(head_dim)
}

/// Refuses attention logit softcapping, rope scaling and partial rotary embeddings.
fn refuse_unsupported(raw: &RawConfig, path: &Path) -> Result<()> {
    let cfg = |message: String| config_error(path, message);
    if raw.attn_logit_softcapping.is_some() {
        return Err(cfg("attn_logit_softcapping is not supported".into()));
    }
    if let Some(rs) = &raw.rope_scaling {
        if !rs.is_null() {
            let kind = rs
                .get("rope_type")
                .or_else(|| rs.get("type"))
                .and_then(|v| v.as_str())
                .unwrap_or("?");
            if kind != "default" {
                return Err(cfg(format!("rope_scaling type `{kind}` is not supported")));
            }
        }
    }
    if let Some(f) = raw.partial_rotary_factor {
        if f != 1.0 {
            return Err(cfg(format!(
                "`partial_rotary_factor` = {f} is not implemented (only 1.0)"
            )));
        }
    }
    Ok(())
}

/// Refuses MLP biases and an activation other than the architecture's own.
fn check_mlp(raw: &RawConfig, arch: Arch, path: &Path) -> Result<()> {
    let cfg = |message: String| config_error(path, message);
    if raw.mlp_bias == Some(true) {
        return Err(cfg("mlp_bias = true is not supported".into()));
    }
    let act = raw
        .hidden_activation
        .clone()
        .or(raw.hidden_act.clone())
        .unwrap_or_default();
    match arch {
        Arch::Gemma3 if !act.is_empty() && act != "gelu_pytorch_tanh" => Err(cfg(format!(
            "gemma3 activation `{act}` is not supported (expected gelu_pytorch_tanh)"
        ))),
        Arch::Llama | Arch::Qwen2 if !act.is_empty() && act != "silu" => Err(cfg(format!(
            "activation `{act}` is not supported (expected silu)"
        ))),
        _ => Ok(()),
    }
}

/// Each layer's attention kind: from `layer_types`, else Gemma 3's `sliding_window_pattern`,
/// else all full.
fn layer_kinds(raw: &RawConfig, arch: Arch, layers: usize, path: &Path) -> Result<Vec<LayerKind>> {
    let cfg = |message: String| config_error(path, message);
    Ok(match (arch, &raw.layer_types) {
        (_, Some(types)) => {
            if types.len() != layers {
                return Err(cfg(format!(
                    "layer_types has {} entries for {layers} layers",
                    types.len()
                )));
            }
            types
                .iter()
                .map(|t| match t.as_str() {
                    "full_attention" => Ok(LayerKind::Full),
                    "sliding_attention" => Ok(LayerKind::Sliding),
                    other => Err(cfg(format!("unknown layer type `{other}`"))),
                })
                .collect::<Result<_>>()?
        }
        (Arch::Gemma3, None) => {
            let p = match raw.sliding_window_pattern {
                Some(p) if p > 0 => p,
                _ => {
                    return Err(cfg(
                        "missing `layer_types` (or a positive `sliding_window_pattern`): which layers slide is not guessed"
                            .into(),
                    ))
                }
            };
            (0..layers)
                .map(|i| {
                    if (i + 1) % p == 0 {
                        LayerKind::Full
                    } else {
                        LayerKind::Sliding
                    }
                })
                .collect()
        }
        (Arch::Qwen2, None) if raw.use_sliding_window == Some(true) => {
            return Err(cfg(
                "qwen2 use_sliding_window = true is not supported".into()
            ))
        }
        _ => vec![LayerKind::Full; layers],
    })
}

/// The attention settings only Gemma 3 has (`None` for other architectures): the sliding
/// window (required by any sliding layer), the sliding layers' rope base and the query scale.
struct GemmaAttention {
    sliding_window: Option<usize>,
    rope_local_base_freq: Option<f64>,
    query_pre_attn_scalar: Option<f64>,
}

impl GemmaAttention {
    fn read(
        raw: &RawConfig,
        arch: Arch,
        layer_kinds: &[LayerKind],
        rope_local: Option<f64>,
        path: &Path,
    ) -> Result<GemmaAttention> {
        let cfg = |message: String| config_error(path, message);
        let sliding_window = match arch {
            Arch::Gemma3 => raw.sliding_window,
            _ => None,
        };
        if layer_kinds.contains(&LayerKind::Sliding) && sliding_window.unwrap_or(0) == 0 {
            return Err(cfg("sliding layers need a positive `sliding_window`".into()));
        }
        let is_gemma = arch == Arch::Gemma3;
        let rope_local_base_freq = match (is_gemma, rope_local) {
            (false, _) => None,
            (true, Some(b)) => Some(b),
            (true, None) if layer_kinds.contains(&LayerKind::Sliding) => {
                return Err(cfg(
                    "missing `rope_local_base_freq` (or `rope_parameters.sliding_attention`): the sliding layers' rope base is not guessed"
                        .into(),
                ))
            }
            (true, None) => None,
        };
        let query_pre_attn_scalar = match (is_gemma, raw.query_pre_attn_scalar) {
            (false, _) => None,
            (true, Some(q)) if q.is_finite() && q > 0.0 => Some(q),
            (true, Some(q)) => {
                return Err(cfg(format!(
                    "`query_pre_attn_scalar` = {q} must be positive"
                )))
            }
            (true, None) => return Err(cfg("missing `query_pre_attn_scalar`".into())),
        };
        Ok(GemmaAttention {
            sliding_window,
            rope_local_base_freq,
            query_pre_attn_scalar,
        })
    }
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::missing_or_io("model config.json", "read", path, e))?;
        Self::from_json(&text, path)
    }

    /// Parses and validates config JSON; `path` is used in error messages.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let cfg = |message: String| config_error(path, message);
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| cfg(format!("not a model config: {e}")))?;
        let arch = architecture(&raw, path)?;
        let sizes = Sizes::read(&raw, arch, path)?;
        refuse_unsupported(&raw, path)?;
        let (rope_theta, rope_local) = rope_bases(&raw).map_err(cfg)?;
        let rms_norm_eps = match raw.rms_norm_eps {
            Some(e) if e.is_finite() && e > 0.0 => e,
            Some(e) => return Err(cfg(format!("`rms_norm_eps` = {e} must be positive"))),
            None => return Err(cfg("missing `rms_norm_eps`".into())),
        };
        check_mlp(&raw, arch, path)?;
        let layer_kinds = layer_kinds(&raw, arch, sizes.num_hidden_layers, path)?;
        let gemma = GemmaAttention::read(&raw, arch, &layer_kinds, rope_local, path)?;
        let is_gemma = arch == Arch::Gemma3;
        Ok(ModelConfig {
            arch,
            vocab_size: sizes.vocab_size,
            hidden_size: sizes.hidden_size,
            intermediate_size: sizes.intermediate_size,
            num_hidden_layers: sizes.num_hidden_layers,
            num_attention_heads: sizes.num_attention_heads,
            num_key_value_heads: sizes.num_key_value_heads,
            head_dim: sizes.head_dim,
            rms_norm_eps,
            rope_theta,
            rope_local_base_freq: gemma.rope_local_base_freq,
            sliding_window: gemma.sliding_window,
            layer_kinds,
            query_pre_attn_scalar: gemma.query_pre_attn_scalar,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(is_gemma),
            attention_bias: arch == Arch::Qwen2 || raw.attention_bias.unwrap_or(false),
            final_logit_softcapping: raw.final_logit_softcapping,
            bos_token_id: first_id(&raw.bos_token_id),
            eos_token_id: first_id(&raw.eos_token_id),
            pad_token_id: first_id(&raw.pad_token_id),
        })
    }

    /// An HF-style `config.json` for this configuration (what `model import` and the tiny-model
    /// builder write; transformers reads it).
    pub fn to_hf_json(&self) -> serde_json::Value {
        use serde_json::json;
        let mut v = match self.arch {
            Arch::Gemma3 => json!({
                "architectures": ["Gemma3ForCausalLM"],
                "model_type": "gemma3_text",
                "hidden_activation": "gelu_pytorch_tanh",
                "rope_local_base_freq": self.rope_local_base_freq,
                "sliding_window": self.sliding_window,
                "query_pre_attn_scalar": self.query_pre_attn_scalar.map(|q| if q.fract() == 0.0 { json!(q as i64) } else { json!(q) }),
                "layer_types": self.layer_kinds.iter().map(|k| match k {
                    LayerKind::Full => "full_attention",
                    LayerKind::Sliding => "sliding_attention",
                }).collect::<Vec<_>>(),
                "final_logit_softcapping": self.final_logit_softcapping,
                "attn_logit_softcapping": null,
                "rope_scaling": null,
            }),
            Arch::Llama => json!({
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_act": "silu",
                "attention_bias": self.attention_bias,
                "mlp_bias": false,
                "rope_scaling": null,
            }),
            Arch::Qwen2 => json!({
                "architectures": ["Qwen2ForCausalLM"],
                "model_type": "qwen2",
                "hidden_act": "silu",
                "use_sliding_window": false,
                "rope_scaling": null,
            }),
        };
        let o = v.as_object_mut().expect("object");
        for (k, val) in [
            ("vocab_size", json!(self.vocab_size)),
            ("hidden_size", json!(self.hidden_size)),
            ("intermediate_size", json!(self.intermediate_size)),
            ("num_hidden_layers", json!(self.num_hidden_layers)),
            ("num_attention_heads", json!(self.num_attention_heads)),
            ("num_key_value_heads", json!(self.num_key_value_heads)),
            ("head_dim", json!(self.head_dim)),
            ("rms_norm_eps", json!(self.rms_norm_eps)),
            ("rope_theta", json!(self.rope_theta)),
            ("tie_word_embeddings", json!(self.tie_word_embeddings)),
            ("bos_token_id", json!(self.bos_token_id)),
            ("eos_token_id", json!(self.eos_token_id)),
            ("pad_token_id", json!(self.pad_token_id)),
            ("max_position_embeddings", json!(32768)),
            ("torch_dtype", json!("float32")),
        ] {
            o.insert(k.to_string(), val);
        }
        v
    }

    /// The attention-score scale of this model.
    pub fn attn_scale(&self) -> f64 {
        match self.query_pre_attn_scalar {
            Some(s) => 1.0 / s.sqrt(),
            None => 1.0 / (self.head_dim as f64).sqrt(),
        }
    }

    /// The rope base of layer `i`.
    pub fn rope_base(&self, i: usize) -> f64 {
        match (self.layer_kinds[i], self.rope_local_base_freq) {
            (LayerKind::Sliding, Some(b)) => b,
            _ => self.rope_theta,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemma3_270m_config_parses() {
        let j = r#"{"architectures":["Gemma3ForCausalLM"],"model_type":"gemma3_text","vocab_size":262144,
        "hidden_size":640,"intermediate_size":2048,"num_hidden_layers":18,"num_attention_heads":4,
        "num_key_value_heads":1,"head_dim":256,"rms_norm_eps":1e-6,"rope_theta":1000000.0,
        "rope_local_base_freq":10000.0,"sliding_window":512,"sliding_window_pattern":6,
        "query_pre_attn_scalar":256,"hidden_activation":"gelu_pytorch_tanh","final_logit_softcapping":null,
        "attn_logit_softcapping":null,"rope_scaling":null,"bos_token_id":2,"eos_token_id":[1,106],"pad_token_id":0}"#;
        let c = ModelConfig::from_json(j, Path::new("config.json")).unwrap();
        assert_eq!(c.arch, Arch::Gemma3);
        let full: Vec<usize> = (0..18)
            .filter(|&i| c.layer_kinds[i] == LayerKind::Full)
            .collect();
        assert_eq!(full, vec![5, 11, 17]);
        assert_eq!(c.rope_base(0), 1e4);
        assert_eq!(c.rope_base(5), 1e6);
        assert!(c.tie_word_embeddings);
        assert_eq!(c.eos_token_id, Some(1));
        assert!((c.attn_scale() - 1.0 / 16.0).abs() < 1e-12);
        // Round trip through the HF JSON we write.
        let again = ModelConfig::from_json(&c.to_hf_json().to_string(), Path::new("x")).unwrap();
        assert_eq!(again.layer_kinds, c.layer_kinds);
        assert_eq!(again.arch, c.arch);
    }

    #[test]
    fn unknown_architecture_is_named() {
        let e = ModelConfig::from_json(
            r#"{"model_type":"mamba","architectures":["MambaForCausalLM"]}"#,
            Path::new("m/config.json"),
        )
        .unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("unknown architecture `mamba`") && m.contains("m/config.json"),
            "{m}"
        );
        assert!(e.is_user_error());
    }

    #[test]
    fn inconsistent_heads_are_refused() {
        let j = r#"{"model_type":"llama","vocab_size":10,"hidden_size":64,"intermediate_size":128,
        "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":3}"#;
        let m = ModelConfig::from_json(j, Path::new("c.json"))
            .unwrap_err()
            .to_string();
        assert!(m.contains("not a multiple of num_key_value_heads"), "{m}");
    }

    const SMOL5: &str = r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","vocab_size":49152,
        "hidden_size":576,"intermediate_size":1536,"num_hidden_layers":30,"num_attention_heads":9,
        "num_key_value_heads":3,"rms_norm_eps":1e-5,"hidden_act":"silu","tie_word_embeddings":true,
        "rope_parameters":{"rope_theta":100000.0,"rope_type":"default"}}"#;

    fn gemma5(params: &str) -> String {
        format!(
            r#"{{"model_type":"gemma3_text","vocab_size":262144,"hidden_size":640,"intermediate_size":2048,
            "num_hidden_layers":6,"num_attention_heads":4,"num_key_value_heads":1,"head_dim":256,
            "rms_norm_eps":1e-6,"sliding_window":512,"query_pre_attn_scalar":256,
            "layer_types":["sliding_attention","sliding_attention","sliding_attention","sliding_attention","sliding_attention","full_attention"],
            "rope_parameters":{params}}}"#
        )
    }

    fn err(j: &str) -> String {
        let e = ModelConfig::from_json(j, Path::new("m/config.json")).unwrap_err();
        assert!(e.is_user_error(), "{e}");
        let m = e.to_string();
        assert!(m.contains("m/config.json"), "{m}");
        m
    }

    #[test]
    fn rope_parameters_of_transformers5_are_read() {
        // SmolLM2 saved by transformers 5: the base is 1e5, not a built-in 1e4.
        let c = ModelConfig::from_json(SMOL5, Path::new("c.json")).unwrap();
        assert_eq!(c.rope_theta, 1e5);
        // Gemma 3: one entry per layer type.
        let g = ModelConfig::from_json(
            &gemma5(
                r#"{"full_attention":{"rope_theta":1000000.0,"rope_type":"default"},
                "sliding_attention":{"rope_theta":10000.0,"rope_type":"default"}}"#,
            ),
            Path::new("c.json"),
        )
        .unwrap();
        assert_eq!((g.rope_base(0), g.rope_base(5)), (1e4, 1e6));
    }

    #[test]
    fn rope_scaling_types_that_are_not_implemented_are_refused() {
        for kind in ["linear", "dynamic", "yarn", "llama3", "longrope"] {
            let j = SMOL5.replace(
                r#""rope_type":"default""#,
                &format!(r#""rope_type":"{kind}","factor":8.0"#),
            );
            let m = err(&j);
            assert!(m.contains(kind) && m.contains("rope_type"), "{m}");
            let m = err(&gemma5(&format!(
                r#"{{"full_attention":{{"rope_theta":1e6,"rope_type":"{kind}","factor":8.0}},"sliding_attention":{{"rope_theta":1e4}}}}"#
            )));
            assert!(
                m.contains("rope_parameters.full_attention.rope_type"),
                "{m}"
            );
        }
        let m = err(&SMOL5.replace(
            r#""rope_type":"default""#,
            r#""rope_type":"default","factor":2.0"#,
        ));
        assert!(m.contains("rope_parameters.factor"), "{m}");
        let m = err(&gemma5(
            r#"{"full_attention":{"rope_theta":1e6},"chunked_attention":{"rope_theta":1e4}}"#,
        ));
        assert!(m.contains("chunked_attention"), "{m}");
    }

    #[test]
    fn keys_that_change_the_math_are_never_defaulted() {
        let no_rope = SMOL5.replace(
            r#""rope_parameters":{"rope_theta":100000.0,"rope_type":"default"}"#,
            r#""bos_token_id":1"#,
        );
        assert!(err(&no_rope).contains("rope_theta"));
        let no_eps = SMOL5.replace(r#""rms_norm_eps":1e-5,"#, "");
        assert!(err(&no_eps).contains("rms_norm_eps"));
        let no_local = gemma5(r#"{"full_attention":{"rope_theta":1e6}}"#);
        assert!(err(&no_local).contains("rope_local_base_freq"));
        let no_scalar = gemma5(
            r#"{"full_attention":{"rope_theta":1e6},"sliding_attention":{"rope_theta":1e4}}"#,
        )
        .replace(r#""query_pre_attn_scalar":256,"#, "");
        assert!(err(&no_scalar).contains("query_pre_attn_scalar"));
        let no_head = gemma5(
            r#"{"full_attention":{"rope_theta":1e6},"sliding_attention":{"rope_theta":1e4}}"#,
        )
        .replace(r#""head_dim":256,"#, "");
        assert!(err(&no_head).contains("head_dim"));
        // Both shapes at once must agree.
        let both = SMOL5.replace(
            r#""rms_norm_eps":1e-5,"#,
            r#""rms_norm_eps":1e-5,"rope_theta":10000.0,"#,
        );
        assert!(err(&both).contains("contradicts"));
        let same = SMOL5.replace(
            r#""rms_norm_eps":1e-5,"#,
            r#""rms_norm_eps":1e-5,"rope_theta":100000.0,"#,
        );
        assert_eq!(
            ModelConfig::from_json(&same, Path::new("c"))
                .unwrap()
                .rope_theta,
            1e5
        );
        let partial = SMOL5.replace(
            r#""rms_norm_eps":1e-5,"#,
            r#""rms_norm_eps":1e-5,"partial_rotary_factor":0.5,"#,
        );
        assert!(err(&partial).contains("partial_rotary_factor"));
    }
}
