//! The few-shot sampler: seeded, stratified, nested training pools, and the support/query split
//! of a pool for one meta-iteration.
//!
//! In: a canonical dataset file (found and read through [`super::catalogue`]) and a request
//! (tasks, languages, budgets K, seed).
//! Out: one row per drawn example with `task, lang, lang_code, split, id, label, seed, k, draw`.
//!
//! **Draw order.** For each (task, language) the sampler builds one *draw order* over the whole
//! split, and the pool of budget K is its first K entries. Pools are therefore nested: for one
//! seed the K = 16 pool is a prefix of the K = 64 pool.
//!
//! **Seeds.** The random stream of a (task, language) depends only on `(seed, task, lang_code)`
//! (or on `(seed, task)` with `aligned`, which gives parallel datasets the same ids in every
//! language). Asking for more languages or tasks never changes the ids drawn for another one.
//!
//! **Stratification (the rounding rule).** Let class c hold `n_c` of the split's `N` examples
//! (share `p_c = n_c / N`). Each class's examples are shuffled on their own stream. The draw order
//! is then built one example at a time: at step t (1-based) the next example comes from the class
//! with the largest deficit `t * p_c - drawn_c` among the classes still under their upper quota
//! (`drawn_c < t * p_c`); ties go to the larger class, then to the smaller label. As a result,
//! in every pool of size K each class holds `floor(K p_c)` or `ceil(K p_c)` examples (checked by
//! the tests for every K), and the counts only grow with K. Rows without labels (generation
//! tasks) are shuffled plainly.

use std::collections::BTreeMap;
use std::path::Path;

use polars::prelude::*;
use rayon::prelude::*;

use super::catalogue::{codes_for, collect, dataset_path, scan, splits_of, task_languages};
use super::lang::{self, LangEntry};
use super::schema;
use crate::error::{Error, Result};
use crate::util::{derive_seed, Rng};

/// The draw order of one group: indices into `labels`, every index exactly once.
///
/// `ids` fixes a canonical order first (sorted ids), so the result does not depend on the row
/// order of the file. `key` names the group's random stream (see the module doc).
pub fn draw_order(ids: &[&str], labels: &[Option<i64>], seed: u64, key: &[&str]) -> Vec<usize> {
    assert_eq!(ids.len(), labels.len());
    let mut canon: Vec<usize> = (0..ids.len()).collect();
    canon.sort_by(|&a, &b| ids[a].cmp(ids[b]));
    if labels.iter().any(Option::is_none) {
        let mut rng = Rng::new(derive_seed(seed, key));
        rng.shuffle(&mut canon);
        return canon;
    }
    let mut classes: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
    for &i in &canon {
        classes
            .entry(labels[i].unwrap_or_default())
            .or_default()
            .push(i);
    }
    let mut lists: Vec<(i64, Vec<usize>)> = classes.into_iter().collect();
    for (label, list) in lists.iter_mut() {
        let lab = label.to_string();
        let mut k: Vec<&str> = key.to_vec();
        k.push("label");
        k.push(&lab);
        Rng::new(derive_seed(seed, &k)).shuffle(list);
    }
    let n = canon.len() as u128;
    let mut drawn = vec![0usize; lists.len()];
    let mut order = Vec::with_capacity(canon.len());
    for t in 1..=n {
        // deficit_c * N = t * n_c - drawn_c * N (exact integer arithmetic).
        let mut best: Option<(usize, i128)> = None;
        for (c, (_, list)) in lists.iter().enumerate() {
            let size = list.len() as u128;
            let have = drawn[c] as u128;
            if have * n >= t * size {
                continue; // at or above its upper quota
            }
            let deficit = (t * size) as i128 - (have * n) as i128;
            let better = match best {
                None => true,
                Some((b, bd)) => deficit > bd || (deficit == bd && list.len() > lists[b].1.len()),
            };
            if better {
                best = Some((c, deficit));
            }
        }
        let (c, _) = best.expect("some class is always below its quota");
        order.push(lists[c].1[drawn[c]]);
        drawn[c] += 1;
    }
    order
}

