//! Checkpoints: the whole mutable state of a run (phase, step, adapter weights, optimizer
//! moments, counters and the step log so far) in a folder `checkpoint/` that is replaced
//! atomically: written beside it as `checkpoint.tmp/`, then swapped in by renames, so a crash at
//! any moment leaves either the old or the new checkpoint whole.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::optim::{AdamParams, AdamW};
use crate::error::{Error, Result};
use crate::model::lora::{read_safetensors, Adapter};
use crate::util::write_bytes_atomic;

/// An `f64` that JSON may hold as `null` (serde_json writes NaN so): `null` reads as NaN.
fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// One row of the per-step log (`log.parquet`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LogRow {
    /// Optimizer step (meta-iteration for meta methods), 0-based, within its phase.
    pub step: u64,
    /// The task unit (empty for rows about a whole shared step).
    pub task: String,
    /// `train`, `support`, `query`, `outer` or `adapt`.
    pub stage: String,
    /// Stage-1 step index (0 elsewhere).
    pub inner: u32,
    /// NaN on rows without a loss (`dev` rows), which JSON writes as `null`: read back as NaN, so
    /// a checkpoint taken after a dev evaluation resumes.
    #[serde(deserialize_with = "nan_if_null")]
    pub loss: f64,
    pub lr: Option<f64>,
    pub grad_norm: Option<f64>,
    /// Tokens run through the model (prompt + answer).
    pub tokens: u64,
    pub seconds: f64,
    /// L2 norm of a weight change: on the last `support` row of a task, the inner displacement
    /// `|theta_i - theta|`; on `outer` and `train` rows, the optimizer update `|theta' - theta|`.
    #[serde(default)]
    pub norm: Option<f64>,
    /// On `dev` rows: the dev-split score of the adapter after `step` steps.
    #[serde(default)]
    pub dev: Option<f64>,
}

/// Examples and tokens a task unit contributed to gradients.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Seen {
    /// Example visits: appearances of an example in a batch, a support or query set, or an
    /// adaptation set (a support set counts once per meta-iteration, whatever `inner_steps`).
    pub examples: u64,
    /// Tokens forwarded (prompt + answer), every inner and adaptation step included.
    pub tokens: u64,
    pub answer_tokens: u64,
    /// Sequences forwarded (and backpropagated): a support example counts once per inner step.
    #[serde(default)]
    pub sequences: u64,
}

impl Seen {
    pub fn add(&mut self, o: &Seen) {
        self.examples += o.examples;
        self.tokens += o.tokens;
        self.answer_tokens += o.answer_tokens;
        self.sequences += o.sequences;
    }
}

/// Scalar part of a checkpoint (`state.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    /// Fingerprint of the configuration the run was started with.
    pub config_hash: String,
    /// Phase: 0 is the main training; per-task methods count units from 0 as well, and
    /// `meta-lora+tta` numbers its adaptation phases 1..=N.
    pub phase: usize,
    /// Steps done in the phase.
    pub step: usize,
    pub adam_t: u64,
    pub seen: BTreeMap<String, Seen>,
    pub log: Vec<LogRow>,
    /// Wall seconds of the run before this checkpoint.
    pub elapsed: f64,
    /// Counts per kind of phase: `main` (training) and `adapt` (the adaptation phases of
    /// `stage1-only` and `meta-lora+tta`).
    #[serde(default)]
    pub by_phase: BTreeMap<String, Seen>,
    /// Early stopping: the best dev score so far and the step it was reached at.
    #[serde(default)]
    pub dev_best: Option<(u64, f64)>,
    /// Early stopping: dev evaluations since the best one.
    #[serde(default)]
    pub since_best: u64,
}

/// Where a run's checkpoint lives.
pub fn dir(out: &Path) -> PathBuf {
    out.join("checkpoint")
}

