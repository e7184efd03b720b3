//! An evaluation end to end: an [`EvalPlan`] (model, adapters, opened tasks) in; under the output
//! folder `samples.parquet` (one row per variant x example), `metrics.parquet` and
//! `metrics.md` (per variant x task x language, plus micro and macro averages over languages)
//! and `results.json` (the resolved configuration, the batch size it ran at, task versions,
//! model and adapter identity, seeds, code version, timing). Everything is checked before the first forward pass; all files
//! are written atomically.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use polars::prelude::*;
use rayon::prelude::*;
use serde::Serialize;

use super::batch::Workload;
use super::choices::{score_choices, ChoiceRequest};
use super::metrics::{self, Estimate};
use super::resume::{adapter_digest, group_fingerprint, groups_dir, Resume};
use crate::data::schema::{self, Example};
use crate::data::{catalogue, sample};
use crate::error::{Error, Result};
use crate::model::lora::Adapter;
use crate::model::LoadedModel;
use crate::plan::eval::BatchSize;
use crate::plan::{EvalConfig, EvalPlan};
use crate::tasks::{Rendered, Scoring, TaskSpec};
use crate::util::{derive_seed, sha256_hex, write_bytes_atomic, Rng};

/// One example ready to score.
#[derive(Debug, Clone)]
pub struct Item {
    pub task: String,
    pub lang_code: String,
    pub id: String,
    /// The full prompt (in-context examples included).
    pub prompt: String,
    pub rendered: Rendered,
    pub target: Option<String>,
}

/// One variant (the base model or an adapter) and, for per-task adapter sets, which adapter
/// serves which `task.lang` unit.
pub enum Variant {
    Base,
    Shared(Adapter),
    PerTask(BTreeMap<String, Adapter>),
}

/// A named variant with where it came from.
pub struct NamedVariant {
    pub name: String,
    pub source: Option<PathBuf>,
    pub variant: Variant,
}

/// One scored example.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Record {
    pub variant: String,
    pub task: String,
    pub lang: String,
    pub id: String,
    pub prompt_sha: String,
    #[serde(with = "super::resume::f64_bits")]
    pub logprobs: Option<Vec<f64>>,
    pub pred: Option<i64>,
    pub pred_norm: Option<i64>,
    pub pred_bytes: Option<i64>,
    pub gold: Option<i64>,
    pub generated: Option<String>,
    pub extracted: Option<String>,
    pub target: Option<String>,
    /// Per metric name: did this example count as correct.
    pub outcomes: BTreeMap<String, bool>,
}

/// One metrics row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetricRow {
    pub variant: String,
    pub task: String,
    /// A language code, or `micro` / `macro` for the averages over languages.
    pub lang: String,
    pub metric: String,
    pub higher_is_better: bool,
    pub n: usize,
    pub value: f64,
    pub stderr: f64,
    pub ci_low: f64,
    pub ci_high: f64,
}

/// The examples of the evaluation, checked and prompted. Every problem is listed at once.
pub fn prepare_items(plan: &EvalPlan) -> Result<(Vec<Item>, BTreeMap<String, TaskSpec>)> {
    let cfg = &plan.config;
    let mut problems = Vec::new();
    let mut items = Vec::new();
    let mut specs = BTreeMap::new();
    for opened in plan.tasks.iter().cloned() {
        let crate::tasks::OpenedTask {
            name: task,
            spec,
            path,
            langs: chosen,
        } = opened;
        let split = cfg.split.clone().unwrap_or_else(|| spec.eval_split.clone());
        let shot_split = spec
            .fewshot_split
            .clone()
            .unwrap_or_else(|| spec.train_split.clone());
        // Every split of the chosen languages: a missing split's message lists those there are.
        let names: Vec<&str> = chosen.iter().map(|e| e.lang.as_str()).collect();
        let rows = catalogue::read_rows(&path, &names, None)?;
        if spec.scoring == Scoring::Generate && spec.generation.is_none() {
            problems.push(format!("task `{task}`: generation settings missing"));
        }
        let t = TaskRows {
            task: &task,
            spec: &spec,
            cfg,
            split: &split,
            shot_split: &shot_split,
        };
        for e in &chosen {
            let in_lang: Vec<&Example> = rows.iter().filter(|r| r.lang == e.lang).collect();
            t.lang_items(&e.lang_code, &in_lang, &mut items, &mut problems);
        }
        specs.insert(task, spec);
    }
    if !problems.is_empty() {
        return Err(Error::Problems {
            context: "the evaluation".into(),
            problems,
        });
    }
    Ok((items, specs))
}

/// One task's data as `prepare_items` reads it: the task, its spec, the configuration, the
/// split to evaluate and the split the in-context examples come from.
struct TaskRows<'a> {
    task: &'a String,
    spec: &'a TaskSpec,
    cfg: &'a EvalConfig,
    split: &'a String,
    shot_split: &'a String,
}

