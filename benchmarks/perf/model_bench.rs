//! Forward and LoRA train-step throughput of mlbench's decoder on a real model folder.
//!
//! Batch 8 x 128 random token ids (seed 0), LoRA r=8 alpha=16 on q,k,v,o, AdamW (lr 1e-4),
//! no dropout. Reports the median of `--steps` timed steps after 2 warm-up steps, for:
//! forward with logits at every position, a train step with the loss on every position, and a
//! train step with the loss on the last 4 tokens of each row (logits only there).
//! Run: cargo run --release --example model_bench -- models/gemma-3-270m [steps]
//! Device and dtype: MLBENCH_DEVICE=cpu|cuda|cuda:N (default cpu; cuda needs `--features cuda`)
//! and MLBENCH_DTYPE=f32|bf16|f16 (default f32). Base weights and LoRA weights use that dtype.
//! On CUDA every timed step ends with a device synchronize.
//! MLBENCH_MATMUL=bf16 runs the frozen-weight products on AMX tiles (`--matmul bf16`).

use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use mlbench::model::lora::{Adapter, LoraConfig, Targets};
use mlbench::model::transformer::{Ctx, Model};
use mlbench::util::Rng;

const B: usize = 8;
const T: usize = 128;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn loss(
    model: &Model,
    ad: &Adapter,
    ids: &[Vec<u32>],
    last: Option<usize>,
) -> candle_core::Result<Tensor> {
    let mask = vec![vec![1u8; T]; B];
    let inputs: Vec<Vec<u32>> = ids.iter().map(|r| r[..T].to_vec()).collect();
    let mut rng = Rng::new(1);
    let h = model
        .hidden(&inputs, &mask, &Ctx::train(ad, &mut rng))
        .map_err(candle_core::Error::wrap)?;
    let first = last.map_or(0, |k| T - k);
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (b, r) in ids.iter().enumerate() {
        for t in first..T {
            rows.push((b * T + t) as u32);
            targets.push(r[t + 1]);
        }
    }
    model
        .loss_at(&h, &rows, &targets)
        .map_err(candle_core::Error::wrap)
}

fn main() -> anyhow::Result<()> {
    mlbench::util::tune_allocator();
    let args: Vec<String> = std::env::args().collect();
    let dir = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "models/gemma-3-270m".into());
    let steps: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5);
    let dev_name = std::env::var("MLBENCH_DEVICE").unwrap_or_else(|_| "cpu".into());
    let dtype_name = std::env::var("MLBENCH_DTYPE").unwrap_or_else(|_| "f32".into());
    let device: Device = mlbench::plan::DeviceSpec::parse(&dev_name)?.open()?;
    let dtype: DType = mlbench::plan::Precision::parse(&dtype_name)?.dtype();
    // MLBENCH_MATMUL=bf16: frozen-weight products on AMX tiles (as `mlbench --matmul bf16`).
    let matmul = std::env::var("MLBENCH_MATMUL").unwrap_or_else(|_| "f32".into());
    mlbench::model::kernels::set_matmul_precision(match matmul.as_str() {
        "f32" => mlbench::model::kernels::MatmulPrecision::F32,
        "bf16" => mlbench::model::kernels::MatmulPrecision::Bf16,
        other => anyhow::bail!("MLBENCH_MATMUL={other}: expected f32 or bf16"),
    })?;
    let t0 = Instant::now();
    let m = mlbench::model::load(&dir, dtype, &device)?;
    device.synchronize()?;
    let load_s = t0.elapsed().as_secs_f64();
    let model = &m.model;
    let mut rng = Rng::new(0);
    let ids: Vec<Vec<u32>> = (0..B)
        .map(|_| {
            (0..=T)
                .map(|_| rng.below(model.config.vocab_size as u64) as u32)
                .collect()
        })
        .collect();
    let cfg = LoraConfig {
        r: 8,
        lora_alpha: 16.0,
        lora_dropout: 0.0,
        target_modules: Targets::List(
            ["q_proj", "k_proj", "v_proj", "o_proj"]
                .map(String::from)
                .to_vec(),
        ),
        use_rslora: false,
        base_model_name_or_path: None,
    };
    let ad = Adapter::new("bench", cfg, &model.modules(), 0, dtype, &device)?;
    let threads = candle_core::utils::get_num_threads();
    println!(
        "model={dir} device={dev_name} dtype={dtype_name} matmul={matmul} load_s={load_s:.2} threads={threads} batch={B}x{T} steps={steps}"
    );

    let mask = vec![vec![1u8; T]; B];
    let inputs: Vec<Vec<u32>> = ids.iter().map(|r| r[..T].to_vec()).collect();
    let mut times = Vec::new();
    for i in 0..steps + 2 {
        let t = Instant::now();
        let h = model.hidden(&inputs, &mask, &Ctx::eval(Some(&ad)))?;
        let rows: Vec<u32> = (0..(B * T) as u32).collect();
        let l = model.logits_at(&h, &rows)?;
        let _ = l
            .max(D::Minus1)?
            .sum_all()?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()?;
        device.synchronize()?;
        if i >= 2 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let f = median(times);
    println!(
        "forward_full_logits tokens_per_s={:.1} step_s={f:.3}",
        (B * T) as f64 / f
    );

    for (name, last) in [
        ("train_loss_all_positions", None),
        ("train_loss_last4", Some(4)),
    ] {
        let mut opt = AdamW::new(
            ad.vars(),
            ParamsAdamW {
                lr: 1e-4,
                ..Default::default()
            },
        )?;
        let mut times = Vec::new();
        let mut lv = 0.0;
        for i in 0..steps + 2 {
            let t = Instant::now();
            let l = loss(model, &ad, &ids, last)?;
            opt.backward_step(&l)?;
            lv = l.to_dtype(DType::F32)?.to_scalar::<f32>()?;
            device.synchronize()?;
            if i >= 2 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        let s = median(times);
        // B starts at zero: a non-zero norm shows the optimizer received gradients.
        let mut b_sq = 0f32;
        for p in ad.pairs.values() {
            b_sq +=
                p.b.as_tensor()
                    .to_dtype(DType::F32)?
                    .sqr()?
                    .sum_all()?
                    .to_scalar::<f32>()?;
        }
        println!(
            "{name} tokens_per_s={:.1} step_s={s:.3} loss={lv:.3} lora_b_norm={:.5}",
            (B * T) as f64 / s,
            b_sq.sqrt()
        );
    }
    Ok(())
}
