//! Communicators: one trait, several engines.
//!
//! [`Communicator`] is the interface every collective of this crate goes through. Engines:
//! - [`SingleRank`]: the default; a world of one, no system packages.
//! - [`Detached`]: another rank's place in a group, for laying out its share of a model; it
//!   cannot communicate.
//! - [`InOrder`]: another communicator whose point-to-point messages are matched by their
//!   order per peer, as NCCL matches them (a CPU check that a schedule runs on NCCL).
//! - `Mpi` (feature `mpi`): OpenMPI through the `mpi` crate, for multi-process CPU runs.
//! - `Nccl` (feature `cuda`): NCCL through `cudarc`, for NVIDIA GPUs.
//!
//! Buffers are host slices of `f32`; `bf16` goes through the provided `*_bf16` methods, which
//! move data exactly (bf16 → f32 is lossless) and accumulate reductions in f32.
//! Every blocking call of a multi-rank engine has a timeout and returns a typed error; a lost
//! peer is reported by world rank, never a hang.

mod detached;
mod in_order;
mod single;
#[cfg(any(feature = "mpi", feature = "nccl"))]
mod worker;

#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use half::bf16;

use crate::error::{ParallelError, Result};

pub use detached::Detached;
pub use in_order::InOrder;
pub use single::SingleRank;

/// Environment variable overriding the timeout of multi-rank engines, in seconds.
pub const TIMEOUT_ENV: &str = "BURN_PARALLEL_TIMEOUT_S";

/// Default timeout of every blocking call of a multi-rank engine (NCCL's default is 10 minutes).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// [`DEFAULT_TIMEOUT`], or the value of `BURN_PARALLEL_TIMEOUT_S` when set.
pub fn timeout_from_env() -> Result<Duration> {
    match std::env::var(TIMEOUT_ENV) {
        Err(_) => Ok(DEFAULT_TIMEOUT),
        Ok(value) => parse_timeout(&value),
    }
}

/// Parses a timeout in seconds (a positive, finite number; fractions allowed).
pub fn parse_timeout(value: &str) -> Result<Duration> {
    value
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(Duration::from_secs_f64)
        .ok_or(ParallelError::InvalidArgument {
            name: TIMEOUT_ENV,
            reason: format!("`{value}` is not a positive number of seconds"),
        })
}

/// Reduction operator of all-reduce and reduce-scatter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    /// Sum over ranks.
    Sum,
    /// Mean over ranks (sum, then divided by the group size).
    Avg,
    /// Element-wise maximum.
    Max,
}

/// A group of ranks and the collectives over it.
///
/// Ranks are positions in this group (`0..size()`); [`Communicator::world_ranks`] maps them to
/// world ranks. All members must call the same collectives in the same order.
pub trait Communicator: Send + Sync + Debug {
    /// Name of the engine (`single`, `mpi`, `nccl`).
    fn engine(&self) -> &'static str;
    /// This process's rank in the group.
    fn rank(&self) -> usize;
    /// Number of ranks in the group.
    fn size(&self) -> usize;
    /// World ranks of the members, indexed by group rank.
    fn world_ranks(&self) -> &[usize];

    /// Collective: splits the group. Members with the same `color` form a new group, ordered by
    /// `key` (ties by current rank); `None` opts out and returns `None`.
    fn split(&self, color: Option<u32>, key: u32) -> Result<Option<Arc<dyn Communicator>>>;

