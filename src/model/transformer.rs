//! The decoder: Gemma 3 and Llama-family transformers with LoRA hooks, returning hidden states;
//! logits are computed only at the rows a loss or a score needs.
//!
//! Shapes: `ids: [B, T]` (u32), `mask: [B, T]` (1 = real token, 0 = padding; left or right).
//! Positions are `cumsum(mask) - 1`, so a sequence gets the same positions whatever padding
//! surrounds it. Attention of query t to key s is allowed when `s <= t`, key s is real and, on
//! sliding layers, `pos(t) - pos(s) < window`. [`Model::hidden`] returns `[B, T, hidden]`
//! after the final norm; [`Model::logits_at`] maps chosen flat rows `b * T + t` to
//! `[N, vocab]`.
//!
//! Per layer (Llama):  `h = x + attn(norm(x)); y = h + mlp(norm(h))`,
//! Gemma 3 adds norms after attention and MLP (`x + post_norm(attn(pre_norm(x)))`), RMSNorm on q
//! and k, `(1 + w)` norm weights (folded in at load time), GeGLU with tanh-gelu, embeddings
//! scaled by `sqrt(hidden)` and attention scaled by `query_pre_attn_scalar^-0.5`.
//! Every op used has a backward pass in candle, so LoRA weights receive gradients.
//!
//! The building blocks (linear layers with their LoRA hook, RMSNorm, a layer's weights and
//! [`Ctx`]) come from `blocks` and are re-exported here; LoRA training on the CPU in f32 runs
//! each layer as one fused graph node (`layer_train`).

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};

use super::autograd::with_grad;
use super::blocks::frozen_matmul;
use super::config::{Arch, LayerKind, ModelConfig};
use super::kernels::{self, Block};
use super::layer_train::{self, Attend, Batch, Only};
use super::lora::{Adapter, ModuleInfo};
use crate::error::{Error, Result};

pub use super::blocks::{Ctx, Layer, Linear, RmsNorm};

/// Fused softmax over the last dim; backward `x' = y * (g - sum(g * y))`.
fn softmax_train(x: &Tensor) -> Result<Tensor> {
    let y = candle_nn::ops::softmax_last_dim(&x.detach())?;
    with_grad(
        x,
        y,
        Box::new(|_x, y, g| {
            let s = (g * y)?.sum_keepdim(D::Minus1)?;
            y * g.broadcast_sub(&s)?
        }),
    )
}

/// The whole model: weights plus configuration.
#[derive(Debug, Clone)]
pub struct Model {
    pub config: ModelConfig,
    /// `[vocab, hidden]`
    pub embed: Tensor,
    pub layers: Vec<Layer>,
    pub final_norm: RmsNorm,
    /// `[vocab, hidden]`; `None` when tied to `embed`.
    pub lm_head: Option<Tensor>,
    /// bf16 tile copies of the output matrix (`lm_head`, else `embed`).
    pub head_packs: kernels::PackCache,
    pub dtype: DType,
    pub device: Device,
}

/// Positions and attention masks for a batch (built once, shared by all layers).
struct Prepared {
    b: usize,
    t: usize,
    /// Additive masks `[B, 1, T, T]` for full and sliding layers.
    mask_full: Tensor,
    mask_sliding: Option<Tensor>,
    /// Rope tables per rope base.
    rope: HashMap<u64, RopeTables>,
    /// `Some` for rows that continue one shared prefix ([`Model::hidden_shared_prefix_at`]); the
    /// batch is then one row of its `T = N` real tokens and the masks above hold the values of
    /// its attention blocks' masks, one after the other.
    shared: Option<SharedLayout>,
}

/// The attention layout of a shared-prefix batch: the `N` real tokens (the prefix, then each
/// row's own tokens, no padding) attend as blocks of one call ([`Attend::Packed`]; the masks'
/// values are [`Prepared`]'s `mask_full` and `mask_sliding`).
struct SharedLayout {
    /// u32 `[K]`: the key copies the blocks read (the prefix, then per row the prefix and the
    /// row's tokens).
    keys: Tensor,
    blocks: Arc<[Block]>,
    /// The tokens the last layer's output is wanted at ([`Model::hidden_shared_prefix_at`]).
    only: OnlyAt,
}

/// A query of a shared-prefix batch: the prefix's token `q`, or token `j` of row `r`.
#[derive(Clone, Copy)]
enum Query {
    Prefix(usize),
    Row(usize, usize),
}

/// The last layer's query tokens of a shared-prefix batch ([`layer_train::Only`] per layer
/// kind): u32 indices into the real tokens, their blocks over the batch's key copies and the
/// blocks' masks' values for full and sliding layers.
struct OnlyAt {
    rows: Tensor,
    blocks: Arc<[Block]>,
    mask_full: Tensor,
    mask_sliding: Option<Tensor>,
}

/// Keys and values of the tokens a batch has run so far, per layer (after rope; `[B, T,
/// kv_heads, head_dim]` on the CPU in f32, `[B, kv_heads, T, head_dim]` elsewhere), for
/// incremental decoding with [`Model::hidden_cached`].
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Tokens per row so far (padding included).
    len: usize,
    /// Rows of the batch it was started with.
    rows: usize,
}

