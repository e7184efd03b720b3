//! Task specifications: one TOML file per task (`datasets/tasks/<task>.toml`), holding the
//! prompt templates, label words (verbalizers), scoring type, metrics and a version. Users edit
//! prompts without recompiling.
//!
//! In: a TOML file. Out: a validated [`TaskSpec`], and prompts rendered from dataset rows.
//!
//! Template syntax: `{field}` or `{field|filter|...}`. Fields: the row's `text`, `question`,
//! `target`, `rationale`, `lang`, `lang_code`, `id`; `choice` (in the choice template: the option
//! being scored), `answer` (the gold label word or target), and any variable declared under
//! `[prompt.vars.<name>]`. Filters: `trim`, `lower`, `upper`, `lcfirst`, `ucfirst`,
//! `strip_period` (drops one trailing `.`, `。` or `।`). `{{` and `}}` are literal braces.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How a task is scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scoring {
    /// Log-likelihood of each choice given the context; the argmax is the prediction.
    MultipleChoice,
    /// Greedy generation, then answer extraction.
    Generate,
}

/// One metric with its direction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metric {
    pub name: String,
    pub higher_is_better: bool,
}

/// A derived variable: `key` is rendered from the row, then looked up in `values`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Var {
    pub key: String,
    pub values: BTreeMap<String, String>,
}

/// Prompt templates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prompt {
    /// The context (everything before the answer).
    pub template: String,
    /// The continuation scored for each option (multiple choice), e.g. `" {choice}"`.
    #[serde(default = "default_choice")]
    pub choice: String,
    /// The answer appended to the context for training, e.g. `" {answer}"`.
    #[serde(default = "default_answer")]
    pub answer: String,
    /// Words shown for each label (verbalizers); default: the dataset's `choices`.
    #[serde(default)]
    pub label_words: Option<Vec<String>>,
    /// Text between in-context examples.
    #[serde(default = "default_sep")]
    pub fewshot_separator: String,
    #[serde(default)]
    pub vars: BTreeMap<String, Var>,
}

fn default_choice() -> String {
    " {choice}".into()
}
fn default_answer() -> String {
    " {answer}".into()
}
fn default_sep() -> String {
    "\n\n".into()
}

/// Generation settings (for [`Scoring::Generate`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Generation {
    /// Stop strings.
    pub until: Vec<String>,
    pub max_tokens: usize,
    /// Regular expression whose last match is the extracted answer.
    pub answer_regex: String,
}

/// A task specification.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    pub name: String,
    pub version: u32,
    /// Dataset file stem under the data folder (default: the task name).
    #[serde(default)]
    pub dataset: Option<String>,
    #[serde(default)]
    pub description: String,
    pub scoring: Scoring,
    #[serde(default = "default_train")]
    pub train_split: String,
    #[serde(default = "default_eval")]
    pub eval_split: String,
    #[serde(default)]
    pub fewshot_split: Option<String>,
    pub prompt: Prompt,
    #[serde(default)]
    pub generation: Option<Generation>,
    pub metrics: Vec<Metric>,
}

fn default_train() -> String {
    "train".into()
}
fn default_eval() -> String {
    "test".into()
}

/// Row fields a template may name.
pub const ROW_FIELDS: &[&str] = &[
    "text",
    "question",
    "target",
    "rationale",
    "lang",
    "lang_code",
    "id",
];
const FILTERS: &[&str] = &[
    "trim",
    "lower",
    "upper",
    "lcfirst",
    "ucfirst",
    "strip_period",
];

/// A parsed template piece.
#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Lit(String),
    Field { name: String, filters: Vec<String> },
}

fn parse(t: &str) -> std::result::Result<Vec<Piece>, String> {
    let mut out = Vec::new();
    let mut lit = String::new();
    let mut chars = t.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                lit.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                lit.push('}');
            }
            '{' => {
                let mut inner = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(ch) => inner.push(ch),
                        None => return Err(format!("unclosed `{{` in template {t:?}")),
                    }
                }
                if !lit.is_empty() {
                    out.push(Piece::Lit(std::mem::take(&mut lit)));
                }
                let mut parts = inner.split('|').map(|s| s.trim().to_string());
                let name = parts.next().unwrap_or_default();
                if name.is_empty() {
                    return Err(format!("empty placeholder `{{}}` in template {t:?}"));
                }
                out.push(Piece::Field {
                    name,
                    filters: parts.collect(),
                });
            }
            '}' => {
                return Err(format!(
                    "stray `}}` in template {t:?} (write `}}}}` for a literal brace)"
                ))
            }
            other => lit.push(other),
        }
    }
    if !lit.is_empty() {
        out.push(Piece::Lit(lit));
    }
    Ok(out)
}

