//! Raw configuration inputs, merged in one place: a struct's defaults, then TOML tables (a
//! config file, an experiment's `[train]` or `[method.X]` section, a search candidate), then
//! command-line flags, then `--set KEY=VALUE` pairs, each value tagged with where it came from.
//! [`Layers::resolve`] turns them into the typed struct, later layers winning, and reports every
//! unknown key and every value of the wrong type at once, each with its source and key
//! (`benchmarks/x.toml [train]: unknown key `lr_inner` (did you mean inner_lr?)`).
//!
//! The known keys are the fields of the struct's serialised defaults plus the optional ones it
//! names (fields left out of its serialisation when unset).

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Where a raw value came from, as messages name it.
#[derive(Debug, Clone, PartialEq)]
pub struct Source(pub String);

impl Source {
    /// A table of a file: `path` or `path [section]`.
    pub fn file(path: &std::path::Path, section: Option<&str>) -> Source {
        match section {
            Some(s) => Source(format!("{} [{s}]", path.display())),
            None => Source(path.display().to_string()),
        }
    }
}

/// Raw key-value inputs in the order they apply.
#[derive(Debug, Clone, Default)]
pub struct Layers {
    entries: Vec<(Source, String, Value)>,
    problems: Vec<String>,
}

impl Layers {
    pub fn new() -> Layers {
        Layers::default()
    }

    /// Every key of a TOML table (a NaN or infinite number anywhere in a value is refused).
    pub fn table(&mut self, source: &Source, t: &toml::Table) -> &mut Layers {
        for (k, v) in t {
            match toml_to_json(k, v) {
                Ok(j) => self.entries.push((source.clone(), k.clone(), j)),
                Err(m) => self.problems.push(format!("{}: {m}", source.0)),
            }
        }
        self
    }

    /// One value set by the program or a flag.
    pub fn value(&mut self, source: &str, key: &str, v: impl Into<Value>) -> &mut Layers {
        self.entries
            .push((Source(source.into()), key.into(), v.into()));
        self
    }

    /// `KEY=VALUE` pairs from `--set`: the value is read as TOML (`5`, `1e-4`, `true`,
    /// `["a", "b"]`), else taken as a string; `-` in a key reads as `_`.
    pub fn set_pairs(&mut self, pairs: &[String]) -> &mut Layers {
        for kv in pairs {
            let Some((k, raw)) = kv.split_once('=') else {
                self.problems
                    .push(format!("--set `{kv}`: expected KEY=VALUE"));
                continue;
            };
            let k = k.trim().replace('-', "_");
            let parsed = match toml::from_str::<toml::Table>(&format!("x = {raw}")) {
                Ok(t) => toml_to_json(&k, &t["x"]),
                Err(_) => Ok(raw.trim().into()),
            };
            match parsed {
                Ok(j) => self.entries.push((Source("--set".into()), k, j)),
                Err(m) => self.problems.push(format!("--set {m}")),
            }
        }
        self
    }

    /// The keys `source` (a flag name such as `--set`, or a file's source) set, in order.
    pub fn keys_set_by(&self, source: &str) -> Vec<&str> {
        self.entries
            .iter()
            .filter(|(s, _, _)| s.0 == source)
            .map(|(_, k, _)| k.as_str())
            .collect()
    }

