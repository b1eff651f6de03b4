//! DiT recipes: `burn-recipes train` on a recipe with a `[dit]` table trains burn-video's DiT
//! with rectified flow on cached VAE latents (`burn-recipes data cache`) through curriculum
//! stages (`[[stage]]`: images only, then short clips, then longer ones, each with its own
//! steps, learning rate, batch and image/video mix), logging every stage switch and a
//! flow-matching validation loss at fixed timesteps after each stage; `burn-recipes sample`
//! generates clips for captions.
//!
//! Images are the first latent frame of a clip (a causal VAE encodes the first frame alone),
//! a clip of `f` latent frames is the first `f` of its cache; a batch holds one shape (bucket).

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::Module;
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use burn_parallel::prelude::{DistributedAdamW, GradientBuffer, replicated_roles};
use burn_video::dit::{Condition, Dit, DitConfig};
use burn_video::flow::{self, Rng};
use burn_video::text::Vocabulary;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, Meta};
use crate::error::{RecipeError, Result};
use crate::latents::{CacheMeta, CachedClip, read_cache, read_latent};
use crate::recipe::{RunConfig, bad, load_file};
use crate::rundir::{refuse_existing, single_rank_adamw, start};
use crate::video::keyed;
use burn_parallel::ema::Ema;
use burn_parallel::lr_schedule::LrSchedule;
use burn_video::tensor::scalar;

/// `[dit]`: the transformer (latent channels and vocabulary come from the data).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DitModel {
    /// Width.
    pub hidden: usize,
    /// Blocks.
    pub depth: usize,
    /// Heads (`hidden / heads` a multiple of 6).
    pub heads: usize,
    /// MLP width / hidden.
    #[serde(default = "four")]
    pub mlp_ratio: usize,
    /// Longest caption in words.
    #[serde(default = "eight")]
    pub text_len: usize,
    /// RoPE base: small grids (a few latent frames and rows) need a small one, or all but the
    /// fastest frequencies barely turn across them.
    #[serde(default = "rope_base")]
    pub rope_base: f64,
    /// Mixture-of-experts FFNs (MoE-DiT, burn-moe): `[dit.moe]` with `experts`, `top_k`,
    /// `ffn_hidden`, `aux_loss`.
    #[serde(default)]
    pub moe: Option<burn_video::dit::MoeFfn>,
    /// Add the pooled caption to the AdaLN conditioning (beside the cross-attention).
    #[serde(default)]
    pub pooled_text: bool,
}

fn four() -> usize {
    4
}

fn eight() -> usize {
    8
}

fn rope_base() -> f64 {
    10_000.0
}

/// `[data]`: the latent cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DitData {
    /// A latent cache folder (`burn-recipes data cache`); its clips need captions.
    pub latents: PathBuf,
    /// Share of captions replaced by the null caption in training (classifier-free guidance).
    #[serde(default = "dropout")]
    pub caption_dropout: f64,
    /// Every this-many-th clip is held out for the validation loss.
    pub holdout_every: usize,
}

fn dropout() -> f64 {
    0.1
}

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

/// A DiT recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DitRecipe {
    /// Run folder and seed.
    pub run: RunConfig,
    /// The transformer.
    pub dit: DitModel,
    /// The latents.
    pub data: DitData,
    /// Timestep sampling.
    #[serde(default = "FlowConfig::default_values")]
    pub flow: FlowConfig,
    /// The curriculum.
    pub stage: Vec<Stage>,
    /// Weight averaging (optional).
    #[serde(default)]
    pub ema: Option<EmaConfig>,
    /// Post-training (optional).
    #[serde(default)]
    pub post: Option<PostConfig>,
}

impl FlowConfig {
    fn default_values() -> Self {
        Self {
            logit_mean: 0.0,
            logit_std: 1.0,
            shift_base: base(),
        }
    }
}

pub use crate::recipe::is_dit_recipe;