impl KvCache {
    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// cos/sin as `[B, 1, T, head_dim]` (differentiable path) and `[B, T, head_dim / 2]` (fused).
pub(crate) struct RopeTables {
    cos: Tensor,
    sin: Tensor,
    pub(crate) cos_half: Tensor,
    pub(crate) sin_half: Tensor,
}

const NEG: f32 = -1e30;

/// Visibility group of a padding token in [`Model::hidden_packed`] (seen by no query).
pub const PAD: u16 = u16::MAX;

impl Model {
    /// The linear modules an adapter may target, with their PEFT names and shapes.
    pub fn modules(&self) -> Vec<ModuleInfo> {
        self.layers
            .iter()
            .flat_map(|l| [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down])
            .map(Linear::info)
            .collect()
    }

    fn prepare(&self, mask: &[Vec<u8>]) -> Result<Prepared> {
        let b = mask.len();
        let t = mask.first().map(|r| r.len()).unwrap_or(0);
        if b == 0 || t == 0 || mask.iter().any(|r| r.len() != t) {
            return Err(Error::Internal(format!(
                "batch mask must be a non-empty rectangle, got {b} rows"
            )));
        }
        let pos: Vec<Vec<i64>> = mask
            .iter()
            .map(|r| {
                let mut c = -1i64;
                r.iter()
                    .map(|&m| {
                        c += i64::from(m != 0);
                        c.max(0)
                    })
                    .collect()
            })
            .collect();
        let vis: Vec<Vec<u16>> = mask
            .iter()
            .map(|r| r.iter().map(|&m| if m != 0 { 0 } else { PAD }).collect())
            .collect();
        self.prepare_layout(0, pos, vis)
    }

    /// Masks and rope tables from explicit positions and visibility groups: query `q` sees key
    /// `k <= q` when `vis[k]` is not [`PAD`] and is 0 (a shared prefix) or equal to `vis[q]`.
    /// With `past > 0` the rows continue `past` cached tokens at positions `0..past`, which
    /// every query sees (within the sliding window on sliding layers): the masks are then `[B,
    /// 1, T, past + T]`, the cached keys first.
    fn prepare_layout(
        &self,
        past: usize,
        pos: Vec<Vec<i64>>,
        vis: Vec<Vec<u16>>,
    ) -> Result<Prepared> {
        let b = pos.len();
        let t = pos.first().map(|r| r.len()).unwrap_or(0);
        if b == 0
            || t == 0
            || pos.iter().any(|r| r.len() != t)
            || vis.len() != b
            || vis.iter().any(|r| r.len() != t)
        {
            return Err(Error::Internal(format!(
                "positions and groups must be non-empty rectangles of the same shape ({b} rows)"
            )));
        }
        let total = past + t;
        let build = |window: Option<usize>| -> Result<Tensor> {
            let near = |q: i64, k: i64| window.is_none_or(|w| ((q - k) as usize) < w);
            let mut m = vec![NEG; b * t * total];
            for bi in 0..b {
                for qi in 0..t {
                    let row = &mut m[(bi * t + qi) * total..(bi * t + qi + 1) * total];
                    let qp = pos[bi][qi];
                    for (ki, slot) in row[..past].iter_mut().enumerate() {
                        if near(qp, ki as i64) {
                            *slot = 0.0;
                        }
                    }
                    for ki in 0..=qi {
                        let g = vis[bi][ki];
                        if g == PAD || (g != 0 && g != vis[bi][qi]) || !near(qp, pos[bi][ki]) {
                            continue;
                        }
                        row[past + ki] = 0.0;
                    }
                }
            }
            Ok(Tensor::from_vec(m, (b, 1, t, total), &self.device)?.to_dtype(self.dtype)?)
        };
        let mask_full = build(None)?;
        let mask_sliding = if self.config.layer_kinds.contains(&LayerKind::Sliding) {
            Some(build(self.config.sliding_window)?)
        } else {
            None
        };
        let rope_t = self.rope_tables(&pos)?;
        Ok(Prepared {
            b,
            t,
            mask_full,
            mask_sliding,
            rope: rope_t,
            shared: None,
        })
    }

    /// Rope tables for rows of rotary positions, per rope base.
    fn rope_tables(&self, pos: &[Vec<i64>]) -> Result<HashMap<u64, RopeTables>> {
        let b = pos.len();
        let t = pos.first().map(|r| r.len()).unwrap_or(0);
        let mut bases: Vec<f64> = (0..self.config.num_hidden_layers)
            .map(|i| self.config.rope_base(i))
            .collect();
        bases.sort_by(f64::total_cmp);
        bases.dedup();
        let hd = self.config.head_dim;
        let mut rope_t = HashMap::new();
        for base in bases {
            let half = hd / 2;
            let mut cos: Vec<f64> = Vec::with_capacity(b * t * hd);
            let mut sin: Vec<f64> = Vec::with_capacity(b * t * hd);
            for row in pos {
                for &p in row {
                    let mut c = Vec::with_capacity(half);
                    let mut s = Vec::with_capacity(half);
                    for j in 0..half {
                        let inv = 1.0 / base.powf((2 * j) as f64 / hd as f64);
                        let ang = p as f64 * inv;
                        c.push(ang.cos());
                        s.push(ang.sin());
                    }
                    cos.extend(c.iter().chain(c.iter()));
                    sin.extend(s.iter().chain(s.iter()));
                }
            }
            let cos = Tensor::from_vec(cos, (b, 1, t, hd), &self.device)?.to_dtype(self.dtype)?;
            let sin = Tensor::from_vec(sin, (b, 1, t, hd), &self.device)?.to_dtype(self.dtype)?;
            let cos_half = cos.squeeze(1)?.narrow(D::Minus1, 0, hd / 2)?.contiguous()?;
            let sin_half = sin.squeeze(1)?.narrow(D::Minus1, 0, hd / 2)?.contiguous()?;
            rope_t.insert(
                base.to_bits(),
                RopeTables {
                    cos,
                    sin,
                    cos_half,
                    sin_half,
                },
            );
        }
        Ok(rope_t)
    }

