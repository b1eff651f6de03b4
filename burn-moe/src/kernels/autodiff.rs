//! Backward rules of the MoE kernels (Burn's custom-kernel pattern: the forward runs on the
//! inner backend, a [`Backward`] step records the gradient).
//!
//! | op | gradient |
//! |---|---|
//! | permute (gather rows) | unpermute (sum rows back) |
//! | unpermute | permute |
//! | permute probs | unpermute probs (and back) |
//! | sort chunks | sort chunks with the inverse order |
//! | `x · w` grouped | `dx = dy · wᵀ` (NT), `dw = xᵀ · dy` (TN) |
//! | `y · wᵀ` grouped | `dy = dz · w` (NN), `dw = dzᵀ · y` (TN) |
//! | `xᵀ · y` grouped | `dx = y · dzᵀ` (NT), `dy = x · dz` (NN) |

use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, binary, unary};
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Autodiff, Backend};

use super::ext::MoeKernelOps;

/// Runs `forward` on the inner backend and records `step` with `state` as its backward.
fn tracked<B, C, S>(
    x: FloatTensor<Autodiff<B, C>>,
    step: S,
    state: S::State,
    forward: impl FnOnce(FloatTensor<B>) -> FloatTensor<B>,
) -> FloatTensor<Autodiff<B, C>>
where
    B: Backend + MoeKernelOps,
    C: CheckpointStrategy,
    S: Backward<B, 1>,
{
    let guard = x.node();
    let out = forward(x.into_primitive());
    match step.prepare::<C>([guard]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(state, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

macro_rules! unary_step {
    ($name:ident, $state:ty, |$grad:ident, $st:ident| $body:expr) => {
        #[derive(Debug)]
        struct $name;

        impl<B: Backend + MoeKernelOps> Backward<B, 1> for $name {
            type State = $state;

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let $st = ops.state;
                unary::<B, _>(ops.parents, ops.node, grads, |$grad| $body);
            }
        }
    };
}

/// Index tensors of a dispatch order, kept for the backward pass.
type Rows<B> = (IntTensor<B>, IntTensor<B>);
type ProbRows<B> = (IntTensor<B>, IntTensor<B>, IntTensor<B>);

unary_step!(Permute, Rows<B>, |grad, st| B::moe_unpermute(
    grad, st.0, st.1
));
unary_step!(Unpermute, Rows<B>, |grad, st| B::moe_permute(
    grad, st.0, st.1
));
unary_step!(PermuteProbs, ProbRows<B>, |grad, st| {
    B::moe_unpermute_probs(grad, st.0, st.1, st.2)
});
unary_step!(UnpermuteProbs, ProbRows<B>, |grad, st| {
    B::moe_permute_probs(grad, st.0, st.1, st.2)
});
unary_step!(SortChunks, (Vec<usize>, Vec<usize>), |grad, st| {
    B::moe_sort_chunks(grad, st.0, st.1)
});

/// The three grouped GEMM layouts; each one's gradients are the other two.
#[derive(Debug, Clone, Copy)]
enum Layout {
    Nn,
    Nt,
    Tn,
}

fn gemm<B: MoeKernelOps>(
    layout: Layout,
    a: FloatTensor<B>,
    b: FloatTensor<B>,
    counts: Vec<usize>,
) -> FloatTensor<B> {
    match layout {
        Layout::Nn => B::moe_grouped_matmul(a, b, counts),
        Layout::Nt => B::moe_grouped_matmul_nt(a, b, counts),
        Layout::Tn => B::moe_grouped_matmul_tn(a, b, counts),
    }
}

#[derive(Debug)]
struct GroupedGemm(Layout);

impl<B: Backend + MoeKernelOps> Backward<B, 2> for GroupedGemm {
    type State = (Option<NodeId>, Option<NodeId>, Vec<usize>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, ckpt: &mut Checkpointer) {
        let (a, b, counts) = ops.state;
        let a: Option<FloatTensor<B>> = a.map(|id| ckpt.retrieve_node_output(id));
        let b: Option<FloatTensor<B>> = b.map(|id| ckpt.retrieve_node_output(id));
        let layout = self.0;
        let counts_b = counts.clone();
        binary::<B, _, _>(
            ops.parents,
            ops.node,
            grads,
            |g| {
                let b = b.expect("the other operand is kept when this one is tracked");
                match layout {
                    Layout::Nn => gemm::<B>(Layout::Nt, g, b, counts),
                    Layout::Nt => gemm::<B>(Layout::Nn, g, b, counts),
                    Layout::Tn => gemm::<B>(Layout::Nt, b, g, counts),
                }
            },
            |g| {
                let a = a.expect("the other operand is kept when this one is tracked");
                match layout {
                    Layout::Nn => gemm::<B>(Layout::Tn, a, g, counts_b),
                    Layout::Nt => gemm::<B>(Layout::Tn, g, a, counts_b),
                    Layout::Tn => gemm::<B>(Layout::Nn, a, g, counts_b),
                }
            },
        );
    }
}

fn grouped<B: Backend + MoeKernelOps, C: CheckpointStrategy>(
    layout: Layout,
    a: FloatTensor<Autodiff<B, C>>,
    b: FloatTensor<Autodiff<B, C>>,
    counts: Vec<usize>,
) -> FloatTensor<Autodiff<B, C>> {
    let (a_tracked, b_tracked) = (a.is_tracked(), b.is_tracked());
    match GroupedGemm(layout)
        .prepare::<C>([a.node(), b.node()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            let a_state = b_tracked.then(|| prep.checkpoint(&a));
            let b_state = a_tracked.then(|| prep.checkpoint(&b));
            let out = gemm::<B>(
                layout,
                a.into_primitive(),
                b.into_primitive(),
                counts.clone(),
            );
            prep.finish((a_state, b_state, counts), out)
        }
        OpsKind::UnTracked(prep) => prep.finish(gemm::<B>(
            layout,
            a.into_primitive(),
            b.into_primitive(),
            counts,
        )),
    }
}

/// Chunk sizes after [`MoeKernelOps::moe_sort_chunks`] and the order that undoes it.
fn inverse_chunks(split_sizes: &[usize], order: &[usize]) -> (Vec<usize>, Vec<usize>) {
    let sizes = order.iter().map(|&c| split_sizes[c]).collect();
    let mut inverse = vec![0; order.len()];
    for (i, &c) in order.iter().enumerate() {
        inverse[c] = i;
    }
    (sizes, inverse)
}

impl<B: Backend + MoeKernelOps, C: CheckpointStrategy> MoeKernelOps for Autodiff<B, C> {
    fn moe_counts(routing_map: IntTensor<Self>) -> IntTensor<Self> {
        B::moe_counts(routing_map)
    }

    fn moe_routing_index(
        routing_map: IntTensor<Self>,
        offsets: Vec<usize>,
        rows: usize,
    ) -> (IntTensor<Self>, IntTensor<Self>, IntTensor<Self>) {
        B::moe_routing_index(routing_map, offsets, rows)
    }

    fn moe_row_map(
        token_of_row: IntTensor<Self>,
        expert_of_row: IntTensor<Self>,
        tokens: usize,
        experts: usize,
    ) -> IntTensor<Self> {
        B::moe_row_map(token_of_row, expert_of_row, tokens, experts)
    }

    fn moe_permute(
        x: FloatTensor<Self>,
        token_of_row: IntTensor<Self>,
        row_map: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        let state = (token_of_row.clone(), row_map.clone());
        tracked::<B, C, _>(x, Permute, state, |x| {
            B::moe_permute(x, token_of_row, row_map)
        })
    }

    fn moe_unpermute(
        y: FloatTensor<Self>,
        token_of_row: IntTensor<Self>,
        row_map: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        let state = (token_of_row.clone(), row_map.clone());
        tracked::<B, C, _>(y, Unpermute, state, |y| {
            B::moe_unpermute(y, token_of_row, row_map)
        })
    }

    fn moe_permute_probs(
        probs: FloatTensor<Self>,
        token_of_row: IntTensor<Self>,
        expert_of_row: IntTensor<Self>,
        row_map: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        let state = (token_of_row.clone(), expert_of_row.clone(), row_map.clone());
        tracked::<B, C, _>(probs, PermuteProbs, state, |p| {
            B::moe_permute_probs(p, token_of_row, expert_of_row, row_map)
        })
    }

    fn moe_unpermute_probs(
        g: FloatTensor<Self>,
        token_of_row: IntTensor<Self>,
        expert_of_row: IntTensor<Self>,
        row_map: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        let state = (token_of_row.clone(), expert_of_row.clone(), row_map.clone());
        tracked::<B, C, _>(g, UnpermuteProbs, state, |g| {
            B::moe_unpermute_probs(g, token_of_row, expert_of_row, row_map)
        })
    }

    fn moe_sort_chunks(
        x: FloatTensor<Self>,
        split_sizes: Vec<usize>,
        order: Vec<usize>,
    ) -> FloatTensor<Self> {
        let state = inverse_chunks(&split_sizes, &order);
        tracked::<B, C, _>(x, SortChunks, state, |x| {
            B::moe_sort_chunks(x, split_sizes, order)
        })
    }

    fn moe_grouped_matmul(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        counts: Vec<usize>,
    ) -> FloatTensor<Self> {
        grouped::<B, C>(Layout::Nn, x, w, counts)
    }

    fn moe_grouped_matmul_nt(
        y: FloatTensor<Self>,
        w: FloatTensor<Self>,
        counts: Vec<usize>,
    ) -> FloatTensor<Self> {
        grouped::<B, C>(Layout::Nt, y, w, counts)
    }

    fn moe_grouped_matmul_tn(
        x: FloatTensor<Self>,
        y: FloatTensor<Self>,
        counts: Vec<usize>,
    ) -> FloatTensor<Self> {
        grouped::<B, C>(Layout::Tn, x, y, counts)
    }
}

#[cfg(test)]
mod tests {
    use super::inverse_chunks;

    #[test]
    fn inverse_chunk_order_restores_the_input() {
        let sizes = [2, 0, 3, 1];
        let order = [2, 0, 3, 1];
        let (out_sizes, inverse) = inverse_chunks(&sizes, &order);
        assert_eq!(out_sizes, vec![3, 2, 1, 0]);
        // Applying `inverse` to the sorted chunks gives chunk c back at position c.
        let sorted: Vec<usize> = order.to_vec();
        let restored: Vec<usize> = inverse.iter().map(|&i| sorted[i]).collect();
        assert_eq!(restored, vec![0, 1, 2, 3]);
    }
}
