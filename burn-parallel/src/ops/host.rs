//! The forward operations for a concrete backend, staged through host memory.

use burn::backend::{Backend, TensorMetadata, tensor::FloatTensor};
use burn::tensor::{DType, Shape, TensorData};
use half::bf16;

use super::{GatherGrad, ParallelBackend};
use crate::comm::{Communicator, ReduceOp};
use crate::error::{ParallelError, Result};
use crate::group::{GroupId, lookup, record_error};

/// Host copy of a tensor.
enum Host {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
}

fn read<B: Backend>(x: FloatTensor<B>) -> Result<Host> {
    let dtype = x.dtype();
    let data = burn::tensor::try_read_sync(B::float_into_data(x))
        .ok_or_else(|| backend_error("read", "cannot block on this platform"))?
        .map_err(|e| backend_error("read", e))?;
    match dtype {
        DType::F32 => Ok(Host::F32(
            data.try_into_vec::<f32>()
                .map_err(|e| backend_error("read", e))?,
        )),
        DType::BF16 => Ok(Host::Bf16(
            data.try_into_vec::<bf16>()
                .map_err(|e| backend_error("read", e))?,
        )),
        other => Err(ParallelError::InvalidArgument {
            name: "tensor",
            reason: format!("collectives take f32 or bf16 tensors, got {other:?}"),
        }),
    }
}

fn write<B: Backend>(host: Host, shape: Shape, device: &B::Device) -> FloatTensor<B> {
    let data = match host {
        Host::F32(v) => TensorData::new(v, shape),
        Host::Bf16(v) => TensorData::new(v, shape),
    };
    B::float_from_data(data, device)
}

fn backend_error(context: &'static str, e: impl std::fmt::Debug) -> ParallelError {
    ParallelError::Backend {
        context,
        reason: format!("{e:?}"),
    }
}

