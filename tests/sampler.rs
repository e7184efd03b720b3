//! The few-shot sampler on the shipped data: determinism, seed independence across languages
//! and tasks, nested budgets, exact stratified counts, and the CLI's output file.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use mlbench::data::sample::{sample_pools, support_query, PoolRequest, PoolRow};
use mlbench::data::schema;

fn req(tasks: &[&str], langs: &[&str], ks: &[usize], seed: u64) -> PoolRequest {
    PoolRequest {
        tasks: tasks.iter().map(|s| s.to_string()).collect(),
        langs: langs.iter().map(|s| s.to_string()).collect(),
        ks: ks.to_vec(),
        seed,
        split: "train".into(),
        aligned: false,
    }
}

fn ids(rows: &[PoolRow], task: &str, lang_code: &str, k: usize) -> Vec<String> {
    rows.iter()
        .filter(|r| r.task == task && r.lang_code == lang_code && r.k == k)
        .map(|r| r.id.clone())
        .collect()
}

#[test]
fn same_seed_same_pools_and_other_seed_differs() {
    let a = sample_pools(&shipped(), &req(&["sib200"], &["en", "sw"], &[64], 0)).unwrap();
    let b = sample_pools(&shipped(), &req(&["sib200"], &["en", "sw"], &[64], 0)).unwrap();
    assert_eq!(a, b);
    let c = sample_pools(&shipped(), &req(&["sib200"], &["en", "sw"], &[64], 1)).unwrap();
    assert_ne!(
        ids(&a, "sib200", "eng_Latn", 64),
        ids(&c, "sib200", "eng_Latn", 64)
    );
    // Languages get their own streams: English and Swahili pools differ (SIB-200 is parallel,
    // so equal streams would give equal ids).
    assert_ne!(
        ids(&a, "sib200", "eng_Latn", 64),
        ids(&a, "sib200", "swh_Latn", 64)
    );
}

#[test]
fn a_language_pool_does_not_depend_on_what_else_is_requested() {
    let alone = sample_pools(&shipped(), &req(&["sib200"], &["fr"], &[32], 7)).unwrap();
    let crowd = sample_pools(
        &shipped(),
        &req(
            &["nusax", "sib200", "afrisenti"],
            &[
                "nusax:ind",
                "sib200:yo",
                "sib200:de",
                "sib200:fra_Latn",
                "sib200:zh",
                "afrisenti:ha",
            ],
            &[32],
            7,
        ),
    )
    .unwrap();
    assert_eq!(
        ids(&alone, "sib200", "fra_Latn", 32),
        ids(&crowd, "sib200", "fra_Latn", 32)
    );
    let everything = sample_pools(&shipped(), &req(&["sib200"], &["all"], &[32], 7)).unwrap();
    assert_eq!(
        ids(&alone, "sib200", "fra_Latn", 32),
        ids(&everything, "sib200", "fra_Latn", 32)
    );
}

#[test]
fn budgets_are_nested_in_every_language() {
    let rows = sample_pools(&shipped(), &req(&["sib200"], &["all"], &[8, 16, 64], 3)).unwrap();
    let langs: BTreeSet<&str> = rows.iter().map(|r| r.lang_code.as_str()).collect();
    assert_eq!(langs.len(), 205);
    for l in langs {
        let k8 = ids(&rows, "sib200", l, 8);
        let k16 = ids(&rows, "sib200", l, 16);
        let k64 = ids(&rows, "sib200", l, 64);
        assert_eq!(&k16[..8], &k8[..], "{l}: K=8 is the prefix of K=16");
        assert_eq!(&k64[..16], &k16[..], "{l}: K=16 is the prefix of K=64");
        assert_eq!(
            k64.iter().collect::<BTreeSet<_>>().len(),
            64,
            "{l}: no repeats"
        );
    }
}

fn label_counts(rows: &[PoolRow], task: &str, lang_code: &str, k: usize) -> Vec<usize> {
    let mut m: BTreeMap<i64, usize> = BTreeMap::new();
    for r in rows
        .iter()
        .filter(|r| r.task == task && r.lang_code == lang_code && r.k == k)
    {
        *m.entry(r.label.unwrap()).or_default() += 1;
    }
    m.into_values().collect()
}

