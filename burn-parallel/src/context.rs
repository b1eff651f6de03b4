//! Context parallelism: causal attention over a sequence split across the CP group.
//!
//! The sequence is cut into `2·cp` equal chunks and rank `r` holds chunks `r` and
//! `2·cp − 1 − r` ([`ContextLayout`]), so every rank has the same share of the causal work
//! (Megatron-Core / Transformer Engine's load balancing). Two ways to attend:
//!
//! - [`CpAttention::Ring`]: key/value blocks travel around the CP group (`cp − 1` ring
//!   shifts); each step attends the local queries to the visiting block and keeps its
//!   log-sum-exp, and the partial results are merged with the online-softmax rule
//!   `out = Σⱼ exp(lseⱼ − lse)·outⱼ`, `lse = log Σⱼ exp(lseⱼ)`. The backward pass runs the ring
//!   in reverse: each shift's gradient is the opposite shift, carrying the key/value gradients
//!   back to their owners. Scores per step are `(S/cp)²` per head.
//! - [`CpAttention::AllGather`]: keys and values are all-gathered once (backward:
//!   reduce-scatter); scores are `(S/cp)·S` per head. Simpler, for short contexts.
//!
//! Masking uses global token positions, so RoPE and the loss must use
//! [`ContextLayout::positions`] too.

use burn::tensor::{Bool, FloatDType, Tensor, TensorData};

use crate::error::{ParallelError, Result};
use crate::group::Group;
use crate::mappings;
use crate::ops::GatherGrad;

/// How a context-parallel rank sees the rest of the sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpAttention {
    /// Ring attention: key/value blocks passed around with send/recv (all-to-all-v pairs).
    Ring,
    /// All-gather the keys and values.
    AllGather,
}

/// Which global positions each CP rank holds: chunks `r` and `2·cp − 1 − r` of `2·cp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContextLayout {
    seq_len: usize,
    cp: usize,
}

impl ContextLayout {
    /// The layout of a `seq_len` sequence over `cp` ranks; `seq_len` must split into `2·cp`
    /// equal chunks.
    pub fn new(seq_len: usize, cp: usize) -> Result<Self> {
        if cp == 0 {
            return Err(ParallelError::InvalidArgument {
                name: "cp",
                reason: "must be at least 1".into(),
            });
        }
        if seq_len == 0 || !seq_len.is_multiple_of(2 * cp) {
            return Err(ParallelError::InvalidArgument {
                name: "seq_len",
                reason: format!(
                    "{seq_len} does not split into 2·cp = {} equal chunks for load-balanced \
                     context parallelism",
                    2 * cp
                ),
            });
        }
        Ok(Self { seq_len, cp })
    }

    /// Tokens per rank.
    pub fn local_len(&self) -> usize {
        self.seq_len / self.cp
    }

    fn chunk(&self) -> usize {
        self.seq_len / (2 * self.cp)
    }

    /// Global positions of `rank`'s tokens, in local order.
    pub fn positions(&self, rank: usize) -> Vec<usize> {
        let c = self.chunk();
        let tail = 2 * self.cp - 1 - rank;
        (rank * c..(rank + 1) * c)
            .chain(tail * c..(tail + 1) * c)
            .collect()
    }

    /// `rank`'s share of a full-sequence tensor (`dim` is the sequence).
    pub fn shard<const D: usize>(&self, x: Tensor<D>, dim: usize, rank: usize) -> Tensor<D> {
        let c = self.chunk();
        let tail = 2 * self.cp - 1 - rank;
        Tensor::cat(
            vec![
                x.clone().narrow(dim, rank * c, c),
                x.narrow(dim, tail * c, c),
            ],
            dim,
        )
    }
}

/// Scores below this are masked: finite, so a query row that sees nothing of a ring step's
/// block gets a finite log-sum-exp that the merge weighs by `exp(−1e30) = 0`.
const MASKED: f32 = -1e30;

