//! The VAE trainer as a library: a seeded run repeats bit for bit, the loss falls, errors name
//! the field.

use burn::tensor::Device;
use burn_parallel::lr_schedule::LrSchedule;
use burn_video::VideoError;
use burn_video::clip::Clip;
use burn_video::synthetic::{Label, generate};
use burn_video::vae::VaeConfig;
use burn_video::vae_training::{VaeTrainer, VaeTrainingConfig, latent_statistics};

/// Burn's random generator belongs to the process: the tests draw from it one at a time, so a
/// seeded run sees only its own draws.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn clips() -> Vec<Clip> {
    (0..3)
        .map(|i| generate(&Label::nth(i * 7), 16, 9, i as u64).expect("clip"))
        .collect()
}

fn vae_config() -> VaeConfig {
    VaeConfig {
        channels: vec![8; 4],
        latent: 4,
        groups: 2,
        ..VaeConfig::default()
    }
}

fn config(steps: usize, seed: u64) -> VaeTrainingConfig {
    VaeTrainingConfig {
        steps,
        batch: 2,
        frames: 5,
        crop: 16,
        schedule: LrSchedule::constant(3e-3, 0, steps),
        grad_clip: Some(1.0),
        seed,
    }
}

#[test]
fn the_loss_falls_and_each_step_follows_the_schedule() {
    let _serial = serial();
    let device = Device::flex().autodiff();
    let cfg = vae_config();
    let vae = cfg.init(&device).expect("init");
    let mut c = config(30, 1);
    c.schedule = LrSchedule {
        lr: 3e-3,
        min_lr: 1e-3,
        warmup_steps: 3,
        steps: 30,
    };
    let mut trainer = VaeTrainer::new(vae, &cfg, &c, clips(), &device).expect("trainer");
    let mut losses = Vec::new();
    for i in 0..30 {
        let s = trainer.step().expect("step");
        assert_eq!((s.step, trainer.steps_done()), (i + 1, i + 1));
        assert_eq!(s.lr, c.schedule.at(i));
        assert!(s.loss.is_finite() && s.mse >= 0.0 && s.kl >= 0.0, "{s:?}");
        losses.push(s.loss);
    }
    let first: f64 = losses[..5].iter().sum::<f64>() / 5.0;
    let last: f64 = losses[25..].iter().sum::<f64>() / 5.0;
    assert!(last < 0.5 * first, "loss {first} -> {last}");
}

#[test]
fn bad_configurations_name_the_field() {
    let _serial = serial();
    let device = Device::flex().autodiff();
    let cfg = vae_config();
    type Change = fn(&mut VaeTrainingConfig);
    let cases: [(&str, Change); 6] = [
        ("frames", |c| c.frames = 4),
        ("crop", |c| c.crop = 12),
        ("batch", |c| c.batch = 0),
        ("steps", |c| c.steps = 0),
        ("lr", |c| c.schedule.lr = 0.0),
        ("crop", |c| c.crop = 24), // larger than the 16×16 clips
    ];
    for (field, change) in cases {
        let mut c = config(3, 0);
        change(&mut c);
        let vae = cfg.init(&device).expect("init");
        match VaeTrainer::new(vae, &cfg, &c, clips(), &device) {
            Err(VideoError::InvalidArgument { name, .. }) => assert_eq!(name, field),
            Err(other) => panic!("{field}: {other}"),
            Ok(_) => panic!("{field}: accepted"),
        }
    }
}

#[test]
fn latent_statistics_are_those_of_the_posterior_means() {
    let _serial = serial();
    let device = Device::flex();
    let cfg = vae_config();
    let vae = cfg.init(&device).expect("init");
    let clips = clips();
    let (mean, std) = latent_statistics(&vae, &cfg, &clips, &device).expect("statistics");
    // By hand: every channel's values over every clip's posterior mean.
    let mut per_channel = vec![Vec::new(); cfg.latent];
    for c in &clips {
        let z = vae.encode(burn_video::tensor::clip_tensor(c, &device)).mean;
        let [_, ch, t, h, w] = z.dims();
        let v: Vec<f32> = z.into_data().iter::<f32>().collect();
        for (k, values) in per_channel.iter_mut().enumerate().take(ch) {
            values.extend(
                v[k * t * h * w..(k + 1) * t * h * w]
                    .iter()
                    .map(|&x| f64::from(x)),
            );
        }
    }
    for (k, values) in per_channel.iter().enumerate() {
        let n = values.len() as f64;
        let m = values.iter().sum::<f64>() / n;
        let s = (values.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / n).sqrt();
        assert!((mean[k] - m).abs() < 1e-9, "mean {k}: {} vs {m}", mean[k]);
        assert!((std[k] - s).abs() < 1e-6, "std {k}: {} vs {s}", std[k]);
    }
}

/// A seeded trainer repeats its run bit for bit (initialisation, crops and posterior noise)
/// and another seed gives another run; `fit` runs the steps left and reports each.
#[test]
fn a_seeded_run_repeats_bit_for_bit() {
    let _serial = serial();
    let device = Device::flex().autodiff();
    let cfg = vae_config();
    let run = |seed: u64| {
        let mut t = VaeTrainer::seeded(&cfg, &config(4, seed), clips(), &device).expect("trainer");
        t.step().expect("first step");
        let mut seen = Vec::new();
        let steps = t
            .fit(|s| {
                seen.push(s.step);
                Ok(())
            })
            .expect("fit");
        assert_eq!(seen, [2, 3, 4]);
        steps.iter().map(|s| s.loss).collect::<Vec<_>>()
    };
    let a = run(5);
    assert_eq!(a, run(5));
    assert_ne!(a, run(6));
}