#[test]
fn stratified_counts_are_exact() {
    // Expected counts from the rounding rule (module doc of data::sample), computed by an
    // independent Python transcription of the rule for SIB-200's class sizes
    // [176, 138, 102, 85, 77, 65, 58] and AfriSenti Swahili's [191, 1072, 547].
    let rows = sample_pools(
        &shipped(),
        &req(&["sib200"], &["en", "yo"], &[8, 16, 32, 64, 128], 11),
    )
    .unwrap();
    for l in ["eng_Latn", "yor_Latn"] {
        assert_eq!(
            label_counts(&rows, "sib200", l, 8),
            vec![2, 1, 1, 1, 1, 1, 1]
        );
        assert_eq!(
            label_counts(&rows, "sib200", l, 16),
            vec![4, 3, 2, 2, 2, 2, 1]
        );
        assert_eq!(
            label_counts(&rows, "sib200", l, 32),
            vec![8, 6, 5, 4, 3, 3, 3]
        );
        assert_eq!(
            label_counts(&rows, "sib200", l, 64),
            vec![16, 13, 9, 8, 7, 6, 5]
        );
        assert_eq!(
            label_counts(&rows, "sib200", l, 128),
            vec![32, 25, 19, 15, 14, 12, 11]
        );
    }
    let a = sample_pools(&shipped(), &req(&["afrisenti"], &["sw"], &[16, 64], 0)).unwrap();
    assert_eq!(label_counts(&a, "afrisenti", "swa_Latn", 16), vec![2, 9, 5]);
    assert_eq!(
        label_counts(&a, "afrisenti", "swa_Latn", 64),
        vec![7, 38, 19]
    );
}

#[test]
fn aligned_pools_share_ids_across_parallel_languages() {
    let mut r = req(&["sib200"], &["en", "hi", "quy"], &[16], 0);
    r.aligned = true;
    let rows = sample_pools(&shipped(), &r).unwrap();
    let en = ids(&rows, "sib200", "eng_Latn", 16);
    assert_eq!(en, ids(&rows, "sib200", "hin_Deva", 16));
    assert_eq!(en, ids(&rows, "sib200", "quy_Latn", 16));
}

#[test]
fn support_query_from_a_real_pool() {
    let rows = sample_pools(&shipped(), &req(&["sib200"], &["sw"], &[64], 0)).unwrap();
    let pool = ids(&rows, "sib200", "swh_Latn", 64);
    let mut seen_support = BTreeSet::new();
    for it in 0..20 {
        let (s, q) = support_query(&pool, 4, 4, 0, &["sib200", "swh_Latn"], it).unwrap();
        assert!(s.iter().all(|x| !q.contains(x)));
        assert!(s.iter().chain(&q).all(|x| pool.contains(x)));
        seen_support.extend(s);
    }
    assert!(seen_support.len() > 30, "iterations redraw the support set");
}

#[test]
fn cli_writes_the_documented_columns() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pools.parquet");
    let o = mlbench(&[
        "--data-dir",
        shipped().to_str().unwrap(),
        "--quiet",
        "data",
        "sample",
        "--task",
        "sib200",
        "--langs",
        "en,fr,sw",
        "--k",
        "16,64",
        "--seed",
        "0",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let df = schema::read_parquet(&out).unwrap();
    let names: Vec<String> = df
        .get_column_names()
        .iter()
        .map(|s| s.to_string())
        .collect();
    for c in ["task", "lang", "id", "label", "seed", "k", "draw"] {
        assert!(names.contains(&c.to_string()), "missing {c} in {names:?}");
    }
    assert_eq!(df.height(), 3 * (16 + 64));
    // Byte-identical on a second run.
    let out2 = dir.path().join("again.parquet");
    let o = mlbench(&[
        "--data-dir",
        shipped().to_str().unwrap(),
        "--quiet",
        "data",
        "sample",
        "--task",
        "sib200",
        "--langs",
        "en,fr,sw",
        "--k",
        "16,64",
        "--seed",
        "0",
        "--out",
        out2.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&out2).unwrap());
    assert_eq!(files_in(dir.path()), vec!["again.parquet", "pools.parquet"]);
}
