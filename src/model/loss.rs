//! Token cross-entropy with a fused backward pass.
//!
//! `loss = mean_i (logsumexp(z_i) - z_i[y_i])` over rows `z: [N, V]` (logits at the answer
//! positions only, so masking is done by choosing rows) and targets `y: [N]`. The gradient is
//! `dz = (softmax(z) - onehot(y)) / N`, computed directly in one pass instead of
//! differentiating a chain of elementary ops: for Gemma's 262k vocabulary, candle's composite
//! log-softmax keeps several vocabulary-sized copies alive and walks them many times.

use candle_core::{DType, Tensor, D};

use super::autograd::with_grad;
use super::kernels::{self, frozen_linear, frozen_linear_grad, PackCache};

use crate::error::Result;

/// [`kernels::cross_entropy_rows`] for f32 CPU logits `z: [N, V]`: the summed loss and, with
/// `grad`, `softmax(z) - onehot(y)`; `None` for other dtypes and devices.
fn ce_cpu(z: &Tensor, targets: &Tensor, grad: bool) -> Result<Option<(f64, Option<Tensor>)>> {
    if z.dtype() != DType::F32 || !z.device().is_cpu() || z.rank() != 2 {
        return Ok(None);
    }
    let (n, v) = z.dims2()?;
    let mut zv = z.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let tv = targets.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    let total = kernels::cross_entropy_rows(&mut zv, v, &tv, grad)?;
    let d = if grad {
        Some(Tensor::from_vec(zv, (n, v), z.device())?)
    } else {
        None
    };
    Ok(Some((total, d)))
}

/// `sum_i (logsumexp(z_i) - z_i[y_i])` of f32 logits `z: [N, V]`, no graph.
fn nll_sum(z: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    if let Some((total, _)) = ce_cpu(z, targets, false).map_err(candle_core::Error::wrap)? {
        return Tensor::new(total as f32, z.device());
    }
    let m = z.max_keepdim(D::Minus1)?;
    let lse = (z.broadcast_sub(&m)?.exp()?.sum_keepdim(D::Minus1)?.log()? + &m)?;
    let picked = z.gather(&targets.unsqueeze(1)?, 1)?;
    (lse - picked)?.sum_all()
}

/// Mean token cross-entropy of `logits: [N, V]` against `targets: [N]` (u32), as an f32 scalar
/// whose backward pass is fused (see the module doc).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let n = logits.dim(0)?;
    let z = logits.detach().to_dtype(DType::F32)?;
    let loss = (nll_sum(&z, targets)? / n as f64)?;
    let targets = targets.clone();
    with_grad(
        logits,
        loss,
        Box::new(move |z, _loss, g| {
            let n = z.dim(0)?;
            let p = candle_nn::ops::softmax_last_dim(&z.to_dtype(DType::F32)?)?;
            let minus_one = Tensor::full(-1f32, (n, 1), z.device())?;
            let d = p.scatter_add(&targets.unsqueeze(1)?, &minus_one, 1)?;
            let scale = (g.to_dtype(DType::F32)? / n as f64)?;
            d.broadcast_mul(&scale)?.to_dtype(z.dtype())
        }),
    )
}

/// Rows per chunk in [`linear_cross_entropy`]: 256 x 262,144 f32 logits are 256 MiB. Measured
/// on Gemma 3 270M (8 x 128 tokens, loss on all positions): 16-row chunks halve the matmul
/// efficiency (34 tokens/s), 256-row chunks give 60 tokens/s at 6.9 GB peak, against 50
/// tokens/s and 10.1 GB with the full logits and the fused loss.
const CHUNK_ROWS: usize = 256;

