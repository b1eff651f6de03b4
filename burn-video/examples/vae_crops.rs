//! Trains the VAE on random crops of a clip folder and prints the running L1:
//! `cargo run --release -p burn-video --example vae_crops DIR STEPS LR SAMPLE(0|1) [CHANNELS]`.
use burn::tensor::{Device, Tensor, TensorData};
use burn_parallel::prelude::{
    AdamWConfig, DistributedAdamW, GradientBuffer, Group, replicated_roles,
};
use burn_video::clip::{Clip, list_clips};
use burn_video::vae::VaeConfig;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 5 {
        return Err("usage: vae_crops DIR STEPS LR SAMPLE(0|1) [CHANNELS]".into());
    }
    let dir = std::path::Path::new(&a[1]);
    let steps: usize = a[2].parse()?;
    let lr: f64 = a[3].parse()?;
    let sample = a[4] == "1";
    let width: usize = a.get(5).map_or(Ok(16), |s| s.parse())?;
    let clips: Vec<Clip> = list_clips(dir)?
        .iter()
        .map(|p| Clip::read(p))
        .collect::<Result<_, _>>()?;
    let d = Device::flex().autodiff();
    let cfg = VaeConfig {
        channels: vec![width, 2 * width, 2 * width, 2 * width],
        ..VaeConfig::default()
    };
    let mut vae = cfg.init(&d)?;
    let g = Group::single();
    let mut opt = DistributedAdamW::new(
        AdamWConfig {
            lr,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
            ..AdamWConfig::default()
        },
        g.clone(),
        g.clone(),
        g,
    )?;
    let mut rng = burn_parallel::rng::Rng::new(1);
    let mut next = |n: usize| rng.below(n);
    let (b, f, s) = (4, 9, 32);
    let mut acc = 0.0;
    for step in 0..steps {
        let mut v = Vec::new();
        for _ in 0..b {
            let c = &clips[next(clips.len())];
            let (t0, y0, x0) = (next(17 - f + 1), next(64 - s + 1), next(64 - s + 1));
            for ch in 0..3 {
                for t in 0..f {
                    let px = c.frames()[t0 + t].pixels();
                    for y in 0..s {
                        for x in 0..s {
                            v.push(px[((y0 + y) * 64 + x0 + x) * 3 + ch] * 2.0 - 1.0);
                        }
                    }
                }
            }
        }
        let x = Tensor::<5>::from_data(TensorData::new(v, [b, 3, f, s, s]), &d);
        let loss = vae.loss(x, &cfg, sample);
        acc += loss.l1.clone().into_scalar::<f32>() as f64;
        let mut grads = GradientBuffer::new();
        grads.add(&vae, &loss.total.backward())?;
        let roles = replicated_roles(&vae);
        vae = opt.step_buffered(vae, grads, &roles)?.0;
        if (step + 1) % 25 == 0 {
            println!("step {}: mean l1 {:.4}", step + 1, acc / 25.0);
            acc = 0.0;
        }
    }
    Ok(())
}
