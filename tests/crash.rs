//! The crash test of the reliability issue: a small grid (an evaluation-only cell and a
//! training cell) is killed with SIGKILL at every fault-injection point it passes (every atomic
//! write and its rename, every write and the rename of a cell commit, every step of the final
//! compaction: `mlbench::util::fault_point`), then rerun to completion; each time the store must
//! read back identical to an uninterrupted run's (the same cells, the same rows, no duplicate,
//! no leftover temporary folder).

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;

use common::*;
use mlbench::runner::store::Store;

fn grid(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let data = toy_data(dir, &[("train", 4), ("test", 2)]);
    let model = tiny_llama(dir);
    let exp = dir.join("exp.toml");
    std::fs::write(
        &exp,
        format!(
            "name = \"crash\"\nmodel = {:?}\ntasks = [\"toy\"]\nlangs = [\"en\", \"fr\"]\n\
             methods = [\"base\", \"lora-k\"]\nks = [2]\nseeds = [0]\n\
             [train]\npasses = 1.0\ncheckpoint_every = 1\n[method.lora-k]\nbatch_size = 4\nmicro_batch = 4\n\
             [eval]\nshots = 1\n",
            model.to_str().unwrap()
        ),
    )
    .unwrap();
    (data, exp)
}

fn run(data: &Path, exp: &Path, store: &Path, env: &[(&str, String)]) -> std::process::Output {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_mlbench"));
    c.args([
        "--data-dir",
        data.to_str().unwrap(),
        "-q",
        "run",
        exp.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
    ])
    .env("NO_COLOR", "1")
    .env_remove("MLBENCH_FAULT_AT")
    .env_remove("MLBENCH_FAULT_LOG");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

#[test]
fn a_grid_killed_at_every_write_and_rename_reads_back_as_if_never_killed() {
    let dir = tempfile::tempdir().unwrap();
    let (data, exp) = grid(dir.path());
    // The uninterrupted run, listing the points it passes.
    let reference = dir.path().join("reference");
    let o = run(
        &data,
        &exp,
        &reference,
        &[("MLBENCH_FAULT_LOG", "1".into())],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let points: Vec<String> = stderr(&o)
        .lines()
        .filter_map(|l| l.strip_prefix("fault point ").map(str::to_string))
        .collect();
    let want_cells = Store::new(&reference).finished();
    assert_eq!(want_cells.len(), 2);
    let commits = points.iter().filter(|p| p.contains("commit:")).count();
    assert_eq!(commits, 2 * 4, "four points per cell commit: {points:#?}");
    assert!(points.iter().any(|p| p.contains("merge:")), "{points:#?}");
    let want_m = store_rows(
        &reference,
        "metrics.parquet",
        &["key", "task", "lang", "metric"],
    );
    let want_s = store_rows(
        &reference,
        "samples.parquet",
        &["key", "task", "lang", "id"],
    );
    for n in 1..=points.len() {
        let store = dir.path().join(format!("store-{n}"));
        let o = run(&data, &exp, &store, &[("MLBENCH_FAULT_AT", n.to_string())]);
        assert_eq!(
            o.status.signal(),
            Some(9),
            "point {n} ({}) did not kill the run: {}",
            points[n - 1],
            stderr(&o)
        );
        let o = run(&data, &exp, &store, &[]);
        assert!(
            o.status.success(),
            "rerun after point {n} ({}): {}",
            points[n - 1],
            stderr(&o)
        );
        let what = &points[n - 1];
        assert_eq!(Store::new(&store).finished(), want_cells, "after {what}");
        let leftovers: Vec<String> = std::fs::read_dir(store.join("cells"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "after {what}: {leftovers:?}");
        let got_m = store_rows(
            &store,
            "metrics.parquet",
            &["key", "task", "lang", "metric"],
        );
        let got_s = store_rows(&store, "samples.parquet", &["key", "task", "lang", "id"]);
        assert!(
            got_m.equals_missing(&want_m),
            "metrics after {what}:\n{got_m}\n{want_m}"
        );
        assert!(
            got_s.equals_missing(&want_s),
            "samples after {what}:\n{got_s}\n{want_s}"
        );
        std::fs::remove_dir_all(&store).unwrap();
    }
}
