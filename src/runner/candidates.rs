//! Every candidate of a study's selection, for its report (`../shared/docs/study.md`, section 2:
//! "record every candidate's dev score and the choice"; section 4's collapse check and norms).
//!
//! In: the store's selection record of an experiment ([`super::select::read_record`]: per
//! searched method its split, budget, seed, metric, the candidates with their settings, cell key
//! and score, and the choice) and the candidates' finished cells (per-example `pred`/`gold` on
//! the selection split, `cell.json`, and the training run's `log.parquet` when the store still
//! has it). Out: one [`Search`] per method, one [`Candidate`] row per candidate — its dev score,
//! whether it was chosen, the most predicted label's largest share over the tasks and languages
//! with the units that collapsed ([`super::study::LabelDist::collapsed`]), and for the meta
//! methods the mean inner displacement `|theta_i - theta|` and outer update `|theta' - theta|`
//! over the run — as Markdown, CSV and HTML.
//!
//! A candidate whose cell is not finished has no score and no diagnostics (shown as "-"); one
//! finished after the record was written gets its score from its cell, as the runner will
//! record it; the norms are missing when the run's step log is gone from the store.

use std::collections::HashSet;

use polars::prelude::*;

use super::store::{Store, SAMPLE_COLUMNS};
use super::study::{self, html_rows};
use crate::error::Result;

/// One candidate of one method's search.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Candidate {
    /// `key=value` of the searched settings, in key order.
    pub settings: String,
    pub key: String,
    /// The selection metric (a fraction), once the cell is finished.
    pub score: Option<f64>,
    pub chosen: bool,
    /// Examples with a predicted and a gold label on the selection split.
    pub n: usize,
    /// The largest share one predicted label takes in any task and language, and where
    /// (`task/lang`).
    pub top: Option<(f64, String)>,
    /// The `task/lang` units whose predictions collapsed onto one label.
    pub collapsed: Vec<String>,
    /// Mean over meta-iterations of the mean inner displacement norm (meta methods).
    pub inner_norm: Option<f64>,
    /// Mean outer (or optimizer) update norm per step.
    pub update_norm: Option<f64>,
}

/// One searched method: where it was selected and its candidates in the search's order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Search {
    pub method: String,
    pub split: String,
    pub k: Option<i64>,
    pub seed: u64,
    pub metric: String,
    /// The other study's record the choice was taken from (its candidates ran there).
    pub from: Option<String>,
    pub rows: Vec<Candidate>,
}

/// `key=value` pairs of a settings object, in key order.
fn settings_text(v: &serde_json::Value) -> String {
    v.as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

fn mean(v: &[(f64, f64)]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().map(|p| p.1).sum::<f64>() / v.len() as f64)
}

/// The label diagnostics of one candidate from its rows of `samples`.
fn diagnose(c: &mut Candidate, samples: &DataFrame) -> Result<()> {
    let mask: BooleanChunked = samples
        .column("key")?
        .str()?
        .iter()
        .map(|k| k == Some(c.key.as_str()))
        .collect();
    let dists = study::label_distributions(&samples.filter(&mask)?)?;
    c.n = dists.iter().map(|d| d.n()).sum();
    for d in &dists {
        let unit = format!("{}/{}", d.task, d.lang);
        if let Some((_, share, _)) = d.top() {
            if c.top.as_ref().is_none_or(|(s, _)| share > *s) {
                c.top = Some((share, unit.clone()));
            }
        }
        if d.collapsed() {
            c.collapsed.push(unit);
        }
    }
    Ok(())
}

