//! Tensor- and sequence-parallel layers (Megatron-Core's `tensor_parallel/layers.py`).
//!
//! Activations are sequence-first, `[S, B, H]`. With sequence parallelism, activations outside
//! the tensor-parallel regions are split along `S` over the TP group; column-parallel layers
//! all-gather it on the way in (reduce-scatter backward) and row-parallel layers reduce-scatter
//! it on the way out. Parameters whose gradients are partial under sequence parallelism (norm
//! weights, row-parallel biases) report [`ParamRole::sequence_parallel_grad`], and
//! [`crate::optim::DistributedAdamW`] all-reduces them over TP.
//!
//! Every layer is built from the full (unsplit) weights with `from_full`, so a TP run starts
//! from exactly the weights of a single-rank run.

use burn::module::{Module, Param, ParamId};
use burn::tensor::{FloatDType, Int, Tensor, activation};

use crate::error::{ParallelError, Result};
use crate::group::Group;
use crate::mappings;
use crate::ops::GatherGrad;

/// How a parameter is laid out across tensor-parallel ranks and reduced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamRole {
    /// Each TP rank holds a different shard (column- or row-parallel weights). Otherwise the
    /// parameter is replicated over TP and counted once in the gradient norm.
    pub tp_split: bool,
    /// The gradient is partial over TP ranks (sequence parallelism) and is all-reduced over TP.
    pub sequence_parallel_grad: bool,
    /// Weight decay applies (Megatron's default: not for biases and 1-D parameters).
    pub weight_decay: bool,
    /// An expert parameter: sharded over the expert-data-parallel group by the optimizer.
    pub expert: bool,
    /// A copy of a parameter held on another pipeline stage (the output layer tied to the
    /// embedding): its gradient was summed with the other copy's before the step, and it is
    /// left out of the gradient norm (the other copy counts).
    pub tied_copy: bool,
}

impl ParamRole {
    /// A parameter replicated over TP (every rank holds all of it), not an expert's, with or
    /// without weight decay.
    pub const fn replicated(weight_decay: bool) -> Self {
        Self {
            tp_split: false,
            sequence_parallel_grad: false,
            weight_decay,
            expert: false,
            tied_copy: false,
        }
    }
}

/// Layers report the role of each of their parameters.
pub trait ParallelParams {
    /// Appends `(parameter id, role)` for every parameter.
    fn param_roles(&self, out: &mut Vec<(ParamId, ParamRole)>);
}

fn chunk(name: &'static str, n: usize, parts: usize) -> Result<usize> {
    if n == 0 || !n.is_multiple_of(parts) {
        return Err(ParallelError::InvalidArgument {
            name,
            reason: format!("size {n} is not a positive multiple of the TP size {parts}"),
        });
    }
    Ok(n / parts)
}

fn param<const D: usize>(t: Tensor<D>) -> Param<Tensor<D>> {
    Param::from_tensor(t)
}

/// `x [.., in] · w [in, out]`, in the weight's precision (the input is cast to it; a bias of
/// another precision is cast to the product's).
fn linear<const D: usize>(x: Tensor<D>, w: Tensor<2>, b: Option<Tensor<1>>) -> Tensor<D> {
    let y = x.cast(w.dtype()).matmul(w.unsqueeze::<D>());
    match b {
        Some(b) => {
            let dtype = y.dtype();
            y + b.cast(dtype).unsqueeze::<D>()
        }
        None => y,
    }
}

/// `Y = X·A + b` with `A` split by columns over TP.
#[derive(Module, Debug)]
pub struct ColumnParallelLinear {
    /// Local weight `[in, out / tp]`.
    pub weight: Param<Tensor<2>>,
    /// Local bias `[out / tp]`.
    pub bias: Option<Param<Tensor<1>>>,
    #[module(skip)]
    tp: Group,
    #[module(skip)]
    gather_output: bool,
    #[module(skip)]
    sequence_parallel: bool,
}

