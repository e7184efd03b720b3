//! Converters from the raw published files (`shared/data/<dataset>/...`) to the canonical schema
//! ([`super::schema`]), plus the manifest that records every source file's sha256.
//!
//! In: the raw data folder. Out: `<out>/<task>.parquet` for each dataset and
//! `<out>/manifest.json`, all written atomically.
//!
//! Cleaning rules (each from the dataset README's list of quirks):
//! - every text is trimmed of leading/trailing whitespace; literal `\n` sequences are kept;
//! - SIB-200, NusaX: RFC-4180 quoting (a real CSV reader);
//! - AfriSenti: read with quoting off; test tweets wrapped in `"..."` lose the outer pair, then
//!   `""` becomes `"` everywhere;
//! - XCOPA: `question` (cause/effect) is taken from Estonian (`et`) by split and idx, because
//!   several languages carry wrong values (th says `effect` everywhere);
//! - MGSM: thousands separators are removed from answers; the 8 chain-of-thought exemplars per
//!   language form the `exemplars` split, with their "Question:" / "Step-by-Step Answer:"
//!   labels removed (the task spec's prompt variables carry them per language).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};

use super::lang;
use super::schema::{self, Example};
use crate::error::{Error, Result};
use crate::util::{sha256_hex, write_bytes_atomic};

/// Names of the datasets mlbench imports, which are also task names.
pub const DATASETS: &[&str] = &["sib200", "nusax", "afrisenti", "xcopa", "mgsm"];

/// One source file as recorded in the manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SourceFile {
    /// Path relative to the source root.
    pub path: String,
    pub sha256: String,
    pub bytes: u64,
}

/// One converted dataset as recorded in the manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DatasetEntry {
    pub file: String,
    pub sha256: String,
    pub rows: usize,
    pub languages: usize,
    pub sources: Vec<SourceFile>,
}

/// `datasets/manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub schema_version: u32,
    pub mlbench_version: String,
    pub datasets: BTreeMap<String, DatasetEntry>,
}

impl Manifest {
    /// Reads a manifest, or returns an empty one when the file does not exist.
    pub fn read_or_default(path: &Path) -> Result<Self> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| Error::Config {
                path: path.to_path_buf(),
                message: format!("not a dataset manifest: {e}"),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Manifest {
                schema_version: schema::SCHEMA_VERSION,
                mlbench_version: env!("CARGO_PKG_VERSION").into(),
                datasets: BTreeMap::new(),
            }),
            Err(e) => Err(Error::io("read", path, e)),
        }
    }
}

/// Reads source files while remembering their hashes.
struct Sources<'a> {
    root: &'a Path,
    files: Vec<SourceFile>,
}

impl<'a> Sources<'a> {
    fn new(root: &'a Path) -> Self {
        Sources {
            root,
            files: Vec::new(),
        }
    }

    fn read(&mut self, rel: &str) -> Result<String> {
        let p = self.root.join(rel);
        let bytes =
            std::fs::read(&p).map_err(|e| Error::missing_or_io("source file", "read", &p, e))?;
        self.files.push(SourceFile {
            path: rel.to_string(),
            sha256: sha256_hex(&bytes),
            bytes: bytes.len() as u64,
        });
        String::from_utf8(bytes).map_err(|e| Error::BadSource {
            path: p,
            line: 0,
            message: format!("not UTF-8 ({e})"),
        })
    }

    fn list_dir(&self, rel: &str) -> Result<Vec<String>> {
        let p = self.root.join(rel);
        let rd = std::fs::read_dir(&p)
            .map_err(|e| Error::missing_or_io("source folder", "read", &p, e))?;
        let mut names: Vec<String> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        Ok(names)
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }
}

fn clean(s: &str) -> String {
    s.trim().to_string()
}

fn nonempty(text: String, path: &Path, line: usize) -> Result<String> {
    if text.is_empty() {
        return Err(Error::BadSource {
            path: path.to_path_buf(),
            line,
            message: "empty text".into(),
        });
    }
    Ok(text)
}

