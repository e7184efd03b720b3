//! `mlbench train` end to end on a tiny model and a toy dataset: every method writes loadable
//! PEFT adapters, a manifest and a step log; a TOML config equals the same flags; Ctrl-C
//! checkpoints and `--resume` finishes with the uninterrupted bytes; a diverging run stops with a
//! clear message; bad configurations are refused before training with every problem listed.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use candle_core::{DType, Device};
use common::*;
use mlbench::model::lora::Adapter;

struct Setup {
    _tmp: tempfile::TempDir,
    data: PathBuf,
    model: PathBuf,
    root: PathBuf,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let data = root.join("data");
    std::fs::create_dir_all(data.join("tasks")).unwrap();
    let mut rows = toy_examples("toy", &["eng_Latn", "fra_Latn"], 3, 8, "train");
    rows.extend(toy_examples("toy", &["eng_Latn", "fra_Latn"], 3, 2, "test"));
    for r in rows.iter_mut().filter(|r| r.split == "test") {
        r.id = format!("t{}", r.id);
    }
    write_dataset(&data, "toy", &rows);
    // A task whose data has no train split.
    write_dataset(
        &data,
        "evalonly",
        &toy_examples("evalonly", &["eng_Latn"], 2, 4, "test"),
    );
    std::fs::write(data.join("tasks/toy.toml"), TOY_SPEC).unwrap();
    std::fs::write(
        data.join("tasks/evalonly.toml"),
        TOY_SPEC.replace("\"toy\"", "\"evalonly\""),
    )
    .unwrap();
    let model = root.join("tiny");
    let o = mlbench(&[
        "model",
        "tiny",
        "--arch",
        "gemma3",
        "--out",
        model.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    Setup {
        _tmp: tmp,
        data,
        model,
        root,
    }
}

fn train_args<'a>(s: &'a Setup, method: &'a str, out: &'a str) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "--data-dir".into(),
        s.data.to_str().unwrap().into(),
        "-q".into(),
        "train".into(),
        "--method".into(),
        method.into(),
        "--model".into(),
        s.model.to_str().unwrap().into(),
        "--task".into(),
        "toy".into(),
        "--langs".into(),
        "en,fr".into(),
        "--out".into(),
        s.root.join(out).to_str().unwrap().into(),
        "--set".into(),
        "meta_iterations=3".into(),
        "--set".into(),
        "passes=1".into(),
    ];
    if method != "lora-full" {
        v.extend(["--k".into(), "8".into()]);
    }
    v
}

fn run_train(args: &[String]) -> Output {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    mlbench(&a)
}

fn load(dir: &Path, model: &Path) -> Adapter {
    let m = mlbench::model::load_dir(model, DType::F32, &Device::Cpu).unwrap();
    Adapter::load_peft(dir, "x", &m.model.modules(), DType::F32, &Device::Cpu).unwrap()
}

fn b_norm(a: &Adapter) -> f64 {
    a.pairs
        .values()
        .map(|p| {
            p.b.as_tensor()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        })
        .sum::<f64>()
        .sqrt()
}

