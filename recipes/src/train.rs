//! The training loop: data-parallel micro-batches with gradient accumulation, the distributed
//! AdamW with warm-up + cosine decay and clipping, JSONL metrics, a progress bar, tracing logs
//! and atomic checkpoints with exact resume.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::{Module, ParamId};
use burn::tensor::{Device, Int, Tensor, TensorData};
use burn_parallel::comm::ReduceOp;
use burn_parallel::context::ContextLayout;
use burn_parallel::pipeline::run_stage;
use burn_parallel::prelude::{
    AdamWConfig, DistributedAdamW, GradientBuffer, GroupKind, Mesh, MoeDims, ParallelDims,
    ParamRole, ProcessGroups, StepStats, World,
};
use burn_parallel::schedule::{Schedule, ScheduleKind};
use serde::Serialize;

use crate::checkpoint::{self, Meta};
use crate::error::{RecipeError, Result};
use crate::recipe::{Precision, Recipe};
use crate::rundir::{MetricsLog, refuse_existing};
use burn_moe::lm::{MoeLm, TokenSource, sequence_index};
use burn_parallel::lr_schedule::LrSchedule;

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
    /// `None` unless the binary counts its allocations ([`crate::memory`]).
    pub peak_memory_bytes: Option<u64>,
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

/// Refuses a recipe whose parameters, gradients and optimizer state cannot fit in this
/// machine's available memory, saying how much it needs.
pub fn check_memory(recipe: &Recipe, world: usize) -> Result<()> {
    let total_bytes = training_state_bytes(&recipe.model);
    let need = total_bytes / world as u64;
    let Some(have) = burn_parallel::memory::available() else {
        return Ok(());
    };
    if need <= have {
        return Ok(());
    }
    let (total, active) = parameter_count(&recipe.model);
    let layout = match recipe.parallel.gpus {
        Some(g) => format!(
            " ({:.1} GiB per GPU over the recipe's {g} GPUs, before activations)",
            gib(total_bytes / g as u64)
        ),
        None => String::new(),
    };
    Err(RecipeError::Refused(format!(
        "this recipe needs {:.1} GiB for parameters, gradients and AdamW state ({:.1} B \
         parameters, {:.1} B active per token; f32 weights and gradients, f32 master weights \
         and two moments){layout}; this machine has {:.1} GiB available for {world} rank(s). \
         Run it on a GPU cluster with its [parallel] layout.",
        gib(total_bytes),
        total as f64 / 1e9,
        active as f64 / 1e9,
        gib(have)
    )))
}

/// Refuses a run whose training step cannot fit in this machine's available memory, before
/// anything is allocated: the planner's eager-kernel estimate of a rank's peak (weights,
/// gradients, optimizer state, activations, dispatcher buffers; the model this project's CPU
/// trainer follows within ~20%) times the ranks on this host, against `MemAvailable`.
pub fn check_step_memory(recipe: &Recipe, world: usize) -> Result<()> {
    let Some(have) = burn_parallel::memory::available() else {
        return Ok(());
    };
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
    if need <= have {
        return Ok(());
    }
    let m = &estimate.memory;
    Err(RecipeError::Refused(format!(
        "a training step needs about {:.1} GiB ({world} rank(s) × {:.2} GiB: weights {:.2}, \
         gradients {:.2}, optimizer {:.2}, activations {:.2}, dispatcher {:.2}; the planner's \
         estimate for eager kernels) and this machine has {:.1} GiB available; lower \
         data.seq_len or training.micro_batch",
        gib(need),
        gib(estimate.memory_per_gpu_bytes),
        gib(m.weights),
        gib(m.gradients),
        gib(m.optimizer),
        gib(m.activations),
        gib(m.dispatcher),
        gib(have)
    )))
}

