//! Grouped-query self-attention with rotary position embeddings, heads split over TP.

use burn::module::{Module, Param, ParamId};
use burn::tensor::{FloatDType, Tensor};
use burn_parallel::context::{ContextLayout, CpAttention, context_attention};
use burn_parallel::prelude::{
    ColumnParallelLinear, Group, ParallelParams, ParamRole, RowParallelLinear, causal_attention,
};

use crate::error::{Result, invalid};
use crate::host;

/// Columns `[start, start + len)` of each block, concatenated: this rank's share of a fused
/// projection `w` `[rows, cols]`.
pub(crate) fn column_blocks(w: Tensor<2>, blocks: &[(usize, usize)]) -> Tensor<2> {
    let [rows, _] = w.dims();
    Tensor::cat(
        blocks
            .iter()
            .map(|&(start, len)| w.clone().slice([0..rows, start..start + len]))
            .collect(),
        1,
    )
}

/// Causal grouped-query self-attention with RoPE (pairs `(2i, 2i+1)` rotated): a fused
/// query/key/value projection split by heads over the tensor-parallel group and a
/// row-parallel output projection. Under context parallelism it attends over the whole
/// sequence held in chunks by the CP group (ring or all-gather attention).
#[derive(Module, Debug)]
pub struct Attention {
    /// Fused `[H, (h + 2·kv)·d / tp]`: this rank's query heads, then key and value heads.
    pub qkv: ColumnParallelLinear,
    /// `[h·d / tp, H]`.
    pub out: RowParallelLinear,
    /// RMSNorm weight over the queries (before RoPE), when the model has QK norms: `[d]`
    /// applied to each head, or `[h·d]` over all of them.
    pub q_norm: Option<Param<Tensor<1>>>,
    /// The same for the keys (`[d]` or `[kv·d]`).
    pub k_norm: Option<Param<Tensor<1>>>,
    #[module(skip)]
    norm_eps: f64,
    #[module(skip)]
    tp_size: usize,
    #[module(skip)]
    heads: usize,
    #[module(skip)]
    kv_heads: usize,
    #[module(skip)]
    head_dim: usize,
    #[module(skip)]
    rope_theta: f64,
}

impl Attention {
    /// The same with RMSNorms on the queries and keys (epsilon `eps`), applied before the
    /// rotary embedding: over each head with weights `[d]` (Qwen3), or over the whole query
    /// and key projections with weights `[heads·d]` and `[kv_heads·d]` (OLMoE; one process:
    /// refused under tensor parallelism).
    pub fn with_qk_norm(mut self, (q, k): (Tensor<1>, Tensor<1>), eps: f64) -> Result<Self> {
        let d = self.head_dim;
        let whole = q.dims() != [d];
        if whole && self.tp_size > 1 {
            return Err(invalid(
                "qk_norm",
                "a norm over the whole query and key projections runs on one process; use \
                 tp = 1",
            ));
        }
        let want = |n: usize| if whole { n * d } else { d };
        for (name, w, n) in [("q_norm", &q, self.heads), ("k_norm", &k, self.kv_heads)] {
            if w.dims() != [want(n)] {
                return Err(crate::MoeError::ShapeMismatch {
                    name,
                    expected: format!("[head_dim = {d}] or [heads·head_dim = {}]", n * d),
                    got: w.dims().to_vec(),
                });
            }
        }
        self.q_norm = Some(Param::from_tensor(q));
        self.k_norm = Some(Param::from_tensor(k));
        self.norm_eps = eps;
        Ok(self)
    }

