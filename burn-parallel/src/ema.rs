//! An exponential moving average of a model's weights, the copy diffusion models are sampled
//! from (DiT, Stable Diffusion, MUG-V): `ema ← d·ema + (1 − d)·θ` after every optimizer step,
//! with the usual warm-up `d = min(decay, (1 + n) / (10 + n))` after `n` updates so the early,
//! random weights fade out quickly. The average lives on the host (f32, module order).

use burn::module::Module;

use crate::checkpoint::{read_params, write_params};
use crate::error::{ParallelError, Result};

/// Averaged weights of one model.
#[derive(Debug, Clone)]
pub struct Ema {
    decay: f64,
    updates: u64,
    values: Vec<(Vec<usize>, Vec<f32>)>,
}

impl Ema {
    /// An average that starts at `module`'s weights. `decay` must lie in `[0, 1)`.
    pub fn new<M: Module>(decay: f64, module: &M) -> Result<Self> {
        if !(0.0..1.0).contains(&decay) {
            return Err(ParallelError::InvalidArgument {
                name: "decay",
                reason: format!("{decay} is not in [0, 1)"),
            });
        }
        Ok(Self {
            decay,
            updates: 0,
            values: read_params(module),
        })
    }

    /// The decay the next update uses.
    pub fn current_decay(&self) -> f64 {
        let n = self.updates as f64;
        self.decay.min((1.0 + n) / (10.0 + n))
    }

    /// Updates made so far.
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// Folds `module`'s current weights into the average.
    pub fn update<M: Module>(&mut self, module: &M) -> Result<()> {
        let d = self.current_decay() as f32;
        let now = read_params(module);
        if now.len() != self.values.len() {
            return Err(ParallelError::InvalidArgument {
                name: "module",
                reason: format!(
                    "an average of {} parameters updated with {}",
                    self.values.len(),
                    now.len()
                ),
            });
        }
        for ((shape, avg), (shape_now, v)) in self.values.iter_mut().zip(&now) {
            if shape != shape_now || avg.len() != v.len() {
                return Err(ParallelError::InvalidArgument {
                    name: "module",
                    reason: format!("a parameter of shape {shape:?} updated with {shape_now:?}"),
                });
            }
            avg.iter_mut()
                .zip(v)
                .for_each(|(a, x)| *a = d * *a + (1.0 - d) * x);
        }
        self.updates += 1;
        Ok(())
    }

    /// `module` with the averaged weights (devices and gradient tracking kept).
    pub fn apply<M: Module>(&self, module: M) -> Result<M> {
        write_params(module, self.values.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::{Linear, LinearConfig};
    use burn::tensor::Device;

    fn filled(model: Linear, v: f32) -> Linear {
        let values = read_params(&model)
            .into_iter()
            .map(|(shape, x)| (shape, vec![v; x.len()]))
            .collect();
        write_params(model, values).expect("same shapes")
    }

    #[test]
    fn the_average_follows_the_warmed_up_recurrence() {
        let device = Device::flex();
        let model = filled(LinearConfig::new(3, 2).init(&device), 0.0);
        let mut ema = Ema::new(0.9, &model).expect("decay");
        // Weights 1, 2, 3, … after each step; the recurrence by hand with
        // d_n = min(0.9, (1 + n) / (10 + n)).
        let mut want = 0.0f64;
        let mut model = model;
        for n in 0..30u64 {
            let v = (n + 1) as f32;
            model = filled(model, v);
            let d = 0.9f64.min((1.0 + n as f64) / (10.0 + n as f64));
            assert!((ema.current_decay() - d).abs() < 1e-12);
            ema.update(&model).expect("update");
            want = d * want + (1.0 - d) * f64::from(v);
        }
        assert_eq!(ema.updates(), 30);
        let averaged = ema.apply(model).expect("apply");
        for (_, values) in read_params(&averaged) {
            assert!(
                values.iter().all(|x| (f64::from(*x) - want).abs() < 1e-4),
                "{values:?} vs {want}"
            );
        }
    }

    #[test]
    fn bad_decays_and_other_models_are_refused() {
        let device = Device::flex();
        let model = LinearConfig::new(3, 2).init(&device);
        assert!(Ema::new(1.0, &model).is_err());
        assert!(Ema::new(-0.1, &model).is_err());
        let mut ema = Ema::new(0.5, &model).expect("decay");
        let other = LinearConfig::new(4, 2).init(&device);
        assert!(ema.update(&other).is_err());
        assert!(ema.apply(other).is_err());
    }
}
