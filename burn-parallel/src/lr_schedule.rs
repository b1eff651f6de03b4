//! The learning-rate schedule of every trainer: linear warm-up, then cosine decay (Megatron's
//! `OptimizerParamScheduler` with `lr_decay_style = "cosine"`, torchtitan's warm-up + cosine).
//!
//! ```
//! use burn_parallel::lr_schedule::LrSchedule;
//!
//! let s = LrSchedule { lr: 1e-3, min_lr: 1e-4, warmup_steps: 2, steps: 10 };
//! assert_eq!(s.at(0), 0.5e-3); // warm-up: lr · (step + 1) / warmup_steps
//! assert_eq!(s.at(1), 1e-3);
//! assert!((s.at(2) - 1e-3).abs() < 1e-15); // the cosine starts at lr …
//! assert!((s.at(6) - 0.55e-3).abs() < 1e-12); // … is half-way after half its span …
//! assert_eq!(s.at(10), 1e-4); // … and ends at min_lr at `steps`
//! ```

use crate::error::{ParallelError, Result};

/// Linear warm-up over `warmup_steps` to `lr`, then cosine decay to `min_lr` at step `steps`
/// (constant at `lr` when `min_lr == lr`). Steps count from 0.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    /// Peak learning rate, reached at the last warm-up step.
    pub lr: f64,
    /// Learning rate at the end of the decay.
    pub min_lr: f64,
    /// Warm-up steps (0: none).
    pub warmup_steps: usize,
    /// The step at which the decay reaches `min_lr` (the run's length).
    pub steps: usize,
}

impl LrSchedule {
    /// A constant `lr` after `warmup_steps` of warm-up.
    pub fn constant(lr: f64, warmup_steps: usize, steps: usize) -> Self {
        Self {
            lr,
            min_lr: lr,
            warmup_steps,
            steps,
        }
    }

    /// Refuses a schedule no optimizer should follow: `lr` not positive and finite, `min_lr`
    /// outside `[0, lr]`, a warm-up longer than the run.
    pub fn validate(&self) -> Result<()> {
        let invalid = |name: &'static str, reason: String| {
            Err(ParallelError::InvalidArgument { name, reason })
        };
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return invalid("lr", format!("{} is not a positive number", self.lr));
        }
        if !(self.min_lr.is_finite() && self.min_lr >= 0.0 && self.min_lr <= self.lr) {
            return invalid("min_lr", format!("{} is not in [0, lr]", self.min_lr));
        }
        if self.warmup_steps > self.steps {
            return invalid(
                "warmup_steps",
                format!("{} exceeds the {} steps", self.warmup_steps, self.steps),
            );
        }
        Ok(())
    }

    /// The learning rate of step `step` (0-based).
    pub fn at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = (self.steps - self.warmup_steps.min(self.steps)).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
        self.min_lr
            + 0.5 * (self.lr - self.min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warm_up_then_cosine_by_hand() {
        let s = LrSchedule {
            lr: 2.0,
            min_lr: 0.5,
            warmup_steps: 4,
            steps: 12,
        };
        for (step, want) in [(0, 0.5), (1, 1.0), (2, 1.5), (3, 2.0)] {
            assert_eq!(s.at(step), want, "warm-up step {step}");
        }
        // Cosine over the 8 steps after the warm-up: 0.5 + 0.75 (1 + cos(π k / 8)).
        for k in 0..=8 {
            let want = 0.5 + 0.75 * (1.0 + (std::f64::consts::PI * k as f64 / 8.0).cos());
            assert!((s.at(4 + k) - want).abs() < 1e-12, "step {}", 4 + k);
        }
        assert_eq!(s.at(100), 0.5);
        let c = LrSchedule::constant(1e-3, 0, 5);
        assert!((0..8).all(|i| c.at(i) == 1e-3));
    }

    #[test]
    fn bad_schedules_name_the_field() {
        let ok = LrSchedule::constant(1e-3, 2, 10);
        assert!(ok.validate().is_ok());
        for (bad, name) in [
            (LrSchedule { lr: 0.0, ..ok }, "lr"),
            (LrSchedule { lr: f64::NAN, ..ok }, "lr"),
            (LrSchedule { min_lr: 2e-3, ..ok }, "min_lr"),
            (LrSchedule { min_lr: -1.0, ..ok }, "min_lr"),
            (
                LrSchedule {
                    warmup_steps: 11,
                    ..ok
                },
                "warmup_steps",
            ),
        ] {
            match bad.validate() {
                Err(ParallelError::InvalidArgument { name: got, .. }) => assert_eq!(got, name),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }
}
