//! The recipes' decoder-only MoE transformer: vocab-parallel embedding, pre-norm blocks of
//! RMSNorm → grouped-query attention with RoPE → RMSNorm → SwiGLU FFN (MoE on every k-th layer,
//! dense otherwise), final RMSNorm, column-parallel LM head, vocab-parallel cross-entropy.
//!
//! Attention, embedding, head and dense FFNs use the attention mapping (TP with sequence
//! parallelism, DP); MoE layers use the MoE mapping (ETP × EP × EDP) of the same ranks. Every
//! rank draws the same full weights from the recipe's seed and keeps its shards, so a parallel
//! run starts from exactly the single-rank model.

use std::collections::BTreeMap;

use burn::module::{Module, Param, ParamId};
use burn::tensor::{Device, Int, Tensor, TensorData, activation};
use burn_moe::prelude::{
    DispatcherKind, Experts, ExpertsConfig, MoeLayer, Router, RouterConfig, SharedExperts,
    SharedExpertsConfig,
};
use burn_parallel::context::{ContextLayout, CpAttention, context_attention};
use burn_parallel::pipeline::StageOutput;
use burn_parallel::prelude::GradientBuffer;
use burn_parallel::prelude::{
    ColumnParallelLinear, Group, GroupKind, LmHead, ParallelParams, ParamRole, ProcessGroups,
    RmsNorm, RowParallelLinear, VocabParallelEmbedding, causal_attention, lm_loss,
};

use crate::data::mix;
use crate::error::{RecipeError, Result};
use crate::recipe::{Dispatcher, ModelConfig};

/// Deterministic normal(0, std) weights from `(seed, stream)` (Box–Muller on SplitMix64).
pub fn normal(seed: u64, stream: u64, shape: Vec<usize>, std: f64) -> TensorData {
    let n: usize = shape.iter().product();
    let base = mix(seed ^ stream.wrapping_mul(0xD6E8_FEB8_6659_FD93));
    let values: Vec<f32> = (0..n)
        .map(|i| {
            let a = mix(base.wrapping_add(2 * i as u64));
            let b = mix(base.wrapping_add(2 * i as u64 + 1));
            let u1 = ((a >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
            let u2 = (b >> 11) as f64 / (1u64 << 53) as f64;
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * std) as f32
        })
        .collect();
    TensorData::new(values, shape)
}

/// Full (unsharded) tensors of a model by name; see [`MoeLm::full_tensors`] for the names.
pub type FullTensors = BTreeMap<String, TensorData>;

/// Where a model's full weights come from: drawn from the seed, or given by name (a trained
/// model's weights or gradients, laid out again for another parallel layout).
struct Init<'a> {
    seed: u64,
    std: f64,
    given: Option<&'a FullTensors>,
    device: Device,
}

impl Init<'_> {
    /// Tensor `name` of `shape`: `given[name]`, or normal(0, std) from `(seed, stream)`.
    fn get<const D: usize>(&self, name: &str, stream: u64, shape: [usize; D]) -> Result<Tensor<D>> {
        let data = match self.given {
            Some(given) => {
                let t = given.get(name).ok_or_else(|| RecipeError::Invalid {
                    key: name.into(),
                    reason: "no such tensor in the given weights".into(),
                })?;
                let got: Vec<usize> = t.shape().iter().copied().collect();
                if got.as_slice() != shape.as_slice() {
                    return Err(RecipeError::Invalid {
                        key: name.into(),
                        reason: format!("has shape {got:?}, the model needs {shape:?}"),
                    });
                }
                t.clone()
            }
            None => normal(self.seed, stream, shape.to_vec(), self.std),
        };
        Ok(Tensor::from_data(data, &self.device))
    }

    /// Norm weight `name` `[h]`: given, or ones.
    fn ones(&self, name: &str, h: usize) -> Result<Tensor<1>> {
        match self.given {
            Some(_) => self.get(name, 0, [h]),
            None => Ok(Tensor::ones([h], &self.device)),
        }
    }
}

/// Columns `[start, start + len)` of each of `parts` equal column blocks of `w` `[rows, cols]`,
/// concatenated: this rank's share of a fused projection.
fn column_blocks(w: Tensor<2>, blocks: &[(usize, usize)]) -> Tensor<2> {
    let [rows, _] = w.dims();
    Tensor::cat(
        blocks
            .iter()
            .map(|&(start, len)| w.clone().slice([0..rows, start..start + len]))
            .collect(),
        1,
    )
}

