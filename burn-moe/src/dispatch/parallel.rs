//! Expert-parallel token dispatchers (Megatron-Core's `MoEAllGatherTokenDispatcher` and
//! `MoEAlltoAllTokenDispatcher`), over the MoE mapping of a folded mesh: experts are split over
//! the expert-parallel group (whole experts) and the expert-tensor-parallel group (each expert's
//! first projection by columns, second by rows).
//!
//! Every exchange goes through `burn_parallel::mappings`, so gradients flow back through the
//! conjugate collectives. Accounting ([`DispatchStats`]) counts the logical payload: the bytes of
//! rows this rank hands to other ranks and receives from them (rows kept on the same rank are
//! not counted), and every device-to-host synchronisation:
//! - dropless: the routing map is read once to size the groups (1 sync); the per-expert counts
//!   are then exchanged between hosts over the ETP×EP group (no device sync);
//! - drop-and-pad: shapes are static (capacity per expert per rank) and nothing is read back.

use std::ops::Range;

use burn::tensor::{Bool, Tensor};
use burn_parallel::group::{Group, ProcessGroups};
use burn_parallel::mappings;
use burn_parallel::mesh::GroupKind;
use burn_parallel::ops::GatherGrad;

use super::permute::{self, local_permutation};
use super::{DispatchPlan, DispatchStats, Dispatched, TokenDispatcher, check_routing_shapes};
use burn_parallel::transfers::{self, HostTransfers};

use crate::error::{Result, invalid};
use crate::host;
use crate::kernels;

/// What a cross-rank dispatch must undo in `combine`.
#[derive(Debug, Clone)]
pub struct Exchange {
    kind: ExchangeKind,
    /// Bytes of one row of hidden state.
    row_bytes: u64,
    /// A zero row `[1, H]` that depends on this rank's dispatch collectives (see
    /// [`carrier`]).
    carrier: Tensor<2>,
}

/// Burn's autodiff drops empty tensors from the graph, so on a rank whose experts receive no
/// row the collectives of `combine` (and, in the backward pass, those of `dispatch`) would not
/// be part of its graph and its peers would wait forever. Every exchange therefore carries one
/// extra zero row that this rank sends to itself and that links each collective to the next;
/// it adds nothing to any value or gradient and is not counted in the accounting.
pub fn carrier(row: Tensor<2>) -> Tensor<2> {
    row.mul_scalar(0.0)
}

/// Row indices `0..len` with row `from` moved to position `to` (the others keep their order).
fn move_row(len: usize, from: usize, to: usize) -> Vec<usize> {
    let mut idx = without_row(len, from);
    idx.insert(to, from);
    idx
}

/// Row indices `0..len` without row `row`.
fn without_row(len: usize, row: usize) -> Vec<usize> {
    (0..len).filter(|&i| i != row).collect()
}

/// Per-peer row counts with this rank's own segment one row longer (the carrier).
fn with_carrier(counts: &[usize], me: usize) -> Vec<usize> {
    counts
        .iter()
        .enumerate()
        .map(|(p, &n)| n + usize::from(p == me))
        .collect()
}

/// Rows exchanged with peers other than this rank.
fn remote_rows(counts: &[usize], me: usize) -> u64 {
    counts
        .iter()
        .enumerate()
        .filter(|(p, _)| *p != me)
        .map(|(_, &n)| n as u64)
        .sum()
}

/// `rows[idx]` for host indices.
fn take(rows: Tensor<2>, idx: &[usize]) -> Tensor<2> {
    let device = rows.device();
    let idx: Vec<i64> = idx.iter().map(|&i| i as i64).collect();
    rows.select(
        0,
        host::upload_i64(&idx, &device, "uploading a row selection"),
    )
}

#[derive(Debug, Clone)]
enum ExchangeKind {
    /// All-gather over ETP×EP: `gathered` rows, this rank's `local` of them.
    AllGather { local: usize, gathered: usize },
    /// All-to-all-v over EP (+ all-gather-v over ETP).
    AllToAll {
        ep_send: Vec<usize>,
        ep_recv: Vec<usize>,
        etp_rows: Vec<usize>,
        /// Position, in the expert-major rows, of each gathered row in `(ETP rank, EP rank,
        /// expert)` order.
        position: Vec<usize>,
    },
}

/// The groups an expert-parallel dispatcher works over.
#[derive(Debug, Clone)]
pub struct ExpertGroups {
    ep: Group,
    etp: Group,
    tp_ep: Group,
}

