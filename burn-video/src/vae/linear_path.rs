//! The VAE's linear path: the principal components of the training clips' causal blocks
//! (a symmetric eigen-solver) or the smooth code — the resize baseline's own representation at
//! twice the latent resolution, resizing in space and interpolation in time — plus the
//! principal components of what it leaves; and `Vae::fit_linear`, which fits it.

use super::*;

/// Appends the causal blocks of `clip` `[1, 3, T, H, W]` to `rows`, each a row of
/// `3 · ft · fs²` values (channel, time, row, column): the first frame repeated `ft` times,
/// then groups of `ft` frames, tiled by `fs × fs` squares.
pub(super) fn push_blocks(
    clip: &Tensor<5>,
    (ft, fs): (usize, usize),
    rows: &mut Vec<f64>,
) -> Result<()> {
    let [b, c, t, h, w] = clip.dims();
    if b != 1 || c != 3 || !(t - 1).is_multiple_of(ft) || h % fs != 0 || w % fs != 0 {
        return Err(invalid(
            "clips",
            format!("a [{b}, {c}, {t}, {h}, {w}] clip does not tile into blocks"),
        ));
    }
    let v = clip
        .clone()
        .into_data()
        .convert::<f64>()
        .try_into_vec::<f64>()
        .map_err(|e| invalid("clips", format!("{e:?}")))?;
    // Padded time index p maps to frame max(p − (ft − 1), 0).
    let frame = |p: usize| p.saturating_sub(ft - 1);
    for bt in 0..t.div_ceil(ft) {
        for by in 0..h / fs {
            for bx in 0..w / fs {
                for ch in 0..3 {
                    for dt in 0..ft {
                        let f = frame(bt * ft + dt);
                        for dy in 0..fs {
                            let row = ((ch * t + f) * h + by * fs + dy) * w + bx * fs;
                            rows.extend_from_slice(&v[row..row + fs]);
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// The total variance (trace of the covariance) of rows of `d` values.
pub(super) fn block_variance(rows: &[f64], d: usize) -> f64 {
    let n = (rows.len() / d).max(1) as f64;
    (0..d)
        .map(|i| {
            let (s, s2) = rows
                .iter()
                .skip(i)
                .step_by(d)
                .fold((0.0, 0.0), |(s, s2), v| (s + v, s2 + v * v));
            s2 / n - (s / n).powi(2)
        })
        .sum()
}

/// Initial posterior log-variance (σ ≈ 0.007).
pub(super) const INIT_LOGVAR: f64 = -10.0;

/// The `k` leading eigenvectors of the symmetric `d × d` matrix `a` (row-major) by subspace
/// iteration with Gram–Schmidt re-orthonormalisation, `iterations` rounds, sorted by
/// eigenvalue.
pub(super) fn top_eigenvectors(a: &[f64], d: usize, k: usize, iterations: usize) -> Vec<Vec<f64>> {
    // A deterministic start with full rank in every direction that matters.
    let mut q: Vec<Vec<f64>> = (0..k)
        .map(|j| {
            (0..d)
                .map(|i| (((i * 7919 + j * 104_729) % 1009) as f64 / 1009.0) - 0.5)
                .collect()
        })
        .collect();
    let apply = |v: &[f64]| -> Vec<f64> {
        (0..d)
            .map(|i| {
                a[i * d..(i + 1) * d]
                    .iter()
                    .zip(v)
                    .map(|(x, y)| x * y)
                    .sum()
            })
            .collect()
    };
    let orthonormalise = |q: &mut Vec<Vec<f64>>| {
        for j in 0..q.len() {
            for p in 0..j {
                let dot: f64 = q[j].iter().zip(&q[p]).map(|(x, y)| x * y).sum();
                let prev = q[p].clone();
                q[j].iter_mut().zip(&prev).for_each(|(x, y)| *x -= dot * y);
            }
            let norm = q[j].iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-300);
            q[j].iter_mut().for_each(|x| *x /= norm);
        }
    };
    orthonormalise(&mut q);
    for _ in 0..iterations {
        q = q.iter().map(|v| apply(v)).collect();
        orthonormalise(&mut q);
    }
    let mut ranked: Vec<(f64, Vec<f64>)> = q
        .into_iter()
        .map(|v| {
            let av = apply(&v);
            (v.iter().zip(&av).map(|(x, y)| x * y).sum(), v)
        })
        .collect();
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
    ranked.into_iter().map(|(_, v)| v).collect()
}

/// The `[n_out, n_in]` matrix of [`crate::resample`]'s anti-aliased linear resampling.
pub(super) fn resize_matrix(n_in: usize, n_out: usize, device: &Device) -> Tensor<2> {
    let mut m = vec![0f32; n_out * n_in];
    for (i, (lo, w)) in crate::resample::weights(n_in, n_out)
        .into_iter()
        .enumerate()
    {
        for (k, v) in w.into_iter().enumerate() {
            m[i * n_in + lo + k] = v as f32;
        }
    }
    Tensor::from_data(TensorData::new(m, [n_out, n_in]), device)
}

/// Every frame of `x` `[B, C, T, H, W]` resized to `h × w` (anti-aliased linear, separable:
/// rows, then columns, each one matrix product).
pub(super) fn resize_frames(x: Tensor<5>, h: usize, w: usize) -> Tensor<5> {
    let [b, c, t, h0, w0] = x.dims();
    let device = x.device();
    let n = b * c * t;
    x.reshape([n * h0, w0])
        .matmul(resize_matrix(w0, w, &device).transpose())
        .reshape([n, h0, w])
        .swap_dims(1, 2)
        .reshape([n * w, h0])
        .matmul(resize_matrix(h0, h, &device).transpose())
        .reshape([n, w, h])
        .swap_dims(1, 2)
        .reshape([b, c, t, h, w])
}

/// The weights `w_j = j / ft` (`j = 1 … ft`) of the later step in [`LinearPath::Smooth`]'s
/// interpolation between consecutive latent steps: the decoder's, which the encoder's
/// least-squares code assumes.
pub(super) fn interpolation_weights(ft: usize) -> Vec<f32> {
    (1..=ft).map(|j| j as f32 / ft as f32).collect()
}

/// The fixed code of [`LinearPath::Smooth`], `[B, 3, T, H, W]` →
/// `[B, SMOOTH_CHANNELS, t, H / fs, W / fs]`: per latent step, an image at `SMOOTH_SUB / fs`
/// of the frame size (each `SMOOTH_SUB²` of its sub-pixels and the colours in channels). The
/// first frame of a clip is coded alone, as its anti-aliased linear downsample. Every later
/// step codes a group of `ft` frames, decoded as the linear interpolation from the previous
/// step's image `P` to this one's `C` (frame `j` of the group at weight `w_j = j / ft` on `C`):
/// `C` is the downsample of the least-squares target `(Σ w_j·x_j − Σ w_j(1 − w_j)·P) / Σ w_j²`,
/// which leaves no error correlated with the interpolation weights in the group (the last
/// frame alone would leave the in-between frames to chance). Causal: the step sees its own
/// group and the previous step only, which a later chunk takes from `s`.
pub(super) fn smooth_code(x: Tensor<5>, (ft, fs): (usize, usize), s: &mut Stream) -> Tensor<5> {
    let [_, _, t, h, w] = x.dims();
    let (hs, ws) = (h / fs * SMOOTH_SUB, w / fs * SMOOTH_SUB);
    let device = x.device();
    let down = |f: Tensor<5>| resize_frames(f, hs, ws);
    let taken = if s.first { None } else { s.take() };
    let (mut prev, mut codes, mut at) = match taken {
        Some(p) => (p, Vec::new(), 0),
        None => {
            // The first frame alone (a clip's first chunk).
            let code = down(x.clone().narrow(2, 0, 1));
            (code.clone(), vec![code], 1)
        }
    };
    let weights = interpolation_weights(ft);
    let norm: f32 = weights.iter().map(|w| w * w).sum();
    let carry: f32 = weights.iter().map(|w| w * (1.0 - w)).sum();
    let weights =
        Tensor::<1>::from_data(TensorData::new(weights, [ft]), &device).reshape([1, 1, ft, 1, 1]);
    while at + ft <= t {
        let group = (x.clone().narrow(2, at, ft) * weights.clone()).sum_dim(2);
        let target = (group - resize_frames(prev, h, w) * f64::from(carry)) / f64::from(norm);
        prev = down(target);
        codes.push(prev.clone());
        at += ft;
    }
    if s.keep {
        s.put(prev);
    }
    patchify(Tensor::cat(codes, 2), SMOOTH_SUB)
}

/// The frames of a smooth code `[B, SMOOTH_CHANNELS, t, h, w]`: linear interpolation in time
/// from each latent step to the next (`ft` frames per step after the first, which is one
/// frame when the chunk starts the clip; a later chunk interpolates from the step the previous
/// one left in `s`), then the sub-pixels resized to `fs·h × fs·w`.
pub(super) fn smooth_frames(z: Tensor<5>, (ft, fs): (usize, usize), s: &mut Stream) -> Tensor<5> {
    let [b, c, t, h, w] = z.dims();
    let prev = if s.first { None } else { s.take() };
    if s.keep {
        s.put(z.clone().narrow(2, t - 1, 1));
    }
    // The first frame alone (a clip's first chunk), then every pair of consecutive steps.
    let (mut parts, pairs) = match prev {
        Some(p) => {
            let from = if t > 1 {
                Tensor::cat(vec![p, z.clone().narrow(2, 0, t - 1)], 2)
            } else {
                p
            };
            (Vec::new(), Some((from, z)))
        }
        None => (
            vec![z.clone().narrow(2, 0, 1)],
            (t > 1).then(|| (z.clone().narrow(2, 0, t - 1), z.narrow(2, 1, t - 1))),
        ),
    };
    if let Some((from, to)) = pairs {
        let steps = from.dims()[2];
        let j = Tensor::<1>::from_data(
            TensorData::new(interpolation_weights(ft), [ft]),
            &from.device(),
        )
        .reshape([1, 1, 1, ft, 1, 1]);
        let mixed =
            from.unsqueeze_dim::<6>(3) * (j.clone().neg() + 1.0) + to.unsqueeze_dim::<6>(3) * j;
        parts.push(mixed.reshape([b, c, steps * ft, h, w]));
    }
    let y = unpatchify(Tensor::cat(parts, 2), SMOOTH_SUB);
    resize_frames(y, h * fs, w * fs)
}

/// The smooth code of `x` ([`smooth_code`]) and what its frames ([`smooth_frames`]) leave of
/// `x`, with the causal state of both in `s`.
pub(super) fn smooth_residual(
    x: Tensor<5>,
    factors: (usize, usize),
    s: &mut Stream,
) -> (Tensor<5>, Tensor<5>) {
    let code = smooth_code(x.clone(), factors, s);
    let rest = x - smooth_frames(code.clone(), factors, s);
    (code, rest)
}

impl Vae {
    /// Sets the linear path to the best linear code of `clips` (`[1, 3, T, H, W]` in
    /// `[-1, 1]`, `T = 1 + k · time_factor`): the mean and the top principal components of
    /// their causal blocks (the first frame repeated, then groups of `time_factor` frames,
    /// `space_factor²` pixels), found by subspace iteration on the blocks' covariance; with
    /// [`LinearPath::Smooth`], of the blocks of what the fixed smooth code leaves. With the
    /// deep path's outputs zero at initialisation, the fresh VAE then reconstructs as well as
    /// that linear code. Returns the share of the clips' block variance the code explains.
    pub fn fit_linear(mut self, clips: &[Tensor<5>]) -> Result<(Self, f64)> {
        let (ft, fs) = self.factors;
        let smooth = self.smooth;
        let (z, d) = (self.latent - smooth, 3 * ft * fs * fs);
        let (Some(lin_in), Some(lin_out)) = (self.linear_in.as_mut(), self.linear_out.as_mut())
        else {
            return Err(invalid("linear", "this VAE has no linear path"));
        };
        // The blocks to fit, and with the smooth code the clips' own blocks (for the share).
        let (mut rows, mut own) = (Vec::new(), Vec::new());
        for clip in clips {
            if smooth == 0 {
                push_blocks(clip, self.factors, &mut rows)?;
            } else {
                push_blocks(clip, self.factors, &mut own)?;
                let (_, rest) = smooth_residual(clip.clone(), self.factors, &mut Stream::whole());
                push_blocks(&rest, self.factors, &mut rows)?;
            }
        }
        let n = rows.len() / d;
        if n < z {
            return Err(invalid("clips", format!("{n} blocks for {z} components")));
        }
        let mut mean = vec![0f64; d];
        for r in rows.chunks_exact(d) {
            mean.iter_mut().zip(r).for_each(|(m, v)| *m += v);
        }
        mean.iter_mut().for_each(|m| *m /= n as f64);
        // Covariance through the backend's matmul (d × d), on the clips' device.
        let device = clips[0].device();
        let centred: Vec<f32> = rows
            .chunks_exact(d)
            .flat_map(|r| r.iter().zip(&mean).map(|(v, m)| (v - m) as f32))
            .collect();
        let x = Tensor::<2>::from_data(TensorData::new(centred, [n, d]), &device);
        let cov = x
            .clone()
            .transpose()
            .matmul(x)
            .div_scalar(n as f64)
            .into_data()
            .convert::<f64>()
            .try_into_vec::<f64>()
            .map_err(|e| invalid("clips", format!("{e:?}")))?;
        let components = top_eigenvectors(&cov, d, z, 300);
        let total: f64 = (0..d).map(|i| cov[i * d + i]).sum();
        let captured: f64 = components
            .iter()
            .map(|q| {
                (0..d)
                    .map(|i| q[i] * (0..d).map(|j| cov[i * d + j] * q[j]).sum::<f64>())
                    .sum::<f64>()
            })
            .sum::<f64>();
        // What the code misses, relative to the clips' own block variance.
        let own_total = if smooth == 0 {
            total
        } else {
            block_variance(&own, d)
        };
        let explained = 1.0 - (total - captured).max(0.0) / own_total.max(f64::MIN_POSITIVE);
        let param_device = lin_in.conv.weight.val().device();
        let w_in: Vec<f32> = components.iter().flatten().map(|&v| v as f32).collect();
        let b_in: Vec<f32> = components
            .iter()
            .map(|q| -q.iter().zip(&mean).map(|(a, b)| a * b).sum::<f64>() as f32)
            .collect();
        let w_out: Vec<f32> = (0..d)
            .flat_map(|i| components.iter().map(move |q| q[i] as f32))
            .collect();
        let b_out: Vec<f32> = mean.iter().map(|&m| m as f32).collect();
        let param = |v: Vec<f32>, shape: [usize; 5]| {
            Param::from_tensor(Tensor::<5>::from_data(
                TensorData::new(v, shape),
                &param_device,
            ))
        };
        let bias = |v: Vec<f32>| {
            let len = v.len();
            Some(Param::from_tensor(Tensor::<1>::from_data(
                TensorData::new(v, [len]),
                &param_device,
            )))
        };
        lin_in.conv.weight = param(w_in, [z, 3, ft, fs, fs]);
        lin_in.conv.bias = bias(b_in);
        lin_out.conv.weight = param(w_out, [d, z, 1, 1, 1]);
        lin_out.conv.bias = bias(b_out);
        Ok((self, explained))
    }
}