    /// This rank's part of an attention layer with `heads` query and `kv_heads` key/value heads
    /// from the full weights: `qkv` `[H, (heads + 2·kv_heads)·d]` (query heads, then key heads,
    /// then value heads) and `out` `[heads·d, H]`, heads split over `tp` (`sequence_parallel`:
    /// the input and output are sequence shards).
    pub fn from_full(
        (qkv, out): (Tensor<2>, Tensor<2>),
        bias: Option<Tensor<1>>,
        (heads, kv_heads, rope_theta): (usize, usize, f64),
        tp: &Group,
        sequence_parallel: bool,
    ) -> Result<Self> {
        let [h, cols] = qkv.dims();
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(invalid(
                "kv_heads",
                format!("{kv_heads} key/value heads do not divide {heads} heads"),
            ));
        }
        let dh = cols / (heads + 2 * kv_heads);
        if dh * (heads + 2 * kv_heads) != cols || dh % 2 != 0 {
            return Err(invalid(
                "qkv",
                format!(
                    "{cols} columns are not (heads + 2·kv_heads) = {} even head dimensions",
                    heads + 2 * kv_heads
                ),
            ));
        }
        if out.dims() != [heads * dh, h] {
            return Err(crate::MoeError::ShapeMismatch {
                name: "out",
                expected: format!("[heads·d = {}, hidden = {h}]", heads * dh),
                got: out.dims().to_vec(),
            });
        }
        let p = tp.size();
        if !heads.is_multiple_of(p) || !kv_heads.is_multiple_of(p) {
            return Err(invalid(
                "heads",
                format!("{heads} query and {kv_heads} key/value heads do not split over TP {p}"),
            ));
        }
        let (lh, lkv, r) = (heads / p, kv_heads / p, tp.rank());
        let blocks = [
            (r * lh * dh, lh * dh),
            (heads * dh + r * lkv * dh, lkv * dh),
            ((heads + kv_heads) * dh + r * lkv * dh, lkv * dh),
        ];
        let local = column_blocks(qkv, &blocks);
        let bias = match bias {
            Some(b) if b.dims() != [cols] => {
                return Err(crate::MoeError::ShapeMismatch {
                    name: "qkv_bias",
                    expected: format!("[{cols}]"),
                    got: b.dims().to_vec(),
                });
            }
            Some(b) => Some(column_blocks(b.unsqueeze_dim(0), &blocks).reshape([cols / p])),
            None => None,
        };
        Ok(Self {
            qkv: ColumnParallelLinear::from_local(
                local,
                bias,
                tp.clone(),
                false,
                sequence_parallel,
            ),
            out: RowParallelLinear::from_full(out, None, tp.clone(), sequence_parallel)?,
            q_norm: None,
            k_norm: None,
            norm_eps: 1e-6,
            tp_size: p,
            heads: lh,
            kv_heads: lkv,
            head_dim: dh,
            rope_theta,
        })
    }

    /// Query heads on this rank.
    pub fn local_heads(&self) -> usize {
        self.heads
    }

    /// Rotary position embedding on `[B, n, S, d]` at the global `positions` of the S tokens.
    fn rope(&self, x: Tensor<4>, positions: &[usize]) -> Tensor<4> {
        let [b, n, s, d] = x.dims();
        let device = x.device();
        let half = d / 2;
        let mut cos = Vec::with_capacity(s * half);
        let mut sin = Vec::with_capacity(s * half);
        for &pos in positions {
            for i in 0..half {
                let freq = self.rope_theta.powf(-(2.0 * i as f64) / d as f64);
                let angle = pos as f64 * freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        // Rotated in the activations' precision.
        let dtype = x.dtype();
        let cos =
            host::upload_f32(cos, [1, 1, s, half], &device, "uploading RoPE cosines").cast(dtype);
        let sin =
            host::upload_f32(sin, [1, 1, s, half], &device, "uploading RoPE sines").cast(dtype);
        let pairs = x.reshape([b, n, s, half, 2]);
        let even = pairs
            .clone()
            .slice([0..b, 0..n, 0..s, 0..half, 0..1])
            .reshape([b, n, s, half]);
        let odd = pairs
            .slice([0..b, 0..n, 0..s, 0..half, 1..2])
            .reshape([b, n, s, half]);
        let re = even.clone() * cos.clone() - odd.clone() * sin.clone();
        let im = even * sin + odd * cos;
        Tensor::stack::<5>(vec![re, im], 4).reshape([b, n, s, d])
    }

    /// Attention over `x` `[S, B, H]` (sequence-parallel shards under TP), one process.
    pub fn forward(&self, x: Tensor<3>) -> Result<Tensor<3>> {
        self.forward_context(x, &Group::single(), CpAttention::Ring)
    }

    /// Attention over `x` `[S, B, H]`; with a CP group of more than one rank, `x` holds this
    /// rank's chunks of the sequence ([`ContextLayout`]) and attention runs over `cp` as ring
    /// or all-gather attention (`kind`).
    pub fn forward_context(
        &self,
        x: Tensor<3>,
        cp: &Group,
        kind: CpAttention,
    ) -> Result<Tensor<3>> {
        let qkv = self.qkv.forward(x)?;
        let [s, b, _] = qkv.dims();
        let (h, kv, d) = (self.heads, self.kv_heads, self.head_dim);
        let part = |start: usize, n: usize| {
            qkv.clone()
                .slice([0..s, 0..b, start * d..(start + n) * d])
                .reshape([s, b, n, d])
                .permute([1, 2, 0, 3])
        };
        // One rank holds the whole sequence in order; under CP its chunks' global positions.
        let layout = (cp.size() > 1)
            .then(|| ContextLayout::new(s * cp.size(), cp.size()))
            .transpose()?;
        let positions = match &layout {
            Some(l) => l.positions(cp.rank()),
            None => (0..s).collect(),
        };
        let (mut q, mut k) = (part(0, h), part(h, kv));
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qk_norm(q, qn.val(), self.norm_eps);
            k = qk_norm(k, kn.val(), self.norm_eps);
        }
        let q = self.rope(q, &positions);
        let k = self.rope(k, &positions);
        let v = part(h + kv, kv);
        // Each key/value head serves h / kv query heads.
        let group = h / kv;
        let expand = |t: Tensor<4>| {
            t.unsqueeze_dim::<5>(2)
                .repeat_dim(2, group)
                .reshape([b, h, s, d])
        };
        let (k, v) = (expand(k), expand(v));
        let context = match &layout {
            Some(layout) => context_attention(q, k, v, layout, cp, kind)?
                .permute([2, 0, 1, 3])
                .reshape([s, b, h * d]),
            None => causal_attention(q, k, v),
        };
        Ok(self.out.forward(context)?)
    }
}

