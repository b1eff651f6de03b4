//! The training loop: data-parallel micro-batches with gradient accumulation, the distributed
//! AdamW with warm-up + cosine decay and clipping, JSONL metrics, a progress bar, tracing logs
//! and atomic checkpoints with exact resume.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};
use burn_parallel::comm::ReduceOp;
use burn_parallel::context::ContextLayout;
use burn_parallel::pipeline::run_stage;
use burn_parallel::prelude::{
    AdamWConfig, DistributedAdamW, GroupKind, Mesh, MoeDims, ParallelDims, ProcessGroups, World,
};
use burn_parallel::schedule::{Schedule, ScheduleKind};
use serde::Serialize;

use crate::checkpoint::{self, Meta};
use crate::data::{TokenSource, sequence_index};
use crate::error::{RecipeError, Result};
use crate::model::MoeLm;
use crate::recipe::{ModelConfig, Precision, Recipe};

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

/// Parameters of the model (all ranks together).
pub fn parameter_count(m: &ModelConfig) -> (u64, u64) {
    let (h, v) = (m.hidden as u64, m.vocab as u64);
    let heads = m.heads as u64;
    let kv = m.kv_heads.unwrap_or(m.heads) as u64;
    let dh = h / heads;
    let attention = h * (heads + 2 * kv) * dh + heads * dh * h + 2 * h;
    let f = m.ffn_hidden as u64;
    let fe = m.expert_ffn_hidden.unwrap_or(m.ffn_hidden) as u64;
    let e = m.experts as u64;
    let shared = m.shared_expert_ffn_hidden.map_or(0, |s| 3 * h * s as u64);
    let dense = 3 * h * f;
    let (mut total, mut active) = (2 * v * h + h, 2 * v * h + h);
    for layer in 0..m.layers {
        let is_moe = m.moe_every > 0 && (layer + 1).is_multiple_of(m.moe_every);
        let (t, a) = if is_moe {
            (
                e * h + e * 3 * h * fe + shared,
                e * h + m.topk as u64 * 3 * h * fe + shared,
            )
        } else {
            (dense, dense)
        };
        total += attention + t;
        active += attention + a;
    }
    (total, active)
}

/// Bytes of parameters, gradients and AdamW state (f32 weights and gradients, f32 master
/// weights and two moments) for the whole model, before any sharding.
pub fn training_state_bytes(m: &ModelConfig) -> u64 {
    parameter_count(m).0 * 4 * 5
}

fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// Refuses a recipe whose parameters, gradients and optimizer state cannot fit in this
/// machine's available memory, saying how much it needs.
pub fn check_memory(recipe: &Recipe, world: usize) -> Result<()> {
    let total_bytes = training_state_bytes(&recipe.model);
    let need = total_bytes / world as u64;
    let Some(have) = available_memory() else {
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
    if step < t.warmup_steps {
        return t.lr * (step + 1) as f64 / t.warmup_steps as f64;
    }
    let span = (t.steps - t.warmup_steps).max(1) as f64;
    let progress = ((step - t.warmup_steps) as f64 / span).min(1.0);
    t.min_lr + 0.5 * (t.lr - t.min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
}

fn value(t: Tensor<1>) -> Result<f64> {
    let v = t
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| RecipeError::Refused(format!("reading a loss: {e:?}")))?;
    Ok(f64::from(v.first().copied().unwrap_or(f32::NAN)))
}

fn io(path: &Path, e: impl std::fmt::Display) -> RecipeError {
    RecipeError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Runs (or resumes) a recipe on this process's share of `world`.
pub fn train(recipe: &Recipe, options: &TrainOptions, world: &World) -> Result<Summary> {
    recipe.validate()?;
    let n = world.size();
    check_memory(recipe, n)?;
    check_supported(recipe)?;
    let (dp, edp) = recipe.check_world(n)?;
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
        if checkpoint::latest(&run_dir)?.is_some() || run_dir.join("metrics.jsonl").exists() {
            return Err(RecipeError::Invalid {
                key: "run.dir".into(),
                reason: format!(
                    "{} already holds a run; continue it with --resume or choose another run.dir",
                    run_dir.display()
                ),
            });
        }
        None
    };
    let source = TokenSource::new(&recipe.data, recipe.model.vocab, recipe.run.seed)?;
    // Everything is checked: now the run directory may be written.
    if main {
        std::fs::create_dir_all(&run_dir).map_err(|e| io(&run_dir, e))?;
        let copy = run_dir.join("recipe.toml");
        let text = toml::to_string_pretty(recipe).map_err(|e| io(&copy, e))?;
        std::fs::write(&copy, text).map_err(|e| io(&copy, e))?;
    }
    comm.barrier()?;
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
    let chunks = p.virtual_pp.unwrap_or(1);
    let mut model = MoeLm::stage(
        &recipe.model,
        recipe.run.seed,
        &groups,
        p.dispatcher,
        chunks,
        &device,
    )?;
    let t = &recipe.training;
    let adamw = AdamWConfig {
        lr: t.lr,
        beta1: t.beta1,
        beta2: t.beta2,
        eps: t.eps,
        weight_decay: t.weight_decay,
        max_grad_norm: t.grad_clip,
    };
    // Gradients are averaged over the data-parallel and context-parallel ranks (each holds
    // its own tokens of replicated parameters).
    let dp_group = groups.group(GroupKind::Dp).clone();
    let dp_cp_group = groups.group(GroupKind::DpCp).clone();
    let mut opt = DistributedAdamW::new(
        adamw,
        dp_cp_group.clone(),
        groups.group(GroupKind::Tp).clone(),
        groups.world().clone(),
    )?
    .with_expert_group(groups.group(GroupKind::ExpertDp).clone());
    let mut start = 0;
    if let Some((dir, meta)) = resume_from {
        if meta.world != n {
            return Err(RecipeError::Invalid {
                key: "--resume".into(),
                reason: format!(
                    "the checkpoint was written by {} ranks, this run has {n}",
                    meta.world
                ),
            });
        }
        let (loaded, state) = checkpoint::load(&dir, model, comm.rank())?;
        model = loaded;
        opt.load_state(state)?;
        start = meta.step;
    }
    let micro_batches = t.global_batch / (t.micro_batch * dp);
    let kind = if chunks > 1 {
        ScheduleKind::Interleaved {
            virtual_stages: chunks,
            group: None,
        }
    } else {
        ScheduleKind::OneFOneB
    };
    let schedule = Schedule::new(kind, p.pp, micro_batches).map_err(|e| RecipeError::Invalid {
        key: "parallel.virtual_pp".into(),
        reason: e.to_string(),
    })?;
    let pp_group = groups.group(GroupKind::Pp).clone();
    let cp_group = groups.group(GroupKind::Cp).clone();
    let context = ContextLayout::new(recipe.data.seq_len, p.cp)?;
    let positions = context.positions(cp_group.rank());
    let moe_layers = (0..recipe.model.layers)
        .filter(|l| recipe.model.moe_every > 0 && (l + 1).is_multiple_of(recipe.model.moe_every))
        .count();
    {
        let (total, active) = parameter_count(&recipe.model);
        tracing::info!(
            world = n,
            tp = p.tp,
            cp = p.cp,
            pp = p.pp,
            virtual_pp = chunks,
            dp,
            ep = p.ep,
            etp = p.etp,
            edp,
            micro_batches,
            parameters = total,
            active_parameters = active,
            start_step = start,
            "training"
        );
    }
    let seq = recipe.data.seq_len;
    let tp_cp_comm = groups.group(GroupKind::TpCp).communicator()?;
    let dp_cp_comm = dp_cp_group.communicator()?;
    let pp_comm = pp_group.communicator()?;
    let dp_rank = dp_group.rank();
    let (_, active) = parameter_count(&recipe.model);
    let m = &recipe.model;
    let flops_per_token = 6.0 * active as f64 + 6.0 * (m.layers * seq * m.hidden) as f64;
    let peak = recipe.run_peak_tflops();
    let metrics_path = run_dir.join("metrics.jsonl");
    let mut metrics = if main {
        Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&metrics_path)
                .map_err(|e| io(&metrics_path, e))?,
        )
    } else {
        None
    };
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
    // Parameter ids survive optimizer steps (new values, same parameters).
    let roles = model.roles();
    let mut losses = Vec::new();
    let mut peak_memory: Option<u64> = None;
    for step in start..t.steps {
        let began = Instant::now();
        // Weights and optimizer state are f32 on the host and in Flex tensors.
        let resident = 4 * (model.num_params() + opt.state_len()) as u64;
        let step_start = crate::memory::live();
        crate::memory::reset_peak();
        let (mut ce_sum, mut aux_sum, mut z_sum) = (0.0, 0.0, 0.0);
        let experts = recipe.model.experts;
        let mut load: Vec<Vec<f64>> = vec![vec![0.0; experts]; moe_layers];
        let scale = 1.0 / micro_batches as f64;
        let shape = [seq / p.cp / p.tp, t.micro_batch, recipe.model.hidden];
        let run = run_stage(
            &schedule,
            &pp_group,
            &model,
            shape,
            &device,
            |chunk, micro, input| {
                // Sequence-first [S, B] ids of this rank's tokens (its CP chunks) and their
                // next-token targets.
                let mut columns = Vec::with_capacity(t.micro_batch);
                for i in 0..t.micro_batch {
                    let index =
                        sequence_index(step, micro, dp_rank, i, (t.micro_batch, micro_batches, dp));
                    columns.push(source.sequence(index, seq));
                }
                let (mut ids, mut next) = (Vec::new(), Vec::new());
                for &pos in &positions {
                    for col in &columns {
                        ids.push(col[pos]);
                        next.push(col[pos + 1]);
                    }
                }
                let local = [positions.len(), t.micro_batch];
                let inputs = Tensor::<2, Int>::from_data(TensorData::new(ids, local), &device);
                let targets = Tensor::<2, Int>::from_data(TensorData::new(next, local), &device);
                let out = model.forward_chunk(chunk, input, &inputs, &targets)?;
                if let Some(ce) = out.ce.clone() {
                    ce_sum += value(ce)? * scale;
                }
                if let Some(a) = out.aux.clone() {
                    aux_sum += value(a)? * scale;
                }
                if let Some(z) = out.z.clone() {
                    z_sum += value(z)? * scale;
                }
                for (layer, counts) in &out.expert_load {
                    let c: Vec<f64> = counts
                        .clone()
                        .into_data()
                        .convert::<i64>()
                        .try_into_vec::<i64>()
                        .unwrap_or_default()
                        .into_iter()
                        .map(|v| v as f64)
                        .collect();
                    if let Some(slot) = load.get_mut(*layer) {
                        slot.iter_mut().zip(&c).for_each(|(a, b)| *a += b);
                    }
                }
                Ok::<_, RecipeError>(model.stage_output(&out, scale))
            },
        )?;
        let grads = run.grads;
        opt.set_lr(learning_rate(recipe, step));
        let (next, stats) = opt.step_buffered(model, grads, &roles)?;
        model = next;
        let step_peak = crate::memory::peak()
            .zip(step_start)
            .map(|(p, b)| resident + p.saturating_sub(b) as u64);
        peak_memory = peak_memory.max(step_peak);
        // Reported: CE (on the last pipeline stage) averaged over DP × CP; aux and z summed
        // over the pipeline's stages and over TP × CP (each rank routes its own tokens) and
        // averaged over DP; expert load summed over every rank.
        let mut reported = [ce_sum as f32, aux_sum as f32, z_sum as f32];
        pp_comm.all_reduce(&mut reported, ReduceOp::Sum)?;
        tp_cp_comm.all_reduce(&mut reported[1..], ReduceOp::Sum)?;
        dp_cp_comm.all_reduce(&mut reported, ReduceOp::Avg)?;
        let mut flat: Vec<f32> = load.iter().flatten().map(|&v| v as f32).collect();
        comm.all_reduce(&mut flat, ReduceOp::Sum)?;
        let loss = f64::from(reported[0]);
        losses.push(loss);
        let seconds = began.elapsed().as_secs_f64();
        let tokens = (t.global_batch * seq) as f64;
        let tokens_per_s = tokens / seconds;
        let tflops = tokens_per_s * flops_per_token / 1e12;
        if let Some(file) = metrics.as_mut()
            && (step + 1).is_multiple_of(t.log_every)
        {
            let expert_load = flat
                .chunks(experts.max(1))
                .map(|row| row.iter().map(|&v| f64::from(v)).collect())
                .collect();
            let line = StepMetrics {
                step: step + 1,
                loss,
                aux_loss: f64::from(reported[1]),
                z_loss: f64::from(reported[2]),
                lr: learning_rate(recipe, step),
                grad_norm: stats.grad_norm,
                tokens_per_s,
                tflops,
                mfu: tflops / (peak * n as f64),
                peak_memory_bytes: step_peak,
                expert_load,
                seconds,
            };
            let text = serde_json::to_string(&line).map_err(|e| io(&metrics_path, e))?;
            writeln!(file, "{text}").map_err(|e| io(&metrics_path, e))?;
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
        let stop = options.stop_at == Some(step + 1);
        let last = step + 1 == t.steps || stop;
        if last || (t.checkpoint_every > 0 && (step + 1).is_multiple_of(t.checkpoint_every)) {
            let meta = Meta {
                step: step + 1,
                world: n,
                next_sequence: sequence_index(
                    step + 1,
                    0,
                    0,
                    0,
                    (t.micro_batch, micro_batches, dp),
                ),
                seed: recipe.run.seed,
            };
            checkpoint::save(
                &run_dir,
                &meta,
                &model,
                &opt.state(),
                comm.as_ref(),
                t.keep_checkpoints,
            )?;
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
        entropy_floor: source.entropy_rate(),
        steps: t.steps,
        run_dir,
        peak_memory_bytes: peak_memory,
    };
    if main {
        let path = summary.run_dir.join("summary.json");
        let text = serde_json::to_string_pretty(&summary).map_err(|e| io(&path, e))?;
        std::fs::write(&path, text).map_err(|e| io(&path, e))?;
        crate::plot::plot(&summary.run_dir, summary.entropy_floor)?;
    }
    Ok(summary)
}
