//! Process groups as plain values, and the one process-wide registry the tensor operations use.
//!
//! A Burn backend operation cannot carry a reference to a communicator, so every communicator is
//! registered once and tensor operations name it by [`GroupId`], a `Copy` value that modules hold.
//!
//! Backend operations cannot return `Result` either. A collective that fails inside one (in the
//! forward or the backward pass) therefore marks its group as failed, with the operation and
//! the cause, and returns NaN of the output's shape, never plausible data. The failure is
//! sticky: every later collective on that group refuses to run, and every public call that
//! returns a `Result` and uses the group ([`crate::mappings`], the parallel layers,
//! [`crate::optim::DistributedAdamW::step`], burn-moe's `MoeLayer::forward`) returns it as
//! [`ParallelError::CollectiveFailed`]. [`check`] returns the first failure of any group, for
//! code that runs a backward pass and steps its own optimizer.

use std::sync::{Arc, Mutex, OnceLock, RwLock};

use crate::comm::{Communicator, Detached, SingleRank};
use crate::error::{ParallelError, Result};
use crate::mesh::{GroupKind, Mesh};

/// Handle of a registered communicator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GroupId(u32);

/// A registered communicator, its name and its first failure.
struct Registered {
    comm: Arc<dyn Communicator>,
    name: String,
    failure: Mutex<Option<ParallelError>>,
}

fn registry() -> &'static RwLock<Vec<Arc<Registered>>> {
    static GROUPS: OnceLock<RwLock<Vec<Arc<Registered>>>> = OnceLock::new();
    GROUPS.get_or_init(|| RwLock::new(Vec::new()))
}

/// The first failure in the process, for [`check`].
fn first_failure() -> &'static Mutex<Option<ParallelError>> {
    static FIRST: OnceLock<Mutex<Option<ParallelError>>> = OnceLock::new();
    FIRST.get_or_init(|| Mutex::new(None))
}

fn entry(id: GroupId) -> Result<Arc<Registered>> {
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

/// Marks `group` as failed in `op` with `cause`; the group's first failure and the process's
/// first failure are kept.
pub(crate) fn record_failure(group: GroupId, op: &'static str, cause: ParallelError) {
    let registered = entry(group);
    let err = ParallelError::CollectiveFailed {
        op,
        group: registered
            .as_ref()
            .map_or_else(|_| format!("{group:?}"), |e| e.name.clone()),
        cause: Box::new(cause),
    };
    if let Ok(e) = registered
        && let Ok(mut slot) = e.failure.lock()
        && slot.is_none()
    {
        *slot = Some(err.clone());
    }
    if let Ok(mut first) = first_failure().lock()
        && first.is_none()
    {
        *first = Some(err);
    }
}

/// The first failure of any collective in this process (sticky: it is returned again on every
/// call, since the ranks involved are out of step from then on).
///
/// Call it after `backward()` when stepping an optimizer other than
/// [`crate::optim::DistributedAdamW`] (which calls it itself): collectives in the backward pass
/// cannot return errors directly, and a failed one leaves NaN in the gradients.
pub fn check() -> Result<()> {
    match first_failure().lock() {
        Ok(slot) => slot.clone().map_or(Ok(()), Err),
        Err(_) => Err(ParallelError::Poisoned(
            "a thread panicked while recording a collective error".into(),
        )),
    }
}

/// The failure of `group`, if one of its collectives failed.
pub fn check_group(group: &Group) -> Result<()> {
    check_id(group.id)
}

pub(crate) fn check_id(id: GroupId) -> Result<()> {
    // Groups built without the registry (`Group::single` when registering fails) have no entry
    // and nothing to fail.
    let Ok(e) = entry(id) else {
        return Ok(());
    };
    match e.failure.lock() {
        Ok(slot) => slot.clone().map_or(Ok(()), Err),
        Err(_) => Err(ParallelError::Poisoned(format!(
            "a thread panicked while recording an error of the {} group",
            e.name
        ))),
    }
}

/// Looks a registered communicator up.
pub(crate) fn lookup(id: GroupId) -> Result<Arc<dyn Communicator>> {
    Ok(entry(id)?.comm.clone())
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
    /// Registers `comm` and returns its group (named by its world ranks in errors).
    pub fn new(comm: Arc<dyn Communicator>) -> Result<Self> {
        let name = format!("group of world ranks {:?}", comm.world_ranks());
        Self::named(comm, name)
    }

    /// Registers `comm` under `name` (how errors name the group, e.g. `tp group of world
    /// ranks [0, 1]`) and returns its group.
    pub fn named(comm: Arc<dyn Communicator>, name: impl Into<String>) -> Result<Self> {
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
        groups.push(Arc::new(Registered {
            comm,
            name: name.into(),
            failure: Mutex::new(None),
        }));
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
            let name = format!("{} group of world ranks {:?}", kind.name(), all[color]);
            groups.push((kind, Group::named(comm, name)?));
        }
        Ok(Self {
            mesh,
            rank,
            world: Group::named(world.clone(), "world")?,
            groups,
        })
    }

    /// The groups world rank `rank` of `mesh` would have, without communication: every group
    /// is a [`Detached`] view (right ranks and sizes; collectives return errors). For laying
    /// out another rank's share of a model, e.g. to read a checkpoint written under another
    /// layout.
    pub fn detached(mesh: Mesh, rank: usize) -> Result<Self> {
        let world_size = mesh.world_size();
        if rank >= world_size {
            return Err(ParallelError::RankOutOfRange { rank, world_size });
        }
        let mut groups = Vec::new();
        for kind in GroupKind::ALL {
            let members = mesh.group_of(kind, rank)?.to_vec();
            let at = mesh.rank_in_group(kind, rank)?;
            let name = format!("detached {} group of world ranks {members:?}", kind.name());
            groups.push((
                kind,
                Group::named(Arc::new(Detached::new(at, members)?), name)?,
            ));
        }
        let world = Detached::new(rank, (0..world_size).collect())?;
        Ok(Self {
            mesh,
            rank,
            world: Group::named(Arc::new(world), "detached world")?,
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
