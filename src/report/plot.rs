//! Plots of a comparison table, as PNG and SVG with a bundled font (no system fonts needed):
//! the data-efficiency plot (the metric x 100 against examples per task, log x; one line per
//! method with its interval as a band; `lora-full` and `base` as horizontal references with
//! their bands, `lora-full` also at its real K; one panel per column of the table) and a
//! per-language chart (each method at its largest budget, with 95% interval bars). Colours are
//! the Okabe-Ito palette, each method also has its own marker and solid or dashed line, and the
//! legend sits in a strip below the data. The drawing pieces here (a series' `Look`, its
//! marker, a legend entry, an interval band) serve the history plot too ([`super::history`]).
//!
//! Sizes are layout units of 1/96 inch, drawn through one [`Scale`] ([`super::figure`]): the
//! SVG at scale 1 (its size in CSS pixels, as before), the PNG at 300 dpi (every size x 3.125:
//! canvas, fonts, line widths, markers, margins, legend strip; `pHYs` says 300 dpi), so both
//! show the same figure at the same physical size, the PNG sharper. The one thing left
//! unscaled is plotters' own padding of at most 5 pixels above a title or panel caption.

use std::path::Path;

use plotters::chart::MeshStyle;
use plotters::coord::ranged1d::ValueFormatter;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::figure::{write_figure, Figure, Scale};
use crate::error::{Error, Result};
use crate::runner::compare::{k_label, Entry, Table};
use crate::runner::study::Curve;

static FONT: &[u8] = include_bytes!("fonts/DejaVuSans.ttf");

pub(crate) fn register_font() -> Result<()> {
    static ONCE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *ONCE.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok()
            && plotters::style::register_font("sans-serif", FontStyle::Bold, FONT).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(
            "the bundled font could not be registered".into(),
        ))
    }
}

/// The Okabe-Ito palette (distinguishable with the common colour-vision deficiencies), blue
/// first; the yellow last (it reads poorly on white).
pub(crate) const COLORS: [RGBColor; 8] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(0, 0, 0),
    RGBColor(240, 228, 66),
];

/// How a series is drawn besides its colour: a marker (`marker % 4`: circle, triangle, square,
/// cross) and a solid or dashed line.
#[derive(Clone, Copy)]
pub(crate) struct Look {
    pub color: RGBColor,
    pub marker: usize,
    pub dashed: bool,
}

impl Look {
    /// The look of series `i` of a plot: colour `i` of the palette, marker `i`, and a dashed
    /// line for every other series.
    pub fn nth(i: usize) -> Look {
        Look {
            color: COLORS[i % COLORS.len()],
            marker: i,
            dashed: i % 2 == 1,
        }
    }

    /// Draws the marker at `(x, y)` of a chart.
    fn mark<DB: DrawingBackend, CT: plotters::coord::CoordTranslate<From = (f64, f64)>>(
        self,
        chart: &mut ChartContext<DB, CT>,
        pts: &[(f64, f64)],
        s: Scale,
    ) -> Result<()> {
        let (c, r4, r5) = (self.color, s.px(4), s.px(5));
        match self.marker % 4 {
            0 => chart.draw_series(pts.iter().map(|p| Circle::new(*p, r4, c.filled()))),
            1 => chart.draw_series(pts.iter().map(|p| TriangleMarker::new(*p, r5, c.filled()))),
            2 => chart.draw_series(pts.iter().map(|p| {
                EmptyElement::at(*p) + Rectangle::new([(-r4, -r4), (r4, r4)], c.filled())
            })),
            _ => chart.draw_series(
                pts.iter()
                    .map(|p| Cross::new(*p, r5, c.stroke_width(s.stroke(2)))),
            ),
        }
        .map(|_| ())
        .map_err(plot_err)
    }

