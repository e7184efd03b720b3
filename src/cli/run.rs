//! `mlbench run` (an experiment grid into a results store) and `mlbench compare` (tables from
//! a store). See `mlbench::runner`.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use clap::Args;

use super::{split_list, Global};
use mlbench::data::lang::{self, LangEntry};
use mlbench::plan::grid::{parse_shard, shard, show, Cell, Experiment};
use mlbench::plan::Method;
use mlbench::runner::compare::{
    history, newest_keys, of_run, runs, table_and_outcomes, with_keys, CellOutcomes, Query,
};
use mlbench::runner::grid::{run_cell, training_sibling, Outcome, WhenBusy};
use mlbench::runner::store::{Store, METRIC_COLUMNS, SAMPLE_COLUMNS};
use mlbench::Error;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Experiment file (`benchmarks/*.toml`).
    pub experiment: PathBuf,
    /// Results store folder.
    #[arg(long, default_value = "results")]
    pub store: PathBuf,
    /// Run only shard i of N (0-based), e.g. `--shard 3/8` for array jobs sharing the store;
    /// default in a Slurm array: the task's index of the array's count.
    #[arg(long)]
    pub shard: Option<String>,
    /// List the cells (and whether they are finished) without running anything.
    #[arg(long)]
    pub dry_run: bool,
    /// A few-minutes version of the grid (first seed, smallest K, short training, 20 test
    /// examples per language), stored as experiment `<name>-smoke`.
    #[arg(long)]
    pub smoke: bool,
    /// Wait for cells that another process is working on (default: leave them to it).
    #[arg(long)]
    pub wait: bool,
}

/// Which results of a store to show (shared by `compare` and `report`).
#[derive(Debug, Args)]
pub struct Selection {
    /// Results store folder.
    #[arg(long, default_value = "results")]
    pub store: PathBuf,
    /// Only this experiment (its `name`).
    #[arg(long)]
    pub experiment: Option<String>,
    /// Languages (any code form), comma-separated; default: all (`compare`), only each task's
    /// micro and macro averages (`report --history`).
    #[arg(long)]
    pub langs: Vec<String>,
    #[arg(long = "tasks", alias = "task")]
    pub tasks: Vec<String>,
    #[arg(long)]
    pub methods: Vec<String>,
    #[arg(long, default_value = "acc")]
    pub metric: String,
}

impl Selection {
    /// The comparison query, with languages resolved against those in `metrics`.
    fn query(
        &self,
        metrics: &polars::prelude::DataFrame,
        baseline: Option<String>,
    ) -> anyhow::Result<Query> {
        Ok(Query {
            experiment: self.experiment.clone(),
            tasks: split_list(&self.tasks),
            langs: store_langs(metrics, &self.langs)?,
            methods: split_list(&self.methods),
            metric: self.metric.clone(),
            baseline,
            averages_only: false,
            seed_free: vec![],
        })
    }
}

