//! CPU inference kernels that candle runs as chains of scalar ops: the gated activation of the
//! MLP (`act(gate) * up`, one pass instead of three) and a vectorisable `exp`.
//!
//! In: contiguous f32 slices (or tensors); out: new f32 buffers. Nothing here tracks gradients:
//! callers use these only when no gradient is wanted and fall back to candle's ops otherwise
//! (other devices, other dtypes, training).
//!
//! Accuracy: [`exp`] is within 2 ulp-ish (relative error below 3e-7) of the exact value on its
//! range, so the activations agree with candle's `gelu`/`silu` to about 1e-6 relative; tests
//! check both against f64 references.

use candle_core::{DType, Device, Storage, Tensor};
use rayon::prelude::*;

use crate::error::Result;

/// Which gated activation an MLP uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Glu {
    /// `gelu_tanh(g) * u` (Gemma).
    GeluTanh,
    /// `silu(g) * u` (Llama, Qwen2).
    Silu,
}

/// `e^x` in f32 with plain arithmetic that the compiler vectorises: `x = n ln 2 + r` with
/// `|r| <= ln 2 / 2`, a degree-6 Taylor polynomial for `e^r` (truncation below 1.3e-7
/// relative), `2^n` built from the exponent bits. Below -87.3 it returns 0 (no subnormals),
/// above 88.7 infinity; NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in a part exact in f32 times small integers and the rest (Cody-Waite).
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5 * 2^23 rounds to the nearest integer, which lands in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let xc = x.clamp(-87.3, 88.7);
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let ni = t.to_bits() as i32 - MAGIC.to_bits() as i32;
    let scale = f32::from_bits(((ni + 127) << 23) as u32);
    let y = p * scale;
    if x.is_nan() {
        x
    } else if x < -87.3 {
        0.0
    } else if x > 88.7 {
        f32::INFINITY
    } else {
        y
    }
}

/// `gelu_pytorch_tanh(x) = x/2 (1 + tanh(z))`, `z = c (x + 0.044715 x^3)`, written as
/// `x / (1 + e^{-2z})`, which is the same function without the cancellation of `1 + tanh` for
/// negative `z`.
#[inline(always)]
fn gelu_tanh(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2 / pi)
    let z = C * (x + 0.044_715 * x * x * x);
    x / (1.0 + exp(-2.0 * z))
}

/// `silu(x) = x / (1 + e^{-x})`.
#[inline(always)]
fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

