//! The experiment runner on a tiny model and a toy dataset: the store round trip, resumption
//! after a simulated kill (finished cells are not recomputed, none lost or duplicated), shards
//! covering every cell exactly once, and the comparison table.

mod common;

use std::collections::BTreeSet;

use common::*;
use mlbench::model::config::Arch;
use mlbench::model::tiny;
use mlbench::runner::experiment::{shard, Experiment};

const SPEC: &str = r#"
name = "toy"
version = 1
scoring = "multiple_choice"
[prompt]
template = "{text}:"
[[metrics]]
name = "acc"
higher_is_better = true
"#;

struct Setup {
    tmp: tempfile::TempDir,
    data: std::path::PathBuf,
    exp: std::path::PathBuf,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(data.join("tasks")).unwrap();
    let mut rows = toy_examples("toy", &["eng_Latn", "fra_Latn"], 3, 6, "train");
    let mut test = toy_examples("toy", &["eng_Latn", "fra_Latn"], 3, 3, "test");
    for r in test.iter_mut() {
        r.id = format!("t{}", r.id);
    }
    rows.extend(test);
    write_dataset(&data, "toy", &rows);
    std::fs::write(data.join("tasks/toy.toml"), SPEC).unwrap();
    let model = tmp.path().join("tiny");
    tiny::write_tiny(Arch::Llama, &model, 0).unwrap();
    let exp = tmp.path().join("exp.toml");
    std::fs::write(
        &exp,
        format!(
            r#"name = "toy-grid"
model = {:?}
tasks = ["toy"]
langs = ["en", "fr"]
methods = ["base", "lora-k", "meta-lora", "lora-full"]
ks = [4, 8]
seeds = [0, 1]
[train]
meta_iterations = 2
passes = 1.0
n_support = 2
n_query = 2
[method.lora-full]
passes = 0.5
"#,
            model.to_str().unwrap()
        ),
    )
    .unwrap();
    Setup { tmp, data, exp }
}

fn run(s: &Setup, extra: &[&str]) -> std::process::Output {
    let store = s.tmp.path().join("store");
    let mut a = vec![
        "--data-dir",
        s.data.to_str().unwrap(),
        "-q",
        "run",
        s.exp.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
    ];
    a.extend_from_slice(extra);
    mlbench(&a)
}

#[test]
fn shards_cover_every_cell_exactly_once() {
    let s = setup();
    let cells = Experiment::load(&s.exp).unwrap().cells().unwrap();
    // base once, lora-full x 2 seeds, (lora-k, meta-lora) x 2 K x 2 seeds.
    assert_eq!(cells.len(), 1 + 2 + 8);
    let keys: BTreeSet<String> = cells.iter().map(|c| c.key.clone()).collect();
    assert_eq!(keys.len(), cells.len(), "keys are unique");
    for n in [1, 2, 3, 5] {
        let mut seen = Vec::new();
        for i in 0..n {
            seen.extend(shard(&cells, i, n).into_iter().map(|c| c.key));
        }
        seen.sort();
        assert_eq!(seen, keys.iter().cloned().collect::<Vec<_>>(), "n = {n}");
    }
}

#[test]
fn a_killed_grid_resumes_without_recomputing_or_losing_cells_and_compares() {
    let s = setup();
    let store = s.tmp.path().join("store");
    // Shard 0 of 2 first, as one array job would.
    let o = run(&s, &["--shard", "0/2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let after_first: BTreeSet<String> = std::fs::read_dir(store.join("cells"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!after_first.is_empty());
    // A killed cell: a half-written temporary folder and a training run without a manifest.
    std::fs::create_dir_all(store.join("cells/.tmp-dead-1")).unwrap();
    let stamp = |k: &str| {
        std::fs::metadata(store.join("cells").join(k).join("cell.json"))
            .unwrap()
            .modified()
            .unwrap()
    };
    let before: Vec<_> = after_first.iter().map(|k| stamp(k)).collect();
    let o = run(&s, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let finished: BTreeSet<String> = std::fs::read_dir(store.join("cells"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert_eq!(finished.len(), 11, "every cell once");
    let after: Vec<_> = after_first.iter().map(|k| stamp(k)).collect();
    assert_eq!(before, after, "finished cells were not recomputed");
    // The store reads as one table; every cell contributes its rows once.
    let metrics = mlbench::runner::store::Store::new(&store)
        .read("metrics.parquet")
        .unwrap();
    let keys: BTreeSet<String> = metrics
        .column("key")
        .unwrap()
        .str()
        .unwrap()
        .iter()
        .map(|k| k.unwrap().to_string())
        .collect();
    assert_eq!(keys, finished);
    let samples = mlbench::runner::store::Store::new(&store)
        .read("samples.parquet")
        .unwrap();
    assert_eq!(samples.height(), 11 * 18, "11 cells x 18 test examples");
    // The comparison table: rows per method x K, language columns plus micro and macro.
    let o = mlbench(&[
        "compare",
        "--store",
        store.to_str().unwrap(),
        "--langs",
        "en,fr",
        "--baseline",
        "lora-full",
        "--out",
        s.tmp.path().join("rep").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("method")
            && lines[0].contains("toy/eng_Latn")
            && lines[0].contains("toy/macro"),
        "{out}"
    );
    let labels: Vec<String> = lines[2..]
        .iter()
        .take_while(|l| !l.starts_with("acc x 100"))
        .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(
        labels,
        [
            "base full",
            "lora-full full",
            "lora-k 4",
            "lora-k 8",
            "meta-lora 4",
            "meta-lora 8"
        ],
        "{out}"
    );
    assert!(out.contains("McNemar"));
    let tex = std::fs::read_to_string(s.tmp.path().join("rep/table.tex")).unwrap();
    assert!(tex.contains("\\toprule") && tex.contains("meta-lora & 8"));
    let csv = std::fs::read_to_string(s.tmp.path().join("rep/table.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 6 * 4);
}

#[test]
fn bad_experiments_are_refused_with_every_problem_listed() {
    let s = setup();
    let text = std::fs::read_to_string(&s.exp).unwrap();
    std::fs::write(
        &s.exp,
        text.replace("\"lora-full\"]", "\"lora-ful\"]")
            .replace("n_query = 2", "n_query = 7"),
    )
    .unwrap();
    let o = run(&s, &[]);
    assert_user_error(
        &o,
        &[
            "unknown method `lora-ful`",
            "is larger than k = 4",
            "[method.lora-full]",
        ],
    );
    // Data problems: a budget larger than the split, an unknown language.
    std::fs::write(
        &s.exp,
        text.replace("ks = [4, 8]", "ks = [4, 50]")
            .replace("\"fr\"]", "\"fr\", \"xx\"]"),
    )
    .unwrap();
    let o = run(&s, &[]);
    assert_user_error(
        &o,
        &[
            "k = 50 is larger than the 18 examples",
            "unknown language `xx`",
        ],
    );
    assert!(!s.tmp.path().join("store").exists());
}
