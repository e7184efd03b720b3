//! CPU kernels for what candle runs as chains of scalar ops: the gated activation of the MLP
//! (`act(gate) * up`, one pass instead of three, and its gradient in one more) and a
//! vectorisable `exp` (for the scorers' log-sum-exp).
//!
//! In: contiguous f32 slices (or f32 CPU tensors); out: new f32 buffers. The tensor-level
//! gated activation carries a fused backward pass; for other devices and dtypes callers fall
//! back to candle's ops.
//!
//! Accuracy: [`exp`] is within 2 ulp-ish (relative error below 3e-7) of the exact value on its
//! range, so the activations agree with candle's `gelu`/`silu` to about 1e-6 relative; tests
//! check both against f64 references.

use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

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
        if avx512() {
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

#[inline(always)]
fn glu_bwd_chunk(kind: Glu, g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
    for i in 0..g.len() {
        let (a, da) = act_and_slope(kind, g[i]);
        dg[i] = dy[i] * u[i] * da;
        du[i] = dy[i] * a;
    }
}

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

/// Whether the AVX-512 variants can run here.
fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
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
        if avx512() {
            // SAFETY: the features the function is compiled for were detected above.
            return unsafe { row_stats_avx512(row) };
        }
    }
    let m = row_max_body(row);
    (m, sum_exp_body(row, m))
}

#[inline(always)]
fn exp_scale_body(row: &mut [f32], m: f32, inv: f32) {
    for x in row.iter_mut() {
        *x = exp(*x - m) * inv;
    }
}

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

/// How products with frozen base weights run on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatmulPrecision {
    /// f32 throughout (the default).
    F32,
    /// Inputs rounded to bf16, f32 accumulation, on AMX tiles ([`super::amx`]); LoRA weights,
    /// norms, attention and losses stay f32.
    Bf16,
}

impl MatmulPrecision {
    pub fn name(self) -> &'static str {
        match self {
            MatmulPrecision::F32 => "f32",
            MatmulPrecision::Bf16 => "bf16",
        }
    }
}

static PRECISION: AtomicU8 = AtomicU8::new(0);

/// Chooses the precision of frozen-weight products for the whole process. `Bf16` needs AMX
/// ([`super::amx::available`]); asking for it elsewhere is an error rather than a silent
/// change of numerics or speed.
pub fn set_matmul_precision(p: MatmulPrecision) -> Result<()> {
    if p == MatmulPrecision::Bf16 && !super::amx::available() {
        return Err(crate::error::Error::Invalid(
            "bf16 matrix products need a CPU with AMX (Intel Xeon Sapphire Rapids or later) and \
             a Linux kernel that grants tile state; use f32 here"
                .into(),
        ));
    }
    PRECISION.store(p as u8, Ordering::Relaxed);
    Ok(())
}

/// The precision chosen by [`set_matmul_precision`] (f32 unless changed).
pub fn matmul_precision() -> MatmulPrecision {
    if PRECISION.load(Ordering::Relaxed) == MatmulPrecision::Bf16 as u8 {
        MatmulPrecision::Bf16
    } else {
        MatmulPrecision::F32
    }
}

/// bf16 tile copies of one frozen weight `w: [out, in]`, made on first use and shared by clones
/// of the layer: `fwd` packs `w^T` (for `x w^T`), `bwd` packs `w` (for the input gradient `g
/// w`, built only when training). A new weight (a merge) needs a new cache.
#[derive(Debug, Clone, Default)]
pub struct PackCache(Arc<PackSlots>);

#[derive(Debug, Default)]
struct PackSlots {
    fwd: OnceLock<super::amx::Packed>,
    bwd: OnceLock<super::amx::Packed>,
}

/// `f` applied to the values of f32 CPU tensors, read in place (a tensor that is not
/// contiguous is copied first); `None` when any tensor is not f32 on the CPU.
fn f32_slices<const N: usize, R>(
    ts: [&Tensor; N],
    f: impl FnOnce([&[f32]; N]) -> R,
) -> candle_core::Result<Option<R>> {
    if ts
        .iter()
        .any(|t| t.dtype() != DType::F32 || !matches!(t.device(), Device::Cpu))
    {
        return Ok(None);
    }
    let owned = ts
        .iter()
        .map(|t| t.contiguous())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let guards: Vec<_> = owned.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices: Vec<&[f32]> = Vec::with_capacity(N);
    for ((storage, layout), t) in guards.iter().zip(&owned) {
        let Storage::Cpu(c) = &**storage else {
            return Ok(None);
        };
        let o = layout.start_offset();
        slices.push(&c.as_slice::<f32>()?[o..o + t.elem_count()]);
    }
    let slices: [&[f32]; N] = slices.try_into().expect("one slice per tensor");
    Ok(Some(f(slices)))
}

