//! The results store: a folder that finished cells are added to, readable as-is by polars,
//! pandas/pyarrow and DuckDB.
//!
//! Layout:
//! - `cells/<key>/cell.json`: the cell (method, K, seed, resolved configurations), code version,
//!   finish time and wall times; its presence marks the cell finished (it stays after a merge);
//! - `cells/<key>/metrics.parquet`: metric rows (columns of `mlbench eval`'s `metrics.parquet`
//!   plus `experiment, method, k, seed, key, code_version, finished_at_unix`);
//! - `cells/<key>/samples.parquet`: per-example records, with the same cell columns;
//! - `parts/metrics-<generation>.parquet`, `parts/samples-<generation>.parquet`: the rows of many
//!   cells compacted by `mlbench merge` (and at the end of an unsharded `mlbench run`), whose
//!   per-cell Parquet files are then removed;
//! - `work/<key>/`: the training run and evaluation output of a cell in progress (a stopped
//!   run resumes from its checkpoint, or from the evaluation groups kept in `eval/groups/`).
//!
//! - `locks/<key>.lock`, `locks/store.lock`: claims on a cell and on compaction (see
//!   [`super::lock`]): a process works on a cell, or merges, only while it holds the claim.
//!
//! A cell folder is written beside its final place (`cells/.tmp-<key>-<pid>/`) and renamed into
//! it, and a part is written
//! to a temporary name and renamed, so a reader never sees a half-written file. Every row is in
//! exactly one place except for the moment between a merge writing its part and removing the
//! per-cell files it absorbed; [`Store::read`] keeps one copy of each cell's rows (newest part
//! first, then cell folders), and so should a reader that globs
//! `["STORE/parts/metrics-*.parquet", "STORE/cells/*/metrics.parquet"]` while a merge runs.
//! Names that start with a dot are never cells: a `.tmp-` folder left by a process killed
//! before its rename is ignored by every reader and removed by the next holder of that cell's
//! claim (or by the next merge, when nobody holds it).

use std::path::{Path, PathBuf};

use polars::prelude::*;

