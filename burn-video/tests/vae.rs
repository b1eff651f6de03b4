//! The causal VAE: latent shapes at 4×8×8 and 8×8×8, decode restoring the input shape,
//! causality (a later frame never changes an earlier latent), configuration errors.

use burn::tensor::{Device, Distribution, Tensor};
use burn_video::vae::{LinearPath, SMOOTH_CHANNELS, VaeConfig};

fn small(temporal_down: usize) -> VaeConfig {
    VaeConfig {
        channels: vec![8, 8, 16, 16],
        latent: 4,
        spatial_down: 3,
        temporal_down,
        groups: 4,
        ..VaeConfig::default()
    }
}

/// Patchified by 4: one spatial level left, so temporal halvings get levels of their own.
fn patched(temporal_down: usize) -> VaeConfig {
    VaeConfig {
        channels: vec![48; temporal_down.max(1) + 1],
        patch: 4,
        ..small(temporal_down)
    }
}

/// With the linear patch path beside the deep one.
fn linear(temporal_down: usize) -> VaeConfig {
    VaeConfig {
        linear: LinearPath::Blocks,
        ..patched(temporal_down)
    }
}

/// With the smooth linear path (its fixed channels plus 4 learned ones).
fn smooth(temporal_down: usize) -> VaeConfig {
    VaeConfig {
        linear: LinearPath::Smooth,
        latent: SMOOTH_CHANNELS + 4,
        ..patched(temporal_down)
    }
}

fn clip(d: &Device) -> Tensor<5> {
    Tensor::random([1, 3, 17, 64, 64], Distribution::Uniform(-1.0, 1.0), d)
}

#[test]
fn shapes_at_4x8x8_and_8x8x8_and_decode_gives_back_the_clip_shape() {
    let d = Device::flex();
    let x = clip(&d);
    for (cfg, td, t) in [
        (small(2), 2, 5),
        (small(3), 3, 3),
        (patched(2), 2, 5),
        (patched(3), 3, 3),
        (linear(2), 2, 5),
        (linear(3), 3, 3),
        (smooth(2), 2, 5),
        (smooth(3), 3, 3),
    ] {
        let vae = cfg.init(&d).expect("vae");
        let p = vae.encode(x.clone());
        assert_eq!(
            p.mean.dims(),
            [1, cfg.latent, t, 8, 8],
            "temporal_down {td}, patch {}",
            cfg.patch
        );
        assert_eq!(cfg.latent_shape(17, 64, 64).unwrap(), [cfg.latent, t, 8, 8]);
        assert_eq!(vae.decode(p.mean).dims(), [1, 3, 17, 64, 64]);
    }
    // The default: 16 latent channels at 4×8×8.
    assert_eq!(
        VaeConfig::default().latent_shape(17, 64, 64).unwrap(),
        [16, 5, 8, 8]
    );
    assert!(
        VaeConfig::default()
            .latent_shape(16, 64, 64)
            .unwrap_err()
            .to_string()
            .contains("frames")
    );
}

#[test]
fn a_changed_frame_changes_no_earlier_latent() {
    let d = Device::flex();
    for cfg in [small(2), patched(2), linear(2), smooth(2)] {
        causal(&cfg, &d);
    }
}

fn causal(cfg: &VaeConfig, d: &Device) {
    let d = d.clone();
    let vae = cfg.init(&d).expect("vae");
    let x = clip(&d);
    let base = vae
        .encode(x.clone())
        .mean
        .into_data()
        .try_into_vec::<f32>()
        .unwrap();
    for t in [4usize, 9, 16] {
        let noise = Tensor::random([1, 3, 1, 64, 64], Distribution::Uniform(-1.0, 1.0), &d);
        let changed = x
            .clone()
            .slice_assign([0..1, 0..3, t..t + 1, 0..64, 0..64], noise);
        let got = vae
            .encode(changed)
            .mean
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        // Latent step j sees frames up to 4j: steps j < t / 4 must be bit-identical.
        let [c, steps] = [cfg.latent, 5];
        let mut changed_steps = Vec::new();
        for j in 0..steps {
            let same = (0..c).all(|ch| {
                let at = ch * steps * 64 + j * 64;
                base[at..at + 64] == got[at..at + 64]
            });
            if !same {
                changed_steps.push(j);
            }
        }
        let first = changed_steps.first().copied().unwrap_or(steps);
        assert!(4 * first >= t, "frame {t} changed latent step {first}");
        assert!(!changed_steps.is_empty(), "frame {t} changed nothing");
    }
}

