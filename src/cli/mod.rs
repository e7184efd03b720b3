//! The command line: clap definitions (the one source of truth for flags) and the command
//! bodies. Only this module and `main.rs` use `anyhow`.

mod data;
mod eval;
mod model;
mod progress;
mod run;
mod stop;
mod table;
mod tasks;
mod train;

use std::path::PathBuf;

pub use progress::Beat;
pub use stop::{catch_stop_signals, STOP};

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

/// mlbench: how much task data does an LLM need per language and per task?
#[derive(Debug, Parser)]
#[command(name = "mlbench", version = env!("MLBENCH_VERSION_LINE"), about, long_about = None, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes.
#[derive(Debug, Args, Clone)]
pub struct Global {
    /// Folder with the canonical datasets (`<task>.parquet`) and task specs (`tasks/*.toml`).
    #[arg(long, global = true, env = "MLBENCH_DATA", default_value = "datasets")]
    pub data_dir: PathBuf,
    /// No progress bars and no informational logs (warnings and errors still print).
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// More log output (-v: debug, -vv: trace). `RUST_LOG` overrides.
    #[arg(long, short, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Precision of the products with frozen base weights on the CPU: `f32`, or `bf16` (inputs
    /// rounded to bf16, f32 sums, on Intel AMX tiles: several times faster; an error on CPUs
    /// without AMX). LoRA weights, norms, attention and losses stay f32. A bf16 run records
    /// `matmul=bf16` in its code version, so its results never mix with f32 ones.
    #[arg(
        long,
        global = true,
        env = "MLBENCH_MATMUL",
        value_enum,
        default_value = "f32"
    )]
    pub matmul: Matmul,
}

/// `--matmul` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Matmul {
    F32,
    Bf16,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Datasets: import the raw files, verify them, list, describe and draw few-shot pools.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// Task specifications: list them and show rendered prompts.
    #[command(subcommand)]
    Tasks(tasks::TasksCommand),
    /// Models: write tiny test models, inspect a model.
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// LoRA adapters in PEFT format.
    #[command(subcommand)]
    Adapter(model::AdapterCommand),
    /// Score {"context", "continuation"} requests: summed log-probability, greedy flag, tokens.
    Score(model::ScoreArgs),
    /// Greedy continuation of prompts.
    Generate(model::GenerateArgs),
    /// Train adapters: the LoRA baselines and MeTA-LoRA (writes a run folder).
    Train(Box<train::TrainArgs>),
    /// Evaluate the base model and adapters on task test sets (per-example records, metrics).
    Eval(Box<eval::EvalArgs>),
    /// Write an evaluation in another tool's schema (`--format eee`: Every Eval Ever).
    Export(eval::ExportArgs),
    /// Run an experiment file's grid (method x K x seed) into a results store.
    Run(run::RunArgs),
    /// Compare methods from a results store: tables with intervals and paired tests.
    Compare(run::CompareArgs),
    /// Bring shards' stores into one and compact per-cell files into parts.
    Merge(run::MergeArgs),
    /// Reports over a store's runs: `--history` draws metric trends.
    Report(run::ReportArgs),
}

impl Global {
    /// A progress bar for `what` (hidden with `--quiet` or when stderr is not a terminal).
    pub fn bar(&self, what: &str) -> ProgressBar {
        if self.quiet {
            return ProgressBar::hidden();
        }
        let pb = ProgressBar::new(0);
        pb.set_style(
            ProgressStyle::with_template(
                "{prefix:>10} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        pb.set_prefix(what.to_string());
        pb
    }
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    use mlbench::model::kernels::{set_matmul_precision, MatmulPrecision};
    set_matmul_precision(match cli.global.matmul {
        Matmul::F32 => MatmulPrecision::F32,
        Matmul::Bf16 => MatmulPrecision::Bf16,
    })?;
    match cli.command {
        Command::Data(c) => data::run(&cli.global, c),
        Command::Tasks(c) => tasks::run(&cli.global, c),
        Command::Model(c) => model::run_model(&cli.global, c),
        Command::Adapter(c) => model::run_adapter(&cli.global, c),
        Command::Score(a) => model::run_score(&cli.global, a),
        Command::Generate(a) => model::run_generate(&cli.global, a),
        Command::Train(a) => train::run(&cli.global, *a),
        Command::Eval(a) => eval::run(&cli.global, *a),
        Command::Export(a) => eval::export(&cli.global, a),
        Command::Run(a) => run::run(&cli.global, a),
        Command::Compare(a) => run::compare(&cli.global, a),
        Command::Merge(a) => run::merge(&cli.global, a),
        Command::Report(a) => run::report(&cli.global, a),
    }
}

/// Splits comma-separated values, dropping empty pieces.
pub fn split_list(v: &[String]) -> Vec<String> {
    v.iter()
        .flat_map(|s| s.split(','))
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}
