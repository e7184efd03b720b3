//! LoRA adapters with Hugging Face PEFT semantics.
//!
//! For a target linear layer `y = x W^T (+ b)` with `W: [out, in]`, an adapter adds
//! `scaling * dropout(x) A^T B^T` with `A: [r, in]`, `B: [out, r]` and
//! `scaling = alpha / r` (or `alpha / sqrt(r)` with rsLoRA). PEFT's default init draws
//! `A ~ U(-1/sqrt(in), 1/sqrt(in))` and sets `B = 0`, so a fresh adapter changes nothing.
//! Merging computes `W + scaling * B A`.
//!
//! In: a [`LoraConfig`] and the model's linear modules (for a fresh adapter), or a PEFT folder
//! (`adapter_config.json` + `adapter_model.safetensors`). Out: an [`Adapter`] whose `A`/`B` are
//! candle `Var`s (trainable), or a PEFT folder written atomically.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::util::{write_bytes_atomic, Rng};

/// Which modules an adapter targets: PEFT's `target_modules` (a list matches a module whose
/// full name equals an entry or ends with `.` + entry; a string is a full-match regex).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Targets {
    List(Vec<String>),
    Regex(String),
}

impl Targets {
    /// Does module `name` (e.g. `model.layers.0.self_attn.q_proj`) match?
    pub fn matches(&self, name: &str) -> Result<bool> {
        Ok(match self {
            Targets::List(v) => v
                .iter()
                .any(|t| name == t || name.ends_with(&format!(".{t}"))),
            Targets::Regex(r) => {
                let re = regex::Regex::new(&format!("^(?:{r})$"))
                    .map_err(|e| Error::Invalid(format!("target_modules regex `{r}`: {e}")))?;
                re.is_match(name)
            }
        })
    }
}

/// LoRA hyper-parameters, serialised as PEFT's `adapter_config.json` (long-standing keys only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub target_modules: Targets,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.05,
            target_modules: Targets::List(vec![
                "q_proj".into(),
                "k_proj".into(),
                "v_proj".into(),
                "o_proj".into(),
            ]),
            use_rslora: false,
            base_model_name_or_path: None,
        }
    }
}

impl LoraConfig {
    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    /// Checks the hyper-parameters.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(Error::Invalid("LoRA rank r must be at least 1".into()));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(Error::Invalid(format!(
                "lora_dropout {} must be in [0, 1)",
                self.lora_dropout
            )));
        }
        Ok(())
    }

    /// Checks that rank `r` fits every module the targets match: `r <= min(in, out)` (a larger
    /// rank adds no capacity, only memory). Called before any weight is allocated.
    pub fn fits(&self, modules: &[ModuleInfo]) -> std::result::Result<(), String> {
        let mut smallest: Option<(&str, usize)> = None;
        for m in modules {
            if self
                .target_modules
                .matches(&m.name)
                .map_err(|e| e.to_string())?
            {
                let d = m.in_features.min(m.out_features);
                if smallest.is_none_or(|(_, s)| d < s) {
                    smallest = Some((&m.name, d));
                }
            }
        }
        match smallest {
            Some((name, d)) if self.r > d => Err(format!(
                "lora_r = {} is larger than the smallest targeted module allows ({name}: min(in, out) = {d})",
                self.r
            )),
            _ => Ok(()),
        }
    }

    fn peft_json(&self) -> serde_json::Value {
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": self.target_modules,
            "bias": "none",
            "fan_in_fan_out": false,
            "base_model_name_or_path": self.base_model_name_or_path,
            "inference_mode": true,
            "use_rslora": self.use_rslora,
        })
    }
}

/// One target module's trainable pair.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// `[r, in]`
    pub a: Var,
    /// `[out, r]`
    pub b: Var,
}

/// A named LoRA adapter: its config and one pair per targeted module path.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub name: String,
    pub config: LoraConfig,
    pub pairs: BTreeMap<String, LoraPair>,
}

/// A linear module an adapter can target: its full PEFT-style name and `(out, in)`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleInfo {
    pub name: String,
    pub out_features: usize,
    pub in_features: usize,
}

const PREFIX: &str = "base_model.model.";

