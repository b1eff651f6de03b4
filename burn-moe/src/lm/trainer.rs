//! [`LmTrainer`]: one rank's share of training an [`MoeLm`] under any parallel layout — its
//! model stage, the distributed AdamW, the pipeline schedule and its tokens of every global
//! batch — and [`LmTrainer::fit`], the training loop (learning-rate schedule, gradient
//! accumulation over micro-batches, a stop before the optimizer step on a non-finite loss,
//! checkpoints and exact resume, a stop on request with every rank at the same step).
//!
//! ```
//! use burn::tensor::Device;
//! use burn_moe::lm::{FitOptions, LmTrainer, LmTrainingConfig, MoeLmConfig, StageLayout, StepRecord, TokenSource};
//! use burn_moe::prelude::MoeLayerConfig;
//! use burn_parallel::prelude::ProcessGroups;
//!
//! let model = MoeLmConfig::new(32, 16, 1, 2, 32)
//!     .with_moe(Some(MoeLayerConfig::swiglu(16, 16, 4, 2)));
//! let training = LmTrainingConfig::new(8, 2, 2, 3);
//! let source = TokenSource::markov(32, 2, 0).unwrap();
//! let device = Device::default().autodiff();
//! let mut trainer = LmTrainer::new(
//!     &model,
//!     &StageLayout::single(1),
//!     &training,
//!     source,
//!     ProcessGroups::single().unwrap(),
//!     &device,
//! )
//! .unwrap();
//! let mut losses = Vec::new();
//! let outcome = trainer
//!     .fit(&FitOptions::default(), &mut |r: &StepRecord| losses.push(r.loss))
//!     .unwrap();
//! assert_eq!(outcome.losses, losses);
//! assert_eq!(losses.len(), 3);
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::{Module, ParamId};
use burn::tensor::{Device, Int, Tensor};
use burn_parallel::checkpoint::{self, SavedLayout, TrainingMeta};
use burn_parallel::comm::ReduceOp;
use burn_parallel::context::ContextLayout;
use burn_parallel::lr_schedule::LrSchedule;
use burn_parallel::pipeline::run_stage;
use burn_parallel::prelude::{
    AdamWConfig, DistributedAdamW, GradientBuffer, GroupKind, ParamRole, ProcessGroups, StepStats,
};
use burn_parallel::schedule::{Schedule, ScheduleKind};
use burn_parallel::{ParallelError, memory};

use super::config::MoeLmConfig;
use super::data::{TokenSource, sequence_index};
use super::model::MoeLm;
use super::precision::Precision;
use super::reshard::{Needed, read_full_state, saved_layout, shard_state};
use super::split::StageLayout;
use crate::error::{MoeError, Result, invalid};

/// How a language model is trained: the batch (sequences of `seq_len` tokens, `micro_batch`
/// per micro-batch, `global_batch` per optimizer step over the data-parallel ranks), AdamW
/// with gradient clipping, the learning-rate schedule (whose `steps` is the run's length)
/// and the seed of the initialisation and the data stream.
#[derive(Debug, Clone, PartialEq)]
pub struct LmTrainingConfig {
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Sequences per micro-batch.
    pub micro_batch: usize,
    /// Sequences per optimizer step, over every data-parallel rank.
    pub global_batch: usize,
    /// AdamW and gradient clipping (`lr` is replaced by the schedule's at every step).
    pub adamw: AdamWConfig,
    /// Warm-up and decay of the learning rate over the run.
    pub lr_schedule: LrSchedule,
    /// Seed of the initialisation and of the data stream.
    pub seed: u64,
    /// Precision of the model's matrices and activations ([`Precision`]); gradients and the
    /// optimizer's state are f32 either way.
    pub precision: Precision,
}

impl LmTrainingConfig {
    /// `steps` steps of `global_batch` sequences of `seq_len` tokens in micro-batches of
    /// `micro_batch`, with AdamW's defaults at a constant learning rate of 1e-3, seed 0.
    pub fn new(seq_len: usize, micro_batch: usize, global_batch: usize, steps: usize) -> Self {
        let adamw = AdamWConfig::default();
        Self {
            seq_len,
            micro_batch,
            global_batch,
            adamw,
            lr_schedule: LrSchedule::constant(adamw.lr, 0, steps),
            seed: 0,
            precision: Precision::F32,
        }
    }

