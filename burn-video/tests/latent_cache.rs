//! The latent cache as a library: what it stores is the VAE's normalised posterior mean of
//! each clip, with the clip's caption; bad arguments name the argument and leave nothing.

use std::path::PathBuf;

use burn::tensor::Device;
use burn_video::VideoError;
use burn_video::clip::Clip;
use burn_video::latent_cache::{LatentStats, VaeOrigin, cache_latents, read_cache, read_latent};
use burn_video::synthetic::{Label, generate};
use burn_video::tensor::{clip_tensor, usable};
use burn_video::vae::VaeConfig;

fn name(e: VideoError) -> &'static str {
    match e {
        VideoError::InvalidArgument { name, .. } => name,
        other => panic!("expected an argument error, got {other}"),
    }
}

#[test]
fn cached_latents_are_the_normalised_posterior_means_with_their_captions() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let clips_dir = tmp.path().join("clips");
    std::fs::create_dir_all(&clips_dir).expect("folder");
    let mut captions = String::new();
    for i in 0..2 {
        let label = Label::nth(5 * i);
        let clip = generate(&label, 16, 9, i as u64).expect("clip");
        let file = format!("clip_{i:03}.gif");
        clip.write_gif(&clips_dir.join(&file), 100).expect("gif");
        captions.push_str(&format!(
            "{{\"clip\": \"{file}\", \"caption\": \"{}\"}}\n",
            label.caption()
        ));
    }
    std::fs::write(clips_dir.join("captions.jsonl"), captions).expect("captions");
    let device = Device::flex();
    let cfg = VaeConfig {
        channels: vec![4; 4],
        latent: 4,
        groups: 2,
        ..VaeConfig::default()
    };
    let vae = cfg.init(&device).expect("init");
    let stats = LatentStats {
        latent_mean: vec![0.1, -0.2, 0.3, 0.0],
        latent_std: vec![2.0, 0.5, 1.0, 4.0],
    };
    let origin = VaeOrigin {
        run: PathBuf::from("vae-run"),
        checkpoint: PathBuf::from("vae-run/checkpoints/step-000001"),
    };
    let out = tmp.path().join("cache");
    let meta = cache_latents((&vae, &cfg, &origin), &stats, &clips_dir, &out, 1).expect("cache");
    assert_eq!((meta.clips, meta.latent_channels), (2, 4));
    assert_eq!((meta.time_factor, meta.space_factor), (4, 8));
    let (read_meta, index) = read_cache(&out).expect("read");
    assert_eq!(read_meta, meta);
    assert_eq!(index.len(), 2);
    for (i, entry) in index.iter().enumerate() {
        assert_eq!(entry.caption, Some(Label::nth(5 * i).caption()));
        assert_eq!(entry.shape, [4, 3, 2, 2]);
        // By hand: the whole clip's posterior mean, minus the mean, over the deviation.
        let clip = usable(&Clip::read(&entry.clip).expect("clip"), 4);
        let z: Vec<f32> = vae
            .encode(clip_tensor(&clip, &device))
            .mean
            .into_data()
            .iter::<f32>()
            .collect();
        let got: Vec<f32> = read_latent(&out, entry, &device)
            .expect("latent")
            .into_data()
            .iter::<f32>()
            .collect();
        let per = 3 * 2 * 2;
        for (j, (g, z)) in got.iter().zip(&z).enumerate() {
            let c = j / per;
            let want = (f64::from(*z) - stats.latent_mean[c]) / stats.latent_std[c];
            assert!(
                (f64::from(*g) - want).abs() < 1e-4,
                "clip {i} value {j}: {g} vs {want}"
            );
        }
    }
    // Bad arguments name themselves and write nothing.
    let again = cache_latents((&vae, &cfg, &origin), &stats, &clips_dir, &out, 1);
    assert_eq!(name(again.unwrap_err()), "out");
    let other = tmp.path().join("other");
    let zero = cache_latents((&vae, &cfg, &origin), &stats, &clips_dir, &other, 0);
    assert_eq!(name(zero.unwrap_err()), "chunk");
    let short = LatentStats {
        latent_mean: vec![0.0; 3],
        latent_std: vec![1.0; 3],
    };
    let wrong = cache_latents((&vae, &cfg, &origin), &short, &clips_dir, &other, 1);
    assert_eq!(name(wrong.unwrap_err()), "stats");
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).expect("folder");
    let none = cache_latents((&vae, &cfg, &origin), &stats, &empty, &other, 1);
    assert_eq!(name(none.unwrap_err()), "source");
    assert!(!other.exists() && !other.with_extension("tmp").exists());
}
