//! A recipe's training run: the recipe's tables as burn-moe's [`LmTrainer`] (whose
//! [`fit`](LmTrainer::fit) is the loop: micro-batches with gradient accumulation through the
//! pipeline schedule, the distributed AdamW with warm-up + cosine decay and clipping, atomic
//! checkpoints with exact resume), with the checks before a run, the run folder, JSONL
//! metrics, a progress bar, tracing logs, signals, `summary.json` and the plots.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use burn_moe::lm::{
    CheckpointPolicy, FitEnd, FitObserver, FitOptions, LmTrainer, LmTrainingConfig, StepRecord,
};
use burn_parallel::lr_schedule::LrSchedule;
use burn_parallel::prelude::{AdamWConfig, Mesh, MoeDims, ParallelDims, ProcessGroups, World};
use serde::Serialize;

use crate::checkpoint::{self, Meta};
use crate::error::{RecipeError, Result, bad};
use crate::recipe::Recipe;
use crate::rundir::{MetricsLog, RunLock, refuse_existing};

/// How to run a recipe.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Continue from the newest checkpoint of the run directory.
    pub resume: bool,
    /// The device (autodiff is turned on here).
    pub device: Device,
    /// Draw the progress bar (rank 0 only, and only on a terminal).
    pub progress: bool,
    /// Stop after this step with a checkpoint (Megatron's `--exit-interval`); `--resume`
    /// continues the same schedule.
    pub stop_at: Option<usize>,
    /// SIGINT / SIGTERM: stop after the step in progress, with a checkpoint (every rank at the
    /// same step).
    pub interrupts: Option<crate::interrupt::Interrupts>,
}

/// What a finished run reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// Mean training loss (cross-entropy) over the last ten steps.
    pub final_loss: f64,
    /// Loss of every step run in this invocation.
    pub losses: Vec<f64>,
    /// The source's entropy rate in nats per token, when known.
    pub entropy_floor: Option<f64>,
    /// Steps completed (including those before a resume).
    pub steps: usize,
    /// The run directory.
    pub run_dir: PathBuf,
    /// The most training memory a step of this invocation held: the weights and optimizer
    /// state, plus the step's peak of heap bytes above what was live when it began
    /// (gradients, activations, transient buffers). Memory the process holds for other
    /// reasons (the data source, the matmul library's per-thread scratch) is not counted.
    /// `None` unless the binary counts its allocations ([`crate::memory`]). The largest of
    /// any rank's.
    pub peak_memory_bytes: Option<u64>,
    /// The most heap memory building the model took on a rank, above what was live before
    /// (the rank's weights and every transient buffer of their initialisation), the largest of
    /// any rank's. `None` unless the binary counts its allocations.
    pub build_peak_memory_bytes: Option<u64>,
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize)]
struct StepMetrics {
    step: usize,
    loss: f64,
    aux_loss: f64,
    z_loss: f64,
    lr: f64,
    grad_norm: f64,
    tokens_per_s: f64,
    tflops: f64,
    mfu: f64,
    /// Training memory of this step (see [`Summary::peak_memory_bytes`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    peak_memory_bytes: Option<u64>,
    expert_load: Vec<Vec<f64>>,
    seconds: f64,
}

pub use crate::model::{parameter_count, training_state_bytes};

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// burn-parallel's memory check ([`burn_parallel::memory::require`]) with `advice` after
/// its message.
fn require(need: u64, what: impl FnOnce() -> String, advice: &str) -> Result<()> {
    burn_parallel::memory::require(need, what)
        .map_err(|e| RecipeError::Refused(format!("{e}; {advice}")))
}

/// Refuses a recipe whose parameters, gradients and optimizer state cannot fit in this
/// machine's available memory, saying how much it needs.
pub fn check_memory(recipe: &Recipe, world: usize) -> Result<()> {
    let total_bytes = training_state_bytes(&recipe.model);
    let what = || {
        let (total, active) = parameter_count(&recipe.model);
        let layout = match recipe.parallel.gpus {
            Some(g) => format!(
                "; {:.1} GiB per GPU over the recipe's {g} GPUs, before activations",
                gib(total_bytes / g as u64)
            ),
            None => String::new(),
        };
        format!(
            "this recipe's parameters, gradients and AdamW state on {world} rank(s) ({:.1} GiB in \
             all for {:.1} B parameters, {:.1} B active per token; f32 weights and gradients, \
             f32 master weights and two moments{layout})",
            gib(total_bytes),
            total as f64 / 1e9,
            active as f64 / 1e9,
        )
    };
    require(
        total_bytes / world as u64,
        what,
        "run it on a GPU cluster with its [parallel] layout",
    )
}

