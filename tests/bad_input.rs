//! Every kind of bad input named in the foundation issue: a clear error naming the file,
//! column, row or code, exit status 2, and no output file left behind.

mod common;

use common::*;
use mlbench::data::schema::{self, Example};
use polars::prelude::*;

/// Runs `data sample` on `data_dir` and returns the output plus the output path.
fn sample_in(
    data_dir: &std::path::Path,
    task: &str,
    langs: &str,
    k: &str,
) -> (std::process::Output, std::path::PathBuf) {
    let out = data_dir.join("out").join("pools.parquet");
    let o = mlbench(&[
        "--data-dir",
        data_dir.to_str().unwrap(),
        "--quiet",
        "data",
        "sample",
        "--task",
        task,
        "--langs",
        langs,
        "--k",
        k,
        "--seed",
        "0",
        "--out",
        out.to_str().unwrap(),
    ]);
    (o, out)
}

fn assert_no_output(out: &std::path::Path) {
    assert!(!out.exists(), "{} was written", out.display());
    if let Some(dir) = out.parent().filter(|d| d.exists()) {
        assert!(files_in(dir).is_empty(), "leftovers: {:?}", files_in(dir));
    }
}

#[test]
fn unknown_task_suggests_close_names() {
    let (o, out) = sample_in(&shipped(), "sib20", "en", "8");
    assert_user_error(&o, &["unknown task `sib20`", "did you mean sib200"]);
    assert_no_output(&out);
}

#[test]
fn unknown_language_suggests_close_codes() {
    let (o, _) = sample_in(&shipped(), "sib200", "en,yor_Latm", "8");
    assert_user_error(
        &o,
        &[
            "unknown language `yor_Latm`",
            "sib200",
            "did you mean yor_Latn",
        ],
    );
}

#[test]
fn budget_larger_than_the_split_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (o, out) = {
        let out = dir.path().join("pools.parquet");
        let o = mlbench(&[
            "--data-dir",
            shipped().to_str().unwrap(),
            "data",
            "sample",
            "--task",
            "nusax",
            "--langs",
            "english",
            "--k",
            "16,501",
            "--out",
            out.to_str().unwrap(),
        ]);
        (o, out)
    };
    assert_user_error(&o, &["k = 501", "500 examples", "nusax/eng_Latn", "train"]);
    assert!(!out.exists());
    assert!(files_in(dir.path()).is_empty());
}

#[test]
fn a_task_without_train_split_is_named() {
    let (o, _) = sample_in(&shipped(), "mgsm", "en", "4");
    assert_user_error(&o, &["no `train` split", "mgsm", "exemplars, test"]);
}

fn toy_dir(rows: &[Example]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path(), "toy", rows);
    dir
}

#[test]
fn duplicate_ids_are_named() {
    let mut rows = toy_examples("toy", &["eng_Latn"], 2, 5, "train");
    rows[7].id = rows[2].id.clone();
    let dir = toy_dir(&rows);
    let (o, out) = sample_in(dir.path(), "toy", "en", "4");
    assert_user_error(
        &o,
        &[
            "toy.parquet",
            "row 7",
            "duplicate id",
            &format!("`{}`", rows[2].id),
        ],
    );
    assert_no_output(&out);
    let e = schema::validate(
        &schema::to_frame(&rows).unwrap(),
        std::path::Path::new("toy.parquet"),
        None,
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("row 7") && e.to_string().contains("duplicate id"),
        "{e}"
    );
}

#[test]
fn labels_outside_the_choices_are_named() {
    let mut rows = toy_examples("toy", &["eng_Latn"], 3, 4, "train");
    rows[5].label = Some(3);
    let dir = toy_dir(&rows);
    let (o, out) = sample_in(dir.path(), "toy", "en", "4");
    assert_user_error(
        &o,
        &[
            "toy.parquet",
            "row 5",
            "column `label`",
            "label 3 is outside 0..3",
        ],
    );
    assert_no_output(&out);
}

