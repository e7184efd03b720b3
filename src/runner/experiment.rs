//! Experiment files (`benchmarks/*.toml`): a model, tasks, languages, methods, budgets and seeds
//! in; the grid of cells (method x K x seed), each with its fully resolved training and
//! evaluation configuration and a content key, out.
//!
//! ```toml
//! name = "sib200-smoke"
//! model = "models/gemma-3-270m"
//! tasks = ["sib200"]
//! langs = ["en", "fr", "sw"]
//! methods = ["base", "lora-k", "meta-lora", "lora-full"]
//! ks = [16, 64]
//! seeds = [0]
//! [train]                 # any `mlbench train` key, for every method
//! meta_iterations = 20
//! [method.meta-lora]      # keys for one method only
//! inner_steps = 3
//! [eval]                  # split, shots, limit, batch_size, max_len
//! limit = 100
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::eval::run::EvalConfig;
use crate::train::config::Method;
use crate::train::TrainConfig;

/// Evaluation settings of an experiment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalSection {
    pub split: Option<String>,
    pub shots: usize,
    pub limit: Option<usize>,
    pub batch_size: usize,
    pub max_len: usize,
}

impl Default for EvalSection {
    fn default() -> Self {
        let d = EvalConfig::default();
        EvalSection {
            split: None,
            shots: 0,
            limit: None,
            batch_size: d.batch_size,
            max_len: d.max_len,
        }
    }
}

/// An experiment file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    pub name: String,
    pub model: String,
    pub tasks: Vec<String>,
    pub langs: Vec<String>,
    /// Training methods, plus `base` (the untrained model, evaluated once per seed set).
    pub methods: Vec<String>,
    /// Budgets for the methods that take one.
    #[serde(default)]
    pub ks: Vec<usize>,
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    #[serde(default = "default_device")]
    pub device: String,
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// Training keys for every method.
    #[serde(default)]
    pub train: toml::Table,
    /// Training keys per method.
    #[serde(default)]
    pub method: BTreeMap<String, toml::Table>,
    #[serde(default)]
    pub eval: EvalSection,
}

fn default_seeds() -> Vec<u64> {
    vec![0]
}
fn default_device() -> String {
    "cpu".into()
}
fn default_dtype() -> String {
    "f32".into()
}

/// One cell of the grid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    pub experiment: String,
    pub method: String,
    /// `None` for `base` and `lora-full`.
    pub k: Option<usize>,
    pub seed: u64,
    /// The training configuration (`None` for `base`).
    pub train: Option<TrainConfig>,
    pub eval: EvalConfig,
    /// Content key: sha256 of the experiment name, the resolved configurations and the code
    /// version.
    pub key: String,
}

impl Cell {
    /// `meta-lora/k16/s0`-style label.
    pub fn label(&self) -> String {
        match self.k {
            Some(k) => format!("{}/k{k}/s{}", self.method, self.seed),
            None => format!("{}/full/s{}", self.method, self.seed),
        }
    }
}

