//! The recipe's `[model]` and `[parallel]` tables as the library's model configuration and
//! stage layout ([`burn_moe::lm`]).

use burn_moe::MoeError;
use burn_moe::lm::{MoeLmConfig, QkNorm, StageLayout};
use burn_moe::prelude::{
    Activation, DispatcherKind, DropPolicy, ExpertsConfig, MoeLayerConfig, RouterConfig,
    RoutingType, ScoreFunction, SharedExpertsConfig,
};
use burn_parallel::context::CpAttention;

use crate::error::{RecipeError, Result};
use crate::recipe::{
    CpComm, Dispatcher, DropPolicyName, ExpertActivation, ModelConfig, QkNormName, Recipe,
    RoutingName, ScoreFunctionName,
};

impl ModelConfig {
    /// The library router configuration of `[model]` and `[model.router]`.
    pub fn router_config(&self) -> RouterConfig {
        let r = self.router.clone().unwrap_or_default();
        let mut router = RouterConfig::new(self.hidden, self.experts, self.topk)
            .with_pre_softmax(r.pre_softmax.unwrap_or(self.topk == 1))
            .with_aux_loss_coeff(r.aux_loss_coeff.unwrap_or(self.aux_loss_coeff))
            .with_z_loss_coeff(r.z_loss_coeff.or(self.z_loss_coeff))
            .with_init_std(self.init_std);
        // `[model] capacity_factor` (the flat key) drops and pads to capacity.
        if let Some(c) = self.capacity_factor {
            router = router
                .with_capacity_factor(Some(c))
                .with_pad_to_capacity(true);
        }
        if let Some(f) = r.score_function {
            router = router.with_score_function(match f {
                ScoreFunctionName::Softmax => ScoreFunction::Softmax,
                ScoreFunctionName::Sigmoid => ScoreFunction::Sigmoid,
            });
        }
        if let Some(routing) = r.routing {
            router = router.with_routing(match routing {
                RoutingName::Topk => RoutingType::TopK,
                RoutingName::Sinkhorn => RoutingType::Sinkhorn,
            });
        }
        if let Some(p) = r.drop_policy {
            router = router.with_drop_policy(match p {
                DropPolicyName::Probs => DropPolicy::Probs,
                DropPolicyName::Position => DropPolicy::Position,
            });
        }
        if r.capacity_factor.is_some() {
            router = router.with_capacity_factor(r.capacity_factor);
        }
        if let Some(pad) = r.pad_to_capacity {
            router = router.with_pad_to_capacity(pad);
        }
        if let Some(b) = r.expert_bias {
            router = router.with_expert_bias(b);
        }
        if let Some(rate) = r.bias_update_rate {
            router = router.with_bias_update_rate(rate);
        }
        if let Some(c) = r.seq_aux_loss_coeff {
            router = router.with_seq_aux_loss_coeff(c);
        }
        if let Some(c) = r.global_aux_loss_coeff {
            router = router.with_global_aux_loss_coeff(c);
        }
        router
            .with_num_groups(r.num_groups)
            .with_group_topk(r.group_topk)
            .with_scaling_factor(r.scaling_factor)
            .with_input_jitter_eps(r.input_jitter_eps)
    }

    /// The library configuration of this `[model]` table.
    pub fn lm_config(&self) -> MoeLmConfig {
        let (h, e) = (self.hidden, self.experts);
        let f = self.expert_ffn_hidden.unwrap_or(self.ffn_hidden);
        let activation = match self.expert_activation {
            ExpertActivation::Swiglu => Activation::SwiGlu,
            ExpertActivation::Gelu => Activation::Gelu,
            ExpertActivation::Silu => Activation::Silu,
            ExpertActivation::Relu => Activation::Relu,
        };
        let moe = MoeLayerConfig::new(
            self.router_config(),
            ExpertsConfig::new(e, h, f)
                .with_activation(activation)
                .with_init_std(self.init_std),
        )
        .with_shared(self.shared_expert_ffn_hidden.map(|fs| {
            SharedExpertsConfig::new(h, fs)
                .with_activation(activation)
                .with_gate(self.shared_expert_gate)
                .with_init_std(self.init_std)
        }));
        MoeLmConfig::new(self.vocab, h, self.layers, self.heads, self.ffn_hidden)
            .with_kv_heads(self.kv_heads)
            .with_moe_every(self.moe_every)
            .with_moe((self.moe_every > 0).then_some(moe))
            .with_rope_theta(self.rope_theta)
            .with_init_std(self.init_std)
            .with_norm_eps(self.norm_eps)
            .with_tie_embeddings(self.tie_embeddings)
            .with_head_dim(self.head_dim)
            .with_qk_norm(match self.qk_norm {
                QkNormName::Off => QkNorm::Off,
                QkNormName::PerHead => QkNorm::PerHead,
                QkNormName::Whole => QkNorm::Whole,
            })
            .with_qkv_bias(self.qkv_bias)
            .with_dense_layers(self.dense_layers.clone())
    }

