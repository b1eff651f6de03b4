//! Point-to-point messages matched in the order they were sent, whatever their tag, and posted
//! sends held back until the rank's next point-to-point operation, as the NCCL engine does:
//! [`InOrder`].

use std::sync::{Arc, Mutex};

use super::{Buffer, Collective, Communicator, ReduceOp, check_peer};
use crate::error::{ParallelError, Result};

/// The one tag every message carries on the inner communicator (the real tag travels in the
/// message).
const WIRE_TAG: u16 = u16::MAX;

/// A posted send held back: its framed values and destination.
type Held = (Vec<f32>, usize);

/// A communicator whose sends and receives behave as the NCCL engine's: a receive takes the
/// next message its peer sent to this rank, and a message with another tag (or length) than the
/// receive expects is an error, where MPI would have matched the tag; a posted send leaves only
/// with this rank's next send, receive or flush (the NCCL engine issues it in that operation's
/// group), not in the background. Collectives go to the inner communicator unchanged.
///
/// NCCL cannot form a multi-rank communicator on one GPU, so this is how a schedule's
/// point-to-point order is proven NCCL-compatible on CPU ranks: run it over
/// `InOrder::new(mpi_group)`. The tag travels as the first value of each message.
#[derive(Debug)]
pub struct InOrder {
    inner: Arc<dyn Communicator>,
    /// Posted sends not yet handed to the inner communicator: framed values, destination.
    held: Mutex<Vec<Held>>,
}

impl InOrder {
    /// `inner` with NCCL's point-to-point matching.
    pub fn new(inner: Arc<dyn Communicator>) -> Self {
        Self {
            inner,
            held: Mutex::new(Vec::new()),
        }
    }

    fn held(&self) -> Result<std::sync::MutexGuard<'_, Vec<Held>>> {
        self.held.lock().map_err(|_| ParallelError::Engine {
            engine: "in-order",
            op: "post_send",
            reason: "a thread panicked while posting".into(),
        })
    }

    /// Hands the held sends to the inner communicator, in the order they were posted.
    fn release(&self) -> Result<()> {
        let held = std::mem::take(&mut *self.held()?);
        for (framed, dest) in held {
            self.inner.post_send(framed, dest, WIRE_TAG)?;
        }
        Ok(())
    }

    fn framed(buf: &[f32], tag: u16) -> Vec<f32> {
        let mut framed = Vec::with_capacity(buf.len() + 1);
        framed.push(f32::from(tag));
        framed.extend_from_slice(buf);
        framed
    }
}

impl Communicator for InOrder {
    fn engine(&self) -> &'static str {
        self.inner.engine()
    }

    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn size(&self) -> usize {
        self.inner.size()
    }

    fn world_ranks(&self) -> &[usize] {
        self.inner.world_ranks()
    }

    fn split(&self, color: Option<u32>, key: u32) -> Result<Option<Arc<dyn Communicator>>> {
        Ok(self
            .inner
            .split(color, key)?
            .map(|sub| Arc::new(InOrder::new(sub)) as Arc<dyn Communicator>))
    }

    fn all_reduce(&self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        self.inner.all_reduce(buf, op)
    }

    fn all_gather(&self, send: &[f32]) -> Result<Vec<f32>> {
        self.inner.all_gather(send)
    }

    fn all_gather_v(&self, send: &[f32], counts: &[usize]) -> Result<Vec<f32>> {
        self.inner.all_gather_v(send, counts)
    }

    fn reduce_scatter(&self, send: &[f32], op: ReduceOp) -> Result<Vec<f32>> {
        self.inner.reduce_scatter(send, op)
    }

    fn all_to_all_v(
        &self,
        send: &[f32],
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Result<Vec<f32>> {
        self.inner.all_to_all_v(send, send_counts, recv_counts)
    }

    fn exchange(&self, what: &Collective, values: Buffer) -> Result<Buffer> {
        self.inner.exchange(what, values)
    }

    fn send(&self, buf: &[f32], dest: usize, tag: u16) -> Result<()> {
        self.release()?;
        self.inner.send(&Self::framed(buf, tag), dest, WIRE_TAG)
    }

    fn post_send(&self, buf: Vec<f32>, dest: usize, tag: u16) -> Result<()> {
        check_peer("dest", dest, self.size())?;
        self.held()?.push((Self::framed(&buf, tag), dest));
        Ok(())
    }

    fn flush_sends(&self) -> Result<()> {
        self.release()?;
        self.inner.flush_sends()
    }

    fn recv(&self, count: usize, src: usize, tag: u16) -> Result<Vec<f32>> {
        self.release()?;
        let mut got = self.inner.recv(count + 1, src, WIRE_TAG)?;
        let sent = got.first().copied().unwrap_or(f32::NAN);
        if sent != f32::from(tag) {
            return Err(ParallelError::Engine {
                engine: "in-order",
                op: "recv",
                reason: format!(
                    "the next message from rank {src} has tag {sent}, the receive expects tag \
                     {tag}: NCCL would deliver it here (it matches messages by their order \
                     per peer, not by tag)"
                ),
            });
        }
        got.remove(0);
        Ok(got)
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        self.inner.broadcast(buf, root)
    }

    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        self.inner.broadcast_bytes(buf, root)
    }

    fn barrier(&self) -> Result<()> {
        self.inner.barrier()
    }
}