impl ColumnParallelLinear {
    /// This rank's column chunk of a full weight `[in, out]` (and bias `[out]`).
    pub fn from_full(
        weight: Tensor<2>,
        bias: Option<Tensor<1>>,
        tp: Group,
        gather_output: bool,
        sequence_parallel: bool,
    ) -> Result<Self> {
        let [rows, cols] = weight.dims();
        let k = chunk("weight", cols, tp.size())?;
        let r = tp.rank();
        let weight = weight.slice([0..rows, r * k..(r + 1) * k]);
        let bias = bias.map(|b| b.narrow(0, r * k, k));
        Ok(Self::from_local(
            weight,
            bias,
            tp,
            gather_output,
            sequence_parallel,
        ))
    }

    /// A layer from local shards `[in, out / tp]` (for fused layouts such as QKV).
    pub fn from_local(
        weight: Tensor<2>,
        bias: Option<Tensor<1>>,
        tp: Group,
        gather_output: bool,
        sequence_parallel: bool,
    ) -> Self {
        Self {
            weight: param(weight),
            bias: bias.map(param),
            tp,
            gather_output,
            sequence_parallel,
        }
    }

    /// `[S(/tp with SP), B, in]` → `[S, B, out / tp]` (or `out` with `gather_output`).
    pub fn forward(&self, x: Tensor<3>) -> Result<Tensor<3>> {
        let x = column_input(x, &self.tp, self.sequence_parallel)?;
        let y = linear(x, self.weight.val(), self.bias.as_ref().map(|b| b.val()));
        if self.gather_output {
            mappings::gather_from_region(y, &self.tp)
        } else {
            Ok(y)
        }
    }
}

impl ParallelParams for ColumnParallelLinear {
    fn param_roles(&self, out: &mut Vec<(ParamId, ParamRole)>) {
        let split = self.tp.size() > 1;
        out.push((self.weight.id, role(split, false, true)));
        if let Some(b) = &self.bias {
            out.push((b.id, role(split, false, false)));
        }
    }
}

/// The input of a column-parallel product: gathered from the sequence-parallel shards, or
/// copied to the TP region.
fn column_input(x: Tensor<3>, tp: &Group, sequence_parallel: bool) -> Result<Tensor<3>> {
    if sequence_parallel {
        mappings::gather_from_sequence_region(x, tp, GatherGrad::ReduceScatter)
    } else {
        mappings::copy_to_region(x, tp)
    }
}

fn role(tp_split: bool, sequence_parallel_grad: bool, weight_decay: bool) -> ParamRole {
    ParamRole {
        tp_split,
        sequence_parallel_grad,
        weight_decay,
        expert: false,
        tied_copy: false,
    }
}

/// `Y = X·A + b` with `A` split by rows over TP; the input is already split by columns.
#[derive(Module, Debug)]
pub struct RowParallelLinear {
    /// Local weight `[in / tp, out]`.
    pub weight: Param<Tensor<2>>,
    /// Bias `[out]`, replicated, added after the reduction.
    pub bias: Option<Param<Tensor<1>>>,
    #[module(skip)]
    tp: Group,
    #[module(skip)]
    sequence_parallel: bool,
}

impl RowParallelLinear {
    /// This rank's row chunk of a full weight `[in, out]`.
    pub fn from_full(
        weight: Tensor<2>,
        bias: Option<Tensor<1>>,
        tp: Group,
        sequence_parallel: bool,
    ) -> Result<Self> {
        let [rows, cols] = weight.dims();
        let k = chunk("weight", rows, tp.size())?;
        let r = tp.rank();
        Ok(Self {
            weight: param(weight.slice([r * k..(r + 1) * k, 0..cols])),
            bias: bias.map(param),
            tp,
            sequence_parallel,
        })
    }

    /// `[S, B, in / tp]` → `[S(/tp with SP), B, out]`: all-reduce, or reduce-scatter with SP.
    pub fn forward(&self, x: Tensor<3>) -> Result<Tensor<3>> {
        let y = linear(x, self.weight.val(), None);
        let y = if self.sequence_parallel {
            mappings::reduce_scatter_to_sequence_region(y, &self.tp)?
        } else {
            mappings::reduce_from_region(y, &self.tp)?
        };
        Ok(match &self.bias {
            Some(b) => {
                let dtype = y.dtype();
                y + b.val().cast(dtype).unsqueeze::<3>()
            }
            None => y,
        })
    }
}