impl Experiment {
    /// Reads an experiment file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::missing_or_io("experiment file", "read", path, e))?;
        toml::from_str(&text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// Shrinks the grid to a few CPU minutes (nightly `--smoke`): the first seed, the smallest
    /// budget, two meta-iterations or a fifth of a pass, 20 test examples per language, and the
    /// experiment named `<name>-smoke` so its cells never mix with the full run's.
    pub fn smoke(&mut self) {
        self.name = format!("{}-smoke", self.name);
        self.seeds.truncate(1);
        if let Some(&k) = self.ks.iter().min() {
            self.ks = vec![k];
        }
        self.train
            .insert("meta_iterations".into(), toml::Value::Integer(2));
        self.train.insert("passes".into(), toml::Value::Float(0.2));
        for t in self.method.values_mut() {
            t.remove("passes");
            t.remove("meta_iterations");
        }
        self.eval.limit = Some(self.eval.limit.map_or(20, |l| l.min(20)));
    }

    /// The training configuration of one method at one budget and seed.
    fn train_config(&self, method: &str, k: Option<usize>, seed: u64) -> Result<TrainConfig> {
        let mut v = serde_json::to_value(TrainConfig::default())?;
        let obj = v.as_object_mut().expect("object");
        for t in [Some(&self.train), self.method.get(method)]
            .into_iter()
            .flatten()
        {
            for (key, val) in t {
                let j = crate::train::config::toml_to_json(key, val)
                    .map_err(|m| Error::Invalid(format!("experiment `{}`: {m}", self.name)))?;
                obj.insert(key.clone(), j);
            }
        }
        obj.insert("method".into(), method.into());
        obj.insert("model".into(), self.model.clone().into());
        obj.insert("tasks".into(), self.tasks.clone().into());
        obj.insert("langs".into(), self.langs.clone().into());
        obj.insert("k".into(), serde_json::to_value(k)?);
        obj.insert("seed".into(), seed.into());
        obj.insert("device".into(), self.device.clone().into());
        obj.insert("dtype".into(), self.dtype.clone().into());
        serde_json::from_value(v).map_err(|e| {
            Error::Invalid(format!(
                "experiment `{}`: training keys for `{method}`: {e}",
                self.name
            ))
        })
    }

    fn eval_config(&self, seed: u64) -> EvalConfig {
        EvalConfig {
            model: self.model.clone(),
            adapters: vec![],
            base: false,
            tasks: self.tasks.clone(),
            langs: self.langs.clone(),
            split: self.eval.split.clone(),
            shots: self.eval.shots,
            seed,
            batch_size: self.eval.batch_size,
            max_len: self.eval.max_len,
            limit: self.eval.limit,
            device: self.device.clone(),
            dtype: self.dtype.clone(),
        }
    }

    /// Every cell, with every problem that can be seen without data listed at once.
    pub fn cells(&self) -> Result<Vec<Cell>> {
        let mut problems = Vec::new();
        let mut cells = Vec::new();
        if self.methods.is_empty() {
            problems.push("`methods` is empty".into());
        }
        if self.seeds.is_empty() {
            problems.push("`seeds` is empty".into());
        }
        // Duplicates would put one cell in the grid twice (two shards racing on it).
        let mut dup = |what: &str, items: Vec<String>| {
            let mut seen = std::collections::BTreeSet::new();
            for i in items {
                if !seen.insert(i.clone()) {
                    problems.push(format!("`{what}` lists {i} twice"));
                }
            }
        };
        let canonical = |m: &String| Method::parse(m).map_or(m.clone(), |p| p.name().to_string());
        dup("methods", self.methods.iter().map(canonical).collect());
        dup("ks", self.ks.iter().map(|k| k.to_string()).collect());
        dup("seeds", self.seeds.iter().map(|s| s.to_string()).collect());
        for name in self.method.keys() {
            if !self.methods.contains(name) {
                problems.push(format!(
                    "[method.{name}] configures a method the grid does not run"
                ));
            }
        }
        let version = crate::util::code_version();
        for m in &self.methods {
            let (is_base, uses_k) = if m == "base" {
                (true, false)
            } else {
                match Method::parse(m) {
                    Ok(p) => (false, p.uses_pools()),
                    Err(e) => {
                        problems.push(e.to_string());
                        continue;
                    }
                }
            };
            if uses_k && self.ks.is_empty() {
                problems.push(format!("method `{m}` needs budgets: set `ks`"));
            }
            let ks: Vec<Option<usize>> = if uses_k {
                self.ks.iter().map(|&k| Some(k)).collect()
            } else {
                vec![None]
            };
            // The base model depends on the seed only through in-context examples.
            let seeds: Vec<u64> = if is_base && self.eval.shots == 0 {
                self.seeds.iter().take(1).copied().collect()
            } else {
                self.seeds.clone()
            };
            for k in ks {
                for &seed in &seeds {
                    let train = if is_base {
                        None
                    } else {
                        match self.train_config(m, k, seed) {
                            Ok(c) => {
                                for p in c.problems() {
                                    let msg = format!("{m} k={k:?} seed {seed}: {p}");
                                    if !problems.contains(&msg) {
                                        problems.push(msg);
                                    }
                                }
                                Some(c)
                            }
                            Err(e) => {
                                problems.push(e.to_string());
                                continue;
                            }
                        }
                    };
                    let eval = self.eval_config(seed);
                    for p in eval.problems() {
                        let msg = format!("[eval]: {p}");
                        if !problems.contains(&msg) {
                            problems.push(msg);
                        }
                    }
                    let key = crate::util::sha256_hex(&serde_json::to_vec(&serde_json::json!({
                        "experiment": self.name, "method": m, "k": k, "seed": seed,
                        "train": train, "eval": eval,
                        "code": version,
                    }))?)[..16]
                        .to_string();
                    cells.push(Cell {
                        experiment: self.name.clone(),
                        method: m.clone(),
                        k,
                        seed,
                        train,
                        eval,
                        key,
                    });
                }
            }
        }
        if !problems.is_empty() {
            return Err(Error::Problems {
                context: format!("experiment `{}`", self.name),
                problems,
            });
        }
        // Run order: seed by seed, so a grid stopped part-way holds whole comparisons for its
        // first seeds; within a seed the two references (the base model, then the full-data
        // methods), then budgets from small to large. The sort is stable: methods keep their
        // declared order.
        cells.sort_by_key(|c| {
            let rank = match (&c.train, c.k) {
                (None, _) => 0,
                (Some(_), None) => 1,
                (Some(_), Some(k)) => 2 + k,
            };
            (c.seed, rank)
        });
        Ok(cells)
    }
}

/// Parses `i/N` (0-based shard `i` of `N`).
pub fn parse_shard(s: &str) -> Result<(usize, usize)> {
    let bad = || Error::Invalid(format!("--shard `{s}`: expected i/N with 0 <= i < N"));
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    let (i, n): (usize, usize) = (
        i.trim().parse().map_err(|_| bad())?,
        n.trim().parse().map_err(|_| bad())?,
    );
    if n == 0 || i >= n {
        return Err(bad());
    }
    Ok((i, n))
}

/// The cells of shard `i` of `n`: cells ranked by key, every `n`-th from `i`, returned in the
/// grid's run order. Every cell is in exactly one shard, whatever order the grid was declared in.
pub fn shard(cells: &[Cell], i: usize, n: usize) -> Vec<Cell> {
    let mut keys: Vec<&str> = cells.iter().map(|c| c.key.as_str()).collect();
    keys.sort_unstable();
    let mine: std::collections::HashSet<&str> = keys
        .into_iter()
        .enumerate()
        .filter(|(j, _)| j % n == i)
        .map(|(_, k)| k)
        .collect();
    cells
        .iter()
        .filter(|c| mine.contains(c.key.as_str()))
        .cloned()
        .collect()
}
