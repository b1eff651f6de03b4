//! Errors of the recipes: one line, naming the key or the file.

use std::path::PathBuf;

use thiserror::Error;

/// What can go wrong in a recipe run.
#[derive(Debug, Error)]
pub enum RecipeError {
    /// The recipe file is not valid TOML.
    #[error("recipe is not valid TOML: {0}")]
    Syntax(String),
    /// A key is unknown, missing, of the wrong type or out of range.
    #[error("`{key}`: {reason}")]
    Invalid {
        /// `section.key`.
        key: String,
        /// Why.
        reason: String,
    },
    /// A file could not be read or written.
    #[error("{}: {reason}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The system's message.
        reason: String,
    },
    /// The recipe cannot run on this machine (memory, backend).
    #[error("{0}")]
    Refused(String),
    /// A training step failed (the run stops before its optimizer step; the newest checkpoint
    /// is intact).
    #[error("step {step}: {source}")]
    AtStep {
        /// The step (1-based).
        step: usize,
        /// What went wrong.
        source: Box<RecipeError>,
    },
    /// The run was asked to stop by a signal and stopped after `step` with a checkpoint.
    #[error(
        "{signal_name} received: stopped after step {step} with a checkpoint; continue with \
         `burn-recipes train RECIPE --resume` (the same recipe and --set options)"
    )]
    Interrupted {
        /// The signal's number.
        signal: i32,
        /// `SIGINT`, `SIGTERM`, …
        signal_name: &'static str,
        /// The last step done (and checkpointed).
        step: usize,
    },
    /// Another process holds the run folder.
    #[error("`run.dir`: {0}")]
    Locked(String),
    /// The MoE layer, model or trainer failed.
    #[error(transparent)]
    Moe(burn_moe::MoeError),
    /// A collective or parallel layer failed.
    #[error(transparent)]
    Parallel(#[from] burn_parallel::ParallelError),
    /// The video pipeline failed (reading a clip, the VAE, the latent cache).
    #[error(transparent)]
    Video(#[from] burn_video::VideoError),
}

impl RecipeError {
    /// An invalid value of `key` (a recipe key such as `training.lr`, or a command-line
    /// argument such as `--frames`), with why.
    pub fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            key: key.into(),
            reason: reason.into(),
        }
    }

    /// A file that could not be read or written, with the system's message.
    pub fn io(path: &std::path::Path, e: impl std::fmt::Display) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
    }
}

impl From<burn_moe::MoeError> for RecipeError {
    /// burn-moe's errors, with those of burn-parallel it passes on (a checkpoint's file, a
    /// collective) as burn-parallel's own.
    fn from(e: burn_moe::MoeError) -> Self {
        match e {
            burn_moe::MoeError::Communication(p) => Self::Parallel(p),
            other => Self::Moe(other),
        }
    }
}

/// An invalid value of recipe key `key` (`section.field`), with why.
pub(crate) fn bad(key: &str, reason: impl Into<String>) -> RecipeError {
    RecipeError::Invalid {
        key: key.to_string(),
        reason: reason.into(),
    }
}

/// Result alias.
pub type Result<T, E = RecipeError> = core::result::Result<T, E>;
