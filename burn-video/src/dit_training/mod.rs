//! Training the video DiT on cached VAE latents, as MUG-V pretrains and post-trains:
//! curriculum [`Stage`]s (images, then short clips, then longer ones, each with its own steps,
//! learning rate, batch and image/video mix) of rectified flow with logit-normal timesteps
//! shifted for the latent size ([`FlowConfig`]), caption dropout for classifier-free guidance,
//! an optional weight average ([`EmaConfig`]), a flow-matching validation loss at fixed
//! timesteps after each stage, then post-training ([`PostConfig`]): supervised fine-tuning on
//! a curated subset and Diffusion-DPO on the model's own samples ranked by the rule-based
//! checker, with the checker's accuracy before and after. [`DitTrainer`] runs it;
//! [`Sampler`] generates clips for captions and measures the checker's accuracy.
//!
//! Images are the first latent frame of a clip (a causal VAE encodes the first frame alone),
//! a clip of `f` latent frames is the first `f` of its cache; a batch holds one shape (bucket).

mod post;
mod sampling;

pub use post::{Pair, PostConfig, PostInputs, PostReport, dpo_margin, dpo_steps};
pub use sampling::{Accuracy, Sampler, decode_with};

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use burn_parallel::checkpoint::{self, TrainingMeta};
use burn_parallel::ema::Ema;
use burn_parallel::lr_schedule::LrSchedule;
use burn_parallel::prelude::{AdamWConfig, DistributedAdamW, GradientBuffer, replicated_roles};
use serde::{Deserialize, Serialize};

use crate::dit::{Condition, Dit, DitConfig};
use crate::error::{Result, VideoError, invalid};
use crate::flow::{self, Rng};
use crate::latent_cache::{CacheMeta, CachedClip, read_cache, read_latent};
use crate::tensor::scalar;
use crate::text::Vocabulary;

/// `[flow]`: timestep sampling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowConfig {
    /// Mean of the logit-normal.
    #[serde(default)]
    pub logit_mean: f64,
    /// Standard deviation of the logit-normal.
    #[serde(default = "one_f")]
    pub logit_std: f64,
    /// Latent side at which the resolution shift is 1 (for one latent frame).
    #[serde(default = "base")]
    pub shift_base: usize,
}

fn one_f() -> f64 {
    1.0
}

fn base() -> usize {
    8
}

/// One `[[stage]]` of the curriculum.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    /// Name (logged).
    pub name: String,
    /// Optimizer steps.
    pub steps: usize,
    /// Peak learning rate (reached after `warmup_steps`).
    pub lr: f64,
    /// Learning rate at the end of the stage: after the warm-up the rate follows a cosine from
    /// `lr` down to `min_lr` (absent: constant `lr`).
    #[serde(default)]
    pub min_lr: Option<f64>,
    /// Linear warm-up steps at the start of the stage.
    #[serde(default)]
    pub warmup_steps: usize,
    /// Samples per batch.
    pub batch: usize,
    /// Latent frames of the video batches (1: images only).
    pub frames: usize,
    /// Share of batches that are images (the first latent frame) in a video stage.
    #[serde(default)]
    pub image_ratio: f64,
}

impl Stage {
    /// The learning rate of step `s` (0-based) of this stage: linear warm-up to `lr` over
    /// `warmup_steps`, then constant or, with `min_lr`, a cosine down to it at the stage's
    /// end (burn-parallel's [`LrSchedule`], as every trainer).
    pub fn lr_at(&self, s: usize) -> f64 {
        LrSchedule {
            lr: self.lr,
            min_lr: self.min_lr.unwrap_or(self.lr),
            warmup_steps: self.warmup_steps,
            steps: self.steps,
        }
        .at(s)
    }
}

/// `[ema]`: an exponential moving average of the weights (decay `d`, warmed up as
/// `min(d, (1 + n) / (10 + n))`), kept through the curriculum and post-training. The
/// validation losses, the checker's samples and the saved checkpoint use it, and each
/// post-training phase (SFT, DPO) starts from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmaConfig {
    /// Decay per optimizer step, in `[0, 1)`.
    pub decay: f64,
}