    /// In-place all-reduce.
    fn all_reduce(&self, buf: &mut [f32], op: ReduceOp) -> Result<()>;
    /// All-gather of equal-sized contributions, concatenated in rank order.
    fn all_gather(&self, send: &[f32]) -> Result<Vec<f32>>;
    /// All-gather of contributions whose sizes are `counts[rank]`.
    fn all_gather_v(&self, send: &[f32], counts: &[usize]) -> Result<Vec<f32>>;
    /// Reduce-scatter: `send` holds `size()` equal blocks; rank `r` receives the reduction of
    /// every rank's block `r`.
    fn reduce_scatter(&self, send: &[f32], op: ReduceOp) -> Result<Vec<f32>>;
    /// All-to-all with uneven counts: `send` holds `send_counts[p]` values for each peer `p` in
    /// rank order; the result holds `recv_counts[p]` values from each peer, in rank order.
    fn all_to_all_v(
        &self,
        send: &[f32],
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Result<Vec<f32>>;
    /// Point-to-point send to group rank `dest`.
    fn send(&self, buf: &[f32], dest: usize, tag: u16) -> Result<()>;
    /// Point-to-point receive of `count` values from group rank `src`.
    fn recv(&self, count: usize, src: usize, tag: u16) -> Result<Vec<f32>>;
    /// Point-to-point send that returns without waiting for the receiver: the engine owns
    /// `buf` until it is delivered (MPI: a nonblocking send completed in the background, so two
    /// ranks may post sends to each other before either receives, as pipeline schedules do).
    /// Messages with the same source, destination and tag arrive in order. Engines without
    /// background sends send at once (the default: [`send`](Self::send)).
    fn post_send(&self, buf: Vec<f32>, dest: usize, tag: u16) -> Result<()> {
        self.send(&buf, dest, tag)
    }
    /// Waits until every send posted with [`post_send`](Self::post_send) on this engine was
    /// delivered.
    fn flush_sends(&self) -> Result<()> {
        Ok(())
    }
    /// Broadcast from group rank `root`, in place.
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()>;
    /// Broadcast of bytes from `root`; the other ranks' `buf` is resized to the root's length.
    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()>;
    /// Blocks until every member has entered the barrier.
    fn barrier(&self) -> Result<()>;

    /// `what` on owned values in their own type: the tensor collectives of this crate call
    /// this with the values they read from a tensor. Engines that hand buffers to another
    /// thread (MPI) take them without a copy; the default runs the slice methods above.
    fn exchange(&self, what: &Collective, values: Buffer) -> Result<Buffer> {
        exchange_with_slices(self, what, values)
    }

    /// This group as an NCCL communicator, when it is one: the tensor collectives then run on
    /// a CUDA tensor's device memory instead of staging it through the host.
    #[cfg(feature = "nccl")]
    fn nccl(&self) -> Option<&nccl::NcclComm> {
        None
    }

    /// All-reduce of bf16 values, accumulated in f32.
    fn all_reduce_bf16(&self, buf: &mut [bf16], op: ReduceOp) -> Result<()> {
        let mut wide = widen(buf);
        self.all_reduce(&mut wide, op)?;
        narrow_into(&wide, buf);
        Ok(())
    }
    /// All-gather of bf16 values.
    fn all_gather_bf16(&self, send: &[bf16]) -> Result<Vec<bf16>> {
        Ok(narrow(&self.all_gather(&widen(send))?))
    }
    /// All-gather of bf16 contributions whose sizes are `counts[rank]`.
    fn all_gather_v_bf16(&self, send: &[bf16], counts: &[usize]) -> Result<Vec<bf16>> {
        Ok(narrow(&self.all_gather_v(&widen(send), counts)?))
    }
    /// Reduce-scatter of bf16 values, accumulated in f32.
    fn reduce_scatter_bf16(&self, send: &[bf16], op: ReduceOp) -> Result<Vec<bf16>> {
        Ok(narrow(&self.reduce_scatter(&widen(send), op)?))
    }
    /// All-to-all-v of bf16 values.
    fn all_to_all_v_bf16(
        &self,
        send: &[bf16],
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Result<Vec<bf16>> {
        Ok(narrow(&self.all_to_all_v(
            &widen(send),
            send_counts,
            recv_counts,
        )?))
    }
    /// Send of bf16 values.
    fn send_bf16(&self, buf: &[bf16], dest: usize, tag: u16) -> Result<()> {
        self.send(&widen(buf), dest, tag)
    }
    /// [`post_send`](Self::post_send) of bf16 values.
    fn post_send_bf16(&self, buf: Vec<bf16>, dest: usize, tag: u16) -> Result<()> {
        self.post_send(widen(&buf), dest, tag)
    }
    /// Receive of bf16 values.
    fn recv_bf16(&self, count: usize, src: usize, tag: u16) -> Result<Vec<bf16>> {
        Ok(narrow(&self.recv(count, src, tag)?))
    }
}

/// A collective's values on the host, owned, in their own type.
#[derive(Debug, Clone, PartialEq)]
pub enum Buffer {
    /// 32-bit floats.
    F32(Vec<f32>),
    /// bfloat16 (moved as 16 bits where the engine can; reductions accumulate in f32).
    Bf16(Vec<bf16>),
}

impl Buffer {
    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::Bf16(v) => v.len(),
        }
    }

    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A collective on owned values ([`Communicator::exchange`]); counts are in values.
#[derive(Debug, Clone, PartialEq)]
pub enum Collective {
    /// [`Communicator::all_reduce`].
    AllReduce(ReduceOp),
    /// [`Communicator::all_gather`].
    AllGather,
    /// [`Communicator::all_gather_v`] with these counts.
    AllGatherV(Vec<usize>),
    /// [`Communicator::reduce_scatter`].
    ReduceScatter(ReduceOp),
    /// [`Communicator::all_to_all_v`] with these send and receive counts.
    AllToAllV(Vec<usize>, Vec<usize>),
}

/// [`Communicator::exchange`] through the slice methods (the default).
pub fn exchange_with_slices<C: Communicator + ?Sized>(
    comm: &C,
    what: &Collective,
    values: Buffer,
) -> Result<Buffer> {
    Ok(match (what, values) {
        (Collective::AllReduce(op), Buffer::F32(mut v)) => {
            comm.all_reduce(&mut v, *op)?;
            Buffer::F32(v)
        }
        (Collective::AllReduce(op), Buffer::Bf16(mut v)) => {
            comm.all_reduce_bf16(&mut v, *op)?;
            Buffer::Bf16(v)
        }
        (Collective::AllGather, Buffer::F32(v)) => Buffer::F32(comm.all_gather(&v)?),
        (Collective::AllGather, Buffer::Bf16(v)) => Buffer::Bf16(comm.all_gather_bf16(&v)?),
        (Collective::AllGatherV(c), Buffer::F32(v)) => Buffer::F32(comm.all_gather_v(&v, c)?),
        (Collective::AllGatherV(c), Buffer::Bf16(v)) => {
            Buffer::Bf16(comm.all_gather_v_bf16(&v, c)?)
        }
        (Collective::ReduceScatter(op), Buffer::F32(v)) => {
            Buffer::F32(comm.reduce_scatter(&v, *op)?)
        }
        (Collective::ReduceScatter(op), Buffer::Bf16(v)) => {
            Buffer::Bf16(comm.reduce_scatter_bf16(&v, *op)?)
        }
        (Collective::AllToAllV(s, r), Buffer::F32(v)) => Buffer::F32(comm.all_to_all_v(&v, s, r)?),
        (Collective::AllToAllV(s, r), Buffer::Bf16(v)) => {
            Buffer::Bf16(comm.all_to_all_v_bf16(&v, s, r)?)
        }
    })
}

/// bf16 values as their bits, in place (no copy).
#[cfg(any(feature = "mpi", feature = "nccl"))]
pub(crate) fn as_bits(values: &[bf16]) -> &[u16] {
    bytemuck::cast_slice(values)
}

/// Owned bf16 values as their bits, in place (no copy).
#[cfg(feature = "mpi")]
pub(crate) fn into_bits(values: Vec<bf16>) -> Vec<u16> {
    bytemuck::allocation::cast_vec(values)
}

/// Bits back as bf16 values, in place (no copy).
#[cfg(any(feature = "mpi", feature = "nccl"))]
pub(crate) fn from_bits(values: Vec<u16>) -> Vec<bf16> {
    bytemuck::allocation::cast_vec(values)
}

/// bf16 values as f32 (exact).
pub(crate) fn widen(values: &[bf16]) -> Vec<f32> {
    values.iter().map(|v| v.to_f32()).collect()
}

/// f32 values rounded to bf16.
pub(crate) fn narrow(values: &[f32]) -> Vec<bf16> {
    values.iter().map(|&v| bf16::from_f32(v)).collect()
}

fn narrow_into(values: &[f32], out: &mut [bf16]) {
    for (o, &v) in out.iter_mut().zip(values) {
        *o = bf16::from_f32(v);
    }
}

/// Checks that a per-rank count list has one entry per rank and returns its sum.
pub(crate) fn check_counts(name: &'static str, counts: &[usize], size: usize) -> Result<usize> {
    if counts.len() != size {
        return Err(ParallelError::InvalidArgument {
            name,
            reason: format!("has {} entries for a group of {size} ranks", counts.len()),
        });
    }
    Ok(counts.iter().sum())
}

/// Checks an all-gather-v's counts: one per rank, and this rank's equal to what it gives.
/// Returns the total.
pub(crate) fn check_gather_counts(
    counts: &[usize],
    rank: usize,
    size: usize,
    given: usize,
) -> Result<usize> {
    let total = check_counts("counts", counts, size)?;
    if counts[rank] != given {
        return Err(ParallelError::InvalidArgument {
            name: "counts",
            reason: format!(
                "counts[{rank}] = {} but this rank gives {given} values",
                counts[rank]
            ),
        });
    }
    Ok(total)
}

/// Checks that `len` values split into `size` equal blocks and returns the block length.
pub(crate) fn block_len(name: &'static str, len: usize, size: usize) -> Result<usize> {
    if !len.is_multiple_of(size) {
        return Err(ParallelError::InvalidArgument {
            name,
            reason: format!("length {len} is not divisible by the group size {size}"),
        });
    }
    Ok(len / size)
}

/// Checks a peer rank against the group size.
pub(crate) fn check_peer(name: &'static str, peer: usize, size: usize) -> Result<()> {
    if peer >= size {
        return Err(ParallelError::InvalidArgument {
            name,
            reason: format!("rank {peer} is outside the group of {size} ranks"),
        });
    }
    Ok(())
}
