//! Softmax over rows of f32 logits: the row statistics (max and sum of exponentials) of the
//! scorers' log-sum-exp, and token cross-entropy rows with their gradient written in place.
//! The attention kernels' masked softmax reuses the row max from here.
//!
//! In: f32 rows, with one target per row for the cross-entropy. Out: `(max, sum of
//! exponentials)` of a row, or a summed loss (and, when asked, each row overwritten by its
//! gradient). Reductions run in sixteen independent lanes so the compiler vectorises them
//! without reassociating anything.

use rayon::prelude::*;

use super::activation::exp;
use crate::error::Result;
use crate::model::cpu::avx512;

/// Lanes of the hand-split reductions below: sixteen independent accumulators let the
/// compiler keep them in vector registers without reassociating anything.
pub(super) const LANES: usize = 16;

/// The largest value of a row (NaNs skipped), in [`LANES`] lanes.
#[inline(always)]
pub(super) fn row_max_body(row: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for j in 0..LANES {
            acc[j] = acc[j].max(c[j]);
        }
    }
    let m = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &x| a.max(x));
    acc.iter().fold(m, |a, &x| a.max(x))
}

/// `sum_v e^{row[v] - m}` in f64, in [`LANES`] lanes.
#[inline(always)]
fn sum_exp_body(row: &[f32], m: f32) -> f64 {
    let mut acc = [0f64; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for j in 0..LANES {
            acc[j] += f64::from(exp(c[j] - m));
        }
    }
    let rest: f64 = chunks
        .remainder()
        .iter()
        .map(|&x| f64::from(exp(x - m)))
        .sum();
    acc.iter().sum::<f64>() + rest
}

/// [`max_and_sum_exp`]'s body compiled for AVX-512.
///
/// # Safety
/// The CPU must have the features it is compiled for ([`avx512`] says so).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,fma")]
unsafe fn row_stats_avx512(row: &[f32]) -> (f32, f64) {
    let m = row_max_body(row);
    (m, sum_exp_body(row, m))
}

/// `(max, sum_v e^{row[v] - max})` of a row (NaNs are skipped by the max; the sum is then
/// NaN). The caller handles a non-finite max.
pub fn max_and_sum_exp(row: &[f32]) -> (f32, f64) {
    #[cfg(target_arch = "x86_64")]
    {
        if avx512() {
            // SAFETY: `avx512()` detected the features the function is compiled for.
            return unsafe { row_stats_avx512(row) };
        }
    }
    let m = row_max_body(row);
    (m, sum_exp_body(row, m))
}

/// `row[v] = e^{row[v] - m} inv`: a row's softmax from its statistics.
#[inline(always)]
fn exp_scale_body(row: &mut [f32], m: f32, inv: f32) {
    for x in row.iter_mut() {
        *x = exp(*x - m) * inv;
    }
}

/// [`exp_scale_body`] compiled for AVX-512.
///
/// # Safety
/// The CPU must have the features it is compiled for ([`avx512`] says so).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,fma")]
unsafe fn exp_scale_avx512(row: &mut [f32], m: f32, inv: f32) {
    exp_scale_body(row, m, inv)
}

/// Token cross-entropy over rows of f32 logits `z: [n, v]` with one target per row: returns
/// `sum_i (logsumexp(z_i) - z_i[t_i])` (f64); with `grad`, each row is overwritten by its
/// gradient `softmax(z_i) - onehot(t_i)`. One read (two with `grad`) per row, in parallel,
/// with the vectorised [`exp`]. A target outside `0..v` is an error.
pub fn cross_entropy_rows(z: &mut [f32], v: usize, targets: &[u32], grad: bool) -> Result<f64> {
    if v == 0 || z.len() != v * targets.len() {
        return Err(crate::error::Error::Internal(format!(
            "cross-entropy: {} logits do not make {} rows of {v}",
            z.len(),
            targets.len()
        )));
    }
    if let Some(t) = targets.iter().find(|&&t| t as usize >= v) {
        return Err(crate::error::Error::Internal(format!(
            "cross-entropy: target {t} is outside the vocabulary of {v}"
        )));
    }
    let wide = avx512();
    let total: f64 = z
        .par_chunks_mut(v)
        .zip(targets.par_iter())
        .map(|(row, &t)| {
            let (m, sum) = max_and_sum_exp(row);
            let lse = f64::from(m) + sum.ln();
            let term = lse - f64::from(row[t as usize]);
            if grad {
                let inv = (1.0 / sum) as f32;
                #[cfg(target_arch = "x86_64")]
                if wide {
                    // SAFETY: `avx512()` checked the features the function is compiled for.
                    unsafe { exp_scale_avx512(row, m, inv) };
                } else {
                    exp_scale_body(row, m, inv);
                }
                #[cfg(not(target_arch = "x86_64"))]
                {
                    let _ = wide;
                    exp_scale_body(row, m, inv);
                }
                row[t as usize] -= 1.0;
            }
            term
        })
        .sum();
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cross_entropy_rows_match_f64() {
        let (n, v) = (5, 37);
        let val = |i: usize, m: usize| ((i * m) % 1_009) as f32 / 50.0 - 10.0;
        let z: Vec<f32> = (0..n * v).map(|i| val(i, 7_919)).collect();
        let t: Vec<u32> = vec![0, 36, 5, 5, 20];
        let mut zg = z.clone();
        let loss = cross_entropy_rows(&mut zg, v, &t, true).unwrap();
        let mut want = 0f64;
        for (i, row) in z.chunks(v).enumerate() {
            let m = row
                .iter()
                .fold(f64::NEG_INFINITY, |a, &b| a.max(f64::from(b)));
            let s: f64 = row.iter().map(|&x| (f64::from(x) - m).exp()).sum();
            want += m + s.ln() - f64::from(row[t[i] as usize]);
            for (j, &x) in row.iter().enumerate() {
                let p = (f64::from(x) - m).exp() / s - if j == t[i] as usize { 1.0 } else { 0.0 };
                let g = f64::from(zg[i * v + j]);
                assert!((g - p).abs() < 1e-6, "row {i} col {j}: {g} vs {p}");
            }
        }
        assert!((loss - want).abs() < 1e-5 * want.abs(), "{loss} vs {want}");
        let mut z2 = z.clone();
        assert_eq!(cross_entropy_rows(&mut z2, v, &t, false).unwrap(), loss);
        assert_eq!(z2, z, "without grad the logits stay");
        assert!(cross_entropy_rows(&mut z2, v, &[0, 1, 2, 3, 37], false).is_err());
    }
}
