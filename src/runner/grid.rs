//! Running a grid: cells in, finished cells in the store out. A cell trains its method (or
//! nothing, for `base`), evaluates the result on every task x language (in `work/<key>/eval/`,
//! removed once the cell is committed), and is committed to the store in one rename. Finished
//! cells are skipped; a cell stopped while training resumes from its checkpoint (a killed run
//! loses at most the step in progress), one stopped while evaluating from the (task, language)
//! groups it finished ([`crate::eval::resume`]). A cell is worked on
//! only under its claim in the store ([`super::lock`]): a second process on the same store
//! (a requeued array job, an overlapping shard) skips or waits for a cell that is claimed.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use super::store::Store;
use crate::error::{Error, Result};
use crate::eval::run::{evaluate_stoppable, metrics_frame, samples_frame, Record};
use crate::plan::grid::Cell;
use crate::plan::{EvalPlan, Method, TrainPlan};

/// What happened to one cell.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Already in the store.
    Skipped,
    /// Trained (if it trains), evaluated and committed.
    Done { train_s: f64, eval_s: f64 },
    /// Another live process holds the cell (or the training run it shares): its description.
    Busy(String),
}

/// What to do with a cell another process has claimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenBusy {
    /// Leave it to that process.
    Skip,
    /// Wait until it is released, then run it unless it was finished meanwhile.
    Wait,
}

fn claim(
    store: &Store,
    key: &str,
    when_busy: WhenBusy,
) -> Result<std::result::Result<super::lock::Claim, String>> {
    match when_busy {
        WhenBusy::Wait => Ok(Ok(store.claim_cell(key)?)),
        WhenBusy::Skip => Ok(match store.try_claim_cell(key)? {
            super::lock::TryClaim::Claimed(c) => Ok(c),
            super::lock::TryClaim::Busy(h) => Err(h),
        }),
    }
}

/// The `meta-lora+tta` cell among `cells` whose training run also serves `cell`, a
/// `meta-lora` cell: same experiment, K, seed and training configuration but for the method.
/// A `meta-lora+tta` run's shared adapter is the `meta-lora` run's, to the byte (the adaptation
/// phases come after it and the random streams do not depend on the method), so the grid
/// trains it once.
pub fn training_sibling<'a>(cell: &Cell, cells: &'a [Cell]) -> Option<&'a Cell> {
    let cfg = cell.train.as_ref()?;
    if cfg.method != Method::MetaLora {
        return None;
    }
    let without_method = |c: &crate::plan::TrainConfig| {
        let mut v = serde_json::to_value(c).ok()?;
        v.as_object_mut()?.remove("method");
        Some(v)
    };
    let mine = without_method(cfg)?;
    cells.iter().find(|o| {
        o.experiment == cell.experiment
            && o.k == cell.k
            && o.seed == cell.seed
            && o.train.as_ref().is_some_and(|t| {
                t.method == Method::MetaLoraTta && without_method(t).as_ref() == Some(&mine)
            })
    })
}

/// Runs one cell. `stop` is the Ctrl-C flag (training checkpoints and returns
/// [`Error::Interrupted`]; evaluation keeps its finished groups and returns
/// [`Error::EvalInterrupted`]). `sibling` is a cell whose training run serves this one too (see
/// [`training_sibling`]): that run is trained (or found) in the sibling's work folder.
/// `progress` hears the training steps and then the evaluation's items per task and language.
#[allow(clippy::too_many_arguments)]
pub fn run_cell(
    data_dir: &Path,
    store: &Store,
    cell: &Cell,
    sibling: Option<&Cell>,
    when_busy: WhenBusy,
    stop: &AtomicBool,
    progress: &mut dyn FnMut(&str),
) -> Result<Outcome> {
    if store.is_done(&cell.key) {
        return Ok(Outcome::Skipped);
    }
    let _own = match claim(store, &cell.key, when_busy)? {
        Ok(c) => c,
        Err(holder) => return Ok(Outcome::Busy(holder)),
    };
    // Another process may have finished it between the check and the claim.
    if store.is_done(&cell.key) {
        return Ok(Outcome::Skipped);
    }
    let sibling = sibling.filter(|_| cell.train.is_some());
    let _shared = match sibling {
        Some(s) => match claim(store, &s.key, when_busy)? {
            Ok(c) => Some(c),
            Err(holder) => {
                return Ok(Outcome::Busy(format!(
                    "{holder} (training the run this cell shares with {})",
                    s.label()
                )))
            }
        },
        None => None,
    };
    let work = store.work_dir(&cell.key);
    let trained = train_cell(data_dir, store, cell, sibling, stop, progress)?;
    let label = cell.label();
    progress(&format!("{label} eval"));
    let t1 = Instant::now();
    let mut evaluating = |_: &str, task: &str, lang: &str, done: usize, total: usize| {
        progress(&format!("{label} eval {task}/{lang} {done}/{total}"))
    };
    let plan = EvalPlan::resolve(data_dir, trained.eval.clone())?;
    let report = evaluate_stoppable(&plan, &work.join("eval"), stop, &mut evaluating)?;
    let eval_s = t1.elapsed().as_secs_f64();
    let report_groups_read_back = report.groups_read_back;
    let (records, metrics) = cell_results(report, trained.variant, cell)?;
    let training = match &trained.run_dir {
        Some(run) => training_facts(run, cell.method)?,
        None => serde_json::Value::Null,
    };
    let (metrics, samples) = (metrics_frame(&metrics)?, samples_frame(&records)?);
    let train_s = trained.train_s;
    let info = serde_json::json!({
        "training": training,
        "model_sha256": crate::plan::grid::model_identity(&cell.eval.model)?,
        "datasets_manifest_sha256": crate::util::sha256_file(&data_dir.join("manifest.json")).ok(),
        "code_version": crate::util::code_version(),
        "train_seconds": train_s,
        // The cell whose work folder holds the training run, when not this one.
        "train_run_of": sibling.filter(|_| cell.train.is_some()).map(|s| s.key.clone()),
        "eval_seconds": eval_s,
        // Evaluation groups an interrupted run finished (not timed in `eval_seconds`).
        "eval_groups_read_back": report_groups_read_back,
        "finished_at_unix": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    });
    store.commit(cell, metrics, samples, info)?;
    // The evaluation's own files now live in the cell: a reader that globs the whole store
    // (`STORE/**/metrics.parquet`) must not meet them twice.
    let ev = work.join("eval");
    if ev.exists() {
        std::fs::remove_dir_all(&ev).map_err(|e| Error::io("remove", &ev, e))?;
    }
    Ok(Outcome::Done { train_s, eval_s })
}

