//! Stage 6 of the data's journey: reports. A comparison table (and, for a study with a declared
//! reference, its verdicts, budget, diagnostics and setup: [`Study`]) in; a report folder out,
//! written beside its final place and renamed into it: `index.html` (self-contained, plots
//! inline, each shown at its size in CSS pixels), `table.md`, `table.csv`, `table.tex`, the
//! plots as PNG (300 dpi) and SVG ([`plot`], [`figure`]), and for a
//! study `verdicts.{md,csv,tex}` (once its reference has a finished cell), `budget.{md,csv}`,
//! `dynamics.{md,csv}` (one line of diagnostics per cell: [`crate::runner::dynamics`]),
//! `labels.md`, `setup.md`,
//! `curves.{png,svg}` and, when its methods were searched on dev, `selection.{md,csv}`. The page
//! follows `../shared/docs/study.md`, section 5: setup, verdicts, accuracy, budget, the
//! efficiency plot, diagnostics, and a plain-words reading; then every selection candidate.

pub mod figure;
pub mod history;
pub mod plot;

use std::path::Path;

use crate::error::{Error, Result};
use crate::runner::candidates::{self, Search};
use crate::runner::compare::{k_label, Table};
use crate::runner::dynamics;
use crate::runner::study::{self, BudgetRow, Curve, LabelDist, SettingsFrom, Setup};
use crate::runner::verdict::{exploratory, VerdictTable};
use crate::util::write_bytes_atomic;

