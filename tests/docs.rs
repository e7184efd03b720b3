//! The README's copies of report files are current: every block
//! `<!-- include: PATH -->` ... `<!-- /include -->` in README.md holds exactly the text of PATH
//! (the committed report file), so the tables a reader sees in the README are the reports'.
//! `scripts/readme-includes.sh` refreshes them (`scripts/study-reports.sh` runs it).

use std::path::Path;

/// (line of the opening marker, PATH, the block's text) for every include block.
fn blocks(readme: &str) -> Vec<(usize, String, String)> {
    let mut out = Vec::new();
    let mut open: Option<(usize, String, Vec<&str>)> = None;
    for (i, line) in readme.lines().enumerate() {
        if let Some(path) = line
            .strip_prefix("<!-- include: ")
            .and_then(|r| r.strip_suffix(" -->"))
        {
            assert!(
                open.is_none(),
                "README.md:{}: include inside include",
                i + 1
            );
            open = Some((i + 1, path.to_string(), Vec::new()));
        } else if line == "<!-- /include -->" {
            let (at, path, body) = open
                .take()
                .unwrap_or_else(|| panic!("README.md:{}: /include without include", i + 1));
            out.push((at, path, body.join("\n")));
        } else if let Some((_, _, body)) = open.as_mut() {
            body.push(line);
        }
    }
    assert!(open.is_none(), "README.md: an include block is not closed");
    out
}

#[test]
fn the_readme_copies_of_report_files_are_current() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let blocks = blocks(&readme);
    assert!(
        blocks
            .iter()
            .any(|(_, p, _)| p == "reports/sib200-multilingual/verdicts.md"),
        "README.md no longer shows the SIB-200 study's verdicts from its report"
    );
    for (at, path, body) in blocks {
        let file = std::fs::read_to_string(root.join(&path))
            .unwrap_or_else(|e| panic!("README.md:{at}: includes {path}: {e}"));
        assert_eq!(
            body.trim_end_matches('\n'),
            file.trim_end_matches('\n'),
            "README.md:{at}: the copy of {path} is stale; run scripts/readme-includes.sh"
        );
    }
}

#[test]
fn include_blocks_are_found_with_their_text() {
    let text = "a\n<!-- include: x.md -->\n| t |\n\nnote\n<!-- /include -->\nb\n<!-- include: y.md -->\n<!-- /include -->\n";
    assert_eq!(
        blocks(text),
        [
            (2, "x.md".to_string(), "| t |\n\nnote".to_string()),
            (8, "y.md".to_string(), String::new())
        ]
    );
}
