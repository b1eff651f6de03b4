//! The forward operations for a concrete backend: the exchanging collectives staged through
//! host memory, the split (this rank's chunk) cut on the tensor's own device.

use burn::backend::{Backend, TensorMetadata, tensor::FloatTensor};
use burn::tensor::{DType, Shape, Slice, TensorData};
use half::bf16;

use super::{GatherGrad, ParallelBackend};
use crate::comm::{Communicator, ReduceOp, check_counts, narrow, widen};
use crate::error::{ParallelError, Result};
use crate::group::{GroupId, check_id, lookup, record_failure};

/// A tensor's values on the host in its own type: bf16 travels as bf16 (the communicator's
/// bf16 methods; reductions accumulate in f32 there).
enum Values {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
}

impl Values {
    /// `f` on the f32 values, or on bf16 ones through `g`: the same exchange for either type.
    fn map(
        self,
        f: impl FnOnce(Vec<f32>) -> Result<Vec<f32>>,
        g: impl FnOnce(Vec<bf16>) -> Result<Vec<bf16>>,
    ) -> Result<Self> {
        Ok(match self {
            Self::F32(v) => Self::F32(f(v)?),
            Self::Bf16(v) => Self::Bf16(g(v)?),
        })
    }
}

fn read<B: Backend>(x: FloatTensor<B>, op: &'static str) -> Result<Values> {
    let dtype = x.dtype();
    crate::transfers::read(op, (x.shape().num_elements() * dtype.size()) as u64);
    let data = burn::tensor::try_read_sync(B::float_into_data(x))
        .ok_or_else(|| backend_error("read", "cannot block on this platform"))?
        .map_err(|e| backend_error("read", e))?;
    match dtype {
        DType::F32 => Ok(Values::F32(
            data.try_into_vec::<f32>()
                .map_err(|e| backend_error("read", e))?,
        )),
        DType::BF16 => Ok(Values::Bf16(
            data.try_into_vec::<bf16>()
                .map_err(|e| backend_error("read", e))?,
        )),
        other => Err(ParallelError::InvalidArgument {
            name: "tensor",
            reason: format!("collectives take f32 or bf16 tensors, got {other:?}"),
        }),
    }
}

