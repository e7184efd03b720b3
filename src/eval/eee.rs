//! An evaluation folder in the Every Eval Ever schema (EvalEval's shared format, v0.2.1).
//!
//! In: a folder `mlbench eval` wrote: `results.json` (configuration, model and adapter
//! identity), `metrics.parquet` (value, standard error and 95% interval per variant x task x
//! language x metric, plus `micro` and `macro`) and, when it ran with `--log-samples`, the
//! sample logs under `lm-eval/<variant>/`. Out, per variant (the base model or an adapter):
//! - `<variant>.json`, the aggregate record: `schema_version`, `evaluation_id`
//!   (`<tasks>/<model>/<retrieved timestamp>`), `retrieved_timestamp`, `source_metadata` (an
//!   evaluation run, the organization given), `eval_library` (mlbench and its code version),
//!   `model_info` (the model as given, adapters and weights' hashes as details), and one
//!   `evaluation_results` entry per task-language (and micro/macro average) and metric, named
//!   `<task>_<lang>` with the metric in `metric_config.additional_details.metric`; scores are
//!   proportions in [0, 1] with the standard error (n - 1) and the interval mlbench reports
//!   (Wilson for a language and the micro average, stratified bootstrap for the macro);
//! - `<variant>.instances.jsonl` (only from sample logs): one single-turn instance per example
//!   (`input.raw` the prompt, `input.choices`, `input.reference` the gold choice or target,
//!   `output.raw` the predicted choice or the generated text, how the answer was taken, and the
//!   task's first metric as `evaluation.score` / `is_correct`), linked by `evaluation_id` and
//!   listed with its sha256 under `detailed_evaluation_results`.
//!
//! Values the schema wants as strings (every `additional_details`) are strings. Files are
//! written atomically; nothing in the evaluation folder changes. A results store's cells are
//! exported by [`crate::runner::eee_store`], one aggregate per finished cell, with this
//! module's pieces.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use polars::prelude::*;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::util::{sha256_hex, write_bytes_atomic};

/// The schema versions written.
pub const SCHEMA: &str = "0.2.1";
pub(crate) const INSTANCE_SCHEMA: &str = "instance_level_eval_0.2.1";

/// One metric row of `metrics.parquet`.
pub(crate) struct Row {
    pub variant: String,
    pub task: String,
    pub lang: String,
    pub metric: String,
    pub higher_is_better: bool,
    pub n: u64,
    pub value: f64,
    pub stderr: f64,
    pub ci: (f64, f64),
}

/// Writes the Every Eval Ever files of the evaluation in `eval_dir` into `out` (see the module
/// doc); `organization` names who ran it. Returns the files written.
pub fn export(eval_dir: &Path, out: &Path, organization: &str) -> Result<Vec<PathBuf>> {
    let results = read_json(&eval_dir.join("results.json"))?;
    if results["kind"] != "mlbench-eval" {
        return Err(Error::Invalid(format!(
            "{} is not the results file of `mlbench eval`",
            eval_dir.join("results.json").display()
        )));
    }
    let rows = read_metrics(&eval_dir.join("metrics.parquet"))?;
    std::fs::create_dir_all(out).map_err(|e| Error::io("create directory", out, e))?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        .to_string();
    let mut written = Vec::new();
    for variant in results["variants"].as_array().into_iter().flatten() {
        let name = variant["name"].as_str().unwrap_or_default().to_string();
        let mine: Vec<&Row> = rows.iter().filter(|r| r.variant == name).collect();
        let mut record = aggregate(&results, variant, &mine, organization, &stamp);
        let id = record["evaluation_id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let logs = eval_dir.join("lm-eval").join(&name);
        if let Some(lines) = instances(&logs, &id, &record["model_info"]["id"])? {
            written.push(write_instances(out, &name, &lines, &mut record)?);
        }
        written.push(write_record(out, &name, &record)?);
    }
    Ok(written)
}

/// Writes `<name>.instances.jsonl` of `lines` into `out` and lists it, with its sha256, under
/// the aggregate `record`'s `detailed_evaluation_results`; returns the file's path.
pub(crate) fn write_instances(
    out: &Path,
    name: &str,
    lines: &[Value],
    record: &mut Value,
) -> Result<PathBuf> {
    let file = format!("{}.instances.jsonl", safe(name));
    let mut bytes = Vec::new();
    for l in lines {
        bytes.extend(serde_json::to_vec(l)?);
        bytes.push(b'\n');
    }
    record["detailed_evaluation_results"] = json!({
        "format": "jsonl", "file_path": file, "hash_algorithm": "sha256",
        "checksum": sha256_hex(&bytes), "total_rows": lines.len(),
    });
    write_bytes_atomic(&out.join(&file), &bytes)?;
    Ok(out.join(file))
}

/// Writes the aggregate `record` as `<name>.json` into `out`; returns the file's path.
pub(crate) fn write_record(out: &Path, name: &str, record: &Value) -> Result<PathBuf> {
    let path = out.join(format!("{}.json", safe(name)));
    write_bytes_atomic(&path, &serde_json::to_vec_pretty(record)?)?;
    Ok(path)
}

/// A file name from a variant name.
fn safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let bytes =
        std::fs::read(path).map_err(|e| Error::missing_or_io("results file", "read", path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))
}

