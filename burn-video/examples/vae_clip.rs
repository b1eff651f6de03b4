//! Encode and decode a public clip with the causal video VAE from burn-video alone: the smooth
//! linear path fitted to the clip (no training), then PSNR/SSIM of the reconstruction next to
//! the same-size resize baseline.
//!
//! `cargo run --release -p burn-video --example vae_clip [CLIP_DIR]` (default: the first
//! public clip, `../shared/data/video-clips/clip_0000`).

use burn::tensor::Device;
use burn_video::clip::Clip;
use burn_video::resample::{quality, same_size_baseline};
use burn_video::tensor::{clip_tensor, to_clip, usable};
use burn_video::vae::{LinearPath, VaeConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).unwrap_or_else(|| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/data/video-clips/clip_0000"
        )
        .into()
    });
    let clip = Clip::read(std::path::Path::new(&dir))?;
    let config = VaeConfig {
        channels: vec![8, 8, 8],
        patch: 2,
        linear: LinearPath::Smooth,
        groups: 4,
        ..VaeConfig::default()
    };
    let clip = usable(&clip, config.time_factor());
    let (w, h) = clip.size();
    let shape = config.latent_shape(clip.len(), h, w)?;
    let d = Device::flex();
    let x = clip_tensor(&clip, &d);
    // The linear path's principal components, fitted to this clip; the deep path is untrained.
    let (vae, explained) = config.init(&d)?.fit_linear(std::slice::from_ref(&x))?;
    let z = vae.encode(x).mean;
    println!(
        "{dir}: {} frames of {w}×{h} → latent {:?} (the fitted blocks explain {:.1}% of their variance)",
        clip.len(),
        z.dims(),
        100.0 * explained
    );
    let rec = to_clip(vae.decode(z))?;
    let baseline = same_size_baseline(&clip, shape)?;
    let (p, s) = quality(&[(clip.clone(), rec)])?;
    let (bp, bs) = quality(&[(clip, baseline)])?;
    println!("VAE (linear path, untrained): PSNR {p:.2} dB, SSIM {s:.3}");
    println!("same-size resize baseline:    PSNR {bp:.2} dB, SSIM {bs:.3}");
    Ok(())
}