/// A sampling request, as `mlbench data sample` takes it.
#[derive(Debug, Clone)]
pub struct PoolRequest {
    /// Task names (dataset files under the data folder).
    pub tasks: Vec<String>,
    /// Language codes as typed: `en`, `eng_Latn`, a dataset code, `all`, or `task:code` to scope
    /// a code to one task.
    pub langs: Vec<String>,
    /// Budgets K; each gives one pool per (task, language).
    pub ks: Vec<usize>,
    pub seed: u64,
    /// The split pools come from (normally `train`).
    pub split: String,
    /// Same stream for every language of a task (parallel pools).
    pub aligned: bool,
}

/// One drawn example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolRow {
    pub task: String,
    pub lang: String,
    pub lang_code: String,
    pub split: String,
    pub id: String,
    pub label: Option<i64>,
    pub seed: u64,
    pub k: usize,
    /// Position in the draw order (0-based); the pool of budget K is `draw < K`.
    pub draw: usize,
}

/// Draws the pools of a request. Checks every task, language and budget before drawing.
pub fn sample_pools(data_dir: &Path, req: &PoolRequest) -> Result<Vec<PoolRow>> {
    if req.ks.is_empty() {
        return Err(Error::Invalid(
            "no budget given: pass --k with one or more sizes".into(),
        ));
    }
    if let Some(k) = req.ks.iter().find(|k| **k == 0) {
        return Err(Error::Invalid(format!(
            "budget k = {k}: every k must be at least 1"
        )));
    }
    let mut out = Vec::new();
    for task in &req.tasks {
        out.extend(task_pools(data_dir, task, req)?);
    }
    tracing::debug!(rows = out.len(), "pools drawn");
    Ok(out)
}

/// The pools of one task: its file checked, the chosen languages' rows of the split read,
/// every language drawn.
fn task_pools(data_dir: &Path, task: &str, req: &PoolRequest) -> Result<Vec<PoolRow>> {
    let path = dataset_path(data_dir, task)?;
    let lf = scan(&path)?;
    check_pool_columns(&lf, &path)?;
    let t0 = std::time::Instant::now();
    let entries = task_languages(&path)?;
    tracing::debug!(task = %task, secs = t0.elapsed().as_secs_f64(), "languages scanned");
    let codes = codes_for(task, &req.langs);
    if codes.is_empty() {
        return Err(Error::Invalid(format!(
            "no language given for task `{task}`"
        )));
    }
    let chosen = lang::resolve_list(task, &codes, &entries)?;
    let mut pred = col("split").eq(lit(req.split.clone()));
    if chosen.len() < entries.len() {
        let any_lang = chosen
            .iter()
            .map(|e| col("lang").eq(lit(e.lang.clone())))
            .reduce(|a, b| a.or(b))
            .expect("at least one language");
        pred = pred.and(any_lang);
    }
    let df = collect(
        lf.filter(pred).select([
            col("lang"),
            col("id"),
            col("label").cast(DataType::Int64),
            col("choices"),
        ]),
        &path,
    )?;
    tracing::debug!(task = %task, rows = df.height(), secs = t0.elapsed().as_secs_f64(), "train rows read");
    let rows = SplitRows::read(&df, task, &path, req)?;
    // Languages are independent streams: draw them in parallel, report errors in order.
    let per_lang: Vec<Result<Vec<PoolRow>>> = chosen.par_iter().map(|e| rows.draw(e)).collect();
    let mut out = Vec::new();
    for r in per_lang {
        out.extend(r?);
    }
    Ok(out)
}