    /// Masks and rope tables for `tn` new tokens of each row after `past` cached ones. Row `b`
    /// starts with `pads[b]` padding tokens (left padding): its token at index `j` sits at
    /// position `j - pads[b]`, and the new token `q` (index `past + q`) sees the row's real
    /// tokens up to itself, within the sliding window on sliding layers. A padding query sees
    /// nothing (its output is never read). Masks are `[B, 1, tn, past + tn]`.
    fn prepare_step(&self, past: usize, tn: usize, pads: &[usize]) -> Result<Prepared> {
        let b = pads.len();
        let total = past + tn;
        let build = |window: Option<usize>| -> Result<Tensor> {
            let mut m = vec![NEG; b * tn * total];
            for (bi, &pad) in pads.iter().enumerate() {
                for qi in 0..tn {
                    let qp = past + qi;
                    for kj in pad..=qp {
                        if window.is_some_and(|w| qp - kj >= w) {
                            continue;
                        }
                        m[(bi * tn + qi) * total + kj] = 0.0;
                    }
                }
            }
            Ok(Tensor::from_vec(m, (b, 1, tn, total), &self.device)?.to_dtype(self.dtype)?)
        };
        let mask_full = build(None)?;
        let mask_sliding = if self.config.layer_kinds.contains(&LayerKind::Sliding) {
            Some(build(self.config.sliding_window)?)
        } else {
            None
        };
        let pos: Vec<Vec<i64>> = pads
            .iter()
            .map(|&pad| {
                (past..total)
                    .map(|j| (j as i64 - pad as i64).max(0))
                    .collect()
            })
            .collect();
        Ok(Prepared {
            b,
            t: tn,
            mask_full,
            mask_sliding,
            rope: self.rope_tables(&pos)?,
            shared: None,
        })
    }

    /// Masks and rope tables of a shared-prefix batch: `prefix` tokens at positions `0..P`,
    /// then rows of `lens[r]` tokens at positions `P..`, laid out as the real tokens (prefix,
    /// then each row's own) and attending as blocks: the prefix causally over itself, row
    /// query `j` (position `P + j`) over prefix key `i` and own key `j' <= j`, within the
    /// sliding window on sliding layers. The last layer's queries are the tokens `at` only
    /// ([`OnlyAt`]: slots `P + r * S + j` of the rows right-padded to the longest, `S`).
    fn prepare_shared(&self, prefix: usize, lens: &[usize], at: &[u32]) -> Result<Prepared> {
        let (p, rows) = (prefix, lens.len());
        let s = lens.iter().copied().max().unwrap_or(0);
        if p == 0 || rows == 0 || s == 0 {
            return Err(Error::Internal(format!(
                "a shared-prefix batch needs a prefix and rows (prefix {p}, {rows} rows of {s})"
            )));
        }
        let within = |d: usize, w: Option<usize>| w.is_none_or(|w| d < w);
        // Real-token index of each row's first token, and each block's first key copy.
        let starts: Vec<usize> = lens
            .iter()
            .scan(p, |next, &len| {
                let start = *next;
                *next += len;
                Some(start)
            })
            .collect();
        // Row `r`'s key copy follows the prefix block and the `r` copies before it, each of
        // which repeats the prefix.
        let key_at: Vec<usize> = starts.iter().enumerate().map(|(r, &s)| s + r * p).collect();
        let mut keys: Vec<u32> = (0..p as u32).collect();
        for (r, &len) in lens.iter().enumerate() {
            keys.extend(0..p as u32);
            keys.extend((starts[r]..starts[r] + len).map(|i| i as u32));
        }
        // Mask values of a query over its block's keys.
        let val = |seen: bool| if seen { 0.0 } else { NEG };
        let query_mask = |m: &mut Vec<f32>, query: Query, w: Option<usize>| match query {
            Query::Prefix(q) => m.extend((0..p).map(|k| val(k <= q && within(q - k, w)))),
            Query::Row(r, j) => {
                m.extend((0..p).map(|k| val(within(p + j - k, w))));
                m.extend((0..lens[r]).map(|k| val(k <= j && within(j - k, w))));
            }
        };
        let mut blocks = vec![Block {
            q: 0,
            t: p,
            k: 0,
            tk: p,
            mask: 0,
        }];
        for (r, &len) in lens.iter().enumerate() {
            let mask = blocks.last().map_or(0, |b| b.mask + b.t * b.tk);
            blocks.push(Block {
                q: starts[r],
                t: len,
                k: key_at[r],
                tk: p + len,
                mask,
            });
        }
        let packed_mask = |w: Option<usize>| -> Result<Tensor> {
            let mut m = Vec::new();
            for q in 0..p {
                query_mask(&mut m, Query::Prefix(q), w);
            }
            for (r, &len) in lens.iter().enumerate() {
                for j in 0..len {
                    query_mask(&mut m, Query::Row(r, j), w);
                }
            }
            let n = m.len();
            Ok(Tensor::from_vec(m, n, &self.device)?.to_dtype(self.dtype)?)
        };
        let sliding = self.config.layer_kinds.contains(&LayerKind::Sliding);
        let window = self.config.sliding_window;
        let only = self.only_at(at, p, lens, &starts, &key_at, |m, q, w| {
            query_mask(m, Query::Row(q.0, q.1), w)
        })?;
        // Real tokens only: the prefix, then each row's own tokens.
        let pos: Vec<i64> = (0..p)
            .chain(lens.iter().flat_map(|&len| p..p + len))
            .map(|x| x as i64)
            .collect();
        let k = keys.len();
        Ok(Prepared {
            b: 1,
            t: pos.len(),
            mask_full: packed_mask(None)?,
            mask_sliding: if sliding {
                Some(packed_mask(window)?)
            } else {
                None
            },
            rope: self.rope_tables(&[pos])?,
            shared: Some(SharedLayout {
                keys: Tensor::from_vec(keys, k, &self.device)?,
                blocks: blocks.into(),
                only,
            }),
        })
    }