impl Default for FlowConfig {
    fn default() -> Self {
        Self {
            logit_mean: 0.0,
            logit_std: 1.0,
            shift_base: base(),
        }
    }
}

/// How a DiT is trained: the curriculum, timestep sampling, caption dropout, the caption
/// length, the weight average and the seed of every draw (clips, timesteps, batch kinds).
#[derive(Debug, Clone, PartialEq)]
pub struct DitTrainingConfig {
    /// The curriculum, in order (at least one stage).
    pub stages: Vec<Stage>,
    /// Timestep sampling.
    pub flow: FlowConfig,
    /// Share of captions replaced by the null caption in training, in `[0, 1)`.
    pub caption_dropout: f64,
    /// Longest caption in words (the DiT's `text_len`).
    pub text_len: usize,
    /// Weight averaging.
    pub ema: Option<EmaConfig>,
    /// Seed of the training draws.
    pub seed: u64,
}

/// What [`DitTrainer::curriculum`] tells its caller.
#[derive(Debug, Clone, Copy)]
pub enum DitEvent<'a> {
    /// Stage `index` begins.
    Stage {
        /// Its index.
        index: usize,
        /// The stage.
        stage: &'a Stage,
    },
    /// A step finished.
    Step {
        /// The step over the whole run (1-based).
        step: usize,
        /// Its stage.
        stage: &'a Stage,
        /// Latent frames of its batch (1: images).
        frames: usize,
        /// Its flow-matching loss.
        loss: f64,
        /// Its learning rate.
        lr: f64,
    },
    /// A stage ended with its report.
    StageDone(&'a StageReport),
}

/// A clip's latent `[C, t, h, w]` and caption, in memory.
#[derive(Debug, Clone)]
pub struct LatentClip {
    /// The source clip.
    pub clip: PathBuf,
    /// The normalised latent.
    pub latent: Tensor<4>,
    /// Caption.
    pub caption: String,
}

impl LatentClip {
    /// The same clip with its latent on `device`.
    pub fn to_device(&self, device: &Device) -> Self {
        Self {
            clip: self.clip.clone(),
            latent: Tensor::from_data(self.latent.to_data(), device),
            caption: self.caption.clone(),
        }
    }
}

/// The batches of a stage: which latent frames (a bucket keeps one shape).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchKind {
    /// The first latent frame of each clip.
    Images,
    /// The first `n` latent frames.
    Video(usize),
}

impl BatchKind {
    /// Latent frames.
    pub fn frames(self) -> usize {
        match self {
            Self::Images => 1,
            Self::Video(n) => n,
        }
    }
}

/// The kind of batch `step` of `stage` draws (images with probability `image_ratio`, always
/// when the stage has one frame), from the seeded generator.
pub fn batch_kind(stage: &Stage, rng: &mut Rng) -> BatchKind {
    if stage.frames == 1 || rng.uniform() < stage.image_ratio {
        BatchKind::Images
    } else {
        BatchKind::Video(stage.frames)
    }
}

/// `[B, C, f, h, w]` from the first `f` latent frames of `clips`.
fn stack(clips: &[&LatentClip], frames: usize) -> Tensor<5> {
    let parts = clips
        .iter()
        .map(|c| c.latent.clone().narrow(1, 0, frames).unsqueeze_dim::<5>(0))
        .collect();
    Tensor::cat(parts, 0)
}

