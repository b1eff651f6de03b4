//! NCCL through `cudarc` (feature `nccl`, enabled by `cuda`).
//!
//! Each [`NcclComm`] owns an NCCL communicator on its own engine thread (the same timeout and
//! dead-peer handling as the MPI engine). NCCL needs a bootstrap to share its unique id: any
//! [`Communicator`] (normally the MPI world) is used for that, and `split` splits the bootstrap
//! and builds a new NCCL communicator for each part. Buffers are staged from host memory; the
//! tensor operations of this crate stage through the host on every backend.
//!
//! Without the CUDA driver or `libnccl.so` at run time, [`NcclComm::new`] returns
//! [`ParallelError::Unavailable`]. cudarc loads `libnccl.so` (not `libnccl.so.2`): link it when
//! only the versioned name is installed.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice};
use cudarc::nccl::{Comm, Id, ReduceOp as NcclOp, result as nccl_result};

use super::worker::{Peer, Worker};
use super::{Communicator, ReduceOp, block_len, check_counts, check_gather_counts, check_peer};
use crate::error::{ParallelError, Result};

/// Whether the CUDA driver and NCCL libraries can be loaded.
#[allow(unsafe_code)]
pub fn nccl_available() -> bool {
    // SAFETY: both functions only try to dlopen the library and report whether it loaded.
    unsafe { cudarc::driver::sys::is_culib_present() && cudarc::nccl::sys::is_culib_present() }
}

struct NcclState {
    comm: Comm,
}

/// A group of the NCCL engine.
#[derive(Debug)]
pub struct NcclComm {
    engine: Arc<Worker<NcclState>>,
    bootstrap: Arc<dyn Communicator>,
    device: usize,
}

fn nccl_error(op: &'static str, e: impl std::fmt::Debug) -> ParallelError {
    ParallelError::Engine {
        engine: "nccl",
        op,
        reason: format!("{e:?}"),
    }
}

fn nccl_op(op: ReduceOp) -> NcclOp {
    match op {
        ReduceOp::Sum => NcclOp::Sum,
        ReduceOp::Avg => NcclOp::Avg,
        ReduceOp::Max => NcclOp::Max,
    }
}

impl NcclComm {
    /// Builds an NCCL communicator over the ranks of `bootstrap`, on CUDA device `device`.
    /// Collective over `bootstrap`.
    pub fn new(bootstrap: Arc<dyn Communicator>, device: usize) -> Result<Self> {
        // Every rank must agree before anyone blocks in NCCL's initialisation.
        let mut ok = [if nccl_available() { 1.0f32 } else { 0.0 }];
        bootstrap.all_reduce(&mut ok, ReduceOp::Sum)?;
        if ok[0] < bootstrap.size() as f32 {
            return Err(ParallelError::Unavailable {
                engine: "nccl",
                reason: "the CUDA driver or libnccl.so cannot be loaded on every rank \
                         (a GPU machine with NCCL is needed)"
                    .into(),
            });
        }
        let mut id_bytes = if bootstrap.rank() == 0 {
            let id = Id::new().map_err(|e| nccl_error("get_unique_id", e))?;
            id.internal().iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        bootstrap.broadcast_bytes(&mut id_bytes, 0)?;
        let mut internal = [0 as core::ffi::c_char; 128];
        if id_bytes.len() != internal.len() {
            return Err(nccl_error(
                "init",
                "the broadcast NCCL id has the wrong length",
            ));
        }
        for (dst, &src) in internal.iter_mut().zip(&id_bytes) {
            *dst = src as core::ffi::c_char;
        }
        let (rank, size) = (bootstrap.rank(), bootstrap.size());
        let timeout = super::timeout_from_env()?;
        let (mut engine, ()) = Worker::spawn("nccl", timeout, move || {
            let ctx = CudaContext::new(device).map_err(|e| nccl_error("init", e))?;
            let stream = ctx.default_stream();
            let comm = Comm::from_rank(stream, rank, size, Id::uninit(internal))
                .map_err(|e| nccl_error("init", e))?;
            Ok((NcclState { comm }, ()))
        })?;
        let me = Peer::me();
        // Peers for dead-peer detection: share host hash and pid as bytes through the bootstrap.
        let mut peers = Vec::with_capacity(size);
        for root in 0..size {
            let mut bytes = if root == rank {
                [me.host.to_le_bytes(), me.pid.to_le_bytes()].concat()
            } else {
                Vec::new()
            };
            bootstrap.broadcast_bytes(&mut bytes, root)?;
            let word = |i: usize| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&bytes[8 * i..8 * i + 8]);
                u64::from_le_bytes(b)
            };
            peers.push(Peer {
                host: word(0),
                pid: word(1),
            });
        }
        let world_ranks = bootstrap.world_ranks();
        let mut by_world =
            vec![Peer { host: 0, pid: 0 }; world_ranks.iter().max().map_or(0, |m| m + 1)];
        for (p, &w) in peers.into_iter().zip(world_ranks) {
            by_world[w] = p;
        }
        engine.set_peers(by_world, world_ranks[rank]);
        Ok(Self {
            engine: Arc::new(engine),
            bootstrap,
            device,
        })
    }

    /// The timeout of every blocking call.
    pub fn timeout(&self) -> std::time::Duration {
        self.engine.timeout()
    }

    fn call<T, F>(&self, op: &'static str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Comm) -> Result<T> + Send + 'static,
    {
        self.engine.call(
            op,
            self.bootstrap.world_ranks(),
            move |state| f(&state.comm),
        )
    }
}