fn write<B: Backend>(
    values: Values,
    (shape, op): (Shape, &'static str),
    device: &B::Device,
) -> FloatTensor<B> {
    let data = match values {
        Values::F32(v) => {
            crate::transfers::upload(op, (v.len() * 4) as u64);
            TensorData::new(v, shape)
        }
        Values::Bf16(v) => {
            crate::transfers::upload(op, (v.len() * 2) as u64);
            TensorData::new(v, shape)
        }
    };
    B::float_from_data(data, device)
}

fn backend_error(context: &'static str, e: impl std::fmt::Debug) -> ParallelError {
    ParallelError::Backend {
        context,
        reason: format!("{e:?}"),
    }
}

/// The host-side exchange of a validated collective.
type Exchange = Box<dyn FnOnce(&dyn Communicator, Values) -> Result<Values>>;

/// NaN of `shape`: what a failed collective returns (never zeros or its input, which would
/// train silently on wrong values).
fn failed<B: Backend>(shape: Shape, device: &B::Device, dtype: DType) -> FloatTensor<B> {
    B::float_full(shape, f64::NAN.into(), device, dtype.into())
}

/// Validates the call with `plan` (given the group's communicator and the input shape, it
/// returns the output shape and the exchange), then runs the exchange on host memory.
/// Backend operations cannot return errors: a failure marks the group as failed in `op` (see
/// [`crate::group`]) and returns NaN (of the input's shape when the call was invalid, of the
/// output's when the exchange failed). A group that failed before runs no exchange again.
fn run<B: Backend>(
    x: FloatTensor<B>,
    group: GroupId,
    op: &'static str,
    plan: impl FnOnce(&dyn Communicator, &Shape) -> Result<(Shape, Exchange)>,
) -> FloatTensor<B> {
    let (shape, device, dtype) = (x.shape(), x.device(), x.dtype());
    let planned = lookup(group).and_then(|comm| {
        let p = plan(comm.as_ref(), &shape)?;
        Ok((comm, p))
    });
    let (comm, (out_shape, exchange)) = match planned {
        Ok(p) => p,
        Err(err) => {
            record_failure(group, op, err);
            return failed::<B>(shape, &device, dtype);
        }
    };
    if check_id(group).is_err() {
        return failed::<B>(out_shape, &device, dtype);
    }
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

fn row_shape(shape: &Shape) -> (usize, usize) {
    let rows = shape.as_slice().first().copied().unwrap_or(0);
    let row_len = shape.as_slice().iter().skip(1).product();
    (rows, row_len)
}

fn invalid(name: &'static str, reason: String) -> ParallelError {
    ParallelError::InvalidArgument { name, reason }
}

pub(super) fn all_reduce<B: Backend>(
    x: FloatTensor<B>,
    group: GroupId,
    op: ReduceOp,
) -> FloatTensor<B> {
    run::<B>(x, group, "all_reduce", |_, shape| {
        let exchange: Exchange = Box::new(move |comm, v| {
            v.map(
                |mut v| {
                    comm.all_reduce(&mut v, op)?;
                    Ok(v)
                },
                |mut v| {
                    comm.all_reduce_bf16(&mut v, op)?;
                    Ok(v)
                },
            )
        });
        Ok((shape.clone(), exchange))
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

pub(super) fn gather<B: Backend>(x: FloatTensor<B>, group: GroupId, dim: usize) -> FloatTensor<B> {
    run::<B>(x, group, "all_gather", |comm, shape| {
        check_dim(shape, dim)?;
        let g = comm.size();
        let (pre, n, post) = around(shape, dim);
        let exchange: Exchange = Box::new(move |comm, v| {
            v.map(
                |v| Ok(from_blocks(&comm.all_gather(&v)?, pre, n, post, g)),
                |v| Ok(from_blocks(&comm.all_gather_bf16(&v)?, pre, n, post, g)),
            )
        });
        Ok((with_dim(shape, dim, n * g), exchange))
    })
}

pub(super) fn reduce_scatter<B: Backend>(
    x: FloatTensor<B>,
    group: GroupId,
    dim: usize,
) -> FloatTensor<B> {
    run::<B>(x, group, "reduce_scatter", |comm, shape| {
        let g = comm.size();
        let n = chunk_of(shape, dim, g)?;
        let (pre, _, post) = around(shape, dim);
        let exchange: Exchange = Box::new(move |comm, v| {
            v.map(
                |v| comm.reduce_scatter(&to_blocks(&v, pre, n, post, g), ReduceOp::Sum),
                |v| comm.reduce_scatter_bf16(&to_blocks(&v, pre, n, post, g), ReduceOp::Sum),
            )
        });
        Ok((with_dim(shape, dim, n), exchange))
    })
}

pub(super) fn all_to_all_v<B: Backend>(
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
        let exchange: Exchange = Box::new(move |comm, v| {
            v.map(
                |v| comm.all_to_all_v(&v, &sc, &rc),
                |v| comm.all_to_all_v_bf16(&v, &sc, &rc),
            )
        });
        Ok((with_dim(shape, 0, received), exchange))
    })
}

pub(super) fn gather_v<B: Backend>(
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
        let exchange: Exchange = Box::new(move |comm, v| {
            v.map(
                |v| comm.all_gather_v(&v, &scaled),
                |v| comm.all_gather_v_bf16(&v, &scaled),
            )
        });
        Ok((with_dim(shape, 0, total), exchange))
    })
}

pub(super) fn reduce_scatter_v<B: Backend>(
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
        let g = counts.len();
        let send: Vec<usize> = counts.iter().map(|n| n * row_len).collect();
        let mine = counts[comm.rank()] * row_len;
        let recv = vec![mine; g];
        // Summed in f32 (rank order), bf16 rounded once at the end.
        let sum = move |received: &[f32]| {
            let mut out = vec![0f32; mine];
            if mine > 0 {
                for block in received.chunks(mine) {
                    out.iter_mut().zip(block).for_each(|(o, b)| *o += b);
                }
            }
            out
        };
        let exchange: Exchange = Box::new(move |comm, v| {
            v.map(
                |v| Ok(sum(&comm.all_to_all_v(&v, &send, &recv)?)),
                |v| {
                    let received = comm.all_to_all_v_bf16(&v, &send, &recv)?;
                    Ok(narrow(&sum(&widen(&received))))
                },
            )
        });
        Ok((with_dim(shape, 0, counts[comm.rank()]), exchange))
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
