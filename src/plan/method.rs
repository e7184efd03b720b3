//! The methods a grid compares, as one enum: a name in (from a flag, a TOML file, `--set`, an
//! experiment's `methods` list or a store's `method` column), a [`Method`] out. This is the only
//! place a method name is parsed; everything after resolution matches on the enum.
//!
//! Names are those of `../shared/docs/method.md`; `meta-lora-k` and `meta-lora-k+tta` (the
//! names of its method table) are read as `meta-lora` and `meta-lora+tta`. Serialised, a
//! method is its canonical name, so configurations and manifests read as before.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};

/// A method of a comparison (see `method.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Method {
    /// The untrained model (evaluated only; never trained).
    Base,
    /// One shared LoRA on the union of all tasks' full train splits.
    LoraFull,
    /// One shared LoRA on the union of the K-example pools.
    LoraK,
    /// One LoRA per task on its K-example pool.
    LoraPerTaskK,
    /// MeTA-LoRA (first-order, two stages): the shared adapter.
    MetaLora,
    /// MeTA-LoRA, then every task's adapter adapted on its pool for `inner_steps` steps.
    MetaLoraTta,
    /// Ablation: per-task adapters from the LoRA init, `inner_steps` stage-1 steps on the pool.
    Stage1Only,
    /// Ablation: MeTA-LoRA with `inner_steps = 0` (multi-task LoRA on query batches): the same
    /// meta-batches, query sets and number of outer steps as `meta-lora` at the same settings,
    /// the support sets drawn and left unused.
    Stage2Only,
}

/// Every method with its name, in the order tables list them.
pub const METHODS: &[(&str, Method)] = &[
    ("base", Method::Base),
    ("lora-full", Method::LoraFull),
    ("lora-k", Method::LoraK),
    ("lora-per-task-k", Method::LoraPerTaskK),
    ("meta-lora", Method::MetaLora),
    ("meta-lora+tta", Method::MetaLoraTta),
    ("stage1-only", Method::Stage1Only),
    ("stage2-only", Method::Stage2Only),
];

impl Method {
    /// Parses a method name; an unknown one is an error listing the known names with the
    /// closest ones suggested.
    pub fn parse(s: &str) -> Result<Method> {
        let s = match s {
            "meta-lora-k" => "meta-lora",
            "meta-lora-k+tta" => "meta-lora+tta",
            other => other,
        };
        METHODS
            .iter()
            .find(|(n, _)| *n == s)
            .map(|(_, m)| *m)
            .ok_or_else(|| Error::Unknown {
                kind: "method",
                code: s.to_string(),
                scope: format!(
                    " (known: {})",
                    METHODS
                        .iter()
                        .map(|(n, _)| *n)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                suggestions: crate::util::suggestions(s, METHODS.iter().map(|(n, _)| *n)),
            })
    }

    /// The canonical name.
    pub fn name(self) -> &'static str {
        METHODS
            .iter()
            .find(|(_, m)| *m == self)
            .map(|(n, _)| *n)
            .expect("every method is listed")
    }

    /// Trains an adapter (everything except `base`).
    pub fn trains(self) -> bool {
        self != Method::Base
    }

    /// Trains on K-example pools, so a grid runs it once per budget (every training method
    /// except `lora-full`).
    pub fn uses_pools(self) -> bool {
        !matches!(self, Method::Base | Method::LoraFull)
    }

    /// Runs the meta-learning loop.
    pub fn is_meta(self) -> bool {
        matches!(
            self,
            Method::MetaLora | Method::MetaLoraTta | Method::Stage2Only
        )
    }

    /// Writes one adapter per task.
    pub fn per_task(self) -> bool {
        matches!(
            self,
            Method::LoraPerTaskK | Method::Stage1Only | Method::MetaLoraTta
        )
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Method {
    type Err = Error;
    fn from_str(s: &str) -> Result<Method> {
        Method::parse(s)
    }
}

impl Serialize for Method {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Method {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Method, D::Error> {
        let s = String::deserialize(d)?;
        Method::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_aliases_read_as_the_canonical_method() {
        for (n, m) in METHODS {
            assert_eq!(Method::parse(n).unwrap(), *m);
            assert_eq!(m.name(), *n);
            let json = serde_json::to_string(m).unwrap();
            assert_eq!(json, format!("\"{n}\""));
            assert_eq!(serde_json::from_str::<Method>(&json).unwrap(), *m);
        }
        assert_eq!(Method::parse("meta-lora-k").unwrap(), Method::MetaLora);
        assert_eq!(
            Method::parse("meta-lora-k+tta").unwrap(),
            Method::MetaLoraTta
        );
    }

    #[test]
    fn a_misspelt_method_is_refused_with_a_suggestion() {
        let e = Method::parse("meta-lroa").unwrap_err().to_string();
        assert!(e.contains("meta-lroa") && e.contains("meta-lora"), "{e}");
        let e = serde_json::from_str::<Method>("\"lora_k\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("lora_k") && e.contains("lora-k"), "{e}");
    }

    #[test]
    fn only_base_does_not_train_and_only_pool_methods_take_a_budget() {
        assert!(!Method::Base.trains() && !Method::Base.uses_pools());
        assert!(Method::LoraFull.trains() && !Method::LoraFull.uses_pools());
        assert!(METHODS[2..].iter().all(|(_, m)| m.uses_pools()));
    }
}
