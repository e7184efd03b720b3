//! `mlbench model ...`, `mlbench adapter ...`, `mlbench score` and `mlbench generate`.

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};

use super::{split_list, table, Global};
use mlbench::model::config::Arch;
use mlbench::model::lora::{Adapter, LoraConfig, Targets};
use mlbench::model::score::{self, Request};
use mlbench::model::{self, tiny};
use mlbench::plan::{DeviceSpec, Precision};
use mlbench::util::write_bytes_atomic;
use mlbench::Error;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ArchArg {
    Gemma3,
    Llama,
    Qwen2,
}

impl From<ArchArg> for Arch {
    fn from(a: ArchArg) -> Self {
        match a {
            ArchArg::Gemma3 => Arch::Gemma3,
            ArchArg::Llama => Arch::Llama,
            ArchArg::Qwen2 => Arch::Qwen2,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Write a tiny random model of a real architecture (for tests and quick trials).
    Tiny(TinyArgs),
    /// Show a model's architecture, sizes and parameter count.
    Info(InfoArgs),
    /// Convert a GGUF file (llama.cpp) into an HF folder: dequantized weights, config.json and
    /// a tokenizer.json built from the GGUF vocabulary.
    Import(ImportArgs),
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The GGUF file.
    #[arg(long)]
    pub gguf: PathBuf,
    /// The HF folder to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Weight type of the written folder: f32 or bf16.
    #[arg(long, default_value_t = Precision::default())]
    pub dtype: Precision,
}

#[derive(Debug, Args)]
pub struct TinyArgs {
    #[arg(long, value_enum, required_unless_present = "like")]
    pub arch: Option<ArchArg>,
    /// Instead of a tiny model: the configuration and tokenizer of this HF folder with random
    /// weights (real shapes and speed, for benchmarks where the weights cannot be copied).
    #[arg(long, conflicts_with = "arch")]
    pub like: Option<PathBuf>,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Where the model comes from and how to run it.
#[derive(Debug, Args, Clone)]
pub struct ModelArgs {
    /// A local HF folder (config.json, *.safetensors, tokenizer.json).
    #[arg(long)]
    pub model: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value_t = DeviceSpec::default())]
    pub device: DeviceSpec,
    /// f32 (CPU default), bf16 (CUDA), f16 or f64.
    #[arg(long, default_value_t = Precision::default())]
    pub dtype: Precision,
}

impl ModelArgs {
    pub fn load(&self) -> anyhow::Result<model::LoadedModel> {
        let device = self.device.open()?;
        let t0 = std::time::Instant::now();
        let m = model::load(&self.model, self.dtype.dtype(), &device)?;
        tracing::info!(model = %self.model, secs = t0.elapsed().as_secs_f64(), "model loaded");
        Ok(m)
    }
}

#[derive(Debug, Args)]
pub struct InfoArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Print as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum AdapterCommand {
    /// Write a fresh PEFT LoRA adapter (A uniform, B zero) for a model.
    Init(InitArgs),
}

#[derive(Debug, Args)]
pub struct InitArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long)]
    pub out: PathBuf,
    /// Rank (default: the training default, 8).
    #[arg(long)]
    pub r: Option<usize>,
    /// Scaling numerator (default 16).
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Dropout (default 0.05).
    #[arg(long)]
    pub dropout: Option<f64>,
    /// Target modules (names or suffixes), comma-separated (default: q, k, v and o
    /// projections).
    #[arg(long, value_delimiter = ',')]
    pub targets: Vec<String>,
    /// Use rsLoRA scaling (alpha / sqrt(r)).
    #[arg(long)]
    pub rslora: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Debug, Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A PEFT adapter folder to apply.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// JSON lines, each `{"context": "...", "continuation": "..."}`.
    #[arg(long)]
    pub requests: PathBuf,
    /// Output JSON lines (default: standard output).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Longest model input in tokens (longer requests lose context from the left).
    #[arg(long, default_value_t = 2048)]
    pub max_len: usize,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Prompt(s) to continue.
    #[arg(long, required = true)]
    pub prompt: Vec<String>,
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// Stop strings.
    #[arg(long)]
    pub until: Vec<String>,
}

fn load_adapter(m: &model::LoadedModel, dir: &Option<PathBuf>) -> anyhow::Result<Option<Adapter>> {
    Ok(match dir {
        Some(d) => Some(Adapter::load_peft(
            d,
            "adapter",
            &m.model.modules(),
            m.model.dtype,
            &m.model.device,
        )?),
        None => None,
    })
}

