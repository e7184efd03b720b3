//! The verdict table of the study protocol (`../shared/docs/study.md`, section 3): per method
//! and K, the difference to a declared reference method with its 95% paired two-level bootstrap
//! interval, and whether the method is superior, non-inferior, inferior or inconclusive against
//! a margin declared before the run.
//!
//! In: per-example outcomes ([`super::compare::outcomes`]), the rows (method, K) and columns
//! (`task/micro`, `task/macro`, `task/<lang>`) to show, the reference and the margin in points.
//! Out: a [`VerdictTable`], as text, Markdown, CSV, LaTeX and HTML.
//!
//! Micro and macro columns are the confirmatory ones; per-language verdicts are shown as
//! exploratory (many comparisons, no correction), except for a task evaluated in one language,
//! whose language column is its analysis. Seeds of a method that the reference lacks
//! are listed as missing pairs and left out, never paired with another seed's run (a method
//! no seed enters, such as `base` at 0 shots, has one run that pairs with every seed). The
//! reference's own row and rows without any pair are left out.

use super::compare::{k_label, pair_with, CellOutcomes};
use super::stats::{verdict, Paired, Verdict};

/// One verdict: the paired difference (fractions) and what it says against the margin.
#[derive(Debug, Clone, PartialEq)]
pub struct Judged {
    pub paired: Paired,
    pub verdict: Verdict,
}

impl Judged {
    /// `diff [low, high] verdict` in points, each number written by `num`.
    pub fn describe(&self, num: impl Fn(f64) -> String) -> String {
        format!(
            "{} [{}, {}] {}",
            num(100.0 * self.paired.diff),
            num(100.0 * self.paired.low),
            num(100.0 * self.paired.high),
            self.verdict.name()
        )
    }
}

/// One row of the verdict table: (method, K) and one verdict per column.
pub type VerdictRow = ((String, Option<i64>), Vec<Option<Judged>>);

/// The verdict table.
#[derive(Debug, Clone, PartialEq)]
pub struct VerdictTable {
    pub reference: String,
    /// Non-inferiority margin in accuracy points.
    pub margin: f64,
    /// `task/micro`, `task/macro`, then `task/<lang>` (exploratory).
    pub columns: Vec<String>,
    pub rows: Vec<VerdictRow>,
    /// Missing pairs, one line each.
    pub missing: Vec<String>,
    /// Rows' methods no seed enters, paired with every seed of the reference.
    pub seed_free: Vec<String>,
}

/// Is `column` a language column rather than an average?
pub fn is_language(column: &str) -> bool {
    !matches!(
        column.split_once('/').map(|(_, l)| l),
        Some("micro") | Some("macro")
    )
}

/// Is `column` exploratory among `columns`: a language column of a task that has averages (a
/// task evaluated in one language has no averages, and its language is the analysis).
pub fn exploratory(column: &str, columns: &[String]) -> bool {
    let task = column.split_once('/').map_or(column, |(t, _)| t);
    is_language(column)
        && columns
            .iter()
            .any(|c| !is_language(c) && c.split_once('/').map(|(t, _)| t) == Some(task))
}

/// Builds the verdict table over `rows` (the comparison table's, in its order) and the table's
/// `columns` (reordered: averages first).
pub fn verdicts(
    o: &CellOutcomes,
    rows: &[(String, Option<i64>)],
    columns: &[String],
    reference: &str,
    margin: f64,
    seed_free: &[String],
) -> VerdictTable {
    let mut cols: Vec<String> = columns
        .iter()
        .filter(|c| !exploratory(c, columns))
        .cloned()
        .collect();
    cols.extend(columns.iter().filter(|c| exploratory(c, columns)).cloned());
    let mut out_rows = Vec::new();
    let mut missing = Vec::new();
    for (m, k) in rows {
        if m == reference {
            continue;
        }
        let judged: Vec<Option<Judged>> = cols
            .iter()
            .map(|c| {
                pair_with(o, m, *k, reference, c, seed_free).map(|p| Judged {
                    verdict: verdict(p.low, p.high, margin / 100.0),
                    paired: p,
                })
            })
            .collect();
        for j in judged.iter().flatten() {
            for s in &j.paired.missing {
                let line = format!(
                    "{m} K={}: seed {s} has no `{reference}` run to pair with",
                    k_label(m, *k)
                );
                if !missing.contains(&line) {
                    missing.push(line);
                }
            }
        }
        if judged.iter().any(Option::is_some) {
            out_rows.push(((m.clone(), *k), judged));
        }
    }
    let seed_free = out_rows
        .iter()
        .map(|((m, _), _)| m.clone())
        .filter(|m| seed_free.contains(m))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    VerdictTable {
        reference: reference.to_string(),
        margin,
        columns: cols,
        rows: out_rows,
        missing,
        seed_free,
    }
}

