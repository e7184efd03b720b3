//! A results store in the Every Eval Ever schema (v0.2.1, as [`crate::eval::eee`] writes for one
//! evaluation folder).
//!
//! In: a store `mlbench run` wrote ([`super::store`]): each finished cell's
//! `cells/<key>/cell.json` (method, K, seed, the evaluation configuration, code version, the
//! model weights' sha256) and its rows of `metrics.parquet` and `samples.parquet` (per-cell
//! files or compacted parts, each cell's rows once). Out, per finished cell, named by its key:
//! - `<key>.json`, the aggregate record: `source_metadata.source_name` says it comes from an
//!   mlbench results store (and which experiment), `model_info.id` is the model's id with the
//!   cell after a `+` (`<model>+<method>-K<k>-seed<seed>`; the model alone for `base`), and
//!   `model_info.additional_details` holds the cell (experiment, key, method, K, seed), the
//!   weights' sha256 and the evaluation's dtype; one `evaluation_results` entry per metric row
//!   of the cell, as for an evaluation folder;
//! - `<key>.instances.jsonl` when the store holds the cell's sample rows: one single-turn
//!   instance per row. The store keeps the prompt's hash, not its text: `input.raw` is empty and
//!   `sample_hash` is the row's `prompt_sha` (the first 16 hex digits of the prompt's sha256); a
//!   multiple-choice answer is the index of its choice (`input.reference` the gold index,
//!   `output.raw` the predicted one), a generated answer its text; `evaluation.score` is the
//!   row's `correct` (the task's first metric).
//!
//! Files are written atomically; the store does not change.

use std::path::{Path, PathBuf};

use polars::prelude::*;
use serde_json::{json, Value};

use super::store::Store;
use crate::error::{Error, Result};
use crate::eval::eee::{
    eval_library, model_id, read_json, result_entry, rows_of, source_metadata, write_instances,
    write_record, Row, INSTANCE_SCHEMA, SCHEMA,
};

/// Writes the Every Eval Ever files of `from` into `out`: an evaluation folder (it has
/// `results.json`: [`crate::eval::eee::export`]) or a results store (it has `cells/`:
/// [`export_store`]); anything else is refused, saying so.
pub fn export_from(from: &Path, out: &Path, organization: &str) -> Result<Vec<PathBuf>> {
    if from.join("results.json").is_file() {
        crate::eval::eee::export(from, out, organization)
    } else if from.join("cells").is_dir() {
        export_store(from, out, organization)
    } else {
        Err(Error::Invalid(format!(
            "{} is neither an evaluation folder (no results.json, as `mlbench eval --out` \
             writes) nor a results store (no cells/ folder, as `mlbench run --store` writes)",
            from.display()
        )))
    }
}

/// Writes the Every Eval Ever files of every finished cell of the store at `dir` into `out`
/// (see the module doc); `organization` names who ran it. Returns the files written.
pub fn export_store(dir: &Path, out: &Path, organization: &str) -> Result<Vec<PathBuf>> {
    let store = Store::new(dir);
    let keys = store.finished();
    if keys.is_empty() {
        return Err(Error::Invalid(format!(
            "the results store {} has no finished cell to export",
            dir.display()
        )));
    }
    let metrics = store.read("metrics.parquet")?;
    let origin = dir.join("metrics.parquet");
    let rows: Vec<(String, Row)> = strings(&metrics, "key", &origin)?
        .into_iter()
        .zip(rows_of(&metrics, &origin)?)
        .collect();
    let samples = if has_samples(&store) {
        Some(store.read("samples.parquet")?)
    } else {
        None
    };
    std::fs::create_dir_all(out).map_err(|e| Error::io("create directory", out, e))?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        .to_string();
    let mut written = Vec::new();
    for key in &keys {
        let cell = read_json(&store.cell_dir(key).join("cell.json"))?;
        let mine: Vec<&Row> = rows
            .iter()
            .filter(|(k, _)| k == key)
            .map(|r| &r.1)
            .collect();
        let mut record = aggregate(&cell, &mine, organization, &stamp);
        if let Some(df) = &samples {
            let lines = instances(df, key, &record, &dir.join("samples.parquet"))?;
            if !lines.is_empty() {
                written.push(write_instances(out, key, &lines, &mut record)?);
            }
        }
        written.push(write_record(out, key, &record)?);
    }
    Ok(written)
}

/// Whether the store holds any sample rows (a compacted part or a cell's own file).
fn has_samples(store: &Store) -> bool {
    !store.parts("samples.parquet").is_empty()
        || store
            .finished()
            .iter()
            .any(|k| store.cell_dir(k).join("samples.parquet").exists())
}

/// The string column `name` of `df` (read from `path`), missing values as empty strings.
fn strings(df: &DataFrame, name: &str, path: &Path) -> Result<Vec<String>> {
    let bad = |e: PolarsError| Error::Invalid(format!("{}: {e}", path.display()));
    Ok(df
        .column(name)
        .map_err(bad)?
        .str()
        .map_err(bad)?
        .iter()
        .map(|v| v.unwrap_or_default().to_string())
        .collect())
}

