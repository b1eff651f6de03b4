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

/// `[post]`: post-training after the curriculum: supervised fine-tuning on a curated subset,
/// then Diffusion-DPO on pairs of the model's own samples ranked by the rule-based checker,
/// with the checker's accuracy measured before and after.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostConfig {
    /// A manifest (`burn-recipes data scan`, usually with stricter filters): SFT uses the
    /// training clips it accepts; all training clips without one.
    #[serde(default)]
    pub sft_manifest: Option<PathBuf>,
    /// SFT steps.
    pub sft_steps: usize,
    /// SFT learning rate.
    pub sft_lr: f64,
    /// Prompts sampled twice for preference pairs (pairs whose checker scores tie are dropped).
    pub prompts: usize,
    /// DPO steps.
    pub dpo_steps: usize,
    /// DPO learning rate.
    pub dpo_lr: f64,
    /// DPO β.
    pub beta: f64,
    /// Samples per step (SFT and DPO pairs).
    pub batch: usize,
    /// Synthetic-label prompts sampled to measure the checker's accuracy.
    pub eval_prompts: usize,
    /// Euler steps when sampling.
    #[serde(default = "sample_steps")]
    pub sample_steps: usize,
    /// Classifier-free guidance when sampling.
    #[serde(default = "guidance")]
    pub guidance: f64,
}

fn sample_steps() -> usize {
    20
}

fn guidance() -> f64 {
    4.0
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

/// The rule-based checker's accuracy on sampled clips.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Accuracy {
    /// Prompts sampled.
    pub prompts: usize,
    /// Share with the asked motion direction.
    pub direction: f64,
    /// Share with the asked colour.
    pub colour: f64,
    /// Share with the asked object count.
    pub count: f64,
}

/// What post-training reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PostReport {
    /// Clips in the SFT subset.
    pub sft_clips: usize,
    /// Mean SFT loss of its last 10 steps.
    pub sft_loss: f64,
    /// Flow-matching loss on (up to 64 of) the SFT clips at fixed timesteps and noise, before
    /// SFT (what SFT must lower).
    #[serde(default)]
    pub sft_flow_before: f64,
    /// The same after SFT.
    #[serde(default)]
    pub sft_flow_after: f64,
    /// Preference pairs kept (checker scores differ).
    pub pairs: usize,
    /// Mean DPO loss of its last 10 steps (log 2 at the start).
    pub dpo_loss: f64,
    /// Mean implicit-reward margin of the preferred over the rejected sample of each pair,
    /// `−β·((e_w − e_w^ref) − (e_l − e_l^ref))` at fixed timesteps and noise, before DPO (0:
    /// the policy is the reference).
    #[serde(default)]
    pub dpo_margin_before: f64,
    /// The same after DPO (what DPO must raise).
    #[serde(default)]
    pub dpo_margin_after: f64,
    /// Checker accuracy after the curriculum.
    pub before: Accuracy,
    /// After SFT.
    pub after_sft: Accuracy,
    /// After DPO.
    pub after_dpo: Accuracy,
}

