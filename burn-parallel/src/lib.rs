#![warn(missing_docs)]
//! # burn-parallel
//!
//! Megatron-Core's process-group mesh for Burn, with MoE Parallel Folding: attention and dense
//! layers use `tp × cp × dp × pp`, MoE layers `etp × ep × edp × pp`, over the same ranks.
//! The mesh is a value that builds every group once; modules hold the groups they need.
//!
//! ```
//! use burn_parallel::prelude::*;
//!
//! // 8 ranks: attention TP2 × CP2 × DP2, MoE ETP1 × EP4 × EDP2 (folded).
//! let mesh = Mesh::new(8, ParallelDims::new(2, 2, 2, 1), MoeDims::new(1, 4, 2)).unwrap();
//! assert_eq!(mesh.groups(GroupKind::Tp), &[vec![0, 1], vec![2, 3], vec![4, 5], vec![6, 7]]);
//! assert_eq!(mesh.group_of(GroupKind::Ep, 5).unwrap(), &[4, 5, 6, 7]);
//! ```

pub mod comm;
pub mod error;
pub mod group;
pub mod layers;
pub mod mappings;
pub mod mesh;
pub mod ops;
pub mod optim;

pub use error::{ParallelError, Result};

/// Everything needed in one import.
pub mod prelude {
    pub use crate::comm::{Communicator, ReduceOp, SingleRank};
    pub use crate::error::ParallelError;
    pub use crate::group::{Group, GroupId, ProcessGroups};
    pub use crate::layers::{
        ColumnParallelLinear, ParallelAttention, ParallelMlp, ParallelParams, ParamRole, RmsNorm,
        RowParallelLinear, VocabParallelEmbedding, vocab_parallel_cross_entropy,
    };
    pub use crate::mesh::{GroupKind, Mesh, MoeDims, ParallelDims};
    pub use crate::ops::GatherGrad;
    pub use crate::optim::{AdamWConfig, DistributedAdamW, StepStats};
}