fn apply(filter: &str, s: String) -> String {
    match filter {
        "trim" => s.trim().to_string(),
        "lower" => s.to_lowercase(),
        "upper" => s.to_uppercase(),
        "lcfirst" | "ucfirst" => {
            let mut c = s.chars();
            match c.next() {
                Some(f) if filter == "lcfirst" => f.to_lowercase().chain(c).collect(),
                Some(f) => f.to_uppercase().chain(c).collect(),
                None => s,
            }
        }
        "strip_period" => {
            let t = s.trim_end();
            t.strip_suffix(['.', '。', '।']).unwrap_or(t).to_string()
        }
        _ => s,
    }
}

/// Values a template can draw on for one row.
pub trait Fields {
    /// The value of a row field or special field, `None` when the row lacks it.
    fn field(&self, name: &str) -> Option<String>;
}

impl<F: Fn(&str) -> Option<String>> Fields for F {
    fn field(&self, name: &str) -> Option<String> {
        self(name)
    }
}

impl TaskSpec {
    /// Reads and validates a spec file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::missing_or_io("task specification", "read", path, e))?;
        let spec: TaskSpec = toml::from_str(&text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        spec.validate(path)?;
        Ok(spec)
    }

    /// Loads the spec of `task` from `<data_dir>/tasks/<task>.toml`, suggesting close names.
    pub fn for_task(data_dir: &Path, task: &str) -> Result<Self> {
        let p = spec_path(data_dir, task);
        if !p.exists() {
            let known = known_specs(data_dir);
            return Err(Error::Unknown {
                kind: "task",
                code: task.to_string(),
                scope: format!(" (no {})", p.display()),
                suggestions: crate::util::suggestions(task, known.iter().map(String::as_str)),
            });
        }
        Self::load(&p)
    }

    /// The dataset file stem this task reads.
    pub fn dataset(&self) -> &str {
        self.dataset.as_deref().unwrap_or(&self.name)
    }

    /// Checks templates (syntax, field names, filters), scoring settings and metrics.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let cfg = |message: String| Error::Config {
            path: path.to_path_buf(),
            message,
        };
        if self.name.trim().is_empty() {
            return Err(cfg("`name` is empty".into()));
        }
        if self.metrics.is_empty() {
            return Err(cfg("`metrics` is empty: name at least one metric".into()));
        }
        let check = |what: &str, t: &str, extra: &[&str]| -> Result<()> {
            for p in parse(t).map_err(|m| cfg(format!("prompt.{what}: {m}")))? {
                if let Piece::Field { name, filters } = p {
                    let known = ROW_FIELDS.contains(&name.as_str())
                        || extra.contains(&name.as_str())
                        || self.prompt.vars.contains_key(&name);
                    if !known {
                        let mut all: Vec<&str> = ROW_FIELDS.iter().chain(extra).copied().collect();
                        all.extend(self.prompt.vars.keys().map(String::as_str));
                        let s = crate::util::suggestions(&name, all.iter().copied());
                        return Err(cfg(format!(
                            "prompt.{what}: unknown field `{{{name}}}`{}",
                            if s.is_empty() {
                                String::new()
                            } else {
                                format!("; did you mean {}?", s.join(", "))
                            }
                        )));
                    }
                    if let Some(f) = filters.iter().find(|f| !FILTERS.contains(&f.as_str())) {
                        return Err(cfg(format!(
                            "prompt.{what}: unknown filter `{f}` (known: {})",
                            FILTERS.join(", ")
                        )));
                    }
                }
            }
            Ok(())
        };
        check("template", &self.prompt.template, &["answer"])?;
        check("choice", &self.prompt.choice, &["choice", "answer"])?;
        check("answer", &self.prompt.answer, &["answer"])?;
        for (name, v) in &self.prompt.vars {
            if ROW_FIELDS.contains(&name.as_str()) {
                return Err(cfg(format!("prompt.vars.{name} shadows a row field")));
            }
            check(&format!("vars.{name}.key"), &v.key, &[])?;
        }
        match (self.scoring, &self.generation) {
            (Scoring::Generate, None) => {
                return Err(cfg(
                    "scoring = \"generate\" needs a [generation] table".into()
                ))
            }
            (Scoring::Generate, Some(g)) if g.max_tokens == 0 => {
                return Err(cfg("generation.max_tokens must be at least 1".into()))
            }
            _ => {}
        }
        Ok(())
    }

    /// The field names a template of this spec reads from the data (for checking a dataset has
    /// them before a run starts).
    pub fn row_fields_used(&self) -> Vec<String> {
        self.fields_used(true)
    }

    /// The fields an evaluated example needs: those of the prompt and choice templates (the
    /// answer template is for training examples and in-context shots only).
    pub fn eval_fields_used(&self) -> Vec<String> {
        self.fields_used(false)
    }

    fn fields_used(&self, with_answer: bool) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let mut ts = vec![&self.prompt.template, &self.prompt.choice];
        if with_answer {
            ts.push(&self.prompt.answer);
        }
        ts.extend(self.prompt.vars.values().map(|v| &v.key));
        for t in ts {
            for p in parse(t).unwrap_or_default() {
                if let Piece::Field { name, .. } = p {
                    if ROW_FIELDS.contains(&name.as_str()) && !out.contains(&name) {
                        out.push(name);
                    }
                }
            }
        }
        out
    }

    /// Renders a template against a row. Missing fields are an error naming the field.
    pub fn render(&self, template: &str, row: &dyn Fields) -> Result<String> {
        let pieces = parse(template).map_err(Error::Invalid)?;
        let mut out = String::new();
        for p in pieces {
            match p {
                Piece::Lit(s) => out.push_str(&s),
                Piece::Field { name, filters } => {
                    let v = if let Some(var) = self.prompt.vars.get(&name) {
                        let key = self.render(&var.key, row)?;
                        var.values.get(&key).cloned().ok_or_else(|| {
                            Error::Invalid(format!(
                                "task `{}`: prompt.vars.{name} has no value for key `{key}`",
                                self.name
                            ))
                        })?
                    } else {
                        row.field(&name).ok_or_else(|| {
                            Error::Invalid(format!(
                                "task `{}`: the row has no value for template field `{name}`",
                                self.name
                            ))
                        })?
                    };
                    out.push_str(&filters.iter().fold(v, |acc, f| apply(f, acc)));
                }
            }
        }
        Ok(out)
    }
}

