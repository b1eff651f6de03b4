//! DiT recipes: `burn-recipes train` on a recipe with a `[dit]` table trains burn-video's DiT
//! ([`burn_video::dit_training`]: rectified flow on cached VAE latents through curriculum
//! stages, then optional SFT and DPO) on a latent cache (`burn-recipes data cache`), logging
//! every stage switch and each stage's validation loss; `burn-recipes sample` generates clips
//! for captions. This module holds the recipe's tables, their checks with the key of every
//! error, and the run folder (metrics, checkpoint, summary).

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::Device;
use burn_video::VideoError;
use burn_video::dit::{Dit, DitConfig};
pub use burn_video::dit_training::{
    Accuracy, EmaConfig, FlowConfig, PostConfig, PostReport, Sampler, Stage, StageReport,
};
use burn_video::dit_training::{
    DitEvent, DitTrainer, DitTrainingConfig, LatentClip, PostInputs, load_latents,
};
use burn_video::text::Vocabulary;
use serde::{Deserialize, Serialize};

use crate::checkpoint;
use crate::error::{RecipeError, Result};
use crate::latents::{CacheMeta, read_cache};
use crate::recipe::{RunConfig, bad, load_file};
use crate::rundir::{refuse_existing, start};
use crate::video::keyed;

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
    #[serde(default)]
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

    /// The library's training configuration of this recipe.
    pub fn training_config(&self) -> DitTrainingConfig {
        DitTrainingConfig {
            stages: self.stage.clone(),
            flow: self.flow.clone(),
            caption_dropout: self.data.caption_dropout,
            text_len: self.dit.text_len,
            ema: self.ema.clone(),
            seed: self.run.seed,
        }
    }
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

/// A burn-video error of the DiT pipeline as a recipe error naming the recipe key.
fn dit_key(e: VideoError) -> RecipeError {
    let key = match &e {
        VideoError::InvalidArgument { name, .. } => match *name {
            "latents" | "captions" => "data.latents",
            "holdout_every" => "data.holdout_every",
            "caption" | "text_len" => "dit.text_len",
            "sft_manifest" => "post.sft_manifest",
            _ => "dit",
        },
        VideoError::NonFiniteLoss { .. } => return RecipeError::Refused(e.to_string()),
        _ => return e.into(),
    };
    match e {
        VideoError::InvalidArgument { reason, .. } => bad(key, reason),
        other => bad(key, other.to_string()),
    }
}

/// A sampling error as a command-line error: a caption that does not fit names `--prompt`,
/// a sampling run too large for the machine says what to lower.
pub fn sampling_key(e: VideoError) -> RecipeError {
    match e {
        VideoError::InvalidArgument {
            name: "caption",
            reason,
        } => bad("--prompt", reason),
        VideoError::InvalidArgument {
            name: "steps",
            reason,
        } => bad("--steps", reason),
        VideoError::Parallel(e @ burn_parallel::ParallelError::OutOfMemory { .. }) => {
            RecipeError::Refused(format!("{e}; lower --frames or the number of prompts"))
        }
        other => other.into(),
    }
}

/// The training and held-out clips of the recipe's cache, checked against the curriculum and
/// the caption length, and the vocabulary.
fn checked_latents(
    recipe: &DitRecipe,
    device: &Device,
) -> Result<(CacheMeta, Vec<LatentClip>, Vec<LatentClip>, Vocabulary)> {
    let (meta, train, held, vocab) =
        load_latents(&recipe.data.latents, recipe.data.holdout_every, device).map_err(|e| {
            match e {
                VideoError::InvalidArgument { name, reason } if name != "holdout_every" => {
                    bad("data.latents", reason)
                }
                e @ VideoError::InvalidArgument { .. } => dit_key(e),
                // The cache cannot be read.
                other => bad("data.latents", other.to_string()),
            }
        })?;
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
            .map_err(|e| keyed("dit", e))?;
    }
    Ok((meta, train, held, vocab))
}

/// Trains a DiT recipe from scratch in its (new) run folder ([`DitTrainer`]); `on_stage`
/// hears every switch. Writes `metrics.jsonl` (every step), the checkpoint and
/// `summary.json`.
pub fn train_dit(recipe: &DitRecipe, mut on_stage: impl FnMut(&Stage)) -> Result<DitSummary> {
    let run = &recipe.run.dir;
    refuse_existing(run, "choose another run.dir")?;
    let device = Device::flex().autodiff();
    let (meta, train, held, vocab) = checked_latents(recipe, &device)?;
    // Post-training decodes samples with the cache's VAE: load it now, not after the
    // curriculum, so a missing checkpoint is refused before any step.
    let post_vae = match &recipe.post {
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
    let mut trainer = DitTrainer::new(cfg, recipe.training_config(), vocab, &device)
        .map_err(|e| keyed("dit", e))?;
    let mut metrics = start(run, recipe)?;
    let began = Instant::now();
    let stages = trainer
        .curriculum(&train, &held, |event| {
            match event {
                DitEvent::Stage { stage, .. } => {
                    on_stage(stage);
                    tracing::info!(stage = %stage.name, frames = stage.frames, steps = stage.steps, "stage");
                }
                DitEvent::Step { step, stage, frames, loss, lr } => metrics.write(&DitMetrics {
                    step,
                    stage: &stage.name,
                    frames,
                    loss,
                    lr,
                    seconds: began.elapsed().as_secs_f64(),
                })?,
                DitEvent::StageDone(r) => {
                    tracing::info!(stage = %r.name, validation = r.validation_loss, "stage done");
                }
            }
            Ok(())
        })
        .map_err(dit_key)?;
    let post = match &post_vae {
        Some((p, vae)) => {
            let inputs = PostInputs {
                vae,
                train: &train,
                meta: &meta,
                frames: recipe.stage.last().map_or(1, |s| s.frames),
            };
            Some(trainer.post_train(p, &inputs).map_err(dit_key)?)
        }
        None => None,
    };
    let seconds = began.elapsed().as_secs_f64();
    trainer.save(run).map_err(dit_key)?;
    let summary = DitSummary {
        stages,
        post,
        seconds,
        vocabulary: trainer.vocab().clone(),
    };
    let path = run.join("summary.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&summary).map_err(|e| RecipeError::io(&path, e))?,
    )
    .map_err(|e| RecipeError::io(&path, e))?;
    Ok(summary)
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
    /// Its configuration.
    pub config: DitConfig,
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
    let config = dit_config(&recipe, &meta, &summary.vocabulary);
    let dit = config
        .init(&device)
        .map_err(|e| bad("dit", e.to_string()))?;
    let (dir, _) = checkpoint::latest(run)?
        .ok_or_else(|| bad("--run", format!("{} has no checkpoint", run.display())))?;
    let (dit, _) = checkpoint::load(&dir, dit, 0)?;
    Ok(LoadedDit {
        recipe,
        summary,
        dit,
        config,
        meta,
        latent_size: (h, w),
    })
}
