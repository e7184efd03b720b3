//! What a study report shows beside its accuracy and verdict tables (`../shared/docs/study.md`,
//! sections 2, 4 and 5): the budget each method used, the predicted-label distributions that
//! catch a collapsed run, and the setup block that says what was run.
//!
//! In: the `cell.json` of the compared cells (their `info.training` facts, written by
//! [`super::grid::run_cell`] from the training manifest) and their per-example records (`pred`,
//! `gold`). Out: [`BudgetRow`]s, [`LabelDist`]s with their collapse flag, and a [`Setup`], each
//! with Markdown and HTML renderers.
//!
//! Budget figures are means over a row's seeds. Distinct examples are per task and language
//! (the K of a method with a budget; the whole train split, or its capped share, for
//! `lora-full`); visits count an example each time it is put in a batch or a support, query or
//! adaptation set; sequences and tokens count every forward and backward pass, inner steps and
//! test-time adaptation included.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use polars::prelude::*;

use super::compare::k_label;
use super::store::Store;
use crate::error::{Error, Result};
use crate::plan::train::{settings_read, SETTING_KEYS};
use crate::plan::Method;
use crate::util::html_escape as esc;

/// One compared cell's `cell.json`.
#[derive(Debug, Clone)]
pub struct CellInfo {
    pub key: String,
    pub method: String,
    pub k: Option<i64>,
    pub seed: u64,
    pub doc: serde_json::Value,
}

impl CellInfo {
    fn training(&self) -> &serde_json::Value {
        &self.doc["info"]["training"]
    }

    /// Wall seconds of the training the cell's adapter took: the run's own total over every
    /// process that worked on it (a run resumed from a checkpoint, or shared with a sibling
    /// cell, counts whole), else the cell's process time (cells without a training manifest).
    /// The cell's `train_seconds` alone is what its last process spent: a few seconds for a
    /// run found finished, the last stretch for one resumed.
    pub fn train_wall_seconds(&self) -> f64 {
        self.training()["train_wall_seconds"]
            .as_f64()
            .or_else(|| self.doc["info"]["train_seconds"].as_f64())
            .unwrap_or(0.0)
    }
}

/// The `cell.json` of each finished cell of `store` whose key is in `keys`.
pub fn cell_infos(store: &Store, keys: &HashSet<String>) -> Result<Vec<CellInfo>> {
    let mut out = Vec::new();
    for key in store.finished() {
        if !keys.contains(&key) {
            continue;
        }
        let p = store.cell_dir(&key).join("cell.json");
        let text = std::fs::read_to_string(&p).map_err(|e| Error::io("read", &p, e))?;
        let doc: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: p.clone(),
            message: format!("not JSON: {e}"),
        })?;
        let c = &doc["cell"];
        out.push(CellInfo {
            key,
            method: c["method"].as_str().unwrap_or("").to_string(),
            k: c["k"].as_i64(),
            seed: c["seed"].as_u64().unwrap_or(0),
            doc,
        });
    }
    Ok(out)
}

/// One row of the budget table: a method at a K, figures averaged over its seeds.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetRow {
    pub method: String,
    pub k: Option<i64>,
    pub seeds: usize,
    pub optimizer_steps: f64,
    /// Mean distinct training examples per task and language.
    pub distinct_per_lang: f64,
    pub visits: f64,
    pub sequences: f64,
    pub tokens: f64,
    pub train_seconds: f64,
    pub eval_seconds: f64,
    pub device: String,
    pub precision: String,
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// The precision a cell ran at: its dtype, and `matmul=bf16` when its code version says so.
fn precision(c: &CellInfo) -> String {
    let dtype = c.doc["cell"]["eval"]["dtype"].as_str().unwrap_or("f32");
    let version = c.doc["code_version"].as_str().unwrap_or("");
    match version.split("matmul=").nth(1) {
        Some(m) => format!(
            "{dtype}, matmul {}",
            m.split_whitespace().next().unwrap_or(m)
        ),
        None => dtype.to_string(),
    }
}

