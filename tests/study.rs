//! The study protocol end to end on a tiny model: selection on dev (never reading test), a
//! full-data reference with its length chosen on dev, budget accounting, the verdict table, a
//! missing reference seed reported as missing, the report's study parts (every selection
//! candidate among them), settings taken from another study's selection (`[study]
//! settings_from`), a changed declaration named when a run records it, and the bad input of
//! `[study]` and `[search.*]`.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use mlbench::data::schema::Example;

/// A toy task with train, dev and test splits in two languages (3 classes).
fn data(dir: &Path, poison_test: bool) -> PathBuf {
    let data = toy_data(dir, &[("train", 6), ("dev", 3), ("test", 4)]);
    if poison_test {
        // Every test label set to class 0; train and dev untouched.
        let p = data.join("toy.parquet");
        let mut rows: Vec<Example> =
            mlbench::data::schema::from_frame(&mlbench::data::schema::read_parquet(&p).unwrap())
                .unwrap();
        for r in rows.iter_mut().filter(|r| r.split == "test") {
            r.label = Some(0);
        }
        write_dataset(&data, "toy", &rows);
    }
    data
}

fn experiment(dir: &Path, model: &Path, seeds: &str) -> PathBuf {
    let p = dir.join("study.toml");
    std::fs::write(
        &p,
        format!(
            r#"name = "study"
model = {model:?}
tasks = ["toy"]
langs = ["en", "fr"]
methods = ["base", "lora-k", "lora-full"]
ks = [2, 4]
seeds = {seeds}
[train]
passes = 1.0
[method.lora-full]
passes = 2.0
eval_every = 3
patience = 2
[search.lora-k]
lr = [1e-3, 2e-2]
[study]
margin = 5.0
selection_k = 4
"#
        ),
    )
    .unwrap();
    p
}

fn cli(data: &Path, args: &[&str]) -> std::process::Output {
    let mut a = vec!["--data-dir", data.to_str().unwrap(), "-q"];
    a.extend_from_slice(args);
    mlbench(&a)
}

struct Ran {
    _tmp: tempfile::TempDir,
    data: PathBuf,
    store: PathBuf,
    dir: PathBuf,
}

fn run_study(poison_test: bool, seeds: &str, extra: &[&str]) -> Ran {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let data = data(&dir, poison_test);
    let model = tiny_llama(&dir);
    let exp = experiment(&dir, &model, seeds);
    let store = dir.join("store");
    let mut a = vec![
        "run",
        exp.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
    ];
    a.extend_from_slice(extra);
    let o = cli(&data, &a);
    assert!(o.status.success(), "{}", stderr(&o));
    Ran {
        _tmp: tmp,
        data,
        store,
        dir,
    }
}