/// The clips of latent cache `dir` ([`crate::latent_cache`]) on `device`, every
/// `holdout_every`-th held out (training, held out), and the vocabulary of every caption.
/// Every clip needs a caption.
pub fn load_latents(
    dir: &Path,
    holdout_every: usize,
    device: &Device,
) -> Result<(CacheMeta, Vec<LatentClip>, Vec<LatentClip>, Vocabulary)> {
    if holdout_every < 2 {
        return Err(invalid(
            "holdout_every",
            "must be at least 2 (every n-th clip is held out)",
        ));
    }
    let (meta, index) = read_cache(dir)?;
    let missing: Vec<&CachedClip> = index.iter().filter(|c| c.caption.is_none()).collect();
    if let Some(c) = missing.first() {
        return Err(invalid(
            "latents",
            format!(
                "{} clips have no caption (first: {}); cache clips with a captions.jsonl",
                missing.len(),
                c.clip.display()
            ),
        ));
    }
    let vocab = Vocabulary::from_captions(
        &index
            .iter()
            .filter_map(|c| c.caption.clone())
            .collect::<Vec<_>>(),
    );
    let (mut train, mut held) = (Vec::new(), Vec::new());
    for (i, entry) in index.iter().enumerate() {
        let clip = LatentClip {
            clip: entry.clip.clone(),
            latent: read_latent(dir, entry, device)?,
            caption: entry.caption.clone().unwrap_or_default(),
        };
        if i % holdout_every == holdout_every - 1 {
            held.push(clip);
        } else {
            train.push(clip);
        }
    }
    if train.is_empty() || held.is_empty() {
        return Err(invalid(
            "holdout_every",
            format!("{} clips leave no training or held-out clip", index.len()),
        ));
    }
    Ok((meta, train, held, vocab))
}

/// Validation: the flow-matching loss averaged over fixed timesteps (0.1 … 0.9) with fixed
/// noise on the held-out clips, for batches of `frames` latent frames.
pub fn validation_loss(
    dit: &Dit,
    held: &[LatentClip],
    vocab: &Vocabulary,
    text_len: usize,
    frames: usize,
    device: &Device,
) -> Result<f64> {
    let refs: Vec<&LatentClip> = held.iter().collect();
    let x0 = stack(&refs, frames);
    let captions: Vec<Option<&str>> = held.iter().map(|c| Some(c.caption.as_str())).collect();
    let text = vocab.batch(&captions, text_len, device)?;
    let cond = Condition {
        text,
        first_frame: None,
    };
    let mut rng = Rng::new(0x5EED);
    let noise: Vec<f32> = (0..x0.dims().iter().product::<usize>())
        .map(|_| rng.normal() as f32)
        .collect();
    let eps = Tensor::<5>::from_data(TensorData::new(noise, x0.dims()), device);
    let mut total = 0.0;
    let steps = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9];
    for t in steps {
        let tt = Tensor::<1>::full([held.len()], t, device);
        let xt = flow::interpolate(x0.clone(), eps.clone(), tt.clone());
        let v = dit.forward(xt, tt, &cond)?;
        total += scalar(flow::loss(v, x0.clone(), eps.clone()));
    }
    Ok(total / steps.len() as f64)
}

/// What a DiT run reports per stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageReport {
    /// Stage name.
    pub name: String,
    /// Mean training loss of its last 10 steps.
    pub final_loss: f64,
    /// Validation loss at its end (its frames).
    pub validation_loss: f64,
    /// Latent frames of its video batches.
    pub frames: usize,
}

/// A DiT in training on one rank: the model, single-rank AdamW (no weight decay, gradients
/// clipped to norm 1), the weight average and the seeded generator of every draw.
pub struct DitTrainer {
    config: DitTrainingConfig,
    dit_config: DitConfig,
    vocab: Vocabulary,
    device: Device,
    dit: Option<Dit>,
    opt: DistributedAdamW,
    ema: Option<Ema>,
    rng: Rng,
    step: usize,
}

impl DitTrainer {
    /// A new DiT of `dit_config` on `device` (with autodiff) for captions of `vocab`; seeds
    /// the device's generator with `config.seed`, so a run repeats bit for bit (Burn's
    /// generator belongs to the process: other threads drawing random tensors meanwhile take
    /// draws of this run).
    pub fn new(
        dit_config: DitConfig,
        config: DitTrainingConfig,
        vocab: Vocabulary,
        device: &Device,
    ) -> Result<Self> {
        let Some(first) = config.stages.first() else {
            return Err(invalid("stages", "needs at least one stage"));
        };
        if !(0.0..1.0).contains(&config.caption_dropout) {
            return Err(invalid("caption_dropout", "must be in [0, 1)"));
        }
        // The initialisation and the noise of every step (`Tensor::random`) come from the
        // device's generator: seeded, a run is reproducible.
        device.seed(config.seed);
        let dit = dit_config.init(device)?;
        let opt = DistributedAdamW::single_rank(AdamWConfig {
            lr: first.lr,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
            ..AdamWConfig::default()
        })?;
        let ema = match &config.ema {
            Some(e) => Some(Ema::new(e.decay, &dit)?),
            None => None,
        };
        Ok(Self {
            rng: Rng::new(config.seed),
            config,
            dit_config,
            vocab,
            device: device.clone(),
            dit: Some(dit),
            opt,
            ema,
            step: 0,
        })
    }