impl ParallelParams for Attention {
    fn param_roles(&self, out: &mut Vec<(ParamId, ParamRole)>) {
        self.qkv.param_roles(out);
        self.out.param_roles(out);
        // Replicated over TP; each rank's gradient covers its own heads only, so the
        // gradients are summed over TP.
        let role = ParamRole {
            sequence_parallel_grad: self.tp_size > 1,
            ..ParamRole::replicated(false)
        };
        for w in [&self.q_norm, &self.k_norm].into_iter().flatten() {
            out.push((w.id, role));
        }
    }
}

/// RMSNorm of `x` `[B, n, S, d]` with weight `w`: over each head (`w` `[d]`), or over all `n`
/// heads of a token together (`w` `[n·d]`); in f32, returned in `x`'s precision.
fn qk_norm(x: Tensor<4>, w: Tensor<1>, eps: f64) -> Tensor<4> {
    let [_, n, _, d] = x.dims();
    let dtype = x.dtype();
    let (x, w) = (x.cast(FloatDType::F32), w.cast(FloatDType::F32));
    let normed = if w.dims()[0] == d {
        let rms = (x.clone().powi_scalar(2).mean_dim(3) + eps).sqrt();
        x / rms * w.reshape([1, 1, 1, d])
    } else {
        let rms = (x.clone().powi_scalar(2).mean_dim(3).mean_dim(1) + eps).sqrt();
        x / rms * w.reshape([1, n, 1, d])
    };
    normed.cast(dtype)
}