impl Adapter {
    /// A fresh adapter with PEFT's default init, drawn from `seed` (A uniform, B zero).
    pub fn new(
        name: &str,
        config: LoraConfig,
        modules: &[ModuleInfo],
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        config.validate()?;
        config.fits(modules).map_err(Error::Invalid)?;
        let mut pairs = BTreeMap::new();
        let mut rng = Rng::new(seed);
        for m in modules {
            if !config.target_modules.matches(&m.name)? {
                continue;
            }
            let bound = 1.0 / (m.in_features as f64).sqrt();
            let a: Vec<f32> = (0..config.r * m.in_features)
                .map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32)
                .collect();
            let a = Tensor::from_vec(a, (config.r, m.in_features), device)?.to_dtype(dtype)?;
            let b = Tensor::zeros((m.out_features, config.r), dtype, device)?;
            pairs.insert(
                m.name.clone(),
                LoraPair {
                    a: Var::from_tensor(&a)?,
                    b: Var::from_tensor(&b)?,
                },
            );
        }
        if pairs.is_empty() {
            return Err(Error::Invalid(format!(
                "target_modules {:?} match no linear module of the model (modules look like `{}`)",
                config.target_modules,
                modules.first().map(|m| m.name.as_str()).unwrap_or("?")
            )));
        }
        Ok(Adapter {
            name: name.to_string(),
            config,
            pairs,
        })
    }

    /// The trainable variables, in a stable order (module name, then A before B).
    pub fn vars(&self) -> Vec<Var> {
        self.pairs
            .values()
            .flat_map(|p| [p.a.clone(), p.b.clone()])
            .collect()
    }

    /// Number of trainable parameters.
    pub fn num_params(&self) -> usize {
        self.pairs
            .values()
            .map(|p| p.a.elem_count() + p.b.elem_count())
            .sum()
    }

    /// Writes a PEFT folder: `adapter_config.json` and `adapter_model.safetensors` (f32, with
    /// header metadata `{"format": "pt"}`), both atomically.
    pub fn save_peft(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("create directory", dir, e))?;
        let mut tensors: Vec<(String, Vec<u8>, Vec<usize>)> = Vec::new();
        for (name, p) in &self.pairs {
            for (which, t) in [("lora_A", p.a.as_tensor()), ("lora_B", p.b.as_tensor())] {
                let f: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                let bytes: Vec<u8> = f.iter().flat_map(|x| x.to_le_bytes()).collect();
                tensors.push((
                    format!("{PREFIX}{name}.{which}.weight"),
                    bytes,
                    t.dims().to_vec(),
                ));
            }
        }
        let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
            .iter()
            .map(|(n, b, s)| {
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| Error::Internal(format!("safetensors view {n}: {e}")))
            })
            .collect::<Result<_>>()?;
        let meta: std::collections::HashMap<String, String> =
            [("format".to_string(), "pt".to_string())].into();
        let bytes = safetensors::serialize(views, Some(meta))
            .map_err(|e| Error::Internal(format!("serialising adapter: {e}")))?;
        write_bytes_atomic(&dir.join("adapter_model.safetensors"), &bytes)?;
        let cfg = serde_json::to_vec_pretty(&self.config.peft_json())?;
        write_bytes_atomic(&dir.join("adapter_config.json"), &cfg)?;
        Ok(())
    }

    /// Loads a PEFT folder strictly against the model's `modules`: unsupported options are
    /// refused by name; every key must be `base_model.model.<module>.lora_{A,B}.weight` of a
    /// linear module of the model, with its partner present, shapes `[r, in]` / `[out, r]` and
    /// every value finite.
    pub fn load_peft(
        dir: &Path,
        name: &str,
        modules: &[ModuleInfo],
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let config = read_peft_config(&dir.join("adapter_config.json"))?;
        let st_path = dir.join("adapter_model.safetensors");
        if !st_path.exists() && dir.join("adapter_model.bin").exists() {
            return Err(Error::Config {
                path: dir.join("adapter_model.bin"),
                message: "pickled adapter weights are refused; save the adapter with safetensors"
                    .into(),
            });
        }
        let halves = read_halves(&st_path, &config, modules, dtype, device)?;
        let pairs = pair_halves(halves, &st_path)?;
        if pairs.is_empty() {
            return Err(Error::Config {
                path: st_path,
                message: "the adapter holds no LoRA weights".into(),
            });
        }
        Ok(Adapter {
            name: name.to_string(),
            config,
            pairs,
        })
    }
}

