//! Video VAE recipes through the command line: bad values name their key, a tiny run trains,
//! reports held-out PSNR next to the baseline, and `eval vae` scores any folder of clips.

mod common;

use std::path::{Path, PathBuf};

use common::bin;

fn clips() -> String {
    let dir = std::env::var_os("VIDEO_CLIPS_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/video-clips"),
        PathBuf::from,
    );
    format!("data.clips=\"{}\"", dir.display())
}

fn train(run: &Path, extra: &[&str]) -> std::process::Output {
    let clips = clips();
    let sets: Vec<&str> = std::iter::once(clips.as_str())
        .chain(extra.iter().copied())
        .collect();
    common::train(&common::recipe("video-vae-tiny.toml"), run, &sets)
}

#[test]
fn bad_vae_recipes_name_the_key_and_write_nothing() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    for (set, key) in [
        ("vae.groups=3", "vae.groups"),
        ("vae.temporal_down=7", "vae.temporal_down"),
        ("vae.patch=3", "vae.patch"),
        ("data.crop=30", "data.crop"),
        ("data.frames=8", "data.frames"),
        ("data.holdout_every=0", "data.holdout_every"),
        ("training.lr=0", "training.lr"),
        ("vae.colour=1", "colour"),
        ("vae.linear=\"wavelet\"", "vae.linear"),
        ("vae.latent=12", "vae.latent"),
        ("eval.refine_lr=0", "eval.refine_lr"),
    ] {
        let run = tmp.path().join("run");
        let out = train(&run, &[set]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{set}: {err}");
        assert!(err.contains(key), "{set}: {err}");
        assert!(!run.exists(), "{set} wrote {}", run.display());
    }
}

#[test]
fn a_tiny_vae_run_trains_reports_and_evaluates() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let run = tmp.path().join("run");
    let out = train(
        &run,
        &[
            "vae.channels=[8, 8, 8]",
            "vae.groups=4",
            "data.crop=16",
            "data.holdout_every=24",
            "training.steps=3",
            "training.warmup_steps=1",
            "training.batch=2",
            "eval.refine=2",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("2 held-out clips: VAE PSNR"), "{stdout}");
    assert!(
        stdout.contains("with the latents refined by 2 steps: VAE PSNR"),
        "{stdout}"
    );
    for f in [
        "metrics.jsonl",
        "summary.json",
        "holdout_preview.gif",
        "recipe.toml",
    ] {
        assert!(run.join(f).exists(), "no {f}");
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).expect("summary"))
            .expect("JSON");
    assert_eq!(summary["latent_std"].as_array().map(Vec::len), Some(16));
    assert_eq!(summary["holdout_refined"]["clips"].as_u64(), Some(2));
    let explained = summary["linear_explained"]
        .as_f64()
        .expect("linear_explained");
    assert!(explained > 0.3 && explained <= 1.0, "{explained}");
    // A second run into the same folder is refused.
    let again = train(&run, &["training.steps=1"]);
    assert_eq!(again.status.code(), Some(2));

    // eval vae on a folder of two clips.
    let eval_dir = tmp.path().join("eval");
    let src = clips();
    let src = src
        .trim_start_matches("data.clips=\"")
        .trim_end_matches('"');
    for name in ["clip_0000", "clip_0007"] {
        let to = eval_dir.join(name);
        std::fs::create_dir_all(&to).expect("mkdir");
        for f in std::fs::read_dir(Path::new(src).join(name)).expect("clip") {
            let f = f.expect("entry").path();
            std::fs::copy(&f, to.join(f.file_name().expect("name"))).expect("copy");
        }
    }
    let preview = tmp.path().join("preview.gif");
    let out = bin()
        .args(["eval", "vae", "--run", &run.display().to_string()])
        .args(["--clips", &eval_dir.display().to_string()])
        .args(["--preview", &preview.display().to_string()])
        .output()
        .expect("binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("2 clips: VAE PSNR") && stdout.contains("baseline"),
        "{stdout}"
    );
    let gif = burn_video::clip::Clip::read(&preview).expect("preview");
    assert_eq!(gif.size(), (192, 64));
    // With the latents refined against the decoder; a bad step size is refused.
    let refined = bin()
        .args(["eval", "vae", "--run", &run.display().to_string()])
        .args(["--clips", &eval_dir.display().to_string()])
        .args(["--preview", &preview.display().to_string()])
        .args(["--refine", "2"])
        .output()
        .expect("binary runs");
    let stdout = String::from_utf8_lossy(&refined.stdout);
    assert!(
        refined.status.success()
            && stdout.contains("2 clips: VAE (latents refined by 2 steps) PSNR"),
        "{stdout}{}",
        String::from_utf8_lossy(&refined.stderr)
    );
    let bad = bin()
        .args(["eval", "vae", "--run", &run.display().to_string()])
        .args(["--clips", &eval_dir.display().to_string()])
        .args(["--refine", "2", "--refine-lr", "0"])
        .output()
        .expect("binary runs");
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--refine-lr"));

    // data cache: the two clips, encoded two latent steps at a time, normalised.
    std::fs::write(
        eval_dir.join("captions.jsonl"),
        "{\"clip\": \"clip_0000\", \"caption\": \"a test caption\"}\n",
    )
    .expect("captions");
    let cache = tmp.path().join("latents");
    let run_cache = |out: &Path, run: &Path| {
        bin()
            .args(["data", "cache", &eval_dir.display().to_string()])
            .args(["--run", &run.display().to_string()])
            .args(["--out", &out.display().to_string()])
            .args(["--chunk", "2"])
            .output()
            .expect("binary runs")
    };
    let out = run_cache(&cache, &run);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (meta, index) = burn_recipes::latents::read_cache(&cache).expect("cache");
    assert_eq!((meta.clips, index.len(), meta.time_factor), (2, 2, 4));
    assert_eq!(index[0].caption.as_deref(), Some("a test caption"));
    assert_eq!(index[1].caption, None);
    let device = burn::tensor::Device::flex();
    let (_, vae, _) = burn_recipes::video::load_vae(&run, None).expect("vae");
    for entry in &index {
        assert_eq!(entry.shape, [16, 5, 8, 8]);
        let got = burn_recipes::latents::read_latent(&cache, entry, &device).expect("latent");
        let clip = burn_video::clip::Clip::read(&entry.clip).expect("clip");
        let z = vae
            .encode(burn_recipes::video::clip_tensor(&clip, &device))
            .mean
            .into_data()
            .try_into_vec::<f32>()
            .expect("f32");
        let got = got.into_data().try_into_vec::<f32>().expect("f32");
        let per = 5 * 8 * 8;
        for (i, (g, z)) in got.iter().zip(&z).enumerate() {
            let c = i / per;
            let want = (f64::from(*z) - meta.latent_mean[c]) / meta.latent_std[c].max(1e-6);
            assert!(
                (f64::from(*g) - want).abs() <= 1e-4 * want.abs().max(1.0),
                "{}: element {i}: {g} vs {want}",
                entry.clip.display()
            );
        }
    }
    // An existing cache folder and a run without statistics are refused, naming the argument,
    // and leave nothing behind.
    let again = run_cache(&cache, &run);
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--out"));
    let other = tmp.path().join("latents2");
    let bad = run_cache(&other, &eval_dir);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--run"));
    assert!(!other.exists() && !other.with_extension("tmp").exists());
}