/// The columns the sampler reads, present with their types.
fn check_pool_columns(lf: &LazyFrame, path: &Path) -> Result<()> {
    let schema = lf
        .clone()
        .collect_schema()
        .map_err(|e| Error::CorruptParquet {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    for (name, ty) in [
        ("lang", "str"),
        ("lang_code", "str"),
        ("split", "str"),
        ("id", "str"),
        ("label", "i64"),
        ("choices", "list[str]"),
    ] {
        let dt = schema.get(name).ok_or_else(|| Error::MissingColumn {
            path: path.to_path_buf(),
            column: name.into(),
            expected: ty.into(),
        })?;
        let ok = match ty {
            "str" => dt == &DataType::String,
            "i64" => dt.is_integer() || dt == &DataType::Null,
            _ => matches!(dt, DataType::List(_) | DataType::Null),
        };
        if !ok {
            return Err(Error::ColumnType {
                path: path.to_path_buf(),
                column: name.into(),
                found: dt.to_string(),
                expected: ty.into(),
            });
        }
    }
    Ok(())
}

/// The split's rows of one task as the draws read them: ids, labels and numbers of choices,
/// and the rows of each language.
struct SplitRows<'a> {
    task: &'a str,
    path: &'a Path,
    req: &'a PoolRequest,
    ids: StringChunked,
    labels: Int64Chunked,
    n_choices: Vec<usize>,
    groups: BTreeMap<String, Vec<usize>>,
}

impl<'a> SplitRows<'a> {
    /// Reads the columns of `df` and groups its rows by language (a null language is an error).
    fn read(
        df: &DataFrame,
        task: &'a str,
        path: &'a Path,
        req: &'a PoolRequest,
    ) -> Result<SplitRows<'a>> {
        let langs_col = df.column("lang")?.str()?.clone();
        let ids = df.column("id")?.str()?.clone();
        let labels = df.column("label")?.i64()?.clone();
        let n_choices = list_lengths(df.column("choices")?.as_materialized_series())?;
        let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for row in 0..df.height() {
            let l = langs_col.get(row).ok_or_else(|| Error::BadValue {
                path: path.to_path_buf(),
                row,
                id: ids.get(row).unwrap_or("").into(),
                column: "lang".into(),
                message: "is null".into(),
            })?;
            match groups.get_mut(l) {
                Some(rows) => rows.push(row),
                None => {
                    groups.insert(l.to_string(), vec![row]);
                }
            }
        }
        Ok(SplitRows {
            task,
            path,
            req,
            ids,
            labels,
            n_choices,
            groups,
        })
    }

    /// The pool rows of one language for every K: its checked ids and labels in draw order,
    /// first K of them.
    fn draw(&self, e: &LangEntry) -> Result<Vec<PoolRow>> {
        let (task, req) = (self.task, self.req);
        let rows = self
            .groups
            .get(e.lang.as_str())
            .cloned()
            .unwrap_or_default();
        if rows.is_empty() {
            let splits = splits_of(self.path, &e.lang)?;
            return Err(Error::MissingSplit {
                task: task.to_string(),
                lang: e.lang_code.clone(),
                split: req.split.clone(),
                available: splits,
            });
        }
        let (ids, labels) = self.checked(&rows, e)?;
        let max_k = *req.ks.iter().max().expect("non-empty");
        if max_k > ids.len() {
            return Err(Error::BudgetTooLarge {
                task: task.to_string(),
                lang: e.lang_code.clone(),
                split: req.split.clone(),
                k: max_k,
                available: ids.len(),
            });
        }
        let key: Vec<&str> = if req.aligned {
            vec![task]
        } else {
            vec![task, e.lang_code.as_str()]
        };
        let order = draw_order(&ids, &labels, req.seed, &key);
        let mut out = Vec::new();
        for &k in &req.ks {
            for (draw, &i) in order.iter().take(k).enumerate() {
                out.push(PoolRow {
                    task: task.to_string(),
                    lang: e.lang.clone(),
                    lang_code: e.lang_code.clone(),
                    split: req.split.clone(),
                    id: ids[i].to_string(),
                    label: labels[i],
                    seed: req.seed,
                    k,
                    draw,
                });
            }
        }
        Ok(out)
    }

    /// The ids and labels of `rows` (one language), checked: ids present and unique, labels
    /// within the example's choices.
    fn checked(&self, rows: &[usize], e: &LangEntry) -> Result<(Vec<&str>, Vec<Option<i64>>)> {
        let mut ids = Vec::with_capacity(rows.len());
        let mut labels = Vec::with_capacity(rows.len());
        let mut seen = std::collections::HashSet::with_capacity(rows.len());
        for &r in rows {
            let bad = |id: &str, column: &str, message: String| Error::BadValue {
                path: self.path.to_path_buf(),
                row: r,
                id: id.into(),
                column: column.into(),
                message,
            };
            let id = self
                .ids
                .get(r)
                .filter(|s| !s.is_empty())
                .ok_or_else(|| bad("", "id", "is null or empty".into()))?;
            if !seen.insert(id) {
                return Err(bad(
                    id,
                    "id",
                    format!(
                        "duplicate id in language `{}` split `{}`",
                        e.lang, self.req.split
                    ),
                ));
            }
            let y = self.labels.get(r);
            if let Some(y) = y {
                let n = self.n_choices[r];
                if y < 0 || y as usize >= n {
                    return Err(bad(
                        id,
                        "label",
                        format!("label {y} is outside 0..{n} (the number of choices)"),
                    ));
                }
            }
            ids.push(id);
            labels.push(y);
        }
        Ok((ids, labels))
    }
}

