//! [`MoeLm`]: the decoder-only MoE transformer, whole or as one rank's part of a parallel
//! layout.
//!
//! Attention, embedding, head and dense FFNs use the attention mapping (TP with sequence
//! parallelism, CP, DP, PP); MoE layers use the MoE mapping (ETP × EP × EDP) of the same ranks.
//! Every weight is drawn from `(seed, stream)` by a counter-based generator
//! ([`burn_parallel::rng::normal`]) and each rank keeps its shards, so a parallel model starts
//! from exactly the one-rank model; [`MoeLm::parallelize`] lays an existing model out again.

use std::collections::BTreeMap;

use burn::module::{Module, Param, ParamId};
use burn::tensor::{Device, Int, Tensor, TensorData};
use burn_parallel::context::CpAttention;
use burn_parallel::mappings;
use burn_parallel::pipeline::StageOutput;
use burn_parallel::prelude::{
    ColumnParallelLinear, GradientBuffer, Group, GroupKind, LmHead, ParallelParams, ParamRole,
    ProcessGroups, RmsNorm, VocabParallelEmbedding, lm_loss,
};

use crate::error::{MoeError, Result, invalid};
use crate::experts::{Experts, SharedExperts};
use crate::host;
use crate::layer::MoeLayer;
use crate::lm::attention::Attention;
use crate::lm::config::MoeLmConfig;
use crate::lm::ffn::DenseFfn;
use crate::lm::precision::Precision;
use crate::lm::split::StageLayout;
use crate::router::{GlobalAuxState, RouteOptions, Router};

/// Full (unsharded) tensors of a model by name; see [`MoeLm::full_tensors`] for the names.
pub type FullTensors = BTreeMap<String, TensorData>;

/// Where a model's full weights come from: drawn from the seed, or given by name.
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
            Some(given) => self.given_tensor(given, name, &shape)?.clone(),
            None => burn_parallel::rng::normal(self.seed, stream, shape.to_vec(), self.std),
        };
        Ok(host::upload(
            data,
            &self.device,
            "uploading initial weights",
        ))
    }

    /// Sub-block `block` (one range per dimension) of tensor `name` of `shape`, without the
    /// rest: cut from `given[name]`, or drawn alone ([`burn_parallel::rng::normal_block`],
    /// equal to the same block of [`get`](Self::get)).
    fn block<const D: usize>(
        &self,
        name: &str,
        stream: u64,
        shape: [usize; D],
        block: [std::ops::Range<usize>; D],
    ) -> Result<Tensor<D>> {
        let data = match self.given {
            Some(given) => {
                let t = self.given_tensor(given, name, &shape)?;
                // Host data: the block's values alone (an f32 tensor is read in place).
                let converted: Vec<f32>;
                let all = match t.as_slice::<f32>() {
                    Ok(all) => all,
                    Err(_) => {
                        converted = t.iter::<f32>().collect();
                        &converted
                    }
                };
                let values: Vec<f32> = burn_parallel::rng::block_runs(&shape, &block)
                    .flat_map(|run| all[run].iter().copied())
                    .collect();
                TensorData::new(values, block.iter().map(|r| r.len()).collect::<Vec<_>>())
            }
            None => burn_parallel::rng::normal_block(self.seed, stream, &shape, &block, self.std),
        };
        Ok(host::upload(
            data,
            &self.device,
            "uploading initial weights",
        ))
    }

    fn given_tensor<'g>(
        &self,
        given: &'g FullTensors,
        name: &str,
        shape: &[usize],
    ) -> Result<&'g TensorData> {
        let t = given.get(name).ok_or_else(|| MoeError::InvalidArgument {
            name: "tensors",
            reason: format!("no tensor `{name}` among the given weights"),
        })?;
        let got: Vec<usize> = t.shape().iter().copied().collect();
        if got.as_slice() != shape {
            return Err(MoeError::InvalidArgument {
                name: "tensors",
                reason: format!("`{name}` has shape {got:?}, the model needs {shape:?}"),
            });
        }
        Ok(t)
    }

    /// Bias `name` `[n]`: given, or zeros.
    fn zeros(&self, name: &str, n: usize) -> Result<Tensor<1>> {
        match self.given {
            Some(_) => self.get(name, 0, [n]),
            None => Ok(Tensor::zeros([n], &self.device)),
        }
    }

    /// Tensor `name` of `shape` when weights are given (it must be there), `None` when they
    /// are drawn (state that starts from the layer's own default, such as an expert bias).
    fn state<const D: usize>(&self, name: &str, shape: [usize; D]) -> Result<Option<Tensor<D>>> {
        match self.given {
            Some(_) => self.get(name, 0, shape).map(Some),
            None => Ok(None),
        }
    }

    /// Norm weight `name` `[h]`: given, or ones.
    fn ones(&self, name: &str, h: usize) -> Result<Tensor<1>> {
        match self.given {
            Some(_) => self.get(name, 0, [h]),
            None => Ok(Tensor::ones([h], &self.device)),
        }
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
    /// The global aux loss's accumulated counts of each of the chunk's MoE layers (routers
    /// with `global_aux_loss_coeff > 0`), by MoE layer index: pass them to the next
    /// micro-batch of the same global batch ([`MoeLm::forward_chunk_with`]).
    pub global_aux: Vec<(usize, GlobalAuxState)>,
    /// The number of non-finite router logits of the chunk's MoE layers (routers with
    /// `check_finite`), on the device: the layers' deferred finiteness checks, for the caller
    /// to read with its losses ([`check_finite`](Self::check_finite) reads it alone).
    pub nonfinite_logits: Option<Tensor<1, Int>>,
}

