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

/// The posterior's convolution (means, then log-variances). The log-variance bias starts at
/// `INIT_LOGVAR`: a fresh posterior of σ ≈ 1 buries the latent under noise as large as the
/// signal and the decoder learns nothing until the encoder has pushed it down, while the KL
/// term (weight ~1e-6) barely resists either way.
fn moments(c_in: usize, latent: usize, device: &Device) -> CausalConv3d {
    let mut conv = CausalConv3d::new(c_in, 2 * latent, [3, 3, 3], [1, 1, 1], device);
    if let Some(bias) = conv.conv.bias.take() {
        let mean = bias.val().narrow(0, 0, latent);
        let logvar = Tensor::<1>::full([latent], INIT_LOGVAR, device);
        conv.conv.bias = Some(Param::from_tensor(
            Tensor::cat(vec![mean, logvar], 0).detach(),
        ));
    }
    conv
}

/// Sets the weights and biases of the first `n` output channels of `conv` to zero.
fn zero_outputs(conv: &mut CausalConv3d, n: usize) {
    let w = conv.conv.weight.val();
    let dims = w.dims();
    let device = w.device();
    let n = n.min(dims[0]);
    let mut parts = vec![Tensor::<5>::zeros(
        [n, dims[1], dims[2], dims[3], dims[4]],
        &device,
    )];
    if n < dims[0] {
        parts.push(w.narrow(0, n, dims[0] - n));
    }
    conv.conv.weight = Param::from_tensor(Tensor::cat(parts, 0).detach());
    if let Some(bias) = conv.conv.bias.take() {
        let mut parts = vec![Tensor::<1>::zeros([n], &device)];
        if n < dims[0] {
            parts.push(bias.val().narrow(0, n, dims[0] - n));
        }
        conv.conv.bias = Some(Param::from_tensor(Tensor::cat(parts, 0).detach()));
    }
}

