//! How should two threads share one frozen-weight product of a short micro-batch? The f32
//! `gemm` call mlbench makes (`x [n, k]` times `w [out, k]` read transposed, and the input
//! gradient `g [n, out]` times `w`), timed on one thread, with gemm's own two-thread split, and
//! with the work cut in two by hand (the output's columns, or its rows) and each half run on
//! one thread with `rayon::join`; and the forward with the weight stored transposed (`fwd
//! wT`), which spares gemm its packing of the weight.
//!
//! Reports the median of 20 runs after 5 warm-ups. Run with two threads available:
//! cargo run --release --example split_gemm -- [ROWS...]   (default 236 448)

mod timing;

use timing::median;

/// A strided matrix operand: pointer, column stride, row stride.
#[derive(Clone, Copy)]
struct Mat(*const f32, isize, isize);
unsafe impl Send for Mat {}
unsafe impl Sync for Mat {}
#[derive(Clone, Copy)]
struct Dst(*mut f32, isize, isize);
unsafe impl Send for Dst {}
unsafe impl Sync for Dst {}

impl Mat {
    /// The same operand starting `by` steps of `stride` further.
    unsafe fn skip(self, by: usize, stride: isize) -> Mat {
        Mat(self.0.offset(by as isize * stride), self.1, self.2)
    }
}

impl Dst {
    /// The same destination starting `by` elements further.
    unsafe fn skip(self, by: usize) -> Dst {
        Dst(self.0.add(by), self.1, self.2)
    }
}

/// `dst [m, n] = a [m, k] b [k, n]` through one gemm call.
unsafe fn call(m: usize, n: usize, k: usize, d: Dst, a: Mat, b: Mat, par: gemm::Parallelism) {
    gemm::gemm(
        m, n, k, d.0, d.1, d.2, false, a.0, a.1, a.2, b.0, b.1, b.2, 0.0, 1.0, false, false, false,
        par,
    );
}

/// The four ways for one product `a [m, k] b [k, n]`.
fn compare(name: &str, m: usize, n: usize, k: usize, a: Mat, b: Mat) {
    let mut y = vec![0f32; m * n];
    let d = Dst(y.as_mut_ptr(), 1, n as isize);
    let one = median(|| unsafe { call(m, n, k, d, a, b, gemm::Parallelism::None) });
    let own = median(|| unsafe { call(m, n, k, d, a, b, gemm::Parallelism::Rayon(2)) });
    let h = (n / 2).div_ceil(16) * 16;
    let cols = median(|| {
        rayon::join(
            || unsafe { call(m, h, k, d, a, b, gemm::Parallelism::None) },
            || unsafe {
                call(
                    m,
                    n - h,
                    k,
                    d.skip(h),
                    a,
                    b.skip(h, b.1),
                    gemm::Parallelism::None,
                )
            },
        );
    });
    let r = m / 2;
    let rows = median(|| {
        rayon::join(
            || unsafe { call(r, n, k, d, a, b, gemm::Parallelism::None) },
            || unsafe {
                call(
                    m - r,
                    n,
                    k,
                    d.skip(r * n),
                    a.skip(r, a.2),
                    b,
                    gemm::Parallelism::None,
                )
            },
        );
    });
    let g = |s: f64| 2.0 * (m * n * k) as f64 / s / 1e9;
    println!(
        "{name:16} m {m:4}: 1 thread {:6.2} ms ({:5.1} GF/s) | gemm x2 {:6.2} ms ({:5.2}x) | cols x2 {:6.2} ms ({:5.2}x) | rows x2 {:6.2} ms ({:5.2}x)",
        one * 1e3, g(one), own * 1e3, one / own, cols * 1e3, one / cols, rows * 1e3, one / rows
    );
}

fn main() {
    let rows = timing::rows_or(&[236, 448]);
    let data =
        |len: usize, md: usize| -> Vec<f32> { (0..len).map(|i| (i % md) as f32 * 0.01).collect() };
    for m in rows {
        for (name, out, k) in [
            ("gemma q", 1024, 640),
            ("gemma gate", 2048, 640),
            ("gemma down", 640, 2048),
        ] {
            let x = data(m * k, 97);
            let w = data(out * k, 89);
            // forward: x [m, k] (col stride 1, row stride k) times w^T [k, out] (col stride k, row stride 1)
            compare(
                &format!("{name} fwd"),
                m,
                out,
                k,
                Mat(x.as_ptr(), 1, k as isize),
                Mat(w.as_ptr(), k as isize, 1),
            );
            // the same forward with the weight stored transposed, `w^T [k, out]` row-major (col
            // stride 1, row stride out): the layout gemm need not pack
            let wt: Vec<f32> = (0..k * out).map(|i| w[(i % out) * k + i / out]).collect();
            compare(
                &format!("{name} fwd wT"),
                m,
                out,
                k,
                Mat(x.as_ptr(), 1, k as isize),
                Mat(wt.as_ptr(), 1, out as isize),
            );
            let gr = data(m * out, 83);
            // input gradient: g [m, out] times w [out, k] (col stride 1, row stride k)
            compare(
                &format!("{name} grad"),
                m,
                k,
                out,
                Mat(gr.as_ptr(), 1, out as isize),
                Mat(w.as_ptr(), 1, k as isize),
            );
        }
    }
}
