//! `mlbench tasks ...` commands.

use clap::{Args, Subcommand};
use polars::prelude::*;

use super::{table, Global};
use mlbench::data::{catalogue, lang, schema};
use mlbench::tasks::{self, TaskSpec};
use mlbench::Error;

#[derive(Debug, Subcommand)]
pub enum TasksCommand {
    /// List the task specifications with version, scoring and metrics.
    Ls(LsArgs),
    /// Render the prompt of one example, as training and scoring will see it.
    Render(RenderArgs),
}

#[derive(Debug, Args)]
pub struct LsArgs {
    /// Print as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RenderArgs {
    /// Task name.
    #[arg(long)]
    pub task: String,
    /// Language (any code form).
    #[arg(long)]
    pub lang: String,
    /// Example id (default: the first example of the split).
    #[arg(long)]
    pub id: Option<String>,
    /// Split (default: the spec's eval split).
    #[arg(long)]
    pub split: Option<String>,
}

pub fn run(g: &Global, cmd: TasksCommand) -> anyhow::Result<()> {
    match cmd {
        TasksCommand::Ls(a) => {
            let specs: Vec<TaskSpec> = tasks::known_specs(&g.data_dir)
                .iter()
                .map(|t| TaskSpec::for_task(&g.data_dir, t))
                .collect::<Result<_, _>>()?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&specs)?);
            } else {
                let rows: Vec<Vec<String>> = specs
                    .iter()
                    .map(|s| {
                        vec![
                            s.name.clone(),
                            s.version.to_string(),
                            format!("{:?}", s.scoring),
                            s.metrics
                                .iter()
                                .map(|m| m.name.clone())
                                .collect::<Vec<_>>()
                                .join(","),
                            s.description.clone(),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    table::render(
                        &["task", "version", "scoring", "metrics", "description"],
                        &rows
                    )
                );
            }
            Ok(())
        }
        TasksCommand::Render(a) => {
            let spec = TaskSpec::for_task(&g.data_dir, &a.task)?;
            let path = catalogue::dataset_path(&g.data_dir, spec.dataset())?;
            let entries = catalogue::task_languages(&path)?;
            let e = lang::resolve(&a.task, &a.lang, &entries)?;
            let split = a.split.clone().unwrap_or_else(|| spec.eval_split.clone());
            let df = schema::load(&path, None)?;
            let mask = df.column("lang")?.str()?.equal(e.lang.as_str())
                & df.column("split")?.str()?.equal(split.as_str());
            let rows = schema::from_frame(&df.filter(&mask)?)?;
            let ex = match &a.id {
                Some(id) => rows
                    .iter()
                    .find(|r| &r.id == id)
                    .ok_or_else(|| Error::Unknown {
                        kind: "example id",
                        code: id.clone(),
                        scope: format!(" in {}/{} split `{split}`", a.task, e.lang_code),
                        suggestions: vec![],
                    })?,
                None => rows.first().ok_or_else(|| {
                    let in_lang = df.column("lang").and_then(|c| c.str().cloned());
                    let mut available: Vec<String> = match (in_lang, df.column("split")) {
                        (Ok(l), Ok(sp)) => l
                            .iter()
                            .zip(sp.str().into_iter().flat_map(|c| c.iter()))
                            .filter(|(l, _)| *l == Some(e.lang.as_str()))
                            .filter_map(|(_, s)| s.map(str::to_string))
                            .collect(),
                        _ => vec![],
                    };
                    available.sort();
                    available.dedup();
                    Error::MissingSplit {
                        task: a.task.clone(),
                        lang: e.lang_code.clone(),
                        split: split.clone(),
                        available,
                    }
                })?,
            };
            let r = spec.render_example(ex)?;
            println!("# {}/{} {} id {}", a.task, e.lang_code, split, r.id);
            println!("--- context ---\n{}", r.context);
            if !r.choices.is_empty() {
                println!("--- choices ---");
                for (i, c) in r.choices.iter().enumerate() {
                    let mark = if r.gold == Some(i) { " (gold)" } else { "" };
                    println!("{i}: {c:?}{mark}");
                }
            }
            if let Some(ans) = &r.answer {
                println!("--- training answer ---\n{ans:?}");
            }
            Ok(())
        }
    }
}
