//! The exchanging collectives on a CUDA tensor's device memory, when its group is an NCCL
//! communicator on the tensor's GPU: no byte of the tensor crosses to the host.
//!
//! `host::flat_exchange` lays the input out (a rank-major copy for a gather or reduce-scatter
//! along an inner dimension, as tensor operations); here it is made contiguous, CubeCL's queued work is waited for (the one synchronisation: NCCL runs on
//! the communicator's own stream, which CubeCL's streams cannot be ordered against from
//! here), NCCL runs on the two buffers' addresses, and its stream is drained before the output
//! tensor is handed back to CubeCL.

// Device addresses handed to NCCL: each `unsafe` block states what it relies on.
#![allow(unsafe_code)]

use burn::backend::{DType, TensorMetadata};
use burn::tensor::Shape;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::cuda::CudaRuntime;
use cubecl_runtime::runtime::Runtime;

use super::host::Flat;
use crate::comm::Communicator;
use crate::comm::nccl::{DeviceBuffers, Elem, NcclComm};
use crate::error::{ParallelError, Result};

type CudaServer = <CudaRuntime as Runtime>::Server;

fn backend_error(context: &'static str, e: impl std::fmt::Debug) -> ParallelError {
    ParallelError::Backend {
        context,
        reason: format!("{e:?}"),
    }
}

/// The NCCL communicator and element type to exchange `x` with on its device memory: `x` is
/// a non-empty f32 or bf16 CUDA tensor on the GPU of `comm`, an NCCL group. `None` sends it
/// to the host path.
pub(super) fn engine<'a>(
    x: &CubeTensor,
    comm: &'a dyn Communicator,
    out_shape: &Shape,
) -> Option<(&'a NcclComm, Elem)> {
    let nccl = comm.nccl()?;
    let elem = match x.dtype {
        DType::F32 => Elem::F32,
        DType::BF16 => Elem::Bf16,
        _ => return None,
    };
    let on_its_gpu = matches!(&x.device, cubecl::Device::Cuda(d) if d.index == nccl.device());
    let empty = x.shape().num_elements() == 0 || out_shape.num_elements() == 0;
    (on_its_gpu && !empty).then_some((nccl, elem))
}

/// `flat` on the flattened tensor `x` (see `host::flat_exchange` for the reorders around
/// it): NCCL on the input's and a new `out_len`-element output's device memory.
pub(super) fn exchange(
    x: CubeTensor,
    nccl: &NcclComm,
    flat: &Flat,
    elem: Elem,
    out_len: usize,
) -> Result<CubeTensor> {
    let g = nccl.size();
    let total = x.shape().num_elements();
    let x = if x.is_contiguous() {
        x
    } else {
        into_contiguous(x)
    };
    let out = empty_device_dtype(
        x.client.clone(),
        x.device.clone(),
        Shape::new([out_len]),
        x.dtype,
    );
    // Everything CubeCL queued (the input's producers) is finished before NCCL reads it.
    burn::tensor::try_read_sync(x.client.sync())
        .ok_or_else(|| backend_error("sync", "cannot block on this platform"))?
        .map_err(|e| backend_error("sync", e))?;
    let src = x
        .client
        .get_resource::<CudaServer>(x.handle.clone())
        .map_err(|e| backend_error("device address", e))?;
    let dst = out
        .client
        .get_resource::<CudaServer>(out.handle.clone())
        .map_err(|e| backend_error("device address", e))?;
    let bufs = DeviceBuffers {
        src: src.resource().ptr,
        dst: dst.resource().ptr,
        keep: Box::new((x.handle.clone(), out.handle.clone())),
    };
    let sum = crate::comm::ReduceOp::Sum;
    // SAFETY: both addresses are CubeCL allocations on the communicator's GPU (checked by
    // `engine`) of the sizes each operation needs (the plan validated the shapes: `x` holds
    // the input, `out` the output's `out_len` elements); their handles travel in `keep` and
    // their resources are held until NCCL returns; the sync above finished every write to
    // the input.
    unsafe {
        match flat {
            Flat::AllReduce(op) => nccl.device_all_reduce(bufs, total, elem, *op),
            Flat::AllGather { .. } => nccl.device_all_gather(bufs, total, elem),
            Flat::ReduceScatter { .. } => nccl.device_reduce_scatter(bufs, total / g, elem, sum),
            Flat::AllGatherV { counts } => nccl.device_all_gather_v(bufs, counts, elem),
            Flat::ReduceScatterV { counts } => {
                nccl.device_reduce_scatter_v(bufs, counts, elem, sum)
            }
            Flat::AllToAllV { send, recv } => nccl.device_all_to_all_v(bufs, send, recv, elem),
        }?;
    }
    drop((src, dst));
    Ok(out)
}