/// Refuses a `layer` run whose buffers cannot fit in this machine's available memory: f32
/// weights (with gradients and their accumulation), and per token the input, router scores and
/// map, `k` dispatched rows with their SwiGLU intermediates (`2F + F` each) and their output,
/// forward and backward (×3: values, gradients, saved inputs).
pub fn check_layer_memory(
    (tokens, hidden, ffn): (usize, usize, usize),
    (experts, topk): (usize, usize),
) -> Result<()> {
    let Some(have) = burn_parallel::memory::available() else {
        return Ok(());
    };
    let f = |v: usize| v as f64;
    let weights = f(experts) * f(hidden) * f(3 * ffn) * 4.0 * 3.0;
    let per_token = f(hidden) * 3.0 + f(experts) * 3.0 + f(topk) * (f(hidden) * 2.0 + f(ffn) * 3.0);
    let need = weights + f(tokens) * per_token * 4.0 * 3.0;
    if need <= have as f64 {
        return Ok(());
    }
    Err(RecipeError::Refused(format!(
        "this layer needs about {:.1} GiB (weights and gradients {:.2}, buffers of {tokens} \
         tokens {:.1}) and this machine has {:.1} GiB available; lower --tokens",
        need / (1u64 << 30) as f64,
        weights / (1u64 << 30) as f64,
        (need - weights) / (1u64 << 30) as f64,
        gib(have)
    )))
}

/// Refuses layouts and settings this build cannot run, with the key that says so.
fn check_supported(recipe: &Recipe) -> Result<()> {
    if recipe.training.precision == Precision::Bf16 {
        return Err(RecipeError::Invalid {
            key: "training.precision".into(),
            reason: "bf16 training is not supported by this build's backends yet; use \"f32\""
                .into(),
        });
    }
    Ok(())
}

/// Learning rate of `step` (0-based): linear warm-up, then cosine decay to `min_lr`.
pub fn learning_rate(recipe: &Recipe, step: usize) -> f64 {
    let t = &recipe.training;
    LrSchedule {
        lr: t.lr,
        min_lr: t.min_lr,
        warmup_steps: t.warmup_steps,
        steps: t.steps,
    }
    .at(step)
}

fn value(t: Tensor<1>) -> Result<f64> {
    let v = t
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| RecipeError::Refused(format!("reading a loss: {e:?}")))?;
    Ok(f64::from(v.first().copied().unwrap_or(f32::NAN)))
}

/// One rank's share of a recipe's training: its model stage, the distributed optimizer, the
/// pipeline schedule and the data. [`train`] drives it; check programs drive it step by step.
pub struct Trainer {
    recipe: Recipe,
    groups: ProcessGroups,
    device: Device,
    model: Option<MoeLm>,
    opt: DistributedAdamW,
    schedule: Schedule,
    source: TokenSource,
    positions: Vec<usize>,
    roles: Vec<(ParamId, ParamRole)>,
    dp: usize,
    micro_batches: usize,
    moe_layers: usize,
}

/// A step's forward and backward passes on one rank, before the optimizer.
#[derive(Debug, Clone)]
pub struct Backward {
    /// This rank's parameter gradients summed over its micro-batches (not reduced over ranks).
    pub grads: GradientBuffer,
    /// This rank's cross-entropy (on the stage holding the head), aux and z losses, each the
    /// mean over micro-batches.
    pub ce: f64,
    /// See `ce`.
    pub aux: f64,
    /// See `ce`.
    pub z: f64,
    /// Tokens per expert of each MoE layer routed on this rank.
    pub load: Vec<Vec<f64>>,
}

/// What a step reports: the same on every rank.
#[derive(Debug, Clone, PartialEq)]
pub struct Reported {
    /// Cross-entropy averaged over the step's tokens.
    pub loss: f64,
    /// Load-balancing loss (summed over TP × CP, averaged over DP).
    pub aux: f64,
    /// z-loss.
    pub z: f64,
    /// Tokens per expert of each MoE layer, over every rank.
    pub expert_load: Vec<Vec<f64>>,
}

