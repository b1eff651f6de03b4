//! A causal 3-D convolutional video VAE (the MUG-V / CogVideoX shape at small scale).
//!
//! Video is `[B, 3, T, H, W]` with values in `[-1, 1]` and `T = 1 + k·ft` frames. Every
//! convolution is causal in time: frames are padded at the front only (with copies of the first
//! frame), so an output frame never sees a later input frame, and normalisation is per frame
//! (GroupNorm over channels and space). Temporal downsampling (stride 2 over time, kernel 3)
//! maps `1 + 2n` frames to `1 + n`: the first frame is encoded alone, then groups of frames.
//! The encoder stacks GroupNorm + SiLU residual blocks and strided-convolution downsampling
//! (`spatial_down` halvings of H and W, the first `temporal_down` of them also halving time);
//! a diagonal-Gaussian posterior gives the latent `[B, latent, 1 + (T−1)/ft, H/fs, W/fs]`. The
//! decoder mirrors it with depth-to-space upsampling (a convolution to `r·c` channels rearranged
//! into space and time; temporal upsampling drops the first of the duplicated frames so
//! `1 + n` frames become `1 + 2n`).
//!
//! Every down- and upsampling step and the latent bottleneck also carry DC-AE's
//! non-parametric shortcuts (Chen et al. 2024, residual autoencoding): space-to-channel then a
//! mean over channel groups going down, channel repetition then depth-to-space going up, so the
//! network starts close to a box-filter resize and learns the residual.
//!
//! The loss is L1 + a gradient (structural) term: the L1 of the spatial finite differences,
//! + `kl_weight` × KL to the standard normal.

use burn::module::{Module, Param};
use burn::nn::conv::{Conv3d, Conv3dConfig};
use burn::nn::{GroupNorm, GroupNormConfig, PaddingConfig3d};
use burn::tensor::{Device, Distribution, Tensor, TensorData, activation};
use serde::{Deserialize, Serialize};

use crate::error::{Result, invalid};

/// Sizes of the VAE.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaeConfig {
    /// Channels after the input patchify, then after each downsampling level
    /// (`levels() + 1` entries).
    pub channels: Vec<usize>,
    /// Latent channels.
    pub latent: usize,
    /// Spatial halvings (8× = 3).
    pub spatial_down: usize,
    /// Temporal halvings (4× = 2, 8× = 3).
    pub temporal_down: usize,
    /// Spatial patch size folded into channels before the first convolution (a power of two
    /// up to the spatial factor; LTX-Video's input patchify): it takes `log2(patch)` of the
    /// spatial halvings, so the convolutions run on `patch`× fewer rows and columns.
    #[serde(default = "one")]
    pub patch: usize,
    /// A linear path beside the deep one, which then learns only its residual (see
    /// [`LinearPath`]); `true` / `false` read as `"blocks"` / `"none"`.
    #[serde(default)]
    pub linear: LinearPath,
    /// GroupNorm groups (must divide every channel count).
    pub groups: usize,
    /// Weight of the KL term.
    pub kl_weight: f64,
    /// Weight of the gradient term.
    pub gradient_weight: f64,
    /// The reconstruction term.
    #[serde(default)]
    pub reconstruction: Reconstruction,
}

/// The reconstruction term of the VAE loss.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reconstruction {
    /// Mean absolute error over all pixels.
    #[default]
    L1,
    /// Mean over frames of `ln(MSE_frame + 1e-6)` (pixels in `[0, 1]`): minus the mean
    /// per-frame PSNR up to the factor `10 / ln 10`, the quantity the evaluation averages.
    /// Every frame's error counts relative to its size, so nearly flat content (where a
    /// resize is already good) is reconstructed as carefully as texture; the floor caps a
    /// frame's weight at 60 dB.
    LogMse,
}

