//! The experiment runner on a tiny model and a toy dataset: the store round trip, resumption
//! after a simulated kill (finished cells are not recomputed, none lost or duplicated), shards
//! covering every cell exactly once, and the comparison table.

mod common;

use std::collections::BTreeSet;

use common::*;
use mlbench::model::config::Arch;
use mlbench::model::tiny;
use mlbench::plan::grid::{shard, Experiment};

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
    std::fs::write(data.join("tasks/toy.toml"), TOY_SPEC).unwrap();
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
    // Run order: seed-major; base, full data, then budgets small to large.
    let order: Vec<String> = cells.iter().map(|c| c.label()).collect();
    let want = [
        "base/full/s0",
        "lora-full/full/s0",
        "lora-k/k4/s0",
        "meta-lora/k4/s0",
        "lora-k/k8/s0",
        "meta-lora/k8/s0",
        "lora-full/full/s1",
    ];
    assert_eq!(&order[..want.len()], &want[..], "{order:?}");
    // A shard keeps that order.
    let pos = |key: &str| cells.iter().position(|c| c.key == key).unwrap();
    let s0: Vec<usize> = shard(&cells, 0, 2).iter().map(|c| pos(&c.key)).collect();
    assert!(s0.windows(2).all(|w| w[0] < w[1]), "{s0:?}");
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
    // The unsharded run that completed the grid compacted the store.
    assert!(
        std::fs::read_dir(store.join("parts")).unwrap().count() == 2
            && finished.iter().all(|k| !store
                .join("cells")
                .join(k)
                .join("metrics.parquet")
                .exists()),
        "the store is compacted"
    );
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
            "base 0",
            "lora-full full",
            "lora-k 4",
            "lora-k 8",
            "meta-lora 4",
            "meta-lora 8"
        ],
        "{out}"
    );
    assert!(out.contains("paired two-level bootstrap"), "{out}");
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
    // Keys of the `[train]` and `[method.M]` sections are checked at resolution, all at once,
    // each named with its file and section.
    std::fs::write(
        &s.exp,
        text.replace("n_query = 2", "n_query = 2\nlr_inner = 0.1")
            .replace(
                "[method.lora-full]\n",
                "[method.lora-full]\nclip = \"high\"\n",
            ),
    )
    .unwrap();
    let o = run(&s, &[]);
    let file = s.exp.display().to_string();
    assert_user_error(
        &o,
        &[
            &format!("{file} [train]: unknown key `lr_inner`"),
            &format!("{file} [method.lora-full]: `clip` = \"high\""),
        ],
    );
    assert!(!s.tmp.path().join("store").exists());
}