    /// The last layer's queries at padded slots `at` of a shared-prefix batch ([`OnlyAt`]):
    /// one block per run of a row's tokens over that row's key copy (from `key_at`), masks by
    /// `query_mask`. A row's tokens must be consecutive in `at`.
    fn only_at(
        &self,
        at: &[u32],
        p: usize,
        lens: &[usize],
        starts: &[usize],
        key_at: &[usize],
        query_mask: impl Fn(&mut Vec<f32>, (usize, usize), Option<usize>),
    ) -> Result<OnlyAt> {
        let s = lens.iter().copied().max().unwrap_or(0);
        let mut rj = Vec::with_capacity(at.len());
        for &slot in at {
            let slot = slot as usize;
            let Some((r, j)) = slot.checked_sub(p).map(|x| (x / s, x % s)) else {
                return Err(Error::Internal(format!(
                    "slot {slot} is in the prefix of {p}"
                )));
            };
            if r >= lens.len() || j >= lens[r] {
                return Err(Error::Internal(format!(
                    "slot {slot} is not a row token (prefix {p}, rows of {lens:?})"
                )));
            }
            rj.push((r, j));
        }
        let mut blocks: Vec<Block> = Vec::new();
        for (i, &(r, _)) in rj.iter().enumerate() {
            match blocks.last_mut() {
                Some(b) if b.k == key_at[r] => b.t += 1,
                _ => {
                    let mask = blocks.last().map_or(0, |b| b.mask + b.t * b.tk);
                    if blocks.iter().any(|b| b.k == key_at[r]) {
                        return Err(Error::Internal(format!(
                            "the slots of row {r} are not consecutive in {at:?}"
                        )));
                    }
                    blocks.push(Block {
                        q: i,
                        t: 1,
                        k: key_at[r],
                        tk: p + lens[r],
                        mask,
                    });
                }
            }
        }
        let masks = |w: Option<usize>| -> Result<Tensor> {
            let mut m = Vec::new();
            for &q in &rj {
                query_mask(&mut m, q, w);
            }
            let n = m.len();
            Ok(Tensor::from_vec(m, n, &self.device)?.to_dtype(self.dtype)?)
        };
        let real: Vec<u32> = rj.iter().map(|&(r, j)| (starts[r] + j) as u32).collect();
        let sliding = self.config.layer_kinds.contains(&LayerKind::Sliding);
        Ok(OnlyAt {
            rows: Tensor::from_vec(real, rj.len(), &self.device)?,
            blocks: blocks.into(),
            mask_full: masks(None)?,
            mask_sliding: if sliding {
                Some(masks(self.config.sliding_window)?)
            } else {
                None
            },
        })
    }

    /// Whether [`Model::hidden_shared_prefix_at`] runs for this model in training: LoRA training
    /// on the CPU in f32, where each layer is one fused graph node (`layer_train`).
    pub fn shares_prefixes(&self) -> bool {
        self.dtype == DType::F32 && self.device.is_cpu()
    }

