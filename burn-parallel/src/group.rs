//! Process groups as plain values, and the one process-wide registry the tensor operations use.
//!
//! A Burn backend operation cannot carry a reference to a communicator, so every communicator is
//! registered once and tensor operations name it by [`GroupId`], a `Copy` value that modules hold.
//! Errors raised inside backend operations (which cannot return `Result`) are parked here and
//! returned by the next call of the public API, or by [`check`] after a backward pass.

use std::sync::{Arc, Mutex, OnceLock, RwLock};

use crate::comm::{Communicator, SingleRank};
use crate::error::{ParallelError, Result};
use crate::mesh::{GroupKind, Mesh};

/// Handle of a registered communicator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GroupId(u32);

fn registry() -> &'static RwLock<Vec<Arc<dyn Communicator>>> {
    static GROUPS: OnceLock<RwLock<Vec<Arc<dyn Communicator>>>> = OnceLock::new();
    GROUPS.get_or_init(|| RwLock::new(Vec::new()))
}

fn pending() -> &'static Mutex<Option<ParallelError>> {
    static PENDING: OnceLock<Mutex<Option<ParallelError>>> = OnceLock::new();
    PENDING.get_or_init(|| Mutex::new(None))
}

/// Records an error raised inside a backend operation; the first one is kept.
pub(crate) fn record_error(err: ParallelError) {
    if let Ok(mut slot) = pending().lock()
        && slot.is_none()
    {
        *slot = Some(err);
    }
}

/// Returns (and clears) the first error raised inside a collective since the last call.
///
/// Call it after `backward()`: collectives that run in the backward pass cannot return errors
/// directly. The forward functions of this crate call it themselves.
pub fn check() -> Result<()> {
    match pending().lock() {
        Ok(mut slot) => slot.take().map_or(Ok(()), Err),
        Err(_) => Err(ParallelError::Poisoned(
            "a thread panicked while recording a collective error".into(),
        )),
    }
}

/// Looks a registered communicator up.
pub(crate) fn lookup(id: GroupId) -> Result<Arc<dyn Communicator>> {
    let groups = registry()
        .read()
        .map_err(|_| ParallelError::Poisoned("group registry lock".into()))?;
    groups
        .get(id.0 as usize)
        .cloned()
        .ok_or(ParallelError::InvalidArgument {
            name: "group",
            reason: format!("{id:?} was not registered"),
        })
}

/// A process group: a registered communicator plus its rank and size.
#[derive(Debug, Clone)]
pub struct Group {
    id: GroupId,
    rank: usize,
    size: usize,
    world_ranks: Arc<[usize]>,
}

impl Group {
    /// Registers `comm` and returns its group.
    pub fn new(comm: Arc<dyn Communicator>) -> Result<Self> {
        let mut groups = registry()
            .write()
            .map_err(|_| ParallelError::Poisoned("group registry lock".into()))?;
        let id =
            GroupId(
                u32::try_from(groups.len()).map_err(|_| ParallelError::InvalidArgument {
                    name: "group",
                    reason: "more than 2^32 groups registered".into(),
                })?,
            );
        let group = Self {
            id,
            rank: comm.rank(),
            size: comm.size(),
            world_ranks: comm.world_ranks().into(),
        };
        groups.push(comm);
        Ok(group)
    }

    /// A group of one rank (world rank 0).
    pub fn single() -> Self {
        // Registering cannot fail unless the registry lock is poisoned or 2^32 groups exist.
        Self::new(Arc::new(SingleRank::new())).unwrap_or_else(|_| Self {
            id: GroupId(u32::MAX),
            rank: 0,
            size: 1,
            world_ranks: Arc::from([0usize]),
        })
    }

    /// Handle used by tensor operations.
    pub fn id(&self) -> GroupId {
        self.id
    }

    /// This process's rank in the group.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.size
    }

    /// World ranks of the members, by group rank.
    pub fn world_ranks(&self) -> &[usize] {
        &self.world_ranks
    }

    /// The communicator, for host-side collectives.
    pub fn communicator(&self) -> Result<Arc<dyn Communicator>> {
        lookup(self.id)
    }
}

/// Every group of a [`Mesh`] this process belongs to, built once (collectively) from the world.
#[derive(Debug, Clone)]
pub struct ProcessGroups {
    mesh: Mesh,
    rank: usize,
    world: Group,
    groups: Vec<(GroupKind, Group)>,
}

impl ProcessGroups {
    /// Splits `world` into every group kind of `mesh`. Collective: all world ranks must call it.
    pub fn new(mesh: Mesh, world: Arc<dyn Communicator>) -> Result<Self> {
        if world.size() != mesh.world_size() {
            return Err(ParallelError::InvalidLayout {
                field: "world_size",
                reason: format!(
                    "the mesh has {} ranks but the communicator has {}",
                    mesh.world_size(),
                    world.size()
                ),
            });
        }
        let rank = world.rank();
        let mut groups = Vec::new();
        for kind in GroupKind::ALL {
            let all = mesh.groups(kind);
            let color = all.iter().position(|g| g.contains(&rank)).ok_or(
                ParallelError::RankOutOfRange {
                    rank,
                    world_size: mesh.world_size(),
                },
            )?;
            let key = all[color].iter().position(|&r| r == rank).unwrap_or(0);
            let comm = world
                .split(Some(color as u32), key as u32)?
                .ok_or_else(|| ParallelError::Engine {
                    engine: world.engine(),
                    op: "split",
                    reason: "a member was left out of its group".into(),
                })?;
            if comm.world_ranks() != all[color].as_slice() {
                return Err(ParallelError::Engine {
                    engine: world.engine(),
                    op: "split",
                    reason: format!(
                        "{} group has ranks {:?}, the mesh says {:?}",
                        kind.name(),
                        comm.world_ranks(),
                        all[color]
                    ),
                });
            }
            groups.push((kind, Group::new(comm)?));
        }
        Ok(Self {
            mesh,
            rank,
            world: Group::new(world)?,
            groups,
        })
    }

    /// The groups of a single-rank run.
    pub fn single() -> Result<Self> {
        let mesh = Mesh::new(
            1,
            crate::mesh::ParallelDims::new(1, 1, 1, 1),
            crate::mesh::MoeDims::new(1, 1, 1),
        )?;
        Self::new(mesh, Arc::new(SingleRank::new()))
    }

    /// The mesh.
    pub fn mesh(&self) -> &Mesh {
        &self.mesh
    }

    /// This process's world rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The world group.
    pub fn world(&self) -> &Group {
        &self.world
    }

    /// This process's group of `kind`.
    pub fn group(&self, kind: GroupKind) -> &Group {
        self.groups
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, g)| g)
            // Every kind of GroupKind::ALL is built in `new`.
            .unwrap_or(&self.world)
    }
}
