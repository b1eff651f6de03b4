//! The DiT pipeline through the command line: synthetic clips → a (tiny) VAE run → a latent
//! cache with captions → curriculum training that switches stages in order and reports a
//! validation loss per stage → `sample` GIFs → `eval dit` rule-checker accuracies; stage
//! switching and image/video bucketing; bad DiT recipes name their key.

mod common;

use std::process::Output;

use burn_recipes::dit::DitRecipe;
use burn_video::dit_training::{BatchKind, Stage, batch_kind};
use burn_video::flow::Rng;
use common::{bin, recipe, train};

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stage(frames: usize, image_ratio: f64) -> Stage {
    Stage {
        name: "s".into(),
        steps: 10,
        lr: 1e-3,
        min_lr: None,
        warmup_steps: 0,
        batch: 2,
        frames,
        image_ratio,
    }
}

#[test]
fn stages_switch_at_their_step_counts_and_batches_keep_one_shape() {
    let mut recipe = DitRecipe::load(&recipe("dit-tiny.toml"), &[]).expect("recipe");
    recipe.stage[0].steps = 3;
    recipe.stage[1].steps = 2;
    recipe.stage[2].steps = 4;
    let seen: Vec<Option<(usize, usize)>> = (0..10).map(|s| recipe.stage_at(s)).collect();
    assert_eq!(
        seen,
        [
            Some((0, 0)),
            Some((0, 1)),
            Some((0, 2)),
            Some((1, 0)),
            Some((1, 1)),
            Some((2, 0)),
            Some((2, 1)),
            Some((2, 2)),
            Some((2, 3)),
            None
        ]
    );
    assert_eq!(recipe.total_steps(), 9);
    let mut rng = Rng::new(4);
    // Image stages draw images only, video stages without images never do, mixed ones both
    // in about their ratio; a batch is one kind (one latent shape).
    assert!((0..100).all(|_| batch_kind(&stage(1, 0.0), &mut rng) == BatchKind::Images));
    assert!((0..100).all(|_| batch_kind(&stage(3, 0.0), &mut rng) == BatchKind::Video(3)));
    let images = (0..2000)
        .filter(|_| batch_kind(&stage(3, 0.25), &mut rng) == BatchKind::Images)
        .count();
    assert!((400..600).contains(&images), "{images} of 2000");
    assert_eq!(BatchKind::Video(3).frames(), 3);
}

#[test]
fn stage_learning_rates_warm_up_then_hold_or_follow_a_cosine() {
    let mut s = stage(1, 0.0);
    s.steps = 11;
    s.warmup_steps = 2;
    // Warm-up: lr · (s + 1) / warmup (Megatron's), then constant.
    assert!((s.lr_at(0) - 0.5e-3).abs() < 1e-12);
    assert!((1..11).all(|i| (s.lr_at(i) - 1e-3).abs() < 1e-12));
    s.min_lr = Some(1e-4);
    // After the warm-up: min + (lr − min)·(1 + cos(π·k/9))/2 for k = 0 … 9, the stage's
    // 11 steps ending the decay.
    for (i, k) in (2..=11).zip(0..) {
        let want = 1e-4 + 0.9e-3 * 0.5 * (1.0 + (std::f64::consts::PI * k as f64 / 9.0).cos());
        assert!((s.lr_at(i) - want).abs() < 1e-12, "step {i}");
    }
    assert!((s.lr_at(2) - 1e-3).abs() < 1e-12);
    assert!((s.lr_at(11) - 1e-4).abs() < 1e-12);
    assert!((s.lr_at(50) - 1e-4).abs() < 1e-12);
}

