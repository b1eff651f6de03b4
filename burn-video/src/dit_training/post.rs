//! Post-training after the curriculum ([`PostConfig`]): supervised fine-tuning on a curated
//! subset, then Diffusion-DPO on pairs of the model's own samples ranked by the rule-based
//! checker against the frozen SFT model, with the checker's accuracy measured before and
//! after ([`PostReport`]).

use std::path::PathBuf;

use burn::module::Module;
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use burn_parallel::ema::Ema;
use burn_parallel::prelude::{DistributedAdamW, GradientBuffer, replicated_roles};
use serde::{Deserialize, Serialize};

use super::sampling::{Accuracy, Sampler};
use super::{
    DitTrainer, DitTrainingConfig, LatentClip, averaged, pick, tail_mean, timesteps,
    validation_loss,
};
use crate::dit::{Condition, Dit};
use crate::error::{Result, VideoError, invalid};
use crate::flow::{self, Rng};
use crate::latent_cache::CacheMeta;
use crate::tensor::scalar;
use crate::text::Vocabulary;

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

/// Noise seed of the checker-accuracy samples during post-training.
const EVAL_SEED: u64 = 0xE7A1;

impl DitTrainer {
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
