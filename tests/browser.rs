//! The HTML report in a real browser: headless Chromium (Debian package `chromium`) loads a
//! report's `index.html` through a small harness page (`tests/browser/harness.html`, which
//! shows it in an iframe) and reports what it saw. The test checks that every image of the page
//! is loaded and fully decoded (drawn onto a canvas: every pixel opaque, some ink, some colour
//! from the plotted lines), that each is pixel-identical to one of the report's PNG files and
//! each PNG plot of the folder is shown, and that the table is there with the expected header,
//! rows and values. Two more tests make sure the check itself fails on a corrupt inline image
//! and on a page without its table.
//!
//! Without `chromium` on PATH the tests print a note and pass, unless `CI` is set (to anything
//! but empty, `0` or `false`): then they fail. `.ci/run` installs Chromium.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mlbench::runner::compare::Table;
use serde_json::Value;

/// How long one Chromium run may take before it is killed.
const TIMEOUT: Duration = Duration::from_secs(60);

/// A small table: two references (`base`, `lora-full`) and one method at two budgets, so the
/// data-efficiency plot draws reference lines and a line with a band.
fn table() -> Table {
    let e = common::entry;
    Table {
        metric: "acc".into(),
        baseline: Some("lora-full".into()),
        columns: vec![
            "sib200/eng_Latn".into(),
            "sib200/swh_Latn".into(),
            "sib200/micro".into(),
            "sib200/macro".into(),
        ],
        rows: vec![
            (
                ("base".into(), None),
                vec![
                    e(0.31, 0.04, None),
                    e(0.22, 0.04, None),
                    e(0.265, 0.03, None),
                    e(0.265, 0.03, None),
                ],
            ),
            (
                ("lora-full".into(), None),
                vec![
                    e(0.82, 0.02, None),
                    e(0.61, 0.03, None),
                    e(0.715, 0.02, None),
                    e(0.715, 0.02, None),
                ],
            ),
            (
                ("lora-k".into(), Some(16)),
                vec![
                    e(0.45, 0.05, Some(0.001)),
                    e(0.33, 0.06, Some(0.001)),
                    e(0.39, 0.04, Some(0.001)),
                    e(0.39, 0.04, Some(0.001)),
                ],
            ),
            (
                ("lora-k".into(), Some(64)),
                vec![
                    e(0.71, 0.04, Some(0.02)),
                    e(0.52, 0.05, Some(0.2)),
                    e(0.615, 0.03, Some(0.01)),
                    e(0.615, 0.03, Some(0.01)),
                ],
            ),
        ],
        missing: vec![],
        real_k: Default::default(),
    }
}

/// Whether `CI` is set to something other than empty, `0` or `false`.
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false"))
}

/// `chromium` on PATH; `None` (after a note on stderr) when it is missing outside CI, and a
/// failure when it is missing in CI.
fn chromium() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("chromium"))
            .find(|c| c.is_file())
    });
    match found {
        Some(c) => Some(c),
        None if in_ci() => panic!(
            "`chromium` is not on PATH, and CI is set: the browser check of the HTML report must \
             run in CI (install the Debian package `chromium`; .ci/run does)"
        ),
        None => {
            eprintln!(
                "note: skipping the browser check of the HTML report: `chromium` is not on PATH \
                 (Debian package `chromium`; in CI this is a failure)"
            );
            None
        }
    }
}