fn to_device(comm: &Comm, host: &[f32]) -> Result<CudaSlice<f32>> {
    comm.stream()
        .clone_htod(host)
        .map_err(|e| nccl_error("copy to device", e))
}

fn to_host(comm: &Comm, dev: &CudaSlice<f32>) -> Result<Vec<f32>> {
    comm.stream()
        .clone_dtoh(dev)
        .map_err(|e| nccl_error("copy to host", e))
}

fn zeros(comm: &Comm, n: usize) -> Result<CudaSlice<f32>> {
    comm.stream()
        .alloc_zeros::<f32>(n)
        .map_err(|e| nccl_error("alloc", e))
}

impl Communicator for NcclComm {
    fn engine(&self) -> &'static str {
        "nccl"
    }

    fn rank(&self) -> usize {
        self.bootstrap.rank()
    }

    fn size(&self) -> usize {
        self.bootstrap.size()
    }

    fn world_ranks(&self) -> &[usize] {
        self.bootstrap.world_ranks()
    }

    fn split(&self, color: Option<u32>, key: u32) -> Result<Option<Arc<dyn Communicator>>> {
        match self.bootstrap.split(color, key)? {
            None => Ok(None),
            Some(sub) => Ok(Some(Arc::new(NcclComm::new(sub, self.device)?))),
        }
    }

    fn all_reduce(&self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        let host = buf.to_vec();
        let out = self.call("all_reduce", move |comm| {
            let mut dev = to_device(comm, &host)?;
            comm.all_reduce_in_place(&mut dev, &nccl_op(op))
                .map_err(|e| nccl_error("all_reduce", e))?;
            to_host(comm, &dev)
        })?;
        buf.copy_from_slice(&out);
        Ok(())
    }

    fn all_gather(&self, send: &[f32]) -> Result<Vec<f32>> {
        let host = send.to_vec();
        let size = self.size();
        self.call("all_gather", move |comm| {
            let dev = to_device(comm, &host)?;
            let mut out = zeros(comm, host.len() * size)?;
            comm.all_gather(&dev, &mut out)
                .map_err(|e| nccl_error("all_gather", e))?;
            to_host(comm, &out)
        })
    }

    fn all_gather_v(&self, send: &[f32], counts: &[usize]) -> Result<Vec<f32>> {
        // NCCL has no all-gather-v: pad to the largest count, gather, then compact.
        check_gather_counts(counts, self.rank(), self.size(), send.len())?;
        let max = counts.iter().copied().max().unwrap_or(0);
        let mut padded = send.to_vec();
        padded.resize(max, 0.0);
        let gathered = self.all_gather(&padded)?;
        Ok(counts
            .iter()
            .enumerate()
            .flat_map(|(p, &n)| gathered[p * max..p * max + n].to_vec())
            .collect())
    }

    fn reduce_scatter(&self, send: &[f32], op: ReduceOp) -> Result<Vec<f32>> {
        let block = block_len("send", send.len(), self.size())?;
        let host = send.to_vec();
        self.call("reduce_scatter", move |comm| {
            let dev = to_device(comm, &host)?;
            let mut out = zeros(comm, block)?;
            comm.reduce_scatter(&dev, &mut out, &nccl_op(op))
                .map_err(|e| nccl_error("reduce_scatter", e))?;
            to_host(comm, &out)
        })
    }

    fn all_to_all_v(
        &self,
        send: &[f32],
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Result<Vec<f32>> {
        let sent = check_counts("send_counts", send_counts, self.size())?;
        check_counts("recv_counts", recv_counts, self.size())?;
        if sent != send.len() {
            return Err(ParallelError::InvalidArgument {
                name: "send_counts",
                reason: format!("sum {sent} but {} values were given", send.len()),
            });
        }
        let host = send.to_vec();
        let (sc, rc) = (send_counts.to_vec(), recv_counts.to_vec());
        self.call("all_to_all_v", move |comm| {
            // Grouped point-to-point: NCCL's all-to-all-v.
            let dev = to_device(comm, &host)?;
            let mut recvs = rc
                .iter()
                .map(|&n| zeros(comm, n.max(1)))
                .collect::<Result<Vec<_>>>()?;
            nccl_result::group_start().map_err(|e| nccl_error("all_to_all_v", e))?;
            let mut offset = 0;
            let mut status = Ok(());
            for (peer, (&n, recv)) in sc.iter().zip(&mut recvs).enumerate() {
                if n > 0 {
                    let view = dev.slice(offset..offset + n);
                    status = status.and(comm.send(&view, peer as i32).map(|_| ()));
                }
                offset += n;
                if rc[peer] > 0 {
                    status = status.and(comm.recv(recv, peer as i32).map(|_| ()));
                }
            }
            nccl_result::group_end().map_err(|e| nccl_error("all_to_all_v", e))?;
            status.map_err(|e| nccl_error("all_to_all_v", e))?;
            let mut out = Vec::with_capacity(rc.iter().sum());
            for (recv, &n) in recvs.iter().zip(&rc) {
                if n > 0 {
                    out.extend_from_slice(&to_host(comm, recv)?[..n]);
                }
            }
            Ok(out)
        })
    }

    fn send(&self, buf: &[f32], dest: usize, _tag: u16) -> Result<()> {
        check_peer("dest", dest, self.size())?;
        let host = buf.to_vec();
        self.call("send", move |comm| {
            let dev = to_device(comm, &host)?;
            comm.send(&dev, dest as i32)
                .map_err(|e| nccl_error("send", e))?;
            comm.stream()
                .synchronize()
                .map_err(|e| nccl_error("send", e))
        })
    }

    fn recv(&self, count: usize, src: usize, _tag: u16) -> Result<Vec<f32>> {
        check_peer("src", src, self.size())?;
        self.call("recv", move |comm| {
            let mut dev = zeros(comm, count)?;
            comm.recv(&mut dev, src as i32)
                .map_err(|e| nccl_error("recv", e))?;
            to_host(comm, &dev)
        })
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        check_peer("root", root, self.size())?;
        let host = buf.to_vec();
        let out = self.call("broadcast", move |comm| {
            let mut dev = to_device(comm, &host)?;
            comm.broadcast_in_place(&mut dev, root as i32)
                .map_err(|e| nccl_error("broadcast", e))?;
            to_host(comm, &dev)
        })?;
        buf.copy_from_slice(&out);
        Ok(())
    }

    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        // Bytes are control data: the bootstrap carries them.
        self.bootstrap.broadcast_bytes(buf, root)
    }

    fn barrier(&self) -> Result<()> {
        let mut token = [0.0f32];
        self.all_reduce(&mut token, ReduceOp::Sum)
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        self.engine.shutdown();
    }
}
