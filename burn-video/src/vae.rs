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

use burn::module::Module;
use burn::nn::conv::{Conv3d, Conv3dConfig};
use burn::nn::{GroupNorm, GroupNormConfig, PaddingConfig3d};
use burn::tensor::{Device, Distribution, Tensor, activation};
use serde::{Deserialize, Serialize};

use crate::error::{Result, invalid};

/// Sizes of the VAE.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaeConfig {
    /// Channels at full resolution, then after each spatial downsampling
    /// (`spatial_down + 1` entries).
    pub channels: Vec<usize>,
    /// Latent channels.
    pub latent: usize,
    /// Spatial halvings (8× = 3).
    pub spatial_down: usize,
    /// How many of them also halve time (4× = 2, 8× = 3).
    pub temporal_down: usize,
    /// GroupNorm groups (must divide every channel count).
    pub groups: usize,
    /// Weight of the KL term.
    pub kl_weight: f64,
    /// Weight of the gradient term.
    pub gradient_weight: f64,
}

impl Default for VaeConfig {
    /// 4×8×8 compression, 16 latent channels.
    fn default() -> Self {
        Self {
            channels: vec![32, 64, 128, 128],
            latent: 16,
            spatial_down: 3,
            temporal_down: 2,
            groups: 8,
            kl_weight: 1e-6,
            gradient_weight: 0.5,
        }
    }
}