/// Walks the rows of `h: [N, H]` in chunks of logits `h W^T`: the summed loss (with `loss`)
/// and `dh = (softmax - onehot) W / N` (with `grad`). On the CPU in f32 one pass per chunk gives
/// both ([`kernels::cross_entropy_rows`]); elsewhere candle's ops.
fn chunks(
    h: &Tensor,
    w: &Tensor,
    packs: &PackCache,
    targets: &Tensor,
    (loss, grad): (bool, bool),
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let n = h.dim(0)?;
    let mut total = loss
        .then(|| Tensor::zeros((), DType::F32, h.device()))
        .transpose()?;
    let mut parts = Vec::with_capacity(if grad { n.div_ceil(CHUNK_ROWS) } else { 0 });
    let mut start = 0;
    while start < n {
        let len = CHUNK_ROWS.min(n - start);
        let z = frozen_linear(&h.narrow(0, start, len)?, w, packs)?.to_dtype(DType::F32)?;
        let tn = targets.narrow(0, start, len)?;
        let (sum, d) = match ce_cpu(&z, &tn, grad)? {
            Some((sum, d)) => (Some(Tensor::new(sum as f32, h.device())?), d),
            None => {
                let sum = if loss { Some(nll_sum(&z, &tn)?) } else { None };
                let d = if grad {
                    let p = candle_nn::ops::softmax_last_dim(&z)?;
                    let minus_one = Tensor::full(-1f32, (len, 1), h.device())?;
                    Some(p.scatter_add(&tn.unsqueeze(1)?, &minus_one, 1)?)
                } else {
                    None
                };
                (sum, d)
            }
        };
        if let (Some(t), Some(sum)) = (total.as_mut(), sum) {
            *t = (&*t + sum)?;
        }
        if let Some(d) = d {
            parts.push(frozen_linear_grad(&d.to_dtype(w.dtype())?, w, packs)?);
        }
        start += len;
    }
    let dh = if grad {
        Some((Tensor::cat(&parts, 0)? / n as f64)?)
    } else {
        None
    };
    Ok((total, dh))
}