/// One example rendered through a spec: what training and scoring consume.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub id: String,
    pub lang_code: String,
    /// The prompt (everything before the answer).
    pub context: String,
    /// The gold continuation (the `answer` template), when the example has a gold answer.
    pub answer: Option<String>,
    /// The scored continuation of every option (multiple choice; empty for generation).
    pub choices: Vec<String>,
    /// Index of the gold option in `choices`.
    pub gold: Option<usize>,
}

impl Fields for crate::data::schema::Example {
    fn field(&self, name: &str) -> Option<String> {
        match name {
            "text" => Some(self.text.clone()),
            "question" => self.question.clone(),
            "target" => self.target.clone(),
            "rationale" => self.rationale.clone(),
            "lang" => Some(self.lang.clone()),
            "lang_code" => Some(self.lang_code.clone()),
            "id" => Some(self.id.clone()),
            _ => None,
        }
    }
}

impl TaskSpec {
    /// The option words of an example: the spec's label words, else the example's choices.
    pub fn option_words(&self, ex: &crate::data::schema::Example) -> Vec<String> {
        self.prompt
            .label_words
            .clone()
            .or_else(|| ex.choices.clone())
            .unwrap_or_default()
    }

    /// Renders the context, gold answer and (for multiple choice) every option's continuation.
    /// Errors name the example when its label is outside the options.
    pub fn render_example(&self, ex: &crate::data::schema::Example) -> Result<Rendered> {
        self.render_example_with(ex, true)
    }

    /// [`TaskSpec::render_example`] for an evaluated example: the answer (only used for
    /// training and shots) is left out when the example lacks its fields, as MGSM test
    /// problems lack the exemplars' worked rationales.
    pub fn render_eval_example(&self, ex: &crate::data::schema::Example) -> Result<Rendered> {
        self.render_example_with(ex, false)
    }

