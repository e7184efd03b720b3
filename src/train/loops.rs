//! The training loops: the shared LoRA loop (lora-full, lora-k, and per task for
//! lora-per-task-k), the first-order MeTA-LoRA loop (meta-lora, stage2-only, and the first phase
//! of meta-lora+tta) and stage-1 adaptation (stage1-only, the tta phases).
//!
//! In: the model, the task units, the configuration (and, for a length chosen on dev, a dev
//! scorer). Out: PEFT adapter folders under the run folder, the step log (losses, update norms,
//! MeTA-LoRA's inner displacements, dev scores) and per-unit and per-phase counts. With
//! `eval_every > 0` the shared LoRA loop scores the adapter on dev every `eval_every` steps,
//! keeps the best one in `best/` and stops after `patience` evaluations without a gain; the
//! run's adapter is then the best one. Every random choice (batch order, task sampling,
//! support/query split, dropout masks) is drawn from a stream derived from the run seed and the
//! step, so a run is a pure function of its configuration and a resumed run continues bit-exactly
//! from the checkpoint's weights and optimizer moments.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{Tensor, Var};

use super::checkpoint::{self, LogRow, Meta, Seen};
use super::data::TaskUnit;
use super::optim::{clip, lr_at, sgd_step, AdamParams, AdamW};
use super::step::{grads, Grads, Seq, StepOptions};
use crate::data::sample::support_query;
use crate::error::{Error, Result};
use crate::model::lora::Adapter;
use crate::model::transformer::Model;
use crate::plan::train::{Aggregate, InnerOptimizer};
use crate::plan::{Method, TrainConfig};
use crate::util::{derive_seed, Rng};

/// What the progress display gets after every step.
#[derive(Debug, Clone)]
pub struct Progress {
    /// `lora`, `meta`, `adapt` and the unit for per-task phases.
    pub phase: String,
    pub step: usize,
    pub total: usize,
    pub loss: f64,
    pub tokens_per_s: f64,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Optimizer steps (meta-iterations for meta methods) of the main phase(s).
    pub steps: usize,
    pub seen: BTreeMap<String, Seen>,
    /// Counts per kind of phase (`main`, `adapt`).
    pub by_phase: BTreeMap<String, Seen>,
    /// Early stopping: the best dev score and its step.
    pub dev_best: Option<(u64, f64)>,
    pub log: Vec<LogRow>,
    pub elapsed: f64,
}

/// A deep copy of an adapter (fresh variables; changing one leaves the other alone).
pub fn copy_adapter(a: &Adapter) -> Result<Adapter> {
    let mut b = a.clone();
    for p in b.pairs.values_mut() {
        p.a = Var::from_tensor(&p.a.as_tensor().detach())?;
        p.b = Var::from_tensor(&p.b.as_tensor().detach())?;
    }
    Ok(b)
}

/// `|a - b|`: the L2 distance between two adapters of the same shape (all LoRA weights).
pub fn distance(a: &Adapter, b: &Adapter) -> Result<f64> {
    let mut sq = 0f64;
    for (x, y) in a.vars().iter().zip(b.vars()) {
        let d = (x.as_tensor() - y.as_tensor())?;
        sq += d
            .sqr()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
    }
    Ok(sq.sqrt())
}

/// The dev-split score of an adapter (higher is better): what early stopping reads.
pub type DevScorer<'a> = dyn FnMut(&Adapter) -> Result<f64> + 'a;

/// The seed of the LoRA initialisation for a run seed (recorded in the run manifest).
pub fn lora_init_seed(seed: u64) -> u64 {
    derive_seed(seed, &["lora-init"])
}

/// The fresh adapter every method starts from (the same init for a seed).
pub fn init_adapter(model: &Model, cfg: &TrainConfig, name: &str) -> Result<Adapter> {
    Adapter::new(
        name,
        cfg.lora(),
        &model.modules(),
        lora_init_seed(cfg.seed),
        model.dtype,
        &model.device,
    )
}

fn adam_params(cfg: &TrainConfig) -> AdamParams {
    AdamParams {
        beta1: cfg.beta1,
        beta2: cfg.beta2,
        eps: cfg.eps,
        weight_decay: cfg.weight_decay,
    }
}

