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

impl AttnDims {
    fn heads(&self) -> Heads {
        Heads {
            nh: self.nh,
            nkv: self.nkv,
            hd: self.hd,
        }
    }

    /// The batch as blocks: row `i` is queries `i * t..`, keys `i * tk..`, mask `i * t * tk..`.
    fn blocks(&self) -> Vec<Block> {
        (0..self.b)
            .map(|i| Block {
                q: i * self.t,
                t: self.t,
                k: i * self.tk,
                tk: self.tk,
                mask: i * self.t * self.tk,
            })
            .collect()
    }
}

/// The heads of an attention call: `nh` query heads over `nkv` key/value heads (a multiple),
/// `hd` values each; a token's queries are `nh * hd` values, its keys `nkv * hd`.
#[derive(Debug, Clone, Copy)]
struct Heads {
    nh: usize,
    nkv: usize,
    hd: usize,
}

/// One block of an attention call ([`attention_2d::forward_blocks`]): the `t` queries from
/// query token `q` attend to the `tk` keys (and values) from key token `k`, under the additive
/// mask `[t, tk]` that starts at element `mask` of the mask's values. A batch of equal rows is
/// one block per row; rows of different lengths are blocks of their own sizes, with no padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    pub q: usize,
    pub t: usize,
    pub k: usize,
    pub tk: usize,
    pub mask: usize,
}

/// Checks that `blocks` fit `nq` query tokens, `nk` key tokens and `mask_len` mask values, that
/// their query ranges do not overlap (each task writes its block's outputs) and, with
/// `own_keys` (the backward pass writes key and value gradients per block), neither do their
/// key ranges.
fn check_blocks(
    blocks: &[Block],
    nq: usize,
    nk: usize,
    mask_len: usize,
    own_keys: bool,
) -> Result<()> {
    let bad = |why: &str| {
        Err(crate::error::Error::Internal(format!(
            "attention blocks {why}: {blocks:?} over {nq} queries, {nk} keys, {mask_len} mask \
             values"
        )))
    };
    for b in blocks {
        if b.q + b.t > nq || b.k + b.tk > nk || b.mask + b.t * b.tk > mask_len {
            return bad("run past their tensors");
        }
        if b.t > 0 && b.tk == 0 {
            return bad("give queries no keys");
        }
    }
    let disjoint = |mut r: Vec<(usize, usize)>| {
        r.retain(|&(_, len)| len > 0);
        r.sort_unstable();
        r.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0)
    };
    if !disjoint(blocks.iter().map(|b| (b.q, b.t)).collect()) {
        return bad("overlap in their queries");
    }
    if own_keys && !disjoint(blocks.iter().map(|b| (b.k, b.tk)).collect()) {
        return bad("overlap in their keys");
    }
    Ok(())
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

