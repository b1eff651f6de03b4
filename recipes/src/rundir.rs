//! What every trainer of the crate does with its run folder: refuse a folder that already
//! holds a run, take its lock, start a fresh one (the recipe's copy and `metrics.jsonl`).

use std::path::Path;

pub use burn_parallel::run_dir::{MetricsLog, RunLock};
use serde::Serialize;

use crate::checkpoint;
use crate::error::{RecipeError, Result};
use crate::recipe::bad;

/// An error if `run` holds a checkpoint; `advice` ends the message. A folder without one (a
/// run that stopped before its first checkpoint) is started afresh.
pub(crate) fn refuse_existing(run: &Path, advice: &str) -> Result<()> {
    if checkpoint::latest(run)?.is_some() {
        return Err(bad(
            "run.dir",
            format!("{} already holds a run; {advice}", run.display()),
        ));
    }
    Ok(())
}

/// Takes the lock of the run folder `run` ([`RunLock`]), naming `run.dir` when another
/// process holds it.
pub(crate) fn lock(run: &Path) -> Result<RunLock> {
    RunLock::acquire(run).map_err(|e| match e {
        burn_parallel::ParallelError::Locked(m) => RecipeError::Locked(m),
        other => other.into(),
    })
}

/// Creates `run`, writes the recipe's copy `recipe.toml` and returns a new `metrics.jsonl`.
pub(crate) fn start(run: &Path, recipe: &impl Serialize) -> Result<MetricsLog> {
    std::fs::create_dir_all(run).map_err(|e| RecipeError::io(run, e))?;
    let copy = run.join("recipe.toml");
    let text = toml::to_string_pretty(recipe).map_err(|e| RecipeError::io(&copy, e))?;
    std::fs::write(&copy, text).map_err(|e| RecipeError::io(&copy, e))?;
    Ok(MetricsLog::create(&run.join("metrics.jsonl"))?)
}
