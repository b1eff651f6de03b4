//! Video VAE recipes: `burn-recipes train` on a recipe with a `[vae]` table trains the causal
//! video VAE of burn-video on random crops of a folder of clips, keeps every `holdout_every`-th
//! clip out of training (a corpus from `burn-recipes data corpus`: its held-out sources, whole),
//! and writes metrics, checkpoints, per-channel latent statistics and a
//! summary with held-out PSNR / SSIM next to the same-size resize baseline;
//! `burn-recipes eval vae` scores a run on any folder of clips.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use burn_parallel::lr_schedule::LrSchedule;
use burn_video::clip::Clip;
pub use burn_video::tensor::clip_tensor;
use burn_video::vae::{Vae, VaeConfig};
pub use burn_video::vae_training::{Refine, VaeEval, evaluate, evaluate_groups, held_out_sources};
use burn_video::vae_training::{
    VaeTrainer, VaeTrainingConfig, latent_statistics, split_clips_by_source,
};
use serde::{Deserialize, Serialize};

use crate::checkpoint;
use crate::error::{RecipeError, Result};
use crate::recipe::{RunConfig, bad, load_file};
use crate::rundir::{refuse_existing, start};

/// `[data]` of a VAE recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaeData {
    /// Folder of clips (PNG-frame folders, GIFs), or a corpus (`burn-recipes data corpus`).
    pub clips: PathBuf,
    /// Every this-many-th clip (sorted by name, the last of each group) is held out; a
    /// corpus holds out its held-out sources instead.
    pub holdout_every: usize,
    /// Frames of a training crop (`1 + k × temporal factor`).
    pub frames: usize,
    /// Side of a square training crop (a multiple of the spatial factor).
    pub crop: usize,
}

/// `[training]` of a VAE recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaeTraining {
    /// Optimizer steps.
    pub steps: usize,
    /// Crops per step.
    pub batch: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate of the cosine decay.
    #[serde(default)]
    pub min_lr: f64,
    /// Linear warm-up steps.
    #[serde(default)]
    pub warmup_steps: usize,
    /// Gradient clipping by global norm.
    #[serde(default)]
    pub grad_clip: Option<f64>,
    /// Write a metrics line every this many steps.
    #[serde(default = "one")]
    pub log_every: usize,
}

fn one() -> usize {
    1
}

/// `[eval]` of a VAE recipe: the held-out scoring at the end of training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaeEvalConfig {
    /// Also score the held-out clips with the latents refined by this many steps
    /// ([`Vae::encode_refined`]; 0: the encoder's posterior mean only).
    #[serde(default)]
    pub refine: usize,
    /// Step size of the refinement.
    #[serde(default = "refine_lr")]
    pub refine_lr: f64,
}

fn refine_lr() -> f64 {
    0.02
}

impl Default for VaeEvalConfig {
    fn default() -> Self {
        Self {
            refine: 0,
            refine_lr: refine_lr(),
        }
    }
}

/// A video VAE recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaeRecipe {
    /// Run folder and seed.
    pub run: RunConfig,
    /// The VAE.
    pub vae: VaeConfig,
    /// The clips.
    pub data: VaeData,
    /// The optimisation.
    pub training: VaeTraining,
    /// The held-out scoring.
    #[serde(default)]
    pub eval: VaeEvalConfig,
}

pub use crate::recipe::is_vae_recipe;

