#![warn(missing_docs)]
//! # burn-video
//!
//! The first half of a MUG-V-style video pretraining pipeline: [`clip`] (PNG-frame folders and
//! animated GIFs in, PNG and GIF previews out; MP4 and anything FFmpeg reads with the `ffmpeg`
//! feature, see `ffmpeg`), [`filter`] (scene-cut, sharpness and motion
//! scores and thresholds), [`pipeline`] (scan a folder, bucket by resolution and length, JSONL
//! manifest with the reason for every rejection), [`synthetic`] (labelled clips of moving
//! shapes), [`camera`] (camera clips from still images and animations, a corpus whose manifest
//! holds whole sources out), [`resample`] (anti-aliased resizing, the VAE baseline), [`vae`] (the causal 3-D convolutional VAE, chunked
//! encode/decode), [`vae_training`] (training on random crops, latent statistics, evaluation
//! against the resize baseline), [`latent_cache`] (clips encoded once for the DiT) and
//! [`metrics`] (PSNR, SSIM). The DiT trainer still runs through `burn-recipes`.
//!
//! ```
//! use burn_video::metrics::{Frame, psnr};
//!
//! let a = Frame::new(2, 2, 1, vec![0.5; 4]).unwrap();
//! let b = Frame::new(2, 2, 1, vec![0.6; 4]).unwrap();
//! assert!((psnr(&a, &b, 1.0).unwrap() - 20.0).abs() < 1e-4); // MSE 0.01 → 20 dB
//! ```

pub mod camera;
pub mod checker;
pub mod clip;
pub mod dit;
pub mod dit_training;
pub mod error;
#[cfg(feature = "ffmpeg")]
pub mod ffmpeg;
pub mod filter;
pub mod flow;
pub mod latent_cache;
pub mod metrics;
pub mod pipeline;
pub mod resample;
pub mod synthetic;
pub mod tensor;
pub mod text;
pub mod vae;
pub mod vae_training;

pub use error::{Result, VideoError};

/// The pipeline's main types and functions in one import (`use burn_video::prelude::*;`).
pub mod prelude {
    pub use crate::camera::{CameraConfig, build_corpus, camera_clip, read_sources};
    pub use crate::checker::{Verdict, check};
    pub use crate::clip::{Clip, list_clips};
    pub use crate::dit::{Condition, Dit, DitConfig};
    pub use crate::error::{Result, VideoError};
    pub use crate::latent_cache::{CacheMeta, CachedClip, cache_latents, read_cache, read_latent};
    pub use crate::metrics::{Frame, psnr, ssim};
    pub use crate::pipeline::{Buckets, scan};
    pub use crate::resample::same_size_baseline;
    pub use crate::synthetic::{Label, generate};
    pub use crate::tensor::{clip_tensor, to_clip};
    pub use crate::text::Vocabulary;
    pub use crate::vae::{LinearPath, Vae, VaeConfig};
    pub use crate::vae_training::{
        Refine, VaeEval, VaeStep, VaeTrainer, VaeTrainingConfig, evaluate, evaluate_groups,
        held_out_sources, latent_statistics, split_clips, split_clips_by_source,
    };
}