impl ParallelParams for RowParallelLinear {
    fn param_roles(&self, out: &mut Vec<(ParamId, ParamRole)>) {
        out.push((self.weight.id, role(self.tp.size() > 1, false, true)));
        if let Some(b) = &self.bias {
            out.push((b.id, role(false, self.sequence_parallel, false)));
        }
    }
}

/// Embedding whose vocabulary is split over TP; each rank looks up its rows and the partial
/// results are all-reduced (reduce-scattered along the sequence with SP).
#[derive(Module, Debug)]
pub struct VocabParallelEmbedding {
    /// Local table `[vocab / tp, H]`.
    pub weight: Param<Tensor<2>>,
    #[module(skip)]
    tp: Group,
    #[module(skip)]
    sequence_parallel: bool,
    #[module(skip)]
    vocab_start: usize,
}

impl VocabParallelEmbedding {
    /// This rank's rows of a full table `[vocab, H]`.
    pub fn from_full(table: Tensor<2>, tp: Group, sequence_parallel: bool) -> Result<Self> {
        let [vocab, hidden] = table.dims();
        let k = chunk("vocab", vocab, tp.size())?;
        let start = tp.rank() * k;
        Ok(Self {
            weight: param(table.slice([start..start + k, 0..hidden])),
            tp,
            sequence_parallel,
            vocab_start: start,
        })
    }

    /// Token ids `[S, B]` → `[S(/tp with SP), B, H]`.
    pub fn forward(&self, ids: Tensor<2, Int>) -> Result<Tensor<3>> {
        let [local_vocab, _] = self.weight.dims();
        let local = ids.sub_scalar(self.vocab_start as i64);
        let outside = local
            .clone()
            .lower_elem(0)
            .bool_or(local.clone().greater_equal_elem(local_vocab as i64));
        let local = local.mask_fill(outside.clone(), 0);
        let emb = burn::tensor::module::embedding(self.weight.val(), local);
        let emb = emb.mask_fill(outside.unsqueeze_dim::<3>(2), 0.0);
        if self.sequence_parallel {
            mappings::reduce_scatter_to_sequence_region(emb, &self.tp)
        } else {
            mappings::reduce_from_region(emb, &self.tp)
        }
    }
}

impl VocabParallelEmbedding {
    /// The role of the embedding weight (`split`: vocabulary split over TP ranks).
    pub fn role(split: bool) -> ParamRole {
        role(split, false, true)
    }
}

impl ParallelParams for VocabParallelEmbedding {
    fn param_roles(&self, out: &mut Vec<(ParamId, ParamRole)>) {
        out.push((self.weight.id, Self::role(self.tp.size() > 1)));
    }
}

/// The output layer of a language model: its own column-parallel weight `[H, V / tp]`, or
/// the transposed vocab-parallel embedding (tied weights, Megatron's
/// `share_embeddings_and_output_weights`).
#[derive(Debug, Clone, Copy)]
pub enum LmHead<'a> {
    /// A separate weight.
    Linear(&'a ColumnParallelLinear),
    /// The embedding's weight, transposed.
    Tied(&'a VocabParallelEmbedding),
}

impl LmHead<'_> {
    /// This rank's vocabulary shard of the logits of `x [S, B, H]`: `[S·tp (SP) or S, B, V / tp]`.
    pub fn logits(&self, x: Tensor<3>) -> Result<Tensor<3>> {
        match self {
            Self::Linear(head) => head.forward(x),
            Self::Tied(embed) => {
                let x = column_input(x, &embed.tp, embed.sequence_parallel)?;
                Ok(linear(x, embed.weight.val().swap_dims(0, 1), None))
            }
        }
    }
}

/// Mean next-token cross-entropy of hidden states `x [S, B, H]` (sequence-parallel shards
/// under TP) through the final `norm` and the LM `head`, against `targets [S, B]`.
pub fn lm_loss(
    norm: &RmsNorm,
    head: LmHead,
    x: Tensor<3>,
    targets: Tensor<2, Int>,
    tp: &Group,
) -> Result<Tensor<1>> {
    let logits = head.logits(norm.forward(x))?;
    let [s, b, v] = logits.dims();
    Ok(
        vocab_parallel_cross_entropy(logits.reshape([s * b, v]), targets.reshape([s * b]), tp)?
            .mean(),
    )
}

