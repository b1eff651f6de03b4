//! The DiT and rectified flow: 3-D RoPE depends on relative positions only, fresh blocks are
//! the identity (AdaLN-zero), a small DiT overfits one batch, and the Euler sampler carries
//! N(0, 1) to a Gaussian along its analytic rectified-flow velocity.

use burn::module::Module;
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use burn_parallel::prelude::{
    AdamWConfig, DistributedAdamW, GradientBuffer, Group, replicated_roles,
};
use burn_video::dit::{DitConfig, MoeFfn, apply_rope, rope_tables};
use burn_video::flow::{self, Rng};
use burn_video::text::Vocabulary;

/// Burn's random generator belongs to the process: the tests draw from it one at a time, so a
/// seeded run sees only its own draws.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn tiny() -> DitConfig {
    DitConfig {
        latent: 4,
        hidden: 48,
        depth: 2,
        heads: 2,
        mlp_ratio: 2,
        vocab: 16,
        text_len: 6,
        rope_base: 100.0,
        moe: None,
        pooled_text: false,
    }
}

/// The same with a mixture of 4 SwiGLU experts (top-2) in every block.
fn tiny_moe() -> DitConfig {
    DitConfig {
        moe: Some(MoeFfn {
            experts: 4,
            top_k: 2,
            ffn_hidden: 32,
            aux_loss: 1e-2,
        }),
        ..tiny()
    }
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap()
}

#[test]
fn rope_scores_depend_on_relative_positions_only() {
    let _serial = serial();
    let d = Device::flex();
    let head_dim = 24;
    let (grid_t, grid_h, grid_w) = (5, 5, 5);
    let (cos, sin) = rope_tables((grid_t, grid_h, grid_w), head_dim, 100.0, &d);
    let q = Tensor::<4>::random([1, 1, 1, head_dim], Distribution::Normal(0.0, 1.0), &d);
    let k = Tensor::<4>::random([1, 1, 1, head_dim], Distribution::Normal(0.0, 1.0), &d);
    let row = |(t, y, x): (usize, usize, usize)| {
        let i = (t * grid_h + y) * grid_w + x;
        (cos.clone().narrow(0, i, 1), sin.clone().narrow(0, i, 1))
    };
    let score = |a, b| {
        let (ca, sa) = row(a);
        let (cb, sb) = row(b);
        let qa = apply_rope(q.clone(), &ca, &sa);
        let kb = apply_rope(k.clone(), &cb, &sb);
        values((qa * kb).sum())[0]
    };
    let base = score((0, 1, 2), (2, 0, 1));
    for shift in [(1, 1, 1), (2, 3, 0), (1, 0, 2)] {
        let s = score(
            (shift.0, 1 + shift.1, 2 + shift.2),
            (2 + shift.0, shift.1, 1 + shift.2),
        );
        assert!((s - base).abs() < 1e-4, "shift {shift:?}: {s} vs {base}");
    }
    // Another offset on any single axis gives another score.
    for other in [
        ((0, 1, 2), (3, 0, 1)),
        ((0, 1, 2), (2, 2, 1)),
        ((0, 1, 2), (2, 0, 4)),
    ] {
        let s = score(other.0, other.1);
        assert!(
            (s - base).abs() > 1e-3,
            "{other:?} scored like the base pair"
        );
    }
    // Rotation keeps norms.
    let (c, s) = row((3, 4, 2));
    let r = values(apply_rope(q.clone(), &c, &s).powi_scalar(2).sum())[0];
    let n = values(q.powi_scalar(2).sum())[0];
    assert!((r - n).abs() < 1e-3 * n);
}

fn batch(d: &Device) -> (Tensor<5>, Tensor<5>, Tensor<1>, burn_video::dit::Condition) {
    let x0 = Tensor::<5>::random([2, 4, 3, 4, 4], Distribution::Normal(0.0, 1.0), d);
    let eps = Tensor::<5>::random([2, 4, 3, 4, 4], Distribution::Normal(0.0, 1.0), d);
    let t = Tensor::<1>::from_data(TensorData::new(vec![0.3f32, 0.8], [2]), d);
    let vocab = Vocabulary::from_captions(&["a red square moving left", "a blue circle"]);
    let text = vocab
        .batch(&[Some("a red square moving left"), None], 6, d)
        .expect("captions");
    let cond = burn_video::dit::Condition {
        text,
        first_frame: None,
    };
    (x0, eps, t, cond)
}

