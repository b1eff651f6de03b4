//! The recipes' checkpoints: burn-parallel's sharded, checksummed checkpoints
//! ([`burn_parallel::checkpoint`]) with the recipes' `meta.json` ([`Meta`]: the step, the world
//! size and the data position a resumed run continues from).

use std::path::{Path, PathBuf};

use burn_parallel::checkpoint::CheckpointMeta;
pub use burn_parallel::checkpoint::{load, named_params, save};
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// `meta.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    /// Optimizer steps completed.
    pub step: usize,
    /// Ranks that wrote the checkpoint.
    pub world: usize,
    /// Index of the next sequence of the data stream (data position).
    pub next_sequence: u64,
    /// The recipe's seed (the data and initialisation generator state is (seed, position)).
    pub seed: u64,
}

impl CheckpointMeta for Meta {
    fn step(&self) -> usize {
        self.step
    }
}

/// The newest complete checkpoint of a run, if any, its files checked against their
/// checksums.
pub fn latest(run_dir: &Path) -> Result<Option<(PathBuf, Meta)>> {
    Ok(burn_parallel::checkpoint::latest(run_dir)?)
}