/// Refuses a run whose training step cannot fit in this machine's available memory, before
/// anything is allocated: the planner's eager-kernel estimate of a rank's peak (weights,
/// gradients, optimizer state, activations, dispatcher buffers; the model this project's CPU
/// trainer follows within ~20%) times the ranks on this host, against `MemAvailable`.
pub fn check_step_memory(recipe: &Recipe, world: usize) -> Result<()> {
    if burn_parallel::memory::available().is_none() {
        return Ok(());
    }
    let (mut problem, layout) = crate::plan::Problem::from_recipe(recipe)?;
    problem.cluster = crate::plan::ClusterConfig {
        gpus: world,
        gpus_per_node: world,
        kernels: crate::plan::Kernels::Eager,
        ..problem.cluster
    };
    let Ok(estimate) = problem.estimate(&layout) else {
        // Layouts the planner cannot price were refused by the recipe checks already.
        return Ok(());
    };
    let need = estimate.memory_per_gpu_bytes.saturating_mul(world as u64);
    let m = &estimate.memory;
    let what = || {
        format!(
            "a training step ({world} rank(s) × {:.2} GiB: weights {:.2}, gradients {:.2}, \
             optimizer {:.2}, activations {:.2}, dispatcher {:.2}; the planner's estimate for \
             eager kernels)",
            gib(estimate.memory_per_gpu_bytes),
            gib(m.weights),
            gib(m.gradients),
            gib(m.optimizer),
            gib(m.activations),
            gib(m.dispatcher),
        )
    };
    require(need, what, "lower data.seq_len or training.micro_batch")
}

/// Refuses a `layer` run whose buffers cannot fit in this machine's available memory: f32
/// weights (with gradients and their accumulation), and per token the input, router scores and
/// map, `k` dispatched rows with their SwiGLU intermediates (`2F + F` each) and their output,
/// forward and backward (×3: values, gradients, saved inputs).
pub fn check_layer_memory(
    (tokens, hidden, ffn): (usize, usize, usize),
    (experts, topk): (usize, usize),
) -> Result<()> {
    let f = |v: usize| v as f64;
    let weights = f(experts) * f(hidden) * f(3 * ffn) * 4.0 * 3.0;
    let per_token = f(hidden) * 3.0 + f(experts) * 3.0 + f(topk) * (f(hidden) * 2.0 + f(ffn) * 3.0);
    let need = weights + f(tokens) * per_token * 4.0 * 3.0;
    let what = || {
        format!(
            "this layer (weights and gradients {:.2} GiB, buffers of {tokens} tokens {:.1} GiB)",
            weights / (1u64 << 30) as f64,
            (need - weights) / (1u64 << 30) as f64,
        )
    };
    require(need as u64, what, "lower --tokens")
}

/// The library's training configuration of a recipe's `[training]`, `[data]` and `[run]`
/// tables.
pub fn training_config(recipe: &Recipe) -> LmTrainingConfig {
    let t = &recipe.training;
    LmTrainingConfig {
        seq_len: recipe.data.seq_len,
        micro_batch: t.micro_batch,
        global_batch: t.global_batch,
        adamw: AdamWConfig {
            lr: t.lr,
            beta1: t.beta1,
            beta2: t.beta2,
            eps: t.eps,
            weight_decay: t.weight_decay,
            max_grad_norm: t.grad_clip,
        },
        lr_schedule: LrSchedule {
            lr: t.lr,
            min_lr: t.min_lr,
            warmup_steps: t.warmup_steps,
            steps: t.steps,
        },
        seed: recipe.run.seed,
        precision: recipe.training.precision.into(),
    }
}

