//! Reports: the plots and the self-contained HTML page for a comparison table with realistic
//! values (the PNGs are also looked at by hand; see benchmarks/perf/README.md).

mod common;

use mlbench::runner::compare::Table;

fn table() -> Table {
    let e = common::entry;
    let mut rows = Vec::new();
    rows.push((
        ("base".to_string(), None),
        vec![
            e(0.31, 0.04, None),
            e(0.22, 0.04, None),
            e(0.265, 0.03, None),
        ],
    ));
    rows.push((
        ("lora-full".to_string(), None),
        vec![
            e(0.82, 0.02, None),
            e(0.61, 0.03, None),
            e(0.715, 0.02, None),
        ],
    ));
    for (i, k) in [8i64, 16, 32, 64].iter().enumerate() {
        let f = i as f64;
        rows.push((
            ("lora-k".to_string(), Some(*k)),
            vec![
                e(0.40 + 0.08 * f, 0.05, Some(0.001)),
                e(0.28 + 0.07 * f, 0.06, Some(0.001)),
                e(0.34 + 0.075 * f, 0.04, Some(0.001)),
            ],
        ));
        rows.push((
            ("meta-lora".to_string(), Some(*k)),
            vec![
                e(0.52 + 0.09 * f, 0.05, Some(0.01)),
                e(0.36 + 0.08 * f, 0.05, Some(0.2)),
                e(0.44 + 0.085 * f, 0.04, Some(0.3)),
            ],
        ));
    }
    Table {
        metric: "acc".into(),
        baseline: Some("lora-full".into()),
        columns: vec![
            "sib200/eng_Latn".into(),
            "sib200/swh_Latn".into(),
            "sib200/macro".into(),
        ],
        rows,
        missing: vec![],
        real_k: Default::default(),
    }
}

#[test]
fn the_report_folder_has_an_html_page_with_inline_plots_and_the_tables() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("reports/demo");
    mlbench::report::write_report(&table(), None, &out, "demo", "synthetic values").unwrap();
    for f in [
        "index.html",
        "table.md",
        "table.csv",
        "table.tex",
        "efficiency.png",
        "efficiency.svg",
        "languages.png",
        "languages.svg",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    for f in ["efficiency.png", "languages.png"] {
        let b = std::fs::read(out.join(f)).unwrap();
        assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n", "{f} is a PNG");
        assert!(b.len() > 10_000, "{f} has content");
    }
    let svg = std::fs::read_to_string(out.join("efficiency.svg")).unwrap();
    assert!(
        svg.contains("<svg") && svg.contains("examples per task"),
        "axis label drawn as text"
    );
    assert!(
        svg.contains("meta-lora") && svg.contains("lora-full"),
        "legend"
    );
    // The K axis is labelled at the budgets themselves (a log axis's default ticks are powers
    // of ten, which 16..64 does not contain).
    for k in ["8", "16", "32", "64"] {
        let label = format!(">\n{k}\n</text>");
        assert!(svg.contains(&label), "no tick label for K = {k}");
    }
    let html = std::fs::read_to_string(out.join("index.html")).unwrap();
    assert_eq!(html.matches("src=\"data:image/png;base64,").count(), 2);
    assert!(html.contains("<td>meta-lora</td><td>64</td>"));
    assert!(html.contains("<sup>*</sup>"));
    // For looking at the plots by hand: MLBENCH_REPORT_DEMO=DIR keeps a copy there.
    if let Ok(d) = std::env::var("MLBENCH_REPORT_DEMO") {
        mlbench::report::write_report(
            &table(),
            None,
            std::path::Path::new(&d),
            "demo",
            "synthetic values",
        )
        .unwrap();
    }
    // Nothing half-written is left beside it.
    let siblings: Vec<_> = std::fs::read_dir(out.parent().unwrap()).unwrap().collect();
    assert_eq!(siblings.len(), 1);
}

/// A PNG's `pHYs` chunk: pixels per unit on x and y, and the unit (1: the metre).
type Phys = (u32, u32, u8);

/// Width and height of a PNG file (its header chunk) and its `pHYs` chunk, if any.
fn png_info(b: &[u8]) -> ((u32, u32), Option<Phys>) {
    assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n", "a PNG signature");
    let be = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let size = (be(16), be(20));
    let mut at = 8;
    let mut phys = None;
    while at + 8 <= b.len() {
        let (len, kind) = (be(at) as usize, &b[at + 4..at + 8]);
        if kind == b"pHYs" {
            phys = Some((be(at + 8), be(at + 12), b[at + 16]));
        }
        if kind == b"IDAT" {
            // The specification puts pHYs before the image data.
            break;
        }
        at += 12 + len;
    }
    (size, phys)
}

/// The `width` and `height` attributes of the root element of an SVG file.
fn svg_size(svg: &str) -> (f64, f64) {
    let attr = |name: &str| -> f64 {
        let from = svg.find(&format!(" {name}=\"")).unwrap() + name.len() + 3;
        let to = from + svg[from..].find('"').unwrap();
        svg[from..to].parse().unwrap()
    };
    (attr("width"), attr("height"))
}

#[test]
fn the_pngs_are_the_svgs_at_300_dpi_with_a_phys_chunk() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("report");
    mlbench::report::write_report(&table(), None, &out, "demo", "synthetic values").unwrap();
    let curve = mlbench::runner::study::Curve {
        method: "lora-k".into(),
        k: Some(16),
        loss: vec![(0.0, 2.0), (1.0, 1.5), (2.0, 1.2)],
        ..Default::default()
    };
    mlbench::report::plot::write_curves(&[curve], &out).unwrap();
    let html = std::fs::read_to_string(out.join("index.html")).unwrap();
    for name in ["efficiency", "languages", "curves"] {
        let (w, h) = svg_size(&std::fs::read_to_string(out.join(format!("{name}.svg"))).unwrap());
        // The SVG's size is in CSS pixels, 96 to the inch: the figure's physical size.
        let inches = (w / 96.0, h / 96.0);
        let png = std::fs::read(out.join(format!("{name}.png"))).unwrap();
        let ((pw, ph), phys) = png_info(&png);
        assert_eq!(
            (pw, ph),
            (
                (inches.0 * 300.0).round() as u32,
                (inches.1 * 300.0).round() as u32
            ),
            "{name}.png is {pw}x{ph} pixels for {:.2} x {:.2} inches",
            inches.0,
            inches.1
        );
        // 300 dpi is 11,811 pixels per metre.
        assert_eq!(phys, Some((11_811, 11_811, 1)), "{name}.png's pHYs chunk");
        if name != "curves" {
            // The page shows the PNG at the SVG's width.
            assert!(
                html.contains(&format!("<img id=\"{name}\"")),
                "{name} on the page"
            );
            let tag = &html[html.find(&format!("<img id=\"{name}\"")).unwrap()..];
            assert!(
                tag[..tag.find('>').unwrap()].contains(&format!("width=\"{w}\"")),
                "{name} is shown {w} pixels wide"
            );
        }
    }
}