/// The batches of the shared LoRA loop over the examples of `units[us]`: epochs of seeded
/// shuffles, length-bucketed (groups of 8 batches sorted by length, cut, then the epoch's batches
/// shuffled), until `passes` x examples have been scheduled. Items are `(unit, example)`.
pub fn plan_batches(
    units: &[TaskUnit],
    us: &[usize],
    cfg: &TrainConfig,
    scope: &str,
) -> Vec<Vec<(usize, usize)>> {
    let items: Vec<(usize, usize)> = us
        .iter()
        .flat_map(|&u| (0..units[u].seqs.len()).map(move |i| (u, i)))
        .collect();
    if items.is_empty() {
        return vec![];
    }
    let target = (cfg.passes * items.len() as f64).ceil() as usize;
    let steps = target.div_ceil(cfg.batch_size);
    let mut plan: Vec<Vec<(usize, usize)>> = Vec::with_capacity(steps);
    let mut epoch = 0u64;
    while plan.len() < steps {
        let mut rng = Rng::new(derive_seed(cfg.seed, &["epoch", scope, &epoch.to_string()]));
        let mut order = items.clone();
        rng.shuffle(&mut order);
        let mut batches: Vec<Vec<(usize, usize)>> = Vec::new();
        for group in order.chunks(cfg.batch_size * 8) {
            let mut g = group.to_vec();
            g.sort_by_key(|&(u, i)| units[u].seqs[i].ids.len());
            batches.extend(g.chunks(cfg.batch_size).map(<[_]>::to_vec));
        }
        rng.shuffle(&mut batches);
        plan.extend(batches);
        epoch += 1;
    }
    plan.truncate(steps);
    plan
}

/// Meta-iterations of a run: `meta_iterations`, or enough for every pool example to appear
/// about `passes` times in a support or query set. `stage2-only` counts its unused support
/// sets too, so it runs as many outer steps as `meta-lora` at the same settings (its examples
/// appear `passes x n_query / (n_support + n_query)` times in a query set).
pub fn meta_iterations(cfg: &TrainConfig, units: &[TaskUnit]) -> usize {
    if let Some(m) = cfg.meta_iterations {
        return m;
    }
    let pool: usize = units.iter().map(|u| u.seqs.len()).sum();
    let n = tasks_per_batch(cfg, units.len());
    let per_iter = n * (cfg.n_support + cfg.n_query);
    ((cfg.passes * pool as f64) / per_iter.max(1) as f64)
        .ceil()
        .max(1.0) as usize
}

/// Tasks per meta-batch: `tasks_per_batch`, default min(N, 8), never more than N.
pub fn tasks_per_batch(cfg: &TrainConfig, n_units: usize) -> usize {
    cfg.tasks_per_batch.unwrap_or(8).min(n_units).max(1)
}

fn sorted_by_len(mut v: Vec<&Seq>) -> Vec<&Seq> {
    v.sort_by_key(|s| s.ids.len());
    v
}

fn check_finite(g: &Grads, step: usize, unit: &str, stage: &str) -> Result<()> {
    if !g.loss.is_finite() {
        return Err(Error::NonFinite {
            what: "the loss",
            value: g.loss,
            step,
            unit: unit.to_string(),
            stage: stage.to_string(),
        });
    }
    Ok(())
}

/// `s` stage-1 steps from a copy of `start` on `seqs` (all of them each step): SGD with
/// `inner_lr`, or Adam (fresh moments, no weight decay). Returns the adapted copy.
#[allow(clippy::too_many_arguments)]
pub fn adapt(
    model: &Model,
    start: &Adapter,
    seqs: &[&Seq],
    steps: usize,
    cfg: &TrainConfig,
    seed_key: &[&str],
    mut on_inner: impl FnMut(usize, &Grads, f64) -> Result<()>,
) -> Result<Adapter> {
    let a = copy_adapter(start)?;
    if steps == 0 {
        return Ok(a);
    }
    let vars = a.vars();
    let mut adam = match cfg.inner_optimizer {
        InnerOptimizer::Sgd => None,
        InnerOptimizer::Adam => Some(AdamW::new(
            &vars,
            AdamParams {
                beta1: cfg.beta1,
                beta2: cfg.beta2,
                eps: cfg.eps,
                weight_decay: 0.0,
            },
        )?),
    };
    for j in 0..steps {
        let mut key: Vec<&str> = seed_key.to_vec();
        let js = j.to_string();
        key.extend(["inner", &js]);
        let t0 = Instant::now();
        let g = grads(
            model,
            &a,
            seqs,
            StepOptions::of(cfg, derive_seed(cfg.seed, &key)),
        )?;
        match adam.as_mut() {
            None => sgd_step(&vars, &g.grads, cfg.inner_lr)?,
            Some(o) => o.step(&vars, &g.grads, cfg.inner_lr)?,
        }
        on_inner(j, &g, t0.elapsed().as_secs_f64())?;
    }
    Ok(a)
}

