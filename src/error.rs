//! Typed errors of the library.
//!
//! Every variant says *what* went wrong and *where* (file, column, row, key or code).
//! [`Error::is_user_error`] separates bad input (the CLI exits with status 2 and a message
//! that says how to fix it) from internal failures (status 1).

use std::path::PathBuf;

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything the library can report.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file that should exist does not.
    #[error("{what} not found: {path}")]
    MissingFile { what: &'static str, path: PathBuf },

    /// Reading or writing a file failed at the OS level.
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A Parquet file could not be read as Parquet at all.
    #[error("{path} is not a readable Parquet file: {message}")]
    CorruptParquet { path: PathBuf, message: String },

    /// A required column is absent.
    #[error("{path}: missing column `{column}` (expected {expected})")]
    MissingColumn {
        path: PathBuf,
        column: String,
        expected: String,
    },

    /// A column has the wrong data type.
    #[error("{path}: column `{column}` has type {found}, expected {expected}")]
    ColumnType {
        path: PathBuf,
        column: String,
        found: String,
        expected: String,
    },

    /// A value in a row breaks the schema's rules.
    #[error("{path}: row {row} (id `{id}`), column `{column}`: {message}")]
    BadValue {
        path: PathBuf,
        row: usize,
        id: String,
        column: String,
        message: String,
    },

    /// A raw source record could not be parsed.
    #[error("{path}:{line}: {message}")]
    BadSource {
        path: PathBuf,
        line: usize,
        message: String,
    },

    /// A code (task, language, method, ...) that mlbench does not know.
    #[error("unknown {kind} `{code}`{scope}{}", suggest(.suggestions))]
    Unknown {
        kind: &'static str,
        code: String,
        /// Where the code was looked up, e.g. " in task `sib200`" (may be empty).
        scope: String,
        suggestions: Vec<String>,
    },

    /// A language code that matches several languages of a task.
    #[error("language `{code}` is ambiguous in task `{task}`: it matches {}; name one of them", .matches.join(", "))]
    AmbiguousLanguage {
        code: String,
        task: String,
        matches: Vec<String>,
    },

    /// More examples were asked for than a (task, language, split) has.
    #[error("k = {k} is larger than the {available} examples of {task}/{lang} split `{split}`")]
    BudgetTooLarge {
        task: String,
        lang: String,
        split: String,
        k: usize,
        available: usize,
    },

    /// A requested split does not exist for a task/language.
    #[error("task `{task}` has no `{split}` split for language `{lang}` (it has: {})", .available.join(", "))]
    MissingSplit {
        task: String,
        lang: String,
        split: String,
        available: Vec<String>,
    },

    /// A configuration or task specification is invalid.
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },

    /// A command-line argument is invalid.
    #[error("{0}")]
    Invalid(String),

    /// Several problems found at once (a configuration checked before a run starts).
    #[error("{} problem{} in {context}:\n  - {}", .problems.len(), if .problems.len() == 1 { "" } else { "s" }, .problems.join("\n  - "))]
    Problems {
        context: String,
        problems: Vec<String>,
    },

    /// Training produced a NaN or infinite loss; the last good checkpoint is kept.
    #[error("{what} is {value} at step {step} ({unit}, {stage}); stopped. The last good checkpoint (if any) is kept: lower the learning rate or check the data, then rerun or --resume")]
    NonFinite {
        what: &'static str,
        value: f64,
        step: usize,
        unit: String,
        stage: String,
    },

    /// The run was interrupted (Ctrl-C) after writing a checkpoint.
    #[error("interrupted at step {step}; checkpoint written to {path}: continue with --resume")]
    Interrupted { step: usize, path: PathBuf },

    /// An evaluation was stopped (Ctrl-C or a termination signal) between forward passes.
    #[error("evaluation interrupted with {kept} of {groups} (variant, task, language) groups finished, kept in {path}: rerun the same command to continue")]
    EvalInterrupted {
        kept: usize,
        groups: usize,
        path: PathBuf,
    },

    /// A grid run was interrupted (Ctrl-C or a termination signal) between or inside cells.
    #[error("interrupted after {cells} cell(s) finished in {store}; rerun the same `mlbench run` command to continue (finished cells are kept; a cell resumes from its training checkpoint or its finished evaluation groups)")]
    GridInterrupted { cells: usize, store: PathBuf },

    /// A fault inside mlbench (an invariant broken, a shape that cannot happen): not the user's
    /// input.
    #[error("internal error: {0}")]
    Internal(String),

    /// A checksum or manifest check failed.
    #[error("{path}: {message}")]
    Verify { path: PathBuf, message: String },

    /// An error inside polars that is not the user's input.
    #[error("polars: {0}")]
    Polars(#[from] polars::error::PolarsError),

    /// A tensor operation failed (shapes are checked before, so this is an internal error).
    #[error("tensor: {0}")]
    Candle(#[from] candle_core::Error),

    /// JSON (de)serialisation failed on data we produced ourselves.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
}

fn suggest(s: &[String]) -> String {
    if s.is_empty() {
        String::new()
    } else {
        format!("; did you mean {}?", s.join(", "))
    }
}

impl Error {
    /// True when the error comes from the user's input (exit status 2), false for internal
    /// failures (exit status 1).
    pub fn is_user_error(&self) -> bool {
        match self {
            Error::Polars(_)
            | Error::Json(_)
            | Error::Candle(_)
            | Error::NonFinite { .. }
            | Error::Internal(_)
            | Error::Interrupted { .. }
            | Error::EvalInterrupted { .. }
            | Error::GridInterrupted { .. } => false,
            // What the user's files and folders are (missing, unreadable, not text, a file
            // where a folder belongs, on a full or read-only disk) is theirs to fix; the rest
            // (interrupted system calls, broken pipes, unexpected kinds) is not.
            Error::Io { source, .. } => {
                use std::io::ErrorKind as K;
                matches!(
                    source.kind(),
                    K::NotFound
                        | K::PermissionDenied
                        | K::InvalidData
                        | K::InvalidInput
                        | K::InvalidFilename
                        | K::NotADirectory
                        | K::IsADirectory
                        | K::AlreadyExists
                        | K::DirectoryNotEmpty
                        | K::ReadOnlyFilesystem
                        | K::StorageFull
                        | K::QuotaExceeded
                        | K::FileTooLarge
                        | K::UnexpectedEof
                )
            }
            _ => true,
        }
    }

    /// An I/O error on opening or reading `what` at `path`: a missing file becomes
    /// [`Error::MissingFile`] (a user error naming the path), anything else [`Error::Io`].
    pub fn missing_or_io(
        what: &'static str,
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::MissingFile { what, path }
        } else {
            Error::Io {
                action,
                path,
                source,
            }
        }
    }

    /// Shorthand for an I/O error with its path.
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::NotFound && action == "read" {
            return Error::MissingFile {
                what: "file",
                path: path.into(),
            };
        }
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