/// The library trainer of this rank in `groups` (built from the recipe's `[parallel]`
/// layout) on `device` (with autodiff): the recipe's model, layout, training configuration
/// and data source.
pub fn trainer(recipe: &Recipe, groups: ProcessGroups, device: &Device) -> Result<LmTrainer> {
    let m = &recipe.model;
    let source = crate::data::token_source(&recipe.data, m.vocab, recipe.run.seed)?;
    let layout = crate::model::stage_layout(recipe)?;
    LmTrainer::new(
        &m.lm_config(),
        &layout,
        &training_config(recipe),
        source,
        groups,
        device,
    )
    .map_err(|e| m.key_of(e))
}

/// What the command line does after every step: `metrics.jsonl` (rank 0, every `log_every`
/// steps and the last), the tracing log, the progress bar, and the signals it relays to the
/// trainer.
struct Observer<'a> {
    metrics: Option<MetricsLog>,
    log_every: usize,
    flops_per_token: f64,
    peak_tflops: f64,
    ranks: usize,
    bar: Option<indicatif::ProgressBar>,
    interrupts: Option<&'a crate::interrupt::Interrupts>,
}

impl FitObserver for Observer<'_> {
    type Error = RecipeError;

    fn on_step(&mut self, r: &StepRecord) -> Result<()> {
        let tokens_per_s = r.tokens as f64 / r.seconds;
        let tflops = tokens_per_s * self.flops_per_token / 1e12;
        if let Some(file) = self.metrics.as_mut()
            && (r.step.is_multiple_of(self.log_every) || r.last)
        {
            file.write(&StepMetrics {
                step: r.step,
                loss: r.loss,
                aux_loss: r.aux,
                z_loss: r.z,
                lr: r.lr,
                grad_norm: r.grad_norm,
                tokens_per_s,
                tflops,
                mfu: tflops / (self.peak_tflops * self.ranks as f64),
                peak_memory_bytes: r.peak_memory_bytes,
                expert_load: r.expert_load.clone(),
                seconds: r.seconds,
            })?;
        }
        tracing::info!(
            step = r.step,
            loss = r.loss,
            grad_norm = r.grad_norm,
            tokens_per_s,
            "step"
        );
        if let Some(bar) = &self.bar {
            bar.set_position(r.step as u64);
            bar.set_message(format!("loss {:.4}  {tokens_per_s:.0} tok/s", r.loss));
        }
        Ok(())
    }

    fn stop_request(&mut self) -> Option<i32> {
        self.interrupts
            .and_then(crate::interrupt::Interrupts::received)
    }
}

fn progress_bar(steps: usize, start: usize) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps [{elapsed_precise} < {eta_precise}] {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_position(start as u64);
    bar
}

/// The newest checkpoint to resume from (`--resume`), checked against the recipe and the
/// world, or `None` for a fresh run (refused when the folder already holds one).
fn resume_point(
    recipe: &Recipe,
    options: &TrainOptions,
    world: usize,
) -> Result<Option<(PathBuf, Meta)>> {
    let run_dir = &recipe.run.dir;
    if !options.resume {
        refuse_existing(
            run_dir,
            "continue it with --resume or choose another run.dir",
        )?;
        return Ok(None);
    }
    let Some((dir, meta)) = checkpoint::latest(run_dir)? else {
        return Err(bad(
            "--resume",
            format!("{} has no checkpoint", run_dir.display()),
        ));
    };
    // A checkpoint that recorded its layout resumes under any layout (resharded); an older
    // one only under its own.
    if meta.layout.is_none() && meta.world != world {
        return Err(bad(
            "--resume",
            format!(
                "the checkpoint was written by {} ranks before checkpoints recorded their \
                 layout; this run has {world}",
                meta.world
            ),
        ));
    }
    if recipe.training.steps <= meta.step {
        return Err(bad(
            "training.steps",
            format!(
                "is {} but the checkpoint is at step {}: nothing to train; raise \
                 training.steps to go on",
                recipe.training.steps, meta.step
            ),
        ));
    }
    check_resumable(recipe, run_dir, meta.layout.is_some())?;
    Ok(Some((dir, meta)))
}

/// Refuses a `--stop-at` outside the steps this invocation runs.
fn check_stop_at(recipe: &Recipe, stop_at: Option<usize>, start: usize) -> Result<()> {
    match stop_at {
        Some(stop) if stop <= start || stop > recipe.training.steps => Err(bad(
            "--stop-at",
            format!(
                "is {stop}; it must be after the first step to run ({}) and at most \
                 training.steps ({})",
                start + 1,
                recipe.training.steps
            ),
        )),
        _ => Ok(()),
    }
}