    /// Draws the line through `pts`, solid or dashed.
    pub fn line<DB: DrawingBackend, CT: plotters::coord::CoordTranslate<From = (f64, f64)>>(
        self,
        chart: &mut ChartContext<DB, CT>,
        pts: Vec<(f64, f64)>,
        s: Scale,
    ) -> Result<()> {
        let style = ShapeStyle::from(self.color).stroke_width(s.stroke(2));
        if self.dashed {
            chart
                .draw_series(DashedLineSeries::new(pts, s.upx(8), s.upx(5), style))
                .map_err(plot_err)?;
        } else {
            chart
                .draw_series(LineSeries::new(pts, style))
                .map_err(plot_err)?;
        }
        Ok(())
    }
}

/// Draws the marker of `look` at pixel `at` of `area` (legends, and points placed by pixel).
pub(crate) fn marker<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    at: (i32, i32),
    look: Look,
    s: Scale,
) -> Result<()> {
    let (c, (x, y), r4, r5) = (look.color, at, s.px(4), s.px(5));
    match look.marker % 4 {
        0 => area.draw(&Circle::new(at, r4, c.filled())),
        1 => area.draw(&TriangleMarker::new(at, r5, c.filled())),
        2 => area.draw(&Rectangle::new(
            [(x - r4, y - r4), (x + r4, y + r4)],
            c.filled(),
        )),
        _ => area.draw(&Cross::new(at, r5, c.stroke_width(s.stroke(2)))),
    }
    .map_err(plot_err)
}

/// One legend entry whose line sample starts at pixel `at` of `area`: a 28-unit line (three
/// dashes when the look is dashed), the marker in its middle, then `name` in `font_size`
/// units; every size at scale `s`.
pub(crate) fn legend_entry<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    at: (i32, i32),
    look: Look,
    (name, font_size): (&str, u32),
    s: Scale,
) -> Result<()> {
    let (x, y) = at;
    let style = ShapeStyle::from(look.color).stroke_width(s.stroke(2));
    let segments: Vec<(i32, i32)> = if look.dashed {
        (0..3).map(|d| (d * 10, d * 10 + 6)).collect()
    } else {
        vec![(0, 28)]
    };
    for (a, b) in segments {
        area.draw(&PathElement::new(
            vec![(x + s.px(a), y), (x + s.px(b), y)],
            style,
        ))
        .map_err(plot_err)?;
    }
    marker(area, (x + s.px(14), y), look, s)?;
    area.draw(&Text::new(
        name.to_string(),
        (x + s.px(36), y - s.px(7)),
        s.font(f64::from(font_size)),
    ))
    .map_err(plot_err)
}

/// The interval band of a series of points `(x, mean, low, high)` in x order: one polygon along
/// the upper ends and back along the lower ends, in `color` at `opacity`. A single point has no
/// band (its interval is drawn as a bar by the caller, where wanted).
pub(crate) fn band<DB: DrawingBackend, CT: plotters::coord::CoordTranslate<From = (f64, f64)>>(
    chart: &mut ChartContext<DB, CT>,
    pts: &[(f64, f64, f64, f64)],
    color: RGBColor,
    opacity: f64,
) -> Result<()> {
    if pts.len() < 2 {
        return Ok(());
    }
    let mut edge: Vec<(f64, f64)> = pts.iter().map(|p| (p.0, p.3)).collect();
    edge.extend(pts.iter().rev().map(|p| (p.0, p.2)));
    chart
        .draw_series(std::iter::once(Polygon::new(edge, color.mix(opacity))))
        .map_err(plot_err)?;
    Ok(())
}

/// A legend strip outside the data: one entry per series (a line sample with its marker, and
/// its name), left to right.
pub(crate) fn legend_strip<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    entries: &[(String, Look)],
    s: Scale,
) -> Result<()> {
    let y = area.dim_in_pixel().1 as i32 / 2;
    let mut x = 20;
    for (name, look) in entries {
        legend_entry(area, (s.px(x), y), *look, (name, 14), s)?;
        x += legend_width(name);
    }
    Ok(())
}

