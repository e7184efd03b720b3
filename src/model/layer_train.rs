//! One graph node per decoder layer for LoRA training on the CPU in f32.
//!
//! In: a layer, its input `x: [B * T, H]` (tracked), the batch's rope tables and attention
//! layout ([`Attend`]: padded rows, or rows continuing one shared prefix), and the training
//! context (adapter, dropout RNG). Out: the layer's output `[B * T, H]`, attached to the gradient graph as a single op whose inputs are `x` and the
//! layer's LoRA weights (each side concatenated into one flat tensor), with the layer's
//! backward pass written out here from the kernels' own backward passes.
//!
//! Why: candle's autograd gives every gradient of every node a fresh zero tensor and an add,
//! and every op a new buffer; a layer built from ~15 nodes paid that ~15 times per step. The
//! forward here is the inference kernels' (rms-norm, frozen products, LoRA, rope, attention,
//! gated MLP); the activations the backward needs are kept by the op until the graph is
//! dropped. The same dropout masks are drawn, in the same order, as the per-node path, so both
//! give the same values and gradients (checked against the f64 model's plain ops).

use candle_core::Tensor;

use super::autograd::{with_grad, with_grad3};
use super::config::{Arch, ModelConfig};
use super::kernels::{self, Glu};
use super::transformer::{Ctx, Layer, Linear, RmsNorm};
use crate::error::Result;

/// The batch-level inputs a layer needs besides `x`: the rope tables `[B, T, hd / 2]` of its
/// `B * T` tokens and how they attend.
pub(crate) struct Batch<'a> {
    pub b: usize,
    pub t: usize,
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    pub attend: Attend,
}

/// Which keys each query of a batch attends to.
#[derive(Clone)]
pub(crate) enum Attend {
    /// `B` rows of `T` tokens, each attending within itself: additive mask `[B, 1, T, T]`.
    Rows { mask: Tensor },
    /// One prefix of `P` tokens attending causally within itself (`prefix_mask: [1, 1, P, P]`),
    /// then `rows` rows of `len` tokens, each attending to the prefix and to itself (`mask:
    /// [rows, 1, len, P + len]`). The tokens are laid out prefix first, then row by row.
    Shared {
        prefix: usize,
        rows: usize,
        len: usize,
        prefix_mask: Tensor,
        mask: Tensor,
    },
}

