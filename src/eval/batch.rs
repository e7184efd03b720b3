//! `--batch-size auto`: the batch size an evaluation runs at when none is given. In: the loaded
//! model and the evaluation's longest work (its multiple-choice requests as packed rows, its
//! generation prompts with their answer budgets); out: one size in `1..=CEILING` (and no larger
//! than the largest task x language group, as batches never span groups), logged.
//!
//! - On CUDA an allocation failure is an error candle returns, so the size is found by trying:
//!   one batch of the longest items at the ceiling, halved after each out-of-memory error; the
//!   largest that ran is used (an out-of-memory error at size 1 is reported).
//! - Elsewhere (the CPU) a failed allocation aborts the process, so nothing is tried: the size is
//!   what an estimate of the activations of one row of the longest item allows within a quarter
//!   of the machine's available memory (`MemAvailable` in `/proc/meminfo`), read after the model
//!   is loaded.
//!
//! Scores do not depend on the size (rows are scored independently; float rounding of batched
//! matrix products aside, see tests/eval.rs), so `auto` changes speed only.

use std::collections::BTreeMap;

use super::choices::{packed_len, ChoiceRequest, LOGIT_ROWS};
use super::run::Item;
use crate::error::{Error, Result};
use crate::model::config::{LayerKind, ModelConfig};
use crate::model::LoadedModel;
use crate::tasks::{Scoring, TaskSpec};

/// The largest size `auto` picks. lm-evaluation-harness's default `--max_batch_size` is 64 too:
/// past it a forward pass of the models mlbench runs is compute-bound already, so larger
/// batches gain little speed while the padding of a batch and the cost of each probe grow.
pub const CEILING: usize = 64;

/// The share of the available memory the CPU estimate may fill (the rest stays free for the
/// rest of the machine and for what the estimate leaves out).
const MEMORY_SHARE: u64 = 4;

/// The size used when the available memory cannot be read (the fixed default).
const FALLBACK: usize = 16;

/// One generation prompt: its text, its length in tokens and its answer budget.
struct Prompt {
    text: String,
    tokens: usize,
    max_tokens: usize,
}

/// The longest work of an evaluation, longest first, at most [`CEILING`] of each kind.
pub struct Workload {
    choices: Vec<ChoiceRequest>,
    /// Packed row length (tokens) of the longest multiple-choice request.
    choice_tokens: usize,
    prompts: Vec<Prompt>,
    /// Items in the largest task x language group: no batch is larger.
    largest_group: usize,
    max_len: usize,
}

impl Workload {
    /// The longest multiple-choice requests (`requests[i]` belongs to `items[i]`) and generation
    /// prompts (tokenised here) of the evaluation; `largest_group` caps the size.
    pub fn new(
        tok: &crate::model::tokenizer::Tok,
        items: &[Item],
        specs: &BTreeMap<String, TaskSpec>,
        requests: &[Option<ChoiceRequest>],
        largest_group: usize,
        max_len: usize,
    ) -> Result<Workload> {
        let mut choices: Vec<(usize, &ChoiceRequest)> = requests
            .iter()
            .flatten()
            .map(|r| (packed_len(r, max_len), r))
            .collect();
        choices.sort_by_key(|&(n, _)| std::cmp::Reverse(n));
        let mut prompts = Vec::new();
        for it in items {
            let spec = &specs[&it.task];
            if let (Scoring::Generate, Some(g)) = (spec.scoring, &spec.generation) {
                prompts.push(Prompt {
                    text: it.prompt.clone(),
                    tokens: tok.encode(&it.prompt)?.len(),
                    max_tokens: g.max_tokens,
                });
            }
        }
        prompts.sort_by_key(|p| std::cmp::Reverse(p.tokens + p.max_tokens));
        prompts.truncate(CEILING);
        Ok(Workload {
            choice_tokens: choices.first().map_or(0, |c| c.0),
            choices: choices
                .into_iter()
                .take(CEILING)
                .map(|(_, r)| r.clone())
                .collect(),
            prompts,
            largest_group,
            max_len,
        })
    }

