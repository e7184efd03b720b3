//! The batch evaluator on tiny models: shared-prefix scoring against the plain per-request
//! scorer (lm-evaluation-harness semantics), batch invariance, metrics recomputed by hand from
//! the per-example records, records joining back to the dataset, in-context examples never
//! including the evaluated example, `--batch-size auto` (a size in range, the same scores as
//! fixed sizes) and bad input refused before scoring.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::DType;
use common::*;
use mlbench::eval::choices::{score_choices, ChoiceRequest};
use mlbench::eval::run::prepare_items;
use mlbench::model::config::Arch;
use mlbench::model::score::{score_ids, Pad};
use mlbench::model::{tiny, LoadedModel};
use mlbench::plan::{EvalConfig, EvalPlan};

fn tiny_model(arch: Arch) -> (tempfile::TempDir, LoadedModel) {
    let dir = tempfile::tempdir().unwrap();
    tiny::write_tiny(arch, dir.path(), 0).unwrap();
    let m = mlbench::model::load_dir(dir.path(), DType::F32, &test_device()).unwrap();
    (dir, m)
}

/// Requests with contexts longer than Gemma's tiny sliding window (4) and continuations of
/// 1 to 4 tokens, some sharing their first token.
fn requests(seed: u64, n: usize, vocab: u32) -> Vec<ChoiceRequest> {
    let mut rng = mlbench::util::Rng::new(seed);
    (0..n)
        .map(|_| {
            let lc = 1 + rng.below(12) as usize;
            let context: Vec<u32> = (0..lc)
                .map(|_| 3 + rng.below(vocab as u64 - 3) as u32)
                .collect();
            let nc = 1 + rng.below(5) as usize;
            let first = 3 + rng.below(vocab as u64 - 3) as u32;
            let continuations = (0..nc)
                .map(|j| {
                    let len = 1 + rng.below(4) as usize;
                    let mut c: Vec<u32> = (0..len)
                        .map(|_| 3 + rng.below(vocab as u64 - 3) as u32)
                        .collect();
                    if j % 2 == 1 {
                        c[0] = first;
                    }
                    c
                })
                .collect();
            ChoiceRequest {
                context,
                continuations,
            }
        })
        .collect()
}

/// Every choice of every request scored alone by the plain per-request scorer (the
/// lm-evaluation-harness reading), in request then choice order.
fn per_request_scores(
    m: &LoadedModel,
    reqs: &[ChoiceRequest],
) -> Vec<mlbench::model::score::Score> {
    let flat: Vec<(Vec<u32>, Vec<u32>)> = reqs
        .iter()
        .flat_map(|r| {
            r.continuations
                .iter()
                .map(|c| (r.context.clone(), c.clone()))
        })
        .collect();
    score_ids(&m.model, None, &flat, 8, Pad::Right, 2048).unwrap()
}

#[test]
fn shared_prefix_scores_equal_per_request_scores_and_do_not_depend_on_the_batch() {
    for arch in [Arch::Gemma3, Arch::Llama, Arch::Qwen2] {
        let (_d, m) = tiny_model(arch);
        let vocab = m.model.config.vocab_size.min(300) as u32;
        let reqs = requests(1, 40, vocab);
        let packed1 = score_choices(&m.model, None, &reqs, 1, 2048).unwrap();
        let packed32 = score_choices(&m.model, None, &reqs, 32, 2048).unwrap();
        let plain = per_request_scores(&m, &reqs);
        let mut k = 0;
        let mut worst = 0f64;
        for (i, r) in reqs.iter().enumerate() {
            for j in 0..r.continuations.len() {
                let (a, b, c) = (&packed1[i][j], &packed32[i][j], &plain[k]);
                worst = worst
                    .max((a.logprob - c.logprob).abs())
                    .max((b.logprob - c.logprob).abs());
                assert_eq!(a.tokens, c.tokens);
                assert_eq!(a.greedy, c.greedy, "{arch:?} request {i} choice {j}");
                assert_eq!(b.greedy, c.greedy, "{arch:?} request {i} choice {j}");
                k += 1;
            }
        }
        assert!(
            worst <= 1e-4,
            "{arch:?}: packed vs per-request differ by {worst}"
        );
    }
}

#[test]
fn a_preamble_run_once_gives_the_per_request_scores() {
    use mlbench::eval::choices::shared_prefix_len;
    for arch in [Arch::Gemma3, Arch::Llama, Arch::Qwen2] {
        let (_d, m) = tiny_model(arch);
        let vocab = m.model.config.vocab_size.min(300) as u32;
        // Nine common tokens, longer than Gemma's tiny sliding window (4), before each context.
        let preamble: Vec<u32> = (0..9).map(|i| 3 + (i * 37) % (vocab - 3)).collect();
        let mut reqs = requests(5, 24, vocab);
        for r in reqs.iter_mut() {
            r.context.splice(0..0, preamble.iter().copied());
        }
        let shared = shared_prefix_len(&reqs, 2048);
        assert!(shared >= preamble.len(), "{arch:?}: {shared} shared tokens");
        let packed = score_choices(&m.model, None, &reqs, 5, 2048).unwrap();
        let plain = per_request_scores(&m, &reqs);
        let mut k = 0;
        for (i, scores) in packed.iter().enumerate() {
            for (j, a) in scores.iter().enumerate() {
                let c = &plain[k];
                assert!(
                    (a.logprob - c.logprob).abs() <= 1e-4,
                    "{arch:?} request {i} choice {j}: {} vs {}",
                    a.logprob,
                    c.logprob
                );
                assert_eq!(a.greedy, c.greedy, "{arch:?} request {i} choice {j}");
                k += 1;
            }
        }
    }
}