impl Attend {
    /// Attention output `[N, nh * hd]` for rope'd queries `[N, nh * hd]` and keys and values
    /// `[N, nkv * hd]`.
    fn forward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f32,
        heads: (usize, usize),
    ) -> Result<Tensor> {
        match self {
            Attend::Rows { mask } => kernels::attention_2d::forward(q, k, v, mask, scale, heads),
            Attend::Shared {
                prefix,
                rows,
                len,
                prefix_mask,
                mask,
            } => {
                let (p, n) = (*prefix, rows * len);
                let ap = kernels::attention_2d::forward(
                    &q.narrow(0, 0, p)?,
                    &k.narrow(0, 0, p)?,
                    &v.narrow(0, 0, p)?,
                    prefix_mask,
                    scale,
                    heads,
                )?;
                let ar = kernels::attention_2d::forward(
                    &q.narrow(0, p, n)?.contiguous()?,
                    &self.row_keys(k)?,
                    &self.row_keys(v)?,
                    mask,
                    scale,
                    heads,
                )?;
                Ok(Tensor::cat(&[ap, ar], 0)?)
            }
        }
    }

    /// `(dq, dk, dv)` of [`Attend::forward`] for the output gradient `da`. A shared prefix's
    /// key and value gradients add its own queries' share to every row's.
    fn backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        da: &Tensor,
        scale: f32,
        heads: (usize, usize),
    ) -> Result<(Tensor, Tensor, Tensor)> {
        match self {
            Attend::Rows { mask } => {
                kernels::attention_2d::backward(q, k, v, mask, da, scale, heads)
            }
            Attend::Shared {
                prefix,
                rows,
                len,
                prefix_mask,
                mask,
            } => {
                let (p, n) = (*prefix, rows * len);
                let (dqp, dkp, dvp) = kernels::attention_2d::backward(
                    &q.narrow(0, 0, p)?,
                    &k.narrow(0, 0, p)?,
                    &v.narrow(0, 0, p)?,
                    prefix_mask,
                    &da.narrow(0, 0, p)?.contiguous()?,
                    scale,
                    heads,
                )?;
                let (dqr, dkr, dvr) = kernels::attention_2d::backward(
                    &q.narrow(0, p, n)?.contiguous()?,
                    &self.row_keys(k)?,
                    &self.row_keys(v)?,
                    mask,
                    &da.narrow(0, p, n)?.contiguous()?,
                    scale,
                    heads,
                )?;
                // Rows' key gradients `[rows, P + len, w]`: the prefix part is summed over the
                // rows onto the prefix's own.
                let split = |own: Tensor, d: Tensor| -> Result<Tensor> {
                    let w = d.dim(1)?;
                    let d = d.reshape((*rows, p + len, w))?;
                    let to_prefix = d.narrow(1, 0, p)?.sum(0)?;
                    let to_rows = d.narrow(1, p, *len)?.reshape((n, w))?;
                    Ok(Tensor::cat(&[(own + to_prefix)?, to_rows], 0)?)
                };
                Ok((
                    Tensor::cat(&[dqp, dqr], 0)?,
                    split(dkp, dkr)?,
                    split(dvp, dvr)?,
                ))
            }
        }
    }

    /// Each row's keys (or values) preceded by the prefix's: `[rows * (P + len), w]` from the
    /// batch's `[P + rows * len, w]`.
    fn row_keys(&self, k: &Tensor) -> Result<Tensor> {
        let Attend::Shared {
            prefix, rows, len, ..
        } = self
        else {
            return Ok(k.clone());
        };
        let w = k.dim(1)?;
        let kp = k
            .narrow(0, 0, *prefix)?
            .unsqueeze(0)?
            .broadcast_as((*rows, *prefix, w))?;
        let kr = k
            .narrow(0, *prefix, rows * len)?
            .reshape((*rows, *len, w))?;
        Ok(Tensor::cat(&[kp, kr], 1)?.reshape((rows * (prefix + len), w))?)
    }
}

/// A LoRA pair as one layer's op uses it: detached weights, scaling and this step's dropout
/// mask.
#[derive(Clone)]
struct Lora {
    a: Tensor,
    b: Tensor,
    s: f64,
    mask: Option<Tensor>,
}

/// A linear layer with its LoRA pair (if the adapter targets it).
#[derive(Clone)]
struct Lin {
    lin: Linear,
    lora: Option<Lora>,
}

impl Lin {
    fn new(lin: &Linear, x: &Tensor, ctx: &Ctx, vars: &mut Vars) -> Result<Lin> {
        let pair = ctx
            .adapter
            .and_then(|ad| ad.pairs.get(&lin.name).map(|p| (ad, p)));
        let lora = match pair {
            None => None,
            Some((ad, p)) => {
                let mask = ctx.dropout_mask(ad.config.lora_dropout, x)?;
                let (a, b) = (p.a.as_tensor(), p.b.as_tensor());
                vars.a.push(a.flatten_all()?);
                vars.b.push(b.flatten_all()?);
                Some(Lora {
                    a: a.detach(),
                    b: b.detach(),
                    s: ad.config.scaling(),
                    mask,
                })
            }
        };
        Ok(Lin {
            lin: lin.clone(),
            lora,
        })
    }