impl DitRecipe {
    /// Reads a recipe file and applies `--set` overrides.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let recipe: Self = load_file(path, overrides)?;
        recipe.validate()?;
        Ok(recipe)
    }

    /// Checks every value that does not need the data; errors name the key.
    pub fn validate(&self) -> Result<()> {
        if self.stage.is_empty() {
            return Err(bad("stage", "needs at least one [[stage]]"));
        }
        for (i, s) in self.stage.iter().enumerate() {
            let key = |k: &str| format!("stage[{i}].{k}");
            for (k, v) in [("steps", s.steps), ("batch", s.batch), ("frames", s.frames)] {
                if v == 0 {
                    return Err(bad(&key(k), "must be at least 1"));
                }
            }
            if !(s.lr.is_finite() && s.lr > 0.0) {
                return Err(bad(&key("lr"), "must be a positive number"));
            }
            if s.warmup_steps > s.steps {
                return Err(bad(&key("warmup_steps"), "exceeds the stage's steps"));
            }
            if !(0.0..=1.0).contains(&s.image_ratio) {
                return Err(bad(&key("image_ratio"), "must be in [0, 1]"));
            }
            if let Some(min) = s.min_lr
                && !(min.is_finite() && (0.0..=s.lr).contains(&min))
            {
                return Err(bad(&key("min_lr"), "must be a number in [0, lr]"));
            }
        }
        if let Some(e) = &self.ema
            && !(0.0..1.0).contains(&e.decay)
        {
            return Err(bad("ema.decay", "must be in [0, 1)"));
        }
        if !(0.0..1.0).contains(&self.data.caption_dropout) {
            return Err(bad("data.caption_dropout", "must be in [0, 1)"));
        }
        if self.data.holdout_every < 2 {
            return Err(bad(
                "data.holdout_every",
                "must be at least 2 (every n-th clip is held out)",
            ));
        }
        if !(self.flow.logit_std.is_finite() && self.flow.logit_std > 0.0) {
            return Err(bad("flow.logit_std", "must be a positive number"));
        }
        if self.flow.shift_base == 0 {
            return Err(bad("flow.shift_base", "must be at least 1"));
        }
        if let Some(p) = &self.post {
            for (k, v) in [
                ("post.batch", p.batch),
                ("post.prompts", p.prompts),
                ("post.eval_prompts", p.eval_prompts),
                ("post.sample_steps", p.sample_steps),
            ] {
                if v == 0 {
                    return Err(bad(k, "must be at least 1"));
                }
            }
            for (k, v) in [
                ("post.sft_lr", p.sft_lr),
                ("post.dpo_lr", p.dpo_lr),
                ("post.beta", p.beta),
                ("post.guidance", p.guidance),
            ] {
                if !(v.is_finite() && v > 0.0) {
                    return Err(bad(k, "must be a positive number"));
                }
            }
        }
        // The data's latent channels and vocabulary are not known yet: the smallest valid ones.
        model_config(&self.dit, 1, 3)
            .validate()
            .map_err(|e| keyed("dit", e))
    }

    /// The stage and step within it of global step `step`.
    pub fn stage_at(&self, step: usize) -> Option<(usize, usize)> {
        let mut start = 0;
        for (i, s) in self.stage.iter().enumerate() {
            if step < start + s.steps {
                return Some((i, step - start));
            }
            start += s.steps;
        }
        None
    }

    /// Total steps of the curriculum.
    pub fn total_steps(&self) -> usize {
        self.stage.iter().map(|s| s.steps).sum()
    }
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

/// Reads the cache: clips split into training and held out, the vocabulary of every caption.
pub fn load_latents(
    data: &DitData,
    device: &Device,
) -> Result<(CacheMeta, Vec<LatentClip>, Vec<LatentClip>, Vocabulary)> {
    let (meta, index) =
        read_cache(&data.latents).map_err(|e| bad("data.latents", e.to_string()))?;
    let missing: Vec<&CachedClip> = index.iter().filter(|c| c.caption.is_none()).collect();
    if let Some(c) = missing.first() {
        return Err(bad(
            "data.latents",
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
            latent: read_latent(&data.latents, entry, device)?,
            caption: entry.caption.clone().unwrap_or_default(),
        };
        if i % data.holdout_every == data.holdout_every - 1 {
            held.push(clip);
        } else {
            train.push(clip);
        }
    }
    if train.is_empty() || held.is_empty() {
        return Err(bad(
            "data.holdout_every",
            format!("{} clips leave no training or held-out clip", index.len()),
        ));
    }
    Ok((meta, train, held, vocab))
}

/// The DiT configuration of a recipe for a cache.
pub fn dit_config(recipe: &DitRecipe, meta: &CacheMeta, vocab: &Vocabulary) -> DitConfig {
    model_config(&recipe.dit, meta.latent_channels, vocab.len())
}

/// The `[dit]` table as a model config for `latent` channels and a `vocab`-word vocabulary.
fn model_config(d: &DitModel, latent: usize, vocab: usize) -> DitConfig {
    DitConfig {
        latent,
        hidden: d.hidden,
        depth: d.depth,
        heads: d.heads,
        mlp_ratio: d.mlp_ratio,
        vocab,
        text_len: d.text_len,
        rope_base: d.rope_base,
        moe: d.moe.clone(),
        pooled_text: d.pooled_text,
    }
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
    let text = vocab
        .batch(&captions, text_len, device)
        .map_err(|e| bad("data.latents", e.to_string()))?;
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
        let v = dit
            .forward(xt, tt, &cond)
            .map_err(|e| bad("dit", e.to_string()))?;
        total += scalar(flow::loss(v, x0.clone(), eps.clone()));
    }
    Ok(total / steps.len() as f64)
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Serialize)]
struct DitMetrics<'a> {
    step: usize,
    stage: &'a str,
    frames: usize,
    loss: f64,
    lr: f64,
    seconds: f64,
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

