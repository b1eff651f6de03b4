//! Routing decisions: top-k (plain or group-limited), capacity masks, Sinkhorn.
//!
//! Decisions are discrete and carry no gradient: every function here works on detached
//! tensors and returns 0/1 float masks `[T, E]`.

use burn::tensor::{IndexingUpdateOp, Int, Tensor};

use crate::error::Result;
use crate::host;
use crate::router::config::DropPolicy;

/// A 0/1 mask `[T, E]` with ones at `indices` (`[T, k]`).
pub fn mask_from_indices(indices: Tensor<2, Int>, num_experts: usize) -> Tensor<2> {
    let [t, k] = indices.dims();
    let device = indices.device();
    Tensor::<2>::zeros([t, num_experts], &device).scatter(
        1,
        indices,
        Tensor::ones([t, k], &device),
        IndexingUpdateOp::Add,
    )
}

/// Indices of the `k` largest values along `dim`, largest first, for any `k` up to the size of
/// `dim` (Burn's `argtopk` asserts `k < size`; selecting all of them is dense routing, or a
/// capacity that keeps every token).
pub(crate) fn argtopk<const D: usize>(x: Tensor<D>, k: usize, dim: usize) -> Tensor<D, Int> {
    if k >= x.dims()[dim] {
        x.argsort_descending(dim)
    } else {
        x.argtopk(k, dim)
    }
}

/// The `k` largest values along `dim`, largest first, for any `k` up to the size of `dim`.
pub(crate) fn topk<const D: usize>(x: Tensor<D>, k: usize, dim: usize) -> Tensor<D> {
    if k >= x.dims()[dim] {
        x.sort_descending(dim)
    } else {
        x.topk(k, dim)
    }
}

/// [`argtopk`] along dim 1 on a row-major copy of `x`. Burn 0.22.1's CubeCL `argtopk`
/// ignores the strides of a non-contiguous input (a transposed view gives wrong indices on
/// wgpu); the reshape through one dimension makes the copy on every backend.
pub(crate) fn argtopk_rows(x: Tensor<2>, k: usize) -> Tensor<2, Int> {
    let [a, b] = x.dims();
    argtopk(x.reshape([a * b]).reshape([a, b]), k, 1)
}

/// Indices `[T, k]` of the `k` largest scores per token, optionally restricted to the best
/// `group_topk` of `num_groups` expert groups (a group scores the sum of its top `k/group_topk`).
pub fn topk_indices(scores: Tensor<2>, k: usize, groups: Option<(usize, usize)>) -> Tensor<2, Int> {
    let scores = scores.detach();
    match groups {
        None => argtopk(scores, k, 1),
        Some((num_groups, group_topk)) => {
            let [t, e] = scores.dims();
            let per_group = e / num_groups;
            let device = scores.device();
            let group_scores: Tensor<2> = topk(
                scores.clone().reshape([t, num_groups, per_group]),
                k / group_topk,
                2,
            )
            .sum_dim(2)
            .reshape([t, num_groups]);
            let group_idx = argtopk(group_scores, group_topk, 1);
            let group_mask = Tensor::<2>::zeros([t, num_groups], &device).scatter(
                1,
                group_idx,
                Tensor::ones([t, group_topk], &device),
                IndexingUpdateOp::Add,
            );
            let expert_mask: Tensor<2> = group_mask
                .reshape([t, num_groups, 1])
                .expand([t, num_groups, per_group])
                .reshape([t, e]);
            argtopk(
                scores.mask_fill(expert_mask.equal_elem(0.0), f32::NEG_INFINITY),
                k,
                1,
            )
        }
    }
}

/// The capacity mask `[T, E]` of Megatron's `apply_router_token_dropping`: for each expert,
/// which token slots it keeps. `probs` and `map` are the dense routing probabilities and the
/// 0/1 routing map.
pub fn capacity_mask(
    probs: Tensor<2>,
    map: Tensor<2>,
    capacity: usize,
    policy: DropPolicy,
    pad_to_capacity: bool,
) -> Tensor<2> {
    let [t, e] = map.dims();
    let device = map.device();
    if capacity > t {
        return Tensor::ones([t, e], &device);
    }
    match policy {
        DropPolicy::Probs => {
            // [E, T]: per expert, the `capacity` highest probabilities.
            let idx = argtopk_rows(probs.detach().transpose(), capacity);
            Tensor::<2>::zeros([e, t], &device)
                .scatter(
                    1,
                    idx,
                    Tensor::ones([e, capacity], &device),
                    IndexingUpdateOp::Add,
                )
                .transpose()
        }
        DropPolicy::Position => {
            let cap = capacity as f32;
            let rank = map.clone().cumsum(0);
            let kept = map.clone() * rank.lower_equal_elem(cap).float();
            if !pad_to_capacity {
                return kept;
            }
            // Fill the remaining slots with the first unrouted tokens.
            let unrouted = map.clone().neg().add_scalar(1.0);
            let routed_count = map.sum_dim(0); // [1, E]
            let free = routed_count.neg().add_scalar(cap).clamp_min(0.0); // [1, E]
            let unrouted_rank = unrouted.clone().cumsum(0);
            let fill = unrouted * unrouted_rank.lower_equal(free.expand([t, e])).float();
            kept + fill
        }
    }
}

/// Sinkhorn normalisation of `exp(logits)` on the host, as Megatron's `sinkhorn` (tolerance
/// 1e-4), followed by top-k. Returns indices `[T, k]`.
///
/// Synchronises with the device once (the loop's convergence test needs host values anyway).
pub fn sinkhorn_indices(logits: Tensor<2>, k: usize) -> Result<Tensor<2, Int>> {
    let [t, e] = logits.dims();
    let device = logits.device();
    let values = host::read_f32(logits.detach(), "reading logits for Sinkhorn routing")?;
    let cost: Vec<f32> = values.iter().map(|v| v.exp()).collect();
    let eps = 1e-8f32;
    let mut d0 = vec![1.0f32; t];
    let mut d1 = vec![1.0f32; e];
    let mut d1_old = d1.clone();
    let mut error = 1e9f32;
    let mut iterations = 0usize;
    while error > 1e-4 && iterations < 10_000 {
        for (i, d) in d0.iter_mut().enumerate() {
            let s: f32 = (0..e).map(|j| d1[j] * cost[i * e + j]).sum();
            *d = (1.0 / t as f32) / (s + eps);
        }
        for (j, d) in d1.iter_mut().enumerate() {
            let s: f32 = (0..t).map(|i| d0[i] * cost[i * e + j]).sum();
            *d = (1.0 / e as f32) / (s + eps);
        }
        error = d1
            .iter()
            .zip(&d1_old)
            .map(|(a, b)| (a - b).abs())
            .sum::<f32>()
            / e as f32;
        d1_old.clone_from(&d1);
        iterations += 1;
    }
    let mut indices = Vec::with_capacity(t * k);
    for i in 0..t {
        let mut row: Vec<(usize, f32)> = (0..e)
            .map(|j| (j, d1[j] * cost[i * e + j] * d0[i]))
            .collect();
        row.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        indices.extend(row.iter().take(k).map(|(j, _)| *j as i64));
    }
    Ok(host::upload_i64(&indices, &device, "uploading Sinkhorn's expert choices").reshape([t, k]))
}