    fn input(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self.lora.as_ref().and_then(|l| l.mask.as_ref()) {
            Some(m) => x.mul(m)?,
            None => x.clone(),
        })
    }

    /// `x W^T + b + s (m x) A^T B^T`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = kernels::frozen_linear(x, &self.lin.weight, &self.lin.packs)?;
        if let Some(l) = &self.lora {
            let u = self.input(x)?.matmul(&l.a.t()?)?;
            y = (y + (u.matmul(&l.b.t()?)? * l.s)?)?;
        }
        if let Some(b) = &self.lin.bias {
            y = y.broadcast_add(b)?;
        }
        Ok(y)
    }

    /// The input gradient for the output gradient `g` (`None` unless `want_dx`) and, with a
    /// LoRA pair, its `(dA, dB)`.
    fn backward(&self, x: &Tensor, g: &Tensor, want_dx: bool) -> Result<LinGrads> {
        let mut dx = if want_dx {
            Some(kernels::frozen_linear_grad(
                g,
                &self.lin.weight,
                &self.lin.packs,
            )?)
        } else {
            None
        };
        let mut lora = None;
        if let Some(l) = &self.lora {
            let xin = self.input(x)?;
            let u = xin.matmul(&l.a.t()?)?;
            let gb = g.matmul(&l.b)?;
            lora = Some(((gb.t()?.matmul(&xin)? * l.s)?, (g.t()?.matmul(&u)? * l.s)?));
            if let Some(d) = dx.take() {
                let mut dl = (gb.matmul(&l.a)? * l.s)?;
                if let Some(m) = &l.mask {
                    dl = dl.mul(m)?;
                }
                dx = Some((d + dl)?);
            }
        }
        Ok((dx, lora))
    }
}

/// A linear layer's input gradient (when asked for) and LoRA `(dA, dB)` (when it has a pair).
type LinGrads = (Option<Tensor>, Option<(Tensor, Tensor)>);

/// A layer's input gradient (none for the first layer) and its LoRA `(dA, dB)` pairs in
/// op-input order.
type LayerGrads = (Option<Tensor>, Vec<(Tensor, Tensor)>);

/// The layer's LoRA weights in op-input order (flattened).
#[derive(Default)]
struct Vars {
    a: Vec<Tensor>,
    b: Vec<Tensor>,
}

/// RMSNorm over groups of `width` values along the last dim (`width` = the whole row for the
/// hidden-state norms, `head_dim` for the per-head q/k norms).
fn norm_fwd(n: &RmsNorm, x: &Tensor, width: usize) -> Result<Tensor> {
    let rows = x.elem_count() / width;
    let y = candle_nn::ops::rms_norm(
        &x.contiguous()?.reshape((rows, width))?,
        &n.scale,
        n.eps as f32,
    )?;
    Ok(y.reshape(x.shape())?)
}

fn norm_bwd(n: &RmsNorm, x: &Tensor, g: &Tensor, width: usize) -> Result<Tensor> {
    let rows = x.elem_count() / width;
    let x2 = x.contiguous()?.reshape((rows, width))?;
    let g2 = g.contiguous()?.reshape((rows, width))?;
    match kernels::rms_norm_backward(&x2, &n.scale, &g2, n.eps)? {
        Some(d) => Ok(d.reshape(x.shape())?),
        None => Err(crate::error::Error::Internal(
            "the fused layer needs f32 tensors on the CPU".into(),
        )),
    }
}

fn rope(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    bthd: (usize, usize, usize, usize),
) -> Result<Tensor> {
    let y = candle_nn::rotary_emb::rope_thd(&x.contiguous()?.reshape(bthd)?, cos, sin)?;
    Ok(y.reshape(x.shape())?)
}

/// What the backward pass needs from the forward.
struct Saved {
    x: Tensor,
    h1: Tensor,
    q0: Tensor,
    k0: Tensor,
    qr: Tensor,
    kr: Tensor,
    v: Tensor,
    a: Tensor,
    o0: Tensor,
    x1: Tensor,
    h2: Tensor,
    g: Tensor,
    u: Tensor,
    m: Tensor,
    d0: Tensor,
}