impl ExpertGroups {
    /// The MoE groups of this rank in `groups`.
    pub fn new(groups: &ProcessGroups) -> Result<Self> {
        let ep = groups.group(GroupKind::Ep).clone();
        let etp = groups.group(GroupKind::ExpertTp).clone();
        let tp_ep = groups.group(GroupKind::ExpertTpEp).clone();
        // The ETP×EP group lists ranks ETP-fastest: member p·etp + j is (EP rank p, ETP rank j).
        let (e, t) = (ep.size(), etp.size());
        let ok = tp_ep.size() == e * t
            && (0..e).all(|p| tp_ep.world_ranks()[p * t + etp.rank()] == ep.world_ranks()[p])
            && (0..t).all(|j| tp_ep.world_ranks()[ep.rank() * t + j] == etp.world_ranks()[j]);
        if !ok {
            return Err(invalid(
                "groups",
                format!(
                    "the expert_tp_ep group {:?} is not the ETP-fastest product of expert_tp {:?} \
                     and ep {:?}",
                    tp_ep.world_ranks(),
                    etp.world_ranks(),
                    ep.world_ranks()
                ),
            ));
        }
        Ok(Self { ep, etp, tp_ep })
    }

    /// Groups of a single rank (everything local).
    pub fn single() -> Self {
        Self {
            ep: Group::single(),
            etp: Group::single(),
            tp_ep: Group::single(),
        }
    }

    /// Expert-parallel size.
    pub fn ep(&self) -> &Group {
        &self.ep
    }

    /// Expert-tensor-parallel size.
    pub fn etp(&self) -> &Group {
        &self.etp
    }

    /// The experts (global indices) on this rank.
    pub fn local_experts(&self, num_experts: usize) -> Range<usize> {
        let per = num_experts / self.ep.size();
        self.ep.rank() * per..(self.ep.rank() + 1) * per
    }

    fn check_experts(&self, num_experts: usize) -> Result<usize> {
        if num_experts == 0 || !num_experts.is_multiple_of(self.ep.size()) {
            return Err(invalid(
                "num_experts",
                format!(
                    "{num_experts} experts cannot be split over {} expert-parallel ranks",
                    self.ep.size()
                ),
            ));
        }
        Ok(num_experts / self.ep.size())
    }
}

fn row_bytes(t: &Tensor<2>) -> u64 {
    (t.dims()[1] * t.dtype().size()) as u64
}

/// Gathers every token of the ETP×EP group, keeps the rows of this rank's experts, and
/// reduce-scatters the expert outputs back (Megatron's all-gather dispatcher).
#[derive(Debug, Clone)]
pub struct AllGatherDispatcher {
    groups: ExpertGroups,
}

impl AllGatherDispatcher {
    /// A dispatcher over `groups`.
    pub fn new(groups: ExpertGroups) -> Self {
        Self { groups }
    }
}

impl TokenDispatcher for AllGatherDispatcher {
    fn local_experts(&self, num_experts: usize) -> Range<usize> {
        self.groups.local_experts(num_experts)
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
        let e = routing_map.dims()[1];
        self.groups.check_experts(e)?;
        let g = &self.groups.tp_ep;
        let bytes = row_bytes(&hidden);
        // One collective for hidden states, probs and map: in the backward pass the collectives
        // of a dispatch then form a single chain, so every rank runs them in the same order.
        let h = hidden.dims()[1];
        // In the hidden states' precision (the map's 0 and 1 are exact in any).
        let dtype = hidden.dtype();
        let packed = Tensor::cat(
            vec![
                hidden,
                probs.cast(dtype),
                routing_map.float().cast(dtype).detach(),
            ],
            1,
        );
        let packed = mappings::gather_from_sequence_region(packed, g, GatherGrad::ReduceScatter)?;
        let rows = packed.dims()[0];
        let hidden = packed.clone().slice([0..rows, 0..h]);
        let probs = packed.clone().slice([0..rows, h..h + e]);
        let map = packed.slice([0..rows, h + e..h + 2 * e]).detach().bool();
        let carrier = carrier(hidden.clone().slice([0..1, 0..h]));
        let gathered = hidden.dims()[0];
        let local = self.local_experts(e);
        let local_map = map.slice([0..gathered, local.clone()]);
        let local_probs = probs.slice([0..gathered, local]);
        let perm = local_permutation(local_map, capacity.map(|c| c.min(t) * g.size()))?;
        let (tokens, probs) = permute::permute(hidden, local_probs, &perm);
        let peers = (g.size() - 1) as u64;
        // Hidden rows, probs and map (in the rows' precision) go to every peer.
        let per_token = bytes + 2 * (e * dtype.size()) as u64;
        let stats = DispatchStats {
            bytes_sent: t as u64 * per_token * peers,
            bytes_received: (gathered - t) as u64 * per_token,
            transfers: transfers::snapshot() - before,
        };
        Ok(Dispatched {
            tokens,
            probs,
            tokens_per_expert: perm.counts,
            plan: DispatchPlan {
                sorted_indices: perm.sorted_indices,
                row_map: perm.row_map,
                num_tokens: gathered,
                exchange: Some(Exchange {
                    kind: ExchangeKind::AllGather { local: t, gathered },
                    row_bytes: bytes,
                    carrier,
                }),
                stats,
            },
        })
    }

