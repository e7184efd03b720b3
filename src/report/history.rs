//! Metric trends over runs (`mlbench report --history`): one comparison table per run (code
//! version, oldest first) in; a report folder out with `history.png`/`.svg` (one panel per
//! table column, x = run, one line per method and K with its interval as a band; legend entries,
//! markers and bands drawn by [`super::plot`]'s helpers; the SVG at its size in CSS pixels,
//! the PNG the same figure at 300 dpi, as [`super::figure`] says), `history.csv`, `history.md`
//! and a self-contained `index.html`.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::figure::{write_figure, Figure, Scale};
use super::plot::{
    band, captioned, legend_entry, marker, mesh_at, plot_err, register_font, title_at, Look, COLORS,
};
use super::{esc, html_head, png_img, write_folder};
use crate::error::Result;
use crate::runner::compare::{Entry, Table};
use crate::util::write_bytes_atomic;

/// One run: its code version, the time its last cell finished (Unix seconds) and its table.
pub type Run = (String, u64, Table);

/// `YYYY-MM-DD` (UTC) of a Unix time.
pub fn utc_date(unix: u64) -> String {
    // Days since 1970-01-01 to a proleptic Gregorian date, by 400-year eras of 146,097 days.
    let days = (unix / 86_400) as i64 + 719_468;
    let era = days.div_euclid(146_097);
    let doe = days.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The short name of a run: the git commit of `mlbench X (git abc)`, else the version.
pub fn short_run(version: &str) -> String {
    version
        .split_once("(git ")
        .map(|(_, c)| c.trim_end_matches(')').chars().take(7).collect())
        .unwrap_or_else(|| version.to_string())
}

/// Columns over all runs, in first-seen order; series (method, K) likewise.
fn axes(runs: &[Run]) -> (Vec<String>, Vec<(String, Option<i64>)>) {
    let mut cols: Vec<String> = Vec::new();
    let mut series: Vec<(String, Option<i64>)> = Vec::new();
    for (_, _, t) in runs {
        for c in &t.columns {
            if !cols.contains(c) {
                cols.push(c.clone());
            }
        }
        for (s, _) in &t.rows {
            if !series.contains(s) {
                series.push(s.clone());
            }
        }
    }
    (cols, series)
}

fn entry<'a>(t: &'a Table, s: &(String, Option<i64>), col: &str) -> Option<&'a Entry> {
    let ci = t.columns.iter().position(|c| c == col)?;
    t.rows
        .iter()
        .find(|(r, _)| r == s)
        .and_then(|(_, es)| es[ci].as_ref())
}

fn label(s: &(String, Option<i64>)) -> String {
    match s.1 {
        Some(k) => format!("{} K{k}", s.0),
        None => s.0.clone(),
    }
}

/// Colour (per method) and marker (per K) of each series; lines are solid.
fn styles(series: &[(String, Option<i64>)]) -> Vec<Look> {
    let mut methods: Vec<&str> = Vec::new();
    let mut ks: Vec<Option<i64>> = Vec::new();
    for (m, k) in series {
        if !methods.contains(&m.as_str()) {
            methods.push(m);
        }
        if !ks.contains(k) {
            ks.push(*k);
        }
    }
    ks.sort();
    series
        .iter()
        .map(|(m, k)| {
            let mi = methods.iter().position(|x| x == m).unwrap_or(0);
            let ki = ks.iter().position(|x| x == k).unwrap_or(0);
            Look {
                color: COLORS[mi % COLORS.len()],
                marker: ki,
                dashed: false,
            }
        })
        .collect()
}