fn cell(j: &Option<Judged>) -> String {
    match j {
        None => "-".into(),
        Some(j) => j.describe(|x| format!("{x:+.1}")),
    }
}

fn header(c: &str, columns: &[String]) -> String {
    if exploratory(c, columns) {
        format!("{c} (expl.)")
    } else {
        c.to_string()
    }
}

/// How many seeds a row's verdicts rest on: the most paired in any of its columns.
pub fn row_seeds(js: &[Option<Judged>]) -> usize {
    js.iter()
        .flatten()
        .map(|j| j.paired.seeds.len())
        .max()
        .unwrap_or(0)
}

impl VerdictTable {
    /// The rows that rest on fewer seeds than the table's best-covered row, as
    /// `(method K, seeds)`, and that most; empty when every row has as many (a study in
    /// progress shows some rows on fewer seeds than others).
    pub fn short_rows(&self) -> (Vec<(String, usize)>, usize) {
        let most = self
            .rows
            .iter()
            .map(|(_, js)| row_seeds(js))
            .max()
            .unwrap_or(0);
        let short = self
            .rows
            .iter()
            .filter(|(_, js)| row_seeds(js) < most)
            .map(|((m, k), js)| (format!("{m} K={}", k_label(m, *k)), row_seeds(js)))
            .collect();
        (short, most)
    }

    /// What the table shows, in one paragraph.
    pub fn footnote(&self) -> String {
        let mut s = format!(
            "Difference to `{r}` in accuracy points (method - {r}), mean over seeds, with the 95% interval of a paired two-level bootstrap (resample seeds, then test items within each seed and language; {n} resamples; pairs only within a seed). Verdict against the declared margin of {m:.1} points: lower bound > 0 superior; > -{m:.1} non-inferior; upper bound < -{m:.1} inferior; otherwise inconclusive. Micro (items pooled) and macro (mean of languages) are the confirmatory columns; per-language verdicts (expl.) are exploratory, with no correction for multiple comparisons.",
            r = self.reference,
            m = self.margin,
            n = super::compare::RESAMPLES,
        );
        for m in &self.seed_free {
            s.push_str(&format!(
                " `{m}` has no seed (untrained and without in-context examples, it is evaluated once): its run is paired with every seed of `{}`.",
                self.reference
            ));
        }
        for m in &self.missing {
            s.push_str(&format!(" Missing pair: {m}."));
        }
        let (short, most) = self.short_rows();
        if !short.is_empty() {
            let list: Vec<String> = short.iter().map(|(r, n)| format!("{r} ({n})")).collect();
            s.push_str(&format!(
                " Seeds: the rows do not rest on as many seeds each; fewer than {most}: {}.",
                list.join(", ")
            ));
        }
        s
    }

    /// The header: method, K, seeds, then the columns (exploratory ones marked).
    fn head(&self) -> Vec<String> {
        let mut h = vec!["method".to_string(), "K".to_string(), "seeds".to_string()];
        h.extend(self.columns.iter().map(|c| header(c, &self.columns)));
        h
    }

    /// Per row its label cells (method, K, seeds paired) and its verdicts as `fmt` writes them:
    /// the one layout every format shares.
    fn labelled<T>(&self, fmt: impl Fn(&Option<Judged>) -> T) -> Vec<([String; 3], Vec<T>)> {
        self.rows
            .iter()
            .map(|((m, k), js)| {
                let label = [m.clone(), k_label(m, *k), row_seeds(js).to_string()];
                (label, js.iter().map(&fmt).collect())
            })
            .collect()
    }