/// The linear path of the VAE (`vae.linear`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LinearPath {
    /// The deep path alone (with DC-AE's non-parametric shortcuts).
    #[default]
    None,
    /// A learned causal convolution from pixels to the latent with kernel = stride = the
    /// compression (first frame alone, then groups of frames) and its depth-to-space inverse,
    /// set by [`Vae::fit_linear`] to the best linear code of the blocks (their principal
    /// components). A block transform: its errors concentrate on the block edges, which
    /// shows on smooth content.
    Blocks,
    /// The resize baseline's own representation at twice the latent's resolution, plus
    /// learned blocks for the rest: the first [`SMOOTH_CHANNELS`] latent channels hold, per
    /// latent step, an image on `2×` the latent grid (each 2×2 of sub-pixels and the RGB
    /// colours in channels), decoded by linear upsampling in space and linear interpolation in
    /// time between consecutive latent steps. The first frame is coded alone, as its
    /// anti-aliased linear downsample; every later step as the downsample of the
    /// least-squares fit of its group of frames given the previous step's image (so still
    /// causal). The remaining channels are a [`LinearPath::Blocks`] code of what that leaves,
    /// fitted to its principal components. The fixed part has no block edges; needs
    /// `latent > SMOOTH_CHANNELS`.
    Smooth,
}