impl Trainer {
    /// The trainer of this rank in `groups` (built from the recipe's `[parallel]` layout) on
    /// `device` (with autodiff). The model starts from the recipe's seed.
    pub fn new(recipe: &Recipe, groups: ProcessGroups, device: &Device) -> Result<Self> {
        let p = &recipe.parallel;
        let t = &recipe.training;
        let layout = crate::model::stage_layout(recipe)?;
        let chunks = layout.split.chunks();
        let model =
            recipe
                .model
                .lm_config()
                .init_stage(recipe.run.seed, &groups, &layout, device)?;
        let adamw = AdamWConfig {
            lr: t.lr,
            beta1: t.beta1,
            beta2: t.beta2,
            eps: t.eps,
            weight_decay: t.weight_decay,
            max_grad_norm: t.grad_clip,
        };
        // Gradients are averaged over the data-parallel and context-parallel ranks (each
        // holds its own tokens of replicated parameters).
        let opt = DistributedAdamW::new(
            adamw,
            groups.group(GroupKind::DpCp).clone(),
            groups.group(GroupKind::Tp).clone(),
            groups.world().clone(),
        )?
        .with_expert_group(groups.group(GroupKind::ExpertDp).clone());
        let dp = groups.group(GroupKind::Dp).size();
        let micro_batches = t.global_batch / (t.micro_batch * dp);
        let kind = if chunks > 1 {
            ScheduleKind::Interleaved {
                virtual_stages: chunks,
                group: None,
            }
        } else {
            ScheduleKind::OneFOneB
        };
        let schedule =
            Schedule::new(kind, p.pp, micro_batches).map_err(|e| RecipeError::Invalid {
                key: "parallel.virtual_pp".into(),
                reason: e.to_string(),
            })?;
        let context = ContextLayout::new(recipe.data.seq_len, p.cp)?;
        let positions = context.positions(groups.group(GroupKind::Cp).rank());
        let m = &recipe.model;
        let moe_layers = (0..m.layers)
            .filter(|l| m.moe_every > 0 && (l + 1).is_multiple_of(m.moe_every))
            .count();
        // Parameter ids survive optimizer steps (new values, same parameters).
        let roles = model.roles();
        Ok(Self {
            source: crate::data::token_source(&recipe.data, m.vocab, recipe.run.seed)?,
            recipe: recipe.clone(),
            groups,
            device: device.clone(),
            model: Some(model),
            opt,
            schedule,
            positions,
            roles,
            dp,
            micro_batches,
            moe_layers,
        })
    }

    fn gone() -> RecipeError {
        RecipeError::Invalid {
            key: "model".into(),
            reason: "an earlier optimizer step failed and took the model with it".into(),
        }
    }

    /// This rank's model stage.
    pub fn model(&self) -> Result<&MoeLm> {
        self.model.as_ref().ok_or_else(Self::gone)
    }

    /// The process groups.
    pub fn groups(&self) -> &ProcessGroups {
        &self.groups
    }

    /// Each trained parameter's role.
    pub fn roles(&self) -> &[(ParamId, ParamRole)] {
        &self.roles
    }

    /// Micro-batches per step on each data-parallel rank.
    pub fn micro_batches(&self) -> usize {
        self.micro_batches
    }

    /// The pipeline schedule's bubble: `(p − 1) / (m + p − 1)` for 1F1B, with `p − 1` divided
    /// by the virtual stages when interleaved (0 without pipeline parallelism).
    pub fn bubble_fraction(&self) -> f64 {
        self.schedule.bubble_fraction()
    }

    /// The data source.
    pub fn source(&self) -> &TokenSource {
        &self.source
    }

    /// Bytes of the weights and optimizer state this rank holds (f32).
    pub fn resident_bytes(&self) -> u64 {
        let params = self.model.as_ref().map_or(0, Module::num_params);
        4 * (params + self.opt.state_len()) as u64
    }

    /// The sequence index after `step` steps (for checkpoints).
    pub fn next_sequence(&self, step: usize) -> u64 {
        let t = &self.recipe.training;
        sequence_index(step, 0, 0, 0, (t.micro_batch, self.micro_batches, self.dp))
    }

