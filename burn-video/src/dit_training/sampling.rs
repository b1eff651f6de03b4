//! Sampling a trained DiT ([`Sampler`]: Euler steps of the rectified flow from seeded noise
//! with classifier-free guidance, decoded by the latent cache's VAE) and the rule-based
//! checker's accuracy on sampled clips ([`Accuracy`]).

use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::dit::{Condition, Dit, DitConfig};
use crate::error::Result;
use crate::flow::{self, Rng};
use crate::latent_cache::CacheMeta;
use crate::text::Vocabulary;

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
        let (frames, h, w) = self.shape;
        burn_parallel::memory::require(self.memory_bytes(batch), || {
            format!(
                "sampling {batch} clip(s) of {frames} latent frames at {h}x{w} (attention over \
                 {} video tokens)",
                frames * h.div_ceil(2) * w.div_ceil(2)
            )
        })?;
        Ok(())
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
