//! Clips as tensors and back: `[B, 3, T, H, W]` in `[-1, 1]` (the VAE's input and output);
//! the value of a loss tensor.

use burn::tensor::{Device, Tensor, TensorData};

use crate::clip::Clip;
use crate::error::{Result, invalid};
use crate::metrics::Frame;

/// `[B, 3, T, H, W]` in `[-1, 1]` from crops of `frames × height × width` of `clips`, the
/// `i`-th starting at `at[i] = (first frame, y, x)`.
pub fn crops(
    clips: &[&Clip],
    at: &[(usize, usize, usize)],
    frames: usize,
    (height, width): (usize, usize),
    d: &Device,
) -> Tensor<5> {
    let mut v = Vec::with_capacity(clips.len() * 3 * frames * height * width);
    for (clip, &(t0, y0, x0)) in clips.iter().zip(at) {
        let (w, _) = clip.size();
        for c in 0..3 {
            for t in 0..frames {
                let px = clip.frames()[t0 + t].pixels();
                for y in 0..height {
                    for x in 0..width {
                        v.push(px[((y0 + y) * w + x0 + x) * 3 + c] * 2.0 - 1.0);
                    }
                }
            }
        }
    }
    Tensor::from_data(
        TensorData::new(v, [clips.len(), 3, frames, height, width]),
        d,
    )
}

/// A whole clip as `[1, 3, T, H, W]` in `[-1, 1]`.
pub fn clip_tensor(clip: &Clip, d: &Device) -> Tensor<5> {
    let (w, h) = clip.size();
    crops(&[clip], &[(0, 0, 0)], clip.len(), (h, w), d)
}

/// The clip of `[1, 3, T, H, W]` in `[-1, 1]` (values clamped to it).
pub fn to_clip(x: Tensor<5>) -> Result<Clip> {
    let [_, _, t, h, w] = x.dims();
    let v = x
        .clamp(-1.0, 1.0)
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| invalid("x", format!("cannot be read: {e:?}")))?;
    let plane = h * w;
    let frames = (0..t)
        .map(|f| {
            let px = (0..plane)
                .flat_map(|i| (0..3).map(move |c| (c, i)))
                .map(|(c, i)| (v[(c * t + f) * plane + i] + 1.0) / 2.0)
                .collect();
            Frame::new(w, h, 3, px)
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Clip::new(frames)
}

/// The longest prefix of `clip` with `1 + k × factor` frames (what a causal VAE with temporal
/// factor `factor` encodes).
pub fn usable(clip: &Clip, factor: usize) -> Clip {
    clip.trim(1 + (clip.len() - 1) / factor * factor)
}

/// The value of a one-element tensor (a loss), NaN when it cannot be read.
pub fn scalar(t: Tensor<1>) -> f64 {
    t.into_data()
        .convert::<f64>()
        .try_into_vec::<f64>()
        .ok()
        .and_then(|v| v.first().copied())
        .unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clip_survives_the_round_trip_through_a_tensor() {
        let frame = |k: f32| {
            let px = (0..4 * 2 * 3)
                .map(|i| ((i as f32 + k) % 7.0) / 7.0)
                .collect();
            Frame::new(4, 2, 3, px).unwrap()
        };
        let clip = Clip::new((0..5).map(|k| frame(k as f32)).collect()).unwrap();
        let d = Device::flex();
        let x = clip_tensor(&clip, &d);
        assert_eq!(x.dims(), [1, 3, 5, 2, 4]);
        let back = to_clip(x).unwrap();
        for (a, b) in clip.frames().iter().zip(back.frames()) {
            for (p, q) in a.pixels().iter().zip(b.pixels()) {
                assert!((p - q).abs() < 1e-6);
            }
        }
        assert_eq!(usable(&clip, 4).len(), 5);
        assert_eq!(usable(&clip.trim(4), 4).len(), 1);
    }
}
