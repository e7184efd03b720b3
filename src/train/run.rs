//! A training run end to end: a [`TrainPlan`] (the checked configuration, the data folder and
//! the opened tasks) in; under the run folder
//! `config.json` (the resolved configuration, written first), the adapter folder(s),
//! `log.parquet` (one row per step, stage and task) and `manifest.json` (what was trained on
//! what, with which code, how long, and how many examples and tokens each task contributed).

use std::path::Path;
use std::sync::atomic::AtomicBool;

use polars::prelude::*;

use super::checkpoint::{self, LogRow};
use super::data::{build_units, check_data, TaskUnit};
use super::loops::{meta_iterations, plan_batches, tasks_per_batch, Progress, Summary, Trainer};
use crate::error::{Error, Result};
use crate::plan::{EvalPlan, Method, TrainConfig, TrainPlan};
use crate::util::{sha256_hex, write_bytes_atomic};

/// Fingerprint of the settings a checkpoint depends on (everything except `checkpoint_every`
/// and `device`, which may change between a run and its resumption).
pub fn config_hash(cfg: &TrainConfig) -> Result<String> {
    let mut c = cfg.clone();
    c.checkpoint_every = 0;
    let mut v = serde_json::to_value(&c)?;
    v["device"] = "".into();
    Ok(sha256_hex(&serde_json::to_vec(&v)?))
}

/// Writes the step log as Parquet, atomically.
pub fn write_log(out: &Path, rows: &[LogRow]) -> Result<()> {
    let mut df = DataFrame::new_infer_height(vec![
        Column::new(
            "step".into(),
            rows.iter().map(|r| r.step).collect::<Vec<u64>>(),
        ),
        Column::new(
            "task".into(),
            rows.iter().map(|r| r.task.as_str()).collect::<Vec<&str>>(),
        ),
        Column::new(
            "stage".into(),
            rows.iter().map(|r| r.stage.as_str()).collect::<Vec<&str>>(),
        ),
        Column::new(
            "inner".into(),
            rows.iter().map(|r| r.inner).collect::<Vec<u32>>(),
        ),
        Column::new(
            "loss".into(),
            rows.iter().map(|r| r.loss).collect::<Vec<f64>>(),
        ),
        Column::new(
            "lr".into(),
            rows.iter().map(|r| r.lr).collect::<Vec<Option<f64>>>(),
        ),
        Column::new(
            "grad_norm".into(),
            rows.iter()
                .map(|r| r.grad_norm)
                .collect::<Vec<Option<f64>>>(),
        ),
        Column::new(
            "tokens".into(),
            rows.iter().map(|r| r.tokens).collect::<Vec<u64>>(),
        ),
        Column::new(
            "seconds".into(),
            rows.iter().map(|r| r.seconds).collect::<Vec<f64>>(),
        ),
        Column::new(
            "tokens_per_s".into(),
            rows.iter()
                .map(|r| r.tokens as f64 / r.seconds.max(1e-9))
                .collect::<Vec<f64>>(),
        ),
        Column::new(
            "norm".into(),
            rows.iter().map(|r| r.norm).collect::<Vec<Option<f64>>>(),
        ),
        Column::new(
            "dev".into(),
            rows.iter().map(|r| r.dev).collect::<Vec<Option<f64>>>(),
        ),
    ])?;
    crate::data::schema::write_parquet(&mut df, &out.join("log.parquet"))
}

/// What a finished run produced.
#[derive(Debug)]
pub struct Report {
    pub summary: Summary,
    pub units: Vec<TaskUnit>,
    pub manifest: serde_json::Value,
}

/// The keys whose values differ between two configurations.
fn differing_keys(a: &TrainConfig, b: &TrainConfig) -> Result<Vec<String>> {
    let (a, b) = (serde_json::to_value(a)?, serde_json::to_value(b)?);
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return Ok(vec![]);
    };
    Ok(a.iter()
        .filter(|(k, v)| b.get(*k) != Some(*v) && *k != "checkpoint_every" && *k != "device")
        .map(|(k, v)| {
            format!(
                "{k}: {} in the run, {} now",
                v,
                b.get(k).unwrap_or(&serde_json::Value::Null)
            )
        })
        .collect())
}

