//! The recipes' checkpoints: burn-parallel's sharded, checksummed checkpoints
//! ([`burn_parallel::checkpoint`]) with the trainers' `meta.json` ([`Meta`]: the step, the
//! world size and the data position a resumed run continues from).

use std::path::{Path, PathBuf};

pub use burn_parallel::checkpoint::TrainingMeta as Meta;
pub use burn_parallel::checkpoint::{load, named_params, save};

use crate::error::Result;

/// The newest complete checkpoint of a run, if any, its files checked against their
/// checksums.
pub fn latest(run_dir: &Path) -> Result<Option<(PathBuf, Meta)>> {
    Ok(burn_parallel::checkpoint::latest(run_dir)?)
}
