//! NCCL through `cudarc` (feature `nccl`, enabled by `cuda`).
//!
//! Each [`NcclComm`] owns an NCCL communicator and a CUDA stream of its own on its own engine
//! thread (the same timeout and dead-peer handling as the MPI engine). NCCL needs a bootstrap to
//! share its unique id: any [`Communicator`] (normally the MPI world) is used for that, and
//! `split` splits the bootstrap and builds a new NCCL communicator for each part, once.
//!
//! Every collective is written once, on device addresses ([`DeviceBuffers`]): the tensor
//! collectives of this crate call those directly on a CUDA tensor's memory (no host copy), and
//! the [`Communicator`] methods on host slices upload, run the same code, and download.
//! bf16 travels as bf16 (`ncclBfloat16`) and NCCL reduces it natively.
//!
//! Point-to-point messages: NCCL matches sends and receives by their order per peer and has no
//! tags, so every message is preceded by an 8-byte header (tag, count) sent in the same NCCL group,
//! and a receive whose header names another tag or count is a typed error rather than values
//! landing in the wrong place. A posted send ([`Communicator::post_send`]) is kept with its
//! device buffer and issued in one NCCL group with this rank's next point-to-point operation on
//! the communicator (or [`Communicator::flush_sends`]), so two ranks that post sends to each other
//! and then receive, as pipeline schedules do, progress together.
//!
//! Without the CUDA driver or `libnccl.so` at run time, [`NcclComm::new`] returns
//! [`ParallelError::Unavailable`]. cudarc loads `libnccl.so` (not `libnccl.so.2`): link it when
//! only the versioned name is installed.

// Raw NCCL calls on device addresses: each `unsafe` block states what it relies on.
#![allow(unsafe_code)]

use std::any::Any;
use std::ffi::c_void;
use std::mem::MaybeUninit;
use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, ValidAsZeroBits,
};
use cudarc::nccl::{result as nccl, sys};
use half::bf16;

use super::worker::{Peer, Worker};
use super::{
    Communicator, ReduceOp, as_bits, block_len, check_counts, check_gather_counts, check_peer,
    from_bits,
};
use crate::error::{ParallelError, Result};

/// Whether the CUDA driver and NCCL libraries can be loaded.
pub fn nccl_available() -> bool {
    // SAFETY: both functions only try to dlopen the library and report whether it loaded.
    unsafe { cudarc::driver::sys::is_culib_present() && cudarc::nccl::sys::is_culib_present() }
}

/// The element types the NCCL engine moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem {
    /// 32-bit floats.
    F32,
    /// bfloat16 (reduced natively by NCCL).
    Bf16,
}

impl Elem {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::Bf16 => 2,
        }
    }

    fn nccl(self) -> sys::ncclDataType_t {
        match self {
            Self::F32 => sys::ncclDataType_t::ncclFloat32,
            Self::Bf16 => sys::ncclDataType_t::ncclBfloat16,
        }
    }
}

/// Device addresses of a collective's input and output on the communicator's GPU, and what
/// keeps them allocated: `keep` is moved to the engine thread and dropped there only once
/// NCCL is done with both buffers, also when the caller gave up after the timeout.
pub struct DeviceBuffers {
    /// Address of the first input element.
    pub src: u64,
    /// Address of the first output element (may equal `src` for in-place operations).
    pub dst: u64,
    /// Whatever owns the two allocations (tensor handles, cudarc slices).
    pub keep: Box<dyn Any + Send>,
}

/// The engine thread's state: the raw communicator, its stream, and the posted sends.
struct NcclState {
    comm: sys::ncclComm_t,
    stream: Arc<CudaStream>,
    posted: Vec<Posted>,
}

/// A message waiting to be issued with the next point-to-point group.
struct Posted {
    peer: usize,
    header: CudaSlice<u32>,
    src: u64,
    count: usize,
    elem: Elem,
    _keep: Box<dyn Any + Send>,
}