    /// Optimizer steps of the run.
    pub fn steps(&self) -> usize {
        self.lr_schedule.steps
    }
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

/// Where and how often [`LmTrainer::fit`] writes checkpoints (collective over the world).
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointPolicy {
    /// The run folder; checkpoints go to its `checkpoints/step-NNNNNN`.
    pub run_dir: PathBuf,
    /// A checkpoint every this many steps (0: only at the end and on a stop).
    pub every: usize,
    /// Checkpoints kept (older ones are removed; at least one).
    pub keep: usize,
}

/// What [`LmTrainer::fit`] runs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FitOptions {
    /// The first step to run (0-based): the step of the checkpoint resumed from
    /// ([`LmTrainer::resume`]), 0 for a fresh run.
    pub start_step: usize,
    /// Stop after this step (1-based) with a checkpoint, as Megatron's `--exit-interval`.
    pub stop_at: Option<usize>,
    /// Checkpoints; `None`: none are written.
    pub checkpoints: Option<CheckpointPolicy>,
}

/// One finished step, as [`FitObserver::on_step`] sees it (the same on every rank except
/// `peak_memory_bytes`).
#[derive(Debug, Clone, PartialEq)]
pub struct StepRecord {
    /// The step (1-based).
    pub step: usize,
    /// Cross-entropy averaged over the step's tokens.
    pub loss: f64,
    /// Load-balancing loss.
    pub aux: f64,
    /// z-loss.
    pub z: f64,
    /// The learning rate of the step.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Wall time of the step on this rank.
    pub seconds: f64,
    /// Tokens of the step over every rank.
    pub tokens: usize,
    /// Tokens per expert of each MoE layer, over every rank.
    pub expert_load: Vec<Vec<f64>>,
    /// This rank's training memory of the step: its weights and optimizer state plus the
    /// step's peak of heap bytes above what was live when it began (`None` unless the
    /// process counts its allocations: [`burn_parallel::memory`]).
    pub peak_memory_bytes: Option<u64>,
    /// The run's last step (or the `stop_at` step).
    pub last: bool,
}

/// What the training loop tells its caller after every step: progress, metrics, logs; and
/// whether a stop was asked for (a signal).
pub trait FitObserver {
    /// The error the observer can fail with (the loop's errors convert into it).
    type Error: From<MoeError>;

    /// Called on every rank after every step's optimizer update.
    fn on_step(&mut self, record: &StepRecord) -> std::result::Result<(), Self::Error>;

    /// A stop request received by this rank since the last call (e.g. a signal's number);
    /// when any rank has one, every rank stops after the same step with a checkpoint.
    fn stop_request(&mut self) -> Option<i32> {
        None
    }
}

impl<F: FnMut(&StepRecord)> FitObserver for F {
    type Error = MoeError;

    fn on_step(&mut self, record: &StepRecord) -> Result<()> {
        self(record);
        Ok(())
    }
}

/// How [`LmTrainer::fit`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FitEnd {
    /// Every step of the schedule ran.
    Finished,
    /// `stop_at` was reached (a checkpoint was written if checkpoints are on).
    Stopped,
    /// A rank received stop request `request` (the largest over ranks).
    Requested {
        /// The request (a signal's number).
        request: i32,
    },
}

/// What [`LmTrainer::fit`] returns.
#[derive(Debug, Clone, PartialEq)]
pub struct FitOutcome {
    /// Loss of every step run.
    pub losses: Vec<f64>,
    /// The last step done (1-based).
    pub step: usize,
    /// The most training memory of one of its steps on this rank ([`StepRecord`]).
    pub peak_memory_bytes: Option<u64>,
    /// Why it ended.
    pub end: FitEnd,
}

/// Writes `model` (whole, on one rank) as the step-0 checkpoint of run folder `run_dir`, with
/// its layout and no optimizer state yet, so that an [`LmTrainer`] of any layout resumes from
/// it ([`LmTrainer::resume`]): how a given model — one read from the hub, say — is
/// fine-tuned. `seed` is the run's (the data stream's) seed. Returns the checkpoint folder.
pub fn save_initial(model: &MoeLm, run_dir: &Path, seed: u64) -> Result<PathBuf> {
    let groups = ProcessGroups::single()?;
    let layout = StageLayout::single(model.config().layers);
    let meta = TrainingMeta {
        step: 0,
        world: 1,
        next_sequence: 0,
        seed,
        layout: Some(saved_layout(&groups, &layout)),
    };
    // The state of an optimizer that has not stepped: empty shards of the trainer's two
    // classes (dense, expert).
    let single = groups.world().clone();
    let state = DistributedAdamW::new(
        AdamWConfig::default(),
        single.clone(),
        single.clone(),
        single.clone(),
    )?
    .with_expert_group(single)
    .state()?;
    let comm = groups.world().communicator()?;
    Ok(checkpoint::save(
        run_dir,
        &meta,
        model,
        &state,
        comm.as_ref(),
        1,
    )?)
}

