//! The trainers on tiny models: the masked loss against a hand computation, gradient
//! accumulation, the meta-gradient against its definition, stage2-only against multi-task LoRA,
//! learnability, determinism, bit-exact resumption after an interruption, and which settings
//! each method reads.

mod common;

use common::test_device;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Tensor};
use mlbench::model::config::Arch;
use mlbench::model::lora::Adapter;
use mlbench::model::transformer::{Ctx, Model};
use mlbench::model::{tiny, LoadedModel};
use mlbench::plan::TrainConfig;
use mlbench::train::checkpoint::LogRow;
use mlbench::train::data::TaskUnit;
use mlbench::train::loops::{
    copy_adapter, init_adapter, meta_batch, meta_gradient, MetaTask, Progress, Trainer,
};
use mlbench::train::optim::{clip, lr_at, AdamParams, AdamW};
use mlbench::train::step::{grads, Seq};
use mlbench::Error;

fn tiny_model(arch: Arch) -> (tempfile::TempDir, LoadedModel) {
    let dir = tempfile::tempdir().unwrap();
    tiny::write_tiny(arch, dir.path(), 0).unwrap();
    let m = mlbench::model::load_dir(dir.path(), DType::F32, &test_device()).unwrap();
    (dir, m)
}

/// A synthetic task: prompt `[p0 + a, p1 + b, p2 + c]` (a, b, c from a seeded stream), answer
/// `[40 + (a % classes)]`, so the answer is a function of the first prompt token.
fn synth_unit(name: &str, n: usize, seed: u64, classes: u32) -> TaskUnit {
    let mut rng = mlbench::util::Rng::new(seed);
    let seqs: Vec<Seq> = (0..n)
        .map(|i| {
            let a = (i as u32) % 8;
            let b = rng.below(10) as u32;
            let c = rng.below(10) as u32;
            let extra = rng.below(3) as usize; // lengths differ, so batches need padding
            let mut prompt = vec![60 + a, 80 + b];
            prompt.extend(std::iter::repeat_n(100 + c, extra));
            Seq::build(&prompt, &[40 + a % classes], 64, false).0
        })
        .collect();
    TaskUnit {
        name: name.into(),
        task: name.split('/').next().unwrap().into(),
        langs: vec![],
        examples: vec![],
        seqs,
        truncated: 0,
        longest: 0,
    }
}

fn base_cfg(method: &str) -> TrainConfig {
    TrainConfig {
        method: mlbench::plan::Method::parse(method).unwrap(),
        model: "tiny".into(),
        tasks: vec!["synth".into()],
        langs: vec!["all".into()],
        k: Some(16),
        lora_dropout: 0.0,
        ..TrainConfig::default()
    }
}

fn vals(a: &Adapter) -> Vec<Vec<f32>> {
    a.vars()
        .iter()
        .map(|v| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect()
}

fn max_diff(a: &[Tensor], b: &[Tensor]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            (x - y)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        })
        .fold(0.0, f64::max)
}

/// An adapter whose B is non-zero, so every LoRA weight gets a gradient.
fn trained_like(m: &Model, cfg: &TrainConfig) -> Adapter {
    let a = init_adapter(m, cfg, "t").unwrap();
    let mut rng = mlbench::util::Rng::new(7);
    for p in a.pairs.values() {
        let n = p.b.elem_count();
        let v: Vec<f32> = (0..n)
            .map(|_| (rng.next_f64() as f32 - 0.5) * 0.2)
            .collect();
        p.b.set(&Tensor::from_vec(v, p.b.dims(), &test_device()).unwrap())
            .unwrap();
    }
    a
}

fn run(
    m: &Model,
    cfg: &TrainConfig,
    units: &[TaskUnit],
    out: &Path,
    resume: bool,
    stop_at: Option<usize>,
) -> mlbench::Result<mlbench::train::loops::Summary> {
    let stop = AtomicBool::new(false);
    let mut progress = |p: &Progress| {
        if Some(p.step) == stop_at {
            stop.store(true, Ordering::SeqCst);
        }
    };
    let mut t = Trainer {
        model: m,
        cfg,
        units,
        out,
        stop: &stop,
        progress: &mut progress,
        config_hash: mlbench::train::run::config_hash(cfg).unwrap(),
        dev: None,
    };
    t.run(resume)
}

