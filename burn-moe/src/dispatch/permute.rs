//! Reference token permutation (plain tensor ops): group tokens expert-major and scatter them
//! back. These are the definitions the CubeCL kernels are tested against.

use burn::tensor::{Bool, IndexingUpdateOp, Int, Tensor};

use crate::error::Result;
use crate::host;

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

/// A local dispatch order: token index and expert of each row, rows per expert.
#[derive(Debug, Clone)]
pub struct LocalPermutation {
    /// Token index of each row, `[N]`, expert-major.
    pub sorted_indices: Tensor<1, Int>,
    /// Expert of each row, `[N]`.
    pub expert_of_row: Tensor<1, Int>,
    /// Rows per expert.
    pub counts: Vec<usize>,
    /// Device-to-host synchronisations it took (1 dropless, 0 padded).
    pub host_syncs: usize,
}

/// The dispatch order of a routing map `[T, E]`. Dropless (`capacity = None`) reads the map
/// back to the host (one synchronisation). Padded to capacity (`Some(c)`: every expert has
/// exactly `min(c, T)` tokens) it is computed on the device: per expert, the routed tokens in
/// ascending order are the top `min(c, T)` of `map · (T − t)`.
pub fn local_permutation(
    routing_map: Tensor<2, Bool>,
    capacity: Option<usize>,
) -> Result<LocalPermutation> {
    let [t, e] = routing_map.dims();
    let device = routing_map.device();
    match capacity {
        None => {
            let (order, counts) = routing_permutation(routing_map)?;
            let expert_of_row: Vec<i64> = counts
                .iter()
                .enumerate()
                .flat_map(|(e, &n)| std::iter::repeat_n(e as i64, n))
                .collect();
            Ok(LocalPermutation {
                sorted_indices: Tensor::<1, Int>::from_data(order.as_slice(), &device),
                expert_of_row: Tensor::<1, Int>::from_data(expert_of_row.as_slice(), &device),
                counts,
                host_syncs: 1,
            })
        }
        Some(c) => {
            let rows = c.min(t);
            let descending = Tensor::<1, Int>::arange(0..t as i64, &device)
                .neg()
                .add_scalar(t as i64)
                .float()
                .reshape([t, 1]);
            let score = routing_map.float() * descending;
            let sorted_indices = if rows == 0 {
                Tensor::<1, Int>::empty([0], &device)
            } else {
                score.transpose().argtopk(rows, 1).reshape([e * rows])
            };
            let expert_of_row: Vec<i64> = (0..e)
                .flat_map(|x| std::iter::repeat_n(x as i64, rows))
                .collect();
            Ok(LocalPermutation {
                sorted_indices,
                expert_of_row: Tensor::<1, Int>::from_data(expert_of_row.as_slice(), &device),
                counts: vec![rows; e],
                host_syncs: 0,
            })
        }
    }
}

/// Rows of `tokens` `[T, H]` in dispatch order: `[N, H]`, and the matching probabilities `[N]`
/// taken from `probs` `[T, E]` (`expert_of_row[i]` is the expert of row `i`).
pub fn permute(
    tokens: Tensor<2>,
    probs: Tensor<2>,
    sorted_indices: Tensor<1, Int>,
    expert_of_row: Tensor<1, Int>,
) -> (Tensor<2>, Tensor<1>) {
    let [t, e] = probs.dims();
    let permuted = tokens.select(0, sorted_indices.clone());
    let flat = expert_of_row.mul_scalar(t as i64) + sorted_indices;
    let permuted_probs = probs.transpose().reshape([t * e]).select(0, flat);
    (permuted, permuted_probs)
}

/// Scatter-adds rows `[N, H]` back to their tokens: `[num_tokens, H]`.
pub fn unpermute(
    permuted: Tensor<2>,
    sorted_indices: Tensor<1, Int>,
    num_tokens: usize,
) -> Tensor<2> {
    let [_, h] = permuted.dims();
    let device = permuted.device();
    Tensor::<2>::zeros([num_tokens, h], &device).select_assign(
        0,
        sorted_indices,
        permuted,
        IndexingUpdateOp::Add,
    )
}