#[derive(Debug, Args)]
pub struct CompareArgs {
    #[command(flatten)]
    pub sel: Selection,
    /// Method the paired test compares against.
    #[arg(long)]
    pub baseline: Option<String>,
    /// Write a report folder here (index.html, tables, plots).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write the table (and the verdicts) as JSON here, for dashboards and scripts; with
    /// `--against`, the gate's verdicts (every compared cell, its drop and p-value).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the table in Bencher Metric Format here: one benchmark per method x K x column,
    /// the metric (x 100) as the measure with its interval as lower and upper values; with
    /// `--against`, one benchmark per compared cell with its drop, p-value and verdict.
    #[arg(long)]
    pub bmf: Option<PathBuf>,
    /// Regression gate: compare the run `--run` against this one (a code version as stored, or
    /// `previous`); exit status 3 when a metric fell by more than `--max-drop` points with a
    /// significant paired test.
    #[arg(long)]
    pub against: Option<String>,
    /// The run checked by `--against` (a code version, default the latest).
    #[arg(long)]
    pub run: Option<String>,
    /// Largest tolerated drop in points (metric x 100).
    #[arg(long, default_value_t = 1.0)]
    pub max_drop: f64,
    /// The reference of the verdict table (default: the experiment's declared one, recorded in
    /// the store by `mlbench run`; while that one has no finished cell, the table comes without
    /// verdicts and with a warning; a reference named here must be among the results).
    #[arg(long)]
    pub reference: Option<String>,
    /// The non-inferiority margin in points (default: the experiment's declared one, else 2.0).
    #[arg(long)]
    pub margin: Option<f64>,
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The store to merge into (and compact).
    #[arg(long, default_value = "results")]
    pub store: PathBuf,
    /// Other stores (e.g. shards that wrote to local disks) whose finished cells to bring in.
    #[arg(long = "from")]
    pub from: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Metric trends over the store's runs (code versions), one line per method and K.
    #[arg(long)]
    pub history: bool,
    #[command(flatten)]
    pub sel: Selection,
    /// Report folder to write.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(g: &Global, a: RunArgs) -> anyhow::Result<()> {
    let mut exp = Experiment::load(&a.experiment)?;
    if a.smoke {
        exp.smoke();
    }
    let store = Store::new(&a.store);
    let context = format!("experiment `{}` ({})", exp.name, a.experiment.display());
    let shard_spec = a.shard.clone().or_else(slurm_shard);
    if a.shard.is_none() {
        if let Some(s) = &shard_spec {
            tracing::info!("shard {s} from the Slurm array environment");
        }
    }
    let shard_of = |cells: Vec<Cell>| -> anyhow::Result<Vec<Cell>> {
        Ok(match &shard_spec {
            Some(s) => {
                let (i, n) = parse_shard(s)?;
                shard(&cells, i, n)
            }
            None => cells,
        })
    };
    // Selection first: the candidates of every `[search.*]` space, scored on dev.
    apply_choices(&store, &mut exp, !a.dry_run)?;
    let plan = exp.plan()?;
    let all_candidates = plan.candidates;
    let candidates = shard_of(all_candidates.clone())?;
    let cells = shard_of(plan.cells)?;
    let mut checked: Vec<Cell> = candidates.clone();
    checked.extend(cells.iter().cloned());
    if let Some(p) = checked.first().and_then(|c| c.eval.model_problem()) {
        return Err(Error::Problems {
            context,
            problems: vec![p],
        }
        .into());
    }
    mlbench::runner::grid::check_data(&g.data_dir, &checked, &context)?;
    if a.dry_run {
        for c in candidates.iter().chain(&cells) {
            let what = match &c.candidate {
                Some(o) => format!("{} [selection: {}]", c.label(), show(o)),
                None => c.label(),
            };
            println!("{}  {:<28} {}", c.key, what, cell_state(&store, &c.key)?);
        }
        for m in exp.methods.iter().filter(|m| exp.pending(**m)) {
            println!("{}", pending_note(&exp, *m));
        }
        return Ok(());
    }
    record_declaration(&store, &exp, &a.experiment)?;
    super::catch_stop_signals(g.quiet);
    let mut tally = Tally::default();
    let t0 = std::time::Instant::now();
    run_cells(g, &a, &store, &candidates, &all_candidates, &mut tally)?;
    let before = exp.chosen.len();
    apply_choices(&store, &mut exp, true)?;
    let cells = if exp.chosen.len() != before {
        shard_of(exp.plan()?.cells)?
    } else {
        cells
    };
    if !cells.is_empty() {
        mlbench::runner::grid::check_data(&g.data_dir, &cells, &context)?;
    }
    run_cells(g, &a, &store, &cells, &all_candidates, &mut tally)?;
    let pending: Vec<&Method> = exp.methods.iter().filter(|m| exp.pending(**m)).collect();
    if !g.quiet {
        println!(
            "{}: {} cells run, {} already in {}{} ({:.1} s)",
            exp.name,
            tally.done,
            tally.skipped,
            a.store.display(),
            if tally.busy > 0 {
                format!(", {} left to other processes working on them", tally.busy)
            } else {
                String::new()
            },
            t0.elapsed().as_secs_f64()
        );
        for m in &pending {
            if exp.transferred.contains(m) {
                println!("{}", pending_note(&exp, **m));
            } else {
                println!("{m}: its selection is not complete (candidates left to other shards or processes); rerun when it is");
            }
        }
    }
    // A whole grid that finished here is compacted (shards leave that to `mlbench merge` once
    // all of them are done). The grid's results are safe either way: a failed compaction only
    // warns.
    if shard_spec.is_none() && tally.done > 0 && tally.busy == 0 && pending.is_empty() {
        match store.merge(&[]) {
            Ok(s) => tracing::info!(
                cells = s.cells_total,
                compacted = s.compacted,
                "store compacted"
            ),
            Err(e) => tracing::warn!("the store was not compacted ({e}); `mlbench merge` retries"),
        }
    }
    Ok(())
}