/// The rows of a `metrics.parquet` file.
fn read_metrics(path: &Path) -> Result<Vec<Row>> {
    rows_of(&crate::data::schema::read_parquet(path)?, path)
}

/// The metric rows of a frame in the `metrics.parquet` layout read from `path`.
pub(crate) fn rows_of(df: &DataFrame, path: &Path) -> Result<Vec<Row>> {
    let bad = |e: PolarsError| Error::Invalid(format!("{}: {e}", path.display()));
    let s = |c: &str| -> Result<StringChunked> {
        Ok(df.column(c).map_err(bad)?.str().map_err(bad)?.clone())
    };
    let f = |c: &str| -> Result<Float64Chunked> {
        Ok(df.column(c).map_err(bad)?.f64().map_err(bad)?.clone())
    };
    let (variant, task, lang, metric) = (s("variant")?, s("task")?, s("lang")?, s("metric")?);
    let (value, stderr, lo, hi) = (f("value")?, f("stderr")?, f("ci_low")?, f("ci_high")?);
    let hib = df
        .column("higher_is_better")
        .map_err(bad)?
        .bool()
        .map_err(bad)?
        .clone();
    let n = df.column("n").map_err(bad)?.u64().map_err(bad)?.clone();
    let missing =
        |c: &str, i: usize| Error::Invalid(format!("{}: row {i} has no `{c}`", path.display()));
    (0..df.height())
        .map(|i| {
            Ok(Row {
                variant: variant
                    .get(i)
                    .ok_or_else(|| missing("variant", i))?
                    .to_string(),
                task: task.get(i).ok_or_else(|| missing("task", i))?.to_string(),
                lang: lang.get(i).ok_or_else(|| missing("lang", i))?.to_string(),
                metric: metric
                    .get(i)
                    .ok_or_else(|| missing("metric", i))?
                    .to_string(),
                higher_is_better: hib.get(i).ok_or_else(|| missing("higher_is_better", i))?,
                n: n.get(i).ok_or_else(|| missing("n", i))?,
                value: value.get(i).ok_or_else(|| missing("value", i))?,
                stderr: stderr.get(i).ok_or_else(|| missing("stderr", i))?,
                ci: (
                    lo.get(i).ok_or_else(|| missing("ci_low", i))?,
                    hi.get(i).ok_or_else(|| missing("ci_high", i))?,
                ),
            })
        })
        .collect()
}