/// Grouped-query self-attention with RoPE; heads split over TP.
#[derive(Module, Debug)]
pub struct Attention {
    /// Fused `[H, (h + 2·kv)·d / tp]`: this rank's query heads, then key and value heads.
    pub qkv: ColumnParallelLinear,
    /// `[h·d / tp, H]`.
    pub out: RowParallelLinear,
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
    fn new(
        cfg: &ModelConfig,
        init: &Init,
        name: &str,
        stream: u64,
        tp: &Group,
        sp: bool,
    ) -> Result<Self> {
        let (h, heads) = (cfg.hidden, cfg.heads);
        let kv = cfg.kv_heads.unwrap_or(heads);
        let dh = h / heads;
        let (lh, lkv) = (heads / tp.size(), kv / tp.size());
        let r = tp.rank();
        let cols = (heads + 2 * kv) * dh;
        let w: Tensor<2> = init.get(&format!("{name}.qkv"), stream, [h, cols])?;
        let local = column_blocks(
            w,
            &[
                (r * lh * dh, lh * dh),
                (heads * dh + r * lkv * dh, lkv * dh),
                ((heads + kv) * dh + r * lkv * dh, lkv * dh),
            ],
        );
        let wo = init.get(&format!("{name}.out"), stream + 1, [heads * dh, h])?;
        Ok(Self {
            qkv: ColumnParallelLinear::from_local(local, None, tp.clone(), false, sp),
            out: RowParallelLinear::from_full(wo, None, tp.clone(), sp)?,
            heads: lh,
            kv_heads: lkv,
            head_dim: dh,
            rope_theta: cfg.rope_theta,
        })
    }

    /// Rotary position embedding on `[B, n, S, d]` (global `positions` of the S tokens, pairs
    /// (2i, 2i+1)).
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
        let cos: Tensor<4> = Tensor::from_data(TensorData::new(cos, [1, 1, s, half]), &device);
        let sin: Tensor<4> = Tensor::from_data(TensorData::new(sin, [1, 1, s, half]), &device);
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

    /// Attention over `x` `[S, B, H]` (sequence-parallel shards under TP); with a CP group of
    /// more than one rank, `x` holds this rank's chunks of the sequence ([`ContextLayout`]) and
    /// attention runs over `cp` as ring or all-gather attention (`kind`).
    fn forward(&self, x: Tensor<3>, cp: &Group, kind: CpAttention) -> Result<Tensor<3>> {
        let qkv = self.qkv.forward(x)?;
        let [s, b, _] = qkv.dims();
        let (h, kv, d) = (self.heads, self.kv_heads, self.head_dim);
        let part = |start: usize, n: usize| {
            qkv.clone()
                .slice([0..s, 0..b, start * d..(start + n) * d])
                .reshape([s, b, n, d])
                .permute([1, 2, 0, 3])
        };
        let layout = ContextLayout::new(s * cp.size(), cp.size())?;
        let positions = layout.positions(cp.rank());
        let q = self.rope(part(0, h), &positions);
        let k = self.rope(part(h, kv), &positions);
        let v = part(h + kv, kv);
        // Each key/value head serves h / kv query heads.
        let group = h / kv;
        let expand = |t: Tensor<4>| {
            t.unsqueeze_dim::<5>(2)
                .repeat_dim(2, group)
                .reshape([b, h, s, d])
        };
        let (k, v) = (expand(k), expand(v));
        let context = if cp.size() > 1 {
            context_attention(q, k, v, &layout, cp, kind)?
                .permute([2, 0, 1, 3])
                .reshape([s, b, h * d])
        } else {
            causal_attention(q, k, v)
        };
        Ok(self.out.forward(context)?)
    }
}

impl ParallelParams for Attention {
    fn param_roles(&self, out: &mut Vec<(ParamId, ParamRole)>) {
        self.qkv.param_roles(out);
        self.out.param_roles(out);
    }
}