/// A PEFT `adapter_config.json` read into a checked [`LoraConfig`]; options mlbench does not
/// implement are refused by name.
fn read_peft_config(cfg_path: &Path) -> Result<LoraConfig> {
    let text = std::fs::read_to_string(cfg_path)
        .map_err(|e| Error::missing_or_io("adapter_config.json", "read", cfg_path, e))?;
    let raw: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: cfg_path.to_path_buf(),
        message: format!("not JSON: {e}"),
    })?;
    let bad = |m: String| Error::Config {
        path: cfg_path.to_path_buf(),
        message: m,
    };
    refuse_peft_options(&raw).map_err(bad)?;
    let get = |k: &str| raw.get(k).filter(|v| !v.is_null());
    let config = LoraConfig {
        r: get("r")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| bad("missing integer `r`".into()))? as usize,
        lora_alpha: get("lora_alpha")
            .and_then(|v| v.as_f64())
            .ok_or_else(|| bad("missing `lora_alpha`".into()))?,
        lora_dropout: get("lora_dropout").and_then(|v| v.as_f64()).unwrap_or(0.0),
        target_modules: match get("target_modules") {
            Some(v) => serde_json::from_value(v.clone())
                .map_err(|e| bad(format!("target_modules: {e}")))?,
            None => return Err(bad("missing `target_modules`".into())),
        },
        use_rslora: get("use_rslora").and_then(|v| v.as_bool()).unwrap_or(false),
        base_model_name_or_path: get("base_model_name_or_path")
            .and_then(|v| v.as_str())
            .map(str::to_string),
    };
    config.validate().map_err(|e| bad(e.to_string()))?;
    Ok(config)
}

/// Refuses the PEFT options that change what an adapter computes and that mlbench does not
/// implement (another PEFT type, DoRA, trained biases, transposed weights, per-layer or
/// per-module settings); the message names the option.
fn refuse_peft_options(raw: &serde_json::Value) -> std::result::Result<(), String> {
    let get = |k: &str| raw.get(k).filter(|v| !v.is_null());
    if let Some(t) = get("peft_type").and_then(|v| v.as_str()) {
        if t != "LORA" {
            return Err(format!("peft_type `{t}` is not supported (only LORA)"));
        }
    }
    if get("use_dora").and_then(|v| v.as_bool()) == Some(true) {
        return Err("use_dora = true (DoRA) is not supported".into());
    }
    if let Some(b) = get("bias").and_then(|v| v.as_str()) {
        if b != "none" {
            return Err(format!("bias = \"{b}\" is not supported (only \"none\")"));
        }
    }
    if get("fan_in_fan_out").and_then(|v| v.as_bool()) == Some(true) {
        return Err("fan_in_fan_out = true is not supported".into());
    }
    for k in [
        "modules_to_save",
        "layers_to_transform",
        "layer_replication",
        "megatron_config",
    ] {
        if get(k).is_some_and(|v| !(v.is_array() && v.as_array().is_some_and(|a| a.is_empty()))) {
            return Err(format!("`{k}` is not supported"));
        }
    }
    for k in ["rank_pattern", "alpha_pattern"] {
        if get(k).is_some_and(|v| v.as_object().is_some_and(|o| !o.is_empty())) {
            return Err(format!("`{k}` is not supported"));
        }
    }
    Ok(())
}

/// The `A` and `B` halves found for each module.
type Halves = BTreeMap<String, (Option<Tensor>, Option<Tensor>)>;

/// An error about the tensor `key` of the adapter weights file `st_path`.
fn key_error(st_path: &Path, key: &str, message: String) -> Error {
    Error::Config {
        path: st_path.to_path_buf(),
        message: format!("key `{key}`: {message}"),
    }
}

/// The adapter's tensors by module, each key checked to name a LoRA half of one of the model's
/// linear `modules`, with the shape rank `r` implies and finite values; converted to `dtype`.
fn read_halves(
    st_path: &Path,
    config: &LoraConfig,
    modules: &[ModuleInfo],
    dtype: DType,
    device: &Device,
) -> Result<Halves> {
    let tensors = read_safetensors(st_path, device)?;
    let by_name: BTreeMap<&str, &ModuleInfo> =
        modules.iter().map(|m| (m.name.as_str(), m)).collect();
    let mut halves = Halves::new();
    for (key, t) in tensors {
        let (module, which) = split_key(&key).map_err(|m| key_error(st_path, &key, m))?;
        let info = by_name.get(module).ok_or_else(|| {
            key_error(
                st_path,
                &key,
                format!("module `{module}` is not a linear module of the model"),
            )
        })?;
        let dims = t.dims().to_vec();
        let (want, shown) = if which == 'A' {
            (vec![config.r, info.in_features], "[r, in]")
        } else {
            (vec![info.out_features, config.r], "[out, r]")
        };
        if dims != want {
            return Err(key_error(
                st_path,
                &key,
                format!("shape {dims:?} does not fit the module: expected {want:?} {shown} (transposed or wrong rank?)"),
            ));
        }
        check_finite(&t, st_path, &key)?;
        let e = halves.entry(module.to_string()).or_default();
        if which == 'A' {
            e.0 = Some(t.to_dtype(dtype)?);
        } else {
            e.1 = Some(t.to_dtype(dtype)?);
        }
    }
    Ok(halves)
}

