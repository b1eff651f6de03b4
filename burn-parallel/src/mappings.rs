//! Differentiable collectives on tensors: Megatron-Core's tensor-parallel mappings.
//!
//! | function | forward | backward |
//! |---|---|---|
//! | [`copy_to_region`] | identity | all-reduce |
//! | [`reduce_from_region`] | all-reduce | identity |
//! | [`scatter_to_region`] | keep own chunk of the last dim | all-gather last dim |
//! | [`gather_from_region`] | all-gather last dim | keep own chunk |
//! | [`scatter_to_sequence_region`] | keep own chunk of dim 0 | all-gather dim 0 |
//! | [`gather_from_sequence_region`] | all-gather dim 0 | reduce-scatter dim 0 (or keep own chunk) |
//! | [`reduce_scatter_to_sequence_region`] | reduce-scatter dim 0 | all-gather dim 0 |
//! | [`gather_rows_v`] | all-gather-v of rows | reduce-scatter-v of rows |
//! | [`reduce_scatter_rows_v`] | reduce-scatter-v of rows | all-gather-v of rows |
//! | [`all_to_all_v`] | all-to-all-v of rows | the reverse all-to-all-v |
//!
//! [`all_reduce`] is the non-differentiable all-reduce (sum, mean or max).
//! Groups of one rank skip the host round trip. A collective that failed in the backward pass
//! left NaN in the gradients and marked its group: the next call on that group returns the
//! error, and so does [`crate::group::check`] (see [`crate::group`]).

use burn::backend::Dispatch;
use burn::tensor::Tensor;

use crate::comm::{ReduceOp, check_counts};
use crate::error::{ParallelError, Result};
use crate::group::{Group, check_group};
use crate::ops::{GatherGrad, ParallelBackend};

fn apply<const D: usize>(
    x: Tensor<D>,
    group: &Group,
    op: impl FnOnce(
        <Dispatch as burn::backend::BackendTypes>::FloatTensorPrimitive,
    ) -> <Dispatch as burn::backend::BackendTypes>::FloatTensorPrimitive,
) -> Result<Tensor<D>> {
    // A group that failed earlier (in a forward or a backward pass) is refused; a failure of
    // this call is returned at once.
    check_group(group)?;
    let out = Tensor::from_dispatch(op(x.into_dispatch()));
    check_group(group)?;
    Ok(out)
}

fn last_dim<const D: usize>(name: &'static str) -> Result<usize> {
    if D == 0 {
        return Err(ParallelError::InvalidArgument {
            name,
            reason: "a tensor of rank 0 has no dimension to split".into(),
        });
    }
    Ok(D - 1)
}

fn divisible<const D: usize>(x: &Tensor<D>, dim: usize, group: &Group) -> Result<()> {
    let n = x.dims()[dim];
    if !n.is_multiple_of(group.size()) {
        return Err(ParallelError::InvalidArgument {
            name: "x",
            reason: format!(
                "size {n} of dim {dim} is not divisible by the group size {}",
                group.size()
            ),
        });
    }
    Ok(())
}

/// Non-differentiable all-reduce.
pub fn all_reduce<const D: usize>(x: Tensor<D>, group: &Group, op: ReduceOp) -> Result<Tensor<D>> {
    if group.size() == 1 {
        return Ok(x.detach());
    }
    let id = group.id();
    apply(x, group, |x| {
        <Dispatch as ParallelBackend>::coll_all_reduce(x, id, op)
    })
}

/// Identity forward, all-reduce backward (the input of a column-parallel layer).
pub fn copy_to_region<const D: usize>(x: Tensor<D>, group: &Group) -> Result<Tensor<D>> {
    if group.size() == 1 {
        return Ok(x);
    }
    let id = group.id();
    apply(x, group, |x| {
        <Dispatch as ParallelBackend>::coll_copy_to_region(x, id)
    })
}

/// All-reduce forward, identity backward (the output of a row-parallel layer).
pub fn reduce_from_region<const D: usize>(x: Tensor<D>, group: &Group) -> Result<Tensor<D>> {
    if group.size() == 1 {
        return Ok(x);
    }
    let id = group.id();
    apply(x, group, |x| {
        <Dispatch as ParallelBackend>::coll_reduce_from_region(x, id)
    })
}

/// Keeps this rank's chunk of the last dimension; backward all-gathers it.
pub fn scatter_to_region<const D: usize>(x: Tensor<D>, group: &Group) -> Result<Tensor<D>> {
    split_dim(x, group, last_dim::<D>("x")?)
}

/// All-gathers the last dimension; backward keeps this rank's chunk.
pub fn gather_from_region<const D: usize>(x: Tensor<D>, group: &Group) -> Result<Tensor<D>> {
    gather_dim(x, group, last_dim::<D>("x")?, GatherGrad::Split)
}

/// Keeps this rank's chunk of dim 0 (the sequence); backward all-gathers it.
pub fn scatter_to_sequence_region<const D: usize>(
    x: Tensor<D>,
    group: &Group,
) -> Result<Tensor<D>> {
    split_dim(x, group, 0)
}

/// All-gathers dim 0 (the sequence). With `grad = ReduceScatter` (the input of a
/// tensor-parallel layer under sequence parallelism) the backward reduce-scatters, otherwise it
/// keeps this rank's chunk.
pub fn gather_from_sequence_region<const D: usize>(
    x: Tensor<D>,
    group: &Group,
    grad: GatherGrad,
) -> Result<Tensor<D>> {
    gather_dim(x, group, 0, grad)
}

