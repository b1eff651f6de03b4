//! The process-group mesh with MoE Parallel Folding.
//!
//! One world of ranks is mapped two ways: attention and dense layers use
//! `tp × cp × dp × pp`, MoE layers use `etp × ep × edp × pp`, both following one order string
//! (default `tp-cp-ep-dp-pp`, leftmost varies fastest) and sharing the pipeline groups. Group
//! lists are Megatron-Core's `RankGenerator` results, in the same order.

use std::fmt;

use crate::error::{ParallelError, Result};

/// Parallel sizes of attention and dense layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ParallelDims {
    /// Tensor parallel size.
    pub tp: usize,
    /// Context parallel size.
    pub cp: usize,
    /// Data parallel size.
    pub dp: usize,
    /// Pipeline parallel size.
    pub pp: usize,
}

impl ParallelDims {
    /// Sizes `tp, cp, dp, pp`.
    pub fn new(tp: usize, cp: usize, dp: usize, pp: usize) -> Self {
        Self { tp, cp, dp, pp }
    }

    /// `tp * cp * dp * pp`.
    pub fn world_size(&self) -> usize {
        self.tp * self.cp * self.dp * self.pp
    }
}

/// Parallel sizes of MoE layers (the pipeline size is shared with [`ParallelDims`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MoeDims {
    /// Expert tensor parallel size.
    pub etp: usize,
    /// Expert parallel size.
    pub ep: usize,
    /// Expert data parallel size.
    pub edp: usize,
}

impl MoeDims {
    /// Sizes `etp, ep, edp`.
    pub fn new(etp: usize, ep: usize, edp: usize) -> Self {
        Self { etp, ep, edp }
    }
}

/// Every process group the mesh builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GroupKind {
    /// Tensor parallel.
    Tp,
    /// Context parallel.
    Cp,
    /// Data parallel (without context parallel).
    Dp,
    /// Pipeline parallel.
    Pp,
    /// Tensor × context parallel (aux-loss token counts, z-loss scaling).
    TpCp,
    /// Data × context parallel (dense gradient reduction).
    DpCp,
    /// Tensor × data × context parallel (global aux loss, expert-bias counts).
    TpDpCp,
    /// Tensor × pipeline parallel.
    TpPp,
    /// Expert tensor parallel.
    ExpertTp,
    /// Expert parallel.
    Ep,
    /// Expert tensor × expert parallel (the MoE dispatch group).
    ExpertTpEp,
    /// Expert data parallel (expert gradient reduction).
    ExpertDp,
    /// Pipeline parallel as seen by the MoE mapping (equal to `Pp`).
    ExpertPp,
}

impl GroupKind {
    /// Every kind, in a fixed order.
    pub const ALL: [GroupKind; 13] = [
        GroupKind::Tp,
        GroupKind::Cp,
        GroupKind::Dp,
        GroupKind::Pp,
        GroupKind::TpCp,
        GroupKind::DpCp,
        GroupKind::TpDpCp,
        GroupKind::TpPp,
        GroupKind::ExpertTp,
        GroupKind::Ep,
        GroupKind::ExpertTpEp,
        GroupKind::ExpertDp,
        GroupKind::ExpertPp,
    ];

    /// The snake-case name used in configs and golden files (`tp_dp_cp`, `expert_tp`, …).
    pub fn name(self) -> &'static str {
        match self {
            GroupKind::Tp => "tp",
            GroupKind::Cp => "cp",
            GroupKind::Dp => "dp",
            GroupKind::Pp => "pp",
            GroupKind::TpCp => "tp_cp",
            GroupKind::DpCp => "dp_cp",
            GroupKind::TpDpCp => "tp_dp_cp",
            GroupKind::TpPp => "tp_pp",
            GroupKind::ExpertTp => "expert_tp",
            GroupKind::Ep => "ep",
            GroupKind::ExpertTpEp => "expert_tp_ep",
            GroupKind::ExpertDp => "expert_dp",
            GroupKind::ExpertPp => "expert_pp",
        }
    }

    /// The kind named `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Whether the group belongs to the MoE mapping, and which dimensions it spans.
    fn spec(self) -> (bool, &'static [Dim]) {
        use Dim::*;
        match self {
            GroupKind::Tp => (false, &[Tp]),
            GroupKind::Cp => (false, &[Cp]),
            GroupKind::Dp => (false, &[Dp]),
            GroupKind::Pp => (false, &[Pp]),
            GroupKind::TpCp => (false, &[Tp, Cp]),
            GroupKind::DpCp => (false, &[Dp, Cp]),
            GroupKind::TpDpCp => (false, &[Tp, Dp, Cp]),
            GroupKind::TpPp => (false, &[Tp, Pp]),
            GroupKind::ExpertTp => (true, &[Tp]),
            GroupKind::Ep => (true, &[Ep]),
            GroupKind::ExpertTpEp => (true, &[Tp, Ep]),
            GroupKind::ExpertDp => (true, &[Dp]),
            GroupKind::ExpertPp => (true, &[Pp]),
        }
    }
}