/// Dense SwiGLU FFN: fused gate/up column-parallel, down row-parallel.
#[derive(Module, Debug)]
pub struct DenseFfn {
    /// `[H, 2F / tp]`: this rank's gate columns, then up columns.
    pub fc1: ColumnParallelLinear,
    /// `[F / tp, H]`.
    pub fc2: RowParallelLinear,
}

impl DenseFfn {
    fn new(
        cfg: &ModelConfig,
        init: &Init,
        name: &str,
        stream: u64,
        tp: &Group,
        sp: bool,
    ) -> Result<Self> {
        let (h, f) = (cfg.hidden, cfg.ffn_hidden);
        let k = f / tp.size();
        let r = tp.rank();
        let w1 = init.get(&format!("{name}.fc1"), stream, [h, 2 * f])?;
        let local = column_blocks(w1, &[(r * k, k), (f + r * k, k)]);
        let w2 = init.get(&format!("{name}.fc2"), stream + 1, [f, h])?;
        Ok(Self {
            fc1: ColumnParallelLinear::from_local(local, None, tp.clone(), false, sp),
            fc2: RowParallelLinear::from_full(w2, None, tp.clone(), sp)?,
        })
    }

    fn forward(&self, x: Tensor<3>) -> Result<Tensor<3>> {
        let h = self.fc1.forward(x)?;
        let [s, b, w] = h.dims();
        let gate = h.clone().slice([0..s, 0..b, 0..w / 2]);
        let up = h.slice([0..s, 0..b, w / 2..w]);
        Ok(self.fc2.forward(activation::silu(gate) * up)?)
    }
}

/// One transformer block.
#[derive(Module, Debug)]
pub struct Block {
    /// Pre-attention norm.
    pub norm1: RmsNorm,
    /// Attention.
    pub attn: Attention,
    /// Pre-FFN norm.
    pub norm2: RmsNorm,
    /// Dense FFN (layers without MoE).
    pub dense: Option<DenseFfn>,
    /// MoE FFN.
    pub moe: Option<MoeLayer>,
}

/// What one model chunk returns for one micro-batch.
#[derive(Debug, Clone)]
pub struct Forward {
    /// The hidden states for the next pipeline stage (`[S / cp / tp, B, H]`); `None` on the
    /// chunk that holds the head.
    pub hidden: Option<Tensor<3>>,
    /// Mean cross-entropy over the rank's tokens (same on every TP rank), on the chunk that
    /// holds the head.
    pub ce: Option<Tensor<1>>,
    /// This rank's load-balancing losses (sum over the chunk's MoE layers), when any.
    pub aux: Option<Tensor<1>>,
    /// This rank's z-losses, when any.
    pub z: Option<Tensor<1>>,
    /// Tokens per expert of each of the chunk's MoE layers (this rank's tokens), with the
    /// layer's index among the model's MoE layers.
    pub expert_load: Vec<(usize, Tensor<1, Int>)>,
}

/// The language model, or the part of it one pipeline stage holds: the embedding on the
/// first stage, the blocks of each of its model chunks (virtual stages), the final norm and
/// the head on the stage holding the last virtual stage.
#[derive(Module, Debug)]
pub struct MoeLm {
    /// Token embedding `[V / tp, H]` (first stage).
    pub embed: Option<VocabParallelEmbedding>,
    /// This stage's blocks, chunk after chunk.
    pub blocks: Vec<Block>,
    /// Final norm (last stage).
    pub norm_f: Option<RmsNorm>,
    /// LM head `[H, V / tp]` (last stage).
    pub head: Option<ColumnParallelLinear>,
    #[module(skip)]
    tp: Group,
    #[module(skip)]
    cp: Group,
    /// Per chunk: the range of `blocks` it runs.
    #[module(skip)]
    chunks: Vec<std::ops::Range<usize>>,
    /// Per block: its index among the model's MoE layers, for MoE blocks.
    #[module(skip)]
    moe_index: Vec<Option<usize>>,
    /// The output layer is the embedding (`head` is `None` on a stage that holds both, a copy
    /// on the last stage otherwise).
    #[module(skip)]
    tied: bool,
    /// Attention under context parallelism.
    #[module(skip)]
    cp_attention: CpAttention,
}

fn add(a: Option<Tensor<1>>, b: Option<Tensor<1>>) -> Option<Tensor<1>> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a + b),
        (a, None) => a,
        (None, b) => b,
    }
}

