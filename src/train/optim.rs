//! Optimizers and schedule: AdamW (PyTorch semantics, state kept in f32 so a checkpoint can
//! restore it exactly), plain SGD for stage-1 steps, global-norm clipping and the warm-up +
//! cosine learning-rate schedule.

use candle_core::{DType, Tensor, Var};

use crate::error::Result;

/// Hyper-parameters of [`AdamW`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// AdamW over a fixed list of variables:
/// `p <- p (1 - lr wd)`, then `p <- p - lr m^ / (sqrt(v^) + eps)` with bias-corrected moments.
#[derive(Debug, Clone)]
pub struct AdamW {
    pub params: AdamParams,
    /// Steps taken.
    pub t: u64,
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
}

impl AdamW {
    /// Zero moments shaped like `vars`.
    pub fn new(vars: &[Var], params: AdamParams) -> Result<Self> {
        let zeros = |v: &Var| Tensor::zeros(v.dims(), DType::F32, v.device());
        Ok(AdamW {
            params,
            t: 0,
            m: vars.iter().map(zeros).collect::<candle_core::Result<_>>()?,
            v: vars.iter().map(zeros).collect::<candle_core::Result<_>>()?,
        })
    }

    /// One step with learning rate `lr`; `grads[i]` belongs to `vars[i]`.
    pub fn step(&mut self, vars: &[Var], grads: &[Tensor], lr: f64) -> Result<()> {
        let AdamParams {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.params;
        self.t += 1;
        let bc1 = 1.0 - beta1.powi(self.t as i32);
        let bc2 = 1.0 - beta2.powi(self.t as i32);
        for (i, (var, g)) in vars.iter().zip(grads).enumerate() {
            let g = g.to_dtype(DType::F32)?;
            let m = ((&self.m[i] * beta1)? + (&g * (1.0 - beta1))?)?;
            let v = ((&self.v[i] * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let p = var.as_tensor().to_dtype(DType::F32)?;
            let p = if weight_decay > 0.0 {
                (p * (1.0 - lr * weight_decay))?
            } else {
                p
            };
            let denom = ((&v / bc2)?.sqrt()? + eps)?;
            let upd = ((&m / bc1)? / denom)?;
            let p = (p - (upd * lr)?)?;
            var.set(&p.to_dtype(var.dtype())?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

/// `p <- p - lr g` for every variable.
pub fn sgd_step(vars: &[Var], grads: &[Tensor], lr: f64) -> Result<()> {
    for (var, g) in vars.iter().zip(grads) {
        let p = (var.as_tensor().to_dtype(DType::F32)? - (g.to_dtype(DType::F32)? * lr)?)?;
        var.set(&p.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// The global L2 norm of `grads`.
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut s = 0f64;
    for g in grads {
        s += g
            .to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()? as f64;
    }
    Ok(s.sqrt())
}

/// Scales `grads` so their global norm is at most `max_norm` (PyTorch's
/// `clip_grad_norm_`: factor `max_norm / (norm + 1e-6)` when above). Returns the norm before
/// clipping. `max_norm = 0` disables clipping.
pub fn clip(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    if max_norm > 0.0 && norm > max_norm {
        let f = max_norm / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = (&*g * f)?;
        }
    }
    Ok(norm)
}

/// Learning rate of optimizer step `step` (0-based) of `total`: linear warm-up over the first
/// `ceil(warmup * total)` steps (`peak * (step + 1) / W`), then cosine decay
/// `peak * 0.5 * (1 + cos(pi * (step - W + 1) / (total - W + 1)))`, so no step has rate 0.
pub fn lr_at(step: usize, total: usize, warmup: f64, peak: f64) -> f64 {
    let w = (warmup * total as f64).ceil() as usize;
    if step < w {
        return peak * (step + 1) as f64 / w as f64;
    }
    let span = (total.saturating_sub(w) + 1) as f64;
    let progress = ((step + 1 - w) as f64 / span).min(1.0);
    peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn adamw_matches_hand_computed_steps() {
        // One scalar, two steps, worked by hand from the update rule.
        let var = Var::new(&[1.0f32], &Device::Cpu).unwrap();
        let p = AdamParams {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut opt = AdamW::new(std::slice::from_ref(&var), p).unwrap();
        let g1 = Tensor::new(&[0.5f32], &Device::Cpu).unwrap();
        opt.step(std::slice::from_ref(&var), &[g1], 0.01).unwrap();
        // Step 1: decay 1 * (1 - 0.001) = 0.999; m^ = 0.5, v^ = 0.25 -> update 1.0 (up to eps).
        let want1 = 0.999 - 0.01 * 0.5 / (0.5 + 1e-8);
        let got1 = var.as_tensor().to_vec1::<f32>().unwrap()[0] as f64;
        assert!((got1 - want1).abs() < 1e-6, "{got1} vs {want1}");
        let g2 = Tensor::new(&[-1.0f32], &Device::Cpu).unwrap();
        opt.step(std::slice::from_ref(&var), &[g2], 0.01).unwrap();
        let m = 0.9 * 0.05 - 0.1;
        let v = 0.999 * 0.00025 + 0.001 * 1.0;
        let (mh, vh) = (m / (1.0 - 0.81), v / (1.0 - 0.999f64.powi(2)));
        let want2 = want1 * (1.0 - 0.001) - 0.01 * mh / (vh.sqrt() + 1e-8);
        let got2 = var.as_tensor().to_vec1::<f32>().unwrap()[0] as f64;
        assert!((got2 - want2).abs() < 1e-6, "{got2} vs {want2}");
    }

    #[test]
    fn clipping_scales_to_the_bound() {
        let mut g = vec![
            Tensor::new(&[3.0f32], &Device::Cpu).unwrap(),
            Tensor::new(&[4.0f32], &Device::Cpu).unwrap(),
        ];
        let n = clip(&mut g, 1.0).unwrap();
        assert!((n - 5.0).abs() < 1e-6);
        assert!((global_norm(&g).unwrap() - 1.0).abs() < 1e-5);
        let n2 = clip(&mut g, 10.0).unwrap();
        assert!((n2 - 1.0).abs() < 1e-5, "below the bound nothing changes");
    }

    #[test]
    fn schedule_warms_up_then_decays() {
        let lrs: Vec<f64> = (0..20).map(|s| lr_at(s, 20, 0.1, 1.0)).collect();
        assert_eq!(lrs[0], 0.5);
        assert_eq!(lrs[1], 1.0);
        assert!(lrs.windows(2).skip(1).all(|w| w[1] <= w[0]));
        assert!(lrs[19] > 0.0 && lrs[19] < 0.02, "{}", lrs[19]);
        assert_eq!(
            lr_at(0, 10, 0.0, 2.0),
            2.0 * 0.5 * (1.0 + (std::f64::consts::PI / 11.0).cos())
        );
    }
}