    fn render_example_with(
        &self,
        ex: &crate::data::schema::Example,
        need_answer: bool,
    ) -> Result<Rendered> {
        let words = self.option_words(ex);
        let gold = match ex.label {
            Some(y) if y < 0 || y as usize >= words.len() => {
                return Err(Error::Invalid(format!(
                    "task `{}`: example `{}` ({}) has label {y} but only {} options",
                    self.name,
                    ex.id,
                    ex.lang_code,
                    words.len()
                )))
            }
            Some(y) => Some(y as usize),
            None => None,
        };
        let answer_word = match gold {
            Some(y) => Some(words[y].clone()),
            None => ex.target.clone(),
        };
        let with = |extra: &[(&str, Option<String>)]| {
            let extra: Vec<(String, Option<String>)> = extra
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect();
            move |name: &str| -> Option<String> {
                match extra.iter().find(|(k, _)| k == name) {
                    Some((_, v)) => v.clone(),
                    None => ex.field(name),
                }
            }
        };
        let base = with(&[("answer", answer_word.clone())]);
        let context = self.render(&self.prompt.template, &base)?;
        let answer = match &answer_word {
            Some(_) if need_answer => Some(self.render(&self.prompt.answer, &base)?),
            Some(_) => self.render(&self.prompt.answer, &base).ok(),
            None => None,
        };
        let choices = if self.scoring == Scoring::MultipleChoice {
            words
                .iter()
                .map(|w| {
                    let f = with(&[("answer", answer_word.clone()), ("choice", Some(w.clone()))]);
                    self.render(&self.prompt.choice, &f)
                })
                .collect::<Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        Ok(Rendered {
            id: ex.id.clone(),
            lang_code: ex.lang_code.clone(),
            context,
            answer,
            choices,
            gold,
        })
    }
}

/// A task opened for a run: its spec, its dataset file and the languages the run asked for.
#[derive(Debug, Clone)]
pub struct OpenedTask {
    pub name: String,
    pub spec: TaskSpec,
    pub path: PathBuf,
    pub langs: Vec<crate::data::lang::LangEntry>,
}

/// Opens each of `tasks` (spec, dataset file, languages from `langs`, where `task:code` scopes a
/// code to one task). Problems (unknown task, missing dataset, unknown or missing language) are
/// appended to `problems` so callers can report all of them at once; a task with a problem that
/// leaves nothing to check is skipped.
pub fn open_tasks(
    data_dir: &Path,
    tasks: &[String],
    langs: &[String],
    problems: &mut Vec<String>,
) -> Result<Vec<OpenedTask>> {
    use crate::data::{catalogue, lang};
    let mut out = Vec::new();
    for task in tasks {
        let spec = match TaskSpec::for_task(data_dir, task) {
            Ok(s) => s,
            Err(e) => {
                problems.push(e.to_string());
                continue;
            }
        };
        let path = match catalogue::dataset_path(data_dir, spec.dataset()) {
            Ok(p) => p,
            Err(e) => {
                problems.push(e.to_string());
                continue;
            }
        };
        let entries = catalogue::task_languages(&path)?;
        let codes = catalogue::codes_for(task, langs);
        if codes.is_empty() {
            problems.push(format!("no language given for task `{task}`"));
            continue;
        }
        let chosen = lang::resolve_each(task, &codes, &entries, problems)
            .into_iter()
            .cloned()
            .collect();
        out.push(OpenedTask {
            name: task.clone(),
            spec,
            path,
            langs: chosen,
        });
    }
    Ok(out)
}

/// Where a task's spec lives.
pub fn spec_path(data_dir: &Path, task: &str) -> PathBuf {
    data_dir.join("tasks").join(format!("{task}.toml"))
}

/// Task names with a spec file, sorted.
pub fn known_specs(data_dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(data_dir.join("tasks"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .strip_suffix(".toml")
                        .map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(template: &str) -> String {
        format!(
            r#"
name = "t"
version = 1
scoring = "multiple_choice"
metrics = [{{ name = "acc", higher_is_better = true }}]
[prompt]
template = "{template}"
[prompt.vars.connector]
key = "{{question}}"
values = {{ cause = "because", effect = "therefore" }}
"#
        )
    }

    fn parse_spec(s: &str) -> Result<TaskSpec> {
        let spec: TaskSpec = toml::from_str(s).map_err(|e| Error::Invalid(e.to_string()))?;
        spec.validate(Path::new("t.toml"))?;
        Ok(spec)
    }

    #[test]
    fn renders_fields_vars_and_filters() {
        let s = parse_spec(&spec("{text|strip_period} {connector}")).unwrap();
        let row = |n: &str| match n {
            "text" => Some("The man fell.".to_string()),
            "question" => Some("cause".to_string()),
            _ => None,
        };
        assert_eq!(
            s.render(&s.prompt.template, &row).unwrap(),
            "The man fell because"
        );
        assert_eq!(
            s.render("{{x}} {text|lower|lcfirst}", &row).unwrap(),
            "{x} the man fell."
        );
        assert_eq!(
            s.row_fields_used(),
            vec!["text".to_string(), "question".to_string()]
        );
    }

    #[test]
    fn unknown_field_is_named_with_suggestion() {
        let e = parse_spec(&spec("{txet}")).unwrap_err().to_string();
        assert!(
            e.contains("unknown field `{txet}`") && e.contains("did you mean text"),
            "{e}"
        );
        let e = parse_spec(&spec("{text|shout}")).unwrap_err().to_string();
        assert!(e.contains("unknown filter `shout`"), "{e}");
        let e = parse_spec(&spec("{text")).unwrap_err().to_string();
        assert!(e.contains("unclosed"), "{e}");
    }

    #[test]
    fn missing_row_value_is_an_error() {
        let s = parse_spec(&spec("{rationale}")).unwrap();
        let row = |_: &str| None;
        let e = s.render(&s.prompt.template, &row).unwrap_err().to_string();
        assert!(e.contains("rationale"), "{e}");
    }
}
