//! SIGINT and SIGTERM during training: the first one asks the run to stop after the step in
//! progress (with a checkpoint; every rank of the world stops at the same step), a second
//! SIGINT aborts at once (exit 130).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::error::{RecipeError, Result};

/// The signals a run listens to, once installed.
#[derive(Debug, Clone)]
pub struct Interrupts {
    /// The last signal received (0: none).
    signal: Arc<AtomicUsize>,
}

impl Interrupts {
    /// Listens to SIGINT and SIGTERM (process-wide; call it once per process).
    pub fn install() -> Result<Self> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let signal = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(AtomicBool::new(false));
        let fail =
            |e: std::io::Error| RecipeError::Refused(format!("installing signal handlers: {e}"));
        // A second SIGINT while the first is being handled: abort now.
        signal_hook::flag::register_conditional_shutdown(SIGINT, 130, seen.clone())
            .map_err(fail)?;
        for sig in [SIGINT, SIGTERM] {
            signal_hook::flag::register_usize(sig, signal.clone(), sig as usize).map_err(fail)?;
            signal_hook::flag::register(sig, seen.clone()).map_err(fail)?;
        }
        Ok(Self { signal })
    }

    /// The signal received so far on this process, if any (`2`: SIGINT, `15`: SIGTERM).
    pub fn received(&self) -> Option<i32> {
        match self.signal.load(Ordering::SeqCst) {
            0 => None,
            s => Some(s as i32),
        }
    }
}

/// The name and exit status of a signal (128 + its number).
pub fn describe(signal: i32) -> (&'static str, u8) {
    match signal {
        2 => ("SIGINT", 130),
        15 => ("SIGTERM", 143),
        _ => ("a signal", 128u8.saturating_add(signal.clamp(0, 127) as u8)),
    }
}