pub fn run_model(g: &Global, cmd: ModelCommand) -> anyhow::Result<()> {
    match cmd {
        ModelCommand::Tiny(a) => {
            match (&a.like, a.arch) {
                (Some(like), _) => {
                    tiny::write_random_like(like, &a.out, a.seed)?;
                    if !g.quiet {
                        println!(
                            "random-weight model shaped like {} written to {}",
                            like.display(),
                            a.out.display()
                        );
                    }
                }
                (None, Some(arch)) => {
                    tiny::write_tiny(arch.into(), &a.out, a.seed)?;
                    if !g.quiet {
                        println!("tiny {arch:?} model written to {}", a.out.display());
                    }
                }
                (None, None) => unreachable!("clap requires --arch or --like"),
            }
            Ok(())
        }
        ModelCommand::Import(a) => {
            let dtype = a.dtype.dtype();
            let t0 = std::time::Instant::now();
            let c = model::gguf::import(&a.gguf, &a.out, dtype, &g.bar("import"))?;
            tracing::info!(secs = t0.elapsed().as_secs_f64(), "imported");
            if !g.quiet {
                println!(
                    "{:?} model ({} layers, vocabulary {}) -> {}",
                    c.arch,
                    c.num_hidden_layers,
                    c.vocab_size,
                    a.out.display()
                );
            }
            Ok(())
        }
        ModelCommand::Info(a) => {
            let m = a.model.load()?;
            let c = &m.model.config;
            let params: usize = {
                let mut n = m.model.embed.elem_count();
                for l in &m.model.layers {
                    for lin in [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down] {
                        n += lin.weight.elem_count()
                            + lin.bias.as_ref().map_or(0, |b| b.elem_count());
                    }
                }
                n + m.model.lm_head.as_ref().map_or(0, |h| h.elem_count())
            };
            if a.json {
                let mut v = serde_json::to_value(c)?;
                v["parameters"] = serde_json::json!(params);
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let rows = vec![
                    vec!["architecture".into(), format!("{:?}", c.arch)],
                    vec!["layers".into(), c.num_hidden_layers.to_string()],
                    vec![
                        "hidden / mlp".into(),
                        format!("{} / {}", c.hidden_size, c.intermediate_size),
                    ],
                    vec![
                        "heads (q / kv) x dim".into(),
                        format!(
                            "{} / {} x {}",
                            c.num_attention_heads, c.num_key_value_heads, c.head_dim
                        ),
                    ],
                    vec!["vocabulary".into(), c.vocab_size.to_string()],
                    vec!["parameters".into(), params.to_string()],
                ];
                print!("{}", table::render(&["field", "value"], &rows));
            }
            Ok(())
        }
    }
}

pub fn run_adapter(g: &Global, cmd: AdapterCommand) -> anyhow::Result<()> {
    match cmd {
        AdapterCommand::Init(a) => {
            let m = a.model.load()?;
            let d = LoraConfig::default();
            let cfg = LoraConfig {
                r: a.r.unwrap_or(d.r),
                lora_alpha: a.alpha.unwrap_or(d.lora_alpha),
                lora_dropout: a.dropout.unwrap_or(d.lora_dropout),
                target_modules: if a.targets.is_empty() {
                    d.target_modules
                } else {
                    Targets::List(split_list(&a.targets))
                },
                use_rslora: a.rslora,
                base_model_name_or_path: Some(a.model.model.clone()),
            };
            let ad = Adapter::new(
                "default",
                cfg,
                &m.model.modules(),
                a.seed,
                m.model.dtype,
                &m.model.device,
            )?;
            ad.save_peft(&a.out)?;
            if !g.quiet {
                println!(
                    "adapter with {} modules, {} parameters -> {}",
                    ad.pairs.len(),
                    ad.num_params(),
                    a.out.display()
                );
            }
            Ok(())
        }
    }
}

/// Reads a requests file, naming the line of any bad record.
pub fn read_requests(path: &std::path::Path) -> Result<Vec<Request>, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("read", path, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let r: Request = serde_json::from_str(line).map_err(|e| Error::BadSource {
            path: path.to_path_buf(),
            line: i + 1,
            message: format!("expected {{\"context\": \"...\", \"continuation\": \"...\"}}: {e}"),
        })?;
        if r.continuation.is_empty() {
            return Err(Error::BadSource {
                path: path.to_path_buf(),
                line: i + 1,
                message: "`continuation` is empty: there is nothing to score (its log-probability would read 0)".into(),
            });
        }
        out.push(r);
    }
    if out.is_empty() {
        return Err(Error::Config {
            path: path.to_path_buf(),
            message: "no request: expected one JSON object per line".into(),
        });
    }
    Ok(out)
}

pub fn run_score(_g: &Global, a: ScoreArgs) -> anyhow::Result<()> {
    let reqs = read_requests(&a.requests)?;
    let m = a.model.load()?;
    let ad = load_adapter(&m, &a.adapter)?;
    let t0 = std::time::Instant::now();
    let scores = score::score_requests(
        &m.model,
        &m.tok,
        ad.as_ref(),
        &reqs,
        a.batch_size,
        a.max_len,
    )?;
    tracing::info!(
        requests = reqs.len(),
        secs = t0.elapsed().as_secs_f64(),
        "scored"
    );
    let mut buf = Vec::new();
    for s in &scores {
        serde_json::to_writer(&mut buf, s)?;
        buf.push(b'\n');
    }
    match &a.out {
        Some(p) => write_bytes_atomic(p, &buf)?,
        None => std::io::stdout().write_all(&buf)?,
    }
    Ok(())
}

pub fn run_generate(_g: &Global, a: GenerateArgs) -> anyhow::Result<()> {
    let m = a.model.load()?;
    let ad = load_adapter(&m, &a.adapter)?;
    for p in &a.prompt {
        let out = score::generate(&m.model, &m.tok, ad.as_ref(), p, a.max_tokens, &a.until)?;
        println!("{}", serde_json::json!({"prompt": p, "completion": out}));
    }
    Ok(())
}
