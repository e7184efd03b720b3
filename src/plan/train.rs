//! The training configuration: one struct that a TOML file or the command line fills, every
//! default of `../shared/docs/method.md` marked "ours" included, checked as a whole before a run
//! starts (every problem listed at once) and recorded in the run manifest; and the
//! [`TrainPlan`] a run takes: that configuration with its tasks opened against the data folder.
//! The method, device and precision are typed ([`Method`], [`DeviceSpec`], [`Precision`]) and
//! serialise as their names.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::device::{DeviceSpec, Precision};
use super::method::Method;
use crate::error::{Error, Result};

/// What one task of a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    /// Multilingual scenario: one task per (dataset, language).
    Lang,
    /// Multi-task scenario: one task per dataset (its languages' pools joined).
    Dataset,
}

/// Optimizer of the stage-1 (inner) steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InnerOptimizer {
    Sgd,
    Adam,
}

/// How the query gradients of a meta-batch are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Aggregate {
    Mean,
    Sum,
}

/// The largest LoRA rank accepted before the model is known (it must also fit the modules).
pub const MAX_LORA_R: usize = 4096;
/// The most optimizer steps (or meta-iterations) a run may plan.
pub const MAX_STEPS: usize = 1_000_000;
/// The most passes over the training examples.
pub const MAX_PASSES: f64 = 10_000.0;

/// The [`TrainConfig`] keys that set how long and how fast a method trains and on what, in the
/// order a report lists them (the LoRA shape, the optimizer's constants and the device are
/// reported apart).
pub const SETTING_KEYS: &[&str] = &[
    "lr",
    "passes",
    "batch_size",
    "full_cap",
    "inner_lr",
    "inner_steps",
    "n_support",
    "n_query",
    "tasks_per_batch",
    "meta_iterations",
    "eval_every",
    "patience",
    "max_len",
    "unit",
];

/// Whether `method`'s training reads setting `key` (one of [`SETTING_KEYS`]). `stage2-only`
/// runs no stage 1 (no inner rate or inner steps), though `n_support` still places its query
/// sets and counts in its outer steps (see `train::loops::meta_batch`); `stage1-only` runs
/// nothing but stage 1; only the shared LoRA loop stops early on dev; only `lora-full` is
/// capped. `meta_iterations`, when set, overrides the count `passes` implies.
pub fn reads_setting(method: Method, key: &str) -> bool {
    let stage1 = matches!(
        method,
        Method::MetaLora | Method::MetaLoraTta | Method::Stage1Only
    );
    let outer = method.trains() && method != Method::Stage1Only;
    match key {
        "lr" | "passes" => outer,
        "batch_size" => outer && !method.is_meta(),
        "full_cap" => method == Method::LoraFull,
        "inner_lr" | "inner_steps" => stage1,
        "n_support" | "n_query" | "tasks_per_batch" | "meta_iterations" => method.is_meta(),
        "eval_every" | "patience" => matches!(method, Method::LoraFull | Method::LoraK),
        "max_len" | "unit" => method.trains(),
        _ => false,
    }
}

/// A setting (one of [`SETTING_KEYS`]) that `method` does not read: set for it alone, it does
/// nothing. Keys outside the list (the optimizer's constants, the LoRA shape) are not judged.
pub fn ignores_setting(method: Method, key: &str) -> bool {
    SETTING_KEYS.contains(&key) && !reads_setting(method, key)
}

/// The [`SETTING_KEYS`] `method` reads: what a report's setup block lists for it.
pub fn settings_read(method: Method) -> Vec<&'static str> {
    SETTING_KEYS
        .iter()
        .copied()
        .filter(|k| reads_setting(method, k))
        .collect()
}