#[test]
fn long_contexts_are_cut_from_the_left_like_the_per_request_scorer() {
    let (_d, m) = tiny_model(Arch::Llama);
    // One continuation, so the cut is the same for both scorers.
    let mut reqs = requests(2, 10, 200);
    for r in reqs.iter_mut() {
        r.continuations.truncate(1);
        r.context = r.context.iter().cycle().take(30).copied().collect();
    }
    let packed = score_choices(&m.model, None, &reqs, 4, 12).unwrap();
    let flat: Vec<(Vec<u32>, Vec<u32>)> = reqs
        .iter()
        .map(|r| (r.context.clone(), r.continuations[0].clone()))
        .collect();
    let plain = score_ids(&m.model, None, &flat, 4, Pad::Right, 12).unwrap();
    for (p, q) in packed.iter().zip(&plain) {
        assert!((p[0].logprob - q.logprob).abs() < 1e-4);
    }
}

const SPEC: &str = r#"
name = "toy"
version = 3
scoring = "multiple_choice"
fewshot_split = "dev"
[prompt]
template = "Q: {text}\nA:"
[[metrics]]
name = "acc"
higher_is_better = true
[[metrics]]
name = "acc_norm"
higher_is_better = true
[[metrics]]
name = "acc_bytes"
higher_is_better = true
"#;

struct Data {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    model: PathBuf,
}

fn data() -> Data {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    std::fs::create_dir_all(dir.join("tasks")).unwrap();
    let mut rows = toy_examples("toy", &["eng_Latn", "fra_Latn"], 3, 4, "test");
    let mut dev = toy_examples("toy", &["eng_Latn", "fra_Latn"], 3, 2, "dev");
    for r in dev.iter_mut() {
        r.id = format!("d{}", r.id);
    }
    rows.extend(dev);
    // Choices of different lengths in characters and bytes.
    for r in rows.iter_mut() {
        r.choices = Some(vec!["yes".into(), "no".into(), "àé".into()]);
    }
    write_dataset(&dir, "toy", &rows);
    std::fs::write(dir.join("tasks/toy.toml"), SPEC).unwrap();
    let model = tmp.path().join("tiny");
    tiny::write_tiny(Arch::Gemma3, &model, 0).unwrap();
    Data {
        _tmp: tmp,
        dir,
        model,
    }
}

fn cfg(d: &Data) -> EvalConfig {
    EvalConfig {
        model: d.model.to_str().unwrap().into(),
        tasks: vec!["toy".into()],
        langs: vec!["en".into(), "fr".into()],
        ..EvalConfig::default()
    }
}

/// A PEFT adapter for `d`'s model drawn from `seed`, with B = 0.05 everywhere (so it changes
/// the scores), saved under `d`'s folder; returns its folder.
fn adapter(d: &Data, seed: u64) -> PathBuf {
    let dev = candle_core::Device::Cpu;
    let m = mlbench::model::load_dir(&d.model, DType::F32, &dev).unwrap();
    let ad = mlbench::model::lora::Adapter::new(
        "a",
        mlbench::model::lora::LoraConfig::default(),
        &m.model.modules(),
        seed,
        DType::F32,
        &dev,
    )
    .unwrap();
    for p in ad.pairs.values() {
        let ones = candle_core::Tensor::ones(p.b.dims(), DType::F32, &dev).unwrap();
        p.b.set(&ones.affine(0.05, 0.0).unwrap()).unwrap();
    }
    let dir = d
        ._tmp
        .path()
        .join("adapters")
        .join(format!("seed{seed}"))
        .join("ad");
    ad.save_peft(&dir).unwrap();
    dir
}

