//! Helpers of the workspace integration tests.

use burn::tensor::{Device, Tensor, TensorData};

/// Deterministic pseudo-random values in `[-scale, scale)` (burn-parallel's seeded
/// generator), so tests do not depend on a backend's random generator.
pub fn seeded_values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    burn_parallel::rng::uniform_values(n, seed, scale)
}

/// A tensor of [`seeded_values`].
pub fn seeded_tensor<const D: usize>(
    shape: [usize; D],
    seed: u64,
    scale: f32,
    device: &Device,
) -> Tensor<D> {
    let n = shape.iter().product();
    Tensor::from_data(
        TensorData::new(seeded_values(n, seed, scale), shape),
        device,
    )
}