impl Forward {
    /// The MoE layers' deferred finiteness check: one read of
    /// [`nonfinite_logits`](Self::nonfinite_logits); [`MoeError::NonFiniteLogits`] when any
    /// router logit was NaN or infinite.
    pub fn check_finite(&self) -> Result<()> {
        crate::router::check_nonfinite(self.nonfinite_logits.clone())
    }

    /// The training loss: cross-entropy plus the router losses (when this chunk holds the
    /// head).
    pub fn total_loss(&self) -> Option<Tensor<1>> {
        let ce = self.ce.clone()?;
        add(Some(ce), add(self.aux.clone(), self.z.clone()))
    }
}

/// The language model, or the part of it one rank holds: the embedding on the first pipeline
/// stage, the blocks of each of its model chunks (virtual stages), the final norm and the head
/// on the stage holding the last virtual stage; every layer's shard of the tensor- and
/// expert-parallel groups.
///
/// ```
/// use burn::tensor::{Device, Int, Tensor};
/// use burn_moe::lm::MoeLmConfig;
/// use burn_moe::prelude::MoeLayerConfig;
///
/// let config = MoeLmConfig::new(32, 16, 2, 2, 32).with_moe(Some(MoeLayerConfig::swiglu(16, 16, 4, 2)));
/// let model = config.init(7, &Device::flex()).unwrap();
/// let ids = Tensor::<2, Int>::from_data([[1, 2], [3, 4], [5, 6]], &Device::flex()); // [S, B]
/// assert_eq!(model.forward(ids).unwrap().dims(), [3, 2, 32]); // logits [S, B, vocab]
/// ```
#[derive(Module, Debug)]
pub struct MoeLm {
    /// Token embedding `[V / tp, H]` (first stage).
    pub embed: Option<VocabParallelEmbedding>,
    /// This stage's blocks, chunk after chunk.
    pub blocks: Vec<Block>,
    /// Final norm (last stage).
    pub norm_f: Option<RmsNorm>,
    /// LM head `[H, V / tp]` (last stage; `None` when tied to the embedding on one stage).
    pub head: Option<ColumnParallelLinear>,
    #[module(skip)]
    config: MoeLmConfig,
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
    /// Attention under context parallelism.
    #[module(skip)]
    cp_attention: CpAttention,
    /// Precision of the matrices and activations ([`with_precision`](Self::with_precision)).
    #[module(skip)]
    pub(super) precision: Precision,
}