use super::lock::{self, TryClaim};
use crate::error::{Error, Result};
use crate::plan::grid::Cell;
use crate::util::{fault_point, write_bytes_atomic};

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

    /// Claims cell `key` for this process (see [`super::lock`]); on success, the temporary
    /// folders a killed commit of this cell left behind are removed.
    pub fn try_claim_cell(&self, key: &str) -> Result<TryClaim> {
        let claim = lock::try_claim(&lock::cell_lock_path(&self.dir, key))?;
        if matches!(claim, TryClaim::Claimed(_)) {
            self.remove_stale_tmp(key)?;
        }
        Ok(claim)
    }

    /// [`Store::try_claim_cell`], waiting for the holder instead of returning.
    pub fn claim_cell(&self, key: &str) -> Result<lock::Claim> {
        let claim = lock::claim(&lock::cell_lock_path(&self.dir, key))?;
        self.remove_stale_tmp(key)?;
        Ok(claim)
    }

    /// Removes `cells/.tmp-<key>-*` (the caller holds the cell's claim, so none is live).
    fn remove_stale_tmp(&self, key: &str) -> Result<()> {
        let cells = self.dir.join("cells");
        let Ok(rd) = std::fs::read_dir(&cells) else {
            return Ok(());
        };
        let prefix = format!(".tmp-{key}-");
        for e in rd.filter_map(|e| e.ok()) {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let p = e.path();
                tracing::info!(path = %p.display(), "removing a cell folder a killed run left");
                std::fs::remove_dir_all(&p).map_err(|e| Error::io("remove", &p, e))?;
            }
        }
        Ok(())
    }

    /// Adds a finished cell: its metrics and samples frames (cell columns are appended here) and
    /// its description, atomically.
    pub fn commit(
        &self,
        cell: &Cell,
        metrics: DataFrame,
        samples: DataFrame,
        info: serde_json::Value,
    ) -> Result<()> {
        let finished = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.commit_as(
            cell,
            metrics,
            samples,
            info,
            &crate::util::code_version(),
            finished,
        )
    }

    /// [`Store::commit`] with the code version and finish time given (for imports and tests).
    pub fn commit_as(
        &self,
        cell: &Cell,
        mut metrics: DataFrame,
        mut samples: DataFrame,
        info: serde_json::Value,
        version: &str,
        finished: u64,
    ) -> Result<()> {
        let cells = self.dir.join("cells");
        std::fs::create_dir_all(&cells).map_err(|e| Error::io("create directory", &cells, e))?;
        let tmp = cells.join(format!(".tmp-{}-{}", cell.key, std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::io("remove", &tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io("create directory", &tmp, e))?;
        for df in [&mut metrics, &mut samples] {
            let n = df.height();
            let add = vec![
                Column::new("experiment".into(), vec![cell.experiment.as_str(); n]),
                Column::new("method".into(), vec![cell.method.name(); n]),
                Column::new("k".into(), vec![cell.k.map(|k| k as i64); n]),
                Column::new("seed".into(), vec![cell.seed; n]),
                Column::new("key".into(), vec![cell.key.as_str(); n]),
                Column::new("code_version".into(), vec![version; n]),
                Column::new("finished_at_unix".into(), vec![finished; n]),
            ];
            for c in add {
                df.with_column(c)?;
            }
        }
        // Uncompressed: a comparison reads thousands of these small files, and setting up a
        // zstd decoder per column chunk would dominate; `merge` compacts them into zstd parts.
        for (df, f) in [
            (&mut metrics, "metrics.parquet"),
            (&mut samples, "samples.parquet"),
        ] {
            crate::data::schema::write_parquet_with(
                df,
                &tmp.join(f),
                ParquetCompression::Uncompressed,
            )?;
            fault_point("commit: a cell file written in the temporary folder");
        }
        let doc = serde_json::json!({ "cell": cell, "code_version": version, "info": info });
        write_bytes_atomic(&tmp.join("cell.json"), &serde_json::to_vec_pretty(&doc)?)?;
        fault_point("commit: cell.json written, folder not renamed");
        let dst = self.cell_dir(&cell.key);
        if dst.exists() {
            // Another shard finished the same cell first: keep theirs.
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::io("remove", &tmp, e))?;
            return Ok(());
        }
        std::fs::rename(&tmp, &dst).map_err(|e| Error::io("rename", &tmp, e))?;
        fault_point("commit: cell folder renamed into place");
        Ok(())
    }

    /// The keys of the finished cells.
    pub fn finished(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.dir.join("cells"))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                    .filter(|e| e.path().join("cell.json").exists())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// The compacted parts of `file` (`metrics.parquet` or `samples.parquet`), newest first.
    pub fn parts(&self, file: &str) -> Vec<PathBuf> {
        let stem = file.trim_end_matches(".parquet");
        let mut v: Vec<PathBuf> = std::fs::read_dir(self.dir.join("parts"))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| {
                        p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                            n.starts_with(&format!("{stem}-")) && n.ends_with(".parquet")
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v.reverse();
        v
    }

    /// Every finished cell's rows of `file` (`metrics.parquet` or `samples.parquet`), each cell's
    /// rows once: compacted parts (newest first), then the per-cell files of cells not in a part.
    pub fn read(&self, file: &str) -> Result<DataFrame> {
        self.read_columns(file, None)
    }

    /// [`Store::read`] keeping only `columns` (all when `None`), which must include `key`.
    /// Per-cell files are scanned together (one multi-file Parquet scan, read in parallel).
    pub fn read_columns(&self, file: &str, columns: Option<&[&str]>) -> Result<DataFrame> {
        let parts = self.parts(file);
        let mut seen: std::collections::HashSet<String> = std::collections::HashSet::new();
        let mut out: Option<DataFrame> = None;
        let push = |df: DataFrame, out: &mut Option<DataFrame>| -> Result<()> {
            match out.as_mut() {
                None => *out = Some(df),
                Some(o) => {
                    o.vstack_mut(&df)?;
                }
            }
            Ok(())
        };
        for path in &parts {
            let df = read_parquet_columns(path, columns)?;
            let keys = df
                .column("key")
                .and_then(|c| c.str().cloned())
                .map_err(|_| Error::CorruptParquet {
                    path: path.clone(),
                    message: "no string column `key`: not a results-store file".into(),
                })?;
            // Rows of cells an older part or a newer one both hold are kept once.
            let fresh: std::collections::HashSet<&str> = keys
                .iter()
                .flatten()
                .filter(|k| !seen.contains(*k))
                .collect();
            let df = if keys.iter().flatten().all(|k| fresh.contains(k)) {
                df
            } else {
                let mask: BooleanChunked = keys
                    .iter()
                    .map(|k| k.is_some_and(|k| fresh.contains(k)))
                    .collect();
                df.filter(&mask)?
            };
            seen.extend(fresh.into_iter().map(str::to_string));
            push(df, &mut out)?;
        }
        let cells: Vec<PathBuf> = self
            .finished()
            .into_iter()
            .filter(|k| !seen.contains(k))
            .map(|k| self.cell_dir(&k).join(file))
            .filter(|p| p.exists())
            .collect();
        if !cells.is_empty() {
            // A failed multi-file scan is retried file by file to name the one at fault.
            let corrupt = |e: PolarsError| {
                for p in &cells {
                    if let Err(found) = read_parquet_columns(p, columns) {
                        return found;
                    }
                }
                Error::CorruptParquet {
                    path: self.dir.join("cells"),
                    message: e.to_string(),
                }
            };
            let paths = cells
                .iter()
                .map(|p| PlRefPath::try_from_path(p))
                .collect::<PolarsResult<Vec<_>>>()
                .map_err(corrupt)?;
            let mut lf = LazyFrame::scan_parquet_files(
                paths.into_iter().collect(),
                ScanArgsParquet::default(),
            )
            .map_err(corrupt)?;
            if let Some(cols) = columns {
                lf = lf.select(cols.iter().map(|c| col(*c)).collect::<Vec<_>>());
            }
            push(lf.collect().map_err(corrupt)?, &mut out)?;
        }
        let mut out = out.ok_or_else(|| {
            Error::Invalid(format!(
                "the results store {} has no finished cell",
                self.dir.display()
            ))
        })?;
        // One chunk per column: row access (`get`) walks the chunk list.
        out.rechunk_mut_par();
        Ok(out)
    }

    /// Brings the finished cells of `from` (other stores, e.g. shards that wrote to local disks)
    /// into this store, then compacts every cell's rows into one new part per file and removes
    /// the per-cell Parquet files and older parts it absorbed. Cells already here are kept.
    pub fn merge(&self, from: &[Store]) -> Result<MergeSummary> {
        let _claim = lock::claim(&lock::store_lock_path(&self.dir))?;
        self.remove_unclaimed_tmp()?;
        let mut imported = 0;
        let parts = self.dir.join("parts");
        for src in from {
            if src.dir == self.dir {
                continue;
            }
            if !src.dir.join("cells").is_dir() {
                return Err(Error::Invalid(format!(
                    "{} is not a results store (no cells/ folder)",
                    src.dir.display()
                )));
            }
            for key in src.finished() {
                if self.is_done(&key) {
                    continue;
                }
                copy_dir_atomic(&src.cell_dir(&key), &self.cell_dir(&key))?;
                imported += 1;
            }
            for file in ["metrics.parquet", "samples.parquet"] {
                for p in src.parts(file) {
                    let dst = parts.join(p.file_name().expect("a part has a name"));
                    if !dst.exists() {
                        std::fs::create_dir_all(&parts)
                            .map_err(|e| Error::io("create directory", &parts, e))?;
                        let bytes = std::fs::read(&p).map_err(|e| Error::io("read", &p, e))?;
                        write_bytes_atomic(&dst, &bytes)?;
                    }
                }
            }
        }
        let generation = format!(
            "{:020}-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
            std::process::id()
        );
        std::fs::create_dir_all(&parts).map_err(|e| Error::io("create directory", &parts, e))?;
        let mut cells = 0;
        let mut rows = [0usize; 2];
        // Metrics first: until the samples part lands, the per-cell samples files still exist.
        for (i, file) in ["metrics.parquet", "samples.parquet"].iter().enumerate() {
            let old_parts = self.parts(file);
            let absorbed: Vec<String> = self
                .finished()
                .into_iter()
                .filter(|k| self.cell_dir(k).join(file).exists())
                .collect();
            if absorbed.is_empty() && old_parts.len() <= 1 {
                continue;
            }
            let mut df = self.read(file)?;
            rows[i] = df.height();
            let stem = file.trim_end_matches(".parquet");
            let dst = parts.join(format!("{stem}-{generation}.parquet"));
            crate::data::schema::write_parquet(&mut df, &dst)?;
            fault_point("merge: part written, absorbed files not removed");
            for p in old_parts {
                std::fs::remove_file(&p).map_err(|e| Error::io("remove", &p, e))?;
                fault_point("merge: an old part removed");
            }
            for k in &absorbed {
                let p = self.cell_dir(k).join(file);
                std::fs::remove_file(&p).map_err(|e| Error::io("remove", &p, e))?;
                fault_point("merge: an absorbed cell file removed");
            }
            cells = cells.max(absorbed.len());
        }
        Ok(MergeSummary {
            imported,
            compacted: cells,
            metric_rows: rows[0],
            sample_rows: rows[1],
            cells_total: self.finished().len(),
        })
    }
}

impl Store {
    /// Removes the `.tmp-` folders under `cells/` whose cell nobody claims (a killed commit or
    /// a killed merge's copy left them) and half-written parts. Called with the store claim
    /// held.
    fn remove_unclaimed_tmp(&self) -> Result<()> {
        // A part half-written by a killed merge (only merges write parts, and we hold their
        // claim).
        if let Ok(rd) = std::fs::read_dir(self.dir.join("parts")) {
            for e in rd.filter_map(|e| e.ok()) {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with('.') && n.ends_with(".tmp") {
                    let p = e.path();
                    std::fs::remove_file(&p).map_err(|e| Error::io("remove", &p, e))?;
                }
            }
        }
        let Ok(rd) = std::fs::read_dir(self.dir.join("cells")) else {
            return Ok(());
        };
        let names: Vec<String> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".tmp-"))
            .collect();
        for n in names {
            // `.tmp-<key>-<pid>`: keys are hex, so the key ends at the first `-` after the prefix.
            let Some(key) = n[".tmp-".len()..].split('-').next() else {
                continue;
            };
            // Holding the claim removes this key's leftovers; a busy claim keeps them.
            drop(self.try_claim_cell(key)?);
        }
        Ok(())
    }
}

