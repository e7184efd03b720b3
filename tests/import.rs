//! `mlbench data import` and `data verify` on a small raw folder laid out like shared/data.

mod common;

use std::path::Path;

use common::*;

fn write(root: &Path, rel: &str, body: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, body).unwrap();
}

/// A tiny SIB-200-shaped source: two languages, 3 rows per split, with a quoted text.
fn tiny_sib(root: &Path) {
    for code in ["eng_Latn", "fra_Latn"] {
        write(
            root,
            &format!("sib200/raw/{code}/labels.txt"),
            "science/technology\ntravel\npolitics\n",
        );
        for (split, base) in [("train", 0), ("dev", 100), ("test", 200)] {
            let mut s = String::from("index_id\tcategory\ttext\n");
            s.push_str(&format!(
                "{}\ttravel\t\"He said \"\"go\"\" twice.\"\n",
                base + 1
            ));
            s.push_str(&format!("{}\tpolitics\t  A vote in {code}.  \n", base + 2));
            s.push_str(&format!("{}\tscience/technology\tA rocket.\n", base + 3));
            write(root, &format!("sib200/raw/{code}/{split}.tsv"), &s);
        }
    }
}

#[test]
fn import_then_verify_then_detect_tampering() {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    tiny_sib(src.path());
    let o = mlbench(&[
        "--quiet",
        "data",
        "import",
        "--source",
        src.path().to_str().unwrap(),
        "--out",
        out.path().to_str().unwrap(),
        "--tasks",
        "sib200",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        files_in(out.path()),
        vec!["manifest.json", "sib200.parquet"]
    );
    let df =
        mlbench::data::schema::load(&out.path().join("sib200.parquet"), Some("sib200")).unwrap();
    assert_eq!(df.height(), 18);
    let texts: Vec<String> = df
        .column("text")
        .unwrap()
        .str()
        .unwrap()
        .iter()
        .flatten()
        .map(str::to_string)
        .collect();
    assert!(
        texts.contains(&"He said \"go\" twice.".to_string()),
        "{texts:?}"
    );
    assert!(
        texts.contains(&"A vote in eng_Latn.".to_string()),
        "trimmed: {texts:?}"
    );

    let verify = |extra: &[&str]| {
        let mut a = vec!["--data-dir", out.path().to_str().unwrap(), "data", "verify"];
        a.extend_from_slice(extra);
        mlbench(&a)
    };
    let o = verify(&["--source", src.path().to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));

    // A changed source byte is caught, by path.
    write(
        src.path(),
        "sib200/raw/fra_Latn/dev.tsv",
        "index_id\tcategory\ttext\n101\ttravel\tChanged.\n102\tpolitics\tX.\n103\ttravel\tY.\n",
    );
    let o = verify(&["--source", src.path().to_str().unwrap()]);
    assert_user_error(
        &o,
        &["sib200/raw/fra_Latn/dev.tsv", "differs from the manifest"],
    );

    // A changed output file is caught without the sources.
    let mut bytes = std::fs::read(out.path().join("sib200.parquet")).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0xff;
    std::fs::write(out.path().join("sib200.parquet"), bytes).unwrap();
    let o = verify(&[]);
    assert_user_error(&o, &["sib200.parquet", "differs from the manifest"]);
}

#[test]
fn bad_sources_name_file_and_line() {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    tiny_sib(src.path());
    write(
        src.path(),
        "sib200/raw/fra_Latn/test.tsv",
        "index_id\tcategory\ttext\n201\ttravel\tOk.\n202\tweather\tRain.\n",
    );
    let o = mlbench(&[
        "--quiet",
        "data",
        "import",
        "--source",
        src.path().to_str().unwrap(),
        "--out",
        out.path().to_str().unwrap(),
        "--tasks",
        "sib200",
    ]);
    assert_user_error(&o, &["fra_Latn/test.tsv:3", "category `weather`"]);
    assert!(
        files_in(out.path()).is_empty(),
        "nothing written: {:?}",
        files_in(out.path())
    );

    write(
        src.path(),
        "sib200/raw/fra_Latn/test.tsv",
        "index_id\tcategory\ttext\n201\ttravel\t   \n",
    );
    let o = mlbench(&[
        "--quiet",
        "data",
        "import",
        "--source",
        src.path().to_str().unwrap(),
        "--out",
        out.path().to_str().unwrap(),
        "--tasks",
        "sib200",
    ]);
    assert_user_error(&o, &["fra_Latn/test.tsv:2", "empty text"]);

    let o = mlbench(&[
        "--quiet",
        "data",
        "import",
        "--source",
        src.path().to_str().unwrap(),
        "--out",
        out.path().to_str().unwrap(),
        "--tasks",
        "nusax",
    ]);
    assert_user_error(&o, &["source folder not found", "nusax/raw"]);
    let o = mlbench(&[
        "--quiet",
        "data",
        "import",
        "--source",
        src.path().to_str().unwrap(),
        "--out",
        out.path().to_str().unwrap(),
        "--tasks",
        "sib2000",
    ]);
    assert_user_error(&o, &["unknown dataset `sib2000`", "sib200"]);
}

#[test]
fn shipped_manifest_matches_shipped_files() {
    // Without the raw sources (CI has none), the committed files still hash as recorded.
    let o = mlbench(&[
        "--data-dir",
        shipped().to_str().unwrap(),
        "--quiet",
        "data",
        "verify",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}