/// The shard `i/N` of a Slurm array task: `SLURM_ARRAY_TASK_ID` minus `SLURM_ARRAY_TASK_MIN`
/// (0 when unset) of `SLURM_ARRAY_TASK_COUNT` (else `MAX - MIN + 1`); `None` outside an array.
fn slurm_shard() -> Option<String> {
    let get = |k: &str| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    let id = get("SLURM_ARRAY_TASK_ID")?;
    let min = get("SLURM_ARRAY_TASK_MIN").unwrap_or(0);
    let n = get("SLURM_ARRAY_TASK_COUNT")
        .or_else(|| get("SLURM_ARRAY_TASK_MAX").map(|max| max.saturating_sub(min) + 1))?;
    Some(format!("{}/{n}", id.saturating_sub(min)))
}

/// Cells run, found finished, and left to other processes.
#[derive(Default)]
struct Tally {
    done: usize,
    skipped: usize,
    busy: usize,
}

/// `done`, `running (holder)` or `to run`.
fn cell_state(store: &Store, key: &str) -> anyhow::Result<String> {
    if store.is_done(key) {
        return Ok("done".into());
    }
    Ok(
        match mlbench::runner::lock::holder(&mlbench::runner::lock::cell_lock_path(
            &store.dir, key,
        ))? {
            Some(h) => format!("running ({h})"),
            None => "to run".into(),
        },
    )
}

/// Reads the finished candidates' scores and the choices `[study] settings_from` names,
/// records the selection (when `record`: not in a dry run), and gives `exp` the choices made
/// so far.
fn apply_choices(store: &Store, exp: &mut Experiment, record: bool) -> anyhow::Result<()> {
    use mlbench::runner::select;
    let candidates = exp.selection_cells()?;
    let choices = if candidates.is_empty() {
        vec![]
    } else {
        select::choose(store, exp, &candidates)?
    };
    let transferred = select::transfer(exp)?;
    if record
        && (!transferred.is_empty()
            || choices
                .iter()
                .any(|c| c.candidates.iter().any(|x| x.2.is_some())))
    {
        select::write_record(store, exp, &choices, &transferred)?;
    }
    for c in choices {
        if let Some(o) = c.chosen {
            tracing::info!(method = %c.method, chosen = %show(&o), "selected on {}", exp.study.selection_split);
            exp.chosen.insert(c.method, o);
        }
    }
    for t in transferred {
        exp.transferred.insert(t.method);
        if let Some(o) = t.chosen {
            tracing::debug!(method = %t.method, chosen = %show(&o), "settings from another study's selection");
            exp.chosen.insert(t.method, o);
        }
    }
    Ok(())
}

/// Why a pending method has no grid cells yet.
fn pending_note(exp: &Experiment, m: Method) -> String {
    match &exp.study.settings_from {
        Some(p) if exp.transferred.contains(&m) => format!(
            "(the grid cells of {m} are built once the selection it takes its settings from is complete: {})",
            p.display()
        ),
        _ => format!("(the grid cells of {m} are built once its selection is complete)"),
    }
}