/// A training run's full configuration. Field names are the TOML keys; the command line's
/// flags are the same names with `-` for `_`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub method: Method,
    /// Local HF folder or Hub id.
    pub model: String,
    pub tasks: Vec<String>,
    /// Language codes (any form `mlbench data sample` takes); `all` for every language.
    pub langs: Vec<String>,
    /// Budget per (task, language); not used by `lora-full`.
    pub k: Option<usize>,
    pub seed: u64,
    pub unit: Unit,
    pub device: DeviceSpec,
    pub dtype: Precision,
    // LoRA
    pub lora_r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    /// Module names (PEFT list matching).
    pub lora_targets: Vec<String>,
    /// Also target the MLP projections (gate, up, down).
    pub lora_mlp: bool,
    pub use_rslora: bool,
    // Shared loop
    /// Peak learning rate of the (outer) AdamW.
    pub lr: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Fraction of the steps spent warming up linearly; cosine decay after.
    pub warmup: f64,
    /// Global gradient-norm clip (0 disables).
    pub clip: f64,
    /// Examples per optimizer step (LoRA methods).
    pub batch_size: usize,
    /// Examples per forward pass; `batch_size / micro_batch` steps are accumulated.
    pub micro_batch: usize,
    /// How many times each training example is seen, on average (sets the number of steps and
    /// of meta-iterations).
    pub passes: f64,
    /// Longest sequence in tokens; longer prompts lose tokens from the left.
    pub max_len: usize,
    /// Run the tokens a micro-batch's sequences all begin with (the prompt's preamble) once per
    /// micro-batch instead of once per sequence (CPU f32). The same loss and gradient up to
    /// rounding without LoRA dropout; with it, the preamble's tokens share one dropout draw.
    pub share_prefix: bool,
    // MeTA-LoRA
    /// Stage-1 steps `s` (forced to 0 by `stage2-only`).
    pub inner_steps: usize,
    pub inner_lr: f64,
    pub inner_optimizer: InnerOptimizer,
    /// Tasks per meta-batch `n` (default: min(tasks, 8)).
    pub tasks_per_batch: Option<usize>,
    pub n_support: usize,
    pub n_query: usize,
    pub aggregate: Aggregate,
    /// Meta-iterations `M` (default: enough for `passes` over every pool).
    pub meta_iterations: Option<usize>,
    // Length chosen on dev (the shared LoRA loop)
    /// Score the adapter on `dev_split` every this many optimizer steps and keep the best one
    /// (0: no dev evaluation; the run ends after `passes`).
    pub eval_every: usize,
    /// Stop after this many dev evaluations without a better score.
    pub patience: usize,
    /// The split dev evaluations read (never `test`).
    pub dev_split: String,
    /// At most this many dev examples per task and language (a fixed stratified subset).
    pub dev_limit: Option<usize>,
    /// Let prompts longer than `max_len` lose their start (refused otherwise).
    pub allow_truncation: bool,
    /// `lora-full` only: at most this many training examples per task and language (the first
    /// of the sampler's stratified, seeded order), so one large split (AfriSenti Hausa, ~14k
    /// tweets) cannot make most of a multi-task mix; `None` trains on every example.
    pub full_cap: Option<usize>,
    // Robustness
    /// Checkpoint every this many optimizer steps (0: only at the end and on Ctrl-C).
    pub checkpoint_every: usize,
}

impl Default for TrainConfig {
    /// The defaults of `method.md`; the LoRA ones are [`crate::model::lora::LoraConfig`]'s.
    fn default() -> Self {
        let lora = crate::model::lora::LoraConfig::default();
        TrainConfig {
            method: Method::MetaLora,
            model: String::new(),
            tasks: vec![],
            langs: vec![],
            k: None,
            seed: 0,
            unit: Unit::Lang,
            device: DeviceSpec::Cpu,
            dtype: Precision::F32,
            lora_r: lora.r,
            lora_alpha: lora.lora_alpha,
            lora_dropout: lora.lora_dropout,
            lora_targets: match lora.target_modules {
                crate::model::lora::Targets::List(l) => l,
                crate::model::lora::Targets::Regex(_) => unreachable!("the default is a list"),
            },
            lora_mlp: false,
            use_rslora: lora.use_rslora,
            lr: 2e-4,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            warmup: 0.05,
            clip: 1.0,
            batch_size: 8,
            micro_batch: 8,
            passes: 5.0,
            max_len: 256,
            share_prefix: true,
            inner_steps: 3,
            inner_lr: 1e-3,
            inner_optimizer: InnerOptimizer::Sgd,
            tasks_per_batch: None,
            n_support: 4,
            n_query: 4,
            aggregate: Aggregate::Mean,
            meta_iterations: None,
            eval_every: 0,
            patience: 3,
            dev_split: "dev".into(),
            dev_limit: None,
            allow_truncation: false,
            full_cap: None,
            checkpoint_every: 50,
        }
    }
}