/// Converts one dataset. Returns its examples (in a stable order) and the source files read.
pub fn convert(
    dataset: &str,
    root: &Path,
    pb: &ProgressBar,
) -> Result<(Vec<Example>, Vec<SourceFile>)> {
    let mut src = Sources::new(root);
    let rows = match dataset {
        "sib200" => sib200(&mut src, pb)?,
        "nusax" => nusax(&mut src, pb)?,
        "afrisenti" => afrisenti(&mut src, pb)?,
        "xcopa" => xcopa(&mut src, pb)?,
        "mgsm" => mgsm(&mut src, pb)?,
        other => {
            return Err(Error::Unknown {
                kind: "dataset",
                code: other.to_string(),
                scope: String::new(),
                suggestions: crate::util::suggestions(other, DATASETS.iter().copied()),
            })
        }
    };
    Ok((rows, src.files))
}

fn sib200(src: &mut Sources, pb: &ProgressBar) -> Result<Vec<Example>> {
    let langs = src.list_dir("sib200/raw")?;
    pb.set_length(langs.len() as u64);
    let mut out = Vec::with_capacity(langs.len() * 1004);
    for code in &langs {
        if !schema::is_lang_code(code) {
            return Err(Error::BadSource {
                path: src.path(&format!("sib200/raw/{code}")),
                line: 0,
                message: format!("folder name `{code}` is not a FLORES-200 code like eng_Latn"),
            });
        }
        let labels_rel = format!("sib200/raw/{code}/labels.txt");
        let labels: Vec<String> = src
            .read(&labels_rel)?
            .lines()
            .map(clean)
            .filter(|l| !l.is_empty())
            .collect();
        for split in ["train", "dev", "test"] {
            let rel = format!("sib200/raw/{code}/{split}.tsv");
            let path = src.path(&rel);
            let body = src.read(&rel)?;
            let mut rdr = csv::ReaderBuilder::new()
                .delimiter(b'\t')
                .has_headers(true)
                .from_reader(body.as_bytes());
            let headers = rdr.headers().map_err(|e| csv_err(&path, e))?.clone();
            let want = ["index_id", "category", "text"];
            if headers.iter().collect::<Vec<_>>() != want {
                return Err(Error::BadSource {
                    path,
                    line: 1,
                    message: format!(
                        "header is {:?}, expected {:?}",
                        headers.iter().collect::<Vec<_>>(),
                        want
                    ),
                });
            }
            for rec in rdr.records() {
                let rec = rec.map_err(|e| csv_err(&path, e))?;
                let line = rec.position().map(|p| p.line() as usize).unwrap_or(0);
                let (id, cat, text) = (&rec[0], &rec[1], &rec[2]);
                let label =
                    labels
                        .iter()
                        .position(|l| l == cat)
                        .ok_or_else(|| Error::BadSource {
                            path: path.clone(),
                            line,
                            message: format!("category `{cat}` is not in {labels_rel}"),
                        })?;
                out.push(Example {
                    task: "sib200".into(),
                    lang: code.clone(),
                    lang_code: code.clone(),
                    split: split.into(),
                    id: id.trim().to_string(),
                    text: nonempty(clean(text), &path, line)?,
                    choices: Some(labels.clone()),
                    label: Some(label as i64),
                    ..Default::default()
                });
            }
        }
        pb.inc(1);
    }
    Ok(out)
}

fn csv_err(path: &Path, e: csv::Error) -> Error {
    let line = e.position().map(|p| p.line() as usize).unwrap_or(0);
    Error::BadSource {
        path: path.to_path_buf(),
        line,
        message: e.to_string(),
    }
}

const SENTIMENT: [&str; 3] = ["negative", "neutral", "positive"];

fn sentiment_label(s: &str, path: &Path, line: usize) -> Result<i64> {
    SENTIMENT
        .iter()
        .position(|l| *l == s.trim())
        .map(|i| i as i64)
        .ok_or_else(|| Error::BadSource {
            path: path.to_path_buf(),
            line,
            message: format!("label `{s}` is not one of {SENTIMENT:?}"),
        })
}

