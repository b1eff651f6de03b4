#![warn(missing_docs)]
//! # burn-moe
//!
//! Mixture-of-Experts layers for [Burn](https://burn.dev) with Megatron-Core's semantics:
//! routers (softmax with or without pre-softmax, sigmoid, group-limited top-k, scaling, expert
//! bias, Sinkhorn), load-balancing losses (aux, sequence aux, global aux) and z-loss returned
//! as values, token dropping (capacity factor, `probs`/`position` policies, pad to capacity)
//! or dropless routing, shared experts, and a dispatcher interface (`dispatch` returns a plan
//! that `combine` consumes) for expert parallelism.
//!
//! Token dispatch (counts, routing index, permute/unpermute, chunk sort) and the experts'
//! grouped GEMM run through the [`kernels`] backend extension: `#[cube]` kernels on CubeCL
//! devices (features `wgpu`, `cuda`), native loops and per-group `gemm` calls on Flex, plain
//! tensor operations elsewhere, all differentiable.
//!
//! Results and gradients match Megatron-Core's own code on the golden cases in
//! `shared/golden/moe` (see the crate's `golden` test).
//!
//! ## Quick start
//!
//! ```rust,no_run
//! use burn::tensor::{Device, Distribution, Tensor};
//! use burn_moe::prelude::*;
//!
//! # fn main() -> Result<(), MoeError> {
//! let device = Device::flex().autodiff();
//! // Dropless top-2 routing over 8 SwiGLU experts, switch aux loss 1e-2, z-loss 1e-3.
//! let mut config = MoeLayerConfig::swiglu(64, 128, 8, 2);
//! config.router = config.router.with_aux_loss_coeff(1e-2).with_z_loss_coeff(Some(1e-3));
//! let layer = config.init(&device)?;
//!
//! let x = Tensor::<3>::random([16, 4, 64], Distribution::Normal(0.0, 1.0), &device); // [S, B, H]
//! let out = layer.forward(x)?;
//! let loss = out.output.clone().square().mean() + out.total_aux_loss().unwrap();
//! let grads = loss.backward();
//! let grad_w1 = layer.experts.w1.val().grad(&grads); // [E, H, 2F]
//! println!("tokens per expert: {}", out.tokens_per_expert);
//! # let _ = grad_w1;
//! # Ok(())
//! # }
//! ```

pub mod backend;
pub mod dispatch;
pub mod error;
pub mod experts;
pub mod host;
pub mod kernels;
pub mod layer;
pub mod lm;
pub mod parallel;
pub mod router;
pub mod timing;

pub use error::{MoeError, Result};

/// Everything a notebook or model file needs in one import.
pub mod prelude {
    pub use crate::backend::BackendKind;
    pub use crate::dispatch::parallel::{AllGatherDispatcher, AllToAllDispatcher, ExpertGroups};
    pub use crate::dispatch::{
        DispatchPlan, DispatchStats, Dispatched, LocalDispatcher, TokenDispatcher,
    };
    pub use crate::error::MoeError;
    pub use crate::experts::{
        Activation, Experts, ExpertsCompute, ExpertsConfig, SharedExperts, SharedExpertsConfig,
    };
    pub use crate::layer::{DispatcherKind, MoeLayer, MoeLayerConfig, MoeOutput};
    pub use crate::lm::{MoeLm, MoeLmConfig, StageLayout, TokenSource};
    pub use crate::parallel::{GroupReduce, RouterReduce, SingleRank};
    pub use crate::router::{
        DropPolicy, GlobalAuxState, Mode, RouteOptions, Router, RouterConfig, RouterOutput,
        RoutingType, ScoreFunction,
    };
}