#[test]
fn a_fresh_dit_is_the_identity_in_every_block_and_predicts_zero() {
    let _serial = serial();
    let d = Device::flex();
    let dit = tiny().init(&d).expect("dit");
    let (x0, eps, t, cond) = batch(&d);
    let xt = flow::interpolate(x0, eps, t.clone());
    let v = dit.forward(xt.clone(), t, &cond).expect("forward");
    assert_eq!(v.dims(), xt.dims());
    assert!(values(v.abs().max()).iter().all(|&m| m == 0.0));
    // Each block alone, with the shared modulation a fresh model produces (zero).
    let x = Tensor::<3>::random([2, 12, 48], Distribution::Normal(0.0, 1.0), &d);
    let t6 = Tensor::<3>::zeros([2, 6, 48], &d);
    let text = Tensor::<3>::random([2, 6, 48], Distribution::Normal(0.0, 1.0), &d);
    let rope = rope_tables((3, 2, 2), 24, 100.0, &d);
    for block in dit.blocks() {
        let y = block
            .forward(x.clone(), &t6, &text, &cond.text.mask, &rope)
            .expect("block");
        assert_eq!(values(y), values(x.clone()));
    }
}

#[test]
fn a_small_dit_overfits_one_batch() {
    let _serial = serial();
    overfit(&tiny());
}

#[test]
fn a_pooled_text_dit_starts_at_zero_and_overfits_one_batch() {
    let _serial = serial();
    let pooled = DitConfig {
        pooled_text: true,
        ..tiny()
    };
    let d = Device::flex();
    let count = |c: &DitConfig| c.init(&d).expect("dit").num_params();
    // One hidden × hidden projection (and its bias) more than the plain DiT.
    assert_eq!(count(&pooled), count(&tiny()) + 48 * 48 + 48);
    let dit = pooled.init(&d).expect("dit");
    let (x0, eps, t, cond) = batch(&d);
    let xt = flow::interpolate(x0, eps, t.clone());
    let v = dit.forward(xt, t, &cond).expect("forward");
    assert!(values(v.abs().max()).iter().all(|&m| m == 0.0));
    overfit(&pooled);
}

#[test]
fn a_small_moe_dit_overfits_one_batch_and_reports_its_aux_loss() {
    let _serial = serial();
    let d = Device::flex();
    let dit = tiny_moe().init(&d).expect("moe dit");
    let (x0, eps, t, cond) = batch(&d);
    let xt = flow::interpolate(x0, eps, t.clone());
    let (v, aux) = dit.forward_aux(xt.clone(), t, &cond).expect("forward");
    assert_eq!(v.dims(), xt.dims());
    // Two blocks, each aux ≥ coefficient × 1 (Megatron's switch loss is ≥ 1 · coeff · k / k).
    let aux = values(aux.expect("aux loss"))[0];
    assert!(aux > 0.0 && aux.is_finite(), "{aux}");
    overfit(&tiny_moe());
}

fn overfit(cfg: &DitConfig) {
    let d = Device::flex().autodiff();
    let mut dit = cfg.init(&d).expect("dit");
    let (x0, eps, t, cond) = batch(&d);
    let xt = flow::interpolate(x0.clone(), eps.clone(), t.clone());
    let g = Group::single();
    let mut opt = DistributedAdamW::new(
        AdamWConfig {
            lr: 3e-3,
            weight_decay: 0.0,
            ..AdamWConfig::default()
        },
        g.clone(),
        g.clone(),
        g,
    )
    .expect("optimizer");
    let mut first = None;
    let mut last = f32::INFINITY;
    let mut steps = 0;
    for _ in 0..300 {
        steps += 1;
        let (v, aux) = dit
            .forward_aux(xt.clone(), t.clone(), &cond)
            .expect("forward");
        let loss = flow::loss(v, x0.clone(), eps.clone());
        // The flow loss is what must fall; the MoE load-balancing loss (a floor of about its
        // coefficient per block) joins the gradient only, as in the recipes' trainer.
        last = values(loss.clone())[0];
        let loss = match aux {
            Some(a) => loss + a,
            None => loss,
        };
        first.get_or_insert(last);
        let mut grads = GradientBuffer::new();
        grads.add(&dit, &loss.backward()).expect("gradients");
        let roles = replicated_roles(&dit);
        dit = opt.step_buffered(dit, grads, &roles).expect("step").0;
        if last < 0.005 * first.unwrap() {
            break;
        }
    }
    let first = first.unwrap();
    assert!(
        last < 0.01 * first,
        "loss {first} -> {last} in {steps} steps"
    );
    eprintln!("overfit: loss {first} -> {last} in {steps} steps");
}