/// One task of a meta-batch: its unit index and support and query sequences.
pub struct MetaTask<'s> {
    pub unit: usize,
    pub support: Vec<&'s Seq>,
    pub query: Vec<&'s Seq>,
}

/// The result of one meta-batch: the aggregated query gradient and what was seen.
pub struct MetaGrad {
    pub grads: Vec<Tensor>,
    /// Mean query loss over the tasks.
    pub query_loss: f64,
    pub rows: Vec<LogRow>,
    /// What each task of the batch contributed (its unit and counts).
    pub counts: Vec<(usize, Seen)>,
}

/// Stage 1 and stage 2 for one meta-batch at shared weights `theta`: each task adapts a copy of
/// `theta` with `inner_steps` steps on its support set, then contributes the query-set gradient
/// at its adapted weights; the gradients are averaged (or summed) in task order. First-order:
/// nothing flows through the inner steps. The tasks run one after the other: side by side (one
/// compute thread each) was 1.08x faster for 1.34x the memory (`benchmarks/perf/README.md`).
pub fn meta_gradient(
    model: &Model,
    theta: &Adapter,
    tasks: &[MetaTask],
    units: &[TaskUnit],
    cfg: &TrainConfig,
    step: usize,
) -> Result<MetaGrad> {
    let parts = tasks
        .iter()
        .map(|t| task_gradient(model, theta, t, units, cfg, step))
        .collect::<Result<Vec<_>>>()?;
    let n = tasks.len().max(1) as f64;
    let mut acc: Option<Vec<Tensor>> = None;
    let (mut rows, mut counts, mut qloss) = (Vec::new(), Vec::new(), 0f64);
    for p in parts {
        qloss += p.loss;
        rows.extend(p.rows);
        counts.push(p.seen);
        acc = Some(match acc {
            None => p.grads,
            Some(a) => a
                .iter()
                .zip(&p.grads)
                .map(|(x, y)| x + y)
                .collect::<candle_core::Result<_>>()?,
        });
    }
    let mut grads = acc.ok_or_else(|| Error::Internal("a meta-batch needs a task".into()))?;
    if cfg.aggregate == Aggregate::Mean {
        grads = grads
            .iter()
            .map(|g| g / n)
            .collect::<candle_core::Result<_>>()?;
    }
    Ok(MetaGrad {
        grads,
        query_loss: qloss / n,
        rows,
        counts,
    })
}

/// One task's part of a meta-gradient.
struct TaskGrad {
    /// The query gradient at the task's adapted copy.
    grads: Vec<Tensor>,
    /// The query loss.
    loss: f64,
    /// The support steps' and the query's log rows.
    rows: Vec<LogRow>,
    /// The task's unit and what it saw.
    seen: (usize, Seen),
}

