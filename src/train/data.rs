//! Training data: a [`TrainPlan`]'s opened tasks (specs and dataset files, read through
//! [`crate::data::catalogue`]) + the sampler's pools in, one [`TaskUnit`]
//! per task of the run out (its examples in pool order and their token sequences).
//!
//! Everything is checked before any sequence is built, and every problem (unknown task or
//! language, missing train split, K larger than a split, an example the template cannot render)
//! is reported at once.

use std::collections::HashMap;
use std::path::Path;

use rayon::prelude::*;

use super::step::Seq;
use crate::data::schema::Example;
use crate::data::{catalogue, sample};
use crate::error::{Error, Result};
use crate::model::tokenizer::Tok;
use crate::plan::train::{TrainConfig, TrainPlan, Unit};
use crate::tasks::TaskSpec;

/// One task of a run (a (dataset, language) pair, or a dataset in the multi-task scenario).
#[derive(Debug, Clone)]
pub struct TaskUnit {
    /// `sib200/swh_Latn` or `sib200`.
    pub name: String,
    pub task: String,
    /// Normalised language codes it covers.
    pub langs: Vec<String>,
    /// The examples: a pool in draw order, or the whole train split in file order.
    pub examples: Vec<Example>,
    /// Token sequences, one per example.
    pub seqs: Vec<Seq>,
    /// Sequences whose prompt (or answer) was cut to fit `max_len`.
    pub truncated: usize,
    /// The longest example in tokens before any cut (prompt + answer, BOS included).
    pub longest: usize,
}

impl TaskUnit {
    /// A name that is safe as a folder name (`sib200.swh_Latn`).
    pub fn dir_name(&self) -> String {
        self.name.replace('/', ".")
    }
}

/// The training examples of a configuration after checking: per (task, language) the train
/// split's rows, and the task specs.
pub struct Checked {
    per_lang: Vec<(String, String, Vec<Example>)>,
    specs: HashMap<String, TaskSpec>,
}

/// Reads the train splits of the plan's tasks and lists every problem with them (missing
/// splits, K larger than a split, examples that cannot be rendered).
pub fn check_data(plan: &TrainPlan) -> Result<(Checked, Vec<String>)> {
    let cfg = &plan.config;
    let method = cfg.method;
    let mut problems: Vec<String> = Vec::new();
    // (task, lang_code, examples of the train split)
    let mut per_lang: Vec<(String, String, Vec<Example>)> = Vec::new();
    let mut specs: HashMap<String, TaskSpec> = HashMap::new();
    for opened in plan.tasks.iter().cloned() {
        let crate::tasks::OpenedTask {
            name: task,
            spec,
            path,
            langs: chosen,
        } = opened;
        let task = &task;
        let split = spec.train_split.clone();
        if cfg.eval_every > 0 && cfg.dev_split == split {
            problems.push(format!(
                "task `{task}` trains on its `{split}` split, so early stopping on `{split}` would choose the length on training data: set dev_split to another split or eval_every = 0"
            ));
        }
        // Only the chosen languages' rows of the split become examples (a dataset can hold
        // hundreds of languages).
        let wanted: Vec<&str> = chosen.iter().map(|e| e.lang.as_str()).collect();
        let rows = catalogue::read_rows(&path, &wanted, Some(&[split.as_str()]))?;
        for e in chosen {
            let ex: Vec<Example> = rows.iter().filter(|r| r.lang == e.lang).cloned().collect();
            if ex.is_empty() {
                let available = catalogue::splits_of(&path, &e.lang)?;
                problems.push(
                    Error::MissingSplit {
                        task: task.clone(),
                        lang: e.lang_code.clone(),
                        split: split.clone(),
                        available,
                    }
                    .to_string(),
                );
                continue;
            }
            if let (true, Some(k)) = (method.uses_pools(), cfg.k) {
                if k > ex.len() {
                    problems.push(
                        Error::BudgetTooLarge {
                            task: task.clone(),
                            lang: e.lang_code.clone(),
                            split: split.clone(),
                            k,
                            available: ex.len(),
                        }
                        .to_string(),
                    );
                    continue;
                }
            }
            if let Some(bad) = ex.iter().find_map(|x| spec.render_example(x).err()) {
                problems.push(format!("{bad} (split `{split}`)"));
                continue;
            }
            if let Some(x) = ex.iter().find(|x| x.label.is_none() && x.target.is_none()) {
                problems.push(format!(
                    "task `{task}`: example `{}` ({}) has neither a label nor a target to train on",
                    x.id, e.lang_code
                ));
                continue;
            }
            per_lang.push((task.clone(), e.lang_code.clone(), ex));
        }
        specs.insert(task.clone(), spec);
    }
    Ok((Checked { per_lang, specs }, problems))
}

/// Draws the pools (methods with a budget) and tokenises every example into a [`TaskUnit`].
pub fn build_units(
    data_dir: &Path,
    cfg: &TrainConfig,
    checked: Checked,
    tok: &Tok,
) -> Result<Vec<TaskUnit>> {
    let method = cfg.method;
    let Checked {
        mut per_lang,
        specs,
    } = checked;
    // Pools: the sampler's draw order, first K; for lora-full with `full_cap`, the first
    // `full_cap` of each larger split (the same stratified, seeded order).
    let budget = match (method.uses_pools(), cfg.k, cfg.full_cap) {
        (true, Some(k), _) => Some((k, false)),
        (false, _, Some(cap)) => Some((cap, true)),
        _ => None,
    };
    if let Some((k, capped)) = budget {
        let pools = draw_pools(data_dir, cfg, &specs, &per_lang, (k, capped))?;
        keep_pools(&mut per_lang, pools, (k, capped))?;
    }
    let mut units = group_units(per_lang, cfg.unit);
    for u in units.iter_mut() {
        tokenise(u, &specs[u.task.as_str()], cfg, tok)?;
    }
    Ok(units)
}

