//! The decoder and LoRA on tiny random models of each architecture: agreement with an
//! independent naive implementation, fresh-adapter identity, finite-difference gradients,
//! merge, PEFT round trip and strict loading, padding and batch invariance.

mod common;

#[path = "common/naive.rs"]
mod naive;

use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use common::*;
use mlbench::model::config::{Arch, LayerKind};
use mlbench::model::lora::{Adapter, LoraConfig, Targets};
use mlbench::model::score::{score_ids, Pad};
use mlbench::model::transformer::{Ctx, Model};
use mlbench::model::{load_dir, tiny, LoadedModel};
use mlbench::util::Rng;

const ARCHS: [Arch; 3] = [Arch::Gemma3, Arch::Llama, Arch::Qwen2];

fn tiny_model(arch: Arch, dtype: DType) -> (tempfile::TempDir, LoadedModel) {
    let dir = tempfile::tempdir().unwrap();
    tiny::write_tiny(arch, dir.path(), 0).unwrap();
    let m = load_dir(dir.path(), dtype, &test_device()).unwrap();
    (dir, m)
}

fn all_targets() -> LoraConfig {
    LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.0,
        target_modules: Targets::List(
            [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ]
            .map(String::from)
            .to_vec(),
        ),
        use_rslora: false,
        base_model_name_or_path: None,
    }
}

/// An adapter whose B is random too (a trained-looking adapter).
fn random_adapter(m: &Model, seed: u64) -> Adapter {
    let ad = Adapter::new("t", all_targets(), &m.modules(), seed, m.dtype, &m.device).unwrap();
    let mut rng = Rng::new(seed + 100);
    for p in ad.pairs.values() {
        let (o, r) = p.b.dims2().unwrap();
        let v: Vec<f64> = (0..o * r).map(|_| rng.next_f64() * 0.2 - 0.1).collect();
        p.b.set(
            &Tensor::from_vec(v, (o, r), &m.device)
                .unwrap()
                .to_dtype(m.dtype)
                .unwrap(),
        )
        .unwrap();
    }
    ad
}

fn logits_all(m: &Model, ids: &[u32], ad: Option<&Adapter>) -> Vec<Vec<f64>> {
    let t = ids.len();
    let h = m
        .hidden(&[ids.to_vec()], &[vec![1; t]], &Ctx::eval(ad))
        .unwrap();
    let rows: Vec<u32> = (0..t as u32).collect();
    let l = m
        .logits_at(&h, &rows)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    l.to_vec2().unwrap()
}

