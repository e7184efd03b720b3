//! The catalogue of the data folder: a task name in, its dataset file, its languages, the
//! splits each language has, and its rows out. Every stage that opens a task's data (the
//! sampler, training, evaluation, `data describe`) finds files and reads rows here, so a task x
//! language split is located and read one way, with one set of errors (unknown task with
//! suggestions, missing dataset file, corrupt Parquet naming the file).

use std::path::{Path, PathBuf};

use polars::prelude::*;

use super::lang::LangEntry;
use super::schema::{self, Example};
use crate::error::{Error, Result};

/// The path of a task's dataset file, with a helpful error when the task is unknown.
pub fn dataset_path(data_dir: &Path, task: &str) -> Result<PathBuf> {
    let p = data_dir.join(format!("{task}.parquet"));
    if p.exists() {
        return Ok(p);
    }
    let known = known_tasks(data_dir);
    if known.is_empty() {
        return Err(Error::MissingFile {
            what: "dataset file",
            path: p,
        });
    }
    Err(Error::Unknown {
        kind: "task",
        code: task.to_string(),
        scope: format!(
            " (datasets in {}: {})",
            data_dir.display(),
            known.join(", ")
        ),
        suggestions: crate::util::suggestions(task, known.iter().map(String::as_str)),
    })
}

/// Task names that have a dataset file in `data_dir`, sorted.
pub fn known_tasks(data_dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(data_dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    n.strip_suffix(".parquet").map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

pub(crate) fn scan(path: &Path) -> Result<LazyFrame> {
    schema::check_file(path)?;
    let pl = PlRefPath::try_from_path(path).map_err(|e| Error::CorruptParquet {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    LazyFrame::scan_parquet(pl, ScanArgsParquet::default()).map_err(|e| Error::CorruptParquet {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

pub(crate) fn collect(lf: LazyFrame, path: &Path) -> Result<DataFrame> {
    lf.collect().map_err(|e| Error::CorruptParquet {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// The languages of a task file: distinct (lang, lang_code) pairs, sorted by lang_code.
pub fn task_languages(path: &Path) -> Result<Vec<LangEntry>> {
    let df = collect(
        scan(path)?
            .group_by_stable([col("lang"), col("lang_code")])
            .agg([len()])
            .sort(["lang_code"], SortMultipleOptions::default()),
        path,
    )?;
    let l = df.column("lang")?.str()?.clone();
    let c = df.column("lang_code")?.str()?.clone();
    Ok(l.iter()
        .zip(c.iter())
        .filter_map(|(a, b)| {
            Some(LangEntry {
                lang: a?.to_string(),
                lang_code: b?.to_string(),
            })
        })
        .collect())
}

/// Which codes of `req.langs` apply to `task` (`task:code` entries are scoped).
pub fn codes_for(task: &str, langs: &[String]) -> Vec<String> {
    langs
        .iter()
        .filter_map(|c| match c.split_once(':') {
            Some((t, code)) if t == task => Some(code.to_string()),
            Some(_) => None,
            None => Some(c.clone()),
        })
        .collect()
}

/// The splits one language of a task file has, sorted.
pub fn splits_of(path: &Path, lang_name: &str) -> Result<Vec<String>> {
    let df = collect(
        scan(path)?
            .filter(col("lang").eq(lit(lang_name.to_string())))
            .group_by_stable([col("split")])
            .agg([len()]),
        path,
    )?;
    let mut v: Vec<String> = df
        .column("split")?
        .str()?
        .iter()
        .flatten()
        .map(str::to_string)
        .collect();
    v.sort();
    Ok(v)
}

/// The rows of a task file for the languages `langs` (by `lang` name) in the splits `splits`
/// (every split: `None`), in file order.
pub fn read_rows(path: &Path, langs: &[&str], splits: Option<&[&str]>) -> Result<Vec<Example>> {
    let df = schema::load(path, None)?;
    let in_lang = df.column("lang")?.str()?.clone();
    let in_split = df.column("split")?.str()?.clone();
    let mask: BooleanChunked = in_lang
        .iter()
        .zip(in_split.iter())
        .map(|(l, s)| {
            l.is_some_and(|l| langs.contains(&l))
                && splits.is_none_or(|w| s.is_some_and(|s| w.contains(&s)))
        })
        .collect();
    schema::from_frame(&df.filter(&mask)?)
}
