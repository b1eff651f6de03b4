//! Overfits one random-texture clip: `cargo run --release -p burn-video --example vae_overfit`.
use burn::tensor::{Device, Distribution, Tensor};
use burn_parallel::prelude::{AdamWConfig, DistributedAdamW, GradientBuffer, Group};
use burn_video::vae::VaeConfig;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let d = Device::flex().autodiff();
    let cfg = VaeConfig {
        channels: vec![16, 32, 32, 32],
        ..VaeConfig::default()
    };
    let mut vae = cfg.init(&d)?;
    let g = Group::single();
    let mut opt = DistributedAdamW::new(
        AdamWConfig {
            lr: 1e-3,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
            ..AdamWConfig::default()
        },
        g.clone(),
        g.clone(),
        g,
    )?;
    let x = Tensor::<5>::random([1, 3, 9, 32, 32], Distribution::Uniform(-1.0, 1.0), &d);
    let x = (x.clone() + x.roll_dim(1, 3)) * 0.5;
    for step in 0..150 {
        let loss = vae.loss(x.clone(), &cfg, std::env::args().nth(1).is_some());
        let l1 = loss.l1.clone().into_scalar::<f32>();
        let mut grads = GradientBuffer::new();
        grads.add(&vae, &loss.total.backward())?;
        vae = opt.step_buffered(vae, grads, &[])?.0;
        if step % 10 == 0 {
            println!("step {step}: l1 {l1:.4}");
        }
    }
    Ok(())
}