#[test]
fn early_stopping_keeps_the_best_dev_checkpoint_of_a_planted_dev_curve() {
    let (_d, lm) = tiny_model(Arch::Llama);
    let m = &lm.model;
    let units = vec![synth_unit("t/a", 16, 1, 3)];
    let cfg = TrainConfig {
        method: mlbench::plan::Method::LoraFull,
        model: "tiny".into(),
        tasks: vec!["t".into()],
        langs: vec!["a".into()],
        k: None,
        batch_size: 2,
        micro_batch: 2,
        passes: 2.0,
        lr: 5e-3,
        eval_every: 2,
        patience: 2,
        ..Default::default()
    };
    // 16 examples, two passes, batches of 2: 16 steps, a dev evaluation every 2. The planted
    // curve peaks at the second evaluation (step 4), then two evaluations without a gain stop
    // the run after step 8.
    let planted = [0.30, 0.60, 0.55, 0.58, 0.90, 0.95, 0.99, 0.99];
    let seen = std::cell::RefCell::new(Vec::<Adapter>::new());
    let mut calls = 0usize;
    let mut dev = |a: &Adapter| -> mlbench::Result<f64> {
        seen.borrow_mut().push(copy_adapter(a)?);
        calls += 1;
        Ok(planted[calls - 1])
    };
    let out = tempfile::tempdir().unwrap();
    let stop = AtomicBool::new(false);
    let mut progress = |_: &Progress| {};
    let summary = {
        let mut t = Trainer {
            model: m,
            cfg: &cfg,
            units: &units,
            out: out.path(),
            stop: &stop,
            progress: &mut progress,
            config_hash: mlbench::train::run::config_hash(&cfg).unwrap(),
            dev: Some(&mut dev),
        };
        t.run(false).unwrap()
    };
    assert_eq!(
        calls, 4,
        "stopped after patience = 2 evaluations without a gain"
    );
    assert_eq!(summary.steps, 8, "the steps actually run");
    assert_eq!(summary.dev_best, Some((4, 0.60)));
    let devs: Vec<(u64, f64)> = summary
        .log
        .iter()
        .filter(|r| r.stage == "dev")
        .map(|r| (r.step, r.dev.unwrap()))
        .collect();
    assert_eq!(devs, vec![(2, 0.30), (4, 0.60), (6, 0.55), (8, 0.58)]);
    // The run's adapter is the one scored at step 4, not the last one.
    let saved = Adapter::load_peft(
        &out.path().join("adapter"),
        "x",
        &m.modules(),
        DType::F32,
        &test_device(),
    )
    .unwrap();
    let best = &seen.borrow()[1];
    let last = &seen.borrow()[3];
    let dist = |a: &Adapter, b: &Adapter| mlbench::train::loops::distance(a, b).unwrap();
    assert!(dist(&saved, best) < 1e-6, "{}", dist(&saved, best));
    assert!(
        dist(&saved, last) > 1e-4,
        "the last adapter differs from the best"
    );
}

fn outer_losses(log: &[LogRow], stage: &str) -> Vec<f64> {
    log.iter()
        .filter(|r| r.stage == stage)
        .map(|r| r.loss)
        .collect()
}

/// Step options as the loops use them (shared prefixes on, the default).
fn step_opts(micro: usize, dropout_seed: u64) -> mlbench::train::step::StepOptions {
    mlbench::train::step::StepOptions {
        micro,
        dropout_seed,
        share_prefix: true,
    }
}

