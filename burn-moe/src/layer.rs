//! The MoE layer: route → dispatch → experts → combine, plus shared experts.

use std::sync::Arc;

use burn::config::Config;
use burn::module::Module;
use burn::tensor::{Device, Int, Tensor};

use burn_parallel::group::{Group, ProcessGroups, check_group};
use burn_parallel::layers::{ParallelParams, ParamRole};
use burn_parallel::mesh::GroupKind;
use burn_parallel::transfers::{self, HostTransfers};

use crate::dispatch::parallel::{AllGatherDispatcher, AllToAllDispatcher, ExpertGroups};
use crate::dispatch::{DispatchStats, LocalDispatcher, TokenDispatcher};
use crate::error::{MoeError, Result, invalid};
use crate::experts::{Experts, ExpertsConfig, SharedExperts, SharedExpertsConfig};
use crate::parallel::GroupReduce;
use crate::router::{GlobalAuxState, RouteOptions, Router, RouterConfig, RouterOutput, sum_losses};

/// Configuration of an [`MoeLayer`]: each component owns its config.
#[derive(Config, Debug)]
pub struct MoeLayerConfig {
    /// The router.
    pub router: RouterConfig,
    /// The routed experts (`num_experts` and `hidden` must match the router's).
    pub experts: ExpertsConfig,
    /// Optional shared experts.
    #[config(default = "None")]
    pub shared: Option<SharedExpertsConfig>,
}

impl MoeLayerConfig {
    /// A dropless top-k softmax layer with SwiGLU experts and every other option at its
    /// default; set the rest with the `with_*` builders of the component configs.
    pub fn swiglu(hidden: usize, ffn_hidden: usize, num_experts: usize, topk: usize) -> Self {
        Self::new(
            RouterConfig::new(hidden, num_experts, topk),
            ExpertsConfig::new(num_experts, hidden, ffn_hidden),
        )
    }

