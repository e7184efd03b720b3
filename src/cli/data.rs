//! `mlbench data ...` commands: the parsed subcommand in; tables or JSON on stdout, converted
//! files and pools on disk, out.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use super::{split_list, table, Global};
use mlbench::data::{describe, import, lang, sample};
use mlbench::Error;

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Convert the raw published datasets into canonical Parquet files plus a manifest.
    Import(ImportArgs),
    /// Re-hash the converted files (and, with --source, the raw sources) against the manifest
    /// and re-convert the sources to check the files hold exactly what the converter makes.
    Verify(VerifyArgs),
    /// One line per task: languages, splits, rows.
    Ls(LsArgs),
    /// Counts per task x language x split, with the label distribution.
    Describe(DescribeArgs),
    /// Draw seeded, stratified, nested few-shot pools from the train split.
    Sample(SampleArgs),
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The raw data folder (with sib200/, nusax/, afrisenti/, xcopa/, mgsm/).
    #[arg(long, default_value = "../shared/data")]
    pub source: PathBuf,
    /// Where to write `<task>.parquet` and `manifest.json` (default: --data-dir).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Datasets to import, comma-separated, or `all`.
    #[arg(long, value_delimiter = ',', default_value = "all")]
    pub tasks: Vec<String>,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The raw data folder; without it only the converted files are re-hashed.
    #[arg(long)]
    pub source: Option<PathBuf>,
    /// Print findings as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct LsArgs {
    /// Print as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DescribeArgs {
    /// Tasks to describe, comma-separated (default: all).
    #[arg(long, value_delimiter = ',')]
    pub task: Vec<String>,
    /// Languages to show (any code form: en, eng_Latn, the dataset's own code).
    #[arg(long, value_delimiter = ',')]
    pub langs: Vec<String>,
    /// Splits to show, comma-separated (default: all).
    #[arg(long, value_delimiter = ',')]
    pub split: Vec<String>,
    /// Print as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SampleArgs {
    /// Task(s), comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub task: Vec<String>,
    /// Languages: `en`, `eng_Latn`, a dataset code, `all`, or `task:code` for one task only.
    #[arg(long, value_delimiter = ',', required = true)]
    pub langs: Vec<String>,
    /// Budget(s) K per (task, language), comma-separated; smaller pools nest in larger ones.
    #[arg(long, value_delimiter = ',', required = true)]
    pub k: Vec<usize>,
    /// Seed of the draw.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output Parquet file (written atomically).
    #[arg(long)]
    pub out: PathBuf,
    /// The split to draw from.
    #[arg(long, default_value = "train")]
    pub split: String,
    /// Draw the same ids in every language of a parallel dataset (one stream per task).
    #[arg(long)]
    pub aligned: bool,
}

pub fn run(g: &Global, cmd: DataCommand) -> anyhow::Result<()> {
    match cmd {
        DataCommand::Import(a) => run_import(g, &a),
        DataCommand::Verify(a) => run_verify(g, &a),
        DataCommand::Ls(a) => run_ls(g, &a),
        DataCommand::Describe(a) => run_describe(g, &a),
        DataCommand::Sample(a) => run_sample(g, &a),
    }
}

/// `data import`: converts the raw datasets and prints what each became.
fn run_import(g: &Global, a: &ImportArgs) -> anyhow::Result<()> {
    let out = a.out.clone().unwrap_or_else(|| g.data_dir.clone());
    let tasks = if a.tasks.iter().any(|t| t == "all") {
        import::DATASETS.iter().map(|s| s.to_string()).collect()
    } else {
        split_list(&a.tasks)
    };
    let m = import::import(&a.source, &out, &tasks, &|what| g.bar(what))?;
    if !g.quiet {
        let rows: Vec<Vec<String>> = tasks
            .iter()
            .filter_map(|t| m.datasets.get(t).map(|e| (t, e)))
            .map(|(t, e)| {
                vec![
                    t.clone(),
                    e.languages.to_string(),
                    e.rows.to_string(),
                    e.sources.len().to_string(),
                    e.file.clone(),
                ]
            })
            .collect();
        print!(
            "{}",
            table::render(&["task", "languages", "rows", "sources", "file"], &rows)
        );
        println!("manifest: {}", out.join("manifest.json").display());
    }
    Ok(())
}

/// `data verify`: re-hashes (and re-converts) against the manifest; any finding is an error.
fn run_verify(g: &Global, a: &VerifyArgs) -> anyhow::Result<()> {
    let findings = import::verify(&g.data_dir, a.source.as_deref(), &|what| g.bar(what))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&findings)?);
    } else if findings.is_empty() {
        if !g.quiet {
            println!(
                "ok: every file matches {}",
                g.data_dir.join("manifest.json").display()
            );
        }
    } else {
        for f in &findings {
            eprintln!("{}: {}", f.path, f.problem);
        }
    }
    if findings.is_empty() {
        Ok(())
    } else {
        Err(Error::Verify {
            path: g.data_dir.join("manifest.json"),
            message: format!("{} problem(s) found", findings.len()),
        }
        .into())
    }
}