/// `mask[i][j]`: key position `j` is after query position `i`.
fn causal_mask(
    queries: &[usize],
    keys: &[usize],
    device: &burn::tensor::Device,
) -> Tensor<2, Bool> {
    let data: Vec<bool> = queries
        .iter()
        .flat_map(|&q| keys.iter().map(move |&k| k > q))
        .collect();
    crate::transfers::upload("context parallel: a causal mask block", data.len() as u64);
    Tensor::from_data(TensorData::new(data, [queries.len(), keys.len()]), device)
}

/// Attention of `q` to one key/value block: the output and the log-sum-exp of each query row.
fn attend(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    mask: Tensor<2, Bool>,
) -> (Tensor<4>, Tensor<4>) {
    let d = q.dims()[3];
    let scores = q.matmul(k.swap_dims(2, 3)) / (d as f64).sqrt();
    // The softmax and its log-sum-exp in f32 whatever the inputs' precision; the output in
    // the values' precision.
    let scores = scores
        .cast(FloatDType::F32)
        .mask_fill(mask.unsqueeze::<4>(), MASKED);
    let max = scores.clone().max_dim(3);
    let e = (scores - max.clone()).exp();
    let sum = e.clone().sum_dim(3);
    let out = (e / sum.clone()).cast(v.dtype()).matmul(v);
    (out, max + sum.log())
}

/// Rows of `x` go to the next rank of the group, the previous rank's arrive (differentiable:
/// the backward sends the gradient back).
fn ring_shift<const D: usize>(x: Tensor<D>, group: &Group) -> Result<Tensor<D>> {
    let (n, r) = (group.size(), group.rank());
    let rows = x.dims()[0];
    let mut send = vec![0; n];
    let mut recv = vec![0; n];
    send[(r + 1) % n] = rows;
    recv[(r + n - 1) % n] = rows;
    mappings::all_to_all_v(x, group, &send, &recv)
}

/// Causal attention of this rank's queries (`[B, heads, S/cp, d]`, positions from `layout`) to
/// the whole sequence, whose keys and values (`[B, heads, S/cp, d]`, same positions) are spread
/// over `cp`. Returns `[B, heads, S/cp, d]`. Collective over `cp`.
pub fn context_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    layout: &ContextLayout,
    cp: &Group,
    kind: CpAttention,
) -> Result<Tensor<4>> {
    let [b, h, len, d] = q.dims();
    if layout.cp != cp.size() || len != layout.local_len() {
        return Err(ParallelError::InvalidArgument {
            name: "q",
            reason: format!(
                "holds {len} positions on a CP group of {}; the layout expects {} on {}",
                cp.size(),
                layout.local_len(),
                layout.cp
            ),
        });
    }
    for (name, t) in [("k", &k), ("v", &v)] {
        if t.dims() != [b, h, len, d] {
            return Err(ParallelError::InvalidArgument {
                name,
                reason: format!("has shape {:?}, q has {:?}", t.dims(), [b, h, len, d]),
            });
        }
    }
    let device = q.device();
    let rank = cp.rank();
    let mine = layout.positions(rank);
    match kind {
        CpAttention::AllGather => {
            let keys: Vec<usize> = (0..cp.size()).flat_map(|r| layout.positions(r)).collect();
            let k = mappings::gather_dim(k, cp, 2, GatherGrad::ReduceScatter)?;
            let v = mappings::gather_dim(v, cp, 2, GatherGrad::ReduceScatter)?;
            let (out, _) = attend(q, k, v, causal_mask(&mine, &keys, &device));
            Ok(out)
        }
        CpAttention::Ring => {
            let n = cp.size();
            // Keys and values travel together: [2, B, heads, S/cp, d].
            let mut kv = Tensor::stack::<5>(vec![k, v], 0);
            let (mut outs, mut lses) = (Vec::with_capacity(n), Vec::with_capacity(n));
            for step in 0..n {
                if step > 0 {
                    kv = ring_shift(kv, cp)?;
                }
                let owner = (rank + n - step) % n;
                let k = kv.clone().narrow(0, 0, 1).squeeze_dim::<4>(0);
                let v = kv.clone().narrow(0, 1, 1).squeeze_dim::<4>(0);
                let mask = causal_mask(&mine, &layout.positions(owner), &device);
                let (out, lse) = attend(q.clone(), k, v, mask);
                outs.push(out);
                lses.push(lse);
            }
            // Online-softmax merge of the partial results, in f32.
            let dtype = q.dtype();
            let all = Tensor::cat(lses.clone(), 3);
            let max = all.clone().max_dim(3);
            let lse = max.clone() + (all - max).exp().sum_dim(3).log();
            let mut out: Option<Tensor<4>> = None;
            for (o, l) in outs.into_iter().zip(lses) {
                let part = o.cast(FloatDType::F32) * (l - lse.clone()).exp();
                out = Some(match out {
                    Some(acc) => acc + part,
                    None => part,
                });
            }
            out.map(|o| o.cast(dtype))
                .ok_or_else(|| ParallelError::InvalidArgument {
                    name: "cp",
                    reason: "the CP group is empty".into(),
                })
        }
    }
}