#[test]
fn euler_carries_noise_to_a_gaussian_along_its_analytic_velocity() {
    let _serial = serial();
    // x0 ~ N(mu, s0²), eps ~ N(0, 1), x_t = (1 − t) x0 + t eps: E[eps − x0 | x_t = x] is
    // linear in x. Integrating it from t = 1 must give N(mu, s0²).
    let (mu, s0) = (2.0f64, 0.5f64);
    let v = |x: f64, t: f64| {
        let var = (1.0 - t).powi(2) * s0 * s0 + t * t;
        let dev = x - (1.0 - t) * mu;
        let e_eps = t / var * dev;
        let e_x0 = mu + (1.0 - t) * s0 * s0 / var * dev;
        e_eps - e_x0
    };
    let d = Device::flex();
    let n = 20_000;
    let mut rng = Rng::new(3);
    let noise: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    for r in [1.0, 3.0] {
        let x1 = Tensor::<5>::from_data(TensorData::new(noise.clone(), [n, 1, 1, 1, 1]), &d);
        let out = flow::euler(x1, 200, r, |x, t| {
            let xs: Vec<f32> = values(x)
                .iter()
                .map(|&x| v(f64::from(x), t) as f32)
                .collect();
            Ok(Tensor::from_data(TensorData::new(xs, [n, 1, 1, 1, 1]), &d))
        })
        .expect("sample");
        let xs = values(out);
        let mean = xs.iter().map(|&x| f64::from(x)).sum::<f64>() / n as f64;
        let var = xs
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / n as f64;
        assert!((mean - mu).abs() < 0.02, "r {r}: mean {mean}");
        assert!((var.sqrt() - s0).abs() < 0.02, "r {r}: std {}", var.sqrt());
    }
}

#[test]
fn timesteps_shift_toward_noise_and_captions_encode() {
    let _serial = serial();
    assert!((flow::shift(0.5, 3.0) - 0.75).abs() < 1e-12);
    assert_eq!(flow::shift(0.0, 5.0), 0.0);
    assert!((flow::shift(1.0, 5.0) - 1.0).abs() < 1e-12);
    assert!((flow::resolution_shift(16, 16, 4, 16) - 2.0).abs() < 1e-12);
    let mut rng = Rng::new(1);
    let plain = flow::logit_normal(5000, 0.0, 1.0, 1.0, &mut rng);
    let mut rng = Rng::new(1);
    let shifted = flow::logit_normal(5000, 0.0, 1.0, 3.0, &mut rng);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    assert!((mean(&plain) - 0.5).abs() < 0.02, "{}", mean(&plain));
    assert!(mean(&shifted) > mean(&plain) + 0.1);
    assert!(
        plain
            .iter()
            .chain(&shifted)
            .all(|t| (0.0..=1.0).contains(t))
    );

    let vocab = Vocabulary::from_captions(&["A red square, moving left.", "a blue circle"]);
    assert_eq!(vocab.len(), 3 + 7);
    let (ids, mask) = vocab.encode("a red circle jumping", 6).expect("encode");
    assert_eq!(mask, [true, true, true, true, false, false]);
    assert_eq!(ids[3], burn_video::dit::UNK);
    assert_eq!(ids[4], burn_video::dit::PAD);
    let (null, mask) = vocab.encode("", 3).expect("null");
    assert_eq!((null[0], mask[0]), (burn_video::dit::NULL, true));
    let e = vocab.encode("a a a a", 3).unwrap_err().to_string();
    assert!(e.contains("caption"), "{e}");
}

#[test]
fn bad_dit_configs_name_the_field() {
    let _serial = serial();
    for (cfg, field) in [
        (DitConfig { heads: 3, ..tiny() }, "heads"),
        (DitConfig { depth: 0, ..tiny() }, "depth"),
        (DitConfig { vocab: 2, ..tiny() }, "vocab"),
        (
            DitConfig {
                rope_base: 0.5,
                ..tiny()
            },
            "rope_base",
        ),
        (
            DitConfig {
                moe: Some(MoeFfn {
                    experts: 2,
                    top_k: 3,
                    ffn_hidden: 8,
                    aux_loss: 0.0,
                }),
                ..tiny()
            },
            "moe",
        ),
    ] {
        let e = cfg.init(&Device::flex()).unwrap_err().to_string();
        assert!(e.contains(field), "{e}");
    }
}