    /// Training hidden states of rows that all begin with `prefix`, at some of their tokens:
    /// the prefix runs once and each row of `rows` (its tokens after the prefix) continues it,
    /// seeing the prefix and its own earlier tokens. `at` names the tokens wanted as slots of
    /// the rows right-padded to the longest (`S`): token `j` of row `r` is `P + r * S + j`
    /// (distinct, a row's consecutive; the positions a loss is taken at). Returns `[1, M,
    /// hidden]` in the order of `at`, equal to [`Model::hidden`] over the full rows at those
    /// tokens, with the prefix's work done once instead of `R` times, none on padding (the
    /// layers run on the real tokens, the attention as one block per row of its own length),
    /// and the last layer's queries, output projection and MLP run at the `M` tokens only (its
    /// keys and values still come from every token). With LoRA dropout the prefix's tokens get
    /// one draw for all rows, masks are drawn for real tokens only, and the last layer's for
    /// those products at the `M` tokens only. `None` without running anything when the model
    /// cannot ([`Model::shares_prefixes`]) or `ctx` is not a training context.
    pub fn hidden_shared_prefix_at(
        &self,
        prefix: &[u32],
        rows: &[Vec<u32>],
        at: &[u32],
        ctx: &Ctx,
    ) -> Result<Option<Tensor>> {
        if !self.shares_prefixes() || !ctx.training() {
            return Ok(None);
        }
        let lens: Vec<usize> = rows.iter().map(Vec::len).collect();
        let p = self.prepare_shared(prefix.len(), &lens, at)?;
        Ok(Some(self.hidden_run(
            &[shared_ids(prefix, rows)],
            p,
            ctx,
            None,
        )?))
    }

    /// Hidden states `[1, tn, hidden]` of `ids` (one row) continuing the tokens held in
    /// `cache`, whose keys and values are extended with the new tokens'. Equal to the
    /// corresponding rows of [`Model::hidden`] over the whole sequence, at the cost of the new
    /// tokens only.
    pub fn hidden_cached(&self, ids: &[u32], cache: &mut KvCache, ctx: &Ctx) -> Result<Tensor> {
        self.hidden_cached_rows(&[ids.to_vec()], &[0], cache, ctx)
    }

    /// [`Model::hidden_cached`] for a batch: `ids` holds `tn` new tokens per row (`[B, tn]`),
    /// row `b` having begun with `pads[b]` left-padding tokens (fixed for the cache's life).
    /// Returns `[B, tn, hidden]`; row `b`'s real tokens get the hidden states they would get
    /// alone. Used for batched greedy generation.
    pub fn hidden_cached_rows(
        &self,
        ids: &[Vec<u32>],
        pads: &[usize],
        cache: &mut KvCache,
        ctx: &Ctx,
    ) -> Result<Tensor> {
        let tn = ids.first().map_or(0, Vec::len);
        if tn == 0 || ids.iter().any(|r| r.len() != tn) {
            return Err(Error::Internal(
                "new tokens must be a non-empty rectangle".into(),
            ));
        }
        if pads.len() != ids.len() {
            return Err(Error::Internal(format!(
                "{} rows but {} padding lengths",
                ids.len(),
                pads.len()
            )));
        }
        if cache.layers.is_empty() {
            cache.layers = vec![None; self.layers.len()];
            cache.rows = ids.len();
        }
        if cache.layers.len() != self.layers.len() || cache.rows != ids.len() {
            return Err(Error::Internal(
                "the key/value cache belongs to another model or batch".into(),
            ));
        }
        let p = self.prepare_step(cache.len, tn, pads)?;
        let x = self.hidden_run(ids, p, ctx, Some(&mut cache.layers))?;
        cache.len += tn;
        Ok(x)
    }

    /// Hidden states after the final norm, `[B, T, hidden]`.
    pub fn hidden(&self, ids: &[Vec<u32>], mask: &[Vec<u8>], ctx: &Ctx) -> Result<Tensor> {
        let p = self.prepare(mask)?;
        self.hidden_prepared(ids, p, ctx)
    }

    /// Hidden states of packed rows: token `j` of row `b` sits at rotary position `pos[b][j]`
    /// and attends to earlier tokens of its own group `vis[b][j]` and of group 0, the shared
    /// prefix ([`PAD`] marks padding). One row can hold a context followed by several
    /// continuations that each see the context but not each other, so the context is computed
    /// once for all of them.
    pub fn hidden_packed(
        &self,
        ids: &[Vec<u32>],
        pos: Vec<Vec<i64>>,
        vis: Vec<Vec<u16>>,
        ctx: &Ctx,
    ) -> Result<Tensor> {
        let p = self.prepare_layout(0, pos, vis)?;
        self.hidden_prepared(ids, p, ctx)
    }

    /// The keys and values of `ids` (one row at positions `0..P`) for rows that continue them
    /// ([`Model::hidden_packed_after`]): a prompt's preamble that every request of a task
    /// begins with, run once for all of them.
    pub fn prefix_cache(&self, ids: &[u32], ctx: &Ctx) -> Result<KvCache> {
        let mut cache = KvCache::default();
        self.hidden_cached(ids, &mut cache, ctx)?;
        Ok(cache)
    }