/// Stage 1 on task `t`'s support set (skipped when the method runs no inner steps), then its
/// query gradient.
fn task_gradient(
    model: &Model,
    theta: &Adapter,
    t: &MetaTask,
    units: &[TaskUnit],
    cfg: &TrainConfig,
    step: usize,
) -> Result<TaskGrad> {
    let s = cfg.effective_inner_steps();
    let st = step.to_string();
    let name = units[t.unit].name.as_str();
    let mut rows = Vec::new();
    let (mut support_tokens, mut support_answer) = (0u64, 0u64);
    let adapted;
    let at: &Adapter = if s == 0 {
        theta
    } else {
        let sup = sorted_by_len(t.support.clone());
        adapted = adapt(
            model,
            theta,
            &sup,
            s,
            cfg,
            &["meta", &st, name],
            |j, g, secs| {
                check_finite(g, step, name, "support")?;
                support_tokens += g.input_tokens as u64;
                support_answer += g.tokens as u64;
                rows.push(LogRow {
                    step: step as u64,
                    task: name.to_string(),
                    stage: "support".into(),
                    inner: j as u32,
                    loss: g.loss,
                    lr: Some(cfg.inner_lr),
                    tokens: g.input_tokens as u64,
                    seconds: secs,
                    ..Default::default()
                });
                Ok(())
            },
        )?;
        // How far stage 1 moved this task's copy: small means multi-task LoRA in disguise.
        if let Some(last) = rows.last_mut() {
            last.norm = Some(distance(&adapted, theta)?);
        }
        &adapted
    };
    let t1 = Instant::now();
    let q = sorted_by_len(t.query.clone());
    let g = grads(
        model,
        at,
        &q,
        StepOptions::of(cfg, derive_seed(cfg.seed, &["meta", &st, name, "query"])),
    )?;
    check_finite(&g, step, name, "query")?;
    rows.push(LogRow {
        step: step as u64,
        task: name.to_string(),
        stage: "query".into(),
        loss: g.loss,
        tokens: g.input_tokens as u64,
        seconds: t1.elapsed().as_secs_f64(),
        ..Default::default()
    });
    let seen = Seen {
        examples: (t.support.len() * usize::from(s > 0) + t.query.len()) as u64,
        tokens: support_tokens + g.input_tokens as u64,
        answer_tokens: support_answer + g.tokens as u64,
        sequences: (t.support.len() * s + t.query.len()) as u64,
    };
    Ok(TaskGrad {
        grads: g.grads,
        loss: g.loss,
        rows,
        seen: (t.unit, seen),
    })
}

/// The tasks of meta-iteration `m`: `n` units drawn without replacement, each with its
/// support/query split of that iteration. Without stage 1 (`stage2-only`) the split is drawn
/// the same way and the support set dropped, so its query sets are those `meta-lora` draws at
/// the same seed, `n_support`, `n_query` and `tasks_per_batch`.
pub fn meta_batch<'u>(
    units: &'u [TaskUnit],
    cfg: &TrainConfig,
    m: usize,
) -> Result<Vec<MetaTask<'u>>> {
    let n = tasks_per_batch(cfg, units.len());
    let mut order: Vec<usize> = (0..units.len()).collect();
    Rng::new(derive_seed(cfg.seed, &["meta-tasks", &m.to_string()])).shuffle(&mut order);
    order
        .into_iter()
        .take(n)
        .map(|u| {
            let seqs: Vec<&Seq> = units[u].seqs.iter().collect();
            let (mut support, query) = support_query(
                &seqs,
                cfg.n_support,
                cfg.n_query,
                cfg.seed,
                &[&units[u].name],
                m as u64,
            )?;
            if cfg.effective_inner_steps() == 0 {
                support.clear();
            }
            Ok(MetaTask {
                unit: u,
                support,
                query,
            })
        })
        .collect()
}

/// Runs a whole method, writing adapters and checkpoints under `out`.
pub struct Trainer<'a> {
    pub model: &'a Model,
    pub cfg: &'a TrainConfig,
    pub units: &'a [TaskUnit],
    pub out: &'a Path,
    /// Set by a Ctrl-C handler: the loop checkpoints after the current step and stops.
    pub stop: &'a AtomicBool,
    pub progress: &'a mut dyn FnMut(&Progress),
    pub config_hash: String,
    /// Scores an adapter on the dev split (early stopping, when `eval_every > 0`).
    pub dev: Option<&'a mut DevScorer<'a>>,
}

/// Wall time of a run across resumptions.
struct Clock {
    started: Instant,
    /// Seconds spent before this process (from the checkpoint).
    before: f64,
}

impl Clock {
    fn total(&self) -> f64 {
        self.before + self.started.elapsed().as_secs_f64()
    }
}

struct PhaseState {
    start_step: usize,
    adapter: Adapter,
    opt: Option<AdamW>,
}

/// A training phase's plan: its unit (none for the shared adapter), whether it is the
/// MeTA-LoRA loop, its batches (the shared LoRA loop), its steps, its name in the progress and
/// the variables the optimizer updates.
struct PhaseRun {
    unit: Option<usize>,
    is_meta: bool,
    plan: Vec<Vec<(usize, usize)>>,
    total: usize,
    name: String,
    vars: Vec<Var>,
}