    fn combine(
        &self,
        expert_output: Tensor<2>,
        plan: DispatchPlan,
    ) -> Result<(Tensor<2>, DispatchStats)> {
        let Some(Exchange {
            kind: ExchangeKind::AllGather { local, gathered },
            row_bytes,
            carrier,
        }) = plan.exchange
        else {
            return Err(invalid("plan", "was not made by the all-gather dispatcher"));
        };
        let before = transfers::snapshot();
        let out = permute::unpermute(expert_output, plan.sorted_indices, plan.row_map) + carrier;
        let out = mappings::reduce_scatter_to_sequence_region(out, &self.groups.tp_ep)?;
        let mut stats = plan.stats;
        stats.bytes_sent += (gathered - local) as u64 * row_bytes;
        stats.bytes_received += (gathered - local) as u64 * row_bytes;
        stats.transfers = stats.transfers + (transfers::snapshot() - before);
        Ok((out, stats))
    }
}

/// Sends each token only to the ranks of its experts (Megatron's all-to-all dispatcher):
/// permute → all-to-all-v over EP → all-gather-v over ETP → sort chunks by local expert, and
/// the reverse in `combine`.
#[derive(Debug, Clone)]
pub struct AllToAllDispatcher {
    groups: ExpertGroups,
}

impl AllToAllDispatcher {
    /// A dispatcher over `groups`.
    pub fn new(groups: ExpertGroups) -> Self {
        Self { groups }
    }
}

/// Per-expert token counts of every ETP×EP rank, `counts[q][e]`.
fn exchange_counts(g: &Group, local: &[usize]) -> Result<Vec<Vec<usize>>> {
    let e = local.len();
    let mine: Vec<f32> = local.iter().map(|&n| n as f32).collect();
    let all = g.communicator()?.all_gather(&mine)?;
    Ok(all
        .chunks(e)
        .map(|c| c.iter().map(|&n| n as usize).collect())
        .collect())
}

impl TokenDispatcher for AllToAllDispatcher {
    fn local_experts(&self, num_experts: usize) -> Range<usize> {
        self.groups.local_experts(num_experts)
    }