/// The searches of a selection `record` with each candidate's diagnostics from `store`.
pub fn searches(store: &Store, record: &serde_json::Value) -> Result<Vec<Search>> {
    let Some(methods) = record.as_object() else {
        return Ok(vec![]);
    };
    let keys: HashSet<String> = methods
        .values()
        .flat_map(|m| m["candidates"].as_array().into_iter().flatten())
        .filter_map(|c| c["key"].as_str().map(str::to_string))
        .filter(|k| store.is_done(k))
        .collect();
    let samples = if keys.is_empty() {
        DataFrame::empty()
    } else {
        let mut cols: Vec<&str> = SAMPLE_COLUMNS.to_vec();
        cols.extend(["pred", "gold"]);
        super::compare::with_keys(&store.read_columns("samples.parquet", Some(&cols))?, &keys)?
    };
    let infos = study::cell_infos(store, &keys)?;
    let mut out = Vec::new();
    for (method, m) in methods {
        // Cells finished since the record was written have their score computed here (the
        // runner records it at its next start).
        let metric = m["metric"]
            .as_str()
            .and_then(|s| s.split_whitespace().next())
            .unwrap_or("acc");
        let unrecorded: Vec<&str> = m["candidates"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["score"].is_null())
            .filter_map(|c| c["key"].as_str())
            .filter(|k| keys.contains(*k))
            .collect();
        let late = super::select::scores(store, &unrecorded, metric)?;
        let mut s = Search {
            method: method.clone(),
            split: m["split"].as_str().unwrap_or("dev").to_string(),
            k: m["k"].as_i64(),
            seed: m["seed"].as_u64().unwrap_or(0),
            metric: m["metric"].as_str().unwrap_or("").to_string(),
            from: m["from"].as_str().map(str::to_string),
            rows: vec![],
        };
        for c in m["candidates"].as_array().into_iter().flatten() {
            let mut row = Candidate {
                settings: settings_text(&c["settings"]),
                key: c["key"].as_str().unwrap_or("").to_string(),
                score: c["score"]
                    .as_f64()
                    .or_else(|| c["key"].as_str().and_then(|k| late.get(k).copied())),
                chosen: !m["chosen"].is_null() && m["chosen"] == c["settings"],
                ..Default::default()
            };
            if keys.contains(&row.key) {
                diagnose(&mut row, &samples)?;
                let info: Vec<study::CellInfo> =
                    infos.iter().filter(|i| i.key == row.key).cloned().collect();
                if let Some(cv) = study::curves(store, &info)?.first() {
                    row.inner_norm = mean(&cv.inner_norm);
                    row.update_norm = mean(&cv.update_norm);
                }
            }
            s.rows.push(row);
        }
        out.push(s);
    }
    Ok(out)
}

const HEAD: [&str; 8] = [
    "method",
    "candidate",
    "score",
    "chosen",
    "n",
    "largest predicted-label share",
    "collapsed",
    "inner / update norm",
];

fn num(x: Option<f64>, f: impl Fn(f64) -> String) -> String {
    x.map_or_else(|| "-".to_string(), f)
}

/// Whether a candidate's examples were counted: its cell finished in this store (a finished
/// cell always has scored examples; a running one, or one in another study's store, has none).
fn known_n(c: &Candidate) -> bool {
    c.n > 0
}

fn cells(s: &Search, c: &Candidate) -> Vec<String> {
    vec![
        s.method.clone(),
        c.settings.clone(),
        num(c.score, |v| format!("{:.2}", 100.0 * v)),
        if c.chosen {
            "chosen".into()
        } else {
            String::new()
        },
        // Unknown, not zero: a candidate still running, or one whose cell is in the store of
        // the study the settings came from and not in this one.
        if known_n(c) {
            c.n.to_string()
        } else {
            "-".into()
        },
        c.top
            .as_ref()
            .map_or_else(|| "-".into(), |(p, u)| format!("{:.0}% ({u})", 100.0 * p)),
        c.collapsed.join(" "),
        match (c.inner_norm, c.update_norm) {
            (None, None) => "-".into(),
            (i, u) => format!(
                "{} / {}",
                num(i, |v| format!("{v:.3}")),
                num(u, |v| format!("{v:.3}"))
            ),
        },
    ]
}

/// What the columns are, below the tables.
pub fn note(searches: &[Search]) -> String {
    let wheres: Vec<String> = searches
        .iter()
        .map(|s| {
            format!(
                "{} on {} at K = {}, seed {}{}",
                s.method,
                s.split,
                s.k.map_or_else(|| "full".into(), |k| k.to_string()),
                s.seed,
                s.from
                    .as_ref()
                    .map(|f| {
                        let here = s.rows.iter().any(known_n);
                        format!(
                            ", in the study of {f}{}",
                            if here {
                                ""
                            } else {
                                " (its cells are not in this store)"
                            }
                        )
                    })
                    .unwrap_or_default()
            )
        })
        .collect();
    format!(
        "Every candidate of the search, in the search's order ({}). Score: {}, x 100; the highest wins, ties to the first listed. n: examples scored. Largest predicted-label share: over the tasks and languages, the most predicted label's share of one unit's predictions; collapsed: units where one label takes over 80% of the predictions and under 50% of the gold. Norms: means over the run of the inner displacement |theta_i - theta| (meta methods) and of each outer or optimizer update |theta' - theta|.",
        wheres.join("; "),
        searches
            .first()
            .map_or("the selection metric", |s| s.metric.as_str())
    )
}

/// The searches as one Markdown table with its note.
pub fn markdown(searches: &[Search]) -> String {
    let mut s = format!("| {} |\n|{}\n", HEAD.join(" | "), "---|".repeat(HEAD.len()));
    for m in searches {
        for c in &m.rows {
            s.push_str(&format!("| {} |\n", cells(m, c).join(" | ")));
        }
    }
    s.push_str(&format!("\n{}\n", note(searches)));
    s
}

