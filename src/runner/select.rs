//! Selection on the dev split: the finished candidate cells of an experiment's `[search.*]`
//! spaces in, the chosen settings per method out, recorded in the store.
//!
//! A candidate's score is its `[study] selection_metric` (default `acc`), micro-averaged over
//! the experiment's languages, averaged over its tasks, read only from cells evaluated on the
//! selection split (`<name>/selection` cells; the test split is refused as a selection split
//! when the experiment is read). The highest score wins; ties go to the candidate listed first
//! (the search space's order). The choice and every candidate's score are written to
//! `STORE/selection/<name>.json` (atomically) before any grid cell of the method is built.
//!
//! `[study] settings_from` names another study's record instead: each grid method it covers
//! takes that study's choice ([`transfer`]); the record of this experiment then carries those
//! entries with `"from"` set to the file, so its report says where the settings came from.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::store::{Store, METRIC_COLUMNS};
use crate::error::{Error, Result};
use crate::plan::grid::{Cell, Experiment, Overrides};
use crate::plan::Method;
use crate::util::write_bytes_atomic;

/// One method's selection.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub method: Method,
    /// Each candidate with its cell key and dev score (`None` until its cell is finished).
    pub candidates: Vec<(Overrides, String, Option<f64>)>,
    /// The winner, once every candidate has a score.
    pub chosen: Option<Overrides>,
}

/// Where the selection record of experiment `name` lives.
pub fn record_path(store: &Store, name: &str) -> PathBuf {
    store.dir.join("selection").join(format!("{name}.json"))
}

/// The selection record of experiment `name`, when there is one.
pub fn read_record(store: &Store, name: &str) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(record_path(store, name)).ok()?;
    serde_json::from_str(&text).ok()
}

/// The dev score of each finished candidate key: the metric's micro rows, averaged over tasks.
pub(crate) fn scores(store: &Store, keys: &[&str], metric: &str) -> Result<BTreeMap<String, f64>> {
    let mut out = BTreeMap::new();
    if !store.dir.join("cells").is_dir() || !keys.iter().any(|k| store.is_done(k)) {
        return Ok(out);
    }
    let df = store.read_columns("metrics.parquet", Some(METRIC_COLUMNS))?;
    let key = df.column("key")?.str()?.clone();
    let m = df.column("metric")?.str()?.clone();
    let lang = df.column("lang")?.str()?.clone();
    let value = df.column("value")?.f64()?.clone();
    let mut acc: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for i in 0..df.height() {
        let (Some(k), Some(mm), Some(l), Some(v)) =
            (key.get(i), m.get(i), lang.get(i), value.get(i))
        else {
            continue;
        };
        if mm == metric && l == "micro" && keys.contains(&k) {
            acc.entry(k.to_string()).or_default().push(v);
        }
    }
    for (k, v) in acc {
        out.insert(k, v.iter().sum::<f64>() / v.len() as f64);
    }
    Ok(out)
}

/// The choices of every searched method from the finished candidates of `cells` (the
/// experiment's [`Experiment::selection_cells`]).
pub fn choose(store: &Store, exp: &Experiment, cells: &[Cell]) -> Result<Vec<Choice>> {
    let keys: Vec<&str> = cells.iter().map(|c| c.key.as_str()).collect();
    let scored = scores(store, &keys, &exp.study.selection_metric)?;
    let mut out = Vec::new();
    for &m in exp.search.keys() {
        let candidates: Vec<(Overrides, String, Option<f64>)> = cells
            .iter()
            .filter(|c| c.method == m)
            .map(|c| {
                (
                    c.candidate.clone().unwrap_or_default(),
                    c.key.clone(),
                    scored.get(&c.key).copied(),
                )
            })
            .collect();
        let chosen = if candidates.iter().all(|c| c.2.is_some()) {
            candidates
                .iter()
                .fold(
                    None::<&(Overrides, String, Option<f64>)>,
                    |best, c| match best {
                        Some(b) if b.2 >= c.2 => Some(b),
                        _ => Some(c),
                    },
                )
                .map(|c| c.0.clone())
        } else {
            None
        };
        out.push(Choice {
            method: m,
            candidates,
            chosen,
        });
    }
    Ok(out)
}

