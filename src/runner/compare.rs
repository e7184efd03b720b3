//! Comparison tables over a results store: metric rows and per-example records in; a table with
//! one row per method x K and one column per task x language (plus micro and macro averages)
//! out, as text, Markdown, CSV and LaTeX (booktabs); and, against a declared reference method
//! and margin, the verdict table of the study protocol ([`super::verdict::verdicts`]).
//!
//! A cell of the table is the mean over seeds of the metric, with a 95% interval: with two or
//! more seeds, the two-level bootstrap of [`super::stats::two_level_bootstrap`] (seeds, then
//! test items within each language, as the verdicts resample) when the per-example records were
//! read and reproduce the metric's per-seed values, else Student's t over the seed means (a
//! metric the records do not hold, or a plain `compare` that reads no records); with one seed,
//! the run's own interval (Wilson, or bootstrap for macro averages). [`Entry::interval`] says
//! which. A `*` marks a difference from the baseline method whose paired two-level bootstrap
//! ([`super::stats::paired_difference`]: seeds, then items within each language) gives
//! p < 0.05. Pairs are formed only within a seed (the same example id, at the same K where the
//! baseline has budgets): a seed the baseline lacks is reported as
//! missing, never paired with another seed's run (except the one run of a method no seed
//! enters, `Query::seed_free`, which stands for every seed); micro and macro columns each get
//! their own statistic (items pooled; mean of languages).

use std::collections::BTreeMap;

use polars::prelude::*;

use super::stats::{self, Average, Outcomes};
use crate::error::{Error, Result};

/// What to compare.
#[derive(Debug, Clone, Default)]
pub struct Query {
    pub experiment: Option<String>,
    pub tasks: Vec<String>,
    /// Normalised language codes (`eng_Latn`); empty for all.
    pub langs: Vec<String>,
    pub methods: Vec<String>,
    pub metric: String,
    pub baseline: Option<String>,
    /// With no `langs`: only the micro and macro averages, no per-language columns.
    pub averages_only: bool,
    /// Methods no seed enters (`base` at 0 shots, evaluated once): their one run stands for
    /// every seed of the run it is paired with.
    pub seed_free: Vec<String>,
}

/// One table entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub mean: f64,
    pub low: f64,
    pub high: f64,
    pub seeds: usize,
    /// p-value of the paired test against the baseline (None for the baseline itself or when
    /// no pairs exist).
    pub p: Option<f64>,
    /// How `low` and `high` were made.
    pub interval: Interval,
}

/// The kind of a table entry's 95% interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Interval {
    /// One seed: the run's own (Wilson, or bootstrap for macro averages).
    Run,
    /// Two or more seeds: two-level bootstrap over seeds, then test items.
    Bootstrap,
    /// Two or more seeds: Student's t over the seed means.
    T,
}

impl Interval {
    pub fn name(self) -> &'static str {
        match self {
            Interval::Run => "run",
            Interval::Bootstrap => "bootstrap",
            Interval::T => "t",
        }
    }

    fn describe(self) -> String {
        match self {
            Interval::Run => "one seed: the run's own Wilson/bootstrap interval".into(),
            Interval::Bootstrap => format!(
                "two or more seeds: two-level bootstrap, seeds then test items within each language, {RESAMPLES} resamples"
            ),
            Interval::T => "two or more seeds: t over the seed means".into(),
        }
    }
}

/// One table row: (method, K) and one entry per column.
pub type Row = ((String, Option<i64>), Vec<Option<Entry>>);

/// A comparison table.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    pub metric: String,
    pub baseline: Option<String>,
    /// `task/lang`, `task/micro`, `task/macro`.
    pub columns: Vec<String>,
    /// (method, K) and one entry per column.
    pub rows: Vec<Row>,
    /// Seeds that could not be paired with the baseline, one line each.
    pub missing: Vec<String>,
    /// The real number of distinct training examples per task and language of the methods
    /// without a budget (`lora-full`), where known: where the efficiency plot places them.
    pub real_k: BTreeMap<String, f64>,
}

/// Bootstrap resamples of every paired comparison.
pub const RESAMPLES: usize = 2000;

fn strs(df: &DataFrame, c: &str) -> Result<Vec<String>> {
    Ok(df
        .column(c)?
        .str()?
        .iter()
        .map(|x| x.unwrap_or("").to_string())
        .collect())
}

