//! Errors of the video pipeline.

use std::path::PathBuf;

use thiserror::Error;

use crate::metrics::MetricError;

/// What can go wrong reading, scoring or writing clips.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum VideoError {
    /// A file or folder could not be read or written.
    #[error("{path}: {reason}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A file is not a readable image or animation, or a folder holds no frames.
    #[error("{path}: {reason}")]
    Decode {
        /// The path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// An argument is out of range.
    #[error("invalid argument `{name}`: {reason}")]
    InvalidArgument {
        /// The argument.
        name: &'static str,
        /// Why.
        reason: String,
    },
    /// A frame is malformed.
    #[error(transparent)]
    Frame(#[from] MetricError),
    /// A training loss is not finite: the trainer stops.
    #[error("{what} became {value}; {advice}")]
    NonFiniteLoss {
        /// Which loss, and where (step, stage).
        what: String,
        /// Its value.
        value: f64,
        /// What to change.
        advice: &'static str,
    },
    /// The optimizer of a trainer failed.
    #[error(transparent)]
    Parallel(#[from] burn_parallel::ParallelError),
}

/// `Result` with [`VideoError`].
pub type Result<T> = std::result::Result<T, VideoError>;

pub(crate) fn io(path: impl Into<PathBuf>, e: impl std::fmt::Display) -> VideoError {
    VideoError::Io {
        path: path.into(),
        reason: e.to_string(),
    }
}

pub(crate) fn invalid(name: &'static str, reason: impl Into<String>) -> VideoError {
    VideoError::InvalidArgument {
        name,
        reason: reason.into(),
    }
}
