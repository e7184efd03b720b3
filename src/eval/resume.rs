//! A stoppable evaluation and what it keeps. A grid cell's evaluation runs for minutes on CPU
//! (seven SIB-200 languages, 204 items each: about five); a stop request (Ctrl-C, a
//! scheduler's SIGTERM before its kill) must not wait for the end of it nor throw it all away.
//!
//! In: the stop flag, a folder, and for each (variant, task, language) group its fingerprint and,
//! once scored, its records. Out: one file per finished group, `<dir>/<fingerprint>.json`
//! (written atomically), read back by a later evaluation with the same folder. Scoring polls the
//! flag before each group and after each forward pass and then ends with
//! [`Error::EvalInterrupted`]: at most one batch of work is lost.
//!
//! The fingerprint is the SHA-256 of everything that decides a group's records: the code
//! version, the evaluation configuration, the batch size scoring runs at, the variant's name and
//! adapter weights (bytes of every tensor), the task's name and version, the language, and every
//! item (id, prompt, choices, gold index, target). A group is read back only under the same
//! fingerprint, so records from another adapter, item set or setting are never mixed in: the
//! group is scored again. Log-probabilities are kept as their IEEE bit patterns (exact; `-inf`
//! survives, which JSON numbers cannot carry). The folder is removed once the evaluation's
//! outputs are written.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::DType;

use super::run::{Item, Record};
use crate::error::{Error, Result};
use crate::model::lora::Adapter;
use crate::util::{sha256_hex, write_bytes_atomic};

/// Where an evaluation keeps its finished groups, and the flag that stops it.
pub struct Resume<'a> {
    pub stop: &'a AtomicBool,
    pub dir: PathBuf,
    /// Groups read back so far (their scoring time is not this run's).
    pub read_back: std::cell::Cell<usize>,
}

impl<'a> Resume<'a> {
    pub fn new(stop: &'a AtomicBool, dir: PathBuf) -> Self {
        Resume {
            stop,
            dir,
            read_back: std::cell::Cell::new(0),
        }
    }

    /// The file of the group with fingerprint `fp`.
    fn path(&self, fp: &str) -> PathBuf {
        self.dir.join(format!("{fp}.json"))
    }

    /// The records of a group finished by an earlier run, if its file is there.
    pub fn load(&self, fp: &str) -> Result<Option<Vec<Record>>> {
        let p = self.path(fp);
        match std::fs::read(&p) {
            Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("read", &p, e)),
        }
    }

    /// Keeps a finished group's records.
    pub fn save(&self, fp: &str, records: &[Record]) -> Result<()> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| Error::io("create directory", &self.dir, e))?;
        write_bytes_atomic(&self.path(fp), &serde_json::to_vec(records)?)
    }

    /// `Err(EvalInterrupted)` once the stop flag is up; `kept` of `groups` groups are finished.
    pub fn check(&self, kept: usize, groups: usize) -> Result<()> {
        if self.stop.load(Ordering::SeqCst) {
            return Err(Error::EvalInterrupted {
                kept,
                groups,
                path: self.dir.clone(),
            });
        }
        Ok(())
    }

    /// Removes the kept groups (the evaluation's outputs now hold them).
    pub fn finish(&self) -> Result<()> {
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::io("remove", &self.dir, e))
            }
            _ => Ok(()),
        }
    }
}

/// SHA-256 of an adapter's configuration and weights (each module's name, then A's and B's
/// values as little-endian f32), or `"base"` for none.
pub fn adapter_digest(a: Option<&Adapter>) -> Result<String> {
    let Some(a) = a else {
        return Ok("base".into());
    };
    let mut bytes = serde_json::to_vec(&a.config)?;
    for (name, pair) in &a.pairs {
        bytes.extend_from_slice(name.as_bytes());
        for t in [&pair.a, &pair.b] {
            let v: Vec<f32> = t
                .as_tensor()
                .flatten_all()?
                .to_dtype(DType::F32)?
                .to_vec1()?;
            bytes.extend(v.iter().flat_map(|x| x.to_le_bytes()));
        }
    }
    Ok(sha256_hex(&bytes))
}