    /// Megatron's `token_permutation`, step for step in one function (permute, the counts,
    /// the all-to-all-v over EP with each row's probability and a carrier row, the
    /// all-gather-v over ETP, the chunk sort by local expert): the steps share the counts
    /// and split sizes, which reads best in the order the collectives run.
    fn dispatch(
        &self,
        hidden: Tensor<2>,
        probs: Tensor<2>,
        routing_map: Tensor<2, Bool>,
        capacity: Option<usize>,
    ) -> Result<Dispatched> {
        let before = transfers::snapshot();
        let [t, h] = hidden.dims();
        check_routing_shapes(t, &probs, &routing_map)?;
        if t == 0 {
            return Err(invalid(
                "hidden",
                "a rank without tokens cannot take part in the all-to-all dispatcher: Burn's \
                 autodiff drops empty tensors from the graph",
            ));
        }
        let e = routing_map.dims()[1];
        let el = self.groups.check_experts(e)?;
        let (ep, etp) = (&self.groups.ep, &self.groups.etp);
        let (n_ep, n_etp, me, my_j) = (ep.size(), etp.size(), ep.rank(), etp.rank());
        let bytes = row_bytes(&hidden);
        let perm = local_permutation(routing_map, capacity)?;
        let (tokens, probs) = permute::permute(hidden, probs, &perm);
        // counts[q][e]: rows of ETP×EP rank q (= p·etp + j) for expert e.
        let counts = match capacity {
            Some(c) => vec![vec![c.min(t); e]; n_ep * n_etp],
            None => exchange_counts(&self.groups.tp_ep, &perm.counts)?,
        };
        let mine = self.local_experts(e);
        let q = |p: usize, j: usize| p * n_etp + j;
        let ep_send: Vec<usize> = (0..n_ep)
            .map(|p| perm.counts[p * el..(p + 1) * el].iter().sum())
            .collect();
        let ep_recv: Vec<usize> = (0..n_ep)
            .map(|p| counts[q(p, my_j)][mine.clone()].iter().sum())
            .collect();
        // Rows travel with their probability in one tensor `[N, H + 1]`: one collective per
        // step, so the backward collectives form a single chain (same order on every rank).
        // The probability travels in the rows' precision (the experts compute in it anyway).
        let n_rows: usize = ep_send.iter().sum();
        let dtype = tokens.dtype();
        let packed = Tensor::cat(vec![tokens, probs.cast(dtype).reshape([n_rows, 1])], 1);
        let width = h + 1;
        // The carrier row goes to this rank itself, at the end of its own segment.
        let my_end: usize = ep_send[..=me].iter().sum();
        let first = packed.clone().slice([0..1, 0..width]);
        let packed = take(
            Tensor::cat(vec![packed, carrier(first)], 0),
            &move_row(n_rows + 1, n_rows, my_end),
        );
        let packed = mappings::all_to_all_v(
            packed,
            ep,
            &with_carrier(&ep_send, me),
            &with_carrier(&ep_recv, me),
        )?;
        let prob_bytes = packed.dtype().size() as u64;
        let mut stats = DispatchStats {
            bytes_sent: remote_rows(&ep_send, me) * (bytes + prob_bytes),
            bytes_received: remote_rows(&ep_recv, me) * (bytes + prob_bytes),
            transfers: HostTransfers::default(),
        };
        // Move the carrier to the end of the received rows, then gather over ETP: every ETP
        // rank's segment is its rows followed by its carrier.
        let received: usize = ep_recv.iter().sum();
        let my_carrier: usize = ep_recv[..=me].iter().sum();
        let packed = take(packed, &move_row(received + 1, my_carrier, received));
        // Rows each ETP rank received for this rank's experts.
        let etp_rows: Vec<usize> = (0..n_etp)
            .map(|j| {
                (0..n_ep)
                    .map(|p| counts[q(p, j)][mine.clone()].iter().sum::<usize>())
                    .sum()
            })
            .collect();
        if n_etp > 1 {
            let mine_rows = etp_rows[my_j] as u64;
            let others: u64 = etp_rows.iter().map(|&n| n as u64).sum::<u64>() - mine_rows;
            stats.bytes_sent += mine_rows * (bytes + prob_bytes) * (n_etp as u64 - 1);
            stats.bytes_received += others * (bytes + prob_bytes);
        }
        let seg: Vec<usize> = etp_rows.iter().map(|n| n + 1).collect();
        let packed = mappings::gather_rows_v(packed, etp, &seg)?;
        // Gathered rows arrive as (ETP rank j, EP rank p, local expert) plus one carrier per j;
        // the experts want them expert-major: (local expert, j, p).
        // Each chunk's first row among the real rows (carriers skipped).
        let mut chunk_start = vec![0usize; n_etp * n_ep * el];
        let mut real = 0;
        for j in 0..n_etp {
            for p in 0..n_ep {
                for (li, x) in mine.clone().enumerate() {
                    chunk_start[(j * n_ep + p) * el + li] = real;
                    real += counts[q(p, j)][x];
                }
            }
        }
        // position[i]: expert-major row of real row i (what `combine` needs to restore arrival
        // order).
        let mut position = vec![0usize; real];
        let mut tokens_per_expert = vec![0usize; el];
        let mut next = 0;
        for (li, x) in mine.clone().enumerate() {
            for j in 0..n_etp {
                for p in 0..n_ep {
                    let real_start = chunk_start[(j * n_ep + p) * el + li];
                    let n = counts[q(p, j)][x];
                    for i in 0..n {
                        position[real_start + i] = next;
                        next += 1;
                    }
                    tokens_per_expert[li] += n;
                }
            }
        }
        let my_carrier: usize = seg[..=my_j].iter().sum::<usize>() - 1;
        let carrier_row = carrier(packed.clone().slice([my_carrier..my_carrier + 1, 0..h]));
        // The regrouping is a chunk sort (Megatron's `sort_chunks_by_idxs`): the arrival order's
        // chunks are the (j, p, local expert) segments with one carrier chunk closing each j;
        // expert-major chunks first, the carriers last (then sliced off).
        let per_j = n_ep * el + 1;
        let mut split_sizes = Vec::with_capacity(n_etp * per_j);
        for j in 0..n_etp {
            for p in 0..n_ep {
                split_sizes.extend(mine.clone().map(|x| counts[q(p, j)][x]));
            }
            split_sizes.push(1);
        }
        let mut chunk_order = Vec::with_capacity(split_sizes.len());
        for li in 0..el {
            for j in 0..n_etp {
                chunk_order.extend((0..n_ep).map(|p| j * per_j + p * el + li));
            }
        }
        chunk_order.extend((0..n_etp).map(|j| j * per_j + n_ep * el));
        let sorted = kernels::sort_chunks(packed, &split_sizes, &chunk_order)?;
        stats.transfers = transfers::snapshot() - before;
        let rows = real;
        let tokens = sorted.clone().slice([0..rows, 0..h]);
        let probs = sorted.slice([0..rows, h..h + 1]).reshape([rows]);
        Ok(Dispatched {
            tokens,
            probs,
            tokens_per_expert,
            plan: DispatchPlan {
                sorted_indices: perm.sorted_indices,
                row_map: perm.row_map,
                num_tokens: t,
                exchange: Some(Exchange {
                    kind: ExchangeKind::AllToAll {
                        ep_send,
                        ep_recv,
                        etp_rows,
                        position,
                    },
                    row_bytes: bytes,
                    carrier: carrier_row,
                }),
                stats,
            },
        })
    }

