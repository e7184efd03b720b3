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
//!
//! Tokens that every context begins with (a task's prompt preamble, "Topics: ... Sentence:"
//! for SIB-200, about a quarter of a row) are run once per call: their keys and values are
//! computed for one row ([`Model::prefix_cache`]) and every packed row continues them
//! ([`Model::hidden_packed_after`]). The shared part stops at least one token before the
//! shortest context (whose last position predicts its continuations' first tokens) and is not
//! used when some context has to be cut to fit `max_len`.

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

/// Rows whose logits are computed at once.
pub const LOGIT_ROWS: usize = 256;

/// The fewest common leading tokens worth running once for all requests.
pub const MIN_SHARED_PREFIX: usize = 4;

/// One request packed into a row: ids, positions and visibility groups; and for each
/// continuation the packed indices whose logits predict its tokens.
struct Packed {
    ids: Vec<u32>,
    pos: Vec<i64>,
    vis: Vec<u16>,
    /// Per continuation: (row index in `ids` predicting token j, target token j).
    preds: Vec<Vec<(usize, u32)>>,
}

/// Scores every continuation of every request; `out[i][j]` belongs to continuation `j` of
/// request `i`. Results do not depend on `batch_size` (up to float rounding).
pub fn score_choices(
    model: &Model,
    adapter: Option<&Adapter>,
    reqs: &[ChoiceRequest],
    batch_size: usize,
    max_len: usize,
) -> Result<Vec<Vec<Score>>> {
    let shared = shared_prefix_len(reqs, max_len);
    let packed: Vec<Packed> = reqs
        .iter()
        .enumerate()
        .map(|(i, r)| pack(i, r, max_len, shared))
        .collect::<Result<_>>()?;
    let mut out: Vec<Vec<Score>> = reqs
        .iter()
        .map(|r| Vec::with_capacity(r.continuations.len()))
        .collect();
    let mut order: Vec<usize> = (0..reqs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(packed[i].ids.len()));
    let ctx = Ctx::eval(adapter);
    let prefix = match shared {
        0 => None,
        n => Some(model.prefix_cache(&reqs[0].context[..n], &ctx)?),
    };
    for chunk in order.chunks(batch_size.max(1)) {
        let batch = Batch::of(chunk, &packed);
        let hidden = match &prefix {
            None => model.hidden_packed(&batch.ids, batch.pos, batch.vis, &ctx)?,
            Some(c) => model.hidden_packed_after(c, &batch.ids, batch.pos, batch.vis, &ctx)?,
        };
        let stats = target_stats(model, &hidden, &batch.rows, &batch.wanted)?;
        let mut w = 0;
        for &i in chunk {
            for pr in &packed[i].preds {
                out[i].push(stats.score(pr, &batch.wanted, &mut w));
            }
        }
    }
    Ok(out)
}

/// How many leading context tokens all requests share and [`score_choices`] runs once: the
/// longest common prefix of the contexts, at most the shortest context less one token; 0 when
/// it is under [`MIN_SHARED_PREFIX`], when there are fewer than two requests, or when some
/// context would be cut to fit `max_len` (the cut would fall inside the shared part).
pub fn shared_prefix_len(reqs: &[ChoiceRequest], max_len: usize) -> usize {
    let Some((first, rest)) = reqs.split_first() else {
        return 0;
    };
    let cut = |r: &ChoiceRequest| {
        let longest = r.continuations.iter().map(Vec::len).max().unwrap_or(0);
        r.context.len() + longest > max_len + 1
    };
    if rest.is_empty() || reqs.iter().any(cut) {
        return 0;
    }
    let mut n = reqs
        .iter()
        .map(|r| r.context.len())
        .min()
        .unwrap_or(0)
        .saturating_sub(1);
    for r in rest {
        n = first.context[..n]
            .iter()
            .zip(&r.context)
            .take_while(|(a, b)| a == b)
            .count();
    }
    if n < MIN_SHARED_PREFIX {
        0
    } else {
        n
    }
}