/// Two-sided exact McNemar test: `b` and `c` discordant pairs.
pub fn mcnemar_exact(b: usize, c: usize) -> f64 {
    let n = b + c;
    if n == 0 {
        return 1.0;
    }
    let k = b.min(c);
    // P(X <= k), X ~ Bin(n, 1/2), in log space.
    let mut lp = -(n as f64) * std::f64::consts::LN_2; // log C(n,0) / 2^n
    let mut cdf = 0.0;
    for i in 0..=k {
        if i > 0 {
            lp += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        cdf += lp.exp();
    }
    (2.0 * cdf).min(1.0)
}

/// A column of floats, nulls read as NaN.
fn f64s(df: &DataFrame, c: &str) -> Result<Vec<f64>> {
    Ok(df
        .column(c)?
        .f64()?
        .iter()
        .map(|x| x.unwrap_or(f64::NAN))
        .collect())
}

/// The `seed` column, nulls read as 0.
fn seeds(df: &DataFrame) -> Result<Vec<u64>> {
    Ok(df
        .column("seed")?
        .u64()?
        .iter()
        .map(|x| x.unwrap_or(0))
        .collect())
}

/// The runs of one table cell: seed -> (value, ci_low, ci_high).
type Runs = BTreeMap<u64, (f64, f64, f64)>;

/// The selected metric rows: (method, K) -> column -> runs.
type Grid = BTreeMap<(String, Option<i64>), BTreeMap<String, Runs>>;

/// Builds the table from a store's metric rows and per-example records.
pub fn table(metrics: &DataFrame, samples: &DataFrame, q: &Query) -> Result<Table> {
    Ok(table_and_outcomes(metrics, samples, q)?.0)
}

/// [`table`] and the per-example outcomes its intervals rest on ([`outcomes`] of `samples`
/// under `q`), for a caller that pairs the same outcomes again (the verdicts), so the map of
/// every selected test item is built once.
pub fn table_and_outcomes(
    metrics: &DataFrame,
    samples: &DataFrame,
    q: &Query,
) -> Result<(Table, CellOutcomes)> {
    let (grid, mut columns) = select(metrics, q)?;
    if grid.is_empty() {
        return Err(no_match(q));
    }
    if let Some(b) = &q.baseline {
        check_baseline(&grid, b)?;
    }
    // Languages first, then micro and macro, per task.
    columns.sort_by_key(|c| {
        let (t, l) = c.split_once('/').unwrap_or((c, ""));
        (
            t.to_string(),
            matches!(l, "micro" | "macro"),
            l == "macro",
            l.to_string(),
        )
    });
    // Per-example outcomes: (method, k, task) -> seed -> lang -> id -> correct.
    let outcomes = outcomes(samples, q)?;
    let mut missing = Vec::new();
    let mut rows = Vec::new();
    for ((m, kk), cols) in &grid {
        let entries = columns
            .iter()
            .map(|c| {
                let runs = cols.get(c)?;
                Some(entry(runs, q, (m, *kk, c), &outcomes, &mut missing))
            })
            .collect();
        rows.push(((m.clone(), *kk), entries));
    }
    // Methods in the order asked for (or base, baselines, then the rest), K ascending.
    let order = |m: &str| -> usize {
        q.methods.iter().position(|x| x == m).unwrap_or(match m {
            "base" => 0,
            "lora-full" => 1,
            _ => 2,
        })
    };
    rows.sort_by(|a, b| (order(&a.0 .0), &a.0 .0, a.0 .1).cmp(&(order(&b.0 .0), &b.0 .0, b.0 .1)));
    let table = Table {
        metric: q.metric.clone(),
        baseline: q.baseline.clone(),
        columns,
        rows,
        missing,
        real_k: BTreeMap::new(),
    };
    Ok((table, outcomes))
}

/// The metric rows `q` selects, by (method, K) and column, and the columns in first-seen order.
fn select(metrics: &DataFrame, q: &Query) -> Result<(Grid, Vec<String>)> {
    let (exp, method, task, lang, metric) = (
        strs(metrics, "experiment")?,
        strs(metrics, "method")?,
        strs(metrics, "task")?,
        strs(metrics, "lang")?,
        strs(metrics, "metric")?,
    );
    let k: Vec<Option<i64>> = metrics.column("k")?.i64()?.iter().collect();
    let seed = seeds(metrics)?;
    let value = f64s(metrics, "value")?;
    let lo = f64s(metrics, "ci_low")?;
    let hi = f64s(metrics, "ci_high")?;
    let keep = |i: usize| -> bool {
        q.experiment.as_ref().is_none_or(|e| &exp[i] == e)
            && (q.tasks.is_empty() || q.tasks.contains(&task[i]))
            && (q.methods.is_empty() || q.methods.contains(&method[i]))
            && metric[i] == q.metric
            && ((q.langs.is_empty() && !q.averages_only)
                || q.langs.contains(&lang[i])
                || lang[i] == "micro"
                || lang[i] == "macro")
    };
    let mut grid = Grid::new();
    let mut columns: Vec<String> = Vec::new();
    for i in (0..metrics.height()).filter(|&i| keep(i)) {
        let col = format!("{}/{}", task[i], lang[i]);
        if !columns.contains(&col) {
            columns.push(col.clone());
        }
        grid.entry((method[i].clone(), k[i]))
            .or_default()
            .entry(col)
            .or_default()
            .insert(seed[i], (value[i], lo[i], hi[i]));
    }
    Ok((grid, columns))
}

/// The error when nothing matches `q`.
fn no_match(q: &Query) -> Error {
    Error::Invalid(format!(
        "no results match (metric `{}`{}{})",
        q.metric,
        if q.tasks.is_empty() {
            String::new()
        } else {
            format!(", tasks {}", q.tasks.join(","))
        },
        if q.methods.is_empty() {
            String::new()
        } else {
            format!(", methods {}", q.methods.join(","))
        },
    ))
}

/// The baseline method `b` must be among the selected results.
fn check_baseline(grid: &Grid, b: &str) -> Result<()> {
    let present: std::collections::BTreeSet<&str> = grid.keys().map(|(m, _)| m.as_str()).collect();
    if present.contains(b) {
        return Ok(());
    }
    Err(Error::Unknown {
        kind: "baseline method",
        code: b.to_string(),
        scope: format!(
            " in the selected results (methods: {})",
            present.iter().copied().collect::<Vec<_>>().join(", ")
        ),
        suggestions: crate::util::suggestions(b, present.iter().copied()),
    })
}

/// The entry of method `m` at K `kk` in column `c` from its runs: the mean over seeds with its
/// interval, and the paired p-value against the baseline (seeds without a baseline run to pair
/// with go to `missing`, once each).
fn entry(
    runs: &Runs,
    q: &Query,
    (m, kk, c): (&String, Option<i64>, &String),
    outcomes: &CellOutcomes,
    missing: &mut Vec<String>,
) -> Entry {
    let vals: Vec<f64> = runs.values().map(|r| r.0).collect();
    let n = vals.len();
    let (mean, low, high, interval) = if n >= 2 {
        let (mean, t_low, t_high) = stats::t_interval(&vals);
        match seeds_bootstrap(runs, outcomes, (m, kk, c)) {
            Some((low, high)) => (mean, low, high, Interval::Bootstrap),
            None => (mean, t_low, t_high, Interval::T),
        }
    } else {
        let r = runs.values().next().expect("one run");
        (r.0, r.1, r.2, Interval::Run)
    };
    let p = match &q.baseline {
        Some(b) if b != m => {
            let paired = pair_with(outcomes, m, kk, b, c, &q.seed_free);
            if let Some(pd) = &paired {
                for s in &pd.missing {
                    let line = format!(
                        "{m} K={}: seed {s} has no `{b}` run to pair with",
                        k_label(m, kk)
                    );
                    if !missing.contains(&line) {
                        missing.push(line);
                    }
                }
            }
            paired.map(|pd| pd.p)
        }
        _ => None,
    };
    Entry {
        mean,
        low,
        high,
        seeds: n,
        p,
        interval,
    }
}

/// The two-level bootstrap interval of column `c` of (method `m`, K `kk`) from its per-example
/// outcomes, when they hold exactly the runs' seeds and reproduce each seed's value (they record
/// the primary metric only, so another metric falls back to t); `None` otherwise.
fn seeds_bootstrap(
    runs: &Runs,
    outcomes: &CellOutcomes,
    (m, kk, c): (&String, Option<i64>, &String),
) -> Option<(f64, f64)> {
    let task = c.split_once('/').map_or(c.as_str(), |(t, _)| t);
    let all = outcomes.get(&(m.clone(), kk, task.to_string()))?;
    let (o, avg) = column_outcomes(all, c);
    let same = o.len() == runs.len()
        && runs.iter().all(|(seed, r)| {
            o.get(seed)
                .is_some_and(|by| (stats::seed_accuracy(by, avg) - r.0).abs() < 1e-9)
        });
    if !same {
        return None;
    }
    let seed = crate::util::derive_seed(0, &["table", m, &k_label(m, kk), c]);
    let (low, high) = stats::two_level_bootstrap(&o, avg, RESAMPLES, seed);
    (low.is_finite() && high.is_finite()).then_some((low, high))
}

/// The per-example rows of `samples` that `q` selects: its experiment, tasks, methods and (when
/// named) languages. A store holds several experiments (a grid beside its selection's dev-split
/// candidates, or two grids with the same method names), so anything read per (method, K, seed)
/// from the records, such as the label diagnostics, starts here.
pub fn selected_samples(samples: &DataFrame, q: &Query) -> Result<DataFrame> {
    if samples.height() == 0 {
        return Ok(samples.clone());
    }
    let (exp, method, task, lang) = (
        strs(samples, "experiment")?,
        strs(samples, "method")?,
        strs(samples, "task")?,
        strs(samples, "lang")?,
    );
    let mask: BooleanChunked = (0..samples.height())
        .map(|i| {
            q.experiment.as_ref().is_none_or(|e| &exp[i] == e)
                && (q.tasks.is_empty() || q.tasks.contains(&task[i]))
                && (q.methods.is_empty() || q.methods.contains(&method[i]))
                && (q.langs.is_empty() || q.langs.contains(&lang[i]))
        })
        .collect();
    Ok(samples.filter(&mask)?)
}

/// Per-example outcomes of every (method, K, task): seed -> language -> id -> correct.
pub type CellOutcomes = BTreeMap<(String, Option<i64>, String), Outcomes>;

/// The per-example outcomes of `samples` that `q` selects (all metrics' `correct`: the
/// samples hold the primary metric's outcome).
pub fn outcomes(samples: &DataFrame, q: &Query) -> Result<CellOutcomes> {
    let mut out: CellOutcomes = BTreeMap::new();
    if samples.height() == 0 {
        return Ok(out);
    }
    let (method, task, lang, id) = (
        strs(samples, "method")?,
        strs(samples, "task")?,
        strs(samples, "lang")?,
        strs(samples, "id")?,
    );
    let exp = strs(samples, "experiment")?;
    let k: Vec<Option<i64>> = samples.column("k")?.i64()?.iter().collect();
    let seed: Vec<u64> = samples
        .column("seed")?
        .u64()?
        .iter()
        .map(|x| x.unwrap_or(0))
        .collect();
    let correct: Vec<bool> = samples
        .column("correct")?
        .bool()?
        .iter()
        .map(|x| x.unwrap_or(false))
        .collect();
    for i in 0..samples.height() {
        if q.experiment.as_ref().is_some_and(|e| &exp[i] != e) {
            continue;
        }
        out.entry((method[i].clone(), k[i], task[i].clone()))
            .or_default()
            .entry(seed[i])
            .or_default()
            .entry(lang[i].clone())
            .or_default()
            .insert(id[i].clone(), correct[i]);
    }
    Ok(out)
}

/// The outcomes of one cell restricted to a column (`task/lang`, `task/micro`, `task/macro`)
/// and the average that column takes.
fn column_outcomes(o: &Outcomes, column: &str) -> (Outcomes, Average) {
    let lang = column.split_once('/').map_or("", |(_, l)| l);
    let avg = if lang == "macro" {
        Average::Macro
    } else {
        Average::Micro
    };
    if lang == "micro" || lang == "macro" {
        return (o.clone(), avg);
    }
    let only = o
        .iter()
        .map(|(s, by)| {
            let kept = by
                .iter()
                .filter(|(l, _)| l.as_str() == lang)
                .map(|(l, v)| (l.clone(), v.clone()))
                .collect();
            (*s, kept)
        })
        .collect();
    (only, avg)
}

/// The reference's outcomes for a row at budget `k`: its cells at the same K when it has
/// budgets, else its only ones (`lora-full` and `base` have no K).
fn reference_of<'a>(
    o: &'a CellOutcomes,
    reference: &str,
    k: Option<i64>,
    task: &str,
) -> Option<&'a Outcomes> {
    o.get(&(reference.to_string(), k, task.to_string()))
        .or_else(|| o.get(&(reference.to_string(), None, task.to_string())))
}