/// The metric columns comparisons read.
pub const METRIC_COLUMNS: &[&str] = &[
    "experiment",
    "method",
    "k",
    "seed",
    "key",
    "code_version",
    "finished_at_unix",
    "task",
    "lang",
    "metric",
    "higher_is_better",
    "value",
    "ci_low",
    "ci_high",
];

/// The per-example columns paired tests read.
pub const SAMPLE_COLUMNS: &[&str] = &[
    "experiment",
    "method",
    "k",
    "seed",
    "key",
    "code_version",
    "task",
    "lang",
    "id",
    "correct",
];

/// One Parquet file, only `columns` when given.
fn read_parquet_columns(path: &Path, columns: Option<&[&str]>) -> Result<DataFrame> {
    let f = std::fs::File::open(path).map_err(|e| Error::io("open", path, e))?;
    ParquetReader::new(f)
        .with_columns(columns.map(|c| c.iter().map(|s| s.to_string()).collect()))
        .finish()
        .map_err(|e| Error::CorruptParquet {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

/// What [`Store::merge`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeSummary {
    /// Cells copied in from other stores.
    pub imported: usize,
    /// Cells whose per-cell files were absorbed into the new part.
    pub compacted: usize,
    pub metric_rows: usize,
    pub sample_rows: usize,
    /// Finished cells in the store afterwards.
    pub cells_total: usize,
}

/// Copies a cell folder (flat: files only) beside `dst` and renames it into place.
fn copy_dir_atomic(src: &Path, dst: &Path) -> Result<()> {
    let parent = dst.parent().expect("a cell folder has a parent");
    std::fs::create_dir_all(parent).map_err(|e| Error::io("create directory", parent, e))?;
    let tmp = parent.join(format!(
        ".tmp-{}-{}",
        dst.file_name().and_then(|n| n.to_str()).unwrap_or("cell"),
        std::process::id()
    ));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io("remove", &tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io("create directory", &tmp, e))?;
    for e in std::fs::read_dir(src).map_err(|e| Error::io("read directory", src, e))? {
        let e = e.map_err(|e| Error::io("read directory", src, e))?;
        if e.path().is_file() {
            std::fs::copy(e.path(), tmp.join(e.file_name()))
                .map_err(|err| Error::io("copy", e.path(), err))?;
        }
    }
    fault_point("merge: a cell copied, not renamed");
    if dst.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io("remove", &tmp, e))?;
        return Ok(());
    }
    std::fs::rename(&tmp, dst).map_err(|e| Error::io("rename", &tmp, e))
}

/// `path` made relative-safe for messages.
pub fn show(p: &Path) -> String {
    p.display().to_string()
}
