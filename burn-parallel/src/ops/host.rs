//! The forward operations for a concrete backend: the exchanging collectives staged through
//! host memory (the values read from the tensor handed to the communicator as they are), or on
//! the device where the backend and the engine allow it ([`OnDevice`]); the split (this rank's
//! chunk) cut on the tensor's own device.

use burn::backend::{Backend, TensorMetadata, tensor::FloatTensor};
use burn::tensor::{DType, Shape, Slice, TensorData};
use half::bf16;

use super::{GatherGrad, ParallelBackend};
use crate::comm::{Buffer, Collective, Communicator, ReduceOp, check_counts, narrow, widen};
use crate::error::{ParallelError, Result};
use crate::group::{GroupId, check_id, lookup, record_failure};

/// A tensor's data (read to the host by the caller, who counts it) as values in its own type:
/// f32 or bf16, any other type is an error. `context` names the read in a backend error.
pub(crate) fn buffer_from_data(data: TensorData, context: &'static str) -> Result<Buffer> {
    let backend = |e| backend_error(context, e);
    match data.dtype() {
        DType::F32 => Ok(Buffer::F32(data.try_into_vec::<f32>().map_err(backend)?)),
        DType::BF16 => Ok(Buffer::Bf16(data.try_into_vec::<bf16>().map_err(backend)?)),
        other => Err(ParallelError::InvalidArgument {
            name: "tensor",
            reason: format!("collectives take f32 or bf16 tensors, got {other:?}"),
        }),
    }
}

/// Values as tensor data of `shape`, in their own type (to be uploaded, and counted, by the
/// caller).
pub(crate) fn buffer_into_data(values: Buffer, shape: impl Into<Shape>) -> TensorData {
    match values {
        Buffer::F32(v) => TensorData::new(v, shape),
        Buffer::Bf16(v) => TensorData::new(v, shape),
    }
}

fn read<B: Backend>(x: FloatTensor<B>, op: &'static str) -> Result<Buffer> {
    crate::transfers::read(op, (x.shape().num_elements() * x.dtype().size()) as u64);
    let data = burn::tensor::try_read_sync(B::float_into_data(x))
        .ok_or_else(|| backend_error("read", "cannot block on this platform"))?
        .map_err(|e| backend_error("read", e))?;
    buffer_from_data(data, "read")
}

