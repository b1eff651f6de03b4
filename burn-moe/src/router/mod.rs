//! The router: gate, score function, top-k (plain, group-limited or Sinkhorn), token dropping,
//! load-balancing losses, z-loss and the expert bias, with Megatron-Core's semantics.

mod config;
pub mod losses;
pub mod select;

use std::sync::Arc;

use burn::module::{Module, Param};
use burn::tensor::activation;
use burn::tensor::{Bool, Device, Distribution, FloatDType, Int, Tensor};

pub use config::{DropPolicy, RouterConfig, RoutingType, ScoreFunction};

use crate::error::{MoeError, Result};
use crate::host;
use crate::parallel::{RouterReduce, SingleRank};

/// Training or evaluation. In evaluation the router applies no input jitter, computes no
/// losses and Sinkhorn routing takes the top-k of the activated logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Training: jitter, losses, Sinkhorn balancing.
    #[default]
    Train,
    /// Evaluation.
    Eval,
}

/// Token counts accumulated over the micro-batches of one global batch, for the global
/// load-balancing loss. Pass the state returned by one micro-batch to the next; start each
/// global batch with `None` (Megatron's `reset_global_aux_loss_tracker`).
#[derive(Debug, Clone)]
pub struct GlobalAuxState {
    /// Sum over micro-batches of the (all-reduced) tokens per expert, `[E]`.
    pub tokens_per_expert: Tensor<1>,
    /// Number of micro-batches accumulated.
    pub steps: usize,
}

/// [`MoeError::NonFiniteLogits`] when the count `bad` (`[1]`, on the device) is positive: one
/// device-to-host read.
pub(crate) fn check_nonfinite(bad: Option<Tensor<1, Int>>) -> Result<()> {
    let Some(bad) = bad else {
        return Ok(());
    };
    let bad = host::read_i64(bad, "checking router logits")?[0];
    if bad > 0 {
        return Err(MoeError::NonFiniteLogits {
            count: bad as usize,
        });
    }
    Ok(())
}

/// Options of one routing call.
#[derive(Debug, Clone, Default)]
pub struct RouteOptions {
    /// Training or evaluation.
    pub mode: Mode,
    /// Accumulated counts of the current global batch (global aux loss only).
    pub global_aux: Option<GlobalAuxState>,
    /// With [`RouterConfig::check_finite`](crate::router::RouterConfig::check_finite): return
    /// the count of non-finite logits as a device tensor ([`RouterOutput::nonfinite_logits`])
    /// instead of reading it (no host synchronisation); the caller checks it later, with a
    /// read it makes anyway. What [`MoeLayer`](crate::layer::MoeLayer) asks for.
    pub defer_finite_check: bool,
}

impl RouteOptions {
    /// Evaluation options.
    pub fn eval() -> Self {
        Self {
            mode: Mode::Eval,
            global_aux: None,
            defer_finite_check: false,
        }
    }

    /// Defers the finiteness check to the caller (see
    /// [`defer_finite_check`](Self::defer_finite_check)).
    pub fn deferred_finite_check(mut self) -> Self {
        self.defer_finite_check = true;
        self
    }

    /// Continue accumulating the global aux loss counts from `state`.
    pub fn global_aux(mut self, state: GlobalAuxState) -> Self {
        self.global_aux = Some(state);
        self
    }
}

/// What the router returns. Losses are values for the caller to add to its loss; they are
/// never hidden in the graph.
#[derive(Debug, Clone)]
pub struct RouterOutput {
    /// Gate logits `[T, E]` (f32).
    pub logits: Tensor<2>,
    /// Routing probabilities after dropping, `[T, E]`, zero where a token is not routed.
    pub probs: Tensor<2>,
    /// Token-to-expert assignment after dropping (and padding), `[T, E]`.
    pub routing_map: Tensor<2, Bool>,
    /// Tokens per expert after dropping, `[E]`.
    pub tokens_per_expert: Tensor<1, Int>,
    /// Expert capacity when dropping, `None` when dropless.
    pub capacity: Option<usize>,
    /// Switch load-balancing loss (coefficient applied), `[1]`.
    pub aux_loss: Option<Tensor<1>>,
    /// Sequence-level load-balancing loss (coefficient applied), `[1]`.
    pub seq_aux_loss: Option<Tensor<1>>,
    /// Global-batch load-balancing loss (coefficient applied), `[1]`.
    pub global_aux_loss: Option<Tensor<1>>,
    /// Router z-loss (coefficient applied), `[1]`.
    pub z_loss: Option<Tensor<1>>,
    /// Updated global aux-loss accumulator (when the global loss is enabled).
    pub global_aux_state: Option<GlobalAuxState>,
    /// The number of non-finite logits, `[1]` on the device, when the finiteness check was
    /// deferred ([`RouteOptions::defer_finite_check`]); check it with
    /// [`check_finite`](Self::check_finite) or read it with other values.
    pub nonfinite_logits: Option<Tensor<1, Int>>,
}