impl TaskRows<'_> {
    /// The items of one language (`in_lang`: its rows of every split) into `items`, or its
    /// problems into `problems`.
    fn lang_items(
        &self,
        lang_code: &str,
        in_lang: &[&Example],
        items: &mut Vec<Item>,
        problems: &mut Vec<String>,
    ) {
        let (task, cfg) = (self.task, self.cfg);
        let (split, shot_split) = (self.split, self.shot_split);
        let mut eval: Vec<&Example> = in_lang
            .iter()
            .copied()
            .filter(|r| &r.split == split)
            .collect();
        if eval.is_empty() {
            let mut available: Vec<String> = in_lang.iter().map(|r| r.split.clone()).collect();
            available.sort();
            available.dedup();
            problems.push(
                Error::MissingSplit {
                    task: task.clone(),
                    lang: lang_code.to_string(),
                    split: split.clone(),
                    available,
                }
                .to_string(),
            );
            return;
        }
        if let Some(n) = cfg.cap(eval.len()) {
            eval = self.limited(eval, n, lang_code);
        }
        problems.extend(self.missing_field(&eval, lang_code));
        let shots: Vec<&Example> = in_lang
            .iter()
            .copied()
            .filter(|r| &r.split == shot_split)
            .collect();
        if cfg.shots > 0 && shots.len() < cfg.shots + usize::from(shot_split == split) {
            problems.push(format!(
                "task `{task}`/{}: {} in-context examples asked for but split `{shot_split}` has {}",
                lang_code,
                cfg.shots,
                shots.len()
            ));
            return;
        }
        let shot_text: Vec<(String, String)> = match self.shot_texts(&shots) {
            Ok(v) => v,
            Err(err) => {
                problems.push(format!("{err} (few-shot split `{shot_split}`)"));
                return;
            }
        };
        for x in eval {
            match self.item(x, lang_code, &shot_text) {
                Ok(it) => items.push(it),
                Err(p) => {
                    problems.push(p);
                    break;
                }
            }
        }
    }

    /// A label-stratified subset of `n` of `eval` (the sampler's draw order, seeded by the task
    /// and language only, so every variant and seed sees the same examples), kept in file
    /// order: test splits are often sorted by label, so the first N would be one class.
    fn limited<'e>(&self, eval: Vec<&'e Example>, n: usize, lang_code: &str) -> Vec<&'e Example> {
        let ids: Vec<&str> = eval.iter().map(|x| x.id.as_str()).collect();
        let labels: Vec<Option<i64>> = eval.iter().map(|x| x.label).collect();
        let mut keep: Vec<usize> =
            sample::draw_order(&ids, &labels, 0, &[self.task, lang_code, "eval-limit"])
                .into_iter()
                .take(n)
                .collect();
        keep.sort_unstable();
        keep.into_iter().map(|i| eval[i]).collect()
    }

    /// The first template field the data lacks (an optional column that is null here), named
    /// with the first example without it.
    fn missing_field(&self, eval: &[&Example], lang_code: &str) -> Option<String> {
        let task = self.task;
        self.spec
            .eval_fields_used()
            .into_iter()
            .filter(|f| !["text", "lang", "lang_code", "id"].contains(&f.as_str()))
            .find_map(|f| {
                let x = eval
                    .iter()
                    .find(|x| <Example as crate::tasks::Fields>::field(x, &f).is_none())?;
                Some(format!(
                    "task `{task}`: the template uses `{{{f}}}` but example `{}` ({}) has no `{f}` value",
                    x.id, lang_code
                ))
            })
    }

    /// The in-context examples, rendered with their answers: `(id, text)`.
    fn shot_texts(&self, shots: &[&Example]) -> Result<Vec<(String, String)>> {
        shots
            .iter()
            .map(|s| {
                let r = self.spec.render_example(s)?;
                Ok((
                    s.id.clone(),
                    format!("{}{}", r.context, r.answer.unwrap_or_default()),
                ))
            })
            .collect()
    }

    /// One example as an item: its prompt (the seeded in-context examples, then its own
    /// context), or the problem that stops the language.
    fn item(
        &self,
        x: &Example,
        lang_code: &str,
        shot_text: &[(String, String)],
    ) -> std::result::Result<Item, String> {
        let (task, spec, cfg) = (self.task, self.spec, self.cfg);
        let r = spec
            .render_eval_example(x)
            .map_err(|err| format!("{err} (split `{}`)", self.split))?;
        if spec.scoring == Scoring::MultipleChoice && r.gold.is_none() {
            return Err(format!(
                "task `{task}`: example `{}` ({}) has no label to score against",
                x.id, lang_code
            ));
        }
        let mut prompt = String::new();
        if cfg.shots > 0 {
            let mut pool: Vec<&(String, String)> =
                shot_text.iter().filter(|(id, _)| *id != x.id).collect();
            let mut rng = Rng::new(derive_seed(cfg.seed, &["fewshot", task, lang_code, &x.id]));
            rng.shuffle(&mut pool);
            for (_, t) in pool.iter().take(cfg.shots) {
                prompt.push_str(t);
                prompt.push_str(&spec.prompt.fewshot_separator);
            }
        }
        prompt.push_str(&r.context);
        Ok(Item {
            task: task.clone(),
            lang_code: lang_code.to_string(),
            id: x.id.clone(),
            prompt,
            target: x.target.clone(),
            rendered: r,
        })
    }
}

