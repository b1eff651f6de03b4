//! What every trainer of the crate does with its run folder and its scalars: refuse a folder
//! that already holds a run, start a fresh one (the recipe's copy and `metrics.jsonl`), the
//! single-rank AdamW of the video trainers, and reading a one-element tensor.

use std::fs::File;
use std::path::Path;

use burn::tensor::Tensor;
use burn_parallel::prelude::{AdamWConfig, DistributedAdamW, Group};
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

/// The lock of a run folder (`RUN_DIR/.lock` with the holder's pid), removed when dropped. A
/// lock whose process is gone (a killed run) is taken over.
#[derive(Debug)]
pub struct RunLock {
    path: std::path::PathBuf,
}

impl RunLock {
    /// Takes the lock of `run` (created when missing), or refuses naming the process that holds
    /// it.
    pub fn acquire(run: &Path) -> Result<Self> {
        use std::io::Write;
        std::fs::create_dir_all(run).map_err(|e| RecipeError::io(run, e))?;
        let path = run.join(".lock");
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    write!(f, "{}", std::process::id()).map_err(|e| RecipeError::io(&path, e))?;
                    return Ok(Self { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let holder = std::fs::read_to_string(&path).unwrap_or_default();
                    // A zombie (exited, not yet reaped) holds nothing.
                    let alive = holder
                        .trim()
                        .parse::<u32>()
                        .ok()
                        .and_then(burn_parallel::launch::LocalProcess::of)
                        .is_some_and(|p| p.is_running());
                    if alive {
                        return Err(RecipeError::Locked(format!(
                            "process {} is training into {} ({}); wait for it or stop it",
                            holder.trim(),
                            run.display(),
                            path.display()
                        )));
                    }
                    // Left by a process that is gone: take it over.
                    let _ = std::fs::remove_file(&path);
                }
                Err(e) => return Err(RecipeError::io(&path, e)),
            }
        }
        Err(RecipeError::Locked(format!(
            "{} could not be taken",
            path.display()
        )))
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Creates `run`, writes the recipe's copy `recipe.toml` and returns a new `metrics.jsonl`.
pub(crate) fn start(run: &Path, recipe: &impl Serialize) -> Result<File> {
    std::fs::create_dir_all(run).map_err(|e| RecipeError::io(run, e))?;
    let copy = run.join("recipe.toml");
    let text = toml::to_string_pretty(recipe).map_err(|e| RecipeError::io(&copy, e))?;
    std::fs::write(&copy, text).map_err(|e| RecipeError::io(&copy, e))?;
    let metrics = run.join("metrics.jsonl");
    File::create(&metrics).map_err(|e| RecipeError::io(&metrics, e))
}

/// AdamW without weight decay on one rank (no data or expert groups).
pub(crate) fn single_rank_adamw(lr: f64, max_grad_norm: Option<f64>) -> Result<DistributedAdamW> {
    let single = Group::single();
    Ok(DistributedAdamW::new(
        AdamWConfig {
            lr,
            weight_decay: 0.0,
            max_grad_norm,
            ..AdamWConfig::default()
        },
        single.clone(),
        single.clone(),
        single,
    )?)
}

/// The value of a one-element tensor (NaN when it cannot be read).
pub(crate) fn scalar(t: Tensor<1>) -> f64 {
    t.into_data()
        .convert::<f64>()
        .try_into_vec::<f64>()
        .ok()
        .and_then(|v| v.first().copied())
        .unwrap_or(f64::NAN)
}