    /// Checks each component and that they agree.
    pub fn validate(&self) -> Result<()> {
        self.router.validate()?;
        self.experts.validate()?;
        if self.experts.num_experts != self.router.num_experts {
            return Err(invalid(
                "experts.num_experts",
                format!(
                    "is {} but the router routes to {} experts",
                    self.experts.num_experts, self.router.num_experts
                ),
            ));
        }
        if self.experts.hidden != self.router.hidden {
            return Err(invalid(
                "experts.hidden",
                format!(
                    "is {} but router.hidden is {}",
                    self.experts.hidden, self.router.hidden
                ),
            ));
        }
        if let Some(shared) = &self.shared {
            shared.validate()?;
            if shared.hidden != self.router.hidden {
                return Err(invalid(
                    "shared.hidden",
                    format!(
                        "is {} but router.hidden is {}",
                        shared.hidden, self.router.hidden
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Builds the layer on `device` with the single-process dispatcher.
    pub fn init(&self, device: &Device) -> Result<MoeLayer> {
        self.validate()?;
        let router = self.router.init(device)?;
        let experts = self.experts.init(device)?;
        let shared = self.shared.as_ref().map(|s| s.init(device)).transpose()?;
        MoeLayer::new(router, experts, shared)
    }
}

/// Which expert-parallel dispatcher a layer uses (Megatron's `--moe-token-dispatcher-type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DispatcherKind {
    /// All-gather over ETP×EP, keep local experts, reduce-scatter back.
    AllGather,
    /// All-to-all-v over EP, all-gather-v over ETP.
    AllToAll,
}

/// What the MoE layer returns.
#[derive(Debug, Clone)]
pub struct MoeOutput {
    /// Layer output, same shape as the input.
    pub output: Tensor<3>,
    /// Sum of the enabled load-balancing losses (aux, sequence aux, global aux), `[1]`.
    pub aux_loss: Option<Tensor<1>>,
    /// Router z-loss, `[1]`.
    pub z_loss: Option<Tensor<1>>,
    /// Tokens per expert after dropping, `[E]`.
    pub tokens_per_expert: Tensor<1, Int>,
    /// The full router output (probabilities, routing map, each loss separately).
    pub router: RouterOutput,
    /// Communication of the dispatch and combine, with their host transfers.
    pub stats: DispatchStats,
    /// Every host ↔ device transfer of this forward pass (router, dispatch, experts, combine,
    /// shared experts): device-to-host reads and host-to-device uploads, counted separately.
    /// The backward pass makes its own; count them with [`burn_parallel::transfers::measure`].
    pub transfers: HostTransfers,
}

impl MoeOutput {
    /// The auxiliary terms to add to the training loss (load balancing + z-loss).
    pub fn total_aux_loss(&self) -> Option<Tensor<1>> {
        sum_losses([self.aux_loss.clone(), self.z_loss.clone()])
    }

    /// The router's deferred finiteness check (see [`MoeLayer::forward_with`]): one
    /// device-to-host read of the count of non-finite router logits;
    /// [`MoeError::NonFiniteLogits`] when there were any.
    pub fn check_finite(&self) -> Result<()> {
        self.router.check_finite()
    }

    /// The updated global aux-loss accumulator, to pass to the next micro-batch.
    pub fn global_aux_state(&self) -> Option<GlobalAuxState> {
        self.router.global_aux_state.clone()
    }
}

/// A Mixture-of-Experts layer with Megatron-Core's semantics.
#[derive(Module, Debug)]
pub struct MoeLayer {
    /// The router.
    pub router: Router,
    /// The routed experts held by this rank.
    pub experts: Experts,
    /// Optional shared experts.
    pub shared: Option<SharedExperts>,
    #[module(skip)]
    dispatcher: Arc<dyn TokenDispatcher>,
    /// Whether each rank routes different tokens of one tensor-parallel group (sequence
    /// parallelism): the router's and shared experts' gradients are then partial over TP.
    #[module(skip)]
    tp_partial: bool,
    /// The process groups the layer's collectives use (none on one process): a failure of any
    /// of them (in an earlier forward or backward pass) stops the next forward.
    #[module(skip)]
    groups: Vec<Group>,
}

impl MoeLayer {
    /// Assembles a layer from its parts (single-process dispatcher).
    pub fn new(router: Router, experts: Experts, shared: Option<SharedExperts>) -> Result<Self> {
        if experts.config().num_experts != router.config().num_experts {
            return Err(invalid(
                "experts.num_experts",
                "must equal router.num_experts",
            ));
        }
        Ok(Self {
            router,
            experts,
            shared,
            dispatcher: Arc::new(LocalDispatcher),
            tp_partial: false,
            groups: Vec::new(),
        })
    }

    /// Uses another token dispatcher (expert parallelism).
    pub fn with_dispatcher(mut self, dispatcher: Arc<dyn TokenDispatcher>) -> Self {
        self.dispatcher = dispatcher;
        self
    }

    /// This rank's part of a full (single-rank) layer under the mesh of `groups`: experts
    /// sharded over EP and ETP, the router's reductions over the attention mapping's TP×CP and
    /// TP×DP×CP groups, and the chosen dispatcher. Shared experts stay replicated.
    pub fn parallelize(self, groups: &ProcessGroups, kind: DispatcherKind) -> Result<Self> {
        let (router, experts, shared) = (self.router, self.experts, self.shared);
        Self::laid_out(router, experts, false, shared, groups, kind)
    }

    /// This rank's layer under the mesh of `groups` from `local`, this rank's shard of the
    /// routed experts (the `num_experts / ep` experts of its expert-parallel rank, each with its
    /// expert-tensor-parallel rank's `ffn_hidden / etp` columns, as
    /// [`Experts::shard`](crate::experts::Experts::shard) cuts them), so that no rank ever holds
    /// the other ranks' experts: the same layer as [`parallelize`](Self::parallelize) of the
    /// full layer.
    pub fn from_local_experts(
        router: Router,
        local: Experts,
        shared: Option<SharedExperts>,
        groups: &ProcessGroups,
        kind: DispatcherKind,
    ) -> Result<Self> {
        Self::laid_out(router, local, true, shared, groups, kind)
    }

    fn laid_out(
        router: Router,
        experts: Experts,
        experts_are_local: bool,
        shared: Option<SharedExperts>,
        groups: &ProcessGroups,
        kind: DispatcherKind,
    ) -> Result<Self> {
        let expert_groups = ExpertGroups::new(groups)?;
        let e = router.config().num_experts;
        let ep = expert_groups.ep().size();
        if !e.is_multiple_of(ep) {
            return Err(invalid(
                "num_experts",
                format!("{e} experts cannot be split over {ep} expert-parallel ranks"),
            ));
        }
        let local = expert_groups.local_experts(e);
        let held = experts.config().num_experts;
        let want = if experts_are_local { local.len() } else { e };
        if held != want {
            return Err(invalid(
                "experts.num_experts",
                format!(
                    "is {held}, this rank's layout needs {want} ({e} experts over {ep}                      expert-parallel ranks{})",
                    if experts_are_local {
                        ", this rank's only"
                    } else {
                        ", all of them"
                    }
                ),
            ));
        }
        let etp = expert_groups.etp();
        let experts = if experts_are_local {
            // Already exactly this rank's shard.
            experts
        } else {
            experts.shard(local, etp.rank(), etp.size())?
        };
        let dispatcher: Arc<dyn TokenDispatcher> = match kind {
            DispatcherKind::AllGather => Arc::new(AllGatherDispatcher::new(expert_groups)),
            DispatcherKind::AllToAll => Arc::new(AllToAllDispatcher::new(expert_groups)),
        };
        Ok(Self {
            router: router.with_reduce(Arc::new(GroupReduce::new(groups))),
            experts,
            shared,
            dispatcher,
            tp_partial: groups.group(GroupKind::Tp).size() > 1,
            groups: [
                GroupKind::Ep,
                GroupKind::ExpertTp,
                GroupKind::ExpertTpEp,
                GroupKind::TpCp,
                GroupKind::TpDpCp,
            ]
            .into_iter()
            .map(|k| groups.group(k).clone())
            .filter(|g| g.size() > 1)
            .collect(),
        })
    }

    /// # Shapes
    /// - x: `[seq_len, batch, hidden]` (tokens `t = s * batch + b`)
    /// - output: `[seq_len, batch, hidden]`
    pub fn forward(&self, x: Tensor<3>) -> Result<MoeOutput> {
        self.forward_with(x, RouteOptions::default())
    }

    /// [`forward`](Self::forward) with routing options (evaluation mode, global aux state).
    ///
    /// Host synchronisations: a dropless layer reads the tokens per expert once (as
    /// Megatron-Core's dropless dispatch); a drop-and-pad layer none. The router's finiteness
    /// check ([`RouterConfig::check_finite`](crate::router::RouterConfig::check_finite)) does
    /// not read: its count stays on the device in
    /// [`RouterOutput::nonfinite_logits`](crate::router::RouterOutput::nonfinite_logits), for
    /// the caller to check with a read it makes anyway ([`MoeOutput::check_finite`] reads it
    /// alone; the language model's trainer reads it with the step's losses).
    ///
    /// A collective of this layer's groups that failed earlier (in the backward pass, where it
    /// could not return an error and left NaN in the gradients) is returned here, before any
    /// work: [`MoeError::Communication`] with
    /// [`burn_parallel::ParallelError::CollectiveFailed`].
    pub fn forward_with(&self, x: Tensor<3>, options: RouteOptions) -> Result<MoeOutput> {
        for group in &self.groups {
            check_group(group)?;
        }
        let before = transfers::snapshot();
        let [s, b, h] = x.dims();
        let hidden = self.router.config().hidden;
        if h != hidden {
            return Err(MoeError::ShapeMismatch {
                name: "x",
                expected: format!("[seq_len, batch, hidden = {hidden}]"),
                got: vec![s, b, h],
            });
        }
        let tokens = x.reshape([s * b, h]);
        let routed = self.router.forward_with(
            tokens.clone().reshape([s, b, h]),
            options.deferred_finite_check(),
        )?;
        let padded = routed
            .capacity
            .filter(|_| self.router.config().pad_to_capacity);
        let dispatched = self.dispatcher.dispatch(
            tokens.clone(),
            routed.probs.clone(),
            routed.routing_map.clone(),
            padded,
        )?;
        let local = self
            .dispatcher
            .local_experts(self.router.config().num_experts);
        if dispatched.tokens_per_expert.len() != local.len()
            || self.experts.config().num_experts != local.len()
        {
            return Err(MoeError::InvalidArgument {
                name: "dispatcher",
                reason: format!(
                    "dispatched {} expert groups for {} local experts",
                    dispatched.tokens_per_expert.len(),
                    self.experts.config().num_experts
                ),
            });
        }
        let expert_out = self.experts.forward(
            dispatched.tokens,
            &dispatched.tokens_per_expert,
            dispatched.probs,
        )?;
        let (mut output, stats) = self.dispatcher.combine(expert_out, dispatched.plan)?;
        if let Some(shared) = &self.shared {
            output = output + shared.forward(tokens)?;
        }
        Ok(MoeOutput {
            output: output.reshape([s, b, h]),
            aux_loss: routed.load_balancing_loss(),
            z_loss: routed.z_loss.clone(),
            tokens_per_expert: routed.tokens_per_expert.clone(),
            router: routed,
            stats,
            transfers: transfers::snapshot() - before,
        })
    }
}

impl ParallelParams for MoeLayer {
    /// The router weight and shared experts are replicated (their gradients partial over TP
    /// under sequence parallelism); routed experts are expert parameters, distinct on every
    /// EP × ETP rank. Biases and 1-D parameters get no weight decay.
    fn param_roles(&self, out: &mut Vec<(burn::module::ParamId, ParamRole)>) {
        struct Roles<'a> {
            out: &'a mut Vec<(burn::module::ParamId, ParamRole)>,
            role: ParamRole,
        }
        impl burn::module::ModuleVisitor for Roles<'_> {
            fn visit_float<const D: usize>(&mut self, p: &burn::module::Param<Tensor<D>>) {
                let mut role = self.role;
                role.weight_decay &= D > 1;
                self.out.push((p.id, role));
            }
        }
        let replicated = ParamRole {
            tp_split: false,
            sequence_parallel_grad: self.tp_partial,
            weight_decay: true,
            expert: false,
            tied_copy: false,
        };
        self.router.visit(&mut Roles {
            out,
            role: replicated,
        });
        if let Some(shared) = &self.shared {
            shared.visit(&mut Roles {
                out,
                role: replicated,
            });
        }
        let expert = ParamRole {
            tp_split: true,
            sequence_parallel_grad: false,
            weight_decay: true,
            expert: true,
            tied_copy: false,
        };
        self.experts.visit(&mut Roles { out, role: expert });
    }
}
