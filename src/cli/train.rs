//! `mlbench train`: flags and/or a TOML config in, merged by `mlbench::plan::Layers` into a
//! checked `TrainPlan`; a run folder out (see `mlbench::train::run`).

use std::path::PathBuf;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use super::{split_list, Global};
use mlbench::plan::train::ignores_setting;
use mlbench::plan::{Layers, Source, TrainConfig, TrainPlan};
use mlbench::Error;

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// TOML file with any configuration keys (flags given here override it).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Run folder (adapters, manifest.json, log.parquet, checkpoint/).
    #[arg(long, required_unless_present = "print_config")]
    pub out: Option<PathBuf>,
    /// Continue the interrupted run in --out from its checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// lora-full, lora-k, lora-per-task-k, meta-lora, meta-lora+tta, stage1-only, stage2-only.
    #[arg(long)]
    pub method: Option<String>,
    /// HF folder or Hub id (owner/name[@revision]).
    #[arg(long)]
    pub model: Option<String>,
    /// Task(s), comma-separated.
    #[arg(long = "task", alias = "tasks")]
    pub tasks: Vec<String>,
    /// Languages, comma-separated (`all` for every language of the task).
    #[arg(long)]
    pub langs: Vec<String>,
    /// Examples per task and language (not for lora-full).
    #[arg(long)]
    pub k: Option<usize>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// `lang` (one task per dataset x language) or `dataset` (one task per dataset).
    #[arg(long)]
    pub unit: Option<String>,
    /// cpu, cuda or cuda:N.
    #[arg(long)]
    pub device: Option<String>,
    /// f32 (CPU), bf16 (CUDA), f16, f64.
    #[arg(long)]
    pub dtype: Option<String>,
    /// Any other configuration key: `--set inner_steps=5 --set lr=1e-4` (TOML values); a
    /// setting the method does not read (`inner_lr` for `lora-k`) is warned about.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Print the resolved configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
}

/// Builds the configuration: defaults, then the file, then flags, then `--set` pairs; every
/// unknown key, wrong type and configuration problem is reported at once.
fn resolve(a: &TrainArgs) -> anyhow::Result<TrainConfig> {
    let mut l = Layers::new();
    if let Some(p) = &a.config {
        let text = std::fs::read_to_string(p)
            .map_err(|e| Error::missing_or_io("training config", "read", p, e))?;
        let t: toml::Table = toml::from_str(&text).map_err(|e| Error::Config {
            path: p.clone(),
            message: e.to_string(),
        })?;
        l.table(&Source::file(p, None), &t);
    }
    let opt = |v: &Option<String>| v.clone().map(serde_json::Value::from);
    for (flag, key, v) in [
        ("--method", "method", opt(&a.method)),
        ("--model", "model", opt(&a.model)),
        ("--unit", "unit", opt(&a.unit)),
        ("--device", "device", opt(&a.device)),
        ("--dtype", "dtype", opt(&a.dtype)),
        ("--k", "k", a.k.map(Into::into)),
        ("--seed", "seed", a.seed.map(Into::into)),
        (
            "--task",
            "tasks",
            (!a.tasks.is_empty()).then(|| split_list(&a.tasks).into()),
        ),
        (
            "--langs",
            "langs",
            (!a.langs.is_empty()).then(|| split_list(&a.langs).into()),
        ),
    ] {
        if let Some(v) = v {
            l.value(flag, key, v);
        }
    }
    l.set_pairs(&a.set);
    let cfg: TrainConfig = l.resolve("the training configuration", &[])?;
    // A setting named on the command line that the method does not read does nothing: said,
    // not refused (one list of --set flags may serve a loop over methods, as an experiment's
    // [train] serves its grid).
    for k in l.keys_set_by("--set") {
        if ignores_setting(cfg.method, k) {
            tracing::warn!(
                "--set {k}: `{}` does not read it; it has no effect",
                cfg.method
            );
        }
    }
    Ok(cfg)
}

pub fn run(g: &Global, a: TrainArgs) -> anyhow::Result<()> {
    let cfg = resolve(&a)?;
    if a.print_config {
        print!("{}", toml::to_string(&cfg)?);
        return Ok(());
    }
    let out = a.out.clone().expect("clap requires --out");
    super::catch_stop_signals(g.quiet);
    let pb = if g.quiet {
        ProgressBar::hidden()
    } else {
        let pb = ProgressBar::new(0);
        pb.set_style(
            ProgressStyle::with_template(
                "{prefix:>12} [{bar:25}] {pos}/{len} {msg} {elapsed_precise} eta {eta}",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        pb
    };
    let mut beat = super::Beat::new(g, "train");
    let mut progress = |p: &mlbench::train::loops::Progress| {
        pb.set_prefix(p.phase.clone());
        pb.set_length(p.total as u64);
        pb.set_position(p.step as u64);
        let msg = format!("loss {:.4} · {:.0} tok/s", p.loss, p.tokens_per_s);
        beat.tick(p.step as u64, p.total as u64, &format!("{} {msg}", p.phase));
        pb.set_message(msg);
    };
    let t0 = std::time::Instant::now();
    let plan = TrainPlan::resolve(&g.data_dir, cfg.clone())?;
    let report = mlbench::train::run::train(&plan, &out, a.resume, &super::STOP, &mut progress);
    pb.finish_and_clear();
    let report = report?;
    let tokens: u64 = report.summary.seen.values().map(|s| s.tokens).sum();
    tracing::info!(
        method = %cfg.method,
        steps = report.summary.steps,
        tokens,
        secs = t0.elapsed().as_secs_f64(),
        "trained; outputs in {}",
        out.display()
    );
    if !g.quiet {
        let last = report
            .summary
            .log
            .iter()
            .rev()
            .find(|r| r.stage == "train" || r.stage == "outer" || r.stage == "adapt");
        println!(
            "{}: {} units, {} steps, {} tokens, final loss {}, {:.1} s -> {}",
            cfg.method,
            report.units.len(),
            report.summary.steps,
            tokens,
            last.map(|r| format!("{:.4}", r.loss))
                .unwrap_or_else(|| "-".into()),
            report.summary.elapsed,
            out.display()
        );
    }
    Ok(())
}
