//! Rectified flow (Liu et al. 2022; the SD3 / MUG-V recipe): `x_t = (1 − t)·x0 + t·ε`, the
//! network predicts the velocity `v = ε − x0` under an MSE loss; timesteps are drawn
//! logit-normal and shifted toward noise for larger inputs,
//! `t' = r·t / (1 + (r − 1)·t)` with `r = sqrt(H·W / base²)·sqrt(frames)`; sampling integrates
//! from `t = 1` (noise) to `t = 0` with Euler steps, optionally with classifier-free guidance.

use burn::tensor::Tensor;

use crate::error::{Result, invalid};

/// `x_t = (1 − t)·x0 + t·ε` for per-sample times `t` `[B]`.
pub fn interpolate(x0: Tensor<5>, eps: Tensor<5>, t: Tensor<1>) -> Tensor<5> {
    let [b] = t.dims();
    let t = t.reshape([b, 1, 1, 1, 1]);
    x0 * (t.clone().neg() + 1.0) + eps * t
}

/// The velocity target `ε − x0`.
pub fn velocity(x0: Tensor<5>, eps: Tensor<5>) -> Tensor<5> {
    eps - x0
}

/// Mean squared error between predicted and target velocities.
pub fn loss(predicted: Tensor<5>, x0: Tensor<5>, eps: Tensor<5>) -> Tensor<1> {
    (predicted - velocity(x0, eps)).powi_scalar(2).mean()
}

/// The time shift `t' = r·t / (1 + (r − 1)·t)` (`r > 1` moves time toward noise).
pub fn shift(t: f64, r: f64) -> f64 {
    r * t / (1.0 + (r - 1.0) * t)
}

/// `r = sqrt(H·W / base²)·sqrt(frames)` for latents of `frames × height × width`.
pub fn resolution_shift(height: usize, width: usize, frames: usize, base: usize) -> f64 {
    ((height * width) as f64 / (base * base) as f64).sqrt() * (frames as f64).sqrt()
}

/// The seeded stream of draws for timesteps, batches and noise (burn-parallel's generator).
pub use burn_parallel::rng::Rng;

/// `n` timesteps `shift(sigmoid(m + s·z), r)` with `z ~ N(0, 1)`.
pub fn logit_normal(n: usize, m: f64, s: f64, r: f64, rng: &mut Rng) -> Vec<f64> {
    (0..n)
        .map(|_| {
            let t = 1.0 / (1.0 + (-(m + s * rng.normal())).exp());
            shift(t, r)
        })
        .collect()
}

/// Classifier-free guidance: `v_u + w·(v_c − v_u)`.
pub fn guided(conditional: Tensor<5>, unconditional: Tensor<5>, scale: f64) -> Tensor<5> {
    unconditional.clone() + (conditional - unconditional) * scale
}

/// Integrates `dx/dt = v(x, t)` from `t = 1` (the noise `x1`) to `t = 0` in `steps` Euler
/// steps on the shifted grid `t_i = shift(1 − i / steps, r)`.
pub fn euler(
    x1: Tensor<5>,
    steps: usize,
    r: f64,
    mut v: impl FnMut(Tensor<5>, f64) -> Result<Tensor<5>>,
) -> Result<Tensor<5>> {
    if steps == 0 {
        return Err(invalid("steps", "must be at least 1"));
    }
    let mut x = x1;
    for i in 0..steps {
        let t = shift(1.0 - i as f64 / steps as f64, r);
        let next = shift(1.0 - (i + 1) as f64 / steps as f64, r);
        x = x.clone() + v(x, t)? * (next - t);
    }
    Ok(x)
}

/// Per-sample mean squared error `[B]` between predicted and target velocities.
pub fn per_sample_error(predicted: Tensor<5>, target: Tensor<5>) -> Tensor<1> {
    let [b, c, t, h, w] = predicted.dims();
    (predicted - target)
        .powi_scalar(2)
        .reshape([b, c * t * h * w])
        .mean_dim(1)
        .reshape([b])
}

/// The Diffusion-DPO loss (Wallace et al. 2023) in its flow-matching form: with per-sample
/// velocity errors of the policy and of a frozen reference on the preferred (`w`) and rejected
/// (`l`) samples of each pair, all at the same time and noise,
/// `−log σ(−β · ((e_w − e_w^ref) − (e_l − e_l^ref)))`, averaged over pairs. It is `log 2`
/// where the policy equals the reference and falls as the policy fits the preferred samples
/// better than the reference does, relative to the rejected ones.
pub fn dpo_loss(
    policy_w: Tensor<1>,
    policy_l: Tensor<1>,
    reference_w: Tensor<1>,
    reference_l: Tensor<1>,
    beta: f64,
) -> Tensor<1> {
    let margin = ((policy_w - reference_w) - (policy_l - reference_l)) * (-beta);
    // −log σ(m) = softplus(−m) = log(1 + exp(−m)), written stably.
    let neg = margin.neg();
    let softplus = neg.clone().clamp_min(0.0) + (neg.abs().neg().exp() + 1.0).log();
    softplus.mean()
}
