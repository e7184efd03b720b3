//! The canonical dataset schema: one row per example, one Parquet file per task
//! (`datasets/<task>.parquet`).
//!
//! | column      | type          | null | meaning |
//! |-------------|---------------|------|---------|
//! | `task`      | string        | no   | task name, e.g. `sib200` |
//! | `lang`      | string        | no   | the dataset's own language code (`sw`, `english`, `swh_Latn`) |
//! | `lang_code` | string        | no   | normalised code, ISO 639-3 + script (`swh_Latn`) |
//! | `split`     | string        | no   | `train`, `dev`, `test` (or `exemplars` for MGSM) |
//! | `id`        | string        | no   | stable id, unique within (task, lang); equal across languages for parallel items |
//! | `text`      | string        | no   | the main input (sentence, tweet, premise, question); never empty |
//! | `question`  | string        | yes  | a second input field (XCOPA: `cause` or `effect`) |
//! | `choices`   | list\[string\]  | yes  | answer options (class names or alternatives) |
//! | `label`     | int64         | yes  | index of the gold choice in `choices` |
//! | `target`    | string        | yes  | gold answer of generation tasks (MGSM: the integer) |
//! | `rationale` | string        | yes  | worked solution for few-shot exemplars (MGSM) |
//!
//! In: a Parquet file. Out: a validated [`polars::prelude::DataFrame`] or a typed error naming
//! the file, column and row.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use polars::prelude::*;

use crate::error::{Error, Result};
use crate::util::write_atomic;

/// Version of the schema above, recorded in the dataset manifest.
pub const SCHEMA_VERSION: u32 = 1;

/// Columns that must be present, with their types.
pub const COLUMNS: &[(&str, &str)] = &[
    ("task", "str"),
    ("lang", "str"),
    ("lang_code", "str"),
    ("split", "str"),
    ("id", "str"),
    ("text", "str"),
    ("question", "str"),
    ("choices", "list[str]"),
    ("label", "i64"),
    ("target", "str"),
    ("rationale", "str"),
];

fn expected_dtype(name: &str) -> DataType {
    match name {
        "choices" => DataType::List(Box::new(DataType::String)),
        "label" => DataType::Int64,
        _ => DataType::String,
    }
}

/// One example in memory, as the importers build it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Example {
    pub task: String,
    pub lang: String,
    pub lang_code: String,
    pub split: String,
    pub id: String,
    pub text: String,
    pub question: Option<String>,
    pub choices: Option<Vec<String>>,
    pub label: Option<i64>,
    pub target: Option<String>,
    pub rationale: Option<String>,
}

/// Builds the canonical DataFrame from examples (column order as in [`COLUMNS`]).
pub fn to_frame(rows: &[Example]) -> Result<DataFrame> {
    let s = |name: &str, f: &dyn Fn(&Example) -> &str| -> Column {
        Column::new(name.into(), rows.iter().map(f).collect::<Vec<&str>>())
    };
    let o = |name: &str, f: &dyn Fn(&Example) -> Option<&str>| -> Column {
        Column::new(
            name.into(),
            rows.iter().map(f).collect::<Vec<Option<&str>>>(),
        )
    };
    let choices: ListChunked = rows
        .iter()
        .map(|r| {
            r.choices.as_ref().map(|c| {
                Series::new(
                    PlSmallStr::EMPTY,
                    c.iter().map(String::as_str).collect::<Vec<_>>(),
                )
            })
        })
        .collect();
    let mut choices = choices.into_series();
    if choices.dtype() != &expected_dtype("choices") {
        choices = choices.cast(&expected_dtype("choices"))?;
    }
    choices.rename("choices".into());
    let df = DataFrame::new_infer_height(vec![
        s("task", &|r| &r.task),
        s("lang", &|r| &r.lang),
        s("lang_code", &|r| &r.lang_code),
        s("split", &|r| &r.split),
        s("id", &|r| &r.id),
        s("text", &|r| &r.text),
        o("question", &|r| r.question.as_deref()),
        choices.into_column(),
        Column::new(
            "label".into(),
            rows.iter().map(|r| r.label).collect::<Vec<Option<i64>>>(),
        ),
        o("target", &|r| r.target.as_deref()),
        o("rationale", &|r| r.rationale.as_deref()),
    ])?;
    Ok(df)
}

/// Writes a frame as zstd-compressed Parquet, atomically.
///
/// The Arrow schema hint stored in the file uses polars' oldest compatibility level
/// (`large_string`, `large_list`) instead of `string_view`: pandas cannot convert a list of
/// `string_view` ("Not implemented type for Arrow list to pandas: string_view"), while every
/// reader (polars, pandas/pyarrow, DuckDB) handles the large types.
pub fn write_parquet(df: &mut DataFrame, path: &Path) -> Result<()> {
    write_parquet_with(df, path, ParquetCompression::Zstd(None))
}