/// The one run of a seed-free side given to every seed of the other side (`side` unchanged
/// unless it is seed-free with exactly one seed).
fn spread(side: Outcomes, free: bool, other: &Outcomes) -> Outcomes {
    if !free || side.len() != 1 {
        return side;
    }
    let items = side.into_values().next().unwrap_or_default();
    other.keys().map(|&s| (s, items.clone())).collect()
}

/// The paired difference of method `m` at `k` to `reference` in one column, with a bootstrap
/// seeded by the row and column (so a report is reproducible). A side in `seed_free` with one
/// run is paired with each seed of the other side.
pub fn pair_with(
    o: &CellOutcomes,
    m: &str,
    k: Option<i64>,
    reference: &str,
    column: &str,
    seed_free: &[String],
) -> Option<stats::Paired> {
    let task = column.split_once('/').map_or(column, |(t, _)| t);
    let mine = o.get(&(m.to_string(), k, task.to_string()))?;
    let theirs = reference_of(o, reference, k, task)?;
    let (x, avg) = column_outcomes(mine, column);
    let (y, _) = column_outcomes(theirs, column);
    let free = |name: &str| seed_free.iter().any(|f| f == name);
    let x = spread(x, free(m), &y);
    let y = spread(y, free(reference), &x);
    let seed = crate::util::derive_seed(0, &["paired", m, &k_label(m, k), reference, column]);
    stats::paired_difference(&x, &y, avg, RESAMPLES, seed)
}