    /// Loads this rank's model and optimizer state from checkpoint folder `dir`.
    pub fn load(&mut self, dir: &Path) -> Result<()> {
        let model = self.model.take().ok_or_else(Self::gone)?;
        let rank = self.groups.world().rank();
        let (loaded, state) = checkpoint::load(dir, model, rank)?;
        self.model = Some(loaded);
        self.opt.load_state(state)?;
        Ok(())
    }

    /// Writes a checkpoint of every rank (collective over the world); returns its folder.
    pub fn save(&self, run_dir: &Path, meta: &Meta, keep: usize) -> Result<PathBuf> {
        let comm = self.groups.world().communicator()?;
        Ok(checkpoint::save(
            run_dir,
            meta,
            self.model()?,
            &self.opt.state(),
            comm.as_ref(),
            keep,
        )?)
    }

    /// Forward and backward passes of every micro-batch of `step` (0-based) on this rank,
    /// through the pipeline schedule. Collective over the model's groups.
    pub fn backward(&self, step: usize) -> Result<Backward> {
        let t = &self.recipe.training;
        let p = &self.recipe.parallel;
        let model = self.model()?;
        let seq = self.recipe.data.seq_len;
        let (micro_batches, dp) = (self.micro_batches, self.dp);
        let dp_rank = self.groups.group(GroupKind::Dp).rank();
        let (mut ce, mut aux, mut z) = (0.0, 0.0, 0.0);
        let experts = self.recipe.model.experts;
        let mut load = vec![vec![0.0; experts]; self.moe_layers];
        let scale = 1.0 / micro_batches as f64;
        // The global aux loss's counts, accumulated over this step's micro-batches.
        let mut global = vec![None; self.moe_layers];
        let shape = [seq / p.cp / p.tp, t.micro_batch, self.recipe.model.hidden];
        let device = &self.device;
        let mut run = run_stage(
            &self.schedule,
            self.groups.group(GroupKind::Pp),
            model,
            shape,
            device,
            |chunk, micro, input| {
                // Sequence-first [S, B] ids of this rank's tokens (its CP chunks) and their
                // next-token targets.
                let columns: Vec<Vec<i64>> = (0..t.micro_batch)
                    .map(|i| {
                        let index = sequence_index(
                            step,
                            micro,
                            dp_rank,
                            i,
                            (t.micro_batch, micro_batches, dp),
                        );
                        self.source.sequence(index, seq)
                    })
                    .collect();
                let (mut ids, mut next) = (Vec::new(), Vec::new());
                for &pos in &self.positions {
                    for col in &columns {
                        ids.push(col[pos]);
                        next.push(col[pos + 1]);
                    }
                }
                let local = [self.positions.len(), t.micro_batch];
                let inputs = Tensor::<2, Int>::from_data(TensorData::new(ids, local), device);
                let targets = Tensor::<2, Int>::from_data(TensorData::new(next, local), device);
                let out = model.forward_chunk_with(chunk, input, (&inputs, &targets), &global)?;
                for (index, state) in &out.global_aux {
                    if let Some(slot) = global.get_mut(*index) {
                        *slot = Some(state.clone());
                    }
                }
                if let Some(v) = out.ce.clone() {
                    ce += value(v)? * scale;
                }
                if let Some(v) = out.aux.clone() {
                    aux += value(v)? * scale;
                }
                if let Some(v) = out.z.clone() {
                    z += value(v)? * scale;
                }
                for (layer, counts) in &out.expert_load {
                    let c = counts
                        .clone()
                        .into_data()
                        .convert::<i64>()
                        .try_into_vec::<i64>()
                        .unwrap_or_default();
                    if let Some(slot) = load.get_mut(*layer) {
                        slot.iter_mut().zip(&c).for_each(|(a, b)| *a += *b as f64);
                    }
                }
                Ok::<_, RecipeError>(model.stage_output(&out, scale))
            },
        )?;
        model.tie_gradients(&mut run.grads, self.groups.group(GroupKind::Pp))?;
        Ok(Backward {
            grads: run.grads,
            ce,
            aux,
            z,
            load,
        })
    }