#[test]
fn empty_text_is_named() {
    let mut rows = toy_examples("toy", &["eng_Latn"], 2, 3, "train");
    rows[4].text = "   ".into();
    let e = schema::validate(
        &schema::to_frame(&rows).unwrap(),
        std::path::Path::new("toy.parquet"),
        Some("toy"),
    )
    .unwrap_err();
    let m = e.to_string();
    assert!(
        m.contains("toy.parquet")
            && m.contains("row 4")
            && m.contains("column `text`")
            && m.contains("empty"),
        "{m}"
    );
    assert!(e.is_user_error());
    // The same file through the CLI (tasks render validates the whole file first).
    let dir = toy_dir(&rows);
    std::fs::create_dir_all(dir.path().join("tasks")).unwrap();
    std::fs::write(
        dir.path().join("tasks/toy.toml"),
        "name = \"toy\"\nversion = 1\nscoring = \"multiple_choice\"\nmetrics = [{ name = \"acc\", higher_is_better = true }]\n[prompt]\ntemplate = \"{text}\"\n",
    )
    .unwrap();
    let o = mlbench(&[
        "--data-dir",
        dir.path().to_str().unwrap(),
        "tasks",
        "render",
        "--task",
        "toy",
        "--lang",
        "en",
        "--split",
        "train",
    ]);
    assert_user_error(&o, &["row 4", "column `text`", "is empty"]);
}

#[test]
fn missing_and_mistyped_columns_are_named() {
    let rows = toy_examples("toy", &["eng_Latn"], 2, 4, "train");
    let dir = tempfile::tempdir().unwrap();
    let mut df = schema::to_frame(&rows).unwrap();
    let mut missing = df.drop("label").unwrap();
    schema::write_parquet(&mut missing, &dir.path().join("toy.parquet")).unwrap();
    let (o, out) = sample_in(dir.path(), "toy", "en", "4");
    assert_user_error(&o, &["toy.parquet", "missing column `label`"]);
    assert_no_output(&out);

    let as_text = df.column("label").unwrap().cast(&DataType::String).unwrap();
    df.with_column(as_text).unwrap();
    schema::write_parquet(&mut df, &dir.path().join("toy.parquet")).unwrap();
    let (o, _) = sample_in(dir.path(), "toy", "en", "4");
    assert_user_error(
        &o,
        &[
            "toy.parquet",
            "column `label`",
            "has type str",
            "expected i64",
        ],
    );
    let e = schema::check_columns(&df, std::path::Path::new("toy.parquet")).unwrap_err();
    assert!(matches!(e, mlbench::Error::ColumnType { .. }), "{e}");
}

#[test]
fn corrupt_parquet_is_reported_as_such() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("toy.parquet"),
        b"PAR1 this is not parquet at all",
    )
    .unwrap();
    let (o, out) = sample_in(dir.path(), "toy", "en", "4");
    assert_user_error(&o, &["toy.parquet", "not a readable Parquet file"]);
    assert_no_output(&out);
    // A truncated copy of a real file.
    let real = std::fs::read(shipped().join("xcopa.parquet")).unwrap();
    std::fs::write(dir.path().join("toy.parquet"), &real[..real.len() / 2]).unwrap();
    let (o, _) = sample_in(dir.path(), "toy", "it", "4");
    assert_user_error(&o, &["toy.parquet"]);
}

#[test]
fn missing_data_folder_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let nowhere = dir.path().join("nowhere");
    let (o, _) = sample_in(&nowhere, "sib200", "en", "4");
    assert_user_error(&o, &["not found", "sib200.parquet"]);
    let o = mlbench(&[
        "--data-dir",
        nowhere.to_str().unwrap(),
        "data",
        "import",
        "--source",
        nowhere.to_str().unwrap(),
    ]);
    assert_user_error(&o, &["source folder not found"]);
}

#[test]
fn bad_flags_exit_2() {
    let o = mlbench(&["data", "sample", "--task", "sib200"]);
    assert_eq!(o.status.code(), Some(2));
    let o = mlbench(&[
        "data",
        "sample",
        "--task",
        "sib200",
        "--langs",
        "en",
        "--k",
        "zero",
        "--out",
        "x.parquet",
    ]);
    assert_eq!(o.status.code(), Some(2));
    let o = mlbench(&[
        "--data-dir",
        shipped().to_str().unwrap(),
        "data",
        "sample",
        "--task",
        "sib200",
        "--langs",
        "en",
        "--k",
        "0",
        "--out",
        "/tmp/never.parquet",
    ]);
    assert_user_error(&o, &["at least 1"]);
}
