//! The evaluation configuration: the keys `mlbench eval`'s flags and an experiment's `[eval]`
//! section fill, their one set of defaults, and the checks that need neither data nor model
//! (every problem listed at once). Serialised into every evaluation's `results.json` and into
//! the cell keys of a grid. [`BatchSize`] is `batch_size`: a number, or `auto` (written as the
//! string `"auto"`; a number stays a number). [`EvalPlan`] is what an evaluation takes: the
//! configuration with its tasks opened against the data folder.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::device::{DeviceSpec, Precision};

/// `batch_size`: a number of examples per forward pass, or `auto`. Serialised as the number
/// or the string `"auto"`, so configurations with a number read and write as before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchSize {
    Fixed(usize),
    /// The largest size that fits the device, up to [`crate::eval::batch::CEILING`].
    Auto,
}

impl BatchSize {
    /// The number given, or `None` for `auto`.
    pub fn fixed(self) -> Option<usize> {
        match self {
            BatchSize::Fixed(n) => Some(n),
            BatchSize::Auto => None,
        }
    }
}

impl std::fmt::Display for BatchSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BatchSize::Fixed(n) => write!(f, "{n}"),
            BatchSize::Auto => f.write_str("auto"),
        }
    }
}

impl std::str::FromStr for BatchSize {
    type Err = String;

    /// A whole number or `auto`, as `--batch-size` takes it.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "auto" => Ok(BatchSize::Auto),
            t => t
                .parse()
                .map(BatchSize::Fixed)
                .map_err(|_| format!("`{s}` is neither a number of examples nor `auto`")),
        }
    }
}

impl Serialize for BatchSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            BatchSize::Fixed(n) => s.serialize_u64(*n as u64),
            BatchSize::Auto => s.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for BatchSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(BatchSizeVisitor)
    }
}

/// Reads a non-negative whole number or the string `"auto"`.
#[derive(Clone, Copy)]
struct BatchSizeVisitor;

impl serde::de::Visitor<'_> for BatchSizeVisitor {
    type Value = BatchSize;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a number of examples or \"auto\"")
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<BatchSize, E> {
        usize::try_from(v)
            .map(BatchSize::Fixed)
            .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<BatchSize, E> {
        u64::try_from(v)
            .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
            .and_then(|u| self.visit_u64(u))
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<BatchSize, E> {
        match v {
            "auto" => Ok(BatchSize::Auto),
            _ => Err(E::invalid_value(serde::de::Unexpected::Str(v), &self)),
        }
    }
}

/// What to evaluate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalConfig {
    pub model: String,
    /// Adapter folders (PEFT) or training run folders; `NAME=PATH` names one.
    pub adapters: Vec<String>,
    /// Evaluate the base model too.
    pub base: bool,
    pub tasks: Vec<String>,
    pub langs: Vec<String>,
    /// Split to evaluate (default: each task's `eval_split`).
    pub split: Option<String>,
    /// In-context examples per prompt (from the task's few-shot split).
    pub shots: usize,
    pub seed: u64,
    /// Examples per forward pass, or `auto`: the largest that fits, chosen once the model is
    /// loaded ([`crate::eval::batch`]).
    pub batch_size: BatchSize,
    /// Longest input in tokens (contexts lose tokens from the left beyond it).
    pub max_len: usize,
    /// At most N examples per task x language (a label-stratified subset, the same for every run).
    pub limit: Option<usize>,
    /// At most this fraction of each task x language's examples, rounded up (the same subset
    /// as `limit` with that count; lm-evaluation-harness's fractional `--limit`). Not with
    /// `limit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_fraction: Option<f64>,
    pub device: DeviceSpec,
    pub dtype: Precision,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            model: String::new(),
            adapters: vec![],
            base: true,
            tasks: vec![],
            langs: vec![],
            split: None,
            shots: 0,
            seed: 0,
            batch_size: BatchSize::Fixed(16),
            max_len: 2048,
            limit: None,
            limit_fraction: None,
            device: DeviceSpec::Cpu,
            dtype: Precision::F32,
        }
    }
}

