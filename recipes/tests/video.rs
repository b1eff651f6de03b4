//! Video VAE recipes through the command line: bad values name their key, a tiny run trains,
//! reports held-out PSNR next to the baseline, and `eval vae` scores any folder of clips.

use std::path::{Path, PathBuf};
use std::process::Command;

fn recipe() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("video-vae-tiny.toml")
}

fn clips() -> String {
    let dir = std::env::var_os("VIDEO_CLIPS_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/video-clips"),
        PathBuf::from,
    );
    format!("data.clips=\"{}\"", dir.display())
}

fn train(run: &Path, extra: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_burn-recipes"));
    cmd.args(["train", &recipe().display().to_string()])
        .args(["--set", &format!("run.dir=\"{}\"", run.display())])
        .args(["--set", &clips()]);
    for e in extra {
        cmd.args(["--set", e]);
    }
    cmd.output().expect("binary runs")
}

#[test]
fn bad_vae_recipes_name_the_key_and_write_nothing() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    for (set, key) in [
        ("vae.groups=3", "vae.groups"),
        ("vae.temporal_down=5", "vae.temporal_down"),
        ("data.crop=30", "data.crop"),
        ("data.frames=8", "data.frames"),
        ("data.holdout_every=0", "data.holdout_every"),
        ("training.lr=0", "training.lr"),
        ("vae.colour=1", "colour"),
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
            "vae.channels=[8, 8, 8, 8]",
            "vae.groups=4",
            "vae.latent=4",
            "data.crop=16",
            "data.holdout_every=24",
            "training.steps=3",
            "training.warmup_steps=1",
            "training.batch=2",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("2 held-out clips: VAE PSNR"), "{stdout}");
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
    assert_eq!(summary["latent_std"].as_array().map(Vec::len), Some(4));
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
    let out = Command::new(env!("CARGO_BIN_EXE_burn-recipes"))
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
}