/// Resolves `--adapters` entries against the loaded model. A PEFT folder is one shared adapter;
/// a training run folder gives its shared `adapter/` and, when present, its per-task
/// `adapters/<task>.<lang>` set (named `<run>:per-task`); a run's `adapters/` folder given
/// itself is that per-task set alone.
/// The adapters in the subfolders of `dir` (one per `<task>.<lang>` unit), or every problem.
fn load_set(
    dir: &Path,
    name: &str,
    load: &dyn Fn(&Path, &str) -> Result<Adapter>,
) -> std::result::Result<BTreeMap<String, Adapter>, Vec<String>> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| vec![Error::io("read", dir, e).to_string()])?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("adapter_config.json").exists())
        .collect();
    entries.sort();
    let mut set = BTreeMap::new();
    let mut problems = Vec::new();
    for d in entries {
        let unit = d.file_name().unwrap().to_string_lossy().into_owned();
        match load(&d, &unit) {
            Ok(a) => {
                set.insert(unit, a);
            }
            Err(e) => problems.push(format!("adapter `{name}` ({unit}): {e}")),
        }
    }
    if problems.is_empty() {
        Ok(set)
    } else {
        Err(problems)
    }
}

pub fn load_variants(m: &LoadedModel, cfg: &EvalConfig) -> Result<Vec<NamedVariant>> {
    let mut out = Vec::new();
    if cfg.base {
        out.push(NamedVariant {
            name: "base".into(),
            source: None,
            variant: Variant::Base,
        });
    }
    let mut problems = Vec::new();
    let load = |dir: &Path, name: &str| {
        Adapter::load_peft(
            dir,
            name,
            &m.model.modules(),
            m.model.dtype,
            &m.model.device,
        )
    };
    for spec in &cfg.adapters {
        let (name, path) = match spec.split_once('=') {
            Some((n, p)) => (n.to_string(), PathBuf::from(p)),
            None => {
                let p = PathBuf::from(spec);
                let n = p
                    .file_name()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| spec.clone());
                (n, p)
            }
        };
        if path.join("adapter_config.json").exists() {
            match load(&path, &name) {
                Ok(a) => out.push(NamedVariant {
                    name,
                    source: Some(path),
                    variant: Variant::Shared(a),
                }),
                Err(e) => problems.push(format!("adapter `{name}`: {e}")),
            }
            continue;
        }
        // A training run (its `adapter/`, `adapters/` or manifest) is read as one below; only
        // a folder that is not a run is taken for a set of per-task adapters.
        let shared = path.join("adapter");
        let per = path.join("adapters");
        let is_run = shared.join("adapter_config.json").exists()
            || per.is_dir()
            || path.join("manifest.json").exists();
        // A folder of per-task adapters itself (a run's `adapters/`): one per-task variant.
        let subfolders: Vec<PathBuf> = std::fs::read_dir(&path)
            .map(|rd| {
                rd.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.join("adapter_config.json").exists())
                    .collect()
            })
            .unwrap_or_default();
        if !is_run && !subfolders.is_empty() {
            match load_set(&path, &name, &load) {
                Ok(set) => out.push(NamedVariant {
                    name,
                    source: Some(path),
                    variant: Variant::PerTask(set),
                }),
                Err(ps) => problems.extend(ps),
            }
            continue;
        }
        if !shared.exists() && !per.exists() {
            problems.push(format!(
                "adapter `{name}`: {} is neither a PEFT folder (adapter_config.json) nor a training run (adapter/ or adapters/)",
                path.display()
            ));
            continue;
        }
        if shared.join("adapter_config.json").exists() {
            match load(&shared, &name) {
                Ok(a) => out.push(NamedVariant {
                    name: name.clone(),
                    source: Some(shared),
                    variant: Variant::Shared(a),
                }),
                Err(e) => problems.push(format!("adapter `{name}`: {e}")),
            }
        }
        if per.is_dir() {
            let per_name = format!("{name}:per-task");
            match load_set(&per, &per_name, &load) {
                Ok(set) => out.push(NamedVariant {
                    name: per_name,
                    source: Some(per),
                    variant: Variant::PerTask(set),
                }),
                Err(ps) => problems.extend(ps),
            }
        }
    }
    if !problems.is_empty() {
        return Err(Error::Problems {
            context: "the adapters".into(),
            problems,
        });
    }
    Ok(out)
}