/// The pixels one legend entry takes (line sample, marker, name, gap).
fn legend_width(name: &str) -> i32 {
    60 + 8 * name.chars().count() as i32
}

/// The width a legend strip of these names needs.
fn legend_need(names: &[String]) -> u32 {
    40 + names.iter().map(|n| legend_width(n)).sum::<i32>().max(0) as u32
}

/// The y-axis label of a metric shown x 100.
pub(crate) fn percent_label(metric: &str) -> String {
    if metric.starts_with("acc") {
        format!("Accuracy (%){}", metric.strip_prefix("acc").unwrap_or(""))
    } else {
        format!("{metric} (x 100)")
    }
}

pub(crate) fn plot_err<E: std::fmt::Debug>(e: E) -> Error {
    Error::Invalid(format!("drawing a plot: {e:?}"))
}

/// Sets a chart's mesh sizes at scale `s`: 12-unit tick labels and axis descriptions, 5-unit
/// ticks, a 1-unit black axis, the gridlines `grid` (major) and `light` (minor) 1 unit wide.
pub(crate) fn mesh_at<X, Y, XT, YT, DB>(
    m: &mut MeshStyle<'_, '_, X, Y, DB>,
    (grid, light): (RGBAColor, RGBAColor),
    s: Scale,
) where
    X: Ranged<ValueType = XT> + ValueFormatter<XT>,
    Y: Ranged<ValueType = YT> + ValueFormatter<YT>,
    DB: DrawingBackend,
{
    m.x_label_style(s.font(12.0))
        .y_label_style(s.font(12.0))
        .axis_desc_style(s.font(12.0))
        .set_all_tick_mark_size(s.px(5))
        .axis_style(BLACK.stroke_width(s.stroke(1)))
        .bold_line_style(grid.stroke_width(s.stroke(1)))
        .light_line_style(light.stroke_width(s.stroke(1)));
}

/// Draws `text` in `size` units centred at the top of `area`, 5 units below its top edge, as
/// plotters' `titled` does at scale 1 (its padding, at most 5 pixels, does not scale); returns
/// the text's height in pixels.
pub(crate) fn title_at<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    text: &str,
    size: f64,
    s: Scale,
) -> Result<u32> {
    let style = TextStyle::from(s.font(size)).pos(Pos::new(HPos::Center, VPos::Top));
    let (_, h) = area.estimate_text_size(text, &style).map_err(plot_err)?;
    let w = area.dim_in_pixel().0 as i32;
    area.draw(&Text::new(text.to_string(), (w / 2, s.px(5)), style))
        .map_err(plot_err)?;
    Ok(h)
}

/// A chart builder on `area` with `margin` units all round and `caption` (in `size` units) at
/// the top inside the margin, laid out as plotters' own caption at scale 1, every size at
/// scale `s`.
pub(crate) fn captioned<'a, 'b, DB: DrawingBackend>(
    area: &'a DrawingArea<DB, Shift>,
    caption: &str,
    (size, margin): (f64, u32),
    s: Scale,
) -> Result<ChartBuilder<'a, 'b, DB>> {
    let m = s.upx(margin);
    let h = title_at(&area.margin(m, m, m, m), caption, size, s)?;
    let mut b = ChartBuilder::on(area);
    b.margin(m).margin_top(m + 2 * s.upx(5) + h);
    Ok(b)
}

/// The light grey of the major gridlines, and white (hidden) minor ones.
const GRID: (RGBAColor, RGBAColor) = (RGBAColor(225, 225, 225, 1.0), RGBAColor(255, 255, 255, 1.0));

/// Methods of a table in row order, each with how it is drawn.
fn methods(t: &Table) -> Vec<(String, Look)> {
    let mut v: Vec<String> = Vec::new();
    for ((m, _), _) in &t.rows {
        if !v.contains(m) {
            v.push(m.clone());
        }
    }
    v.into_iter()
        .enumerate()
        .map(|(i, m)| (m, Look::nth(i)))
        .collect()
}