fn max_abs_diff(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn sample_ids(m: &LoadedModel) -> Vec<u32> {
    m.tok
        .encode("the cat sat on the mat, and then it rained in the morning.")
        .unwrap()
}

#[test]
fn decoder_matches_the_naive_reference() {
    for arch in ARCHS {
        let (_d, m) = tiny_model(arch, DType::F64);
        let tensors = tiny::tiny_tensors(&tiny::tiny_config(arch), 0).unwrap();
        let ids = sample_ids(&m);
        assert!(ids.len() > 8, "the sliding window (4) must be exceeded");
        let mut naive = naive::Naive::new(m.model.config.clone(), &tensors);
        let got = logits_all(&m.model, &ids, None);
        let want = naive.logits(&ids);
        let d = max_abs_diff(&got, &want);
        assert!(
            d < 1e-9,
            "{arch:?}: base logits differ from the naive reference by {d}"
        );
        let ad = random_adapter(&m.model, 1);
        for (name, p) in &ad.pairs {
            naive.add_lora(name, p.a.as_tensor(), p.b.as_tensor(), ad.config.scaling());
        }
        let d = max_abs_diff(&logits_all(&m.model, &ids, Some(&ad)), &naive.logits(&ids));
        assert!(
            d < 1e-9,
            "{arch:?}: LoRA logits differ from the naive reference by {d}"
        );
    }
}

/// The f32 inference path (fused CPU kernels: gated activation, rms-norm, rope, softmax)
/// against the f64 path (plain candle ops, checked against the naive reference above) on the
/// same weights.
#[test]
fn f32_inference_kernels_match_the_f64_path() {
    for arch in ARCHS {
        let (_d32, m32) = tiny_model(arch, DType::F32);
        let (_d64, m64) = tiny_model(arch, DType::F64);
        let ids = sample_ids(&m32);
        let a = logits_all(&m32.model, &ids, None);
        let b = logits_all(&m64.model, &ids, None);
        let mut worst = 0f64;
        for (ra, rb) in a.iter().zip(&b) {
            for (x, y) in ra.iter().zip(rb) {
                worst = worst.max((x - y).abs() / y.abs().max(1.0));
            }
        }
        assert!(
            worst < 1e-4,
            "{arch:?}: f32 and f64 logits differ by {worst}"
        );
    }
}

#[test]
fn fresh_adapter_is_exactly_the_base_model() {
    for arch in ARCHS {
        let (_d, m) = tiny_model(arch, DType::F32);
        let ids = sample_ids(&m);
        let ad = Adapter::new(
            "fresh",
            LoraConfig::default(),
            &m.model.modules(),
            3,
            DType::F32,
            &test_device(),
        )
        .unwrap();
        assert_eq!(
            logits_all(&m.model, &ids, None),
            logits_all(&m.model, &ids, Some(&ad)),
            "{arch:?}"
        );
    }
}

/// Negative summed log-probability of `ids[1..]` given the prefixes.
fn nll(m: &Model, ids: &[u32], ctx: &Ctx) -> Tensor {
    let t = ids.len();
    let h = m
        .hidden(&[ids[..t - 1].to_vec()], &[vec![1; t - 1]], ctx)
        .unwrap();
    let rows: Vec<u32> = (0..(t - 1) as u32).collect();
    let lp = candle_nn::ops::log_softmax(&m.logits_at(&h, &rows).unwrap(), D::Minus1).unwrap();
    let tg = Tensor::from_vec(ids[1..].to_vec(), (t - 1, 1), &m.device).unwrap();
    lp.gather(&tg, 1).unwrap().sum_all().unwrap().neg().unwrap()
}

#[test]
fn lora_gradients_match_finite_differences() {
    for arch in ARCHS {
        let (_d, m) = tiny_model(arch, DType::F64);
        let ids = sample_ids(&m);
        let ad = random_adapter(&m.model, 2);
        let mut rng0 = Rng::new(0);
        let loss = nll(&m.model, &ids, &Ctx::train(&ad, &mut rng0));
        let grads = loss.backward().unwrap();
        let mut rng = Rng::new(5);
        let mut checked = 0;
        for (name, p) in ad
            .pairs
            .iter()
            .filter(|(n, _)| n.contains("layers.0") || n.contains("down_proj"))
        {
            for var in [&p.a, &p.b] {
                let g: Vec<f64> = grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("no grad for {name}"))
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let base: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
                for _ in 0..3 {
                    let i = rng.below(base.len() as u64) as usize;
                    let eps = 1e-6;
                    let eval = |delta: f64| -> f64 {
                        let mut v = base.clone();
                        v[i] += delta;
                        var.set(&Tensor::from_vec(v, var.dims(), &test_device()).unwrap())
                            .unwrap();
                        nll(&m.model, &ids, &Ctx::eval(Some(&ad)))
                            .to_scalar::<f64>()
                            .unwrap()
                    };
                    let fd = (eval(eps) - eval(-eps)) / (2.0 * eps);
                    var.set(&Tensor::from_vec(base.clone(), var.dims(), &test_device()).unwrap())
                        .unwrap();
                    let err = (fd - g[i]).abs() / fd.abs().max(g[i].abs()).max(1e-4);
                    assert!(
                        err < 1e-5,
                        "{arch:?} {name}[{i}]: analytic {} vs finite difference {fd}",
                        g[i]
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked >= 18, "{arch:?}: checked {checked}");
    }
}

#[test]
fn merge_equals_unmerged_forward_and_unmerge_restores() {
    for arch in ARCHS {
        let (_d, mut m) = tiny_model(arch, DType::F32);
        let ids = sample_ids(&m);
        let ad = random_adapter(&m.model, 4);
        let base = logits_all(&m.model, &ids, None);
        let with = logits_all(&m.model, &ids, Some(&ad));
        assert!(max_abs_diff(&base, &with) > 1e-2, "the adapter must matter");
        m.model.merge(&ad).unwrap();
        let merged = logits_all(&m.model, &ids, None);
        // Tolerance: f32 accumulation order differs between W x + s B A x and (W + s B A) x.
        let d = max_abs_diff(&merged, &with);
        assert!(d < 1e-4, "{arch:?}: merged vs unmerged differ by {d}");
        m.model.unmerge(&ad).unwrap();
        let d = max_abs_diff(&logits_all(&m.model, &ids, None), &base);
        assert!(d < 1e-4, "{arch:?}: unmerge left {d}");
    }
}

#[test]
fn peft_round_trip_is_exact() {
    let (_d, m) = tiny_model(Arch::Gemma3, DType::F32);
    let ad = random_adapter(&m.model, 6);
    let dir = tempfile::tempdir().unwrap();
    ad.save_peft(dir.path()).unwrap();
    assert_eq!(
        files_in(dir.path()),
        vec!["adapter_config.json", "adapter_model.safetensors"]
    );
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);
    let back = Adapter::load_peft(
        dir.path(),
        "back",
        &m.model.modules(),
        DType::F32,
        &test_device(),
    )
    .unwrap();
    assert_eq!(back.config, ad.config);
    assert_eq!(
        back.pairs.keys().collect::<Vec<_>>(),
        ad.pairs.keys().collect::<Vec<_>>()
    );
    for (k, p) in &ad.pairs {
        let q = &back.pairs[k];
        for (x, y) in [(&p.a, &q.a), (&p.b, &q.b)] {
            let a: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(a, b, "{k}");
        }
    }
    // Keys are PEFT's.
    let bytes = std::fs::read(dir.path().join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let names = st.names();
    assert!(
        names.contains(&"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"),
        "{names:?}"
    );
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(
        meta.metadata()
            .as_ref()
            .unwrap()
            .get("format")
            .map(String::as_str),
        Some("pt")
    );
}

/// Rewrites an adapter folder's tensors through `edit`, keeping its config.
fn rewrite(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let p = dir.join("adapter_model.safetensors");
    let mut t = mlbench::model::lora::read_safetensors(&p, &Device::Cpu).unwrap();
    edit(&mut t);
    let map: std::collections::BTreeMap<String, Tensor> = t.into_iter().collect();
    mlbench::model::load::save_safetensors(&p, &map).unwrap();
}

#[test]
fn strict_peft_loading_names_the_problem() {
    let (_d, m) = tiny_model(Arch::Llama, DType::F32);
    let ad = random_adapter(&m.model, 7);
    let load = |dir: &Path| {
        Adapter::load_peft(dir, "x", &m.model.modules(), DType::F32, &test_device())
            .unwrap_err()
            .to_string()
    };
    let fresh = || {
        let d = tempfile::tempdir().unwrap();
        ad.save_peft(d.path()).unwrap();
        d
    };
    // A key that matches no module.
    let d = fresh();
    rewrite(d.path(), |t| {
        t[0].0 = t[0].0.replace("layers.0", "layers.9")
    });
    let e = load(d.path());
    assert!(
        e.contains("model.layers.9.") && e.contains("not a linear module"),
        "{e}"
    );
    // A missing partner.
    let d = fresh();
    rewrite(d.path(), |t| {
        let i = t
            .iter()
            .position(|(n, _)| n.ends_with("lora_B.weight"))
            .unwrap();
        t.remove(i);
    });
    let e = load(d.path());
    assert!(e.contains("lora_B.weight") && e.contains("missing"), "{e}");
    // A transposed A.
    let d = fresh();
    rewrite(d.path(), |t| {
        let i = t
            .iter()
            .position(|(n, _)| n.ends_with("lora_A.weight"))
            .unwrap();
        t[i].1 = t[i].1.t().unwrap().contiguous().unwrap();
    });
    let e = load(d.path());
    assert!(
        e.contains("lora_A.weight") && e.contains("transposed"),
        "{e}"
    );
    // Unsupported options are refused by name.
    for (key, val, needle) in [
        ("use_dora", "true", "DoRA"),
        ("bias", "\"all\"", "bias"),
        ("modules_to_save", "[\"lm_head\"]", "modules_to_save"),
    ] {
        let d = fresh();
        let p = d.path().join("adapter_config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        cfg[key] = serde_json::from_str(val).unwrap();
        std::fs::write(&p, serde_json::to_vec(&cfg).unwrap()).unwrap();
        let e = load(d.path());
        assert!(e.contains(needle), "{key}: {e}");
    }
    // Pickled weights are refused.
    let d = tempfile::tempdir().unwrap();
    ad.save_peft(d.path()).unwrap();
    std::fs::rename(
        d.path().join("adapter_model.safetensors"),
        d.path().join("adapter_model.bin"),
    )
    .unwrap();
    assert!(load(d.path()).contains("pickled"));
}

#[test]
fn scores_do_not_depend_on_padding_or_batch() {
    for arch in ARCHS {
        let (_d, m) = tiny_model(arch, DType::F32);
        let texts = [
            "the end",
            "a cat and a dog in the rain",
            "it is on",
            "then the sea rose and the town ate",
        ];
        let reqs: Vec<(Vec<u32>, Vec<u32>)> = texts
            .iter()
            .map(|t| m.tok.encode_pair(t, " then the end.").unwrap())
            .collect();
        let alone: Vec<f64> = reqs
            .iter()
            .map(|r| {
                score_ids(&m.model, None, std::slice::from_ref(r), 1, Pad::Right, 512).unwrap()[0]
                    .logprob
            })
            .collect();
        for pad in [Pad::Left, Pad::Right] {
            let batch = score_ids(&m.model, None, &reqs, 4, pad, 512).unwrap();
            for (a, b) in alone.iter().zip(&batch) {
                assert!(
                    (a - b.logprob).abs() <= 1e-4,
                    "{arch:?} {pad:?}: alone {a} vs batched {}",
                    b.logprob
                );
            }
        }
    }
}

#[test]
fn several_adapters_share_one_base_and_switch_per_call() {
    let (_d, m) = tiny_model(Arch::Llama, DType::F32);
    let ids = sample_ids(&m);
    let a = random_adapter(&m.model, 10);
    let b = random_adapter(&m.model, 11);
    let la = logits_all(&m.model, &ids, Some(&a));
    let lb = logits_all(&m.model, &ids, Some(&b));
    assert!(
        max_abs_diff(&la, &lb) > 1e-3,
        "different adapters give different outputs"
    );
    // Interleaved calls on the same base give each adapter's own outputs, bit for bit.
    assert_eq!(logits_all(&m.model, &ids, Some(&a)), la);
    assert_eq!(
        logits_all(&m.model, &ids, None),
        logits_all(&m.model, &ids, None)
    );
    assert_eq!(logits_all(&m.model, &ids, Some(&b)), lb);
}

#[test]
fn only_a_training_context_builds_a_gradient_graph() {
    let (_d, m) = tiny_model(Arch::Gemma3, DType::F32);
    let ids = sample_ids(&m);
    let t = ids.len();
    let ad = random_adapter(&m.model, 12);
    let eval = m
        .model
        .hidden(
            std::slice::from_ref(&ids),
            &[vec![1; t]],
            &Ctx::eval(Some(&ad)),
        )
        .unwrap();
    assert!(
        !eval.track_op(),
        "eval must not keep a graph (memory) or train by accident"
    );
    let mut rng = Rng::new(0);
    let train = m
        .model
        .hidden(
            std::slice::from_ref(&ids),
            &[vec![1; t]],
            &Ctx::train(&ad, &mut rng),
        )
        .unwrap();
    assert!(train.track_op());
    // Same values either way (dropout is 0 in this adapter): fused and plain kernels agree.
    let a: Vec<f32> = eval.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = train.flatten_all().unwrap().to_vec1().unwrap();
    let d = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(
        d < 1e-4,
        "fused (eval) and differentiable (train) kernels differ by {d}"
    );
}

#[test]
fn fused_training_kernels_give_the_plain_gradients() {
    // f32 on the CPU trains through `layer_train` (each decoder layer one graph node with its
    // backward written out from the fused kernels'); f64 runs plain differentiable ops
    // (checked against finite differences above).
    // With LoRA dropout too: both paths draw the same masks from the same seed.
    for (arch, dropout) in ARCHS.iter().flat_map(|&a| [(a, 0.0), (a, 0.25)]) {
        let (_d64, m64) = tiny_model(arch, DType::F64);
        let (_d32, m32) = tiny_model(arch, DType::F32);
        let ids = sample_ids(&m64);
        let mut ad64 = random_adapter(&m64.model, 13);
        ad64.config.lora_dropout = dropout;
        let mut ad32 = ad64.clone();
        for p in ad32.pairs.values_mut() {
            p.a = candle_core::Var::from_tensor(&p.a.as_tensor().to_dtype(DType::F32).unwrap())
                .unwrap();
            p.b = candle_core::Var::from_tensor(&p.b.as_tensor().to_dtype(DType::F32).unwrap())
                .unwrap();
        }
        let (mut r1, mut r2) = (Rng::new(0), Rng::new(0));
        let g64 = nll(&m64.model, &ids, &Ctx::train(&ad64, &mut r1))
            .backward()
            .unwrap();
        let g32 = nll(&m32.model, &ids, &Ctx::train(&ad32, &mut r2))
            .backward()
            .unwrap();
        for (name, p64) in &ad64.pairs {
            let p32 = &ad32.pairs[name];
            for (v64, v32) in [(&p64.a, &p32.a), (&p64.b, &p32.b)] {
                let a: Vec<f64> = g64
                    .get(v64.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let b: Vec<f32> = g32
                    .get(v32.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let scale = a.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-6);
                let worst = a
                    .iter()
                    .zip(&b)
                    .map(|(x, y)| (x - f64::from(*y)).abs())
                    .fold(0f64, f64::max);
                assert!(
                    worst / scale < 1e-3,
                    "{arch:?} dropout {dropout} {name}: fused f32 gradient off by {worst} (scale {scale})"
                );
            }
        }
    }
}

#[test]
fn cached_decoding_matches_the_full_forward() {
    for arch in ARCHS {
        for dtype in [DType::F64, DType::F32] {
            let (_d, m) = tiny_model(arch, dtype);
            let ids = sample_ids(&m);
            assert!(ids.len() > 8, "the sliding window (4) must be exceeded");
            let ad = random_adapter(&m.model, 3);
            let full = logits_all(&m.model, &ids, Some(&ad));
            // The prompt in one piece, then a chunk of 3, then one token at a time.
            let ctx = Ctx::eval(Some(&ad));
            let mut cache = mlbench::model::transformer::KvCache::default();
            let mut got: Vec<Vec<f64>> = Vec::new();
            let cuts = [0, 5, 8];
            let mut pieces: Vec<&[u32]> = vec![&ids[cuts[0]..cuts[1]], &ids[cuts[1]..cuts[2]]];
            pieces.extend(ids[cuts[2]..].chunks(1));
            for piece in pieces {
                let h = m.model.hidden_cached(piece, &mut cache, &ctx).unwrap();
                let rows: Vec<u32> = (0..piece.len() as u32).collect();
                let l = m.model.logits_at(&h, &rows).unwrap();
                got.extend(l.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap());
            }
            assert_eq!(cache.len(), ids.len());
            let tol = if dtype == DType::F64 { 1e-9 } else { 1e-4 };
            let d = max_abs_diff(&full, &got);
            assert!(d < tol, "{arch:?} {dtype:?}: cached logits differ by {d}");
        }
    }
}

#[test]
fn batched_cached_decoding_matches_each_row_alone() {
    for arch in ARCHS {
        for dtype in [DType::F64, DType::F32] {
            let (_d, m) = tiny_model(arch, dtype);
            let ids = sample_ids(&m);
            let ad = random_adapter(&m.model, 5);
            // Three prompts of different lengths (left-padded to the longest), then three
            // decoding steps feeding the same token to every row.
            let prompts: Vec<Vec<u32>> = vec![ids.clone(), ids[..5].to_vec(), ids[2..9].to_vec()];
            let steps = [ids[1], ids[3], ids[0]];
            let longest = prompts.iter().map(Vec::len).max().unwrap();
            assert!(
                longest - 5 > 4,
                "padding must exceed the sliding window (4)"
            );
            let pads: Vec<usize> = prompts.iter().map(|p| longest - p.len()).collect();
            let ctx = Ctx::eval(Some(&ad));
            let mut cache = mlbench::model::transformer::KvCache::default();
            let padded: Vec<Vec<u32>> = prompts
                .iter()
                .map(|p| {
                    let mut r = vec![7u32; longest - p.len()];
                    r.extend_from_slice(p);
                    r
                })
                .collect();
            // got[b]: logits of row b's real tokens, in order.
            let mut got: Vec<Vec<Vec<f64>>> = vec![Vec::new(); 3];
            let mut feed = padded;
            for step in 0..=steps.len() {
                let h = m
                    .model
                    .hidden_cached_rows(&feed, &pads, &mut cache, &ctx)
                    .unwrap();
                let t = feed[0].len();
                for (b, pad) in pads.iter().enumerate() {
                    let first = if step == 0 { *pad } else { 0 };
                    let rows: Vec<u32> = (first..t).map(|j| (b * t + j) as u32).collect();
                    let l = m.model.logits_at(&h, &rows).unwrap();
                    got[b].extend(l.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap());
                }
                if step < steps.len() {
                    feed = vec![vec![steps[step]]; 3];
                }
            }
            let tol = if dtype == DType::F64 { 1e-9 } else { 1e-4 };
            for (b, p) in prompts.iter().enumerate() {
                let mut whole = p.clone();
                whole.extend_from_slice(&steps);
                let alone = logits_all(&m.model, &whole, Some(&ad));
                let d = max_abs_diff(&alone, &got[b]);
                assert!(
                    d < tol && alone.len() == got[b].len(),
                    "{arch:?} {dtype:?} row {b}: batched cached logits differ by {d}"
                );
            }
            // A cache started with 3 rows refuses a batch of 2.
            let err = m
                .model
                .hidden_cached_rows(&[vec![1], vec![1]], &[0, 0], &mut cache, &ctx)
                .unwrap_err();
            assert!(err.to_string().contains("batch"), "{err}");
        }
    }
}

#[test]
fn batched_generation_equals_one_prompt_at_a_time() {
    use mlbench::model::score::{generate, generate_batch};
    for arch in ARCHS {
        let (_d, m) = tiny_model(arch, DType::F64);
        let ad = random_adapter(&m.model, 9);
        let prompts = [
            "the cat sat on the mat, and then",
            "it rained",
            "in the morning the cat",
        ];
        let until = vec!["mat".to_string()];
        let batch = generate_batch(&m.model, &m.tok, Some(&ad), &prompts, 12, &until).unwrap();
        assert_eq!(batch.len(), prompts.len());
        for (p, got) in prompts.iter().zip(&batch) {
            let alone = generate(&m.model, &m.tok, Some(&ad), p, 12, &until).unwrap();
            assert_eq!(got, &alone, "{arch:?}: prompt {p:?}");
        }
        // Different prompts give at least two different continuations (the check can fail).
        assert!(
            batch.iter().any(|t| t != &batch[0]),
            "{arch:?}: every prompt continued the same way: {batch:?}"
        );
    }
}

/// `row_stats` (the scorers' fused log-sum-exp, argmax and pick) against a plain f64
/// computation, on rows with a wide range of logits, a repeated maximum and a -inf entry.
#[test]
fn row_stats_matches_a_plain_f64_computation() {
    let (n, v) = (7usize, 5_003usize);
    let mut rng = Rng::new(11);
    let mut data: Vec<f32> = (0..n * v)
        .map(|_| ((rng.next_f64() - 0.5) * 60.0) as f32)
        .collect();
    data[2 * v + 10] = 90.0; // row 2: the first of two equal maxima wins
    data[2 * v + 4000] = 90.0;
    data[3 * v + 7] = f32::NEG_INFINITY;
    let logits = Tensor::from_vec(data.clone(), (n, v), &Device::Cpu).unwrap();
    let picks = vec![(0, 0), (2, 10), (6, 5_002), (3, 7), (2, 11)];
    let st = mlbench::model::score::row_stats(&logits, &picks).unwrap();
    for r in 0..n {
        let row = &data[r * v..(r + 1) * v];
        let m = row
            .iter()
            .fold(f64::NEG_INFINITY, |a, &x| a.max(f64::from(x)));
        let lse = m + row
            .iter()
            .map(|&x| (f64::from(x) - m).exp())
            .sum::<f64>()
            .ln();
        assert!(
            (f64::from(st.lse[r]) - lse).abs() < 1e-5 * lse.abs().max(1.0),
            "row {r}: {} vs {lse}",
            st.lse[r]
        );
        let first = row.iter().position(|&x| f64::from(x) == m).unwrap();
        assert_eq!(st.argmax[r] as usize, first, "row {r}");
    }
    assert_eq!(st.argmax[2], 10);
    let want: Vec<f32> = picks
        .iter()
        .map(|&(r, t)| data[r * v + t as usize])
        .collect();
    assert_eq!(st.picked, want);
    // candle's own reductions agree too (the path other devices take).
    let lse_c: Vec<f32> = logits.log_sum_exp(D::Minus1).unwrap().to_vec1().unwrap();
    for (a, b) in st.lse.iter().zip(&lse_c) {
        assert!((a - b).abs() < 1e-4, "{a} vs candle {b}");
    }
    // A pick outside the matrix is an error, not a panic.
    let err = mlbench::model::score::row_stats(&logits, &[(7, 0)]).unwrap_err();
    assert!(err.to_string().contains("outside"), "{err}");
}

/// Gradients of `ad`'s LoRA weights as flat f64 vectors, in `vars()` order.
fn flat_grads(g: &mlbench::train::step::Grads) -> Vec<Vec<f64>> {
    g.grads
        .iter()
        .map(|t| {
            t.to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect()
}

/// The largest difference between two gradient lists, relative to the largest reference value.
fn worst_relative(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    let scale = b
        .iter()
        .flatten()
        .fold(0f64, |m, x| m.max(x.abs()))
        .max(1e-9);
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0f64, f64::max)
        / scale
}

#[test]
fn a_shared_prefix_gives_the_padded_batch_loss_and_gradients() {
    use mlbench::train::step::{grads, Seq, StepOptions};
    // Sequences of different lengths that share 7 tokens before their first difference, with
    // answers of 1 to 3 tokens; one answer starts right after the shared tokens. The tiny Gemma
    // has a sliding window of 4, so its sliding layers cut into the prefix.
    let prefix: Vec<u32> = vec![2, 40, 41, 42, 43, 44, 45];
    let rests: [(&[u32], usize); 4] = [
        (&[50, 51, 52, 60], 3),
        (&[53, 61, 62], 1),
        (&[54, 55, 56, 57, 58, 63, 64, 65], 5),
        (&[66], 0),
    ];
    let seqs: Vec<Seq> = rests
        .iter()
        .map(|(rest, a)| {
            let mut ids = prefix.clone();
            ids.extend_from_slice(rest);
            Seq {
                ids,
                answer_start: prefix.len() + a,
            }
        })
        .collect();
    let refs: Vec<&Seq> = seqs.iter().collect();
    // The shared path runs the last layer's queries at the loss rows only; the tiny Gemma's
    // last layer is a full one, so it also runs with the layer kinds swapped (a sliding last
    // layer, whose window cuts into the prefix for those queries).
    let variants = ARCHS
        .iter()
        .map(|&a| (a, false))
        .chain([(Arch::Gemma3, true)]);
    for (arch, swapped) in variants {
        let load = |dtype| {
            let dir = tempfile::tempdir().unwrap();
            tiny::write_tiny(arch, dir.path(), 0).unwrap();
            if swapped {
                let path = dir.path().join("config.json");
                let mut c: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
                c["layer_types"] = serde_json::json!(["full_attention", "sliding_attention"]);
                std::fs::write(&path, c.to_string()).unwrap();
            }
            let m = load_dir(dir.path(), dtype, &test_device()).unwrap();
            (dir, m)
        };
        let (_d64, m64) = load(DType::F64);
        let (_d32, m32) = load(DType::F32);
        assert!(m32.model.shares_prefixes() && !m64.model.shares_prefixes());
        if swapped {
            assert_eq!(m32.model.config.layer_kinds[1], LayerKind::Sliding);
        }
        let ad64 = random_adapter(&m64.model, 7);
        let ad32 = random_adapter(&m32.model, 7);
        let run = |m: &Model, ad: &Adapter, micro: usize, share_prefix: bool| {
            let opt = StepOptions {
                micro,
                dropout_seed: 3,
                share_prefix,
            };
            grads(m, ad, &refs, opt).unwrap()
        };
        let reference = run(&m64.model, &ad64, 4, false);
        let padded = run(&m32.model, &ad32, 4, false);
        let (shared, shared_micro) = (
            run(&m32.model, &ad32, 4, true),
            run(&m32.model, &ad32, 2, true),
        );
        for (what, g) in [
            ("padded f32", &padded),
            ("shared prefix", &shared),
            ("shared prefix, micro-batches of 2", &shared_micro),
        ] {
            assert!(
                (g.loss - padded.loss).abs() < 1e-5,
                "{arch:?} {what}: loss {} vs padded {}",
                g.loss,
                padded.loss
            );
            assert!((g.loss - reference.loss).abs() < 1e-4);
            let against_f64 = worst_relative(&flat_grads(g), &flat_grads(&reference));
            assert!(
                against_f64 < 1e-3,
                "{arch:?} {what}: off the f64 gradient by {against_f64}"
            );
            assert_eq!(
                (g.tokens, g.input_tokens),
                (reference.tokens, reference.input_tokens)
            );
        }
        let against_padded = worst_relative(&flat_grads(&shared), &flat_grads(&padded));
        assert!(
            against_padded < 1e-4,
            "{arch:?}: shared off the padded gradient by {against_padded}"
        );
        // The same seed twice gives the same bits.
        let again = run(&m32.model, &ad32, 4, true);
        assert_eq!(flat_grads(&again), flat_grads(&shared));
    }
}
