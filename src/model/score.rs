//! Request scoring (lm-evaluation-harness `loglikelihood`) and greedy generation.
//!
//! A request `(context, continuation)` is encoded with [`Tok::encode_pair`]; the model reads
//! `(ctx + cont)[..-1]` and the score is `sum_j log p(cont_j | ctx, cont_<j)` together with
//! whether every `cont_j` is the argmax. Logits are computed only at the continuation rows.
//! Requests are batched longest first and padded (right by default); scores do not depend on
//! the batch size or the padding side.

use candle_core::{DType, Storage, Tensor, D};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::lora::Adapter;
use super::tokenizer::Tok;
use super::transformer::{Ctx, KvCache, Model};
use crate::error::{Error, Result};

/// One loglikelihood request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub context: String,
    pub continuation: String,
}

/// Its result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Score {
    /// Sum of the log-probabilities of the continuation tokens.
    pub logprob: f64,
    /// Every continuation token is the argmax.
    pub greedy: bool,
    /// Number of continuation tokens.
    pub tokens: usize,
}

/// Which side padding goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pad {
    Left,
    Right,
}

/// Per-row statistics of a logit matrix `[N, V]`.
#[derive(Debug, Clone, PartialEq)]
pub struct RowStats {
    /// `log sum_v exp(logits[n, v])` of each row.
    pub lse: Vec<f32>,
    /// Index of each row's first maximum.
    pub argmax: Vec<u32>,
    /// `logits[n, v]` for each `(n, v)` asked for, in order.
    pub picked: Vec<f32>,
}

/// Log-sum-exp and argmax of every row of `logits: [N, V]`, and the logits at `picks`.
///
/// On the CPU this reads the rows in place, in parallel, with vectorised passes per row (max,
/// the sum of exponentials accumulated in f64, the first position of the max); candle's `log_sum_exp` and `argmax`
/// take six passes and allocate `[N, V]` temporaries, which for Gemma's 262k vocabulary cost
/// more than a layer of the model. Other devices use candle's ops.
pub fn row_stats(logits: &Tensor, picks: &[(usize, u32)]) -> Result<RowStats> {
    let logits = logits.to_dtype(DType::F32)?.contiguous()?;
    let (n, v) = logits.dims2()?;
    if let Some(&(r, t)) = picks.iter().find(|&&(r, t)| r >= n || t as usize >= v) {
        return Err(Error::Internal(format!(
            "logit ({r}, {t}) is outside the [{n}, {v}] matrix"
        )));
    }
    {
        let (storage, layout) = logits.storage_and_layout();
        if let Storage::Cpu(cpu) = &*storage {
            let start = layout.start_offset();
            let data = &cpu.as_slice::<f32>()?[start..start + n * v];
            let (lse, argmax): (Vec<f32>, Vec<u32>) = if v == 0 {
                (vec![f32::NEG_INFINITY; n], vec![0; n])
            } else {
                data.par_chunks(v).map(lse_argmax).unzip()
            };
            let picked = picks
                .iter()
                .map(|&(r, t)| data[r * v + t as usize])
                .collect();
            return Ok(RowStats {
                lse,
                argmax,
                picked,
            });
        }
    }
    let lse = logits.log_sum_exp(D::Minus1)?.to_vec1::<f32>()?;
    let argmax = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
    let idx: Vec<u32> = picks.iter().map(|&(r, t)| (r * v) as u32 + t).collect();
    let picked = if idx.is_empty() {
        Vec::new()
    } else {
        let k = idx.len();
        logits
            .flatten_all()?
            .index_select(&Tensor::from_vec(idx, k, logits.device())?, 0)?
            .to_vec1()?
    };
    Ok(RowStats {
        lse,
        argmax,
        picked,
    })
}