/// Plain causal attention over a whole sequence `[B, heads, S, d]` (the one-rank reference of
/// [`context_attention`]; the same masking and arithmetic).
pub fn full_causal_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    let s = q.dims()[2];
    let positions: Vec<usize> = (0..s).collect();
    let mask = causal_mask(&positions, &positions, &q.device());
    attend(q, k, v, mask).0
}

#[cfg(test)]
mod tests {
    use burn::tensor::Device;

    use super::*;

    #[test]
    fn ranks_hold_mirrored_chunks_and_bad_lengths_are_rejected() {
        let l = ContextLayout::new(8, 2).unwrap();
        assert_eq!(l.positions(0), vec![0, 1, 6, 7]);
        assert_eq!(l.positions(1), vec![2, 3, 4, 5]);
        assert_eq!(l.local_len(), 4);
        let x = Tensor::<1>::from_data(
            TensorData::new((0..8).map(|i| i as f32).collect(), [8]),
            &Device::flex(),
        );
        let got = l
            .shard(x, 0, 1)
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap();
        assert_eq!(got, vec![2.0, 3.0, 4.0, 5.0]);
        let e = ContextLayout::new(250, 2).unwrap_err().to_string();
        assert!(e.contains("seq_len") && e.contains("250"), "{e}");
        assert!(
            ContextLayout::new(8, 0)
                .unwrap_err()
                .to_string()
                .contains("cp")
        );
    }

    #[test]
    fn one_rank_ring_and_gather_equal_plain_causal_attention() {
        let d = Device::flex();
        let t = |seed: f32| {
            let v: Vec<f32> = (0..2 * 12 * 4)
                .map(|i| (i as f32 * 0.31 + seed).sin())
                .collect();
            Tensor::<4>::from_data(TensorData::new(v, [1, 2, 12, 4]), &d)
        };
        let (q, k, v) = (t(0.0), t(1.0), t(2.0));
        let want = crate::layers::causal_attention(q.clone(), k.clone(), v.clone())
            .reshape([12, 1, 2, 4])
            .permute([1, 2, 0, 3]);
        let want = want
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap();
        let layout = ContextLayout::new(12, 1).unwrap();
        let single = Group::single();
        for kind in [CpAttention::Ring, CpAttention::AllGather] {
            let got = context_attention(q.clone(), k.clone(), v.clone(), &layout, &single, kind)
                .unwrap()
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .unwrap();
            let err = crate::launch::rel_error(&got, &want);
            assert!(err < 1e-6, "{kind:?}: {err}");
        }
        let full = full_causal_attention(q.clone(), k.clone(), v.clone())
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap();
        assert!(crate::launch::rel_error(&full, &want) < 1e-6);
        let e = context_attention(q, k.narrow(2, 0, 6), v, &layout, &single, CpAttention::Ring)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`k`"), "{e}");
    }
}