/// What post-training reads besides its configuration: the cache's VAE (to decode samples
/// for the checker), the training clips, the cache's metadata and the latent frames of the
/// samples (the last stage's).
#[derive(Debug, Clone, Copy)]
pub struct PostInputs<'a> {
    /// The cache's VAE.
    pub vae: &'a crate::vae::Vae,
    /// The training clips.
    pub train: &'a [LatentClip],
    /// The cache's metadata.
    pub meta: &'a CacheMeta,
    /// Latent frames of the samples.
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
        };
        let comm = burn_parallel::comm::SingleRank::new();
        let dit = self.averaged()?;
        Ok(checkpoint::save(
            run_dir,
            &meta,
            &dit,
            &self.opt.state(),
            &comm,
            1,
        )?)
    }

    /// A sampler of this trainer's model shape for `inputs` with `post`'s sampling settings.
    fn sampler<'a>(&'a self, post: &PostConfig, inputs: &PostInputs<'a>) -> Sampler<'a> {
        let [_, _, h, w] = inputs
            .train
            .first()
            .map(|c| c.latent.dims())
            .unwrap_or([0; 4]);
        Sampler {
            vae: inputs.vae,
            vocab: &self.vocab,
            meta: inputs.meta,
            config: &self.dit_config,
            shift_base: self.config.flow.shift_base,
            shape: (inputs.frames, h, w),
            steps: post.sample_steps,
            guidance: post.guidance,
        }
    }

    /// Post-training: SFT on the clips `post.sft_manifest` accepts (all training clips
    /// without one), then Diffusion-DPO on checker-ranked pairs of the model's own samples
    /// against the frozen SFT model; the checker's accuracy before, after SFT and after DPO.
    /// With a weight average, the accuracies and the DPO reference use it, each phase starts
    /// from it and it keeps being updated.
    pub fn post_train(&mut self, post: &PostConfig, inputs: &PostInputs<'_>) -> Result<PostReport> {
        let start = self.averaged()?;
        self.dit = Some(start);
        let before = self.accuracy(post, inputs)?;
        tracing::info!(?before, "checker accuracy after the curriculum");
        let curated = curate(post, inputs.train)?;
        let flow_inputs = (&self.vocab, self.config.text_len, inputs.frames);
        let sft_flow_before = fixed_flow_loss(&self.dit()?.valid(), &curated, flow_inputs)?;
        let mut rng = Rng::new(self.config.seed ^ 0x5F7);
        let mut sft_losses = Vec::new();
        for _ in 0..post.sft_steps {
            let picked = pick(&curated, post.batch, &mut rng);
            std::mem::swap(&mut self.rng, &mut rng);
            let value = self.flow_step(&picked, inputs.frames, post.sft_lr);
            std::mem::swap(&mut self.rng, &mut rng);
            sft_losses.push(value?);
        }
        self.dit = Some(self.averaged()?);
        let flow_inputs = (&self.vocab, self.config.text_len, inputs.frames);
        let sft_flow_after = fixed_flow_loss(&self.dit()?.valid(), &curated, flow_inputs)?;
        tracing::info!(
            before = sft_flow_before,
            after = sft_flow_after,
            "flow loss on the SFT clips"
        );
        let after_sft = self.accuracy(post, inputs)?;
        tracing::info!(?after_sft, "checker accuracy after SFT");
        let reference = self.dit()?.valid();
        let pairs = preference_pairs(
            &self.sampler(post, inputs),
            &reference,
            &curated,
            post.prompts,
            &mut rng,
        )?;
        tracing::info!(
            pairs = pairs.len(),
            prompts = post.prompts,
            "preference pairs"
        );
        let margin_inputs = (&self.vocab, self.config.text_len);
        let dpo_margin_before = dpo_margin(
            (&self.dit()?.valid(), &reference),
            &pairs,
            post.beta,
            margin_inputs,
        )?;
        let dit = self.dit.take().ok_or_else(Self::gone)?;
        let (next, dpo_losses) = dpo_steps(
            &self.config,
            post,
            (dit, &mut self.opt, self.ema.as_mut()),
            &reference,
            &pairs,
            (&self.vocab, &mut rng),
        )?;
        self.dit = Some(averaged(self.ema.as_ref(), next)?);
        let margin_inputs = (&self.vocab, self.config.text_len);
        let dpo_margin_after = dpo_margin(
            (&self.dit()?.valid(), &reference),
            &pairs,
            post.beta,
            margin_inputs,
        )?;
        tracing::info!(
            before = dpo_margin_before,
            after = dpo_margin_after,
            "implicit-reward margin of the preference pairs"
        );
        let after_dpo = self.accuracy(post, inputs)?;
        tracing::info!(?after_dpo, "checker accuracy after DPO");
        self.step += if pairs.is_empty() { 0 } else { post.dpo_steps };
        Ok(PostReport {
            sft_clips: curated.len(),
            sft_loss: tail_mean(&sft_losses),
            sft_flow_before,
            sft_flow_after,
            pairs: pairs.len(),
            dpo_loss: tail_mean(&dpo_losses),
            dpo_margin_before,
            dpo_margin_after,
            before,
            after_sft,
            after_dpo,
        })
    }

    /// The checker's accuracy of the current model on `post.eval_prompts` prompts.
    fn accuracy(&self, post: &PostConfig, inputs: &PostInputs<'_>) -> Result<Accuracy> {
        let dit = self.dit()?.valid();
        self.sampler(post, inputs)
            .accuracy(&dit, post.eval_prompts, EVAL_SEED)
    }
}

/// Mean of the last ten values (0 for none).
fn tail_mean(v: &[f64]) -> f64 {
    let t = &v[v.len().saturating_sub(10)..];
    t.iter().sum::<f64>() / t.len().max(1) as f64
}

