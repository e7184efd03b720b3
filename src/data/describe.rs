//! Inspection of the canonical datasets: tasks x languages x splits x counts x label
//! distribution.
//!
//! In: dataset files under the data folder. Out: [`SplitStats`] rows (printed as a table or
//! JSON by the CLI).

use std::collections::BTreeMap;
use std::path::Path;

use polars::prelude::*;
use serde::Serialize;

use super::catalogue::{dataset_path, known_tasks};
use crate::error::{Error, Result};

/// Counts of one (task, language, split).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SplitStats {
    pub task: String,
    pub lang: String,
    pub lang_code: String,
    pub split: String,
    pub n: usize,
    /// Label index -> count (empty for unlabelled tasks).
    pub labels: BTreeMap<i64, usize>,
    /// Label names in index order (from `choices` when they are the same in every row).
    pub label_names: Vec<String>,
}

/// One line per task, for `mlbench data ls`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TaskSummary {
    pub task: String,
    pub languages: usize,
    pub splits: Vec<String>,
    pub rows: usize,
}

/// Per (task, language, split) statistics for `tasks` (all tasks when empty).
pub fn describe(data_dir: &Path, tasks: &[String]) -> Result<Vec<SplitStats>> {
    let tasks: Vec<String> = if tasks.is_empty() {
        known_tasks(data_dir)
    } else {
        tasks.to_vec()
    };
    if tasks.is_empty() {
        return Err(Error::MissingFile {
            what: "dataset files (*.parquet)",
            path: data_dir.to_path_buf(),
        });
    }
    let mut out = Vec::new();
    for task in &tasks {
        let path = dataset_path(data_dir, task)?;
        crate::data::schema::check_file(&path)?;
        let pl = PlRefPath::try_from_path(&path).map_err(|e| Error::CorruptParquet {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let corrupt = |e: PolarsError| Error::CorruptParquet {
            path: path.clone(),
            message: e.to_string(),
        };
        let lf = LazyFrame::scan_parquet(pl, ScanArgsParquet::default()).map_err(corrupt)?;
        let df = lf
            .clone()
            .group_by_stable([col("lang"), col("lang_code"), col("split"), col("label")])
            .agg([len().alias("n")])
            .sort(
                ["lang_code", "split", "label"],
                SortMultipleOptions::default(),
            )
            .collect()
            .map_err(corrupt)?;
        // Label names: the `choices` of labelled rows when they are the same in every row checked
        // (class names, as in SIB-200); none when they vary per row (alternatives, as in XCOPA).
        let names_df = lf
            .filter(col("label").is_not_null())
            .select([col("choices")])
            .limit(2000)
            .collect()
            .map_err(corrupt)?;
        let mut label_names: Vec<String> = Vec::new();
        if let Ok(l) = names_df.column("choices").and_then(|c| c.list().cloned()) {
            let lists: Vec<Vec<String>> = (0..l.len())
                .filter_map(|i| l.get_as_series(i))
                .map(|s| {
                    s.str()
                        .map(|s| s.iter().flatten().map(str::to_string).collect())
                        .unwrap_or_default()
                })
                .collect();
            if lists.windows(2).all(|w| w[0] == w[1]) {
                label_names = lists.into_iter().next().unwrap_or_default();
            }
        }
        let lang = df.column("lang")?.str()?.clone();
        let code = df.column("lang_code")?.str()?.clone();
        let split = df.column("split")?.str()?.clone();
        let label = df.column("label")?.cast(&DataType::Int64)?.i64()?.clone();
        let n = df.column("n")?.cast(&DataType::UInt64)?.u64()?.clone();
        let mut cur: Option<SplitStats> = None;
        for i in 0..df.height() {
            let key = (
                lang.get(i).unwrap_or(""),
                code.get(i).unwrap_or(""),
                split.get(i).unwrap_or(""),
            );
            let same = cur
                .as_ref()
                .is_some_and(|c| (c.lang.as_str(), c.lang_code.as_str(), c.split.as_str()) == key);
            if !same {
                if let Some(c) = cur.take() {
                    out.push(c);
                }
                cur = Some(SplitStats {
                    task: task.clone(),
                    lang: key.0.to_string(),
                    lang_code: key.1.to_string(),
                    split: key.2.to_string(),
                    n: 0,
                    labels: BTreeMap::new(),
                    label_names: label_names.clone(),
                });
            }
            let c = cur.as_mut().expect("set above");
            let count = n.get(i).unwrap_or(0) as usize;
            c.n += count;
            if let Some(y) = label.get(i) {
                c.labels.insert(y, count);
            }
        }
        out.extend(cur);
    }
    Ok(out)
}

/// One summary line per task.
pub fn summarize(stats: &[SplitStats]) -> Vec<TaskSummary> {
    let mut by: BTreeMap<&str, (std::collections::BTreeSet<&str>, Vec<String>, usize)> =
        BTreeMap::new();
    for s in stats {
        let e = by.entry(&s.task).or_default();
        e.0.insert(&s.lang_code);
        if !e.1.contains(&s.split) {
            e.1.push(s.split.clone());
        }
        e.2 += s.n;
    }
    by.into_iter()
        .map(|(t, (l, s, n))| TaskSummary {
            task: t.to_string(),
            languages: l.len(),
            splits: s,
            rows: n,
        })
        .collect()
}