impl RouterOutput {
    /// The deferred finiteness check: reads the count of non-finite logits (one device-to-host
    /// read) and returns [`MoeError::NonFiniteLogits`] when there are any. Nothing to do (no
    /// read) when the check ran in the router or is off.
    pub fn check_finite(&self) -> Result<()> {
        check_nonfinite(self.nonfinite_logits.clone())
    }

    /// Sum of every load-balancing loss that is enabled (aux, sequence aux, global aux).
    pub fn load_balancing_loss(&self) -> Option<Tensor<1>> {
        sum_losses([
            self.aux_loss.clone(),
            self.seq_aux_loss.clone(),
            self.global_aux_loss.clone(),
        ])
    }

    /// Load-balancing losses plus z-loss: what to add to the training loss.
    pub fn total_loss(&self) -> Option<Tensor<1>> {
        sum_losses([self.load_balancing_loss(), self.z_loss.clone()])
    }
}

pub(crate) fn sum_losses<const N: usize>(losses: [Option<Tensor<1>>; N]) -> Option<Tensor<1>> {
    losses.into_iter().flatten().reduce(|a, b| a + b)
}

/// Megatron-Core's `TopKRouter`: gate weight `[E, H]` in f32, top-k routing with a score
/// function, optional token dropping, load-balancing losses and z-loss.
#[derive(Module, Debug)]
pub struct Router {
    /// Gate weight `[E, H]`.
    pub weight: Param<Tensor<2>>,
    /// Expert bias `[E]` (sigmoid routing), not trained by gradients.
    pub expert_bias: Option<Param<Tensor<1>>>,
    #[module(skip)]
    config: RouterConfig,
    #[module(skip)]
    reduce: Arc<dyn RouterReduce>,
}

impl RouterConfig {
    /// Builds a router with a normal(0, `init_std`) gate and a zero expert bias.
    pub fn init(&self, device: &Device) -> Result<Router> {
        self.validate()?;
        let weight = Tensor::<2>::random(
            [self.num_experts, self.hidden],
            Distribution::Normal(0.0, self.init_std),
            device,
        );
        Router::from_weight(self.clone(), weight)
    }
}

/// The load-balancing losses of a step and the global loss's accumulated counts.
#[derive(Default)]
struct AuxLosses {
    aux: Option<Tensor<1>>,
    seq_aux: Option<Tensor<1>>,
    global_aux: Option<Tensor<1>>,
    global_state: Option<GlobalAuxState>,
}

impl Router {
    /// Builds a router from a given gate weight `[E, H]`.
    pub fn from_weight(config: RouterConfig, weight: Tensor<2>) -> Result<Self> {
        config.validate()?;
        let dims = weight.dims();
        if dims != [config.num_experts, config.hidden] {
            return Err(MoeError::ShapeMismatch {
                name: "router weight",
                expected: format!(
                    "[num_experts, hidden] = [{}, {}]",
                    config.num_experts, config.hidden
                ),
                got: dims.to_vec(),
            });
        }
        let device = weight.device();
        let expert_bias = config.expert_bias.then(|| {
            Param::from_tensor(Tensor::<1>::zeros([config.num_experts], &device))
                .set_require_grad(false)
        });
        Ok(Self {
            weight: Param::from_tensor(weight),
            expert_bias,
            config,
            reduce: Arc::new(SingleRank),
        })
    }

