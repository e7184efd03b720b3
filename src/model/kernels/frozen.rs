//! Products with frozen base weights, `x w^T` and its input gradient `g w`, and the switch
//! that picks how they run: in f32 through one GEMM call without candle's zero-fill
//! ([`linear`]), or, once the process asks for bf16 ([`set_matmul_precision`]), on AMX tiles
//! ([`crate::model::amx`]) with the bf16 copies of each weight packed on first use and kept in a
//! [`PackCache`].
//!
//! In: an f32 CPU activation `x: [n, in]` (or a gradient `g: [n, out]`) and a weight `w: [out,
//! in]`. Out: the product as a new tensor, without a gradient (callers attach one); candle's
//! matmul for other dtypes and devices.

use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device, Tensor};

use crate::error::Result;
use crate::model::amx;
use crate::model::cpu::f32_slices;
use crate::precision::{matmul_precision, store_matmul_precision, MatmulPrecision};

/// Chooses the precision of frozen-weight products for the whole process. `Bf16` needs AMX
/// ([`amx::available`]); asking for it elsewhere is an error rather than a silent change of
/// numerics or speed.
pub fn set_matmul_precision(p: MatmulPrecision) -> Result<()> {
    if p == MatmulPrecision::Bf16 && !amx::available() {
        return Err(crate::error::Error::Invalid(
            "bf16 matrix products need a CPU with AMX (Intel Xeon Sapphire Rapids or later) and \
             a Linux kernel that grants tile state; use f32 here"
                .into(),
        ));
    }
    store_matmul_precision(p);
    Ok(())
}

/// bf16 tile copies of one frozen weight `w: [out, in]`, made on first use and shared by clones
/// of the layer: `fwd` packs `w^T` (for `x w^T`), `bwd` packs `w` (for the input gradient `g
/// w`, built only when training). A new weight (a merge) needs a new cache.
#[derive(Debug, Clone, Default)]
pub struct PackCache(Arc<PackSlots>);

/// The two packings of one weight, each made at most once.
#[derive(Debug, Default)]
struct PackSlots {
    fwd: OnceLock<amx::Packed>,
    bwd: OnceLock<amx::Packed>,
}

/// `x b` on AMX tiles for `x: [n, k]` and the packed `b: [k, cols]` held in `slot` (packed from
/// `w`'s values by `pack` on first use), when the precision is bf16 and both are f32 CPU
/// matrices; `None` otherwise.
fn amx_product(
    x: &Tensor,
    w: &Tensor,
    slot: &OnceLock<amx::Packed>,
    pack: impl FnOnce(&[f32]) -> amx::Packed,
    (k, cols): (usize, usize),
) -> Result<Option<Tensor>> {
    if matmul_precision() != MatmulPrecision::Bf16 || x.rank() != 2 || x.dim(1)? != k {
        return Ok(None);
    }
    let n = x.dim(0)?;
    let y = f32_slices([x, w], |[xv, wv]| {
        amx::matmul(xv, n, slot.get_or_init(|| pack(wv)))
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
    let pack = |wv: &[f32]| amx::Packed::from_transposed(wv, out, k);
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
    let pack = |wv: &[f32]| amx::Packed::from_rows(wv, out, inp);
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

#[cfg(test)]
mod tests {
    use super::*;

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