#[inline(always)]
fn glu_chunk(kind: Glu, g: &[f32], u: &[f32], out: &mut [f32]) {
    match kind {
        Glu::GeluTanh => {
            for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
                *o = gelu_tanh(g) * u;
            }
        }
        Glu::Silu => {
            for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
                *o = silu(g) * u;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,fma")]
unsafe fn glu_chunk_avx512(kind: Glu, g: &[f32], u: &[f32], out: &mut [f32]) {
    glu_chunk(kind, g, u, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn glu_chunk_avx2(kind: Glu, g: &[f32], u: &[f32], out: &mut [f32]) {
    glu_chunk(kind, g, u, out)
}

/// The widest vector unit this CPU has, chosen once per call of the slice kernels.
fn glu_chunk_best(kind: Glu, g: &[f32], u: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the features the function is compiled for were detected above.
            return unsafe { glu_chunk_avx512(kind, g, u, out) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: as above.
            return unsafe { glu_chunk_avx2(kind, g, u, out) };
        }
    }
    glu_chunk(kind, g, u, out)
}

/// Elements per parallel task: large enough to amortise the scheduling, small enough that a
/// `[tokens, intermediate]` activation splits over the cores.
const CHUNK: usize = 16 * 1024;

/// `act(g) * u` element by element over equal-length slices, in parallel.
pub fn glu_slices(kind: Glu, g: &[f32], u: &[f32]) -> Vec<f32> {
    assert_eq!(g.len(), u.len(), "gate and up lengths differ");
    let mut out = vec![0f32; g.len()];
    out.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
        .for_each(|(o, (g, u))| glu_chunk_best(kind, g, u, o));
    out
}

/// `act(g) * u` for two tensors of one shape when both are f32 on the CPU and carry no
/// gradient graph; `None` otherwise (the caller then uses candle's ops).
pub fn glu(kind: Glu, g: &Tensor, u: &Tensor) -> Result<Option<Tensor>> {
    if g.dtype() != DType::F32
        || u.dtype() != DType::F32
        || !matches!(g.device(), Device::Cpu)
        || g.shape() != u.shape()
        || g.track_op()
        || u.track_op()
    {
        return Ok(None);
    }
    let (g, u) = (g.contiguous()?, u.contiguous()?);
    let out = {
        let (gs, gl) = g.storage_and_layout();
        let (us, ul) = u.storage_and_layout();
        let (Storage::Cpu(gc), Storage::Cpu(uc)) = (&*gs, &*us) else {
            return Ok(None);
        };
        let n = g.elem_count();
        let gv = &gc.as_slice::<f32>()?[gl.start_offset()..gl.start_offset() + n];
        let uv = &uc.as_slice::<f32>()?[ul.start_offset()..ul.start_offset() + n];
        glu_slices(kind, gv, uv)
    };
    Ok(Some(Tensor::from_vec(out, g.shape(), g.device())?))
}

/// `e^x` for every element of a slice, in place, with the widest vector unit available.
pub fn exp_in_place(xs: &mut [f32]) {
    #[inline(always)]
    fn body(xs: &mut [f32]) {
        for x in xs.iter_mut() {
            *x = exp(*x);
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,fma")]
        unsafe fn wide(xs: &mut [f32]) {
            body(xs)
        }
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the features `wide` is compiled for were detected above.
            return unsafe { wide(xs) };
        }
    }
    body(xs)
}

/// Lanes of the hand-split reductions below: sixteen independent accumulators let the
/// compiler keep them in vector registers without reassociating anything.
const LANES: usize = 16;

#[inline(always)]
fn row_max_body(row: &[f32]) -> f32 {
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
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the features the function is compiled for were detected above.
            return unsafe { row_stats_avx512(row) };
        }
    }
    let m = row_max_body(row);
    (m, sum_exp_body(row, m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_close_to_f64_exp_over_its_range() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = f64::from(x).exp();
            let got = f64::from(exp(x));
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_37;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn activations_match_f64_formulas() {
        let xs: Vec<f32> = (-4000..4000).map(|i| i as f32 * 0.005).collect();
        let us: Vec<f32> = xs.iter().map(|x| 1.0 - 0.3 * x).collect();
        for kind in [Glu::GeluTanh, Glu::Silu] {
            let got = glu_slices(kind, &xs, &us);
            for ((&x, &u), &y) in xs.iter().zip(&us).zip(&got) {
                let (x, u) = (f64::from(x), f64::from(u));
                let a = match kind {
                    Glu::GeluTanh => {
                        let c = (2.0 / std::f64::consts::PI).sqrt();
                        let z = c * (x + 0.044715 * x * x * x);
                        // 1 + tanh(z) = 2 / (1 + e^{-2z}), accurate where tanh(z) ~ -1.
                        let t = (c * (x + 0.044715 * x * x * x)).tanh();
                        assert!((1.0 + t - 2.0 / (1.0 + (-2.0 * z).exp())).abs() < 1e-12);
                        x / (1.0 + (-2.0 * z).exp())
                    }
                    Glu::Silu => x / (1.0 + (-x).exp()),
                };
                let want = a * u;
                let err = (f64::from(y) - want).abs();
                assert!(
                    err <= 2e-6 * want.abs() + 1e-12,
                    "{kind:?}({x}) * {u}: {y} vs {want}"
                );
            }
        }
    }
}
