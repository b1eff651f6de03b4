//! The world of one rank: every collective is a local copy.

use std::sync::Arc;

use super::{Communicator, ReduceOp, block_len, check_counts, check_gather_counts, check_peer};
use crate::error::{ParallelError, Result};

/// A communicator of one rank (the default engine; needs no system packages).
///
/// Collectives follow their definitions for a group of one: all-reduce, all-gather and
/// reduce-scatter return the input, all-to-all-v returns the input when the counts agree.
/// Point-to-point calls have no peer and return an error.
#[derive(Debug, Clone)]
pub struct SingleRank {
    world_rank: [usize; 1],
}

impl SingleRank {
    /// A single-rank world.
    pub fn new() -> Self {
        Self { world_rank: [0] }
    }

    /// A single-rank group whose member has world rank `world_rank` (what `split` of a larger
    /// engine returns for a group of one).
    pub fn with_world_rank(world_rank: usize) -> Self {
        Self {
            world_rank: [world_rank],
        }
    }
}

impl Default for SingleRank {
    fn default() -> Self {
        Self::new()
    }
}

impl Communicator for SingleRank {
    fn engine(&self) -> &'static str {
        "single"
    }

    fn rank(&self) -> usize {
        0
    }

    fn size(&self) -> usize {
        1
    }

    fn world_ranks(&self) -> &[usize] {
        &self.world_rank
    }

    fn split(&self, color: Option<u32>, _key: u32) -> Result<Option<Arc<dyn Communicator>>> {
        Ok(color.map(|_| Arc::new(self.clone()) as Arc<dyn Communicator>))
    }

    fn all_reduce(&self, _buf: &mut [f32], _op: ReduceOp) -> Result<()> {
        Ok(())
    }

    fn all_gather(&self, send: &[f32]) -> Result<Vec<f32>> {
        Ok(send.to_vec())
    }

    fn all_gather_v(&self, send: &[f32], counts: &[usize]) -> Result<Vec<f32>> {
        check_gather_counts(counts, 0, 1, send.len())?;
        Ok(send.to_vec())
    }

    fn reduce_scatter(&self, send: &[f32], _op: ReduceOp) -> Result<Vec<f32>> {
        block_len("send", send.len(), 1)?;
        Ok(send.to_vec())
    }

    fn all_to_all_v(
        &self,
        send: &[f32],
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Result<Vec<f32>> {
        let sent = check_counts("send_counts", send_counts, 1)?;
        let received = check_counts("recv_counts", recv_counts, 1)?;
        if sent != send.len() || received != sent {
            return Err(ParallelError::InvalidArgument {
                name: "send_counts",
                reason: format!(
                    "a single rank sends {sent} values to itself, receives {received}, \
                     and was given {}",
                    send.len()
                ),
            });
        }
        Ok(send.to_vec())
    }

    fn send(&self, _buf: &[f32], dest: usize, _tag: u16) -> Result<()> {
        check_peer("dest", dest, 1)?;
        Err(ParallelError::InvalidArgument {
            name: "dest",
            reason: "a single-rank group has no peer to send to".into(),
        })
    }

    fn recv(&self, _count: usize, src: usize, _tag: u16) -> Result<Vec<f32>> {
        check_peer("src", src, 1)?;
        Err(ParallelError::InvalidArgument {
            name: "src",
            reason: "a single-rank group has no peer to receive from".into(),
        })
    }

    fn broadcast(&self, _buf: &mut [f32], root: usize) -> Result<()> {
        check_peer("root", root, 1)
    }

    fn broadcast_bytes(&self, _buf: &mut Vec<u8>, root: usize) -> Result<()> {
        check_peer("root", root, 1)
    }

    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}