/// DPO on preference pairs of its own (preferred and rejected latents under one caption)
/// against the frozen starting model: the implicit-reward margin of the preferred samples,
/// zero at the start, rises; with no pairs nothing changes.
#[test]
fn dpo_raises_the_implicit_reward_margin_of_its_own_pairs() {
    use burn::module::Module;
    use burn::tensor::{Device, Distribution, Tensor};
    use burn_parallel::prelude::{AdamWConfig, DistributedAdamW, Group};
    use burn_video::dit::DitConfig;
    use burn_video::dit_training::{dpo_margin, dpo_steps};
    use burn_video::synthetic::Label;
    use burn_video::text::Vocabulary;

    let recipe = DitRecipe::load(&recipe("dit-tiny.toml"), &[]).expect("recipe");
    let mut post = recipe.post.clone().expect("[post]");
    post.dpo_steps = 8;
    post.batch = 2;
    post.dpo_lr = 1e-3;
    let captions: Vec<String> = (0..3).map(|i| Label::nth(i).caption()).collect();
    let vocab = Vocabulary::from_captions(&captions);
    let config = DitConfig {
        latent: 4,
        hidden: 24,
        depth: 1,
        heads: 2,
        mlp_ratio: 2,
        vocab: vocab.len(),
        text_len: recipe.dit.text_len,
        rope_base: 100.0,
        moe: None,
        pooled_text: false,
    };
    let d = Device::flex().autodiff();
    let dit = config.init(&d).expect("dit");
    let reference = dit.valid();
    let latent = || Tensor::<4>::random([4, 2, 4, 4], Distribution::Normal(0.0, 1.0), &d);
    let pairs: Vec<_> = captions
        .iter()
        .map(|c| (latent(), latent(), c.clone()))
        .collect();
    let g = Group::single();
    let mut opt = DistributedAdamW::new(
        AdamWConfig {
            weight_decay: 0.0,
            ..AdamWConfig::default()
        },
        g.clone(),
        g.clone(),
        g,
    )
    .expect("optimizer");
    let inputs = (&vocab, recipe.dit.text_len);
    let before = dpo_margin((&dit.valid(), &reference), &pairs, post.beta, inputs).expect("margin");
    assert!(before.abs() < 1e-9, "the policy is the reference: {before}");
    let mut rng = Rng::new(7);
    let training = recipe.training_config();
    let (none, losses) = dpo_steps(
        &training,
        &post,
        (dit.clone(), &mut opt, None),
        &reference,
        &[],
        (&vocab, &mut rng),
    )
    .expect("no pairs");
    assert!(losses.is_empty());
    let unchanged =
        dpo_margin((&none.valid(), &reference), &pairs, post.beta, inputs).expect("margin");
    assert!(unchanged.abs() < 1e-9, "{unchanged}");
    let (trained, losses) = dpo_steps(
        &training,
        &post,
        (dit, &mut opt, None),
        &reference,
        &pairs,
        (&vocab, &mut rng),
    )
    .expect("dpo");
    assert_eq!(losses.len(), 8);
    // log 2 at the reference.
    assert!(
        (losses[0] - std::f64::consts::LN_2).abs() < 1e-6,
        "{losses:?}"
    );
    let after =
        dpo_margin((&trained.valid(), &reference), &pairs, post.beta, inputs).expect("margin");
    assert!(
        after > 0.1,
        "DPO did not raise the margin of its pairs: {before} -> {after}"
    );
}

#[test]
fn bad_dit_recipes_name_the_key_and_write_nothing() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    for (set, key) in [
        ("stage[0].lr=0", "stage[0].lr"),
        ("dit.heads=5", "dit.heads"),
        ("data.caption_dropout=1.0", "data.caption_dropout"),
        ("data.holdout_every=1", "data.holdout_every"),
        ("stage[1].image_ratio=2.0", "stage[1].image_ratio"),
        ("data.latents=\"/nonexistent\"", "data.latents"),
        ("dit.colour=1", "colour"),
        ("post.beta=0", "post.beta"),
        ("dit.rope_base=0.5", "dit.rope_base"),
        (
            "dit.moe={experts = 2, top_k = 3, ffn_hidden = 8}",
            "dit.moe",
        ),
        ("post.eval_prompts=0", "post.eval_prompts"),
        ("ema.decay=1.0", "ema.decay"),
        ("stage[2].min_lr=1.0", "stage[2].min_lr"),
    ] {
        let run = tmp.path().join("run");
        let out = train(&recipe("dit-tiny.toml"), &run, &[set]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{set}: {err}");
        assert!(err.contains(key), "{set}: {err}");
        assert!(!run.exists(), "{set} wrote {}", run.display());
    }
}