/// The budget table over `infos`, rows in `order` (the comparison table's).
pub fn budget(infos: &[CellInfo], order: &[(String, Option<i64>)]) -> Vec<BudgetRow> {
    let mut rows = Vec::new();
    for (m, k) in order {
        let cells: Vec<&CellInfo> = infos
            .iter()
            .filter(|c| &c.method == m && c.k == *k)
            .collect();
        if cells.is_empty() {
            continue;
        }
        let f = |get: &dyn Fn(&CellInfo) -> f64| -> f64 {
            mean(&cells.iter().map(|c| get(c)).collect::<Vec<_>>())
        };
        let num = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
        rows.push(BudgetRow {
            method: m.clone(),
            k: *k,
            seeds: cells.len(),
            optimizer_steps: f(&|c| num(&c.training()["optimizer_steps"])),
            distinct_per_lang: f(&|c| {
                let d: Vec<f64> = c.training()["distinct_examples"]
                    .as_object()
                    .map(|o| o.values().map(num).collect())
                    .unwrap_or_default();
                mean(&d)
            }),
            visits: f(&|c| num(&c.training()["example_visits"])),
            sequences: f(&|c| num(&c.training()["sequences_forwarded"])),
            tokens: f(&|c| num(&c.training()["tokens_forwarded"])),
            train_seconds: f(&|c| c.train_wall_seconds()),
            eval_seconds: f(&|c| num(&c.doc["info"]["eval_seconds"])),
            device: cells[0].doc["cell"]["eval"]["device"]
                .as_str()
                .unwrap_or("cpu")
                .to_string(),
            precision: precision(cells[0]),
        });
    }
    rows
}

const BUDGET_HEAD: [&str; 12] = [
    "method",
    "K",
    "seeds",
    "optimizer steps",
    "distinct examples per task x language",
    "example visits",
    "sequences forwarded",
    "tokens forwarded",
    "train s",
    "eval s",
    "device",
    "precision",
];

fn budget_cells(r: &BudgetRow) -> Vec<String> {
    vec![
        r.method.clone(),
        k_label(&r.method, r.k),
        r.seeds.to_string(),
        format!("{:.0}", r.optimizer_steps),
        format!("{:.0}", r.distinct_per_lang),
        format!("{:.0}", r.visits),
        format!("{:.0}", r.sequences),
        format!("{:.0}", r.tokens),
        format!("{:.0}", r.train_seconds),
        format!("{:.0}", r.eval_seconds),
        r.device.clone(),
        r.precision.clone(),
    ]
}

/// What the budget table's figures are.
pub const BUDGET_NOTE: &str = "Means over the row's seeds. Distinct examples per task and language: K for the budgeted methods, the train split for lora-full. Visits: an example put in a batch, or in a support, query or adaptation set. Sequences and tokens: every forward and backward pass of training, inner steps and test-time adaptation included (evaluation is the same for every method and not counted). Train s: the training run's wall time over every process that worked on it (a run resumed from a checkpoint counts whole; meta-lora and meta-lora+tta share one run, shown on both); it includes any time the process was paused or shared its cores. Compute is reported, not equalised.";

/// The budget table as Markdown.
pub fn budget_markdown(rows: &[BudgetRow]) -> String {
    let mut s = format!("| {} |\n|{}\n", BUDGET_HEAD.join(" | "), "---|".repeat(12));
    for r in rows {
        s.push_str(&format!("| {} |\n", budget_cells(r).join(" | ")));
    }
    s.push_str(&format!("\n{BUDGET_NOTE}\n"));
    s
}

/// The budget table as CSV.
pub fn budget_csv(rows: &[BudgetRow]) -> String {
    let mut s = String::from("method,k,seeds,optimizer_steps,distinct_per_task_lang,example_visits,sequences_forwarded,tokens_forwarded,train_seconds,eval_seconds,device,precision\n");
    for r in rows {
        s.push_str(&format!(
            "{},{},{},{:.1},{:.1},{:.1},{:.1},{:.1},{:.1},{:.1},{},{}\n",
            r.method,
            k_label(&r.method, r.k),
            r.seeds,
            r.optimizer_steps,
            r.distinct_per_lang,
            r.visits,
            r.sequences,
            r.tokens,
            r.train_seconds,
            r.eval_seconds,
            r.device,
            r.precision.replace(',', ";")
        ));
    }
    s
}

/// An HTML table from a header and rows of cells.
pub fn html_rows(head: &[&str], rows: &[Vec<String>], class: &str) -> String {
    let mut s = format!("<table class=\"{class}\">\n<thead><tr>");
    for h in head {
        s.push_str(&format!("<th>{}</th>", esc(h)));
    }
    s.push_str("</tr></thead>\n<tbody>\n");
    for r in rows {
        s.push_str("<tr>");
        for c in r {
            s.push_str(&format!("<td>{}</td>", esc(c)));
        }
        s.push_str("</tr>\n");
    }
    s.push_str("</tbody>\n</table>\n");
    s
}

/// The budget table as HTML.
pub fn budget_html(rows: &[BudgetRow]) -> String {
    html_rows(
        &BUDGET_HEAD,
        &rows.iter().map(budget_cells).collect::<Vec<_>>(),
        "budget",
    )
}