/// One step's gradient: the gradients, the loss and input tokens it reports, and the log rows
/// that come before the step's own (MeTA-LoRA's support and query rows).
struct StepGrad {
    grads: Vec<Tensor>,
    loss: f64,
    tokens: u64,
    rows: Vec<LogRow>,
}

impl Trainer<'_> {
    /// Trains; with `resume`, continues from the run folder's checkpoint.
    pub fn run(&mut self, resume: bool) -> Result<Summary> {
        let method = self.cfg.method;
        let mut clock = Clock {
            started: Instant::now(),
            before: 0.0,
        };
        let mut meta = Meta {
            config_hash: self.config_hash.clone(),
            phase: 0,
            step: 0,
            adam_t: 0,
            seen: BTreeMap::new(),
            log: Vec::new(),
            elapsed: 0.0,
            by_phase: BTreeMap::new(),
            dev_best: None,
            since_best: 0,
        };
        let mut resume_from = None;
        if resume {
            if let Some(ck) = checkpoint::find(self.out) {
                let text = std::fs::read_to_string(ck.join("state.json"))
                    .map_err(|e| Error::io("read", ck.join("state.json"), e))?;
                let m: Meta = serde_json::from_str(&text)?;
                if m.config_hash != self.config_hash {
                    return Err(Error::Invalid(format!(
                        "--resume: the checkpoint in {} was written with another configuration",
                        ck.display()
                    )));
                }
                meta.phase = m.phase;
                clock.before = m.elapsed;
                resume_from = Some(ck);
            }
        }
        let n_phases = match method {
            Method::LoraFull | Method::LoraK | Method::MetaLora | Method::Stage2Only => 1,
            Method::LoraPerTaskK | Method::Stage1Only => self.units.len(),
            Method::MetaLoraTta => 1 + self.units.len(),
            Method::Base => return Err(Error::Internal("`base` reached the trainer".into())),
        };
        let mut steps_main = 0;
        for phase in meta.phase..n_phases {
            // Fresh (or, for tta phases, the shared result) adapter, optimizer and counters.
            let mut st = self.phase_start(method, phase)?;
            if let Some(ck) = resume_from.take() {
                let adam = st.opt.as_ref().map(|o| o.params);
                let (opt, m) = checkpoint::load(&ck, &st.adapter, adam, &self.model.device)?;
                st.opt = opt;
                st.start_step = m.step;
                meta = m;
                tracing::info!(phase, step = meta.step, "resuming from {}", ck.display());
            }
            meta.phase = phase;
            let steps = self.run_phase(method, phase, &mut st, &mut meta, &clock)?;
            steps_main = steps_main.max(steps);
            // Phase done: its adapter is final.
            let (dir, _) = self.phase_output(method, phase);
            st.adapter.save_peft(&self.out.join(dir))?;
            meta.phase = phase + 1;
            meta.step = 0;
            meta.adam_t = 0;
            if phase + 1 < n_phases {
                let next = self.phase_start(method, phase + 1)?;
                meta.elapsed = clock.total();
                checkpoint::save(self.out, &next.adapter, next.opt.as_ref(), &meta)?;
            }
        }
        let ck = checkpoint::dir(self.out);
        if ck.exists() {
            std::fs::remove_dir_all(&ck).map_err(|e| Error::io("remove", &ck, e))?;
        }
        Ok(Summary {
            steps: steps_main,
            seen: meta.seen,
            by_phase: meta.by_phase,
            dev_best: meta.dev_best,
            log: meta.log,
            elapsed: clock.total(),
        })
    }

    /// The folder a phase's adapter goes to, and the unit it belongs to.
    fn phase_output(&self, method: Method, phase: usize) -> (String, Option<usize>) {
        match method {
            Method::LoraPerTaskK | Method::Stage1Only => (
                format!("adapters/{}", self.units[phase].dir_name()),
                Some(phase),
            ),
            Method::MetaLoraTta if phase > 0 => (
                format!("adapters/{}", self.units[phase - 1].dir_name()),
                Some(phase - 1),
            ),
            _ => ("adapter".into(), None),
        }
    }

    fn phase_start(&self, method: Method, phase: usize) -> Result<PhaseState> {
        let (dir, _) = self.phase_output(method, phase);
        let name = dir.rsplit('/').next().unwrap_or("adapter").to_string();
        let adapter = if method == Method::MetaLoraTta && phase > 0 {
            // The shared adapter of phase 0, as saved.
            let mut a = Adapter::load_peft(
                &self.out.join("adapter"),
                &name,
                &self.model.modules(),
                self.model.dtype,
                &self.model.device,
            )?;
            a.config.base_model_name_or_path = Some(self.cfg.model.clone());
            a
        } else {
            init_adapter(self.model, self.cfg, &name)?
        };
        let opt = match method {
            Method::Stage1Only => None,
            Method::MetaLoraTta if phase > 0 => None,
            _ => Some(AdamW::new(&adapter.vars(), adam_params(self.cfg))?),
        };
        Ok(PhaseState {
            start_step: 0,
            adapter,
            opt,
        })
    }

    /// Runs phase `phase` of `method` from `st` (its start step, adapter and optimizer),
    /// adding its log rows and counts to `meta`; returns the steps it ran.
    fn run_phase(
        &mut self,
        method: Method,
        phase: usize,
        st: &mut PhaseState,
        meta: &mut Meta,
        clock: &Clock,
    ) -> Result<usize> {
        let cfg = self.cfg;
        let (_, unit) = self.phase_output(method, phase);
        let adapting =
            matches!(method, Method::Stage1Only) || (method == Method::MetaLoraTta && phase > 0);
        if adapting {
            let u = unit.expect("adaptation phases belong to a unit");
            return self.adapt_phase(u, st, meta);
        }
        let is_meta = method.is_meta();
        let (plan, total) = if is_meta {
            (vec![], meta_iterations(cfg, self.units))
        } else {
            let us: Vec<usize> = match unit {
                Some(u) => vec![u],
                None => (0..self.units.len()).collect(),
            };
            let scope = unit.map(|u| self.units[u].name.clone()).unwrap_or_default();
            let p = plan_batches(self.units, &us, cfg, &scope);
            let n = p.len();
            (p, n)
        };
        let phase_name = match (is_meta, unit) {
            (true, _) => "meta".to_string(),
            (false, Some(u)) => self.units[u].name.clone(),
            (false, None) => "lora".to_string(),
        };
        let run = PhaseRun {
            unit,
            is_meta,
            plan,
            total,
            name: phase_name,
            vars: st.adapter.vars(),
        };
        let ran = self.phase_steps(&run, st, meta, clock)?;
        if cfg.eval_every > 0 && !is_meta && unit.is_none() {
            self.keep_best(st)?;
        }
        Ok(ran)
    }

    /// The steps of a training phase from `st.start_step`: a gradient, an optimizer step, the
    /// log row and progress, early stopping on dev and checkpoints. Returns the steps run.
    fn phase_steps(
        &mut self,
        run: &PhaseRun,
        st: &mut PhaseState,
        meta: &mut Meta,
        clock: &Clock,
    ) -> Result<usize> {
        let total = run.total;
        // Checkpoints every `checkpoint_every` steps and at least every CHECKPOINT_SECS, so a
        // killed run (not only a stopped one) loses little, also when steps are long (a
        // meta-iteration on a CPU takes minutes).
        let mut last_checkpoint = Instant::now();
        for step in st.start_step..total {
            let t0 = Instant::now();
            let g = if run.is_meta {
                self.meta_step(st, meta, step)?
            } else {
                self.lora_step(run, st, meta, step)?
            };
            self.update(run, st, meta, step, g, t0)?;
            let done = step + 1;
            let stop_early = self.dev_step(st, meta, done, total)?;
            let interrupted = self.stop.load(Ordering::SeqCst);
            let periodic = (self.cfg.checkpoint_every > 0 && done % self.cfg.checkpoint_every == 0)
                || last_checkpoint.elapsed().as_secs() >= CHECKPOINT_SECS;
            if done < total && (interrupted || periodic) {
                last_checkpoint = Instant::now();
                self.checkpoint(st, meta, done, clock)?;
                if interrupted {
                    return Err(Error::Interrupted {
                        step: done,
                        path: checkpoint::dir(self.out),
                    });
                }
            }
            if stop_early {
                tracing::info!(
                    step = done,
                    best = ?meta.dev_best,
                    "early stop: {} dev evaluations without a better score",
                    meta.since_best
                );
                return Ok(done);
            }
        }
        Ok(total)
    }

    /// The gradient of meta-iteration `step` (its meta-batch's query gradient), with the
    /// batch's counts added to `meta`.
    fn meta_step(&self, st: &PhaseState, meta: &mut Meta, step: usize) -> Result<StepGrad> {
        let tasks = meta_batch(self.units, self.cfg, step)?;
        let mg = meta_gradient(self.model, &st.adapter, &tasks, self.units, self.cfg, step)?;
        for (u, seen) in &mg.counts {
            add_seen(meta, "main", &self.units[*u].name, seen);
        }
        let tokens: u64 = mg.counts.iter().map(|c| c.1.tokens).sum();
        Ok(StepGrad {
            grads: mg.grads,
            loss: mg.query_loss,
            tokens,
            rows: mg.rows,
        })
    }

    /// The gradient of step `step` of the shared LoRA loop on its planned batch, with the
    /// batch's examples added to `meta`.
    fn lora_step(
        &self,
        run: &PhaseRun,
        st: &PhaseState,
        meta: &mut Meta,
        step: usize,
    ) -> Result<StepGrad> {
        let cfg = self.cfg;
        let items = run.plan.get(step).expect("the plan has a batch per step");
        let seqs = sorted_by_len(items.iter().map(|&(u, i)| &self.units[u].seqs[i]).collect());
        let g = grads(
            self.model,
            &st.adapter,
            &seqs,
            StepOptions::of(
                cfg,
                derive_seed(cfg.seed, &["lora", &run.name, &step.to_string()]),
            ),
        )?;
        check_finite(&g, step, &run.name, "train")?;
        for &(u, i) in items {
            let s = &self.units[u].seqs[i];
            add_seen(
                meta,
                "main",
                &self.units[u].name,
                &Seen {
                    examples: 1,
                    tokens: s.ids.len() as u64,
                    answer_tokens: s.answer_tokens() as u64,
                    sequences: 1,
                },
            );
        }
        Ok(StepGrad {
            grads: g.grads,
            loss: g.loss,
            tokens: g.input_tokens as u64,
            rows: vec![],
        })
    }

    /// Clips `g`, takes the optimizer step of `step`, logs it (after the gradient's own rows)
    /// and reports progress.
    fn update(
        &mut self,
        run: &PhaseRun,
        st: &mut PhaseState,
        meta: &mut Meta,
        step: usize,
        mut g: StepGrad,
        t0: Instant,
    ) -> Result<()> {
        let cfg = self.cfg;
        let stage = if run.is_meta { "outer" } else { "train" };
        let norm = clip(&mut g.grads, cfg.clip)?;
        if !norm.is_finite() {
            return Err(Error::NonFinite {
                what: "the gradient norm",
                value: norm,
                step,
                unit: run.name.clone(),
                stage: stage.into(),
            });
        }
        let lr = lr_at(step, run.total, cfg.warmup, cfg.lr);
        let before = copy_adapter(&st.adapter)?;
        st.opt
            .as_mut()
            .expect("training phases have an optimizer")
            .step(&run.vars, &g.grads, lr)?;
        let update = distance(&st.adapter, &before)?;
        let secs = t0.elapsed().as_secs_f64();
        meta.log.extend(g.rows);
        meta.log.push(LogRow {
            step: step as u64,
            task: match run.unit {
                Some(u) => self.units[u].name.clone(),
                None => String::new(),
            },
            stage: stage.into(),
            inner: 0,
            loss: g.loss,
            lr: Some(lr),
            grad_norm: Some(norm),
            tokens: g.tokens,
            seconds: secs,
            norm: Some(update),
            dev: None,
        });
        (self.progress)(&Progress {
            phase: run.name.clone(),
            step: step + 1,
            total: run.total,
            loss: g.loss,
            tokens_per_s: g.tokens as f64 / secs.max(1e-9),
        });
        Ok(())
    }

    /// Saves the checkpoint after step `done` (adapter, optimizer moments, counts and log).
    fn checkpoint(
        &self,
        st: &PhaseState,
        meta: &mut Meta,
        done: usize,
        clock: &Clock,
    ) -> Result<()> {
        meta.step = done;
        meta.adam_t = st.opt.as_ref().map(|o| o.t).unwrap_or(0);
        meta.elapsed = clock.total();
        checkpoint::save(self.out, &st.adapter, st.opt.as_ref(), meta)?;
        super::run::write_log(self.out, &meta.log)
    }

    /// With early stopping, the run's result is its best dev checkpoint: loads it into `st`.
    fn keep_best(&self, st: &mut PhaseState) -> Result<()> {
        let best = best_dir(self.out);
        if best.join("adapter_config.json").exists() {
            let mut a = Adapter::load_peft(
                &best,
                &st.adapter.name,
                &self.model.modules(),
                self.model.dtype,
                &self.model.device,
            )?;
            a.config = st.adapter.config.clone();
            st.adapter = a;
        }
        Ok(())
    }

    /// An adaptation phase (stage1-only, the tta phases): `inner_steps` stage-1 steps on all
    /// of unit `u`'s sequences from `st`'s adapter, which the adapted one replaces.
    fn adapt_phase(&mut self, u: usize, st: &mut PhaseState, meta: &mut Meta) -> Result<usize> {
        let cfg = self.cfg;
        let name = self.units[u].name.clone();
        let seqs = sorted_by_len(self.units[u].seqs.iter().collect());
        let mut rows = Vec::new();
        let mut seen = Seen::default();
        let adapted = adapt(
            self.model,
            &st.adapter,
            &seqs,
            cfg.inner_steps,
            cfg,
            &["adapt", &name],
            |j, g, secs| {
                check_finite(g, j, &name, "adapt")?;
                if j == 0 {
                    seen.examples += seqs.len() as u64;
                }
                seen.sequences += seqs.len() as u64;
                seen.tokens += g.input_tokens as u64;
                seen.answer_tokens += g.tokens as u64;
                rows.push(LogRow {
                    step: j as u64,
                    task: name.clone(),
                    stage: "adapt".into(),
                    inner: j as u32,
                    loss: g.loss,
                    lr: Some(cfg.inner_lr),
                    tokens: g.input_tokens as u64,
                    seconds: secs,
                    ..Default::default()
                });
                (self.progress)(&Progress {
                    phase: format!("adapt {name}"),
                    step: j + 1,
                    total: cfg.inner_steps,
                    loss: g.loss,
                    tokens_per_s: g.input_tokens as f64 / secs.max(1e-9),
                });
                Ok(())
            },
        )?;
        let mut adapted = adapted;
        adapted.name = st.adapter.name.clone();
        if let Some(last) = rows.last_mut() {
            last.norm = Some(distance(&adapted, &st.adapter)?);
        }
        st.adapter = adapted;
        add_seen(meta, "adapt", &name, &seen);
        meta.log.extend(rows);
        Ok(cfg.inner_steps)
    }

    /// After step `done` of a shared LoRA phase with `eval_every > 0`: scores the adapter on
    /// dev every `eval_every` steps and at the end, keeps the best one in `best/`, and says
    /// whether `patience` evaluations have passed without a better score.
    fn dev_step(
        &mut self,
        st: &PhaseState,
        meta: &mut Meta,
        done: usize,
        total: usize,
    ) -> Result<bool> {
        let every = self.cfg.eval_every;
        let Some(dev) = self.dev.as_mut() else {
            return Ok(false);
        };
        if every == 0 || (done % every != 0 && done != total) {
            return Ok(false);
        }
        let t0 = Instant::now();
        let score = dev(&st.adapter)?;
        meta.log.push(LogRow {
            step: done as u64,
            stage: "dev".into(),
            seconds: t0.elapsed().as_secs_f64(),
            dev: Some(score),
            loss: f64::NAN,
            ..Default::default()
        });
        // Ties keep the earlier (shorter) checkpoint.
        if meta.dev_best.is_none_or(|(_, b)| score > b) {
            meta.dev_best = Some((done as u64, score));
            meta.since_best = 0;
            st.adapter.save_peft(&best_dir(self.out))?;
        } else {
            meta.since_best += 1;
        }
        Ok(meta.since_best >= self.cfg.patience as u64)
    }
}

/// Where the best dev checkpoint of a run with early stopping is kept.
pub fn best_dir(out: &Path) -> std::path::PathBuf {
    out.join("best")
}

/// The longest stretch of training between two checkpoints, seconds.
const CHECKPOINT_SECS: u64 = 600;

/// Adds `s` to the counts of `unit` and of the phase kind (`main` or `adapt`).
fn add_seen(meta: &mut Meta, kind: &str, unit: &str, s: &Seen) {
    meta.seen.entry(unit.to_string()).or_default().add(s);
    meta.by_phase.entry(kind.to_string()).or_default().add(s);
}
