//! Experiment files (`benchmarks/*.toml`): a model, tasks, languages, methods, budgets and seeds
//! in; the grid of cells (method x K x seed), each with its fully resolved training and
//! evaluation configuration and a content key, out.
//!
//! Method names (the `methods` list, `[method.M]`, `[search.M]`, `[study] reference`) are
//! resolved to [`Method`]s when the file is read; a cell's training keys are merged by
//! [`crate::plan::Layers`] (defaults, `[train]`, `[method.M]`, a candidate, then the grid's own
//! values), so an unknown key or a wrong type names its section. `[method.M]` and `[search.M]`
//! may not set a setting M does not read ([`crate::plan::train::ignores_setting`]: an inner rate
//! for `lora-k`, `n_support` for `lora-full`), where it would do nothing or train identical
//! candidates; `[train]` may set a setting only when at least one of the grid's methods reads it.
//! Every problem of the file is reported at once.
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
use crate::plan::train::ignores_setting;
use crate::plan::EvalConfig;
use crate::plan::{DeviceSpec, Layers, Method, Precision, Source, TrainConfig};

/// Evaluation settings of an experiment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalSection {
    pub split: Option<String>,
    pub shots: usize,
    pub limit: Option<usize>,
    pub batch_size: crate::plan::eval::BatchSize,
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

/// The study declaration of an experiment (`[study]`), fixed before the run: what the verdict
/// table compares against, with which margin, and how hyper-parameters are selected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StudySection {
    /// The method every other is compared with (default `lora-full` when the grid runs it).
    pub reference: Option<Method>,
    /// Non-inferiority margin in accuracy points.
    pub margin: f64,
    /// The seed the `[search.METHOD]` candidates train at (default: the first seed).
    pub selection_seed: Option<u64>,
    /// The budget the candidates train at (default: 64 when the grid has it, else its largest).
    pub selection_k: Option<usize>,
    /// The split candidates are scored on; never the test split.
    pub selection_split: String,
    /// The metric (micro average over the experiment's languages) that picks the candidate.
    pub selection_metric: String,
    /// Let training cut prompts longer than `max_len` (refused otherwise; reported).
    pub allow_truncation: bool,
    /// Another study's selection record (`STORE/selection/NAME.json`, relative to the working
    /// folder like `model`): each grid method it covers runs with the settings that study
    /// chose on its dev split, instead of searching again here. A covered method whose choice
    /// is not made yet has no grid cells until it is; a method both covered and searched here
    /// is refused.
    pub settings_from: Option<std::path::PathBuf>,
}

