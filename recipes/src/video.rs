//! Video VAE recipes: `burn-recipes train` on a recipe with a `[vae]` table trains the causal
//! video VAE of burn-video on random crops of a folder of clips, keeps every `holdout_every`-th
//! clip out of training, and writes metrics, checkpoints, per-channel latent statistics and a
//! summary with held-out PSNR / SSIM next to the same-size resize baseline;
//! `burn-recipes eval vae` scores a run on any folder of clips.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::{Device, Tensor};
use burn_parallel::prelude::{GradientBuffer, replicated_roles};
use burn_video::clip::{Clip, list_clips};
use burn_video::resample::{quality, same_size_baseline};
pub use burn_video::tensor::clip_tensor;
use burn_video::tensor::{crops, usable};
use burn_video::vae::{LinearPath, Vae, VaeConfig};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, Meta};
use crate::error::{RecipeError, Result};
use crate::recipe::{RunConfig, bad, load_file};
use crate::rundir::{refuse_existing, scalar, single_rank_adamw, start};
use burn_parallel::rng::mix;

/// `[data]` of a VAE recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaeData {
    /// Folder of clips (PNG-frame folders, GIFs).
    pub clips: PathBuf,
    /// Every this-many-th clip (sorted by name, the last of each group) is held out.
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

/// Whether recipe text is a VAE recipe (it has a `[vae]` table).
pub fn is_vae_recipe(text: &str) -> bool {
    text.parse::<toml::Table>()
        .is_ok_and(|t| t.contains_key("vae"))
}

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
        let (d, t) = (&self.data, &self.training);
        let (ft, fs) = (self.vae.time_factor(), self.vae.space_factor());
        if d.frames == 0 || !(d.frames - 1).is_multiple_of(ft) {
            return Err(bad(
                "data.frames",
                format!(
                    "{} is not 1 + a multiple of the temporal factor {ft}",
                    d.frames
                ),
            ));
        }
        if d.crop == 0 || !d.crop.is_multiple_of(fs) {
            return Err(bad(
                "data.crop",
                format!("{} is not a multiple of the spatial factor {fs}", d.crop),
            ));
        }
        for (key, v) in [
            ("data.holdout_every", d.holdout_every),
            ("training.steps", t.steps),
            ("training.batch", t.batch),
            ("training.log_every", t.log_every),
        ] {
            if v == 0 {
                return Err(bad(key, "must be at least 1"));
            }
        }
        if !(t.lr.is_finite() && t.lr > 0.0) {
            return Err(bad("training.lr", "must be a positive number"));
        }
        if !(t.min_lr.is_finite() && t.min_lr >= 0.0 && t.min_lr <= t.lr) {
            return Err(bad("training.min_lr", "must be in [0, lr]"));
        }
        if t.warmup_steps > t.steps {
            return Err(bad("training.warmup_steps", "exceeds training.steps"));
        }
        if !(self.eval.refine_lr.is_finite() && self.eval.refine_lr > 0.0) {
            return Err(bad("eval.refine_lr", "must be a positive number"));
        }
        Ok(())
    }

    fn lr(&self, step: usize) -> f64 {
        let t = &self.training;
        burn_parallel::lr_schedule::LrSchedule {
            lr: t.lr,
            min_lr: t.min_lr,
            warmup_steps: t.warmup_steps,
            steps: t.steps,
        }
        .at(step)
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

/// Clips of `dir`, split into (training, held out): clip `i` is held out when
/// `i % every == every − 1`.
pub fn split_clips(dir: &Path, every: usize) -> Result<(Vec<Clip>, Vec<Clip>)> {
    let paths = list_clips(dir).map_err(video)?;
    if paths.is_empty() {
        return Err(RecipeError::Invalid {
            key: "data.clips".into(),
            reason: format!("{}: no clips", dir.display()),
        });
    }
    let (mut train, mut held) = (Vec::new(), Vec::new());
    for (i, p) in paths.iter().enumerate() {
        let c = Clip::read(p).map_err(video)?;
        if every > 1 && i % every == every - 1 {
            held.push(c);
        } else {
            train.push(c);
        }
    }
    Ok((train, held))
}

/// The clip of `[1, 3, T, H, W]` in `[-1, 1]`, errors named for the recipe.
pub(crate) fn to_clip(x: Tensor<5>) -> Result<Clip> {
    burn_video::tensor::to_clip(x).map_err(video)
}

/// Encode-time refinement of the latent ([`Vae::encode_refined`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Refine {
    /// Adam steps on the latent.
    pub steps: usize,
    /// Their step size.
    pub lr: f64,
}

