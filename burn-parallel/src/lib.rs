#![warn(missing_docs)]
//! # burn-parallel
//!
//! Megatron-Core's parallelism for Burn, on real distributed engines.
//!
//! - [`mesh`]: the process-group mesh with MoE Parallel Folding: attention and dense layers use
//!   `tp × cp × dp × pp`, MoE layers `etp × ep × edp × pp`, over the same ranks (Megatron's
//!   `RankGenerator` semantics). A value that lists every group; no globals.
//! - [`comm`]: the [`Communicator`](comm::Communicator) trait and its engines: `SingleRank`
//!   (default), MPI (feature `mpi`), NCCL (feature `nccl`, enabled by `cuda`; with `cuda` the
//!   tensor collectives on CUDA tensors run on their device memory). Every blocking call has a
//!   timeout; a dead peer is reported by rank.
//! - [`group`]: [`ProcessGroups`](group::ProcessGroups) splits the world into the mesh's groups.
//! - [`ops`] / [`mappings`]: collectives on tensors as the `ParallelBackend` backend extension,
//!   with the conjugate backward rules of Megatron's `tensor_parallel/mappings.py`.
//! - [`layers`]: column/row-parallel linear, vocab-parallel embedding and cross-entropy,
//!   sequence-parallel RMSNorm, TP attention and MLP.
//! - [`context`]: context parallelism: load-balanced sequence split, ring attention and
//!   all-gather-KV attention.
//! - [`optim`]: data parallelism with the distributed optimizer (ZeRO-1 AdamW, global-norm
//!   clipping).
//! - [`pipeline`]: runs a stage's share of a schedule with autodiff, exchanging activations
//!   and gradients with posted sends.
//! - [`schedule`]: pipeline schedules (GPipe, 1F1B, interleaved 1F1B) in Megatron's order,
//!   with a replay that checks them for deadlocks and measures their bubble.
//! - [`memory`]: a counting global allocator for peak-memory reports.
//! - [`world`]: one binary runs alone or under `mpirun -np N` (MPI, or NCCL for CUDA tensors);
//!   [`launch`] starts such runs.
//! - What every trainer shares: [`checkpoint`] (sharded, checksummed checkpoints of a module
//!   and its optimizer state, keyed by module path, written atomically), [`run_dir`] (a run
//!   folder's lock and its `metrics.jsonl`, cut back on resume), [`ema`] (weight averaging),
//!   [`lr_schedule`] (warm-up + cosine) and [`rng`] (the counter-based generator behind every seeded draw).
//!
//! ```
//! use burn_parallel::prelude::*;
//!
//! // 8 ranks: attention TP2 × CP2 × DP2, MoE ETP1 × EP4 × EDP2 (folded).
//! let mesh = Mesh::new(8, ParallelDims::new(2, 2, 2, 1), MoeDims::new(1, 4, 2)).unwrap();
//! assert_eq!(mesh.groups(GroupKind::Tp), &[vec![0, 1], vec![2, 3], vec![4, 5], vec![6, 7]]);
//! assert_eq!(mesh.group_of(GroupKind::Ep, 5).unwrap(), &[4, 5, 6, 7]);
//! ```
//!
//! A tensor-parallel layer and one ZeRO-1 step; under `mpirun -np 2` (feature `mpi`) with
//! `ParallelDims::new(2, 1, 1, 1)` the same code splits the layer over two ranks.
//!
//! ```
//! use burn::tensor::{Device, Distribution, Tensor};
//! use burn_parallel::prelude::*;
//!
//! # fn main() -> Result<(), ParallelError> {
//! let world = World::from_env()?;
//! let n = world.size();
//! let mesh = Mesh::new(n, ParallelDims::new(1, 1, n, 1), MoeDims::new(1, 1, n))?;
//! let groups = ProcessGroups::new(mesh, world.communicator())?;
//! let tp = groups.group(GroupKind::Tp).clone();
//!
//! let device = Device::flex().autodiff();
//! let w1 = Tensor::<2>::random([16, 64], Distribution::Normal(0.0, 0.1), &device);
//! let w2 = Tensor::<2>::random([64, 16], Distribution::Normal(0.0, 0.1), &device);
//! let (b1, b2) = (Tensor::zeros([64], &device), Tensor::zeros([16], &device));
//! let mlp = ParallelMlp::from_full((w1, b1), (w2, b2), tp.clone(), false)?;
//!
//! let x = Tensor::<3>::random([8, 2, 16], Distribution::Normal(0.0, 1.0), &device); // [S, B, H]
//! let loss = mlp.forward(x)?.square().mean();
//! let grads = loss.backward();
//! burn_parallel::group::check()?; // errors of collectives in the backward pass
//!
//! let mut roles = Vec::new();
//! mlp.param_roles(&mut roles);
//! let dp = groups.group(GroupKind::Dp).clone();
//! let mut opt = DistributedAdamW::new(AdamWConfig::default(), dp, tp, groups.world().clone())?;
//! let (mlp, stats) = opt.step(mlp, &grads, &roles)?;
//! assert!(stats.grad_norm > 0.0);
//! # let _ = mlp;
//! # Ok(())
//! # }
//! ```

pub mod checkpoint;
pub mod comm;
pub mod context;
pub mod ema;
pub mod error;
pub mod group;
pub mod launch;
pub mod layers;
pub mod lr_schedule;
pub mod mappings;
pub mod memory;
pub mod mesh;
pub mod ops;
pub mod optim;
pub mod pipeline;
pub mod rng;
pub mod run_dir;
pub mod schedule;
pub mod transfers;
pub mod world;

pub use error::{ParallelError, Result};

/// Everything needed in one import.
pub mod prelude {
    pub use crate::comm::{Communicator, ReduceOp, SingleRank};
    pub use crate::error::ParallelError;
    pub use crate::group::{Group, GroupId, ProcessGroups};
    pub use crate::layers::{
        ColumnParallelLinear, LmHead, ParallelAttention, ParallelMlp, ParallelParams, ParamRole,
        RmsNorm, RowParallelLinear, VocabParallelEmbedding, causal_attention, lm_loss,
        vocab_parallel_cross_entropy,
    };
    pub use crate::mesh::{GroupKind, Mesh, MoeDims, ParallelDims};
    pub use crate::ops::GatherGrad;
    pub use crate::optim::{
        AdamWConfig, DistributedAdamW, GradientBuffer, OptimizerState, StepStats, replicated_roles,
    };
    pub use crate::transfers::HostTransfers;
    pub use crate::world::World;
}
