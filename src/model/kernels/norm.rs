//! The input gradient of RMSNorm, in one pass per row (candle's fused rms-norm has no backward).
//!
//! In: rows of `x: [rows, h]`, the per-column scale `s: [h]` and the output gradient `dy` (f32
//! slices, or f32 CPU tensors). Out: `dx` in the layout of `x`; `None` from the tensor form for
//! other dtypes, devices or shapes, where callers use candle's ops.

use candle_core::Tensor;
use rayon::prelude::*;

use crate::model::cpu::f32_slices;

/// The input gradient of RMSNorm `y = x r s` (`r = 1 / sqrt(mean(x^2) + eps)`, `s` the
/// per-column scale) for rows of `x: [rows, h]` and `dy`, in one pass per row:
/// `dx = r (dy s) - x r^3 mean(dy s x)`. Sums in f64.
pub fn rms_norm_backward_slices(x: &[f32], s: &[f32], dy: &[f32], eps: f64) -> Vec<f32> {
    let h = s.len();
    let mut dx = vec![0f32; x.len()];
    dx.par_chunks_mut(h * 64)
        .zip(x.par_chunks(h * 64).zip(dy.par_chunks(h * 64)))
        .for_each(|(dxc, (xc, gc))| {
            for ((d, xr), gr) in dxc.chunks_mut(h).zip(xc.chunks(h)).zip(gc.chunks(h)) {
                let (mut ss, mut dot) = (0f64, 0f64);
                for ((&xv, &gv), &sv) in xr.iter().zip(gr).zip(s) {
                    ss += f64::from(xv) * f64::from(xv);
                    dot += f64::from(gv * sv) * f64::from(xv);
                }
                let r = 1.0 / (ss / h as f64 + eps).sqrt();
                let c = (r * r * r * dot / h as f64) as f32;
                let r = r as f32;
                for (((o, &xv), &gv), &sv) in d.iter_mut().zip(xr).zip(gr).zip(s) {
                    *o = r * gv * sv - xv * c;
                }
            }
        });
    dx
}

/// [`rms_norm_backward_slices`] on tensors: `x: [.., h]`, `scale: [h]`, `dy` like `x`, all f32 on
/// the CPU; `None` otherwise.
pub fn rms_norm_backward(
    x: &Tensor,
    scale: &Tensor,
    dy: &Tensor,
    eps: f64,
) -> candle_core::Result<Option<Tensor>> {
    if x.shape() != dy.shape() || scale.rank() != 1 || x.dims().last() != Some(&scale.dim(0)?) {
        return Ok(None);
    }
    let dx = f32_slices([x, scale, dy], |[x, s, dy]| {
        rms_norm_backward_slices(x, s, dy, eps)
    })?;
    dx.map(|dx| Tensor::from_vec(dx, x.shape(), x.device()))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_backward_matches_the_formula_in_f64() {
        let (rows, h, eps) = (70, 24, 1e-6);
        let val = |i: usize, m: usize| ((i * m) % 1_009) as f32 / 500.0 - 1.0;
        let x: Vec<f32> = (0..rows * h).map(|i| val(i, 7_919)).collect();
        let s: Vec<f32> = (0..h).map(|i| 0.5 + val(i, 31)).collect();
        let g: Vec<f32> = (0..rows * h).map(|i| val(i, 613)).collect();
        let got = rms_norm_backward_slices(&x, &s, &g, eps);
        // d/dx_i of sum_j g_j s_j x_j r(x), with r = (mean(x^2) + eps)^-1/2, via central
        // differences in f64 on each row.
        for row in [0, 33, 69] {
            let xr: Vec<f64> = x[row * h..(row + 1) * h]
                .iter()
                .map(|&v| f64::from(v))
                .collect();
            let f = |xs: &[f64]| -> f64 {
                let r = 1.0 / (xs.iter().map(|v| v * v).sum::<f64>() / h as f64 + eps).sqrt();
                (0..h)
                    .map(|j| f64::from(g[row * h + j]) * f64::from(s[j]) * xs[j] * r)
                    .sum()
            };
            for i in 0..h {
                let (mut p, mut m) = (xr.clone(), xr.clone());
                p[i] += 1e-6;
                m[i] -= 1e-6;
                let want = (f(&p) - f(&m)) / 2e-6;
                let y = f64::from(got[row * h + i]);
                assert!(
                    (y - want).abs() < 1e-4 * (1.0 + want.abs()),
                    "row {row} col {i}: {y} vs {want}"
                );
            }
        }
    }
}