/// The adapter a variant uses for one task and language (`None`: the base model).
fn adapter_for<'a>(
    v: &'a Variant,
    task: &str,
    lang: &str,
) -> std::result::Result<Option<&'a Adapter>, String> {
    match v {
        Variant::Base => Ok(None),
        Variant::Shared(a) => Ok(Some(a)),
        Variant::PerTask(set) => set
            .get(&format!("{task}.{lang}"))
            .or_else(|| set.get(task))
            .map(Some)
            .ok_or_else(|| {
                format!(
                    "no adapter for {task}/{lang} (has: {})",
                    set.keys().cloned().collect::<Vec<_>>().join(", ")
                )
            }),
    }
}

/// Progress of an evaluation: (variant, task, language, done, total) per group.
pub type ProgressFn<'a> = dyn FnMut(&str, &str, &str, usize, usize) + 'a;

/// Scores every item with every variant.
pub fn score_all(
    m: &LoadedModel,
    variants: &[NamedVariant],
    items: &[Item],
    specs: &BTreeMap<String, TaskSpec>,
    cfg: &EvalConfig,
    progress: &mut ProgressFn,
) -> Result<Vec<Record>> {
    Ok(score_all_sized(m, variants, items, specs, cfg, None, progress)?.0)
}

/// [`score_all`], with the batch size it ran at (`auto` resolved by [`super::batch::choose`]).
/// With `resume`, finished groups are kept and read back, and the stop flag ends scoring
/// ([`super::resume`]).
pub fn score_all_sized(
    m: &LoadedModel,
    variants: &[NamedVariant],
    items: &[Item],
    specs: &BTreeMap<String, TaskSpec>,
    cfg: &EvalConfig,
    resume: Option<&Resume>,
    progress: &mut ProgressFn,
) -> Result<(Vec<Record>, usize)> {
    let groups = item_groups(items);
    check_variants(variants, &groups)?;
    let requests = choice_requests(&m.tok, items, specs)?;
    let batch = match cfg.batch_size {
        BatchSize::Fixed(n) => n,
        BatchSize::Auto => {
            let largest = groups.iter().map(|(_, idx)| idx.len()).max().unwrap_or(1);
            let w = Workload::new(&m.tok, items, specs, &requests, largest, cfg.max_len)?;
            super::batch::choose(m, &w)?
        }
    };
    let context = serde_json::to_string(&(crate::util::code_version(), cfg, batch))?;
    let n_groups = variants.len() * groups.len();
    let mut records = Vec::with_capacity(items.len() * variants.len());
    for (vi, v) in variants.iter().enumerate() {
        for (gi, ((task, lang), idx)) in groups.iter().enumerate() {
            let spec = &specs[task];
            let adapter = adapter_for(&v.variant, task, lang).map_err(Error::Invalid)?;
            let kept = vi * groups.len() + gi;
            let halt = || resume.map_or(Ok(()), |r| r.check(kept, n_groups));
            let fp = match resume {
                Some(r) => {
                    let its: Vec<&Item> = idx.iter().map(|&i| &items[i]).collect();
                    let fp = group_fingerprint(
                        &context,
                        (&v.name, &adapter_digest(adapter)?),
                        (task, &spec.version.to_string()),
                        lang,
                        &its,
                    )?;
                    if let Some(saved) = r.load(&fp)? {
                        r.read_back.set(r.read_back.get() + 1);
                        progress(&v.name, task, lang, idx.len(), idx.len());
                        records.extend(saved);
                        continue;
                    }
                    Some((r, fp))
                }
                None => None,
            };
            let g = Group {
                m,
                variant: &v.name,
                adapter,
                task,
                lang,
                idx,
                cfg,
                batch,
                halt: &halt,
            };
            progress(&v.name, task, lang, 0, idx.len());
            let start = records.len();
            let metric_names: Vec<String> = spec.metrics.iter().map(|m| m.name.clone()).collect();
            match spec.scoring {
                Scoring::MultipleChoice => {
                    let scores = g.choice_scores(&requests, progress)?;
                    for (&i, sc) in idx.iter().zip(scores) {
                        records.push(g.choice_record(&items[i], &sc, &metric_names));
                    }
                }
                Scoring::Generate => {
                    let gen = spec.generation.as_ref().expect("checked");
                    g.generate(items, gen, &metric_names, &mut records, progress)?;
                }
            }
            if let Some((r, fp)) = fp {
                r.save(&fp, &records[start..])?;
            }
        }
    }
    Ok((records, batch))
}