/// A `file://` URL for absolute path `p`.
fn file_url(p: &Path) -> String {
    let mut s = String::from("file://");
    for b in p.to_str().expect("a UTF-8 temporary path").bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

/// Writes the harness page into `root` (beside the report folder `root/report`), with one
/// reference `<img>` per PNG file of the report, runs headless Chromium on it and returns the
/// harness's JSON result.
fn look_in_browser(chromium: &Path, root: &Path) -> Value {
    let report = root.join("report");
    let mut pngs: Vec<String> = std::fs::read_dir(&report)
        .expect("read the report folder")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".png"))
        .collect();
    pngs.sort();
    let refs: String = pngs
        .iter()
        .map(|n| format!("<img data-name=\"{n}\" src=\"report/{n}\">\n"))
        .collect();
    let harness = include_str!("browser/harness.html").replace("<!--REFERENCES-->", &refs);
    let page = root.join("harness.html");
    std::fs::write(&page, harness).unwrap();

    let profile = tempfile::tempdir().unwrap();
    let (out, err) = (root.join("chromium.out"), root.join("chromium.err"));
    let mut cmd = Command::new(chromium);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--allow-file-access-from-files",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .arg("--dump-dom")
    .arg(file_url(&page))
    .stdin(Stdio::null())
    .stdout(std::fs::File::create(&out).unwrap())
    .stderr(std::fs::File::create(&err).unwrap());
    // Its own process group, so that a hung browser goes with all its helper processes.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let start = Instant::now();
    let mut child = cmd.spawn().expect("start chromium");
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > TIMEOUT {
            // SAFETY: signals the process group this test started.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            panic!(
                "chromium did not finish within {TIMEOUT:?}; its stderr:\n{}",
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let dom = std::fs::read_to_string(&out).unwrap();
    let stderr = std::fs::read_to_string(&err).unwrap_or_default();
    assert!(
        status.success(),
        "chromium failed ({status}); its stderr:\n{stderr}"
    );
    let text = dom
        .split_once("<pre id=\"result\">")
        .and_then(|(_, rest)| rest.split_once("</pre>"))
        .map(|(t, _)| t)
        .unwrap_or_else(|| panic!("no result in chromium's DOM dump:\n{dom}\nstderr:\n{stderr}"));
    serde_json::from_str(text).unwrap_or_else(|e| {
        panic!("the harness did not finish ({e}); it wrote {text:?}; chromium's stderr:\n{stderr}")
    })
}

/// What is wrong with the page as the browser saw it (`r`), for the report of table `t` whose
/// folder holds the PNG plots `pngs`; empty when all is well.
fn problems(r: &Value, t: &Table, pngs: &[&str]) -> Vec<String> {
    let mut p = Vec::new();
    if let Some(e) = r["error"].as_str() {
        p.push(format!("the harness failed: {e}"));
    }
    if !r["url"]
        .as_str()
        .is_some_and(|u| u.ends_with("/report/index.html"))
    {
        p.push(format!(
            "the frame shows {}, not the report's index.html",
            r["url"]
        ));
    }
    if r["title"] != "browser check" {
        p.push(format!(
            "the page's title is {}, expected \"browser check\"",
            r["title"]
        ));
    }
    let num = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
    for f in r["references"].as_array().into_iter().flatten() {
        if num(f, "width") == 0 {
            p.push(format!("the report's file {} does not decode", f["name"]));
        }
    }
    let images = r["images"].as_array().cloned().unwrap_or_default();
    if images.len() != pngs.len() {
        p.push(format!(
            "the page shows {} images, expected {} (one per PNG plot)",
            images.len(),
            pngs.len()
        ));
    }
    for img in &images {
        let id = &img["id"];
        let (w, h) = (num(img, "width"), num(img, "height"));
        if img["complete"] != Value::Bool(true) || w == 0 || h == 0 {
            p.push(format!(
                "image {id} did not load or decode (complete: {}, size {w}x{h})",
                img["complete"]
            ));
            continue;
        }
        let area = w * h;
        if num(img, "opaque") != area {
            p.push(format!(
                "image {id} is not fully decoded: {} of its {area} pixels are opaque",
                num(img, "opaque")
            ));
        }
        if num(img, "ink") * 100 < area {
            p.push(format!(
                "image {id} is (nearly) blank: {} of {area} pixels are not white",
                num(img, "ink")
            ));
        }
        if num(img, "colour") * 1000 < area {
            p.push(format!(
                "image {id} shows no plotted data: {} of {area} pixels are coloured",
                num(img, "colour")
            ));
        }
        if img["same_as"].as_array().is_none_or(|a| a.is_empty()) {
            p.push(format!(
                "image {id} ({w}x{h}) is not pixel-identical to any PNG file of the report"
            ));
        }
    }
    for f in pngs {
        let shown = images.iter().any(|i| {
            i["same_as"]
                .as_array()
                .is_some_and(|a| a.iter().any(|n| n == f))
        });
        if !shown {
            p.push(format!("{f} is not shown (decoded) on the page"));
        }
    }

    let tables = r["tables"].as_array().cloned().unwrap_or_default();
    if tables.len() != 1 {
        p.push(format!("the page has {} tables, expected 1", tables.len()));
    }
    if let Some(tab) = tables.first() {
        let strs = |v: &Value| -> Vec<String> {
            v.as_array()
                .into_iter()
                .flatten()
                .map(|c| c.as_str().unwrap_or("").to_string())
                .collect()
        };
        let header = strs(&tab["header"]);
        let want: Vec<String> = ["method", "K"]
            .iter()
            .map(|s| s.to_string())
            .chain(t.columns.iter().cloned())
            .collect();
        if header != want {
            p.push(format!("table header is {header:?}, expected {want:?}"));
        }
        let rows: Vec<Vec<String>> = tab["rows"]
            .as_array()
            .into_iter()
            .flatten()
            .map(strs)
            .collect();
        if rows.len() != t.rows.len() {
            p.push(format!(
                "table has {} body rows, expected {}",
                rows.len(),
                t.rows.len()
            ));
        }
        for (row, ((m, k), es)) in rows.iter().zip(&t.rows) {
            // A budget shows as K; a row without one (full data, or the base model) with a
            // label that this test leaves to the report.
            let k_ok = |c: &str| k.map_or(!c.is_empty(), |k| c == k.to_string());
            if row.len() != 2 + es.len() || row[0] != *m || !k_ok(&row[1]) {
                p.push(format!(
                    "table row {row:?} is not ({m}, K {k:?}, {} values)",
                    es.len()
                ));
                continue;
            }
            for (cell, e) in row[2..].iter().zip(es) {
                let mean = format!("{:.1}", 100.0 * e.as_ref().unwrap().mean);
                if !cell.contains(&mean) {
                    p.push(format!(
                        "table row ({m}, K {k:?}) shows {cell:?}, expected {mean}"
                    ));
                }
            }
        }
    }
    p
}

