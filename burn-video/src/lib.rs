#![warn(missing_docs)]
//! # burn-video
//!
//! The video-generation half of the project (clip pipeline, causal video VAE, DiT, rectified
//! flow) is being built; what ships today are the reconstruction metrics used to evaluate it.
//!
//! ```
//! use burn_video::metrics::{Frame, psnr};
//!
//! let a = Frame::new(2, 2, 1, vec![0.5; 4]).unwrap();
//! let b = Frame::new(2, 2, 1, vec![0.6; 4]).unwrap();
//! assert!((psnr(&a, &b, 1.0).unwrap() - 20.0).abs() < 1e-4); // MSE 0.01 → 20 dB
//! ```

pub mod metrics;
