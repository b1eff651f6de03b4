//! How router statistics are reduced across ranks.
//!
//! Megatron-Core sums the aux-loss token counts over the tensor×context-parallel group, the
//! global-aux-loss and expert-bias counts over the tensor×data×context-parallel group, and
//! divides the z-loss coefficient by the tensor×context-parallel size. A [`RouterReduce`] is the
//! value a router holds to do that; [`SingleRank`] is the one-process default and
//! `burn-parallel` provides the multi-rank implementation.

use std::fmt::Debug;

use burn::tensor::Tensor;
use burn_parallel::comm::ReduceOp;
use burn_parallel::group::{Group, ProcessGroups};
use burn_parallel::mesh::GroupKind;

use crate::error::Result;
use crate::host;

/// Cross-rank reductions used by the router's losses and expert-bias update.
pub trait RouterReduce: Debug + Send + Sync {
    /// Size of the tensor×context-parallel group.
    fn tp_cp_size(&self) -> usize;
    /// Size of the tensor×data×context-parallel group.
    fn tp_dp_cp_size(&self) -> usize;
    /// Sums `counts` over the tensor×context-parallel group.
    fn sum_tp_cp(&self, counts: Tensor<1>) -> Result<Tensor<1>>;
    /// Sums `counts` over the tensor×data×context-parallel group.
    fn sum_tp_dp_cp(&self, counts: Tensor<1>) -> Result<Tensor<1>>;
}

/// One process: every group has size 1 and reductions are the identity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SingleRank;

impl RouterReduce for SingleRank {
    fn tp_cp_size(&self) -> usize {
        1
    }
    fn tp_dp_cp_size(&self) -> usize {
        1
    }
    fn sum_tp_cp(&self, counts: Tensor<1>) -> Result<Tensor<1>> {
        Ok(counts)
    }
    fn sum_tp_dp_cp(&self, counts: Tensor<1>) -> Result<Tensor<1>> {
        Ok(counts)
    }
}

/// Megatron's reductions over real process groups: the attention mapping's TP×CP group for the
/// aux-loss counts and z-loss scaling, TP×DP×CP for the global aux loss and expert-bias counts.
/// Counts are summed on the host (one read of `E` values per call).
#[derive(Debug, Clone)]
pub struct GroupReduce {
    tp_cp: Group,
    tp_dp_cp: Group,
}

impl GroupReduce {
    /// The groups of this rank.
    pub fn new(groups: &ProcessGroups) -> Self {
        Self {
            tp_cp: groups.group(GroupKind::TpCp).clone(),
            tp_dp_cp: groups.group(GroupKind::TpDpCp).clone(),
        }
    }

    fn sum(group: &Group, counts: Tensor<1>) -> Result<Tensor<1>> {
        if group.size() == 1 {
            return Ok(counts);
        }
        let device = counts.device();
        let n = counts.dims()[0];
        let mut values = host::read_f32(counts.detach(), "reading expert counts")?;
        group
            .communicator()?
            .all_reduce(&mut values, ReduceOp::Sum)?;
        Ok(host::upload_f32(
            values,
            [n],
            &device,
            "uploading the reduced expert counts",
        ))
    }
}

impl RouterReduce for GroupReduce {
    fn tp_cp_size(&self) -> usize {
        self.tp_cp.size()
    }
    fn tp_dp_cp_size(&self) -> usize {
        self.tp_dp_cp.size()
    }
    fn sum_tp_cp(&self, counts: Tensor<1>) -> Result<Tensor<1>> {
        Self::sum(&self.tp_cp, counts)
    }
    fn sum_tp_dp_cp(&self, counts: Tensor<1>) -> Result<Tensor<1>> {
        Self::sum(&self.tp_dp_cp, counts)
    }
}