impl fmt::Display for GroupKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One axis of the order string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dim {
    Tp,
    Cp,
    Ep,
    Dp,
    Pp,
}

impl Dim {
    fn parse(token: &str) -> Option<Dim> {
        Some(match token {
            "tp" => Dim::Tp,
            "cp" => Dim::Cp,
            "ep" => Dim::Ep,
            "dp" => Dim::Dp,
            "pp" => Dim::Pp,
            _ => return None,
        })
    }
}

/// Megatron's `generate_masked_orthogonal_rank_groups`: the groups spanning the masked axes,
/// for axes of `sizes` (leftmost fastest).
fn masked_groups(sizes: &[usize], mask: &[bool]) -> Vec<Vec<usize>> {
    let world: usize = sizes.iter().product();
    let mut stride = Vec::with_capacity(sizes.len());
    let mut acc = 1;
    for &s in sizes {
        stride.push(acc);
        acc *= s;
    }
    let pick = |want: bool| -> (Vec<usize>, Vec<usize>) {
        sizes
            .iter()
            .zip(&stride)
            .zip(mask)
            .filter(|(_, m)| **m == want)
            .map(|((s, d), _)| (*s, *d))
            .unzip()
    };
    let (masked_shape, masked_stride) = pick(true);
    let (unmasked_shape, unmasked_stride) = pick(false);
    let decompose_dot = |mut index: usize, shape: &[usize], stride: &[usize]| -> usize {
        let mut sum = 0;
        for (s, d) in shape.iter().zip(stride) {
            sum += (index % s) * d;
            index /= s;
        }
        sum
    };
    let group_size: usize = masked_shape.iter().product();
    (0..world / group_size)
        .map(|g| {
            let base = decompose_dot(g, &unmasked_shape, &unmasked_stride);
            (0..group_size)
                .map(|r| base + decompose_dot(r, &masked_shape, &masked_stride))
                .collect()
        })
        .collect()
}

/// The folded mesh: every group of both mappings, built once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mesh {
    world_size: usize,
    order: String,
    attention: ParallelDims,
    moe: MoeDims,
    groups: Vec<Vec<Vec<usize>>>,
}

fn positive(field: &'static str, v: usize) -> Result<()> {
    if v == 0 {
        return Err(ParallelError::InvalidLayout {
            field,
            reason: "must be >= 1".into(),
        });
    }
    Ok(())
}

impl Mesh {
    /// The default order string (leftmost varies fastest).
    pub const DEFAULT_ORDER: &'static str = "tp-cp-ep-dp-pp";

    /// Builds the mesh for `world_size` ranks with the default order.
    pub fn new(world_size: usize, attention: ParallelDims, moe: MoeDims) -> Result<Self> {
        Self::with_order(world_size, attention, moe, Self::DEFAULT_ORDER)
    }