/// What a cell evaluates once trained: its evaluation configuration, the variant of the
/// evaluation that is the cell's method, the training seconds and the training run folder
/// (none for `base`).
struct Trained {
    eval: crate::plan::EvalConfig,
    variant: &'static str,
    train_s: f64,
    run_dir: Option<std::path::PathBuf>,
}

/// Trains the cell's method (in the sibling's work folder when it shares the run), or nothing
/// for `base`, and says what to evaluate.
fn train_cell(
    data_dir: &Path,
    store: &Store,
    cell: &Cell,
    sibling: Option<&Cell>,
    stop: &AtomicBool,
    progress: &mut dyn FnMut(&str),
) -> Result<Trained> {
    let mut eval = cell.eval.clone();
    let Some(own) = &cell.train else {
        eval.base = true;
        return Ok(Trained {
            eval,
            variant: "base",
            train_s: 0.0,
            run_dir: None,
        });
    };
    let (run, cfg) = match sibling.and_then(|s| s.train.as_ref().map(|t| (s, t))) {
        Some((s, t)) => (store.work_dir(&s.key).join("train"), t),
        None => (store.work_dir(&cell.key).join("train"), own),
    };
    let t0 = Instant::now();
    train_once(data_dir, cell, (&run, cfg), stop, progress)?;
    let train_s = t0.elapsed().as_secs_f64();
    // The adapter that represents the method: the shared one, or the per-task set.
    let per_task = own.method.per_task();
    let dir = run.join(if per_task { "adapters" } else { "adapter" });
    eval.adapters = vec![format!("cell={}", dir.display())];
    Ok(Trained {
        eval,
        variant: "cell",
        train_s,
        run_dir: Some(run),
    })
}

/// Trains the run `(run, cfg)` of a cell unless it is finished (its manifest is there),
/// resuming it when it was started.
fn train_once(
    data_dir: &Path,
    cell: &Cell,
    (run, cfg): (&Path, &crate::plan::TrainConfig),
    stop: &AtomicBool,
    progress: &mut dyn FnMut(&str),
) -> Result<()> {
    if run.join("manifest.json").exists() {
        return Ok(());
    }
    let resume = run.join("config.json").exists();
    progress(&format!(
        "{} train{}",
        cell.label(),
        if resume { " (resume)" } else { "" }
    ));
    let label = cell.label();
    let mut p = |p: &crate::train::loops::Progress| {
        progress(&format!(
            "{label} train {} {}/{} loss {:.4} ({:.0} tokens/s)",
            p.phase, p.step, p.total, p.loss, p.tokens_per_s
        ))
    };
    let plan = TrainPlan::resolve(data_dir, cfg.clone())?;
    crate::train::run::train(&plan, run, resume, stop, &mut p)?;
    Ok(())
}