/// Checks the run folder and the data, loads and trains; see the module doc for the outputs.
pub fn train(
    plan: &TrainPlan,
    out: &Path,
    resume: bool,
    stop: &AtomicBool,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Report> {
    let (cfg, data_dir) = (&plan.config, plan.data_dir.as_path());
    let mut problems = folder_problems(cfg, out, resume)?;
    let method = cfg.method;
    let (checked, data_problems) = check_data(plan)?;
    problems.extend(data_problems);
    if !problems.is_empty() {
        return Err(config_problems(problems));
    }
    let device = cfg.device.open()?;
    let dtype = cfg.dtype.dtype();
    let loaded = crate::model::load(&cfg.model, dtype, &device)?;
    let units = build_units(data_dir, cfg, checked, &loaded.tok)?;
    let late = unit_problems(cfg, method, &units, &loaded, (dtype, &device));
    if !late.is_empty() {
        return Err(config_problems(late));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io("create directory", out, e))?;
    if !resume {
        write_bytes_atomic(&out.join("config.json"), &serde_json::to_vec_pretty(cfg)?)?;
    }
    let started_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let run = Run {
        data_dir,
        cfg,
        out,
        loaded: &loaded,
        units: &units,
    };
    let summary = run.train(resume, stop, progress)?;
    write_log(out, &summary.log)?;
    let manifest = run.manifest(method, &summary, started_at)?;
    write_bytes_atomic(
        &out.join("manifest.json"),
        &serde_json::to_vec_pretty(&manifest)?,
    )?;
    Ok(Report {
        summary,
        units,
        manifest,
    })
}

/// The problems of the configuration as the error `train` returns.
fn config_problems(problems: Vec<String>) -> Error {
    Error::Problems {
        context: "the training configuration".into(),
        problems,
    }
}

/// What the run folder says against this run: with `resume`, a run to resume with the same
/// configuration that is not complete yet; without, no run there already.
fn folder_problems(cfg: &TrainConfig, out: &Path, resume: bool) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    let cfg_path = out.join("config.json");
    if resume {
        match std::fs::read_to_string(&cfg_path) {
            Err(_) => problems.push(format!(
                "--resume: {} has no run to resume (no config.json)",
                out.display()
            )),
            Ok(text) => match serde_json::from_str::<TrainConfig>(&text) {
                Err(e) => problems.push(format!("{}: {e}", cfg_path.display())),
                Ok(before) => {
                    for d in differing_keys(&before, cfg)? {
                        problems.push(format!("--resume: the configuration differs: {d}"));
                    }
                    if checkpoint::find(out).is_none() && out.join("manifest.json").exists() {
                        problems.push(format!(
                            "--resume: the run in {} is already complete",
                            out.display()
                        ));
                    }
                }
            },
        }
    } else if cfg_path.exists() || out.join("manifest.json").exists() {
        problems.push(format!(
            "{} already holds a run: pass --resume to continue it, or choose another --out",
            out.display()
        ));
    }
    Ok(problems)
}

/// The problems that show once the units are built and the model is loaded: more tasks per
/// meta-batch than tasks, too many steps, examples longer than `max_len`, a rank that does not
/// fit the adapted modules (or the machine).
fn unit_problems(
    cfg: &TrainConfig,
    method: Method,
    units: &[TaskUnit],
    loaded: &crate::model::LoadedModel,
    (dtype, device): (candle_core::DType, &candle_core::Device),
) -> Vec<String> {
    let mut late = Vec::new();
    if method.is_meta() {
        if let Some(n) = cfg.tasks_per_batch {
            if n > units.len() {
                late.push(format!(
                    "tasks_per_batch = {n} but the run has {} task(s)",
                    units.len()
                ));
            }
        }
    }
    if let Some(p) = too_long(cfg, method, units) {
        late.push(p);
    }
    if !cfg.allow_truncation {
        for u in units.iter().filter(|u| u.truncated > 0) {
            late.push(format!(
                "{} of the {} training examples of {} are longer than max_len = {} (the longest has {} tokens): training would cut their prompts while evaluation reads them whole; raise max_len to at least {} or set allow_truncation = true",
                u.truncated,
                u.seqs.len(),
                u.name,
                cfg.max_len,
                u.longest,
                u.longest
            ));
        }
    }
    // The rank must fit the modules it adapts (and so what the machine holds for the model).
    let fits = cfg.lora().fits(&loaded.model.modules());
    if let Err(p) = fits {
        late.push(p);
    } else if let Err(e) = crate::model::lora::Adapter::new(
        "check",
        cfg.lora(),
        &loaded.model.modules(),
        0,
        dtype,
        device,
    ) {
        late.push(e.to_string());
    }
    late
}

/// A checked run: its data folder, configuration, run folder, model and units.
struct Run<'a> {
    data_dir: &'a Path,
    cfg: &'a TrainConfig,
    out: &'a Path,
    loaded: &'a crate::model::LoadedModel,
    units: &'a [TaskUnit],
}