    /// [`Model::hidden_packed`] for rows that all continue the one-row `prefix` (of `P`
    /// tokens, from [`Model::prefix_cache`]): `pos` are absolute positions (the rows' own
    /// tokens start at `P` or later) and every token also sees the prefix, as if each row
    /// began with it. Returns the rows' own tokens, `[B, T, hidden]`. The prefix's work is
    /// done once instead of once per row; `prefix` is left as it was.
    pub fn hidden_packed_after(
        &self,
        prefix: &KvCache,
        ids: &[Vec<u32>],
        pos: Vec<Vec<i64>>,
        vis: Vec<Vec<u16>>,
        ctx: &Ctx,
    ) -> Result<Tensor> {
        if prefix.rows != 1 || prefix.layers.len() != self.layers.len() {
            return Err(Error::Internal(
                "a shared prefix is one row of this model's keys and values".into(),
            ));
        }
        let p = self.prepare_layout(prefix.len, pos, vis)?;
        let rows = p.b;
        let mut layers = prefix
            .layers
            .iter()
            .map(|slot| {
                slot.as_ref()
                    .map(|(k, v)| -> Result<(Tensor, Tensor)> {
                        Ok((repeat_rows(k, rows)?, repeat_rows(v, rows)?))
                    })
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        self.hidden_run(ids, p, ctx, Some(&mut layers))
    }

    fn hidden_prepared(&self, ids: &[Vec<u32>], p: Prepared, ctx: &Ctx) -> Result<Tensor> {
        self.hidden_run(ids, p, ctx, None)
    }

    fn hidden_run(
        &self,
        ids: &[Vec<u32>],
        p: Prepared,
        ctx: &Ctx,
        mut cache: Option<&mut Vec<Option<(Tensor, Tensor)>>>,
    ) -> Result<Tensor> {
        let (b, t) = (p.b, p.t);
        if ids.len() != b || ids.iter().any(|r| r.len() != t) {
            return Err(Error::Internal("ids and mask shapes differ".into()));
        }
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        if let Some(&bad) = flat.iter().find(|&&i| i as usize >= self.config.vocab_size) {
            return Err(Error::Invalid(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.config.vocab_size
            )));
        }
        let idx = Tensor::from_vec(flat, b * t, &self.device)?;
        let mut x = self.embed.index_select(&idx, 0)?; // [B*T, H]
        if self.config.arch == Arch::Gemma3 {
            let s = (self.config.hidden_size as f64).sqrt();
            // transformers rounds the normaliser to the activation dtype first.
            let s = Tensor::new(&[s as f32], &self.device)?.to_dtype(self.dtype)?;
            x = x.broadcast_mul(&s)?;
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let kv = cache.as_mut().map(|c| &mut c[i]);
            x = self.layer(i, layer, &x, &p, ctx, kv)?;
        }
        let x = self
            .final_norm
            .run(&x, !ctx.training() && self.dtype != DType::F64)?;
        // `b * t` tokens, or the last layer's chosen ones (`OnlyAt`, one row).
        let n = x.dim(0)?;
        Ok(x.reshape((b, n / b, self.config.hidden_size))?)
    }

    fn layer(
        &self,
        i: usize,
        l: &Layer,
        x: &Tensor,
        p: &Prepared,
        ctx: &Ctx,
        kv: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, t) = (p.b, p.t);
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        // Fused kernels (with hand-written backward passes when training); f64 keeps the plain
        // differentiable ops, which the finite-difference tests check.
        let fast = self.dtype != DType::F64;
        let rt = p
            .rope
            .get(&c.rope_base(i).to_bits())
            .expect("rope prepared for every base");
        let mask = match l.kind {
            LayerKind::Sliding => p.mask_sliding.as_ref().unwrap_or(&p.mask_full),
            LayerKind::Full => &p.mask_full,
        };
        // Training on the CPU in f32: the whole layer is one graph node with its backward
        // written out (`layer_train`).
        if ctx.training() && kv.is_none() && self.dtype == DType::F32 && self.device.is_cpu() {
            let attend = match &p.shared {
                None => Attend::Rows { mask: mask.clone() },
                Some(sh) => Attend::Packed {
                    keys: sh.keys.clone(),
                    mask: mask.clone(),
                    blocks: sh.blocks.clone(),
                },
            };
            // The last layer runs its queries at the chosen tokens only, when there are some.
            let last = i + 1 == self.layers.len();
            let only = match p.shared.as_ref().map(|sh| &sh.only) {
                Some(o) if last => Some(Only {
                    rows: o.rows.clone(),
                    blocks: o.blocks.clone(),
                    mask: match l.kind {
                        LayerKind::Sliding => o.mask_sliding.as_ref(),
                        LayerKind::Full => None,
                    }
                    .unwrap_or(&o.mask_full)
                    .clone(),
                }),
                _ => None,
            };
            let batch = Batch {
                b,
                t,
                cos: &rt.cos_half,
                sin: &rt.sin_half,
                attend,
                only,
            };
            return layer_train::layer(c, l, x, &batch, ctx);
        }
        if p.shared.is_some() {
            return Err(Error::Internal(
                "a shared-prefix batch runs only in the fused training layer".into(),
            ));
        }
        let h = l.input_norm.run(x, fast)?;
        let q = l.q.forward(&h, ctx)?.reshape((b, t, nh, hd))?;
        let k = l.k.forward(&h, ctx)?.reshape((b, t, nkv, hd))?;
        let v = l.v.forward(&h, ctx)?.reshape((b, t, nkv, hd))?;
        let q = match &l.q_norm {
            Some(n) => n.run(&q, fast)?,
            None => q,
        };
        let k = match &l.k_norm {
            Some(n) => n.run(&k, fast)?,
            None => k,
        };
        // Inference on the CPU in f32: heads stay in the projections' [B, T, heads, hd] layout
        // (rope on that layout, cache along T, a fused attention kernel); no transposes, no
        // grouped-query copies.
        if !ctx.training() && self.dtype == DType::F32 && self.device.is_cpu() {
            let rope = |x: Tensor| -> Result<Tensor> {
                Ok(candle_nn::rotary_emb::rope_thd(
                    &x.contiguous()?,
                    &rt.cos_half,
                    &rt.sin_half,
                )?)
            };
            let (q, k) = (rope(q.detach())?, rope(k.detach())?);
            let v = v.detach().contiguous()?;
            let (k, v) = extend_cache(kv, k, v, 1)?;
            let scale = c.attn_scale() as f32;
            if let Some(a) = kernels::attention(&q, &k, &v, mask, scale)? {
                let attn = a.reshape((b * t, nh * hd))?;
                return self.finish_layer(l, x, &attn, ctx, fast);
            }
            return Err(Error::Internal("fused attention refused its inputs".into()));
        }
        let q = q.transpose(1, 2)?.contiguous()?; // [B, nh, T, hd]
        let k = k.transpose(1, 2)?.contiguous()?;
        let v = v.transpose(1, 2)?.contiguous()?;
        let q = apply_rope(&q, rt, fast)?;
        let k = apply_rope(&k, rt, fast)?;
        // With a cache: keys and values of the earlier tokens come first.
        let (k, v) = extend_cache(kv, k, v, 2)?;
        let tk = k.dim(2)?;
        let (k, v) = if nkv != nh {
            let rep = nh / nkv;
            let expand = |z: Tensor| -> Result<Tensor> {
                Ok(z.unsqueeze(2)?
                    .expand((b, nkv, rep, tk, hd))?
                    .reshape((b, nh, tk, hd))?)
            };
            (expand(k)?, expand(v)?)
        } else {
            (k, v)
        };
        let scores = (q.matmul(&k.t()?)? * c.attn_scale())?;
        let scores = scores.broadcast_add(mask)?;
        let probs = if fast {
            softmax_train(&scores)?
        } else {
            candle_nn::ops::softmax(&scores, D::Minus1)?
        };
        let attn = probs.matmul(&v)?; // [B, nh, T, hd]
        let attn = attn.transpose(1, 2)?.reshape((b * t, nh * hd))?;
        self.finish_layer(l, x, &attn, ctx, fast)
    }

