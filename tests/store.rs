//! The results store without a model: synthetic cells (known per-example outcomes) written
//! through `Store::commit_as`, then `mlbench merge` (shards' stores brought together and
//! compacted: same comparison before and after, idempotent, duplicates left by an interrupted
//! merge read once), the `compare` output against committed snapshots (text, Markdown, CSV,
//! LaTeX; no times or paths in them), newest-result-per-cell and `--run`, and
//! `mlbench report --history`.
//!
//! `UPDATE_SNAPSHOTS=1 cargo test --test store` rewrites `tests/snapshots/`.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use mlbench::eval::run::{metrics_frame, samples_frame, summarize, Record};
use mlbench::plan::grid::Cell;
use mlbench::plan::EvalConfig;
use mlbench::runner::store::Store;
use mlbench::tasks::TaskSpec;

const LANGS: [&str; 2] = ["eng_Latn", "swh_Latn"];
const N: usize = 60;

/// Accuracy (percent) a synthetic cell is drawn around, per language.
fn target(method: &str, k: Option<usize>, lang: &str) -> u64 {
    let base = match (method, k) {
        ("base", _) => 35,
        ("lora-full", _) => 80,
        ("lora-k", Some(16)) => 50,
        ("lora-k", _) => 62,
        ("meta-lora", Some(16)) => 66,
        ("meta-lora", _) => 76,
        _ => 50,
    };
    if lang == "swh_Latn" {
        base - 10
    } else {
        base
    }
}

fn specs(dir: &Path) -> BTreeMap<String, TaskSpec> {
    let p = dir.join("toy.toml");
    std::fs::write(&p, TOY_SPEC).unwrap();
    BTreeMap::from([("toy".to_string(), TaskSpec::load(&p).unwrap())])
}

/// Commits one synthetic cell: example `i` is correct when a hash of the cell and `i` falls
/// under the target accuracy plus `shift` points.
#[allow(clippy::too_many_arguments)]
fn commit(
    store: &Store,
    specs: &BTreeMap<String, TaskSpec>,
    method: &str,
    k: Option<usize>,
    seed: u64,
    version: &str,
    finished: u64,
    shift: i64,
) {
    let mut records = Vec::new();
    for lang in LANGS {
        let p = target(method, k, lang) as i64 + shift;
        for i in 0..N {
            let h = mlbench::util::fnv1a64(format!("{method}/{k:?}/{seed}/{lang}/{i}").as_bytes());
            let correct = ((h % 100) as i64) < p;
            records.push(Record {
                variant: method.to_string(),
                task: "toy".into(),
                lang: lang.into(),
                id: format!("t{i}"),
                prompt_sha: String::new(),
                logprobs: None,
                pred: Some(i64::from(!correct)),
                pred_norm: None,
                pred_bytes: None,
                gold: Some(0),
                generated: None,
                extracted: None,
                target: None,
                outcomes: BTreeMap::from([("acc".to_string(), correct)]),
            });
        }
    }
    let metrics = summarize(&records, specs, seed);
    let key = format!(
        "{:016x}",
        mlbench::util::fnv1a64(format!("{method}/{k:?}/{seed}/{version}").as_bytes())
    );
    let cell = Cell {
        experiment: "syn".into(),
        method: mlbench::plan::Method::parse(method).unwrap(),
        k,
        seed,
        train: None,
        eval: EvalConfig::default(),
        key,
        candidate: None,
    };
    store
        .commit_as(
            &cell,
            metrics_frame(&metrics).unwrap(),
            samples_frame(&records).unwrap(),
            serde_json::json!({}),
            version,
            finished,
        )
        .unwrap();
}

/// The grid of one seed at one code version.
fn grid(store: &Store, specs: &BTreeMap<String, TaskSpec>, seed: u64, version: &str, t: u64) {
    for (m, k) in [
        ("base", None),
        ("lora-full", None),
        ("lora-k", Some(16)),
        ("lora-k", Some(64)),
        ("meta-lora", Some(16)),
        ("meta-lora", Some(64)),
    ] {
        if m == "base" && seed > 0 {
            continue;
        }
        commit(store, specs, m, k, seed, version, t, 0);
    }
}