impl TrainConfig {
    /// Reads a TOML file (unknown keys are errors naming the file).
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::missing_or_io("training config", "read", path, e))?;
        toml::from_str(&text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// The stage-1 steps the method runs (`stage2-only`: 0).
    pub fn effective_inner_steps(&self) -> usize {
        match self.method {
            Method::Stage2Only => 0,
            _ => self.inner_steps,
        }
    }

    /// The LoRA configuration in PEFT terms.
    pub fn lora(&self) -> crate::model::lora::LoraConfig {
        let mut targets = self.lora_targets.clone();
        if self.lora_mlp {
            for m in ["gate_proj", "up_proj", "down_proj"] {
                if !targets.iter().any(|t| t == m) {
                    targets.push(m.to_string());
                }
            }
        }
        crate::model::lora::LoraConfig {
            r: self.lora_r,
            lora_alpha: self.lora_alpha,
            lora_dropout: self.lora_dropout,
            target_modules: crate::model::lora::Targets::List(targets),
            use_rslora: self.use_rslora,
            base_model_name_or_path: Some(self.model.clone()),
        }
    }

    /// Checks everything that can be checked without data, listing every problem.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let method = self.method;
        if method == Method::Base {
            p.push("method `base` is the untrained model: it is evaluated, never trained".into());
        }
        if self.model.trim().is_empty() {
            p.push("no model: give --model (an HF folder or a Hub id)".into());
        }
        if self.tasks.is_empty() {
            p.push("no task: give --task".into());
        }
        if self.langs.is_empty() {
            p.push("no language: give --langs (codes, or `all`)".into());
        }
        self.method_problems(method, &mut p);
        self.number_problems(&mut p);
        self.size_problems(&mut p);
        self.bound_problems(&mut p);
        self.selection_problems(method, &mut p);
        self.setting_problems(&mut p);
        p
    }

    /// What method `m` needs of the budget, the support and query sets and the inner steps.
    fn method_problems(&self, m: Method, p: &mut Vec<String>) {
        match (m.uses_pools(), self.k) {
            (true, None) => p.push(format!("method `{}` needs a budget: give --k", m.name())),
            (true, Some(0)) => p.push("k must be at least 1".into()),
            (false, Some(k)) if m == Method::LoraFull => p.push(format!(
                "method `lora-full` trains on the full train splits; drop --k {k} (or use lora-k)"
            )),
            _ => {}
        }
        if m.is_meta() || m == Method::MetaLoraTta {
            self.meta_problems(p);
        }
        if matches!(m, Method::Stage1Only | Method::MetaLoraTta) && self.inner_steps == 0 {
            p.push(format!(
                "method `{}` adapts with inner_steps stage-1 steps; inner_steps is 0",
                m.name()
            ));
        }
    }

    /// The support and query sets and meta-batches of the MeTA-LoRA methods.
    fn meta_problems(&self, p: &mut Vec<String>) {
        if let Some(k) = self.k {
            if self.n_support + self.n_query > k {
                p.push(format!(
                    "n_support ({}) + n_query ({}) = {} is larger than k = {k}: support and query sets are disjoint subsets of a pool",
                    self.n_support,
                    self.n_query,
                    self.n_support + self.n_query
                ));
            }
        }
        if self.n_query == 0 {
            p.push("n_query must be at least 1".into());
        }
        if self.effective_inner_steps() > 0 && self.n_support == 0 {
            p.push("n_support must be at least 1 when inner_steps > 0".into());
        }
        if let Some(0) = self.tasks_per_batch {
            p.push("tasks_per_batch must be at least 1".into());
        }
        if let Some(0) = self.meta_iterations {
            p.push("meta_iterations must be at least 1".into());
        }
    }

    /// Learning rates, passes and the optimizer's numbers: positive, or in their ranges.
    fn number_problems(&self, p: &mut Vec<String>) {
        let positive = |name: &str, v: f64, p: &mut Vec<String>| {
            if !(v.is_finite() && v > 0.0) {
                p.push(format!("{name} must be a positive number (got {v})"));
            }
        };
        positive("lr", self.lr, p);
        positive("inner_lr", self.inner_lr, p);
        positive("passes", self.passes, p);
        positive("eps", self.eps, p);
        positive("lora_alpha", self.lora_alpha, p);
        if !(0.0..1.0).contains(&self.warmup) {
            p.push(format!("warmup must be in [0, 1) (got {})", self.warmup));
        }
        for (n, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                p.push(format!("{n} must be in [0, 1) (got {b})"));
            }
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            p.push(format!(
                "weight_decay must be >= 0 (got {})",
                self.weight_decay
            ));
        }
        if !(self.clip >= 0.0 && self.clip.is_finite()) {
            p.push(format!("clip must be >= 0 (got {})", self.clip));
        }
    }

    /// Batch sizes, sequence length and the LoRA rank and dropout: at least their minimum.
    fn size_problems(&self, p: &mut Vec<String>) {
        if self.batch_size == 0 || self.micro_batch == 0 {
            p.push("batch_size and micro_batch must be at least 1".into());
        } else if self.micro_batch > self.batch_size {
            p.push(format!(
                "micro_batch ({}) is larger than batch_size ({})",
                self.micro_batch, self.batch_size
            ));
        }
        if self.max_len < 8 {
            p.push(format!("max_len must be at least 8 (got {})", self.max_len));
        }
        if self.lora_r == 0 {
            p.push("lora_r must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            p.push(format!(
                "lora_dropout must be in [0, 1) (got {})",
                self.lora_dropout
            ));
        }
    }

    /// Upper bounds: a value past these is a typo or an attack, and would abort on allocation
    /// or run for years. Bounds that depend on the model and the pools (rank against the module
    /// sizes, steps against the pool) are checked once those are known.
    fn bound_problems(&self, p: &mut Vec<String>) {
        for (name, v, max) in [
            ("lora_r", self.lora_r, MAX_LORA_R),
            ("batch_size", self.batch_size, 1 << 16),
            ("micro_batch", self.micro_batch, 1 << 16),
            ("max_len", self.max_len, 1 << 17),
            ("inner_steps", self.inner_steps, 10_000),
            ("n_support", self.n_support, 1 << 16),
            ("n_query", self.n_query, 1 << 16),
            (
                "tasks_per_batch",
                self.tasks_per_batch.unwrap_or(0),
                1 << 16,
            ),
            (
                "meta_iterations",
                self.meta_iterations.unwrap_or(0),
                MAX_STEPS,
            ),
            ("k", self.k.unwrap_or(0), 1 << 24),
        ] {
            if v > max {
                p.push(format!(
                    "{name} = {v} is larger than mlbench supports ({max})"
                ));
            }
        }
        if self.passes.is_finite() && self.passes > MAX_PASSES {
            p.push(format!(
                "passes = {} is larger than mlbench supports ({MAX_PASSES})",
                self.passes
            ));
        }
    }

    /// Early stopping on dev and `full_cap`: only for the methods they apply to, never on test.
    fn selection_problems(&self, method: Method, p: &mut Vec<String>) {
        if self.dev_split == "test" {
            p.push("dev_split = \"test\": the length is never chosen on the test split".into());
        }
        if self.eval_every > 0 {
            if method.is_meta() || method.per_task() {
                p.push(format!(
                    "eval_every (early stopping on dev) applies to the shared LoRA loop (lora-full, lora-k), not `{method}`: choose its length with a [search] over passes or meta_iterations"
                ));
            }
            if self.patience == 0 {
                p.push("patience must be at least 1 when eval_every > 0".into());
            }
        }
        match (self.full_cap, method) {
            (Some(0), _) => p.push("full_cap must be at least 1".into()),
            (Some(_), m) if m != Method::LoraFull => p.push(format!(
                "full_cap caps lora-full's data; `{}` trains on its K-example pools",
                m.name()
            )),
            _ => {}
        }
    }

    /// The dev limit and the LoRA targets.
    fn setting_problems(&self, p: &mut Vec<String>) {
        if self.dev_limit == Some(0) {
            p.push("dev_limit must be at least 1".into());
        }
        if self.lora_targets.is_empty() && !self.lora_mlp {
            p.push("lora_targets is empty".into());
        }
    }
}