/// Mean cross-entropy of the logits `h W^T` (`h: [N, H]` hidden rows, `w: [V, H]` a frozen
/// output matrix) against `targets: [N]`, without ever holding all `N x V` logits: the rows
/// go in chunks (`chunks`), and `dh = (softmax(h W^T) - onehot(y)) W / N` is computed
/// alongside the loss on the CPU in f32 (the same pass gives both, so the backward only scales
/// it: a third less output-layer work) or, elsewhere, in the backward, recomputing each chunk's
/// logits. The value equals `cross_entropy(h.matmul(w.t()), targets)`.
pub fn linear_cross_entropy(
    h: &Tensor,
    w: &Tensor,
    packs: &PackCache,
    targets: &Tensor,
) -> Result<Tensor> {
    let n = h.dim(0)?;
    let hd = h.detach();
    let eager = h.track_op() && hd.dtype() == DType::F32 && hd.device().is_cpu();
    let (total, dh) = chunks(&hd, w, packs, targets, (true, eager))?;
    let loss = (total.expect("asked for the loss") / n as f64)?;
    if let Some(dh) = dh {
        return with_grad(
            h,
            loss,
            Box::new(move |_h, _loss, g| dh.broadcast_mul(&g.to_dtype(dh.dtype())?)),
        );
    }
    let (w, packs, targets) = (w.clone(), packs.clone(), targets.clone());
    with_grad(
        h,
        loss,
        Box::new(move |h, _loss, g| {
            let (_, dh) = chunks(h, &w, &packs, &targets, (false, true))
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            let dh = dh.expect("asked for the gradient");
            dh.broadcast_mul(&g.to_dtype(dh.dtype())?)
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Asserts the gradients of `ours` and `reference` with respect to `x` agree to 1e-6.
    fn assert_same_grads(ours: &Tensor, reference: &Tensor, x: &Tensor) {
        let g = |l: &Tensor| -> Vec<f64> {
            let t = l
                .backward()
                .unwrap()
                .get(x)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap();
            t.flatten_all().unwrap().to_vec1().unwrap()
        };
        for (a, b) in g(ours).iter().zip(&g(reference)) {
            assert!((a - b).abs() < 1e-6, "grad {a} vs {b}");
        }
    }

    #[test]
    fn value_and_gradient_match_candles_composite_loss() {
        let mut rng = crate::util::Rng::new(3);
        let (n, v) = (6, 11);
        let data: Vec<f32> = (0..n * v)
            .map(|_| (rng.next_f64() * 8.0 - 4.0) as f32)
            .collect();
        let z = Var::from_tensor(&Tensor::from_vec(data, (n, v), &Device::Cpu).unwrap()).unwrap();
        let y = Tensor::new(&[0u32, 3, 10, 5, 5, 2], &Device::Cpu).unwrap();
        let ours = cross_entropy(z.as_tensor(), &y).unwrap();
        let reference = candle_nn::loss::cross_entropy(z.as_tensor(), &y).unwrap();
        let (a, b) = (
            ours.to_scalar::<f32>().unwrap(),
            reference.to_scalar::<f32>().unwrap(),
        );
        assert!((a - b).abs() < 1e-5, "loss {a} vs {b}");
        assert_same_grads(&ours, &reference, z.as_tensor());
    }

    #[test]
    fn chunked_linear_loss_matches_the_plain_one() {
        let mut rng = crate::util::Rng::new(4);
        let (n, hdim, v) = (37, 8, 29); // 37 rows: two full chunks and a partial one
        let hv: Vec<f64> = (0..n * hdim).map(|_| rng.next_f64() * 2.0 - 1.0).collect();
        let wv: Vec<f64> = (0..v * hdim).map(|_| rng.next_f64() * 2.0 - 1.0).collect();
        let h = Var::from_tensor(&Tensor::from_vec(hv, (n, hdim), &Device::Cpu).unwrap()).unwrap();
        let w = Tensor::from_vec(wv, (v, hdim), &Device::Cpu).unwrap();
        let y: Vec<u32> = (0..n).map(|_| rng.below(v as u64) as u32).collect();
        let y = Tensor::from_vec(y, n, &Device::Cpu).unwrap();
        let ours = linear_cross_entropy(h.as_tensor(), &w, &PackCache::default(), &y).unwrap();
        let logits = h.as_tensor().matmul(&w.t().unwrap()).unwrap();
        let reference = candle_nn::loss::cross_entropy(&logits, &y).unwrap();
        let a = ours.to_scalar::<f32>().unwrap() as f64;
        let b = reference.to_scalar::<f64>().unwrap();
        assert!((a - b).abs() < 1e-5, "loss {a} vs {b}");
        assert_same_grads(&ours, &reference, h.as_tensor());
    }

    #[test]
    fn f32_loss_with_its_gradient_in_the_forward_matches_f64() {
        // f32 on the CPU computes dh alongside the loss; 300 rows cross a chunk boundary.
        let mut rng = crate::util::Rng::new(5);
        let (n, hdim, v) = (300, 8, 29);
        let hv: Vec<f64> = (0..n * hdim).map(|_| rng.next_f64() * 2.0 - 1.0).collect();
        let wv: Vec<f64> = (0..v * hdim).map(|_| rng.next_f64() * 2.0 - 1.0).collect();
        let y: Vec<u32> = (0..n).map(|_| rng.below(v as u64) as u32).collect();
        let y = Tensor::from_vec(y, n, &Device::Cpu).unwrap();
        let h64 =
            Var::from_tensor(&Tensor::from_vec(hv, (n, hdim), &Device::Cpu).unwrap()).unwrap();
        let w64 = Tensor::from_vec(wv, (v, hdim), &Device::Cpu).unwrap();
        let h32 = Var::from_tensor(&h64.as_tensor().to_dtype(DType::F32).unwrap()).unwrap();
        let w32 = w64.to_dtype(DType::F32).unwrap();
        let pc = PackCache::default();
        let l32 = linear_cross_entropy(h32.as_tensor(), &w32, &pc, &y).unwrap();
        let l64 = linear_cross_entropy(h64.as_tensor(), &w64, &pc, &y).unwrap();
        let scalar = |l: &Tensor| l.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
        let (a, b) = (scalar(&l32), scalar(&l64));
        assert!((a - b).abs() < 1e-5 * b.abs(), "loss {a} vs {b}");
        // Scaled upstream gradient: the backward multiplies the precomputed dh by it.
        let g32 = (l32 * 3.0).unwrap().backward().unwrap();
        let g64 = (l64 * 3.0).unwrap().backward().unwrap();
        let d32: Vec<f32> = g32
            .get(h32.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let d64: Vec<f64> = g64
            .get(h64.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let scale = d64.iter().fold(0f64, |m, x| m.max(x.abs()));
        for (x, w) in d32.iter().zip(&d64) {
            assert!((f64::from(*x) - w).abs() < 1e-5 * scale, "grad {x} vs {w}");
        }
    }
}