/// The aggregate record of one variant.
fn aggregate(
    results: &Value,
    variant: &Value,
    rows: &[&Row],
    organization: &str,
    stamp: &str,
) -> Value {
    let cfg = &results["config"];
    let model = cfg["model"].as_str().unwrap_or_default();
    let name = variant["name"].as_str().unwrap_or_default();
    let tasks: Vec<&str> = results["tasks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["name"].as_str())
        .collect();
    let mut details = BTreeMap::from([
        ("variant".to_string(), name.to_string()),
        (
            "dtype".to_string(),
            cfg["dtype"].as_str().unwrap_or_default().to_string(),
        ),
        (
            "config_sha256".to_string(),
            results["model"]["config_sha256"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        ),
    ]);
    if let Some(src) = variant["source"].as_object() {
        for (k, v) in src {
            details.insert(
                format!("adapter_{k}"),
                v.as_str().unwrap_or_default().to_string(),
            );
        }
    }
    json!({
        "schema_version": SCHEMA,
        "evaluation_id": format!("mlbench-{}/{}/{stamp}", tasks.join("+"), model_id(model, name)),
        "retrieved_timestamp": stamp,
        "source_metadata": source_metadata("mlbench", organization),
        "eval_library": eval_library(results["code_version"].as_str().unwrap_or_default()),
        "model_info": {
            "name": if name == "base" { model.to_string() } else { format!("{model} + LoRA adapter {name}") },
            "id": model_id(model, name),
            "inference_engine": {"name": "mlbench", "version": env!("CARGO_PKG_VERSION")},
            "additional_details": details,
        },
        "evaluation_results": rows.iter().map(|r| result_entry(r, &cfg["shots"], task_spec(results, &r.task))).collect::<Vec<_>>(),
    })
}

/// The record's `source_metadata`: who ran the evaluation and where it comes from.
pub(crate) fn source_metadata(source_name: &str, organization: &str) -> Value {
    json!({
        "source_name": source_name,
        "source_type": "evaluation_run",
        "source_organization_name": organization,
        "evaluator_relationship": "third_party",
    })
}

/// The record's `eval_library`: mlbench, its version and the code version that scored.
pub(crate) fn eval_library(code_version: &str) -> Value {
    json!({
        "name": "mlbench",
        "version": env!("CARGO_PKG_VERSION"),
        "additional_details": {"code_version": code_version},
    })
}

/// The model's id as given (a Hub id or a folder's name), with the adapter after a `+`.
pub(crate) fn model_id(model: &str, variant: &str) -> String {
    let base = if Path::new(model).is_dir() {
        Path::new(model)
            .file_name()
            .map_or(model.to_string(), |f| f.to_string_lossy().into_owned())
    } else {
        model.to_string()
    };
    if variant == "base" {
        base
    } else {
        format!("{base}+{variant}")
    }
}

/// The task entry named `task` of a results file.
fn task_spec<'a>(results: &'a Value, task: &str) -> Option<&'a Value> {
    results["tasks"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|t| t["name"] == task)
}

/// One `evaluation_results` entry, for an evaluation with `shots` few-shot examples of a task
/// described by `spec` (its `split` and, where known, `version`).
pub(crate) fn result_entry(r: &Row, shots: &Value, spec: Option<&Value>) -> Value {
    let split = spec.and_then(|t| t["split"].as_str()).unwrap_or_default();
    let version = spec
        .and_then(|t| t.get("version"))
        .map(Value::to_string)
        .unwrap_or_default();
    let interval = if r.lang == "macro" {
        "stratified percentile bootstrap"
    } else {
        "wilson"
    };
    json!({
        "evaluation_name": format!("{}_{}", r.task, r.lang),
        "source_data": {
            "dataset_name": r.task,
            "source_type": "other",
            "additional_details": {
                "split": split, "language": r.lang, "version": version,
            },
        },
        "metric_config": {
            "evaluation_description": format!("{} on the {} split of {} ({})", r.metric, split, r.task, r.lang),
            "lower_is_better": !r.higher_is_better,
            "score_type": "continuous",
            "min_score": 0.0,
            "max_score": 1.0,
            "additional_details": {"metric": r.metric, "num_fewshot": shots.to_string()},
        },
        "score_details": {
            "score": r.value,
            "uncertainty": {
                "standard_error": {"value": r.stderr, "method": "analytic"},
                "confidence_interval": {"lower": r.ci.0, "upper": r.ci.1, "confidence_level": 0.95, "method": interval},
                "num_samples": r.n,
            },
        },
    })
}