/// What a DiT run reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DitSummary {
    /// Per stage.
    pub stages: Vec<StageReport>,
    /// Post-training, when the recipe has `[post]`.
    #[serde(default)]
    pub post: Option<PostReport>,
    /// Seconds of training.
    pub seconds: f64,
    /// The vocabulary (for sampling).
    pub vocabulary: Vocabulary,
}

/// Trains a DiT recipe from scratch in its (new) run folder; `on_stage` hears every switch.
pub fn train_dit(recipe: &DitRecipe, mut on_stage: impl FnMut(&Stage)) -> Result<DitSummary> {
    let run = &recipe.run.dir;
    refuse_existing(run, "choose another run.dir")?;
    let device = Device::flex().autodiff();
    let (meta, train, held, vocab) = load_latents(&recipe.data, &device)?;
    let shortest = train
        .iter()
        .chain(&held)
        .map(|c| c.latent.dims()[1])
        .min()
        .unwrap_or(0);
    for (i, s) in recipe.stage.iter().enumerate() {
        if s.frames > shortest {
            return Err(bad(
                &format!("stage[{i}].frames"),
                format!(
                    "{} latent frames; the shortest cached clip has {shortest}",
                    s.frames
                ),
            ));
        }
    }
    for c in train.iter().chain(&held) {
        vocab
            .encode(&c.caption, recipe.dit.text_len)
            .map_err(|e| bad("dit.text_len", e.to_string()))?;
    }
    // Post-training decodes samples with the cache's VAE: load it now, not after the
    // curriculum, so a missing checkpoint is refused before any step.
    let post_setup = match &recipe.post {
        Some(p) => {
            let (_, vae, _) = crate::video::load_vae(&meta.vae_run, Some(&meta.checkpoint))
                .map_err(|e| {
                    bad(
                        "data.latents",
                        format!("the cache's VAE cannot be loaded for post-training: {e}"),
                    )
                })?;
            Some((p, vae))
        }
        None => None,
    };
    let cfg = dit_config(recipe, &meta, &vocab);
    let mut dit = cfg.init(&device).map_err(|e| bad("dit", e.to_string()))?;
    let mut opt = single_rank_adamw(recipe.stage[0].lr, Some(1.0))?;
    let mut ema = match &recipe.ema {
        Some(e) => Some(Ema::new(e.decay, &dit)?),
        None => None,
    };
    let mut metrics = start(run, recipe)?;
    let mut rng = Rng::new(recipe.run.seed);
    let began = Instant::now();
    let mut reports = Vec::new();
    let mut step = 0;
    let eval_device = Device::flex();
    for stage in &recipe.stage {
        on_stage(stage);
        tracing::info!(stage = %stage.name, frames = stage.frames, steps = stage.steps, "stage");
        let mut losses = Vec::new();
        for s in 0..stage.steps {
            let kind = batch_kind(stage, &mut rng);
            let picked = pick(&train, stage.batch, &mut rng);
            let lr = stage.lr_at(s);
            let (next, value) = flow_step(
                recipe,
                (dit, &mut opt),
                (&picked, kind.frames(), lr),
                (&vocab, &mut rng, &device),
            )
            .map_err(|e| match e {
                RecipeError::Refused(m) => {
                    RecipeError::Refused(format!("{m} at step {step} (stage {})", stage.name))
                }
                other => other,
            })?;
            dit = next;
            if let Some(e) = &mut ema {
                e.update(&dit)?;
            }
            losses.push(value);
            let line = DitMetrics {
                step: step + 1,
                stage: &stage.name,
                frames: kind.frames(),
                loss: value,
                lr,
                seconds: began.elapsed().as_secs_f64(),
            };
            metrics.write(&line)?;
            step += 1;
        }
        let valid = averaged(ema.as_ref(), dit.valid())?;
        let held_eval: Vec<LatentClip> = held
            .iter()
            .map(|c| LatentClip {
                clip: c.clip.clone(),
                latent: Tensor::from_data(c.latent.to_data(), &eval_device),
                caption: c.caption.clone(),
            })
            .collect();
        let validation = validation_loss(
            &valid,
            &held_eval,
            &vocab,
            recipe.dit.text_len,
            stage.frames,
            &eval_device,
        )?;
        tracing::info!(stage = %stage.name, validation, "stage done");
        let tail = &losses[losses.len().saturating_sub(10)..];
        reports.push(StageReport {
            name: stage.name.clone(),
            final_loss: tail.iter().sum::<f64>() / tail.len().max(1) as f64,
            validation_loss: validation,
            frames: stage.frames,
        });
    }
    let post = match &post_setup {
        Some((p, vae)) => {
            let inputs = PostInputs {
                vae,
                train: &train,
                vocab: &vocab,
                meta: &meta,
                frames: recipe.stage.last().map_or(1, |s| s.frames),
            };
            let (report, tuned, tuned_opt, post_steps) =
                post_train(recipe, p, (dit, opt, ema.as_mut()), &inputs)?;
            dit = tuned;
            opt = tuned_opt;
            step += post_steps;
            Some(report)
        }
        None => None,
    };
    let seconds = began.elapsed().as_secs_f64();
    let comm = burn_parallel::comm::SingleRank::new();
    let meta_ck = Meta {
        step,
        world: 1,
        next_sequence: 0,
        seed: recipe.run.seed,
    };
    let dit = averaged(ema.as_ref(), dit)?;
    checkpoint::save(run, &meta_ck, &dit, &opt.state(), &comm, 1)?;
    let summary = DitSummary {
        stages: reports,
        post,
        seconds,
        vocabulary: vocab,
    };
    let path = run.join("summary.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&summary).map_err(|e| RecipeError::io(&path, e))?,
    )
    .map_err(|e| RecipeError::io(&path, e))?;
    Ok(summary)
}