/// Appends the causal blocks of `clip` `[1, 3, T, H, W]` to `rows`, each a row of
/// `3 · ft · fs²` values (channel, time, row, column): the first frame repeated `ft` times,
/// then groups of `ft` frames, tiled by `fs × fs` squares.
fn push_blocks(clip: &Tensor<5>, (ft, fs): (usize, usize), rows: &mut Vec<f64>) -> Result<()> {
    let [b, c, t, h, w] = clip.dims();
    if b != 1 || c != 3 || !(t - 1).is_multiple_of(ft) || h % fs != 0 || w % fs != 0 {
        return Err(invalid(
            "clips",
            format!("a [{b}, {c}, {t}, {h}, {w}] clip does not tile into blocks"),
        ));
    }
    let v = clip
        .clone()
        .into_data()
        .convert::<f64>()
        .try_into_vec::<f64>()
        .map_err(|e| invalid("clips", format!("{e:?}")))?;
    // Padded time index p maps to frame max(p − (ft − 1), 0).
    let frame = |p: usize| p.saturating_sub(ft - 1);
    for bt in 0..t.div_ceil(ft) {
        for by in 0..h / fs {
            for bx in 0..w / fs {
                for ch in 0..3 {
                    for dt in 0..ft {
                        let f = frame(bt * ft + dt);
                        for dy in 0..fs {
                            let row = ((ch * t + f) * h + by * fs + dy) * w + bx * fs;
                            rows.extend_from_slice(&v[row..row + fs]);
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// The total variance (trace of the covariance) of rows of `d` values.
fn block_variance(rows: &[f64], d: usize) -> f64 {
    let n = (rows.len() / d).max(1) as f64;
    (0..d)
        .map(|i| {
            let (s, s2) = rows
                .iter()
                .skip(i)
                .step_by(d)
                .fold((0.0, 0.0), |(s, s2), v| (s + v, s2 + v * v));
            s2 / n - (s / n).powi(2)
        })
        .sum()
}

/// Initial posterior log-variance (σ ≈ 0.007).
const INIT_LOGVAR: f64 = -10.0;

/// The `k` leading eigenvectors of the symmetric `d × d` matrix `a` (row-major) by subspace
/// iteration with Gram–Schmidt re-orthonormalisation, `iterations` rounds, sorted by
/// eigenvalue.
fn top_eigenvectors(a: &[f64], d: usize, k: usize, iterations: usize) -> Vec<Vec<f64>> {
    // A deterministic start with full rank in every direction that matters.
    let mut q: Vec<Vec<f64>> = (0..k)
        .map(|j| {
            (0..d)
                .map(|i| (((i * 7919 + j * 104_729) % 1009) as f64 / 1009.0) - 0.5)
                .collect()
        })
        .collect();
    let apply = |v: &[f64]| -> Vec<f64> {
        (0..d)
            .map(|i| {
                a[i * d..(i + 1) * d]
                    .iter()
                    .zip(v)
                    .map(|(x, y)| x * y)
                    .sum()
            })
            .collect()
    };
    let orthonormalise = |q: &mut Vec<Vec<f64>>| {
        for j in 0..q.len() {
            for p in 0..j {
                let dot: f64 = q[j].iter().zip(&q[p]).map(|(x, y)| x * y).sum();
                let prev = q[p].clone();
                q[j].iter_mut().zip(&prev).for_each(|(x, y)| *x -= dot * y);
            }
            let norm = q[j].iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-300);
            q[j].iter_mut().for_each(|x| *x /= norm);
        }
    };
    orthonormalise(&mut q);
    for _ in 0..iterations {
        q = q.iter().map(|v| apply(v)).collect();
        orthonormalise(&mut q);
    }
    let mut ranked: Vec<(f64, Vec<f64>)> = q
        .into_iter()
        .map(|v| {
            let av = apply(&v);
            (v.iter().zip(&av).map(|(x, y)| x * y).sum(), v)
        })
        .collect();
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
    ranked.into_iter().map(|(_, v)| v).collect()
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

/// The causal state carried from one chunk of a clip to the next (the feature cache of
/// CogVideoX's and MUG-V's chunked VAEs): for every temporal convolution, in call order, the
/// input frames that the next chunk's first outputs still see. A clip encoded (or decoded) in
/// chunks this way gives the same latents as in one piece, with memory bounded by the chunk.
#[derive(Debug, Clone)]
struct Stream {
    prev: std::collections::VecDeque<Tensor<5>>,
    next: Vec<Tensor<5>>,
    /// The chunk starts the clip (first-frame padding, the first frame alone).
    first: bool,
    /// Keep state for a following chunk.
    keep: bool,
}

impl Stream {
    /// A whole clip in one piece.
    fn whole() -> Self {
        Self {
            prev: Default::default(),
            next: Vec::new(),
            first: true,
            keep: false,
        }
    }

    /// `f` on consecutive time chunks of `x` (`first` frames, then `rest` at a time, the
    /// last one shorter), with the causal state carried from each chunk to the next.
    fn over_chunks<T>(
        x: &Tensor<5>,
        (first, rest): (usize, usize),
        mut f: impl FnMut(Tensor<5>, &mut Self) -> T,
    ) -> Vec<T> {
        let t = x.dims()[2];
        let mut stream = Self {
            keep: true,
            ..Self::whole()
        };
        let mut out = Vec::new();
        let mut at = 0;
        while at < t {
            let len = if at == 0 { first } else { rest }.min(t - at);
            out.push(f(x.clone().narrow(2, at, len), &mut stream));
            stream.advance();
            at += len;
        }
        out
    }

    fn take(&mut self) -> Option<Tensor<5>> {
        self.prev.pop_front()
    }

    fn put(&mut self, frames: Tensor<5>) {
        self.next.push(frames);
    }

    /// Moves to the next chunk.
    fn advance(&mut self) {
        self.prev = std::mem::take(&mut self.next).into();
        self.first = false;
    }
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
        self.forward_stream(x, &mut Stream::whole())
    }

    /// A causal convolution with kernel = stride (a patch embedding) and no spatial padding:
    /// `[B, C, 1 + k·kt, H, W]` → `[B, C', 1 + k, H / ks, W / ks]`.
    fn patch(c_in: usize, c_out: usize, kernel: [usize; 3], device: &Device) -> Self {
        let conv = Conv3dConfig::new([c_in, c_out], kernel)
            .with_stride(kernel)
            .with_padding(PaddingConfig3d::Explicit(0, 0, 0))
            .init(device);
        Self {
            conv,
            front: kernel[0] - 1,
        }
    }

    /// One chunk of a clip: the first chunk is padded with copies of its first frame, a later
    /// one with the frames the previous chunk left in `stream`.
    fn forward_stream(&self, x: Tensor<5>, stream: &mut Stream) -> Tensor<5> {
        if self.front == 0 {
            return self.conv.forward(x);
        }
        // The next chunk's output frames start `stride` past this chunk's last one: it needs
        // the last `kernel − stride` padded input frames.
        let stride = self.conv.stride[0];
        let keep = (self.front + 1).saturating_sub(stride);
        let x = if stream.first {
            let first = x.clone().narrow(2, 0, 1).repeat_dim(2, self.front);
            Tensor::cat(vec![first, x], 2)
        } else if keep > 0 {
            match stream.take() {
                Some(prev) => Tensor::cat(vec![prev, x], 2),
                None => x,
            }
        } else {
            x
        };
        if stream.keep && keep > 0 {
            let t = x.dims()[2];
            stream.put(x.clone().narrow(2, t - keep, keep));
        }
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

    fn forward(&self, x: Tensor<5>, s: &mut Stream) -> Tensor<5> {
        let h = self
            .conv1
            .forward_stream(activation::silu(frame_norm(&self.norm1, x.clone())), s);
        let h = self
            .conv2
            .forward_stream(activation::silu(frame_norm(&self.norm2, h)), s);
        match &self.skip {
            Some(s) => s.forward(x) + h,
            None => x + h,
        }
    }
}

/// Space (when `spatial`) and time (when `temporal`) to channels, then the mean over groups
/// of channels down to `c_out`: the non-parametric shortcut of a downsampling step (DC-AE's
/// residual autoencoding). Time is made even by repeating the first frame in front (causal), so
/// `1 + 2n` frames become `1 + n`. `None` when the channels do not divide.
fn space_to_channel(
    x: Tensor<5>,
    c_out: usize,
    (temporal, spatial): (bool, bool),
    first: bool,
) -> Option<Tensor<5>> {
    let [b, c, t, h, w] = x.dims();
    let (rt, rs) = (1 + usize::from(temporal), 1 + usize::from(spatial));
    let packed = c * rt * rs * rs;
    if !packed.is_multiple_of(c_out) {
        return None;
    }
    let (x, t) = if temporal && first {
        (Tensor::cat(vec![x.clone().narrow(2, 0, 1), x], 2), t + 1)
    } else {
        (x, t)
    };
    let y = x
        .reshape([b, c, t / rt, rt, h / rs, rs, w / rs, rs])
        .permute([0, 1, 3, 5, 7, 2, 4, 6])
        .reshape([b, c_out, packed / c_out, t / rt, h / rs, w / rs])
        .mean_dim(2)
        .reshape([b, c_out, t / rt, h / rs, w / rs]);
    Some(y)
}

/// Channels repeated up to `c_out · r_t · r_s²`, then rearranged into `r_t×` time and `r_s×`
/// space: the shortcut of an upsampling step (the first frame dropped when temporal). `None`
/// when the channels do not divide.
fn channel_to_space(
    x: Tensor<5>,
    c_out: usize,
    (temporal, spatial): (bool, bool),
    first: bool,
) -> Option<Tensor<5>> {
    let [b, c, t, h, w] = x.dims();
    let packed = c_out * (1 + usize::from(temporal)) * (1 + 3 * usize::from(spatial));
    if !packed.is_multiple_of(c) {
        return None;
    }
    let y = x
        .unsqueeze_dim::<6>(2)
        .repeat_dim(2, packed / c)
        .reshape([b, packed, t, h, w]);
    Some(depth_to_space(
        y,
        (1 + usize::from(temporal), 1 + usize::from(spatial)),
        first,
    ))
}

/// `[B, c · r_t · r_s², T, H, W]` → `[B, c, r_t·T, r_s·H, r_s·W]`, less the first `r_t − 1`
/// frames on the first chunk of a clip (its first latent step is one frame).
fn depth_to_space(y: Tensor<5>, (rt, rs): (usize, usize), first: bool) -> Tensor<5> {
    let [b, c4, t, h, w] = y.dims();
    let c = c4 / (rt * rs * rs);
    // [B, C, rt, rs, rs, T, H, W] → [B, C, T, rt, H, rs, W, rs].
    let y = y
        .reshape([b, c, rt, rs, rs, t, h, w])
        .permute([0, 1, 5, 2, 6, 3, 7, 4])
        .reshape([b, c, t * rt, rs * h, rs * w]);
    if rt > 1 && first {
        y.narrow(2, rt - 1, t * rt - (rt - 1))
    } else {
        y
    }
}

/// `[B, 3, T, H, W]` → `[B, 3·p², T, H/p, W/p]` (each `p×p` patch of a frame into channels).
fn patchify(x: Tensor<5>, p: usize) -> Tensor<5> {
    if p == 1 {
        return x;
    }
    let [b, c, t, h, w] = x.dims();
    x.reshape([b, c, t, h / p, p, w / p, p])
        .permute([0, 1, 4, 6, 2, 3, 5])
        .reshape([b, c * p * p, t, h / p, w / p])
}

/// The inverse of [`patchify`].
fn unpatchify(x: Tensor<5>, p: usize) -> Tensor<5> {
    if p == 1 {
        return x;
    }
    let [b, cp, t, h, w] = x.dims();
    let c = cp / (p * p);
    x.reshape([b, c, p, p, t, h, w])
        .permute([0, 1, 4, 5, 2, 6, 3])
        .reshape([b, c, t, h * p, w * p])
}

/// The `[n_out, n_in]` matrix of [`crate::resample`]'s anti-aliased linear resampling.
fn resize_matrix(n_in: usize, n_out: usize, device: &Device) -> Tensor<2> {
    let mut m = vec![0f32; n_out * n_in];
    for (i, (lo, w)) in crate::resample::weights(n_in, n_out)
        .into_iter()
        .enumerate()
    {
        for (k, v) in w.into_iter().enumerate() {
            m[i * n_in + lo + k] = v as f32;
        }
    }
    Tensor::from_data(TensorData::new(m, [n_out, n_in]), device)
}

/// Every frame of `x` `[B, C, T, H, W]` resized to `h × w` (anti-aliased linear, separable:
/// rows, then columns, each one matrix product).
fn resize_frames(x: Tensor<5>, h: usize, w: usize) -> Tensor<5> {
    let [b, c, t, h0, w0] = x.dims();
    let device = x.device();
    let n = b * c * t;
    x.reshape([n * h0, w0])
        .matmul(resize_matrix(w0, w, &device).transpose())
        .reshape([n, h0, w])
        .swap_dims(1, 2)
        .reshape([n * w, h0])
        .matmul(resize_matrix(h0, h, &device).transpose())
        .reshape([n, w, h])
        .swap_dims(1, 2)
        .reshape([b, c, t, h, w])
}

/// The weights `w_j = j / ft` (`j = 1 … ft`) of the later step in [`LinearPath::Smooth`]'s
/// interpolation between consecutive latent steps: the decoder's, which the encoder's
/// least-squares code assumes.
fn interpolation_weights(ft: usize) -> Vec<f32> {
    (1..=ft).map(|j| j as f32 / ft as f32).collect()
}

/// The fixed code of [`LinearPath::Smooth`], `[B, 3, T, H, W]` →
/// `[B, SMOOTH_CHANNELS, t, H / fs, W / fs]`: per latent step, an image at `SMOOTH_SUB / fs`
/// of the frame size (each `SMOOTH_SUB²` of its sub-pixels and the colours in channels). The
/// first frame of a clip is coded alone, as its anti-aliased linear downsample. Every later
/// step codes a group of `ft` frames, decoded as the linear interpolation from the previous
/// step's image `P` to this one's `C` (frame `j` of the group at weight `w_j = j / ft` on `C`):
/// `C` is the downsample of the least-squares target `(Σ w_j·x_j − Σ w_j(1 − w_j)·P) / Σ w_j²`,
/// which leaves no error correlated with the interpolation weights in the group (the last
/// frame alone would leave the in-between frames to chance). Causal: the step sees its own
/// group and the previous step only, which a later chunk takes from `s`.
fn smooth_code(x: Tensor<5>, (ft, fs): (usize, usize), s: &mut Stream) -> Tensor<5> {
    let [_, _, t, h, w] = x.dims();
    let (hs, ws) = (h / fs * SMOOTH_SUB, w / fs * SMOOTH_SUB);
    let device = x.device();
    let down = |f: Tensor<5>| resize_frames(f, hs, ws);
    let taken = if s.first { None } else { s.take() };
    let (mut prev, mut codes, mut at) = match taken {
        Some(p) => (p, Vec::new(), 0),
        None => {
            // The first frame alone (a clip's first chunk).
            let code = down(x.clone().narrow(2, 0, 1));
            (code.clone(), vec![code], 1)
        }
    };
    let weights = interpolation_weights(ft);
    let norm: f32 = weights.iter().map(|w| w * w).sum();
    let carry: f32 = weights.iter().map(|w| w * (1.0 - w)).sum();
    let weights =
        Tensor::<1>::from_data(TensorData::new(weights, [ft]), &device).reshape([1, 1, ft, 1, 1]);
    while at + ft <= t {
        let group = (x.clone().narrow(2, at, ft) * weights.clone()).sum_dim(2);
        let target = (group - resize_frames(prev, h, w) * f64::from(carry)) / f64::from(norm);
        prev = down(target);
        codes.push(prev.clone());
        at += ft;
    }
    if s.keep {
        s.put(prev);
    }
    patchify(Tensor::cat(codes, 2), SMOOTH_SUB)
}

/// The frames of a smooth code `[B, SMOOTH_CHANNELS, t, h, w]`: linear interpolation in time
/// from each latent step to the next (`ft` frames per step after the first, which is one
/// frame when the chunk starts the clip; a later chunk interpolates from the step the previous
/// one left in `s`), then the sub-pixels resized to `fs·h × fs·w`.
fn smooth_frames(z: Tensor<5>, (ft, fs): (usize, usize), s: &mut Stream) -> Tensor<5> {
    let [b, c, t, h, w] = z.dims();
    let prev = if s.first { None } else { s.take() };
    if s.keep {
        s.put(z.clone().narrow(2, t - 1, 1));
    }
    // The first frame alone (a clip's first chunk), then every pair of consecutive steps.
    let (mut parts, pairs) = match prev {
        Some(p) => {
            let from = if t > 1 {
                Tensor::cat(vec![p, z.clone().narrow(2, 0, t - 1)], 2)
            } else {
                p
            };
            (Vec::new(), Some((from, z)))
        }
        None => (
            vec![z.clone().narrow(2, 0, 1)],
            (t > 1).then(|| (z.clone().narrow(2, 0, t - 1), z.narrow(2, 1, t - 1))),
        ),
    };
    if let Some((from, to)) = pairs {
        let steps = from.dims()[2];
        let j = Tensor::<1>::from_data(
            TensorData::new(interpolation_weights(ft), [ft]),
            &from.device(),
        )
        .reshape([1, 1, 1, ft, 1, 1]);
        let mixed =
            from.unsqueeze_dim::<6>(3) * (j.clone().neg() + 1.0) + to.unsqueeze_dim::<6>(3) * j;
        parts.push(mixed.reshape([b, c, steps * ft, h, w]));
    }
    let y = unpatchify(Tensor::cat(parts, 2), SMOOTH_SUB);
    resize_frames(y, h * fs, w * fs)
}

/// The smooth code of `x` ([`smooth_code`]) and what its frames ([`smooth_frames`]) leave of
/// `x`, with the causal state of both in `s`.
fn smooth_residual(
    x: Tensor<5>,
    factors: (usize, usize),
    s: &mut Stream,
) -> (Tensor<5>, Tensor<5>) {
    let code = smooth_code(x.clone(), factors, s);
    let rest = x - smooth_frames(code.clone(), factors, s);
    (code, rest)
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

/// One encoder level: a residual block, then a strided causal convolution (space and/or
/// time halved), plus the space-to-channel shortcut.
#[derive(Module, Debug)]
pub struct DownLevel {
    res: ResBlock,
    down: CausalConv3d,
    #[module(skip)]
    temporal: bool,
    #[module(skip)]
    spatial: bool,
    #[module(skip)]
    c_out: usize,
}

impl DownLevel {
    fn forward(&self, x: Tensor<5>, s: &mut Stream) -> Tensor<5> {
        let h = self.res.forward(x, s);
        let first = s.first;
        plus(
            self.down.forward_stream(h.clone(), s),
            space_to_channel(h, self.c_out, (self.temporal, self.spatial), first),
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
    fn forward(&self, x: Tensor<5>, s: &mut Stream) -> Tensor<5> {
        let shortcut = channel_to_space(
            x.clone(),
            self.c_out,
            (self.up.temporal, self.up.spatial),
            s.first,
        );
        let up = self.up.forward(x, s);
        self.res.forward(plus(up, shortcut), s)
    }
}

/// A causal convolution to `r_t · r_s² · c` channels rearranged into `r_t×` time and `r_s×`
/// space (depth to space); temporal upsampling drops the first output frame (`1 + n` → `1 + 2n`).
#[derive(Module, Debug)]
pub struct Upsample {
    conv: CausalConv3d,
    #[module(skip)]
    temporal: bool,
    #[module(skip)]
    spatial: bool,
}

impl Upsample {
    fn forward(&self, x: Tensor<5>, s: &mut Stream) -> Tensor<5> {
        let first = s.first;
        depth_to_space(
            self.conv.forward_stream(x, s),
            (
                1 + usize::from(self.temporal),
                1 + usize::from(self.spatial),
            ),
            first,
        )
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

/// The loss terms of one batch.
#[derive(Debug, Clone)]
pub struct VaeLoss {
    /// Weighted total.
    pub total: Tensor<1>,
    /// Mean absolute error.
    pub l1: Tensor<1>,
    /// Mean squared error with pixels in `[0, 1]`.
    pub mse: Tensor<1>,
    /// Mean absolute error of the spatial finite differences.
    pub gradient: Tensor<1>,
    /// KL to the standard normal.
    pub kl: Tensor<1>,
    /// The reconstruction.
    pub reconstruction: Tensor<5>,
}

/// The MSE of every frame `[B, 1, T, 1, 1]` between clips in `[-1, 1]`, with pixels taken to
/// `[0, 1]` (the difference halved).
fn frame_mse(diff: Tensor<5>) -> Tensor<5> {
    (diff * 0.5)
        .powi_scalar(2)
        .mean_dim(1)
        .mean_dim(3)
        .mean_dim(4)
}

/// The [`Reconstruction::LogMse`] term: the mean over frames of ln(MSE + floor).
fn log_mse(frame_mse: Tensor<5>) -> Tensor<1> {
    frame_mse.add_scalar(LOG_MSE_FLOOR).log().mean()
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

    /// The posterior mean of `x`, refined at encode time against this decoder (semi-amortised
    /// inference, which closes part of the encoder's amortisation gap), causally: latent step
    /// by latent step, each with the earlier ones fixed, `steps` Adam steps (step size `lr`,
    /// β = (0.9, 0.999)) on that step alone lower the mean over its own frames (the first frame,
    /// then each group of `time_factor`) of ln(MSE + 10⁻⁶), the [`Reconstruction::LogMse`]
    /// objective. The decoder is causal, so a step's frames depend on it and the earlier steps
    /// only, and a step never sees a later frame. Costs about `steps` decodes of the clip,
    /// forward and back (the decoder's causal state is carried between steps as in
    /// [`Vae::decode_chunked`]). The VAE must live on an autodiff device; its weights get no
    /// gradient.
    pub fn encode_refined(&self, x: Tensor<5>, steps: usize, lr: f64) -> Result<Tensor<5>> {
        if !(lr.is_finite() && lr > 0.0) {
            return Err(invalid("lr", format!("{lr} must be a finite number > 0")));
        }
        let mean = self.encode(x.clone()).mean;
        if !mean.is_autodiff() {
            return Err(invalid(
                "device",
                "latent refinement needs the VAE on an autodiff device",
            ));
        }
        let decoder = self.clone().no_grad();
        let x = x.detach();
        let mean = mean.inner();
        let ft = self.factors.0;
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8);
        // The decoder's causal state after the steps refined so far.
        let mut state = Stream {
            keep: true,
            ..Stream::whole()
        };
        let mut refined = Vec::new();
        for k in 0..mean.dims()[2] {
            let frames = if k == 0 {
                x.clone().narrow(2, 0, 1)
            } else {
                x.clone().narrow(2, 1 + (k - 1) * ft, ft)
            };
            let mut z = mean.clone().narrow(2, k, 1);
            let (mut m, mut v) = (z.zeros_like(), z.zeros_like());
            for step in 1..=steps {
                let leaf = z.clone().autodiff().require_grad();
                let rec = decoder.decode_stream(leaf.clone(), &mut state.clone());
                let loss = log_mse(frame_mse(rec - frames.clone()));
                let grads = loss.backward();
                let g = leaf
                    .grad(&grads)
                    .ok_or_else(|| invalid("device", "no gradient reached the latent"))?;
                m = m * b1 + g.clone() * (1.0 - b1);
                v = v * b2 + g.powi_scalar(2) * (1.0 - b2);
                let (c1, c2) = (1.0 - b1.powi(step as i32), 1.0 - b2.powi(step as i32));
                z = z - (m.clone() / c1) / ((v.clone() / c2).sqrt() + eps) * lr;
            }
            decoder.decode_stream(z.clone().autodiff(), &mut state);
            state.advance();
            refined.push(z);
        }
        Ok(Tensor::cat(refined, 2).autodiff())
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

    /// Sets the linear path to the best linear code of `clips` (`[1, 3, T, H, W]` in
    /// `[-1, 1]`, `T = 1 + k · time_factor`): the mean and the top principal components of
    /// their causal blocks (the first frame repeated, then groups of `time_factor` frames,
    /// `space_factor²` pixels), found by subspace iteration on the blocks' covariance; with
    /// [`LinearPath::Smooth`], of the blocks of what the fixed smooth code leaves. With the
    /// deep path's outputs zero at initialisation, the fresh VAE then reconstructs as well as
    /// that linear code. Returns the share of the clips' block variance the code explains.
    pub fn fit_linear(mut self, clips: &[Tensor<5>]) -> Result<(Self, f64)> {
        let (ft, fs) = self.factors;
        let smooth = self.smooth;
        let (z, d) = (self.latent - smooth, 3 * ft * fs * fs);
        let (Some(lin_in), Some(lin_out)) = (self.linear_in.as_mut(), self.linear_out.as_mut())
        else {
            return Err(invalid("linear", "this VAE has no linear path"));
        };
        // The blocks to fit, and with the smooth code the clips' own blocks (for the share).
        let (mut rows, mut own) = (Vec::new(), Vec::new());
        for clip in clips {
            if smooth == 0 {
                push_blocks(clip, self.factors, &mut rows)?;
            } else {
                push_blocks(clip, self.factors, &mut own)?;
                let (_, rest) = smooth_residual(clip.clone(), self.factors, &mut Stream::whole());
                push_blocks(&rest, self.factors, &mut rows)?;
            }
        }
        let n = rows.len() / d;
        if n < z {
            return Err(invalid("clips", format!("{n} blocks for {z} components")));
        }
        let mut mean = vec![0f64; d];
        for r in rows.chunks_exact(d) {
            mean.iter_mut().zip(r).for_each(|(m, v)| *m += v);
        }
        mean.iter_mut().for_each(|m| *m /= n as f64);
        // Covariance through the backend's matmul (d × d), on the clips' device.
        let device = clips[0].device();
        let centred: Vec<f32> = rows
            .chunks_exact(d)
            .flat_map(|r| r.iter().zip(&mean).map(|(v, m)| (v - m) as f32))
            .collect();
        let x = Tensor::<2>::from_data(TensorData::new(centred, [n, d]), &device);
        let cov = x
            .clone()
            .transpose()
            .matmul(x)
            .div_scalar(n as f64)
            .into_data()
            .convert::<f64>()
            .try_into_vec::<f64>()
            .map_err(|e| invalid("clips", format!("{e:?}")))?;
        let components = top_eigenvectors(&cov, d, z, 300);
        let total: f64 = (0..d).map(|i| cov[i * d + i]).sum();
        let captured: f64 = components
            .iter()
            .map(|q| {
                (0..d)
                    .map(|i| q[i] * (0..d).map(|j| cov[i * d + j] * q[j]).sum::<f64>())
                    .sum::<f64>()
            })
            .sum::<f64>();
        // What the code misses, relative to the clips' own block variance.
        let own_total = if smooth == 0 {
            total
        } else {
            block_variance(&own, d)
        };
        let explained = 1.0 - (total - captured).max(0.0) / own_total.max(f64::MIN_POSITIVE);
        let param_device = lin_in.conv.weight.val().device();
        let w_in: Vec<f32> = components.iter().flatten().map(|&v| v as f32).collect();
        let b_in: Vec<f32> = components
            .iter()
            .map(|q| -q.iter().zip(&mean).map(|(a, b)| a * b).sum::<f64>() as f32)
            .collect();
        let w_out: Vec<f32> = (0..d)
            .flat_map(|i| components.iter().map(move |q| q[i] as f32))
            .collect();
        let b_out: Vec<f32> = mean.iter().map(|&m| m as f32).collect();
        let param = |v: Vec<f32>, shape: [usize; 5]| {
            Param::from_tensor(Tensor::<5>::from_data(
                TensorData::new(v, shape),
                &param_device,
            ))
        };
        let bias = |v: Vec<f32>| {
            let len = v.len();
            Some(Param::from_tensor(Tensor::<1>::from_data(
                TensorData::new(v, [len]),
                &param_device,
            )))
        };
        lin_in.conv.weight = param(w_in, [z, 3, ft, fs, fs]);
        lin_in.conv.bias = bias(b_in);
        lin_out.conv.weight = param(w_out, [d, z, 1, 1, 1]);
        lin_out.conv.bias = bias(b_out);
        Ok((self, explained))
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
        let diff = rec.clone() - x.clone();
        let l1 = diff.clone().abs().mean();
        let frame_mse = frame_mse(diff);
        let mse = frame_mse.clone().mean();
        let reconstruction = match config.reconstruction {
            Reconstruction::L1 => l1.clone(),
            Reconstruction::LogMse => log_mse(frame_mse),
        };
        let gradient = gradient_l1(rec.clone(), x);
        let kl = posterior.kl();
        let total = reconstruction
            + gradient.clone() * config.gradient_weight
            + kl.clone() * config.kl_weight;
        VaeLoss {
            total,
            l1,
            mse,
            gradient,
            kl,
            reconstruction: rec,
        }
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