/// Instance lines from the variant's sample logs, or `None` when it has none.
fn instances(logs: &Path, evaluation_id: &str, model: &Value) -> Result<Option<Vec<Value>>> {
    let Ok(dir) = std::fs::read_dir(logs) else {
        return Ok(None);
    };
    let mut files: Vec<PathBuf> = dir
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|f| f.to_str())
                .is_some_and(|f| f.starts_with("samples_") && f.ends_with(".jsonl"))
        })
        .collect();
    if files.is_empty() {
        return Ok(None);
    }
    files.sort();
    let mut lines = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).map_err(|e| Error::io("read", &f, e))?;
        for (i, line) in text.lines().enumerate() {
            let s: Value = serde_json::from_str(line)
                .map_err(|e| Error::Invalid(format!("{} line {}: {e}", f.display(), i + 1)))?;
            lines.push(instance(&s, evaluation_id, model));
        }
    }
    Ok(Some(lines))
}

/// One instance line from one lm-eval-shaped sample.
fn instance(s: &Value, evaluation_id: &str, model: &Value) -> Value {
    let doc = &s["doc"];
    let task = doc["task"].as_str().unwrap_or_default();
    let prompt = doc["prompt"].as_str().unwrap_or_default();
    let choices: Vec<String> = doc["choices"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c.as_str().map(str::to_string))
        .collect();
    let multiple_choice = !choices.is_empty();
    let (reference, output, extracted, method) = if multiple_choice {
        let lls: Vec<f64> = s["filtered_resps"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| r[0].as_f64().unwrap_or(f64::NEG_INFINITY))
            .collect();
        let pred = super::metrics::argmax(&lls).unwrap_or(0);
        let gold = doc["gold"].as_u64().map_or(String::new(), |g| {
            choices.get(g as usize).cloned().unwrap_or_default()
        });
        let picked = choices.get(pred).cloned().unwrap_or_default();
        (
            gold,
            picked.clone(),
            picked,
            "highest log-likelihood choice",
        )
    } else {
        (
            s["target"].as_str().unwrap_or_default().to_string(),
            s["resps"][0][0].as_str().unwrap_or_default().to_string(),
            s["filtered_resps"][0]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            "regex (the task's answer_regex, last match)",
        )
    };
    // The first metric in the sample's list, as `samples.parquet`'s `correct` column.
    let first_metric = s["metrics"][0].as_str().unwrap_or("acc");
    let score = s[first_metric].as_f64().unwrap_or(0.0);
    json!({
        "schema_version": INSTANCE_SCHEMA,
        "evaluation_id": evaluation_id,
        "model_id": model,
        "evaluation_name": format!("{task}_{}", doc["lang"].as_str().unwrap_or_default()),
        "sample_id": doc["id"],
        "sample_hash": sha256_hex(format!("{prompt}{reference}").as_bytes()),
        "interaction_type": "single_turn",
        "input": {"raw": prompt, "formatted": prompt, "reference": [reference], "choices": if multiple_choice { json!(choices) } else { Value::Null }},
        "output": {"raw": [output]},
        "answer_attribution": [{
            "turn_idx": 0, "source": "output.raw", "extracted_value": extracted,
            "extraction_method": method, "is_terminal": true,
        }],
        "evaluation": {"score": score, "is_correct": score > 0.5},
        "metadata": {"metric": first_metric, "doc_id": s["doc_id"].to_string()},
    })
}
