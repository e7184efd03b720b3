//! One graph node per decoder layer for LoRA training on the CPU in f32.
//!
//! In: a layer (the `blocks` types), its input `x: [B * T, H]` (tracked), the batch's rope
//! tables and attention layout ([`Attend`]: padded rows, or the real tokens of rows that
//! continue one shared prefix, attending as blocks of their own lengths), and the training
//! context (adapter, dropout RNG). Out: the layer's output
//! `[B * T, H]`, attached to the gradient graph as a single op whose inputs are `x` and the layer's LoRA
//! weights (each side concatenated into one flat tensor), with the layer's backward pass
//! written out here from the kernels' own backward passes. With [`Only`] (the model's last
//! layer, whose output feeds only the loss) the output is `[M, H]` at `M` chosen tokens: keys
//! and values come from every token, queries, output projection and MLP from those `M` alone.
//!
//! Why: candle's autograd gives every gradient of every node a fresh zero tensor and an add,
//! and every op a new buffer; a layer built from ~15 nodes paid that ~15 times per step. The
//! forward here is the inference kernels' (rms-norm, frozen products, LoRA, rope, attention,
//! gated MLP); the activations the backward needs are kept by the op until the graph is
//! dropped. The same dropout masks are drawn, in the same order, as the per-node path, so both
//! give the same values and gradients (checked against the f64 model's plain ops).

use std::sync::Arc;

use candle_core::Tensor;

use super::autograd::{with_grad, with_grad3};
use super::blocks::{Ctx, Layer, Linear, RmsNorm};
use super::config::{Arch, ModelConfig};
use super::kernels::{self, Block, Glu};
use crate::error::Result;

/// The batch-level inputs a layer needs besides `x`: the rope tables `[B, T, hd / 2]` of its
/// `B * T` tokens and how they attend.
pub(crate) struct Batch<'a> {
    pub b: usize,
    pub t: usize,
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    pub attend: Attend,
    /// The output wanted at some tokens only (the last layer; see [`Only`]).
    pub only: Option<Only>,
}

/// The `M` tokens a layer's output is wanted at (the positions that predict answer tokens,
/// in the last layer): their queries attend to every token's keys and values, and the output
/// projection and MLP run on them alone. For Gemma 3 270M and SIB-200 that skips about 94% of
/// the last layer's products (q, o, gate, up and down at all but a few tokens per row). Only
/// for [`Attend::Packed`] batches, whose key copies the blocks read.
#[derive(Clone)]
pub(crate) struct Only {
    /// u32 `[M]`: the op's tokens kept, in output order (distinct).
    pub(crate) rows: Tensor,
    /// The blocks of those `M` queries (a run of one row's tokens each, over that row's key
    /// copy in [`Attend::Packed`]) and their masks' values, for this layer's kind.
    pub(crate) mask: Tensor,
    pub(crate) blocks: Arc<[Block]>,
}

/// Which keys each query of a batch attends to.
#[derive(Clone)]
pub(crate) enum Attend {
    /// `B` rows of `T` tokens, each attending within itself: additive mask `[B, 1, T, T]`.
    Rows { mask: Tensor },
    /// A shared prefix, then rows of their own lengths (no padding), as blocks of one
    /// attention call: the prefix's queries over its own keys, each row's over a copy of the
    /// prefix's keys followed by its own. `keys: u32 [K]` picks those copies from the op's
    /// tokens (the prefix's appear once per block, and their gradients are summed back);
    /// `mask` holds the blocks' masks' values, for this layer's kind (full or sliding).
    Packed {
        keys: Tensor,
        mask: Tensor,
        blocks: Arc<[Block]>,
    },
}

