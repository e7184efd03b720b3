//! Regression tests of the reliability issue, one per item, named after it (`item01_...`):
//! silent wrong numbers, phantom cells, non-finite weights, run folders as adapters, unbounded
//! values, the store lock, exit statuses, one validation for every reader, silently accepted
//! input and the smaller messages. The crash test (a grid killed at every write and rename of
//! a cell commit) and the hundred malformed inputs live in `crash.rs` and `malformed.rs`.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use common::*;
use mlbench::runner::lock::{try_claim, TryClaim};

/// A toy task (`toy`, English and French, 3 classes: 6 train and 3 test examples per class and
/// language) and a tiny Llama model, in a temporary folder.
struct Fixture {
    tmp: tempfile::TempDir,
    data: PathBuf,
    model: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let data = toy_data(tmp.path(), &[("train", 6), ("test", 3)]);
        let model = tiny_llama(tmp.path());
        Fixture { tmp, data, model }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// `mlbench --data-dir DATA -q ARGS...`
    fn cli(&self, args: &[&str]) -> std::process::Output {
        let mut a = vec!["--data-dir", self.data.to_str().unwrap(), "-q"];
        a.extend_from_slice(args);
        mlbench(&a)
    }

    /// Writes an experiment file over the toy task with `body` appended to its header.
    fn experiment(&self, name: &str, methods: &str, body: &str) -> PathBuf {
        let p = self.path(&format!("{name}.toml"));
        std::fs::write(
            &p,
            format!(
                "name = {name:?}\nmodel = {:?}\ntasks = [\"toy\"]\nlangs = [\"en\", \"fr\"]\nmethods = {methods}\n{body}",
                self.model.to_str().unwrap()
            ),
        )
        .unwrap();
        p
    }