/// `model` with the averaged weights where there is an average.
fn averaged<M: Module>(ema: Option<&Ema>, model: M) -> Result<M> {
    match ema {
        Some(e) => Ok(e.apply(model)?),
        None => Ok(model),
    }
}

/// A trained DiT run, loaded for sampling.
#[derive(Debug)]
pub struct LoadedDit {
    /// Its recipe.
    pub recipe: DitRecipe,
    /// Its summary (the vocabulary).
    pub summary: DitSummary,
    /// The model (latest checkpoint, on the CPU).
    pub dit: Dit,
    /// The latent cache it trained on.
    pub meta: CacheMeta,
    /// Latent height and width of that cache.
    pub latent_size: (usize, usize),
}

/// Loads a DiT run: its recipe, summary (vocabulary), latest checkpoint and its cache's
/// metadata, on the CPU.
pub fn load_dit(run: &Path) -> Result<LoadedDit> {
    crate::recipe::expect_run_kind(run, "a DiT")?;
    let recipe = DitRecipe::load(&run.join("recipe.toml"), &[])?;
    let path = run.join("summary.json");
    let summary: DitSummary = std::fs::read_to_string(&path)
        .map_err(|e| bad("--run", format!("{}: {e}", path.display())))
        .and_then(|t| {
            serde_json::from_str(&t).map_err(|e| bad("--run", format!("{}: {e}", path.display())))
        })?;
    let (meta, index) =
        read_cache(&recipe.data.latents).map_err(|e| bad("data.latents", e.to_string()))?;
    let [_, _, h, w] = index
        .first()
        .map(|c| c.shape)
        .ok_or_else(|| bad("data.latents", "the DiT's latent cache is empty"))?;
    let device = Device::flex();
    let dit = dit_config(&recipe, &meta, &summary.vocabulary)
        .init(&device)
        .map_err(|e| bad("dit", e.to_string()))?;
    let (dir, _) = checkpoint::latest(run)?
        .ok_or_else(|| bad("--run", format!("{} has no checkpoint", run.display())))?;
    let (dit, _) = checkpoint::load(&dir, dit, 0)?;
    Ok(LoadedDit {
        recipe,
        summary,
        dit,
        meta,
        latent_size: (h, w),
    })
}