/// Which layers each virtual pipeline stage holds: virtual stage `chunk · stages + stage` is
/// model chunk `chunk` of pipeline stage `stage`, and virtual stages hold consecutive layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerSplit {
    stages: usize,
    chunks: usize,
    /// Layers of each virtual stage.
    counts: Vec<usize>,
}

impl LayerSplit {
    /// Equal shares of `layers` over `stages × chunks` virtual stages.
    pub fn uniform(layers: usize, stages: usize, chunks: usize) -> Result<Self> {
        let n = stages * chunks;
        if n == 0 || !layers.is_multiple_of(n) {
            return Err(RecipeError::Invalid {
                key: "parallel.pp".into(),
                reason: format!(
                    "{layers} layers do not split into pp × virtual_pp = {n} equal shares \
                     (give parallel.pp_layers for an uneven split)"
                ),
            });
        }
        Ok(Self {
            stages,
            chunks,
            counts: vec![layers / n; n],
        })
    }

    /// `counts[v]` layers on virtual stage `v` (Megatron's uneven first / last stages).
    pub fn given(layers: usize, stages: usize, chunks: usize, counts: &[usize]) -> Result<Self> {
        let bad = |reason: String| RecipeError::Invalid {
            key: "parallel.pp_layers".into(),
            reason,
        };
        if counts.len() != stages * chunks {
            return Err(bad(format!(
                "has {} entries, one per virtual stage (pp × virtual_pp = {}) is needed",
                counts.len(),
                stages * chunks
            )));
        }
        let total: usize = counts.iter().sum();
        if total != layers {
            return Err(bad(format!(
                "sums to {total}, the model has {layers} layers"
            )));
        }
        Ok(Self {
            stages,
            chunks,
            counts: counts.to_vec(),
        })
    }

    /// The split a recipe asks for (`parallel.pp_layers`, or uniform).
    pub fn from_recipe(recipe: &crate::recipe::Recipe) -> Result<Self> {
        let p = &recipe.parallel;
        let chunks = p.virtual_pp.unwrap_or(1);
        match &p.pp_layers {
            Some(counts) => Self::given(recipe.model.layers, p.pp, chunks, counts),
            None => Self::uniform(recipe.model.layers, p.pp, chunks),
        }
    }

    /// Model chunks per stage.
    pub fn chunks(&self) -> usize {
        self.chunks
    }

    /// The global layers of model chunk `chunk` on pipeline stage `stage`.
    pub fn layers(&self, stage: usize, chunk: usize) -> std::ops::Range<usize> {
        let vs = chunk * self.stages + stage;
        let start: usize = self.counts[..vs].iter().sum();
        start..start + self.counts[vs]
    }
}

/// How a rank's stage of the model is laid out beyond the process groups: the MoE token
/// dispatcher, the pipeline layer split and the context-parallel attention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageLayout {
    /// Token dispatcher of the MoE layers.
    pub dispatcher: Dispatcher,
    /// Layers of each virtual pipeline stage.
    pub split: LayerSplit,
    /// Ring (`p2p`) or all-gather attention under context parallelism.
    pub cp_attention: CpAttention,
}

impl StageLayout {
    /// The layout a recipe's `[parallel]` table asks for.
    pub fn from_recipe(recipe: &crate::recipe::Recipe) -> Result<Self> {
        let p = &recipe.parallel;
        Ok(Self {
            dispatcher: p.dispatcher,
            split: LayerSplit::from_recipe(recipe)?,
            cp_attention: match p.cp_comm {
                crate::recipe::CpComm::P2p => CpAttention::Ring,
                crate::recipe::CpComm::Allgather => CpAttention::AllGather,
            },
        })
    }
}

impl MoeLm {
    /// Builds this rank's part of the whole model for `groups` with an even pipeline split
    /// (one rank: `ProcessGroups::single()`).
    pub fn new(
        cfg: &ModelConfig,
        seed: u64,
        groups: &ProcessGroups,
        dispatcher: Dispatcher,
        d: &Device,
    ) -> Result<Self> {
        let layout = StageLayout {
            dispatcher,
            split: LayerSplit::uniform(cfg.layers, groups.group(GroupKind::Pp).size(), 1)?,
            cp_attention: CpAttention::Ring,
        };
        Self::stage(cfg, seed, groups, &layout, d)
    }