/// The pool rows of a budget `(k, capped)` per (task, language): one draw per task for all its
/// languages (each language keeps its own stream); capped, only of the splits larger than `k`.
fn draw_pools(
    data_dir: &Path,
    cfg: &TrainConfig,
    specs: &HashMap<String, TaskSpec>,
    per_lang: &[(String, String, Vec<Example>)],
    (k, capped): (usize, bool),
) -> Result<HashMap<(String, String), Vec<sample::PoolRow>>> {
    let mut pools: HashMap<(String, String), Vec<sample::PoolRow>> = HashMap::new();
    for (task, spec) in specs {
        let langs: Vec<String> = per_lang
            .iter()
            .filter(|(t, _, ex)| t == task && (!capped || ex.len() > k))
            .map(|(_, c, _)| c.clone())
            .collect();
        if langs.is_empty() {
            continue;
        }
        let req = sample::PoolRequest {
            tasks: vec![spec.dataset().to_string()],
            langs,
            ks: vec![k],
            seed: cfg.seed,
            split: spec.train_split.clone(),
            aligned: false,
        };
        for r in sample::sample_pools(data_dir, &req)? {
            pools
                .entry((task.clone(), r.lang_code.clone()))
                .or_default()
                .push(r);
        }
    }
    Ok(pools)
}

/// Replaces each (task, language)'s examples by its pool's, in draw order (capped: only the
/// splits larger than `k`).
fn keep_pools(
    per_lang: &mut [(String, String, Vec<Example>)],
    mut pools: HashMap<(String, String), Vec<sample::PoolRow>>,
    (k, capped): (usize, bool),
) -> Result<()> {
    for (task, code, ex) in per_lang.iter_mut() {
        if capped && ex.len() <= k {
            continue;
        }
        let mut pool = pools
            .remove(&(task.clone(), code.clone()))
            .unwrap_or_default();
        pool.sort_by_key(|r| r.draw);
        let by_id: HashMap<&str, &Example> = ex.iter().map(|x| (x.id.as_str(), x)).collect();
        let picked: Vec<Example> = pool
            .iter()
            .map(|r| {
                by_id
                    .get(r.id.as_str())
                    .map(|x| (*x).clone())
                    .ok_or_else(|| {
                        Error::Invalid(format!(
                            "pool id `{}` of {task}/{code} not in the data",
                            r.id
                        ))
                    })
            })
            .collect::<Result<_>>()?;
        *ex = picked;
    }
    Ok(())
}

/// The units of the run, in first-seen order: one per (task, language), or per task when
/// `unit` is `dataset` (its languages' examples one after another). Sequences come later.
fn group_units(per_lang: Vec<(String, String, Vec<Example>)>, unit: Unit) -> Vec<TaskUnit> {
    let mut units: Vec<TaskUnit> = Vec::new();
    for (task, code, ex) in per_lang {
        let name = match unit {
            Unit::Lang => format!("{task}/{code}"),
            Unit::Dataset => task.clone(),
        };
        match units.iter_mut().find(|u| u.name == name) {
            Some(u) => {
                u.langs.push(code);
                u.examples.extend(ex);
            }
            None => units.push(TaskUnit {
                name,
                task,
                langs: vec![code],
                examples: ex,
                seqs: vec![],
                truncated: 0,
                longest: 0,
            }),
        }
    }
    units
}

/// Renders and tokenises the examples of `u` (in parallel) into its sequences, counting those
/// cut to `max_len` and the longest.
fn tokenise(u: &mut TaskUnit, spec: &TaskSpec, cfg: &TrainConfig, tok: &Tok) -> Result<()> {
    let built: Vec<(Seq, bool, usize)> = u
        .examples
        .par_iter()
        .map(|x| {
            let r = spec.render_example(x)?;
            let answer = r.answer.unwrap_or_default();
            let (c, a) = tok.encode_pair(&r.context, &answer)?;
            if a.is_empty() {
                return Err(Error::Invalid(format!(
                    "task `{}`: the answer of example `{}` ({}) has no tokens",
                    u.task, x.id, x.lang_code
                )));
            }
            let whole = c.len() + a.len();
            let (seq, cut) = Seq::build(&c, &a, cfg.max_len, tok.add_bos);
            Ok((seq, cut, whole))
        })
        .collect::<Result<_>>()?;
    u.truncated = built.iter().filter(|(_, t, _)| *t).count();
    u.longest = built.iter().map(|(_, _, n)| *n).max().unwrap_or(0);
    u.seqs = built.into_iter().map(|(s, _, _)| s).collect();
    if u.truncated > 0 {
        tracing::warn!(
            unit = %u.name,
            truncated = u.truncated,
            max_len = cfg.max_len,
            "sequences cut to max_len"
        );
    }
    Ok(())
}