/// Cross-entropy over logits whose vocabulary is split over TP (`logits [N, vocab / tp]`, the
/// local columns starting at `tp.rank() · vocab / tp`); returns the per-token loss `[N]`,
/// identical on every TP rank, without gathering the logits. Computed in f32 whatever the
/// logits' precision.
pub fn vocab_parallel_cross_entropy(
    logits: Tensor<2>,
    targets: Tensor<1, Int>,
    tp: &Group,
) -> Result<Tensor<1>> {
    let [n, local_vocab] = logits.dims();
    if targets.dims()[0] != n {
        return Err(ParallelError::InvalidArgument {
            name: "targets",
            reason: format!("{} targets for {n} rows of logits", targets.dims()[0]),
        });
    }
    let logits = logits.cast(FloatDType::F32);
    let max = mappings::all_reduce(
        logits.clone().detach().max_dim(1),
        tp,
        crate::comm::ReduceOp::Max,
    )?;
    let shifted = logits - max;
    let sum_exp = mappings::reduce_from_region(shifted.clone().exp().sum_dim(1), tp)?;
    let local = targets.sub_scalar((tp.rank() * local_vocab) as i64);
    let outside = local
        .clone()
        .lower_elem(0)
        .bool_or(local.clone().greater_equal_elem(local_vocab as i64));
    let local = local.mask_fill(outside.clone(), 0).unsqueeze_dim::<2>(1);
    let picked = shifted
        .gather(1, local)
        .mask_fill(outside.unsqueeze_dim::<2>(1), 0.0);
    let target_logit = mappings::reduce_from_region(picked, tp)?;
    Ok((sum_exp.log() - target_logit).squeeze_dim::<1>(1))
}

/// RMSNorm over the last dimension. Under sequence parallelism its input is a sequence chunk,
/// so its weight gradient is partial and reduced over TP.
#[derive(Module, Debug)]
pub struct RmsNorm {
    /// Scale `[H]`.
    pub weight: Param<Tensor<1>>,
    #[module(skip)]
    eps: f64,
    #[module(skip)]
    sequence_parallel: bool,
}

impl RmsNorm {
    /// A norm with the given scale.
    pub fn from_full(weight: Tensor<1>, eps: f64, sequence_parallel: bool) -> Self {
        Self {
            weight: param(weight),
            eps,
            sequence_parallel,
        }
    }

    /// `x · rsqrt(mean(x²) + eps) · w`, computed in f32 and returned in `x`'s precision.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dtype = x.dtype();
        let x = x.cast(FloatDType::F32);
        let rms = (x.clone().square().mean_dim(D - 1) + self.eps).sqrt();
        (x / rms * self.weight.val().cast(FloatDType::F32).unsqueeze::<D>()).cast(dtype)
    }
}

impl ParallelParams for RmsNorm {
    fn param_roles(&self, out: &mut Vec<(ParamId, ParamRole)>) {
        out.push((self.weight.id, role(false, self.sequence_parallel, false)));
    }
}

/// Causal scaled-dot-product attention of `q`, `k`, `v` `[B, heads, S, d]` (one key/value head
/// per query head), returned sequence-first `[S, B, heads·d]`.
pub fn causal_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<3> {
    let [b, h, s, d] = q.dims();
    let scores = q.matmul(k.swap_dims(2, 3)) / (d as f64).sqrt();
    // True strictly above the diagonal: position i attends to j ≤ i.
    let mask = Tensor::<2, burn::tensor::Bool>::tril_mask([s, s], 0, &scores.device());
    // The softmax in f32 whatever the inputs' precision.
    let scores = scores
        .cast(FloatDType::F32)
        .mask_fill(mask.unsqueeze::<4>(), f32::NEG_INFINITY);
    let ctx = activation::softmax(scores, 3).cast(v.dtype()).matmul(v);
    ctx.permute([2, 0, 1, 3]).reshape([s, b, h * d])
}

/// Causal self-attention with heads split over TP: fused QKV column-parallel projection, output
/// row-parallel projection.
#[derive(Module, Debug)]
pub struct ParallelAttention {
    /// `[H, 3 · H / tp]`: this rank's heads of Q, K and V.
    pub qkv: ColumnParallelLinear,
    /// `[H / tp, H]`.
    pub out: RowParallelLinear,
    #[module(skip)]
    local_heads: usize,
    #[module(skip)]
    head_dim: usize,
}

