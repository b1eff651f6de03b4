//! Router configuration and its validation.

use burn::config::Config;

use crate::error::{Result, invalid};

/// The function that turns router logits into scores.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum ScoreFunction {
    /// Softmax over experts (Mixtral, Qwen-MoE).
    Softmax,
    /// Element-wise sigmoid, renormalised over the selected experts when `topk > 1` (DeepSeek-V3).
    Sigmoid,
}

/// How an expert chooses which tokens to keep when it receives more than its capacity.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum DropPolicy {
    /// Keep each expert's highest-probability tokens.
    Probs,
    /// Keep each expert's first routed tokens by token index.
    Position,
}

/// Top-k selection or Sinkhorn balancing.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum RoutingType {
    /// Top-k over the scores (optionally group-limited).
    TopK,
    /// Sinkhorn-balanced assignment (training); top-k of the activated logits at evaluation.
    Sinkhorn,
}

/// Configuration of a [`Router`](crate::router::Router), with Megatron-Core's semantics.
///
/// Field names follow Megatron's `--moe-router-*` flags.
#[derive(Config, Debug)]
pub struct RouterConfig {
    /// Hidden size `H` of the tokens.
    pub hidden: usize,
    /// Number of routed experts `E`.
    pub num_experts: usize,
    /// Experts per token `k`.
    pub topk: usize,
    /// Score function.
    #[config(default = "ScoreFunction::Softmax")]
    pub score_function: ScoreFunction,
    /// Softmax over all experts before the top-k (no renormalisation over the k).
    #[config(default = false)]
    pub pre_softmax: bool,
    /// Top-k selection or Sinkhorn.
    #[config(default = "RoutingType::TopK")]
    pub routing: RoutingType,
    /// Number of expert groups for group-limited (device/node-limited) routing.
    #[config(default = "None")]
    pub num_groups: Option<usize>,
    /// Number of groups each token may use.
    #[config(default = "None")]
    pub group_topk: Option<usize>,
    /// Multiplier applied to the routing probabilities.
    #[config(default = "None")]
    pub scaling_factor: Option<f64>,
    /// Learnable-free expert bias for aux-loss-free balancing (sigmoid routing only).
    #[config(default = false)]
    pub expert_bias: bool,
    /// Step of the expert-bias update `bias += rate * sign(mean(counts) - counts)`.
    #[config(default = 1e-3)]
    pub bias_update_rate: f64,
    /// Capacity factor; `None` is dropless.
    #[config(default = "None")]
    pub capacity_factor: Option<f64>,
    /// Which tokens an over-full expert keeps.
    #[config(default = "DropPolicy::Probs")]
    pub drop_policy: DropPolicy,
    /// Pad every expert to exactly `capacity` tokens.
    #[config(default = false)]
    pub pad_to_capacity: bool,
    /// Coefficient of the switch (micro-batch) load-balancing loss; 0 disables it.
    #[config(default = 0.0)]
    pub aux_loss_coeff: f64,
    /// Coefficient of the sequence-level load-balancing loss; 0 disables it.
    #[config(default = 0.0)]
    pub seq_aux_loss_coeff: f64,
    /// Coefficient of the global-batch load-balancing loss; 0 disables it.
    #[config(default = 0.0)]
    pub global_aux_loss_coeff: f64,
    /// Coefficient of the router z-loss.
    #[config(default = "None")]
    pub z_loss_coeff: Option<f64>,
    /// Multiplicative input jitter `U(1 - eps, 1 + eps)` in training.
    #[config(default = "None")]
    pub input_jitter_eps: Option<f64>,
    /// Standard deviation of the normal initialisation of the gate weight.
    #[config(default = 0.02)]
    pub init_std: f64,
    /// Check the logits for NaN/inf and return an error (one device-to-host read of a count).
    #[config(default = true)]
    pub check_finite: bool,
}

fn non_negative_finite(field: &'static str, value: f64) -> Result<()> {
    if !value.is_finite() || value < 0.0 {
        return Err(invalid(
            field,
            format!("must be finite and >= 0, got {value}"),
        ));
    }
    Ok(())
}