impl EvalConfig {
    /// Everything that can be checked without data or model, listed at once: sizes in range,
    /// a limit of at least one example, a model named.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        for (name, v, min, max) in [
            // `auto` picks a size in range itself.
            (
                "batch_size",
                self.batch_size.fixed().unwrap_or(1),
                1,
                1 << 16,
            ),
            ("max_len", self.max_len, 8, 1 << 17),
            ("limit", self.limit.unwrap_or(1), 1, usize::MAX),
            ("shots", self.shots, 0, 64),
        ] {
            if v < min || v > max {
                p.push(if max == usize::MAX {
                    format!("{name} = {v} must be at least {min}")
                } else {
                    format!("{name} = {v} must be in {min}..={max}")
                });
            }
        }
        if let Some(f) = self.limit_fraction {
            if !(f > 0.0 && f < 1.0) {
                p.push(format!("a fractional limit must be in (0, 1), got {f}"));
            }
            if self.limit.is_some() {
                p.push("give a limit as a count or as a fraction, not both".into());
            }
        }
        if self.model.trim().is_empty() {
            p.push("no model: give --model (an HF folder or a Hub id)".into());
        }
        p
    }

    /// How many of `n` examples of one task x language the limit keeps (`None`: all).
    pub fn cap(&self, n: usize) -> Option<usize> {
        let cap = match (self.limit, self.limit_fraction) {
            (Some(c), _) => c,
            (None, Some(f)) => ((f * n as f64).ceil() as usize).max(1),
            (None, None) => return None,
        };
        (cap < n).then_some(cap)
    }

    /// The model is a folder here or an `owner/name` Hub id (what can be known without
    /// loading or fetching it).
    pub fn model_problem(&self) -> Option<String> {
        let local = Path::new(&self.model);
        (!local.is_dir() && !crate::model::hub::is_hub_id(&self.model)).then(|| {
            format!(
                "model folder not found: {} (and it is not an owner/name Hub id)",
                local.display()
            )
        })
    }
}

/// An evaluation resolved before any work: the configuration with every problem that needs no
/// data checked, and its tasks opened against the data folder. What
/// [`crate::eval::run::evaluate`] accepts.
pub struct EvalPlan {
    pub config: EvalConfig,
    pub data_dir: std::path::PathBuf,
    pub tasks: Vec<crate::tasks::OpenedTask>,
}

impl EvalPlan {
    /// Checks `config` and opens its tasks, listing every problem at once.
    pub fn resolve(data_dir: &Path, config: EvalConfig) -> crate::error::Result<EvalPlan> {
        let (plan, problems) = EvalPlan::open(data_dir, config)?;
        if !problems.is_empty() {
            return Err(crate::error::Error::Problems {
                context: "the evaluation".into(),
                problems,
            });
        }
        Ok(plan)
    }

    /// The plan with what could be opened (unknown tasks and languages left out) and the
    /// problems found, for a caller that goes on to collect the data's problems too.
    pub fn open(
        data_dir: &Path,
        config: EvalConfig,
    ) -> crate::error::Result<(EvalPlan, Vec<String>)> {
        let mut problems = config.problems();
        let tasks =
            crate::tasks::open_tasks(data_dir, &config.tasks, &config.langs, &mut problems)?;
        let plan = EvalPlan {
            config,
            data_dir: data_dir.to_path_buf(),
            tasks,
        };
        Ok((plan, problems))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Layers;

    #[test]
    fn batch_size_is_a_number_or_auto_and_a_number_serialises_as_before() {
        let mut c = EvalConfig::default();
        assert_eq!(serde_json::to_value(&c).unwrap()["batch_size"], 16);
        c.batch_size = BatchSize::Auto;
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["batch_size"], "auto");
        assert_eq!(serde_json::from_value::<EvalConfig>(v).unwrap(), c);
        let t: toml::Table = toml::from_str("batch_size = 8").unwrap();
        let mut l = Layers::new();
        l.table(&crate::plan::Source("x.toml [eval]".into()), &t);
        let c: EvalConfig = l.resolve("the evaluation", &[]).unwrap();
        assert_eq!(c.batch_size, BatchSize::Fixed(8));
        assert_eq!("auto".parse(), Ok(BatchSize::Auto));
        assert_eq!("32".parse(), Ok(BatchSize::Fixed(32)));
    }

    #[test]
    fn a_misspelt_batch_size_is_refused_naming_the_key() {
        for bad in [
            serde_json::json!("atuo"),
            serde_json::json!(-1),
            serde_json::json!(2.5),
        ] {
            let mut l = Layers::new();
            l.value("x.toml [eval]", "batch_size", bad.clone());
            let e = l
                .resolve::<EvalConfig>("the evaluation", &[])
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("x.toml [eval]: `batch_size`") && e.contains("\"auto\""),
                "{bad}: {e}"
            );
        }
        assert!("atuo".parse::<BatchSize>().unwrap_err().contains("atuo"));
    }
}