fn nusax(src: &mut Sources, pb: &ProgressBar) -> Result<Vec<Example>> {
    let folders: Vec<String> = src
        .list_dir("nusax/raw")?
        .into_iter()
        .filter(|f| !f.contains('.'))
        .collect();
    pb.set_length(folders.len() as u64);
    let mut out = Vec::new();
    for folder in &folders {
        let code = lang::lookup(lang::NUSAX, folder).ok_or_else(|| Error::BadSource {
            path: src.path(&format!("nusax/raw/{folder}")),
            line: 0,
            message: format!("unknown NusaX language folder `{folder}`"),
        })?;
        for (file, split) in [("train", "train"), ("valid", "dev"), ("test", "test")] {
            let rel = format!("nusax/raw/{folder}/{file}.csv");
            let path = src.path(&rel);
            let body = src.read(&rel)?;
            let mut rdr = csv::ReaderBuilder::new()
                .has_headers(true)
                .from_reader(body.as_bytes());
            let headers = rdr.headers().map_err(|e| csv_err(&path, e))?.clone();
            if headers.iter().collect::<Vec<_>>() != ["id", "text", "label"] {
                return Err(Error::BadSource {
                    path,
                    line: 1,
                    message: "header is not id,text,label".into(),
                });
            }
            for rec in rdr.records() {
                let rec = rec.map_err(|e| csv_err(&path, e))?;
                let line = rec.position().map(|p| p.line() as usize).unwrap_or(0);
                out.push(Example {
                    task: "nusax".into(),
                    lang: folder.clone(),
                    lang_code: code.into(),
                    split: split.into(),
                    id: format!("{split}-{}", rec[0].trim()),
                    text: nonempty(clean(&rec[1]), &path, line)?,
                    choices: Some(SENTIMENT.iter().map(|s| s.to_string()).collect()),
                    label: Some(sentiment_label(&rec[2], &path, line)?),
                    ..Default::default()
                });
            }
        }
        pb.inc(1);
    }
    Ok(out)
}

/// AfriSenti tweet cleaning (see the module doc).
pub fn afrisenti_text(raw: &str, test_split: bool) -> String {
    let mut t = raw;
    if test_split && t.len() >= 2 && t.starts_with('"') && t.ends_with('"') {
        t = &t[1..t.len() - 1];
    }
    t.replace("\"\"", "\"").trim().to_string()
}

fn afrisenti(src: &mut Sources, pb: &ProgressBar) -> Result<Vec<Example>> {
    pb.set_length(lang::AFRISENTI.len() as u64);
    let mut out = Vec::new();
    for (code, norm) in lang::AFRISENTI {
        for split in ["train", "dev", "test"] {
            let rel = format!("afrisenti/raw/{split}/{code}_{split}.tsv");
            let path = src.path(&rel);
            let body = src.read(&rel)?;
            let mut lines = body.lines().enumerate();
            match lines.next() {
                Some((_, h)) if h.trim_end_matches('\r') == "ID\ttweet\tlabel" => {}
                _ => {
                    return Err(Error::BadSource {
                        path,
                        line: 1,
                        message: "header is not ID<TAB>tweet<TAB>label".into(),
                    })
                }
            }
            for (i, l) in lines {
                let line = i + 1;
                let l = l.trim_end_matches('\r');
                if l.is_empty() {
                    continue;
                }
                let f: Vec<&str> = l.split('\t').collect();
                if f.len() != 3 {
                    return Err(Error::BadSource {
                        path,
                        line,
                        message: format!("expected 3 tab-separated fields, found {}", f.len()),
                    });
                }
                out.push(Example {
                    task: "afrisenti".into(),
                    lang: (*code).into(),
                    lang_code: (*norm).into(),
                    split: split.into(),
                    id: f[0].trim().to_string(),
                    text: nonempty(afrisenti_text(f[1], split == "test"), &path, line)?,
                    choices: Some(SENTIMENT.iter().map(|s| s.to_string()).collect()),
                    label: Some(sentiment_label(f[2], &path, line)?),
                    ..Default::default()
                });
            }
        }
        pb.inc(1);
    }
    Ok(out)
}

