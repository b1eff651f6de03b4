//! Training and scoring the causal video VAE as library calls: [`VaeTrainer`] (AdamW on random
//! crops of a set of clips, the linear path fitted to them first, the shared warm-up + cosine
//! schedule), [`latent_statistics`] of the posterior means, [`evaluate`] / [`reconstruct`]
//! next to the same-size resize baseline, and [`split_clips`] (a held-out split of a folder).
//! `burn-recipes train` on a VAE recipe drives these and writes the run folder.
//!
//! ```
//! use burn::tensor::Device;
//! use burn_parallel::lr_schedule::LrSchedule;
//! use burn_video::synthetic::{Label, generate};
//! use burn_video::vae::VaeConfig;
//! use burn_video::vae_training::{VaeTrainer, VaeTrainingConfig, evaluate};
//!
//! // Two labelled synthetic clips of 5 frames at 16×16.
//! let clips: Vec<_> = (0..2).map(|i| generate(&Label::nth(i), 16, 5, i as u64).unwrap()).collect();
//! let vae_config = VaeConfig { channels: vec![4; 4], latent: 4, groups: 2, ..VaeConfig::default() };
//! let config = VaeTrainingConfig {
//!     steps: 2,
//!     batch: 1,
//!     frames: 5,
//!     crop: 16,
//!     schedule: LrSchedule::constant(1e-3, 0, 2),
//!     grad_clip: Some(1.0),
//!     seed: 0,
//! };
//! let device = Device::flex().autodiff();
//! let vae = vae_config.init(&device).unwrap();
//! let mut trainer = VaeTrainer::new(vae, &vae_config, &config, clips.clone(), &device).unwrap();
//! let first = trainer.step().unwrap();
//! assert_eq!(first.step, 1);
//! assert!(first.loss.is_finite());
//! trainer.step().unwrap();
//! let report = evaluate(trainer.vae(), &vae_config, &clips, None, &device, None).unwrap();
//! assert_eq!(report.clips, 2);
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use burn_parallel::lr_schedule::LrSchedule;
use burn_parallel::optim::{
    AdamWConfig, DistributedAdamW, GradientBuffer, OptimizerState, replicated_roles,
};
use burn_parallel::rng::mix;
use serde::Serialize;

use crate::camera::{CorpusEntry, Split, read_corpus};
use crate::clip::{Clip, list_clips};
use crate::error::{Result, invalid};
use crate::resample::{quality, same_size_baseline};
use crate::tensor::{clip_tensor, crops, scalar, to_clip, usable};
use crate::vae::{LinearPath, Vae, VaeConfig};

/// Crops, batch, schedule and seed of a VAE training run.
#[derive(Debug, Clone, PartialEq)]
pub struct VaeTrainingConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Crops per step.
    pub batch: usize,
    /// Frames of a crop (`1 + k ×` the temporal factor).
    pub frames: usize,
    /// Side of a square crop (a multiple of the spatial factor).
    pub crop: usize,
    /// The learning rate of each step.
    pub schedule: LrSchedule,
    /// Gradient clipping by global norm.
    pub grad_clip: Option<f64>,
    /// Seed of the crop draws (step `s` draws from its own stream).
    pub seed: u64,
}

impl VaeTrainingConfig {
    /// Checks the run against the VAE's compression factors; errors name the field (`frames`,
    /// `crop`, `steps`, `batch`, or the schedule's `lr`, `min_lr`, `warmup_steps`).
    pub fn validate(&self, vae: &VaeConfig) -> Result<()> {
        let (ft, fs) = (vae.time_factor(), vae.space_factor());
        if self.frames == 0 || !(self.frames - 1).is_multiple_of(ft) {
            return Err(invalid(
                "frames",
                format!(
                    "{} is not 1 + a multiple of the temporal factor {ft}",
                    self.frames
                ),
            ));
        }
        if self.crop == 0 || !self.crop.is_multiple_of(fs) {
            return Err(invalid(
                "crop",
                format!("{} is not a multiple of the spatial factor {fs}", self.crop),
            ));
        }
        for (name, v) in [("steps", self.steps), ("batch", self.batch)] {
            if v == 0 {
                return Err(invalid(name, "must be at least 1"));
            }
        }
        self.schedule.validate().map_err(|e| match e {
            burn_parallel::ParallelError::InvalidArgument { name, reason } => invalid(name, reason),
            other => other.into(),
        })
    }
}

