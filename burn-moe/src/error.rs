//! Typed errors of the MoE crate.

use thiserror::Error;

/// Everything that can go wrong when building or running an MoE component.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum MoeError {
    /// A configuration value is out of range or inconsistent with another one.
    #[error("invalid configuration `{field}`: {reason}")]
    InvalidConfig {
        /// The offending field, as named in the config struct.
        field: &'static str,
        /// Why the value is rejected.
        reason: String,
    },
    /// A tensor does not have the shape the component expects.
    #[error("shape mismatch for `{name}`: expected {expected}, got {got:?}")]
    ShapeMismatch {
        /// The argument or weight whose shape is wrong.
        name: &'static str,
        /// The expected shape, in words.
        expected: String,
        /// The actual shape.
        got: Vec<usize>,
    },
    /// An argument given at run time is invalid.
    #[error("invalid argument `{name}`: {reason}")]
    InvalidArgument {
        /// The argument.
        name: &'static str,
        /// Why it is rejected.
        reason: String,
    },
    /// The router logits contain NaN or infinite values.
    #[error("router logits contain {count} non-finite value(s) (NaN or infinite)")]
    NonFiniteLogits {
        /// How many entries are not finite.
        count: usize,
    },
    /// The backend failed while reading a tensor back to the host.
    #[error("backend error while {context}: {message}")]
    Backend {
        /// What was being done.
        context: &'static str,
        /// The backend's message.
        message: String,
    },
    /// The requested backend cannot run here.
    #[error("backend unavailable: {0}")]
    BackendUnavailable(String),
    /// A training step's losses are not finite; the trainer stops before the optimizer step,
    /// so the newest checkpoint is the last good state.
    #[error(
        "the loss is {loss} (aux {aux}, z {z}); the run stops before the optimizer step and its \
         last checkpoint is intact (lower the learning rate, or check the data)"
    )]
    NonFiniteLoss {
        /// Cross-entropy of the step.
        loss: f64,
        /// Load-balancing loss of the step.
        aux: f64,
        /// z-loss of the step.
        z: f64,
    },
    /// A training step failed (before its optimizer step).
    #[error("step {step}: {source}")]
    AtStep {
        /// The step (1-based).
        step: usize,
        /// What went wrong.
        source: Box<MoeError>,
    },
    /// A collective operation (cross-rank reduction or exchange) failed.
    #[error("communication error: {0}")]
    Communication(#[from] burn_parallel::ParallelError),
}

/// Result alias of this crate.
pub type Result<T, E = MoeError> = core::result::Result<T, E>;

pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> MoeError {
    MoeError::InvalidConfig {
        field,
        reason: reason.into(),
    }
}