#[test]
fn masked_loss_is_the_answer_token_mean_and_ignores_padding_and_micro_batches() {
    let (_d, lm) = tiny_model(Arch::Llama);
    let m = &lm.model;
    let cfg = base_cfg("lora-k");
    let ad = trained_like(m, &cfg);
    let seqs = [
        Seq::build(&[5, 6, 7, 8, 9], &[10, 11], 64, false).0,
        Seq::build(&[12, 13], &[14, 15, 16], 64, false).0,
        Seq::build(&[17, 18, 19], &[20], 64, false).0,
    ];
    let refs: Vec<&Seq> = seqs.iter().collect();
    // Hand computation: each sequence alone, unpadded; log-softmax at the positions before the
    // answer tokens only, in f64; mean over the 6 answer tokens.
    let mut nll = 0f64;
    for s in &seqs {
        let h = m
            .hidden(
                std::slice::from_ref(&s.ids),
                &[vec![1; s.ids.len()]],
                &Ctx::eval(Some(&ad)),
            )
            .unwrap();
        let rows: Vec<u32> = (s.answer_start - 1..s.ids.len() - 1)
            .map(|r| r as u32)
            .collect();
        let logits: Vec<Vec<f32>> = m.logits_at(&h, &rows).unwrap().to_vec2().unwrap();
        for (row, &target) in logits.iter().zip(&s.ids[s.answer_start..]) {
            let mx = row.iter().fold(f64::MIN, |a, &b| a.max(b as f64));
            let lse = mx + row.iter().map(|&x| (x as f64 - mx).exp()).sum::<f64>().ln();
            nll += lse - row[target as usize] as f64;
        }
    }
    let want = nll / 6.0;
    let whole = grads(m, &ad, &refs, step_opts(3, 1)).unwrap();
    let micro = grads(m, &ad, &refs, step_opts(1, 1)).unwrap();
    assert_eq!(whole.tokens, 6);
    assert!((whole.loss - want).abs() < 1e-5, "{} vs {want}", whole.loss);
    assert!((micro.loss - want).abs() < 1e-5, "{} vs {want}", micro.loss);
    let d = max_diff(&whole.grads, &micro.grads);
    assert!(d < 1e-5, "accumulated gradients differ by {d}");
    let norm = mlbench::train::optim::global_norm(&whole.grads).unwrap();
    assert!(norm > 1e-3, "the gradient is not trivially zero ({norm})");
}

#[test]
fn meta_gradient_is_the_query_gradient_at_the_adapted_weights() {
    let (_d, lm) = tiny_model(Arch::Llama);
    let m = &lm.model;
    let mut cfg = base_cfg("meta-lora");
    cfg.inner_steps = 2;
    cfg.inner_lr = 0.5;
    let units = vec![synth_unit("a/x", 16, 1, 4), synth_unit("b/y", 16, 2, 4)];
    let theta = trained_like(m, &cfg);
    let tasks: Vec<MetaTask> = (0..2)
        .map(|u| MetaTask {
            unit: u,
            support: units[u].seqs[..4].iter().collect(),
            query: units[u].seqs[4..8].iter().collect(),
        })
        .collect();
    let mg = meta_gradient(m, &theta, &tasks, &units, &cfg, 0).unwrap();
    // On its own: adapt a copy by hand (p <- p - lr g, twice), then the query gradient there.
    let mut want: Vec<Tensor> = Vec::new();
    for t in &tasks {
        let copy = copy_adapter(&theta).unwrap();
        for _ in 0..2 {
            let g = grads(m, &copy, &t.support, step_opts(8, 0)).unwrap();
            for (v, g) in copy.vars().iter().zip(&g.grads) {
                v.set(&(v.as_tensor() - (g * 0.5).unwrap()).unwrap())
                    .unwrap();
            }
        }
        let gq = grads(m, &copy, &t.query, step_opts(8, 0)).unwrap();
        want = if want.is_empty() {
            gq.grads
        } else {
            want.iter()
                .zip(&gq.grads)
                .map(|(a, b)| (a + b).unwrap())
                .collect()
        };
    }
    let want: Vec<Tensor> = want.iter().map(|g| (g / 2.0).unwrap()).collect();
    let d = max_diff(&mg.grads, &want);
    assert!(d < 1e-5, "meta-gradient differs from its definition by {d}");
    // The inner steps matter: the gradient at theta itself is different.
    let at_theta = grads(m, &theta, &tasks[0].query, step_opts(8, 0)).unwrap();
    let single = meta_gradient(m, &theta, &tasks[..1], &units, &cfg, 0).unwrap();
    assert!(max_diff(&single.grads, &at_theta.grads) > 1e-4);
    // theta itself was not touched by the inner steps.
    let fresh = trained_like(m, &cfg);
    assert_eq!(vals(&theta), vals(&fresh));
}

