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
