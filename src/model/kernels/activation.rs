//! The gated activation of the MLP, `act(gate) * up` (tanh-gelu for Gemma, silu for Llama and
//! Qwen2), in one pass instead of candle's three, its gradient in one more, and the
//! vectorisable [`exp`] it is built on (the softmax rows use it too).
//!
//! In: equal-length f32 slices, or f32 CPU tensors of one shape. Out: new f32 buffers, or a
//! tensor that carries the fused backward pass ([`glu`]); `None` from [`glu`] for other dtypes
//! and devices, where callers use candle's ops.
//!
//! Accuracy: [`exp`] is within 2 ulp-ish (relative error below 3e-7) of the exact value on its
//! range, so the activations agree with candle's `gelu`/`silu` to about 1e-6 relative; tests
//! check both against f64 references.

use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::Result;
use crate::model::cpu::{avx512, f32_slices, not_f32_cpu};

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

/// `act(g) * u` into `out`: the loop the vector-unit variants below compile.
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

/// [`glu_chunk`] compiled for AVX-512.
///
/// # Safety
/// The CPU must have the features it is compiled for ([`avx512`] says so).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,fma")]
unsafe fn glu_chunk_avx512(kind: Glu, g: &[f32], u: &[f32], out: &mut [f32]) {
    glu_chunk(kind, g, u, out)
}

/// [`glu_chunk`] compiled for AVX2.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn glu_chunk_avx2(kind: Glu, g: &[f32], u: &[f32], out: &mut [f32]) {
    glu_chunk(kind, g, u, out)
}