/// The searches as CSV (scores as fractions, norms unrounded).
pub fn csv(searches: &[Search]) -> String {
    let mut s = String::from("method,split,k,seed,settings,key,score,chosen,n,top_share,top_unit,collapsed,inner_norm,update_norm\n");
    let opt = |x: Option<f64>| x.map(|v| v.to_string()).unwrap_or_default();
    for m in searches {
        for c in &m.rows {
            s.push_str(&format!(
                "{},{},{},{},{},{},{},{},{},{},{},{},{},{}\n",
                m.method,
                m.split,
                m.k.map(|k| k.to_string()).unwrap_or_default(),
                m.seed,
                c.settings,
                c.key,
                opt(c.score),
                c.chosen,
                if known_n(c) {
                    c.n.to_string()
                } else {
                    String::new()
                },
                opt(c.top.as_ref().map(|t| t.0)),
                c.top.as_ref().map(|t| t.1.as_str()).unwrap_or(""),
                c.collapsed.join(" "),
                opt(c.inner_norm),
                opt(c.update_norm),
            ));
        }
    }
    s
}

/// The searches as one HTML table.
pub fn html(searches: &[Search]) -> String {
    let rows: Vec<Vec<String>> = searches
        .iter()
        .flat_map(|m| m.rows.iter().map(move |c| cells(m, c)))
        .collect();
    html_rows(&HEAD, &rows, "selection")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn search() -> Search {
        Search {
            method: "meta-lora".into(),
            split: "dev".into(),
            k: Some(64),
            seed: 0,
            metric: "acc (micro over languages, mean over tasks)".into(),
            from: None,
            rows: vec![
                Candidate {
                    settings: "inner_lr=0.001 lr=0.003".into(),
                    key: "aaaa".into(),
                    score: Some(0.6811),
                    chosen: true,
                    n: 693,
                    top: Some((0.31, "sib200/quy_Latn".into())),
                    collapsed: vec![],
                    inner_norm: Some(0.0123),
                    update_norm: Some(0.0456),
                },
                Candidate {
                    settings: "inner_lr=0.01 lr=0.003".into(),
                    key: "bbbb".into(),
                    ..Default::default()
                },
            ],
        }
    }

    #[test]
    fn rows_show_scores_choice_and_missing_cells() {
        let md = markdown(&[search()]);
        assert!(md.contains(
            "| meta-lora | inner_lr=0.001 lr=0.003 | 68.11 | chosen | 693 | 31% (sib200/quy_Latn) |  | 0.012 / 0.046 |"
        ));
        assert!(md.contains("| meta-lora | inner_lr=0.01 lr=0.003 | - |  | - | - |  | - |"));
        assert!(md.contains("meta-lora on dev at K = 64, seed 0"));
        let csv = csv(&[search()]);
        assert_eq!(csv.lines().count(), 3);
        assert!(csv.lines().nth(1).unwrap().starts_with(
            "meta-lora,dev,64,0,inner_lr=0.001 lr=0.003,aaaa,0.6811,true,693,0.31,sib200/quy_Latn,,0.0123,0.0456"
        ));
        assert!(html(&[search()]).contains("<td>68.11</td><td>chosen</td>"));
    }

    #[test]
    fn transferred_rows_leave_n_unknown() {
        let mut s = search();
        s.from = Some("studies/sib200/selection/sib200-study.json".into());
        s.rows[0].n = 0;
        let md = markdown(&[s.clone()]);
        assert!(md.contains("| meta-lora | inner_lr=0.001 lr=0.003 | 68.11 | chosen | - |"));
        assert!(md.contains("(its cells are not in this store)"));
        assert!(csv(&[s.clone()])
            .lines()
            .nth(1)
            .unwrap()
            .contains(",0.6811,true,,"));
        // The other study's cells in the same store: counted and diagnosed as usual.
        s.rows[0].n = 693;
        let md = markdown(&[s]);
        assert!(md.contains("| meta-lora | inner_lr=0.001 lr=0.003 | 68.11 | chosen | 693 |"));
        assert!(md.contains("in the study of studies/sib200/selection/sib200-study.json)"));
    }

    #[test]
    fn settings_are_written_in_key_order() {
        let v = serde_json::json!({"lr": 0.003, "inner_lr": 0.01, "inner_steps": 3});
        assert_eq!(settings_text(&v), "inner_lr=0.01 inner_steps=3 lr=0.003");
    }
}
