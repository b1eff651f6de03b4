//! OpenMPI through the `mpi` crate (feature `mpi`).
//!
//! Every MPI call runs on one engine thread that initialises MPI, owns every MPI communicator and
//! finalises MPI when the [`MpiWorld`] guard is dropped. Callers hand it jobs with owned buffers
//! and wait for the answer with a timeout, so a collective whose peer died returns
//! [`ParallelError::PeerLost`] (or [`ParallelError::Timeout`]) instead of hanging. After such a
//! failure the engine is poisoned: the stuck job still owns its buffers, nothing is freed under
//! MPI, and every later call fails at once with [`ParallelError::Poisoned`].
//!
//! A peer is found dead by its process: at start-up every rank shares its host and PID, and a
//! timed-out rank checks `/proc/PID` for peers on its own host. Under `mpirun`, pass
//! `--enable-recovery` so the survivors live long enough to report the lost peer (without it,
//! `mpirun` kills them as soon as one rank dies).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use half::bf16;

use mpi::Count;
use mpi::collective::SystemOperation;
use mpi::datatype::{Partition, PartitionMut};
use mpi::environment::Universe;
use mpi::topology::Communicator as _;
use mpi::topology::{Color, SimpleCommunicator};
use mpi::traits::*;

use super::worker::{Peer, Worker};
use super::{
    Buffer, Collective, Communicator, ReduceOp, as_bits, block_len, check_counts,
    check_gather_counts, check_peer, from_bits, into_bits, narrow, widen,
};
use crate::error::{ParallelError, Result};

pub use super::TIMEOUT_ENV;

/// Settings of the MPI engine.
#[derive(Debug, Clone, PartialEq)]
pub struct MpiConfig {
    /// How long any blocking call may take before the peers are checked and an error returned.
    pub timeout: Duration,
}

impl Default for MpiConfig {
    fn default() -> Self {
        Self {
            timeout: super::DEFAULT_TIMEOUT,
        }
    }
}

impl MpiConfig {
    /// The default settings, with the timeout taken from `BURN_PARALLEL_TIMEOUT_S` when set.
    pub fn from_env() -> Result<Self> {
        Ok(Self {
            timeout: super::timeout_from_env()?,
        })
    }
}

/// State owned by the engine thread. Communicators drop before the universe (MPI_Finalize).
struct MpiState {
    /// Sends posted with `post_send` and not yet known to be complete.
    pending: Vec<PendingSend>,
    comms: Vec<SimpleCommunicator>,
    _universe: Universe,
}

/// A nonblocking send and the buffer it reads (leaked from a `Box` until MPI is done with it):
/// f32 values, or bf16 values as their bits.
enum PendingSend {
    F32(Posted<f32>),
    Bits(Posted<u16>),
}

struct Posted<T: 'static> {
    request: mpi::request::Request<'static, [T]>,
    buf: &'static [T],
}

impl<T: 'static> Posted<T> {
    /// Completes the send if it is done (waiting for it with `wait`) and releases its buffer;
    /// gives it back otherwise.
    fn reap(self, wait: bool) -> Option<Self> {
        let Self { request, buf } = self;
        let done = if wait {
            Ok(request.wait())
        } else {
            request.test()
        };
        match done {
            Ok(_) => {
                release(buf);
                None
            }
            Err(request) => Some(Self { request, buf }),
        }
    }
}

/// Returns the buffer of a completed send to the allocator.
#[allow(unsafe_code)]
fn release<T>(buf: &'static [T]) {
    // SAFETY: `buf` comes from `Box::leak` in `post_send`, and the only other user of it, the
    // MPI request, has completed and was consumed; no reference to it remains.
    drop(unsafe { Box::from_raw(std::ptr::from_ref(buf).cast_mut()) });
}