    /// Output projection, residuals, norms and MLP of a layer, from the attention's
    /// `[B * T, heads * hd]` output.
    fn finish_layer(
        &self,
        l: &Layer,
        x: &Tensor,
        attn: &Tensor,
        ctx: &Ctx,
        fast: bool,
    ) -> Result<Tensor> {
        let c = &self.config;
        let attn = l.o.forward(attn, ctx)?;
        match c.arch {
            Arch::Gemma3 => {
                let x = (x + l.post_attn_norm.run(&attn, fast)?)?;
                let pre = l
                    .pre_ff_norm
                    .as_ref()
                    .expect("gemma has pre_ff_norm")
                    .run(&x, fast)?;
                let m = self.mlp(l, &pre, ctx)?;
                let m = l
                    .post_ff_norm
                    .as_ref()
                    .expect("gemma has post_ff_norm")
                    .run(&m, fast)?;
                Ok((x + m)?)
            }
            Arch::Llama | Arch::Qwen2 => {
                let x = (x + attn)?;
                let m = self.mlp(l, &l.post_attn_norm.run(&x, fast)?, ctx)?;
                Ok((x + m)?)
            }
        }
    }

    fn mlp(&self, l: &Layer, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let g = l.gate.forward(x, ctx)?;
        let u = l.up.forward(x, ctx)?;
        let kind = match self.config.arch {
            Arch::Gemma3 => kernels::Glu::GeluTanh,
            Arch::Llama | Arch::Qwen2 => kernels::Glu::Silu,
        };
        // One fused pass (and a fused backward) for f32 on the CPU; None elsewhere.
        if let Some(h) = kernels::glu(kind, &g, &u)? {
            return l.down.forward(&h, ctx);
        }
        let a = match self.config.arch {
            Arch::Gemma3 => g.gelu()?, // tanh approximation, as gelu_pytorch_tanh
            Arch::Llama | Arch::Qwen2 => g.silu()?,
        };
        l.down.forward(&(a * u)?, ctx)
    }

    /// Hidden rows `[N, H]` at flat rows `b * T + t` of `hidden: [B, T, H]`, with the output
    /// matrix `[vocab, H]` they are multiplied by.
    fn select_rows(&self, hidden: &Tensor, rows: &[u32]) -> Result<(Tensor, &Tensor)> {
        let (b, t, h) = hidden.dims3()?;
        if let Some(&r) = rows.iter().find(|&&r| r as usize >= b * t) {
            return Err(Error::Internal(format!(
                "row {r} is outside the batch of {b} x {t}"
            )));
        }
        let idx = Tensor::from_vec(rows.to_vec(), rows.len(), &self.device)?;
        let sel = hidden.reshape((b * t, h))?.index_select(&idx, 0)?;
        Ok((sel, self.lm_head.as_ref().unwrap_or(&self.embed)))
    }

