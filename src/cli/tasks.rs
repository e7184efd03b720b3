//! `mlbench tasks ...` commands.

use clap::{Args, Subcommand};
use polars::prelude::*;

use super::{table, Global};
use mlbench::data::{lang, sample, schema};
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
            let path = sample::dataset_path(&g.data_dir, spec.dataset())?;
            let entries = sample::task_languages(&path)?;
            let e = lang::resolve(&a.task, &a.lang, &entries)?;
            let split = a.split.clone().unwrap_or_else(|| spec.eval_split.clone());
            let df = schema::load(&path, None)?;
            let mask = df.column("lang")?.str()?.equal(e.lang.as_str())
                & df.column("split")?.str()?.equal(split.as_str());
            let df = df.filter(&mask)?;
            let ids = df.column("id")?.str()?.clone();
            let row = match &a.id {
                Some(id) => (0..df.height())
                    .find(|&i| ids.get(i) == Some(id.as_str()))
                    .ok_or_else(|| Error::Unknown {
                        kind: "example id",
                        code: id.clone(),
                        scope: format!(" in {}/{} split `{split}`", a.task, e.lang_code),
                        suggestions: vec![],
                    })?,
                None if df.height() > 0 => 0,
                None => {
                    return Err(Error::MissingSplit {
                        task: a.task.clone(),
                        lang: e.lang_code.clone(),
                        split,
                        available: vec![],
                    }
                    .into())
                }
            };
            let get = |name: &str| -> Option<String> {
                df.column(name)
                    .ok()?
                    .str()
                    .ok()?
                    .get(row)
                    .map(str::to_string)
            };
            let choices: Vec<String> = df
                .column("choices")?
                .list()?
                .get_as_series(row)
                .and_then(|s| {
                    s.str()
                        .ok()
                        .map(|s| s.iter().flatten().map(str::to_string).collect())
                })
                .unwrap_or_default();
            let words = spec
                .prompt
                .label_words
                .clone()
                .unwrap_or_else(|| choices.clone());
            let label = df.column("label")?.cast(&DataType::Int64)?.i64()?.get(row);
            let answer = match label {
                Some(y) => words.get(y as usize).cloned(),
                None => get("target"),
            };
            let fields = |name: &str| -> Option<String> {
                if name == "answer" {
                    return answer.clone();
                }
                get(name)
            };
            let context = spec.render(&spec.prompt.template, &fields)?;
            println!(
                "# {}/{} {} id {}",
                a.task,
                e.lang_code,
                split,
                ids.get(row).unwrap_or("")
            );
            println!("--- context ---\n{context}");
            if !words.is_empty() {
                println!("--- choices ---");
                for (i, w) in words.iter().enumerate() {
                    let f = |name: &str| -> Option<String> {
                        if name == "choice" {
                            return Some(w.clone());
                        }
                        fields(name)
                    };
                    let mark = if Some(i as i64) == label {
                        " (gold)"
                    } else {
                        ""
                    };
                    println!("{i}: {:?}{mark}", spec.render(&spec.prompt.choice, &f)?);
                }
            }
            if answer.is_some() {
                println!(
                    "--- training answer ---\n{:?}",
                    spec.render(&spec.prompt.answer, &fields)?
                );
            }
            Ok(())
        }
    }
}