/// Writes `STORE/experiments/<name>.json`: the study declaration compare reads (reference,
/// margin) and the experiment file it came from. A run that changes the recorded reference or
/// margin (another file under the same name, or an edited one) says so: the verdicts `compare`
/// writes follow the newest declaration.
fn record_declaration(
    store: &Store,
    exp: &Experiment,
    file: &std::path::Path,
) -> anyhow::Result<()> {
    let doc = serde_json::json!({
        "name": exp.name,
        "file": file.display().to_string(),
        "reference": exp.reference(),
        "margin": exp.study.margin,
        "study": exp.study,
        "search": exp.search,
        "methods": exp.methods,
        "ks": exp.ks,
        "seeds": exp.seeds,
    });
    let p = store
        .dir
        .join("experiments")
        .join(format!("{}.json", exp.name));
    if let Some(old) = read_declaration(store, &exp.name) {
        for key in ["reference", "margin"] {
            if old[key] != doc[key] {
                tracing::warn!(
                    "experiment `{}`: the declared {key} changes from {} ({}) to {} ({}); compare's verdicts follow the new one",
                    exp.name,
                    old[key],
                    old["file"].as_str().unwrap_or("?"),
                    doc[key],
                    file.display()
                );
            }
        }
    }
    mlbench::util::write_bytes_atomic(&p, &serde_json::to_vec_pretty(&doc)?)?;
    Ok(())
}

/// Runs `cells`; a cell whose training configuration equals a selection candidate's (or its
/// `meta-lora+tta` sibling's) reuses that training run.
fn run_cells(
    g: &Global,
    a: &RunArgs,
    store: &Store,
    cells: &[Cell],
    candidates: &[Cell],
    tally: &mut Tally,
) -> anyhow::Result<()> {
    if cells.is_empty() {
        return Ok(());
    }
    let pb = g.bar("cells");
    pb.set_length(cells.len() as u64);
    let when_busy = if a.wait {
        WhenBusy::Wait
    } else {
        WhenBusy::Skip
    };
    let interrupted = |done: usize| Error::GridInterrupted {
        cells: done,
        store: store.dir.clone(),
    };
    let mut beat = super::Beat::new(g, "cells");
    // The estimate counts this cell and every later one as work to do (some may turn out
    // finished or claimed by another worker: an upper bound) at the mean time of the cells
    // this process finished (the tally's count since the start, over the seconds to the last
    // one's end).
    let (t0, done_before) = (std::time::Instant::now(), tally.done);
    let mut last_done_s = 0f64;
    for (i, c) in cells.iter().enumerate() {
        let left = (cells.len() - i) as u64;
        let ran = ((tally.done - done_before) as u64, last_done_s);
        let mut say = |m: &str| {
            pb.set_message(m.to_string());
            beat.tick_units(i as u64, cells.len() as u64, ran, left, m);
        };
        // A meta-lora cell trains (or reuses) its meta-lora+tta sibling's run when this
        // invocation runs both (never across shards: two processes would share one folder);
        // the chosen candidate's run serves the grid cell with its settings.
        let sibling = training_sibling(c, cells).or_else(|| {
            candidates
                .iter()
                .find(|s| s.key != c.key && s.train.is_some() && s.train == c.train)
        });
        let outcome = match run_cell(
            &g.data_dir,
            store,
            c,
            sibling,
            when_busy,
            &super::STOP,
            &mut say,
        ) {
            Err(Error::Interrupted { .. } | Error::EvalInterrupted { .. }) => {
                return Err(interrupted(tally.done).into())
            }
            other => other?,
        };
        match outcome {
            Outcome::Skipped => tally.skipped += 1,
            Outcome::Done { train_s, eval_s } => {
                tally.done += 1;
                last_done_s = t0.elapsed().as_secs_f64();
                tracing::info!(cell = %c.label(), key = %c.key, train_s, eval_s, "cell finished");
            }
            Outcome::Busy(holder) => {
                tally.busy += 1;
                tracing::warn!(cell = %c.label(), key = %c.key, "claimed by {holder}: left to it");
            }
        }
        pb.inc(1);
        if super::STOP.load(Ordering::SeqCst) {
            return Err(interrupted(tally.done).into());
        }
    }
    pb.finish_and_clear();
    Ok(())
}