fn compare(store: &Path, extra: &[&str]) -> String {
    let mut a = vec![
        "compare",
        "--store",
        store.to_str().unwrap(),
        "--experiment",
        "syn",
        "--baseline",
        "lora-full",
    ];
    a.extend_from_slice(extra);
    let o = mlbench(&a);
    assert!(o.status.success(), "{}", stderr(&o));
    stdout(&o)
}

fn snapshot(name: &str, got: &str) {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/snapshots")
        .join(name);
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&p)
        .unwrap_or_else(|_| panic!("no snapshot {} (UPDATE_SNAPSHOTS=1 writes it)", p.display()));
    assert_eq!(
        got, want,
        "{name} differs from its snapshot (UPDATE_SNAPSHOTS=1 rewrites it)"
    );
}

/// Parquet files under `dir` (relative paths, sorted).
fn parquet_files(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, d: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    let mut v = Vec::new();
    walk(dir, dir, &mut v);
    v.sort();
    v
}

#[test]
fn shards_merge_into_one_compacted_store_that_compares_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    let specs = specs(tmp.path());
    // Two array jobs that wrote to their own disks, and the same grid written in one place.
    let (a, b, one) = (
        Store::new(tmp.path().join("shard-a")),
        Store::new(tmp.path().join("shard-b")),
        Store::new(tmp.path().join("one")),
    );
    grid(&a, &specs, 0, "v1", 1_000);
    grid(&b, &specs, 1, "v1", 1_001);
    grid(&one, &specs, 0, "v1", 1_000);
    grid(&one, &specs, 1, "v1", 1_001);
    let want = compare(&one.dir, &["--langs", "en,sw"]);

    let merged = tmp.path().join("merged");
    let o = mlbench(&[
        "merge",
        "--store",
        merged.to_str().unwrap(),
        "--from",
        a.dir.to_str().unwrap(),
        "--from",
        b.dir.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("11 cells (11 brought in, 11 compacted"),
        "{}",
        stdout(&o)
    );
    let files = parquet_files(&merged);
    assert_eq!(
        files.len(),
        2,
        "one part per file, no per-cell files left: {files:?}"
    );
    assert!(files.iter().all(|f| f.starts_with("parts/")), "{files:?}");
    let store = Store::new(&merged);
    assert_eq!(store.finished().len(), 11, "cell.json markers stay");
    let got = compare(&merged, &["--langs", "en,sw"]);
    assert_eq!(
        got, want,
        "the merged store compares like the one-place store"
    );

    // Idempotent: a second merge leaves the same rows.
    let rows = store.read("samples.parquet").unwrap().height();
    assert_eq!(rows, 11 * 2 * N);
    let o = mlbench(&["merge", "--store", merged.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(store.read("samples.parquet").unwrap().height(), rows);

    // A merge interrupted after writing its part but before removing what it absorbed leaves
    // rows in two places; readers still see each cell once.
    let part = merged.join(&files[1]);
    let older = part.with_file_name("samples-00000000000000000001-1.parquet");
    std::fs::copy(&part, &older).unwrap();
    let cell = store.finished()[0].clone();
    std::fs::copy(&part, store.cell_dir(&cell).join("samples.parquet")).unwrap();
    assert_eq!(store.read("samples.parquet").unwrap().height(), rows);
    assert_eq!(compare(&merged, &["--langs", "en,sw"]), want);

    // A new cell committed after the merge is read beside the part.
    commit(&store, &specs, "meta-lora", Some(32), 0, "v1", 1_002, 0);
    assert_eq!(
        store.read("samples.parquet").unwrap().height(),
        rows + 2 * N
    );

    // Not a store: a clear user error.
    let o = mlbench(&[
        "merge",
        "--store",
        merged.to_str().unwrap(),
        "--from",
        tmp.path().to_str().unwrap(),
    ]);
    assert_user_error(&o, &["is not a results store"]);
}

#[test]
fn compare_output_matches_its_snapshots() {
    let tmp = tempfile::tempdir().unwrap();
    let specs = specs(tmp.path());
    let store = Store::new(tmp.path().join("store"));
    grid(&store, &specs, 0, "v1", 1_000);
    grid(&store, &specs, 1, "v1", 1_001);
    let rep = tmp.path().join("rep");
    let text = compare(
        &store.dir,
        &["--langs", "en,sw", "--out", rep.to_str().unwrap(), "-q"],
    );
    assert!(!text.contains(tmp.path().to_str().unwrap()), "no paths");
    snapshot("compare.txt", &text);
    for f in ["table.md", "table.csv", "table.tex"] {
        snapshot(f, &std::fs::read_to_string(rep.join(f)).unwrap());
    }
}

#[test]
fn compare_shows_each_cells_newest_run_and_history_draws_every_run() {
    let tmp = tempfile::tempdir().unwrap();
    let specs = specs(tmp.path());
    let store = Store::new(tmp.path().join("store"));
    grid(
        &store,
        &specs,
        0,
        "mlbench 0.1.0 (git aaaaaaa1)",
        1_764_000_000,
    );
    // A later nightly reruns two cells; meta-lora K16 gets 20 points worse.
    commit(
        &store,
        &specs,
        "meta-lora",
        Some(16),
        0,
        "mlbench 0.1.0 (git bbbbbbb2)",
        1_764_086_400,
        -20,
    );
    commit(
        &store,
        &specs,
        "lora-full",
        None,
        0,
        "mlbench 0.1.0 (git bbbbbbb2)",
        1_764_086_400,
        0,
    );
    let row = |out: &str, m: &str, k: &str| -> String {
        out.lines()
            .find(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                w.len() > 2 && w[0] == m && w[1] == k
            })
            .unwrap_or_else(|| panic!("no row {m} {k} in\n{out}"))
            .to_string()
    };
    let newest = compare(&store.dir, &["--langs", "en"]);
    let old = compare(
        &store.dir,
        &["--langs", "en", "--run", "mlbench 0.1.0 (git aaaaaaa1)"],
    );
    let acc = |l: &str| -> f64 { l.split_whitespace().nth(2).unwrap().parse().unwrap() };
    let (n, o) = (
        acc(&row(&newest, "meta-lora", "16")),
        acc(&row(&old, "meta-lora", "16")),
    );
    assert!(o - n > 10.0, "newest {n} vs old {o}");
    // Cells the later run did not redo keep their only result; the base row shows K = 0.
    assert_eq!(row(&newest, "lora-k", "64"), row(&old, "lora-k", "64"));
    assert!(row(&newest, "base", "0").starts_with("base"));
    // The only rows of the later run: lora-full and meta-lora K16.
    let later = compare(
        &store.dir,
        &["--langs", "en", "--run", "mlbench 0.1.0 (git bbbbbbb2)"],
    );
    assert_eq!(
        later.lines().filter(|l| l.starts_with("meta-lora")).count(),
        1
    );
    assert!(!later.contains("lora-k "), "{later}");
    let o = mlbench(&[
        "compare",
        "--store",
        store.dir.to_str().unwrap(),
        "--run",
        "nope",
    ]);
    assert_user_error(&o, &["unknown run `nope`", "git aaaaaaa1"]);

    let out = tmp.path().join("hist");
    let o = mlbench(&[
        "report",
        "--history",
        "--store",
        store.dir.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let csv = std::fs::read_to_string(out.join("history.csv")).unwrap();
    // Run 1: 6 series x (micro, macro); run 2: 2 series x 2.
    assert_eq!(csv.lines().count(), 1 + 12 + 4, "{csv}");
    assert!(
        csv.contains("git bbbbbbb2)\",2025-11-25,meta-lora,16,toy/micro,"),
        "{csv}"
    );
    let png = std::fs::read(out.join("history.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let html = std::fs::read_to_string(out.join("index.html")).unwrap();
    assert!(html.contains("data:image/png;base64,") && html.contains("aaaaaaa"));
    let md = std::fs::read_to_string(out.join("history.md")).unwrap();
    assert!(
        md.contains("| bbbbbbb | 2025-11-25 | meta-lora | 16 |"),
        "{md}"
    );
    // Without --history: a user error that says what to pass.
    let o = mlbench(&[
        "report",
        "--store",
        store.dir.to_str().unwrap(),
        "--out",
        "x",
    ]);
    assert_user_error(&o, &["--history"]);
}

#[test]
fn a_baseline_with_budgets_is_paired_at_the_same_k() {
    let tmp = tempfile::tempdir().unwrap();
    let specs = specs(tmp.path());
    let store = Store::new(tmp.path().join("store"));
    grid(&store, &specs, 0, "v1", 1_000);
    let rep = tmp.path().join("rep");
    let o = mlbench(&[
        "-q",
        "compare",
        "--store",
        store.dir.to_str().unwrap(),
        "--baseline",
        "lora-k",
        "--out",
        rep.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The paired bootstrap of meta-lora K64 against lora-k at K64 and at K16, English, from
    // hand-built outcomes (one seed) and the bootstrap seed the table derives for the row.
    let s = store.read("samples.parquet").unwrap();
    let (mm, kk, ll, cc, ids) = (
        s.column("method").unwrap().str().unwrap(),
        s.column("k").unwrap().i64().unwrap(),
        s.column("lang").unwrap().str().unwrap(),
        s.column("correct").unwrap().bool().unwrap(),
        s.column("id").unwrap().str().unwrap(),
    );
    let outcome = |m: &str, k: i64| -> mlbench::runner::stats::Outcomes {
        let mut by_id = std::collections::BTreeMap::new();
        for i in 0..s.height() {
            if mm.get(i) == Some(m) && kk.get(i) == Some(k) && ll.get(i) == Some("eng_Latn") {
                by_id.insert(ids.get(i).unwrap().to_string(), cc.get(i).unwrap());
            }
        }
        assert_eq!(by_id.len(), N);
        [(0u64, [("eng_Latn".to_string(), by_id)].into())].into()
    };
    let rng =
        mlbench::util::derive_seed(0, &["paired", "meta-lora", "64", "lora-k", "toy/eng_Latn"]);
    let p_vs = |k: i64| {
        mlbench::runner::stats::paired_difference(
            &outcome("meta-lora", 64),
            &outcome("lora-k", k),
            mlbench::runner::stats::Average::Micro,
            mlbench::runner::compare::RESAMPLES,
            rng,
        )
        .unwrap()
    };
    let (same, other) = (p_vs(64), p_vs(16));
    assert!(
        (same.diff - other.diff).abs() > 1e-6 && (same.p - other.p).abs() > 1e-6,
        "the case must tell K apart: {same:?} {other:?}"
    );
    let (same_k, other_k) = (same.p, other.p);
    let csv = std::fs::read_to_string(rep.join("table.csv")).unwrap();
    let col = csv
        .lines()
        .next()
        .unwrap()
        .split(',')
        .position(|h| h == "p_vs_baseline")
        .unwrap();
    let line = csv
        .lines()
        .find(|l| l.starts_with("meta-lora,64,toy/eng_Latn,"))
        .unwrap();
    let p: f64 = line.split(',').nth(col).unwrap().parse().unwrap();
    assert!(
        (p - same_k).abs() < 1e-6,
        "csv p {p}, same K {same_k}, other K {other_k}"
    );
}

/// `mlbench export --format eee --from STORE`: one Every Eval Ever aggregate (0.2.1) per
/// finished cell, with the cell in the record and the store as its source; every score equal to
/// the store's metric row; one instance line per sample row, correct where the row is.
#[test]
fn eee_export_of_a_store_has_one_aggregate_per_cell_matching_its_metric_rows() {
    use serde_json::Value;
    let tmp = tempfile::tempdir().unwrap();
    let specs = specs(tmp.path());
    let store = Store::new(tmp.path().join("store"));
    grid(&store, &specs, 0, "v1", 1_700_000_000);
    let out = tmp.path().join("eee");
    let o = mlbench(&[
        "-q",
        "export",
        "--format",
        "eee",
        "--from",
        store.dir.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--organization",
        "tests",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let metrics = store_rows(&store.dir, "metrics.parquet", &["key", "lang", "metric"]);
    let s = |c: &str| metrics.column(c).unwrap().str().unwrap().clone();
    let (keys, langs, names) = (s("key"), s("lang"), s("metric"));
    let values = metrics.column("value").unwrap().f64().unwrap().clone();
    let cells = store.finished();
    assert_eq!(cells.len(), 6);
    for key in &cells {
        let agg: Value =
            serde_json::from_slice(&std::fs::read(out.join(format!("{key}.json"))).unwrap())
                .unwrap();
        for k in [
            "schema_version",
            "evaluation_id",
            "retrieved_timestamp",
            "source_metadata",
            "model_info",
            "eval_library",
            "evaluation_results",
        ] {
            assert!(agg.get(k).is_some(), "{key}: aggregate lacks {k}");
        }
        assert_eq!(agg["schema_version"], "0.2.1");
        let src = &agg["source_metadata"];
        assert_eq!(src["source_type"], "evaluation_run");
        assert_eq!(src["source_organization_name"], "tests");
        assert!(src["source_name"]
            .as_str()
            .unwrap()
            .contains("mlbench results store"));
        let cell: Value =
            serde_json::from_slice(&std::fs::read(store.cell_dir(key).join("cell.json")).unwrap())
                .unwrap();
        let d = &agg["model_info"]["additional_details"];
        assert!(d.as_object().unwrap().values().all(Value::is_string));
        assert_eq!(d["cell_key"], key.as_str());
        assert_eq!(d["method"], cell["cell"]["method"]);
        assert_eq!(d["seed"], "0");
        let k = cell["cell"]["k"].as_i64().map(|k| k.to_string());
        assert_eq!(d["k"], k.as_deref().unwrap_or("full"));
        // Every metric row of the cell, once, with its value.
        let rows: Vec<usize> = (0..metrics.height())
            .filter(|&i| keys.get(i) == Some(key.as_str()))
            .collect();
        let results = agg["evaluation_results"].as_array().unwrap();
        assert_eq!(results.len(), rows.len(), "{key}");
        for i in rows {
            let (lang, metric) = (langs.get(i).unwrap(), names.get(i).unwrap());
            let e = results
                .iter()
                .find(|e| {
                    e["evaluation_name"] == format!("toy_{lang}")
                        && e["metric_config"]["additional_details"]["metric"] == metric
                })
                .unwrap_or_else(|| panic!("{key}: no result for {lang} {metric}"));
            let score = e["score_details"]["score"].as_f64().unwrap();
            assert!(
                (score - values.get(i).unwrap()).abs() < 1e-12,
                "{key} {lang}"
            );
        }
        // The instances: one per sample row (2 languages x N), correct as the rows are.
        let detail = &agg["detailed_evaluation_results"];
        let bytes = std::fs::read(out.join(detail["file_path"].as_str().unwrap())).unwrap();
        assert_eq!(
            detail["checksum"].as_str().unwrap(),
            mlbench::util::sha256_hex(&bytes)
        );
        let lines: Vec<Value> = String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2 * N);
        assert_eq!(detail["total_rows"], 2 * N);
        for lang in LANGS {
            let mine: Vec<&Value> = lines
                .iter()
                .filter(|l| l["evaluation_name"] == format!("toy_{lang}"))
                .collect();
            let hits = mine
                .iter()
                .filter(|l| l["evaluation"]["is_correct"] == true)
                .count();
            let acc = results
                .iter()
                .find(|e| {
                    e["evaluation_name"] == format!("toy_{lang}")
                        && e["metric_config"]["additional_details"]["metric"] == "acc"
                })
                .unwrap()["score_details"]["score"]
                .as_f64()
                .unwrap();
            assert!((hits as f64 / mine.len() as f64 - acc).abs() < 1e-12);
            for l in mine {
                assert_eq!(l["evaluation_id"], agg["evaluation_id"]);
                assert_eq!(l["model_id"], agg["model_info"]["id"]);
                assert_eq!(
                    l["answer_attribution"][0]["extracted_value"],
                    l["output"]["raw"][0]
                );
            }
        }
    }
    // Neither an evaluation folder nor a store: refused, saying what was looked for.
    let o = mlbench(&[
        "-q",
        "export",
        "--format",
        "eee",
        "--from",
        tmp.path().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("neither an evaluation folder"),
        "{}",
        stderr(&o)
    );
}
