//! The VAE's training loss: L1 or log-MSE reconstruction, the image-gradient term and the KL
//! term.

use super::*;

/// The loss terms of one batch.
#[derive(Debug, Clone)]
pub struct VaeLoss {
    /// Weighted total.
    pub total: Tensor<1>,
    /// Mean absolute error.
    pub l1: Tensor<1>,
    /// Mean squared error with pixels in `[0, 1]`.
    pub mse: Tensor<1>,
    /// Mean absolute error of the spatial finite differences.
    pub gradient: Tensor<1>,
    /// KL to the standard normal.
    pub kl: Tensor<1>,
    /// The reconstruction.
    pub reconstruction: Tensor<5>,
}

/// The MSE of every frame `[B, 1, T, 1, 1]` between clips in `[-1, 1]`, with pixels taken to
/// `[0, 1]` (the difference halved).
pub(super) fn frame_mse(diff: Tensor<5>) -> Tensor<5> {
    (diff * 0.5)
        .powi_scalar(2)
        .mean_dim(1)
        .mean_dim(3)
        .mean_dim(4)
}

/// The [`Reconstruction::LogMse`] term: the mean over frames of ln(MSE + floor).
pub(super) fn log_mse(frame_mse: Tensor<5>) -> Tensor<1> {
    frame_mse.add_scalar(LOG_MSE_FLOOR).log().mean()
}

pub(super) fn gradient_l1(a: Tensor<5>, b: Tensor<5>) -> Tensor<1> {
    let [_, _, _, h, w] = a.dims();
    let dx = |t: Tensor<5>| t.clone().narrow(4, 1, w - 1) - t.narrow(4, 0, w - 1);
    let dy = |t: Tensor<5>| t.clone().narrow(3, 1, h - 1) - t.narrow(3, 0, h - 1);
    (dx(a.clone()) - dx(b.clone())).abs().mean() + (dy(a) - dy(b)).abs().mean()
}

impl Vae {
    /// Encodes, samples (or takes the mean when `sample` is false), decodes and scores `x`.
    pub fn loss(&self, x: Tensor<5>, config: &VaeConfig, sample: bool) -> VaeLoss {
        let posterior = self.encode(x.clone());
        let z = if sample {
            posterior.sample()
        } else {
            posterior.mean.clone()
        };
        let rec = self.decode(z);
        let diff = rec.clone() - x.clone();
        let l1 = diff.clone().abs().mean();
        let frame_mse = frame_mse(diff);
        let mse = frame_mse.clone().mean();
        let reconstruction = match config.reconstruction {
            Reconstruction::L1 => l1.clone(),
            Reconstruction::LogMse => log_mse(frame_mse),
        };
        let gradient = gradient_l1(rec.clone(), x);
        let kl = posterior.kl();
        let total = reconstruction
            + gradient.clone() * config.gradient_weight
            + kl.clone() * config.kl_weight;
        VaeLoss {
            total,
            l1,
            mse,
            gradient,
            kl,
            reconstruction: rec,
        }
    }
}