    /// Replaces the expert bias `[E]` (the config must enable it).
    pub fn with_expert_bias(mut self, bias: Tensor<1>) -> Result<Self> {
        if !self.config.expert_bias {
            return Err(MoeError::InvalidConfig {
                field: "expert_bias",
                reason: "is false: enable it in the router config to set a bias".into(),
            });
        }
        check_dims(
            "expert_bias",
            &bias.dims(),
            &[self.config.num_experts],
            "[num_experts]",
        )?;
        self.expert_bias = Some(Param::from_tensor(bias).set_require_grad(false));
        Ok(self)
    }

    /// Uses `reduce` for the cross-rank reductions of the losses and the expert bias.
    pub fn with_reduce(mut self, reduce: Arc<dyn RouterReduce>) -> Self {
        self.reduce = reduce;
        self
    }

    /// The configuration.
    pub fn config(&self) -> &RouterConfig {
        &self.config
    }

    /// Gate logits `[T, E]` in f32 for tokens `[T, H]`.
    pub fn gating(&self, tokens: Tensor<2>) -> Result<Tensor<2>> {
        let dims = tokens.dims();
        if dims[1] != self.config.hidden {
            return Err(MoeError::ShapeMismatch {
                name: "router input",
                expected: format!("[tokens, hidden = {}]", self.config.hidden),
                got: dims.to_vec(),
            });
        }
        let tokens = tokens.cast(FloatDType::F32);
        let weight = self.weight.val().cast(FloatDType::F32);
        Ok(tokens.matmul(weight.transpose()))
    }

    /// Routes hidden states `[S, B, H]` (tokens ordered `t = s * B + b`).
    ///
    /// # Shapes
    /// - x: `[seq_len, batch, hidden]`
    /// - output probs / routing map: `[seq_len * batch, num_experts]`
    pub fn forward(&self, x: Tensor<3>) -> Result<RouterOutput> {
        self.forward_with(x, RouteOptions::default())
    }

    /// [`forward`](Self::forward) with explicit options.
    pub fn forward_with(&self, x: Tensor<3>, options: RouteOptions) -> Result<RouterOutput> {
        let [s, b, h] = x.dims();
        let mut tokens = x.reshape([s * b, h]);
        if let (Mode::Train, Some(eps)) = (options.mode, self.config.input_jitter_eps) {
            let noise = Tensor::<2>::random(
                [s * b, h],
                Distribution::Uniform(1.0 - eps, 1.0 + eps),
                &tokens.device(),
            );
            let dtype = tokens.dtype();
            tokens = tokens * noise.cast(dtype);
        }
        let logits = self.gating(tokens)?;
        self.route(logits, s, b, options)
    }

    /// Routing from gate logits `[T, E]` with `T = seq_len * batch` tokens ordered
    /// sequence-major (Megatron's `TopKRouter.routing`).
    pub fn route(
        &self,
        logits: Tensor<2>,
        seq_len: usize,
        batch: usize,
        options: RouteOptions,
    ) -> Result<RouterOutput> {
        let cfg = &self.config;
        let [t, e] = logits.dims();
        if e != cfg.num_experts {
            return Err(MoeError::ShapeMismatch {
                name: "logits",
                expected: format!("[tokens, num_experts = {}]", cfg.num_experts),
                got: vec![t, e],
            });
        }
        if seq_len * batch != t {
            return Err(MoeError::InvalidArgument {
                name: "seq_len",
                reason: format!("seq_len ({seq_len}) * batch ({batch}) != number of tokens ({t})"),
            });
        }
        if t == 0 {
            return Err(MoeError::InvalidArgument {
                name: "logits",
                reason: "no tokens to route".into(),
            });
        }
        let logits = logits.cast(FloatDType::F32);
        let mut nonfinite_logits = None;
        if cfg.check_finite {
            let bad = logits.clone().is_finite().bool_not().int().sum();
            if options.defer_finite_check {
                nonfinite_logits = Some(bad);
            } else {
                // One device-to-host read of a single count.
                check_nonfinite(Some(bad))?;
            }
        }
        let training = options.mode == Mode::Train;
        let reduce = &self.reduce;

        let z_loss = match cfg.z_loss_coeff {
            Some(c) if training && c > 0.0 => Some(losses::z_loss(
                logits.clone(),
                c / reduce.tp_cp_size() as f64,
            )),
            _ => None,
        };

        let (probs, map) = self.topk_routing(logits.clone(), training)?;

        let capacity = cfg.capacity(t);
        let (probs, map) = match capacity {
            Some(cap) => {
                let keep = select::capacity_mask(
                    probs.clone(),
                    map.clone(),
                    cap,
                    cfg.drop_policy,
                    cfg.pad_to_capacity,
                );
                let map = if cfg.pad_to_capacity {
                    keep
                } else {
                    map * keep
                };
                (probs * map.clone(), map)
            }
            None => (probs, map),
        };

        let aux = if training {
            self.aux_losses(logits.clone(), (seq_len, batch), options.global_aux)?
        } else {
            AuxLosses::default()
        };

        let tokens_per_expert: Tensor<1, Int> = map.clone().sum_dim(0).reshape([e]).int();
        Ok(RouterOutput {
            logits,
            probs,
            routing_map: map.equal_elem(1.0),
            tokens_per_expert,
            capacity,
            aux_loss: aux.aux,
            seq_aux_loss: aux.seq_aux,
            global_aux_loss: aux.global_aux,
            z_loss,
            global_aux_state: aux.global_state,
            nonfinite_logits,
        })
    }

