//! An evaluation in lm-evaluation-harness's shapes, for tools written against the harness.
//!
//! In: an evaluation's [`EvalPlan`] and [`EvalReport`] (records and metric rows), plus its
//! items, rendered again from the same configuration (cheap, and identical: prompts depend only
//! on the data, the task specs and the seed). Out, under `OUT/lm-eval/<variant>/`:
//! - `results.json`: `results` keyed by `<task>_<lang>` (`"acc,none"`, `"acc_stderr,none"`, ...
//!   for every metric of the task) and by `<task>` for the micro average over its languages,
//!   which is also under `groups`; `group_subtasks`, `configs`, `versions`, `n-shot`,
//!   `higher_is_better`, `n-samples`, `config` (model, `model_args`, batch size, device,
//!   limit, seeds), `git_hash`, `date` (Unix seconds at the start) and
//!   `total_evaluation_time_seconds` (a string, as the harness writes it);
//! - with `log_samples`, `samples_<task>_<lang>.jsonl`: one line per example with `doc_id`
//!   (its position in the task-language's examples), `doc` (what mlbench scored: id, language,
//!   prompt, choices, gold), `target`, `arguments` (one `[context, continuation]` pair per
//!   choice; for generation `[prompt, {"until": ..., "max_gen_toks": ...}]`), `resps` and
//!   `filtered_resps` (`[log-likelihood, is_greedy]` per choice, with `is_greedy` null because
//!   mlbench does not compute it for choices; for generation the text and the extracted
//!   answer), `filter` (`none`), `metrics` (names), each metric's 0/1 value, and `doc_hash`,
//!   `prompt_hash`, `target_hash` (sha256 of the pretty JSON doc, the first context, the target).
//!
//! Every file is written atomically.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use super::run::{prepare_items, EvalReport, Item, MetricRow, Record};
use crate::error::Result;
use crate::plan::{EvalConfig, EvalPlan};
use crate::tasks::{Scoring, TaskSpec};
use crate::util::{sha256_hex, write_bytes_atomic};

/// The harness's name for the "no filter" pipeline, part of every metric key.
const FILTER: &str = "none";

/// An example's place in its task-language (`doc_id`) and its rendered item.
type Docs<'a> = BTreeMap<(String, String, String), (usize, &'a Item)>;

/// Writes the lm-eval-shaped files of `report` under `out/lm-eval/` (see the module doc) and
/// returns their paths.
pub fn write(
    plan: &EvalPlan,
    out: &Path,
    report: &EvalReport,
    started_unix: f64,
    log_samples: bool,
) -> Result<Vec<PathBuf>> {
    let cfg = &plan.config;
    let (items, specs) = prepare_items(plan)?;
    let docs = index_docs(&items);
    let mut written = Vec::new();
    for variant in variants(&report.records) {
        let dir = out.join("lm-eval").join(&variant);
        std::fs::create_dir_all(&dir)
            .map_err(|e| crate::error::Error::io("create directory", &dir, e))?;
        let rows: Vec<&MetricRow> = report
            .metrics
            .iter()
            .filter(|r| r.variant == variant)
            .collect();
        let results = results_file(cfg, &specs, &rows, &variant, report, started_unix);
        let path = dir.join("results.json");
        write_bytes_atomic(&path, &serde_json::to_vec_pretty(&results)?)?;
        written.push(path);
        if log_samples {
            written.extend(write_samples(&dir, &variant, report, &docs, &specs)?);
        }
    }
    Ok(written)
}

/// Variant names in the order the records list them.
fn variants(records: &[Record]) -> Vec<String> {
    unique(records.iter().map(|r| r.variant.as_str()))
        .into_iter()
        .map(str::to_string)
        .collect()
}

/// Items keyed by (task, language, id), numbered within their task-language.
fn index_docs(items: &[Item]) -> Docs<'_> {
    let mut next: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut docs = Docs::new();
    for it in items {
        let n = next
            .entry((it.task.clone(), it.lang_code.clone()))
            .or_insert(0);
        docs.insert(
            (it.task.clone(), it.lang_code.clone(), it.id.clone()),
            (*n, it),
        );
        *n += 1;
    }
    docs
}

/// The harness's task name of one task-language.
fn subtask(task: &str, lang: &str) -> String {
    format!("{task}_{lang}")
}

/// `{"alias": name, "<metric>,none": value, "<metric>_stderr,none": stderr, ...}`.
fn metric_entry(name: &str, rows: &[&&MetricRow]) -> Value {
    let mut m = Map::new();
    m.insert("alias".into(), json!(name));
    for r in rows {
        m.insert(format!("{},{FILTER}", r.metric), json!(r.value));
        m.insert(format!("{}_stderr,{FILTER}", r.metric), json!(r.stderr));
    }
    Value::Object(m)
}