impl Drop for NcclState {
    fn drop(&mut self) {
        // SAFETY: `comm` came from a successful `comm_init_rank` and is destroyed once, here,
        // on the thread that used it, after its stream was drained.
        unsafe {
            let _ = self.stream.synchronize();
            let _ = nccl::comm_destroy(self.comm);
        }
    }
}

/// `ncclAllReduce` and `ncclReduceScatter`, which take the same arguments.
type Reduction = unsafe fn(
    *const c_void,
    *mut c_void,
    usize,
    sys::ncclDataType_t,
    sys::ncclRedOp_t,
    sys::ncclComm_t,
    sys::cudaStream_t,
) -> std::result::Result<nccl::NcclStatus, nccl::NcclError>;

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

fn nccl_op(op: ReduceOp) -> sys::ncclRedOp_t {
    match op {
        ReduceOp::Sum => sys::ncclRedOp_t::ncclSum,
        ReduceOp::Avg => sys::ncclRedOp_t::ncclAvg,
        ReduceOp::Max => sys::ncclRedOp_t::ncclMax,
    }
}

impl NcclState {
    fn stream(&self) -> sys::cudaStream_t {
        self.stream.cu_stream() as sys::cudaStream_t
    }

    /// Waits for everything issued on this communicator's stream.
    fn finish(&self, op: &'static str) -> Result<()> {
        self.stream.synchronize().map_err(|e| nccl_error(op, e))
    }

    fn check(
        op: &'static str,
        r: std::result::Result<nccl::NcclStatus, nccl::NcclError>,
    ) -> Result<()> {
        r.map(|_| ()).map_err(|e| nccl_error(op, e))
    }

    /// `f` inside one NCCL group (its calls are matched and progress together).
    fn group(&self, op: &'static str, f: impl FnOnce() -> Result<()>) -> Result<()> {
        Self::check(op, nccl::group_start())?;
        let inner = f();
        let end = Self::check(op, nccl::group_end());
        inner.and(end)
    }

    /// `ncclSend` (`send`) or `ncclRecv` of `count` elements at `addr` to or from `peer` on
    /// this stream.
    ///
    /// # Safety
    /// `addr` holds `count` elements of `dtype` on this communicator's device until the stream
    /// is drained.
    unsafe fn p2p(
        &self,
        (op, send): (&'static str, bool),
        (addr, count, dtype): (u64, usize, sys::ncclDataType_t),
        peer: usize,
    ) -> Result<()> {
        let (comm, stream, peer) = (self.comm, self.stream(), peer as i32);
        // SAFETY: the caller's contract.
        let r = unsafe {
            if send {
                nccl::send(addr as *const c_void, count, dtype, peer, comm, stream)
            } else {
                nccl::recv(addr as *mut c_void, count, dtype, peer, comm, stream)
            }
        };
        Self::check(op, r)
    }

    /// The header of a message: its tag and count, on the device.
    fn header(&self, tag: u16, count: usize) -> Result<CudaSlice<u32>> {
        let count = u32::try_from(count).map_err(|_| ParallelError::InvalidArgument {
            name: "count",
            reason: format!("{count} values do not fit one NCCL message header"),
        })?;
        self.stream
            .clone_htod(&[u32::from(tag), count])
            .map_err(|e| nccl_error("header", e))
    }

    /// Issues the posted sends (inside a group).
    ///
    /// # Safety
    /// Every posted `src` is a live allocation (kept by the posted message).
    unsafe fn issue_posted(&self, op: &'static str) -> Result<()> {
        let u32s = sys::ncclDataType_t::ncclUint32;
        for p in &self.posted {
            let (h, _h) = p.header.device_ptr(&self.stream);
            // SAFETY: the header is a live 2-element u32 allocation on this stream; `p.src`
            // holds `p.count` elements of `p.elem` kept alive by `p._keep`.
            unsafe {
                self.p2p((op, true), (h, 2, u32s), p.peer)?;
                if p.count > 0 {
                    self.p2p((op, true), (p.src, p.count, p.elem.nccl()), p.peer)?;
                }
            }
        }
        Ok(())
    }
}

/// A host element type staged through the device for the [`Communicator`] methods.
trait Wire: DeviceRepr + ValidAsZeroBits + Copy + Default + Send + Sync + Unpin + 'static {
    const ELEM: Elem;
}