impl Run<'_> {
    /// Trains (or resumes) the method, with dev scoring for early stopping when
    /// `eval_every > 0`.
    fn train(
        &self,
        resume: bool,
        stop: &AtomicBool,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<Summary> {
        let cfg = self.cfg;
        let dev_items = if cfg.eval_every > 0 {
            Some(dev_items(self.data_dir, cfg)?)
        } else {
            None
        };
        let mut score_dev = |a: &crate::model::lora::Adapter| -> Result<f64> {
            let (items, specs, ecfg) = dev_items.as_ref().expect("built when eval_every > 0");
            dev_score(self.loaded, a, items, specs, ecfg)
        };
        let mut trainer = Trainer {
            model: &self.loaded.model,
            cfg,
            units: self.units,
            out: self.out,
            stop,
            progress,
            config_hash: config_hash(cfg)?,
            dev: dev_items
                .is_some()
                .then_some(&mut score_dev as &mut super::loops::DevScorer),
        };
        trainer.run(resume)
    }

    /// The optimizer steps (meta-iterations for meta methods) the method plans.
    fn steps_planned(&self, method: Method) -> usize {
        let (cfg, units) = (self.cfg, self.units);
        if method.is_meta() {
            meta_iterations(cfg, units)
        } else if method == Method::LoraPerTaskK {
            (0..units.len())
                .map(|u| plan_batches(units, &[u], cfg, &units[u].name).len())
                .sum()
        } else if method == Method::Stage1Only {
            cfg.inner_steps * units.len()
        } else {
            plan_batches(units, &(0..units.len()).collect::<Vec<_>>(), cfg, "").len()
        }
    }

    /// The adapter folders the method writes.
    fn outputs(&self, method: Method) -> Vec<String> {
        let mut v = Vec::new();
        if !matches!(method, Method::LoraPerTaskK | Method::Stage1Only) {
            v.push("adapter".to_string());
        }
        if method.per_task() {
            v.extend(
                self.units
                    .iter()
                    .map(|u| format!("adapters/{}", u.dir_name())),
            );
        }
        v
    }

    /// Per unit: its tasks and languages, example ids (and their hash), lengths and what the
    /// run saw of it.
    fn units_json(&self, summary: &Summary) -> Vec<serde_json::Value> {
        self.units
            .iter()
            .map(|u| {
                let ids: Vec<&str> = u.examples.iter().map(|x| x.id.as_str()).collect();
                let seen = summary.seen.get(&u.name).cloned().unwrap_or_default();
                let mut per_lang: std::collections::BTreeMap<&str, usize> = Default::default();
                for x in &u.examples {
                    *per_lang.entry(x.lang_code.as_str()).or_default() += 1;
                }
                serde_json::json!({
                    "name": u.name,
                    "task": u.task,
                    "langs": u.langs,
                    "examples": u.examples.len(),
                    "examples_per_lang": per_lang,
                    "longest_tokens": u.longest,
                    "ids": ids,
                    "ids_sha256": sha256_hex(ids.join("\n").as_bytes()),
                    "truncated": u.truncated,
                    "seen": seen,
                })
            })
            .collect()
    }

    /// The dev evaluations of a run with early stopping (`eval_every > 0`), else null.
    fn early_stopping_json(&self, summary: &Summary) -> Option<serde_json::Value> {
        let cfg = self.cfg;
        (cfg.eval_every > 0).then(|| {
            serde_json::json!({
                "eval_every": cfg.eval_every,
                "patience": cfg.patience,
                "split": cfg.dev_split,
                "dev_limit": cfg.dev_limit,
                "best_step": summary.dev_best.map(|b| b.0),
                "best_score": summary.dev_best.map(|b| b.1),
                "evaluations": summary.log.iter().filter(|r| r.stage == "dev")
                    .map(|r| serde_json::json!([r.step, r.dev])).collect::<Vec<_>>(),
            })
        })
    }

    /// The manifest of a finished run (see the module doc).
    fn manifest(
        &self,
        method: Method,
        summary: &Summary,
        started_at: u64,
    ) -> Result<serde_json::Value> {
        let (cfg, units, loaded) = (self.cfg, self.units, self.loaded);
        let weights_sha256 = crate::model::load::weights_sha256(&loaded.dir)?;
        let steps_planned = self.steps_planned(method);
        let outputs = self.outputs(method);
        let model_cfg = std::fs::read(loaded.dir.join("config.json")).unwrap_or_default();
        let unit_json = self.units_json(summary);
        let adapter = super::loops::init_adapter(&loaded.model, cfg, "adapter")?;
        Ok(serde_json::json!({
            "kind": "mlbench-train-run",
            "code_version": crate::util::code_version(),
            "method": method.name(),
            "config": cfg,
            "resolved": {
                "inner_steps": cfg.effective_inner_steps(),
                "tasks_per_batch": method.is_meta().then(|| tasks_per_batch(cfg, units.len())),
                "meta_iterations": method.is_meta().then(|| meta_iterations(cfg, units)),
                "optimizer_steps": steps_planned,
                "grad_accumulation": cfg.batch_size.div_ceil(cfg.micro_batch),
                "lora_scaling": cfg.lora().scaling(),
                "trainable_parameters": adapter.num_params(),
                "k_counts_per": "task and language",
                "optimizer_steps_run": summary.steps,
            },
            "budget": {
                "main": summary.by_phase.get("main").cloned().unwrap_or_default(),
                "adapt": summary.by_phase.get("adapt").cloned().unwrap_or_default(),
            },
            "early_stopping": self.early_stopping_json(summary),
            "seeds": {
                "seed": cfg.seed,
                "lora_init": super::loops::lora_init_seed(cfg.seed),
                "pools": "sampler streams (seed, task, language)",
            },
            "model": {
                "source": cfg.model,
                "dir": loaded.dir.display().to_string(),
                "arch": format!("{:?}", loaded.model.config.arch),
                "config_sha256": sha256_hex(&model_cfg),
                "weights_sha256": weights_sha256,
            },
            "data_dir": self.data_dir.display().to_string(),
            "units": unit_json,
            "device": cfg.device,
            "dtype": cfg.dtype,
            "started_at_unix": started_at,
            "wall_seconds": summary.elapsed,
            "outputs": outputs,
        }))
    }
}

