//! MoE dispatch and expert-compute operations, as CubeCL kernels where the device's backend
//! runs them and as plain tensor operations elsewhere.
//!
//! Every function here takes ordinary tensors and returns the same values (up to float
//! summation order) on every backend. It calls the [`MoeKernelOps`](ext::MoeKernelOps) backend
//! extension, whose hand-written backward rules live in this module, on CubeCL devices (CUDA
//! with feature `cuda`, wgpu with feature `wgpu`: `#[cube]` kernels) and on Flex (native loops,
//! one `gemm` call per group into a single buffer); on other backends it runs the [`reference`]
//! implementation (plain tensor operations). The functions are differentiable either way.
//!
//! A dispatch order is described by three index tensors: the token of each row `[N]`, the
//! expert of each row `[N]`, and the row map `[T, E]` (the row of each routed pair, `-1` for
//! pairs that were not routed). The kernels never use float atomics: results are bit-identical
//! from run to run.

#[cfg(any(feature = "flex", feature = "cube"))]
mod autodiff;
#[cfg(feature = "cube")]
mod cube;
#[cfg(any(feature = "flex", feature = "cube"))]
pub mod ext;
#[cfg(feature = "flex")]
mod flex;
pub mod reference;
#[cfg(any(feature = "cube", test))]
mod tiles;

use burn::tensor::{Bool, Device, Int, Tensor};

use crate::error::{MoeError, Result};
#[cfg(any(feature = "flex", feature = "cube"))]
use crate::host;

/// Whether `device`'s backend has the [`MoeKernelOps`](ext::MoeKernelOps) extension: a CubeCL
/// device in a build with `cuda` or `wgpu` (the `#[cube]` kernels) or Flex (native loops and
/// per-group `gemm`); the functions of this module use the [`reference`] implementation
/// elsewhere.
pub fn kernels_available(device: &Device) -> bool {
    #[allow(unreachable_patterns)]
    match device.clone().without_autodiff().as_dispatch() {
        #[cfg(feature = "cube")]
        burn::backend::DispatchDevice::Cube(_) => true,
        #[cfg(feature = "flex")]
        burn::backend::DispatchDevice::Flex(_) => true,
        _ => false,
    }
}

/// The row range of each group of `sizes[g]` consecutive rows.
pub(crate) fn group_ranges(sizes: &[usize]) -> Vec<std::ops::Range<usize>> {
    let mut start = 0;
    sizes
        .iter()
        .map(|&n| {
            start += n;
            start - n..start
        })
        .collect()
}

/// A dropless dispatch order: rows grouped expert-major, ascending token within an expert
/// (Megatron-Core's `permute` order).
#[derive(Debug, Clone)]
pub struct RoutingIndex {
    /// Token of each row, `[N]`.
    pub token_of_row: Tensor<1, Int>,
    /// Expert of each row, `[N]`.
    pub expert_of_row: Tensor<1, Int>,
    /// Row of each (token, expert) pair, `-1` where not routed, `[T, E]`.
    pub row_map: Tensor<2, Int>,
    /// Rows per expert (host values: they size the expert groups).
    pub counts: Vec<usize>,
}

/// Tokens per expert of a routing map `[T, E]`: `[E]` on the device.
pub fn expert_counts(routing_map: Tensor<2, Bool>) -> Tensor<1, Int> {
    #[cfg(any(feature = "flex", feature = "cube"))]
    if kernels_available(&routing_map.device()) {
        use burn::backend::Dispatch;
        use ext::MoeKernelOps;
        return Tensor::from_dispatch(Dispatch::moe_counts(routing_map.int().into_dispatch()));
    }
    reference::expert_counts(routing_map)
}

/// The dropless dispatch order of a routing map `[T, E]`. Reads the `E` counts back to the
/// host (one synchronisation, as Megatron-Core's dropless dispatch).
pub fn routing_index(routing_map: Tensor<2, Bool>) -> Result<RoutingIndex> {
    #[cfg(any(feature = "flex", feature = "cube"))]
    if kernels_available(&routing_map.device()) {
        use burn::backend::Dispatch;
        use ext::MoeKernelOps;
        let map = routing_map.int();
        let counts = host::read_i64::<1>(
            Tensor::from_dispatch(Dispatch::moe_counts(map.clone().into_dispatch())),
            "reading the tokens per expert",
        )?;
        let counts: Vec<usize> = counts.into_iter().map(|c| c as usize).collect();
        let ranges = group_ranges(&counts);
        let rows = ranges.last().map_or(0, |r| r.end);
        let offsets = ranges.into_iter().map(|r| r.start).collect();
        let (token_of_row, expert_of_row, row_map) =
            Dispatch::moe_routing_index(map.into_dispatch(), offsets, rows);
        return Ok(RoutingIndex {
            token_of_row: Tensor::from_dispatch(token_of_row),
            expert_of_row: Tensor::from_dispatch(expert_of_row),
            row_map: Tensor::from_dispatch(row_map),
            counts,
        });
    }
    reference::routing_index(routing_map)
}