#[derive(Deserialize)]
struct XcopaRow {
    premise: String,
    choice1: String,
    choice2: String,
    question: String,
    label: i64,
    idx: i64,
}

fn xcopa_file(src: &mut Sources, code: &str, file_split: &str) -> Result<Vec<(usize, XcopaRow)>> {
    let rel = format!("xcopa/raw/{code}/{file_split}.{code}.jsonl");
    let path = src.path(&rel);
    let body = src.read(&rel)?;
    let mut rows = Vec::new();
    for (i, l) in body.lines().enumerate() {
        if l.trim().is_empty() {
            continue;
        }
        let r: XcopaRow = serde_json::from_str(l).map_err(|e| Error::BadSource {
            path: path.clone(),
            line: i + 1,
            message: format!("not an XCOPA record: {e}"),
        })?;
        rows.push((i + 1, r));
    }
    Ok(rows)
}

fn xcopa(src: &mut Sources, pb: &ProgressBar) -> Result<Vec<Example>> {
    pb.set_length(lang::XCOPA.len() as u64);
    // Reference `question` values from Estonian, by (split, idx).
    let mut reference: HashMap<(String, i64), String> = HashMap::new();
    for fs in ["val", "test"] {
        for (_, r) in xcopa_file(&mut Sources::new(src.root), "et", fs)? {
            reference.insert((fs.to_string(), r.idx), r.question);
        }
    }
    let mut out = Vec::new();
    for (code, norm) in lang::XCOPA {
        for (fs, split) in [("val", "dev"), ("test", "test")] {
            let path = src.path(&format!("xcopa/raw/{code}/{fs}.{code}.jsonl"));
            for (line, r) in xcopa_file(src, code, fs)? {
                let question = reference
                    .get(&(fs.to_string(), r.idx))
                    .cloned()
                    .ok_or_else(|| Error::BadSource {
                        path: path.clone(),
                        line,
                        message: format!(
                            "idx {} has no counterpart in the Estonian reference",
                            r.idx
                        ),
                    })?;
                if !(0..2).contains(&r.label) {
                    return Err(Error::BadSource {
                        path,
                        line,
                        message: format!("label {} is not 0 or 1", r.label),
                    });
                }
                out.push(Example {
                    task: "xcopa".into(),
                    lang: (*code).into(),
                    lang_code: (*norm).into(),
                    split: split.into(),
                    id: format!("{split}-{}", r.idx),
                    text: nonempty(clean(&r.premise), &path, line)?,
                    question: Some(question),
                    choices: Some(vec![clean(&r.choice1), clean(&r.choice2)]),
                    label: Some(r.label),
                    ..Default::default()
                });
            }
        }
        pb.inc(1);
    }
    Ok(out)
}

/// `2,125` -> `2125`; errors if the rest is not an integer.
pub fn mgsm_answer(raw: &str, path: &Path, line: usize) -> Result<String> {
    let a: String = raw.trim().chars().filter(|c| *c != ',').collect();
    if a.is_empty()
        || a.trim_start_matches('-').is_empty()
        || !a
            .trim_start_matches('-')
            .bytes()
            .all(|b| b.is_ascii_digit())
    {
        return Err(Error::BadSource {
            path: path.to_path_buf(),
            line,
            message: format!("answer `{raw}` is not an integer"),
        });
    }
    Ok(a)
}

/// Drops a leading "Question:"-style label (up to the first `:` or `：` within the first 48
/// characters, plus the spaces after it), so exemplars hold the bare question and solution like
/// the test rows; the labels live in the task spec's prompt variables.
pub fn strip_prefix_label(s: &str) -> String {
    let s = s.trim();
    let head: String = s.chars().take(48).collect();
    match head.find([':', '：']) {
        Some(pos) => {
            let colon = head[pos..].chars().next().map(char::len_utf8).unwrap_or(1);
            s[pos + colon..].trim_start().to_string()
        }
        None => s.to_string(),
    }
}