#[test]
fn stage2_only_equals_multitask_lora_on_the_same_query_batches() {
    let (_d, lm) = tiny_model(Arch::Llama);
    let m = &lm.model;
    let mut cfg = base_cfg("stage2-only");
    cfg.meta_iterations = Some(6);
    cfg.lr = 5e-3;
    cfg.micro_batch = 8;
    cfg.batch_size = 8;
    let units = vec![
        synth_unit("a/x", 16, 1, 4),
        synth_unit("b/y", 16, 2, 4),
        synth_unit("c/z", 16, 3, 4),
    ];
    let out = tempfile::tempdir().unwrap();
    let s = run(m, &cfg, &units, out.path(), false, None).unwrap();
    let meta_losses = outer_losses(&s.log, "outer");
    // Multi-task LoRA by hand: each step's batch is the union of that step's query sets (every
    // answer is one token, so the token mean equals the mean of the tasks' means).
    let theta = init_adapter(m, &cfg, "ref").unwrap();
    let vars = theta.vars();
    let mut opt = AdamW::new(
        &vars,
        AdamParams {
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
        },
    )
    .unwrap();
    let mut ref_losses = Vec::new();
    for step in 0..6 {
        let tasks = meta_batch(&units, &cfg, step).unwrap();
        assert!(
            tasks.iter().all(|t| t.support.is_empty()),
            "s = 0 trains on no support set"
        );
        // The ablation's query batches are meta-lora's at the same settings, item for item.
        let with_stage1 = TrainConfig {
            method: mlbench::plan::Method::MetaLora,
            ..cfg.clone()
        };
        let meta_tasks = meta_batch(&units, &with_stage1, step).unwrap();
        let ids = |ts: &[MetaTask]| -> Vec<(usize, Vec<Vec<u32>>)> {
            ts.iter()
                .map(|t| (t.unit, t.query.iter().map(|q| q.ids.clone()).collect()))
                .collect()
        };
        assert_eq!(
            ids(&tasks),
            ids(&meta_tasks),
            "step {step}: other query sets"
        );
        assert!(meta_tasks.iter().all(|t| t.support.len() == cfg.n_support));
        let mut union: Vec<&Seq> = tasks.iter().flat_map(|t| t.query.clone()).collect();
        union.sort_by_key(|s| s.ids.len());
        let mut g = grads(m, &theta, &union, step_opts(64, 0)).unwrap();
        ref_losses.push(g.loss);
        clip(&mut g.grads, cfg.clip).unwrap();
        opt.step(&vars, &g.grads, lr_at(step, 6, cfg.warmup, cfg.lr))
            .unwrap();
    }
    assert_eq!(meta_losses.len(), 6);
    for (i, (a, b)) in meta_losses.iter().zip(&ref_losses).enumerate() {
        assert!((a - b).abs() < 1e-5, "step {i}: {a} vs {b}");
    }
    assert!(
        ref_losses[5] < ref_losses[0],
        "the steps make progress: {ref_losses:?}"
    );
    let got = Adapter::load_peft(
        &out.path().join("adapter"),
        "got",
        &m.modules(),
        DType::F32,
        &test_device(),
    )
    .unwrap();
    let g: Vec<Tensor> = got.vars().iter().map(|v| v.as_tensor().clone()).collect();
    let r: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let d = max_diff(&g, &r);
    assert!(d < 1e-6, "final adapters differ by {d}");
}