/// `(log sum exp(row), index of the first maximum)` of a non-empty row.
fn lse_argmax(row: &[f32]) -> (f32, u32) {
    let (m, s) = super::kernels::max_and_sum_exp(row);
    // The first maximum (the max skips NaNs, so it is found even when there are some).
    let best = row.iter().position(|&x| x == m).unwrap_or(0) as u32;
    if !m.is_finite() {
        // All -inf (log 0), an infinite maximum or all NaN: the shifted sum means nothing.
        let nan = m.is_nan() || row.iter().any(|x| x.is_nan());
        return (if nan { f32::NAN } else { m }, best);
    }
    if s.is_nan() {
        return (f32::NAN, best);
    }
    (m + s.ln() as f32, best)
}

/// Scores token-level requests: `(context ids, continuation ids)`.
pub fn score_ids(
    model: &Model,
    adapter: Option<&Adapter>,
    reqs: &[(Vec<u32>, Vec<u32>)],
    batch_size: usize,
    pad: Pad,
    max_len: usize,
) -> Result<Vec<Score>> {
    let mut out: Vec<Option<Score>> = vec![None; reqs.len()];
    // Model input and the number of continuation tokens of each request (truncated from the
    // left to `max_len`, keeping the whole continuation when it fits).
    let inputs: Vec<(Vec<u32>, Vec<u32>)> = reqs
        .iter()
        .map(|(c, k)| {
            let mut all: Vec<u32> = c.iter().chain(k.iter()).copied().collect();
            let targets = k.clone();
            if all.len() > max_len + 1 {
                all.drain(..all.len() - (max_len + 1));
            }
            all.pop();
            (all, targets)
        })
        .collect();
    for (i, (inp, tg)) in inputs.iter().enumerate() {
        if tg.is_empty() {
            out[i] = Some(Score {
                logprob: 0.0,
                greedy: true,
                tokens: 0,
            });
        } else if inp.is_empty() || tg.len() > inp.len() {
            return Err(Error::Invalid(format!(
                "request {i}: the continuation does not fit the model's window of {max_len} tokens"
            )));
        }
    }
    let mut order: Vec<usize> = (0..reqs.len()).filter(|&i| out[i].is_none()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(inputs[i].0.len()));
    let ctx = Ctx::eval(adapter);
    for chunk in order.chunks(batch_size.max(1)) {
        let t = chunk.iter().map(|&i| inputs[i].0.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(chunk.len());
        let mut mask = Vec::with_capacity(chunk.len());
        let mut rows: Vec<u32> = Vec::new();
        let mut targets: Vec<u32> = Vec::new();
        for (bi, &i) in chunk.iter().enumerate() {
            let (inp, tg) = &inputs[i];
            let padn = t - inp.len();
            let off = if pad == Pad::Left { padn } else { 0 };
            let mut row = vec![0u32; t];
            let mut m = vec![0u8; t];
            row[off..off + inp.len()].copy_from_slice(inp);
            m[off..off + inp.len()].iter_mut().for_each(|x| *x = 1);
            ids.push(row);
            mask.push(m);
            let first = off + inp.len() - tg.len();
            for j in 0..tg.len() {
                rows.push((bi * t + first + j) as u32);
            }
            targets.extend_from_slice(tg);
        }
        let hidden = model.hidden(&ids, &mask, &ctx)?;
        let logits = model.logits_at(&hidden, &rows)?;
        let picks: Vec<(usize, u32)> = targets.iter().copied().enumerate().collect();
        let st = row_stats(&logits, &picks)?;
        let mut at = 0;
        for &i in chunk {
            let n = inputs[i].1.len();
            let lp: f64 = (at..at + n)
                .map(|r| f64::from(st.picked[r]) - f64::from(st.lse[r]))
                .sum();
            let greedy = (at..at + n).all(|r| st.argmax[r] == targets[r]);
            out[i] = Some(Score {
                logprob: lp,
                greedy,
                tokens: n,
            });
            at += n;
        }
    }
    Ok(out
        .into_iter()
        .map(|s| s.expect("every request scored"))
        .collect())
}

/// Scores text requests with lm-evaluation-harness tokenisation.
pub fn score_requests(
    model: &Model,
    tok: &Tok,
    adapter: Option<&Adapter>,
    reqs: &[Request],
    batch_size: usize,
    max_len: usize,
) -> Result<Vec<Score>> {
    let enc: Vec<(Vec<u32>, Vec<u32>)> = reqs
        .iter()
        .map(|r| tok.encode_pair(&r.context, &r.continuation))
        .collect::<Result<_>>()?;
    score_ids(model, adapter, &enc, batch_size, Pad::Right, max_len)
}

/// Greedy continuation of `prompt` for up to `max_tokens` tokens, stopping at EOS or when the
/// decoded text contains a stop string (which is cut off).
pub fn generate(
    model: &Model,
    tok: &Tok,
    adapter: Option<&Adapter>,
    prompt: &str,
    max_tokens: usize,
    until: &[String],
) -> Result<String> {
    let mut out = generate_batch(model, tok, adapter, &[prompt], max_tokens, until)?;
    Ok(out.remove(0))
}

/// [`generate`] for several prompts at once: they are left-padded to one length and decoded
/// together (one forward per new token for the whole batch, keys and values cached), each row
/// stopping on its own; a row's text is what [`generate`] gives for it alone, up to the
/// rounding of batched matrix products. The batch runs until every row has stopped.
pub fn generate_batch(
    model: &Model,
    tok: &Tok,
    adapter: Option<&Adapter>,
    prompts: &[&str],
    max_tokens: usize,
    until: &[String],
) -> Result<Vec<String>> {
    let enc: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| tok.encode(p))
        .collect::<Result<_>>()?;
    let b = enc.len();
    if b == 0 {
        return Ok(Vec::new());
    }
    if let Some(i) = enc.iter().position(Vec::is_empty) {
        return Err(Error::Invalid(format!(
            "prompt {i} has no tokens to continue"
        )));
    }
    let longest = enc.iter().map(Vec::len).max().unwrap_or(0);
    let pads: Vec<usize> = enc.iter().map(|r| longest - r.len()).collect();
    // Padding tokens are masked out; any id in the vocabulary will do.
    let filler = enc[0][0];
    let mut fresh: Vec<Vec<u32>> = enc
        .iter()
        .map(|r| {
            let mut row = vec![filler; longest - r.len()];
            row.extend_from_slice(r);
            row
        })
        .collect();
    let ctx = Ctx::eval(adapter);
    let mut cache = KvCache::default();
    let mut new: Vec<Vec<u32>> = vec![Vec::new(); b];
    let mut done: Vec<Option<String>> = vec![None; b];
    for _ in 0..max_tokens {
        let hidden = model.hidden_cached_rows(&fresh, &pads, &mut cache, &ctx)?;
        let t = fresh[0].len();
        let last: Vec<u32> = (0..b).map(|bi| (bi * t + t - 1) as u32).collect();
        let next: Vec<u32> = model
            .logits_at(&hidden, &last)?
            .argmax(D::Minus1)?
            .to_vec1::<u32>()?;
        for (bi, &id) in next.iter().enumerate() {
            if done[bi].is_some() {
                continue;
            }
            if Some(id) == tok.eos {
                done[bi] = Some(tok.decode(&new[bi])?);
                continue;
            }
            new[bi].push(id);
            let text = tok.decode(&new[bi])?;
            if let Some(cut) = until.iter().filter_map(|s| text.find(s.as_str())).min() {
                done[bi] = Some(text[..cut].to_string());
            }
        }
        if done.iter().all(Option::is_some) {
            break;
        }
        // Stopped rows keep decoding (their tokens are ignored) so the batch stays rectangular.
        fresh = next.iter().map(|&id| vec![id]).collect();
    }
    done.into_iter()
        .zip(&new)
        .map(|(d, ids)| match d {
            Some(text) => Ok(text),
            None => tok.decode(ids),
        })
        .collect()
}