/// The name of a method in a legend: with its real K where it has one (`lora-full`).
fn legend_name(t: &Table, m: &str) -> String {
    match t.real_k.get(m) {
        Some(k) => format!("{m} (K = {k:.0})"),
        None => m.to_string(),
    }
}

/// A metric value as a percentage, clamped to 0..=100.
fn pct(v: f64) -> f64 {
    100.0 * v.clamp(0.0, 1.0)
}

/// The x axis of the efficiency plot: the budgets (and real Ks) with a margin on each side,
/// and a tick at each of them.
struct BudgetAxis {
    min: f64,
    max: f64,
    ticks: Vec<f64>,
}

fn budget_axis(t: &Table) -> BudgetAxis {
    let ks: Vec<f64> = t
        .rows
        .iter()
        .filter_map(|((_, k), _)| k.map(|k| k as f64))
        .collect();
    // Methods without a budget but with a known real K (`lora-full`) stand at that K too.
    let ks: Vec<f64> = ks
        .into_iter()
        .chain(t.real_k.values().copied().filter(|k| *k > 0.0))
        .collect();
    let (kmin, kmax) = ks
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &k| (a.min(k), b.max(k)));
    let (min, max) = if ks.is_empty() {
        (1.0, 100.0)
    } else if kmin == kmax {
        (kmin / 2.0, kmax * 2.0)
    } else {
        (kmin / 1.3, kmax * 1.3)
    };
    let mut ticks: Vec<f64> = ks;
    ticks.sort_by(f64::total_cmp);
    ticks.dedup();
    BudgetAxis { min, max, ticks }
}

/// The data-efficiency plot: a title, one panel per column of the table, the legend below.
fn efficiency<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, t: &Table, s: Scale) -> Result<()> {
    root.fill(&WHITE).map_err(plot_err)?;
    let cols = t.columns.len().max(1);
    let ncols = cols.min(3);
    let nrows = cols.div_ceil(ncols);
    let (title, rest) = root.split_vertically(s.upx(40));
    let h = rest.dim_in_pixel().1;
    let (body, legend) = rest.split_vertically(h.saturating_sub(s.upx(36)));
    let heading = format!("{} against examples per task", percent_label(&t.metric));
    title_at(&title, &heading, 22.0, s)?;
    let panels = body.split_evenly((nrows, ncols));
    let ms = methods(t);
    let axis = budget_axis(t);
    for (ci, (col, area)) in t.columns.iter().zip(panels.iter()).enumerate() {
        efficiency_panel(area, t, (ci, col.as_str()), (&axis, &ms), s)?;
    }
    let entries: Vec<(String, Look)> = ms
        .iter()
        .map(|(m, look)| (legend_name(t, m), *look))
        .collect();
    legend_strip(&legend, &entries, s)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

/// One panel of the efficiency plot: column `ci` (named `col`) of the table, every method as
/// a line over its budgets or as a horizontal reference.
fn efficiency_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    t: &Table,
    (ci, col): (usize, &str),
    (axis, ms): (&BudgetAxis, &[(String, Look)]),
    s: Scale,
) -> Result<()> {
    let mut chart = captioned(area, col, (16.0, 8), s)?
        .x_label_area_size(s.upx(35))
        .y_label_area_size(s.upx(45))
        // Ticks at the budgets themselves: a log axis over 16..64 holds no power of ten,
        // so its default key points would leave the axis unlabelled.
        .build_cartesian_2d(
            (axis.min..axis.max)
                .log_scale()
                .with_key_points(axis.ticks.clone()),
            0f64..100f64,
        )
        .map_err(plot_err)?;
    let mut mesh = chart.configure_mesh();
    mesh_at(&mut mesh, GRID, s);
    mesh.x_desc("examples per task (K)")
        .y_desc(percent_label(&t.metric))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .disable_x_mesh()
        .y_labels(6)
        .draw()
        .map_err(plot_err)?;
    for (m, look) in ms {
        let reference = t
            .rows
            .iter()
            .find(|((mm, k), _)| mm == m && k.is_none())
            .and_then(|(_, es)| es[ci].as_ref());
        match reference {
            Some(e) => draw_reference(&mut chart, (*look, s), e, t.real_k.get(m).copied(), axis)?,
            None => draw_budgets(&mut chart, (*look, s), &budget_points(t, m, ci))?,
        }
    }
    Ok(())
}