/// `x b` on AMX tiles for `x: [n, k]` and the packed `b: [k, cols]` held in `slot` (packed from
/// `w`'s values by `pack` on first use), when the precision is bf16 and both are f32 CPU
/// matrices; `None` otherwise.
fn amx_product(
    x: &Tensor,
    w: &Tensor,
    slot: &OnceLock<super::amx::Packed>,
    pack: impl FnOnce(&[f32]) -> super::amx::Packed,
    (k, cols): (usize, usize),
) -> Result<Option<Tensor>> {
    if matmul_precision() != MatmulPrecision::Bf16 || x.rank() != 2 || x.dim(1)? != k {
        return Ok(None);
    }
    let n = x.dim(0)?;
    let y = f32_slices([x, w], |[xv, wv]| {
        super::amx::matmul(xv, n, slot.get_or_init(|| pack(wv)))
    })?;
    Ok(match y {
        Some(y) => Some(Tensor::from_vec(y, (n, cols), x.device())?),
        None => None,
    })
}

/// `x w^T` for a frozen weight `w: [out, in]` and `x: [n, in]`: on AMX tiles when the precision
/// is bf16 (packing `w` on first use), else [`linear`], else candle's matmul. No gradient.
pub fn frozen_linear(x: &Tensor, w: &Tensor, packs: &PackCache) -> Result<Tensor> {
    let (out, k) = w.dims2()?;
    let pack = |wv: &[f32]| super::amx::Packed::from_transposed(wv, out, k);
    if let Some(y) = amx_product(x, w, &packs.0.fwd, pack, (k, out))? {
        return Ok(y);
    }
    match linear(x, w)? {
        Some(y) => Ok(y),
        None => Ok(x.matmul(&w.t()?)?),
    }
}

/// `g w` for a frozen weight `w: [out, in]` and `g: [n, out]` (the input gradient of
/// [`frozen_linear`]), with the same choice of kernel.
pub fn frozen_linear_grad(g: &Tensor, w: &Tensor, packs: &PackCache) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let pack = |wv: &[f32]| super::amx::Packed::from_rows(wv, out, inp);
    if let Some(y) = amx_product(g, w, &packs.0.bwd, pack, (out, inp))? {
        return Ok(y);
    }
    Ok(g.matmul(w)?)
}

/// `x w^T` for `x: [n, in]` and a weight `w: [out, in]`, both f32 on the CPU: the product
/// candle's matmul computes, minus its zero-filling of the output (the GEMM overwrites every
/// element; the fill was ~5% of an evaluation's time). `None` for other dtypes, devices or
/// ranks. No gradient: callers attach one when they need it.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    if [x, w]
        .iter()
        .any(|t| t.dtype() != DType::F32 || !matches!(t.device(), Device::Cpu) || t.rank() != 2)
    {
        return Ok(None);
    }
    let (n, k) = x.dims2()?;
    let (out, kw) = w.dims2()?;
    if k != kw {
        return Err(crate::error::Error::Internal(format!(
            "linear: input {:?} does not fit weight {:?}",
            x.shape(),
            w.shape()
        )));
    }
    let y = f32_slices([x, w], |[xv, wv]| {
        let mut y: Vec<f32> = Vec::with_capacity(n * out);
        let threads = candle_core::utils::get_num_threads();
        let par = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        // SAFETY: x is [n, k] row-major, w is [out, k] row-major read as its transpose [k, out]
        // (row stride 1, column stride k), y has room for [n, out]; with alpha = 0 and
        // read_dst = false the GEMM writes every element of y without reading it, so the
        // length can be set afterwards.
        unsafe {
            gemm::gemm(
                n,
                out,
                k,
                y.as_mut_ptr(),
                1,
                out as isize,
                false,
                xv.as_ptr(),
                1,
                k as isize,
                wv.as_ptr(),
                k as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                par,
            );
            y.set_len(n * out);
        }
        y
    })?;
    match y {
        Some(y) => Ok(Some(Tensor::from_vec(y, (n, out), x.device())?)),
        None => Ok(None),
    }
}