/// The predicted labels of one cell on one task and language, beside the gold labels.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelDist {
    pub method: String,
    pub k: Option<i64>,
    pub seed: u64,
    pub task: String,
    pub lang: String,
    pub pred: BTreeMap<i64, usize>,
    pub gold: BTreeMap<i64, usize>,
}

/// A collapsed run: one label takes more than this share of the predictions ...
pub const COLLAPSE_PRED_SHARE: f64 = 0.8;
/// ... while holding less than this share of the gold labels.
pub const COLLAPSE_GOLD_SHARE: f64 = 0.5;

impl LabelDist {
    pub fn n(&self) -> usize {
        self.pred.values().sum()
    }

    /// The most predicted label, its share of the predictions and its share of the gold labels.
    pub fn top(&self) -> Option<(i64, f64, f64)> {
        let n = self.n().max(1) as f64;
        let g = self.gold.values().sum::<usize>().max(1) as f64;
        self.pred
            .iter()
            .max_by_key(|(l, c)| (**c, -**l))
            .map(|(l, c)| {
                let gold = *self.gold.get(l).unwrap_or(&0) as f64;
                (*l, *c as f64 / n, gold / g)
            })
    }

    /// One label takes over 80% of the predictions and under 50% of the gold labels.
    pub fn collapsed(&self) -> bool {
        self.top()
            .is_some_and(|(_, p, g)| p > COLLAPSE_PRED_SHARE && g < COLLAPSE_GOLD_SHARE)
    }
}

/// The label distributions of every (method, K, seed, task, language) of `samples` (rows with
/// both `pred` and `gold`; generation tasks have none). Rows of another experiment with the same
/// method, K and seed would pool into one distribution: pass one experiment's rows
/// ([`super::compare::selected_samples`]).
pub fn label_distributions(samples: &DataFrame) -> Result<Vec<LabelDist>> {
    if samples.height() == 0 || samples.column("pred").is_err() {
        return Ok(vec![]);
    }
    let s = |c: &str| -> Result<Vec<String>> {
        Ok(samples
            .column(c)?
            .str()?
            .iter()
            .map(|x| x.unwrap_or("").to_string())
            .collect())
    };
    let (method, task, lang) = (s("method")?, s("task")?, s("lang")?);
    let k: Vec<Option<i64>> = samples.column("k")?.i64()?.iter().collect();
    let seed: Vec<Option<u64>> = samples.column("seed")?.u64()?.iter().collect();
    let pred: Vec<Option<i64>> = samples.column("pred")?.i64()?.iter().collect();
    let gold: Vec<Option<i64>> = samples.column("gold")?.i64()?.iter().collect();
    type Key = (String, Option<i64>, u64, String, String);
    let mut by: BTreeMap<Key, LabelDist> = BTreeMap::new();
    for i in 0..samples.height() {
        let (Some(p), Some(g)) = (pred[i], gold[i]) else {
            continue;
        };
        let key = (
            method[i].clone(),
            k[i],
            seed[i].unwrap_or(0),
            task[i].clone(),
            lang[i].clone(),
        );
        let d = by.entry(key).or_insert_with(|| LabelDist {
            method: method[i].clone(),
            k: k[i],
            seed: seed[i].unwrap_or(0),
            task: task[i].clone(),
            lang: lang[i].clone(),
            pred: BTreeMap::new(),
            gold: BTreeMap::new(),
        });
        *d.pred.entry(p).or_default() += 1;
        *d.gold.entry(g).or_default() += 1;
    }
    Ok(by.into_values().collect())
}

fn dist_text(d: &BTreeMap<i64, usize>) -> String {
    d.iter()
        .map(|(l, c)| format!("{l}:{c}"))
        .collect::<Vec<_>>()
        .join(" ")
}

const DIST_HEAD: [&str; 9] = [
    "method",
    "K",
    "seed",
    "task",
    "language",
    "n",
    "predicted",
    "gold",
    "warning",
];

fn dist_cells(d: &LabelDist) -> Vec<String> {
    let warn = match d.top() {
        Some((l, p, g)) if d.collapsed() => format!(
            "collapsed: label {l} is {:.0}% of predictions, {:.0}% of gold",
            100.0 * p,
            100.0 * g
        ),
        _ => String::new(),
    };
    vec![
        d.method.clone(),
        k_label(&d.method, d.k),
        d.seed.to_string(),
        d.task.clone(),
        d.lang.clone(),
        d.n().to_string(),
        dist_text(&d.pred),
        dist_text(&d.gold),
        warn,
    ]
}