impl RouterConfig {
    /// Checks every field and their combinations; the error names the offending field.
    pub fn validate(&self) -> Result<()> {
        if self.hidden == 0 {
            return Err(invalid("hidden", "must be > 0"));
        }
        if self.num_experts == 0 {
            return Err(invalid("num_experts", "must be > 0"));
        }
        if self.topk == 0 || self.topk > self.num_experts {
            return Err(invalid(
                "topk",
                format!(
                    "must be in 1..={} (num_experts), got {}",
                    self.num_experts, self.topk
                ),
            ));
        }
        if self.score_function == ScoreFunction::Softmax
            && self.topk == 1
            && !self.pre_softmax
            && self.routing == RoutingType::TopK
        {
            return Err(invalid(
                "pre_softmax",
                "top-1 softmax routing needs pre_softmax = true: a softmax over one selected \
                 logit is always 1 and gives the router no gradient",
            ));
        }
        match (self.num_groups, self.group_topk) {
            (None, None) => {}
            (Some(_), None) => {
                return Err(invalid("group_topk", "must be set when num_groups is set"));
            }
            (None, Some(_)) => {
                return Err(invalid("num_groups", "must be set when group_topk is set"));
            }
            (Some(groups), Some(group_topk)) => {
                if groups == 0 || !self.num_experts.is_multiple_of(groups) {
                    return Err(invalid(
                        "num_groups",
                        format!(
                            "must be > 0 and divide num_experts ({}), got {groups}",
                            self.num_experts
                        ),
                    ));
                }
                if group_topk == 0 || group_topk > groups {
                    return Err(invalid(
                        "group_topk",
                        format!("must be in 1..={groups} (num_groups), got {group_topk}"),
                    ));
                }
                if !self.topk.is_multiple_of(group_topk) {
                    return Err(invalid(
                        "group_topk",
                        format!("must divide topk ({}), got {group_topk}", self.topk),
                    ));
                }
                if self.topk / group_topk > self.num_experts / groups {
                    return Err(invalid(
                        "group_topk",
                        format!(
                            "topk / group_topk = {} exceeds the experts per group ({})",
                            self.topk / group_topk,
                            self.num_experts / groups
                        ),
                    ));
                }
            }
        }
        if let Some(s) = self.scaling_factor
            && (!s.is_finite() || s <= 0.0)
        {
            return Err(invalid(
                "scaling_factor",
                format!("must be finite and > 0, got {s}"),
            ));
        }
        if self.expert_bias && self.score_function != ScoreFunction::Sigmoid {
            return Err(invalid(
                "expert_bias",
                "expert bias (aux-loss-free balancing) needs score_function = Sigmoid",
            ));
        }
        non_negative_finite("bias_update_rate", self.bias_update_rate)?;
        if let Some(c) = self.capacity_factor
            && (!c.is_finite() || c <= 0.0)
        {
            return Err(invalid(
                "capacity_factor",
                format!("must be finite and > 0, got {c}"),
            ));
        }
        if self.pad_to_capacity && self.capacity_factor.is_none() {
            return Err(invalid(
                "pad_to_capacity",
                "needs a capacity_factor (dropless routing has no capacity to pad to)",
            ));
        }
        non_negative_finite("aux_loss_coeff", self.aux_loss_coeff)?;
        non_negative_finite("seq_aux_loss_coeff", self.seq_aux_loss_coeff)?;
        non_negative_finite("global_aux_loss_coeff", self.global_aux_loss_coeff)?;
        if let Some(z) = self.z_loss_coeff {
            non_negative_finite("z_loss_coeff", z)?;
        }
        if let Some(eps) = self.input_jitter_eps
            && (!eps.is_finite() || eps <= 0.0 || eps >= 1.0)
        {
            return Err(invalid(
                "input_jitter_eps",
                format!("must be in (0, 1), got {eps}"),
            ));
        }
        if self.routing == RoutingType::Sinkhorn {
            if self.aux_loss_coeff + self.seq_aux_loss_coeff + self.global_aux_loss_coeff > 0.0 {
                return Err(invalid(
                    "routing",
                    "Sinkhorn routing balances by construction and takes no aux loss \
                     (set the aux loss coefficients to 0)",
                ));
            }
            if self.num_groups.is_some() || self.expert_bias {
                return Err(invalid(
                    "routing",
                    "Sinkhorn routing does not combine with group-limited routing or expert bias",
                ));
            }
        }
        if !self.init_std.is_finite() || self.init_std < 0.0 {
            return Err(invalid("init_std", "must be finite and >= 0"));
        }
        Ok(())
    }

    /// Tokens each expert keeps for `num_tokens` tokens: `ceil(T * k / E * capacity_factor)`,
    /// or `None` when dropless.
    pub fn capacity(&self, num_tokens: usize) -> Option<usize> {
        self.capacity_factor.map(|cf| {
            ((num_tokens * self.topk) as f64 / self.num_experts as f64 * cf).ceil() as usize
        })
    }
}