impl MpiState {
    /// Completes the posted sends that are done (all of them when `wait`), releasing their
    /// buffers.
    fn reap(&mut self, wait: bool) {
        let pending = std::mem::take(&mut self.pending);
        self.pending = pending
            .into_iter()
            .filter_map(|p| match p {
                PendingSend::F32(p) => p.reap(wait).map(PendingSend::F32),
                PendingSend::Bits(p) => p.reap(wait).map(PendingSend::Bits),
            })
            .collect();
    }

    /// Posts a nonblocking send of `buf` to `dest` on communicator `id`; the buffer lives
    /// until the send completes.
    fn post<T: Equivalence + 'static>(
        &mut self,
        id: usize,
        buf: Vec<T>,
        (dest, tag): (usize, u16),
        wrap: fn(Posted<T>) -> PendingSend,
    ) {
        self.reap(false);
        let buf: &'static [T] = Box::leak(buf.into_boxed_slice());
        let request = self.comms[id]
            .process_at_rank(dest as i32)
            .immediate_send_with_tag(mpi::request::StaticScope, buf, i32::from(tag));
        self.pending.push(wrap(Posted { request, buf }));
    }
}

impl Drop for MpiState {
    fn drop(&mut self) {
        // Before MPI_Finalize: every posted send must complete.
        self.reap(true);
    }
}

type Engine = Worker<MpiState>;

fn to_count(name: &'static str, n: usize) -> Result<Count> {
    Count::try_from(n).map_err(|_| ParallelError::InvalidArgument {
        name,
        reason: format!("{n} values exceed MPI's count limit"),
    })
}

fn counts_and_displs(name: &'static str, counts: &[usize]) -> Result<(Vec<Count>, Vec<Count>)> {
    let mut c = Vec::with_capacity(counts.len());
    let mut d = Vec::with_capacity(counts.len());
    let mut offset = 0usize;
    for &n in counts {
        c.push(to_count(name, n)?);
        d.push(to_count(name, offset)?);
        offset += n;
    }
    Ok((c, d))
}

fn system_op(op: ReduceOp) -> SystemOperation {
    match op {
        ReduceOp::Max => SystemOperation::max(),
        ReduceOp::Sum | ReduceOp::Avg => SystemOperation::sum(),
    }
}

fn finish_avg(buf: &mut [f32], op: ReduceOp, size: usize) {
    if op == ReduceOp::Avg {
        let n = size as f32;
        buf.iter_mut().for_each(|v| *v /= n);
    }
}

/// The MPI world of this process. Dropping it finalises MPI (after which every communicator of
/// this engine returns errors); keep it alive for the whole run.
#[derive(Debug)]
pub struct MpiWorld {
    engine: Arc<Engine>,
    world: Arc<dyn Communicator>,
}

impl MpiWorld {
    /// Initialises MPI on the engine thread. Fails when MPI was already initialised in this
    /// process or the library cannot start.
    pub fn init(config: MpiConfig) -> Result<Self> {
        let (mut engine, (rank, size, raw_peers)) = Worker::spawn("mpi", config.timeout, || {
            let (universe, _threading) = mpi::initialize_with_threading(mpi::Threading::Funneled)
                .ok_or(ParallelError::Unavailable {
                engine: "mpi",
                reason: "MPI was already initialised in this process".into(),
            })?;
            let world = universe.world();
            let (rank, size) = (world.rank() as usize, world.size() as usize);
            let me = Peer::me();
            let mut peers = vec![0u64; 2 * size];
            world.all_gather_into(&[me.host, me.pid][..], &mut peers[..]);
            let state = MpiState {
                pending: Vec::new(),
                comms: vec![world],
                _universe: universe,
            };
            Ok((state, (rank, size, peers)))
        })?;
        let peers = raw_peers
            .chunks_exact(2)
            .map(|p| Peer {
                host: p[0],
                pid: p[1],
            })
            .collect();
        engine.set_peers(peers, rank);
        let engine = Arc::new(engine);
        let world = Arc::new(MpiComm {
            engine: engine.clone(),
            id: 0,
            rank,
            world_ranks: (0..size).collect(),
        });
        Ok(Self { engine, world })
    }