/// Writes a checkpoint of `adapter`, `opt` and `meta` atomically.
pub fn save(out: &Path, adapter: &Adapter, opt: Option<&AdamW>, meta: &Meta) -> Result<()> {
    let final_dir = dir(out);
    let tmp = out.join("checkpoint.tmp");
    let old = out.join("checkpoint.old");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io("remove", &tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io("create directory", &tmp, e))?;
    let mut t: BTreeMap<String, Tensor> = BTreeMap::new();
    for (name, p) in &adapter.pairs {
        t.insert(format!("adapter.{name}.A"), p.a.as_tensor().clone());
        t.insert(format!("adapter.{name}.B"), p.b.as_tensor().clone());
    }
    if let Some(o) = opt {
        for (i, (m, v)) in o.m.iter().zip(&o.v).enumerate() {
            t.insert(format!("adam.{i:05}.m"), m.clone());
            t.insert(format!("adam.{i:05}.v"), v.clone());
        }
    }
    crate::model::load::save_safetensors(&tmp.join("state.safetensors"), &t)?;
    write_bytes_atomic(&tmp.join("state.json"), &serde_json::to_vec(meta)?)?;
    if final_dir.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| Error::io("remove", &old, e))?;
        }
        std::fs::rename(&final_dir, &old).map_err(|e| Error::io("rename", &final_dir, e))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io("rename", &tmp, e))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| Error::io("remove", &old, e))?;
    }
    Ok(())
}

/// The checkpoint folder to resume from: `checkpoint/`, or `checkpoint.old/` when a crash
/// happened between the two renames of [`save`].
pub fn find(out: &Path) -> Option<PathBuf> {
    [dir(out), out.join("checkpoint.old")]
        .into_iter()
        .find(|d| d.join("state.json").exists() && d.join("state.safetensors").exists())
}

/// Reads a checkpoint into `adapter` (same modules and shapes) and returns the optimizer
/// (when one was saved) and the scalar state.
pub fn load(
    ckpt: &Path,
    adapter: &Adapter,
    adam: Option<AdamParams>,
    device: &Device,
) -> Result<(Option<AdamW>, Meta)> {
    let jp = ckpt.join("state.json");
    let text = std::fs::read_to_string(&jp)
        .map_err(|e| Error::missing_or_io("checkpoint", "read", &jp, e))?;
    let meta: Meta = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: jp.clone(),
        message: format!("not a checkpoint state: {e}"),
    })?;
    let sp = ckpt.join("state.safetensors");
    let tensors: BTreeMap<String, Tensor> = read_safetensors(&sp, device)?.into_iter().collect();
    let bad = |m: String| Error::Config {
        path: sp.clone(),
        message: m,
    };
    for (name, p) in &adapter.pairs {
        for (which, var) in [("A", &p.a), ("B", &p.b)] {
            let key = format!("adapter.{name}.{which}");
            let t = tensors
                .get(&key)
                .ok_or_else(|| bad(format!("missing tensor `{key}`")))?;
            if t.dims() != var.dims() {
                return Err(bad(format!(
                    "tensor `{key}` has shape {:?}, the adapter needs {:?}",
                    t.dims(),
                    var.dims()
                )));
            }
            var.set(&t.to_dtype(var.dtype())?)?;
        }
    }
    let opt = match adam {
        None => None,
        Some(params) => {
            let vars = adapter.vars();
            let mut o = AdamW::new(&vars, params)?;
            o.t = meta.adam_t;
            for (i, v) in vars.iter().enumerate() {
                for (which, slot) in [("m", &mut o.m[i]), ("v", &mut o.v[i])] {
                    let key = format!("adam.{i:05}.{which}");
                    let t = tensors
                        .get(&key)
                        .ok_or_else(|| bad(format!("missing tensor `{key}`")))?;
                    if t.dims() != v.dims() {
                        return Err(bad(format!("tensor `{key}` has the wrong shape")));
                    }
                    *slot = t.clone();
                }
            }
            Some(o)
        }
    };
    Ok((opt, meta))
}

#[cfg(test)]
mod nan_rows {
    use super::LogRow;

    #[test]
    fn a_dev_row_without_a_loss_survives_the_json_round_trip() {
        let row = LogRow {
            step: 200,
            stage: "dev".into(),
            loss: f64::NAN,
            dev: Some(0.61),
            ..Default::default()
        };
        let text = serde_json::to_string(&row).unwrap();
        assert!(text.contains("\"loss\":null"), "{text}");
        let back: LogRow = serde_json::from_str(&text).unwrap();
        assert!(back.loss.is_nan());
        assert_eq!(back.dev, Some(0.61));
        let train: LogRow = serde_json::from_str(
            &serde_json::to_string(&LogRow {
                loss: 1.25,
                ..Default::default()
            })
            .unwrap(),
        )
        .unwrap();
        assert_eq!(train.loss, 1.25);
    }
}