/// [`write_parquet`] with a chosen compression (small files that are read by the thousand are
/// cheaper uncompressed: a zstd decoder is set up per column chunk).
pub fn write_parquet_with(
    df: &mut DataFrame,
    path: &Path,
    compression: ParquetCompression,
) -> Result<()> {
    let arrow = df.schema().to_arrow(CompatLevel::oldest());
    let hint = polars_parquet::arrow::write::schema_to_metadata_key(&arrow);
    let meta = polars::io::parquet::write::KeyValueMetadata::from_static(vec![
        (hint.key, hint.value.unwrap_or_default()),
        (
            "mlbench.writer".to_string(),
            format!("mlbench {}", env!("CARGO_PKG_VERSION")),
        ),
    ]);
    write_atomic(path, |f| {
        ParquetWriter::new(f)
            .with_compression(compression)
            .with_key_value_metadata(Some(meta))
            .with_statistics(StatisticsOptions::default())
            .with_row_group_size(Some(16_384))
            .finish(df)
            .map(|_| ())
            .map_err(|e| Error::Io {
                action: "write Parquet",
                path: path.to_path_buf(),
                source: std::io::Error::other(e.to_string()),
            })
    })
}

/// Reads a Parquet file eagerly, mapping "not Parquet" to [`Error::CorruptParquet`].
pub fn read_parquet(path: &Path) -> Result<DataFrame> {
    let file = std::fs::File::open(path)
        .map_err(|e| Error::missing_or_io("dataset file", "open", path, e))?;
    ParquetReader::new(file)
        .finish()
        .map_err(|e| Error::CorruptParquet {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

/// Checks that a frame has every column of [`COLUMNS`] with the right type.
pub fn check_columns(df: &DataFrame, path: &Path) -> Result<()> {
    for (name, shown) in COLUMNS {
        let col = df.column(name).map_err(|_| Error::MissingColumn {
            path: path.to_path_buf(),
            column: (*name).to_string(),
            expected: (*shown).to_string(),
        })?;
        let want = expected_dtype(name);
        // An all-null column may be stored as Null; accept it for nullable columns.
        if col.dtype() != &want && !(col.dtype() == &DataType::Null && is_nullable(name)) {
            return Err(Error::ColumnType {
                path: path.to_path_buf(),
                column: (*name).to_string(),
                found: col.dtype().to_string(),
                expected: (*shown).to_string(),
            });
        }
    }
    Ok(())
}

fn is_nullable(name: &str) -> bool {
    matches!(
        name,
        "question" | "choices" | "label" | "target" | "rationale"
    )
}

/// Full validation of a canonical frame: columns and types, then every row: required fields
/// present, non-empty text, ids unique within (task, lang), labels inside their choices, one
/// task per file.
pub fn validate(df: &DataFrame, path: &Path, expected_task: Option<&str>) -> Result<()> {
    check_columns(df, path)?;
    if df.height() == 0 {
        return Err(Error::Config {
            path: path.to_path_buf(),
            message: "the dataset file has no rows".into(),
        });
    }
    let str_col = |n: &str| -> Result<StringChunked> {
        Ok(df.column(n)?.as_materialized_series().str()?.clone())
    };
    let task = str_col("task")?;
    let lang = str_col("lang")?;
    let lang_code = str_col("lang_code")?;
    let split = str_col("split")?;
    let id = str_col("id")?;
    let text = str_col("text")?;
    let label_col = df
        .column("label")?
        .as_materialized_series()
        .cast(&DataType::Int64)?;
    let label = label_col.i64()?;
    let choices_col = df
        .column("choices")?
        .as_materialized_series()
        .cast(&expected_dtype("choices"))?;
    let choices = choices_col.list()?;

    let bad = |row: usize, id: Option<&str>, column: &str, message: String| Error::BadValue {
        path: path.to_path_buf(),
        row,
        id: id.unwrap_or("").to_string(),
        column: column.to_string(),
        message,
    };
    let mut seen: HashSet<(String, String)> = HashSet::with_capacity(df.height());
    for row in 0..df.height() {
        let rid = id.get(row);
        for (name, c) in [
            ("task", &task),
            ("lang", &lang),
            ("lang_code", &lang_code),
            ("split", &split),
            ("id", &id),
        ] {
            match c.get(row) {
                None => return Err(bad(row, rid, name, "is null".into())),
                Some(v) if v.trim().is_empty() => {
                    return Err(bad(row, rid, name, "is empty".into()))
                }
                _ => {}
            }
        }
        let t = task.get(row).unwrap_or_default();
        if let Some(exp) = expected_task {
            if t != exp {
                return Err(bad(
                    row,
                    rid,
                    "task",
                    format!("is `{t}` in the file of task `{exp}`"),
                ));
            }
        }
        let lc = lang_code.get(row).unwrap_or_default();
        if !is_lang_code(lc) {
            return Err(bad(
                row,
                rid,
                "lang_code",
                format!("`{lc}` is not of the form xxx_Xxxx (ISO 639-3 + script)"),
            ));
        }
        match text.get(row) {
            None => return Err(bad(row, rid, "text", "is null".into())),
            Some(v) if v.trim().is_empty() => return Err(bad(row, rid, "text", "is empty".into())),
            _ => {}
        }
        let l = lang.get(row).unwrap_or_default();
        if !seen.insert((l.to_string(), rid.unwrap_or_default().to_string())) {
            return Err(bad(
                row,
                rid,
                "id",
                format!("duplicate id in language `{l}`"),
            ));
        }
        if let Some(y) = label.get(row) {
            let n = choices.get_as_series(row).map(|s| s.len()).unwrap_or(0);
            if n == 0 {
                return Err(bad(
                    row,
                    rid,
                    "label",
                    format!("label {y} but `choices` is empty or null"),
                ));
            }
            if y < 0 || y as usize >= n {
                return Err(bad(
                    row,
                    rid,
                    "label",
                    format!("label {y} is outside 0..{n} (the number of choices)"),
                ));
            }
        }
    }
    Ok(())
}

/// True for codes like `eng_Latn`.
pub fn is_lang_code(c: &str) -> bool {
    let mut parts = c.split('_');
    let (Some(a), Some(b), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    a.len() == 3
        && a.bytes().all(|x| x.is_ascii_lowercase())
        && b.len() == 4
        && b.as_bytes()[0].is_ascii_uppercase()
        && b.bytes().skip(1).all(|x| x.is_ascii_lowercase())
}

/// Reads and validates a canonical dataset file.
pub fn load(path: &Path, expected_task: Option<&str>) -> Result<DataFrame> {
    let df = read_parquet(path)?;
    if expected_task.is_some() || !already_valid(path) {
        validate(&df, path, expected_task)?;
        mark_valid(path);
    }
    Ok(df)
}

/// The one validation every reader of a dataset file goes through ([`load`]'s), for readers
/// that scan only some columns (`data sample`, `data describe`, language lists): the whole
/// file is read and validated once per process and file version (path, size, modification
/// time), so they accept exactly the files that training and evaluation accept.
pub fn check_file(path: &Path) -> Result<()> {
    if already_valid(path) {
        return Ok(());
    }
    load(path, None).map(|_| ())
}

type FileVersion = (PathBuf, u64, Option<std::time::SystemTime>);

fn valid_files() -> &'static std::sync::Mutex<HashSet<FileVersion>> {
    static SEEN: std::sync::OnceLock<std::sync::Mutex<HashSet<FileVersion>>> =
        std::sync::OnceLock::new();
    SEEN.get_or_init(Default::default)
}

fn version_of(path: &Path) -> Option<FileVersion> {
    let m = std::fs::metadata(path).ok()?;
    Some((path.to_path_buf(), m.len(), m.modified().ok()))
}

fn already_valid(path: &Path) -> bool {
    version_of(path).is_some_and(|v| valid_files().lock().is_ok_and(|s| s.contains(&v)))
}

fn mark_valid(path: &Path) {
    if let (Some(v), Ok(mut s)) = (version_of(path), valid_files().lock()) {
        s.insert(v);
    }
}

/// The rows of a canonical frame as [`Example`]s, in frame order (the inverse of [`to_frame`]).
pub fn from_frame(df: &DataFrame) -> Result<Vec<Example>> {
    let s = |name: &str| -> Result<StringChunked> { Ok(df.column(name)?.str()?.clone()) };
    let (task, lang, lang_code, split, id, text) = (
        s("task")?,
        s("lang")?,
        s("lang_code")?,
        s("split")?,
        s("id")?,
        s("text")?,
    );
    let (question, target, rationale) = (s("question")?, s("target")?, s("rationale")?);
    let label = df.column("label")?.cast(&DataType::Int64)?;
    let label = label.i64()?;
    let choices = df.column("choices")?.list()?.clone();
    let mut out = Vec::with_capacity(df.height());
    for (row, ch) in choices.amortized_iter().enumerate() {
        let ch = ch.map(|c| -> Result<Vec<String>> {
            Ok(c.as_ref()
                .str()?
                .iter()
                .map(|x| x.unwrap_or("").to_string())
                .collect())
        });
        out.push(Example {
            task: task.get(row).unwrap_or("").to_string(),
            lang: lang.get(row).unwrap_or("").to_string(),
            lang_code: lang_code.get(row).unwrap_or("").to_string(),
            split: split.get(row).unwrap_or("").to_string(),
            id: id.get(row).unwrap_or("").to_string(),
            text: text.get(row).unwrap_or("").to_string(),
            question: question.get(row).map(str::to_string),
            choices: ch.transpose()?,
            label: label.get(row),
            target: target.get(row).map(str::to_string),
            rationale: rationale.get(row).map(str::to_string),
        });
    }
    Ok(out)
}