/// Reconstructs `clip` through the posterior mean, refined against the decoder when `refine`
/// is given (the VAE then on an autodiff device).
pub fn reconstruct(
    vae: &Vae,
    cfg: &VaeConfig,
    clip: &Clip,
    d: &Device,
    refine: Option<Refine>,
) -> Result<Clip> {
    let c = usable(clip, cfg.time_factor());
    let (w, h) = c.size();
    cfg.latent_shape(c.len(), h, w)
        .map_err(|e| bad("clips", e.to_string()))?;
    let x = clip_tensor(&c, d);
    let z = match refine {
        Some(r) => vae
            .encode_refined(x, r.steps, r.lr)
            .map_err(|e| bad("--refine", e.to_string()))?,
        None => vae.encode(x).mean,
    };
    to_clip(vae.decode(z))
}

/// What `eval vae` reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VaeEval {
    /// Clips scored.
    pub clips: usize,
    /// Mean PSNR (dB) of the VAE over every frame.
    pub vae_psnr: f64,
    /// Mean SSIM of the VAE.
    pub vae_ssim: f64,
    /// Mean PSNR of the same-size resize baseline.
    pub baseline_psnr: f64,
    /// Mean SSIM of the baseline.
    pub baseline_ssim: f64,
}

/// Scores `vae` and the baseline of its latent size on `clips`; writes a side-by-side preview
/// (original | VAE | baseline) of the first clip to `preview` when given.
pub fn evaluate(
    vae: &Vae,
    cfg: &VaeConfig,
    clips: &[Clip],
    preview: Option<&Path>,
    d: &Device,
    refine: Option<Refine>,
) -> Result<VaeEval> {
    let (mut ours, mut base) = (Vec::new(), Vec::new());
    for clip in clips {
        let c = usable(clip, cfg.time_factor());
        let (w, h) = c.size();
        let shape = cfg
            .latent_shape(c.len(), h, w)
            .map_err(|e| bad("clips", e.to_string()))?;
        let rec = reconstruct(vae, cfg, &c, d, refine)?;
        let b = same_size_baseline(&c, shape).map_err(video)?;
        ours.push((c.clone(), rec));
        base.push((c, b));
    }
    if let (Some(path), Some((c, r)), Some((_, b))) = (preview, ours.first(), base.first()) {
        c.side_by_side(r)
            .and_then(|x| x.side_by_side(b))
            .and_then(|x| x.write_gif(path, 100))
            .map_err(video)?;
    }
    let (vae_psnr, vae_ssim) = quality(&ours).map_err(video)?;
    let (baseline_psnr, baseline_ssim) = quality(&base).map_err(video)?;
    Ok(VaeEval {
        clips: clips.len(),
        vae_psnr,
        vae_ssim,
        baseline_psnr,
        baseline_ssim,
    })
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

#[derive(Serialize)]
struct VaeMetrics {
    step: usize,
    loss: f64,
    l1: f64,
    mse: f64,
    gradient: f64,
    kl: f64,
    lr: f64,
    seconds: f64,
}

/// Trains a VAE recipe from scratch in its (new) run folder.
pub fn train_vae(recipe: &VaeRecipe) -> Result<VaeSummary> {
    let run = &recipe.run.dir;
    refuse_existing(run, "choose another run.dir")?;
    let (train, held) = split_clips(&recipe.data.clips, recipe.data.holdout_every)?;
    let (d, t, cfg) = (&recipe.data, &recipe.training, &recipe.vae);
    for c in &train {
        let (w, h) = c.size();
        if c.len() < d.frames || w < d.crop || h < d.crop {
            return Err(bad(
                "data.crop",
                format!(
                    "a {w}x{h} clip of {} frames is smaller than a crop",
                    c.len()
                ),
            ));
        }
    }
    let device = Device::flex().autodiff();
    let mut vae = cfg.init(&device).map_err(|e| bad("vae", e.to_string()))?;
    // The linear path starts at the principal components of the training clips' blocks (each
    // clip cropped to whole blocks).
    let linear_explained = if cfg.linear != LinearPath::None {
        let fit_device = Device::flex();
        let fs = cfg.space_factor();
        let clips: Vec<Tensor<5>> = train
            .iter()
            .map(|c| {
                let c = usable(c, cfg.time_factor());
                let (w, h) = c.size();
                crops(
                    &[&c],
                    &[(0, 0, 0)],
                    c.len(),
                    (h / fs * fs, w / fs * fs),
                    &fit_device,
                )
            })
            .collect();
        let (fitted, explained) = vae
            .fit_linear(&clips)
            .map_err(|e| bad("vae.linear", e.to_string()))?;
        vae = fitted;
        Some(explained)
    } else {
        None
    };
    let mut opt = single_rank_adamw(t.lr, t.grad_clip)?;
    let mut metrics = start(run, recipe)?;
    let began = Instant::now();
    let mut losses = Vec::new();
    for step in 0..t.steps {
        let mut state = mix(recipe.run.seed ^ (step as u64).wrapping_mul(0x9E37_79B9));
        let mut draw = |n: usize| {
            state = mix(state);
            (state % n as u64) as usize
        };
        let (mut picked, mut at) = (Vec::new(), Vec::new());
        for _ in 0..t.batch {
            let c = &train[draw(train.len())];
            let (w, h) = c.size();
            at.push((
                draw(c.len() - d.frames + 1),
                draw(h - d.crop + 1),
                draw(w - d.crop + 1),
            ));
            picked.push(c);
        }
        let x = crops(&picked, &at, d.frames, (d.crop, d.crop), &device);
        let loss = vae.loss(x, cfg, true);
        let value = scalar(loss.total.clone());
        let mut grads = GradientBuffer::new();
        grads.add(&vae, &loss.total.backward())?;
        opt.set_lr(recipe.lr(step));
        let roles = replicated_roles(&vae);
        vae = opt.step_buffered(vae, grads, &roles)?.0;
        losses.push(value);
        if (step + 1).is_multiple_of(t.log_every) {
            let line = VaeMetrics {
                step: step + 1,
                loss: value,
                l1: scalar(loss.l1),
                mse: scalar(loss.mse),
                gradient: scalar(loss.gradient),
                kl: scalar(loss.kl),
                lr: recipe.lr(step),
                seconds: began.elapsed().as_secs_f64(),
            };
            metrics.write(&line)?;
        }
    }
    let seconds = began.elapsed().as_secs_f64();
    let meta = Meta {
        step: t.steps,
        world: 1,
        next_sequence: 0,
        seed: recipe.run.seed,
    };
    let comm = burn_parallel::comm::SingleRank::new();
    checkpoint::save(run, &meta, &vae, &opt.state(), &comm, 1)?;
    // Per-channel latent statistics over the training clips (posterior means).
    let eval_device = device.clone();
    let (mut sum, mut sq, mut n) = (vec![0f64; cfg.latent], vec![0f64; cfg.latent], 0f64);
    for c in &train {
        let c = usable(c, cfg.time_factor());
        let z = vae.encode(clip_tensor(&c, &eval_device)).mean;
        let [_, ch, zt, zh, zw] = z.dims();
        let v = z
            .into_data()
            .convert::<f64>()
            .try_into_vec::<f64>()
            .map_err(|e| bad("vae", format!("{e:?}")))?;
        let per = zt * zh * zw;
        for c in 0..ch {
            for x in &v[c * per..(c + 1) * per] {
                sum[c] += x;
                sq[c] += x * x;
            }
        }
        n += per as f64;
    }
    let latent_mean: Vec<f64> = sum.iter().map(|s| s / n).collect();
    let latent_std: Vec<f64> = sq
        .iter()
        .zip(&latent_mean)
        .map(|(s, m)| (s / n - m * m).max(0.0).sqrt())
        .collect();
    let holdout = evaluate(
        &vae,
        cfg,
        &held,
        Some(&run.join("holdout_preview.gif")),
        &eval_device,
        None,
    )?;
    // The training device differentiates, as refinement needs.
    let e = &recipe.eval;
    let holdout_refined = if e.refine > 0 {
        Some(evaluate(
            &vae,
            cfg,
            &held,
            None,
            &eval_device,
            Some(Refine {
                steps: e.refine,
                lr: e.refine_lr,
            }),
        )?)
    } else {
        None
    };
    let tail = &losses[losses.len().saturating_sub(10)..];
    let summary = VaeSummary {
        final_loss: tail.iter().sum::<f64>() / tail.len().max(1) as f64,
        linear_explained,
        holdout,
        holdout_refined,
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