impl Attend {
    /// Attention output `[N, nh * hd]` for rope'd queries `[N, nh * hd]` and keys and values
    /// `[N, nkv * hd]` of the op's `N` tokens.
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
            Attend::Packed { mask, blocks, .. } => {
                self.forward_at(q, k, v, mask, blocks, scale, heads)
            }
        }
    }

    /// `(dq, dk, dv)` of [`Attend::forward`] for the output gradient `da`.
    #[allow(clippy::too_many_arguments)]
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
            Attend::Packed { mask, blocks, .. } => {
                self.backward_at(q, k, v, da, mask, blocks, scale, heads)
            }
        }
    }

    /// Attention of queries `q` in `blocks` (with `mask`) over the key copies of a packed
    /// batch, from its tokens' keys and values `k`, `v: [N, nkv * hd]`.
    #[allow(clippy::too_many_arguments)]
    fn forward_at(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
        blocks: &[Block],
        scale: f32,
        heads: (usize, usize),
    ) -> Result<Tensor> {
        let keys = self.keys()?;
        let (kc, vc) = (k.index_select(keys, 0)?, v.index_select(keys, 0)?);
        kernels::attention_2d::forward_blocks(q, &kc, &vc, mask, blocks, scale, heads)
    }

    /// `(dq, dk, dv)` of [`Attend::forward_at`]: the key copies' gradients summed onto the
    /// tokens they were copied from.
    #[allow(clippy::too_many_arguments)]
    fn backward_at(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        da: &Tensor,
        mask: &Tensor,
        blocks: &[Block],
        scale: f32,
        heads: (usize, usize),
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let keys = self.keys()?;
        let (kc, vc) = (k.index_select(keys, 0)?, v.index_select(keys, 0)?);
        let (dq, dkc, dvc) =
            kernels::attention_2d::backward_blocks(q, &kc, &vc, mask, blocks, da, scale, heads)?;
        let back = |d: Tensor| -> Result<Tensor> { Ok(k.zeros_like()?.index_add(keys, &d, 0)?) };
        Ok((dq, back(dkc)?, back(dvc)?))
    }

    /// The key copies of a packed batch.
    fn keys(&self) -> Result<&Tensor> {
        match self {
            Attend::Packed { keys, .. } => Ok(keys),
            Attend::Rows { .. } => Err(crate::error::Error::Internal(
                "queries at some tokens only need a packed batch".into(),
            )),
        }
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

/// A linear layer's LoRA `(dA, dB)`, when it has a pair.
type LoraGrads = Option<(Tensor, Tensor)>;

/// A linear layer's input gradient (when asked for) and LoRA `(dA, dB)` (when it has a pair).
type LinGrads = (Option<Tensor>, LoraGrads);

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

/// The input gradient of [`norm_fwd`] for the output gradient `g`.
fn norm_bwd(n: &RmsNorm, x: &Tensor, g: &Tensor, width: usize) -> Result<Tensor> {
    let rows = x.elem_count() / width;
    let x2 = x.contiguous()?.reshape((rows, width))?;
    let g2 = g.contiguous()?.reshape((rows, width))?;
    match kernels::rms_norm_backward(&x2, &n.scale, &g2, n.eps)? {
        Some(d) => Ok(d.reshape(x.shape())?),
        None => Err(not_fusable()),
    }
}

/// Half-split rope of `x: [B * T, heads * hd]` laid out as `bthd` (the opposite angle, `-sin`,
/// gives its backward).
fn rope(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    bthd: (usize, usize, usize, usize),
) -> Result<Tensor> {
    let y = candle_nn::rotary_emb::rope_thd(&x.contiguous()?.reshape(bthd)?, cos, sin)?;
    Ok(y.reshape(x.shape())?)
}

/// The sizes and switches of one layer's op, read once from the config and the batch.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
    hidden: usize,
    gemma: bool,
    scale: f32,
    kind: Glu,
}

impl Dims {
    fn new(cfg: &ModelConfig, batch: &Batch) -> Dims {
        let gemma = cfg.arch == Arch::Gemma3;
        Dims {
            b: batch.b,
            t: batch.t,
            nh: cfg.num_attention_heads,
            nkv: cfg.num_key_value_heads,
            hd: cfg.head_dim,
            hidden: cfg.hidden_size,
            gemma,
            scale: cfg.attn_scale() as f32,
            kind: if gemma { Glu::GeluTanh } else { Glu::Silu },
        }
    }
}

/// What the attention half's backward pass needs from its forward.
struct AttnSaved {
    x: Tensor,
    h1: Tensor,
    /// The normed input at the query tokens (`h1` itself without [`Only`]), with their rope
    /// tables (the sine negated, for the backward) and `(B, T)` layout.
    h1q: Tensor,
    q_cos: Tensor,
    q_neg_sin: Tensor,
    q_bt: (usize, usize),
    q0: Tensor,
    k0: Tensor,
    qr: Tensor,
    kr: Tensor,
    v: Tensor,
    a: Tensor,
    o0: Tensor,
}