/// The points `(K, mean, low, high)` (x 100) of method `m` in column `ci`, one per budget.
fn budget_points(t: &Table, m: &str, ci: usize) -> Vec<(f64, f64, f64, f64)> {
    t.rows
        .iter()
        .filter(|((mm, k), _)| mm == m && k.is_some())
        .filter_map(|((_, k), es)| {
            es[ci]
                .as_ref()
                .map(|e| (k.unwrap() as f64, pct(e.mean), pct(e.low), pct(e.high)))
        })
        .collect()
}

/// A method without a budget: a horizontal reference with its band across the panel, and,
/// where its real number of examples `real_k` is known, a point with its interval at that K.
fn draw_reference<DB: DrawingBackend, CT: plotters::coord::CoordTranslate<From = (f64, f64)>>(
    chart: &mut ChartContext<DB, CT>,
    (look, s): (Look, Scale),
    e: &Entry,
    real_k: Option<f64>,
    axis: &BudgetAxis,
) -> Result<()> {
    let (lo, mid, hi) = (pct(e.low), pct(e.mean), pct(e.high));
    let across = [(axis.min, mid, lo, hi), (axis.max, mid, lo, hi)];
    band(chart, &across, look.color, 0.12)?;
    look.line(chart, vec![(axis.min, mid), (axis.max, mid)], s)?;
    if let Some(k) = real_k {
        chart
            .draw_series([PathElement::new(
                vec![(k, lo), (k, hi)],
                look.color.stroke_width(s.stroke(2)),
            )])
            .map_err(plot_err)?;
        look.mark(chart, &[(k, mid)], s)?;
    }
    Ok(())
}

/// A method with budgets: its line over the points, the band of their intervals, a marker
/// and an interval bar at each point (also where a single budget leaves no band).
fn draw_budgets<DB: DrawingBackend, CT: plotters::coord::CoordTranslate<From = (f64, f64)>>(
    chart: &mut ChartContext<DB, CT>,
    (look, s): (Look, Scale),
    pts: &[(f64, f64, f64, f64)],
) -> Result<()> {
    if pts.is_empty() {
        return Ok(());
    }
    band(chart, pts, look.color, 0.15)?;
    let line: Vec<(f64, f64)> = pts.iter().map(|p| (p.0, p.1)).collect();
    look.line(chart, line.clone(), s)?;
    look.mark(chart, &line, s)?;
    let bar = look.color.stroke_width(s.stroke(1));
    chart
        .draw_series(
            pts.iter()
                .map(|p| PathElement::new(vec![(p.0, p.2), (p.0, p.3)], bar)),
        )
        .map_err(plot_err)?;
    Ok(())
}

