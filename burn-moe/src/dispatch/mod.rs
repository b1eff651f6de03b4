//! Token dispatchers: group tokens by local expert, then bring the expert outputs back.
//!
//! A dispatcher's [`dispatch`](TokenDispatcher::dispatch) returns the grouped tokens together
//! with a [`DispatchPlan`] value that [`combine`](TokenDispatcher::combine) consumes: no state
//! is kept on the dispatcher between the two calls.

pub mod parallel;
pub mod permute;

use std::fmt::Debug;
use std::ops::Range;

use burn::tensor::{Bool, Int, Tensor};
use burn_parallel::transfers::{self, HostTransfers};

use crate::error::{MoeError, Result};

/// Communication and synchronisation accounting of one dispatch + combine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DispatchStats {
    /// Bytes this rank sent to other ranks.
    pub bytes_sent: u64,
    /// Bytes this rank received from other ranks.
    pub bytes_received: u64,
    /// Host ↔ device transfers of the dispatch (and, after combine, of the combine too):
    /// device-to-host reads (synchronisations) and host-to-device uploads, counted separately.
    pub transfers: HostTransfers,
}

/// What [`TokenDispatcher::combine`] needs to undo a dispatch.
#[derive(Debug, Clone)]
pub struct DispatchPlan {
    /// Token index of each dispatched row, `[N]`.
    pub sorted_indices: Tensor<1, Int>,
    /// Row of each (token, local expert) pair (`-1` if not routed), `[num_tokens, E_local]`.
    pub row_map: Tensor<2, Int>,
    /// Number of tokens before dispatch.
    pub num_tokens: usize,
    /// Cross-rank exchange to undo (expert-parallel dispatchers).
    pub exchange: Option<parallel::Exchange>,
    /// Accounting so far (dispatch side; combine adds its own).
    pub stats: DispatchStats,
}

/// Tokens grouped by local expert.
#[derive(Debug, Clone)]
pub struct Dispatched {
    /// Rows in expert-major order, `[N, H]`.
    pub tokens: Tensor<2>,
    /// Routing probability of each row, `[N]`.
    pub probs: Tensor<1>,
    /// Rows per local expert (host values; they size the expert groups).
    pub tokens_per_expert: Vec<usize>,
    /// The plan for [`TokenDispatcher::combine`].
    pub plan: DispatchPlan,
}

/// Moves tokens to their experts and back (Megatron's `MoETokenDispatcher`).
pub trait TokenDispatcher: Debug + Send + Sync {
    /// The experts (global indices) whose weights live on this rank.
    fn local_experts(&self, num_experts: usize) -> Range<usize>;

    /// Groups `hidden` `[T, H]` by local expert following `routing_map` `[T, E]`, with the
    /// matching entries of `probs` `[T, E]`. `capacity = Some(c)` says the map was padded to
    /// capacity (drop-and-pad): every expert has exactly `min(c, T)` tokens, so shapes are
    /// static and no host synchronisation is needed; `None` is dropless.
    fn dispatch(
        &self,
        hidden: Tensor<2>,
        probs: Tensor<2>,
        routing_map: Tensor<2, Bool>,
        capacity: Option<usize>,
    ) -> Result<Dispatched>;

    /// Brings expert outputs `[N, H]` back to token order `[T, H]`, summing over experts.
    fn combine(
        &self,
        expert_output: Tensor<2>,
        plan: DispatchPlan,
    ) -> Result<(Tensor<2>, DispatchStats)>;
}

/// Checks `probs` and `routing_map` against `t` tokens.
pub(crate) fn check_routing_shapes(
    t: usize,
    probs: &Tensor<2>,
    routing_map: &Tensor<2, Bool>,
) -> Result<()> {
    let map_dims = routing_map.dims();
    if probs.dims() != map_dims || map_dims[0] != t {
        return Err(MoeError::ShapeMismatch {
            name: "probs / routing_map",
            expected: format!("both [tokens = {t}, num_experts]"),
            got: probs.dims().to_vec(),
        });
    }
    Ok(())
}

/// One process: every expert is local; dispatch is a permutation, combine a scatter-add.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LocalDispatcher;

impl TokenDispatcher for LocalDispatcher {
    fn local_experts(&self, num_experts: usize) -> Range<usize> {
        0..num_experts
    }

    fn dispatch(
        &self,
        hidden: Tensor<2>,
        probs: Tensor<2>,
        routing_map: Tensor<2, Bool>,
        capacity: Option<usize>,
    ) -> Result<Dispatched> {
        let before = transfers::snapshot();
        let [t, _] = hidden.dims();
        check_routing_shapes(t, &probs, &routing_map)?;
        let local = permute::local_permutation(routing_map, capacity)?;
        let (tokens, probs) = permute::permute(hidden, probs, &local);
        Ok(Dispatched {
            tokens,
            probs,
            tokens_per_expert: local.counts,
            plan: DispatchPlan {
                sorted_indices: local.sorted_indices,
                row_map: local.row_map,
                num_tokens: t,
                exchange: None,
                stats: DispatchStats {
                    transfers: transfers::snapshot() - before,
                    ..DispatchStats::default()
                },
            },
        })
    }

    fn combine(
        &self,
        expert_output: Tensor<2>,
        plan: DispatchPlan,
    ) -> Result<(Tensor<2>, DispatchStats)> {
        let before = transfers::snapshot();
        let out = permute::unpermute(expert_output, plan.sorted_indices, plan.row_map);
        let mut stats = plan.stats;
        stats.transfers = stats.transfers + (transfers::snapshot() - before);
        Ok((out, stats))
    }
}