    fn gone() -> VideoError {
        invalid("dit", "an earlier step failed and took the model with it")
    }

    /// The model being trained.
    pub fn dit(&self) -> Result<&Dit> {
        self.dit.as_ref().ok_or_else(Self::gone)
    }

    /// The model with the averaged weights where there is an average (what is evaluated,
    /// sampled and saved).
    pub fn averaged(&self) -> Result<Dit> {
        averaged(self.ema.as_ref(), self.dit()?.clone())
    }

    /// Optimizer steps taken.
    pub fn steps(&self) -> usize {
        self.step
    }

    /// The caption vocabulary.
    pub fn vocab(&self) -> &Vocabulary {
        &self.vocab
    }

    /// One flow-matching step on `picked` at `lr`, then the weight average's update.
    fn flow_step(&mut self, picked: &[&LatentClip], frames: usize, lr: f64) -> Result<f64> {
        let dit = self.dit.take().ok_or_else(Self::gone)?;
        let (next, value) = flow_step(
            &self.config,
            (dit, &mut self.opt),
            (picked, frames, lr),
            (&self.vocab, &mut self.rng, &self.device),
        )?;
        if let Some(e) = &mut self.ema {
            e.update(&next)?;
        }
        self.dit = Some(next);
        self.step += 1;
        Ok(value)
    }

    /// Runs every stage of the curriculum on the `train` clips, telling `observer` of each
    /// stage, step and stage report; after each stage, the validation loss of the (averaged)
    /// model on the `held` clips at the stage's frames, on the CPU backend.
    pub fn curriculum(
        &mut self,
        train: &[LatentClip],
        held: &[LatentClip],
        mut observer: impl FnMut(DitEvent<'_>) -> Result<()>,
    ) -> Result<Vec<StageReport>> {
        let eval_device = Device::flex();
        let held_eval: Vec<LatentClip> = held.iter().map(|c| c.to_device(&eval_device)).collect();
        let stages = self.config.stages.clone();
        let mut reports = Vec::new();
        for (index, stage) in stages.iter().enumerate() {
            observer(DitEvent::Stage { index, stage })?;
            let mut losses = Vec::new();
            for s in 0..stage.steps {
                let kind = batch_kind(stage, &mut self.rng);
                let picked = pick(train, stage.batch, &mut self.rng);
                let lr = stage.lr_at(s);
                let loss = self
                    .flow_step(&picked, kind.frames(), lr)
                    .map_err(|e| match e {
                        VideoError::NonFiniteLoss { value, advice, .. } => {
                            VideoError::NonFiniteLoss {
                                what: format!(
                                    "the loss at step {} (stage {})",
                                    self.step + 1,
                                    stage.name
                                ),
                                value,
                                advice,
                            }
                        }
                        other => other,
                    })?;
                losses.push(loss);
                let frames = kind.frames();
                let step = self.step;
                observer(DitEvent::Step {
                    step,
                    stage,
                    frames,
                    loss,
                    lr,
                })?;
            }
            let valid = self.averaged()?.valid();
            let text_len = self.config.text_len;
            let validation_loss = validation_loss(
                &valid,
                &held_eval,
                &self.vocab,
                text_len,
                stage.frames,
                &eval_device,
            )?;
            let report = StageReport {
                name: stage.name.clone(),
                final_loss: tail_mean(&losses),
                validation_loss,
                frames: stage.frames,
            };
            observer(DitEvent::StageDone(&report))?;
            reports.push(report);
        }
        Ok(reports)
    }

    /// Writes the (averaged) model and the optimizer state as a checkpoint of `run_dir`
    /// after the steps taken; returns its folder.
    pub fn save(&self, run_dir: &Path) -> Result<PathBuf> {
        let meta = TrainingMeta {
            step: self.step,
            world: 1,
            next_sequence: 0,
            seed: self.config.seed,
            layout: None,
        };
        let comm = burn_parallel::comm::SingleRank::new();
        let dit = self.averaged()?;
        Ok(checkpoint::save(
            run_dir,
            &meta,
            &dit,
            &self.opt.state()?,
            &comm,
            1,
        )?)
    }
}

/// Mean of the last ten values (0 for none).
fn tail_mean(v: &[f64]) -> f64 {
    let t = &v[v.len().saturating_sub(10)..];
    t.iter().sum::<f64>() / t.len().max(1) as f64
}

/// `model` with the averaged weights where there is an average.
fn averaged<M: Module>(ema: Option<&Ema>, model: M) -> Result<M> {
    match ema {
        Some(e) => Ok(e.apply(model)?),
        None => Ok(model),
    }
}

/// `n` training clips drawn with replacement.
fn pick<'a>(clips: &'a [LatentClip], n: usize, rng: &mut Rng) -> Vec<&'a LatentClip> {
    (0..n).map(|_| &clips[rng.below(clips.len())]).collect()
}