impl Wire for f32 {
    const ELEM: Elem = Elem::F32;
}

/// bf16 as its bits (cudarc has no bf16 without its `f16` feature).
impl Wire for u16 {
    const ELEM: Elem = Elem::Bf16;
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
            let id = nccl::get_uniqueid().map_err(|e| nccl_error("get_unique_id", e))?;
            id.internal.iter().map(|&c| c as u8).collect()
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
            // The primary context, which CubeCL's CUDA runtime uses too: device addresses of
            // its tensors are valid here. A stream of its own per communicator, so collectives
            // of different groups never queue behind each other.
            let ctx = CudaContext::new(device).map_err(|e| nccl_error("init", e))?;
            let stream = ctx.new_stream().map_err(|e| nccl_error("init", e))?;
            let mut comm = MaybeUninit::uninit();
            // SAFETY: `comm` is written by a successful `comm_init_rank`, which every rank of
            // the bootstrap calls with the same id and its own rank.
            let comm = unsafe {
                nccl::comm_init_rank(
                    comm.as_mut_ptr(),
                    size as i32,
                    sys::ncclUniqueId { internal },
                    rank as i32,
                )
                .map_err(|e| nccl_error("init", e))?;
                comm.assume_init()
            };
            Ok((
                NcclState {
                    comm,
                    stream,
                    posted: Vec::new(),
                },
                (),
            ))
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

    /// The CUDA device (ordinal) of this communicator.
    pub fn device(&self) -> usize {
        self.device
    }

    /// The timeout of every blocking call.
    pub fn timeout(&self) -> std::time::Duration {
        self.engine.timeout()
    }