/// The training clips the SFT manifest accepts (all of them without one).
fn curate(post: &PostConfig, train: &[LatentClip]) -> Result<Vec<LatentClip>> {
    let curated: Vec<LatentClip> = match &post.sft_manifest {
        Some(m) => {
            let accepted: std::collections::HashSet<PathBuf> = crate::pipeline::read_manifest(m)?
                .into_iter()
                .filter(|e| e.accepted)
                .map(|e| e.clip)
                .collect();
            train
                .iter()
                .filter(|c| accepted.contains(&c.clip))
                .cloned()
                .collect()
        }
        None => train.to_vec(),
    };
    if curated.is_empty() {
        return Err(invalid(
            "sft_manifest",
            "accepts none of the training clips",
        ));
    }
    Ok(curated)
}

/// Preference pairs: each of `prompts` captions drawn from `curated` sampled by `reference`
/// with two seeds, ranked by how many of colour, direction and count the checker confirms;
/// ties are dropped. Captions must be the synthetic generator's (the checker needs the label).
fn preference_pairs(
    sampler: &Sampler<'_>,
    reference: &Dit,
    curated: &[LatentClip],
    prompts: usize,
    rng: &mut Rng,
) -> Result<Vec<Pair>> {
    use crate::checker::check;
    use crate::synthetic::Label;
    let device = Device::flex().autodiff();
    let captions: Vec<String> = curated.iter().map(|c| c.caption.clone()).collect();
    let mut pairs: Vec<Pair> = Vec::new();
    for i in 0..prompts {
        let caption = &captions[rng.below(captions.len())];
        let Some(label) = Label::parse(caption) else {
            return Err(invalid(
                "captions",
                format!(
                    "caption {caption:?} is not a synthetic-generator caption; DPO needs its label"
                ),
            ));
        };
        let (z, clips) = sampler.sample(
            reference,
            &[caption.as_str(), caption.as_str()],
            0xD90 + i as u64,
        )?;
        let score = |c: &crate::clip::Clip| {
            let v = check(c, &label);
            usize::from(v.colour) + usize::from(v.direction) + usize::from(v.count)
        };
        let (a, b) = (score(&clips[0]), score(&clips[1]));
        if a == b {
            continue;
        }
        let (w, l) = if a > b { (0, 1) } else { (1, 0) };
        let take = |j: usize| {
            let v = z.clone().narrow(0, j, 1);
            let [_, c, f, h, wd] = v.dims();
            Tensor::<4>::from_data(v.reshape([c, f, h, wd]).into_data(), &device)
        };
        pairs.push((take(w), take(l), caption.clone()));
    }
    Ok(pairs)
}

/// `model` with the averaged weights where there is an average.
fn averaged<M: Module>(ema: Option<&Ema>, model: M) -> Result<M> {
    match ema {
        Some(e) => Ok(e.apply(model)?),
        None => Ok(model),
    }
}

/// Decodes normalised latents `[B, C, t, h, w]` to clips with `vae` (the VAE that made the
/// cache `meta` describes), `chunk` latent steps at a time.
pub fn decode_with(
    vae: &crate::vae::Vae,
    meta: &CacheMeta,
    z: Tensor<5>,
    chunk: usize,
) -> Result<Vec<crate::clip::Clip>> {
    let device = z.device();
    let c = meta.latent_channels;
    let stat = |v: &[f64]| {
        Tensor::<1>::from_data(
            TensorData::new(v.iter().map(|&x| x as f32).collect::<Vec<_>>(), [c]),
            &device,
        )
        .reshape([1, c, 1, 1, 1])
    };
    let z = z * stat(&meta.latent_std) + stat(&meta.latent_mean);
    let b = z.dims()[0];
    (0..b)
        .map(|i| {
            let x = vae.decode_chunked(z.clone().narrow(0, i, 1), chunk);
            crate::tensor::to_clip(x)
        })
        .collect()
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

/// Noise seed of the checker-accuracy samples during post-training.
const EVAL_SEED: u64 = 0xE7A1;

/// Samples captions with a DiT and decodes them with the VAE of its latent cache.
pub struct Sampler<'a> {
    /// The cache's VAE.
    pub vae: &'a crate::vae::Vae,
    /// The caption vocabulary.
    pub vocab: &'a Vocabulary,
    /// The cache's metadata (latent statistics).
    pub meta: &'a CacheMeta,
    /// The DiT's configuration (widths for the memory check; caption length).
    pub config: &'a DitConfig,
    /// Latent side at which the resolution shift is 1 ([`FlowConfig::shift_base`]).
    pub shift_base: usize,
    /// Latent frames, height and width.
    pub shape: (usize, usize, usize),
    /// Euler steps.
    pub steps: usize,
    /// Classifier-free guidance scale (1: none).
    pub guidance: f64,
}