/// `p = softmax(scale q_h k_g^T + mask)` for block `blk`, query head `h` and key/value head
/// `kh` (`p: [t, tk]`), with a single-threaded GEMM reading the heads in place.
#[allow(clippy::too_many_arguments)]
fn head_probs(
    q: &[f32],
    k: &[f32],
    mask: &[f32],
    blk: Block,
    hs: Heads,
    (h, kh): (usize, usize),
    scale: f32,
    wide: bool,
    p: &mut [f32],
) {
    let Heads { nh, nkv, hd } = hs;
    let (t, tk) = (blk.t, blk.tk);
    let q0 = blk.q * nh * hd + h * hd;
    let k0 = blk.k * nkv * hd + kh * hd;
    assert!(t > 0 && tk > 0 && p.len() == t * tk && mask.len() >= blk.mask + t * tk);
    assert!(q.len() >= q0 + (t - 1) * nh * hd + hd);
    assert!(k.len() >= k0 + (tk - 1) * nkv * hd + hd);
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
    let masks = &mask[blk.mask..blk.mask + t * tk];
    for (row, m) in p.chunks_exact_mut(tk).zip(masks.chunks_exact(tk)) {
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

/// `softmax(scale q k^T + mask) v` per (block, head), in parallel over those pairs, each with
/// a single-threaded GEMM that reads the heads in place (query head `h` uses key/value head
/// `h / (nh / nkv)`), writing `[nq, nh, hd]` (zeros at queries no block covers). The blocks
/// must have passed [`check_blocks`].
fn attention_slices(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[f32],
    blocks: &[Block],
    hs: Heads,
    scale: f32,
) -> Vec<f32> {
    let Heads { nh, nkv, hd } = hs;
    let mut out = vec![0f32; q.len()];
    let dst = OutPtr(out.as_mut_ptr());
    let wide = avx512();
    let rep = nh / nkv;
    (0..blocks.len() * nh).into_par_iter().for_each(|bh| {
        let (blk, h) = (blocks[bh / nh], bh % nh);
        if blk.t == 0 {
            return;
        }
        let kh = h / rep;
        let mut s = vec![0f32; blk.t * blk.tk];
        let q0 = blk.q * nh * hd + h * hd;
        let k0 = blk.k * nkv * hd + kh * hd;
        head_probs(q, k, mask, blk, hs, (h, kh), scale, wide, &mut s);
        assert!(v.len() >= k0 + (blk.tk - 1) * nkv * hd + hd);
        // SAFETY: the offsets and strides stay inside v (asserted) and inside this task's own
        // block of `out` (the block's query rows, columns h*hd..; blocks' queries are disjoint).
        unsafe {
            gemm1(
                (blk.t, hd, blk.tk),
                (dst.get().add(q0), 1, (nh * hd) as isize),
                false,
                (s.as_ptr(), 1, blk.tk as isize),
                (v.as_ptr().add(k0), 1, (nkv * hd) as isize),
                0.0,
                1.0,
            );
        }
    });
    out
}

/// The gradients of [`attention_slices`] for the output gradient `dout` (the queries'
/// layout): `(dq, dk, dv)` in the layouts of `q`, `k`, `v`. Per (block, query head), in
/// parallel: the probabilities `P` are recomputed (cheaper than keeping them per layer), then
/// `dP = dO V^T`, `dS = P (dP - rowsum(P dP))`, `dQ = scale dS K`, `dK += scale dS^T Q`,
/// `dV += P^T dO`. The `nh / nkv` query heads of a key/value head write their key and value
/// gradients to separate parts, summed at the end, so a long block's heads run in parallel
/// too (Gemma 3 270M has one key/value head); the blocks' keys must be disjoint
/// ([`check_blocks`] with `own_keys`).
#[allow(clippy::too_many_arguments)]
fn attention_backward_slices(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[f32],
    dout: &[f32],
    blocks: &[Block],
    hs: Heads,
    scale: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let Heads { nh, nkv, hd } = hs;
    let rep = nh / nkv;
    let mut dq = vec![0f32; q.len()];
    let mut dk_parts = vec![0f32; rep * k.len()];
    let mut dv_parts = vec![0f32; rep * k.len()];
    let (dqp, dkp, dvp) = (
        OutPtr(dq.as_mut_ptr()),
        OutPtr(dk_parts.as_mut_ptr()),
        OutPtr(dv_parts.as_mut_ptr()),
    );
    let wide = avx512();
    assert!(dout.len() == q.len() && v.len() == k.len());
    (0..blocks.len() * nh).into_par_iter().for_each(|bh| {
        let (blk, h) = (blocks[bh / nh], bh % nh);
        if blk.t == 0 {
            return;
        }
        let kh = h / rep;
        let (t, tk) = (blk.t, blk.tk);
        let mut p = vec![0f32; t * tk];
        let mut dp = vec![0f32; t * tk];
        let k0 = blk.k * nkv * hd + kh * hd;
        // This head's part of the key and value gradients.
        let part = (h % rep) * k.len() + k0;
        let (ks, qs) = ((nkv * hd) as isize, (nh * hd) as isize);
        let q0 = blk.q * nh * hd + h * hd;
        // Bounds q and k (and so v, dout, dq and each part, of the same lengths) for this block.
        head_probs(q, k, mask, blk, hs, (h, kh), scale, wide, &mut p);
        // SAFETY: offsets and strides stay inside v and dout (same lengths as k and q,
        // asserted, and head_probs bounded q and k) and inside the task's own scratch `dp`,
        // which is t x tk.
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
        // SAFETY: offsets and strides stay inside k and q (bounded above), inside the task's
        // own scratch (`dp`, `p`: t x tk), and inside this task's blocks of dq (the block's
        // query rows, head h) and of its part of dk/dv (the block's key rows, head kh, part
        // h % rep), which no other task writes.
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
            // dK = scale dS^T Q
            gemm1(
                (tk, hd, t),
                (dkp.get().add(part), 1, ks),
                false,
                (dp.as_ptr(), tk as isize, 1),
                (q.as_ptr().add(q0), 1, qs),
                0.0,
                scale,
            );
            // dV = P^T dO
            gemm1(
                (tk, hd, t),
                (dvp.get().add(part), 1, ks),
                false,
                (p.as_ptr(), tk as isize, 1),
                (dout.as_ptr().add(q0), 1, qs),
                0.0,
                1.0,
            );
        }
    });
    (dq, sum_parts(dk_parts, rep), sum_parts(dv_parts, rep))
}

/// The sum of the `rep` equal parts of `parts`.
fn sum_parts(mut parts: Vec<f32>, rep: usize) -> Vec<f32> {
    let n = parts.len() / rep;
    let (first, rest) = parts.split_at_mut(n);
    for part in rest.chunks_exact(n) {
        for (a, b) in first.iter_mut().zip(part) {
            *a += b;
        }
    }
    parts.truncate(n);
    parts
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

/// The heads of 2-D projections `q: [Nq, nh * hd]`, `k`, `v: [Nk, nkv * hd]`, checked.
fn heads_2d(q: &Tensor, k: &Tensor, v: &Tensor, heads: (usize, usize)) -> Result<Heads> {
    let (nh, nkv) = heads;
    let (_, qw) = q.dims2()?;
    let (nk, kw) = k.dims2()?;
    if nh == 0 || nkv == 0 || nh % nkv != 0 || qw % nh != 0 || kw * nh != qw * nkv {
        return Err(crate::error::Error::Internal(format!(
            "attention heads do not fit: q {:?}, k {:?}, {nh} query and {nkv} key/value heads",
            q.shape(),
            k.shape()
        )));
    }
    if v.dims2()? != (nk, kw) {
        return Err(crate::error::Error::Internal(format!(
            "values {:?} do not match keys {:?}",
            v.shape(),
            k.shape()
        )));
    }
    Ok(Heads {
        nh,
        nkv,
        hd: qw / nh,
    })
}

/// Attention on 2-D projections (see `attention_dims_2d`) as plain functions without a graph,
/// for the training layer, which writes its own backward pass: `forward` gives
/// `[B * T, nh * hd]`, `backward` gives `(dq, dk, dv)` for an output gradient `dout` (the
/// probabilities are recomputed). The `_blocks` forms take any [`Block`]s of queries
/// `[Nq, nh * hd]` over keys and values `[Nk, nkv * hd]` with their masks' values in one tensor
/// (rows of different lengths without padding). f32 CPU tensors only.
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
        forward_blocks(q, k, v, mask, &d.blocks(), scale, heads)
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
        backward_blocks(q, k, v, mask, &d.blocks(), dout, scale, heads)
    }

    /// The attention of each block's queries over its keys: `[Nq, nh * hd]`, zeros at queries
    /// no block covers. Blocks must not share queries.
    pub fn forward_blocks(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
        blocks: &[Block],
        scale: f32,
        heads: (usize, usize),
    ) -> Result<Tensor> {
        let hs = heads_2d(q, k, v, heads)?;
        check_blocks(blocks, q.dim(0)?, k.dim(0)?, mask.elem_count(), false)?;
        let out = f32_slices([q, k, v, mask], |[q, k, v, m]| {
            attention_slices(q, k, v, m, blocks, hs, scale)
        })?
        .ok_or_else(not_f32_cpu)?;
        Ok(Tensor::from_vec(out, q.shape(), q.device())?)
    }

    /// `(dq, dk, dv)` of [`forward_blocks`] for the output gradient `dout` (zeros where no
    /// block reads). Blocks must share neither queries nor keys (a key that several blocks
    /// see is given to each as a copy of its own, and the copies' gradients summed after).
    #[allow(clippy::too_many_arguments)]
    pub fn backward_blocks(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
        blocks: &[Block],
        dout: &Tensor,
        scale: f32,
        heads: (usize, usize),
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let hs = heads_2d(q, k, v, heads)?;
        check_blocks(blocks, q.dim(0)?, k.dim(0)?, mask.elem_count(), true)?;
        if dout.dims() != q.dims() {
            return Err(crate::error::Error::Internal(format!(
                "attention output gradient {:?} does not match the queries {:?}",
                dout.shape(),
                q.shape()
            )));
        }
        let (gq, gk, gv) = f32_slices([q, k, v, mask, dout], |[q, k, v, m, g]| {
            attention_backward_slices(q, k, v, m, g, blocks, hs, scale)
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
        attention_slices(q, k, v, m, &dims.blocks(), dims.heads(), scale)
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
        let got = attention_slices(&q, &k, &v, &mask, &d.blocks(), d.heads(), scale);
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
        let (gq, gk, gv) =
            attention_backward_slices(&q, &k, &v, &mask, &r, &d.blocks(), d.heads(), scale);

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
    fn blocks_of_their_own_lengths_equal_separate_calls_and_may_not_share_keys() {
        // Queries 0..3 over keys 0..4 and queries 3..5 over keys 4..7, masks one after the
        // other; each must equal a call on its own slices.
        let (d, q, k, v, mask) = attention_case();
        let hs = d.heads();
        let (qw, kw) = (d.nh * d.hd, d.nkv * d.hd);
        let (q, k, v) = (&q[..5 * qw], &k[..7 * kw], &v[..7 * kw]);
        let blocks = [
            Block {
                q: 0,
                t: 3,
                k: 0,
                tk: 4,
                mask: 0,
            },
            Block {
                q: 3,
                t: 2,
                k: 4,
                tk: 3,
                mask: 12,
            },
        ];
        let mask = &mask[..18];
        let dout: Vec<f32> = (0..q.len()).map(|i| case_val(i, 613)).collect();
        let got = attention_slices(q, k, v, mask, &blocks, hs, 0.3);
        let (gq, gk, gv) = attention_backward_slices(q, k, v, mask, &dout, &blocks, hs, 0.3);
        for b in blocks {
            let one = Block {
                q: 0,
                k: 0,
                mask: 0,
                ..b
            };
            let qs = &q[b.q * qw..(b.q + b.t) * qw];
            let (ks, vs) = (
                &k[b.k * kw..(b.k + b.tk) * kw],
                &v[b.k * kw..(b.k + b.tk) * kw],
            );
            let ms = &mask[b.mask..b.mask + b.t * b.tk];
            let want = attention_slices(qs, ks, vs, ms, &[one], hs, 0.3);
            assert_eq!(&got[b.q * qw..(b.q + b.t) * qw], &want[..]);
            let ds = &dout[b.q * qw..(b.q + b.t) * qw];
            let (wq, wk, wv) = attention_backward_slices(qs, ks, vs, ms, ds, &[one], hs, 0.3);
            assert_eq!(&gq[b.q * qw..(b.q + b.t) * qw], &wq[..]);
            assert_eq!(&gk[b.k * kw..(b.k + b.tk) * kw], &wk[..]);
            assert_eq!(&gv[b.k * kw..(b.k + b.tk) * kw], &wv[..]);
        }
        assert!(check_blocks(&blocks, 5, 7, 18, true).is_ok());
        // Two blocks reading one key are fine forward, refused backward; ranges past the
        // tensors are refused.
        let shared = [blocks[0], Block { k: 2, ..blocks[1] }];
        assert!(check_blocks(&shared, 5, 7, 18, false).is_ok());
        let err = check_blocks(&shared, 5, 7, 18, true).unwrap_err();
        assert!(err.to_string().contains("overlap in their keys"), "{err}");
        let err = check_blocks(&blocks, 5, 6, 18, false).unwrap_err();
        assert!(err.to_string().contains("run past"), "{err}");
        let both = [blocks[0], Block { q: 2, ..blocks[1] }];
        assert!(check_blocks(&both, 5, 7, 18, false).is_err());
    }
}
