//! `mlbench train`: flags and/or a TOML config in, a run folder out (see `mlbench::train::run`).

use std::path::PathBuf;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use super::{split_list, Global};
use mlbench::train::TrainConfig;
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
    /// Any other configuration key: `--set inner_steps=5 --set lr=1e-4` (TOML values).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Print the resolved configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
}

/// Builds the configuration: defaults, then the file, then flags, then `--set` pairs.
fn resolve(a: &TrainArgs) -> anyhow::Result<TrainConfig> {
    let mut v = serde_json::to_value(TrainConfig::default())?;
    let obj = v.as_object_mut().expect("a struct serialises to an object");
    if let Some(p) = &a.config {
        let text = std::fs::read_to_string(p)
            .map_err(|e| Error::missing_or_io("training config", "read", p, e))?;
        let t: toml::Table = toml::from_str(&text).map_err(|e| Error::Config {
            path: p.clone(),
            message: e.to_string(),
        })?;
        for (k, val) in t {
            let j = mlbench::train::config::toml_to_json(&k, &val).map_err(|m| Error::Config {
                path: p.clone(),
                message: m,
            })?;
            obj.insert(k, j);
        }
    }
    let mut put = |k: &str, val: serde_json::Value| {
        obj.insert(k.to_string(), val);
    };
    if let Some(m) = &a.method {
        put("method", m.clone().into());
    }
    if let Some(m) = &a.model {
        put("model", m.clone().into());
    }
    if !a.tasks.is_empty() {
        put("tasks", split_list(&a.tasks).into());
    }
    if !a.langs.is_empty() {
        put("langs", split_list(&a.langs).into());
    }
    if let Some(k) = a.k {
        put("k", k.into());
    }
    if let Some(s) = a.seed {
        put("seed", s.into());
    }
    for (key, val) in [
        ("unit", &a.unit),
        ("device", &a.device),
        ("dtype", &a.dtype),
    ] {
        if let Some(x) = val {
            put(key, x.clone().into());
        }
    }
    for kv in &a.set {
        let (k, raw) = kv
            .split_once('=')
            .ok_or_else(|| Error::Invalid(format!("--set `{kv}`: expected KEY=VALUE")))?;
        let k = k.trim().replace('-', "_");
        let parsed: serde_json::Value = match toml::from_str::<toml::Table>(&format!("x = {raw}")) {
            Ok(t) => mlbench::train::config::toml_to_json(&k, &t["x"])
                .map_err(|m| Error::Invalid(format!("--set {m}")))?,
            Err(_) => raw.trim().into(),
        };
        put(&k, parsed);
    }
    let cfg: TrainConfig = serde_json::from_value(v).map_err(|e| {
        Error::Invalid(format!(
            "training configuration{}: {e}",
            a.config
                .as_ref()
                .map(|p| format!(" ({})", p.display()))
                .unwrap_or_default()
        ))
    })?;
    Ok(cfg)
}

pub fn run(g: &Global, a: TrainArgs) -> anyhow::Result<()> {
    let cfg = resolve(&a)?;
    if a.print_config {
        print!("{}", toml::to_string(&cfg)?);
        return Ok(());
    }
    let out = a.out.clone().expect("clap requires --out");
    super::catch_stop_signals();
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
    let report = mlbench::train::run::train(
        &g.data_dir,
        &cfg,
        &out,
        a.resume,
        &super::STOP,
        &mut progress,
    );
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