impl Sampler<'_> {
    /// The normalised latents and decoded clips of `captions` from noise `seed`.
    pub fn sample(
        &self,
        dit: &Dit,
        captions: &[&str],
        seed: u64,
    ) -> Result<(Tensor<5>, Vec<crate::clip::Clip>)> {
        let z = self.latents(dit, captions, seed)?;
        let clips = decode_with(self.vae, self.meta, z.clone(), 4)?;
        Ok((z, clips))
    }

    /// Normalised latents `[B, C, frames, h, w]` for `captions`: Euler steps from noise `seed`
    /// with classifier-free guidance against the null caption.
    pub fn latents(&self, dit: &Dit, captions: &[&str], seed: u64) -> Result<Tensor<5>> {
        let device = Device::flex();
        let (frames, h, w) = self.shape;
        let b = captions.len();
        self.check_memory(b)?;
        let c = dit.latent_channels();
        let mut rng = Rng::new(seed);
        let noise: Vec<f32> = (0..b * c * frames * h * w)
            .map(|_| rng.normal() as f32)
            .collect();
        let x1 = Tensor::<5>::from_data(TensorData::new(noise, [b, c, frames, h, w]), &device);
        let texts: Vec<Option<&str>> = captions.iter().map(|c| Some(*c)).collect();
        let text = |t: &[Option<&str>]| self.vocab.batch(t, self.config.text_len, &device);
        let cond = Condition {
            text: text(&texts)?,
            first_frame: None,
        };
        let null = Condition {
            text: text(&vec![None; b])?,
            first_frame: None,
        };
        let guidance = self.guidance;
        let r = flow::resolution_shift(h, w, frames, self.shift_base);
        flow::euler(x1, self.steps, r, |x, t| {
            let tt = Tensor::<1>::full([b], t, &device);
            let vc = dit.forward(x.clone(), tt.clone(), &cond)?;
            if (guidance - 1.0).abs() < f64::EPSILON {
                return Ok(vc);
            }
            let vu = dit.forward(x, tt, &null)?;
            Ok(flow::guided(vc, vu, guidance))
        })
    }

    /// Bytes a [`Sampler::sample`] of `batch` captions allocates at its peak, f32 throughout:
    /// one DiT forward's attention scores (`batch · heads · N²` for `N` video tokens, three
    /// alive: scores, scaled, softmax) and token activations (QKV, the MLP's hidden layer and
    /// residual copies), the latents of the Euler step (noise, state, the two velocities and
    /// their guided mix), one clip decoded at a time and all decoded clips as 8-bit RGB.
    pub fn memory_bytes(&self, batch: usize) -> u64 {
        let (frames, h, w) = self.shape;
        let (ft, fs) = self.vae.factors();
        let f = |v: usize| v as f64;
        let tokens = f(frames) * f(h.div_ceil(2)) * f(w.div_ceil(2));
        let m = self.config;
        let attention = f(batch) * f(m.heads) * tokens * tokens * 3.0;
        let activations = f(batch) * tokens * f(m.hidden) * (3.0 + 2.0 * f(m.mlp_ratio) + 4.0);
        let latents = 6.0 * f(batch) * f(self.vae.latent_channels()) * f(frames) * f(h) * f(w);
        let video_frames = f(1 + frames.saturating_sub(1) * ft);
        let pixels = video_frames * f(h * fs) * f(w * fs) * 3.0;
        let floats = attention + activations + latents + 2.0 * pixels;
        (floats * 4.0 + f(batch) * pixels).min(u64::MAX as f64) as u64
    }

    /// Refuses, before allocating, a sampling run [`Sampler::memory_bytes`] says cannot fit in
    /// this machine's available memory, stating both numbers.
    pub fn check_memory(&self, batch: usize) -> Result<()> {
        let need = self.memory_bytes(batch);
        let Some(have) = burn_parallel::memory::available() else {
            return Ok(());
        };
        if need <= have {
            return Ok(());
        }
        let (frames, h, w) = self.shape;
        Err(VideoError::OutOfMemory {
            what: format!(
                "sampling {batch} clip(s) of {frames} latent frames at {h}x{w} (attention over \
                 {} video tokens)",
                frames * h.div_ceil(2) * w.div_ceil(2)
            ),
            need,
            have,
        })
    }

    /// The rule-based checker's accuracy on the captions of the first `prompts` synthetic
    /// labels (they repeat after 144), sampled 16 at a time from noise `seed + chunk`.
    pub fn accuracy(&self, dit: &Dit, prompts: usize, seed: u64) -> Result<Accuracy> {
        use crate::checker::check;
        use crate::synthetic::Label;
        let labels: Vec<Label> = (0..prompts).map(Label::nth).collect();
        let captions: Vec<String> = labels.iter().map(Label::caption).collect();
        let (mut direction, mut colour, mut count) = (0usize, 0usize, 0usize);
        for (k, (chunk, labels)) in captions.chunks(16).zip(labels.chunks(16)).enumerate() {
            let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
            // Each chunk its own noise: prompts past the 144 labels repeat a label, not a sample.
            let (_, clips) = self.sample(dit, &refs, seed.wrapping_add(k as u64))?;
            for (clip, label) in clips.iter().zip(labels) {
                let v = check(clip, label);
                direction += usize::from(v.direction);
                colour += usize::from(v.colour);
                count += usize::from(v.count);
            }
        }
        let n = prompts.max(1) as f64;
        Ok(Accuracy {
            prompts,
            direction: direction as f64 / n,
            colour: colour as f64 / n,
            count: count as f64 / n,
        })
    }
}