/// The records and metric rows of the cell's variant in an evaluation report, renamed to the
/// cell's method; an evaluation without records for it is an internal error.
fn cell_results(
    report: crate::eval::run::EvalReport,
    variant: &str,
    cell: &Cell,
) -> Result<(Vec<Record>, Vec<crate::eval::run::MetricRow>)> {
    let records: Vec<Record> = report
        .records
        .into_iter()
        .filter(|r| r.variant == variant)
        .map(|mut r| {
            r.variant = cell.method.to_string();
            r
        })
        .collect();
    let metrics: Vec<_> = report
        .metrics
        .into_iter()
        .filter(|m| m.variant == variant)
        .map(|mut m| {
            m.variant = cell.method.to_string();
            m
        })
        .collect();
    if records.is_empty() {
        return Err(Error::Internal(format!(
            "cell {}: the evaluation produced no records for `{variant}`",
            cell.label()
        )));
    }
    Ok((records, metrics))
}

/// Checks the data side of every cell before anything runs (tasks, languages, splits, budgets
/// larger than a split, examples the templates cannot render), listing every problem once;
/// `context` names the experiment (its file) in the message.
pub fn check_data(data_dir: &Path, cells: &[Cell], context: &str) -> Result<()> {
    let mut problems: Vec<String> = Vec::new();
    let mut push = |p: String| {
        if !problems.contains(&p) {
            problems.push(p);
        }
    };
    let mut seen_k = std::collections::BTreeSet::new();
    // A selection split that is also a task's training split would select on training data
    // (XCOPA trains on its `dev` split): refused, not worked around.
    for c in cells.iter().filter(|c| c.candidate.is_some()) {
        let split = c.eval.split.clone().unwrap_or_default();
        for t in &c.eval.tasks {
            if let Ok(spec) = crate::tasks::TaskSpec::for_task(data_dir, t) {
                if spec.train_split == split {
                    push(format!(
                        "task `{t}` trains on its `{split}` split, so selecting on it would select on training data: leave `{t}` out of a searched experiment or choose another selection_split"
                    ));
                }
            }
        }
    }
    for c in cells {
        if let Some(cfg) = &c.train {
            if seen_k.insert((cfg.method, c.k)) {
                let checked = TrainPlan::open(data_dir, cfg.clone()).and_then(|(p, mut ps)| {
                    ps.extend(crate::train::data::check_data(&p)?.1);
                    Ok(ps)
                });
                match checked {
                    Ok(ps) => ps.into_iter().for_each(&mut push),
                    Err(Error::Problems { problems: ps, .. }) => ps.into_iter().for_each(&mut push),
                    Err(e) => push(e.to_string()),
                }
            }
        }
    }
    if let Some(c) = cells.first() {
        let (plan, ps) = EvalPlan::open(data_dir, c.eval.clone())?;
        ps.into_iter().for_each(&mut push);
        match crate::eval::run::prepare_items(&plan) {
            Ok(_) => {}
            Err(Error::Problems { problems: ps, .. }) => ps.into_iter().for_each(&mut push),
            Err(e) => push(e.to_string()),
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Problems {
            context: format!("the data of {context}"),
            problems,
        })
    }
}

/// What a cell's training run did, from its manifest, for the budget table and the setup
/// block: optimizer steps, distinct examples per task and language, example visits, sequences
/// and tokens forwarded (the adaptation phases counted for the methods whose result they are),
/// the wall time, the longest example per unit, the selected length, the resolved settings.
pub fn training_facts(run: &Path, m_kind: Method) -> Result<serde_json::Value> {
    let p = run.join("manifest.json");
    let text = std::fs::read_to_string(&p).map_err(|e| Error::io("read", &p, e))?;
    let m: serde_json::Value = serde_json::from_str(&text)?;
    let adapts = m_kind.per_task() && m_kind != Method::LoraPerTaskK;
    let count = |k: &str| {
        let main = m["budget"]["main"][k].as_u64().unwrap_or(0);
        let adapt = m["budget"]["adapt"][k].as_u64().unwrap_or(0);
        main + if adapts { adapt } else { 0 }
    };
    let mut distinct = serde_json::Map::new();
    let mut longest = serde_json::Map::new();
    for u in m["units"].as_array().into_iter().flatten() {
        let task = u["task"].as_str().unwrap_or("");
        for (lang, n) in u["examples_per_lang"].as_object().into_iter().flatten() {
            distinct.insert(format!("{task}/{lang}"), n.clone());
        }
        longest.insert(
            u["name"].as_str().unwrap_or("").to_string(),
            u["longest_tokens"].clone(),
        );
    }
    Ok(serde_json::json!({
        "optimizer_steps": m["resolved"]["optimizer_steps_run"],
        "optimizer_steps_planned": m["resolved"]["optimizer_steps"],
        "distinct_examples": distinct,
        "example_visits": count("examples"),
        "sequences_forwarded": count("sequences"),
        "tokens_forwarded": count("tokens"),
        "train_wall_seconds": m["wall_seconds"],
        "longest_tokens": longest,
        "early_stopping": m["early_stopping"],
        "config": m["config"],
        "resolved": m["resolved"],
        "device": m["device"],
        "dtype": m["dtype"],
        "model_weights_sha256": m["model"]["weights_sha256"],
    }))
}
