//! Helpers of the workspace integration tests.

use burn::tensor::{Device, Tensor, TensorData};

/// Deterministic pseudo-random values in `[-scale, scale)` (a 64-bit LCG), so tests do not
/// depend on a backend's random generator.
pub fn lcg_values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// A tensor of [`lcg_values`].
pub fn lcg_tensor<const D: usize>(
    shape: [usize; D],
    seed: u64,
    scale: f32,
    device: &Device,
) -> Tensor<D> {
    let n = shape.iter().product();
    Tensor::from_data(TensorData::new(lcg_values(n, seed, scale), shape), device)
}
