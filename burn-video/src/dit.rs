//! A video diffusion transformer (DiT) over VAE latents, in the MUG-V / PixArt-α shape at small
//! scale: `1×2×2` patchify, 3-D rotary position embeddings (head dimensions split in thirds
//! over time, height and width), AdaLN-single timestep conditioning (one shared projection of
//! the timestep embedding plus a learned per-block table of shifts, scales and gates), RMSNorm
//! on queries and keys, text conditioning by cross-attention over a small learned text
//! encoder, optional first-frame (image-to-video) conditioning, and optional mixture-of-experts
//! FFNs from burn-moe (MoE-DiT).
//!
//! Every residual branch starts at zero (AdaLN-zero: the gates and the cross-attention output
//! projection are zero-initialised, as is the final projection), so a fresh block is the
//! identity and a fresh model predicts zero velocity.

use burn::module::{Module, Param};
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::tensor::{Bool, Device, Distribution, Int, Tensor, TensorData, activation};
use burn_moe::prelude::{MoeLayer, MoeLayerConfig};
use serde::{Deserialize, Serialize};

use crate::error::{Result, invalid};

/// Sizes of the DiT.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DitConfig {
    /// Latent channels (the VAE's).
    pub latent: usize,
    /// Width of the transformer.
    pub hidden: usize,
    /// Blocks.
    pub depth: usize,
    /// Attention heads (`hidden / heads` must be a multiple of 6: three even thirds).
    pub heads: usize,
    /// MLP width as a multiple of `hidden`.
    #[serde(default = "four")]
    pub mlp_ratio: usize,
    /// Words of the caption vocabulary (special tokens included).
    pub vocab: usize,
    /// Longest caption in tokens.
    pub text_len: usize,
    /// RoPE base.
    #[serde(default = "rope_base")]
    pub rope_base: f64,
    /// Mixture-of-experts FFNs (burn-moe) instead of dense MLPs (MoE-DiT).
    #[serde(default)]
    pub moe: Option<MoeFfn>,
    /// Also condition the AdaLN modulation on the caption: the masked mean of the text
    /// encoder's outputs, projected, is added to the timestep embedding (SD3's and Flux's
    /// pooled text vector), a global path beside the cross-attention for clip-wide properties
    /// such as the motion direction.
    #[serde(default)]
    pub pooled_text: bool,
}

/// The MoE FFN of a MoE-DiT block: a dropless top-k softmax router over SwiGLU experts with
/// Megatron's auxiliary load-balancing loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeFfn {
    /// Experts.
    pub experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Expert FFN width.
    pub ffn_hidden: usize,
    /// Coefficient of the auxiliary load-balancing loss.
    #[serde(default = "aux")]
    pub aux_loss: f64,
}

fn aux() -> f64 {
    1e-2
}

fn four() -> usize {
    4
}

fn rope_base() -> f64 {
    10_000.0
}