    /// The step's reported values from every rank's [`Backward`]: cross-entropy (on the last
    /// pipeline stage) averaged over DP × CP; aux and z summed over the pipeline's stages and
    /// over TP × CP (each rank routes its own tokens), averaged over DP; expert load summed
    /// over every rank. Collective over the world.
    pub fn report(&self, b: &Backward) -> Result<Reported> {
        let g = &self.groups;
        let mut reported = [b.ce as f32, b.aux as f32, b.z as f32];
        g.group(GroupKind::Pp)
            .communicator()?
            .all_reduce(&mut reported, ReduceOp::Sum)?;
        g.group(GroupKind::TpCp)
            .communicator()?
            .all_reduce(&mut reported[1..], ReduceOp::Sum)?;
        g.group(GroupKind::DpCp)
            .communicator()?
            .all_reduce(&mut reported, ReduceOp::Avg)?;
        let mut flat: Vec<f32> = b.load.iter().flatten().map(|&v| v as f32).collect();
        g.world()
            .communicator()?
            .all_reduce(&mut flat, ReduceOp::Sum)?;
        let experts = self.recipe.model.experts.max(1);
        Ok(Reported {
            loss: f64::from(reported[0]),
            aux: f64::from(reported[1]),
            z: f64::from(reported[2]),
            expert_load: flat
                .chunks(experts)
                .map(|row| row.iter().map(|&v| f64::from(v)).collect())
                .collect(),
        })
    }

    /// The optimizer step of `step` (0-based; sets its learning rate) with the gradients of
    /// [`backward`](Self::backward), then the expert-bias update of routers that have one
    /// (with this rank's tokens per expert of the step). Collective over the world.
    pub fn apply(&mut self, backward: Backward, step: usize) -> Result<StepStats> {
        self.opt.set_lr(learning_rate(&self.recipe, step));
        let model = self.model.take().ok_or_else(Self::gone)?;
        let (mut next, stats) = self.opt.step_buffered(model, backward.grads, &self.roles)?;
        next.update_expert_biases(&backward.load)?;
        self.model = Some(next);
        Ok(stats)
    }
}