    /// Builds this rank's pipeline stage (its rank in the PP group) with the model chunks
    /// (virtual pipeline stages) of `layout.split`.
    pub fn stage(
        cfg: &ModelConfig,
        seed: u64,
        groups: &ProcessGroups,
        layout: &StageLayout,
        d: &Device,
    ) -> Result<Self> {
        let init = Init {
            seed,
            std: cfg.init_std,
            given: None,
            device: d.clone(),
        };
        Self::build(cfg, &init, groups, layout)
    }

    /// [`stage`](Self::stage) from full tensors given by name ([`full_tensors`](Self::full_tensors)
    /// of a one-rank model): the same weights laid out for `groups`' layout.
    pub fn stage_from(
        cfg: &ModelConfig,
        tensors: &FullTensors,
        groups: &ProcessGroups,
        layout: &StageLayout,
        d: &Device,
    ) -> Result<Self> {
        let init = Init {
            seed: 0,
            std: cfg.init_std,
            given: Some(tensors),
            device: d.clone(),
        };
        Self::build(cfg, &init, groups, layout)
    }

    fn build(
        cfg: &ModelConfig,
        init: &Init,
        groups: &ProcessGroups,
        layout: &StageLayout,
    ) -> Result<Self> {
        let (split, dispatcher) = (&layout.split, layout.dispatcher);
        let tp = groups.group(GroupKind::Tp).clone();
        let pp = groups.group(GroupKind::Pp);
        let (stage, stages) = (pp.rank(), pp.size());
        let chunks = split.chunks();
        if split.stages != stages {
            return Err(RecipeError::Invalid {
                key: "parallel.pp".into(),
                reason: format!(
                    "the layer split is for {} stages, the pipeline group has {stages}",
                    split.stages
                ),
            });
        }
        let sp = tp.size() > 1;
        let h = cfg.hidden;
        let norm = |name: &str| -> Result<RmsNorm> {
            Ok(RmsNorm::from_full(init.ones(name, h)?, 1e-6, sp))
        };
        let is_moe = |layer: usize| cfg.moe_every > 0 && (layer + 1).is_multiple_of(cfg.moe_every);
        let mut blocks = Vec::new();
        let mut ranges = Vec::with_capacity(chunks);
        let mut moe_index = Vec::new();
        for chunk in 0..chunks {
            let start = blocks.len();
            for layer in split.layers(stage, chunk) {
                let stream = 100 * (layer as u64 + 1);
                let name = format!("layers.{layer}");
                let (dense, moe) = if is_moe(layer) {
                    let moe = moe_layer(
                        cfg,
                        init,
                        &format!("{name}.moe"),
                        stream + 10,
                        groups,
                        dispatcher,
                    )?;
                    (None, Some(moe))
                } else {
                    let ffn =
                        DenseFfn::new(cfg, init, &format!("{name}.ffn"), stream + 10, &tp, sp)?;
                    (Some(ffn), None)
                };
                moe_index.push(is_moe(layer).then(|| (0..layer).filter(|&l| is_moe(l)).count()));
                blocks.push(Block {
                    norm1: norm(&format!("{name}.norm1"))?,
                    attn: Attention::new(cfg, init, &format!("{name}.attn"), stream, &tp, sp)?,
                    norm2: norm(&format!("{name}.norm2"))?,
                    dense,
                    moe,
                });
            }
            ranges.push(start..blocks.len());
        }
        let first = stage == 0;
        let last = stage + 1 == stages;
        let embed = if first {
            let w = init.get("embed", 1, [cfg.vocab, h])?;
            Some(VocabParallelEmbedding::from_full(w, tp.clone(), sp)?)
        } else {
            None
        };
        let (norm_f, head) = if last {
            let head = match (cfg.tie_embeddings, first) {
                (true, true) => None,
                // The last stage's copy of the tied weight.
                (true, false) => Some(init.get::<2>("embed", 1, [cfg.vocab, h])?.swap_dims(0, 1)),
                (false, _) => Some(init.get("head", 2, [h, cfg.vocab])?),
            };
            let head = head
                .map(|w| ColumnParallelLinear::from_full(w, None, tp.clone(), false, sp))
                .transpose()?;
            (Some(norm("norm_f")?), head)
        } else {
            (None, None)
        };
        Ok(Self {
            embed,
            blocks,
            norm_f,
            head,
            tp,
            cp: groups.group(GroupKind::Cp).clone(),
            chunks: ranges,
            moe_index,
            tied: cfg.tie_embeddings,
            cp_attention: layout.cp_attention,
        })
    }