/// What one training step measured (one line of a run's `metrics.jsonl`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct VaeStep {
    /// Steps done, this one included.
    pub step: usize,
    /// The total loss.
    pub loss: f64,
    /// Its L1 term.
    pub l1: f64,
    /// Its squared-error term.
    pub mse: f64,
    /// Its image-gradient term.
    pub gradient: f64,
    /// Its KL term.
    pub kl: f64,
    /// The step's learning rate.
    pub lr: f64,
    /// Seconds since the first step began.
    pub seconds: f64,
}

/// A VAE being trained on random crops of a set of clips: each step draws `batch` crops of
/// `frames × crop × crop`, takes the loss of [`Vae::loss`] with a sampled posterior and makes
/// one AdamW step (no weight decay) at the schedule's rate. Steps are reproducible: step `s`
/// draws its crops from `(seed, s)`.
pub struct VaeTrainer {
    vae: Vae,
    vae_config: VaeConfig,
    config: VaeTrainingConfig,
    clips: Vec<Clip>,
    device: Device,
    opt: DistributedAdamW,
    next: usize,
    began: Option<Instant>,
}

impl VaeTrainer {
    /// A trainer of `vae` (on `device`, an autodiff one) on `clips`; every clip must hold a
    /// crop (error naming `crop`), the configuration must pass
    /// [`VaeTrainingConfig::validate`].
    pub fn new(
        vae: Vae,
        vae_config: &VaeConfig,
        config: &VaeTrainingConfig,
        clips: Vec<Clip>,
        device: &Device,
    ) -> Result<Self> {
        config.validate(vae_config)?;
        if clips.is_empty() {
            return Err(invalid("clips", "no clips to train on"));
        }
        for c in &clips {
            let (w, h) = c.size();
            if c.len() < config.frames || w < config.crop || h < config.crop {
                return Err(invalid(
                    "crop",
                    format!(
                        "a {w}x{h} clip of {} frames is smaller than a crop",
                        c.len()
                    ),
                ));
            }
        }
        let opt = DistributedAdamW::single_rank(AdamWConfig {
            lr: config.schedule.lr,
            weight_decay: 0.0,
            max_grad_norm: config.grad_clip,
            ..AdamWConfig::default()
        })?;
        Ok(Self {
            vae,
            vae_config: vae_config.clone(),
            config: config.clone(),
            clips,
            device: device.clone(),
            opt,
            next: 0,
            began: None,
        })
    }

    /// Starts the linear path (`vae.linear`) at the principal components of the training
    /// clips' blocks (each clip cropped to whole blocks) and returns the share of their
    /// variance it explains; `None` without a linear path. Call it before the first step.
    pub fn fit_linear(&mut self) -> Result<Option<f64>> {
        let cfg = &self.vae_config;
        if cfg.linear == LinearPath::None {
            return Ok(None);
        }
        let fit_device = Device::flex();
        let fs = cfg.space_factor();
        let clips: Vec<Tensor<5>> = self
            .clips
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
        let (fitted, explained) = self.vae.clone().fit_linear(&clips)?;
        self.vae = fitted;
        Ok(Some(explained))
    }

