//! Times VAE training steps: `cargo run --release -p burn-video --example vae_step [BATCH]`.
use std::time::Instant;

use burn::tensor::{Device, Distribution, Tensor};
use burn_video::vae::VaeConfig;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let batch: usize = std::env::args().nth(1).map_or(Ok(1), |s| s.parse())?;
    let d = Device::flex().autodiff();
    let cfg = VaeConfig::default();
    let vae = cfg.init(&d)?;
    for i in 0..3 {
        let x = Tensor::<5>::random([batch, 3, 17, 64, 64], Distribution::Uniform(-1.0, 1.0), &d);
        let t = Instant::now();
        let loss = vae.loss(x, &cfg, true);
        let f = t.elapsed();
        let _g = loss.total.backward();
        println!(
            "step {i}: forward {:.2} s, forward+backward {:.2} s",
            f.as_secs_f64(),
            t.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
