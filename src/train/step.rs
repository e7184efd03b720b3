//! One gradient computation: token sequences (prompt + answer) in, the masked cross-entropy on
//! the answer tokens and its gradient with respect to an adapter's LoRA weights out.
//!
//! A set of sequences is cut into micro-batches (right-padded to their longest member); each
//! micro-batch's mean answer-token loss is weighted by its share of the set's answer tokens, so
//! the accumulated loss and gradient are the token-level mean over the whole set, whatever the
//! micro-batch size. Logits are computed only at the positions that predict answer tokens.
//!
//! With `share_prefix`, the tokens a micro-batch's sequences all begin with (a task's prompt
//! preamble, about a quarter of a SIB-200 example) run once for the micro-batch instead of once
//! per sequence ([`Model::hidden_shared_prefix_at`]); the prefix never reaches into an answer, so
//! every loss position lies after it. The model's last layer then runs its queries, output
//! projection and MLP only at the loss positions. Without
//! LoRA dropout the loss and gradient are those of the padded batch up to float rounding; with
//! it, the prefix's tokens share one dropout draw.

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

/// How [`grads`] runs: sequences per micro-batch, the LoRA dropout seed, and whether a
/// micro-batch's common prefix runs once (see the module doc).
#[derive(Debug, Clone, Copy)]
pub struct StepOptions {
    pub micro: usize,
    pub dropout_seed: u64,
    pub share_prefix: bool,
}

impl StepOptions {
    /// The options a configuration sets, with the dropout seed of this step.
    pub fn of(cfg: &crate::plan::TrainConfig, dropout_seed: u64) -> StepOptions {
        StepOptions {
            micro: cfg.micro_batch,
            dropout_seed,
            share_prefix: cfg.share_prefix,
        }
    }
}

/// Token-mean answer loss of `seqs` and its gradient for `adapter`, in micro-batches of
/// `opt.micro` sequences (taken in the given order).
pub fn grads(model: &Model, adapter: &Adapter, seqs: &[&Seq], opt: StepOptions) -> Result<Grads> {
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
    let mut rng = Rng::new(opt.dropout_seed);
    for chunk in seqs.chunks(opt.micro.max(1)) {
        let n_tok: usize = chunk.iter().map(|s| s.answer_tokens()).sum();
        if n_tok == 0 {
            continue;
        }
        let ctx = Ctx::train(adapter, &mut rng);
        let shared = if opt.share_prefix && chunk.len() > 1 && model.shares_prefixes() {
            shared_prefix(chunk)
        } else {
            0
        };
        let (hidden, rows, targets) = if shared > 0 {
            let (rows, targets) = loss_rows(chunk, shared);
            let suffixes: Vec<Vec<u32>> = chunk.iter().map(|s| s.ids[shared..].to_vec()).collect();
            let prefix = &chunk[0].ids[..shared];
            // The hidden states at the loss rows only, in their order (the last layer runs its
            // queries and MLP there alone).
            match model.hidden_shared_prefix_at(prefix, &suffixes, &rows, &ctx)? {
                Some(h) => (h, (0..rows.len() as u32).collect(), targets),
                None => return Err(Error::Internal("the model refused a shared prefix".into())),
            }
        } else {
            let (ids, mask) = padded(chunk);
            let (rows, targets) = loss_rows(chunk, 0);
            (model.hidden(&ids, &mask, &ctx)?, rows, targets)
        };
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

/// Tokens every sequence of `chunk` begins with, short of every answer: loss positions (the
/// token before each answer token onwards) then all lie after the prefix.
fn shared_prefix(chunk: &[&Seq]) -> usize {
    let first = &chunk[0].ids;
    let limit = chunk
        .iter()
        .map(|s| s.answer_start.saturating_sub(1))
        .min()
        .unwrap_or(0);
    (0..limit)
        .take_while(|&i| chunk.iter().all(|s| s.ids[i] == first[i]))
        .count()
}

/// `chunk` right-padded to its longest sequence, with the real-token mask.
fn padded(chunk: &[&Seq]) -> (Vec<Vec<u32>>, Vec<Vec<u8>>) {
    let t = chunk.iter().map(|s| s.ids.len()).max().unwrap_or(0);
    chunk
        .iter()
        .map(|s| {
            let mut row = s.ids.clone();
            let mut m = vec![1u8; row.len()];
            row.resize(t, 0);
            m.resize(t, 0);
            (row, m)
        })
        .unzip()
}

/// The flat hidden rows that predict each answer token, and the tokens, for `chunk` laid out
/// as padded rows (`shared = 0`: row `b`, position `p` is `b * T + p`) or after a shared
/// prefix of `shared` tokens (`shared + b * S + p - shared`, `S` the longest rest).
fn loss_rows(chunk: &[&Seq], shared: usize) -> (Vec<u32>, Vec<u32>) {
    let longest = chunk.iter().map(|s| s.ids.len()).max().unwrap_or(0);
    let stride = longest - shared;
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (b, s) in chunk.iter().enumerate() {
        for p in s.answer_start..s.ids.len() {
            rows.push((shared + b * stride + p - 1 - shared) as u32);
            targets.push(s.ids[p]);
        }
    }
    (rows, targets)
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

    #[test]
    fn the_shared_prefix_stops_short_of_every_answer_and_loss_rows_follow_the_layout() {
        let a = Seq {
            ids: vec![2, 5, 6, 7, 30, 31],
            answer_start: 4,
        };
        let b = Seq {
            ids: vec![2, 5, 6, 8, 9, 40],
            answer_start: 5,
        };
        let c = Seq {
            ids: vec![2, 5, 6, 50],
            answer_start: 3,
        };
        assert_eq!(shared_prefix(&[&a, &b]), 3);
        // c's first answer token is predicted from its position 2: the prefix stops before it.
        assert_eq!(shared_prefix(&[&a, &b, &c]), 2);
        assert_eq!(
            shared_prefix(&[
                &a,
                &Seq {
                    ids: vec![3, 5],
                    answer_start: 1
                }
            ]),
            0
        );
        // Padded rows of 6: a predicts 30, 31 from rows 3, 4; b predicts 40 from 6 + 4.
        assert_eq!(loss_rows(&[&a, &b], 0), (vec![3, 4, 10], vec![30, 31, 40]));
        // Prefix of 3, rests of 3: a's rest starts at row 3, b's at 6.
        assert_eq!(loss_rows(&[&a, &b], 3), (vec![3, 4, 7], vec![30, 31, 40]));
    }
}