/// What the MLP half's backward pass needs from its forward.
struct MlpSaved {
    x1: Tensor,
    h2: Tensor,
    g: Tensor,
    u: Tensor,
    m: Tensor,
    d0: Tensor,
}

/// The error of a fused layer given tensors that are not f32 on the CPU.
fn not_fusable() -> crate::error::Error {
    crate::error::Error::Internal("the fused layer needs f32 tensors on the CPU".into())
}

/// The norm in front of the MLP: Gemma's pre-feed-forward norm, Llama's post-attention norm.
fn mlp_norm(l: &Layer, gemma: bool) -> &RmsNorm {
    if gemma {
        l.pre_ff_norm.as_ref().expect("gemma has pre_ff_norm")
    } else {
        &l.post_attn_norm
    }
}

/// The attention half of the forward, `x1 = x + o` (Gemma: `x + norm(o)`) for the detached
/// input `xd` (at the tokens of [`Only`] when the batch has it), with what its backward needs
/// and the q, k, v, o layers (in op-input order).
fn attention_forward(
    d: &Dims,
    l: &Layer,
    xd: Tensor,
    batch: &Batch,
    ctx: &Ctx,
    vars: &mut Vars,
) -> Result<(Tensor, AttnSaved, [Lin; 4])> {
    let h1 = norm_fwd(&l.input_norm, &xd, d.hidden)?;
    // The query side: every token, or the tokens of `Only` with their rope tables.
    let (h1q, xq, q_cos, q_sin, q_bt) = match &batch.only {
        None => (
            h1.clone(),
            xd.clone(),
            batch.cos.clone(),
            batch.sin.clone(),
            (d.b, d.t),
        ),
        Some(o) => {
            let m = o.rows.dim(0)?;
            let pick = |c: &Tensor| -> Result<Tensor> {
                let half = c.dim(2)?;
                Ok(c.reshape((d.b * d.t, half))?
                    .index_select(&o.rows, 0)?
                    .reshape((1, m, half))?)
            };
            (
                h1.index_select(&o.rows, 0)?,
                xd.index_select(&o.rows, 0)?,
                pick(batch.cos)?,
                pick(batch.sin)?,
                (1, m),
            )
        }
    };
    let lq = Lin::new(&l.q, &h1q, ctx, vars)?;
    let q0 = lq.forward(&h1q)?;
    let lk = Lin::new(&l.k, &h1, ctx, vars)?;
    let k0 = lk.forward(&h1)?;
    let lv = Lin::new(&l.v, &h1, ctx, vars)?;
    let v = lv.forward(&h1)?;
    let qn = match &l.q_norm {
        Some(n) => norm_fwd(n, &q0, d.hd)?,
        None => q0.clone(),
    };
    let kn = match &l.k_norm {
        Some(n) => norm_fwd(n, &k0, d.hd)?,
        None => k0.clone(),
    };
    let qr = rope(&qn, &q_cos, &q_sin, (q_bt.0, q_bt.1, d.nh, d.hd))?;
    let kr = rope(&kn, batch.cos, batch.sin, (d.b, d.t, d.nkv, d.hd))?;
    let heads = (d.nh, d.nkv);
    let a = match &batch.only {
        None => batch.attend.forward(&qr, &kr, &v, d.scale, heads)?,
        Some(o) => batch
            .attend
            .forward_at(&qr, &kr, &v, &o.mask, &o.blocks, d.scale, heads)?,
    };
    let lo = Lin::new(&l.o, &a, ctx, vars)?;
    let o0 = lo.forward(&a)?;
    let o = if d.gemma {
        norm_fwd(&l.post_attn_norm, &o0, d.hidden)?
    } else {
        o0.clone()
    };
    let x1 = (xq + o)?;
    let saved = AttnSaved {
        x: xd,
        h1,
        h1q,
        q_cos,
        q_neg_sin: q_sin.neg()?,
        q_bt,
        q0,
        k0,
        qr,
        kr,
        v,
        a,
        o0,
    };
    Ok((x1, saved, [lq, lk, lv, lo]))
}