#[test]
fn bad_configs_name_the_field() {
    for (cfg, field) in [
        (
            VaeConfig {
                channels: vec![8, 8],
                ..small(2)
            },
            "channels",
        ),
        (
            VaeConfig {
                temporal_down: 7,
                ..small(2)
            },
            "temporal_down",
        ),
        (
            VaeConfig {
                patch: 3,
                ..small(2)
            },
            "patch",
        ),
        (
            VaeConfig {
                patch: 16,
                ..small(2)
            },
            "patch",
        ),
        (
            VaeConfig {
                groups: 3,
                ..small(2)
            },
            "groups",
        ),
        (
            VaeConfig {
                kl_weight: -1.0,
                ..small(2)
            },
            "kl_weight",
        ),
        (
            VaeConfig {
                latent: SMOOTH_CHANNELS,
                ..smooth(2)
            },
            "latent",
        ),
    ] {
        let e = cfg.init(&Device::flex()).unwrap_err().to_string();
        assert!(e.contains(field), "{e}");
    }
}

fn max_abs_diff(a: Tensor<5>, b: Tensor<5>) -> (f32, f32) {
    let a = a.into_data().try_into_vec::<f32>().unwrap();
    let b = b.into_data().try_into_vec::<f32>().unwrap();
    assert_eq!(a.len(), b.len());
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let scale = a.iter().map(|x| x.abs()).fold(0f32, f32::max);
    (diff, scale)
}

#[test]
fn chunked_encode_and_decode_equal_the_whole_clip() {
    let d = Device::flex();
    let x = clip(&d);
    for cfg in [
        small(2),
        patched(2),
        patched(3),
        linear(2),
        linear(3),
        smooth(2),
        smooth(3),
    ] {
        let vae = cfg.init(&d).expect("vae");
        let whole = vae.encode(x.clone()).mean;
        let frames = vae.decode(whole.clone());
        let steps = whole.dims()[2];
        for chunk in 1..steps {
            let (diff, scale) =
                max_abs_diff(vae.encode_chunked(x.clone(), chunk).mean, whole.clone());
            assert!(
                diff <= 1e-5 * scale.max(1.0),
                "encode, patch {} td {}, chunk {chunk}: {diff}",
                cfg.patch,
                cfg.temporal_down
            );
            let (diff, scale) =
                max_abs_diff(vae.decode_chunked(whole.clone(), chunk), frames.clone());
            assert!(
                diff <= 1e-5 * scale.max(1.0),
                "decode, patch {} td {}, chunk {chunk}: {diff}",
                cfg.patch,
                cfg.temporal_down
            );
        }
    }
}

/// A clip whose causal 4×8×8 blocks are the mean plus combinations of three fixed patterns
/// (constant over a block's frames, so the first block of repeated frames fits too).
fn low_rank_clip(d: &Device, seed: u64) -> Tensor<5> {
    fn generator(seed: u64) -> impl FnMut() -> f32 {
        let mut rng = burn_parallel::rng::Rng::new(seed);
        move || rng.uniform() as f32 - 0.5
    }
    // The patterns are the same in every clip, the coefficients differ.
    let mut fixed = generator(99);
    let pattern: Vec<Vec<f32>> = (0..4)
        .map(|_| (0..3 * 64).map(|_| fixed()).collect())
        .collect();
    let mut next = generator(seed);
    let mut v = vec![0f32; 3 * 17 * 64 * 64];
    for g in 0..5 {
        for by in 0..8 {
            for bx in 0..8 {
                let a: Vec<f32> = (0..3).map(|_| next()).collect();
                let frames = if g == 0 { 0..1 } else { 4 * g - 3..4 * g + 1 };
                for t in frames {
                    for c in 0..3 {
                        for dy in 0..8 {
                            for dx in 0..8 {
                                let k = (c * 8 + dy) * 8 + dx;
                                let val = 0.2 * pattern[0][k]
                                    + (0..3).map(|j| a[j] * pattern[j + 1][k]).sum::<f32>();
                                v[((c * 17 + t) * 64 + by * 8 + dy) * 64 + bx * 8 + dx] = val;
                            }
                        }
                    }
                }
            }
        }
    }
    Tensor::from_data(burn::tensor::TensorData::new(v, [1, 3, 17, 64, 64]), d)
}