/// `(module, 'A' or 'B')` of a key `base_model.model.<module>.lora_{A,B}.weight`.
fn split_key(key: &str) -> std::result::Result<(&str, char), String> {
    let rest = key
        .strip_prefix(PREFIX)
        .ok_or_else(|| format!("does not start with `{PREFIX}`"))?;
    if let Some(m) = rest.strip_suffix(".lora_A.weight") {
        Ok((m, 'A'))
    } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
        Ok((m, 'B'))
    } else {
        Err("is not a lora_A/lora_B weight".into())
    }
}

/// One trainable pair per module; a half without its partner is an error naming the missing
/// key.
fn pair_halves(halves: Halves, st_path: &Path) -> Result<BTreeMap<String, LoraPair>> {
    let mut pairs = BTreeMap::new();
    for (module, (a, b)) in halves {
        match (a, b) {
            (Some(a), Some(b)) => {
                pairs.insert(
                    module,
                    LoraPair {
                        a: Var::from_tensor(&a)?,
                        b: Var::from_tensor(&b)?,
                    },
                );
            }
            (Some(_), None) => {
                return Err(key_error(
                    st_path,
                    &format!("{PREFIX}{module}.lora_B.weight"),
                    "missing (lora_A is present)".into(),
                ))
            }
            (None, _) => {
                return Err(key_error(
                    st_path,
                    &format!("{PREFIX}{module}.lora_A.weight"),
                    "missing (lora_B is present)".into(),
                ))
            }
        }
    }
    Ok(pairs)
}

/// Refuses a tensor holding a NaN or an infinity, naming `file`, the tensor `name` and the first
/// bad flat index. f32 CPU tensors are scanned in place; others through an f32 copy.
pub fn check_finite(t: &Tensor, file: &Path, name: &str) -> Result<()> {
    let first_bad = |v: &[f32]| v.iter().position(|x| !x.is_finite()).map(|i| (i, v[i]));
    let found = if t.dtype() == DType::F32 && t.device().is_cpu() && t.is_contiguous() {
        let (storage, layout) = t.storage_and_layout();
        match &*storage {
            candle_core::Storage::Cpu(c) => {
                let o = layout.start_offset();
                first_bad(&c.as_slice::<f32>()?[o..o + t.elem_count()])
            }
            _ => None,
        }
    } else {
        first_bad(&t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    };
    match found {
        None => Ok(()),
        Some((i, v)) => Err(Error::Config {
            path: file.to_path_buf(),
            message: format!(
                "tensor `{name}` holds {v} at flat index {i}: weights must be finite numbers"
            ),
        }),
    }
}

/// Reads a safetensors file with every header size and offset checked (by the safetensors
/// crate) before tensors are built. Errors name the file.
pub fn read_safetensors(path: &Path, device: &Device) -> Result<Vec<(String, Tensor)>> {
    let bytes = std::fs::read(path)
        .map_err(|e| Error::missing_or_io("safetensors file", "read", path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        message: format!("not a valid safetensors file: {e}"),
    })?;
    let mut out = Vec::new();
    let mut names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
    names.sort();
    for n in names {
        let view = st.tensor(&n).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            message: format!("tensor `{n}`: {e}"),
        })?;
        out.push((
            n.clone(),
            view_to_tensor(&view, device).map_err(|e| Error::Config {
                path: path.to_path_buf(),
                message: format!("tensor `{n}`: {e}"),
            })?,
        ));
    }
    Ok(out)
}

/// Builds a candle tensor from a safetensors view (f32, f16, bf16, f64).
pub fn view_to_tensor(view: &safetensors::tensor::TensorView, device: &Device) -> Result<Tensor> {
    let dtype = match view.dtype() {
        safetensors::Dtype::F32 => DType::F32,
        safetensors::Dtype::F16 => DType::F16,
        safetensors::Dtype::BF16 => DType::BF16,
        safetensors::Dtype::F64 => DType::F64,
        other => return Err(Error::Invalid(format!("unsupported dtype {other:?}"))),
    };
    Ok(Tensor::from_raw_buffer(
        view.data(),
        dtype,
        view.shape(),
        device,
    )?)
}