/// `data ls`: one line per task.
fn run_ls(g: &Global, a: &LsArgs) -> anyhow::Result<()> {
    let stats = describe::describe(&g.data_dir, &[])?;
    let sum = describe::summarize(&stats);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&sum)?);
    } else {
        let rows: Vec<Vec<String>> = sum
            .iter()
            .map(|s| {
                vec![
                    s.task.clone(),
                    s.languages.to_string(),
                    s.splits.join(","),
                    s.rows.to_string(),
                ]
            })
            .collect();
        print!(
            "{}",
            table::render(&["task", "languages", "splits", "rows"], &rows)
        );
    }
    Ok(())
}

/// `data describe`: counts per task x language x split, filtered by language and split.
fn run_describe(g: &Global, a: &DescribeArgs) -> anyhow::Result<()> {
    let tasks = split_list(&a.task);
    let mut stats = describe::describe(&g.data_dir, &tasks)?;
    let langs = split_list(&a.langs);
    if !langs.is_empty() {
        let keep = kept_langs(&stats, &langs)?;
        stats.retain(|s| keep.contains(&(s.task.clone(), s.lang.clone())));
    }
    let splits = split_list(&a.split);
    if !splits.is_empty() {
        stats.retain(|s| splits.contains(&s.split));
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&stats)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = stats
        .iter()
        .map(|s| {
            let dist = s
                .labels
                .iter()
                .map(|(y, n)| match s.label_names.get(*y as usize) {
                    Some(name) => format!("{name}={n}"),
                    None => format!("{y}={n}"),
                })
                .collect::<Vec<_>>()
                .join(" ");
            vec![
                s.task.clone(),
                s.lang.clone(),
                s.lang_code.clone(),
                s.split.clone(),
                s.n.to_string(),
                dist,
            ]
        })
        .collect();
    print!(
        "{}",
        table::render(
            &["task", "lang", "lang_code", "split", "n", "labels"],
            &rows
        )
    );
    Ok(())
}

/// The (task, lang) pairs the language codes `langs` name among the described tasks. A code
/// only has to exist in one of the tasks; one that exists in none is the error.
fn kept_langs(
    stats: &[describe::SplitStats],
    langs: &[String],
) -> Result<Vec<(String, String)>, Error> {
    let mut keep: Vec<(String, String)> = Vec::new();
    let mut resolved = std::collections::BTreeSet::new();
    let mut first_err: std::collections::BTreeMap<String, Error> = Default::default();
    let mut task_names: Vec<String> = stats.iter().map(|s| s.task.clone()).collect();
    task_names.dedup();
    for t in &task_names {
        let mut entries: Vec<lang::LangEntry> = stats
            .iter()
            .filter(|s| &s.task == t)
            .map(|s| lang::LangEntry {
                lang: s.lang.clone(),
                lang_code: s.lang_code.clone(),
            })
            .collect();
        entries.dedup();
        for code in langs {
            match lang::resolve(t, code, &entries) {
                Ok(e) => {
                    keep.push((t.clone(), e.lang.clone()));
                    resolved.insert(code.clone());
                }
                Err(e) => {
                    first_err.entry(code.clone()).or_insert(e);
                }
            }
        }
    }
    match first_err.into_iter().find(|(c, _)| !resolved.contains(c)) {
        Some((_, e)) => Err(e),
        None => Ok(keep),
    }
}

/// `data sample`: draws the pools and writes them.
fn run_sample(g: &Global, a: &SampleArgs) -> anyhow::Result<()> {
    let req = sample::PoolRequest {
        tasks: split_list(&a.task),
        langs: split_list(&a.langs),
        ks: a.k.clone(),
        seed: a.seed,
        split: a.split.clone(),
        aligned: a.aligned,
    };
    let t0 = std::time::Instant::now();
    let rows = sample::sample_pools(&g.data_dir, &req)?;
    tracing::debug!(secs = t0.elapsed().as_secs_f64(), "drawn");
    sample::write_pools(&rows, &a.out).with_context(|| format!("writing {}", a.out.display()))?;
    tracing::info!(rows = rows.len(), out = %a.out.display(), secs = t0.elapsed().as_secs_f64(), "pools written");
    if !g.quiet {
        let groups: std::collections::BTreeSet<(&str, &str)> = rows
            .iter()
            .map(|r| (r.task.as_str(), r.lang_code.as_str()))
            .collect();
        println!(
            "{} rows: {} (task, language) pools x k in {:?}, seed {} -> {}",
            rows.len(),
            groups.len(),
            a.k,
            a.seed,
            a.out.display()
        );
    }
    Ok(())
}