/// Length of every list in a list column (0 for nulls), read from the Arrow offsets.
fn list_lengths(s: &Series) -> Result<Vec<usize>> {
    let mut out = Vec::with_capacity(s.len());
    if s.dtype() == &DataType::Null {
        out.resize(s.len(), 0);
        return Ok(out);
    }
    for arr in s.list()?.downcast_iter() {
        let offs = arr.offsets().as_slice();
        for i in 0..arr.len() {
            let valid = arr.validity().is_none_or(|v| v.get_bit(i));
            out.push(if valid {
                (offs[i + 1] - offs[i]) as usize
            } else {
                0
            });
        }
    }
    Ok(out)
}

/// The pool rows as a DataFrame (the `pools.parquet` layout).
pub fn pools_frame(rows: &[PoolRow]) -> Result<DataFrame> {
    let s = |n: &str, f: &dyn Fn(&PoolRow) -> &str| {
        Column::new(n.into(), rows.iter().map(f).collect::<Vec<&str>>())
    };
    Ok(DataFrame::new_infer_height(vec![
        s("task", &|r| &r.task),
        s("lang", &|r| &r.lang),
        s("lang_code", &|r| &r.lang_code),
        s("split", &|r| &r.split),
        s("id", &|r| &r.id),
        Column::new(
            "label".into(),
            rows.iter().map(|r| r.label).collect::<Vec<_>>(),
        ),
        Column::new(
            "seed".into(),
            rows.iter().map(|r| r.seed).collect::<Vec<u64>>(),
        ),
        Column::new(
            "k".into(),
            rows.iter().map(|r| r.k as u32).collect::<Vec<u32>>(),
        ),
        Column::new(
            "draw".into(),
            rows.iter().map(|r| r.draw as u32).collect::<Vec<u32>>(),
        ),
    ])?)
}

/// Writes pools atomically as Parquet.
pub fn write_pools(rows: &[PoolRow], out: &Path) -> Result<()> {
    let mut df = pools_frame(rows)?;
    schema::write_parquet(&mut df, out)
}