/// The model's id of a cell: the model's, with the method, K and seed after a `+` (the model
/// alone for the base model).
fn cell_model_id(c: &Value) -> String {
    let method = c["method"].as_str().unwrap_or_default();
    let model = model_id(c["eval"]["model"].as_str().unwrap_or_default(), "base");
    if method == "base" {
        return model;
    }
    let k = c["k"]
        .as_i64()
        .map_or("full".to_string(), |k| k.to_string());
    format!("{model}+{method}-K{k}-seed{}", c["seed"])
}

/// The aggregate record of one cell (its `cell.json` as `cell`).
fn aggregate(cell: &Value, rows: &[&Row], organization: &str, stamp: &str) -> Value {
    let c = &cell["cell"];
    let eval = &c["eval"];
    let text = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_string);
    let experiment = text(&c["experiment"]);
    let tasks: Vec<String> = eval["tasks"]
        .as_array()
        .into_iter()
        .flatten()
        .map(text)
        .collect();
    let id = cell_model_id(c);
    let model = text(&eval["model"]);
    let details = json!({
        "experiment": experiment, "cell_key": text(&c["key"]), "method": text(&c["method"]),
        "k": c["k"].as_i64().map_or("full".to_string(), |k| k.to_string()),
        "seed": text(&c["seed"]), "dtype": text(&eval["dtype"]),
        "model_sha256": text(&cell["info"]["model_sha256"]),
    });
    // The cell's evaluation split (the task's own evaluation split when none was set).
    let spec = json!({"split": eval["split"].as_str().unwrap_or("default")});
    json!({
        "schema_version": SCHEMA,
        "evaluation_id": format!("mlbench-{}/{id}/{}/{stamp}", tasks.join("+"), text(&c["key"])),
        "retrieved_timestamp": stamp,
        "source_metadata": source_metadata(
            &format!("mlbench results store (experiment {experiment})"),
            organization,
        ),
        "eval_library": eval_library(&text(&cell["code_version"])),
        "model_info": {
            "name": if c["method"] == "base" { model.clone() } else {
                format!("{model} + {} LoRA adapter (K = {}, seed {})", text(&c["method"]), details["k"].as_str().unwrap_or_default(), text(&c["seed"]))
            },
            "id": id,
            "inference_engine": {"name": "mlbench", "version": env!("CARGO_PKG_VERSION")},
            "additional_details": details,
        },
        "evaluation_results": rows.iter().map(|r| result_entry(r, &eval["shots"], Some(&spec))).collect::<Vec<_>>(),
    })
}

/// The instance lines of cell `key` from the store's sample rows `df` (read from `path`), in
/// row order; `record` is the cell's aggregate.
fn instances(df: &DataFrame, key: &str, record: &Value, path: &Path) -> Result<Vec<Value>> {
    let bad = |e: PolarsError| Error::Invalid(format!("{}: {e}", path.display()));
    let col = |c: &str| strings(df, c, path);
    let (keys, task, lang, id, sha) = (
        col("key")?,
        col("task")?,
        col("lang")?,
        col("id")?,
        col("prompt_sha")?,
    );
    let opt = |c: &str| -> Result<Vec<Option<String>>> {
        Ok(df
            .column(c)
            .map_err(bad)?
            .str()
            .map_err(bad)?
            .iter()
            .map(|v| v.map(str::to_string))
            .collect())
    };
    let (generated, extracted, target) = (opt("generated")?, opt("extracted")?, opt("target")?);
    let int = |c: &str| -> Result<Vec<Option<i64>>> {
        Ok(df
            .column(c)
            .map_err(bad)?
            .i64()
            .map_err(bad)?
            .iter()
            .collect())
    };
    let (pred, gold) = (int("pred")?, int("gold")?);
    let correct: Vec<bool> = df
        .column("correct")
        .map_err(bad)?
        .bool()
        .map_err(bad)?
        .iter()
        .map(|v| v.unwrap_or(false))
        .collect();
    let mut lines = Vec::new();
    for i in (0..df.height()).filter(|&i| keys[i] == key) {
        // A multiple-choice row has a predicted choice; a generation row has its text.
        let (reference, output, answer, method) = match (pred[i], &generated[i]) {
            (Some(p), _) => (
                gold[i].map(|g| g.to_string()).unwrap_or_default(),
                p.to_string(),
                p.to_string(),
                "highest log-likelihood choice (its index)",
            ),
            (None, g) => (
                target[i].clone().unwrap_or_default(),
                g.clone().unwrap_or_default(),
                extracted[i].clone().unwrap_or_default(),
                "regex (the task's answer_regex, last match)",
            ),
        };
        let score = if correct[i] { 1.0 } else { 0.0 };
        lines.push(json!({
            "schema_version": INSTANCE_SCHEMA,
            "evaluation_id": record["evaluation_id"],
            "model_id": record["model_info"]["id"],
            "evaluation_name": format!("{}_{}", task[i], lang[i]),
            "sample_id": id[i],
            "sample_hash": sha[i],
            "interaction_type": "single_turn",
            "input": {"raw": "", "formatted": "", "reference": [reference], "choices": Value::Null},
            "output": {"raw": [output]},
            "answer_attribution": [{
                "turn_idx": 0, "source": "output.raw", "extracted_value": answer,
                "extraction_method": method, "is_terminal": true,
            }],
            "evaluation": {"score": score, "is_correct": correct[i]},
            "metadata": {"source": "mlbench results store samples.parquet (prompt kept as its hash only)"},
        }));
    }
    Ok(lines)
}