/// The items per (task, language), in item order.
fn item_groups(items: &[Item]) -> Vec<((String, String), Vec<usize>)> {
    let mut groups: Vec<((String, String), Vec<usize>)> = Vec::new();
    for (i, it) in items.iter().enumerate() {
        let key = (it.task.clone(), it.lang_code.clone());
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(i),
            None => groups.push((key, vec![i])),
        }
    }
    groups
}

/// Every variant has an adapter for every (task, language) group, or every gap is listed.
fn check_variants(
    variants: &[NamedVariant],
    groups: &[((String, String), Vec<usize>)],
) -> Result<()> {
    let mut problems = Vec::new();
    for v in variants {
        for ((t, l), _) in groups {
            if let Err(e) = adapter_for(&v.variant, t, l) {
                problems.push(format!("variant `{}`: {e}", v.name));
            }
        }
    }
    if !problems.is_empty() {
        return Err(Error::Problems {
            context: "the adapters".into(),
            problems,
        });
    }
    Ok(())
}

/// The multiple-choice items tokenised (once, in parallel): the context and each choice's
/// continuation; `None` for items of other tasks.
fn choice_requests(
    tok: &crate::model::tokenizer::Tok,
    items: &[Item],
    specs: &BTreeMap<String, TaskSpec>,
) -> Result<Vec<Option<ChoiceRequest>>> {
    items
        .par_iter()
        .map(|it| -> Result<Option<ChoiceRequest>> {
            if specs[&it.task].scoring != Scoring::MultipleChoice {
                return Ok(None);
            }
            let mut context = None;
            let mut continuations = Vec::with_capacity(it.rendered.choices.len());
            for c in &it.rendered.choices {
                let (ctx, cont) = tok.encode_pair(&it.prompt, c)?;
                if let Some(prev) = &context {
                    if *prev != ctx {
                        return Err(Error::Invalid(format!(
                            "{}/{} `{}`: the context tokenises differently per choice",
                            it.task, it.lang_code, it.id
                        )));
                    }
                } else {
                    context = Some(ctx);
                }
                continuations.push(cont);
            }
            Ok(Some(ChoiceRequest {
                context: context.unwrap_or_default(),
                continuations,
            }))
        })
        .collect()
}

/// One (variant, task, language) group being scored: the model, the variant's name and
/// adapter, the group's item indices, the configuration and the batch size.
struct Group<'a> {
    m: &'a LoadedModel,
    variant: &'a str,
    adapter: Option<&'a Adapter>,
    task: &'a String,
    lang: &'a String,
    idx: &'a [usize],
    cfg: &'a EvalConfig,
    /// Examples per forward pass (`cfg.batch_size`, `auto` resolved).
    batch: usize,
    /// Called before each forward pass: an error (a stop request) ends the scoring.
    halt: &'a dyn Fn() -> Result<()>,
}

