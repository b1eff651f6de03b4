#![warn(missing_docs)]
//! # burn-video
//!
//! The first half of a MUG-V-style video pretraining pipeline: [`clip`] (PNG-frame folders and
//! animated GIFs in, PNG and GIF previews out), [`filter`] (scene-cut, sharpness and motion
//! scores and thresholds), [`pipeline`] (scan a folder, bucket by resolution and length, JSONL
//! manifest with the reason for every rejection), [`synthetic`] (labelled clips of moving
//! shapes), [`resample`] (anti-aliased resizing, the VAE baseline), [`vae`] (the causal 3-D convolutional VAE) and [`metrics`] (PSNR, SSIM). VAE
//! training, the DiT and rectified flow are being built.
//!
//! ```
//! use burn_video::metrics::{Frame, psnr};
//!
//! let a = Frame::new(2, 2, 1, vec![0.5; 4]).unwrap();
//! let b = Frame::new(2, 2, 1, vec![0.6; 4]).unwrap();
//! assert!((psnr(&a, &b, 1.0).unwrap() - 20.0).abs() < 1e-4); // MSE 0.01 → 20 dB
//! ```

pub mod clip;
pub mod error;
pub mod filter;
pub mod metrics;
pub mod pipeline;
pub mod resample;
pub mod synthetic;
pub mod vae;

pub use error::{Result, VideoError};
