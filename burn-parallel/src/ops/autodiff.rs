//! Backward rules: each mapping's gradient is its conjugate collective (Megatron-Core's
//! `tensor_parallel/mappings.py`).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::ops::FloatTensorOps;
use burn::backend::{Autodiff, Backend, tensor::FloatTensor};

use super::{GatherGrad, ParallelBackend};
use crate::comm::ReduceOp;
use crate::group::GroupId;

/// Runs `forward` on the inner backend and records `step` as the backward of the result.
fn tracked<B, C, S>(
    x: FloatTensor<Autodiff<B, C>>,
    step: S,
    state: S::State,
    forward: impl FnOnce(FloatTensor<B>) -> FloatTensor<B>,
) -> FloatTensor<Autodiff<B, C>>
where
    B: Backend + ParallelBackend,
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

macro_rules! backward_step {
    ($name:ident, $state:ty, |$grad:ident, $st:ident| $body:expr) => {
        #[derive(Debug)]
        struct $name;

        impl<B: Backend + ParallelBackend> Backward<B, 1> for $name {
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

backward_step!(CopyToRegion, GroupId, |grad, group| {
    B::coll_reduce_from_region(grad, group)
});
backward_step!(ReduceFromRegion, GroupId, |grad, _group| grad);
backward_step!(Split, (GroupId, usize), |grad, st| B::coll_gather(
    grad,
    st.0,
    st.1,
    GatherGrad::Split
));
backward_step!(
    Gather,
    (GroupId, usize, GatherGrad),
    |grad, st| match st.2 {
        GatherGrad::Split => B::coll_split(grad, st.0, st.1),
        GatherGrad::ReduceScatter => B::coll_reduce_scatter(grad, st.0, st.1),
    }
);
backward_step!(ReduceScatter, (GroupId, usize), |grad, st| B::coll_gather(
    grad,
    st.0,
    st.1,
    GatherGrad::Split
));
backward_step!(GatherV, (GroupId, Vec<usize>), |grad, st| {
    B::coll_reduce_scatter_v(grad, st.0, st.1)
});
backward_step!(ReduceScatterV, (GroupId, Vec<usize>), |grad, st| {
    B::coll_gather_v(grad, st.0, st.1)
});
backward_step!(AllToAllV, (GroupId, Vec<usize>, Vec<usize>), |grad, st| {
    B::coll_all_to_all_v(grad, st.0, st.2, st.1)
});

impl<B: Backend + ParallelBackend, C: CheckpointStrategy> ParallelBackend for Autodiff<B, C> {
    fn coll_all_reduce(x: FloatTensor<Self>, group: GroupId, op: ReduceOp) -> FloatTensor<Self> {
        // Detached input: the result is a constant for autodiff.
        let x = <Self as FloatTensorOps<Self>>::float_detach(x);
        tracked::<B, C, _>(x, ReduceFromRegion, group, |x| {
            B::coll_all_reduce(x, group, op)
        })
    }

    fn coll_copy_to_region(x: FloatTensor<Self>, group: GroupId) -> FloatTensor<Self> {
        tracked::<B, C, _>(x, CopyToRegion, group, |x| B::coll_copy_to_region(x, group))
    }

    fn coll_reduce_from_region(x: FloatTensor<Self>, group: GroupId) -> FloatTensor<Self> {
        tracked::<B, C, _>(x, ReduceFromRegion, group, |x| {
            B::coll_reduce_from_region(x, group)
        })
    }

    fn coll_split(x: FloatTensor<Self>, group: GroupId, dim: usize) -> FloatTensor<Self> {
        tracked::<B, C, _>(x, Split, (group, dim), |x| B::coll_split(x, group, dim))
    }

    fn coll_gather(
        x: FloatTensor<Self>,
        group: GroupId,
        dim: usize,
        grad: GatherGrad,
    ) -> FloatTensor<Self> {
        tracked::<B, C, _>(x, Gather, (group, dim, grad), |x| {
            B::coll_gather(x, group, dim, grad)
        })
    }

    fn coll_reduce_scatter(x: FloatTensor<Self>, group: GroupId, dim: usize) -> FloatTensor<Self> {
        tracked::<B, C, _>(x, ReduceScatter, (group, dim), |x| {
            B::coll_reduce_scatter(x, group, dim)
        })
    }

    fn coll_gather_v(
        x: FloatTensor<Self>,
        group: GroupId,
        counts: Vec<usize>,
    ) -> FloatTensor<Self> {
        let state = (group, counts.clone());
        tracked::<B, C, _>(x, GatherV, state, |x| B::coll_gather_v(x, group, counts))
    }

    fn coll_reduce_scatter_v(
        x: FloatTensor<Self>,
        group: GroupId,
        counts: Vec<usize>,
    ) -> FloatTensor<Self> {
        let state = (group, counts.clone());
        tracked::<B, C, _>(x, ReduceScatterV, state, |x| {
            B::coll_reduce_scatter_v(x, group, counts)
        })
    }

    fn coll_all_to_all_v(
        x: FloatTensor<Self>,
        group: GroupId,
        send_counts: Vec<usize>,
        recv_counts: Vec<usize>,
    ) -> FloatTensor<Self> {
        let state = (group, send_counts.clone(), recv_counts.clone());
        tracked::<B, C, _>(x, AllToAllV, state, |x| {
            B::coll_all_to_all_v(x, group, send_counts, recv_counts)
        })
    }
}