impl Group<'_> {
    /// The scores of every choice of the group's items, `batch * 8` items at a time.
    fn choice_scores(
        &self,
        requests: &[Option<ChoiceRequest>],
        progress: &mut ProgressFn,
    ) -> Result<Vec<Vec<crate::model::score::Score>>> {
        let (batch, idx) = (self.batch.max(1), self.idx);
        let reqs: Vec<ChoiceRequest> = idx
            .iter()
            .map(|&i| requests[i].clone().expect("mc"))
            .collect();
        let mut scores = Vec::with_capacity(reqs.len());
        for (ci, chunk) in reqs.chunks(batch * 8).enumerate() {
            (self.halt)()?;
            scores.extend(score_choices(
                &self.m.model,
                self.adapter,
                chunk,
                batch,
                self.cfg.max_len,
            )?);
            progress(
                self.variant,
                self.task,
                self.lang,
                (ci * batch * 8 + chunk.len()).min(idx.len()),
                idx.len(),
            );
        }
        Ok(scores)
    }

    /// The record of a multiple-choice item from its choices' scores: the predictions (raw,
    /// length-normalised, per byte) and each metric's outcome.
    fn choice_record(
        &self,
        it: &Item,
        sc: &[crate::model::score::Score],
        metric_names: &[String],
    ) -> Record {
        let lps: Vec<f64> = sc.iter().map(|s| s.logprob).collect();
        let (p, pn, pb) = metrics::mc_predictions(&lps, &it.rendered.choices);
        let gold = it.rendered.gold.expect("checked");
        let mut outcomes = BTreeMap::new();
        for name in metric_names {
            let ok = match name.as_str() {
                "acc_norm" => pn == gold,
                "acc_bytes" => pb == gold,
                _ => p == gold,
            };
            outcomes.insert(name.clone(), ok);
        }
        Record {
            variant: self.variant.to_string(),
            task: self.task.clone(),
            lang: self.lang.clone(),
            id: it.id.clone(),
            prompt_sha: sha256_hex(it.prompt.as_bytes())[..16].to_string(),
            logprobs: Some(lps),
            pred: Some(p as i64),
            pred_norm: Some(pn as i64),
            pred_bytes: Some(pb as i64),
            gold: Some(gold as i64),
            generated: None,
            extracted: None,
            target: it.rendered.answer.clone(),
            outcomes,
        }
    }

    /// Generates the answers of the group's items and records them. Problems decode together,
    /// `batch_size` at a time (one forward per new token for the chunk instead of one per
    /// problem).
    fn generate(
        &self,
        items: &[Item],
        g: &crate::tasks::Generation,
        metric_names: &[String],
        records: &mut Vec<Record>,
        progress: &mut ProgressFn,
    ) -> Result<()> {
        let task = self.task;
        let re = regex::Regex::new(&g.answer_regex)
            .map_err(|e| Error::Invalid(format!("task `{task}`: answer_regex: {e}")))?;
        let mut n_done = 0;
        for chunk in self.idx.chunks(self.batch.max(1)) {
            (self.halt)()?;
            let prompts: Vec<&str> = chunk.iter().map(|&i| items[i].prompt.as_str()).collect();
            let texts = crate::model::score::generate_batch(
                &self.m.model,
                &self.m.tok,
                self.adapter,
                &prompts,
                g.max_tokens,
                &g.until,
            )?;
            for (&i, text) in chunk.iter().zip(texts) {
                records.push(self.generated_record(&items[i], &re, text, metric_names));
            }
            n_done += chunk.len();
            progress(self.variant, task, self.lang, n_done, self.idx.len());
        }
        Ok(())
    }

    /// The record of a generated answer: the text, the answer extracted by `re`, and whether it
    /// matches the target (every metric alike).
    fn generated_record(
        &self,
        it: &Item,
        re: &regex::Regex,
        text: String,
        metric_names: &[String],
    ) -> Record {
        let ext = metrics::extract(re, &text);
        let want = it.target.as_deref().map(metrics::normalize_answer);
        let ok = match (&ext, &want) {
            (Some(x), Some(w)) => metrics::normalize_answer(x) == *w,
            _ => false,
        };
        Record {
            variant: self.variant.to_string(),
            task: self.task.clone(),
            lang: self.lang.clone(),
            id: it.id.clone(),
            prompt_sha: sha256_hex(it.prompt.as_bytes())[..16].to_string(),
            logprobs: None,
            pred: None,
            pred_norm: None,
            pred_bytes: None,
            gold: None,
            generated: Some(text),
            extracted: ext,
            target: it.target.clone(),
            outcomes: metric_names.iter().map(|m| (m.clone(), ok)).collect(),
        }
    }
}

