//! The model commands end to end on tiny models, and every bad input of the model issue:
//! unknown architecture, missing tensors, shape mismatches, a tokenizer that does not fit, corrupt
//! safetensors/GGUF files, pickled weights, a requests file with a bad line — exit status 2 and a
//! message naming the thing.

mod common;

use std::path::Path;

use common::*;

fn tiny(arch: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let o = mlbench(&[
        "--quiet",
        "model",
        "tiny",
        "--arch",
        arch,
        "--out",
        d.path().to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    d
}

fn info(dir: &Path) -> std::process::Output {
    mlbench(&["--quiet", "model", "info", "--model", dir.to_str().unwrap()])
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(p, serde_json::to_vec(&v).unwrap()).unwrap();
}

#[test]
fn score_and_generate_run_end_to_end() {
    let m = tiny("gemma3");
    let work = tempfile::tempdir().unwrap();
    let reqs = work.path().join("r.jsonl");
    std::fs::write(&reqs, "{\"context\": \"the cat\", \"continuation\": \" sat\"}\n\n{\"context\": \"\", \"continuation\": \"hello\"}\n").unwrap();
    let ad = work.path().join("adapter");
    let o = mlbench(&[
        "--quiet",
        "adapter",
        "init",
        "--model",
        m.path().to_str().unwrap(),
        "--out",
        ad.to_str().unwrap(),
        "--r",
        "4",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = work.path().join("scores.jsonl");
    let o = mlbench(&[
        "--quiet",
        "score",
        "--model",
        m.path().to_str().unwrap(),
        "--adapter",
        ad.to_str().unwrap(),
        "--requests",
        reqs.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for l in &lines {
        assert!(
            l["logprob"].as_f64().unwrap() < 0.0
                && l["tokens"].as_u64().unwrap() >= 1
                && l["greedy"].is_boolean(),
            "{l}"
        );
    }
    let o = mlbench(&[
        "--quiet",
        "generate",
        "--model",
        m.path().to_str().unwrap(),
        "--prompt",
        "the",
        "--max-tokens",
        "5",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let g: serde_json::Value = serde_json::from_str(stdout(&o).lines().next().unwrap()).unwrap();
    assert!(g["completion"].is_string());
}

#[test]
fn requests_file_with_a_bad_line_is_named() {
    let m = tiny("llama");
    let work = tempfile::tempdir().unwrap();
    let reqs = work.path().join("r.jsonl");
    std::fs::write(
        &reqs,
        "{\"context\": \"a\", \"continuation\": \" b\"}\n{\"context\": \"a\"}\n",
    )
    .unwrap();
    let o = mlbench(&[
        "score",
        "--model",
        m.path().to_str().unwrap(),
        "--requests",
        reqs.to_str().unwrap(),
    ]);
    assert_user_error(&o, &["r.jsonl:2", "continuation"]);
}

#[test]
fn unknown_architecture_is_refused() {
    let m = tiny("llama");
    edit_config(m.path(), |v| v["model_type"] = "mamba".into());
    assert_user_error(
        &info(m.path()),
        &["unknown architecture `mamba`", "config.json"],
    );
}

#[test]
fn missing_tensor_and_shape_mismatch_are_named() {
    let m = tiny("gemma3");
    let p = m.path().join("model.safetensors");
    let mut t = mlbench::model::lora::read_safetensors(&p, &candle_core::Device::Cpu).unwrap();
    t.retain(|(n, _)| n != "model.layers.1.self_attn.k_norm.weight");
    mlbench::model::load::save_safetensors(&p, &t.into_iter().collect()).unwrap();
    assert_user_error(
        &info(m.path()),
        &["missing tensor `model.layers.1.self_attn.k_norm.weight`"],
    );

    let m = tiny("llama");
    edit_config(m.path(), |v| v["intermediate_size"] = 96.into());
    assert_user_error(
        &info(m.path()),
        &[
            "model.layers.0.mlp.gate_proj.weight",
            "has shape [128, 64]",
            "[96, 64]",
        ],
    );
}

#[test]
fn a_tokenizer_of_another_model_is_refused() {
    let g = tiny("gemma3");
    let l = tiny("llama");
    std::fs::copy(
        g.path().join("tokenizer.json"),
        l.path().join("tokenizer.json"),
    )
    .unwrap();
    assert_user_error(&info(l.path()), &["tokenizer", "do not belong together"]);
}

#[test]
fn corrupt_weight_files_are_refused() {
    let m = tiny("qwen2");
    let p = m.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    // A header that claims a huge length.
    let mut bad = bytes.clone();
    bad[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&p, &bad).unwrap();
    assert_user_error(
        &info(m.path()),
        &["model.safetensors", "not a valid safetensors file"],
    );
    // Truncated data.
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    assert_user_error(
        &info(m.path()),
        &["model.safetensors", "not a valid safetensors file"],
    );
    // Pickled weights only.
    std::fs::remove_file(&p).unwrap();
    std::fs::write(m.path().join("pytorch_model.bin"), b"not even pickle").unwrap();
    assert_user_error(&info(m.path()), &["pickled"]);
}

#[test]
fn corrupt_gguf_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("m.gguf");
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&u64::MAX.to_le_bytes()); // tensor count
    b.extend_from_slice(&1u64.to_le_bytes());
    std::fs::write(&f, &b).unwrap();
    let out = d.path().join("out");
    let o = mlbench(&[
        "model",
        "import",
        "--gguf",
        f.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_user_error(&o, &["m.gguf", "not a valid GGUF file"]);
    assert!(!out.exists());
    std::fs::write(&f, b"definitely not gguf").unwrap();
    let o = mlbench(&[
        "model",
        "import",
        "--gguf",
        f.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_user_error(&o, &["not a valid GGUF file"]);
    // A GGUF path given where a folder is expected.
    let o = mlbench(&["model", "info", "--model", f.to_str().unwrap()]);
    assert_user_error(&o, &["GGUF file", "model import"]);
}

#[test]
fn a_cuda_device_without_cuda_is_a_clear_error() {
    if cfg!(feature = "cuda") {
        return;
    }
    let m = tiny("llama");
    let o = mlbench(&[
        "model",
        "info",
        "--model",
        m.path().to_str().unwrap(),
        "--device",
        "cuda",
    ]);
    assert_user_error(&o, &["built without CUDA", "--features cuda"]);
}

#[test]
fn hub_ids_resolve_from_the_cache_offline_and_fail_fast_when_absent() {
    let m = tiny("llama");
    let home = tempfile::tempdir().unwrap();
    let repo = home.path().join("hub").join("models--acme--tiny-llama");
    let snap = repo.join("snapshots").join("0123abcd");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), "0123abcd").unwrap();
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::fs::copy(m.path().join(f), snap.join(f)).unwrap();
    }
    let run = |id: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_mlbench"))
            .args(["--quiet", "model", "info", "--model", id])
            .env("HF_HOME", home.path())
            .env("HF_HUB_OFFLINE", "1")
            .env("HF_TOKEN", "hf_secret_should_never_print")
            .output()
            .unwrap()
    };
    let o = run("acme/tiny-llama");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("Llama"));
    let t0 = std::time::Instant::now();
    let o = run("acme/absent-model");
    assert_user_error(
        &o,
        &[
            "HF_HUB_OFFLINE",
            "models--acme--absent-model",
            "config.json",
        ],
    );
    assert!(
        t0.elapsed().as_secs() < 20,
        "offline must not wait on the network"
    );
    for out in [stdout(&o), stderr(&o)] {
        assert!(!out.contains("hf_secret"), "the token leaked: {out}");
    }
}