/// The MLP half of the forward, `y = x1 + down(act(gate(h2)) * up(h2))` with `h2` the normed
/// `x1` (Gemma also norms the MLP's output), with what its backward needs and the gate, up and
/// down layers (in op-input order).
fn mlp_forward(
    d: &Dims,
    l: &Layer,
    x1: Tensor,
    ctx: &Ctx,
    vars: &mut Vars,
) -> Result<(Tensor, MlpSaved, [Lin; 3])> {
    let h2 = norm_fwd(mlp_norm(l, d.gemma), &x1, d.hidden)?;
    let lg = Lin::new(&l.gate, &h2, ctx, vars)?;
    let g = lg.forward(&h2)?;
    let lu = Lin::new(&l.up, &h2, ctx, vars)?;
    let u = lu.forward(&h2)?;
    let m = kernels::glu(d.kind, &g, &u)?.ok_or_else(not_fusable)?;
    let ld = Lin::new(&l.down, &m, ctx, vars)?;
    let d0 = ld.forward(&m)?;
    let dd = if d.gemma {
        let n = l.post_ff_norm.as_ref().expect("gemma has post_ff_norm");
        norm_fwd(n, &d0, d.hidden)?
    } else {
        d0.clone()
    };
    let y = (&x1 + dd)?;
    let saved = MlpSaved {
        x1,
        h2,
        g,
        u,
        m,
        d0,
    };
    Ok((y, saved, [lg, lu, ld]))
}

/// The input gradient of a linear layer that was asked for one, with its LoRA grads.
fn asked(r: LinGrads) -> (Tensor, LoraGrads) {
    (r.0.expect("input gradient asked for"), r.1)
}

/// One layer's op after its forward: the activations its backward needs, the layer with this
/// step's LoRA pairs, the rope tables (the backward rotates by the opposite angle) and the
/// attention layout.
struct Node {
    d: Dims,
    layer: Layer,
    attn: AttnSaved,
    attn_lins: [Lin; 4],
    mlp: MlpSaved,
    mlp_lins: [Lin; 3],
    cos: Tensor,
    neg_sin: Tensor,
    attend: Attend,
    only: Option<Only>,
    /// Whether the layer's input carries a graph (not for the first layer's embeddings).
    x_tracked: bool,
}

impl Node {
    /// The layer's input gradient (`None` when the input is not tracked) and its LoRA
    /// `(dA, dB)` pairs in op-input order, for the output gradient `dy`.
    fn backward(&self, dy: &Tensor) -> Result<LayerGrads> {
        let (dx1, mlp_grads) = self.mlp_backward(dy)?;
        let (dx, attn_grads) = self.attention_backward(dx1)?;
        // In op-input order: q, k, v, o, gate, up, down (the order `Lin::new` ran in).
        let grads = attn_grads.into_iter().chain(mlp_grads).flatten().collect();
        Ok((dx, grads))
    }

    /// The gradient at `x1` (the residual plus the MLP's share) and the gate, up and down
    /// layers' LoRA grads.
    fn mlp_backward(&self, dy: &Tensor) -> Result<(Tensor, [LoraGrads; 3])> {
        let (d, s, l) = (&self.d, &self.mlp, &self.layer);
        let [lg, lu, ld] = &self.mlp_lins;
        let dd0 = if d.gemma {
            let n = l.post_ff_norm.as_ref().expect("gemma has post_ff_norm");
            norm_bwd(n, &s.d0, dy, d.hidden)?
        } else {
            dy.clone()
        };
        let (dm, gr_d) = asked(ld.backward(&s.m, &dd0, true)?);
        let (dg, du) = kernels::glu_backward(d.kind, &s.g, &s.u, &dm)?;
        let (dh2g, gr_g) = asked(lg.backward(&s.h2, &dg, true)?);
        let (dh2u, gr_u) = asked(lu.backward(&s.h2, &du, true)?);
        let dh2 = (dh2g + dh2u)?;
        let dx1 = (dy + norm_bwd(mlp_norm(l, d.gemma), &s.x1, &dh2, d.hidden)?)?;
        Ok((dx1, [gr_g, gr_u, gr_d]))
    }