#[test]
fn synthetic_clips_to_latents_to_a_curriculum_dit_to_samples() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let t = |p: &str| tmp.path().join(p).display().to_string();
    ok(&bin()
        .args([
            "data",
            "synth",
            &t("clips"),
            "--count",
            "16",
            "--size",
            "32",
        ])
        .args(["--frames", "9"])
        .output()
        .expect("synth"));
    let clips = format!("data.clips=\"{}\"", t("clips"));
    ok(&train(
        &recipe("video-vae-tiny.toml"),
        &tmp.path().join("vae"),
        &[
            &clips,
            "vae.channels=[8, 8, 8]",
            "vae.groups=4",
            "vae.latent=4",
            "vae.linear=true",
            "data.crop=16",
            "data.holdout_every=8",
            "training.steps=2",
            "training.warmup_steps=1",
            "training.batch=2",
            "eval.refine=0",
        ],
    ));
    ok(&bin()
        .args([
            "data",
            "cache",
            &t("clips"),
            "--run",
            &t("vae"),
            "--out",
            &t("latents"),
        ])
        .output()
        .expect("cache"));
    let latents = format!("data.latents=\"{}\"", t("latents"));
    let out = ok(&train(
        &recipe("dit-tiny.toml"),
        &tmp.path().join("dit"),
        &[
            &latents,
            // A MoE-DiT: burn-moe experts in the block, their aux loss in the gradient.
            "dit.moe={experts = 2, top_k = 1, ffn_hidden = 16}",
            "dit.hidden=24",
            "dit.depth=1",
            "dit.heads=2",
            "stage[0].steps=3",
            "stage[0].warmup_steps=1",
            "stage[1].steps=2",
            "stage[2].steps=2",
            "stage[1].frames=2",
            "stage[2].frames=3",
            "post.sft_steps=6",
            "post.sft_lr=1e-3",
            "post.dpo_steps=2",
            "post.prompts=8",
            "post.eval_prompts=2",
            "post.sample_steps=2",
            "post.batch=2",
        ],
    ));
    let order: Vec<usize> = ["stage images:", "stage short clips:", "stage full clips:"]
        .iter()
        .map(|s| out.find(s).unwrap_or_else(|| panic!("no {s:?} in {out}")))
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{out}");
    assert_eq!(out.matches("validation loss").count(), 3, "{out}");
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("dit/summary.json")).expect("summary"),
    )
    .expect("JSON");
    let stages = summary["stages"].as_array().expect("stages");
    assert_eq!(stages.len(), 3);
    assert!(
        stages
            .iter()
            .all(|s| s["validation_loss"].as_f64().is_some_and(f64::is_finite))
    );
    let post = &summary["post"];
    for key in ["before", "after_sft", "after_dpo"] {
        let d = post[key]["direction"].as_f64().expect("direction");
        assert!((0.0..=1.0).contains(&d), "{key}: {d}");
    }
    let get = |key: &str| {
        post[key]
            .as_f64()
            .unwrap_or_else(|| panic!("no {key}: {post}"))
    };
    // SFT fits its clips: the flow loss on them (fixed timesteps and noise) falls.
    assert!(
        get("sft_flow_after") < get("sft_flow_before"),
        "SFT did not lower the flow loss on its clips: {post}"
    );
    // DPO starts at the reference (margin 0); an untrained model's samples often tie under
    // the checker (then there are no pairs and DPO leaves the model alone, margin 0). What DPO
    // does to the margin of its pairs is tested above on pairs of its own.
    let pairs = post["pairs"].as_u64().expect("pairs");
    assert!(pairs <= 8, "{post}");
    assert!(get("dpo_margin_before").abs() < 1e-6, "{post}");
    if pairs == 0 {
        assert!(get("dpo_margin_after").abs() < 1e-6, "{post}");
    } else {
        assert!(get("dpo_margin_after") > 0.0, "{post}");
    }
    assert!(out.contains("post-training"), "{out}");
    let metrics = std::fs::read_to_string(tmp.path().join("dit/metrics.jsonl")).expect("metrics");
    assert_eq!(metrics.lines().count(), 7);
    // Sampling writes one GIF per prompt; the checker reports accuracies.
    ok(&bin()
        .args(["sample", "--run", &t("dit"), "--out", &t("samples")])
        .args([
            "--prompt",
            "1 red square moving left",
            "--prompt",
            "2 blue circles moving up",
        ])
        .args(["--steps", "2", "--frames", "3"])
        .output()
        .expect("sample"));
    let gif = burn_video::clip::Clip::read(&tmp.path().join("samples/sample_01.gif")).expect("gif");
    assert_eq!((gif.len(), gif.size()), (9, (32, 32)));
    // A clip whose attention cannot fit in this machine's memory is refused before sampling
    // (both numbers stated), not grown until the machine runs out.
    let out = bin()
        .args(["sample", "--run", &t("dit"), "--out", &t("huge")])
        .args(["--prompt", "1 red square moving left", "--frames", "100000"])
        .output()
        .expect("sample");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("GiB") && err.contains("GiB available") && err.contains("--frames"),
        "{err}"
    );
    assert!(!tmp.path().join("huge").exists(), "wrote the sample folder");
    let out = ok(&bin()
        .args([
            "eval",
            "dit",
            "--run",
            &t("dit"),
            "--prompts",
            "4",
            "--steps",
            "2",
        ])
        .args(["--frames", "2"])
        .output()
        .expect("eval"));
    assert!(out.contains("4 prompts: direction"), "{out}");
    // Without the cache's VAE checkpoint, a recipe with post-training is refused before any
    // step (post-training decodes samples with it), and nothing is written.
    std::fs::remove_dir_all(tmp.path().join("vae/checkpoints")).expect("remove the VAE");
    let run = tmp.path().join("dit2");
    let out = train(
        &recipe("dit-tiny.toml"),
        &run,
        &[&latents, "stage[1].frames=2", "stage[2].frames=3"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("data.latents"), "{err}");
    assert!(!run.exists(), "wrote {}", run.display());
}