/// A raw output pointer shared by parallel tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
// SAFETY: every user has each task write its own block (attention: a (batch, head) block;
// the AMX product: rows x columns of the output); no two blocks overlap.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

#[inline(always)]
fn softmax_masked_body(row: &mut [f32], mask: &[f32]) {
    for (x, m) in row.iter_mut().zip(mask) {
        *x += *m;
    }
    let mx = row_max_body(row);
    let mut acc = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for j in 0..LANES {
            c[j] = exp(c[j] - mx);
            acc[j] += c[j];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for x in chunks.into_remainder() {
        *x = exp(*x - mx);
        sum += *x;
    }
    let inv = 1.0 / sum;
    for x in row.iter_mut() {
        *x *= inv;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,fma")]
unsafe fn softmax_masked_avx512(row: &mut [f32], mask: &[f32]) {
    softmax_masked_body(row, mask)
}

/// Shapes of one attention call: queries `[b, t, nh, hd]`, keys and values `[b, tk, nkv, hd]`,
/// an additive mask `[b, 1, t, tk]`.
#[derive(Debug, Clone, Copy)]
struct AttnDims {
    b: usize,
    t: usize,
    tk: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
}

/// A strided matrix view for [`gemm1`]: pointer, column stride, row stride (in elements).
type View<T> = (T, isize, isize);

/// `dst = alpha dst + beta lhs rhs` (`[m, k] x [k, n]`) on the calling thread (the attention
/// kernels run one per task); `alpha` is ignored unless `read_dst`.
///
/// # Safety
/// Every view must be valid for its extent: `m x n` for `dst`, `m x k` for `lhs`, `k x n`
/// for `rhs`, with the given strides.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm1(
    (m, n, k): (usize, usize, usize),
    dst: View<*mut f32>,
    read_dst: bool,
    lhs: View<*const f32>,
    rhs: View<*const f32>,
    alpha: f32,
    beta: f32,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst.0,
        dst.1,
        dst.2,
        read_dst,
        lhs.0,
        lhs.1,
        lhs.2,
        rhs.0,
        rhs.1,
        rhs.2,
        alpha,
        beta,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// `p = softmax(scale q_h k_g^T + mask)` for batch row `bi`, query head `h` and key/value head
/// `kh` (`p: [t, tk]`), with a single-threaded GEMM reading the heads in place.
#[allow(clippy::too_many_arguments)]
fn head_probs(
    q: &[f32],
    k: &[f32],
    mask: &[f32],
    d: AttnDims,
    (bi, h, kh): (usize, usize, usize),
    scale: f32,
    wide: bool,
    p: &mut [f32],
) {
    let AttnDims {
        t, tk, nh, nkv, hd, ..
    } = d;
    let q0 = bi * t * nh * hd + h * hd;
    let k0 = bi * tk * nkv * hd + kh * hd;
    assert!(p.len() == t * tk && mask.len() >= (bi + 1) * t * tk);
    assert!(t == 0 || q.len() >= q0 + (t - 1) * nh * hd + hd);
    assert!(tk == 0 || k.len() >= k0 + (tk - 1) * nkv * hd + hd);
    // SAFETY: the asserts above bound every offset and stride the GEMM reads and writes.
    unsafe {
        gemm1(
            (t, tk, hd),
            (p.as_mut_ptr(), 1, tk as isize),
            false,
            (q.as_ptr().add(q0), 1, (nh * hd) as isize),
            (k.as_ptr().add(k0), (nkv * hd) as isize, 1),
            0.0,
            scale,
        );
    }
    for (qi, row) in p.chunks_exact_mut(tk).enumerate() {
        let m = &mask[(bi * t + qi) * tk..(bi * t + qi + 1) * tk];
        #[cfg(target_arch = "x86_64")]
        if wide {
            // SAFETY: `avx512()` checked the features the function is compiled for.
            unsafe { softmax_masked_avx512(row, m) };
            continue;
        }
        let _ = wide;
        softmax_masked_body(row, m);
    }
}

/// `softmax(scale q k^T + mask) v` per (batch row, head), in parallel over those pairs, each
/// with a single-threaded GEMM that reads the heads in place (query head `h` uses key/value
/// head `h / (nh / nkv)`), writing `[b, t, nh, hd]`.
fn attention_slices(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[f32],
    d: AttnDims,
    scale: f32,
) -> Vec<f32> {
    let AttnDims {
        b,
        t,
        tk,
        nh,
        nkv,
        hd,
    } = d;
    let mut out = vec![0f32; b * t * nh * hd];
    let dst = OutPtr(out.as_mut_ptr());
    let wide = avx512();
    let rep = nh / nkv;
    (0..b * nh).into_par_iter().for_each(|bh| {
        let (bi, h) = (bh / nh, bh % nh);
        let kh = h / rep;
        let mut s = vec![0f32; t * tk];
        let q0 = bi * t * nh * hd + h * hd;
        let k0 = bi * tk * nkv * hd + kh * hd;
        head_probs(q, k, mask, d, (bi, h, kh), scale, wide, &mut s);
        // SAFETY: the offsets and strides stay inside v (its length was checked against the
        // dims) and inside this task's own block of `out` (rows bi*t.., columns h*hd..).
        unsafe {
            gemm1(
                (t, hd, tk),
                (dst.get().add(q0), 1, (nh * hd) as isize),
                false,
                (s.as_ptr(), 1, tk as isize),
                (v.as_ptr().add(k0), 1, (nkv * hd) as isize),
                0.0,
                1.0,
            );
        }
    });
    out
}

/// The gradients of [`attention_slices`] for the output gradient `dout: [b, t, nh, hd]`:
/// `(dq, dk, dv)` in the layouts of `q`, `k`, `v`. Per (batch row, key/value head), in
/// parallel, for each query head of the group: the probabilities `P` are recomputed (cheaper
/// than keeping `[b, nh, t, tk]` per layer), then `dP = dO V^T`, `dS = P (dP - rowsum(P dP))`,
/// `dQ = scale dS K`, `dK += scale dS^T Q`, `dV += P^T dO`. A group's key/value gradients are
/// written only by its own task.
fn attention_backward_slices(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[f32],
    dout: &[f32],
    d: AttnDims,
    scale: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let AttnDims {
        b,
        t,
        tk,
        nh,
        nkv,
        hd,
    } = d;
    let mut dq = vec![0f32; b * t * nh * hd];
    let mut dk = vec![0f32; b * tk * nkv * hd];
    let mut dv = vec![0f32; b * tk * nkv * hd];
    let (dqp, dkp, dvp) = (
        OutPtr(dq.as_mut_ptr()),
        OutPtr(dk.as_mut_ptr()),
        OutPtr(dv.as_mut_ptr()),
    );
    let wide = avx512();
    let rep = nh / nkv;
    (0..b * nkv).into_par_iter().for_each(|bg| {
        let (bi, kh) = (bg / nkv, bg % nkv);
        let mut p = vec![0f32; t * tk];
        let mut dp = vec![0f32; t * tk];
        let k0 = bi * tk * nkv * hd + kh * hd;
        let (ks, qs) = ((nkv * hd) as isize, (nh * hd) as isize);
        for h in kh * rep..(kh + 1) * rep {
            let q0 = bi * t * nh * hd + h * hd;
            head_probs(q, k, mask, d, (bi, h, kh), scale, wide, &mut p);
            // SAFETY (the GEMMs below): offsets and strides stay inside k, v, dout (lengths
            // checked against the dims by the caller), inside the task's own scratch, and
            // inside this task's blocks of dq (rows bi, head h) and dk/dv (rows bi, head kh).
            unsafe {
                // dP = dO V^T
                gemm1(
                    (t, tk, hd),
                    (dp.as_mut_ptr(), 1, tk as isize),
                    false,
                    (dout.as_ptr().add(q0), 1, qs),
                    (v.as_ptr().add(k0), ks, 1),
                    0.0,
                    1.0,
                );
            }
            // dS = P (dP - rowsum(P dP)), into dp.
            for (pr, dr) in p.chunks_exact(tk).zip(dp.chunks_exact_mut(tk)) {
                let dot: f32 = pr.iter().zip(dr.iter()).map(|(a, b)| a * b).sum();
                for (x, &pp) in dr.iter_mut().zip(pr) {
                    *x = pp * (*x - dot);
                }
            }
            unsafe {
                // dQ = scale dS K
                gemm1(
                    (t, hd, tk),
                    (dqp.get().add(q0), 1, qs),
                    false,
                    (dp.as_ptr(), 1, tk as isize),
                    (k.as_ptr().add(k0), 1, ks),
                    0.0,
                    scale,
                );
                // dK += scale dS^T Q
                gemm1(
                    (tk, hd, t),
                    (dkp.get().add(k0), 1, ks),
                    true,
                    (dp.as_ptr(), tk as isize, 1),
                    (q.as_ptr().add(q0), 1, qs),
                    1.0,
                    scale,
                );
                // dV += P^T dO
                gemm1(
                    (tk, hd, t),
                    (dvp.get().add(k0), 1, ks),
                    true,
                    (p.as_ptr(), tk as isize, 1),
                    (dout.as_ptr().add(q0), 1, qs),
                    1.0,
                    1.0,
                );
            }
        }
    });
    (dq, dk, dv)
}

/// Shapes of an attention call, checked: `q: [B, T, nh, hd]`, `k`, `v: [B, Tk, nkv, hd]`,
/// `mask: [B, 1, T, Tk]`, `nh` a multiple of `nkv`.
fn attention_dims(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<AttnDims> {
    let (b, t, nh, hd) = q.dims4()?;
    let (bk, tk, nkv, hdk) = k.dims4()?;
    if bk != b
        || hdk != hd
        || v.dims4()? != (b, tk, nkv, hd)
        || mask.dims4()? != (b, 1, t, tk)
        || nkv == 0
        || nh % nkv != 0
    {
        return Err(crate::error::Error::Internal(format!(
            "attention shapes do not fit: q {:?}, k {:?}, v {:?}, mask {:?}",
            q.shape(),
            k.shape(),
            v.shape(),
            mask.shape()
        )));
    }
    Ok(AttnDims {
        b,
        t,
        tk,
        nh,
        nkv,
        hd,
    })
}

/// Shapes of an attention call on 2-D projections, checked: `q: [B * T, nh * hd]`, `k`, `v:
/// [B * Tk, nkv * hd]` (the memory layout of `[B, T, heads, hd]`), `mask: [B, 1, T, Tk]`.
fn attention_dims_2d(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    heads: (usize, usize),
) -> Result<AttnDims> {
    let (nh, nkv) = heads;
    let (bt, qw) = q.dims2()?;
    let (btk, kw) = k.dims2()?;
    let (b, _, t, tk) = mask.dims4()?;
    let bad = nh == 0
        || nkv == 0
        || nh % nkv != 0
        || qw % nh != 0
        || b == 0
        || bt != b * t
        || btk != b * tk
        || kw * nh != qw * nkv
        || v.dims2()? != (btk, kw);
    if bad {
        return Err(crate::error::Error::Internal(format!(
            "attention shapes do not fit: q {:?}, k {:?}, v {:?}, mask {:?}, {nh} query and \
             {nkv} key/value heads",
            q.shape(),
            k.shape(),
            v.shape(),
            mask.shape()
        )));
    }
    Ok(AttnDims {
        b,
        t,
        tk,
        nh,
        nkv,
        hd: qw / nh,
    })
}

/// Attention on 2-D projections (see `attention_dims_2d`) as plain functions without a graph,
/// for the training layer, which writes its own backward pass: `forward` gives
/// `[B * T, nh * hd]`, `backward` gives `(dq, dk, dv)` for an output gradient `dout` (the
/// probabilities are recomputed). f32 CPU tensors only.
pub mod attention_2d {
    use super::*;

    pub fn forward(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
        scale: f32,
        heads: (usize, usize),
    ) -> Result<Tensor> {
        let d = attention_dims_2d(q, k, v, mask, heads)?;
        let out = f32_slices([q, k, v, mask], |[q, k, v, m]| {
            attention_slices(q, k, v, m, d, scale)
        })?
        .ok_or_else(not_f32_cpu)?;
        Ok(Tensor::from_vec(out, q.shape(), q.device())?)
    }

    pub fn backward(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
        dout: &Tensor,
        scale: f32,
        heads: (usize, usize),
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let d = attention_dims_2d(q, k, v, mask, heads)?;
        let (gq, gk, gv) = f32_slices([q, k, v, mask, dout], |[q, k, v, m, g]| {
            attention_backward_slices(q, k, v, m, g, d, scale)
        })?
        .ok_or_else(not_f32_cpu)?;
        Ok((
            Tensor::from_vec(gq, q.shape(), q.device())?,
            Tensor::from_vec(gk, k.shape(), k.device())?,
            Tensor::from_vec(gv, v.shape(), v.device())?,
        ))
    }
}

/// The error of a slice kernel given tensors that are not f32 on the CPU.
fn not_f32_cpu() -> crate::error::Error {
    crate::error::Error::Internal("this CPU kernel needs f32 tensors on the CPU".into())
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

/// Attention for inference on the CPU in f32: queries `[B, T, nh, hd]`, keys and values
/// `[B, Tk, nkv, hd]` (grouped-query heads read in place, no copies), an additive mask
/// `[B, 1, T, Tk]`; returns `[B, T, nh, hd]`, the layout the output projection reads. `None`
/// for other dtypes and devices or when a gradient is tracked (the caller then uses candle's
/// ops).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f32,
) -> Result<Option<Tensor>> {
    let all = [q, k, v, mask];
    if all
        .iter()
        .any(|x| x.dtype() != DType::F32 || !matches!(x.device(), Device::Cpu) || x.track_op())
    {
        return Ok(None);
    }
    let dims = attention_dims(q, k, v, mask)?;
    let (b, t, nh, hd) = (dims.b, dims.t, dims.nh, dims.hd);
    let out = f32_slices([q, k, v, mask], |[q, k, v, m]| {
        attention_slices(q, k, v, m, dims, scale)
    })?;
    let Some(out) = out else {
        return Ok(None);
    };
    Ok(Some(Tensor::from_vec(out, (b, t, nh, hd), q.device())?))
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

    /// Grouped-query heads, more keys than queries, causal over the last `t` keys, plus one
    /// hidden key and one fully masked row: `(dims, q, k, v, mask)`.
    fn attention_case() -> (AttnDims, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
        let d = AttnDims {
            b: 2,
            t: 5,
            tk: 7,
            nh: 4,
            nkv: 2,
            hd: 8,
        };
        let q: Vec<f32> = (0..d.b * d.t * d.nh * d.hd)
            .map(|i| case_val(i, 7_919))
            .collect();
        let k: Vec<f32> = (0..d.b * d.tk * d.nkv * d.hd)
            .map(|i| case_val(i, 104_729))
            .collect();
        let v: Vec<f32> = (0..d.b * d.tk * d.nkv * d.hd)
            .map(|i| case_val(i, 31))
            .collect();
        let mut mask = vec![0f32; d.b * d.t * d.tk];
        for bi in 0..d.b {
            for qi in 0..d.t {
                for ki in 0..d.tk {
                    if ki > qi + (d.tk - d.t) || (bi == 1 && ki == 3) || (bi == 0 && qi == 2) {
                        mask[(bi * d.t + qi) * d.tk + ki] = -1e30;
                    }
                }
            }
        }
        (d, q, k, v, mask)
    }

    /// Deterministic values in [-1, 1).
    fn case_val(i: usize, m: usize) -> f32 {
        ((i * m) % 1_009) as f32 / 500.0 - 1.0
    }

    #[test]
    fn attention_matches_a_naive_f64_computation() {
        let (d, q, k, v, mask) = attention_case();
        let scale = 0.3f32;
        let got = attention_slices(&q, &k, &v, &mask, d, scale);
        let rep = d.nh / d.nkv;
        for bi in 0..d.b {
            for qi in 0..d.t {
                for h in 0..d.nh {
                    let kh = h / rep;
                    let qv = |j: usize| f64::from(q[((bi * d.t + qi) * d.nh + h) * d.hd + j]);
                    let kv = |ki: usize, j: usize| ((bi * d.tk + ki) * d.nkv + kh) * d.hd + j;
                    let sc: Vec<f64> = (0..d.tk)
                        .map(|ki| {
                            let dot: f64 = (0..d.hd).map(|j| qv(j) * f64::from(k[kv(ki, j)])).sum();
                            f64::from(scale) * dot + f64::from(mask[(bi * d.t + qi) * d.tk + ki])
                        })
                        .collect();
                    let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = sc.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for j in 0..d.hd {
                        let want: f64 = (0..d.tk)
                            .map(|ki| e[ki] / z * f64::from(v[kv(ki, j)]))
                            .sum();
                        let y = f64::from(got[((bi * d.t + qi) * d.nh + h) * d.hd + j]);
                        assert!(
                            (y - want).abs() < 1e-5,
                            "b{bi} q{qi} h{h} d{j}: {y} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn attention_backward_matches_candle_autograd_in_f64() {
        use candle_core::Var;
        let (d, q, k, v, mask) = attention_case();
        let r: Vec<f32> = (0..d.b * d.t * d.nh * d.hd)
            .map(|i| case_val(i, 613))
            .collect();
        let scale = 0.3f32;
        let (gq, gk, gv) = attention_backward_slices(&q, &k, &v, &mask, &r, d, scale);

        // Reference: d/dx sum(attention(q, k, v) * r) with candle's plain f64 ops.
        let dev = Device::Cpu;
        let f64t = |x: &[f32], shape: (usize, usize, usize, usize)| {
            Tensor::from_vec(
                x.iter().map(|&y| f64::from(y)).collect::<Vec<_>>(),
                shape,
                &dev,
            )
            .unwrap()
        };
        let qv = Var::from_tensor(&f64t(&q, (d.b, d.t, d.nh, d.hd))).unwrap();
        let kv = Var::from_tensor(&f64t(&k, (d.b, d.tk, d.nkv, d.hd))).unwrap();
        let vv = Var::from_tensor(&f64t(&v, (d.b, d.tk, d.nkv, d.hd))).unwrap();
        let rep = d.nh / d.nkv;
        let heads = |x: &Tensor| -> Tensor {
            // [b, tk, nkv, hd] -> [b, nh, tk, hd], each key/value head repeated `rep` times.
            x.transpose(1, 2)
                .unwrap()
                .unsqueeze(2)
                .unwrap()
                .expand((d.b, d.nkv, rep, d.tk, d.hd))
                .unwrap()
                .reshape((d.b, d.nh, d.tk, d.hd))
                .unwrap()
        };
        let qh = qv
            .as_tensor()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap();
        let (kh, vh) = (heads(kv.as_tensor()), heads(vv.as_tensor()));
        let m = f64t(&mask, (d.b, 1, d.t, d.tk));
        let sc = (qh.matmul(&kh.t().unwrap()).unwrap() * f64::from(scale))
            .unwrap()
            .broadcast_add(&m)
            .unwrap();
        let p = candle_nn::ops::softmax(&sc, candle_core::D::Minus1).unwrap();
        let out = p.matmul(&vh).unwrap().transpose(1, 2).unwrap();
        let loss = (out * f64t(&r, (d.b, d.t, d.nh, d.hd)))
            .unwrap()
            .sum_all()
            .unwrap();
        let g = loss.backward().unwrap();
        for (name, var, got) in [("q", &qv, &gq), ("k", &kv, &gk), ("v", &vv, &gv)] {
            let want: Vec<f64> = g
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(want.len(), got.len(), "{name}");
            for (i, (w, x)) in want.iter().zip(got.iter()).enumerate() {
                assert!(
                    (w - f64::from(*x)).abs() < 1e-4 * (1.0 + w.abs()),
                    "d{name}[{i}]: {x} vs {w}"
                );
            }
        }
    }

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

    #[test]
    fn linear_matches_candle_matmul() {
        let dev = Device::Cpu;
        for (n, k, out) in [(1, 3, 2), (37, 64, 29), (130, 96, 257)] {
            let x = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (out, k), &dev).unwrap();
            let a = linear(&x, &w).unwrap().unwrap().to_vec2::<f32>().unwrap();
            let b = x.matmul(&w.t().unwrap()).unwrap().to_vec2::<f32>().unwrap();
            for (ra, rb) in a.iter().zip(&b) {
                for (p, q) in ra.iter().zip(rb) {
                    assert!(
                        (p - q).abs() <= 1e-4 * q.abs().max(1.0),
                        "{n}x{k}x{out}: {p} vs {q}"
                    );
                }
            }
        }
        // A transposed (non-contiguous) input is made contiguous first.
        let x = Tensor::randn(0f32, 1.0, (8, 5), &dev).unwrap().t().unwrap();
        let w = Tensor::randn(0f32, 1.0, (3, 8), &dev).unwrap();
        let a = linear(&x, &w).unwrap().unwrap().to_vec2::<f32>().unwrap();
        let b = x.matmul(&w.t().unwrap()).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(a.len(), 5);
        for (ra, rb) in a.iter().zip(&b) {
            for (p, q) in ra.iter().zip(rb) {
                assert!((p - q).abs() <= 1e-4 * q.abs().max(1.0));
            }
        }
    }
}