    /// The typed value: defaults, then every layer in order. Unknown keys (with the closest
    /// known ones suggested), values of the wrong type and the problems met while layering are
    /// all reported together under `context`.
    pub fn resolve<T: Serialize + DeserializeOwned + Default>(
        &self,
        context: &str,
        optional: &[&str],
    ) -> Result<T> {
        let defaults = match serde_json::to_value(T::default())? {
            Value::Object(o) => o,
            _ => return Err(Error::Internal("defaults are not a table".into())),
        };
        let known: Vec<&str> = defaults
            .keys()
            .map(String::as_str)
            .chain(optional.iter().copied())
            .collect();
        let mut problems = self.problems.clone();
        let mut merged = defaults.clone();
        for (src, key, v) in &self.entries {
            if !known.contains(&key.as_str()) {
                problems.push(format!(
                    "{}: unknown key `{key}`{}",
                    src.0,
                    hint(key, &known)
                ));
                continue;
            }
            if let Err(e) = typed::<T>(&defaults, key, v) {
                problems.push(format!("{}: `{key}` = {v}: {e}", src.0));
                continue;
            }
            merged.insert(key.clone(), v.clone());
        }
        if !problems.is_empty() {
            return Err(Error::Problems {
                context: context.into(),
                problems,
            });
        }
        serde_json::from_value(Value::Object(merged)).map_err(|e| Error::Problems {
            context: context.into(),
            problems: vec![e.to_string()],
        })
    }
}

/// Whether `key = v` alone, over the defaults, reads as a `T`.
fn typed<T: DeserializeOwned>(
    defaults: &Map<String, Value>,
    key: &str,
    v: &Value,
) -> std::result::Result<T, serde_json::Error> {
    let mut one = defaults.clone();
    one.insert(key.into(), v.clone());
    serde_json::from_value(Value::Object(one))
}

/// ` (did you mean x?)` for the closest known key, or nothing.
fn hint(key: &str, known: &[&str]) -> String {
    crate::util::suggestions(key, known.iter().copied())
        .first()
        .map(|s| format!(" (did you mean {s}?)"))
        .unwrap_or_default()
}

/// A TOML value as JSON, refusing what JSON would silently turn into `null` (a NaN or
/// infinite float, anywhere inside the value); the message names `key`.
pub fn toml_to_json(key: &str, v: &toml::Value) -> std::result::Result<Value, String> {
    fn finite(v: &toml::Value) -> bool {
        match v {
            toml::Value::Float(f) => f.is_finite(),
            toml::Value::Array(a) => a.iter().all(finite),
            toml::Value::Table(t) => t.values().all(finite),
            _ => true,
        }
    }
    if !finite(v) {
        return Err(format!("`{key}` = {v} is not a finite number"));
    }
    serde_json::to_value(v).map_err(|e| format!("`{key}`: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Conf {
        lr: f64,
        steps: usize,
        name: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        extra: Option<u32>,
    }
    impl Default for Conf {
        fn default() -> Conf {
            Conf {
                lr: 1e-3,
                steps: 10,
                name: "a".into(),
                extra: None,
            }
        }
    }

    fn table(s: &str) -> toml::Table {
        toml::from_str(s).unwrap()
    }

    #[test]
    fn later_layers_win_and_set_pairs_read_as_toml() {
        let mut l = Layers::new();
        l.table(&Source("f.toml".into()), &table("lr = 0.5\nsteps = 3"))
            .value("--name", "name", "b")
            .set_pairs(&["steps=7".into(), "extra=2".into()]);
        let c: Conf = l.resolve("conf", &["extra"]).unwrap();
        assert_eq!(
            c,
            Conf {
                lr: 0.5,
                steps: 7,
                name: "b".into(),
                extra: Some(2)
            }
        );
    }

    #[test]
    fn every_unknown_key_and_wrong_type_is_reported_at_once_with_its_source() {
        let mut l = Layers::new();
        l.table(
            &Source("f.toml [train]".into()),
            &table("lr = \"fast\"\nstesp = 3\nsteps = nan"),
        )
        .set_pairs(&["nme=x".into(), "novalue".into()]);
        let e = l.resolve::<Conf>("conf", &[]).unwrap_err().to_string();
        for want in [
            "f.toml [train]: `lr` = \"fast\"",
            "f.toml [train]: unknown key `stesp` (did you mean steps?)",
            "`steps` = nan is not a finite number",
            "--set: unknown key `nme` (did you mean name?)",
            "--set `novalue`: expected KEY=VALUE",
        ] {
            assert!(e.contains(want), "missing `{want}` in:\n{e}");
        }
    }
}