/// One rank's share of training an [`MoeLm`]: its model stage, the distributed optimizer,
/// the pipeline schedule and the data. [`fit`](Self::fit) runs the loop; multi-rank checks
/// drive [`backward`](Self::backward), [`report`](Self::report) and [`apply`](Self::apply)
/// step by step.
pub struct LmTrainer {
    config: LmTrainingConfig,
    groups: ProcessGroups,
    device: Device,
    model: Option<MoeLm>,
    opt: DistributedAdamW,
    schedule: Schedule,
    source: TokenSource,
    layout: StageLayout,
    positions: Vec<usize>,
    roles: Vec<(ParamId, ParamRole)>,
    dp: usize,
    micro_batches: usize,
    moe_layers: usize,
    experts: usize,
}

impl LmTrainer {
    /// The trainer of this rank in `groups` for `model` laid out by `layout`, on `device`
    /// (with autodiff). The model is drawn from `training.seed`, each rank drawing only its
    /// own shard ([`MoeLmConfig::init_stage`]); gradients are averaged over the data- and
    /// context-parallel ranks, expert gradients over the expert-data-parallel ones.
    pub fn new(
        model: &MoeLmConfig,
        layout: &StageLayout,
        training: &LmTrainingConfig,
        source: TokenSource,
        groups: ProcessGroups,
        device: &Device,
    ) -> Result<Self> {
        let t = training;
        let dp = groups.group(GroupKind::Dp).size();
        if t.micro_batch == 0 || !t.global_batch.is_multiple_of(t.micro_batch * dp) {
            return Err(invalid(
                "global_batch",
                format!(
                    "{} sequences must be a positive multiple of micro_batch ({}) × the \
                     data-parallel ranks ({dp})",
                    t.global_batch, t.micro_batch
                ),
            ));
        }
        let micro_batches = t.global_batch / (t.micro_batch * dp);
        let chunks = layout.split.chunks();
        let kind = if chunks > 1 {
            ScheduleKind::Interleaved {
                virtual_stages: chunks,
                group: None,
            }
        } else {
            ScheduleKind::OneFOneB
        };
        let pp = groups.group(GroupKind::Pp).size();
        let schedule = Schedule::new(kind, pp, micro_batches)?;
        let cp = groups.group(GroupKind::Cp);
        let positions = ContextLayout::new(t.seq_len, cp.size())?.positions(cp.rank());
        let stage = model
            .init_stage(t.seed, &groups, layout, device)?
            .with_precision(t.precision);
        let opt = DistributedAdamW::new(
            t.adamw,
            groups.group(GroupKind::DpCp).clone(),
            groups.group(GroupKind::Tp).clone(),
            groups.world().clone(),
        )?
        .with_expert_group(groups.group(GroupKind::ExpertDp).clone());
        // Parameter ids survive optimizer steps (new values, same parameters).
        let roles = stage.roles();
        Ok(Self {
            config: t.clone(),
            moe_layers: (0..model.layers).filter(|&l| model.is_moe(l)).count(),
            experts: model.moe.as_ref().map_or(0, |m| m.router.num_experts),
            groups,
            device: device.clone(),
            model: Some(stage),
            opt,
            schedule,
            source,
            layout: layout.clone(),
            positions,
            roles,
            dp,
            micro_batches,
        })
    }

    fn gone() -> MoeError {
        MoeError::InvalidArgument {
            name: "model",
            reason: "an earlier optimizer step failed and took the model with it".into(),
        }
    }

    /// This rank's model stage.
    pub fn model(&self) -> Result<&MoeLm> {
        self.model.as_ref().ok_or_else(Self::gone)
    }