/// The layer's forward for training, as one graph node (see the module doc). `x` must be an f32
/// CPU tensor `[B * T, H]`.
pub(crate) fn layer(
    cfg: &ModelConfig,
    l: &Layer,
    x: &Tensor,
    batch: &Batch,
    ctx: &Ctx,
) -> Result<Tensor> {
    let (b, t) = (batch.b, batch.t);
    let (nh, nkv, hd) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    );
    let hidden = cfg.hidden_size;
    let gemma = cfg.arch == Arch::Gemma3;
    let scale = cfg.attn_scale() as f32;
    let kind = if gemma { Glu::GeluTanh } else { Glu::Silu };
    let mut vars = Vars::default();

    let xd = x.detach();
    let h1 = norm_fwd(&l.input_norm, &xd, hidden)?;
    let lq = Lin::new(&l.q, &h1, ctx, &mut vars)?;
    let q0 = lq.forward(&h1)?;
    let lk = Lin::new(&l.k, &h1, ctx, &mut vars)?;
    let k0 = lk.forward(&h1)?;
    let lv = Lin::new(&l.v, &h1, ctx, &mut vars)?;
    let v = lv.forward(&h1)?;
    let qn = match &l.q_norm {
        Some(n) => norm_fwd(n, &q0, hd)?,
        None => q0.clone(),
    };
    let kn = match &l.k_norm {
        Some(n) => norm_fwd(n, &k0, hd)?,
        None => k0.clone(),
    };
    let qr = rope(&qn, batch.cos, batch.sin, (b, t, nh, hd))?;
    let kr = rope(&kn, batch.cos, batch.sin, (b, t, nkv, hd))?;
    let a = batch.attend.forward(&qr, &kr, &v, scale, (nh, nkv))?;
    let lo = Lin::new(&l.o, &a, ctx, &mut vars)?;
    let o0 = lo.forward(&a)?;
    let o = if gemma {
        norm_fwd(&l.post_attn_norm, &o0, hidden)?
    } else {
        o0.clone()
    };
    let x1 = (&xd + o)?;
    let n2 = if gemma {
        l.pre_ff_norm.as_ref().expect("gemma has pre_ff_norm")
    } else {
        &l.post_attn_norm
    };
    let h2 = norm_fwd(n2, &x1, hidden)?;
    let lg = Lin::new(&l.gate, &h2, ctx, &mut vars)?;
    let g = lg.forward(&h2)?;
    let lu = Lin::new(&l.up, &h2, ctx, &mut vars)?;
    let u = lu.forward(&h2)?;
    let m = match kernels::glu(kind, &g, &u)? {
        Some(m) => m,
        None => {
            return Err(crate::error::Error::Internal(
                "the fused layer needs f32 tensors on the CPU".into(),
            ))
        }
    };
    let ld = Lin::new(&l.down, &m, ctx, &mut vars)?;
    let d0 = ld.forward(&m)?;
    let d = if gemma {
        let n = l.post_ff_norm.as_ref().expect("gemma has post_ff_norm");
        norm_fwd(n, &d0, hidden)?
    } else {
        d0.clone()
    };
    let y = (&x1 + d)?;

    let saved = Saved {
        x: xd,
        h1,
        q0,
        k0,
        qr,
        kr,
        v,
        a,
        o0,
        x1,
        h2,
        g,
        u,
        m,
        d0,
    };
    let lins = [lq, lk, lv, lo, lg, lu, ld];
    let layer = l.clone();
    let (cos, neg_sin) = (batch.cos.clone(), batch.sin.neg()?);
    let attend = batch.attend.clone();
    let x_tracked = x.track_op();
    let backward = move |dy: &Tensor| -> Result<LayerGrads> {
        let s = &saved;
        let l = &layer;
        let [lq, lk, lv, lo, lg, lu, ld] = &lins;
        let asked = |r: LinGrads| -> (Tensor, Option<(Tensor, Tensor)>) {
            (r.0.expect("input gradient asked for"), r.1)
        };
        // MLP
        let dd0 = if gemma {
            let n = l.post_ff_norm.as_ref().expect("gemma has post_ff_norm");
            norm_bwd(n, &s.d0, dy, hidden)?
        } else {
            dy.clone()
        };
        let (dm, gr_d) = asked(ld.backward(&s.m, &dd0, true)?);
        let (dg, du) = kernels::glu_backward(kind, &s.g, &s.u, &dm)?;
        let (dh2g, gr_g) = asked(lg.backward(&s.h2, &dg, true)?);
        let (dh2u, gr_u) = asked(lu.backward(&s.h2, &du, true)?);
        let n2 = if gemma {
            l.pre_ff_norm.as_ref().expect("gemma has pre_ff_norm")
        } else {
            &l.post_attn_norm
        };
        let dx1 = (dy + norm_bwd(n2, &s.x1, &(dh2g + dh2u)?, hidden)?)?;
        // Attention
        let do0 = if gemma {
            norm_bwd(&l.post_attn_norm, &s.o0, &dx1, hidden)?
        } else {
            dx1.clone()
        };
        let (da, gr_o) = asked(lo.backward(&s.a, &do0, true)?);
        let (dqr, dkr, dv) = attend.backward(&s.qr, &s.kr, &s.v, &da, scale, (nh, nkv))?;
        let dqn = rope(&dqr, &cos, &neg_sin, (b, t, nh, hd))?;
        let dkn = rope(&dkr, &cos, &neg_sin, (b, t, nkv, hd))?;
        let dq0 = match &l.q_norm {
            Some(n) => norm_bwd(n, &s.q0, &dqn, hd)?,
            None => dqn,
        };
        let dk0 = match &l.k_norm {
            Some(n) => norm_bwd(n, &s.k0, &dkn, hd)?,
            None => dkn,
        };
        // The input: q, k, v and the residual. The first layer's input (the embeddings) needs
        // no gradient, so its frozen products' input gradients are skipped there.
        let (dq, gr_q) = lq.backward(&s.h1, &dq0, x_tracked)?;
        let (dk, gr_k) = lk.backward(&s.h1, &dk0, x_tracked)?;
        let (dvv, gr_v) = lv.backward(&s.h1, &dv, x_tracked)?;
        let dx = match (dq, dk, dvv) {
            (Some(a), Some(b), Some(c)) => {
                let dh1 = ((a + b)? + c)?;
                Some((dx1 + norm_bwd(&l.input_norm, &s.x, &dh1, hidden)?)?)
            }
            _ => None,
        };
        // In op-input order: q, k, v, o, gate, up, down (the order `Lin::new` ran in).
        let grads = [gr_q, gr_k, gr_v, gr_o, gr_g, gr_u, gr_d]
            .into_iter()
            .flatten()
            .collect();
        Ok((dx, grads))
    };

    if vars.a.is_empty() {
        return with_grad(
            x,
            y,
            Box::new(move |_x, _y, dy| {
                let (dx, _) = backward(dy).map_err(candle_core::Error::wrap)?;
                match dx {
                    Some(dx) => Ok(dx),
                    None => dy.zeros_like(),
                }
            }),
        );
    }
    let pa = Tensor::cat(&vars.a, 0)?;
    let pb = Tensor::cat(&vars.b, 0)?;
    with_grad3(
        x,
        &pa,
        &pb,
        y,
        Box::new(move |_x, _pa, _pb, dy| {
            let (dx, grads) = backward(dy).map_err(candle_core::Error::wrap)?;
            let mut ga = Vec::with_capacity(grads.len());
            let mut gb = Vec::with_capacity(grads.len());
            for (da, db) in grads {
                ga.push(da.flatten_all()?);
                gb.push(db.flatten_all()?);
            }
            Ok((dx, Some(Tensor::cat(&ga, 0)?), Some(Tensor::cat(&gb, 0)?)))
        }),
    )
}
