//! The VAE's building blocks: causal 3-D convolutions carrying their state between chunks,
//! per-frame GroupNorm, residual blocks, the down- and upsampling levels with DC-AE's
//! non-parametric shortcuts, space/depth rearrangements and patchify.

use super::*;

/// The posterior's convolution (means, then log-variances). The log-variance bias starts at
/// `INIT_LOGVAR`: a fresh posterior of σ ≈ 1 buries the latent under noise as large as the
/// signal and the decoder learns nothing until the encoder has pushed it down, while the KL
/// term (weight ~1e-6) barely resists either way.
pub(super) fn moments(c_in: usize, latent: usize, device: &Device) -> CausalConv3d {
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
pub(super) fn zero_outputs(conv: &mut CausalConv3d, n: usize) {
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

pub(super) fn norm(groups: usize, channels: usize, device: &Device) -> GroupNorm {
    GroupNormConfig::new(groups, channels).init(device)
}

/// GroupNorm of every frame on its own (statistics over channels and space, never time).
pub(super) fn frame_norm(norm: &GroupNorm, x: Tensor<5>) -> Tensor<5> {
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
pub(super) struct Stream {
    pub(super) prev: std::collections::VecDeque<Tensor<5>>,
    pub(super) next: Vec<Tensor<5>>,
    /// The chunk starts the clip (first-frame padding, the first frame alone).
    pub(super) first: bool,
    /// Keep state for a following chunk.
    pub(super) keep: bool,
}

impl Stream {
    /// A whole clip in one piece.
    pub(super) fn whole() -> Self {
        Self {
            prev: Default::default(),
            next: Vec::new(),
            first: true,
            keep: false,
        }
    }

    /// `f` on consecutive time chunks of `x` (`first` frames, then `rest` at a time, the
    /// last one shorter), with the causal state carried from each chunk to the next.
    pub(super) fn over_chunks<T>(
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

    pub(super) fn take(&mut self) -> Option<Tensor<5>> {
        self.prev.pop_front()
    }

    pub(super) fn put(&mut self, frames: Tensor<5>) {
        self.next.push(frames);
    }

    /// Moves to the next chunk.
    pub(super) fn advance(&mut self) {
        self.prev = std::mem::take(&mut self.next).into();
        self.first = false;
    }
}

/// A 3-D convolution padded in time at the front only (copies of the first frame), so output
/// frame `i` sees input frames up to `i · stride` only; spatial padding keeps `H / stride`.
#[derive(Module, Debug)]
pub struct CausalConv3d {
    pub(super) conv: Conv3d,
    #[module(skip)]
    pub(super) front: usize,
}

impl CausalConv3d {
    pub(super) fn new(
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
    pub(super) fn patch(c_in: usize, c_out: usize, kernel: [usize; 3], device: &Device) -> Self {
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
    pub(super) fn forward_stream(&self, x: Tensor<5>, stream: &mut Stream) -> Tensor<5> {
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
    pub(super) norm1: GroupNorm,
    pub(super) conv1: CausalConv3d,
    pub(super) norm2: GroupNorm,
    pub(super) conv2: CausalConv3d,
    pub(super) skip: Option<CausalConv3d>,
}

impl ResBlock {
    pub(super) fn new(c_in: usize, c_out: usize, groups: usize, device: &Device) -> Self {
        Self {
            norm1: norm(groups, c_in, device),
            conv1: CausalConv3d::new(c_in, c_out, [3, 3, 3], [1, 1, 1], device),
            norm2: norm(groups, c_out, device),
            conv2: CausalConv3d::new(c_out, c_out, [3, 3, 3], [1, 1, 1], device),
            skip: (c_in != c_out)
                .then(|| CausalConv3d::new(c_in, c_out, [1, 1, 1], [1, 1, 1], device)),
        }
    }

    pub(super) fn channels(&self) -> usize {
        self.conv2.conv.weight.val().dims()[0]
    }

    pub(super) fn forward(&self, x: Tensor<5>, s: &mut Stream) -> Tensor<5> {
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
pub(super) fn space_to_channel(
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
pub(super) fn channel_to_space(
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
pub(super) fn depth_to_space(y: Tensor<5>, (rt, rs): (usize, usize), first: bool) -> Tensor<5> {
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
pub(super) fn patchify(x: Tensor<5>, p: usize) -> Tensor<5> {
    if p == 1 {
        return x;
    }
    let [b, c, t, h, w] = x.dims();
    x.reshape([b, c, t, h / p, p, w / p, p])
        .permute([0, 1, 4, 6, 2, 3, 5])
        .reshape([b, c * p * p, t, h / p, w / p])
}

/// The inverse of [`patchify`].
pub(super) fn unpatchify(x: Tensor<5>, p: usize) -> Tensor<5> {
    if p == 1 {
        return x;
    }
    let [b, cp, t, h, w] = x.dims();
    let c = cp / (p * p);
    x.reshape([b, c, p, p, t, h, w])
        .permute([0, 1, 4, 5, 2, 6, 3])
        .reshape([b, c, t, h * p, w * p])
}

/// Mean over groups of channels down to `c_out` (`None` when they do not divide).
pub(super) fn channel_mean(x: Tensor<5>, c_out: usize) -> Option<Tensor<5>> {
    let [b, c, t, h, w] = x.dims();
    c.is_multiple_of(c_out).then(|| {
        x.reshape([b, c_out, c / c_out, t, h, w])
            .mean_dim(2)
            .reshape([b, c_out, t, h, w])
    })
}

/// Channels repeated up to `c_out` (`None` when they do not divide).
pub(super) fn channel_repeat(x: Tensor<5>, c_out: usize) -> Option<Tensor<5>> {
    let [b, c, t, h, w] = x.dims();
    c_out.is_multiple_of(c).then(|| {
        x.unsqueeze_dim::<6>(2)
            .repeat_dim(2, c_out / c)
            .reshape([b, c_out, t, h, w])
    })
}

pub(super) fn plus(a: Tensor<5>, shortcut: Option<Tensor<5>>) -> Tensor<5> {
    match shortcut {
        Some(s) => a + s,
        None => a,
    }
}

/// One encoder level: a residual block, then a strided causal convolution (space and/or
/// time halved), plus the space-to-channel shortcut.
#[derive(Module, Debug)]
pub struct DownLevel {
    pub(super) res: ResBlock,
    pub(super) down: CausalConv3d,
    #[module(skip)]
    pub(super) temporal: bool,
    #[module(skip)]
    pub(super) spatial: bool,
    #[module(skip)]
    pub(super) c_out: usize,
}

impl DownLevel {
    pub(super) fn forward(&self, x: Tensor<5>, s: &mut Stream) -> Tensor<5> {
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
    pub(super) up: Upsample,
    pub(super) res: ResBlock,
    #[module(skip)]
    pub(super) c_out: usize,
}

impl UpLevel {
    pub(super) fn forward(&self, x: Tensor<5>, s: &mut Stream) -> Tensor<5> {
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
    pub(super) conv: CausalConv3d,
    #[module(skip)]
    pub(super) temporal: bool,
    #[module(skip)]
    pub(super) spatial: bool,
}

impl Upsample {
    pub(super) fn forward(&self, x: Tensor<5>, s: &mut Stream) -> Tensor<5> {
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