/// Metrics and samples frames of two runs (code versions `a` and `b`) for three cells, 200
/// examples each: `drop` loses 30 of run a's correct answers, `noise` flips 5 each way plus one,
/// `small` loses 10 and gains 6 (2 points, not significant).
fn two_runs() -> (polars::prelude::DataFrame, polars::prelude::DataFrame) {
    use polars::prelude::*;
    let mut m_rows: Vec<(String, String, f64)> = Vec::new();
    let mut s_rows: Vec<(String, String, String, bool)> = Vec::new();
    for (cell, lose, gain) in [("drop", 30usize, 0usize), ("noise", 6, 5), ("small", 10, 6)] {
        let a: Vec<bool> = (0..200).map(|i| i < 150).collect();
        let mut b = a.clone();
        for x in b.iter_mut().take(lose) {
            *x = false;
        }
        for x in b.iter_mut().skip(150).take(gain) {
            *x = true;
        }
        for (v, o) in [("a", &a), ("b", &b)] {
            let acc = o.iter().filter(|&&x| x).count() as f64 / 200.0;
            m_rows.push((cell.into(), v.into(), acc));
            for (i, &x) in o.iter().enumerate() {
                s_rows.push((cell.into(), v.into(), format!("{i}"), x));
            }
        }
    }
    let n = m_rows.len();
    let metrics = DataFrame::new_infer_height(vec![
        Column::new(
            "method".into(),
            m_rows.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(),
        ),
        Column::new("task".into(), vec!["toy"; n]),
        Column::new("lang".into(), vec!["eng_Latn"; n]),
        Column::new("metric".into(), vec!["acc"; n]),
        Column::new(
            "code_version".into(),
            m_rows.iter().map(|r| r.1.as_str()).collect::<Vec<_>>(),
        ),
        Column::new("k".into(), vec![Some(16i64); n]),
        Column::new(
            "value".into(),
            m_rows.iter().map(|r| r.2).collect::<Vec<_>>(),
        ),
        Column::new("higher_is_better".into(), vec![true; n]),
        Column::new(
            "finished_at_unix".into(),
            m_rows
                .iter()
                .map(|r| if r.1 == "a" { 1u64 } else { 2 })
                .collect::<Vec<_>>(),
        ),
    ])
    .unwrap();
    let n = s_rows.len();
    let samples = DataFrame::new_infer_height(vec![
        Column::new(
            "method".into(),
            s_rows.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(),
        ),
        Column::new("task".into(), vec!["toy"; n]),
        Column::new("lang".into(), vec!["eng_Latn"; n]),
        Column::new(
            "id".into(),
            s_rows.iter().map(|r| r.2.as_str()).collect::<Vec<_>>(),
        ),
        Column::new(
            "code_version".into(),
            s_rows.iter().map(|r| r.1.as_str()).collect::<Vec<_>>(),
        ),
        Column::new("k".into(), vec![Some(16i64); n]),
        Column::new("seed".into(), vec![0u64; n]),
        Column::new(
            "correct".into(),
            s_rows.iter().map(|r| r.3).collect::<Vec<_>>(),
        ),
    ])
    .unwrap();
    (metrics, samples)
}

#[test]
fn the_regression_gate_fires_on_a_planted_drop_and_stays_quiet_on_noise() {
    use mlbench::runner::compare::{regressions, runs};
    let (m, s) = two_runs();
    let r = runs(&m).unwrap();
    assert_eq!(
        r.iter().map(|x| x.0.as_str()).collect::<Vec<_>>(),
        ["a", "b"]
    );
    let regs = regressions(&m, &s, "a", "b", "acc", 1.0).unwrap();
    assert_eq!(regs.len(), 1, "{regs:?}");
    assert_eq!(regs[0].method, "drop");
    assert!((regs[0].before - 0.75).abs() < 1e-12 && (regs[0].after - 0.60).abs() < 1e-12);
    assert!(regs[0].p < 1e-8);
    // A looser threshold lets even the planted drop pass; the reverse direction is no drop.
    assert!(regressions(&m, &s, "a", "b", "acc", 20.0)
        .unwrap()
        .is_empty());
    assert!(regressions(&m, &s, "b", "a", "acc", 1.0)
        .unwrap()
        .is_empty());
    // Every compared cell with its verdict, for the JSON and Bencher outputs of the gate.
    use mlbench::runner::compare::{gate_bmf, gate_checks, gate_json};
    let checks = gate_checks(&m, &s, "a", "b", "acc", 1.0).unwrap();
    assert_eq!(checks.len(), 3, "{checks:?}");
    // `small` fell by 2 points (over the 1-point threshold) but not significantly.
    let small = checks.iter().find(|c| c.method == "small").unwrap();
    assert!(small.drop_points > 1.0 && small.p.unwrap() > 0.05 && !small.regressed);
    let noise = checks.iter().find(|c| c.method == "noise").unwrap();
    assert!(!noise.regressed && noise.p.unwrap() > 0.05, "{noise:?}");
    let drop = checks.iter().find(|c| c.method == "drop").unwrap();
    assert!(drop.regressed && (drop.drop_points - 15.0).abs() < 1e-9);
    let doc = gate_json(&checks, ("a", "b"), "acc", 1.0);
    assert_eq!(doc["passed"], false);
    assert_eq!(doc["checks"].as_array().unwrap().len(), 3);
    let bmf = gate_bmf(&checks, Some("nightly"), "acc");
    let entry = &bmf["nightly/gate/drop/K16/toy/eng_Latn"];
    assert_eq!(entry["gate_regressed"]["value"], 1.0);
    assert_eq!(entry["gate_p_value"]["value"].as_f64(), drop.p);
    assert!((entry["acc_drop_points"]["value"].as_f64().unwrap() - 15.0).abs() < 1e-9);
}