fn eval_cli(d: &Data, extra: &[&str], out: &Path) -> std::process::Output {
    let mut args = vec![
        "--data-dir",
        d.dir.to_str().unwrap(),
        "-q",
        "eval",
        "--model",
        d.model.to_str().unwrap(),
        "--task",
        "toy",
        "--langs",
        "en,fr",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    mlbench(&args)
}

#[test]
fn records_join_the_dataset_and_metrics_recompute_from_them() {
    let d = data();
    let out = d._tmp.path().join("ev");
    // An adapter with non-zero B, so the variants differ.
    let adir = adapter(&d, 3);
    let o = eval_cli(&d, &["--adapters", adir.to_str().unwrap()], &out);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = mlbench::data::schema::read_parquet(&out.join("samples.parquet")).unwrap();
    assert_eq!(s.height(), 2 * 24, "base + adapter x 24 test examples");
    // Join back to the dataset ids.
    let ds = mlbench::data::schema::load(&d.dir.join("toy.parquet"), None).unwrap();
    let test_ids: std::collections::BTreeSet<(String, String)> = ds
        .column("lang_code")
        .unwrap()
        .str()
        .unwrap()
        .iter()
        .zip(ds.column("id").unwrap().str().unwrap().iter())
        .zip(ds.column("split").unwrap().str().unwrap().iter())
        .filter(|(_, s)| *s == Some("test"))
        .map(|((l, i), _)| (l.unwrap().to_string(), i.unwrap().to_string()))
        .collect();
    let langs = s.column("lang").unwrap().str().unwrap().clone();
    let ids = s.column("id").unwrap().str().unwrap().clone();
    let variants = s.column("variant").unwrap().str().unwrap().clone();
    for v in ["base", "ad"] {
        let got: std::collections::BTreeSet<(String, String)> = (0..s.height())
            .filter(|&i| variants.get(i) == Some(v))
            .map(|i| {
                (
                    langs.get(i).unwrap().to_string(),
                    ids.get(i).unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(got, test_ids, "{v}");
    }
    // Recompute every metric by hand from the stored log-probabilities.
    let choices = [" yes", " no", " àé"];
    let lps = s.column("logprobs").unwrap().list().unwrap().clone();
    let gold = s.column("gold").unwrap().i64().unwrap().clone();
    let mut hand: BTreeMap<(String, String, &str), (usize, usize)> = BTreeMap::new();
    for (i, lp) in lps.amortized_iter().enumerate() {
        let lp: Vec<f64> = lp
            .unwrap()
            .as_ref()
            .f64()
            .unwrap()
            .into_no_null_iter()
            .collect();
        assert_eq!(lp.len(), 3);
        let best = |score: &dyn Fn(usize) -> f64| {
            (0..3).fold(0, |b, j| if score(j) > score(b) { j } else { b })
        };
        let g = gold.get(i).unwrap() as usize;
        for (name, p) in [
            ("acc", best(&|j| lp[j])),
            (
                "acc_norm",
                best(&|j| lp[j] / choices[j].chars().count() as f64),
            ),
            ("acc_bytes", best(&|j| lp[j] / choices[j].len() as f64)),
        ] {
            let e = hand
                .entry((
                    variants.get(i).unwrap().into(),
                    langs.get(i).unwrap().into(),
                    name,
                ))
                .or_default();
            e.0 += usize::from(p == g);
            e.1 += 1;
        }
    }
    let mt = mlbench::data::schema::read_parquet(&out.join("metrics.parquet")).unwrap();
    let col = |c: &str| mt.column(c).unwrap().str().unwrap().clone();
    let (mv, ml, mm) = (col("variant"), col("lang"), col("metric"));
    let val = mt.column("value").unwrap().f64().unwrap().clone();
    let n = mt.column("n").unwrap().u64().unwrap().clone();
    let mut checked = 0;
    for i in 0..mt.height() {
        let key = (
            mv.get(i).unwrap().to_string(),
            ml.get(i).unwrap().to_string(),
            mm.get(i).unwrap(),
        );
        if let Some(&(k, total)) = hand.get(&(key.0.clone(), key.1.clone(), key.2)) {
            assert_eq!(n.get(i).unwrap() as usize, total);
            assert!(
                (val.get(i).unwrap() - k as f64 / total as f64).abs() < 1e-12,
                "{key:?}"
            );
            checked += 1;
        }
        if key.1 == "micro" {
            let (k, t) = hand
                .iter()
                .filter(|((v, _, m), _)| *v == key.0 && *m == key.2)
                .fold((0, 0), |a, (_, &(k, t))| (a.0 + k, a.1 + t));
            assert!((val.get(i).unwrap() - k as f64 / t as f64).abs() < 1e-12);
        }
    }
    assert_eq!(checked, 2 * 2 * 3, "variant x lang x metric rows");
    let res: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(res["tasks"][0]["version"], 3);
    assert_eq!(res["variants"].as_array().unwrap().len(), 2);
    assert_eq!(
        res["variants"][1]["source"]["adapter_model_sha256"]
            .as_str()
            .unwrap()
            .len(),
        64
    );
    // The adapter changed the scores.
    let base_lp: Vec<f64> = (0..s.height())
        .filter(|&i| variants.get(i) == Some("base"))
        .map(|i| lps.get_as_series(i).unwrap().f64().unwrap().get(0).unwrap())
        .collect();
    let ad_lp: Vec<f64> = (0..s.height())
        .filter(|&i| variants.get(i) == Some("ad"))
        .map(|i| lps.get_as_series(i).unwrap().f64().unwrap().get(0).unwrap())
        .collect();
    assert_ne!(base_lp, ad_lp);
}

#[test]
fn in_context_examples_are_seeded_and_never_the_evaluated_example() {
    let d = data();
    let mut c = cfg(&d);
    c.shots = 3;
    c.split = Some("dev".into()); // few-shot split = evaluated split: exclusion matters
    let (items, _) = prepare_items(&EvalPlan::resolve(&d.dir, c.clone()).unwrap()).unwrap();
    assert_eq!(items.len(), 12);
    for it in &items {
        // Each dev example's text is "text <lang> <class> <j>": its own text must not appear
        // among the shots (only as the final question).
        let own = format!("Q: text {} ", it.lang_code);
        let (shots, last) = it.prompt.rsplit_once("\n\n").unwrap();
        assert_eq!(shots.matches("Q: ").count(), 3, "{}", it.prompt);
        assert!(last.starts_with(&own));
        let own_line = last.lines().next().unwrap();
        assert!(
            !shots.contains(&format!("{own_line}\n")),
            "{} shows itself:\n{}",
            it.id,
            it.prompt
        );
    }
    let (again, _) = prepare_items(&EvalPlan::resolve(&d.dir, c.clone()).unwrap()).unwrap();
    assert_eq!(
        items.iter().map(|i| &i.prompt).collect::<Vec<_>>(),
        again.iter().map(|i| &i.prompt).collect::<Vec<_>>()
    );
    c.seed = 1;
    let (other, _) = prepare_items(&EvalPlan::resolve(&d.dir, c.clone()).unwrap()).unwrap();
    assert_ne!(
        items.iter().map(|i| &i.prompt).collect::<Vec<_>>(),
        other.iter().map(|i| &i.prompt).collect::<Vec<_>>()
    );
}

#[test]
fn bad_input_is_refused_before_scoring() {
    let d = data();
    let out = d._tmp.path().join("bad");
    // A template field the data lacks, and an empty split.
    std::fs::write(
        d.dir.join("tasks/toy.toml"),
        SPEC.replace("Q: {text}", "Q: {question} {text}"),
    )
    .unwrap();
    let o = eval_cli(&d, &["--split", "train"], &out);
    assert_user_error(&o, &["has no `train` split", "(it has: dev, test)"]);
    let o = eval_cli(&d, &[], &out);
    assert_user_error(&o, &["uses `{question}`", "no `question` value"]);
    std::fs::write(d.dir.join("tasks/toy.toml"), SPEC).unwrap();
    // A label outside the choices.
    let mut rows = toy_examples("toy", &["eng_Latn", "fra_Latn"], 3, 2, "test");
    rows[1].label = Some(7);
    write_dataset(&d.dir, "toy", &rows);
    let o = eval_cli(&d, &[], &out);
    assert_user_error(&o, &["label 7"]);
    // An adapter that does not fit the model.
    write_dataset(
        &d.dir,
        "toy",
        &toy_examples("toy", &["eng_Latn", "fra_Latn"], 3, 2, "test"),
    );
    // An adapter made for another model: q_proj of shape 7 x 5.
    let ad = mlbench::model::lora::Adapter::new(
        "x",
        mlbench::model::lora::LoraConfig {
            r: 4,
            ..Default::default()
        },
        &[mlbench::model::lora::ModuleInfo {
            name: "model.layers.0.self_attn.q_proj".into(),
            out_features: 7,
            in_features: 5,
        }],
        0,
        DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let adir = d._tmp.path().join("llama-adapter");
    ad.save_peft(&adir).unwrap();
    let o = eval_cli(&d, &["--adapters", adir.to_str().unwrap()], &out);
    assert_user_error(&o, &["adapter `llama-adapter`"]);
    assert!(!out.exists(), "nothing written for refused runs");
}

/// A generation task `arith` (12 English test examples, two exemplars with worked
/// rationales) written into `d`'s data folder.
fn write_arith(d: &Data) {
    let spec = r#"
name = "arith"
version = 1
scoring = "generate"
fewshot_split = "exemplars"
[prompt]
template = "{text} ="
answer = " {rationale}"
[generation]
until = ["\n"]
max_tokens = 6
answer_regex = "([0-9]+)"
[[metrics]]
name = "exact_match"
higher_is_better = true
"#;
    std::fs::write(d.dir.join("tasks/arith.toml"), spec).unwrap();
    // As MGSM: only the exemplars carry a worked rationale (the answer template's field).
    let mut rows = toy_examples("arith", &["eng_Latn"], 1, 12, "test");
    let mut shots = toy_examples("arith", &["eng_Latn"], 1, 2, "exemplars");
    for (i, r) in shots.iter_mut().enumerate() {
        r.id = format!("x{i}");
        r.rationale = Some(format!("{i} + 1 = {}", i + 1));
    }
    for (i, r) in rows.iter_mut().chain(shots.iter_mut()).enumerate() {
        r.choices = None;
        r.label = None;
        r.target = Some(format!("{}", i % 3));
    }
    rows.extend(shots);
    write_dataset(&d.dir, "arith", &rows);
}

#[test]
fn generation_tasks_extract_the_answer_and_score_exact_match() {
    let d = data();
    write_arith(&d);
    let out = d._tmp.path().join("gen");
    let o = mlbench(&[
        "--data-dir",
        d.dir.to_str().unwrap(),
        "-q",
        "eval",
        "--model",
        d.model.to_str().unwrap(),
        "--task",
        "arith",
        "--langs",
        "en",
        "--shots",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = mlbench::data::schema::read_parquet(&out.join("samples.parquet")).unwrap();
    assert_eq!(s.height(), 12);
    let col = |c: &str| s.column(c).unwrap().str().unwrap().clone();
    let (generated, extracted, target) = (col("generated"), col("extracted"), col("target"));
    let correct = s.column("correct").unwrap().bool().unwrap().clone();
    let re = regex::Regex::new("([0-9]+)").unwrap();
    let mut hits = 0;
    for i in 0..12 {
        let g = generated.get(i).unwrap();
        assert!(!g.contains('\n'), "stops at the stop string: {g:?}");
        let want_ext = re.captures_iter(g).last().map(|c| c[1].to_string());
        assert_eq!(extracted.get(i).map(str::to_string), want_ext);
        let ok = want_ext.as_deref() == target.get(i);
        assert_eq!(correct.get(i), Some(ok));
        hits += usize::from(ok);
    }
    let m = mlbench::data::schema::read_parquet(&out.join("metrics.parquet")).unwrap();
    let v = m.column("value").unwrap().f64().unwrap().get(0).unwrap();
    assert!((v - hits as f64 / 12.0).abs() < 1e-12);
    assert_eq!(
        m.column("metric").unwrap().str().unwrap().get(0),
        Some("exact_match")
    );
}

#[test]
fn a_limit_takes_a_label_stratified_subset_in_file_order() {
    // The toy test split is sorted by label (4 per class, 3 classes): the first 3 would all be
    // class 0; the limit takes one of each.
    let d = data();
    let mut c = cfg(&d);
    c.limit = Some(3);
    let (items, _) = prepare_items(&EvalPlan::resolve(&d.dir, c.clone()).unwrap()).unwrap();
    for lang in ["eng_Latn", "fra_Latn"] {
        let golds: Vec<usize> = items
            .iter()
            .filter(|i| i.lang_code == lang)
            .map(|i| i.rendered.gold.unwrap())
            .collect();
        assert_eq!(golds, vec![0, 1, 2], "{lang}");
    }
    let (again, _) = prepare_items(&EvalPlan::resolve(&d.dir, c.clone()).unwrap()).unwrap();
    assert_eq!(
        items.iter().map(|i| &i.id).collect::<Vec<_>>(),
        again.iter().map(|i| &i.id).collect::<Vec<_>>()
    );
    // A fraction (lm-evaluation-harness's `--limit 0.3`) keeps ceil(0.3 x 12) = 4 per language:
    // the same subset as a count of 4.
    let ids = |c: &EvalConfig| -> Vec<String> {
        prepare_items(&EvalPlan::resolve(&d.dir, c.clone()).unwrap())
            .unwrap()
            .0
            .into_iter()
            .map(|i| format!("{}/{}", i.lang_code, i.id))
            .collect()
    };
    c.limit = Some(4);
    let by_count = ids(&c);
    c.limit = None;
    c.limit_fraction = Some(0.3);
    assert_eq!(ids(&c), by_count);
    assert_eq!(by_count.len(), 8);
    c.limit = Some(4);
    assert!(c.problems().iter().any(|p| p.contains("not both")));
    c.limit = None;
    c.limit_fraction = Some(1.5);
    assert!(c.problems().iter().any(|p| p.contains("(0, 1)")));
}

/// A reader of lm-evaluation-harness outputs written against the harness's documented fields
/// (results: `results`/`groups`/`group_subtasks`/`n-shot`/`n-samples`/`versions`/
/// `higher_is_better`/`config`; samples: `doc_id`, `arguments`, `filtered_resps`, the hashes and
/// one value per metric), then the Every Eval Ever export of the same folder, both checked
/// against mlbench's own metrics file.
#[test]
fn lm_eval_and_every_eval_ever_outputs_agree_with_the_metrics() {
    use serde_json::Value;
    let d = data();
    let out = d._tmp.path().join("harness");
    // The harness's flag names: --num-fewshot and --output-path.
    let o = mlbench(&[
        "--data-dir",
        d.dir.to_str().unwrap(),
        "-q",
        "eval",
        "--model",
        d.model.to_str().unwrap(),
        "--task",
        "toy",
        "--langs",
        "en,fr",
        "--num-fewshot",
        "1",
        "--output-path",
        out.to_str().unwrap(),
        "--log-samples",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let m = mlbench::data::schema::read_parquet(&out.join("metrics.parquet")).unwrap();
    let ours = |lang: &str, metric: &str| -> f64 {
        let s = |c: &str| m.column(c).unwrap().str().unwrap().clone();
        let (langs, metrics) = (s("lang"), s("metric"));
        let value = m.column("value").unwrap().f64().unwrap().clone();
        (0..m.height())
            .find(|&i| langs.get(i) == Some(lang) && metrics.get(i) == Some(metric))
            .and_then(|i| value.get(i))
            .unwrap()
    };
    let dir = out.join("lm-eval/base");
    let res: Value =
        serde_json::from_slice(&std::fs::read(dir.join("results.json")).unwrap()).unwrap();
    let subtasks: Vec<&str> = res["group_subtasks"]["toy"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(subtasks, ["toy_eng_Latn", "toy_fra_Latn"]);
    let micro = ours("micro", "acc");
    assert!((res["groups"]["toy"]["acc,none"].as_f64().unwrap() - micro).abs() < 1e-12);
    assert!(res["config"]["model_args"]
        .as_str()
        .unwrap()
        .starts_with("pretrained="));
    let secs: f64 = res["total_evaluation_time_seconds"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(secs > 0.0 && res["date"].as_f64().unwrap() > 1.7e9);
    for (lang, task) in [("eng_Latn", subtasks[0]), ("fra_Latn", subtasks[1])] {
        let r = &res["results"][task];
        for metric in ["acc", "acc_norm", "acc_bytes"] {
            let got = r[format!("{metric},none")].as_f64().unwrap();
            assert!((got - ours(lang, metric)).abs() < 1e-12, "{task} {metric}");
            assert!(r[format!("{metric}_stderr,none")].as_f64().unwrap() > 0.0);
        }
        assert_eq!(res["n-shot"][task], 1);
        assert_eq!(res["versions"][task], 3);
        assert_eq!(res["higher_is_better"][task]["acc"], true);
        assert_eq!(res["n-samples"][task]["effective"], 12);
        let text = std::fs::read_to_string(dir.join(format!("samples_{task}.jsonl"))).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 12);
        let mut ids: Vec<u64> = lines
            .iter()
            .map(|s| s["doc_id"].as_u64().unwrap())
            .collect();
        ids.sort_unstable();
        assert_eq!(ids, (0..12).collect::<Vec<u64>>());
        let mut hits = 0.0;
        for s in &lines {
            let args = s["arguments"].as_array().unwrap();
            assert_eq!(args.len(), 3, "one request per choice");
            let context = args[0][0].as_str().unwrap();
            assert!(
                context.contains("Q: ") && context.ends_with("A:"),
                "{context:?}"
            );
            assert_eq!(
                s["prompt_hash"].as_str().unwrap(),
                mlbench::util::sha256_hex(context.as_bytes())
            );
            // The harness's acc: the argmax of the choices' log-likelihoods is the target.
            let lls: Vec<f64> = s["filtered_resps"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r[0].as_f64().unwrap())
                .collect();
            let best = (0..lls.len()).fold(0, |b, i| if lls[i] > lls[b] { i } else { b });
            let acc = f64::from(u8::from(best as u64 == s["target"].as_u64().unwrap()));
            assert_eq!(s["acc"].as_f64().unwrap(), acc);
            assert!(s["metrics"]
                .as_array()
                .unwrap()
                .contains(&Value::from("acc")));
            hits += acc;
        }
        assert!((hits / 12.0 - ours(lang, "acc")).abs() < 1e-12);
    }

    // The same folder in the Every Eval Ever schema (0.2.1): the required fields and closed key
    // sets of its eval.schema.json and instance_level_eval.schema.json, scores and correctness
    // agreeing with metrics.parquet.
    let eee = d._tmp.path().join("eee");
    let o = mlbench(&[
        "-q",
        "export",
        "--format",
        "eee",
        "--from",
        out.to_str().unwrap(),
        "--out",
        eee.to_str().unwrap(),
        "--organization",
        "tests",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let agg: Value =
        serde_json::from_slice(&std::fs::read(eee.join("base.json")).unwrap()).unwrap();
    let required = [
        "schema_version",
        "evaluation_id",
        "retrieved_timestamp",
        "source_metadata",
        "model_info",
        "eval_library",
        "evaluation_results",
    ];
    let optional = [
        "dedupe_identity",
        "evaluation_timestamp",
        "detailed_evaluation_results",
    ];
    for k in required {
        assert!(agg.get(k).is_some(), "aggregate lacks {k}");
    }
    for k in agg.as_object().unwrap().keys() {
        assert!(
            required.contains(&k.as_str()) || optional.contains(&k.as_str()),
            "{k}"
        );
    }
    assert_eq!(agg["source_metadata"]["source_type"], "evaluation_run");
    assert_eq!(agg["source_metadata"]["source_organization_name"], "tests");
    let strings = |v: &Value| {
        v.as_object()
            .is_none_or(|m| m.values().all(Value::is_string))
    };
    assert!(strings(&agg["model_info"]["additional_details"]));
    let mut found = 0;
    for e in agg["evaluation_results"].as_array().unwrap() {
        for k in [
            "evaluation_name",
            "source_data",
            "metric_config",
            "score_details",
        ] {
            assert!(e.get(k).is_some(), "result lacks {k}");
        }
        assert_eq!(e["source_data"]["source_type"], "other");
        assert!(strings(&e["source_data"]["additional_details"]));
        assert!(strings(&e["metric_config"]["additional_details"]));
        assert!(e["metric_config"]["lower_is_better"].is_boolean());
        let score = e["score_details"]["score"].as_f64().unwrap();
        let ci = &e["score_details"]["uncertainty"]["confidence_interval"];
        assert!(ci["lower"].as_f64().unwrap() <= score && score <= ci["upper"].as_f64().unwrap());
        let metric = e["metric_config"]["additional_details"]["metric"]
            .as_str()
            .unwrap();
        let name = e["evaluation_name"].as_str().unwrap();
        if let Some(lang) = name.strip_prefix("toy_") {
            assert!(
                (score - ours(lang, metric)).abs() < 1e-12,
                "{name} {metric}"
            );
            found += 1;
        }
    }
    assert_eq!(found, 3 * 4, "3 metrics x (2 languages, micro, macro)");
    let detail = &agg["detailed_evaluation_results"];
    let bytes = std::fs::read(eee.join(detail["file_path"].as_str().unwrap())).unwrap();
    assert_eq!(
        detail["checksum"].as_str().unwrap(),
        mlbench::util::sha256_hex(&bytes)
    );
    let lines: Vec<Value> = String::from_utf8(bytes)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(detail["total_rows"], 24);
    assert_eq!(lines.len(), 24);
    let instance_keys = [
        "schema_version",
        "evaluation_id",
        "model_id",
        "evaluation_name",
        "sample_id",
        "sample_hash",
        "interaction_type",
        "input",
        "output",
        "messages",
        "answer_attribution",
        "evaluation",
        "token_usage",
        "performance",
        "error",
        "metadata",
    ];
    let mut correct_en = 0.0;
    for l in &lines {
        for k in l.as_object().unwrap().keys() {
            assert!(instance_keys.contains(&k.as_str()), "{k}");
        }
        assert_eq!(l["evaluation_id"], agg["evaluation_id"]);
        assert_eq!(l["interaction_type"], "single_turn");
        assert!(l["input"]["raw"].is_string() && l["input"]["reference"].is_array());
        assert!(l["output"]["raw"].is_array());
        assert!(strings(&l["metadata"]));
        let a = &l["answer_attribution"][0];
        assert_eq!(a["extracted_value"], l["output"]["raw"][0]);
        assert!(l["evaluation"]["score"].is_number());
        if l["evaluation_name"] == "toy_eng_Latn" && l["evaluation"]["is_correct"] == true {
            correct_en += 1.0;
        }
    }
    assert!((correct_en / 12.0 - ours("eng_Latn", "acc")).abs() < 1e-12);
}

/// Every sample's log-probabilities (in `samples.parquet` order) and every metric value of an
/// evaluation folder.
fn scores_of(out: &Path) -> (Vec<Vec<f64>>, Vec<f64>) {
    let s = mlbench::data::schema::read_parquet(&out.join("samples.parquet")).unwrap();
    let lps = s.column("logprobs").unwrap().list().unwrap().clone();
    let lps: Vec<Vec<f64>> = lps
        .amortized_iter()
        .map(|lp| {
            lp.unwrap()
                .as_ref()
                .f64()
                .unwrap()
                .into_no_null_iter()
                .collect()
        })
        .collect();
    let m = mlbench::data::schema::read_parquet(&out.join("metrics.parquet")).unwrap();
    let values = m.column("value").unwrap().f64().unwrap();
    (lps, values.into_no_null_iter().collect())
}

fn results_of(out: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap()
}

#[test]
fn batch_size_auto_picks_a_size_that_fits_and_scores_like_fixed_sizes() {
    let d = data();
    let run = |size: &str| {
        let out = d._tmp.path().join(format!("bs-{size}"));
        let o = eval_cli(&d, &["--shots", "1", "--batch-size", size], &out);
        assert!(o.status.success(), "{size}: {}", stderr(&o));
        out
    };
    let (one, sixteen, auto) = (run("1"), run("16"), run("auto"));
    let res = results_of(&auto);
    assert_eq!(res["config"]["batch_size"], "auto");
    let chosen = res["batch_size_chosen"].as_u64().unwrap();
    // At most the ceiling and the largest task x language group (12 examples here).
    assert!((1..=12).contains(&chosen), "auto chose {chosen}");
    let harness = results_of(&auto.join("lm-eval/base"));
    assert_eq!(harness["config"]["batch_size"], "auto");
    assert_eq!(
        harness["config"]["batch_sizes"],
        serde_json::json!([chosen])
    );
    // A number stays a number, and is the size used.
    let res16 = results_of(&sixteen);
    assert_eq!(res16["config"]["batch_size"], 16);
    assert_eq!(res16["batch_size_chosen"], 16);
    // The scores do not depend on the batch size: the metrics are equal and the
    // log-probabilities bit-identical.
    let base = scores_of(&one);
    for other in [&sixteen, &auto] {
        let (lps, metrics) = scores_of(other);
        assert_eq!(metrics, base.1, "{}", other.display());
        assert_eq!(lps, base.0, "{}", other.display());
    }
}

#[test]
fn batch_size_auto_decodes_generation_tasks_too() {
    let d = data();
    write_arith(&d);
    let run = |size: &str| {
        let out = d._tmp.path().join(format!("gen-{size}"));
        let o = mlbench(&[
            "--data-dir",
            d.dir.to_str().unwrap(),
            "-q",
            "eval",
            "--model",
            d.model.to_str().unwrap(),
            "--task",
            "arith",
            "--langs",
            "en",
            "--batch-size",
            size,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{size}: {}", stderr(&o));
        let s = mlbench::data::schema::read_parquet(&out.join("samples.parquet")).unwrap();
        let gen = s.column("generated").unwrap().str().unwrap().clone();
        let texts: Vec<String> = gen.iter().map(|g| g.unwrap().to_string()).collect();
        (
            texts,
            results_of(&out)["batch_size_chosen"].as_u64().unwrap(),
        )
    };
    let (one, _) = run("1");
    let (auto, chosen) = run("auto");
    assert!((1..=12).contains(&chosen), "auto chose {chosen}");
    assert_eq!(auto, one, "the same answers at any batch size");
}

#[test]
fn a_misspelt_batch_size_is_refused_naming_the_flag() {
    let d = data();
    let out = d._tmp.path().join("atuo");
    let o = eval_cli(&d, &["--batch-size", "atuo"], &out);
    assert_user_error(&o, &["--batch-size", "atuo", "auto"]);
    let o = eval_cli(&d, &["--batch-size", "0"], &out);
    assert_user_error(&o, &["batch_size = 0"]);
    assert!(!out.exists());
}

/// A stopped evaluation keeps the groups it finished and the next run reads them back: the
/// records equal an uninterrupted run's to the bit; a changed setting scores everything again.
#[test]
fn a_stopped_evaluation_resumes_from_its_finished_groups() {
    use mlbench::eval::run::{evaluate, evaluate_stoppable};
    use std::sync::atomic::{AtomicBool, Ordering};
    let d = data();
    let adir = adapter(&d, 5);
    let mut c = cfg(&d);
    c.adapters = vec![format!("a={}", adir.display())];
    c.batch_size = mlbench::plan::eval::BatchSize::Fixed(2);
    let plan = EvalPlan::resolve(&d.dir, c.clone()).unwrap();
    let whole = evaluate(&plan, &d._tmp.path().join("whole"), &mut |_, _, _, _, _| {}).unwrap();

    // Stop once two of the four groups (base and adapter x en and fr) are finished.
    let out = d._tmp.path().join("stopped");
    let stop = AtomicBool::new(false);
    let mut finished = 0;
    let mut raise = |_: &str, _: &str, _: &str, done: usize, total: usize| {
        if done == total {
            finished += 1;
            if finished == 2 {
                stop.store(true, Ordering::SeqCst);
            }
        }
    };
    match evaluate_stoppable(&plan, &out, &stop, &mut raise) {
        Err(mlbench::Error::EvalInterrupted {
            kept: 2, groups: 4, ..
        }) => {}
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("the evaluation did not stop"),
    }
    assert_eq!(files_in(&out.join("groups")).len(), 2);
    assert!(!out.join("results.json").exists());

    // The rerun reads the two groups back (finished at once, never started) and scores the rest.
    stop.store(false, Ordering::SeqCst);
    let mut started = Vec::new();
    let mut note = |v: &str, t: &str, l: &str, done: usize, _: usize| {
        if done == 0 {
            started.push(format!("{v} {t}/{l}"));
        }
    };
    let again = evaluate_stoppable(&plan, &out, &stop, &mut note).unwrap();
    assert_eq!(started.len(), 2, "{started:?}");
    assert_eq!(again.groups_read_back, 2);
    assert_eq!(results_of(&out)["groups_read_back"], 2);
    assert!(
        !out.join("groups").exists(),
        "kept groups removed once written"
    );
    let key = |r: &mlbench::eval::run::Record| {
        let bits = r
            .logprobs
            .iter()
            .flatten()
            .map(|x| x.to_bits())
            .collect::<Vec<_>>();
        (
            r.variant.clone(),
            r.lang.clone(),
            r.id.clone(),
            bits,
            r.outcomes.clone(),
        )
    };
    let keys = |rs: &[mlbench::eval::run::Record]| rs.iter().map(key).collect::<Vec<_>>();
    assert_eq!(keys(&again.records), keys(&whole.records));
    assert_eq!(again.metrics, whole.metrics);

    // Groups kept under other settings are not read back.
    stop.store(false, Ordering::SeqCst);
    let other = d._tmp.path().join("other");
    let mut once = |_: &str, _: &str, _: &str, done: usize, total: usize| {
        if done == total {
            stop.store(true, Ordering::SeqCst);
        }
    };
    assert!(evaluate_stoppable(&plan, &other, &stop, &mut once).is_err());
    stop.store(false, Ordering::SeqCst);
    let mut c2 = c.clone();
    c2.batch_size = mlbench::plan::eval::BatchSize::Fixed(3);
    let plan2 = EvalPlan::resolve(&d.dir, c2).unwrap();
    let fresh = evaluate_stoppable(&plan2, &other, &stop, &mut |_, _, _, _, _| {}).unwrap();
    assert_eq!(fresh.groups_read_back, 0);
}