/// Takes the run folder (rank 0): its lock, the recipe's copy and `metrics.jsonl` continued
/// from `start` (metrics after the checkpoint's step were never part of the run; a fresh
/// start begins a new file).
fn open_run_dir(recipe: &Recipe, start: usize) -> Result<(RunLock, MetricsLog)> {
    let run_dir = &recipe.run.dir;
    let lock = crate::rundir::lock(run_dir)?;
    std::fs::create_dir_all(run_dir).map_err(|e| RecipeError::io(run_dir, e))?;
    let copy = run_dir.join("recipe.toml");
    let text = toml::to_string_pretty(recipe).map_err(|e| RecipeError::io(&copy, e))?;
    std::fs::write(&copy, text).map_err(|e| RecipeError::io(&copy, e))?;
    let metrics = MetricsLog::resume(&run_dir.join("metrics.jsonl"), start)?;
    Ok((lock, metrics))
}

/// Refuses to resume with a recipe that changes what the run's checkpoint continues: the
/// model, the data stream (seed, source, sequence length, batch sizes) or the optimisation
/// (schedule, AdamW, clipping), against the run's own `recipe.toml`. `training.steps` (to go
/// on), logging and checkpointing cadence, the cluster and the planner's numbers may change,
/// and `[parallel]` too when the checkpoint recorded its layout (`resharded`: it is read
/// under the new one).
fn check_resumable(recipe: &Recipe, run_dir: &Path, resharded: bool) -> Result<()> {
    let stored_path = run_dir.join("recipe.toml");
    let stored = Recipe::load(&stored_path, &[]).map_err(|e| RecipeError::Invalid {
        key: "--resume".into(),
        reason: format!("the run's {} cannot be read: {e}", stored_path.display()),
    })?;
    let (a, b) = (&stored, recipe);
    let (ta, tb) = (&a.training, &b.training);
    let checks: [(&str, bool); 15] = [
        ("run.seed", a.run.seed == b.run.seed),
        ("model", a.model == b.model),
        ("data", a.data == b.data),
        ("parallel", resharded || a.parallel == b.parallel),
        ("training.micro_batch", ta.micro_batch == tb.micro_batch),
        ("training.global_batch", ta.global_batch == tb.global_batch),
        ("training.lr", ta.lr == tb.lr),
        ("training.min_lr", ta.min_lr == tb.min_lr),
        ("training.warmup_steps", ta.warmup_steps == tb.warmup_steps),
        ("training.beta1", ta.beta1 == tb.beta1),
        ("training.beta2", ta.beta2 == tb.beta2),
        ("training.eps", ta.eps == tb.eps),
        ("training.weight_decay", ta.weight_decay == tb.weight_decay),
        ("training.grad_clip", ta.grad_clip == tb.grad_clip),
        ("training.precision", ta.precision == tb.precision),
    ];
    if let Some((key, _)) = checks.iter().find(|(_, same)| !same) {
        return Err(RecipeError::Invalid {
            key: (*key).into(),
            reason: format!(
                "differs from the run's recipe ({}); resuming would not continue the same \
                 run; start a new run.dir for the changed recipe",
                stored_path.display()
            ),
        });
    }
    Ok(())
}

/// The largest of every rank's `bytes` (collective over `world`; each rank's count rounded up
/// to a KiB, exact in the f32 the reduction carries up to 16 GiB).
fn largest_of_ranks(world: &World, bytes: Option<u64>) -> Result<Option<u64>> {
    let Some(bytes) = bytes else {
        return Ok(None);
    };
    if world.size() == 1 {
        return Ok(Some(bytes));
    }
    let mut kib = [bytes.div_ceil(1024) as f32];
    world
        .communicator()
        .all_reduce(&mut kib, burn_parallel::comm::ReduceOp::Max)?;
    Ok(Some(kib[0] as u64 * 1024))
}

