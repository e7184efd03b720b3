//! One line per cell of a study's diagnostics (`../shared/docs/study.md`, section 4): did the
//! cell's predictions collapse onto one label, and how far did its update rule move the adapter.
//! The per-language label table and the curves say the same at length; this is the table that
//! compares update rules (`lora-k`, `stage2-only`, `meta-lora`) on the same pools at a glance.
//!
//! In: the label distributions ([`super::study::label_distributions`]) and the training curves
//! ([`super::study::curves`]) of an experiment's cells. Out: one [`CellDynamics`] per (method,
//! K, seed), in the order the cells first appear (label distributions, then cells with a curve
//! only): the units (task x language) scored, the most predicted label's largest share of one
//! unit's predictions with that label's gold share and the unit, the units that collapsed
//! ([`super::study::LabelDist::collapsed`]), the training loss at the start and the end (means
//! of the first and the last tenth of its logged steps, at least one step each), the optimizer
//! steps logged, the mean update norm `|theta' - theta|` per step (the outer update for the meta
//! methods) and the mean inner displacement `|theta_i - theta|` (meta methods); as Markdown,
//! CSV and HTML. A value the store does not hold (a base cell's training, a run whose step log
//! is gone) is "-" (empty in CSV).

use super::compare::k_label;
use super::study::{html_rows, Curve, LabelDist};

/// The diagnostics of one cell.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CellDynamics {
    pub method: String,
    pub k: Option<i64>,
    pub seed: u64,
    /// Task x language units with predicted labels.
    pub units: usize,
    /// The largest share one predicted label takes in a unit: (share, the label's gold share,
    /// `task/lang`, label).
    pub top: Option<(f64, f64, String, i64)>,
    /// The `task/lang` units that collapsed.
    pub collapsed: Vec<String>,
    /// Mean training loss over the first and the last tenth of the logged steps.
    pub loss: Option<(f64, f64)>,
    /// Optimizer (outer) steps logged.
    pub steps: usize,
    /// Mean `|theta' - theta|` per step.
    pub update_norm: Option<f64>,
    /// Mean over meta-iterations of the mean inner displacement (meta methods).
    pub inner_norm: Option<f64>,
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// Means of the first and the last tenth (at least one point each) of `ys`.
fn ends(ys: &[f64]) -> Option<(f64, f64)> {
    let n = ys.len().div_ceil(10);
    Some((mean(&ys[..n])?, mean(&ys[ys.len() - n..])?))
}

/// One row per (method, K, seed) of `dists` and `curves`; see the module doc.
pub fn summarize(dists: &[LabelDist], curves: &[Curve]) -> Vec<CellDynamics> {
    let mut rows: Vec<CellDynamics> = Vec::new();
    let mut row = |method: &str, k: Option<i64>, seed: u64| -> usize {
        match rows
            .iter()
            .position(|r| r.method == method && r.k == k && r.seed == seed)
        {
            Some(i) => i,
            None => {
                rows.push(CellDynamics {
                    method: method.to_string(),
                    k,
                    seed,
                    ..Default::default()
                });
                rows.len() - 1
            }
        }
    };
    let mut at = Vec::new();
    for d in dists {
        at.push(row(&d.method, d.k, d.seed));
    }
    let mut at_curve = Vec::new();
    for c in curves {
        at_curve.push(row(&c.method, c.k, c.seed));
    }
    for (d, &i) in dists.iter().zip(&at) {
        let r = &mut rows[i];
        r.units += 1;
        let unit = format!("{}/{}", d.task, d.lang);
        if let Some((label, share, gold)) = d.top() {
            if r.top.as_ref().is_none_or(|t| share > t.0) {
                r.top = Some((share, gold, unit.clone(), label));
            }
        }
        if d.collapsed() {
            r.collapsed.push(unit);
        }
    }
    for (c, &i) in curves.iter().zip(&at_curve) {
        let r = &mut rows[i];
        let losses: Vec<f64> = c.loss.iter().map(|p| p.1).collect();
        let norms: Vec<f64> = c.update_norm.iter().map(|p| p.1).collect();
        let inner: Vec<f64> = c.inner_norm.iter().map(|p| p.1).collect();
        r.loss = ends(&losses);
        r.steps = losses.len().max(norms.len());
        r.update_norm = mean(&norms);
        r.inner_norm = mean(&inner);
    }
    rows
}

const HEAD: [&str; 9] = [
    "method",
    "K",
    "seed",
    "units",
    "largest predicted-label share (gold share, unit)",
    "collapsed units",
    "loss first -> last tenth",
    "steps",
    "update / inner displacement norm",
];

fn num(x: Option<f64>, digits: usize) -> String {
    x.map_or_else(|| "-".into(), |v| format!("{v:.digits$}"))
}

fn cells(r: &CellDynamics) -> Vec<String> {
    vec![
        r.method.clone(),
        k_label(&r.method, r.k),
        r.seed.to_string(),
        r.units.to_string(),
        r.top.as_ref().map_or_else(
            || "-".into(),
            |(p, g, u, l)| format!("{:.0}% label {l} ({:.0}%, {u})", 100.0 * p, 100.0 * g),
        ),
        format!("{} of {}", r.collapsed.len(), r.units),
        r.loss
            .map_or_else(|| "-".into(), |(a, b)| format!("{a:.3} -> {b:.3}")),
        if r.steps == 0 {
            "-".into()
        } else {
            r.steps.to_string()
        },
        match (r.update_norm, r.inner_norm) {
            (None, None) => "-".into(),
            (u, i) => format!("{} / {}", num(u, 3), num(i, 3)),
        },
    ]
}

