//! The recipe's `[model]` and `[parallel]` tables as the library's model configuration and
//! stage layout ([`burn_moe::lm`]).

use burn_moe::MoeError;
use burn_moe::lm::{LayerSplit, MoeLmConfig, StageLayout};
use burn_moe::prelude::{
    DispatcherKind, ExpertsConfig, MoeLayerConfig, RouterConfig, SharedExpertsConfig,
};
use burn_parallel::context::CpAttention;

use crate::error::{RecipeError, Result};
use crate::recipe::{CpComm, Dispatcher, ModelConfig, Recipe};

impl ModelConfig {
    /// The library configuration of this `[model]` table.
    pub fn lm_config(&self) -> MoeLmConfig {
        let (h, e) = (self.hidden, self.experts);
        let f = self.expert_ffn_hidden.unwrap_or(self.ffn_hidden);
        // Top-1 routing takes the softmax before the top-k (Switch / Megatron's pre-softmax),
        // otherwise the router gets no gradient.
        let mut router = RouterConfig::new(h, e, self.topk)
            .with_pre_softmax(self.topk == 1)
            .with_aux_loss_coeff(self.aux_loss_coeff)
            .with_z_loss_coeff(self.z_loss_coeff)
            .with_init_std(self.init_std);
        if let Some(c) = self.capacity_factor {
            router = router
                .with_capacity_factor(Some(c))
                .with_pad_to_capacity(true);
        }
        let moe = MoeLayerConfig::new(
            router,
            ExpertsConfig::new(e, h, f).with_init_std(self.init_std),
        )
        .with_shared(
            self.shared_expert_ffn_hidden
                .map(|fs| SharedExpertsConfig::new(h, fs).with_init_std(self.init_std)),
        );
        MoeLmConfig::new(self.vocab, h, self.layers, self.heads, self.ffn_hidden)
            .with_kv_heads(self.kv_heads)
            .with_moe_every(self.moe_every)
            .with_moe((self.moe_every > 0).then_some(moe))
            .with_rope_theta(self.rope_theta)
            .with_init_std(self.init_std)
            .with_tie_embeddings(self.tie_embeddings)
    }
}

/// A library error of the layer split, named by its `[parallel]` key.
fn parallel_key(e: MoeError) -> RecipeError {
    match e {
        MoeError::InvalidConfig { field, reason } => RecipeError::Invalid {
            key: format!("parallel.{field}"),
            reason,
        },
        other => other.into(),
    }
}

/// The layer split a recipe asks for (`parallel.pp_layers`, or uniform).
pub fn layer_split(recipe: &Recipe) -> Result<LayerSplit> {
    let p = &recipe.parallel;
    let chunks = p.virtual_pp.unwrap_or(1);
    match &p.pp_layers {
        Some(counts) => LayerSplit::given(recipe.model.layers, p.pp, chunks, counts),
        None => LayerSplit::uniform(recipe.model.layers, p.pp, chunks),
    }
    .map_err(parallel_key)
}

/// The stage layout a recipe's `[parallel]` table asks for.
pub fn stage_layout(recipe: &Recipe) -> Result<StageLayout> {
    let p = &recipe.parallel;
    Ok(StageLayout {
        dispatcher: dispatcher_kind(p.dispatcher),
        split: layer_split(recipe)?,
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
