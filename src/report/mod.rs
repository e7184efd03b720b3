//! Stage 6 of the data's journey: reports. A comparison table in; a report folder out, written
//! beside its final place and renamed into it: `index.html` (self-contained, plots inline),
//! `table.md`, `table.csv`, `table.tex`, and the plots as PNG and SVG ([`plot`]).

pub mod history;
pub mod plot;

use std::path::Path;

use crate::error::{Error, Result};
use crate::runner::compare::Table;
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
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
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

/// A PNG file of `dir` as a `data:` URI.
pub(crate) fn png_uri(dir: &Path, f: &str) -> Result<String> {
    let p = dir.join(f);
    let b = std::fs::read(&p).map_err(|e| Error::io("read", &p, e))?;
    Ok(format!("data:image/png;base64,{}", base64(&b)))
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
</style></head>
"#,
        title = esc(title)
    )
}

/// Writes the report folder `out` for table `t`; `title` heads the page and `about` (plain
/// text) says what was compared.
pub fn write_report(t: &Table, out: &Path, title: &str, about: &str) -> Result<()> {
    write_folder(out, |tmp| {
        write_bytes_atomic(&tmp.join("table.md"), t.markdown().as_bytes())?;
        write_bytes_atomic(&tmp.join("table.csv"), t.csv().as_bytes())?;
        write_bytes_atomic(&tmp.join("table.tex"), t.latex().as_bytes())?;
        plot::write_plots(t, tmp)?;
        let html = format!(
            r#"{head}<body>
<h1>{title}</h1>
<p>{about}</p>
<h2>Table</h2>
{table}<p><small>{foot}</small></p>
<h2>Data efficiency</h2>
<img id="efficiency" alt="{metric} against examples per task" src="{eff}">
<h2>Per language</h2>
<img id="languages" alt="{metric} per language" src="{lang}">
<p><small>Files: table.md, table.csv, table.tex, efficiency.png/.svg, languages.png/.svg. {version}</small></p>
</body></html>
"#,
            head = html_head(title),
            title = esc(title),
            about = esc(about),
            table = html_table(t),
            foot = esc(&t.footnote()),
            metric = esc(&t.metric),
            eff = png_uri(tmp, "efficiency.png")?,
            lang = png_uri(tmp, "languages.png")?,
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
