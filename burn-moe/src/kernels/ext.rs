//! The backend extension: MoE dispatch and expert-compute operations that CubeCL runtimes run
//! as `#[cube]` kernels (`cube.rs`), Flex as native loops and per-group `gemm` calls
//! (`flex.rs`), and `Autodiff` differentiates by hand (`autodiff.rs`).
//!
//! Index tensors are integer tensors of the backend's int dtype; `-1` in a row map marks a
//! (token, expert) pair that was not routed.

use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, backend_extension};

/// Token dispatch and grouped expert compute for MoE layers.
#[backend_extension(Flex: cfg(feature = "flex"), Cube: cfg(feature = "cube"), Autodiff)]
pub trait MoeKernelOps: Backend {
    /// Tokens per expert: column sums of a 0/1 routing map `[T, E]`, giving `[E]`.
    fn moe_counts(routing_map: IntTensor<Self>) -> IntTensor<Self>;

    /// The dropless dispatch order of a 0/1 routing map `[T, E]`, expert-major with ascending
    /// tokens within an expert; `offsets[e]` is the first row of expert `e` (the exclusive
    /// prefix sum of the counts) and `rows` the total. Returns the token of each row `[N]`,
    /// the expert of each row `[N]` and the row map `[T, E]` (row of each pair, `-1` if none).
    fn moe_routing_index(
        routing_map: IntTensor<Self>,
        offsets: Vec<usize>,
        rows: usize,
    ) -> (IntTensor<Self>, IntTensor<Self>, IntTensor<Self>);

    /// The row map `[tokens, experts]` of a dispatch order given by the token `[N]` and expert
    /// `[N]` of each row: `row_map[t, e] = r` where row `r` holds pair `(t, e)`, else `-1`.
    fn moe_row_map(
        token_of_row: IntTensor<Self>,
        expert_of_row: IntTensor<Self>,
        tokens: usize,
        experts: usize,
    ) -> IntTensor<Self>;

    /// Gathers rows: `out[r] = x[token_of_row[r]]`, `[T, H] → [N, H]`. The backward pass is
    /// [`moe_unpermute`](MoeKernelOps::moe_unpermute) (which needs the row map).
    fn moe_permute(
        x: FloatTensor<Self>,
        token_of_row: IntTensor<Self>,
        row_map: IntTensor<Self>,
    ) -> FloatTensor<Self>;

    /// Sums rows back to their tokens: `out[t] = Σ_e y[row_map[t, e]]` over routed pairs in
    /// ascending expert order (deterministic: no atomics), `[N, H] → [T, H]`. The backward
    /// pass is [`moe_permute`](MoeKernelOps::moe_permute).
    fn moe_unpermute(
        y: FloatTensor<Self>,
        token_of_row: IntTensor<Self>,
        row_map: IntTensor<Self>,
    ) -> FloatTensor<Self>;

    /// The probability of each row: `out[r] = probs[token_of_row[r], expert_of_row[r]]`,
    /// `[T, E] → [N]`.
    fn moe_permute_probs(
        probs: FloatTensor<Self>,
        token_of_row: IntTensor<Self>,
        expert_of_row: IntTensor<Self>,
        row_map: IntTensor<Self>,
    ) -> FloatTensor<Self>;

    /// The transpose of [`moe_permute_probs`](MoeKernelOps::moe_permute_probs): `[N] → [T, E]`,
    /// `out[t, e] = g[row_map[t, e]]` for routed pairs, `0` elsewhere.
    fn moe_unpermute_probs(
        g: FloatTensor<Self>,
        token_of_row: IntTensor<Self>,
        expert_of_row: IntTensor<Self>,
        row_map: IntTensor<Self>,
    ) -> FloatTensor<Self>;

    /// Reorders chunks of rows: `x` `[N, H]` holds chunks of `split_sizes[i]` rows; the output
    /// holds chunks `order[0], order[1], …` (Megatron's `sort_chunks_by_idxs`).
    fn moe_sort_chunks(
        x: FloatTensor<Self>,
        split_sizes: Vec<usize>,
        order: Vec<usize>,
    ) -> FloatTensor<Self>;

    /// Grouped GEMM: rows of `x` `[N, K]` in groups of `counts[g]` rows, each times its
    /// group's weight `w[g]` `[K, M]`: `[N, M]`, one launch for all groups, no padding.
    fn moe_grouped_matmul(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        counts: Vec<usize>,
    ) -> FloatTensor<Self>;

    /// `y_g · w[g]ᵀ` per group: `y` `[N, M]`, `w` `[G, K, M]` → `[N, K]` (the input gradient
    /// of the grouped GEMM).
    fn moe_grouped_matmul_nt(
        y: FloatTensor<Self>,
        w: FloatTensor<Self>,
        counts: Vec<usize>,
    ) -> FloatTensor<Self>;

    /// `x_gᵀ · y_g` per group: `x` `[N, K]`, `y` `[N, M]` → `[G, K, M]`, zeros for empty
    /// groups (the weight gradient of the grouped GEMM).
    fn moe_grouped_matmul_tn(
        x: FloatTensor<Self>,
        y: FloatTensor<Self>,
        counts: Vec<usize>,
    ) -> FloatTensor<Self>;
}