/// The optimizer steps (or meta-iterations) the run plans, counted without planning them, when
/// they exceed [`crate::plan::train::MAX_STEPS`]: the problem to report.
fn too_long(cfg: &TrainConfig, method: Method, units: &[TaskUnit]) -> Option<String> {
    let steps_of = |n: usize| (cfg.passes * n as f64 / cfg.batch_size as f64).ceil();
    let steps: f64 = if method.is_meta() {
        meta_iterations(cfg, units) as f64
    } else if method == Method::LoraPerTaskK {
        units.iter().map(|u| steps_of(u.seqs.len())).sum()
    } else if method == Method::Stage1Only {
        (cfg.inner_steps * units.len()) as f64
    } else {
        steps_of(units.iter().map(|u| u.seqs.len()).sum())
    };
    let max = crate::plan::train::MAX_STEPS;
    (steps > max as f64).then(|| {
        format!(
            "the run would take {steps:.0} optimizer steps (meta-iterations), more than mlbench supports ({max}): lower passes or meta_iterations"
        )
    })
}

type DevItems = (
    Vec<crate::eval::run::Item>,
    std::collections::BTreeMap<String, crate::tasks::TaskSpec>,
    crate::plan::EvalConfig,
);

/// The dev examples early stopping scores: `dev_split` of the run's tasks and languages, at
/// most `dev_limit` per language (the evaluator's fixed stratified subset).
fn dev_items(data_dir: &Path, cfg: &TrainConfig) -> Result<DevItems> {
    let ecfg = crate::plan::EvalConfig {
        model: cfg.model.clone(),
        adapters: vec![],
        base: false,
        tasks: cfg.tasks.clone(),
        langs: cfg.langs.clone(),
        split: Some(cfg.dev_split.clone()),
        limit: cfg.dev_limit,
        device: cfg.device,
        dtype: cfg.dtype,
        ..Default::default()
    };
    let (items, specs) =
        crate::eval::run::prepare_items(&EvalPlan::resolve(data_dir, ecfg.clone())?)?;
    Ok((items, specs, ecfg))
}

/// The micro-averaged primary metric of adapter `a` on the dev items.
fn dev_score(
    m: &crate::model::LoadedModel,
    a: &crate::model::lora::Adapter,
    items: &[crate::eval::run::Item],
    specs: &std::collections::BTreeMap<String, crate::tasks::TaskSpec>,
    ecfg: &crate::plan::EvalConfig,
) -> Result<f64> {
    use crate::eval::run::{score_all, NamedVariant, Variant};
    let v = [NamedVariant {
        name: "dev".into(),
        source: None,
        variant: Variant::Shared(super::loops::copy_adapter(a)?),
    }];
    let mut quiet = |_: &str, _: &str, _: &str, _: usize, _: usize| {};
    let records = score_all(m, &v, items, specs, ecfg, &mut quiet)?;
    let primary = |r: &crate::eval::run::Record| {
        specs
            .get(&r.task)
            .and_then(|s| s.metrics.first())
            .and_then(|mt| r.outcomes.get(&mt.name))
            .copied()
            .unwrap_or(false)
    };
    let n = records.len().max(1) as f64;
    Ok(records.iter().filter(|r| primary(r)).count() as f64 / n)
}
