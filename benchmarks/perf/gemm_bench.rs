//! f32 matrix-product throughput of candle's CPU backend (the gemm crate) on the shapes of a
//! decoder's projections, to set against `gemm_bench_torch.py` (the same shapes in PyTorch) in
//! the same run: how much of the model gap is the GEMM itself.
//!
//! Shapes `[m, k] x [k, n]^T` as in `x W^T` (weights stored `[out, in]`), m = 1,024 tokens.
//! Reports GFLOP/s (2 m n k per product), median of 7 after 2 warm-ups, for candle's f32
//! matmul and, where the CPU has AMX, mlbench's bf16 tile product (`model::amx`, weights packed
//! once beforehand as the model does; the activation rounding is inside the timing).
//! Run: cargo run --release --example gemm_bench

use std::time::Instant;

use candle_core::{Device, Tensor};

/// Median seconds of 7 runs of `f` after 2 warm-ups.
fn median_time<T>(mut f: impl FnMut() -> T) -> f64 {
    let mut times = Vec::new();
    for i in 0..9 {
        let t0 = Instant::now();
        std::hint::black_box(f());
        if i >= 2 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let m = 1024;
    // (name, k = in, n = out): SmolLM2-135M and Gemma 3 270M projections, Gemma's output layer.
    let shapes = [
        ("smollm2 q/o", 576, 576),
        ("smollm2 k/v", 576, 192),
        ("smollm2 gate/up", 576, 1536),
        ("smollm2 down", 1536, 576),
        ("gemma q", 640, 1024),
        ("gemma gate/up", 640, 2048),
        ("gemma down", 2048, 640),
        ("gemma logits (256 rows)", 640, 262_144),
    ];
    for (name, k, n) in shapes {
        let rows = if name.contains("256 rows") { 256 } else { m };
        let x = Tensor::randn(0f32, 1.0, (rows, k), &dev)?;
        let w = Tensor::randn(0f32, 0.05, (n, k), &dev)?;
        let t = median_time(|| x.matmul(&w.t().unwrap()).unwrap());
        let gflops = 2.0 * rows as f64 * n as f64 * k as f64 / t / 1e9;
        print!(
            "{name:<24} m={rows:<5} k={k:<5} n={n:<6} f32 {:>8.3} ms {gflops:>7.1} GFLOP/s",
            t * 1e3
        );
        if mlbench::model::amx::available() {
            let xv = x.flatten_all()?.to_vec1::<f32>()?;
            let wv = w.flatten_all()?.to_vec1::<f32>()?;
            let packed = mlbench::model::amx::Packed::from_transposed(&wv, n, k);
            let ta = median_time(|| mlbench::model::amx::matmul(&xv, rows, &packed));
            let g = 2.0 * rows as f64 * n as f64 * k as f64 / ta / 1e9;
            print!(" | amx bf16 {:>8.3} ms {g:>7.1} GFLOP/s", ta * 1e3);
        }
        println!();
    }
    Ok(())
}