impl Default for StudySection {
    fn default() -> Self {
        StudySection {
            reference: None,
            margin: 2.0,
            selection_seed: None,
            selection_k: None,
            selection_split: "dev".into(),
            selection_metric: "acc".into(),
            allow_truncation: false,
            settings_from: None,
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
    pub methods: Vec<Method>,
    /// Budgets for the methods that take one.
    #[serde(default)]
    pub ks: Vec<usize>,
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    #[serde(default)]
    pub device: DeviceSpec,
    #[serde(default)]
    pub dtype: Precision,
    /// Training keys for every method.
    #[serde(default)]
    pub train: toml::Table,
    /// Training keys per method.
    #[serde(default)]
    pub method: BTreeMap<Method, toml::Table>,
    #[serde(default)]
    pub eval: EvalSection,
    #[serde(default)]
    pub study: StudySection,
    /// Search spaces per method: training key -> candidate values (`[search.lora-k]`
    /// `lr = [1e-4, 3e-4]`); every combination is trained at the selection seed and budget,
    /// scored on the selection split, and the best one runs the grid.
    #[serde(default)]
    pub search: BTreeMap<Method, toml::Table>,
    /// The settings selection chose per searched method (set by the runner from the store's
    /// selection record; a searched method without a choice has no grid cells yet), and those
    /// taken from `[study] settings_from`.
    #[serde(skip)]
    pub chosen: BTreeMap<Method, Overrides>,
    /// The grid methods `[study] settings_from` covers (set by the runner from that record).
    #[serde(skip)]
    pub transferred: std::collections::BTreeSet<Method>,
    /// The file it was read from (messages name it).
    #[serde(skip)]
    pub path: Option<std::path::PathBuf>,
    /// Problems found while reading the file (unknown method names), reported with the
    /// grid's other problems.
    #[serde(skip)]
    pub problems: Vec<String>,
}

/// Resolves the method names of an experiment table in place (`methods`, the `[method.M]` and
/// `[search.M]` section names, `[study] reference`) to their canonical names, dropping each
/// unknown one with a problem that names where it is, so every other problem of the file is
/// still found and all are reported together.
fn method_names(t: &mut toml::Table) -> Vec<String> {
    let mut problems = Vec::new();
    let mut canon = |name: &str, place: &str| match Method::parse(name) {
        Ok(m) => Some(m.name().to_string()),
        Err(e) => {
            problems.push(format!("{place}: {e}"));
            None
        }
    };
    if let Some(toml::Value::Array(a)) = t.get_mut("methods") {
        *a = std::mem::take(a)
            .into_iter()
            .filter_map(|v| match v.as_str() {
                Some(n) => canon(n, "methods").map(toml::Value::String),
                None => Some(v),
            })
            .collect();
    }
    for section in ["method", "search"] {
        if let Some(toml::Value::Table(sub)) = t.get_mut(section) {
            *sub = std::mem::take(sub)
                .into_iter()
                .filter_map(|(k, v)| canon(&k, &format!("[{section}.{k}]")).map(|k| (k, v)))
                .collect();
        }
    }
    if let Some(toml::Value::Table(study)) = t.get_mut("study") {
        if let Some(toml::Value::String(r)) = study.get("reference").cloned() {
            match canon(&r, "[study] reference") {
                Some(n) => study.insert("reference".into(), toml::Value::String(n)),
                None => study.remove("reference"),
            };
        }
    }
    problems
}

fn default_seeds() -> Vec<u64> {
    vec![0]
}

/// One cell of the grid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    pub experiment: String,
    pub method: Method,
    /// `None` for `base` and `lora-full`.
    pub k: Option<usize>,
    pub seed: u64,
    /// The training configuration (`None` for `base`).
    pub train: Option<TrainConfig>,
    pub eval: EvalConfig,
    /// Content key: sha256 of the experiment name, the resolved configurations and the code
    /// version.
    pub key: String,
    /// For a selection candidate: the searched keys and their values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate: Option<Overrides>,
}

/// Training keys and values that override the experiment's for one method (a candidate of a
/// search, or the chosen one).
pub type Overrides = BTreeMap<String, toml::Value>;

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
        let config = |message: String| Error::Config {
            path: path.to_path_buf(),
            message,
        };
        let mut t: toml::Table = toml::from_str(&text).map_err(|e| config(e.to_string()))?;
        let problems = method_names(&mut t);
        let mut e: Experiment = t.try_into().map_err(|e| config(e.to_string()))?;
        e.path = Some(path.to_path_buf());
        e.problems = problems
            .into_iter()
            .map(|p| format!("{}: {p}", path.display()))
            .collect();
        Ok(e)
    }

    /// Where a section of the file is, for messages: `path [section]`, or the experiment's
    /// name when it was not read from a file.
    fn source(&self, section: &str) -> Source {
        match &self.path {
            Some(p) => Source::file(p, Some(section)),
            None => Source(format!("experiment `{}` [{section}]", self.name)),
        }
    }

    /// Shrinks the grid to a few CPU minutes (nightly `--smoke`): the first seed, the smallest
    /// budget, two meta-iterations or a fifth of a pass, 20 test examples per language, no
    /// `[search]` (each method with the file's settings), and the experiment named
    /// `<name>-smoke` so its cells never mix with the full run's.
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
        // No selection in a smoke run: every method runs with the file's own settings.
        self.search.clear();
    }

    /// The training configuration of one method at one budget and seed: the defaults, then
    /// `[train]`, `[method.M]`, the overrides (a candidate or the chosen settings), then what
    /// the grid sets. Every unknown key and wrong type is reported at once, with its section.
    fn train_config(
        &self,
        method: Method,
        k: Option<usize>,
        seed: u64,
        overrides: Option<&Overrides>,
    ) -> Result<TrainConfig> {
        let mut l = Layers::new();
        l.table(&self.source("train"), &self.train);
        if let Some(t) = self.method.get(&method) {
            l.table(&self.source(&format!("method.{method}")), t);
        }
        if let Some(o) = overrides {
            let t: toml::Table = o.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            let from = match &self.study.settings_from {
                Some(p) if self.transferred.contains(&method) => {
                    Source::file(p, Some(method.name()))
                }
                _ => self.source(&format!("search.{method}")),
            };
            l.table(&from, &t);
        }
        l.value("the grid", "method", method.name())
            .value("the grid", "model", self.model.clone())
            .value("the grid", "tasks", self.tasks.clone())
            .value("the grid", "langs", self.langs.clone())
            .value("the grid", "k", serde_json::to_value(k)?)
            .value("the grid", "seed", seed)
            .value("the grid", "device", self.device.to_string())
            .value("the grid", "dtype", self.dtype.to_string());
        l.resolve(
            &format!("experiment `{}`: training keys for `{method}`", self.name),
            &[],
        )
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
            limit_fraction: None,
            device: self.device,
            dtype: self.dtype,
        }
    }

    /// A method with a search space, or covered by `[study] settings_from`, whose choice is
    /// not made yet.
    pub fn pending(&self, method: Method) -> bool {
        (self.search.contains_key(&method) || self.transferred.contains(&method))
            && !self.chosen.contains_key(&method)
    }

    /// The seed and budget selection candidates train at (`None` budget for `lora-full`).
    pub fn selection_point(&self, method: Method) -> (u64, Option<usize>) {
        let seed = self
            .study
            .selection_seed
            .unwrap_or_else(|| self.seeds.first().copied().unwrap_or(0));
        let uses_k = method.uses_pools();
        let k = uses_k.then(|| {
            self.study.selection_k.unwrap_or_else(|| {
                if self.ks.contains(&64) {
                    64
                } else {
                    self.ks.iter().copied().max().unwrap_or(0)
                }
            })
        });
        (seed, k)
    }

    /// Every combination of a method's search space, keys in name order, values in the order
    /// given.
    pub fn candidates(&self, method: Method) -> Vec<Overrides> {
        let Some(space) = self.search.get(&method) else {
            return vec![];
        };
        let mut out: Vec<Overrides> = vec![Overrides::new()];
        for (key, vals) in space {
            let vals = vals.as_array().cloned().unwrap_or_default();
            out = out
                .into_iter()
                .flat_map(|o| {
                    vals.iter().map(move |v| {
                        let mut o = o.clone();
                        o.insert(key.clone(), v.clone());
                        o
                    })
                })
                .collect();
        }
        out
    }

    /// The selection cells: every candidate of every searched method, trained at the
    /// selection seed and budget and scored on the selection split (never test), stored under
    /// the experiment name `<name>/selection`.
    pub fn selection_cells(&self) -> Result<Vec<Cell>> {
        let version = crate::util::code_version();
        let mut cells = Vec::new();
        let problems = self.study_problems();
        if !problems.is_empty() {
            return Err(Error::Problems {
                context: format!("experiment `{}`", self.name),
                problems,
            });
        }
        let mut problems = Vec::new();
        for &m in self.search.keys() {
            let (seed, k) = self.selection_point(m);
            for cand in self.candidates(m) {
                let train = match self.train_config(m, k, seed, Some(&cand)) {
                    Ok(c) => c,
                    Err(e) => {
                        add_problems(&mut problems, e);
                        continue;
                    }
                };
                for p in train.problems() {
                    problems.push(format!("[search.{m}] candidate {}: {p}", show(&cand)));
                }
                let mut eval = self.eval_config(seed);
                eval.split = Some(self.study.selection_split.clone());
                let experiment = format!("{}/selection", self.name);
                let key = crate::util::sha256_hex(&serde_json::to_vec(&serde_json::json!({
                    "experiment": experiment, "method": m, "k": k, "seed": seed,
                    "train": train, "eval": eval, "code": version,
                    "model_weights": model_identity(&self.model)?,
                }))?)[..16]
                    .to_string();
                cells.push(Cell {
                    experiment,
                    method: m,
                    k,
                    seed,
                    train: Some(train),
                    eval,
                    key,
                    candidate: Some(cand),
                });
            }
        }
        if !problems.is_empty() {
            return Err(Error::Problems {
                context: format!("experiment `{}` (selection)", self.name),
                problems,
            });
        }
        Ok(cells)
    }

    /// The reference method of the verdict table: `[study] reference`, else `lora-full` when
    /// the grid runs it.
    pub fn reference(&self) -> Option<Method> {
        self.study.reference.or_else(|| {
            self.methods
                .contains(&Method::LoraFull)
                .then_some(Method::LoraFull)
        })
    }

    /// The grid's method names, comma-separated.
    fn method_list(&self) -> String {
        self.methods
            .iter()
            .map(|m| m.name())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Problems of `[study]` and `[search.*]` that need no data.
    fn study_problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let st = &self.study;
        if let Some(r) = st.reference {
            if !self.methods.contains(&r) {
                p.push(format!(
                    "[study] reference = \"{r}\" is not among the grid's methods ({})",
                    self.method_list()
                ));
            }
        }
        if !(st.margin.is_finite() && st.margin > 0.0) {
            p.push(format!(
                "[study] margin = {} must be a positive number of points",
                st.margin
            ));
        }
        if st.selection_split == "test" {
            p.push(
                "[study] selection_split = \"test\": selection never reads the test split".into(),
            );
        }
        if let Some(k) = st.selection_k {
            if !self.ks.contains(&k) {
                p.push(format!("[study] selection_k = {k} is not in ks"));
            }
        }
        if let Some(s) = st.selection_seed {
            if !self.seeds.contains(&s) {
                p.push(format!("[study] selection_seed = {s} is not in seeds"));
            }
        }
        let known = serde_json::to_value(TrainConfig::default())
            .ok()
            .and_then(|v| v.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>()))
            .unwrap_or_default();
        for (m, space) in &self.search {
            if !self.methods.contains(m) || *m == Method::Base {
                p.push(format!(
                    "[search.{m}] searches a method the grid does not train"
                ));
            }
            if space.is_empty() {
                p.push(format!("[search.{m}] is empty"));
            }
            for (key, v) in space {
                if !known.contains(key)
                    || matches!(
                        key.as_str(),
                        "method" | "model" | "tasks" | "langs" | "k" | "seed"
                    )
                {
                    p.push(format!(
                        "[search.{m}] `{key}` is not a training key that can be searched{}",
                        crate::util::suggestions(key, known.iter().map(String::as_str))
                            .first()
                            .map(|s| format!(" (did you mean {s}?)"))
                            .unwrap_or_default()
                    ));
                }
                if ignores_setting(*m, key) {
                    p.push(format!(
                        "[search.{m}] `{key}`: {m} does not read it, so its candidates would train the same adapter"
                    ));
                }
                match v.as_array() {
                    Some(a) if !a.is_empty() => {}
                    Some(_) => p.push(format!("[search.{m}] `{key}` has no candidate value")),
                    None => p.push(format!(
                        "[search.{m}] `{key}` must be a list of candidate values"
                    )),
                }
            }
        }
        p
    }

    /// Every cell, with every problem that can be seen without data listed at once.
    pub fn cells(&self) -> Result<Vec<Cell>> {
        let mut problems = self.grid_problems();
        let mut cells = Vec::new();
        let version = crate::util::code_version();
        for &m in self.methods.iter().filter(|m| !self.pending(**m)) {
            let (is_base, uses_k) = (m == Method::Base, m.uses_pools());
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
                    if let Some(c) = self.cell(m, (k, seed), &version, &mut problems)? {
                        cells.push(c);
                    }
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

    /// The problems of the grid's lists and sections: empty or repeated methods, budgets and
    /// seeds, the study and search sections, method sections for methods the grid does not run.
    fn grid_problems(&self) -> Vec<String> {
        let mut problems = self.problems.clone();
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
        dup(
            "methods",
            self.methods.iter().map(|m| m.name().to_string()).collect(),
        );
        dup("ks", self.ks.iter().map(|k| k.to_string()).collect());
        dup("seeds", self.seeds.iter().map(|s| s.to_string()).collect());
        problems.extend(self.study_problems());
        // `[train]` serves every method, so a key is wrong there only when none of them reads it.
        for key in self.train.keys() {
            if self.methods.iter().all(|m| ignores_setting(*m, key)) {
                problems.push(format!(
                    "[train] sets `{key}`, which none of the grid's methods ({}) reads",
                    self.method_list()
                ));
            }
        }
        for (name, table) in &self.method {
            if !self.methods.contains(name) {
                problems.push(format!(
                    "[method.{name}] configures a method the grid does not run"
                ));
            }
            for key in table.keys() {
                if ignores_setting(*name, key) {
                    problems.push(format!(
                        "[method.{name}] sets `{key}`, which {name} does not read"
                    ));
                }
            }
        }
        problems
    }

    /// The cell of method `m` at `(k, seed)` with its configurations' problems added to
    /// `problems` (each once); `None` when its training configuration cannot be built.
    fn cell(
        &self,
        m: Method,
        (k, seed): (Option<usize>, u64),
        version: &str,
        problems: &mut Vec<String>,
    ) -> Result<Option<Cell>> {
        let train = if m == Method::Base {
            None
        } else {
            match self.train_config(m, k, seed, self.chosen.get(&m)) {
                Ok(c) => {
                    for p in c.problems() {
                        push_once(problems, format!("{m} k={k:?} seed {seed}: {p}"));
                    }
                    Some(c)
                }
                Err(e) => {
                    add_problems(problems, e);
                    return Ok(None);
                }
            }
        };
        let eval = self.eval_config(seed);
        for p in eval.problems() {
            push_once(problems, format!("[eval]: {p}"));
        }
        let key = crate::util::sha256_hex(&serde_json::to_vec(&serde_json::json!({
            "experiment": self.name, "method": m, "k": k, "seed": seed,
            "train": train, "eval": eval,
            "code": version,
            "model_weights": model_identity(&self.model)?,
        }))?)[..16]
            .to_string();
        Ok(Some(Cell {
            experiment: self.name.clone(),
            method: m,
            k,
            seed,
            train,
            eval,
            key,
            candidate: None,
        }))
    }
}

/// An experiment resolved for a run: the selection candidates of every `[search.M]` and the
/// grid cells of every method whose settings are fixed (a searched method's cells come once its
/// choice is made), each with its typed configurations and content key. The runner takes its
/// cells from here.
#[derive(Debug, Clone)]
pub struct GridPlan {
    pub candidates: Vec<Cell>,
    pub cells: Vec<Cell>,
}

impl Experiment {
    /// The plan with the choices made so far (see [`Experiment::chosen`]); every problem
    /// that can be seen without data is listed at once.
    pub fn plan(&self) -> Result<GridPlan> {
        Ok(GridPlan {
            candidates: self.selection_cells()?,
            cells: self.cells()?,
        })
    }
}

/// Adds the problems of `e` (each of an [`Error::Problems`], else its message) to `problems`,
/// each once: every cell of a grid meets the same bad key.
fn add_problems(problems: &mut Vec<String>, e: Error) {
    match e {
        Error::Problems { problems: ps, .. } => ps.into_iter().for_each(|p| push_once(problems, p)),
        e => push_once(problems, e.to_string()),
    }
}

/// Adds `msg` to `problems` unless it is there already.
fn push_once(problems: &mut Vec<String>, msg: String) {
    if !problems.contains(&msg) {
        problems.push(msg);
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

/// What identifies a model in a cell key: the sha256 of a local folder's weights (so a random
/// `model tiny` folder and the real model at the same path never share a key), or the Hub id
/// (with its revision) as given (the hash is computed once per process and file version).
pub fn model_identity(model: &str) -> Result<String> {
    let dir = Path::new(model);
    if !dir.is_dir() || crate::model::load::weight_files(dir).is_err() {
        return Ok(model.to_string());
    }
    crate::model::load::weights_sha256(dir)
}

/// `key=value` pairs of overrides, for messages and tables.
pub fn show(o: &Overrides) -> String {
    o.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}