/// The row map `[tokens, experts]` of a dispatch order given by each row's token and expert.
pub fn row_map(
    token_of_row: Tensor<1, Int>,
    expert_of_row: Tensor<1, Int>,
    tokens: usize,
    experts: usize,
) -> Tensor<2, Int> {
    #[cfg(any(feature = "flex", feature = "cube"))]
    if kernels_available(&token_of_row.device()) {
        use burn::backend::Dispatch;
        use ext::MoeKernelOps;
        return Tensor::from_dispatch(Dispatch::moe_row_map(
            token_of_row.into_dispatch(),
            expert_of_row.into_dispatch(),
            tokens,
            experts,
        ));
    }
    reference::row_map(token_of_row, expert_of_row, tokens, experts)
}

/// Rows of `x` `[T, H]` in dispatch order: `[N, H]`.
pub fn permute_tokens(
    x: Tensor<2>,
    token_of_row: Tensor<1, Int>,
    row_map: Tensor<2, Int>,
) -> Tensor<2> {
    #[cfg(any(feature = "flex", feature = "cube"))]
    if kernels_available(&x.device()) {
        use burn::backend::Dispatch;
        use ext::MoeKernelOps;
        return Tensor::from_dispatch(Dispatch::moe_permute(
            x.into_dispatch(),
            token_of_row.into_dispatch(),
            row_map.into_dispatch(),
        ));
    }
    let _ = row_map;
    reference::permute_tokens(x, token_of_row)
}

/// Rows `[N, H]` summed back to their tokens: `[T, H]` (`T` is the row map's first dim).
pub fn unpermute_tokens(
    y: Tensor<2>,
    token_of_row: Tensor<1, Int>,
    row_map: Tensor<2, Int>,
) -> Tensor<2> {
    #[cfg(any(feature = "flex", feature = "cube"))]
    if kernels_available(&y.device()) {
        use burn::backend::Dispatch;
        use ext::MoeKernelOps;
        return Tensor::from_dispatch(Dispatch::moe_unpermute(
            y.into_dispatch(),
            token_of_row.into_dispatch(),
            row_map.into_dispatch(),
        ));
    }
    let tokens = row_map.dims()[0];
    reference::unpermute_tokens(y, token_of_row, tokens)
}

/// The probability of each row, `probs` `[T, E]` → `[N]`.
pub fn permute_probs(
    probs: Tensor<2>,
    token_of_row: Tensor<1, Int>,
    expert_of_row: Tensor<1, Int>,
    row_map: Tensor<2, Int>,
) -> Tensor<1> {
    #[cfg(any(feature = "flex", feature = "cube"))]
    if kernels_available(&probs.device()) {
        use burn::backend::Dispatch;
        use ext::MoeKernelOps;
        return Tensor::from_dispatch(Dispatch::moe_permute_probs(
            probs.into_dispatch(),
            token_of_row.into_dispatch(),
            expert_of_row.into_dispatch(),
            row_map.into_dispatch(),
        ));
    }
    let _ = row_map;
    reference::permute_probs(probs, token_of_row, expert_of_row)
}

fn invalid(name: &'static str, reason: String) -> MoeError {
    MoeError::InvalidArgument { name, reason }
}

/// Checks chunk sizes against the rows of `x` and that `order` is a permutation.
fn check_chunks(rows: usize, split_sizes: &[usize], order: &[usize]) -> Result<()> {
    let total: usize = split_sizes.iter().sum();
    if total != rows {
        return Err(invalid(
            "split_sizes",
            format!("sum to {total} but the input has {rows} rows"),
        ));
    }
    let mut seen = vec![false; split_sizes.len()];
    for &c in order {
        if c >= seen.len() || std::mem::replace(&mut seen[c], true) {
            return Err(invalid(
                "order",
                format!(
                    "{order:?} is not a permutation of the {} chunks",
                    split_sizes.len()
                ),
            ));
        }
    }
    if order.len() != split_sizes.len() {
        return Err(invalid(
            "order",
            format!(
                "has {} entries for {} chunks",
                order.len(),
                split_sizes.len()
            ),
        ));
    }
    Ok(())
}