    /// One optimizer step on the next batch of crops.
    pub fn step(&mut self) -> Result<VaeStep> {
        let began = *self.began.get_or_insert_with(Instant::now);
        let (step, c) = (self.next, &self.config);
        let mut state = mix(c.seed ^ (step as u64).wrapping_mul(0x9E37_79B9));
        let mut draw = |n: usize| {
            state = mix(state);
            (state % n as u64) as usize
        };
        let (mut picked, mut at) = (Vec::new(), Vec::new());
        for _ in 0..c.batch {
            let clip = &self.clips[draw(self.clips.len())];
            let (w, h) = clip.size();
            at.push((
                draw(clip.len() - c.frames + 1),
                draw(h - c.crop + 1),
                draw(w - c.crop + 1),
            ));
            picked.push(clip);
        }
        let x = crops(&picked, &at, c.frames, (c.crop, c.crop), &self.device);
        let loss = self.vae.loss(x, &self.vae_config, true);
        let value = scalar(loss.total.clone());
        let mut grads = GradientBuffer::new();
        grads.add(&self.vae, &loss.total.backward())?;
        let lr = c.schedule.at(step);
        self.opt.set_lr(lr);
        let roles = replicated_roles(&self.vae);
        self.vae = self.opt.step_buffered(self.vae.clone(), grads, &roles)?.0;
        self.next += 1;
        Ok(VaeStep {
            step: self.next,
            loss: value,
            l1: scalar(loss.l1),
            mse: scalar(loss.mse),
            gradient: scalar(loss.gradient),
            kl: scalar(loss.kl),
            lr,
            seconds: began.elapsed().as_secs_f64(),
        })
    }

    /// A trainer of a new VAE of `vae_config` on `device` (an autodiff one): the device's
    /// generator is seeded with `config.seed` first, so the initialisation and the
    /// posterior's noise — and with the seeded crop draws, the whole run — repeat bit for bit
    /// (Burn's generator belongs to the process: other threads drawing random tensors
    /// meanwhile take draws of this run).
    pub fn seeded(
        vae_config: &VaeConfig,
        config: &VaeTrainingConfig,
        clips: Vec<Clip>,
        device: &Device,
    ) -> Result<Self> {
        device.seed(config.seed);
        let vae = vae_config.init(device)?;
        Self::new(vae, vae_config, config, clips, device)
    }

    /// Runs the steps left of the run's `steps`, handing each step's measurements to
    /// `on_step` (metrics, progress); returns them.
    pub fn fit(&mut self, mut on_step: impl FnMut(&VaeStep) -> Result<()>) -> Result<Vec<VaeStep>> {
        let mut done = Vec::new();
        while self.next < self.config.steps {
            let step = self.step()?;
            on_step(&step)?;
            done.push(step);
        }
        Ok(done)
    }

    /// Writes the VAE and the optimizer state as a checkpoint of `run_dir` after the steps
    /// taken (one rank); returns its folder.
    pub fn save(&self, run_dir: &Path) -> Result<PathBuf> {
        let meta = burn_parallel::checkpoint::TrainingMeta {
            step: self.next,
            world: 1,
            next_sequence: 0,
            seed: self.config.seed,
            layout: None,
        };
        let comm = burn_parallel::comm::SingleRank::new();
        Ok(burn_parallel::checkpoint::save(
            run_dir,
            &meta,
            &self.vae,
            &self.opt.state()?,
            &comm,
            1,
        )?)
    }

    /// Steps taken.
    pub fn steps_done(&self) -> usize {
        self.next
    }

    /// The clips it trains on.
    pub fn clips(&self) -> &[Clip] {
        &self.clips
    }

    /// The VAE as trained so far.
    pub fn vae(&self) -> &Vae {
        &self.vae
    }

    /// The optimizer's state (master weights and moments), for a checkpoint.
    pub fn optimizer_state(&self) -> Result<OptimizerState> {
        Ok(self.opt.state()?)
    }

    /// The trained VAE.
    pub fn into_vae(self) -> Vae {
        self.vae
    }
}