    /// The load-balancing losses of a training step from logits `[T, E]`: the micro-batch
    /// (switch) loss over TP × CP, the per-sequence loss, and the global-batch loss over
    /// TP × DP × CP with its counts accumulated from `global_aux` (the previous micro-batches
    /// of the global batch).
    fn aux_losses(
        &self,
        logits: Tensor<2>,
        (seq_len, batch): (usize, usize),
        global_aux: Option<GlobalAuxState>,
    ) -> Result<AuxLosses> {
        let cfg = &self.config;
        let reduce = &self.reduce;
        let [t, e] = logits.dims();
        let mut out = AuxLosses::default();
        let any_aux = cfg.aux_loss_coeff > 0.0
            || cfg.seq_aux_loss_coeff > 0.0
            || cfg.global_aux_loss_coeff > 0.0;
        if !any_aux {
            return Ok(out);
        }
        let scores = losses::aux_scores(logits.clone(), cfg.score_function);
        let aux_map =
            select::mask_from_indices(select::topk_indices(scores.clone(), cfg.topk, None), e);
        let local_counts: Tensor<1> = aux_map.clone().sum_dim(0).reshape([e]);
        if cfg.aux_loss_coeff > 0.0 {
            let counts = reduce.sum_tp_cp(local_counts.clone())?;
            let total = (t * reduce.tp_cp_size()) as f64;
            out.aux = Some(losses::switch_loss(
                scores.clone(),
                counts,
                total,
                cfg.topk,
                e,
                cfg.aux_loss_coeff,
            ));
        }
        if cfg.seq_aux_loss_coeff > 0.0 {
            let seq_scores = scores.clone().reshape([seq_len, batch * e]);
            let seq_counts: Tensor<1> = aux_map
                .clone()
                .reshape([seq_len, batch * e])
                .sum_dim(0)
                .reshape([batch * e]);
            let counts = reduce.sum_tp_cp(seq_counts)?;
            let total = (seq_len * reduce.tp_cp_size()) as f64;
            out.seq_aux = Some(
                losses::switch_loss(
                    seq_scores,
                    counts,
                    total,
                    cfg.topk,
                    e,
                    cfg.seq_aux_loss_coeff,
                )
                .div_scalar(batch as f64),
            );
        }
        if cfg.global_aux_loss_coeff > 0.0 {
            let counts = reduce.sum_tp_dp_cp(local_counts)?;
            let state = match global_aux {
                Some(prev) => GlobalAuxState {
                    tokens_per_expert: prev.tokens_per_expert + counts,
                    steps: prev.steps + 1,
                },
                None => GlobalAuxState {
                    tokens_per_expert: counts,
                    steps: 1,
                },
            };
            let averaged = state
                .tokens_per_expert
                .clone()
                .div_scalar(state.steps as f64);
            let total = (t * reduce.tp_dp_cp_size()) as f64;
            out.global_aux = Some(losses::switch_loss(
                scores,
                averaged,
                total,
                cfg.topk,
                e,
                cfg.global_aux_loss_coeff,
            ));
            out.global_state = Some(state);
        }
        Ok(out)
    }