/// Refuses to resume with a recipe that changes what the run's checkpoint continues: the
/// model, the data stream (seed, source, sequence length, batch sizes) or the optimisation
/// (schedule, AdamW, clipping), against the run's own `recipe.toml`. `training.steps` (to go
/// on), logging and checkpointing cadence, the cluster and the planner's numbers may change.
fn check_resumable(recipe: &Recipe, run_dir: &Path) -> Result<()> {
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
        ("parallel", a.parallel == b.parallel),
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

/// Runs (or resumes) a recipe on this process's share of `world`.
pub fn train(recipe: &Recipe, options: &TrainOptions, world: &World) -> Result<Summary> {
    recipe.validate()?;
    let n = world.size();
    check_memory(recipe, n)?;
    check_supported(recipe)?;
    let (dp, edp) = recipe.check_world(n)?;
    check_step_memory(recipe, n)?;
    let comm = world.communicator();
    let main = world.is_main();
    let run_dir = recipe.run.dir.clone();
    let resume_from = if options.resume {
        let found = checkpoint::latest(&run_dir)?;
        if found.is_none() {
            return Err(RecipeError::Invalid {
                key: "--resume".into(),
                reason: format!("{} has no checkpoint", run_dir.display()),
            });
        }
        found
    } else {
        refuse_existing(
            &run_dir,
            "continue it with --resume or choose another run.dir",
        )?;
        None
    };
    if let Some((_, meta)) = &resume_from
        && meta.world != n
    {
        return Err(RecipeError::Invalid {
            key: "--resume".into(),
            reason: format!(
                "the checkpoint was written by {} ranks, this run has {n}",
                meta.world
            ),
        });
    }
    let start_step = resume_from.as_ref().map_or(0, |(_, m)| m.step);
    if let Some((_, meta)) = &resume_from {
        if recipe.training.steps <= meta.step {
            return Err(RecipeError::Invalid {
                key: "training.steps".into(),
                reason: format!(
                    "is {} but the checkpoint is at step {}: nothing to train; raise \
                     training.steps to go on",
                    recipe.training.steps, meta.step
                ),
            });
        }
        check_resumable(recipe, &run_dir)?;
    }
    if let Some(stop) = options.stop_at
        && (stop <= start_step || stop > recipe.training.steps)
    {
        return Err(RecipeError::Invalid {
            key: "--stop-at".into(),
            reason: format!(
                "is {stop}; it must be after the first step to run ({}) and at most \
                 training.steps ({})",
                start_step + 1,
                recipe.training.steps
            ),
        });
    }
    let p = &recipe.parallel;
    let mesh = Mesh::new(
        n,
        ParallelDims::new(p.tp, p.cp, dp, p.pp),
        MoeDims::new(p.etp, p.ep, edp),
    )?;
    let groups = ProcessGroups::new(mesh, comm.clone())?;
    let mut device = options.device.clone().autodiff();
    if recipe.training.recompute {
        // Burn's balanced checkpointing: memory-bound activations are recomputed in the
        // backward pass instead of being kept.
        device = device.gradient_checkpointing();
    }
    let mut trainer = Trainer::new(recipe, groups, &device)?;
    let mut start = 0;
    if let Some((dir, meta)) = &resume_from {
        trainer.load(dir)?;
        if trainer.opt.steps() != meta.step as u64 {
            return Err(RecipeError::io(
                dir,
                format!(
                    "meta.json says step {} but the optimizer state has taken {} steps; the \
                     checkpoint is inconsistent",
                    meta.step,
                    trainer.opt.steps()
                ),
            ));
        }
        start = meta.step;
    }
    // Everything is checked and the checkpoint loaded: now the run directory may be written,
    // by this process alone.
    let _lock = if main {
        Some(crate::rundir::lock(&run_dir)?)
    } else {
        None
    };
    let mut metrics = if main {
        std::fs::create_dir_all(&run_dir).map_err(|e| RecipeError::io(&run_dir, e))?;
        let copy = run_dir.join("recipe.toml");
        let text = toml::to_string_pretty(recipe).map_err(|e| RecipeError::io(&copy, e))?;
        std::fs::write(&copy, text).map_err(|e| RecipeError::io(&copy, e))?;
        // Metrics after the checkpoint's step were never part of the run (a killed run logged
        // steps it did not checkpoint); a fresh start begins a new file.
        Some(MetricsLog::resume(&run_dir.join("metrics.jsonl"), start)?)
    } else {
        None
    };
    comm.barrier()?;
    let t = &recipe.training;
    {
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
            start_step = start,
            "training"
        );
    }
    let seq = recipe.data.seq_len;
    let (_, active) = parameter_count(&recipe.model);
    let m = &recipe.model;
    let flops_per_token = 6.0 * active as f64 + 6.0 * (m.layers * seq * m.hidden) as f64;
    let peak = recipe.run_peak_tflops();
    let bar = (main && options.progress).then(|| {
        let bar = indicatif::ProgressBar::new(t.steps as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps [{elapsed_precise} < {eta_precise}] {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_position(start as u64);
        bar
    });
    let mut losses = Vec::new();
    let mut peak_memory: Option<u64> = None;
    for step in start..t.steps {
        let began = Instant::now();
        let resident = trainer.resident_bytes();
        let step_start = crate::memory::live();
        crate::memory::reset_peak();
        let at = |e: RecipeError| RecipeError::AtStep {
            step: step + 1,
            source: Box::new(e),
        };
        let backward = trainer.backward(step).map_err(at)?;
        let reported = trainer.report(&backward).map_err(at)?;
        // The reported values are the same on every rank: all of them stop here together,
        // before the step, leaving the newest checkpoint as it was.
        if !(reported.loss.is_finite() && reported.aux.is_finite() && reported.z.is_finite()) {
            return Err(at(RecipeError::Refused(format!(
                "the loss is {} (aux {}, z {}); the run stops before the optimizer step and \
                 its last checkpoint is intact (lower training.lr, or check the data)",
                reported.loss, reported.aux, reported.z
            ))));
        }
        let stats = trainer.apply(backward, step)?;
        let step_peak = crate::memory::peak()
            .zip(step_start)
            .map(|(p, b)| resident + p.saturating_sub(b) as u64);
        peak_memory = peak_memory.max(step_peak);
        let loss = reported.loss;
        losses.push(loss);
        let seconds = began.elapsed().as_secs_f64();
        let tokens = (t.global_batch * seq) as f64;
        let tokens_per_s = tokens / seconds;
        let tflops = tokens_per_s * flops_per_token / 1e12;
        let stop = options.stop_at == Some(step + 1);
        let last = step + 1 == t.steps || stop;
        // Every `log_every` steps, and the last one (so every run has its final metrics).
        if let Some(file) = metrics.as_mut()
            && ((step + 1).is_multiple_of(t.log_every) || last)
        {
            let line = StepMetrics {
                step: step + 1,
                loss,
                aux_loss: reported.aux,
                z_loss: reported.z,
                lr: learning_rate(recipe, step),
                grad_norm: stats.grad_norm,
                tokens_per_s,
                tflops,
                mfu: tflops / (peak * n as f64),
                peak_memory_bytes: step_peak,
                expert_load: reported.expert_load,
                seconds,
            };
            file.write(&line)?;
        }
        tracing::info!(
            step = step + 1,
            loss,
            grad_norm = stats.grad_norm,
            tokens_per_s,
            "step"
        );
        if let Some(bar) = &bar {
            bar.set_position(step as u64 + 1);
            bar.set_message(format!("loss {loss:.4}  {tokens_per_s:.0} tok/s"));
        }
        // A signal on any rank stops every rank after this step.
        let signal = options
            .interrupts
            .as_ref()
            .and_then(crate::interrupt::Interrupts::received)
            .unwrap_or(0);
        let mut any = [signal as f32];
        comm.all_reduce(&mut any, ReduceOp::Max)?;
        let interrupted = any[0] > 0.0;
        let scheduled = t.checkpoint_every > 0 && (step + 1).is_multiple_of(t.checkpoint_every);
        if last || scheduled || interrupted {
            let meta = Meta {
                step: step + 1,
                world: n,
                next_sequence: trainer.next_sequence(step + 1),
                seed: recipe.run.seed,
            };
            trainer.save(&run_dir, &meta, t.keep_checkpoints)?;
        }
        if interrupted && !last {
            let signal = any[0] as i32;
            return Err(RecipeError::Interrupted {
                signal,
                signal_name: crate::interrupt::describe(signal).0,
                step: step + 1,
            });
        }
        if stop {
            break;
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let tail = &losses[losses.len().saturating_sub(10)..];
    let final_loss = if tail.is_empty() {
        f64::NAN
    } else {
        tail.iter().sum::<f64>() / tail.len() as f64
    };
    let summary = Summary {
        final_loss,
        losses,
        entropy_floor: trainer.source().entropy_rate(),
        steps: t.steps,
        run_dir,
        peak_memory_bytes: peak_memory,
    };
    if main {
        let path = summary.run_dir.join("summary.json");
        let text = serde_json::to_string_pretty(&summary).map_err(|e| RecipeError::io(&path, e))?;
        std::fs::write(&path, text).map_err(|e| RecipeError::io(&path, e))?;
        crate::plot::plot(&summary.run_dir, summary.entropy_floor)?;
    }
    Ok(summary)
}