    /// A gradient at the query tokens `[M, w]` as one at every token (zeros elsewhere) under
    /// [`Only`]; unchanged otherwise.
    fn to_all(&self, g: Tensor) -> Result<Tensor> {
        match &self.only {
            None => Ok(g),
            Some(o) => {
                let all = Tensor::zeros((self.d.b * self.d.t, g.dim(1)?), g.dtype(), g.device())?;
                Ok(all.index_add(&o.rows, &g, 0)?)
            }
        }
    }

    /// The input gradient from the gradient at `x1` (when the input is tracked) and the q, k, v
    /// and o layers' LoRA grads.
    fn attention_backward(&self, dx1: Tensor) -> Result<(Option<Tensor>, [LoraGrads; 4])> {
        let (d, s, l) = (&self.d, &self.attn, &self.layer);
        let [lq, lk, lv, lo] = &self.attn_lins;
        let do0 = if d.gemma {
            norm_bwd(&l.post_attn_norm, &s.o0, &dx1, d.hidden)?
        } else {
            dx1.clone()
        };
        let (da, gr_o) = asked(lo.backward(&s.a, &do0, true)?);
        let heads = (d.nh, d.nkv);
        let (dqr, dkr, dv) = match &self.only {
            None => self
                .attend
                .backward(&s.qr, &s.kr, &s.v, &da, d.scale, heads)?,
            Some(o) => self
                .attend
                .backward_at(&s.qr, &s.kr, &s.v, &da, &o.mask, &o.blocks, d.scale, heads)?,
        };
        let (qb, qt) = s.q_bt;
        let dqn = rope(&dqr, &s.q_cos, &s.q_neg_sin, (qb, qt, d.nh, d.hd))?;
        let dkn = rope(&dkr, &self.cos, &self.neg_sin, (d.b, d.t, d.nkv, d.hd))?;
        let dq0 = match &l.q_norm {
            Some(n) => norm_bwd(n, &s.q0, &dqn, d.hd)?,
            None => dqn,
        };
        let dk0 = match &l.k_norm {
            Some(n) => norm_bwd(n, &s.k0, &dkn, d.hd)?,
            None => dkn,
        };
        // The input: q, k, v and the residual. The first layer's input (the embeddings) needs
        // no gradient, so its frozen products' input gradients are skipped there.
        let (dq, gr_q) = lq.backward(&s.h1q, &dq0, self.x_tracked)?;
        let (dk, gr_k) = lk.backward(&s.h1, &dk0, self.x_tracked)?;
        let (dvv, gr_v) = lv.backward(&s.h1, &dv, self.x_tracked)?;
        let dx = match (dq, dk, dvv) {
            (Some(a), Some(b), Some(c)) => {
                let dh1 = ((self.to_all(a)? + b)? + c)?;
                Some((self.to_all(dx1)? + norm_bwd(&l.input_norm, &s.x, &dh1, d.hidden)?)?)
            }
            _ => None,
        };
        Ok((dx, [gr_q, gr_k, gr_v, gr_o]))
    }
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
    let d = Dims::new(cfg, batch);
    let mut vars = Vars::default();
    let (x1, attn, attn_lins) = attention_forward(&d, l, x.detach(), batch, ctx, &mut vars)?;
    let (y, mlp, mlp_lins) = mlp_forward(&d, l, x1, ctx, &mut vars)?;
    let node = Node {
        d,
        layer: l.clone(),
        attn,
        attn_lins,
        mlp,
        mlp_lins,
        cos: batch.cos.clone(),
        neg_sin: batch.sin.neg()?,
        attend: batch.attend.clone(),
        only: batch.only.clone(),
        x_tracked: x.track_op(),
    };
    attach(x, y, node, vars)
}

/// `y` attached to the graph as one op whose inputs are `x` and the layer's LoRA weights
/// (`vars`, each side concatenated into one flat tensor; `x` alone without an adapter), with
/// `node`'s backward pass.
fn attach(x: &Tensor, y: Tensor, node: Node, vars: Vars) -> Result<Tensor> {
    if vars.a.is_empty() {
        return with_grad(
            x,
            y,
            Box::new(move |x, _y, dy| {
                let (dx, _) = node.backward(dy).map_err(candle_core::Error::wrap)?;
                match dx {
                    Some(dx) => Ok(dx),
                    None => x.zeros_like(),
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
            let (dx, grads) = node.backward(dy).map_err(candle_core::Error::wrap)?;
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