/// One variant's `results.json` (see the module doc).
fn results_file(
    cfg: &EvalConfig,
    specs: &BTreeMap<String, TaskSpec>,
    rows: &[&MetricRow],
    variant: &str,
    report: &EvalReport,
    started_unix: f64,
) -> Value {
    let mut results = Map::new();
    let mut groups = Map::new();
    let mut subtasks = Map::new();
    let mut configs = Map::new();
    let mut versions = Map::new();
    let mut n_shot = Map::new();
    let mut higher = Map::new();
    let mut n_samples = Map::new();
    for (task, spec) in specs {
        let langs: Vec<&str> = unique(
            rows.iter()
                .filter(|r| &r.task == task)
                .map(|r| r.lang.as_str()),
        )
        .into_iter()
        .filter(|l| *l != "micro" && *l != "macro")
        .collect();
        let directions: Map<String, Value> = spec
            .metrics
            .iter()
            .map(|m| (m.name.clone(), json!(m.higher_is_better)))
            .collect();
        for lang in &langs {
            let name = subtask(task, lang);
            let mine: Vec<&&MetricRow> = rows
                .iter()
                .filter(|r| &r.task == task && r.lang == *lang)
                .collect();
            let n = mine.first().map_or(0, |r| r.n);
            results.insert(name.clone(), metric_entry(&name, &mine));
            configs.insert(name.clone(), task_config(&name, spec, cfg));
            versions.insert(name.clone(), json!(spec.version));
            n_shot.insert(name.clone(), json!(cfg.shots));
            higher.insert(name.clone(), Value::Object(directions.clone()));
            n_samples.insert(name, json!({"original": n, "effective": n}));
        }
        let micro: Vec<&&MetricRow> = rows
            .iter()
            .filter(|r| &r.task == task && r.lang == "micro")
            .collect();
        let entry = metric_entry(task, &micro);
        results.insert(task.clone(), entry.clone());
        groups.insert(task.clone(), entry);
        subtasks.insert(
            task.clone(),
            json!(langs.iter().map(|l| subtask(task, l)).collect::<Vec<_>>()),
        );
        versions.insert(task.clone(), json!(spec.version));
        higher.insert(task.clone(), Value::Object(directions));
    }
    json!({
        "results": results,
        "groups": groups,
        "group_subtasks": subtasks,
        "configs": configs,
        "versions": versions,
        "n-shot": n_shot,
        "higher_is_better": higher,
        "n-samples": n_samples,
        "config": run_config(cfg, variant, report.batch_size),
        "git_hash": env!("MLBENCH_GIT_COMMIT"),
        "date": started_unix,
        "total_evaluation_time_seconds": report.seconds.to_string(),
        "mlbench": {"code_version": crate::util::code_version(), "variant": variant},
    })
}

/// Distinct values in first-seen order.
fn unique<'a>(it: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut v: Vec<&str> = Vec::new();
    for x in it {
        if !v.contains(&x) {
            v.push(x);
        }
    }
    v
}

/// The `configs` entry of one task-language: what the harness records about a task.
fn task_config(name: &str, spec: &TaskSpec, cfg: &EvalConfig) -> Value {
    let split = cfg.split.clone().unwrap_or_else(|| spec.eval_split.clone());
    let dataset = spec.dataset.clone().unwrap_or_else(|| spec.name.clone());
    json!({
        "task": name,
        "tag": [spec.name],
        "dataset_path": format!("{dataset}.parquet"),
        "test_split": split,
        "fewshot_split": spec.fewshot_split,
        "output_type": match spec.scoring {
            Scoring::MultipleChoice => "multiple_choice",
            Scoring::Generate => "generate_until",
        },
        "doc_to_text": spec.prompt.template,
        "num_fewshot": cfg.shots,
        "metric_list": spec.metrics.iter().map(|m| json!({
            "metric": m.name, "aggregation": "mean", "higher_is_better": m.higher_is_better,
        })).collect::<Vec<_>>(),
        "generation_kwargs": spec.generation.as_ref().map(|g| json!({
            "until": g.until, "max_gen_toks": g.max_tokens, "do_sample": false,
        })),
        "metadata": {"version": spec.version},
    })
}

