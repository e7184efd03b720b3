//! Attention on the CPU in f32, `softmax(scale q k^T + mask) v`, per (batch row, head) in
//! parallel, each task with a single-threaded GEMM that reads the heads in place (grouped-query
//! heads share their key/value head without copies).
//!
//! In: queries, keys and values with an additive mask `[B, 1, T, Tk]`: `[B, T, heads, hd]`
//! tensors for inference ([`attention`]), or the 2-D projections `[B * T, heads * hd]` the
//! training layer holds ([`attention_2d`]). Out: the attention output in the queries' layout
//! and, for training, `(dq, dk, dv)` from an output gradient, with the probabilities recomputed
//! instead of kept.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use super::activation::exp;
use super::softmax::{row_max_body, LANES};
use crate::error::Result;
use crate::model::cpu::{avx512, f32_slices, not_f32_cpu, OutPtr};

/// `row = softmax(row + mask)` in place, with the row max of [`super::softmax`] and sums in
/// [`LANES`] lanes.
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

/// [`softmax_masked_body`] compiled for AVX-512.
///
/// # Safety
/// The CPU must have the features it is compiled for ([`avx512`] says so).
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
            // SAFETY: offsets and strides stay inside v and dout (lengths checked against the
            // dims by the caller) and inside the task's own scratch `dp`, which is t x tk.
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
            // SAFETY: offsets and strides stay inside k and q (lengths checked against the dims
            // by the caller), inside the task's own scratch (`dp`, `p`: t x tk), and inside this
            // task's blocks of dq (rows bi, head h) and dk/dv (rows bi, head kh), which no
            // other task writes.
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
}
