//! Reconstruction metrics on frames with values in `[0, max]`: PSNR and SSIM.

use thiserror::Error;

/// Errors of the metrics.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum MetricError {
    /// The pixel buffer does not match the frame size.
    #[error("frame of {width}x{height}x{channels} needs {expected} values, got {got}")]
    BadBuffer {
        /// Width.
        width: usize,
        /// Height.
        height: usize,
        /// Channels.
        channels: usize,
        /// Values needed.
        expected: usize,
        /// Values given.
        got: usize,
    },
    /// The two frames differ in size.
    #[error("frames differ in size: {0:?} vs {1:?}")]
    SizeMismatch((usize, usize, usize), (usize, usize, usize)),
    /// An argument is out of range.
    #[error("invalid argument `{name}`: {reason}")]
    InvalidArgument {
        /// The argument.
        name: &'static str,
        /// Why.
        reason: String,
    },
}

/// A frame `[height, width, channels]`, row-major, interleaved channels.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    width: usize,
    height: usize,
    channels: usize,
    pixels: Vec<f32>,
}

impl Frame {
    /// A frame from its pixels (`height * width * channels` values).
    pub fn new(
        width: usize,
        height: usize,
        channels: usize,
        pixels: Vec<f32>,
    ) -> Result<Self, MetricError> {
        let expected = width * height * channels;
        if pixels.len() != expected || expected == 0 {
            return Err(MetricError::BadBuffer {
                width,
                height,
                channels,
                expected,
                got: pixels.len(),
            });
        }
        Ok(Self {
            width,
            height,
            channels,
            pixels,
        })
    }

    /// `(width, height, channels)`.
    pub fn size(&self) -> (usize, usize, usize) {
        (self.width, self.height, self.channels)
    }

    /// The pixels.
    pub fn pixels(&self) -> &[f32] {
        &self.pixels
    }

    fn at(&self, x: usize, y: usize, c: usize) -> f64 {
        f64::from(self.pixels[(y * self.width + x) * self.channels + c])
    }
}

fn same_size(a: &Frame, b: &Frame) -> Result<(), MetricError> {
    if a.size() != b.size() {
        return Err(MetricError::SizeMismatch(a.size(), b.size()));
    }
    Ok(())
}

/// Mean squared error over all values.
pub fn mse(a: &Frame, b: &Frame) -> Result<f64, MetricError> {
    same_size(a, b)?;
    let sum: f64 = a
        .pixels
        .iter()
        .zip(&b.pixels)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
        .sum();
    Ok(sum / a.pixels.len() as f64)
}

/// Peak signal-to-noise ratio in dB, `10 log10(max² / MSE)`; infinite for identical frames.
pub fn psnr(a: &Frame, b: &Frame, max: f64) -> Result<f64, MetricError> {
    if !(max.is_finite() && max > 0.0) {
        return Err(MetricError::InvalidArgument {
            name: "max",
            reason: format!("must be finite and > 0, got {max}"),
        });
    }
    let m = mse(a, b)?;
    Ok(if m == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (max * max / m).log10()
    })
}

/// Structural similarity (Wang et al. 2004): 11×11 Gaussian window with σ = 1.5 (truncated at
/// the borders, "valid" positions only), `K1 = 0.01`, `K2 = 0.03`, averaged over positions and
/// channels. Frames smaller than the window use a window of their own size.
pub fn ssim(a: &Frame, b: &Frame, max: f64) -> Result<f64, MetricError> {
    same_size(a, b)?;
    if !(max.is_finite() && max > 0.0) {
        return Err(MetricError::InvalidArgument {
            name: "max",
            reason: format!("must be finite and > 0, got {max}"),
        });
    }
    let (w, h, channels) = a.size();
    let win = 11.min(w).min(h);
    let sigma = 1.5f64;
    let half = (win as f64 - 1.0) / 2.0;
    let g1: Vec<f64> = (0..win)
        .map(|i| (-((i as f64 - half).powi(2)) / (2.0 * sigma * sigma)).exp())
        .collect();
    let norm: f64 = g1.iter().sum::<f64>().powi(2);
    let c1 = (0.01 * max).powi(2);
    let c2 = (0.03 * max).powi(2);
    let mut total = 0.0;
    let mut count = 0usize;
    for c in 0..channels {
        for y0 in 0..=(h - win) {
            for x0 in 0..=(w - win) {
                let (mut ma, mut mb, mut saa, mut sbb, mut sab) = (0.0, 0.0, 0.0, 0.0, 0.0);
                for dy in 0..win {
                    for dx in 0..win {
                        let g = g1[dy] * g1[dx] / norm;
                        let va = a.at(x0 + dx, y0 + dy, c);
                        let vb = b.at(x0 + dx, y0 + dy, c);
                        ma += g * va;
                        mb += g * vb;
                        saa += g * va * va;
                        sbb += g * vb * vb;
                        sab += g * va * vb;
                    }
                }
                let va = saa - ma * ma;
                let vb = sbb - mb * mb;
                let cov = sab - ma * mb;
                total += ((2.0 * ma * mb + c1) * (2.0 * cov + c2))
                    / ((ma * ma + mb * mb + c1) * (va + vb + c2));
                count += 1;
            }
        }
    }
    Ok(total / count as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(w: usize, h: usize, f: impl Fn(usize, usize) -> f32) -> Frame {
        let pixels = (0..h)
            .flat_map(|y| (0..w).map(move |x| (x, y)))
            .map(|(x, y)| f(x, y))
            .collect();
        Frame::new(w, h, 1, pixels).unwrap()
    }

    #[test]
    fn identical_frames_have_infinite_psnr_and_unit_ssim() {
        let a = frame(16, 16, |x, y| ((x * 7 + y * 3) % 11) as f32 / 10.0);
        assert_eq!(psnr(&a, &a, 1.0).unwrap(), f64::INFINITY);
        assert!((ssim(&a, &a, 1.0).unwrap() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn uniform_error_gives_the_analytic_psnr() {
        // A uniform error e gives MSE e², so PSNR = -20 log10(e) for max 1.
        let a = frame(8, 8, |x, _| x as f32 / 10.0);
        for e in [0.1f32, 0.05, 0.01] {
            let b = frame(8, 8, |x, _| x as f32 / 10.0 + e);
            let want = -20.0 * f64::from(e).log10();
            assert!((psnr(&a, &b, 1.0).unwrap() - want).abs() < 1e-3, "e = {e}");
        }
    }

    #[test]
    fn constant_shift_ssim_matches_the_luminance_term() {
        // Constant frames: variances and covariance are 0, so SSIM reduces to
        // (2 μa μb + C1) / (μa² + μb² + C1).
        let a = frame(12, 12, |_, _| 0.4);
        let b = frame(12, 12, |_, _| 0.6);
        let c1 = 0.01f64.powi(2);
        let (ma, mb) = (0.4f64, 0.6f64);
        let want = (2.0 * ma * mb + c1) / (ma * ma + mb * mb + c1);
        assert!((ssim(&a, &b, 1.0).unwrap() - want).abs() < 1e-6);
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(Frame::new(2, 2, 3, vec![0.0; 5]).is_err());
        let a = frame(4, 4, |_, _| 0.0);
        let b = frame(5, 4, |_, _| 0.0);
        assert!(matches!(
            psnr(&a, &b, 1.0),
            Err(MetricError::SizeMismatch(..))
        ));
        assert!(psnr(&a, &a, 0.0).is_err());
    }
}
