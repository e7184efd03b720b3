//! Over a hundred malformed inputs through every entry point: dataset files (through `data
//! sample`, `data describe` and `eval`), experiment files (`run --dry-run`), `--set` values
//! (`train`), adapters and request files (`score`), results stores (`compare`, `merge`) and model
//! folders (`score`). Each must end with exit status 2, a message naming the file, key or
//! column at fault, and no panic.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use polars::prelude::*;

/// One malformed input: the command line and what its message must name.
struct Case {
    name: String,
    args: Vec<String>,
    needles: Vec<String>,
}

fn case(name: impl Into<String>, args: &[&str], needles: &[&str]) -> Case {
    Case {
        name: name.into(),
        args: args.iter().map(|s| s.to_string()).collect(),
        needles: needles.iter().map(|s| s.to_string()).collect(),
    }
}

struct World {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    data: PathBuf,
    model: PathBuf,
    adapter: PathBuf,
}

impl World {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let data = toy_data(&root, &[("train", 4), ("test", 2)]);
        let model = tiny_llama(&root);
        let adapter = root.join("adapter");
        let o = mlbench(&[
            "-q",
            "adapter",
            "init",
            "--model",
            model.to_str().unwrap(),
            "--out",
            adapter.to_str().unwrap(),
            "--r",
            "4",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        World {
            _tmp: tmp,
            root,
            data,
            model,
            adapter,
        }
    }

    fn p(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn s(&self, name: &str) -> String {
        self.p(name).to_str().unwrap().to_string()
    }

    /// A data folder `name` holding the toy dataset as `spoil` leaves it (or `raw` bytes).
    fn data_variant(&self, name: &str, spoil: impl FnOnce(&mut DataFrame)) -> String {
        let dir = self.p(name);
        std::fs::create_dir_all(dir.join("tasks")).unwrap();
        std::fs::write(dir.join("tasks/toy.toml"), TOY_SPEC).unwrap();
        let mut df = mlbench::data::schema::read_parquet(&self.data.join("toy.parquet")).unwrap();
        spoil(&mut df);
        let mut f = std::fs::File::create(dir.join("toy.parquet")).unwrap();
        ParquetWriter::new(&mut f).finish(&mut df).unwrap();
        dir.to_str().unwrap().to_string()
    }

    fn data_bytes(&self, name: &str, bytes: &[u8]) -> String {
        let dir = self.p(name);
        std::fs::create_dir_all(dir.join("tasks")).unwrap();
        std::fs::write(dir.join("tasks/toy.toml"), TOY_SPEC).unwrap();
        std::fs::write(dir.join("toy.parquet"), bytes).unwrap();
        dir.to_str().unwrap().to_string()
    }

    fn copy(&self, from: &Path, name: &str) -> PathBuf {
        let to = self.p(name);
        std::fs::create_dir_all(&to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
        to
    }
}

fn edit_json(p: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

/// Rewrites a safetensors file through `f` (name, values, shape) -> (values, shape) or drop.
fn edit_tensors(
    p: &Path,
    f: impl Fn(&str, Vec<f32>, Vec<usize>) -> Option<(Vec<f32>, Vec<usize>)>,
) {
    let dev = candle_core::Device::Cpu;
    let mut out = std::collections::HashMap::new();
    for (n, t) in mlbench::model::lora::read_safetensors(p, &dev).unwrap() {
        let dims = t.dims().to_vec();
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        if let Some((v, d)) = f(&n, v, dims) {
            out.insert(n, candle_core::Tensor::from_vec(v, d, &dev).unwrap());
        }
    }
    candle_core::safetensors::save(&out, p).unwrap();
}

fn replace_col(df: &mut DataFrame, name: &str, c: Column) {
    df.replace(name, c).unwrap();
}

fn dataset_cases(w: &World) -> Vec<Case> {
    let n = {
        let df = mlbench::data::schema::read_parquet(&w.data.join("toy.parquet")).unwrap();
        df.height()
    };
    let strings =
        |f: &dyn Fn(usize) -> Option<String>| -> Vec<Option<String>> { (0..n).map(f).collect() };
    type Spoil = Box<dyn FnOnce(&mut DataFrame)>;
    let drop = |c: &'static str| -> Spoil {
        Box::new(move |df: &mut DataFrame| {
            let _ = df.drop_in_place(c).unwrap();
        })
    };
    let mut variants: Vec<(&str, String, Vec<&str>)> = Vec::new();
    let mut add = |name: &'static str, s: Spoil, needles: Vec<&'static str>| {
        variants.push((name, w.data_variant(name, s), needles));
    };
    for c in ["text", "label", "id", "lang_code", "split", "choices"] {
        let name: &'static str = Box::leak(format!("no-{c}").into_boxed_str());
        let needle: &'static str = Box::leak(format!("column `{c}`").into_boxed_str());
        add(name, drop(c), vec![needle]);
    }
    add(
        "int-text",
        Box::new(move |df| replace_col(df, "text", Column::new("text".into(), vec![1i64; n]))),
        vec!["column `text`"],
    );
    add(
        "str-label",
        Box::new(move |df| replace_col(df, "label", Column::new("label".into(), vec!["one"; n]))),
        vec!["column `label`"],
    );
    let empty_text = strings(&|i| Some(if i == 3 { " ".into() } else { format!("t{i}") }));
    add(
        "empty-text",
        Box::new(move |df| replace_col(df, "text", Column::new("text".into(), empty_text))),
        vec!["column `text`", "row 3"],
    );
    let null_id = strings(&|i| if i == 2 { None } else { Some(format!("i{i}")) });
    add(
        "null-id",
        Box::new(move |df| replace_col(df, "id", Column::new("id".into(), null_id))),
        vec!["column `id`", "row 2"],
    );
    add(
        "bad-code",
        Box::new(move |df| {
            replace_col(
                df,
                "lang_code",
                Column::new("lang_code".into(), vec!["english"; n]),
            )
        }),
        vec!["column `lang_code`", "english"],
    );
    add(
        "dup-id",
        Box::new(move |df| replace_col(df, "id", Column::new("id".into(), vec!["same"; n]))),
        vec!["duplicate id"],
    );
    let far = (0..n)
        .map(|i| if i == 4 { 7i64 } else { 0 })
        .collect::<Vec<_>>();
    add(
        "label-range",
        Box::new(move |df| replace_col(df, "label", Column::new("label".into(), far))),
        vec!["column `label`", "row 4"],
    );
    let neg = (0..n)
        .map(|i| if i == 1 { -1i64 } else { 0 })
        .collect::<Vec<_>>();
    add(
        "label-negative",
        Box::new(move |df| replace_col(df, "label", Column::new("label".into(), neg))),
        vec!["column `label`", "row 1"],
    );
    add(
        "no-rows",
        Box::new(|df| *df = df.head(Some(0))),
        vec!["no rows"],
    );
    let empty_split = strings(&|i| {
        Some(if i == 0 {
            String::new()
        } else {
            "train".into()
        })
    });
    add(
        "empty-split",
        Box::new(move |df| replace_col(df, "split", Column::new("split".into(), empty_split))),
        vec!["column `split`", "row 0"],
    );
    variants.push((
        "garbage",
        w.data_bytes("garbage", b"this is not parquet at all"),
        vec!["not a readable Parquet file"],
    ));
    let good = std::fs::read(w.data.join("toy.parquet")).unwrap();
    variants.push((
        "truncated",
        w.data_bytes("truncated", &good[..good.len() / 2]),
        vec!["not a readable Parquet file"],
    ));
    let mut flipped = good.clone();
    let mid = flipped.len() / 3;
    for b in &mut flipped[mid..mid + 64] {
        *b = !*b;
    }
    variants.push((
        "corrupt-page",
        w.data_bytes("corrupt-page", &flipped),
        vec![],
    ));

    let mut cases = Vec::new();
    let m = w.model.to_str().unwrap().to_string();
    for (name, dir, needles) in variants {
        let mut needles = needles;
        needles.push("toy.parquet");
        let o1 = w.s(&format!("{name}-pools.parquet"));
        let o2 = w.s(&format!("{name}-eval"));
        cases.push(case(
            format!("dataset {name}: data sample"),
            &[
                "--data-dir",
                &dir,
                "data",
                "sample",
                "--task",
                "toy",
                "--langs",
                "en",
                "--k",
                "2",
                "--out",
                &o1,
            ],
            &needles,
        ));
        cases.push(case(
            format!("dataset {name}: data describe"),
            &["--data-dir", &dir, "data", "describe", "--task", "toy"],
            &needles,
        ));
        cases.push(case(
            format!("dataset {name}: eval"),
            &[
                "--data-dir",
                &dir,
                "eval",
                "--model",
                &m,
                "--task",
                "toy",
                "--langs",
                "en",
                "--out",
                &o2,
            ],
            &needles,
        ));
    }
    cases
}

fn experiment_cases(w: &World) -> Vec<Case> {
    let head = format!(
        "name = \"bad\"\nmodel = {:?}\ntasks = [\"toy\"]\nlangs = [\"en\", \"fr\"]\n",
        w.model.to_str().unwrap()
    );
    let list: Vec<(&str, String, Vec<&str>)> = vec![
        ("unknown top key", format!("{head}methods = [\"base\"]\nmethodz = 1\n"), vec!["methodz"]),
        ("methods not a list", format!("{head}methods = \"base\"\n"), vec!["methods"]),
        ("empty methods", format!("{head}methods = []\n"), vec!["`methods` is empty"]),
        ("unknown method", format!("{head}methods = [\"meta-lorra\"]\nks = [4]\n"), vec!["meta-lorra", "did you mean meta-lora"]),
        ("duplicate method", format!("{head}methods = [\"lora-k\", \"lora-k\"]\nks = [4]\n"), vec!["lora-k twice"]),
        ("duplicate k", format!("{head}methods = [\"lora-k\"]\nks = [4, 4]\n"), vec!["`ks` lists 4 twice"]),
        ("k zero", format!("{head}methods = [\"lora-k\"]\nks = [0]\n"), vec!["k must be at least 1"]),
        ("no ks", format!("{head}methods = [\"lora-k\"]\n"), vec!["needs budgets"]),
        ("empty seeds", format!("{head}methods = [\"base\"]\nseeds = []\n"), vec!["`seeds` is empty"]),
        ("negative seed", format!("{head}methods = [\"base\"]\nseeds = [-1]\n"), vec!["seeds"]),
        ("method section for an absent method", format!("{head}methods = [\"base\"]\n[method.lora-k]\nlr = 1e-3\n"), vec!["[method.lora-k]"]),
        ("unknown train key", format!("{head}methods = [\"lora-k\"]\nks = [4]\n[train]\nlearning_rate = 1e-3\n"), vec!["learning_rate"]),
        ("lr nan", format!("{head}methods = [\"lora-k\"]\nks = [4]\n[train]\nlr = nan\n"), vec!["`lr`"]),
        ("lr negative", format!("{head}methods = [\"lora-k\"]\nks = [4]\n[train]\nlr = -1e-3\n"), vec!["lr must be a positive number"]),
        ("lr a string", format!("{head}methods = [\"lora-k\"]\nks = [4]\n[train]\nlr = \"fast\"\n"), vec!["fast"]),
        ("lora_r huge", format!("{head}methods = [\"lora-k\"]\nks = [4]\n[train]\nlora_r = 100000000\n"), vec!["lora_r"]),
        ("passes 1e30", format!("{head}methods = [\"lora-k\"]\nks = [4]\n[train]\npasses = 1e30\n"), vec!["passes"]),
        ("meta_iterations huge", format!("{head}methods = [\"meta-lora\"]\nks = [4]\n[train]\nmeta_iterations = 10000000000000\n"), vec!["meta_iterations"]),
        ("eval batch_size 0", format!("{head}methods = [\"base\"]\n[eval]\nbatch_size = 0\n"), vec!["batch_size = 0"]),
        ("eval batch_size misspelt", format!("{head}methods = [\"base\"]\n[eval]\nbatch_size = \"atuo\"\n"), vec!["batch_size", "atuo"]),
        ("eval limit 0", format!("{head}methods = [\"base\"]\n[eval]\nlimit = 0\n"), vec!["limit = 0"]),
        ("eval max_len 0", format!("{head}methods = [\"base\"]\n[eval]\nmax_len = 0\n"), vec!["max_len = 0"]),
        ("eval unknown key", format!("{head}methods = [\"base\"]\n[eval]\nlimt = 3\n"), vec!["limt"]),
        ("eval shots huge", format!("{head}methods = [\"base\"]\n[eval]\nshots = 100000\n"), vec!["shots = 100000"]),
        ("missing model", "name = \"bad\"\nmodel = \"/no/such/model\"\ntasks = [\"toy\"]\nlangs = [\"en\"]\nmethods = [\"base\"]\n".into(), vec!["/no/such/model"]),
        ("missing name", "model = \"x\"\ntasks = [\"toy\"]\nlangs = [\"en\"]\nmethods = [\"base\"]\n".to_string(), vec!["name"]),
        ("not TOML", "name = = \"x\"\n".into(), vec!["bad.toml"]),
        ("unknown task", format!("name = \"bad\"\nmodel = {:?}\ntasks = [\"toyy\"]\nlangs = [\"en\"]\nmethods = [\"base\"]\n", w.model.to_str().unwrap()), vec!["toyy"]),
        ("unknown language", format!("name = \"bad\"\nmodel = {:?}\ntasks = [\"toy\"]\nlangs = [\"xx_Yyyy\"]\nmethods = [\"base\"]\n", w.model.to_str().unwrap()), vec!["xx_Yyyy"]),
        ("unknown device", format!("{head}methods = [\"lora-k\"]\nks = [4]\ndevice = \"tpu\"\n"), vec!["tpu"]),
        ("unknown dtype", format!("{head}methods = [\"lora-k\"]\nks = [4]\ndtype = \"f8\"\n"), vec!["f8"]),
        ("warmup 2", format!("{head}methods = [\"lora-k\"]\nks = [4]\n[train]\nwarmup = 2.0\n"), vec!["warmup"]),
        ("dropout 1.5", format!("{head}methods = [\"lora-k\"]\nks = [4]\n[train]\nlora_dropout = 1.5\n"), vec!["lora_dropout"]),
        ("beta1 1", format!("{head}methods = [\"lora-k\"]\nks = [4]\n[train]\nbeta1 = 1.0\n"), vec!["beta1"]),
        ("clip negative", format!("{head}methods = [\"lora-k\"]\nks = [4]\n[train]\nclip = -1.0\n"), vec!["clip"]),
        ("support+query over k", format!("{head}methods = [\"meta-lora\"]\nks = [4]\n[train]\nn_support = 4\nn_query = 4\n"), vec!["n_support"]),
        ("budget over the split", format!("{head}methods = [\"lora-k\"]\nks = [500]\n"), vec!["500"]),
    ];
    let mut cases: Vec<Case> = list
        .into_iter()
        .enumerate()
        .map(|(i, (name, text, mut needles))| {
            let dir = w.p(&format!("exp{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            let p = dir.join("bad.toml");
            std::fs::write(&p, text).unwrap();
            needles.push("bad");
            case(
                format!("experiment: {name}"),
                &[
                    "--data-dir",
                    w.data.to_str().unwrap(),
                    "run",
                    p.to_str().unwrap(),
                    "--dry-run",
                ],
                &needles,
            )
        })
        .collect();
    let latin = w.p("latin1.toml");
    std::fs::write(&latin, b"name = \"caf\xe9\"\n").unwrap();
    cases.push(case(
        "experiment: not UTF-8",
        &["run", latin.to_str().unwrap(), "--dry-run"],
        &["latin1.toml"],
    ));
    cases.push(case(
        "experiment: missing file",
        &["run", &w.s("nope.toml"), "--dry-run"],
        &["nope.toml"],
    ));
    cases
}

fn set_cases(w: &World) -> Vec<Case> {
    let list: Vec<(&str, Vec<&str>)> = vec![
        ("lr=abc", vec!["abc"]),
        ("lr=nan", vec!["`lr`", "not a finite number"]),
        ("lr=inf", vec!["`lr`", "not a finite number"]),
        ("warmup=-0.1", vec!["warmup"]),
        ("lora_dropout=1", vec!["lora_dropout"]),
        ("batch_size=0", vec!["batch_size"]),
        ("micro_batch=16", vec!["micro_batch"]),
        ("max_len=2", vec!["max_len"]),
        ("inner_lr=0", vec!["inner_lr"]),
        ("unknown_key=1", vec!["unknown_key"]),
        ("passes=0", vec!["passes"]),
        ("lora_r=0", vec!["lora_r"]),
        ("eps=-1", vec!["eps"]),
        ("beta2=1.5", vec!["beta2"]),
        ("method=\"foo\"", vec!["unknown method `foo`"]),
        ("noequals", vec!["noequals", "KEY=VALUE"]),
        ("lora_r=100000000", vec!["lora_r"]),
        ("passes=1e30", vec!["passes"]),
        ("meta_iterations=10000000000000", vec!["meta_iterations"]),
        ("lora_targets=[]", vec!["lora_targets"]),
        ("lora_r=4096", vec!["lora_r = 4096", "min(in, out)"]),
        ("unit=\"planet\"", vec!["planet"]),
    ];
    list.into_iter()
        .map(|(set, needles)| {
            let out = w.s(&format!("run-{}", set.len()));
            case(
                format!("--set {set}"),
                &[
                    "--data-dir",
                    w.data.to_str().unwrap(),
                    "train",
                    "--method",
                    "lora-k",
                    "--model",
                    w.model.to_str().unwrap(),
                    "--task",
                    "toy",
                    "--langs",
                    "en",
                    "--k",
                    "2",
                    "--set",
                    set,
                    "--out",
                    &out,
                ],
                &needles,
            )
        })
        .collect()
}

fn adapter_and_request_cases(w: &World) -> Vec<Case> {
    let reqs = w.p("good.jsonl");
    std::fs::write(&reqs, "{\"context\": \"a b\", \"continuation\": \" c\"}\n").unwrap();
    let mut cases = Vec::new();
    let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    let b_key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
    type Make = Box<dyn Fn(&Path)>;
    let variants: Vec<(&str, Make, Vec<&str>)> = vec![
        (
            "no config",
            Box::new(|d: &Path| std::fs::remove_file(d.join("adapter_config.json")).unwrap()),
            vec!["adapter_config.json"],
        ),
        (
            "config not JSON",
            Box::new(|d: &Path| std::fs::write(d.join("adapter_config.json"), "{r: 4").unwrap()),
            vec!["adapter_config.json", "not JSON"],
        ),
        (
            "no r",
            Box::new(|d: &Path| {
                edit_json(&d.join("adapter_config.json"), |v| {
                    v.as_object_mut().unwrap().remove("r");
                })
            }),
            vec!["adapter_config.json", "`r`"],
        ),
        (
            "prefix tuning",
            Box::new(|d: &Path| {
                edit_json(&d.join("adapter_config.json"), |v| {
                    v["peft_type"] = "PREFIX_TUNING".into()
                })
            }),
            vec!["adapter_config.json", "PREFIX_TUNING"],
        ),
        (
            "dora",
            Box::new(|d: &Path| {
                edit_json(&d.join("adapter_config.json"), |v| {
                    v["use_dora"] = true.into()
                })
            }),
            vec!["adapter_config.json", "DoRA"],
        ),
        (
            "bias all",
            Box::new(|d: &Path| {
                edit_json(&d.join("adapter_config.json"), |v| v["bias"] = "all".into())
            }),
            vec!["adapter_config.json", "bias"],
        ),
        (
            "modules_to_save",
            Box::new(|d: &Path| {
                edit_json(&d.join("adapter_config.json"), |v| {
                    v["modules_to_save"] = serde_json::json!(["lm_head"])
                })
            }),
            vec!["modules_to_save"],
        ),
        (
            "nan weight",
            Box::new(move |d: &Path| {
                edit_tensors(&d.join("adapter_model.safetensors"), |n, mut v, s| {
                    if n == key {
                        v[0] = f32::NAN;
                    }
                    Some((v, s))
                })
            }),
            vec!["adapter_model.safetensors", key, "NaN"],
        ),
        (
            "inf weight",
            Box::new(move |d: &Path| {
                edit_tensors(&d.join("adapter_model.safetensors"), |n, mut v, s| {
                    if n == key {
                        v[1] = f32::INFINITY;
                    }
                    Some((v, s))
                })
            }),
            vec!["adapter_model.safetensors", key, "inf"],
        ),
        (
            "transposed",
            Box::new(move |d: &Path| {
                edit_tensors(&d.join("adapter_model.safetensors"), |n, v, s| {
                    Some((v, if n == key { vec![s[1], s[0]] } else { s }))
                })
            }),
            vec!["adapter_model.safetensors", key, "shape"],
        ),
        (
            "missing B",
            Box::new(move |d: &Path| {
                edit_tensors(&d.join("adapter_model.safetensors"), |n, v, s| {
                    (n != b_key).then_some((v, s))
                })
            }),
            vec![b_key, "missing"],
        ),
        ("unknown module", Box::new(|_: &Path| {}), vec![]),
        (
            "pickle only",
            Box::new(|d: &Path| {
                std::fs::remove_file(d.join("adapter_model.safetensors")).unwrap();
                std::fs::write(d.join("adapter_model.bin"), b"PK").unwrap();
            }),
            vec!["adapter_model.bin", "pickled"],
        ),
        (
            "not safetensors",
            Box::new(|d: &Path| {
                std::fs::write(
                    d.join("adapter_model.safetensors"),
                    b"\x08\x00\x00\x00\x00\x00\x00\x00{}",
                )
                .unwrap()
            }),
            vec!["adapter_model.safetensors"],
        ),
    ];
    for (i, (name, make, needles)) in variants.into_iter().enumerate() {
        if name == "unknown module" {
            // A key for a module the model does not have.
            let d = w.copy(&w.adapter, &format!("ad{i}"));
            let p = d.join("adapter_model.safetensors");
            let dev = candle_core::Device::Cpu;
            let mut map: std::collections::HashMap<String, candle_core::Tensor> =
                mlbench::model::lora::read_safetensors(&p, &dev)
                    .unwrap()
                    .into_iter()
                    .collect();
            let t = map[key].clone();
            map.insert(
                "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight".into(),
                t,
            );
            candle_core::safetensors::save(&map, &p).unwrap();
            cases.push(case(
                format!("adapter: {name}"),
                &[
                    "score",
                    "--model",
                    w.model.to_str().unwrap(),
                    "--adapter",
                    d.to_str().unwrap(),
                    "--requests",
                    reqs.to_str().unwrap(),
                ],
                &["layers.9", "not a linear module"],
            ));
            continue;
        }
        let d = w.copy(&w.adapter, &format!("ad{i}"));
        make(&d);
        cases.push(case(
            format!("adapter: {name}"),
            &[
                "score",
                "--model",
                w.model.to_str().unwrap(),
                "--adapter",
                d.to_str().unwrap(),
                "--requests",
                reqs.to_str().unwrap(),
            ],
            &needles,
        ));
    }
    let requests: Vec<(&str, &[u8], Vec<&str>)> = vec![
        ("not JSON", b"hello\n", vec!["r0.jsonl:1"]),
        (
            "no continuation",
            b"{\"context\": \"a\"}\n",
            vec!["r1.jsonl:1", "continuation"],
        ),
        (
            "empty continuation",
            b"{\"context\": \"a\", \"continuation\": \"\"}\n",
            vec!["r2.jsonl:1", "continuation"],
        ),
        ("no request", b"\n\n", vec!["r3.jsonl", "no request"]),
        (
            "not UTF-8",
            b"{\"context\": \"\xff\", \"continuation\": \"b\"}\n",
            vec!["r4.jsonl"],
        ),
        (
            "context a number",
            b"{\"context\": 3, \"continuation\": \"b\"}\n",
            vec!["r5.jsonl:1"],
        ),
        (
            "second line bad",
            b"{\"context\": \"a\", \"continuation\": \"b\"}\n[1]\n",
            vec!["r6.jsonl:2"],
        ),
    ];
    for (i, (name, bytes, needles)) in requests.into_iter().enumerate() {
        let p = w.p(&format!("r{i}.jsonl"));
        std::fs::write(&p, bytes).unwrap();
        cases.push(case(
            format!("requests: {name}"),
            &[
                "score",
                "--model",
                w.model.to_str().unwrap(),
                "--requests",
                p.to_str().unwrap(),
            ],
            &needles,
        ));
    }
    cases.push(case(
        "requests: missing file",
        &[
            "score",
            "--model",
            w.model.to_str().unwrap(),
            "--requests",
            &w.s("none.jsonl"),
        ],
        &["none.jsonl"],
    ));
    cases
}

fn store_cases(w: &World) -> Vec<Case> {
    // A small real store to spoil.
    let exp = w.p("grid.toml");
    std::fs::write(
        &exp,
        format!(
            "name = \"g\"\nmodel = {:?}\ntasks = [\"toy\"]\nlangs = [\"en\"]\nmethods = [\"base\"]\nseeds = [0, 1]\n[eval]\nshots = 1\n",
            w.model.to_str().unwrap()
        ),
    )
    .unwrap();
    let store = w.p("store");
    let o = mlbench(&[
        "--data-dir",
        w.data.to_str().unwrap(),
        "-q",
        "run",
        exp.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
        "--shard",
        "0/1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let good = w.p("store-good");
    let o = mlbench(&[
        "--data-dir",
        w.data.to_str().unwrap(),
        "-q",
        "run",
        exp.to_str().unwrap(),
        "--store",
        good.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let key = mlbench::runner::store::Store::new(&store)
        .finished()
        .pop()
        .unwrap();
    let bad = store.join("cells").join(&key).join("metrics.parquet");
    std::fs::write(&bad, b"PAR1 not really").unwrap();
    let file = w.p("store-file");
    std::fs::write(&file, "x").unwrap();
    let empty = w.p("store-empty");
    std::fs::create_dir_all(&empty).unwrap();
    let g = good.to_str().unwrap();
    vec![
        case(
            "store: corrupt cell file",
            &["compare", "--store", store.to_str().unwrap()],
            &[bad.to_str().unwrap()],
        ),
        case(
            "store: a file",
            &["compare", "--store", file.to_str().unwrap()],
            &["store-file"],
        ),
        case(
            "store: empty folder",
            &["compare", "--store", empty.to_str().unwrap()],
            &["store-empty", "no finished cell"],
        ),
        case(
            "store: run into a file",
            &[
                "--data-dir",
                w.data.to_str().unwrap(),
                "run",
                exp.to_str().unwrap(),
                "--store",
                file.to_str().unwrap(),
            ],
            &["store-file"],
        ),
        case(
            "store: merge from a non-store",
            &["merge", "--store", g, "--from", empty.to_str().unwrap()],
            &["store-empty", "not a results store"],
        ),
        case(
            "store: misspelt baseline",
            &["compare", "--store", g, "--baseline", "bse"],
            &["bse", "did you mean base"],
        ),
        case(
            "store: unknown language",
            &["compare", "--store", g, "--langs", "xx_Yyyy"],
            &["xx_Yyyy"],
        ),
        case(
            "store: unknown metric",
            &["compare", "--store", g, "--metric", "f7"],
            &["f7"],
        ),
    ]
}

fn model_cases(w: &World) -> Vec<Case> {
    let reqs = w.p("m.jsonl");
    std::fs::write(&reqs, "{\"context\": \"a b\", \"continuation\": \" c\"}\n").unwrap();
    type Make = Box<dyn Fn(&Path)>;
    let cfg = |f: fn(&mut serde_json::Value)| -> Make {
        Box::new(move |d: &Path| edit_json(&d.join("config.json"), f))
    };
    let variants: Vec<(&str, Make, Vec<&str>)> = vec![
        (
            "no config",
            Box::new(|d: &Path| std::fs::remove_file(d.join("config.json")).unwrap()),
            vec!["config.json"],
        ),
        (
            "config not JSON",
            Box::new(|d: &Path| std::fs::write(d.join("config.json"), "{").unwrap()),
            vec!["config.json"],
        ),
        (
            "unknown arch",
            cfg(|v| v["model_type"] = "mamba".into()),
            vec!["config.json", "mamba"],
        ),
        (
            "no rope",
            cfg(|v| {
                v.as_object_mut().unwrap().remove("rope_theta");
            }),
            vec!["config.json", "rope_theta"],
        ),
        (
            "rope yarn",
            cfg(|v| v["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0})),
            vec!["config.json", "yarn"],
        ),
        (
            "rope llama3 in rope_parameters",
            cfg(|v| {
                v["rope_parameters"] = serde_json::json!({"rope_type": "llama3", "rope_theta": 1e5})
            }),
            vec!["config.json", "llama3"],
        ),
        (
            "no rms eps",
            cfg(|v| {
                v.as_object_mut().unwrap().remove("rms_norm_eps");
            }),
            vec!["config.json", "rms_norm_eps"],
        ),
        (
            "heads inconsistent",
            cfg(|v| v["num_key_value_heads"] = 3.into()),
            vec!["config.json", "num_key_value_heads"],
        ),
        (
            "vocab huge",
            cfg(|v| v["vocab_size"] = 100_000_000u64.into()),
            vec!["config.json", "vocab_size"],
        ),
        (
            "partial rotary",
            cfg(|v| v["partial_rotary_factor"] = 0.5.into()),
            vec!["config.json", "partial_rotary_factor"],
        ),
        (
            "nan weight",
            Box::new(|d: &Path| {
                edit_tensors(&d.join("model.safetensors"), |n, mut v, s| {
                    if n == "model.norm.weight" {
                        v[0] = f32::NAN;
                    }
                    Some((v, s))
                })
            }),
            vec!["model.safetensors", "model.norm.weight"],
        ),
        (
            "missing tensor",
            Box::new(|d: &Path| {
                edit_tensors(&d.join("model.safetensors"), |n, v, s| {
                    (n != "model.norm.weight").then_some((v, s))
                })
            }),
            vec!["model.norm.weight", "missing"],
        ),
        (
            "wrong shape",
            Box::new(|d: &Path| {
                edit_tensors(&d.join("model.safetensors"), |n, mut v, s| {
                    if n == "model.norm.weight" {
                        v.push(1.0);
                        Some((v, vec![s[0] + 1]))
                    } else {
                        Some((v, s))
                    }
                })
            }),
            vec!["model.norm.weight", "shape"],
        ),
        (
            "pickle only",
            Box::new(|d: &Path| {
                std::fs::remove_file(d.join("model.safetensors")).unwrap();
                std::fs::write(d.join("pytorch_model.bin"), b"PK").unwrap();
            }),
            vec!["pytorch_model.bin", "pickled"],
        ),
        (
            "no tokenizer",
            Box::new(|d: &Path| std::fs::remove_file(d.join("tokenizer.json")).unwrap()),
            vec!["tokenizer.json"],
        ),
    ];
    let mut cases = Vec::new();
    for (i, (name, make, needles)) in variants.into_iter().enumerate() {
        let d = w.copy(&w.model, &format!("model{i}"));
        make(&d);
        cases.push(case(
            format!("model: {name}"),
            &[
                "score",
                "--model",
                d.to_str().unwrap(),
                "--requests",
                reqs.to_str().unwrap(),
            ],
            &needles,
        ));
    }
    cases.push(case(
        "model: missing folder",
        &[
            "score",
            "--model",
            &w.s("no-model"),
            "--requests",
            reqs.to_str().unwrap(),
        ],
        &["no-model"],
    ));
    cases
}

#[test]
fn over_a_hundred_malformed_inputs_exit_2_and_name_what_is_wrong() {
    let w = World::new();
    let mut cases = Vec::new();
    cases.extend(dataset_cases(&w));
    cases.extend(experiment_cases(&w));
    cases.extend(set_cases(&w));
    cases.extend(adapter_and_request_cases(&w));
    cases.extend(store_cases(&w));
    cases.extend(model_cases(&w));
    assert!(cases.len() >= 100, "{} cases", cases.len());
    // Two workers (CI has two cores); every failure is collected, then all are reported.
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failures = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some(c) = cases.get(i) else { break };
                let args: Vec<&str> = c.args.iter().map(String::as_str).collect();
                let o = mlbench(&args);
                let err = stderr(&o);
                let mut why = Vec::new();
                if o.status.code() != Some(2) {
                    why.push(format!("exit {:?}", o.status.code()));
                }
                if err.contains("panicked") {
                    why.push("panicked".into());
                }
                for n in &c.needles {
                    if !err.contains(n.as_str()) {
                        why.push(format!("no {n:?}"));
                    }
                }
                if !why.is_empty() {
                    failures.lock().unwrap().push(format!(
                        "{}: {}\n    {}",
                        c.name,
                        why.join(", "),
                        err.trim().replace('\n', "\n    ")
                    ));
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
