//! Parity with the PyTorch reference: golden values from transformers + PEFT for the tiny
//! models (made by `scripts/reference/golden.py`, see its doc for versions and the command),
//! with the adapter written by PEFT's own `save_pretrained`.

mod common;

use common::test_device;

use std::path::PathBuf;

use candle_core::DType;
use mlbench::model::config::Arch;
use mlbench::model::lora::Adapter;
use mlbench::model::score::{score_requests, Request};
use mlbench::model::transformer::Ctx;
use mlbench::model::{load_dir, tiny};
use serde_json::Value;

fn fixture(arch: &str) -> (PathBuf, Value) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/golden")
        .join(arch);
    let g: Value =
        serde_json::from_slice(&std::fs::read(dir.join("golden.json")).unwrap()).unwrap();
    (dir, g)
}

fn as_u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn tiny_models_match_transformers_and_peft() {
    for (name, arch) in [
        ("gemma3", Arch::Gemma3),
        ("llama", Arch::Llama),
        ("qwen2", Arch::Qwen2),
    ] {
        let (fdir, g) = fixture(name);
        let tmp = tempfile::tempdir().unwrap();
        tiny::write_tiny(arch, tmp.path(), 0).unwrap();
        let sha = mlbench::util::sha256_file(&tmp.path().join("model.safetensors")).unwrap();
        assert_eq!(
            sha,
            g["model_sha256"].as_str().unwrap(),
            "{name}: the tiny model changed; rerun scripts/reference/golden.py"
        );
        let m = load_dir(tmp.path(), DType::F32, &test_device()).unwrap();
        let ids = m.tok.encode(g["text"].as_str().unwrap()).unwrap();
        assert_eq!(
            ids,
            as_u32s(&g["ids"]),
            "{name}: tokenizer disagrees with HF tokenizers"
        );
        let adapter = Adapter::load_peft(
            &fdir.join("adapter"),
            "peft",
            &m.model.modules(),
            DType::F32,
            &test_device(),
        )
        .unwrap();
        assert_eq!(adapter.pairs.len(), 2 * 7);
        let t = ids.len();
        let rows: Vec<u32> = as_u32s(&g["positions"]);
        for (key, ad) in [("base_logits", None), ("adapted_logits", Some(&adapter))] {
            let h = m
                .model
                .hidden(std::slice::from_ref(&ids), &[vec![1; t]], &Ctx::eval(ad))
                .unwrap();
            let got: Vec<Vec<f32>> = m.model.logits_at(&h, &rows).unwrap().to_vec2().unwrap();
            let want = g[key].as_array().unwrap();
            let mut worst = 0f64;
            for (r, w) in got.iter().zip(want) {
                for (a, b) in r.iter().zip(w.as_array().unwrap()) {
                    worst = worst.max((f64::from(*a) - b.as_f64().unwrap()).abs());
                }
            }
            assert!(
                worst < 1e-4,
                "{name} {key}: max |diff| {worst} against transformers"
            );
        }
        let reqs: Vec<Request> = g["requests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| Request {
                context: r["context"].as_str().unwrap().into(),
                continuation: r["continuation"].as_str().unwrap().into(),
            })
            .collect();
        let scores = score_requests(&m.model, &m.tok, Some(&adapter), &reqs, 2, 512).unwrap();
        for (s, r) in scores.iter().zip(g["requests"].as_array().unwrap()) {
            let (c, k) = m
                .tok
                .encode_pair(
                    r["context"].as_str().unwrap(),
                    r["continuation"].as_str().unwrap(),
                )
                .unwrap();
            assert_eq!(c, as_u32s(&r["context_ids"]), "{name}: context ids");
            assert_eq!(
                k,
                as_u32s(&r["continuation_ids"]),
                "{name}: continuation ids"
            );
            let want = r["logprob"].as_f64().unwrap();
            assert!(
                (s.logprob - want).abs() < 1e-4,
                "{name}: logprob {} vs reference {want}",
                s.logprob
            );
            assert_eq!(
                s.greedy,
                r["greedy"].as_bool().unwrap(),
                "{name}: greedy flag"
            );
            assert_eq!(s.tokens, k.len());
        }
    }
}