impl DitConfig {
    /// Checks the sizes; errors name the field.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("latent", self.latent),
            ("hidden", self.hidden),
            ("depth", self.depth),
            ("heads", self.heads),
            ("mlp_ratio", self.mlp_ratio),
            ("vocab", self.vocab),
            ("text_len", self.text_len),
        ] {
            if v == 0 {
                return Err(invalid(name, "must be at least 1"));
            }
        }
        if !self.hidden.is_multiple_of(self.heads) || !(self.hidden / self.heads).is_multiple_of(6)
        {
            return Err(invalid(
                "heads",
                format!(
                    "hidden {} / heads {} must be a multiple of 6 (three even thirds for RoPE)",
                    self.hidden, self.heads
                ),
            ));
        }
        if self.vocab < SPECIAL_TOKENS {
            return Err(invalid(
                "vocab",
                format!("needs at least the {SPECIAL_TOKENS} special tokens"),
            ));
        }
        if !(self.rope_base.is_finite() && self.rope_base > 1.0) {
            return Err(invalid("rope_base", "must be a number above 1"));
        }
        if let Some(m) = &self.moe {
            if !(m.aux_loss.is_finite() && m.aux_loss >= 0.0) {
                return Err(invalid("moe", "aux_loss must be a finite number >= 0"));
            }
            self.moe_layer(m)
                .validate()
                .map_err(|e| invalid("moe", e.to_string()))?;
        }
        Ok(())
    }

    fn moe_layer(&self, m: &MoeFfn) -> MoeLayerConfig {
        let mut c = MoeLayerConfig::swiglu(self.hidden, m.ffn_hidden, m.experts, m.top_k);
        // Top-1 routing takes the softmax before the selection (Megatron's pre-softmax), so
        // the router still gets a gradient.
        c.router = c
            .router
            .with_aux_loss_coeff(m.aux_loss)
            .with_pre_softmax(m.top_k == 1);
        c
    }

    /// A freshly initialised DiT.
    pub fn init(&self, device: &Device) -> Result<Dit> {
        self.validate()?;
        let h = self.hidden;
        let patch_dim = self.latent * 4;
        let blocks = (0..self.depth)
            .map(|_| {
                let dense = self.moe.is_none();
                Ok(Block {
                    table: Param::from_tensor(Tensor::zeros([6, h], device)),
                    attn: Attention::new(h, self.heads, device),
                    cross: CrossAttention::new(h, self.heads, device),
                    fc1: dense.then(|| LinearConfig::new(h, h * self.mlp_ratio).init(device)),
                    fc2: dense.then(|| LinearConfig::new(h * self.mlp_ratio, h).init(device)),
                    moe: match &self.moe {
                        Some(m) => Some(
                            self.moe_layer(m)
                                .init(device)
                                .map_err(|e| invalid("moe", e.to_string()))?,
                        ),
                        None => None,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Dit {
            patch_in: LinearConfig::new(patch_dim, h).init(device),
            // First-frame conditioning: the clean first latent frame, patchified, beside the
            // noisy input (zero when unconditioned), with a mask channel per token.
            cond_in: zero_linear(patch_dim + 1, h, device),
            t_mlp1: LinearConfig::new(FREQ_DIM, h).init(device),
            t_mlp2: LinearConfig::new(h, h).init(device),
            t_block: zero_linear(h, 6 * h, device),
            text: TextEncoder::new(self, device),
            text_pool: self
                .pooled_text
                .then(|| LinearConfig::new(h, h).init(device)),
            blocks,
            final_table: Param::from_tensor(Tensor::zeros([2, h], device)),
            final_mod: zero_linear(h, 2 * h, device),
            out: zero_linear(h, patch_dim, device),
            heads: self.heads,
            rope_base: self.rope_base,
            latent: self.latent,
        })
    }
}

/// Reserved token ids: padding, the null caption (classifier-free guidance), unknown words.
pub const PAD: usize = 0;
/// The null-caption token.
pub const NULL: usize = 1;
/// Unknown words.
pub const UNK: usize = 2;
const SPECIAL_TOKENS: usize = 3;
const FREQ_DIM: usize = 256;

fn zero_linear(d_in: usize, d_out: usize, device: &Device) -> Linear {
    let mut l = LinearConfig::new(d_in, d_out).init(device);
    l.weight = Param::from_tensor(Tensor::zeros([d_in, d_out], device));
    l.bias = Some(Param::from_tensor(Tensor::zeros([d_out], device)));
    l
}

/// Layer norm over the last dimension without affine parameters (AdaLN supplies them).
fn layer_norm(x: Tensor<3>) -> Tensor<3> {
    let mean = x.clone().mean_dim(2);
    let centred = x - mean;
    let var = centred.clone().powi_scalar(2).mean_dim(2);
    centred / (var + 1e-6).sqrt()
}

/// RMS norm over the last dimension of `[B, heads, N, d]` with a learned scale.
fn rms_norm(x: Tensor<4>, scale: &Param<Tensor<1>>) -> Tensor<4> {
    let d = x.dims()[3];
    let rms = (x.clone().powi_scalar(2).mean_dim(3) + 1e-6).sqrt();
    (x / rms) * scale.val().reshape([1, 1, 1, d])
}

/// `x · (1 + scale) + shift` with `[B, hidden]` modulation broadcast over tokens.
fn modulate(x: Tensor<3>, shift: Tensor<2>, scale: Tensor<2>) -> Tensor<3> {
    x * (scale.unsqueeze_dim::<3>(1) + 1.0) + shift.unsqueeze_dim::<3>(1)
}

/// Scaled dot-product attention of `[B, heads, N, d]` queries over `[B, heads, M, d]` keys and
/// values; `mask` `[B, M]` is true where a key may be attended to.
fn attend(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, mask: Option<Tensor<2, Bool>>) -> Tensor<4> {
    let d = q.dims()[3];
    let scores = q.matmul(k.swap_dims(2, 3)) / (d as f64).sqrt();
    let scores = match mask {
        Some(m) => {
            let [b, keys] = m.dims();
            let blocked = m.bool_not().reshape([b, 1, 1, keys]).expand(scores.dims());
            scores.mask_fill(blocked, -1e9)
        }
        None => scores,
    };
    activation::softmax(scores, 3).matmul(v)
}

/// `[B, N, hidden]` → `[B, heads, N, hidden / heads]`.
fn split_heads(x: Tensor<3>, heads: usize) -> Tensor<4> {
    let [b, n, h] = x.dims();
    x.reshape([b, n, heads, h / heads]).swap_dims(1, 2)
}

/// A fused `[B, N, 3·hidden]` projection into per-head queries, keys and values.
fn split_qkv(qkv: Tensor<3>, hidden: usize, heads: usize) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
    let part = |i: usize| split_heads(qkv.clone().narrow(2, i * hidden, hidden), heads);
    (part(0), part(1), part(2))
}

fn merge_heads(x: Tensor<4>) -> Tensor<3> {
    let [b, heads, n, d] = x.dims();
    x.swap_dims(1, 2).reshape([b, n, heads * d])
}

/// Cosines and sines `[N, head_dim]` of the 3-D rotary embedding of a `t × h × w` token grid
/// (row-major): each third of the head dimensions rotates with one axis, its two halves
/// paired (`rotate_half` convention), frequencies `base^(−2i / third)`.
pub fn rope_tables(
    (t, h, w): (usize, usize, usize),
    head_dim: usize,
    base: f64,
    device: &Device,
) -> (Tensor<2>, Tensor<2>) {
    let third = head_dim / 3;
    let half = third / 2;
    let n = t * h * w;
    let (mut cos, mut sin) = (vec![0f32; n * head_dim], vec![0f32; n * head_dim]);
    for (i, (pt, ph, pw)) in (0..t)
        .flat_map(|a| (0..h).flat_map(move |b| (0..w).map(move |c| (a, b, c))))
        .enumerate()
    {
        for (axis, p) in [pt, ph, pw].into_iter().enumerate() {
            for j in 0..half {
                let angle = p as f64 * base.powf(-2.0 * j as f64 / third as f64);
                for at in [axis * third + j, axis * third + half + j] {
                    cos[i * head_dim + at] = angle.cos() as f32;
                    sin[i * head_dim + at] = angle.sin() as f32;
                }
            }
        }
    }
    (
        Tensor::from_data(TensorData::new(cos, [n, head_dim]), device),
        Tensor::from_data(TensorData::new(sin, [n, head_dim]), device),
    )
}

/// Applies the rotary embedding to `[B, heads, N, head_dim]`.
pub fn apply_rope(x: Tensor<4>, cos: &Tensor<2>, sin: &Tensor<2>) -> Tensor<4> {
    let [b, heads, n, d] = x.dims();
    let third = d / 3;
    // rotate_half within each third: [x1, x2] → [−x2, x1].
    let parts = x.clone().reshape([b, heads, n, 3, 2, third / 2]);
    let x1 = parts.clone().narrow(4, 0, 1);
    let x2 = parts.narrow(4, 1, 1);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 4).reshape([b, heads, n, d]);
    let cos = cos.clone().reshape([1, 1, n, d]);
    let sin = sin.clone().reshape([1, 1, n, d]);
    x * cos + rotated * sin
}

/// Self-attention with a fused QKV projection, QK RMSNorm and 3-D RoPE.
#[derive(Module, Debug)]
pub struct Attention {
    qkv: Linear,
    q_norm: Param<Tensor<1>>,
    k_norm: Param<Tensor<1>>,
    proj: Linear,
    #[module(skip)]
    heads: usize,
}

impl Attention {
    fn new(hidden: usize, heads: usize, device: &Device) -> Self {
        let d = hidden / heads;
        Self {
            qkv: LinearConfig::new(hidden, 3 * hidden).init(device),
            q_norm: Param::from_tensor(Tensor::ones([d], device)),
            k_norm: Param::from_tensor(Tensor::ones([d], device)),
            proj: LinearConfig::new(hidden, hidden).init(device),
            heads,
        }
    }

    fn forward(&self, x: Tensor<3>, rope: &(Tensor<2>, Tensor<2>)) -> Tensor<3> {
        let h = x.dims()[2];
        let (q, k, v) = split_qkv(self.qkv.forward(x), h, self.heads);
        let q = apply_rope(rms_norm(q, &self.q_norm), &rope.0, &rope.1);
        let k = apply_rope(rms_norm(k, &self.k_norm), &rope.0, &rope.1);
        self.proj.forward(merge_heads(attend(q, k, v, None)))
    }
}

/// Cross-attention from the video tokens to the text tokens (QK RMSNorm; the output projection
/// starts at zero).
#[derive(Module, Debug)]
pub struct CrossAttention {
    q: Linear,
    kv: Linear,
    q_norm: Param<Tensor<1>>,
    k_norm: Param<Tensor<1>>,
    proj: Linear,
    #[module(skip)]
    heads: usize,
}

impl CrossAttention {
    fn new(hidden: usize, heads: usize, device: &Device) -> Self {
        let d = hidden / heads;
        Self {
            q: LinearConfig::new(hidden, hidden).init(device),
            kv: LinearConfig::new(hidden, 2 * hidden).init(device),
            q_norm: Param::from_tensor(Tensor::ones([d], device)),
            k_norm: Param::from_tensor(Tensor::ones([d], device)),
            proj: zero_linear(hidden, hidden, device),
            heads,
        }
    }

    fn forward(&self, x: Tensor<3>, text: &Tensor<3>, mask: &Tensor<2, Bool>) -> Tensor<3> {
        let h = x.dims()[2];
        let q = rms_norm(split_heads(self.q.forward(x), self.heads), &self.q_norm);
        let kv = self.kv.forward(text.clone());
        let k = rms_norm(
            split_heads(kv.clone().narrow(2, 0, h), self.heads),
            &self.k_norm,
        );
        let v = split_heads(kv.narrow(2, h, h), self.heads);
        self.proj
            .forward(merge_heads(attend(q, k, v, Some(mask.clone()))))
    }
}

/// The small learned text encoder: word embeddings, learned positions and one pre-norm
/// self-attention + MLP layer.
#[derive(Module, Debug)]
pub struct TextEncoder {
    embed: Embedding,
    pos: Param<Tensor<2>>,
    qkv: Linear,
    proj: Linear,
    fc1: Linear,
    fc2: Linear,
    #[module(skip)]
    heads: usize,
}

impl TextEncoder {
    fn new(c: &DitConfig, device: &Device) -> Self {
        let h = c.hidden;
        Self {
            embed: EmbeddingConfig::new(c.vocab, h).init(device),
            pos: Param::from_tensor(Tensor::random(
                [c.text_len, h],
                Distribution::Normal(0.0, 0.02),
                device,
            )),
            qkv: LinearConfig::new(h, 3 * h).init(device),
            proj: LinearConfig::new(h, h).init(device),
            fc1: LinearConfig::new(h, 2 * h).init(device),
            fc2: LinearConfig::new(2 * h, h).init(device),
            heads: c.heads,
        }
    }

    /// `[B, L]` token ids → `[B, L, hidden]`.
    fn forward(&self, ids: Tensor<2, Int>, mask: &Tensor<2, Bool>) -> Tensor<3> {
        let [_, l] = ids.dims();
        let h = self.pos.val().dims()[1];
        let x = self.embed.forward(ids) + self.pos.val().narrow(0, 0, l).unsqueeze_dim::<3>(0);
        let (q, k, v) = split_qkv(self.qkv.forward(layer_norm(x.clone())), h, self.heads);
        let x = x + self
            .proj
            .forward(merge_heads(attend(q, k, v, Some(mask.clone()))));
        let m = self
            .fc2
            .forward(activation::gelu(self.fc1.forward(layer_norm(x.clone()))));
        x + m
    }
}

/// A DiT block: AdaLN-modulated self-attention and MLP with gates, cross-attention between.
#[derive(Module, Debug)]
pub struct Block {
    /// Per-block shift/scale/gate table `[6, hidden]` added to the shared projection.
    table: Param<Tensor<2>>,
    attn: Attention,
    cross: CrossAttention,
    fc1: Option<Linear>,
    fc2: Option<Linear>,
    moe: Option<MoeLayer>,
}

impl Block {
    /// `x` `[B, N, hidden]`; `t6` `[B, 6, hidden]` the shared timestep modulation.
    pub fn forward(
        &self,
        x: Tensor<3>,
        t6: &Tensor<3>,
        text: &Tensor<3>,
        mask: &Tensor<2, Bool>,
        rope: &(Tensor<2>, Tensor<2>),
    ) -> Result<Tensor<3>> {
        self.forward_aux(x, t6, text, mask, rope).map(|(y, _)| y)
    }

    /// [`Block::forward`] and the MoE FFN's auxiliary loss (MoE-DiT).
    pub fn forward_aux(
        &self,
        x: Tensor<3>,
        t6: &Tensor<3>,
        text: &Tensor<3>,
        mask: &Tensor<2, Bool>,
        rope: &(Tensor<2>, Tensor<2>),
    ) -> Result<(Tensor<3>, Option<Tensor<1>>)> {
        let [b, _, h] = t6.dims();
        let m = t6.clone() + self.table.val().unsqueeze_dim::<3>(0);
        let part = |i: usize| m.clone().narrow(1, i, 1).reshape([b, h]);
        let (shift1, scale1, gate1) = (part(0), part(1), part(2));
        let (shift2, scale2, gate2) = (part(3), part(4), part(5));
        let a = self
            .attn
            .forward(modulate(layer_norm(x.clone()), shift1, scale1), rope);
        let x = x + a * gate1.unsqueeze_dim::<3>(1);
        let x = x.clone() + self.cross.forward(layer_norm(x), text, mask);
        let h = modulate(layer_norm(x.clone()), shift2, scale2);
        let (y, aux) = match (&self.fc1, &self.fc2, &self.moe) {
            (Some(fc1), Some(fc2), _) => (fc2.forward(activation::gelu(fc1.forward(h))), None),
            (_, _, Some(moe)) => {
                // burn-moe takes [S, B, H].
                let out = moe
                    .forward(h.swap_dims(0, 1))
                    .map_err(|e| invalid("moe", e.to_string()))?;
                let aux = out.total_aux_loss();
                (out.output.swap_dims(0, 1), aux)
            }
            _ => return Err(invalid("moe", "a block has neither an MLP nor experts")),
        };
        Ok((x + y * gate2.unsqueeze_dim::<3>(1), aux))
    }
}

/// Captions as token ids: `[B, L]` ids and `[B, L]` attention masks.
#[derive(Debug, Clone)]
pub struct Text {
    /// Token ids.
    pub ids: Tensor<2, Int>,
    /// True where a token is real.
    pub mask: Tensor<2, Bool>,
}

/// What conditions one prediction.
#[derive(Debug, Clone)]
pub struct Condition {
    /// The captions (the null caption for unconditioned samples).
    pub text: Text,
    /// The clean first latent frame `[B, latent, 1, h, w]` for image-to-video, if any.
    pub first_frame: Option<Tensor<5>>,
}

/// The DiT.
#[derive(Module, Debug)]
pub struct Dit {
    patch_in: Linear,
    cond_in: Linear,
    t_mlp1: Linear,
    t_mlp2: Linear,
    t_block: Linear,
    text: TextEncoder,
    text_pool: Option<Linear>,
    blocks: Vec<Block>,
    final_table: Param<Tensor<2>>,
    final_mod: Linear,
    out: Linear,
    #[module(skip)]
    heads: usize,
    #[module(skip)]
    rope_base: f64,
    #[module(skip)]
    latent: usize,
}

/// Sinusoidal embedding `[B, FREQ_DIM]` of timesteps `t ∈ [0, 1]` (scaled by 1000).
fn timestep_embedding(t: Tensor<1>) -> Tensor<2> {
    let [b] = t.dims();
    let device = t.device();
    let half = FREQ_DIM / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (-(10_000f64.ln()) * i as f64 / half as f64).exp() as f32)
        .collect();
    let freqs = Tensor::<1>::from_data(TensorData::new(freqs, [half]), &device);
    let args = (t * 1000.0).reshape([b, 1]) * freqs.reshape([1, half]);
    Tensor::cat(vec![args.clone().cos(), args.sin()], 1)
}