    /// The training configuration.
    pub fn config(&self) -> &LmTrainingConfig {
        &self.config
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

    /// Optimizer steps taken (including those of a loaded checkpoint).
    pub fn steps_taken(&self) -> u64 {
        self.opt.steps()
    }

    /// Bytes of the weights and optimizer state this rank holds (f32).
    pub fn resident_bytes(&self) -> u64 {
        let params = self.model.as_ref().map_or(0, Module::num_params);
        4 * (params + self.opt.state_len()) as u64
    }

    /// The learning rate of `step` (0-based).
    pub fn learning_rate(&self, step: usize) -> f64 {
        self.config.lr_schedule.at(step)
    }

    /// The sequence index after `step` steps (for checkpoints).
    pub fn next_sequence(&self, step: usize) -> u64 {
        let t = &self.config;
        sequence_index(step, 0, 0, 0, (t.micro_batch, self.micro_batches, self.dp))
    }

    /// Loads this rank's model and optimizer state from checkpoint folder `dir`, written under
    /// this trainer's layout (each rank reads its own file).
    pub fn load(&mut self, dir: &Path) -> Result<()> {
        let model = self.model.take().ok_or_else(Self::gone)?;
        let rank = self.groups.world().rank();
        let (loaded, state) = checkpoint::load(dir, model, rank)?;
        self.model = Some(loaded.with_precision(self.config.precision));
        self.opt.load_state(state)?;
        Ok(())
    }

    /// Loads checkpoint folder `dir` written under `saved`, any layout of the same model: each
    /// rank reads, by offset, the stored values of the parts it holds
    /// ([`reshard`](super::reshard)).
    pub fn load_resharded(&mut self, dir: &Path, saved: &SavedLayout) -> Result<()> {
        let config = self.model()?.config().clone();
        let needed = Needed::of(&config, &self.groups, &self.layout)?;
        let full = read_full_state(dir, &config, saved, Some(&needed))?;
        let (model, state) = shard_state(
            &full,
            &config,
            &self.groups,
            &self.layout,
            &needed,
            &self.device,
        )?;
        self.roles = model.roles();
        self.model = Some(model.with_precision(self.config.precision));
        self.opt.load_state(state)?;
        Ok(())
    }

    /// The checkpoint layout ([`SavedLayout`]) of this trainer.
    pub fn saved_layout(&self) -> SavedLayout {
        saved_layout(&self.groups, &self.layout)
    }

    /// Loads the checkpoint in folder `dir` whose `meta.json` is `meta` — written under this
    /// layout ([`load`](Self::load)) or, when it recorded its layout, under any other
    /// ([`load_resharded`](Self::load_resharded)) — and checks that its optimizer state has
    /// taken `meta.step` steps; returns the step to go on from ([`FitOptions::start_step`]).
    pub fn resume(&mut self, dir: &Path, meta: &TrainingMeta) -> Result<usize> {
        let here = self.saved_layout();
        match &meta.layout {
            Some(saved) if *saved != here => self.load_resharded(dir, saved)?,
            None if meta.world != self.groups.world().size() => {
                return Err(ParallelError::io(
                    dir,
                    format!(
                        "was written by {} ranks before checkpoints recorded their layout; \
                         resume it with the layout it was written under",
                        meta.world
                    ),
                )
                .into());
            }
            _ => self.load(dir)?,
        }
        let step = meta.step;
        if self.opt.steps() != step as u64 {
            return Err(ParallelError::io(
                dir,
                format!(
                    "meta.json says step {step} but the optimizer state has taken {} steps; \
                     the checkpoint is inconsistent",
                    self.opt.steps()
                ),
            )
            .into());
        }
        Ok(step)
    }

    /// Writes a checkpoint of every rank after `step` steps (collective over the world);
    /// returns its folder.
    pub fn save(&self, policy: &CheckpointPolicy, step: usize) -> Result<PathBuf> {
        let comm = self.groups.world().communicator()?;
        let meta = TrainingMeta {
            step,
            world: self.groups.world().size(),
            next_sequence: self.next_sequence(step),
            seed: self.config.seed,
            layout: Some(self.saved_layout()),
        };
        Ok(checkpoint::save(
            &policy.run_dir,
            &meta,
            self.model()?,
            &self.opt.state()?,
            comm.as_ref(),
            policy.keep.max(1),
        )?)
    }

    /// Sequence-first `[S, B]` ids of this rank's tokens (its context-parallel positions) of
    /// micro-batch `micro` of `step`, and their next-token targets.
    fn micro_batch(&self, step: usize, micro: usize) -> (Tensor<2, Int>, Tensor<2, Int>) {
        let t = &self.config;
        let dp_rank = self.groups.group(GroupKind::Dp).rank();
        let counts = (t.micro_batch, self.micro_batches, self.dp);
        let columns: Vec<Vec<i64>> = (0..t.micro_batch)
            .map(|i| {
                let index = sequence_index(step, micro, dp_rank, i, counts);
                self.source.sequence(index, t.seq_len)
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
        let upload = |v: Vec<i64>| {
            crate::host::upload_i64(&v, &self.device, "uploading token ids").reshape(local)
        };
        (upload(ids), upload(next))
    }

    /// Forward and backward passes of every micro-batch of `step` (0-based) on this rank,
    /// through the pipeline schedule. Collective over the model's groups.
    pub fn backward(&self, step: usize) -> Result<Backward> {
        let model = self.model()?;
        let (mut ce, mut aux, mut z) = (0.0, 0.0, 0.0);
        let mut load = vec![vec![0.0; self.experts]; self.moe_layers];
        let scale = 1.0 / self.micro_batches as f64;
        // The global aux loss's counts, accumulated over this step's micro-batches.
        let mut global = vec![None; self.moe_layers];
        let tp = self.groups.group(GroupKind::Tp).size();
        let shape = [
            self.positions.len() / tp,
            self.config.micro_batch,
            model.config().hidden,
        ];
        let pp = self.groups.group(GroupKind::Pp);
        let mut run = run_stage(
            &self.schedule,
            pp,
            model,
            (shape, self.config.precision.dtype()),
            &self.device,
            |chunk, micro, input| {
                let batch = self.micro_batch(step, micro);
                let out = model.forward_chunk_with(chunk, input, (&batch.0, &batch.1), &global)?;
                for (index, state) in &out.global_aux {
                    if let Some(slot) = global.get_mut(*index) {
                        *slot = Some(state.clone());
                    }
                }
                // What the step reports, with the MoE layers' deferred finiteness check, in one
                // device-to-host read per micro-batch.
                let values = reported_values(&out)?;
                if values[3] > 0.0 {
                    return Err(MoeError::NonFiniteLogits {
                        count: values[3] as usize,
                    });
                }
                ce += values[0] * scale;
                aux += values[1] * scale;
                z += values[2] * scale;
                let mut at = 4;
                for (layer, counts) in &out.expert_load {
                    let n = counts.dims()[0];
                    if let Some(slot) = load.get_mut(*layer) {
                        slot.iter_mut()
                            .zip(&values[at..at + n])
                            .for_each(|(a, b)| *a += *b);
                    }
                    at += n;
                }
                Ok::<_, MoeError>(model.stage_output(&out, scale))
            },
        )?;
        model.tie_gradients(&mut run.grads, pp)?;
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
        Ok(Reported {
            loss: f64::from(reported[0]),
            aux: f64::from(reported[1]),
            z: f64::from(reported[2]),
            expert_load: flat
                .chunks(self.experts.max(1))
                .map(|row| row.iter().map(|&v| f64::from(v)).collect())
                .collect(),
        })
    }

    /// The optimizer step of `step` (0-based; sets its learning rate) with the gradients of
    /// [`backward`](Self::backward), then the expert-bias update of routers that have one
    /// (with this rank's tokens per expert of the step). Collective over the world.
    pub fn apply(&mut self, backward: Backward, step: usize) -> Result<StepStats> {
        self.opt.set_lr(self.learning_rate(step));
        let model = self.model.take().ok_or_else(Self::gone)?;
        let (mut next, stats) = self.opt.step_buffered(model, backward.grads, &self.roles)?;
        next.update_expert_biases(&backward.load)?;
        self.model = Some(next);
        Ok(stats)
    }

    /// One step (0-based): forward and backward, the reported losses (a non-finite one stops
    /// here, before the optimizer step, on every rank), the optimizer step.
    fn step(&mut self, step: usize) -> Result<(Reported, StepStats)> {
        let at = |e: MoeError| MoeError::AtStep {
            step: step + 1,
            source: Box::new(e),
        };
        let backward = self.backward(step).map_err(at)?;
        let r = self.report(&backward).map_err(at)?;
        if !(r.loss.is_finite() && r.aux.is_finite() && r.z.is_finite()) {
            let (loss, aux, z) = (r.loss, r.aux, r.z);
            return Err(at(MoeError::NonFiniteLoss { loss, aux, z }));
        }
        let stats = self.apply(backward, step)?;
        Ok((r, stats))
    }

    /// Runs the steps from `options.start_step` to the end of the schedule (or `stop_at`),
    /// telling `observer` after each; writes checkpoints by `options.checkpoints` and always
    /// after the last step run. A stop request on any rank ([`FitObserver::stop_request`])
    /// stops every rank after the same step, with a checkpoint. Collective over the world.
    pub fn fit<O: FitObserver>(
        &mut self,
        options: &FitOptions,
        observer: &mut O,
    ) -> std::result::Result<FitOutcome, O::Error> {
        let steps = self.config.steps();
        if let Some(stop) = options.stop_at
            && (stop <= options.start_step || stop > steps)
        {
            return Err(invalid(
                "stop_at",
                format!(
                    "is {stop}; it must be after the first step to run ({}) and at most the \
                     run's {steps} steps",
                    options.start_step + 1
                ),
            )
            .into());
        }
        let world = self.groups.world().communicator().map_err(MoeError::from)?;
        let tokens = self.config.global_batch * self.config.seq_len;
        let mut outcome = FitOutcome {
            losses: Vec::new(),
            step: options.start_step,
            peak_memory_bytes: None,
            end: FitEnd::Finished,
        };
        for step in options.start_step..steps {
            let began = Instant::now();
            let resident = self.resident_bytes();
            let live = memory::live();
            memory::reset_peak();
            let (reported, stats) = self.step(step)?;
            let peak = memory::peak()
                .zip(live)
                .map(|(p, b)| resident + p.saturating_sub(b) as u64);
            outcome.peak_memory_bytes = outcome.peak_memory_bytes.max(peak);
            outcome.losses.push(reported.loss);
            outcome.step = step + 1;
            let stop = options.stop_at == Some(step + 1);
            let last = step + 1 == steps || stop;
            observer.on_step(&StepRecord {
                step: step + 1,
                loss: reported.loss,
                aux: reported.aux,
                z: reported.z,
                lr: self.learning_rate(step),
                grad_norm: stats.grad_norm,
                seconds: began.elapsed().as_secs_f64(),
                tokens,
                expert_load: reported.expert_load,
                peak_memory_bytes: peak,
                last,
            })?;
            // A request on any rank stops every rank after this step.
            let mut request = [observer.stop_request().unwrap_or(0) as f32];
            world
                .all_reduce(&mut request, ReduceOp::Max)
                .map_err(MoeError::from)?;
            let requested = request[0] > 0.0;
            if let Some(policy) = &options.checkpoints {
                let scheduled = policy.every > 0 && (step + 1).is_multiple_of(policy.every);
                if last || scheduled || requested {
                    self.save(policy, step + 1)?;
                }
            }
            if requested && !last {
                outcome.end = FitEnd::Requested {
                    request: request[0] as i32,
                };
                return Ok(outcome);
            }
            if stop {
                outcome.end = FitEnd::Stopped;
                break;
            }
        }
        Ok(outcome)
    }
}

/// A micro-batch's reported values in one device-to-host read: cross-entropy, aux and z
/// losses (0 when absent), the count of non-finite router logits, then the tokens per expert
/// of each MoE layer in `out.expert_load`'s order (exact in f32 up to 2^24 tokens).
fn reported_values(out: &crate::lm::Forward) -> Result<Vec<f64>> {
    let device = out
        .expert_load
        .first()
        .map(|(_, c)| c.device())
        .or_else(|| out.ce.as_ref().map(Tensor::device))
        .or_else(|| out.hidden.as_ref().map(Tensor::device));
    let Some(device) = device else {
        return Ok(vec![0.0; 4]);
    };
    let loss = |t: &Option<Tensor<1>>| match t {
        Some(t) => t.clone().inner().cast(burn::tensor::FloatDType::F32),
        None => Tensor::<1>::zeros([1], &device),
    };
    let mut parts = vec![
        loss(&out.ce),
        loss(&out.aux),
        loss(&out.z),
        match &out.nonfinite_logits {
            Some(bad) => bad.clone().float(),
            None => Tensor::<1>::zeros([1], &device),
        },
    ];
    parts.extend(out.expert_load.iter().map(|(_, c)| c.clone().float()));
    let values = crate::host::read_f32(Tensor::cat(parts, 0), "reading a micro-batch's losses")?;
    Ok(values.into_iter().map(f64::from).collect())
}
