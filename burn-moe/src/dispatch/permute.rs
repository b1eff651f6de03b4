//! Token permutation: group tokens expert-major and scatter them back. On devices whose
//! backend runs the MoE kernels (see [`crate::kernels`]) the index computation, the gathers and
//! the deterministic scatter-add are CubeCL kernels; elsewhere they are plain tensor ops.

use burn::tensor::{Bool, Device, Int, Tensor};

use crate::error::Result;
use crate::kernels;

pub use crate::kernels::reference::{permutation_from_mask, routing_permutation};

/// A local dispatch order: token index and expert of each row, rows per expert.
#[derive(Debug, Clone)]
pub struct LocalPermutation {
    /// Token index of each row, `[N]`, expert-major.
    pub sorted_indices: Tensor<1, Int>,
    /// Expert of each row, `[N]`.
    pub expert_of_row: Tensor<1, Int>,
    /// Rows per expert.
    pub counts: Vec<usize>,
    /// Row of each (token, expert) pair, `-1` if not routed, `[T, E]` (the MoE extension's
    /// unpermute reads it instead of scattering).
    pub row_map: Tensor<2, Int>,
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
            let index = kernels::routing_index(routing_map)?;
            Ok(LocalPermutation {
                sorted_indices: index.token_of_row,
                expert_of_row: index.expert_of_row,
                counts: index.counts,
                row_map: index.row_map,
            })
        }
        Some(c) => {
            let rows = c.min(t);
            let descending = positions(t, &device)
                .neg()
                .add_scalar(t as i64)
                .float()
                .reshape([t, 1]);
            let score = routing_map.float() * descending;
            let sorted_indices = if rows == 0 {
                Tensor::<1, Int>::empty([0], &device)
            } else {
                crate::router::select::argtopk_rows(score.transpose(), rows).reshape([e * rows])
            };
            // Expert x owns rows x·rows .. (x + 1)·rows.
            let expert_of_row = positions(e * rows, &device).div_scalar(rows.max(1) as i64);
            let row_map = kernels::row_map(sorted_indices.clone(), expert_of_row.clone(), t, e);
            Ok(LocalPermutation {
                sorted_indices,
                expert_of_row,
                counts: vec![rows; e],
                row_map,
            })
        }
    }
}

/// Rows of `tokens` `[T, H]` in the dispatch order of `perm`: `[N, H]`, and the matching
/// probabilities `[N]` taken from `probs` `[T, E]`.
pub fn permute(
    tokens: Tensor<2>,
    probs: Tensor<2>,
    perm: &LocalPermutation,
) -> (Tensor<2>, Tensor<1>) {
    let sorted = perm.sorted_indices.clone();
    (
        kernels::permute_tokens(tokens, sorted.clone(), perm.row_map.clone()),
        kernels::permute_probs(
            probs,
            sorted,
            perm.expert_of_row.clone(),
            perm.row_map.clone(),
        ),
    )
}

/// Sums rows `[N, H]` back to their tokens: `[T, H]` for a row map `[T, E]` (a deterministic
/// per-token sum in expert order where the MoE extension runs).
pub fn unpermute(
    permuted: Tensor<2>,
    sorted_indices: Tensor<1, Int>,
    row_map: Tensor<2, Int>,
) -> Tensor<2> {
    kernels::unpermute_tokens(permuted, sorted_indices, row_map)
}

/// `0, 1, …, n − 1` made on the device (ones, then a cumulative sum): Burn's `arange` builds
/// its values on the host and uploads them.
fn positions(n: usize, device: &Device) -> Tensor<1, Int> {
    if n == 0 {
        return Tensor::<1, Int>::empty([0], device);
    }
    Tensor::<1, Int>::ones([n], device).cumsum(0).sub_scalar(1)
}