/// The warning lines of the collapsed cells (empty when none collapsed).
pub fn collapse_warnings(dists: &[LabelDist]) -> Vec<String> {
    dists
        .iter()
        .filter(|d| d.collapsed())
        .map(|d| {
            let c = dist_cells(d);
            format!(
                "{} K={} seed {} {}/{}: {}",
                c[0], c[1], c[2], c[3], c[4], c[8]
            )
        })
        .collect()
}

/// The label distributions as Markdown (collapsed cells first).
pub fn dists_markdown(dists: &[LabelDist]) -> String {
    let mut s = format!("| {} |\n|{}\n", DIST_HEAD.join(" | "), "---|".repeat(9));
    let mut sorted: Vec<&LabelDist> = dists.iter().collect();
    sorted.sort_by_key(|d| !d.collapsed());
    for d in sorted {
        s.push_str(&format!("| {} |\n", dist_cells(d).join(" | ")));
    }
    s
}

/// The label distributions as HTML (collapsed cells first).
pub fn dists_html(dists: &[LabelDist]) -> String {
    let mut sorted: Vec<&LabelDist> = dists.iter().collect();
    sorted.sort_by_key(|d| !d.collapsed());
    html_rows(
        &DIST_HEAD,
        &sorted.into_iter().map(dist_cells).collect::<Vec<_>>(),
        "labels",
    )
}

/// The training curve of one cell: loss per step (train or outer rows), dev scores where early
/// stopping ran, and for MeTA-LoRA the inner displacement and outer update norms.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Curve {
    pub method: String,
    pub k: Option<i64>,
    pub seed: u64,
    pub loss: Vec<(f64, f64)>,
    pub dev: Vec<(f64, f64)>,
    /// Mean over the meta-batch's tasks of `|theta_i - theta|` per meta-iteration.
    pub inner_norm: Vec<(f64, f64)>,
    /// `|theta' - theta|` of each optimizer step.
    pub update_norm: Vec<(f64, f64)>,
}

/// The curves of the cells in `infos` that trained, from their runs' `log.parquet` (in the
/// store's `work/` folder; cells whose work folder is gone are left out).
pub fn curves(store: &Store, infos: &[CellInfo]) -> Result<Vec<Curve>> {
    let mut out = Vec::new();
    for c in infos.iter().filter(|c| !c.training().is_null()) {
        let run_of = c.doc["info"]["train_run_of"]
            .as_str()
            .unwrap_or(&c.key)
            .to_string();
        let log = store.work_dir(&run_of).join("train").join("log.parquet");
        if !log.exists() {
            continue;
        }
        let df = crate::data::schema::read_parquet(&log)?;
        let stage = df.column("stage")?.str()?.clone();
        let step = df.column("step")?.u64()?.clone();
        let loss = df.column("loss")?.f64()?.clone();
        let num = |name: &str| -> Vec<Option<f64>> {
            df.column(name)
                .ok()
                .and_then(|c| c.f64().ok().map(|c| c.iter().collect()))
                .unwrap_or_else(|| vec![None; df.height()])
        };
        let (norm, dev) = (num("norm"), num("dev"));
        let mut cv = Curve {
            method: c.method.clone(),
            k: c.k,
            seed: c.seed,
            ..Default::default()
        };
        let mut inner: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
        for i in 0..df.height() {
            let (Some(st), Some(sp)) = (stage.get(i), step.get(i)) else {
                continue;
            };
            let x = sp as f64;
            match st {
                "train" | "outer" => {
                    if let Some(l) = loss.get(i) {
                        cv.loss.push((x, l));
                    }
                    if let Some(n) = norm[i] {
                        cv.update_norm.push((x, n));
                    }
                }
                "dev" => {
                    if let Some(d) = dev[i] {
                        cv.dev.push((x, d));
                    }
                }
                "support" => {
                    if let Some(n) = norm[i] {
                        inner.entry(sp).or_default().push(n);
                    }
                }
                _ => {}
            }
        }
        cv.inner_norm = inner
            .into_iter()
            .map(|(s, v)| (s as f64, mean(&v)))
            .collect();
        out.push(cv);
    }
    Ok(out)
}

/// The setup block: what was run, with which model, data and settings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Setup {
    pub lines: Vec<(String, String)>,
}

fn distinct<T: Ord + Clone>(v: impl Iterator<Item = T>) -> Vec<T> {
    v.collect::<BTreeSet<T>>().into_iter().collect()
}