#[test]
fn every_method_trains_and_writes_loadable_adapters_a_manifest_and_a_log() {
    let s = setup();
    let v = mlbench(&["--version"]);
    assert!(v.status.success(), "{}", stderr(&v));
    let version = String::from_utf8_lossy(&v.stdout).trim_end().to_string();
    for (method, shared, per_task) in [
        ("lora-full", true, false),
        ("lora-k", true, false),
        ("lora-per-task-k", false, true),
        ("meta-lora", true, false),
        ("meta-lora+tta", true, true),
        ("stage1-only", false, true),
        ("stage2-only", true, false),
    ] {
        let out = format!("runs/{method}");
        let o = run_train(&train_args(&s, method, &out));
        assert!(o.status.success(), "{method}: {}", stderr(&o));
        let dir = s.root.join(&out);
        let mut dirs = Vec::new();
        if shared {
            dirs.push(dir.join("adapter"));
        }
        if per_task {
            dirs.push(dir.join("adapters/toy.eng_Latn"));
            dirs.push(dir.join("adapters/toy.fra_Latn"));
        }
        assert_eq!(dir.join("adapter").exists(), shared, "{method}");
        for d in &dirs {
            let a = load(d, &s.model);
            assert!(b_norm(&a) > 0.0, "{method}: {} did not move", d.display());
        }
        let man: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
        assert_eq!(man["method"], method);
        assert_eq!(man["config"]["seed"], 0);
        let units = man["units"].as_array().unwrap();
        assert_eq!(units.len(), 2, "{method}");
        let n_ids = units[0]["ids"].as_array().unwrap().len();
        assert_eq!(
            n_ids,
            if method == "lora-full" { 24 } else { 8 },
            "{method}"
        );
        assert!(units[0]["seen"]["tokens"].as_u64().unwrap() > 0, "{method}");
        assert!(man["wall_seconds"].as_f64().unwrap() > 0.0);
        assert!(man["code_version"]
            .as_str()
            .unwrap()
            .starts_with("mlbench "));
        // `--version` names the same build the manifest (and a cell's key) records, so a pinned
        // binary can be checked against its commit before a grid runs.
        assert_eq!(version, man["code_version"].as_str().unwrap(), "{method}");
        let log = mlbench::data::schema::read_parquet(&dir.join("log.parquet")).unwrap();
        assert!(log.height() > 0, "{method}: empty log");
        for c in [
            "step",
            "task",
            "stage",
            "loss",
            "lr",
            "grad_norm",
            "tokens_per_s",
        ] {
            assert!(log.column(c).is_ok(), "{method}: log lacks {c}");
        }
        assert!(
            !dir.join("checkpoint").exists(),
            "{method}: checkpoint left behind"
        );
    }
    // Every K method saw the same pools for the seed.
    let ids = |m: &str| -> serde_json::Value {
        let man: serde_json::Value = serde_json::from_slice(
            &std::fs::read(s.root.join(format!("runs/{m}/manifest.json"))).unwrap(),
        )
        .unwrap();
        man["units"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["ids"].clone())
            .collect()
    };
    assert_eq!(ids("lora-k"), ids("meta-lora"));
    assert_eq!(ids("lora-k"), ids("stage1-only"));
    // meta-lora+tta's shared adapter is meta-lora's, to the byte (the runner trains it once
    // for both cells).
    let shared = |m: &str| {
        std::fs::read(
            s.root
                .join(format!("runs/{m}/adapter/adapter_model.safetensors")),
        )
        .unwrap()
    };
    assert!(shared("meta-lora") == shared("meta-lora+tta"));
}