/// Training timesteps `[B]` for latents of `dims` `[B, C, f, h, w]`: logit-normal, shifted
/// for their size and length.
fn timesteps(
    cfg: &DitTrainingConfig,
    dims: [usize; 5],
    rng: &mut Rng,
    device: &Device,
) -> Tensor<1> {
    let [b, _, f, h, w] = dims;
    let r = flow::resolution_shift(h, w, f, cfg.flow.shift_base);
    let ts: Vec<f32> = flow::logit_normal(b, cfg.flow.logit_mean, cfg.flow.logit_std, r, rng)
        .into_iter()
        .map(|t| t as f32)
        .collect();
    Tensor::<1>::from_data(TensorData::new(ts, [b]), device)
}

/// One rectified-flow step on the first `frames` latent frames of `picked`: logit-normal
/// shifted timesteps, fresh noise, caption dropout; returns the updated model and the loss.
fn flow_step(
    cfg: &DitTrainingConfig,
    (dit, opt): (Dit, &mut DistributedAdamW),
    (picked, frames, lr): (&[&LatentClip], usize, f64),
    (vocab, rng, device): (&Vocabulary, &mut Rng, &Device),
) -> Result<(Dit, f64)> {
    let x0 = stack(picked, frames);
    let t = timesteps(cfg, x0.dims(), rng, device);
    let eps = Tensor::<5>::random(x0.dims(), Distribution::Normal(0.0, 1.0), device);
    let captions: Vec<Option<&str>> = picked
        .iter()
        .map(|c| (rng.uniform() >= cfg.caption_dropout).then_some(c.caption.as_str()))
        .collect();
    let text = vocab.batch(&captions, cfg.text_len, device)?;
    let cond = Condition {
        text,
        first_frame: None,
    };
    let xt = flow::interpolate(x0.clone(), eps.clone(), t.clone());
    let (v, aux) = dit.forward_aux(xt, t, &cond)?;
    let loss = flow::loss(v, x0, eps);
    let value = scalar(loss.clone());
    // The MoE load-balancing loss joins the gradient, not the reported flow loss.
    let loss = match aux {
        Some(a) => loss + a,
        None => loss,
    };
    if !value.is_finite() {
        return Err(VideoError::NonFiniteLoss {
            what: "the loss".into(),
            value,
            advice: "lower the learning rate",
        });
    }
    let mut grads = GradientBuffer::new();
    grads.add(&dit, &loss.backward())?;
    opt.set_lr(lr);
    let roles = replicated_roles(&dit);
    Ok((opt.step_buffered(dit, grads, &roles)?.0, value))
}
