//! A rank's place in a group without a connection to its peers: [`Detached`].

use std::sync::Arc;

use super::{Communicator, ReduceOp};
use crate::error::{ParallelError, Result};

/// A member of a group that cannot communicate: it knows its rank and the group's world
/// ranks, and every collective returns an error. What a process uses to lay out another
/// rank's share of a model (reading or converting a checkpoint written under another layout,
/// planning) without that rank running ([`crate::group::ProcessGroups::detached`]).
#[derive(Debug, Clone)]
pub struct Detached {
    rank: usize,
    world_ranks: Vec<usize>,
}

impl Detached {
    /// Member `rank` of the group of `world_ranks`.
    pub fn new(rank: usize, world_ranks: Vec<usize>) -> Result<Self> {
        if rank >= world_ranks.len() {
            return Err(ParallelError::RankOutOfRange {
                rank,
                world_size: world_ranks.len(),
            });
        }
        Ok(Self { rank, world_ranks })
    }

    fn refuse<T>(&self, op: &'static str) -> Result<T> {
        Err(ParallelError::Engine {
            engine: "detached",
            op,
            reason: format!(
                "rank {} of the group of world ranks {:?} is a detached view (for laying out a \
                 rank's share of a model); it cannot communicate",
                self.rank, self.world_ranks
            ),
        })
    }
}

impl Communicator for Detached {
    fn engine(&self) -> &'static str {
        "detached"
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

    fn split(&self, _color: Option<u32>, _key: u32) -> Result<Option<Arc<dyn Communicator>>> {
        self.refuse("split")
    }

    fn all_reduce(&self, _buf: &mut [f32], _op: ReduceOp) -> Result<()> {
        self.refuse("all_reduce")
    }

    fn all_gather(&self, _send: &[f32]) -> Result<Vec<f32>> {
        self.refuse("all_gather")
    }

    fn all_gather_v(&self, _send: &[f32], _counts: &[usize]) -> Result<Vec<f32>> {
        self.refuse("all_gather_v")
    }

    fn reduce_scatter(&self, _send: &[f32], _op: ReduceOp) -> Result<Vec<f32>> {
        self.refuse("reduce_scatter")
    }

    fn all_to_all_v(
        &self,
        _send: &[f32],
        _send_counts: &[usize],
        _recv_counts: &[usize],
    ) -> Result<Vec<f32>> {
        self.refuse("all_to_all_v")
    }

    fn send(&self, _buf: &[f32], _dest: usize, _tag: u16) -> Result<()> {
        self.refuse("send")
    }

    fn recv(&self, _count: usize, _src: usize, _tag: u16) -> Result<Vec<f32>> {
        self.refuse("recv")
    }

    fn broadcast(&self, _buf: &mut [f32], _root: usize) -> Result<()> {
        self.refuse("broadcast")
    }

    fn broadcast_bytes(&self, _buf: &mut Vec<u8>, _root: usize) -> Result<()> {
        self.refuse("broadcast_bytes")
    }

    fn barrier(&self) -> Result<()> {
        self.refuse("barrier")
    }
}