    fn combine(
        &self,
        expert_output: Tensor<2>,
        plan: DispatchPlan,
    ) -> Result<(Tensor<2>, DispatchStats)> {
        let Some(Exchange {
            kind:
                ExchangeKind::AllToAll {
                    ep_send,
                    ep_recv,
                    etp_rows,
                    position,
                },
            row_bytes,
            carrier,
        }) = plan.exchange
        else {
            return Err(invalid("plan", "was not made by the all-to-all dispatcher"));
        };
        let before = transfers::snapshot();
        let (ep, etp) = (&self.groups.ep, &self.groups.etp);
        let (me, my_j) = (ep.rank(), etp.rank());
        let mut stats = plan.stats;
        let n_real = position.len();
        // Back to arrival order, one carrier row closing each ETP segment.
        let aug = Tensor::cat(vec![expert_output, carrier.clone()], 0);
        let mut idx = Vec::with_capacity(n_real + etp_rows.len());
        let mut at = 0;
        for &n in &etp_rows {
            idx.extend(position[at..at + n].iter().copied());
            idx.push(n_real);
            at += n;
        }
        let out = take(aug, &idx);
        if etp.size() > 1 {
            let total: u64 = etp_rows.iter().map(|&n| n as u64).sum();
            let mine = etp_rows[my_j] as u64;
            stats.bytes_sent += (total - mine) * row_bytes;
            stats.bytes_received += mine * row_bytes * (etp.size() as u64 - 1);
        }
        let seg: Vec<usize> = etp_rows.iter().map(|n| n + 1).collect();
        let out = mappings::reduce_scatter_rows_v(out, etp, &seg)?;
        // The carrier (last row) goes back to this rank at the end of its own EP segment.
        let mine_rows = etp_rows[my_j];
        let my_end: usize = ep_recv[..=me].iter().sum();
        let out = take(out, &move_row(mine_rows + 1, mine_rows, my_end));
        stats.bytes_sent += remote_rows(&ep_recv, me) * row_bytes;
        stats.bytes_received += remote_rows(&ep_send, me) * row_bytes;
        let out = mappings::all_to_all_v(
            out,
            ep,
            &with_carrier(&ep_recv, me),
            &with_carrier(&ep_send, me),
        )?;
        // Drop the carrier and scatter the rows back to their tokens.
        let sent: usize = ep_send.iter().sum();
        let my_carrier: usize = ep_send[..=me].iter().sum();
        let out = take(out, &without_row(sent + 1, my_carrier));
        let out = permute::unpermute(out, plan.sorted_indices, plan.row_map);
        stats.transfers = stats.transfers + (transfers::snapshot() - before);
        Ok((out, stats))
    }
}
