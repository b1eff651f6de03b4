//! Typed errors of the parallel crate.

use thiserror::Error;

/// Errors of mesh construction and collectives.
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
}

/// Result alias of this crate.
pub type Result<T, E = ParallelError> = core::result::Result<T, E>;