pub fn merge(g: &Global, a: MergeArgs) -> anyhow::Result<()> {
    let store = Store::new(&a.store);
    let from: Vec<Store> = a.from.iter().map(Store::new).collect();
    let t0 = std::time::Instant::now();
    let s = store.merge(&from)?;
    if !g.quiet {
        println!(
            "{}: {} cells ({} brought in, {} compacted into parts/: {} metric rows, {} sample rows) in {:.2} s",
            a.store.display(),
            s.cells_total,
            s.imported,
            s.compacted,
            s.metric_rows,
            s.sample_rows,
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// Normalised language codes for `wanted`, resolved against the languages in `metrics`.
fn store_langs(
    metrics: &polars::prelude::DataFrame,
    wanted: &[String],
) -> anyhow::Result<Vec<String>> {
    let mut codes: Vec<String> = metrics
        .column("lang")?
        .str()?
        .iter()
        .flatten()
        .filter(|l| *l != "micro" && *l != "macro")
        .map(str::to_string)
        .collect();
    codes.sort();
    codes.dedup();
    let entries: Vec<LangEntry> = codes
        .iter()
        .map(|c| LangEntry {
            lang: c.clone(),
            lang_code: c.clone(),
        })
        .collect();
    let mut langs = Vec::new();
    for c in split_list(wanted) {
        langs.push(lang::resolve("the store", &c, &entries)?.lang_code.clone());
    }
    Ok(langs)
}

pub fn report(g: &Global, a: ReportArgs) -> anyhow::Result<()> {
    if !a.history {
        return Err(Error::Invalid(
            "`mlbench report` draws trends over runs: pass --history (comparison reports come from `mlbench compare --out`)".into(),
        )
        .into());
    }
    let store = Store::new(&a.sel.store);
    let mut metrics = store.read_columns("metrics.parquet", Some(METRIC_COLUMNS))?;
    if let Some(e) = &a.sel.experiment {
        let mask: polars::prelude::BooleanChunked = metrics
            .column("experiment")?
            .str()?
            .iter()
            .map(|x| x == Some(e.as_str()))
            .collect();
        metrics = metrics.filter(&mask)?;
    }
    let mut q = a.sel.query(&metrics, None)?;
    // Without --langs the history shows each task's averages only.
    q.averages_only = q.langs.is_empty();
    let runs = history(&metrics, &q)?;
    let title = format!(
        "mlbench: {} over runs{}",
        q.metric,
        a.sel
            .experiment
            .as_ref()
            .map(|e| format!(" of {e}"))
            .unwrap_or_default()
    );
    let about = format!(
        "Store {}; {} runs, oldest first; each point the mean over seeds with its 95% interval.",
        a.sel.store.display(),
        runs.len()
    );
    mlbench::report::history::write_history(&runs, &a.out, &title, &about)?;
    if !g.quiet {
        print!("{}", mlbench::report::history::markdown(&runs));
        eprintln!("history written to {}", a.out.join("index.html").display());
    }
    Ok(())
}

pub fn compare(g: &Global, a: CompareArgs) -> anyhow::Result<()> {
    let store = Store::new(&a.sel.store);
    let metrics = store.read_columns("metrics.parquet", Some(METRIC_COLUMNS))?;
    if let Some(against) = &a.against {
        return gate(&store, &metrics, against, &a);
    }
    if let Some(e) = &a.sel.experiment {
        if selection_only(&store, &metrics, e, a.out.is_some())? {
            return Ok(());
        }
    }
    let keys = compared_keys(&store, &metrics, a.run.as_ref())?;
    let metrics = with_keys(&metrics, &keys)?;
    let (reference, margin) = reference_and_margin(&store, &a)?;
    // Per-example records for the paired statistics and the label diagnostics.
    let samples = if reference.is_some() || a.baseline.is_some() {
        let mut cols: Vec<&str> = SAMPLE_COLUMNS.to_vec();
        cols.extend(["pred", "gold"]);
        with_keys(&store.read_columns("samples.parquet", Some(&cols))?, &keys)?
    } else {
        polars::prelude::DataFrame::empty()
    };
    let mut q = a.sel.query(&metrics, a.baseline.clone())?;
    q.seed_free = seed_free_methods(&store, &keys)?;
    let (mut t, outcomes) = table_and_outcomes(&metrics, &samples, &q)?;
    print!("{}", t.text());
    // A study whose declared reference has no finished cell yet (a grid in progress) keeps its
    // setup, budget and diagnostics without verdicts; a reference asked for by name must be there.
    let mut pending = false;
    if let Some(r) = reference
        .as_ref()
        .filter(|r| !t.rows.iter().any(|((m, _), _)| *m == r.method))
    {
        if !r.declared {
            return Err(Error::Unknown {
                kind: "reference method",
                code: r.method.clone(),
                scope: format!(
                    " in the selected results (methods: {})",
                    t.rows
                        .iter()
                        .map(|((m, _), _)| m.as_str())
                        .collect::<std::collections::BTreeSet<_>>()
                        .into_iter()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                suggestions: vec![],
            }
            .into());
        }
        tracing::warn!(
            "no verdicts: the declared reference `{}` has no finished cell in the selected results yet",
            r.method
        );
        pending = true;
    }
    let study = match &reference {
        Some(r) => Some(study_parts(
            &store,
            &keys,
            (&samples, &outcomes),
            &t,
            &q,
            (&r.method, !pending),
            margin,
            a.sel.experiment.as_deref(),
        )?),
        None => None,
    };
    if let Some(st) = &study {
        for r in st
            .budget
            .iter()
            .filter(|r| r.k.is_none() && r.distinct_per_lang > 0.0)
        {
            t.real_k.insert(r.method.clone(), r.distinct_per_lang);
        }
        if let Some(v) = &st.verdicts {
            println!();
            print!("{}", v.text());
        }
        for w in mlbench::runner::study::collapse_warnings(&st.dists) {
            tracing::warn!("{w}");
        }
    }
    write_comparison(g, &a, &t, study.as_ref(), &q)
}

/// The methods of the compared cells that no seed enters: every cell of theirs trains nothing
/// and evaluates without in-context examples (`base` at 0 shots, which the runner evaluates
/// once).
fn seed_free_methods(
    store: &Store,
    keys: &std::collections::HashSet<String>,
) -> anyhow::Result<Vec<String>> {
    let mut free: std::collections::BTreeMap<String, bool> = Default::default();
    for c in mlbench::runner::study::cell_infos(store, keys)? {
        let cell = &c.doc["cell"];
        let none = cell["train"].is_null() && cell["eval"]["shots"].as_u64() == Some(0);
        *free.entry(c.method).or_insert(true) &= none;
    }
    Ok(free
        .into_iter()
        .filter(|(_, f)| *f)
        .map(|(m, _)| m)
        .collect())
}

/// While experiment `e` is still selecting (no grid cell finished, a selection record in the
/// store), prints every candidate so far instead of a comparison; `true` when it did.
fn selection_only(
    store: &Store,
    metrics: &polars::prelude::DataFrame,
    e: &str,
    wanted_report: bool,
) -> anyhow::Result<bool> {
    let grid_done = metrics.height() > 0
        && metrics
            .column("experiment")?
            .str()?
            .iter()
            .any(|x| x == Some(e));
    let Some(record) = (!grid_done)
        .then(|| mlbench::runner::select::read_record(store, e))
        .flatten()
    else {
        return Ok(false);
    };
    use mlbench::runner::candidates;
    println!("No grid cell of `{e}` has finished yet; its selection so far:\n");
    print!(
        "{}",
        candidates::markdown(&candidates::searches(store, &record)?)
    );
    if wanted_report {
        eprintln!("no report written: a report compares grid cells, and `{e}` has none yet");
    }
    Ok(true)
}

/// The cells a comparison reads: those of run `run` (a code version of the store), else each
/// cell's newest result.
fn compared_keys(
    store: &Store,
    metrics: &polars::prelude::DataFrame,
    run: Option<&String>,
) -> anyhow::Result<std::collections::HashSet<String>> {
    let Some(v) = run else {
        return Ok(newest_keys(metrics)?);
    };
    let names: Vec<String> = runs(metrics)?.into_iter().map(|(v, _)| v).collect();
    if !names.contains(v) {
        return Err(Error::Unknown {
            kind: "run",
            code: v.clone(),
            scope: format!(" in {} (runs: {})", store.dir.display(), names.join(", ")),
            suggestions: vec![],
        }
        .into());
    }
    Ok(of_run(metrics, v)?
        .column("key")?
        .str()?
        .iter()
        .flatten()
        .map(str::to_string)
        .collect())
}

/// The reference method of a comparison, and whether the experiment declared it (rather than
/// `--reference`).
struct Reference {
    method: String,
    declared: bool,
}

/// The reference method and margin of a comparison: the flags, else the experiment's
/// declaration (the margin defaults to 2 points and must be positive).
fn reference_and_margin(
    store: &Store,
    a: &CompareArgs,
) -> anyhow::Result<(Option<Reference>, f64)> {
    let declared = a
        .sel
        .experiment
        .as_ref()
        .and_then(|e| read_declaration(store, e));
    let reference = match &a.reference {
        Some(m) => Some(Reference {
            method: m.clone(),
            declared: false,
        }),
        None => declared
            .as_ref()
            .and_then(|d| d["reference"].as_str())
            .map(|m| Reference {
                method: m.to_string(),
                declared: true,
            }),
    };
    let margin = a
        .margin
        .or_else(|| declared.as_ref().and_then(|d| d["margin"].as_f64()))
        .unwrap_or(2.0);
    if !(margin.is_finite() && margin > 0.0) {
        return Err(Error::Invalid(format!(
            "--margin {margin}: a positive number of accuracy points"
        ))
        .into());
    }
    Ok((reference, margin))
}

/// Writes what `--json`, `--bmf` and `--out` ask for: the table (and verdicts) as JSON, in
/// Bencher's format, and the report folder.
fn write_comparison(
    g: &Global,
    a: &CompareArgs,
    t: &mlbench::runner::compare::Table,
    study: Option<&mlbench::report::Study>,
    q: &Query,
) -> anyhow::Result<()> {
    if let Some(p) = &a.json {
        let doc = mlbench::runner::compare::table_json(t, study.and_then(|s| s.verdicts.as_ref()));
        mlbench::util::write_bytes_atomic(p, &serde_json::to_vec_pretty(&doc)?)?;
    }
    if let Some(p) = &a.bmf {
        let doc = mlbench::runner::compare::bencher_metric_format(t, q.experiment.as_deref());
        mlbench::util::write_bytes_atomic(p, &serde_json::to_vec_pretty(&doc)?)?;
    }
    if let Some(out) = &a.out {
        let title = format!(
            "mlbench: {}{}",
            q.experiment.clone().unwrap_or_else(|| "comparison".into()),
            q.baseline
                .as_ref()
                .map(|b| format!(" (baseline {b})"))
                .unwrap_or_default()
        );
        mlbench::report::write_report(t, study, out, &title, &report_about(a, q))?;
        if !g.quiet {
            eprintln!("report written to {}", out.join("index.html").display());
        }
    }
    Ok(())
}

/// The line under a comparison report's title: the store and what was selected.
fn report_about(a: &CompareArgs, q: &Query) -> String {
    let all_or = |v: &[String]| {
        if v.is_empty() {
            "all".to_string()
        } else {
            v.join(", ")
        }
    };
    format!(
        "Store {}; metric {}; tasks {}; languages {}; methods {}.",
        a.sel.store.display(),
        q.metric,
        all_or(&q.tasks),
        all_or(&q.langs),
        all_or(&q.methods),
    )
}

/// The study declaration `mlbench run` recorded for experiment `name`.
fn read_declaration(store: &Store, name: &str) -> Option<serde_json::Value> {
    let p = store.dir.join("experiments").join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()
}

/// The verdicts, budget, label distributions and setup of a comparison against `reference`
/// (`with_verdicts` false: the declared reference has not finished, so no verdicts; true: the
/// caller has checked that `reference` is among the table's rows), from the selected
/// per-example records and the outcomes the table was built from.
#[allow(clippy::too_many_arguments)]
fn study_parts(
    store: &Store,
    keys: &std::collections::HashSet<String>,
    (samples, outcomes): (&polars::prelude::DataFrame, &CellOutcomes),
    t: &mlbench::runner::compare::Table,
    q: &Query,
    (reference, with_verdicts): (&str, bool),
    margin: f64,
    experiment: Option<&str>,
) -> anyhow::Result<mlbench::report::Study> {
    use mlbench::runner::{compare, study, verdict};
    let rows: Vec<(String, Option<i64>)> = t.rows.iter().map(|(r, _)| r.clone()).collect();
    let verdicts = match with_verdicts {
        true => Some(verdict::verdicts(
            outcomes,
            &rows,
            &t.columns,
            reference,
            margin,
            &q.seed_free,
        )),
        false => None,
    };
    let infos = study::cell_infos(store, keys)?;
    let infos: Vec<study::CellInfo> = infos
        .into_iter()
        .filter(|c| {
            experiment.is_none_or(|e| c.doc["cell"]["experiment"].as_str() == Some(e))
                && (q.methods.is_empty() || q.methods.contains(&c.method))
        })
        .collect();
    let budget = study::budget(&infos, &rows);
    let dists = study::label_distributions(&compare::selected_samples(samples, q)?)?;
    let selection = experiment.and_then(|e| mlbench::runner::select::read_record(store, e));
    let from = match &selection {
        Some(r) => study::settings_source(store, r, &infos)?,
        None => None,
    };
    let setup = study::setup(
        &infos,
        selection.as_ref(),
        from.as_ref(),
        Some(reference),
        margin,
    );
    let curves = study::curves(store, &infos)?;
    let searches = match &selection {
        Some(r) => mlbench::runner::candidates::searches(store, r)?,
        None => vec![],
    };
    Ok(mlbench::report::Study {
        verdicts,
        reference: reference.to_string(),
        budget,
        dists,
        setup,
        curves,
        selected: selection.is_some(),
        settings_from: from,
        searches,
    })
}

/// The regression gate of `compare --against`.
fn gate(
    store: &Store,
    metrics: &polars::prelude::DataFrame,
    against: &str,
    a: &CompareArgs,
) -> anyhow::Result<()> {
    use mlbench::runner::compare::{gate_bmf, gate_checks, gate_json, runs};
    let all = runs(metrics)?;
    let names: Vec<&str> = all.iter().map(|(v, _)| v.as_str()).collect();
    let current = match &a.run {
        Some(r) => r.clone(),
        None => all.last().map(|(v, _)| v.clone()).unwrap_or_default(),
    };
    if !names.contains(&current.as_str()) {
        return Err(Error::Unknown {
            kind: "run",
            code: current,
            scope: format!(" in {} (runs: {})", store.dir.display(), names.join(", ")),
            suggestions: vec![],
        }
        .into());
    }
    let before = if against == "previous" {
        let i = names.iter().position(|n| *n == current).unwrap_or(0);
        if i == 0 {
            println!("no run before `{current}`: nothing to compare against");
            return Ok(());
        }
        names[i - 1].to_string()
    } else if names.contains(&against) {
        against.to_string()
    } else {
        return Err(Error::Unknown {
            kind: "run",
            code: against.to_string(),
            scope: format!(" in {} (runs: {})", store.dir.display(), names.join(", ")),
            suggestions: vec![],
        }
        .into());
    };
    let samples = store.read_columns("samples.parquet", Some(SAMPLE_COLUMNS))?;
    let checks = gate_checks(
        metrics,
        &samples,
        &before,
        &current,
        &a.sel.metric,
        a.max_drop,
    )?;
    if let Some(p) = &a.json {
        let doc = gate_json(&checks, (&before, &current), &a.sel.metric, a.max_drop);
        mlbench::util::write_bytes_atomic(p, &serde_json::to_vec_pretty(&doc)?)?;
    }
    if let Some(p) = &a.bmf {
        let doc = gate_bmf(&checks, a.sel.experiment.as_deref(), &a.sel.metric);
        mlbench::util::write_bytes_atomic(p, &serde_json::to_vec_pretty(&doc)?)?;
    }
    let regs: Vec<_> = checks.iter().filter(|c| c.regressed).collect();
    if regs.is_empty() {
        println!(
            "no {} drop above {} points from `{before}` to `{current}`",
            a.sel.metric, a.max_drop
        );
        return Ok(());
    }
    println!(
        "{} regression(s) of {} from `{before}` to `{current}` (drop > {} points, exact McNemar p < 0.05):",
        regs.len(),
        a.sel.metric,
        a.max_drop
    );
    for r in &regs {
        println!(
            "  {} K={} {}/{}: {:.1} -> {:.1} (p = {:.2e})",
            r.method,
            mlbench::runner::compare::k_label(&r.method, r.k),
            r.task,
            r.lang,
            100.0 * r.before,
            100.0 * r.after,
            r.p.unwrap_or(1.0)
        );
    }
    std::process::exit(3);
}