/// Writes the report of [`table`] into `root/report`, lets `edit` change its `index.html`,
/// and returns what is wrong with it in the browser; `None` when the browser check is skipped.
fn check(edit: impl FnOnce(String) -> String) -> Option<Vec<String>> {
    let chromium = chromium()?;
    let tmp = tempfile::tempdir().unwrap();
    let report = tmp.path().join("report");
    let t = table();
    mlbench::report::write_report(&t, None, &report, "browser check", "synthetic values").unwrap();
    let index = report.join("index.html");
    let html = std::fs::read_to_string(&index).unwrap();
    std::fs::write(&index, edit(html)).unwrap();
    let r = look_in_browser(&chromium, tmp.path());
    Some(problems(&r, &t, &["efficiency.png", "languages.png"]))
}

#[test]
fn the_report_loads_in_headless_chromium_with_decoded_images_and_its_table() {
    let Some(p) = check(|html| html) else { return };
    assert!(
        p.is_empty(),
        "the HTML report, as headless Chromium shows it:\n  {}",
        p.join("\n  ")
    );
}

/// The first inline PNG's base64 payload, as a byte range of `html`.
fn first_payload(html: &str) -> std::ops::Range<usize> {
    let start = html.find("data:image/png;base64,").expect("an inline PNG") + 22;
    let end = start + html[start..].find('"').expect("the end of the data: URI");
    start..end
}

#[test]
fn the_browser_check_fails_on_a_corrupt_image() {
    // Zeros over a stretch in the middle of the compressed pixel data.
    let Some(p) = check(|mut html| {
        let r = first_payload(&html);
        let mid = (r.start + r.end) / 2;
        html.replace_range(mid..mid + 400, &"A".repeat(400));
        html
    }) else {
        return;
    };
    assert!(
        p.iter()
            .any(|m| m.contains("not fully decoded") || m.contains("not pixel-identical")),
        "a corrupt image went unnoticed: {p:?}"
    );
    // A broken header: the image does not decode at all.
    let Some(p) = check(|mut html| {
        let r = first_payload(&html);
        html.replace_range(r.start + 12..r.start + 16, "AAAA");
        html
    }) else {
        return;
    };
    assert!(
        p.iter().any(|m| m.contains("did not load or decode")),
        "an undecodable image went unnoticed: {p:?}"
    );
}

#[test]
fn the_browser_check_fails_without_the_table() {
    let Some(p) = check(|html| {
        let (a, b) = (
            html.find("<table>").unwrap(),
            html.find("</table>").unwrap(),
        );
        format!("{}{}", &html[..a], &html[b + "</table>".len()..])
    }) else {
        return;
    };
    assert!(
        p.iter().any(|m| m.contains("0 tables")),
        "a missing table went unnoticed: {p:?}"
    );
}
