//! One gradient computation: token sequences (prompt + answer) in, the masked cross-entropy on
//! the answer tokens and its gradient with respect to an adapter's LoRA weights out.
//!
//! A set of sequences is cut into micro-batches (right-padded to their longest member); each
//! micro-batch's mean answer-token loss is weighted by its share of the set's answer tokens, so
//! the accumulated loss and gradient are the token-level mean over the whole set, whatever the
//! micro-batch size. Logits are computed only at the positions that predict answer tokens.

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::model::lora::Adapter;
use crate::model::transformer::{Ctx, Model};
use crate::util::Rng;

/// A training sequence: `ids[..answer_start]` is the prompt (loss-masked),
/// `ids[answer_start..]` the answer (scored). `answer_start >= 1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seq {
    pub ids: Vec<u32>,
    pub answer_start: usize,
}

impl Seq {
    /// Answer tokens (positions that carry loss).
    pub fn answer_tokens(&self) -> usize {
        self.ids.len() - self.answer_start
    }

    /// Builds a sequence from prompt and answer ids, dropping prompt tokens from the left (after
    /// a leading BOS when `keep_first`) so that the whole fits `max_len`. An answer longer than
    /// `max_len - 1` keeps its first tokens. Returns the sequence and whether it was truncated.
    pub fn build(prompt: &[u32], answer: &[u32], max_len: usize, keep_first: bool) -> (Seq, bool) {
        let mut p = prompt.to_vec();
        let mut a = answer.to_vec();
        let mut truncated = false;
        if a.len() + 1 > max_len {
            a.truncate(max_len.saturating_sub(1).max(1));
            truncated = true;
        }
        let room = max_len - a.len();
        if p.len() > room {
            truncated = true;
            let first = if keep_first { p.first().copied() } else { None };
            let drop = p.len() - room;
            p.drain(..drop);
            if let Some(f) = first {
                if room >= 2 {
                    p[0] = f;
                }
            }
        }
        if p.is_empty() {
            // The first answer token needs something to be predicted from.
            p.push(a.remove(0));
        }
        let answer_start = p.len();
        p.extend(a);
        (
            Seq {
                ids: p,
                answer_start,
            },
            truncated,
        )
    }
}

/// The loss, gradients and counts of one gradient computation.
#[derive(Debug, Clone)]
pub struct Grads {
    /// One tensor per adapter variable, in [`Adapter::vars`] order.
    pub grads: Vec<Tensor>,
    /// Token-level mean cross-entropy of the answer tokens.
    pub loss: f64,
    /// Answer tokens the loss covers.
    pub tokens: usize,
    /// All tokens run through the model (prompt + answer, without padding).
    pub input_tokens: usize,
}

/// Token-mean answer loss of `seqs` and its gradient for `adapter`, in micro-batches of
/// `micro` sequences (taken in the given order). LoRA dropout masks come from `dropout_seed`.
pub fn grads(
    model: &Model,
    adapter: &Adapter,
    seqs: &[&Seq],
    micro: usize,
    dropout_seed: u64,
) -> Result<Grads> {
    if seqs.is_empty() {
        return Err(Error::Invalid(
            "a gradient step needs at least one sequence".into(),
        ));
    }
    let total: usize = seqs.iter().map(|s| s.answer_tokens()).sum();
    if total == 0 {
        return Err(Error::Invalid("the sequences have no answer tokens".into()));
    }
    let vars = adapter.vars();
    let mut acc: Option<Vec<Tensor>> = None;
    let mut loss = 0f64;
    let mut rng = Rng::new(dropout_seed);
    for chunk in seqs.chunks(micro.max(1)) {
        let n_tok: usize = chunk.iter().map(|s| s.answer_tokens()).sum();
        if n_tok == 0 {
            continue;
        }
        let t = chunk.iter().map(|s| s.ids.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(chunk.len());
        let mut mask = Vec::with_capacity(chunk.len());
        let mut rows = Vec::with_capacity(n_tok);
        let mut targets = Vec::with_capacity(n_tok);
        for (b, s) in chunk.iter().enumerate() {
            let mut row = s.ids.clone();
            let mut m = vec![1u8; row.len()];
            row.resize(t, 0);
            m.resize(t, 0);
            for p in s.answer_start..s.ids.len() {
                rows.push((b * t + p - 1) as u32);
                targets.push(s.ids[p]);
            }
            ids.push(row);
            mask.push(m);
        }
        let ctx = Ctx::train(adapter, &mut rng);
        let hidden = model.hidden(&ids, &mask, &ctx)?;
        let l = model.loss_at(&hidden, &rows, &targets)?;
        let w = n_tok as f64 / total as f64;
        loss += l.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()? * w;
        let gs = (l * w)?.backward()?;
        let g: Vec<Tensor> = vars
            .iter()
            .map(|v| match gs.get(v) {
                Some(g) => Ok(g.clone()),
                None => v.zeros_like(),
            })
            .collect::<candle_core::Result<_>>()?;
        acc = Some(match acc {
            None => g,
            Some(a) => a
                .iter()
                .zip(&g)
                .map(|(x, y)| x + y)
                .collect::<candle_core::Result<_>>()?,
        });
    }
    Ok(Grads {
        grads: acc.expect("at least one chunk has answer tokens"),
        loss,
        tokens: total,
        input_tokens: seqs.iter().map(|s| s.ids.len()).sum(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_truncates_the_prompt_from_the_left_keeping_bos() {
        let (s, t) = Seq::build(&[2, 10, 11, 12, 13], &[20, 21], 5, true);
        assert!(t);
        assert_eq!(s.ids, vec![2, 12, 13, 20, 21]);
        assert_eq!(s.answer_start, 3);
        let (s, t) = Seq::build(&[10, 11], &[20], 8, false);
        assert!(!t);
        assert_eq!((s.ids, s.answer_start), (vec![10, 11, 20], 2));
        let (s, _) = Seq::build(&[], &[20, 21], 8, false);
        assert_eq!((s.ids, s.answer_start), (vec![20, 21], 1));
    }
}