/// What the columns are, below the table.
pub const NOTE: &str = "Per cell: the most predicted label's largest share of one unit's test predictions (that label's share of the gold labels, and the unit); units whose predictions collapsed (one label over 80% of the predictions and under 50% of the gold); the training loss averaged over the first and the last tenth of the logged steps; the optimizer steps (outer steps for the meta methods); the mean update norm |theta' - theta| per step and, for the meta methods, the mean inner displacement |theta_i - theta| of stage 1. \"-\": not trained (base) or the run's step log is not in the store.";

/// The rows as Markdown, with [`NOTE`] below.
pub fn markdown(rows: &[CellDynamics]) -> String {
    let mut s = format!("| {} |\n|{}\n", HEAD.join(" | "), "---|".repeat(HEAD.len()));
    for r in rows {
        s.push_str(&format!("| {} |\n", cells(r).join(" | ")));
    }
    s.push_str(&format!("\n{NOTE}\n"));
    s
}

/// The rows as CSV (shares as fractions, norms and losses unrounded).
pub fn csv(rows: &[CellDynamics]) -> String {
    let mut s = String::from("method,k,seed,units,top_share,top_gold_share,top_unit,top_label,collapsed,loss_first,loss_last,steps,update_norm,inner_norm\n");
    let opt = |x: Option<f64>| x.map(|v| v.to_string()).unwrap_or_default();
    for r in rows {
        let top = r.top.as_ref();
        s.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{}\n",
            r.method,
            k_label(&r.method, r.k),
            r.seed,
            r.units,
            opt(top.map(|t| t.0)),
            opt(top.map(|t| t.1)),
            top.map(|t| t.2.as_str()).unwrap_or(""),
            top.map(|t| t.3.to_string()).unwrap_or_default(),
            r.collapsed.join(" "),
            opt(r.loss.map(|l| l.0)),
            opt(r.loss.map(|l| l.1)),
            r.steps,
            opt(r.update_norm),
            opt(r.inner_norm),
        ));
    }
    s
}

/// The rows as an HTML table.
pub fn html(rows: &[CellDynamics]) -> String {
    html_rows(
        &HEAD,
        &rows.iter().map(cells).collect::<Vec<_>>(),
        "dynamics",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn dist(method: &str, lang: &str, pred: &[(i64, usize)]) -> LabelDist {
        LabelDist {
            method: method.into(),
            k: Some(64),
            seed: 1,
            task: "nusax".into(),
            lang: lang.into(),
            pred: pred.iter().copied().collect(),
            gold: BTreeMap::from([(0, 30), (1, 30), (2, 40)]),
        }
    }

    #[test]
    fn a_cell_row_gathers_its_units_collapse_and_training_dynamics() {
        let dists = [
            dist("meta-lora", "ind", &[(1, 90), (2, 10)]),
            dist("meta-lora", "jav", &[(0, 40), (1, 30), (2, 30)]),
            dist("base", "ind", &[(2, 50), (0, 50)]),
        ];
        let curve = Curve {
            method: "meta-lora".into(),
            k: Some(64),
            seed: 1,
            // 20 steps: the first and last tenth are two steps each.
            loss: (0..20).map(|i| (i as f64, 2.0 - 0.1 * i as f64)).collect(),
            dev: vec![],
            inner_norm: vec![(0.0, 0.01), (1.0, 0.03)],
            update_norm: (0..20).map(|i| (i as f64, 0.5)).collect(),
        };
        let rows = summarize(&dists, &[curve]);
        assert_eq!(rows.len(), 2);
        let m = &rows[0];
        assert_eq!((m.method.as_str(), m.units), ("meta-lora", 2));
        let (share, gold, unit, label) = m.top.clone().unwrap();
        assert_eq!((unit.as_str(), label), ("nusax/ind", 1));
        assert!((share - 0.9).abs() < 1e-12 && (gold - 0.3).abs() < 1e-12);
        assert_eq!(m.collapsed, vec!["nusax/ind".to_string()]);
        let (first, last) = m.loss.unwrap();
        assert!((first - 1.95).abs() < 1e-12, "{first}");
        assert!((last - 0.15).abs() < 1e-12, "{last}");
        assert_eq!(m.steps, 20);
        assert!((m.update_norm.unwrap() - 0.5).abs() < 1e-12);
        assert!((m.inner_norm.unwrap() - 0.02).abs() < 1e-12);
        // The base cell: a 50/50 tie goes to the lower label, nothing trained.
        let b = &rows[1];
        assert_eq!(b.top.as_ref().map(|t| t.3), Some(0));
        assert!(b.collapsed.is_empty() && b.loss.is_none() && b.steps == 0);
        let md = markdown(&rows);
        assert!(md.contains("| meta-lora | 64 | 1 | 2 | 90% label 1 (30%, nusax/ind) | 1 of 2 | 1.950 -> 0.150 | 20 | 0.500 / 0.020 |"), "{md}");
        assert!(
            md.contains(
                "| base | 64 | 1 | 1 | 50% label 0 (30%, nusax/ind) | 0 of 1 | - | - | - |"
            ),
            "{md}"
        );
        let csv = csv(&rows);
        assert_eq!(csv.lines().count(), 3);
        assert!(
            csv.lines()
                .nth(1)
                .unwrap()
                .starts_with("meta-lora,64,1,2,0.9,0.3,nusax/ind,1,nusax/ind,1.95"),
            "{csv}"
        );
    }

    #[test]
    fn a_short_log_uses_one_step_at_each_end() {
        assert_eq!(ends(&[3.0, 2.0, 1.0]), Some((3.0, 1.0)));
        assert_eq!(ends(&[]), None);
    }
}