/// The flow-matching loss of `dit` on up to 64 of `clips` (the first ones) at the fixed
/// timesteps and noise of [`validation_loss`], 16 clips at a time, on the CPU backend.
fn fixed_flow_loss(
    dit: &Dit,
    clips: &[LatentClip],
    (vocab, text_len, frames): (&Vocabulary, usize, usize),
) -> Result<f64> {
    let device = Device::flex();
    let clips: Vec<LatentClip> = clips
        .iter()
        .take(64)
        .map(|c| LatentClip {
            clip: c.clip.clone(),
            latent: Tensor::from_data(c.latent.to_data(), &device),
            caption: c.caption.clone(),
        })
        .collect();
    let mut total = 0.0;
    for chunk in clips.chunks(16) {
        let loss = validation_loss(dit, chunk, vocab, text_len, frames, &device)?;
        total += loss * chunk.len() as f64;
    }
    Ok(total / clips.len().max(1) as f64)
}

/// A preference pair: preferred and rejected latents `[C, f, h, w]` and their caption.
pub type Pair = (Tensor<4>, Tensor<4>, String);

/// Per-sample velocity errors `[B]` of `model` on latents `x0` at timesteps `t` with noise
/// `eps`, conditioned on `cond`; every input is moved to `on`.
fn velocity_errors(
    model: &Dit,
    (x0, eps, t): (&Tensor<5>, &Tensor<5>, &Tensor<1>),
    cond: &Condition,
    on: &Device,
) -> Result<Tensor<1>> {
    let x0 = Tensor::<5>::from_data(x0.to_data(), on);
    let e = Tensor::<5>::from_data(eps.to_data(), on);
    let tt = Tensor::<1>::from_data(t.to_data(), on);
    let c = Condition {
        text: crate::dit::Text {
            ids: Tensor::from_data(cond.text.ids.to_data(), on),
            mask: Tensor::from_data(cond.text.mask.to_data(), on),
        },
        first_frame: None,
    };
    let xt = flow::interpolate(x0.clone(), e.clone(), tt.clone());
    let v = model.forward(xt, tt, &c)?;
    Ok(flow::per_sample_error(v, flow::velocity(x0, e)))
}

