//! `mlbench eval`: a model and adapters on task test sets; the flags resolve into an
//! `mlbench::plan::EvalPlan` (see `mlbench::eval::run`). Also `mlbench export`.

use std::path::PathBuf;

use clap::Args;

use super::{split_list, table, Global};
use mlbench::eval::run::evaluate_stoppable;
use mlbench::plan::BatchSize;
use mlbench::plan::{EvalConfig, EvalPlan, Layers};
use mlbench::Error;

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// HF folder or Hub id.
    #[arg(long)]
    pub model: String,
    /// Adapters, comma-separated: PEFT folders or training run folders (`NAME=PATH` names one).
    #[arg(long)]
    pub adapters: Vec<String>,
    /// Skip the base model (evaluate the adapters only).
    #[arg(long)]
    pub no_base: bool,
    /// Task(s), comma-separated.
    #[arg(long = "task", alias = "tasks", required = true)]
    pub tasks: Vec<String>,
    /// Languages, comma-separated (`all`, or `task:code` to scope a code to one task).
    #[arg(long, required = true)]
    pub langs: Vec<String>,
    /// Split (default: each task's eval split, normally `test`).
    #[arg(long)]
    pub split: Option<String>,
    /// In-context examples per prompt, drawn (seeded) from the task's few-shot split.
    #[arg(long, alias = "num-fewshot")]
    pub shots: Option<usize>,
    /// Seed of the in-context example draws and the bootstrap (default 0).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Examples per forward pass (generation tasks: prompts decoded together; default 16), or
    /// `auto`: the largest that fits, at most 64. On CUDA by trying one batch of the longest
    /// items, halving after each out-of-memory error; on the CPU (where running out of memory
    /// aborts) by estimating the activations of the longest item against a quarter of the
    /// available memory. The size chosen is logged and recorded in results.json
    /// (`batch_size_chosen`).
    #[arg(long)]
    pub batch_size: Option<BatchSize>,
    /// Longest input in tokens (default 2048).
    #[arg(long)]
    pub max_len: Option<usize>,
    /// At most N examples of each task x language: a label-stratified subset, the same for
    /// every run (kept in file order). A value below 1 is a fraction of each, rounded up, as
    /// lm-evaluation-harness reads `--limit 0.1`.
    #[arg(long, value_parser = parse_limit)]
    pub limit: Option<Limit>,
    /// cpu (default), cuda or cuda:N.
    #[arg(long)]
    pub device: Option<String>,
    /// f32 (default), bf16, f16 or f64.
    #[arg(long)]
    pub dtype: Option<String>,
    /// Output folder (samples.parquet, metrics.parquet, metrics.md, results.json, and
    /// lm-eval/<variant>/results.json in lm-evaluation-harness's shape). Ctrl-C or SIGTERM
    /// stops before the next batch and keeps the finished (variant, task, language) groups in
    /// OUT/groups/: the same command again continues from them.
    #[arg(long, alias = "output-path")]
    pub out: PathBuf,
    /// Also write lm-evaluation-harness sample logs:
    /// lm-eval/<variant>/samples_<task>_<lang>.jsonl (prompts, continuations, log-likelihoods
    /// or generations, per-example metrics).
    #[arg(long)]
    pub log_samples: bool,
    /// Replace the results of an earlier evaluation in `--out` (refused otherwise).
    #[arg(long)]
    pub overwrite: bool,
}

/// `--limit`: a count of examples, or a fraction of them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Limit {
    Count(usize),
    Fraction(f64),
}

/// A count (a whole number, at least 1) or a fraction (a number in (0, 1)).
fn parse_limit(s: &str) -> Result<Limit, String> {
    if let Ok(n) = s.parse::<usize>() {
        return Ok(Limit::Count(n));
    }
    match s.parse::<f64>() {
        Ok(f) if f > 0.0 && f < 1.0 => Ok(Limit::Fraction(f)),
        _ => Err(format!(
            "`{s}` is neither a count of examples nor a fraction in (0, 1)"
        )),
    }
}

/// `--batch-size` as its key takes it: a number, or the string `"auto"`.
fn batch_value(b: BatchSize) -> serde_json::Value {
    match b {
        BatchSize::Fixed(n) => n.into(),
        BatchSize::Auto => "auto".into(),
    }
}