    /// The full tensors of a one-rank whole model by name (its weights, or with `grads` their
    /// gradients; zeros for a parameter without one), for [`stage_from`](Self::stage_from):
    /// `embed`, `layers.L.norm1`, `layers.L.attn.qkv`, `layers.L.attn.out`, `layers.L.norm2`,
    /// `layers.L.ffn.fc1` / `fc2` (dense layers), `layers.L.moe.router`, `layers.L.moe.w1` /
    /// `w2` and `layers.L.moe.shared.w1` / `w2` (MoE layers), `norm_f`, `head` (unless tied).
    pub fn full_tensors(&self, grads: Option<&GradientBuffer>) -> Result<FullTensors> {
        let (Some(embed), Some(norm_f)) = (&self.embed, &self.norm_f) else {
            return Err(not_whole());
        };
        if self.tp.size() != 1 || self.cp.size() != 1 || self.chunks.len() != 1 {
            return Err(not_whole());
        }
        let mut out = FullTensors::new();
        out.insert("embed".into(), read(&embed.weight, grads));
        for (l, b) in self.blocks.iter().enumerate() {
            let mut put = |name: &str, t: TensorData| {
                out.insert(format!("layers.{l}.{name}"), t);
            };
            put("norm1", read(&b.norm1.weight, grads));
            put("attn.qkv", read(&b.attn.qkv.weight, grads));
            put("attn.out", read(&b.attn.out.weight, grads));
            put("norm2", read(&b.norm2.weight, grads));
            if let Some(d) = &b.dense {
                put("ffn.fc1", read(&d.fc1.weight, grads));
                put("ffn.fc2", read(&d.fc2.weight, grads));
            }
            if let Some(m) = &b.moe {
                if m.experts.w1.val().dims()[0] != m.router.weight.val().dims()[0] {
                    return Err(not_whole());
                }
                put("moe.router", read(&m.router.weight, grads));
                put("moe.w1", read(&m.experts.w1, grads));
                put("moe.w2", read(&m.experts.w2, grads));
                if let Some(sh) = &m.shared {
                    put("moe.shared.w1", read(&sh.w1, grads));
                    put("moe.shared.w2", read(&sh.w2, grads));
                }
            }
        }
        out.insert("norm_f".into(), read(&norm_f.weight, grads));
        match &self.head {
            Some(head) => {
                out.insert("head".into(), read(&head.weight, grads));
            }
            None if self.tied => {}
            None => return Err(not_whole()),
        }
        Ok(out)
    }

    /// Model chunks on this stage.
    pub fn chunks(&self) -> usize {
        self.chunks.len()
    }

    /// A chunk's output for the pipeline, every loss term scaled by `scale` (gradient
    /// accumulation): the total loss on the last chunk, the auxiliary losses elsewhere.
    ///
    /// Gradients are averaged over DP × CP. The cross-entropy is a mean over this rank's
    /// tokens, so that average is the mean over all tokens; the router losses are this rank's
    /// shares of losses summed over TP × CP, so they are multiplied by CP here to stay sums.
    pub fn stage_output(&self, out: &Forward, scale: f64) -> StageOutput {
        let cp = self.cp.size() as f64;
        let local = add(out.aux.clone(), out.z.clone()).map(|l| l * cp);
        match (&out.hidden, &out.ce) {
            (Some(hidden), _) => StageOutput::activation(hidden.clone(), local.map(|l| l * scale)),
            (None, Some(ce)) => {
                let total = match local {
                    Some(l) => ce.clone() + l,
                    None => ce.clone(),
                };
                StageOutput::loss(total * scale)
            }
            (None, None) => StageOutput {
                hidden: None,
                loss: None,
            },
        }
    }