fn add(a: Option<Tensor<1>>, b: Option<Tensor<1>>) -> Option<Tensor<1>> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a + b),
        (a, None) => a,
        (None, b) => b,
    }
}

impl MoeLmConfig {
    /// The whole model on one process, every weight drawn from `seed`.
    pub fn init(&self, seed: u64, device: &Device) -> Result<MoeLm> {
        self.init_stage(
            seed,
            &ProcessGroups::single()?,
            &StageLayout::single(self.layers),
            device,
        )
    }

    /// This rank's part of the model for the mesh of `groups` and `layout` (its pipeline stage
    /// is its rank in the PP group), drawn from `seed`: the same weights as [`init`](Self::init)
    /// then [`MoeLm::parallelize`].
    pub fn init_stage(
        &self,
        seed: u64,
        groups: &ProcessGroups,
        layout: &StageLayout,
        device: &Device,
    ) -> Result<MoeLm> {
        let init = Init {
            seed,
            std: self.init_std,
            given: None,
            device: device.clone(),
        };
        MoeLm::build(self, &init, groups, layout)
    }
}

impl MoeLmConfig {
    /// The name and shape of every full tensor of the model ([`MoeLm::full_tensors`]'s names),
    /// without building it.
    pub fn full_shapes(&self) -> Result<BTreeMap<String, Vec<usize>>> {
        self.validate()?;
        let (h, dh) = (self.hidden, self.head_dim());
        let mut out = BTreeMap::new();
        let mut put = |name: String, shape: Vec<usize>| {
            out.insert(name, shape);
        };
        put("embed".into(), vec![self.vocab, h]);
        for l in 0..self.layers {
            let name = |n: &str| format!("layers.{l}.{n}");
            let cols = (self.heads + 2 * self.kv()) * dh;
            put(name("norm1"), vec![h]);
            put(name("attn.qkv"), vec![h, cols]);
            put(name("attn.out"), vec![self.heads * dh, h]);
            if self.qkv_bias {
                put(name("attn.qkv_bias"), vec![cols]);
            }
            if let Some((nq, nk)) = self.qk_norm.heads(self.heads, self.kv()) {
                put(name("attn.q_norm"), vec![nq * dh]);
                put(name("attn.k_norm"), vec![nk * dh]);
            }
            put(name("norm2"), vec![h]);
            match (&self.moe, self.is_moe(l)) {
                (Some(moe), true) => {
                    let (e, f) = (moe.router.num_experts, moe.experts.ffn_hidden);
                    put(name("moe.router"), vec![e, h]);
                    if moe.router.expert_bias {
                        put(name("moe.expert_bias"), vec![e]);
                    }
                    let f1 = moe.experts.activation.fc1_width(f);
                    put(name("moe.w1"), vec![e, h, f1]);
                    put(name("moe.w2"), vec![e, f, h]);
                    if let Some(s) = &moe.shared {
                        let fs = s.ffn_hidden;
                        put(name("moe.shared.w1"), vec![h, s.activation.fc1_width(fs)]);
                        put(name("moe.shared.w2"), vec![fs, h]);
                        if s.gate {
                            put(name("moe.shared.gate"), vec![1, h]);
                        }
                    }
                }
                _ => {
                    put(name("ffn.fc1"), vec![h, 2 * self.ffn_hidden]);
                    put(name("ffn.fc2"), vec![self.ffn_hidden, h]);
                }
            }
        }
        put("norm_f".into(), vec![h]);
        if !self.tie_embeddings {
            put("head".into(), vec![h, self.vocab]);
        }
        Ok(out)
    }
}

impl MoeLm {
    /// This rank's part of the model whose full tensors are `tensors` (by the names of
    /// [`full_tensors`](Self::full_tensors)), laid out for `groups` and `layout`.
    pub fn from_tensors(
        config: &MoeLmConfig,
        tensors: &FullTensors,
        groups: &ProcessGroups,
        layout: &StageLayout,
        device: &Device,
    ) -> Result<Self> {
        let init = Init {
            seed: 0,
            std: config.init_std,
            given: Some(tensors),
            device: device.clone(),
        };
        Self::build(config, &init, groups, layout)
    }