fn write<B: Backend>(
    values: Buffer,
    (shape, op): (Shape, &'static str),
    device: &B::Device,
) -> FloatTensor<B> {
    let data = buffer_into_data(values, shape);
    crate::transfers::upload(op, data.bytes().len() as u64);
    B::float_from_data(data, device)
}

fn backend_error(context: &'static str, e: impl std::fmt::Debug) -> ParallelError {
    ParallelError::Backend {
        context,
        reason: format!("{e:?}"),
    }
}

/// The host-side exchange of a validated collective.
type Exchange = Box<dyn FnOnce(&dyn Communicator, Buffer) -> Result<Buffer>>;

/// The same collective on the flattened (row-major, contiguous) tensor, for engines that work
/// on device memory. Counts are in elements.
#[derive(Debug, Clone)]
pub(crate) enum Flat {
    /// All-reduce of every element.
    AllReduce(ReduceOp),
    /// All-gather along a dimension: the input viewed as `[pre, n, post]`; the gathered
    /// rank-major blocks are interleaved back into `[pre, n · size, post]`.
    AllGather { pre: usize, n: usize, post: usize },
    /// Reduce-scatter (sum) along a dimension: the input viewed as `[pre, n · size, post]`,
    /// cut into rank-major blocks of `[pre, n, post]`.
    ReduceScatter { pre: usize, n: usize, post: usize },
    /// All-gather of `counts[p]` elements from rank `p`.
    AllGatherV { counts: Vec<usize> },
    /// Reduce-scatter (sum) of blocks of `counts[p]` elements.
    ReduceScatterV { counts: Vec<usize> },
    /// All-to-all-v with these element counts.
    AllToAllV { send: Vec<usize>, recv: Vec<usize> },
}

/// A backend whose tensors some engines can exchange in place on the device (CUDA tensors on
/// an NCCL group); the default stages every exchange through the host.
pub(super) trait OnDevice: Backend {
    /// `flat` (the collective `op`) on `x`'s device memory, or `x` back when its device and
    /// `comm` do not allow it.
    fn on_device(
        x: FloatTensor<Self>,
        comm: &dyn Communicator,
        (flat, op): (&Flat, &'static str),
        out: &Shape,
    ) -> std::result::Result<Result<FloatTensor<Self>>, FloatTensor<Self>> {
        if !flat_on_host() {
            return Err(x);
        }
        let g = comm.size();
        Ok(flat_exchange::<Self>(x, g, flat, out, |x| {
            let device = x.device();
            let values = flat.host(comm, read::<Self>(x, op)?)?;
            let len = values.len();
            Ok(write::<Self>(values, (Shape::new([len]), op), &device))
        }))
    }
}

/// Environment variable that makes the backends without a device engine run the tensor
/// collectives the way the device engines do (flattened buffers, the reorders of a gather or
/// reduce-scatter along an inner dimension as tensor operations, the flat exchange through the
/// host communicator): the device path's plumbing, checked on CPU ranks.
pub const FLAT_ENV: &str = "BURN_PARALLEL_FLAT_COLLECTIVES";

fn flat_on_host() -> bool {
    static FLAT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FLAT.get_or_init(|| std::env::var(FLAT_ENV).is_ok_and(|v| v == "1"))
}

#[cfg(feature = "flex")]
impl OnDevice for burn::backend::Flex {}

#[cfg(any(feature = "cuda", feature = "wgpu"))]
impl OnDevice for burn::backend::Cube {
    #[cfg(feature = "cuda")]
    fn on_device(
        x: FloatTensor<Self>,
        comm: &dyn Communicator,
        (flat, _op): (&Flat, &'static str),
        out: &Shape,
    ) -> std::result::Result<Result<FloatTensor<Self>>, FloatTensor<Self>> {
        let Some((nccl, elem)) = super::device::engine(&x, comm, out) else {
            return Err(x);
        };
        Ok(flat_exchange::<Self>(x, nccl.size(), flat, out, |x| {
            super::device::exchange(x, nccl, flat, elem, out.num_elements())
        }))
    }
}

impl Flat {
    /// The exchange on host values through `comm` (the blocks already rank-major).
    fn host(&self, comm: &dyn Communicator, values: Buffer) -> Result<Buffer> {
        match self {
            Flat::AllReduce(op) => comm.exchange(&Collective::AllReduce(*op), values),
            Flat::AllGather { .. } => comm.exchange(&Collective::AllGather, values),
            Flat::ReduceScatter { .. } => {
                comm.exchange(&Collective::ReduceScatter(ReduceOp::Sum), values)
            }
            Flat::AllGatherV { counts } => {
                comm.exchange(&Collective::AllGatherV(counts.clone()), values)
            }
            Flat::ReduceScatterV { counts } => reduce_scatter_v_host(comm, values, counts),
            Flat::AllToAllV { send, recv } => {
                comm.exchange(&Collective::AllToAllV(send.clone(), recv.clone()), values)
            }
        }
    }
}

/// Reduce-scatter (sum) of blocks of `counts[p]` values on the host: every rank sends rank
/// `p`'s block to `p` (one all-to-all-v) and sums what it receives in f32, in rank order
/// (bf16 rounded once at the end).
fn reduce_scatter_v_host(
    comm: &dyn Communicator,
    values: Buffer,
    counts: &[usize],
) -> Result<Buffer> {
    let mine = counts[comm.rank()];
    let recv = vec![mine; counts.len()];
    let sum = move |received: &[f32]| {
        let mut out = vec![0f32; mine];
        if mine > 0 {
            for block in received.chunks(mine) {
                out.iter_mut().zip(block).for_each(|(o, b)| *o += b);
            }
        }
        out
    };
    Ok(
        match comm.exchange(&Collective::AllToAllV(counts.to_vec(), recv), values)? {
            Buffer::F32(v) => Buffer::F32(sum(&v)),
            Buffer::Bf16(v) => Buffer::Bf16(narrow(&sum(&widen(&v)))),
        },
    )
}

/// `[a, b, c, d]` → `[b, a, c, d]` (a logical permutation; the next reshape lays it out).
fn swap_outer<B: Backend>(x: FloatTensor<B>, dims: [usize; 4]) -> FloatTensor<B> {
    B::float_permute(B::float_reshape(x, Shape::new(dims)), &[1, 0, 2, 3])
}

/// `flat` as the device engines run it: a reduce-scatter along an inner dimension first lays
/// the input out as rank-major blocks, `engine` exchanges the flattened tensor, and an
/// all-gather along an inner dimension interleaves the rank-major blocks back; the reorders
/// are tensor operations on the tensor's device.
fn flat_exchange<B: Backend>(
    x: FloatTensor<B>,
    g: usize,
    flat: &Flat,
    out_shape: &Shape,
    engine: impl FnOnce(FloatTensor<B>) -> Result<FloatTensor<B>>,
) -> Result<FloatTensor<B>> {
    let total = x.shape().num_elements();
    let x = match *flat {
        Flat::ReduceScatter { pre, n, post } if pre > 1 => swap_outer::<B>(x, [pre, g, n, post]),
        _ => x,
    };
    let out = engine(B::float_reshape(x, Shape::new([total])))?;
    let out = match *flat {
        Flat::AllGather { pre, n, post } if pre > 1 => swap_outer::<B>(out, [g, pre, n, post]),
        _ => out,
    };
    Ok(B::float_reshape(out, out_shape.clone()))
}

/// NaN of `shape`: what a failed collective returns (never zeros or its input, which would
/// train silently on wrong values).
fn failed<B: Backend>(shape: Shape, device: &B::Device, dtype: DType) -> FloatTensor<B> {
    B::float_full(shape, f64::NAN.into(), device, dtype.into())
}

/// Validates the call with `plan` (given the group's communicator and the input shape, it
/// returns the output shape, the host exchange and the same exchange on flat buffers), then
/// runs it on the tensor's device memory where the backend and the engine allow it
/// ([`OnDevice`]), on host memory otherwise.
/// Backend operations cannot return errors: a failure marks the group as failed in `op` (see
/// [`crate::group`]) and returns NaN (of the input's shape when the call was invalid, of the
/// output's when the exchange failed). A group that failed before runs no exchange again.
fn run<B: OnDevice>(
    x: FloatTensor<B>,
    group: GroupId,
    op: &'static str,
    plan: impl FnOnce(&dyn Communicator, &Shape) -> Result<(Shape, Exchange, Flat)>,
) -> FloatTensor<B> {
    let (shape, device, dtype) = (x.shape(), x.device(), x.dtype());
    let planned = lookup(group).and_then(|comm| {
        let p = plan(comm.as_ref(), &shape)?;
        Ok((comm, p))
    });
    let (comm, (out_shape, exchange, flat)) = match planned {
        Ok(p) => p,
        Err(err) => {
            record_failure(group, op, err);
            return failed::<B>(shape, &device, dtype);
        }
    };
    if check_id(group).is_err() {
        return failed::<B>(out_shape, &device, dtype);
    }
    let x = match B::on_device(x, comm.as_ref(), (&flat, op), &out_shape) {
        Ok(Ok(out)) => return out,
        Ok(Err(err)) => {
            record_failure(group, op, err);
            return failed::<B>(out_shape, &device, dtype);
        }
        Err(x) => x,
    };
    let result = read::<B>(x, op).and_then(|values| exchange(comm.as_ref(), values));
    match result {
        Ok(values) => write::<B>(values, (out_shape, op), &device),
        Err(err) => {
            record_failure(group, op, err);
            failed::<B>(out_shape, &device, dtype)
        }
    }
}

/// `[pre, n, post]` view of a shape around `dim`.
fn around(shape: &Shape, dim: usize) -> (usize, usize, usize) {
    let dims = shape.as_slice();
    let pre = dims[..dim].iter().product();
    let post = dims[dim + 1..].iter().product();
    (pre, dims[dim], post)
}

fn with_dim(shape: &Shape, dim: usize, n: usize) -> Shape {
    let mut dims = shape.as_slice().to_vec();
    dims[dim] = n;
    Shape::from(dims)
}

fn check_dim(shape: &Shape, dim: usize) -> Result<()> {
    if dim >= shape.num_dims() {
        return Err(ParallelError::InvalidArgument {
            name: "dim",
            reason: format!(
                "{dim} is out of range for a tensor of rank {}",
                shape.num_dims()
            ),
        });
    }
    Ok(())
}

fn chunk_of(shape: &Shape, dim: usize, size: usize) -> Result<usize> {
    check_dim(shape, dim)?;
    let n = shape.as_slice()[dim];
    if !n.is_multiple_of(size) {
        return Err(ParallelError::InvalidArgument {
            name: "dim",
            reason: format!("size {n} of dim {dim} is not divisible by the group size {size}"),
        });
    }
    Ok(n / size)
}

/// Rows `[pre, n·g, post]` ⇄ rank-major blocks `g × [pre, n, post]`.
fn to_blocks<T: Copy>(v: &[T], pre: usize, n: usize, post: usize, g: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(v.len());
    for r in 0..g {
        for p in 0..pre {
            let start = (p * n * g + r * n) * post;
            out.extend_from_slice(&v[start..start + n * post]);
        }
    }
    out
}

fn from_blocks<T: Copy>(v: &[T], pre: usize, n: usize, post: usize, g: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(v.len());
    for p in 0..pre {
        for r in 0..g {
            let start = (r * pre + p) * n * post;
            out.extend_from_slice(&v[start..start + n * post]);
        }
    }
    out
}

/// [`to_blocks`] on either type (no copy for `pre` = 1, where it is the identity).
fn to_blocks_buf(b: Buffer, (pre, n, post, g): (usize, usize, usize, usize)) -> Buffer {
    match b {
        b if pre == 1 => b,
        Buffer::F32(v) => Buffer::F32(to_blocks(&v, pre, n, post, g)),
        Buffer::Bf16(v) => Buffer::Bf16(to_blocks(&v, pre, n, post, g)),
    }
}

/// [`from_blocks`] on either type (no copy for `pre` = 1).
fn from_blocks_buf(b: Buffer, (pre, n, post, g): (usize, usize, usize, usize)) -> Buffer {
    match b {
        b if pre == 1 => b,
        Buffer::F32(v) => Buffer::F32(from_blocks(&v, pre, n, post, g)),
        Buffer::Bf16(v) => Buffer::Bf16(from_blocks(&v, pre, n, post, g)),
    }
}

fn row_shape(shape: &Shape) -> (usize, usize) {
    let rows = shape.as_slice().first().copied().unwrap_or(0);
    let row_len = shape.as_slice().iter().skip(1).product();
    (rows, row_len)
}

fn invalid(name: &'static str, reason: String) -> ParallelError {
    ParallelError::InvalidArgument { name, reason }
}

pub(super) fn all_reduce<B: OnDevice>(
    x: FloatTensor<B>,
    group: GroupId,
    op: ReduceOp,
) -> FloatTensor<B> {
    run::<B>(x, group, "all_reduce", |_, shape| {
        let exchange: Exchange =
            Box::new(move |comm, v| comm.exchange(&Collective::AllReduce(op), v));
        Ok((shape.clone(), exchange, Flat::AllReduce(op)))
    })
}

/// This rank's chunk of `dim`, cut on the tensor's own device: nothing is exchanged, so nothing
/// crosses to the host. Failures (an unknown or failed group, a size that does not divide)
/// are recorded and give NaN, as the exchanging collectives do.
pub(super) fn split<B: Backend>(x: FloatTensor<B>, group: GroupId, dim: usize) -> FloatTensor<B> {
    let (shape, device, dtype) = (x.shape(), x.device(), x.dtype());
    let planned = lookup(group).and_then(|comm| {
        let n = chunk_of(&shape, dim, comm.size())?;
        Ok((n, comm.rank()))
    });
    let (n, r) = match planned {
        Ok(p) => p,
        Err(err) => {
            record_failure(group, "split", err);
            return failed::<B>(shape, &device, dtype);
        }
    };
    let out_shape = with_dim(&shape, dim, n);
    if check_id(group).is_err() {
        return failed::<B>(out_shape, &device, dtype);
    }
    let slices: Vec<Slice> = (0..shape.num_dims())
        .map(|d| {
            if d == dim {
                Slice::new((r * n) as isize, Some(((r + 1) * n) as isize), 1)
            } else {
                Slice::full()
            }
        })
        .collect();
    B::float_slice(x, &slices)
}

pub(super) fn gather<B: OnDevice>(x: FloatTensor<B>, group: GroupId, dim: usize) -> FloatTensor<B> {
    run::<B>(x, group, "all_gather", |comm, shape| {
        check_dim(shape, dim)?;
        let g = comm.size();
        let (pre, n, post) = around(shape, dim);
        let exchange: Exchange = Box::new(move |comm, v| {
            let gathered = comm.exchange(&Collective::AllGather, v)?;
            Ok(from_blocks_buf(gathered, (pre, n, post, g)))
        });
        let flat = Flat::AllGather { pre, n, post };
        Ok((with_dim(shape, dim, n * g), exchange, flat))
    })
}

pub(super) fn reduce_scatter<B: OnDevice>(
    x: FloatTensor<B>,
    group: GroupId,
    dim: usize,
) -> FloatTensor<B> {
    run::<B>(x, group, "reduce_scatter", |comm, shape| {
        let g = comm.size();
        let n = chunk_of(shape, dim, g)?;
        let (pre, _, post) = around(shape, dim);
        let exchange: Exchange = Box::new(move |comm, v| {
            let blocks = to_blocks_buf(v, (pre, n, post, g));
            comm.exchange(&Collective::ReduceScatter(ReduceOp::Sum), blocks)
        });
        let flat = Flat::ReduceScatter { pre, n, post };
        Ok((with_dim(shape, dim, n), exchange, flat))
    })
}

pub(super) fn all_to_all_v<B: OnDevice>(
    x: FloatTensor<B>,
    group: GroupId,
    send_counts: &[usize],
    recv_counts: &[usize],
) -> FloatTensor<B> {
    run::<B>(x, group, "all_to_all_v", |_, shape| {
        let (rows, row_len) = row_shape(shape);
        let sent: usize = send_counts.iter().sum();
        if sent != rows {
            return Err(invalid(
                "send_counts",
                format!("sum to {sent} rows but the tensor has {rows}"),
            ));
        }
        let received: usize = recv_counts.iter().sum();
        let scale = |c: &[usize]| c.iter().map(|n| n * row_len).collect::<Vec<_>>();
        let (sc, rc) = (scale(send_counts), scale(recv_counts));
        let flat = Flat::AllToAllV {
            send: sc.clone(),
            recv: rc.clone(),
        };
        let exchange: Exchange =
            Box::new(move |comm, v| comm.exchange(&Collective::AllToAllV(sc, rc), v));
        Ok((with_dim(shape, 0, received), exchange, flat))
    })
}

pub(super) fn gather_v<B: OnDevice>(
    x: FloatTensor<B>,
    group: GroupId,
    counts: &[usize],
) -> FloatTensor<B> {
    run::<B>(x, group, "all_gather_v", |comm, shape| {
        let (rows, row_len) = row_shape(shape);
        check_counts("counts", counts, comm.size())?;
        if counts[comm.rank()] != rows {
            return Err(invalid(
                "counts",
                format!(
                    "counts[{}] = {} but this rank has {rows} rows",
                    comm.rank(),
                    counts[comm.rank()]
                ),
            ));
        }
        let total: usize = counts.iter().sum();
        let scaled: Vec<usize> = counts.iter().map(|n| n * row_len).collect();
        let flat = Flat::AllGatherV {
            counts: scaled.clone(),
        };
        let exchange: Exchange =
            Box::new(move |comm, v| comm.exchange(&Collective::AllGatherV(scaled), v));
        Ok((with_dim(shape, 0, total), exchange, flat))
    })
}

pub(super) fn reduce_scatter_v<B: OnDevice>(
    x: FloatTensor<B>,
    group: GroupId,
    counts: &[usize],
) -> FloatTensor<B> {
    run::<B>(x, group, "reduce_scatter_v", |comm, shape| {
        let (rows, row_len) = row_shape(shape);
        let total = check_counts("counts", counts, comm.size())?;
        if total != rows {
            return Err(invalid(
                "counts",
                format!("sum to {total} rows but the tensor has {rows}"),
            ));
        }
        // Every rank sends rank p's rows to p and sums what it receives (one all-to-all-v).
        let send: Vec<usize> = counts.iter().map(|n| n * row_len).collect();
        let flat = Flat::ReduceScatterV {
            counts: send.clone(),
        };
        let exchange: Exchange = Box::new(move |comm, v| reduce_scatter_v_host(comm, v, &send));
        Ok((with_dim(shape, 0, counts[comm.rank()]), exchange, flat))
    })
}

/// The forward implementation shared by every concrete backend.
macro_rules! host_parallel_backend {
    ($backend:ty) => {
        impl ParallelBackend for $backend {
            fn coll_all_reduce(
                x: FloatTensor<Self>,
                group: GroupId,
                op: ReduceOp,
            ) -> FloatTensor<Self> {
                all_reduce::<Self>(x, group, op)
            }

            fn coll_copy_to_region(x: FloatTensor<Self>, _group: GroupId) -> FloatTensor<Self> {
                x
            }

            fn coll_reduce_from_region(x: FloatTensor<Self>, group: GroupId) -> FloatTensor<Self> {
                all_reduce::<Self>(x, group, ReduceOp::Sum)
            }

            fn coll_split(x: FloatTensor<Self>, group: GroupId, dim: usize) -> FloatTensor<Self> {
                split::<Self>(x, group, dim)
            }

            fn coll_gather(
                x: FloatTensor<Self>,
                group: GroupId,
                dim: usize,
                _grad: GatherGrad,
            ) -> FloatTensor<Self> {
                gather::<Self>(x, group, dim)
            }

            fn coll_reduce_scatter(
                x: FloatTensor<Self>,
                group: GroupId,
                dim: usize,
            ) -> FloatTensor<Self> {
                reduce_scatter::<Self>(x, group, dim)
            }

            fn coll_gather_v(
                x: FloatTensor<Self>,
                group: GroupId,
                counts: Vec<usize>,
            ) -> FloatTensor<Self> {
                gather_v::<Self>(x, group, &counts)
            }

            fn coll_reduce_scatter_v(
                x: FloatTensor<Self>,
                group: GroupId,
                counts: Vec<usize>,
            ) -> FloatTensor<Self> {
                reduce_scatter_v::<Self>(x, group, &counts)
            }

            fn coll_all_to_all_v(
                x: FloatTensor<Self>,
                group: GroupId,
                send_counts: Vec<usize>,
                recv_counts: Vec<usize>,
            ) -> FloatTensor<Self> {
                all_to_all_v::<Self>(x, group, &send_counts, &recv_counts)
            }
        }
    };
}

#[cfg(feature = "flex")]
host_parallel_backend!(burn::backend::Flex);
#[cfg(any(feature = "cuda", feature = "wgpu"))]
host_parallel_backend!(burn::backend::Cube);
