//! The command line: clap definitions (the one source of truth for flags) and the command
//! bodies. Only this module and `main.rs` use `anyhow`.

mod data;
mod eval;
mod model;
mod run;
mod stop;
mod table;
mod tasks;
mod train;

use std::path::PathBuf;

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

/// Periodic progress lines for long work when stderr is not a terminal (cron, Slurm, `nohup`),
/// where the progress bar is hidden: at most one `tracing` line every `MLBENCH_PROGRESS_SECS`
/// seconds (default 60) with the position, the elapsed time, an estimate of what is left and
/// the latest message. Silent with `--quiet` or on a terminal.
///
/// The estimate comes from work done in this process only: [`Beat::tick`] times the current
/// stretch (a resumed run that starts at step 12 is timed from step 12; a new unit, seen as a
/// position that goes back or a new length, starts a new stretch), and [`Beat::tick_units`]
/// times the units that actually ran (a resumed grid passes its finished cells in no time).
pub struct Beat {
    what: String,
    on: bool,
    every: std::time::Duration,
    start: std::time::Instant,
    last: Option<std::time::Instant>,
    stretch: Option<Stretch>,
}

/// Where and when the current stretch of [`Beat::tick`] positions began.
struct Stretch {
    from: u64,
    len: u64,
    pos: u64,
    at: std::time::Instant,
}

impl Stretch {
    /// The stretch `pos` of `len` belongs to: `prev` when it goes on from it (same length, not
    /// behind), else a new one starting now.
    fn next(prev: Option<Stretch>, pos: u64, len: u64) -> Stretch {
        match prev {
            Some(s) if s.len == len && pos >= s.pos => Stretch { pos, ..s },
            _ => Stretch {
                from: pos,
                len,
                pos,
                at: std::time::Instant::now(),
            },
        }
    }
}

impl Beat {
    pub fn new(g: &Global, what: &str) -> Beat {
        let every = std::env::var("MLBENCH_PROGRESS_SECS")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(60);
        Beat {
            what: what.to_string(),
            on: !g.quiet && !std::io::IsTerminal::is_terminal(&std::io::stderr()),
            every: std::time::Duration::from_secs(every),
            start: std::time::Instant::now(),
            last: None,
            stretch: None,
        }
    }

    /// Notes progress `pos` of `len` with `message`; logs it when the interval has passed.
    pub fn tick(&mut self, pos: u64, len: u64, message: &str) {
        let s = Stretch::next(self.stretch.take(), pos, len);
        let secs = s.at.elapsed().as_secs_f64();
        let (done, left) = (pos - s.from, len.saturating_sub(pos));
        self.stretch = Some(s);
        self.log(pos, len, eta(secs, done, left), message);
    }

    /// Notes unit `pos` of `len` where `ran` units have run in this process, taking `spent`
    /// seconds, and at most `left` remain to run: the estimate is their mean time times `left`.
    pub fn tick_units(
        &mut self,
        pos: u64,
        len: u64,
        (ran, spent): (u64, f64),
        left: u64,
        message: &str,
    ) {
        self.log(pos, len, eta(spent, ran, left), message);
    }

    fn log(&mut self, pos: u64, len: u64, eta: String, message: &str) {
        if !self.on || self.last.is_some_and(|t| t.elapsed() < self.every) {
            return;
        }
        self.last = Some(std::time::Instant::now());
        let secs = self.start.elapsed().as_secs_f64();
        tracing::info!(
            "{}: {pos}/{len}, {secs:.0} s elapsed, eta {eta}: {message}",
            self.what
        );
    }
}

/// `secs` spent on `done` units, `left` to go: "N s", or "?" before the first unit.
fn eta(secs: f64, done: u64, left: u64) -> String {
    if done == 0 {
        return "?".into();
    }
    format!("{:.0} s", secs / done as f64 * left as f64)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stretch_starts_where_the_work_resumed_and_again_at_each_new_unit() {
        // A training run resumed at step 12 of 168 is timed from step 12.
        let s = Stretch::next(None, 12, 168);
        assert_eq!((s.from, s.pos), (12, 12));
        let s = Stretch::next(Some(s), 15, 168);
        assert_eq!((s.from, s.pos), (12, 15));
        // A new evaluation unit (position back to 0) or phase (another length) starts afresh.
        let s = Stretch::next(Some(s), 0, 168);
        assert_eq!((s.from, s.pos), (0, 0));
        let s = Stretch::next(Some(s), 3, 40);
        assert_eq!((s.from, s.len), (3, 40));
    }

    #[test]
    fn the_estimate_is_the_mean_time_of_the_done_units_times_those_left() {
        assert_eq!(eta(10.0, 2, 3), "15 s");
        assert_eq!(eta(0.0, 0, 5), "?");
        assert_eq!(eta(7.0, 7, 0), "0 s");
    }
}
