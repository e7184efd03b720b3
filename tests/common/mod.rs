//! Helpers shared by the integration tests: running the binary, building small canonical
//! datasets and small raw source folders.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Output;

use mlbench::data::schema::{self, Example};

/// The task spec of the `toy` datasets that [`toy_examples`] builds: multiple choice, `acc`.
pub const TOY_SPEC: &str = r#"
name = "toy"
version = 1
scoring = "multiple_choice"
[prompt]
template = "{text}:"
[[metrics]]
name = "acc"
higher_is_better = true
"#;

/// The repository's shipped datasets folder.
pub fn shipped() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("datasets")
}

/// Runs `mlbench` with `args` and returns its output.
pub fn mlbench(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_mlbench"))
        .args(args)
        .env_remove("MLBENCH_DATA")
        .env("NO_COLOR", "1")
        .output()
        .expect("run mlbench")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Asserts exit status 2 and that stderr mentions every needle.
pub fn assert_user_error(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(
        o.status.code(),
        Some(2),
        "expected exit 2, got {:?}; stderr:\n{err}",
        o.status.code()
    );
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}:\n{err}");
    }
}

/// A small labelled dataset: `langs` x `per_class` examples in each of `classes` classes,
/// all in `split`.
pub fn toy_examples(
    task: &str,
    langs: &[&str],
    classes: usize,
    per_class: usize,
    split: &str,
) -> Vec<Example> {
    let names: Vec<String> = (0..classes).map(|c| format!("class{c}")).collect();
    let mut v = Vec::new();
    for l in langs {
        for c in 0..classes {
            for j in 0..per_class {
                v.push(Example {
                    task: task.into(),
                    lang: (*l).into(),
                    lang_code: (*l).into(),
                    split: split.into(),
                    id: format!("{c}-{j}"),
                    text: format!("text {l} {c} {j}"),
                    choices: Some(names.clone()),
                    label: Some(c as i64),
                    ..Default::default()
                });
            }
        }
    }
    v
}

/// Writes examples as `<dir>/<task>.parquet`.
pub fn write_dataset(dir: &Path, task: &str, rows: &[Example]) {
    let mut df = schema::to_frame(rows).unwrap();
    schema::write_parquet(&mut df, &dir.join(format!("{task}.parquet"))).unwrap();
}

/// Files in a folder, sorted.
pub fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The device the model and trainer tests run on: `MLBENCH_TEST_DEVICE` (`cpu` by default;
/// `cuda` or `cuda:N` with a CUDA build, as `scripts/gpu-check.sh` runs them).
pub fn test_device() -> candle_core::Device {
    let d = std::env::var("MLBENCH_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    mlbench::plan::DeviceSpec::parse(&d)
        .and_then(|d| d.open())
        .unwrap_or_else(|e| panic!("MLBENCH_TEST_DEVICE={d}: {e}"))
}

/// A comparison-table entry: `mean` ± `half`, three seeds (t interval), paired-test p-value `p`.
pub fn entry(mean: f64, half: f64, p: Option<f64>) -> Option<mlbench::runner::compare::Entry> {
    Some(mlbench::runner::compare::Entry {
        mean,
        low: mean - half,
        high: mean + half,
        seeds: 3,
        p,
        interval: mlbench::runner::compare::Interval::T,
    })
}

/// A data folder `dir/data` holding the `toy` task (English and French, 3 classes) with
/// `per_class` examples per class and language in each split (ids prefixed by the split after
/// the first), and its spec; returns the folder.
pub fn toy_data(dir: &Path, splits: &[(&str, usize)]) -> PathBuf {
    let data = dir.join("data");
    std::fs::create_dir_all(data.join("tasks")).unwrap();
    let mut rows = Vec::new();
    for (i, (split, per_class)) in splits.iter().enumerate() {
        let mut more = toy_examples("toy", &["eng_Latn", "fra_Latn"], 3, *per_class, split);
        if i > 0 {
            for r in more.iter_mut() {
                r.id = format!("{split}-{}", r.id);
            }
        }
        rows.extend(more);
    }
    write_dataset(&data, "toy", &rows);
    std::fs::write(data.join("tasks/toy.toml"), TOY_SPEC).unwrap();
    data
}

/// A tiny random Llama model folder at `dir/tiny`.
pub fn tiny_llama(dir: &Path) -> PathBuf {
    let model = dir.join("tiny");
    mlbench::model::tiny::write_tiny(mlbench::model::config::Arch::Llama, &model, 0).unwrap();
    model
}

/// A results store's rows of `file` (`metrics.parquet` or `samples.parquet`) without the
/// finish times, sorted by `order`: two stores of the same grid compare equal.
pub fn store_rows(store: &Path, file: &str, order: &[&str]) -> polars::prelude::DataFrame {
    use polars::prelude::SortMultipleOptions;
    mlbench::runner::store::Store::new(store)
        .read(file)
        .unwrap()
        .drop("finished_at_unix")
        .unwrap()
        .sort(order.to_vec(), SortMultipleOptions::default())
        .unwrap()
}