/// The per-language chart: each method at its largest budget, one bar per language with its
/// interval, the legend below.
fn by_language<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    t: &Table,
    s: Scale,
) -> Result<()> {
    root.fill(&WHITE).map_err(plot_err)?;
    let ms = methods(t);
    let n = t.columns.len();
    let h = root.dim_in_pixel().1;
    let (body, legend) = root.split_vertically(h.saturating_sub(s.upx(36)));
    // Each method at its largest budget (or its only row).
    let rows: Vec<(&String, Look, &Vec<Option<Entry>>)> = ms
        .iter()
        .filter_map(|(m, look)| {
            t.rows
                .iter()
                .filter(|((mm, _), _)| mm == m)
                .max_by_key(|((_, k), _)| k.unwrap_or(i64::MAX))
                .map(|(_, es)| (m, *look, es))
        })
        .collect();
    let caption = format!(
        "{} per language, each method at its largest K",
        percent_label(&t.metric)
    );
    let mut chart = captioned(&body, &caption, (20.0, 12), s)?
        .x_label_area_size(s.upx(45))
        .y_label_area_size(s.upx(50))
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..100f64)
        .map_err(plot_err)?;
    let labels: Vec<String> = t.columns.clone();
    let mut mesh = chart.configure_mesh();
    mesh_at(&mut mesh, GRID, s);
    mesh.disable_x_mesh()
        .x_labels(n.max(1))
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                labels.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc(percent_label(&t.metric))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()
        .map_err(plot_err)?;
    let w = 0.8 / rows.len().max(1) as f64;
    for (j, (_, look, es)) in rows.iter().enumerate() {
        let c = look.color;
        let placed: Vec<(f64, &Entry)> = es
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.as_ref().map(|e| (i as f64 - 0.4 + j as f64 * w, e)))
            .collect();
        chart
            .draw_series(placed.iter().map(|(x0, e)| {
                Rectangle::new(
                    [(*x0, 0.0), (x0 + w * 0.95, pct(e.mean))],
                    c.mix(0.85).filled(),
                )
            }))
            .map_err(plot_err)?;
        // The interval of each bar.
        chart
            .draw_series(placed.iter().map(|(x0, e)| {
                let x = x0 + w * 0.475;
                PathElement::new(
                    vec![(x, pct(e.low)), (x, pct(e.high))],
                    BLACK.stroke_width(s.stroke(1)),
                )
            }))
            .map_err(plot_err)?;
    }
    let entries: Vec<(String, Look)> = rows.iter().map(|(m, l, _)| ((*m).clone(), *l)).collect();
    legend_strip(&legend, &entries, s)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

/// Writes `efficiency.{png,svg}` and `languages.{png,svg}` into `dir`.
pub fn write_plots(t: &Table, dir: &Path) -> Result<Vec<String>> {
    register_font()?;
    let n = t.columns.len().max(1);
    let ncols = n.min(3);
    // Wide enough for the legend strip (method names, lora-full with its real K).
    let names: Vec<String> = methods(t).iter().map(|(m, _)| legend_name(t, m)).collect();
    let need = legend_need(&names);
    let size = (
        (420 * ncols as u32).max(need),
        40 + 36 + 320 * n.div_ceil(ncols) as u32,
    );
    let lang_size = ((160 * n as u32).clamp(640, 2400).max(need), 420);
    let mut files = write_figure(dir, "efficiency", size, &Efficiency(t))?.to_vec();
    files.extend(write_figure(dir, "languages", lang_size, &Languages(t))?);
    Ok(files)
}

/// The data-efficiency plot of a table, as a [`Figure`].
struct Efficiency<'a>(&'a Table);

impl Figure for Efficiency<'_> {
    fn draw<DB: DrawingBackend>(&self, root: DrawingArea<DB, Shift>, s: Scale) -> Result<()> {
        efficiency(root, self.0, s)
    }
}

/// The per-language chart of a table, as a [`Figure`].
struct Languages<'a>(&'a Table);

impl Figure for Languages<'_> {
    fn draw<DB: DrawingBackend>(&self, root: DrawingArea<DB, Shift>, s: Scale) -> Result<()> {
        by_language(root, self.0, s)
    }
}

/// Which points of a curve a panel draws.
type Series = Box<dyn Fn(&Curve) -> &Vec<(f64, f64)>>;