/// Splits one task's pool into disjoint support and query sets for meta-iteration `iteration`.
///
/// The pool is shuffled on a stream keyed by `(seed, key, iteration)`; the first `n_support`
/// items form the support set and the next `n_query` the query set. Errors when the pool is
/// smaller than `n_support + n_query`.
pub fn support_query<T: Clone>(
    pool: &[T],
    n_support: usize,
    n_query: usize,
    seed: u64,
    key: &[&str],
    iteration: u64,
) -> Result<(Vec<T>, Vec<T>)> {
    if n_support + n_query > pool.len() {
        return Err(Error::Invalid(format!(
            "support ({n_support}) + query ({n_query}) is larger than the pool of {} examples of {}",
            pool.len(),
            key.join("/")
        )));
    }
    let it = iteration.to_string();
    let mut k: Vec<&str> = key.to_vec();
    k.push("meta");
    k.push(&it);
    let mut idx: Vec<usize> = (0..pool.len()).collect();
    Rng::new(derive_seed(seed, &k)).shuffle(&mut idx);
    let support = idx[..n_support].iter().map(|&i| pool[i].clone()).collect();
    let query = idx[n_support..n_support + n_query]
        .iter()
        .map(|&i| pool[i].clone())
        .collect();
    Ok((support, query))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn synthetic(sizes: &[usize]) -> (Vec<String>, Vec<Option<i64>>) {
        let mut ids = Vec::new();
        let mut labels = Vec::new();
        for (c, &n) in sizes.iter().enumerate() {
            for j in 0..n {
                ids.push(format!("{c}-{j}"));
                labels.push(Some(c as i64));
            }
        }
        (ids, labels)
    }

    fn counts(order: &[usize], labels: &[Option<i64>], k: usize, classes: usize) -> Vec<usize> {
        let mut c = vec![0; classes];
        for &i in &order[..k] {
            c[labels[i].unwrap() as usize] += 1;
        }
        c
    }

    #[test]
    fn hand_worked_rounding_example() {
        // Classes of 6, 3, 1 out of 10. Worked by hand from the rule in the module doc:
        // t=1 -> c0, t=2 -> c1, t=3 -> c0, t=4 tie(c0,c2) -> c0 (larger), t=5 tie(c1,c2) -> c1.
        let (ids, labels) = synthetic(&[6, 3, 1]);
        let idr: Vec<&str> = ids.iter().map(String::as_str).collect();
        let order = draw_order(&idr, &labels, 0, &["t", "x"]);
        let seq: Vec<i64> = order.iter().take(5).map(|&i| labels[i].unwrap()).collect();
        assert_eq!(seq, vec![0, 1, 0, 0, 1]);
        assert_eq!(counts(&order, &labels, 5, 3), vec![3, 2, 0]);
        assert_eq!(counts(&order, &labels, 10, 3), vec![6, 3, 1]);
    }

    #[test]
    fn quota_holds_at_every_prefix() {
        let mut rng = Rng::new(99);
        let mut dists: Vec<Vec<usize>> = vec![
            vec![176, 138, 102, 85, 77, 65, 58],
            vec![1832, 72, 3241],
            vec![1, 1, 1, 50],
        ];
        for _ in 0..40 {
            let m = 2 + rng.below(8) as usize;
            dists.push((0..m).map(|_| 1 + rng.below(60) as usize).collect());
        }
        for sizes in dists {
            let (ids, labels) = synthetic(&sizes);
            let idr: Vec<&str> = ids.iter().map(String::as_str).collect();
            let order = draw_order(&idr, &labels, 3, &["t", "l"]);
            let n: usize = sizes.iter().sum();
            let mut sorted = order.clone();
            sorted.sort();
            assert_eq!(sorted, (0..n).collect::<Vec<_>>(), "a permutation");
            let mut c = vec![0usize; sizes.len()];
            for (t, &i) in order.iter().enumerate() {
                c[labels[i].unwrap() as usize] += 1;
                let k = t + 1;
                for (cls, &size) in sizes.iter().enumerate() {
                    let lo = (k * size) / n;
                    let hi = (k * size).div_ceil(n);
                    assert!(
                        (lo..=hi).contains(&c[cls]),
                        "sizes {sizes:?} K={k} class {cls}: {} not in [{lo},{hi}]",
                        c[cls]
                    );
                }
            }
        }
    }

    #[test]
    fn draw_order_ignores_row_order() {
        let (ids, labels) = synthetic(&[5, 4, 3]);
        let idr: Vec<&str> = ids.iter().map(String::as_str).collect();
        let a: Vec<&str> = draw_order(&idr, &labels, 5, &["t"])
            .iter()
            .map(|&i| idr[i])
            .collect();
        let mut rev_ids = idr.clone();
        rev_ids.reverse();
        let mut rev_labels = labels.clone();
        rev_labels.reverse();
        let b: Vec<&str> = draw_order(&rev_ids, &rev_labels, 5, &["t"])
            .iter()
            .map(|&i| rev_ids[i])
            .collect();
        assert_eq!(a, b);
    }

    #[test]
    fn support_and_query_are_disjoint_and_seeded() {
        let pool: Vec<u32> = (0..20).collect();
        let (s, q) = support_query(&pool, 4, 4, 0, &["sib200", "eng_Latn"], 3).unwrap();
        assert_eq!(s.len(), 4);
        assert_eq!(q.len(), 4);
        assert!(s.iter().all(|x| !q.contains(x)));
        let (s2, q2) = support_query(&pool, 4, 4, 0, &["sib200", "eng_Latn"], 3).unwrap();
        assert_eq!((s.clone(), q.clone()), (s2, q2));
        let (s3, _) = support_query(&pool, 4, 4, 0, &["sib200", "eng_Latn"], 4).unwrap();
        assert_ne!(s, s3, "a new iteration redraws");
        assert!(support_query(&pool, 12, 9, 0, &["t"], 0).is_err());
    }
}