/// A grid method whose settings come from another study's selection record.
#[derive(Debug, Clone, PartialEq)]
pub struct Transferred {
    pub method: Method,
    /// That study's choice (`None` until it has made it).
    pub chosen: Option<Overrides>,
    /// The method's entry of that record, as written there.
    pub entry: serde_json::Value,
}

/// The methods of `exp` that `[study] settings_from` covers, with that record's choices (none
/// when the experiment names no record). A missing or malformed record, a choice that is not
/// a table of settings, and a covered method that `exp` also searches are errors.
pub fn transfer(exp: &Experiment) -> Result<Vec<Transferred>> {
    let Some(path) = &exp.study.settings_from else {
        return Ok(vec![]);
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::missing_or_io(
            "selection record (`[study] settings_from`)",
            "read",
            path,
            e,
        )
    })?;
    let bad = |message: String| Error::Config {
        path: path.clone(),
        message,
    };
    let doc: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not a selection record: {e}")))?;
    let Some(entries) = doc.as_object() else {
        return Err(bad(
            "not a selection record: expected an object of methods".into()
        ));
    };
    let mut out = Vec::new();
    let mut problems = Vec::new();
    for &m in &exp.methods {
        let Some(entry) = entries.get(m.name()) else {
            continue;
        };
        if exp.search.contains_key(&m) {
            problems.push(format!(
                "`{m}`: [search.{m}] and [study] settings_from ({}) both give its settings",
                path.display()
            ));
            continue;
        }
        let chosen = match &entry["chosen"] {
            serde_json::Value::Null => None,
            serde_json::Value::Object(o) => {
                let mut set = Overrides::new();
                for (k, v) in o {
                    let v = toml::Value::try_from(v)
                        .map_err(|e| bad(format!("`{m}`: chosen `{k}` = {v}: {e}")))?;
                    set.insert(k.clone(), v);
                }
                Some(set)
            }
            other => {
                return Err(bad(format!(
                    "`{m}`: `chosen` must be a table of settings or null, found {other}"
                )))
            }
        };
        out.push(Transferred {
            method: m,
            chosen,
            entry: entry.clone(),
        });
    }
    if !problems.is_empty() {
        return Err(Error::Problems {
            context: format!("experiment `{}`", exp.name),
            problems,
        });
    }
    Ok(out)
}

/// Writes the selection record of `exp`: every candidate's score and each searched method's
/// choice, and the entries taken from `[study] settings_from` (marked with `"from"`).
pub fn write_record(
    store: &Store,
    exp: &Experiment,
    choices: &[Choice],
    transferred: &[Transferred],
) -> Result<()> {
    let mut doc = serde_json::Map::new();
    for t in transferred {
        let mut entry = t.entry.clone();
        if let (Some(o), Some(p)) = (entry.as_object_mut(), &exp.study.settings_from) {
            o.insert("from".into(), p.display().to_string().into());
        }
        doc.insert(t.method.to_string(), entry);
    }
    for c in choices {
        let (seed, k) = exp.selection_point(c.method);
        doc.insert(
            c.method.to_string(),
            serde_json::json!({
                "split": exp.study.selection_split,
                "metric": format!("{} (micro over languages, mean over tasks)", exp.study.selection_metric),
                "seed": seed,
                "k": k,
                "candidates": c.candidates.iter().map(|(o, key, s)| serde_json::json!({
                    "settings": o, "key": key, "score": s,
                })).collect::<Vec<_>>(),
                "chosen": c.chosen,
            }),
        );
    }
    write_bytes_atomic(
        &record_path(store, &exp.name),
        &serde_json::to_vec_pretty(&serde_json::Value::Object(doc))?,
    )
}