/// Metrics per variant x task x language, then micro (all examples pooled) and macro (mean
/// over languages, bootstrap interval) averages per variant x task.
pub fn summarize(
    records: &[Record],
    specs: &BTreeMap<String, TaskSpec>,
    seed: u64,
) -> Vec<MetricRow> {
    let mut out = Vec::new();
    let mut keys: Vec<(String, String)> = Vec::new();
    for r in records {
        let k = (r.variant.clone(), r.task.clone());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    for (variant, task) in keys {
        let spec = &specs[&task];
        let mut langs: Vec<String> = Vec::new();
        for r in records
            .iter()
            .filter(|r| r.variant == variant && r.task == task)
        {
            if !langs.contains(&r.lang) {
                langs.push(r.lang.clone());
            }
        }
        for m in &spec.metrics {
            let mut per_lang: Vec<Vec<f64>> = Vec::new();
            let mut pooled: Vec<bool> = Vec::new();
            let row = |lang: &str, e: Estimate| MetricRow {
                variant: variant.clone(),
                task: task.clone(),
                lang: lang.to_string(),
                metric: m.name.clone(),
                higher_is_better: m.higher_is_better,
                n: e.n,
                value: e.value,
                stderr: e.stderr,
                ci_low: e.ci_low,
                ci_high: e.ci_high,
            };
            for l in &langs {
                let o: Vec<bool> = records
                    .iter()
                    .filter(|r| r.variant == variant && r.task == task && &r.lang == l)
                    .map(|r| r.outcomes.get(&m.name).copied().unwrap_or(false))
                    .collect();
                out.push(row(l, metrics::proportion(&o)));
                per_lang.push(o.iter().map(|&x| f64::from(u8::from(x))).collect());
                pooled.extend(o);
            }
            if langs.len() > 1 {
                out.push(row("micro", metrics::proportion(&pooled)));
                out.push(row(
                    "macro",
                    metrics::macro_average(
                        &per_lang,
                        1000,
                        derive_seed(seed, &[&variant, &task, &m.name]),
                    ),
                ));
            }
        }
    }
    out
}

/// Writes the per-example records as Parquet.
pub fn write_samples(records: &[Record], path: &Path) -> Result<()> {
    schema::write_parquet(&mut samples_frame(records)?, path)
}

/// The per-example records as a frame (the `samples.parquet` layout).
pub fn samples_frame(records: &[Record]) -> Result<DataFrame> {
    let s = |name: &str, f: &dyn Fn(&Record) -> &str| {
        Column::new(name.into(), records.iter().map(f).collect::<Vec<&str>>())
    };
    let o = |name: &str, f: &dyn Fn(&Record) -> Option<&str>| {
        Column::new(
            name.into(),
            records.iter().map(f).collect::<Vec<Option<&str>>>(),
        )
    };
    let i = |name: &str, f: &dyn Fn(&Record) -> Option<i64>| {
        Column::new(
            name.into(),
            records.iter().map(f).collect::<Vec<Option<i64>>>(),
        )
    };
    let lps: ListChunked = records
        .iter()
        .map(|r| {
            r.logprobs
                .as_ref()
                .map(|v| Series::new(PlSmallStr::EMPTY, v.as_slice()))
        })
        .collect();
    let mut lps = lps.into_series();
    lps.rename("logprobs".into());
    let primary = |r: &Record| r.outcomes.values().next().copied().unwrap_or(false);
    Ok(DataFrame::new_infer_height(vec![
        s("variant", &|r| &r.variant),
        s("task", &|r| &r.task),
        s("lang", &|r| &r.lang),
        s("id", &|r| &r.id),
        s("prompt_sha", &|r| &r.prompt_sha),
        lps.into_column(),
        i("pred", &|r| r.pred),
        i("pred_norm", &|r| r.pred_norm),
        i("pred_bytes", &|r| r.pred_bytes),
        i("gold", &|r| r.gold),
        o("generated", &|r| r.generated.as_deref()),
        o("extracted", &|r| r.extracted.as_deref()),
        o("target", &|r| r.target.as_deref()),
        Column::new(
            "correct".into(),
            records.iter().map(primary).collect::<Vec<bool>>(),
        ),
    ])?)
}

/// Writes the metrics as Parquet and as a Markdown table.
pub fn write_metrics(rows: &[MetricRow], dir: &Path) -> Result<()> {
    schema::write_parquet(&mut metrics_frame(rows)?, &dir.join("metrics.parquet"))?;
    let mut md = String::from(
        "| variant | task | lang | metric | n | value | stderr | 95% interval |\n|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.4} | {:.4} | [{:.4}, {:.4}] |\n",
            r.variant, r.task, r.lang, r.metric, r.n, r.value, r.stderr, r.ci_low, r.ci_high
        ));
    }
    write_bytes_atomic(&dir.join("metrics.md"), md.as_bytes())
}

/// The metric rows as a frame (the `metrics.parquet` layout).
pub fn metrics_frame(rows: &[MetricRow]) -> Result<DataFrame> {
    let s = |name: &str, f: &dyn Fn(&MetricRow) -> &str| {
        Column::new(name.into(), rows.iter().map(f).collect::<Vec<&str>>())
    };
    let fl = |name: &str, f: &dyn Fn(&MetricRow) -> f64| {
        Column::new(name.into(), rows.iter().map(f).collect::<Vec<f64>>())
    };
    Ok(DataFrame::new_infer_height(vec![
        s("variant", &|r| &r.variant),
        s("task", &|r| &r.task),
        s("lang", &|r| &r.lang),
        s("metric", &|r| &r.metric),
        Column::new(
            "higher_is_better".into(),
            rows.iter()
                .map(|r| r.higher_is_better)
                .collect::<Vec<bool>>(),
        ),
        Column::new(
            "n".into(),
            rows.iter().map(|r| r.n as u64).collect::<Vec<u64>>(),
        ),
        fl("value", &|r| r.value),
        fl("stderr", &|r| r.stderr),
        fl("ci_low", &|r| r.ci_low),
        fl("ci_high", &|r| r.ci_high),
    ])?)
}

/// sha256 of an adapter folder's weights and config, for the results file.
fn adapter_identity(dir: &Path) -> serde_json::Value {
    let h = |f: &str| crate::util::sha256_file(&dir.join(f)).unwrap_or_default();
    serde_json::json!({
        "path": dir.display().to_string(),
        "adapter_model_sha256": h("adapter_model.safetensors"),
        "adapter_config_sha256": h("adapter_config.json"),
    })
}