/// The mean implicit-reward margin `−β·((e_w − e_w^ref) − (e_l − e_l^ref))` of `policy` over
/// `pairs`, at the timesteps 0.25, 0.5 and 0.75 with noise fixed per pair, on the CPU backend.
pub fn dpo_margin(
    (policy, reference): (&Dit, &Dit),
    pairs: &[Pair],
    beta: f64,
    (vocab, text_len): (&Vocabulary, usize),
) -> Result<f64> {
    let device = Device::flex();
    let mut rng = Rng::new(0xD9A);
    let mut total = 0.0;
    let mut n = 0usize;
    for (w, l, caption) in pairs {
        let dims = w.dims();
        let noise: Vec<f32> = (0..dims.iter().product::<usize>())
            .map(|_| rng.normal() as f32)
            .collect();
        let eps = Tensor::<4>::from_data(TensorData::new(noise, dims), &device).unsqueeze_dim(0);
        let text = vocab.batch(&[Some(caption.as_str())], text_len, &device)?;
        let cond = Condition {
            text,
            first_frame: None,
        };
        let (xw, xl) = (w.clone().unsqueeze_dim(0), l.clone().unsqueeze_dim(0));
        for t in [0.25, 0.5, 0.75] {
            let t = Tensor::<1>::full([1], t, &device);
            let err = |m: &Dit, x: &Tensor<5>| {
                velocity_errors(m, (x, &eps, &t), &cond, &device).map(scalar)
            };
            let (pw, pl) = (err(policy, &xw)?, err(policy, &xl)?);
            let (rw, rl) = (err(reference, &xw)?, err(reference, &xl)?);
            total += -beta * ((pw - rw) - (pl - rl));
            n += 1;
        }
    }
    Ok(total / n.max(1) as f64)
}

/// `post.dpo_steps` Diffusion-DPO steps on `pairs` (batches of `post.batch` drawn with
/// replacement; the recipe's shifted logit-normal timesteps, fresh noise) against the frozen
/// `reference`, updating the weight average when there is one. Returns the model and each
/// step's loss; with no pairs it returns the model unchanged and no loss.
pub fn dpo_steps(
    cfg: &DitTrainingConfig,
    post: &PostConfig,
    (mut dit, opt, mut ema): (Dit, &mut DistributedAdamW, Option<&mut Ema>),
    reference: &Dit,
    pairs: &[Pair],
    (vocab, rng): (&Vocabulary, &mut Rng),
) -> Result<(Dit, Vec<f64>)> {
    let device = Device::flex().autodiff();
    let plain = Device::flex();
    let mut dpo_losses = Vec::new();
    if pairs.is_empty() {
        return Ok((dit, dpo_losses));
    }
    for _ in 0..post.dpo_steps {
        let batch: Vec<&Pair> = (0..post.batch)
            .map(|_| &pairs[rng.below(pairs.len())])
            .collect();
        let stack4 = |sel: &dyn Fn(&Pair) -> Tensor<4>| {
            Tensor::cat(
                batch
                    .iter()
                    .map(|p| {
                        Tensor::<4>::from_data(sel(p).to_data(), &device).unsqueeze_dim::<5>(0)
                    })
                    .collect(),
                0,
            )
        };
        let xw = stack4(&|p| p.0.clone());
        let xl = stack4(&|p| p.1.clone());
        let t = timesteps(cfg, xw.dims(), rng, &device);
        let eps = Tensor::<5>::random(xw.dims(), Distribution::Normal(0.0, 1.0), &device);
        let captions: Vec<Option<&str>> = batch.iter().map(|p| Some(p.2.as_str())).collect();
        let text = vocab.batch(&captions, cfg.text_len, &device)?;
        let cond = Condition {
            text,
            first_frame: None,
        };
        let errors = |model: &Dit, x0: &Tensor<5>, on: &Device| {
            velocity_errors(model, (x0, &eps, &t), &cond, on)
        };
        let ref_w = Tensor::<1>::from_data(errors(reference, &xw, &plain)?.into_data(), &device);
        let ref_l = Tensor::<1>::from_data(errors(reference, &xl, &plain)?.into_data(), &device);
        let loss = flow::dpo_loss(
            errors(&dit, &xw, &device)?,
            errors(&dit, &xl, &device)?,
            ref_w,
            ref_l,
            post.beta,
        );
        let value = scalar(loss.clone());
        if !value.is_finite() {
            return Err(VideoError::NonFiniteLoss {
                what: "the DPO loss".into(),
                value,
                advice: "lower the DPO learning rate or beta",
            });
        }
        let mut grads = GradientBuffer::new();
        grads.add(&dit, &loss.backward())?;
        opt.set_lr(post.dpo_lr);
        let roles = replicated_roles(&dit);
        dit = opt.step_buffered(dit, grads, &roles)?.0;
        if let Some(e) = ema.as_deref_mut() {
            e.update(&dit)?;
        }
        dpo_losses.push(value);
    }
    Ok((dit, dpo_losses))
}