    fn grid(&self) -> Vec<Vec<String>> {
        let mut rows = vec![self.head()];
        for (label, cells) in self.labelled(cell) {
            rows.push(label.into_iter().chain(cells).collect());
        }
        rows
    }

    /// Plain text for the terminal.
    pub fn text(&self) -> String {
        let mut out = format!(
            "Verdicts against `{}` (margin {:.1} points)\n",
            self.reference, self.margin
        );
        out.push_str(&super::compare::text_grid(&self.grid()));
        out.push_str(&self.footnote());
        out.push('\n');
        out
    }

    /// Markdown table.
    pub fn markdown(&self) -> String {
        let rows = self.grid();
        let mut s = format!("| {} |\n", rows[0].join(" | "));
        s.push_str(&format!("|{}\n", "---|".repeat(rows[0].len())));
        for r in &rows[1..] {
            s.push_str(&format!("| {} |\n", r.join(" | ")));
        }
        s.push_str(&format!("\n{}\n", self.footnote()));
        s
    }

    /// CSV: one line per method x K x column.
    pub fn csv(&self) -> String {
        let mut s = String::from(
            "method,k,column,exploratory,diff,ci_low,ci_high,p,verdict,margin,reference,seeds_paired,seeds_missing,items\n",
        );
        for ((m, k), js) in &self.rows {
            for (c, j) in self.columns.iter().zip(js) {
                if let Some(j) = j {
                    let seeds =
                        |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(" ");
                    s.push_str(&format!(
                        "{m},{},{c},{},{:.6},{:.6},{:.6},{:.4},{},{},{},{},{},{}\n",
                        k_label(m, *k),
                        exploratory(c, &self.columns),
                        j.paired.diff,
                        j.paired.low,
                        j.paired.high,
                        j.paired.p,
                        j.verdict.name(),
                        self.margin,
                        self.reference,
                        seeds(&j.paired.seeds),
                        seeds(&j.paired.missing),
                        j.paired.items
                    ));
                }
            }
        }
        s
    }

    /// LaTeX (booktabs) table.
    pub fn latex(&self) -> String {
        let esc = |x: &str| x.replace('_', "\\_").replace('%', "\\%");
        let mut s = format!(
            "\\begin{{tabular}}{{llr{}}}\n\\toprule\n",
            "l".repeat(self.columns.len())
        );
        let heads: Vec<String> = self
            .columns
            .iter()
            .map(|c| esc(&header(c, &self.columns)))
            .collect();
        s.push_str(&format!(
            "method & $K$ & seeds & {} \\\\\n\\midrule\n",
            heads.join(" & ")
        ));
        let tex = |j: &Option<Judged>| match j {
            None => "--".to_string(),
            Some(j) => j.describe(|x| format!("${x:+.1}$")),
        };
        for ([m, k, seeds], cells) in self.labelled(tex) {
            s.push_str(&format!(
                "{} & {k} & {seeds} & {} \\\\\n",
                esc(&m),
                cells.join(" & ")
            ));
        }
        s.push_str("\\bottomrule\n\\end{tabular}\n");
        s.push_str(&format!("% {}\n", self.footnote()));
        s
    }