/// The history plot: a title, one panel per column over the runs, the legend beside them.
fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, runs: &[Run], s: Scale) -> Result<()> {
    root.fill(&WHITE).map_err(plot_err)?;
    let (cols, series) = axes(runs);
    let looks = styles(&series);
    let metric = runs.first().map(|r| r.2.metric.clone()).unwrap_or_default();
    let ncols = cols.len().clamp(1, 3);
    let nrows = cols.len().max(1).div_ceil(ncols);
    let (title, body) = root.split_vertically(s.upx(40));
    title_at(&title, &format!("{metric} over runs"), 22.0, s)?;
    let (w, _) = body.dim_in_pixel();
    let (plots, legend) = body.split_horizontally(w.saturating_sub(s.upx(LEGEND_W)));
    // The legend, once, beside the panels.
    for (i, (se, look)) in series.iter().zip(&looks).enumerate() {
        let at = (s.px(8), s.px(30 + 20 * i as i32));
        legend_entry(&legend, at, *look, (&label(se), 13), s)?;
    }
    let panels = plots.split_evenly((nrows, ncols));
    for (col, area) in cols.iter().zip(panels.iter()) {
        panel(area, runs, (col, &metric), (&series, &looks), s)?;
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

/// One panel of the history plot: column `col` over the runs, each series as a line with its
/// interval band and a marker per run.
fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    runs: &[Run],
    (col, metric): (&str, &str),
    (series, looks): (&[(String, Option<i64>)], &[Look]),
    s: Scale,
) -> Result<()> {
    let n = runs.len();
    let names: Vec<String> = runs
        .iter()
        .map(|(_, t, _)| utc_date(*t)[5..].to_string())
        .collect();
    let mut chart = captioned(area, col, (16.0, 10), s)?
        .x_label_area_size(s.upx(30))
        .y_label_area_size(s.upx(45))
        .build_cartesian_2d(-0.3f64..(n as f64 - 0.7).max(0.3), 0f64..1f64)
        .map_err(plot_err)?;
    let mut mesh = chart.configure_mesh();
    mesh_at(&mut mesh, (BLACK.mix(0.2), BLACK.mix(0.1)), s);
    mesh.disable_x_mesh()
        .x_labels(n.clamp(1, 10))
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                names.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .x_desc("run (finish date, UTC)")
        .y_desc(metric)
        .draw()
        .map_err(plot_err)?;
    for (se, look) in series.iter().zip(looks) {
        let pts: Vec<(f64, f64, f64, f64)> = runs
            .iter()
            .enumerate()
            .filter_map(|(i, (_, _, t))| {
                entry(t, se, col).map(|e| (i as f64, e.mean, e.low.max(0.0), e.high.min(1.0)))
            })
            .collect();
        if pts.is_empty() {
            continue;
        }
        band(&mut chart, &pts, look.color, 0.12)?;
        look.line(&mut chart, pts.iter().map(|p| (p.0, p.1)).collect(), s)?;
        let plotting = chart.plotting_area();
        for p in &pts {
            let at = plotting.map_coordinate(&(p.0, p.1));
            let abs = plotting.strip_coord_spec();
            let (ox, oy) = abs.get_base_pixel();
            marker(&abs, (at.0 - ox, at.1 - oy), *look, s)?;
        }
    }
    Ok(())
}

/// Width of the legend strip, layout units.
const LEGEND_W: u32 = 190;

/// The trend table as CSV: one row per run x (method, K) x column.
pub fn csv(runs: &[Run]) -> String {
    let (cols, series) = axes(runs);
    let mut s = String::from("run,date,method,k,column,mean,ci_low,ci_high,seeds\n");
    for (v, t, tab) in runs {
        for se in &series {
            for c in &cols {
                if let Some(e) = entry(tab, se, c) {
                    s.push_str(&format!(
                        "\"{}\",{},{},{},{},{:.6},{:.6},{:.6},{}\n",
                        v.replace('"', "\"\""),
                        utc_date(*t),
                        se.0,
                        se.1.map(|k| k.to_string()).unwrap_or_default(),
                        c,
                        e.mean,
                        e.low,
                        e.high,
                        e.seeds
                    ));
                }
            }
        }
    }
    s
}

/// The trend table as Markdown: one row per run x (method, K), one column per table column.
pub fn markdown(runs: &[Run]) -> String {
    let (cols, series) = axes(runs);
    let mut s = format!("| run | date | method | K | {} |\n", cols.join(" | "));
    s.push_str(&format!("|---|---|---|---|{}\n", "---|".repeat(cols.len())));
    for (v, t, tab) in runs {
        for se in &series {
            let vals: Vec<String> = cols
                .iter()
                .map(|c| {
                    entry(tab, se, c)
                        .map(|e| format!("{:.1}", 100.0 * e.mean))
                        .unwrap_or_else(|| "-".into())
                })
                .collect();
            if vals.iter().all(|v| v == "-") {
                continue;
            }
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                short_run(v),
                utc_date(*t),
                se.0,
                crate::runner::compare::k_label(&se.0, se.1),
                vals.join(" | ")
            ));
        }
    }
    s
}

/// Writes the history report folder `out`.
pub fn write_history(runs: &[Run], out: &Path, title: &str, about: &str) -> Result<()> {
    register_font()?;
    let (cols, _) = axes(runs);
    let ncols = cols.len().clamp(1, 3) as u32;
    let size = (
        (460 * ncols).max(640) + LEGEND_W,
        40 + 340 * cols.len().max(1).div_ceil(ncols as usize) as u32,
    );
    write_folder(out, |tmp| {
        write_figure(tmp, "history", size, &History(runs))?;
        let md = markdown(runs);
        write_bytes_atomic(&tmp.join("history.md"), md.as_bytes())?;
        write_bytes_atomic(&tmp.join("history.csv"), csv(runs).as_bytes())?;
        let mut rows = String::new();
        for (v, t, tab) in runs {
            rows.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
                esc(&short_run(v)),
                utc_date(*t),
                tab.rows.len(),
                esc(v)
            ));
        }
        let html = format!(
            r#"{head}<body>
<h1>{title}</h1>
<p>{about}</p>
{img}
<h2>Runs</h2>
<table>
<thead><tr><th>run</th><th>date</th><th>rows</th><th>code version</th></tr></thead>
<tbody>
{rows}</tbody>
</table>
<p><small>Files: history.png/.svg, history.md, history.csv. {version}</small></p>
</body></html>
"#,
            head = html_head(title),
            title = esc(title),
            about = esc(about),
            img = png_img(tmp, "history", "metric over runs")?,
            version = esc(&crate::util::code_version()),
        );
        write_bytes_atomic(&tmp.join("index.html"), html.as_bytes())
    })
}

/// The history plot of some runs, as a [`Figure`].
struct History<'a>(&'a [Run]);

impl Figure for History<'_> {
    fn draw<DB: DrawingBackend>(&self, root: DrawingArea<DB, Shift>, s: Scale) -> Result<()> {
        draw(root, self.0, s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates_match_known_days() {
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(951_782_400), "2000-02-29");
        assert_eq!(utc_date(1_798_761_599), "2026-12-31");
        assert_eq!(utc_date(1_709_251_199), "2024-02-29");
    }

    #[test]
    fn short_run_takes_the_commit() {
        assert_eq!(short_run("mlbench 0.1.0 (git f6c7a99abcd1)"), "f6c7a99");
        assert_eq!(short_run("mlbench 0.1.0"), "mlbench 0.1.0");
    }
}