/// The table (and the verdicts, when given) as JSON: `{"metric", "baseline", "rows": [{"method",
/// "k", "column", "mean", "ci_low", "ci_high", "seeds", "p_vs_baseline", "interval"}],
/// "verdicts": [{"method", "k", "column", "exploratory", "diff", "ci_low", "ci_high", "p",
/// "verdict", "seeds_missing"}], "reference", "margin"}`; fractions, not points.
pub fn table_json(t: &Table, verdicts: Option<&super::verdict::VerdictTable>) -> serde_json::Value {
    let mut rows = Vec::new();
    for ((m, k), es) in &t.rows {
        for (c, e) in t.columns.iter().zip(es) {
            if let Some(e) = e {
                rows.push(serde_json::json!({
                    "method": m, "k": k_label(m, *k), "column": c, "mean": e.mean,
                    "ci_low": e.low, "ci_high": e.high, "seeds": e.seeds, "p_vs_baseline": e.p,
                    "interval": e.interval.name(),
                }));
            }
        }
    }
    let mut doc = serde_json::json!({
        "metric": t.metric, "baseline": t.baseline, "rows": rows, "missing_pairs": t.missing,
    });
    if let Some(v) = verdicts {
        let mut out = Vec::new();
        for ((m, k), js) in &v.rows {
            for (c, j) in v.columns.iter().zip(js) {
                if let Some(j) = j {
                    out.push(serde_json::json!({
                        "method": m, "k": k_label(m, *k), "column": c,
                        "exploratory": super::verdict::exploratory(c, &v.columns),
                        "diff": j.paired.diff, "ci_low": j.paired.low, "ci_high": j.paired.high,
                        "p": j.paired.p, "verdict": j.verdict.name(),
                        "seeds_paired": j.paired.seeds, "seeds_missing": j.paired.missing,
                    }));
                }
            }
        }
        doc["verdicts"] = out.into();
        doc["reference"] = v.reference.clone().into();
        doc["margin"] = v.margin.into();
    }
    doc
}

/// The table in Bencher Metric Format (<https://bencher.dev>): one benchmark per method, K and
/// column, named `<experiment>/<method>/K<k>/<column>`, with the table's metric as the measure
/// (the mean over seeds, x 100) and its interval as `lower_value` and `upper_value`.
pub fn bencher_metric_format(t: &Table, experiment: Option<&str>) -> serde_json::Value {
    let mut doc = serde_json::Map::new();
    for ((m, k), es) in &t.rows {
        for (c, e) in t.columns.iter().zip(es) {
            if let Some(e) = e {
                let name = format!(
                    "{}/{m}/K{}/{c}",
                    experiment.unwrap_or("mlbench"),
                    k_label(m, *k)
                );
                let measure = |v: f64| (v * 100.0 * 1e6).round() / 1e6;
                doc.insert(
                    name,
                    serde_json::json!({ t.metric.as_str(): {
                        "value": measure(e.mean),
                        "lower_value": measure(e.low),
                        "upper_value": measure(e.high),
                    }}),
                );
            }
        }
    }
    serde_json::Value::Object(doc)
}