    /// Builds the mesh with an explicit order string (a permutation of `tp`, `cp`, `ep`, `dp`,
    /// `pp` joined by `-`).
    pub fn with_order(
        world_size: usize,
        attention: ParallelDims,
        moe: MoeDims,
        order: &str,
    ) -> Result<Self> {
        positive("world_size", world_size)?;
        positive("tp", attention.tp)?;
        positive("cp", attention.cp)?;
        positive("dp", attention.dp)?;
        positive("pp", attention.pp)?;
        positive("etp", moe.etp)?;
        positive("ep", moe.ep)?;
        positive("edp", moe.edp)?;
        let dims: Vec<Dim> = order
            .to_ascii_lowercase()
            .split('-')
            .map(|t| {
                Dim::parse(t).ok_or_else(|| ParallelError::InvalidLayout {
                    field: "order",
                    reason: format!("unknown axis `{t}` in `{order}` (use tp, cp, ep, dp, pp)"),
                })
            })
            .collect::<Result<_>>()?;
        for d in [Dim::Tp, Dim::Cp, Dim::Ep, Dim::Dp, Dim::Pp] {
            if dims.iter().filter(|x| **x == d).count() != 1 {
                return Err(ParallelError::InvalidLayout {
                    field: "order",
                    reason: format!("`{order}` must name each of tp, cp, ep, dp, pp exactly once"),
                });
            }
        }
        if attention.world_size() != world_size {
            return Err(ParallelError::InvalidLayout {
                field: "dp",
                reason: format!(
                    "tp*cp*dp*pp = {}*{}*{}*{} = {} but the world has {world_size} ranks",
                    attention.tp,
                    attention.cp,
                    attention.dp,
                    attention.pp,
                    attention.world_size()
                ),
            });
        }
        let moe_world = moe.etp * moe.ep * moe.edp * attention.pp;
        if moe_world != world_size {
            return Err(ParallelError::InvalidLayout {
                field: "edp",
                reason: format!(
                    "etp*ep*edp*pp = {}*{}*{}*{} = {moe_world} but the world has {world_size} ranks",
                    moe.etp, moe.ep, moe.edp, attention.pp
                ),
            });
        }
        let pos = |d: Dim| dims.iter().position(|x| *x == d).unwrap_or(0);
        if pos(Dim::Pp) != dims.len() - 1 && attention.pp > 1 && moe.edp != attention.dp {
            return Err(ParallelError::InvalidLayout {
                field: "order",
                reason: "with pp not last in the order, the attention and MoE data parallel sizes \
                         must be equal"
                    .into(),
            });
        }
        let size_of = |d: Dim, moe_map: bool| -> usize {
            match (d, moe_map) {
                (Dim::Tp, false) => attention.tp,
                (Dim::Cp, false) => attention.cp,
                (Dim::Ep, false) => 1,
                (Dim::Dp, false) => attention.dp,
                (Dim::Tp, true) => moe.etp,
                (Dim::Cp, true) => 1,
                (Dim::Ep, true) => moe.ep,
                (Dim::Dp, true) => moe.edp,
                (Dim::Pp, _) => attention.pp,
            }
        };
        let groups: Vec<Vec<Vec<usize>>> = GroupKind::ALL
            .iter()
            .map(|kind| {
                let (moe_map, axes) = kind.spec();
                let sizes: Vec<usize> = dims.iter().map(|&d| size_of(d, moe_map)).collect();
                let mask: Vec<bool> = dims.iter().map(|d| axes.contains(d)).collect();
                masked_groups(&sizes, &mask)
            })
            .collect();
        let mesh = Self {
            world_size,
            order: order.to_ascii_lowercase(),
            attention,
            moe,
            groups,
        };
        if mesh.groups(GroupKind::Pp) != mesh.groups(GroupKind::ExpertPp) {
            return Err(ParallelError::InvalidLayout {
                field: "order",
                reason: "the attention and MoE mappings give different pipeline groups".into(),
            });
        }
        Ok(mesh)
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// The order string.
    pub fn order(&self) -> &str {
        &self.order
    }

    /// Attention/dense sizes.
    pub fn attention(&self) -> ParallelDims {
        self.attention
    }

    /// MoE sizes.
    pub fn moe(&self) -> MoeDims {
        self.moe
    }

    /// Every group of `kind`, each a list of ranks, in Megatron-Core's order.
    pub fn groups(&self, kind: GroupKind) -> &[Vec<usize>] {
        let index = GroupKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
        &self.groups[index]
    }

    /// The group of `kind` that contains `rank`.
    pub fn group_of(&self, kind: GroupKind, rank: usize) -> Result<&[usize]> {
        self.groups(kind)
            .iter()
            .find(|g| g.contains(&rank))
            .map(Vec::as_slice)
            .ok_or(ParallelError::RankOutOfRange {
                rank,
                world_size: self.world_size,
            })
    }

    /// The position of `rank` inside its group of `kind`.
    pub fn rank_in_group(&self, kind: GroupKind, rank: usize) -> Result<usize> {
        let group = self.group_of(kind, rank)?;
        Ok(group.iter().position(|r| *r == rank).unwrap_or(0))
    }
}