    /// Next-token prediction with the whole model on `ids` `[S, B]` with `targets` `[S, B]`
    /// (this CP rank's tokens when CP > 1).
    pub fn forward(&self, ids: Tensor<2, Int>, targets: Tensor<2, Int>) -> Result<Forward> {
        if self.embed.is_none() || self.norm_f.is_none() || self.chunks.len() != 1 {
            return Err(crate::error::RecipeError::Invalid {
                key: "parallel.pp".into(),
                reason: "this model is one pipeline stage of several; run it with forward_chunk"
                    .into(),
            });
        }
        self.forward_chunk(0, None, &ids, &targets)
    }

    /// Runs model chunk `chunk` on one micro-batch: from `input` (the previous stage's hidden
    /// states) or, without one, from the embedding of `ids`; through the head and the loss
    /// against `targets` when this chunk is the model's last.
    pub fn forward_chunk(
        &self,
        chunk: usize,
        input: Option<Tensor<3>>,
        ids: &Tensor<2, Int>,
        targets: &Tensor<2, Int>,
    ) -> Result<Forward> {
        let range =
            self.chunks
                .get(chunk)
                .cloned()
                .ok_or_else(|| crate::error::RecipeError::Invalid {
                    key: "chunk".into(),
                    reason: format!("this stage has {} model chunks", self.chunks.len()),
                })?;
        let mut x = match (input, &self.embed) {
            (Some(x), _) => x,
            (None, Some(embed)) => embed.forward(ids.clone())?,
            (None, None) => {
                return Err(crate::error::RecipeError::Invalid {
                    key: "input".into(),
                    reason: "a chunk after the first needs the previous stage's hidden states"
                        .into(),
                });
            }
        };
        let (mut aux, mut z, mut load) = (None, None, Vec::new());
        for (block, moe_index) in self.blocks[range.clone()]
            .iter()
            .zip(&self.moe_index[range])
        {
            x = x.clone()
                + block
                    .attn
                    .forward(block.norm1.forward(x), &self.cp, self.cp_attention)?;
            let h = block.norm2.forward(x.clone());
            let y = match (&block.dense, &block.moe) {
                (Some(dense), _) => dense.forward(h)?,
                (None, Some(moe)) => {
                    let out = moe.forward(h)?;
                    aux = add(aux, out.aux_loss.clone());
                    z = add(z, out.z_loss.clone());
                    load.push((moe_index.unwrap_or(0), out.tokens_per_expert.clone()));
                    out.output
                }
                (None, None) => h,
            };
            x = x + y;
        }
        let last = chunk + 1 == self.chunks.len();
        let head = match (&self.head, &self.embed) {
            (Some(head), _) => Some(LmHead::Linear(head)),
            (None, Some(embed)) if self.tied => Some(LmHead::Tied(embed)),
            _ => None,
        };
        let (hidden, ce) = match (&self.norm_f, head) {
            (Some(norm), Some(head)) if last => (
                None,
                Some(lm_loss(norm, head, x, targets.clone(), &self.tp)?),
            ),
            _ => (Some(x), None),
        };
        Ok(Forward {
            hidden,
            ce,
            aux,
            z,
            expert_load: load,
        })
    }

    /// Every parameter's role for the distributed optimizer.
    pub fn roles(&self) -> Vec<(ParamId, ParamRole)> {
        let mut out = Vec::new();
        if let Some(e) = &self.embed {
            e.param_roles(&mut out);
        }
        for b in &self.blocks {
            b.norm1.param_roles(&mut out);
            b.attn.param_roles(&mut out);
            b.norm2.param_roles(&mut out);
            if let Some(d) = &b.dense {
                d.fc1.param_roles(&mut out);
                d.fc2.param_roles(&mut out);
            }
            if let Some(m) = &b.moe {
                m.param_roles(&mut out);
            }
        }
        if let Some(n) = &self.norm_f {
            n.param_roles(&mut out);
        }
        if let Some(h) = &self.head {
            let at = out.len();
            h.param_roles(&mut out);
            if self.tied {
                // The last stage's copy of the embedding: the same role as the embedding.
                let embed = VocabParallelEmbedding::role(self.tp.size() > 1);
                for (_, role) in &mut out[at..] {
                    *role = ParamRole {
                        tied_copy: true,
                        ..embed
                    };
                }
            }
        }
        out
    }

