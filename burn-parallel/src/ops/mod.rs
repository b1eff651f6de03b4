//! `ParallelBackend`: collectives on tensors as a Burn backend extension.
//!
//! The exchanging forward operations run on every backend listed below by staging through host
//! memory and the group's [`Communicator`](crate::comm::Communicator) (on CUDA tensors of an
//! NCCL group: on the device, below); the split, which
//! exchanges nothing, slices on the tensor's own device; the `Autodiff` implementation adds the
//! backward rules of Megatron-Core's `tensor_parallel/mappings.py` (each mapping's gradient is its
//! conjugate). Use the functions of [`crate::mappings`]; they return `Result`.
//!
//! On CUDA tensors whose group is an NCCL communicator on the tensor's GPU (feature `cuda`),
//! the exchanging operations run on the tensor's device memory instead: no byte of the tensor
//! crosses to the host, and bf16 travels as bf16. With [`FLAT_ENV`] set to `1`, the other
//! backends run them the way that path does (flattened buffers, the reorders of a gather or
//! reduce-scatter along an inner dimension as tensor operations) through the host
//! communicator, which checks that path's plumbing on CPU ranks.
//!
//! Backend operations cannot return errors: a failed collective marks its group as failed (see
//! [`crate::group`]) and returns NaN of the output's shape.

mod autodiff;
#[cfg(feature = "cuda")]
mod device;
mod host;

pub use host::FLAT_ENV;
pub(crate) use host::{buffer_from_data, buffer_into_data};

use burn::backend::{Backend, backend_extension, tensor::FloatTensor};

use crate::comm::ReduceOp;
use crate::group::GroupId;

/// How the backward pass of an all-gather treats the incoming gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GatherGrad {
    /// Keep this rank's slice (the output is consumed identically on every rank).
    Split,
    /// Reduce-scatter the gradient (each rank consumed the output differently, as the input of a
    /// tensor-parallel layer under sequence parallelism).
    ReduceScatter,
}

/// Collectives on tensors with Megatron's conjugate autodiff rules.
#[backend_extension(Flex: cfg(feature = "flex"), Cube: cfg(any(feature = "cuda", feature = "wgpu")), Autodiff)]
pub trait ParallelBackend: Backend {
    /// All-reduce, not differentiable (the output is a constant for autodiff).
    fn coll_all_reduce(x: FloatTensor<Self>, group: GroupId, op: ReduceOp) -> FloatTensor<Self>;

    /// Identity forward, all-reduce (sum) backward: Megatron's `copy_to_tensor_model_parallel_region`.
    fn coll_copy_to_region(x: FloatTensor<Self>, group: GroupId) -> FloatTensor<Self>;

    /// All-reduce (sum) forward, identity backward: `reduce_from_tensor_model_parallel_region`.
    fn coll_reduce_from_region(x: FloatTensor<Self>, group: GroupId) -> FloatTensor<Self>;

    /// Keeps this rank's chunk of `dim`; backward all-gathers along `dim`.
    fn coll_split(x: FloatTensor<Self>, group: GroupId, dim: usize) -> FloatTensor<Self>;

    /// All-gathers along `dim`; backward keeps this rank's slice or reduce-scatters (see
    /// [`GatherGrad`]).
    fn coll_gather(
        x: FloatTensor<Self>,
        group: GroupId,
        dim: usize,
        grad: GatherGrad,
    ) -> FloatTensor<Self>;

    /// Reduce-scatter (sum) along `dim`; backward all-gathers along `dim`.
    fn coll_reduce_scatter(x: FloatTensor<Self>, group: GroupId, dim: usize) -> FloatTensor<Self>;

    /// All-gather of rows (dim 0) with uneven counts (`counts[p]` rows from rank `p`);
    /// backward reduce-scatters the gradient back to each rank's rows.
    fn coll_gather_v(x: FloatTensor<Self>, group: GroupId, counts: Vec<usize>)
    -> FloatTensor<Self>;

    /// Reduce-scatter (sum) of rows with uneven counts: every rank holds `Σ counts` rows and
    /// keeps the sum of its `counts[rank]` rows; backward all-gathers with the same counts.
    fn coll_reduce_scatter_v(
        x: FloatTensor<Self>,
        group: GroupId,
        counts: Vec<usize>,
    ) -> FloatTensor<Self>;

    /// All-to-all-v of the rows (dim 0): `send_counts[p]` rows go to peer `p`, `recv_counts[p]`
    /// rows come from it. Backward is the reverse all-to-all-v.
    fn coll_all_to_all_v(
        x: FloatTensor<Self>,
        group: GroupId,
        send_counts: Vec<usize>,
        recv_counts: Vec<usize>,
    ) -> FloatTensor<Self>;
}