/// The length in tokens of a request's packed row (what `pack` builds): its context as cut
/// to fit `max_len`, then every continuation but its last token.
pub fn packed_len(r: &ChoiceRequest, max_len: usize) -> usize {
    let longest = r.continuations.iter().map(Vec::len).max().unwrap_or(0);
    let keep = r.context.len().min((max_len + 1).saturating_sub(longest));
    keep + r
        .continuations
        .iter()
        .map(|c| c.len().saturating_sub(1))
        .sum::<usize>()
}

/// Packs request `i`: its context (cut from the left to fit `max_len` with its longest
/// continuation), then every continuation but its last token, each restarting at the position
/// after the context. The first `shared` context tokens are left out of the row (they are run
/// once for all rows, [`shared_prefix_len`]); positions stay those of the whole context.
fn pack(i: usize, r: &ChoiceRequest, max_len: usize, shared: usize) -> Result<Packed> {
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
    if shared >= ctx.len() || (shared > 0 && keep < r.context.len()) {
        return Err(Error::Internal(format!(
            "request {i}: a shared prefix of {shared} tokens does not fit its context of {}",
            ctx.len()
        )));
    }
    let own = &ctx[shared..];
    let mut p = Packed {
        ids: own.to_vec(),
        pos: (shared as i64..ctx.len() as i64).collect(),
        vis: vec![0; own.len()],
        preds: Vec::with_capacity(r.continuations.len()),
    };
    let last_ctx = own.len() - 1;
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
    Ok(p)
}

/// One batch of packed rows, padded to the longest: ids, positions, visibility groups; the
/// unique flat rows needing logits, and (unique row, target) per prediction in request order.
struct Batch {
    ids: Vec<Vec<u32>>,
    pos: Vec<Vec<i64>>,
    vis: Vec<Vec<u16>>,
    rows: Vec<u32>,
    wanted: Vec<(usize, u32)>,
}

impl Batch {
    /// The batch of requests `chunk` (indices into `packed`).
    fn of(chunk: &[usize], packed: &[Packed]) -> Batch {
        let t = chunk
            .iter()
            .map(|&i| packed[i].ids.len())
            .max()
            .unwrap_or(0);
        let mut b = Batch {
            ids: Vec::with_capacity(chunk.len()),
            pos: Vec::with_capacity(chunk.len()),
            vis: Vec::with_capacity(chunk.len()),
            rows: Vec::new(),
            wanted: Vec::new(),
        };
        let mut row_of = std::collections::HashMap::new();
        for (bi, &i) in chunk.iter().enumerate() {
            let p = &packed[i];
            let n = p.ids.len();
            let mut r = p.ids.clone();
            r.resize(t, 0);
            let mut ps = p.pos.clone();
            ps.resize(t, 0);
            let mut vs = p.vis.clone();
            vs.resize(t, PAD);
            b.ids.push(r);
            b.pos.push(ps);
            b.vis.push(vs);
            debug_assert!(n <= t);
            for pr in &p.preds {
                for &(at, tok) in pr {
                    let flat = (bi * t + at) as u32;
                    let u = *row_of.entry(flat).or_insert_with(|| {
                        b.rows.push(flat);
                        b.rows.len() - 1
                    });
                    b.wanted.push((u, tok));
                }
            }
        }
        b
    }
}

/// Per unique row: the log-sum-exp of its logits and its argmax; per prediction: the logit of
/// its target.
struct TargetStats {
    lse: Vec<f32>,
    amax: Vec<u32>,
    tlogit: Vec<f32>,
}