#[test]
fn the_tiny_model_learns_a_synthetic_task() {
    // Bound: the answer is one of 4 tokens, determined by the first prompt token; a model that
    // has learnt nothing is at about ln(vocab) and one that only learnt the 4-way prior at
    // ln 4 = 1.39. Training must bring the mean loss of the last 5 steps below 0.3.
    let (_d, lm) = tiny_model(Arch::Llama);
    let m = &lm.model;
    let mut cfg = base_cfg("lora-k");
    cfg.lr = 2e-2;
    cfg.passes = 40.0;
    cfg.lora_mlp = true;
    cfg.warmup = 0.1;
    let units = vec![synth_unit("synth/x", 16, 5, 4)];
    let out = tempfile::tempdir().unwrap();
    let s = run(m, &cfg, &units, out.path(), false, None).unwrap();
    let l = outer_losses(&s.log, "train");
    let first = l[0];
    let last: f64 = l[l.len() - 5..].iter().sum::<f64>() / 5.0;
    assert!(first > 1.39, "starts above the prior: {first}");
    assert!(
        last < 0.3,
        "loss after {} steps: {last} (first {first})",
        l.len()
    );
}

#[test]
fn same_seed_gives_byte_identical_adapters_and_resume_continues_exactly() {
    let (_d, lm) = tiny_model(Arch::Gemma3);
    let m = &lm.model;
    let units = vec![synth_unit("a/x", 16, 1, 4), synth_unit("b/y", 16, 2, 4)];
    for method in ["meta-lora", "lora-k", "lora-per-task-k", "meta-lora+tta"] {
        let mut cfg = base_cfg(method);
        cfg.lora_dropout = 0.1; // dropout masks must be reproduced too
        cfg.meta_iterations = Some(6);
        cfg.passes = 3.0;
        cfg.micro_batch = 4;
        cfg.checkpoint_every = 0;
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let c = tempfile::tempdir().unwrap();
        let sa = run(m, &cfg, &units, a.path(), false, None).unwrap();
        run(m, &cfg, &units, b.path(), false, None).unwrap();
        assert!(
            !adapter_files(a.path()).is_empty(),
            "{method}: no adapter written"
        );
        assert_eq!(
            adapter_files(a.path()),
            adapter_files(b.path()),
            "{method}: same seed, other bytes"
        );
        // Interrupted after step 3 (for per-task methods, in the first unit), then resumed.
        let err = run(m, &cfg, &units, c.path(), false, Some(3)).unwrap_err();
        assert!(
            matches!(err, Error::Interrupted { step: 3, .. }),
            "{method}: {err}"
        );
        assert!(c.path().join("checkpoint/state.json").exists());
        let sc = run(m, &cfg, &units, c.path(), true, None).unwrap();
        assert_eq!(
            adapter_files(a.path()),
            adapter_files(c.path()),
            "{method}: resumed run differs"
        );
        assert_eq!(sa.log.len(), sc.log.len(), "{method}: log rows");
        for (x, y) in sa.log.iter().zip(&sc.log) {
            assert_eq!(
                (x.step, &x.stage, x.loss),
                (y.step, &y.stage, y.loss),
                "{method}"
            );
        }
        assert_eq!(sa.seen, sc.seen, "{method}: counts");
        assert!(
            !c.path().join("checkpoint").exists(),
            "a finished run drops its checkpoint"
        );
        // Another seed gives another adapter.
        let d = tempfile::tempdir().unwrap();
        let mut other = cfg.clone();
        other.seed = 1;
        run(m, &other, &units, d.path(), false, None).unwrap();
        assert_ne!(
            adapter_files(a.path()),
            adapter_files(d.path()),
            "{method}: seed ignored"
        );
    }
}

#[test]
fn per_task_methods_write_one_adapter_per_task_from_the_same_init() {
    let (_d, lm) = tiny_model(Arch::Llama);
    let m = &lm.model;
    let units = vec![synth_unit("a/x", 16, 1, 4), synth_unit("b/y", 16, 2, 4)];
    let mut cfg = base_cfg("stage1-only");
    cfg.inner_lr = 0.1;
    let out = tempfile::tempdir().unwrap();
    let s = run(m, &cfg, &units, out.path(), false, None).unwrap();
    let init = init_adapter(m, &cfg, "i").unwrap();
    let mut adapted = Vec::new();
    for u in ["a.x", "b.y"] {
        let a = Adapter::load_peft(
            &out.path().join("adapters").join(u),
            u,
            &m.modules(),
            DType::F32,
            &test_device(),
        )
        .unwrap();
        assert_ne!(vals(&a), vals(&init), "{u}: not adapted");
        adapted.push(vals(&a));
    }
    assert_ne!(adapted[0], adapted[1], "each task adapts on its own pool");
    // stage1-only: exactly inner_steps adaptation steps per task, loss falling.
    let a_rows: Vec<f64> = s
        .log
        .iter()
        .filter(|r| r.task == "a/x" && r.stage == "adapt")
        .map(|r| r.loss)
        .collect();
    assert_eq!(a_rows.len(), cfg.inner_steps);
    assert!(a_rows[2] < a_rows[0], "{a_rows:?}");
    assert!(
        !out.path().join("adapter").exists(),
        "stage1-only has no shared adapter"
    );
}