/// Draws the training curves: one row of panels per method (loss per step for every K and
/// seed; the dev score where early stopping ran; for meta methods the inner displacement and
/// the outer update norm).
fn curves_chart<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    cs: &[Curve],
    s: Scale,
) -> Result<()> {
    root.fill(&WHITE).map_err(plot_err)?;
    let mut methods: Vec<&str> = Vec::new();
    for c in cs {
        if !methods.contains(&c.method.as_str()) {
            methods.push(&c.method);
        }
    }
    let (title, body) = root.split_vertically(s.upx(40));
    title_at(&title, "training curves", 22.0, s)?;
    if methods.is_empty() {
        return root.present().map_err(plot_err);
    }
    let rows = body.split_evenly((methods.len(), 3));
    for (mi, m) in methods.iter().enumerate() {
        let mine: Vec<&Curve> = cs.iter().filter(|c| c.method == *m).collect();
        let panels: [(&str, Series); 3] = [
            ("loss", Box::new(|c: &Curve| &c.loss)),
            ("dev score", Box::new(|c: &Curve| &c.dev)),
            (
                "update / inner displacement norm",
                Box::new(|c: &Curve| {
                    if c.inner_norm.is_empty() {
                        &c.update_norm
                    } else {
                        &c.inner_norm
                    }
                }),
            ),
        ];
        for (pi, (name, get)) in panels.iter().enumerate() {
            let area = &rows[mi * 3 + pi];
            let pts: Vec<(f64, f64)> = mine
                .iter()
                .flat_map(|c| get(c).iter().copied())
                .filter(|p| p.1.is_finite())
                .collect();
            let xmax = pts.iter().map(|p| p.0).fold(1.0, f64::max);
            let (ylo, yhi) = pts
                .iter()
                .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
            let (ylo, yhi) = if pts.is_empty() {
                (0.0, 1.0)
            } else if ylo == yhi {
                (ylo - 0.5, yhi + 0.5)
            } else {
                (ylo, yhi)
            };
            let mut chart = captioned(area, &format!("{m}: {name}"), (14.0, 6), s)?
                .x_label_area_size(s.upx(28))
                .y_label_area_size(s.upx(45))
                .build_cartesian_2d(0f64..xmax, ylo..yhi)
                .map_err(plot_err)?;
            let mut mesh = chart.configure_mesh();
            mesh_at(&mut mesh, (BLACK.mix(0.2), WHITE.mix(1.0)), s);
            mesh.x_desc("step").draw().map_err(plot_err)?;
            for (ci, c) in mine.iter().enumerate() {
                let color = COLORS[ci % COLORS.len()];
                let series: Vec<(f64, f64)> =
                    get(c).iter().copied().filter(|p| p.1.is_finite()).collect();
                if series.is_empty() {
                    continue;
                }
                let style = color.stroke_width(s.stroke(1));
                let sample = s.px(14);
                chart
                    .draw_series(LineSeries::new(series, style))
                    .map_err(plot_err)?
                    .label(format!("K={} s{}", k_label(&c.method, c.k), c.seed))
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + sample, y)], style));
            }
            if pi == 0 {
                chart
                    .configure_series_labels()
                    .position(SeriesLabelPosition::UpperRight)
                    .margin(s.upx(10))
                    .legend_area_size(s.upx(30))
                    .label_font(s.font(10.0))
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK.stroke_width(s.stroke(1)))
                    .draw()
                    .map_err(plot_err)?;
            }
        }
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

/// Writes `curves.png` and `curves.svg` into `dir`.
pub fn write_curves(cs: &[Curve], dir: &Path) -> Result<()> {
    register_font()?;
    let mut n = 0;
    let mut seen: Vec<&str> = Vec::new();
    for c in cs {
        if !seen.contains(&c.method.as_str()) {
            seen.push(&c.method);
            n += 1;
        }
    }
    let size = (1260, 40 + 260 * n.max(1) as u32);
    write_figure(dir, "curves", size, &Curves(cs)).map(|_| ())
}

/// The training curves, as a [`Figure`].
struct Curves<'a>(&'a [Curve]);

impl Figure for Curves<'_> {
    fn draw<DB: DrawingBackend>(&self, root: DrawingArea<DB, Shift>, s: Scale) -> Result<()> {
        curves_chart(root, self.0, s)
    }
}