/// `[B, C, T, H, W]` → `[B, T·(H/2)·(W/2), 4C]` (1×2×2 patches, row-major over t, h, w).
pub fn patchify(x: Tensor<5>) -> Tensor<3> {
    let [b, c, t, h, w] = x.dims();
    x.reshape([b, c, t, h / 2, 2, w / 2, 2])
        .permute([0, 2, 3, 5, 1, 4, 6])
        .reshape([b, t * (h / 2) * (w / 2), c * 4])
}

/// The inverse of [`patchify`] for a `t × h × w` latent.
pub fn unpatchify(x: Tensor<3>, c: usize, (t, h, w): (usize, usize, usize)) -> Tensor<5> {
    let [b, _, _] = x.dims();
    x.reshape([b, t, h / 2, w / 2, c, 2, 2])
        .permute([0, 4, 1, 2, 5, 3, 6])
        .reshape([b, c, t, h, w])
}

impl Dit {
    /// Latent channels.
    pub fn latent_channels(&self) -> usize {
        self.latent
    }

    /// The velocity predicted for noisy latents `x_t` `[B, latent, T, H, W]` (H, W even) at
    /// times `t` `[B]`, given the condition.
    pub fn forward(&self, x: Tensor<5>, t: Tensor<1>, cond: &Condition) -> Result<Tensor<5>> {
        self.forward_aux(x, t, cond).map(|(v, _)| v)
    }