/// The value at `path` of a cell's document as text (empty when absent).
fn field(c: &CellInfo, path: &[&str]) -> String {
    let mut v = &c.doc;
    for k in path {
        v = &v[*k];
    }
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// The non-empty values, comma-separated, or `(not recorded)`.
fn listed(v: Vec<String>) -> String {
    let v: Vec<String> = v.into_iter().filter(|x| !x.is_empty()).collect();
    if v.is_empty() {
        "(not recorded)".to_string()
    } else {
        v.join(", ")
    }
}

/// The distinct values at `path` over the cells, listed.
fn across(infos: &[CellInfo], path: &[&str]) -> String {
    listed(distinct(infos.iter().map(|c| field(c, path))))
}

/// Appends a `(setting, value)` line.
fn put(lines: &mut Vec<(String, String)>, k: &str, v: String) {
    lines.push((k.to_string(), v));
}

/// The setup block of the compared cells. `selection` is the store's selection record of the
/// experiment (when it ran a search or took another study's choices: `from`, see
/// [`settings_source`]), `reference` and `margin` the declaration.
pub fn setup(
    infos: &[CellInfo],
    selection: Option<&serde_json::Value>,
    from: Option<&SettingsFrom>,
    reference: Option<&str>,
    margin: f64,
) -> Setup {
    let mut lines = grid_lines(infos, reference, margin);
    for m in &distinct(infos.iter().map(|c| c.method.clone())) {
        method_lines(&mut lines, infos, m, selection);
    }
    if let Some(longest) = longest_examples(infos) {
        put(&mut lines, "longest training example (tokens)", longest);
    }
    put(
        &mut lines,
        "device, precision",
        listed(distinct(infos.iter().map(|c| {
            format!(
                "{}, {}",
                field(c, &["cell", "eval", "device"]),
                precision(c)
            )
        }))),
    );
    put(&mut lines, "code version", across(infos, &["code_version"]));
    put(
        &mut lines,
        "selection",
        if let Some(f) = from.filter(|f| f.same_data) {
            format!("the hyper-parameters and lengths of the methods marked \"settings from\" were chosen on the dev split of this model, these datasets, tasks and languages by the selection of another experiment ({}; its candidates' cells are in this store) and fixed for every seed and K (lora-full's length by early stopping on dev where set); a true few-shot setting would not have a dev split this large", f.record)
        } else if let Some(f) = from {
            format!("the hyper-parameters and lengths of the methods marked \"settings from\" were chosen on the dev split of another study ({}) and used here unchanged, not searched on this experiment's data (lora-full's length by early stopping on this experiment's dev split where set); a true few-shot setting would not have a dev split this large", f.record)
        } else if selection.is_some() {
            "the searched hyper-parameters and lengths were chosen on the dev split, for every searched method alike (lora-full's length by early stopping on dev where set); a true few-shot setting would not have a dev split this large".into()
        } else {
            "none: every method ran with the experiment file's settings (no [search])".into()
        },
    );
    Setup { lines }
}

/// The lines about the grid as a whole: experiment, model and data identity, tasks, languages,
/// test split, budgets, seeds and the declared reference.
fn grid_lines(infos: &[CellInfo], reference: Option<&str>, margin: f64) -> Vec<(String, String)> {
    let mut lines = Vec::new();
    let recorded: [(&str, &[&str]); 6] = [
        ("experiment", &["cell", "experiment"]),
        ("model", &["cell", "eval", "model"]),
        ("model weights sha256", &["info", "model_sha256"]),
        (
            "datasets manifest sha256",
            &["info", "datasets_manifest_sha256"],
        ),
        ("tasks", &["cell", "eval", "tasks"]),
        ("languages", &["cell", "eval", "langs"]),
    ];
    for (k, path) in recorded {
        put(&mut lines, k, across(infos, path));
    }
    put(
        &mut lines,
        "test split, cap",
        listed(distinct(infos.iter().map(|c| {
            format!(
                "{} (limit {})",
                match field(c, &["cell", "eval", "split"]) {
                    x if x.is_empty() => "each task's eval split".to_string(),
                    x => x,
                },
                match field(c, &["cell", "eval", "limit"]) {
                    x if x.is_empty() => "none: the whole split".to_string(),
                    x => x,
                }
            )
        }))),
    );
    put(
        &mut lines,
        "K grid",
        listed(
            distinct(infos.iter().filter_map(|c| c.k))
                .into_iter()
                .map(|k| k.to_string())
                .collect(),
        ),
    );
    put(
        &mut lines,
        "seeds",
        listed(
            distinct(infos.iter().map(|c| c.seed))
                .into_iter()
                .map(|k| k.to_string())
                .collect(),
        ),
    );
    put(
        &mut lines,
        "reference, margin",
        match reference {
            Some(r) => {
                format!("{r}, {margin:.1} accuracy points (declared in the experiment file)")
            }
            None => "none declared".into(),
        },
    );
    lines
}

/// The lines of method `m`, from its first cell with a training run: settings, the length
/// chosen on dev, LoRA, wall time over all its cells and what selection chose.
fn method_lines(
    lines: &mut Vec<(String, String)>,
    infos: &[CellInfo],
    m: &str,
    selection: Option<&serde_json::Value>,
) {
    let Some(c) = infos
        .iter()
        .find(|c| c.method == m && !c.training().is_null())
    else {
        return;
    };
    let cfg = &c.training()["config"];
    put(lines, &format!("{m}: settings"), settings(cfg, m));
    if let Some(es) = c.training()["early_stopping"].as_object() {
        put(
            lines,
            &format!("{m}: length chosen on dev"),
            dev_choice(es, c.seed),
        );
    }
    if m == Method::LoraFull.name() {
        if let Some(d) = data_shares(&c.training()["distinct_examples"]) {
            put(lines, &format!("{m}: training data"), d);
        }
    }
    let t = &c.training()["resolved"];
    put(
        lines,
        &format!("{m}: LoRA"),
        format!(
            "r={} alpha={} dropout={} targets={} (scaling {})",
            cfg["lora_r"],
            cfg["lora_alpha"],
            cfg["lora_dropout"],
            cfg["lora_targets"],
            t["lora_scaling"]
        ),
    );
    let secs: f64 = infos
        .iter()
        .filter(|x| x.method == m)
        .map(|x| x.train_wall_seconds() + x.doc["info"]["eval_seconds"].as_f64().unwrap_or(0.0))
        .sum();
    put(
        lines,
        &format!("{m}: wall time (all its cells)"),
        format!("{:.0} s", secs),
    );
    if let Some(sel) = selection.and_then(|v| v.get(m)) {
        let split = sel["split"].as_str().unwrap_or("dev");
        let of = sel["candidates"].as_array().map_or(0, Vec::len);
        match sel["from"].as_str() {
            Some(f) => put(
                lines,
                &format!("{m}: settings from"),
                format!(
                    "{f}: {} (chosen there on {split} at K = {}, seed {}, of {of} candidates)",
                    sel["chosen"], sel["k"], sel["seed"]
                ),
            ),
            None => put(
                lines,
                &format!("{m}: selected on {split}"),
                format!("{} (of {of} candidates)", sel["chosen"]),
            ),
        }
    }
}

/// The other study's record a selection record took its settings from, if any.
pub fn settings_from(selection: &serde_json::Value) -> Option<String> {
    selection
        .as_object()?
        .values()
        .find_map(|e| e["from"].as_str().map(str::to_string))
}

/// Where a study's settings came from when `[study] settings_from` named another study's
/// selection record.
#[derive(Debug, Clone, PartialEq)]
pub struct SettingsFrom {
    /// The record's path.
    pub record: String,
    /// The record's candidates ran, in this store, on the compared cells' model weights,
    /// datasets, tasks and languages: the choice was made on this data's dev split, by another
    /// experiment (a grid split from its selection), not on other data.
    pub same_data: bool,
}

/// What decides a cell's data: model weights, datasets manifest, tasks and languages.
fn data_identity(c: &CellInfo) -> String {
    let (info, eval) = (&c.doc["info"], &c.doc["cell"]["eval"]);
    serde_json::json!([
        info["model_sha256"],
        info["datasets_manifest_sha256"],
        eval["tasks"],
        eval["langs"]
    ])
    .to_string()
}

/// The [`SettingsFrom`] of a selection `record` taken from another study, with its candidates'
/// cells read from `store` and compared with the compared cells `infos` (none found: not the
/// same data, as far as this store can tell).
pub fn settings_source(
    store: &Store,
    record: &serde_json::Value,
    infos: &[CellInfo],
) -> Result<Option<SettingsFrom>> {
    let Some(path) = settings_from(record) else {
        return Ok(None);
    };
    let keys: HashSet<String> = record
        .as_object()
        .into_iter()
        .flat_map(|o| o.values())
        .filter(|m| m["from"].is_string())
        .flat_map(|m| m["candidates"].as_array().into_iter().flatten())
        .filter_map(|c| c["key"].as_str().map(str::to_string))
        .collect();
    let candidates = cell_infos(store, &keys)?;
    let ids: HashSet<String> = candidates.iter().chain(infos).map(data_identity).collect();
    Ok(Some(SettingsFrom {
        record: path,
        same_data: !candidates.is_empty() && !infos.is_empty() && ids.len() == 1,
    }))
}

/// The training settings a run of method `m` recorded, `key=value` separated by spaces: the
/// keys the method reads ([`settings_read`]; every key for a method name this version does not
/// know), unset ones left out.
fn settings(cfg: &serde_json::Value, m: &str) -> String {
    let keys = Method::parse(m).map_or_else(|_| SETTING_KEYS.to_vec(), settings_read);
    let set: Vec<String> = keys
        .iter()
        .filter(|k| !cfg[**k].is_null())
        .map(|k| format!("{k}={}", cfg[*k]))
        .collect();
    set.join(" ")
}

/// The examples of an all-data run per task and language (`distinct_examples`: `task/lang` to
/// a count) as each task's share of the total: `N examples: task n (p%: lang n, ...); ...`.
/// What a multi-task mix is made of, the capped tasks' shares included.
fn data_shares(distinct: &serde_json::Value) -> Option<String> {
    let mut by_task: BTreeMap<&str, Vec<(&str, u64)>> = BTreeMap::new();
    for (unit, n) in distinct.as_object()? {
        let (task, lang) = unit.split_once('/').unwrap_or((unit, ""));
        by_task
            .entry(task)
            .or_default()
            .push((lang, n.as_u64().unwrap_or(0)));
    }
    let total: u64 = by_task.values().flatten().map(|(_, n)| n).sum();
    if total == 0 {
        return None;
    }
    let tasks: Vec<String> = by_task
        .iter()
        .map(|(task, langs)| {
            let n: u64 = langs.iter().map(|(_, n)| n).sum();
            let each: Vec<String> = langs
                .iter()
                .filter(|(l, _)| !l.is_empty())
                .map(|(l, n)| format!("{l} {n}"))
                .collect();
            let pct = 100.0 * n as f64 / total as f64;
            match each.is_empty() {
                true => format!("{task} {n} ({pct:.0}%)"),
                false => format!("{task} {n} ({pct:.0}%: {})", each.join(", ")),
            }
        })
        .collect();
    Some(format!("{total} examples: {}", tasks.join("; ")))
}

/// Early stopping's record of a run (seed `seed`): the best dev score, its step and settings.
fn dev_choice(es: &serde_json::Map<String, serde_json::Value>, seed: u64) -> String {
    let get = |k: &str| es.get(k).map(|v| v.to_string()).unwrap_or_default();
    format!(
        "best dev {} at step {} (seed {}; eval every {} steps, patience {})",
        get("best_score"),
        get("best_step"),
        seed,
        get("eval_every"),
        get("patience")
    )
}

/// The longest training example per unit over the cells (`unit n, ...`), when recorded.
fn longest_examples(infos: &[CellInfo]) -> Option<String> {
    let longest: BTreeMap<String, u64> = infos
        .iter()
        .flat_map(|c| {
            c.training()["longest_tokens"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(u, n)| (u.clone(), n.as_u64().unwrap_or(0)))
                .collect::<Vec<_>>()
        })
        .fold(BTreeMap::new(), |mut m, (u, n)| {
            let e = m.entry(u).or_insert(0);
            *e = (*e).max(n);
            m
        });
    (!longest.is_empty()).then(|| {
        longest
            .iter()
            .map(|(u, n)| format!("{u} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    })
}

impl Setup {
    pub fn markdown(&self) -> String {
        let mut s = String::from("| setting | value |\n|---|---|\n");
        for (k, v) in &self.lines {
            s.push_str(&format!("| {k} | {} |\n", v.replace('|', "\\|")));
        }
        s
    }

    pub fn html(&self) -> String {
        html_rows(
            &["setting", "value"],
            &self
                .lines
                .iter()
                .map(|(k, v)| vec![k.clone(), v.clone()])
                .collect::<Vec<_>>(),
            "setup",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_all_data_run_states_each_tasks_share() {
        let d = serde_json::json!({
            "afrisenti/hau_Latn": 1000, "afrisenti/swa_Latn": 1000,
            "nusax/ind_Latn": 500, "sib200/eng_Latn": 701, "sib200/swh_Latn": 799
        });
        assert_eq!(
            data_shares(&d).unwrap(),
            "4000 examples: afrisenti 2000 (50%: hau_Latn 1000, swa_Latn 1000); nusax 500 (12%: ind_Latn 500); sib200 1500 (38%: eng_Latn 701, swh_Latn 799)"
        );
        assert_eq!(data_shares(&serde_json::json!({})), None);
    }

    #[test]
    fn a_method_lists_the_settings_it_reads() {
        let cfg = serde_json::json!({
            "lr": 0.001, "passes": 5.0, "batch_size": 8, "inner_lr": 0.01, "inner_steps": 3,
            "n_support": 4, "n_query": 4, "eval_every": 0, "patience": 3, "max_len": 256,
            "unit": "lang", "full_cap": null
        });
        assert_eq!(
            settings(&cfg, "stage2-only"),
            "lr=0.001 passes=5.0 n_support=4 n_query=4 max_len=256 unit=\"lang\""
        );
        assert_eq!(
            settings(&cfg, "meta-lora"),
            "lr=0.001 passes=5.0 inner_lr=0.01 inner_steps=3 n_support=4 n_query=4 max_len=256 unit=\"lang\""
        );
        assert_eq!(
            settings(&cfg, "lora-k"),
            "lr=0.001 passes=5.0 batch_size=8 eval_every=0 patience=3 max_len=256 unit=\"lang\""
        );
        // A method this version does not know: every recorded key.
        assert!(settings(&cfg, "meta-lora-v2").contains("inner_lr=0.01 inner_steps=3"));
    }

    fn dist(pred: &[(i64, usize)], gold: &[(i64, usize)]) -> LabelDist {
        LabelDist {
            method: "m".into(),
            k: Some(64),
            seed: 0,
            task: "t".into(),
            lang: "l".into(),
            pred: pred.iter().copied().collect(),
            gold: gold.iter().copied().collect(),
        }
    }

    fn info(method: &str, k: Option<i64>, seed: u64, info: serde_json::Value) -> CellInfo {
        CellInfo {
            key: format!("{method}-{seed}"),
            method: method.into(),
            k,
            seed,
            doc: serde_json::json!({ "info": info }),
        }
    }

    #[test]
    fn the_budget_counts_a_resumed_or_shared_run_whole() {
        // Seed 0 resumed near its end (its last process trained 144 s of a 1,342 s run); seed
        // 1 found its run finished by a sibling (0.4 s); both report the run's own total.
        let resumed = info(
            "lora-k",
            Some(64),
            0,
            serde_json::json!({"train_seconds": 144.0, "eval_seconds": 200.0,
                "training": {"train_wall_seconds": 1342.0, "optimizer_steps": 336}}),
        );
        let shared = info(
            "lora-k",
            Some(64),
            1,
            serde_json::json!({"train_seconds": 0.4, "eval_seconds": 190.0,
                "training": {"train_wall_seconds": 1358.0, "optimizer_steps": 336}}),
        );
        // A cell from before the training facts were recorded keeps its process time.
        let old = info(
            "meta-lora",
            Some(64),
            0,
            serde_json::json!({"train_seconds": 900.0, "eval_seconds": 100.0}),
        );
        let base = info("base", None, 0, serde_json::json!({"eval_seconds": 50.0}));
        let rows = budget(
            &[resumed, shared, old, base],
            &[
                ("lora-k".into(), Some(64)),
                ("meta-lora".into(), Some(64)),
                ("base".into(), None),
            ],
        );
        assert_eq!(rows.len(), 3);
        assert_eq!((rows[0].seeds, rows[0].train_seconds), (2, 1350.0));
        assert_eq!(rows[0].eval_seconds, 195.0);
        assert_eq!(rows[1].train_seconds, 900.0);
        assert_eq!(rows[2].train_seconds, 0.0);
    }

    #[test]
    fn the_collapse_warning_fires_on_a_planted_collapse_only() {
        // The multi-task K = 64 case: "neutral" (1) answered 197 of 200 times, a third of gold.
        let planted = dist(&[(0, 2), (1, 197), (2, 1)], &[(0, 67), (1, 66), (2, 67)]);
        assert!(planted.collapsed());
        assert_eq!(collapse_warnings(std::slice::from_ref(&planted)).len(), 1);
        // A balanced run, and a skewed one that follows a skewed gold distribution.
        let balanced = dist(&[(0, 70), (1, 60), (2, 70)], &[(0, 67), (1, 66), (2, 67)]);
        assert!(!balanced.collapsed());
        let follows_gold = dist(&[(0, 170), (1, 30)], &[(0, 150), (1, 50)]);
        assert!(!follows_gold.collapsed());
        // The thresholds are strict: exactly 80% of predictions is not a collapse.
        let edge = dist(&[(0, 80), (1, 20)], &[(0, 10), (1, 90)]);
        assert!(!edge.collapsed());
        assert!(collapse_warnings(&[balanced, follows_gold, edge]).is_empty());
    }
}
