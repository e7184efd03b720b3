//! Multiple-choice scoring with shared prefixes: one context and its continuations in, each
//! continuation's summed log-probability and greedy flag out (lm-evaluation-harness's
//! `loglikelihood` for every choice).
//!
//! The context is run once: a row holds `context + cont_1[..-1] + cont_2[..-1] + ...`, where
//! every continuation restarts at the position after the context and attends to the context and
//! to itself only ([`Model::hidden_packed`]). The first token of every continuation is predicted
//! from the context's last position, which is therefore computed once too. Rows are sorted by
//! length and batched; logits are computed only at the rows a target needs, a few hundred at a
//! time. When a context and its longest continuation exceed `max_len`, the context loses tokens
//! from the left.

use crate::error::{Error, Result};
use crate::model::lora::Adapter;
use crate::model::score::{row_stats, Score};
use crate::model::transformer::{Ctx, Model, PAD};

/// One example: context ids and the ids of every continuation.
#[derive(Debug, Clone, PartialEq)]
pub struct ChoiceRequest {
    pub context: Vec<u32>,
    pub continuations: Vec<Vec<u32>>,
}

const LOGIT_ROWS: usize = 256;

/// Scores every continuation of every request; `out[i][j]` belongs to continuation `j` of
/// request `i`. Results do not depend on `batch_size` (up to float rounding).
pub fn score_choices(
    model: &Model,
    adapter: Option<&Adapter>,
    reqs: &[ChoiceRequest],
    batch_size: usize,
    max_len: usize,
) -> Result<Vec<Vec<Score>>> {
    // Packed rows: ids, positions, groups; and for each continuation the packed indices whose
    // logits predict its tokens.
    struct Packed {
        ids: Vec<u32>,
        pos: Vec<i64>,
        vis: Vec<u16>,
        /// Per continuation: (row index in `ids` predicting token j, target token j).
        preds: Vec<Vec<(usize, u32)>>,
    }
    let mut packed: Vec<Packed> = Vec::with_capacity(reqs.len());
    for (i, r) in reqs.iter().enumerate() {
        if r.continuations.len() >= PAD as usize {
            return Err(Error::Invalid(format!(
                "request {i}: too many continuations"
            )));
        }
        let longest = r.continuations.iter().map(Vec::len).max().unwrap_or(0);
        if r.context.is_empty() {
            return Err(Error::Invalid(format!("request {i}: empty context")));
        }
        if longest + 1 > max_len {
            return Err(Error::Invalid(format!(
                "request {i}: a continuation of {longest} tokens does not fit the window of {max_len}"
            )));
        }
        let keep = r.context.len().min(max_len + 1 - longest);
        let ctx = &r.context[r.context.len() - keep..];
        let mut p = Packed {
            ids: ctx.to_vec(),
            pos: (0..ctx.len() as i64).collect(),
            vis: vec![0; ctx.len()],
            preds: Vec::with_capacity(r.continuations.len()),
        };
        let last_ctx = ctx.len() - 1;
        for (j, c) in r.continuations.iter().enumerate() {
            let mut pr = Vec::with_capacity(c.len());
            let mut prev = last_ctx;
            for (k, &tok) in c.iter().enumerate() {
                pr.push((prev, tok));
                if k + 1 < c.len() {
                    p.ids.push(tok);
                    p.pos.push((ctx.len() + k) as i64);
                    p.vis.push(j as u16 + 1);
                    prev = p.ids.len() - 1;
                }
            }
            p.preds.push(pr);
        }
        packed.push(p);
    }
    let mut out: Vec<Vec<Score>> = reqs
        .iter()
        .map(|r| Vec::with_capacity(r.continuations.len()))
        .collect();
    let mut order: Vec<usize> = (0..reqs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(packed[i].ids.len()));
    let ctx = Ctx::eval(adapter);
    for chunk in order.chunks(batch_size.max(1)) {
        let t = chunk
            .iter()
            .map(|&i| packed[i].ids.len())
            .max()
            .unwrap_or(0);
        let mut ids = Vec::with_capacity(chunk.len());
        let mut pos = Vec::with_capacity(chunk.len());
        let mut vis = Vec::with_capacity(chunk.len());
        // Unique flat rows needing logits, and (unique row, target) per prediction.
        let mut rows: Vec<u32> = Vec::new();
        let mut row_of = std::collections::HashMap::new();
        let mut wanted: Vec<(usize, u32)> = Vec::new();
        for (b, &i) in chunk.iter().enumerate() {
            let p = &packed[i];
            let n = p.ids.len();
            let mut r = p.ids.clone();
            r.resize(t, 0);
            let mut ps = p.pos.clone();
            ps.resize(t, 0);
            let mut vs = p.vis.clone();
            vs.resize(t, PAD);
            ids.push(r);
            pos.push(ps);
            vis.push(vs);
            debug_assert!(n <= t);
            for pr in &p.preds {
                for &(at, tok) in pr {
                    let flat = (b * t + at) as u32;
                    let u = *row_of.entry(flat).or_insert_with(|| {
                        rows.push(flat);
                        rows.len() - 1
                    });
                    wanted.push((u, tok));
                }
            }
        }
        let hidden = model.hidden_packed(&ids, pos, vis, &ctx)?;
        // Log-probabilities of the wanted targets and argmax flags, LOGIT_ROWS rows at a time.
        let mut lse: Vec<f32> = Vec::with_capacity(rows.len());
        let mut amax: Vec<u32> = Vec::with_capacity(rows.len());
        let mut tlogit: Vec<f32> = vec![0.0; wanted.len()];
        for (ci, rs) in rows.chunks(LOGIT_ROWS).enumerate() {
            let base = ci * LOGIT_ROWS;
            let logits = model.logits_at(&hidden, rs)?;
            let (picks, slots): (Vec<(usize, u32)>, Vec<usize>) = wanted
                .iter()
                .enumerate()
                .filter(|(_, (u, _))| *u >= base && *u < base + rs.len())
                .map(|(w, &(u, tok))| ((u - base, tok), w))
                .unzip();
            let st = row_stats(&logits, &picks)?;
            lse.extend(st.lse);
            amax.extend(st.argmax);
            for (w, x) in slots.into_iter().zip(st.picked) {
                tlogit[w] = x;
            }
        }
        let mut w = 0;
        for &i in chunk {
            for pr in &packed[i].preds {
                let mut lp = 0f64;
                let mut greedy = true;
                for &(_, tok) in pr {
                    let (u, _) = wanted[w];
                    lp += f64::from(tlogit[w]) - f64::from(lse[u]);
                    greedy &= amax[u] == tok;
                    w += 1;
                }
                out[i].push(Score {
                    logprob: lp,
                    greedy,
                    tokens: pr.len(),
                });
            }
        }
    }
    Ok(out)
}
