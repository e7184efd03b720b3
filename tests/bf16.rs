//! `--matmul bf16`: frozen-weight products on AMX tiles. The precision is a process-wide
//! setting, so this file is its own test binary with one test that switches it (tests of one
//! binary share the process). On a CPU without AMX the switch must be refused (library error,
//! CLI exit status 2); with AMX, bf16 logits and LoRA gradients must stay close to f32 without
//! being identical to them (which would mean the bf16 path never ran).

mod common;

use candle_core::{DType, Tensor};
use common::*;
use mlbench::model::config::Arch;
use mlbench::model::kernels::{matmul_precision, set_matmul_precision, MatmulPrecision};
use mlbench::model::lora::{Adapter, LoraConfig, Targets};
use mlbench::model::transformer::{Ctx, Model};
use mlbench::model::{amx, load_dir, tiny};
use mlbench::util::Rng;

fn logits(m: &Model, ids: &[u32], ad: &Adapter) -> Vec<f32> {
    let t = ids.len();
    let h = m
        .hidden(&[ids.to_vec()], &[vec![1; t]], &Ctx::eval(Some(ad)))
        .unwrap();
    let rows: Vec<u32> = (0..t as u32).collect();
    m.logits_at(&h, &rows)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// LoRA gradients of the mean next-token loss, flattened in a fixed module order.
fn lora_grads(m: &Model, ids: &[u32], ad: &Adapter) -> Vec<f32> {
    let t = ids.len() - 1;
    let mut rng = Rng::new(5);
    let h = m
        .hidden(
            &[ids[..t].to_vec()],
            &[vec![1; t]],
            &Ctx::train(ad, &mut rng),
        )
        .unwrap();
    let rows: Vec<u32> = (0..t as u32).collect();
    let loss = m.loss_at(&h, &rows, &ids[1..]).unwrap();
    let g = loss.backward().unwrap();
    let mut names: Vec<&String> = ad.pairs.keys().collect();
    names.sort();
    let mut out = Vec::new();
    for n in names {
        let p = &ad.pairs[n];
        for v in [&p.a, &p.b] {
            out.extend(
                g.get(v.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            );
        }
    }
    out
}

/// Largest |a - b| relative to the largest |a|.
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
        / scale
}

#[test]
fn bf16_products_stay_close_to_f32_or_are_refused_without_amx() {
    if !amx::available() {
        assert!(set_matmul_precision(MatmulPrecision::Bf16).is_err());
        assert_eq!(matmul_precision(), MatmulPrecision::F32);
        let o = mlbench(&["--matmul", "bf16", "tasks", "ls"]);
        assert_user_error(&o, &["AMX"]);
        eprintln!("no AMX here: only the refusal was checked");
        return;
    }
    // Without AMX (here forced by MLBENCH_NO_AMX), the command line refuses bf16 products.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_mlbench"))
        .args(["--matmul", "bf16", "tasks", "ls"])
        .env("MLBENCH_NO_AMX", "1")
        .output()
        .unwrap();
    assert_user_error(&o, &["AMX"]);
    let device = test_device();
    for arch in [Arch::Gemma3, Arch::Llama, Arch::Qwen2] {
        let dir = tempfile::tempdir().unwrap();
        tiny::write_tiny(arch, dir.path(), 0).unwrap();
        let m = load_dir(dir.path(), DType::F32, &device).unwrap().model;
        let cfg = LoraConfig {
            r: 4,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            target_modules: Targets::List(
                ["q_proj", "v_proj", "down_proj"].map(String::from).to_vec(),
            ),
            use_rslora: false,
            base_model_name_or_path: None,
        };
        let ad = Adapter::new("t", cfg, &m.modules(), 3, DType::F32, &device).unwrap();
        // A trained-looking adapter: B random too, so gradients reach A.
        let mut rng = Rng::new(9);
        for p in ad.pairs.values() {
            let (o, r) = p.b.dims2().unwrap();
            let v: Vec<f32> = (0..o * r)
                .map(|_| rng.next_f64() as f32 * 0.2 - 0.1)
                .collect();
            p.b.set(&Tensor::from_vec(v, (o, r), &device).unwrap())
                .unwrap();
        }
        let ids: Vec<u32> = (0..12)
            .map(|i| (i * 7 + 3) % m.config.vocab_size as u32)
            .collect();

        set_matmul_precision(MatmulPrecision::F32).unwrap();
        let (l32, g32) = (logits(&m, &ids, &ad), lora_grads(&m, &ids, &ad));
        set_matmul_precision(MatmulPrecision::Bf16).unwrap();
        assert!(mlbench::util::code_version().ends_with("matmul=bf16"));
        let (l16, g16) = (logits(&m, &ids, &ad), lora_grads(&m, &ids, &ad));
        set_matmul_precision(MatmulPrecision::F32).unwrap();

        // bf16 keeps 8 significant bits per input: ~1.4e-3 (logits) and ~4e-3 (gradients)
        // measured on these models; the bounds leave a factor of about five.

        let (dl, dg) = (rel_diff(&l32, &l16), rel_diff(&g32, &g16));
        eprintln!("{arch:?}: logits {dl:.2e}, gradients {dg:.2e}");
        assert!(dl > 0.0 && dl < 0.01, "{arch:?}: logits differ by {dl}");
        assert!(
            dg > 0.0 && dg < 0.02,
            "{arch:?}: LoRA gradients differ by {dg}"
        );
        // The probabilities agree on the top token almost everywhere.
        let v = m.config.vocab_size;
        let argmax = |l: &[f32]| -> Vec<usize> {
            l.chunks(v)
                .map(|r| {
                    r.iter()
                        .enumerate()
                        .fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b })
                        .0
                })
                .collect()
        };
        let same = argmax(&l32)
            .iter()
            .zip(argmax(&l16))
            .filter(|(a, b)| **a == *b)
            .count();
        assert!(
            same * 10 >= ids.len() * 9,
            "{arch:?}: {same}/{} argmax agree",
            ids.len()
        );

        // The command line: `--matmul bf16` reaches the model (scores move a little).
        let reqs = dir.path().join("r.jsonl");
        std::fs::write(
            &reqs,
            "{\"context\": \"the cat\", \"continuation\": \" sat on\"}\n",
        )
        .unwrap();
        let score = |mm: &str| -> f64 {
            let out = dir.path().join(format!("s_{mm}.jsonl"));
            let o = mlbench(&[
                "--quiet",
                "--matmul",
                mm,
                "score",
                "--model",
                dir.path().to_str().unwrap(),
                "--requests",
                reqs.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ]);
            assert!(o.status.success(), "{}", stderr(&o));
            let line = std::fs::read_to_string(&out).unwrap();
            let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
            v["logprob"].as_f64().unwrap()
        };
        let (a, b) = (score("f32"), score("bf16"));
        assert!(
            a != b && (a - b).abs() < 0.05 * a.abs().max(1.0),
            "{arch:?}: {a} vs {b}"
        );
    }
}