#[derive(Deserialize)]
struct MgsmExemplar {
    lang: String,
    exemplar_id: i64,
    q: String,
    a: String,
    number_answer: i64,
}

fn mgsm(src: &mut Sources, pb: &ProgressBar) -> Result<Vec<Example>> {
    pb.set_length(lang::MGSM.len() as u64 + 1);
    let mut out = Vec::new();
    for (code, norm) in lang::MGSM {
        let rel = format!("mgsm/raw/mgsm_{code}.tsv");
        let path = src.path(&rel);
        let body = src.read(&rel)?;
        for (i, l) in body.lines().enumerate() {
            let line = i + 1;
            if l.is_empty() {
                continue;
            }
            let (q, a) = l.split_once('\t').ok_or_else(|| Error::BadSource {
                path: path.clone(),
                line,
                message: "expected question<TAB>answer".into(),
            })?;
            out.push(Example {
                task: "mgsm".into(),
                lang: (*code).into(),
                lang_code: (*norm).into(),
                split: "test".into(),
                id: format!("test-{line:03}"),
                text: nonempty(clean(q), &path, line)?,
                target: Some(mgsm_answer(a, &path, line)?),
                ..Default::default()
            });
        }
        pb.inc(1);
    }
    let rel = "mgsm/derived/exemplars.jsonl";
    let path = src.path(rel);
    let body = src.read(rel)?;
    for (i, l) in body.lines().enumerate() {
        if l.trim().is_empty() {
            continue;
        }
        let e: MgsmExemplar = serde_json::from_str(l).map_err(|e| Error::BadSource {
            path: path.clone(),
            line: i + 1,
            message: format!("not an MGSM exemplar: {e}"),
        })?;
        let norm = lang::lookup(lang::MGSM, &e.lang).ok_or_else(|| Error::BadSource {
            path: path.clone(),
            line: i + 1,
            message: format!("unknown MGSM language `{}`", e.lang),
        })?;
        out.push(Example {
            task: "mgsm".into(),
            lang: e.lang.clone(),
            lang_code: norm.into(),
            split: "exemplars".into(),
            id: format!("exemplar-{}", e.exemplar_id),
            text: nonempty(strip_prefix_label(&e.q), &path, i + 1)?,
            target: Some(e.number_answer.to_string()),
            rationale: Some(strip_prefix_label(&e.a)),
            ..Default::default()
        });
    }
    pb.inc(1);
    Ok(out)
}

/// Converts `datasets` from `source` and writes `<out>/<task>.parquet` plus the manifest.
/// Every file is validated against the schema before it is written.
pub fn import(
    source: &Path,
    out: &Path,
    datasets: &[String],
    pb: &dyn Fn(&str) -> ProgressBar,
) -> Result<Manifest> {
    if !source.is_dir() {
        return Err(Error::MissingFile {
            what: "source folder",
            path: source.to_path_buf(),
        });
    }
    let manifest_path = out.join("manifest.json");
    let mut manifest = Manifest::read_or_default(&manifest_path)?;
    manifest.schema_version = schema::SCHEMA_VERSION;
    manifest.mlbench_version = env!("CARGO_PKG_VERSION").into();
    for ds in datasets {
        let bar = pb(ds);
        let (rows, sources) = convert(ds, source, &bar)?;
        bar.finish_and_clear();
        let mut df = schema::to_frame(&rows)?;
        let file = format!("{ds}.parquet");
        let path = out.join(&file);
        schema::validate(&df, &path, Some(ds))?;
        schema::write_parquet(&mut df, &path)?;
        let languages = {
            let mut l: Vec<&str> = rows.iter().map(|r| r.lang.as_str()).collect();
            l.sort_unstable();
            l.dedup();
            l.len()
        };
        tracing::info!(dataset = %ds, rows = rows.len(), languages, "imported");
        manifest.datasets.insert(
            ds.clone(),
            DatasetEntry {
                file,
                sha256: crate::util::sha256_file(&path)?,
                rows: rows.len(),
                languages,
                sources,
            },
        );
    }
    let json = serde_json::to_vec_pretty(&manifest)?;
    write_bytes_atomic(&manifest_path, &json)?;
    Ok(manifest)
}