/// A training run resolved before any work: the configuration with every problem that needs
/// no data checked, and its tasks opened against the data folder (spec, dataset file and the
/// languages the run asked for). What [`crate::train::run::train`] accepts.
pub struct TrainPlan {
    pub config: TrainConfig,
    pub data_dir: std::path::PathBuf,
    pub tasks: Vec<crate::tasks::OpenedTask>,
}

impl TrainPlan {
    /// Checks `config` and opens its tasks, listing every problem at once.
    pub fn resolve(data_dir: &Path, config: TrainConfig) -> Result<TrainPlan> {
        let (plan, problems) = TrainPlan::open(data_dir, config)?;
        if !problems.is_empty() {
            return Err(Error::Problems {
                context: "the training configuration".into(),
                problems,
            });
        }
        Ok(plan)
    }

    /// The plan with what could be opened (unknown tasks and languages left out) and the
    /// problems found, for a caller that goes on to collect the data's problems too (a grid
    /// checked before it starts).
    pub fn open(data_dir: &Path, config: TrainConfig) -> Result<(TrainPlan, Vec<String>)> {
        let mut problems = config.problems();
        let tasks =
            crate::tasks::open_tasks(data_dir, &config.tasks, &config.langs, &mut problems)?;
        let plan = TrainPlan {
            config,
            data_dir: data_dir.to_path_buf(),
            tasks,
        };
        Ok((plan, problems))
    }
}