impl VaeRecipe {
    /// Reads a recipe file and applies `--set` overrides.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let recipe: Self = load_file(path, overrides)?;
        recipe.validate()?;
        Ok(recipe)
    }

    /// Checks every value; errors name the key.
    pub fn validate(&self) -> Result<()> {
        self.vae.validate().map_err(|e| keyed("vae", e))?;
        self.training_config()
            .validate(&self.vae)
            .map_err(training_key)?;
        for (key, v) in [
            ("data.holdout_every", self.data.holdout_every),
            ("training.log_every", self.training.log_every),
        ] {
            if v == 0 {
                return Err(bad(key, "must be at least 1"));
            }
        }
        if !(self.eval.refine_lr.is_finite() && self.eval.refine_lr > 0.0) {
            return Err(bad("eval.refine_lr", "must be a positive number"));
        }
        Ok(())
    }

    /// The library's training configuration of this recipe.
    pub fn training_config(&self) -> VaeTrainingConfig {
        let (d, t) = (&self.data, &self.training);
        VaeTrainingConfig {
            steps: t.steps,
            batch: t.batch,
            frames: d.frames,
            crop: d.crop,
            schedule: LrSchedule {
                lr: t.lr,
                min_lr: t.min_lr,
                warmup_steps: t.warmup_steps,
                steps: t.steps,
            },
            grad_clip: t.grad_clip,
            seed: self.run.seed,
        }
    }
}

/// An error of burn-video's VAE trainer named by the recipe key of its field.
fn training_key(e: burn_video::VideoError) -> RecipeError {
    match e {
        burn_video::VideoError::InvalidArgument { name, reason } => {
            let section = match name {
                "frames" | "crop" | "clips" => "data",
                _ => "training",
            };
            bad(&format!("{section}.{name}"), reason)
        }
        burn_video::VideoError::Parallel(e) => e.into(),
        other => video(other),
    }
}

/// A burn-video configuration error as a recipe error naming `section.field`.
pub(crate) fn keyed(section: &str, e: burn_video::VideoError) -> RecipeError {
    match e {
        burn_video::VideoError::InvalidArgument { name, reason } => {
            bad(&format!("{section}.{name}"), reason)
        }
        other => bad(section, other.to_string()),
    }
}

fn video(e: burn_video::VideoError) -> RecipeError {
    RecipeError::Invalid {
        key: "data.clips".into(),
        reason: e.to_string(),
    }
}

/// Clips of `dir`, split into (training, held out) ([`burn_video::vae_training::split_clips`]),
/// errors naming `data.clips`.
pub fn split_clips(dir: &Path, every: usize) -> Result<(Vec<Clip>, Vec<Clip>)> {
    burn_video::vae_training::split_clips(dir, every).map_err(training_key)
}

/// What a VAE training run reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VaeSummary {
    /// Mean loss of the last ten steps.
    pub final_loss: f64,
    /// Held-out evaluation.
    pub holdout: VaeEval,
    /// Held-out evaluation with the latents refined (`eval.refine` steps), when asked for.
    pub holdout_refined: Option<VaeEval>,
    /// For a corpus (`burn-recipes data corpus`): the held-out evaluation of each held-out
    /// source, and refined when `eval.refine` is set (empty for a plain folder of clips).
    pub holdout_sources: Vec<SourceEval>,
    /// Share of the training blocks' variance explained by the linear path's initial code
    /// (`vae.linear`: principal components, after the fixed smooth code with `"smooth"`).
    pub linear_explained: Option<f64>,
    /// Per-channel mean of the latent posterior means over the training clips.
    pub latent_mean: Vec<f64>,
    /// Per-channel standard deviation.
    pub latent_std: Vec<f64>,
    /// Seconds of training.
    pub seconds: f64,
}

/// The held-out scores of one source of a corpus.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SourceEval {
    /// The source's name.
    pub source: String,
    /// From the encoder's posterior mean.
    pub encoder: VaeEval,
    /// With the latents refined, when asked for.
    pub refined: Option<VaeEval>,
}