#[test]
fn the_linear_path_starts_at_the_principal_components() {
    let d = Device::flex();
    let cfg = linear(2);
    let clips: Vec<_> = (1..4).map(|seed| low_rank_clip(&d, seed)).collect();
    let (vae, explained) = cfg.init(&d).expect("vae").fit_linear(&clips).expect("fit");
    assert!((explained - 1.0).abs() < 1e-4, "explained {explained}");
    for clip in &clips {
        let rec = vae.decode(vae.encode(clip.clone()).mean);
        let (diff, _) = max_abs_diff(rec, clip.clone());
        assert!(diff < 1e-3, "reconstruction off by {diff}");
    }
    // Random clips are not of low rank: four components explain part of their variance only.
    let noise = vec![clip(&d)];
    let (vae, explained) = cfg.init(&d).expect("vae").fit_linear(&noise).expect("fit");
    assert!(explained < 0.1, "explained {explained}");
    let rec = vae.decode(vae.encode(noise[0].clone()).mean);
    let (diff, _) = max_abs_diff(rec, noise[0].clone());
    assert!(diff > 0.1, "white noise reconstructed to {diff}");
    // A VAE without the linear path refuses.
    assert!(
        small(2)
            .init(&d)
            .expect("vae")
            .fit_linear(&clips)
            .unwrap_err()
            .to_string()
            .contains("linear")
    );
}

#[test]
fn the_log_mse_loss_is_the_mean_log_of_per_frame_errors() {
    use burn_video::vae::Reconstruction;
    let d = Device::flex();
    let cfg = VaeConfig {
        reconstruction: Reconstruction::LogMse,
        gradient_weight: 0.0,
        kl_weight: 0.0,
        ..small(2)
    };
    let vae = cfg.init(&d).expect("config");
    let x = Tensor::<5>::random([2, 3, 5, 16, 16], Distribution::Uniform(-1.0, 1.0), &d);
    let loss = vae.loss(x.clone(), &cfg, false);
    let r = loss
        .reconstruction
        .into_data()
        .try_to_vec::<f32>()
        .expect("f32");
    let x = x.into_data().try_to_vec::<f32>().expect("f32");
    // By hand: per (sample, frame), the mean over channels and pixels of ((r − x) / 2)²;
    // then ln(· + 1e-6), averaged over the 10 frames.
    let (mut logs, mut all) = (0.0f64, 0.0f64);
    for b in 0..2 {
        for t in 0..5 {
            let mut m = 0.0f64;
            for c in 0..3 {
                for p in 0..256 {
                    let i = ((b * 3 + c) * 5 + t) * 256 + p;
                    m += (f64::from(r[i] - x[i]) / 2.0).powi(2);
                }
            }
            m /= 768.0;
            all += m;
            logs += (m + 1e-6).ln();
        }
    }
    let scalar = |t: Tensor<1>| f64::from(t.into_data().try_to_vec::<f32>().expect("f32")[0]);
    assert!((scalar(loss.total) - logs / 10.0).abs() < 1e-4);
    assert!((scalar(loss.mse) - all / 10.0).abs() < 1e-6);
}

#[test]
fn refined_latents_stay_causal_and_reconstruct_better() {
    let d = Device::flex().autodiff();
    let cfg = smooth(2);
    let vae = cfg.init(&d).expect("vae");
    let x = clip(&d);
    let mse = |z: Tensor<5>| -> f32 {
        (vae.decode(z) - x.clone())
            .powi_scalar(2)
            .mean()
            .into_scalar::<f32>()
    };
    let base = vae.encode_refined(x.clone(), 3, 0.05).expect("refined");
    assert_eq!(base.dims(), [1, cfg.latent, 5, 8, 8]);
    let (plain, refined) = (mse(vae.encode(x.clone()).mean), mse(base.clone()));
    assert!(
        refined < plain,
        "refined {refined} vs posterior mean {plain}"
    );
    // Latent step j sees frames up to 4j only.
    let base = base.into_data().try_into_vec::<f32>().unwrap();
    let t = 9;
    let noise = Tensor::random([1, 3, 1, 64, 64], Distribution::Uniform(-1.0, 1.0), &d);
    let changed = x
        .clone()
        .slice_assign([0..1, 0..3, t..t + 1, 0..64, 0..64], noise);
    let got = vae
        .encode_refined(changed, 3, 0.05)
        .expect("refined")
        .into_data()
        .try_into_vec::<f32>()
        .unwrap();
    let per = 64;
    let step = |v: &[f32], j: usize| -> Vec<f32> {
        (0..cfg.latent)
            .flat_map(|c| v[(c * 5 + j) * per..(c * 5 + j + 1) * per].to_vec())
            .collect()
    };
    for j in 0..5 {
        let same = step(&base, j) == step(&got, j);
        assert_eq!(same, 4 * j < t, "frame {t}, latent step {j}");
    }
    // Without autodiff there is no gradient to follow.
    let plain_vae = cfg.init(&Device::flex()).expect("vae");
    let e = plain_vae
        .encode_refined(clip(&Device::flex()), 1, 0.05)
        .unwrap_err()
        .to_string();
    assert!(e.contains("autodiff"), "{e}");
}