    /// The `[model]` / `[model.router]` key of a library configuration error.
    pub fn key_of(&self, e: MoeError) -> RecipeError {
        let MoeError::InvalidConfig { field, reason } = e else {
            return e.into();
        };
        let in_table = self.router.clone().unwrap_or_default();
        let key = match field {
            "topk" => "model.topk".to_string(),
            "num_experts" => "model.experts".to_string(),
            "hidden" => "model.hidden".to_string(),
            // Given as a flat `[model]` key.
            "aux_loss_coeff" if in_table.aux_loss_coeff.is_none() => "model.aux_loss_coeff".into(),
            "z_loss_coeff" if in_table.z_loss_coeff.is_none() => "model.z_loss_coeff".into(),
            "capacity_factor" if in_table.capacity_factor.is_none() => {
                "model.capacity_factor".into()
            }
            f if ROUTER_KEYS.contains(&f) => format!("model.router.{f}"),
            f => format!("model.{f}"),
        };
        RecipeError::Invalid { key, reason }
    }
}

/// The `[model.router]` keys (`RouterConfig`'s field names).
pub const ROUTER_KEYS: [&str; 16] = [
    "score_function",
    "pre_softmax",
    "routing",
    "num_groups",
    "group_topk",
    "scaling_factor",
    "expert_bias",
    "bias_update_rate",
    "capacity_factor",
    "drop_policy",
    "pad_to_capacity",
    "aux_loss_coeff",
    "seq_aux_loss_coeff",
    "global_aux_loss_coeff",
    "z_loss_coeff",
    "input_jitter_eps",
];

/// Parameters of the model (all ranks together): `(total, active per token)`.
pub fn parameter_count(m: &ModelConfig) -> (u64, u64) {
    m.lm_config().parameter_count()
}

/// Bytes of parameters, gradients and AdamW state (f32 weights and gradients, f32 master
/// weights and two moments) for the whole model, before any sharding.
pub fn training_state_bytes(m: &ModelConfig) -> u64 {
    parameter_count(m).0 * 4 * 5
}

/// The stage layout a recipe's `[parallel]` table asks for.
pub fn stage_layout(recipe: &Recipe) -> Result<StageLayout> {
    let p = &recipe.parallel;
    Ok(StageLayout {
        dispatcher: dispatcher_kind(p.dispatcher),
        split: recipe.layer_split()?,
        cp_attention: match p.cp_comm {
            CpComm::P2p => CpAttention::Ring,
            CpComm::Allgather => CpAttention::AllGather,
        },
    })
}

/// The library's dispatcher kind of `parallel.dispatcher`.
pub fn dispatcher_kind(d: Dispatcher) -> DispatcherKind {
    match d {
        Dispatcher::Alltoall => DispatcherKind::AllToAll,
        Dispatcher::Allgather => DispatcherKind::AllGather,
    }
}

/// The model of a training run folder at its newest checkpoint, whole on `device`, whatever
/// layout wrote it (a checkpoint of several ranks that did not record its layout is refused).
pub fn load_run(
    run: &std::path::Path,
    device: &burn::tensor::Device,
) -> Result<burn_moe::lm::MoeLm> {
    let recipe = Recipe::load(&run.join("recipe.toml"), &[]).map_err(|e| {
        RecipeError::invalid("RUN", format!("{}: {e}", run.join("recipe.toml").display()))
    })?;
    let Some((dir, meta)) = crate::checkpoint::latest(run)? else {
        return Err(RecipeError::invalid(
            "RUN",
            format!("{} has no checkpoint", run.display()),
        ));
    };
    let config = recipe.model.lm_config();
    match &meta.layout {
        // Several ranks' shards put together.
        Some(saved) if meta.world > 1 => {
            return burn_moe::lm::reshard::load_whole(&dir, &config, saved, device)
                .map_err(|e| recipe.model.key_of(e));
        }
        _ => {}
    }
    if meta.world != 1 {
        return Err(RecipeError::invalid(
            "RUN",
            format!(
                "its checkpoint was written by {} ranks before checkpoints recorded their \
                 layout; resume it on one rank first",
                meta.world
            ),
        ));
    }
    let model = config
        .init(recipe.run.seed, device)
        .map_err(|e| recipe.model.key_of(e))?;
    let (model, _) = crate::checkpoint::load(&dir, model, 0)?;
    Ok(model)
}