/// Standard base64 (RFC 4648) of `bytes`, for inline images.
pub fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        out.push(A[(n >> 18) as usize & 63] as char);
        out.push(A[(n >> 12) as usize & 63] as char);
        out.push(if c.len() > 1 {
            A[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if c.len() > 2 {
            A[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

pub(crate) fn esc(s: &str) -> String {
    crate::util::html_escape(s)
}

/// The table as HTML.
fn html_table(t: &Table) -> String {
    let mut s = String::from("<table>\n<thead><tr><th>method</th><th>K</th>");
    for c in &t.columns {
        s.push_str(&format!("<th>{}</th>", esc(c)));
    }
    s.push_str("</tr></thead>\n<tbody>\n");
    for ((m, k), es) in &t.rows {
        s.push_str(&format!(
            "<tr><td>{}</td><td>{}</td>",
            esc(m),
            crate::runner::compare::k_label(m, *k)
        ));
        for e in es {
            match e {
                None => s.push_str("<td>-</td>"),
                Some(e) => s.push_str(&format!(
                    "<td>{:.1} <small>[{:.1}, {:.1}]</small>{}</td>",
                    100.0 * e.mean,
                    100.0 * e.low,
                    100.0 * e.high,
                    if e.p.is_some_and(|p| p < 0.05) {
                        "<sup>*</sup>"
                    } else {
                        ""
                    }
                )),
            }
        }
        s.push_str("</tr>\n");
    }
    s.push_str("</tbody>\n</table>\n");
    s
}

/// Writes folder `out` atomically: `fill` writes the files into a temporary folder beside it,
/// which then replaces `out`.
pub(crate) fn write_folder(out: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io("create directory", parent, e))?;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io("remove", &tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io("create directory", &tmp, e))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(|e| Error::io("remove", out, e))?;
    }
    std::fs::rename(&tmp, out).map_err(|e| Error::io("rename", &tmp, e))?;
    Ok(())
}

/// The figure `<name>.png` of `dir` as an inline `<img>` with id `name` and text `alt`, shown
/// at its layout width (its pixels over [`figure::Scale::PNG`]: the width of its SVG), so that
/// the 300-dpi PNG takes the room the figure was laid out for, only sharper.
pub(crate) fn png_img(dir: &Path, name: &str, alt: &str) -> Result<String> {
    let p = dir.join(format!("{name}.png"));
    let b = std::fs::read(&p).map_err(|e| Error::io("read", &p, e))?;
    if b.len() < 24 || &b[12..16] != b"IHDR" {
        return Err(Error::Invalid(format!("{}: not a PNG file", p.display())));
    }
    let px = u32::from_be_bytes([b[16], b[17], b[18], b[19]]);
    let width =
        (f64::from(px) * f64::from(figure::UNITS_PER_INCH) / f64::from(figure::PNG_DPI)).round();
    Ok(format!(
        r#"<img id="{name}" alt="{alt}" width="{width}" src="data:image/png;base64,{data}">"#,
        alt = esc(alt),
        data = base64(&b)
    ))
}

/// The page head: title and the shared style.
pub(crate) fn html_head(title: &str) -> String {
    format!(
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border-bottom: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
th:first-child, td:first-child, th:nth-child(2), td:nth-child(2) {{ text-align: left; }}
small {{ color: #666; }}
img {{ max-width: 100%; }}
.wide {{ max-width: 100%; overflow-x: auto; }}
td.superior, td.non-inferior {{ background: #e8f4ea; }}
td.inferior {{ background: #f8e6e6; }}
</style></head>
"#,
        title = esc(title)
    )
}

/// The study parts of a report (see the module doc).
pub struct Study {
    /// The verdicts against the reference; `None` while the declared reference has no finished
    /// cell among the compared results (a grid in progress): the report then says so and keeps
    /// the setup, budget and diagnostics, which do not need it.
    pub verdicts: Option<VerdictTable>,
    /// The reference method the verdicts are (or will be) against.
    pub reference: String,
    pub budget: Vec<BudgetRow>,
    pub dists: Vec<LabelDist>,
    pub setup: Setup,
    pub curves: Vec<Curve>,
    /// Whether the methods' settings were chosen on dev (a `[search]` ran, or another study's
    /// choices were taken).
    pub selected: bool,
    /// The other study's selection record the settings came from (`[study] settings_from`).
    pub settings_from: Option<SettingsFrom>,
    /// Every candidate of the selection (empty when nothing was searched).
    pub searches: Vec<Search>,
}

/// A plain-words reading of the verdicts: per row, what the confirmatory columns say, and what
/// the numbers do not say.
pub fn reading(
    v: &VerdictTable,
    dists: &[LabelDist],
    selected: bool,
    settings_from: Option<&SettingsFrom>,
) -> String {
    let mut s = String::new();
    for ((m, k), js) in &v.rows {
        let parts: Vec<String> = v
            .columns
            .iter()
            .zip(js)
            .filter(|(c, _)| !exploratory(c, &v.columns))
            .filter_map(|(c, j)| {
                j.as_ref()
                    .map(|j| format!("{c}: {}", j.describe(|x| format!("{x:+.1}"))))
            })
            .collect();
        if !parts.is_empty() {
            let n = crate::runner::verdict::row_seeds(js);
            s.push_str(&format!(
                "{m} at K = {} against {} ({n} seed{}): {}. ",
                k_label(m, *k),
                v.reference,
                if n == 1 { "" } else { "s" },
                parts.join("; ")
            ));
        }
    }
    let collapsed = study::collapse_warnings(dists);
    if !collapsed.is_empty() {
        s.push_str(&format!(
            "{} cell(s) collapsed onto one label (see the diagnostics); their accuracies measure the collapse, not the method. ",
            collapsed.len()
        ));
    }
    s.push_str(&format!(
        "What this does not say: an inconclusive verdict is not evidence of equivalence; a verdict holds for this model, these tasks and languages, these budgets and the declared margin of {:.1} points only",
        v.margin
    ));
    match settings_from {
        Some(f) if f.same_data => s.push_str(&format!(
            "; the hyper-parameters were chosen on the dev split of the same model, tasks and languages (the selection {}) at one K and seed and fixed for every seed and K, so a method's verdict may change with settings searched at another K",
            f.record
        )),
        Some(f) => s.push_str(&format!(
            "; the hyper-parameters were chosen on the dev split of another study ({}) and used here unchanged, so a method's verdict may change with settings searched on this experiment's own data",
            f.record
        )),
        None if selected => s.push_str(
            "; the hyper-parameters were chosen on the dev split for every searched method alike",
        ),
        None => s.push_str(
            "; no method was tuned (each ran with the experiment file's settings), so a method's verdict may change with its settings",
        ),
    }
    if v.columns.iter().any(|c| exploratory(c, &v.columns)) {
        s.push_str("; per-language verdicts are exploratory");
    }
    if !v.short_rows().0.is_empty() {
        s.push_str(
            "; rows on fewer seeds than the others are interim (their intervals see less of the seed-to-seed spread)",
        );
    }
    s.push('.');
    s
}

/// The study's HTML sections: (setup, verdicts and reading), budget, diagnostics (with every
/// selection candidate).
fn study_sections(st: &Study, dir: &Path) -> Result<[String; 3]> {
    // (table, footnote, reading); while the reference has not finished, one line says why.
    let (verdicts, vfoot, reading) = match &st.verdicts {
        Some(v) => (
            v.html(),
            v.footnote(),
            reading(v, &st.dists, st.selected, st.settings_from.as_ref()),
        ),
        None => (
            format!(
                "<p>No verdicts yet: the declared reference `{}` has no finished cell among these results (the study is in progress). The setup, accuracy, budget and diagnostics below cover the cells that have finished.</p>",
                esc(&st.reference)
            ),
            String::new(),
            "None yet: the reading follows the verdicts.".to_string(),
        ),
    };
    Ok([
        format!(
            r#"<h2>Setup</h2>
{setup}<h2>Verdicts</h2>
<div class="wide">{verdicts}</div><p><small>{vfoot}</small></p>
<h2>Reading</h2>
<p>{reading}</p>
"#,
            setup = st.setup.html(),
            vfoot = esc(&vfoot),
            reading = esc(&reading),
        ),
        format!(
            r#"<h2>Budget</h2>
<div class="wide">{budget}</div><p><small>{bnote}</small></p>
"#,
            budget = study::budget_html(&st.budget),
            bnote = esc(study::BUDGET_NOTE),
        ),
        format!(
            r#"<h2>Diagnostics</h2>
<h3>Per cell</h3>
<div class="wide">{dynamics}</div><p><small>{dnote}</small></p>
<h3>Predicted labels against gold (test)</h3>
<p><small>A cell is flagged when one label takes more than 80% of its predictions and less than 50% of the gold labels.</small></p>
<div class="wide">{labels}</div>
<h3>Training curves</h3>
{curves}
{search}"#,
            dynamics = dynamics::html(&dynamics::summarize(&st.dists, &st.curves)),
            dnote = esc(dynamics::NOTE),
            labels = study::dists_html(&st.dists),
            curves = png_img(
                dir,
                "curves",
                "training loss, dev score and update norms per step"
            )?,
            search = search_section(&st.searches),
        ),
    ])
}

/// The selection section: every candidate's dev score, choice and diagnostics.
fn search_section(searches: &[Search]) -> String {
    if searches.is_empty() {
        return String::new();
    }
    format!(
        "<h2>Selection on dev</h2>\n<div class=\"wide\">{}</div><p><small>{}</small></p>\n",
        candidates::html(searches),
        esc(&candidates::note(searches))
    )
}

fn write_study_files(st: &Study, dir: &Path) -> Result<()> {
    if !st.searches.is_empty() {
        write_bytes_atomic(
            &dir.join("selection.md"),
            candidates::markdown(&st.searches).as_bytes(),
        )?;
        write_bytes_atomic(
            &dir.join("selection.csv"),
            candidates::csv(&st.searches).as_bytes(),
        )?;
    }
    if let Some(v) = &st.verdicts {
        write_bytes_atomic(&dir.join("verdicts.md"), v.markdown().as_bytes())?;
        write_bytes_atomic(&dir.join("verdicts.csv"), v.csv().as_bytes())?;
        write_bytes_atomic(&dir.join("verdicts.tex"), v.latex().as_bytes())?;
    }
    write_bytes_atomic(
        &dir.join("budget.md"),
        study::budget_markdown(&st.budget).as_bytes(),
    )?;
    write_bytes_atomic(
        &dir.join("budget.csv"),
        study::budget_csv(&st.budget).as_bytes(),
    )?;
    let rows = dynamics::summarize(&st.dists, &st.curves);
    write_bytes_atomic(
        &dir.join("dynamics.md"),
        dynamics::markdown(&rows).as_bytes(),
    )?;
    write_bytes_atomic(&dir.join("dynamics.csv"), dynamics::csv(&rows).as_bytes())?;
    write_bytes_atomic(
        &dir.join("labels.md"),
        study::dists_markdown(&st.dists).as_bytes(),
    )?;
    write_bytes_atomic(&dir.join("setup.md"), st.setup.markdown().as_bytes())?;
    plot::write_curves(&st.curves, dir)
}

/// Writes the report folder `out` for table `t` (and the study parts, when given); `title`
/// heads the page and `about` (plain text) says what was compared.
pub fn write_report(
    t: &Table,
    study: Option<&Study>,
    out: &Path,
    title: &str,
    about: &str,
) -> Result<()> {
    write_folder(out, |tmp| {
        write_bytes_atomic(&tmp.join("table.md"), t.markdown().as_bytes())?;
        write_bytes_atomic(&tmp.join("table.csv"), t.csv().as_bytes())?;
        write_bytes_atomic(&tmp.join("table.tex"), t.latex().as_bytes())?;
        plot::write_plots(t, tmp)?;
        let ([head_part, budget_part, diag_part], files) = match study {
            Some(st) => {
                write_study_files(st, tmp)?;
                let mut files: Vec<&str> = Vec::new();
                if st.verdicts.is_some() {
                    files.push("verdicts.md/.csv/.tex");
                }
                files.extend([
                    "budget.md/.csv",
                    "dynamics.md/.csv",
                    "labels.md",
                    "setup.md",
                    "curves.png/.svg",
                ]);
                if !st.searches.is_empty() {
                    files.push("selection.md/.csv");
                }
                (study_sections(st, tmp)?, format!(" {}.", files.join(", ")))
            }
            None => (Default::default(), String::new()),
        };
        // The protocol's order: setup and verdicts, then accuracy, budget, plots, diagnostics.
        let html = format!(
            r#"{head}<body>
<h1>{title}</h1>
<p>{about}</p>
{head_part}<h2>Accuracy</h2>
<div class="wide">{table}</div><p><small>{foot}</small></p>
{budget_part}<h2>Data efficiency</h2>
{eff}
<h2>Per language</h2>
{lang}
{diag_part}<p><small>Files: table.md, table.csv, table.tex, efficiency.png/.svg, languages.png/.svg.{files} {version}</small></p>
</body></html>
"#,
            head = html_head(title),
            title = esc(title),
            about = esc(about),
            table = html_table(t),
            foot = esc(&t.footnote()),
            eff = png_img(
                tmp,
                "efficiency",
                &format!("{} against examples per task", t.metric)
            )?,
            lang = png_img(tmp, "languages", &format!("{} per language", t.metric))?,
            version = esc(&crate::util::code_version()),
        );
        write_bytes_atomic(&tmp.join("index.html"), html.as_bytes())
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(super::base64(i.as_bytes()), o);
        }
    }
}