    /// Trains a small `lora-k` run (K = 4) into `out`.
    fn train_lora_k(&self, out: &Path, extra: &[&str]) -> std::process::Output {
        let mut a = vec![
            "train",
            "--method",
            "lora-k",
            "--model",
            self.model.to_str().unwrap(),
            "--task",
            "toy",
            "--langs",
            "en,fr",
            "--k",
            "4",
            "--set",
            "passes=1",
            "--out",
            out.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        self.cli(&a)
    }
}

fn edit_json(p: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Every file below `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn cells_in(store: &Path) -> BTreeSet<String> {
    mlbench::runner::store::Store::new(store)
        .finished()
        .into_iter()
        .collect()
}

// Item 1: silent wrong numbers from a transformers 5.x config.
#[test]
fn item01_transformers5_rope_parameters_score_like_rope_theta() {
    let f = Fixture::new();
    let reqs = f.path("r.jsonl");
    std::fs::write(
        &reqs,
        "{\"context\": \"the cat and the dog are in the\", \"continuation\": \" house of the one\"}\n",
    )
    .unwrap();
    let score = |model: &Path| -> std::process::Output {
        f.cli(&[
            "score",
            "--model",
            model.to_str().unwrap(),
            "--requests",
            reqs.to_str().unwrap(),
        ])
    };
    // The same weights, the rope base said the transformers 5 way.
    let v5 = f.path("tiny-v5");
    copy_dir(&f.model, &v5);
    edit_json(&v5.join("config.json"), |c| {
        let theta = c["rope_theta"].take();
        c.as_object_mut().unwrap().remove("rope_theta");
        c["rope_parameters"] = serde_json::json!({"rope_theta": theta, "rope_type": "default"});
    });
    let (a, b) = (score(&f.model), score(&v5));
    assert!(
        a.status.success() && b.status.success(),
        "{}{}",
        stderr(&a),
        stderr(&b)
    );
    assert_eq!(stdout(&a), stdout(&b), "rope_parameters read as rope_theta");
    // A different base changes the scores: the key matters, so it must be read.
    let other = f.path("tiny-other");
    copy_dir(&v5, &other);
    edit_json(&other.join("config.json"), |c| {
        c["rope_parameters"]["rope_theta"] = 1e4.into()
    });
    let c = score(&other);
    assert!(c.status.success(), "{}", stderr(&c));
    assert_ne!(stdout(&a), stdout(&c), "the rope base changes the scores");
    // Without any rope base, or with scaling, the folder is refused by name.
    edit_json(&other.join("config.json"), |c| {
        c.as_object_mut().unwrap().remove("rope_parameters");
    });
    assert_user_error(&score(&other), &["config.json", "rope_theta"]);
    edit_json(&other.join("config.json"), |c| {
        c["rope_parameters"] =
            serde_json::json!({"rope_theta": 1e5, "rope_type": "yarn", "factor": 4.0});
    });
    assert_user_error(&score(&other), &["config.json", "yarn"]);
}

// Item 2: a kill during the final rename left a phantom cell.
#[test]
fn item02_a_temporary_cell_folder_is_never_a_cell_and_is_removed() {
    let f = Fixture::new();
    let exp = f.experiment(
        "phantom",
        "[\"base\"]",
        "seeds = [0, 1]\n[eval]\nshots = 1\n",
    );
    let store = f.path("store");
    let run = || {
        f.cli(&[
            "run",
            exp.to_str().unwrap(),
            "--store",
            store.to_str().unwrap(),
            "--shard",
            "0/1",
        ])
    };
    let o = run();
    assert!(o.status.success(), "{}", stderr(&o));
    let done = cells_in(&store);
    assert_eq!(done.len(), 2);
    // A `**` glob over the store meets each cell's metrics once: the evaluation's own copy in
    // `work/` is gone once the cell is committed.
    let copies: Vec<_> = walk(&store)
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n == "metrics.parquet"))
        .collect();
    assert_eq!(copies.len(), 2, "{copies:?}");
    // What a kill between writing cell.json and the rename leaves: a full copy under `.tmp-`.
    let key = done.iter().next().unwrap().clone();
    let cell = store.join("cells").join(&key);
    let tmp = store.join("cells").join(format!(".tmp-{key}-4242"));
    copy_dir(&cell, &tmp);
    assert_eq!(
        cells_in(&store),
        done,
        "readers ignore the temporary folder"
    );
    let s = mlbench::runner::store::Store::new(&store);
    assert_eq!(s.read("metrics.parquet").unwrap().height(), {
        let mut n = 0;
        for k in &done {
            n += mlbench::data::schema::read_parquet(
                &store.join("cells").join(k).join("metrics.parquet"),
            )
            .unwrap()
            .height();
        }
        n
    });
    // The next merge removes it, and the merged store holds each cell once.
    let o = f.cli(&["merge", "--store", store.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!tmp.exists(), "the stale temporary folder was removed");
    let metrics = s.read("metrics.parquet").unwrap();
    let keys: BTreeSet<String> = metrics
        .column("key")
        .unwrap()
        .str()
        .unwrap()
        .iter()
        .map(|k| k.unwrap().to_string())
        .collect();
    assert_eq!(keys, done);
    let rows_per_cell = metrics.height() / 2;
    assert_eq!(metrics.height(), 2 * rows_per_cell, "no duplicate rows");
    // A claim on the cell (the next run's) removes such a folder as well.
    copy_dir(&cell, &tmp);
    drop(s.try_claim_cell(&key).unwrap());
    assert!(!tmp.exists());
}

/// Writes `value` into the first element of tensor `name` of a safetensors file.
fn poison(path: &Path, name: &str, value: f32) {
    let dev = candle_core::Device::Cpu;
    let tensors = mlbench::model::lora::read_safetensors(path, &dev).unwrap();
    let mut map = std::collections::HashMap::new();
    for (n, t) in tensors {
        let t = if n == name {
            let dims = t.dims().to_vec();
            let mut v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v[0] = value;
            candle_core::Tensor::from_vec(v, dims, &dev).unwrap()
        } else {
            t
        };
        map.insert(n, t);
    }
    candle_core::safetensors::save(&map, path).unwrap();
}

// Item 3: NaN or inf adapter weights gave exit 0 and wrong results.
#[test]
fn item03_non_finite_adapter_and_model_weights_are_refused_naming_the_tensor() {
    let f = Fixture::new();
    let ad = f.path("adapter");
    let o = f.cli(&[
        "adapter",
        "init",
        "--model",
        f.model.to_str().unwrap(),
        "--out",
        ad.to_str().unwrap(),
        "--r",
        "4",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let st = ad.join("adapter_model.safetensors");
    let tensor = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight";
    let reqs = f.path("r.jsonl");
    std::fs::write(&reqs, "{\"context\": \"a b\", \"continuation\": \" c\"}\n").unwrap();
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        poison(&st, tensor, bad);
        let o = f.cli(&[
            "score",
            "--model",
            f.model.to_str().unwrap(),
            "--adapter",
            ad.to_str().unwrap(),
            "--requests",
            reqs.to_str().unwrap(),
        ]);
        assert_user_error(&o, &["adapter_model.safetensors", tensor, "finite"]);
        let o = f.cli(&[
            "eval",
            "--model",
            f.model.to_str().unwrap(),
            "--adapters",
            ad.to_str().unwrap(),
            "--task",
            "toy",
            "--langs",
            "en",
            "--out",
            f.path("ev").to_str().unwrap(),
        ]);
        assert_user_error(&o, &["adapter_model.safetensors", tensor, "finite"]);
    }
    // The base model's weights too.
    let m = f.path("nan-model");
    copy_dir(&f.model, &m);
    poison(&m.join("model.safetensors"), "model.norm.weight", f32::NAN);
    let o = f.cli(&[
        "score",
        "--model",
        m.to_str().unwrap(),
        "--requests",
        reqs.to_str().unwrap(),
    ]);
    assert_user_error(&o, &["model.safetensors", "model.norm.weight", "NaN"]);
}

// Item 4: `eval --adapters RUN_FOLDER` failed for every training run.
#[test]
fn item04_eval_reads_a_training_run_folder_as_its_adapter() {
    let f = Fixture::new();
    let run = f.path("run");
    let o = f.train_lora_k(&run, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = f.path("ev");
    let o = f.cli(&[
        "eval",
        "--model",
        f.model.to_str().unwrap(),
        "--adapters",
        &format!("mine={}", run.display()),
        "--task",
        "toy",
        "--langs",
        "en,fr",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let m = mlbench::data::schema::read_parquet(&out.join("metrics.parquet")).unwrap();
    let variants: BTreeSet<String> = m
        .column("variant")
        .unwrap()
        .str()
        .unwrap()
        .iter()
        .map(|v| v.unwrap().to_string())
        .collect();
    assert_eq!(variants, ["base", "mine"].map(String::from).into());
}

// Item 5: unbounded values passed the checks, then aborted or never ended.
#[test]
fn item05_unbounded_values_are_refused_before_any_work() {
    let f = Fixture::new();
    for (set, needle) in [
        ("lora_r=100000000", "lora_r"),
        ("passes=1e30", "passes"),
        ("meta_iterations=10000000000000", "meta_iterations"),
        ("batch_size=100000000", "batch_size"),
        ("inner_steps=100000000", "inner_steps"),
        ("max_len=1000000000", "max_len"),
    ] {
        let t0 = std::time::Instant::now();
        let o = f.train_lora_k(&f.path("never"), &["--set", set]);
        assert_user_error(&o, &[needle]);
        assert!(t0.elapsed().as_secs() < 60, "{set} took {:?}", t0.elapsed());
        assert!(!f.path("never").join("manifest.json").exists());
    }
    // A bound that depends on the model: a rank past the modules' sizes.
    let o = f.train_lora_k(&f.path("never"), &["--set", "lora_r=2048"]);
    assert_user_error(&o, &["lora_r = 2048", "min(in, out)"]);
    // The same checks in an experiment file, before anything runs.
    for (key, needle) in [
        ("lora_r = 100000000", "lora_r"),
        ("passes = 1e30", "passes"),
        ("meta_iterations = 10000000000000", "meta_iterations"),
    ] {
        let exp = f.experiment(
            "big",
            "[\"meta-lora\"]",
            &format!("ks = [4]\n[train]\n{key}\n"),
        );
        let o = f.cli(&[
            "run",
            exp.to_str().unwrap(),
            "--store",
            f.path("s").to_str().unwrap(),
            "--dry-run",
        ]);
        assert_user_error(&o, &[needle]);
    }
}

/// Runs the grid `exp` into `store` in the background.
fn spawn_run(f: &Fixture, exp: &Path, store: &Path, extra: &[&str]) -> std::process::Child {
    let mut a = vec![
        "--data-dir".to_string(),
        f.data.to_str().unwrap().into(),
        "run".into(),
        exp.to_str().unwrap().into(),
        "--store".into(),
        store.to_str().unwrap().into(),
    ];
    a.extend(extra.iter().map(|s| s.to_string()));
    std::process::Command::new(env!("CARGO_BIN_EXE_mlbench"))
        .args(&a)
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

// Item 6: no lock on a store.
#[test]
fn item06_a_claimed_cell_is_left_to_its_holder_and_two_runs_compute_each_cell_once() {
    let f = Fixture::new();
    let exp = f.experiment(
        "locked",
        "[\"base\", \"lora-k\"]",
        "ks = [4]\nseeds = [0, 1]\n[train]\npasses = 1.0\n[eval]\nshots = 1\n",
    );
    let store = f.path("store");
    let cells = mlbench::plan::grid::Experiment::load(&exp)
        .unwrap()
        .cells()
        .unwrap();
    assert_eq!(cells.len(), 4);
    // A live holder of one cell's claim (this test process): the run leaves that cell.
    let held = &cells[0].key;
    let claim = match try_claim(&mlbench::runner::lock::cell_lock_path(&store, held)).unwrap() {
        TryClaim::Claimed(c) => c,
        TryClaim::Busy(h) => panic!("{h}"),
    };
    let o = f.cli(&[
        "run",
        exp.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(cells_in(&store).len(), 3);
    assert!(!cells_in(&store).contains(held));
    // The dry run shows who holds it.
    let o = f.cli(&[
        "run",
        exp.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
        "--dry-run",
    ]);
    assert!(
        stdout(&o).contains(&format!("running (pid {}", std::process::id())),
        "{}",
        stdout(&o)
    );
    drop(claim);
    // Released (as a dead holder's is): the next run takes it.
    let o = f.cli(&[
        "run",
        exp.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(cells_in(&store).len(), 4);

    // Two runs of one grid at once on a fresh store: every cell computed exactly once.
    let store2 = f.path("store2");
    let a = spawn_run(&f, &exp, &store2, &["--shard", "0/1"]);
    let b = spawn_run(&f, &exp, &store2, &["--shard", "0/1"]);
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success(), "{}", stderr(&a));
    assert!(b.status.success(), "{}", stderr(&b));
    let ran = |o: &std::process::Output| -> usize {
        let s = stdout(o);
        let n = s
            .split(": ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .unwrap_or("?");
        n.parse().unwrap_or_else(|_| panic!("{s}"))
    };
    assert_eq!(ran(&a) + ran(&b), 4, "{}\n{}", stdout(&a), stdout(&b));
    assert_eq!(cells_in(&store2).len(), 4);
    let s = mlbench::runner::store::Store::new(&store2);
    let per_cell = s.read("samples.parquet").unwrap().height();
    assert_eq!(per_cell, 4 * 18, "each cell's 18 test examples once");
}

#[test]
fn item06_duplicate_methods_budgets_or_seeds_are_refused() {
    let f = Fixture::new();
    for (methods, body, needle) in [
        (
            "[\"lora-k\", \"lora-k\"]",
            "ks = [4]",
            "`methods` lists lora-k twice",
        ),
        (
            "[\"meta-lora\", \"meta-lora-k\"]",
            "ks = [4]",
            "`methods` lists meta-lora twice",
        ),
        ("[\"lora-k\"]", "ks = [4, 8, 4]", "`ks` lists 4 twice"),
        (
            "[\"lora-k\"]",
            "ks = [4]\nseeds = [1, 1]",
            "`seeds` lists 1 twice",
        ),
    ] {
        let exp = f.experiment("dup", methods, &format!("{body}\n"));
        let o = f.cli(&["run", exp.to_str().unwrap(), "--dry-run"]);
        assert_user_error(&o, &[needle, "experiment `dup`"]);
    }
}

// Item 7: exit statuses of unreadable input and internal faults.
#[test]
fn item07_unreadable_user_input_exits_2_with_its_path() {
    let f = Fixture::new();
    let exp = f.path("latin1.toml");
    std::fs::write(&exp, b"name = \"caf\xe9\"\n").unwrap();
    assert_user_error(
        &f.cli(&["run", exp.to_str().unwrap(), "--dry-run"]),
        &["latin1.toml"],
    );
    let reqs = f.path("r.jsonl");
    std::fs::write(
        &reqs,
        b"{\"context\": \"\xff\", \"continuation\": \" b\"}\n",
    )
    .unwrap();
    let o = f.cli(&[
        "score",
        "--model",
        f.model.to_str().unwrap(),
        "--requests",
        reqs.to_str().unwrap(),
    ]);
    assert_user_error(&o, &["r.jsonl"]);
    // A store path that is a file.
    let file = f.path("not-a-folder");
    std::fs::write(&file, "x").unwrap();
    let good = f.experiment("ok", "[\"base\"]", "");
    let o = f.cli(&[
        "run",
        good.to_str().unwrap(),
        "--store",
        file.to_str().unwrap(),
    ]);
    assert_user_error(&o, &["not-a-folder"]);
}

#[test]
fn item07_internal_faults_are_not_user_errors() {
    assert!(!mlbench::Error::Internal("x".into()).is_user_error());
    let full = mlbench::Error::io(
        "write",
        "/x",
        std::io::Error::from(std::io::ErrorKind::StorageFull),
    );
    assert!(full.is_user_error());
    let other = mlbench::Error::io("write", "/x", std::io::Error::other("boom"));
    assert!(!other.is_user_error());
}

/// The toy dataset with one column dropped or one value spoiled, in a fresh data folder.
fn spoiled_data(
    f: &Fixture,
    name: &str,
    spoil: impl FnOnce(&mut polars::prelude::DataFrame),
) -> PathBuf {
    let dir = f.path(name);
    std::fs::create_dir_all(dir.join("tasks")).unwrap();
    std::fs::write(dir.join("tasks/toy.toml"), TOY_SPEC).unwrap();
    let mut df = mlbench::data::schema::read_parquet(&f.data.join("toy.parquet")).unwrap();
    spoil(&mut df);
    let mut w = std::fs::File::create(dir.join("toy.parquet")).unwrap();
    polars::prelude::ParquetWriter::new(&mut w)
        .finish(&mut df)
        .unwrap();
    dir
}

// Item 8: `data sample` and `data describe` accepted files that `eval` and `train` reject.
#[test]
fn item08_every_reader_rejects_what_training_and_evaluation_reject() {
    use polars::prelude::*;
    let f = Fixture::new();
    let no_text = spoiled_data(&f, "no-text", |df| {
        let _ = df.drop_in_place("text").unwrap();
    });
    let empty = spoiled_data(&f, "empty-text", |df| {
        let n = df.height();
        let mut t: Vec<String> = vec!["fine".into(); n];
        t[5] = "   ".into();
        df.replace("text", Column::new("text".into(), t)).unwrap();
    });
    for (dir, needles) in [
        (&no_text, ["toy.parquet", "column `text`"]),
        (&empty, ["toy.parquet", "`text`: is empty"]),
    ] {
        let d = dir.to_str().unwrap();
        let m = f.model.to_str().unwrap();
        let out = f.path("o.parquet");
        let o = f.path("o");
        for args in [
            vec![
                "--data-dir",
                d,
                "data",
                "sample",
                "--task",
                "toy",
                "--langs",
                "en",
                "--k",
                "2",
                "--out",
                out.to_str().unwrap(),
            ],
            vec!["--data-dir", d, "data", "describe", "--task", "toy"],
            vec![
                "--data-dir",
                d,
                "eval",
                "--model",
                m,
                "--task",
                "toy",
                "--langs",
                "en",
                "--out",
                o.to_str().unwrap(),
            ],
            vec![
                "--data-dir",
                d,
                "train",
                "--method",
                "lora-k",
                "--model",
                m,
                "--task",
                "toy",
                "--langs",
                "en",
                "--k",
                "2",
                "--out",
                o.to_str().unwrap(),
            ],
        ] {
            let r = mlbench(&args);
            assert_user_error(&r, &needles);
        }
    }
}

// Item 9: input that was silently accepted.
#[test]
fn item09_misspelt_baseline_zero_limit_empty_continuation_and_overwrites_are_refused() {
    let f = Fixture::new();
    let exp = f.experiment("nine", "[\"base\"]", "");
    let store = f.path("store");
    let o = f.cli(&[
        "run",
        exp.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = f.cli(&[
        "compare",
        "--store",
        store.to_str().unwrap(),
        "--baseline",
        "lora-ful",
    ]);
    assert_user_error(&o, &["unknown baseline method `lora-ful`", "base"]);
    let ev = |limit: &str, out: &Path, extra: &[&str]| {
        let mut a = vec![
            "eval",
            "--model",
            f.model.to_str().unwrap(),
            "--task",
            "toy",
            "--langs",
            "en",
            "--limit",
            limit,
            "--out",
            out.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        f.cli(&a)
    };
    assert_user_error(&ev("0", &f.path("e0"), &[]), &["limit = 0"]);
    let out = f.path("e1");
    assert!(ev("3", &out, &[]).status.success());
    assert_user_error(&ev("3", &out, &[]), &["e1", "--overwrite"]);
    assert!(ev("3", &out, &["--overwrite"]).status.success());
    let reqs = f.path("r.jsonl");
    std::fs::write(&reqs, "{\"context\": \"a\", \"continuation\": \"\"}\n").unwrap();
    let o = f.cli(&[
        "score",
        "--model",
        f.model.to_str().unwrap(),
        "--requests",
        reqs.to_str().unwrap(),
    ]);
    assert_user_error(&o, &["r.jsonl:1", "`continuation` is empty"]);
    // The dry run sees an impossible eval batch size and a missing model.
    let bad = f.experiment("nine-b", "[\"base\"]", "[eval]\nbatch_size = 0\n");
    assert_user_error(
        &f.cli(&["run", bad.to_str().unwrap(), "--dry-run"]),
        &["batch_size = 0"],
    );
    let p = f.path("nomodel.toml");
    std::fs::write(&p, "name = \"x\"\nmodel = \"/no/such/model\"\ntasks = [\"toy\"]\nlangs = [\"en\"]\nmethods = [\"base\"]\n").unwrap();
    assert_user_error(
        &f.cli(&["run", p.to_str().unwrap(), "--dry-run"]),
        &["/no/such/model"],
    );
}

// Item 10: the smaller messages.
#[test]
fn item10_messages_name_the_key_the_file_and_the_way_on() {
    let f = Fixture::new();
    for v in ["nan", "inf", "-inf"] {
        let o = f.train_lora_k(&f.path("r"), &["--set", &format!("lr={v}")]);
        assert_user_error(&o, &["`lr`", "not a finite number"]);
    }
    let exp = f.experiment("ten", "[\"lora-k\"]", "ks = [4]\n[train]\nlr = nan\n");
    assert_user_error(
        &f.cli(&["run", exp.to_str().unwrap(), "--dry-run"]),
        &["`lr`", "not a finite number"],
    );
    // An empty dataset file.
    let empty = spoiled_data(&f, "no-rows", |df| *df = df.head(Some(0)));
    let o = mlbench(&[
        "--data-dir",
        empty.to_str().unwrap(),
        "data",
        "describe",
        "--task",
        "toy",
    ]);
    assert_user_error(&o, &["toy.parquet", "no rows"]);
    // A corrupt per-cell file is named by its own path.
    let store = f.path("store");
    let grid = f.experiment("ten-b", "[\"base\"]", "seeds = [0, 1]\n[eval]\nshots = 1\n");
    let o = f.cli(&[
        "run",
        grid.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
        "--shard",
        "0/1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let key = cells_in(&store).into_iter().next_back().unwrap();
    let bad = store.join("cells").join(&key).join("metrics.parquet");
    std::fs::write(&bad, b"PAR1 garbage").unwrap();
    let o = f.cli(&["compare", "--store", store.to_str().unwrap()]);
    assert_user_error(&o, &[bad.to_str().unwrap()]);
    // An interrupted grid says how to go on (rerun the command; `run` has no --resume).
    let long = f.experiment(
        "ten-c",
        "[\"meta-lora\"]",
        "ks = [4]\n[train]\nmeta_iterations = 100000\nn_support = 1\nn_query = 1\n",
    );
    let store = f.path("store-c");
    let child = spawn_run(&f, &long, &store, &[]);
    let pid = child.id() as i32;
    let t0 = std::time::Instant::now();
    while !store.join("work").exists() && t0.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    std::thread::sleep(std::time::Duration::from_millis(1500));
    // SAFETY: signalling our own child process.
    unsafe {
        libc::kill(pid, libc::SIGINT);
    }
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("rerun the same `mlbench run` command") && !err.contains("--resume"),
        "{err}"
    );
    // The signal is acknowledged at once, with what the stop waits for.
    assert_eq!(err.matches("mlbench: stopping cleanly").count(), 1, "{err}");
}

/// Runs `mlbench` as the fixture's CLI with extra environment variables.
fn cli_env(f: &Fixture, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_mlbench"));
    c.args(["--data-dir", f.data.to_str().unwrap()])
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("SLURM_ARRAY_TASK_ID")
        .env_remove("SLURM_ARRAY_TASK_COUNT")
        .env_remove("SLURM_ARRAY_TASK_MIN")
        .env_remove("SLURM_ARRAY_TASK_MAX");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

#[test]
fn a_slurm_array_task_runs_its_shard_and_the_tasks_cover_the_grid_once() {
    let f = Fixture::new();
    let exp = f.experiment(
        "slurm",
        "[\"base\"]",
        "seeds = [0, 1, 2]\n[eval]\nshots = 1\n",
    );
    let store = f.path("store");
    let mut total = 0;
    // An array 4-6: task ids from SLURM_ARRAY_TASK_MIN, the count from MIN and MAX.
    for id in ["4", "5", "6"] {
        let o = cli_env(
            &f,
            &[
                "run",
                exp.to_str().unwrap(),
                "--store",
                store.to_str().unwrap(),
            ],
            &[
                ("SLURM_ARRAY_TASK_ID", id),
                ("SLURM_ARRAY_TASK_MIN", "4"),
                ("SLURM_ARRAY_TASK_MAX", "6"),
            ],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(
            stderr(&o).contains(&format!(
                "shard {}/3 from the Slurm array",
                id.parse::<u32>().unwrap() - 4
            )),
            "{}",
            stderr(&o)
        );
        let out = stdout(&o);
        let n: usize = out
            .split(": ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(n, 1, "{out}");
        total += n;
        // A task of an array does not compact: the other tasks may still be running.
        assert!(!store.join("parts").exists());
    }
    assert_eq!(total, 3);
    assert_eq!(cells_in(&store).len(), 3);
}

#[test]
fn long_work_prints_progress_lines_when_stderr_is_not_a_terminal() {
    let f = Fixture::new();
    let out = f.path("run");
    let args = [
        "train",
        "--method",
        "lora-k",
        "--model",
        f.model.to_str().unwrap(),
        "--task",
        "toy",
        "--langs",
        "en,fr",
        "--k",
        "4",
        "--set",
        "passes=2",
        "--out",
        out.to_str().unwrap(),
    ];
    let o = cli_env(&f, &args, &[("MLBENCH_PROGRESS_SECS", "0")]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("train: ") && l.contains("eta"))
        .collect();
    assert!(lines.len() >= 2, "{}", stderr(&o));
    assert!(lines.iter().any(|l| l.contains("loss")), "{lines:?}");
    // --quiet keeps it silent.
    let out2 = f.path("run2");
    let mut quiet = vec!["-q"];
    quiet.extend(args.iter().map(|a| {
        if *a == out.to_str().unwrap() {
            out2.to_str().unwrap()
        } else {
            a
        }
    }));
    let o = cli_env(&f, &quiet, &[("MLBENCH_PROGRESS_SECS", "0")]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("eta"), "{}", stderr(&o));
}

#[test]
fn a_resumed_grid_estimates_what_is_left_from_the_cells_it_ran_itself() {
    let f = Fixture::new();
    let store = f.path("store");
    let run = |seeds: &str| {
        let exp = f.experiment(
            "eta",
            "[\"base\"]",
            &format!("seeds = {seeds}\n[eval]\nshots = 1\n"),
        );
        let args = [
            "run",
            exp.to_str().unwrap(),
            "--store",
            store.to_str().unwrap(),
        ];
        let o = cli_env(&f, &args, &[("MLBENCH_PROGRESS_SECS", "0")]);
        assert!(o.status.success(), "{}", stderr(&o));
        stderr(&o)
    };
    run("[0, 1]");
    // Seeds 0 and 1 are finished and pass in no time: the first cell this process runs has no
    // timed cell behind it, so the estimate is unknown rather than "no time at all".
    let err = run("[0, 1, 2, 3]");
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("cells: ")).collect();
    let first = lines.iter().find(|l| l.contains("cells: 2/4")).expect(&err);
    assert!(first.contains("eta ?"), "{lines:?}");
    let last = lines.iter().find(|l| l.contains("cells: 3/4")).expect(&err);
    assert!(!last.contains("eta ?") && last.contains(" s:"), "{lines:?}");
    // The evaluation reports its items too, not only that it started.
    assert!(
        lines.iter().any(|l| l.contains("base/full/s3 eval toy/")),
        "{lines:?}"
    );
}

#[test]
fn a_cell_key_names_the_model_weights_not_only_the_path() {
    let f = Fixture::new();
    let exp = f.experiment("ident", "[\"base\"]", "");
    let key = || {
        mlbench::plan::grid::Experiment::load(&exp)
            .unwrap()
            .cells()
            .unwrap()[0]
            .key
            .clone()
    };
    let before = key();
    assert_eq!(before, key(), "the same weights, the same key");
    // Other random weights at the same path (a `model tiny` folder where the real model was).
    std::thread::sleep(std::time::Duration::from_millis(20));
    mlbench::model::tiny::write_tiny(mlbench::model::config::Arch::Llama, &f.model, 1).unwrap();
    assert_ne!(before, key());
}
