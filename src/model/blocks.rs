//! The decoder's building blocks, shared by the per-op decoder ([`super::transformer`]) and
//! the fused training layer (`layer_train`): linear layers with their LoRA hook, RMSNorm, one
//! layer's weights, and the context a forward pass runs with.
//!
//! In: weights (as [`super::load`] builds them), an optional adapter and, for training, the
//! dropout RNG. Out: [`Linear::forward`] and [`RmsNorm::run`] values, attached to the gradient
//! graph when training (a frozen base weight gives its input a gradient and gets none itself).

use candle_core::{DType, Tensor, D};

use super::autograd::with_grad;
use super::config::LayerKind;
use super::kernels;
use super::lora::{Adapter, ModuleInfo};
use crate::error::Result;
use crate::util::Rng;

/// A linear layer `y = x W^T + b` that an adapter may target by `name`.
#[derive(Debug, Clone)]
pub struct Linear {
    pub name: String,
    /// `[out, in]`
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// bf16 tile copies of `weight` for [`kernels::MatmulPrecision::Bf16`] (made on first use).
    pub packs: kernels::PackCache,
}

/// What a forward pass runs with: an optional adapter and, for training, the dropout RNG.
pub struct Ctx<'a> {
    pub adapter: Option<&'a Adapter>,
    /// `Some` in training mode: LoRA dropout masks are drawn from it, and the LoRA weights are
    /// tracked for backpropagation. In eval mode they are detached, so no graph is kept.
    pub dropout_rng: Option<std::cell::RefCell<&'a mut Rng>>,
}

impl<'a> Ctx<'a> {
    /// Inference with an optional adapter (no gradient graph).
    pub fn eval(adapter: Option<&'a Adapter>) -> Self {
        Ctx {
            adapter,
            dropout_rng: None,
        }
    }

    /// Training: gradients flow to the adapter; dropout on the LoRA input, seeded by `rng`.
    pub fn train(adapter: &'a Adapter, rng: &'a mut Rng) -> Self {
        Ctx {
            adapter: Some(adapter),
            dropout_rng: Some(std::cell::RefCell::new(rng)),
        }
    }

    pub(crate) fn training(&self) -> bool {
        self.dropout_rng.is_some()
    }

    /// A LoRA dropout mask shaped like `x` (kept entries `1 / (1 - p)`, dropped ones 0), drawn
    /// from the training RNG; `None` in eval mode or when `p` is 0.
    pub(crate) fn dropout_mask(&self, p: f64, x: &Tensor) -> Result<Option<Tensor>> {
        let Some(rng) = &self.dropout_rng else {
            return Ok(None);
        };
        if p <= 0.0 {
            return Ok(None);
        }
        let mut rng = rng.borrow_mut();
        let keep = 1.0 - p;
        let m: Vec<f32> = (0..x.elem_count())
            .map(|_| {
                if rng.next_f64() < keep {
                    (1.0 / keep) as f32
                } else {
                    0.0
                }
            })
            .collect();
        Ok(Some(
            Tensor::from_vec(m, x.dims(), x.device())?.to_dtype(x.dtype())?,
        ))
    }
}

/// `x: [N, in]` times `w^T` (`w: [out, in]`) for a frozen `w`, with a gradient for `x` only
/// (`x' = g w`). candle's own matmul backward also computes the weight gradient, which for
/// frozen base weights is wasted work and memory (for Gemma's 262k x 640 output matrix alone,
/// 671 MB per step).
pub(crate) fn frozen_matmul(
    x: &Tensor,
    w: &Tensor,
    packs: &kernels::PackCache,
    training: bool,
) -> Result<Tensor> {
    let y = kernels::frozen_linear(&x.detach(), w, packs)?;
    if !training {
        return Ok(y);
    }
    let (w, packs) = (w.clone(), packs.clone());
    with_grad(
        x,
        y,
        Box::new(move |_x, _y, g| {
            kernels::frozen_linear_grad(g, &w, &packs)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))
        }),
    )
}

impl Linear {
    /// `x: [N, in]` -> `[N, out]`.
    pub fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let pair = ctx
            .adapter
            .and_then(|ad| ad.pairs.get(&self.name).map(|p| (ad, p)));
        let Some((ad, p)) = pair else {
            let y = frozen_matmul(x, &self.weight, &self.packs, ctx.training())?;
            return self.add_bias(y);
        };
        let mask = ctx.dropout_mask(ad.config.lora_dropout, x)?;
        let s = ad.config.scaling();
        let y = self.add_bias(frozen_matmul(x, &self.weight, &self.packs, ctx.training())?)?;
        let xin = match &mask {
            Some(m) => x.mul(m)?,
            None => x.clone(),
        };
        // Eval uses detached copies of A and B, so no gradient graph is built.
        let (a, b) = if ctx.training() {
            (p.a.as_tensor().clone(), p.b.as_tensor().clone())
        } else {
            (p.a.as_tensor().detach(), p.b.as_tensor().detach())
        };
        let d = xin.matmul(&a.t()?)?.matmul(&b.t()?)?;
        Ok((y + (d * s)?)?)
    }

    /// `y + b` when the layer has a bias.
    fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// The module's PEFT name and `(out, in)` shape, for an adapter to target.
    pub(crate) fn info(&self) -> ModuleInfo {
        let (out_features, in_features) = self.weight.dims2().expect("2-D weight");
        ModuleInfo {
            name: self.name.clone(),
            out_features,
            in_features,
        }
    }
}

/// RMSNorm with its effective scale (`w` for Llama, `1 + w` for Gemma, folded at load).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub scale: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    /// The fused candle kernel when `fast` (not f64), else [`RmsNorm::forward`]. With a
    /// gradient graph the fused kernel gets a hand-written backward:
    /// `r = rsqrt(mean(x^2) + eps)`, `x' = r (g s) - x r^3 mean(g s x)`.
    pub fn run(&self, x: &Tensor, fast: bool) -> Result<Tensor> {
        if !fast {
            return self.forward(x);
        }
        let y = candle_nn::ops::rms_norm(&x.detach().contiguous()?, &self.scale, self.eps as f32)?;
        let (scale, eps) = (self.scale.clone(), self.eps);
        with_grad(
            x,
            y,
            Box::new(move |x, _y, g| {
                if let Some(dx) = kernels::rms_norm_backward(x, &scale, g, eps)? {
                    return Ok(dx);
                }
                let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
                let gs = g.broadcast_mul(&scale)?;
                let m = (&gs * x)?.mean_keepdim(D::Minus1)?;
                let a = gs.broadcast_mul(&r)?;
                let b = x.broadcast_mul(&(r.powf(3.0)? * m)?)?;
                a - b
            }),
        )
    }

    /// `x * rsqrt(mean(x^2, last) + eps) * scale`, computed in f32 (or f64) for low precisions.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dt = x.dtype();
        let work = if matches!(dt, DType::F16 | DType::BF16) {
            DType::F32
        } else {
            dt
        };
        let xf = x.to_dtype(work)?;
        let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = xf.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        Ok(normed
            .broadcast_mul(&self.scale.to_dtype(work)?)?
            .to_dtype(dt)?)
    }
}

/// One decoder layer.
#[derive(Debug, Clone)]
pub struct Layer {
    pub kind: LayerKind,
    pub input_norm: RmsNorm,
    pub post_attn_norm: RmsNorm,
    /// Gemma only: norm before the MLP (Llama uses `post_attn_norm` there).
    pub pre_ff_norm: Option<RmsNorm>,
    /// Gemma only: norm after the MLP.
    pub post_ff_norm: Option<RmsNorm>,
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}