/// Rows of cells (the first one the header) as aligned plain-text columns, with a rule of
/// dashes under the header.
pub fn text_grid(rows: &[Vec<String>]) -> String {
    let Some(first) = rows.first() else {
        return String::new();
    };
    let widths: Vec<usize> = (0..first.len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for (i, r) in rows.iter().enumerate() {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(x, w)| format!("{x:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
        if i == 0 {
            let dashes: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
            out.push_str(&dashes.join("  "));
            out.push('\n');
        }
    }
    out
}

fn fmt_entry(e: &Option<Entry>) -> String {
    match e {
        None => "-".into(),
        Some(e) => format!(
            "{:.1} ±{:.1}{}",
            100.0 * e.mean,
            100.0 * (e.high - e.low) / 2.0,
            if e.p.is_some_and(|p| p < 0.05) {
                "*"
            } else {
                ""
            }
        ),
    }
}

fn row_label(m: &str, k: Option<i64>) -> (String, String) {
    (m.to_string(), k_label(m, k))
}

/// How a row's budget is shown: K, `0` for the untrained base model, `full` for full data.
pub fn k_label(method: &str, k: Option<i64>) -> String {
    match k {
        Some(k) => k.to_string(),
        None if method == "base" => "0".into(),
        None => "full".into(),
    }
}

impl Table {
    pub fn footnote(&self) -> String {
        let kinds: std::collections::BTreeSet<Interval> = self
            .rows
            .iter()
            .flat_map(|(_, es)| es.iter().flatten().map(|e| e.interval))
            .collect();
        let kinds: Vec<String> = kinds.into_iter().map(Interval::describe).collect();
        let mut s = format!(
            "{} x 100, mean over seeds ± half the 95% interval ({}).",
            self.metric,
            kinds.join("; ")
        );
        if let Some(b) = &self.baseline {
            s.push_str(&format!(
                " * differs from `{b}`: paired two-level bootstrap (seeds, then items; pairs within a seed only), p < 0.05."
            ));
        }
        for m in &self.missing {
            s.push_str(&format!(" Missing pair: {m}."));
        }
        s
    }

    /// Plain-text table for the terminal.
    pub fn text(&self) -> String {
        let mut header = vec!["method".to_string(), "K".to_string()];
        header.extend(self.columns.iter().cloned());
        let mut rows: Vec<Vec<String>> = vec![header];
        for ((m, k), es) in &self.rows {
            let (a, b) = row_label(m, *k);
            let mut r = vec![a, b];
            r.extend(es.iter().map(fmt_entry));
            rows.push(r);
        }
        let mut out = text_grid(&rows);
        out.push_str(&self.footnote());
        out.push('\n');
        out
    }

    /// Markdown table.
    pub fn markdown(&self) -> String {
        let mut s = format!("| method | K | {} |\n", self.columns.join(" | "));
        s.push_str(&format!("|---|---|{}\n", "---|".repeat(self.columns.len())));
        for ((m, k), es) in &self.rows {
            let (a, b) = row_label(m, *k);
            s.push_str(&format!(
                "| {a} | {b} | {} |\n",
                es.iter().map(fmt_entry).collect::<Vec<_>>().join(" | ")
            ));
        }
        s.push_str(&format!("\n{}\n", self.footnote()));
        s
    }

    /// CSV: one line per method x K x column with mean, interval, seeds, p-value and the
    /// interval's kind ([`Interval::name`]).
    pub fn csv(&self) -> String {
        let mut s =
            String::from("method,k,column,mean,ci_low,ci_high,seeds,p_vs_baseline,interval\n");
        for ((m, k), es) in &self.rows {
            for (c, e) in self.columns.iter().zip(es) {
                if let Some(e) = e {
                    s.push_str(&format!(
                        "{m},{},{c},{:.6},{:.6},{:.6},{},{},{}\n",
                        k_label(m, *k),
                        e.mean,
                        e.low,
                        e.high,
                        e.seeds,
                        e.p.map(|p| format!("{p:.6}")).unwrap_or_default(),
                        e.interval.name()
                    ));
                }
            }
        }
        s
    }

    /// LaTeX (booktabs): one `table` per task (a wide multi-task table would overflow a page),
    /// the task as a spanning header over its languages and averages, the best mean of each
    /// column in bold, and a caption that states the interval and the test.
    pub fn latex(&self) -> String {
        let esc = |x: &str| {
            x.replace('_', "\\_")
                .replace('%', "\\%")
                .replace('&', "\\&")
                .replace('±', "$\\pm$")
                .replace('<', "$<$")
                .replace('>', "$>$")
                .replace('`', "")
        };
        let mut tasks: Vec<&str> = Vec::new();
        for c in &self.columns {
            let t = c.split_once('/').map_or(c.as_str(), |(t, _)| t);
            if !tasks.contains(&t) {
                tasks.push(t);
            }
        }
        let mut s = String::new();
        for task in tasks {
            let idx: Vec<usize> = (0..self.columns.len())
                .filter(|&i| self.columns[i].split_once('/').map(|(t, _)| t) == Some(task))
                .collect();
            // The best mean per column (ties all bold).
            let best: Vec<f64> = idx
                .iter()
                .map(|&i| {
                    self.rows
                        .iter()
                        .filter_map(|(_, es)| es[i].as_ref().map(|e| e.mean))
                        .fold(f64::MIN, f64::max)
                })
                .collect();
            s.push_str("\\begin{table}[t]\n\\centering\n\\small\n");
            s.push_str(&format!(
                "\\caption{{{} on {}. {}}}\n",
                esc(&self.metric),
                esc(task),
                esc(&self.footnote())
            ));
            s.push_str(&format!(
                "\\begin{{tabular}}{{ll{}}}\n\\toprule\n",
                "r".repeat(idx.len())
            ));
            s.push_str(&format!(
                " & & \\multicolumn{{{}}}{{c}}{{{}}} \\\\\n\\cmidrule(lr){{3-{}}}\n",
                idx.len(),
                esc(task),
                2 + idx.len()
            ));
            let heads: Vec<String> = idx
                .iter()
                .map(|&i| esc(self.columns[i].split_once('/').map_or("", |(_, l)| l)))
                .collect();
            s.push_str(&format!(
                "method & $K$ & {} \\\\\n\\midrule\n",
                heads.join(" & ")
            ));
            for ((m, k), es) in &self.rows {
                let (a, b) = row_label(m, *k);
                let cells: Vec<String> = idx
                    .iter()
                    .zip(&best)
                    .map(|(&i, &top)| match &es[i] {
                        None => "--".into(),
                        Some(e) => {
                            let v = format!("{:.1}", 100.0 * e.mean);
                            let v = if (e.mean - top).abs() < 1e-12 {
                                format!("\\textbf{{{v}}}")
                            } else {
                                v
                            };
                            format!(
                                "{v}$\\pm${:.1}{}",
                                100.0 * (e.high - e.low) / 2.0,
                                if e.p.is_some_and(|p| p < 0.05) {
                                    "$^*$"
                                } else {
                                    ""
                                }
                            )
                        }
                    })
                    .collect();
                s.push_str(&format!("{} & {b} & {} \\\\\n", esc(&a), cells.join(" & ")));
            }
            s.push_str("\\bottomrule\n\\end{tabular}\n\\end{table}\n\n");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_seeds_that_agree_get_the_bootstrap_interval_not_a_zero_width_t() {
        // Two seeds of 40 items, both 20 right (different items): t over the seed means has
        // zero width; the two-level bootstrap keeps the item noise (about +-15 points).
        let seed_items = |shift: usize| -> BTreeMap<String, BTreeMap<String, bool>> {
            let by_id = (0..40)
                .map(|i| (format!("i{i}"), (i + shift) % 40 < 20))
                .collect();
            BTreeMap::from([("en".to_string(), by_id)])
        };
        let mut o = CellOutcomes::new();
        o.insert(
            ("lora-k".into(), Some(16), "t".into()),
            BTreeMap::from([(0, seed_items(0)), (1, seed_items(10))]),
        );
        let runs: Runs = BTreeMap::from([(0, (0.5, 0.35, 0.65)), (1, (0.5, 0.35, 0.65))]);
        let (m, c) = ("lora-k".to_string(), "t/en".to_string());
        let mut missing = Vec::new();
        let q = Query::default();
        let e = entry(&runs, &q, (&m, Some(16), &c), &o, &mut missing);
        assert_eq!(e.interval, Interval::Bootstrap);
        assert!((e.mean - 0.5).abs() < 1e-12);
        assert!(e.low < 0.42 && e.high > 0.58, "{e:?}");
        // The same runs without per-example records, or with records of another metric (their
        // per-seed accuracy is not the runs' value): t over the seed means.
        let e = entry(
            &runs,
            &q,
            (&m, Some(16), &c),
            &CellOutcomes::new(),
            &mut missing,
        );
        assert_eq!((e.interval, e.low, e.high), (Interval::T, 0.5, 0.5));
        let other: Runs = BTreeMap::from([(0, (0.6, 0.45, 0.75)), (1, (0.4, 0.25, 0.55))]);
        let e = entry(&other, &q, (&m, Some(16), &c), &o, &mut missing);
        assert_eq!(e.interval, Interval::T);
        assert!(
            (e.mean - 0.5).abs() < 1e-12 && e.high - e.low > 0.5,
            "{e:?}"
        );
    }

    #[test]
    fn mcnemar_exact_matches_hand_values() {
        // b=0, c=6: p = 2 * 0.5^6 = 0.03125.
        assert!((mcnemar_exact(0, 6) - 0.03125).abs() < 1e-12);
        // b=1, c=5: 2 * (1 + 6) / 64 = 0.21875.
        assert!((mcnemar_exact(1, 5) - 0.21875).abs() < 1e-12);
        assert_eq!(mcnemar_exact(3, 3), 1.0);
        assert_eq!(mcnemar_exact(0, 0), 1.0);
    }

    #[test]
    fn a_seed_free_run_pairs_with_every_seed_of_the_other_side() {
        // base (one run, seed 0) against a reference with seeds 0, 1, 2.
        let items = |v: &[bool]| -> BTreeMap<String, BTreeMap<String, bool>> {
            let by_id = v
                .iter()
                .enumerate()
                .map(|(i, &c)| (format!("i{i}"), c))
                .collect();
            BTreeMap::from([("en".to_string(), by_id)])
        };
        let base: Outcomes = BTreeMap::from([(0, items(&[true, false, false, false]))]);
        let reference: Outcomes = (0..3)
            .map(|s| (s, items(&[true, true, s != 2, true])))
            .collect();
        let mut o = CellOutcomes::new();
        o.insert(("base".into(), None, "t".into()), base);
        o.insert(("lora-full".into(), None, "t".into()), reference.clone());
        let one = pair_with(&o, "base", None, "lora-full", "t/micro", &[]).unwrap();
        assert_eq!((one.seeds.clone(), one.items), (vec![0], 4));
        let all = pair_with(&o, "base", None, "lora-full", "t/micro", &["base".into()]).unwrap();
        assert_eq!((all.seeds.clone(), all.items), (vec![0, 1, 2], 12));
        // Seeds 0 and 1: 1/4 - 4/4; seed 2: 1/4 - 3/4.
        assert!(
            (all.diff - (-0.75 - 0.75 - 0.5) / 3.0).abs() < 1e-12,
            "{}",
            all.diff
        );
        assert!(all.missing.is_empty());
        // Spreading applies to a side with one run only.
        let two: Outcomes = BTreeMap::from([(0, items(&[true])), (1, items(&[false]))]);
        assert_eq!(spread(two.clone(), true, &reference), two);
    }
}

/// A metric that fell between two runs of the same cells.
#[derive(Debug, Clone, PartialEq)]
pub struct Regression {
    pub method: String,
    pub k: Option<i64>,
    pub task: String,
    pub lang: String,
    pub before: f64,
    pub after: f64,
    /// Exact McNemar p-value on the paired examples (same id and seed).
    pub p: f64,
}

/// The runs in a store, oldest first: each code version with the time its last cell finished.
pub fn runs(metrics: &DataFrame) -> Result<Vec<(String, u64)>> {
    let v = strs(metrics, "code_version")?;
    let t: Vec<u64> = metrics
        .column("finished_at_unix")?
        .u64()?
        .iter()
        .map(|x| x.unwrap_or(0))
        .collect();
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    for (v, t) in v.into_iter().zip(t) {
        let e = last.entry(v).or_insert(0);
        *e = (*e).max(t);
    }
    let mut out: Vec<(String, u64)> = last.into_iter().collect();
    out.sort_by_key(|(v, t)| (*t, v.clone()));
    Ok(out)
}

/// A per-language cell of two runs: (method, K, task, language).
type CellKey = (String, Option<i64>, String, String);

/// Per cell and run (`false` before, `true` after): the values of every seed, and whether
/// higher is better.
type RunValues = BTreeMap<(CellKey, bool), (Vec<f64>, bool)>;

/// Per cell and run: (seed, example id) -> correct.
type RunOutcomes = BTreeMap<(CellKey, bool), BTreeMap<(u64, String), bool>>;

/// Which of the two compared runs a row belongs to: `Some(false)` before, `Some(true)` after.
fn which_run(version: &str, before: &str, after: &str) -> Option<bool> {
    if version == before {
        Some(false)
    } else if version == after {
        Some(true)
    } else {
        None
    }
}

/// One cell the regression gate compared: its `metric` (mean over seeds) in both runs, the
/// exact McNemar p-value on the examples both runs scored (`None` when they share none), and
/// whether it counts as a regression.
#[derive(Debug, Clone, PartialEq)]
pub struct GateCheck {
    pub method: String,
    pub k: Option<i64>,
    pub task: String,
    pub lang: String,
    pub before: f64,
    pub after: f64,
    /// How far the metric moved the wrong way, in points (negative: it improved).
    pub drop_points: f64,
    pub p: Option<f64>,
    pub regressed: bool,
}

/// Every cell (method x K x task x language, per-language rows only) that both runs (code
/// versions `before` and `after`) scored, with its paired test. A cell regressed when `metric`
/// fell by more than `max_drop` points (x 100) and the exact McNemar test gives p < 0.05;
/// metrics where lower is better count a rise as a drop.
pub fn gate_checks(
    metrics: &DataFrame,
    samples: &DataFrame,
    before: &str,
    after: &str,
    metric: &str,
    max_drop: f64,
) -> Result<Vec<GateCheck>> {
    let means = run_values(metrics, (before, after), metric)?;
    let outcomes = run_outcomes(samples, (before, after))?;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let mut out = Vec::new();
    for ((key, which), (vals, higher)) in &means {
        if *which {
            continue;
        }
        let Some((after_vals, _)) = means.get(&(key.clone(), true)) else {
            continue;
        };
        let (b, a) = (mean(vals), mean(after_vals));
        let drop_points = 100.0 * if *higher { b - a } else { a - b };
        let p = match (
            outcomes.get(&(key.clone(), false)),
            outcomes.get(&(key.clone(), true)),
        ) {
            (Some(ob), Some(oa)) => Some(mcnemar_paired(ob, oa)),
            _ => None,
        };
        out.push(GateCheck {
            method: key.0.clone(),
            k: key.1,
            task: key.2.clone(),
            lang: key.3.clone(),
            before: b,
            after: a,
            drop_points,
            p,
            regressed: drop_points > max_drop && p.is_some_and(|p| p < 0.05),
        });
    }
    Ok(out)
}

/// The cells of [`gate_checks`] that regressed.
pub fn regressions(
    metrics: &DataFrame,
    samples: &DataFrame,
    before: &str,
    after: &str,
    metric: &str,
    max_drop: f64,
) -> Result<Vec<Regression>> {
    Ok(
        gate_checks(metrics, samples, before, after, metric, max_drop)?
            .into_iter()
            .filter(|c| c.regressed)
            .map(|c| Regression {
                method: c.method,
                k: c.k,
                task: c.task,
                lang: c.lang,
                before: c.before,
                after: c.after,
                p: c.p.unwrap_or(1.0),
            })
            .collect(),
    )
}

/// The gate's verdicts as JSON: the two runs, the rule, whether it passed, and every check.
pub fn gate_json(
    checks: &[GateCheck],
    (before, after): (&str, &str),
    metric: &str,
    max_drop: f64,
) -> serde_json::Value {
    serde_json::json!({
        "metric": metric,
        "before": before,
        "after": after,
        "max_drop_points": max_drop,
        "alpha": 0.05,
        "test": "exact McNemar on paired examples (same id and seed)",
        "passed": !checks.iter().any(|c| c.regressed),
        "checks": checks.iter().map(|c| serde_json::json!({
            "method": c.method, "k": c.k, "task": c.task, "lang": c.lang,
            "before": c.before, "after": c.after, "drop_points": c.drop_points,
            "p_value": c.p, "regressed": c.regressed,
        })).collect::<Vec<_>>(),
    })
}

/// The gate's verdicts in Bencher Metric Format: per cell `<experiment>/gate/<method>/K<k>/
/// <task>/<lang>`, the metric's drop in points, the p-value (when the runs share examples) and
/// `regressed` as 0 or 1.
pub fn gate_bmf(checks: &[GateCheck], experiment: Option<&str>, metric: &str) -> serde_json::Value {
    let mut doc = serde_json::Map::new();
    for c in checks {
        let name = format!(
            "{}/gate/{}/K{}/{}/{}",
            experiment.unwrap_or("mlbench"),
            c.method,
            k_label(&c.method, c.k),
            c.task,
            c.lang
        );
        let mut m = serde_json::Map::new();
        m.insert(
            format!("{metric}_drop_points"),
            serde_json::json!({"value": c.drop_points}),
        );
        if let Some(p) = c.p {
            m.insert("gate_p_value".into(), serde_json::json!({"value": p}));
        }
        m.insert(
            "gate_regressed".into(),
            serde_json::json!({"value": f64::from(u8::from(c.regressed))}),
        );
        doc.insert(name, serde_json::Value::Object(m));
    }
    serde_json::Value::Object(doc)
}

/// The values of `metric` per cell and run (of `(before, after)`), per seed, with whether
/// higher is better.
fn run_values(
    metrics: &DataFrame,
    (before, after): (&str, &str),
    metric: &str,
) -> Result<RunValues> {
    let (method, task, lang, m, ver) = (
        strs(metrics, "method")?,
        strs(metrics, "task")?,
        strs(metrics, "lang")?,
        strs(metrics, "metric")?,
        strs(metrics, "code_version")?,
    );
    let k: Vec<Option<i64>> = metrics.column("k")?.i64()?.iter().collect();
    let val = f64s(metrics, "value")?;
    let hib: Vec<bool> = metrics
        .column("higher_is_better")?
        .bool()?
        .iter()
        .map(|x| x.unwrap_or(true))
        .collect();
    let mut means = RunValues::new();
    for i in 0..metrics.height() {
        if m[i] != metric || lang[i] == "micro" || lang[i] == "macro" {
            continue;
        }
        let Some(which) = which_run(&ver[i], before, after) else {
            continue;
        };
        let e = means
            .entry((
                (method[i].clone(), k[i], task[i].clone(), lang[i].clone()),
                which,
            ))
            .or_insert((Vec::new(), hib[i]));
        e.0.push(val[i]);
    }
    Ok(means)
}

/// The per-example outcomes per cell and run (of `(before, after)`): (seed, id) -> correct.
fn run_outcomes(samples: &DataFrame, (before, after): (&str, &str)) -> Result<RunOutcomes> {
    let (sm, st, sl, sid, sv) = (
        strs(samples, "method")?,
        strs(samples, "task")?,
        strs(samples, "lang")?,
        strs(samples, "id")?,
        strs(samples, "code_version")?,
    );
    let sk: Vec<Option<i64>> = samples.column("k")?.i64()?.iter().collect();
    let ss = seeds(samples)?;
    let sc: Vec<bool> = samples
        .column("correct")?
        .bool()?
        .iter()
        .map(|x| x.unwrap_or(false))
        .collect();
    let mut outcomes = RunOutcomes::new();
    for i in 0..samples.height() {
        let Some(which) = which_run(&sv[i], before, after) else {
            continue;
        };
        outcomes
            .entry(((sm[i].clone(), sk[i], st[i].clone(), sl[i].clone()), which))
            .or_default()
            .insert((ss[i], sid[i].clone()), sc[i]);
    }
    Ok(outcomes)
}

/// The exact McNemar p-value of the examples both runs scored (`before`, `after`).
fn mcnemar_paired(
    before: &BTreeMap<(u64, String), bool>,
    after: &BTreeMap<(u64, String), bool>,
) -> f64 {
    let (mut worse, mut better) = (0usize, 0usize);
    for (id, &x) in before {
        if let Some(&y) = after.get(id) {
            if x && !y {
                worse += 1;
            } else if !x && y {
                better += 1;
            }
        }
    }
    mcnemar_exact(worse, better)
}

/// The keys of the newest cell (by finish time) of each (experiment, method, K, seed): what a
/// comparison shows when a store holds several runs of a grid.
pub fn newest_keys(metrics: &DataFrame) -> Result<std::collections::HashSet<String>> {
    let (exp, method, key) = (
        metrics.column("experiment")?.str()?,
        metrics.column("method")?.str()?,
        metrics.column("key")?.str()?,
    );
    let k = metrics.column("k")?.i64()?;
    let seed = metrics.column("seed")?.u64()?;
    let t = metrics.column("finished_at_unix")?.u64()?;
    type Cell<'a> = (&'a str, &'a str, Option<i64>, Option<u64>);
    let mut best: BTreeMap<Cell, (u64, &str)> = BTreeMap::new();
    for i in 0..metrics.height() {
        let cell = (
            exp.get(i).unwrap_or(""),
            method.get(i).unwrap_or(""),
            k.get(i),
            seed.get(i),
        );
        let cand = (t.get(i).unwrap_or(0), key.get(i).unwrap_or(""));
        let e = best.entry(cell).or_insert(cand);
        if cand > *e {
            *e = cand;
        }
    }
    Ok(best.into_values().map(|(_, k)| k.to_string()).collect())
}

/// The rows of `df` whose `key` is in `keys`.
pub fn with_keys(df: &DataFrame, keys: &std::collections::HashSet<String>) -> Result<DataFrame> {
    let mask: BooleanChunked = df
        .column("key")?
        .str()?
        .iter()
        .map(|k| k.is_some_and(|k| keys.contains(k)))
        .collect();
    Ok(df.filter(&mask)?)
}

/// The rows of `df` from run `version` (a code version as stored).
pub fn of_run(df: &DataFrame, version: &str) -> Result<DataFrame> {
    let mask: BooleanChunked = df
        .column("code_version")?
        .str()?
        .iter()
        .map(|v| v == Some(version))
        .collect();
    Ok(df.filter(&mask)?)
}

/// One comparison table per run (code version) of the store, oldest first, for metric trends;
/// runs with no matching rows are left out.
pub fn history(metrics: &DataFrame, q: &Query) -> Result<Vec<(String, u64, Table)>> {
    let mut out = Vec::new();
    let empty = DataFrame::empty();
    for (v, t) in runs(metrics)? {
        let df = of_run(metrics, &v)?;
        match table(
            &df,
            &empty,
            &Query {
                baseline: None,
                ..q.clone()
            },
        ) {
            Ok(tab) => out.push((v, t, tab)),
            Err(Error::Invalid(_)) => continue,
            Err(e) => return Err(e),
        }
    }
    if out.is_empty() {
        return Err(Error::Invalid(format!(
            "no run in the store has results for metric `{}`",
            q.metric
        )));
    }
    Ok(out)
}