/// The adapters a run writes under `dir`: (sub-folder, safetensors bytes), in path order.
fn adapter_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut subs = vec![dir.join("adapter")];
    if let Ok(rd) = std::fs::read_dir(dir.join("adapters")) {
        subs.extend(rd.map(|e| e.unwrap().path()));
    }
    let mut v: Vec<(String, Vec<u8>)> = subs
        .iter()
        .filter_map(|s| {
            let bytes = std::fs::read(s.join("adapter_model.safetensors")).ok()?;
            Some((s.strip_prefix(dir).unwrap().display().to_string(), bytes))
        })
        .collect();
    v.sort();
    v
}

/// What the setup block lists is what the method read: changing a key
/// [`settings_read`](mlbench::plan::train::settings_read) lists for a method changes the
/// adapters it writes, changing any other of the listed-somewhere keys leaves them
/// byte-identical (stage2-only ignores the inner rate, stage1-only the outer one, ...).
#[test]
fn the_settings_a_method_reads_are_the_ones_that_change_its_adapters() {
    type Change = fn(&mut TrainConfig);
    let (_d, lm) = tiny_model(Arch::Llama);
    let m = &lm.model;
    let units = vec![synth_unit("a/x", 16, 1, 4), synth_unit("b/y", 16, 2, 4)];
    let changes: &[(&str, Change)] = &[
        ("lr", |c| c.lr *= 3.0),
        ("passes", |c| c.passes += 1.0),
        ("batch_size", |c| c.batch_size = 4),
        ("inner_lr", |c| c.inner_lr *= 3.0),
        ("inner_steps", |c| c.inner_steps -= 1),
        ("n_support", |c| c.n_support -= 1),
        ("n_query", |c| c.n_query -= 1),
        ("tasks_per_batch", |c| c.tasks_per_batch = Some(1)),
        ("meta_iterations", |c| c.meta_iterations = Some(1)),
    ];
    // Every listed key is changed here, except those the trainer does not see on these units:
    // the cap and the unit shape the units, max_len their sequences, eval_every needs a dev set.
    let untested = ["full_cap", "eval_every", "patience", "max_len", "unit"];
    for k in mlbench::plan::train::SETTING_KEYS {
        assert!(
            changes.iter().any(|(c, _)| c == k) || untested.contains(k),
            "{k}: not checked"
        );
    }
    for method in [
        "lora-full",
        "lora-k",
        "lora-per-task-k",
        "meta-lora",
        "meta-lora+tta",
        "stage1-only",
        "stage2-only",
    ] {
        let mut cfg = base_cfg(method);
        cfg.passes = 2.0;
        cfg.micro_batch = 4;
        cfg.checkpoint_every = 0;
        if method == "lora-full" {
            cfg.k = None;
        }
        let adapters = |c: &TrainConfig| {
            let out = tempfile::tempdir().unwrap();
            run(m, c, &units, out.path(), false, None).unwrap();
            adapter_files(out.path())
        };
        let before = adapters(&cfg);
        assert!(!before.is_empty(), "{method}: no adapter written");
        let reads = mlbench::plan::train::settings_read(cfg.method);
        for (key, change) in changes {
            let mut c = cfg.clone();
            change(&mut c);
            assert_eq!(
                adapters(&c) != before,
                reads.contains(key),
                "{method}: changing {key} {} the adapters, but settings_read says it is {}read",
                if reads.contains(key) {
                    "left"
                } else {
                    "changed"
                },
                if reads.contains(key) { "" } else { "not " }
            );
        }
    }
}