fn selection(r: &Ran) -> serde_json::Value {
    let p = r.store.join("selection/study.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Removes the store's finished cells whose `cell` object (of `cell.json`) satisfies `which`.
fn remove_cells(store: &Path, which: impl Fn(&serde_json::Value) -> bool) {
    let store = mlbench::runner::store::Store::new(store);
    for key in store.finished() {
        let p = store.cell_dir(&key).join("cell.json");
        let doc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        if which(&doc["cell"]) {
            std::fs::remove_dir_all(store.cell_dir(&key)).unwrap();
        }
    }
}

/// `mlbench compare` of the study with its report in `rep`, the JSON and the Bencher Metric
/// Format files; checks the machine-readable outputs and returns the run.
fn compare_study(r: &Ran, rep: &Path) -> std::process::Output {
    let (json, bmf) = (r.dir.join("t.json"), r.dir.join("bmf.json"));
    let o = cli(
        &r.data,
        &[
            "compare",
            "--store",
            r.store.to_str().unwrap(),
            "--experiment",
            "study",
            "--out",
            rep.to_str().unwrap(),
            "--json",
            json.to_str().unwrap(),
            "--bmf",
            bmf.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // The machine-readable outputs: the table and verdicts as JSON, and Bencher Metric Format.
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(j["reference"], "lora-full");
    assert!(j["verdicts"]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v["method"] == "lora-k" && v["k"] == "4" && v["column"] == "toy/micro"));
    let b: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&bmf).unwrap()).unwrap();
    let m = &b["study/lora-k/K4/toy/micro"]["acc"];
    assert!(
        m["lower_value"].as_f64().unwrap() <= m["value"].as_f64().unwrap(),
        "{b}"
    );
    assert!(
        m["value"].as_f64().unwrap() <= m["upper_value"].as_f64().unwrap(),
        "{b}"
    );
    o
}

#[test]
fn a_study_selects_on_dev_reports_verdicts_budget_and_diagnostics() {
    let r = run_study(false, "[0, 1]", &[]);
    // Selection: both candidates scored on dev, the choice recorded and used by the grid.
    let sel = selection(&r);
    let lk = &sel["lora-k"];
    assert_eq!(lk["split"], "dev");
    assert_eq!(lk["candidates"].as_array().unwrap().len(), 2);
    assert!(lk["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["score"].is_number()));
    let chosen_lr = lk["chosen"]["lr"].as_f64().unwrap();
    let store = mlbench::runner::store::Store::new(&r.store);
    let mut grid_lrs = Vec::new();
    for key in store.finished() {
        let doc: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(store.cell_dir(&key).join("cell.json")).unwrap(),
        )
        .unwrap();
        let cell = &doc["cell"];
        if cell["experiment"] == "study" && cell["method"] == "lora-k" {
            grid_lrs.push(cell["train"]["lr"].as_f64().unwrap());
            assert!(
                cell["eval"]["split"].is_null(),
                "grid cells are scored on test"
            );
        }
        if cell["experiment"] == "study/selection" {
            assert_eq!(cell["eval"]["split"], "dev");
        }
        // Budget facts of every training cell.
        if cell["method"] == "lora-full" {
            let t = &doc["info"]["training"];
            assert_eq!(
                t["distinct_examples"]["toy/eng_Latn"], 18,
                "all 18 training examples"
            );
            assert!(t["early_stopping"]["best_step"].is_number(), "{t}");
            assert!(t["sequences_forwarded"].as_u64().unwrap() >= 36);
        }
    }
    assert_eq!(grid_lrs.len(), 4, "K 2 and 4 x seeds 0 and 1");
    assert!(grid_lrs.iter().all(|&x| x == chosen_lr));
    // The comparison against the declared reference, with the report's study parts.
    let rep = r.dir.join("report");
    let o = compare_study(&r, &rep);
    let out = stdout(&o);
    assert!(
        out.contains("Verdicts against `lora-full` (margin 5.0 points)"),
        "{out}"
    );
    assert!(
        out.contains("toy/micro") && out.contains("toy/macro"),
        "{out}"
    );
    let verdicts = std::fs::read_to_string(rep.join("verdicts.csv")).unwrap();
    let rows: Vec<&str> = verdicts.lines().skip(1).collect();
    assert!(
        rows.iter()
            .any(|l| l.starts_with("lora-k,2,toy/micro,false,")),
        "{verdicts}"
    );
    assert!(
        rows.iter()
            .any(|l| l.starts_with("lora-k,4,toy/macro,false,")),
        "{verdicts}"
    );
    assert!(
        rows.iter()
            .any(|l| l.starts_with("lora-k,4,toy/eng_Latn,true,")),
        "{verdicts}"
    );
    // `base` (untrained, 0-shot) runs once, and that run pairs with both reference seeds.
    let base = rows
        .iter()
        .find(|l| l.starts_with("base,0,toy/micro,"))
        .unwrap_or_else(|| panic!("{verdicts}"));
    let f: Vec<&str> = base.split(',').collect();
    assert_eq!((f[11], f[12]), ("0 1", ""), "{base}");
    for l in &rows {
        let v = l.split(',').nth(8).unwrap();
        assert!(
            ["superior", "non-inferior", "inferior", "inconclusive"].contains(&v),
            "{l}"
        );
    }
    let budget = std::fs::read_to_string(rep.join("budget.csv")).unwrap();
    assert!(
        budget.lines().any(|l| l.starts_with("lora-full,full,2,")),
        "{budget}"
    );
    assert!(
        budget.lines().any(|l| l.starts_with("lora-k,4,2,")),
        "{budget}"
    );
    let setup = std::fs::read_to_string(rep.join("setup.md")).unwrap();
    for needle in [
        "model weights sha256",
        "datasets manifest sha256",
        "lora-k: selected on dev",
        "lora-full: length chosen on dev",
        "longest training example",
    ] {
        assert!(setup.contains(needle), "{needle}: {setup}");
    }
    let line = |key: &str| {
        setup
            .lines()
            .find(|l| l.starts_with(&format!("| {key} |")))
            .unwrap_or_else(|| panic!("{key}: {setup}"))
            .to_string()
    };
    // The all-data run's mix, and only the settings each method reads.
    assert!(
        line("lora-full: training data").contains("examples: toy "),
        "{setup}"
    );
    assert!(line("lora-full: settings").contains("eval_every=3"));
    assert!(!line("lora-k: settings").contains("inner_lr"), "{setup}");
    let html = std::fs::read_to_string(rep.join("index.html")).unwrap();
    let order = [
        "<h2>Setup</h2>",
        "<h2>Verdicts</h2>",
        "<h2>Accuracy</h2>",
        "<h2>Budget</h2>",
        "<h2>Data efficiency</h2>",
        "<h2>Diagnostics</h2>",
    ];
    let pos: Vec<usize> = order
        .iter()
        .map(|h| html.find(h).unwrap_or_else(|| panic!("{h}")))
        .collect();
    assert!(
        pos.windows(2).all(|w| w[0] < w[1]),
        "sections in the protocol's order"
    );
    assert!(rep.join("curves.png").exists() && rep.join("labels.md").exists());
    // One line of diagnostics per cell: trained cells with their steps, losses and update norms
    // from the step log, the untrained base without.
    let dynamics = std::fs::read_to_string(rep.join("dynamics.csv")).unwrap();
    let cells: Vec<Vec<&str>> = dynamics
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    for want in [
        "base,0,0,",
        "lora-full,full,1,",
        "lora-k,4,0,",
        "lora-k,4,1,",
    ] {
        assert!(
            dynamics.lines().any(|l| l.starts_with(want)),
            "{want}: {dynamics}"
        );
    }
    for c in &cells {
        assert_eq!(c[3], "2", "two units (languages) per cell: {c:?}");
        let share: f64 = c[4].parse().unwrap();
        assert!(share > 0.0 && share <= 1.0, "{c:?}");
        if c[0] == "base" {
            assert_eq!((c[9], c[11], c[12]), ("", "0", ""), "{c:?}");
        } else {
            let steps: usize = c[11].parse().unwrap();
            let norm: f64 = c[12].parse().unwrap();
            let (first, last): (f64, f64) = (c[9].parse().unwrap(), c[10].parse().unwrap());
            assert!(
                steps > 0 && norm > 0.0 && first.is_finite() && last.is_finite(),
                "{c:?}"
            );
        }
    }
    // Every selection candidate with its dev score (as recorded), the choice and its diagnostics.
    let csv = std::fs::read_to_string(rep.join("selection.csv")).unwrap();
    let rows: Vec<Vec<&str>> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    assert_eq!(rows.len(), 2, "{csv}");
    for (row, cand) in rows.iter().zip(lk["candidates"].as_array().unwrap()) {
        assert_eq!(row[0], "lora-k");
        assert_eq!((row[1], row[2], row[3]), ("dev", "4", "0"));
        assert_eq!(row[5], cand["key"].as_str().unwrap());
        let score: f64 = row[6].parse().unwrap();
        assert!((score - cand["score"].as_f64().unwrap()).abs() < 1e-12);
        assert_eq!(row[7] == "true", cand["settings"] == lk["chosen"], "{csv}");
        // 2 languages x 3 classes x 3 dev examples, each with a predicted label.
        assert_eq!(row[8], "18", "{csv}");
        let top: f64 = row[9].parse().unwrap();
        assert!((1.0 / 3.0..=1.0).contains(&top), "{csv}");
        // Balanced gold (a third per class): a unit collapses exactly when one label takes
        // over 80% of its predictions, so the largest share and the list agree.
        assert_eq!(top > 0.8, !row[11].is_empty(), "{csv}");
        assert!(row[12].is_empty(), "no inner steps: {csv}");
        assert!(row[13].parse::<f64>().unwrap() > 0.0, "update norm: {csv}");
    }
    assert!(html.contains("<h2>Selection on dev</h2>"));
    assert!(rep.join("selection.md").exists());
}

#[test]
fn selection_never_reads_the_test_split() {
    // The same study on data whose test labels are all wrong: the dev scores and the choice
    // are the same; only the test accuracies differ.
    let clean = run_study(false, "[0]", &["--shard", "0/1"]);
    let poisoned = run_study(true, "[0]", &["--shard", "0/1"]);
    assert_eq!(
        selection(&clean)["lora-k"]["candidates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["score"].clone())
            .collect::<Vec<_>>(),
        selection(&poisoned)["lora-k"]["candidates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["score"].clone())
            .collect::<Vec<_>>()
    );
    assert_eq!(
        selection(&clean)["lora-k"]["chosen"],
        selection(&poisoned)["lora-k"]["chosen"]
    );
    let test_acc = |r: &Ran| -> Vec<f64> {
        let m = mlbench::runner::store::Store::new(&r.store)
            .read("metrics.parquet")
            .unwrap();
        let exp = m.column("experiment").unwrap().str().unwrap().clone();
        let lang = m.column("lang").unwrap().str().unwrap().clone();
        let v = m.column("value").unwrap().f64().unwrap().clone();
        let key = m.column("key").unwrap().str().unwrap().clone();
        let mut rows: Vec<(String, f64)> = (0..m.height())
            .filter(|&i| exp.get(i) == Some("study") && lang.get(i) == Some("micro"))
            .map(|i| (key.get(i).unwrap().to_string(), v.get(i).unwrap()))
            .collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        rows.into_iter().map(|r| r.1).collect()
    };
    assert_ne!(
        test_acc(&clean),
        test_acc(&poisoned),
        "the poison reached the test split"
    );
}

#[test]
fn a_missing_reference_seed_is_reported_not_replaced() {
    let r = run_study(false, "[0, 1]", &["--shard", "0/1"]);
    // Remove lora-full's seed-1 cell.
    remove_cells(&r.store, |c| c["method"] == "lora-full" && c["seed"] == 1);
    let rep = r.dir.join("report");
    let o = compare_study(&r, &rep);
    let out = stdout(&o);
    assert!(
        out.contains("lora-k K=4: seed 1 has no `lora-full` run to pair with"),
        "{out}"
    );
    let csv = std::fs::read_to_string(rep.join("verdicts.csv")).unwrap();
    let micro = csv
        .lines()
        .find(|l| l.starts_with("lora-k,4,toy/micro,"))
        .unwrap();
    let f: Vec<&str> = micro.split(',').collect();
    assert_eq!(
        (f[11], f[12]),
        ("0", "1"),
        "paired seed 0, seed 1 missing: {micro}"
    );

    // No reference cell at all (a grid still running): the table, a warning, no verdicts, and
    // the study parts that do not need the reference (setup, budget, diagnostics).
    remove_cells(&r.store, |c| c["method"] == "lora-full");
    let rep = r.dir.join("report-partial");
    let args = |extra: &[&'static str]| {
        let mut v = vec![
            "compare",
            "--store",
            r.store.to_str().unwrap(),
            "--experiment",
            "study",
        ];
        v.extend_from_slice(extra);
        v
    };
    let mut a = args(&[]);
    a.extend(["--out", rep.to_str().unwrap()]);
    let o = cli(&r.data, &a);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("lora-k"), "{}", stdout(&o));
    assert!(!stdout(&o).contains("lora-full"), "{}", stdout(&o));
    assert!(
        stderr(&o).contains("no verdicts: the declared reference `lora-full` has no finished cell"),
        "{}",
        stderr(&o)
    );
    assert!(!rep.join("verdicts.csv").exists());
    for part in ["setup.md", "budget.csv", "labels.md", "dynamics.csv"] {
        assert!(rep.join(part).exists(), "{part} missing");
    }
    let budget = std::fs::read_to_string(rep.join("budget.csv")).unwrap();
    assert!(budget.lines().any(|l| l.starts_with("lora-k,")), "{budget}");
    let html = std::fs::read_to_string(rep.join("index.html")).unwrap();
    assert!(
        html.matches("No verdicts yet: the declared reference `lora-full` has no finished cell")
            .count()
            == 1,
        "{html}"
    );
    assert!(!html.contains("verdicts.md/.csv/.tex"), "{html}");
    // A reference asked for by name must exist.
    let o = cli(&r.data, &args(&["--reference", "lora-ful"]));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("lora-ful"), "{}", stderr(&o));
}

#[test]
fn a_changed_declaration_is_named_when_recorded() {
    let r = run_study(false, "[0]", &[]);
    let file = r.dir.join("study.toml");
    let toml = std::fs::read_to_string(&file).unwrap();
    std::fs::write(
        &file,
        toml.replace("margin = 5.0", "margin = 5.0\nreference = \"lora-k\""),
    )
    .unwrap();
    let rerun = || {
        let o = cli(
            &r.data,
            &[
                "run",
                file.to_str().unwrap(),
                "--store",
                r.store.to_str().unwrap(),
            ],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        o
    };
    let o = rerun();
    assert!(
        stderr(&o)
            .contains("experiment `study`: the declared reference changes from \"lora-full\"")
            && stderr(&o).contains("to \"lora-k\""),
        "{}",
        stderr(&o)
    );
    assert!(!stderr(&o).contains("declared margin"), "{}", stderr(&o));
    let decl = std::fs::read_to_string(r.store.join("experiments/study.json")).unwrap();
    assert!(decl.contains("\"reference\": \"lora-k\""), "{decl}");
    // The same declaration again: nothing to say.
    let o = rerun();
    assert!(!stderr(&o).contains("changes from"), "{}", stderr(&o));
}

#[test]
fn bad_study_declarations_are_refused_before_anything_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path(), false);
    let model = tiny_llama(tmp.path());
    let exp = experiment(tmp.path(), &model, "[0]");
    let text = std::fs::read_to_string(&exp).unwrap();
    for (from, to, needle) in [
        (
            "lr = [1e-3, 2e-2]",
            "learning_rate = [1e-3]",
            "[search.lora-k] `learning_rate` is not a training key",
        ),
        (
            "lr = [1e-3, 2e-2]",
            "lr = []",
            "[search.lora-k] `lr` has no candidate value",
        ),
        (
            "lr = [1e-3, 2e-2]",
            "lr = 1e-3",
            "must be a list of candidate values",
        ),
        (
            "margin = 5.0",
            "margin = -1.0\nreference = \"lora-full\"",
            "margin = -1 must be a positive number",
        ),
        (
            "margin = 5.0",
            "reference = \"lora-ful\"",
            "[study] reference: unknown method `lora-ful`",
        ),
        (
            "margin = 5.0",
            "reference = \"meta-lora\"",
            "reference = \"meta-lora\" is not among",
        ),
        (
            "selection_k = 4",
            "selection_k = 8",
            "selection_k = 8 is not in ks",
        ),
        (
            "selection_k = 4",
            "selection_split = \"test\"",
            "selection never reads the test split",
        ),
        (
            "selection_k = 4",
            "selection_split = \"validation\"",
            "no `validation` split",
        ),
        (
            "[search.lora-k]",
            "[search.meta-lora]",
            "[search.meta-lora] searches a method the grid does not train",
        ),
        // A key the method does not read: identical candidates, or a setting that does nothing.
        (
            "lr = [1e-3, 2e-2]",
            "inner_lr = [1e-3, 2e-2]",
            "[search.lora-k] `inner_lr`: lora-k does not read it",
        ),
        (
            "patience = 2",
            "patience = 2\nn_support = 2",
            "[method.lora-full] sets `n_support`, which lora-full does not read",
        ),
        // `[train]` serves every method: refused only when none of the grid's reads the key.
        (
            "passes = 1.0\n[method",
            "passes = 1.0\ninner_steps = 2\n[method",
            "[train] sets `inner_steps`, which none of the grid's methods (base, lora-k, lora-full) reads",
        ),
    ] {
        let bad = tmp.path().join("bad.toml");
        std::fs::write(&bad, text.replace(from, to)).unwrap();
        let o = cli(
            &data,
            &[
                "run",
                bad.to_str().unwrap(),
                "--store",
                tmp.path().join("s").to_str().unwrap(),
            ],
        );
        assert_user_error(&o, &[needle]);
        assert!(
            !tmp.path().join("s").join("cells").exists(),
            "{needle}: nothing ran"
        );
    }
}

#[test]
fn selecting_or_stopping_on_a_split_the_task_trains_on_is_refused() {
    // A task that trains on its dev split (as XCOPA does).
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path(), false);
    std::fs::write(
        data.join("tasks/toy.toml"),
        TOY_SPEC.replace(
            "scoring = \"multiple_choice\"",
            "scoring = \"multiple_choice\"\ntrain_split = \"dev\"",
        ),
    )
    .unwrap();
    let model = tiny_llama(tmp.path());
    let exp = experiment(tmp.path(), &model, "[0]");
    let text = std::fs::read_to_string(&exp)
        .unwrap()
        .replace("ks = [2, 4]", "ks = [2]")
        .replace("selection_k = 4", "selection_k = 2");
    std::fs::write(&exp, text).unwrap();
    let o = cli(&data, &["run", exp.to_str().unwrap(), "--dry-run"]);
    assert_user_error(
        &o,
        &["task `toy` trains on its `dev` split, so selecting on it"],
    );
    let o = cli(
        &data,
        &[
            "train",
            "--method",
            "lora-full",
            "--model",
            model.to_str().unwrap(),
            "--task",
            "toy",
            "--langs",
            "en",
            "--set",
            "eval_every=2",
            "--out",
            tmp.path().join("r").to_str().unwrap(),
        ],
    );
    assert_user_error(
        &o,
        &["early stopping on `dev` would choose the length on training data"],
    );
}