    /// The longest generation in tokens (prompt and answer), 0 without generation tasks.
    fn generation_tokens(&self) -> usize {
        self.prompts.first().map_or(0, |p| p.tokens + p.max_tokens)
    }
}

/// The batch size `auto` stands for on this model's device (see the module doc), logged.
pub fn choose(m: &LoadedModel, w: &Workload) -> Result<usize> {
    let cap = CEILING.min(w.largest_group).max(1);
    let (size, how) = if m.model.device.is_cuda() {
        (
            probe(m, w, cap)?,
            "the largest batch of the longest items that ran",
        )
    } else {
        match available_memory() {
            Some(bytes) => (
                estimate(&m.model, w, cap, bytes / MEMORY_SHARE),
                "estimated activations within a quarter of the available memory",
            ),
            None => (
                FALLBACK.min(cap),
                "the default: /proc/meminfo could not be read",
            ),
        }
    };
    tracing::info!(
        batch_size = size,
        ceiling = cap,
        "batch size auto: {size} ({how})"
    );
    Ok(size)
}

/// CUDA: tries one batch of the longest items at `cap`, halving after each out-of-memory error.
fn probe(m: &LoadedModel, w: &Workload, cap: usize) -> Result<usize> {
    let mut size = cap;
    loop {
        match try_batch(m, w, size) {
            Ok(()) => return Ok(size),
            Err(e) if size > 1 && is_out_of_memory(&e) => {
                tracing::info!(
                    "batch size auto: {size} does not fit ({e}); trying {}",
                    size / 2
                );
                size /= 2;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Runs the `size` longest multiple-choice requests as one batch, and the `size` longest
/// generation prompts decoding their whole answer budget (no stop strings) together.
fn try_batch(m: &LoadedModel, w: &Workload, size: usize) -> Result<()> {
    if !w.choices.is_empty() {
        let n = size.min(w.choices.len());
        super::choices::score_choices(&m.model, None, &w.choices[..n], n, w.max_len)?;
    }
    if !w.prompts.is_empty() {
        let n = size.min(w.prompts.len());
        let texts: Vec<&str> = w.prompts[..n].iter().map(|p| p.text.as_str()).collect();
        let budget = w.prompts[..n]
            .iter()
            .map(|p| p.max_tokens)
            .max()
            .unwrap_or(1);
        crate::model::score::generate_batch(&m.model, &m.tok, None, &texts, budget, &[])?;
    }
    Ok(())
}

/// Whether an error is the device running out of memory (CUDA's driver, cuBLAS or the
/// allocator saying so).
fn is_out_of_memory(e: &Error) -> bool {
    let Error::Candle(c) = e else { return false };
    let s = c.to_string().to_ascii_lowercase();
    ["out_of_memory", "out of memory", "alloc_failed"]
        .iter()
        .any(|k| s.contains(k))
}

/// `MemAvailable` of `/proc/meminfo` in bytes (`None` where there is none).
fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    meminfo_available(&info)
}

/// The `MemAvailable:   N kB` line of a meminfo text, in bytes.
fn meminfo_available(info: &str) -> Option<u64> {
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The largest size in `1..=cap` whose estimated memory fits `budget` bytes, over both kinds
/// of work.
fn estimate(
    model: &crate::model::transformer::Model,
    w: &Workload,
    cap: usize,
    budget: u64,
) -> usize {
    let c = &model.config;
    // The CPU runs f32 inference through a fused attention kernel (no per-head scores).
    let fused = model.dtype == candle_core::DType::F32 && model.device.is_cpu();
    let s = model.dtype.size_in_bytes() as u64;
    let mut size = cap;
    if !w.choices.is_empty() {
        // The logits of LOGIT_ROWS scored positions at a time, and their soft-capped copy.
        let fixed = 2 * LOGIT_ROWS as u64 * c.vocab_size as u64 * s;
        let row = row_bytes(c, s, fused, w.choice_tokens as u64);
        size = size.min(fits(budget.saturating_sub(fixed), row));
    }
    if !w.prompts.is_empty() {
        let t = w.generation_tokens() as u64;
        // Keys and values of every layer, and the logits of the row's next token.
        let cache = 2 * c.num_hidden_layers as u64 * (c.num_key_value_heads * c.head_dim) as u64;
        let row = row_bytes(c, s, fused, t) + (cache * t + c.vocab_size as u64) * s;
        size = size.min(fits(budget, row));
    }
    size.max(1)
}

/// How many rows of `row` bytes fit `budget` bytes.
fn fits(budget: u64, row: u64) -> usize {
    usize::try_from(budget / row.max(1)).unwrap_or(usize::MAX)
}

/// The estimated peak memory of one row of `t` tokens in one layer's forward pass, in bytes
/// (`s` bytes per value): per token the residual stream, the normed input, the layer's output
/// and the hidden state kept for scoring (4 x hidden), queries, keys, values and the
/// attention output, and the MLP's gate, up and product (3 x intermediate); per pair of
/// tokens the attention masks (built in f32, then in the model's dtype; two with sliding
/// layers) and, outside the fused f32 attention kernel, each head's scores and probabilities.
fn row_bytes(c: &ModelConfig, s: u64, fused: bool, t: u64) -> u64 {
    let (h, i) = (c.hidden_size as u64, c.intermediate_size as u64);
    let heads = (2 * c.num_attention_heads + 2 * c.num_key_value_heads) as u64;
    let per_token = (4 * h + heads * c.head_dim as u64 + 3 * i) * s;
    let masks = if c.layer_kinds.contains(&LayerKind::Sliding) {
        2
    } else {
        1
    };
    let mut per_pair = masks * (4 + s);
    if !fused {
        per_pair += 2 * c.num_attention_heads as u64 * s;
    }
    per_token * t + per_pair * t * t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn available_memory_is_read_from_meminfo_in_bytes() {
        let info = "MemTotal:       16384000 kB\nMemFree:  100 kB\nMemAvailable:    8192000 kB\n";
        assert_eq!(meminfo_available(info), Some(8_192_000 * 1024));
        assert_eq!(meminfo_available("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn a_row_costs_more_when_longer_and_without_the_fused_kernel() {
        let c = crate::model::tiny::tiny_config(crate::model::config::Arch::Gemma3);
        let short = row_bytes(&c, 4, true, 100);
        let long = row_bytes(&c, 4, true, 1000);
        assert!(long > 10 * short, "quadratic masks: {short} vs {long}");
        assert!(row_bytes(&c, 4, false, 100) > short, "per-head scores");
    }

    #[test]
    fn the_estimate_grows_with_the_budget_within_one_and_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let arch = crate::model::config::Arch::Gemma3;
        crate::model::tiny::write_tiny(arch, dir.path(), 0).unwrap();
        let m = crate::model::load_dir(
            dir.path(),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let w = Workload {
            choices: vec![ChoiceRequest {
                context: vec![5; 300],
                continuations: vec![vec![6, 7], vec![8]],
            }],
            choice_tokens: 301,
            prompts: vec![],
            largest_group: 1000,
            max_len: 2048,
        };
        let fixed = 2 * LOGIT_ROWS as u64 * m.model.config.vocab_size as u64 * 4;
        let row = row_bytes(&m.model.config, 4, true, 301);
        assert_eq!(estimate(&m.model, &w, CEILING, 0), 1, "at least one");
        assert_eq!(estimate(&m.model, &w, CEILING, fixed + 5 * row), 5);
        assert_eq!(estimate(&m.model, &w, CEILING, u64::MAX / 2), CEILING);
    }

    #[test]
    fn fits_divides_and_never_divides_by_zero() {
        assert_eq!(fits(100, 30), 3);
        assert_eq!(fits(10, 0), 10);
    }
}