/// Reduce-scatters dim 0 (the output of a row-parallel layer under sequence parallelism);
/// backward all-gathers.
pub fn reduce_scatter_to_sequence_region<const D: usize>(
    x: Tensor<D>,
    group: &Group,
) -> Result<Tensor<D>> {
    if group.size() == 1 {
        return Ok(x);
    }
    divisible(&x, 0, group)?;
    let id = group.id();
    apply(x, group, |x| {
        <Dispatch as ParallelBackend>::coll_reduce_scatter(x, id, 0)
    })
}

/// Keeps this rank's chunk of `dim`; backward all-gathers.
pub fn split_dim<const D: usize>(x: Tensor<D>, group: &Group, dim: usize) -> Result<Tensor<D>> {
    check_dim::<D>(dim)?;
    if group.size() == 1 {
        return Ok(x);
    }
    divisible(&x, dim, group)?;
    let id = group.id();
    apply(x, group, |x| {
        <Dispatch as ParallelBackend>::coll_split(x, id, dim)
    })
}

/// All-gathers `dim`; backward as `grad` says.
pub fn gather_dim<const D: usize>(
    x: Tensor<D>,
    group: &Group,
    dim: usize,
    grad: GatherGrad,
) -> Result<Tensor<D>> {
    check_dim::<D>(dim)?;
    if group.size() == 1 {
        return Ok(x);
    }
    let id = group.id();
    apply(x, group, |x| {
        <Dispatch as ParallelBackend>::coll_gather(x, id, dim, grad)
    })
}

/// All-gathers rows (dim 0) with uneven counts: rank `p` contributes `counts[p]` rows. Backward:
/// reduce-scatter-v (each rank gets the sum of the gradients of its rows). Megatron's
/// `gather_from_sequence_parallel_region` with `output_split_sizes`.
pub fn gather_rows_v<const D: usize>(
    x: Tensor<D>,
    group: &Group,
    counts: &[usize],
) -> Result<Tensor<D>> {
    check_counts("counts", counts, group.size())?;
    let rows = x.dims().first().copied().unwrap_or(0);
    if counts[group.rank()] != rows {
        return Err(ParallelError::InvalidArgument {
            name: "counts",
            reason: format!(
                "counts[{}] = {} but this rank has {rows} rows",
                group.rank(),
                counts[group.rank()]
            ),
        });
    }
    if group.size() == 1 {
        return Ok(x);
    }
    let (id, counts) = (group.id(), counts.to_vec());
    apply(x, group, |x| {
        <Dispatch as ParallelBackend>::coll_gather_v(x, id, counts)
    })
}

/// Reduce-scatters rows with uneven counts: every rank holds `Σ counts` rows, rank `p` keeps the
/// sum over ranks of rows `counts[..p].sum()..` (`counts[p]` of them). Backward: all-gather-v.
pub fn reduce_scatter_rows_v<const D: usize>(
    x: Tensor<D>,
    group: &Group,
    counts: &[usize],
) -> Result<Tensor<D>> {
    let total = check_counts("counts", counts, group.size())?;
    let rows = x.dims().first().copied().unwrap_or(0);
    if total != rows {
        return Err(ParallelError::InvalidArgument {
            name: "counts",
            reason: format!("sum to {total} rows but the tensor has {rows}"),
        });
    }
    if group.size() == 1 {
        return Ok(x);
    }
    let (id, counts) = (group.id(), counts.to_vec());
    apply(x, group, |x| {
        <Dispatch as ParallelBackend>::coll_reduce_scatter_v(x, id, counts)
    })
}

/// All-to-all-v of rows: `send_counts[p]` rows of `x` (in order) go to peer `p`; the result holds
/// `recv_counts[p]` rows from each peer, in rank order. Backward: the reverse exchange.
pub fn all_to_all_v<const D: usize>(
    x: Tensor<D>,
    group: &Group,
    send_counts: &[usize],
    recv_counts: &[usize],
) -> Result<Tensor<D>> {
    check_counts("send_counts", send_counts, group.size())?;
    check_counts("recv_counts", recv_counts, group.size())?;
    let rows = x.dims().first().copied().unwrap_or(0);
    let sent: usize = send_counts.iter().sum();
    if sent != rows {
        return Err(ParallelError::InvalidArgument {
            name: "send_counts",
            reason: format!("sum to {sent} rows but the tensor has {rows}"),
        });
    }
    if group.size() == 1 {
        if recv_counts[0] != sent {
            return Err(ParallelError::InvalidArgument {
                name: "recv_counts",
                reason: format!("a single rank receives what it sends ({sent} rows)"),
            });
        }
        return Ok(x);
    }
    let id = group.id();
    let (sc, rc) = (send_counts.to_vec(), recv_counts.to_vec());
    apply(x, group, |x| {
        <Dispatch as ParallelBackend>::coll_all_to_all_v(x, id, sc, rc)
    })
}

fn check_dim<const D: usize>(dim: usize) -> Result<()> {
    if dim >= D {
        return Err(ParallelError::InvalidArgument {
            name: "dim",
            reason: format!("{dim} is out of range for a tensor of rank {D}"),
        });
    }
    Ok(())
}
