//! Token cross-entropy with a fused backward pass.
//!
//! `loss = mean_i (logsumexp(z_i) - z_i[y_i])` over rows `z: [N, V]` (logits at the answer
//! positions only, so masking is done by choosing rows) and targets `y: [N]`. The gradient is
//! `dz = (softmax(z) - onehot(y)) / N`, computed directly in one pass instead of
//! differentiating a chain of elementary ops: for Gemma's 262k vocabulary, candle's composite
//! log-softmax keeps several vocabulary-sized copies alive and walks them many times.

use candle_core::{CustomOp2, DType, Tensor, D};

use crate::error::Result;

struct CrossEntropyGrad {
    targets: Tensor,
}

impl CustomOp2 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        _z: &candle_core::CpuStorage,
        _lz: &candle_core::Layout,
        loss: &candle_core::CpuStorage,
        ll: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::backend::BackendStorage;
        Ok((loss.try_clone(ll)?, ll.shape().clone()))
    }

    fn cuda_fwd(
        &self,
        _z: &candle_core::CudaStorage,
        _lz: &candle_core::Layout,
        loss: &candle_core::CudaStorage,
        ll: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        use candle_core::backend::BackendStorage;
        Ok((loss.try_clone(ll)?, ll.shape().clone()))
    }

    fn bwd(
        &self,
        z: &Tensor,
        _loss: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let n = z.dim(0)?;
        let zf = z.detach().to_dtype(DType::F32)?;
        let p = candle_nn::ops::softmax_last_dim(&zf)?;
        let minus_one = Tensor::full(-1f32, (n, 1), z.device())?;
        let d = p.scatter_add(&self.targets.unsqueeze(1)?, &minus_one, 1)?;
        let scale = (grad.to_dtype(DType::F32)? / n as f64)?;
        let dz = d.broadcast_mul(&scale)?.to_dtype(z.dtype())?;
        Ok((Some(dz), None))
    }
}

/// Mean token cross-entropy of `logits: [N, V]` against `targets: [N]` (u32), as an f32 scalar
/// whose backward pass is fused (see the module doc).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let n = logits.dim(0)?;
    let z = logits.detach().to_dtype(DType::F32)?;
    let m = z.max_keepdim(D::Minus1)?;
    let lse = (z.broadcast_sub(&m)?.exp()?.sum_keepdim(D::Minus1)?.log()? + &m)?;
    let picked = z.gather(&targets.unsqueeze(1)?, 1)?;
    let loss = ((lse - picked)?.sum_all()? / n as f64)?;
    if !logits.track_op() {
        return Ok(loss);
    }
    Ok(logits.apply_op2(
        &loss,
        CrossEntropyGrad {
            targets: targets.clone(),
        },
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

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
        let ga: Vec<Vec<f32>> = ours
            .backward()
            .unwrap()
            .get(z.as_tensor())
            .unwrap()
            .to_vec2()
            .unwrap();
        let gb: Vec<Vec<f32>> = reference
            .backward()
            .unwrap()
            .get(z.as_tensor())
            .unwrap()
            .to_vec2()
            .unwrap();
        for (ra, rb) in ga.iter().zip(&gb) {
            for (x, y) in ra.iter().zip(rb) {
                assert!((x - y).abs() < 1e-6, "grad {x} vs {y}");
            }
        }
    }
}