    /// Logits `[N, vocab]` at flat rows `b * T + t` of `hidden: [B, T, H]`. When `hidden`
    /// carries a gradient graph, the output matrix gets no gradient of its own.
    pub fn logits_at(&self, hidden: &Tensor, rows: &[u32]) -> Result<Tensor> {
        let (sel, w) = self.select_rows(hidden, rows)?;
        let mut logits = frozen_matmul(&sel, w, &self.head_packs, sel.track_op())?;
        if let Some(cap) = self.config.final_logit_softcapping {
            logits = ((logits / cap)?.tanh()? * cap)?;
        }
        Ok(logits)
    }

    /// Mean token cross-entropy of the logits at flat rows `rows` of `hidden: [B, T, H]`
    /// against `targets` (one per row), without materialising all logits (see
    /// [`super::loss::linear_cross_entropy`]); falls back to full logits when the model caps
    /// its logits.
    pub fn loss_at(&self, hidden: &Tensor, rows: &[u32], targets: &[u32]) -> Result<Tensor> {
        if rows.len() != targets.len() || rows.is_empty() {
            return Err(Error::Internal(format!(
                "{} rows but {} targets",
                rows.len(),
                targets.len()
            )));
        }
        let tg = Tensor::from_vec(targets.to_vec(), targets.len(), &self.device)?;
        if self.config.final_logit_softcapping.is_some() {
            return super::loss::cross_entropy(&self.logits_at(hidden, rows)?, &tg);
        }
        let (sel, w) = self.select_rows(hidden, rows)?;
        super::loss::linear_cross_entropy(&sel, w, &self.head_packs, &tg)
    }

    /// Merges `adapter` into the base weights (`W += scaling * B A`, computed in f32).
    pub fn merge(&mut self, adapter: &Adapter) -> Result<()> {
        self.apply_delta(adapter, 1.0)
    }

    /// Undoes [`Model::merge`].
    pub fn unmerge(&mut self, adapter: &Adapter) -> Result<()> {
        self.apply_delta(adapter, -1.0)
    }

    fn apply_delta(&mut self, adapter: &Adapter, sign: f64) -> Result<()> {
        let s = adapter.config.scaling() * sign;
        for l in self.layers.iter_mut() {
            for lin in [
                &mut l.q,
                &mut l.k,
                &mut l.v,
                &mut l.o,
                &mut l.gate,
                &mut l.up,
                &mut l.down,
            ] {
                if let Some(p) = adapter.pairs.get(&lin.name) {
                    let work = if lin.weight.dtype() == DType::F64 {
                        DType::F64
                    } else {
                        DType::F32
                    };
                    let delta =
                        p.b.as_tensor()
                            .to_dtype(work)?
                            .matmul(&p.a.as_tensor().to_dtype(work)?)?;
                    let w = (lin.weight.to_dtype(work)? + (delta * s)?)?;
                    lin.weight = w.to_dtype(lin.weight.dtype())?;
                    lin.packs = kernels::PackCache::default();
                }
            }
        }
        Ok(())
    }
}

/// `x: [1, ...]` repeated into `[rows, ...]` (a cached prefix's keys or values, one copy per
/// row of the batch that continues it).
/// A shared-prefix batch's real tokens in op order: the prefix, then each row's own tokens.
fn shared_ids(prefix: &[u32], rows: &[Vec<u32>]) -> Vec<u32> {
    let mut flat = prefix.to_vec();
    for r in rows {
        flat.extend(r);
    }
    flat
}

fn repeat_rows(x: &Tensor, rows: usize) -> Result<Tensor> {
    let mut shape = x.dims().to_vec();
    shape[0] = rows;
    Ok(x.broadcast_as(shape)?.contiguous()?)
}

/// With a cache slot: the cached keys and values come first along the time axis `t_dim`, and
/// the slot keeps the extended pair. Without one, `(k, v)` as given.
fn extend_cache(
    kv: Option<&mut Option<(Tensor, Tensor)>>,
    k: Tensor,
    v: Tensor,
    t_dim: usize,
) -> Result<(Tensor, Tensor)> {
    let Some(slot) = kv else {
        return Ok((k, v));
    };
    let (k, v) = match slot.take() {
        None => (k, v),
        Some((pk, pv)) => (
            Tensor::cat(&[&pk, &k], t_dim)?,
            Tensor::cat(&[&pv, &v], t_dim)?,
        ),
    };
    *slot = Some((k.clone(), v.clone()));
    Ok((k, v))
}

/// Half-split rope (HF layout): `x * cos + rotate_half(x) * sin`, `x: [B, heads, T, hd]`;
/// candle's fused kernel when `fast`, plain differentiable ops otherwise.
fn apply_rope(x: &Tensor, rt: &RopeTables, fast: bool) -> Result<Tensor> {
    if fast {
        // Rope is a rotation: its backward is the rotation by the opposite angle.
        let y = candle_nn::rotary_emb::rope(&x.detach().contiguous()?, &rt.cos_half, &rt.sin_half)?;
        let (cos, neg_sin) = (rt.cos_half.clone(), rt.sin_half.neg()?);
        return with_grad(
            x,
            y,
            Box::new(move |_x, _y, g| {
                candle_nn::rotary_emb::rope(&g.contiguous()?, &cos, &neg_sin)
            }),
        );
    }
    let (cos, sin) = (&rt.cos, &rt.sin);
    let hd = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
    let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rot.broadcast_mul(sin)?)?)
}