/// Runs a host-side collective; on error, parks it and returns zeros of `out_shape`.
fn run<B: Backend>(
    x: FloatTensor<B>,
    out_shape: Shape,
    f: impl FnOnce(&dyn Communicator, Host) -> Result<Host>,
    group: GroupId,
) -> FloatTensor<B> {
    let device = x.device();
    let dtype = x.dtype();
    let result = lookup(group).and_then(|comm| {
        let host = read::<B>(x)?;
        f(comm.as_ref(), host)
    });
    match result {
        Ok(host) => write::<B>(host, out_shape, &device),
        Err(err) => {
            record_error(err);
            B::float_zeros(out_shape, &device, dtype.into())
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

fn slice_chunk<T: Copy>(v: &[T], pre: usize, n: usize, post: usize, g: usize, r: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(pre * n * post);
    for p in 0..pre {
        let start = (p * n * g + r * n) * post;
        out.extend_from_slice(&v[start..start + n * post]);
    }
    out
}

fn map_host(
    host: Host,
    f32_op: impl FnOnce(Vec<f32>) -> Result<Vec<f32>>,
    bf16_op: impl FnOnce(Vec<bf16>) -> Result<Vec<bf16>>,
) -> Result<Host> {
    Ok(match host {
        Host::F32(v) => Host::F32(f32_op(v)?),
        Host::Bf16(v) => Host::Bf16(bf16_op(v)?),
    })
}

pub(super) fn all_reduce<B: Backend>(
    x: FloatTensor<B>,
    group: GroupId,
    op: ReduceOp,
) -> FloatTensor<B> {
    let shape = x.shape();
    run::<B>(
        x,
        shape,
        |comm, host| {
            map_host(
                host,
                |mut v| comm.all_reduce(&mut v, op).map(|()| v),
                |mut v| comm.all_reduce_bf16(&mut v, op).map(|()| v),
            )
        },
        group,
    )
}

pub(super) fn split<B: Backend>(x: FloatTensor<B>, group: GroupId, dim: usize) -> FloatTensor<B> {
    let shape = x.shape();
    let out = (|| {
        let comm = lookup(group)?;
        let n = chunk_of(&shape, dim, comm.size())?;
        Ok((comm.size(), comm.rank(), n))
    })();
    let (g, r, n) = match out {
        Ok(v) => v,
        Err(err) => {
            record_error(err);
            return x;
        }
    };
    let (pre, _, post) = around(&shape, dim);
    run::<B>(
        x,
        with_dim(&shape, dim, n),
        |_, host| {
            map_host(
                host,
                |v| Ok(slice_chunk(&v, pre, n, post, g, r)),
                |v| Ok(slice_chunk(&v, pre, n, post, g, r)),
            )
        },
        group,
    )
}

pub(super) fn gather<B: Backend>(x: FloatTensor<B>, group: GroupId, dim: usize) -> FloatTensor<B> {
    let shape = x.shape();
    let g = match lookup(group).and_then(|c| check_dim(&shape, dim).map(|()| c.size())) {
        Ok(g) => g,
        Err(err) => {
            record_error(err);
            return x;
        }
    };
    let (pre, n, post) = around(&shape, dim);
    run::<B>(
        x,
        with_dim(&shape, dim, n * g),
        |comm, host| {
            map_host(
                host,
                |v| Ok(from_blocks(&comm.all_gather(&v)?, pre, n, post, g)),
                |v| Ok(from_blocks(&comm.all_gather_bf16(&v)?, pre, n, post, g)),
            )
        },
        group,
    )
}

pub(super) fn reduce_scatter<B: Backend>(
    x: FloatTensor<B>,
    group: GroupId,
    dim: usize,
) -> FloatTensor<B> {
    let shape = x.shape();
    let out = (|| {
        let comm = lookup(group)?;
        let n = chunk_of(&shape, dim, comm.size())?;
        Ok((comm.size(), n))
    })();
    let (g, n) = match out {
        Ok(v) => v,
        Err(err) => {
            record_error(err);
            return x;
        }
    };
    let (pre, _, post) = around(&shape, dim);
    run::<B>(
        x,
        with_dim(&shape, dim, n),
        |comm, host| {
            map_host(
                host,
                |v| comm.reduce_scatter(&to_blocks(&v, pre, n, post, g), ReduceOp::Sum),
                |v| comm.reduce_scatter_bf16(&to_blocks(&v, pre, n, post, g), ReduceOp::Sum),
            )
        },
        group,
    )
}

pub(super) fn all_to_all_v<B: Backend>(
    x: FloatTensor<B>,
    group: GroupId,
    send_counts: &[usize],
    recv_counts: &[usize],
) -> FloatTensor<B> {
    let shape = x.shape();
    let rows = shape.as_slice().first().copied().unwrap_or(0);
    let row_len: usize = shape.as_slice().iter().skip(1).product();
    let sent: usize = send_counts.iter().sum();
    let received: usize = recv_counts.iter().sum();
    if sent != rows {
        record_error(ParallelError::InvalidArgument {
            name: "send_counts",
            reason: format!("sum to {sent} rows but the tensor has {rows}"),
        });
        return x;
    }
    let scale = |c: &[usize]| c.iter().map(|n| n * row_len).collect::<Vec<_>>();
    let (sc, rc) = (scale(send_counts), scale(recv_counts));
    run::<B>(
        x,
        with_dim(&shape, 0, received),
        |comm, host| {
            map_host(
                host,
                |v| comm.all_to_all_v(&v, &sc, &rc),
                |v| comm.all_to_all_v_bf16(&v, &sc, &rc),
            )
        },
        group,
    )
}

fn row_shape(shape: &Shape) -> (usize, usize) {
    let rows = shape.as_slice().first().copied().unwrap_or(0);
    let row_len = shape.as_slice().iter().skip(1).product();
    (rows, row_len)
}

fn check_rows(name: &'static str, counts: &[usize], size: usize) -> Result<()> {
    if counts.len() != size {
        return Err(ParallelError::InvalidArgument {
            name,
            reason: format!("has {} entries for a group of {size} ranks", counts.len()),
        });
    }
    Ok(())
}

pub(super) fn gather_v<B: Backend>(
    x: FloatTensor<B>,
    group: GroupId,
    counts: &[usize],
) -> FloatTensor<B> {
    let shape = x.shape();
    let (rows, row_len) = row_shape(&shape);
    let checked = lookup(group).and_then(|c| {
        check_rows("counts", counts, c.size())?;
        if counts[c.rank()] != rows {
            return Err(ParallelError::InvalidArgument {
                name: "counts",
                reason: format!(
                    "counts[{}] = {} but this rank has {rows} rows",
                    c.rank(),
                    counts[c.rank()]
                ),
            });
        }
        Ok(())
    });
    if let Err(err) = checked {
        record_error(err);
        return x;
    }
    let total: usize = counts.iter().sum();
    let scaled: Vec<usize> = counts.iter().map(|n| n * row_len).collect();
    run::<B>(
        x,
        with_dim(&shape, 0, total),
        |comm, host| {
            map_host(
                host,
                |v| comm.all_gather_v(&v, &scaled),
                |v| {
                    let wide: Vec<f32> = v.iter().map(|b| b.to_f32()).collect();
                    let out = comm.all_gather_v(&wide, &scaled)?;
                    Ok(out.into_iter().map(bf16::from_f32).collect())
                },
            )
        },
        group,
    )
}

pub(super) fn reduce_scatter_v<B: Backend>(
    x: FloatTensor<B>,
    group: GroupId,
    counts: &[usize],
) -> FloatTensor<B> {
    let shape = x.shape();
    let (rows, row_len) = row_shape(&shape);
    let total: usize = counts.iter().sum();
    let checked = lookup(group).and_then(|c| {
        check_rows("counts", counts, c.size())?;
        if total != rows {
            return Err(ParallelError::InvalidArgument {
                name: "counts",
                reason: format!("sum to {total} rows but the tensor has {rows}"),
            });
        }
        Ok(c.rank())
    });
    let me = match checked {
        Ok(r) => r,
        Err(err) => {
            record_error(err);
            return x;
        }
    };
    // Every rank sends rank p's rows to p and sums what it receives (one all-to-all-v).
    let g = counts.len();
    let send: Vec<usize> = counts.iter().map(|n| n * row_len).collect();
    let mine = counts[me] * row_len;
    let recv = vec![mine; g];
    let sum_blocks = |v: Vec<f32>| -> Vec<f32> {
        let mut out = vec![0f32; mine];
        for block in v.chunks(mine.max(1)).take(if mine == 0 { 0 } else { g }) {
            for (o, b) in out.iter_mut().zip(block) {
                *o += b;
            }
        }
        out
    };
    run::<B>(
        x,
        with_dim(&shape, 0, counts[me]),
        |comm, host| {
            map_host(
                host,
                |v| Ok(sum_blocks(comm.all_to_all_v(&v, &send, &recv)?)),
                |v| {
                    let wide: Vec<f32> = v.iter().map(|b| b.to_f32()).collect();
                    let out = sum_blocks(comm.all_to_all_v(&wide, &send, &recv)?);
                    Ok(out.into_iter().map(bf16::from_f32).collect())
                },
            )
        },
        group,
    )
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
#[cfg(feature = "cuda")]
host_parallel_backend!(burn::backend::Cube);