#[test]
fn the_dpo_loss_is_log_2_at_the_reference_and_rewards_fitting_the_preferred_sample() {
    let _serial = serial();
    let d = Device::flex();
    let t = |v: Vec<f32>| Tensor::<1>::from_data(TensorData::new(v.clone(), [v.len()]), &d);
    let same = flow::dpo_loss(
        t(vec![0.3, 1.2]),
        t(vec![0.5, 0.1]),
        t(vec![0.3, 1.2]),
        t(vec![0.5, 0.1]),
        100.0,
    );
    assert!((values(same)[0] as f64 - 2f64.ln()).abs() < 1e-6);
    // Hand-computed: margin = −β·((0.2 − 0.3) − (0.5 − 0.4)) = 0.2·β; β = 5 → m = 1,
    // loss = log(1 + e^−1).
    let better = flow::dpo_loss(t(vec![0.2]), t(vec![0.5]), t(vec![0.3]), t(vec![0.4]), 5.0);
    assert!((values(better)[0] as f64 - (1.0 + (-1f64).exp()).ln()).abs() < 1e-6);
    // Fitting the rejected sample instead raises the loss above log 2; large margins stay
    // finite.
    let worse = flow::dpo_loss(t(vec![0.3]), t(vec![0.4]), t(vec![0.3]), t(vec![0.5]), 5.0);
    assert!(values(worse)[0] as f64 > 2f64.ln());
    let huge = flow::dpo_loss(t(vec![0.0]), t(vec![1e3]), t(vec![0.0]), t(vec![0.0]), 1e3);
    let huge = values(huge)[0];
    assert!(huge.is_finite() && huge >= 0.0);
    let per = flow::per_sample_error(
        Tensor::<5>::ones([2, 1, 1, 1, 2], &d),
        Tensor::<5>::from_data(
            TensorData::new(vec![1f32, 1.0, 0.0, 3.0], [2, 1, 1, 1, 2]),
            &d,
        ),
    );
    assert_eq!(values(per), vec![0.0, 2.5]);
}

/// The curriculum trainer on clips of random latents: stages run in order with their frames,
/// steps count over the whole run, each stage reports a validation loss, and two runs with the
/// same seed are the same run (losses and saved weights), another seed another run.
#[test]
fn the_curriculum_trainer_runs_its_stages_in_order_and_a_seed_reproduces_a_run() {
    let _serial = serial();
    use burn_video::dit_training::{
        DitEvent, DitTrainer, DitTrainingConfig, FlowConfig, LatentClip, Stage,
    };
    let d = Device::flex().autodiff();
    let captions = ["a red square", "a blue circle", "a green square"];
    let vocab = Vocabulary::from_captions(&captions.map(String::from));
    let clip = |i: usize| LatentClip {
        clip: format!("clip{i}").into(),
        latent: Tensor::<4>::from_data(
            TensorData::new(
                (0..4 * 3 * 4 * 4)
                    .map(|k| ((k * 7 + i * 13) % 11) as f32 / 5.0 - 1.0)
                    .collect::<Vec<_>>(),
                [4, 3, 4, 4],
            ),
            &d,
        ),
        caption: captions[i % 3].into(),
    };
    let (train, held): (Vec<_>, Vec<_>) = ((0..6).map(clip).collect(), (6..8).map(clip).collect());
    let stage = |name: &str, steps, frames, image_ratio| Stage {
        name: name.into(),
        steps,
        lr: 1e-3,
        min_lr: None,
        warmup_steps: 1,
        batch: 2,
        frames,
        image_ratio,
    };
    let config = |seed| DitTrainingConfig {
        stages: vec![stage("images", 3, 1, 0.0), stage("clips", 2, 3, 0.5)],
        flow: FlowConfig::default(),
        caption_dropout: 0.1,
        text_len: 6,
        ema: None,
        seed,
    };
    let tmp = tempfile::tempdir().expect("temporary folder");
    let run = |seed: u64, dir: &str| {
        let mut cfg = tiny();
        cfg.vocab = vocab.len();
        let mut t = DitTrainer::new(cfg, config(seed), vocab.clone(), &d).expect("trainer");
        let mut events = Vec::new();
        let reports = t
            .curriculum(&train, &held, |e| {
                events.push(match e {
                    DitEvent::Stage { index, .. } => format!("stage {index}"),
                    DitEvent::Step {
                        step, frames, loss, ..
                    } => {
                        assert!(loss.is_finite());
                        format!("step {step} ({frames})")
                    }
                    DitEvent::StageDone(r) => format!("{} done", r.name),
                });
                Ok(())
            })
            .expect("curriculum");
        assert!(reports.iter().all(|r| r.validation_loss.is_finite()));
        let dir = t.save(&tmp.path().join(dir)).expect("save");
        let weights = std::fs::read(dir.join("rank-00000.safetensors")).expect("weights");
        (events, reports, weights)
    };
    let (events, reports, weights) = run(3, "a");
    let kinds: Vec<String> = events
        .iter()
        .map(|e| e.split(" (").next().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        kinds,
        [
            "stage 0",
            "step 1",
            "step 2",
            "step 3",
            "images done",
            "stage 1",
            "step 4",
            "step 5",
            "clips done"
        ]
    );
    // Image stages draw one latent frame.
    assert!(
        events[1..4].iter().all(|e| e.ends_with("(1)")),
        "{events:?}"
    );
    assert_eq!(reports.iter().map(|r| r.frames).collect::<Vec<_>>(), [1, 3]);
    let (_, again, same_weights) = run(3, "b");
    assert_eq!(reports, again);
    assert!(weights == same_weights, "the same seed gave other weights");
    let (_, other, _) = run(4, "c");
    assert_ne!(reports, other);
}