/// Decodes normalised latents `[B, C, t, h, w]` to clips with `vae` (the VAE that made the
/// cache `meta` describes), `chunk` latent steps at a time.
pub fn decode_with(
    vae: &burn_video::vae::Vae,
    meta: &CacheMeta,
    z: Tensor<5>,
    chunk: usize,
) -> Result<Vec<burn_video::clip::Clip>> {
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
            crate::video::to_clip(x)
        })
        .collect()
}

/// `n` training clips drawn with replacement.
fn pick<'a>(clips: &'a [LatentClip], n: usize, rng: &mut Rng) -> Vec<&'a LatentClip> {
    (0..n).map(|_| &clips[rng.below(clips.len())]).collect()
}

/// Training timesteps `[B]` for latents of `dims` `[B, C, f, h, w]`: logit-normal, shifted
/// for their size and length.
fn timesteps(recipe: &DitRecipe, dims: [usize; 5], rng: &mut Rng, device: &Device) -> Tensor<1> {
    let [b, _, f, h, w] = dims;
    let r = flow::resolution_shift(h, w, f, recipe.flow.shift_base);
    let ts: Vec<f32> = flow::logit_normal(b, recipe.flow.logit_mean, recipe.flow.logit_std, r, rng)
        .into_iter()
        .map(|t| t as f32)
        .collect();
    Tensor::<1>::from_data(TensorData::new(ts, [b]), device)
}

/// One rectified-flow step on the first `frames` latent frames of `picked`: logit-normal
/// shifted timesteps, fresh noise, caption dropout; returns the updated model and the loss.
fn flow_step(
    recipe: &DitRecipe,
    (dit, opt): (Dit, &mut DistributedAdamW),
    (picked, frames, lr): (&[&LatentClip], usize, f64),
    (vocab, rng, device): (&Vocabulary, &mut Rng, &Device),
) -> Result<(Dit, f64)> {
    let x0 = stack(picked, frames);
    let t = timesteps(recipe, x0.dims(), rng, device);
    let eps = Tensor::<5>::random(x0.dims(), Distribution::Normal(0.0, 1.0), device);
    let captions: Vec<Option<&str>> = picked
        .iter()
        .map(|c| (rng.uniform() >= recipe.data.caption_dropout).then_some(c.caption.as_str()))
        .collect();
    let text = vocab
        .batch(&captions, recipe.dit.text_len, device)
        .map_err(|e| bad("dit.text_len", e.to_string()))?;
    let cond = Condition {
        text,
        first_frame: None,
    };
    let xt = flow::interpolate(x0.clone(), eps.clone(), t.clone());
    let (v, aux) = dit
        .forward_aux(xt, t, &cond)
        .map_err(|e| bad("dit", e.to_string()))?;
    let loss = flow::loss(v, x0, eps);
    let value = scalar(loss.clone());
    // The MoE load-balancing loss joins the gradient, not the reported flow loss.
    let loss = match aux {
        Some(a) => loss + a,
        None => loss,
    };
    if !value.is_finite() {
        return Err(RecipeError::Refused(format!(
            "the loss became {value}; lower the learning rate"
        )));
    }
    let mut grads = GradientBuffer::new();
    grads.add(&dit, &loss.backward())?;
    opt.set_lr(lr);
    let roles = replicated_roles(&dit);
    Ok((opt.step_buffered(dit, grads, &roles)?.0, value))
}

/// Noise seed of the checker-accuracy samples during post-training.
const EVAL_SEED: u64 = 0xE7A1;

/// What post-training reads besides the recipe.
struct PostInputs<'a> {
    /// The cache's VAE.
    vae: &'a burn_video::vae::Vae,
    train: &'a [LatentClip],
    vocab: &'a Vocabulary,
    meta: &'a CacheMeta,
    /// Latent frames of the samples (the last stage's).
    frames: usize,
}