    /// This whole one-rank model laid out for `groups` and `layout` (torchtitan's
    /// `parallelize`): the plain model is the reference of every layout.
    pub fn parallelize(self, groups: &ProcessGroups, layout: &StageLayout) -> Result<Self> {
        let device = self.device()?;
        let tensors = self.full_tensors(None)?;
        Self::from_tensors(&self.config, &tensors, groups, layout, &device)
    }

    /// The device of the model's weights (a stage holding the embedding).
    pub fn device(&self) -> Result<Device> {
        self.embed
            .as_ref()
            .map(|e| e.weight.val().device())
            .ok_or_else(not_whole)
    }

    /// The model's configuration.
    pub fn config(&self) -> &MoeLmConfig {
        &self.config
    }

    fn build(
        cfg: &MoeLmConfig,
        init: &Init,
        groups: &ProcessGroups,
        layout: &StageLayout,
    ) -> Result<Self> {
        cfg.validate()?;
        let split = &layout.split;
        let tp = groups.group(GroupKind::Tp).clone();
        let pp = groups.group(GroupKind::Pp);
        let (stage, stages) = (pp.rank(), pp.size());
        let chunks = split.chunks();
        if split.stages() != stages {
            return Err(invalid(
                "pp",
                format!(
                    "the layer split is for {} stages, the pipeline group has {stages}",
                    split.stages()
                ),
            ));
        }
        let sp = tp.size() > 1;
        let h = cfg.hidden;
        let norm = |name: &str| -> Result<RmsNorm> {
            Ok(RmsNorm::from_full(init.ones(name, h)?, cfg.norm_eps, sp))
        };
        let dh = cfg.head_dim();
        let mut blocks = Vec::new();
        let mut ranges = Vec::with_capacity(chunks);
        let mut moe_index = Vec::new();
        for chunk in 0..chunks {
            let start = blocks.len();
            for layer in split.layers(stage, chunk) {
                let stream = 100 * (layer as u64 + 1);
                let name = format!("layers.{layer}");
                let (dense, moe) = if cfg.is_moe(layer) {
                    let moe = moe_layer(cfg, init, &format!("{name}.moe"), stream + 10, groups)?
                        .lay_out(groups, layout.dispatcher)?;
                    (None, Some(moe))
                } else {
                    let f = cfg.ffn_hidden;
                    let fc1 = init.get(&format!("{name}.ffn.fc1"), stream + 10, [h, 2 * f])?;
                    let fc2 = init.get(&format!("{name}.ffn.fc2"), stream + 11, [f, h])?;
                    (Some(DenseFfn::from_full(fc1, fc2, &tp, sp)?), None)
                };
                moe_index.push(cfg.moe_index(layer));
                let cols = (cfg.heads + 2 * cfg.kv()) * dh;
                let qkv = init.get(&format!("{name}.attn.qkv"), stream, [h, cols])?;
                let out = init.get(&format!("{name}.attn.out"), stream + 1, [cfg.heads * dh, h])?;
                let bias = cfg
                    .qkv_bias
                    .then(|| init.zeros(&format!("{name}.attn.qkv_bias"), cols))
                    .transpose()?;
                let mut attn = Attention::from_full(
                    (qkv, out),
                    bias,
                    (cfg.heads, cfg.kv(), cfg.rope_theta),
                    &tp,
                    sp,
                )?;
                if let Some((nq, nk)) = cfg.qk_norm.heads(cfg.heads, cfg.kv()) {
                    let q = init.ones(&format!("{name}.attn.q_norm"), nq * dh)?;
                    let k = init.ones(&format!("{name}.attn.k_norm"), nk * dh)?;
                    attn = attn.with_qk_norm((q, k), cfg.norm_eps)?;
                }
                blocks.push(Block {
                    norm1: norm(&format!("{name}.norm1"))?,
                    attn,
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
            config: cfg.clone(),
            tp,
            cp: groups.group(GroupKind::Cp).clone(),
            chunks: ranges,
            moe_index,
            cp_attention: layout.cp_attention,
            precision: Precision::F32,
        })
    }

    /// The full tensors of a one-rank whole model by name (its weights, or with `grads` their
    /// gradients; zeros for a parameter without one), for [`from_tensors`](Self::from_tensors):
    /// `embed`, `layers.L.norm1`, `layers.L.attn.qkv`, `layers.L.attn.out` (and
    /// `layers.L.attn.q_norm` / `k_norm` with QK norms), `layers.L.norm2`,
    /// `layers.L.ffn.fc1` / `fc2` (dense layers), `layers.L.moe.router` (and
    /// `layers.L.moe.expert_bias` with an expert bias), `layers.L.moe.w1` /
    /// `w2`, `layers.L.moe.shared.w1` / `w2` / `gate` (MoE layers), `norm_f`, `head` (unless
    /// tied).
    pub fn full_tensors(&self, grads: Option<&GradientBuffer>) -> Result<FullTensors> {
        let (Some(embed), Some(norm_f)) = (&self.embed, &self.norm_f) else {
            return Err(not_whole());
        };
        if self.tp.size() != 1 || self.cp.size() != 1 || self.chunks.len() != 1 {
            return Err(not_whole());
        }
        let mut out = FullTensors::new();
        out.insert("embed".into(), read(&embed.weight, grads)?);
        for (l, b) in self.blocks.iter().enumerate() {
            let mut put = |name: &str, t: TensorData| {
                out.insert(format!("layers.{l}.{name}"), t);
            };
            put("norm1", read(&b.norm1.weight, grads)?);
            put("attn.qkv", read(&b.attn.qkv.weight, grads)?);
            put("attn.out", read(&b.attn.out.weight, grads)?);
            if let Some(bias) = &b.attn.qkv.bias {
                put("attn.qkv_bias", read(bias, grads)?);
            }
            if let (Some(q), Some(k)) = (&b.attn.q_norm, &b.attn.k_norm) {
                put("attn.q_norm", read(q, grads)?);
                put("attn.k_norm", read(k, grads)?);
            }
            put("norm2", read(&b.norm2.weight, grads)?);
            if let Some(d) = &b.dense {
                put("ffn.fc1", read(&d.fc1.weight, grads)?);
                put("ffn.fc2", read(&d.fc2.weight, grads)?);
            }
            if let Some(m) = &b.moe {
                if m.experts.w1.val().dims()[0] != m.router.weight.val().dims()[0] {
                    return Err(not_whole());
                }
                put("moe.router", read(&m.router.weight, grads)?);
                if let Some(bias) = &m.router.expert_bias {
                    put("moe.expert_bias", read(bias, grads)?);
                }
                put("moe.w1", read(&m.experts.w1, grads)?);
                put("moe.w2", read(&m.experts.w2, grads)?);
                if let Some(sh) = &m.shared {
                    put("moe.shared.w1", read(&sh.w1, grads)?);
                    put("moe.shared.w2", read(&sh.w2, grads)?);
                    if let Some(g) = &sh.gate {
                        put("moe.shared.gate", read(g, grads)?);
                    }
                }
            }
        }
        out.insert("norm_f".into(), read(&norm_f.weight, grads)?);
        match &self.head {
            Some(head) => {
                out.insert("head".into(), read(&head.weight, grads)?);
            }
            None if self.config.tie_embeddings => {}
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

    fn whole(&self) -> Result<()> {
        if self.embed.is_none() || self.norm_f.is_none() || self.chunks.len() != 1 {
            return Err(invalid(
                "pp",
                "this model is one pipeline stage of several; run it with forward_chunk",
            ));
        }
        Ok(())
    }

    /// Logits `[S, B, vocab]` of token ids `[S, B]` (the whole vocabulary, gathered over TP;
    /// under CP the logits of this rank's chunks).
    pub fn forward(&self, ids: Tensor<2, Int>) -> Result<Tensor<3>> {
        self.whole()?;
        let x = self.hidden(0, None, &ids, &[])?.0;
        let (Some(norm), Some(head)) = (&self.norm_f, self.lm_head()) else {
            return Err(not_whole());
        };
        let local = head.logits(norm.forward(x))?;
        Ok(mappings::gather_from_region(local, &self.tp)?)
    }

    /// Next-token prediction with the whole model on `ids` `[S, B]` with `targets` `[S, B]`
    /// (this CP rank's tokens when CP > 1): the mean cross-entropy and the router losses.
    pub fn forward_loss(&self, ids: Tensor<2, Int>, targets: Tensor<2, Int>) -> Result<Forward> {
        self.whole()?;
        self.forward_chunk(0, None, &ids, &targets)
    }

    fn lm_head(&self) -> Option<LmHead<'_>> {
        match (&self.head, &self.embed) {
            (Some(head), _) => Some(LmHead::Linear(head)),
            (None, Some(embed)) if self.config.tie_embeddings => Some(LmHead::Tied(embed)),
            _ => None,
        }
    }

    /// The hidden states after model chunk `chunk` and its router outputs; `global` holds the
    /// global aux loss's counts so far by MoE layer index.
    fn hidden(
        &self,
        chunk: usize,
        input: Option<Tensor<3>>,
        ids: &Tensor<2, Int>,
        global: &[Option<GlobalAuxState>],
    ) -> Result<(Tensor<3>, Forward)> {
        let range = self
            .chunks
            .get(chunk)
            .cloned()
            .ok_or_else(|| MoeError::InvalidArgument {
                name: "chunk",
                reason: format!("this stage has {} model chunks", self.chunks.len()),
            })?;
        let mut x = match (input, &self.embed) {
            // A previous stage's hidden states, in this model's precision.
            (Some(x), _) => x.cast(self.precision.dtype()),
            (None, Some(embed)) => embed.forward(ids.clone())?,
            (None, None) => {
                return Err(MoeError::InvalidArgument {
                    name: "input",
                    reason: "a chunk after the first needs the previous stage's hidden states"
                        .into(),
                });
            }
        };
        let (mut aux, mut z, mut load, mut states) = (None, None, Vec::new(), Vec::new());
        let mut nonfinite: Option<Tensor<1, Int>> = None;
        for (block, moe_index) in self.blocks[range.clone()]
            .iter()
            .zip(&self.moe_index[range])
        {
            x = x.clone()
                + block.attn.forward_context(
                    block.norm1.forward(x),
                    &self.cp,
                    self.cp_attention,
                )?;
            let h = block.norm2.forward(x.clone());
            let y = match (&block.dense, &block.moe) {
                (Some(dense), _) => dense.forward(h)?,
                (None, Some(moe)) => {
                    let index = moe_index.unwrap_or(0);
                    let mut options = RouteOptions::default();
                    if let Some(Some(state)) = global.get(index) {
                        options = options.global_aux(state.clone());
                    }
                    let out = moe.forward_with(h, options)?;
                    aux = add(aux, out.aux_loss.clone());
                    z = add(z, out.z_loss.clone());
                    load.push((index, out.tokens_per_expert.clone()));
                    if let Some(bad) = out.router.nonfinite_logits.clone() {
                        nonfinite = Some(match nonfinite {
                            Some(sum) => sum + bad,
                            None => bad,
                        });
                    }
                    if let Some(state) = out.global_aux_state() {
                        states.push((index, state));
                    }
                    out.output
                }
                (None, None) => h,
            };
            x = x + y;
        }
        let forward = Forward {
            hidden: None,
            ce: None,
            aux,
            z,
            expert_load: load,
            global_aux: states,
            nonfinite_logits: nonfinite,
        };
        Ok((x, forward))
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
        self.forward_chunk_with(chunk, input, (ids, targets), &[])
    }

    /// [`forward_chunk`](Self::forward_chunk) continuing the global aux loss of the current
    /// global batch: `global[i]` is MoE layer `i`'s accumulated counts from the earlier
    /// micro-batches (`None`, or an empty slice, for the first).
    pub fn forward_chunk_with(
        &self,
        chunk: usize,
        input: Option<Tensor<3>>,
        (ids, targets): (&Tensor<2, Int>, &Tensor<2, Int>),
        global: &[Option<GlobalAuxState>],
    ) -> Result<Forward> {
        let (x, mut out) = self.hidden(chunk, input, ids, global)?;
        let last = chunk + 1 == self.chunks.len();
        match (&self.norm_f, self.lm_head()) {
            (Some(norm), Some(head)) if last => {
                out.ce = Some(lm_loss(norm, head, x, targets.clone(), &self.tp)?);
            }
            _ => out.hidden = Some(x),
        }
        Ok(out)
    }

    /// The aux-loss-free balancing update of every MoE layer with an expert bias (once per
    /// global batch, after the optimizer step, as Megatron does): `tokens_per_expert[i]` is MoE
    /// layer `i`'s tokens per expert on this rank over the global batch (summed over the
    /// tensor×data×context-parallel group inside). Collective over that group.
    pub fn update_expert_biases(&mut self, tokens_per_expert: &[Vec<f64>]) -> Result<()> {
        for (block, index) in self.blocks.iter_mut().zip(&self.moe_index) {
            let (Some(moe), Some(index)) = (block.moe.as_mut(), index) else {
                continue;
            };
            if !moe.router.config().expert_bias {
                continue;
            }
            let counts =
                tokens_per_expert
                    .get(*index)
                    .ok_or_else(|| MoeError::InvalidArgument {
                        name: "tokens_per_expert",
                        reason: format!("no counts for MoE layer {index}"),
                    })?;
            let device = moe.router.weight.val().device();
            let values: Vec<f32> = counts.iter().map(|&c| c as f32).collect();
            let n = values.len();
            let counts = host::upload_f32(values, [n], &device, "uploading expert-bias counts");
            moe.router.update_expert_bias(counts)?;
        }
        Ok(())
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
                d.param_roles(&mut out);
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
            if self.config.tie_embeddings {
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
        if !self.config.tie_embeddings || stages == 1 || (stage != 0 && stage + 1 != stages) {
            return Ok(());
        }
        const TAG: u16 = 32_767;
        let (weight, peer) = match (&self.embed, &self.head) {
            (Some(e), _) if stage == 0 => (e.weight.clone(), stages - 1),
            (_, Some(h)) => (h.weight.clone(), 0),
            _ => return Ok(()),
        };
        let [rows, cols] = weight.val().dims();
        let mine = match grads.get(weight.id) {
            Some(g) => host::read_f32(g, "reading a tied embedding's gradient for the other copy")?,
            None => vec![0.0; rows * cols],
        };
        let comm = pp.communicator()?;
        comm.post_send(mine, peer, TAG)?;
        // The peer's gradient is the transpose of this copy's layout.
        let theirs = comm.recv(rows * cols, peer, TAG)?;
        comm.flush_sends()?;
        let transposed: Vec<f32> = (0..rows * cols)
            .map(|i| theirs[(i % cols) * rows + i / cols])
            .collect();
        let device = weight.val().device();
        grads.accumulate(
            weight.id,
            host::upload_f32(
                transposed,
                [rows * cols],
                &device,
                "the other copy's gradient of a tied embedding",
            ),
        );
        Ok(())
    }
}

fn not_whole() -> MoeError {
    MoeError::InvalidArgument {
        name: "model",
        reason: "full tensors come from a one-rank model without parallelism".into(),
    }
}

/// A parameter's values, or its gradient from `grads` (zeros without one).
fn read<const D: usize>(
    p: &Param<Tensor<D>>,
    grads: Option<&GradientBuffer>,
) -> Result<TensorData> {
    let value = p.val();
    let shape = value.dims().to_vec();
    let values = match grads {
        Some(g) => {
            let n: usize = shape.iter().product();
            match g.get(p.id) {
                Some(g) => host::read_f32(g, "reading a gradient")?,
                None => vec![0.0; n],
            }
        }
        None => host::read_f32(value, "reading a parameter")?,
    };
    Ok(TensorData::new(values, shape))
}

/// The parts of an MoE layer before it is laid out: the routed experts are this rank's shard
/// only (its expert-parallel rank's experts, its expert-tensor-parallel rank's part of each),
/// drawn or read without the other ranks' parts.
struct MoeParts {
    router: Router,
    local: Experts,
    shared: Option<SharedExperts>,
}

impl MoeParts {
    fn lay_out(
        self,
        groups: &ProcessGroups,
        kind: crate::layer::DispatcherKind,
    ) -> Result<MoeLayer> {
        MoeLayer::from_local_experts(self.router, self.local, self.shared, groups, kind)
    }
}

/// The MoE layer of layer `name` from `init`'s weights, with this rank's shard of the experts
/// (for `groups`) only.
fn moe_layer(
    cfg: &MoeLmConfig,
    init: &Init,
    name: &str,
    stream: u64,
    groups: &ProcessGroups,
) -> Result<MoeParts> {
    let Some(moe) = &cfg.moe else {
        return Err(invalid("moe", "an MoE layer needs the moe config"));
    };
    let (h, e) = (cfg.hidden, moe.router.num_experts);
    let f = moe.experts.ffn_hidden;
    let f1 = moe.experts.activation.fc1_width(f);
    let mut router = Router::from_weight(
        moe.router.clone(),
        init.get(&format!("{name}.router"), stream, [e, h])?,
    )?;
    if moe.router.expert_bias
        && let Some(bias) = init.state(&format!("{name}.expert_bias"), [e])?
    {
        router = router.with_expert_bias(bias)?;
    }
    // This rank's experts (its expert-parallel rank's) and, of each, its expert-tensor-parallel
    // rank's columns of the first projection (of the gate and of the up half for SwiGLU) and
    // rows of the second: drawn or read alone.
    let (ep, etp) = (
        groups.group(GroupKind::Ep),
        groups.group(GroupKind::ExpertTp),
    );
    if !e.is_multiple_of(ep.size()) {
        return Err(invalid(
            "num_experts",
            format!(
                "{e} experts cannot be split over {} expert-parallel ranks",
                ep.size()
            ),
        ));
    }
    if !f.is_multiple_of(etp.size()) {
        return Err(invalid(
            "etp",
            format!(
                "ffn_hidden {f} cannot be split over {} expert-tensor-parallel ranks",
                etp.size()
            ),
        ));
    }
    let per = e / ep.size();
    let rows = ep.rank() * per..(ep.rank() + 1) * per;
    let k = f / etp.size();
    let cols = etp.rank() * k..(etp.rank() + 1) * k;
    let w1_name = format!("{name}.w1");
    let w1_block = |c: std::ops::Range<usize>| {
        init.block(&w1_name, stream + 1, [e, h, f1], [rows.clone(), 0..h, c])
    };
    let w1 = match (moe.experts.activation, etp.size()) {
        (_, 1) => w1_block(0..f1)?,
        (crate::experts::Activation::SwiGlu, _) => Tensor::cat(
            vec![
                w1_block(cols.clone())?,
                w1_block(f + cols.start..f + cols.end)?,
            ],
            2,
        ),
        _ => w1_block(cols.clone())?,
    };
    let w2 = init.block(
        &format!("{name}.w2"),
        stream + 2,
        [e, f, h],
        [rows, cols, 0..h],
    )?;
    let mut local_config = moe.experts.clone();
    local_config.num_experts = per;
    local_config.ffn_hidden = k;
    let experts = Experts::from_weights(local_config, w1, w2)?;
    let shared = match &moe.shared {
        Some(s) => {
            let fs = s.ffn_hidden;
            let gate = if s.gate {
                Some(init.get(&format!("{name}.shared.gate"), stream + 5, [1, h])?)
            } else {
                None
            };
            Some(SharedExperts::from_weights(
                s.clone(),
                init.get(
                    &format!("{name}.shared.w1"),
                    stream + 3,
                    [h, s.activation.fc1_width(fs)],
                )?,
                init.get(&format!("{name}.shared.w2"), stream + 4, [fs, h])?,
                gate,
            )?)
        }
        None => None,
    };
    Ok(MoeParts {
        router,
        local: experts,
        shared,
    })
}