impl<'de> Deserialize<'de> for LinearPath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = LinearPath;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(r#""none", "blocks", "smooth" or a boolean"#)
            }
            fn visit_bool<E: serde::de::Error>(
                self,
                v: bool,
            ) -> std::result::Result<LinearPath, E> {
                Ok(if v {
                    LinearPath::Blocks
                } else {
                    LinearPath::None
                })
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<LinearPath, E> {
                match v {
                    "none" => Ok(LinearPath::None),
                    "blocks" => Ok(LinearPath::Blocks),
                    "smooth" => Ok(LinearPath::Smooth),
                    _ => Err(E::unknown_variant(v, &["none", "blocks", "smooth"])),
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// Latent channels of the fixed part of [`LinearPath::Smooth`]: RGB × the 2×2 sub-pixels.
pub const SMOOTH_CHANNELS: usize = 3 * SMOOTH_SUB * SMOOTH_SUB;

/// Sub-pixels per latent pixel side of [`LinearPath::Smooth`]'s grid.
const SMOOTH_SUB: usize = 2;

/// MSE floor of [`Reconstruction::LogMse`] (pixels in `[0, 1]`).
const LOG_MSE_FLOOR: f64 = 1e-6;

fn one() -> usize {
    1
}

impl Default for VaeConfig {
    /// 4×8×8 compression, 16 latent channels.
    fn default() -> Self {
        Self {
            channels: vec![32, 64, 128, 128],
            latent: 16,
            spatial_down: 3,
            temporal_down: 2,
            patch: 1,
            linear: LinearPath::None,
            groups: 8,
            kl_weight: 1e-6,
            gradient_weight: 0.5,
            reconstruction: Reconstruction::L1,
        }
    }
}

impl VaeConfig {
    /// Checks the sizes; errors name the field.
    pub fn validate(&self) -> Result<()> {
        if self.spatial_down > 6 || self.temporal_down > 6 {
            return Err(invalid(
                if self.spatial_down > 6 {
                    "spatial_down"
                } else {
                    "temporal_down"
                },
                "at most 6 halvings (64×)",
            ));
        }
        if !self.patch.is_power_of_two() || self.patch > self.space_factor() {
            return Err(invalid(
                "patch",
                format!(
                    "{} must be a power of two no larger than the spatial factor {}",
                    self.patch,
                    self.space_factor()
                ),
            ));
        }
        let levels = self.levels().len();
        if self.channels.len() != levels + 1 {
            return Err(invalid(
                "channels",
                format!(
                    "needs {} entries (one per level after the patchify, plus one), got {}",
                    levels + 1,
                    self.channels.len()
                ),
            ));
        }
        if self.groups == 0
            || self
                .channels
                .iter()
                .any(|c| *c == 0 || c % self.groups != 0)
        {
            return Err(invalid(
                "groups",
                format!(
                    "{} must divide every channel count {:?}",
                    self.groups, self.channels
                ),
            ));
        }
        if self.latent == 0 {
            return Err(invalid("latent", "must be at least 1"));
        }
        if self.linear == LinearPath::Smooth && self.latent <= SMOOTH_CHANNELS {
            return Err(invalid(
                "latent",
                format!(
                    "{} must be more than {SMOOTH_CHANNELS} with linear = \"smooth\" (its fixed \
                     part takes {SMOOTH_CHANNELS} channels)",
                    self.latent
                ),
            ));
        }
        for (name, v) in [
            ("kl_weight", self.kl_weight),
            ("gradient_weight", self.gradient_weight),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(invalid(name, "must be a finite number >= 0"));
            }
        }
        Ok(())
    }

    /// The downsampling levels in encoder order: `(halves time, halves space)` each. The
    /// spatial halvings left after the patchify come first, each with a temporal one while
    /// those last; temporal halvings beyond them get levels of their own.
    pub fn levels(&self) -> Vec<(bool, bool)> {
        let spatial = self.spatial_down - self.patch.trailing_zeros() as usize;
        (0..spatial.max(self.temporal_down))
            .map(|i| (i < self.temporal_down, i < spatial))
            .collect()
    }

    /// Latent channels of the fixed smooth code (0 unless `linear = "smooth"`).
    fn smooth_channels(&self) -> usize {
        if self.linear == LinearPath::Smooth {
            SMOOTH_CHANNELS
        } else {
            0
        }
    }

    /// Temporal compression factor.
    pub fn time_factor(&self) -> usize {
        1 << self.temporal_down
    }

    /// Spatial compression factor.
    pub fn space_factor(&self) -> usize {
        1 << self.spatial_down
    }

    /// Latent shape `[latent, t, h, w]` of a `frames × height × width` clip, or why it cannot be
    /// encoded.
    pub fn latent_shape(&self, frames: usize, height: usize, width: usize) -> Result<[usize; 4]> {
        let (ft, fs) = (self.time_factor(), self.space_factor());
        if frames == 0 || !(frames - 1).is_multiple_of(ft) {
            return Err(invalid(
                "frames",
                format!("{frames} is not 1 + a multiple of the temporal factor {ft}"),
            ));
        }
        if !height.is_multiple_of(fs) || !width.is_multiple_of(fs) || height == 0 || width == 0 {
            return Err(invalid(
                "size",
                format!("{height}x{width} is not a multiple of the spatial factor {fs}"),
            ));
        }
        Ok([self.latent, 1 + (frames - 1) / ft, height / fs, width / fs])
    }

    /// A freshly initialised VAE.
    pub fn init(&self, device: &Device) -> Result<Vae> {
        self.validate()?;
        let c = &self.channels;
        let g = self.groups;
        let levels = self.levels();
        let down = levels
            .iter()
            .enumerate()
            .map(|(i, &(temporal, spatial))| {
                let (st, ss) = (1 + usize::from(temporal), 1 + usize::from(spatial));
                DownLevel {
                    res: ResBlock::new(c[i], c[i], g, device),
                    down: CausalConv3d::new(c[i], c[i + 1], [3, 3, 3], [st, ss, ss], device),
                    temporal,
                    spatial,
                    c_out: c[i + 1],
                }
            })
            .collect();
        let last = c[levels.len()];
        let up = levels
            .iter()
            .enumerate()
            .rev()
            .map(|(i, &(temporal, spatial))| {
                let r = (1 + usize::from(temporal)) * (1 + 3 * usize::from(spatial));
                UpLevel {
                    up: Upsample {
                        conv: CausalConv3d::new(c[i + 1], c[i] * r, [3, 3, 3], [1, 1, 1], device),
                        temporal,
                        spatial,
                    },
                    res: ResBlock::new(c[i], c[i], g, device),
                    c_out: c[i],
                }
            })
            .collect();
        let pixels = 3 * self.patch * self.patch;
        let (ft, fs) = (self.time_factor(), self.space_factor());
        let mut conv_moments = moments(last, self.latent, device);
        let mut conv_out = CausalConv3d::new(c[0], pixels, [3, 3, 3], [1, 1, 1], device);
        let has_linear = self.linear != LinearPath::None;
        if has_linear {
            // The deep path starts as a zero residual of the linear code.
            zero_outputs(&mut conv_moments, self.latent);
            zero_outputs(&mut conv_out, pixels);
        }
        // The learned blocks' share of the latent.
        let blocks = self.latent - self.smooth_channels();
        Ok(Vae {
            linear_in: has_linear.then(|| CausalConv3d::patch(3, blocks, [ft, fs, fs], device)),
            linear_out: has_linear
                .then(|| CausalConv3d::new(blocks, 3 * ft * fs * fs, [1, 1, 1], [1, 1, 1], device)),
            smooth: self.smooth_channels(),
            conv_in: CausalConv3d::new(pixels, c[0], [3, 3, 3], [1, 1, 1], device),
            down,
            mid_enc: ResBlock::new(last, last, g, device),
            norm_out: norm(g, last, device),
            conv_moments,
            conv_latent: CausalConv3d::new(self.latent, last, [3, 3, 3], [1, 1, 1], device),
            mid_dec: ResBlock::new(last, last, g, device),
            up,
            norm_dec: norm(g, c[0], device),
            conv_out,
            latent: self.latent,
            patch: self.patch,
            factors: (ft, fs),
        })
    }
}

mod layers;
mod linear_path;
mod loss;
mod refine;

use layers::*;
pub use layers::{CausalConv3d, DownLevel, ResBlock, UpLevel, Upsample};
use linear_path::*;
pub use loss::VaeLoss;
use loss::*;

/// The VAE.
#[derive(Module, Debug)]
pub struct Vae {
    conv_in: CausalConv3d,
    down: Vec<DownLevel>,
    mid_enc: ResBlock,
    norm_out: GroupNorm,
    conv_moments: CausalConv3d,
    conv_latent: CausalConv3d,
    mid_dec: ResBlock,
    up: Vec<UpLevel>,
    norm_dec: GroupNorm,
    conv_out: CausalConv3d,
    linear_in: Option<CausalConv3d>,
    linear_out: Option<CausalConv3d>,
    /// Leading latent channels of the fixed smooth code (0 without it).
    #[module(skip)]
    smooth: usize,
    #[module(skip)]
    latent: usize,
    #[module(skip)]
    patch: usize,
    /// Temporal and spatial compression.
    #[module(skip)]
    factors: (usize, usize),
}

/// The diagonal-Gaussian posterior of a clip.
#[derive(Debug, Clone)]
pub struct Posterior {
    /// Mean `[B, latent, t, h, w]`.
    pub mean: Tensor<5>,
    /// Log-variance, same shape.
    pub logvar: Tensor<5>,
}

impl Posterior {
    /// A sample `mean + σ·ε`.
    pub fn sample(&self) -> Tensor<5> {
        let eps = Tensor::random(
            self.mean.dims(),
            Distribution::Normal(0.0, 1.0),
            &self.mean.device(),
        );
        self.mean.clone() + (self.logvar.clone() * 0.5).exp() * eps
    }

    /// KL divergence to the standard normal, mean over elements.
    pub fn kl(&self) -> Tensor<1> {
        let var = self.logvar.clone().exp();
        ((self.mean.clone().powi_scalar(2) + var - self.logvar.clone() - 1.0) * 0.5).mean()
    }
}

impl Vae {
    /// Latent channels.
    pub fn latent_channels(&self) -> usize {
        self.latent
    }

    /// The (temporal, spatial) compression factors: a latent step covers `time_factor` frames
    /// (the first one frame) and a latent pixel `space_factor²` pixels.
    pub fn factors(&self) -> (usize, usize) {
        self.factors
    }

    /// The posterior of `x` `[B, 3, T, H, W]` in `[-1, 1]`.
    pub fn encode(&self, x: Tensor<5>) -> Posterior {
        self.encode_stream(x, &mut Stream::whole())
    }

    /// The posterior of `x`, encoded `chunk` latent steps at a time with the causal state
    /// carried between chunks: the same latents as [`Vae::encode`] (up to float rounding)
    /// while only one chunk's activations are alive, for clips too long to encode at once.
    /// `T` must be `1 + k · time_factor`.
    pub fn encode_chunked(&self, x: Tensor<5>, chunk: usize) -> Posterior {
        let (chunk, ft) = (chunk.max(1), self.factors.0);
        let parts = Stream::over_chunks(&x, (1 + (chunk - 1) * ft, chunk * ft), |x, s| {
            self.encode_stream(x, s)
        });
        let (means, logvars) = parts.into_iter().map(|p| (p.mean, p.logvar)).unzip();
        Posterior {
            mean: Tensor::cat(means, 2),
            logvar: Tensor::cat(logvars, 2),
        }
    }

    fn encode_stream(&self, x: Tensor<5>, s: &mut Stream) -> Posterior {
        let linear = self.linear_in.as_ref().map(|l| {
            if self.smooth == 0 {
                return l.forward_stream(x.clone(), s);
            }
            // The fixed smooth code, then the blocks of what it leaves.
            let (code, rest) = smooth_residual(x.clone(), self.factors, s);
            Tensor::cat(vec![code, l.forward_stream(rest, s)], 1)
        });
        let x = patchify(x, self.patch);
        let c = self.conv_in.conv.weight.val().dims()[0];
        let mut h = plus(
            self.conv_in.forward_stream(x.clone(), s),
            channel_repeat(x, c),
        );
        for level in &self.down {
            h = level.forward(h, s);
        }
        let h = self.mid_enc.forward(h, s);
        let z = self.latent;
        let m = self
            .conv_moments
            .forward_stream(activation::silu(frame_norm(&self.norm_out, h.clone())), s);
        // With the linear path, the deep path is its residual (no channel-mean shortcut).
        let shortcut = if linear.is_some() {
            None
        } else {
            channel_mean(h, z)
        };
        Posterior {
            mean: plus(plus(m.clone().narrow(1, 0, z), shortcut), linear),
            logvar: m.narrow(1, z, z).clamp(-30.0, 20.0),
        }
    }

    /// The clip of latent `z` `[B, latent, t, h, w]`, in `[-1, 1]` (not clamped).
    pub fn decode(&self, z: Tensor<5>) -> Tensor<5> {
        self.decode_stream(z, &mut Stream::whole())
    }

    /// [`Vae::decode`] `chunk` latent steps at a time with the causal state carried between
    /// chunks (the same frames, one chunk's activations alive at a time).
    pub fn decode_chunked(&self, z: Tensor<5>, chunk: usize) -> Tensor<5> {
        let chunk = chunk.max(1);
        Tensor::cat(
            Stream::over_chunks(&z, (chunk, chunk), |z, s| self.decode_stream(z, s)),
            2,
        )
    }

    fn decode_stream(&self, z: Tensor<5>, s: &mut Stream) -> Tensor<5> {
        let first = s.first;
        let linear = self.linear_out.as_ref().map(|l| {
            let k = self.smooth;
            let blocks = l.forward_stream(z.clone().narrow(1, k, self.latent - k), s);
            let blocks = depth_to_space(blocks, self.factors, first);
            if k == 0 {
                blocks
            } else {
                smooth_frames(z.clone().narrow(1, 0, k), self.factors, s) + blocks
            }
        });
        let c = self.mid_dec.channels();
        let h = plus(
            self.conv_latent.forward_stream(z.clone(), s),
            channel_repeat(z, c),
        );
        let mut h = self.mid_dec.forward(h, s);
        for level in &self.up {
            h = level.forward(h, s);
        }
        let pixels = 3 * self.patch * self.patch;
        let shortcut = if linear.is_some() {
            None
        } else {
            channel_mean(h.clone(), pixels)
        };
        let out = plus(
            self.conv_out
                .forward_stream(activation::silu(frame_norm(&self.norm_dec, h)), s),
            shortcut,
        );
        plus(unpatchify(out, self.patch), linear)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clip::Clip;
    use crate::metrics::Frame;
    use crate::resample::resize;

    /// `[1, 3, T, H, W]` → a clip (frames interleaved RGB).
    fn to_clip(x: &Tensor<5>) -> Clip {
        let [_, _, t, h, w] = x.dims();
        let v = x.clone().into_data().try_into_vec::<f32>().unwrap();
        let frames = (0..t)
            .map(|f| {
                let px = (0..h * w * 3)
                    .map(|i| v[(((i % 3) * t + f) * h + i / 3 / w) * w + i / 3 % w])
                    .collect();
                Frame::new(w, h, 3, px).unwrap()
            })
            .collect();
        Clip::new(frames).unwrap()
    }

    fn max_abs_diff(a: &Frame, b: &[f64]) -> f64 {
        a.pixels()
            .iter()
            .zip(b)
            .map(|(x, y)| (f64::from(*x) - y).abs())
            .fold(0.0, f64::max)
    }

    /// The smooth code, checked with resample's CPU resize: the first frame decodes to the
    /// resize baseline's frame (down to the code's size and back), every later key frame to
    /// the resize of its group's least-squares target given the previous key frame, and the
    /// frames in between to the linear interpolation of the two.
    #[test]
    fn the_smooth_path_codes_each_group_by_least_squares_between_key_frames() {
        let d = Device::flex();
        let (ft, fs) = (4, 8);
        let x = Tensor::<5>::random([1, 3, 9, 32, 48], Distribution::Uniform(0.0, 1.0), &d);
        let code = smooth_code(x.clone(), (ft, fs), &mut Stream::whole());
        assert_eq!(code.dims(), [1, SMOOTH_CHANNELS, 3, 4, 6]);
        let out = to_clip(&smooth_frames(code, (ft, fs), &mut Stream::whole()));
        assert_eq!((out.len(), out.size()), (9, (48, 32)));
        let clip = to_clip(&x);
        let pixels = |f: &Frame| -> Vec<f64> { f.pixels().iter().map(|&v| f64::from(v)).collect() };
        // Down to the code's 8×12 and back up, one frame.
        let squeeze = |v: Vec<f64>| -> Vec<f64> {
            let frame = Frame::new(48, 32, 3, v.into_iter().map(|v| v as f32).collect()).unwrap();
            let small = resize(&Clip::new(vec![frame]).unwrap(), 1, 8, 12).unwrap();
            pixels(&resize(&small, 1, 32, 48).unwrap().frames()[0])
        };
        let mut prev = squeeze(pixels(&clip.frames()[0]));
        let diff = max_abs_diff(&out.frames()[0], &prev);
        assert!(diff < 1e-5, "frame 0: off by {diff}");
        let w = |j: usize| j as f64 / ft as f64;
        let norm: f64 = (1..=ft).map(|j| w(j) * w(j)).sum();
        let carry: f64 = (1..=ft).map(|j| w(j) * (1.0 - w(j))).sum();
        for k in 1..3 {
            let group: Vec<Vec<f64>> = (1..=ft)
                .map(|j| pixels(&clip.frames()[ft * (k - 1) + j]))
                .collect();
            let target = (0..prev.len())
                .map(|i| {
                    let sum: f64 = (1..=ft).map(|j| w(j) * group[j - 1][i]).sum();
                    (sum - carry * prev[i]) / norm
                })
                .collect();
            let key = squeeze(target);
            for j in 1..=ft {
                let want: Vec<f64> = prev
                    .iter()
                    .zip(&key)
                    .map(|(p, c)| (1.0 - w(j)) * p + w(j) * c)
                    .collect();
                let t = ft * (k - 1) + j;
                let diff = max_abs_diff(&out.frames()[t], &want);
                assert!(diff < 1e-4, "frame {t}: off by {diff}");
            }
            prev = key;
        }
    }

    /// With the smooth path, the fitted blocks code what the smooth code leaves: the fresh
    /// VAE reconstructs its fitting clips better than the smooth code alone, by the share of
    /// variance it reports.
    #[test]
    fn the_smooth_paths_blocks_fit_what_the_smooth_code_leaves() {
        let d = Device::flex();
        let cfg = VaeConfig {
            channels: vec![16, 16, 16],
            latent: SMOOTH_CHANNELS + 4,
            groups: 4,
            patch: 4,
            linear: LinearPath::Smooth,
            ..VaeConfig::default()
        };
        let factors = (cfg.time_factor(), cfg.space_factor());
        // Smooth content plus a few repeated 8×8 textures: the blocks have something to fit.
        let base = Tensor::<5>::random([1, 3, 9, 4, 4], Distribution::Uniform(-0.5, 0.5), &d);
        let clips: Vec<Tensor<5>> = (0..3)
            .map(|i| {
                let smooth = resize_frames(base.clone() * (i as f64 + 1.0) / 3.0, 32, 32);
                let tile =
                    Tensor::<5>::random([1, 3, 1, 8, 8], Distribution::Uniform(-0.3, 0.3), &d);
                smooth + tile.repeat_dim(2, 9).repeat_dim(3, 4).repeat_dim(4, 4)
            })
            .collect();
        let (vae, explained) = cfg.init(&d).unwrap().fit_linear(&clips).unwrap();
        assert!(explained > 0.5 && explained <= 1.0, "explained {explained}");
        let mse = |a: Tensor<5>, b: &Tensor<5>| -> f64 {
            f64::from((a - b.clone()).powi_scalar(2).mean().into_scalar::<f32>())
        };
        for clip in &clips {
            let mut stream = Stream::whole();
            let code = smooth_code(clip.clone(), factors, &mut stream);
            let alone = smooth_frames(code, factors, &mut stream);
            let fitted = vae.decode(vae.encode(clip.clone()).mean);
            let (alone, fitted) = (mse(alone, clip), mse(fitted, clip));
            assert!(
                fitted < 0.7 * alone,
                "fitted {fitted} vs smooth alone {alone}"
            );
        }
    }
}