#[test]
fn meta_lora_reuses_its_tta_siblings_training_run_with_the_same_results() {
    let s = setup();
    let text = std::fs::read_to_string(&s.exp).unwrap();
    let grid = |methods: &str| {
        text.replace(
            "methods = [\"base\", \"lora-k\", \"meta-lora\", \"lora-full\"]",
            &format!("methods = [{methods}]"),
        )
        .replace("ks = [4, 8]", "ks = [4]")
        .replace("seeds = [0, 1]", "seeds = [0]")
        .replace("[method.lora-full]\npasses = 0.5\n", "")
    };
    let run_in = |toml: String, store: &str| {
        std::fs::write(&s.exp, toml).unwrap();
        let store = s.tmp.path().join(store);
        let o = mlbench(&[
            "--data-dir",
            s.data.to_str().unwrap(),
            "-q",
            "run",
            s.exp.to_str().unwrap(),
            "--store",
            store.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        mlbench::runner::store::Store::new(store)
    };
    let both = run_in(grid("\"meta-lora\", \"meta-lora+tta\""), "both");
    let alone = run_in(grid("\"meta-lora\""), "alone");
    let cells = Experiment::load(&s.exp).unwrap().cells().unwrap();
    let meta = &cells[0];
    // With the sibling in the grid: one training run, in the tta cell's folder.
    assert!(!both.work_dir(&meta.key).join("train").exists());
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(both.cell_dir(&meta.key).join("cell.json")).unwrap())
            .unwrap();
    let tta_key = info["info"]["train_run_of"]
        .as_str()
        .expect("shared run")
        .to_string();
    assert!(both
        .work_dir(&tta_key)
        .join("train/adapters/toy.eng_Latn")
        .exists());
    assert!(alone
        .work_dir(&meta.key)
        .join("train/manifest.json")
        .exists());
    // The meta-lora cell scores every example exactly as when trained alone.
    let lps = |st: &mlbench::runner::store::Store| {
        let only = std::collections::HashSet::from([meta.key.clone()]);
        let df = mlbench::runner::compare::with_keys(&st.read("samples.parquet").unwrap(), &only)
            .unwrap();
        let ids: Vec<String> = df
            .column("id")
            .unwrap()
            .str()
            .unwrap()
            .iter()
            .map(|x| x.unwrap().to_string())
            .collect();
        let list = df.column("logprobs").unwrap().list().unwrap().clone();
        let lp: Vec<Vec<f64>> = (0..list.len())
            .map(|i| {
                list.get_as_series(i)
                    .unwrap()
                    .f64()
                    .unwrap()
                    .into_no_null_iter()
                    .collect()
            })
            .collect();
        (ids, lp)
    };
    assert_eq!(lps(&both), lps(&alone));
    // The tta cell evaluated its per-task adapters only.
    let only = std::collections::HashSet::from([tta_key.clone()]);
    let tta =
        mlbench::runner::compare::with_keys(&both.read("samples.parquet").unwrap(), &only).unwrap();
    assert_eq!(tta.height(), 18, "one record per test example");
}

#[test]
fn shipped_experiment_files_are_valid_and_smoke_shrinks_the_nightly() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut seen = 0;
    for e in std::fs::read_dir(root.join("benchmarks")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "toml") {
            continue;
        }
        let exp = Experiment::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let mut cells = exp
            .cells()
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        // The selection candidates too (their split, their settings).
        cells.extend(
            exp.selection_cells()
                .unwrap_or_else(|e| panic!("{}: {e}", p.display())),
        );
        // Against the shipped datasets: languages, splits, budgets, templates.
        mlbench::runner::grid::check_data(&shipped(), &cells, "the test grid")
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        seen += 1;
    }
    assert!(
        seen >= 4,
        "nightly, sib200-multilingual, multitask, readme-small"
    );
    let mut nightly = Experiment::load(&root.join("benchmarks/nightly.toml")).unwrap();
    let full = nightly.cells().unwrap();
    nightly.smoke();
    let smoke = nightly.cells().unwrap();
    // base, lora-full, and the three K methods at the smallest K, first seed only.
    assert_eq!(
        smoke.len(),
        5,
        "{:?}",
        smoke.iter().map(|c| c.label()).collect::<Vec<_>>()
    );
    assert!(full.len() > smoke.len());
    assert!(smoke.iter().all(|c| c.experiment == "nightly-smoke"
        && c.seed == 0
        && c.k.is_none_or(|k| k == 16)
        && c.eval.limit == Some(20)));
}