/// Per-channel mean and standard deviation of the posterior means of `clips` (each cut to
/// whole latent steps), the statistics a latent cache normalises with.
pub fn latent_statistics(
    vae: &Vae,
    cfg: &VaeConfig,
    clips: &[Clip],
    device: &Device,
) -> Result<(Vec<f64>, Vec<f64>)> {
    // Off autodiff: on an autodiff device each encode of a trained VAE would keep its graph
    // (and its activations) for a backward pass that never comes.
    let (vae, device) = (vae.valid(), &device.clone().without_autodiff());
    let (mut sum, mut sq, mut n) = (vec![0f64; cfg.latent], vec![0f64; cfg.latent], 0f64);
    for c in clips {
        let c = usable(c, cfg.time_factor());
        let z = vae.encode(clip_tensor(&c, device)).mean;
        let [_, ch, zt, zh, zw] = z.dims();
        let v = z
            .into_data()
            .convert::<f64>()
            .try_into_vec::<f64>()
            .map_err(|e| invalid("vae", format!("reading a latent: {e:?}")))?;
        let per = zt * zh * zw;
        for c in 0..ch {
            for x in &v[c * per..(c + 1) * per] {
                sum[c] += x;
                sq[c] += x * x;
            }
        }
        n += per as f64;
    }
    let mean: Vec<f64> = sum.iter().map(|s| s / n).collect();
    let std = sq
        .iter()
        .zip(&mean)
        .map(|(s, m)| (s / n - m * m).max(0.0).sqrt())
        .collect();
    Ok((mean, std))
}

/// Clips of `dir`, split into (training, held out). A corpus folder (with the manifest
/// [`crate::camera::MANIFEST`]) is split by its manifest: every clip of a held-out source is held
/// out and no clip of one is trained on, whatever `every`. A plain folder: clip `i` (sorted by
/// name) is held out when `i % every == every − 1`.
pub fn split_clips(dir: &Path, every: usize) -> Result<(Vec<Clip>, Vec<Clip>)> {
    let (train, held) = split_clips_by_source(dir, every)?;
    Ok((
        train,
        held.into_iter().flat_map(|(_, clips)| clips).collect(),
    ))
}

/// Clips under a name (a corpus's source).
pub type ClipGroup = (String, Vec<Clip>);

/// [`split_clips`] with the held-out clips grouped by source (sources in manifest order); a
/// plain folder's held-out clips form one group with an empty name.
pub fn split_clips_by_source(dir: &Path, every: usize) -> Result<(Vec<Clip>, Vec<ClipGroup>)> {
    if let Some(entries) = read_corpus(dir)? {
        let train = corpus_clips(dir, &entries, Split::Train)?
            .into_iter()
            .flat_map(|(_, clips)| clips)
            .collect();
        return Ok((train, corpus_clips(dir, &entries, Split::Holdout)?));
    }
    let paths = list_clips(dir)?;
    if paths.is_empty() {
        return Err(invalid("clips", format!("{}: no clips", dir.display())));
    }
    let (mut train, mut held) = (Vec::new(), Vec::new());
    for (i, p) in paths.iter().enumerate() {
        let c = Clip::read(p)?;
        if every > 1 && i % every == every - 1 {
            held.push(c);
        } else {
            train.push(c);
        }
    }
    Ok((train, vec![(String::new(), held)]))
}

/// The held-out clips of a corpus folder by source (sources in manifest order), or `None`
/// for a plain folder of clips.
pub fn held_out_sources(dir: &Path) -> Result<Option<Vec<ClipGroup>>> {
    match read_corpus(dir)? {
        Some(entries) => corpus_clips(dir, &entries, Split::Holdout).map(Some),
        None => Ok(None),
    }
}

/// The clips of one split of a corpus (its manifest `entries`), grouped by source.
fn corpus_clips(dir: &Path, entries: &[CorpusEntry], split: Split) -> Result<Vec<ClipGroup>> {
    let mut groups: Vec<ClipGroup> = Vec::new();
    for e in entries.iter().filter(|e| e.split == split) {
        let clip = Clip::read(&dir.join(&e.clip))?;
        match groups.iter_mut().find(|(name, _)| *name == e.source) {
            Some((_, clips)) => clips.push(clip),
            None => groups.push((e.source.clone(), vec![clip])),
        }
    }
    if groups.is_empty() {
        let which = match split {
            Split::Train => "training",
            Split::Holdout => "held-out",
        };
        return Err(invalid(
            "clips",
            format!("{}: the corpus has no {which} clip", dir.display()),
        ));
    }
    Ok(groups)
}