    /// Dense probabilities `[T, E]` (with gradient) and the 0/1 routing map before dropping.
    fn topk_routing(&self, logits: Tensor<2>, training: bool) -> Result<(Tensor<2>, Tensor<2>)> {
        let cfg = &self.config;
        let [_, e] = logits.dims();
        let k = cfg.topk;
        let groups = cfg.num_groups.zip(cfg.group_topk);

        if cfg.routing == RoutingType::Sinkhorn {
            let activated = if k == 1 {
                activation::sigmoid(logits.clone())
            } else {
                activation::softmax(logits.clone(), 1)
            };
            let indices = if training {
                select::sinkhorn_indices(logits, k)?
            } else {
                select::topk_indices(activated.clone(), k, None)
            };
            let map = select::mask_from_indices(indices, e);
            return Ok((activated * map.clone(), map));
        }

        let (probs, map) = match cfg.score_function {
            ScoreFunction::Softmax if cfg.pre_softmax => {
                let scores = activation::softmax(logits, 1);
                let map =
                    select::mask_from_indices(select::topk_indices(scores.clone(), k, groups), e);
                (scores * map.clone(), map)
            }
            ScoreFunction::Softmax => {
                let map =
                    select::mask_from_indices(select::topk_indices(logits.clone(), k, groups), e);
                // Softmax over the k selected logits, placed at their experts.
                let masked = logits.mask_fill(map.clone().equal_elem(0.0), f32::NEG_INFINITY);
                (activation::softmax(masked, 1), map)
            }
            ScoreFunction::Sigmoid => {
                let scores = activation::sigmoid(logits);
                let for_selection = match &self.expert_bias {
                    Some(bias) => scores.clone().detach() + bias.val().reshape([1, e]),
                    None => scores.clone(),
                };
                let map =
                    select::mask_from_indices(select::topk_indices(for_selection, k, groups), e);
                let selected = scores * map.clone();
                let probs = if k > 1 {
                    selected.clone() / selected.sum_dim(1).add_scalar(1e-20)
                } else {
                    selected
                };
                (probs, map)
            }
        };
        let probs = match cfg.scaling_factor {
            Some(s) => probs.mul_scalar(s),
            None => probs,
        };
        Ok((probs, map))
    }

    /// The expert bias after one update with `tokens_per_expert` `[E]` (this global batch's
    /// counts on this rank; they are summed over the tensor×data×context-parallel group):
    /// `bias + rate * sign(mean(counts) - counts)`.
    pub fn updated_expert_bias(&self, tokens_per_expert: Tensor<1>) -> Result<Tensor<1>> {
        let bias = self
            .expert_bias
            .as_ref()
            .ok_or_else(|| MoeError::InvalidConfig {
                field: "expert_bias",
                reason: "is false: this router has no expert bias to update".into(),
            })?;
        let e = self.config.num_experts;
        check_dims(
            "tokens_per_expert",
            &tokens_per_expert.dims(),
            &[e],
            "[num_experts]",
        )?;
        let counts = self
            .reduce
            .sum_tp_dp_cp(tokens_per_expert.cast(FloatDType::F32))?;
        let mean = counts.clone().mean(); // [1]
        let offset = mean.expand([e]) - counts;
        Ok(bias.val().detach() + offset.sign().mul_scalar(self.config.bias_update_rate))
    }

    /// Applies [`updated_expert_bias`](Self::updated_expert_bias) in place (once per global
    /// batch, after the optimizer step, as Megatron does).
    pub fn update_expert_bias(&mut self, tokens_per_expert: Tensor<1>) -> Result<()> {
        let updated = self.updated_expert_bias(tokens_per_expert)?;
        self.expert_bias = Some(Param::from_tensor(updated).set_require_grad(false));
        Ok(())
    }
}

pub(crate) fn check_dims(
    name: &'static str,
    got: &[usize],
    want: &[usize],
    words: &str,
) -> Result<()> {
    if got != want {
        return Err(MoeError::ShapeMismatch {
            name,
            expected: format!("{words} = {want:?}"),
            got: got.to_vec(),
        });
    }
    Ok(())
}