/// The evaluation configuration from the flags over [`EvalConfig`]'s defaults; every wrong
/// value and configuration problem is reported at once.
fn resolve(a: &EvalArgs) -> anyhow::Result<EvalConfig> {
    use serde_json::Value;
    let mut l = Layers::new();
    let (limit, fraction) = match a.limit {
        Some(Limit::Count(n)) => (Some(Value::from(n)), None),
        Some(Limit::Fraction(f)) => (None, Some(Value::from(f))),
        None => (None, None),
    };
    for (flag, key, v) in [
        ("--model", "model", Some(a.model.clone().into())),
        (
            "--adapters",
            "adapters",
            Some(split_list(&a.adapters).into()),
        ),
        ("--no-base", "base", Some((!a.no_base).into())),
        ("--task", "tasks", Some(split_list(&a.tasks).into())),
        ("--langs", "langs", Some(split_list(&a.langs).into())),
        ("--split", "split", a.split.clone().map(Value::from)),
        ("--shots", "shots", a.shots.map(Value::from)),
        ("--seed", "seed", a.seed.map(Value::from)),
        ("--batch-size", "batch_size", a.batch_size.map(batch_value)),
        ("--max-len", "max_len", a.max_len.map(Value::from)),
        ("--limit", "limit", limit),
        ("--limit", "limit_fraction", fraction),
        ("--device", "device", a.device.clone().map(Value::from)),
        ("--dtype", "dtype", a.dtype.clone().map(Value::from)),
    ] {
        if let Some(v) = v {
            l.value(flag, key, v);
        }
    }
    Ok(l.resolve("the evaluation", &["limit_fraction"])?)
}

pub fn run(g: &Global, a: EvalArgs) -> anyhow::Result<()> {
    let earlier = ["results.json", "metrics.parquet", "samples.parquet"]
        .iter()
        .map(|f| a.out.join(f))
        .find(|p| p.exists());
    if let (Some(p), false) = (earlier, a.overwrite) {
        return Err(Error::Invalid(format!(
            "{} holds an earlier evaluation ({}); choose another --out or pass --overwrite",
            a.out.display(),
            p.display()
        ))
        .into());
    }
    let cfg = resolve(&a)?;
    let pb = g.bar("eval");
    let mut beat = super::Beat::new(g, "eval");
    let mut progress = |variant: &str, task: &str, lang: &str, done: usize, total: usize| {
        pb.set_prefix(format!("{variant} {task}/{lang}"));
        pb.set_length(total as u64);
        pb.set_position(done as u64);
        beat.tick(
            done as u64,
            total as u64,
            &format!("{variant} {task}/{lang}"),
        );
    };
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let plan = EvalPlan::resolve(&g.data_dir, cfg)?;
    super::catch_stop_signals(g.quiet);
    let report = evaluate_stoppable(&plan, &a.out, &super::STOP, &mut progress);
    pb.finish_and_clear();
    let report = report?;
    mlbench::eval::lmeval::write(&plan, &a.out, &report, started, a.log_samples)?;
    tracing::info!(
        secs = report.seconds,
        examples_per_s = report.examples_per_s,
        "evaluated; outputs in {}",
        a.out.display()
    );
    if !g.quiet {
        let rows: Vec<Vec<String>> = report
            .metrics
            .iter()
            .map(|r| {
                vec![
                    r.variant.clone(),
                    r.task.clone(),
                    r.lang.clone(),
                    r.metric.clone(),
                    r.n.to_string(),
                    format!("{:.4}", r.value),
                    format!("[{:.3}, {:.3}]", r.ci_low, r.ci_high),
                ]
            })
            .collect();
        print!(
            "{}",
            table::render(
                &["variant", "task", "lang", "metric", "n", "value", "95% CI"],
                &rows
            )
        );
    }
    Ok(())
}

/// Formats `mlbench export` writes.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ExportFormat {
    /// Every Eval Ever (EvalEval's schema 0.2.1): an aggregate JSON per variant, and instance
    /// JSONL when the evaluation kept sample logs.
    Eee,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The format to write.
    #[arg(long, value_enum)]
    pub format: ExportFormat,
    /// An evaluation folder (`mlbench eval --out`; evaluate with `--log-samples` to get
    /// instance-level files too) or a results store (`mlbench run --store`: one aggregate per
    /// finished cell, instances from its sample rows).
    #[arg(long = "from")]
    pub from: PathBuf,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Who ran the evaluation (the schema's source organization).
    #[arg(long, default_value = "unspecified")]
    pub organization: String,
}

pub fn export(_g: &Global, a: ExportArgs) -> anyhow::Result<()> {
    let written = match a.format {
        ExportFormat::Eee => {
            mlbench::runner::eee_store::export_from(&a.from, &a.out, &a.organization)?
        }
    };
    for p in written {
        tracing::info!("wrote {}", p.display());
    }
    Ok(())
}
