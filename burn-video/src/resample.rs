//! Anti-aliased linear resampling of clips over time, height and width (separable triangle
//! filter stretched by the scale when shrinking, as PIL's and torchvision's antialiased
//! bilinear resize do), and the VAE baseline built from it: squeeze a clip to as many numbers
//! as a latent holds, then resize it back.

use crate::clip::Clip;
use crate::error::{Result, invalid};
use crate::metrics::{Frame, psnr, ssim};

/// Per output sample: the first input index and the normalised weights.
pub(crate) fn weights(n_in: usize, n_out: usize) -> Vec<(usize, Vec<f64>)> {
    let scale = n_in as f64 / n_out as f64;
    let support = scale.max(1.0);
    (0..n_out)
        .map(|i| {
            let center = (i as f64 + 0.5) * scale;
            let lo = ((center - support).floor().max(0.0)) as usize;
            let hi = ((center + support).ceil() as usize).min(n_in);
            let mut w: Vec<f64> = (lo..hi)
                .map(|j| (1.0 - ((j as f64 + 0.5 - center) / support).abs()).max(0.0))
                .collect();
            let sum: f64 = w.iter().sum();
            if sum > 0.0 {
                w.iter_mut().for_each(|v| *v /= sum);
            }
            (lo, w)
        })
        .collect()
}

/// Resamples `data` `[n0, n1, n2, n3]` (row-major) along `axis` to `n_out` samples.
fn resample_axis(
    data: &[f64],
    shape: [usize; 4],
    axis: usize,
    n_out: usize,
) -> (Vec<f64>, [usize; 4]) {
    let w = weights(shape[axis], n_out);
    let mut out_shape = shape;
    out_shape[axis] = n_out;
    let stride: usize = shape[axis + 1..].iter().product();
    let outer: usize = shape[..axis].iter().product();
    let mut out = vec![0.0; out_shape.iter().product()];
    for o in 0..outer {
        for (i, (lo, ws)) in w.iter().enumerate() {
            let dst = (o * n_out + i) * stride;
            for (k, wk) in ws.iter().enumerate() {
                let src = (o * shape[axis] + lo + k) * stride;
                for s in 0..stride {
                    out[dst + s] += wk * data[src + s];
                }
            }
        }
    }
    (out, out_shape)
}

/// `clip` resized to `frames × height × width`.
pub fn resize(clip: &Clip, frames: usize, height: usize, width: usize) -> Result<Clip> {
    if frames == 0 || height == 0 || width == 0 {
        return Err(invalid(
            "size",
            "frames, height and width must be at least 1",
        ));
    }
    let (w0, h0) = clip.size();
    let mut shape = [clip.len(), h0, w0, 3];
    let mut data: Vec<f64> = clip
        .frames()
        .iter()
        .flat_map(|f| f.pixels().iter().map(|&v| f64::from(v)))
        .collect();
    for (axis, n) in [(0, frames), (1, height), (2, width)] {
        (data, shape) = resample_axis(&data, shape, axis, n);
    }
    let per = height * width * 3;
    let out = (0..frames)
        .map(|t| {
            let px = data[t * per..(t + 1) * per]
                .iter()
                .map(|&v| v as f32)
                .collect();
            Frame::new(width, height, 3, px)
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Clip::new(out)
}

/// The same-size baseline of a VAE whose latent holds `frames × height × width × 3` numbers:
/// squeeze the clip to that size, then resize it back.
pub fn squeeze(clip: &Clip, frames: usize, height: usize, width: usize) -> Result<Clip> {
    let (w, h) = clip.size();
    resize(&resize(clip, frames, height, width)?, clip.len(), h, w)
}

/// The resize baseline of a VAE whose latent is `[channels, t, lh, lw]`: as many numbers as
/// the latent holds, as `t` RGB frames with the clip's aspect (18×18 for an 8×8 latent of 16
/// channels), squeezed to and resized back from.
pub fn same_size_baseline(clip: &Clip, [channels, t, lh, lw]: [usize; 4]) -> Result<Clip> {
    let k = (channels as f64 / 3.0).sqrt();
    let (bh, bw) = (
        ((lh as f64 * k).floor() as usize).max(1),
        ((lw as f64 * k).floor() as usize).max(1),
    );
    squeeze(clip, t, bh, bw)
}

/// Mean PSNR and SSIM (values in `[0, 1]`) over every frame of every clip pair.
pub fn quality(pairs: &[(Clip, Clip)]) -> Result<(f64, f64)> {
    let (mut p, mut s, mut n) = (0.0, 0.0, 0usize);
    for (a, b) in pairs {
        if a.len() != b.len() {
            return Err(invalid(
                "pairs",
                format!("clips of {} and {} frames", a.len(), b.len()),
            ));
        }
        for (fa, fb) in a.frames().iter().zip(b.frames()) {
            p += psnr(fa, fb, 1.0)?.min(100.0);
            s += ssim(fa, fb, 1.0)?;
            n += 1;
        }
    }
    if n == 0 {
        return Err(invalid("pairs", "no frames"));
    }
    Ok((p / n as f64, s / n as f64))
}