impl TargetStats {
    /// The score of one continuation from its predictions `pr`, which start at prediction `*w`
    /// (advanced past them).
    fn score(&self, pr: &[(usize, u32)], wanted: &[(usize, u32)], w: &mut usize) -> Score {
        let mut lp = 0f64;
        let mut greedy = true;
        for &(_, tok) in pr {
            let (u, _) = wanted[*w];
            lp += f64::from(self.tlogit[*w]) - f64::from(self.lse[u]);
            greedy &= self.amax[u] == tok;
            *w += 1;
        }
        Score {
            logprob: lp,
            greedy,
            tokens: pr.len(),
        }
    }
}

/// Log-probabilities of the wanted targets and argmax flags, computed from the logits of
/// `rows`, LOGIT_ROWS rows at a time.
fn target_stats(
    model: &Model,
    hidden: &candle_core::Tensor,
    rows: &[u32],
    wanted: &[(usize, u32)],
) -> Result<TargetStats> {
    let mut st = TargetStats {
        lse: Vec::with_capacity(rows.len()),
        amax: Vec::with_capacity(rows.len()),
        tlogit: vec![0.0; wanted.len()],
    };
    for (ci, rs) in rows.chunks(LOGIT_ROWS).enumerate() {
        let base = ci * LOGIT_ROWS;
        let logits = model.logits_at(hidden, rs)?;
        let (picks, slots): (Vec<(usize, u32)>, Vec<usize>) = wanted
            .iter()
            .enumerate()
            .filter(|(_, (u, _))| *u >= base && *u < base + rs.len())
            .map(|(w, &(u, tok))| ((u - base, tok), w))
            .unzip();
        let rs_stats = row_stats(&logits, &picks)?;
        st.lse.extend(rs_stats.lse);
        st.amax.extend(rs_stats.argmax);
        for (w, x) in slots.into_iter().zip(rs_stats.picked) {
            st.tlogit[w] = x;
        }
    }
    Ok(st)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(context: &[u32], cont: &[u32]) -> ChoiceRequest {
        ChoiceRequest {
            context: context.to_vec(),
            continuations: vec![cont.to_vec()],
        }
    }

    #[test]
    fn the_shared_prefix_is_common_leaves_a_context_token_and_yields_to_cuts() {
        let a = req(&[1, 2, 3, 4, 5, 6, 7], &[9]);
        let b = req(&[1, 2, 3, 4, 5, 8, 7, 7], &[9, 9]);
        assert_eq!(shared_prefix_len(&[a.clone(), b.clone()], 64), 5);
        // At most the shortest context less one token.
        let c = req(&[1, 2, 3, 4, 5], &[9]);
        assert_eq!(shared_prefix_len(&[a.clone(), c.clone()], 64), 4);
        // Under the minimum, one request, or a context cut to fit: nothing shared.
        let d = req(&[1, 2, 3, 0, 5, 6], &[9]);
        assert_eq!(shared_prefix_len(&[a.clone(), d], 64), 0);
        assert_eq!(shared_prefix_len(std::slice::from_ref(&a), 64), 0);
        assert_eq!(shared_prefix_len(&[a.clone(), b.clone()], 8), 0);
        assert_eq!(shared_prefix_len(&[a.clone(), b.clone()], 9), 5);
        // The packed row leaves the shared tokens out and keeps absolute positions.
        let p = pack(0, &b, 64, 5).unwrap();
        assert_eq!(p.ids, vec![8, 7, 7, 9]);
        assert_eq!(p.pos, vec![5, 6, 7, 8]);
        assert_eq!(p.preds, vec![vec![(2, 9), (3, 9)]]);
        assert!(pack(0, &c, 64, 5).is_err());
    }

    #[test]
    fn packed_len_is_the_length_of_the_packed_row() {
        let r = ChoiceRequest {
            context: (3..40).collect(),
            continuations: vec![vec![5], vec![6, 7, 8], vec![9, 10]],
        };
        for max_len in [4, 8, 2048] {
            assert_eq!(
                packed_len(&r, max_len),
                pack(0, &r, max_len, 0).unwrap().ids.len()
            );
        }
    }
}