/// Encode-time refinement of the latent ([`Vae::encode_refined`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Refine {
    /// Adam steps on the latent.
    pub steps: usize,
    /// Their step size.
    pub lr: f64,
}

/// Reconstructs `clip` (cut to whole latent steps) through the posterior mean, refined
/// against the decoder when `refine` is given (the VAE then on an autodiff device).
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
        .map_err(|e| invalid("clips", e.to_string()))?;
    // Off autodiff (see `latent_statistics`), but for refinement, which differentiates the
    // latent alone.
    let plain = vae.valid();
    let z = match refine {
        Some(r) => vae
            .encode_refined(clip_tensor(&c, d), r.steps, r.lr)
            .map_err(|e| invalid("refine", e.to_string()))?
            .without_autodiff(),
        None => {
            let x = clip_tensor(&c, &d.clone().without_autodiff());
            plain.encode(x).mean
        }
    };
    to_clip(plain.decode(z))
}

/// What [`evaluate`] reports.
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

/// Scores `vae` and the resize baseline of its latent size on `clips`; writes a side-by-side
/// preview (original | VAE | baseline) of the first clip to `preview` when given.
pub fn evaluate(
    vae: &Vae,
    cfg: &VaeConfig,
    clips: &[Clip],
    preview: Option<&Path>,
    d: &Device,
    refine: Option<Refine>,
) -> Result<VaeEval> {
    let groups = [(String::new(), clips.to_vec())];
    Ok(evaluate_groups(vae, cfg, &groups, preview, d, refine)?.0)
}

/// [`evaluate`] on named groups of clips (a corpus's held-out sources), each clip
/// reconstructed once: the scores of every clip together, and of each group.
pub fn evaluate_groups(
    vae: &Vae,
    cfg: &VaeConfig,
    groups: &[ClipGroup],
    preview: Option<&Path>,
    d: &Device,
    refine: Option<Refine>,
) -> Result<(VaeEval, Vec<(String, VaeEval)>)> {
    let mut scored = Vec::with_capacity(groups.len());
    for (name, clips) in groups {
        let (mut ours, mut base) = (Vec::new(), Vec::new());
        for clip in clips {
            let c = usable(clip, cfg.time_factor());
            let (w, h) = c.size();
            let shape = cfg
                .latent_shape(c.len(), h, w)
                .map_err(|e| invalid("clips", e.to_string()))?;
            let rec = reconstruct(vae, cfg, &c, d, refine)?;
            let b = same_size_baseline(&c, shape)?;
            ours.push((c.clone(), rec));
            base.push((c, b));
        }
        scored.push((name.clone(), ours, base));
    }
    let first = scored.iter().find_map(|(_, o, b)| o.first().zip(b.first()));
    if let (Some(path), Some(((c, r), (_, b)))) = (preview, first) {
        c.side_by_side(r)
            .and_then(|x| x.side_by_side(b))
            .and_then(|x| x.write_gif(path, 100))?;
    }
    let score = |ours: &[(Clip, Clip)], base: &[(Clip, Clip)]| -> Result<VaeEval> {
        let (vae_psnr, vae_ssim) = quality(ours)?;
        let (baseline_psnr, baseline_ssim) = quality(base)?;
        Ok(VaeEval {
            clips: ours.len(),
            vae_psnr,
            vae_ssim,
            baseline_psnr,
            baseline_ssim,
        })
    };
    let per_group = scored
        .iter()
        .map(|(name, o, b)| Ok((name.clone(), score(o, b)?)))
        .collect::<Result<_>>()?;
    let (mut all_ours, mut all_base) = (Vec::new(), Vec::new());
    for (_, ours, base) in scored {
        all_ours.extend(ours);
        all_base.extend(base);
    }
    Ok((score(&all_ours, &all_base)?, per_group))
}
