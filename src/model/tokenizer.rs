//! Tokenizers: loading `tokenizer.json`, building one (for tiny test models and from a GGUF
//! vocabulary), and encoding a (context, continuation) pair the way lm-evaluation-harness does.
//!
//! In: `tokenizer.json` (or a vocabulary). Out: token ids. A pair is encoded as
//! `whole = enc(context + continuation)`, `ctx = enc(context)`, `cont = whole[len(ctx)..]`, after
//! moving trailing spaces of the context to the continuation; BOS is prepended when the model
//! wants it (Gemma), and an empty context becomes `[BOS]`.

use std::path::Path;

use serde_json::{json, Value};

use crate::error::{Error, Result};

/// A loaded tokenizer plus the model's special-token policy.
pub struct Tok {
    pub inner: tokenizers::Tokenizer,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Prepend BOS to every encoded sequence (Gemma: yes; Llama/SmolLM2: no, as lm-eval does).
    pub add_bos: bool,
}

impl Tok {
    /// Loads `tokenizer.json`, checking that every id it can produce fits `vocab_size`.
    pub fn load(
        path: &Path,
        vocab_size: usize,
        bos: Option<u32>,
        eos: Option<u32>,
        add_bos: bool,
    ) -> Result<Self> {
        let bytes = std::fs::read(path)
            .map_err(|e| Error::missing_or_io("tokenizer.json", "read", path, e))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            message: format!("not a tokenizer.json: {e}"),
        })?;
        let n = inner.get_vocab_size(true);
        if n > vocab_size {
            return Err(Error::Config {
                path: path.to_path_buf(),
                message: format!("the tokenizer has {n} tokens but the model's vocabulary is {vocab_size}: they do not belong together"),
            });
        }
        if add_bos && bos.is_none() {
            return Err(Error::Config {
                path: path.to_path_buf(),
                message: "the model wants a BOS token but none is configured".into(),
            });
        }
        Ok(Tok {
            inner,
            bos,
            eos,
            add_bos,
        })
    }

    /// Token ids of `text` (no special tokens), with BOS first when the policy says so.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Internal(format!("tokenizing {text:?}: {e}")))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// lm-evaluation-harness's pair encoding: `(context ids, continuation ids)`.
    pub fn encode_pair(&self, context: &str, continuation: &str) -> Result<(Vec<u32>, Vec<u32>)> {
        if context.is_empty() {
            let prefix = self.bos.or(self.eos).ok_or_else(|| {
                Error::Invalid("an empty context needs a BOS or EOS token".into())
            })?;
            let mut cont = self.encode(continuation)?;
            if self.add_bos && cont.first() == self.bos.as_ref() {
                cont.remove(0);
            }
            return Ok((vec![prefix], cont));
        }
        let trimmed = context.trim_end_matches(' ');
        let n_spaces = context.len() - trimmed.len();
        let (ctx, cont) = if n_spaces > 0 {
            (
                trimmed.to_string(),
                format!("{}{continuation}", &context[trimmed.len()..]),
            )
        } else {
            (context.to_string(), continuation.to_string())
        };
        let whole = self.encode(&format!("{ctx}{cont}"))?;
        let ctx_ids = self.encode(&ctx)?;
        let cont_ids = whole.get(ctx_ids.len()..).unwrap_or(&[]).to_vec();
        Ok((ctx_ids, cont_ids))
    }

    /// Text of ids (special tokens skipped).
    /// Text of `ids`, added tokens included: Gemma's tokenizer flags whitespace runs such as
    /// `"\n\n"` as special, and dropping them would hide the stop strings of generation tasks.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| Error::Internal(format!("decoding: {e}")))
    }
}

fn added(id: u32, content: &str) -> Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true})
}

/// A SentencePiece-style BPE `tokenizer.json` (Gemma layout): `" "` -> `"▁"` normaliser, byte
/// fallback, no pre-tokenizer. `pieces` are (piece, score); ids follow their order. Merges are
/// derived from the vocabulary: every split of a piece into two pieces is a merge, ranked by the
/// merged piece's score (higher first), then its id.
pub fn sentencepiece_bpe_json(
    pieces: &[(String, f32)],
    specials: &[(u32, &str)],
    unk: &str,
) -> Value {
    let mut vocab = serde_json::Map::new();
    let index: std::collections::HashMap<&str, usize> = pieces
        .iter()
        .enumerate()
        .map(|(i, (p, _))| (p.as_str(), i))
        .collect();
    for (i, (p, _)) in pieces.iter().enumerate() {
        vocab.insert(p.clone(), json!(i));
    }
    let mut merges: Vec<(f32, usize, String, String)> = Vec::new();
    for (id, (p, score)) in pieces.iter().enumerate() {
        let special = specials.iter().any(|(_, s)| s == p);
        if special || (p.starts_with("<0x") && p.ends_with('>') && p.len() == 6) {
            continue;
        }
        let chars: Vec<(usize, char)> = p.char_indices().collect();
        for &(cut, _) in chars.iter().skip(1) {
            let (l, r) = p.split_at(cut);
            if index.contains_key(l) && index.contains_key(r) {
                merges.push((*score, id, l.to_string(), r.to_string()));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let merges: Vec<Value> = merges
        .into_iter()
        .map(|(_, _, l, r)| json!([l, r]))
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": specials.iter().map(|(i, s)| added(*i, s)).collect::<Vec<_>>(),
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"}
        ]},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}
    })
}

/// GPT-2 byte-to-unicode table (the alphabet of byte-level BPE).
pub fn byte_alphabet() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec!['\0'; 256];
    for (b, c) in bs.iter().zip(cs) {
        table[*b as usize] = char::from_u32(c).expect("valid char");
    }
    table
}

/// A GPT-2-style byte-level BPE `tokenizer.json` (Llama/SmolLM2 layout). `tokens` are in id
/// order (byte-level strings); `merges` are given in rank order.
pub fn byte_level_bpe_json(
    tokens: &[String],
    merges: &[(String, String)],
    specials: &[(u32, &str)],
) -> Value {
    let mut vocab = serde_json::Map::new();
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(t.clone(), json!(i));
    }
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": specials.iter().map(|(i, s)| added(*i, s)).collect::<Vec<_>>(),
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges.iter().map(|(a, b)| json!([a, b])).collect::<Vec<_>>()}
    })
}

#[cfg(test)]
mod decode_tests {
    use super::*;

    #[test]
    fn decoding_keeps_special_flagged_whitespace() {
        // Gemma's layout: "\n\n" is an added token flagged special; generation must still see
        // it to stop at "\n\n".
        let pieces: Vec<(String, f32)> = ["<unk>", "<eos>", "\n\n", "a", "b", "▁"]
            .iter()
            .map(|p| (p.to_string(), 0.0))
            .collect();
        let json =
            sentencepiece_bpe_json(&pieces, &[(0, "<unk>"), (1, "<eos>"), (2, "\n\n")], "<unk>");
        let inner = tokenizers::Tokenizer::from_bytes(json.to_string().as_bytes()).unwrap();
        let tok = Tok {
            inner,
            bos: None,
            eos: Some(1),
            add_bos: false,
        };
        let ids = tok.encode("a\n\nb").unwrap();
        assert!(ids.contains(&2), "{ids:?}");
        assert_eq!(tok.decode(&ids).unwrap(), "a\n\nb");
    }
}