#[test]
fn a_dry_run_lists_the_candidates_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path(), false);
    let model = tiny_llama(tmp.path());
    let exp = experiment(tmp.path(), &model, "[0]");
    let store = tmp.path().join("store");
    let o = cli(
        &data,
        &[
            "run",
            exp.to_str().unwrap(),
            "--store",
            store.to_str().unwrap(),
            "--dry-run",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert_eq!(out.matches("[selection: lr=").count(), 2, "{out}");
    assert!(
        out.contains("the grid cells of lora-k are built once its selection is complete"),
        "{out}"
    );
    assert!(!store.exists(), "a dry run writes nothing");
}

/// A second study on the same data whose `[study] settings_from` names `record` (`search`: more
/// lines at the end, such as a `[search.lora-k]` table).
fn transfer_experiment(r: &Ran, record: &Path, search: &str) -> PathBuf {
    let exp = r.dir.join("study-b.toml");
    let model = r.dir.join("tiny");
    std::fs::write(
        &exp,
        format!(
            r#"name = "study-b"
model = {model:?}
tasks = ["toy"]
langs = ["en", "fr"]
methods = ["lora-k", "lora-full"]
ks = [2]
seeds = [0]
[train]
passes = 1.0
[method.lora-full]
passes = 1.0
[study]
settings_from = {record:?}
{search}"#
        ),
    )
    .unwrap();
    exp
}

#[test]
fn a_study_can_take_its_settings_from_another_studys_selection() {
    let a = run_study(false, "[0]", &["--shard", "0/1"]);
    let chosen = selection(&a)["lora-k"]["chosen"].clone();
    let record = a.store.join("selection/study.json");
    let store_b = a.dir.join("store-b");
    let run_b = |exp: &Path, extra: &[&str]| {
        let mut args = vec![
            "run",
            exp.to_str().unwrap(),
            "--store",
            store_b.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        cli(&a.data, &args)
    };

    // A record whose choice is not made yet: no lora-k grid cells, and a line that says why.
    let mut pending = selection(&a);
    pending["lora-k"]["chosen"] = serde_json::Value::Null;
    let pending_record = a.dir.join("pending.json");
    std::fs::write(&pending_record, pending.to_string()).unwrap();
    let o = run_b(
        &transfer_experiment(&a, &pending_record, ""),
        &["--dry-run"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("(the grid cells of lora-k are built once the selection it takes its settings from is complete"),
        "{out}"
    );
    assert!(!out.contains("lora-k/k2/s0"), "{out}");
    assert!(out.contains("lora-full/full/s0"), "{out}");

    // Refused: the same method searched here too; a record that is not there.
    let o = run_b(
        &transfer_experiment(&a, &record, "[search.lora-k]\nlr = [1e-3]\n"),
        &["--dry-run"],
    );
    assert_user_error(
        &o,
        &[
            "[search.lora-k] and [study] settings_from",
            "both give its settings",
        ],
    );
    let o = run_b(
        &transfer_experiment(&a, &a.dir.join("nowhere.json"), ""),
        &["--dry-run"],
    );
    assert_user_error(&o, &["nowhere.json"]);

    // The real run: the grid trains with the first study's choice, and the report says so.
    let exp = transfer_experiment(&a, &record, "");
    let o = run_b(&exp, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let store = mlbench::runner::store::Store::new(&store_b);
    let mut lrs = Vec::new();
    for key in store.finished() {
        let doc: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(store.cell_dir(&key).join("cell.json")).unwrap(),
        )
        .unwrap();
        if doc["cell"]["method"] == "lora-k" {
            lrs.push(doc["cell"]["train"]["lr"].clone());
        }
    }
    assert_eq!(lrs, vec![chosen["lr"].clone()]);
    let rec: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(store_b.join("selection/study-b.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(rec["lora-k"]["chosen"], chosen);
    assert_eq!(rec["lora-k"]["from"], record.display().to_string());
    // study-b's report from `store` into `a.dir/name`: its folder and setup block.
    let report_b = |store: &Path, name: &str| {
        let rep = a.dir.join(name);
        let o = cli(
            &a.data,
            &[
                "compare",
                "--store",
                store.to_str().unwrap(),
                "--experiment",
                "study-b",
                "--out",
                rep.to_str().unwrap(),
            ],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let setup = std::fs::read_to_string(rep.join("setup.md")).unwrap();
        (rep, setup)
    };
    let (rep, setup) = report_b(&store_b, "report-b");
    let labels_b = std::fs::read_to_string(rep.join("labels.md")).unwrap();
    assert!(setup.contains("| lora-k: settings from |"), "{setup}");
    assert!(setup.contains("used here unchanged"), "{setup}");
    let sel = std::fs::read_to_string(rep.join("selection.md")).unwrap();
    assert!(sel.contains("its cells are not in this store"), "{sel}");
    assert!(
        !setup.contains("chosen on the dev split of this model"),
        "{setup}"
    );

    // The same grid in (a copy of) the selection's own store: its candidates ran there on the
    // same model, data, tasks and languages, so the choice was made on this data, and the
    // report says so.
    let here = a.dir.join("store-a-copy");
    let cp = std::process::Command::new("cp")
        .args(["-r", a.store.to_str().unwrap(), here.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(cp.success());
    let o = cli(
        &a.data,
        &[
            "run",
            exp.to_str().unwrap(),
            "--store",
            here.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let (rep, setup) = report_b(&here, "report-b-here");
    // The label diagnostics read study-b's records only: the first study's grid cells and its
    // dev-split candidates share methods, K and seeds with them in this store, and each row
    // counts the same test items as in study-b's own store.
    let counts = |labels: &str| -> std::collections::BTreeSet<String> {
        labels
            .lines()
            .skip(2)
            .map(|l| l.split('|').take(7).collect::<Vec<_>>().join("|"))
            .collect()
    };
    let labels_here = std::fs::read_to_string(rep.join("labels.md")).unwrap();
    assert!(counts(&labels_b).iter().any(|r| r.contains("| lora-k |")));
    assert_eq!(counts(&labels_here), counts(&labels_b), "{labels_here}");
    assert!(
        setup.contains("chosen on the dev split of this model"),
        "{setup}"
    );
    let html = std::fs::read_to_string(rep.join("index.html")).unwrap();
    assert!(
        html.contains("the same model, tasks and languages"),
        "reading"
    );

    // While a study is still selecting (no grid cell yet), compare shows the candidates so far.
    remove_cells(&a.store, |c| c["experiment"] == "study");
    // A candidate finished after the record was written: its score comes from its cell.
    let best = selection(&a)["lora-k"]["candidates"][0]["score"]
        .as_f64()
        .unwrap();
    let mut late = selection(&a);
    late["lora-k"]["candidates"][0]["score"] = serde_json::Value::Null;
    std::fs::write(a.store.join("selection/study.json"), late.to_string()).unwrap();
    let o = cli(
        &a.data,
        &[
            "compare",
            "--store",
            a.store.to_str().unwrap(),
            "--experiment",
            "study",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("No grid cell of `study` has finished yet"),
        "{out}"
    );
    assert!(
        out.contains(&format!("| lora-k | lr=0.001 | {:.2} |", 100.0 * best)),
        "{out}"
    );
}
