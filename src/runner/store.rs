//! The results store: a folder that finished cells are added to, readable as-is by polars,
//! pandas/pyarrow and DuckDB.
//!
//! Layout:
//! - `cells/<key>/cell.json`: the cell (method, K, seed, resolved configurations), code version,
//!   finish time and wall times; its presence marks the cell finished;
//! - `cells/<key>/metrics.parquet`: metric rows (columns of `mlbench eval`'s `metrics.parquet`
//!   plus `experiment, method, k, seed, key, code_version, finished_at_unix`);
//! - `cells/<key>/samples.parquet`: per-example records, with the same cell columns;
//! - `work/<key>/`: the training run and evaluation output of a cell in progress (a killed run
//!   resumes from its checkpoint).
//!
//! A cell folder is written beside its final place and renamed into it, so a reader never sees a
//! half-written cell: `pl.read_parquet("STORE/cells/*/metrics.parquet")` reads every finished one.

use std::path::{Path, PathBuf};

use polars::prelude::*;

use super::experiment::Cell;
use crate::error::{Error, Result};
use crate::util::write_bytes_atomic;

/// A results store rooted at a folder.
#[derive(Debug, Clone)]
pub struct Store {
    pub dir: PathBuf,
}

impl Store {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Store { dir: dir.into() }
    }

    pub fn cell_dir(&self, key: &str) -> PathBuf {
        self.dir.join("cells").join(key)
    }

    pub fn work_dir(&self, key: &str) -> PathBuf {
        self.dir.join("work").join(key)
    }

    pub fn is_done(&self, key: &str) -> bool {
        self.cell_dir(key).join("cell.json").exists()
    }

    /// Adds a finished cell: its metrics and samples frames (cell columns are appended here) and
    /// its description, atomically.
    pub fn commit(
        &self,
        cell: &Cell,
        mut metrics: DataFrame,
        mut samples: DataFrame,
        info: serde_json::Value,
    ) -> Result<()> {
        let cells = self.dir.join("cells");
        std::fs::create_dir_all(&cells).map_err(|e| Error::io("create directory", &cells, e))?;
        let tmp = cells.join(format!(".tmp-{}-{}", cell.key, std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::io("remove", &tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io("create directory", &tmp, e))?;
        let version = crate::util::code_version();
        let finished = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        for df in [&mut metrics, &mut samples] {
            let n = df.height();
            let add = vec![
                Column::new("experiment".into(), vec![cell.experiment.as_str(); n]),
                Column::new("method".into(), vec![cell.method.as_str(); n]),
                Column::new("k".into(), vec![cell.k.map(|k| k as i64); n]),
                Column::new("seed".into(), vec![cell.seed; n]),
                Column::new("key".into(), vec![cell.key.as_str(); n]),
                Column::new("code_version".into(), vec![version.as_str(); n]),
                Column::new("finished_at_unix".into(), vec![finished; n]),
            ];
            for c in add {
                df.with_column(c)?;
            }
        }
        crate::data::schema::write_parquet(&mut metrics, &tmp.join("metrics.parquet"))?;
        crate::data::schema::write_parquet(&mut samples, &tmp.join("samples.parquet"))?;
        let doc = serde_json::json!({ "cell": cell, "code_version": version, "info": info });
        write_bytes_atomic(&tmp.join("cell.json"), &serde_json::to_vec_pretty(&doc)?)?;
        let dst = self.cell_dir(&cell.key);
        if dst.exists() {
            // Another shard finished the same cell first: keep theirs.
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::io("remove", &tmp, e))?;
            return Ok(());
        }
        std::fs::rename(&tmp, &dst).map_err(|e| Error::io("rename", &tmp, e))?;
        Ok(())
    }

    /// The keys of the finished cells.
    pub fn finished(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.dir.join("cells"))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter(|e| e.path().join("cell.json").exists())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// All finished cells' rows of `file` (`metrics.parquet` or `samples.parquet`), stacked.
    pub fn read(&self, file: &str) -> Result<DataFrame> {
        let keys = self.finished();
        if keys.is_empty() {
            return Err(Error::Invalid(format!(
                "the results store {} has no finished cell",
                self.dir.display()
            )));
        }
        let mut out: Option<DataFrame> = None;
        for k in &keys {
            let df = crate::data::schema::read_parquet(&self.cell_dir(k).join(file))?;
            match out.as_mut() {
                None => out = Some(df),
                Some(o) => {
                    o.vstack_mut(&df)?;
                }
            }
        }
        Ok(out.expect("at least one cell"))
    }
}

/// `path` made relative-safe for messages.
pub fn show(p: &Path) -> String {
    p.display().to_string()
}
