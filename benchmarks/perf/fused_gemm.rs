//! Would fusing the q/k/v (and gate/up) products into one wider product speed up training and
//! evaluation? mlbench's own frozen-weight product (`model::kernels::linear`: one f32 `gemm`
//! call, `x [n, k]` times `w [out, k]` read transposed), timed for the separate weights and
//! for their concatenation, at the row counts of a training micro-batch (about 512 tokens after
//! prefix sharing on SIB-200) and of a short one (160).
//!
//! Reports the median of 20 runs after 5 warm-ups, on candle's thread count (the cores, or
//! `RAYON_NUM_THREADS`).
//! Run: cargo run --release --example fused_gemm -- [ROWS...]   (default 512 160)

mod timing;

use timing::median;

use candle_core::{Device, Tensor};
use mlbench::model::kernels::linear;

/// `x w^T` through mlbench's frozen-weight product (`model::kernels::linear`, one GEMM call).
fn product(x: &Tensor, w: &Tensor) -> Tensor {
    linear(x, w)
        .expect("the product runs")
        .expect("f32 CPU tensors take the GEMM path")
}

/// One shape: the input width and the output widths that would be fused.
fn compare(name: &str, n: usize, k: usize, outs: &[usize]) {
    let dev = Device::Cpu;
    let tensor = |rows: usize, m: usize| {
        let v: Vec<f32> = (0..rows * k).map(|i| (i % m) as f32 * 0.01).collect();
        Tensor::from_vec(v, (rows, k), &dev).expect("a tensor")
    };
    let x = tensor(n, 97);
    let ws: Vec<Tensor> = outs.iter().map(|&o| tensor(o, 89)).collect();
    let fused_w = Tensor::cat(&ws, 0).expect("the weights concatenate");
    let total: usize = outs.iter().sum();
    let separate = median(|| {
        for w in &ws {
            std::hint::black_box(product(&x, w));
        }
    });
    let fused = median(|| {
        std::hint::black_box(product(&x, &fused_w));
    });
    let flop = 2.0 * (n * k * total) as f64;
    println!(
        "{name:20} rows {n:4}: separate {:7.3} ms ({:5.1} GFLOP/s), fused {:7.3} ms ({:5.1} GFLOP/s), {:.2}x",
        separate * 1e3,
        flop / separate / 1e9,
        fused * 1e3,
        flop / fused / 1e9,
        separate / fused
    );
}

fn main() {
    let rows = timing::rows_or(&[512, 160]);
    for n in rows {
        compare("gemma q/k/v", n, 640, &[1024, 256, 256]);
        compare("gemma gate/up", n, 640, &[2048, 2048]);
        compare("smollm2 q/k/v", n, 576, &[576, 192, 192]);
        compare("smollm2 gate/up", n, 576, &[1536, 1536]);
    }
}