    fn call<T, F>(&self, op: &'static str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut NcclState) -> Result<T> + Send + 'static,
    {
        self.engine
            .call(op, self.bootstrap.world_ranks(), move |state| f(state))
    }

    /// Runs `f` on the engine thread with the buffers' addresses, drains the stream, and only
    /// then releases what keeps the buffers allocated.
    fn on_device<F>(&self, op: &'static str, bufs: DeviceBuffers, f: F) -> Result<()>
    where
        F: FnOnce(&NcclState, u64, u64) -> Result<()> + Send + 'static,
    {
        self.call(op, move |st| {
            let DeviceBuffers { src, dst, keep } = bufs;
            let result = f(st, src, dst).and_then(|()| st.finish(op));
            drop(keep);
            result
        })
    }

    /// An all-reduce or a reduce-scatter (`call`, which share their arguments) of `count`
    /// elements (per rank, for the reduce-scatter).
    ///
    /// # Safety
    /// As [`device_all_reduce`](Self::device_all_reduce) and
    /// [`device_reduce_scatter`](Self::device_reduce_scatter).
    unsafe fn reduction(
        &self,
        (name, call): (&'static str, Reduction),
        bufs: DeviceBuffers,
        (count, elem): (usize, Elem),
        op: ReduceOp,
    ) -> Result<()> {
        self.on_device(name, bufs, move |st, src, dst| {
            let (dt, red) = (elem.nccl(), nccl_op(op));
            // SAFETY: the caller's contract; `keep` holds both until the stream is drained.
            let r = unsafe {
                call(
                    src as *const c_void,
                    dst as *mut c_void,
                    count,
                    dt,
                    red,
                    st.comm,
                    st.stream(),
                )
            };
            NcclState::check(name, r)
        })
    }

    /// In-place or out-of-place all-reduce of `count` elements.
    ///
    /// # Safety
    /// `bufs.src` and `bufs.dst` are allocations on this communicator's device of at least
    /// `count` elements of `elem`, kept alive by `bufs.keep`, and every write to `src` was
    /// completed before the call.
    pub unsafe fn device_all_reduce(
        &self,
        bufs: DeviceBuffers,
        count: usize,
        elem: Elem,
        op: ReduceOp,
    ) -> Result<()> {
        // SAFETY: the caller's contract.
        unsafe { self.reduction(("all_reduce", nccl::all_reduce), bufs, (count, elem), op) }
    }

    /// All-gather of `count` elements per rank: `dst` receives `size · count` in rank order.
    ///
    /// # Safety
    /// As [`device_all_reduce`](Self::device_all_reduce), with `dst` of `size · count` elements.
    pub unsafe fn device_all_gather(
        &self,
        bufs: DeviceBuffers,
        count: usize,
        elem: Elem,
    ) -> Result<()> {
        self.on_device("all_gather", bufs, move |st, src, dst| {
            // SAFETY: the caller's contract.
            let r = unsafe {
                nccl::all_gather(
                    src as *const c_void,
                    dst as *mut c_void,
                    count,
                    elem.nccl(),
                    st.comm,
                    st.stream(),
                )
            };
            NcclState::check("all_gather", r)
        })
    }

    /// Reduce-scatter: `src` holds `size` blocks of `count` elements, `dst` receives the
    /// reduction of every rank's block `rank`.
    ///
    /// # Safety
    /// As [`device_all_reduce`](Self::device_all_reduce), with `src` of `size · count` elements
    /// and `dst` of `count`.
    pub unsafe fn device_reduce_scatter(
        &self,
        bufs: DeviceBuffers,
        count: usize,
        elem: Elem,
        op: ReduceOp,
    ) -> Result<()> {
        // SAFETY: the caller's contract.
        unsafe {
            self.reduction(
                ("reduce_scatter", nccl::reduce_scatter),
                bufs,
                (count, elem),
                op,
            )
        }
    }

    /// All-gather of uneven contributions (`counts[p]` elements from rank `p`, this rank's
    /// from `src`), concatenated in rank order in `dst`: grouped sends and receives.
    ///
    /// # Safety
    /// As [`device_all_reduce`](Self::device_all_reduce), with `src` of `counts[rank]` elements
    /// and `dst` of `Σ counts`.
    pub unsafe fn device_all_gather_v(
        &self,
        bufs: DeviceBuffers,
        counts: &[usize],
        elem: Elem,
    ) -> Result<()> {
        let rank = self.rank();
        check_counts("counts", counts, self.size())?;
        let counts = counts.to_vec();
        let dt = elem.nccl();
        self.on_device("all_gather_v", bufs, move |st, src, dst| {
            st.group("all_gather_v", || {
                let mut at = dst;
                for (p, &n) in counts.iter().enumerate() {
                    // SAFETY: the caller's contract: `src` holds counts[rank] elements and
                    // `dst` their sum, which `at` walks block by block.
                    unsafe {
                        if counts[rank] > 0 {
                            st.p2p(("all_gather_v", true), (src, counts[rank], dt), p)?;
                        }
                        if n > 0 {
                            st.p2p(("all_gather_v", false), (at, n, dt), p)?;
                        }
                    }
                    at += (n * elem.size()) as u64;
                }
                Ok(())
            })
        })
    }

    /// Reduce-scatter of uneven blocks: `src` holds `Σ counts` elements, `dst` receives the
    /// reduction of every rank's block `rank` (`counts[rank]` elements): one grouped reduce
    /// per block, rooted at its owner.
    ///
    /// # Safety
    /// As [`device_all_reduce`](Self::device_all_reduce), with `src` of `Σ counts` elements and
    /// `dst` of `counts[rank]`.
    pub unsafe fn device_reduce_scatter_v(
        &self,
        bufs: DeviceBuffers,
        counts: &[usize],
        elem: Elem,
        op: ReduceOp,
    ) -> Result<()> {
        check_counts("counts", counts, self.size())?;
        let counts = counts.to_vec();
        self.on_device("reduce_scatter_v", bufs, move |st, src, dst| {
            st.group("reduce_scatter_v", || {
                let mut at = src;
                for (p, &n) in counts.iter().enumerate() {
                    if n > 0 {
                        // SAFETY: the caller's contract; `dst` is used on the root only.
                        let r = unsafe {
                            nccl::reduce(
                                at as *const c_void,
                                dst as *mut c_void,
                                n,
                                elem.nccl(),
                                nccl_op(op),
                                p as i32,
                                st.comm,
                                st.stream(),
                            )
                        };
                        NcclState::check("reduce_scatter_v", r)?;
                    }
                    at += (n * elem.size()) as u64;
                }
                Ok(())
            })
        })
    }

    /// All-to-all-v: `send_counts[p]` elements of `src` (in rank order) go to rank `p`,
    /// `recv_counts[p]` elements from it land in `dst` in rank order (grouped sends and
    /// receives, NCCL's all-to-all-v).
    ///
    /// # Safety
    /// As [`device_all_reduce`](Self::device_all_reduce), with `src` of `Σ send_counts`
    /// elements and `dst` of `Σ recv_counts`.
    pub unsafe fn device_all_to_all_v(
        &self,
        bufs: DeviceBuffers,
        send_counts: &[usize],
        recv_counts: &[usize],
        elem: Elem,
    ) -> Result<()> {
        check_counts("send_counts", send_counts, self.size())?;
        check_counts("recv_counts", recv_counts, self.size())?;
        let (sc, rc) = (send_counts.to_vec(), recv_counts.to_vec());
        let dt = elem.nccl();
        self.on_device("all_to_all_v", bufs, move |st, src, dst| {
            st.group("all_to_all_v", || {
                let (mut s, mut r) = (src, dst);
                for (p, (&ns, &nr)) in sc.iter().zip(&rc).enumerate() {
                    // SAFETY: the caller's contract; `s` and `r` walk the two buffers.
                    unsafe {
                        if ns > 0 {
                            st.p2p(("all_to_all_v", true), (s, ns, dt), p)?;
                        }
                        if nr > 0 {
                            st.p2p(("all_to_all_v", false), (r, nr, dt), p)?;
                        }
                    }
                    s += (ns * elem.size()) as u64;
                    r += (nr * elem.size()) as u64;
                }
                Ok(())
            })
        })
    }

    /// Broadcast of `count` elements from rank `root` (`src` is read on the root only).
    ///
    /// # Safety
    /// As [`device_all_reduce`](Self::device_all_reduce).
    pub unsafe fn device_broadcast(
        &self,
        bufs: DeviceBuffers,
        count: usize,
        elem: Elem,
        root: usize,
    ) -> Result<()> {
        check_peer("root", root, self.size())?;
        self.on_device("broadcast", bufs, move |st, src, dst| {
            // SAFETY: the caller's contract.
            let r = unsafe {
                nccl::broadcast(
                    src as *const c_void,
                    dst as *mut c_void,
                    count,
                    elem.nccl(),
                    root as i32,
                    st.comm,
                    st.stream(),
                )
            };
            NcclState::check("broadcast", r)
        })
    }

    /// Sends `count` elements at `bufs.src` to rank `dest` with `tag`; with `post`, returns at
    /// once and the message goes out with this rank's next point-to-point operation (see the
    /// module docs). Earlier posted sends go out first, in the same group.
    ///
    /// # Safety
    /// As [`device_all_reduce`](Self::device_all_reduce) for `src` (`dst` is unused).
    pub unsafe fn device_send(
        &self,
        bufs: DeviceBuffers,
        count: usize,
        elem: Elem,
        dest: usize,
        tag: u16,
        post: bool,
    ) -> Result<()> {
        check_peer("dest", dest, self.size())?;
        self.call("send", move |st| {
            let DeviceBuffers { src, keep, .. } = bufs;
            let header = st.header(tag, count)?;
            st.posted.push(Posted {
                peer: dest,
                header,
                src,
                count,
                elem,
                _keep: keep,
            });
            if post {
                return Ok(());
            }
            // SAFETY: every posted message keeps its buffers.
            let issued = st.group("send", || unsafe { st.issue_posted("send") });
            let result = issued.and_then(|()| st.finish("send"));
            st.posted.clear();
            result
        })
    }

    /// Receives `count` elements from rank `src` with `tag` into `bufs.dst`, after issuing the
    /// posted sends in the same group. A message whose header names another tag or count is an
    /// error (NCCL delivers by order per peer).
    ///
    /// # Safety
    /// As [`device_all_reduce`](Self::device_all_reduce) for `dst` of `count` elements (`src` is
    /// unused).
    pub unsafe fn device_recv(
        &self,
        bufs: DeviceBuffers,
        count: usize,
        elem: Elem,
        src: usize,
        tag: u16,
    ) -> Result<()> {
        check_peer("src", src, self.size())?;
        self.call("recv", move |st| {
            let DeviceBuffers { dst, keep, .. } = bufs;
            let mut header = st
                .stream
                .alloc_zeros::<u32>(2)
                .map_err(|e| nccl_error("recv", e))?;
            let issued = {
                let stream = st.stream.clone();
                let (h, _h) = header.device_ptr_mut(&stream);
                st.group("recv", || {
                    // SAFETY: posted messages keep their buffers; the header is a live
                    // 2-element allocation; `dst` holds `count` elements (the caller's
                    // contract).
                    unsafe {
                        st.issue_posted("recv")?;
                        st.p2p(
                            ("recv", false),
                            (h, 2, sys::ncclDataType_t::ncclUint32),
                            src,
                        )?;
                        if count > 0 {
                            st.p2p(("recv", false), (dst, count, elem.nccl()), src)?;
                        }
                    }
                    Ok(())
                })
            };
            let result = issued.and_then(|()| st.finish("recv"));
            st.posted.clear();
            result?;
            let got = st
                .stream
                .clone_dtoh(&header)
                .map_err(|e| nccl_error("recv", e))?;
            drop(keep);
            if got != [u32::from(tag), count as u32] {
                return Err(nccl_error(
                    "recv",
                    format!(
                        "the next message from rank {src} has tag {} and {} values, the receive \
                         expects tag {tag} and {count} (NCCL delivers messages in the order they \
                         were sent to this rank: both ranks must send and receive in the same \
                         order)",
                        got[0], got[1]
                    ),
                ));
            }
            Ok(())
        })
    }

    /// Issues every posted send and waits until they are delivered.
    pub fn device_flush(&self) -> Result<()> {
        self.call("flush_sends", move |st| {
            if st.posted.is_empty() {
                return Ok(());
            }
            // SAFETY: every posted message keeps its buffers.
            let issued = st.group("flush_sends", || unsafe { st.issue_posted("flush_sends") });
            let result = issued.and_then(|()| st.finish("flush_sends"));
            st.posted.clear();
            result
        })
    }

    /// The host-slice form of a device operation: `send` is uploaded, `out_len` elements are
    /// allocated for the output, `f` runs the operation on their addresses, and the output is
    /// downloaded (for callers without device tensors; the tensor collectives on CUDA tensors
    /// skip this).
    fn staged<T: Wire>(
        &self,
        send: &[T],
        out_len: usize,
        f: impl FnOnce(&Self, DeviceBuffers) -> Result<()>,
    ) -> Result<Vec<T>> {
        let host = send.to_vec();
        let (src, dst, buffers) = self.call("upload", move |st| {
            let copy = |e| nccl_error("copy to device", e);
            let input = if host.is_empty() {
                st.stream.alloc_zeros::<T>(1).map_err(copy)?
            } else {
                st.stream.clone_htod(&host).map_err(copy)?
            };
            let output = st
                .stream
                .alloc_zeros::<T>(out_len.max(1))
                .map_err(|e| nccl_error("alloc", e))?;
            let src = input.device_ptr(&st.stream).0;
            let dst = output.device_ptr(&st.stream).0;
            Ok((
                src,
                dst,
                Arc::new(Staged {
                    _input: input,
                    output,
                }),
            ))
        })?;
        let ran = f(
            self,
            DeviceBuffers {
                src,
                dst,
                keep: Box::new(buffers.clone()),
            },
        );
        let download = ran.is_ok() && out_len > 0;
        // The buffers are released on the engine thread, where their context is current.
        let values = self.call("download", move |st| {
            if !download {
                drop(buffers);
                return Ok(Vec::new());
            }
            let mut values = st
                .stream
                .clone_dtoh(&buffers.output)
                .map_err(|e| nccl_error("copy to host", e))?;
            values.truncate(out_len);
            Ok(values)
        });
        ran?;
        values
    }
}

/// The device copies of a staged call's input and output. They are made, used and dropped
/// on the engine thread's stream only; the caller's thread merely holds the `Arc`.
struct Staged<T> {
    _input: CudaSlice<T>,
    output: CudaSlice<T>,
}
// SAFETY: see the type's docs (a CudaSlice is a device address and an Arc of its stream).
unsafe impl<T> Send for Staged<T> {}
unsafe impl<T> Sync for Staged<T> {}

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

    fn nccl(&self) -> Option<&NcclComm> {
        Some(self)
    }

    fn all_reduce(&self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        let n = buf.len();
        // SAFETY: `staged` hands addresses of its own allocations of `n` elements.
        let out = self.staged(buf, n, |c, b| unsafe {
            c.device_all_reduce(b, n, Elem::F32, op)
        })?;
        buf.copy_from_slice(&out);
        Ok(())
    }

    fn all_reduce_bf16(&self, buf: &mut [bf16], op: ReduceOp) -> Result<()> {
        let n = buf.len();
        // SAFETY: as above.
        let out = self.staged(as_bits(buf), n, |c, b| unsafe {
            c.device_all_reduce(b, n, Elem::Bf16, op)
        })?;
        buf.copy_from_slice(&from_bits(out));
        Ok(())
    }

    fn all_gather(&self, send: &[f32]) -> Result<Vec<f32>> {
        self.gather_any(send)
    }

    fn all_gather_bf16(&self, send: &[bf16]) -> Result<Vec<bf16>> {
        self.gather_any(as_bits(send)).map(from_bits)
    }

    fn all_gather_v(&self, send: &[f32], counts: &[usize]) -> Result<Vec<f32>> {
        self.gather_v_any(send, counts)
    }

    fn all_gather_v_bf16(&self, send: &[bf16], counts: &[usize]) -> Result<Vec<bf16>> {
        self.gather_v_any(as_bits(send), counts).map(from_bits)
    }

    fn reduce_scatter(&self, send: &[f32], op: ReduceOp) -> Result<Vec<f32>> {
        self.reduce_scatter_any(send, op)
    }

    fn reduce_scatter_bf16(&self, send: &[bf16], op: ReduceOp) -> Result<Vec<bf16>> {
        self.reduce_scatter_any(as_bits(send), op).map(from_bits)
    }

    fn all_to_all_v(
        &self,
        send: &[f32],
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Result<Vec<f32>> {
        self.all_to_all_v_any(send, send_counts, recv_counts)
    }

    fn all_to_all_v_bf16(
        &self,
        send: &[bf16],
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Result<Vec<bf16>> {
        self.all_to_all_v_any(as_bits(send), send_counts, recv_counts)
            .map(from_bits)
    }

    fn send(&self, buf: &[f32], dest: usize, tag: u16) -> Result<()> {
        self.send_any(buf, dest, tag, false)
    }

    fn post_send(&self, buf: Vec<f32>, dest: usize, tag: u16) -> Result<()> {
        self.send_any(&buf, dest, tag, true)
    }

    fn flush_sends(&self) -> Result<()> {
        self.device_flush()
    }

    fn send_bf16(&self, buf: &[bf16], dest: usize, tag: u16) -> Result<()> {
        self.send_any(as_bits(buf), dest, tag, false)
    }

    fn post_send_bf16(&self, buf: Vec<bf16>, dest: usize, tag: u16) -> Result<()> {
        self.send_any(as_bits(&buf), dest, tag, true)
    }

    fn recv(&self, count: usize, src: usize, tag: u16) -> Result<Vec<f32>> {
        self.recv_any(count, src, tag)
    }

    fn recv_bf16(&self, count: usize, src: usize, tag: u16) -> Result<Vec<bf16>> {
        self.recv_any(count, src, tag).map(from_bits)
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        check_peer("root", root, self.size())?;
        let n = buf.len();
        // SAFETY: `staged` hands addresses of its own allocations of `n` elements.
        let out = self.staged(buf, n, |c, b| unsafe {
            c.device_broadcast(b, n, Elem::F32, root)
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

impl NcclComm {
    fn gather_any<T: Wire>(&self, send: &[T]) -> Result<Vec<T>> {
        let n = send.len();
        // SAFETY: `staged` allocates `n` input and `size · n` output elements.
        self.staged(send, n * self.size(), |c, b| unsafe {
            c.device_all_gather(b, n, T::ELEM)
        })
    }

    fn gather_v_any<T: Wire>(&self, send: &[T], counts: &[usize]) -> Result<Vec<T>> {
        check_gather_counts(counts, self.rank(), self.size(), send.len())?;
        let total = counts.iter().sum();
        // SAFETY: `staged` allocates `counts[rank]` input and `Σ counts` output elements.
        self.staged(send, total, |c, b| unsafe {
            c.device_all_gather_v(b, counts, T::ELEM)
        })
    }

    fn reduce_scatter_any<T: Wire>(&self, send: &[T], op: ReduceOp) -> Result<Vec<T>> {
        let block = block_len("send", send.len(), self.size())?;
        // SAFETY: `staged` allocates `size · block` input and `block` output elements.
        self.staged(send, block, |c, b| unsafe {
            c.device_reduce_scatter(b, block, T::ELEM, op)
        })
    }

    fn all_to_all_v_any<T: Wire>(
        &self,
        send: &[T],
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Result<Vec<T>> {
        let sent = check_counts("send_counts", send_counts, self.size())?;
        let received = check_counts("recv_counts", recv_counts, self.size())?;
        if sent != send.len() {
            return Err(ParallelError::InvalidArgument {
                name: "send_counts",
                reason: format!("sum {sent} but {} values were given", send.len()),
            });
        }
        // SAFETY: `staged` allocates `Σ send_counts` input and `Σ recv_counts` output elements.
        self.staged(send, received, |c, b| unsafe {
            c.device_all_to_all_v(b, send_counts, recv_counts, T::ELEM)
        })
    }

    fn send_any<T: Wire>(&self, buf: &[T], dest: usize, tag: u16, post: bool) -> Result<()> {
        check_peer("dest", dest, self.size())?;
        let n = buf.len();
        // SAFETY: `staged` allocates `n` input elements; a posted message keeps them (the
        // buffers travel in `keep`).
        self.staged(buf, 0, |c, b| unsafe {
            c.device_send(b, n, T::ELEM, dest, tag, post)
        })
        .map(|_| ())
    }

    fn recv_any<T: Wire>(&self, count: usize, src: usize, tag: u16) -> Result<Vec<T>> {
        check_peer("src", src, self.size())?;
        // SAFETY: `staged` allocates `count` output elements.
        self.staged(&[], count, |c, b| unsafe {
            c.device_recv(b, count, T::ELEM, src, tag)
        })
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        self.engine.shutdown();
    }
}