/// Samples captions with a DiT and decodes them with the VAE of its latent cache.
pub struct Sampler<'a> {
    /// The cache's VAE.
    pub vae: &'a burn_video::vae::Vae,
    /// The caption vocabulary.
    pub vocab: &'a Vocabulary,
    /// The cache's metadata (latent statistics).
    pub meta: &'a CacheMeta,
    /// The DiT's recipe table (widths for the memory check; caption length).
    pub model: &'a DitModel,
    /// `flow.shift_base` of the recipe.
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
    ) -> Result<(Tensor<5>, Vec<burn_video::clip::Clip>)> {
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
        let text = |t: &[Option<&str>]| {
            self.vocab
                .batch(t, self.model.text_len, &device)
                .map_err(|e| bad("--prompt", e.to_string()))
        };
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
        .map_err(|e| bad("--steps", e.to_string()))
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
        let m = self.model;
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
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        let (frames, h, w) = self.shape;
        Err(RecipeError::Refused(format!(
            "sampling {batch} clip(s) of {frames} latent frames at {h}x{w} needs about {:.1} GiB \
             (attention over {} video tokens) and this machine has {:.1} GiB available; lower \
             --frames or the number of prompts",
            gib(need),
            frames * h.div_ceil(2) * w.div_ceil(2),
            gib(have)
        )))
    }

    /// The rule-based checker's accuracy on the captions of the first `prompts` synthetic
    /// labels (they repeat after 144), sampled 16 at a time from noise `seed + chunk`.
    pub fn accuracy(&self, dit: &Dit, prompts: usize, seed: u64) -> Result<Accuracy> {
        use burn_video::checker::check;
        use burn_video::synthetic::Label;
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
        text: burn_video::dit::Text {
            ids: Tensor::from_data(cond.text.ids.to_data(), on),
            mask: Tensor::from_data(cond.text.mask.to_data(), on),
        },
        first_frame: None,
    };
    let xt = flow::interpolate(x0.clone(), e.clone(), tt.clone());
    let v = model
        .forward(xt, tt, &c)
        .map_err(|e| bad("dit", e.to_string()))?;
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
        let text = vocab
            .batch(&[Some(caption.as_str())], text_len, &device)
            .map_err(|e| bad("dit.text_len", e.to_string()))?;
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
    recipe: &DitRecipe,
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
        let t = timesteps(recipe, xw.dims(), rng, &device);
        let eps = Tensor::<5>::random(xw.dims(), Distribution::Normal(0.0, 1.0), &device);
        let captions: Vec<Option<&str>> = batch.iter().map(|p| Some(p.2.as_str())).collect();
        let text = vocab
            .batch(&captions, recipe.dit.text_len, &device)
            .map_err(|e| bad("dit.text_len", e.to_string()))?;
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
            return Err(RecipeError::Refused(format!(
                "the DPO loss became {value}; lower post.dpo_lr or post.beta"
            )));
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

