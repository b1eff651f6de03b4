//! Typed errors of the parallel crate.

use std::time::Duration;

use thiserror::Error;

/// Errors of mesh construction, communicators, collectives and the distributed optimizer.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ParallelError {
    /// A parallel size or the order string is invalid.
    #[error("invalid parallel layout `{field}`: {reason}")]
    InvalidLayout {
        /// The offending field (`tp`, `ep`, `order`, …).
        field: &'static str,
        /// Why it is rejected.
        reason: String,
    },
    /// A rank outside the world was asked for.
    #[error("rank {rank} is outside the world of {world_size} ranks")]
    RankOutOfRange {
        /// The rank.
        rank: usize,
        /// The world size.
        world_size: usize,
    },
    /// An argument of a collective or layer is invalid (wrong length, shape not divisible, …).
    #[error("invalid argument `{name}`: {reason}")]
    InvalidArgument {
        /// The argument.
        name: &'static str,
        /// Why it is rejected.
        reason: String,
    },
    /// A collective did not complete within the communicator's timeout and every peer still
    /// looked alive (a peer is slow or stuck in a different collective).
    #[error(
        "{op} on group {group:?} (world ranks) timed out after {after:?}; no peer was found dead \
         (a peer may be stuck in a different collective)"
    )]
    Timeout {
        /// The collective.
        op: &'static str,
        /// World ranks of the group.
        group: Vec<usize>,
        /// The timeout that expired.
        after: Duration,
    },
    /// A collective did not complete because peers died.
    #[error("{op} on group {group:?} (world ranks) failed: lost peer rank(s) {lost:?} ({detail})")]
    PeerLost {
        /// The collective.
        op: &'static str,
        /// World ranks of the group.
        group: Vec<usize>,
        /// World ranks found dead.
        lost: Vec<usize>,
        /// How they were found dead.
        detail: String,
    },
    /// The communicator failed earlier (a timeout or a lost peer) and cannot be used again.
    #[error("communicator is unusable after an earlier failure: {0}")]
    Poisoned(String),
    /// A collective inside a tensor operation (forward or backward) failed. Its output was NaN,
    /// and the group refuses every later collective.
    #[error("{op} on the {group} failed: {cause}")]
    CollectiveFailed {
        /// The collective (`all_reduce`, `all_to_all_v`, …).
        op: &'static str,
        /// The group, by kind and world ranks.
        group: String,
        /// What went wrong.
        cause: Box<ParallelError>,
    },
    /// The engine reported an error.
    #[error("{engine} error in {op}: {reason}")]
    Engine {
        /// `mpi`, `nccl`, …
        engine: &'static str,
        /// The operation.
        op: &'static str,
        /// The engine's message.
        reason: String,
    },
    /// The engine cannot be used in this build or on this machine.
    #[error("{engine} is unavailable: {reason}")]
    Unavailable {
        /// `mpi`, `nccl`, …
        engine: &'static str,
        /// Why (feature not compiled in, no GPU, library missing, …).
        reason: String,
    },
    /// A multi-rank check program failed or did not report success.
    #[error("check program {program} on {np} ranks failed: {reason}")]
    CheckFailed {
        /// The program.
        program: String,
        /// Ranks it ran on.
        np: usize,
        /// Its output, or what was missing from it.
        reason: String,
    },
    /// A file of a run (checkpoint, metrics) could not be read or written, or is damaged.
    #[error("{}: {reason}", path.display())]
    Io {
        /// The file or folder.
        path: std::path::PathBuf,
        /// The system's message, or what is wrong with the content.
        reason: String,
    },
    /// What was asked for would not fit in this machine's available memory; refused before
    /// allocating.
    #[error(
        "{what} needs about {:.1} GiB and this machine has {:.1} GiB available",
        gib(*.need),
        gib(*.have)
    )]
    OutOfMemory {
        /// What was asked for, with its parts.
        what: String,
        /// Bytes it needs.
        need: u64,
        /// Bytes available.
        have: u64,
    },
    /// Another process holds a run folder.
    #[error("{0}")]
    Locked(String),
    /// A tensor could not be read from or written to its device.
    #[error("backend error in {context}: {reason}")]
    Backend {
        /// Where.
        context: &'static str,
        /// The backend's message.
        reason: String,
    },
}

impl ParallelError {
    /// A file that could not be read or written (or whose content is refused), with why.
    pub fn io(path: &std::path::Path, reason: impl std::fmt::Display) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        }
    }
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// Result alias of this crate.
pub type Result<T, E = ParallelError> = core::result::Result<T, E>;