/// What an evaluation produced.
pub struct EvalReport {
    pub records: Vec<Record>,
    pub metrics: Vec<MetricRow>,
    pub seconds: f64,
    pub examples_per_s: f64,
    /// The batch size scoring ran at (`auto` resolved).
    pub batch_size: usize,
    /// (Variant, task, language) groups read back from an interrupted run of this evaluation
    /// ([`evaluate_stoppable`]); `seconds` covers the others.
    pub groups_read_back: usize,
}

/// Checks the data, loads, scores and writes; see the module doc.
pub fn evaluate(plan: &EvalPlan, out: &Path, progress: &mut ProgressFn) -> Result<EvalReport> {
    evaluate_with(plan, out, None, progress)
}

/// [`evaluate`], stoppable and resumable: `stop` ends it before the next forward pass with
/// [`Error::EvalInterrupted`], keeping the (variant, task, language) groups it finished in
/// `out/groups/`; the next call with the same `out` reads them back instead of scoring them
/// again (see [`super::resume`]). The folder is removed once the outputs are written.
pub fn evaluate_stoppable(
    plan: &EvalPlan,
    out: &Path,
    stop: &std::sync::atomic::AtomicBool,
    progress: &mut ProgressFn,
) -> Result<EvalReport> {
    let r = Resume::new(stop, groups_dir(out));
    let report = evaluate_with(plan, out, Some(&r), progress)?;
    r.finish()?;
    Ok(report)
}

fn evaluate_with(
    plan: &EvalPlan,
    out: &Path,
    resume: Option<&Resume>,
    progress: &mut ProgressFn,
) -> Result<EvalReport> {
    let cfg = &plan.config;
    if !cfg.base && cfg.adapters.is_empty() {
        return Err(Error::Invalid(
            "nothing to evaluate: give --adapters or keep the base model".into(),
        ));
    }
    let (items, specs) = prepare_items(plan)?;
    let device = cfg.device.open()?;
    let m = crate::model::load(&cfg.model, cfg.dtype.dtype(), &device)?;
    let variants = load_variants(&m, cfg)?;
    let t0 = std::time::Instant::now();
    let (records, batch_size) =
        score_all_sized(&m, &variants, &items, &specs, cfg, resume, progress)?;
    let read_back = resume.map_or(0, |r| r.read_back.get());
    let seconds = t0.elapsed().as_secs_f64();
    let metrics_rows = summarize(&records, &specs, cfg.seed);
    std::fs::create_dir_all(out).map_err(|e| Error::io("create directory", out, e))?;
    write_samples(&records, &out.join("samples.parquet"))?;
    write_metrics(&metrics_rows, out)?;
    let model_cfg = std::fs::read(m.dir.join("config.json")).unwrap_or_default();
    let results = serde_json::json!({
        "kind": "mlbench-eval",
        "code_version": crate::util::code_version(),
        "config": cfg,
        "batch_size_chosen": batch_size,
        "tasks": specs.values().map(|s| serde_json::json!({
            "name": s.name, "version": s.version, "scoring": s.scoring,
            "split": cfg.split.clone().unwrap_or_else(|| s.eval_split.clone()),
        })).collect::<Vec<_>>(),
        "model": {
            "source": cfg.model,
            "dir": m.dir.display().to_string(),
            "arch": format!("{:?}", m.model.config.arch),
            "config_sha256": sha256_hex(&model_cfg),
        },
        "variants": variants.iter().map(|v| serde_json::json!({
            "name": v.name,
            "kind": match v.variant { Variant::Base => "base", Variant::Shared(_) => "adapter", Variant::PerTask(_) => "per-task adapters" },
            "source": v.source.as_deref().map(adapter_identity),
        })).collect::<Vec<_>>(),
        "seeds": { "seed": cfg.seed, "fewshot": "derive_seed(seed, fewshot, task, lang, id)", "bootstrap": "derive_seed(seed, variant, task, metric)" },
        "examples": items.len(),
        // Groups an interrupted run of this evaluation finished, read back: `seconds` and the
        // rate cover only the groups scored in this run.
        "groups_read_back": read_back,
        "seconds": seconds,
        "examples_per_s": (items.len() * variants.len()) as f64 / seconds.max(1e-9),
        "metrics": metrics_rows,
    });
    write_bytes_atomic(
        &out.join("results.json"),
        &serde_json::to_vec_pretty(&results)?,
    )?;
    Ok(EvalReport {
        examples_per_s: (items.len() * variants.len()) as f64 / seconds.max(1e-9),
        groups_read_back: read_back,
        records,
        metrics: metrics_rows,
        seconds,
        batch_size,
    })
}