    /// [`Dit::forward`] and the sum of the MoE FFNs' auxiliary losses (`None` for a dense DiT).
    pub fn forward_aux(
        &self,
        x: Tensor<5>,
        t: Tensor<1>,
        cond: &Condition,
    ) -> Result<(Tensor<5>, Option<Tensor<1>>)> {
        let [b, c, frames, h, w] = x.dims();
        if c != self.latent || h % 2 != 0 || w % 2 != 0 {
            return Err(invalid(
                "x",
                format!(
                    "latents [{b}, {c}, {frames}, {h}, {w}] need {} channels and even height and width",
                    self.latent
                ),
            ));
        }
        let device = x.device();
        let grid = (frames, h / 2, w / 2);
        let n = frames * (h / 2) * (w / 2);
        let tokens = self.patch_in.forward(patchify(x));
        // First-frame conditioning: the clean frame's patches on the first frame's tokens.
        let per = (h / 2) * (w / 2);
        let cond_tokens = match &cond.first_frame {
            Some(f) => {
                let p = patchify(f.clone());
                let zeros = Tensor::<3>::zeros([b, n - per, c * 4], &device);
                let ones = Tensor::<3>::ones([b, per, 1], &device);
                let mask = Tensor::cat(vec![ones, Tensor::zeros([b, n - per, 1], &device)], 1);
                Tensor::cat(vec![Tensor::cat(vec![p, zeros], 1), mask], 2)
            }
            None => Tensor::zeros([b, n, c * 4 + 1], &device),
        };
        let mut x = tokens + self.cond_in.forward(cond_tokens);
        let hidden = x.dims()[2];
        let text = self.text.forward(cond.text.ids.clone(), &cond.text.mask);
        let mut temb = self
            .t_mlp2
            .forward(activation::silu(self.t_mlp1.forward(timestep_embedding(t))));
        if let Some(pool) = &self.text_pool {
            // Masked mean over the caption's tokens.
            let [_, l] = cond.text.mask.dims();
            let keep = cond.text.mask.clone().float().reshape([b, l, 1]);
            let count = keep.clone().sum_dim(1).clamp_min(1.0).reshape([b, 1]);
            let pooled = (text.clone() * keep).sum_dim(1).reshape([b, hidden]) / count;
            temb = temb + pool.forward(pooled);
        }
        let t6 = self
            .t_block
            .forward(activation::silu(temb.clone()))
            .reshape([b, 6, hidden]);
        let rope = rope_tables(grid, hidden / self.heads, self.rope_base, &device);
        let mut aux: Option<Tensor<1>> = None;
        for block in &self.blocks {
            let (y, a) = block.forward_aux(x, &t6, &text, &cond.text.mask, &rope)?;
            x = y;
            aux = match (aux, a) {
                (Some(s), Some(a)) => Some(s + a),
                (s, a) => s.or(a),
            };
        }
        let m = self
            .final_mod
            .forward(activation::silu(temb))
            .reshape([b, 2, hidden])
            + self.final_table.val().unsqueeze_dim::<3>(0);
        let shift = m.clone().narrow(1, 0, 1).reshape([b, hidden]);
        let scale = m.narrow(1, 1, 1).reshape([b, hidden]);
        let out = self.out.forward(modulate(layer_norm(x), shift, scale));
        Ok((unpatchify(out, c, (frames, h, w)), aux))
    }

    /// The blocks (for tests and inspection).
    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }
}