/// The widest vector unit this CPU has, chosen once per call of the slice kernels.
fn glu_chunk_best(kind: Glu, g: &[f32], u: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if avx512() {
            // SAFETY: `avx512()` detected the features the function is compiled for.
            return unsafe { glu_chunk_avx512(kind, g, u, out) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: AVX2 and FMA, the features the function is compiled for, were detected
            // just above.
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

/// `(act(x), act'(x))`.
#[inline(always)]
fn act_and_slope(kind: Glu, x: f32) -> (f32, f32) {
    match kind {
        Glu::GeluTanh => {
            const C: f32 = 0.797_884_6;
            let z = C * (x + 0.044_715 * x * x * x);
            let p = 1.0 / (1.0 + exp(-2.0 * z));
            let dz = C * (1.0 + 3.0 * 0.044_715 * x * x);
            (x * p, p + 2.0 * x * p * (1.0 - p) * dz)
        }
        Glu::Silu => {
            let s = 1.0 / (1.0 + exp(-x));
            (x * s, s * (1.0 + x * (1.0 - s)))
        }
    }
}

/// The gradients of `act(g) * u` into `dg` and `du`: the loop the AVX-512 variant compiles.
#[inline(always)]
fn glu_bwd_chunk(kind: Glu, g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
    for i in 0..g.len() {
        let (a, da) = act_and_slope(kind, g[i]);
        dg[i] = dy[i] * u[i] * da;
        du[i] = dy[i] * a;
    }
}

/// [`glu_bwd_chunk`] compiled for AVX-512.
///
/// # Safety
/// The CPU must have the features it is compiled for ([`avx512`] says so).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,fma")]
unsafe fn glu_bwd_chunk_avx512(
    kind: Glu,
    g: &[f32],
    u: &[f32],
    dy: &[f32],
    dg: &mut [f32],
    du: &mut [f32],
) {
    glu_bwd_chunk(kind, g, u, dy, dg, du)
}

/// Gradients of `act(g) * u` with respect to `g` and `u` given the output's gradient `dy`.
pub fn glu_backward_slices(kind: Glu, g: &[f32], u: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    assert!(g.len() == u.len() && g.len() == dy.len(), "lengths differ");
    let (mut dg, mut du) = (vec![0f32; g.len()], vec![0f32; g.len()]);
    let wide = avx512();
    dg.par_chunks_mut(CHUNK)
        .zip(du.par_chunks_mut(CHUNK))
        .zip(
            g.par_chunks(CHUNK)
                .zip(u.par_chunks(CHUNK))
                .zip(dy.par_chunks(CHUNK)),
        )
        .for_each(|((dg, du), ((g, u), dy))| {
            #[cfg(target_arch = "x86_64")]
            if wide {
                // SAFETY: `avx512()` checked the features the function is compiled for.
                return unsafe { glu_bwd_chunk_avx512(kind, g, u, dy, dg, du) };
            }
            let _ = wide;
            glu_bwd_chunk(kind, g, u, dy, dg, du)
        });
    (dg, du)
}

/// The fused gated activation as a candle op on `(gate, up)`, with its backward pass.
struct GluOp(Glu);

impl CustomOp2 for GluOp {
    fn name(&self) -> &'static str {
        "fused-glu"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        lg: &Layout,
        u: &CpuStorage,
        lu: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = lg.shape().elem_count();
        let (Some((g0, g1)), Some((u0, u1))) = (lg.contiguous_offsets(), lu.contiguous_offsets())
        else {
            candle_core::bail!("fused-glu: inputs must be contiguous");
        };
        if lg.shape() != lu.shape() || g1 - g0 != n || u1 - u0 != n {
            candle_core::bail!(
                "fused-glu: gate {:?} and up {:?} differ",
                lg.shape(),
                lu.shape()
            );
        }
        let out = glu_slices(
            self.0,
            &g.as_slice::<f32>()?[g0..g1],
            &u.as_slice::<f32>()?[u0..u1],
        );
        Ok((CpuStorage::F32(out), lg.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = glu_backward(self.0, g, u, &dy.to_dtype(DType::F32)?)
            .map_err(candle_core::Error::wrap)?;
        Ok((Some(dg), Some(du)))
    }
}

/// `act(g) * u` for two f32 CPU tensors of one shape, in one pass, with a fused backward pass
/// when either carries a gradient graph; `None` for other dtypes and devices (the caller then
/// uses candle's ops).
pub fn glu(kind: Glu, g: &Tensor, u: &Tensor) -> Result<Option<Tensor>> {
    if g.dtype() != DType::F32
        || u.dtype() != DType::F32
        || !matches!(g.device(), Device::Cpu)
        || g.shape() != u.shape()
    {
        return Ok(None);
    }
    Ok(Some(
        g.contiguous()?.apply_op2(&u.contiguous()?, GluOp(kind))?,
    ))
}

/// `(d gate, d up)` of `act(gate) * up` for the output gradient `dy` (f32 CPU tensors of one
/// shape).
pub fn glu_backward(kind: Glu, g: &Tensor, u: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    let (dg, du) = f32_slices([g, u, dy], |[g, u, dy]| glu_backward_slices(kind, g, u, dy))?
        .ok_or_else(not_f32_cpu)?;
    Ok((
        Tensor::from_vec(dg, g.shape(), g.device())?,
        Tensor::from_vec(du, u.shape(), u.device())?,
    ))
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

    #[test]
    fn fused_glu_values_and_gradients_match_candle_ops() {
        use candle_core::Var;
        let dev = Device::Cpu;
        let n = 4 * 1_000;
        let gv: Vec<f32> = (0..n)
            .map(|i| ((i * 7_919) % 1_000) as f32 / 80.0 - 6.0)
            .collect();
        let uv: Vec<f32> = (0..n)
            .map(|i| ((i * 104_729) % 997) as f32 / 300.0 - 1.5)
            .collect();
        let wv: Vec<f32> = (0..n)
            .map(|i| ((i * 31) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let w = Tensor::from_vec(wv, (4, 1_000), &dev).unwrap();
        for kind in [Glu::GeluTanh, Glu::Silu] {
            let run = |fused: bool| {
                let g = Var::from_vec(gv.clone(), (4, 1_000), &dev).unwrap();
                let u = Var::from_vec(uv.clone(), (4, 1_000), &dev).unwrap();
                let y = if fused {
                    glu(kind, g.as_tensor(), u.as_tensor()).unwrap().unwrap()
                } else {
                    let a = match kind {
                        Glu::GeluTanh => g.as_tensor().gelu().unwrap(),
                        Glu::Silu => g.as_tensor().silu().unwrap(),
                    };
                    (a * u.as_tensor()).unwrap()
                };
                let grads = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
                let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let (dg, du) = (
                    grads.get(g.as_tensor()).unwrap(),
                    grads.get(u.as_tensor()).unwrap(),
                );
                (v(&y), v(dg), v(du))
            };
            let (a, b) = (run(true), run(false));
            for (name, x, y) in [
                ("value", &a.0, &b.0),
                ("d gate", &a.1, &b.1),
                ("d up", &a.2, &b.2),
            ] {
                let worst = x
                    .iter()
                    .zip(y)
                    .map(|(p, q)| (p - q).abs() / q.abs().max(1.0))
                    .fold(0f32, f32::max);
                assert!(
                    worst < 2e-5,
                    "{kind:?} {name}: fused and candle differ by {worst}"
                );
            }
        }
    }
}
