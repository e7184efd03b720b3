//! Running a grid: cells in, finished cells in the store out. A cell trains its method (or
//! nothing, for `base`), evaluates the result on every task x language, and is committed to the
//! store in one rename. Finished cells are skipped; a cell interrupted while training resumes
//! from its checkpoint, so a killed run loses at most the step in progress.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use super::experiment::Cell;
use super::store::Store;
use crate::error::{Error, Result};
use crate::eval::run::{evaluate, metrics_frame, samples_frame, Record};
use crate::train::config::Method;

/// What happened to one cell.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Already in the store.
    Skipped,
    /// Trained (if it trains), evaluated and committed.
    Done { train_s: f64, eval_s: f64 },
}

/// Runs one cell. `stop` is the Ctrl-C flag (training checkpoints and returns
/// [`Error::Interrupted`]).
pub fn run_cell(
    data_dir: &Path,
    store: &Store,
    cell: &Cell,
    stop: &AtomicBool,
    progress: &mut dyn FnMut(&str),
) -> Result<Outcome> {
    if store.is_done(&cell.key) {
        return Ok(Outcome::Skipped);
    }
    let work = store.work_dir(&cell.key);
    let mut eval = cell.eval.clone();
    let mut train_s = 0.0;
    let variant = match &cell.train {
        None => {
            eval.base = true;
            "base".to_string()
        }
        Some(cfg) => {
            let run = work.join("train");
            let t0 = Instant::now();
            if !run.join("manifest.json").exists() {
                let resume = run.join("config.json").exists();
                progress(&format!(
                    "{} train{}",
                    cell.label(),
                    if resume { " (resume)" } else { "" }
                ));
                let mut p = |_: &crate::train::loops::Progress| {};
                crate::train::run::train(data_dir, cfg, &run, resume, stop, &mut p)?;
            }
            train_s = t0.elapsed().as_secs_f64();
            let method = Method::parse(&cfg.method)?;
            eval.adapters = vec![format!("cell={}", run.display())];
            // The adapter that represents the method.
            if matches!(
                method,
                Method::LoraPerTaskK | Method::Stage1Only | Method::MetaLoraTta
            ) {
                "cell:per-task".to_string()
            } else {
                "cell".to_string()
            }
        }
    };
    progress(&format!("{} eval", cell.label()));
    let t1 = Instant::now();
    let mut quiet = |_: &str, _: &str, _: &str, _: usize, _: usize| {};
    let report = evaluate(data_dir, &eval, &work.join("eval"), &mut quiet)?;
    let eval_s = t1.elapsed().as_secs_f64();
    let records: Vec<Record> = report
        .records
        .into_iter()
        .filter(|r| r.variant == variant)
        .map(|mut r| {
            r.variant = cell.method.clone();
            r
        })
        .collect();
    let metrics: Vec<_> = report
        .metrics
        .into_iter()
        .filter(|m| m.variant == variant)
        .map(|mut m| {
            m.variant = cell.method.clone();
            m
        })
        .collect();
    if records.is_empty() {
        return Err(Error::Invalid(format!(
            "cell {}: the evaluation produced no records for `{variant}`",
            cell.label()
        )));
    }
    store.commit(
        cell,
        metrics_frame(&metrics)?,
        samples_frame(&records)?,
        serde_json::json!({
            "train_seconds": train_s,
            "eval_seconds": eval_s,
            "finished_at_unix": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }),
    )?;
    Ok(Outcome::Done { train_s, eval_s })
}

/// Checks the data side of every cell before anything runs (tasks, languages, splits, budgets
/// larger than a split, examples the templates cannot render), listing every problem once.
pub fn check_data(data_dir: &Path, cells: &[Cell]) -> Result<()> {
    let mut problems: Vec<String> = Vec::new();
    let mut push = |p: String| {
        if !problems.contains(&p) {
            problems.push(p);
        }
    };
    let mut seen_k = std::collections::BTreeSet::new();
    for c in cells {
        if let Some(cfg) = &c.train {
            if seen_k.insert((cfg.method.clone(), c.k)) {
                match crate::train::data::check_data(data_dir, cfg) {
                    Ok((_, ps)) => ps.into_iter().for_each(&mut push),
                    Err(e) => push(e.to_string()),
                }
            }
        }
    }
    if let Some(c) = cells.first() {
        match crate::eval::run::prepare_items(data_dir, &c.eval) {
            Ok(_) => {}
            Err(Error::Problems { problems: ps, .. }) => ps.into_iter().for_each(&mut push),
            Err(e) => push(e.to_string()),
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Problems {
            context: "the experiment's data".into(),
            problems,
        })
    }
}