    /// The world communicator.
    pub fn communicator(&self) -> Arc<dyn Communicator> {
        self.world.clone()
    }

    /// This process's world rank.
    pub fn rank(&self) -> usize {
        self.world.rank()
    }

    /// Number of processes.
    pub fn size(&self) -> usize {
        self.world.size()
    }

    /// The timeout of every blocking call.
    pub fn timeout(&self) -> Duration {
        self.engine.timeout()
    }
}

impl Drop for MpiWorld {
    fn drop(&mut self) {
        // The engine thread drops its state (MPI_Finalize) and exits.
        self.engine.shutdown();
    }
}

/// A group of the MPI engine.
#[derive(Debug)]
pub struct MpiComm {
    engine: Arc<Engine>,
    id: usize,
    rank: usize,
    world_ranks: Vec<usize>,
}

impl MpiComm {
    fn call<T, F>(&self, op: &'static str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&SimpleCommunicator) -> Result<T> + Send + 'static,
    {
        let id = self.id;
        self.engine
            .call(op, &self.world_ranks, move |state| f(&state.comms[id]))
    }

    /// [`call`](Self::call) with the whole engine state and this group's index in it.
    fn call_state<T, F>(&self, op: &'static str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut MpiState, usize) -> Result<T> + Send + 'static,
    {
        let id = self.id;
        self.engine
            .call(op, &self.world_ranks, move |state| f(state, id))
    }
}

/// Bytes this process has handed to MPI as send buffers.
static BYTES_SENT: AtomicU64 = AtomicU64::new(0);

/// Bytes this process has handed to MPI as send buffers so far (collectives, sends, a
/// broadcast's root): what travels, at the size it travels in — bf16 values of the data
/// movements (all-gather(-v), all-to-all-v, send) as 2 bytes, reductions accumulate in f32
/// and send 4 (MPI has no bf16 sum).
pub fn bytes_sent() -> u64 {
    BYTES_SENT.load(Ordering::Relaxed)
}

/// Bytes the MPI engine copied out of callers' buffers into buffers of its own (the engine
/// thread must own what it sends): the slice methods copy, [`Communicator::exchange`] on owned
/// values does not.
static BYTES_COPIED: AtomicU64 = AtomicU64::new(0);

/// Bytes the MPI engine has copied from callers' send buffers so far (see [`bytes_sent`] for
/// what it sent).
pub fn bytes_copied() -> u64 {
    BYTES_COPIED.load(Ordering::Relaxed)
}

/// A copy of a caller's slice for the engine thread, counted.
fn owned<T: Clone>(buf: &[T]) -> Vec<T> {
    BYTES_COPIED.fetch_add(std::mem::size_of_val(buf) as u64, Ordering::Relaxed);
    buf.to_vec()
}

fn sending<T>(buf: &[T]) {
    BYTES_SENT.fetch_add(std::mem::size_of_val(buf) as u64, Ordering::Relaxed);
}

/// A caller's bf16 slice as bits the engine owns (a counted copy).
fn bits(values: &[bf16]) -> Vec<u16> {
    owned(as_bits(values))
}

impl MpiComm {
    /// All-reduce of owned values.
    fn all_reduce_owned(&self, send: Vec<f32>, op: ReduceOp) -> Result<Vec<f32>> {
        sending(&send);
        let size = self.size();
        self.call("all_reduce", move |comm| {
            let mut recv = vec![0f32; send.len()];
            comm.all_reduce_into(&send[..], &mut recv[..], system_op(op));
            finish_avg(&mut recv, op, size);
            Ok(recv)
        })
    }

    /// Reduce-scatter of owned values.
    fn reduce_scatter_owned(&self, send: Vec<f32>, op: ReduceOp) -> Result<Vec<f32>> {
        let size = self.size();
        let block = block_len("send", send.len(), size)?;
        sending(&send);
        self.call("reduce_scatter", move |comm| {
            let mut recv = vec![0f32; block];
            comm.reduce_scatter_block_into(&send[..], &mut recv[..], system_op(op));
            finish_avg(&mut recv, op, size);
            Ok(recv)
        })
    }

    /// All-gather of equal contributions of any MPI type.
    fn gather_any<T>(&self, op: &'static str, send: Vec<T>) -> Result<Vec<T>>
    where
        T: Equivalence + Copy + Default + Send + 'static,
    {
        sending(&send);
        let size = self.size();
        self.call(op, move |comm| {
            let mut recv = vec![T::default(); send.len() * size];
            comm.all_gather_into(&send[..], &mut recv[..]);
            Ok(recv)
        })
    }

    /// All-gather of contributions of `counts[rank]` values of any MPI type.
    fn gather_v_any<T>(&self, op: &'static str, send: Vec<T>, counts: &[usize]) -> Result<Vec<T>>
    where
        T: Equivalence + Copy + Default + Send + 'static,
    {
        let total = check_gather_counts(counts, self.rank, self.size(), send.len())?;
        let (c, d) = counts_and_displs("counts", counts)?;
        sending(&send);
        self.call(op, move |comm| {
            let mut recv = vec![T::default(); total];
            let mut partition = PartitionMut::new(&mut recv[..], c, d);
            comm.all_gather_varcount_into(&send[..], &mut partition);
            Ok(recv)
        })
    }

    /// All-to-all-v of any MPI type.
    fn all_to_all_v_any<T>(
        &self,
        op: &'static str,
        send: Vec<T>,
        (send_counts, recv_counts): (&[usize], &[usize]),
    ) -> Result<Vec<T>>
    where
        T: Equivalence + Copy + Default + Send + 'static,
    {
        let sent = check_counts("send_counts", send_counts, self.size())?;
        let total = check_counts("recv_counts", recv_counts, self.size())?;
        if sent != send.len() {
            return Err(ParallelError::InvalidArgument {
                name: "send_counts",
                reason: format!("sum {sent} but {} values were given", send.len()),
            });
        }
        let (sc, sd) = counts_and_displs("send_counts", send_counts)?;
        let (rc, rd) = counts_and_displs("recv_counts", recv_counts)?;
        sending(&send);
        self.call(op, move |comm| {
            let mut recv = vec![T::default(); total];
            let send_part = Partition::new(&send[..], sc, sd);
            let mut recv_part = PartitionMut::new(&mut recv[..], rc, rd);
            comm.all_to_all_varcount_into(&send_part, &mut recv_part);
            Ok(recv)
        })
    }

    /// Blocking send of any MPI type.
    fn send_any<T>(&self, buf: Vec<T>, dest: usize, tag: u16) -> Result<()>
    where
        T: Equivalence + Send + 'static,
    {
        check_peer("dest", dest, self.size())?;
        sending(&buf);
        self.call("send", move |comm| {
            comm.process_at_rank(dest as i32)
                .send_with_tag(&buf[..], i32::from(tag));
            Ok(())
        })
    }

    /// Receive of `count` values of any MPI type.
    fn recv_any<T>(&self, count: usize, src: usize, tag: u16) -> Result<Vec<T>>
    where
        T: Equivalence + Copy + Default + Send + 'static,
    {
        check_peer("src", src, self.size())?;
        self.call_state("recv", move |state, id| {
            state.reap(false);
            let comm = &state.comms[id];
            let mut buf = vec![T::default(); count];
            let status = comm
                .process_at_rank(src as i32)
                .receive_into_with_tag(&mut buf[..], i32::from(tag));
            let got = status.count(T::equivalent_datatype()) as usize;
            if got != count {
                return Err(ParallelError::InvalidArgument {
                    name: "count",
                    reason: format!("expected {count} values from rank {src}, received {got}"),
                });
            }
            Ok(buf)
        })
    }
}

impl Communicator for MpiComm {
    fn engine(&self) -> &'static str {
        "mpi"
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.world_ranks.len()
    }

    fn world_ranks(&self) -> &[usize] {
        &self.world_ranks
    }

    fn split(&self, color: Option<u32>, key: u32) -> Result<Option<Arc<dyn Communicator>>> {
        let color = match color {
            Some(c) => Some(
                i32::try_from(c).map_err(|_| ParallelError::InvalidArgument {
                    name: "color",
                    reason: format!("{c} exceeds MPI's color range"),
                })?,
            ),
            None => None,
        };
        let key = i32::try_from(key).map_err(|_| ParallelError::InvalidArgument {
            name: "key",
            reason: format!("{key} exceeds MPI's key range"),
        })?;
        let parent = self.id;
        let my_world = self.world_ranks[self.rank] as u64;
        let split = self.engine.call("split", &self.world_ranks, move |state| {
            let comm = &state.comms[parent];
            let color = color.map_or_else(Color::undefined, Color::with_value);
            let Some(child) = comm.split_by_color_with_key(color, key) else {
                return Ok(None);
            };
            let size = child.size() as usize;
            let rank = child.rank() as usize;
            let mut world = vec![0u64; size];
            child.all_gather_into(&my_world, &mut world[..]);
            state.comms.push(child);
            let id = state.comms.len() - 1;
            Ok(Some((id, rank, world)))
        })?;
        Ok(split.map(|(id, rank, world)| {
            Arc::new(MpiComm {
                engine: self.engine.clone(),
                id,
                rank,
                world_ranks: world.into_iter().map(|r| r as usize).collect(),
            }) as Arc<dyn Communicator>
        }))
    }

    fn all_reduce(&self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        let out = self.all_reduce_owned(owned(buf), op)?;
        buf.copy_from_slice(&out);
        Ok(())
    }

    fn all_gather(&self, send: &[f32]) -> Result<Vec<f32>> {
        self.gather_any("all_gather", owned(send))
    }

    fn all_gather_v(&self, send: &[f32], counts: &[usize]) -> Result<Vec<f32>> {
        self.gather_v_any("all_gather_v", owned(send), counts)
    }

    fn reduce_scatter(&self, send: &[f32], op: ReduceOp) -> Result<Vec<f32>> {
        self.reduce_scatter_owned(owned(send), op)
    }

    fn all_to_all_v(
        &self,
        send: &[f32],
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Result<Vec<f32>> {
        self.all_to_all_v_any("all_to_all_v", owned(send), (send_counts, recv_counts))
    }

    /// The owned values go to the engine thread as they are: no copy (bf16 data movements
    /// reinterpret their bits in place; bf16 reductions widen to f32, as the slice methods).
    fn exchange(&self, what: &Collective, values: Buffer) -> Result<Buffer> {
        Ok(match (what, values) {
            (Collective::AllReduce(op), Buffer::F32(v)) => {
                Buffer::F32(self.all_reduce_owned(v, *op)?)
            }
            (Collective::AllReduce(op), Buffer::Bf16(v)) => {
                Buffer::Bf16(narrow(&self.all_reduce_owned(widen(&v), *op)?))
            }
            (Collective::AllGather, Buffer::F32(v)) => {
                Buffer::F32(self.gather_any("all_gather", v)?)
            }
            (Collective::AllGather, Buffer::Bf16(v)) => {
                Buffer::Bf16(from_bits(self.gather_any("all_gather_bf16", into_bits(v))?))
            }
            (Collective::AllGatherV(c), Buffer::F32(v)) => {
                Buffer::F32(self.gather_v_any("all_gather_v", v, c)?)
            }
            (Collective::AllGatherV(c), Buffer::Bf16(v)) => Buffer::Bf16(from_bits(
                self.gather_v_any("all_gather_v_bf16", into_bits(v), c)?,
            )),
            (Collective::ReduceScatter(op), Buffer::F32(v)) => {
                Buffer::F32(self.reduce_scatter_owned(v, *op)?)
            }
            (Collective::ReduceScatter(op), Buffer::Bf16(v)) => {
                Buffer::Bf16(narrow(&self.reduce_scatter_owned(widen(&v), *op)?))
            }
            (Collective::AllToAllV(sc, rc), Buffer::F32(v)) => {
                Buffer::F32(self.all_to_all_v_any("all_to_all_v", v, (sc, rc))?)
            }
            (Collective::AllToAllV(sc, rc), Buffer::Bf16(v)) => Buffer::Bf16(from_bits(
                self.all_to_all_v_any("all_to_all_v_bf16", into_bits(v), (sc, rc))?,
            )),
        })
    }

    fn send(&self, buf: &[f32], dest: usize, tag: u16) -> Result<()> {
        self.send_any(owned(buf), dest, tag)
    }

    fn post_send(&self, buf: Vec<f32>, dest: usize, tag: u16) -> Result<()> {
        check_peer("dest", dest, self.size())?;
        sending(&buf);
        self.call_state("post_send", move |state, id| {
            state.post(id, buf, (dest, tag), PendingSend::F32);
            Ok(())
        })
    }

    fn post_send_bf16(&self, buf: Vec<bf16>, dest: usize, tag: u16) -> Result<()> {
        check_peer("dest", dest, self.size())?;
        let bits = into_bits(buf);
        sending(&bits);
        self.call_state("post_send_bf16", move |state, id| {
            state.post(id, bits, (dest, tag), PendingSend::Bits);
            Ok(())
        })
    }

    fn flush_sends(&self) -> Result<()> {
        self.call_state("flush_sends", |state, _| {
            state.reap(true);
            Ok(())
        })
    }

    fn recv(&self, count: usize, src: usize, tag: u16) -> Result<Vec<f32>> {
        self.recv_any(count, src, tag)
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        check_peer("root", root, self.size())?;
        let mut values = owned(buf);
        if root == self.rank {
            sending(&values);
        }
        let out = self.call("broadcast", move |comm| {
            comm.process_at_rank(root as i32)
                .broadcast_into(&mut values[..]);
            Ok(values)
        })?;
        buf.copy_from_slice(&out);
        Ok(())
    }

    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        check_peer("root", root, self.size())?;
        let mut owned = std::mem::take(buf);
        let out = self.call("broadcast_bytes", move |comm| {
            let root_process = comm.process_at_rank(root as i32);
            let mut len = owned.len() as u64;
            root_process.broadcast_into(&mut len);
            owned.resize(len as usize, 0);
            root_process.broadcast_into(&mut owned[..]);
            Ok(owned)
        })?;
        *buf = out;
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        self.call("barrier", |comm| {
            comm.barrier();
            Ok(())
        })
    }

    // bf16 data movements travel as their 16 bits; the reductions keep the trait's f32
    // accumulation.

    fn all_gather_bf16(&self, send: &[bf16]) -> Result<Vec<bf16>> {
        self.gather_any("all_gather_bf16", bits(send))
            .map(from_bits)
    }

    fn all_gather_v_bf16(&self, send: &[bf16], counts: &[usize]) -> Result<Vec<bf16>> {
        self.gather_v_any("all_gather_v_bf16", bits(send), counts)
            .map(from_bits)
    }

    fn all_to_all_v_bf16(
        &self,
        send: &[bf16],
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Result<Vec<bf16>> {
        self.all_to_all_v_any("all_to_all_v_bf16", bits(send), (send_counts, recv_counts))
            .map(from_bits)
    }

    fn send_bf16(&self, buf: &[bf16], dest: usize, tag: u16) -> Result<()> {
        self.send_any(bits(buf), dest, tag)
    }

    fn recv_bf16(&self, count: usize, src: usize, tag: u16) -> Result<Vec<bf16>> {
        self.recv_any::<u16>(count, src, tag).map(from_bits)
    }
}
