#![warn(missing_docs)]
//! # burn-video
//!
//! The first half of a MUG-V-style video pretraining pipeline: [`clip`] (PNG-frame folders and
//! animated GIFs in, PNG and GIF previews out; MP4 and anything FFmpeg reads with the `ffmpeg`
//! feature, see `ffmpeg`), [`filter`] (scene-cut, sharpness and motion
//! scores and thresholds), [`pipeline`] (scan a folder, bucket by resolution and length, JSONL
//! manifest with the reason for every rejection), [`synthetic`] (labelled clips of moving
//! shapes), [`resample`] (anti-aliased resizing, the VAE baseline), [`vae`] (the causal 3-D convolutional VAE, chunked
//! encode/decode) and [`metrics`] (PSNR, SSIM). VAE training, evaluation and latent caching
//! run through `burn-recipes`.
//!
//! ```
//! use burn_video::metrics::{Frame, psnr};
//!
//! let a = Frame::new(2, 2, 1, vec![0.5; 4]).unwrap();
//! let b = Frame::new(2, 2, 1, vec![0.6; 4]).unwrap();
//! assert!((psnr(&a, &b, 1.0).unwrap() - 20.0).abs() < 1e-4); // MSE 0.01 → 20 dB
//! ```

pub mod checker;
pub mod clip;
pub mod dit;
pub mod error;
#[cfg(feature = "ffmpeg")]
pub mod ffmpeg;
pub mod filter;
pub mod flow;
pub mod metrics;
pub mod pipeline;
pub mod resample;
pub mod synthetic;
pub mod tensor;
pub mod text;
pub mod vae;

pub use error::{Result, VideoError};