/// The `config` block: the model as the harness's `hf` backend would name it, and the run
/// (`batch_sizes`: the size `auto` chose, as the harness lists it).
fn run_config(cfg: &EvalConfig, variant: &str, chosen: usize) -> Value {
    let mut model_args = format!("pretrained={},dtype={}", cfg.model, cfg.dtype);
    if let Some(path) = adapter_path(cfg, variant) {
        model_args.push_str(&format!(",peft={path}"));
    }
    json!({
        "model": "mlbench",
        "model_args": model_args,
        "batch_size": cfg.batch_size,
        "batch_sizes": if cfg.batch_size.fixed().is_some() { vec![] } else { vec![chosen] },
        "device": cfg.device,
        "use_cache": null,
        "limit": cfg.limit,
        "bootstrap_iters": null,
        "gen_kwargs": null,
        "random_seed": cfg.seed,
        "numpy_seed": null,
        "torch_seed": null,
        "fewshot_seed": cfg.seed,
    })
}

/// The adapter folder a variant came from, when `--adapters` named it (`NAME=PATH`) or it is
/// named after its folder.
fn adapter_path(cfg: &EvalConfig, variant: &str) -> Option<String> {
    cfg.adapters.iter().find_map(|a| match a.split_once('=') {
        Some((name, path)) if name == variant => Some(path.to_string()),
        None if Path::new(a).file_name().is_some_and(|f| f == variant) => Some(a.clone()),
        _ => None,
    })
}

/// One variant's sample logs, one file per task-language; returns their paths.
fn write_samples(
    dir: &Path,
    variant: &str,
    report: &EvalReport,
    docs: &Docs,
    specs: &BTreeMap<String, TaskSpec>,
) -> Result<Vec<PathBuf>> {
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for r in report.records.iter().filter(|r| r.variant == variant) {
        let key = (r.task.clone(), r.lang.clone(), r.id.clone());
        let Some(&(doc_id, item)) = docs.get(&key) else {
            return Err(crate::error::Error::Internal(format!(
                "record {}/{}/{} has no rendered item",
                r.task, r.lang, r.id
            )));
        };
        let line = sample_line(doc_id, item, r, specs.get(&r.task))?;
        let buf = files.entry(subtask(&r.task, &r.lang)).or_default();
        serde_json::to_writer(&mut *buf, &line)?;
        buf.push(b'\n');
    }
    let mut written = Vec::new();
    for (name, bytes) in files {
        let path = dir.join(format!("samples_{name}.jsonl"));
        write_bytes_atomic(&path, &bytes)?;
        written.push(path);
    }
    Ok(written)
}

/// One line of a sample log (see the module doc).
fn sample_line(doc_id: usize, item: &Item, r: &Record, spec: Option<&TaskSpec>) -> Result<Value> {
    let doc = json!({
        "id": item.id, "task": item.task, "lang": item.lang_code, "prompt": item.prompt,
        "choices": item.rendered.choices, "gold": item.rendered.gold, "target": item.target,
    });
    let (target, arguments, resps, filtered) = match &r.logprobs {
        Some(lps) => {
            let args: Vec<Value> = item
                .rendered
                .choices
                .iter()
                .map(|c| json!([item.prompt, c]))
                .collect();
            let resps: Vec<Value> = lps.iter().map(|lp| json!([[lp, null]])).collect();
            let filtered: Vec<Value> = lps.iter().map(|lp| json!([lp, null])).collect();
            (json!(r.gold), args, resps, filtered)
        }
        None => {
            let gen = spec.and_then(|s| s.generation.as_ref());
            let kwargs = json!({
                "until": gen.map(|g| g.until.clone()),
                "max_gen_toks": gen.map(|g| g.max_tokens),
                "do_sample": false,
            });
            (
                json!(r.target),
                vec![json!([item.prompt, kwargs])],
                vec![json!([r.generated])],
                vec![json!(r.extracted)],
            )
        }
    };
    let first_context = arguments
        .first()
        .and_then(|a| a.get(0))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let target_text = match &target {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut line = json!({
        "doc_id": doc_id,
        "doc": doc,
        "target": target,
        "arguments": arguments,
        "resps": resps,
        "filtered_resps": filtered,
        "filter": FILTER,
        "metrics": r.outcomes.keys().collect::<Vec<_>>(),
        "doc_hash": sha256_hex(serde_json::to_string_pretty(&doc)?.as_bytes()),
        "prompt_hash": sha256_hex(first_context.as_bytes()),
        "target_hash": sha256_hex(target_text.as_bytes()),
    });
    let obj = line.as_object_mut().expect("a JSON object");
    for (metric, ok) in &r.outcomes {
        obj.insert(metric.clone(), json!(if *ok { 1.0 } else { 0.0 }));
    }
    Ok(line)
}