/// One problem found by [`verify`].
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub path: String,
    pub problem: String,
}

/// Re-hashes the converted files against the manifest and, when `source` is given, every source
/// file too, and re-converts each dataset in memory to check the committed file holds exactly
/// what the converter produces. Returns the problems found (empty when all is well).
pub fn verify(
    datasets_dir: &Path,
    source: Option<&Path>,
    pb: &dyn Fn(&str) -> ProgressBar,
) -> Result<Vec<Finding>> {
    let manifest_path = datasets_dir.join("manifest.json");
    if !manifest_path.exists() {
        return Err(Error::MissingFile {
            what: "dataset manifest",
            path: manifest_path,
        });
    }
    let manifest = Manifest::read_or_default(&manifest_path)?;
    let mut findings = Vec::new();
    for (name, entry) in &manifest.datasets {
        let path = datasets_dir.join(&entry.file);
        match crate::util::sha256_file(&path) {
            Ok(h) if h == entry.sha256 => {}
            Ok(h) => findings.push(Finding {
                path: path.display().to_string(),
                problem: format!("sha256 {h} differs from the manifest's {}", entry.sha256),
            }),
            Err(e) => findings.push(Finding {
                path: path.display().to_string(),
                problem: e.to_string(),
            }),
        }
        let Some(root) = source else { continue };
        for sf in &entry.sources {
            let p = root.join(&sf.path);
            match std::fs::read(&p) {
                Ok(b) if sha256_hex(&b) == sf.sha256 => {}
                Ok(b) => findings.push(Finding {
                    path: p.display().to_string(),
                    problem: format!(
                        "source sha256 {} differs from the manifest's {}",
                        sha256_hex(&b),
                        sf.sha256
                    ),
                }),
                Err(e) => findings.push(Finding {
                    path: p.display().to_string(),
                    problem: format!("cannot read: {e}"),
                }),
            }
        }
        let bar = pb(name);
        let (rows, _) = convert(name, root, &bar)?;
        bar.finish_and_clear();
        let fresh = schema::to_frame(&rows)?;
        match schema::read_parquet(&path) {
            Ok(stored) if stored.equals_missing(&fresh) => {}
            Ok(_) => findings.push(Finding {
                path: path.display().to_string(),
                problem: "content differs from a fresh conversion of the sources".into(),
            }),
            Err(e) => findings.push(Finding {
                path: path.display().to_string(),
                problem: e.to_string(),
            }),
        }
    }
    Ok(findings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn afrisenti_quotes_are_unwrapped() {
        assert_eq!(
            afrisenti_text("\"hello \"\"x\"\" there\"", true),
            "hello \"x\" there"
        );
        assert_eq!(
            afrisenti_text("\"\"like this\"\" ok", false),
            "\"like this\" ok"
        );
        assert_eq!(afrisenti_text("  spaced  ", true), "spaced");
    }

    #[test]
    fn exemplar_labels_are_stripped() {
        assert_eq!(
            strip_prefix_label("Question : Roger a 5 balles."),
            "Roger a 5 balles."
        );
        assert_eq!(
            strip_prefix_label("问题：罗杰有 5 个网球。"),
            "罗杰有 5 个网球。"
        );
        assert_eq!(
            strip_prefix_label("Step-by-Step Answer: 5 + 6 = 11."),
            "5 + 6 = 11."
        );
    }

    #[test]
    fn mgsm_answers_lose_separators() {
        let p = Path::new("x.tsv");
        assert_eq!(mgsm_answer("2,125", p, 1).unwrap(), "2125");
        assert_eq!(mgsm_answer("18", p, 1).unwrap(), "18");
        assert!(mgsm_answer("eighteen", p, 3)
            .unwrap_err()
            .to_string()
            .contains("x.tsv:3"));
    }
}
