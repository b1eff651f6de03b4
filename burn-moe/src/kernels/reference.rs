//! The reference implementations: plain tensor operations (differentiable through Burn's own
//! autodiff), used on backends without the kernels and as the kernels' test oracle.

use burn::tensor::{Bool, IndexingUpdateOp, Int, Tensor};

use crate::error::Result;
use crate::host;

use super::{RoutingIndex, group_ranges};

/// The dispatch order of a routing map `[T, E]`: token indices grouped expert-major, ascending
/// token index within an expert, and the number of tokens per expert.
///
/// Reads the map back to the host: one device-to-host synchronisation (dropless routing needs
/// the counts on the host to size the expert groups, as in Megatron-Core).
pub fn routing_permutation(routing_map: Tensor<2, Bool>) -> Result<(Vec<i64>, Vec<usize>)> {
    let [t, e] = routing_map.dims();
    let map = host::read_bool(routing_map, "reading the routing map")?;
    Ok(permutation_from_mask(&map, t, e))
}

/// [`routing_permutation`] on a host mask `[T, E]` (row-major).
pub fn permutation_from_mask(
    map: &[bool],
    num_tokens: usize,
    num_experts: usize,
) -> (Vec<i64>, Vec<usize>) {
    let mut counts = vec![0usize; num_experts];
    let mut order = Vec::new();
    for (expert, count) in counts.iter_mut().enumerate() {
        for token in 0..num_tokens {
            if map[token * num_experts + expert] {
                order.push(token as i64);
                *count += 1;
            }
        }
    }
    (order, counts)
}

/// Tokens per expert: column sums of the routing map.
pub fn expert_counts(routing_map: Tensor<2, Bool>) -> Tensor<1, Int> {
    let [_, e] = routing_map.dims();
    routing_map.int().sum_dim(0).reshape([e])
}

/// The dropless dispatch order, computed on the host from the routing map.
pub fn routing_index(routing_map: Tensor<2, Bool>) -> Result<RoutingIndex> {
    let [t, e] = routing_map.dims();
    let device = routing_map.device();
    let (order, counts) = routing_permutation(routing_map)?;
    let experts: Vec<i64> = counts
        .iter()
        .enumerate()
        .flat_map(|(x, &n)| std::iter::repeat_n(x as i64, n))
        .collect();
    let token_of_row = host::upload_i64(&order, &device, "uploading the token of each row");
    let expert_of_row = host::upload_i64(&experts, &device, "uploading the expert of each row");
    let row_map = row_map(token_of_row.clone(), expert_of_row.clone(), t, e);
    Ok(RoutingIndex {
        token_of_row,
        expert_of_row,
        row_map,
        counts,
    })
}

/// The row map: `-1` everywhere, then each row's index at its (token, expert) pair.
pub fn row_map(
    token_of_row: Tensor<1, Int>,
    expert_of_row: Tensor<1, Int>,
    tokens: usize,
    experts: usize,
) -> Tensor<2, Int> {
    let device = token_of_row.device();
    let [n] = token_of_row.dims();
    let pairs = token_of_row.mul_scalar(experts as i64) + expert_of_row;
    // Each pair occurs once: adding `r + 1` to `-1` writes `r`.
    let rows = host::arange(
        1..n as i64 + 1,
        &device,
        "uploading row numbers for the row map",
    );
    Tensor::<1, Int>::full([tokens * experts], -1, &device)
        .select_assign(0, pairs, rows, IndexingUpdateOp::Add)
        .reshape([tokens, experts])
}

/// `x.select(0, token_of_row)`.
pub fn permute_tokens(x: Tensor<2>, token_of_row: Tensor<1, Int>) -> Tensor<2> {
    x.select(0, token_of_row)
}

/// Scatter-add of the rows to their tokens.
pub fn unpermute_tokens(y: Tensor<2>, token_of_row: Tensor<1, Int>, tokens: usize) -> Tensor<2> {
    let [_, h] = y.dims();
    let device = y.device();
    Tensor::<2>::zeros([tokens, h], &device).select_assign(
        0,
        token_of_row,
        y,
        IndexingUpdateOp::Add,
    )
}