/// Reorders chunks of rows (Megatron's `sort_chunks_by_idxs`): `x` `[N, H]` holds chunks of
/// `split_sizes[i]` rows; the output holds chunks `order[0], order[1], …`.
pub fn sort_chunks(x: Tensor<2>, split_sizes: &[usize], order: &[usize]) -> Result<Tensor<2>> {
    check_chunks(x.dims()[0], split_sizes, order)?;
    #[cfg(any(feature = "flex", feature = "cube"))]
    if kernels_available(&x.device()) {
        use burn::backend::Dispatch;
        use ext::MoeKernelOps;
        return Ok(Tensor::from_dispatch(Dispatch::moe_sort_chunks(
            x.into_dispatch(),
            split_sizes.to_vec(),
            order.to_vec(),
        )));
    }
    Ok(reference::sort_chunks(x, split_sizes, order))
}

fn check_groups(name: &'static str, rows: usize, counts: &[usize], groups: usize) -> Result<()> {
    let total: usize = counts.iter().sum();
    if counts.len() != groups || total != rows {
        return Err(invalid(
            "counts",
            format!(
                "{counts:?} must have one entry per group ({groups}) summing to the {rows} rows of `{name}`"
            ),
        ));
    }
    Ok(())
}

/// Grouped GEMM: `x` `[N, K]` in groups of `counts[g]` rows, each times `w[g]` `[K, M]`:
/// `[N, M]`. On kernel backends: one launch, no padding.
pub fn grouped_matmul(x: Tensor<2>, w: Tensor<3>, counts: &[usize]) -> Result<Tensor<2>> {
    let [n, k] = x.dims();
    let [g, wk, _] = w.dims();
    check_groups("x", n, counts, g)?;
    if wk != k {
        return Err(MoeError::ShapeMismatch {
            name: "w",
            expected: format!("[groups, {k}, cols]"),
            got: w.dims().to_vec(),
        });
    }
    #[cfg(any(feature = "flex", feature = "cube"))]
    if kernels_available(&x.device()) {
        use burn::backend::Dispatch;
        use ext::MoeKernelOps;
        return Ok(Tensor::from_dispatch(Dispatch::moe_grouped_matmul(
            x.into_dispatch(),
            w.into_dispatch(),
            counts.to_vec(),
        )));
    }
    Ok(reference::grouped_matmul(x, w, counts))
}

/// `y_g · w[g]ᵀ` per group: `y` `[N, M]`, `w` `[G, K, M]` → `[N, K]`.
pub fn grouped_matmul_nt(y: Tensor<2>, w: Tensor<3>, counts: &[usize]) -> Result<Tensor<2>> {
    let [n, m] = y.dims();
    let [g, _, wm] = w.dims();
    check_groups("y", n, counts, g)?;
    if wm != m {
        return Err(MoeError::ShapeMismatch {
            name: "w",
            expected: format!("[groups, rows, {m}]"),
            got: w.dims().to_vec(),
        });
    }
    #[cfg(any(feature = "flex", feature = "cube"))]
    if kernels_available(&y.device()) {
        use burn::backend::Dispatch;
        use ext::MoeKernelOps;
        return Ok(Tensor::from_dispatch(Dispatch::moe_grouped_matmul_nt(
            y.into_dispatch(),
            w.into_dispatch(),
            counts.to_vec(),
        )));
    }
    Ok(reference::grouped_matmul_nt(y, w, counts))
}

/// `x_gᵀ · y_g` per group: `x` `[N, K]`, `y` `[N, M]` → `[G, K, M]` (zeros for empty groups).
pub fn grouped_matmul_tn(x: Tensor<2>, y: Tensor<2>, counts: &[usize]) -> Result<Tensor<3>> {
    let [n, _] = x.dims();
    check_groups("x", n, counts, counts.len())?;
    if y.dims()[0] != n {
        return Err(MoeError::ShapeMismatch {
            name: "y",
            expected: format!("[{n}, cols]"),
            got: y.dims().to_vec(),
        });
    }
    #[cfg(any(feature = "flex", feature = "cube"))]
    if kernels_available(&x.device()) {
        use burn::backend::Dispatch;
        use ext::MoeKernelOps;
        return Ok(Tensor::from_dispatch(Dispatch::moe_grouped_matmul_tn(
            x.into_dispatch(),
            y.into_dispatch(),
            counts.to_vec(),
        )));
    }
    Ok(reference::grouped_matmul_tn(x, y, counts))
}