/// A cell stopped during its evaluation keeps its finished (task, language) groups; run again,
/// it reads them back and commits the rows an uninterrupted run commits.
#[test]
fn a_cell_stopped_while_evaluating_resumes_from_its_finished_groups() {
    use mlbench::runner::grid::{run_cell, Outcome, WhenBusy};
    use mlbench::runner::store::Store;
    use std::sync::atomic::{AtomicBool, Ordering};
    let s = setup();
    let cells = Experiment::load(&s.exp).unwrap().cells().unwrap();
    let cell = cells
        .iter()
        .find(|c| c.train.is_none())
        .expect("the base cell");
    let (stopped, whole) = (
        Store::new(s.tmp.path().join("stopped")),
        Store::new(s.tmp.path().join("whole")),
    );
    let stop = AtomicBool::new(false);
    let run = |store: &Store, progress: &mut dyn FnMut(&str)| {
        run_cell(&s.data, store, cell, None, WhenBusy::Skip, &stop, progress)
    };
    let done = run(&whole, &mut |_| {});
    assert!(matches!(done, Ok(Outcome::Done { .. })), "{done:?}");

    // Raise the flag once the first language's items are all scored ("... eval toy/en 9/9").
    let mut raise = |m: &str| {
        let counts = m.rsplit(' ').next().and_then(|c| c.split_once('/'));
        if m.contains(" eval toy/") && counts.is_some_and(|(a, b)| a == b && a != "0") {
            stop.store(true, Ordering::SeqCst);
        }
    };
    match run(&stopped, &mut raise) {
        Err(mlbench::Error::EvalInterrupted {
            kept: 1, groups: 2, ..
        }) => {}
        other => panic!("{other:?}"),
    }
    assert!(!stopped.is_done(&cell.key));
    let groups = stopped.work_dir(&cell.key).join("eval/groups");
    assert_eq!(files_in(&groups).len(), 1);

    stop.store(false, Ordering::SeqCst);
    let again = run(&stopped, &mut |_| {});
    assert!(matches!(again, Ok(Outcome::Done { .. })), "{again:?}");
    let info: serde_json::Value = serde_json::from_slice(
        &std::fs::read(stopped.cell_dir(&cell.key).join("cell.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(info["info"]["eval_groups_read_back"], 1, "{info}");
    for (file, order) in [
        ("metrics.parquet", ["task", "lang", "metric"]),
        ("samples.parquet", ["task", "lang", "id"]),
    ] {
        let a = store_rows(&stopped.dir, file, &order);
        let b = store_rows(&whole.dir, file, &order);
        assert!(a.equals_missing(&b), "{file}: {a}\n{b}");
    }
}