/// `probs[token_of_row[r], expert_of_row[r]]` through a flat select.
pub fn permute_probs(
    probs: Tensor<2>,
    token_of_row: Tensor<1, Int>,
    expert_of_row: Tensor<1, Int>,
) -> Tensor<1> {
    let [t, e] = probs.dims();
    let flat = token_of_row.mul_scalar(e as i64) + expert_of_row;
    probs.reshape([t * e]).select(0, flat)
}

/// Slices the chunks and concatenates them in `order`.
pub fn sort_chunks(x: Tensor<2>, split_sizes: &[usize], order: &[usize]) -> Tensor<2> {
    let [n, h] = x.dims();
    let ranges = group_ranges(split_sizes);
    let chunks: Vec<Tensor<2>> = order
        .iter()
        .filter(|&&c| split_sizes[c] > 0)
        .map(|&c| x.clone().slice([ranges[c].clone(), 0..h]))
        .collect();
    if chunks.is_empty() {
        return x.slice([0..n, 0..h]);
    }
    Tensor::cat(chunks, 0)
}

fn weight(w: &Tensor<3>, g: usize) -> Tensor<2> {
    let [_, k, m] = w.dims();
    w.clone().slice([g..g + 1, 0..k, 0..m]).reshape([k, m])
}

/// One matmul per non-empty group, concatenated.
pub fn grouped_matmul(x: Tensor<2>, w: Tensor<3>, counts: &[usize]) -> Tensor<2> {
    let [n, k] = x.dims();
    let m = w.dims()[2];
    let outs: Vec<Tensor<2>> = group_ranges(counts)
        .into_iter()
        .enumerate()
        .filter(|(_, r)| !r.is_empty())
        .map(|(g, r)| x.clone().slice([r, 0..k]).matmul(weight(&w, g)))
        .collect();
    if outs.is_empty() {
        // No rows: an empty product that keeps the output in the autodiff graph.
        return match counts.len() {
            0 => Tensor::zeros([n, m], &x.device()),
            _ => x.matmul(weight(&w, 0)),
        };
    }
    Tensor::cat(outs, 0)
}

/// One `y_g · w[g]ᵀ` per non-empty group, concatenated.
pub fn grouped_matmul_nt(y: Tensor<2>, w: Tensor<3>, counts: &[usize]) -> Tensor<2> {
    let [n, m] = y.dims();
    let k = w.dims()[1];
    let outs: Vec<Tensor<2>> = group_ranges(counts)
        .into_iter()
        .enumerate()
        .filter(|(_, r)| !r.is_empty())
        .map(|(g, r)| y.clone().slice([r, 0..m]).matmul(weight(&w, g).transpose()))
        .collect();
    if outs.is_empty() {
        return match counts.len() {
            0 => Tensor::zeros([n, k], &y.device()),
            _ => y.matmul(weight(&w, 0).transpose()),
        };
    }
    Tensor::cat(outs, 0)
}

/// `x_gᵀ · y_g` per group (zeros for empty groups), stacked.
pub fn grouped_matmul_tn(x: Tensor<2>, y: Tensor<2>, counts: &[usize]) -> Tensor<3> {
    let [_, k] = x.dims();
    let [_, m] = y.dims();
    let device = x.device();
    let outs: Vec<Tensor<3>> = group_ranges(counts)
        .into_iter()
        .map(|r| {
            if r.is_empty() {
                // Zeros that stay in the autodiff graph of `x` (an empty product).
                x.clone()
                    .slice([0..0, 0..k])
                    .transpose()
                    .matmul(y.clone().slice([0..0, 0..m]))
                    .reshape([1, k, m])
            } else {
                let xg = x.clone().slice([r.clone(), 0..k]);
                let yg = y.clone().slice([r, 0..m]);
                xg.transpose().matmul(yg).reshape([1, k, m])
            }
        })
        .collect();
    if outs.is_empty() {
        return Tensor::zeros([0, k, m], &device);
    }
    Tensor::cat(outs, 0)
}