    /// HTML table (the report's).
    pub fn html(&self) -> String {
        let esc = crate::util::html_escape;
        let mut s = String::from("<table class=\"verdicts\">\n<thead><tr>");
        for h in self.head() {
            s.push_str(&format!("<th>{}</th>", esc(&h)));
        }
        s.push_str("</tr></thead>\n<tbody>\n");
        let td = |j: &Option<Judged>| match j {
            None => "<td>-</td>".to_string(),
            Some(j) => format!(
                "<td class=\"{v}\">{:+.1} <small>[{:+.1}, {:+.1}]</small> <b>{v}</b></td>",
                100.0 * j.paired.diff,
                100.0 * j.paired.low,
                100.0 * j.paired.high,
                v = j.verdict.name()
            ),
        };
        for (label, cells) in self.labelled(td) {
            s.push_str("<tr>");
            for l in label {
                s.push_str(&format!("<td>{}</td>", esc(&l)));
            }
            s.push_str(&cells.concat());
            s.push_str("</tr>\n");
        }
        s.push_str("</tbody>\n</table>\n");
        s
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::runner::stats::Outcomes;

    /// Three seeds of 40 items in one language, `right` of them correct in each seed.
    fn runs(right: usize) -> Outcomes {
        (0..3)
            .map(|s| {
                let items = (0..40).map(|i| (format!("i{i}"), i < right)).collect();
                (s, BTreeMap::from([("en".to_string(), items)]))
            })
            .collect()
    }

    #[test]
    fn a_budgeted_reference_is_paired_at_equal_k_only() {
        // Against lora-k: meta-lora at K = 16 must meet lora-k at K = 16 (equal outcomes), not
        // at K = 64 (20 more right); lora-full, without a budget, has no lora-k to pair with.
        let mut o = CellOutcomes::new();
        let t = "t".to_string();
        o.insert(("lora-k".into(), Some(16), t.clone()), runs(10));
        o.insert(("lora-k".into(), Some(64), t.clone()), runs(30));
        o.insert(("meta-lora".into(), Some(16), t.clone()), runs(10));
        o.insert(("meta-lora".into(), Some(64), t.clone()), runs(38));
        o.insert(("lora-full".into(), None, t.clone()), runs(36));
        let rows: Vec<(String, Option<i64>)> = vec![
            ("lora-full".into(), None),
            ("lora-k".into(), Some(16)),
            ("lora-k".into(), Some(64)),
            ("meta-lora".into(), Some(16)),
            ("meta-lora".into(), Some(64)),
        ];
        let v = verdicts(&o, &rows, &["t/micro".into()], "lora-k", 2.0, &[]);
        let got: Vec<(String, Option<i64>, f64, Verdict)> = v
            .rows
            .iter()
            .map(|((m, k), js)| {
                let j = js[0].as_ref().unwrap();
                (m.clone(), *k, j.paired.diff, j.verdict)
            })
            .collect();
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!((got[0].0.as_str(), got[0].1), ("meta-lora", Some(16)));
        assert_eq!(got[0].2, 0.0);
        assert_eq!((got[1].0.as_str(), got[1].1), ("meta-lora", Some(64)));
        assert!((got[1].2 - 0.2).abs() < 1e-12, "{got:?}");
        assert_eq!(got[1].3, Verdict::Superior);
        assert!(v.missing.is_empty());
    }

    #[test]
    fn each_row_says_how_many_seeds_it_rests_on_and_short_rows_are_named() {
        let mut o = CellOutcomes::new();
        let t = "t".to_string();
        let one_seed = |right| {
            let mut r = runs(right);
            r.retain(|s, _| *s == 0);
            r
        };
        o.insert(("lora-full".into(), None, t.clone()), runs(30));
        o.insert(("lora-k".into(), Some(16), t.clone()), runs(20));
        o.insert(("meta-lora".into(), Some(16), t.clone()), one_seed(20));
        let rows: Vec<(String, Option<i64>)> = vec![
            ("lora-full".into(), None),
            ("lora-k".into(), Some(16)),
            ("meta-lora".into(), Some(16)),
        ];
        let v = verdicts(&o, &rows, &["t/micro".into()], "lora-full", 2.0, &[]);
        let seeds: Vec<usize> = v.rows.iter().map(|(_, js)| row_seeds(js)).collect();
        assert_eq!(seeds, [3, 1]);
        assert_eq!(v.short_rows(), (vec![("meta-lora K=16".to_string(), 1)], 3));
        let md = v.markdown();
        assert!(md.starts_with("| method | K | seeds | t/micro |"), "{md}");
        assert!(md.contains("| meta-lora | 16 | 1 | "), "{md}");
        assert!(md.contains("fewer than 3: meta-lora K=16 (1)."), "{md}");
        assert!(v.latex().contains("meta-lora & 16 & 1 & "), "{}", v.latex());
        assert!(v.html().contains("<td>meta-lora</td><td>16</td><td>1</td>"));
        // Every row on three seeds: no note.
        o.insert(("meta-lora".into(), Some(16), t.clone()), runs(20));
        let v = verdicts(&o, &rows, &["t/micro".into()], "lora-full", 2.0, &[]);
        assert!(v.short_rows().0.is_empty());
        assert!(!v.footnote().contains("Seeds:"), "{}", v.footnote());
    }
}
