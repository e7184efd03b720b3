//! The shipped canonical datasets: schema, counts (from the raw data's README), cleaning rules.

mod common;

use common::*;
use mlbench::data::{describe, schema};
use polars::prelude::*;

#[test]
fn every_shipped_file_passes_the_schema() {
    for task in ["sib200", "nusax", "afrisenti", "xcopa", "mgsm"] {
        let p = shipped().join(format!("{task}.parquet"));
        schema::load(&p, Some(task)).unwrap_or_else(|e| panic!("{task}: {e}"));
    }
}

#[test]
fn counts_match_the_published_sizes() {
    let stats = describe::describe(&shipped(), &[]).unwrap();
    let sum = describe::summarize(&stats);
    let rows: Vec<(String, usize, usize)> = sum
        .iter()
        .map(|s| (s.task.clone(), s.languages, s.rows))
        .collect();
    assert_eq!(
        rows,
        vec![
            ("afrisenti".into(), 12, 63685 + 12932 + 30211),
            ("mgsm".into(), 11, 11 * (250 + 8)),
            ("nusax".into(), 12, 12 * 1000),
            ("sib200".into(), 205, 205 * 1004),
            ("xcopa".into(), 11, 11 * 600),
        ]
    );
    // SIB-200 class counts are identical in every language (README table).
    for s in stats
        .iter()
        .filter(|s| s.task == "sib200" && s.split == "train")
    {
        assert_eq!(
            s.labels.values().copied().collect::<Vec<_>>(),
            vec![176, 138, 102, 85, 77, 65, 58],
            "{}",
            s.lang
        );
    }
    // AfriSenti Hausa train: 4573 negative, 4912 neutral, 4687 positive.
    let ha = stats
        .iter()
        .find(|s| s.task == "afrisenti" && s.lang == "ha" && s.split == "train")
        .unwrap();
    assert_eq!(
        ha.labels.values().copied().collect::<Vec<_>>(),
        vec![4573, 4912, 4687]
    );
}

fn frame(task: &str) -> DataFrame {
    schema::read_parquet(&shipped().join(format!("{task}.parquet"))).unwrap()
}

fn text_of(df: &DataFrame, lang: &str, id: &str) -> String {
    let m = df.column("lang").unwrap().str().unwrap().equal(lang)
        & df.column("id").unwrap().str().unwrap().equal(id);
    let f = df.filter(&m).unwrap();
    assert_eq!(f.height(), 1, "{lang}/{id}");
    f.column("text")
        .unwrap()
        .str()
        .unwrap()
        .get(0)
        .unwrap()
        .to_string()
}

#[test]
fn cleaning_rules_were_applied() {
    // XCOPA: Thai says `effect` everywhere upstream; the Estonian reference is used instead.
    let x = frame("xcopa");
    let th = x.column("lang").unwrap().str().unwrap().equal("th");
    let q = x.filter(&th).unwrap();
    let causes = q
        .column("question")
        .unwrap()
        .str()
        .unwrap()
        .equal("cause")
        .sum()
        .unwrap_or(0);
    assert!(
        causes > 250,
        "Thai XCOPA should have cause questions after the fix, has {causes}"
    );
    // MGSM: thousands separators removed; exemplars lose their "Question:" label.
    let m = frame("mgsm");
    let targets: Vec<&str> = m
        .column("target")
        .unwrap()
        .str()
        .unwrap()
        .iter()
        .flatten()
        .collect();
    assert!(targets.contains(&"2125") && !targets.iter().any(|t| t.contains(',')));
    assert!(text_of(&m, "en", "exemplar-1").starts_with("Roger has 5 tennis balls"));
    // AfriSenti: `""` in train files is one literal quote.
    let a = frame("afrisenti");
    assert!(text_of(&a, "dz", "dz_train_01264").contains("شعار \"ماكاش الفوط\" موقف"));
    // No text anywhere has leading or trailing whitespace.
    for task in ["sib200", "nusax", "afrisenti", "xcopa", "mgsm"] {
        let df = frame(task);
        for t in df.column("text").unwrap().str().unwrap().iter().flatten() {
            assert_eq!(t, t.trim(), "{task}: untrimmed text {t:?}");
        }
    }
}

#[test]
fn parallel_ids_align_across_languages() {
    // SIB-200 rows align by id across languages; labels must agree.
    let df = frame("sib200");
    let pick = |lang: &str| -> Vec<(String, i64)> {
        let m = df.column("lang").unwrap().str().unwrap().equal(lang);
        let f = df.filter(&m).unwrap();
        let ids = f.column("id").unwrap().str().unwrap().clone();
        let labels = f.column("label").unwrap().i64().unwrap().clone();
        let mut v: Vec<(String, i64)> = (0..f.height())
            .map(|i| (ids.get(i).unwrap().to_string(), labels.get(i).unwrap()))
            .collect();
        v.sort();
        v
    };
    assert_eq!(pick("eng_Latn"), pick("yor_Latn"));
}