impl ParallelAttention {
    /// From the full fused projection `wqkv [H, 3H]` (columns: all Q heads, all K heads, all V
    /// heads), the output projection `wo [H, H]` and `heads` heads.
    pub fn from_full(
        wqkv: Tensor<2>,
        wo: Tensor<2>,
        heads: usize,
        tp: Group,
        sequence_parallel: bool,
    ) -> Result<Self> {
        let [hidden, cols] = wqkv.dims();
        if cols != 3 * hidden {
            return Err(ParallelError::InvalidArgument {
                name: "wqkv",
                reason: format!("has {cols} columns, expected 3 × {hidden}"),
            });
        }
        let local_heads = chunk("heads", heads, tp.size())?;
        if !hidden.is_multiple_of(heads) {
            return Err(ParallelError::InvalidArgument {
                name: "heads",
                reason: format!("hidden size {hidden} is not divisible by {heads} heads"),
            });
        }
        let head_dim = hidden / heads;
        let k = local_heads * head_dim;
        let r = tp.rank();
        let part = |i: usize| {
            wqkv.clone()
                .slice([0..hidden, i * hidden + r * k..i * hidden + (r + 1) * k])
        };
        let qkv = Tensor::cat(vec![part(0), part(1), part(2)], 1);
        Ok(Self {
            qkv: ColumnParallelLinear::from_local(qkv, None, tp.clone(), false, sequence_parallel),
            out: RowParallelLinear::from_full(wo, None, tp, sequence_parallel)?,
            local_heads,
            head_dim,
        })
    }

    /// `[S(/tp with SP), B, H]` → same shape.
    pub fn forward(&self, x: Tensor<3>) -> Result<Tensor<3>> {
        let qkv = self.qkv.forward(x)?;
        let [s, b, _] = qkv.dims();
        let (h, d) = (self.local_heads, self.head_dim);
        // [S, B, 3, h, d] → three [B, h, S, d].
        let qkv = qkv.reshape([s, b, 3, h, d]).permute([2, 1, 3, 0, 4]);
        let take = |i: usize| {
            qkv.clone()
                .slice([i..i + 1, 0..b, 0..h, 0..s, 0..d])
                .reshape([b, h, s, d])
        };
        let (q, k, v) = (take(0), take(1), take(2));
        self.out.forward(causal_attention(q, k, v))
    }
}

impl ParallelParams for ParallelAttention {
    fn param_roles(&self, out: &mut Vec<(ParamId, ParamRole)>) {
        self.qkv.param_roles(out);
        self.out.param_roles(out);
    }
}

/// GELU MLP: column-parallel up projection, row-parallel down projection.
#[derive(Module, Debug)]
pub struct ParallelMlp {
    /// `[H, F / tp]`.
    pub fc1: ColumnParallelLinear,
    /// `[F / tp, H]`.
    pub fc2: RowParallelLinear,
}

impl ParallelMlp {
    /// From full weights `w1 [H, F]`, `b1 [F]`, `w2 [F, H]`, `b2 [H]`.
    pub fn from_full(
        (w1, b1): (Tensor<2>, Tensor<1>),
        (w2, b2): (Tensor<2>, Tensor<1>),
        tp: Group,
        sequence_parallel: bool,
    ) -> Result<Self> {
        Ok(Self {
            fc1: ColumnParallelLinear::from_full(
                w1,
                Some(b1),
                tp.clone(),
                false,
                sequence_parallel,
            )?,
            fc2: RowParallelLinear::from_full(w2, Some(b2), tp, sequence_parallel)?,
        })
    }

    /// `[S(/tp with SP), B, H]` → same shape.
    pub fn forward(&self, x: Tensor<3>) -> Result<Tensor<3>> {
        self.fc2.forward(activation::gelu(self.fc1.forward(x)?))
    }
}

impl ParallelParams for ParallelMlp {
    fn param_roles(&self, out: &mut Vec<(ParamId, ParamRole)>) {
        self.fc1.param_roles(out);
        self.fc2.param_roles(out);
    }
}
