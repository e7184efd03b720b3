//! Would fusing the q/k/v (and gate/up) products into one wider product speed up training and
//! evaluation? The same f32 GEMM call mlbench's frozen products make (`model::kernels::frozen`,
//! `gemm` with `x [n, k]` times `w [out, k]` read transposed), timed for the separate weights and
//! for their concatenation, at the row counts of a training micro-batch (about 512 tokens after
//! prefix sharing on SIB-200) and of a short one (160).
//!
//! Reports the median of 20 runs after 5 warm-ups, with 2 rayon threads.
//! Run: cargo run --release --example fused_gemm -- [ROWS...]   (default 512 160)

use std::time::Instant;

/// `y [n, out] = x [n, k] w [out, k]^T`.
fn product(x: &[f32], w: &[f32], (n, k, out): (usize, usize, usize), y: &mut Vec<f32>) {
    assert!(x.len() == n * k && w.len() == out * k);
    y.clear();
    y.reserve(n * out);
    // SAFETY: x is [n, k] row-major, w is [out, k] row-major read as its transpose, y has
    // capacity n * out; with alpha 0 and read_dst false the GEMM writes every element of y
    // without reading it, so the length is set afterwards.
    unsafe {
        gemm::gemm(
            n,
            out,
            k,
            y.as_mut_ptr(),
            1,
            out as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(2),
        );
        y.set_len(n * out);
    }
}

/// Median seconds of 20 runs of `f` after 5 warm-ups.
fn median(mut f: impl FnMut()) -> f64 {
    let mut t: Vec<f64> = (0..25)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64()
        })
        .skip(5)
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// One shape: the input width and the output widths that would be fused.
fn compare(name: &str, n: usize, k: usize, outs: &[usize]) {
    let x: Vec<f32> = (0..n * k).map(|i| (i % 97) as f32 * 0.01).collect();
    let ws: Vec<Vec<f32>> = outs
        .iter()
        .map(|&o| (0..o * k).map(|i| (i % 89) as f32 * 0.01).collect())
        .collect();
    let fused_w = ws.concat();
    let total: usize = outs.iter().sum();
    let mut y = Vec::new();
    let separate = median(|| {
        for (w, &o) in ws.iter().zip(outs) {
            product(&x, w, (n, k, o), &mut y);
        }
    });
    let fused = median(|| product(&x, &fused_w, (n, k, total), &mut y));
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
    let rows: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse().expect("ROWS are whole numbers"))
        .collect();
    let rows = if rows.is_empty() {
        vec![512, 160]
    } else {
        rows
    };
    for n in rows {
        compare("gemma q/k/v", n, 640, &[1024, 256, 256]);
        compare("gemma gate/up", n, 640, &[2048, 2048]);
        compare("smollm2 q/k/v", n, 576, &[576, 192, 192]);
        compare("smollm2 gate/up", n, 576, &[1536, 1536]);
    }
}