#[test]
fn a_toml_config_is_the_same_as_flags() {
    let s = setup();
    let o = run_train(&train_args(&s, "meta-lora", "flags"));
    assert!(o.status.success(), "{}", stderr(&o));
    let toml = format!(
        "method = \"meta-lora\"\nmodel = {:?}\ntasks = [\"toy\"]\nlangs = [\"en\", \"fr\"]\nk = 8\nmeta_iterations = 3\npasses = 1.0\n",
        s.model.to_str().unwrap()
    );
    let cfg = s.root.join("run.toml");
    std::fs::write(&cfg, toml).unwrap();
    let out = s.root.join("file");
    let o = mlbench(&[
        "--data-dir",
        s.data.to_str().unwrap(),
        "-q",
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let a = std::fs::read(s.root.join("flags/adapter/adapter_model.safetensors")).unwrap();
    let b = std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(a, b);
    // An unknown key in the file is named.
    std::fs::write(&cfg, "method = \"meta-lora\"\ninner_stpes = 3\n").unwrap();
    let o = mlbench(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_user_error(&o, &["inner_stpes"]);
    // Every unknown key and wrong type of every source at once, each named with its source.
    std::fs::write(
        &cfg,
        "method = \"meta-lora\"\ninner_stpes = 3\nlr = \"fast\"\ndevice = \"gpu\"\n",
    )
    .unwrap();
    let o = mlbench(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--method",
        "lora-kk",
        "--set",
        "pases=2",
    ]);
    let file = cfg.display().to_string();
    assert_user_error(
        &o,
        &[
            &format!("{file}: unknown key `inner_stpes` (did you mean inner_steps?)"),
            &format!("{file}: `lr` = \"fast\""),
            &format!("{file}: `device` = \"gpu\": unknown device `gpu`"),
            "--method: `method` = \"lora-kk\": unknown method `lora-kk`",
            "--set: unknown key `pases` (did you mean passes?)",
        ],
    );
}

#[test]
fn ctrl_c_checkpoints_and_resume_gives_the_uninterrupted_bytes() {
    let s = setup();
    let mut args = train_args(&s, "meta-lora", "whole");
    args.extend(["--set".into(), "meta_iterations=40".into()]);
    let o = run_train(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut args = train_args(&s, "meta-lora", "cut");
    args.extend([
        "--set".into(),
        "meta_iterations=40".into(),
        "--set".into(),
        "checkpoint_every=1".into(),
    ]);
    let child = Command::new(env!("CARGO_BIN_EXE_mlbench"))
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ck = s.root.join("cut/checkpoint/state.json");
    let t0 = std::time::Instant::now();
    while !ck.exists() {
        assert!(t0.elapsed().as_secs() < 120, "no checkpoint appeared");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // A scheduler's SIGTERM (Ctrl-C's SIGINT goes to the same handler), and the same request
    // again a moment later, as GNU `timeout -s INT` delivers it (to the child, then to its
    // process group): one request, so the run still checkpoints rather than dying at once.
    // SAFETY: signalling our own child process.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGINT);
    }
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(
        err.contains("interrupted at step") && err.contains("--resume"),
        "{err}"
    );
    // With -q the signal is not acknowledged (without it, tests/reliability.rs sees the line).
    assert!(!err.contains("mlbench: stopping cleanly"), "{err}");
    assert!(!s.root.join("cut/manifest.json").exists());
    // Without --resume the folder is refused; with it the run finishes.
    let o = run_train(&args);
    assert_user_error(&o, &["already holds a run", "--resume"]);
    let mut resume = args.clone();
    resume.push("--resume".into());
    let o = run_train(&resume);
    assert!(o.status.success(), "{}", stderr(&o));
    let a = std::fs::read(s.root.join("whole/adapter/adapter_model.safetensors")).unwrap();
    let b = std::fs::read(s.root.join("cut/adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(a, b, "the resumed run differs from the uninterrupted one");
    // A finished run is not resumed again.
    let o = run_train(&resume);
    assert_user_error(&o, &["already complete"]);
}

#[test]
fn a_diverging_run_stops_with_a_clear_message_and_keeps_the_last_checkpoint() {
    let s = setup();
    let mut args = train_args(&s, "lora-k", "nan");
    args.extend([
        "--set".into(),
        "lr=1e30".into(),
        "--set".into(),
        "clip=0".into(),
        "--set".into(),
        "passes=4".into(),
        "--set".into(),
        "checkpoint_every=1".into(),
    ]);
    let o = run_train(&args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("the loss is NaN") || err.contains("the loss is inf"),
        "{err}"
    );
    assert!(err.contains("last good checkpoint"), "{err}");
    assert!(s.root.join("nan/checkpoint/state.json").exists());
    assert!(!s.root.join("nan/manifest.json").exists());
}

#[test]
fn bad_configurations_are_refused_before_training_with_every_problem_listed() {
    let s = setup();
    // Unknown method, with a suggestion.
    let mut a = train_args(&s, "meta-lroa", "bad1");
    let o = run_train(&a);
    assert_user_error(&o, &["unknown method `meta-lroa`", "meta-lora"]);
    // Several problems at once: support + query > K, a bad lr, a bad language.
    a = train_args(&s, "meta-lora", "bad2");
    a.extend(
        [
            "--set",
            "n_support=6",
            "--set",
            "n_query=4",
            "--set",
            "lr=-1",
        ]
        .map(String::from),
    );
    let o = run_train(&a);
    assert_user_error(
        &o,
        &[
            "n_support (6) + n_query (4) = 10 is larger than k = 8",
            "lr must be",
        ],
    );
    // K larger than a pool; a task without a train split for lora-full.
    let mut a = train_args(&s, "lora-k", "bad3");
    let k = a.iter().position(|x| x == "--k").unwrap();
    a[k + 1] = "50".into();
    let o = run_train(&a);
    assert_user_error(
        &o,
        &[
            "k = 50 is larger than the 24 examples of toy/eng_Latn",
            "toy/fra_Latn",
        ],
    );
    let mut a = train_args(&s, "lora-full", "bad4");
    let t = a.iter().position(|x| x == "toy").unwrap();
    a[t] = "toy,evalonly".into();
    let l = a.iter().position(|x| x == "en,fr").unwrap();
    a[l] = "en".into();
    let o = run_train(&a);
    assert_user_error(
        &o,
        &["task `evalonly` has no `train` split", "(it has: test)"],
    );
    // lora-full with --k, and no model.
    let mut a = train_args(&s, "lora-full", "bad5");
    a.extend(["--k".into(), "8".into()]);
    let m = a.iter().position(|x| x == "--model").unwrap();
    a.drain(m..m + 2);
    let o = run_train(&a);
    assert_user_error(&o, &["drop --k 8", "no model"]);
    for d in ["bad1", "bad2", "bad3", "bad4", "bad5"] {
        assert!(
            !s.root.join("runs").join(d).exists() && !s.root.join(d).exists(),
            "{d} was written"
        );
    }
}

/// The number of compute threads changes how products split their rows, never their sums:
/// MeTA-LoRA with 1, 2 and 3 threads writes the same adapter bits and step-log losses.
#[test]
fn meta_lora_gives_the_same_bits_with_any_number_of_threads() {
    let s = setup();
    let mut outs = Vec::new();
    for threads in ["1", "2", "3"] {
        let out = format!("threads{threads}");
        let a = train_args(&s, "meta-lora", &out);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_mlbench"))
            .args(&a)
            .env_remove("MLBENCH_DATA")
            .env("RAYON_NUM_THREADS", threads)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        outs.push(
            std::fs::read(s.root.join(&out).join("adapter/adapter_model.safetensors")).unwrap(),
        );
    }
    assert!(outs[0] == outs[1] && outs[0] == outs[2]);
    // The step logs agree on every loss (their `seconds` columns do not).
    let losses = |t: &str| -> Vec<f64> {
        use polars::prelude::{ParquetReader, SerReader};
        let df =
            ParquetReader::new(std::fs::File::open(s.root.join(t).join("log.parquet")).unwrap())
                .finish()
                .unwrap();
        df.column("loss")
            .unwrap()
            .f64()
            .unwrap()
            .into_no_null_iter()
            .collect()
    };
    assert_eq!(losses("threads1"), losses("threads2"));
    assert_eq!(losses("threads1"), losses("threads3"));
}

#[test]
fn a_set_flag_the_method_does_not_read_is_named() {
    let s = setup();
    // The shared arguments set meta_iterations, which lora-k does not read.
    let mut a = train_args(&s, "lora-k", "unread");
    a.push("--print-config".into());
    let o = run_train(&a);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("--set meta_iterations: `lora-k` does not read it"),
        "{}",
        stderr(&o)
    );
    assert!(!stderr(&o).contains("--set passes"), "{}", stderr(&o));
    let mut a = train_args(&s, "meta-lora", "read");
    a.push("--print-config".into());
    let o = run_train(&a);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("does not read"), "{}", stderr(&o));
}