/// Runs (or resumes) a recipe on this process's share of `world`: the checks, the run folder,
/// burn-moe's [`LmTrainer::fit`] with this crate's metrics, log, progress bar and signals,
/// then `summary.json` and the plots.
pub fn train(recipe: &Recipe, options: &TrainOptions, world: &World) -> Result<Summary> {
    recipe.validate()?;
    let n = world.size();
    check_memory(recipe, n)?;
    let (dp, edp) = recipe.check_world(n)?;
    check_step_memory(recipe, n)?;
    let resume_from = resume_point(recipe, options, n)?;
    let start_step = resume_from.as_ref().map_or(0, |(_, m)| m.step);
    check_stop_at(recipe, options.stop_at, start_step)?;
    let p = &recipe.parallel;
    let mesh = Mesh::new(
        n,
        ParallelDims::new(p.tp, p.cp, dp, p.pp),
        MoeDims::new(p.etp, p.ep, edp),
    )?;
    let groups = ProcessGroups::new(mesh, world.communicator().clone())?;
    let mut device = options.device.clone().autodiff();
    if recipe.training.recompute {
        // Burn's balanced checkpointing: memory-bound activations are recomputed in the
        // backward pass instead of being kept.
        device = device.gradient_checkpointing();
    }
    let live = burn_parallel::memory::live();
    burn_parallel::memory::reset_peak();
    let mut trainer = trainer(recipe, groups, &device)?;
    let build_peak = live
        .zip(burn_parallel::memory::peak())
        .map(|(before, peak)| peak.saturating_sub(before) as u64);
    let build_peak = largest_of_ranks(world, build_peak)?;
    if let Some((dir, meta)) = &resume_from {
        trainer.resume(dir, meta)?;
    }
    // Everything is checked and the checkpoint loaded: now the run directory may be written,
    // by this process alone.
    let main = world.is_main();
    let (_lock, metrics) = match main {
        true => open_run_dir(recipe, start_step).map(|(l, m)| (Some(l), Some(m)))?,
        false => (None, None),
    };
    world.communicator().barrier()?;
    let (total, active) = parameter_count(&recipe.model);
    tracing::info!(
        world = n,
        tp = p.tp,
        cp = p.cp,
        pp = p.pp,
        virtual_pp = p.virtual_pp.unwrap_or(1),
        dp,
        ep = p.ep,
        etp = p.etp,
        edp,
        micro_batches = trainer.micro_batches(),
        pipeline_bubble = trainer.bubble_fraction(),
        parameters = total,
        active_parameters = active,
        start_step,
        "training"
    );
    let (t, m) = (&recipe.training, &recipe.model);
    let mut observer = Observer {
        metrics,
        log_every: t.log_every,
        flops_per_token: 6.0 * active as f64
            + 6.0 * (m.layers * recipe.data.seq_len * m.hidden) as f64,
        peak_tflops: recipe.run_peak_tflops(),
        ranks: n,
        bar: (main && options.progress).then(|| progress_bar(t.steps, start_step)),
        interrupts: options.interrupts.as_ref(),
    };
    let fit = FitOptions {
        start_step,
        stop_at: options.stop_at,
        checkpoints: Some(CheckpointPolicy {
            run_dir: recipe.run.dir.clone(),
            every: t.checkpoint_every,
            keep: t.keep_checkpoints,
        }),
    };
    let outcome = trainer.fit(&fit, &mut observer)?;
    if let Some(bar) = observer.bar.take() {
        bar.finish_and_clear();
    }
    if let FitEnd::Requested { request } = outcome.end {
        return Err(RecipeError::Interrupted {
            signal: request,
            signal_name: crate::interrupt::describe(request).0,
            step: outcome.step,
        });
    }
    let tail = &outcome.losses[outcome.losses.len().saturating_sub(10)..];
    let final_loss = if tail.is_empty() {
        f64::NAN
    } else {
        tail.iter().sum::<f64>() / tail.len() as f64
    };
    let peak_memory_bytes = largest_of_ranks(world, outcome.peak_memory_bytes)?;
    let summary = Summary {
        final_loss,
        losses: outcome.losses,
        entropy_floor: trainer.source().entropy_rate(),
        steps: t.steps,
        run_dir: recipe.run.dir.clone(),
        peak_memory_bytes,
        build_peak_memory_bytes: build_peak,
    };
    if main {
        let path = summary.run_dir.join("summary.json");
        let text = serde_json::to_string_pretty(&summary).map_err(|e| RecipeError::io(&path, e))?;
        std::fs::write(&path, text).map_err(|e| RecipeError::io(&path, e))?;
        crate::plot::plot(&summary.run_dir, summary.entropy_floor)?;
    }
    Ok(summary)
}