/// The fingerprint of one group (see the module doc): `context` holds the code version, the
/// configuration and the batch size; `adapter` is [`adapter_digest`]'s; `items` are the group's
/// items in scoring order.
pub fn group_fingerprint(
    context: &str,
    (variant, adapter): (&str, &str),
    (task, version): (&str, &str),
    lang: &str,
    items: &[&Item],
) -> Result<String> {
    let items: Vec<_> = items
        .iter()
        .map(|it| {
            serde_json::json!([
                it.id,
                it.prompt,
                it.rendered.choices,
                it.rendered.gold,
                it.target
            ])
        })
        .collect();
    let all = serde_json::json!([context, variant, adapter, task, version, lang, items]);
    Ok(sha256_hex(&serde_json::to_vec(&all)?))
}

/// Serde for `Option<Vec<f64>>` as the values' bit patterns (exact, non-finite values kept).
pub mod f64_bits {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<f64>>, s: S) -> Result<S::Ok, S::Error> {
        v.as_ref()
            .map(|xs| xs.iter().map(|x| x.to_bits()).collect::<Vec<u64>>())
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<f64>>, D::Error> {
        let bits = Option::<Vec<u64>>::deserialize(d)?;
        Ok(bits.map(|b| b.into_iter().map(f64::from_bits).collect()))
    }
}

/// The folder an evaluation writing to `out` keeps its groups in.
pub fn groups_dir(out: &Path) -> PathBuf {
    out.join("groups")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn record(lps: Vec<f64>) -> Record {
        Record {
            variant: "cell".into(),
            task: "toy".into(),
            lang: "eng_Latn".into(),
            id: "7".into(),
            prompt_sha: "ab".into(),
            logprobs: Some(lps),
            pred: Some(1),
            pred_norm: Some(0),
            pred_bytes: None,
            gold: Some(1),
            generated: Some("x = 4\n".into()),
            extracted: None,
            target: Some("4".into()),
            outcomes: BTreeMap::from([("acc".into(), true), ("acc_norm".into(), false)]),
        }
    }

    #[test]
    fn records_come_back_bit_for_bit_and_a_missing_group_is_none() {
        let tmp = tempfile::tempdir().unwrap();
        let stop = AtomicBool::new(false);
        let r = Resume::new(&stop, tmp.path().join("groups"));
        assert!(r.load("f0").unwrap().is_none());
        let lps = vec![
            -0.1 - 1e-17,
            f64::NEG_INFINITY,
            -12.345678901234567,
            f64::MIN_POSITIVE,
        ];
        r.save("f0", &[record(lps.clone()), record(vec![])])
            .unwrap();
        let back = r.load("f0").unwrap().unwrap();
        assert_eq!(back.len(), 2);
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(back[0].logprobs.as_ref().unwrap()), bits(&lps));
        let want = record(lps);
        assert_eq!(
            (&back[0].generated, &back[0].outcomes, back[0].pred_bytes),
            (&want.generated, &want.outcomes, want.pred_bytes)
        );
        r.finish().unwrap();
        assert!(!r.dir.exists());
        r.finish().unwrap();
    }

    #[test]
    fn the_flag_ends_scoring_with_the_count_kept() {
        let stop = AtomicBool::new(false);
        let r = Resume::new(&stop, PathBuf::from("g"));
        r.check(0, 3).unwrap();
        stop.store(true, Ordering::SeqCst);
        match r.check(2, 3) {
            Err(Error::EvalInterrupted {
                kept: 2, groups: 3, ..
            }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_fingerprint_changes_with_any_item_field_the_adapter_or_the_context() {
        let item = |prompt: &str, gold: usize| Item {
            task: "toy".into(),
            lang_code: "eng_Latn".into(),
            id: "1".into(),
            prompt: prompt.into(),
            rendered: crate::tasks::Rendered {
                id: "1".into(),
                lang_code: "eng_Latn".into(),
                context: prompt.into(),
                answer: None,
                choices: vec!["a".into(), "b".into()],
                gold: Some(gold),
            },
            target: None,
        };
        let fp = |ctx: &str, adapter: &str, it: &Item| {
            group_fingerprint(ctx, ("cell", adapter), ("toy", "1"), "eng_Latn", &[it]).unwrap()
        };
        let base = fp("c", "base", &item("p", 0));
        assert_eq!(base, fp("c", "base", &item("p", 0)));
        assert_ne!(base, fp("c2", "base", &item("p", 0)));
        assert_ne!(base, fp("c", "d41d", &item("p", 0)));
        assert_ne!(base, fp("c", "base", &item("q", 0)));
        assert_ne!(base, fp("c", "base", &item("p", 1)));
    }
}
