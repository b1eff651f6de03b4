//! How router statistics are reduced across ranks.
//!
//! Megatron-Core sums the aux-loss token counts over the tensor×context-parallel group, the
//! global-aux-loss and expert-bias counts over the tensor×data×context-parallel group, and
//! divides the z-loss coefficient by the tensor×context-parallel size. A [`RouterReduce`] is the
//! value a router holds to do that; [`SingleRank`] is the one-process default and
//! `burn-parallel` provides the multi-rank implementation.

use std::fmt::Debug;

use burn::tensor::Tensor;

use crate::error::Result;

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