/// SFT on the curated subset, then Diffusion-DPO on checker-ranked pairs of the model's own
/// samples against the frozen SFT model; the checker's accuracy before, after SFT and after
/// DPO. With a weight average, the accuracies and the DPO reference use it, each phase starts
/// from it and it keeps being updated. Returns the report, the model, its optimizer and the
/// steps taken.
fn post_train(
    recipe: &DitRecipe,
    post: &PostConfig,
    (mut dit, mut opt, mut ema): (Dit, DistributedAdamW, Option<&mut Ema>),
    inputs: &PostInputs<'_>,
) -> Result<(PostReport, Dit, DistributedAdamW, usize)> {
    use burn_video::checker::check;
    use burn_video::synthetic::Label;
    let device = Device::flex().autodiff();
    let [_, _, h, w] = inputs
        .train
        .first()
        .map(|c| c.latent.dims())
        .unwrap_or([0; 4]);
    let sampler = Sampler {
        vae: inputs.vae,
        vocab: inputs.vocab,
        meta: inputs.meta,
        model: &recipe.dit,
        shift_base: recipe.flow.shift_base,
        shape: (inputs.frames, h, w),
        steps: post.sample_steps,
        guidance: post.guidance,
    };
    dit = averaged(ema.as_deref(), dit)?;
    let before = sampler.accuracy(&dit.valid(), post.eval_prompts, EVAL_SEED)?;
    tracing::info!(?before, "checker accuracy after the curriculum");
    // SFT on the clips the curation manifest accepts.
    let curated: Vec<LatentClip> = match &post.sft_manifest {
        Some(m) => {
            let accepted: std::collections::HashSet<PathBuf> =
                burn_video::pipeline::read_manifest(m)
                    .map_err(|e| bad("post.sft_manifest", e.to_string()))?
                    .into_iter()
                    .filter(|e| e.accepted)
                    .map(|e| e.clip)
                    .collect();
            inputs
                .train
                .iter()
                .filter(|c| accepted.contains(&c.clip))
                .cloned()
                .collect()
        }
        None => inputs.train.to_vec(),
    };
    if curated.is_empty() {
        return Err(bad(
            "post.sft_manifest",
            "accepts none of the training clips",
        ));
    }
    let flow_inputs = (inputs.vocab, recipe.dit.text_len, inputs.frames);
    let sft_flow_before = fixed_flow_loss(&dit.valid(), &curated, flow_inputs)?;
    let mut rng = Rng::new(recipe.run.seed ^ 0x5F7);
    let mut sft_losses = Vec::new();
    for _ in 0..post.sft_steps {
        let picked = pick(&curated, post.batch, &mut rng);
        let (next, value) = flow_step(
            recipe,
            (dit, &mut opt),
            (&picked, inputs.frames, post.sft_lr),
            (inputs.vocab, &mut rng, &device),
        )?;
        dit = next;
        if let Some(e) = ema.as_deref_mut() {
            e.update(&dit)?;
        }
        sft_losses.push(value);
    }
    dit = averaged(ema.as_deref(), dit)?;
    let sft_flow_after = fixed_flow_loss(&dit.valid(), &curated, flow_inputs)?;
    tracing::info!(
        before = sft_flow_before,
        after = sft_flow_after,
        "flow loss on the SFT clips"
    );
    let after_sft = sampler.accuracy(&dit.valid(), post.eval_prompts, EVAL_SEED)?;
    tracing::info!(?after_sft, "checker accuracy after SFT");
    // Preference pairs: each prompt sampled with two seeds, ranked by how many of colour,
    // direction and count the checker confirms; ties are dropped.
    let reference = dit.valid();
    let captions: Vec<String> = curated.iter().map(|c| c.caption.clone()).collect();
    let mut pairs: Vec<Pair> = Vec::new();
    for i in 0..post.prompts {
        let caption = &captions[rng.below(captions.len())];
        let Some(label) = Label::parse(caption) else {
            return Err(bad(
                "data.latents",
                format!(
                    "caption {caption:?} is not a synthetic-generator caption; DPO needs its label"
                ),
            ));
        };
        let (z, clips) = sampler.sample(
            &reference,
            &[caption.as_str(), caption.as_str()],
            0xD90 + i as u64,
        )?;
        let score = |c: &burn_video::clip::Clip| {
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
    tracing::info!(
        pairs = pairs.len(),
        prompts = post.prompts,
        "preference pairs"
    );
    let margin_inputs = (inputs.vocab, recipe.dit.text_len);
    let dpo_margin_before =
        dpo_margin((&dit.valid(), &reference), &pairs, post.beta, margin_inputs)?;
    let (next, dpo_losses) = dpo_steps(
        recipe,
        post,
        (dit, &mut opt, ema.as_deref_mut()),
        &reference,
        &pairs,
        (inputs.vocab, &mut rng),
    )?;
    dit = next;
    dit = averaged(ema.as_deref(), dit)?;
    let dpo_margin_after =
        dpo_margin((&dit.valid(), &reference), &pairs, post.beta, margin_inputs)?;
    tracing::info!(
        before = dpo_margin_before,
        after = dpo_margin_after,
        "implicit-reward margin of the preference pairs"
    );
    let after_dpo = sampler.accuracy(&dit.valid(), post.eval_prompts, EVAL_SEED)?;
    tracing::info!(?after_dpo, "checker accuracy after DPO");
    let tail = |v: &[f64]| {
        let t = &v[v.len().saturating_sub(10)..];
        t.iter().sum::<f64>() / t.len().max(1) as f64
    };
    let steps = post.sft_steps + if pairs.is_empty() { 0 } else { post.dpo_steps };
    Ok((
        PostReport {
            sft_clips: curated.len(),
            sft_loss: tail(&sft_losses),
            sft_flow_before,
            sft_flow_after,
            pairs: pairs.len(),
            dpo_loss: tail(&dpo_losses),
            dpo_margin_before,
            dpo_margin_after,
            before,
            after_sft,
            after_dpo,
        },
        dit,
        opt,
        steps,
    ))
}