    /// With tied embeddings over several pipeline stages: sums the gradients of the first
    /// stage's embedding and the last stage's copy (transposed) into both, so that both copies
    /// take the same step. Collective between the first and last stages of `pp`.
    pub fn tie_gradients(&self, grads: &mut GradientBuffer, pp: &Group) -> Result<()> {
        let (stages, stage) = (pp.size(), pp.rank());
        if !self.tied || stages == 1 || (stage != 0 && stage + 1 != stages) {
            return Ok(());
        }
        const TAG: u16 = 32_767;
        let (weight, peer) = match (&self.embed, &self.head) {
            (Some(e), _) if stage == 0 => (e.weight.clone(), stages - 1),
            (_, Some(h)) => (h.weight.clone(), 0),
            _ => return Ok(()),
        };
        let [rows, cols] = weight.val().dims();
        let mine = grads
            .get(weight.id)
            .map_or_else(|| vec![0.0; rows * cols], <[f32]>::to_vec);
        let comm = pp.communicator()?;
        comm.post_send(mine, peer, TAG)?;
        // The peer's gradient is the transpose of this copy's layout.
        let theirs = comm.recv(rows * cols, peer, TAG)?;
        comm.flush_sends()?;
        let transposed: Vec<f32> = (0..rows * cols)
            .map(|i| theirs[(i % cols) * rows + i / cols])
            .collect();
        grads.accumulate(weight.id, &transposed);
        Ok(())
    }
}

fn not_whole() -> RecipeError {
    RecipeError::Invalid {
        key: "model".into(),
        reason: "full tensors come from a one-rank model without parallelism".into(),
    }
}

/// A parameter's values, or its gradient from `grads` (zeros without one).
fn read<const D: usize>(p: &Param<Tensor<D>>, grads: Option<&GradientBuffer>) -> TensorData {
    let value = p.val();
    match grads {
        Some(g) => {
            let shape = value.dims().to_vec();
            let n: usize = shape.iter().product();
            let values = g.get(p.id).map_or_else(|| vec![0.0; n], <[f32]>::to_vec);
            TensorData::new(values, shape)
        }
        None => value.into_data(),
    }
}

fn moe_layer(
    cfg: &ModelConfig,
    init: &Init,
    name: &str,
    stream: u64,
    groups: &ProcessGroups,
    dispatcher: Dispatcher,
) -> Result<MoeLayer> {
    let (h, e) = (cfg.hidden, cfg.experts);
    let f = cfg.expert_ffn_hidden.unwrap_or(cfg.ffn_hidden);
    // Top-1 routing takes the softmax before the top-k (Switch / Megatron's pre-softmax),
    // otherwise the router gets no gradient.
    let mut router = RouterConfig::new(h, e, cfg.topk)
        .with_pre_softmax(cfg.topk == 1)
        .with_aux_loss_coeff(cfg.aux_loss_coeff)
        .with_z_loss_coeff(cfg.z_loss_coeff)
        .with_init_std(cfg.init_std);
    if let Some(c) = cfg.capacity_factor {
        router = router
            .with_capacity_factor(Some(c))
            .with_pad_to_capacity(true);
    }
    let router = Router::from_weight(router, init.get(&format!("{name}.router"), stream, [e, h])?)?;
    let experts = Experts::from_weights(
        ExpertsConfig::new(e, h, f).with_init_std(cfg.init_std),
        init.get(&format!("{name}.w1"), stream + 1, [e, h, 2 * f])?,
        init.get(&format!("{name}.w2"), stream + 2, [e, f, h])?,
    )?;
    let shared = match cfg.shared_expert_ffn_hidden {
        Some(fs) => Some(SharedExperts::from_weights(
            SharedExpertsConfig::new(h, fs),
            init.get(&format!("{name}.shared.w1"), stream + 3, [h, 2 * fs])?,
            init.get(&format!("{name}.shared.w2"), stream + 4, [fs, h])?,
            None,
        )?),
        None => None,
    };
    let kind = match dispatcher {
        Dispatcher::Alltoall => DispatcherKind::AllToAll,
        Dispatcher::Allgather => DispatcherKind::AllGather,
    };
    Ok(MoeLayer::new(router, experts, shared)?.parallelize(groups, kind)?)
}