impl VaeConfig {
    /// Checks the sizes; errors name the field.
    pub fn validate(&self) -> Result<()> {
        if self.channels.len() != self.spatial_down + 1 {
            return Err(invalid(
                "channels",
                format!(
                    "needs spatial_down + 1 = {} entries, got {}",
                    self.spatial_down + 1,
                    self.channels.len()
                ),
            ));
        }
        if self.temporal_down > self.spatial_down {
            return Err(invalid(
                "temporal_down",
                "cannot exceed spatial_down (each temporal halving rides on a spatial one)",
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
        let down = (0..self.spatial_down)
            .map(|i| {
                let st = if i < self.temporal_down { 2 } else { 1 };
                DownLevel {
                    res: ResBlock::new(c[i], c[i], g, device),
                    down: CausalConv3d::new(c[i], c[i + 1], [3, 3, 3], [st, 2, 2], device),
                    temporal: st == 2,
                    c_out: c[i + 1],
                }
            })
            .collect();
        let last = c[self.spatial_down];
        let up = (0..self.spatial_down)
            .rev()
            .map(|i| {
                let temporal = i < self.temporal_down;
                let rt = if temporal { 2 } else { 1 };
                UpLevel {
                    up: Upsample {
                        conv: CausalConv3d::new(
                            c[i + 1],
                            c[i] * rt * 4,
                            [3, 3, 3],
                            [1, 1, 1],
                            device,
                        ),
                        temporal,
                    },
                    res: ResBlock::new(c[i], c[i], g, device),
                    c_out: c[i],
                }
            })
            .collect();
        Ok(Vae {
            conv_in: CausalConv3d::new(3, c[0], [3, 3, 3], [1, 1, 1], device),
            down,
            mid_enc: ResBlock::new(last, last, g, device),
            norm_out: norm(g, last, device),
            conv_moments: CausalConv3d::new(last, 2 * self.latent, [3, 3, 3], [1, 1, 1], device),
            conv_latent: CausalConv3d::new(self.latent, last, [3, 3, 3], [1, 1, 1], device),
            mid_dec: ResBlock::new(last, last, g, device),
            up,
            norm_dec: norm(g, c[0], device),
            conv_out: CausalConv3d::new(c[0], 3, [3, 3, 3], [1, 1, 1], device),
            latent: self.latent,
        })
    }
}

fn norm(groups: usize, channels: usize, device: &Device) -> GroupNorm {
    GroupNormConfig::new(groups, channels).init(device)
}

/// GroupNorm of every frame on its own (statistics over channels and space, never time).
fn frame_norm(norm: &GroupNorm, x: Tensor<5>) -> Tensor<5> {
    let [b, c, t, h, w] = x.dims();
    let frames = x.permute([0, 2, 1, 3, 4]).reshape([b * t, c, h, w]);
    norm.forward(frames)
        .reshape([b, t, c, h, w])
        .permute([0, 2, 1, 3, 4])
}

/// A 3-D convolution padded in time at the front only (copies of the first frame), so output
/// frame `i` sees input frames up to `i · stride` only; spatial padding keeps `H / stride`.
#[derive(Module, Debug)]
pub struct CausalConv3d {
    conv: Conv3d,
    #[module(skip)]
    front: usize,
}

impl CausalConv3d {
    fn new(
        c_in: usize,
        c_out: usize,
        kernel: [usize; 3],
        stride: [usize; 3],
        device: &Device,
    ) -> Self {
        let conv = Conv3dConfig::new([c_in, c_out], kernel)
            .with_stride(stride)
            .with_padding(PaddingConfig3d::Explicit(0, kernel[1] / 2, kernel[2] / 2))
            .init(device);
        Self {
            conv,
            front: kernel[0] - 1,
        }
    }

    /// `[B, C, T, H, W]` → `[B, C', 1 + (T − 1) / stride_t, H / stride_s, W / stride_s]`.
    pub fn forward(&self, x: Tensor<5>) -> Tensor<5> {
        let x = if self.front > 0 {
            let first = x.clone().narrow(2, 0, 1).repeat_dim(2, self.front);
            Tensor::cat(vec![first, x], 2)
        } else {
            x
        };
        self.conv.forward(x)
    }
}

/// GroupNorm → SiLU → causal conv, twice, plus the (projected) input.
#[derive(Module, Debug)]
pub struct ResBlock {
    norm1: GroupNorm,
    conv1: CausalConv3d,
    norm2: GroupNorm,
    conv2: CausalConv3d,
    skip: Option<CausalConv3d>,
}

impl ResBlock {
    fn new(c_in: usize, c_out: usize, groups: usize, device: &Device) -> Self {
        Self {
            norm1: norm(groups, c_in, device),
            conv1: CausalConv3d::new(c_in, c_out, [3, 3, 3], [1, 1, 1], device),
            norm2: norm(groups, c_out, device),
            conv2: CausalConv3d::new(c_out, c_out, [3, 3, 3], [1, 1, 1], device),
            skip: (c_in != c_out)
                .then(|| CausalConv3d::new(c_in, c_out, [1, 1, 1], [1, 1, 1], device)),
        }
    }

    fn channels(&self) -> usize {
        self.conv2.conv.weight.val().dims()[0]
    }

    fn forward(&self, x: Tensor<5>) -> Tensor<5> {
        let h = self
            .conv1
            .forward(activation::silu(frame_norm(&self.norm1, x.clone())));
        let h = self
            .conv2
            .forward(activation::silu(frame_norm(&self.norm2, h)));
        match &self.skip {
            Some(s) => s.forward(x) + h,
            None => x + h,
        }
    }
}

/// Space (and, when `temporal`, time) to channels, then the mean over groups of channels down to
/// `c_out`: the non-parametric shortcut of a downsampling step (DC-AE's residual
/// autoencoding). Time is made even by repeating the first frame in front (causal), so
/// `1 + 2n` frames become `1 + n`. `None` when the channels do not divide.
fn space_to_channel(x: Tensor<5>, c_out: usize, temporal: bool) -> Option<Tensor<5>> {
    let [b, c, t, h, w] = x.dims();
    let rt = if temporal { 2 } else { 1 };
    let packed = c * rt * 4;
    if !packed.is_multiple_of(c_out) {
        return None;
    }
    let (x, t) = if temporal {
        (Tensor::cat(vec![x.clone().narrow(2, 0, 1), x], 2), t + 1)
    } else {
        (x, t)
    };
    let y = x
        .reshape([b, c, t / rt, rt, h / 2, 2, w / 2, 2])
        .permute([0, 1, 3, 5, 7, 2, 4, 6])
        .reshape([b, c_out, packed / c_out, t / rt, h / 2, w / 2])
        .mean_dim(2)
        .reshape([b, c_out, t / rt, h / 2, w / 2]);
    Some(y)
}

/// Channels repeated up to `c_out · r_t · 4`, then rearranged into `r_t×` time and `2×` space:
/// the shortcut of an upsampling step (the first frame dropped when temporal). `None` when the
/// channels do not divide.
fn channel_to_space(x: Tensor<5>, c_out: usize, temporal: bool) -> Option<Tensor<5>> {
    let [b, c, t, h, w] = x.dims();
    let rt = if temporal { 2 } else { 1 };
    let packed = c_out * rt * 4;
    if !packed.is_multiple_of(c) {
        return None;
    }
    let y = x
        .unsqueeze_dim::<6>(2)
        .repeat_dim(2, packed / c)
        .reshape([b, packed, t, h, w]);
    Some(depth_to_space(y, temporal))
}

/// `[B, c · r_t · 4, T, H, W]` → `[B, c, r_t·T (− 1 when temporal), 2H, 2W]`.
fn depth_to_space(y: Tensor<5>, temporal: bool) -> Tensor<5> {
    let [b, c4, t, h, w] = y.dims();
    let rt = if temporal { 2 } else { 1 };
    let c = c4 / (rt * 4);
    // [B, C, rt, 2, 2, T, H, W] → [B, C, T, rt, H, 2, W, 2].
    let y = y
        .reshape([b, c, rt, 2, 2, t, h, w])
        .permute([0, 1, 5, 2, 6, 3, 7, 4])
        .reshape([b, c, t * rt, 2 * h, 2 * w]);
    if temporal {
        y.narrow(2, 1, t * 2 - 1)
    } else {
        y
    }
}

/// Mean over groups of channels down to `c_out` (`None` when they do not divide).
fn channel_mean(x: Tensor<5>, c_out: usize) -> Option<Tensor<5>> {
    let [b, c, t, h, w] = x.dims();
    c.is_multiple_of(c_out).then(|| {
        x.reshape([b, c_out, c / c_out, t, h, w])
            .mean_dim(2)
            .reshape([b, c_out, t, h, w])
    })
}

/// Channels repeated up to `c_out` (`None` when they do not divide).
fn channel_repeat(x: Tensor<5>, c_out: usize) -> Option<Tensor<5>> {
    let [b, c, t, h, w] = x.dims();
    c_out.is_multiple_of(c).then(|| {
        x.unsqueeze_dim::<6>(2)
            .repeat_dim(2, c_out / c)
            .reshape([b, c_out, t, h, w])
    })
}

fn plus(a: Tensor<5>, shortcut: Option<Tensor<5>>) -> Tensor<5> {
    match shortcut {
        Some(s) => a + s,
        None => a,
    }
}

/// One encoder level: a residual block, then a strided causal convolution (space halved,
/// time too when temporal), plus the space-to-channel shortcut.
#[derive(Module, Debug)]
pub struct DownLevel {
    res: ResBlock,
    down: CausalConv3d,
    #[module(skip)]
    temporal: bool,
    #[module(skip)]
    c_out: usize,
}

impl DownLevel {
    fn forward(&self, x: Tensor<5>) -> Tensor<5> {
        let h = self.res.forward(x);
        plus(
            self.down.forward(h.clone()),
            space_to_channel(h, self.c_out, self.temporal),
        )
    }
}

/// One decoder level: depth-to-space upsampling plus the channel-to-space shortcut, then a
/// residual block.
#[derive(Module, Debug)]
pub struct UpLevel {
    up: Upsample,
    res: ResBlock,
    #[module(skip)]
    c_out: usize,
}

impl UpLevel {
    fn forward(&self, x: Tensor<5>) -> Tensor<5> {
        let shortcut = channel_to_space(x.clone(), self.c_out, self.up.temporal);
        self.res.forward(plus(self.up.forward(x), shortcut))
    }
}

/// A causal convolution to `r_t · 2 · 2 · c` channels rearranged into `r_t×` time and `2×`
/// space (depth to space); temporal upsampling drops the first output frame (`1 + n` → `1 + 2n`).
#[derive(Module, Debug)]
pub struct Upsample {
    conv: CausalConv3d,
    #[module(skip)]
    temporal: bool,
}

impl Upsample {
    fn forward(&self, x: Tensor<5>) -> Tensor<5> {
        depth_to_space(self.conv.forward(x), self.temporal)
    }
}

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
    #[module(skip)]
    latent: usize,
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

/// The loss terms of one batch.
#[derive(Debug, Clone)]
pub struct VaeLoss {
    /// Weighted total.
    pub total: Tensor<1>,
    /// Mean absolute error.
    pub l1: Tensor<1>,
    /// Mean absolute error of the spatial finite differences.
    pub gradient: Tensor<1>,
    /// KL to the standard normal.
    pub kl: Tensor<1>,
    /// The reconstruction.
    pub reconstruction: Tensor<5>,
}

fn gradient_l1(a: Tensor<5>, b: Tensor<5>) -> Tensor<1> {
    let [_, _, _, h, w] = a.dims();
    let dx = |t: Tensor<5>| t.clone().narrow(4, 1, w - 1) - t.narrow(4, 0, w - 1);
    let dy = |t: Tensor<5>| t.clone().narrow(3, 1, h - 1) - t.narrow(3, 0, h - 1);
    (dx(a.clone()) - dx(b.clone())).abs().mean() + (dy(a) - dy(b)).abs().mean()
}

impl Vae {
    /// Latent channels.
    pub fn latent_channels(&self) -> usize {
        self.latent
    }

    /// The posterior of `x` `[B, 3, T, H, W]` in `[-1, 1]`.
    pub fn encode(&self, x: Tensor<5>) -> Posterior {
        let mut h = self.conv_in.forward(x);
        for level in &self.down {
            h = level.forward(h);
        }
        let h = self.mid_enc.forward(h);
        let z = self.latent;
        let m = self
            .conv_moments
            .forward(activation::silu(frame_norm(&self.norm_out, h.clone())));
        Posterior {
            mean: plus(m.clone().narrow(1, 0, z), channel_mean(h, z)),
            logvar: m.narrow(1, z, z).clamp(-30.0, 20.0),
        }
    }

    /// The clip of latent `z` `[B, latent, t, h, w]`, in `[-1, 1]` (not clamped).
    pub fn decode(&self, z: Tensor<5>) -> Tensor<5> {
        let c = self.mid_dec.channels();
        let h = plus(self.conv_latent.forward(z.clone()), channel_repeat(z, c));
        let mut h = self.mid_dec.forward(h);
        for level in &self.up {
            h = level.forward(h);
        }
        self.conv_out
            .forward(activation::silu(frame_norm(&self.norm_dec, h)))
    }

    /// Encodes, samples (or takes the mean when `sample` is false), decodes and scores `x`.
    pub fn loss(&self, x: Tensor<5>, config: &VaeConfig, sample: bool) -> VaeLoss {
        let posterior = self.encode(x.clone());
        let z = if sample {
            posterior.sample()
        } else {
            posterior.mean.clone()
        };
        let rec = self.decode(z);
        let l1 = (rec.clone() - x.clone()).abs().mean();
        let gradient = gradient_l1(rec.clone(), x);
        let kl = posterior.kl();
        let total =
            l1.clone() + gradient.clone() * config.gradient_weight + kl.clone() * config.kl_weight;
        VaeLoss {
            total,
            l1,
            gradient,
            kl,
            reconstruction: rec,
        }
    }
}