/// Trains a VAE recipe from scratch in its (new) run folder: burn-video's [`VaeTrainer`] on
/// the training split, metrics every `log_every` steps, a checkpoint, the latent statistics
/// and the held-out scores (with refined latents too when `eval.refine` is set).
pub fn train_vae(recipe: &VaeRecipe) -> Result<VaeSummary> {
    let run = &recipe.run.dir;
    refuse_existing(run, "choose another run.dir")?;
    let (train, groups) = split_clips_by_source(&recipe.data.clips, recipe.data.holdout_every)
        .map_err(training_key)?;
    let (t, cfg) = (&recipe.training, &recipe.vae);
    let device = Device::flex().autodiff();
    let mut trainer =
        VaeTrainer::seeded(cfg, &recipe.training_config(), train, &device).map_err(training_key)?;
    let linear_explained = trainer
        .fit_linear()
        .map_err(|e| bad("vae.linear", e.to_string()))?;
    let mut metrics = start(run, recipe)?;
    let steps = trainer
        .fit(|step| {
            if step.step.is_multiple_of(t.log_every) {
                metrics.write(step)?;
            }
            Ok(())
        })
        .map_err(training_key)?;
    trainer.save(run).map_err(video)?;
    let losses: Vec<f64> = steps.iter().map(|s| s.loss).collect();
    let seconds = steps.last().map_or(0.0, |s| s.seconds);
    let (latent_mean, latent_std) = latent_statistics(trainer.vae(), cfg, trainer.clips(), &device)
        .map_err(|e| bad("vae", e.to_string()))?;
    let vae = trainer.into_vae();
    // A corpus is scored by held-out source (each clip once); a plain folder as one group
    // without a name.
    let by_source = groups.iter().any(|(name, _)| !name.is_empty());
    let evaluated = |refine: Option<Refine>, preview: Option<&Path>| {
        evaluate_groups(&vae, cfg, &groups, preview, &device, refine).map_err(video)
    };
    let (holdout, per_source) = evaluated(None, Some(&run.join("holdout_preview.gif")))?;
    // The training device differentiates, as refinement needs.
    let e = &recipe.eval;
    let (holdout_refined, per_source_refined) = if e.refine > 0 {
        let refine = Refine {
            steps: e.refine,
            lr: e.refine_lr,
        };
        let (all, each) = evaluated(Some(refine), None)?;
        (Some(all), each.into_iter().map(|(_, r)| Some(r)).collect())
    } else {
        (None, vec![None; per_source.len()])
    };
    let holdout_sources = if by_source {
        per_source
            .into_iter()
            .zip(per_source_refined)
            .map(|((source, encoder), refined)| SourceEval {
                source,
                encoder,
                refined,
            })
            .collect()
    } else {
        Vec::new()
    };
    let tail = &losses[losses.len().saturating_sub(10)..];
    let summary = VaeSummary {
        final_loss: tail.iter().sum::<f64>() / tail.len().max(1) as f64,
        linear_explained,
        holdout,
        holdout_refined,
        holdout_sources,
        latent_mean,
        latent_std,
        seconds,
    };
    let path = run.join("summary.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&summary).map_err(|e| RecipeError::io(&path, e))?,
    )
    .map_err(|e| RecipeError::io(&path, e))?;
    Ok(summary)
}

/// Loads a run's VAE: its recipe, the latest (or the given) checkpoint, and that checkpoint's
/// folder.
pub fn load_vae(run: &Path, checkpoint_dir: Option<&Path>) -> Result<(VaeRecipe, Vae, PathBuf)> {
    load_vae_on(run, checkpoint_dir, &Device::flex())
}

/// [`load_vae`] onto `device` (an autodiff one for [`Vae::encode_refined`]).
pub fn load_vae_on(
    run: &Path,
    checkpoint_dir: Option<&Path>,
    device: &Device,
) -> Result<(VaeRecipe, Vae, PathBuf)> {
    crate::recipe::expect_run_kind(run, "a video VAE")?;
    let recipe = VaeRecipe::load(&run.join("recipe.toml"), &[])?;
    let dir = match checkpoint_dir {
        Some(d) => d.to_path_buf(),
        None => checkpoint::latest(run)?
            .map(|(d, _)| d)
            .ok_or_else(|| RecipeError::Invalid {
                key: "--run".into(),
                reason: format!("{} has no checkpoint", run.display()),
            })?,
    };
    let vae = recipe
        .vae
        .init(device)
        .map_err(|e| bad("vae", e.to_string()))?;
    let (vae, _) = checkpoint::load(&dir, vae, 0)?;
    Ok((recipe, vae, dir))
}
